//! The CoAP decoder: any bytes either parse or are refused, never a panic; what parses can be
//! walked option by option.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbhub::coap::message::Message;
use nbhub::coap::option::OptionNumber;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::parse(data) {
        for (number, value) in m.options.iter() {
            let _ = (number.is_critical(), number.is_recognised(), value.len());
        }
        let _ = m.uint_option(OptionNumber::CONTENT_FORMAT);
        let _ = m.uint_option(OptionNumber::OBSERVE);
        let _ = m.options_of(OptionNumber::URI_PATH).count();
    }
});

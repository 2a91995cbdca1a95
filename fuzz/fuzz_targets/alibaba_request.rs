//! What the Alibaba dialect reads from a request before any credential is checked: the options it
//! looks at (token, seq, content format, path, query) and the `/auth` body in JSON or CBOR.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbhub::coap::message::Message;
use nbhub::coap::option::OptionNumber;
use nbhub::dialect::alibaba::body;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the body's content format; the rest is the body, and a request.
    let Some((&pick, rest)) = data.split_first() else { return };
    let cf = [None, Some(0), Some(50), Some(60), Some(42), Some(pick as u32)][pick as usize % 6];
    if let Ok(fields) = body::parse(cf, rest) {
        for key in ["productKey", "deviceName", "clientId", "sign", "signmethod", "seq", "timestamp", "ackMode"] {
            let _ = fields.get(key);
        }
    }
    if let Ok(m) = Message::parse(rest) {
        let _ = m.option(OptionNumber::ALI_TOKEN).or_else(|| m.option(OptionNumber::ALI_TOKEN_61));
        let _ = m.option(OptionNumber::ALI_SEQ);
        let _ = m.uint_option(OptionNumber::CONTENT_FORMAT);
        let _ = m.uint_option(OptionNumber::ACCEPT);
        let path: Vec<_> = m.options_of(OptionNumber::URI_PATH).map(std::str::from_utf8).collect();
        let _ = path;
        let _ = m.options_of(OptionNumber::URI_QUERY).count();
        if let Ok(cf) = m.uint_option(OptionNumber::CONTENT_FORMAT) {
            let _ = body::parse(cf, m.payload);
        }
    }
});

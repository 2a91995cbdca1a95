//! The PCP decoder, both directions. Parsing is strict, so whatever parses must encode back to the
//! very same bytes: anything looser would let a malformed frame count as PCP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbhub::ota::pcp::{FromDevice, FromPlatform};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = FromDevice::parse(data) {
        assert_eq!(m.encode(), data, "{m:?} does not round-trip");
    }
    if let Ok(m) = FromPlatform::parse(data) {
        assert_eq!(m.encode(), data, "{m:?} does not round-trip");
    }
});

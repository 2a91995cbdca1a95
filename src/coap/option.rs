//! CoAP option numbers this server knows, including the Alibaba ones (2088 token, 2089 seq,
//! 2090 message id) and the token-carrying 61 that the iotkit v3 client sends.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OptionNumber(pub u16);

impl OptionNumber {
    pub const IF_MATCH: OptionNumber = OptionNumber(1);
    pub const URI_HOST: OptionNumber = OptionNumber(3);
    pub const ETAG: OptionNumber = OptionNumber(4);
    pub const IF_NONE_MATCH: OptionNumber = OptionNumber(5);
    pub const OBSERVE: OptionNumber = OptionNumber(6);
    pub const URI_PORT: OptionNumber = OptionNumber(7);
    pub const LOCATION_PATH: OptionNumber = OptionNumber(8);
    pub const URI_PATH: OptionNumber = OptionNumber(11);
    pub const CONTENT_FORMAT: OptionNumber = OptionNumber(12);
    pub const MAX_AGE: OptionNumber = OptionNumber(14);
    pub const URI_QUERY: OptionNumber = OptionNumber(15);
    pub const ACCEPT: OptionNumber = OptionNumber(17);
    pub const BLOCK2: OptionNumber = OptionNumber(23);
    /// Not processed (see [`OptionNumber::is_recognised`]); named for traces.
    pub const BLOCK1: OptionNumber = OptionNumber(27);
    pub const SIZE2: OptionNumber = OptionNumber(28);
    pub const PROXY_URI: OptionNumber = OptionNumber(35);
    pub const PROXY_SCHEME: OptionNumber = OptionNumber(39);
    pub const SIZE1: OptionNumber = OptionNumber(60);
    /// Token option used by the iotkit v3 client (critical, so it must be recognised).
    pub const ALI_TOKEN_61: OptionNumber = OptionNumber(61);
    pub const NO_RESPONSE: OptionNumber = OptionNumber(258);
    pub const ALI_TOKEN: OptionNumber = OptionNumber(2088);
    /// AES-encrypted sequence number on port 5682 (critical).
    pub const ALI_SEQ: OptionNumber = OptionNumber(2089);
    /// Stored message id in uplink responses.
    pub const ALI_MESSAGE_ID: OptionNumber = OptionNumber(2090);

    /// RFC 7252 §5.4.6: odd numbers are critical.
    pub fn is_critical(self) -> bool {
        self.0 & 1 == 1
    }

    /// Options this server processes or may safely ignore in a request. Absent on purpose:
    /// Block1 (27), because nbhub does not reassemble blockwise uploads and one block must not be
    /// taken for the whole body; If-Match (1) and If-None-Match (5), because no resource here
    /// evaluates preconditions, and running a conditional request unconditionally would be wrong.
    /// Both critical, so such requests get 4.02. Proxy-Uri/Scheme are recognised so they can be
    /// answered 5.05.
    pub fn is_recognised(self) -> bool {
        matches!(
            self,
            Self::URI_HOST
                | Self::ETAG
                | Self::OBSERVE
                | Self::URI_PORT
                | Self::LOCATION_PATH
                | Self::URI_PATH
                | Self::CONTENT_FORMAT
                | Self::MAX_AGE
                | Self::URI_QUERY
                | Self::ACCEPT
                | Self::BLOCK2
                | Self::SIZE2
                | Self::PROXY_URI
                | Self::PROXY_SCHEME
                | Self::SIZE1
                | Self::ALI_TOKEN_61
                | Self::NO_RESPONSE
                | Self::ALI_TOKEN
                | Self::ALI_SEQ
                | Self::ALI_MESSAGE_ID
        )
    }
}

/// Content-Format numbers (RFC 7252 §12.3) that the dialects care about.
pub mod content_format {
    pub const TEXT: u32 = 0;
    /// `application/link-format` (RFC 6690).
    pub const LINK_FORMAT: u32 = 40;
    pub const OCTET_STREAM: u32 = 42;
    pub const JSON: u32 = 50;
    pub const CBOR: u32 = 60;
}

#[cfg(test)]
mod tests {
    use super::OptionNumber as O;

    #[test]
    fn alibaba_critical_options_are_recognised() {
        for n in [61, 2089] {
            assert!(O(n).is_critical());
            assert!(O(n).is_recognised());
        }
        assert!(!O(2088).is_critical());
        assert!(O(27).is_critical() && !O(27).is_recognised());
        assert!(O(9).is_critical() && !O(9).is_recognised());
        assert!(!O::IF_MATCH.is_recognised() && !O::IF_NONE_MATCH.is_recognised());
    }
}

//! CoAP message codec (RFC 7252 §3): a zero-copy parsed view and a builder.
//!
//! Parsing is strict where lenient libraries are not: version must be 1, a token longer than 8 bytes,
//! a reserved option nibble, a payload marker followed by nothing, and an Empty message carrying a
//! token, options or payload are all format errors (§3, §4.1).

use smallvec::SmallVec;

use super::option::OptionNumber;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Con = 0,
    Non = 1,
    Ack = 2,
    Rst = 3,
}

impl MessageType {
    fn from_bits(b: u8) -> MessageType {
        match b & 3 {
            0 => MessageType::Con,
            1 => MessageType::Non,
            2 => MessageType::Ack,
            _ => MessageType::Rst,
        }
    }
}

/// A CoAP code `c.dd` as its byte (class in the top 3 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u8);

impl Code {
    pub const EMPTY: Code = Code::new(0, 0);
    pub const GET: Code = Code::new(0, 1);
    pub const POST: Code = Code::new(0, 2);
    pub const PUT: Code = Code::new(0, 3);
    pub const DELETE: Code = Code::new(0, 4);
    pub const CREATED: Code = Code::new(2, 1);
    pub const DELETED: Code = Code::new(2, 2);
    pub const CHANGED: Code = Code::new(2, 4);
    pub const CONTENT: Code = Code::new(2, 5);
    pub const BAD_REQUEST: Code = Code::new(4, 0);
    pub const UNAUTHORIZED: Code = Code::new(4, 1);
    pub const BAD_OPTION: Code = Code::new(4, 2);
    pub const FORBIDDEN: Code = Code::new(4, 3);
    pub const NOT_FOUND: Code = Code::new(4, 4);
    pub const METHOD_NOT_ALLOWED: Code = Code::new(4, 5);
    pub const NOT_ACCEPTABLE: Code = Code::new(4, 6);
    /// RFC 8132: the request conflicts with the resource's current state (a shadow version).
    pub const CONFLICT: Code = Code::new(4, 9);
    pub const REQUEST_ENTITY_TOO_LARGE: Code = Code::new(4, 13);
    pub const UNSUPPORTED_CONTENT_FORMAT: Code = Code::new(4, 15);
    pub const TOO_MANY_REQUESTS: Code = Code::new(4, 29);
    pub const INTERNAL_SERVER_ERROR: Code = Code::new(5, 0);
    pub const SERVICE_UNAVAILABLE: Code = Code::new(5, 3);
    pub const PROXYING_NOT_SUPPORTED: Code = Code::new(5, 5);

    pub const fn new(class: u8, detail: u8) -> Code {
        Code((class << 5) | detail)
    }
    pub fn class(self) -> u8 {
        self.0 >> 5
    }
    pub fn detail(self) -> u8 {
        self.0 & 0x1f
    }
    pub fn is_request(self) -> bool {
        self.class() == 0 && self.detail() != 0
    }
    pub fn is_response(self) -> bool {
        (2..=5).contains(&self.class())
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:02}", self.class(), self.detail())
    }
}

/// Why a datagram is not a well-formed CoAP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("shorter than the 4-byte header")]
    TooShort,
    #[error("version is not 1")]
    UnknownVersion,
    #[error("token length above 8")]
    TokenLength,
    #[error("datagram ends inside the token")]
    TruncatedToken,
    #[error("reserved option delta or length nibble 15")]
    ReservedNibble,
    #[error("datagram ends inside an option")]
    TruncatedOption,
    #[error("option number above 65535")]
    OptionNumberOverflow,
    #[error("payload marker with an empty payload")]
    EmptyPayload,
    #[error("Empty message with a token, options or payload")]
    NonEmptyEmpty,
    #[error("more options than this server accepts in one message")]
    TooManyOptions,
}

/// Most options a request may carry; real devices send fewer than ten.
pub const MAX_OPTIONS: usize = 32;

/// A parsed message borrowing the datagram.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub mtype: MessageType,
    pub code: Code,
    pub mid: u16,
    pub token: &'a [u8],
    /// Options in wire order (ascending number).
    pub options: SmallVec<[(OptionNumber, &'a [u8]); 12]>,
    pub payload: &'a [u8],
}

/// An unsigned-integer option longer than the 4 bytes any this server reads may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("option {} is longer than 4 bytes", .0.0)]
pub struct UintTooLong(pub OptionNumber);

/// Header fields readable even when the rest of the datagram is malformed, so a CON can be
/// rejected with a matching RST (RFC 7252 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub mtype: MessageType,
    pub code: Code,
    pub mid: u16,
}

impl Header {
    pub fn peek(data: &[u8]) -> Option<Header> {
        if data.len() < 4 || data[0] >> 6 != 1 {
            return None;
        }
        Some(Header {
            mtype: MessageType::from_bits(data[0] >> 4),
            code: Code(data[1]),
            mid: u16::from_be_bytes([data[2], data[3]]),
        })
    }
}

impl<'a> Message<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Message<'a>, FormatError> {
        if data.len() < 4 {
            return Err(FormatError::TooShort);
        }
        if data[0] >> 6 != 1 {
            return Err(FormatError::UnknownVersion);
        }
        let mtype = MessageType::from_bits(data[0] >> 4);
        let tkl = (data[0] & 0x0f) as usize;
        if tkl > 8 {
            return Err(FormatError::TokenLength);
        }
        let code = Code(data[1]);
        let mid = u16::from_be_bytes([data[2], data[3]]);
        let token = data.get(4..4 + tkl).ok_or(FormatError::TruncatedToken)?;
        let mut pos = 4 + tkl;
        let mut options = SmallVec::new();
        let mut number: u32 = 0;
        let mut payload: &[u8] = &[];
        while pos < data.len() {
            let byte = data[pos];
            if byte == 0xff {
                payload = &data[pos + 1..];
                if payload.is_empty() {
                    return Err(FormatError::EmptyPayload);
                }
                break;
            }
            pos += 1;
            let delta = read_extended(byte >> 4, data, &mut pos)?;
            let len = read_extended(byte & 0x0f, data, &mut pos)? as usize;
            number += delta;
            if number > u16::MAX as u32 {
                return Err(FormatError::OptionNumberOverflow);
            }
            let value = data.get(pos..pos + len).ok_or(FormatError::TruncatedOption)?;
            pos += len;
            if options.len() == MAX_OPTIONS {
                return Err(FormatError::TooManyOptions);
            }
            options.push((OptionNumber(number as u16), value));
        }
        if code == Code::EMPTY && (tkl != 0 || !options.is_empty() || !payload.is_empty()) {
            return Err(FormatError::NonEmptyEmpty);
        }
        Ok(Message { mtype, code, mid, token, options, payload })
    }

    /// The first value of option `n`.
    pub fn option(&self, n: OptionNumber) -> Option<&'a [u8]> {
        self.options.iter().find(|(num, _)| *num == n).map(|(_, v)| *v)
    }

    /// Every value of a repeatable option, in order.
    pub fn options_of(&self, n: OptionNumber) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.options.iter().filter(move |(num, _)| *num == n).map(|(_, v)| *v)
    }

    /// An unsigned-integer option (RFC 7252 §3.2); `None` when absent.
    pub fn uint_option(&self, n: OptionNumber) -> Result<Option<u32>, UintTooLong> {
        match self.option(n) {
            None => Ok(None),
            Some(v) if v.len() > 4 => Err(UintTooLong(n)),
            Some(v) => Ok(Some(v.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32))),
        }
    }
}

fn read_extended(nibble: u8, data: &[u8], pos: &mut usize) -> Result<u32, FormatError> {
    match nibble {
        0..=12 => Ok(nibble as u32),
        13 => {
            let b = *data.get(*pos).ok_or(FormatError::TruncatedOption)?;
            *pos += 1;
            Ok(b as u32 + 13)
        }
        14 => {
            let b = data.get(*pos..*pos + 2).ok_or(FormatError::TruncatedOption)?;
            *pos += 2;
            Ok(u16::from_be_bytes([b[0], b[1]]) as u32 + 269)
        }
        _ => Err(FormatError::ReservedNibble),
    }
}

/// Serialises a message. Options must be added in ascending number order (the builder checks it
/// in debug builds); that is how every caller already has them.
pub struct MessageBuilder {
    buf: Vec<u8>,
    last_option: u16,
    has_payload: bool,
}

impl MessageBuilder {
    pub fn new(mtype: MessageType, code: Code, mid: u16, token: &[u8]) -> MessageBuilder {
        debug_assert!(token.len() <= 8);
        let mut buf = Vec::with_capacity(32 + token.len());
        buf.push(0x40 | ((mtype as u8) << 4) | token.len() as u8);
        buf.push(code.0);
        buf.extend_from_slice(&mid.to_be_bytes());
        buf.extend_from_slice(token);
        MessageBuilder { buf, last_option: 0, has_payload: false }
    }

    pub fn option(mut self, n: OptionNumber, value: &[u8]) -> MessageBuilder {
        debug_assert!(n.0 >= self.last_option && !self.has_payload, "options out of order");
        let delta = (n.0 - self.last_option) as u32;
        self.last_option = n.0;
        let (dn, dext) = nibble(delta);
        let (ln, lext) = nibble(value.len() as u32);
        self.buf.push((dn << 4) | ln);
        self.buf.extend_from_slice(&dext);
        self.buf.extend_from_slice(&lext);
        self.buf.extend_from_slice(value);
        self
    }

    /// An unsigned-integer option in its shortest form.
    pub fn uint_option(self, n: OptionNumber, v: u32) -> MessageBuilder {
        let bytes = v.to_be_bytes();
        let skip = (v.leading_zeros() / 8) as usize;
        self.option(n, &bytes[skip..])
    }

    pub fn payload(mut self, payload: &[u8]) -> MessageBuilder {
        if !payload.is_empty() {
            self.buf.push(0xff);
            self.buf.extend_from_slice(payload);
            self.has_payload = true;
        }
        self
    }

    pub fn build(self) -> Vec<u8> {
        self.buf
    }
}

fn nibble(v: u32) -> (u8, SmallVec<[u8; 2]>) {
    match v {
        0..=12 => (v as u8, SmallVec::new()),
        13..=268 => (13, SmallVec::from_slice(&[(v - 13) as u8])),
        _ => (14, SmallVec::from_slice(&((v - 269) as u16).to_be_bytes())),
    }
}

/// An Empty message (ACK or RST) matching `mid`: 4 bytes, never more than what provoked it.
pub fn empty(mtype: MessageType, mid: u16) -> Vec<u8> {
    MessageBuilder::new(mtype, Code::EMPTY, mid, &[]).build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::option::OptionNumber as O;

    #[test]
    fn parses_a_hand_encoded_request() {
        // CON POST mid 0x1234 token 01020304, Uri-Path "auth", CF 50, Accept 50, payload "{}"
        let built = MessageBuilder::new(MessageType::Con, Code::POST, 0x1234, &[1, 2, 3, 4])
            .option(O::URI_PATH, b"auth")
            .uint_option(O::CONTENT_FORMAT, 50)
            .uint_option(O::ACCEPT, 50)
            .payload(b"{}")
            .build();
        let literal = [
            0x44, 0x02, 0x12, 0x34, 1, 2, 3, 4, // header + token
            0xb4, b'a', b'u', b't', b'h', // Uri-Path (11), len 4
            0x11, 50, // Content-Format (12 = 11+1), len 1
            0x51, 50, // Accept (17 = 12+5), len 1
            0xff, b'{', b'}',
        ];
        assert_eq!(built, literal);
        let m = Message::parse(&literal).unwrap();
        assert_eq!(m.mtype, MessageType::Con);
        assert_eq!(m.code, Code::POST);
        assert_eq!(m.mid, 0x1234);
        assert_eq!(m.token, &[1, 2, 3, 4]);
        assert_eq!(m.option(O::URI_PATH), Some(&b"auth"[..]));
        assert_eq!(m.uint_option(O::ACCEPT), Ok(Some(50)));
        assert_eq!(m.payload, b"{}");
    }

    #[test]
    fn extended_option_encodings_round_trip() {
        let long = vec![7u8; 300];
        let built = MessageBuilder::new(MessageType::Non, Code::POST, 1, &[])
            .option(O::URI_PATH, b"topic")
            .option(O(61), b"tok")
            .option(O(2088), &long)
            .option(O(2089), &[0; 16])
            .build();
        // 2088 - 61 = 2027 needs the 2-byte extended delta; 300 needs the 2-byte extended length.
        let m = Message::parse(&built).unwrap();
        let nums: Vec<u16> = m.options.iter().map(|(n, _)| n.0).collect();
        assert_eq!(nums, vec![11, 61, 2088, 2089]);
        assert_eq!(m.option(O(2088)).unwrap(), &long[..]);
        assert_eq!(m.option(O(61)).unwrap(), b"tok");
    }

    #[test]
    fn rejects_malformed_input() {
        assert_eq!(Message::parse(&[0x40, 1, 0]).unwrap_err(), FormatError::TooShort);
        assert_eq!(Message::parse(&[0x80, 1, 0, 0]).unwrap_err(), FormatError::UnknownVersion);
        assert_eq!(Message::parse(&[0x49, 1, 0, 0]).unwrap_err(), FormatError::TokenLength);
        assert_eq!(Message::parse(&[0x42, 1, 0, 0, 1]).unwrap_err(), FormatError::TruncatedToken);
        assert_eq!(Message::parse(&[0x40, 1, 0, 0, 0xf0]).unwrap_err(), FormatError::ReservedNibble);
        assert_eq!(Message::parse(&[0x40, 1, 0, 0, 0x03, 1]).unwrap_err(), FormatError::TruncatedOption);
        assert_eq!(Message::parse(&[0x40, 1, 0, 0, 0xd0]).unwrap_err(), FormatError::TruncatedOption);
        assert_eq!(Message::parse(&[0x40, 1, 0, 0, 0xff]).unwrap_err(), FormatError::EmptyPayload);
        assert_eq!(Message::parse(&[0x41, 0, 0, 0, 9]).unwrap_err(), FormatError::NonEmptyEmpty);
        // delta 65535 + 269 overflows the option number space
        assert_eq!(Message::parse(&[0x40, 1, 0, 0, 0xe0, 0xff, 0xff]).unwrap_err(), FormatError::OptionNumberOverflow);
        let mut many = vec![0x40, 1, 0, 0];
        many.extend(std::iter::repeat_n(0x00, MAX_OPTIONS + 1));
        assert_eq!(Message::parse(&many).unwrap_err(), FormatError::TooManyOptions);
    }

    #[test]
    fn header_is_readable_from_a_malformed_con() {
        let h = Header::peek(&[0x40, 2, 0xab, 0xcd, 0xf0]).unwrap();
        assert_eq!(h.mtype, MessageType::Con);
        assert_eq!(h.mid, 0xabcd);
        assert!(Header::peek(&[0x00, 2, 0, 0]).is_none());
    }

    #[test]
    fn uint_options_are_minimal() {
        let m = MessageBuilder::new(MessageType::Ack, Code::CONTENT, 1, &[])
            .uint_option(O::CONTENT_FORMAT, 0)
            .uint_option(O::MAX_AGE, 300)
            .build();
        // Content-Format 0 is an empty value; Max-Age (delta 2) takes two bytes.
        assert_eq!(&m[4..], &[0xc0, 0x22, 0x01, 0x2c]);
    }
}

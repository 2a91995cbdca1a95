//! What a dialect's resource handlers see (a validated request) and decide (an outcome). The
//! endpoint owns the CoAP mechanics around them: message types, ids, dedup, separate responses.

use std::net::SocketAddr;

use smallvec::SmallVec;

use super::message::{Code, Message, MessageBuilder, MessageType};
use super::option::OptionNumber;
use crate::clock::Now;
use crate::identity::DeviceId;
use crate::store::{MessageId, Op};

pub struct Request<'r, 'a> {
    pub msg: &'r Message<'a>,
    pub peer: SocketAddr,
    /// The device the transport authenticated: a DTLS session keyed with its PSK.
    pub authenticated: Option<DeviceId>,
    pub now: Now,
    /// Uri-Path segments (UTF-8, checked by the endpoint).
    pub path: SmallVec<[&'a str; 8]>,
}

impl Request<'_, '_> {
    pub fn method(&self) -> Code {
        self.msg.code
    }

    /// Uri-Query value of `name` (`name=value`).
    pub fn query(&self, name: &str) -> Option<&[u8]> {
        self.msg.options_of(OptionNumber::URI_QUERY).find_map(|q| {
            let rest = q.strip_prefix(name.as_bytes())?;
            rest.strip_prefix(b"=")
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: Code,
    pub content_format: Option<u32>,
    pub max_age: Option<u32>,
    pub size1: Option<u32>,
    pub payload: Vec<u8>,
    /// Carry the stored message id in option 2090 once the write has it.
    pub with_message_id: bool,
}

impl Response {
    pub fn new(code: Code) -> Response {
        Response { code, content_format: None, max_age: None, size1: None, payload: Vec::new(), with_message_id: false }
    }

    pub fn with_payload(code: Code, content_format: u32, payload: Vec<u8>) -> Response {
        Response { content_format: Some(content_format), payload, ..Response::new(code) }
    }

    pub fn encode(&self, mtype: MessageType, mid: u16, token: &[u8], message_id: Option<MessageId>) -> Vec<u8> {
        let mut b = MessageBuilder::new(mtype, self.code, mid, token);
        if let Some(cf) = self.content_format {
            b = b.uint_option(OptionNumber::CONTENT_FORMAT, cf);
        }
        if let Some(age) = self.max_age {
            b = b.uint_option(OptionNumber::MAX_AGE, age);
        }
        if let Some(size) = self.size1 {
            b = b.uint_option(OptionNumber::SIZE1, size);
        }
        let mut id_buf = itoa_buf();
        if let (true, Some(id)) = (self.with_message_id, message_id) {
            b = b.option(OptionNumber::ALI_MESSAGE_ID, format_u64(&mut id_buf, id.0));
        }
        b.payload(&self.payload).build()
    }
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

/// Decimal ASCII of `v` without allocating (option 2090 is written for every uplink).
fn format_u64(buf: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// Undoes an in-memory reservation when the write that would have made it permanent fails.
pub type Undo = Box<dyn FnOnce() + Send>;

#[allow(clippy::large_enum_variant)] // built once per request and consumed at once; boxing would add an allocation
pub enum Outcome {
    /// Answer at once.
    Respond(Response),
    /// Make `ops` durable, then answer. With `separate`, a CON request gets an empty ACK at once
    /// and the response later as its own CON (Alibaba `ackMode` 1).
    Persist { ops: SmallVec<[Op; 3]>, response: Response, separate: bool, undo: Option<Undo> },
}

impl Outcome {
    pub fn code(code: Code) -> Outcome {
        Outcome::Respond(Response::new(code))
    }
}

/// A dialect: the resources served on one listener.
pub trait Resources {
    fn handle(&self, req: &Request<'_, '_>) -> Outcome;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_option_is_decimal() {
        let r = Response { with_message_id: true, ..Response::new(Code::CHANGED) };
        let bytes = r.encode(MessageType::Ack, 9, &[1], Some(MessageId(1234567)));
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.option(OptionNumber::ALI_MESSAGE_ID), Some(&b"1234567"[..]));
        let mut buf = itoa_buf();
        assert_eq!(format_u64(&mut buf, 0), b"0");
        assert_eq!(format_u64(&mut buf, u64::MAX), u64::MAX.to_string().as_bytes());
    }
}

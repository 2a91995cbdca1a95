//! What a dialect's resource handlers see (a validated request) and decide (an outcome). The
//! endpoint owns the CoAP mechanics around them: message types, ids, dedup, separate responses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use super::message::{Code, Message, MessageBuilder, MessageType};
use super::option::OptionNumber;
use crate::clock::Now;
use crate::identity::DeviceId;

pub struct Request<'r, 'a> {
    pub msg: &'r Message<'a>,
    pub peer: SocketAddr,
    /// The device the transport authenticated: a DTLS session keyed with its PSK.
    pub authenticated: Option<DeviceId>,
    pub now: Now,
    /// Uri-Path segments (UTF-8, checked by the endpoint).
    pub path: SmallVec<[&'a str; 8]>,
    /// What the handler found out, for the device's trace.
    pub note: &'r super::trace::Note,
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
    /// Where what the request created lives (an LwM2M registration's `rd/<ep>`).
    pub location_path: Vec<String>,
    pub content_format: Option<u32>,
    pub max_age: Option<u32>,
    /// A block of a representation sent block-wise (RFC 7959), and the whole one's size.
    pub block2: Option<crate::coap::block::Block>,
    pub size2: Option<u32>,
    pub size1: Option<u32>,
    pub payload: Vec<u8>,
    /// Carry the stored message's id in option 2090 once the write has it.
    pub with_message_id: bool,
    /// The code and payload, known once the writes are.
    pub later: Option<Later>,
}

/// A response whose code and payload depend on how its writes came out (a shadow update the
/// store's writer applied to the document as it found it).
#[derive(Clone)]
pub struct Later(pub Arc<dyn Fn() -> (Code, Vec<u8>) + Send + Sync>);

impl std::fmt::Debug for Later {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Later(..)")
    }
}

impl PartialEq for Later {
    fn eq(&self, other: &Later) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Later {}

impl Response {
    pub fn new(code: Code) -> Response {
        Response {
            code,
            location_path: Vec::new(),
            content_format: None,
            max_age: None,
            block2: None,
            size2: None,
            size1: None,
            payload: Vec::new(),
            with_message_id: false,
            later: None,
        }
    }

    /// The response once its writes are durable: a [`Later`] one takes its code and payload.
    pub fn settled(self) -> Response {
        match &self.later {
            Some(Later(f)) => {
                let (code, payload) = f();
                Response { code, payload, later: None, ..self }
            }
            None => self,
        }
    }

    pub fn with_payload(code: Code, content_format: u32, payload: Vec<u8>) -> Response {
        Response { content_format: Some(content_format), payload, ..Response::new(code) }
    }

    /// The response as a message; `stored` is the id the write gave the stored message.
    pub fn encode(&self, mtype: MessageType, mid: u16, token: &[u8], stored: Option<StoredId>) -> Vec<u8> {
        let mut b = MessageBuilder::new(mtype, self.code, mid, token);
        for segment in &self.location_path {
            b = b.option(OptionNumber::LOCATION_PATH, segment.as_bytes());
        }
        if let Some(cf) = self.content_format {
            b = b.uint_option(OptionNumber::CONTENT_FORMAT, cf);
        }
        if let Some(age) = self.max_age {
            b = b.uint_option(OptionNumber::MAX_AGE, age);
        }
        if let Some(block) = self.block2 {
            b = b.uint_option(OptionNumber::BLOCK2, block.value());
        }
        if let Some(size) = self.size2 {
            b = b.uint_option(OptionNumber::SIZE2, size);
        }
        if let Some(size) = self.size1 {
            b = b.uint_option(OptionNumber::SIZE1, size);
        }
        let mut id_buf = itoa_buf();
        if let (true, Some(id)) = (self.with_message_id, stored) {
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

/// The id a durable write gave the message it stored (Alibaba option 2090).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredId(pub u64);

/// Why a write a message waited for did not happen: nothing was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteFailed {
    /// Set when a retry may well succeed soon (a full disk, a stall): the answer is 5.03 with
    /// this Max-Age; otherwise 5.00.
    pub retry_after_s: Option<u32>,
}

/// How a write a message waited for ended.
pub type Written = Result<Option<StoredId>, WriteFailed>;

/// Undoes an in-memory reservation when the write that would have made it permanent fails.
pub type Undo = Box<dyn FnOnce() + Send>;

/// Names a CON the server sent, so the dialect hears how it ended ([`Resources::handle_reply`]).
/// Opaque: only [`ExchangeKeys`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExchangeKey(u64);

/// Hands out exchange keys, each once.
pub struct ExchangeKeys(std::sync::atomic::AtomicU64);

impl Default for ExchangeKeys {
    fn default() -> ExchangeKeys {
        ExchangeKeys(std::sync::atomic::AtomicU64::new(1))
    }
}

/// Any key, for unit tests that name exchanges themselves.
#[cfg(test)]
impl From<u64> for ExchangeKey {
    fn from(n: u64) -> ExchangeKey {
        ExchangeKey(n)
    }
}

impl ExchangeKeys {
    pub fn next(&self) -> ExchangeKey {
        ExchangeKey(self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// How a server-originated CON is retransmitted: RFC 7252 §4.2 with NB-IoT timers (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retransmit {
    pub ack_timeout: Duration,
    pub max_retransmit: u32,
    /// The exchange ends unanswered this long after the first transmission at the latest, even
    /// if retransmissions remain (a command is TIMEOUT after 180 s, SPEC §5).
    pub give_up_after: Duration,
}

impl Retransmit {
    /// Sent once: no retransmission, the exchange ends after the first timeout.
    pub fn once(self) -> Retransmit {
        Retransmit { max_retransmit: 0, give_up_after: self.ack_timeout, ..self }
    }

    /// Back-off until the last retransmission's timeout ends (RFC 7252 MAX_TRANSMIT_WAIT, without
    /// the random factor).
    pub fn exhausting(ack_timeout: Duration, max_retransmit: u32) -> Retransmit {
        let give_up_after = ack_timeout * ((1u32 << (max_retransmit + 1).min(31)) - 1);
        Retransmit { ack_timeout, max_retransmit, give_up_after }
    }
}

/// A CON request the server sends on its own (Huawei `GET /t/d`, `POST /t/d`). `message` is
/// complete but for its message id, which the endpoint assigns.
pub struct Outgoing {
    pub peer: SocketAddr,
    pub message: Vec<u8>,
    pub retransmit: Retransmit,
    pub exchange: ExchangeKey,
}

/// How a peer answered a CON the server sent.
pub enum Reply<'m, 'a> {
    /// An ACK: Empty (code 0.00), or carrying a piggybacked response.
    Ack(&'m Message<'a>),
    Reset,
    /// Every retransmission went unanswered.
    TimedOut,
    /// Never sent: the write it waited for failed.
    Unsent,
}

/// What a dialect asks of the endpoint besides answering the message at hand.
pub struct Effects<W> {
    pub outgoing: Vec<Outgoing>,
    /// Writes nobody waits for (state the call changed), queued in the order they are added.
    pub writes: Vec<W>,
}

impl<W> Default for Effects<W> {
    fn default() -> Effects<W> {
        Effects { outgoing: Vec::new(), writes: Vec::new() }
    }
}

/// Make `writes` durable, then answer.
pub struct Persist<W> {
    pub writes: W,
    pub response: Response,
    /// A CON request gets an empty ACK at once and the response later as its own CON (Alibaba
    /// `ackMode` 1, `/pull`).
    pub separate: bool,
    pub undo: Option<Undo>,
    /// Report the separate response's ACK (or its loss) under this key; the response then goes
    /// out as a CON even to a NON request (RFC 7252 §5.2.3 allows it).
    pub receipt: Option<ExchangeKey>,
    /// Sent once the response is (Huawei: `GET /t/d` after the bind's 2.04).
    pub follow_up: Option<Outgoing>,
}

impl<W> Persist<W> {
    pub fn new(writes: W, response: Response) -> Persist<W> {
        Persist { writes, response, separate: false, undo: None, receipt: None, follow_up: None }
    }
}

#[allow(clippy::large_enum_variant)] // built once per request and consumed at once; boxing would add an allocation
pub enum Outcome<W> {
    /// Answer at once.
    Respond(Response),
    Persist(Persist<W>),
}

impl<W> Outcome<W> {
    pub fn code(code: Code) -> Outcome<W> {
        Outcome::Respond(Response::new(code))
    }
}

impl<W> From<Persist<W>> for Outcome<W> {
    fn from(p: Persist<W>) -> Outcome<W> {
        Outcome::Persist(p)
    }
}

#[allow(clippy::large_enum_variant)] // like Outcome: built once per notification and consumed at once
/// What becomes of a notification (a CON or NON carrying a response code: a Huawei uplink).
pub enum Notified<W> {
    /// Make `writes` durable, then acknowledge a CON with an Empty ACK (a NON gets nothing) and
    /// send `follow_up` (an answer that must not go out before what it answers is stored).
    Store { writes: W, undo: Option<Undo>, follow_up: Option<Outgoing> },
    /// Acknowledged without storing anything.
    Acknowledge,
    /// Nobody asked for it (unknown token): RST, so the peer stops sending it (RFC 7641 §3.6).
    Reject,
    /// Said nothing, e.g. over the device's flow-control budget: a CON will be retransmitted.
    Drop,
}

/// A dialect: the resources served on one listener, and the client side of the exchanges it
/// starts itself.
pub trait Resources {
    /// What a request asks to be made durable before it is answered; the endpoint hands it to
    /// the shell and answers once told it is written.
    type Writes;

    fn handle(&mut self, req: &Request<'_, '_>, effects: &mut Effects<Self::Writes>) -> Outcome<Self::Writes>;

    /// A response that arrived in a CON or NON of its own, matching none of our exchanges.
    fn handle_notification(
        &mut self,
        _msg: &Request<'_, '_>,
        _effects: &mut Effects<Self::Writes>,
    ) -> Notified<Self::Writes> {
        Notified::Reject
    }

    /// How an exchange begun with [`Outgoing`] or a [`Persist::receipt`] ended.
    fn handle_reply(
        &mut self,
        _now: Now,
        _exchange: ExchangeKey,
        _reply: Reply<'_, '_>,
        _effects: &mut Effects<Self::Writes>,
    ) {
    }

    /// Someone else (the admin API) has something for `device`, last heard on this endpoint.
    fn handle_kick(&mut self, _now: Now, _device: DeviceId, _effects: &mut Effects<Self::Writes>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_option_is_decimal() {
        let r = Response { with_message_id: true, ..Response::new(Code::CHANGED) };
        let bytes = r.encode(MessageType::Ack, 9, &[1], Some(StoredId(1234567)));
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.option(OptionNumber::ALI_MESSAGE_ID), Some(&b"1234567"[..]));
        let mut buf = itoa_buf();
        assert_eq!(format_u64(&mut buf, 0), b"0");
        assert_eq!(format_u64(&mut buf, u64::MAX), u64::MAX.to_string().as_bytes());
    }
}

//! Message tracing per device (seed 003 §6.1): for a bounded time an operator sees every CoAP
//! message exchanged with one device, in and out, with what became of each request.
//!
//! The endpoints record what they hear from and send to a traced device's addresses, after
//! the resources handled it, so the device is known by then: from the request naming it (a bind,
//! a refusal), the DTLS identity, or the address its last accepted contact came from (which
//! [`Tracer::seen`] moves). What is sent to an address a traced message came from is its answer.
//! Nothing is traced by default, and the cost then is an atomic load or two per datagram. A trace
//! holds at most [`MAX_ENTRIES`] messages of at most [`MAX_DATAGRAM`] bytes each, in memory
//! only: a diagnosis tool, not a record (a restart ends every trace).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use smallvec::SmallVec;

use super::message::{Code, Header, Message, MessageType};
use super::option::OptionNumber;
use crate::clock::{Now, UnixMs};
use crate::identity::DeviceId;

/// Devices traced at once.
pub const MAX_TRACED: usize = 32;
/// Messages kept per trace; older ones are dropped (and counted).
pub const MAX_ENTRIES: usize = 500;
/// Bytes kept of each message: a whole datagram at the default payload limit.
pub const MAX_DATAGRAM: usize = 1536;
/// The longest a trace may run.
pub const MAX_DURATION_S: u64 = 86_400;
/// Addresses remembered per traced device (a NAT may move it while traced).
const MAX_PEERS: usize = 4;
/// Addresses remembered for answers to traced messages from elsewhere, and for how long: the
/// answer to a request waits for its write, and an observe request follows a bind's answer.
const MAX_ANSWERING: usize = 256;
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
}

/// One message as it was on the wire (inside DTLS: the plaintext record).
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub at: UnixMs,
    pub direction: Direction,
    pub port: &'static str,
    pub peer: SocketAddr,
    /// A DTLS session whose PSK identity is the device carried it.
    pub authenticated: bool,
    /// Its first [`MAX_DATAGRAM`] bytes.
    pub datagram: Box<[u8]>,
    pub size: usize,
    /// What became of a message heard: a refusal's reason, `duplicate`, `malformed`.
    pub outcome: Option<&'static str>,
    /// The entry this one answers: the request of a response, the CON of an ACK or RST.
    pub answers: Option<u64>,
    /// Time since the entry it answers.
    pub elapsed: Option<Duration>,
    /// When it was recorded on the monotonic clock, for `elapsed`.
    instant: std::time::Instant,
}

/// A running trace.
#[derive(Debug, Clone)]
pub struct Trace {
    pub started: UnixMs,
    pub until: UnixMs,
    /// Entries dropped because the trace was full.
    pub dropped: u64,
    pub entries: VecDeque<Entry>,
    next_seq: u64,
    peers: SmallVec<[SocketAddr; MAX_PEERS]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{MAX_TRACED} devices are traced already; stop one first")]
pub struct TooMany;

#[derive(Default)]
struct Traces {
    by_device: HashMap<DeviceId, Trace>,
    by_peer: HashMap<SocketAddr, DeviceId>,
    /// Addresses a traced device's message came from that are not (yet) where it is served
    /// (a bind, a refusal, a DTLS session's first record): what is sent there next answers it.
    answering: HashMap<SocketAddr, (DeviceId, std::time::Instant)>,
}

impl Traces {
    fn remember(&mut self, device: DeviceId, peer: SocketAddr) {
        let Some(trace) = self.by_device.get_mut(&device) else { return };
        if trace.peers.contains(&peer) {
            return;
        }
        if trace.peers.len() == MAX_PEERS {
            let old = trace.peers.remove(0);
            self.by_peer.remove(&old);
        }
        trace.peers.push(peer);
        self.answering.remove(&peer);
        if let Some(previous) = self.by_peer.insert(peer, device)
            && previous != device
            && let Some(t) = self.by_device.get_mut(&previous)
        {
            // The address changed hands (another device behind the same NAT port now).
            t.peers.retain(|p| *p != peer);
        }
    }

    fn remove(&mut self, device: DeviceId) -> Option<Trace> {
        let trace = self.by_device.remove(&device)?;
        self.answering.retain(|_, (d, _)| *d != device);
        for p in &trace.peers {
            if self.by_peer.get(p) == Some(&device) {
                self.by_peer.remove(p);
            }
        }
        Some(trace)
    }
}

/// Every running trace.
#[derive(Default)]
pub struct Tracer {
    /// How many devices are traced: read on every datagram, so without the lock.
    traced: AtomicUsize,
    traces: Mutex<Traces>,
}

/// What the resources found out about a request while handling it, for its trace.
#[derive(Debug, Default)]
pub struct Note {
    outcome: std::cell::Cell<Option<&'static str>>,
    device: std::cell::Cell<Option<DeviceId>>,
}

impl Note {
    /// The request was refused for `reason`; `device` if it named one.
    pub fn refused(&self, reason: &'static str, device: Option<DeviceId>) {
        self.outcome.set(Some(reason));
        if device.is_some() {
            self.device.set(device);
        }
    }

    /// The request names `device` (it has proven nothing yet).
    pub fn named(&self, device: DeviceId) {
        self.device.set(Some(device));
    }
}

/// A message heard, as the endpoint hands it to [`Tracer::heard`].
pub struct Heard<'a> {
    pub now: Now,
    pub port: &'static str,
    pub peer: SocketAddr,
    pub authenticated: Option<DeviceId>,
    pub datagram: &'a [u8],
    pub note: &'a Note,
}

impl Tracer {
    /// Whether any device is traced.
    pub fn active(&self) -> bool {
        self.traced.load(Ordering::Relaxed) > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Traces> {
        self.traces.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Traces `device` until `now + duration` (a running trace keeps its messages and takes the
    /// new end); `peer` is where it was last heard from.
    pub fn start(
        &self,
        device: DeviceId,
        peer: Option<SocketAddr>,
        now: UnixMs,
        duration: Duration,
    ) -> Result<Trace, TooMany> {
        let mut t = self.lock();
        let until = UnixMs(now.0 + duration.as_millis() as u64);
        if t.by_device.get(&device).is_some_and(|tr| tr.until <= now) {
            // Over, but not swept yet: a new trace, not a longer one.
            t.remove(device);
        }
        if let Some(trace) = t.by_device.get_mut(&device) {
            trace.until = until;
        } else {
            if t.by_device.len() >= MAX_TRACED {
                return Err(TooMany);
            }
            let trace = Trace {
                started: now,
                until,
                dropped: 0,
                entries: VecDeque::new(),
                next_seq: 1,
                peers: SmallVec::new(),
            };
            t.by_device.insert(device, trace);
            self.traced.store(t.by_device.len(), Ordering::Relaxed);
        }
        if let Some(peer) = peer {
            t.remember(device, peer);
        }
        Ok(t.by_device[&device].clone())
    }

    /// Ends `device`'s trace; false if it had none.
    pub fn stop(&self, device: DeviceId) -> bool {
        let mut t = self.lock();
        let removed = t.remove(device).is_some();
        self.traced.store(t.by_device.len(), Ordering::Relaxed);
        removed
    }

    /// Ends the traces whose time is up; how many.
    pub fn expire(&self, now: UnixMs) -> usize {
        if !self.active() {
            return 0;
        }
        let mut t = self.lock();
        let over: Vec<DeviceId> = t.by_device.iter().filter(|(_, tr)| tr.until <= now).map(|(d, _)| *d).collect();
        for d in &over {
            t.remove(*d);
        }
        self.traced.store(t.by_device.len(), Ordering::Relaxed);
        over.len()
    }

    /// `device`'s trace with only the entries after `after`, if it is traced.
    pub fn read(&self, device: DeviceId, after: u64, now: UnixMs) -> Option<Trace> {
        let t = self.lock();
        let tr = t.by_device.get(&device).filter(|tr| tr.until > now)?;
        Some(Trace {
            started: tr.started,
            until: tr.until,
            dropped: tr.dropped,
            entries: tr.entries.iter().filter(|e| e.seq > after).cloned().collect(),
            next_seq: tr.next_seq,
            peers: tr.peers.clone(),
        })
    }

    /// `device` was heard from `peer`, and answers go there now.
    pub fn seen(&self, device: DeviceId, peer: SocketAddr) {
        if !self.active() {
            return;
        }
        let mut t = self.lock();
        if t.by_device.contains_key(&device) {
            t.remember(device, peer);
        } else if let Some(previous) = t.by_peer.get(&peer).copied() {
            // Another device answers from a traced one's old address now (a NAT reused the port).
            t.by_peer.remove(&peer);
            if let Some(trace) = t.by_device.get_mut(&previous) {
                trace.peers.retain(|p| *p != peer);
            }
        }
    }

    /// A message heard, once handled.
    pub fn heard(&self, h: Heard<'_>) {
        let mut t = self.lock();
        let named = h.note.device.get().or(h.authenticated);
        let device = match named {
            // Named by the request or its session: that device's, traced or not.
            Some(d) if t.by_device.contains_key(&d) => d,
            Some(_) => return,
            None => match t.by_peer.get(&h.peer) {
                Some(d) => *d,
                None => return,
            },
        };
        let authenticated = h.authenticated == Some(device);
        let outcome = h.note.outcome.get();
        if !t.by_peer.contains_key(&h.peer) {
            let until = h.now.instant + ANSWER_WITHIN;
            if t.answering.len() >= MAX_ANSWERING {
                t.answering.retain(|_, (_, until)| *until > h.now.instant);
            }
            if t.answering.len() < MAX_ANSWERING {
                t.answering.insert(h.peer, (device, until));
            }
        }
        push(&mut t, device, h.now, Direction::In, h.port, h.peer, authenticated, h.datagram, outcome);
    }

    /// A message sent to `peer`.
    pub fn sent(&self, now: Now, port: &'static str, peer: SocketAddr, datagram: &[u8]) {
        let mut t = self.lock();
        let answering = t.answering.get(&peer).filter(|(_, until)| *until > now.instant).map(|(d, _)| d);
        if let Some(device) = t.by_peer.get(&peer).or(answering).copied() {
            push(&mut t, device, now, Direction::Out, port, peer, false, datagram, None);
        }
    }
}

#[allow(clippy::too_many_arguments)] // the fields of one entry
fn push(
    t: &mut Traces,
    device: DeviceId,
    now: Now,
    direction: Direction,
    port: &'static str,
    peer: SocketAddr,
    authenticated: bool,
    datagram: &[u8],
    outcome: Option<&'static str>,
) {
    let Some(trace) = t.by_device.get_mut(&device) else { return };
    if trace.until <= now.wall {
        return;
    }
    let answered = Header::peek(datagram).and_then(|h| answered(trace, direction, h, datagram));
    let seq = trace.next_seq;
    trace.next_seq += 1;
    if trace.entries.len() == MAX_ENTRIES {
        trace.entries.pop_front();
        trace.dropped += 1;
    }
    trace.entries.push_back(Entry {
        seq,
        at: now.wall,
        direction,
        port,
        peer,
        authenticated,
        datagram: datagram[..datagram.len().min(MAX_DATAGRAM)].into(),
        size: datagram.len(),
        outcome,
        answers: answered.map(|(seq, _)| seq),
        elapsed: answered.map(|(_, at)| now.instant.saturating_duration_since(at)),
        instant: now.instant,
    });
}

/// The latest entry the other way that a message with header `h` answers: the CON of an ACK or
/// RST (by message id), the request of a response (by token).
fn answered(trace: &Trace, direction: Direction, h: Header, datagram: &[u8]) -> Option<(u64, std::time::Instant)> {
    let token = token(datagram);
    trace
        .entries
        .iter()
        .rev()
        .filter(|e| e.direction != direction)
        .find(|e| {
            let Some(theirs) = Header::peek(&e.datagram) else { return false };
            match h.mtype {
                MessageType::Ack | MessageType::Rst => theirs.mtype == MessageType::Con && theirs.mid == h.mid,
                _ => h.code.is_response() && theirs.code.is_request() && token == self::token(&e.datagram),
            }
        })
        .map(|e| (e.seq, e.instant))
}

fn token(datagram: &[u8]) -> &[u8] {
    let tkl = datagram.first().map_or(0, |b| (b & 0x0f) as usize);
    datagram.get(4..4 + tkl).unwrap_or(&[])
}

/// An entry's message decoded for people.
#[derive(Debug, serde::Serialize)]
pub struct Decoded {
    #[serde(rename = "type")]
    pub mtype: &'static str,
    pub code: String,
    pub code_name: &'static str,
    pub message_id: u16,
    pub token_hex: String,
    pub options: Vec<DecodedOption>,
    pub payload: Vec<u8>,
    /// Why the rest could not be read (the header still is, when it is there).
    pub malformed: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct DecodedOption {
    pub number: u16,
    pub name: &'static str,
    pub value: String,
}

impl Entry {
    pub fn decode(&self) -> Decoded {
        let header = Header::peek(&self.datagram);
        let mut d = Decoded {
            mtype: header.map_or("?", |h| type_name(h.mtype)),
            code: header.map_or_else(String::new, |h| h.code.to_string()),
            code_name: header.map_or("", |h| code_name(h.code)),
            message_id: header.map_or(0, |h| h.mid),
            token_hex: hex::encode(token(&self.datagram)),
            options: Vec::new(),
            payload: Vec::new(),
            malformed: None,
        };
        match Message::parse(&self.datagram) {
            Ok(m) => {
                d.options = m.options.iter().map(|(n, v)| describe(*n, v)).collect();
                d.payload = m.payload.to_vec();
            }
            Err(e) if self.size > self.datagram.len() => {
                d.malformed = Some(format!("cut at {MAX_DATAGRAM} bytes: {e}"))
            }
            Err(e) => d.malformed = Some(e.to_string()),
        }
        d
    }
}

fn type_name(t: MessageType) -> &'static str {
    match t {
        MessageType::Con => "CON",
        MessageType::Non => "NON",
        MessageType::Ack => "ACK",
        MessageType::Rst => "RST",
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::EMPTY => "Empty",
        Code::GET => "GET",
        Code::POST => "POST",
        Code::PUT => "PUT",
        Code::DELETE => "DELETE",
        Code::CREATED => "Created",
        Code::DELETED => "Deleted",
        Code::CHANGED => "Changed",
        Code::CONTENT => "Content",
        Code::BAD_REQUEST => "Bad Request",
        Code::UNAUTHORIZED => "Unauthorized",
        Code::BAD_OPTION => "Bad Option",
        Code::FORBIDDEN => "Forbidden",
        Code::NOT_FOUND => "Not Found",
        Code::METHOD_NOT_ALLOWED => "Method Not Allowed",
        Code::NOT_ACCEPTABLE => "Not Acceptable",
        Code::CONFLICT => "Conflict",
        Code::REQUEST_ENTITY_TOO_LARGE => "Request Entity Too Large",
        Code::UNSUPPORTED_CONTENT_FORMAT => "Unsupported Content-Format",
        Code::TOO_MANY_REQUESTS => "Too Many Requests",
        Code::INTERNAL_SERVER_ERROR => "Internal Server Error",
        Code::SERVICE_UNAVAILABLE => "Service Unavailable",
        Code::PROXYING_NOT_SUPPORTED => "Proxying Not Supported",
        _ => "",
    }
}

/// An option's name and its value as text: numbers for the integer options, text when it is
/// printable, else hex.
fn describe(n: OptionNumber, value: &[u8]) -> DecodedOption {
    let (name, integer) = match n {
        OptionNumber::IF_MATCH => ("If-Match", false),
        OptionNumber::URI_HOST => ("Uri-Host", false),
        OptionNumber::ETAG => ("ETag", false),
        OptionNumber::IF_NONE_MATCH => ("If-None-Match", false),
        OptionNumber::OBSERVE => ("Observe", true),
        OptionNumber::URI_PORT => ("Uri-Port", true),
        OptionNumber::LOCATION_PATH => ("Location-Path", false),
        OptionNumber::URI_PATH => ("Uri-Path", false),
        OptionNumber::CONTENT_FORMAT => ("Content-Format", true),
        OptionNumber::MAX_AGE => ("Max-Age", true),
        OptionNumber::URI_QUERY => ("Uri-Query", false),
        OptionNumber::ACCEPT => ("Accept", true),
        OptionNumber::BLOCK2 => ("Block2", true),
        OptionNumber::BLOCK1 => ("Block1", true),
        OptionNumber::SIZE2 => ("Size2", true),
        OptionNumber::PROXY_URI => ("Proxy-Uri", false),
        OptionNumber::PROXY_SCHEME => ("Proxy-Scheme", false),
        OptionNumber::SIZE1 => ("Size1", true),
        OptionNumber::ALI_TOKEN_61 | OptionNumber::ALI_TOKEN => ("Auth-Token", false),
        OptionNumber::NO_RESPONSE => ("No-Response", true),
        OptionNumber::ALI_SEQ => ("Seq", false),
        OptionNumber::ALI_MESSAGE_ID => ("Message-Id", true),
        _ => ("", false),
    };
    let value = if integer && value.len() <= 4 {
        value.iter().fold(0u32, |acc, b| acc << 8 | *b as u32).to_string()
    } else if !value.is_empty() && value.iter().all(|b| (0x20..0x7f).contains(b)) {
        String::from_utf8_lossy(value).into_owned()
    } else {
        format!("0x{}", hex::encode(value))
    };
    DecodedOption { number: n.0, name, value }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::coap::message::{MessageBuilder, empty};

    fn at(start: Instant, ms: u64) -> Now {
        Now { instant: start + Duration::from_millis(ms), wall: UnixMs(1_000_000 + ms) }
    }

    fn heard<'a>(now: Now, peer: SocketAddr, datagram: &'a [u8], note: &'a Note) -> Heard<'a> {
        Heard { now, port: "coap", peer, authenticated: None, datagram, note }
    }

    #[test]
    fn a_trace_keeps_the_devices_exchanges_paired_and_bounded_then_ends() {
        let tracer = Tracer::default();
        assert!(!tracer.active());
        let (dev, other) = (DeviceId(7), DeviceId(8));
        let (home, moved): (SocketAddr, SocketAddr) =
            ("10.0.0.1:5683".parse().unwrap(), "10.0.0.9:4000".parse().unwrap());
        let start = Instant::now();
        tracer.start(dev, Some(home), UnixMs(1_000_000), Duration::from_secs(60)).unwrap();
        assert!(tracer.active());

        let request = MessageBuilder::new(MessageType::Con, Code::POST, 0x1234, &[1, 2])
            .option(OptionNumber::URI_PATH, b"t")
            .option(OptionNumber::URI_PATH, b"d")
            .payload(b"hello")
            .build();
        tracer.heard(heard(at(start, 0), home, &request, &Note::default()));
        let ack = MessageBuilder::new(MessageType::Ack, Code::CHANGED, 0x1234, &[1, 2]).build();
        tracer.sent(at(start, 40), "coap", home, &ack);
        // Another device's traffic, and a stranger's, are not kept.
        tracer.heard(heard(at(start, 41), "10.0.0.2:1".parse().unwrap(), &request, &Note::default()));
        // A refusal naming the device is kept from any address, with its reason.
        let note = Note::default();
        note.refused("replayed_seq", Some(dev));
        tracer.heard(heard(at(start, 50), moved, &request, &note));
        // An accepted contact from a new address moves the answers there.
        tracer.seen(dev, moved);
        tracer.sent(at(start, 60), "coap", moved, &empty(MessageType::Ack, 0x1234));

        let t = tracer.read(dev, 0, UnixMs(1_000_100)).unwrap();
        let e: Vec<_> = t.entries.iter().collect();
        assert_eq!(e.len(), 4);
        // Another device accepted from the traced one's old address: its traffic is its own, and
        // a request its session names is not the traced device's.
        tracer.seen(other, home);
        tracer.sent(at(start, 61), "coap", home, &ack);
        tracer.heard(Heard { authenticated: Some(other), ..heard(at(start, 62), moved, &request, &Note::default()) });
        assert_eq!(tracer.read(dev, 0, UnixMs(1_000_100)).unwrap().entries.len(), 4);
        assert_eq!((e[0].seq, e[0].direction, e[0].outcome), (1, Direction::In, None));
        let d = e[0].decode();
        assert_eq!((d.mtype, d.code.as_str(), d.code_name, d.message_id), ("CON", "0.02", "POST", 0x1234));
        assert_eq!(d.token_hex, "0102");
        assert_eq!(d.options.iter().map(|o| o.value.as_str()).collect::<Vec<_>>(), ["t", "d"]);
        assert_eq!(d.payload, b"hello");
        assert_eq!((e[1].answers, e[1].elapsed), (Some(1), Some(Duration::from_millis(40))));
        assert_eq!(e[1].decode().code_name, "Changed");
        assert_eq!((e[2].peer, e[2].outcome), (moved, Some("replayed_seq")));
        assert_eq!((e[3].peer, e[3].answers), (moved, Some(3)));
        assert_eq!(tracer.read(dev, 3, UnixMs(1_000_100)).unwrap().entries.len(), 1, "after a seq");
        assert!(tracer.read(other, 0, UnixMs(1_000_100)).is_none());

        for i in 0..MAX_ENTRIES as u64 {
            tracer.sent(at(start, 100 + i), "coap", moved, &ack);
        }
        let t = tracer.read(dev, 0, UnixMs(1_000_100)).unwrap();
        assert_eq!((t.entries.len(), t.dropped, t.entries[0].seq), (MAX_ENTRIES, 4, 5));

        assert_eq!(tracer.expire(UnixMs(1_059_999)), 0);
        assert_eq!(tracer.expire(UnixMs(1_060_000)), 1);
        assert!(!tracer.active());
        assert!(tracer.read(dev, 0, UnixMs(1_060_000)).is_none());
        tracer.sent(at(start, 70_000), "coap", moved, &ack);
        assert!(!tracer.stop(dev));
    }

    #[test]
    fn traces_are_bounded_in_number_and_malformed_messages_are_shown_as_such() {
        let tracer = Tracer::default();
        for d in 0..MAX_TRACED as u64 {
            tracer.start(DeviceId(d), None, UnixMs(0), Duration::from_secs(10)).unwrap();
        }
        assert_eq!(tracer.start(DeviceId(999), None, UnixMs(0), Duration::from_secs(10)).unwrap_err(), TooMany);
        // Starting again extends, and is no new trace.
        let t = tracer.start(DeviceId(0), None, UnixMs(5), Duration::from_secs(100)).unwrap();
        assert_eq!((t.started, t.until), (UnixMs(0), UnixMs(100_005)));
        assert!(tracer.stop(DeviceId(1)));
        tracer.start(DeviceId(999), None, UnixMs(1_000_000), Duration::from_secs(10)).unwrap();

        let peer: SocketAddr = "10.0.0.3:9".parse().unwrap();
        tracer.seen(DeviceId(999), peer);
        let note = Note::default();
        note.refused("malformed", None);
        tracer.heard(heard(at(Instant::now(), 0), peer, &[0x44, 0x01, 0, 1, 0xaa], &note));
        let e = &tracer.read(DeviceId(999), 0, UnixMs(1_000_001)).unwrap().entries[0];
        let d = e.decode();
        assert_eq!((d.mtype, d.code_name, e.outcome), ("CON", "GET", Some("malformed")));
        assert!(d.malformed.is_some());
    }
}

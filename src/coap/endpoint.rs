//! The CoAP server endpoint of one socket, free of I/O and clocks (quinn-proto style): the shell
//! feeds it datagrams, durable-write completions and timeouts, and carries out the [`Actions`] it
//! returns. It owns the message layer (types, ids, dedup, RST/4.02 rules, separate responses);
//! the CONs it sends are kept by its [`Reliability`] layer, the messages waiting for a write by
//! [`Pending`]; what a request means is up to the [`Resources`] it serves.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use smallvec::SmallVec;

use super::dedup::{DedupCache, Duplicate, Seen};
use super::message::{Code, FormatError, Header, Message, MessageType, empty};
use super::option::OptionNumber;
use super::pending::{Answer, Pending, Ticket, Waiting};
use super::reliability::{Due, Reliability};
use super::resource::{
    Effects, ExchangeKey, Notified, Outcome, Outgoing, Persist, Reply, Request, Resources, Response, Retransmit,
    Written,
};
use super::trace::{Heard, Note, Tracer};
use crate::clock::Now;
use crate::identity::DeviceId;

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Largest request payload on the wire.
    pub max_payload: usize,
    /// The payload limit announced in Size1 with 4.13.
    pub announced_max_payload: usize,
    pub dedup_capacity: usize,
    pub exchange_lifetime: Duration,
    pub ack_timeout: Duration,
    pub max_retransmit: u32,
    pub max_pending_writes: usize,
    /// Most CONs of our own (separate responses, commands, observe and PCP requests) awaiting an
    /// ACK at once.
    pub max_outgoing: usize,
}

pub struct Transmit {
    pub peer: SocketAddr,
    pub data: Bytes,
}

/// What the shell must do after a call into the endpoint; `W` is what the resources ask to be
/// written.
pub struct Actions<W> {
    pub transmits: Vec<Transmit>,
    /// Writes to commit, in order: report each with a ticket back with
    /// [`Endpoint::handle_committed`]; the others nobody waits for.
    pub writes: Vec<(Option<Ticket>, W)>,
}

impl<W> Default for Actions<W> {
    fn default() -> Actions<W> {
        Actions { transmits: Vec::new(), writes: Vec::new() }
    }
}

/// Counters the shell exports as metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct EndpointStats {
    pub malformed: u64,
    pub duplicates: u64,
    pub retransmissions: u64,
    pub con_timeouts: u64,
    pub pending_full: u64,
    /// CONs not sent because `max_outgoing` were already awaiting an ACK.
    pub outgoing_full: u64,
}

pub struct Endpoint<R: Resources> {
    resources: R,
    config: EndpointConfig,
    dedup: DedupCache,
    pending: Pending,
    reliability: Reliability,
    next_mid: u16,
    stats: EndpointStats,
    /// Scratch space the resources fill; applied after each call into them.
    effects: Effects<R::Writes>,
    /// Where traced devices' messages go, and the port's name in them.
    tap: Option<(std::sync::Arc<Tracer>, &'static str)>,
}

impl<R: Resources> Endpoint<R> {
    pub fn new(resources: R, config: EndpointConfig) -> Endpoint<R> {
        Endpoint {
            dedup: DedupCache::new(config.dedup_capacity, config.exchange_lifetime),
            resources,
            pending: Pending::default(),
            reliability: Reliability::new(config.max_outgoing),
            config,
            next_mid: rand::random(),
            stats: EndpointStats::default(),
            effects: Effects::default(),
            tap: None,
        }
    }

    /// Records traced devices' messages in `tracer`, naming this endpoint's port `port`.
    pub fn traced(self, tracer: std::sync::Arc<Tracer>, port: &'static str) -> Endpoint<R> {
        Endpoint { tap: Some((tracer, port)), ..self }
    }

    /// The tracer, while any device is traced.
    fn tracing(&self) -> Option<&(std::sync::Arc<Tracer>, &'static str)> {
        self.tap.as_ref().filter(|(tracer, _)| tracer.active())
    }

    /// Records the transmits from `from` on for the traced devices they go to.
    fn trace_sent(&self, now: Now, out: &Actions<R::Writes>, from: usize) {
        if let Some((tracer, port)) = self.tracing() {
            for t in &out.transmits[from..] {
                tracer.sent(now, port, t.peer, &t.data);
            }
        }
    }

    pub fn take_stats(&mut self) -> (EndpointStats, u64, usize) {
        (std::mem::take(&mut self.stats), self.dedup.take_evictions(), self.dedup.len())
    }

    /// CONs of our own awaiting an ACK.
    pub fn outgoing(&self) -> usize {
        self.reliability.len()
    }

    fn fresh_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// `authenticated` is the device the transport vouches for (a DTLS PSK session), if any.
    pub fn handle_datagram(
        &mut self,
        now: Now,
        peer: SocketAddr,
        authenticated: Option<DeviceId>,
        data: &[u8],
        out: &mut Actions<R::Writes>,
    ) {
        let from = out.transmits.len();
        let note = Note::default();
        self.dispatch(now, peer, authenticated, data, &note, out);
        // Once handled, so the device is known even when this is its first word from a new address.
        if let Some((tracer, port)) = self.tracing() {
            tracer.heard(Heard { now, port, peer, authenticated, datagram: data, note: &note });
            for t in &out.transmits[from..] {
                tracer.sent(now, port, t.peer, &t.data);
            }
        }
    }

    fn dispatch(
        &mut self,
        now: Now,
        peer: SocketAddr,
        authenticated: Option<DeviceId>,
        data: &[u8],
        note: &Note,
        out: &mut Actions<R::Writes>,
    ) {
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(e) => {
                note.refused("malformed", None);
                return self.reject_malformed(peer, data, e, out);
            }
        };
        let (head, m) = (Head { now, peer, authenticated, note }, &msg);
        match (msg.mtype, msg.code) {
            // Ping (RFC 7252 §4.3): an Empty CON is answered with RST.
            (MessageType::Con, Code::EMPTY) => send(out, peer, empty(MessageType::Rst, msg.mid)),
            (MessageType::Ack | MessageType::Rst, _) => self.handle_ack_or_reset(now, peer, m, out),
            (_, code) if code.is_request() => self.handle_request(head, m, data, out),
            (_, code) if code.is_response() => self.handle_notification(head, m, data, out),
            // Reserved classes.
            (MessageType::Con, _) => send(out, peer, empty(MessageType::Rst, msg.mid)),
            _ => {}
        }
    }

    /// The admin API has something for `device`, which this endpoint served last.
    pub fn handle_kick(&mut self, now: Now, device: DeviceId, out: &mut Actions<R::Writes>) {
        let from = out.transmits.len();
        self.resources.handle_kick(now, device, &mut self.effects);
        self.apply_effects(now, out);
        self.trace_sent(now, out, from);
    }

    /// Carries out what the resources asked for in their last call.
    fn apply_effects(&mut self, now: Now, out: &mut Actions<R::Writes>) {
        // A CON refused for lack of room is reported at once, and the report may start another
        // (the next command); a few rounds settle it, and more are never needed.
        for _ in 0..4 {
            out.writes.extend(self.effects.writes.drain(..).map(|w| (None, w)));
            let outgoing = std::mem::take(&mut self.effects.outgoing);
            if outgoing.is_empty() {
                return;
            }
            for o in outgoing {
                self.originate(now, o, out);
            }
        }
        out.writes.extend(self.effects.writes.drain(..).map(|w| (None, w)));
        self.effects.outgoing.clear();
    }

    /// Sends a CON of our own and keeps it for retransmission.
    fn originate(&mut self, now: Now, o: Outgoing, out: &mut Actions<R::Writes>) {
        let mut message = o.message;
        let mid = self.fresh_mid();
        if message.len() >= 4 {
            message[2..4].copy_from_slice(&mid.to_be_bytes());
        }
        self.send_con(now, o.peer, mid, Bytes::from(message), o.retransmit, Some(o.exchange), out);
    }

    #[allow(clippy::too_many_arguments)] // the parts of one CON, named rather than bundled
    fn send_con(
        &mut self,
        now: Now,
        peer: SocketAddr,
        mid: u16,
        data: Bytes,
        retransmit: Retransmit,
        exchange: Option<ExchangeKey>,
        out: &mut Actions<R::Writes>,
    ) {
        if self.reliability.keep(now.instant, peer, mid, data.clone(), retransmit, exchange).is_err() {
            // Not sent, and whoever started it hears so (a command stays queued).
            self.stats.outgoing_full += 1;
            if let Some(exchange) = exchange {
                self.resources.handle_reply(now, exchange, Reply::Unsent, &mut self.effects);
            }
            return;
        }
        out.transmits.push(Transmit { peer, data });
    }

    fn default_retransmit(&self) -> Retransmit {
        Retransmit::exhausting(self.config.ack_timeout, self.config.max_retransmit)
    }

    /// A datagram longer than the receive buffer, so far above the payload limit: a CON request
    /// still gets 4.13 with the limit in Size1, since its header and token are in the part read.
    pub fn handle_oversized(&mut self, peer: SocketAddr, head: &[u8], out: &mut Actions<R::Writes>) {
        self.stats.malformed += 1;
        let Some(h) = Header::peek(head) else { return };
        let tkl = (head[0] & 0x0f) as usize;
        if h.mtype != MessageType::Con || !h.code.is_request() || tkl > 8 || head.len() < 4 + tkl {
            return;
        }
        let response = Response {
            size1: Some(self.config.announced_max_payload as u32),
            ..Response::new(Code::REQUEST_ENTITY_TOO_LARGE)
        };
        send(out, peer, response.encode(MessageType::Ack, h.mid, &head[4..4 + tkl], None));
    }

    fn reject_malformed(&mut self, peer: SocketAddr, data: &[u8], e: FormatError, out: &mut Actions<R::Writes>) {
        self.stats.malformed += 1;
        tracing::debug!(%peer, error = %e, "malformed datagram");
        // §4.2: a malformed CON is rejected with a matching RST (4 bytes, never more than we got);
        // anything else, and anything with an unknown version, is silently dropped.
        if let Some(h) = Header::peek(data)
            && h.mtype == MessageType::Con
        {
            send(out, peer, empty(MessageType::Rst, h.mid));
        }
    }

    fn handle_ack_or_reset(&mut self, now: Now, peer: SocketAddr, msg: &Message<'_>, out: &mut Actions<R::Writes>) {
        // An ACK or RST matching one of our CONs ends its retransmission.
        let Some(exchange) = self.reliability.settle(peer, msg) else {
            tracing::trace!(%peer, mid = msg.mid, "ACK/RST for nothing outstanding");
            return;
        };
        if let Some(exchange) = exchange {
            let reply = if msg.mtype == MessageType::Rst { Reply::Reset } else { Reply::Ack(msg) };
            self.resources.handle_reply(now, exchange, reply, &mut self.effects);
            self.apply_effects(now, out);
        }
    }

    /// Whether this message was seen before (RFC 7252 §4.5); if so its answer goes again.
    fn answered_before(
        &mut self,
        head: &Head<'_>,
        msg: &Message<'_>,
        datagram: &[u8],
        out: &mut Actions<R::Writes>,
    ) -> bool {
        let Head { now, peer, note, .. } = *head;
        let Some(dup) = self.dedup.get(peer, msg.mid, datagram, now.instant) else { return false };
        self.stats.duplicates += 1;
        note.refused("duplicate", None);
        // What got no answer (a NON, or a separate response's request) is recorded as an empty one.
        if let Duplicate::Resend(bytes) = dup
            && !bytes.is_empty()
        {
            out.transmits.push(Transmit { peer, data: bytes.clone() });
        }
        true
    }

    /// A response in a CON or NON of its own: a Huawei uplink (an observe notification).
    fn handle_notification(
        &mut self,
        head: Head<'_>,
        msg: &Message<'_>,
        datagram: &[u8],
        out: &mut Actions<R::Writes>,
    ) {
        if self.answered_before(&head, msg, datagram, out) {
            return;
        }
        let Head { now, peer, authenticated, note } = head;
        let con = msg.mtype == MessageType::Con;
        if msg.options.iter().any(|(n, _)| n.is_critical() && !n.is_recognised())
            || msg.payload.len() > self.config.max_payload
        {
            // §5.4.1: a response with an unrecognised critical option is rejected.
            return send(out, peer, empty(MessageType::Rst, msg.mid));
        }
        if self.pending.len() >= self.config.max_pending_writes {
            // Unacknowledged, the device retransmits a CON later.
            self.stats.pending_full += 1;
            return;
        }
        let request = Request { msg, peer, authenticated, now, path: SmallVec::new(), note };
        let notified = self.resources.handle_notification(&request, &mut self.effects);
        match notified {
            Notified::Store { writes, undo, follow_up } => {
                self.dedup.insert(peer, msg.mid, datagram, Seen::Pending, now.instant);
                let answer = Answer::Notification { con, follow_up };
                let waiting = Waiting { peer, mtype: msg.mtype, mid: msg.mid, token: SmallVec::new(), answer, undo };
                self.await_write(waiting, writes, out);
            }
            Notified::Acknowledge => {
                let data = if con { Bytes::from(empty(MessageType::Ack, msg.mid)) } else { Bytes::new() };
                self.dedup.insert(peer, msg.mid, datagram, Seen::Answered(data.clone()), now.instant);
                if con {
                    out.transmits.push(Transmit { peer, data });
                }
            }
            Notified::Reject => send(out, peer, empty(MessageType::Rst, msg.mid)),
            Notified::Drop => {}
        }
        self.apply_effects(now, out);
    }

    fn handle_request(&mut self, head: Head<'_>, msg: &Message<'_>, datagram: &[u8], out: &mut Actions<R::Writes>) {
        if self.answered_before(&head, msg, datagram, out) {
            return;
        }
        let Head { now, peer, authenticated, note } = head;
        if let Some(response) = self.check_options(msg) {
            return self.respond_now(now, peer, msg, datagram, response, out);
        }
        if msg.mtype == MessageType::Non && msg.options.iter().any(|(n, _)| n.is_critical() && !n.is_recognised()) {
            return send(out, peer, empty(MessageType::Rst, msg.mid));
        }
        let mut path: SmallVec<[&str; 8]> = SmallVec::new();
        for seg in msg.options_of(OptionNumber::URI_PATH) {
            match std::str::from_utf8(seg) {
                Ok(s) => path.push(s),
                Err(_) => return self.respond_now(now, peer, msg, datagram, Response::new(Code::BAD_REQUEST), out),
            }
        }
        if self.pending.len() >= self.config.max_pending_writes {
            // The store is behind: ask the device to come back rather than queue without bound.
            self.stats.pending_full += 1;
            let response = Response { max_age: Some(1), ..Response::new(Code::SERVICE_UNAVAILABLE) };
            return self.respond_now(now, peer, msg, datagram, response, out);
        }
        let request = Request { msg, peer, authenticated, now, path, note };
        let outcome = self.resources.handle(&request, &mut self.effects);
        match outcome {
            Outcome::Respond(response) => self.respond_now(now, peer, msg, datagram, response, out),
            Outcome::Persist(Persist { writes, response, separate, undo, receipt, follow_up }) => {
                let con = msg.mtype == MessageType::Con;
                // With a receipt the response is a CON of its own whatever the request was.
                let separate = (separate && con) || receipt.is_some();
                if separate && con {
                    let ack = Bytes::from(empty(MessageType::Ack, msg.mid));
                    self.dedup.insert(peer, msg.mid, datagram, Seen::Answered(ack.clone()), now.instant);
                    out.transmits.push(Transmit { peer, data: ack });
                } else if separate {
                    self.dedup.insert(peer, msg.mid, datagram, Seen::Answered(Bytes::new()), now.instant);
                } else {
                    self.dedup.insert(peer, msg.mid, datagram, Seen::Pending, now.instant);
                }
                let waiting = Waiting {
                    peer,
                    mtype: msg.mtype,
                    mid: msg.mid,
                    token: SmallVec::from_slice(msg.token),
                    answer: Answer::Response { response, separate, receipt, follow_up },
                    undo,
                };
                self.await_write(waiting, writes, out);
            }
        }
        self.apply_effects(now, out);
    }

    /// Asks for `writes` to be made durable; `waiting` is answered once they are.
    fn await_write(&mut self, waiting: Waiting, writes: R::Writes, out: &mut Actions<R::Writes>) {
        let ticket = self.pending.insert(waiting);
        out.writes.push((Some(ticket), writes));
    }

    /// Message-layer checks before any resource sees the request.
    fn check_options(&self, msg: &Message<'_>) -> Option<Response> {
        let unknown_critical = msg.options.iter().any(|(n, _)| n.is_critical() && !n.is_recognised());
        if unknown_critical && msg.mtype == MessageType::Con {
            // §5.4.1: 4.02 for a CON (a NON is rejected with RST by the caller).
            return Some(Response::new(Code::BAD_OPTION));
        }
        if msg.option(OptionNumber::PROXY_URI).is_some() || msg.option(OptionNumber::PROXY_SCHEME).is_some() {
            return Some(Response::new(Code::PROXYING_NOT_SUPPORTED));
        }
        if msg.payload.len() > self.config.max_payload {
            return Some(Response {
                size1: Some(self.config.announced_max_payload as u32),
                ..Response::new(Code::REQUEST_ENTITY_TOO_LARGE)
            });
        }
        None
    }

    fn respond_now(
        &mut self,
        now: Now,
        peer: SocketAddr,
        msg: &Message<'_>,
        request: &[u8],
        response: Response,
        out: &mut Actions<R::Writes>,
    ) {
        let (mtype, mid) = match msg.mtype {
            MessageType::Con => (MessageType::Ack, msg.mid),
            _ => (MessageType::Non, self.fresh_mid()),
        };
        let mut data = response.encode(mtype, mid, msg.token, None);
        if data.len() > request.len() && response.code.class() >= 4 {
            // No amplification: an error to a tiny request drops its advisory options
            // (Max-Age, Size1) rather than be larger than what provoked it.
            let bare = Response { max_age: None, size1: None, ..response };
            data = bare.encode(mtype, mid, msg.token, None);
        }
        let data = Bytes::from(data);
        // An error changed nothing, so a retransmission can be answered afresh. Not remembering
        // errors keeps a flood of refused requests from strangers from pushing legitimate
        // exchanges out of the cache (whose retransmissions would then be stored twice).
        if response.code.class() < 4 {
            self.dedup.insert(peer, msg.mid, request, Seen::Answered(data.clone()), now.instant);
        }
        out.transmits.push(Transmit { peer, data });
    }

    /// A write requested in [`Actions::writes`] is durable (or failed): answer its message.
    pub fn handle_committed(&mut self, now: Now, ticket: Ticket, result: Written, out: &mut Actions<R::Writes>) {
        let from = out.transmits.len();
        self.answer_committed(now, ticket, result, out);
        self.trace_sent(now, out, from);
    }

    fn answer_committed(&mut self, now: Now, ticket: Ticket, result: Written, out: &mut Actions<R::Writes>) {
        let Some(ex) = self.pending.remove(ticket) else { return };
        let failed = result.is_err();
        if failed && let Some(undo) = ex.undo {
            undo();
        }
        let (response, separate, receipt, follow_up) = match ex.answer {
            Answer::Response { response, separate, receipt, follow_up } => (response, separate, receipt, follow_up),
            Answer::Notification { con, follow_up } => {
                if con {
                    // Not stored: a RST tells the device, rather than an ACK claiming otherwise.
                    let mtype = if failed { MessageType::Rst } else { MessageType::Ack };
                    let data = Bytes::from(empty(mtype, ex.mid));
                    self.dedup.answer(ex.peer, ex.mid, data.clone());
                    out.transmits.push(Transmit { peer: ex.peer, data });
                } else {
                    self.dedup.answer(ex.peer, ex.mid, Bytes::new());
                }
                if let Some(o) = follow_up {
                    if failed {
                        self.resources.handle_reply(now, o.exchange, Reply::Unsent, &mut self.effects);
                        self.apply_effects(now, out);
                    } else {
                        self.originate(now, o, out);
                    }
                }
                return;
            }
        };
        let (response, message_id, follow_up) = match result {
            Ok(id) => (response.settled(), id, follow_up),
            Err(e) => {
                if let Some(o) = follow_up {
                    self.resources.handle_reply(now, o.exchange, Reply::Unsent, &mut self.effects);
                    self.apply_effects(now, out);
                }
                let response = match e.retry_after_s {
                    // Nothing was stored and a retry may well succeed (the disk was full): say
                    // when, as for a full write queue.
                    Some(s) => Response { max_age: Some(s), ..Response::new(Code::SERVICE_UNAVAILABLE) },
                    None => Response::new(Code::INTERNAL_SERVER_ERROR),
                };
                (response, None, None)
            }
        };
        if separate {
            let mid = self.fresh_mid();
            let data = Bytes::from(response.encode(MessageType::Con, mid, &ex.token, message_id));
            let retransmit = self.default_retransmit();
            self.send_con(now, ex.peer, mid, data, retransmit, receipt.filter(|_| !failed), out);
        } else {
            let (mtype, mid) = match ex.mtype {
                MessageType::Con => (MessageType::Ack, ex.mid),
                _ => (MessageType::Non, self.fresh_mid()),
            };
            let data = Bytes::from(response.encode(mtype, mid, &ex.token, message_id));
            self.dedup.answer(ex.peer, ex.mid, data.clone());
            out.transmits.push(Transmit { peer: ex.peer, data });
        }
        if failed && let Some(exchange) = receipt {
            // The receipt's subject was never stored, nor sent.
            self.resources.handle_reply(now, exchange, Reply::Unsent, &mut self.effects);
            self.apply_effects(now, out);
        }
        if let Some(o) = follow_up {
            self.originate(now, o, out);
        }
    }

    /// Retransmits unacknowledged CONs with exponential back-off and expires old exchanges.
    pub fn handle_timeout(&mut self, now: Now, out: &mut Actions<R::Writes>) {
        let from = out.transmits.len();
        self.dedup.expire(now.instant);
        let mut due = Vec::new();
        self.reliability.due(now.instant, &mut due);
        for d in due {
            match d {
                Due::Retransmit { peer, data } => {
                    self.stats.retransmissions += 1;
                    out.transmits.push(Transmit { peer, data });
                }
                Due::GaveUp { exchange } => {
                    self.stats.con_timeouts += 1;
                    if let Some(exchange) = exchange {
                        self.resources.handle_reply(now, exchange, Reply::TimedOut, &mut self.effects);
                        self.apply_effects(now, out);
                    }
                }
            }
        }
        self.trace_sent(now, out, from);
    }

    /// When [`Endpoint::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.reliability.next_due(), self.dedup.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }
}

/// Who sent a message, and where its handler notes what it found.
#[derive(Clone, Copy)]
struct Head<'n> {
    now: Now,
    peer: SocketAddr,
    authenticated: Option<DeviceId>,
    note: &'n Note,
}

fn send<W>(out: &mut Actions<W>, peer: SocketAddr, data: Vec<u8>) {
    out.transmits.push(Transmit { peer, data: Bytes::from(data) });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::UnixMs;
    use crate::coap::message::MessageBuilder;

    /// Starts one exchange per kick and records how each ended.
    #[derive(Default)]
    struct Originator {
        ended: Vec<(ExchangeKey, String)>,
    }

    impl Resources for Originator {
        type Writes = ();

        fn handle(&mut self, _req: &Request<'_, '_>, _effects: &mut Effects<()>) -> Outcome<()> {
            Outcome::code(Code::NOT_FOUND)
        }

        fn handle_kick(&mut self, _now: Now, device: DeviceId, effects: &mut Effects<()>) {
            effects.outgoing.push(Outgoing {
                peer: "10.0.0.1:5683".parse().unwrap(),
                message: MessageBuilder::new(MessageType::Con, Code::POST, 0, &[7]).payload(b"cmd").build(),
                retransmit: Retransmit {
                    ack_timeout: Duration::from_secs(10),
                    max_retransmit: 4,
                    give_up_after: Duration::from_secs(180),
                },
                exchange: ExchangeKey::from(device.0),
            });
        }

        fn handle_reply(&mut self, _now: Now, exchange: ExchangeKey, reply: Reply<'_, '_>, _effects: &mut Effects<()>) {
            let how = match reply {
                Reply::Ack(m) => format!("ack {}", m.code),
                Reply::Reset => "reset".into(),
                Reply::TimedOut => "timed out".into(),
                Reply::Unsent => "unsent".into(),
            };
            self.ended.push((exchange, how));
        }
    }

    fn endpoint() -> Endpoint<Originator> {
        endpoint_with(1000)
    }

    fn endpoint_with(max_outgoing: usize) -> Endpoint<Originator> {
        Endpoint::new(
            Originator::default(),
            EndpointConfig {
                max_payload: 1024,
                announced_max_payload: 1024,
                dedup_capacity: 100,
                exchange_lifetime: Duration::from_secs(247),
                ack_timeout: Duration::from_secs(2),
                max_retransmit: 4,
                max_pending_writes: 10,
                max_outgoing,
            },
        )
    }

    fn at(start: Instant, secs: u64) -> Now {
        Now { instant: start + Duration::from_secs(secs), wall: UnixMs(secs * 1000) }
    }

    #[test]
    fn server_cons_back_off_then_time_out_within_their_deadline() {
        let mut ep = endpoint();
        let start = Instant::now();
        let mut out = Actions::default();
        ep.handle_kick(at(start, 0), DeviceId(1), &mut out);
        assert_eq!(out.transmits.len(), 1);
        let mid = Message::parse(&out.transmits[0].data).unwrap().mid;
        // NB-IoT timers: 10 s, doubling, 4 retransmissions, but never past 180 s.
        let mut sent_at = Vec::new();
        for s in 1..=200 {
            let mut out = Actions::default();
            ep.handle_timeout(at(start, s), &mut out);
            for t in &out.transmits {
                assert_eq!(Message::parse(&t.data).unwrap().mid, mid, "a retransmission is the same message");
                sent_at.push(s);
            }
        }
        assert_eq!(sent_at, [10, 30, 70, 150]);
        assert_eq!(ep.resources.ended, [(ExchangeKey::from(1), "timed out".to_string())]);
        assert_eq!(ep.poll_timeout(), None);
    }

    #[test]
    fn cons_beyond_the_limit_are_not_sent_and_their_starter_hears_so() {
        let mut ep = endpoint_with(2);
        let start = Instant::now();
        let mut out = Actions::default();
        for d in 1..=3 {
            ep.handle_kick(at(start, 0), DeviceId(d), &mut out);
        }
        assert_eq!(out.transmits.len(), 2);
        assert_eq!(ep.outgoing(), 2);
        assert_eq!(ep.resources.ended, [(ExchangeKey::from(3), "unsent".to_string())]);
        assert_eq!(ep.take_stats().0.outgoing_full, 1);
    }

    #[test]
    fn acks_and_resets_end_their_exchange_and_nothing_else() {
        let mut ep = endpoint();
        let start = Instant::now();
        let mut out = Actions::default();
        ep.handle_kick(at(start, 0), DeviceId(1), &mut out);
        ep.handle_kick(at(start, 0), DeviceId(2), &mut out);
        let mids: Vec<u16> = out.transmits.iter().map(|t| Message::parse(&t.data).unwrap().mid).collect();
        let peer = out.transmits[0].peer;
        let ack = MessageBuilder::new(MessageType::Ack, Code::CONTENT, mids[0], &[7]).payload(b"0").build();
        // A piggybacked answer with another token is not the device's.
        let forged = MessageBuilder::new(MessageType::Ack, Code::CHANGED, mids[0], &[8]).build();
        ep.handle_datagram(at(start, 1), peer, None, &forged, &mut Actions::default());
        assert!(ep.resources.ended.is_empty());
        ep.handle_datagram(at(start, 1), peer, None, &ack, &mut Actions::default());
        // The same ACK again, and one from another address, match nothing.
        ep.handle_datagram(at(start, 1), peer, None, &ack, &mut Actions::default());
        ep.handle_datagram(at(start, 1), "10.0.0.2:5683".parse().unwrap(), None, &ack, &mut Actions::default());
        ep.handle_datagram(at(start, 2), peer, None, &empty(MessageType::Rst, mids[1]), &mut Actions::default());
        assert_eq!(
            ep.resources.ended,
            [(ExchangeKey::from(1), "ack 2.05".to_string()), (ExchangeKey::from(2), "reset".to_string())]
        );
        let mut out = Actions::default();
        ep.handle_timeout(at(start, 60), &mut out);
        assert!(out.transmits.is_empty(), "nothing left to retransmit");
    }
}

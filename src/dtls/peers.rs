//! The DTLS peer table of one socket: which addresses have a handshake in progress or an
//! established session, the limits on both, and the timers that end them. It owns no socket:
//! the shell feeds it datagrams and timeouts and sends what it returns (quinn-proto style).
//!
//! A new peer costs nothing until it proves it receives at its address: its ClientHello goes
//! through OpenSSL's stateless cookie exchange on a shared listener, and only a ClientHello
//! carrying a valid cookie gets an entry (SPEC §3.3).
//!
//! A client that offers RFC 9146's Connection ID gets one: its records then name their session
//! by CID, so one from a new address (a NAT rebinding) is read, and once it authenticates as the
//! newest the session moves there. OpenSSL runs the handshake without knowing CIDs; the table
//! rewrites the records of the new epoch between OpenSSL and the wire. Established sessions are
//! reported as [`Change`]s for the store (`durable`), and restored ones are taken up from the
//! port's shared pool by the first datagram that names them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslRef, SslStream};
use smallvec::SmallVec;

use super::cid::{CONTENT_TLS12_CID, Cid};
use super::context::Slots;
use super::durable::{self, Change, SessionId, SharedPool};
use super::ffi::{self, Listen, ListenAddr};
use super::pipe::Pipe;
use super::psk::Refusal;
use super::quota::{Handshakes, Quotas};
use super::record::{
    CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_CHANGE_CIPHER_SPEC, CONTENT_HANDSHAKE, Cids, Keys, Record,
    ReplayPosition, Session, last_seq, plaintext_alert, server_hello_encrypt_then_mac,
};
use super::{is_client_hello, records};
use crate::identity::DeviceId;

/// Alert levels and the descriptions that matter (RFC 5246 §7.2).
const WARNING: u8 = 1;
const FATAL: u8 = 2;
const CLOSE_NOTIFY: u8 = 0;
const DECRYPT_ERROR: u8 = 51;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Handshakes in progress, in all and per source.
    pub handshakes: Quotas,
    pub max_sessions: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub mtu: u32,
    /// Length of the CIDs handed out; 0 to negotiate none.
    pub cid_len: usize,
}

/// Which socket of its port a table serves, named in the CIDs it hands out.
#[derive(Debug, Clone, Copy)]
pub struct Socket {
    pub index: usize,
    pub of: usize,
}

/// Why a handshake did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The peer stopped answering before finishing.
    Timeout,
    /// The peer's Finished did not verify: its key is not the device's.
    BadKey,
    /// The PSK identity named no usable device.
    Refused(Refusal),
    /// The peer sent a fatal alert or broke the protocol.
    Protocol,
}

impl Failure {
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::BadKey => "bad_key",
            Failure::Refused(r) => r.reason(),
            Failure::Protocol => "protocol",
        }
    }
}

/// Counters the shell exports as metrics and resets.
#[derive(Debug, Default)]
pub struct Stats {
    pub hello_verify_requests: u64,
    pub started: u64,
    /// Completed handshakes by negotiated suite (OpenSSL's name): which suites a fleet uses.
    pub completed: HashMap<&'static str, u64>,
    /// Of the completed handshakes, those that negotiated a CID.
    pub completed_with_cid: u64,
    pub failed: HashMap<&'static str, u64>,
    /// Valid ClientHellos dropped because a limit was reached, by limit.
    pub refused: HashMap<&'static str, u64>,
    pub evicted_idle: u64,
    pub closed_by_peer: u64,
    /// Sessions ended because their device established a new one (from a new address).
    pub replaced: u64,
    /// Sessions that moved to a new address on an authenticated record naming their CID.
    pub address_moves: u64,
    /// Restored sessions taken up by a datagram: handshakes a restart did not cost.
    pub resumed: u64,
    /// Datagrams from addresses without a session that are not a ClientHello.
    pub stray: u64,
}

enum Phase {
    /// OpenSSL runs the handshake.
    Handshaking {
        stream: Box<SslStream<Pipe>>,
        deadline: Instant,
        /// The peer sent records under negotiated keys: at the deadline, a Finished that never
        /// verified (one that came before its ChangeCipherSpec is not judged on arrival).
        saw_encrypted: bool,
        encrypt_then_mac: bool,
        /// The highest epoch-0 sequence number sent to the peer; an alert of ours must follow it.
        plain_seq: Option<u64>,
        /// With a CID negotiated, the new keys, to hand the client's CID records to OpenSSL.
        cid_keys: Option<Box<Session>>,
    },
    /// Our own record layer carries the data; OpenSSL's state is gone.
    Established {
        session: Session,
        device: Option<DeviceId>,
        last_active: Instant,
        id: SessionId,
        /// The first write sequence number the store has not been asked to reserve.
        reserved: u64,
    },
}

struct Peer {
    phase: Phase,
    /// The earliest time this peer's entry in the timer heap fires.
    timer: Option<Instant>,
}

pub struct PeerTable {
    ctx: SslContext,
    limits: Limits,
    socket: Socket,
    slots: Slots,
    /// Runs the cookie exchange for every address without an entry; handed to the peer once its
    /// cookie verifies.
    listener: Option<SslStream<Pipe>>,
    listen_addr: ListenAddr,
    peers: HashMap<SocketAddr, Peer>,
    by_cid: HashMap<Cid, SocketAddr>,
    by_device: HashMap<DeviceId, SocketAddr>,
    handshakes: Handshakes,
    timers: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    /// Restored sessions not yet taken up; `None` when sessions are not kept in the store.
    durable: Option<SharedPool>,
    changes: Vec<Change>,
    stats: Stats,
}

impl PeerTable {
    pub fn new(ctx: SslContext, limits: Limits, socket: Socket, durable: Option<SharedPool>) -> PeerTable {
        PeerTable {
            ctx,
            limits,
            socket,
            slots: Slots::get(),
            listener: None,
            listen_addr: ListenAddr::new(),
            peers: HashMap::new(),
            by_cid: HashMap::new(),
            by_device: HashMap::new(),
            handshakes: Handshakes::new(limits.handshakes),
            timers: BinaryHeap::new(),
            durable,
            changes: Vec::new(),
            stats: Stats::default(),
        }
    }

    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.stats)
    }

    /// What the store must write for the sessions, in order; taken before the writes of the
    /// CoAP exchanges the same datagrams caused, so a session's replay window is durable no
    /// later than anything a record in it did.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    pub fn handshakes_in_progress(&self) -> usize {
        self.handshakes.in_progress()
    }

    pub fn sessions(&self) -> usize {
        self.peers.len() - self.handshakes.in_progress()
    }

    pub fn sessions_with_cid(&self) -> usize {
        self.by_cid.len()
    }

    /// Feeds one datagram from `peer`. Decrypted CoAP datagrams go to `deliver` with the address
    /// the session is at and the device its PSK identity names; datagrams to send are appended
    /// to `wire`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        data: &[u8],
        wire: &mut Vec<(SocketAddr, Bytes)>,
        deliver: &mut impl FnMut(SocketAddr, Option<DeviceId>, &[u8]),
    ) {
        // A record with a CID names its session, wherever it comes from.
        if let Some(cid) = Cid::of_datagram(data, self.limits.cid_len) {
            let owner = match self.by_cid.get(&cid) {
                Some(&owner) => Some(owner),
                None if self.is_handshaking(peer) => return self.handshake_datagram(now, peer, data, wire),
                None => self.claim(|pool| pool.claim_cid(&cid)),
            };
            match owner {
                Some(owner) => self.receive(now, owner, peer, data, wire, deliver),
                None => self.stats.stray += 1,
            }
            return;
        }
        match self.peers.get(&peer).map(|p| matches!(p.phase, Phase::Established { .. })) {
            // A ClientHello on an established session: the device restarted and kept its port.
            // Its old session is replaced once the new hello proves the address (RFC 6347 §4.2.8).
            Some(true) if is_client_hello(data) => self.listen(now, peer, data, wire),
            Some(true) => self.receive(now, peer, peer, data, wire, deliver),
            Some(false) => self.handshake_datagram(now, peer, data, wire),
            None if is_client_hello(data) => self.listen(now, peer, data, wire),
            None => match self.claim(|pool| pool.claim_address(peer)) {
                Some(owner) => self.receive(now, owner, peer, data, wire, deliver),
                None => self.stats.stray += 1,
            },
        }
    }

    /// Encrypts one CoAP datagram for `peer`. Dropped when the session is gone: the device
    /// retransmits its request after a new handshake, and the dedup cache answers it.
    pub fn send(&mut self, peer: SocketAddr, data: &[u8], wire: &mut Vec<(SocketAddr, Bytes)>) -> bool {
        if !self.is_established(peer) && self.claim(|pool| pool.claim_address(peer)).is_none() {
            return false;
        }
        self.reserve(peer);
        let Some(Peer { phase: Phase::Established { session, .. }, .. }) = self.peers.get_mut(&peer) else {
            return false;
        };
        match session.seal(CONTENT_APPLICATION_DATA, data) {
            Some(d) => wire.push((peer, d)),
            None => {
                // Sequence numbers are spent: the device must handshake again.
                self.remove(peer);
                return false;
            }
        }
        true
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    pub fn handle_timeout(&mut self, now: Instant, wire: &mut Vec<(SocketAddr, Bytes)>) {
        while let Some(&Reverse((at, addr))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.peers.get_mut(&addr) else { continue };
            if p.timer != Some(at) {
                continue; // superseded by an earlier schedule
            }
            p.timer = None;
            match &mut p.phase {
                Phase::Handshaking { stream, deadline, saw_encrypted, plain_seq, .. } => {
                    if now >= *deadline {
                        let refusal = stream.ssl().ex_data(self.slots.refusal).copied();
                        let failure = match (refusal, *saw_encrypted) {
                            (Some(r), _) => Failure::Refused(r),
                            (None, true) => Failure::BadKey,
                            (None, false) => Failure::Timeout,
                        };
                        self.fail(addr, failure);
                        continue;
                    }
                    if !ffi::handle_timeout(ffi::ssl_mut(stream)) {
                        self.fail(addr, Failure::Timeout);
                        continue;
                    }
                    *plain_seq = (*plain_seq).max(drain(addr, stream, wire));
                    self.schedule_handshake(now, addr);
                }
                Phase::Established { last_active, .. } => {
                    let idle_at = *last_active + self.limits.idle_timeout;
                    if now >= idle_at {
                        self.stats.evicted_idle += 1;
                        self.remove(addr);
                    } else {
                        schedule(&mut self.timers, p, addr, idle_at);
                    }
                }
            }
        }
    }

    fn is_handshaking(&self, peer: SocketAddr) -> bool {
        matches!(self.peers.get(&peer), Some(Peer { phase: Phase::Handshaking { .. }, .. }))
    }

    fn is_established(&self, peer: SocketAddr) -> bool {
        matches!(self.peers.get(&peer), Some(Peer { phase: Phase::Established { .. }, .. }))
    }

    /// The cookie exchange for a ClientHello from an address without a handshake in progress.
    fn listen(&mut self, now: Instant, peer: SocketAddr, data: &[u8], wire: &mut Vec<(SocketAddr, Bytes)>) {
        let mut listener = match self.listener.take() {
            Some(l) => l,
            None => match self.new_stream() {
                Some(l) => l,
                None => return,
            },
        };
        ffi::ssl_mut(&mut listener).set_ex_data(self.slots.peer, peer);
        listener.get_mut().put(data);
        let verdict = ffi::listen(ffi::ssl_mut(&mut listener), &mut self.listen_addr);
        listener.get_mut().clear_inbound();
        match verdict {
            Listen::NotYet => {
                let before = wire.len();
                drain(peer, &mut listener, wire);
                if wire.len() > before {
                    self.stats.hello_verify_requests += 1;
                }
                self.listener = Some(listener);
                return;
            }
            Listen::Failed => return, // the listener is dropped; the next hello makes a new one
            Listen::Verified => {}
        }
        // From here on the listener holds this peer's state.
        let replacing = self.peers.contains_key(&peer);
        if !replacing && self.sessions() >= self.limits.max_sessions {
            *self.stats.refused.entry("sessions").or_default() += 1;
            return;
        }
        if let Err(limit) = self.handshakes.admit(peer.ip()) {
            *self.stats.refused.entry(limit.label()).or_default() += 1;
            return;
        }
        if replacing {
            self.remove(peer);
        }
        if self.limits.cid_len > 0 {
            // Offered in the ServerHello if the client asks for CIDs.
            let cid = self.new_cid();
            ffi::ssl_mut(&mut listener).set_ex_data(self.slots.server_cid, cid);
        }
        self.stats.started += 1;
        let phase = Phase::Handshaking {
            stream: Box::new(listener),
            deadline: now + self.limits.handshake_timeout,
            saw_encrypted: false,
            encrypt_then_mac: false,
            plain_seq: None,
            cid_keys: None,
        };
        self.peers.insert(peer, Peer { phase, timer: None });
        self.handshake(now, peer, wire);
    }

    /// A CID no session of this port holds.
    fn new_cid(&self) -> Cid {
        loop {
            let cid = Cid::generate(self.limits.cid_len, self.socket.index, self.socket.of);
            let restored = self.durable.as_ref().is_some_and(|pool| durable::lock(pool).holds_cid(&cid));
            if !self.by_cid.contains_key(&cid) && !restored {
                return cid;
            }
        }
    }

    fn new_stream(&self) -> Option<SslStream<Pipe>> {
        let mut ssl = Ssl::new(&self.ctx).ok()?;
        ssl.set_mtu(self.limits.mtu).ok()?;
        SslStream::new(ssl, Pipe::default()).ok()
    }

    /// A datagram from a peer whose handshake is in progress.
    fn handshake_datagram(&mut self, now: Instant, peer: SocketAddr, data: &[u8], wire: &mut Vec<(SocketAddr, Bytes)>) {
        let cid_len = self.limits.cid_len;
        let Some(Peer { phase: Phase::Handshaking { stream, saw_encrypted, .. }, .. }) = self.peers.get_mut(&peer)
        else {
            return;
        };
        let held = ClientRecords::of(data, cid_len);
        *saw_encrypted |= held.encrypted;
        // Read under the negotiated keys only after OpenSSL took the client's ChangeCipherSpec:
        // an earlier one, or one before it in this datagram. A Finished that overtook its
        // ChangeCipherSpec is buffered, not judged.
        let judged = held.finished && (held.change_cipher_spec_first || ffi::awaits_client_finished(stream.ssl()));
        if held.with_cid {
            // OpenSSL first reads the plain records (the key exchange gives it the master
            // secret), then the client's CID records rewritten as plain ones.
            let plain: Vec<u8> = records(data, cid_len)
                .filter(|r| r.content_type != CONTENT_TLS12_CID)
                .flat_map(|r| r.bytes)
                .copied()
                .collect();
            if !plain.is_empty() {
                stream.get_mut().put(&plain);
                self.handshake(now, peer, wire);
            }
            let rewritten = self.without_cid(peer, data);
            if let Some(Peer { phase: Phase::Handshaking { stream, .. }, .. }) = self.peers.get_mut(&peer)
                && !rewritten.is_empty()
            {
                stream.get_mut().put(&rewritten);
                self.handshake(now, peer, wire);
            }
        } else {
            stream.get_mut().put(data);
            self.handshake(now, peer, wire);
        }
        if judged {
            self.refuse_unverified_finished(peer, wire);
        }
    }

    /// The client's CID records of `data` (its Finished) as the plain records OpenSSL reads;
    /// empty when none authenticates or the keys are not known yet.
    fn without_cid(&mut self, peer: SocketAddr, data: &[u8]) -> Vec<u8> {
        let (slots, cid_len) = (self.slots, self.limits.cid_len);
        let Some(Peer { phase: Phase::Handshaking { stream, encrypt_then_mac, cid_keys, .. }, .. }) =
            self.peers.get_mut(&peer)
        else {
            return Vec::new();
        };
        if cid_keys.is_none() {
            let cids = negotiated(stream.ssl(), &slots);
            *cid_keys = Keys::of_handshake(stream.ssl(), *encrypt_then_mac)
                .filter(|_| cids.ours.is_some())
                .and_then(|k| Session::new(&k, cids, 0, ReplayPosition::default()))
                .map(Box::new);
        }
        let Some(keys) = cid_keys else { return Vec::new() };
        records(data, cid_len)
            .filter(|r| r.content_type == CONTENT_TLS12_CID)
            .filter_map(|r| keys.without_cid(r.bytes))
            .flatten()
            .collect()
    }

    /// Advances `peer`'s handshake after new input. Once OpenSSL finishes, the session moves to
    /// our record layer and OpenSSL's state is freed.
    fn handshake(&mut self, now: Instant, peer: SocketAddr, wire: &mut Vec<(SocketAddr, Bytes)>) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let Phase::Handshaking { stream, encrypt_then_mac, plain_seq, .. } = &mut p.phase else { return };
        let result = stream.accept();
        stream.get_mut().clear_inbound();
        match result {
            Ok(()) => {
                let flight: Vec<Bytes> = stream.get_mut().take_outbound().map(Bytes::from).collect();
                let ssl = stream.ssl();
                let device = ssl.ex_data(self.slots.device).copied();
                let suite = ssl.current_cipher().map_or("unknown", |c| c.name());
                let cids = negotiated(ssl, &self.slots);
                let keys = Keys::of_handshake(ssl, *encrypt_then_mac);
                let Some((keys, session)) =
                    keys.and_then(|k| Session::from_handshake(&k, cids.clone(), flight).map(|s| (k, s)))
                else {
                    // Only suites the record layer implements are offered; this is a bug.
                    tracing::error!(%peer, cipher = suite, "no record layer for the negotiated suite");
                    self.fail(peer, Failure::Protocol);
                    return;
                };
                wire.extend(session.final_flight().iter().map(|d| (peer, d.clone())));
                let id = SessionId::random();
                let reserved = session.write_seq() + durable::RESERVE;
                p.phase = Phase::Established { session, device, last_active: now, id, reserved };
                self.handshakes.release(peer.ip());
                *self.stats.completed.entry(suite).or_default() += 1;
                schedule(&mut self.timers, p, peer, now + self.limits.idle_timeout);
                if let Some(cid) = cids.ours {
                    self.stats.completed_with_cid += 1;
                    self.by_cid.insert(cid, peer);
                }
                if let Some(device) = device
                    && let Some(old) = self.by_device.insert(device, peer)
                    && old != peer
                {
                    // The device moved without a CID (or restarted): its old session is over.
                    self.stats.replaced += 1;
                    self.remove(old);
                }
                if let Some(pool) = &self.durable {
                    let displaced = durable::lock(pool).claim_address(peer);
                    self.changes.extend(displaced.map(|r| Change::Ended(r.id)));
                    let state =
                        durable::State { address: peer, reserved, replay: ReplayPosition::default(), last_active: now };
                    let session = Box::new(durable::Established { keys, cids, device });
                    self.changes.push(Change::Established { id, session, state });
                }
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                let start = wire.len();
                *plain_seq = (*plain_seq).max(drain(peer, stream, wire));
                if let Some(etm) = wire[start..].iter().find_map(|(_, d)| server_hello_encrypt_then_mac(d)) {
                    *encrypt_then_mac = etm;
                }
                self.schedule_handshake(now, peer);
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "DTLS handshake failed");
                drain(peer, stream, wire);
                self.fail(peer, Failure::Protocol);
            }
        }
    }

    /// After a datagram whose Finished OpenSSL read under the negotiated keys: if it still waits
    /// for that Finished, the record did not authenticate (DTLS drops such records silently, RFC
    /// 6347 §4.1.2.7), so the client holds another key. It is told at once with decrypt_error (RFC
    /// 4279 §2) rather than left retransmitting on a radio it pays for until the handshake times
    /// out. An identity that named no usable device got a random key from the PSK callback and
    /// ends here alike: the same alert at the same point says nothing about which identities exist.
    fn refuse_unverified_finished(&mut self, peer: SocketAddr, wire: &mut Vec<(SocketAddr, Bytes)>) {
        let Some(Peer { phase: Phase::Handshaking { stream, plain_seq, .. }, .. }) = self.peers.get(&peer) else {
            return;
        };
        if !ffi::awaits_client_finished(stream.ssl()) {
            return;
        }
        wire.push((peer, plaintext_alert(plain_seq.map_or(0, |s| s + 1), FATAL, DECRYPT_ERROR)));
        let failure = match stream.ssl().ex_data(self.slots.refusal) {
            Some(&refusal) => Failure::Refused(refusal),
            None => Failure::BadKey,
        };
        self.fail(peer, failure);
    }

    /// A restored session from the pool, taken up at the address it was at; that address.
    fn claim(&mut self, take: impl FnOnce(&mut durable::Pool) -> Option<durable::Restored>) -> Option<SocketAddr> {
        let durable::Restored { id, session: established, state } = take(&mut durable::lock(self.durable.as_ref()?))?;
        let durable::Established { keys, cids, device } = established;
        let Some(session) = Session::new(&keys, cids, state.reserved, state.replay) else {
            self.changes.push(Change::Ended(id));
            return None;
        };
        let address = state.address;
        self.remove(address); // whatever holds the address now came after
        self.stats.resumed += 1;
        // Sending resumes at the first number not reserved before: none sent then is sent again.
        let phase =
            Phase::Established { session, device, last_active: state.last_active, id, reserved: state.reserved };
        let p = self.peers.entry(address).or_insert(Peer { phase, timer: None });
        schedule(&mut self.timers, p, address, state.last_active + self.limits.idle_timeout);
        if let Some(cid) = session_cid(p) {
            self.by_cid.insert(cid, address);
        }
        if let Some(device) = device {
            self.by_device.entry(device).or_insert(address);
        }
        self.reserve(address);
        Some(address)
    }

    /// A datagram from `from` for the established session at `owner`: its records, decrypted.
    /// A record from a new address moves the session there if it is the newest it has read.
    fn receive(
        &mut self,
        now: Instant,
        owner: SocketAddr,
        from: SocketAddr,
        data: &[u8],
        wire: &mut Vec<(SocketAddr, Bytes)>,
        deliver: &mut impl FnMut(SocketAddr, Option<DeviceId>, &[u8]),
    ) {
        let Some(Peer { phase: Phase::Established { session, .. }, .. }) = self.peers.get_mut(&owner) else { return };
        let mut records: SmallVec<[Record; 2]> = SmallVec::new();
        let newest = session.open(data, |r| records.push(r));
        if records.is_empty() {
            return;
        }
        let at = if from != owner && newest {
            self.move_session(owner, from);
            self.stats.address_moves += 1;
            from
        } else {
            owner
        };
        let Some(Peer { phase: Phase::Established { session, device, last_active, .. }, .. }) = self.peers.get_mut(&at)
        else {
            return;
        };
        *last_active = now;
        let mut end = None;
        for record in records {
            match record {
                Record::Data(plain) => deliver(at, *device, &plain),
                // The client sends its Finished again: our final flight was lost.
                Record::Handshake => wire.extend(session.final_flight().iter().map(|d| (at, d.clone()))),
                Record::Alert(_, CLOSE_NOTIFY) => {
                    end = Some(true);
                    break;
                }
                Record::Alert(FATAL, _) => {
                    end = Some(false);
                    break;
                }
                Record::Alert(..) => {}
            }
        }
        match end {
            Some(true) => {
                // Answered, so the client can handshake again from the same port at once.
                if let Some(d) = session.seal(CONTENT_ALERT, &[WARNING, CLOSE_NOTIFY]) {
                    wire.push((at, d));
                }
                self.stats.closed_by_peer += 1;
                self.remove(at);
            }
            Some(false) => {
                *self.stats.failed.entry("alert").or_default() += 1;
                self.remove(at);
            }
            None => self.save_state(at),
        }
    }

    /// The session at `from` is now at `to`; whatever was at `to` is stale (the NAT gave the
    /// address to this device) and ends.
    fn move_session(&mut self, from: SocketAddr, to: SocketAddr) {
        self.remove(to);
        let Some(mut p) = self.peers.remove(&from) else { return };
        let Phase::Established { session, device, last_active, .. } = &p.phase else { return };
        if let Some(cid) = session.cids().ours {
            self.by_cid.insert(cid, to);
        }
        if let Some(device) = device
            && self.by_device.get(device) == Some(&from)
        {
            self.by_device.insert(*device, to);
        }
        let idle_at = *last_active + self.limits.idle_timeout;
        p.timer = None;
        let p = self.peers.entry(to).or_insert(p);
        schedule(&mut self.timers, p, to, idle_at);
    }

    /// Before a record is sealed for `peer`: keeps its sequence number within what the store is
    /// asked to reserve, asking for more once half is used.
    fn reserve(&mut self, peer: SocketAddr) {
        if self.durable.is_none() {
            return;
        }
        let Some(Peer { phase: Phase::Established { session, reserved, .. }, .. }) = self.peers.get_mut(&peer) else {
            return;
        };
        if session.write_seq() + durable::RESERVE / 2 < *reserved {
            return;
        }
        *reserved = session.write_seq() + durable::RESERVE;
        self.save_state(peer);
    }

    fn save_state(&mut self, peer: SocketAddr) {
        if self.durable.is_none() {
            return;
        }
        let Some(Peer { phase: Phase::Established { session, id, reserved, last_active, .. }, .. }) =
            self.peers.get(&peer)
        else {
            return;
        };
        let state = durable::State {
            address: peer,
            reserved: *reserved,
            replay: session.replay_position(),
            last_active: *last_active,
        };
        self.changes.push(Change::State { id: *id, state });
    }

    /// Arms the handshake timer: OpenSSL's retransmission, bounded by the handshake deadline.
    fn schedule_handshake(&mut self, now: Instant, peer: SocketAddr) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let Phase::Handshaking { stream, deadline, .. } = &p.phase else { return };
        let at = match ffi::timeout(stream.ssl()) {
            Some(left) => (now + left).min(*deadline),
            None => *deadline,
        };
        schedule(&mut self.timers, p, peer, at);
    }

    fn fail(&mut self, peer: SocketAddr, failure: Failure) {
        *self.stats.failed.entry(failure.reason()).or_default() += 1;
        tracing::debug!(%peer, reason = failure.reason(), "DTLS handshake failed");
        self.remove(peer);
    }

    fn remove(&mut self, peer: SocketAddr) {
        let Some(p) = self.peers.remove(&peer) else { return };
        match p.phase {
            Phase::Handshaking { .. } => self.handshakes.release(peer.ip()),
            Phase::Established { session, device, id, .. } => {
                if let Some(cid) = session.cids().ours {
                    self.by_cid.remove(&cid);
                }
                if let Some(device) = device
                    && self.by_device.get(&device) == Some(&peer)
                {
                    self.by_device.remove(&device);
                }
                if self.durable.is_some() {
                    self.changes.push(Change::Ended(id));
                }
            }
        }
    }
}

fn session_cid(p: &Peer) -> Option<Cid> {
    match &p.phase {
        Phase::Established { session, .. } => session.cids().ours,
        Phase::Handshaking { .. } => None,
    }
}

/// The CIDs the handshake on `ssl` agreed: ours if the client offered the extension (the
/// ServerHello then carried ours).
fn negotiated(ssl: &SslRef, slots: &Slots) -> Cids {
    match (ssl.ex_data(slots.client_cid), ssl.ex_data(slots.server_cid)) {
        (Some(theirs), Some(&ours)) => Cids { ours: Some(ours), theirs: theirs.clone() },
        _ => Cids::default(),
    }
}

fn schedule(timers: &mut BinaryHeap<Reverse<(Instant, SocketAddr)>>, p: &mut Peer, peer: SocketAddr, at: Instant) {
    if p.timer.is_none_or(|t| at < t) {
        p.timer = Some(at);
        timers.push(Reverse((at, peer)));
    }
}

/// Moves what OpenSSL wrote for `peer` to `wire`; the highest epoch-0 sequence number in it.
fn drain(peer: SocketAddr, stream: &mut SslStream<Pipe>, wire: &mut Vec<(SocketAddr, Bytes)>) -> Option<u64> {
    let start = wire.len();
    wire.extend(stream.get_mut().take_outbound().map(|d| (peer, Bytes::from(d))));
    wire[start..].iter().filter_map(|(_, d)| last_seq(d, 0)).max()
}

/// What the records of one datagram from a handshaking client hold. A client may pack its
/// ClientKeyExchange, ChangeCipherSpec and Finished into one datagram (mbedTLS, wolfSSL and
/// OpenSSL do; RFC 6347 §4.1.1), so every record counts, not the first.
#[derive(Debug, Default, PartialEq, Eq)]
struct ClientRecords {
    /// A record under the negotiated keys (a later epoch than 0).
    encrypted: bool,
    /// The client's Finished: the only handshake message it sends under the negotiated keys.
    finished: bool,
    /// A ChangeCipherSpec before that Finished.
    change_cipher_spec_first: bool,
    /// A record with a CID: with one negotiated, the Finished comes in one (RFC 9146).
    with_cid: bool,
}

impl ClientRecords {
    fn of(datagram: &[u8], cid_len: usize) -> ClientRecords {
        let mut held = ClientRecords::default();
        let mut change_cipher_spec = false;
        for r in records(datagram, cid_len) {
            held.encrypted |= r.epoch != 0;
            match (r.content_type, r.epoch) {
                (CONTENT_CHANGE_CIPHER_SPEC, 0) => change_cipher_spec = true,
                (CONTENT_HANDSHAKE | CONTENT_TLS12_CID, 1) => {
                    held.finished = true;
                    held.with_cid |= r.content_type == CONTENT_TLS12_CID;
                    held.change_cipher_spec_first |= change_cipher_spec;
                }
                _ => {}
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtls::tests::record;

    use std::sync::Arc;
    use std::time::Duration;

    use openssl::ssl::{ErrorCode, SslStream};

    use crate::dtls::client::ClientConfig;

    use crate::dtls::pipe::Pipe;
    use crate::dtls::psk::{Holder, Keys};
    use crate::dtls::quota::{PrefixLengths, Quotas};
    use crate::identity::Secret;

    /// One device, `pk&dn` with DeviceSecret `secret`.
    struct OneDevice;

    impl Keys for OneDevice {
        fn by_names(&self, pk: &str, dn: &str) -> Option<Holder> {
            ((pk, dn) == ("pk", "dn")).then(|| Holder {
                device: DeviceId(7),
                secret: Secret::new("secret").unwrap(),
                psk_hex: None,
                served: Ok(()),
            })
        }
        fn by_node(&self, _node: &str) -> Option<Holder> {
            None
        }
    }

    const IDLE: Duration = Duration::from_secs(600);
    const HANDSHAKE: Duration = Duration::from_secs(30);

    fn table(per_address: usize) -> PeerTable {
        let ctx = crate::dtls::context::build(Arc::new(OneDevice), "PSK-AES128-CCM8", &[]).unwrap();
        let handshakes = Quotas { total: 100, per_address, per_prefix: 100, prefix: PrefixLengths { v4: 24, v6: 56 } };
        let limits = Limits {
            handshakes,
            max_sessions: 100,
            handshake_timeout: HANDSHAKE,
            idle_timeout: IDLE,
            mtu: 1280,
            cid_len: 6,
        };
        PeerTable::new(ctx, limits, Socket { index: 0, of: 1 }, None)
    }

    /// A device's DTLS client in memory, proving `key` for `pk&dn`.
    fn client(key: &'static [u8]) -> SslStream<Pipe> {
        let psk = Some(("pk&dn", key));
        crate::dtls::client::stream(&ClientConfig { psk, ciphers: "PSK-AES128-CCM8", encrypt_then_mac: true })
    }

    type Delivered = Vec<(Option<DeviceId>, Vec<u8>)>;

    /// Feeds what the client wrote to the table; returns what the table sent back.
    fn to_table(
        t: &mut PeerTable,
        c: &mut SslStream<Pipe>,
        from: SocketAddr,
        now: Instant,
        got: &mut Delivered,
    ) -> Vec<Bytes> {
        let sent: Vec<Vec<u8>> = c.get_mut().take_outbound().collect();
        let mut wire = Vec::new();
        for d in sent {
            t.handle_datagram(now, from, &d, &mut wire, &mut |_, device, plain| got.push((device, plain.to_vec())));
        }
        wire.into_iter()
            .map(|(to, d)| {
                assert_eq!(to, from);
                d
            })
            .collect()
    }

    /// One handshake step of the client: `Ok(true)` once it completed.
    fn step(c: &mut SslStream<Pipe>) -> Result<bool, ErrorCode> {
        match c.connect() {
            Ok(()) => Ok(true),
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(false),
            Err(e) => Err(e.code()),
        }
    }

    /// Runs the client's handshake against the table, datagram by datagram, at `now`: `Ok` once
    /// the client completes it, the client's error otherwise (`WANT_READ`: the table went silent).
    fn handshake(t: &mut PeerTable, c: &mut SslStream<Pipe>, from: SocketAddr, now: Instant) -> Result<(), ErrorCode> {
        let mut got = Vec::new();
        let mut done = step(c)?;
        loop {
            let answers = to_table(t, c, from, now, &mut got);
            if done {
                return Ok(());
            }
            if answers.is_empty() {
                return Err(ErrorCode::WANT_READ);
            }
            for d in answers {
                c.get_mut().put(&d);
                done = step(c)?;
            }
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_psk_session_names_its_device_and_carries_datagrams_both_ways() {
        let (mut t, now, device) = (table(10), Instant::now(), addr("10.0.0.1:40000"));
        let mut c = client(b"secret");
        assert_eq!(handshake(&mut t, &mut c, device, now), Ok(()));
        let stats = t.take_stats();
        assert_eq!((stats.hello_verify_requests, stats.started), (1, 1), "a stateless cookie first");
        assert_eq!(stats.completed.values().sum::<u64>(), 1);
        assert_eq!((t.sessions(), t.handshakes_in_progress()), (1, 0));

        c.ssl_write(b"coap request").unwrap();
        let mut got = Vec::new();
        to_table(&mut t, &mut c, device, now, &mut got);
        assert_eq!(got, [(Some(DeviceId(7)), b"coap request".to_vec())]);

        let mut wire = Vec::new();
        assert!(t.send(device, b"coap answer", &mut wire));
        c.get_mut().put(&wire[0].1);
        let mut buf = [0u8; 64];
        let n = c.ssl_read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"coap answer");
        assert!(!t.send(addr("10.0.0.2:1"), b"nobody", &mut wire), "no session, nothing sent");
    }

    #[test]
    fn a_wrong_key_opens_nothing_and_is_counted() {
        let (mut t, now, device) = (table(10), Instant::now(), addr("10.0.0.1:40000"));
        let mut c = client(b"not the secret");
        assert!(handshake(&mut t, &mut c, device, now).is_err());
        let stats = t.take_stats();
        assert_eq!(stats.failed.get("bad_key"), Some(&1), "{stats:?}");
        assert_eq!((t.sessions(), t.handshakes_in_progress()), (0, 0));
        c.ssl_write(b"x").ok();
        let mut got = Vec::new();
        to_table(&mut t, &mut c, device, now, &mut got);
        assert!(got.is_empty(), "nothing is delivered without a session");
    }

    #[test]
    fn idle_sessions_and_silent_handshakes_end_with_time_alone() {
        let (mut t, now) = (table(10), Instant::now());
        let mut done = client(b"secret");
        assert_eq!(handshake(&mut t, &mut done, addr("10.0.0.1:1"), now), Ok(()));
        // Another device answers the cookie, then goes silent mid-handshake.
        let mut silent = client(b"secret");
        let mut got = Vec::new();
        let _ = silent.connect();
        let verify = to_table(&mut t, &mut silent, addr("10.0.0.2:1"), now, &mut got);
        silent.get_mut().put(&verify[0]);
        let _ = silent.connect();
        to_table(&mut t, &mut silent, addr("10.0.0.2:1"), now, &mut got);
        assert_eq!((t.sessions(), t.handshakes_in_progress()), (1, 1));
        let next = t.poll_timeout().expect("timers run");
        assert!(next <= now + HANDSHAKE);

        let mut wire = Vec::new();
        t.handle_timeout(now + HANDSHAKE + Duration::from_millis(1), &mut wire);
        assert_eq!((t.sessions(), t.handshakes_in_progress()), (1, 0));
        assert_eq!(t.take_stats().failed.get("timeout"), Some(&1));
        t.handle_timeout(now + IDLE + Duration::from_secs(1), &mut wire);
        assert_eq!(t.sessions(), 0);
        assert_eq!(t.take_stats().evicted_idle, 1);
    }

    #[test]
    fn handshakes_from_one_address_are_limited() {
        let (mut t, now) = (table(1), Instant::now());
        let mut got = Vec::new();
        let mut start = |t: &mut PeerTable, from: SocketAddr| {
            let mut c = client(b"secret");
            let _ = c.connect();
            let verify = to_table(t, &mut c, from, now, &mut got);
            c.get_mut().put(&verify[0]);
            let _ = c.connect();
            to_table(t, &mut c, from, now, &mut got)
        };
        assert!(!start(&mut t, addr("10.0.0.1:1")).is_empty(), "the first goes on");
        assert!(start(&mut t, addr("10.0.0.1:2")).is_empty(), "a second from the same address is dropped");
        assert_eq!(t.take_stats().refused.values().sum::<u64>(), 1);
        assert!(!start(&mut t, addr("10.0.9.1:1")).is_empty(), "another address is not held up");
        assert_eq!(t.handshakes_in_progress(), 2);
    }

    #[test]
    fn a_packed_final_flight_holds_its_finished_after_the_change_cipher_spec() {
        let flight = [record(22, 0, 70), record(20, 0, 1), record(22, 1, 40)].concat();
        assert_eq!(
            ClientRecords::of(&flight, 6),
            ClientRecords { encrypted: true, finished: true, change_cipher_spec_first: true, with_cid: false }
        );
    }

    #[test]
    fn records_of_a_flight_sent_apart_or_reordered() {
        let none = ClientRecords::default();
        assert_eq!(ClientRecords::of(&record(22, 0, 70), 6), none, "ClientKeyExchange alone");
        assert_eq!(ClientRecords::of(&record(20, 0, 1), 6), none, "ChangeCipherSpec alone");
        let finished =
            ClientRecords { encrypted: true, finished: true, change_cipher_spec_first: false, with_cid: false };
        assert_eq!(ClientRecords::of(&record(22, 1, 40), 6), finished, "Finished alone");
        let overtaken = [record(22, 1, 40), record(20, 0, 1)].concat();
        assert_eq!(ClientRecords::of(&overtaken, 6), finished, "Finished before its ChangeCipherSpec");
        let data = ClientRecords { encrypted: true, ..none };
        assert_eq!(ClientRecords::of(&[record(20, 0, 1), record(23, 1, 30)].concat(), 6), data, "not a Finished");
        assert_eq!(ClientRecords::of(b"\x16\xfe\xfd", 6), none, "too short for a record");
    }
}

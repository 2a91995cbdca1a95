//! The DTLS peer table of one socket: which addresses have a handshake in progress or an
//! established session, the limits on both, and the timers that end them. It owns no socket:
//! the shell feeds it datagrams and timeouts and sends what it returns (quinn-proto style).
//!
//! A new peer costs nothing until it proves it receives at its address: its ClientHello goes
//! through OpenSSL's stateless cookie exchange on a shared listener, and only a ClientHello
//! carrying a valid cookie gets an entry (SPEC §3.3).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslStream};
use smallvec::SmallVec;

use super::context::Slots;
use super::ffi::{self, Listen, ListenAddr};
use super::pipe::Pipe;
use super::psk::Refusal;
use super::quota::{Handshakes, Quotas};
use super::record::{
    CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_CHANGE_CIPHER_SPEC, CONTENT_HANDSHAKE, Record, Session, last_seq,
    plaintext_alert, server_hello_encrypt_then_mac,
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
    pub failed: HashMap<&'static str, u64>,
    /// Valid ClientHellos dropped because a limit was reached, by limit.
    pub refused: HashMap<&'static str, u64>,
    pub evicted_idle: u64,
    pub closed_by_peer: u64,
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
    },
    /// Our own record layer carries the data; OpenSSL's state is gone.
    Established { session: Session, device: Option<DeviceId>, last_active: Instant },
}

struct Peer {
    phase: Phase,
    /// The earliest time this peer's entry in the timer heap fires.
    timer: Option<Instant>,
}

pub struct PeerTable {
    ctx: SslContext,
    limits: Limits,
    slots: Slots,
    /// Runs the cookie exchange for every address without an entry; handed to the peer once its
    /// cookie verifies.
    listener: Option<SslStream<Pipe>>,
    listen_addr: ListenAddr,
    peers: HashMap<SocketAddr, Peer>,
    handshakes: Handshakes,
    timers: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    stats: Stats,
}

impl PeerTable {
    pub fn new(ctx: SslContext, limits: Limits) -> PeerTable {
        PeerTable {
            ctx,
            limits,
            slots: Slots::get(),
            listener: None,
            listen_addr: ListenAddr::new(),
            peers: HashMap::new(),
            handshakes: Handshakes::new(limits.handshakes),
            timers: BinaryHeap::new(),
            stats: Stats::default(),
        }
    }

    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.stats)
    }

    pub fn handshakes_in_progress(&self) -> usize {
        self.handshakes.in_progress()
    }

    pub fn sessions(&self) -> usize {
        self.peers.len() - self.handshakes.in_progress()
    }

    /// Feeds one datagram from `peer`. Decrypted CoAP datagrams go to `deliver` with the device
    /// the session's PSK identity names; datagrams to send are appended to `wire`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        data: &[u8],
        wire: &mut Vec<(SocketAddr, Bytes)>,
        deliver: &mut impl FnMut(SocketAddr, Option<DeviceId>, &[u8]),
    ) {
        match self.peers.get_mut(&peer) {
            // A ClientHello on an established session: the device restarted and kept its port.
            // Its old session is replaced once the new hello proves the address (RFC 6347 §4.2.8).
            Some(p) if matches!(p.phase, Phase::Established { .. }) && is_client_hello(data) => {
                self.listen(now, peer, data, wire)
            }
            Some(p) => match &mut p.phase {
                Phase::Handshaking { stream, saw_encrypted, .. } => {
                    let held = ClientRecords::of(data);
                    *saw_encrypted |= held.encrypted;
                    // Read under the negotiated keys only after OpenSSL took the client's
                    // ChangeCipherSpec: an earlier one, or one before it in this datagram. A
                    // Finished that overtook its ChangeCipherSpec is buffered, not judged.
                    let judged =
                        held.finished && (held.change_cipher_spec_first || ffi::awaits_client_finished(stream.ssl()));
                    stream.get_mut().put(data);
                    self.handshake(now, peer, wire);
                    if judged {
                        self.refuse_unverified_finished(peer, wire);
                    }
                }
                Phase::Established { .. } => self.receive(now, peer, data, wire, deliver),
            },
            None if is_client_hello(data) => self.listen(now, peer, data, wire),
            None => self.stats.stray += 1,
        }
    }

    /// Encrypts one CoAP datagram for `peer`. Dropped when the session is gone: the device
    /// retransmits its request after a new handshake, and the dedup cache answers it.
    pub fn send(&mut self, peer: SocketAddr, data: &[u8], wire: &mut Vec<(SocketAddr, Bytes)>) -> bool {
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
        self.stats.started += 1;
        let phase = Phase::Handshaking {
            stream: Box::new(listener),
            deadline: now + self.limits.handshake_timeout,
            saw_encrypted: false,
            encrypt_then_mac: false,
            plain_seq: None,
        };
        self.peers.insert(peer, Peer { phase, timer: None });
        self.handshake(now, peer, wire);
    }

    fn new_stream(&self) -> Option<SslStream<Pipe>> {
        let mut ssl = Ssl::new(&self.ctx).ok()?;
        ssl.set_mtu(self.limits.mtu).ok()?;
        SslStream::new(ssl, Pipe::default()).ok()
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
                wire.extend(flight.iter().map(|d| (peer, d.clone())));
                let device = stream.ssl().ex_data(self.slots.device).copied();
                let suite = stream.ssl().current_cipher().map_or("unknown", |c| c.name());
                let Some(session) = Session::from_handshake(stream.ssl(), flight, *encrypt_then_mac) else {
                    // Only suites the record layer implements are offered; this is a bug.
                    tracing::error!(%peer, cipher = ?stream.ssl().current_cipher().map(|c| c.name()), "no record layer for the negotiated suite");
                    self.fail(peer, Failure::Protocol);
                    return;
                };
                p.phase = Phase::Established { session, device, last_active: now };
                self.handshakes.release(peer.ip());
                *self.stats.completed.entry(suite).or_default() += 1;
                schedule(&mut self.timers, p, peer, now + self.limits.idle_timeout);
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

    /// A datagram on an established session: its records, decrypted.
    fn receive(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        data: &[u8],
        wire: &mut Vec<(SocketAddr, Bytes)>,
        deliver: &mut impl FnMut(SocketAddr, Option<DeviceId>, &[u8]),
    ) {
        let Some(Peer { phase: Phase::Established { session, device, last_active }, .. }) = self.peers.get_mut(&peer)
        else {
            return;
        };
        let mut records: SmallVec<[Record; 2]> = SmallVec::new();
        session.open(data, |r| records.push(r));
        let mut end = None;
        for record in records {
            match record {
                Record::Data(plain) => {
                    *last_active = now;
                    deliver(peer, *device, &plain);
                }
                // The client sends its Finished again: our final flight was lost.
                Record::Handshake => wire.extend(session.final_flight().iter().map(|d| (peer, d.clone()))),
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
                    wire.push((peer, d));
                }
                self.stats.closed_by_peer += 1;
                self.remove(peer);
            }
            Some(false) => {
                *self.stats.failed.entry("alert").or_default() += 1;
                self.remove(peer);
            }
            None => {}
        }
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
        if let Some(p) = self.peers.remove(&peer)
            && matches!(p.phase, Phase::Handshaking { .. })
        {
            self.handshakes.release(peer.ip());
        }
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
}

impl ClientRecords {
    fn of(datagram: &[u8]) -> ClientRecords {
        let mut held = ClientRecords::default();
        let mut change_cipher_spec = false;
        for r in records(datagram) {
            held.encrypted |= r.epoch != 0;
            match (r.content_type, r.epoch) {
                (CONTENT_CHANGE_CIPHER_SPEC, 0) => change_cipher_spec = true,
                (CONTENT_HANDSHAKE, 1) => {
                    held.finished = true;
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
        let limits =
            Limits { handshakes, max_sessions: 100, handshake_timeout: HANDSHAKE, idle_timeout: IDLE, mtu: 1280 };
        PeerTable::new(ctx, limits)
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
            ClientRecords::of(&flight),
            ClientRecords { encrypted: true, finished: true, change_cipher_spec_first: true }
        );
    }

    #[test]
    fn records_of_a_flight_sent_apart_or_reordered() {
        let none = ClientRecords::default();
        assert_eq!(ClientRecords::of(&record(22, 0, 70)), none, "ClientKeyExchange alone");
        assert_eq!(ClientRecords::of(&record(20, 0, 1)), none, "ChangeCipherSpec alone");
        let finished = ClientRecords { encrypted: true, finished: true, change_cipher_spec_first: false };
        assert_eq!(ClientRecords::of(&record(22, 1, 40)), finished, "Finished alone");
        let overtaken = [record(22, 1, 40), record(20, 0, 1)].concat();
        assert_eq!(ClientRecords::of(&overtaken), finished, "Finished before its ChangeCipherSpec");
        let data = ClientRecords { encrypted: true, ..none };
        assert_eq!(ClientRecords::of(&[record(20, 0, 1), record(23, 1, 30)].concat()), data, "not a Finished");
        assert_eq!(ClientRecords::of(b"\x16\xfe\xfd"), none, "too short for a record");
    }
}

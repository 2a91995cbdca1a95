//! CoAP over DTLS (5684): the peer table between the socket and the CoAP endpoint, and the
//! store's side of durable sessions (what the tables' changes write, what a start reads back).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::clock::Now;
use crate::coap::endpoint::{Actions, Endpoint, Transmit};
use crate::coap::resource::Resources;
use crate::dtls::durable::{self, Change, Pool, Restored, SessionId, SharedPool};
use crate::dtls::peers::PeerTable;
use crate::dtls::psk::{self, Holder};
use crate::registry::{Device, Registry};
use crate::store::{CF_DTLS_SESSIONS, Completion, Job, Op, Ops, Store, StoreError, Writer};
use crate::telemetry::metric;
use crate::transport::link::{Datagram, Link, Wire};

/// PSK identities name the registry's devices.
impl crate::dtls::psk::Keys for Registry {
    fn by_names(&self, product_key: &str, device_name: &str) -> Option<Holder> {
        self.device(product_key, device_name).map(|d| holder(&d))
    }

    fn by_node(&self, node: &str) -> Option<Holder> {
        self.device_by_node(node).map(|d| holder(&d))
    }
}

fn holder(device: &Device) -> Holder {
    let served = {
        let s = device.state();
        if !s.enabled {
            Err(psk::Refusal::Disabled)
        } else if !s.home.is_here() {
            Err(psk::Refusal::Moved)
        } else {
            Ok(())
        }
    };
    Holder { device: device.id, secret: device.secret.clone(), psk_hex: device.psk_hex.clone(), served }
}

pub struct Dtls {
    peers: PeerTable,
    /// Datagrams longer than the receive buffer: no DTLS record of ours is that long.
    oversized: u64,
    /// Responses for peers whose session ended before the answer was ready.
    unsent: u64,
    /// Gauge values last exported (sessions, handshakes, sessions with CID); sockets of a port
    /// add their deltas to one gauge.
    exported: [usize; 3],
}

impl Dtls {
    pub fn new(peers: PeerTable) -> Dtls {
        Dtls { peers, oversized: 0, unsent: 0, exported: [0; 3] }
    }
}

impl Link for Dtls {
    fn receive<R: Resources>(
        &mut self,
        now: Now,
        datagram: Datagram<'_>,
        endpoint: &mut Endpoint<R>,
        actions: &mut Actions<R::Writes>,
        wire: &mut Wire,
    ) {
        if datagram.truncated {
            self.oversized += 1;
            return;
        }
        self.peers.handle_datagram(now.instant, datagram.peer, datagram.data, wire, &mut |peer, device, plain| {
            endpoint.handle_datagram(now, peer, device, plain, actions)
        });
    }

    fn seal(&mut self, transmits: impl Iterator<Item = Transmit>, wire: &mut Wire) {
        for t in transmits {
            if !self.peers.send(t.peer, &t.data, wire) {
                self.unsent += 1;
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.peers.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant, wire: &mut Wire) {
        self.peers.handle_timeout(now, wire);
    }

    fn take_writes(&mut self) -> Ops {
        let changes = self.peers.take_changes();
        if changes.is_empty() {
            return Ops::new();
        }
        let now = Now::read();
        // A session's later state replaces its earlier ones of the same turn: one write per
        // session per turn, however many of its records the turn read.
        let mut later = HashSet::new();
        let mut kept: Vec<Change> = changes
            .into_iter()
            .rev()
            .filter(|c| !matches!(c, Change::State { id, .. } if !later.insert(*id)))
            .collect();
        kept.reverse();
        kept.into_iter().flat_map(|c| ops(c, (now.instant, now.wall))).collect()
    }

    fn export_stats(&mut self, port: &'static str) {
        let s = self.peers.take_stats();
        metrics::counter!(metric::DTLS_HANDSHAKES_WITH_CID, "port" => port).increment(s.completed_with_cid);
        metrics::counter!(metric::DTLS_ADDRESS_MOVES, "port" => port).increment(s.address_moves);
        metrics::counter!(metric::DTLS_REPLACED, "port" => port).increment(s.replaced);
        metrics::counter!(metric::DTLS_RESUMED, "port" => port).increment(s.resumed);
        metrics::counter!(metric::DTLS_HELLO_VERIFY, "port" => port).increment(s.hello_verify_requests);
        metrics::counter!(metric::DTLS_HANDSHAKES_STARTED, "port" => port).increment(s.started);
        for (suite, n) in s.completed {
            metrics::counter!(metric::DTLS_HANDSHAKES_COMPLETED, "port" => port, "suite" => suite).increment(n);
        }
        for (reason, n) in s.failed {
            metrics::counter!(metric::DTLS_HANDSHAKES_FAILED, "port" => port, "reason" => reason).increment(n);
        }
        for (limit, n) in s.refused {
            metrics::counter!(metric::DTLS_REFUSED, "port" => port, "limit" => limit).increment(n);
        }
        metrics::counter!(metric::DTLS_EVICTIONS, "port" => port, "reason" => "idle").increment(s.evicted_idle);
        metrics::counter!(metric::DTLS_CLOSED, "port" => port).increment(s.closed_by_peer);
        metrics::counter!(metric::DTLS_STRAY, "port" => port).increment(s.stray + std::mem::take(&mut self.oversized));
        metrics::counter!(metric::DTLS_UNSENT, "port" => port).increment(std::mem::take(&mut self.unsent));
        let now = [self.peers.sessions(), self.peers.handshakes_in_progress(), self.peers.sessions_with_cid()];
        let before = std::mem::replace(&mut self.exported, now);
        let delta = |i: usize| now[i] as f64 - before[i] as f64;
        metrics::gauge!(metric::DTLS_SESSIONS, "port" => port).increment(delta(0));
        metrics::gauge!(metric::DTLS_HANDSHAKES_IN_PROGRESS, "port" => port).increment(delta(1));
        metrics::gauge!(metric::DTLS_SESSIONS_WITH_CID, "port" => port).increment(delta(2));
    }
}

/// The writes for one change of a peer table; `now` is one moment on both clocks.
fn ops(change: Change, now: (Instant, crate::clock::UnixMs)) -> Ops {
    let put = |key: [u8; 9], value| Op::Put { cf: CF_DTLS_SESSIONS, key: key.to_vec(), value };
    match change {
        Change::Established { id, session, state } => {
            [put(id.keys_key(), session.encode()), put(id.state_key(), state.encode(now))].into_iter().collect()
        }
        Change::State { id, state } => [put(id.state_key(), state.encode(now))].into_iter().collect(),
        Change::Ended(id) => ended(id),
    }
}

fn ended(id: SessionId) -> Ops {
    [id.keys_key(), id.state_key()].into_iter().map(|k| Op::Delete { cf: CF_DTLS_SESSIONS, key: k.to_vec() }).collect()
}

/// The sessions the store holds, read back into a pool for the port's tables; sessions idle
/// longer than `idle_timeout` and those that cannot be read are deleted (and counted by reason).
pub fn restore(store: &Store, writer: &Writer, idle_timeout: Duration) -> Result<SharedPool, StoreError> {
    let started = Instant::now();
    let now = Now::read();
    let now = (now.instant, now.wall);
    // Each session's keys and state records, as read.
    let mut halves: HashMap<u64, [Option<Vec<u8>>; 2]> = HashMap::new();
    store.scan(CF_DTLS_SESSIONS, |k, v| {
        if let Some((id, kind)) = k.split_first_chunk::<8>() {
            let entry = halves.entry(u64::from_be_bytes(*id)).or_default();
            match kind {
                [b'k'] => entry[0] = Some(v.to_vec()),
                _ => entry[1] = Some(v.to_vec()),
            }
        }
        Ok(())
    })?;
    let mut pool = Pool::default();
    let mut failures: HashMap<&'static str, u64> = HashMap::new();
    let mut dropped = Ops::new();
    for (id, halves) in halves {
        let id = SessionId(id);
        let restored = match halves {
            [Some(k), Some(s)] => durable::Established::decode(&k)
                .and_then(|session| Ok(Restored { id, session, state: durable::State::decode(&s, now)? })),
            _ => Err("half written"),
        };
        let reason = match restored {
            Ok(r) if now.0.saturating_duration_since(r.state.last_active) >= idle_timeout => "idle",
            Ok(r) => match pool.insert(r) {
                // Two sessions stored at one address: the later handshake replaced the other.
                Some(displaced) => {
                    dropped.extend(ended(displaced.id));
                    continue;
                }
                None => continue,
            },
            Err(reason) => {
                tracing::warn!(session = id.0, reason, "a stored DTLS session cannot be restored; it is dropped");
                reason
            }
        };
        *failures.entry(reason).or_default() += 1;
        dropped.extend(ended(id));
    }
    for (reason, n) in failures {
        metrics::counter!(metric::DTLS_RESTORE_FAILURES, "reason" => reason).increment(n);
    }
    metrics::counter!(metric::DTLS_RESTORED).increment(pool.len() as u64);
    metrics::gauge!(metric::DTLS_RESTORED_WAITING).set(pool.len() as f64);
    tracing::info!(sessions = pool.len(), ms = started.elapsed().as_millis() as u64, "DTLS sessions restored");
    if !dropped.is_empty() {
        writer.submit(Job { ops: dropped, completion: Completion::Detached });
    }
    Ok(std::sync::Arc::new(std::sync::Mutex::new(pool)))
}

/// Ends restored sessions no device took up within the idle timeout, as the tables end theirs.
pub async fn sweep_restored(
    pool: SharedPool,
    writer: Writer,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut interval = tokio::time::interval(Duration::from_secs(60).min(idle_timeout));
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = interval.tick() => {}
        }
        let (gone, waiting) = {
            let mut p = durable::lock(&pool);
            let idle_since = Instant::now().checked_sub(idle_timeout);
            (idle_since.map(|t| p.expire(t)).unwrap_or_default(), p.len())
        };
        metrics::gauge!(metric::DTLS_RESTORED_WAITING).set(waiting as f64);
        metrics::counter!(metric::DTLS_EVICTIONS, "port" => "dtls", "reason" => "idle").increment(gone.len() as u64);
        if !gone.is_empty() {
            writer.submit(Job { ops: gone.into_iter().flat_map(ended).collect(), completion: Completion::Detached });
        }
    }
}

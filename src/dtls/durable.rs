//! Established sessions kept in the store, so that a device's next record after a crash and
//! restart is read with no new handshake. Each session is two records under its random id:
//! its keys (written once, sealed with `store.secrets_key` when set) and its state (address,
//! replay window, reserved write sequence numbers, last activity), rewritten as it changes.
//!
//! Sequence numbers are reserved [`RESERVE`] at a time: the state names the first number not yet
//! reserved, a restored session sends from there, and a new reservation is queued for writing
//! before a record past the middle of the current one is sent. So no record is written per
//! record sent, and none sent before a crash is sent again with the same number.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::cid::Cid;
use super::record::{Cids, Keys, ReplayPosition};
use crate::clock::UnixMs;
use crate::identity::DeviceId;
use crate::store::sealed;

/// Write sequence numbers reserved by one state write.
pub const RESERVE: u64 = 1024;

const KEYS: u8 = b'k';
const STATE: u8 = b's';
const VERSION: u8 = 1;

/// A session's id in the store: random, so it says nothing about the device or its CID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

impl SessionId {
    pub fn random() -> SessionId {
        SessionId(rand::random())
    }

    pub fn keys_key(self) -> [u8; 9] {
        key(self, KEYS)
    }

    pub fn state_key(self) -> [u8; 9] {
        key(self, STATE)
    }
}

fn key(id: SessionId, kind: u8) -> [u8; 9] {
    let mut k = [0; 9];
    k[..8].copy_from_slice(&id.0.to_be_bytes());
    k[8] = kind;
    k
}

/// What a session was established with: never changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    pub keys: Keys,
    pub cids: Cids,
    pub device: Option<DeviceId>,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub address: SocketAddr,
    /// The first write sequence number not reserved.
    pub reserved: u64,
    pub replay: ReplayPosition,
    pub last_active: Instant,
}

/// What the peer table asks the store to do.
#[derive(Debug)]
pub enum Change {
    Established { id: SessionId, session: Box<Established>, state: State },
    State { id: SessionId, state: State },
    Ended(SessionId),
}

impl Established {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        out.extend_from_slice(&self.keys.suite);
        out.push(self.keys.encrypt_then_mac as u8);
        put_bytes(&mut out, &self.keys.block);
        put_bytes(&mut out, self.cids.ours.as_ref().map_or(&[][..], Cid::as_bytes));
        put_bytes(&mut out, &self.cids.theirs);
        out.extend_from_slice(&self.device.map_or(u64::MAX, |d| d.0).to_be_bytes());
        sealed::seal_bytes(&out)
    }

    pub fn decode(stored: &[u8]) -> Result<Established, &'static str> {
        let plain = sealed::open_bytes(stored)?;
        let mut r = Reader(&plain);
        if r.take(1)? != [VERSION] {
            return Err("unknown version");
        }
        let suite = r.take(2)?.try_into().map_err(|_| "short")?;
        let encrypt_then_mac = r.take(1)? == [1];
        let block = r.bytes()?.to_vec();
        let ours = r.bytes()?;
        let ours = if ours.is_empty() { None } else { Some(Cid::new(ours).ok_or("CID too long")?) };
        let theirs = r.bytes()?.into();
        let device = r.u64()?;
        let device = (device != u64::MAX).then_some(DeviceId(device));
        Ok(Established { keys: Keys { suite, encrypt_then_mac, block }, cids: Cids { ours, theirs }, device })
    }
}

impl State {
    /// `last_active` as wall time: `now` is the same moment on both clocks.
    pub fn encode(&self, now: (Instant, UnixMs)) -> Vec<u8> {
        let ago = now.0.saturating_duration_since(self.last_active).as_millis() as u64;
        let mut out = vec![VERSION];
        out.extend_from_slice(&self.reserved.to_be_bytes());
        out.extend_from_slice(&self.replay.next.to_be_bytes());
        out.extend_from_slice(&self.replay.seen.to_be_bytes());
        out.extend_from_slice(&now.1.0.saturating_sub(ago).to_be_bytes());
        match self.address.ip() {
            IpAddr::V4(ip) => put_bytes(&mut out, &ip.octets()),
            IpAddr::V6(ip) => put_bytes(&mut out, &ip.octets()),
        }
        out.extend_from_slice(&self.address.port().to_be_bytes());
        out
    }

    pub fn decode(stored: &[u8], now: (Instant, UnixMs)) -> Result<State, &'static str> {
        let mut r = Reader(stored);
        if r.take(1)? != [VERSION] {
            return Err("unknown version");
        }
        let reserved = r.u64()?;
        let replay = ReplayPosition { next: r.u64()?, seen: r.u64()? };
        let wall = r.u64()?;
        let ip: IpAddr = match r.bytes()? {
            b if b.len() == 4 => <[u8; 4]>::try_from(b).map_err(|_| "address")?.into(),
            b if b.len() == 16 => <[u8; 16]>::try_from(b).map_err(|_| "address")?.into(),
            _ => return Err("address"),
        };
        let port = u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| "short")?);
        let ago = std::time::Duration::from_millis(now.1.0.saturating_sub(wall));
        let last_active = now.0.checked_sub(ago).unwrap_or(now.0);
        Ok(State { address: SocketAddr::new(ip, port), reserved, replay, last_active })
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("cut short");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.take(1)?[0] as usize;
        self.take(n)
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| "short")?))
    }
}

/// A session read back from the store, not yet claimed by a peer table.
#[derive(Debug)]
pub struct Restored {
    pub id: SessionId,
    pub session: Established,
    pub state: State,
}

/// The sessions restored at start that no datagram has claimed yet, shared by the port's peer
/// tables: which socket a peer's datagrams reach is the kernel's choice, so the first table
/// that hears from a session's address (or its CID) takes it.
#[derive(Debug, Default)]
pub struct Pool {
    by_address: HashMap<SocketAddr, Restored>,
    by_cid: HashMap<Cid, SocketAddr>,
}

pub type SharedPool = Arc<Mutex<Pool>>;

/// The pool, also after a thread panicked holding it: its maps stay consistent between calls.
pub fn lock(pool: &SharedPool) -> std::sync::MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn insert(&mut self, restored: Restored) -> Option<Restored> {
        if let Some(cid) = restored.session.cids.ours {
            self.by_cid.insert(cid, restored.state.address);
        }
        let displaced = self.by_address.insert(restored.state.address, restored)?;
        if let Some(cid) = displaced.session.cids.ours {
            self.by_cid.remove(&cid);
        }
        Some(displaced)
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }

    pub fn holds_cid(&self, cid: &Cid) -> bool {
        self.by_cid.contains_key(cid)
    }

    pub fn claim_address(&mut self, address: SocketAddr) -> Option<Restored> {
        let r = self.by_address.remove(&address)?;
        if let Some(cid) = r.session.cids.ours {
            self.by_cid.remove(&cid);
        }
        Some(r)
    }

    pub fn claim_cid(&mut self, cid: &Cid) -> Option<Restored> {
        let address = self.by_cid.remove(cid)?;
        self.by_address.remove(&address)
    }

    /// Removes the sessions idle since before `idle_since`; their ids.
    pub fn expire(&mut self, idle_since: Instant) -> Vec<SessionId> {
        let mut gone = Vec::new();
        self.by_address.retain(|_, r| {
            let keep = r.state.last_active >= idle_since;
            if !keep {
                gone.push(r.id);
                if let Some(cid) = r.session.cids.ours {
                    self.by_cid.remove(&cid);
                }
            }
            keep
        });
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let session = Established {
            keys: Keys { suite: [0xc0, 0xa8], encrypt_then_mac: false, block: (0..40).collect() },
            cids: Cids { ours: Cid::new(&[1, 2, 3, 4, 5, 6]), theirs: Box::new([0xc1, 0x1d]) },
            device: Some(DeviceId(42)),
        };
        assert_eq!(Established::decode(&session.encode()), Ok(session.clone()));
        let without = Established { cids: Cids::default(), device: None, ..session };
        assert_eq!(Established::decode(&without.encode()), Ok(without));

        let now = (Instant::now(), UnixMs(1_800_000_000_000));
        for address in ["192.0.2.1:5684", "[2001:db8::1]:40000"] {
            let state = State {
                address: address.parse().unwrap(),
                reserved: 2048,
                replay: ReplayPosition { next: 17, seen: 0b1011 },
                last_active: now.0 - std::time::Duration::from_secs(30),
            };
            let back = State::decode(&state.encode(now), now).unwrap();
            assert_eq!((back.address, back.reserved, back.replay), (state.address, 2048, state.replay));
            assert_eq!(now.0 - back.last_active, std::time::Duration::from_secs(30));
        }
        assert!(State::decode(&[1, 0, 0], now).is_err(), "cut short");
        assert!(Established::decode(&[0, 9]).is_err(), "unknown version");
        assert!(Established::decode(&[7]).is_err(), "neither plain nor sealed");
    }

    #[test]
    fn the_pool_is_claimed_once_by_address_or_cid() {
        let now = Instant::now();
        let restored = |port: u16, cid: Option<Cid>, idle_s: u64| Restored {
            id: SessionId(port as u64),
            session: Established {
                keys: Keys { suite: [0, 0xa8], encrypt_then_mac: false, block: vec![] },
                cids: Cids { ours: cid, theirs: Box::new([]) },
                device: None,
            },
            state: State {
                address: SocketAddr::from(([10, 0, 0, 1], port)),
                reserved: 0,
                replay: ReplayPosition::default(),
                last_active: now - std::time::Duration::from_secs(idle_s),
            },
        };
        let cid = Cid::new(&[9; 6]).unwrap();
        let mut pool = Pool::default();
        pool.insert(restored(1, None, 0));
        pool.insert(restored(2, Some(cid), 0));
        pool.insert(restored(3, None, 100));
        assert!(pool.holds_cid(&cid));
        assert_eq!(pool.expire(now - std::time::Duration::from_secs(50)), [SessionId(3)]);
        assert_eq!(pool.claim_cid(&cid).map(|r| r.id), Some(SessionId(2)));
        assert!(pool.claim_cid(&cid).is_none() && !pool.holds_cid(&cid));
        assert!(pool.claim_address(SocketAddr::from(([10, 0, 0, 1], 2))).is_none(), "claimed by its CID");
        assert_eq!(pool.claim_address(SocketAddr::from(([10, 0, 0, 1], 1))).map(|r| r.id), Some(SessionId(1)));
        assert!(pool.is_empty());
    }
}

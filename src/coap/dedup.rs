//! Message deduplication (RFC 7252 §4.5): a request seen again from the same peer with the same
//! message id within EXCHANGE_LIFETIME is not processed again; it gets the response already sent,
//! or nothing while that response is still waiting for its write to be durable.

use std::collections::hash_map;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Processing; the response is not known yet.
    Pending,
    /// The response that was sent.
    Answered(Bytes),
}

type Key = (SocketAddr, u16);

struct Entry {
    at: Instant,
    /// Hash of the request's bytes: a retransmission is byte-identical; anything else reusing
    /// the message id (a confused peer, or someone spoofing its address to make the server
    /// resend a larger response) is ignored.
    fingerprint: u64,
    seen: Seen,
}

/// What a request seen again gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Duplicate<'a> {
    /// Send this again.
    Resend(&'a Bytes),
    /// Say nothing: the answer is not ready, or the "retransmission" differs from the original.
    Ignore,
}

pub struct DedupCache {
    /// foldhash: several times cheaper than SipHash here, and still seeded per process so a
    /// sender cannot choose colliding addresses.
    map: HashMap<Key, Entry, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
    /// Insertion order; entries expire in this order because the lifetime is constant.
    order: VecDeque<(Instant, Key)>,
    capacity: usize,
    lifetime: Duration,
    evictions: u64,
}

impl DedupCache {
    pub fn new(capacity: usize, lifetime: Duration) -> DedupCache {
        DedupCache {
            map: HashMap::default(),
            hasher: foldhash::fast::RandomState::default(),
            order: VecDeque::new(),
            capacity,
            lifetime,
            evictions: 0,
        }
    }

    fn fingerprint(&self, request: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(request)
    }

    /// `None` if `request` from `peer` is new.
    pub fn get(&self, peer: SocketAddr, mid: u16, request: &[u8], now: Instant) -> Option<Duplicate<'_>> {
        let e = self.map.get(&(peer, mid)).filter(|e| now.duration_since(e.at) < self.lifetime)?;
        Some(match &e.seen {
            Seen::Answered(bytes) if e.fingerprint == self.fingerprint(request) => Duplicate::Resend(bytes),
            _ => Duplicate::Ignore,
        })
    }

    /// Records a new exchange. At capacity the oldest answered one is forgotten (a retransmission
    /// of it would then be processed again): memory stays bounded whatever the request rate.
    /// Exchanges still waiting for their write are never forgotten, so a retransmission arriving
    /// meanwhile can never be processed twice; their number is bounded by the pending-write limit.
    pub fn insert(&mut self, peer: SocketAddr, mid: u16, request: &[u8], seen: Seen, now: Instant) {
        let mut budget = self.order.len();
        while self.map.len() >= self.capacity && budget > 0 {
            budget -= 1;
            let Some((at, key)) = self.order.pop_front() else { break };
            // One probe per eviction: the map is large and each probe a likely cache miss.
            if let hash_map::Entry::Occupied(e) = self.map.entry(key)
                && e.get().at == at
            {
                if e.get().seen == Seen::Pending {
                    self.order.push_back((at, key));
                } else {
                    e.remove();
                    self.evictions += 1;
                }
            }
        }
        let fingerprint = self.fingerprint(request);
        self.map.insert((peer, mid), Entry { at: now, fingerprint, seen });
        self.order.push_back((now, (peer, mid)));
    }

    /// Fills in the response of a pending exchange.
    pub fn answer(&mut self, peer: SocketAddr, mid: u16, response: Bytes) {
        if let Some(e) = self.map.get_mut(&(peer, mid)) {
            e.seen = Seen::Answered(response);
        }
    }

    pub fn expire(&mut self, now: Instant) {
        while let Some((at, key)) = self.order.front().copied() {
            if now.duration_since(at) < self.lifetime {
                break;
            }
            self.order.pop_front();
            if let hash_map::Entry::Occupied(e) = self.map.entry(key)
                && e.get().at == at
            {
                e.remove();
            }
        }
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.order.front().map(|(at, _)| *at + self.lifetime)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn take_evictions(&mut self) -> u64 {
        std::mem::take(&mut self.evictions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn remembers_within_lifetime_then_forgets() {
        let t0 = Instant::now();
        let mut c = DedupCache::new(10, Duration::from_secs(247));
        c.insert(peer(1), 7, b"req", Seen::Pending, t0);
        assert_eq!(c.get(peer(1), 7, b"req", t0), Some(Duplicate::Ignore));
        assert_eq!(c.get(peer(2), 7, b"req", t0), None);
        c.answer(peer(1), 7, Bytes::from_static(b"r"));
        let r = Bytes::from_static(b"r");
        assert_eq!(c.get(peer(1), 7, b"req", t0 + Duration::from_secs(246)), Some(Duplicate::Resend(&r)));
        // same id, different bytes: not a retransmission, nothing is resent
        assert_eq!(c.get(peer(1), 7, b"other", t0), Some(Duplicate::Ignore));
        assert_eq!(c.next_expiry(), Some(t0 + Duration::from_secs(247)));
        c.expire(t0 + Duration::from_secs(247));
        assert!(c.is_empty());
    }

    #[test]
    fn capacity_evicts_the_oldest_answered_never_the_pending() {
        let t0 = Instant::now();
        let mut c = DedupCache::new(2, Duration::from_secs(247));
        c.insert(peer(1), 1, b"a", Seen::Pending, t0);
        c.insert(peer(1), 2, b"b", Seen::Answered(Bytes::new()), t0);
        c.insert(peer(1), 3, b"c", Seen::Pending, t0);
        assert_eq!(c.len(), 2);
        assert!(c.get(peer(1), 1, b"a", t0).is_some(), "pending exchange kept");
        assert!(c.get(peer(1), 2, b"b", t0).is_none());
        assert_eq!(c.take_evictions(), 1);
        // all pending: the cache grows past capacity rather than forget one
        c.insert(peer(1), 4, b"d", Seen::Pending, t0);
        assert_eq!(c.len(), 3);
    }
}

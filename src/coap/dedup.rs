//! Message deduplication (RFC 7252 §4.5): a request seen again from the same peer with the same
//! message id within EXCHANGE_LIFETIME is not processed again; it gets the response already sent,
//! or nothing while that response is still waiting for its write to be durable.

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

pub struct DedupCache {
    /// foldhash: several times cheaper than SipHash here, and still seeded per process so a
    /// sender cannot choose colliding addresses.
    map: HashMap<Key, (Instant, Seen), foldhash::fast::RandomState>,
    /// Insertion order; entries expire in this order because the lifetime is constant.
    order: VecDeque<(Instant, Key)>,
    capacity: usize,
    lifetime: Duration,
    evictions: u64,
}

impl DedupCache {
    pub fn new(capacity: usize, lifetime: Duration) -> DedupCache {
        DedupCache { map: HashMap::default(), order: VecDeque::new(), capacity, lifetime, evictions: 0 }
    }

    pub fn get(&self, peer: SocketAddr, mid: u16, now: Instant) -> Option<&Seen> {
        self.map.get(&(peer, mid)).filter(|(at, _)| now.duration_since(*at) < self.lifetime).map(|(_, s)| s)
    }

    /// Records a new exchange. At capacity the oldest is forgotten (a retransmission of it would
    /// then be processed again): memory stays bounded whatever the request rate.
    pub fn insert(&mut self, peer: SocketAddr, mid: u16, seen: Seen, now: Instant) {
        while self.map.len() >= self.capacity {
            let Some((at, key)) = self.order.pop_front() else { break };
            if self.map.get(&key).is_some_and(|(t, _)| *t == at) {
                self.map.remove(&key);
                self.evictions += 1;
            }
        }
        self.map.insert((peer, mid), (now, seen));
        self.order.push_back((now, (peer, mid)));
    }

    /// Fills in the response of a pending exchange (no-op if it was evicted meanwhile).
    pub fn answer(&mut self, peer: SocketAddr, mid: u16, response: Bytes) {
        if let Some((_, seen)) = self.map.get_mut(&(peer, mid)) {
            *seen = Seen::Answered(response);
        }
    }

    pub fn expire(&mut self, now: Instant) {
        while let Some((at, key)) = self.order.front().copied() {
            if now.duration_since(at) < self.lifetime {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|(t, _)| *t == at) {
                self.map.remove(&key);
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
        c.insert(peer(1), 7, Seen::Pending, t0);
        assert_eq!(c.get(peer(1), 7, t0), Some(&Seen::Pending));
        assert_eq!(c.get(peer(2), 7, t0), None);
        c.answer(peer(1), 7, Bytes::from_static(b"r"));
        assert_eq!(c.get(peer(1), 7, t0 + Duration::from_secs(246)), Some(&Seen::Answered(Bytes::from_static(b"r"))));
        assert_eq!(c.next_expiry(), Some(t0 + Duration::from_secs(247)));
        c.expire(t0 + Duration::from_secs(247));
        assert!(c.is_empty());
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let t0 = Instant::now();
        let mut c = DedupCache::new(2, Duration::from_secs(247));
        c.insert(peer(1), 1, Seen::Pending, t0);
        c.insert(peer(1), 2, Seen::Pending, t0);
        c.insert(peer(1), 3, Seen::Pending, t0);
        assert_eq!(c.len(), 2);
        assert!(c.get(peer(1), 1, t0).is_none());
        assert!(c.get(peer(1), 3, t0).is_some());
        assert_eq!(c.take_evictions(), 1);
    }
}

//! The handshake slots of one peer table and who holds them: a bound on all handshakes in
//! progress, and quotas per source address and per source prefix within it, so that a flood of
//! cookie-verified handshakes from one address (many ports) or one network (many addresses)
//! cannot take every slot and keep other devices out.
//!
//! The cookie exchange has already proved that each source receives at its address, so these
//! counts are of real senders; the quotas only decide how much of the table one place may hold.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::net::Cidr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Handshakes in progress in the table.
    pub total: usize,
    /// Of those, from one source address. A carrier NAT puts many devices behind one address,
    /// so this must allow a reconnect storm of a whole cell, not one device's worth.
    pub per_address: usize,
    /// Of those, from one prefix (see [`PrefixLengths`]).
    pub per_prefix: usize,
    pub prefix: PrefixLengths,
}

/// How many leading bits of a source address name its network: a carrier NAT pool or one
/// customer's IPv6 allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLengths {
    pub v4: u8,
    pub v6: u8,
}

impl PrefixLengths {
    fn of(self, ip: IpAddr) -> Cidr {
        Cidr::of(ip, self.v4, self.v6)
    }
}

/// Which bound refused a handshake; the label of `nbhub_dtls_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Handshakes,
    PerAddress,
    PerPrefix,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Handshakes => "handshakes",
            Limit::PerAddress => "per_address",
            Limit::PerPrefix => "per_prefix",
        }
    }
}

/// Handshakes in progress, in all and by source.
pub struct Handshakes {
    quotas: Quotas,
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    by_prefix: HashMap<Cidr, usize>,
}

impl Handshakes {
    pub fn new(quotas: Quotas) -> Handshakes {
        Handshakes { quotas, total: 0, by_address: HashMap::new(), by_prefix: HashMap::new() }
    }

    pub fn in_progress(&self) -> usize {
        self.total
    }

    /// Takes a slot for a handshake from `ip`, unless a bound is reached.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Limit> {
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d; its quota is its IPv4's.
        let ip = ip.to_canonical();
        let prefix = self.quotas.prefix.of(ip);
        if self.total >= self.quotas.total {
            return Err(Limit::Handshakes);
        }
        if self.by_address.get(&ip).copied().unwrap_or(0) >= self.quotas.per_address {
            return Err(Limit::PerAddress);
        }
        if self.by_prefix.get(&prefix).copied().unwrap_or(0) >= self.quotas.per_prefix {
            return Err(Limit::PerPrefix);
        }
        self.total += 1;
        *self.by_address.entry(ip).or_default() += 1;
        *self.by_prefix.entry(prefix).or_default() += 1;
        Ok(())
    }

    /// Gives back the slot of a handshake from `ip` that completed or ended.
    pub fn release(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let prefix = self.quotas.prefix.of(ip);
        self.total = self.total.saturating_sub(1);
        decrement(&mut self.by_address, ip);
        decrement(&mut self.by_prefix, prefix);
    }
}

/// Counts at zero are removed, so the maps hold only sources with a handshake in progress.
fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshakes(total: usize, per_address: usize, per_prefix: usize) -> Handshakes {
        Handshakes::new(Quotas { total, per_address, per_prefix, prefix: PrefixLengths { v4: 24, v6: 56 } })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_and_one_prefix_hold_only_their_quota() {
        let mut h = handshakes(10, 2, 3);
        assert_eq!(h.admit(ip("192.0.2.1")), Ok(()));
        assert_eq!(h.admit(ip("192.0.2.1")), Ok(()));
        assert_eq!(h.admit(ip("192.0.2.1")), Err(Limit::PerAddress));
        assert_eq!(h.admit(ip("192.0.2.200")), Ok(()));
        assert_eq!(h.admit(ip("192.0.2.201")), Err(Limit::PerPrefix), "the /24 is full");
        // Another /24, and a dual-stack socket's mapped form of the first address.
        assert_eq!(h.admit(ip("192.0.3.1")), Ok(()));
        assert_eq!(h.admit(ip("::ffff:192.0.2.1")), Err(Limit::PerAddress));
        h.release(ip("::ffff:192.0.2.1"));
        assert_eq!(h.admit(ip("192.0.2.1")), Ok(()), "a released slot is free again");
        assert_eq!(h.in_progress(), 4);
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_prefix() {
        let mut h = handshakes(10, 1, 2);
        assert_eq!(h.admit(ip("2001:db8:0:100::1")), Ok(()));
        assert_eq!(h.admit(ip("2001:db8:0:1ff::2")), Ok(()), "same /56");
        assert_eq!(h.admit(ip("2001:db8:0:1ff::3")), Err(Limit::PerPrefix));
        assert_eq!(h.admit(ip("2001:db8:0:200::1")), Ok(()), "the next /56");
    }

    #[test]
    fn the_table_bound_comes_first_and_released_counts_vanish() {
        let mut h = handshakes(2, 5, 5);
        assert_eq!(h.admit(ip("10.0.0.1")), Ok(()));
        assert_eq!(h.admit(ip("10.1.0.1")), Ok(()));
        assert_eq!(h.admit(ip("10.2.0.1")), Err(Limit::Handshakes));
        h.release(ip("10.0.0.1"));
        h.release(ip("10.1.0.1"));
        assert_eq!(h.in_progress(), 0);
        assert!(h.by_address.is_empty() && h.by_prefix.is_empty());
    }
}

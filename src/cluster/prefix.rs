//! Address prefixes (CIDR) and the longest-prefix table the "nearest" policy looks devices up in.

use std::net::IpAddr;

/// An address prefix such as `10.1.0.0/16` or `2001:db8::/32`. IPv4 devices reaching an IPv6
/// socket arrive as IPv4-mapped addresses and match IPv4 prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: u128,
    len: u8,
    v4: bool,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr.trim().parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
        let (bits, max) = match ip {
            IpAddr::V4(v4) => (u32::from(v4) as u128, 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let len = match len {
            Some(l) => {
                l.trim().parse::<u8>().ok().filter(|l| *l <= max).ok_or(format!("prefix length must be 0..={max}"))?
            }
            None => max,
        };
        let network = bits & mask(len, max);
        if network != bits {
            return Err(format!("host bits are set (the network is {})", format_network(network, len, max == 32)));
        }
        Ok(Cidr { network, len, v4: max == 32 })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (normalise(ip), self.v4) {
            (IpAddr::V4(a), true) => (u32::from(a) as u128) & mask(self.len, 32) == self.network,
            (IpAddr::V6(a), false) => u128::from(a) & mask(self.len, 128) == self.network,
            _ => false,
        }
    }
}

fn normalise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn mask(len: u8, max: u8) -> u128 {
    let all = if max == 32 { u32::MAX as u128 } else { u128::MAX };
    if len == 0 { 0 } else { all & !((1u128 << (max - len)) - 1) & all }
}

fn format_network(network: u128, len: u8, v4: bool) -> String {
    let ip = if v4 { IpAddr::V4((network as u32).into()) } else { IpAddr::V6(network.into()) };
    format!("{ip}/{len}")
}

/// Prefixes and what each maps to; a lookup returns the value of the longest matching prefix.
#[derive(Debug, Clone)]
pub struct PrefixTable<T> {
    /// Longest prefixes first, so the first match is the best.
    rules: Vec<(Cidr, T)>,
}

impl<T> PrefixTable<T> {
    pub fn new(rules: impl IntoIterator<Item = (Cidr, T)>) -> PrefixTable<T> {
        let mut rules: Vec<_> = rules.into_iter().collect();
        rules.sort_by_key(|(c, _)| std::cmp::Reverse(c.len));
        PrefixTable { rules }
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        self.rules.iter().find(|(c, _)| c.contains(ip)).map(|(_, v)| v)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.rules.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let table = PrefixTable::new([
            (Cidr::parse("127.0.0.0/8").unwrap(), "a"),
            (Cidr::parse("127.0.0.2/32").unwrap(), "b"),
            (Cidr::parse("10.1.0.0/16").unwrap(), "c"),
            (Cidr::parse("2001:db8::/32").unwrap(), "d"),
        ]);
        let at = |s: &str| table.lookup(s.parse().unwrap()).copied();
        assert_eq!(at("127.0.0.2"), Some("b"));
        assert_eq!(at("127.0.0.3"), Some("a"));
        assert_eq!(at("10.1.200.7"), Some("c"));
        assert_eq!(at("::ffff:10.1.0.1"), Some("c"), "IPv4-mapped addresses match IPv4 prefixes");
        assert_eq!(at("2001:db8:1::5"), Some("d"));
        assert_eq!(at("192.168.0.1"), None);
        assert_eq!(
            PrefixTable::new([(Cidr::parse("0.0.0.0/0").unwrap(), 1)]).lookup("8.8.8.8".parse().unwrap()),
            Some(&1)
        );
    }

    #[test]
    fn malformed_prefixes_are_named() {
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten/8").is_err());
        assert_eq!(Cidr::parse("10.0.0.1").unwrap(), Cidr::parse("10.0.0.1/32").unwrap());
    }
}

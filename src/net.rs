//! The network as devices meet it: the port families they reach the server on, and address
//! prefixes (CIDR), the ones the config names and the network a source address is counted in.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Which listener family a token belongs to; a token is only valid on its own family, so a 5682
/// token cannot be used in the clear on 5683.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortFamily {
    Plain,
    Aes,
    /// Tokens from `/auth` inside a DTLS session (5684).
    Dtls,
}

/// An address prefix such as `10.1.0.0/16` or `2001:db8::/32`. IPv4 devices reaching an IPv6
/// socket arrive as IPv4-mapped addresses and match IPv4 prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

    /// The network of `ip` at `v4` leading bits for an IPv4 address (an IPv4-mapped one
    /// included), `v6` for an IPv6 one; lengths beyond the address width keep it whole.
    pub fn of(ip: IpAddr, v4: u8, v6: u8) -> Cidr {
        match normalise(ip) {
            IpAddr::V4(a) => {
                let len = v4.min(32);
                Cidr { network: u32::from(a) as u128 & mask(len, 32), len, v4: true }
            }
            IpAddr::V6(a) => {
                let len = v6.min(128);
                Cidr { network: u128::from(a) & mask(len, 128), len, v4: false }
            }
        }
    }

    /// Its length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
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

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_network(self.network, self.len, self.v4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_prefixes_are_named() {
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten/8").is_err());
        assert_eq!(Cidr::parse("10.0.0.1").unwrap(), Cidr::parse("10.0.0.1/32").unwrap());
    }

    #[test]
    fn a_source_is_counted_in_its_network() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(Cidr::of(ip("198.51.100.77"), 24, 56).to_string(), "198.51.100.0/24");
        assert_eq!(Cidr::of(ip("2001:db8:aa:bbcc::1"), 24, 56).to_string(), "2001:db8:aa:bb00::/56");
        assert_eq!(Cidr::of(ip("198.51.100.77"), 32, 128).to_string(), "198.51.100.77/32");
        assert_eq!(Cidr::of(ip("198.51.100.77"), 0, 0).to_string(), "0.0.0.0/0");
        // A dual-stack socket sees IPv4 devices as mapped addresses: still their IPv4 network.
        assert_eq!(Cidr::of(ip("::ffff:198.51.100.77"), 24, 56), Cidr::of(ip("198.51.100.1"), 24, 56));
    }
}

//! The longest-prefix table the "nearest" policy looks devices up in.

use std::net::IpAddr;

use crate::net::Cidr;

/// Prefixes and what each maps to; a lookup returns the value of the longest matching prefix.
#[derive(Debug, Clone)]
pub struct PrefixTable<T> {
    /// Longest prefixes first, so the first match is the best.
    rules: Vec<(Cidr, T)>,
}

impl<T> PrefixTable<T> {
    pub fn new(rules: impl IntoIterator<Item = (Cidr, T)>) -> PrefixTable<T> {
        let mut rules: Vec<_> = rules.into_iter().collect();
        rules.sort_by_key(|(c, _)| std::cmp::Reverse(c.prefix_len()));
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
}

//! Ordering of notifications (RFC 7641 §3.4): which of two notifications of one relation is the
//! newer, from their Observe numbers and arrival times. A 24-bit sequence number wraps, so
//! "newer" is a window of 2^23 ahead; after 128 s any notification counts as newer, since by then
//! the number may have wrapped unseen.

/// Half the 24-bit Observe number space.
const HALF: u32 = 1 << 23;
/// RFC 7641's 128 s, after which a notification is newer whatever its number.
const REORDER_WINDOW_MS: u64 = 128_000;

/// The latest notification of a relation: its Observe number and arrival (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latest {
    pub number: u32,
    pub at_ms: u64,
}

impl Latest {
    /// Whether a notification numbered `number` arriving at `at_ms` is newer than this one.
    pub fn is_older_than(self, number: u32, at_ms: u64) -> bool {
        let (v1, v2) = (self.number, number);
        (v1 < v2 && v2 - v1 < HALF) || (v1 > v2 && v1 - v2 > HALF) || at_ms > self.at_ms + REORDER_WINDOW_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_by_number_within_half_the_space_or_after_128_s() {
        let latest = Latest { number: 10, at_ms: 1_000_000 };
        assert!(latest.is_older_than(11, 1_000_000));
        assert!(!latest.is_older_than(10, 1_000_000), "the same number is a copy");
        assert!(!latest.is_older_than(9, 1_000_000));
        assert!(!latest.is_older_than(10 + HALF, 1_000_000), "2^23 ahead is behind");
        // wrapped: 0xFFFFFF then 3
        assert!(Latest { number: 0xFF_FFFF, at_ms: 0 }.is_older_than(3, 0));
        // anything once 128 s have passed
        assert!(latest.is_older_than(9, 1_000_000 + 128_001));
        assert!(!latest.is_older_than(9, 1_000_000 + 128_000));
    }
}

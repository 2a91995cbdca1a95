//! Time as the protocol cores see it: passed in, never read by them. `Now` pairs the monotonic
//! instant (for timers) with wall-clock milliseconds (for stored timestamps).
//!
//! The wall clock can be moved forward ([`advance`]), for tests that must get past an awake
//! window or an expiry without waiting for it; `admin.clock_control` exposes it, off by default.
//! Only the wall clock moves: retransmissions keep real time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How far the wall clock was moved forward, in milliseconds.
static ADVANCED_MS: AtomicU64 = AtomicU64::new(0);

/// Moves this process's wall clock forward by `by`; returns the new time.
pub fn advance(by: Duration) -> UnixMs {
    ADVANCED_MS.fetch_add(by.as_millis().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    UnixMs::now()
}

/// Milliseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixMs(pub u64);

impl UnixMs {
    pub fn now() -> UnixMs {
        let system = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        UnixMs(system.saturating_add(ADVANCED_MS.load(Ordering::Relaxed)))
    }

    pub fn plus_secs(self, s: u64) -> UnixMs {
        UnixMs(self.0.saturating_add(s.saturating_mul(1000)))
    }

    /// RFC 3339 in UTC with milliseconds, e.g. `2026-11-23T09:30:40.123Z`.
    pub fn rfc3339(self) -> String {
        let secs = self.0 / 1000;
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days as i64);
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, self.0 % 1000)
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub wall: UnixMs,
}

impl Now {
    pub fn read() -> Now {
        Now { instant: Instant::now(), wall: UnixMs::now() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(UnixMs(0).rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(UnixMs(951_782_400_000).rfc3339(), "2000-02-29T00:00:00.000Z");
        assert_eq!(UnixMs(1_795_426_240_123).rfc3339(), "2026-11-23T09:30:40.123Z");
    }
}

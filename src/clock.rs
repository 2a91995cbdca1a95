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

    /// Reads an RFC 3339 time (`2026-11-23T09:30:40Z`, with optional fraction of a second and a
    /// `Z` or `±hh:mm` offset); none for anything else or a time before the epoch.
    pub fn parse_rfc3339(text: &str) -> Option<UnixMs> {
        let b = text.as_bytes();
        let num = |from: usize, len: usize| -> Option<u64> {
            let digits = b.get(from..from + len)?;
            digits.iter().all(u8::is_ascii_digit).then(|| digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
        };
        let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
        if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
            return None;
        }
        let (y, mo, d, h, mi, s) = (num(0, 4)?, num(5, 2)?, num(8, 2)?, num(11, 2)?, num(14, 2)?, num(17, 2)?);
        let month_days = [
            31,
            if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        if !(1..=12).contains(&mo) || d == 0 || d > month_days[mo as usize - 1] || h > 23 || mi > 59 || s > 60 {
            return None;
        }
        let mut at = 19;
        let mut ms = 0;
        if sep(at, b".") {
            let digits = b[at + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return None;
            }
            ms = num(at + 1, digits.min(3))? * [100, 10, 1][digits.min(3) - 1];
            at += 1 + digits;
        }
        let offset_s: i64 = match b.get(at..)? {
            b"Z" | b"z" => 0,
            [sign @ (b'+' | b'-'), ..] if b.len() == at + 6 && sep(at + 3, b":") => {
                let (oh, om) = (num(at + 1, 2)?, num(at + 4, 2)?);
                if oh > 23 || om > 59 {
                    return None;
                }
                let o = (oh * 3600 + om * 60) as i64;
                if *sign == b'+' { o } else { -o }
            }
            _ => return None,
        };
        let days = days_from_civil(y as i64, mo as u32, d as u32);
        let secs = days * 86_400 + (h * 3600 + mi * 60 + s) as i64 - offset_s;
        u64::try_from(secs).ok().map(|secs| UnixMs(secs * 1000 + ms))
    }
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

    #[test]
    fn reads_rfc3339() {
        for ms in [0, 951_782_400_000, 1_795_426_240_123, 4_102_444_799_999] {
            assert_eq!(UnixMs::parse_rfc3339(&UnixMs(ms).rfc3339()), Some(UnixMs(ms)));
        }
        assert_eq!(UnixMs::parse_rfc3339("2026-11-23T09:30:40Z"), Some(UnixMs(1_795_426_240_000)));
        assert_eq!(UnixMs::parse_rfc3339("2026-11-23T10:30:40.5+01:00"), Some(UnixMs(1_795_426_240_500)));
        assert_eq!(UnixMs::parse_rfc3339("2026-11-23T09:00:40-00:30"), Some(UnixMs(1_795_426_240_000)));
        for bad in [
            "",
            "2026-11-23",
            "2026-11-23T09:30:40",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T09:30:40.Z",
            "2026-11-23T09:30:40+1:00",
            "1969-12-31T23:59:59Z",
            "2026-11-23T09:30:40Zx",
            "２026-11-23T09:30:40Z",
        ] {
            assert_eq!(UnixMs::parse_rfc3339(bad), None, "{bad}");
        }
    }
}

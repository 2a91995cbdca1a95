//! Uplinks per product per minute over the last day, for the console's fleet chart. Counted
//! where uplinks are accepted (a read lock finds the product's buckets): each minute's bucket
//! holds its minute and its count in one atomic word, updated without a lock, so a bucket a day
//! old restarts at the first uplink of its new minute. The recent minutes are stored every few seconds (a crash loses at most that much of
//! the chart, never data) and read back at start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::clock::UnixMs;
use crate::identity::ProductKey;
use crate::store::{CF_ACTIVITY, Op, Store, StoreError, corrupt};
use crate::sync::{read, write};

/// Minutes kept: a day.
pub const MINUTES: u32 = 24 * 60;

/// A minute since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Minute(pub u32);

impl Minute {
    pub fn of(t: UnixMs) -> Minute {
        Minute((t.0 / 60_000) as u32)
    }

    pub fn start(self) -> UnixMs {
        UnixMs(self.0 as u64 * 60_000)
    }
}

/// One product's buckets: `minute << 32 | count`, at `minute % MINUTES`.
struct Series(Box<[AtomicU64]>);

impl Series {
    fn new() -> Series {
        Series((0..MINUTES).map(|_| AtomicU64::new(0)).collect())
    }

    fn bucket(&self, m: Minute) -> &AtomicU64 {
        &self.0[(m.0 % MINUTES) as usize]
    }

    fn add(&self, m: Minute, n: u32) {
        let bucket = self.bucket(m);
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let next = match current >> 32 {
                held if held == m.0 as u64 => current.saturating_add(n as u64).min(current | u32::MAX as u64),
                // An older minute of this slot (a day or more ago); a later one wins over `m`.
                held if held < m.0 as u64 => (m.0 as u64) << 32 | n as u64,
                _ => return,
            };
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    fn count(&self, m: Minute) -> u32 {
        let v = self.bucket(m).load(Ordering::Relaxed);
        if v >> 32 == m.0 as u64 { v as u32 } else { 0 }
    }
}

#[derive(Default)]
pub struct Activity {
    products: RwLock<HashMap<ProductKey, Arc<Series>>>,
    /// The minute of the last flush: the day's oldest minutes are deleted once per minute.
    flushed: std::sync::atomic::AtomicU32,
}

fn key(pk: &ProductKey, m: Minute) -> Vec<u8> {
    let mut k = Vec::with_capacity(pk.as_str().len() + 5);
    k.extend_from_slice(pk.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&m.0.to_be_bytes());
    k
}

impl Activity {
    /// The stored minutes of the last day, and the deletion of older ones.
    pub fn load(store: &Store, now: UnixMs) -> Result<(Activity, Vec<Op>), StoreError> {
        let activity = Activity::default();
        let oldest = Minute(Minute::of(now).0.saturating_sub(MINUTES - 1));
        let mut stale = Vec::new();
        store.scan(CF_ACTIVITY, |k, v| {
            let bad = || corrupt(k, "bad activity record");
            let split = k.len().checked_sub(5).filter(|at| k[*at] == 0).ok_or_else(bad)?;
            let pk = std::str::from_utf8(&k[..split]).ok().and_then(|pk| ProductKey::new(pk).ok()).ok_or_else(bad)?;
            let minute = Minute(u32::from_be_bytes(k[split + 1..].try_into().map_err(|_| bad())?));
            let count = u32::from_be_bytes(v.try_into().map_err(|_| bad())?);
            if minute < oldest {
                stale.push(Op::Delete { cf: CF_ACTIVITY, key: k.to_vec() });
            } else {
                activity.series(&pk).add(minute, count);
            }
            Ok(())
        })?;
        Ok((activity, stale))
    }

    fn series(&self, pk: &ProductKey) -> Arc<Series> {
        if let Some(s) = read(&self.products).get(pk) {
            return s.clone();
        }
        write(&self.products).entry(pk.clone()).or_insert_with(|| Arc::new(Series::new())).clone()
    }

    /// An uplink of `pk` at `now`.
    pub fn count(&self, pk: &ProductKey, now: UnixMs) {
        self.series(pk).add(Minute::of(now), 1);
    }

    /// `pk`'s uplinks in each of the `minutes` minutes up to `now`'s, oldest first.
    pub fn recent(&self, pk: &ProductKey, minutes: u32, now: UnixMs) -> Vec<(Minute, u32)> {
        let last = Minute::of(now);
        let series = read(&self.products).get(pk).cloned();
        (0..minutes.min(MINUTES))
            .rev()
            .map(|back| Minute(last.0.saturating_sub(back)))
            .map(|m| (m, series.as_ref().map_or(0, |s| s.count(m))))
            .collect()
    }

    /// What to store now: every product's current and previous minute (their counts so far),
    /// and the deletion of the minutes that just left the day.
    pub fn flush(&self, now: UnixMs) -> Vec<Op> {
        let m = Minute::of(now);
        let new_minute = self.flushed.swap(m.0, Ordering::Relaxed) != m.0;
        let mut ops = Vec::new();
        for (pk, series) in read(&self.products).iter() {
            for minute in [Minute(m.0.saturating_sub(1)), m] {
                let count = series.count(minute);
                if count > 0 {
                    ops.push(Op::Put { cf: CF_ACTIVITY, key: key(pk, minute), value: count.to_be_bytes().to_vec() });
                }
            }
            if new_minute {
                for gone in [MINUTES, MINUTES + 1] {
                    ops.push(Op::Delete { cf: CF_ACTIVITY, key: key(pk, Minute(m.0.saturating_sub(gone))) });
                }
            }
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_count_and_restart_a_day_later() {
        let a = Activity::default();
        let pk = ProductKey::new("p1").unwrap();
        let t0 = UnixMs(1_800_000_000_000);
        for _ in 0..3 {
            a.count(&pk, t0);
        }
        a.count(&pk, UnixMs(t0.0 + 60_000));
        let recent = a.recent(&pk, 3, UnixMs(t0.0 + 60_000));
        let counts: Vec<u32> = recent.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, [0, 3, 1]);
        assert_eq!(recent[2].0, Minute::of(UnixMs(t0.0 + 60_000)));
        // The same slot a day later starts again.
        let next_day = UnixMs(t0.0 + MINUTES as u64 * 60_000);
        a.count(&pk, next_day);
        assert_eq!(a.recent(&pk, 1, next_day)[0].1, 1);
        assert_eq!(a.recent(&pk, 1, t0)[0].1, 0, "yesterday's minute is gone");
        // A late count for a minute its slot has moved past is dropped.
        a.count(&pk, t0);
        assert_eq!(a.recent(&pk, 1, next_day)[0].1, 1);
        assert!(a.recent(&ProductKey::new("p2").unwrap(), 5, t0).iter().all(|(_, n)| *n == 0));
    }
}

//! What a load generator counts while simulated devices send, and the figures it reports: acks
//! while sending (the rate), acks after the stop, other codes, requests never answered, and
//! latency percentiles.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::coap::message::Code;

#[derive(Default)]
pub struct Tally {
    pub sent: u64,
    /// 2.04 received while sending (what the rate is computed from).
    ok: u64,
    /// 2.04 received after the stop for requests sent before it.
    after_stop: u64,
    other: HashMap<String, u64>,
    /// Requests unanswered within the timeout. On loopback these are mostly ids that an earlier
    /// run's socket on the same port used less than 247 s before: the server ignores a different
    /// request under a remembered id (`nbhub_coap_duplicates_total`).
    pub lost: u64,
    latencies_us: Vec<u32>,
}

impl Tally {
    pub fn answered(&mut self, code: Code, sent_at: Instant, stopping: bool) {
        match (code == Code::CHANGED, stopping) {
            (true, true) => self.after_stop += 1,
            (true, false) => {
                self.ok += 1;
                self.latencies_us.push(sent_at.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            (false, _) => *self.other.entry(code.to_string()).or_default() += 1,
        }
    }

    pub fn merge(&mut self, o: Tally) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.after_stop += o.after_stop;
        self.lost += o.lost;
        for (k, v) in o.other {
            *self.other.entry(k).or_default() += v;
        }
        self.latencies_us.extend(o.latencies_us);
    }

    pub fn figures(self, elapsed: Duration) -> Figures {
        let seconds = elapsed.as_secs_f64();
        Figures {
            seconds,
            sent: self.sent,
            acknowledged_2_04: self.ok,
            acknowledged_after_stop: self.after_stop,
            unanswered: self.lost,
            acknowledged_per_second: (self.ok as f64 / seconds).round(),
            latency_ms: Latency::of(self.latencies_us),
            other_codes: self.other,
        }
    }
}

/// One run's result.
#[derive(Serialize)]
pub struct Figures {
    pub seconds: f64,
    pub sent: u64,
    pub acknowledged_2_04: u64,
    pub acknowledged_after_stop: u64,
    pub other_codes: HashMap<String, u64>,
    pub unanswered: u64,
    pub acknowledged_per_second: f64,
    pub latency_ms: Latency,
}

#[derive(Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    pub max: f64,
}

impl Latency {
    /// The percentiles, in milliseconds, of latencies in microseconds.
    pub fn of(mut latencies_us: Vec<u32>) -> Latency {
        latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            let i = ((latencies_us.len() as f64 - 1.0) * p).round().max(0.0) as usize;
            latencies_us.get(i).map_or(0.0, |v| *v as f64 / 1000.0)
        };
        Latency { p50: pct(0.50), p90: pct(0.90), p99: pct(0.99), p99_9: pct(0.999), max: pct(1.0) }
    }
}

impl Figures {
    /// One line: `label`, the rate (`unit`/s) and the percentiles.
    pub fn print(&self, label: &str, unit: &str, extra: &str) {
        let l = &self.latency_ms;
        print!(
            "{label:<30} {:>8.0} {unit}/s  p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  sent {}  unanswered {}{extra}",
            self.acknowledged_per_second, l.p50, l.p99, l.p99_9, self.sent, self.unanswered
        );
        if !self.other_codes.is_empty() {
            print!("  other {:?}", self.other_codes);
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_acks_while_sending_make_the_rate_and_the_latencies() {
        let t0 = Instant::now();
        let mut a = Tally { sent: 3, ..Tally::default() };
        a.answered(Code::CHANGED, t0, false);
        a.answered(Code::CHANGED, t0, true);
        let mut b = Tally { sent: 2, lost: 1, ..Tally::default() };
        b.answered(Code::TOO_MANY_REQUESTS, t0, false);
        a.merge(b);
        let f = a.figures(Duration::from_secs(1));
        assert_eq!((f.sent, f.acknowledged_2_04, f.acknowledged_after_stop, f.unanswered), (5, 1, 1, 1));
        assert_eq!(f.acknowledged_per_second, 1.0);
        assert_eq!(f.other_codes.get("4.29"), Some(&1));
        assert!(f.latency_ms.p50 <= f.latency_ms.max);
        let empty = Tally::default().figures(Duration::from_secs(1));
        assert_eq!((empty.latency_ms.p50, empty.latency_ms.max), (0.0, 0.0));
    }
}

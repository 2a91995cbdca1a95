//! Sliding anti-replay window for port 5682 sequence numbers (SPEC §3.2): any order is accepted,
//! each seq once, nothing below the window.
//!
//! Durability: each accepted seq is written as a small merge operand in the same RocksDB batch as
//! its uplink, never as a snapshot of the whole window. A snapshot taken while another uplink of
//! the same session is still in flight would persist that uplink's seq before its data; after a
//! crash the device's retransmission would then be refused as a replay and the data lost.
//! Merging single seqs is order-independent (the result is "the highest seq, and which seqs of the
//! last `size` below it were seen"), so RocksDB may fold operands in any order.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    size: u32,
    /// Highest seq seen; meaningless while `empty`.
    top: u64,
    empty: bool,
    /// Bit `s % size` is set when seq `s` (within the window) was seen.
    bits: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fresh,
    Replayed,
    BelowWindow,
}

impl ReplayWindow {
    /// `size` is a multiple of 64 (validated in config).
    pub fn new(size: u32) -> ReplayWindow {
        debug_assert!(size > 0 && size.is_multiple_of(64));
        ReplayWindow { size, top: 0, empty: true, bits: vec![0; (size / 64) as usize] }
    }

    pub fn check(&self, seq: u64) -> Verdict {
        if self.empty || seq > self.top {
            Verdict::Fresh
        } else if self.top - seq >= self.size as u64 {
            Verdict::BelowWindow
        } else if self.bit(seq) {
            Verdict::Replayed
        } else {
            Verdict::Fresh
        }
    }

    /// Marks `seq` seen; a seq below the window is ignored (it can never be accepted anyway).
    pub fn mark(&mut self, seq: u64) {
        if self.empty {
            self.empty = false;
            self.top = seq;
        } else if seq > self.top {
            let advance = seq - self.top;
            if advance >= self.size as u64 {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for s in self.top + 1..=seq {
                    self.clear(s);
                }
            }
            self.top = seq;
        } else if self.top - seq >= self.size as u64 {
            return;
        }
        let i = (seq % self.size as u64) as usize;
        self.bits[i / 64] |= 1 << (i % 64);
    }

    /// Forgets a seq marked for an uplink whose write then failed, so the device's retry with the
    /// same seq is accepted. (The top is not lowered; only the seq's own bit is cleared.)
    pub fn unmark(&mut self, seq: u64) {
        if !self.empty && seq <= self.top && self.top - seq < self.size as u64 {
            self.clear(seq);
        }
    }

    fn bit(&self, seq: u64) -> bool {
        let i = (seq % self.size as u64) as usize;
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    fn clear(&mut self, seq: u64) {
        let i = (seq % self.size as u64) as usize;
        self.bits[i / 64] &= !(1 << (i % 64));
    }

    /// Seqs currently marked, for merging.
    fn seen(&self) -> impl Iterator<Item = u64> + '_ {
        let low = self.top.saturating_sub(self.size as u64 - 1);
        (low..=self.top).filter(|s| !self.empty && self.bit(*s))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(14 + self.bits.len() * 8);
        out.push(1);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.top.to_le_bytes());
        out.push(self.empty as u8);
        for w in &self.bits {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    pub fn decode(data: &[u8]) -> Option<ReplayWindow> {
        if data.len() < 14 || data[0] != 1 {
            return None;
        }
        let size = u32::from_le_bytes(data[1..5].try_into().ok()?);
        let top = u64::from_le_bytes(data[5..13].try_into().ok()?);
        let empty = data[13] != 0;
        if size == 0 || !size.is_multiple_of(64) || data.len() != 14 + (size / 64) as usize * 8 {
            return None;
        }
        let bits = data[14..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        Some(ReplayWindow { size, top, empty, bits })
    }
}

/// A merge operand recording one accepted seq.
pub fn seq_operand(size: u32, seq: u64) -> [u8; 12] {
    let mut op = [0u8; 12];
    op[..4].copy_from_slice(&size.to_le_bytes());
    op[4..].copy_from_slice(&seq.to_le_bytes());
    op
}

/// Folds an existing window and operands (single seqs or whole windows from earlier folds) into
/// one window. Order-independent; unreadable operands are skipped rather than failing the read.
pub fn merge<'a>(existing: Option<&[u8]>, operands: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut window: Option<ReplayWindow> = existing.and_then(ReplayWindow::decode);
    for op in operands {
        if op.len() == 12 {
            let size = u32::from_le_bytes(op[..4].try_into().unwrap());
            let seq = u64::from_le_bytes(op[4..].try_into().unwrap());
            if size == 0 || !size.is_multiple_of(64) {
                continue;
            }
            window.get_or_insert_with(|| ReplayWindow::new(size)).mark(seq);
        } else if let Some(other) = ReplayWindow::decode(op) {
            let w = window.get_or_insert_with(|| ReplayWindow::new(other.size));
            for s in other.seen() {
                w.mark(s);
            }
        }
    }
    window.map(|w| w.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_any_order_once() {
        let mut w = ReplayWindow::new(64);
        for s in [5, 3, 9, 4] {
            assert_eq!(w.check(s), Verdict::Fresh);
            w.mark(s);
            assert_eq!(w.check(s), Verdict::Replayed);
        }
        assert_eq!(w.check(6), Verdict::Fresh);
        w.mark(100);
        assert_eq!(w.check(36), Verdict::BelowWindow);
        assert_eq!(w.check(37), Verdict::Fresh);
        assert_eq!(w.check(9), Verdict::BelowWindow);
        w.mark(1000);
        assert_eq!(w.check(100), Verdict::BelowWindow);
        assert_eq!(w.check(999), Verdict::Fresh);
    }

    #[test]
    fn unmark_reopens_a_seq() {
        let mut w = ReplayWindow::new(64);
        w.mark(10);
        w.mark(12);
        w.unmark(12);
        assert_eq!(w.check(12), Verdict::Fresh);
        assert_eq!(w.check(10), Verdict::Replayed);
        w.unmark(1000);
        assert_eq!(w.check(10), Verdict::Replayed);
    }

    #[test]
    fn advancing_clears_reused_slots() {
        let mut w = ReplayWindow::new(64);
        w.mark(1);
        w.mark(64); // slot 0 is seq 64 now; seq 1 still in window
        assert_eq!(w.check(1), Verdict::Replayed);
        w.mark(65); // seq 1 leaves the window, slot 1 becomes seq 65
        assert_eq!(w.check(1), Verdict::BelowWindow);
        assert_eq!(w.check(65), Verdict::Replayed);
        assert_eq!(w.check(2), Verdict::Fresh);
    }

    #[test]
    fn merging_operands_is_order_independent() {
        let seqs = [7u64, 1, 300, 250, 299, 2, 5000, 4990];
        let ops: Vec<[u8; 12]> = seqs.iter().map(|s| seq_operand(128, *s)).collect();
        let forward = merge(None, ops.iter().map(|o| &o[..])).unwrap();
        let backward = merge(None, ops.iter().rev().map(|o| &o[..])).unwrap();
        assert_eq!(forward, backward);
        // partial folds fed back in as operands give the same result
        let first = merge(None, ops[..3].iter().map(|o| &o[..])).unwrap();
        let second = merge(None, ops[3..].iter().map(|o| &o[..])).unwrap();
        let combined = merge(Some(&first), [&second[..]]).unwrap();
        assert_eq!(combined, forward);
        let w = ReplayWindow::decode(&forward).unwrap();
        assert_eq!(w.check(4990), Verdict::Replayed);
        assert_eq!(w.check(4991), Verdict::Fresh);
        assert_eq!(w.check(300), Verdict::BelowWindow);
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(ReplayWindow::decode(&[1, 2, 3]).is_none());
        let mut enc = ReplayWindow::new(64).encode();
        enc.push(0);
        assert!(ReplayWindow::decode(&enc).is_none());
    }
}

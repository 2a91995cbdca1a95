//! RocksDB's memory under one bound.

/// How RocksDB's memory is shared out of one figure (`store.memory_mb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The one block cache every column family reads through; memtables are charged to it, so
    /// blocks and memtables together stay within it.
    pub cache_bytes: usize,
    /// All memtables together: past this the largest is flushed.
    pub memtables_bytes: usize,
    /// One column family's memtable. After the disk was full, writes resume only once this much
    /// is free.
    pub write_buffer_bytes: usize,
}

impl MemoryBudget {
    pub fn of(total: usize) -> MemoryBudget {
        MemoryBudget {
            cache_bytes: total,
            memtables_bytes: total / 2,
            // Small enough that a few busy column families fit the memtables' share; larger
            // memtables gain little for uplinks, which are written once and rarely read.
            write_buffer_bytes: (total / 8).clamp(1 << 20, 64 << 20),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_figure_is_shared_out() {
        const MIB: usize = 1 << 20;
        let default = MemoryBudget::of(256 * MIB);
        assert_eq!(
            (default.cache_bytes, default.memtables_bytes, default.write_buffer_bytes),
            (256 * MIB, 128 * MIB, 32 * MIB)
        );
        assert_eq!(MemoryBudget::of(8 * MIB).write_buffer_bytes, MIB, "the smallest memtable");
        assert_eq!(MemoryBudget::of(4096 * MIB).write_buffer_bytes, 64 * MIB, "the largest");
    }
}

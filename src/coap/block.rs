//! Block-wise transfers (RFC 7959 §2.2): the Block2 option's value, `NUM | M | SZX` in at most
//! three bytes, and how a server slices a representation by it. The server answers whatever block
//! is asked, so a client may resume a download anywhere, and a block past the end is refused.

/// The largest block size, 1024 bytes (SZX 6); SZX 7 is reserved.
pub const MAX_SZX: u8 = 6;

/// A Block2 option: block `num` of `2^(szx+4)` bytes, `more` after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    pub szx: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("Block2 uses the reserved size exponent 7")]
    ReservedSize,
    #[error("Block2 is longer than 3 bytes")]
    TooLong,
    #[error("the requested block starts past the end of the resource")]
    PastEnd,
}

impl Block {
    /// The option's value as the message carries it (an unsigned integer of 0–3 bytes).
    pub fn parse(value: &[u8]) -> Result<Block, BlockError> {
        if value.len() > 3 {
            return Err(BlockError::TooLong);
        }
        let v = value.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32);
        let szx = (v & 7) as u8;
        if szx > MAX_SZX {
            return Err(BlockError::ReservedSize);
        }
        Ok(Block { num: v >> 4, more: v & 8 != 0, szx })
    }

    pub fn value(self) -> u32 {
        (self.num << 4) | ((self.more as u32) << 3) | self.szx as u32
    }

    pub fn size(self) -> usize {
        1 << (self.szx + 4)
    }

    pub fn offset(self) -> u64 {
        self.num as u64 * self.size() as u64
    }

    /// The size exponent for `size` bytes, rounded down to a power of two within 16..=1024.
    pub fn szx_for(size: usize) -> u8 {
        let size = size.clamp(16, 1024);
        (usize::BITS - 1 - size.leading_zeros()) as u8 - 4
    }

    /// The byte range of a `total`-byte representation this block asks for, and the Block2 the
    /// answer carries (its `more` set unless the range reaches the end).
    pub fn slice(self, total: u64) -> Result<(std::ops::Range<u64>, Block), BlockError> {
        let start = self.offset();
        // A zero-length representation still has its block 0, empty.
        if start >= total && !(start == 0 && total == 0) {
            return Err(BlockError::PastEnd);
        }
        let end = (start + self.size() as u64).min(total);
        Ok((start..end, Block { more: end < total, ..self }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_value_round_trips_and_the_reserved_size_is_refused() {
        let b = Block { num: 700, more: true, szx: 5 };
        let v = b.value();
        let bytes = v.to_be_bytes();
        let first = bytes.iter().position(|&x| x != 0).unwrap();
        assert_eq!(Block::parse(&bytes[first..]), Ok(b));
        // An empty value is block 0 of 16 bytes (RFC 7252 §3.2: the integer 0).
        assert_eq!(Block::parse(&[]), Ok(Block { num: 0, more: false, szx: 0 }));
        assert_eq!(Block::parse(&[0x07]), Err(BlockError::ReservedSize));
        assert_eq!(Block::parse(&[1, 2, 3, 4]), Err(BlockError::TooLong));
    }

    #[test]
    fn slices_end_at_the_representation_and_past_it_is_refused() {
        let b512 = |num| Block { num, more: false, szx: Block::szx_for(512) };
        assert_eq!(b512(0).size(), 512);
        assert_eq!(b512(0).slice(1000), Ok((0..512, Block { num: 0, more: true, szx: 5 })));
        assert_eq!(b512(1).slice(1000), Ok((512..1000, Block { num: 1, more: false, szx: 5 })));
        assert_eq!(b512(2).slice(1000), Err(BlockError::PastEnd));
        // Exactly two blocks: the second says no more, a third is past the end.
        assert!(!b512(1).slice(1024).unwrap().1.more);
        assert_eq!(b512(2).slice(1024), Err(BlockError::PastEnd));
        assert_eq!(Block::szx_for(100_000), 6);
        assert_eq!(Block::szx_for(1), 0);
        assert_eq!(Block::szx_for(700), 5);
    }
}

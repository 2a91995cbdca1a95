//! Upgrade packages (SPEC §6): a product's firmware or software at one version, stored in chunks
//! of `chunk_size` bytes (32–500), the last one shorter; PCP numbers chunks from 0.

use serde::{Deserialize, Serialize};

use crate::identity::ProductKey;

/// Chunks are numbered with 16 bits in PCP.
pub const MAX_CHUNKS: usize = u16::MAX as usize;
pub const DEFAULT_CHUNK_SIZE: u16 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PackageId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageKind {
    Firmware,
    Software,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackageRecord {
    pub id: PackageId,
    pub product_key: ProductKey,
    /// The target version (≤ 16 ASCII characters, as PCP carries it).
    pub version: String,
    #[serde(rename = "type")]
    pub kind: PackageKind,
    pub size: u64,
    pub chunk_size: u16,
    pub chunk_count: u16,
    /// Versions a device may upgrade from; empty: any.
    pub source_versions: Vec<String>,
    /// Hex SHA-256 of the whole package, for the operator to compare.
    pub sha256: String,
    pub created_at: u64,
}

/// The chunks of `data`: ceil(size / chunk size) of them.
pub fn chunks(data: &[u8], chunk_size: u16) -> impl Iterator<Item = &[u8]> {
    data.chunks(chunk_size as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_count_is_the_ceiling() {
        let data = vec![7u8; 1001];
        let parts: Vec<_> = chunks(&data, 500).collect();
        assert_eq!(parts.iter().map(|c| c.len()).collect::<Vec<_>>(), [500, 500, 1]);
    }
}

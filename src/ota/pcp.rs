//! PCP, Huawei's upgrade protocol (seed 003 §3.8.2–§3.8.3): `FF FE | version 01 | code |
//! checksum (2) | data length (2) | data`, big-endian, with the vendor's checksum over the whole
//! frame (checksum field zero while computing). Codes 19–24; which side sends a message decides
//! its layout, so there is one type per direction. Parsing is strict (SPEC §6): a frame that is
//! not exactly right is not PCP.

use std::fmt;

const START: [u8; 2] = [0xFF, 0xFE];
const VERSION: u8 = 1;
const HEADER: usize = 8;

pub const QUERY_VERSION: u8 = 19;
pub const NEW_VERSION: u8 = 20;
pub const CHUNK: u8 = 21;
pub const DOWNLOAD_RESULT: u8 = 22;
pub const EXECUTE: u8 = 23;
pub const UPGRADE_RESULT: u8 = 24;

/// The vendor sample's table (polynomial 0x1021, built MSB-first).
const TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The vendor checksum: the MSB-first table driven as a reflected CRC (initial 0, no final xor).
/// No catalogued CRC-16 matches it; `vectors/pcp.json` is the reference.
pub fn checksum(frame: &[u8]) -> u16 {
    frame.iter().fold(0u16, |crc, &b| (crc >> 8) ^ TABLE[((crc ^ b as u16) & 0xFF) as usize])
}

/// A version: at most 16 ASCII characters, NUL-padded on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version([u8; 16]);

impl Version {
    pub fn new(s: &str) -> Result<Version, PcpError> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(PcpError::BadVersion);
        }
        let mut v = [0u8; 16];
        v[..s.len()].copy_from_slice(s.as_bytes());
        Ok(Version(v))
    }

    fn from_wire(b: &[u8]) -> Result<Version, PcpError> {
        let raw: [u8; 16] = b.try_into().map_err(|_| PcpError::Length)?;
        let end = raw.iter().position(|&c| c == 0).unwrap_or(16);
        // Padding is NULs only, and the text is printable ASCII.
        if raw[end..].iter().any(|&c| c != 0) || !raw[..end].iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
            return Err(PcpError::BadVersion);
        }
        Ok(Version(raw))
    }

    pub fn as_str(&self) -> &str {
        let end = self.0.iter().position(|&c| c == 0).unwrap_or(16);
        std::str::from_utf8(&self.0[..end]).expect("checked ASCII")
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({:?})", self.as_str())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A result code (seed 003 §3.8.2's tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResultCode(pub u8);

impl ResultCode {
    pub const OK: ResultCode = ResultCode(0x00);
    pub const DEVICE_BUSY: ResultCode = ResultCode(0x01);
    pub const POOR_SIGNAL: ResultCode = ResultCode(0x02);
    pub const ALREADY_LATEST: ResultCode = ResultCode(0x03);
    pub const LOW_BATTERY: ResultCode = ResultCode(0x04);
    pub const NO_SPACE: ResultCode = ResultCode(0x05);
    pub const DOWNLOAD_TIMEOUT: ResultCode = ResultCode(0x06);
    pub const PACKAGE_CHECK_FAILED: ResultCode = ResultCode(0x07);
    pub const UNSUPPORTED_PACKAGE: ResultCode = ResultCode(0x08);
    pub const OUT_OF_MEMORY: ResultCode = ResultCode(0x09);
    pub const INSTALL_FAILED: ResultCode = ResultCode(0x0A);
    pub const INTERNAL_ERROR: ResultCode = ResultCode(0x7F);
    /// Platform: no upgrade task for this device.
    pub const NO_TASK: ResultCode = ResultCode(0x80);
    /// Platform: no such chunk.
    pub const NO_CHUNK: ResultCode = ResultCode(0x81);

    /// What it means, as a failure reason an operator reads.
    pub fn reason(self) -> &'static str {
        match self.0 {
            0x00 => "success",
            0x01 => "device busy",
            0x02 => "poor signal quality",
            0x03 => "already the latest version",
            0x04 => "low battery",
            0x05 => "not enough storage space",
            0x06 => "download timed out",
            0x07 => "package integrity check failed",
            0x08 => "unsupported package type",
            0x09 => "out of memory",
            0x0A => "package installation failed",
            0x7F => "internal device error",
            0x80 => "no upgrade task",
            0x81 => "no such chunk",
            _ => "unknown result code",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PcpError {
    #[error("not a PCP frame (no FF FE start, or not version 1)")]
    NotPcp,
    #[error("unknown PCP message code")]
    UnknownCode,
    #[error("PCP checksum mismatch")]
    Checksum,
    #[error("PCP length field or data length is wrong for this message")]
    Length,
    #[error("PCP version field is not NUL-padded printable ASCII of 1 to 16 characters")]
    BadVersion,
}

/// Builds a frame: header, data, and the checksum over both.
pub fn frame(code: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len());
    out.extend_from_slice(&START);
    out.push(VERSION);
    out.push(code);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    let crc = checksum(&out);
    out[4..6].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Checks framing, version, code, length and checksum; the code and data.
pub fn unframe(bytes: &[u8]) -> Result<(u8, &[u8]), PcpError> {
    if bytes.len() < HEADER || bytes[..2] != START || bytes[2] != VERSION {
        return Err(PcpError::NotPcp);
    }
    let code = bytes[3];
    if !(QUERY_VERSION..=UPGRADE_RESULT).contains(&code) {
        return Err(PcpError::UnknownCode);
    }
    let len = u16::from_be_bytes([bytes[6], bytes[7]]) as usize;
    if bytes.len() != HEADER + len {
        return Err(PcpError::Length);
    }
    let mut zeroed = bytes.to_vec();
    zeroed[4..6].copy_from_slice(&[0, 0]);
    if checksum(&zeroed).to_be_bytes() != [bytes[4], bytes[5]] {
        return Err(PcpError::Checksum);
    }
    Ok((code, &bytes[HEADER..]))
}

/// What a device sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromDevice {
    /// 19, answer: the version it runs.
    Version { result: ResultCode, version: Version },
    /// 20, answer: whether it takes the new version.
    NotifyAnswer { result: ResultCode },
    /// 21, request: one chunk of `version`.
    ChunkRequest { version: Version, chunk: u16 },
    /// 22, request: how the download went.
    DownloadResult { result: ResultCode },
    /// 23, answer: whether it will install.
    ExecuteAnswer { result: ResultCode },
    /// 24, request: how the upgrade went, and the version it now runs.
    UpgradeResult { result: ResultCode, version: Version },
}

impl FromDevice {
    pub fn parse(bytes: &[u8]) -> Result<FromDevice, PcpError> {
        let (code, data) = unframe(bytes)?;
        let result = |d: &[u8]| d.first().map(|b| ResultCode(*b)).ok_or(PcpError::Length);
        let exact = |n: usize| if data.len() == n { Ok(()) } else { Err(PcpError::Length) };
        Ok(match code {
            QUERY_VERSION => {
                exact(17)?;
                FromDevice::Version { result: result(data)?, version: Version::from_wire(&data[1..])? }
            }
            NEW_VERSION => {
                exact(1)?;
                FromDevice::NotifyAnswer { result: result(data)? }
            }
            CHUNK => {
                exact(18)?;
                FromDevice::ChunkRequest {
                    version: Version::from_wire(&data[..16])?,
                    chunk: u16::from_be_bytes([data[16], data[17]]),
                }
            }
            DOWNLOAD_RESULT => {
                exact(1)?;
                FromDevice::DownloadResult { result: result(data)? }
            }
            EXECUTE => {
                exact(1)?;
                FromDevice::ExecuteAnswer { result: result(data)? }
            }
            _ => {
                exact(17)?;
                FromDevice::UpgradeResult { result: result(data)?, version: Version::from_wire(&data[1..])? }
            }
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let with_version = |code, r: ResultCode, v: &Version| {
            let mut d = vec![r.0];
            d.extend_from_slice(&v.0);
            frame(code, &d)
        };
        match self {
            FromDevice::Version { result, version } => with_version(QUERY_VERSION, *result, version),
            FromDevice::NotifyAnswer { result } => frame(NEW_VERSION, &[result.0]),
            FromDevice::ChunkRequest { version, chunk } => {
                let mut d = version.0.to_vec();
                d.extend_from_slice(&chunk.to_be_bytes());
                frame(CHUNK, &d)
            }
            FromDevice::DownloadResult { result } => frame(DOWNLOAD_RESULT, &[result.0]),
            FromDevice::ExecuteAnswer { result } => frame(EXECUTE, &[result.0]),
            FromDevice::UpgradeResult { result, version } => with_version(UPGRADE_RESULT, *result, version),
        }
    }
}

/// What the platform sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromPlatform {
    /// 19, request.
    QueryVersion,
    /// 20, request: the new version and how it is chunked (the check code is obsolete, 0).
    NewVersion { version: Version, chunk_size: u16, chunk_count: u16 },
    /// 21, answer: a chunk (data only with result 0).
    Chunk { result: ResultCode, chunk: u16, data: Vec<u8> },
    /// 22, answer.
    DownloadResultAnswer { result: ResultCode },
    /// 23, request.
    Execute,
    /// 24, answer.
    UpgradeResultAnswer { result: ResultCode },
}

impl FromPlatform {
    pub fn parse(bytes: &[u8]) -> Result<FromPlatform, PcpError> {
        let (code, data) = unframe(bytes)?;
        let exact = |n: usize| if data.len() == n { Ok(()) } else { Err(PcpError::Length) };
        let word = |at: usize| u16::from_be_bytes([data[at], data[at + 1]]);
        Ok(match code {
            QUERY_VERSION => {
                exact(0)?;
                FromPlatform::QueryVersion
            }
            NEW_VERSION => {
                exact(22)?;
                if word(20) != 0 {
                    return Err(PcpError::Length);
                }
                FromPlatform::NewVersion {
                    version: Version::from_wire(&data[..16])?,
                    chunk_size: word(16),
                    chunk_count: word(18),
                }
            }
            CHUNK => {
                if data.len() < 3 || (data[0] != 0 && data.len() != 3) {
                    return Err(PcpError::Length);
                }
                FromPlatform::Chunk { result: ResultCode(data[0]), chunk: word(1), data: data[3..].to_vec() }
            }
            DOWNLOAD_RESULT => {
                exact(1)?;
                FromPlatform::DownloadResultAnswer { result: ResultCode(data[0]) }
            }
            EXECUTE => {
                exact(0)?;
                FromPlatform::Execute
            }
            _ => {
                exact(1)?;
                FromPlatform::UpgradeResultAnswer { result: ResultCode(data[0]) }
            }
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            FromPlatform::QueryVersion => frame(QUERY_VERSION, &[]),
            FromPlatform::NewVersion { version, chunk_size, chunk_count } => {
                let mut d = version.0.to_vec();
                d.extend_from_slice(&chunk_size.to_be_bytes());
                d.extend_from_slice(&chunk_count.to_be_bytes());
                d.extend_from_slice(&[0, 0]);
                frame(NEW_VERSION, &d)
            }
            FromPlatform::Chunk { result, chunk, data } => {
                let mut d = vec![result.0];
                d.extend_from_slice(&chunk.to_be_bytes());
                if *result == ResultCode::OK {
                    d.extend_from_slice(data);
                }
                frame(CHUNK, &d)
            }
            FromPlatform::DownloadResultAnswer { result } => frame(DOWNLOAD_RESULT, &[result.0]),
            FromPlatform::Execute => frame(EXECUTE, &[]),
            FromPlatform::UpgradeResultAnswer { result } => frame(UPGRADE_RESULT, &[result.0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vectors/pcp.json`, kept beside the codec (the shared file is outside the repository).
    const VECTORS: &[(&str, &str, &str)] = &[
        ("platform", "FFFE01134C9A0000", "4C9A"),
        ("device", "FFFE01138DE300110056302E39000000000000000000000000", "8DE3"),
        ("platform", "FFFE01143AE6001656312E3000000000000000000000000001F400010000", "3AE6"),
        ("device", "FFFE0114D768000100", "D768"),
        ("device", "FFFE01155618001256312E300000000000000000000000000000", "5618"),
        ("platform", "FFFE0115E107001300000048454C4C4F2C20496F5420534F544121", "E107"),
        ("device", "FFFE0116850E000100", "850E"),
        ("platform", "FFFE0116850E000100", "850E"),
        ("platform", "FFFE0117CF900000", "CF90"),
        ("device", "FFFE0117B725000100", "B725"),
        ("device", "FFFE0118C7D200110056312E30000000000000000000000000", "C7D2"),
        ("platform", "FFFE0118AFA1000100", "AFA1"),
    ];

    #[test]
    fn every_vector_parses_and_re_encodes_bit_exactly() {
        for (from, hex, crc) in VECTORS {
            let bytes = hex::decode(hex).unwrap();
            assert_eq!(format!("{:04X}", u16::from_be_bytes([bytes[4], bytes[5]])), *crc);
            let encoded = if *from == "device" {
                FromDevice::parse(&bytes).unwrap().encode()
            } else {
                FromPlatform::parse(&bytes).unwrap().encode()
            };
            assert_eq!(hex::encode_upper(encoded), *hex);
        }
    }

    #[test]
    fn typed_fields() {
        let v = FromDevice::parse(&hex::decode(VECTORS[1].1).unwrap()).unwrap();
        assert_eq!(v, FromDevice::Version { result: ResultCode::OK, version: Version::new("V0.9").unwrap() });
        let n = FromPlatform::parse(&hex::decode(VECTORS[2].1).unwrap()).unwrap();
        assert_eq!(
            n,
            FromPlatform::NewVersion { version: Version::new("V1.0").unwrap(), chunk_size: 500, chunk_count: 1 }
        );
        let c = FromPlatform::parse(&hex::decode(VECTORS[5].1).unwrap()).unwrap();
        assert_eq!(c, FromPlatform::Chunk { result: ResultCode::OK, chunk: 0, data: b"HELLO, IoT SOTA!".to_vec() });
        assert_eq!(ResultCode::LOW_BATTERY.reason(), "low battery");
    }

    #[test]
    fn anything_not_exactly_right_is_not_pcp() {
        let good = hex::decode(VECTORS[4].1).unwrap();
        let mut bad_crc = good.clone();
        bad_crc[5] ^= 1;
        assert_eq!(FromDevice::parse(&bad_crc), Err(PcpError::Checksum));
        assert_eq!(FromDevice::parse(&good[..good.len() - 1]), Err(PcpError::Length));
        assert_eq!(FromDevice::parse(b"{\"temperature\":21}"), Err(PcpError::NotPcp));
        assert_eq!(FromDevice::parse(&frame(25, &[])), Err(PcpError::UnknownCode));
        let mut v2 = good.clone();
        v2[2] = 2;
        assert_eq!(FromDevice::parse(&v2), Err(PcpError::NotPcp));
        // The document's own (malformed) code-20 stream: three stray zero bytes, wrong checksum.
        let doc = hex::decode("FFFE011402F7001656312E3000000000000000000000000000000001F400010000").unwrap();
        assert!(FromPlatform::parse(&doc).is_err());
        // A version with bytes after its padding.
        let mut data = Version::new("V1").unwrap().0.to_vec();
        data[5] = b'x';
        data.extend_from_slice(&[0, 1]);
        assert_eq!(FromDevice::parse(&frame(CHUNK, &data)), Err(PcpError::BadVersion));
        assert!(Version::new("seventeen-chars!!").is_err());
    }
}

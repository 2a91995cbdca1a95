//! Connection IDs (RFC 9146): the `connection_id` extension's value and the CIDs nbhub hands
//! out. A server CID is random except that its first byte, modulo the port's socket count, names
//! the socket whose peer table holds the session: the kernel's SO_REUSEPORT steering
//! (`transport::udp::steer_by_cid`) reads that byte, so a record from a new address reaches the
//! table that can open it.

use std::fmt;

/// The extension's code point (RFC 9146 §3).
pub const EXTENSION: u16 = 54;
/// Content type of a record carrying a CID (RFC 9146 §4).
pub const CONTENT_TLS12_CID: u8 = 25;
use crate::config::{MAX_CID_LEN as MAX_LEN, MIN_CID_LEN as MIN_LEN};
/// Where a tls12_cid record's CID starts: after type, version, epoch and sequence number.
pub const OFFSET: usize = 11;

/// A CID nbhub chose, inline so that a table keyed by it allocates nothing per session.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cid {
    len: u8,
    bytes: [u8; MAX_LEN],
}

impl Cid {
    pub fn new(bytes: &[u8]) -> Option<Cid> {
        let mut cid = Cid { len: bytes.len() as u8, bytes: [0; MAX_LEN] };
        cid.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(cid)
    }

    /// A random CID of `len` bytes (within `MIN_LEN..=MAX_LEN`) for socket `socket` of `sockets`.
    pub fn generate(len: usize, socket: usize, sockets: usize) -> Cid {
        let len = len.clamp(MIN_LEN, MAX_LEN);
        let mut bytes = [0; MAX_LEN];
        rand::fill(&mut bytes[..len]);
        bytes[0] = first_byte(bytes[0], socket, sockets);
        // Equality and hashing see all of `bytes`: past `len` they are zero, as in `new`.
        Cid { len: len as u8, bytes }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn byte_len(&self) -> usize {
        self.len as usize
    }

    /// The CID of a datagram whose first record is a tls12_cid record, for CIDs of `len` bytes.
    pub fn of_datagram(datagram: &[u8], len: usize) -> Option<Cid> {
        if len == 0 || datagram.first() != Some(&CONTENT_TLS12_CID) {
            return None;
        }
        Cid::new(datagram.get(OFFSET..OFFSET + len)?)
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({})", hex::encode(self.as_bytes()))
    }
}

/// `random` moved to the nearest value that is `socket` modulo `sockets`, within a byte.
fn first_byte(random: u8, socket: usize, sockets: usize) -> u8 {
    let sockets = sockets.clamp(1, 256) as u16;
    let v = random as u16 - random as u16 % sockets + socket as u16 % sockets;
    (if v > 255 { v - sockets } else { v }) as u8
}

/// The extension's body: `opaque cid<0..2^8-1>` (RFC 9146 §3).
pub fn encode_extension(cid: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + cid.len());
    out.push(cid.len() as u8);
    out.extend_from_slice(cid);
    out
}

/// The CID a client's extension asks us to send with; `None` if the body is malformed.
pub fn decode_extension(body: &[u8]) -> Option<&[u8]> {
    let (&len, cid) = body.split_first()?;
    (cid.len() == len as usize).then_some(cid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_byte_names_the_socket() {
        for sockets in [1, 2, 3, 7, 256] {
            for socket in 0..sockets {
                for random in 0..=255u8 {
                    let b = first_byte(random, socket, sockets);
                    assert_eq!(b as usize % sockets, socket, "{random} {socket}/{sockets}");
                }
            }
        }
        let cid = Cid::generate(6, 1, 2);
        assert_eq!((cid.byte_len(), cid.as_bytes()[0] % 2), (6, 1));
        assert_ne!(Cid::generate(6, 0, 1), Cid::generate(6, 0, 1), "random");
        assert_eq!(Cid::new(cid.as_bytes()), Some(cid), "the same CID read from a record");
    }

    #[test]
    fn extension_bodies_and_datagrams() {
        assert_eq!(encode_extension(&[1, 2]), [2, 1, 2]);
        assert_eq!(decode_extension(&[2, 1, 2]), Some(&[1u8, 2][..]));
        assert_eq!(decode_extension(&[0]), Some(&[][..]), "empty: send to me without a CID");
        assert_eq!(decode_extension(&[3, 1, 2]), None);
        assert_eq!(decode_extension(&[]), None);
        let mut record = vec![25, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9];
        record.extend_from_slice(&[7, 7, 7, 7, 0, 4]);
        assert_eq!(Cid::of_datagram(&record, 4), Cid::new(&[7; 4]));
        assert_eq!(Cid::of_datagram(&record[..13], 4), None, "cut short");
        record[0] = 23;
        assert_eq!(Cid::of_datagram(&record, 4), None, "not a tls12_cid record");
        assert_eq!(Cid::new(&[0; 17]), None);
    }
}

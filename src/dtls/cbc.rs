//! AES-CBC record protection with HMAC (RFC 5246 §6.2.3.2), for the legacy suites deployed
//! Alibaba devices offer: MAC-then-encrypt by default, encrypt-then-MAC (RFC 7366) when the client
//! asked for it and the server agreed. Records that fail are dropped silently (DTLS), and the
//! MAC is computed whether or not the padding was valid, so failures take the same path.

use aes::{Aes128, Aes256};
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::{Sha256, Sha384};
use subtle::ConstantTimeEq;

use super::record::Header;

const BLOCK: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacHash {
    Sha1,
    Sha256,
    Sha384,
}

impl MacHash {
    pub fn len(self) -> usize {
        match self {
            MacHash::Sha1 => 20,
            MacHash::Sha256 => 32,
            MacHash::Sha384 => 48,
        }
    }

    fn mac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            let mut m = <M as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        match self {
            MacHash::Sha1 => run::<Hmac<Sha1>>(key, parts),
            MacHash::Sha256 => run::<Hmac<Sha256>>(key, parts),
            MacHash::Sha384 => run::<Hmac<Sha384>>(key, parts),
        }
    }
}

/// One direction's keys.
pub struct CbcKeys {
    key: Vec<u8>,
    mac_key: Vec<u8>,
    mac: MacHash,
    encrypt_then_mac: bool,
}

impl CbcKeys {
    pub fn new(key: &[u8], mac_key: &[u8], mac: MacHash, encrypt_then_mac: bool) -> CbcKeys {
        CbcKeys { key: key.to_vec(), mac_key: mac_key.to_vec(), mac, encrypt_then_mac }
    }

    fn decrypt(&self, iv: &[u8], data: &mut [u8]) -> Option<()> {
        match self.key.len() {
            16 => {
                cbc::Decryptor::<Aes128>::new_from_slices(&self.key, iv).ok()?.decrypt_padded::<NoPadding>(data).ok()?
            }
            _ => {
                cbc::Decryptor::<Aes256>::new_from_slices(&self.key, iv).ok()?.decrypt_padded::<NoPadding>(data).ok()?
            }
        };
        Some(())
    }

    fn encrypt(&self, iv: &[u8], data: &mut [u8]) -> Option<()> {
        let len = data.len();
        match self.key.len() {
            16 => cbc::Encryptor::<Aes128>::new_from_slices(&self.key, iv)
                .ok()?
                .encrypt_padded::<NoPadding>(data, len)
                .ok()?,
            _ => cbc::Encryptor::<Aes256>::new_from_slices(&self.key, iv)
                .ok()?
                .encrypt_padded::<NoPadding>(data, len)
                .ok()?,
        };
        Some(())
    }

    /// The plaintext of a record's fragment (IV, ciphertext and MAC), if it authenticates.
    pub fn open(&self, header: Header<'_>, content_type: u8, fragment: &[u8]) -> Option<Vec<u8>> {
        let mac_len = self.mac.len();
        if self.encrypt_then_mac {
            let (sealed, tag) = fragment.split_at(fragment.len().checked_sub(mac_len)?);
            if sealed.len() < 2 * BLOCK || !sealed.len().is_multiple_of(BLOCK) {
                return None;
            }
            let expected = self.mac.mac(&self.mac_key, &[&header.additional_data(content_type, sealed.len()), sealed]);
            if !bool::from(expected.ct_eq(tag)) {
                return None;
            }
            let (iv, ciphertext) = sealed.split_at(BLOCK);
            let mut p = ciphertext.to_vec();
            self.decrypt(iv, &mut p)?;
            let pad = *p.last()? as usize + 1;
            let body_len = p.len().checked_sub(pad)?;
            if !p[body_len..].iter().all(|&b| b as usize + 1 == pad) {
                return None;
            }
            p.truncate(body_len);
            return Some(p);
        }
        if fragment.len() < BLOCK + (mac_len + 1).next_multiple_of(BLOCK) || !fragment.len().is_multiple_of(BLOCK) {
            return None;
        }
        let (iv, ciphertext) = fragment.split_at(BLOCK);
        let mut p = ciphertext.to_vec();
        self.decrypt(iv, &mut p)?;
        let pad = *p.last()? as usize + 1;
        let pad_ok = pad + mac_len <= p.len() && p[p.len() - pad..].iter().all(|&b| b as usize + 1 == pad);
        // With bad padding, check the MAC as if there were none, so both failures cost alike.
        let body_len = p.len() - mac_len - if pad_ok { pad } else { 1 };
        let (body, rest) = p.split_at(body_len);
        let expected = self.mac.mac(&self.mac_key, &[&header.additional_data(content_type, body_len), body]);
        let mac_ok: bool = expected.ct_eq(&rest[..mac_len]).into();
        if !(pad_ok & mac_ok) {
            return None;
        }
        p.truncate(body_len);
        Some(p)
    }

    /// Appends a record's fragment for `plain` to `out`: a fresh random IV, the ciphertext and
    /// (with encrypt-then-MAC) the MAC.
    pub fn seal_into(&self, header: Header<'_>, content_type: u8, plain: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let iv: [u8; BLOCK] = rand::random();
        let fragment_start = out.len();
        out.extend_from_slice(&iv);
        let start = out.len();
        out.extend_from_slice(plain);
        if !self.encrypt_then_mac {
            out.extend(self.mac.mac(&self.mac_key, &[&header.additional_data(content_type, plain.len()), plain]));
        }
        let pad = BLOCK - (out.len() - start) % BLOCK;
        out.extend(std::iter::repeat_n((pad - 1) as u8, pad));
        self.encrypt(&iv, &mut out[start..])?;
        if self.encrypt_then_mac {
            let sealed = &out[fragment_start..];
            let tag = self.mac.mac(&self.mac_key, &[&header.additional_data(content_type, sealed.len()), sealed]);
            out.extend(tag);
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_tampering_in_both_modes() {
        for etm in [false, true] {
            for (key, mac) in
                [(&[7u8; 16][..], MacHash::Sha1), (&[9u8; 32][..], MacHash::Sha256), (&[3u8; 32][..], MacHash::Sha384)]
            {
                let k = CbcKeys::new(key, &[1u8; 48][..mac.len()], mac, etm);
                let es = Header { epoch_seq: &[0, 1, 0, 0, 0, 0, 0, 5], cid: None };
                for len in [0, 1, 15, 16, 17, 100] {
                    let plain: Vec<u8> = (0..len as u8).collect();
                    let mut f = Vec::new();
                    k.seal_into(es, 23, &plain, &mut f).unwrap();
                    assert_eq!(k.open(es, 23, &f), Some(plain.clone()), "etm {etm} {mac:?} {len}");
                    assert_eq!(
                        k.open(Header { epoch_seq: &[0, 1, 0, 0, 0, 0, 0, 6], cid: None }, 23, &f),
                        None,
                        "wrong sequence number"
                    );
                    assert_eq!(k.open(es, 21, &f), None, "wrong type");
                    for i in [0, f.len() / 2, f.len() - 1] {
                        let mut t = f.clone();
                        t[i] ^= 0x80;
                        assert_eq!(k.open(es, 23, &t), None, "flipped byte {i}");
                    }
                }
                assert_eq!(k.open(es, 23, &[0u8; 5]), None);
                assert_eq!(k.open(es, 23, &[]), None);
            }
        }
    }
}

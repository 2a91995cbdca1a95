//! Port 5682 payload encryption (seed 002 §3.3 "symmetric encryption", SPEC §3.2):
//! AES-128-CBC with a per-session key, a fixed IV and PKCS#7 padding.

use aes::Aes128;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit, block_padding::Pkcs7};
use sha2::{Digest, Sha256};

/// The IV every Alibaba CoAP client uses (it is a constant in their SDKs).
pub const IV: &[u8; 16] = b"543yhjy97ae7fyfg";

/// The AES key of one 5682 session.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey([u8; 16]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("ciphertext length is not a positive multiple of 16")]
    Length,
    #[error("bad PKCS#7 padding")]
    Padding,
}

impl SessionKey {
    /// Bytes 8..24 of SHA-256(DeviceSecret + "," + random).
    pub fn derive(device_secret: &str, random: &str) -> SessionKey {
        let mut h = Sha256::new();
        h.update(device_secret.as_bytes());
        h.update(b",");
        h.update(random.as_bytes());
        let digest = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[8..24]);
        SessionKey(key)
    }

    pub fn from_bytes(key: [u8; 16]) -> SessionKey {
        SessionKey(key)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn encrypt(&self, plaintext: &[u8]) -> Vec<u8> {
        cbc::Encryptor::<Aes128>::new(&self.0.into(), IV.into()).encrypt_padded_vec::<Pkcs7>(plaintext)
    }

    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, DecryptError> {
        if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(16) {
            return Err(DecryptError::Length);
        }
        cbc::Decryptor::<Aes128>::new(&self.0.into(), IV.into())
            .decrypt_padded_vec::<Pkcs7>(ciphertext)
            .map_err(|_| DecryptError::Padding)
    }

    /// Option 2089: the decimal ASCII sequence number, encrypted.
    pub fn encrypt_seq(&self, seq: u64) -> Vec<u8> {
        self.encrypt(seq.to_string().as_bytes())
    }

    /// Reads option 2089; `None` if it does not decrypt to a decimal number.
    pub fn decrypt_seq(&self, option: &[u8]) -> Option<u64> {
        let plain = self.decrypt(option).ok()?;
        if plain.is_empty() || plain.len() > 20 || !plain.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(&plain).ok()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const RANDOM: &str = "8fe3c8d50e1012ab";

    #[test]
    fn key_derivation_vector() {
        let key = SessionKey::derive(SECRET, RANDOM);
        assert_eq!(hex::encode(key.as_bytes()), "fb29cf5d15d6aabf8b782c2374fdf793");
    }

    #[test]
    fn seq_vector() {
        let key = SessionKey::derive(SECRET, RANDOM);
        assert_eq!(hex::encode(key.encrypt_seq(1)), "0a404a5e47a4b33813e01cdcc149df49");
        assert_eq!(key.decrypt_seq(&hex::decode("0a404a5e47a4b33813e01cdcc149df49").unwrap()), Some(1));
    }

    #[test]
    fn payload_round_trip_and_tamper() {
        let key = SessionKey::derive(SECRET, RANDOM);
        for len in [0usize, 1, 15, 16, 17, 1000] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let ct = key.encrypt(&plain);
            assert_eq!(ct.len(), (len / 16 + 1) * 16);
            assert_eq!(key.decrypt(&ct).unwrap(), plain);
        }
        let mut ct = key.encrypt(b"{\"temp\":21}");
        *ct.last_mut().unwrap() ^= 0x55;
        assert_eq!(key.decrypt(&ct), Err(DecryptError::Padding));
        assert_eq!(key.decrypt(&ct[..15]), Err(DecryptError::Length));
        assert_eq!(key.decrypt(&[]), Err(DecryptError::Length));
        assert_eq!(key.decrypt_seq(&key.encrypt(b"12a")), None);
    }
}

//! Secrets at rest: with `store.secrets_key` set, DeviceSecrets, raw PSKs and ProductSecrets are
//! stored sealed with AES-256-GCM as `sealed:v1:<base64 of nonce | ciphertext>`; without it, as
//! given. Both forms are read, so a key can be added to an existing store: each secret is sealed
//! when its record is next written. A sealed secret without the key (or with another key) makes
//! the record unreadable, which stops the server at start with a message naming the setting.
//!
//! The key is process-wide, set once at start: records are (de)serialised by serde, which passes
//! no context.

use std::sync::OnceLock;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serializer};

use crate::identity::Secret;

const PREFIX: &str = "sealed:v1:";
const NONCE_LEN: usize = 12;

static KEY: OnceLock<Aes256Gcm> = OnceLock::new();

/// Seals secrets written from now on with `key` (32 bytes). False if a key was set already.
pub fn set_key(key: &[u8; 32]) -> bool {
    KEY.set(Aes256Gcm::new(key.into())).is_ok()
}

fn seal(plain: &str) -> String {
    let Some(cipher) = KEY.get() else { return plain.to_string() };
    let nonce: [u8; NONCE_LEN] = rand::random();
    let sealed = cipher.encrypt(&Nonce::<Aes256Gcm>::from(nonce), plain.as_bytes()).expect("AES-GCM seals any length");
    let mut out = nonce.to_vec();
    out.extend(sealed);
    format!("{PREFIX}{}", STANDARD.encode(out))
}

fn open(stored: &str) -> Result<String, String> {
    let Some(b64) = stored.strip_prefix(PREFIX) else { return Ok(stored.to_string()) };
    let cipher = KEY.get().ok_or("a secret is sealed and no store.secrets_key is set")?;
    let raw = STANDARD.decode(b64).map_err(|_| "a sealed secret is not base64")?;
    if raw.len() < NONCE_LEN {
        return Err("a sealed secret is too short".into());
    }
    let (nonce, sealed) = raw.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at the nonce length");
    let plain = cipher
        .decrypt(&Nonce::<Aes256Gcm>::from(nonce), sealed)
        .map_err(|_| "a sealed secret does not open with store.secrets_key (another key sealed it)")?;
    String::from_utf8(plain).map_err(|_| "a sealed secret is not text".into())
}

/// A binary record holding secrets (a DTLS session's keys): one byte saying how it is kept (0
/// as given, 1 sealed), then the bytes, or the nonce and ciphertext.
pub fn seal_bytes(plain: &[u8]) -> Vec<u8> {
    let Some(cipher) = KEY.get() else { return [&[0u8][..], plain].concat() };
    let nonce: [u8; NONCE_LEN] = rand::random();
    let sealed = cipher.encrypt(&Nonce::<Aes256Gcm>::from(nonce), plain).expect("AES-GCM seals any length");
    [&[1u8][..], &nonce, &sealed].concat()
}

/// The bytes [`seal_bytes`] kept.
pub fn open_bytes(stored: &[u8]) -> Result<Vec<u8>, &'static str> {
    match stored.split_first() {
        Some((0, plain)) => Ok(plain.to_vec()),
        Some((1, sealed)) if sealed.len() >= NONCE_LEN => {
            let cipher = KEY.get().ok_or("sealed and no store.secrets_key is set")?;
            let (nonce, sealed) = sealed.split_at(NONCE_LEN);
            let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at the nonce length");
            cipher
                .decrypt(&Nonce::<Aes256Gcm>::from(nonce), sealed)
                .map_err(|_| "does not open with store.secrets_key (another key sealed it)")
        }
        _ => Err("not a sealed record"),
    }
}

/// `#[serde(with = "sealed::secret")]` for a [`Secret`].
pub mod secret {
    use super::*;

    pub fn serialize<S: Serializer>(s: &Secret, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&seal(s.expose()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Secret, D::Error> {
        let stored = String::deserialize(de)?;
        let plain = open(&stored).map_err(serde::de::Error::custom)?;
        Secret::new(plain).map_err(serde::de::Error::custom)
    }
}

/// `#[serde(with = "sealed::optional")]` for an optional secret kept as text (a PSK in hex).
pub mod optional {
    use super::*;

    pub fn serialize<S: Serializer>(s: &Option<String>, ser: S) -> Result<S::Ok, S::Error> {
        match s {
            Some(s) => ser.serialize_some(&seal(s)),
            None => ser.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
        Option::<String>::deserialize(de)?.map(|s| open(&s)).transpose().map_err(serde::de::Error::custom)
    }
}

//! The names things have: products, devices, secrets, tokens. Each type validates on construction
//! so the rest of the server never handles an unchecked identifier.

use std::borrow::Borrow;
use std::fmt;

use rand::RngExt;
use serde::{Deserialize, Serialize};

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn random_string(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len).map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is invalid: {rule}")]
pub struct InvalidIdentifier {
    pub what: &'static str,
    pub value: String,
    pub rule: &'static str,
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $what:literal, $rule:literal, $valid:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<$name, InvalidIdentifier> {
                let value = value.into();
                let valid: fn(&str) -> bool = $valid;
                if valid(&value) {
                    Ok($name(value))
                } else {
                    Err(InvalidIdentifier { what: $what, value, rule: $rule })
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// `s` is `min..=max` bytes of ASCII letters, digits and `extra`.
pub fn name_chars(s: &str, min: usize, max: usize, extra: &[u8]) -> bool {
    (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

identifier!(
    /// Identifies a product; 11 alphanumeric characters when generated.
    ProductKey, "product key", "1 to 32 characters of A-Z a-z 0-9 _ -",
    |s| name_chars(s, 1, 32, b"_-")
);
identifier!(
    /// Unique within a product (Alibaba's rule: letters, digits and - _ @ . :).
    DeviceName, "device name", "1 to 64 characters of A-Z a-z 0-9 - _ @ . :",
    |s| name_chars(s, 1, 64, b"-_@.:")
);
identifier!(
    /// Huawei-style node id (usually the 15-digit IMEI), unique across the instance.
    NodeId, "node id", "1 to 64 characters of A-Z a-z 0-9 - _",
    |s| name_chars(s, 1, 64, b"-_")
);

identifier!(
    /// Names an nbhub instance among the peers devices are distributed between (SPEC §10).
    InstanceName, "instance name", "1 to 32 characters of A-Z a-z 0-9 _ -",
    |s| name_chars(s, 1, 32, b"_-")
);

impl ProductKey {
    pub fn generate() -> ProductKey {
        ProductKey(random_string(11))
    }
}

impl DeviceName {
    pub fn generate() -> DeviceName {
        DeviceName(random_string(20))
    }
}

/// A secret shared with a device or product. Never printed: `Debug` hides it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Result<Secret, InvalidIdentifier> {
        let value = value.into();
        if (1..=128).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Secret(value))
        } else {
            Err(InvalidIdentifier { what: "secret", value: String::new(), rule: "1 to 128 printable ASCII characters" })
        }
    }
    /// DeviceSecrets are 32 characters, ProductSecrets 16 (as Alibaba issues them).
    pub fn generate(len: usize) -> Secret {
        Secret(random_string(len))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Internal compact device number: the prefix of its message keys, so a device's messages are
/// one contiguous range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct DeviceId(pub u64);

/// Opaque session token handed out by `/auth`: 32 hex characters, 128 random bits. Held inline,
/// since every uplink copies its token into the writes it makes. Hashed as its bytes (as an
/// array hashes), so a map keyed by tokens is searched by the bytes a request carries.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token([u8; 32]);

impl Token {
    pub fn generate() -> Token {
        let random: [u8; 16] = rand::random();
        let mut t = [0; 32];
        hex::encode_to_slice(random, &mut t).expect("16 bytes are 32 hex characters");
        Token(t)
    }
    /// A token as found on the wire or in the store: only the server's own form is one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Token> {
        bytes.try_into().ok().map(Token)
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("<binary>")
    }
}

impl Borrow<[u8]> for Token {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for Token {
    /// Tokens are credentials: only a prefix is ever shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.as_str();
        let end = (0..=s.len().min(6)).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        let shown = &s[..end];
        write!(f, "Token({shown}..)")
    }
}

/// The CoAP token of a Huawei device's observe relation on `/t/d`: chosen by the server at bind,
/// carried by every uplink, so it names the device whatever address a NAT gives it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObserveToken(pub [u8; 8]);

impl ObserveToken {
    pub fn generate() -> ObserveToken {
        ObserveToken(rand::random())
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<ObserveToken> {
        bytes.try_into().ok().map(ObserveToken)
    }
}

impl fmt::Debug for ObserveToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObserveToken({})", hex::encode(self.0))
    }
}

impl serde::Serialize for ObserveToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for ObserveToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(&s)
            .ok()
            .and_then(|b| ObserveToken::from_bytes(&b))
            .ok_or_else(|| serde::de::Error::custom(format!("observe token {s:?} is not 8 bytes of hex")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_their_bytes() {
        assert!(Token::from_bytes(b"").is_none());
        assert!(Token::from_bytes(&[b'a'; 31]).is_none());
        assert!(Token::from_bytes(&[b'a'; 33]).is_none());
        let t = Token::generate();
        assert_eq!(t.as_str().len(), 32);
        assert!(t.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(Token::from_bytes(t.as_bytes()), Some(t.clone()));
        // found in a map by the bytes a request carries
        let map: std::collections::HashMap<Token, u8> = [(t.clone(), 1)].into();
        assert_eq!(map.get(t.as_bytes()), Some(&1));
        // a credential: only a prefix is shown, and a multi-byte character there is no panic
        assert_eq!(format!("{:?}", Token::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap()), "Token(012345..)");
        let odd = Token::from_bytes(format!("abcdeé{}", "x".repeat(25)).as_bytes()).unwrap();
        assert_eq!(format!("{odd:?}"), "Token(abcde..)");
    }

    #[test]
    fn validation() {
        assert!(ProductKey::new("a1B2c3D4e5F").is_ok());
        assert!(ProductKey::new("").is_err());
        assert!(ProductKey::new("a b").is_err());
        assert!(DeviceName::new("dev-1@site.a:2").is_ok());
        assert!(DeviceName::new("x".repeat(65)).is_err());
        assert!(NodeId::new("861234567890123").is_ok());
        assert!(Secret::new("with space").is_err());
        assert_eq!(ProductKey::generate().as_str().len(), 11);
        assert_eq!(Secret::generate(32).expose().len(), 32);
    }

    #[test]
    fn secrets_and_tokens_do_not_leak_through_debug() {
        let s = Secret::new("topsecret").unwrap();
        assert!(!format!("{s:?}").contains("topsecret"));
        let t = Token::generate();
        assert_eq!(t.as_bytes().len(), 32);
        assert!(!format!("{t:?}").contains(t.as_str()));
    }
}

/// Where a device is served. Only `Here` devices may authenticate; the others are answered by
/// bootstrap with their new home, so a device is never served by two instances at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "state", content = "instance")]
pub enum Home {
    #[default]
    Here,
    /// Being handed to the instance: refused here until it took the device (or the move failed).
    Leaving(InstanceName),
    /// Served by the instance.
    Moved(InstanceName),
    /// Being taken from another instance: not served until its record is stored (the stored
    /// record already says `Here`, so this is never stored).
    Arriving,
    /// Given back to the instance it came from (a rollback), until that instance confirms it
    /// stored it; then it is removed here.
    Released(InstanceName),
}

impl Home {
    pub fn is_here(&self) -> bool {
        matches!(self, Home::Here)
    }

    /// The instance the device lives at or is moving to; `None` for here.
    pub fn elsewhere(&self) -> Option<&InstanceName> {
        match self {
            Home::Here | Home::Arriving => None,
            Home::Leaving(i) | Home::Moved(i) | Home::Released(i) => Some(i),
        }
    }
}

//! DTLS PSK identities (SPEC §3.3): which device a ClientKeyExchange names, and the key it must
//! hold. Pure functions over a [`Keys`] lookup (the registry, or a table in tests); the handshake
//! calls [`resolve`] from OpenSSL's PSK callback.

use crate::auth::sign::SignMethod;
use crate::identity::{DeviceId, Secret};

/// What an identity can name: the devices and the keying material they hold.
pub trait Keys: Send + Sync {
    fn by_names(&self, product_key: &str, device_name: &str) -> Option<Holder>;
    fn by_node(&self, node: &str) -> Option<Holder>;
}

/// A device as PSK lookup sees it.
pub struct Holder {
    pub device: DeviceId,
    pub secret: Secret,
    /// Its provisioned raw PSK, hex.
    pub psk_hex: Option<String>,
    /// Whether it may open a session here now.
    pub served: Result<(), Refusal>,
}

/// The identity forms devices send.
#[derive(Debug, PartialEq, Eq)]
pub enum PskIdentity<'a> {
    /// Alibaba Link SDK 4.x: `devicename|<method>|{pk}&{dn}|<timestamp>`; the PSK is derived from
    /// the DeviceSecret, so the device needs nothing beyond its triple.
    LinkSdk { method: SignMethod, product_key: &'a str, device_name: &'a str, timestamp: &'a str },
    /// `{pk}&{dn}`: the device's provisioned raw PSK, else its DeviceSecret bytes.
    Device { product_key: &'a str, device_name: &'a str },
    /// A node id (IMEI), Huawei/LwM2M style, with the device's raw PSK.
    Node(&'a str),
}

/// Why an identity does not open a session. Only counted: the peer learns nothing beyond a
/// failed handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    UnknownDevice,
    NoKey,
    Disabled,
    /// The device lives at another instance now (SPEC §10).
    Moved,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed_identity",
            Refusal::UnknownDevice => "unknown_identity",
            Refusal::NoKey => "no_psk",
            Refusal::Disabled => "disabled",
            Refusal::Moved => "moved",
        }
    }
}

fn split_triple(s: &str) -> Option<(&str, &str)> {
    let (pk, dn) = s.split_once('&')?;
    (!pk.is_empty() && !dn.is_empty()).then_some((pk, dn))
}

impl<'a> PskIdentity<'a> {
    pub fn parse(identity: &'a [u8]) -> Option<PskIdentity<'a>> {
        let s = std::str::from_utf8(identity).ok()?;
        if s.is_empty() || s.bytes().any(|b| b < 0x20) {
            return None;
        }
        if s.contains('|') {
            let mut parts = s.split('|');
            let (Some("devicename"), Some(method), Some(triple), Some(timestamp), None) =
                (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            let method = SignMethod::parse(method)?;
            let (product_key, device_name) = split_triple(triple)?;
            if timestamp.is_empty() || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            return Some(PskIdentity::LinkSdk { method, product_key, device_name, timestamp });
        }
        if s.contains('&') {
            let (product_key, device_name) = split_triple(s)?;
            return Some(PskIdentity::Device { product_key, device_name });
        }
        Some(PskIdentity::Node(s))
    }
}

/// The Link SDK's PSK: ASCII uppercase hex of HMAC(DeviceSecret, "id{pk}&{dn}timestamp{ts}").
pub fn link_sdk_psk(
    method: SignMethod,
    secret: &str,
    product_key: &str,
    device_name: &str,
    timestamp: &str,
) -> Vec<u8> {
    let content = format!("id{product_key}&{device_name}timestamp{timestamp}");
    hex::encode_upper(method.mac(secret.as_bytes(), content.as_bytes())).into_bytes()
}

/// The device `identity` names and the PSK it must prove.
pub fn resolve(keys: &dyn Keys, identity: &[u8]) -> Result<(DeviceId, Vec<u8>), Refusal> {
    let parsed = PskIdentity::parse(identity).ok_or(Refusal::Malformed)?;
    let (holder, key) = match parsed {
        PskIdentity::LinkSdk { method, product_key, device_name, timestamp } => {
            let holder = keys.by_names(product_key, device_name).ok_or(Refusal::UnknownDevice)?;
            let key = link_sdk_psk(method, holder.secret.expose(), product_key, device_name, timestamp);
            (holder, key)
        }
        PskIdentity::Device { product_key, device_name } => {
            let holder = keys.by_names(product_key, device_name).ok_or(Refusal::UnknownDevice)?;
            let key = match raw_psk(&holder) {
                Some(k) => k,
                None => holder.secret.expose().as_bytes().to_vec(),
            };
            (holder, key)
        }
        PskIdentity::Node(node) => {
            let holder = keys.by_node(node).ok_or(Refusal::UnknownDevice)?;
            let key = raw_psk(&holder).ok_or(Refusal::NoKey)?;
            (holder, key)
        }
    };
    holder.served?;
    Ok((holder.device, key))
}

fn raw_psk(holder: &Holder) -> Option<Vec<u8>> {
    holder.psk_hex.as_deref().and_then(|h| hex::decode(h).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_forms() {
        assert_eq!(
            PskIdentity::parse(b"devicename|hmacsha256|a1B2&dev-1|2524608000000"),
            Some(PskIdentity::LinkSdk {
                method: SignMethod::HmacSha256,
                product_key: "a1B2",
                device_name: "dev-1",
                timestamp: "2524608000000"
            })
        );
        assert_eq!(
            PskIdentity::parse(b"a1B2&dev-1"),
            Some(PskIdentity::Device { product_key: "a1B2", device_name: "dev-1" })
        );
        assert_eq!(PskIdentity::parse(b"863921034567890"), Some(PskIdentity::Node("863921034567890")));
        for bad in [
            &b""[..],
            b"devicename|hmacsha256|a1B2&dev-1",
            b"devicename|hmacsha256|a1B2&dev-1|12|x",
            b"devicename|rot13|a1B2&dev-1|1",
            b"devicename|hmacsha1|a1B2|1",
            b"devicename|hmacsha1|a1B2&dev|abc",
            b"user|hmacsha1|a1B2&dev|1",
            b"&dev",
            b"pk&",
            b"\xff\xfe",
            b"node\n",
        ] {
            assert_eq!(PskIdentity::parse(bad), None, "{bad:?}");
        }
    }

    /// Devices by names and by node, as a registry would hold them.
    struct Table(Vec<(&'static str, &'static str, Option<&'static str>, Holder)>);

    impl Keys for Table {
        fn by_names(&self, pk: &str, dn: &str) -> Option<Holder> {
            self.0.iter().find(|(p, d, ..)| *p == pk && *d == dn).map(|(.., h)| h.copy())
        }
        fn by_node(&self, node: &str) -> Option<Holder> {
            self.0.iter().find(|(_, _, n, _)| *n == Some(node)).map(|(.., h)| h.copy())
        }
    }

    impl Holder {
        fn copy(&self) -> Holder {
            Holder {
                device: self.device,
                secret: self.secret.clone(),
                psk_hex: self.psk_hex.clone(),
                served: self.served,
            }
        }
    }

    fn holder(id: u64, secret: &str, psk_hex: Option<&str>, served: Result<(), Refusal>) -> Holder {
        Holder {
            device: DeviceId(id),
            secret: Secret::new(secret).unwrap(),
            psk_hex: psk_hex.map(String::from),
            served,
        }
    }

    #[test]
    fn each_identity_form_resolves_to_its_device_and_key() {
        let keys = Table(vec![
            ("pk", "dn", None, holder(1, "s3cret", None, Ok(()))),
            ("pk", "raw", Some("863921034567890"), holder(2, "other", Some("0a0b0c"), Ok(()))),
            ("pk", "off", Some("863921034567891"), holder(3, "x", Some("01"), Err(Refusal::Disabled))),
            ("pk", "gone", None, holder(4, "y", None, Err(Refusal::Moved))),
        ]);
        let link = b"devicename|hmacsha256|pk&dn|2524608000000";
        let expected = link_sdk_psk(SignMethod::HmacSha256, "s3cret", "pk", "dn", "2524608000000");
        assert_eq!(resolve(&keys, link), Ok((DeviceId(1), expected)));
        // `{pk}&{dn}`: the raw PSK when provisioned, else the DeviceSecret's bytes.
        assert_eq!(resolve(&keys, b"pk&dn"), Ok((DeviceId(1), b"s3cret".to_vec())));
        assert_eq!(resolve(&keys, b"pk&raw"), Ok((DeviceId(2), vec![10, 11, 12])));
        // A node id needs a raw PSK.
        assert_eq!(resolve(&keys, b"863921034567890"), Ok((DeviceId(2), vec![10, 11, 12])));
        assert_eq!(resolve(&keys, b"863921034567899"), Err(Refusal::UnknownDevice));
        assert_eq!(resolve(&keys, b"pk&nobody"), Err(Refusal::UnknownDevice));
        assert_eq!(resolve(&keys, b"863921034567891"), Err(Refusal::Disabled));
        assert_eq!(resolve(&keys, b"pk&gone"), Err(Refusal::Moved));
        assert_eq!(resolve(&keys, b"devicename|md4|pk&dn|1"), Err(Refusal::Malformed));
        let no_psk = Table(vec![("pk", "dn", Some("8639"), holder(5, "s", None, Ok(())))]);
        assert_eq!(resolve(&no_psk, b"8639"), Err(Refusal::NoKey));
    }

    #[test]
    fn link_sdk_psk_is_uppercase_hex_of_the_hmac() {
        let psk = link_sdk_psk(SignMethod::HmacSha256, "secret", "pk", "dn", "2524608000000");
        let expected = SignMethod::HmacSha256.mac(b"secret", b"idpk&dntimestamp2524608000000");
        assert_eq!(psk, hex::encode_upper(expected).into_bytes());
        assert_eq!(psk.len(), 64);
        assert_eq!(link_sdk_psk(SignMethod::HmacMd5, "s", "p", "d", "1").len(), 32);
        assert_eq!(link_sdk_psk(SignMethod::HmacSha1, "s", "p", "d", "1").len(), 40);
    }
}

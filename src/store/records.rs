//! What is stored, and how. Rarely written records (products, devices, sessions) are JSON so they
//! can evolve with `serde(default)`; records on the uplink path (messages, presence) are a compact
//! binary layout written without allocation beyond the value itself.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::clock::UnixMs;
use crate::identity::{DeviceId, DeviceName, Home, NodeId, ObserveToken, ProductKey, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OtaProtocol {
    /// Huawei's PCP, in the device's data channel (SPEC §6).
    #[default]
    Pcp,
    /// LwM2M Object 5: the server writes the package's URI and the client fetches it block-wise.
    Lwm2m,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductRecord {
    pub product_key: ProductKey,
    #[serde(with = "super::sealed::secret")]
    pub product_secret: Secret,
    pub name: String,
    pub dynamic_registration: bool,
    pub ota_protocol: OtaProtocol,
    pub awake_window_s: u32,
    pub created_at: u64,
    /// This product's timers for CONs the server sends its devices; unset: `[downlink]` config.
    #[serde(default)]
    pub ack_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_retransmit: Option<u32>,
    /// Its devices may ask `/bootstrap` without a signature (SPEC §10).
    #[serde(default)]
    pub unsigned_bootstrap: bool,
}

/// Radio conditions a device reported or an operator set (used by OTA scheduling).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Radio {
    pub rsrp: Option<f64>,
    pub sinr: Option<f64>,
    pub cell_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub product_key: ProductKey,
    pub device_name: DeviceName,
    #[serde(with = "super::sealed::secret")]
    pub device_secret: Secret,
    pub node_id: Option<NodeId>,
    /// Raw DTLS PSK, hex.
    #[serde(default, with = "super::sealed::optional")]
    pub psk_hex: Option<String>,
    pub enabled: bool,
    /// Dynamic registration has handed out the secret (it is handed out once).
    pub registered: bool,
    #[serde(default)]
    pub radio: Radio,
    pub created_at: u64,
    /// The Huawei observe relation on `/t/d` (SPEC §4), kept across restarts.
    #[serde(default)]
    pub observe: Option<ObserveToken>,
    /// The firmware or software version the device last reported over PCP.
    #[serde(default)]
    pub version: Option<String>,
    /// Where it is served (SPEC §10).
    #[serde(default)]
    pub home: Home,
    /// Its LwM2M registration, while it has one: its relation is then on `/19/0/0` and commands
    /// go down as writes to `/19/1/0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<Registration>,
    /// The observation of its LwM2M firmware update state (`/5/0/3`), kept across
    /// re-registration: the client reports its update's result under it after rebooting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_observe: Option<ObserveToken>,
}

/// An LwM2M client's registration (OMA LwM2M 1.x, Register and Update).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The `lwm2m` version it registered with.
    pub version: String,
    /// Seconds without an Update after which it ends.
    pub lifetime_s: u32,
    /// Queue mode (`b=UQ`): the client listens only for a while after each message it sends.
    pub queue: bool,
    /// Its objects and instances as it listed them (`/3/0`, `/19/0`, …).
    pub objects: Vec<String>,
    /// When it registered or last updated.
    pub updated_at: u64,
}

impl Registration {
    /// Whether its lifetime passed without an Update.
    pub fn expired(&self, now: UnixMs) -> bool {
        now.0 >= self.updated_at.saturating_add(self.lifetime_s as u64 * 1000)
    }
}

/// Last contact of a device; written at most once per device per committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRecord {
    pub last_seen: UnixMs,
    pub address: Option<SocketAddr>,
}

impl PresenceRecord {
    pub fn encode(&self) -> Vec<u8> {
        let addr = self.address.map(|a| a.to_string()).unwrap_or_default();
        let mut out = Vec::with_capacity(8 + addr.len());
        out.extend_from_slice(&self.last_seen.0.to_le_bytes());
        out.extend_from_slice(addr.as_bytes());
        out
    }

    pub fn decode(data: &[u8]) -> Option<PresenceRecord> {
        let last_seen = UnixMs(u64::from_le_bytes(data.get(..8)?.try_into().ok()?));
        let addr = std::str::from_utf8(&data[8..]).ok()?;
        Some(PresenceRecord { last_seen, address: addr.parse().ok() })
    }
}

/// A stored uplink: `received_at (u64 LE) | topic length (u16 LE) | topic | payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub received_at: UnixMs,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl MessageRecord {
    pub fn encode_parts(received_at: UnixMs, topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + topic.len() + payload.len());
        out.extend_from_slice(&received_at.0.to_le_bytes());
        out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    pub fn decode(data: &[u8]) -> Option<MessageRecord> {
        let received_at = UnixMs(u64::from_le_bytes(data.get(..8)?.try_into().ok()?));
        let tlen = u16::from_le_bytes(data.get(8..10)?.try_into().ok()?) as usize;
        let topic = std::str::from_utf8(data.get(10..10 + tlen)?).ok()?.to_string();
        Some(MessageRecord { received_at, topic, payload: data[10 + tlen..].to_vec() })
    }
}

/// What a codec read from a stored message: `received_at (u64 LE) | JSON` (the time first, so
/// it expires with its message), the JSON being `{"codec_version", "decoded" | "error"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedRecord {
    pub received_at: UnixMs,
    pub codec_version: u32,
    pub outcome: Result<serde_json::Value, DecodeFailure>,
}

/// Why a codec read nothing, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeFailure {
    pub kind: String,
    pub message: String,
}

#[derive(Serialize, Deserialize)]
struct DecodedBody {
    codec_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decoded: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<DecodeFailure>,
}

impl DecodedRecord {
    pub fn encode(&self) -> Vec<u8> {
        let (decoded, error) = match &self.outcome {
            Ok(v) => (Some(v.clone()), None),
            Err(e) => (None, Some(e.clone())),
        };
        let mut out = self.received_at.0.to_le_bytes().to_vec();
        let body = DecodedBody { codec_version: self.codec_version, decoded, error };
        serde_json::to_writer(&mut out, &body).expect("JSON serialises");
        out
    }

    pub fn decode(data: &[u8]) -> Option<DecodedRecord> {
        let received_at = UnixMs(u64::from_le_bytes(data.get(..8)?.try_into().ok()?));
        let body: DecodedBody = serde_json::from_slice(&data[8..]).ok()?;
        let outcome = match (body.decoded, body.error) {
            (_, Some(e)) => Err(e),
            (Some(v), None) => Ok(v),
            (None, None) => return None,
        };
        Some(DecodedRecord { received_at, codec_version: body.codec_version, outcome })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_records_round_trip() {
        let m = MessageRecord { received_at: UnixMs(42), topic: "/pk/dn/update".into(), payload: vec![0, 255, 1] };
        assert_eq!(MessageRecord::decode(&MessageRecord::encode_parts(m.received_at, &m.topic, &m.payload)), Some(m));
        let p = PresenceRecord { last_seen: UnixMs(7), address: Some("[::1]:5683".parse().unwrap()) };
        assert_eq!(PresenceRecord::decode(&p.encode()), Some(p));
        assert_eq!(MessageRecord::decode(&[1, 2]), None);
        for outcome in [
            Ok(serde_json::json!({"params": {"t": 1}})),
            Err(DecodeFailure { kind: "thrown".into(), message: "bad".into() }),
        ] {
            let d = DecodedRecord { received_at: UnixMs(9), codec_version: 2, outcome };
            assert_eq!(DecodedRecord::decode(&d.encode()), Some(d));
        }
    }
}

/// Id of a stored uplink, assigned at commit so ids grow in commit order (cursor paging relies on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

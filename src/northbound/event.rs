//! Events and how the outbox stores them: `kind (1 byte) | time (u64 LE ms) | body`. For most
//! kinds the body is the exact JSON a subscriber receives. An uplink event only names the stored
//! message (`device | message id | names`): it is rendered from the message at delivery, which
//! keeps the uplink path cheap and the event exactly what was stored. Either way a redelivery is
//! byte-identical.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

use crate::clock::UnixMs;
use crate::identity::{DeviceId, DeviceName, ProductKey};
use crate::store::records::{DecodedRecord, MessageRecord};
use crate::store::{MessageId, OutboxEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Uplink,
    DeviceStatus,
    CommandStatus,
    OtaProgress,
    Shadow,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        EventKind::Uplink,
        EventKind::DeviceStatus,
        EventKind::CommandStatus,
        EventKind::OtaProgress,
        EventKind::Shadow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Uplink => "uplink",
            EventKind::DeviceStatus => "device_status",
            EventKind::CommandStatus => "command_status",
            EventKind::OtaProgress => "ota_progress",
            EventKind::Shadow => "shadow",
        }
    }

    pub fn bit(self) -> u8 {
        1 << self as u8
    }

    fn from_byte(b: u8) -> Option<EventKind> {
        EventKind::ALL.get(b as usize).copied()
    }
}

/// The kinds at least one subscription wants. Nothing is appended to the outbox for a kind nobody
/// wants, so without subscribers events cost nothing.
#[derive(Default)]
pub struct Wanted(AtomicU8);

impl Wanted {
    pub fn wants(&self, kind: EventKind) -> bool {
        self.0.load(Ordering::Relaxed) & kind.bit() != 0
    }

    pub fn set(&self, kinds: impl IntoIterator<Item = EventKind>) {
        self.0.store(kinds.into_iter().fold(0, |m, k| m | k.bit()), Ordering::Relaxed);
    }
}

/// An event to append; the writer gives it its id.
#[derive(Debug)]
pub struct Event {
    pub kind: EventKind,
    pub product_key: ProductKey,
    pub device_name: DeviceName,
    pub time: UnixMs,
    pub data: serde_json::Value,
}

/// The outbox record for this event under `id`.
impl OutboxEvent for Event {
    fn encode(&self, id: u64) -> Vec<u8> {
        let body = serde_json::json!({
            "event_id": id.to_string(),
            "event": self.kind.as_str(),
            "time": self.time.rfc3339(),
            "product_key": self.product_key,
            "device_name": self.device_name,
            "data": self.data,
        });
        let mut out = Vec::with_capacity(256);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.time.0.to_le_bytes());
        serde_json::to_writer(&mut out, &body).expect("an event serialises");
        out
    }
}

/// The outbox record of an uplink event: it names the stored message, and the device (which the
/// store knows only by number) by its names.
pub fn uplink_record(
    product_key: &ProductKey,
    device_name: &DeviceName,
    device: DeviceId,
    message: MessageId,
    received_at: UnixMs,
) -> Vec<u8> {
    let (pk, dn) = (product_key.as_str(), device_name.as_str());
    let mut out = Vec::with_capacity(26 + pk.len() + dn.len());
    out.push(EventKind::Uplink as u8);
    out.extend_from_slice(&received_at.0.to_le_bytes());
    out.extend_from_slice(&device.0.to_be_bytes());
    out.extend_from_slice(&message.0.to_be_bytes());
    out.push(pk.len() as u8);
    out.extend_from_slice(pk.as_bytes());
    out.extend_from_slice(dn.as_bytes());
    out
}

/// An outbox record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The body, ready to send.
    Body(bytes::Bytes),
    /// An uplink event, to render from its stored message.
    Uplink { device: DeviceId, message: MessageId, product_key: String, device_name: String },
}

impl Record {
    pub fn decode(record: &[u8]) -> Option<(EventKind, UnixMs, Record)> {
        let kind = EventKind::from_byte(*record.first()?)?;
        let time = UnixMs(u64::from_le_bytes(record.get(1..9)?.try_into().ok()?));
        let rest = &record[9..];
        if kind != EventKind::Uplink {
            return Some((kind, time, Record::Body(bytes::Bytes::copy_from_slice(rest))));
        }
        let device = DeviceId(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?));
        let message = MessageId(u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?));
        let pk_len = *rest.get(16)? as usize;
        let product_key = std::str::from_utf8(rest.get(17..17 + pk_len)?).ok()?.to_string();
        let device_name = std::str::from_utf8(rest.get(17 + pk_len..)?).ok()?.to_string();
        Some((kind, time, Record::Uplink { device, message, product_key, device_name }))
    }
}

/// An event whose outbox record was encoded before its id was known: an uplink's, kept in the
/// decode queue until the codec has read its message.
#[derive(Debug)]
pub struct Prepared(pub Vec<u8>);

impl OutboxEvent for Prepared {
    fn encode(&self, _id: u64) -> Vec<u8> {
        self.0.clone()
    }
}

/// A stored message as the messages API and uplink events show it, with what its codec read.
pub fn message_view(message: MessageId, m: &MessageRecord, decoded: Option<&DecodedRecord>) -> serde_json::Value {
    use base64::Engine;
    let mut view = serde_json::json!({
        "id": message.0.to_string(),
        "topic": m.topic,
        "received_at": m.received_at.rfc3339(),
        "payload_base64": base64::engine::general_purpose::STANDARD.encode(&m.payload),
    });
    if let Some(d) = decoded {
        view["codec_version"] = d.codec_version.into();
        match &d.outcome {
            Ok(v) => view["decoded"] = v.clone(),
            Err(e) => view["decode_error"] = serde_json::json!({"kind": e.kind, "message": e.message}),
        }
    }
    view
}

/// The body of uplink event `id` about `message` as stored (as the messages API shows it).
pub fn render_uplink(
    id: u64,
    pk: &str,
    dn: &str,
    message: MessageId,
    m: &MessageRecord,
    decoded: Option<&DecodedRecord>,
) -> bytes::Bytes {
    let body = serde_json::json!({
        "event_id": id.to_string(),
        "event": EventKind::Uplink.as_str(),
        "time": m.received_at.rfc3339(),
        "product_key": pk,
        "device_name": dn,
        "data": message_view(message, m, decoded),
    });
    bytes::Bytes::from(serde_json::to_vec(&body).expect("an event serialises"))
}

/// An event ready for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: u64,
    pub kind: EventKind,
    pub time: UnixMs,
    pub product_key: String,
    pub device_name: String,
    pub body: bytes::Bytes,
}

/// The device an event body is about, as it names it.
#[derive(Deserialize)]
pub struct About {
    pub product_key: String,
    pub device_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_records_round_trip() {
        let e = Event {
            kind: EventKind::CommandStatus,
            product_key: ProductKey::new("pk").unwrap(),
            device_name: DeviceName::new("dn").unwrap(),
            time: UnixMs(1_795_426_240_123),
            data: serde_json::json!({"status": "SENT"}),
        };
        let (kind, time, Record::Body(body)) = Record::decode(&e.encode(7)).unwrap() else { panic!("a body") };
        assert_eq!((kind, time), (EventKind::CommandStatus, e.time));
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["event_id"], "7");
        assert_eq!(body["event"], "command_status");
        assert_eq!(body["time"], "2026-11-23T09:30:40.123Z");
        assert_eq!(body["data"]["status"], "SENT");
        let record = uplink_record(&e.product_key, &e.device_name, DeviceId(3), MessageId(9), e.time);
        let expected = Record::Uplink {
            device: DeviceId(3),
            message: MessageId(9),
            product_key: "pk".into(),
            device_name: "dn".into(),
        };
        assert_eq!(Record::decode(&record), Some((EventKind::Uplink, e.time, expected)));
        let w = Wanted::default();
        w.set([EventKind::Uplink, EventKind::OtaProgress]);
        assert!(w.wants(EventKind::Uplink) && !w.wants(EventKind::CommandStatus));
    }
}

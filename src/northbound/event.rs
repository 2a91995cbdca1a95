//! Events and how the outbox stores them: `kind (1 byte) | time (u64 LE ms) | body`, where the
//! body is the exact JSON a subscriber receives, so a redelivery is byte-identical.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

use crate::clock::UnixMs;
use crate::identity::{DeviceName, ProductKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Uplink,
    DeviceStatus,
    CommandStatus,
    OtaProgress,
}

impl EventKind {
    pub const ALL: [EventKind; 4] =
        [EventKind::Uplink, EventKind::DeviceStatus, EventKind::CommandStatus, EventKind::OtaProgress];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Uplink => "uplink",
            EventKind::DeviceStatus => "device_status",
            EventKind::CommandStatus => "command_status",
            EventKind::OtaProgress => "ota_progress",
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

/// Names the device an uplink event is about (the store knows devices only by number).
#[derive(Debug, Clone)]
pub struct EventSource {
    pub product_key: ProductKey,
    pub device_name: DeviceName,
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

impl Event {
    /// The outbox record for this event under `id`.
    pub fn encode(&self, id: u64) -> Vec<u8> {
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

/// An event read back from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: u64,
    pub kind: EventKind,
    pub time: UnixMs,
    pub body: bytes::Bytes,
}

impl Stored {
    pub fn decode(id: u64, record: &[u8]) -> Option<Stored> {
        let kind = EventKind::from_byte(*record.first()?)?;
        let time = UnixMs(u64::from_le_bytes(record.get(1..9)?.try_into().ok()?));
        Some(Stored { id, kind, time, body: bytes::Bytes::copy_from_slice(&record[9..]) })
    }
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
        let s = Stored::decode(7, &e.encode(7)).unwrap();
        assert_eq!((s.id, s.kind, s.time), (7, EventKind::CommandStatus, e.time));
        let body: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(body["event_id"], "7");
        assert_eq!(body["event"], "command_status");
        assert_eq!(body["time"], "2026-11-23T09:30:40.123Z");
        assert_eq!(body["data"]["status"], "SENT");
        let w = Wanted::default();
        w.set([EventKind::Uplink, EventKind::OtaProgress]);
        assert!(w.wants(EventKind::Uplink) && !w.wants(EventKind::CommandStatus));
    }
}

//! A command and its states: PENDING → SENT → DELIVERED → SUCCESSFUL | FAILED, or EXPIRED (never
//! sent before its expiry), TIMEOUT (sent, never acknowledged), CANCELED (seed 003 §4.5.2), or
//! MOVED (its device moved to another instance, which took the command on under a new id).

use serde::{Deserialize, Serialize};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::clock::UnixMs;
use crate::identity::{DeviceId, DeviceName, ProductKey};

/// Identifies a command instance-wide; ids grow in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommandId(pub u64);

impl std::fmt::Display for CommandId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for CommandId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<CommandId, Self::Err> {
        s.parse().map(CommandId)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandStatus {
    Pending,
    Sent,
    Delivered,
    Successful,
    Failed,
    Expired,
    Timeout,
    Canceled,
    Moved,
}

impl CommandStatus {
    /// Still in the device's queue: waiting to be sent, or sent and not acknowledged.
    pub fn is_open(self) -> bool {
        matches!(self, CommandStatus::Pending | CommandStatus::Sent)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Pending => "PENDING",
            CommandStatus::Sent => "SENT",
            CommandStatus::Delivered => "DELIVERED",
            CommandStatus::Successful => "SUCCESSFUL",
            CommandStatus::Failed => "FAILED",
            CommandStatus::Expired => "EXPIRED",
            CommandStatus::Timeout => "TIMEOUT",
            CommandStatus::Canceled => "CANCELED",
            CommandStatus::Moved => "MOVED",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SendStrategy {
    /// Kept until the device next shows life (Huawei's cached delivery).
    #[default]
    Delay,
    /// Sent while the device is awake, else FAILED at once.
    Immediately,
}

/// A command as stored: every state change rewrites it whole (they are few and small).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub id: CommandId,
    pub device: DeviceId,
    pub product_key: ProductKey,
    pub device_name: DeviceName,
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    /// Topic an Alibaba device receives it on (`/pull` answers name one).
    pub topic: String,
    pub strategy: SendStrategy,
    pub status: CommandStatus,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Not sent by then: EXPIRED (FAILED for `immediately`, which has no waiting state).
    pub expires_at: u64,
    pub sent_at: Option<u64>,
    pub delivered_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// What the device answered (a piggybacked response's payload).
    #[serde(default, with = "base64_opt")]
    pub result: Option<Vec<u8>>,
    /// Why it ended as it did, for the operator.
    #[serde(default)]
    pub reason: Option<String>,
    /// Set when it moved here with its device: `<instance>/<its id there>` (a repeated move
    /// finds it by this and does not queue it twice).
    #[serde(default)]
    pub origin: Option<String>,
    /// Given as JSON and encoded by the product's codec: what the script was given, and the
    /// device's answer as the codec read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<JsonCommand>,
}

/// A command given as JSON (a product with a codec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonCommand {
    pub codec_version: u32,
    /// The message the script encoded (the application's, with the id or `mid` nbhub set).
    pub message: serde_json::Value,
    /// The device's answer, decoded.
    #[serde(default)]
    pub answer: Option<serde_json::Value>,
}

/// A device's answer to a JSON command, as its codec read it from an uplink.
pub struct Answered<'a> {
    /// Huawei's `errcode`, Alibaba's `code`.
    pub code: i64,
    pub ok: bool,
    /// The uplink's bytes.
    pub raw: &'a [u8],
    pub decoded: serde_json::Value,
}

/// What a new command is: its content and its lifetime, the rest follows from being new.
pub struct NewRecord {
    pub payload: Vec<u8>,
    pub topic: String,
    pub strategy: SendStrategy,
    pub created_at: u64,
    pub expires_at: u64,
}

impl CommandRecord {
    /// A new PENDING command `id` for the device `device` (`product_key`/`device_name`).
    pub fn pending(
        id: CommandId,
        (device, product_key, device_name): (DeviceId, ProductKey, DeviceName),
        new: NewRecord,
    ) -> CommandRecord {
        let NewRecord { payload, topic, strategy, created_at, expires_at } = new;
        CommandRecord {
            id,
            device,
            product_key,
            device_name,
            payload,
            topic,
            strategy,
            status: CommandStatus::Pending,
            created_at,
            expires_at,
            sent_at: None,
            delivered_at: None,
            finished_at: None,
            result: None,
            reason: None,
            origin: None,
            json: None,
        }
    }

    /// Ends a JSON command its device answered in an uplink of its own (Huawei's `deviceRsp`,
    /// Alibaba's `down_raw_reply`), after or before the downlink's ACK was heard.
    pub fn answered(&mut self, answer: Answered<'_>, now: u64) {
        self.delivered_at.get_or_insert(now);
        if answer.ok {
            self.set(CommandStatus::Successful, now);
        } else {
            self.set(CommandStatus::Failed, now);
            self.reason = Some(format!("the device answered with code {}", answer.code));
        }
        self.result = Some(answer.raw.to_vec());
        if let Some(j) = &mut self.json {
            j.answer = Some(answer.decoded);
        }
    }

    /// Moves to `status` at `now`, stamping the time that status names.
    pub fn set(&mut self, status: CommandStatus, now: u64) {
        self.status = status;
        match status {
            CommandStatus::Pending => {}
            CommandStatus::Sent => self.sent_at = Some(now),
            CommandStatus::Delivered => self.delivered_at = Some(now),
            CommandStatus::Successful => {
                self.delivered_at.get_or_insert(now);
                self.finished_at = Some(now);
            }
            CommandStatus::Failed
            | CommandStatus::Expired
            | CommandStatus::Timeout
            | CommandStatus::Canceled
            | CommandStatus::Moved => self.finished_at = Some(now),
        }
    }

    /// Ends a command that was never sent in time.
    pub fn expire(&mut self, now: u64) {
        match self.strategy {
            SendStrategy::Delay => self.set(CommandStatus::Expired, now),
            SendStrategy::Immediately => {
                self.set(CommandStatus::Failed, now);
                self.reason = Some("the device went to sleep before the command could be sent".into());
            }
        }
    }
}

/// A command as the admin API shows it and webhooks send it.
#[derive(Debug, Serialize)]
pub struct CommandView {
    command_id: String,
    product_key: String,
    device_name: String,
    status: &'static str,
    send_strategy: SendStrategy,
    topic: String,
    payload_base64: String,
    created_at: String,
    expires_at: String,
    sent_at: Option<String>,
    delivered_at: Option<String>,
    finished_at: Option<String>,
    result_base64: Option<String>,
    /// Why it ended as it did (FAILED, TIMEOUT, EXPIRED; MOVED names the new home and id).
    reason: Option<String>,
    /// For a command given as JSON: the codec version that encoded it, the message it encoded,
    /// and the device's answer, decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    codec_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_json: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_json: Option<serde_json::Value>,
}

impl From<CommandRecord> for CommandView {
    fn from(c: CommandRecord) -> CommandView {
        let time = |t: Option<u64>| t.map(|t| UnixMs(t).rfc3339());
        CommandView {
            command_id: c.id.to_string(),
            product_key: c.product_key.to_string(),
            device_name: c.device_name.to_string(),
            status: c.status.as_str(),
            send_strategy: c.strategy,
            topic: c.topic,
            payload_base64: STANDARD.encode(&c.payload),
            created_at: UnixMs(c.created_at).rfc3339(),
            expires_at: UnixMs(c.expires_at).rfc3339(),
            sent_at: time(c.sent_at),
            delivered_at: time(c.delivered_at),
            finished_at: time(c.finished_at),
            result_base64: c.result.map(|r| STANDARD.encode(r)),
            reason: c.reason,
            codec_version: c.json.as_ref().map(|j| j.codec_version),
            result_json: c.json.as_ref().and_then(|j| j.answer.clone()),
            payload_json: c.json.map(|j| j.message),
        }
    }
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        STANDARD.decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod base64_opt {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&STANDARD.encode(v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?.map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom)).transpose()
    }
}

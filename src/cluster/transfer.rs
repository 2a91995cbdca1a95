//! What one instance sends another's admin API when devices move (SPEC §10): the product, the
//! devices' credentials and state, and their open commands. Secrets travel as given (the peers'
//! admin APIs are authenticated; use https between sites); each side stores them its own way.

use serde::{Deserialize, Serialize};

use crate::downlink::{CommandId, SendStrategy};
use crate::identity::{DeviceName, InstanceName, NodeId, ProductKey, Secret};
use crate::shadow::document::Shadow;
use crate::store::records::{OtaProtocol, ProductRecord, Radio};

/// A product as the admin API shows it, and as it travels to another instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductTransfer {
    pub product_key: ProductKey,
    pub product_secret: Secret,
    pub name: String,
    pub dynamic_registration: bool,
    pub ota_protocol: OtaProtocol,
    pub awake_window_s: u32,
    /// This product's timers for CONs to its devices; null: the server's `[downlink]` defaults.
    pub ack_timeout_ms: Option<u64>,
    pub max_retransmit: Option<u32>,
    /// Its devices may ask `/bootstrap` without a signature.
    #[serde(default)]
    pub unsigned_bootstrap: bool,
}

impl From<&ProductRecord> for ProductTransfer {
    fn from(p: &ProductRecord) -> ProductTransfer {
        ProductTransfer {
            product_key: p.product_key.clone(),
            product_secret: p.product_secret.clone(),
            name: p.name.clone(),
            dynamic_registration: p.dynamic_registration,
            ota_protocol: p.ota_protocol,
            awake_window_s: p.awake_window_s,
            ack_timeout_ms: p.ack_timeout_ms,
            max_retransmit: p.max_retransmit,
            unsigned_bootstrap: p.unsigned_bootstrap,
        }
    }
}

/// A command still to be delivered; it gets a new id at its new home.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandTransfer {
    /// Its id at the instance it comes from.
    pub id: CommandId,
    pub payload_base64: String,
    pub topic: String,
    pub send_strategy: SendStrategy,
    /// Unix milliseconds, kept across the move.
    pub created_at: u64,
    pub expires_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTransfer {
    pub device_name: DeviceName,
    pub device_secret: Secret,
    pub node_id: Option<NodeId>,
    pub psk_hex: Option<String>,
    pub enabled: bool,
    pub registered: bool,
    pub radio: Radio,
    pub version: Option<String>,
    pub commands: Vec<CommandTransfer>,
    /// Its shadow, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

/// `POST /api/v1/distribution/imports`: take a product and devices (none: the product alone).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    pub source: InstanceName,
    pub product: ProductTransfer,
    #[serde(default)]
    pub devices: Vec<DeviceTransfer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportOutcome {
    /// Stored here with its commands.
    Imported,
    /// Already here with the same secret (an earlier attempt got through); commands it did not
    /// have yet were added.
    AlreadyHere,
    /// Not taken: it stays where it is.
    Refused,
    /// Not settled now (an earlier request for it is still being stored, or the store failed):
    /// ask again; the sender keeps it leaving meanwhile.
    Retry,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportResult {
    pub device_name: DeviceName,
    pub result: ImportOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The commands' new ids, in the order they were sent.
    #[serde(default)]
    pub commands: Vec<CommandId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportResponse {
    pub devices: Vec<ImportResult>,
}

/// `POST /api/v1/distribution/releases`: give back devices that never connected here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub source: InstanceName,
    pub product_key: ProductKey,
    pub device_names: Vec<DeviceName>,
    /// False: stop serving the devices (durably) and describe them; asked again, the same
    /// answer. True, once the sender stored them: forget them here.
    #[serde(default)]
    pub confirm: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// No longer served here; `device` is what the sender takes back (a confirmation: removed).
    Released,
    /// It connected here already: it stays.
    Seen,
    /// Not here, or not released to this sender.
    NotFound,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseResult {
    pub device_name: DeviceName,
    pub result: ReleaseOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceTransfer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseResponse {
    pub devices: Vec<ReleaseResult>,
}

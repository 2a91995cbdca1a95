//! Upgrade tasks (API.md `/api/v1/ota/tasks`): one package for a list of devices, with a retry
//! policy. The per-device progress lives in [`super::upgrade::Upgrade`] records.

use serde::{Deserialize, Serialize};

use super::package::PackageId;
use super::upgrade::Retry;
use crate::identity::{DeviceId, DeviceName, ProductKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UpgradeTaskId(pub u64);

impl std::fmt::Display for UpgradeTaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Most retries a task may ask for, and the longest interval between them (seed 003 §3.7).
pub const MAX_RETRIES: u8 = 5;
pub const MAX_RETRY_INTERVAL_MIN: u64 = 1440;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeTaskRecord {
    pub id: UpgradeTaskId,
    pub package: PackageId,
    /// Every device is of the package's product.
    pub product_key: ProductKey,
    pub devices: Vec<(DeviceId, DeviceName)>,
    pub retry: Retry,
    pub created_at: u64,
    pub stopped_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpgradeTaskStatus {
    Running,
    Stopped,
    Finished,
}

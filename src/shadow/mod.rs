//! Device shadows (seed 002 §7): one JSON document per device that holds what an application
//! wants until a sleeping device wakes, and what the device last reported. The document's rules
//! are in [`document`]; here it is kept, one change at a time per device, in `CF_SHADOWS`.

pub mod document;

use crate::identity::DeviceId;
use crate::store::{CF_SHADOWS, Op, Store, StoreError, Writer, json};
use document::{Shadow, ShadowError};

/// Changes to one device's shadow are made one at a time: read, change, write, under the
/// stripe its device id falls in.
const STRIPES: usize = 64;

pub struct Shadows {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl Default for Shadows {
    fn default() -> Shadows {
        Shadows { stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect() }
    }
}

fn key(device: DeviceId) -> [u8; 8] {
    device.0.to_be_bytes()
}

/// Storing `device`'s shadow.
pub fn put(device: DeviceId, shadow: &Shadow) -> Op {
    Op::put_json(CF_SHADOWS, key(device), shadow)
}

/// The device's shadow as stored; empty (version 0) when it has none.
pub fn get(store: &Store, device: DeviceId) -> Result<Shadow, StoreError> {
    let k = key(device);
    Ok(store.get(CF_SHADOWS, &k)?.map(|v| json(&k, &v)).transpose()?.unwrap_or_default())
}

impl Shadows {
    /// Applies `change` to `device`'s shadow and stores the result durably; a refused change
    /// stores nothing. The shadow after the change.
    pub async fn change(
        &self,
        store: &Store,
        writer: &Writer,
        device: DeviceId,
        change: impl FnOnce(&mut Shadow) -> Result<(), ShadowError>,
    ) -> Result<Result<Shadow, ShadowError>, StoreError> {
        let _one = self.stripes[(device.0 % STRIPES as u64) as usize].lock().await;
        let mut shadow = get(store, device)?;
        if let Err(e) = change(&mut shadow) {
            return Ok(Err(e));
        }
        writer.commit([put(device, &shadow)]).await?;
        Ok(Ok(shadow))
    }
}

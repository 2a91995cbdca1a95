//! Device shadows (seed 002 §7): one JSON document per device that holds what an application
//! wants until a sleeping device wakes, and what the device last reported. The document's rules
//! are in [`document`], the Alibaba device protocol in [`device`]; here a shadow is kept in
//! `CF_SHADOWS`, each change worked out by the store's writer from the stored document, so
//! changes from the admin API, a device's request and its codec apply one after another.

pub mod device;
pub mod document;

use std::sync::{Arc, Mutex};

use crate::clock::UnixMs;
use crate::identity::{DeviceId, DeviceName, ProductKey};
use crate::northbound::{Event, EventKind};
use crate::store::{CF_SHADOWS, Revise, Revised, Store, StoreError, Writer, json};
use document::{Shadow, ShadowError, Stamps};

fn key(device: DeviceId) -> [u8; 8] {
    device.0.to_be_bytes()
}

/// The device's shadow as stored; empty (version 0) when it has none.
pub fn get(store: &Store, device: DeviceId) -> Result<Shadow, StoreError> {
    let k = key(device);
    Ok(store.get(CF_SHADOWS, &k)?.map(|v| json(&k, &v)).transpose()?.unwrap_or_default())
}

/// Stores `shadow` as the device's, as it came from another instance.
pub fn put(device: DeviceId, shadow: &Shadow) -> crate::store::Op {
    crate::store::Op::put_json(CF_SHADOWS, key(device).to_vec(), shadow)
}

/// Forgets the device's shadow (it went to another instance with its device).
pub fn delete(device: DeviceId) -> crate::store::Op {
    crate::store::Op::Delete { cf: CF_SHADOWS, key: key(device).to_vec() }
}

type Edit = Box<dyn Fn(&mut Shadow) -> Result<(), ShadowError> + Send + Sync>;

/// Who a change is about, as its event names them.
#[derive(Debug, Clone)]
pub struct Owner {
    pub id: DeviceId,
    pub product_key: ProductKey,
    pub device_name: DeviceName,
}

/// A change to one device's shadow, applied by the writer to the document as stored at that
/// point in the write order; its outcome is readable once the write is durable.
pub struct Change {
    key: [u8; 8],
    owner: Owner,
    edit: Edit,
    /// When the change was asked for (the time of its event).
    at: UnixMs,
    /// Announce the changed shadow to subscribers (`shadow` events).
    announce: bool,
    outcome: Mutex<Option<Result<Shadow, ShadowError>>>,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Change").field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Change {
    pub fn new(
        owner: Owner,
        at: UnixMs,
        announce: bool,
        edit: impl Fn(&mut Shadow) -> Result<(), ShadowError> + Send + Sync + 'static,
    ) -> Arc<Change> {
        Arc::new(Change { key: key(owner.id), owner, edit: Box::new(edit), at, announce, outcome: Mutex::new(None) })
    }

    /// The shadow after the change, or why it was refused; `None` until the writer has applied
    /// it (or if the stored shadow could not be read).
    pub fn outcome(&self) -> Option<Result<Shadow, ShadowError>> {
        self.outcome.lock().expect("shadow outcome lock").clone()
    }

    /// Makes the change durable and returns its outcome.
    pub async fn commit(self: &Arc<Change>, writer: &Writer) -> Result<Result<Shadow, ShadowError>, StoreError> {
        writer.commit([crate::store::Op::Revise(self.clone())]).await?;
        self.outcome().ok_or_else(|| StoreError::Corrupt {
            key: format!("shadow of device {}", self.owner.id.0),
            reason: "the stored shadow could not be read".into(),
        })
    }
}

impl Revise for Change {
    fn cf(&self) -> &'static str {
        CF_SHADOWS
    }

    fn key(&self) -> &[u8] {
        &self.key
    }

    fn revise(&self, current: Option<&[u8]>) -> Option<Revised> {
        let mut shadow = match current.map(|v| json::<Shadow>(&self.key, v)).transpose() {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::error!(device = self.owner.id.0, error = %e, "stored shadow unreadable; change refused");
                *self.outcome.lock().expect("shadow outcome lock") = None;
                return None;
            }
        };
        let result = (self.edit)(&mut shadow).map(|()| shadow);
        let revised = result.as_ref().ok().map(|shadow| Revised {
            value: serde_json::to_vec(shadow).expect("a shadow serialises"),
            event: self.announce.then(|| {
                Box::new(Event {
                    kind: EventKind::Shadow,
                    product_key: self.owner.product_key.clone(),
                    device_name: self.owner.device_name.clone(),
                    time: self.at,
                    data: shadow.view(Stamps::Millis),
                }) as Box<dyn crate::store::OutboxEvent>
            }),
        });
        *self.outcome.lock().expect("shadow outcome lock") = Some(result);
        revised
    }
}

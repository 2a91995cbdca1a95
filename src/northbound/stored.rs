//! How the northbound keeps its records: each webhook under its id with its cursor beside it
//! (`webhook id | "c"` → the last event id it took), each streaming outlet's cursor under
//! `"outlet/" | name`, and the outbox read back as events to send.

use std::collections::HashMap;

use super::event::{About, Record, Stored, render_uplink};
use super::{WebhookId, WebhookRecord};
use crate::store::records::MessageRecord;
use crate::store::{CF_MESSAGES, CF_OUTBOX, CF_WEBHOOKS, Op, Store, StoreError, corrupt, json, message_key};

/// Where a webhook's cursor is kept: beside its record.
fn cursor_key(id: WebhookId) -> [u8; 9] {
    let mut k = [b'c'; 9];
    k[..8].copy_from_slice(&id.0.to_be_bytes());
    k
}

pub fn put_webhook(w: &WebhookRecord) -> Op {
    Op::put_json(CF_WEBHOOKS, w.id.0.to_be_bytes(), w)
}

pub fn delete_webhook(id: WebhookId) -> [Op; 2] {
    [
        Op::Delete { cf: CF_WEBHOOKS, key: id.0.to_be_bytes().to_vec() },
        Op::Delete { cf: CF_WEBHOOKS, key: cursor_key(id).to_vec() },
    ]
}

/// The webhook took every event up to `delivered`.
pub fn cursor(id: WebhookId, delivered: u64) -> Op {
    Op::Put { cf: CF_WEBHOOKS, key: cursor_key(id).to_vec(), value: delivered.to_le_bytes().to_vec() }
}

const OUTLET_PREFIX: &[u8] = b"outlet/";

fn outlet_key(name: &str) -> Vec<u8> {
    [OUTLET_PREFIX, name.as_bytes()].concat()
}

/// Outlet `name` took every event up to `delivered`.
pub fn outlet_cursor(name: &str, delivered: u64) -> Op {
    Op::Put { cf: CF_WEBHOOKS, key: outlet_key(name), value: delivered.to_le_bytes().to_vec() }
}

/// The last event id outlet `name` took, if it ever ran.
pub fn outlet_cursor_of(store: &Store, name: &str) -> Result<Option<u64>, StoreError> {
    let key = outlet_key(name);
    match store.get(CF_WEBHOOKS, &key)? {
        Some(v) => Ok(Some(u64::from_le_bytes(v.try_into().map_err(|_| corrupt(&key, "bad outlet cursor"))?))),
        None => Ok(None),
    }
}

/// No subscriber needs events below `below` any more.
pub fn trim_outbox(below: u64) -> Op {
    Op::DeleteRange { cf: CF_OUTBOX, from: 0u64.to_be_bytes().to_vec(), to: below.to_be_bytes().to_vec() }
}

/// Every webhook with its cursor (the last event id it took).
pub fn webhooks(store: &Store) -> Result<Vec<(WebhookRecord, u64)>, StoreError> {
    let mut records = Vec::new();
    let mut cursors = HashMap::new();
    store.scan(CF_WEBHOOKS, |k, v| {
        if k.starts_with(OUTLET_PREFIX) {
            return Ok(());
        }
        match k.len() {
            8 => records.push(json::<WebhookRecord>(k, v)?),
            9 => {
                let id = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
                cursors.insert(id, u64::from_le_bytes(v.try_into().map_err(|_| corrupt(k, "bad cursor"))?));
            }
            _ => return Err(corrupt(k, "unexpected webhook key")),
        }
        Ok(())
    })?;
    Ok(records.into_iter().map(|r| (cursors.get(&r.id.0).copied().unwrap_or(0), r)).map(|(c, r)| (r, c)).collect())
}

/// Up to `limit` outbox records after `after` (exclusive), oldest first, as events ready to
/// send, and the id of the last record read. An uplink event whose message is gone (deleted
/// with its device, or past retention) is passed over.
pub fn events_after(store: &Store, after: u64, limit: usize) -> Result<(Vec<Stored>, Option<u64>), StoreError> {
    let start = after.saturating_add(1).to_be_bytes();
    let records = store.scan_from(CF_OUTBOX, &start, limit, |k, v| {
        let id = u64::from_be_bytes(k.try_into().map_err(|_| corrupt(k, "bad event key"))?);
        let (kind, time, record) = Record::decode(v).ok_or_else(|| corrupt(k, "bad event record"))?;
        Ok((id, kind, time, record))
    })?;
    let last = records.last().map(|(id, ..)| *id);
    let mut out = Vec::with_capacity(records.len());
    for (id, kind, time, record) in records {
        let event = match record {
            Record::Body(body) => {
                let about: About =
                    serde_json::from_slice(&body).map_err(|_| corrupt(&id.to_be_bytes(), "bad event"))?;
                Some((about, body))
            }
            Record::Uplink { device, message, product_key, device_name } => {
                let stored = store.get(CF_MESSAGES, &message_key(device, message))?;
                match stored.as_deref().and_then(MessageRecord::decode) {
                    Some(m) => {
                        let decoded = store.decoded(device, message)?;
                        let body = render_uplink(id, &product_key, &device_name, message, &m, decoded.as_ref());
                        Some((About { product_key, device_name }, body))
                    }
                    None => None,
                }
            }
        };
        if let Some((About { product_key, device_name }, body)) = event {
            out.push(Stored { id, kind, time, product_key, device_name, body });
        }
    }
    Ok((out, last))
}

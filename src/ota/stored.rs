//! How the upgrade campaign keeps its records: tasks by id, each device's upgrade under
//! `task id | device id` (a task's upgrades are one prefix range), packages by id and their
//! chunks under `package id | chunk number`.

use std::collections::HashMap;

use super::package::{PackageId, PackageRecord};
use super::task::{UpgradeTaskId, UpgradeTaskRecord};
use super::upgrade::Upgrade;
use crate::identity::DeviceId;
use crate::store::{CF_CHUNKS, CF_OTA_TASKS, CF_PACKAGES, CF_UPGRADES, Op, Store, StoreError, corrupt, json, pair_key};

/// `package id | chunk number (u16 BE)`.
fn chunk_key(id: PackageId, chunk: u16) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..8].copy_from_slice(&id.0.to_be_bytes());
    k[8..].copy_from_slice(&chunk.to_be_bytes());
    k
}

pub fn put_task(t: &UpgradeTaskRecord) -> Op {
    Op::put_json(CF_OTA_TASKS, t.id.0.to_be_bytes(), t)
}

/// A device's upgrade in a task, created or changed.
pub fn put_upgrade(u: &Upgrade) -> Op {
    Op::put_json(CF_UPGRADES, pair_key(u.task.0, u.device.0), u)
}

/// A package and its chunks, to be written in one job.
pub fn put_package(record: &PackageRecord, chunks: &[Vec<u8>]) -> Vec<Op> {
    let mut ops: Vec<Op> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| Op::Put { cf: CF_CHUNKS, key: chunk_key(record.id, i as u16).to_vec(), value: c.clone() })
        .collect();
    ops.push(Op::put_json(CF_PACKAGES, record.id.0.to_be_bytes(), record));
    ops
}

pub fn tasks(store: &Store) -> Result<Vec<UpgradeTaskRecord>, StoreError> {
    store.scan(CF_OTA_TASKS, json)
}

/// Every device's upgrade in every task, in task order.
pub fn upgrades(store: &Store) -> Result<Vec<Upgrade>, StoreError> {
    store.scan(CF_UPGRADES, json)
}

/// A task's upgrades, by device id.
pub fn upgrades_of(store: &Store, task: UpgradeTaskId) -> Result<HashMap<DeviceId, Upgrade>, StoreError> {
    let upgrades: Vec<Upgrade> = store.scan_prefix(CF_UPGRADES, task.0, json)?;
    Ok(upgrades.into_iter().map(|u| (u.device, u)).collect())
}

pub fn package(store: &Store, id: PackageId) -> Result<Option<PackageRecord>, StoreError> {
    let k = id.0.to_be_bytes();
    store.get(CF_PACKAGES, &k)?.map(|v| json(&k, &v)).transpose()
}

/// Every package's record (not its chunks).
pub fn packages(store: &Store) -> Result<Vec<PackageRecord>, StoreError> {
    store.scan(CF_PACKAGES, json)
}

/// Every chunk of a package, in order; an error if one is missing.
pub fn chunks(store: &Store, package: &PackageRecord) -> Result<Vec<Vec<u8>>, StoreError> {
    let chunks = store.scan_prefix(CF_CHUNKS, package.id.0, |_, v| Ok(v.to_vec()))?;
    if chunks.len() != package.chunk_count as usize {
        let key = package.id.0.to_be_bytes();
        return Err(corrupt(&key, &format!("{} of {} chunks stored", chunks.len(), package.chunk_count)));
    }
    Ok(chunks)
}

//! How distribution keeps its records: tasks by id, each device's progress in a task under
//! `task id | device id` (a task's entries are one prefix range).

use super::task::{DistributionId, DistributionRecord, Entry};
use crate::store::{CF_DISTRIBUTION_ENTRIES, CF_DISTRIBUTIONS, Op, Store, StoreError, json, pair_key};

pub fn put_task(t: &DistributionRecord) -> Op {
    Op::put_json(CF_DISTRIBUTIONS, t.id.0.to_be_bytes(), t)
}

pub fn put_entry(e: &Entry) -> Op {
    Op::put_json(CF_DISTRIBUTION_ENTRIES, pair_key(e.task.0, e.device.0), e)
}

pub fn tasks(store: &Store) -> Result<Vec<DistributionRecord>, StoreError> {
    store.scan(CF_DISTRIBUTIONS, json)
}

/// A task's entries, in device id order.
pub fn entries(store: &Store, task: DistributionId) -> Result<Vec<Entry>, StoreError> {
    store.scan_prefix(CF_DISTRIBUTION_ENTRIES, task.0, json)
}

//! RocksDB under the data directory: one column family per kind of record, keys ordered so a
//! device's records are one prefix range. Reads happen anywhere; every write goes through the
//! single group-committing [`Writer`] so the order of writes is the order of commits.

mod memory;
pub mod records;
pub mod sealed;
mod space;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use memory::MemoryBudget;
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options};

use crate::auth::replay;
use crate::clock::UnixMs;
use crate::identity::{DeviceId, DeviceName, ProductKey};
pub use records::MessageId;
use records::{DecodedRecord, DeviceRecord, MessageRecord, PresenceRecord, ProductRecord};
pub use writer::{
    AfterUplink, Commit, CommitSink, Committed, Completion, Job, LiveRecord, Op, Ops, OutboxEvent, Revise, Revised,
    SyncPolicy, UplinkEvent, Writer, WriterThread,
};
#[cfg(test)]
pub(crate) use writer::{Recorder, recording};

pub const CF_PRODUCTS: &str = "products";
pub const CF_DEVICES: &str = "devices";
pub const CF_PRESENCE: &str = "presence";
pub const CF_SESSIONS: &str = "sessions";
pub const CF_REPLAY: &str = "replay";
pub const CF_MESSAGES: &str = "messages";
pub const CF_META: &str = "meta";
/// Every command (`device id | command id` → record), whatever its state.
pub const CF_COMMANDS: &str = "commands";
/// `command id` → `device id`: finds a command by id alone.
pub const CF_COMMAND_IDS: &str = "command_ids";
/// `device id | command id` of commands still open: all the server reads at start.
pub const CF_OPEN_COMMANDS: &str = "open_commands";
/// `event id` → event, for webhook delivery; trimmed below the slowest subscriber's cursor.
pub const CF_OUTBOX: &str = "outbox";
/// `webhook id` → subscription, and `webhook id | "c"` → the last event id it took.
pub const CF_WEBHOOKS: &str = "webhooks";
/// `package id` → package record.
pub const CF_PACKAGES: &str = "packages";
/// `package id | chunk number (u16 BE)` → chunk bytes.
pub const CF_CHUNKS: &str = "chunks";
/// Upgrade tasks by id.
pub const CF_OTA_TASKS: &str = "ota_tasks";
/// Each device's upgrade in a task: `task id | device id`.
pub const CF_UPGRADES: &str = "upgrades";
/// Distribution tasks by id.
pub const CF_DISTRIBUTIONS: &str = "distributions";
/// Each device's progress in a distribution task: `task id | device id`.
pub const CF_DISTRIBUTION_ENTRIES: &str = "distribution_entries";
/// Each product's codec versions and which is current (`product key \0 …`).
pub const CF_CODECS: &str = "codecs";
/// `message id` → the uplink's event record, for uplinks stored but not yet decoded: written in
/// the uplink's batch, deleted with its decoding's.
pub const CF_DECODE_QUEUE: &str = "decode_queue";
/// `device id | message id` → what the codec read from that message ([`records::DecodedRecord`]).
pub const CF_DECODED: &str = "decoded";
/// `device id` → its shadow ([`crate::shadow::document::Shadow`]).
pub const CF_SHADOWS: &str = "shadows";
/// `session id | k` → an established DTLS session's keys, `session id | s` → where it stands
/// (`dtls::durable`).
pub const CF_DTLS_SESSIONS: &str = "dtls_sessions";
/// `product key | 0 | minute (u32 BE)` → uplinks that minute (u32 BE), for the last day
/// (`registry::activity`).
pub const CF_ACTIVITY: &str = "activity";

const ALL_CFS: [&str; 24] = [
    CF_PRODUCTS,
    CF_DEVICES,
    CF_PRESENCE,
    CF_SESSIONS,
    CF_REPLAY,
    CF_MESSAGES,
    CF_META,
    CF_COMMANDS,
    CF_COMMAND_IDS,
    CF_OPEN_COMMANDS,
    CF_OUTBOX,
    CF_WEBHOOKS,
    CF_PACKAGES,
    CF_CHUNKS,
    CF_OTA_TASKS,
    CF_UPGRADES,
    CF_DISTRIBUTIONS,
    CF_DISTRIBUTION_ENTRIES,
    CF_CODECS,
    CF_DECODE_QUEUE,
    CF_DECODED,
    CF_SHADOWS,
    CF_DTLS_SESSIONS,
    CF_ACTIVITY,
];

pub const META_NEXT_DEVICE_ID: &[u8] = b"next_device_id";
pub const META_NEXT_MESSAGE_ID: &[u8] = b"next_message_id";
pub const META_NEXT_COMMAND_ID: &[u8] = b"next_command_id";
pub const META_NEXT_EVENT_ID: &[u8] = b"next_event_id";

/// What the presence column family holds, read at start.
pub struct Presence {
    pub contacts: HashMap<DeviceId, PresenceRecord>,
    /// The status last announced to subscribers, as its byte.
    pub announced: HashMap<DeviceId, u8>,
}

/// Where the status last announced for a device is kept: beside its presence.
pub fn announced_key(device: DeviceId) -> [u8; 9] {
    let mut k = [b's'; 9];
    k[..8].copy_from_slice(&device.0.to_be_bytes());
    k
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Rocks(String),
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the store is shutting down")]
    Closed,
    /// The data directory's filesystem is full: nothing is written until space is freed, then
    /// writes resume by themselves (RocksDB checks every 5 s).
    #[error(
        "the filesystem of data directory {} is full ({free_bytes} bytes free); writes resume by themselves once {needed_bytes} bytes are free",
        dir.display()
    )]
    NoSpace { dir: PathBuf, free_bytes: u64, needed_bytes: u64 },
    /// RocksDB held writes back (a write stall) for longer than the writer waits.
    #[error("the store is busy: {0}")]
    Busy(String),
}

impl StoreError {
    /// Seconds after which a retry may succeed, for errors that pass by themselves (told to
    /// devices as Max-Age and to API clients as Retry-After); `None` for the others.
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            // RocksDB looks for freed space every 5 s and the writer probes every second after.
            StoreError::NoSpace { .. } => Some(10),
            StoreError::Busy(_) => Some(1),
            _ => None,
        }
    }
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> StoreError {
        StoreError::Rocks(e.into_string())
    }
}

/// `product_key \0 device_name`: a product's devices are one prefix range.
pub fn device_key(pk: &ProductKey, dn: &DeviceName) -> Vec<u8> {
    let mut k = Vec::with_capacity(pk.as_str().len() + 1 + dn.as_str().len());
    k.extend_from_slice(pk.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(dn.as_str().as_bytes());
    k
}

/// `device id (BE) | message id (BE)`: a device's messages in arrival order.
pub fn message_key(device: DeviceId, id: MessageId) -> [u8; 16] {
    pair_key(device.0, id.0)
}

/// Two ids big-endian, so records sort by the first, then the second: one prefix range per first.
pub fn pair_key(first: u64, second: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&first.to_be_bytes());
    k[8..].copy_from_slice(&second.to_be_bytes());
    k
}

#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    /// Uplinks older than this are expired (hidden from reads, dropped by compaction).
    retention: Option<Duration>,
    /// One column family's memtable size, in bytes.
    write_buffer: usize,
    /// The block cache every column family shares (memtables are charged to it too).
    cache: rocksdb::Cache,
}

/// Whether a stored message (by its encoded record) is older than `retention`.
fn expired(record: &[u8], retention: Duration, now: UnixMs) -> bool {
    let Some(at) = record.get(..8) else { return false };
    let received = u64::from_le_bytes(at.try_into().expect("8 bytes"));
    received.saturating_add(retention.as_millis() as u64) < now.0
}

/// Expiry costs nothing on the write path: compactions drop what is too old (by the time its
/// value starts with), and periodic compaction makes sure every file gets that look.
fn expire_by_compaction(o: &mut Options, retention: Option<Duration>) {
    let Some(retention) = retention else { return };
    o.set_compaction_filter("nbhub_message_retention", move |_level, _key, value: &[u8]| {
        if expired(value, retention, UnixMs::now()) {
            rocksdb::compaction_filter::Decision::Remove
        } else {
            rocksdb::compaction_filter::Decision::Keep
        }
    });
    o.set_periodic_compaction_seconds(86_400);
}

/// A record kept as JSON (see [`Op::put_json`]), or why it cannot be read.
pub fn json<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

impl Store {
    /// Opens the store with its memory shared out as `memory` says. A memtable's size is also
    /// the free space RocksDB waits for before it writes again after the disk was full.
    pub fn open(dir: &Path, retention: Option<Duration>, memory: MemoryBudget) -> Result<Store, StoreError> {
        let write_buffer = memory.write_buffer_bytes;
        let cache = rocksdb::Cache::new_lru_cache(memory.cache_bytes);
        let mut db_opts = Options::default();
        // Memtables are charged to the block cache: blocks and memtables share one bound.
        db_opts.set_write_buffer_manager(&rocksdb::WriteBufferManager::new_write_buffer_manager_with_cache(
            memory.memtables_bytes,
            false,
            cache.clone(),
        ));
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        // Required by the hash-based memtable of the messages column family; nbhub has a
        // single writer thread, so concurrent memtable inserts would gain nothing.
        db_opts.set_allow_concurrent_memtable_write(false);
        // The 4 MiB default is taken from the disk up front: on a nearly full filesystem that is
        // what stops RocksDB from writing again. The MANIFEST only grows by a few records a flush.
        db_opts.set_manifest_preallocation_size(256 << 10);
        // The default column family is unused but always there, and its write buffer counts too:
        // RocksDB waits for the largest of all to be free before it writes again.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        // Index and filter blocks live in the cache too (else every open file holds its own
        // outside any bound); those of the newest files stay there.
        table.set_cache_index_and_filter_blocks(true);
        table.set_cache_index_and_filter_blocks_with_high_priority(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        let cfs = ALL_CFS.iter().copied().chain([rocksdb::DEFAULT_COLUMN_FAMILY_NAME]).map(|name| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(write_buffer);
            match name {
                CF_MESSAGES => {
                    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
                    // Uplinks arrive from many devices at once; one global skiplist made every
                    // insert a deep, cache-missing search (the top item of the write path's
                    // profile). Hashing by device (the 8-byte key prefix) keeps each insert in a
                    // short per-device list; reads are per-device prefix scans anyway.
                    o.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(8));
                    o.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
                        bucket_count: 262_144,
                        height: 4,
                        branching_factor: 4,
                    });
                    expire_by_compaction(&mut o, retention);
                }
                // What a codec read from a message ages with the message (its value starts
                // with the same time).
                CF_DECODED => {
                    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
                    expire_by_compaction(&mut o, retention);
                }
                CF_REPLAY => {
                    o.set_merge_operator_associative("nbhub_replay_window", |_key, existing, ops| {
                        replay::merge(existing, ops.iter())
                    });
                    // One merge operand per 5682 uplink: hash by the token's first 8 bytes (its
                    // keys are 32-character tokens, read only by point lookups).
                    o.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(8));
                    o.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
                        bucket_count: 262_144,
                        height: 4,
                        branching_factor: 4,
                    });
                }
                _ => {}
            }
            ColumnFamilyDescriptor::new(name, o)
        });
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs)?;
        Ok(Store { db: Arc::new(db), retention, write_buffer, cache })
    }

    /// The error a failed write stands for (see [`space::classify`]).
    pub(crate) fn write_error(&self, e: rocksdb::Error) -> StoreError {
        space::classify(e.into_string(), self.db.path(), self.write_buffer as u64)
    }

    /// RocksDB's memory now: memtables, the block cache (with the memtables' charge) and what
    /// open files hold outside it, in bytes.
    pub fn memory_use(&self) -> [(&'static str, u64); 3] {
        let sum = |property: &str| -> u64 {
            ALL_CFS.iter().filter_map(|cf| self.db.property_int_value_cf(self.cf(cf), property).ok().flatten()).sum()
        };
        [
            ("memtables", sum("rocksdb.size-all-mem-tables")),
            ("block_cache", self.cache.get_usage() as u64),
            ("table_readers", sum("rocksdb.estimate-table-readers-mem")),
        ]
    }

    pub(crate) fn db(&self) -> &Arc<DB> {
        &self.db
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    /// Every record of `cf`, in key order, through `f`.
    pub fn scan<T>(
        &self,
        cf: &str,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        // A whole column family is read to load it: its blocks would only push out of the
        // cache what is read again.
        let mut once = rocksdb::ReadOptions::default();
        once.fill_cache(false);
        for item in self.db.iterator_cf_opt(self.cf(cf), once, IteratorMode::Start) {
            let (k, v) = item?;
            out.push(f(&k, &v)?);
        }
        Ok(out)
    }

    /// The records whose [`pair_key`] starts with `first`, in key order.
    pub fn scan_prefix<T>(
        &self,
        cf: &str,
        first: u64,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let prefix = first.to_be_bytes();
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::From(&prefix, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(f(&k, &v)?);
        }
        Ok(out)
    }

    /// The record under `key` in `cf`.
    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// Up to `limit` records of `cf` from `start` on, in key order, through `f`.
    pub fn scan_from<T>(
        &self,
        cf: &str,
        start: &[u8],
        limit: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::From(start, Direction::Forward)).take(limit) {
            let (k, v) = item?;
            out.push(f(&k, &v)?);
        }
        Ok(out)
    }

    pub fn products(&self) -> Result<Vec<ProductRecord>, StoreError> {
        self.scan(CF_PRODUCTS, json)
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.scan(CF_DEVICES, json)
    }

    /// Last contact per device, and the status last announced to subscribers.
    pub fn presence(&self) -> Result<Presence, StoreError> {
        let (mut presence, mut announced) = (HashMap::new(), HashMap::new());
        self.scan(CF_PRESENCE, |k, v| {
            let id = DeviceId(u64::from_be_bytes(
                k.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt(k, "short key"))?,
            ));
            match k.len() {
                8 => {
                    presence.insert(id, PresenceRecord::decode(v).ok_or_else(|| corrupt(k, "bad presence record"))?);
                }
                9 => {
                    announced.insert(id, *v.first().ok_or_else(|| corrupt(k, "empty status"))?);
                }
                _ => return Err(corrupt(k, "unexpected presence key")),
            }
            Ok(())
        })?;
        Ok(Presence { contacts: presence, announced })
    }

    pub fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        Ok(match self.db.get_pinned_cf(self.cf(CF_META), key)? {
            Some(v) => Some(u64::from_le_bytes(v.as_ref().try_into().map_err(|_| corrupt(key, "not a u64"))?)),
            None => None,
        })
    }

    /// One page of a device's messages after `after` (exclusive), oldest first, and whether more follow.
    pub fn messages(
        &self,
        device: DeviceId,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<(Vec<(MessageId, MessageRecord)>, bool), StoreError> {
        let start = match after {
            Some(id) => message_key(device, MessageId(id.0.saturating_add(1))),
            None => message_key(device, MessageId(0)),
        };
        let prefix = device.0.to_be_bytes();
        let now = UnixMs::now();
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut read = rocksdb::ReadOptions::default();
        read.set_prefix_same_as_start(true);
        let iter = self.db.iterator_cf_opt(self.cf(CF_MESSAGES), read, IteratorMode::From(&start, Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || k.len() != 16 {
                break;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            if self.retention.is_some_and(|r| expired(&v, r, now)) {
                continue;
            }
            let id = MessageId(u64::from_be_bytes(k[8..].try_into().unwrap()));
            let record = MessageRecord::decode(&v).ok_or_else(|| corrupt(&k, "bad message record"))?;
            out.push((id, record));
        }
        Ok((out, false))
    }

    /// What the codec read from a message, once it has.
    pub fn decoded(&self, device: DeviceId, message: MessageId) -> Result<Option<DecodedRecord>, StoreError> {
        let key = message_key(device, message);
        match self.db.get_pinned_cf(self.cf(CF_DECODED), key)? {
            Some(v) => DecodedRecord::decode(&v).map(Some).ok_or_else(|| corrupt(&key, "bad decoded record")),
            None => Ok(None),
        }
    }
}

/// A record under `key` that cannot be read, and why.
pub fn corrupt(key: &[u8], reason: &str) -> StoreError {
    StoreError::Corrupt { key: hex::encode(key), reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use records::MessageRecord;

    #[test]
    fn expired_messages_are_hidden_then_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Some(Duration::from_secs(60)), MemoryBudget::of(8 << 20)).unwrap();
        let (writer, thread) = WriterThread::start(&store, SyncPolicy::Wal, 100).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let device = DeviceId(7);
        let now = UnixMs::now();
        for (age_s, payload) in [(3600, "old"), (0, "new")] {
            let op = Op::Uplink {
                device,
                received_at: UnixMs(now.0 - age_s * 1000),
                topic: "/p/d/t".into(),
                payload: payload.as_bytes().to_vec(),
                then: AfterUplink::Nothing,
            };
            rt.block_on(writer.commit([op])).unwrap();
        }
        let (rows, more) = store.messages(device, None, 10).unwrap();
        let payloads: Vec<&[u8]> = rows.iter().map(|(_, m)| &m.payload[..]).collect();
        assert_eq!((payloads, more), (vec![&b"new"[..]], false));
        let all = |s: &Store| {
            let mut read = rocksdb::ReadOptions::default();
            read.set_total_order_seek(true);
            s.db.iterator_cf_opt(s.cf(CF_MESSAGES), read, IteratorMode::Start).map(|r| r.unwrap().1).collect::<Vec<_>>()
        };
        let raw = |s: &Store| all(s).len();
        assert_eq!(raw(&store), 2);
        store.db.compact_range_cf(store.cf(CF_MESSAGES), None::<&[u8]>, None::<&[u8]>);
        assert_eq!(raw(&store), 1);
        assert_eq!(MessageRecord::decode(&all(&store)[0]).unwrap().payload, b"new");
        thread.stop();
    }
}

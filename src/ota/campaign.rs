//! The upgrade campaign (SPEC §6): tasks, each device's upgrade and the request waiting for its
//! downlink channel (PCP, or Object 5 for LwM2M clients), and the cell budget. An upgrade moves on what the device says, on any
//! contact and on a periodic tick. Devices in no upgrade have no slot here.
//!
//! Lock order: the device's state (the directory's lock), then the shard holding its slot, then
//! the cell budget and the waiting lists (never the other way round). Every change is queued for
//! the store while the device's lock is held, or returned to be made durable before the answer
//! that depends on it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use smallvec::SmallVec;

use super::coverage::{ByCoverage, CellBudget, Coverage, RadioReport};
use super::package::PackageRecord;
use super::pcp::{FromDevice, FromPlatform, ResultCode, Version};
use super::stored;
use super::task::{UpgradeTaskId, UpgradeTaskRecord, UpgradeTaskStatus};
use super::upgrade::{self, Answer, Ctx, Retry, Stage, Step, Target, Timers, Upgrade};
use crate::clock::UnixMs;
use crate::coap::block::Block;
use crate::coap::resource::ExchangeKey;
use crate::identity::{DeviceId, ProductKey};
use crate::northbound::{Event, EventKind};
use crate::registry::{Device, DeviceState, Held, Registry, RegistryError};
use crate::store::records::OtaProtocol;
use crate::store::{Op, Store, StoreError};
use crate::sync::{Sharded, lock, read, write};
use crate::telemetry::metric;

/// Devices whose radio names no cell share this one, so together they never load more than a cell.
const UNKNOWN_CELL: &str = "";

/// A request of the platform (PCP 19, 20 or 23, or the LwM2M operations a dialect makes of them)
/// for the device's downlink channel. Only the latest is kept: each replaces the one before,
/// which the upgrade no longer needs.
#[derive(Debug, Clone)]
struct PcpRequest {
    request: FromPlatform,
    /// The exchange carrying it, while one does.
    in_flight: Option<ExchangeKey>,
}

/// What the campaign keeps for one device.
#[derive(Default)]
pub struct Slot {
    /// Its upgrade in the latest task that includes it (kept once finished, so a repeated
    /// request is still answered the same).
    upgrade: Option<Upgrade>,
    /// A PCP request waiting for the downlink channel.
    request: Option<PcpRequest>,
}

impl Slot {
    fn holds_anything(&self) -> bool {
        self.upgrade.is_some() || self.request.is_some()
    }

    /// Queues `request` unless the same one is already on its way.
    fn queue(&mut self, request: &FromPlatform) {
        if self.request.as_ref().is_none_or(|p| p.request != *request || p.in_flight.is_none()) {
            self.request = Some(PcpRequest { request: request.clone(), in_flight: None });
        }
    }
}

/// Where the device's request stands, for the channel that would carry it.
pub enum PlatformRequest {
    None,
    /// On its way in an exchange not yet ended.
    InFlight,
    /// To send now: the exchange given carries it from here on.
    Send(FromPlatform),
}

/// A task and the package it installs, as steps need them.
pub struct UpgradeTask {
    pub record: UpgradeTaskRecord,
    pub package: PackageRecord,
    version: Version,
    /// The package's chunks, held while the task has unfinished upgrades: a device's request
    /// for one is answered from memory, never by a read on the socket's thread.
    chunks: Option<Arc<[Vec<u8>]>>,
}

impl UpgradeTask {
    /// What a step of one of this task's upgrades needs.
    fn ctx<'a>(&self, target: &'a Target<'a>, timers: &'a upgrade::Timers, now: UnixMs) -> Ctx<'a> {
        Ctx { now, target, timers, retry: self.record.retry }
    }

    /// The same task without its chunks (stopped, or with nothing left to download).
    fn without_chunks(&self) -> UpgradeTask {
        UpgradeTask { record: self.record.clone(), package: self.package.clone(), version: self.version, chunks: None }
    }

    fn target(&self) -> Target<'_> {
        Target {
            version: &self.version,
            chunk_count: self.package.chunk_count,
            chunk_size: self.package.chunk_size,
            source_versions: &self.package.source_versions,
        }
    }
}

/// The running upgrades: tasks, every device's upgrade, the devices in an unfinished one, and the
/// cell budget.
pub struct Campaign {
    registry: Arc<Registry>,
    slots: Sharded<DeviceId, Slot>,
    tasks: RwLock<HashMap<UpgradeTaskId, Arc<UpgradeTask>>>,
    active: Mutex<BTreeSet<DeviceId>>,
    budget: Mutex<CellBudget>,
    /// Devices waiting for a slot, per cell, by when they started waiting. Entries of devices
    /// that moved on are dropped when their cell next frees a slot.
    waiting: Mutex<HashMap<String, BTreeSet<(u64, DeviceId)>>>,
    /// Cells where a slot was freed since the last hand-off.
    freed: Mutex<HashSet<String>>,
    /// Wakes the hand-off when a slot is freed.
    pub slot_freed: tokio::sync::Notify,
    next_task_id: AtomicU64,
}

impl Campaign {
    /// No tasks yet.
    pub fn new(registry: Arc<Registry>) -> Campaign {
        Campaign {
            slots: Sharded::new(64),
            tasks: RwLock::default(),
            active: Mutex::default(),
            budget: Mutex::default(),
            waiting: Mutex::default(),
            freed: Mutex::default(),
            slot_freed: tokio::sync::Notify::new(),
            next_task_id: AtomicU64::new(1),
            registry,
        }
    }

    /// Tasks and upgrades from the store; unfinished upgrades take their cell slots again, and
    /// their tasks' chunks are read.
    pub fn load(registry: Arc<Registry>, store: &Store) -> Result<Campaign, StoreError> {
        let ota = Campaign::new(registry);
        let mut max_id = 0;
        for record in stored::tasks(store)? {
            max_id = max_id.max(record.id.0);
            let Some(package) = stored::package(store, record.package)? else {
                tracing::warn!(task = %record.id, "upgrade task without its package; ignored");
                continue;
            };
            let Ok(version) = Version::new(&package.version) else { continue };
            write(&ota.tasks).insert(record.id, Arc::new(UpgradeTask { record, package, version, chunks: None }));
        }
        ota.next_task_id.store(max_id + 1, Ordering::Relaxed);
        let mut resumed = 0;
        let mut unfinished = HashSet::new();
        for u in stored::upgrades(store)? {
            if ota.registry.device_by_id(u.device).is_none() || !read(&ota.tasks).contains_key(&u.task) {
                continue;
            }
            let mut slots = ota.slots.shard(&u.device);
            let slot = slots.entry(u.device).or_default();
            // At most one upgrade is unfinished; otherwise the latest task's stands.
            let replaces = match &slot.upgrade {
                None => true,
                Some(current) => !u.stage.is_final() || (current.stage.is_final() && u.task > current.task),
            };
            if !replaces {
                continue;
            }
            if !u.stage.is_final() {
                resumed += 1;
                unfinished.insert(u.task);
                lock(&ota.active).insert(u.device);
                if let (true, Some((cell, coverage))) = (u.stage.holds_slot(), &u.slot) {
                    lock(&ota.budget).acquire(u.device, cell, *coverage);
                }
            }
            slot.upgrade = Some(u);
        }
        for id in unfinished {
            let Some(task) = ota.task(id).filter(|t| t.record.stopped_at.is_none()) else { continue };
            // A package damaged in the store stalls its task (the devices ask in vain and time
            // out), not the server's start.
            let chunks = match stored::chunks(store, &task.package) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(task = %id, error = %e, "cannot read the package of a running task");
                    continue;
                }
            };
            write(&ota.tasks)
                .insert(id, Arc::new(UpgradeTask { chunks: Some(chunks.into()), ..task.without_chunks() }));
        }
        if resumed > 0 {
            tracing::info!(upgrades = resumed, "resumed unfinished upgrades");
        }
        Ok(ota)
    }

    pub fn task(&self, id: UpgradeTaskId) -> Option<Arc<UpgradeTask>> {
        read(&self.tasks).get(&id).cloned()
    }

    /// Every task's id, newest first.
    pub fn task_ids(&self) -> Vec<UpgradeTaskId> {
        let mut ids: Vec<UpgradeTaskId> = read(&self.tasks).keys().copied().collect();
        ids.sort_by_key(|id| std::cmp::Reverse(id.0));
        ids
    }

    /// The cells with a download in progress or a device waiting for a slot, in cell order.
    pub fn cells(&self) -> Vec<CellView> {
        let view = |cell: &str| CellView {
            cell_id: (cell != UNKNOWN_CELL).then(|| cell.to_string()),
            used_units: 0,
            peak_units: 0,
            downloads: ByCoverage::default(),
            waiting: 0,
        };
        let mut cells: HashMap<String, CellView> = lock(&self.budget)
            .cells()
            .into_iter()
            .map(|(cell, u)| {
                let v = CellView { used_units: u.used, peak_units: u.peak, downloads: u.downloads, ..view(cell) };
                (cell.to_string(), v)
            })
            .collect();
        // Copied out first: slots are locked before the waiting lists, never after.
        let waiting: Vec<(String, DeviceId)> =
            lock(&self.waiting).iter().flat_map(|(cell, q)| q.iter().map(|(_, d)| (cell.clone(), *d))).collect();
        for (cell, id) in waiting {
            // Devices that moved on stay listed until their cell next frees a slot.
            let slot = self.slots.shard(&id);
            if slot.get(&id).and_then(|s| s.upgrade.as_ref()).is_some_and(|u| u.stage == Stage::WaitingSlot) {
                drop(slot);
                cells.entry(cell.clone()).or_insert_with(|| view(&cell)).waiting += 1;
            }
        }
        let mut cells: Vec<CellView> = cells.into_values().collect();
        cells.sort_by(|a, b| a.cell_id.cmp(&b.cell_id));
        cells
    }

    /// Runs `f` on `device`'s slot and its state, locked by the caller.
    fn with_slot<R>(
        &self,
        device: DeviceId,
        s: &mut DeviceState,
        f: impl FnOnce(&mut Slot, &mut DeviceState) -> R,
    ) -> R {
        self.slots.update(device, Slot::holds_anything, |slot| f(slot, s))
    }

    /// `device`'s upgrade in `task` as it is now.
    fn upgrade_in(&self, device: &Device, task: UpgradeTaskId) -> Option<Upgrade> {
        let mut s = device.state();
        self.with_slot(device.id, &mut s, |slot, _| slot.upgrade.clone().filter(|u| u.task == task))
    }
}

/// A cell's download budget as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CellView {
    /// `None` for the devices whose radio names no cell, which share one budget.
    pub cell_id: Option<String>,
    pub used_units: u32,
    pub peak_units: u32,
    pub downloads: ByCoverage,
    /// Devices waiting for a slot in it.
    pub waiting: usize,
}

/// A device's upgrade as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeView {
    pub product_key: String,
    pub device_name: String,
    pub state: &'static str,
    pub progress: u8,
    pub failure_reason: Option<String>,
    pub updated_at: String,
    /// Retries used so far.
    pub attempt: u8,
    /// When a waiting retry may start.
    pub retry_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    #[serde(flatten)]
    pub task: TaskSummary,
    pub devices: Vec<UpgradeView>,
}

/// A task without its devices' upgrades.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSummary {
    pub task_id: String,
    pub package_id: String,
    pub product_key: String,
    pub version: String,
    pub status: UpgradeTaskStatus,
    pub created_at: String,
    pub stopped_at: Option<String>,
    pub retry: RetryView,
    pub counts: HashMap<&'static str, usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryView {
    pub count: u8,
    pub interval_minutes: u64,
}

/// A block of a package, as an LwM2M client fetches it.
pub struct PackageBlock {
    pub data: Vec<u8>,
    /// The Block2 option answering it.
    pub block: Block,
    /// The whole package's size.
    pub size: u64,
}

/// Why a block is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBlock {
    /// The device is in no download of that task (any more).
    NoDownload,
    /// The block starts past the package's end.
    PastEnd,
    /// It asks again for what it had, beyond its flow-control budget.
    OverBudget,
}

/// What a PCP message from a device leads to.
pub struct PcpOutcome {
    /// The frame answering it, if it was a request.
    pub answer: Option<Vec<u8>>,
    /// What to store before the answer goes out.
    pub ops: SmallVec<[Op; 3]>,
}

impl Campaign {
    fn timers(&self) -> Timers {
        Timers::from(&self.registry.config.ota)
    }

    /// Carries out a step of `device`'s upgrade `up` (put back in `slot` by the caller): frees
    /// its cell slot, queues its request, and adds what to store to `ops`.
    #[allow(clippy::too_many_arguments)]
    fn apply_step(
        &self,
        device: &Arc<Device>,
        s: &mut DeviceState,
        slot: &mut Slot,
        up: &Upgrade,
        task: &UpgradeTask,
        step: &Step,
        ops: &mut impl Extend<Op>,
    ) {
        if step.release {
            self.release_slot(device.id);
        }
        if up.stage == Stage::WaitingSlot
            && step.changed
            && let Some((cell, _)) = coverage(s)
        {
            // In the order they started waiting.
            lock(&self.waiting).entry(cell).or_default().insert((up.since, device.id));
        }
        if let Some(request) = &step.send {
            slot.queue(request);
        }
        if up.stage.is_final() {
            lock(&self.active).remove(&device.id);
            slot.request = None;
        }
        if let Some(v) = &step.version
            && s.version.as_ref() != Some(v)
        {
            s.version = Some(v.clone());
            ops.extend([Op::PutDevice(device.clone())]);
        }
        if step.changed {
            ops.extend([stored::put_upgrade(up)]);
        }
        if step.progressed && self.registry.wanted().wants(EventKind::OtaProgress) {
            ops.extend([Op::Event(Box::new(Event {
                kind: EventKind::OtaProgress,
                product_key: device.product_key.clone(),
                device_name: device.device_name.clone(),
                time: UnixMs(up.updated_at),
                data: serde_json::json!({
                    "task_id": up.task.to_string(),
                    "package_id": task.package.id.0.to_string(),
                    "version": task.package.version,
                    "state": up.stage.as_str(),
                    "progress": up.progress(task.package.chunk_count),
                    "failure_reason": up.failure,
                    "attempt": up.attempt,
                }),
            }))]);
        }
    }

    /// The device showed life (its state locked by the caller); what to store with the request
    /// that showed it.
    pub fn contact(&self, device: &Arc<Device>, s: &mut DeviceState, now: UnixMs, ops: &mut impl Extend<Op>) {
        self.with_slot(device.id, s, |slot, s| {
            if slot.upgrade.as_ref().is_none_or(|u| u.stage != Stage::WaitingOnline) {
                return;
            }
            let Some(mut up) = slot.upgrade.take() else { return };
            if let Some(task) = self.task(up.task) {
                let (target, timers) = (task.target(), self.timers());
                let step = up.contact(&task.ctx(&target, &timers, now));
                self.apply_step(device, s, slot, &up, &task, &step, ops);
            }
            slot.upgrade = Some(up);
        })
    }

    /// A PCP message from `device` (its state locked by the caller): moves its upgrade on and
    /// answers it.
    pub fn pcp(&self, device: &Arc<Device>, s: &mut DeviceState, now: UnixMs, msg: &FromDevice) -> PcpOutcome {
        let mut ops = SmallVec::new();
        let answer = self.with_slot(device.id, s, |slot, s| {
            // No task (yet): the upgrade, if any, stays as it is; the device gets the answer to a
            // device in no upgrade.
            let task = slot.upgrade.as_ref().and_then(|u| self.task(u.task));
            let Some((task, mut up)) = task.and_then(|t| slot.upgrade.take().map(|u| (t, u))) else {
                if let FromDevice::Version { result: ResultCode::OK, version }
                | FromDevice::UpgradeResult { result: ResultCode::OK, version } = msg
                    && s.version.as_deref() != Some(version.as_str())
                {
                    s.version = Some(version.to_string());
                    ops.push(Op::PutDevice(device.clone()));
                }
                return upgrade::without_task(msg).map(|f| f.encode());
            };
            let (target, timers) = (task.target(), self.timers());
            let ctx = task.ctx(&target, &timers, now);
            let step = up.pcp(&ctx, msg);
            self.apply_step(device, s, slot, &up, &task, &step, &mut ops);
            // A version answer may let the device on to its cell's queue at once.
            if matches!(up.stage, Stage::WaitingRadio) {
                let radio = coverage(s);
                let next = up.tick(&ctx, false, radio.as_ref().map(|(c, v)| (c.as_str(), *v)), &mut lock(&self.budget));
                self.apply_step(device, s, slot, &up, &task, &next, &mut ops);
            }
            slot.upgrade = Some(up);
            match step.answer? {
                Answer::Frame(f) => Some(f.encode()),
                Answer::Chunk(n) => self.chunk(&task, n),
            }
        });
        PcpOutcome { answer, ops }
    }

    /// The answer carrying chunk `n` of `task`'s package; none (the device asks again) once
    /// the task holds no chunks.
    fn chunk(&self, task: &UpgradeTask, n: u16) -> Option<Vec<u8>> {
        let data = task.chunks.as_ref()?.get(n as usize)?.clone();
        metrics::counter!(metric::OTA_CHUNKS).increment(1);
        Some(FromPlatform::Chunk { result: ResultCode::OK, chunk: n, data }.encode())
    }

    /// The device refused or could not do what its upgrade asked (its state locked by the
    /// caller): an LwM2M client's error answer or failed update result. The attempt fails with
    /// `why`; what to store is returned.
    pub fn refused(&self, device: &Arc<Device>, s: &mut DeviceState, now: UnixMs, why: String) -> SmallVec<[Op; 3]> {
        let mut ops = SmallVec::new();
        self.with_slot(device.id, s, |slot, s| {
            let Some(task) = slot.upgrade.as_ref().and_then(|u| self.task(u.task)) else { return };
            let Some(mut up) = slot.upgrade.take() else { return };
            let (target, timers) = (task.target(), self.timers());
            let step = up.refused(&task.ctx(&target, &timers, now), why);
            self.apply_step(device, s, slot, &up, &task, &step, &mut ops);
            slot.upgrade = Some(up);
        });
        ops
    }

    /// `device`'s upgrade (its state locked by the caller), if it has one.
    pub fn upgrade_of(&self, device: DeviceId, s: &mut DeviceState) -> Option<Upgrade> {
        self.with_slot(device, s, |slot, _| slot.upgrade.clone())
    }

    /// A block of `task`'s package for `device` (its state locked by the caller), fetched by URI
    /// as LwM2M clients do (RFC 7959): any block, so a download resumes where it stopped. It moves
    /// the download on as a PCP chunk request would, by the package chunk holding its last byte.
    pub fn block(
        &self,
        device: &Arc<Device>,
        s: &mut DeviceState,
        now: UnixMs,
        task: UpgradeTaskId,
        block: Block,
    ) -> (Result<PackageBlock, NoBlock>, SmallVec<[Op; 3]>) {
        let mut ops = SmallVec::new();
        let served = self.with_slot(device.id, s, |slot, s| {
            let Some(task) = slot.upgrade.as_ref().filter(|u| u.task == task).and_then(|u| self.task(u.task)) else {
                return Err(NoBlock::NoDownload);
            };
            let (range, answer) = block.slice(task.package.size).map_err(|_| NoBlock::PastEnd)?;
            let chunk_size = task.package.chunk_size as u64;
            let chunk = (range.end.saturating_sub(1) / chunk_size) as u16;
            // Moving the download on is bounded by the download; asking again is charged.
            if !slot.upgrade.as_ref().is_some_and(|u| u.advanced_by_block(chunk, task.package.chunk_count))
                && s.admit(now, &self.registry.config.device).is_err()
            {
                return Err(NoBlock::OverBudget);
            }
            let Some(mut up) = slot.upgrade.take() else { return Err(NoBlock::NoDownload) };
            let (target, timers) = (task.target(), self.timers());
            let step =
                up.pcp(&task.ctx(&target, &timers, now), &FromDevice::ChunkRequest { version: task.version, chunk });
            self.apply_step(device, s, slot, &up, &task, &step, &mut ops);
            slot.upgrade = Some(up);
            if !matches!(step.answer, Some(Answer::Chunk(_))) {
                return Err(NoBlock::NoDownload);
            }
            // Gone once the task stopped: the client asks again in vain and its upgrade ends.
            let chunks = task.chunks.as_ref().ok_or(NoBlock::NoDownload)?;
            let mut data = Vec::with_capacity((range.end - range.start) as usize);
            let mut at = range.start;
            while at < range.end {
                let (index, within) = ((at / chunk_size) as usize, (at % chunk_size) as usize);
                // A chunk shorter than its package says is damage in the store: no block.
                let rest = chunks.get(index).and_then(|c| c.get(within..)).filter(|r| !r.is_empty());
                let rest = rest.ok_or(NoBlock::NoDownload)?;
                let take = rest.len().min((range.end - at) as usize);
                data.extend_from_slice(&rest[..take]);
                at += take as u64;
            }
            metrics::counter!(metric::OTA_CHUNKS).increment(1);
            Ok(PackageBlock { data, block: answer, size: task.package.size })
        });
        (served, ops)
    }

    /// Whether `payload` asks for the next chunk of `device`'s download in progress
    /// ([`Upgrade::advanced_by`]; its state locked by the caller): such a request is not charged
    /// to its flow control.
    pub fn advances_download(&self, device: &Device, s: &mut DeviceState, payload: &[u8]) -> bool {
        let Some(FromDevice::ChunkRequest { chunk, .. }) = self.pcp_message(device, payload) else { return false };
        self.with_slot(device.id, s, |slot, _| {
            let Some(up) = &slot.upgrade else { return false };
            self.task(up.task).is_some_and(|t| up.advanced_by(chunk, t.package.chunk_count))
        })
    }

    /// `payload` as a PCP message, if it is one (SPEC §6): the device's product upgrades over PCP
    /// and the frame is exactly right. Anything else is business data.
    pub fn pcp_message(&self, device: &Device, payload: &[u8]) -> Option<FromDevice> {
        if !payload.starts_with(&[0xFF, 0xFE]) {
            return None;
        }
        if self.registry.ota_protocol(device) != Some(OtaProtocol::Pcp) {
            return None;
        }
        FromDevice::parse(payload).ok()
    }

    /// Radio state from a JSON uplink, merged into what is known; the device to store if it changed.
    pub fn radio_report(&self, device: &Arc<Device>, s: &mut DeviceState, payload: &[u8]) -> Option<Op> {
        self.merge_radio(device, s, RadioReport::from_uplink(payload)?)
    }

    /// Radio state `report`ed (in an uplink, or read from an LwM2M client's Object 4) merged
    /// into what is known; the device to store if it changed.
    pub fn merge_radio(&self, device: &Arc<Device>, s: &mut DeviceState, report: RadioReport) -> Option<Op> {
        let before = s.radio.clone();
        s.radio.rsrp = report.rsrp.or(s.radio.rsrp);
        s.radio.sinr = report.sinr.or(s.radio.sinr);
        s.radio.cell_id = report.cell_id.or(s.radio.cell_id.take());
        (s.radio != before).then(|| Op::PutDevice(device.clone()))
    }

    /// Whether `device` (its state locked by the caller) has a PCP request waiting or on its
    /// way: commands wait behind it.
    pub fn has_request(&self, device: DeviceId, s: &mut DeviceState) -> bool {
        self.with_slot(device, s, |slot, _| slot.request.is_some())
    }

    /// `device`'s PCP request (its state locked by the caller), handed to `exchange` if it is
    /// waiting.
    pub fn request(&self, device: DeviceId, s: &mut DeviceState, exchange: ExchangeKey) -> PlatformRequest {
        self.with_slot(device, s, |slot, _| match &mut slot.request {
            None => PlatformRequest::None,
            Some(r) if r.in_flight.is_some() => PlatformRequest::InFlight,
            Some(r) => {
                r.in_flight = Some(exchange);
                PlatformRequest::Send(r.request.clone())
            }
        })
    }

    /// The exchange carrying `device`'s PCP request ended: delivered (gone), or not (it waits
    /// for the next chance).
    pub fn request_ended(&self, device: DeviceId, s: &mut DeviceState, exchange: ExchangeKey, delivered: bool) {
        self.with_slot(device, s, |slot, _| {
            if let Some(p) = &mut slot.request
                && p.in_flight == Some(exchange)
            {
                if delivered {
                    slot.request = None;
                } else {
                    p.in_flight = None;
                }
            }
        })
    }

    /// Moves every unfinished upgrade on with time: timeouts, requests sent again, radio, free
    /// cell slots and retries. Devices with something new to hear are told if they are awake.
    /// A task whose upgrades all finished lets go of its chunks.
    pub fn tick(&self, now: UnixMs) {
        let ids: Vec<DeviceId> = lock(&self.active).iter().copied().collect();
        let timers = self.timers();
        let mut counts: HashMap<Stage, usize> = HashMap::new();
        let mut downloading = HashSet::new();
        for id in ids {
            if let Some((stage, task)) = self.advance(id, now, &timers) {
                *counts.entry(stage).or_default() += 1;
                if !stage.is_final() {
                    downloading.insert(task);
                }
            }
        }
        let done: Vec<Arc<UpgradeTask>> = read(&self.tasks)
            .values()
            .filter(|t| t.chunks.is_some() && !downloading.contains(&t.record.id))
            .cloned()
            .collect();
        for task in done {
            // Asked of each device again: a task created since the walk began has upgrades the
            // walk did not see.
            let id = task.record.id;
            let unfinished = task.record.devices.iter().any(|(d, _)| {
                let slot = self.slots.shard(d);
                slot.get(d).and_then(|s| s.upgrade.as_ref()).is_some_and(|u| u.task == id && !u.stage.is_final())
            });
            let mut tasks = write(&self.tasks);
            // Unless it changed meanwhile (stopped).
            if !unfinished && tasks.get(&id).is_some_and(|t| Arc::ptr_eq(t, &task)) {
                tasks.insert(id, Arc::new(task.without_chunks()));
            }
        }
        for stage in Stage::ALL.into_iter().filter(|s| !s.is_final()) {
            let n = counts.get(&stage).copied().unwrap_or(0);
            metrics::gauge!(metric::OTA_DEVICES, "state" => stage.as_str()).set(n as f64);
        }
        metrics::gauge!(metric::OTA_CELLS_SATURATED).set(lock(&self.budget).saturated() as f64);
    }

    /// Gives the slots freed since the last call to the devices that waited longest in those
    /// cells, without waiting for the next tick.
    pub fn hand_off_slots(&self, now: UnixMs) {
        let cells: Vec<String> = lock(&self.freed).drain().collect();
        let timers = self.timers();
        for cell in cells {
            loop {
                let first = lock(&self.waiting).get(&cell).and_then(|q| q.first().copied());
                let Some(entry) = first else { break };
                if self.advance(entry.1, now, &timers).map(|(stage, _)| stage) == Some(Stage::WaitingSlot) {
                    // The cell is full again.
                    break;
                }
                let mut waiting = lock(&self.waiting);
                if let Some(q) = waiting.get_mut(&cell) {
                    q.remove(&entry);
                    if q.is_empty() {
                        waiting.remove(&cell);
                    }
                }
            }
        }
    }

    /// Moves one device's upgrade on with time; its stage afterwards and its task (`None` if it
    /// has none).
    fn advance(&self, id: DeviceId, now: UnixMs, timers: &upgrade::Timers) -> Option<(Stage, UpgradeTaskId)> {
        let Some(device) = self.registry.device_by_id(id) else {
            // Deleted: its slot goes to someone else.
            lock(&self.active).remove(&id);
            self.slots.shard(&id).remove(&id);
            self.release_slot(id);
            return None;
        };
        let awake_window = self.registry.product(device.product_key.as_str()).map_or(0, |p| p.awake_window_s);
        let mut ops: SmallVec<[Op; 3]> = SmallVec::new();
        let (stage, kick) = {
            let mut s = device.state();
            let (stage, sent) = self.with_slot(id, &mut s, |slot, s| {
                // Taken out only when its task is known (a task is known once it is stored).
                let task = slot.upgrade.as_ref().and_then(|u| self.task(u.task))?;
                let mut up = slot.upgrade.take()?;
                let (target, awake, radio) = (task.target(), s.awake(now, awake_window), coverage(s));
                let ctx = task.ctx(&target, timers, now);
                let step = up.tick(&ctx, awake, radio.as_ref().map(|(c, v)| (c.as_str(), *v)), &mut lock(&self.budget));
                self.apply_step(&device, s, slot, &up, &task, &step, &mut ops);
                let stage = (up.stage, up.task);
                slot.upgrade = Some(up);
                Some((stage, step.send.is_some() && awake))
            })?;
            if !ops.is_empty() {
                self.registry.writer().record(ops);
            }
            (stage, s.route.filter(|_| sent))
        };
        if let Some(route) = kick {
            self.registry.routes.kick(route, id);
        }
        Some(stage)
    }

    /// Frees `device`'s slot and has its cell handed to the next waiting device.
    fn release_slot(&self, device: DeviceId) {
        if let Some(cell) = lock(&self.budget).release(device) {
            lock(&self.freed).insert(cell);
            self.slot_freed.notify_one();
        }
    }

    /// Starts `package` on `devices` (all of its product). A device already in an unfinished
    /// upgrade fails here with "Task Conflict"; the others wait for a sign of life.
    pub async fn create_task(
        &self,
        package: PackageRecord,
        chunks: Vec<Vec<u8>>,
        devices: Vec<Arc<Device>>,
        retry: Retry,
    ) -> Result<UpgradeTaskId, RegistryError> {
        let version = Version::new(&package.version).map_err(|_| {
            RegistryError::Conflict(format!("package version {:?} cannot travel in PCP", package.version))
        })?;
        let now = UnixMs::now();
        let id = UpgradeTaskId(self.next_task_id.fetch_add(1, Ordering::Relaxed));
        let record = UpgradeTaskRecord {
            id,
            package: package.id,
            product_key: package.product_key.clone(),
            devices: devices.iter().map(|d| (d.id, d.device_name.clone())).collect(),
            retry,
            created_at: now.0,
            stopped_at: None,
        };
        let mut ops = vec![stored::put_task(&record)];
        let mut started = Vec::new();
        for d in &devices {
            let mut s = d.state();
            self.with_slot(d.id, &mut s, |slot, _| {
                if slot.upgrade.as_ref().is_some_and(|u| !u.stage.is_final()) {
                    ops.push(stored::put_upgrade(&Upgrade::conflict(id, d.id, now)));
                    return;
                }
                let up = Upgrade::new(id, d.id, now);
                ops.push(stored::put_upgrade(&up));
                started.push((d.clone(), slot.upgrade.replace(up)));
            });
        }
        let commit = self.registry.writer().commit(ops);
        if let Err(e) = commit.await {
            for (d, previous) in started {
                let mut s = d.state();
                self.with_slot(d.id, &mut s, |slot, _| slot.upgrade = previous);
            }
            return Err(e.into());
        }
        // Only a stored task moves: the tick finds its devices from now on.
        let task = UpgradeTask { record, package, version, chunks: Some(chunks.into()) };
        write(&self.tasks).insert(id, Arc::new(task));
        lock(&self.active).extend(started.iter().map(|(d, _)| d.id));
        tracing::info!(task = %id, devices = devices.len(), "upgrade task created");
        Ok(id)
    }

    /// Stops a task: its unfinished upgrades become canceled and free their slots.
    pub async fn stop_task(&self, id: UpgradeTaskId) -> Result<(), RegistryError> {
        let task = self.task(id).ok_or_else(|| RegistryError::NotFound(format!("task {id}")))?;
        if task.record.stopped_at.is_some() {
            return Ok(());
        }
        let now = UnixMs::now();
        let mut record = task.record.clone();
        record.stopped_at = Some(now.0);
        let stopped = Arc::new(UpgradeTask { record: record.clone(), ..task.without_chunks() });
        write(&self.tasks).insert(id, stopped.clone());
        let mut ops = vec![stored::put_task(&record)];
        let timers = self.timers();
        let target = stopped.target();
        for (device_id, _) in &stopped.record.devices {
            let Some(device) = self.registry.device_by_id(*device_id) else { continue };
            let mut s = device.state();
            self.with_slot(device.id, &mut s, |slot, s| {
                let Some(mut up) = slot.upgrade.take_if(|u| u.task == id) else { return };
                let step = up.stop(&stopped.ctx(&target, &timers, now));
                self.apply_step(&device, s, slot, &up, &stopped, &step, &mut ops);
                slot.upgrade = Some(up);
            });
        }
        self.registry.writer().commit(ops).await?;
        tracing::info!(task = %id, "upgrade task stopped");
        Ok(())
    }

    /// A task with every device's upgrade, the unfinished ones as they are now.
    pub fn task_view(&self, store: &Store, id: UpgradeTaskId) -> Result<Option<TaskView>, StoreError> {
        let Some(task) = self.task(id) else { return Ok(None) };
        let stored = stored::upgrades_of(store, id)?;
        let pk: &ProductKey = &task.record.product_key;
        let mut counts: HashMap<&'static str, usize> = Stage::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut unfinished = false;
        let devices: Vec<UpgradeView> = task
            .record
            .devices
            .iter()
            .filter_map(|(device_id, name)| {
                let live = self.registry.device_by_id(*device_id).and_then(|d| self.upgrade_in(&d, id));
                let up = live.or_else(|| stored.get(device_id).cloned())?;
                *counts.entry(up.stage.as_str()).or_default() += 1;
                unfinished |= !up.stage.is_final();
                Some(UpgradeView {
                    product_key: pk.to_string(),
                    device_name: name.to_string(),
                    state: up.stage.as_str(),
                    progress: up.progress(task.package.chunk_count),
                    failure_reason: up.failure.clone(),
                    updated_at: UnixMs(up.updated_at).rfc3339(),
                    attempt: up.attempt,
                    retry_at: up.retry_at.filter(|_| up.stage == Stage::WaitingOnline).map(|t| UnixMs(t).rfc3339()),
                })
            })
            .collect();
        let status = match (task.record.stopped_at, unfinished) {
            (Some(_), _) => UpgradeTaskStatus::Stopped,
            (None, true) => UpgradeTaskStatus::Running,
            (None, false) => UpgradeTaskStatus::Finished,
        };
        let task = TaskSummary {
            task_id: id.to_string(),
            package_id: task.package.id.0.to_string(),
            product_key: pk.to_string(),
            version: task.package.version.clone(),
            status,
            created_at: UnixMs(task.record.created_at).rfc3339(),
            stopped_at: task.record.stopped_at.map(|t| UnixMs(t).rfc3339()),
            retry: RetryView {
                count: task.record.retry.count,
                interval_minutes: task.record.retry.interval_ms / 60_000,
            },
            counts,
        };
        Ok(Some(TaskView { task, devices }))
    }
}

/// A deleted device's upgrade leaves the campaign with it (its stored records stay, as its task's
/// history); the tick then frees its cell slot. Put back if the deletion cannot be stored.
impl Held for &Campaign {
    type Taken = Option<Slot>;

    fn take(&self, device: &Device, _locked: &DeviceState) -> (Option<Slot>, Vec<Op>) {
        (self.slots.shard(&device.id).remove(&device.id), Vec::new())
    }

    fn put_back(&self, device: &Device, _locked: &DeviceState, slot: Option<Slot>) {
        if let Some(slot) = slot {
            self.slots.shard(&device.id).insert(device.id, slot);
        }
    }
}

/// The device's cell and coverage, if its radio state allows scheduling it.
fn coverage(s: &DeviceState) -> Option<(String, Coverage)> {
    let r = &s.radio;
    let coverage = Coverage::from_radio(r.rsrp, r.sinr, r.cell_id.is_some())?;
    Some((r.cell_id.clone().unwrap_or_else(|| UNKNOWN_CELL.to_string()), coverage))
}

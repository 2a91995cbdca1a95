//! Upgrade tasks as the registry runs them (SPEC §6): each device's [`Upgrade`] lives in its
//! state, beside its commands, and moves on what the device says, on any contact and on a
//! periodic tick. Every change is queued for the store under the device's lock; the cell budget
//! is locked after it (never the other way round).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use smallvec::SmallVec;

use super::device::DeviceState;
use super::{Device, Registry, RegistryError};
use crate::clock::UnixMs;
use crate::identity::{DeviceId, ProductKey};
use crate::northbound::{Event, EventKind};
use crate::ota::coverage::{CellBudget, Coverage, RadioReport};
use crate::ota::package::PackageRecord;
use crate::ota::pcp::{FromDevice, FromPlatform, ResultCode, Version};
use crate::ota::stored;
use crate::ota::task::{UpgradeTaskId, UpgradeTaskRecord, UpgradeTaskStatus};
use crate::ota::upgrade::{self, Answer, Ctx, Retry, Stage, Step, Target, Timers, Upgrade};
use crate::store::records::OtaProtocol;
use crate::store::{Op, Store, StoreError};
use crate::sync::{lock, read, write};
use crate::telemetry::metric;

/// Devices whose radio names no cell share this one, so together they never load more than a cell.
const UNKNOWN_CELL: &str = "";

/// A task and the package it installs, as steps need them.
pub struct UpgradeTask {
    pub record: UpgradeTaskRecord,
    pub package: PackageRecord,
    version: Version,
}

impl UpgradeTask {
    /// What a step of one of this task's upgrades needs.
    fn ctx<'a>(&self, target: &'a Target<'a>, timers: &'a upgrade::Timers, now: UnixMs) -> Ctx<'a> {
        Ctx { now, target, timers, retry: self.record.retry }
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

/// The running upgrades: tasks, the devices in an unfinished upgrade, and the cell budget.
#[derive(Default)]
pub struct Ota {
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

impl Ota {
    /// Tasks and upgrades from the store; unfinished upgrades take their cell slots again.
    pub(super) fn load(store: &Store, by_id: &HashMap<DeviceId, Arc<Device>>) -> Result<Ota, StoreError> {
        let ota = Ota::default();
        let mut max_id = 0;
        for record in stored::tasks(store)? {
            max_id = max_id.max(record.id.0);
            let Some(package) = stored::package(store, record.package)? else {
                tracing::warn!(task = %record.id, "upgrade task without its package; ignored");
                continue;
            };
            let Ok(version) = Version::new(&package.version) else { continue };
            write(&ota.tasks).insert(record.id, Arc::new(UpgradeTask { record, package, version }));
        }
        ota.next_task_id.store(max_id + 1, Ordering::Relaxed);
        let mut resumed = 0;
        for u in stored::upgrades(store)? {
            let Some(device) = by_id.get(&u.device) else { continue };
            if !read(&ota.tasks).contains_key(&u.task) {
                continue;
            }
            let mut s = device.state();
            // At most one upgrade is unfinished; otherwise the latest task's stands.
            let replaces = match &s.upgrade {
                None => true,
                Some(current) => !u.stage.is_final() || (current.stage.is_final() && u.task > current.task),
            };
            if !replaces {
                continue;
            }
            if !u.stage.is_final() {
                resumed += 1;
                lock(&ota.active).insert(u.device);
                if let (true, Some((cell, coverage))) = (u.stage.holds_slot(), &u.slot) {
                    lock(&ota.budget).acquire(u.device, cell, *coverage);
                }
            }
            s.upgrade = Some(u);
        }
        if resumed > 0 {
            tracing::info!(upgrades = resumed, "resumed unfinished upgrades");
        }
        Ok(ota)
    }

    pub fn task(&self, id: UpgradeTaskId) -> Option<Arc<UpgradeTask>> {
        read(&self.tasks).get(&id).cloned()
    }
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
    pub task_id: String,
    pub package_id: String,
    pub product_key: String,
    pub version: String,
    pub status: UpgradeTaskStatus,
    pub created_at: String,
    pub stopped_at: Option<String>,
    pub retry: RetryView,
    pub counts: HashMap<&'static str, usize>,
    pub devices: Vec<UpgradeView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryView {
    pub count: u8,
    pub interval_minutes: u64,
}

/// What a PCP message from a device leads to.
pub struct PcpOutcome {
    /// The frame answering it, if it was a request.
    pub answer: Option<Vec<u8>>,
    /// What to store before the answer goes out.
    pub ops: SmallVec<[Op; 3]>,
}

impl Registry {
    /// Carries out a step of `device`'s upgrade (put back in `s` by the caller): frees its
    /// slot, queues its request, and adds what to store to `ops`.
    fn apply_step(
        &self,
        device: &Arc<Device>,
        s: &mut DeviceState,
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
            lock(&self.ota.waiting).entry(cell).or_default().insert((up.since, device.id));
        }
        if let Some(request) = &step.send {
            crate::downlink::PcpRequest::queue(&mut s.pcp_request, request.encode());
        }
        if up.stage.is_final() {
            lock(&self.ota.active).remove(&device.id);
            s.pcp_request = None;
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
        if step.progressed && self.wanted.wants(EventKind::OtaProgress) {
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

    /// The device showed life; what to store with the request that showed it.
    pub(super) fn upgrade_contact(
        &self,
        device: &Arc<Device>,
        s: &mut DeviceState,
        now: UnixMs,
        ops: &mut impl Extend<Op>,
    ) {
        if s.upgrade.as_ref().is_none_or(|u| u.stage != Stage::WaitingOnline) {
            return;
        }
        let Some(mut up) = s.upgrade.take() else { return };
        if let Some(task) = self.ota.task(up.task) {
            let (target, timers) = (task.target(), Timers::from(&self.config.ota));
            let step = up.contact(&task.ctx(&target, &timers, now));
            self.apply_step(device, s, &up, &task, &step, ops);
        }
        s.upgrade = Some(up);
    }

    /// A PCP message from `device`: moves its upgrade on and answers it.
    pub fn upgrade_pcp(&self, device: &Arc<Device>, s: &mut DeviceState, now: UnixMs, msg: &FromDevice) -> PcpOutcome {
        let mut ops = SmallVec::new();
        // No task (yet): the upgrade, if any, stays as it is; the device gets the answer to a
        // device in no upgrade.
        let task = s.upgrade.as_ref().and_then(|u| self.ota.task(u.task));
        let Some((task, mut up)) = task.and_then(|t| s.upgrade.take().map(|u| (t, u))) else {
            if let FromDevice::Version { result: ResultCode::OK, version }
            | FromDevice::UpgradeResult { result: ResultCode::OK, version } = msg
                && s.version.as_deref() != Some(version.as_str())
            {
                s.version = Some(version.to_string());
                ops.push(Op::PutDevice(device.clone()));
            }
            return PcpOutcome { answer: upgrade::without_task(msg).map(|f| f.encode()), ops };
        };
        let (target, timers) = (task.target(), Timers::from(&self.config.ota));
        let ctx = task.ctx(&target, &timers, now);
        let step = up.pcp(&ctx, msg);
        self.apply_step(device, s, &up, &task, &step, &mut ops);
        // A version answer may let the device on to its cell's queue at once.
        if matches!(up.stage, Stage::WaitingRadio) {
            let radio = coverage(s);
            let next = up.tick(&ctx, false, radio.as_ref().map(|(c, v)| (c.as_str(), *v)), &mut lock(&self.ota.budget));
            self.apply_step(device, s, &up, &task, &next, &mut ops);
        }
        s.upgrade = Some(up);
        let answer = match step.answer {
            None => None,
            Some(Answer::Frame(f)) => Some(f.encode()),
            Some(Answer::Chunk(n)) => match stored::chunk(&self.store, task.package.id, n) {
                Ok(Some(data)) => {
                    metrics::counter!(metric::OTA_CHUNKS).increment(1);
                    Some(FromPlatform::Chunk { result: ResultCode::OK, chunk: n, data }.encode())
                }
                // Unanswered, the device asks again.
                Ok(None) | Err(_) => {
                    tracing::error!(package = task.package.id.0, chunk = n, "cannot read a package chunk");
                    None
                }
            },
        };
        PcpOutcome { answer, ops }
    }

    /// `payload` as a PCP message, if it is one (SPEC §6): the device's product upgrades over PCP
    /// and the frame is exactly right. Anything else is business data.
    /// Whether `payload` asks for the next chunk of `device`'s download in progress
    /// ([`Upgrade::advanced_by`]): such a request is not charged to its flow control.
    pub fn advances_download(&self, device: &Device, s: &DeviceState, payload: &[u8]) -> bool {
        let Some(FromDevice::ChunkRequest { chunk, .. }) = self.pcp_message(device, payload) else { return false };
        let Some(up) = &s.upgrade else { return false };
        self.ota.task(up.task).is_some_and(|t| up.advanced_by(chunk, t.package.chunk_count))
    }

    pub fn pcp_message(&self, device: &Device, payload: &[u8]) -> Option<FromDevice> {
        if !payload.starts_with(&[0xFF, 0xFE]) {
            return None;
        }
        let product = self.product(device.product_key.as_str())?;
        if product.ota_protocol != OtaProtocol::Pcp {
            return None;
        }
        FromDevice::parse(payload).ok()
    }

    /// Radio state from a JSON uplink, merged into what is known; the device to store if it changed.
    pub fn radio_report(&self, device: &Arc<Device>, s: &mut DeviceState, payload: &[u8]) -> Option<Op> {
        let report = RadioReport::from_uplink(payload)?;
        let before = s.radio.clone();
        s.radio.rsrp = report.rsrp.or(s.radio.rsrp);
        s.radio.sinr = report.sinr.or(s.radio.sinr);
        s.radio.cell_id = report.cell_id.or(s.radio.cell_id.take());
        (s.radio != before).then(|| Op::PutDevice(device.clone()))
    }

    /// Moves every unfinished upgrade on with time: timeouts, requests sent again, radio, free
    /// cell slots and retries. Devices with something new to hear are told if they are awake.
    pub fn upgrade_tick(&self, now: UnixMs) {
        let ids: Vec<DeviceId> = lock(&self.ota.active).iter().copied().collect();
        let timers = Timers::from(&self.config.ota);
        let mut counts: HashMap<Stage, usize> = HashMap::new();
        for id in ids {
            if let Some(stage) = self.advance(id, now, &timers) {
                *counts.entry(stage).or_default() += 1;
            }
        }
        for stage in Stage::ALL.into_iter().filter(|s| !s.is_final()) {
            let n = counts.get(&stage).copied().unwrap_or(0);
            metrics::gauge!(metric::OTA_DEVICES, "state" => stage.as_str()).set(n as f64);
        }
        metrics::gauge!(metric::OTA_CELLS_SATURATED).set(lock(&self.ota.budget).saturated() as f64);
    }

    /// Gives the slots freed since the last call to the devices that waited longest in those
    /// cells, without waiting for the next tick.
    pub fn hand_off_slots(&self, now: UnixMs) {
        let cells: Vec<String> = lock(&self.ota.freed).drain().collect();
        let timers = Timers::from(&self.config.ota);
        for cell in cells {
            loop {
                let first = lock(&self.ota.waiting).get(&cell).and_then(|q| q.first().copied());
                let Some(entry) = first else { break };
                if self.advance(entry.1, now, &timers) == Some(Stage::WaitingSlot) {
                    // The cell is full again.
                    break;
                }
                let mut waiting = lock(&self.ota.waiting);
                if let Some(q) = waiting.get_mut(&cell) {
                    q.remove(&entry);
                    if q.is_empty() {
                        waiting.remove(&cell);
                    }
                }
            }
        }
    }

    /// Moves one device's upgrade on with time; its stage afterwards (`None` if it has none).
    fn advance(&self, id: DeviceId, now: UnixMs, timers: &upgrade::Timers) -> Option<Stage> {
        let Some(device) = self.device_by_id(id) else {
            // Deleted: its slot goes to someone else.
            lock(&self.ota.active).remove(&id);
            self.release_slot(id);
            return None;
        };
        let awake_window = self.product(device.product_key.as_str()).map_or(0, |p| p.awake_window_s);
        let mut ops: SmallVec<[Op; 3]> = SmallVec::new();
        let (stage, kick) = {
            let mut s = device.state();
            // Taken out only when its task is known (a task is known once it is stored).
            let task = s.upgrade.as_ref().and_then(|u| self.ota.task(u.task))?;
            let mut up = s.upgrade.take()?;
            let (target, awake, radio) = (task.target(), s.awake(now, awake_window), coverage(&s));
            let ctx = task.ctx(&target, timers, now);
            let step = up.tick(&ctx, awake, radio.as_ref().map(|(c, v)| (c.as_str(), *v)), &mut lock(&self.ota.budget));
            self.apply_step(&device, &mut s, &up, &task, &step, &mut ops);
            let stage = up.stage;
            s.upgrade = Some(up);
            if !ops.is_empty() {
                self.writer.record(ops);
            }
            (stage, step.send.is_some().then_some(s.route).flatten().filter(|_| awake))
        };
        if let Some(route) = kick {
            self.routes.kick(route, id);
        }
        Some(stage)
    }

    /// Frees `device`'s slot and has its cell handed to the next waiting device.
    fn release_slot(&self, device: DeviceId) {
        if let Some(cell) = lock(&self.ota.budget).release(device) {
            lock(&self.ota.freed).insert(cell);
            self.ota.slot_freed.notify_one();
        }
    }

    /// Starts `package` on `devices` (all of its product). A device already in an unfinished
    /// upgrade fails here with "Task Conflict"; the others wait for a sign of life.
    pub async fn create_task(
        &self,
        package: PackageRecord,
        devices: Vec<Arc<Device>>,
        retry: Retry,
    ) -> Result<UpgradeTaskId, RegistryError> {
        let version = Version::new(&package.version).map_err(|_| {
            RegistryError::Conflict(format!("package version {:?} cannot travel in PCP", package.version))
        })?;
        let now = UnixMs::now();
        let id = UpgradeTaskId(self.ota.next_task_id.fetch_add(1, Ordering::Relaxed));
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
            if s.upgrade.as_ref().is_some_and(|u| !u.stage.is_final()) {
                ops.push(stored::put_upgrade(&Upgrade::conflict(id, d.id, now)));
                continue;
            }
            let up = Upgrade::new(id, d.id, now);
            ops.push(stored::put_upgrade(&up));
            started.push((d.clone(), s.upgrade.replace(up)));
        }
        let commit = self.writer.commit(ops);
        if let Err(e) = commit.await {
            for (d, previous) in started {
                d.state().upgrade = previous;
            }
            return Err(e.into());
        }
        // Only a stored task moves: the tick finds its devices from now on.
        write(&self.ota.tasks).insert(id, Arc::new(UpgradeTask { record, package, version }));
        lock(&self.ota.active).extend(started.iter().map(|(d, _)| d.id));
        tracing::info!(task = %id, devices = devices.len(), "upgrade task created");
        Ok(id)
    }

    /// Stops a task: its unfinished upgrades become canceled and free their slots.
    pub async fn stop_task(&self, id: UpgradeTaskId) -> Result<(), RegistryError> {
        let task = self.ota.task(id).ok_or_else(|| RegistryError::NotFound(format!("task {id}")))?;
        if task.record.stopped_at.is_some() {
            return Ok(());
        }
        let now = UnixMs::now();
        let mut record = task.record.clone();
        record.stopped_at = Some(now.0);
        let stopped =
            Arc::new(UpgradeTask { record: record.clone(), package: task.package.clone(), version: task.version });
        write(&self.ota.tasks).insert(id, stopped.clone());
        let mut ops = vec![stored::put_task(&record)];
        let timers = Timers::from(&self.config.ota);
        let target = stopped.target();
        for (device_id, _) in &stopped.record.devices {
            let Some(device) = self.device_by_id(*device_id) else { continue };
            let mut s = device.state();
            let Some(mut up) = s.upgrade.take_if(|u| u.task == id) else { continue };
            let step = up.stop(&stopped.ctx(&target, &timers, now));
            self.apply_step(&device, &mut s, &up, &stopped, &step, &mut ops);
            s.upgrade = Some(up);
        }
        self.writer.commit(ops).await?;
        tracing::info!(task = %id, "upgrade task stopped");
        Ok(())
    }

    /// A task with every device's upgrade, the unfinished ones as they are now.
    pub fn task_view(&self, id: UpgradeTaskId) -> Result<Option<TaskView>, StoreError> {
        let Some(task) = self.ota.task(id) else { return Ok(None) };
        let stored = stored::upgrades_of(&self.store, id)?;
        let pk: &ProductKey = &task.record.product_key;
        let mut counts: HashMap<&'static str, usize> = Stage::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut unfinished = false;
        let devices: Vec<UpgradeView> = task
            .record
            .devices
            .iter()
            .filter_map(|(device_id, name)| {
                let live =
                    self.device_by_id(*device_id).and_then(|d| d.state().upgrade.clone().filter(|u| u.task == id));
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
        Ok(Some(TaskView {
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
            devices,
        }))
    }
}

/// The device's cell and coverage, if its radio state allows scheduling it.
fn coverage(s: &DeviceState) -> Option<(String, Coverage)> {
    let r = &s.radio;
    let coverage = Coverage::from_radio(r.rsrp, r.sinr, r.cell_id.is_some())?;
    Some((r.cell_id.clone().unwrap_or_else(|| UNKNOWN_CELL.to_string()), coverage))
}

//! Devices moving between instances (SPEC §10): a device leaving for another instance is refused
//! here from the moment its move is stored until the destination refused it; one arriving is
//! stored with its open commands in one write. The distributions (tasks moving devices) live here
//! too; `cluster::runner` drives them.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::sync::{Notify, mpsc};

use super::Cluster;
use super::stored;
use super::task::{Changed, Distribution, DistributionId, DistributionRecord, DistributionStatus, EntryStatus, Policy};
use super::transfer::{
    CommandTransfer, DeviceTransfer, ImportOutcome, ImportRequest, ImportResult, ProductTransfer, ReleaseOutcome,
    ReleaseRequest, ReleaseResult,
};
use crate::clock::UnixMs;
use crate::downlink::{CommandId, CommandRecord, NewRecord};
use crate::identity::Home;
use crate::identity::{DeviceId, DeviceName, InstanceName};
use crate::net::PortFamily;
use crate::registry::{Device, RegistryError};
use crate::store::records::{DeviceRecord, ProductRecord};
use crate::store::{Op, Store, StoreError};
use crate::sync::lock;

/// Most devices one task may move (seed 000: 10,000 per distribution).
pub const MAX_TASK_DEVICES: usize = 10_000;

/// A task and what wakes its runner (an operator's action, a bootstrap).
pub struct DistributionCell {
    task: Mutex<Distribution>,
    pub wake: Notify,
}

impl DistributionCell {
    pub fn lock(&self) -> MutexGuard<'_, Distribution> {
        lock(&self.task)
    }
}

/// The distribution tasks and the devices open ones hold.
pub struct Distributions {
    tasks: Mutex<BTreeMap<DistributionId, Arc<DistributionCell>>>,
    members: Mutex<HashMap<DeviceId, DistributionId>>,
    next_id: AtomicU64,
    /// Tasks with work for the runner (created, loaded unfinished, retried, resumed).
    runnable: mpsc::UnboundedSender<Arc<DistributionCell>>,
    runnable_rx: Mutex<Option<mpsc::UnboundedReceiver<Arc<DistributionCell>>>>,
}

impl Default for Distributions {
    /// No distribution tasks yet.
    fn default() -> Distributions {
        let (runnable, rx) = mpsc::unbounded_channel();
        Distributions {
            tasks: Mutex::default(),
            members: Mutex::default(),
            next_id: AtomicU64::new(1),
            runnable,
            runnable_rx: Mutex::new(Some(rx)),
        }
    }
}

impl Distributions {
    pub fn load(store: &Store) -> Result<Distributions, StoreError> {
        let distributions = Distributions::default();
        let mut tasks = BTreeMap::new();
        let mut members = HashMap::new();
        let mut max_id = 0;
        for record in stored::tasks(store)? {
            max_id = max_id.max(record.id.0);
            let mut entries = stored::entries(store, record.id)?;
            entries.sort_by(|a, b| (a.batch, &a.device_name).cmp(&(b.batch, &b.device_name)));
            if record.status.is_open() {
                members.extend(entries.iter().map(|e| (e.device, record.id)));
            }
            let (id, open) = (record.id, record.status.is_open());
            let cell =
                Arc::new(DistributionCell { task: Mutex::new(Distribution { record, entries }), wake: Notify::new() });
            if open {
                let _ = distributions.runnable.send(cell.clone());
            }
            tasks.insert(id, cell);
        }
        Ok(Distributions {
            tasks: Mutex::new(tasks),
            members: Mutex::new(members),
            next_id: AtomicU64::new(max_id + 1),
            ..distributions
        })
    }

    /// The runner's end of the queue of tasks with work (taken once).
    pub fn take_runnable(&self) -> Option<mpsc::UnboundedReceiver<Arc<DistributionCell>>> {
        lock(&self.runnable_rx).take()
    }

    pub fn task(&self, id: DistributionId) -> Option<Arc<DistributionCell>> {
        lock(&self.tasks).get(&id).cloned()
    }

    pub fn tasks(&self) -> Vec<Arc<DistributionCell>> {
        lock(&self.tasks).values().cloned().collect()
    }

    /// Hands a task (back) to the runner and wakes it.
    pub fn run(&self, cell: &Arc<DistributionCell>) {
        cell.wake.notify_one();
        let _ = self.runnable.send(cell.clone());
    }

    /// A finished task lets go of its devices.
    fn release_members(&self, task: &Distribution) {
        let mut members = lock(&self.members);
        for e in &task.entries {
            if members.get(&e.device) == Some(&task.record.id) {
                members.remove(&e.device);
            }
        }
    }
}

pub struct NewDistribution {
    pub product_key: String,
    /// None: every device of the product this instance serves.
    pub device_names: Option<Vec<DeviceName>>,
    pub policy: Policy,
    pub batch_size: Option<usize>,
    pub gate: super::task::Gate,
    pub batch_timeout_s: Option<u64>,
    pub on_timeout: super::task::OnTimeout,
}

#[derive(Debug, Clone, Copy)]
pub enum Control {
    Pause,
    Resume,
    Confirm,
    Retry,
    Cancel,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Confirm => "confirm",
            Control::Retry => "retry",
            Control::Cancel => "cancel",
        }
    }
}

/// A device that began leaving.
pub struct Leaving {
    /// To store before the destination hears of it.
    pub ops: Vec<Op>,
    /// What to send the destination.
    pub transfer: DeviceTransfer,
    /// It was leaving already: an earlier attempt may have reached the destination.
    pub resumed: bool,
}

/// What `/bootstrap` tells a device.
#[derive(Debug)]
pub enum BootstrapAnswer {
    /// Connect here.
    Go { host: String, port: u16 },
    /// Its home is being decided or moved: ask again after this many seconds.
    Later(u32),
    /// Its home is an instance this one cannot name (a configuration mistake, logged).
    Unknown(InstanceName),
}

/// The task changes to store, as ops.
pub fn task_ops(task: &Distribution, changed: &Changed) -> Vec<Op> {
    let mut ops: Vec<Op> = changed.entries.iter().map(|&i| stored::put_entry(&task.entries[i])).collect();
    if changed.record {
        ops.push(stored::put_task(&task.record));
    }
    ops
}

impl Cluster {
    /// Stores a new distribution task and hands it to the runner.
    pub async fn create_distribution(&self, new: NewDistribution) -> Result<Arc<DistributionCell>, RegistryError> {
        let product = self
            .registry
            .product(&new.product_key)
            .ok_or_else(|| RegistryError::NotFound(format!("product {}", new.product_key)))?;
        match &new.policy {
            Policy::Specified(i) if self.peers.peer(i).is_none() => {
                return Err(RegistryError::Invalid(format!("instance {i} is not a configured peer (cluster.peers)")));
            }
            Policy::Nearest if self.peers.nearest_peers().is_empty() => {
                return Err(RegistryError::Invalid(
                    "the nearest policy needs cluster.nearest rules naming peers".into(),
                ));
            }
            _ => {}
        }
        let devices: Vec<Arc<Device>> = match &new.device_names {
            Some(names) => {
                let mut v = Vec::with_capacity(names.len());
                for n in names {
                    let d = self.registry.device(product.product_key.as_str(), n.as_str()).ok_or_else(|| {
                        RegistryError::NotFound(format!("device {n} in product {}", product.product_key))
                    })?;
                    v.push(d);
                }
                v.sort_by(|a, b| a.device_name.cmp(&b.device_name));
                v.dedup_by(|a, b| a.id == b.id);
                v
            }
            None => self
                .registry
                .devices_of(product.product_key.as_str())
                .into_iter()
                .filter(|d| d.state().home.is_here())
                .collect(),
        };
        if devices.is_empty() {
            return Err(RegistryError::Invalid("the task names no device this instance serves".into()));
        }
        if devices.len() > MAX_TASK_DEVICES {
            return Err(RegistryError::Invalid(format!(
                "{} devices: a task moves at most {MAX_TASK_DEVICES}",
                devices.len()
            )));
        }
        if let Some(d) = devices.iter().find(|d| !d.state().home.is_here()) {
            return Err(RegistryError::Conflict(format!("device {} is not served here", d.device_name)));
        }
        let count = devices.len();
        let batch_size = match (&new.policy, new.batch_size) {
            (Policy::Nearest, Some(_)) => {
                return Err(RegistryError::Invalid("batch_size applies to the specified policy only".into()));
            }
            (_, Some(0)) => return Err(RegistryError::Invalid("batch_size must be at least 1".into())),
            (_, Some(n)) => n.min(count),
            (_, None) => count,
        };
        let now = UnixMs::now().0;
        let record = DistributionRecord {
            id: DistributionId(self.distribution.next_id.fetch_add(1, Ordering::Relaxed)),
            product_key: product.product_key.clone(),
            policy: new.policy,
            batch_size,
            gate: new.gate,
            batch_timeout_s: new.batch_timeout_s,
            on_timeout: new.on_timeout,
            status: DistributionStatus::Initializing,
            error: None,
            batch: 0,
            batches: count.div_ceil(batch_size) as u32,
            batch_moved_at: None,
            confirmed: false,
            attempts: 0,
            backoff_until: None,
            created_at: now,
            updated_at: now,
        };
        let id = record.id;
        let task = Distribution::new(record, devices.iter().map(|d| (d.id, d.device_name.clone())).collect());
        {
            let mut members = lock(&self.distribution.members);
            if let Some(d) = devices.iter().find(|d| members.contains_key(&d.id)) {
                return Err(RegistryError::Conflict(format!(
                    "device {} is already in distribution task {}",
                    d.device_name, members[&d.id]
                )));
            }
            members.extend(devices.iter().map(|d| (d.id, id)));
        }
        let all = Changed { record: true, entries: (0..task.entries.len()).collect() };
        if let Err(e) = self.registry.writer().commit(task_ops(&task, &all)).await {
            let mut members = lock(&self.distribution.members);
            for d in &devices {
                members.remove(&d.id);
            }
            return Err(e.into());
        }
        let cell = Arc::new(DistributionCell { task: Mutex::new(task), wake: Notify::new() });
        lock(&self.distribution.tasks).insert(id, cell.clone());
        self.distribution.run(&cell);
        Ok(cell)
    }

    /// What to store after a step; a task that completed lets go of its devices.
    pub fn task_changes(&self, task: &Distribution, changed: &Changed) -> Vec<Op> {
        if changed.record && !task.record.status.is_open() {
            self.distribution.release_members(task);
        }
        task_ops(task, changed)
    }

    /// An operator's pause, resume, confirmation or retry (rollback is the runner's).
    pub async fn control_distribution(
        &self,
        cell: &Arc<DistributionCell>,
        action: Control,
    ) -> Result<(), RegistryError> {
        let now = UnixMs::now().0;
        let ops = {
            let mut task = cell.lock();
            let status = task.record.status;
            let mut changed = Changed { record: true, entries: Vec::new() };
            match action {
                Control::Pause
                    if matches!(status, DistributionStatus::InProgress | DistributionStatus::Initializing) =>
                {
                    task.record.status = DistributionStatus::Paused;
                }
                Control::Resume if status == DistributionStatus::Paused => {
                    // The product is sent again (harmless): the pause may have come before it went.
                    task.record.status = DistributionStatus::Initializing;
                    task.record.error = None;
                    // The gate's timeout starts over; `confirm` lets a batch through.
                    if task.record.batch_moved_at.is_some() {
                        task.record.batch_moved_at = Some(now);
                    }
                }
                Control::Confirm if matches!(status, DistributionStatus::InProgress | DistributionStatus::Paused) => {
                    task.record.confirmed = true;
                }
                Control::Cancel if status.is_open() => match task.cancel(now) {
                    Some(c) => changed = c,
                    None => {
                        return Err(RegistryError::Conflict(
                            "devices are being moved: wait for the destination's answer (or retry), then cancel".into(),
                        ));
                    }
                },
                Control::Retry
                    if task.entries.iter().any(|e| e.status == EntryStatus::Failed)
                        || status == DistributionStatus::Failed
                        || task.record.backoff_until.is_some() =>
                {
                    let id = task.record.id;
                    {
                        let mut members = lock(&self.distribution.members);
                        let failed = task.entries.iter().filter(|e| e.status == EntryStatus::Failed);
                        if let Some(e) = failed.clone().find(|e| members.get(&e.device).is_some_and(|t| *t != id)) {
                            return Err(RegistryError::Conflict(format!(
                                "device {} is in distribution task {} now",
                                e.device_name, members[&e.device]
                            )));
                        }
                        members.extend(failed.map(|e| (e.device, id)));
                    }
                    let homes = |d| self.registry.device_by_id(d).map(|d| d.state().home.clone()).unwrap_or_default();
                    changed = task.retry(homes, now);
                }
                _ => {
                    return Err(RegistryError::Conflict(format!(
                        "cannot {} a task that is {}",
                        action.as_str(),
                        serde_json::to_value(status)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    )));
                }
            }
            task.record.updated_at = now;
            let more = task.advance(now);
            changed.record |= more.record;
            self.task_changes(&task, &changed)
        };
        self.registry.writer().commit(ops).await?;
        self.distribution.run(cell);
        Ok(())
    }

    /// Where `/bootstrap` sends `device`, asking from `ip` on `family`. A device a "nearest" task
    /// still holds is placed by a `signed` request (an unsigned one only reads): it stays if this
    /// instance is nearest, else its move starts and it is told to ask again.
    pub fn bootstrap(&self, device: &Arc<Device>, ip: IpAddr, family: PortFamily, signed: bool) -> BootstrapAnswer {
        let home = device.state().home.clone();
        let target = match home {
            Home::Leaving(_) | Home::Released(_) | Home::Arriving => {
                return BootstrapAnswer::Later(self.registry.config.cluster.retry_after_s);
            }
            Home::Moved(i) => i,
            Home::Here => match signed.then(|| self.place_nearest(device, ip)).flatten() {
                Some(true) => return BootstrapAnswer::Later(self.registry.config.cluster.retry_after_s),
                _ => self.peers.name.clone(),
            },
        };
        match self.peers.endpoint(&target) {
            Some(e) => BootstrapAnswer::Go { host: e.host.clone(), port: e.port(family) },
            None => BootstrapAnswer::Unknown(target),
        }
    }

    /// Places a device a running "nearest" task waits for: `Some(true)` if it is to move.
    fn place_nearest(&self, device: &Arc<Device>, ip: IpAddr) -> Option<bool> {
        let id = *lock(&self.distribution.members).get(&device.id)?;
        let cell = self.distribution.task(id)?;
        let mut task = cell.lock();
        if task.record.policy != Policy::Nearest || task.record.status != DistributionStatus::InProgress {
            return None;
        }
        let i = task.index_of(device.id)?;
        match task.entries[i].status {
            EntryStatus::Pending => {}
            // Placed already, its move not yet begun.
            EntryStatus::Moving => return Some(true),
            _ => return None,
        }
        let nearest = self.peers.nearest(ip).clone();
        let now = UnixMs::now().0;
        let moving = !self.peers.is_self(&nearest);
        let status = if moving { EntryStatus::Moving } else { EntryStatus::Stayed };
        let mut changed = task.set(&[i], status, Some(&nearest), None, now);
        let more = task.advance(now);
        changed.record = more.record;
        self.registry.writer().record(task_ops(&task, &changed));
        if changed.record && !task.record.status.is_open() {
            self.distribution.release_members(&task);
        }
        drop(task);
        tracing::info!(device = %device.device_name, %ip, instance = %nearest, "nearest instance chosen at bootstrap");
        cell.wake.notify_one();
        Some(moving)
    }

    /// Starts handing `device` to `to`: from now on it is refused here (its sessions and observe
    /// relation end). `leaving` is [`Home::Leaving`] for a move, [`Home::Released`] for a device
    /// given back (which must not have been seen here). Returns what to store before telling the
    /// instance, and what to tell it; `None` if the device is gone, lives elsewhere or was seen.
    /// One already in that state is described again (a move resumed after a restart or an
    /// unknown outcome, a repeated release).
    pub fn begin_leaving(&self, device: &Arc<Device>, leaving: Home) -> Option<Leaving> {
        let release = matches!(leaving, Home::Released(_));
        let (s, resumed, mut ops) = self.registry.detach(device, |s| {
            if s.deleted {
                return None;
            }
            let resumed = match &s.home {
                Home::Here if !(release && s.last_seen.is_some()) => false,
                home if *home == leaving => true,
                _ => return None,
            };
            s.home = leaving;
            Some(resumed)
        })?;
        let transfer = DeviceTransfer {
            device_name: device.device_name.clone(),
            device_secret: device.secret.clone(),
            node_id: device.node_id.clone(),
            psk_hex: device.psk_hex.clone(),
            enabled: s.enabled,
            // Seen here, it may no longer register dynamically there either.
            registered: s.activated(),
            radio: s.radio.clone(),
            version: s.version.clone(),
            commands: self
                .commands
                .open(device.id, &s)
                .iter()
                .map(|c| CommandTransfer {
                    id: c.id,
                    payload_base64: STANDARD.encode(&c.payload),
                    topic: c.topic.clone(),
                    send_strategy: c.strategy,
                    created_at: c.created_at,
                    expires_at: c.expires_at,
                })
                .collect(),
            shadow: match crate::shadow::get(&self.store, device.id) {
                Ok(shadow) => (shadow.version() > 0).then_some(shadow),
                Err(e) => {
                    tracing::error!(device = %device.device_name, error = %e, "shadow unreadable; it stays behind");
                    None
                }
            },
        };
        ops.push(Op::PutDevice(device.clone()));
        Some(Leaving { ops, transfer, resumed })
    }

    /// The destination answered for a device leaving for `to`: taken (its open commands here end
    /// MOVED, each naming its new id: `sent` are the ids sent, in the order of the answer's),
    /// refused (it is served here again), or to be asked again (it stays leaving). What to
    /// store, and whether it moved.
    pub fn finish_leaving(
        &self,
        device: &Arc<Device>,
        to: &InstanceName,
        sent: &[CommandId],
        result: &ImportResult,
    ) -> (Vec<Op>, bool) {
        let mut s = device.state();
        if s.home != Home::Leaving(to.clone()) {
            return (Vec::new(), false);
        }
        let mut ops = Vec::new();
        match result.result {
            ImportOutcome::Imported | ImportOutcome::AlreadyHere => {
                s.home = Home::Moved(to.clone());
                let new_ids: HashMap<CommandId, CommandId> =
                    sent.iter().copied().zip(result.commands.iter().copied()).collect();
                ops.extend(self.commands.end_moved(device.id, &s, |id| match new_ids.get(&id) {
                    Some(new) => format!("moved with its device to instance {to} as command {new}"),
                    None => format!("moved with its device to instance {to}"),
                }));
                ops.push(crate::shadow::delete(device.id));
            }
            ImportOutcome::Refused => s.home = Home::Here,
            ImportOutcome::Retry => return (ops, false),
        }
        ops.push(Op::PutDevice(device.clone()));
        (ops, s.home.elsewhere().is_some())
    }

    /// A hand-over (`leaving`, as begun) that certainly reached nobody: the device is served
    /// here again.
    pub fn abort_leaving(&self, device: &Arc<Device>, leaving: &Home) -> Vec<Op> {
        let mut s = device.state();
        if s.home != *leaving {
            return Vec::new();
        }
        s.home = Home::Here;
        vec![Op::PutDevice(device.clone())]
    }

    /// Takes a product and devices another instance sends (`POST /api/v1/distribution/imports`).
    /// Each device is stored with its commands in one write and served only once that is durable.
    /// One already here with the same secret is answered "already here" (a repeated request;
    /// commands it lacks are added); one that left for `source` earlier comes home; any other
    /// (leaving, or living at a third instance) is refused.
    pub async fn import(&self, store: &Store, req: ImportRequest) -> Result<Vec<ImportResult>, RegistryError> {
        let product = self.adopt_product(&req.product).await?;
        let mut results = Vec::with_capacity(req.devices.len());
        for d in req.devices {
            results.push(self.adopt_device(store, &product, &req.source, d).await);
        }
        Ok(results)
    }

    async fn adopt_product(&self, p: &ProductTransfer) -> Result<Arc<ProductRecord>, RegistryError> {
        if let Some(existing) = self.registry.product(p.product_key.as_str()) {
            if existing.product_secret != p.product_secret {
                return Err(RegistryError::Conflict(format!(
                    "product {} exists here with another ProductSecret",
                    p.product_key
                )));
            }
            return Ok(existing);
        }
        let created = self
            .registry
            .create_product(crate::registry::NewProduct {
                name: p.name.clone(),
                product_key: Some(p.product_key.clone()),
                product_secret: Some(p.product_secret.clone()),
                dynamic_registration: p.dynamic_registration,
                ota_protocol: p.ota_protocol,
                awake_window_s: p.awake_window_s,
                ack_timeout_ms: p.ack_timeout_ms,
                max_retransmit: p.max_retransmit,
                unsigned_bootstrap: p.unsigned_bootstrap,
            })
            .await;
        match created {
            // Two imports of a new product at once: the other one created it.
            Err(RegistryError::Conflict(_)) => self
                .registry
                .product(p.product_key.as_str())
                .ok_or_else(|| RegistryError::Conflict(format!("product {} is being created", p.product_key))),
            other => other,
        }
    }

    async fn adopt_device(
        &self,
        store: &Store,
        product: &ProductRecord,
        source: &InstanceName,
        d: DeviceTransfer,
    ) -> ImportResult {
        let answer = |result: ImportOutcome, error: Option<String>, commands: Vec<CommandId>| ImportResult {
            device_name: d.device_name.clone(),
            result,
            error,
            commands,
        };
        let existing = self.registry.device(product.product_key.as_str(), d.device_name.as_str());
        if let Some(e) = &existing {
            if e.secret != d.device_secret {
                let error = format!("device {} exists here with another DeviceSecret", d.device_name);
                return answer(ImportOutcome::Refused, Some(error), Vec::new());
            }
            let home = e.state().home.clone();
            match home {
                Home::Here => return self.add_commands(store, e, source, &d.commands).await,
                Home::Arriving => {
                    return answer(ImportOutcome::Retry, Some("an earlier import is being stored".into()), Vec::new());
                }
                Home::Moved(ref i) if i == source => {}
                // Two moves crossing (each side's outcome unknown to it): one side must give
                // way, the same one whichever request arrives first. The greater name takes it.
                Home::Leaving(ref i) if i == source && self.peers.name > *source => {}
                Home::Leaving(ref i) if i == source => {
                    let error = format!("device {} is being moved to {source}; ask again", d.device_name);
                    return answer(ImportOutcome::Retry, Some(error), Vec::new());
                }
                Home::Leaving(i) | Home::Moved(i) | Home::Released(i) => {
                    let error = format!("device {} lives at or leaves for instance {i}", d.device_name);
                    return answer(ImportOutcome::Refused, Some(error), Vec::new());
                }
            }
        }
        if let Some(n) = &d.node_id
            && let Some(other) = self.registry.device_by_node(n.as_str())
            && existing.as_ref().is_none_or(|e| e.id != other.id)
        {
            let error = format!("node id {n} is used by device {} here", other.device_name);
            return answer(ImportOutcome::Refused, Some(error), Vec::new());
        }
        let created = existing.is_none();
        let device = match existing {
            Some(e) => e,
            None => {
                let record = DeviceRecord {
                    id: self.registry.new_device_id(),
                    product_key: product.product_key.clone(),
                    device_name: d.device_name.clone(),
                    device_secret: d.device_secret.clone(),
                    node_id: d.node_id.clone(),
                    psk_hex: d.psk_hex.clone(),
                    enabled: d.enabled,
                    registered: d.registered,
                    radio: d.radio.clone(),
                    created_at: UnixMs::now().0,
                    observe: None,
                    version: d.version.clone(),
                    home: Home::Arriving,
                    registration: None,
                    firmware_observe: None,
                };
                let device = Arc::new(Device::from_record(record, None, None));
                if self.registry.insert(&device).is_err() {
                    return answer(ImportOutcome::Retry, Some("the device is being created here".into()), Vec::new());
                }
                device
            }
        };
        let now = UnixMs::now();
        let (ops, ids, previous) = {
            let mut s = device.state();
            let previous = (
                std::mem::replace(&mut s.home, Home::Arriving),
                s.enabled,
                s.registered,
                s.radio.clone(),
                s.version.clone(),
            );
            (s.enabled, s.radio, s.version) = (d.enabled, d.radio.clone(), d.version.clone());
            s.registered |= d.registered;
            // Contact here, if any, was before it left: the grayscale gate and rollback ask
            // whether it came online since it arrived.
            (s.last_seen, s.address) = (None, None);
            let mut stored = device.record_with(&s);
            stored.home = Home::Here;
            let mut ops = vec![Op::PutDevice(Arc::new(stored)), Op::ForgetPresence(device.id)];
            let ids = self.queue_moved(&device, &s, source, &d.commands, now, &mut ops);
            ops.extend(d.shadow.as_ref().map(|shadow| crate::shadow::put(device.id, shadow)));
            (ops, ids, previous)
        };
        if let Err(e) = self.registry.writer().commit(ops).await {
            let mut s = device.state();
            self.commands.unadopt(device.id, &s, &ids);
            (s.home, s.enabled, s.registered, s.radio, s.version) = previous;
            drop(s);
            if created {
                self.registry.forget(&device);
            }
            return answer(ImportOutcome::Refused, Some(format!("storage error: {e}")), Vec::new());
        }
        device.state().home = Home::Here;
        self.registry.export_gauges();
        tracing::info!(product_key = %device.product_key, device_name = %device.device_name, %source, commands = ids.len(), "device imported");
        answer(ImportOutcome::Imported, None, ids)
    }

    /// Queues commands that moved from `source` (past the queue limit too: they were accepted
    /// where they were created); their records go into `ops`. Returns their ids here.
    fn queue_moved(
        &self,
        device: &Device,
        s: &crate::registry::DeviceState,
        source: &InstanceName,
        commands: &[CommandTransfer],
        now: UnixMs,
        ops: &mut Vec<Op>,
    ) -> Vec<CommandId> {
        let records: Vec<CommandRecord> = commands
            .iter()
            .map(|c| CommandRecord {
                origin: Some(origin(source, c.id)),
                ..CommandRecord::pending(
                    self.commands.new_id(),
                    device.key(),
                    NewRecord {
                        payload: STANDARD.decode(&c.payload_base64).unwrap_or_default(),
                        topic: c.topic.clone(),
                        strategy: c.send_strategy,
                        created_at: c.created_at,
                        expires_at: c.expires_at,
                    },
                )
            })
            .collect();
        let ids = records.iter().map(|r| r.id).collect();
        ops.extend(self.commands.adopt(device.id, s, records, now));
        ids
    }

    /// A repeated import of a device already here: the commands it lacks are queued; the answer
    /// names every command's id here.
    async fn add_commands(
        &self,
        store: &Store,
        device: &Arc<Device>,
        source: &InstanceName,
        commands: &[CommandTransfer],
    ) -> ImportResult {
        let retry = |error: String| ImportResult {
            device_name: device.device_name.clone(),
            result: ImportOutcome::Retry,
            error: Some(error),
            commands: Vec::new(),
        };
        let mut known: HashMap<String, CommandId> = match crate::downlink::stored::of(store, device.id) {
            Ok(all) => all.into_iter().filter_map(|c| Some((c.origin?, c.id))).collect(),
            Err(e) => return retry(format!("storage error: {e}")),
        };
        let now = UnixMs::now();
        let mut ops = Vec::new();
        let added = {
            // Under the device's lock, with what is queued but not yet stored: two imports at
            // once cannot both find a command missing.
            let s = device.state();
            known.extend(self.commands.open(device.id, &s).into_iter().filter_map(|c| Some((c.origin?, c.id))));
            let missing: Vec<CommandTransfer> =
                commands.iter().filter(|c| !known.contains_key(&origin(source, c.id))).cloned().collect();
            self.queue_moved(device, &s, source, &missing, now, &mut ops)
        };
        if !ops.is_empty()
            && let Err(e) = self.registry.writer().commit(ops).await
        {
            let s = device.state();
            self.commands.unadopt(device.id, &s, &added);
            return retry(format!("storage error: {e}"));
        }
        let mut added = added.into_iter();
        let ids = commands
            .iter()
            .filter_map(|c| known.get(&origin(source, c.id)).copied().or_else(|| added.next()))
            .collect();
        ImportResult {
            device_name: device.device_name.clone(),
            result: ImportOutcome::AlreadyHere,
            error: None,
            commands: ids,
        }
    }

    /// Gives back devices that never connected here (`POST /api/v1/distribution/releases`, a
    /// rollback by the instance they came from), in two steps so that a lost answer loses
    /// nothing: first they stop being served here (durably) and are described, with their open
    /// commands; once the sender stored them it confirms, and they are removed here.
    pub async fn release(&self, store: &Store, req: ReleaseRequest) -> Result<Vec<ReleaseResult>, RegistryError> {
        let mut results = Vec::with_capacity(req.device_names.len());
        let mut ops = Vec::new();
        for name in req.device_names {
            let device = self.registry.device(req.product_key.as_str(), name.as_str());
            let result = |result, device| ReleaseResult { device_name: name.clone(), result, device };
            let Some(device) = device else {
                results.push(result(ReleaseOutcome::NotFound, None));
                continue;
            };
            let home = device.state().home.clone();
            let released = Home::Released(req.source.clone());
            if req.confirm {
                if home != released {
                    results.push(result(ReleaseOutcome::NotFound, None));
                    continue;
                }
                let held = (self.commands.deleting(store, device.id)?, &*self.campaign);
                self.registry.delete_device(&device, &held).await?;
                tracing::info!(product_key = %req.product_key, device_name = %name, to = %req.source, "device released");
                results.push(result(ReleaseOutcome::Released, None));
                continue;
            }
            match self.begin_leaving(&device, released) {
                Some(leaving) => {
                    ops.extend(leaving.ops);
                    results.push(result(ReleaseOutcome::Released, Some(leaving.transfer)));
                }
                None if home.is_here() => results.push(result(ReleaseOutcome::Seen, None)),
                None => results.push(result(ReleaseOutcome::NotFound, None)),
            }
        }
        if let Err(e) = self.registry.writer().commit(ops).await {
            // Nothing was promised: they are served here again.
            let released = Home::Released(req.source.clone());
            for r in results.iter().filter(|r| r.device.is_some()) {
                if let Some(d) = self.registry.device(req.product_key.as_str(), r.device_name.as_str()) {
                    let _ = self.abort_leaving(&d, &released);
                }
            }
            return Err(e.into());
        }
        Ok(results)
    }
}

/// How a moved command names where it came from.
fn origin(source: &InstanceName, id: CommandId) -> String {
    format!("{source}/{id}")
}

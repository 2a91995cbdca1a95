//! The command service (SPEC §5): every device's queue of open commands, the timers that end
//! them, and the rules that create, hand out, settle, cancel, expire and move them. Devices
//! without open commands have no queue here.
//!
//! Lock order: the device's state (the directory's lock), then the shard holding its queue. A
//! change that nothing waits for is queued for the store while both are held, so a command's
//! states are stored in the order they happened; one an answer waits for (SENT before a `/pull`
//! answer leaves) is returned, to be made durable before the answer goes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    Answered, CancelError, CommandId, CommandRecord, CommandStatus, JsonCommand, NewRecord, Queue, QueueFull,
    SendStrategy, Settlement, stored,
};
use crate::clock::UnixMs;
use crate::coap::resource::{ExchangeKey, Retransmit};
use crate::codec::command::{Answer, AnswerTo, id_of_mid};
use crate::codec::decoders::Proposed;
use crate::config::DownlinkConfig;
use crate::identity::DeviceId;
use crate::registry::{Device, DeviceState, Held, Registry, Route};
use crate::store::records::ProductRecord;
use crate::store::{Op, Store, StoreError};
use crate::sync::{Sharded, lock};

pub struct NewCommand {
    /// From [`Commands::new_id`]: a JSON command is encoded with its id before it is created.
    pub id: CommandId,
    pub payload: Vec<u8>,
    pub json: Option<JsonCommand>,
    pub strategy: SendStrategy,
    /// Seconds; the configured default when absent.
    pub expire_s: Option<u64>,
    /// Alibaba topic; the configured default when absent.
    pub topic: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Full(#[from] QueueFull),
    #[error(transparent)]
    NotPending(#[from] CancelError),
    #[error("device {0} lives at instance {1} now: send its commands there")]
    Elsewhere(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// When each device's queue next needs a look (a PENDING command's expiry, or the deadline of a
/// SENT one restored after a restart). Entries may be stale; a look costs one lock.
#[derive(Default)]
struct Timers {
    heap: Mutex<BinaryHeap<Reverse<(u64, DeviceId)>>>,
}

impl Timers {
    fn schedule(&self, at_ms: u64, device: DeviceId) {
        lock(&self.heap).push(Reverse((at_ms, device)));
    }

    fn due(&self, now: UnixMs) -> Vec<DeviceId> {
        let mut heap = lock(&self.heap);
        let mut due = Vec::new();
        while let Some(Reverse((at, device))) = heap.peek().copied() {
            if at > now.0 {
                break;
            }
            heap.pop();
            due.push(device);
        }
        due.sort_unstable();
        due.dedup();
        due
    }
}

/// When an open command must be looked at again.
fn deadline(c: &CommandRecord, cfg: &DownlinkConfig) -> u64 {
    match c.status {
        CommandStatus::Sent => c.sent_at.unwrap_or(0).saturating_add(cfg.timeout_ms()),
        _ => c.expires_at,
    }
}

/// How CONs to this product's devices are retransmitted.
pub fn retransmit(cfg: &DownlinkConfig, product: Option<&ProductRecord>) -> Retransmit {
    let ack_ms = product.and_then(|p| p.ack_timeout_ms).unwrap_or(cfg.ack_timeout_ms);
    let max_retransmit = product.and_then(|p| p.max_retransmit).unwrap_or(cfg.max_retransmit);
    Retransmit {
        ack_timeout: Duration::from_millis(ack_ms),
        max_retransmit,
        give_up_after: Duration::from_secs(cfg.timeout_s),
    }
}

pub struct Commands {
    registry: Arc<Registry>,
    queues: Sharded<DeviceId, Queue>,
    timers: Timers,
    next_id: AtomicU64,
}

impl Commands {
    /// No commands yet.
    pub fn new(registry: Arc<Registry>) -> Commands {
        Commands { queues: Sharded::new(64), timers: Timers::default(), next_id: AtomicU64::new(1), registry }
    }

    /// The open commands from the store, each back in its device's queue.
    pub fn load(registry: Arc<Registry>, store: &Store) -> Result<Commands, StoreError> {
        let commands = Commands::new(registry);
        let mut next_id = stored::next_id(store)?;
        let mut open = 0;
        for c in stored::open(store)? {
            next_id = next_id.max(c.id.0 + 1);
            if commands.registry.device_by_id(c.device).is_none() {
                continue;
            }
            commands.timers.schedule(deadline(&c, &commands.registry.config.downlink), c.device);
            commands.queues.shard(&c.device).entry(c.device).or_default().restore(c);
            open += 1;
        }
        commands.next_id.store(next_id, Ordering::Relaxed);
        if open > 0 {
            tracing::info!(commands = open, "restored open commands");
        }
        Ok(commands)
    }

    fn config(&self) -> &DownlinkConfig {
        &self.registry.config.downlink
    }

    pub fn new_id(&self) -> CommandId {
        CommandId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs `f` on `device`'s queue, the device's state locked by the caller; a queue left empty
    /// is dropped.
    fn with_queue<R>(&self, device: DeviceId, _locked: &DeviceState, f: impl FnOnce(&mut Queue) -> R) -> R {
        self.queues.update(device, |q| !q.is_empty(), f)
    }

    /// Whether `device` (its state locked by the caller) has open commands.
    pub fn any(&self, device: DeviceId, _locked: &DeviceState) -> bool {
        self.queues.shard(&device).contains_key(&device)
    }

    /// What storing a created or changed command writes (its event included, when wanted).
    pub fn writes(&self, c: &CommandRecord) -> Vec<Op> {
        stored::put_command(c, self.registry.wanted())
    }

    /// Queues the records of commands that changed; call it holding their device's lock.
    fn record(&self, changed: Vec<CommandRecord>) {
        if !changed.is_empty() {
            self.registry.writer().record(changed.iter().flat_map(|c| self.writes(c)));
        }
    }

    /// Queues a command (durably) and, when the device is awake, tells the socket that serves it.
    /// An `immediately` command for a sleeping device is stored FAILED at once.
    pub async fn create(&self, device: &Arc<Device>, new: NewCommand) -> Result<CommandRecord, CommandError> {
        let now = UnixMs::now();
        let (record, kick, commit) = self.enqueue(device, new, now, |ops| self.registry.writer().commit(ops))?;
        if let Err(e) = commit.await {
            // Not stored, so not queued either.
            let s = device.state();
            let _ = self.with_queue(device.id, &s, |q| q.cancel(record.id, now.0));
            return Err(e.into());
        }
        self.queued(device, &record, kick);
        Ok(record)
    }

    /// Like [`Commands::create`] for a command the server makes itself (a shadow's delta):
    /// queued with its writes, nobody waiting for them.
    pub fn create_detached(&self, device: &Arc<Device>, new: NewCommand) -> Result<CommandRecord, CommandError> {
        let now = UnixMs::now();
        let (record, kick, ()) = self.enqueue(device, new, now, |ops| self.registry.writer().record(ops))?;
        self.queued(device, &record, kick);
        Ok(record)
    }

    /// The rules of a new command: it goes into `device`'s queue (unless it fails at once) and
    /// `write` queues its writes, under the device's lock. The route to kick if it is awake.
    fn enqueue<T>(
        &self,
        device: &Arc<Device>,
        new: NewCommand,
        now: UnixMs,
        write: impl FnOnce(Vec<Op>) -> T,
    ) -> Result<(CommandRecord, Option<Route>, T), CommandError> {
        let cfg = self.config();
        let product = self
            .registry
            .product(device.product_key.as_str())
            .ok_or_else(|| CommandError::NotFound(format!("product {}", device.product_key)))?;
        let topic = new.topic.unwrap_or_else(|| {
            cfg.default_topic.replace("{pk}", device.product_key.as_str()).replace("{dn}", device.device_name.as_str())
        });
        let mut record = CommandRecord::pending(
            new.id,
            device.key(),
            NewRecord {
                payload: new.payload,
                topic,
                strategy: new.strategy,
                created_at: now.0,
                expires_at: now.plus_secs(new.expire_s.unwrap_or(cfg.default_expire_s)).0,
            },
        );
        record.json = new.json;
        let s = device.state();
        if s.deleted {
            return Err(CommandError::NotFound(format!("device {}/{}", device.product_key, device.device_name)));
        }
        if !s.home.is_here() {
            let home = s.home.elsewhere().map_or_else(|| "(arriving here)".to_string(), ToString::to_string);
            return Err(CommandError::Elsewhere(device.device_name.to_string(), home));
        }
        let awake = s.awake(now, product.awake_window_s);
        let queued = match (new.strategy, awake) {
            (SendStrategy::Immediately, false) => {
                record.set(CommandStatus::Failed, now.0);
                record.reason = Some("the device is asleep: nothing heard within its awake window".into());
                false
            }
            (SendStrategy::Immediately, true) => {
                // Only while the device is still listening.
                if !s.always_listening() {
                    let window_end = s.last_seen.map_or(now, |t| t.plus_secs(product.awake_window_s as u64));
                    record.expires_at = record.expires_at.min(window_end.0);
                }
                true
            }
            (SendStrategy::Delay, _) => true,
        };
        if queued && let Err(full) = self.with_queue(device.id, &s, |q| q.push(record.clone(), cfg.max_pending)) {
            metrics::counter!(crate::telemetry::metric::COMMANDS_REFUSED).increment(1);
            return Err(full.into());
        }
        let written = write(self.writes(&record));
        Ok((record, (queued && awake).then_some(s.route).flatten(), written))
    }

    /// A stored new command's timer, and the socket told when its device is awake.
    fn queued(&self, device: &Device, record: &CommandRecord, kick: Option<Route>) {
        if record.status == CommandStatus::Pending {
            self.timers.schedule(record.expires_at, device.id);
        }
        if let Some(route) = kick {
            self.registry.routes.kick(route, device.id);
        }
    }

    /// An open command of `device` as it is now.
    fn live(&self, device: &Device, id: CommandId) -> Option<CommandRecord> {
        let s = device.state();
        self.queues.shard(&device.id).get(&device.id).and_then(|q| q.get(id).cloned()).filter(|_| !s.deleted)
    }

    /// A command by id: the live version while it is open, else the stored one.
    pub fn get(&self, store: &Store, id: CommandId) -> Result<Option<CommandRecord>, StoreError> {
        let Some(stored) = stored::get(store, id)? else { return Ok(None) };
        let live = self.registry.device_by_id(stored.device).and_then(|d| self.live(&d, id));
        Ok(Some(live.unwrap_or(stored)))
    }

    /// A device's commands, oldest first, open ones in their live version (and those whose
    /// creation is still on its way to the store: one the shadow proposed, say).
    pub fn of(&self, store: &Store, device: &Device) -> Result<Vec<CommandRecord>, StoreError> {
        let mut all = stored::of(store, device.id)?;
        let _s = device.state();
        if let Some(q) = self.queues.shard(&device.id).get(&device.id) {
            for c in &mut all {
                if let Some(live) = q.get(c.id) {
                    *c = live.clone();
                }
            }
            let unstored: Vec<CommandRecord> =
                q.records().filter(|live| all.binary_search_by_key(&live.id, |c| c.id).is_err()).cloned().collect();
            if !unstored.is_empty() {
                all.extend(unstored);
                all.sort_by_key(|c| c.id);
            }
        }
        Ok(all)
    }

    /// Cancels a PENDING command.
    pub async fn cancel(&self, store: &Store, id: CommandId) -> Result<CommandRecord, CommandError> {
        let not_found = || CommandError::NotFound(format!("command {id}"));
        let stored = stored::get(store, id)?.ok_or_else(not_found)?;
        let device = self.registry.device_by_id(stored.device).ok_or_else(not_found)?;
        let (commit, record) = {
            let s = device.state();
            // Its queue travels with it: a cancel here could not reach the copy there.
            if !s.home.is_here() {
                let home = s.home.elsewhere().map_or_else(|| "(arriving here)".to_string(), ToString::to_string);
                return Err(CommandError::Elsewhere(device.device_name.to_string(), home));
            }
            let record = match self.with_queue(device.id, &s, |q| q.cancel(id, UnixMs::now().0)) {
                Ok(r) => r,
                // Not open any more: report its state as stored.
                Err(CancelError::NotFound(_)) => {
                    return Err(CancelError::NotPending(id, stored.status.as_str()).into());
                }
                Err(e) => return Err(e.into()),
            };
            (self.registry.writer().commit(self.writes(&record)), record)
        };
        if let Err(e) = commit.await {
            // Still PENDING in the store, so still queued.
            let mut record = record;
            record.status = CommandStatus::Pending;
            record.finished_at = None;
            let s = device.state();
            self.with_queue(device.id, &s, |q| q.reinstate(record));
            return Err(e.into());
        }
        Ok(record)
    }

    /// Ends commands whose time has come; returns how many ended.
    pub fn expire(&self, now: UnixMs) -> usize {
        let mut ended = 0;
        for id in self.timers.due(now) {
            let Some(device) = self.registry.device_by_id(id) else { continue };
            let s = device.state();
            let mut changed = Vec::new();
            let next = self.with_queue(id, &s, |q| {
                q.expire(now.0, self.config().timeout_ms(), &mut changed);
                q.next_expiry()
            });
            ended += changed.len();
            self.record(changed);
            if let Some(next) = next {
                self.timers.schedule(next, id);
            }
        }
        ended
    }

    /// The next command to send to `device` (its state locked by the caller) under `exchange`,
    /// unless one is in flight; it is SENT from now on.
    pub fn send_next(
        &self,
        device: DeviceId,
        s: &DeviceState,
        now: UnixMs,
        exchange: ExchangeKey,
    ) -> Option<CommandRecord> {
        let mut changed = Vec::new();
        let timeout = self.config().timeout_ms();
        let command = self.with_queue(device, s, |q| q.send_next(now.0, exchange, timeout, &mut changed));
        self.record(changed);
        command
    }

    /// Up to `count` commands fitting `max_bytes`, for one `/pull` answer under `exchange`
    /// (`device`'s state locked by the caller), and the writes making them SENT, to be durable
    /// before the answer leaves.
    pub fn pull(
        &self,
        device: DeviceId,
        s: &DeviceState,
        now: UnixMs,
        count: usize,
        exchange: ExchangeKey,
    ) -> (Vec<CommandRecord>, Vec<Op>) {
        let (max_bytes, timeout) = (self.registry.config.coap.max_payload, self.config().timeout_ms());
        let mut changed = Vec::new();
        let commands = self.with_queue(device, s, |q| q.pull(now.0, count, max_bytes, exchange, timeout, &mut changed));
        (commands, changed.iter().flat_map(|c| self.writes(c)).collect())
    }

    /// How the exchange carrying `device`'s commands ended.
    pub fn settle(&self, device: &Device, exchange: ExchangeKey, settlement: &Settlement, now: UnixMs) {
        let s = device.state();
        let changed = self.with_queue(device.id, &s, |q| q.settle(exchange, settlement, now.0));
        self.record(changed);
    }

    /// The exchange carrying `device`'s commands never went out: they are PENDING again.
    pub fn unsend(&self, device: &Device, exchange: ExchangeKey) {
        let s = device.state();
        self.with_queue(device.id, &s, |q| q.unsend(exchange));
    }

    /// `device`'s open commands (its state locked by the caller), oldest first.
    pub fn open(&self, device: DeviceId, _locked: &DeviceState) -> Vec<CommandRecord> {
        self.queues.shard(&device).get(&device).map(|q| q.records().cloned().collect()).unwrap_or_default()
    }

    /// Ends `device`'s open commands MOVED (its state locked by the caller): `reason` says where
    /// each went. Returns the writes.
    pub fn end_moved(&self, device: DeviceId, s: &DeviceState, reason: impl Fn(CommandId) -> String) -> Vec<Op> {
        let now = UnixMs::now().0;
        let open: Vec<CommandRecord> = self.with_queue(device, s, |q| q.drain().collect());
        let mut ops = Vec::new();
        for mut c in open {
            c.set(CommandStatus::Moved, now);
            c.reason = Some(reason(c.id));
            ops.extend(self.writes(&c));
        }
        ops
    }

    /// Queues commands that arrived with `device` (its state locked by the caller; past the queue
    /// limit too: they were accepted where they were created); returns the writes storing them.
    pub fn adopt(&self, device: DeviceId, s: &DeviceState, records: Vec<CommandRecord>, now: UnixMs) -> Vec<Op> {
        let mut ops = Vec::new();
        for record in records {
            self.timers.schedule(record.expires_at.max(now.0), device);
            ops.extend(self.writes(&record));
            self.with_queue(device, s, |q| q.restore(record));
        }
        ops
    }

    /// Takes back commands [`Commands::adopt`] queued whose storing failed.
    pub fn unadopt(&self, device: DeviceId, s: &DeviceState, ids: &[CommandId]) {
        let now = UnixMs::now().0;
        self.with_queue(device, s, |q| {
            for id in ids {
                let _ = q.cancel(*id, now);
            }
        });
    }
}

impl Commands {
    /// What deleting `device` takes from the command service: its queue, and its stored
    /// commands, whose ids are read from `store` now.
    pub fn deleting(&self, store: &Store, device: DeviceId) -> Result<Deleting<'_>, StoreError> {
        let stored = stored::of(store, device)?.into_iter().map(|c| c.id).collect();
        Ok(Deleting { commands: self, stored })
    }
}

/// A device's commands as it is deleted: its queue goes with it, and its stored commands with
/// its record.
pub struct Deleting<'a> {
    commands: &'a Commands,
    stored: Vec<CommandId>,
}

impl Held for Deleting<'_> {
    type Taken = Vec<CommandRecord>;

    fn take(&self, device: &Device, s: &DeviceState) -> (Vec<CommandRecord>, Vec<Op>) {
        let open: Vec<CommandRecord> = self.commands.with_queue(device.id, s, |q| q.drain().collect());
        let mut ids = self.stored.clone();
        ids.extend(open.iter().map(|c| c.id));
        ids.sort_unstable();
        ids.dedup();
        (open, stored::delete_commands(device.id, &ids))
    }

    fn put_back(&self, device: &Device, s: &DeviceState, open: Vec<CommandRecord>) {
        self.commands.with_queue(device.id, s, |q| {
            for c in open {
                q.restore(c);
            }
        });
    }
}

impl crate::codec::decoders::Downlink for Commands {
    /// Settles the JSON command `device` answered in an uplink (its codec read `answer` from
    /// `raw` as `decoded`): a command of that device, given as JSON, sent and not yet ended.
    /// Anything else (an unknown id, an answer repeated after a restart) changes nothing.
    fn answered(&self, store: &Store, device: DeviceId, answer: &Answer, raw: &[u8], decoded: &serde_json::Value) {
        let id = match answer.to {
            AnswerTo::Id(id) => Some(id),
            AnswerTo::Mid(mid) => id_of_mid(mid, self.next_id.load(Ordering::Relaxed).saturating_sub(1)),
        };
        let Some(id) = id.map(CommandId) else { return };
        let Some(device) = self.registry.device_by_id(device) else { return };
        let stored = match stored::get(store, id) {
            Ok(Some(c)) if c.device == device.id && c.json.is_some() => c,
            Ok(_) => {
                tracing::debug!(device = %device.device_name, command = %id, "an answer to no JSON command of the device");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, command = %id, "cannot read an answered command");
                return;
            }
        };
        let s = device.state();
        // Answered before its ACK was heard, it is still in the queue; after, it is DELIVERED.
        let live = self.with_queue(device.id, &s, |q| q.get(id).is_some().then(|| q.take_sent(id)));
        let mut record = match live {
            Some(Some(sent)) => sent,
            // Still PENDING: not what the device answered.
            Some(None) => return,
            None if matches!(stored.status, CommandStatus::Sent | CommandStatus::Delivered) => stored,
            None => return,
        };
        let answered = Answered { code: answer.code, ok: answer.ok, raw, decoded: decoded.clone() };
        record.answered(answered, UnixMs::now().0);
        self.record(vec![record]);
    }

    /// Server-made commands (a shadow's delta) wait their turn in the device's queue like any
    /// other; they live as long as the configured default.
    fn propose(&self, device: DeviceId, topic: &str, encode: &mut dyn FnMut(&dyn Fn() -> u64) -> Vec<Proposed>) {
        let Some(device) = self.registry.device_by_id(device) else { return };
        if self.open(device.id, &device.state()).iter().any(|c| c.topic == topic) {
            return;
        }
        for p in encode(&|| self.new_id().0) {
            let new = NewCommand {
                id: CommandId(p.id),
                payload: p.payload,
                json: Some(JsonCommand { codec_version: p.codec_version, message: p.message, answer: None }),
                strategy: SendStrategy::Delay,
                expire_s: None,
                topic: Some(topic.to_string()),
            };
            match self.create_detached(&device, new) {
                Ok(c) => {
                    tracing::debug!(device = %device.device_name, command = %c.id, "shadow delta queued as a command")
                }
                Err(e) => {
                    tracing::warn!(device = %device.device_name, error = %e, "shadow delta not queued");
                    return;
                }
            }
        }
    }
}

//! Commands as the registry keeps them: created and canceled by the admin API, ended by expiry,
//! handed to the dialects for delivery. Every change is queued for the store while the device's
//! lock is held, so a command's states are stored in the order they happened.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Device, Registry};
use crate::clock::UnixMs;
use crate::coap::resource::Retransmit;
use crate::config::DownlinkConfig;
use crate::downlink::{CancelError, CommandId, CommandRecord, CommandStatus, QueueFull, SendStrategy, stored};
use crate::identity::DeviceId;
use crate::store::records::ProductRecord;
use crate::store::{Op, StoreError};
use crate::sync::lock;

pub struct NewCommand {
    pub payload: Vec<u8>,
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
pub struct CommandTimers {
    heap: Mutex<BinaryHeap<Reverse<(u64, DeviceId)>>>,
}

impl CommandTimers {
    pub fn schedule(&self, at_ms: u64, device: DeviceId) {
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
pub fn deadline(c: &CommandRecord, cfg: &DownlinkConfig) -> u64 {
    match c.status {
        CommandStatus::Sent => c.sent_at.unwrap_or(0).saturating_add(cfg.timeout_ms()),
        _ => c.expires_at,
    }
}

impl Registry {
    /// Queues the records of commands that changed; call it holding their device's lock, so
    /// changes are stored in the order they happened.
    pub fn record_commands(&self, changed: Vec<CommandRecord>) {
        if !changed.is_empty() {
            self.writer.record(changed.iter().flat_map(|c| self.command_writes(c)));
        }
    }

    /// What storing a created or changed command writes (its event included, when wanted).
    pub fn command_writes(&self, c: &CommandRecord) -> Vec<Op> {
        stored::put_command(c, &self.wanted)
    }

    /// How CONs to this product's devices are retransmitted.
    pub fn downlink_timers(&self, product: Option<&ProductRecord>) -> Retransmit {
        let d = &self.config.downlink;
        let ack_ms = product.and_then(|p| p.ack_timeout_ms).unwrap_or(d.ack_timeout_ms);
        let max_retransmit = product.and_then(|p| p.max_retransmit).unwrap_or(d.max_retransmit);
        Retransmit {
            ack_timeout: Duration::from_millis(ack_ms),
            max_retransmit,
            give_up_after: Duration::from_secs(d.timeout_s),
        }
    }

    /// Queues a command (durably) and, when the device is awake, tells the socket that serves it.
    /// An `immediately` command for a sleeping device is stored FAILED at once.
    pub async fn create_command(&self, device: &Arc<Device>, new: NewCommand) -> Result<CommandRecord, CommandError> {
        let cfg = &self.config.downlink;
        let product = self
            .product(device.product_key.as_str())
            .ok_or_else(|| CommandError::NotFound(format!("product {}", device.product_key)))?;
        let now = UnixMs::now();
        let topic = new.topic.unwrap_or_else(|| {
            cfg.default_topic.replace("{pk}", device.product_key.as_str()).replace("{dn}", device.device_name.as_str())
        });
        let mut record = CommandRecord {
            id: self.new_command_id(),
            device: device.id,
            product_key: device.product_key.clone(),
            device_name: device.device_name.clone(),
            payload: new.payload,
            topic,
            strategy: new.strategy,
            status: CommandStatus::Pending,
            created_at: now.0,
            expires_at: now.plus_secs(new.expire_s.unwrap_or(cfg.default_expire_s)).0,
            sent_at: None,
            delivered_at: None,
            finished_at: None,
            result: None,
            reason: None,
            origin: None,
        };
        let (commit, kick) = {
            let mut s = device.state();
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
                    let window_end = s.last_seen.map_or(now, |t| t.plus_secs(product.awake_window_s as u64));
                    record.expires_at = record.expires_at.min(window_end.0);
                    true
                }
                (SendStrategy::Delay, _) => true,
            };
            if queued && let Err(full) = s.commands.push(record.clone(), cfg.max_pending) {
                metrics::counter!(crate::telemetry::metric::COMMANDS_REFUSED).increment(1);
                return Err(full.into());
            }
            (self.writer.commit(self.command_writes(&record)), (queued && awake).then_some(s.route).flatten())
        };
        if let Err(e) = commit.await {
            // Not stored, so not queued either.
            let _ = device.state().commands.cancel(record.id, now.0);
            return Err(e.into());
        }
        if record.status == CommandStatus::Pending {
            self.command_timers.schedule(record.expires_at, device.id);
        }
        if let Some(route) = kick {
            self.routes.kick(route, device.id);
        }
        Ok(record)
    }

    /// A command by id: the live version while it is open, else the stored one.
    pub fn command(&self, id: CommandId) -> Result<Option<CommandRecord>, StoreError> {
        let Some(stored) = stored::get(&self.store, id)? else { return Ok(None) };
        let live = self.device_by_id(stored.device).and_then(|d| d.state().commands.get(id).cloned());
        Ok(Some(live.unwrap_or(stored)))
    }

    /// A device's commands, oldest first, open ones in their live version.
    pub fn commands_of(&self, device: &Device) -> Result<Vec<CommandRecord>, StoreError> {
        let mut all = stored::of(&self.store, device.id)?;
        let s = device.state();
        for c in &mut all {
            if let Some(live) = s.commands.get(c.id) {
                *c = live.clone();
            }
        }
        Ok(all)
    }

    /// Cancels a PENDING command.
    pub async fn cancel_command(&self, id: CommandId) -> Result<CommandRecord, CommandError> {
        let not_found = || CommandError::NotFound(format!("command {id}"));
        let stored = stored::get(&self.store, id)?.ok_or_else(not_found)?;
        let device = self.device_by_id(stored.device).ok_or_else(not_found)?;
        let commit = {
            let mut s = device.state();
            // Its queue travels with it: a cancel here could not reach the copy there.
            if !s.home.is_here() {
                let home = s.home.elsewhere().map_or_else(|| "(arriving here)".to_string(), ToString::to_string);
                return Err(CommandError::Elsewhere(device.device_name.to_string(), home));
            }
            let record = match s.commands.cancel(id, UnixMs::now().0) {
                Ok(r) => r,
                // Not open any more: report its state as stored.
                Err(CancelError::NotFound(_)) => {
                    return Err(CancelError::NotPending(id, stored.status.as_str()).into());
                }
                Err(e) => return Err(e.into()),
            };
            (self.writer.commit(self.command_writes(&record)), record)
        };
        if let Err(e) = commit.0.await {
            // Still PENDING in the store, so still queued.
            let mut record = commit.1;
            record.status = CommandStatus::Pending;
            record.finished_at = None;
            device.state().commands.reinstate(record);
            return Err(e.into());
        }
        Ok(commit.1)
    }

    /// Ends commands whose time has come; returns how many ended.
    pub fn expire_commands(&self, now: UnixMs) -> usize {
        let mut ended = 0;
        for id in self.command_timers.due(now) {
            let Some(device) = self.device_by_id(id) else { continue };
            let mut s = device.state();
            let mut changed = Vec::new();
            s.commands.expire(now.0, self.config.downlink.timeout_ms(), &mut changed);
            ended += changed.len();
            self.record_commands(changed);
            if let Some(next) = s.commands.next_expiry() {
                self.command_timers.schedule(next, id);
            }
        }
        ended
    }
}

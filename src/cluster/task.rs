//! A distribution task (seed 000 "distribution tasks", seed 001 grayscale migration): which
//! devices of a product go where, in which batches, and how far each got. Pure state: the runner
//! asks [`Distribution::next`] what to do, does it over HTTP, and reports back through the `apply_*`
//! methods; every change it makes is returned as the records to store.

use serde::{Deserialize, Serialize};

use crate::identity::{DeviceId, DeviceName, Home, InstanceName, ProductKey};

/// Identifies a distribution task instance-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DistributionId(pub u64);

impl std::fmt::Display for DistributionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where the devices go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "policy", content = "instance")]
pub enum Policy {
    /// All to one instance.
    Specified(InstanceName),
    /// Each to the instance nearest the address it bootstraps from (moved at that moment).
    Nearest,
}

/// What lets the next batch start once the current one has moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Gate {
    /// Every device of the batch that moved has been seen online at the destination.
    #[default]
    Online,
    /// An operator confirms.
    Confirm,
}

/// What happens when a batch's gate stays shut for `batch_timeout_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// The task pauses for an operator to look.
    #[default]
    Pause,
    /// The next batch starts anyway.
    Continue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistributionStatus {
    /// The product is not yet at the destination.
    Initializing,
    InProgress,
    Paused,
    Completed,
    /// The destination could not be reached; `retry` picks up where it stopped.
    Failed,
    /// An operator ended it; devices it had not moved stay here.
    Canceled,
}

impl DistributionStatus {
    /// Whether the task still holds its devices (they cannot join another task).
    pub fn is_open(self) -> bool {
        !matches!(self, DistributionStatus::Completed | DistributionStatus::Canceled)
    }
}

/// The task itself, stored apart from its devices' entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistributionRecord {
    pub id: DistributionId,
    pub product_key: ProductKey,
    pub policy: Policy,
    /// Devices per batch (grayscale); the whole task is one batch when it is the device count.
    pub batch_size: usize,
    pub gate: Gate,
    pub batch_timeout_s: Option<u64>,
    pub on_timeout: OnTimeout,
    pub status: DistributionStatus,
    pub error: Option<String>,
    /// The batch being moved or waited on (0-based).
    pub batch: u32,
    pub batches: u32,
    /// When the current batch finished moving (the gate's timeout counts from then).
    pub batch_moved_at: Option<u64>,
    /// An operator let the current batch through.
    pub confirmed: bool,
    /// Moves whose outcome stayed unknown in a row, and when the next attempt may start.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub backoff_until: Option<u64>,
    pub created_at: u64,
    pub updated_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryStatus {
    Pending,
    Moving,
    Moved,
    /// Moved, and seen online at the destination.
    Seen,
    /// "nearest" found this instance nearest: the device stays.
    Stayed,
    Failed,
    /// Moved, then taken back before it connected at the destination.
    RolledBack,
    /// Still here when an operator canceled the task.
    Canceled,
}

impl EntryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Pending => "pending",
            EntryStatus::Moving => "moving",
            EntryStatus::Moved => "moved",
            EntryStatus::Seen => "seen",
            EntryStatus::Stayed => "stayed",
            EntryStatus::Failed => "failed",
            EntryStatus::RolledBack => "rolled_back",
            EntryStatus::Canceled => "canceled",
        }
    }

    /// At the destination (whether or not it connected there yet).
    pub fn is_moved(self) -> bool {
        matches!(self, EntryStatus::Moved | EntryStatus::Seen)
    }
}

/// One device's progress in a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub task: DistributionId,
    pub device: DeviceId,
    pub device_name: DeviceName,
    pub batch: u32,
    pub status: EntryStatus,
    /// Where it went or is going.
    pub instance: Option<InstanceName>,
    pub error: Option<String>,
    /// When its status last changed (Unix ms).
    pub updated_at: u64,
}

/// What the runner should do next for a task.
#[derive(Debug, PartialEq, Eq)]
pub enum Work {
    /// Send the product to these instances.
    SendProduct(Vec<InstanceName>),
    /// Move these devices (entry indices) to the instance.
    Move { instance: InstanceName, entries: Vec<usize> },
    /// Ask the instance which of these moved devices (entry indices) it has seen online.
    Poll { instance: InstanceName, entries: Vec<usize> },
    /// Nothing until this time (Unix ms), an operator, or a bootstrap.
    Wait(Option<u64>),
}

/// How a request to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerFailure {
    /// Not delivered (no connection): nothing happened there.
    NotDelivered(String),
    /// Sent, outcome unknown (timeout, a broken answer, a server error).
    Unknown(String),
}

impl PeerFailure {
    pub fn message(&self) -> &str {
        match self {
            PeerFailure::NotDelivered(m) | PeerFailure::Unknown(m) => m,
        }
    }
}

/// A task with its entries, in batch order.
#[derive(Debug, Clone)]
pub struct Distribution {
    pub record: DistributionRecord,
    pub entries: Vec<Entry>,
}

/// Changes to store after a step.
#[derive(Debug, Default)]
pub struct Changed {
    pub record: bool,
    pub entries: Vec<usize>,
}

impl Distribution {
    /// A new task over `devices` (already in their batch order).
    pub fn new(record: DistributionRecord, devices: Vec<(DeviceId, DeviceName)>) -> Distribution {
        let size = record.batch_size.max(1);
        let entries = devices
            .into_iter()
            .enumerate()
            .map(|(i, (device, device_name))| Entry {
                task: record.id,
                device,
                device_name,
                batch: (i / size) as u32,
                status: EntryStatus::Pending,
                instance: None,
                error: None,
                updated_at: record.created_at,
            })
            .collect();
        Distribution { record, entries }
    }

    pub fn index_of(&self, device: DeviceId) -> Option<usize> {
        self.entries.iter().position(|e| e.device == device)
    }

    /// The next thing to do at `now`, `chunk` devices per move.
    pub fn next(&self, now: u64, chunk: usize, poll_ms: u64, nearest_peers: &[InstanceName]) -> Work {
        let r = &self.record;
        match r.status {
            DistributionStatus::Initializing => {
                return Work::SendProduct(match &r.policy {
                    Policy::Specified(i) => vec![i.clone()],
                    Policy::Nearest => nearest_peers.to_vec(),
                });
            }
            DistributionStatus::InProgress => {}
            DistributionStatus::Paused
            | DistributionStatus::Completed
            | DistributionStatus::Failed
            | DistributionStatus::Canceled => {
                return Work::Wait(None);
            }
        }
        // Moves under way first (after a restart or an unknown outcome they are repeated: the
        // destination answers a repeated import with "already here").
        if let Some(first) = self.entries.iter().position(|e| e.status == EntryStatus::Moving) {
            if let Some(at) = r.backoff_until.filter(|at| *at > now) {
                return Work::Wait(Some(at));
            }
            let instance = self.entries[first].instance.clone().expect("a moving entry names its destination");
            let entries = (first..self.entries.len())
                .filter(|&i| {
                    self.entries[i].status == EntryStatus::Moving
                        && self.entries[i].instance.as_ref() == Some(&instance)
                })
                .take(chunk)
                .collect();
            return Work::Move { instance, entries };
        }
        let Policy::Specified(instance) = &r.policy else {
            // "nearest": devices move when they bootstrap.
            return Work::Wait(None);
        };
        let in_batch = |i: &usize| self.entries[*i].batch == r.batch;
        let pending: Vec<usize> = (0..self.entries.len())
            .filter(in_batch)
            .filter(|&i| self.entries[i].status == EntryStatus::Pending)
            .take(chunk)
            .collect();
        if !pending.is_empty() {
            return Work::Move { instance: instance.clone(), entries: pending };
        }
        if r.batch + 1 >= r.batches {
            return Work::Wait(None);
        }
        let unseen: Vec<usize> = (0..self.entries.len())
            .filter(in_batch)
            .filter(|&i| self.entries[i].status == EntryStatus::Moved)
            .collect();
        let moved_at = r.batch_moved_at.unwrap_or(now);
        let deadline = r.batch_timeout_s.map(|s| moved_at.saturating_add(s * 1000));
        if r.confirmed {
            return Work::Wait(Some(now));
        }
        match r.gate {
            Gate::Online if !unseen.is_empty() => {
                let poll_at = moved_at.max(r.updated_at).saturating_add(poll_ms);
                if now >= poll_at || deadline.is_some_and(|d| now >= d) {
                    Work::Poll { instance: instance.clone(), entries: unseen }
                } else {
                    Work::Wait(Some(deadline.map_or(poll_at, |d| d.min(poll_at))))
                }
            }
            Gate::Confirm => Work::Wait(deadline),
            _ => Work::Wait(Some(now)),
        }
    }

    /// Moves the task on where nothing external is awaited: finished batches open the next one
    /// when their gate allows, a task whose devices are all settled completes. Call after every
    /// step and before asking [`Distribution::next`].
    pub fn advance(&mut self, now: u64) -> Changed {
        let mut changed = Changed::default();
        if self.record.status != DistributionStatus::InProgress {
            return changed;
        }
        loop {
            let batch = self.record.batch;
            let open = |e: &Entry| e.batch == batch && matches!(e.status, EntryStatus::Pending | EntryStatus::Moving);
            if self.entries.iter().any(open) {
                break;
            }
            if self.record.batch_moved_at.is_none() {
                self.record.batch_moved_at = Some(now);
                changed.record = true;
            }
            let last = batch + 1 >= self.record.batches;
            if last {
                let unsettled =
                    self.entries.iter().any(|e| matches!(e.status, EntryStatus::Pending | EntryStatus::Moving));
                if !unsettled {
                    self.record.status = DistributionStatus::Completed;
                    changed.record = true;
                }
                break;
            }
            let r = &self.record;
            let unseen = self.entries.iter().any(|e| e.batch == batch && e.status == EntryStatus::Moved);
            let timed_out =
                r.batch_timeout_s.is_some_and(|s| now >= r.batch_moved_at.unwrap_or(now).saturating_add(s * 1000));
            // An operator's confirmation opens either gate.
            let open_gate = r.confirmed || (r.gate == Gate::Online && !unseen);
            let carry_on = timed_out && r.on_timeout == OnTimeout::Continue;
            if !(open_gate || carry_on) {
                if timed_out {
                    let waited = r.batch_timeout_s.unwrap_or(0);
                    self.record.status = DistributionStatus::Paused;
                    self.record.error = Some(format!("batch {} was not let through within {waited} s", batch + 1));
                    changed.record = true;
                }
                break;
            }
            self.record.batch += 1;
            self.record.batch_moved_at = None;
            self.record.confirmed = false;
            changed.record = true;
        }
        if changed.record {
            self.record.updated_at = now;
        }
        changed
    }

    /// The product reached every destination, or not.
    pub fn apply_product(&mut self, result: Result<(), PeerFailure>, now: u64) -> Changed {
        match result {
            // An operator's pause while the product was on its way stands.
            Ok(()) if self.record.status == DistributionStatus::Initializing => {
                self.record.status = DistributionStatus::InProgress;
                self.record.error = None;
            }
            Ok(()) => {}
            Err(f) => self.fail(f.message().to_string()),
        }
        self.record.updated_at = now;
        Changed { record: true, entries: Vec::new() }
    }

    fn fail(&mut self, error: String) {
        self.record.status = DistributionStatus::Failed;
        self.record.error = Some(error);
    }

    /// Entries become `status` (with `instance`, `error`), stamped `now`.
    pub fn set(
        &mut self,
        entries: &[usize],
        status: EntryStatus,
        instance: Option<&InstanceName>,
        error: Option<&str>,
        now: u64,
    ) -> Changed {
        for &i in entries {
            let e = &mut self.entries[i];
            e.status = status;
            if instance.is_some() {
                e.instance = instance.cloned();
            }
            e.error = error.map(str::to_string);
            e.updated_at = now;
        }
        Changed { record: false, entries: entries.to_vec() }
    }

    /// A move request failed as a whole. Devices it certainly did not reach (`fresh`: not sent
    /// before, and the request not delivered) failed, and when nothing else is at stake so did
    /// the task (the destination is unreachable; `retry` resumes). Devices it may have reached
    /// (`uncertain`) stay moving: the move is repeated after a back-off (doubling from a second
    /// up to ten minutes) until the destination answers, since only its answer can settle them.
    pub fn apply_move_failure(
        &mut self,
        fresh: &[usize],
        uncertain: &[usize],
        failure: &PeerFailure,
        now: u64,
    ) -> Changed {
        let m = failure.message();
        let mut changed = self.set(fresh, EntryStatus::Failed, None, Some(&format!("not moved: {m}")), now);
        let asking = format!("outcome unknown, asking again: {m}");
        changed.entries.extend(self.set(uncertain, EntryStatus::Moving, None, Some(&asking), now).entries);
        if uncertain.is_empty() {
            self.fail(m.to_string());
        } else {
            self.record.attempts = self.record.attempts.saturating_add(1);
            let wait = 1000u64.saturating_mul(1 << self.record.attempts.min(10)).min(600_000);
            self.record.backoff_until = Some(now + wait);
            self.record.error = Some(asking);
        }
        self.record.updated_at = now;
        changed.record = true;
        changed
    }

    /// An operator's cancel: devices not moved stay here and the task lets go of them. Refused
    /// (false) while a move is under way: only the destination's answer can settle it.
    pub fn cancel(&mut self, now: u64) -> Option<Changed> {
        if self.entries.iter().any(|e| e.status == EntryStatus::Moving) {
            return None;
        }
        let pending: Vec<usize> =
            (0..self.entries.len()).filter(|&i| self.entries[i].status == EntryStatus::Pending).collect();
        let mut changed = self.set(&pending, EntryStatus::Canceled, None, None, now);
        self.record.status = DistributionStatus::Canceled;
        self.record.updated_at = now;
        changed.record = true;
        Some(changed)
    }

    /// The destination answered a move: the back-off ends.
    pub fn answered(&mut self) {
        if self.record.attempts > 0 {
            self.record.attempts = 0;
            self.record.backoff_until = None;
            self.record.error = None;
        }
    }

    /// Operator's retry: failed devices are tried again (their product first), and moves waiting
    /// out a back-off at once; a paused task stays paused until resumed.
    pub fn retry(&mut self, homes: impl Fn(DeviceId) -> Home, now: u64) -> Changed {
        let mut changed = Changed { record: true, entries: Vec::new() };
        let mut first_batch = None;
        for (i, e) in self.entries.iter_mut().enumerate() {
            if e.status != EntryStatus::Failed {
                continue;
            }
            // One whose outcome was unknown is still leaving: its move is repeated.
            let leaving = e.instance.as_ref().is_some_and(|i| homes(e.device) == Home::Leaving(i.clone()));
            e.status = if leaving { EntryStatus::Moving } else { EntryStatus::Pending };
            e.error = None;
            e.updated_at = now;
            changed.entries.push(i);
            first_batch = Some(first_batch.map_or(e.batch, |b: u32| b.min(e.batch)));
        }
        if let Some(b) = first_batch {
            self.record.batch = self.record.batch.min(b);
        }
        if self.record.status != DistributionStatus::Paused {
            self.record.status = DistributionStatus::Initializing;
        }
        // Moves asked again after a back-off are asked now.
        self.record.attempts = 0;
        self.record.backoff_until = None;
        self.record.error = None;
        self.record.updated_at = now;
        changed
    }

    /// Devices of the current batch seen online at the destination.
    pub fn apply_seen(&mut self, seen: &[usize], now: u64) -> Changed {
        let mut changed = self.set(seen, EntryStatus::Seen, None, None, now);
        self.record.updated_at = now;
        changed.record = true;
        changed
    }

    pub fn counts(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut m = std::collections::BTreeMap::new();
        for e in &self.entries {
            *m.entry(e.status.as_str()).or_insert(0) += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(
        devices: usize,
        batch_size: usize,
        gate: Gate,
        timeout: Option<u64>,
        on_timeout: OnTimeout,
    ) -> Distribution {
        let b = InstanceName::new("b").unwrap();
        let record = DistributionRecord {
            id: DistributionId(1),
            product_key: ProductKey::new("p").unwrap(),
            policy: Policy::Specified(b),
            batch_size,
            gate,
            batch_timeout_s: timeout,
            on_timeout,
            status: DistributionStatus::Initializing,
            error: None,
            batch: 0,
            batches: devices.div_ceil(batch_size) as u32,
            batch_moved_at: None,
            confirmed: false,
            attempts: 0,
            backoff_until: None,
            created_at: 0,
            updated_at: 0,
        };
        let devices =
            (0..devices).map(|i| (DeviceId(i as u64 + 1), DeviceName::new(format!("d{i}")).unwrap())).collect();
        Distribution::new(record, devices)
    }

    fn b() -> InstanceName {
        InstanceName::new("b").unwrap()
    }

    /// Moves whatever `next` asks to move, successfully.
    fn move_all(t: &mut Distribution, now: u64) {
        while let Work::Move { instance, entries } = t.next(now, 2, 1000, &[]) {
            t.set(&entries, EntryStatus::Moved, Some(&instance), None, now);
            t.advance(now);
        }
    }

    #[test]
    fn a_batch_waits_until_its_devices_are_seen_at_the_destination() {
        let mut t = task(5, 2, Gate::Online, None, OnTimeout::Pause);
        assert_eq!(t.next(0, 2, 1000, &[]), Work::SendProduct(vec![b()]));
        t.apply_product(Ok(()), 0);
        move_all(&mut t, 10);
        assert_eq!(t.record.batch, 0, "batch 2 waits");
        assert_eq!(t.next(10, 2, 1000, &[]), Work::Wait(Some(1010)));
        assert_eq!(t.next(1010, 2, 1000, &[]), Work::Poll { instance: b(), entries: vec![0, 1] });
        t.apply_seen(&[0], 1010);
        t.advance(1010);
        assert_eq!(t.record.batch, 0, "one device of the batch is still unseen");
        t.apply_seen(&[1], 2020);
        t.advance(2020);
        assert_eq!(t.record.batch, 1);
        assert_eq!(t.next(2020, 2, 1000, &[]), Work::Move { instance: b(), entries: vec![2, 3] });
        move_all(&mut t, 3000);
        t.apply_seen(&[2, 3], 4000);
        t.advance(4000);
        assert_eq!(t.record.batch, 2);
        move_all(&mut t, 5000);
        assert_eq!(t.record.status, DistributionStatus::Completed, "the last batch needs no gate");
    }

    #[test]
    fn failed_devices_do_not_hold_a_batch_and_the_timeout_policy_applies() {
        let mut t = task(4, 2, Gate::Confirm, Some(60), OnTimeout::Pause);
        t.apply_product(Ok(()), 0);
        let Work::Move { entries, .. } = t.next(0, 2, 1000, &[]) else { panic!() };
        t.set(&entries[..1], EntryStatus::Failed, None, Some("refused"), 0);
        t.set(&entries[1..], EntryStatus::Moved, Some(&b()), None, 0);
        t.advance(0);
        assert_eq!(t.next(0, 2, 1000, &[]), Work::Wait(Some(60_000)));
        t.advance(59_999);
        assert_eq!(t.record.status, DistributionStatus::InProgress);
        t.advance(60_000);
        assert_eq!(t.record.status, DistributionStatus::Paused);

        let mut t = task(4, 2, Gate::Confirm, Some(60), OnTimeout::Continue);
        t.apply_product(Ok(()), 0);
        move_all(&mut t, 0);
        t.advance(60_000);
        assert_eq!((t.record.batch, t.record.status), (1, DistributionStatus::InProgress));

        let mut t = task(4, 2, Gate::Confirm, None, OnTimeout::Pause);
        t.apply_product(Ok(()), 0);
        move_all(&mut t, 0);
        t.record.confirmed = true;
        t.advance(1);
        assert_eq!(t.record.batch, 1, "the operator let it through");
        assert!(!t.record.confirmed, "a confirmation counts for one batch");
    }

    #[test]
    fn an_unreachable_destination_fails_the_task_and_a_retry_resumes_it() {
        let mut t = task(3, 3, Gate::Online, None, OnTimeout::Pause);
        t.apply_product(Ok(()), 0);
        let Work::Move { entries, .. } = t.next(0, 2, 1000, &[]) else { panic!() };
        assert_eq!(entries, vec![0, 1]);
        t.set(&entries, EntryStatus::Moving, Some(&b()), None, 0);
        t.apply_move_failure(&entries, &[], &PeerFailure::NotDelivered("connection refused".into()), 1);
        assert_eq!(t.record.status, DistributionStatus::Failed);
        assert_eq!(t.next(2, 2, 1000, &[]), Work::Wait(None));
        let changed = t.retry(|_| Home::Here, 3);
        assert_eq!(changed.entries, vec![0, 1]);
        assert_eq!(t.next(3, 2, 1000, &[]), Work::SendProduct(vec![b()]));
        t.apply_product(Ok(()), 3);
        assert_eq!(t.next(3, 2, 1000, &[]), Work::Move { instance: b(), entries: vec![0, 1] });
        move_all(&mut t, 4);
        assert_eq!(t.record.status, DistributionStatus::Completed);
        assert_eq!(t.counts().get("moved"), Some(&3));
    }

    #[test]
    fn moves_under_way_are_resumed_first() {
        let mut t = task(3, 3, Gate::Online, None, OnTimeout::Pause);
        t.apply_product(Ok(()), 0);
        t.set(&[2], EntryStatus::Moving, Some(&b()), None, 0);
        assert_eq!(t.next(0, 2, 1000, &[]), Work::Move { instance: b(), entries: vec![2] });
        let failure = PeerFailure::Unknown("timed out".into());
        t.apply_move_failure(&[], &[2], &failure, 1);
        assert_eq!((t.record.status, t.entries[2].status), (DistributionStatus::InProgress, EntryStatus::Moving));
        assert_eq!(t.next(2, 2, 1000, &[]), Work::Wait(Some(2001)), "asked again after a back-off");
        t.apply_move_failure(&[], &[2], &failure, 2001);
        assert_eq!(t.next(2002, 2, 1000, &[]), Work::Wait(Some(6001)), "which doubles");
        assert_eq!(t.next(6001, 2, 1000, &[]), Work::Move { instance: b(), entries: vec![2] });
        // A retry after an operator's pause also repeats it rather than starting afresh.
        t.set(&[2], EntryStatus::Failed, None, Some("x"), 6002);
        t.retry(|d| if d == DeviceId(3) { Home::Leaving(b()) } else { Home::Here }, 6003);
        assert_eq!(t.entries[2].status, EntryStatus::Moving, "an unknown outcome is settled by repeating the move");
    }
}

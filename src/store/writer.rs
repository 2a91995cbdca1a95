//! The single writer: a dedicated thread that takes every job queued while the previous batch
//! was being written, commits them as one RocksDB write batch (one WAL append, one fsync under
//! the `fsync` policy), then reports each job's completion. Concurrent uplinks thus share one sync
//! (group commit) and no async task ever blocks on the disk.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::{mpsc as tokio_mpsc, oneshot, watch};

use super::records::MessageId;
use super::records::{DeviceRecord, PresenceRecord, ProductRecord};
use super::{
    CF_DECODE_QUEUE, CF_DECODED, CF_DEVICES, CF_MESSAGES, CF_META, CF_OUTBOX, CF_PRESENCE, CF_PRODUCTS, CF_REPLAY,
    CF_SESSIONS, CF_SHADOWS, META_NEXT_DEVICE_ID, META_NEXT_EVENT_ID, META_NEXT_MESSAGE_ID, Store, StoreError,
    announced_key, device_key, message_key, records::MessageRecord,
};
use crate::auth::replay;
use crate::clock::UnixMs;
use crate::identity::{DeviceId, Token};
use crate::telemetry::metric;

/// How long a write RocksDB stalls is retried before its jobs fail as busy.
const STALL_PATIENCE: Duration = Duration::from_secs(2);
/// While the disk is full: how often a write is tried again (RocksDB itself looks for freed
/// space every 5 s); jobs arriving in between fail at once.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// While the disk is full: how often the writer says so again.
const REMIND_INTERVAL: Duration = Duration::from_secs(60);
/// Most state changes nobody waits for kept while the disk is full (then the oldest go).
const MAX_HELD: usize = 100_000;

/// How a group-committed batch is made durable before devices see success.
#[derive(Debug, Clone, Copy, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// fsync every batch: survives power loss.
    Fsync,
    /// write the WAL without fsync: survives a crash of the process, not of the machine.
    Wal,
}

/// One change to the store.
#[derive(Debug)]
pub enum Op {
    Uplink {
        device: DeviceId,
        received_at: UnixMs,
        topic: Box<str>,
        payload: Vec<u8>,
        then: AfterUplink,
    },
    /// A 5682 seq accepted with the uplink in the same job (merged into the session's window).
    SeenSeq {
        token: Token,
        window: u32,
        seq: u64,
    },
    Presence {
        device: DeviceId,
        record: PresenceRecord,
    },
    /// A device's last contact is forgotten (it arrived from another instance: it has not been
    /// seen here).
    ForgetPresence(DeviceId),
    /// The status announced to subscribers (`device_status`), stored with its event.
    Announced {
        device: DeviceId,
        status: u8,
    },
    // The rare large records are boxed: every uplink's job moves its ops several times, so an
    // op is kept to the size of an uplink.
    PutProduct(Box<ProductRecord>),
    /// Writes the device's state as it is when the batch is built, so concurrent changes can
    /// never be stored out of order (nothing is written for a deleted device).
    PutDevice(Arc<dyn LiveRecord>),
    /// A device with its presence, messages and sessions (the domains delete what they keep).
    DeleteDevice {
        record: Box<DeviceRecord>,
        tokens: Vec<Token>,
    },
    DeleteSession(Token),
    /// An event for the outbox (the writer assigns its id).
    Event(Box<dyn OutboxEvent>),
    /// The counter under `key` in the meta column family becomes at least `to`: ids handed out
    /// concurrently may be queued out of order, and the counter must never go back.
    RaiseCounter {
        key: &'static [u8],
        to: u64,
    },
    /// A record another domain encoded itself: `value` under `key` in the column family `cf`.
    Put {
        cf: &'static str,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: &'static str,
        key: Vec<u8>,
    },
    /// A record changed from what it holds when its batch is built: changes queued from
    /// anywhere apply one after the other, in the order they were queued.
    Revise(Arc<dyn Revise>),
    /// Every key from `from` (included) to `to` (excluded).
    DeleteRange {
        cf: &'static str,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

/// What an uplink's batch holds beside the message.
#[derive(Debug)]
pub enum AfterUplink {
    Nothing,
    /// Its event, for subscribers.
    Event(Arc<dyn UplinkEvent>),
    /// Its place in the decode queue (under the event record, so the codec's worker can write the
    /// event once it has read the message).
    Decode(Arc<dyn UplinkEvent>),
}

// Checked where it is decided: a bigger variant makes every uplink's job dearer to move.
const _: () = assert!(std::mem::size_of::<Op>() <= 80, "box the large variant");

impl Op {
    /// `record` as JSON under `key`: how the domains keep their records.
    pub fn put_json(cf: &'static str, key: impl Into<Vec<u8>>, record: &impl serde::Serialize) -> Op {
        Op::Put { cf, key: key.into(), value: to_json(record) }
    }
}

/// An event the domain it comes from encodes; its body names the id the writer gives it.
pub trait OutboxEvent: Send + Sync + std::fmt::Debug {
    fn encode(&self, id: u64) -> Vec<u8>;
}

/// Who an uplink event is about: encodes the outbox record naming the stored message, whose id
/// is known only at commit.
pub trait UplinkEvent: Send + Sync + std::fmt::Debug {
    fn encode(&self, device: DeviceId, message: MessageId, received_at: UnixMs) -> Vec<u8>;
}

/// A change to one record worked out by the writer from the record's value at that point in the
/// write order (a read-modify-write no concurrent change can slip into).
pub trait Revise: Send + Sync + std::fmt::Debug {
    fn cf(&self) -> &'static str;
    fn key(&self) -> &[u8];
    /// What to write given the record's current value (`None`: absent); `None` writes nothing.
    /// Called again if the batch is written again.
    fn revise(&self, current: Option<&[u8]>) -> Option<Revised>;
}

/// A revised record, and the event announcing it.
pub struct Revised {
    pub value: Vec<u8>,
    pub event: Option<Box<dyn OutboxEvent>>,
}

/// Something whose current state is a device record (the registry's live device).
pub trait LiveRecord: Send + Sync + std::fmt::Debug {
    /// `None` once the device is deleted.
    fn current(&self) -> Option<DeviceRecord>;
}

/// A record as it is: for a device whose memory must not say what the write will (one that is
/// not served until this write is durable).
impl LiveRecord for DeviceRecord {
    fn current(&self) -> Option<DeviceRecord> {
        Some(self.clone())
    }
}

/// Whom to tell when a job is durable.
pub enum Completion {
    /// A CoAP endpoint: the ticket identifies the exchange waiting for this write.
    Endpoint { sink: CommitSink, ticket: u64 },
    /// An admin request awaiting the result.
    Caller(oneshot::Sender<Result<Option<MessageId>, StoreError>>),
    /// Nobody waits: a state change recorded as it happens (a failure is logged).
    Detached,
}

/// Where an endpoint hears about its committed writes: one message per endpoint per batch.
pub type CommitSink = tokio_mpsc::UnboundedSender<Vec<Committed>>;

pub struct Committed {
    pub ticket: u64,
    /// The id of the job's uplink, if it had one.
    pub result: Result<Option<MessageId>, StoreError>,
}

/// The writes of one job: most hold one to three ops, kept inline.
pub type Ops = smallvec::SmallVec<[Op; 3]>;

pub struct Job {
    pub ops: Ops,
    pub completion: Completion,
}

#[allow(clippy::large_enum_variant)] // a job's ops are inline so an uplink costs no extra allocation
enum Msg {
    Job(Job),
    Stop,
}

/// Handle for queueing writes; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    alive: Arc<AtomicBool>,
    writable: Arc<AtomicBool>,
    events: watch::Receiver<u64>,
    decodes: watch::Receiver<u64>,
}

impl Writer {
    /// Queues a job; never blocks. If the writer has stopped, the job fails at once with
    /// [`StoreError::Closed`] (so a device gets 5.00 rather than silence).
    pub fn submit(&self, job: Job) {
        if let Err(mpsc::SendError(Msg::Job(job))) = self.tx.send(Msg::Job(job)) {
            complete(job.completion, Err(StoreError::Closed));
        }
    }

    /// Queues `ops` now (so writes keep the order of the calls) and returns what to await for
    /// their durability.
    pub fn commit(&self, ops: impl IntoIterator<Item = Op>) -> Commit {
        let (tx, rx) = oneshot::channel();
        self.submit(Job { ops: ops.into_iter().collect(), completion: Completion::Caller(tx) });
        Commit(rx)
    }

    /// Queues `ops` without waiting for them. Changes to one record must be queued in the order
    /// they happen, so callers queue while holding that record's lock.
    pub fn record(&self, ops: impl IntoIterator<Item = Op>) {
        self.submit(Job { ops: ops.into_iter().collect(), completion: Completion::Detached });
    }

    /// The id of the last event committed to the outbox.
    pub fn events(&self) -> watch::Receiver<u64> {
        self.events.clone()
    }

    /// The id of the last message committed to the decode queue.
    pub fn decodes(&self) -> watch::Receiver<u64> {
        self.decodes.clone()
    }

    /// False once the writer thread has ended (stopped, or died).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// False while writes fail because the data directory's filesystem is full.
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }
}

/// A writer with no store behind it, for unit tests of what the domains write: every job waits
/// in the returned [`Recorder`] until read.
#[cfg(test)]
pub(crate) fn recording() -> (Writer, Recorder) {
    let (tx, rx) = mpsc::channel();
    let alive = Arc::new(AtomicBool::new(true));
    let writable = Arc::new(AtomicBool::new(true));
    (Writer { tx, alive, writable, events: watch::channel(0).1, decodes: watch::channel(0).1 }, Recorder(rx))
}

#[cfg(test)]
pub(crate) struct Recorder(mpsc::Receiver<Msg>);

#[cfg(test)]
impl Recorder {
    /// The jobs queued since the last call, in order; a commit among them is answered as done.
    pub(crate) fn take(&self) -> Vec<Ops> {
        let mut jobs = Vec::new();
        while let Ok(Msg::Job(job)) = self.0.try_recv() {
            jobs.push(job.ops);
            complete(job.completion, Ok(None));
        }
        jobs
    }
}

/// A queued commit; resolves once it is durable.
pub struct Commit(oneshot::Receiver<Result<Option<MessageId>, StoreError>>);

impl std::future::Future for Commit {
    type Output = Result<Option<MessageId>, StoreError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

fn complete(completion: Completion, result: Result<Option<MessageId>, StoreError>) {
    match completion {
        Completion::Endpoint { sink, ticket } => {
            let _ = sink.send(vec![Committed { ticket, result }]);
        }
        Completion::Caller(tx) => {
            let _ = tx.send(result);
        }
        Completion::Detached => {}
    }
}

/// Marks the writer dead when its thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

pub struct WriterThread {
    tx: mpsc::Sender<Msg>,
    handle: JoinHandle<()>,
}

impl WriterThread {
    pub fn start(store: &Store, policy: SyncPolicy, max_batch: usize) -> Result<(Writer, WriterThread), StoreError> {
        let next_message_id = store.meta_u64(META_NEXT_MESSAGE_ID)?.unwrap_or(1);
        let next_device_id = store.meta_u64(META_NEXT_DEVICE_ID)?.unwrap_or(1);
        let next_event_id = store.meta_u64(META_NEXT_EVENT_ID)?.unwrap_or(1);
        let (tx, rx) = mpsc::channel();
        let (events_tx, events) = watch::channel(next_event_id - 1);
        let (decodes_tx, decodes) = watch::channel(0);
        let writable = Arc::new(AtomicBool::new(true));
        metrics::gauge!(metric::STORE_WRITABLE).set(1.0);
        let mut state = BatchWriter {
            db: store.db().clone(),
            store: store.clone(),
            writable: writable.clone(),
            outage: None,
            held: VecDeque::new(),
            policy,
            max_batch,
            next_message_id,
            next_device_id,
            next_event_id,
            counters: HashMap::new(),
            events: events_tx,
            decodes: decodes_tx,
            presence: HashMap::new(),
        };
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        let handle = std::thread::Builder::new()
            .name("nbhub-writer".into())
            .spawn(move || {
                let _guard = guard;
                state.run(rx)
            })
            .map_err(|e| StoreError::Rocks(format!("cannot start the writer thread: {e}")))?;
        Ok((Writer { tx: tx.clone(), alive, writable, events, decodes }, WriterThread { tx, handle }))
    }

    /// Commits everything queued before this call, then stops the thread and syncs the WAL.
    pub fn stop(self) {
        let _ = self.tx.send(Msg::Stop);
        let _ = self.handle.join();
    }
}

struct BatchWriter {
    db: Arc<DB>,
    /// Tells what a failed write means.
    store: Store,
    writable: Arc<AtomicBool>,
    /// Set while the disk is full.
    outage: Option<Outage>,
    /// State changes nobody waits for whose write failed for want of space (or a stall), oldest
    /// first: written ahead of everything else by the next write, so nothing recorded is lost
    /// and later changes still land after earlier ones.
    held: VecDeque<Job>,
    policy: SyncPolicy,
    max_batch: usize,
    next_message_id: u64,
    next_device_id: u64,
    next_event_id: u64,
    /// Counters raised by [`Op::RaiseCounter`], as last written (read from the store when first
    /// raised).
    counters: HashMap<&'static [u8], u64>,
    /// Told the last committed event id after each batch that appended events.
    events: watch::Sender<u64>,
    /// Told the last message id queued for decoding after each batch that queued one.
    decodes: watch::Sender<u64>,
    /// Latest presence per device within the current batch (written once per batch).
    presence: HashMap<DeviceId, PresenceRecord>,
}

/// The disk is full: what the writer knows of it.
struct Outage {
    since: Instant,
    /// What waiting jobs are told.
    error: StoreError,
    /// No write is tried before this.
    next_try: Instant,
    /// Jobs failed since the last log line.
    refused: u64,
    logged: Instant,
}

impl BatchWriter {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let mut jobs: Vec<Job> = Vec::with_capacity(self.max_batch);
        let mut ids: Vec<Option<MessageId>> = Vec::with_capacity(self.max_batch);
        let mut stopping = false;
        while !stopping {
            let msg = match &self.outage {
                None => rx.recv().ok(),
                // Wakes up to try again even when nothing arrives, so held changes are written
                // (and health reported) as soon as space is back.
                Some(o) => match rx.recv_timeout(o.next_try.saturating_duration_since(Instant::now())) {
                    Ok(msg) => Some(msg),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.commit(&mut jobs, &mut ids);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => None,
                },
            };
            match msg {
                Some(Msg::Job(j)) => jobs.push(j),
                Some(Msg::Stop) | None => break,
            }
            while jobs.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(Msg::Job(j)) => jobs.push(j),
                    Ok(Msg::Stop) => {
                        stopping = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            match &self.outage {
                Some(o) if Instant::now() < o.next_try => self.refuse(&mut jobs),
                _ => self.commit(&mut jobs, &mut ids),
            }
        }
        if !self.held.is_empty() {
            tracing::error!(changes = self.held.len(), "stopping with the disk full: recorded state changes are lost");
        }
        if let Err(e) = self.db.flush_wal(true) {
            tracing::error!(error = %e, "final WAL sync failed");
        }
    }

    /// Writes the held changes then `jobs` as one batch and reports the result to each job.
    fn commit(&mut self, jobs: &mut Vec<Job>, ids: &mut Vec<Option<MessageId>>) {
        if !self.held.is_empty() {
            jobs.splice(0..0, self.held.drain(..));
        }
        let started = Instant::now();
        let result = self.write(jobs, ids);
        metrics::histogram!(metric::STORE_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(metric::STORE_BATCH_JOBS).record(jobs.len() as f64);
        // While the disk is full a try fails every second: only the outage's own lines are logged.
        let quiet = self.outage.as_ref().is_some_and(|o| o.logged.elapsed() < REMIND_INTERVAL);
        match &result {
            Ok(()) => self.recovered(),
            Err(e @ StoreError::NoSpace { .. }) => self.out_of_space(e, jobs.len()),
            Err(e @ StoreError::Busy(_)) => {
                metrics::counter!(metric::STORE_WRITES_REFUSED, "reason" => "busy").increment(jobs.len() as u64);
                if !quiet {
                    tracing::warn!(error = %e, jobs = jobs.len(), "store write stalled; those requests get 5.03");
                }
            }
            Err(e) if !quiet => {
                tracing::error!(error = %e, jobs = jobs.len(), "store write failed; those requests get 5.00")
            }
            Err(_) => {}
        }
        // Whatever failed while the disk is full (a stall in the recovery flush, or worse), the
        // next try waits its turn: the writer never loops on a failing write.
        if let (Err(_), Some(o)) = (&result, &mut self.outage) {
            o.next_try = Instant::now() + PROBE_INTERVAL;
        }
        // Only a full disk or a stall leaves nothing written for certain and passes by itself.
        let hold = result.as_ref().is_err_and(|e| e.retry_after_s().is_some());
        // Consecutive jobs of one endpoint are reported in one message: one wake-up per
        // endpoint per batch instead of one per uplink.
        let mut group: Option<(CommitSink, Vec<Committed>)> = None;
        for (job, id) in jobs.drain(..).zip(ids.drain(..)) {
            let r = result.clone().map(|()| id);
            match job.completion {
                Completion::Detached if hold => self.hold(job),
                Completion::Endpoint { sink, ticket } => match &mut group {
                    Some((s, done)) if s.same_channel(&sink) => done.push(Committed { ticket, result: r }),
                    _ => {
                        if let Some((s, done)) = group.replace((sink, vec![Committed { ticket, result: r }])) {
                            let _ = s.send(done);
                        }
                    }
                },
                caller => complete(caller, r),
            }
        }
        if let Some((s, done)) = group {
            let _ = s.send(done);
        }
    }

    /// A write failed for want of space: says so once, then waits before trying again.
    fn out_of_space(&mut self, error: &StoreError, jobs: usize) {
        metrics::counter!(metric::STORE_WRITES_REFUSED, "reason" => "no_space").increment(jobs as u64);
        let now = Instant::now();
        match &mut self.outage {
            Some(o) => {
                o.error = error.clone();
                o.refused += jobs as u64;
            }
            None => {
                tracing::error!(error = %error, "store disk full: devices get 5.03 and the admin API 507 until space is freed");
                self.writable.store(false, Ordering::Relaxed);
                metrics::gauge!(metric::STORE_WRITABLE).set(0.0);
                self.outage = Some(Outage {
                    since: now,
                    error: error.clone(),
                    next_try: now + PROBE_INTERVAL,
                    refused: 0,
                    logged: now,
                });
            }
        }
    }

    fn recovered(&mut self) {
        if let Some(o) = self.outage.take() {
            tracing::info!(after_s = o.since.elapsed().as_secs_f64(), "store writable again");
            self.writable.store(true, Ordering::Relaxed);
            metrics::gauge!(metric::STORE_WRITABLE).set(1.0);
        }
    }

    /// Between tries while the disk is full: fails the waiting jobs at once (nothing is
    /// written) and holds the others.
    fn refuse(&mut self, jobs: &mut Vec<Job>) {
        let Some(o) = &mut self.outage else { return };
        o.error = o.error.clone().refreshed();
        o.refused += jobs.len() as u64;
        metrics::counter!(metric::STORE_WRITES_REFUSED, "reason" => "no_space").increment(jobs.len() as u64);
        if o.logged.elapsed() >= REMIND_INTERVAL {
            tracing::error!(
                error = %o.error, refused = o.refused, since_s = o.since.elapsed().as_secs(),
                "store disk still full"
            );
            o.refused = 0;
            o.logged = Instant::now();
        }
        let error = o.error.clone();
        for job in jobs.drain(..) {
            match job.completion {
                Completion::Detached => self.hold(job),
                waiting => complete(waiting, Err(error.clone())),
            }
        }
    }

    fn hold(&mut self, job: Job) {
        if self.held.len() == MAX_HELD {
            self.held.pop_front();
            metrics::counter!(metric::STORE_WRITES_REFUSED, "reason" => "held_overflow").increment(1);
            if self.outage.as_ref().is_none_or(|o| o.logged.elapsed() >= REMIND_INTERVAL) {
                tracing::error!(max = MAX_HELD, "too many state changes held for the full disk: dropping the oldest");
                if let Some(o) = &mut self.outage {
                    o.logged = Instant::now();
                }
            }
        }
        self.held.push_back(job);
    }

    /// Builds the batch from the jobs' ops without taking them, so a job whose write failed can
    /// be held and written again.
    fn write(&mut self, jobs: &[Job], ids: &mut Vec<Option<MessageId>>) -> Result<(), StoreError> {
        let db = self.db.clone();
        let cf = |name| db.cf_handle(name).expect("column families are created at open");
        let (messages, replay, presence_cf, sessions) =
            (cf(CF_MESSAGES), cf(CF_REPLAY), cf(CF_PRESENCE), cf(CF_SESSIONS));
        let mut batch = WriteBatch::default();
        let first_message_id = self.next_message_id;
        let first_device_id = self.next_device_id;
        let first_event_id = self.next_event_id;
        let outbox = cf(CF_OUTBOX);
        let mut raised: HashMap<&'static [u8], u64> = HashMap::new();
        // Records revised earlier in this batch, as they will be written.
        let mut revised: HashMap<(&'static str, Vec<u8>), Vec<u8>> = HashMap::new();
        let mut last_decode = None;
        self.presence.clear();
        for job in jobs {
            let mut id = None;
            for op in &job.ops {
                match op {
                    Op::Uplink { device, received_at, topic, payload, then } => {
                        let mid = MessageId(self.next_message_id);
                        self.next_message_id += 1;
                        batch.put_cf(
                            messages,
                            message_key(*device, mid),
                            MessageRecord::encode_parts(*received_at, topic, payload),
                        );
                        id = Some(mid);
                        match then {
                            AfterUplink::Nothing => {}
                            AfterUplink::Event(event) => {
                                let record = event.encode(*device, mid, *received_at);
                                batch.put_cf(outbox, self.next_event_id.to_be_bytes(), record);
                                self.next_event_id += 1;
                            }
                            AfterUplink::Decode(event) => {
                                batch.put_cf(
                                    cf(CF_DECODE_QUEUE),
                                    mid.0.to_be_bytes(),
                                    event.encode(*device, mid, *received_at),
                                );
                                last_decode = Some(mid.0);
                            }
                        }
                    }
                    Op::SeenSeq { token, window, seq } => {
                        batch.merge_cf(replay, token.as_bytes(), replay::seq_operand(*window, *seq));
                    }
                    Op::Presence { device, record } => {
                        self.presence.insert(*device, record.clone());
                    }
                    Op::ForgetPresence(device) => {
                        self.presence.remove(device);
                        batch.delete_cf(presence_cf, device.0.to_be_bytes());
                    }
                    Op::Announced { device, status } => batch.put_cf(presence_cf, announced_key(*device), [*status]),
                    Op::PutProduct(p) => {
                        batch.put_cf(cf(CF_PRODUCTS), p.product_key.as_str(), to_json(p));
                    }
                    Op::PutDevice(live) => {
                        if let Some(d) = live.current() {
                            self.next_device_id = self.next_device_id.max(d.id.0 + 1);
                            batch.put_cf(cf(CF_DEVICES), device_key(&d.product_key, &d.device_name), to_json(&d));
                        }
                    }
                    Op::DeleteDevice { record, tokens } => {
                        batch.delete_cf(cf(CF_DEVICES), device_key(&record.product_key, &record.device_name));
                        batch.delete_cf(presence_cf, record.id.0.to_be_bytes());
                        batch.delete_cf(presence_cf, announced_key(record.id));
                        let (from, to) = (record.id.0.to_be_bytes(), (record.id.0 + 1).to_be_bytes());
                        batch.delete_range_cf(messages, from.as_slice(), to.as_slice());
                        batch.delete_range_cf(cf(CF_DECODED), from.as_slice(), to.as_slice());
                        batch.delete_cf(cf(CF_SHADOWS), from);
                        for t in tokens {
                            batch.delete_cf(sessions, t.as_bytes());
                            batch.delete_cf(replay, t.as_bytes());
                        }
                        self.presence.remove(&record.id);
                    }
                    Op::DeleteSession(token) => {
                        batch.delete_cf(sessions, token.as_bytes());
                        batch.delete_cf(replay, token.as_bytes());
                    }
                    Op::Event(event) => {
                        batch.put_cf(outbox, self.next_event_id.to_be_bytes(), event.encode(self.next_event_id));
                        self.next_event_id += 1;
                    }
                    Op::RaiseCounter { key, to } => {
                        let current = match raised.get(key) {
                            Some(v) => *v,
                            None => self.counter(key)?,
                        };
                        if *to > current {
                            raised.insert(key, *to);
                        }
                    }
                    Op::Put { cf: name, key, value } => batch.put_cf(cf(name), key, value),
                    Op::Delete { cf: name, key } => batch.delete_cf(cf(name), key),
                    Op::Revise(change) => {
                        let slot = (change.cf(), change.key().to_vec());
                        let current = match revised.get(&slot) {
                            Some(v) => Some(v.clone()),
                            None => db.get_cf(cf(slot.0), &slot.1)?,
                        };
                        if let Some(Revised { value, event }) = change.revise(current.as_deref()) {
                            batch.put_cf(cf(slot.0), &slot.1, &value);
                            if let Some(event) = event {
                                batch.put_cf(
                                    outbox,
                                    self.next_event_id.to_be_bytes(),
                                    event.encode(self.next_event_id),
                                );
                                self.next_event_id += 1;
                            }
                            revised.insert(slot, value);
                        }
                    }
                    Op::DeleteRange { cf: name, from, to } => batch.delete_range_cf(cf(name), from, to),
                }
            }
            ids.push(id);
        }
        for (device, record) in self.presence.drain() {
            batch.put_cf(presence_cf, device.0.to_be_bytes(), record.encode());
        }
        // While the disk is full, even a try with nothing else to write must prove a durable
        // write works again: it rewrites a counter with its current value.
        if self.next_message_id != first_message_id || self.outage.is_some() {
            batch.put_cf(cf(CF_META), META_NEXT_MESSAGE_ID, self.next_message_id.to_le_bytes());
        }
        if self.next_device_id != first_device_id {
            batch.put_cf(cf(CF_META), META_NEXT_DEVICE_ID, self.next_device_id.to_le_bytes());
        }
        for (key, value) in &raised {
            batch.put_cf(cf(CF_META), key, value.to_le_bytes());
        }
        if self.next_event_id != first_event_id {
            batch.put_cf(cf(CF_META), META_NEXT_EVENT_ID, self.next_event_id.to_le_bytes());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(self.policy == SyncPolicy::Fsync);
        // A write the write controller would delay fails at once instead: waiting inside
        // RocksDB can deadlock with the flush that recovers from a full disk.
        opts.set_no_slowdown(true);
        // Ids of a failed batch are not handed out again: were its WAL record to survive (written,
        // then the sync failed) a reused id would overwrite it, e.g. behind a webhook's cursor.
        let result = self.write_stalled(batch, &opts);
        if result.is_ok() {
            self.counters.extend(raised);
            if self.next_event_id != first_event_id {
                self.events.send_replace(self.next_event_id - 1);
            }
            if let Some(mid) = last_decode {
                self.decodes.send_replace(mid);
            }
        }
        result
    }

    /// The value of a raised counter as last written.
    fn counter(&mut self, key: &'static [u8]) -> Result<u64, StoreError> {
        if let Some(v) = self.counters.get(key) {
            return Ok(*v);
        }
        let v = self.store.meta_u64(key)?.unwrap_or(0);
        self.counters.insert(key, v);
        Ok(v)
    }

    /// Writes `batch`, trying it again with growing pauses while RocksDB reports a write stall,
    /// for at most [`STALL_PATIENCE`].
    fn write_stalled(&self, batch: WriteBatch, opts: &WriteOptions) -> Result<(), StoreError> {
        let deadline = Instant::now() + STALL_PATIENCE;
        let data = batch.data().to_vec();
        let mut pause = Duration::from_millis(1);
        let mut result = self.db.write_opt(batch, opts).map_err(|e| self.store.write_error(e));
        while matches!(result, Err(StoreError::Busy(_))) && Instant::now() + pause < deadline {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
            result = self.db.write_opt(WriteBatch::from_data(&data), opts).map_err(|e| self.store.write_error(e));
        }
        result
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

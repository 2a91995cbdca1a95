//! A streaming outlet's delivery: reads the outbox after its cursor, publishes every event to the
//! engine (a [`Sink`]), and moves the cursor only past events the engine acknowledged (or gave
//! up on after `max_age_s`, counted). A device's events are published one after the other, each
//! once the one before it is acknowledged, so the engine holds them in order; different devices'
//! events are in flight together, up to `concurrency`. An engine that is down or full holds its
//! events in the outbox and delays nothing else: the uplink path and the other readers never wait
//! for it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::event::Stored;
use super::readers::{Reader, Readers};
use super::stored;
use crate::clock::UnixMs;
use crate::config::OutletConfig;
use crate::store::{Store, Writer};
use crate::sync::lock;
use crate::telemetry::metric;

/// Outbox events read at a time.
const READ_BATCH: usize = 1024;
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LAST_RETRY: Duration = Duration::from_secs(10);

/// An engine events are published to.
pub trait Sink: Send + Sync + 'static {
    /// Whether publishing can start (connected, the stream in place); else why not.
    fn prepare(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Publishes `event`; resolves once the engine acknowledged it, or with why it did not.
    fn publish(&self, event: &Stored) -> impl Future<Output = Result<(), String>> + Send;
}

/// What an outlet is doing, for the admin API and the CLI.
pub struct Status {
    pub name: &'static str,
    /// Where it publishes to (no credentials).
    pub target: String,
    connected: AtomicBool,
    cursor: AtomicU64,
    published: AtomicU64,
    acknowledged: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
    committed: watch::Receiver<u64>,
}

impl Status {
    pub fn new(name: &'static str, target: String, writer: &Writer) -> Arc<Status> {
        Arc::new(Status {
            name,
            target,
            connected: AtomicBool::new(false),
            cursor: AtomicU64::new(0),
            published: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
            committed: writer.events(),
        })
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        metrics::gauge!(metric::OUTLET_CONNECTED, "outlet" => self.name).set(if connected { 1.0 } else { 0.0 });
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn failed(&self, why: String) {
        *lock(&self.last_error) = Some(why);
    }

    fn moved(&self, cursor: u64) {
        self.cursor.store(cursor, Ordering::Relaxed);
        let behind = self.committed.borrow().saturating_sub(cursor);
        metrics::gauge!(metric::OUTLET_LAG_EVENTS, "outlet" => self.name).set(behind as f64);
    }

    pub fn view(&self) -> serde_json::Value {
        let cursor = self.cursor.load(Ordering::Relaxed);
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "name": self.name,
            "target": self.target,
            "connected": self.connected.load(Ordering::Relaxed),
            "delivered_event_id": cursor.to_string(),
            "lag_events": self.committed.borrow().saturating_sub(cursor),
            "published": n(&self.published),
            "acknowledged": n(&self.acknowledged),
            "failed": n(&self.failed),
            "dropped": n(&self.dropped),
            "last_error": *lock(&self.last_error),
        })
    }
}

pub struct Outlet<S> {
    pub sink: Arc<S>,
    pub status: Arc<Status>,
    pub store: Store,
    pub writer: Writer,
    pub readers: Arc<Readers>,
    pub config: OutletConfig,
}

/// Delivery stopped (shutdown) before the batch was through: the cursor stays.
struct Stopped;

impl<S: Sink> Outlet<S> {
    /// Counts the outlet among the outbox's readers from its stored cursor (from the last event
    /// committed, the first time it runs), then delivers until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let reader = Reader::Outlet(self.status.name);
        let mut cursor = self.readers.cursor(reader).unwrap_or(0);
        self.status.moved(cursor);
        let mut committed = self.writer.events();
        let mut backoff = FIRST_RETRY;
        loop {
            if let Err(why) = self.sink.prepare().await {
                tracing::warn!(outlet = self.status.name, error = why, retry_in = ?backoff, "outlet not ready");
                self.status.failed(why);
                self.status.moved(cursor);
                if pause(backoff, &mut shutdown).await.is_err() {
                    return;
                }
                backoff = (backoff * 2).min(LAST_RETRY);
                continue;
            }
            backoff = FIRST_RETRY;
            let store = self.store.clone();
            let read = tokio::task::spawn_blocking(move || stored::events_after(&store, cursor, READ_BATCH)).await;
            let (events, last) = match read {
                Ok(Ok(read)) => read,
                Ok(Err(e)) => {
                    tracing::error!(outlet = self.status.name, error = %e, "cannot read the outbox");
                    (Vec::new(), None)
                }
                Err(_) => return,
            };
            let Some(last) = last else {
                self.status.moved(cursor);
                tokio::select! {
                    _ = shutdown.changed() => return,
                    changed = committed.changed() => if changed.is_err() { return },
                    // The outbox may have been read before the last batch's notification.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            };
            if self.deliver(events, cursor, &shutdown).await.is_err() {
                return;
            }
            cursor = last;
            self.writer.record([stored::outlet_cursor(self.status.name, last)]);
            self.readers.advanced(reader, last);
            self.status.moved(last);
        }
    }

    /// Publishes a batch, each device's events in order, and returns once every one is
    /// acknowledged or given up. Meanwhile the lag shown grows with what is committed behind
    /// `cursor`, however long an unreachable engine holds the batch.
    async fn deliver(&self, events: Vec<Stored>, cursor: u64, shutdown: &watch::Receiver<bool>) -> Result<(), Stopped> {
        let mut chains: Vec<Vec<Stored>> = Vec::new();
        let mut by_device: HashMap<(String, String), usize> = HashMap::new();
        for e in events {
            let key = (e.product_key.clone(), e.device_name.clone());
            let i = *by_device.entry(key).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[i].push(e);
        }
        let mut running = tokio::task::JoinSet::<Result<(), Stopped>>::new();
        let mut stopped = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut joined = async |running: &mut tokio::task::JoinSet<Result<(), Stopped>>| loop {
            tokio::select! {
                r = running.join_next() => return r.map(|r| matches!(r, Ok(Ok(())))),
                _ = tick.tick() => self.status.moved(cursor),
            }
        };
        for chain in chains {
            while running.len() >= self.config.concurrency {
                stopped |= joined(&mut running).await == Some(false);
            }
            let (sink, status, config, shutdown) =
                (self.sink.clone(), self.status.clone(), self.config.clone(), shutdown.clone());
            running.spawn(async move {
                for event in chain {
                    publish(&*sink, &status, &config, &event, shutdown.clone()).await?;
                }
                Ok(())
            });
        }
        while let Some(ok) = joined(&mut running).await {
            stopped |= !ok;
        }
        if stopped { Err(Stopped) } else { Ok(()) }
    }
}

/// Publishes one event until the engine acknowledges it, it grows older than `max_age`, or
/// delivery stops.
async fn publish<S: Sink>(
    sink: &S,
    status: &Status,
    config: &OutletConfig,
    event: &Stored,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Stopped> {
    let name = status.name;
    let mut backoff = FIRST_RETRY;
    loop {
        let age = Duration::from_millis(UnixMs::now().0.saturating_sub(event.time.0));
        if age > config.max_age {
            status.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::OUTLET_DROPPED, "outlet" => name).increment(1);
            tracing::warn!(outlet = name, event = event.id, "giving up on an event older than the outlet's max_age_s");
            return Ok(());
        }
        status.published.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::OUTLET_PUBLISHED, "outlet" => name).increment(1);
        let outcome = match tokio::time::timeout(config.ack_timeout, sink.publish(event)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no acknowledgement within {:?}", config.ack_timeout)),
        };
        match outcome {
            Ok(()) => {
                status.acknowledged.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric::OUTLET_ACKNOWLEDGED, "outlet" => name).increment(1);
                let lag = UnixMs::now().0.saturating_sub(event.time.0) as f64 / 1000.0;
                metrics::histogram!(metric::OUTLET_LAG_SECONDS, "outlet" => name).record(lag);
                return Ok(());
            }
            Err(why) => {
                status.failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric::OUTLET_FAILED, "outlet" => name).increment(1);
                tracing::debug!(outlet = name, event = event.id, error = why, retry_in = ?backoff, "publish failed");
                status.failed(why);
            }
        }
        pause(backoff, &mut shutdown).await?;
        backoff = (backoff * 2).min(LAST_RETRY);
    }
}

/// Waits `d`, or fails when delivery stops first.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> Result<(), Stopped> {
    tokio::select! {
        _ = shutdown.changed() => Err(Stopped),
        _ = tokio::time::sleep(d) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{DeviceName, ProductKey};
    use crate::northbound::event::{Event, EventKind, Wanted};
    use crate::store::{MemoryBudget, Op, SyncPolicy, WriterThread};

    /// An engine that refuses each device's first publish once, and records what it took.
    #[derive(Default)]
    struct Flaky {
        refused: Mutex<std::collections::HashSet<String>>,
        taken: Mutex<Vec<(String, u64)>>,
    }

    impl Sink for Flaky {
        async fn prepare(&self) -> Result<(), String> {
            Ok(())
        }

        async fn publish(&self, event: &Stored) -> Result<(), String> {
            if lock(&self.refused).insert(event.device_name.clone()) {
                return Err("full".into());
            }
            lock(&self.taken).push((event.device_name.clone(), event.id));
            Ok(())
        }
    }

    #[test]
    fn a_refused_publish_is_retried_before_its_devices_next_event_and_the_cursor_waits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None, MemoryBudget::of(8 << 20)).unwrap();
        let (writer, thread) = WriterThread::start(&store, SyncPolicy::Wal, 100).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let readers = Readers::new(writer.clone(), Arc::new(Wanted::default()));
        readers.add(Reader::Outlet("test"), &EventKind::ALL, 0);
        let event = |dn: &str, n: u32| Event {
            kind: EventKind::DeviceStatus,
            product_key: ProductKey::new("pk").unwrap(),
            device_name: DeviceName::new(dn).unwrap(),
            time: UnixMs::now(),
            data: serde_json::json!({ "n": n }),
        };
        let ops = (0..3).flat_map(|n| ["a", "b"].map(|dn| Op::Event(Box::new(event(dn, n)))));
        rt.block_on(writer.commit(ops)).unwrap();
        let sink = Arc::new(Flaky::default());
        let config = OutletConfig {
            max_age: Duration::from_secs(60),
            concurrency: 8,
            ack_timeout: Duration::from_secs(1),
            commands: false,
        };
        let status = Status::new("test", "memory".into(), &writer);
        let outlet = Outlet { sink: sink.clone(), status, store, writer, readers: readers.clone(), config };
        let (stop, shutdown) = watch::channel(false);
        let run = rt.spawn(outlet.run(shutdown));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while readers.cursor(Reader::Outlet("test")) != Some(6) {
            assert!(
                std::time::Instant::now() < deadline,
                "the cursor stays at {:?}",
                readers.cursor(Reader::Outlet("test"))
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.send(true).unwrap();
        rt.block_on(run).unwrap();
        // Events 1, 3, 5 are a's and 2, 4, 6 b's: each device's in order, each once, although
        // the first publish of each was refused.
        let taken = lock(&sink.taken).clone();
        for (dn, ids) in [("a", [1, 3, 5]), ("b", [2, 4, 6])] {
            let got: Vec<u64> = taken.iter().filter(|(d, _)| d == dn).map(|(_, id)| *id).collect();
            assert_eq!(got, ids, "{dn}: {taken:?}");
        }
        drop(rt);
        thread.stop();
    }
}

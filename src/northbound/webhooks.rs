//! Webhook subscriptions: kept in the store, one delivery task each. Also owns what the
//! subscriptions imply for the rest of the server: which event kinds are appended at all
//! ([`Wanted`]) and how much of the outbox may be trimmed (below the slowest cursor).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::delivery::{self, DeliveryConfig};
use super::event::{EventKind, Wanted};
use super::stored;
use crate::clock::UnixMs;
use crate::store::{Store, StoreError, Writer};
use crate::sync::lock;

/// Events delivered to every subscriber before the outbox is trimmed.
const TRIM_STEP: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebhookId(pub u64);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookRecord {
    pub id: WebhookId,
    pub url: String,
    pub events: Vec<EventKind>,
    /// Shared secret for the `X-Nbhub-Signature` HMAC; never shown again once set.
    pub secret: Option<String>,
    pub created_at: u64,
}

struct Running {
    record: Arc<WebhookRecord>,
    /// Last event id taken, as the delivery task reports it.
    cursor: u64,
    /// Dropping it stops the task.
    stop: watch::Sender<bool>,
}

pub struct Webhooks {
    store: Store,
    writer: Writer,
    /// Told which event kinds the running subscriptions want.
    wanted: Arc<Wanted>,
    config: DeliveryConfig,
    client: reqwest::Client,
    shutdown: watch::Receiver<bool>,
    running: Mutex<HashMap<WebhookId, Running>>,
    /// Outbox ids below this are already trimmed.
    trimmed: Mutex<u64>,
}

impl Webhooks {
    /// Loads the subscriptions and starts their delivery tasks (on the current runtime).
    pub fn start(
        store: Store,
        writer: Writer,
        wanted: Arc<Wanted>,
        config: DeliveryConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Webhooks>, StoreError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .user_agent(concat!("nbhub/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StoreError::Rocks(format!("cannot build the webhook HTTP client: {e}")))?;
        let loaded = stored::webhooks(&store)?;
        let hooks = Arc::new(Webhooks {
            store,
            writer,
            wanted,
            config,
            client,
            shutdown,
            running: Mutex::new(HashMap::new()),
            trimmed: Mutex::new(0),
        });
        // Every subscription is known before any task runs: the outbox is only trimmed below the
        // slowest of them.
        let loaded: Vec<_> = loaded.into_iter().map(|(r, c)| (Arc::new(r), c)).collect();
        for (record, cursor) in &loaded {
            hooks.register(record.clone(), *cursor);
        }
        for (record, cursor) in loaded {
            hooks.spawn(record, cursor);
        }
        Ok(hooks)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<WebhookId, Running>> {
        lock(&self.running)
    }

    /// Counts a subscription (for trimming and for the event kinds written) before its task runs.
    fn register(&self, record: Arc<WebhookRecord>, cursor: u64) -> watch::Receiver<bool> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut running = self.running();
        running.insert(record.id, Running { record, cursor, stop: stop_tx });
        self.update_wanted(&running);
        stop_rx
    }

    fn spawn(self: &Arc<Self>, record: Arc<WebhookRecord>, cursor: u64) {
        let Some(stop_rx) = self.running().get(&record.id).map(|r| r.stop.subscribe()) else { return };
        let task = delivery::Task {
            hook: record,
            cursor,
            store: self.store.clone(),
            writer: self.writer.clone(),
            client: self.client.clone(),
            config: self.config.clone(),
            hooks: Arc::downgrade(self),
        };
        tokio::spawn(task.run(stop_rx, self.shutdown.clone()));
    }

    /// What is appended to the outbox follows the subscriptions; set under their lock, so
    /// concurrent changes cannot leave a stale set behind.
    fn update_wanted(&self, running: &HashMap<WebhookId, Running>) {
        self.wanted.set(running.values().flat_map(|r| r.record.events.clone()));
    }

    /// Subscribes `url` to `events` from now on.
    pub async fn create(
        self: &Arc<Self>,
        url: String,
        events: Vec<EventKind>,
        secret: Option<String>,
    ) -> Result<Arc<WebhookRecord>, StoreError> {
        let id = WebhookId(rand::random::<u64>() >> 1);
        let record = Arc::new(WebhookRecord { id, url, events, secret, created_at: UnixMs::now().0 });
        // Events from now on: the cursor starts at the last one committed. Registered before the
        // commit so no trim meanwhile can pass its cursor.
        let cursor = *self.writer.events().borrow();
        self.register(record.clone(), cursor);
        let commit = self.writer.commit([stored::put_webhook(&record), stored::cursor(id, cursor)]);
        if let Err(e) = commit.await {
            let mut running = self.running();
            running.remove(&id);
            self.update_wanted(&running);
            return Err(e);
        }
        self.spawn(record.clone(), cursor);
        Ok(record)
    }

    /// Unsubscribes; false if there was no such webhook.
    pub async fn delete(&self, id: WebhookId) -> Result<bool, StoreError> {
        {
            let mut running = self.running();
            if running.remove(&id).is_none() {
                return Ok(false);
            }
            self.update_wanted(&running);
        }
        self.writer.commit(stored::delete_webhook(id)).await?;
        self.trim();
        Ok(true)
    }

    pub fn list(&self) -> Vec<(Arc<WebhookRecord>, u64)> {
        let mut v: Vec<_> = self.running().values().map(|r| (r.record.clone(), r.cursor)).collect();
        v.sort_by_key(|(r, _)| r.created_at);
        v
    }

    pub fn get(&self, id: WebhookId) -> Option<(Arc<WebhookRecord>, u64)> {
        self.running().get(&id).map(|r| (r.record.clone(), r.cursor))
    }

    /// A delivery task took every event up to `cursor`.
    pub(super) fn advanced(&self, id: WebhookId, cursor: u64) {
        if let Some(r) = self.running().get_mut(&id) {
            r.cursor = cursor;
        }
        self.trim();
    }

    /// Drops outbox events every subscriber has taken (all of them when nobody subscribes), in
    /// steps of [`TRIM_STEP`] so range deletions stay few.
    fn trim(&self) {
        let (below, subscribed) = {
            let running = self.running();
            match running.values().map(|r| r.cursor).min() {
                Some(min) => (min + 1, true),
                None => (*self.writer.events().borrow() + 1, false),
            }
        };
        let mut trimmed = lock(&self.trimmed);
        if below > *trimmed && (below - *trimmed >= TRIM_STEP || !subscribed) {
            *trimmed = below;
            self.writer.record([stored::trim_outbox(below)]);
        }
    }
}

//! Webhook subscriptions: kept in the store, one delivery task each, each counted among the
//! outbox's [`Readers`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::delivery::{self, DeliveryConfig};
use super::event::EventKind;
use super::readers::{Reader, Readers};
use super::stored;
use crate::clock::UnixMs;
use crate::store::{Store, StoreError, Writer};
use crate::sync::lock;

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
    /// Dropping it stops the task.
    stop: watch::Sender<bool>,
}

pub struct Webhooks {
    store: Store,
    writer: Writer,
    /// Where each subscription's cursor is counted.
    readers: Arc<Readers>,
    config: DeliveryConfig,
    client: reqwest::Client,
    shutdown: watch::Receiver<bool>,
    running: Mutex<HashMap<WebhookId, Running>>,
}

impl Webhooks {
    /// Loads the subscriptions and starts their delivery tasks (on the current runtime).
    pub fn start(
        store: Store,
        writer: Writer,
        readers: Arc<Readers>,
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
            readers,
            config,
            client,
            shutdown,
            running: Mutex::new(HashMap::new()),
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
    fn register(&self, record: Arc<WebhookRecord>, cursor: u64) {
        let (stop, _) = watch::channel(false);
        self.readers.add(Reader::Webhook(record.id), &record.events, cursor);
        self.running().insert(record.id, Running { record, stop });
    }

    fn unregister(&self, id: WebhookId) -> bool {
        let known = self.running().remove(&id).is_some();
        self.readers.remove(Reader::Webhook(id));
        known
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
            self.unregister(id);
            return Err(e);
        }
        self.spawn(record.clone(), cursor);
        Ok(record)
    }

    /// Unsubscribes; false if there was no such webhook.
    pub async fn delete(&self, id: WebhookId) -> Result<bool, StoreError> {
        if !self.unregister(id) {
            return Ok(false);
        }
        self.writer.commit(stored::delete_webhook(id)).await?;
        Ok(true)
    }

    pub fn list(&self) -> Vec<(Arc<WebhookRecord>, u64)> {
        let records: Vec<_> = self.running().values().map(|r| r.record.clone()).collect();
        let mut v: Vec<_> = records.into_iter().filter_map(|r| Some((r.clone(), self.cursor(r.id)?))).collect();
        v.sort_by_key(|(r, _)| r.created_at);
        v
    }

    pub fn get(&self, id: WebhookId) -> Option<(Arc<WebhookRecord>, u64)> {
        let record = self.running().get(&id).map(|r| r.record.clone())?;
        Some((record, self.cursor(id)?))
    }

    fn cursor(&self, id: WebhookId) -> Option<u64> {
        self.readers.cursor(Reader::Webhook(id))
    }

    /// A delivery task took every event up to `cursor`.
    pub(super) fn advanced(&self, id: WebhookId, cursor: u64) {
        self.readers.advanced(Reader::Webhook(id), cursor);
    }
}

//! Webhook subscriptions: kept in the store, one delivery task each. Also owns what the
//! subscriptions imply for the rest of the server: which event kinds are appended at all
//! ([`Wanted`]) and how much of the outbox may be trimmed (below the slowest cursor).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::delivery::{self, DeliveryConfig};
use super::event::EventKind;
use crate::clock::UnixMs;
use crate::store::{Op, Store, StoreError, Writer};

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
    _stop: watch::Sender<bool>,
}

pub struct Webhooks {
    store: Store,
    writer: Writer,
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
        config: DeliveryConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Webhooks>, StoreError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .user_agent(concat!("nbhub/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StoreError::Rocks(format!("cannot build the webhook HTTP client: {e}")))?;
        let loaded = store.webhooks()?;
        let hooks = Arc::new(Webhooks {
            store,
            writer,
            config,
            client,
            shutdown,
            running: Mutex::new(HashMap::new()),
            trimmed: Mutex::new(0),
        });
        for (record, cursor) in loaded {
            hooks.run(Arc::new(record), cursor);
        }
        hooks.update_wanted();
        Ok(hooks)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<WebhookId, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(self: &Arc<Self>, record: Arc<WebhookRecord>, cursor: u64) {
        let (stop_tx, stop_rx) = watch::channel(false);
        self.running().insert(record.id, Running { record: record.clone(), cursor, _stop: stop_tx });
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

    fn update_wanted(&self) {
        let kinds: Vec<EventKind> = self.running().values().flat_map(|r| r.record.events.clone()).collect();
        self.writer.wanted().set(kinds);
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
        // Events from now on: the cursor starts at the last one committed.
        let cursor = *self.writer.events().borrow();
        self.writer
            .commit([Op::PutWebhook((*record).clone()), Op::WebhookCursor { webhook: id, delivered: cursor }])
            .await?;
        self.run(record.clone(), cursor);
        self.update_wanted();
        Ok(record)
    }

    /// Unsubscribes; false if there was no such webhook.
    pub async fn delete(&self, id: WebhookId) -> Result<bool, StoreError> {
        if self.running().remove(&id).is_none() {
            return Ok(false);
        }
        self.update_wanted();
        self.writer.commit([Op::DeleteWebhook(id)]).await?;
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
        let mut trimmed = self.trimmed.lock().unwrap_or_else(|p| p.into_inner());
        if below > *trimmed && (below - *trimmed >= TRIM_STEP || !subscribed) {
            *trimmed = below;
            self.writer.record([Op::TrimOutbox { below }]);
        }
    }
}

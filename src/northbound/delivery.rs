//! One webhook's delivery: reads the outbox after its cursor, POSTs each event it subscribed to
//! (signed when it has a secret), retries failures with exponential back-off up to a cap, and
//! moves the cursor only past events the subscriber accepted (2xx) — at least once, and a slow
//! or dead subscriber only ever delays itself.

use std::sync::Weak;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::watch;

use super::event::Stored;
use super::stored;
use super::webhooks::{WebhookRecord, Webhooks};
use crate::clock::UnixMs;
use crate::config::WebhooksConfig;
use crate::store::{Store, Writer};
use crate::telemetry::metric;

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Per attempt.
    pub timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Events older than this are given up on (counted), so a subscriber gone for good does not
    /// keep the outbox forever.
    pub max_age: Duration,
    /// Events in flight at once per subscriber.
    pub concurrency: usize,
}

impl From<&WebhooksConfig> for DeliveryConfig {
    fn from(c: &WebhooksConfig) -> DeliveryConfig {
        DeliveryConfig {
            timeout: Duration::from_millis(c.timeout_ms),
            initial_backoff: Duration::from_millis(c.initial_backoff_ms),
            max_backoff: Duration::from_millis(c.max_backoff_ms),
            max_age: Duration::from_secs(c.max_age_s),
            concurrency: c.concurrency,
        }
    }
}

pub const SIGNATURE_HEADER: &str = "X-Nbhub-Signature";

/// Outbox events read at a time (those of other kinds are skipped over in one read).
const READ_BATCH: usize = 256;

/// `sha256=<hex HMAC-SHA256 of the body>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub(super) struct Task {
    pub hook: std::sync::Arc<WebhookRecord>,
    pub cursor: u64,
    pub store: Store,
    pub writer: Writer,
    pub client: reqwest::Client,
    pub config: DeliveryConfig,
    pub hooks: Weak<Webhooks>,
}

enum Stopped {
    Stop,
}

impl Task {
    pub async fn run(mut self, mut deleted: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
        let mut committed = self.writer.events();
        loop {
            let (store, after) = (self.store.clone(), self.cursor);
            let (events, last) =
                match tokio::task::spawn_blocking(move || stored::events_after(&store, after, READ_BATCH)).await {
                    Ok(Ok(read)) => read,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot read the webhook outbox");
                        (Vec::new(), None)
                    }
                    Err(_) => return,
                };
            let Some(last) = last else {
                tokio::select! {
                    _ = deleted.changed() => return,
                    _ = shutdown.changed() => return,
                    changed = committed.changed() => if changed.is_err() { return },
                    // The outbox may have been read before the last batch's notification.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            };
            let wanted = events.into_iter().filter(|e| self.hook.events.contains(&e.kind));
            let mut sends = tokio::task::JoinSet::new();
            let mut stopped = false;
            for event in wanted {
                // At most `concurrency` in flight.
                while sends.len() >= self.config.concurrency {
                    stopped |= matches!(sends.join_next().await, Some(Ok(Err(Stopped::Stop)) | Err(_)));
                }
                let (client, hook, config) = (self.client.clone(), self.hook.clone(), self.config.clone());
                let (d, s) = (deleted.clone(), shutdown.clone());
                sends.spawn(async move { deliver(&client, &hook, &event, &config, d, s).await });
            }
            while let Some(r) = sends.join_next().await {
                stopped |= matches!(r, Ok(Err(Stopped::Stop)) | Err(_));
            }
            if stopped {
                return;
            }
            self.cursor = last;
            self.writer.record([stored::cursor(self.hook.id, last)]);
            match self.hooks.upgrade() {
                Some(hooks) => hooks.advanced(self.hook.id, last),
                None => return,
            }
        }
    }
}

/// POSTs one event until the subscriber takes it, it grows too old, or delivery stops.
async fn deliver(
    client: &reqwest::Client,
    hook: &WebhookRecord,
    event: &Stored,
    config: &DeliveryConfig,
    mut deleted: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Stopped> {
    let mut backoff = config.initial_backoff;
    loop {
        // A subscriber gone for long gets nothing older than it could still want.
        let age = Duration::from_millis(UnixMs::now().0.saturating_sub(event.time.0));
        if age > config.max_age {
            metrics::counter!(metric::WEBHOOK_DROPPED).increment(1);
            tracing::warn!(url = hook.url, event = event.id, "giving up on an event older than webhooks.max_age_s");
            return Ok(());
        }
        let mut request =
            client.post(&hook.url).header(reqwest::header::CONTENT_TYPE, "application/json").body(event.body.clone());
        if let Some(secret) = &hook.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, &event.body));
        }
        let outcome = match request.send().await {
            Ok(r) if r.status().is_success() => {
                metrics::counter!(metric::WEBHOOK_DELIVERIES, "result" => "ok").increment(1);
                return Ok(());
            }
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        metrics::counter!(metric::WEBHOOK_DELIVERIES, "result" => "failed").increment(1);
        tracing::debug!(url = hook.url, event = event.id, error = outcome, retry_in = ?backoff, "webhook delivery failed");
        tokio::select! {
            _ = deleted.changed() => return Err(Stopped::Stop),
            _ = shutdown.changed() => return Err(Stopped::Stop),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

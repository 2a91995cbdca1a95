//! The NATS JetStream outlet: every event is published to its subject ([`subject`]) with
//! `Nats-Msg-Id: <instance>:<event id>`, so an event published again after a crash, within the
//! stream's duplicate window, is stored once, and two instances' events never collide. Commands
//! come in as NATS requests on the command subject and are answered with the admin API's body
//! and a `Nbhub-Status` header carrying its HTTP status.
//!
//! [`subject`]: super::subject

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::event::Stored;
use super::inbound::AdminCommands;
use super::outlet::{Sink, Status};
use super::subject::{Engine, Names};
use crate::config::{NatsConfig, StreamRetention, StreamStorage};

pub const NAME: &str = "nats";
/// The header a command request's answer carries the admin API's status in.
pub const STATUS_HEADER: &str = "Nbhub-Status";

pub struct Nats {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    names: Names,
    instance: String,
    config: NatsConfig,
    /// The stream was found or created since the last failure to reach it.
    stream_ready: AtomicBool,
    status: Arc<Status>,
}

/// `url` without credentials, for logs and the admin API.
pub fn target(config: &NatsConfig) -> String {
    let servers: Vec<String> = config.url.split(',').map(|s| without_credentials(s.trim())).collect();
    format!("{} stream {}", servers.join(","), config.stream)
}

fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.rsplit_once('@').map_or(rest, |(_, host)| host)),
        None => url.rsplit_once('@').map_or(url, |(_, host)| host).to_string(),
    }
}

impl Nats {
    /// A client that connects (and reconnects) in the background: nbhub starts whether or not
    /// NATS is up, and events wait in the outbox until it is.
    pub async fn start(config: &NatsConfig, instance: &str, status: Arc<Status>) -> Result<Nats, String> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("nbhub {instance}"))
            .retry_on_initial_connect()
            .max_reconnects(None);
        if !config.user.is_empty() {
            options = options.user_and_password(config.user.clone(), config.password.clone());
        }
        if !config.token.is_empty() {
            options = options.token(config.token.clone());
        }
        if !config.credentials_file.as_os_str().is_empty() {
            options = options
                .credentials_file(&config.credentials_file)
                .await
                .map_err(|e| format!("nats.credentials_file {}: {e}", config.credentials_file.display()))?;
        }
        if !config.ca_file.as_os_str().is_empty() {
            options = options.add_root_certificates(config.ca_file.clone());
        }
        options = options.require_tls(config.tls_required);
        let servers: Vec<async_nats::ServerAddr> =
            config.url.split(',').filter_map(|s| s.trim().parse().ok()).collect();
        let client = options.connect(servers).await.map_err(|e| format!("nats: {e}"))?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(Duration::from_millis(config.ack_timeout_ms));
        Ok(Nats {
            client,
            jetstream,
            names: Names::new(Engine::Nats, &config.subject_prefix, instance),
            instance: instance.to_string(),
            config: config.clone(),
            stream_ready: AtomicBool::new(false),
            status,
        })
    }

    fn stream_config(&self) -> stream::Config {
        let c = &self.config;
        let subjects = match c.stream_subjects.is_empty() {
            true => Names::all_events(&c.subject_prefix),
            false => c.stream_subjects.clone(),
        };
        stream::Config {
            name: c.stream.clone(),
            subjects,
            retention: match c.retention {
                StreamRetention::Limits => stream::RetentionPolicy::Limits,
                StreamRetention::Interest => stream::RetentionPolicy::Interest,
                StreamRetention::Workqueue => stream::RetentionPolicy::WorkQueue,
            },
            storage: match c.storage {
                StreamStorage::File => stream::StorageType::File,
                StreamStorage::Memory => stream::StorageType::Memory,
            },
            num_replicas: c.replicas,
            max_age: Duration::from_secs(c.stream_max_age_s),
            duplicate_window: Duration::from_secs(c.duplicate_window_s),
            ..Default::default()
        }
    }

    /// Answers command requests until `shutdown`; each is handled by its own task.
    pub async fn serve_commands(self: Arc<Self>, admin: AdminCommands, mut shutdown: watch::Receiver<bool>) {
        let filter = self.names.commands();
        let mut requests = loop {
            match self.client.subscribe(filter.clone()).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(subject = filter, error = %e, "cannot subscribe to NATS commands; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        tracing::info!(subject = filter, "taking commands over NATS");
        loop {
            let request = tokio::select! {
                _ = shutdown.changed() => return,
                r = requests.next() => match r { Some(r) => r, None => return },
            };
            let Some((pk, dn)) = self.names.command_device(&request.subject) else { continue };
            let (nats, admin) = (self.clone(), admin.clone());
            tokio::spawn(async move {
                let answer = admin.create(NAME, &pk, &dn, request.payload).await;
                let Some(reply) = request.reply else { return };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(STATUS_HEADER, answer.status.to_string().as_str());
                if let Err(e) = nats.client.publish_with_headers(reply, headers, answer.body).await {
                    tracing::warn!(error = %e, "cannot answer a NATS command request");
                }
            });
        }
    }
}

impl Sink for Nats {
    async fn prepare(&self) -> Result<(), String> {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        self.status.set_connected(connected);
        if !connected {
            return Err(format!("not connected to {}", target(&self.config)));
        }
        if self.stream_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let found = match self.config.create_stream {
            true => {
                self.jetstream.get_or_create_stream(self.stream_config()).await.map(drop).map_err(|e| e.to_string())
            }
            false => self.jetstream.get_stream(&self.config.stream).await.map(drop).map_err(|e| e.to_string()),
        };
        found.map_err(|e| format!("stream {}: {e}", self.config.stream))?;
        self.stream_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn publish(&self, event: &Stored) -> Result<(), String> {
        if !self.stream_ready.load(Ordering::Relaxed) {
            self.prepare().await?;
        }
        let subject = self.names.event(&event.product_key, &event.device_name, event.kind);
        let message = jetstream::message::PublishMessage::build()
            .payload(event.body.clone())
            .message_id(format!("{}:{}", self.instance, event.id));
        let outcome = async {
            let ack = self.jetstream.send_publish(subject, message).await.map_err(|e| e.to_string())?;
            ack.await.map(drop).map_err(|e| e.to_string())
        };
        let outcome = outcome.await;
        if outcome.is_err() {
            // The stream may be gone (a memory stream after a restart of the server): look again.
            self.stream_ready.store(false, Ordering::Relaxed);
        }
        outcome
    }
}

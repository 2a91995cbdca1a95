//! The streaming outlets a configuration turns on (`[nats]`, `[mqtt]` with a `url`): counted
//! among the outbox's readers before anything can trim it, then started once the admin API they
//! take commands through exists.

use std::sync::Arc;

use tokio::sync::watch;

use super::event::EventKind;
use super::inbound::AdminCommands;
use super::mqtt::{self, Mqtt};
use super::nats::{self, Nats};
use super::outlet::{Outlet, Status};
use super::readers::{Reader, Readers};
use super::stored;
use crate::config::Config;
use crate::store::{Store, StoreError, Writer};

pub struct Outlets {
    config: Arc<Config>,
    store: Store,
    writer: Writer,
    readers: Arc<Readers>,
    nats: Option<Arc<Status>>,
    mqtt: Option<Arc<Status>>,
}

impl Outlets {
    /// Counts each configured outlet among the readers from where it stopped (from now, the first
    /// time), so the outbox keeps what it has not taken. Before any other reader starts.
    pub fn register(
        config: Arc<Config>,
        store: &Store,
        writer: &Writer,
        readers: &Arc<Readers>,
    ) -> Result<Outlets, StoreError> {
        let register = |name: &'static str, on: bool, target: String| -> Result<_, StoreError> {
            if !on {
                return Ok(None);
            }
            let cursor = match stored::outlet_cursor_of(store, name)? {
                Some(c) => c,
                None => {
                    let now = *writer.events().borrow();
                    writer.record([stored::outlet_cursor(name, now)]);
                    now
                }
            };
            readers.add(Reader::Outlet(name), &EventKind::ALL, cursor);
            Ok(Some(Status::new(name, target, writer)))
        };
        let nats = register(nats::NAME, !config.nats.url.is_empty(), nats::target(&config.nats))?;
        let mqtt = register(mqtt::NAME, !config.mqtt.url.is_empty(), mqtt::target(&config.mqtt))?;
        Ok(Outlets { store: store.clone(), writer: writer.clone(), readers: readers.clone(), config, nats, mqtt })
    }

    /// What the admin API shows.
    pub fn statuses(&self) -> Vec<Arc<Status>> {
        self.nats.iter().chain(&self.mqtt).cloned().collect()
    }

    /// Starts delivery, and commands in through `admin` where configured.
    pub async fn start(self, admin: AdminCommands, shutdown: watch::Receiver<bool>) -> Result<(), String> {
        let instance = self.config.cluster.name.as_str();
        if let Some(status) = &self.nats {
            let c = &self.config.nats;
            let sink = Arc::new(Nats::start(c, instance, status.clone()).await?);
            if c.commands {
                tokio::spawn(sink.clone().serve_commands(admin.clone(), shutdown.clone()));
            }
            tokio::spawn(self.outlet(sink, status, c.outlet()).run(shutdown.clone()));
            tracing::info!(target = status.target, "streaming events to NATS");
        }
        if let Some(status) = &self.mqtt {
            let c = &self.config.mqtt;
            let commands = c.commands.then(|| admin.clone());
            let sink = Mqtt::start(c, instance, status.clone(), commands, shutdown.clone())?;
            tokio::spawn(self.outlet(sink, status, c.outlet()).run(shutdown.clone()));
            tracing::info!(target = status.target, "streaming events to MQTT");
        }
        Ok(())
    }

    fn outlet<S>(&self, sink: Arc<S>, status: &Arc<Status>, config: crate::config::OutletConfig) -> Outlet<S> {
        Outlet {
            sink,
            status: status.clone(),
            store: self.store.clone(),
            writer: self.writer.clone(),
            readers: self.readers.clone(),
            config,
        }
    }
}

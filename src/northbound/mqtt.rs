//! The MQTT outlet: every event is published at QoS 1 to its topic ([`subject`]) and counts as
//! delivered on the broker's PUBACK. Commands come in on the command topic (subscribed at QoS 1,
//! acknowledged to the broker only once handled) and are answered, in the order they came, on
//! `<...>/command/answer` with the admin API's body.
//!
//! rumqttc reports which packet id each publish got (`Outgoing::Publish`) in the order they were
//! handed to it, and PUBACKs by packet id; one task owns the connection, hands it every publish
//! and keeps that correspondence. A lost connection fails every publish awaiting its PUBACK (the
//! outlet publishes them again) and the next connection starts from a fresh client, so nothing
//! is resent behind the outlet's back. The broker keeps nbhub's session (clean session off):
//! commands sent while nbhub is away wait there.
//!
//! [`subject`]: super::subject

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot, watch};

use super::event::Stored;
use super::inbound::AdminCommands;
use super::outlet::{Sink, Status};
use super::subject::{Engine, Names};
use crate::config::MqttConfig;

pub const NAME: &str = "mqtt";
const FIRST_RECONNECT: Duration = Duration::from_millis(200);
const LAST_RECONNECT: Duration = Duration::from_secs(10);
/// Events carry stored uplinks, base64 in JSON: far more than rumqttc's 10 KiB default.
const MAX_PACKET: usize = 1 << 20;

type Acked = oneshot::Sender<Result<(), String>>;

/// Something for the connection task to publish.
enum Job {
    /// An event, whose PUBACK is awaited.
    Event { topic: String, payload: bytes::Bytes, acked: Acked },
    /// A command's answer.
    Answer { topic: String, payload: bytes::Bytes },
}

pub struct Mqtt {
    jobs: mpsc::Sender<Job>,
    names: Names,
    status: Arc<Status>,
}

/// `url` without credentials, for logs and the admin API.
pub fn target(config: &MqttConfig) -> String {
    match url::Url::parse(&config.url) {
        Ok(u) => format!("{}://{}:{}", u.scheme(), u.host_str().unwrap_or(""), u.port().unwrap_or(default_port(&u))),
        Err(_) => String::new(),
    }
}

fn default_port(u: &url::Url) -> u16 {
    if tls(u) { 8883 } else { 1883 }
}

fn tls(u: &url::Url) -> bool {
    matches!(u.scheme(), "mqtts" | "ssl")
}

fn options(config: &MqttConfig, instance: &str) -> Result<MqttOptions, String> {
    let u = url::Url::parse(&config.url).map_err(|e| format!("mqtt.url: {e}"))?;
    let host = u.host_str().ok_or("mqtt.url has no host")?.to_string();
    let client_id = match config.client_id.is_empty() {
        true => format!("nbhub-{instance}"),
        false => config.client_id.clone(),
    };
    let mut o = MqttOptions::new(client_id, host, u.port().unwrap_or(default_port(&u)));
    o.set_keep_alive(Duration::from_secs(config.keep_alive_s))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(config.concurrency.min(u16::MAX as usize) as u16)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let (user, password) = match config.username.is_empty() {
        true => (u.username().to_string(), u.password().unwrap_or("").to_string()),
        false => (config.username.clone(), config.password.clone()),
    };
    if !user.is_empty() {
        o.set_credentials(user, password);
    }
    if tls(&u) {
        let tls = match config.ca_file.as_os_str().is_empty() {
            true => TlsConfiguration::Native,
            false => {
                let ca = std::fs::read(&config.ca_file)
                    .map_err(|e| format!("mqtt.ca_file {}: {e}", config.ca_file.display()))?;
                TlsConfiguration::SimpleNative { ca, client_auth: None }
            }
        };
        o.set_transport(Transport::tls_with_config(tls));
    }
    Ok(o)
}

impl Mqtt {
    /// Starts the connection task (it connects, and reconnects, in the background) and, with
    /// `commands`, takes commands in.
    pub fn start(
        config: &MqttConfig,
        instance: &str,
        status: Arc<Status>,
        commands: Option<AdminCommands>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Mqtt>, String> {
        let options = options(config, instance)?;
        let (jobs, queue) = mpsc::channel(config.concurrency + 64);
        let names = Names::new(Engine::Mqtt, &config.topic_prefix, instance);
        let commands = commands.map(|admin| {
            let (to_answer, taken) = mpsc::unbounded_channel();
            tokio::spawn(answer_commands(admin, names.clone(), jobs.clone(), taken));
            to_answer
        });
        let connection = Connection {
            options,
            capacity: config.concurrency + 64,
            names: names.clone(),
            status: status.clone(),
            commands,
        };
        tokio::spawn(connection.run(queue, shutdown));
        Ok(Arc::new(Mqtt { jobs, names, status }))
    }
}

impl Sink for Mqtt {
    async fn prepare(&self) -> Result<(), String> {
        match self.status.is_connected() {
            true => Ok(()),
            false => Err("not connected to the MQTT broker".into()),
        }
    }

    async fn publish(&self, event: &Stored) -> Result<(), String> {
        let topic = self.names.event(&event.product_key, &event.device_name, event.kind);
        let (acked, ack) = oneshot::channel();
        let job = Job::Event { topic, payload: event.body.clone(), acked };
        self.jobs.send(job).await.map_err(|_| "the MQTT connection task stopped".to_string())?;
        ack.await.unwrap_or_else(|_| Err("the MQTT connection task stopped".into()))
    }
}

struct Connection {
    options: MqttOptions,
    capacity: usize,
    names: Names,
    status: Arc<Status>,
    /// Where messages on the command topic go, with the client to acknowledge them on.
    commands: Option<mpsc::UnboundedSender<Command>>,
}

/// A message on the command topic, and the session it came on (its PUBACK goes there).
type Command = (AsyncClient, rumqttc::Publish);

/// One connection's publishes: handed over and waiting for a packet id, then for their PUBACK.
#[derive(Default)]
struct Pending {
    /// In the order handed to rumqttc; None for an answer nobody waits on.
    unnumbered: VecDeque<Option<Acked>>,
    by_packet: HashMap<u16, Acked>,
}

impl Pending {
    fn fail(&mut self, why: &str) {
        for acked in self.unnumbered.drain(..).flatten().chain(self.by_packet.drain().map(|(_, a)| a)) {
            let _ = acked.send(Err(why.to_string()));
        }
    }
}

impl Connection {
    async fn run(self, mut queue: mpsc::Receiver<Job>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = FIRST_RECONNECT;
        loop {
            let (client, mut eventloop) = AsyncClient::new(self.options.clone(), self.capacity);
            // Without it each PUBACK-awaited publish waits out Nagle and the broker's delayed ACK.
            let mut network = rumqttc::NetworkOptions::new();
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            let outcome = self.session(&client, eventloop, &mut queue, &mut shutdown).await;
            self.status.set_connected(false);
            match outcome {
                Session::Stopped => {
                    let _ = client.try_disconnect();
                    return;
                }
                Session::Lost { was_up } => {
                    if was_up {
                        backoff = FIRST_RECONNECT;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(LAST_RECONNECT);
        }
    }

    async fn session(
        &self,
        client: &AsyncClient,
        mut eventloop: EventLoop,
        queue: &mut mpsc::Receiver<Job>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Session {
        let mut pending = Pending::default();
        let mut up = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    pending.fail("nbhub is stopping");
                    return Session::Stopped;
                }
                job = queue.recv(), if up => {
                    let Some(job) = job else { return Session::Stopped };
                    let (topic, payload, acked) = match job {
                        Job::Event { topic, payload, acked } => (topic, payload, Some(acked)),
                        Job::Answer { topic, payload } => (topic, payload, None),
                    };
                    match client.try_publish(topic, QoS::AtLeastOnce, false, payload.to_vec()) {
                        Ok(()) => pending.unnumbered.push_back(acked),
                        Err(e) => if let Some(a) = acked { let _ = a.send(Err(e.to_string())); },
                    }
                }
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        up = true;
                        self.status.set_connected(true);
                        tracing::info!(target = self.status.target, "connected to the MQTT broker");
                        if self.commands.is_some() {
                            let _ = client.try_subscribe(self.names.commands(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(packet))) => {
                        if let Some(Some(acked)) = pending.unnumbered.pop_front() {
                            pending.by_packet.insert(packet, acked);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(acked) = pending.by_packet.remove(&ack.pkid) {
                            let _ = acked.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(command))) => {
                        if let Some(commands) = &self.commands {
                            let _ = commands.send((client.clone(), command));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let why = format!("MQTT connection: {e}");
                        tracing::warn!(target = self.status.target, error = %e, "MQTT connection lost");
                        self.status.failed(why.clone());
                        pending.fail(&why);
                        return Session::Lost { was_up: up };
                    }
                },
            }
        }
    }
}

/// Handles commands one at a time, so their answers keep their order: each by the admin API,
/// answered, then acknowledged to the broker (which delivers it again if nbhub stops first). The
/// broker's own in-flight window bounds how many wait here.
async fn answer_commands(
    admin: AdminCommands,
    names: Names,
    jobs: mpsc::Sender<Job>,
    mut taken: mpsc::UnboundedReceiver<Command>,
) {
    while let Some((client, message)) = taken.recv().await {
        let device = names.command_device(&message.topic);
        if let Some((pk, dn)) = device {
            let answer = admin.create(NAME, &pk, &dn, message.payload.clone()).await;
            let _ = jobs.send(Job::Answer { topic: names.answer(&pk, &dn), payload: answer.body }).await;
        }
        let _ = client.ack(&message).await;
    }
}

enum Session {
    Stopped,
    Lost { was_up: bool },
}

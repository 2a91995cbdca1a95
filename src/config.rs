//! Typed configuration: the embedded default TOML, optionally overlaid by a file, then by NBHUB_*
//! environment variables, then validated. Every failure names the key at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

use crate::identity::InstanceName;
use crate::store::{MemoryBudget, SyncPolicy};
use crate::telemetry::LogFormat;

/// The embedded default configuration; `nbhub serve` with no arguments runs on exactly this.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub log: String,
    pub log_format: LogFormat,
    pub admin: AdminConfig,
    pub coap: CoapConfig,
    pub aes: AesConfig,
    pub dtls: DtlsConfig,
    pub auth: AuthConfig,
    pub device: DeviceConfig,
    pub downlink: DownlinkConfig,
    pub ota: OtaConfig,
    pub webhooks: WebhooksConfig,
    pub nats: NatsConfig,
    pub mqtt: MqttConfig,
    pub codec: CodecConfig,
    pub store: StoreConfig,
    pub cluster: ClusterConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: String,
    pub max_body_bytes: usize,
    /// Serves `POST /api/v1/clock/advance`, which moves the server's wall clock forward (tests
    /// of awake windows and expiries). Never on in production.
    pub clock_control: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoapConfig {
    pub listen: SocketAddr,
    pub max_payload: usize,
    pub sockets_per_port: usize,
    pub dedup_capacity: usize,
    pub exchange_lifetime_s: u64,
    pub ack_timeout_ms: u64,
    pub max_retransmit: u32,
    pub max_pending_writes: usize,
    pub max_outgoing: usize,
}

impl CoapConfig {
    pub fn exchange_lifetime(&self) -> Duration {
        Duration::from_secs(self.exchange_lifetime_s)
    }
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AesConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DtlsConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain (leaf first) and private key of the ECDSA (P-256) certificate, and of
    /// the RSA one the legacy suites need; each pair empty to go without.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub rsa_cert: PathBuf,
    pub rsa_key: PathBuf,
    /// OpenSSL cipher string restricting the suites; empty for all nbhub implements.
    pub ciphers: String,
    pub max_handshakes: usize,
    /// Of `max_handshakes`, how many one source address, and one source prefix, may hold.
    pub max_handshakes_per_address: usize,
    pub max_handshakes_per_prefix: usize,
    /// Leading bits that name a source's prefix, for IPv4 and IPv6 sources.
    pub ipv4_prefix_len: u8,
    pub ipv6_prefix_len: u8,
    pub max_sessions: usize,
    pub handshake_timeout_s: u64,
    pub idle_timeout_s: u64,
    pub mtu: u32,
    /// Bytes of the Connection IDs handed out (RFC 9146); 0 for none.
    pub cid_length: usize,
    /// Established sessions are kept in the store and restored at start.
    pub durable_sessions: bool,
}

/// `dtls.cid_length` bounds: below 4 bytes a CID is guessable by trying; 16 is plenty and keeps
/// a CID inline in the session tables.
pub const MIN_CID_LEN: usize = 4;
pub const MAX_CID_LEN: usize = 16;

impl DtlsConfig {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_s)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }
    /// The configured (certificate, key) pairs, with the config keys that name them.
    pub fn certificates(&self) -> impl Iterator<Item = (&'static str, &Path, &Path)> {
        [("dtls.cert", &self.cert, &self.key), ("dtls.rsa_cert", &self.rsa_cert, &self.rsa_key)]
            .into_iter()
            .filter(|(_, c, _)| !c.as_os_str().is_empty())
            .map(|(name, c, k)| (name, c.as_path(), k.as_path()))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub token_ttl_s: u64,
    pub token_grace_s: u64,
    pub replay_window: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub online_within_s: u64,
    pub abnormal_within_s: u64,
    pub max_per_second: u32,
    pub max_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkConfig {
    pub max_pending: usize,
    pub default_expire_s: u64,
    pub ack_timeout_ms: u64,
    pub max_retransmit: u32,
    pub timeout_s: u64,
    pub default_topic: String,
}

impl DownlinkConfig {
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_s * 1000
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaConfig {
    pub online_timeout_s: u64,
    pub query_timeout_s: u64,
    pub radio_timeout_s: u64,
    pub download_timeout_s: u64,
    pub upgrade_timeout_s: u64,
    pub resend_s: u64,
    pub tick_ms: u64,
    pub max_task_devices: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    pub timeout_ms: u64,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub max_age_s: u64,
    pub concurrency: usize,
}

/// Streaming every event to NATS JetStream, and commands in by NATS request (README "Streaming to
/// your platform"). Off while `url` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    pub subject_prefix: String,
    pub stream: String,
    pub create_stream: bool,
    /// The stream's subjects when nbhub creates it; empty: every event kind of every instance.
    pub stream_subjects: Vec<String>,
    pub retention: StreamRetention,
    pub replicas: usize,
    pub storage: StreamStorage,
    pub stream_max_age_s: u64,
    pub duplicate_window_s: u64,
    pub user: String,
    pub password: String,
    pub token: String,
    pub credentials_file: PathBuf,
    pub ca_file: PathBuf,
    pub tls_required: bool,
    /// Events not acknowledged within this are given up (counted).
    pub max_age_s: u64,
    /// Events in flight at once.
    pub concurrency: usize,
    /// How long one publish waits for its acknowledgement.
    pub ack_timeout_ms: u64,
    /// Whether commands are taken in through the engine.
    pub commands: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamRetention {
    Limits,
    Interest,
    Workqueue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStorage {
    File,
    Memory,
}

/// Streaming every event to an MQTT 3.1.1/5 broker at QoS 1, and commands in from a subscribed
/// topic. Off while `url` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    pub topic_prefix: String,
    /// Empty: `nbhub-<cluster.name>`.
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub ca_file: PathBuf,
    pub keep_alive_s: u64,
    /// Events not acknowledged within this are given up (counted).
    pub max_age_s: u64,
    /// Events in flight at once.
    pub concurrency: usize,
    /// How long one publish waits for its acknowledgement.
    pub ack_timeout_ms: u64,
    /// Whether commands are taken in through the engine.
    pub commands: bool,
}

impl NatsConfig {
    pub fn outlet(&self) -> OutletConfig {
        OutletConfig::of(self.max_age_s, self.concurrency, self.ack_timeout_ms, self.commands)
    }
}

impl MqttConfig {
    pub fn outlet(&self) -> OutletConfig {
        OutletConfig::of(self.max_age_s, self.concurrency, self.ack_timeout_ms, self.commands)
    }
}

/// What both streaming outlets share.
#[derive(Debug, Clone)]
pub struct OutletConfig {
    pub max_age: Duration,
    pub concurrency: usize,
    pub ack_timeout: Duration,
    pub commands: bool,
}

impl OutletConfig {
    fn of(max_age_s: u64, concurrency: usize, ack_timeout_ms: u64, commands: bool) -> OutletConfig {
        let (max_age, ack_timeout) = (Duration::from_secs(max_age_s), Duration::from_millis(ack_timeout_ms));
        OutletConfig { max_age, concurrency, ack_timeout, commands }
    }
}

/// Payload codec scripts: how many threads run them and what one call may spend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    pub workers: usize,
    pub call_timeout_ms: u64,
    pub memory_mb: usize,
    pub stack_kb: usize,
}

/// This instance among its peers, for bootstrap and distribution (SPEC §10).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: InstanceName,
    /// The host devices are told to reach this instance at; empty: the CoAP listener's address.
    pub host: String,
    pub peers: Vec<PeerConfig>,
    pub nearest: Vec<NearestRule>,
    pub retry_after_s: u32,
    pub import_chunk: usize,
    pub request_timeout_ms: u64,
    pub poll_s: u64,
}

/// Another nbhub instance: where its devices connect, and its admin API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: InstanceName,
    pub host: String,
    #[serde(default = "default_coap_port")]
    pub coap_port: u16,
    #[serde(default = "default_aes_port")]
    pub aes_port: u16,
    #[serde(default = "default_dtls_port")]
    pub dtls_port: u16,
    pub admin_url: String,
    pub token: String,
}

fn default_coap_port() -> u16 {
    5683
}
fn default_aes_port() -> u16 {
    5682
}
fn default_dtls_port() -> u16 {
    5684
}

/// Devices whose source address is within `cidr` are nearest to `instance`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NearestRule {
    pub cidr: String,
    pub instance: InstanceName,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub sync: SyncPolicy,
    pub max_batch: usize,
    pub message_retention_s: u64,
    /// RocksDB's memory in MiB: one block cache of this size, which the memtables are charged
    /// to as well (see [`MemoryBudget`]).
    pub memory_mb: usize,
    /// Hex; empty when secrets are stored as given.
    pub secrets_key: String,
}

impl StoreConfig {
    /// The key secrets are sealed with at rest, if one is set.
    pub fn secrets_key(&self) -> Option<[u8; 32]> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(&self.secrets_key, &mut key).ok().map(|_| key)
    }

    pub fn memory(&self) -> MemoryBudget {
        MemoryBudget::of(self.memory_mb << 20)
    }

    pub fn message_retention(&self) -> Option<Duration> {
        (self.message_retention_s > 0).then(|| Duration::from_secs(self.message_retention_s))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Syntax { path: PathBuf, source: toml::de::Error },
    #[error("config file {path}: unknown key `{key}`")]
    UnknownKey { path: PathBuf, key: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// The embedded defaults, overlaid by `file` when given, then by the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: Table = DEFAULT_TOML.parse().expect("embedded default config is valid TOML");
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
            let overlay: Table = text.parse().map_err(|source| ConfigError::Syntax { path: path.into(), source })?;
            overlay_table(&mut table, overlay, "").map_err(|key| ConfigError::UnknownKey { path: path.into(), key })?;
        }
        apply_env(&mut table, env)?;
        let config: Config =
            Config::deserialize(Value::Table(table)).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir must not be empty".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
            return bad(format!("log = {:?} is not a valid tracing filter", self.log));
        }
        if !(16..=65000).contains(&self.coap.max_payload) {
            return bad(format!("coap.max_payload = {} must be within 16..=65000", self.coap.max_payload));
        }
        if !(1..=64).contains(&self.coap.sockets_per_port) {
            return bad(format!("coap.sockets_per_port = {} must be within 1..=64", self.coap.sockets_per_port));
        }
        if self.coap.dedup_capacity < 1 {
            return bad("coap.dedup_capacity must be at least 1".into());
        }
        if self.coap.ack_timeout_ms < 100 {
            return bad(format!("coap.ack_timeout_ms = {} must be at least 100", self.coap.ack_timeout_ms));
        }
        if self.coap.max_retransmit > 20 {
            return bad(format!("coap.max_retransmit = {} must be at most 20", self.coap.max_retransmit));
        }
        if self.coap.max_outgoing < 1 {
            return bad("coap.max_outgoing must be at least 1".into());
        }
        if self.coap.max_pending_writes < 1 {
            return bad("coap.max_pending_writes must be at least 1".into());
        }
        let d = &self.dtls;
        for (cert, key, names) in
            [(&d.cert, &d.key, "dtls.cert and dtls.key"), (&d.rsa_cert, &d.rsa_key, "dtls.rsa_cert and dtls.rsa_key")]
        {
            if cert.as_os_str().is_empty() != key.as_os_str().is_empty() {
                return bad(format!("{names} must both be set or both be empty"));
            }
        }
        if d.max_handshakes < 1 || d.max_sessions < 1 {
            return bad("dtls.max_handshakes and dtls.max_sessions must be at least 1".into());
        }
        if d.max_handshakes_per_address < 1 {
            return bad("dtls.max_handshakes_per_address must be at least 1".into());
        }
        if d.max_handshakes_per_prefix < d.max_handshakes_per_address {
            return bad(format!(
                "dtls.max_handshakes_per_prefix = {} must be at least dtls.max_handshakes_per_address = {}",
                d.max_handshakes_per_prefix, d.max_handshakes_per_address
            ));
        }
        if !(1..=32).contains(&d.ipv4_prefix_len) {
            return bad(format!("dtls.ipv4_prefix_len = {} must be within 1..=32", d.ipv4_prefix_len));
        }
        if !(1..=128).contains(&d.ipv6_prefix_len) {
            return bad(format!("dtls.ipv6_prefix_len = {} must be within 1..=128", d.ipv6_prefix_len));
        }
        if !(1..=600).contains(&d.handshake_timeout_s) {
            return bad(format!("dtls.handshake_timeout_s = {} must be within 1..=600", d.handshake_timeout_s));
        }
        if d.idle_timeout_s < 1 {
            return bad("dtls.idle_timeout_s must be at least 1".into());
        }
        if !(256..=9000).contains(&d.mtu) {
            return bad(format!("dtls.mtu = {} must be within 256..=9000", d.mtu));
        }
        let (min, max) = (MIN_CID_LEN, MAX_CID_LEN);
        if d.cid_length != 0 && !(min..=max).contains(&d.cid_length) {
            return bad(format!("dtls.cid_length = {} must be 0 (no CIDs) or within {min}..={max}", d.cid_length));
        }
        let w = self.auth.replay_window;
        if w == 0 || !w.is_multiple_of(64) || w > 65536 {
            return bad(format!("auth.replay_window = {w} must be a multiple of 64 within 64..=65536"));
        }
        if self.auth.token_ttl_s == 0 {
            return bad("auth.token_ttl_s must be positive".into());
        }
        if self.device.online_within_s == 0 || self.device.abnormal_within_s <= self.device.online_within_s {
            return bad("device.abnormal_within_s must be greater than device.online_within_s > 0".into());
        }
        if self.device.max_per_second == 0 || self.device.max_per_minute == 0 {
            return bad("device.max_per_second and device.max_per_minute must be positive".into());
        }
        let dl = &self.downlink;
        if !(1..=1000).contains(&dl.max_pending) {
            return bad(format!("downlink.max_pending = {} must be within 1..=1000", dl.max_pending));
        }
        if dl.default_expire_s == 0 {
            return bad("downlink.default_expire_s must be positive".into());
        }
        if dl.ack_timeout_ms < 100 || dl.max_retransmit > 20 {
            return bad("downlink.ack_timeout_ms must be at least 100 and downlink.max_retransmit at most 20".into());
        }
        if !(1..=86_400).contains(&dl.timeout_s) {
            return bad(format!("downlink.timeout_s = {} must be within 1..=86400", dl.timeout_s));
        }
        if !dl.default_topic.starts_with('/') {
            return bad(format!("downlink.default_topic = {:?} must start with /", dl.default_topic));
        }
        let w = &self.webhooks;
        if w.timeout_ms < 100 || w.initial_backoff_ms < 10 || w.max_backoff_ms < w.initial_backoff_ms {
            return bad(
                "webhooks: timeout_ms >= 100, initial_backoff_ms >= 10 and max_backoff_ms >= initial_backoff_ms".into(),
            );
        }
        if w.max_age_s == 0 || !(1..=256).contains(&w.concurrency) {
            return bad("webhooks.max_age_s must be positive and webhooks.concurrency within 1..=256".into());
        }
        self.validate_streaming()?;
        let c = &self.codec;
        if !(1..=64).contains(&c.workers) || !(1..=10_000).contains(&c.call_timeout_ms) {
            return bad("codec.workers must be within 1..=64 and codec.call_timeout_ms within 1..=10000".into());
        }
        if !(1..=1024).contains(&c.memory_mb) || !(64..=8192).contains(&c.stack_kb) {
            return bad("codec.memory_mb must be within 1..=1024 and codec.stack_kb within 64..=8192".into());
        }
        let o = &self.ota;
        let timeouts = [
            ("online_timeout_s", o.online_timeout_s),
            ("query_timeout_s", o.query_timeout_s),
            ("radio_timeout_s", o.radio_timeout_s),
            ("download_timeout_s", o.download_timeout_s),
            ("upgrade_timeout_s", o.upgrade_timeout_s),
            ("resend_s", o.resend_s),
        ];
        if let Some((key, v)) = timeouts.iter().find(|(_, v)| !(1..=30 * 86_400).contains(v)) {
            return bad(format!("ota.{key} = {v} must be within 1..=2592000 seconds"));
        }
        if !(10..=60_000).contains(&o.tick_ms) || !(1..=1_000_000).contains(&o.max_task_devices) {
            return bad("ota.tick_ms must be within 10..=60000 and ota.max_task_devices within 1..=1000000".into());
        }
        if !self.store.secrets_key.is_empty() && self.store.secrets_key().is_none() {
            // The value itself is not repeated: it is a key.
            return bad("store.secrets_key must be 64 hex characters (32 bytes), or empty".into());
        }
        if !(8..=65_536).contains(&self.store.memory_mb) {
            return bad(format!("store.memory_mb = {} must be within 8..=65536", self.store.memory_mb));
        }
        if !(1..=1_000_000).contains(&self.store.max_batch) {
            return bad(format!("store.max_batch = {} must be within 1..=1000000", self.store.max_batch));
        }
        self.validate_cluster()
    }

    fn validate_streaming(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        // Levels named as instances are: letters, digits, `_` and `-`.
        let prefix_ok =
            |p: &str, sep: char| p.len() <= 64 && p.split(sep).all(|l| crate::identity::name_chars(l, 1, 64, b"_-"));
        let outlets = [
            ("nats", self.nats.max_age_s, self.nats.concurrency, self.nats.ack_timeout_ms),
            ("mqtt", self.mqtt.max_age_s, self.mqtt.concurrency, self.mqtt.ack_timeout_ms),
        ];
        for (section, max_age_s, concurrency, ack_timeout_ms) in outlets {
            if max_age_s == 0 || !(1..=4096).contains(&concurrency) || !(100..=600_000).contains(&ack_timeout_ms) {
                return bad(format!(
                    "{section}: max_age_s must be positive, concurrency within 1..=4096 and ack_timeout_ms within 100..=600000"
                ));
            }
        }
        let n = &self.nats;
        if !n.url.is_empty() {
            for addr in n.url.split(',') {
                if addr.trim().parse::<async_nats::ServerAddr>().is_err() {
                    return bad(format!("nats.url: {addr:?} is not a NATS server address (nats://host:port)"));
                }
            }
        }
        if !prefix_ok(&n.subject_prefix, '.') {
            return bad(format!(
                "nats.subject_prefix = {:?} must be .-separated levels of A-Z a-z 0-9 _ -",
                n.subject_prefix
            ));
        }
        if !crate::identity::name_chars(&n.stream, 1, 64, b"_-") {
            return bad(format!("nats.stream = {:?} must be 1 to 64 characters of A-Z a-z 0-9 _ -", n.stream));
        }
        if !(1..=5).contains(&n.replicas) || n.stream_max_age_s == 0 || n.duplicate_window_s == 0 {
            return bad("nats: replicas must be within 1..=5, stream_max_age_s and duplicate_window_s positive".into());
        }
        if n.duplicate_window_s > n.stream_max_age_s {
            return bad("nats.duplicate_window_s must not exceed nats.stream_max_age_s".into());
        }
        if let Some(s) = n.stream_subjects.iter().find(|s| s.is_empty() || s.contains(char::is_whitespace)) {
            return bad(format!("nats.stream_subjects: {s:?} is not a subject"));
        }
        let m = &self.mqtt;
        if !m.url.is_empty() {
            let ok = url::Url::parse(&m.url)
                .is_ok_and(|u| matches!(u.scheme(), "mqtt" | "mqtts" | "tcp" | "ssl") && u.host_str().is_some());
            if !ok {
                return bad(format!("mqtt.url = {:?} must be mqtt://host:port or mqtts://host:port", m.url));
            }
        }
        if !prefix_ok(&m.topic_prefix, '/') {
            return bad(format!(
                "mqtt.topic_prefix = {:?} must be /-separated levels of A-Z a-z 0-9 _ -",
                m.topic_prefix
            ));
        }
        if m.client_id.len() > 64 || m.keep_alive_s == 0 || m.keep_alive_s > 3600 {
            return bad("mqtt: client_id at most 64 bytes, keep_alive_s within 1..=3600".into());
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let c = &self.cluster;
        let mut names = vec![&c.name];
        for (i, p) in c.peers.iter().enumerate() {
            if names.contains(&&p.name) {
                return bad(format!("cluster.peers[{i}].name = {:?} is used twice (or is this instance's)", p.name));
            }
            names.push(&p.name);
            if p.host.is_empty() || p.coap_port == 0 || p.aes_port == 0 || p.dtls_port == 0 {
                return bad(format!("cluster.peers[{i}] ({}): host and ports must be set", p.name));
            }
            if !(p.admin_url.starts_with("http://") || p.admin_url.starts_with("https://")) {
                return bad(format!("cluster.peers[{i}].admin_url = {:?} must be an http(s) URL", p.admin_url));
            }
        }
        for (i, rule) in c.nearest.iter().enumerate() {
            if let Err(e) = crate::net::Cidr::parse(&rule.cidr) {
                return bad(format!("cluster.nearest[{i}].cidr = {:?}: {e}", rule.cidr));
            }
            if !names.contains(&&rule.instance) {
                return bad(format!(
                    "cluster.nearest[{i}].instance = {:?} is neither this instance nor a peer",
                    rule.instance
                ));
            }
        }
        if !(1..=3600).contains(&c.retry_after_s) || !(1..=1000).contains(&c.import_chunk) {
            return bad("cluster.retry_after_s must be within 1..=3600 and cluster.import_chunk within 1..=1000".into());
        }
        if c.request_timeout_ms < 100 || !(1..=3600).contains(&c.poll_s) {
            return bad("cluster.request_timeout_ms must be at least 100 and cluster.poll_s within 1..=3600".into());
        }
        Ok(())
    }
}

/// Overlays `overlay` onto `base`; every key must already exist in `base` (the defaults name every
/// key), so a typo is an error and not silently ignored. Returns the offending dotted key.
fn overlay_table(base: &mut Table, overlay: Table, prefix: &str) -> Result<(), String> {
    for (key, value) in overlay {
        let dotted = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => overlay_table(b, o, &dotted)?,
            (Some(slot), value) => *slot = value,
            (None, _) => return Err(dotted),
        }
    }
    Ok(())
}

/// `NBHUB_<KEY>` sets a top-level key, `NBHUB_<SECTION>_<KEY>` a key of a section. Values are read
/// as the type the default has, so `NBHUB_COAP_MAX_PAYLOAD=2048` is an integer.
fn apply_env(table: &mut Table, env: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
    for (var, raw) in env {
        let Some(name) = var.strip_prefix("NBHUB_") else { continue };
        let name = name.to_ascii_lowercase();
        let slot = locate(table, &name);
        let Some(slot) = slot else {
            // Variables for the CLI (NBHUB_ADMIN_URL) share the prefix; they are not config keys.
            continue;
        };
        *slot = typed_like(slot, &raw).map_err(|message| ConfigError::Env { var: var.clone(), message })?;
    }
    Ok(())
}

fn locate<'a>(table: &'a mut Table, name: &str) -> Option<&'a mut Value> {
    if matches!(table.get(name), Some(v) if !v.is_table()) {
        return table.get_mut(name);
    }
    let (section, key) = table.iter().filter(|(_, v)| v.is_table()).find_map(|(section, v)| {
        let key = name.strip_prefix(section.as_str())?.strip_prefix('_')?;
        v.as_table()?.contains_key(key).then(|| (section.clone(), key.to_string()))
    })?;
    table.get_mut(&section)?.as_table_mut()?.get_mut(&key)
}

fn typed_like(current: &Value, raw: &str) -> Result<Value, String> {
    Ok(match current {
        Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| format!("{raw:?} is not an integer"))?),
        Value::Float(_) => Value::Float(raw.trim().parse().map_err(|_| format!("{raw:?} is not a number"))?),
        Value::Boolean(_) => Value::Boolean(raw.trim().parse().map_err(|_| format!("{raw:?} is not true or false"))?),
        // A TOML array, e.g. NBHUB_CLUSTER_PEERS='[{name = "b", host = "10.0.0.2", ...}]'.
        Value::Array(_) => format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(Value::is_array)
            .ok_or_else(|| format!("{raw:?} is not a TOML array"))?,
        _ => Value::String(raw.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_the_documented_ports() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c.coap.listen.port(), 5683);
        assert_eq!(c.aes.listen.port(), 5682);
        assert_eq!(c.dtls.listen.port(), 5684);
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.store.sync, SyncPolicy::Fsync);
    }

    #[test]
    fn env_overrides_use_the_spec_names() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("NBHUB_DATA_DIR", "/tmp/x"),
                ("NBHUB_ADMIN_LISTEN", "127.0.0.1:9"),
                ("NBHUB_ADMIN_TOKEN", "t"),
                ("NBHUB_COAP_LISTEN", "127.0.0.1:1"),
                ("NBHUB_AES_LISTEN", "127.0.0.1:2"),
                ("NBHUB_LOG", "debug"),
                ("NBHUB_COAP_MAX_PAYLOAD", "2048"),
                ("NBHUB_STORE_SYNC", "wal"),
                ("NBHUB_ADMIN_URL", "ignored: a CLI variable"),
            ]),
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.admin.listen.port(), 9);
        assert_eq!(c.admin.token, "t");
        assert_eq!(c.coap.listen.port(), 1);
        assert_eq!(c.aes.listen.port(), 2);
        assert_eq!(c.log, "debug");
        assert_eq!(c.coap.max_payload, 2048);
        assert_eq!(c.store.sync, SyncPolicy::Wal);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::load_with_env(None, env(&[("NBHUB_COAP_MAX_PAYLOAD", "lots")])).unwrap_err();
        assert!(e.to_string().contains("NBHUB_COAP_MAX_PAYLOAD"), "{e}");
        let e = Config::load_with_env(None, env(&[("NBHUB_AUTH_REPLAY_WINDOW", "100")])).unwrap_err();
        assert!(e.to_string().contains("auth.replay_window"), "{e}");
        let e = Config::load_with_env(None, env(&[("NBHUB_ADMIN_LISTEN", "nowhere")])).unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        for (var, key) in [
            ("NBHUB_NATS_URL", "nats.url"),
            ("NBHUB_NATS_SUBJECT_PREFIX", "nats.subject_prefix"),
            ("NBHUB_NATS_STREAM", "nats.stream"),
            ("NBHUB_MQTT_URL", "mqtt.url"),
            ("NBHUB_MQTT_TOPIC_PREFIX", "mqtt.topic_prefix"),
        ] {
            let e = Config::load_with_env(None, env(&[(var, "not a.valid//one")])).unwrap_err();
            assert!(e.to_string().contains(key), "{var}: {e}");
        }
        let c = Config::load_with_env(None, env(&[("NBHUB_NATS_URL", "nats://a:4222,tls://b:4222")])).unwrap();
        assert_eq!(c.nats.outlet().concurrency, 1024);
    }

    #[test]
    fn file_overlay_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[coap]\nmax_paylod = 5\n").unwrap();
        let e = Config::load_with_env(Some(&path), env(&[])).unwrap_err();
        assert!(e.to_string().contains("coap.max_paylod"), "{e}");
        std::fs::write(&path, "[coap]\nmax_payload = 512\n").unwrap();
        assert_eq!(Config::load_with_env(Some(&path), env(&[])).unwrap().coap.max_payload, 512);
    }

    #[test]
    fn peers_and_prefixes_come_from_the_environment_and_are_checked() {
        let peer = r#"[{ name = "b", host = "10.0.0.2", admin_url = "http://10.0.0.2:8080", token = "t" }]"#;
        let nearest = r#"[{ cidr = "10.1.0.0/16", instance = "b" }]"#;
        let c = Config::load_with_env(
            None,
            env(&[("NBHUB_CLUSTER_NAME", "a"), ("NBHUB_CLUSTER_PEERS", peer), ("NBHUB_CLUSTER_NEAREST", nearest)]),
        )
        .unwrap();
        assert_eq!((c.cluster.peers[0].name.as_str(), c.cluster.peers[0].dtls_port), ("b", 5684));
        assert_eq!(c.cluster.nearest[0].cidr, "10.1.0.0/16");
        let refused = |vars: &[(&str, &str)]| Config::load_with_env(None, env(vars)).unwrap_err().to_string();
        assert!(refused(&[("NBHUB_CLUSTER_PEERS", "{ name = 1 }")]).contains("NBHUB_CLUSTER_PEERS"));
        let unknown = r#"[{ cidr = "10.1.0.0/16", instance = "z" }]"#;
        assert!(refused(&[("NBHUB_CLUSTER_NEAREST", unknown)]).contains("\"z\" is neither"));
        let host_bits = r#"[{ cidr = "10.1.0.1/16", instance = "local" }]"#;
        assert!(refused(&[("NBHUB_CLUSTER_NEAREST", host_bits)]).contains("10.1.0.0/16"));
        let twice = format!("[{0}, {0}]", &peer[1..peer.len() - 1]);
        assert!(refused(&[("NBHUB_CLUSTER_PEERS", &twice)]).contains("used twice"));
    }
}

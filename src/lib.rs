//! nbhub: a CoAP ingestion server for sleepy cellular devices. This file wires the parts together
//! (store, registry, listeners, admin API) and knows nothing of any protocol.

pub mod admin;
pub mod auth;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod coap;
pub mod codec;
pub mod config;
pub mod dialect;
pub mod downlink;
pub mod dtls;
pub mod identity;
pub mod ingest;
pub mod net;
pub mod northbound;
pub mod ota;
pub mod registry;
pub mod shadow;
pub mod simulate;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod transport;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use coap::endpoint::{Endpoint, EndpointConfig};
use config::Config;
use dialect::DeviceFacing;
use net::PortFamily;
use registry::{Registry, Route};
use store::{Store, StoreError, WriterThread};

/// File in the data directory naming the bound addresses (useful with port 0).
pub const ENDPOINTS_FILE: &str = "endpoints.json";
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dtls(#[from] dtls::SetupError),
    #[error("streaming outlet: {0}")]
    Outlet(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

/// The addresses the server actually bound.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub coap: SocketAddr,
    pub aes: SocketAddr,
    pub dtls: SocketAddr,
    pub admin: SocketAddr,
}

/// Runs the server until `shutdown` resolves, then stops gracefully: no new datagrams are read,
/// writes in flight are committed and answered, the WAL is synced.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let data_dir = config.data_dir.clone();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data_dir)
        .map_err(io_err(format!("cannot create data directory {}", data_dir.display())))?;
    let _ = std::fs::remove_file(data_dir.join(ENDPOINTS_FILE));

    if let Some(key) = config.store.secrets_key() {
        store::sealed::set_key(&key);
    }
    let store = Store::open(&data_dir.join("db"), config.store.message_retention(), config.store.memory())?;
    let (writer, writer_thread) = WriterThread::start(&store, config.store.sync, config.store.max_batch)?;
    let result = serve_with(config, store, writer, shutdown).await;
    // Also after a failed start: RocksDB's threads must not outlive the writer.
    tokio::task::spawn_blocking(move || writer_thread.stop()).await.ok();
    let _ = std::fs::remove_file(data_dir.join(ENDPOINTS_FILE));
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

/// Everything between opening the store and stopping its writer.
async fn serve_with(
    config: Arc<Config>,
    store: Store,
    writer: store::Writer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let data_dir = config.data_dir.clone();
    let registry = Arc::new(Registry::load(config.clone(), &store, writer.clone()).await?);
    let services = dialect::Services::load(registry.clone(), &store)?;
    let dialect::Services { commands, campaign, cluster, .. } = services.clone();
    // Before any port is bound: a certificate or cipher mistake is a configuration error.
    let (dtls_context, certificates) = dtls::setup(registry.clone(), &config.dtls)?;
    let admin_token = admin_token(&config, &data_dir)?;
    let metrics = telemetry::init_metrics();

    let (stop_tx, stop_rx) = watch::channel(false);
    let readers = northbound::readers::Readers::new(writer.clone(), registry.wanted().clone());
    let outlets = northbound::streaming::Outlets::register(config.clone(), &store, &writer, &readers)?;
    let webhooks = northbound::Webhooks::start(
        store.clone(),
        writer.clone(),
        readers.clone(),
        northbound::delivery::DeliveryConfig::from(&config.webhooks),
        stop_rx.clone(),
    )?;
    let decoders = codec::decoders::Shared {
        store: store.clone(),
        writer: writer.clone(),
        directory: registry.codecs.clone(),
        wanted: registry.wanted().clone(),
        budget: (&config.codec).into(),
        downlink: commands.clone(),
    };
    codec::decoders::start(decoders, config.codec.workers, stop_rx.clone(), tokio::runtime::Handle::current())
        .map_err(io_err("cannot start the codec threads"))?;
    let mut tasks = tokio::task::JoinSet::new();
    let plain = |_| transport::link::Plain;
    let coap =
        spawn_port(&mut tasks, &services, &writer, config.coap.listen, PortFamily::Plain, "coap", plain, &stop_rx)?;
    let aes = spawn_port(&mut tasks, &services, &writer, config.aes.listen, PortFamily::Aes, "aes", plain, &stop_rx)?;
    let d = &config.dtls;
    let per_socket = |n: usize| n.div_ceil(config.coap.sockets_per_port);
    let limits = dtls::peers::Limits {
        handshakes: dtls::quota::Quotas {
            total: per_socket(d.max_handshakes),
            per_address: per_socket(d.max_handshakes_per_address),
            per_prefix: per_socket(d.max_handshakes_per_prefix),
            prefix: dtls::quota::PrefixLengths { v4: d.ipv4_prefix_len, v6: d.ipv6_prefix_len },
        },
        max_sessions: per_socket(d.max_sessions),
        handshake_timeout: d.handshake_timeout(),
        idle_timeout: d.idle_timeout(),
        mtu: d.mtu,
        cid_len: d.cid_length,
    };
    let restored = match d.durable_sessions {
        true => {
            let pool = transport::dtls::restore(&store, &writer, d.idle_timeout())?;
            tasks.spawn(transport::dtls::sweep_restored(
                pool.clone(),
                writer.clone(),
                d.idle_timeout(),
                stop_rx.clone(),
            ));
            Some(pool)
        }
        false => None,
    };
    let sockets = config.coap.sockets_per_port;
    let dtls_link = |index| {
        let socket = dtls::peers::Socket { index, of: sockets };
        transport::dtls::Dtls::new(dtls::peers::PeerTable::new(dtls_context.clone(), limits, socket, restored.clone()))
    };
    let dtls = spawn_port(&mut tasks, &services, &writer, d.listen, PortFamily::Dtls, "dtls", dtls_link, &stop_rx)?;
    cluster.peers.bound(coap, aes, dtls);

    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(io_err(format!("cannot listen for the admin API on {}", config.admin.listen)))?;
    let admin = listener.local_addr().map_err(io_err("admin listener"))?;
    if config.admin.clock_control {
        tracing::warn!("admin.clock_control is on: POST /api/v1/clock/advance moves the wall clock (tests only)");
    }
    let store_for_memory = store.clone();
    let admin_token: Arc<str> = admin_token.into();
    let router = admin::router(admin::AdminState {
        registry: registry.clone(),
        store,
        commands: commands.clone(),
        campaign: campaign.clone(),
        cluster: cluster.clone(),
        webhooks,
        outlets: outlets.statuses(),
        token: admin_token.clone(),
        metrics,
    });
    outlets
        .start(northbound::inbound::AdminCommands::new(router.clone(), admin_token), stop_rx.clone())
        .await
        .map_err(ServeError::Outlet)?;
    let mut admin_stop = stop_rx.clone();
    tasks.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.changed().await;
            })
            .await
    });

    tasks.spawn(sweep_sessions(registry.clone(), stop_rx.clone()));
    tasks.spawn(expire_commands(commands, stop_rx.clone()));
    tasks.spawn(expire_traces(registry.clone(), stop_rx.clone()));
    tasks.spawn(sweep_statuses(registry.clone(), stop_rx.clone()));
    tasks.spawn(report_memory(store_for_memory, stop_rx.clone()));
    tasks.spawn(store_activity(registry.clone(), stop_rx.clone()));
    tasks.spawn(advance_upgrades(campaign, registry.config.ota.tick_ms, stop_rx.clone()));
    tasks.spawn(cluster::runner::supervise(cluster.clone(), stop_rx.clone()));

    let endpoints = Endpoints { coap, aes, dtls, admin };
    write_endpoints(&data_dir, &endpoints)?;
    tracing::info!(%coap, %aes, %dtls, certificates, %admin, data_dir = %data_dir.display(), "nbhub is serving");

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        Some(r) = tasks.join_next() => tracing::error!(result = ?r, "a listener stopped unexpectedly; shutting down"),
    }
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "listener ended with an error");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one call per listener, each naming all of them
fn spawn_port<L: transport::link::Link + Send + 'static>(
    tasks: &mut tokio::task::JoinSet<std::io::Result<()>>,
    services: &dialect::Services,
    writer: &store::Writer,
    listen: SocketAddr,
    family: PortFamily,
    label: &'static str,
    link: impl Fn(usize) -> L,
    stop: &watch::Receiver<bool>,
) -> Result<SocketAddr, ServeError> {
    let registry = &services.registry;
    let c = &registry.config.coap;
    // AES ciphertext is up to one block longer than the plaintext the limit applies to.
    let cipher_slack = if family == PortFamily::Aes { 16 } else { 0 };
    let endpoint_config = EndpointConfig {
        max_payload: c.max_payload + cipher_slack,
        announced_max_payload: c.max_payload,
        dedup_capacity: (c.dedup_capacity / c.sockets_per_port).max(1),
        exchange_lifetime: c.exchange_lifetime(),
        ack_timeout: c.ack_timeout(),
        max_retransmit: c.max_retransmit,
        max_pending_writes: c.max_pending_writes,
        max_outgoing: c.max_outgoing,
    };
    // Room for the largest acceptable request plus headers and options (and on DTLS a record
    // header, explicit IV, MAC and padding); anything longer is reported truncated and answered
    // 4.13 (dropped on DTLS).
    let recv_slot = (c.max_payload + cipher_slack + 1024).max(1500);
    let sockets =
        transport::udp::bind(listen, c.sockets_per_port).map_err(io_err(format!("cannot bind {label} on {listen}")))?;
    let bound = sockets[0].local_addr().map_err(io_err("socket address"))?;
    if family == PortFamily::Dtls && sockets.len() > 1 {
        // Without it a CID record from a new address reaches the session's socket only by chance.
        if let Err(e) = transport::udp::steer_by_cid(&sockets[0], sockets.len()) {
            tracing::warn!(error = %e, "cannot steer DTLS records by Connection ID; set coap.sockets_per_port = 1 for CIDs to follow address changes");
        }
    }
    for (i, socket) in sockets.into_iter().enumerate() {
        let route = Route { family, socket: i as u16 };
        let kicks = registry.routes.open(route);
        let endpoint = Endpoint::new(DeviceFacing::new(services, route), endpoint_config.clone())
            .traced(registry.tracer.clone(), label);
        let port = transport::udp::Port { label, recv_slot, kicks };
        tasks.spawn(transport::udp::serve(socket, endpoint, link(i), writer.clone(), port, stop.clone()));
    }
    Ok(bound)
}

/// Moves upgrades on with time (timeouts, free cell slots, retries) every tick, and hands a
/// freed cell slot on at once; off the async threads, since a large campaign takes a while to walk.
async fn advance_upgrades(
    campaign: Arc<ota::campaign::Campaign>,
    tick_ms: u64,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(tick_ms));
    interval.tick().await;
    loop {
        let c = campaign.clone();
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = interval.tick() => {
                let _ = tokio::task::spawn_blocking(move || c.tick(clock::UnixMs::now())).await;
            }
            _ = campaign.slot_freed.notified() => {
                let _ = tokio::task::spawn_blocking(move || c.hand_off_slots(clock::UnixMs::now())).await;
            }
        }
    }
}

/// Calls `tick` every `period` until `stop` flips (the first call after one period).
async fn every<F: Future<Output = ()>>(
    period: std::time::Duration,
    mut stop: watch::Receiver<bool>,
    mut tick: impl FnMut() -> F,
) -> std::io::Result<()> {
    let mut interval = tokio::time::interval(period);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = interval.tick() => tick().await,
        }
    }
}

/// Expired sessions are refused as soon as they are looked up; this hourly sweep also frees
/// their memory and stored records for devices that never came back.
async fn sweep_sessions(registry: Arc<Registry>, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    every(std::time::Duration::from_secs(3600), stop, || async {
        match registry.sweep_expired_sessions(clock::UnixMs::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "removed expired sessions"),
            Err(e) => tracing::warn!(error = %e, "could not remove expired sessions"),
        }
    })
    .await
}

/// Ends commands that expired (or, restored after a restart, were never acknowledged), checked
/// every second: expiry times are in seconds.
async fn expire_commands(commands: Arc<downlink::Commands>, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    every(std::time::Duration::from_secs(1), stop, || async {
        let ended = commands.expire(clock::UnixMs::now());
        if ended > 0 {
            tracing::debug!(commands = ended, "commands expired");
        }
    })
    .await
}

/// Ends message traces whose time is up.
async fn expire_traces(registry: Arc<Registry>, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    every(std::time::Duration::from_secs(1), stop, || async {
        let ended = registry.tracer.expire(clock::UnixMs::now());
        if ended > 0 {
            tracing::info!(traces = ended, "message traces ended");
        }
    })
    .await
}

/// Announces devices turning abnormal or offline through silence, checked often enough for the
/// thresholds (a minute for the default hours).
async fn sweep_statuses(registry: Arc<Registry>, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let period = (registry.config.device.online_within_s / 2).clamp(1, 60);
    every(std::time::Duration::from_secs(period), stop, || async {
        let ended = registry.expire_registrations(clock::UnixMs::now());
        if ended > 0 {
            tracing::debug!(registrations = ended, "LwM2M registrations expired");
        }
        let changed = registry.sweep_statuses(clock::UnixMs::now());
        if changed > 0 {
            tracing::debug!(devices = changed, "device status changed");
        }
    })
    .await
}

/// Stores the products' recent uplinks per minute every few seconds, for the chart to survive a
/// restart.
async fn store_activity(registry: Arc<Registry>, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    every(std::time::Duration::from_secs(5), stop, || async {
        registry.writer().record(registry.activity.flush(clock::UnixMs::now()));
    })
    .await
}

/// Where RocksDB's memory goes, every few seconds.
async fn report_memory(store: Store, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    use telemetry::metric;
    every(std::time::Duration::from_secs(5), stop, || async {
        for (part, bytes) in store.memory_use() {
            metrics::gauge!(metric::STORE_MEMORY_BYTES, "part" => part).set(bytes as f64);
        }
    })
    .await
}

/// The configured token, else the one stored in the data directory, else a new one stored there
/// with mode 0600. Only the file's path is ever logged.
fn admin_token(config: &Config, data_dir: &Path) -> Result<String, ServeError> {
    if !config.admin.token.is_empty() {
        return Ok(config.admin.token.clone());
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            tracing::info!(path = %path.display(), "admin token read from file");
            return Ok(t.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("cannot read {}", path.display()))(e)),
    }
    let token = hex::encode(rand::random::<[u8; 24]>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(format!("cannot create {}", path.display())))?;
    writeln!(f, "{token}").map_err(io_err(format!("cannot write {}", path.display())))?;
    tracing::info!(path = %path.display(), "generated an admin token");
    Ok(token)
}

fn write_endpoints(data_dir: &Path, e: &Endpoints) -> Result<(), ServeError> {
    let tmp: PathBuf = data_dir.join(format!("{ENDPOINTS_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(e).expect("serialisable"))
        .map_err(io_err("cannot write endpoints file"))?;
    std::fs::rename(&tmp, data_dir.join(ENDPOINTS_FILE)).map_err(io_err("cannot write endpoints file"))
}

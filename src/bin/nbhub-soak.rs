//! Crash soak: runs nbhub under mixed load and kills it with SIGKILL at random moments, restarting
//! it on the same data directory each time, then checks what survived. The load: Alibaba devices
//! sending encrypted CON uplinks on 5682 and PSK devices sending uplinks inside DTLS, Huawei
//! devices reporting with CON notifications and answering the commands an operator queues, PCP
//! devices (`simulate::pcp`) upgraded by one campaign after another, and a webhook subscriber
//! taking uplink and command events. Verified at the end:
//! - every acknowledged uplink is stored exactly as sent; a stored uplink was sent; duplicates
//!   (a retransmission across a crash, which CoAP allows) are counted;
//! - every command the admin API created exists, ends in a legal state, and its states as the
//!   webhook told them follow the legal order;
//! - every stored uplink reached the subscriber at least once;
//! - every campaign finished with every device upgraded, each having asked for every chunk once
//!   and in order across the kills, and assembled exactly the package.
//!
//! Not in CI (the suite's `tests/crash.rs` is the short version). Loopback only; bounded by
//! `--cycles`. Run from the repository: `cargo run --release --bin nbhub-soak -- --cycles 50`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::Parser;
use nbhub::client::AdminClient;
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::dtls::client::DtlsClient;
use nbhub::ota::pcp::FromPlatform;
use nbhub::simulate::pcp::{Behaviour, PcpDevice};
use nbhub::simulate::process::ServerProcess;
use nbhub::simulate::{AlibabaSession, alibaba_auth};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "nbhub-soak", about = "Kills nbhub at random moments under mixed load and verifies what survived")]
struct Args {
    /// Kill/restart cycles.
    #[arg(long, default_value_t = 50)]
    cycles: usize,
    /// Seeds the moments of the kills.
    #[arg(long, default_value_t = 20261202)]
    seed: u64,
    /// Longest run between two kills, in milliseconds (the shortest is a fifth of it).
    #[arg(long, default_value_t = 2000)]
    max_run_ms: u64,
    #[arg(long, default_value_t = 4)]
    aes_devices: usize,
    #[arg(long, default_value_t = 2)]
    dtls_devices: usize,
    #[arg(long, default_value_t = 4)]
    huawei_devices: usize,
    /// PCP devices in the upgrade campaigns (0: none).
    #[arg(long, default_value_t = 4)]
    ota_devices: usize,
    /// The size of each campaign's package; chunks are 500 bytes.
    #[arg(long, default_value_t = 48)]
    package_kib: usize,
}

const PSK: &[u8] = b"soak-psk-0123456";
const START_WITHIN: Duration = Duration::from_secs(60);
const SERVER_ENV: [(&str, &str); 4] = [
    ("NBHUB_DEVICE_MAX_PER_SECOND", "100000"),
    ("NBHUB_DEVICE_MAX_PER_MINUTE", "1000000"),
    // Upgrades move at test pace: the platform re-asks an unanswered device after 1 s.
    ("NBHUB_OTA_TICK_MS", "100"),
    ("NBHUB_OTA_RESEND_S", "1"),
];

/// Where the devices find the server now; swapped at every restart.
type Current = Arc<Mutex<nbhub::Endpoints>>;

/// What one device sent and what it was told was stored, by payload.
#[derive(Default)]
struct Sent {
    sent: BTreeSet<String>,
    acknowledged: BTreeSet<String>,
}

type Logs = Arc<Mutex<HashMap<(String, String), Sent>>>;

fn record(logs: &Logs, pk: &str, dn: &str, payload: &str, acknowledged: bool) {
    let mut l = logs.lock().unwrap();
    let s = l.entry((pk.to_string(), dn.to_string())).or_default();
    s.sent.insert(payload.to_string());
    if acknowledged {
        s.acknowledged.insert(payload.to_string());
    }
}

/// An Alibaba device on 5682: authenticates (again after a 4.01), sends numbered CON uplinks and
/// retries each with the same message id until it is acknowledged.
fn aes_device(current: Current, pk: String, dn: String, secret: String, logs: Logs, stop: Arc<AtomicBool>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut mid: u16 = rand::random();
    let mut session: Option<AlibabaSession> = None;
    let mut n = 0u32;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let server = current.lock().unwrap().aes;
        let Some(s) = session.as_mut() else {
            mid = mid.wrapping_add(1);
            let _ = socket.send_to(&alibaba_auth(&pk, &dn, &secret, mid), server);
            if let Ok((len, _)) = socket.recv_from(&mut buf)
                && let Ok(m) = Message::parse(&buf[..len])
                && m.code == Code::CONTENT
            {
                session = AlibabaSession::from_answer(m.payload, &secret);
            }
            continue;
        };
        mid = mid.wrapping_add(1);
        let payload = format!("aes-{dn}-{n}");
        let req = s.uplink(&pk, &dn, mid, payload.as_bytes());
        record(&logs, &pk, &dn, &payload, false);
        loop {
            let server = current.lock().unwrap().aes;
            let _ = socket.send_to(&req, server);
            let answer = socket
                .recv_from(&mut buf)
                .ok()
                .and_then(|(len, _)| Message::parse(&buf[..len]).ok().map(|m| (m.mid, m.code)));
            match answer {
                Some((m, Code::CHANGED)) if m == mid => {
                    record(&logs, &pk, &dn, &payload, true);
                    break;
                }
                Some((m, Code::UNAUTHORIZED)) if m == mid => {
                    session = None;
                    break;
                }
                _ if stop.load(Ordering::Relaxed) => return,
                _ => {}
            }
        }
        n += 1;
    }
}

/// A PSK device inside DTLS: handshakes (again after every restart), sends numbered uplinks;
/// one is acknowledged when its 2.04 comes back inside the session.
fn dtls_device(current: Current, pk: String, dn: String, logs: Logs, stop: Arc<AtomicBool>) {
    let mut n = 0u32;
    let mut mid: u16 = rand::random();
    while !stop.load(Ordering::Relaxed) {
        let server = current.lock().unwrap().dtls;
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        if socket.connect(server).is_err() {
            continue;
        }
        let mut client = DtlsClient::psk(socket, &format!("{pk}&{dn}"), PSK, "PSK-AES128-CCM8");
        if client.handshake(None, Duration::from_secs(3)).is_err() {
            continue;
        }
        // Within one session: an unanswered uplink is sent again after a new handshake.
        'session: while !stop.load(Ordering::Relaxed) {
            mid = mid.wrapping_add(1);
            let payload = format!("dtls-{dn}-{n}");
            let req = MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes())
                .option(OptionNumber::URI_PATH, b"topic")
                .option(OptionNumber::URI_PATH, pk.as_bytes())
                .option(OptionNumber::URI_PATH, dn.as_bytes())
                .option(OptionNumber::URI_PATH, b"update")
                .payload(payload.as_bytes())
                .build();
            record(&logs, &pk, &dn, &payload, false);
            for _ in 0..3 {
                if client.send(&req).is_none() {
                    break 'session;
                }
                if let Some(d) = client.recv(Duration::from_millis(300))
                    && let Ok(m) = Message::parse(&d)
                    && m.mid == mid
                    && m.code == Code::CHANGED
                {
                    record(&logs, &pk, &dn, &payload, true);
                    n += 1;
                    continue 'session;
                }
            }
            // Unanswered three times: the server restarted; the same payload goes again.
            break;
        }
    }
}

/// A Huawei device: binds (again when its reports go unanswered), reports with numbered CON
/// notifications, retrying each until acknowledged, and answers commands with an empty 2.04.
fn huawei_device(current: Current, pk: String, dn: String, node: String, logs: Logs, stop: Arc<AtomicBool>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut mid: u16 = rand::random();
    let mut buf = [0u8; 2048];
    let mut token: Option<Vec<u8>> = None;
    let mut observe: u32 = 0;
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let server = current.lock().unwrap().coap;
        let Some(t) = token.clone() else {
            mid = mid.wrapping_add(1);
            token = bind(&socket, server, &node, mid);
            continue;
        };
        mid = mid.wrapping_add(1);
        observe = (observe + 1) & 0xFF_FFFF;
        let payload = format!("huawei-{dn}-{n}");
        let report = MessageBuilder::new(MessageType::Con, Code::CONTENT, mid, &t)
            .uint_option(OptionNumber::OBSERVE, observe)
            .payload(payload.as_bytes())
            .build();
        record(&logs, &pk, &dn, &payload, false);
        let mut tries = 0;
        loop {
            let server = current.lock().unwrap().coap;
            let _ = socket.send_to(&report, server);
            let mut acknowledged = false;
            let deadline = Instant::now() + Duration::from_millis(300);
            while Instant::now() < deadline {
                let Ok((len, _)) = socket.recv_from(&mut buf) else { break };
                let Ok(m) = Message::parse(&buf[..len]) else { continue };
                match (m.mtype, m.code) {
                    (MessageType::Ack, _) if m.mid == mid => acknowledged = true,
                    (MessageType::Rst, _) if m.mid == mid => {
                        token = None; // the relation is gone: bind again
                        break;
                    }
                    (MessageType::Con, Code::POST) => {
                        let _ = socket.send_to(
                            &MessageBuilder::new(MessageType::Ack, Code::CHANGED, m.mid, m.token).build(),
                            server,
                        );
                    }
                    _ => {}
                }
            }
            if acknowledged {
                record(&logs, &pk, &dn, &payload, true);
                n += 1;
                break;
            }
            tries += 1;
            if token.is_none() || tries >= 10 || stop.load(Ordering::Relaxed) {
                // Unacknowledged: sent, maybe stored, never counted as acknowledged.
                token = if tries >= 10 { None } else { token };
                n += 1;
                break;
            }
        }
    }
}

/// Sends a bind (`POST /t/r?ep=`) and accepts the observe request within a second: its token.
fn bind(socket: &UdpSocket, server: SocketAddr, node: &str, mid: u16) -> Option<Vec<u8>> {
    let bind = MessageBuilder::new(MessageType::Con, Code::POST, mid, &[0xb1])
        .option(OptionNumber::URI_PATH, b"t")
        .option(OptionNumber::URI_PATH, b"r")
        .option(OptionNumber::URI_QUERY, format!("ep={node}").as_bytes())
        .build();
    let _ = socket.send_to(&bind, server);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let Ok((len, _)) = socket.recv_from(&mut buf) else { continue };
        let Ok(m) = Message::parse(&buf[..len]) else { continue };
        if m.mtype == MessageType::Con && m.code == Code::GET {
            let _ =
                socket.send_to(&MessageBuilder::new(MessageType::Ack, Code::CONTENT, m.mid, m.token).build(), server);
            return Some(m.token.to_vec());
        }
    }
    None
}

/// Each campaign's package, by version.
type Packages = Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>>;

/// How one device's upgrade to one version ended, as the device saw it.
struct Upgraded {
    node: String,
    version: String,
    /// The assembled image is the package, and no chunk differed from it.
    verified: bool,
    /// Every chunk asked for in order, none after a later one: each download resumed where it
    /// was after each kill.
    in_order: bool,
    /// Kills of the server it lived through.
    kills: usize,
}

/// A PCP device: binds (again when the server moved: each run has new ports), reports what the
/// simulated device sends as NON notifications and answers the platform's CON POSTs; tells
/// `upgraded` when an upgrade's result has been answered.
fn ota_device(
    current: Current,
    node: String,
    packages: Packages,
    upgraded: Arc<Mutex<Vec<Upgraded>>>,
    stop: Arc<AtomicBool>,
) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let behaviour = Behaviour { chunk_delay: Duration::from_millis(20), ..Behaviour::healthy("V1") };
    let mut sim = PcpDevice::new(behaviour, Arc::default());
    let mut expecting = String::new();
    let mut told = false;
    let mut kills = 0;
    let (mut mid, mut observe): (u16, u32) = (rand::random(), 0);
    let mut bound: Option<(SocketAddr, Vec<u8>)> = None;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let server = current.lock().unwrap().coap;
        let token = match &bound {
            Some((at, token)) if *at == server => token.clone(),
            _ => {
                kills += usize::from(bound.is_some());
                mid = mid.wrapping_add(1);
                bound = bind(&socket, server, &node, mid).map(|t| (server, t));
                continue;
            }
        };
        let mut notify = |payload: &[u8]| {
            (mid, observe) = (mid.wrapping_add(1), (observe + 1) & 0xFF_FFFF);
            let n = MessageBuilder::new(MessageType::Non, Code::CONTENT, mid, &token)
                .uint_option(OptionNumber::OBSERVE, observe)
                .payload(payload)
                .build();
            let _ = socket.send_to(&n, server);
        };
        for r in sim.due(Instant::now()) {
            notify(&r.encode());
        }
        let Ok((len, _)) = socket.recv_from(&mut buf) else { continue };
        let Ok(m) = Message::parse(&buf[..len]) else { continue };
        if m.mtype != MessageType::Con || m.code != Code::POST {
            continue;
        }
        if let Ok(FromPlatform::NewVersion { version, .. }) = FromPlatform::parse(m.payload)
            && version.as_str() != expecting
            && let Some(p) = packages.lock().unwrap().get(version.as_str())
        {
            sim.expect(p.clone());
            (expecting, told, kills) = (version.to_string(), false, 0);
        }
        let Some(answers) = sim.receive(m.payload, Instant::now()) else { continue };
        let in_ack = answers.in_ack.map(|a| a.encode()).unwrap_or_default();
        let ack = MessageBuilder::new(MessageType::Ack, Code::CHANGED, m.mid, m.token).payload(&in_ack).build();
        let _ = socket.send_to(&ack, server);
        for a in answers.after {
            notify(&a.encode());
        }
        if sim.log.upgrade_answered && !told {
            told = true;
            let log = &sim.log;
            let package = packages.lock().unwrap().get(&expecting).cloned().unwrap_or_default();
            let chunks = package.len().div_ceil(CHUNK_SIZE) as u16;
            // A notification repeated after a restart makes the device ask again for the chunk
            // it was waiting for: once more, not a step back.
            let mut asked = log.requested.clone();
            asked.dedup();
            upgraded.lock().unwrap().push(Upgraded {
                node: node.clone(),
                version: sim.version().to_string(),
                verified: log.bad_chunks == 0 && log.image.as_deref() == Some(&package[..]),
                in_order: asked == (0..chunks).collect::<Vec<u16>>(),
                kills,
            });
        }
    }
}

const CHUNK_SIZE: usize = 500;

/// The package of campaign `k` (its version is `V{k + 2}`): bytes that differ from one campaign
/// to the next.
fn package(k: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 256 + k * 7) as u8).collect()
}

/// The upgrade campaigns: one task at a time over every PCP device, the next once it finished.
struct Campaigns {
    pk: String,
    devices: Vec<Value>,
    packages: Packages,
    len: usize,
    /// Task ids, in order; the last may still run.
    tasks: Vec<String>,
    finished: usize,
    /// The next campaign's package, uploaded, its task not created yet.
    uploaded: Option<Value>,
}

impl Campaigns {
    /// Notes whether the running campaign finished and, if `next`, starts the next one when none
    /// runs. An error (the server just restarted) waits for the next call.
    fn drive(&mut self, admin: &AdminClient, next: bool) {
        if let Some(id) = self.tasks.last()
            && self.running()
        {
            match admin.get(&format!("/api/v1/ota/tasks/{id}")) {
                Ok(t) if t["status"] == "finished" => self.finished += 1,
                _ => return,
            }
        }
        if !next || self.devices.is_empty() {
            return;
        }
        let k = self.tasks.len();
        if self.uploaded.is_none() {
            let (version, source) = (format!("V{}", k + 2), format!("V{}", k + 1));
            let data = Arc::new(package(k, self.len));
            self.packages.lock().unwrap().insert(version.clone(), data.clone());
            let query = format!(
                "/api/v1/packages?product_key={}&version={version}&type=firmware&chunk_size={CHUNK_SIZE}&source_versions={source}",
                self.pk
            );
            self.uploaded = admin.post_bytes(&query, &data).ok().map(|p| p["package_id"].clone());
        }
        if let Some(package) = &self.uploaded
            && let Ok(t) = admin.post("/api/v1/ota/tasks", &json!({"package_id": package, "devices": self.devices}))
            && let Some(id) = t["task_id"].as_str()
        {
            self.tasks.push(id.to_string());
            self.uploaded = None;
        }
    }

    fn running(&self) -> bool {
        self.finished < self.tasks.len()
    }
}

/// What the subscriber took: uplink payloads by device, and each command's states by event id
/// (deliveries may repeat and arrive out of order; the ids give the order they happened in).
#[derive(Default)]
struct Hooked {
    uplinks: BTreeSet<(String, String, String)>,
    commands: BTreeMap<String, BTreeMap<u64, String>>,
}

fn subscriber(hooked: Arc<Mutex<Hooked>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let hooked = hooked.clone();
            std::thread::spawn(move || serve_http(conn, &hooked));
        }
    });
    addr
}

fn serve_http(conn: std::net::TcpStream, hooked: &Mutex<Hooked>) {
    let mut out = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(e) = serde_json::from_slice::<Value>(&body) {
            let mut h = hooked.lock().unwrap();
            let (pk, dn) = (
                e["product_key"].as_str().unwrap_or("").to_string(),
                e["device_name"].as_str().unwrap_or("").to_string(),
            );
            match e["event"].as_str() {
                Some("uplink") => {
                    let payload =
                        STANDARD.decode(e["data"]["payload_base64"].as_str().unwrap_or("")).unwrap_or_default();
                    h.uplinks.insert((pk, dn, String::from_utf8_lossy(&payload).into_owned()));
                }
                Some("command_status") => {
                    let id = e["data"]["command_id"].as_str().unwrap_or("").to_string();
                    let event: u64 = e["event_id"].as_str().and_then(|i| i.parse().ok()).unwrap_or(0);
                    let status = e["data"]["status"].as_str().unwrap_or("").to_string();
                    h.commands.entry(id).or_default().insert(event, status);
                }
                _ => {}
            }
        }
        if out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

/// Whether `next` may follow `prev` in a command's life (SPEC §5). A crash may send a SENT
/// command again (at least once), so SENT may follow SENT or DELIVERED.
fn legal_step(prev: &str, next: &str) -> bool {
    matches!(
        (prev, next),
        ("PENDING", "SENT" | "EXPIRED" | "CANCELED" | "FAILED")
            | ("SENT", "SENT" | "DELIVERED" | "SUCCESSFUL" | "FAILED" | "TIMEOUT" | "PENDING")
            | ("DELIVERED", "SENT" | "SUCCESSFUL" | "FAILED" | "DELIVERED")
    ) || prev == next
}

/// A tiny xorshift: the kill moments repeat for a seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn main() {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("nbhub-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("data and server.log in {}", dir.display());
    let mut node = ServerProcess::start(&dir, &SERVER_ENV, START_WITHIN).unwrap_or_else(|e| fail(e));
    let admin = node.admin();
    let hooked = Arc::new(Mutex::new(Hooked::default()));
    let hook = subscriber(hooked.clone());
    admin
        .post(
            "/api/v1/webhooks",
            &json!({"url": format!("http://{hook}/soak"), "events": ["uplink", "command_status"]}),
        )
        .unwrap_or_else(|e| fail(e));

    let logs: Logs = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let current: Current = Arc::new(Mutex::new(node.endpoints.clone()));
    let mut threads = Vec::new();
    let ali = admin.post("/api/v1/products", &json!({"name": "soak-ali"})).unwrap_or_else(|e| fail(e));
    let ali_pk = ali["product_key"].as_str().unwrap().to_string();
    for i in 0..args.aes_devices + args.dtls_devices {
        let body = if i < args.aes_devices { json!({}) } else { json!({"psk_hex": hex::encode(PSK)}) };
        let d = admin.post(&format!("/api/v1/products/{ali_pk}/devices"), &body).unwrap_or_else(|e| fail(e));
        let (dn, secret) =
            (d["device_name"].as_str().unwrap().to_string(), d["device_secret"].as_str().unwrap().to_string());
        let (c, l, s, pk) = (current.clone(), logs.clone(), stop.clone(), ali_pk.clone());
        threads.push(if i < args.aes_devices {
            std::thread::spawn(move || aes_device(c, pk, dn, secret, l, s))
        } else {
            std::thread::spawn(move || dtls_device(c, pk, dn, l, s))
        });
    }
    let hw = admin
        .post(
            "/api/v1/products",
            &json!({"name": "soak-huawei", "awake_window_s": 600, "ack_timeout_ms": 500, "max_retransmit": 2}),
        )
        .unwrap_or_else(|e| fail(e));
    let hw_pk = hw["product_key"].as_str().unwrap().to_string();
    let mut huawei = Vec::new();
    for i in 0..args.huawei_devices {
        let node_id = format!("soak{}-{i}", std::process::id());
        let d = admin
            .post(&format!("/api/v1/products/{hw_pk}/devices"), &json!({"node_id": node_id}))
            .unwrap_or_else(|e| fail(e));
        let dn = d["device_name"].as_str().unwrap().to_string();
        huawei.push(dn.clone());
        let (c, l, s, pk) = (current.clone(), logs.clone(), stop.clone(), hw_pk.clone());
        threads.push(std::thread::spawn(move || huawei_device(c, pk, dn, node_id, l, s)));
    }

    let ota = admin
        .post(
            "/api/v1/products",
            &json!({"name": "soak-ota", "awake_window_s": 600, "ack_timeout_ms": 500, "max_retransmit": 2}),
        )
        .unwrap_or_else(|e| fail(e));
    let ota_pk = ota["product_key"].as_str().unwrap().to_string();
    let packages: Packages = Arc::default();
    let upgraded: Arc<Mutex<Vec<Upgraded>>> = Arc::default();
    let mut campaigns = Campaigns {
        pk: ota_pk.clone(),
        devices: Vec::new(),
        packages: packages.clone(),
        len: args.package_kib * 1024,
        tasks: Vec::new(),
        finished: 0,
        uploaded: None,
    };
    let mut ota_nodes = Vec::new();
    for i in 0..args.ota_devices {
        let node_id = format!("soak{}-ota{i}", std::process::id());
        let devices = format!("/api/v1/products/{ota_pk}/devices");
        let d = admin.post(&devices, &json!({"node_id": node_id})).unwrap_or_else(|e| fail(e));
        let dn = d["device_name"].as_str().unwrap().to_string();
        // One cell: the campaign's devices share its budget, as neighbours do.
        admin.patch(&format!("{devices}/{dn}"), &json!({"radio": {"cell_id": "soak"}})).unwrap_or_else(|e| fail(e));
        campaigns.devices.push(json!({"product_key": ota_pk, "device_name": dn}));
        ota_nodes.push((node_id.clone(), dn));
        let (c, p, u, s) = (current.clone(), packages.clone(), upgraded.clone(), stop.clone());
        threads.push(std::thread::spawn(move || ota_device(c, node_id, p, u, s)));
    }

    let mut seed = args.seed.max(1);
    let mut commands: Vec<String> = Vec::new();
    let started = Instant::now();
    for cycle in 0..args.cycles {
        let run = args.max_run_ms / 5 + next(&mut seed) % (args.max_run_ms - args.max_run_ms / 5).max(1);
        let until = Instant::now() + Duration::from_millis(run);
        // The operator queues commands while the server runs; an answered create is a command.
        while Instant::now() < until {
            let dn = &huawei[commands.len() % huawei.len().max(1)];
            let body = json!({"payload_base64": STANDARD.encode(format!("cmd-{}", commands.len()))});
            if let Ok(c) = node.admin().post(&format!("/api/v1/products/{hw_pk}/devices/{dn}/commands"), &body)
                && let Some(id) = c["command_id"].as_str()
            {
                commands.push(id.to_string());
            }
            campaigns.drive(&node.admin(), true);
            std::thread::sleep(Duration::from_millis(100));
        }
        node.kill9();
        node.spawn(START_WITHIN).unwrap_or_else(|e| fail(e));
        *current.lock().unwrap() = node.endpoints.clone();
        println!("cycle {}/{}: killed after {run} ms, restarted", cycle + 1, args.cycles);
    }
    // A quiet end: the devices finish what is in flight (the last campaign too), the subscriber
    // catches up.
    std::thread::sleep(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(120);
    while campaigns.running() && Instant::now() < deadline {
        campaigns.drive(&node.admin(), false);
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    std::thread::sleep(Duration::from_secs(5));
    let soak_s = started.elapsed().as_secs_f64();

    let admin = node.admin();
    let mut problems = Vec::new();
    let (mut acknowledged, mut stored_total, mut duplicates) = (0usize, 0usize, 0usize);
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let logs = logs.lock().unwrap();
    let hooked = hooked.lock().unwrap();
    for ((pk, dn), sent) in logs.iter() {
        let stored = stored_payloads(&admin, pk, dn);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &stored {
            *counts.entry(p.as_str()).or_default() += 1;
        }
        stored_total += stored.len();
        acknowledged += sent.acknowledged.len();
        for p in &sent.acknowledged {
            *by_kind
                .entry(["aes", "dtls", "huawei"].into_iter().find(|k| p.starts_with(k)).unwrap_or("?"))
                .or_default() += 1;
        }
        for p in &sent.acknowledged {
            if !counts.contains_key(p.as_str()) {
                problems.push(format!("{pk}/{dn}: acknowledged {p} is not stored"));
            }
        }
        for (p, n) in &counts {
            if !sent.sent.contains(*p) {
                problems.push(format!("{pk}/{dn}: stored {p} was never sent"));
            }
            duplicates += n - 1;
            if !hooked.uplinks.contains(&(pk.clone(), dn.clone(), p.to_string())) {
                problems.push(format!("{pk}/{dn}: stored {p} never reached the webhook"));
            }
        }
    }
    let mut finals: BTreeMap<String, usize> = BTreeMap::new();
    for id in &commands {
        match admin.get(&format!("/api/v1/commands/{id}")) {
            Ok(c) => *finals.entry(c["status"].as_str().unwrap_or("?").to_string()).or_default() += 1,
            Err(e) => problems.push(format!("command {id} created but not readable: {e}")),
        }
        let told: Vec<String> = hooked.commands.get(id).into_iter().flat_map(|m| m.values().cloned()).collect();
        for w in told.windows(2) {
            if !legal_step(&w[0], &w[1]) {
                problems.push(format!("command {id}: {} after {} ({told:?})", w[1], w[0]));
            }
        }
    }
    let upgraded = upgraded.lock().unwrap();
    for (k, id) in campaigns.tasks.iter().enumerate() {
        let version = format!("V{}", k + 2);
        match admin.get(&format!("/api/v1/ota/tasks/{id}")) {
            Ok(t) if t["status"] == "finished" && t["counts"]["succeeded"] == ota_nodes.len() => {}
            Ok(t) => problems.push(format!("campaign {version} did not upgrade every device: {t}")),
            Err(e) => problems.push(format!("campaign {version} not readable: {e}")),
        }
        for (node_id, dn) in &ota_nodes {
            match upgraded.iter().find(|u| &u.node == node_id && u.version == version) {
                Some(u) if u.verified && u.in_order => {}
                Some(u) => problems.push(format!(
                    "{dn} upgraded to {version} with verified image {} and every chunk in order {}",
                    u.verified, u.in_order
                )),
                None => problems.push(format!("{dn} never saw its upgrade to {version} answered")),
            }
        }
    }
    let last = format!("V{}", campaigns.tasks.len() + 1);
    for (_, dn) in &ota_nodes {
        let d = admin.get(&format!("/api/v1/products/{ota_pk}/devices/{dn}")).unwrap_or_else(|e| fail(e));
        if d["version"] != last.as_str() && !campaigns.tasks.is_empty() {
            problems.push(format!("{dn} is at {} after the last campaign brought {last}", d["version"]));
        }
    }
    println!(
        "{} cycles in {soak_s:.0} s: {acknowledged} uplinks acknowledged {by_kind:?}, {stored_total} stored ({duplicates} duplicates), {} commands {finals:?}, {} campaigns of {} devices ({} upgrades, {} of them across a kill)",
        args.cycles,
        commands.len(),
        campaigns.tasks.len(),
        ota_nodes.len(),
        upgraded.len(),
        upgraded.iter().filter(|u| u.kills > 0).count()
    );
    if problems.is_empty() {
        println!(
            "verified: nothing acknowledged lost, nothing stored unsent, every stored uplink delivered, command states legal, every upgrade finished with the package's image"
        );
        drop(node);
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        for p in problems.iter().take(50) {
            println!("PROBLEM {p}");
        }
        fail(format!("{} problems; the data directory is kept", problems.len()));
    }
}

/// Every stored payload of a device, oldest first (all pages).
fn stored_payloads(admin: &AdminClient, pk: &str, dn: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let page = admin
            .get(&format!("/api/v1/products/{pk}/devices/{dn}/messages?limit=1000&after={after}"))
            .unwrap_or_else(|e| fail(e));
        for m in page["messages"].as_array().into_iter().flatten() {
            let payload = STANDARD.decode(m["payload_base64"].as_str().unwrap_or("")).unwrap_or_default();
            out.push(String::from_utf8_lossy(&payload).into_owned());
        }
        match page["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => return out,
        }
    }
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-soak: {e}");
    std::process::exit(1)
}

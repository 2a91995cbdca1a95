//! Test harness: runs the real `nbhub` binary on ephemeral ports with a temporary data directory,
//! talks to its admin API over HTTP and to its CoAP ports over UDP as a simulated device would.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod agent_tiny;
pub mod browser;
pub mod ota;
pub mod pcp;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbhub::Endpoints;
use nbhub::auth::cipher::SessionKey;
use nbhub::auth::sign::{SignMethod, auth_content};
use nbhub::client::AdminClient;
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use serde_json::{Value, json};

pub const TOKEN: &str = "test-admin-token";

pub struct Server {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub endpoints: Endpoints,
    extra_env: Vec<(String, String)>,
    data: PathBuf,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts with extra `NBHUB_*` variables (e.g. lower flow-control limits).
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        Server::start_on(dir, data, env)
    }

    /// Starts with its data directory at `data` (e.g. on a filesystem of its own); the log and
    /// the working directory stay in a temporary directory.
    pub fn start_on_data(data: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_on(tempfile::tempdir().expect("temp dir"), data.to_path_buf(), env)
    }

    fn start_on(dir: tempfile::TempDir, data: PathBuf, env: &[(&str, &str)]) -> Server {
        let extra_env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Server { dir, child: None, endpoints: placeholder(), extra_env, data };
        s.spawn();
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn spawn(&mut self) {
        let data = self.data_dir();
        // a killed server leaves its endpoints file behind; wait for the new one
        let _ = std::fs::remove_file(data.join(nbhub::ENDPOINTS_FILE));
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbhub"));
        // The data directory's parent is the working directory: relative paths in the config
        // (the default certificate paths) resolve there, not in the source tree.
        cmd.arg("serve")
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NBHUB_DATA_DIR", &data)
            .env("NBHUB_ADMIN_LISTEN", "127.0.0.1:0")
            .env("NBHUB_COAP_LISTEN", "127.0.0.1:0")
            .env("NBHUB_AES_LISTEN", "127.0.0.1:0")
            .env("NBHUB_DTLS_LISTEN", "127.0.0.1:0")
            .env("NBHUB_DTLS_CERT", dev_certs().join("server.crt"))
            .env("NBHUB_DTLS_KEY", dev_certs().join("server.key"))
            .env("NBHUB_DTLS_RSA_CERT", dev_certs().join("server-rsa.crt"))
            .env("NBHUB_DTLS_RSA_KEY", dev_certs().join("server-rsa.key"))
            .env("NBHUB_ADMIN_TOKEN", TOKEN)
            .env("NBHUB_LOG", "nbhub=debug,info")
            // Flow control is tested on its own; elsewhere it would only pace the tests.
            .env("NBHUB_DEVICE_MAX_PER_SECOND", "100000")
            .env("NBHUB_DEVICE_MAX_PER_MINUTE", "1000000")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start nbhub"));
        self.endpoints = wait_for_endpoints(&data, self.child.as_mut().unwrap(), &self.dir.path().join("server.log"));
    }

    /// SIGKILL: no graceful anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same data directory (new ephemeral ports).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// kill -9, then starts again on the same data directory with the DTLS port it had: what a
    /// device that keeps its session across the restart talks to.
    pub fn restart_keeping_dtls_port(&mut self) {
        self.kill9();
        let dtls = self.endpoints.dtls.to_string();
        self.extra_env.retain(|(k, _)| k != "NBHUB_DTLS_LISTEN");
        self.extra_env.push(("NBHUB_DTLS_LISTEN".into(), dtls));
        self.spawn();
    }

    /// SIGTERM and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "nbhub did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(&format!("http://{}", self.endpoints.admin), TOKEN)
    }

    /// Runs the `nbhub` CLI against the admin API; what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_nbhub"))
            .args(args)
            .args(["--admin-url", &self.admin_url(), "--token", TOKEN])
            .output()
            .unwrap();
        assert!(out.status.success(), "nbhub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.endpoints.admin)
    }

    pub fn metrics(&self) -> String {
        ureq::get(format!("{}/metrics", self.admin_url())).call().unwrap().body_mut().read_to_string().unwrap()
    }

    /// The value of one sample of `/metrics`, e.g. `nbhub_dtls_sessions{port="dtls"}`; 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.admin().metric(sample)
    }

    /// Polls `sample` until `ok` holds for it (metrics are exported about once a second).
    pub fn wait_metric(&self, sample: &str, ok: impl Fn(f64) -> bool) -> f64 {
        eventually(|| self.metric(sample), |v| ok(*v), |v| format!("{sample} stayed at {v}:\n{}", self.metrics()))
    }

    /// `openssl s_client -dtls1_2` against the DTLS port; what it printed.
    pub fn s_client(&self, args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(["s_client", "-dtls1_2", "-connect", &format!("127.0.0.1:{}", self.endpoints.dtls.port())])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Creates a product and a device; returns (product key, device name, device secret).
    pub fn product_and_device(&self, product: Value) -> (String, String, String) {
        let admin = self.admin();
        let p = admin.post("/api/v1/products", &product).expect("create product");
        let pk = p["product_key"].as_str().unwrap().to_string();
        let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({})).expect("create device");
        (pk, d["device_name"].as_str().unwrap().to_string(), d["device_secret"].as_str().unwrap().to_string())
    }

    /// Creates `product` and a Huawei device on it with node id `node`; returns (product key,
    /// device name).
    pub fn huawei_device(&self, node: &str, product: Value) -> (String, String) {
        self.huawei_device_with(product, json!({"node_id": node}))
    }

    /// Like [`Server::huawei_device`], with a PSK for DTLS (its identity is the node id, as on
    /// LiteOS).
    pub fn huawei_psk_device(&self, node: &str, psk: &[u8], product: Value) -> (String, String) {
        self.huawei_device_with(product, json!({"node_id": node, "psk_hex": hex::encode(psk)}))
    }

    fn huawei_device_with(&self, product: Value, device: Value) -> (String, String) {
        let admin = self.admin();
        let p = admin.post("/api/v1/products", &product).expect("create product");
        let pk = p["product_key"].as_str().unwrap().to_string();
        let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &device).expect("create device");
        (pk, d["device_name"].as_str().unwrap().to_string())
    }

    /// Decoded payloads of a device's stored messages, oldest first (all pages).
    pub fn stored(&self, pk: &str, dn: &str) -> Vec<(String, Vec<u8>)> {
        use base64::Engine;
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page = self
                .admin()
                .get(&format!("/api/v1/products/{pk}/devices/{dn}/messages?limit=1000&after={after}"))
                .expect("messages");
            for m in page["messages"].as_array().unwrap() {
                let payload =
                    base64::engine::general_purpose::STANDARD.decode(m["payload_base64"].as_str().unwrap()).unwrap();
                out.push((m["topic"].as_str().unwrap().to_string(), payload));
            }
            match page["next"].as_str() {
                Some(n) => after = n.to_string(),
                None => return out,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn placeholder() -> Endpoints {
    let a: SocketAddr = "0.0.0.0:0".parse().unwrap();
    Endpoints { coap: a, aes: a, dtls: a, admin: a }
}

/// The development CAs and server certificates, made once by the repo's own `scripts/dev-certs`
/// (test processes run in parallel: each makes its own, the first to rename it into place wins).
pub fn dev_certs() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dev-certs");
        // Keyed on the newest file the script makes: a cache from an older script (no RSA chain,
        // or an RSA leaf signed by the EC CA) is made again.
        if !dir.join("dev-ca-rsa.crt").exists() {
            let _ = std::fs::remove_dir_all(&dir);
            let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-certs.{}", std::process::id()));
            let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev-certs"))
                .arg(&tmp)
                .output()
                .expect("run scripts/dev-certs");
            assert!(out.status.success(), "scripts/dev-certs: {}", String::from_utf8_lossy(&out.stderr));
            if std::fs::rename(&tmp, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        dir
    })
    .clone()
}

fn wait_for_endpoints(data: &Path, child: &mut Child, log: &Path) -> Endpoints {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(data.join(nbhub::ENDPOINTS_FILE))
            && let Ok(e) = serde_json::from_str::<Endpoints>(&text)
        {
            return e;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("nbhub exited with {status}: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "nbhub did not start: {}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A parsed response, owned.
#[derive(Debug, Clone)]
pub struct Reply {
    pub mtype: MessageType,
    pub code: Code,
    pub mid: u16,
    pub token: Vec<u8>,
    pub options: Vec<(u16, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Reply {
    pub fn parse(data: &[u8]) -> Reply {
        let m = Message::parse(data).expect("server sent well-formed CoAP");
        Reply {
            mtype: m.mtype,
            code: m.code,
            mid: m.mid,
            token: m.token.to_vec(),
            options: m.options.iter().map(|(n, v)| (n.0, v.to_vec())).collect(),
            payload: m.payload.to_vec(),
        }
    }
    pub fn option(&self, n: u16) -> Option<&[u8]> {
        self.options.iter().find(|(num, _)| *num == n).map(|(_, v)| &v[..])
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("JSON payload")
    }
}

/// A UDP peer speaking raw CoAP.
pub struct Peer {
    pub socket: UdpSocket,
    pub server: SocketAddr,
    mid: u16,
    token: u32,
}

impl Peer {
    pub fn new(server: SocketAddr) -> Peer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Peer { socket, server, mid: rand_u16(), token: rand_u16() as u32 }
    }

    pub fn next_mid(&mut self) -> u16 {
        self.mid = self.mid.wrapping_add(1);
        self.mid
    }

    pub fn next_token(&mut self) -> [u8; 4] {
        self.token = self.token.wrapping_add(1);
        self.token.to_be_bytes()
    }

    pub fn send(&self, data: &[u8]) {
        self.socket.send_to(data, self.server).unwrap();
    }

    /// The next datagram, or `None` after `timeout`.
    pub fn recv_within(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let r = self.socket.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec());
        self.socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r
    }

    pub fn recv(&self) -> Reply {
        Reply::parse(&self.recv_within(Duration::from_secs(5)).expect("a reply within 5 s"))
    }

    /// Sends and waits for the reply to it: the ACK with its message id, or a response with its
    /// token (a NON's, or a separate one). Anything else is a stray datagram, e.g. a late answer
    /// to an earlier user of this ephemeral port in a parallel test, and is skipped.
    pub fn exchange(&self, data: &[u8]) -> Reply {
        let request = Message::parse(data).expect("a well-formed request");
        self.send(data);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.checked_duration_since(Instant::now()).expect("a reply within 5 s");
            let reply = Reply::parse(&self.recv_within(left).expect("a reply within 5 s"));
            let same_mid = matches!(reply.mtype, MessageType::Ack | MessageType::Rst) && reply.mid == request.mid;
            if same_mid || reply.token == request.token {
                return reply;
            }
        }
    }
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (t ^ (std::process::id() << 7)) as u16
}

/// How the simulated device presents its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenIn {
    Option2088,
    Option61,
    Query,
}

/// A simulated Alibaba device (iotkit / Link SDK behaviour).
pub struct AliDevice {
    pub peer: Peer,
    pub pk: String,
    pub dn: String,
    pub secret: String,
    pub token: Option<String>,
    pub key: Option<SessionKey>,
    pub seq: u64,
    pub token_in: TokenIn,
}

impl AliDevice {
    pub fn new(server: SocketAddr, pk: &str, dn: &str, secret: &str) -> AliDevice {
        AliDevice {
            peer: Peer::new(server),
            pk: pk.into(),
            dn: dn.into(),
            secret: secret.into(),
            token: None,
            key: None,
            seq: 0,
            token_in: TokenIn::Option2088,
        }
    }

    /// An `/auth` body signed with `method`; `extra` fields are added (and signed).
    pub fn auth_body(&self, method: SignMethod, extra: &[(&str, Value)]) -> Value {
        let mut body = json!({
            "productKey": self.pk,
            "deviceName": self.dn,
            "clientId": format!("{}&{}", self.pk, self.dn),
            "signmethod": method.name(),
        });
        for (k, v) in extra {
            body[*k] = v.clone();
        }
        let fields: Vec<(String, String)> = body
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
            .collect();
        let content = auth_content(fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        body["sign"] = Value::String(method.sign_hex(self.secret.as_bytes(), content.as_bytes()));
        body
    }

    pub fn auth_request(&mut self, body: &[u8], content_format: Option<u32>, accept: Option<u32>) -> Vec<u8> {
        let mid = self.peer.next_mid();
        let token = self.peer.next_token();
        let mut b =
            MessageBuilder::new(MessageType::Con, Code::POST, mid, &token).option(OptionNumber::URI_PATH, b"auth");
        if let Some(cf) = content_format {
            b = b.uint_option(OptionNumber::CONTENT_FORMAT, cf);
        }
        if let Some(a) = accept {
            b = b.uint_option(OptionNumber::ACCEPT, a);
        }
        b.payload(body).build()
    }

    /// Authenticates with hmacsha256 and JSON; keeps the token (and the AES key on 5682).
    pub fn auth(&mut self) -> Reply {
        let body = self.auth_body(SignMethod::HmacSha256, &[("seq", json!("1"))]);
        self.auth_with(&body)
    }

    pub fn auth_with(&mut self, body: &Value) -> Reply {
        let req = self.auth_request(body.to_string().as_bytes(), Some(50), Some(50));
        let reply = self.peer.exchange(&req);
        self.adopt(&reply);
        reply
    }

    /// Takes the token (and key) from a 2.05 `/auth` reply.
    pub fn adopt(&mut self, reply: &Reply) {
        if reply.code == Code::CONTENT {
            let v = reply.json();
            self.token = v["token"].as_str().map(str::to_string);
            if let Some(random) = v["random"].as_str() {
                self.key = Some(SessionKey::derive(&self.secret, random));
                self.seq = v["seqOffset"].as_u64().unwrap();
            }
        }
    }

    pub fn default_topic(&self) -> String {
        format!("/{}/{}/update", self.pk, self.dn)
    }

    /// Builds an uplink; on 5682 (a key is set) encrypts the payload and adds the next seq.
    pub fn uplink_request(&mut self, mtype: MessageType, topic: &str, payload: &[u8]) -> Vec<u8> {
        let seq = self.key.as_ref().map(|_| {
            self.seq += 1;
            self.seq
        });
        self.uplink_with_seq(mtype, topic, payload, seq)
    }

    pub fn uplink_with_seq(&mut self, mtype: MessageType, topic: &str, payload: &[u8], seq: Option<u64>) -> Vec<u8> {
        let mid = self.peer.next_mid();
        let ctoken = self.peer.next_token();
        let token = self.token.clone().unwrap_or_default();
        let mut b = MessageBuilder::new(mtype, Code::POST, mid, &ctoken);
        let mut segments: Vec<String> = vec!["topic".into()];
        segments.extend(topic.trim_start_matches('/').split('/').map(str::to_string));
        for s in &segments {
            b = b.option(OptionNumber::URI_PATH, s.as_bytes());
        }
        if self.token_in == TokenIn::Query {
            b = b.option(OptionNumber::URI_QUERY, format!("token={token}").as_bytes());
        }
        b = b.uint_option(OptionNumber::ACCEPT, 42);
        if self.token_in == TokenIn::Option61 {
            b = b.option(OptionNumber::ALI_TOKEN_61, token.as_bytes());
        }
        if self.token_in == TokenIn::Option2088 {
            b = b.option(OptionNumber::ALI_TOKEN, token.as_bytes());
        }
        let body = match &self.key {
            Some(key) => {
                if let Some(seq) = seq {
                    b = b.option(OptionNumber::ALI_SEQ, &key.encrypt_seq(seq));
                }
                if payload.is_empty() { Vec::new() } else { key.encrypt(payload) }
            }
            None => payload.to_vec(),
        };
        b.payload(&body).build()
    }

    /// `POST /pull` on 5682: token in 2088, encrypted seq in 2089, encrypted `{"pageSize":..}`.
    pub fn pull_request(&mut self, page_size: u32) -> Vec<u8> {
        let key = self.key.clone().unwrap();
        self.seq += 1;
        let mid = self.peer.next_mid();
        let token = self.peer.next_token();
        MessageBuilder::new(MessageType::Con, Code::POST, mid, &token)
            .option(OptionNumber::URI_PATH, b"pull")
            .uint_option(OptionNumber::CONTENT_FORMAT, 50)
            .option(OptionNumber::ALI_TOKEN, self.token.clone().unwrap().as_bytes())
            .option(OptionNumber::ALI_SEQ, &key.encrypt_seq(self.seq))
            .payload(&key.encrypt(json!({"pageSize": page_size.to_string()}).to_string().as_bytes()))
            .build()
    }

    pub fn send_uplink(&mut self, payload: &[u8]) -> Reply {
        let topic = self.default_topic();
        let req = self.uplink_request(MessageType::Con, &topic, payload);
        self.peer.exchange(&req)
    }
}

/// Runs a libcoap client (`openssl` or `gnutls`) and returns what it printed.
pub fn coap_client(tls: &str, args: &[&str]) -> String {
    let bin = format!("coap-client-{tls}");
    let out = Command::new(&bin)
        .args(["-B", "5"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e} (apt-get install libcoap3-bin)"));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A CON POST to `path`, with the token in option 2088 when given (what DTLS tests send inside
/// a session).
pub fn coap_post(mid: u16, path: &[&str], token: Option<&str>, payload: &[u8]) -> Vec<u8> {
    let mut b = MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes());
    for p in path {
        b = b.option(OptionNumber::URI_PATH, p.as_bytes());
    }
    if let Some(t) = token {
        b = b.option(OptionNumber::ALI_TOKEN, t.as_bytes());
    }
    b.payload(payload).build()
}

/// The Link SDK 4.x DTLS identity of a device and its derived PSK (uppercase hex, as text), with
/// the fixed timestamp the SDK sends.
pub fn link_sdk_identity(method: SignMethod, pk: &str, dn: &str, secret: &str) -> (String, Vec<u8>) {
    const TIMESTAMP: &str = "2524608000000";
    let identity = format!("devicename|{}|{pk}&{dn}|{TIMESTAMP}", method.name());
    (identity, nbhub::dtls::psk::link_sdk_psk(method, secret, pk, dn, TIMESTAMP))
}

/// Carries a simulated device's CoAP datagrams: plain UDP, or a DTLS session.
pub trait Wire {
    fn send(&mut self, data: &[u8]);
    fn recv(&mut self, within: Duration) -> Option<Vec<u8>>;
}

impl Wire for Peer {
    fn send(&mut self, data: &[u8]) {
        Peer::send(self, data)
    }
    fn recv(&mut self, within: Duration) -> Option<Vec<u8>> {
        self.recv_within(within)
    }
}

impl Wire for nbhub::dtls::client::DtlsClient {
    fn send(&mut self, data: &[u8]) {
        nbhub::dtls::client::DtlsClient::send(self, data).expect("send inside the session");
    }
    fn recv(&mut self, within: Duration) -> Option<Vec<u8>> {
        nbhub::dtls::client::DtlsClient::recv(self, within)
    }
}

/// The RFC 9146 Connection ID client (`tests/cid_client`, on wolfSSL; `scripts/install-deps`
/// builds it), driven line by line over its stdin and stdout.
pub struct CidClient {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    /// Whether the handshake negotiated a CID.
    pub cid: bool,
    /// The source port it sends from.
    pub port: u16,
}

impl CidClient {
    /// Handshakes with `server` as PSK `identity`, offering `cid` (hex, "-" for an empty CID,
    /// "none" for no extension).
    pub fn connect(server: SocketAddr, identity: &str, psk: &[u8], suite: &str, cid: &str) -> CidClient {
        use std::io::BufRead;
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cid-client/nbhub-cid-client");
        assert!(bin.exists(), "{} is missing: run scripts/install-deps (it builds it)", bin.display());
        let mut child = Command::new(bin)
            .args([&server.ip().to_string(), &server.port().to_string(), identity, &hex::encode(psk), suite, cid])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the CID client");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.first(), Some(&"ok"), "handshake: {line}");
        let value = |k: &str| fields.iter().find_map(|f| f.strip_prefix(k)).unwrap().to_string();
        CidClient { cid: value("cid=") == "1", port: value("port=").parse().unwrap(), out, child }
    }

    fn command(&mut self, line: &str) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let mut answer = String::new();
        self.out.read_line(&mut answer).unwrap();
        answer.trim_end().to_string()
    }

    /// Moves to a new socket (a new source port, as after a NAT rebinding), keeping the session.
    pub fn rebind(&mut self) -> u16 {
        let answer = self.command("rebind");
        self.port = answer.strip_prefix("port ").expect(&answer).parse().unwrap();
        self.port
    }

    /// Sends the last datagram again, byte for byte.
    pub fn replay(&mut self) {
        assert_eq!(self.command("replay"), "replayed");
    }
}

impl Wire for CidClient {
    fn send(&mut self, data: &[u8]) {
        let answer = self.command(&format!("send {}", hex::encode(data)));
        assert_eq!(answer, "sent");
    }

    fn recv(&mut self, within: Duration) -> Option<Vec<u8>> {
        let answer = self.command(&format!("recv {}", within.as_millis()));
        answer.strip_prefix("data ").map(|h| hex::decode(h).unwrap())
    }
}

impl Drop for CidClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated Huawei LiteOS device (`oc_coap` agent): binds with `POST /t/r?ep=`, takes the
/// token of the server's `GET /t/d` observe request, reports as NON 2.05 notifications and
/// answers `POST /t/d` commands.
pub struct HuaweiDevice<W: Wire = Peer> {
    pub wire: W,
    pub node: String,
    pub token: Vec<u8>,
    mid: u16,
    observe: u8,
}

impl HuaweiDevice<Peer> {
    pub fn new(server: SocketAddr, node: &str) -> HuaweiDevice<Peer> {
        HuaweiDevice::over(Peer::new(server), node)
    }

    /// Moves to a new source port, as after a NAT rebinding.
    pub fn rebind_port(&mut self) {
        self.wire = Peer::new(self.wire.server);
    }
}

impl<W: Wire> HuaweiDevice<W> {
    pub fn over(wire: W, node: &str) -> HuaweiDevice<W> {
        HuaweiDevice { wire, node: node.into(), token: Vec::new(), mid: rand_u16(), observe: 0 }
    }

    fn next_mid(&mut self) -> u16 {
        self.mid = self.mid.wrapping_add(1);
        self.mid
    }

    /// Sends the bind request and returns the server's ACK to it.
    pub fn bind_request(&mut self) -> Reply {
        let mid = self.next_mid();
        let req = MessageBuilder::new(MessageType::Con, Code::POST, mid, &[0xb1, 0x9d])
            .option(OptionNumber::URI_PATH, b"t")
            .option(OptionNumber::URI_PATH, b"r")
            .option(OptionNumber::URI_QUERY, format!("ep={}", self.node).as_bytes())
            .build();
        self.wire.send(&req);
        let reply = self.recv_reply(Duration::from_secs(5)).expect("an answer to the bind");
        assert_eq!((reply.mtype, reply.mid), (MessageType::Ack, mid), "the bind's ACK");
        reply
    }

    /// Binds and accepts the server's observe request (answered 2.05 as LiteOS does).
    pub fn bind(&mut self) {
        assert_eq!(self.bind_request().code, Code::CHANGED);
        let get = self.recv_reply(Duration::from_secs(5)).expect("the server's GET /t/d");
        assert_eq!((get.mtype, get.code), (MessageType::Con, Code::GET));
        assert_eq!(get.options.first().map(|(n, v)| (*n, v.len())), Some((6, 0)), "Observe 0 comes first");
        assert_eq!(get.path(), ["t", "d"]);
        self.token = get.token.clone();
        self.answer(&get, Code::CONTENT, b"");
    }

    /// A notification (NON 2.05 with the observe token), as LiteOS reports data.
    pub fn report(&mut self, payload: &[u8]) {
        let data = self.notification(MessageType::Non, payload);
        self.wire.send(&data);
    }

    /// A CON notification, and the server's Empty ACK that says it is stored.
    pub fn report_confirmed(&mut self, payload: &[u8]) {
        let data = self.notification(MessageType::Con, payload);
        self.wire.send(&data);
        let ack = self.recv_reply(Duration::from_secs(5)).expect("the report's ACK");
        assert_eq!((ack.mtype, ack.code, ack.token.len()), (MessageType::Ack, Code::EMPTY, 0));
    }

    pub fn notification(&mut self, mtype: MessageType, payload: &[u8]) -> Vec<u8> {
        self.observe = self.observe.wrapping_add(1);
        let mid = self.next_mid();
        MessageBuilder::new(mtype, Code::CONTENT, mid, &self.token)
            .option(OptionNumber::OBSERVE, &[self.observe])
            .payload(payload)
            .build()
    }

    /// The next datagram from the server, parsed.
    pub fn recv_reply(&mut self, within: Duration) -> Option<Reply> {
        self.wire.recv(within).map(|d| Reply::parse(&d))
    }

    /// The next command (`POST /t/d` CON) within `within`.
    pub fn command(&mut self, within: Duration) -> Option<Reply> {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let r = self.recv_reply(left)?;
            if r.mtype == MessageType::Con && r.code == Code::POST {
                assert_eq!(r.path(), ["t", "d"]);
                assert_eq!(r.token, self.token, "commands carry the observe token");
                return Some(r);
            }
        }
        None
    }

    /// ACKs a CON from the server with a piggybacked response.
    pub fn answer(&mut self, con: &Reply, code: Code, payload: &[u8]) {
        let mut b = MessageBuilder::new(MessageType::Ack, code, con.mid, &con.token);
        if !payload.is_empty() {
            b = b.uint_option(OptionNumber::CONTENT_FORMAT, 0);
        }
        let ack = b.payload(payload).build();
        self.wire.send(&ack);
    }
}

impl Reply {
    /// Uri-Path segments.
    pub fn path(&self) -> Vec<String> {
        self.options.iter().filter(|(n, _)| *n == 11).map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect()
    }
}

impl Server {
    /// Moves the server's wall clock forward (it runs with `NBHUB_ADMIN_CLOCK_CONTROL=true`).
    pub fn advance_clock(&self, by: Duration) {
        self.admin()
            .post("/api/v1/clock/advance", &json!({"milliseconds": by.as_millis() as u64}))
            .expect("move the clock");
    }

    /// Queues a command; returns the created command.
    pub fn send_command(&self, pk: &str, dn: &str, body: Value) -> Value {
        self.admin().post(&format!("/api/v1/products/{pk}/devices/{dn}/commands"), &body).expect("create command")
    }

    pub fn command(&self, id: &str) -> Value {
        self.admin().get(&format!("/api/v1/commands/{id}")).expect("read command")
    }

    /// Waits (bounded) until the device's view satisfies `ok`; returns it.
    pub fn wait_device(&self, pk: &str, dn: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let read = || self.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).expect("read device");
        eventually(read, |d| ok(d), |d| format!("device {pk}/{dn} never got there: {d}"))
    }

    /// Waits (bounded) until the command reaches `status`; returns it.
    pub fn wait_command(&self, id: &str, status: &str) -> Value {
        eventually(
            || self.command(id),
            |c| c["status"] == status,
            |c| format!("command {id} never became {status}: {c}"),
        )
    }
}

/// One POST a webhook receiver took.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON event")
    }
}

/// A loopback TCP port nothing listens on yet (for a subscriber or broker that starts later).
/// An admin API refusal's status and message (panics on anything else).
pub fn api_error<T: std::fmt::Debug>(r: Result<T, nbhub::client::ClientError>) -> (u16, String) {
    match r {
        Err(nbhub::client::ClientError::Api { status, message, .. }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub fn reserve_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A webhook subscriber: a real HTTP/1.1 server on loopback (keep-alive, Content-Length bodies)
/// that records every POST and answers 200.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<Delivery>>>,
}

impl WebhookReceiver {
    pub fn start() -> WebhookReceiver {
        WebhookReceiver::start_on("127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(addr: SocketAddr) -> WebhookReceiver {
        let listener = std::net::TcpListener::bind(addr).expect("bind the webhook receiver");
        let addr = listener.local_addr().unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let sink = sink.clone();
                std::thread::spawn(move || serve_http(conn, &sink));
            }
        });
        WebhookReceiver { addr, received }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn events(&self) -> Vec<Delivery> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (bounded) until `ok` holds for what arrived; returns it.
    pub fn wait(&self, what: &str, ok: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        eventually(|| self.events(), |got| ok(got), |got| format!("webhook receiver never saw {what}: {got:#?}"))
    }
}

fn serve_http(conn: std::net::TcpStream, sink: &std::sync::Mutex<Vec<Delivery>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut out = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        sink.lock().unwrap().push(Delivery { path, headers, body });
        if out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

/// Reads until `ok` holds (within 20 s) and returns what was read; else fails with `why`.
pub fn eventually<T>(read: impl Fn() -> T, ok: impl Fn(&T) -> bool, why: impl Fn(&T) -> String) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = read();
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{}", why(&v));
        std::thread::sleep(Duration::from_millis(20));
    }
}

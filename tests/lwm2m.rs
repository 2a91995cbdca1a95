//! LwM2M devices against the real server over UDP, driven by an independent client:
//! lwm2m-node-lib (npm), through `tests/lwm2m/client.js`, which `scripts/install-deps` installs.
//! The client prints one JSON event per line and takes steps on its stdin.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::agent_tiny::Driver;
use common::ota;
use common::*;
use nbhub::coap::message::{Code, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::simulate::agent_tiny::AgentTiny;
use serde_json::{Value, json};

/// The client process, its stdin for steps and its events as they come.
struct Client {
    child: Child,
    steps: ChildStdin,
    events: mpsc::Receiver<Value>,
}

impl Client {
    fn start(server: &Server, endpoint: &str, lifetime_s: u32, binding: &str) -> Client {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/lwm2m");
        let port = server.endpoints.coap.port().to_string();
        let lt = lifetime_s.to_string();
        let mut child = Command::new("node")
            .current_dir(dir)
            .args(["client.js", "--host", "127.0.0.1", "--port", &port, "--ep", endpoint, "--lt", &lt])
            .args(["--binding", binding, "--single-socket", "--ack-timeout", "0.5", "--timeout", "30000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs tests/lwm2m/client.js (scripts/install-deps installs it)");
        let steps = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Client { child, steps, events }
    }

    fn step(&mut self, step: &str) {
        writeln!(self.steps, "{step}").unwrap();
    }

    /// The next event named `ev` within `within`, skipping others.
    fn expect(&mut self, ev: &str, within: Duration) -> Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["ev"] == ev => return v,
                Ok(v) if v["ev"] == "error" || v["ev"] == "timeout" => panic!("the client failed: {v}"),
                Ok(_) => continue,
                Err(_) => panic!("no {ev} event within {within:?}"),
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lwm2m_device(server: &Server, node: &str) -> (String, String) {
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "lwm2m meters", "awake_window_s": 30})).unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": node})).unwrap();
    (pk, d["device_name"].as_str().unwrap().to_string())
}

fn messages(server: &Server, pk: &str, dn: &str) -> Vec<Value> {
    let page = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/messages")).unwrap();
    page["messages"].as_array().cloned().unwrap_or_default()
}

#[test]
fn an_lwm2m_client_registers_reports_takes_a_command_updates_and_deregisters() {
    let server = Server::start();
    let node = "863921034567891";
    let (pk, dn) = lwm2m_device(&server, node);
    let mut client = Client::start(&server, node, 60, "UQ");
    client.expect("registered", Duration::from_secs(10));
    // After every Register the server observes /19/0/0.
    let observe = client.expect("observe", Duration::from_secs(10));
    assert_eq!(observe["path"], "/19/0/0", "{observe}");
    let device = server.wait_device(&pk, &dn, |d| d["registration"].is_object());
    let registration = &device["registration"];
    assert_eq!((registration["lifetime_s"].as_u64(), registration["queue_mode"].as_bool()), (Some(60), Some(true)));
    assert!(registration["objects"].as_array().unwrap().iter().any(|o| o == "/19/0"), "{registration}");

    // A notification of /19/0/0 is stored as the device's data.
    client.step("notify:/19/0/0=cafe0001ff00");
    let stored = eventually(
        || messages(&server, &pk, &dn),
        |m| !m.is_empty(),
        |m| format!("the notification was not stored: {m:?}"),
    );
    assert_eq!(stored[0]["topic"], "/19/0/0");
    assert_eq!(STANDARD.decode(stored[0]["payload_base64"].as_str().unwrap()).unwrap(), [0xca, 0xfe, 0, 1, 0xff, 0]);

    // A command goes down as a Write to /19/1/0; the client's 2.04 delivers it.
    let command = server.send_command(&pk, &dn, json!({"payload_base64": STANDARD.encode([1, 2, 0x80, 0xff])}));
    let write = client.expect("write", Duration::from_secs(10));
    assert_eq!(write["path"], "/19/1/0", "{write}");
    assert_eq!(write["hex"], "010280ff", "{write}");
    server.wait_command(command["command_id"].as_str().unwrap(), "DELIVERED");

    client.step("update");
    client.expect("updated", Duration::from_secs(10));
    client.step("deregister");
    client.expect("deregistered", Duration::from_secs(10));
    server.wait_device(&pk, &dn, |d| d["registration"].is_null());
    client.step("exit");
}

#[test]
fn a_registration_survives_kill_9_and_an_unknown_endpoint_is_refused() {
    let mut server = Server::start();
    let node = "863921034567892";
    let (pk, dn) = lwm2m_device(&server, node);
    let mut client = Client::start(&server, node, 300, "U");
    client.expect("registered", Duration::from_secs(10));
    client.expect("observe", Duration::from_secs(10));
    server.wait_device(&pk, &dn, |d| d["registration"].is_object());
    drop(client);
    server.kill9();
    server.restart();
    let device = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(device["registration"]["lifetime_s"], 300, "{device}");
    // Its relation survived too: a command waits for the device, queued.
    let command = server.send_command(&pk, &dn, json!({"payload_base64": STANDARD.encode(b"x")}));
    assert_eq!(server.command(command["command_id"].as_str().unwrap())["status"], "PENDING");

    // An endpoint no device has gets 4.03 and never registers.
    let stranger = Client::start(&server, "000000000000000", 60, "U");
    let refused = stranger.events.recv_timeout(Duration::from_secs(10)).expect("an event");
    assert_eq!(refused["ev"], "error", "{refused}");
}

#[test]
fn a_register_inside_dtls_is_answered_for_the_psk_identity_only() {
    let server = Server::start();
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "lwm2m over dtls"})).unwrap();
    let pk = p["product_key"].as_str().unwrap();
    let (node, key) = ("863921034567893", "lwm2m-psk-key");
    let psk_hex = hex::encode(key);
    admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": node, "psk_hex": psk_hex})).unwrap();
    admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": "863921034567894"})).unwrap();
    // libcoap's client, an independent DTLS stack: PSK identity = endpoint = node id.
    let register = |ep: &str| {
        let uri = format!("coaps://127.0.0.1:{}/rd?ep={ep}&lt=60&b=UQ", server.endpoints.dtls.port());
        Command::new("coap-client-openssl")
            .args(["-B", "3", "-m", "post", "-t", "40", "-u", node, "-k", key, "-e", "</3/0>,</19/0>", &uri])
            .output()
            .expect("coap-client-openssl (apt-get install libcoap3-bin)")
    };
    register(node);
    server.wait_metric(r#"nbhub_auth_total{result="ok",kind="register"}"#, |v| v == 1.0);
    // Another device's endpoint inside this device's session is refused.
    register("863921034567894");
    server.wait_metric(r#"nbhub_refusals_total{dialect="lwm2m",reason="foreign_identity"}"#, |v| v == 1.0);
    assert_eq!(server.metric(r#"nbhub_auth_total{result="ok",kind="register"}"#), 1.0);
}

/// A hand-driven client on its own UDP socket, for what lwm2m-node-lib cannot do or does
/// differently: agent_tiny's observe answer with data, bootstrap, requests from a stranger.
fn raw(server: &Server) -> Peer {
    Peer::new(server.endpoints.coap)
}

fn request(peer: &mut Peer, code: Code, path: &[&str], query: &[&str], payload: &[u8]) -> Vec<u8> {
    let mid = peer.next_mid();
    let token = peer.next_token();
    let mut b = MessageBuilder::new(MessageType::Con, code, mid, &token);
    for p in path {
        b = b.option(OptionNumber::URI_PATH, p.as_bytes());
    }
    if !payload.is_empty() {
        b = b.uint_option(OptionNumber::CONTENT_FORMAT, 40);
    }
    for q in query {
        b = b.option(OptionNumber::URI_QUERY, q.as_bytes());
    }
    b.payload(payload).build()
}

/// Sends a request; the server's answer and, if any, the CON request it sends next.
fn ask(peer: &mut Peer, code: Code, path: &[&str], query: &[&str], payload: &[u8]) -> (Reply, Option<Reply>) {
    let data = request(peer, code, path, query, payload);
    Wire::send(peer, &data);
    let (mut answer, mut request) = (None, None);
    // Any request of the server's follows its answer at once.
    let within = |answered: bool| Duration::from_millis(if answered { 1000 } else { 5000 });
    while let Some(d) = Wire::recv(peer, within(answer.is_some())) {
        let r = Reply::parse(&d);
        match r.mtype {
            MessageType::Ack => answer = Some(r),
            MessageType::Con => request = Some(r),
            _ => {}
        }
        if answer.is_some() && (request.is_some() || answer.as_ref().is_some_and(|a| a.code.class() != 2)) {
            break;
        }
    }
    (answer.expect("an answer"), request)
}

fn ack(peer: &mut Peer, to: &Reply, code: Code, payload: &[u8]) {
    Wire::send(peer, &MessageBuilder::new(MessageType::Ack, code, to.mid, &to.token).payload(payload).build());
}

#[test]
fn agent_tiny_style_data_in_the_observe_answer_and_a_strangers_requests_over_udp() {
    let server = Server::start();
    let node = "863921034567895";
    let (pk, dn) = lwm2m_device(&server, node);
    let mut device = raw(&server);
    let ep = format!("ep={node}");
    // Malformed links change nothing.
    let (bad, _) = ask(&mut device, Code::POST, &["rd"], &[&ep], b"</3/0");
    assert_eq!(bad.code, Code::BAD_REQUEST);
    let (created, get) = ask(&mut device, Code::POST, &["rd"], &[&ep, "b=UQ", "lt=600"], b"</3/0>,</19/0>");
    assert_eq!(created.code, Code::CREATED);
    let get = get.expect("the observe request of /19/0/0");
    assert_eq!(get.path(), ["19", "0", "0"]);
    // A payload in the observe answer is the first notification.
    ack(&mut device, &get, Code::CONTENT, b"\x01first");
    let stored = eventually(|| messages(&server, &pk, &dn), |m| !m.is_empty(), |m| format!("nothing stored: {m:?}"));
    assert_eq!(stored[0]["topic"], "/19/0/0");
    assert_eq!(STANDARD.decode(stored[0]["payload_base64"].as_str().unwrap()).unwrap(), b"\x01first");
    let registered = server.wait_device(&pk, &dn, |d| d["registration"].is_object());

    // Someone else who knows the node id: a Deregister is refused, an Update changes nothing
    // until an observe request sent to it is answered (here it is not).
    let mut stranger = raw(&server);
    let (refused, _) = ask(&mut stranger, Code::DELETE, &["rd", node], &[], b"");
    assert_eq!(refused.code, Code::FORBIDDEN);
    let (changed, probe) = ask(&mut stranger, Code::POST, &["rd", node], &["lt=1"], b"");
    assert_eq!(changed.code, Code::CHANGED);
    assert!(probe.is_some_and(|p| p.path() == ["19", "0", "0"]), "an observe request to the stranger");
    let device_now = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(device_now["registration"]["lifetime_s"], 600);
    assert_eq!(device_now["address"], registered["address"]);
    // The device itself deregisters.
    let (deleted, _) = ask(&mut device, Code::DELETE, &["rd", node], &[], b"");
    assert_eq!(deleted.code, Code::DELETED);
    server.wait_device(&pk, &dn, |d| d["registration"].is_null());
}

#[test]
fn a_bootstrap_over_udp_names_this_instance_and_keeps_psks_out_of_clear_text() {
    let server = Server::start();
    let node = "863921034567896";
    lwm2m_device(&server, node);
    let mut client = raw(&server);
    let ep = format!("ep={node}");
    let (changed, mut next) = ask(&mut client, Code::POST, &["bs"], &[&ep], b"");
    assert_eq!(changed.code, Code::CHANGED);
    let mut steps = Vec::new();
    while let Some(step) = next.take() {
        steps.push((step.code, step.path().join("/"), step.payload.clone()));
        ack(&mut client, &step, Code::CHANGED, b"");
        next = Wire::recv(&mut client, Duration::from_secs(2))
            .map(|d| Reply::parse(&d))
            .filter(|r| r.mtype == MessageType::Con);
    }
    let order: Vec<(Code, &str)> = steps.iter().map(|(c, p, _)| (*c, p.as_str())).collect();
    assert_eq!(order, [(Code::DELETE, ""), (Code::PUT, "0/1"), (Code::PUT, "1/0"), (Code::POST, "bs")]);
    let uri = format!("coap://127.0.0.1:{}", server.endpoints.coap.port());
    let security = &steps[1].2;
    assert!(security.windows(uri.len()).any(|w| w == uri.as_bytes()), "the server URI in {security:?}");

    // A device with a PSK asking in clear is refused: its key would travel unencrypted.
    let admin = server.admin();
    let product = admin.post("/api/v1/products", &json!({"name": "keyed"})).unwrap();
    let keyed = "863921034567897";
    let body = json!({"node_id": keyed, "psk_hex": hex::encode(b"psk-key")});
    admin.post(&format!("/api/v1/products/{}/devices", product["product_key"].as_str().unwrap()), &body).unwrap();
    let ep = format!("ep={keyed}");
    let (refused, provisioning) = ask(&mut client, Code::POST, &["bs"], &[&ep], b"");
    assert_eq!(refused.code, Code::FORBIDDEN);
    assert!(provisioning.is_none());
}

/// A product whose packages travel over Object 5, with one device of node id `node`.
fn firmware_device(server: &Server, node: &str) -> (String, String) {
    let admin = server.admin();
    let body = json!({"name": "lwm2m firmware", "ota_protocol": "lwm2m", "awake_window_s": 30, "ack_timeout_ms": 500});
    let pk = admin.post("/api/v1/products", &body).unwrap()["product_key"].as_str().unwrap().to_string();
    let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": node})).unwrap();
    (pk, d["device_name"].as_str().unwrap().to_string())
}

#[test]
fn lwm2m_node_lib_downloads_its_firmware_block_wise_over_object_5() {
    let server = Server::start_with(&ota::FAST);
    let node = "863921034567898";
    let (pk, dn) = firmware_device(&server, node);
    let mut client = Client::start(&server, node, 300, "U");
    client.expect("registered", Duration::from_secs(10));
    client.expect("observe", Duration::from_secs(10));
    // The new firmware reports this version once it runs.
    client.step("set:/5/0/7=V2.0");
    let data = ota::package_bytes(3000);
    let package = ota::upload(&server, &pk, "V2.0", &data, 500, "");
    let task = ota::start_task(&server, &package, &pk, &[&dn], None);
    // The server writes the package URI; the library fetches it with Block2 and checks it.
    let write = client.expect("write", Duration::from_secs(15));
    assert_eq!(write["path"], "/5/0/1", "{write}");
    let uri = write["text"].as_str().unwrap();
    let expected = format!("coap://127.0.0.1:{}/fw/{task}/", server.endpoints.coap.port());
    assert!(uri.starts_with(&expected) && !uri.contains('?'), "{uri}");
    let downloaded = client.expect("fw-downloaded", Duration::from_secs(20));
    assert_eq!(downloaded["size"], 3000, "{downloaded}");
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    assert_eq!(downloaded["sha256"], digest.as_str(), "the package arrives whole");
    let execute = client.expect("execute", Duration::from_secs(15));
    assert_eq!(execute["path"], "/5/0/2", "{execute}");
    let done = ota::wait_task(&server, &task, "finished");
    let entry = ota::device_entry(&done, &dn);
    assert_eq!((entry["state"].as_str(), entry["progress"].as_u64()), (Some("succeeded"), Some(100)), "{done}");
    let device = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(device["version"], "V2.0", "{device}");
    // The radio came from Object 4.
    assert_eq!((device["radio"]["rsrp"].as_f64(), device["radio"]["cell_id"].as_str()), (Some(-92.0), Some("46001")));
    client.step("exit");
}

#[test]
fn agent_tiny_resumes_a_download_across_kill_9_and_reports_under_its_pre_reboot_token() {
    let mut server = Server::start_with(&ota::FAST);
    let node = "863921034567899";
    let (pk, dn) = firmware_device(&server, node);
    let mut device = Driver::new(server.endpoints.coap, AgentTiny::new(node, "V1.0", "V2.0"));
    let code = |answer: Vec<u8>| Reply::parse(&answer).code;
    assert_eq!(code(device.register()), Code::CREATED);
    device.serve_until(Duration::from_secs(5), |d| d.served.iter().any(|s| s == "GET /19/0/0"));
    server.wait_device(&pk, &dn, |d| d["registration"].is_object());
    let data = ota::package_bytes(2900);
    let package = ota::upload(&server, &pk, "V2.0", &data, 500, "");
    let task = ota::start_task(&server, &package, &pk, &[&dn], None);
    device.serve_until(Duration::from_secs(15), |d| d.package_path.is_some());
    assert_eq!(
        &device.client.served[1..],
        ["GET /4/0/2", "GET /4/0/3", "GET /4/0/8", "GET /3/0/3", "GET /5/0/3", "PUT /5/0/1"],
        "radio, version, observation, URI"
    );
    // Three 512-byte blocks, then the server dies and comes back.
    assert!(!device.download(Some(3)));
    ota::eventually(
        || ota::task(&server, &task),
        |t| ota::device_entry(t, &dn)["state"] == "downloading",
        |t| format!("not downloading: {t}"),
    );
    server.restart();
    // The test's server comes back on new ports; a real one keeps 5683.
    device.peer.server = server.endpoints.coap;
    // The download resumes at the block it stopped at; the server may ask the state meanwhile.
    assert!(device.download(None));
    assert_eq!(device.client.downloaded, data, "the package arrives whole");
    let writes = device.client.served.iter().filter(|s| *s == "PUT /5/0/1").count();
    assert_eq!(writes, 1, "a client already downloading is not sent the URI again: {:?}", device.client.served);
    // A block past the end is refused and changes nothing.
    assert_eq!(code(device.fetch_block(6)), Code::BAD_OPTION);
    assert_eq!(Reply::parse(&device.notify_state(2)).mtype, MessageType::Ack);
    device.serve_until(Duration::from_secs(15), |d| d.state == 3);
    // The update reboots it: a new port, a new Register, then the result under the old token.
    device.reboot();
    let served = device.client.served.len();
    assert_eq!(code(device.register()), Code::CREATED);
    let report = Reply::parse(&device.notify_state(0));
    assert_eq!(report.mtype, MessageType::Ack, "acknowledged, never RST");
    device.serve_until(Duration::from_secs(20), |_| ota::task(&server, &task)["status"] == "finished");
    let done = ota::task(&server, &task);
    assert_eq!(ota::device_entry(&done, &dn)["state"], "succeeded", "{done}");
    assert!(device.client.served[served..].iter().any(|s| s == "GET /5/0/5"), "{:?}", device.client.served);
    let view = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(view["version"], "V2.0");
}

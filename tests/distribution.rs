//! Devices distributed between nbhub instances (SPEC §10): two or three real servers on
//! loopback, each with its own ports and data directory, configured as each other's peers.
//! Simulated devices bootstrap, authenticate at their home, get moved by a distribution task,
//! are refused at the old home, bootstrap again and carry on at the new one.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use nbhub::auth::sign::SignMethod;
use nbhub::coap::message::{Code, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use serde_json::{Value, json};

/// An instance named `name`; `env` adds to (or overrides) its cluster settings.
fn instance(name: &str, env: &[(&str, &str)]) -> Server {
    let mut all = vec![
        ("NBHUB_CLUSTER_NAME", name),
        ("NBHUB_CLUSTER_HOST", "127.0.0.1"),
        ("NBHUB_CLUSTER_POLL_S", "1"),
        ("NBHUB_CLUSTER_RETRY_AFTER_S", "1"),
    ];
    all.extend_from_slice(env);
    Server::start_with(&all)
}

/// Loopback ports of an instance: CoAP, AES, DTLS, admin.
type Ports = [u16; 4];

/// `server` as a peer entry of `cluster.peers`.
fn peer(name: &str, server: &Server) -> String {
    let e = &server.endpoints;
    peer_at(name, [e.coap.port(), e.aes.port(), e.dtls.port(), e.admin.port()])
}

/// The peer entry of an instance that is to listen on `ports`.
fn peer_at(name: &str, [coap, aes, dtls, admin]: Ports) -> String {
    format!(
        r#"{{ name = "{name}", host = "127.0.0.1", coap_port = {coap}, aes_port = {aes}, dtls_port = {dtls}, admin_url = "http://127.0.0.1:{admin}", token = "{TOKEN}" }}"#
    )
}

/// An instance started on `ports` its peers were told of beforehand.
fn instance_on(name: &str, ports: Ports) -> Server {
    let [coap, aes, dtls, admin] = ports.map(|p| format!("127.0.0.1:{p}"));
    let env = [
        ("NBHUB_COAP_LISTEN", coap),
        ("NBHUB_AES_LISTEN", aes),
        ("NBHUB_DTLS_LISTEN", dtls),
        ("NBHUB_ADMIN_LISTEN", admin),
    ];
    instance(name, &env.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>())
}

/// `POST /bootstrap`, signed like `/auth` unless `signed` is false.
fn bootstrap(dev: &mut AliDevice, signed: bool) -> Reply {
    let body = if signed {
        dev.auth_body(SignMethod::HmacSha256, &[])
    } else {
        json!({"productKey": dev.pk, "deviceName": dev.dn})
    };
    let mid = dev.peer.next_mid();
    let token = dev.peer.next_token();
    let req = MessageBuilder::new(MessageType::Con, Code::POST, mid, &token)
        .option(OptionNumber::URI_PATH, b"bootstrap")
        .uint_option(OptionNumber::CONTENT_FORMAT, 50)
        .payload(body.to_string().as_bytes())
        .build();
    dev.peer.exchange(&req)
}

/// Where a 2.05 bootstrap answer sends the device.
fn home_of(reply: &Reply) -> SocketAddr {
    assert_eq!(reply.code, Code::CONTENT, "bootstrap answered {:?}", reply.code);
    let coap = &reply.json()["resources"]["coap"];
    format!("{}:{}", coap["host"].as_str().unwrap(), coap["port"].as_u64().unwrap()).parse().unwrap()
}

/// Bootstraps until the answer names a home (a device being moved is told to ask again).
fn bootstrap_until_placed(dev: &mut AliDevice) -> SocketAddr {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reply = bootstrap(dev, true);
        if reply.code != Code::SERVICE_UNAVAILABLE {
            return home_of(&reply);
        }
        assert!(std::time::Instant::now() < deadline, "still told to wait");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create_task(server: &Server, body: Value) -> String {
    let task = server.admin().post("/api/v1/distribution/tasks", &body).expect("create a distribution task");
    task["task_id"].as_str().unwrap().to_string()
}

fn task(server: &Server, id: &str) -> Value {
    server.admin().get(&format!("/api/v1/distribution/tasks/{id}")).unwrap()
}

fn wait_task(server: &Server, id: &str, ok: impl Fn(&Value) -> bool) -> Value {
    eventually(|| task(server, id), |t| ok(t), |t| format!("task stayed {t}"))
}

fn device_statuses(server: &Server, id: &str) -> Vec<(String, String)> {
    let results = server.admin().get(&format!("/api/v1/distribution/tasks/{id}/devices")).unwrap();
    results["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["device_name"].as_str().unwrap().to_string(), d["status"].as_str().unwrap().to_string()))
        .collect()
}

fn create_device(server: &Server, pk: &str, body: Value) -> (String, String) {
    let d = server.admin().post(&format!("/api/v1/products/{pk}/devices"), &body).unwrap();
    (d["device_name"].as_str().unwrap().to_string(), d["device_secret"].as_str().unwrap().to_string())
}

#[test]
fn a_moved_device_is_refused_at_its_old_home_and_carries_on_at_the_new_one_with_its_commands() {
    let b = instance("b", &[]);
    let a = instance("a", &[("NBHUB_CLUSTER_PEERS", &format!("[{}]", peer("b", &b)))]);
    let admin = a.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "meters", "unsigned_bootstrap": true})).unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let (dn, secret) = create_device(&a, &pk, json!({"device_name": "ali-1"}));
    let (hw_dn, _) = create_device(&a, &pk, json!({"device_name": "hw-1", "node_id": "860000000000001"}));

    // At home on A: bootstrap names A (the port of the family asked on), the device works there.
    let mut dev = AliDevice::new(a.endpoints.coap, &pk, &dn, &secret);
    assert_eq!(home_of(&bootstrap(&mut dev, true)), a.endpoints.coap);
    let mut on_aes = AliDevice::new(a.endpoints.aes, &pk, &dn, &secret);
    assert_eq!(home_of(&bootstrap(&mut on_aes, true)), a.endpoints.aes);
    let mut forged = AliDevice::new(a.endpoints.coap, &pk, &dn, "not-the-secret");
    assert_eq!(bootstrap(&mut forged, true).code, Code::UNAUTHORIZED);
    assert_eq!(dev.auth().code, Code::CONTENT);
    assert_eq!(dev.send_uplink(b"before the move").code, Code::CHANGED);
    // Commands waiting for the Huawei device, asleep since it was registered.
    let commands: Vec<String> = ["first", "second"]
        .iter()
        .map(|p| {
            let body = json!({"payload_base64": base64(p.as_bytes()), "expire_time": 3600});
            a.send_command(&pk, &hw_dn, body)["command_id"].as_str().unwrap().to_string()
        })
        .collect();

    // The Huawei device's shadow goes with it.
    let shadow = format!("/api/v1/products/{pk}/devices/{hw_dn}/shadow");
    let wanted = a.admin().put(&shadow, &json!({"state": {"desired": {"Valve": {"open": 1}}}})).unwrap();

    let too_many: Vec<String> = (0..10_001).map(|i| format!("d{i}")).collect();
    let body = json!({"product_key": pk, "device_names": too_many, "policy": "specified", "instance": "b"});
    let refused = admin.post("/api/v1/distribution/tasks", &body);
    assert!(matches!(refused, Err(nbhub::client::ClientError::Api { status: 400, .. })), "{refused:?}");
    // The operator's CLI starts the task.
    let created: Value = serde_json::from_str(&a.cli(&["distribution", "move", &pk, "--to", "b"])).unwrap();
    let id = created["task_id"].as_str().unwrap().to_string();
    let done = wait_task(&a, &id, |t| t["status"] == "completed");
    assert_eq!(done["devices"], json!({"moved": 2}), "{done}");

    // The old home refuses the device and its old session; bootstrap names the new home.
    assert_eq!(dev.auth().code, Code::FORBIDDEN);
    assert_eq!(dev.send_uplink(b"too late").code, Code::UNAUTHORIZED);
    assert_eq!(home_of(&bootstrap(&mut dev, true)), b.endpoints.coap);
    assert_eq!(home_of(&bootstrap(&mut on_aes, true)), b.endpoints.aes);
    let mut hw = HuaweiDevice::new(a.endpoints.coap, "860000000000001");
    assert_eq!(hw.bind_request().code, Code::FORBIDDEN);
    // Over DTLS, with libcoap: the old home refuses the device's PSK, and bootstrap inside a
    // certificate session names the new home's DTLS port.
    let identity = format!("{pk}&{dn}");
    let psk_auth = |s: &Server| {
        let body = AliDevice::new(s.endpoints.dtls, &pk, &dn, &secret).auth_body(SignMethod::HmacSha256, &[]);
        let uri = format!("coaps://127.0.0.1:{}/auth", s.endpoints.dtls.port());
        coap_client(
            "openssl",
            &["-B", "3", "-m", "post", "-u", &identity, "-k", &secret, "-e", &body.to_string(), &uri],
        )
    };
    assert!(!psk_auth(&a).contains("token"), "the old home refused the handshake");
    assert!(psk_auth(&b).contains("token"), "the new home accepts it");
    let ca = dev_certs().join("dev-ca.crt");
    let body = dev.auth_body(SignMethod::HmacSha256, &[]).to_string();
    let uri = format!("coaps://localhost:{}/bootstrap", a.endpoints.dtls.port());
    let out = coap_client("openssl", &["-m", "post", "-R", ca.to_str().unwrap(), "-e", &body, &uri]);
    assert!(out.contains(&format!("\"port\":{}", b.endpoints.dtls.port())), "{out}");
    let view = admin.get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(view["home"], json!({"state": "moved", "instance": "b"}));
    let refused =
        admin.post(&format!("/api/v1/products/{pk}/devices/{hw_dn}/commands"), &json!({"payload_base64": "AQ=="}));
    assert!(matches!(refused, Err(nbhub::client::ClientError::Api { status: 409, .. })), "{refused:?}");

    // At the new home: same credentials, its data and its commands.
    let mut dev = AliDevice::new(b.endpoints.coap, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::CONTENT);
    assert_eq!(dev.send_uplink(b"after the move").code, Code::CHANGED);
    let stored: Vec<Vec<u8>> = b.stored(&pk, &dn).into_iter().map(|(_, p)| p).collect();
    assert_eq!(stored, vec![b"after the move".to_vec()]);
    assert_eq!(b.admin().get(&format!("/api/v1/products/{pk}")).unwrap()["unsigned_bootstrap"], true);
    let mut hw_dev = AliDevice::new(a.endpoints.coap, &pk, &hw_dn, "");
    assert_eq!(home_of(&bootstrap(&mut hw_dev, false)), b.endpoints.coap, "the product allows unsigned bootstrap");
    let moved: Vec<Value> = commands.iter().map(|c| a.command(c)).collect();
    for c in &moved {
        assert_eq!(c["status"], "MOVED", "{c}");
        assert!(c["reason"].as_str().unwrap().contains("instance b as command"), "{c}");
    }
    assert_eq!(b.admin().get(&shadow).unwrap(), wanted, "the shadow moved, version and times kept");
    assert_eq!(admin.get(&shadow).unwrap()["version"], 0, "and is gone from the old home");
    let mut hw = HuaweiDevice::new(b.endpoints.coap, "860000000000001");
    hw.bind();
    for expected in ["first", "second"] {
        let con = hw.command(Duration::from_secs(10)).expect("the moved command");
        assert_eq!(con.payload, expected.as_bytes());
        hw.answer(&con, Code::CHANGED, b"done");
    }
    for c in &moved {
        let new_id = c["reason"].as_str().unwrap().rsplit(' ').next().unwrap().to_string();
        let done = b.wait_command(&new_id, "SUCCESSFUL");
        assert_eq!(done["created_at"], c["created_at"], "it keeps its creation time: {done}");
        assert_eq!(done["payload_base64"], c["payload_base64"], "the reason names its own new id: {done}");
    }

    // Per-device results, as JSON and as CSV.
    let mut results = device_statuses(&a, &id);
    results.sort();
    assert_eq!(results, vec![(dn.clone(), "moved".into()), (hw_dn.clone(), "moved".into())]);
    let csv = a.cli(&["distribution", "results", &id, "--csv"]);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("device_name,status,batch,instance,error,updated_at"));
    assert_eq!(lines.filter(|l| l.contains(",moved,1,b,,")).count(), 2, "{csv}");

    // A device is never in two homes: the same device cannot be moved again from A.
    let again = admin.post(
        "/api/v1/distribution/tasks",
        &json!({"product_key": pk, "device_names": [dn], "policy": "specified", "instance": "b"}),
    );
    assert!(matches!(again, Err(nbhub::client::ClientError::Api { status: 409, .. })), "{again:?}");
}

/// A socket on another loopback address, so the server sees another source prefix.
fn device_from(source: &str, server: SocketAddr, pk: &str, dn: &str, secret: &str) -> AliDevice {
    let mut dev = AliDevice::new(server, pk, dn, secret);
    dev.peer.socket = UdpSocket::bind(format!("{source}:0")).unwrap();
    dev.peer.socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    dev
}

#[test]
fn the_nearest_policy_places_each_device_by_its_source_prefix_when_it_bootstraps() {
    let b = instance("b", &[]);
    let c = instance("c", &[]);
    let peers = format!("[{}, {}]", peer("b", &b), peer("c", &c));
    let nearest = r#"[{ cidr = "127.0.0.0/8", instance = "a" }, { cidr = "127.0.0.2/32", instance = "b" }, { cidr = "127.0.0.3/32", instance = "c" }]"#;
    let a = instance("a", &[("NBHUB_CLUSTER_PEERS", &peers), ("NBHUB_CLUSTER_NEAREST", nearest)]);
    let (pk, _, _) = a.product_and_device(json!({"name": "nearest"}));
    let devices: Vec<(String, String)> =
        (0..3).map(|i| create_device(&a, &pk, json!({"device_name": format!("n{i}")}))).collect();
    let id = create_task(&a, json!({"product_key": pk, "device_names": ["n0", "n1", "n2"], "policy": "nearest"}));
    // This product does not allow unsigned bootstrap.
    let (dn, secret) = &devices[0];
    assert_eq!(bootstrap(&mut AliDevice::new(a.endpoints.coap, &pk, dn, secret), false).code, Code::UNAUTHORIZED);
    wait_task(&a, &id, |t| t["status"] == "in_progress");
    // The product reached both instances the table names before any device moves.
    for s in [&b, &c] {
        assert!(s.admin().get(&format!("/api/v1/products/{pk}")).is_ok());
    }

    for ((dn, secret), (source, home)) in devices.iter().zip([("127.0.0.2", &b), ("127.0.0.3", &c), ("127.0.0.1", &a)])
    {
        let mut dev = device_from(source, a.endpoints.coap, &pk, dn, secret);
        let first = bootstrap(&mut dev, true);
        if home.endpoints.coap != a.endpoints.coap {
            assert_eq!(first.code, Code::SERVICE_UNAVAILABLE, "a device being moved is told to ask again");
            assert_eq!(first.option(14), Some(&[1u8][..]), "after cluster.retry_after_s (Max-Age)");
        }
        assert_eq!(bootstrap_until_placed(&mut dev), home.endpoints.coap, "{dn} from {source}");
        let mut there = device_from(source, home.endpoints.coap, &pk, dn, secret);
        assert_eq!(there.auth().code, Code::CONTENT, "{dn} authenticates at its home");
    }
    wait_task(&a, &id, |t| t["status"] == "completed");
    let mut results = device_statuses(&a, &id);
    results.sort();
    let expected: Vec<(String, String)> = [("n0", "moved"), ("n1", "moved"), ("n2", "stayed")]
        .iter()
        .map(|(d, s)| (d.to_string(), s.to_string()))
        .collect();
    assert_eq!(results, expected);
}

#[test]
fn a_grayscale_migration_waits_for_a_batch_that_has_not_reconnected_and_a_rollback_takes_back_the_rest() {
    let b = instance("b", &[]);
    let a = instance("a", &[("NBHUB_CLUSTER_PEERS", &format!("[{}]", peer("b", &b)))]);
    let (pk, _, _) = a.product_and_device(json!({"name": "gray"}));
    let devices: Vec<(String, String)> =
        (0..6).map(|i| create_device(&a, &pk, json!({"device_name": format!("g{i}")}))).collect();
    let names: Vec<&str> = devices.iter().map(|(d, _)| d.as_str()).collect();
    let id = create_task(
        &a,
        json!({"product_key": pk, "device_names": names, "policy": "specified", "instance": "b", "batch_size": 2}),
    );

    // Batch 1 moves, then waits: its devices have not connected at B.
    let t = wait_task(&a, &id, |t| t["devices"]["moved"] == 2);
    assert_eq!((t["batch"].as_u64(), t["batches"].as_u64()), (Some(1), Some(3)));
    std::thread::sleep(Duration::from_secs(3));
    let t = task(&a, &id);
    assert_eq!((t["batch"].as_u64(), &t["devices"]["pending"]), (Some(1), &json!(4)), "batch 2 must wait: {t}");

    // One device of the batch reconnects at B: still waiting for the other.
    let connect = |i: usize| {
        let (dn, secret) = &devices[i];
        let mut dev = AliDevice::new(a.endpoints.coap, &pk, dn, secret);
        let home = bootstrap_until_placed(&mut dev);
        assert_eq!(home, b.endpoints.coap);
        let mut dev = AliDevice::new(home, &pk, dn, secret);
        assert_eq!(dev.auth().code, Code::CONTENT);
        assert_eq!(dev.send_uplink(b"hello from b").code, Code::CHANGED);
    };
    connect(0);
    wait_task(&a, &id, |t| t["devices"]["seen"] == 1);
    // Paused and resumed, it goes on waiting where it was.
    let paused = a.admin().post(&format!("/api/v1/distribution/tasks/{id}/pause"), &json!({})).unwrap();
    assert_eq!(paused["status"], "paused");
    let resumed = a.admin().post(&format!("/api/v1/distribution/tasks/{id}/pause"), &json!({}));
    assert!(matches!(resumed, Err(nbhub::client::ClientError::Api { status: 409, .. })), "paused twice: {resumed:?}");
    a.admin().post(&format!("/api/v1/distribution/tasks/{id}/resume"), &json!({})).unwrap();
    wait_task(&a, &id, |t| t["status"] == "in_progress" && t["batch"] == 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(task(&a, &id)["batch"], 1);
    connect(1);
    // Now batch 2 moves and waits in turn.
    let t = wait_task(&a, &id, |t| t["batch"] == 2 && t["devices"]["moved"] == 2);
    assert_eq!(t["devices"]["pending"], 2, "{t}");

    // Paused, nothing moves; the rollback takes back batch 2 (never connected at B).
    a.admin().post(&format!("/api/v1/distribution/tasks/{id}/pause"), &json!({})).unwrap();
    let r = a.admin().post(&format!("/api/v1/distribution/tasks/{id}/rollback"), &json!({})).unwrap();
    assert_eq!((r["rolled_back"].as_u64(), r["stayed"].as_u64()), (Some(2), Some(2)), "{r}");
    assert_eq!(r["task"]["status"], "paused");
    for (dn, secret) in &devices[2..4] {
        let mut dev = AliDevice::new(a.endpoints.coap, &pk, dn, secret);
        assert_eq!(home_of(&bootstrap(&mut dev, true)), a.endpoints.coap, "{dn} is home again");
        assert_eq!(dev.auth().code, Code::CONTENT);
        assert!(b.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).is_err(), "{dn} is gone from b");
    }
    let mut statuses = device_statuses(&a, &id);
    statuses.sort();
    let counts = |s: &str| statuses.iter().filter(|(_, st)| st == s).count();
    assert_eq!((counts("seen"), counts("rolled_back"), counts("pending")), (2, 2, 2), "{statuses:?}");

    // Canceled, the task lets go of the devices it did not move: another task may take them.
    let t = a.admin().post(&format!("/api/v1/distribution/tasks/{id}/cancel"), &json!({})).unwrap();
    assert_eq!((&t["status"], &t["devices"]["canceled"]), (&json!("canceled"), &json!(2)), "{t}");
    let again = create_task(
        &a,
        json!({"product_key": pk, "device_names": ["g4", "g5"], "policy": "specified", "instance": "b"}),
    );
    wait_task(&a, &again, |t| t["status"] == "completed" && t["devices"]["moved"] == 2);
}

#[test]
fn a_destination_that_is_down_fails_the_task_cleanly_and_a_retry_completes_it() {
    // B's ports are chosen now and B started later, after the task failed.
    let ports: Ports = std::array::from_fn(|_| free_port());
    let mut a = instance("a", &[("NBHUB_CLUSTER_PEERS", &format!("[{}]", peer_at("b", ports)))]);
    let (pk, dn, secret) = a.product_and_device(json!({"name": "down"}));
    let id = create_task(&a, json!({"product_key": pk, "policy": "specified", "instance": "b"}));
    let failed = wait_task(&a, &id, |t| t["status"] == "failed");
    assert!(failed["error"].as_str().unwrap().contains(&ports[3].to_string()), "{failed}");
    // Nothing moved: the device is still served at A.
    let mut dev = AliDevice::new(a.endpoints.coap, &pk, &dn, &secret);
    assert_eq!(home_of(&bootstrap(&mut dev, true)), a.endpoints.coap);
    assert_eq!(dev.auth().code, Code::CONTENT);
    // The failed task survives a crash of its instance.
    a.kill9();
    a.restart();
    assert_eq!(task(&a, &id)["status"], "failed");
    let mut dev = AliDevice::new(a.endpoints.coap, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::CONTENT);

    let b = instance_on("b", ports);
    a.admin().post(&format!("/api/v1/distribution/tasks/{id}/retry"), &json!({})).unwrap();
    wait_task(&a, &id, |t| t["status"] == "completed" && t["devices"]["moved"] == 1);
    assert_eq!(dev.auth().code, Code::FORBIDDEN);
    let mut dev = AliDevice::new(b.endpoints.coap, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::CONTENT);
}

#[test]
fn a_move_whose_outcome_is_unknown_keeps_the_device_leaving_across_a_restart_until_a_retry_settles_it() {
    // B's admin port is first a hung peer: it accepts the product by hand, then never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_port = hung.local_addr().unwrap().port();
    let ports: Ports = [free_port(), free_port(), free_port(), admin_port];
    let peers = format!("[{}]", peer_at("b", ports));
    let env = [("NBHUB_CLUSTER_PEERS", peers.as_str()), ("NBHUB_CLUSTER_REQUEST_TIMEOUT_MS", "500")];
    let mut a = instance("a", &env);
    let (pk, dn, secret) = a.product_and_device(json!({"name": "hung"}));
    a.send_command(&pk, &dn, json!({"payload_base64": base64(b"kept"), "expire_time": 3600}));
    let peer = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = hung.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        let _ = conn.read(&mut buf).unwrap();
        let body = r#"{"devices":[]}"#;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n", body.len());
        write!(conn, "{head}connection: close\r\n\r\n{body}").unwrap();
        drop(conn);
        // The move: taken, never answered.
        let (conn, _) = hung.accept().unwrap();
        (hung, conn)
    });
    let id = create_task(&a, json!({"product_key": pk, "policy": "specified", "instance": "b"}));
    // Only B's answer can settle the device: the move is asked again, after a back-off.
    let asking = wait_task(&a, &id, |t| t["error"].as_str().is_some_and(|e| e.contains("outcome unknown")));
    assert_eq!((&asking["status"], &asking["devices"]), (&json!("in_progress"), &json!({"moving": 1})), "{asking}");
    let (hung, _conn) = peer.join().unwrap();
    // Neither here nor (as far as A knows) there: refused, and told to ask again later.
    let mut dev = AliDevice::new(a.endpoints.coap, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::FORBIDDEN);
    assert_eq!(bootstrap(&mut dev, true).code, Code::SERVICE_UNAVAILABLE);
    a.kill9();
    a.restart();
    let mut dev = AliDevice::new(a.endpoints.coap, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::FORBIDDEN, "still leaving after a crash");
    assert_eq!(bootstrap(&mut dev, true).code, Code::SERVICE_UNAVAILABLE);

    // The real B comes up on that port; the retry repeats the move at once and settles it.
    drop(hung);
    let b = instance_on("b", ports);
    a.admin().post(&format!("/api/v1/distribution/tasks/{id}/retry"), &json!({})).unwrap();
    wait_task(&a, &id, |t| t["status"] == "completed" && t["devices"]["moved"] == 1);
    assert_eq!(home_of(&bootstrap(&mut dev, true)), b.endpoints.coap);
    let commands = b.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/commands")).unwrap();
    assert_eq!(commands["commands"].as_array().unwrap().len(), 1, "the command moved once: {commands}");
}

#[test]
fn the_import_endpoint_takes_a_device_once_and_refuses_what_it_must_not_take() {
    let b = instance("b", &[]);
    let product = json!({"product_key": "pk1", "product_secret": "ps", "name": "p", "dynamic_registration": false,
                         "ota_protocol": "pcp", "awake_window_s": 20, "ack_timeout_ms": null, "max_retransmit": null});
    let device = |secret: &str| {
        json!({"device_name": "d1", "device_secret": secret, "node_id": null, "psk_hex": null, "enabled": true,
               "registered": false, "radio": {"rsrp": null, "sinr": null, "cell_id": null}, "version": null,
               "commands": [{"id": 7, "payload_base64": "AQ==", "topic": "/pk1/d1/get", "send_strategy": "delay",
                             "created_at": 1, "expires_at": 4_102_444_800_000u64}]})
    };
    let import = |source: &str, d: Value| {
        b.admin().post("/api/v1/distribution/imports", &json!({"source": source, "product": product, "devices": [d]}))
    };
    let first = import("a", device("s1")).unwrap();
    assert_eq!(first["devices"][0]["result"], "imported");
    let again = import("a", device("s1")).unwrap();
    assert_eq!(again["devices"][0]["result"], "already_here");
    assert_eq!(again["devices"][0]["commands"], first["devices"][0]["commands"], "the command is not queued twice");
    let commands = b.admin().get("/api/v1/products/pk1/devices/d1/commands").unwrap();
    assert_eq!(commands["commands"].as_array().unwrap().len(), 1);
    assert_eq!(import("a", device("s2")).unwrap()["devices"][0]["result"], "refused");
    // From this instance itself, an invalid product, or the product under another secret: refused whole.
    let status = |r: Result<Value, nbhub::client::ClientError>| match r {
        Err(nbhub::client::ClientError::Api { status, .. }) => status,
        other => panic!("{other:?}"),
    };
    assert_eq!(status(import("b", device("s1"))), 400);
    let mut bad = json!({"source": "a", "product": product, "devices": []});
    bad["product"]["product_secret"] = json!("other");
    assert_eq!(status(b.admin().post("/api/v1/distribution/imports", &bad)), 409);
    bad["product"]["awake_window_s"] = json!(0);
    assert_eq!(status(b.admin().post("/api/v1/distribution/imports", &bad)), 400);
}

/// A loopback port nothing listens on at the moment, over UDP nor TCP (another test's server
/// may still take it before the instance meant for it starts: the window is a second or two).
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

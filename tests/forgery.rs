//! What a request without a fresh proof of possession can change, tried over real UDP against the
//! real server from addresses other than the device's: copies of real requests (tokens and
//! signed bodies travel in the clear), truncated copies, spoofed binds and copied DTLS records.
//! Each is answered or refused as the README's table says and changes nothing: nothing stored,
//! no contact, no flow-control charge, no command delivered. Also: tokens belong to the port
//! family that issued them, and an answered `/auth` leaves the device a full token lifetime.

mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use nbhub::auth::sign::SignMethod;
use nbhub::coap::message::{Code, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use serde_json::{Value, json};

/// Tight flow control, so charged forgeries would show as a 4.29 (or a dropped report) to the
/// device: 5 a second, 7 a minute.
const TIGHT: [(&str, &str); 2] = [("NBHUB_DEVICE_MAX_PER_SECOND", "5"), ("NBHUB_DEVICE_MAX_PER_MINUTE", "7")];

fn device_view(server: &Server, pk: &str, dn: &str) -> Value {
    server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap()
}

/// Sends `data` from a fresh socket (another port: another "address" to the server) and returns
/// the answer, if any within `within`.
fn from_elsewhere(server: std::net::SocketAddr, data: &[u8], within: Duration) -> Option<Reply> {
    let peer = Peer::new(server);
    peer.send(data);
    peer.recv_within(within).map(|d| Reply::parse(&d))
}

#[test]
fn an_unproven_request_on_5682_changes_nothing_and_costs_the_device_nothing() {
    let server = Server::start_with(&TIGHT);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "aes"}));
    let mut d = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    assert_eq!(d.auth().code, Code::CONTENT);
    let home = d.peer.socket.local_addr().unwrap().to_string();
    let real = d.uplink_request(MessageType::Con, &d.default_topic(), b"real reading");
    let ok = d.peer.exchange(&real);
    assert_eq!(ok.code, Code::CHANGED);
    let before = device_view(&server, &pk, &dn);
    assert_eq!(before["address"], home.as_str());

    // Truncated copies of the real uplink: token kept, seq and payload cut off. Answered 2.04
    // (what Link SDK 4.x expects of its empty uplinks), with no message id: nothing was stored.
    let copy = nbhub::coap::message::Message::parse(&real).unwrap();
    let token = copy.option(OptionNumber::ALI_TOKEN).unwrap().to_vec();
    for i in 0..5u16 {
        let mut b = MessageBuilder::new(MessageType::Con, Code::POST, 100 + i, &[9, 9]);
        for s in ["topic", &pk, &dn, "update"] {
            b = b.option(OptionNumber::URI_PATH, s.as_bytes());
        }
        let forged = b.option(OptionNumber::ALI_TOKEN, &token).build();
        let answer = from_elsewhere(server.endpoints.aes, &forged, Duration::from_secs(5)).expect("an answer");
        assert_eq!(answer.code, Code::CHANGED);
        assert_eq!(answer.option(2090), None, "no message id: nothing stored");
    }
    // A /pull without a seq would hand out commands: refused, and the command stays PENDING.
    let command = server.send_command(&pk, &dn, json!({"payload_base64": STANDARD.encode(b"open")}));
    let pull = MessageBuilder::new(MessageType::Con, Code::POST, 200, &[7])
        .option(OptionNumber::URI_PATH, b"pull")
        .option(OptionNumber::ALI_TOKEN, &token)
        .build();
    let answer = from_elsewhere(server.endpoints.aes, &pull, Duration::from_secs(5)).expect("an answer");
    assert_eq!(answer.code, Code::BAD_REQUEST);
    let id = command["command_id"].as_str().unwrap();
    assert_eq!(server.command(id)["status"], "PENDING");

    assert_eq!(server.stored(&pk, &dn), [(d.default_topic(), b"real reading".to_vec())]);
    let after = device_view(&server, &pk, &dn);
    assert_eq!((&after["address"], &after["last_seen"]), (&before["address"], &before["last_seen"]));
    // The device's budget is untouched: /auth, the real uplink and these three fit in it.
    for i in 0..3 {
        assert_eq!(d.send_uplink(format!("after {i}").as_bytes()).code, Code::CHANGED, "uplink {i}");
    }
    server.wait_metric("nbhub_refusals_total{dialect=\"alibaba\",reason=\"unproven\"}", |v| v == 6.0);
}

#[test]
fn a_replayed_pull_is_refused_and_delivers_nothing() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "aes"}));
    let mut d = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    assert_eq!(d.auth().code, Code::CONTENT);
    let first = server.send_command(&pk, &dn, json!({"payload_base64": STANDARD.encode(b"first")}));
    let key = d.key.clone().unwrap();
    d.seq += 1;
    let pull = MessageBuilder::new(MessageType::Con, Code::POST, d.peer.next_mid(), &[1, 2])
        .option(OptionNumber::URI_PATH, b"pull")
        .uint_option(OptionNumber::CONTENT_FORMAT, 50)
        .option(OptionNumber::ALI_TOKEN, d.token.clone().unwrap().as_bytes())
        .option(OptionNumber::ALI_SEQ, &key.encrypt_seq(d.seq))
        .payload(&key.encrypt(br#"{"pageSize":"10"}"#))
        .build();
    assert_eq!(d.peer.exchange(&pull).code, Code::EMPTY);
    let answer = d.peer.recv();
    d.peer.send(&MessageBuilder::new(MessageType::Ack, Code::EMPTY, answer.mid, &[]).build());
    server.wait_command(first["command_id"].as_str().unwrap(), "DELIVERED");
    let before = device_view(&server, &pk, &dn);

    // The same datagram from elsewhere: its seq was seen.
    let second = server.send_command(&pk, &dn, json!({"payload_base64": STANDARD.encode(b"second")}));
    let replayer = Peer::new(server.endpoints.aes);
    replayer.send(&pull);
    assert_eq!(replayer.recv().code, Code::BAD_REQUEST);
    assert!(replayer.recv_within(Duration::from_millis(500)).is_none(), "no separate answer follows");
    assert_eq!(server.command(second["command_id"].as_str().unwrap())["status"], "PENDING");
    let after = device_view(&server, &pk, &dn);
    assert_eq!((&after["address"], &after["last_seen"]), (&before["address"], &before["last_seen"]));
    server.wait_metric("nbhub_refusals_total{dialect=\"alibaba\",reason=\"replayed_seq\"}", |v| v == 1.0);
    // The log names the rule and the device.
    let log = server.log();
    let line = log.lines().find(|l| l.contains("refused") && l.contains("replayed_seq")).expect("a refusal logged");
    assert!(line.contains(&dn) && line.contains(&pk), "{line}");
}

#[test]
fn a_copied_huawei_notification_from_elsewhere_neither_stores_nor_moves_the_downlink() {
    let server = Server::start_with(&TIGHT);
    let (pk, dn) = server.huawei_device("861234567890101", json!({"name": "meters", "awake_window_s": 30}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890101");
    dev.bind();
    let home = dev.wire.socket.local_addr().unwrap().to_string();
    let first = dev.notification(MessageType::Con, b"reading 1");
    dev.wire.send(&first);
    assert_eq!(dev.recv_reply(Duration::from_secs(5)).unwrap().mtype, MessageType::Ack);
    server.wait_device(&pk, &dn, |d| d["address"] == home.as_str());

    // Copies from other ports: a CON copy is acknowledged (so the copier stops), nothing more;
    // neither is stored or charged, and the device's address stays.
    for _ in 0..4 {
        let ack = from_elsewhere(server.endpoints.coap, &first, Duration::from_secs(5)).expect("an Empty ACK");
        assert_eq!((ack.mtype, ack.code), (MessageType::Ack, Code::EMPTY));
    }
    let non_copy = dev.notification(MessageType::Non, b"reading 2");
    dev.wire.send(&non_copy);
    server.wait_metric("nbhub_uplinks_stored_total{port=\"coap\"}", |v| v == 2.0);
    assert!(from_elsewhere(server.endpoints.coap, &non_copy, Duration::from_millis(300)).is_none());
    // A command goes to the device, not to a copier.
    let command = server.send_command(&pk, &dn, json!({"payload_base64": STANDARD.encode(b"valve")}));
    let cmd = dev.command(Duration::from_secs(5)).expect("the command reaches the real device");
    assert_eq!(cmd.payload, b"valve");
    dev.answer(&cmd, Code::CHANGED, b"");
    server.wait_command(command["command_id"].as_str().unwrap(), "DELIVERED");
    assert_eq!(
        server.stored(&pk, &dn),
        [("/t/d".to_string(), b"reading 1".to_vec()), ("/t/d".to_string(), b"reading 2".to_vec())]
    );
    assert_eq!(device_view(&server, &pk, &dn)["address"], home.as_str());
    server.wait_metric("nbhub_refusals_total{dialect=\"huawei\",reason=\"stale_notification\"}", |v| v == 5.0);
    // The server's own GET and POST /t/d are requests, not responses.
    server.wait_metric("nbhub_coap_responses_total{port=\"coap\",code=\"2.04\"}", |v| v >= 1.0);
    for code in ["0.01", "0.02"] {
        assert_eq!(server.metric(&format!("nbhub_coap_responses_total{{port=\"coap\",code=\"{code}\"}}")), 0.0);
    }

    // A NAT rebinding: the next (newer) notification from a new port is stored and moves the
    // downlink there.
    dev.rebind_port();
    let moved = dev.wire.socket.local_addr().unwrap().to_string();
    let third = dev.notification(MessageType::Con, b"reading 3");
    dev.wire.send(&third);
    assert_eq!(dev.recv_reply(Duration::from_secs(5)).unwrap().mtype, MessageType::Ack);
    server.wait_device(&pk, &dn, |d| d["address"] == moved.as_str());
    assert_eq!(server.stored(&pk, &dn).len(), 3);
}

#[test]
fn spoofed_binds_and_replayed_bootstraps_cost_the_device_nothing() {
    let server = Server::start_with(&TIGHT);
    let (pk, dn) = server.huawei_device("861234567890102", json!({"name": "meters", "awake_window_s": 30}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890102");
    dev.bind();
    // Bound: its answer to the observe request is in (a bind racing it would ask anew).
    server.wait_device(&pk, &dn, |d| d["status"] == "online");
    // Node ids are no secret: binds naming this one from elsewhere, beyond the device's budget.
    for _ in 0..8 {
        let mut spoofer = HuaweiDevice::new(server.endpoints.coap, "861234567890102");
        assert_eq!(spoofer.bind_request().code, Code::CHANGED);
    }
    // Every report of the device within the same second and minute still counts.
    for i in 0..3 {
        let data = dev.notification(MessageType::Con, format!("reading {i}").as_bytes());
        dev.wire.send(&data);
        assert_eq!(dev.recv_reply(Duration::from_secs(5)).unwrap().mtype, MessageType::Ack);
    }
    server.wait_metric("nbhub_uplinks_stored_total{port=\"coap\"}", |v| v == 3.0);
    assert_eq!(server.metric("nbhub_flow_control_rejections_total{action=\"dropped\"}"), 0.0);

    // A signed /bootstrap captured once and replayed from elsewhere, beyond the device's budget:
    // answered each time, and it neither counts as contact nor spends the device's budget.
    let (apk, adn, secret) = server.product_and_device(json!({"name": "ali"}));
    let mut ali = AliDevice::new(server.endpoints.coap, &apk, &adn, &secret);
    let body = ali.auth_body(SignMethod::HmacSha256, &[]).to_string();
    let bootstrap = MessageBuilder::new(MessageType::Con, Code::POST, 7, &[3])
        .option(OptionNumber::URI_PATH, b"bootstrap")
        .uint_option(OptionNumber::CONTENT_FORMAT, 50)
        .payload(body.as_bytes())
        .build();
    for _ in 0..8 {
        let answer = from_elsewhere(server.endpoints.coap, &bootstrap, Duration::from_secs(5)).expect("an answer");
        assert_eq!(answer.code, Code::CONTENT);
    }
    assert_eq!(device_view(&server, &apk, &adn)["status"], "inactive", "a bootstrap is no contact");
    assert_eq!(ali.auth().code, Code::CONTENT);
    for i in 0..2 {
        assert_eq!(ali.send_uplink(format!("{i}").as_bytes()).code, Code::CHANGED, "uplink {i}");
    }
}

#[test]
fn a_replayed_auth_from_elsewhere_neither_replaces_the_session_nor_counts_as_contact() {
    let server = Server::start_with(&[("NBHUB_AUTH_TOKEN_GRACE_S", "0")]);
    // Both families: 5682's sessions carry a key, 5683's only a token.
    for port in [server.endpoints.aes, server.endpoints.coap] {
        replayed_auth_changes_nothing(&server, port);
    }
}

fn replayed_auth_changes_nothing(server: &Server, port: std::net::SocketAddr) {
    let (pk, dn, secret) = server.product_and_device(json!({"name": format!("replayed on {port}")}));
    let mut d = AliDevice::new(port, &pk, &dn, &secret);
    let body = d.auth_body(SignMethod::HmacSha256, &[("seq", json!("3FA2"))]);
    let first = d.auth_with(&body);
    assert_eq!(first.code, Code::CONTENT);
    assert_eq!(d.send_uplink(b"one").code, Code::CHANGED);
    let before = device_view(server, &pk, &dn);
    // The captured body from elsewhere gets the same session back: nothing is replaced.
    let mut replayer = AliDevice::new(port, &pk, &dn, &secret);
    let replay = replayer.auth_with(&body);
    assert_eq!(replay.json(), first.json());
    let after = device_view(server, &pk, &dn);
    assert_eq!((&after["address"], &after["last_seen"]), (&before["address"], &before["last_seen"]));
    assert_eq!(d.send_uplink(b"two").code, Code::CHANGED, "the device's session is whole");
    // A newly signed body (another seq) is a new session, replacing the old one.
    let fresh = d.auth_body(SignMethod::HmacSha256, &[("seq", json!("3FA3"))]);
    let old = d.token.clone();
    assert_eq!(d.auth_with(&fresh).code, Code::CONTENT);
    assert_ne!(d.token, old);
}

#[test]
fn tokens_belong_to_the_port_family_that_issued_them() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "both"}));
    let mut aes = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    let mut plain = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    // One signed body on both families, as a device configured for either might send.
    let body = aes.auth_body(SignMethod::HmacMd5, &[]);
    assert_eq!(aes.auth_with(&body).code, Code::CONTENT);
    assert_eq!(plain.auth_with(&body).code, Code::CONTENT);
    assert_ne!(aes.token, plain.token, "5683 issues its own token");
    assert_eq!(plain.send_uplink(b"plain").code, Code::CHANGED);
    assert_eq!(aes.send_uplink(b"aes").code, Code::CHANGED);
    // Each token is unknown on the other family.
    let mut crossed = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    crossed.token = aes.token.clone();
    assert_eq!(crossed.send_uplink(b"crossed").code, Code::UNAUTHORIZED);
    server.wait_metric("nbhub_refusals_total{dialect=\"alibaba\",reason=\"unknown_token\"}", |v| v == 1.0);
    // The same body again on 5683 is that family's own replay: the same 5683 token.
    let again = plain.auth_with(&body);
    assert_eq!(again.json()["token"].as_str(), plain.token.as_deref());
}

#[test]
fn an_answered_auth_leaves_the_device_a_full_token_lifetime() {
    // iotkit v3 signs the same body on every initialisation and never re-authenticates after
    // a 4.01: a replayed /auth must renew the token it hands back.
    let mut server = Server::start_with(&[("NBHUB_AUTH_TOKEN_TTL_S", "5")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "iotkit"}));
    let mut d = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    let body = d.auth_body(SignMethod::HmacMd5, &[]);
    assert_eq!(d.auth_with(&body).code, Code::CONTENT);
    let token = d.token.clone();
    std::thread::sleep(Duration::from_secs(3));
    // Re-initialised: the same body, the same token, now good for another 5 s; stored so.
    assert_eq!(d.auth_with(&body).code, Code::CONTENT);
    assert_eq!(d.token, token);
    server.restart();
    std::thread::sleep(Duration::from_secs(3));
    // 6 s after the first /auth, 3 s after the second.
    let mut d2 = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    d2.token = token;
    assert_eq!(d2.send_uplink(b"still in").code, Code::CHANGED);
}

/// Forwards datagrams between a client socket and the server at `addr`, recording in `sent`
/// what the client sent, until `stop` is set.
struct Proxy {
    addr: std::net::SocketAddr,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
}

fn proxy(server: std::net::SocketAddr) -> Proxy {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").unwrap();
    back.connect(server).unwrap();
    front.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    back.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let addr = front.local_addr().unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (record, halt) = (sent.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut client = None;
        let mut buf = [0u8; 2048];
        while !halt.load(Ordering::Relaxed) {
            if let Ok((n, from)) = front.recv_from(&mut buf) {
                client = Some(from);
                record.lock().unwrap().push(buf[..n].to_vec());
                let _ = back.send(&buf[..n]);
            }
            if let (Ok(n), Some(c)) = (back.recv(&mut buf), client) {
                let _ = front.send_to(&buf[..n], c);
            }
        }
    });
    Proxy { addr, sent, stop }
}

#[test]
fn dtls_records_copied_to_another_address_change_nothing() {
    let server = Server::start();
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "dtls"})).unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let d = admin
        .post(
            &format!("/api/v1/products/{pk}/devices"),
            &json!({"device_name": "d1", "psk_hex": "00112233445566778899aabbccddeeff"}),
        )
        .unwrap();
    let dn = d["device_name"].as_str().unwrap().to_string();
    let Proxy { addr: front, sent, stop } = proxy(server.endpoints.dtls);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(front).unwrap();
    let key = hex::decode("00112233445566778899aabbccddeeff").unwrap();
    let mut client = nbhub::dtls::client::DtlsClient::psk(socket, &format!("{pk}&{dn}"), &key, "PSK-AES128-CCM8");
    client.handshake(None, Duration::from_secs(10)).expect("handshake");
    let topic = ["topic", &pk, &dn, "update"];
    client.send(&coap_post(1, &topic, None, b"inside")).expect("sent inside the session");
    let answer = Reply::parse(&client.recv(Duration::from_secs(5)).expect("an answer"));
    assert_eq!(answer.code, Code::CHANGED);
    let record = sent.lock().unwrap().last().unwrap().clone();
    stop.store(true, Ordering::Relaxed);

    // The request's record, sent from elsewhere: no session there, so it is a stray datagram.
    assert!(from_elsewhere(server.endpoints.dtls, &record, Duration::from_millis(500)).is_none());
    server.wait_metric("nbhub_dtls_stray_datagrams_total{port=\"dtls\"}", |v| v >= 1.0);
    assert_eq!(server.stored(&pk, &dn), [(format!("/{pk}/{dn}/update"), b"inside".to_vec())]);
}

//! Commands for sleepy devices over real UDP against the real server: Huawei devices bound on
//! 5683 (and inside DTLS), Alibaba devices pulling on 5682, the admin API creating and reading
//! commands, and a kill -9 in the middle of delivery.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use nbhub::client::ClientError;
use nbhub::coap::message::{Code, MessageBuilder, MessageType};
use serde_json::{Value, json};

fn b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

fn unb64(v: &Value) -> Vec<u8> {
    STANDARD.decode(v.as_str().unwrap()).unwrap()
}

const QUIET: Duration = Duration::from_millis(400);

/// Awake windows and expiries pass by moving the server's clock, not by waiting for them.
const MOVABLE_CLOCK: &[(&str, &str)] = &[("NBHUB_ADMIN_CLOCK_CONTROL", "true")];

#[test]
fn a_sleeping_huawei_device_gets_its_commands_in_order_one_at_a_time_after_it_reports() {
    let server = Server::start_with(MOVABLE_CLOCK);
    let (pk, dn) = server.huawei_device("861234567890001", json!({"name": "meters", "awake_window_s": 1}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890001");
    dev.bind();
    server.wait_device(&pk, &dn, |d| d["status"] == "online");
    server.advance_clock(Duration::from_millis(1200)); // past its awake window: asleep

    let ids: Vec<String> = (1..=3u8)
        .map(|i| {
            let c = server.send_command(&pk, &dn, json!({"payload_base64": b64(&[i; 3])}));
            assert_eq!(c["status"], "PENDING");
            assert_eq!(c["send_strategy"], "delay");
            c["command_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(dev.command(QUIET).is_none(), "nothing is sent to a sleeping device");

    dev.report(b"reading 1");
    let first = dev.command(Duration::from_secs(5)).expect("the first command after the report");
    assert_eq!(first.payload, [1; 3]);
    assert_eq!(server.command(&ids[0])["status"], "SENT");
    assert!(dev.command(QUIET).is_none(), "one command in flight at a time");
    assert_eq!(server.command(&ids[1])["status"], "PENDING");

    // An answer carrying a result (2.05 `0`) makes a command SUCCESSFUL; the released LiteOS
    // agents answer an empty 2.04, which leaves it DELIVERED (the second command below).
    dev.answer(&first, Code::CONTENT, b"0");
    let second = dev.command(Duration::from_secs(5)).expect("the second follows the first's ACK");
    assert_eq!(second.payload, [2; 3]);
    dev.answer(&second, Code::CHANGED, b"");
    let third = dev.command(Duration::from_secs(5)).expect("then the third");
    assert_eq!(third.payload, [3; 3]);
    dev.answer(&third, Code::new(4, 4), b"no such thing");

    let c1 = server.wait_command(&ids[0], "SUCCESSFUL");
    assert_eq!(unb64(&c1["result_base64"]), b"0");
    for key in ["created_at", "sent_at", "delivered_at", "finished_at"] {
        assert!(c1[key].as_str().is_some_and(|t| t.ends_with('Z')), "{key} is a time: {c1}");
    }
    let c2 = server.wait_command(&ids[1], "DELIVERED");
    assert!(c2["finished_at"].is_null() && c2["result_base64"].is_null(), "{c2}");
    let c3 = server.wait_command(&ids[2], "FAILED");
    assert_eq!(unb64(&c3["result_base64"]), b"no such thing");
    assert!(c3["reason"].as_str().unwrap().contains("4.04"), "{c3}");

    let list = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/commands")).unwrap();
    let listed: Vec<&str> =
        list["commands"].as_array().unwrap().iter().map(|c| c["command_id"].as_str().unwrap()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>(), "oldest first");
    // The report itself is stored like any uplink.
    assert_eq!(server.stored(&pk, &dn), [("/t/d".to_string(), b"reading 1".to_vec())]);
}

#[test]
fn bind_answers_what_liteos_expects() {
    let server = Server::start_with(MOVABLE_CLOCK);
    let (pk, dn) = server.huawei_device("861234567890002", json!({"name": "meters", "ack_timeout_ms": 200}));
    // LiteOS reads an ACK 5.00 as "this device does not exist".
    let mut stranger = HuaweiDevice::new(server.endpoints.coap, "869999999999999");
    assert_eq!(stranger.bind_request().code, Code::INTERNAL_SERVER_ERROR);
    assert!(stranger.recv_reply(QUIET).is_none(), "no observe request for an unknown device");
    // A notification with a token nobody handed out is refused.
    stranger.token = vec![1, 2, 3, 4, 5, 6, 7, 8];
    let data = stranger.notification(MessageType::Con, b"x");
    stranger.wire.send(&data);
    assert_eq!(stranger.recv_reply(Duration::from_secs(5)).unwrap().mtype, MessageType::Rst);

    server.admin().patch(&format!("/api/v1/products/{pk}/devices/{dn}"), &json!({"enabled": false})).unwrap();
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890002");
    assert_eq!(dev.bind_request().code, Code::FORBIDDEN);
    server.admin().patch(&format!("/api/v1/products/{pk}/devices/{dn}"), &json!({"enabled": true})).unwrap();
    dev.bind();
    let home = dev.wire.socket.local_addr().unwrap().to_string();
    server.wait_device(&pk, &dn, |d| d["address"] == home.as_str());

    // Anyone may send a bind naming this node id: it gets the 2.04 and one observe request
    // (never retransmitted to an address that asked once), but until that request is answered
    // the device's address, and where its commands go, stay as they were.
    let mut spoofer = HuaweiDevice::new(server.endpoints.coap, "861234567890002");
    assert_eq!(spoofer.bind_request().code, Code::CHANGED);
    assert_eq!(spoofer.recv_reply(Duration::from_secs(5)).unwrap().code, Code::GET);
    assert!(spoofer.recv_reply(Duration::from_millis(700)).is_none(), "no retransmission (ack timeout 200 ms)");
    let device = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(device["address"], home.as_str());
    // A CON report is acknowledged (Empty ACK) once stored.
    dev.report_confirmed(b"confirmed");
    assert_eq!(server.stored(&pk, &dn), [("/t/d".to_string(), b"confirmed".to_vec())]);
}

#[test]
fn immediately_fails_for_a_sleeping_device_and_reaches_an_awake_one() {
    let server = Server::start_with(MOVABLE_CLOCK);
    let (pk, dn) = server.huawei_device("861234567890003", json!({"name": "meters", "awake_window_s": 2}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890003");
    let asleep = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"now"), "send_strategy": "immediately"}));
    assert_eq!(asleep["status"], "FAILED", "never heard from: asleep");
    assert!(asleep["reason"].as_str().unwrap().contains("asleep"));

    dev.bind();
    // The bind counts once the device has answered the observe request.
    server.wait_device(&pk, &dn, |d| d["status"] == "online");
    let c = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"now"), "send_strategy": "immediately"}));
    let cmd = dev.command(Duration::from_secs(5)).expect("sent at once to an awake device");
    assert_eq!(cmd.payload, b"now");
    dev.answer(&cmd, Code::CHANGED, b"");
    server.wait_command(c["command_id"].as_str().unwrap(), "DELIVERED");
    // The never-sent one stays as it was.
    assert_eq!(server.command(asleep["command_id"].as_str().unwrap())["status"], "FAILED");

    server.advance_clock(Duration::from_millis(2200));
    let late = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"now"), "send_strategy": "immediately"}));
    assert_eq!(late["status"], "FAILED");
    assert!(dev.command(QUIET).is_none());
}

#[test]
fn an_unanswered_command_times_out_after_its_retransmissions() {
    let server = Server::start_with(&[("NBHUB_DOWNLINK_TIMEOUT_S", "3"), MOVABLE_CLOCK[0]]);
    let product = json!({"name": "meters", "awake_window_s": 30, "ack_timeout_ms": 200, "max_retransmit": 2});
    let (pk, dn) = server.huawei_device("861234567890004", product);
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890004");
    dev.bind();
    server.wait_device(&pk, &dn, |d| d["status"] == "online");
    let c = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"are you there")}));
    let id = c["command_id"].as_str().unwrap();
    let first = dev.command(Duration::from_secs(5)).expect("sent to the awake device");
    // Transmissions at 0, 200 and 600 ms, then silence: 2 retransmissions, same message id.
    let mut copies = 1;
    while let Some(again) = dev.command(Duration::from_millis(1500)) {
        assert_eq!((again.mid, &again.payload), (first.mid, &first.payload));
        copies += 1;
    }
    assert_eq!(copies, 3);
    let c = server.wait_command(id, "TIMEOUT");
    assert!(c["delivered_at"].is_null() && c["finished_at"].is_string(), "{c}");
    assert!(server.metric("nbhub_coap_retransmissions_total{port=\"coap\"}") >= 2.0);
    // A later report does not bring it back, and the next command goes out.
    let next = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"second try")}));
    dev.report(b"awake again");
    let cmd = dev.command(Duration::from_secs(5)).unwrap();
    assert_eq!(cmd.payload, b"second try");
    dev.answer(&cmd, Code::CHANGED, b"");
    server.wait_command(next["command_id"].as_str().unwrap(), "DELIVERED");
}

#[test]
fn pending_commands_expire_are_bounded_and_can_be_canceled() {
    let server = Server::start_with(MOVABLE_CLOCK);
    let (pk, dn) = server.huawei_device("861234567890005", json!({"name": "meters"}));
    let admin = server.admin();
    let path = format!("/api/v1/products/{pk}/devices/{dn}/commands");
    let short = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"x"), "expire_time": 1}));
    let short_id = short["command_id"].as_str().unwrap();
    let expired = server.wait_command(short_id, "EXPIRED");
    assert!(expired["sent_at"].is_null() && expired["finished_at"].is_string());

    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(server.send_command(&pk, &dn, json!({"payload_base64": b64(&[i])}))["command_id"].clone());
    }
    match admin.post(&path, &json!({"payload_base64": b64(b"21st")})) {
        Err(ClientError::Api { status: 429, message, .. }) => assert!(message.contains("20 pending"), "{message}"),
        other => panic!("the 21st pending command must be refused with 429: {other:?}"),
    }
    let canceled = admin.delete(&format!("/api/v1/commands/{}", ids[0].as_str().unwrap())).unwrap();
    assert_eq!(canceled["status"], "CANCELED");
    match admin.delete(&format!("/api/v1/commands/{}", ids[0].as_str().unwrap())) {
        Err(ClientError::Api { status: 409, .. }) => {}
        other => panic!("canceling twice is a conflict: {other:?}"),
    }
    match admin.delete(&format!("/api/v1/commands/{short_id}")) {
        Err(ClientError::Api { status: 409, message, .. }) => assert!(message.contains("EXPIRED"), "{message}"),
        other => panic!("an expired command cannot be canceled: {other:?}"),
    }
    admin.post(&path, &json!({"payload_base64": b64(b"fits again")})).expect("room after a cancel");

    for (body, field) in [
        (json!({"payload_base64": "***"}), "payload_base64"),
        (json!({"payload_base64": ""}), "payload_base64"),
        (json!({"payload_base64": b64(b"x"), "expire_time": 0}), "expire_time"),
        (json!({"payload_base64": b64(b"x"), "send_strategy": "later"}), "send_strategy"),
        (json!({"payload_base64": b64(b"x"), "topic": "no-slash"}), "topic"),
    ] {
        match admin.post(&path, &body) {
            Err(ClientError::Api { status: 400, message, .. }) => assert!(message.contains(field), "{message}"),
            other => panic!("{body} must be refused naming {field}: {other:?}"),
        }
    }
    assert!(matches!(admin.get("/api/v1/commands/999999"), Err(ClientError::Api { status: 404, .. })));
    assert!(matches!(admin.get("/api/v1/commands/nope"), Err(ClientError::Api { status: 404, .. })));
    assert!(matches!(
        admin.post(&format!("/api/v1/products/{pk}/devices/ghost/commands"), &json!({"payload_base64": b64(b"x")})),
        Err(ClientError::Api { status: 404, .. })
    ));
}

#[test]
fn a_device_whose_port_changes_between_reports_still_gets_its_commands() {
    let server = Server::start_with(MOVABLE_CLOCK);
    let (pk, dn) = server.huawei_device("861234567890006", json!({"name": "meters", "awake_window_s": 1}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890006");
    dev.bind();
    let old_port = dev.wire.socket.local_addr().unwrap();
    // The relation counts as contact once the server has the device's answer to its GET: the
    // device is asleep only after that.
    server.wait_device(&pk, &dn, |d| d["address"] == old_port.to_string());
    server.advance_clock(Duration::from_millis(1200));
    let c = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"after NAT")}));

    // The NAT binding expired while the device slept: it comes back from another port.
    dev.rebind_port();
    assert_ne!(dev.wire.socket.local_addr().unwrap(), old_port);
    dev.report(b"from a new port");
    let cmd = dev.command(Duration::from_secs(5)).expect("the command reaches the new address");
    assert_eq!(cmd.payload, b"after NAT");
    dev.answer(&cmd, Code::CHANGED, b"");
    server.wait_command(c["command_id"].as_str().unwrap(), "DELIVERED");
    let device = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(device["address"], dev.wire.socket.local_addr().unwrap().to_string());
}

#[test]
fn an_alibaba_device_pulls_its_commands_on_5682_and_its_ack_delivers_them() {
    let server = Server::start_with(MOVABLE_CLOCK);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "ali"}));
    let ids: Vec<String> = ["one", "two", "three"]
        .iter()
        .map(|p| {
            server.send_command(&pk, &dn, json!({"payload_base64": b64(p.as_bytes())}))["command_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut dev = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::CONTENT);

    let req = dev.pull_request(2);
    let ack = dev.peer.exchange(&req);
    assert_eq!((ack.mtype, ack.code), (MessageType::Ack, Code::EMPTY), "an empty ACK first");
    let answer = dev.peer.recv();
    assert_eq!((answer.mtype, answer.code), (MessageType::Con, Code::CONTENT), "then a separate CON 2.05");
    let body: Value = serde_json::from_slice(&dev.key.as_ref().unwrap().decrypt(&answer.payload).unwrap()).unwrap();
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "pageSize 2: {body}");
    assert_eq!(messages[0]["id"], ids[0].as_str());
    assert_eq!(messages[0]["topic"], format!("/{pk}/{dn}/user/get"));
    assert_eq!(unb64(&messages[1]["payload"]), b"two");
    assert_eq!(server.command(&ids[0])["status"], "SENT");

    dev.peer.send(&MessageBuilder::new(MessageType::Ack, Code::EMPTY, answer.mid, &[]).build());
    server.wait_command(&ids[0], "DELIVERED");
    server.wait_command(&ids[1], "DELIVERED");
    assert_eq!(server.command(&ids[2])["status"], "PENDING");

    // The next pull gets the rest; with nothing left, an empty list.
    let req = dev.pull_request(10);
    dev.peer.exchange(&req);
    let answer = dev.peer.recv();
    let body: Value = serde_json::from_slice(&dev.key.as_ref().unwrap().decrypt(&answer.payload).unwrap()).unwrap();
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    dev.peer.send(&MessageBuilder::new(MessageType::Ack, Code::EMPTY, answer.mid, &[]).build());
    server.wait_command(&ids[2], "DELIVERED");
    let req = dev.pull_request(10);
    dev.peer.exchange(&req);
    let body: Value =
        serde_json::from_slice(&dev.key.as_ref().unwrap().decrypt(&dev.peer.recv().payload).unwrap()).unwrap();
    assert_eq!(body, json!({"messages": []}));

    // A replayed pull (same seq) is refused like a replayed uplink.
    dev.seq -= 1;
    let replay = dev.pull_request(10);
    assert_eq!(dev.peer.exchange(&replay).code, Code::BAD_REQUEST);
    // No token: 4.01.
    let bare = coap_post(dev.peer.next_mid(), &["pull"], None, b"");
    assert_eq!(dev.peer.exchange(&bare).code, Code::UNAUTHORIZED);
}

#[test]
fn commands_survive_kill_9_in_the_middle_of_delivery() {
    let mut server = Server::start_with(MOVABLE_CLOCK);
    let (pk, dn) = server.huawei_device("861234567890007", json!({"name": "meters", "awake_window_s": 1}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890007");
    dev.bind();
    server.advance_clock(Duration::from_millis(1200));
    let first = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"first")}));
    let short = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"short"), "expire_time": 2}));
    let kept = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"kept")}));
    dev.report(b"before the crash");
    let cmd = dev.command(Duration::from_secs(5)).unwrap();
    assert_eq!(cmd.payload, b"first");
    server.wait_command(first["command_id"].as_str().unwrap(), "SENT");
    // The report is a NON: nothing told the device it was stored (the command may go out while
    // its write is still queued), so the crash comes once it is readable.
    eventually(|| server.stored(&pk, &dn).len(), |n| *n == 1, |n| format!("{n} reports stored"));

    // Killed with the first command in flight; the short one expires while the server is down.
    server.kill9();
    // Real time: a clock moved in the killed process would be lost with it.
    std::thread::sleep(Duration::from_millis(2200));
    server.restart();
    dev.wire.server = server.endpoints.coap;
    server.wait_command(short["command_id"].as_str().unwrap(), "EXPIRED");
    assert_eq!(server.command(first["command_id"].as_str().unwrap())["status"], "SENT");
    assert_eq!(server.command(kept["command_id"].as_str().unwrap())["status"], "PENDING");

    // The observe relation survived: the device reports with the same token, no new bind.
    dev.report(b"after the crash");
    let again = dev.command(Duration::from_secs(5)).expect("the unacknowledged command goes again");
    assert_eq!(again.payload, b"first");
    dev.answer(&again, Code::CHANGED, b"");
    let next = dev.command(Duration::from_secs(5)).unwrap();
    assert_eq!(next.payload, b"kept");
    dev.answer(&next, Code::CHANGED, b"");
    server.wait_command(first["command_id"].as_str().unwrap(), "DELIVERED");
    server.wait_command(kept["command_id"].as_str().unwrap(), "DELIVERED");
    let stored: Vec<Vec<u8>> = server.stored(&pk, &dn).into_iter().map(|(_, p)| p).collect();
    assert_eq!(stored, [b"before the crash".to_vec(), b"after the crash".to_vec()]);
}

#[test]
fn a_huawei_device_inside_dtls_binds_reports_and_gets_commands() {
    let server = Server::start_with(MOVABLE_CLOCK);
    let admin = server.admin();
    let psk = b"0123456789abcdef";
    let node = "861234567890008";
    let (pk, dn) = server.huawei_psk_device(node, psk, json!({"name": "secure meters"}));
    let (pk, dn) = (pk.as_str(), dn.as_str());
    admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": "861234567890009"})).unwrap();

    // The PSK identity is the node id (LiteOS), so the session already names the device.
    let socket = nbhub::dtls::client::DtlsClient::bind(server.endpoints.dtls);
    let mut client = nbhub::dtls::client::DtlsClient::psk(socket, node, psk, "PSK-AES128-CCM8");
    client.handshake(None, Duration::from_secs(10)).expect("DTLS handshake");
    let mut other = HuaweiDevice::over(client, "861234567890009");
    assert_eq!(other.bind_request().code, Code::FORBIDDEN, "a session binds only as its own device");

    let mut dev = HuaweiDevice::over(other.wire, node);
    dev.bind();
    dev.report(b"secure reading");
    let c = server.send_command(pk, dn, json!({"payload_base64": b64(b"close valve")}));
    let cmd = dev.command(Duration::from_secs(5)).expect("the command inside the session");
    assert_eq!(cmd.payload, b"close valve");
    dev.answer(&cmd, Code::CONTENT, b"1");
    let done = server.wait_command(c["command_id"].as_str().unwrap(), "SUCCESSFUL");
    assert_eq!(unb64(&done["result_base64"]), b"1");
    assert_eq!(server.stored(pk, dn), [("/t/d".to_string(), b"secure reading".to_vec())]);
}

#[test]
fn a_dtls_device_behind_a_new_nat_port_handshakes_again_and_its_commands_follow() {
    // One socket: a device's old session is ended by a new handshake on the socket holding it,
    // and with two the kernel's hash may put the two ports on different ones.
    let server = Server::start_with(&[("NBHUB_ADMIN_CLOCK_CONTROL", "true"), ("NBHUB_COAP_SOCKETS_PER_PORT", "1")]);
    let psk = b"0123456789abcdef";
    let node = "861234567890011";
    let (pk, dn) = server.huawei_psk_device(node, psk, json!({"name": "secure meters"}));
    let (pk, dn) = (pk.as_str(), dn.as_str());
    let session = || {
        let socket = nbhub::dtls::client::DtlsClient::bind(server.endpoints.dtls);
        let port = socket.local_addr().unwrap().port();
        let mut client = nbhub::dtls::client::DtlsClient::psk(socket, node, psk, "PSK-AES128-CCM8");
        client.handshake(None, Duration::from_secs(10)).expect("DTLS handshake");
        (client, port)
    };
    let (first, first_port) = session();
    let mut dev = HuaweiDevice::over(first, node);
    dev.bind();
    dev.report(b"from the first port");
    server.wait_device(pk, dn, |d| d["address"].as_str().is_some_and(|a| a.ends_with(&format!(":{first_port}"))));

    // The NAT gives the device a new port: without a Connection ID it can only handshake again.
    // Its next report, under the same relation, moves its downlink to the new address at once.
    let (second, second_port) = session();
    dev.wire = second;
    dev.report(b"from the second port");
    server.wait_device(pk, dn, |d| d["address"].as_str().is_some_and(|a| a.ends_with(&format!(":{second_port}"))));
    // The session at the old port ended with the new handshake.
    server.wait_metric(r#"nbhub_dtls_sessions_replaced_total{port="dtls"}"#, |v| v == 1.0);
    server.wait_metric(r#"nbhub_dtls_sessions{port="dtls"}"#, |v| v == 1.0);
    let c = server.send_command(pk, dn, json!({"payload_base64": b64(b"close valve")}));
    let cmd = dev.command(Duration::from_secs(5)).expect("the command reaches the new address");
    assert_eq!(cmd.payload, b"close valve");
    dev.answer(&cmd, Code::CONTENT, b"1");
    server.wait_command(c["command_id"].as_str().unwrap(), "SUCCESSFUL");
    let stored: Vec<Vec<u8>> = server.stored(pk, dn).into_iter().map(|(_, p)| p).collect();
    assert_eq!(stored, [b"from the first port".to_vec(), b"from the second port".to_vec()]);
}

#[test]
fn a_reset_command_ends_the_observe_relation_and_the_rest_wait_for_the_next_bind() {
    let server = Server::start_with(MOVABLE_CLOCK);
    let (pk, dn) = server.huawei_device("861234567890010", json!({"name": "meters", "awake_window_s": 1}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890010");
    dev.bind();
    server.wait_device(&pk, &dn, |d| d["status"] == "online");
    server.advance_clock(Duration::from_millis(1200));
    let first = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"one")}));
    let second = server.send_command(&pk, &dn, json!({"payload_base64": b64(b"two")}));
    dev.report(b"awake");
    let cmd = dev.command(Duration::from_secs(5)).unwrap();
    // A device that rebooted no longer knows the relation and resets what comes under it.
    dev.wire.send(&MessageBuilder::new(MessageType::Rst, Code::EMPTY, cmd.mid, &[]).build());
    let failed = server.wait_command(first["command_id"].as_str().unwrap(), "FAILED");
    assert!(failed["reason"].as_str().unwrap().contains("RST"), "{failed}");
    // Its reports under the old token are refused, and nothing more is sent under it.
    let data = dev.notification(MessageType::Con, b"old token");
    dev.wire.send(&data);
    assert_eq!(dev.recv_reply(Duration::from_secs(5)).unwrap().mtype, MessageType::Rst);
    assert_eq!(server.command(second["command_id"].as_str().unwrap())["status"], "PENDING");
    // After its bind the queue carries on.
    dev.bind();
    let cmd = dev.command(Duration::from_secs(5)).expect("the second command after the bind");
    assert_eq!(cmd.payload, b"two");
    dev.answer(&cmd, Code::CHANGED, b"");
    server.wait_command(second["command_id"].as_str().unwrap(), "DELIVERED");
}

//! DTLS Connection ID (RFC 9146) and sessions that survive a crash, against an independent
//! client: wolfSSL built with CID (`tests/cid_client`), whose sessions move to a new source port
//! like a device behind a NAT that rebinds.

mod common;

use std::time::Duration;

use common::{CidClient, HuaweiDevice, Server, Wire};
use nbhub::coap::message::Code;
use serde_json::json;

const PSK: &[u8] = b"0123456789abcdef";

fn at_port(d: &serde_json::Value, port: u16) -> bool {
    d["address"].as_str().is_some_and(|a| a.ends_with(&format!(":{port}")))
}

fn payloads(server: &Server, pk: &str, dn: &str) -> Vec<Vec<u8>> {
    server.stored(pk, dn).into_iter().map(|(_, p)| p).collect()
}

#[test]
fn a_session_with_a_cid_follows_its_device_to_a_new_port_without_a_handshake() {
    let server = Server::start();
    // Suites of each record protection: CCM_8, GCM, CBC with HMAC; a CID of our own to receive
    // with, and an empty one (send to us without a CID).
    let cases = [
        ("861234567890101", "PSK-AES128-CCM-8", "c11d"),
        ("861234567890102", "PSK-AES128-GCM-SHA256", "-"),
        ("861234567890103", "PSK-AES128-CBC-SHA256", "0a0b0c0d"),
    ];
    for (i, (node, suite, cid)) in cases.into_iter().enumerate() {
        let (pk, dn) = server.huawei_psk_device(node, PSK, json!({"name": "meters with CID"}));
        let client = CidClient::connect(server.endpoints.dtls, node, PSK, suite, cid);
        assert!(client.cid, "{suite}: the server agreed to a CID");
        let first_port = client.port;
        let mut dev = HuaweiDevice::over(client, node);
        dev.bind();
        dev.report(b"first port");
        server.wait_device(&pk, &dn, |d| at_port(d, first_port));

        let second_port = dev.wire.rebind();
        assert_ne!(first_port, second_port);
        dev.report(b"second port");
        server.wait_device(&pk, &dn, |d| at_port(d, second_port));
        // Downlink follows: a command reaches the new port, and its answer comes back from there.
        let c = server.send_command(&pk, &dn, json!({"payload_base64": "b3Blbg=="}));
        let cmd = dev.command(Duration::from_secs(5)).expect("the command reaches the new port");
        assert_eq!(cmd.payload, b"open", "{suite}");
        dev.answer(&cmd, Code::CHANGED, b"");
        server.wait_command(c["command_id"].as_str().unwrap(), "DELIVERED");
        assert_eq!(payloads(&server, &pk, &dn), [b"first port".to_vec(), b"second port".to_vec()], "{suite}");

        let n = (i + 1) as f64;
        server.wait_metric(r#"nbhub_dtls_address_moves_total{port="dtls"}"#, |v| v >= n);
        server.wait_metric(r#"nbhub_dtls_handshakes_with_cid_total{port="dtls"}"#, |v| v == n);
        let completed: f64 = cases[..=i]
            .iter()
            .map(|(_, s, _)| {
                let name = s.replace("-CCM-8", "-CCM8");
                server.metric(&format!(r#"nbhub_dtls_handshakes_completed_total{{port="dtls",suite="{name}"}}"#))
            })
            .sum();
        assert_eq!(completed, n, "{suite}: one handshake each, none after the move");
    }
    server.wait_metric(r#"nbhub_dtls_sessions_with_cid{port="dtls"}"#, |v| v == 3.0);
}

#[test]
fn a_client_that_offers_no_cid_is_served_as_before() {
    let server = Server::start();
    let node = "861234567890104";
    let (pk, dn) = server.huawei_psk_device(node, PSK, json!({"name": "meters with CID"}));
    let client = CidClient::connect(server.endpoints.dtls, node, PSK, "PSK-AES128-CCM-8", "none");
    assert!(!client.cid);
    let mut dev = HuaweiDevice::over(client, node);
    dev.bind();
    dev.report(b"no cid");
    server.wait_device(&pk, &dn, |d| d["status"] == "online");
    // Its session is found by address only: from a new port its records are strays.
    dev.wire.rebind();
    dev.report(b"lost");
    server.wait_metric(r#"nbhub_dtls_stray_datagrams_total{port="dtls"}"#, |v| v >= 1.0);
    assert_eq!(payloads(&server, &pk, &dn), [b"no cid".to_vec()]);
    assert_eq!(server.metric(r#"nbhub_dtls_handshakes_with_cid_total{port="dtls"}"#), 0.0);
}

#[test]
fn sessions_survive_kill_9_and_records_from_before_the_crash_are_refused() {
    let mut server = Server::start_with(&[("NBHUB_STORE_SECRETS_KEY", &"5a".repeat(32))]);
    let node = "861234567890105";
    let (pk, dn) = server.huawei_psk_device(node, PSK, json!({"name": "meters with CID"}));
    let mut dev =
        HuaweiDevice::over(CidClient::connect(server.endpoints.dtls, node, PSK, "PSK-AES128-CCM-8", "c11d"), node);
    dev.bind();
    dev.report_confirmed(b"before the crash");
    server.wait_device(&pk, &dn, |d| d["status"] == "online");
    // A device without CID on OpenSSL's client, whose session is found by its address.
    let plain_node = "861234567890106";
    let (plain_pk, plain_dn) = server.huawei_psk_device(plain_node, PSK, json!({"name": "meters with CID"}));
    let socket = nbhub::dtls::client::DtlsClient::bind(server.endpoints.dtls);
    let mut plain = nbhub::dtls::client::DtlsClient::psk(socket, plain_node, PSK, "PSK-AES128-GCM-SHA256");
    plain.handshake(None, Duration::from_secs(10)).expect("handshake");
    let mut plain = HuaweiDevice::over(plain, plain_node);
    plain.bind();
    plain.report_confirmed(b"plain before");
    server.wait_device(&plain_pk, &plain_dn, |d| d["status"] == "online");

    server.restart_keeping_dtls_port();
    // The report that was acknowledged before the crash, sent again byte for byte, is refused by
    // the restored replay window; nothing is stored twice.
    dev.wire.replay();
    // The sessions go on: no handshake since the start, and each report is stored.
    dev.report_confirmed(b"after the restart");
    plain.report_confirmed(b"plain after");
    server.wait_metric(r#"nbhub_dtls_sessions_resumed_total{port="dtls"}"#, |v| v == 2.0);
    common::eventually(|| payloads(&server, &pk, &dn), |p| p.len() >= 2, |p| format!("stored: {p:?}"));
    common::eventually(|| payloads(&server, &plain_pk, &plain_dn), |p| p.len() >= 2, |p| format!("{p:?}"));
    assert_eq!(payloads(&server, &pk, &dn), [b"before the crash".to_vec(), b"after the restart".to_vec()]);
    assert_eq!(payloads(&server, &plain_pk, &plain_dn), [b"plain before".to_vec(), b"plain after".to_vec()]);
    assert_eq!(server.metric("nbhub_dtls_sessions_restored_total"), 2.0);
    assert_eq!(server.metric(r#"nbhub_dtls_handshakes_started_total{port="dtls"}"#), 0.0, "no new handshake");

    // Downlink after the restart: the server's records carry sequence numbers the client has
    // not seen (it would drop a repeat as a replay), so a command gets through.
    let c = server.send_command(&pk, &dn, json!({"payload_base64": "c2h1dA=="}));
    let cmd = dev.command(Duration::from_secs(5)).expect("a command after the restart");
    assert_eq!(cmd.payload, b"shut");
    dev.answer(&cmd, Code::CHANGED, b"");
    server.wait_command(c["command_id"].as_str().unwrap(), "DELIVERED");

    // And once more across a second crash, now from a new port as well.
    server.restart_keeping_dtls_port();
    let port = dev.wire.rebind();
    dev.report(b"after the second restart");
    server.wait_device(&pk, &dn, |d| at_port(d, port));
    common::eventually(|| payloads(&server, &pk, &dn), |p| p.len() >= 3, |p| format!("{p:?}"));
    assert_eq!(payloads(&server, &pk, &dn)[2], b"after the second restart");
    server.wait_metric(r#"nbhub_dtls_address_moves_total{port="dtls"}"#, |v| v == 1.0);
}

#[test]
fn a_wrong_key_with_a_cid_is_refused_and_changes_nothing() {
    let server = Server::start();
    let node = "861234567890107";
    server.huawei_psk_device(node, PSK, json!({"name": "meters with CID"}));
    let out = std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cid-client/nbhub-cid-client"),
    )
    .args([
        "127.0.0.1",
        &server.endpoints.dtls.port().to_string(),
        node,
        &hex::encode(b"not the key!!!!!"),
        "PSK-AES128-CCM-8",
        "c11d",
    ])
    .stdin(std::process::Stdio::null())
    .output()
    .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.starts_with("error handshake"), "{printed}");
    server.wait_metric(r#"nbhub_dtls_handshakes_failed_total{port="dtls",reason="bad_key"}"#, |v| v == 1.0);
    assert_eq!(server.metric(r#"nbhub_dtls_sessions{port="dtls"}"#), 0.0);
}

#[test]
fn an_alibaba_pull_answer_reaches_the_new_port() {
    use nbhub::coap::message::{Message, MessageBuilder, MessageType};
    let server = Server::start();
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "alibaba with CID"})).unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"device_name": "cid-meter"})).unwrap();
    let secret = d["device_secret"].as_str().unwrap().to_string();
    let identity = format!("{pk}&cid-meter");
    let mut client =
        CidClient::connect(server.endpoints.dtls, &identity, secret.as_bytes(), "PSK-AES128-GCM-SHA256", "c11d");
    assert!(client.cid);
    client.send(&common::coap_post(
        1,
        &["topic", "sys", &pk, "cid-meter", "thing", "event", "property", "post"],
        None,
        b"{}",
    ));
    let ack = client.recv(Duration::from_secs(5)).expect("the uplink's answer");
    assert_eq!(Message::parse(&ack).unwrap().code, Code::CHANGED, "stored");
    let c = server.send_command(&pk, "cid-meter", json!({"payload_base64": "cmVhZA=="}));

    let port = client.rebind();
    client.send(&common::coap_post(2, &["pull"], None, b""));
    // An empty ACK, then the commands in a separate CON 2.05, both to the new port.
    let answer = (0..3)
        .filter_map(|_| client.recv(Duration::from_secs(5)))
        .find(|d| Message::parse(d).is_ok_and(|m| m.code == Code::CONTENT && m.mtype == MessageType::Con))
        .expect("the pull's answer at the new port");
    let m = Message::parse(&answer).unwrap();
    let body: serde_json::Value = serde_json::from_slice(m.payload).unwrap();
    assert_eq!(body["messages"][0]["payload"], "cmVhZA==", "{body}");
    client.send(&MessageBuilder::new(MessageType::Ack, Code::EMPTY, m.mid, &[]).build());
    server.wait_command(c["command_id"].as_str().unwrap(), "DELIVERED");
    server.wait_device(&pk, "cid-meter", |d| at_port(d, port));
}

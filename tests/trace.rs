//! Message traces over the admin API, against the real server: a DTLS device's exchanges with
//! its PSK identity, a copy of a report refused from another address and kept with its reason,
//! the bounds and errors of the API, and the end of a trace when its time is up.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use nbhub::coap::message::MessageType;
use serde_json::{Value, json};

fn trace_path(pk: &str, dn: &str) -> String {
    format!("/api/v1/products/{pk}/devices/{dn}/trace")
}

fn entries(t: &Value) -> &Vec<Value> {
    t["entries"].as_array().unwrap()
}

#[test]
fn a_dtls_devices_exchanges_are_traced_with_its_identity_until_the_trace_ends() {
    let server = Server::start_with(&[("NBHUB_ADMIN_CLOCK_CONTROL", "true")]);
    let admin = server.admin();
    let (psk, node) = (b"0123456789abcdef", "861234567890041");
    let (pk, dn) = server.huawei_psk_device(node, psk, json!({"name": "secure meters"}));

    // Started before the device was ever heard from: its session names it.
    let t = admin.put(&trace_path(&pk, &dn), &json!({"duration_s": 60})).unwrap();
    assert!(entries(&t).is_empty());
    assert_eq!((t["max_entries"].as_u64(), t["dropped"].as_u64()), (Some(500), Some(0)));

    let socket = nbhub::dtls::client::DtlsClient::bind(server.endpoints.dtls);
    let mut client = nbhub::dtls::client::DtlsClient::psk(socket, node, psk, "PSK-AES128-CCM8");
    client.handshake(None, Duration::from_secs(10)).expect("DTLS handshake");
    let mut dev = HuaweiDevice::over(client, node);
    dev.bind();
    dev.report_confirmed(b"secure reading");

    let t = eventually(
        || admin.get(&trace_path(&pk, &dn)).unwrap(),
        |t| entries(t).iter().any(|e| e["payload_base64"] == STANDARD.encode(b"secure reading")),
        |t| format!("the report is not traced: {t}"),
    );
    let e = entries(&t);
    let bind = &e[0];
    assert_eq!((bind["direction"].as_str(), bind["port"].as_str()), (Some("in"), Some("dtls")), "{t}");
    assert_eq!((bind["type"].as_str(), bind["code_name"].as_str()), (Some("CON"), Some("POST")));
    assert_eq!(bind["authenticated"], true, "the PSK identity named the device");
    let paths: Vec<&str> = bind["options"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["name"] == "Uri-Path")
        .map(|o| o["value"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["t", "r"]);
    let ack = e.iter().find(|x| x["direction"] == "out" && x["answers"] == bind["seq"]).expect("the bind's answer");
    assert_eq!((ack["type"].as_str(), ack["code"].as_str()), (Some("ACK"), Some("2.04")));
    assert!(ack["elapsed_ms"].as_f64().unwrap() >= 0.0);
    assert!(e.iter().any(|x| x["direction"] == "out" && x["code_name"] == "GET"), "the observe request: {t}");
    let seqs: Vec<u64> = e.iter().map(|x| x["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "entries in order: {seqs:?}");
    let last = *seqs.last().unwrap();
    assert!(entries(&admin.get(&format!("{}?after={last}", trace_path(&pk, &dn))).unwrap()).is_empty());

    // Its time up, the trace is gone and nothing more is kept.
    server.advance_clock(Duration::from_secs(61));
    let (status, message) = api_error(admin.get(&trace_path(&pk, &dn)));
    assert_eq!(status, 404);
    assert!(message.contains("not being traced"), "{message}");
    dev.report_confirmed(b"after the trace");
    let t = admin.put(&trace_path(&pk, &dn), &json!({"duration_s": 60})).unwrap();
    assert!(entries(&t).is_empty(), "a new trace starts empty: {t}");
}

#[test]
fn a_copy_from_elsewhere_is_kept_with_its_refusal_and_the_api_refuses_what_it_must() {
    let server = Server::start();
    let admin = server.admin();
    let node = "861234567890042";
    let (pk, dn) = server.huawei_device(node, json!({"name": "meters"}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, node);
    dev.bind();
    let path = trace_path(&pk, &dn);
    admin.put(&path, &json!({"duration_s": 600})).unwrap();

    // The device's report, then the same datagram from another address: a copy, acknowledged
    // and stored nowhere; the trace says why.
    let report = dev.notification(MessageType::Con, b"reading");
    dev.wire.send(&report);
    assert!(dev.recv_reply(Duration::from_secs(5)).is_some(), "the report's ACK");
    let stranger = Peer::new(server.endpoints.coap);
    stranger.send(&report);
    assert!(stranger.recv_within(Duration::from_secs(5)).is_some(), "the copy is acknowledged");
    let stranger_addr = stranger.socket.local_addr().unwrap().to_string();
    let t = eventually(
        || admin.get(&path).unwrap(),
        |t| entries(t).iter().any(|e| e["peer"] == stranger_addr.as_str()),
        |t| format!("the copy is not traced: {t}"),
    );
    let copy = entries(&t).iter().find(|e| e["peer"] == stranger_addr.as_str() && e["direction"] == "in").unwrap();
    assert_eq!(copy["outcome"], "stale_notification", "{t}");
    let own = entries(&t).iter().find(|e| e["direction"] == "in" && e["peer"] != stranger_addr.as_str()).unwrap();
    assert_eq!(own["outcome"], Value::Null, "the device's own report was accepted: {t}");
    assert_eq!(server.stored(&pk, &dn).len(), 1, "the copy changed nothing");

    // Bad requests change nothing.
    let (status, message) = api_error(admin.put(&path, &json!({"duration_s": 0})));
    assert_eq!(status, 400);
    assert!(message.contains("duration_s"), "{message}");
    assert_eq!(api_error(admin.put(&path, &json!({"duration_s": 600, "x": 1}))).0, 400);
    assert_eq!(api_error(admin.put(&trace_path(&pk, "nobody"), &json!({"duration_s": 5}))).0, 404);
    assert_eq!(api_error(admin.get(&format!("{path}?after=x"))).0, 400);
    assert_eq!(entries(&admin.get(&path).unwrap()).len(), entries(&t).len());

    // At most 32 devices at once.
    for i in 0..31 {
        let d =
            admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"device_name": format!("t{i}")})).unwrap();
        admin.put(&trace_path(&pk, d["device_name"].as_str().unwrap()), &json!({"duration_s": 60})).unwrap();
    }
    admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"device_name": "one-too-many"})).unwrap();
    let (status, message) = api_error(admin.put(&trace_path(&pk, "one-too-many"), &json!({"duration_s": 60})));
    assert_eq!(status, 429);
    assert!(message.contains("32 devices are traced already"), "{message}");

    admin.delete(&path).unwrap();
    assert_eq!(api_error(admin.delete(&path)).0, 404);
    admin.put(&trace_path(&pk, "one-too-many"), &json!({"duration_s": 60})).expect("room for one again");
}

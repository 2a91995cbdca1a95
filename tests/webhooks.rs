//! Webhooks against a real HTTP receiver on loopback: every uplink and command state change
//! arrives exactly as stored, signed, after the receiver was down for a while, and after a
//! kill -9 of the server; device status changes are announced.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use nbhub::client::ClientError;
use nbhub::coap::message::Code;
use serde_json::{Value, json};

const FAST_RETRIES: [(&str, &str); 2] =
    [("NBHUB_WEBHOOKS_INITIAL_BACKOFF_MS", "50"), ("NBHUB_WEBHOOKS_MAX_BACKOFF_MS", "200")];

/// Events by id (a retried delivery may arrive twice: at least once), in id order.
fn by_id(deliveries: &[Delivery]) -> BTreeMap<u64, Value> {
    deliveries.iter().map(|d| d.json()).map(|e| (e["event_id"].as_str().unwrap().parse().unwrap(), e)).collect()
}

fn of_kind(deliveries: &[Delivery], kind: &str) -> Vec<Value> {
    by_id(deliveries).into_values().filter(|e| e["event"] == kind).collect()
}

#[test]
fn a_subscriber_down_at_first_gets_every_uplink_and_command_change_as_stored() {
    let server = Server::start_with(&FAST_RETRIES);
    let admin = server.admin();
    let port = common::reserve_port();
    let hook =
        admin.post("/api/v1/webhooks", &json!({"url": format!("http://{port}/hook"), "secret": "s3cret"})).unwrap();
    assert_eq!(hook["signed"], true);
    assert!(hook.get("secret").is_none(), "the secret is never shown");

    let p = admin.post("/api/v1/products", &json!({"name": "meters"})).unwrap();
    let pk = p["product_key"].as_str().unwrap();
    let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": "861234567890101"})).unwrap();
    let dn = d["device_name"].as_str().unwrap();
    let mut dev = HuaweiDevice::new(server.endpoints.coap, "861234567890101");
    dev.bind();
    server.wait_device(pk, dn, |d| d["status"] == "online");
    for i in 0..3u8 {
        dev.report(&[b'r', i]);
    }
    let c = server.send_command(pk, dn, json!({"payload_base64": STANDARD.encode(b"open")}));
    let cmd = dev.command(Duration::from_secs(5)).unwrap();
    dev.answer(&cmd, Code::CONTENT, b"0");
    let id = c["command_id"].as_str().unwrap();
    let final_state = server.wait_command(id, "SUCCESSFUL");
    // The subscriber was down all along: deliveries failed and are being retried.
    server.wait_metric("nbhub_webhook_deliveries_total{result=\"failed\"}", |v| v >= 3.0);

    let receiver = WebhookReceiver::start_on(port);
    let got = receiver.wait("3 uplinks and 3 command states", |d| {
        of_kind(d, "uplink").len() == 3 && of_kind(d, "command_status").len() == 3
    });
    for d in &got {
        assert_eq!(d.path, "/hook");
        assert_eq!(d.header("content-type"), Some("application/json"));
        let expected = nbhub::northbound::delivery::signature("s3cret", &d.body);
        assert_eq!(d.header("x-nbhub-signature"), Some(expected.as_str()), "verifiable signature");
        let e = d.json();
        assert_eq!((e["product_key"].as_str(), e["device_name"].as_str()), (Some(pk), Some(dn)));
    }
    // Uplinks exactly as the messages API shows them.
    let stored = admin.get(&format!("/api/v1/products/{pk}/devices/{dn}/messages")).unwrap();
    let uplinks: Vec<Value> = of_kind(&got, "uplink").into_iter().map(|e| e["data"].clone()).collect();
    assert_eq!(Value::Array(uplinks), stored["messages"]);
    // Every state, in order, the last one exactly as the API shows the command.
    let states: Vec<Value> = of_kind(&got, "command_status").into_iter().map(|e| e["data"].clone()).collect();
    let names: Vec<&str> = states.iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(names, ["PENDING", "SENT", "SUCCESSFUL"]);
    assert_eq!(states[2], final_state);
    let online = of_kind(&got, "device_status");
    assert_eq!(online.len(), 1);
    assert_eq!(online[0]["data"], json!({"status": "online", "previous": "inactive"}));

    // Delivered events leave the subscriber's cursor behind them.
    let hook = admin.get(&format!("/api/v1/webhooks/{}", hook["webhook_id"].as_str().unwrap())).unwrap();
    let last = by_id(&got).into_keys().max().unwrap();
    assert!(hook["delivered_event_id"].as_str().unwrap().parse::<u64>().unwrap() <= last);
}

#[test]
fn webhook_events_survive_kill_9_and_a_deleted_webhook_gets_nothing_more() {
    let mut server = Server::start_with(&FAST_RETRIES);
    let port = common::reserve_port();
    let admin = server.admin();
    let hook =
        admin.post("/api/v1/webhooks", &json!({"url": format!("http://{port}/in"), "events": ["uplink"]})).unwrap();
    assert_eq!(hook["events"], json!(["uplink"]));
    let (pk, dn, secret) = server.product_and_device(json!({"name": "ali"}));
    let mut dev = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    dev.auth();
    for i in 0..5u8 {
        assert_eq!(dev.send_uplink(&[b'u', i]).code, Code::CHANGED, "acknowledged, so stored");
    }
    // Killed before any of those events could be delivered (nobody listens yet).
    server.kill9();
    server.restart();
    let receiver = WebhookReceiver::start_on(port);
    let got = receiver.wait("the 5 uplinks from before the crash", |d| of_kind(d, "uplink").len() == 5);
    let payloads: Vec<Vec<u8>> = of_kind(&got, "uplink")
        .iter()
        .map(|e| STANDARD.decode(e["data"]["payload_base64"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(payloads, (0..5u8).map(|i| vec![b'u', i]).collect::<Vec<_>>());
    assert!(of_kind(&got, "device_status").is_empty() && got.iter().all(|d| d.header("x-nbhub-signature").is_none()));

    let admin = server.admin();
    let id = hook["webhook_id"].as_str().unwrap();
    assert!(admin.delete(&format!("/api/v1/webhooks/{id}")).is_ok());
    assert!(matches!(admin.delete(&format!("/api/v1/webhooks/{id}")), Err(ClientError::Api { status: 404, .. })));
    let before = receiver.events().len();
    dev.peer.server = server.endpoints.coap;
    dev.auth();
    assert_eq!(dev.send_uplink(b"unheard").code, Code::CHANGED);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(receiver.events().len(), before, "no deliveries after the webhook is deleted");

    for (body, field) in [
        (json!({"url": "ftp://x/y"}), "url"),
        (json!({"url": "not a url"}), "url"),
        (json!({"url": "http://127.0.0.1/x", "events": []}), "events"),
        (json!({"url": "http://127.0.0.1/x", "events": ["nonsense"]}), "events"),
    ] {
        match admin.post("/api/v1/webhooks", &body) {
            Err(ClientError::Api { status: 400, message, .. }) => assert!(message.contains(field), "{message}"),
            other => panic!("{body} must be refused naming {field}: {other:?}"),
        }
    }
}

#[test]
fn device_status_changes_are_announced() {
    let mut server = Server::start_with(&[
        ("NBHUB_DEVICE_ONLINE_WITHIN_S", "1"),
        ("NBHUB_DEVICE_ABNORMAL_WITHIN_S", "2"),
        FAST_RETRIES[0],
        FAST_RETRIES[1],
    ]);
    let receiver = WebhookReceiver::start();
    server.admin().post("/api/v1/webhooks", &json!({"url": receiver.url("/s"), "events": ["device_status"]})).unwrap();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "ali"}));
    let mut dev = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    dev.auth();
    let statuses = |d: &[Delivery]| -> Vec<String> {
        of_kind(d, "device_status").iter().map(|e| e["data"]["status"].as_str().unwrap().to_string()).collect()
    };
    receiver.wait("online, abnormal, offline", |d| statuses(d) == ["online", "abnormal", "offline"]);
    // Back online with the next contact.
    assert_eq!(dev.send_uplink(b"back").code, Code::CHANGED);
    let got = receiver.wait("online again", |d| statuses(d).len() == 4);
    assert_eq!(of_kind(&got, "device_status")[3]["data"], json!({"status": "online", "previous": "offline"}));

    // What was announced is stored: going offline while the server is down is announced after.
    server.kill9();
    std::thread::sleep(Duration::from_millis(2500));
    server.restart();
    let got = receiver.wait("offline after the restart", |d| statuses(d).len() == 5);
    assert_eq!(of_kind(&got, "device_status")[4]["data"], json!({"status": "offline", "previous": "online"}));
}

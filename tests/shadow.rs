//! Device shadows over the admin API against the real server: desired set while the device
//! sleeps, the version check and the vendor's limits refusing with their codes and changing
//! nothing, keys deleted, and the shadow kept across kill -9.

mod common;

use common::*;
use nbhub::client::ClientError;
use serde_json::{Value, json};

fn api_error(r: Result<Value, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message, .. }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn desired_state_is_versioned_limited_and_durable() {
    let mut server = Server::start();
    let (pk, dn, _) = server.product_and_device(json!({"name": "bulbs"}));
    let path = format!("/api/v1/products/{pk}/devices/{dn}/shadow");
    let admin = server.admin();
    assert_eq!(admin.get(&path).unwrap(), json!({"state": {}, "metadata": {}, "timestamp": 0, "version": 0}));

    let set = admin.put(&path, &json!({"state": {"desired": {"color": "green", "level": 3}}, "version": 1})).unwrap();
    assert_eq!(set["state"], json!({"desired": {"color": "green", "level": 3}}));
    assert_eq!(set["version"], 1);
    let stamp = set["metadata"]["desired"]["color"]["timestamp"].as_u64().unwrap();
    assert!(stamp > 1_700_000_000_000, "Unix ms: {stamp}");

    // A version not above the current one: 409 with the vendor's code, nothing changed.
    let (status, message) = api_error(admin.put(&path, &json!({"state": {"desired": {"color": "red"}}, "version": 1})));
    assert_eq!(status, 409);
    assert!(message.contains("409") && message.contains("version 1"), "{message}");
    // Seed 004's limits: 128 properties, depth 5, 16 KB.
    let many: serde_json::Map<String, Value> = (0..129).map(|i| (format!("k{i}"), json!(i))).collect();
    let (status, message) = api_error(admin.put(&path, &json!({"state": {"desired": many}})));
    assert_eq!(status, 400);
    assert!(message.contains("128") && message.contains("408"), "{message}");
    let deep = json!({"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}});
    assert!(api_error(admin.put(&path, &json!({"state": {"desired": deep}}))).1.contains("levels deep"));
    let big = json!({"blob": "x".repeat(16 * 1024)});
    assert!(api_error(admin.put(&path, &json!({"state": {"desired": big}}))).1.contains("16384"));
    // Only desired is the application's to set.
    let reported = json!({"state": {"reported": {"color": "red"}}});
    assert_eq!(api_error(admin.put(&path, &reported)).0, 400);
    assert_eq!(admin.get(&path).unwrap(), set, "refusals change nothing");

    // null deletes a key; without a version the next one is taken.
    let deleted = admin.put(&path, &json!({"state": {"desired": {"level": null}}})).unwrap();
    assert_eq!(
        (deleted["state"].clone(), deleted["version"].clone()),
        (json!({"desired": {"color": "green"}}), json!(2))
    );

    server.kill9();
    server.restart();
    assert_eq!(server.admin().get(&path).unwrap(), deleted, "the shadow survives kill -9");
    let missing = format!("/api/v1/products/{pk}/devices/nobody/shadow");
    assert_eq!(api_error(server.admin().get(&missing)).0, 404);

    // Deleting the device deletes its shadow: a device made again under the name starts empty.
    server.admin().delete(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    server.admin().post(&format!("/api/v1/products/{pk}/devices"), &json!({"device_name": dn})).unwrap();
    assert_eq!(server.admin().get(&path).unwrap()["version"], 0);
}

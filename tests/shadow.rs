//! Device shadows against the real server: over the admin API (desired set while the device
//! sleeps, the version check and the vendor's limits refusing with their codes and changing
//! nothing, keys deleted, the shadow kept across kill -9); an Alibaba device over 5682 reading
//! and updating its own shadow and getting the desired state in its `/pull` answers until it
//! reports it; a Huawei device whose codec's reports feed `reported` and whose delta goes down
//! as commands the codec encodes, until a report matches; `shadow` events for webhooks.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use nbhub::coap::message::{Code, MessageBuilder, MessageType};
use serde_json::{Value, json};

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

/// A shadow request on `/topic/shadow/update/{pk}/{dn}`; the code and the decrypted reply.
fn ask(dev: &mut AliDevice, request: &Value) -> (Code, Value) {
    let topic = format!("/shadow/update/{}/{}", dev.pk, dev.dn);
    let req = dev.uplink_request(MessageType::Con, &topic, request.to_string().as_bytes());
    let reply = dev.peer.exchange(&req);
    let body = dev.key.as_ref().unwrap().decrypt(&reply.payload).unwrap_or_else(|e| panic!("{e:?}: {reply:?}"));
    (reply.code, serde_json::from_slice(&body).expect("a JSON reply"))
}

/// The messages of a `/pull` answer (ACKed), with each payload decoded from base64.
fn pull(dev: &mut AliDevice) -> Vec<(String, String, Vec<u8>)> {
    let req = dev.pull_request(10);
    dev.peer.exchange(&req);
    let answer = dev.peer.recv();
    dev.peer.send(&MessageBuilder::new(MessageType::Ack, Code::EMPTY, answer.mid, &[]).build());
    let body: Value = serde_json::from_slice(&dev.key.as_ref().unwrap().decrypt(&answer.payload).unwrap()).unwrap();
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let payload = STANDARD.decode(m["payload"].as_str().unwrap()).unwrap();
            (m["id"].as_str().unwrap().to_string(), m["topic"].as_str().unwrap().to_string(), payload)
        })
        .collect()
}

/// The `control` message of a `/pull` answer, if it has one.
fn control(messages: &[(String, String, Vec<u8>)]) -> Option<Value> {
    messages.iter().find(|(id, ..)| id == "shadow").map(|(_, _, p)| serde_json::from_slice(p).unwrap())
}

#[test]
fn an_alibaba_device_gets_desired_state_on_each_wake_until_it_reports_it() {
    let mut server = Server::start();
    let hook = WebhookReceiver::start();
    server.admin().post("/api/v1/webhooks", &json!({"url": hook.url("/events"), "events": ["shadow"]})).unwrap();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "lamps"}));
    let path = format!("/api/v1/products/{pk}/devices/{dn}/shadow");
    // Set while the device sleeps (it has never been heard from).
    server.admin().put(&path, &json!({"state": {"desired": {"color": "green", "level": 3}}})).unwrap();
    let command = server.send_command(&pk, &dn, json!({"payload_base64": STANDARD.encode(b"blink")}));

    let mut dev = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::CONTENT);
    let messages = pull(&mut dev);
    assert_eq!(messages.len(), 2, "the control beside the command: {messages:?}");
    let (_, topic, _) = messages.iter().find(|(id, ..)| id == "shadow").unwrap();
    assert_eq!(topic, &format!("/shadow/get/{pk}/{dn}"));
    let c = control(&messages).unwrap();
    assert_eq!(c["method"], "control");
    assert_eq!(c["payload"]["status"], "success");
    assert_eq!(c["payload"]["state"], json!({"desired": {"color": "green", "level": 3}}));
    assert_eq!(c["payload"]["version"], 1);
    let stamp = c["payload"]["metadata"]["desired"]["color"]["timestamp"].as_u64().unwrap();
    assert!((1_700_000_000..4_000_000_000).contains(&stamp), "Unix seconds on the device side: {stamp}");
    server.wait_command(command["command_id"].as_str().unwrap(), "DELIVERED");

    // Resent on the next wake: nothing reported yet.
    let again = pull(&mut dev);
    assert_eq!(again.len(), 1, "the command went; the control stays: {again:?}");
    assert_eq!(control(&again).unwrap()["payload"]["version"], 1);

    // A report of part of it: the rest is still asked for.
    let (code, reply) = ask(&mut dev, &json!({"method": "update", "state": {"reported": {"color": "green"}}}));
    assert_eq!(code, Code::CHANGED, "{reply}");
    assert_eq!(reply["method"], "reply");
    assert_eq!(reply["payload"], json!({"status": "success", "version": 2}));
    assert_eq!(control(&pull(&mut dev)).unwrap()["payload"]["state"]["desired"], json!({"level": 3}));
    // A report that matches (numbers by value): desired is cleared and no control is sent.
    let (code, reply) =
        ask(&mut dev, &json!({"method": "update", "state": {"reported": {"level": 3.0}}, "version": 3}));
    assert_eq!((code, reply["payload"]["version"].clone()), (Code::CHANGED, json!(3)), "{reply}");
    assert_eq!(control(&pull(&mut dev)), None);

    // `get` answers with the whole document.
    let (code, doc) = ask(&mut dev, &json!({"method": "get"}));
    assert_eq!(code, Code::CONTENT);
    assert_eq!(doc["payload"]["state"], json!({"reported": {"color": "green", "level": 3.0}}));
    assert_eq!(doc["payload"]["version"], 3);

    // Refusals: the vendor's codes in the reply, 4.09 for a stale version, nothing changed.
    let refused = |dev: &mut AliDevice, request: Value| {
        let (code, reply) = ask(dev, &request);
        assert_eq!(reply["payload"]["status"], "error", "{reply}");
        (code, reply["payload"]["content"]["errorcode"].as_str().unwrap().to_string())
    };
    let stale = json!({"method": "update", "state": {"reported": {"color": "red"}}, "version": 3});
    assert_eq!(refused(&mut dev, stale), (Code::CONFLICT, "409".to_string()));
    // Short keys, so 129 of them fit the 1 KB a request may carry.
    let many: serde_json::Map<String, Value> = (0..129).map(|i| (format!("{i:x}"), json!(0))).collect();
    let crowded = json!({"method": "update", "state": {"reported": many}});
    assert_eq!(refused(&mut dev, crowded), (Code::BAD_REQUEST, "408".to_string()));
    assert_eq!(refused(&mut dev, json!({"state": {"reported": {"a": 1}}})).1, "401");
    assert_eq!(refused(&mut dev, json!({"method": "update"})).1, "402");
    assert_eq!(refused(&mut dev, json!({"method": "replace", "state": {}})).1, "406");
    assert_eq!(refused(&mut dev, json!({"method": "update", "state": {"reported": {}}})).1, "405");
    let topic = format!("/shadow/update/{pk}/{dn}");
    let req = dev.uplink_request(MessageType::Con, &topic, b"{not json");
    assert_eq!(dev.peer.exchange(&req).code, Code::BAD_REQUEST);
    assert_eq!(server.admin().get(&path).unwrap()["version"], 3, "refusals change nothing");
    assert_eq!(server.stored(&pk, &dn).len(), 0, "shadow requests are not uplink messages");

    // `delete` removes the keys it names; acknowledged means durable.
    let (code, reply) = ask(&mut dev, &json!({"method": "delete", "state": {"reported": {"color": "null"}}}));
    assert_eq!((code, reply["payload"]["version"].clone()), (Code::CHANGED, json!(4)), "{reply}");
    server.kill9();
    server.restart();
    let kept = server.admin().get(&path).unwrap();
    assert_eq!((kept["state"].clone(), kept["version"].clone()), (json!({"reported": {"level": 3.0}}), json!(4)));

    // Each accepted change was an event, in order: the admin's set and the device's three (at
    // least once: one not yet confirmed at the kill is delivered again, with its id).
    let events = hook.wait("four shadow events", |d| {
        d.iter().map(|e| e.json()["event_id"].to_string()).collect::<std::collections::BTreeSet<_>>().len() >= 4
    });
    let mut versions: Vec<Value> = events.iter().map(|d| d.json()["data"]["version"].clone()).collect();
    versions.dedup();
    assert_eq!(versions, [json!(1), json!(2), json!(3), json!(4)]);
    assert!(events.iter().all(|d| d.json()["event"] == "shadow" && d.json()["device_name"] == dn.as_str()));
}

/// A Huawei valve codec in the style of Huawei's codec documentation, which takes nbhub's
/// `SET_PROPERTIES` command (the shadow's delta for one service) like any other command.
const VALVE_SCRIPT: &str = r#"
function decode(payload, topic) {
    if (payload[0] == 0x00) {
        return JSON.stringify({ msgType: 'deviceReq', hasMore: 0,
            data: [{ serviceId: 'Valve', serviceData: { open: payload[1], battery: payload[2] } }] });
    }
    if (payload[0] == 0x02) {
        return JSON.stringify({ msgType: 'deviceRsp', mid: (payload[1] << 8) | payload[2],
            errcode: payload[3], body: {} });
    }
    throw new Error('unknown frame ' + payload[0]);
}

function encode(json) {
    var obj = JSON.parse(json);
    if (obj.msgType == 'cloudReq' && obj.cmd == 'SET_PROPERTIES' && obj.serviceId == 'Valve') {
        return [0x03, (obj.mid >> 8) & 0xff, obj.mid & 0xff, obj.paras.open];
    }
    throw new Error('unknown command ' + obj.cmd);
}
"#;

#[test]
fn a_huawei_devices_codec_reports_and_its_delta_goes_down_as_encoded_commands() {
    let server = Server::start();
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "valves"})).unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let node = "863000000000301";
    let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": node})).unwrap();
    let dn = d["device_name"].as_str().unwrap().to_string();
    let codec = json!({"script": VALVE_SCRIPT, "sample_base64": STANDARD.encode([0, 0, 90])});
    admin.post(&format!("/api/v1/products/{pk}/codecs"), &codec).unwrap();
    let path = format!("/api/v1/products/{pk}/devices/{dn}/shadow");
    admin.put(&path, &json!({"state": {"desired": {"Valve": {"open": 1}}}})).unwrap();
    let commands = |server: &Server| -> Vec<Value> {
        let list = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/commands")).unwrap();
        list["commands"].as_array().unwrap().clone()
    };

    // The device wakes closed: its report becomes `reported`, and the delta a command.
    let mut valve = HuaweiDevice::new(server.endpoints.coap, node);
    valve.bind();
    valve.report(&[0, 0, 80]);
    let con = valve.command(Duration::from_secs(10)).expect("the delta as a command");
    // The command goes as soon as it is queued; the report's own writes may still be on their way.
    let first = eventually(|| commands(&server), |c| c.len() == 1, |c| format!("{c:?}"));
    let (id, mid) = (first[0]["command_id"].as_str().unwrap().to_string(), first[0]["payload_json"]["mid"].as_u64());
    let mid = mid.unwrap();
    assert_eq!(first[0]["payload_json"]["cmd"], "SET_PROPERTIES");
    assert_eq!(first[0]["payload_json"]["paras"], json!({"open": 1}));
    assert_eq!(first[0]["topic"], format!("/shadow/get/{pk}/{dn}"));
    assert_eq!(con.payload, [3, (mid >> 8) as u8, mid as u8, 1], "encoded by the product's script");
    valve.answer(&con, Code::CHANGED, b"");
    let shadow = eventually(
        || server.admin().get(&path).unwrap(),
        |s| s["state"].get("reported").is_some(),
        |s| format!("the report never reached the shadow: {s}"),
    );
    assert_eq!(shadow["state"]["reported"], json!({"Valve": {"open": 0, "battery": 80}}));
    assert_eq!(shadow["state"]["desired"], json!({"Valve": {"open": 1}}));

    // The device says it did, but its next report still shows it closed: asked again.
    valve.report(&[2, (mid >> 8) as u8, mid as u8, 0]);
    server.wait_command(&id, "SUCCESSFUL");
    valve.report(&[0, 0, 79]);
    let con = valve.command(Duration::from_secs(10)).expect("the delta again, on the next report");
    assert_eq!(con.payload[3], 1);
    valve.answer(&con, Code::CHANGED, b"");
    eventually(|| commands(&server), |c| c.len() == 2, |c| format!("{c:?}"));

    // A report that matches clears it; later reports ask for nothing.
    valve.report(&[0, 1, 79]);
    eventually(
        || server.admin().get(&path).unwrap(),
        |s| s["state"].get("desired").is_none() && s["state"]["reported"]["Valve"]["open"] == 1,
        |s| format!("the matching report never cleared desired: {s}"),
    );
    valve.report(&[0, 1, 78]);
    eventually(
        || server.admin().get(&path).unwrap(),
        |s| s["state"]["reported"]["Valve"]["battery"] == 78,
        |s| format!("the last report never reached the shadow: {s}"),
    );
    assert!(valve.command(Duration::from_millis(500)).is_none(), "nothing is asked once reported");
    assert_eq!(commands(&server).len(), 2);
}

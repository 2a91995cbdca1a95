//! Product codecs over real UDP against the real server: vendor-style scripts uploaded through
//! the admin API, devices of each dialect sending bytes, the decoded JSON beside the raw payload
//! in the messages API and the webhooks, scripts that throw, loop or allocate without end costing
//! nothing but their own result, and decodes queued at a kill -9 done after the restart.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use nbhub::client::ClientError;
use nbhub::coap::message::{Code, MessageType};
use serde_json::{Value, json};

/// An Alibaba data-parsing script in the style of Alibaba's "data parsing" documentation: the
/// example the README and `nbhub-load --codec` use.
const ALIBABA_SCRIPT: &str = include_str!("../codecs/alibaba-thermostat.js");

/// A Huawei JavaScript codec in the style of Huawei's codec documentation (seed 003 §4.4):
/// `decode` returns the `deviceReq` JSON string with the service's data. Frame types 1 to 3 are
/// this test's bad days: a throw, a loop that never ends and an allocation that never ends.
const HUAWEI_SCRIPT: &str = r#"
function decode(payload, topic) {
    var kind = payload[0];
    if (kind == 1) {
        throw new Error('unknown frame ' + kind);
    }
    if (kind == 2) {
        while (true) {}
    }
    if (kind == 3) {
        var hoard = [];
        while (true) { hoard.push(new Array(100000).join('x')); }
    }
    var result = {
        msgType: 'deviceReq',
        hasMore: 0,
        data: [{
            serviceId: 'WaterMeter',
            serviceData: { reading: (payload[1] << 8) | payload[2], battery: payload[3] }
        }]
    };
    return JSON.stringify(result);
}

function encode(json) {
    var obj = JSON.parse(json);
    return [0xAA, obj.mid & 0xff];
}
"#;

fn b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// A product and one Huawei device (node id `node`) on it.
fn huawei_product(server: &Server, name: &str, nodes: &[&str]) -> (String, Vec<String>) {
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": name})).unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let dns = nodes
        .iter()
        .map(|node| {
            let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": node})).unwrap();
            d["device_name"].as_str().unwrap().to_string()
        })
        .collect();
    (pk, dns)
}

fn upload(server: &Server, pk: &str, body: Value) -> Result<Value, ClientError> {
    server.admin().post(&format!("/api/v1/products/{pk}/codecs"), &body)
}

fn messages(server: &Server, pk: &str, dn: &str) -> Vec<Value> {
    let page = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/messages?limit=1000")).unwrap();
    page["messages"].as_array().unwrap().clone()
}

/// The device's messages once `n` of them are stored and every one has been through its codec
/// (or has nothing to go through: `decodable` says which).
fn wait_decoded(server: &Server, pk: &str, dn: &str, n: usize, decodable: impl Fn(&Value) -> bool) -> Vec<Value> {
    eventually(
        || messages(server, pk, dn),
        |ms| ms.len() == n && ms.iter().filter(|m| decodable(m)).all(|m| m.get("codec_version").is_some()),
        |ms| format!("{pk}/{dn} never had {n} messages through the codec: {ms:#?}"),
    )
}

/// A Huawei device's CON report, once the server has ACKed it (the data is stored by then).
fn report_acked(d: &mut HuaweiDevice, payload: &[u8]) {
    let data = d.notification(MessageType::Con, payload);
    d.wire.send(&data);
    let ack = d.recv_reply(std::time::Duration::from_secs(5)).expect("the report's ACK");
    assert_eq!(ack.mtype, MessageType::Ack);
}

#[test]
fn alibaba_raw_uplinks_are_decoded_into_alink_json_in_messages_and_webhooks() {
    let server = Server::start();
    let hook = WebhookReceiver::start();
    server.admin().post("/api/v1/webhooks", &json!({"url": hook.url("/events")})).unwrap();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "thermostats"}));
    // 0x00, id 7, 23.5 °C, switch on
    let frame = [0x00, 0, 0, 0, 7, 0x00, 0xeb, 0x01];
    let created =
        upload(&server, &pk, json!({"script": ALIBABA_SCRIPT, "sample_base64": b64(&frame)})).expect("upload");
    assert_eq!(created["version"], 1);
    assert_eq!(created["style"], "alibaba");
    assert_eq!(created["current"], true, "a product's first codec is current");
    assert_eq!(created["sample"]["decoded"]["params"]["temperature"], 23.5);

    let mut device = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    assert_eq!(device.auth().code, Code::CONTENT);
    let up_raw = format!("/sys/{pk}/{dn}/thing/model/up_raw");
    // A negative temperature arrives as bytes the script must mask: -4.2 °C is 0xffd6.
    let cold = [0x00, 0, 0, 0, 8, 0xff, 0xd6, 0x00];
    for payload in [&frame[..], &cold[..]] {
        let req = device.uplink_request(MessageType::Con, &up_raw, payload);
        assert_eq!(device.peer.exchange(&req).code, Code::CHANGED);
    }
    // A custom topic is not read by a script without transformPayload: raw only.
    let custom = format!("/{pk}/{dn}/update");
    let req = device.uplink_request(MessageType::Con, &custom, b"\x00\x01");
    assert_eq!(device.peer.exchange(&req).code, Code::CHANGED);

    let ms = wait_decoded(&server, &pk, &dn, 3, |m| m["topic"] == up_raw);
    assert_eq!(
        ms[0]["decoded"],
        json!({"method": "thing.event.property.post", "version": "1.0", "id": "7",
               "params": {"temperature": 23.5, "switch": 1}})
    );
    assert_eq!(ms[0]["payload_base64"], b64(&frame), "the raw payload is kept beside");
    assert_eq!(ms[0]["codec_version"], 1);
    assert_eq!(ms[1]["decoded"]["params"]["temperature"], -4.2);
    assert!(ms[2].get("decoded").is_none() && ms[2].get("decode_error").is_none(), "{}", ms[2]);

    let got = hook.wait("three uplink events", |d| d.iter().filter(|d| d.json()["event"] == "uplink").count() == 3);
    let uplinks: Vec<Value> = got.iter().map(Delivery::json).filter(|e| e["event"] == "uplink").collect();
    let first = uplinks.iter().find(|e| e.to_string().contains(&b64(&frame))).expect("the first frame's event");
    assert_eq!(first.to_string().matches("\"temperature\":23.5").count(), 1, "{first}");
    let raw_only = uplinks.iter().find(|e| e.to_string().contains(&custom)).expect("the custom topic's event");
    assert!(!raw_only.to_string().contains("\"decoded\""), "{raw_only}");
}

#[test]
fn a_script_that_throws_loops_or_hoards_costs_its_result_only() {
    let server = Server::start();
    let (pk, dns) = huawei_product(&server, "water", &["863000000000001", "863000000000002"]);
    let sample = [0x00, 0x01, 0x02, 90];
    let created = upload(&server, &pk, json!({"script": HUAWEI_SCRIPT, "sample_base64": b64(&sample)})).unwrap();
    assert_eq!(created["style"], "huawei");
    assert_eq!(
        created["sample"]["decoded"]["data"][0],
        json!({"serviceId": "WaterMeter", "serviceData": {"reading": 258, "battery": 90}})
    );

    let mut bad = HuaweiDevice::new(server.endpoints.coap, "863000000000001");
    let mut good = HuaweiDevice::new(server.endpoints.coap, "863000000000002");
    bad.bind();
    good.bind();
    // Every uplink is ACKed (stored) whatever its script will make of it.
    for frame in [[1u8, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0], [0, 0x10, 0x00, 77]] {
        report_acked(&mut bad, &frame);
    }
    report_acked(&mut good, &[0, 0x00, 0x2a, 99]);

    let ms = wait_decoded(&server, &pk, &dns[0], 4, |_| true);
    let kinds: Vec<&str> = ms.iter().map(|m| m["decode_error"]["kind"].as_str().unwrap_or("ok")).collect();
    assert_eq!(kinds, ["thrown", "timeout", "memory", "ok"]);
    let thrown = ms[0]["decode_error"]["message"].as_str().unwrap();
    assert!(thrown.contains("Error: unknown frame 1") && thrown.contains("codec.js"), "{thrown}");
    assert!(ms[1]["decode_error"]["message"].as_str().unwrap().contains("50 ms"), "{}", ms[1]);
    assert!(ms[2]["decode_error"]["message"].as_str().unwrap().contains("16 MiB"), "{}", ms[2]);
    assert_eq!(ms[3]["decoded"]["data"][0]["serviceData"], json!({"reading": 4096, "battery": 77}));
    assert_eq!(ms[0]["payload_base64"], b64(&[1, 0, 0, 0]), "the raw bytes are kept");

    let ms = wait_decoded(&server, &pk, &dns[1], 1, |_| true);
    assert_eq!(ms[0]["decoded"]["data"][0]["serviceData"], json!({"reading": 42, "battery": 99}));

    assert!(server.metric("nbhub_codec_runtimes_rebuilt_total") >= 2.0);
    assert_eq!(server.metric("nbhub_codec_decoded_total{outcome=\"timeout\"}"), 1.0);
    assert_eq!(server.metric("nbhub_codec_decoded_total{outcome=\"memory\"}"), 1.0);
    assert_eq!(server.metric("nbhub_codec_decoded_total{outcome=\"thrown\"}"), 1.0);
    assert_eq!(server.metric("nbhub_codec_decoded_total{outcome=\"ok\"}"), 2.0);
}

#[test]
fn uploads_are_checked_kept_as_versions_tried_and_made_current() {
    let server = Server::start();
    let (pk, dns) = huawei_product(&server, "meters", &["863000000000011"]);
    let dn = &dns[0];
    let sample = b64(&[0, 0, 5, 50]);
    let codecs = format!("/api/v1/products/{pk}/codecs");

    // What cannot serve is refused with the script's own words, and nothing is kept.
    let (status, message) =
        api_error(upload(&server, &pk, json!({"script": "function decode( {", "sample_base64": sample})));
    assert_eq!(status, 400);
    assert!(message.contains("SyntaxError"), "{message}");
    let (status, message) =
        api_error(upload(&server, &pk, json!({"script": HUAWEI_SCRIPT, "sample_base64": b64(&[1, 0, 0, 0])})));
    assert_eq!(status, 400);
    assert!(message.contains("unknown frame 1"), "{message}");
    let (status, message) = api_error(upload(&server, &pk, json!({"script": "var a = 1;", "sample_base64": sample})));
    assert_eq!(status, 400);
    assert!(message.contains("defines none"), "{message}");
    let (status, message) = api_error(upload(&server, &pk, json!({"script": HUAWEI_SCRIPT, "sample_base64": "%%"})));
    assert_eq!(status, 400);
    assert!(message.contains("sample_base64"), "{message}");
    let big = format!("{HUAWEI_SCRIPT}//{}", "x".repeat(1 << 20));
    let (status, message) = api_error(upload(&server, &pk, json!({"script": big, "sample_base64": sample})));
    assert_eq!(status, 400);
    assert!(message.contains("at most 1048576"), "{message}");
    assert_eq!(api_error(upload(&server, "nope", json!({"script": HUAWEI_SCRIPT, "sample_base64": sample}))).0, 404);
    assert_eq!(server.admin().get(&codecs).unwrap(), json!({"codecs": [], "current": null}));

    upload(&server, &pk, json!({"script": HUAWEI_SCRIPT, "sample_base64": sample})).unwrap();
    let mut device = HuaweiDevice::new(server.endpoints.coap, "863000000000011");
    device.bind();
    report_acked(&mut device, &[0, 0, 5, 50]);
    wait_decoded(&server, &pk, dn, 1, |_| true);

    // Version 2 reads the battery as a percentage of 200; it waits until it is made current.
    let v2_script = HUAWEI_SCRIPT.replace("battery: payload[3]", "battery: payload[3] / 2");
    let v2 = upload(&server, &pk, json!({"script": v2_script, "sample_base64": sample, "current": false})).unwrap();
    assert_eq!((v2["version"].clone(), v2["current"].clone()), (json!(2), json!(false)));
    let list = server.admin().get(&codecs).unwrap();
    assert_eq!(list["current"], 1);
    assert_eq!(list["codecs"].as_array().unwrap().len(), 2);
    assert_eq!(server.admin().get(&format!("{codecs}/2")).unwrap()["script"], v2_script);

    // Tried on what the device sent, and on bytes given.
    let tried = server.admin().post(&format!("{codecs}/2/try"), &json!({"device_name": dn})).unwrap();
    assert_eq!(tried["messages"][0]["decoded"]["data"][0]["serviceData"]["battery"], 25, "{tried}");
    let tried =
        server.admin().post(&format!("{codecs}/2/try"), &json!({"payload_base64": b64(&[1, 0, 0, 0])})).unwrap();
    assert!(tried["decode_error"]["message"].as_str().unwrap().contains("unknown frame"), "{tried}");
    assert_eq!(api_error(server.admin().post(&format!("{codecs}/9/try"), &json!({"device_name": dn}))).0, 404);

    // Still version 1 until the switch.
    report_acked(&mut device, &[0, 0, 6, 50]);
    let ms = wait_decoded(&server, &pk, dn, 2, |_| true);
    assert_eq!(
        (ms[1]["codec_version"].clone(), ms[1]["decoded"]["data"][0]["serviceData"]["battery"].clone()),
        (json!(1), json!(50))
    );
    let codec = format!("/api/v1/products/{pk}/codec");
    server.admin().put(&codec, &json!({"version": 2})).unwrap();
    report_acked(&mut device, &[0, 0, 7, 50]);
    let ms = wait_decoded(&server, &pk, dn, 3, |_| true);
    assert_eq!(
        (ms[2]["codec_version"].clone(), ms[2]["decoded"]["data"][0]["serviceData"]["battery"].clone()),
        (json!(2), json!(25))
    );
    let (status, message) = api_error(server.admin().put(&codec, &json!({"version": 9})));
    assert_eq!(status, 400);
    assert!(message.contains("no codec version 9"), "{message}");

    // No current codec: bytes pass through as before.
    server.admin().put(&codec, &json!({"version": null})).unwrap();
    assert_eq!(server.admin().get(&codecs).unwrap()["current"], Value::Null);
    report_acked(&mut device, &[0, 0, 8, 50]);
    let ms = eventually(|| messages(&server, &pk, dn), |ms| ms.len() == 4, |ms| format!("{ms:#?}"));
    assert!(ms[3].get("codec_version").is_none() && ms[3].get("decoded").is_none(), "{}", ms[3]);
}

#[test]
fn decodes_queued_at_a_kill_are_done_after_the_restart() {
    // Slow enough decoding that the queue is long when the server dies.
    let mut server = Server::start_with(&[("NBHUB_CODEC_CALL_TIMEOUT_MS", "1000")]);
    let (pk, dns) = huawei_product(&server, "slow", &["863000000000021"]);
    let dn = &dns[0];
    let slow = HUAWEI_SCRIPT.replace(
        "var kind = payload[0];",
        "var kind = payload[0]; var until = Date.now() + 150; while (Date.now() < until) {}",
    );
    upload(&server, &pk, json!({"script": slow, "sample_base64": b64(&[0, 0, 1, 1])})).unwrap();
    let mut device = HuaweiDevice::new(server.endpoints.coap, "863000000000021");
    device.bind();
    const N: u8 = 20;
    for i in 0..N {
        report_acked(&mut device, &[0, 0, i, 1]);
    }
    let before = messages(&server, &pk, dn);
    assert_eq!(before.len(), N as usize, "every ACKed report is stored");
    let undecoded = before.iter().filter(|m| m.get("codec_version").is_none()).count();
    assert!(undecoded > 0, "the kill must find decodes queued");
    server.kill9();
    server.restart();

    let ms = wait_decoded(&server, &pk, dn, N as usize, |_| true);
    let readings: Vec<u64> =
        ms.iter().map(|m| m["decoded"]["data"][0]["serviceData"]["reading"].as_u64().unwrap()).collect();
    assert_eq!(readings, (0..N as u64).collect::<Vec<_>>(), "every one decoded, in order");
}

/// A Huawei codec for a valve in the style of Huawei's codec development guide: frame 0x00 is a
/// report, 0x01 the SET_VALVE command (`mid` in two bytes, then the position), 0x02 the device's
/// response (`mid`, `errcode`, a result byte), which `decode` turns into a `deviceRsp`.
const VALVE_SCRIPT: &str = r#"
function decode(payload, topic) {
    if (payload[0] == 0x00) {
        return JSON.stringify({ msgType: 'deviceReq', hasMore: 0,
            data: [{ serviceId: 'Valve', serviceData: { open: payload[1], battery: payload[2] } }] });
    }
    if (payload[0] == 0x02) {
        return JSON.stringify({ msgType: 'deviceRsp', mid: (payload[1] << 8) | payload[2],
            errcode: payload[3], body: { result: payload[4] } });
    }
    throw new Error('unknown frame ' + payload[0]);
}

function encode(json) {
    var obj = JSON.parse(json);
    if (obj.msgType == 'cloudReq' && obj.cmd == 'SET_VALVE') {
        if (obj.paras.open !== 0 && obj.paras.open !== 1) {
            throw new Error('open must be 0 or 1');
        }
        return [0x01, (obj.mid >> 8) & 0xff, obj.mid & 0xff, obj.paras.open];
    }
    throw new Error('unknown command ' + obj.cmd);
}
"#;

fn commands_of(pk: &str, dn: &str) -> String {
    format!("/api/v1/products/{pk}/devices/{dn}/commands")
}

#[test]
fn json_commands_are_encoded_at_creation_and_the_devices_answer_becomes_their_result() {
    let server = Server::start();
    let admin = server.admin();
    let (pk, dns) = huawei_product(&server, "valves", &["863000000000101"]);
    let dn = &dns[0];
    let set =
        |open: Value| json!({"payload_json": {"serviceId": "Valve", "cmd": "SET_VALVE", "paras": {"open": open}}});

    // Without a codec there is nothing to encode with.
    let (status, message) = api_error(admin.post(&commands_of(&pk, dn), &set(json!(1))));
    assert_eq!(status, 400);
    assert!(message.contains("no codec") && message.contains("payload_base64"), "{message}");
    upload(&server, &pk, json!({"script": VALVE_SCRIPT, "sample_base64": b64(&[0, 1, 90])})).unwrap();

    // Refusals name the problem, the script's own message included, and create nothing.
    let (status, message) = api_error(admin.post(&commands_of(&pk, dn), &set(json!(5))));
    assert_eq!(status, 400);
    assert!(message.contains("open must be 0 or 1") && message.contains("codec version 1"), "{message}");
    let unknown = json!({"payload_json": {"serviceId": "Valve", "cmd": "EXPLODE"}});
    assert!(api_error(admin.post(&commands_of(&pk, dn), &unknown)).1.contains("unknown command EXPLODE"));
    let numbered = json!({"payload_json": {"serviceId": "Valve", "cmd": "SET_VALVE", "mid": 9}});
    assert!(api_error(admin.post(&commands_of(&pk, dn), &numbered)).1.contains("must not set mid"));
    let both = json!({"payload_json": {"serviceId": "Valve", "cmd": "SET_VALVE"}, "payload_base64": "AQ=="});
    assert_eq!(api_error(admin.post(&commands_of(&pk, dn), &both)).0, 400);
    assert_eq!(api_error(admin.post(&commands_of(&pk, dn), &json!({}))).0, 400);
    assert_eq!(admin.get(&commands_of(&pk, dn)).unwrap()["commands"], json!([]));

    // Created while the device sleeps: encoded now, with the mid nbhub chose.
    let open = server.send_command(&pk, dn, set(json!(1)));
    let id = open["command_id"].as_str().unwrap().to_string();
    let mid = open["payload_json"]["mid"].as_u64().unwrap();
    assert_eq!(mid, id.parse::<u64>().unwrap() & 0xffff);
    assert_eq!(open["payload_json"]["msgType"], "cloudReq");
    assert_eq!(open["codec_version"], 1);
    assert_eq!(open["payload_base64"], b64(&[1, (mid >> 8) as u8, mid as u8, 1]));
    assert_eq!(open["status"], "PENDING");

    // The device wakes, takes it, ACKs it, and answers in a report of its own.
    let mut valve = HuaweiDevice::new(server.endpoints.coap, "863000000000101");
    valve.bind();
    valve.report(&[0, 0, 80]);
    let con = valve.command(std::time::Duration::from_secs(5)).expect("the command");
    assert_eq!(con.payload, [1, (mid >> 8) as u8, mid as u8, 1]);
    valve.answer(&con, Code::CHANGED, b"");
    server.wait_command(&id, "DELIVERED");
    report_acked(&mut valve, &[2, (mid >> 8) as u8, mid as u8, 0, 7]);
    let done = server.wait_command(&id, "SUCCESSFUL");
    assert_eq!(done["result_json"], json!({"msgType": "deviceRsp", "mid": mid, "errcode": 0, "body": {"result": 7}}));
    assert_eq!(done["result_base64"], b64(&[2, (mid >> 8) as u8, mid as u8, 0, 7]));

    // A response that comes before the command's ACK settles it too; a nonzero errcode fails
    // it, and the late ACK changes nothing.
    let close = server.send_command(&pk, dn, set(json!(0)));
    let (id2, mid2) =
        (close["command_id"].as_str().unwrap().to_string(), close["payload_json"]["mid"].as_u64().unwrap());
    let con = valve.command(std::time::Duration::from_secs(5)).expect("the second command");
    report_acked(&mut valve, &[2, (mid2 >> 8) as u8, mid2 as u8, 3, 0]);
    let failed = server.wait_command(&id2, "FAILED");
    assert!(failed["reason"].as_str().unwrap().contains("code 3"), "{failed}");
    assert_eq!(failed["result_json"]["errcode"], 3);
    valve.answer(&con, Code::CHANGED, b"");
    // Once the third command arrives, the second's ACK has been handled.
    let third = server.send_command(&pk, dn, set(json!(1)));
    valve.command(std::time::Duration::from_secs(5)).expect("the third command");
    assert_eq!(server.command(&id2)["status"], "FAILED");
    // An answer naming a command already ended, or none, changes nothing.
    report_acked(&mut valve, &[2, (mid >> 8) as u8, mid as u8, 5, 0]);
    report_acked(&mut valve, &[0, 1, 79]);
    wait_decoded(&server, &pk, dn, 5, |_| true);
    assert_eq!(server.command(&id)["status"], "SUCCESSFUL");
    assert_eq!(server.command(third["command_id"].as_str().unwrap())["status"], "SENT");
}

#[test]
fn alibaba_json_commands_go_down_raw_and_their_reply_settles_them() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "thermostats"}));
    let frame = [0x00, 0, 0, 0, 1, 0x00, 0xeb, 1];
    upload(&server, &pk, json!({"script": ALIBABA_SCRIPT, "sample_base64": b64(&frame)})).unwrap();
    let c = server.send_command(&pk, &dn, json!({"payload_json": {"params": {"switch": 1}}}));
    let id: u32 = c["command_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(c["topic"], format!("/sys/{pk}/{dn}/thing/model/down_raw"));
    assert_eq!(c["payload_json"]["id"], id.to_string());
    assert_eq!(c["payload_json"]["method"], "thing.service.property.set");
    let mut bytes = vec![1];
    bytes.extend(id.to_be_bytes());
    bytes.push(1);
    assert_eq!(c["payload_base64"], b64(&bytes));

    let mut dev = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::CONTENT);
    let req = dev.pull_request(10);
    dev.peer.exchange(&req);
    let answer = dev.peer.recv();
    let body: Value = serde_json::from_slice(&dev.key.as_ref().unwrap().decrypt(&answer.payload).unwrap()).unwrap();
    assert_eq!(body["messages"][0]["topic"], format!("/sys/{pk}/{dn}/thing/model/down_raw"));
    assert_eq!(STANDARD.decode(body["messages"][0]["payload"].as_str().unwrap()).unwrap(), bytes);
    dev.peer.send(&nbhub::coap::message::MessageBuilder::new(MessageType::Ack, Code::EMPTY, answer.mid, &[]).build());
    server.wait_command(c["command_id"].as_str().unwrap(), "DELIVERED");

    let mut reply = vec![0x03];
    reply.extend(id.to_be_bytes());
    reply.push(200);
    let req = dev.uplink_request(MessageType::Con, &format!("/sys/{pk}/{dn}/thing/model/down_raw_reply"), &reply);
    assert_eq!(dev.peer.exchange(&req).code.class(), 2);
    let done = server.wait_command(c["command_id"].as_str().unwrap(), "SUCCESSFUL");
    assert_eq!(done["result_json"], json!({"version": "1.0", "id": id.to_string(), "code": "200", "data": {}}));
}

/// `VALVE_SCRIPT`'s frames as a layout of fields.
fn valve_layout() -> Value {
    json!({"style": "huawei", "message_id": "u8", "messages": [
        {"kind": "report", "id": 0, "service": "Valve",
         "fields": [{"name": "open", "type": "u8"}, {"name": "battery", "type": "u8"}]},
        {"kind": "response", "id": 2, "fields": [{"name": "mid", "type": "u16"},
            {"name": "errcode", "type": "u8"}, {"name": "result", "type": "u8"}]},
        {"kind": "command", "id": 1, "service": "Valve", "command": "SET_VALVE",
         "fields": [{"name": "mid", "type": "u16"}, {"name": "open", "type": "u8"}]}
    ]})
}

#[test]
fn a_field_layout_decodes_and_encodes_like_the_script_it_replaces() {
    let server = Server::start();
    let (scripted, s_dns) = huawei_product(&server, "scripted valves", &["863000000000201"]);
    let (declared, d_dns) = huawei_product(&server, "declared valves", &["863000000000202"]);
    upload(&server, &scripted, json!({"script": VALVE_SCRIPT, "sample_base64": b64(&[0, 1, 90])})).unwrap();

    // A layout that does not hold together is refused with the place of the problem.
    let mut broken = valve_layout();
    broken["messages"][1]["id"] = json!(0);
    let (status, message) = api_error(upload(&server, &declared, json!({"fields": broken, "sample_base64": "AAE="})));
    assert_eq!(status, 400);
    assert!(message.contains("messages[1]: id 0 is used twice"), "{message}");
    let (status, message) =
        api_error(upload(&server, &declared, json!({"fields": valve_layout(), "sample_base64": "CQ=="})));
    assert_eq!(status, 400, "the sample must fit");
    assert!(message.contains("no uplink message has id 9"), "{message}");
    let both = json!({"fields": valve_layout(), "script": VALVE_SCRIPT, "sample_base64": "AAE="});
    assert!(api_error(upload(&server, &declared, both)).1.contains("either script or fields"));
    let created =
        upload(&server, &declared, json!({"fields": valve_layout(), "sample_base64": b64(&[0, 1, 90])})).unwrap();
    assert_eq!((created["kind"].clone(), created["style"].clone()), (json!("fields"), json!("huawei")));
    let shown = server.admin().get(&format!("/api/v1/products/{declared}/codecs/1")).unwrap();
    assert_eq!(shown["fields"], valve_layout());

    // The same frames from a device of each product read the same.
    let frames: [&[u8]; 3] = [&[0, 1, 90], &[0, 0, 7], &[0, 1]];
    let mut devices = Vec::new();
    for (node, pk, dn) in [("863000000000201", &scripted, &s_dns[0]), ("863000000000202", &declared, &d_dns[0])] {
        let mut d = HuaweiDevice::new(server.endpoints.coap, node);
        d.bind();
        for f in frames {
            report_acked(&mut d, f);
        }
        wait_decoded(&server, pk, dn, 3, |_| true);
        devices.push(d);
    }
    let (s_ms, d_ms) = (messages(&server, &scripted, &s_dns[0]), messages(&server, &declared, &d_dns[0]));
    for (s, d) in s_ms.iter().zip(&d_ms).take(2) {
        assert_eq!(s["decoded"], d["decoded"], "script and layout agree");
        assert_eq!(d["decoded"]["data"][0]["serviceId"], "Valve");
    }
    let unfit = &d_ms[2]["decode_error"];
    assert_eq!(unfit["kind"], "unfit");
    assert!(unfit["message"].as_str().unwrap().contains("1 bytes needed, 0 left"), "{unfit}");

    // A JSON command is encoded by the layout, and the device's response settles it.
    let dn = &d_dns[0];
    let set =
        |open: Value| json!({"payload_json": {"serviceId": "Valve", "cmd": "SET_VALVE", "paras": {"open": open}}});
    let (status, message) = api_error(server.admin().post(&commands_of(&declared, dn), &set(json!(300))));
    assert_eq!(status, 400);
    assert!(message.contains("open = 300 is outside 0..=255"), "{message}");
    let c = server.send_command(&declared, dn, set(json!(1)));
    let mid = c["payload_json"]["mid"].as_u64().unwrap();
    assert_eq!(c["payload_base64"], b64(&[1, (mid >> 8) as u8, mid as u8, 1]));
    // The device is still awake from its reports: the command goes at once.
    let valve = &mut devices[1];
    let con = valve.command(std::time::Duration::from_secs(5)).expect("the command");
    assert_eq!(con.payload, [1, (mid >> 8) as u8, mid as u8, 1]);
    valve.answer(&con, Code::CHANGED, b"");
    report_acked(valve, &[2, (mid >> 8) as u8, mid as u8, 0, 1]);
    let done = server.wait_command(c["command_id"].as_str().unwrap(), "SUCCESSFUL");
    assert_eq!(done["result_json"], json!({"msgType": "deviceRsp", "mid": mid, "errcode": 0, "body": {"result": 1}}));
}

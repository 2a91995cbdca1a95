//! Upgrades over PCP against the real server over real UDP: simulated LiteOS-style devices bind
//! on 5683, the admin API uploads packages and runs tasks, and the devices download, verify,
//! sleep, refuse, fail, and survive a kill -9 of the server.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ota::*;
use common::pcp::{Behaviour, Concurrency, PcpDevice};
use common::*;
use nbhub::ota::pcp::ResultCode;
use serde_json::{Value, json};

struct Fleet {
    pk: String,
    /// (device name, node id)
    devices: Vec<(String, String)>,
}

/// A PCP product with `n` Huawei devices; CONs to them retransmit quickly.
fn fleet(server: &Server, n: usize, awake_s: u32) -> Fleet {
    let admin = server.admin();
    let p = admin
        .post(
            "/api/v1/products",
            &json!({"name": "meters", "awake_window_s": awake_s, "ack_timeout_ms": 300, "max_retransmit": 2}),
        )
        .unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let devices = (0..n)
        .map(|i| {
            let node = format!("86{:013}", rand_node() + i as u64);
            let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": node})).unwrap();
            (d["device_name"].as_str().unwrap().to_string(), node)
        })
        .collect();
    Fleet { pk, devices }
}

fn rand_node() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 * 1000
}

/// Runs devices on their own threads until `stop` is set; returns them when it is.
fn spawn(devices: Vec<PcpDevice>, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<PcpDevice>> {
    devices
        .into_iter()
        .map(|d| {
            let stop = stop.clone();
            std::thread::spawn(move || d.run(&stop, Duration::from_secs(120)))
        })
        .collect()
}

fn join(handles: Vec<std::thread::JoinHandle<PcpDevice>>, stop: &AtomicBool) -> Vec<PcpDevice> {
    stop.store(true, Ordering::SeqCst);
    handles.into_iter().map(|h| h.join().expect("device thread")).collect()
}

/// A simulated device, bound.
fn bound(addr: &Arc<Mutex<std::net::SocketAddr>>, node: &str, b: Behaviour, pkg: &Arc<Vec<u8>>) -> PcpDevice {
    let mut d = PcpDevice::new(addr.clone(), node, b, pkg.clone());
    d.dev.bind();
    d
}

#[test]
fn a_device_downloads_every_chunk_verifies_it_and_upgrades() {
    let server = Server::start_with(&FAST);
    let hook = WebhookReceiver::start();
    server.admin().post("/api/v1/webhooks", &json!({"url": hook.url("/ota"), "events": ["ota_progress"]})).unwrap();
    let f = fleet(&server, 1, 600);
    let (dn, node) = f.devices[0].clone();
    let data = Arc::new(package_bytes(1234));
    let package = upload(&server, &f.pk, "V2.0", &data, 100, "V1.0,V1.1");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let mut dev = bound(&addr, &node, Behaviour::healthy("V1.0"), &data);
    // Radio state arrives as fields of an ordinary JSON uplink.
    dev.dev.report(br#"{"temperature": 21.5, "rsrp": -92, "sinr": 11.5, "cell_id": "cell-a"}"#);
    server.wait_device(&f.pk, &dn, |d| d["radio"]["cell_id"] == "cell-a");

    let id = start_task(&server, &package, &f.pk, &[&dn], None);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn(vec![dev], &stop);
    let t = wait_task(&server, &id, "finished");
    let dev = join(handles, &stop).pop().unwrap();

    assert_eq!(t["counts"]["succeeded"], 1, "{t}");
    let entry = device_entry(&t, &dn);
    assert_eq!((entry["state"].as_str(), entry["progress"].as_u64()), (Some("succeeded"), Some(100)));
    assert!(entry["failure_reason"].is_null());
    assert_eq!(dev.log().requested, (0..13).collect::<Vec<u16>>(), "every chunk once, in order");
    assert_eq!(dev.log().bad_chunks, 0);
    assert_eq!(dev.log().image.as_deref(), Some(&data[..]), "the assembled image is the package");
    assert_eq!(dev.log().malformed, 0);
    assert_eq!(dev.version(), "V2.0");
    let d = server.admin().get(&format!("/api/v1/products/{}/devices/{dn}", f.pk)).unwrap();
    assert_eq!(d["version"], "V2.0", "the version reported in the upgrade result: {d}");
    assert!(server.stored(&f.pk, &dn).iter().all(|(_, p)| !p.starts_with(&[0xFF, 0xFE])), "PCP is not stored as data");
    assert!(server.metric("nbhub_ota_chunks_served_total") >= 13.0);

    let events = hook.wait("the upgrade's progress", |e| e.iter().any(|d| d.json()["data"]["state"] == "succeeded"));
    let states: Vec<String> = events.iter().map(|d| d.json()["data"]["state"].as_str().unwrap().to_string()).collect();
    for s in ["querying_version", "notified", "downloading", "downloaded", "upgrading", "succeeded"] {
        assert!(states.iter().any(|x| x == s), "{s} announced: {states:?}");
    }
    let last = events.last().unwrap().json();
    assert_eq!((last["event"].as_str(), last["device_name"].as_str()), (Some("ota_progress"), Some(dn.as_str())));
    assert_eq!((last["data"]["task_id"].as_str(), last["data"]["progress"].as_u64()), (Some(id.as_str()), Some(100)));
}

#[test]
fn a_device_that_sleeps_mid_download_resumes_from_the_chunk_it_kept() {
    let server = Server::start_with(&FAST);
    let f = fleet(&server, 1, 2);
    let (dn, node) = f.devices[0].clone();
    server
        .admin()
        .patch(&format!("/api/v1/products/{}/devices/{dn}", f.pk), &json!({"radio": {"cell_id": "c9"}}))
        .unwrap();
    let data = Arc::new(package_bytes(2000));
    let package = upload(&server, &f.pk, "V3", &data, 200, "");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let behaviour =
        Behaviour { sleep_after_chunk: Some(4), sleep_for: Duration::from_secs(4), ..Behaviour::healthy("V2") };
    let dev = bound(&addr, &node, behaviour, &data);
    let id = start_task(&server, &package, &f.pk, &[&dn], None);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn(vec![dev], &stop);
    // asleep with half the package: the task waits, showing how far it got
    let t = eventually(
        || task(&server, &id),
        |t| device_entry(t, &dn)["progress"].as_u64() >= Some(50),
        |t| format!("no progress: {t}"),
    );
    assert_eq!(device_entry(&t, &dn)["state"], "downloading");
    let t = wait_task(&server, &id, "finished");
    let dev = join(handles, &stop).pop().unwrap();
    assert_eq!(device_entry(&t, &dn)["state"], "succeeded", "{t}");
    assert_eq!(dev.log().requested, (0..10).collect::<Vec<u16>>(), "resumed at chunk 5, nothing asked twice");
    assert!(dev.log().notifications >= 2, "woken by a repeated notification");
    assert_eq!(dev.log().image.as_deref(), Some(&data[..]));
}

#[test]
fn current_refusing_failing_and_unsupported_devices_end_as_they_should() {
    let server = Server::start_with(&FAST);
    let f = fleet(&server, 4, 600);
    let data = Arc::new(package_bytes(300));
    let package = upload(&server, &f.pk, "V2.0", &data, 100, "V1.0");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let behaviours = [
        Behaviour::healthy("V2.0"),
        Behaviour { notify_result: 0x04, ..Behaviour::healthy("V1.0") },
        Behaviour { install_result: 0x0A, ..Behaviour::healthy("V1.0") },
        Behaviour::healthy("V0.9"),
    ];
    let mut devices = Vec::new();
    for ((dn, node), b) in f.devices.iter().zip(behaviours) {
        server
            .admin()
            .patch(
                &format!("/api/v1/products/{}/devices/{dn}", f.pk),
                &json!({"radio": {"rsrp": -100, "sinr": 8, "cell_id": "c1"}}),
            )
            .unwrap();
        devices.push(bound(&addr, node, b, &data));
    }
    let names: Vec<&str> = f.devices.iter().map(|(dn, _)| dn.as_str()).collect();
    let id = start_task(&server, &package, &f.pk, &names, None);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn(devices, &stop);
    let t = wait_task(&server, &id, "finished");
    let devs = join(handles, &stop);
    let entry = |i: usize| device_entry(&t, &f.devices[i].0).clone();

    assert_eq!(entry(0)["state"], "succeeded", "already on the target: {t}");
    assert!(devs[0].log().requested.is_empty() && devs[0].log().notifications == 0, "nothing downloaded");
    assert_eq!(entry(1)["state"], "failed");
    assert!(entry(1)["failure_reason"].as_str().unwrap().contains("low battery"), "{t}");
    assert!(devs[1].log().requested.is_empty());
    assert_eq!(entry(2)["state"], "failed");
    assert_eq!(entry(2)["failure_reason"], "Firmware update failed");
    assert_eq!(devs[2].log().image.as_deref(), Some(&data[..]), "downloaded before the install failed");
    assert!(devs[2].log().upgrade_answered, "the failure report is answered");
    assert_eq!(entry(3)["state"], "failed");
    assert!(entry(3)["failure_reason"].as_str().unwrap().contains("V0.9"), "not a source version: {t}");
    assert_eq!(t["counts"]["succeeded"], 1);
    assert_eq!(t["counts"]["failed"], 3);
}

#[test]
fn each_wait_times_out_with_its_own_reason_and_retries_follow_the_policy() {
    let server = Server::start_with(&[
        FAST[0],
        FAST[1],
        ("NBHUB_OTA_ONLINE_TIMEOUT_S", "2"),
        ("NBHUB_OTA_QUERY_TIMEOUT_S", "2"),
        ("NBHUB_OTA_RADIO_TIMEOUT_S", "2"),
    ]);
    let f = fleet(&server, 3, 600);
    let data = Arc::new(package_bytes(300));
    let package = upload(&server, &f.pk, "V2.0", &data, 100, "");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    // 0 never shows life; 1 never answers the version query; 2 answers but reports no radio
    let silent = Behaviour { answers_query: false, ..Behaviour::healthy("V1.0") };
    let mute = bound(&addr, &f.devices[1].1, silent, &data);
    let radioless = bound(&addr, &f.devices[2].1, Behaviour::healthy("V1.0"), &data);
    let names: Vec<&str> = f.devices.iter().map(|(dn, _)| dn.as_str()).collect();
    let id = start_task(&server, &package, &f.pk, &names, Some(json!({"count": 1, "interval_minutes": 0})));
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn(vec![mute, radioless], &stop);
    let t = wait_task(&server, &id, "finished");
    let devs = join(handles, &stop);
    let entry = |i: usize| device_entry(&t, &f.devices[i].0).clone();
    assert_eq!(entry(0)["failure_reason"], "Waiting for the device online timeout", "{t}");
    assert_eq!(entry(1)["failure_reason"], "Waiting for report device firmware version timeout");
    assert_eq!(entry(2)["failure_reason"], "Waiting for report cellId timeout");
    for i in 0..3 {
        assert_eq!(
            (entry(i)["state"].as_str(), entry(i)["attempt"].as_u64()),
            (Some("failed"), Some(1)),
            "retried once: {t}"
        );
    }
    assert!(devs[0].log().queries >= 2, "asked again while unanswered, and again on the retry");
}

#[test]
fn concurrent_downloads_stay_within_each_cells_budget() {
    let server = Server::start_with(&FAST);
    // 60 level-0 devices in one cell (limit 50), 12 level-1 in another (10), 3 level-2 in a third (1)
    let groups: [(usize, &str, i32, i32, usize); 3] =
        [(60, "big", -90, 12, 50), (12, "mid", -110, 0, 10), (3, "edge", -120, -5, 1)];
    let total: usize = groups.iter().map(|g| g.0).sum();
    let f = fleet(&server, total, 600);
    let data = Arc::new(package_bytes(20 * 64));
    let package = upload(&server, &f.pk, "V2.0", &data, 64, "");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let mut devices = Vec::new();
    let mut gauges = Vec::new();
    let mut at = 0;
    for (n, cell, rsrp, sinr, _) in groups {
        let gauge = Arc::new(Concurrency::default());
        for (_, node) in &f.devices[at..at + n] {
            let b = Behaviour { chunk_delay: Duration::from_millis(40), ..Behaviour::healthy("V1.0") };
            let mut d = bound(&addr, node, b, &data).counting(gauge.clone());
            d.dev.report(format!(r#"{{"rsrp": {rsrp}, "sinr": {sinr}, "cell_id": "{cell}"}}"#).as_bytes());
            devices.push(d);
        }
        gauges.push(gauge);
        at += n;
    }
    for (dn, _) in &f.devices {
        server.wait_device(&f.pk, dn, |d| !d["radio"]["cell_id"].is_null());
    }
    let names: Vec<&str> = f.devices.iter().map(|(dn, _)| dn.as_str()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn(devices, &stop);
    let id = start_task(&server, &package, &f.pk, &names, None);
    let most_in_flight = std::sync::atomic::AtomicU64::new(0);
    let t = eventually(
        || {
            let t = task(&server, &id);
            let c = &t["counts"];
            most_in_flight
                .fetch_max(c["notified"].as_u64().unwrap() + c["downloading"].as_u64().unwrap(), Ordering::SeqCst);
            t
        },
        |t| t["status"] == "finished",
        |t| format!("the campaign did not finish: {}", t["counts"]),
    );
    let devs = join(handles, &stop);
    assert_eq!(t["counts"]["succeeded"].as_u64(), Some(total as u64), "{}", t["counts"]);
    assert!(devs.iter().all(|d| d.log().bad_chunks == 0 && d.log().image.as_deref() == Some(&data[..])));
    for ((_, cell, _, _, limit), gauge) in groups.iter().zip(&gauges) {
        assert_eq!(gauge.peak(), *limit, "cell {cell}: the budget is used, never exceeded");
    }
    let most = most_in_flight.load(Ordering::SeqCst);
    assert!(most <= 61, "the admin API never showed more than the cells allow: {most}");
}

#[test]
fn a_campaign_survives_a_kill_9_and_resumes_where_each_device_was() {
    let mut server = Server::start_with(&FAST);
    let f = fleet(&server, 4, 600);
    let data = Arc::new(package_bytes(40 * 50));
    let package = upload(&server, &f.pk, "V5", &data, 50, "");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let mut devices = Vec::new();
    for (dn, node) in &f.devices {
        server
            .admin()
            .patch(&format!("/api/v1/products/{}/devices/{dn}", f.pk), &json!({"radio": {"cell_id": "k"}}))
            .unwrap();
        let b = Behaviour { chunk_delay: Duration::from_millis(60), ..Behaviour::healthy("V4") };
        devices.push(bound(&addr, node, b, &data));
    }
    let names: Vec<&str> = f.devices.iter().map(|(dn, _)| dn.as_str()).collect();
    let id = start_task(&server, &package, &f.pk, &names, None);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn(devices, &stop);
    let before = eventually(
        || task(&server, &id),
        |t| t["devices"].as_array().unwrap().iter().all(|d| d["progress"].as_u64() >= Some(20)),
        |t| format!("no progress: {t}"),
    );
    assert_eq!(before["counts"]["downloading"], 4, "{before}");
    server.restart();
    *addr.lock().unwrap() = server.endpoints.coap;
    let after = task(&server, &id);
    assert_eq!(after["status"], "running");
    for d in after["devices"].as_array().unwrap() {
        assert_eq!(d["state"], "downloading", "restored: {after}");
        // stored every tenth of the download
        assert!(d["progress"].as_u64() >= Some(10), "progress kept: {after}");
    }
    let t = wait_task(&server, &id, "finished");
    let devs = join(handles, &stop);
    assert_eq!(t["counts"]["succeeded"], 4, "{t}");
    for d in &devs {
        assert_eq!(d.log().image.as_deref(), Some(&data[..]));
        let mut asked = d.log().requested.clone();
        asked.dedup();
        assert_eq!(asked, (0..40).collect::<Vec<u16>>(), "each chunk asked for once, in order, across the restart");
    }
}

#[test]
fn conflicts_stops_and_bad_requests() {
    let server = Server::start_with(&FAST);
    let f = fleet(&server, 2, 600);
    let data = package_bytes(500);
    let package = upload(&server, &f.pk, "V2.0", &data, 100, "");
    let (a, b) = (f.devices[0].0.as_str(), f.devices[1].0.as_str());
    let first = start_task(&server, &package, &f.pk, &[a], None);
    let second = start_task(&server, &package, &f.pk, &[a, b], None);
    let t = task(&server, &second);
    assert_eq!(device_entry(&t, a)["state"], "failed");
    assert_eq!(device_entry(&t, a)["failure_reason"], "Task Conflict");
    assert_eq!(device_entry(&t, b)["state"], "waiting_online");

    let stopped = server.admin().post(&format!("/api/v1/ota/tasks/{first}/stop"), &json!({})).unwrap();
    assert_eq!(stopped["status"], "stopped");
    assert_eq!(device_entry(&stopped, a)["state"], "canceled");
    // once stopped, the device may join another task
    let third = start_task(&server, &package, &f.pk, &[a], None);
    assert_eq!(device_entry(&task(&server, &third), a)["state"], "waiting_online");

    let other = server.admin().post("/api/v1/products", &json!({"name": "none", "ota_protocol": "none"})).unwrap();
    let other_pk = other["product_key"].as_str().unwrap();
    server.admin().post(&format!("/api/v1/products/{other_pk}/devices"), &json!({"device_name": "x"})).unwrap();
    let none_pkg = upload(&server, other_pk, "V1", &data, 100, "");
    let admin = server.admin();
    let status = |body: Value| match admin.post("/api/v1/ota/tasks", &body) {
        Err(nbhub::client::ClientError::Api { status, message, .. }) => (status, message),
        other => panic!("expected an error, got {other:?}"),
    };
    let dev = |pk: &str, dn: &str| json!({"product_key": pk, "device_name": dn});
    assert_eq!(status(json!({"package_id": "123", "devices": [dev(&f.pk, b)]})).0, 404);
    assert_eq!(status(json!({"package_id": package, "devices": [dev(&f.pk, "ghost")]})).0, 404);
    assert_eq!(status(json!({"package_id": package, "devices": []})).0, 400);
    let (code, message) = status(json!({"package_id": package, "devices": [dev(other_pk, "x")]}));
    assert!(code == 400 && message.contains("not of product"), "{message}");
    let (code, message) = status(json!({"package_id": package, "devices": [dev(&f.pk, b), dev(&f.pk, b)]}));
    assert!(code == 400 && message.contains("twice"), "{message}");
    let (code, message) = status(
        json!({"package_id": package, "devices": [dev(&f.pk, b)], "retry": {"count": 6, "interval_minutes": 5}}),
    );
    assert!(code == 400 && message.contains("retry.count"), "{message}");
    let (code, message) = status(json!({"package_id": none_pkg, "devices": [dev(other_pk, "x")]}));
    assert!(code == 400 && message.contains("no upgrade protocol"), "{message}");
    assert!(matches!(admin.get("/api/v1/ota/tasks/999"), Err(nbhub::client::ClientError::Api { status: 404, .. })));
    assert!(matches!(
        admin.post("/api/v1/ota/tasks/x/stop", &json!({})),
        Err(nbhub::client::ClientError::Api { status: 404, .. })
    ));
}

#[test]
fn an_alibaba_device_upgrades_with_pcp_in_its_uplinks_and_pulls_on_5682() {
    use nbhub::coap::message::{Code, MessageBuilder, MessageType};
    use nbhub::coap::option::OptionNumber;
    use nbhub::ota::pcp::{FromDevice, FromPlatform, ResultCode, Version};

    let server = Server::start_with(&FAST);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "ali-ota"}));
    let data = package_bytes(150);
    let package = upload(&server, &pk, "V2", &data, 64, "");
    let mut dev = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    assert_eq!(dev.auth().code, Code::CONTENT);
    assert_eq!(dev.send_uplink(br#"{"rsrp": -80, "sinr": 20, "cell_id": "ali-cell"}"#).code, Code::CHANGED);
    let id = start_task(&server, &package, &pk, &[&dn], None);

    let key = dev.key.clone().unwrap();
    // The platform's requests come in the /pull answer, ahead of commands.
    let pull = |dev: &mut AliDevice| -> FromPlatform {
        dev.seq += 1;
        let (mid, token) = (dev.peer.next_mid(), dev.peer.next_token());
        let req = MessageBuilder::new(MessageType::Con, Code::POST, mid, &token)
            .option(OptionNumber::URI_PATH, b"pull")
            .option(OptionNumber::ALI_TOKEN, dev.token.clone().unwrap().as_bytes())
            .option(OptionNumber::ALI_SEQ, &key.encrypt_seq(dev.seq))
            .build();
        dev.peer.exchange(&req);
        let answer = dev.peer.recv();
        dev.peer.send(&MessageBuilder::new(MessageType::Ack, Code::EMPTY, answer.mid, &[]).build());
        let body: Value = serde_json::from_slice(&key.decrypt(&answer.payload).unwrap()).unwrap();
        let m = &body["messages"][0];
        assert_eq!(
            (m["id"].as_str(), m["topic"].as_str()),
            (Some("pcp"), Some(format!("/ota/device/upgrade/{pk}/{dn}").as_str())),
            "{body}"
        );
        use base64::Engine;
        let frame = base64::engine::general_purpose::STANDARD.decode(m["payload"].as_str().unwrap()).unwrap();
        FromPlatform::parse(&frame).expect("a well-formed PCP frame")
    };
    // The device's PCP messages are uplinks; the answer is in the (encrypted) response.
    let uplink = |dev: &mut AliDevice, msg: FromDevice| -> Option<FromPlatform> {
        let r = dev.send_uplink(&msg.encode());
        assert_eq!(r.code, Code::CHANGED);
        (!r.payload.is_empty())
            .then(|| FromPlatform::parse(&dev.key.as_ref().unwrap().decrypt(&r.payload).unwrap()).unwrap())
    };

    assert_eq!(pull(&mut dev), FromPlatform::QueryVersion);
    assert_eq!(
        uplink(&mut dev, FromDevice::Version { result: ResultCode::OK, version: Version::new("V1").unwrap() }),
        None
    );
    let target = Version::new("V2").unwrap();
    assert_eq!(pull(&mut dev), FromPlatform::NewVersion { version: target, chunk_size: 64, chunk_count: 3 });
    assert_eq!(uplink(&mut dev, FromDevice::NotifyAnswer { result: ResultCode::OK }), None);
    let mut image = Vec::new();
    for n in 0..3u16 {
        let Some(FromPlatform::Chunk { result, chunk, data: part }) =
            uplink(&mut dev, FromDevice::ChunkRequest { version: target, chunk: n })
        else {
            panic!("a chunk")
        };
        assert_eq!((result, chunk), (ResultCode::OK, n));
        image.extend(part);
    }
    assert_eq!(image, data);
    assert_eq!(
        uplink(&mut dev, FromDevice::ChunkRequest { version: target, chunk: 3 }),
        Some(FromPlatform::Chunk { result: ResultCode::NO_CHUNK, chunk: 3, data: Vec::new() })
    );
    let answer = uplink(&mut dev, FromDevice::DownloadResult { result: ResultCode::OK });
    assert_eq!(answer, Some(FromPlatform::DownloadResultAnswer { result: ResultCode::OK }));
    assert_eq!(pull(&mut dev), FromPlatform::Execute);
    assert_eq!(uplink(&mut dev, FromDevice::ExecuteAnswer { result: ResultCode::OK }), None);
    let done = FromDevice::UpgradeResult { result: ResultCode::OK, version: target };
    for _ in 0..2 {
        // a repeated report gets the same answer
        assert_eq!(uplink(&mut dev, done.clone()), Some(FromPlatform::UpgradeResultAnswer { result: ResultCode::OK }));
    }
    let t = wait_task(&server, &id, "finished");
    assert_eq!(device_entry(&t, &dn)["state"], "succeeded", "{t}");
    let stored = server.stored(&pk, &dn);
    assert_eq!(stored.len(), 1, "only the radio report is business data");
}

#[test]
fn answers_in_acks_a_missing_result_and_a_stop_in_the_middle_of_a_download() {
    let server = Server::start_with(&[FAST[0], FAST[1], ("NBHUB_OTA_UPGRADE_TIMEOUT_S", "1")]);
    let f = fleet(&server, 3, 600);
    let data = Arc::new(package_bytes(20 * 50));
    let package = upload(&server, &f.pk, "V2.0", &data, 50, "");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    for (dn, _) in &f.devices {
        server
            .admin()
            .patch(&format!("/api/v1/products/{}/devices/{dn}", f.pk), &json!({"radio": {"cell_id": "s"}}))
            .unwrap();
    }
    // 0 answers the platform's requests inside its ACKs; 1 installs but never reports the result;
    // 2 downloads slowly and its task is stopped.
    let behaviours = [
        Behaviour { answers_in_ack: true, ..Behaviour::healthy("V1.0") },
        Behaviour { reports_result: false, ..Behaviour::healthy("V1.0") },
        Behaviour { chunk_delay: Duration::from_millis(150), ..Behaviour::healthy("V1.0") },
    ];
    let devices: Vec<PcpDevice> =
        f.devices.iter().zip(behaviours).map(|((_, node), b)| bound(&addr, node, b, &data)).collect();
    let (a, b, c) = (f.devices[0].0.as_str(), f.devices[1].0.as_str(), f.devices[2].0.as_str());
    let first = start_task(&server, &package, &f.pk, &[a, b], None);
    let second = start_task(&server, &package, &f.pk, &[c], None);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn(devices, &stop);

    eventually(
        || task(&server, &second),
        |t| device_entry(t, c)["progress"].as_u64() >= Some(20),
        |t| format!("no progress: {t}"),
    );
    let stopped = server.admin().post(&format!("/api/v1/ota/tasks/{second}/stop"), &json!({})).unwrap();
    assert_eq!(device_entry(&stopped, c)["state"], "canceled");
    let t = wait_task(&server, &first, "finished");
    // The stopped device's next chunk requests are refused, not served.
    std::thread::sleep(Duration::from_millis(700));
    let devs = join(handles, &stop);

    assert_eq!(device_entry(&t, a)["state"], "succeeded", "{t}");
    assert_eq!(devs[0].log().image.as_deref(), Some(&data[..]));
    assert_eq!(device_entry(&t, b)["state"], "succeeded", "the version query settled it: {t}");
    assert!(devs[1].log().queries >= 2, "asked its version again after the upgrade");
    assert_eq!(devs[1].version(), "V2.0");
    assert!(devs[2].log().image.is_none(), "the stopped download never completed");
    assert!(
        devs[2].log().chunk_refusals.iter().all(|r| *r == ResultCode::NO_TASK)
            && !devs[2].log().chunk_refusals.is_empty(),
        "{:?}",
        devs[2].log().chunk_refusals
    );
    assert_eq!(device_entry(&task(&server, &second), c)["state"], "canceled");
}

#[test]
fn chunk_requests_that_move_a_download_on_are_not_charged_to_flow_control() {
    // The default limits: LiteOS asks for each next chunk as soon as it has the previous one.
    let mut env = FAST.to_vec();
    env.extend([("NBHUB_DEVICE_MAX_PER_SECOND", "5"), ("NBHUB_DEVICE_MAX_PER_MINUTE", "300")]);
    let server = Server::start_with(&env);
    let f = fleet(&server, 1, 600);
    let (dn, node) = f.devices[0].clone();
    let data = Arc::new(package_bytes(3000));
    let package = upload(&server, &f.pk, "V2.0", &data, 100, "V1.0");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let mut dev = bound(&addr, &node, Behaviour::healthy("V1.0"), &data);
    dev.dev.report(br#"{"rsrp": -92, "sinr": 11.5, "cell_id": "cell-a"}"#);
    server.wait_device(&f.pk, &dn, |d| d["radio"]["cell_id"] == "cell-a");
    let id = start_task(&server, &package, &f.pk, &[&dn], None);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn(vec![dev], &stop);
    let t = wait_task(&server, &id, "finished");
    let dev = join(handles, &stop).pop().unwrap();
    assert_eq!(t["counts"]["succeeded"], 1, "{t}");
    assert_eq!(
        dev.log().requested,
        (0..30).collect::<Vec<u16>>(),
        "30 chunks back to back, none dropped or asked twice"
    );
    assert_eq!(dev.log().image.as_deref(), Some(&data[..]));
}

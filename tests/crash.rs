//! Crash safety: under load (uplinks, commands, an upgrade campaign) nbhub is killed with SIGKILL
//! at random moments and restarted on the same data directory, several times. Afterwards every
//! uplink a device was told was stored is stored (a retransmission across a crash may be stored
//! twice, which CoAP allows: the dedup cache does not outlive the process), nothing is stored that
//! was never sent, every command the admin API created exists, and the campaign finishes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pcp::{Behaviour, PcpDevice};
use common::*;
use nbhub::coap::message::{Code, MessageType};
use serde_json::json;

/// Kill/restart cycles, at pseudo-random moments from this seed.
const CYCLES: usize = 4;
const SEED: u64 = 20261123;

#[derive(Default)]
struct UplinkLog {
    sent: BTreeSet<u32>,
    acknowledged: BTreeSet<u32>,
}

/// An Alibaba device on 5683 sending numbered CON uplinks back to back, retrying each (same
/// message id) until it is acknowledged, following the server to its new port after a restart.
fn uplinks(
    server: Arc<Mutex<SocketAddr>>,
    mut dev: AliDevice,
    log: Arc<Mutex<UplinkLog>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let topic = dev.default_topic();
            let req = dev.uplink_request(MessageType::Con, &topic, format!("u{n}").as_bytes());
            log.lock().unwrap().sent.insert(n);
            loop {
                dev.peer.server = *server.lock().unwrap();
                dev.peer.send(&req);
                let answered = dev.peer.recv_within(Duration::from_millis(300)).map(|d| Reply::parse(&d));
                match answered {
                    Some(r) if r.mid == u16::from_be_bytes([req[2], req[3]]) && r.code == Code::CHANGED => break,
                    _ if stop.load(Ordering::SeqCst) => return,
                    _ => {}
                }
            }
            log.lock().unwrap().acknowledged.insert(n);
            n += 1;
        }
    })
}

#[test]
fn kill_9_at_random_moments_under_load_loses_nothing_acknowledged() {
    let mut server = Server::start_with(&[("NBHUB_OTA_TICK_MS", "100"), ("NBHUB_OTA_RESEND_S", "1")]);
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let admin = server.admin();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "crash"}));
    let mut ali = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    assert_eq!(ali.auth().code, Code::CONTENT);

    // An upgrade campaign over three PCP devices.
    let ota = admin
        .post(
            "/api/v1/products",
            &json!({"name": "ota", "awake_window_s": 600, "ack_timeout_ms": 300, "max_retransmit": 2}),
        )
        .unwrap();
    let ota_pk = ota["product_key"].as_str().unwrap().to_string();
    let data = Arc::new((0..60 * 50).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let package = admin
        .post_bytes(&format!("/api/v1/packages?product_key={ota_pk}&version=V9&type=firmware&chunk_size=50"), &data)
        .unwrap()["package_id"]
        .as_str()
        .unwrap()
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let mut names = Vec::new();
    let mut pcp_threads = Vec::new();
    for i in 0..3 {
        let node = format!("8600000000{:05}", SEED % 100_000 + i);
        let d = admin
            .post(
                &format!("/api/v1/products/{ota_pk}/devices"),
                &json!({"node_id": node, "device_name": format!("pcp{i}")}),
            )
            .unwrap();
        admin.patch(&format!("/api/v1/products/{ota_pk}/devices/pcp{i}"), &json!({"radio": {"cell_id": "c"}})).unwrap();
        names.push(d["device_name"].as_str().unwrap().to_string());
        let b = Behaviour { chunk_delay: Duration::from_millis(40), ..Behaviour::healthy("V8") };
        let mut device = PcpDevice::new(addr.clone(), &node, b, data.clone());
        device.dev.bind();
        let stop = stop.clone();
        pcp_threads.push(std::thread::spawn(move || device.run(&stop, Duration::from_secs(120))));
    }
    let devices: Vec<_> = names.iter().map(|n| json!({"product_key": ota_pk, "device_name": n})).collect();
    let task = admin.post("/api/v1/ota/tasks", &json!({"package_id": package, "devices": devices})).unwrap();
    let task_id = task["task_id"].as_str().unwrap().to_string();

    let log = Arc::new(Mutex::new(UplinkLog::default()));
    let uplink_thread = uplinks(addr.clone(), ali, log.clone(), stop.clone());

    // Commands created all along; only those the API answered 201 for are promised.
    let mut commands: BTreeMap<String, String> = BTreeMap::new();
    let mut rng = SEED;
    for cycle in 0..CYCLES {
        // xorshift: 0.3 to 1.5 s of load before the kill
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let until = Instant::now() + Duration::from_millis(300 + rng % 1200);
        while Instant::now() < until {
            let body = json!({"payload_base64": "Y21k", "expire_time": 3600});
            if let Ok(c) = server.admin().post(&format!("/api/v1/products/{pk}/devices/{dn}/commands"), &body) {
                commands
                    .insert(c["command_id"].as_str().unwrap().to_string(), c["status"].as_str().unwrap().to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        server.restart();
        *addr.lock().unwrap() = server.endpoints.coap;
        eprintln!("cycle {cycle}: restarted, {} uplinks acknowledged so far", log.lock().unwrap().acknowledged.len());
    }
    // The load goes on against the last incarnation, then stops.
    let at_last_restart = log.lock().unwrap().acknowledged.len();
    eventually(
        || log.lock().unwrap().acknowledged.len(),
        |n| *n > at_last_restart + 50,
        |n| format!("uplinks stalled after the last restart at {n}"),
    );
    let t = eventually(
        || server.admin().get(&format!("/api/v1/ota/tasks/{task_id}")).unwrap(),
        |t| t["status"] == "finished",
        |t| format!("the campaign did not finish after the crashes: {t}"),
    );
    stop.store(true, Ordering::SeqCst);
    uplink_thread.join().unwrap();
    let pcp: Vec<PcpDevice> = pcp_threads.into_iter().map(|h| h.join().unwrap()).collect();

    assert_eq!(t["counts"]["succeeded"], 3, "{t}");
    for d in &pcp {
        assert_eq!(d.log().image.as_deref(), Some(&data[..]), "every device has the whole package");
    }
    let log = log.lock().unwrap();
    let mut stored: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, payload) in server.stored(&pk, &dn) {
        let n: u32 = String::from_utf8(payload).unwrap().trim_start_matches('u').parse().unwrap();
        *stored.entry(n).or_default() += 1;
    }
    let missing: Vec<_> = log.acknowledged.iter().filter(|n| !stored.contains_key(n)).collect();
    assert!(missing.is_empty(), "acknowledged but not stored: {missing:?}");
    assert!(stored.keys().all(|n| log.sent.contains(n)), "stored but never sent");
    let twice = stored.values().filter(|c| **c > 1).count();
    assert!(twice <= CYCLES, "{twice} uplinks stored twice in {CYCLES} crashes: at most the one in flight each time");
    assert!(log.acknowledged.len() > 20, "the load ran: {} uplinks", log.acknowledged.len());
    for (id, status) in &commands {
        let c = server.command(id);
        assert_eq!(c["command_id"], id.as_str());
        assert!(
            status == "PENDING" && ["PENDING", "EXPIRED", "SENT", "DELIVERED"].contains(&c["status"].as_str().unwrap()),
            "{c}"
        );
    }
    assert!(commands.len() > 10);
    eprintln!(
        "{CYCLES} kill -9 cycles: {} uplinks acknowledged and found ({twice} stored twice), {} commands intact, 3 upgrades finished",
        log.acknowledged.len(),
        commands.len()
    );
}

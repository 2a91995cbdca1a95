//! The operator console in a real headless Chromium, against the real server and simulated
//! devices over UDP: sign in, find the device that just reported, trace it, send it a command
//! and watch its state change, upload a package and start a campaign, and watch a cell's budget
//! fill and empty. Screenshots of each page go to `target/console-screenshots/`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::browser::Browser;
use common::ota::*;
use common::pcp::{Behaviour, PcpDevice};
use common::*;
use nbhub::coap::message::Code;
use serde_json::{Value, json};

const NODE: &str = "861234567890777";

#[test]
fn an_operator_finds_a_device_traces_it_commands_it_and_runs_a_campaign() {
    let server = Server::start_with(&FAST);
    let (pk, dn) = server.huawei_device(NODE, json!({"name": "water meters", "awake_window_s": 1}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, NODE);
    dev.bind();
    dev.report_confirmed(br#"{"flow": 12.5, "rsrp": -92, "sinr": 11, "cell_id": "east-7"}"#);

    let b = Browser::start("operator");
    let console = format!("{}/console/", server.admin_url());
    b.goto(&format!("{}/", server.admin_url()));
    b.wait_for("#signin");
    assert!(b.eval("return location.pathname", json!([])).as_str() == Some("/console/"), "/ leads to the console");
    b.screenshot("signin");

    // A wrong token is refused with the API's own words, and nothing else is shown.
    b.type_into("#token", "not-the-token");
    b.click("#signin button[type=submit]");
    b.wait_text("#signin-error", |t| t.contains("the bearer token is wrong"));
    assert_eq!(b.eval("return document.getElementById('page').hidden", json!([])), json!(true));
    b.type_into("#token", TOKEN);
    b.click("#signin button[type=submit]");

    // Fleet: the device that just reported is online and found by name.
    let product_row = format!("#products tr[data-product=\"{pk}\"]");
    b.wait_text(&product_row, |t| t.contains("water meters"));
    assert_eq!(
        b.eval("return sessionStorage.getItem('nbhub.token')", json!([])),
        json!(TOKEN),
        "kept for the tab's session only"
    );
    assert_eq!(b.eval("return localStorage.length", json!([])), json!(0));
    b.click(&product_row);
    b.wait_text("#counts [data-status=online] .count", |t| t == "1");
    let part = &dn[dn.len() - 4..];
    b.type_into("#device-search", part);
    let row = format!("#devices tr[data-device=\"{dn}\"]");
    b.wait_text(&format!("{row} td.status"), |t| t.contains("online"));
    assert!(b.text("#devices tbody tr:nth-child(2)").is_none(), "only the matching device is listed");
    // The chart draws the uplink of this minute.
    let drawn =
        b.eval("return document.querySelectorAll('#uplinks-chart path, #uplinks-chart polyline').length", json!([]));
    assert!(drawn.as_u64().unwrap() > 0, "the uplinks chart is drawn");
    b.screenshot("fleet");
    let activity = server.admin().get(&format!("/api/v1/products/{pk}/activity?minutes=5")).unwrap();
    assert_eq!((activity["total"].as_u64(), activity["counts"]["online"].as_u64()), (Some(1), Some(1)), "{activity}");
    let minutes = activity["uplinks_per_minute"].as_array().unwrap();
    assert_eq!(minutes.len(), 5);
    assert_eq!(minutes.iter().map(|m| m["count"].as_u64().unwrap()).sum::<u64>(), 1, "the one report: {activity}");

    // Device: its details and message, then a trace, then a command it takes on its next report.
    b.click(&format!("{row} a.device-link"));
    b.wait_text("#device-status", |t| t.contains("online"));
    b.wait_text("#device-cell", |t| t.contains("east-7"));
    b.wait_text("#messages tr.message", |t| t.contains("flow"));
    // Disabled and enabled again from the page, as the API then shows it.
    b.click("#toggle-enabled");
    b.wait_text("#device-enabled", |t| t == "disabled");
    assert_eq!(server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap()["enabled"], false);
    b.click("#toggle-enabled");
    b.wait_text("#device-enabled", |t| t == "enabled");
    assert_eq!(server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap()["enabled"], true);
    b.type_into("#trace-duration", "600");
    b.click("#trace-start");
    b.wait_text("#trace-status", |t| t.contains("until"));

    b.type_into("#command-payload", "open valve");
    b.click("#command-form button[type=submit]");
    b.wait_text("#commands tr[data-command] td.status", |t| t.contains("PENDING"));
    let command_id = b.eval("return document.querySelector('#commands tr[data-command]').dataset.command", json!([]));
    let command_id = command_id.as_str().unwrap().to_string();

    dev.report(b"reading 2");
    let cmd = dev.command(Duration::from_secs(10)).expect("the command after the report");
    assert_eq!(cmd.payload, b"open valve");
    dev.answer(&cmd, Code::CONTENT, b"0");
    server.wait_command(&command_id, "SUCCESSFUL");
    let status = format!("#commands tr[data-command=\"{command_id}\"] td.status");
    b.wait_text(&status, |t| t.contains("SUCCESSFUL"));
    // The trace shows the exchange both ways, live.
    b.wait_text("#trace", |t| t.contains("POST") && t.contains("reading 2"));
    b.screenshot("device");

    // The same trace over the admin API: the report in, its ACK, the command out and its answer.
    let trace = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/trace")).unwrap();
    let entries = trace["entries"].as_array().unwrap();
    let report = entries
        .iter()
        .find(|e| e["direction"] == "in" && e["payload_base64"] == b64(b"reading 2"))
        .unwrap_or_else(|| panic!("the report is traced: {trace}"));
    assert_eq!((report["type"].as_str(), report["code"].as_str()), (Some("NON"), Some("2.05")));
    assert!(report["options"].as_array().unwrap().iter().any(|o| o["name"] == "Observe"));
    let out = entries
        .iter()
        .find(|e| e["direction"] == "out" && e["code_name"] == "POST")
        .unwrap_or_else(|| panic!("the command is traced: {trace}"));
    assert_eq!(out["payload_base64"], b64(b"open valve"));
    let answer = entries
        .iter()
        .find(|e| e["direction"] == "in" && e["answers"] == out["seq"])
        .unwrap_or_else(|| panic!("the command's answer is paired with it: {trace}"));
    assert_eq!(answer["type"], "ACK");
    assert!(answer["elapsed_ms"].as_f64().unwrap() >= 0.0);
    b.click("#trace-stop");
    b.wait_text("#trace-status", |t| t.contains("not tracing"));
    let gone = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/trace")).unwrap_err();
    assert!(gone.to_string().contains("is not being traced"), "{gone}");

    campaign(&server, &b, &console);
}

/// 12 level-1 devices in one cell, whose budget allows 10 concurrent downloads: the cell view
/// shows the 50 units in use and the 2 waiting, then empties as the campaign finishes.
fn campaign(server: &Server, b: &Browser, console: &str) {
    let admin = server.admin();
    let p = admin
        .post(
            "/api/v1/products",
            &json!({"name": "gas meters", "awake_window_s": 600, "ack_timeout_ms": 300, "max_retransmit": 2}),
        )
        .unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let data = Arc::new(package_bytes(12 * 64));
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let mut names = Vec::new();
    let mut devices = Vec::new();
    for i in 0..12 {
        let node = format!("8650000000{i:05}");
        let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": node})).unwrap();
        names.push(d["device_name"].as_str().unwrap().to_string());
        let behaviour = Behaviour { chunk_delay: Duration::from_millis(250), ..Behaviour::healthy("V1.0") };
        let mut d = PcpDevice::new(addr.clone(), &node, behaviour, data.clone());
        d.dev.bind();
        d.dev.report(br#"{"rsrp": -110, "sinr": 0, "cell_id": "north-3"}"#);
        devices.push(d);
    }
    for dn in &names {
        server.wait_device(&pk, dn, |d| d["radio"]["cell_id"] == "north-3");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = devices
        .into_iter()
        .map(|d| {
            let stop = stop.clone();
            std::thread::spawn(move || d.run(&stop, Duration::from_secs(120)))
        })
        .collect();

    // The package is uploaded and the task started from the console's forms.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data[..]).unwrap();
    b.goto(&format!("{console}#/upgrades"));
    b.wait_for("#package-form");
    b.select("#package-product", &pk);
    b.type_into("#package-version", "V2.0");
    b.type_into("#package-chunk-size", "64");
    b.attach("#package-file", file.path());
    b.click("#package-form button[type=submit]");
    b.wait_text("#packages", |t| t.contains("V2.0"));
    let package_id = admin.get(&format!("/api/v1/packages?product_key={pk}")).unwrap()["packages"][0]["package_id"]
        .as_str()
        .unwrap()
        .to_string();
    b.select("#task-package", &package_id);
    b.type_into("#task-devices", &names.join("\n"));
    b.click("#task-form button[type=submit]");

    let cell = "#cells tr[data-cell=\"north-3\"]";
    b.wait_text(&format!("{cell} td.used"), |t| t.starts_with("50"));
    b.wait_text("#task-status", |t| t.contains("running"));
    let cells = admin.get("/api/v1/ota/cells").unwrap();
    let north = cells["cells"].as_array().unwrap().iter().find(|c| c["cell_id"] == "north-3").cloned();
    assert!(north.is_some_and(|c| c["downloads"]["level_1"].as_u64() <= Some(10)), "{cells}");
    b.screenshot("campaign");

    b.wait_text("#task-status", |t| t.contains("finished"));
    b.wait_text("#task-counts", |t| t.contains("12"));
    b.wait_text("#cells", |t| t.contains("No downloads in progress"));
    stop.store(true, Ordering::SeqCst);
    let devs: Vec<PcpDevice> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(devs.iter().all(|d| d.version() == "V2.0"), "every device upgraded");
    let task_id = b.eval("return location.hash.split('/').pop()", json!([]));
    let t: Value = task(server, task_id.as_str().unwrap());
    assert_eq!(t["counts"]["succeeded"], 12, "{t}");
    b.screenshot("campaign-finished");
}

/// The fleet chart's minutes are stored as they go: after a kill -9 the uplinks acknowledged
/// before it are still counted.
#[test]
fn uplinks_per_minute_survive_a_kill_9() {
    let mut server = Server::start();
    let node = "861234567890778";
    let (pk, _) = server.huawei_device(node, json!({"name": "meters"}));
    let mut dev = HuaweiDevice::new(server.endpoints.coap, node);
    dev.bind();
    for i in 0..3 {
        dev.report_confirmed(format!("reading {i}").as_bytes());
    }
    let path = format!("/api/v1/products/{pk}/activity?minutes=10");
    let sum = |a: &Value| {
        a["uplinks_per_minute"].as_array().unwrap().iter().map(|m| m["count"].as_u64().unwrap()).sum::<u64>()
    };
    assert_eq!(sum(&server.admin().get(&path).unwrap()), 3);
    // Stored every 5 s.
    std::thread::sleep(Duration::from_secs(6));
    server.kill9();
    server.restart();
    assert_eq!(sum(&server.admin().get(&path).unwrap()), 3, "counted again after the restart");
    let (status, message) = api_error(server.admin().get(&format!("/api/v1/products/{pk}/activity?minutes=0")));
    assert_eq!(status, 400);
    assert!(message.contains("minutes"), "{message}");
}

/// A distribution task of 4 devices to a second instance, in batches of 2: its page shows the
/// first batch moved and waiting, and pausing, resuming and rolling back from the page take.
#[test]
fn an_operator_follows_and_steers_a_distribution_task() {
    let cluster = |name: &str, peers: &str| {
        let mut env =
            vec![("NBHUB_CLUSTER_NAME", name), ("NBHUB_CLUSTER_HOST", "127.0.0.1"), ("NBHUB_CLUSTER_POLL_S", "1")];
        if !peers.is_empty() {
            env.push(("NBHUB_CLUSTER_PEERS", peers));
        }
        Server::start_with(&env)
    };
    let west = cluster("west", "");
    let e = &west.endpoints;
    let peer = format!(
        r#"[{{ name = "west", host = "127.0.0.1", coap_port = {}, aes_port = {}, dtls_port = {}, admin_url = "{}", token = "{TOKEN}" }}]"#,
        e.coap.port(),
        e.aes.port(),
        e.dtls.port(),
        west.admin_url()
    );
    let east = cluster("east", &peer);
    let admin = east.admin();
    let (pk, _, _) = east.product_and_device(json!({"name": "street lights"}));
    let names: Vec<String> = (0..4)
        .map(|i| {
            let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"device_name": format!("lamp-{i}")}));
            d.unwrap()["device_name"].as_str().unwrap().to_string()
        })
        .collect();
    let t = admin
        .post(
            "/api/v1/distribution/tasks",
            &json!({"product_key": pk, "device_names": names, "policy": "specified", "instance": "west", "batch_size": 2}),
        )
        .unwrap();
    let id = t["task_id"].as_str().unwrap().to_string();

    let b = Browser::start("distribution");
    b.goto(&format!("{}/console/", east.admin_url()));
    b.type_into("#token", TOKEN);
    b.click("#signin button[type=submit]");
    b.click("#nav-distribution");
    let row = format!("#distribution-tasks tr[data-task=\"{id}\"]");
    b.wait_text(&row, |t| t.contains("west"));
    b.screenshot("tasks");
    b.click(&format!("{row} a"));
    // The first batch is moved; the second waits for it to reconnect at west.
    b.wait_text("#dist-counts", |t| t.contains("moved 2") || t.contains("2 moved"));
    b.wait_text("#dist-status", |t| t.contains("in progress") || t.contains("in_progress"));
    b.wait_text("#distribution-devices", |t| t.contains("lamp-0") && t.contains("pending"));
    b.screenshot("task");

    b.click("#dist-pause");
    b.wait_text("#dist-status", |t| t.contains("paused"));
    assert_eq!(admin.get(&format!("/api/v1/distribution/tasks/{id}")).unwrap()["status"], "paused");
    b.click("#dist-rollback");
    b.accept_dialog();
    b.wait_text("#distribution-devices", |t| t.contains("rolled_back") || t.contains("rolled back"));
    let devices = admin.get(&format!("/api/v1/distribution/tasks/{id}/devices")).unwrap();
    let rolled = devices["devices"].as_array().unwrap().iter().filter(|d| d["status"] == "rolled_back").count();
    assert_eq!(rolled, 2, "{devices}");
    for dn in &names[..2] {
        let d = admin.get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
        assert_eq!(d["home"]["state"], "here", "{dn} is home again: {d}");
    }
    b.click("#dist-resume");
    b.wait_text("#dist-status", |t| !t.contains("paused"));
    b.screenshot("task-rolled-back");
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

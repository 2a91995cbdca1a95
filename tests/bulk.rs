//! Bulk import and export of devices against the real server: a file with a bad row or a clash
//! is refused whole with the line named and creates nothing; a good one creates every device,
//! whose returned secrets work over UDP; an export with secrets re-imported into another
//! instance exports the same, also after kill -9; the CLI does both. Listing filters by what
//! devices did over UDP.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ota::{FAST, package_bytes, start_task, upload, wait_task};
use common::pcp::{Behaviour, PcpDevice};
use common::*;
use nbhub::client::ClientError;
use nbhub::coap::message::Code;
use serde_json::{Value, json};

const N: usize = 3_000;

fn refused(r: Result<String, ClientError>) -> String {
    match r {
        Err(ClientError::Api { status: 400, message, .. }) => message,
        other => panic!("expected a 400, got {other:?}"),
    }
}

fn device_count(server: &Server, pk: &str) -> usize {
    let mut n = 0;
    let mut after = String::new();
    loop {
        let page = server.admin().get(&format!("/api/v1/products/{pk}/devices?limit=1000&after={after}")).unwrap();
        n += page["devices"].as_array().unwrap().len();
        match page["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => return n,
        }
    }
}

/// `N` meters; every third has a node id, every fifth a secret and a PSK, all a cell.
fn meters(row: impl Fn(usize) -> Option<String>) -> String {
    let mut csv = String::from("device_name,device_secret,node_id,psk_hex,cell_id\n");
    for i in 0..N {
        if let Some(line) = row(i) {
            csv.push_str(&line);
            continue;
        }
        let node = if i % 3 == 0 { format!("86400000{i:07}") } else { String::new() };
        let (secret, psk) = if i % 5 == 0 { (format!("secret-{i}"), format!("{i:04x}")) } else { Default::default() };
        csv.push_str(&format!("m{i:04},{secret},{node},{psk},cell-{}\n", i % 7));
    }
    csv
}

#[test]
fn an_import_is_taken_or_refused_whole_and_an_export_round_trips() {
    let mut server = Server::start();
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "meters"})).unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"device_name": "m0042"})).unwrap();
    let imports = format!("/api/v1/products/{pk}/imports?format=csv");

    // One bad row: refused whole, its line named (the header is line 1).
    let bad = meters(|i| (i == 1500).then(|| "m1500,,bad node!,,\n".to_string()));
    let message = refused(admin.post_file(&imports, bad.as_bytes()));
    assert!(message.starts_with("1 row is refused; nothing was created: line 1502: node_id"), "{message}");
    // A row that clashes with a device already here: the same.
    let message = refused(admin.post_file(&imports, meters(|_| None).as_bytes()));
    assert!(message.contains("line 44: device m0042 already exists"), "{message}");
    assert_eq!(device_count(&server, &pk), 1, "nothing was created");

    admin.delete(&format!("/api/v1/products/{pk}/devices/m0042")).unwrap();
    let started = std::time::Instant::now();
    let secrets = admin.post_file(&imports, meters(|_| None).as_bytes()).unwrap();
    eprintln!("imported {N} devices in {:?}", started.elapsed());
    let mut lines = secrets.lines();
    assert_eq!(lines.next(), Some("device_name,device_secret,node_id"));
    let created: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(created.len(), N);
    assert_eq!(created[5], ["m0005", "secret-5", ""], "a given secret is kept");
    assert_eq!(created[3][2], "864000000000003");
    assert_eq!(created[1][1].len(), 32, "a generated secret is returned once: {:?}", created[1]);
    assert_eq!(device_count(&server, &pk), N);

    // The devices work over UDP with what the import returned.
    let mut dev = AliDevice::new(server.endpoints.aes, &pk, "m0001", created[1][1]);
    assert_eq!(dev.auth().code, Code::CONTENT);
    assert_eq!(dev.send_uplink(b"imported").code, Code::CHANGED);
    HuaweiDevice::new(server.endpoints.coap, "864000000000003").bind();
    let shown = admin.get(&format!("/api/v1/products/{pk}/devices/m0006")).unwrap();
    assert_eq!(shown["radio"]["cell_id"], "cell-6");

    // An export without secrets leaves them out; with them, it re-imports elsewhere as it was.
    let public = server.cli(&["device", "export", &pk]);
    assert!(public.starts_with("device_name,node_id,cell_id\n") && !public.contains("secret-5"), "{}", &public[..80]);
    let full = server.cli(&["device", "export", &pk, "--secrets"]);
    assert_eq!(full.lines().count(), N + 1);
    assert!(full.contains("\nm0005,secret-5,,0005,cell-5\n"), "{}", &full[..200]);
    let file = server.data_dir().join("export.csv");
    std::fs::write(&file, &full).unwrap();

    let mut other = Server::start();
    other.admin().post("/api/v1/products", &json!({"name": "meters", "product_key": pk})).unwrap();
    let answer = other.cli(&["device", "import", &pk, file.to_str().unwrap()]);
    assert_eq!(answer.lines().count(), N + 1, "the created devices, as CSV");
    assert_eq!(other.cli(&["device", "export", &pk, "--secrets"]), full, "the same devices");
    other.kill9();
    other.restart();
    assert_eq!(other.cli(&["device", "export", &pk, "--secrets", "--ndjson"]).lines().count(), N);
    assert_eq!(other.cli(&["device", "export", &pk, "--secrets"]), full, "durable once answered");

    // NDJSON in, and what cannot be a file at all.
    let nd = "{\"device_name\":\"n1\",\"cell_id\":\"c\"}\n{\"device_name\":\"n2\",\"node_id\":\"865000000000001\"}\n";
    let answer: Value = other.admin().post_bytes(&format!("/api/v1/products/{pk}/imports"), nd.as_bytes()).unwrap();
    assert_eq!(answer["created"], 2);
    assert_eq!(answer["devices"][1]["node_id"], "865000000000001");
    let message = refused(other.admin().post_file(&format!("/api/v1/products/{pk}/imports"), b"{\"name\": 1}\n"));
    assert!(message.contains("line 1: unknown field `name`"), "{message}");
    let missing = other.admin().post_file("/api/v1/products/nope/imports", nd.as_bytes());
    assert!(matches!(missing, Err(ClientError::Api { status: 404, .. })), "{missing:?}");
    server.kill9();
}

/// Every device of a listing, page by page, with how many pages it took.
fn listed(server: &Server, pk: &str, query: &str, limit: usize) -> (BTreeSet<String>, usize) {
    let (mut names, mut pages, mut after) = (BTreeSet::new(), 0, String::new());
    loop {
        let path = format!("/api/v1/products/{pk}/devices?{query}&limit={limit}&after={after}");
        let page = server.admin().get(&path).unwrap();
        pages += 1;
        for d in page["devices"].as_array().unwrap() {
            assert!(names.insert(d["device_name"].as_str().unwrap().to_string()), "listed twice: {d}");
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => return (names, pages),
        }
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn devices_are_listed_by_status_last_contact_version_and_cell() {
    let server = Server::start_with(&FAST);
    let admin = server.admin();
    let pk = admin.post("/api/v1/products", &json!({"name": "meters"})).unwrap()["product_key"]
        .as_str()
        .unwrap()
        .to_string();
    let node = |i: usize| format!("86410000{i:07}");
    let mut csv = String::from("device_name,node_id,cell_id\n");
    for i in 0..1200 {
        csv.push_str(&format!("d{i:04},{},{}\n", node(i), if i % 3 == 0 { "cA" } else { "" }));
    }
    admin.post_file(&format!("/api/v1/products/{pk}/imports"), csv.as_bytes()).unwrap();

    // d0005 reports first; d0010 moves to cell cB after `between`; d0600 is upgraded to what it runs.
    let mut early = HuaweiDevice::new(server.endpoints.coap, &node(5));
    early.bind();
    early.report(br#"{"cell_id": "cB"}"#);
    let device = |dn: &str| admin.get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    eventually(|| device("d0005"), |d| d["radio"]["cell_id"] == "cB", |d| format!("no cell reported: {d}"));
    std::thread::sleep(Duration::from_millis(5));
    let between = nbhub::clock::UnixMs::now().rfc3339();
    std::thread::sleep(Duration::from_millis(5));
    let mut late = HuaweiDevice::new(server.endpoints.coap, &node(10));
    late.bind();
    late.report(br#"{"cell_id": "cB", "rsrp": -101}"#);
    eventually(|| device("d0010"), |d| d["radio"]["cell_id"] == "cB", |d| format!("no cell reported: {d}"));
    let data = Arc::new(package_bytes(100));
    let package = upload(&server, &pk, "V2.0", &data, 100, "V1.0");
    let addr = Arc::new(Mutex::new(server.endpoints.coap));
    let mut upgraded = PcpDevice::new(addr, &node(600), Behaviour::healthy("V2.0"), data);
    upgraded.dev.bind();
    let task = start_task(&server, &package, &pk, &["d0600"], None);
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let stop = stop.clone();
        std::thread::spawn(move || upgraded.run(&stop, Duration::from_secs(60)))
    };
    wait_task(&server, &task, "finished");
    stop.store(true, Ordering::SeqCst);
    running.join().unwrap();

    let online = set(&["d0005", "d0010", "d0600"]);
    assert_eq!(listed(&server, &pk, "status=online", 2), (online.clone(), 2), "two pages of two at most");
    assert_eq!(listed(&server, &pk, "status=abnormal,online", 100).0, online);
    let (inactive, pages) = listed(&server, &pk, "status=inactive", 1000);
    assert_eq!((inactive.len(), pages), (1197, 2));
    assert!(inactive.is_disjoint(&online));
    assert_eq!(listed(&server, &pk, &format!("seen_after={between}"), 100).0, set(&["d0010", "d0600"]));
    assert_eq!(listed(&server, &pk, &format!("seen_before={between}"), 100).0, set(&["d0005"]));
    assert_eq!(listed(&server, &pk, "cell_id=cB", 100).0, set(&["d0005", "d0010"]));
    assert_eq!(listed(&server, &pk, "cell_id=cA", 1000).0.len(), 400, "every third was imported in cA");
    assert_eq!(listed(&server, &pk, "version=V2.0", 100).0, set(&["d0600"]));
    assert_eq!(listed(&server, &pk, "status=online&cell_id=cA", 100).0, set(&["d0600"]));
    assert_eq!(listed(&server, &pk, "version=V9", 100), (BTreeSet::new(), 1));
    let (all, pages) = listed(&server, &pk, "", 500);
    assert_eq!((all.len(), pages), (1200, 3));

    let cli: Value =
        serde_json::from_str(&server.cli(&["device", "list", &pk, "--status", "online", "--cell-id", "cB"])).unwrap();
    let names: Vec<&str> =
        cli["devices"].as_array().unwrap().iter().map(|d| d["device_name"].as_str().unwrap()).collect();
    assert_eq!((names, &cli["next"]), (vec!["d0005", "d0010"], &Value::Null));

    for (query, named) in [
        ("status=sleeping", "status \"sleeping\" is not one of"),
        ("seen_after=yesterday", "seen_after must be an RFC 3339 time"),
        ("seen_before=2026-02-30T00:00:00Z", "seen_before must be an RFC 3339 time"),
        ("limit=0", "limit must be within 1..=1000"),
        ("colour=red", "unknown field `colour`"),
    ] {
        let r = admin.get(&format!("/api/v1/products/{pk}/devices?{query}"));
        match r {
            Err(ClientError::Api { status: 400, message, .. }) => {
                assert!(message.contains(named), "{query}: {message}")
            }
            other => panic!("{query}: expected a 400, got {other:?}"),
        }
    }
}

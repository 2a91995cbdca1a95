//! What survives a crash: every acknowledged uplink, tokens and anti-replay windows. Plus the
//! process contract: invalid config fails loudly, SIGTERM stops cleanly.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{AliDevice, Server};
use nbhub::coap::message::{Code, MessageType};
use serde_json::json;

#[test]
fn kill9_while_sending_loses_nothing_acknowledged() {
    let mut server = Server::start();
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "crash"})).unwrap();
    let pk = p["product_key"].as_str().unwrap().to_string();
    let mut devices = Vec::new();
    for _ in 0..4 {
        let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({})).unwrap();
        let mut dev = AliDevice::new(
            server.endpoints.aes,
            &pk,
            d["device_name"].as_str().unwrap(),
            d["device_secret"].as_str().unwrap(),
        );
        assert_eq!(dev.auth().code, Code::CONTENT);
        devices.push(dev);
    }
    // (device name, payload) of every uplink answered 2.04
    type Acked = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = devices
        .into_iter()
        .enumerate()
        .map(|(i, mut d)| {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let payload = format!("dev{i}-msg{n}").into_bytes();
                    let topic = d.default_topic();
                    let req = d.uplink_request(MessageType::Con, &topic, &payload);
                    d.peer.send(&req);
                    if let Some(r) = d.peer.recv_within(Duration::from_millis(300)) {
                        let r = common::Reply::parse(&r);
                        if r.code == Code::CHANGED {
                            acked.lock().unwrap().push((d.dn.clone(), payload));
                        }
                    }
                    n += 1;
                    // stay under the 5/s flow-control limit
                    std::thread::sleep(Duration::from_millis(210));
                }
                d
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut devices: Vec<AliDevice> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 20, "only {} uplinks were acknowledged before the kill", acked.len());

    server.restart();
    let mut stored = HashSet::new();
    for d in &devices {
        for (_, payload) in server.stored(&pk, &d.dn) {
            stored.insert((d.dn.clone(), payload));
        }
    }
    for a in &acked {
        assert!(stored.contains(a), "acknowledged uplink {a:?} is missing after kill -9");
    }
    // tokens and keys still work without a new /auth, and old seqs are still refused
    for d in &mut devices {
        d.peer.server = server.endpoints.aes;
        let fresh = d.send_uplink(b"after restart");
        assert_eq!(fresh.code, Code::CHANGED, "token lost across restart");
        let topic = d.default_topic();
        let replay = d.uplink_with_seq(MessageType::Con, &topic, b"replayed", Some(2));
        assert_eq!(d.peer.exchange(&replay).code, Code::BAD_REQUEST, "replay window lost across restart");
    }
}

#[test]
fn device_state_survives_restart() {
    let mut server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "state"}));
    let mut d = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    let before = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(before["status"], "inactive");
    assert!(before["last_seen"].is_null());
    d.auth();
    assert_eq!(d.send_uplink(b"hello").code, Code::CHANGED);
    let after = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(after["status"], "online");
    assert_eq!(after["address"], json!(d.peer.socket.local_addr().unwrap().to_string()));
    server.restart();
    let restarted = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}")).unwrap();
    assert_eq!(restarted["status"], "online");
    assert_eq!(restarted["address"], after["address"]);
    // The stored last contact may trail by up to a minute (it is written at most once a minute).
    let seen = |v: &serde_json::Value| v["last_seen"].as_str().unwrap().to_string();
    assert!(seen(&restarted) <= seen(&after), "{restarted} vs {after}");
}

#[test]
fn sigterm_stops_cleanly_and_keeps_data() {
    let mut server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "term"}));
    let mut d = AliDevice::new(server.endpoints.aes, &pk, &dn, &secret);
    d.auth();
    assert_eq!(d.send_uplink(b"before stop").code, Code::CHANGED);
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(server.log().contains("stopped"));
    server.restart();
    assert_eq!(server.stored(&pk, &dn).len(), 1);
}

#[test]
fn invalid_config_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbhub"));
        cmd.arg("serve").args(args).env("NBHUB_DATA_DIR", dir.path().join("data"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&[("NBHUB_COAP_MAX_PAYLOAD", "huge")], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NBHUB_COAP_MAX_PAYLOAD"), "{out:?}");
    let out = run(&[("NBHUB_ADMIN_LISTEN", "not-an-address")], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"), "{out:?}");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[store]\nsync = \"sometimes\"\n").unwrap();
    let out = run(&[], &["--config", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sync"), "{out:?}");
    let out = run(&[], &["--config", "/nonexistent/nbhub.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/nbhub.toml"), "{out:?}");
    let out = run(&[("NBHUB_DTLS_CIPHERS", "PSK-AES128-CCM8:ECDHE-ECDSA-CHACHA20-POLY1305")], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dtls.ciphers") && err.contains("ECDHE-ECDSA-CHACHA20-POLY1305"), "{out:?}");
    let out =
        run(&[("NBHUB_DTLS_CERT", "/nonexistent/server.crt"), ("NBHUB_DTLS_KEY", "/nonexistent/server.key")], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dtls.cert /nonexistent/server.crt"), "{out:?}");
    let out = run(&[("NBHUB_DTLS_KEY", "")], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dtls.cert and dtls.key"), "{out:?}");
}

#[test]
fn generated_admin_token_is_private_and_used_by_the_cli() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbhub"))
        .arg("serve")
        .env_remove("NBHUB_ADMIN_TOKEN")
        .env("NBHUB_DATA_DIR", &data)
        .env("NBHUB_ADMIN_LISTEN", "127.0.0.1:0")
        .env("NBHUB_COAP_LISTEN", "127.0.0.1:0")
        .env("NBHUB_AES_LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let endpoints = loop {
        if let Ok(t) = std::fs::read_to_string(data.join(nbhub::ENDPOINTS_FILE)) {
            break serde_json::from_str::<nbhub::Endpoints>(&t).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let token_file = data.join(nbhub::ADMIN_TOKEN_FILE);
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nbhub"))
            .args(args)
            .env_remove("NBHUB_ADMIN_TOKEN")
            .env("NBHUB_DATA_DIR", &data)
            .env("NBHUB_ADMIN_URL", format!("http://{}", endpoints.admin))
            .output()
            .unwrap()
    };
    let out = cli(&["product", "create", "--name", "cli", "--product-key", "cliProduct1"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(&["device", "create", "cliProduct1", "--device-name", "dev1"]);
    assert!(out.status.success(), "{out:?}");
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["device_secret"].as_str().unwrap().len(), 32);
    let out = cli(&["device", "show", "cliProduct1", "dev1"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["status"], "inactive");
    let out = cli(&["messages", "cliProduct1", "dev1"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["messages"], json!([]));
    let out = cli(&["device", "show", "cliProduct1", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"), "{out:?}");
    let out = cli(&["command", "send", "cliProduct1", "dev1", "--text", "reboot", "--expire", "600"]);
    assert!(out.status.success(), "{out:?}");
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&sent["status"], &sent["payload_base64"]), (&json!("PENDING"), &json!("cmVib290")));
    let id = sent["command_id"].as_str().unwrap();
    let out = cli(&["command", "show", id]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["command_id"], id);
    let out = cli(&["command", "send", "cliProduct1", "dev1", "--hex", "0a0b", "--immediately"]);
    let now: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&now["status"], &now["payload_base64"]), (&json!("FAILED"), &json!("Cgs=")), "never heard from");
    let out = cli(&["command", "cancel", id]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["status"], "CANCELED");
    let out = cli(&["command", "list", "cliProduct1", "dev1"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["commands"].as_array().unwrap().len(),
        2
    );
    let out = cli(&["command", "send", "cliProduct1", "dev1", "--hex", "zz"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--hex"), "{out:?}");

    let firmware = data.join("..").join("fw.bin");
    std::fs::write(&firmware, vec![7u8; 1200]).unwrap();
    let fw = firmware.to_str().unwrap();
    let out =
        cli(&["ota", "upload", "cliProduct1", fw, "--version", "V2", "--chunk-size", "400", "--source-version", "V1"]);
    assert!(out.status.success(), "{out:?}");
    let package: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((package["chunk_count"].as_u64(), &package["source_versions"]), (Some(3), &json!(["V1"])));
    let out = cli(&["ota", "start", package["package_id"].as_str().unwrap(), "cliProduct1", "dev1", "--retries", "2"]);
    assert!(out.status.success(), "{out:?}");
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&task["status"], &task["retry"]["count"]), (&json!("running"), &json!(2)));
    let out = cli(&["ota", "show", task["task_id"].as_str().unwrap()]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["devices"][0]["state"], "waiting_online");
    let out = cli(&["ota", "stop", task["task_id"].as_str().unwrap()]);
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&stopped["status"], &stopped["counts"]["canceled"]), (&json!("stopped"), &json!(1)));
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.contains(&token), "the admin token was logged");
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(data) = std::fs::read(&path) {
            out.push((path, data));
        }
    }
    out
}

#[test]
fn secrets_are_sealed_at_rest_under_the_configured_key() {
    const KEY: &str = "6e6268756220736563726574732061742072657374206b657920333220627974";
    let mut server = Server::start_with(&[("NBHUB_STORE_SECRETS_KEY", KEY)]);
    let admin = server.admin();
    let product = admin.post("/api/v1/products", &json!({"name": "sealed"})).unwrap();
    let pk = product["product_key"].as_str().unwrap().to_string();
    let product_secret = product["product_secret"].as_str().unwrap().to_string();
    let (secret, psk) = ("DeviceSecretThatMustNotBeOnDisk1", "a1b2c3d4e5f60718293a4b5c6d7e8f90");
    let body = json!({"device_name": "meter", "device_secret": secret, "psk_hex": psk});
    admin.post(&format!("/api/v1/products/{pk}/devices"), &body).unwrap();
    let mut dev = AliDevice::new(server.endpoints.coap, &pk, "meter", secret);
    assert_eq!(dev.auth().code, Code::CONTENT);

    server.kill9();
    let data = server.data_dir();
    for (path, bytes) in files_under(&data) {
        for s in [secret, psk, product_secret.as_str()] {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "{} holds a secret in the clear",
                path.display()
            );
        }
    }
    // The key opens them again: the device authenticates after the restart.
    server.restart();
    let mut dev = AliDevice::new(server.endpoints.coap, &pk, "meter", secret);
    assert_eq!(dev.auth().code, Code::CONTENT);
    let shown = server.admin().get(&format!("/api/v1/products/{pk}")).unwrap();
    assert_eq!(shown["product_secret"], product_secret.as_str());
    let log = server.log();
    for s in [secret, psk, product_secret.as_str(), KEY] {
        assert!(!log.contains(s), "a secret was logged");
    }
    server.kill9();

    // Without the key the store cannot be read: the server says which setting is missing.
    let out = Command::new(env!("CARGO_BIN_EXE_nbhub"))
        .arg("serve")
        .current_dir(server.dir.path())
        .env_clear()
        .env("NBHUB_DATA_DIR", &data)
        .env("NBHUB_ADMIN_LISTEN", "127.0.0.1:0")
        .env("NBHUB_COAP_LISTEN", "127.0.0.1:0")
        .env("NBHUB_AES_LISTEN", "127.0.0.1:0")
        .env("NBHUB_DTLS_LISTEN", "127.0.0.1:0")
        .env("NBHUB_ADMIN_TOKEN", "t")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("store.secrets_key"), "{stderr}");
}

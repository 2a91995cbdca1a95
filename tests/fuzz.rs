//! The UDP fuzz suite, bounded: `nbhub-fuzz` against the real server with a fixed seed. It checks
//! its own promises (legitimate devices served and their acknowledged uplinks stored, nothing
//! stored for a device nobody authenticated as, no amplification, bounded memory); here the
//! server must also still be the same process, alive, and must have logged no panic.

mod common;

use std::process::Command;

use common::*;

/// A fixed seed, so a failure here replays with `nbhub-fuzz --seed`.
const SEED: &str = "20261123";

#[test]
fn thirty_thousand_fuzz_datagrams_change_nothing_they_should_not() {
    let server = Server::start();
    let e = &server.endpoints;
    let out = Command::new(env!("CARGO_BIN_EXE_nbhub-fuzz"))
        .args([
            "--admin-url",
            &server.admin_url(),
            "--token",
            TOKEN,
            "--seed",
            SEED,
            "--datagrams",
            "30000",
            "--legit-every-ms",
            "20",
        ])
        .args(["--coap", &e.coap.to_string(), "--aes", &e.aes.to_string(), "--dtls", &e.dtls.to_string()])
        .output()
        .expect("run nbhub-fuzz");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["failures"], serde_json::json!([]));
    assert_eq!(report["datagrams"], 30000);
    for port in ["coap", "aes", "dtls"] {
        assert!(report["datagrams_per_port"][port].as_u64() > Some(5000), "{report:#}");
    }
    assert!(report["worst_amplification_per_source"].as_f64() <= Some(1.0));
    let acknowledged = report["legit"]["plain"]["acknowledged"].as_u64().unwrap();
    assert!(acknowledged >= 5, "legitimate traffic was interleaved: {report:#}");
    // Still the process the test started, still serving.
    assert!(server.metric("nbhub_process_resident_bytes") > 0.0);
    assert!(!server.log().contains("panicked"), "a panic was logged");
}

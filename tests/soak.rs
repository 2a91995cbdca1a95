//! The crash soak's short version: `nbhub-soak` for a few kill -9 cycles, which must verify.

use std::process::Command;

#[test]
fn a_few_soak_cycles_lose_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_nbhub-soak"))
        .args(["--cycles", "3", "--max-run-ms", "1500", "--aes-devices", "2", "--huawei-devices", "2"])
        .args(["--ota-devices", "2", "--package-kib", "16"])
        .output()
        .expect("run nbhub-soak");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("verified: nothing acknowledged lost"), "{text}");
    assert!(text.contains("every upgrade finished with the package's image"), "{text}");
    assert!(!text.contains(" 0 campaigns"), "no campaign ran: {text}");
    // Each kind of load made progress across the crashes.
    for kind in ["\"aes\"", "\"dtls\"", "\"huawei\""] {
        assert!(text.contains(kind), "no {kind} uplink acknowledged: {text}");
    }
}

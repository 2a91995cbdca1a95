//! Upgrade tasks over the admin API: packages, tasks and their progress.

use serde_json::{Value, json};

use super::Server;
pub use super::eventually;

/// Fast ticks and re-asking, so tests run in seconds.
pub const FAST: [(&str, &str); 2] = [("NBHUB_OTA_TICK_MS", "100"), ("NBHUB_OTA_RESEND_S", "1")];

pub fn package_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 256) as u8).collect()
}

pub fn upload(server: &Server, pk: &str, version: &str, data: &[u8], chunk_size: u16, sources: &str) -> String {
    let query = format!(
        "/api/v1/packages?product_key={pk}&version={version}&type=firmware&chunk_size={chunk_size}&source_versions={sources}"
    );
    let p = server.admin().post_bytes(&query, data).expect("upload");
    p["package_id"].as_str().unwrap().to_string()
}

pub fn start_task(server: &Server, package: &str, pk: &str, names: &[&str], retry: Option<Value>) -> String {
    let devices: Vec<Value> = names.iter().map(|dn| json!({"product_key": pk, "device_name": dn})).collect();
    let mut body = json!({"package_id": package, "devices": devices});
    if let Some(r) = retry {
        body["retry"] = r;
    }
    let t = server.admin().post("/api/v1/ota/tasks", &body).expect("create task");
    assert_eq!(t["status"], "running", "{t}");
    t["task_id"].as_str().unwrap().to_string()
}

pub fn task(server: &Server, id: &str) -> Value {
    server.admin().get(&format!("/api/v1/ota/tasks/{id}")).unwrap()
}

pub fn wait_task(server: &Server, id: &str, status: &str) -> Value {
    eventually(|| task(server, id), |t| t["status"] == status, |t| format!("task never became {status}: {t}"))
}

pub fn device_entry<'a>(t: &'a Value, dn: &str) -> &'a Value {
    t["devices"].as_array().unwrap().iter().find(|d| d["device_name"] == dn).expect("device in task")
}

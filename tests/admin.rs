//! The admin HTTP contract of API.md over real HTTP: auth, products, devices, messages, errors.

mod common;

use common::{AliDevice, Server, TOKEN, api_error};
use serde_json::{Value, json};

fn raw(server: &Server, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("{}{path}", server.admin_url());
    let mut resp = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(&url);
            if let Some(t) = token {
                r = r.header("Authorization", &format!("Bearer {t}"));
            }
            r.call().unwrap()
        }
        (m, body) => {
            let mut r = if m == "POST" { agent.post(&url) } else { agent.put(&url) };
            if let Some(t) = token {
                r = r.header("Authorization", &format!("Bearer {t}"));
            }
            r.header("Content-Type", "application/json").send(body.unwrap_or("")).unwrap()
        }
    };
    let code = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[test]
fn bearer_token_is_required_except_for_health_and_metrics() {
    let server = Server::start();
    let (code, body) = raw(&server, "GET", "/api/v1/products", None, None);
    assert_eq!(code, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(raw(&server, "GET", "/api/v1/products", Some("wrong"), None).0, 401);
    assert_eq!(raw(&server, "GET", "/api/v1/products", Some(TOKEN), None).0, 200);
    assert_eq!(raw(&server, "GET", "/api/v1/no-such-thing", None, None).0, 401);
    let (code, body) = raw(&server, "GET", "/healthz", None, None);
    assert_eq!((code, body), (200, json!({"status": "ok", "store": "writable"})));
    let (code, body) = raw(&server, "GET", "/metrics", None, None);
    assert_eq!(code, 200);
    assert!(body.as_str().unwrap().contains("nbhub_"), "{body}");
    let (code, doc) = raw(&server, "GET", "/api/v1/openapi.json", Some(TOKEN), None);
    assert_eq!(code, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/api/v1/products",
        "/api/v1/products/{product_key}/devices/{device_name}/messages",
        "/api/v1/products/{product_key}/devices/{device_name}/commands",
        "/api/v1/commands/{command_id}",
        "/api/v1/webhooks",
        "/api/v1/webhooks/{webhook_id}",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from OpenAPI");
    }
}

#[test]
fn products_round_trip_and_conflict() {
    let server = Server::start();
    let admin = server.admin();
    let p = admin
        .post(
            "/api/v1/products",
            &json!({"name": "water meters", "product_key": "a1Water0001", "dynamic_registration": true, "awake_window_s": 30}),
        )
        .unwrap();
    assert_eq!(p["product_key"], "a1Water0001");
    assert_eq!(p["product_secret"].as_str().unwrap().len(), 16);
    assert_eq!(p["ota_protocol"], "pcp");
    assert_eq!(p["awake_window_s"], 30);
    assert_eq!(admin.get("/api/v1/products/a1Water0001").unwrap(), p);
    let generated = admin.post("/api/v1/products", &json!({"name": "gen"})).unwrap();
    assert_eq!(generated["product_key"].as_str().unwrap().len(), 11);
    assert_eq!(generated["awake_window_s"], 20);
    assert_eq!(generated["dynamic_registration"], false);
    let (code, _) = api_error(admin.post("/api/v1/products", &json!({"name": "again", "product_key": "a1Water0001"})));
    assert_eq!(code, 409);
    assert_eq!(api_error(admin.get("/api/v1/products/nope")).0, 404);
    assert_eq!(admin.get("/api/v1/products").unwrap()["products"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_bodies_name_the_field() {
    // A small body limit, so the oversized body below fits in the socket buffers and the client
    // reads the 413 instead of hitting a closed connection mid-send.
    let server = Server::start_with(&[("NBHUB_ADMIN_MAX_BODY_BYTES", "1024")]);
    let admin = server.admin();
    let (code, msg) = api_error(admin.post("/api/v1/products", &json!({})));
    assert_eq!(code, 400);
    assert!(msg.contains("name"), "{msg}");
    let (code, msg) = api_error(admin.post("/api/v1/products", &json!({"name": "x", "colour": "red"})));
    assert_eq!(code, 400);
    assert!(msg.contains("colour"), "{msg}");
    let (code, msg) = api_error(admin.post("/api/v1/products", &json!({"name": "x", "product_key": "bad key!"})));
    assert_eq!(code, 400);
    assert!(msg.contains("product key"), "{msg}");
    let (code, msg) = api_error(admin.post("/api/v1/products", &json!({"name": "x", "ota_protocol": "tftp"})));
    assert_eq!(code, 400);
    assert!(msg.contains("ota_protocol"), "{msg}");
    let (code, msg) = api_error(admin.post("/api/v1/products", &json!({"name": "x", "awake_window_s": 0})));
    assert_eq!(code, 400);
    assert!(msg.contains("awake_window_s"), "{msg}");
    let (code, body) = raw(&server, "POST", "/api/v1/products", Some(TOKEN), Some("{\"name\":"));
    assert_eq!(code, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(2048));
    assert_eq!(raw(&server, "POST", "/api/v1/products", Some(TOKEN), Some(&big)).0, 413);
    assert_eq!(server.metric("nbhub_admin_responses_total{status=\"413\"}"), 1.0, "refusals are counted");
    let (code, body) = raw(&server, "PUT", "/api/v1/products", Some(TOKEN), Some("{}"));
    assert_eq!(code, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let (code, body) = raw(&server, "GET", "/api/v1/nothing", Some(TOKEN), None);
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"], "not_found");
}

#[test]
fn devices_create_show_patch_delete() {
    let server = Server::start();
    let admin = server.admin();
    admin.post("/api/v1/products", &json!({"name": "p", "product_key": "prod1"})).unwrap();
    let d = admin
        .post(
            "/api/v1/products/prod1/devices",
            &json!({"device_name": "meter-1", "node_id": "861234567890123", "psk_hex": "00112233AABBCCDD"}),
        )
        .unwrap();
    assert_eq!(d["device_name"], "meter-1");
    assert_eq!(d["node_id"], "861234567890123");
    assert_eq!(d["device_secret"].as_str().unwrap().len(), 32);
    let fixed = admin
        .post("/api/v1/products/prod1/devices", &json!({"device_name": "meter-2", "device_secret": "s3cr3t"}))
        .unwrap();
    assert_eq!(fixed["device_secret"], "s3cr3t");
    assert!(fixed["node_id"].is_null());
    assert_eq!(api_error(admin.post("/api/v1/products/prod1/devices", &json!({"device_name": "meter-1"}))).0, 409);
    assert_eq!(api_error(admin.post("/api/v1/products/prod1/devices", &json!({"node_id": "861234567890123"}))).0, 409);
    let (code, msg) = api_error(admin.post("/api/v1/products/prod1/devices", &json!({"psk_hex": "xyz"})));
    assert_eq!(code, 400);
    assert!(msg.contains("psk_hex"), "{msg}");
    assert_eq!(api_error(admin.post("/api/v1/products/nope/devices", &json!({}))).0, 404);

    let shown = admin.get("/api/v1/products/prod1/devices/meter-1").unwrap();
    assert_eq!(
        shown,
        json!({"product_key": "prod1", "device_name": "meter-1", "node_id": "861234567890123", "status": "inactive",
               "enabled": true, "last_seen": null, "address": null, "version": null,
               "radio": {"rsrp": null, "sinr": null, "cell_id": null}, "home": {"state": "here"}})
    );
    let patched = admin
        .patch(
            "/api/v1/products/prod1/devices/meter-1",
            &json!({"enabled": false, "radio": {"rsrp": -98.5, "sinr": 12.0, "cell_id": "46000-1234"}}),
        )
        .unwrap();
    assert_eq!(patched["enabled"], false);
    assert_eq!(patched["radio"], json!({"rsrp": -98.5, "sinr": 12.0, "cell_id": "46000-1234"}));
    let (code, msg) = api_error(admin.patch("/api/v1/products/prod1/devices/meter-1", &json!({"radio": {"rsrp": 20}})));
    assert_eq!(code, 400);
    assert!(msg.contains("rsrp"), "{msg}");
    let list = admin.get("/api/v1/products/prod1/devices?limit=1").unwrap();
    assert_eq!(list["devices"].as_array().unwrap().len(), 1);
    assert_eq!(list["next"], "meter-1");
    let rest = admin.get("/api/v1/products/prod1/devices?limit=1&after=meter-1").unwrap();
    assert_eq!(rest["devices"][0]["device_name"], "meter-2");
    assert!(rest["next"].is_null());

    assert_eq!(admin.delete("/api/v1/products/prod1/devices/meter-1").unwrap(), Value::Null);
    assert_eq!(api_error(admin.get("/api/v1/products/prod1/devices/meter-1")).0, 404);
    assert_eq!(api_error(admin.delete("/api/v1/products/prod1/devices/meter-1")).0, 404);
    // the node id is free again
    admin.post("/api/v1/products/prod1/devices", &json!({"node_id": "861234567890123"})).unwrap();
}

#[test]
fn messages_page_with_cursors() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "paging"}));
    let mut d = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    d.auth();
    for i in 0..5 {
        assert_eq!(d.send_uplink(format!("m{i}").as_bytes()).code, nbhub::coap::message::Code::CHANGED);
    }
    let admin = server.admin();
    let base = format!("/api/v1/products/{pk}/devices/{dn}/messages");
    let first = admin.get(&format!("{base}?limit=2")).unwrap();
    let ids: Vec<&str> = first["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(first["next"].as_str(), Some(ids[1]));
    let m = &first["messages"][0];
    assert_eq!(m["topic"], format!("/{pk}/{dn}/update"));
    assert_eq!(m["payload_base64"], "bTA=");
    assert!(m["received_at"].as_str().unwrap().ends_with('Z'));
    let second = admin.get(&format!("{base}?limit=2&after={}", ids[1])).unwrap();
    assert_eq!(second["messages"][0]["payload_base64"], "bTI=");
    let last = admin.get(&format!("{base}?limit=10&after={}", second["next"].as_str().unwrap())).unwrap();
    assert_eq!(last["messages"].as_array().unwrap().len(), 1);
    assert!(last["next"].is_null());
    assert_eq!(api_error(admin.get(&format!("{base}?limit=1001"))).0, 400);
    assert_eq!(api_error(admin.get(&format!("{base}?after=abc"))).0, 400);
    assert_eq!(api_error(admin.get(&format!("/api/v1/products/{pk}/devices/ghost/messages"))).0, 404);
}

#[test]
fn packages_are_stored_in_chunks_and_bad_uploads_are_refused() {
    let server = Server::start();
    let (pk, _, _) = server.product_and_device(json!({"name": "ota"}));
    let data: Vec<u8> = (0..1234u32).map(|i| (i * 7) as u8).collect();
    let upload = |query: &str, body: &[u8]| {
        let url = format!("{}/api/v1/packages?{query}", server.admin_url());
        let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
        let mut r = agent.post(&url).header("Authorization", &format!("Bearer {TOKEN}")).send(body).unwrap();
        let status = r.status().as_u16();
        (status, serde_json::from_str::<serde_json::Value>(&r.body_mut().read_to_string().unwrap()).unwrap())
    };
    let (status, p) =
        upload(&format!("product_key={pk}&version=V1.0&type=firmware&chunk_size=500&source_versions=V0.9,V0.8"), &data);
    assert_eq!(status, 201, "{p}");
    assert_eq!(
        (p["size"].as_u64(), p["chunk_size"].as_u64(), p["chunk_count"].as_u64()),
        (Some(1234), Some(500), Some(3))
    );
    assert_eq!((p["version"].as_str(), p["type"].as_str()), (Some("V1.0"), Some("firmware")));
    assert_eq!(p["source_versions"], json!(["V0.9", "V0.8"]));
    let id = p["package_id"].as_str().unwrap();
    assert_eq!(server.admin().get(&format!("/api/v1/packages/{id}")).unwrap(), p);
    let (_, d) = upload(&format!("product_key={pk}&version=V2&type=software"), &data);
    assert_eq!(d["chunk_size"], 500, "default chunk size");

    for (query, body, status, names) in [
        (format!("product_key={pk}&version=V1.0&type=firmware&chunk_size=31"), &data[..], 400, "chunk_size"),
        (format!("product_key={pk}&version=V1.0&type=firmware&chunk_size=501"), &data[..], 400, "chunk_size"),
        (format!("product_key={pk}&version=this-is-too-long-17&type=firmware"), &data[..], 400, "version"),
        (format!("product_key={pk}&version=V1.0&type=bootloader"), &data[..], 400, "type"),
        (format!("product_key={pk}&version=V1.0&type=firmware&source_versions=V1,"), &data[..], 400, "source_versions"),
        (format!("product_key={pk}&version=V1.0&type=firmware"), &[][..], 400, "body"),
        ("product_key=nope&version=V1.0&type=firmware".to_string(), &data[..], 404, "nope"),
        (format!("product_key={pk}&type=firmware"), &data[..], 400, "version"),
    ] {
        let (got, e) = upload(&query, body);
        assert_eq!(got, status, "{query}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(names), "{query}: {e}");
    }
    assert!(matches!(
        server.admin().get("/api/v1/packages/42"),
        Err(nbhub::client::ClientError::Api { status: 404, .. })
    ));
}

/// schemathesis (PyPI) generates requests from the OpenAPI document, valid and not: the server
/// must never answer 5xx, and every answer must match the document (status, content type, body).
#[test]
fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let server = Server::start();
    let doc = server.admin().get("/api/v1/openapi.json").unwrap();
    let schema = server.dir.path().join("openapi.json");
    std::fs::write(&schema, doc.to_string()).unwrap();
    let home_st = std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".local/bin/st");
    let st = if home_st.exists() { home_st } else { std::path::PathBuf::from("st") };
    let out = std::process::Command::new(&st)
        // Its cache of failures goes in the temporary directory, not the source tree.
        .current_dir(server.dir.path())
        .args(["run", schema.to_str().unwrap(), "--url", &server.admin_url()])
        .args([
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            "-n",
            "15",
            "--seed",
            "20261123",
            "--request-timeout",
            "10",
        ])
        // Whether the document's constraints are as strict as the server is a matter of
        // documentation; errors and conformance are what these runs check.
        .args(["--exclude-checks", "negative_data_rejection,positive_data_acceptance"])
        .output()
        .expect("schemathesis (`st`) is installed: scripts/install-deps installs it");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("passed"), "{text}");
}

#[test]
fn the_clock_moves_only_where_clock_control_is_on_and_only_forward_by_a_bounded_step() {
    let off = Server::start();
    let (code, body) = raw(&off, "POST", "/api/v1/clock/advance", Some(TOKEN), Some(r#"{"milliseconds": 1000}"#));
    assert_eq!(code, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("clock_control"), "{body}");

    let on = Server::start_with(&[("NBHUB_ADMIN_CLOCK_CONTROL", "true")]);
    let advance = |body: &str| raw(&on, "POST", "/api/v1/clock/advance", Some(TOKEN), Some(body));
    assert_eq!(raw(&on, "POST", "/api/v1/clock/advance", None, Some(r#"{"milliseconds": 1}"#)).0, 401);
    for bad in [r#"{"milliseconds": 0}"#, r#"{"milliseconds": 2592000001}"#, r#"{"milliseconds": -5}"#, r#"{}"#, "{"] {
        let (code, body) = advance(bad);
        assert_eq!(code, 400, "{bad}: {body}");
    }
    // Two days ahead: a device heard just now is no longer online (online means heard within 25 h).
    let (pk, dn, secret) = on.product_and_device(json!({"name": "clocked"}));
    let mut dev = AliDevice::new(on.endpoints.coap, &pk, &dn, &secret);
    dev.auth();
    assert_eq!(dev.send_uplink(b"now").code, nbhub::coap::message::Code::CHANGED);
    let seen = on.wait_device(&pk, &dn, |d| d["status"] == "online")["last_seen"].as_str().unwrap().to_string();
    let (code, body) = advance(r#"{"milliseconds": 172800000}"#);
    assert_eq!(code, 200, "{body}");
    let now = body["now"].as_str().unwrap();
    assert!(now[..10] > seen[..10], "{now} is days after {seen}");
    on.wait_device(&pk, &dn, |d| d["status"] != "online");
}

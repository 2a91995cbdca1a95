//! The DTLS suites Alibaba devices already in the field offer (RSA, PSK and RSA-PSK key exchange
//! with AES-CBC), with clients restricted to them: `openssl s_client`, and an OpenSSL client that
//! runs `/auth` and uplinks; libcoap (which sets its own cipher list, so only a server limited with
//! `dtls.ciphers` confines it).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{AliDevice, Server, coap_post, link_sdk_identity};
use nbhub::auth::sign::SignMethod;
use nbhub::coap::message::{Code, Message};
use nbhub::dtls::client::{ClientConfig, DtlsClient};
use serde_json::json;

fn reply(client: &mut DtlsClient, request: &[u8]) -> (Code, Vec<u8>) {
    let r = client.exchange(request, Duration::from_secs(5)).expect("a reply inside the session");
    let m = Message::parse(&r).expect("CoAP");
    (m.code, m.payload.to_vec())
}

#[test]
fn s_client_negotiates_the_rsa_and_psk_cbc_suites() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "legacy-suites"}));
    let ca = common::dev_certs().join("dev-ca-rsa.crt");
    let ca = ca.to_str().unwrap();
    for suite in ["AES256-SHA256", "AES128-SHA", "AES256-SHA", "AES128-SHA256"] {
        let out = server.s_client(&[
            "-cipher",
            suite,
            "-CAfile",
            ca,
            "-verify_return_error",
            "-verify_hostname",
            "localhost",
        ]);
        assert!(out.contains(&format!("Cipher is {suite}")), "{suite}: {out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{suite}: {out}");
        assert!(out.contains("Server public key is 2048 bit"), "{suite}: {out}");
    }
    let (id, key) = link_sdk_identity(SignMethod::HmacSha256, &pk, &dn, &secret);
    let key = hex::encode(key);
    for suite in ["PSK-AES128-CBC-SHA", "PSK-AES256-CBC-SHA", "RSA-PSK-AES128-CBC-SHA", "RSA-PSK-AES256-CBC-SHA"] {
        let out = server.s_client(&["-psk_identity", &id, "-psk", &key, "-cipher", suite]);
        assert!(out.contains(&format!("Cipher is {suite}")), "{suite}: {out}");
    }
    // The client's order decides: iotkit v3 lists RSA before RSA-PSK and PSK (which it offers even
    // without a key), so it must get RSA.
    let iotkit_v3 = "AES256-SHA256:AES256-SHA:AES128-SHA256:AES128-SHA:RSA-PSK-AES256-CBC-SHA:\
        RSA-PSK-AES128-CBC-SHA256:RSA-PSK-AES128-CBC-SHA:PSK-AES256-CBC-SHA:PSK-AES128-CBC-SHA256:PSK-AES128-CBC-SHA";
    let out = server.s_client(&["-cipher", iotkit_v3, "-psk_identity", "unused", "-psk", "00", "-CAfile", ca]);
    assert!(out.contains("Cipher is AES256-SHA256"), "{out}");
}

#[test]
fn an_rsa_only_client_verifies_the_rsa_chain() {
    let server = Server::start();
    let ca = common::dev_certs().join("dev-ca-rsa.crt");
    // What iotkit v3's mbedTLS (no EC support) offers: RSA signatures only, and its first suite.
    let out = server.s_client(&[
        "-sigalgs",
        "RSA+SHA256:RSA+SHA1",
        "-cipher",
        "AES256-SHA256",
        "-CAfile",
        ca.to_str().unwrap(),
        "-verify_return_error",
        "-verify_hostname",
        "localhost",
    ]);
    assert!(out.contains("Cipher is AES256-SHA256"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    // Every certificate of the chain is RSA-signed, so the start-up check finds nothing.
    assert!(!server.log().contains("cannot verify it"), "{}", server.log());
}

#[test]
fn link_sdk_psk_cbc_devices_send_uplinks_without_a_token() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "legacy-psk"}));
    let (id, key) = link_sdk_identity(SignMethod::HmacSha256, &pk, &dn, &secret);
    let topic = ["topic", pk.as_str(), dn.as_str(), "user", "data"];
    let mut mid = 0;
    for (ciphers, encrypt_then_mac) in
        [("PSK-AES128-CBC-SHA", true), ("PSK-AES128-CBC-SHA", false), ("RSA-PSK-AES256-CBC-SHA", false)]
    {
        let config = ClientConfig { psk: Some((&id, &key)), ciphers, encrypt_then_mac };
        let mut device = DtlsClient::new(DtlsClient::bind(server.endpoints.dtls), &config);
        device.handshake(None, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{ciphers}: {e}"));
        mid += 1;
        let payload = format!("{ciphers} etm={encrypt_then_mac}");
        assert_eq!(reply(&mut device, &coap_post(mid, &topic, None, payload.as_bytes())).0, Code::CHANGED, "{payload}");
    }
    let payloads: Vec<String> =
        server.stored(&pk, &dn).into_iter().map(|(_, p)| String::from_utf8(p).unwrap()).collect();
    assert_eq!(
        payloads,
        ["PSK-AES128-CBC-SHA etm=true", "PSK-AES128-CBC-SHA etm=false", "RSA-PSK-AES256-CBC-SHA etm=false"]
    );
    server
        .wait_metric(r#"nbhub_dtls_handshakes_completed_total{port="dtls",suite="PSK-AES128-CBC-SHA"}"#, |v| v == 2.0);
    server.wait_metric(r#"nbhub_dtls_handshakes_completed_total{port="dtls",suite="RSA-PSK-AES256-CBC-SHA"}"#, |v| {
        v == 1.0
    });
}

#[test]
fn rsa_certificate_devices_auth_and_send_inside_the_session() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "legacy-rsa"}));
    let sim = AliDevice::new(server.endpoints.dtls, &pk, &dn, &secret);
    let topic = ["topic", pk.as_str(), dn.as_str(), "update"];
    let mut expected = Vec::new();
    for (i, (ciphers, encrypt_then_mac)) in
        [("AES128-SHA", false), ("AES256-SHA256", true), ("AES256-SHA", false)].into_iter().enumerate()
    {
        let config = ClientConfig { psk: None, ciphers, encrypt_then_mac };
        let mut device = DtlsClient::new(DtlsClient::bind(server.endpoints.dtls), &config);
        device.handshake(None, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{ciphers}: {e}"));
        let body = sim.auth_body(SignMethod::HmacMd5, &[]).to_string();
        let mid = 10 * i as u16;
        let (code, payload) = reply(&mut device, &coap_post(mid + 1, &["auth"], None, body.as_bytes()));
        assert_eq!(code, Code::CONTENT, "{ciphers}");
        let token =
            serde_json::from_slice::<serde_json::Value>(&payload).unwrap()["token"].as_str().unwrap().to_string();
        let payload = format!("{ciphers} etm={encrypt_then_mac}");
        assert_eq!(reply(&mut device, &coap_post(mid + 2, &topic, Some(&token), payload.as_bytes())).0, Code::CHANGED);
        // A certificate session is not an identity by itself.
        assert_eq!(reply(&mut device, &coap_post(mid + 3, &topic, None, b"no token")).0, Code::UNAUTHORIZED);
        expected.push(payload);
    }
    let payloads: Vec<String> =
        server.stored(&pk, &dn).into_iter().map(|(_, p)| String::from_utf8(p).unwrap()).collect();
    assert_eq!(payloads, expected);
}

#[test]
fn libcoap_gets_psk_aes128_cbc_sha_from_a_server_limited_to_it() {
    let server = Server::start_with(&[("NBHUB_DTLS_CIPHERS", "PSK-AES128-CBC-SHA")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "legacy-libcoap"}));
    let (id, key) = link_sdk_identity(SignMethod::HmacSha1, &pk, &dn, &secret);
    let key = String::from_utf8(key).unwrap();
    let uri = format!("coaps://127.0.0.1:{}/topic/{pk}/{dn}/update", server.endpoints.dtls.port());
    let out = Command::new("coap-client-openssl")
        .args(["-B", "5", "-m", "post", "-u", &id, "-k", &key, "-e", "libcoap-cbc", &uri])
        .output()
        .expect("coap-client-openssl (apt-get install libcoap3-bin)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.stored(&pk, &dn), vec![(format!("/{pk}/{dn}/update"), b"libcoap-cbc".to_vec())], "{text}");
    server
        .wait_metric(r#"nbhub_dtls_handshakes_completed_total{port="dtls",suite="PSK-AES128-CBC-SHA"}"#, |v| v == 1.0);
    // Anything else is refused by that server.
    let out = server.s_client(&["-psk_identity", &id, "-psk", &hex::encode(&key), "-cipher", "PSK-AES128-CCM8"]);
    assert!(!out.contains("Cipher is PSK-AES128-CCM8"), "{out}");
}

//! CoAP over DTLS on 5684 with independent clients (libcoap over OpenSSL and GnuTLS, `openssl
//! s_client`) and an OpenSSL client the tests can stop mid-handshake.

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use common::{AliDevice, Server, coap_client, coap_post, link_sdk_identity};
use nbhub::auth::sign::SignMethod;
use nbhub::coap::message::{Code, Message};
use nbhub::dtls::client::DtlsClient;
use serde_json::json;

const PSK_SUITES: &str = "PSK-AES128-CCM8:PSK-AES128-GCM-SHA256";

fn uri(server: &Server, host: &str, path: &str) -> String {
    format!("coaps://{host}:{}/{path}", server.endpoints.dtls.port())
}

/// A device with a raw PSK (ASCII, as libcoap's `-k` takes it) and a node id.
fn psk_device(server: &Server, pk: &str, name: &str, psk: &str, node: &str) {
    server
        .admin()
        .post(
            &format!("/api/v1/products/{pk}/devices"),
            &json!({"device_name": name, "psk_hex": hex::encode(psk), "node_id": node}),
        )
        .expect("create device");
}

fn code_of(reply: Option<Vec<u8>>) -> Code {
    let reply = reply.expect("a CoAP reply inside the session");
    Message::parse(&reply).expect("a CoAP reply").code
}

#[test]
fn every_psk_identity_form_stores_uplinks_as_on_5683() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-psk"}));
    psk_device(&server, &pk, "meter-1", "nodekey123456789", "863921034567890");
    let topic = |d: &str| format!("topic/{pk}/{d}/user/data");

    // node id (IMEI) with the raw PSK, over OpenSSL
    coap_client(
        "openssl",
        &[
            "-m",
            "post",
            "-u",
            "863921034567890",
            "-k",
            "nodekey123456789",
            "-e",
            "imei",
            &uri(&server, "127.0.0.1", &topic("meter-1")),
        ],
    );
    // {pk}&{dn} with the raw PSK, over GnuTLS
    let triple = format!("{pk}&meter-1");
    coap_client(
        "gnutls",
        &[
            "-m",
            "post",
            "-u",
            &triple,
            "-k",
            "nodekey123456789",
            "-e",
            "triple",
            &uri(&server, "127.0.0.1", &topic("meter-1")),
        ],
    );
    // {pk}&{dn} of a device without a PSK: its DeviceSecret
    let triple = format!("{pk}&{dn}");
    coap_client(
        "openssl",
        &["-m", "post", "-u", &triple, "-k", &secret, "-e", "secret", &uri(&server, "127.0.0.1", &topic(&dn))],
    );
    // Link SDK 4.x: derived PSK, sha256 over GnuTLS and md5 over OpenSSL
    for (method, tls) in [(SignMethod::HmacSha256, "gnutls"), (SignMethod::HmacMd5, "openssl")] {
        let (id, key) = link_sdk_identity(method, &pk, &dn, &secret);
        let key = String::from_utf8(key).unwrap();
        coap_client(
            tls,
            &["-m", "post", "-u", &id, "-k", &key, "-e", method.name(), &uri(&server, "127.0.0.1", &topic(&dn))],
        );
    }
    // The session is the device's identity only for its own topics.
    let out = coap_client(
        "openssl",
        &["-m", "post", "-u", &triple, "-k", &secret, "-e", "x", &uri(&server, "127.0.0.1", &topic("meter-1"))],
    );
    assert!(out.contains("4.03"), "{out}");

    let stored = |d: &str| {
        server.stored(&pk, d).into_iter().map(|(t, p)| (t, String::from_utf8(p).unwrap())).collect::<Vec<_>>()
    };
    let t1 = format!("/{pk}/meter-1/user/data");
    assert_eq!(stored("meter-1"), vec![(t1.clone(), "imei".into()), (t1, "triple".into())]);
    let t2 = format!("/{pk}/{dn}/user/data");
    assert_eq!(
        stored(&dn),
        vec![(t2.clone(), "secret".into()), (t2.clone(), "hmacsha256".into()), (t2, "hmacmd5".into())]
    );
    // libcoap over OpenSSL and GnuTLS both get their own first choice (the client's order decides).
    server.wait_metric(r#"nbhub_dtls_handshakes_completed_total{port="dtls",suite="PSK-AES256-GCM-SHA384"}"#, |v| {
        v == 6.0
    });
    server.wait_metric(r#"nbhub_coap_responses_total{port="dtls",code="2.04"}"#, |v| v == 5.0);
}

#[test]
fn wrong_keys_and_unknown_identities_fail_alike_and_are_counted() {
    let server = Server::start_with(&[("NBHUB_DTLS_HANDSHAKE_TIMEOUT_S", "3")]);
    let (pk, dn, _) = server.product_and_device(json!({"name": "dtls-bad"}));
    let uri = uri(&server, "127.0.0.1", &format!("topic/{pk}/{dn}/user/data"));
    let triple = format!("{pk}&{dn}");
    let wrong =
        coap_client("openssl", &["-B", "2", "-m", "post", "-u", &triple, "-k", "not-the-secret", "-e", "x", &uri]);
    let unknown =
        coap_client("openssl", &["-B", "2", "-m", "post", "-u", "nobody&nothing", "-k", "k", "-e", "x", &uri]);
    assert!(!wrong.contains("2.04") && !unknown.contains("2.04"), "{wrong}\n{unknown}");
    server.wait_metric(r#"nbhub_dtls_handshakes_failed_total{port="dtls",reason="bad_key"}"#, |v| v >= 1.0);
    server.wait_metric(r#"nbhub_dtls_handshakes_failed_total{port="dtls",reason="unknown_identity"}"#, |v| v >= 1.0);
    server.wait_metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#, |v| v == 0.0);
    assert!(server.stored(&pk, &dn).is_empty());
}

#[test]
fn certificate_devices_authenticate_inside_the_session() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-cert"}));
    let ca = common::dev_certs().join("dev-ca.crt");
    let ca = ca.to_str().unwrap();
    let sim = AliDevice::new(server.endpoints.dtls, &pk, &dn, &secret);
    let body = sim.auth_body(SignMethod::HmacSha256, &[]).to_string();
    // The host name is checked against the certificate (DNS name localhost).
    let out = coap_client("openssl", &["-m", "post", "-R", ca, "-e", &body, &uri(&server, "localhost", "auth")]);
    let start = out.find('{').unwrap_or_else(|| panic!("no token in {out:?}"));
    let token =
        serde_json::from_str::<serde_json::Value>(out[start..].trim()).unwrap()["token"].as_str().unwrap().to_string();
    let topic = uri(&server, "localhost", &format!("topic/{pk}/{dn}/update"));
    let opt = format!("2088,{token}");
    let out = coap_client("gnutls", &["-m", "post", "-R", ca, "-O", &opt, "-e", "with-token", &topic]);
    assert!(!out.contains("4."), "{out}");
    // Without a token a certificate session is nobody.
    let out = coap_client("openssl", &["-m", "post", "-R", ca, "-e", "anonymous", &topic]);
    assert!(out.contains("4.01"), "{out}");
    // A 5683 token is not valid on 5684.
    let mut plain = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    plain.auth();
    let opt = format!("2088,{}", plain.token.as_deref().unwrap());
    let out = coap_client("openssl", &["-m", "post", "-R", ca, "-O", &opt, "-e", "plain-token", &topic]);
    assert!(out.contains("4.01"), "{out}");
    assert_eq!(server.stored(&pk, &dn), vec![(format!("/{pk}/{dn}/update"), b"with-token".to_vec())]);
}

#[test]
fn openssl_s_client_negotiates_psk_and_certificate_suites() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-suites"}));
    let (id, key) = link_sdk_identity(SignMethod::HmacSha256, &pk, &dn, &secret);
    for suite in ["PSK-AES128-CCM8", "PSK-AES128-GCM-SHA256"] {
        let out = server.s_client(&["-psk_identity", &id, "-psk", &hex::encode(&key), "-cipher", suite]);
        assert!(out.contains(&format!("Cipher is {suite}")), "{out}");
    }
    let ca = common::dev_certs().join("dev-ca.crt");
    let out =
        server.s_client(&["-CAfile", ca.to_str().unwrap(), "-verify_return_error", "-verify_hostname", "localhost"]);
    assert!(out.contains("Cipher is ECDHE-ECDSA-AES256-GCM-SHA384"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
}

fn psk_client(socket: UdpSocket, identity: &str, key: &str) -> DtlsClient {
    DtlsClient::psk(socket, identity, key.as_bytes(), PSK_SUITES)
}

/// A client socket on the loopback address `ip` (all of 127/8 is loopback), connected to the server.
fn socket_from(ip: &str, server: &Server) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.connect(server.endpoints.dtls).unwrap();
    s
}

/// (content type, epoch) of each record in a datagram.
fn record_kinds(mut datagram: &[u8]) -> Vec<(u8, u16)> {
    let mut kinds = Vec::new();
    while datagram.len() >= 13 {
        kinds.push((datagram[0], u16::from_be_bytes([datagram[3], datagram[4]])));
        let len = u16::from_be_bytes([datagram[11], datagram[12]]) as usize;
        datagram = &datagram[(13 + len).min(datagram.len())..];
    }
    kinds
}

const FAILED_BAD_KEY: &str = r#"nbhub_dtls_handshakes_failed_total{port="dtls",reason="bad_key"}"#;
const FAILED_TIMEOUT: &str = r#"nbhub_dtls_handshakes_failed_total{port="dtls",reason="timeout"}"#;

#[test]
fn a_wrong_key_and_an_unknown_identity_get_decrypt_error_at_once() {
    // The longest handshake timeout there is: a failure counted within wait_metric's 20 s did
    // not wait for it.
    let server = Server::start_with(&[("NBHUB_DTLS_HANDSHAKE_TIMEOUT_S", "600")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-alert"}));
    let triple = format!("{pk}&{dn}");

    let mut wrong = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, "not-the-secret");
    let error = wrong.handshake(None, Duration::from_secs(10)).unwrap_err();
    assert!(error.contains("alert decrypt error"), "{error}");
    // The client packed ClientKeyExchange, ChangeCipherSpec and Finished into one datagram.
    assert_eq!(record_kinds(&wrong.last_sent), [(22, 0), (20, 0), (22, 1)]);
    server.wait_metric(FAILED_BAD_KEY, |v| v == 1.0);

    // The same alert at the same point for an identity that names no device.
    let mut unknown = psk_client(DtlsClient::bind(server.endpoints.dtls), "nobody&nothing", "not-the-secret");
    let error = unknown.handshake(None, Duration::from_secs(10)).unwrap_err();
    assert!(error.contains("alert decrypt error"), "{error}");
    assert_eq!(record_kinds(&unknown.last_sent), [(22, 0), (20, 0), (22, 1)]);
    server.wait_metric(r#"nbhub_dtls_handshakes_failed_total{port="dtls",reason="unknown_identity"}"#, |v| v == 1.0);
    server.wait_metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#, |v| v == 0.0);

    // The right key from the same port still gets in.
    let mut device = psk_client(wrong.socket.try_clone().unwrap(), &triple, &secret);
    device.handshake(None, Duration::from_secs(5)).expect("handshake with the right key");
    let reply = device.exchange(&coap_post(1, &["topic", &pk, &dn, "up"], None, b"right key"), Duration::from_secs(5));
    assert_eq!(code_of(reply), Code::CHANGED);
    assert_eq!(server.metric(FAILED_BAD_KEY), 1.0);
    assert_eq!(server.metric(FAILED_TIMEOUT), 0.0);
}

#[test]
fn a_finished_that_overtakes_its_change_cipher_spec_is_not_judged_early() {
    let server = Server::start_with(&[("NBHUB_DTLS_HANDSHAKE_TIMEOUT_S", "600")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-overtake"}));
    let triple = format!("{pk}&{dn}");
    // Finished, then ClientKeyExchange, then ChangeCipherSpec, each in its own datagram: OpenSSL
    // holds the Finished until the ChangeCipherSpec, and the handshake completes.
    let mut device = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    device.overtake = true;
    device.handshake(None, Duration::from_secs(5)).expect("handshake with an overtaking Finished");
    let reply = device.exchange(&coap_post(1, &["topic", &pk, &dn, "up"], None, b"overtaken"), Duration::from_secs(5));
    assert_eq!(code_of(reply), Code::CHANGED);
    // With a wrong key the first, overtaken Finished is not judged on arrival; once OpenSSL holds
    // the ChangeCipherSpec, the client's retransmitted Finished is, and gets the alert.
    let mut wrong = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, "not-the-secret");
    wrong.overtake = true;
    let error = wrong.handshake(None, Duration::from_secs(10)).unwrap_err();
    assert!(error.contains("alert decrypt error"), "{error}");
    server.wait_metric(FAILED_BAD_KEY, |v| v == 1.0);
    assert_eq!(server.metric(FAILED_TIMEOUT), 0.0);
    assert_eq!(server.stored(&pk, &dn), vec![(format!("/{pk}/{dn}/up"), b"overtaken".to_vec())]);
}

#[test]
fn per_source_quotas_keep_a_handshake_flood_from_shutting_out_other_devices() {
    // One socket so the limits below are exact. 25 flooding handshakes would fill all 20 slots.
    let server = Server::start_with(&[
        ("NBHUB_COAP_SOCKETS_PER_PORT", "1"),
        ("NBHUB_DTLS_MAX_HANDSHAKES", "20"),
        ("NBHUB_DTLS_MAX_HANDSHAKES_PER_ADDRESS", "5"),
        ("NBHUB_DTLS_MAX_HANDSHAKES_PER_PREFIX", "8"),
    ]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-quota"}));
    // 15 ports of one address complete the cookie exchange and go silent: 5 are kept.
    let mut flood = Vec::new();
    for _ in 0..15 {
        let mut c = psk_client(socket_from("127.0.0.1", &server), "x&y", "k");
        assert_eq!(c.handshake(Some(2), Duration::from_secs(5)), Err("stopped".into()));
        flood.push(c);
    }
    server.wait_metric(r#"nbhub_dtls_refused_total{port="dtls",limit="per_address"}"#, |v| v == 10.0);
    // 10 more addresses of the same /24: the prefix holds 8 at most.
    for i in 0..10 {
        let mut c = psk_client(socket_from(&format!("127.0.0.{}", 10 + i), &server), "x&y", "k");
        assert_eq!(c.handshake(Some(2), Duration::from_secs(5)), Err("stopped".into()));
        flood.push(c);
    }
    server.wait_metric(r#"nbhub_dtls_refused_total{port="dtls",limit="per_prefix"}"#, |v| v == 7.0);
    assert_eq!(server.metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#), 8.0);
    // A device in another /24 gets in while the flood still holds its slots.
    let mut device = psk_client(socket_from("127.0.1.2", &server), &format!("{pk}&{dn}"), &secret);
    device.handshake(None, Duration::from_secs(5)).expect("handshake beside the flood");
    let reply = device.exchange(&coap_post(1, &["topic", &pk, &dn, "up"], None, b"beside"), Duration::from_secs(5));
    assert_eq!(code_of(reply), Code::CHANGED);
    assert_eq!(server.metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#), 8.0);
    assert_eq!(server.metric(r#"nbhub_dtls_refused_total{port="dtls",limit="handshakes"}"#), 0.0);
    assert_eq!(server.stored(&pk, &dn), vec![(format!("/{pk}/{dn}/up"), b"beside".to_vec())]);
}

#[test]
fn a_chain_rsa_only_clients_cannot_verify_is_named_at_start() {
    // The RSA leaf signed by the EC CA, as scripts/dev-certs once made it.
    let certs = common::dev_certs();
    let dir = tempfile::tempdir().unwrap();
    let (csr, leaf) = (dir.path().join("leaf.csr"), dir.path().join("server-rsa.crt"));
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let openssl = || Command::new("openssl");
    run(openssl()
        .args(["req", "-new", "-subj", "/CN=localhost", "-key"])
        .arg(certs.join("server-rsa.key"))
        .arg("-out")
        .arg(&csr));
    run(openssl()
        .args(["x509", "-req", "-set_serial", "7", "-days", "1", "-sha256", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(certs.join("dev-ca.crt"))
        .arg("-CAkey")
        .arg(certs.join("dev-ca.key"))
        .arg("-out")
        .arg(&leaf));
    let server = Server::start_with(&[("NBHUB_DTLS_RSA_CERT", leaf.to_str().unwrap())]);
    let warning = format!(
        "dtls.rsa_cert {}: the leaf is signed with ecdsa-with-SHA256; RSA-only clients (signature_algorithms RSA) \
         cannot verify it",
        leaf.display()
    );
    assert!(server.log().contains(&warning), "{}", server.log());
    // The server still serves: other clients may verify the chain.
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-chain"}));
    let mut device = psk_client(DtlsClient::bind(server.endpoints.dtls), &format!("{pk}&{dn}"), &secret);
    device.handshake(None, Duration::from_secs(5)).unwrap();
}

#[test]
fn a_silent_peer_delays_nobody_and_its_handshake_expires() {
    let server = Server::start_with(&[("NBHUB_DTLS_HANDSHAKE_TIMEOUT_S", "3")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-silent"}));
    let triple = format!("{pk}&{dn}");
    // ClientHello, HelloVerifyRequest, ClientHello with the cookie, then nothing.
    let mut silent = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    assert_eq!(silent.handshake(Some(2), Duration::from_secs(5)), Err("stopped".into()));
    server.wait_metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#, |v| v == 1.0);
    // Another device connects and is served while the silent handshake is still pending.
    let mut device = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    device.handshake(None, Duration::from_secs(5)).expect("handshake beside a silent peer");
    let reply = device.exchange(&coap_post(1, &["topic", &pk, &dn, "up"], None, b"served"), Duration::from_secs(5));
    assert_eq!(code_of(reply), Code::CHANGED);
    assert_eq!(server.metric(r#"nbhub_dtls_handshakes_failed_total{port="dtls",reason="timeout"}"#), 0.0);
    // The silent handshake is then dropped.
    server.wait_metric(r#"nbhub_dtls_handshakes_failed_total{port="dtls",reason="timeout"}"#, |v| v == 1.0);
    server.wait_metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#, |v| v == 0.0);
    assert_eq!(server.stored(&pk, &dn), vec![(format!("/{pk}/{dn}/up"), b"served".to_vec())]);
}

#[test]
fn a_client_hello_flood_keeps_state_bounded_and_real_clients_served() {
    // One socket so the limit below is exact.
    let server = Server::start_with(&[
        ("NBHUB_COAP_SOCKETS_PER_PORT", "1"),
        ("NBHUB_DTLS_MAX_HANDSHAKES", "20"),
        ("NBHUB_DTLS_HANDSHAKE_TIMEOUT_S", "3"),
    ]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-flood"}));
    let triple = format!("{pk}&{dn}");
    // 500 ports send a first ClientHello each: answered statelessly, nothing kept.
    let mut flood = Vec::new();
    for _ in 0..500 {
        let mut c = psk_client(DtlsClient::bind(server.endpoints.dtls), "x&y", "k");
        assert_eq!(c.handshake(Some(1), Duration::from_secs(5)), Err("stopped".into()));
        flood.push(c);
    }
    server.wait_metric(r#"nbhub_dtls_hello_verify_requests_total{port="dtls"}"#, |v| v >= 500.0);
    assert_eq!(server.metric(r#"nbhub_dtls_handshakes_started_total{port="dtls"}"#), 0.0);
    // 60 ports come back with their cookie and go silent: at most 20 handshakes are kept.
    let mut holders = Vec::new();
    for _ in 0..60 {
        let mut c = psk_client(DtlsClient::bind(server.endpoints.dtls), "x&y", "k");
        assert_eq!(c.handshake(Some(2), Duration::from_secs(5)), Err("stopped".into()));
        holders.push(c);
    }
    server.wait_metric(r#"nbhub_dtls_refused_total{port="dtls",limit="handshakes"}"#, |v| v == 40.0);
    assert_eq!(server.metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#), 20.0);
    // Once they expire, a real device gets in.
    server.wait_metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#, |v| v == 0.0);
    let mut device = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    device.handshake(None, Duration::from_secs(5)).expect("handshake after the flood");
    let reply =
        device.exchange(&coap_post(1, &["topic", &pk, &dn, "up"], None, b"after-flood"), Duration::from_secs(5));
    assert_eq!(code_of(reply), Code::CHANGED);
}

#[test]
fn a_device_reconnects_from_the_same_port_after_closing_and_after_a_reboot() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-reconnect"}));
    let triple = format!("{pk}&{dn}");
    let topic = ["topic", pk.as_str(), dn.as_str(), "up"];
    let socket = DtlsClient::bind(server.endpoints.dtls);

    let mut first = psk_client(socket, &triple, &secret);
    first.handshake(None, Duration::from_secs(5)).unwrap();
    assert_eq!(code_of(first.exchange(&coap_post(1, &topic, None, b"first"), Duration::from_secs(5))), Code::CHANGED);
    let socket = first.close();
    server.wait_metric(r#"nbhub_dtls_closed_by_peer_total{port="dtls"}"#, |v| v == 1.0);

    // Same ip:port, new session after close_notify.
    let mut second = psk_client(socket, &triple, &secret);
    second.handshake(None, Duration::from_secs(5)).unwrap();
    assert_eq!(code_of(second.exchange(&coap_post(2, &topic, None, b"second"), Duration::from_secs(5))), Code::CHANGED);

    // The device reboots without closing and comes back from the same port: the new handshake
    // replaces the old session.
    let socket = second.socket.try_clone().unwrap();
    let mut third = psk_client(socket, &triple, &secret);
    third.handshake(None, Duration::from_secs(5)).unwrap();
    assert_eq!(code_of(third.exchange(&coap_post(3, &topic, None, b"third"), Duration::from_secs(5))), Code::CHANGED);
    server.wait_metric(r#"nbhub_dtls_sessions{port="dtls"}"#, |v| v == 1.0);

    // libcoap from a fixed local port, twice.
    let libcoap_port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let uri = uri(&server, "127.0.0.1", &format!("topic/{pk}/{dn}/up"));
    for payload in ["libcoap-1", "libcoap-2"] {
        coap_client("openssl", &["-p", &libcoap_port, "-m", "post", "-u", &triple, "-k", &secret, "-e", payload, &uri]);
    }
    let payloads: Vec<Vec<u8>> = server.stored(&pk, &dn).into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, [&b"first"[..], b"second", b"third", b"libcoap-1", b"libcoap-2"]);
}

#[test]
fn idle_sessions_are_evicted_and_the_device_handshakes_again() {
    let server = Server::start_with(&[("NBHUB_DTLS_IDLE_TIMEOUT_S", "1")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-idle"}));
    let triple = format!("{pk}&{dn}");
    let topic = ["topic", pk.as_str(), dn.as_str(), "up"];
    let mut device = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    device.handshake(None, Duration::from_secs(5)).unwrap();
    assert_eq!(code_of(device.exchange(&coap_post(1, &topic, None, b"before"), Duration::from_secs(5))), Code::CHANGED);
    server.wait_metric(r#"nbhub_dtls_evictions_total{port="dtls",reason="idle"}"#, |v| v == 1.0);
    server.wait_metric(r#"nbhub_dtls_sessions{port="dtls"}"#, |v| v == 0.0);
    // The old session is gone: its records are not answered.
    assert_eq!(device.exchange(&coap_post(2, &topic, None, b"lost"), Duration::from_millis(500)), None);
    let mut again = psk_client(device.socket.try_clone().unwrap(), &triple, &secret);
    again.handshake(None, Duration::from_secs(5)).unwrap();
    assert_eq!(code_of(again.exchange(&coap_post(3, &topic, None, b"after"), Duration::from_secs(5))), Code::CHANGED);
    let payloads: Vec<Vec<u8>> = server.stored(&pk, &dn).into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, [&b"before"[..], b"after"]);
}

#[test]
fn lost_handshake_flights_are_sent_again() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-loss"}));
    let triple = format!("{pk}&{dn}");
    // The server's datagrams in a PSK handshake: HelloVerifyRequest, then ServerHello with
    // ServerHelloDone, then ChangeCipherSpec with Finished. Losing the second makes OpenSSL
    // retransmit; losing the last one reaches the established session, which answers the client's
    // repeated Finished with its final flight.
    let mut clean = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    clean.handshake(None, Duration::from_secs(5)).unwrap();
    assert_eq!(clean.datagrams_received(), 3, "the server's flights, one datagram each");
    for (lost, payload) in [(2, "after losing ServerHello"), (3, "after losing Finished")] {
        let mut device = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
        device.lose = vec![lost];
        device.handshake(None, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{payload}: {e}"));
        let reply = device.exchange(
            &coap_post(lost as u16, &["topic", &pk, &dn, "up"], None, payload.as_bytes()),
            Duration::from_secs(5),
        );
        assert_eq!(code_of(reply), Code::CHANGED, "{payload}");
    }
    let payloads: Vec<Vec<u8>> = server.stored(&pk, &dn).into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, [&b"after losing ServerHello"[..], b"after losing Finished"]);
}

#[test]
fn garbage_on_the_dtls_port_changes_nothing() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-garbage"}));
    let triple = format!("{pk}&{dn}");
    let mut device = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    device.handshake(None, Duration::from_secs(5)).unwrap();
    let same_port = device.socket.try_clone().unwrap();
    let strangers: Vec<UdpSocket> = (0..8).map(|_| DtlsClient::bind(server.endpoints.dtls)).collect();
    // Records that look like DTLS (every content type, both epochs, lengths that lie) and plain
    // noise, from strangers and from the established session's own address.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..4000 {
        let len = (next() % 200) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 && d.len() >= 14 {
            d[0] = [20, 21, 22, 23][(next() % 4) as usize];
            d[1..3].copy_from_slice(&[0xfe, 0xfd]);
            d[3..5].copy_from_slice(&[0, (next() % 2) as u8]);
            if i % 4 == 0 {
                d[13] = 1; // a ClientHello's handshake type
            }
        }
        let from = if i % 3 == 0 { &same_port } else { &strangers[i % strangers.len()] };
        from.send(&d).unwrap();
    }
    // The session still works, and nothing was stored or kept for the noise.
    let reply = device.exchange(&coap_post(1, &["topic", &pk, &dn, "up"], None, b"still here"), Duration::from_secs(5));
    assert_eq!(code_of(reply), Code::CHANGED);
    assert_eq!(server.stored(&pk, &dn), vec![(format!("/{pk}/{dn}/up"), b"still here".to_vec())]);
    server.wait_metric(r#"nbhub_dtls_sessions{port="dtls"}"#, |v| v == 1.0);
    assert_eq!(server.metric(r#"nbhub_dtls_handshakes_in_progress{port="dtls"}"#), 0.0);
}

#[test]
fn beyond_max_sessions_a_new_device_waits_for_a_free_slot() {
    let server = Server::start_with(&[("NBHUB_COAP_SOCKETS_PER_PORT", "1"), ("NBHUB_DTLS_MAX_SESSIONS", "1")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-full"}));
    let triple = format!("{pk}&{dn}");
    let mut first = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    first.handshake(None, Duration::from_secs(5)).unwrap();
    let mut second = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    assert!(second.handshake(None, Duration::from_secs(2)).is_err(), "the table is full");
    server.wait_metric(r#"nbhub_dtls_refused_total{port="dtls",limit="sessions"}"#, |v| v >= 1.0);
    first.close();
    server.wait_metric(r#"nbhub_dtls_sessions{port="dtls"}"#, |v| v == 0.0);
    let mut again = psk_client(DtlsClient::bind(server.endpoints.dtls), &triple, &secret);
    again.handshake(None, Duration::from_secs(5)).unwrap();
    let reply = again.exchange(&coap_post(1, &["topic", &pk, &dn, "up"], None, b"got a slot"), Duration::from_secs(5));
    assert_eq!(code_of(reply), Code::CHANGED);
}

#[test]
fn without_certificate_files_the_server_serves_psk_only() {
    // The default relative paths, in a working directory that has no certs/.
    let server = Server::start_with(&[
        ("NBHUB_DTLS_CERT", "certs/server.crt"),
        ("NBHUB_DTLS_KEY", "certs/server.key"),
        ("NBHUB_DTLS_RSA_CERT", "certs/server-rsa.crt"),
        ("NBHUB_DTLS_RSA_KEY", "certs/server-rsa.key"),
    ]);
    assert!(server.log().contains("no DTLS server certificate"), "{}", server.log());
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dtls-psk-only"}));
    let out = server.s_client(&["-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:AES128-SHA"]);
    assert!(out.contains("Cipher is (NONE)"), "no certificate suite can be agreed: {out}");
    let mut device = psk_client(DtlsClient::bind(server.endpoints.dtls), &format!("{pk}&{dn}"), &secret);
    device.handshake(None, Duration::from_secs(5)).unwrap();
    let reply = device.exchange(&coap_post(1, &["topic", &pk, &dn, "up"], None, b"psk"), Duration::from_secs(5));
    assert_eq!(code_of(reply), Code::CHANGED);
}

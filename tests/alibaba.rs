//! The Alibaba device path over real UDP against the real server: `/auth` in all its forms,
//! encrypted uplinks on 5682, plain ones on 5683, and every refusal SPEC §3.1/§3.2 names.

mod common;

use std::time::Duration;

use common::{AliDevice, Peer, Reply, Server, TokenIn, coap_post};
use nbhub::auth::sign::SignMethod;
use nbhub::coap::message::{Code, MessageType};
use serde_json::json;

fn aes_device(server: &Server) -> AliDevice {
    let (pk, dn, secret) = server.product_and_device(json!({"name": "meters"}));
    AliDevice::new(server.endpoints.aes, &pk, &dn, &secret)
}

fn assert_code(reply: &Reply, code: Code) {
    assert_eq!(reply.code, code, "expected {code}, got {} ({:?})", reply.code, reply);
}

#[test]
fn auth_variants_all_authenticate() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "p"}));
    let cases: Vec<(SignMethod, Vec<(&str, serde_json::Value)>)> = vec![
        (SignMethod::HmacMd5, vec![]),
        (SignMethod::HmacSha1, vec![("seq", json!("1234")), ("timestamp", json!("1700000000000"))]),
        (SignMethod::HmacSha256, vec![("seq", json!("3FA2"))]),
        // numbers instead of strings: they sign in their string form
        (SignMethod::HmacSha256, vec![("seq", json!(16)), ("timestamp", json!(1700000000000u64))]),
        (SignMethod::HmacMd5, vec![("ackMode", json!(0))]),
    ];
    for port in [server.endpoints.coap, server.endpoints.aes] {
        for (method, extra) in &cases {
            let mut d = AliDevice::new(port, &pk, &dn, &secret);
            let body = d.auth_body(*method, extra);
            let reply = d.auth_with(&body);
            assert_code(&reply, Code::CONTENT);
            let v = reply.json();
            let token = v["token"].as_str().unwrap();
            assert!(!token.is_empty() && token.len() <= 64);
            if port == server.endpoints.aes {
                assert_eq!(v["random"].as_str().unwrap().len(), 16);
                assert_eq!(v["seqOffset"], json!(1));
            } else {
                assert!(v.get("random").is_none());
            }
            assert_code(&d.send_uplink(b"{\"t\":1}"), Code::CHANGED);
        }
    }
    // signmethod omitted means hmacmd5
    let mut d = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    let mut body = d.auth_body(SignMethod::HmacMd5, &[]);
    body.as_object_mut().unwrap().remove("signmethod");
    assert_code(&d.auth_with(&body), Code::CONTENT);
}

#[test]
fn auth_with_cbor_body_and_accept() {
    let server = Server::start();
    let mut d = aes_device(&server);
    let body = d.auth_body(SignMethod::HmacSha1, &[]);
    let mut cbor = Vec::new();
    ciborium::into_writer(&body, &mut cbor).unwrap();
    let req = d.auth_request(&cbor, Some(60), Some(60));
    let reply = d.peer.exchange(&req);
    assert_code(&reply, Code::CONTENT);
    let v: serde_json::Value = ciborium::from_reader(&reply.payload[..]).unwrap();
    assert!(v["token"].is_string());
}

#[test]
fn auth_refusals() {
    let server = Server::start();
    let mut d = aes_device(&server);
    // wrong signature
    let mut body = d.auth_body(SignMethod::HmacSha256, &[]);
    body["sign"] = json!("00".repeat(32));
    assert_code(&d.auth_with(&body), Code::UNAUTHORIZED);
    // signed with another secret
    let mut other = AliDevice::new(server.endpoints.aes, &d.pk, &d.dn, "not-the-secret");
    assert_code(&other.auth(), Code::UNAUTHORIZED);
    // unknown device
    let mut ghost = AliDevice::new(server.endpoints.aes, &d.pk, "ghost", &d.secret);
    assert_code(&ghost.auth(), Code::UNAUTHORIZED);
    // bad JSON, missing field, too long clientId
    let req = d.auth_request(b"{not json", Some(50), None);
    assert_code(&d.peer.exchange(&req), Code::BAD_REQUEST);
    let mut body = d.auth_body(SignMethod::HmacMd5, &[]);
    body.as_object_mut().unwrap().remove("clientId");
    assert_code(&d.auth_with(&body), Code::BAD_REQUEST);
    let body = d.auth_body(SignMethod::HmacMd5, &[("clientId", json!("c".repeat(65)))]);
    assert_code(&d.auth_with(&body), Code::BAD_REQUEST);
    let body = d.auth_body(SignMethod::HmacMd5, &[("signmethod", json!("hmacsha512"))]);
    assert_code(&d.auth_with(&body), Code::BAD_REQUEST);
    // content negotiation
    let body = d.auth_body(SignMethod::HmacMd5, &[]).to_string();
    let req = d.auth_request(body.as_bytes(), Some(50), Some(0));
    assert_code(&d.peer.exchange(&req), Code::NOT_ACCEPTABLE);
    let req = d.auth_request(body.as_bytes(), Some(41), None);
    assert_code(&d.peer.exchange(&req), Code::UNSUPPORTED_CONTENT_FORMAT);
    // wrong method
    let mid = d.peer.next_mid();
    let get = nbhub::coap::message::MessageBuilder::new(MessageType::Con, Code::GET, mid, &[1])
        .option(nbhub::coap::option::OptionNumber::URI_PATH, b"auth")
        .build();
    assert_code(&d.peer.exchange(&get), Code::METHOD_NOT_ALLOWED);
    // disabled device
    server.admin().patch(&format!("/api/v1/products/{}/devices/{}", d.pk, d.dn), &json!({"enabled": false})).unwrap();
    assert_code(&d.auth(), Code::FORBIDDEN);
    // failures carry no payload
    assert!(d.auth().payload.is_empty());
}

#[test]
fn encrypted_uplinks_are_stored_byte_for_byte() {
    let server = Server::start();
    let mut d = aes_device(&server);
    assert_code(&d.auth(), Code::CONTENT);
    let payloads: Vec<Vec<u8>> =
        vec![b"{\"temp\":21.5}".to_vec(), vec![0, 1, 2, 255, 254], vec![7u8; 1024], b"x".to_vec()];
    let mut ids = Vec::new();
    for p in &payloads {
        let reply = d.send_uplink(p);
        assert_code(&reply, Code::CHANGED);
        assert_eq!(reply.mtype, MessageType::Ack);
        let id = String::from_utf8(reply.option(2090).expect("option 2090").to_vec()).unwrap();
        ids.push(id);
    }
    let stored = server.stored(&d.pk, &d.dn);
    let topic = d.default_topic();
    assert_eq!(stored, payloads.iter().map(|p| (topic.clone(), p.clone())).collect::<Vec<_>>());
    let page = server.admin().get(&format!("/api/v1/products/{}/devices/{}/messages", d.pk, d.dn)).unwrap();
    let listed: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    // 1024 plaintext bytes is the limit; 1025 is refused
    let reply = d.send_uplink(&[1u8; 1025]);
    assert_code(&reply, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(server.stored(&d.pk, &d.dn).len(), payloads.len());
}

#[test]
fn replayed_and_tampered_uplinks_change_nothing() {
    let server = Server::start();
    let mut d = aes_device(&server);
    d.auth();
    let topic = d.default_topic();
    let first = d.uplink_with_seq(MessageType::Con, &topic, b"one", Some(5));
    assert_code(&d.peer.exchange(&first), Code::CHANGED);
    // same seq under a new message id: a replay
    let replay = d.uplink_with_seq(MessageType::Con, &topic, b"two", Some(5));
    assert_code(&d.peer.exchange(&replay), Code::BAD_REQUEST);
    // out of order is fine, below the offset is not
    let earlier = d.uplink_with_seq(MessageType::Con, &topic, b"three", Some(3));
    assert_code(&d.peer.exchange(&earlier), Code::CHANGED);
    let zero = d.uplink_with_seq(MessageType::Con, &topic, b"four", Some(0));
    assert_code(&d.peer.exchange(&zero), Code::BAD_REQUEST);
    // far ahead slides the window; far behind it is then refused
    let ahead = d.uplink_with_seq(MessageType::Con, &topic, b"five", Some(5000));
    assert_code(&d.peer.exchange(&ahead), Code::CHANGED);
    let behind = d.uplink_with_seq(MessageType::Con, &topic, b"six", Some(6));
    assert_code(&d.peer.exchange(&behind), Code::BAD_REQUEST);
    // tampered ciphertext: bad padding
    let mut tampered = d.uplink_with_seq(MessageType::Con, &topic, b"seven", Some(6000));
    let last = tampered.len() - 1;
    tampered[last] ^= 0x5a;
    assert_code(&d.peer.exchange(&tampered), Code::BAD_REQUEST);
    // the seq of the tampered message was not consumed
    let retry = d.uplink_with_seq(MessageType::Con, &topic, b"seven", Some(6000));
    assert_code(&d.peer.exchange(&retry), Code::CHANGED);
    // missing seq with a payload
    let no_seq = d.uplink_with_seq(MessageType::Con, &topic, b"eight", None);
    assert_code(&d.peer.exchange(&no_seq), Code::BAD_REQUEST);
    // ...but an empty payload without 2089 is Link SDK behaviour: answered, and since it proves
    // nothing (the token travels in clear), nothing is stored (no message id)
    let empty = d.uplink_with_seq(MessageType::Con, &topic, b"", None);
    let answer = d.peer.exchange(&empty);
    assert_code(&answer, Code::CHANGED);
    assert_eq!(answer.option(2090), None);
    let stored: Vec<Vec<u8>> = server.stored(&d.pk, &d.dn).into_iter().map(|(_, p)| p).collect();
    assert_eq!(stored, vec![b"one".to_vec(), b"three".to_vec(), b"five".to_vec(), b"seven".to_vec()]);
}

#[test]
fn tokens_are_checked() {
    let server = Server::start();
    let mut d = aes_device(&server);
    // no token at all
    assert_code(&d.send_uplink(b"x"), Code::UNAUTHORIZED);
    d.auth();
    let real = d.token.clone();
    d.token = Some("0123456789abcdef0123456789abcdef".into());
    assert_code(&d.send_uplink(b"x"), Code::UNAUTHORIZED);
    d.token = real.clone();
    // a 5682 token is not valid on the plain port
    let mut plain = AliDevice::new(server.endpoints.coap, &d.pk, &d.dn, &d.secret);
    plain.token = real;
    assert_code(&plain.send_uplink(b"x"), Code::UNAUTHORIZED);
    // token in option 61 and in the query work too
    for how in [TokenIn::Option61, TokenIn::Query, TokenIn::Option2088] {
        d.token_in = how;
        assert_code(&d.send_uplink(b"y"), Code::CHANGED);
    }
    assert_eq!(server.stored(&d.pk, &d.dn).len(), 3);
}

#[test]
fn topics_of_other_devices_are_forbidden() {
    let server = Server::start();
    let mut d = aes_device(&server);
    d.auth();
    let other = server.admin().post(&format!("/api/v1/products/{}/devices", d.pk), &json!({})).unwrap();
    let other_dn = other["device_name"].as_str().unwrap();
    for topic in [
        format!("/{}/{}/update", d.pk, other_dn),
        format!("/sys/{}/{}/thing/event/property/post", d.pk, other_dn),
        format!("/{}/{}", d.pk, d.dn),
        "/broadcast/all".to_string(),
    ] {
        let req = d.uplink_request(MessageType::Con, &topic, b"x");
        assert_code(&d.peer.exchange(&req), Code::FORBIDDEN);
    }
    for topic in [
        format!("/sys/{}/{}/thing/deviceinfo/update", d.pk, d.dn),
        format!("/ota/device/inform/{}/{}", d.pk, d.dn),
        format!("/{}/{}/user/data", d.pk, d.dn),
    ] {
        let req = d.uplink_request(MessageType::Con, &topic, b"ok");
        assert_code(&d.peer.exchange(&req), Code::CHANGED);
    }
    assert_eq!(server.stored(&d.pk, &d.dn).len(), 3);
    assert!(server.stored(&d.pk, other_dn).is_empty());
}

#[test]
fn duplicate_con_is_answered_again_and_stored_once() {
    let server = Server::start();
    let mut d = aes_device(&server);
    d.auth();
    let topic = d.default_topic();
    let req = d.uplink_request(MessageType::Con, &topic, b"once");
    let first = d.peer.exchange(&req);
    assert_code(&first, Code::CHANGED);
    for _ in 0..3 {
        let again = d.peer.exchange(&req);
        assert_eq!(again.mid, first.mid);
        assert_eq!(again.option(2090), first.option(2090));
    }
    // a duplicated /auth returns the same token rather than minting another
    let auth = d.auth_request(d.auth_body(SignMethod::HmacMd5, &[]).to_string().as_bytes(), Some(50), Some(50));
    let a1 = d.peer.exchange(&auth);
    let a2 = d.peer.exchange(&auth);
    assert_eq!(a1.json()["token"], a2.json()["token"]);
    assert_eq!(server.stored(&d.pk, &d.dn).len(), 1);
}

#[test]
fn non_uplinks_get_non_responses() {
    let server = Server::start();
    let mut d = aes_device(&server);
    d.auth();
    let topic = format!("/sys/{}/{}/thing/deviceinfo/update", d.pk, d.dn);
    let req = d.uplink_request(MessageType::Non, &topic, b"{\"id\":1}");
    let reply = d.peer.exchange(&req);
    assert_eq!(reply.mtype, MessageType::Non);
    assert_code(&reply, Code::CHANGED);
    assert!(reply.option(2090).is_some());
    assert_eq!(server.stored(&d.pk, &d.dn), vec![(topic, b"{\"id\":1}".to_vec())]);
}

#[test]
fn ack_mode_1_answers_with_an_empty_ack_then_a_separate_response() {
    let server = Server::start_with(&[("NBHUB_COAP_ACK_TIMEOUT_MS", "300")]);
    let mut d = aes_device(&server);
    let body = d.auth_body(SignMethod::HmacSha256, &[("ackMode", json!("1"))]);
    let req = d.auth_request(body.to_string().as_bytes(), Some(50), Some(50));
    let req_mid = u16::from_be_bytes([req[2], req[3]]);
    let req_token = req[4..8].to_vec();
    d.peer.send(&req);
    let ack = d.peer.recv();
    assert_eq!((ack.mtype, ack.code, ack.mid), (MessageType::Ack, Code::EMPTY, req_mid));
    let separate = d.peer.recv();
    assert_eq!(separate.mtype, MessageType::Con);
    assert_code(&separate, Code::CONTENT);
    assert_eq!(separate.token, req_token);
    d.adopt(&separate);
    // acknowledge it; then the uplink goes the same way
    d.peer.send(&nbhub::coap::message::empty(MessageType::Ack, separate.mid));
    let topic = d.default_topic();
    let up = d.uplink_request(MessageType::Con, &topic, b"sep");
    d.peer.send(&up);
    let ack = d.peer.recv();
    assert_eq!((ack.mtype, ack.code), (MessageType::Ack, Code::EMPTY));
    let result = d.peer.recv();
    assert_eq!(result.mtype, MessageType::Con);
    assert_code(&result, Code::CHANGED);
    assert!(result.option(2090).is_some());
    // not acknowledged: the server retransmits the separate response
    let again = Reply::parse(&d.peer.recv_within(Duration::from_secs(5)).expect("retransmission"));
    assert_eq!(again.mid, result.mid);
    d.peer.send(&nbhub::coap::message::empty(MessageType::Ack, result.mid));
    assert_eq!(server.stored(&d.pk, &d.dn).len(), 1);
}

#[test]
fn dynamic_registration_hands_out_the_secret_once() {
    let server = Server::start();
    let admin = server.admin();
    let p = admin.post("/api/v1/products", &json!({"name": "dyn", "dynamic_registration": true})).unwrap();
    let pk = p["product_key"].as_str().unwrap();
    let product_secret = p["product_secret"].as_str().unwrap();
    let dev = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"device_name": "unit-7"})).unwrap();
    let register = |peer: &mut common::Peer, secret: &str, dn: &str| {
        let random = "8fe3c8d50e1012ab";
        let content = nbhub::auth::sign::register_content(pk, dn, random);
        let body = json!({
            "productKey": pk, "deviceName": dn, "random": random, "signmethod": "hmacsha256",
            "sign": SignMethod::HmacSha256.sign_hex(secret.as_bytes(), content.as_bytes()),
        });
        let mid = peer.next_mid();
        let req = nbhub::coap::message::MessageBuilder::new(MessageType::Con, Code::POST, mid, &[9])
            .option(nbhub::coap::option::OptionNumber::URI_PATH, b"auth")
            .option(nbhub::coap::option::OptionNumber::URI_PATH, b"register")
            .option(nbhub::coap::option::OptionNumber::URI_PATH, b"device")
            .uint_option(nbhub::coap::option::OptionNumber::CONTENT_FORMAT, 50)
            .payload(body.to_string().as_bytes())
            .build();
        peer.exchange(&req)
    };
    let mut peer = common::Peer::new(server.endpoints.coap);
    assert_code(&register(&mut peer, "wrong-secret", "unit-7"), Code::UNAUTHORIZED);
    let first = register(&mut peer, product_secret, "unit-7");
    assert_code(&first, Code::CONTENT);
    let secret = first.json()["deviceSecret"].as_str().unwrap().to_string();
    assert_eq!(secret, dev["device_secret"].as_str().unwrap());
    assert_code(&register(&mut peer, product_secret, "unit-7"), Code::FORBIDDEN);
    // the secret works
    let mut d = AliDevice::new(server.endpoints.aes, pk, "unit-7", &secret);
    assert_code(&d.auth(), Code::CONTENT);
    // products without dynamic registration refuse
    let (pk2, dn2, _) = server.product_and_device(json!({"name": "static"}));
    let p2 = admin.get(&format!("/api/v1/products/{pk2}")).unwrap();
    let content = nbhub::auth::sign::register_content(&pk2, &dn2, "r");
    let body = json!({"productKey": pk2, "deviceName": dn2, "random": "r",
        "sign": SignMethod::HmacSha256.sign_hex(p2["product_secret"].as_str().unwrap().as_bytes(), content.as_bytes())});
    let mid = peer.next_mid();
    let req = nbhub::coap::message::MessageBuilder::new(MessageType::Con, Code::POST, mid, &[9])
        .option(nbhub::coap::option::OptionNumber::URI_PATH, b"auth")
        .option(nbhub::coap::option::OptionNumber::URI_PATH, b"register")
        .option(nbhub::coap::option::OptionNumber::URI_PATH, b"device")
        .payload(body.to_string().as_bytes())
        .build();
    assert_code(&peer.exchange(&req), Code::FORBIDDEN);
}

#[test]
fn bursts_get_4_29() {
    let server = Server::start_with(&[("NBHUB_DEVICE_MAX_PER_SECOND", "5"), ("NBHUB_DEVICE_MAX_PER_MINUTE", "300")]);
    let mut d = aes_device(&server);
    d.auth();
    // wait for the next second so the burst is not split across two windows
    std::thread::sleep(Duration::from_millis(1000 - (now_ms() % 1000) as u64));
    let mut codes = Vec::new();
    for i in 0..10 {
        let reply = d.send_uplink(format!("{i}").as_bytes());
        if reply.code == Code::TOO_MANY_REQUESTS {
            assert_eq!(reply.option(14), Some(&[1u8][..]), "Max-Age tells when to retry");
        }
        codes.push(reply.code);
    }
    let ok = codes.iter().filter(|c| **c == Code::CHANGED).count();
    let limited = codes.iter().filter(|c| **c == Code::TOO_MANY_REQUESTS).count();
    assert!((4..=5).contains(&ok), "{codes:?}");
    assert_eq!(ok + limited, 10, "{codes:?}");
    assert_eq!(server.stored(&d.pk, &d.dn).len(), ok);
    let metrics = server.metrics();
    assert!(metrics.contains("nbhub_flow_control_rejections_total"), "{metrics}");
    assert!(metrics.contains(r#"nbhub_coap_responses_total{port="aes",code="4.29"}"#), "{metrics}");
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

#[test]
fn new_auth_replaces_the_old_token_after_grace() {
    let server = Server::start_with(&[("NBHUB_AUTH_TOKEN_GRACE_S", "1")]);
    let mut d = aes_device(&server);
    d.auth();
    let (old_token, old_key, old_seq) = (d.token.clone(), d.key.clone(), d.seq);
    // A re-initialised device signs a new seq (the same body again would get the same session).
    let body = d.auth_body(SignMethod::HmacSha256, &[("seq", json!("2"))]);
    d.auth_with(&body);
    assert_ne!(d.token, old_token);
    assert_code(&d.send_uplink(b"new"), Code::CHANGED);
    let mut old = AliDevice::new(server.endpoints.aes, &d.pk, &d.dn, &d.secret);
    (old.token, old.key, old.seq) = (old_token, old_key, old_seq);
    assert_code(&old.send_uplink(b"old within grace"), Code::CHANGED);
    std::thread::sleep(Duration::from_millis(1200));
    assert_code(&old.send_uplink(b"old after grace"), Code::UNAUTHORIZED);
    assert_code(&d.send_uplink(b"new still"), Code::CHANGED);
}

#[test]
fn deleted_devices_lose_their_tokens_and_data() {
    let server = Server::start();
    let mut d = aes_device(&server);
    d.auth();
    assert_code(&d.send_uplink(b"x"), Code::CHANGED);
    server.admin().delete(&format!("/api/v1/products/{}/devices/{}", d.pk, d.dn)).unwrap();
    assert_code(&d.send_uplink(b"y"), Code::UNAUTHORIZED);
    // recreated under the same name: no old data, and the old token stays dead
    server.admin().post(&format!("/api/v1/products/{}/devices", d.pk), &json!({"device_name": d.dn})).unwrap();
    assert_code(&d.send_uplink(b"z"), Code::UNAUTHORIZED);
    assert!(server.stored(&d.pk, &d.dn).is_empty());
}

#[test]
fn a_full_write_queue_answers_5_03_and_loses_nothing_acknowledged() {
    let server = Server::start_with(&[("NBHUB_COAP_MAX_PENDING_WRITES", "1"), ("NBHUB_COAP_SOCKETS_PER_PORT", "1")]);
    let mut d = aes_device(&server);
    d.auth();
    let topic = d.default_topic();
    let requests: Vec<Vec<u8>> =
        (0..200).map(|i| d.uplink_request(MessageType::Con, &topic, format!("{i}").as_bytes())).collect();
    for r in &requests {
        d.peer.send(r);
    }
    let (mut changed, mut unavailable) = (0, 0);
    for _ in 0..requests.len() {
        let r = d.peer.recv();
        match r.code {
            Code::CHANGED => changed += 1,
            Code::SERVICE_UNAVAILABLE => {
                assert!(r.option(14).is_some(), "5.03 carries Max-Age");
                unavailable += 1
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(unavailable > 0, "200 back-to-back uplinks never found the single write slot busy");
    assert_eq!(server.stored(&d.pk, &d.dn).len(), changed);
}

#[test]
fn replayed_auth_on_the_plain_port_does_not_cut_the_device_off() {
    let server = Server::start_with(&[("NBHUB_AUTH_TOKEN_GRACE_S", "0")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "p"}));
    let mut device = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    let body = device.auth_body(SignMethod::HmacMd5, &[]);
    assert_code(&device.auth_with(&body), Code::CONTENT);
    // someone replays the captured body from elsewhere: same token, nothing replaced
    let mut replayer = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    let replay = replayer.auth_with(&body);
    assert_eq!(replay.json()["token"].as_str(), device.token.as_deref());
    assert_code(&device.send_uplink(b"still here"), Code::CHANGED);
    // a genuinely new signed request (new timestamp) does replace the token
    let fresh = device.auth_body(SignMethod::HmacMd5, &[("timestamp", json!("1700000000001"))]);
    let old = device.token.clone();
    device.auth_with(&fresh);
    assert_ne!(device.token, old);
}

#[test]
fn topic_levels_must_be_plain_segments() {
    let server = Server::start();
    let mut d = aes_device(&server);
    d.auth();
    let mid = d.peer.next_mid();
    let token = d.token.clone().unwrap();
    let key = d.key.clone().unwrap();
    d.seq += 1;
    let req = nbhub::coap::message::MessageBuilder::new(MessageType::Con, Code::POST, mid, &[1])
        .option(nbhub::coap::option::OptionNumber::URI_PATH, b"topic")
        .option(nbhub::coap::option::OptionNumber::URI_PATH, d.pk.as_bytes())
        .option(nbhub::coap::option::OptionNumber::URI_PATH, d.dn.as_bytes())
        .option(nbhub::coap::option::OptionNumber::URI_PATH, b"..")
        .option(nbhub::coap::option::OptionNumber::URI_PATH, b"a/b")
        .option(nbhub::coap::option::OptionNumber::ALI_TOKEN, token.as_bytes())
        .option(nbhub::coap::option::OptionNumber::ALI_SEQ, &key.encrypt_seq(d.seq))
        .payload(&key.encrypt(b"x"))
        .build();
    assert_code(&d.peer.exchange(&req), Code::BAD_REQUEST);
    assert!(server.stored(&d.pk, &d.dn).is_empty());
}

#[test]
fn a_flood_of_refused_requests_does_not_push_a_device_out_of_the_dedup_cache() {
    let server = Server::start_with(&[("NBHUB_COAP_DEDUP_CAPACITY", "50"), ("NBHUB_COAP_SOCKETS_PER_PORT", "1")]);
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dedup"}));
    let mut d = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    assert_code(&d.auth(), Code::CONTENT);
    let topic = d.default_topic();
    let req = d.uplink_request(MessageType::Con, &topic, b"once");
    assert_code(&d.peer.exchange(&req), Code::CHANGED);
    // A stranger sends twenty times the cache's capacity in requests that are all refused.
    let mut stranger = Peer::new(server.endpoints.coap);
    for _ in 0..1000 {
        let mid = stranger.next_mid();
        let bogus = coap_post(mid, &["topic", &pk, &dn, "update"], Some("not-a-token"), b"x");
        stranger.send(&bogus);
    }
    while stranger.recv_within(Duration::from_millis(300)).is_some() {}
    // The device's retransmission is still recognised: answered again, stored once.
    assert_code(&d.peer.exchange(&req), Code::CHANGED);
    assert_eq!(server.stored(&pk, &dn).len(), 1);
}

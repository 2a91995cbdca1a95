//! RFC 7252 message-layer behaviour over real UDP: pings, resets, bad options, sizes, malformed
//! datagrams, and an independent client (libcoap's coap-client-notls) on the plain port.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{AliDevice, Peer, Reply, Server};
use nbhub::auth::sign::SignMethod;
use nbhub::coap::message::{Code, MessageBuilder, MessageType, empty};
use nbhub::coap::option::OptionNumber;
use serde_json::json;

#[test]
fn ping_is_answered_with_reset() {
    let server = Server::start();
    for port in [server.endpoints.coap, server.endpoints.aes] {
        let p = Peer::new(port);
        let r = p.exchange(&empty(MessageType::Con, 0x4242));
        assert_eq!((r.mtype, r.code, r.mid), (MessageType::Rst, Code::EMPTY, 0x4242));
    }
}

#[test]
fn unknown_critical_options_are_refused_but_61_and_2089_are_known() {
    let server = Server::start();
    let mut p = Peer::new(server.endpoints.coap);
    let mid = p.next_mid();
    let con = MessageBuilder::new(MessageType::Con, Code::POST, mid, &[1, 2])
        .option(OptionNumber::URI_PATH, b"topic")
        .option(OptionNumber(2091), b"x")
        .build();
    let r = p.exchange(&con);
    assert_eq!((r.mtype, r.code, r.mid, r.token.clone()), (MessageType::Ack, Code::BAD_OPTION, mid, vec![1, 2]));
    let mid = p.next_mid();
    let non = MessageBuilder::new(MessageType::Non, Code::POST, mid, &[3])
        .option(OptionNumber(9), b"x")
        .option(OptionNumber::URI_PATH, b"topic")
        .build();
    let r = p.exchange(&non);
    assert_eq!((r.mtype, r.mid), (MessageType::Rst, mid));
    // Block1 is critical and not supported: 4.02 rather than a truncated body
    let mid = p.next_mid();
    let block = MessageBuilder::new(MessageType::Con, Code::POST, mid, &[4])
        .option(OptionNumber::URI_PATH, b"topic")
        .uint_option(OptionNumber(27), 0x0e)
        .build();
    assert_eq!(p.exchange(&block).code, Code::BAD_OPTION);
    // preconditions are not evaluated here, so they are refused rather than ignored
    let mid = p.next_mid();
    let conditional = MessageBuilder::new(MessageType::Con, Code::POST, mid, &[6])
        .option(OptionNumber(1), b"etag")
        .option(OptionNumber::URI_PATH, b"topic")
        .build();
    assert_eq!(p.exchange(&conditional).code, Code::BAD_OPTION);
    // 61 and 2089 reach the dialect, which answers 4.01 for an unknown token
    let mid = p.next_mid();
    let known = MessageBuilder::new(MessageType::Con, Code::POST, mid, &[5])
        .option(OptionNumber::URI_PATH, b"topic")
        .option(OptionNumber::URI_PATH, b"a")
        .option(OptionNumber::ALI_TOKEN_61, b"nope")
        .option(OptionNumber::ALI_SEQ, &[0; 16])
        .build();
    assert_eq!(p.exchange(&known).code, Code::UNAUTHORIZED);
}

#[test]
fn malformed_datagrams_get_reset_or_nothing_and_the_server_carries_on() {
    let server = Server::start();
    let p = Peer::new(server.endpoints.aes);
    // CON with a reserved option nibble: RST with the same mid, 4 bytes
    p.send(&[0x40, 0x02, 0x12, 0x34, 0xf1, 0x00]);
    let rst = p.recv_within(Duration::from_secs(5)).unwrap();
    assert_eq!(rst, vec![0x70, 0x00, 0x12, 0x34]);
    // payload marker without payload, token length 9, Empty with a token: RST for CON
    for bad in
        [vec![0x40, 0x02, 0, 1, 0xff], vec![0x49, 0x02, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9], vec![0x41, 0x00, 0, 3, 7]]
    {
        p.send(&bad);
        let r = Reply::parse(&p.recv_within(Duration::from_secs(5)).unwrap());
        assert_eq!((r.mtype, r.mid), (MessageType::Rst, u16::from_be_bytes([bad[2], bad[3]])));
    }
    // NON malformed, wrong version, too short: silence
    for silent in [vec![0x50, 0x02, 0, 4, 0xf1], vec![0x80, 0x02, 0, 5], b"\x00\x01garbage".to_vec(), vec![0x40]] {
        p.send(&silent);
        assert!(p.recv_within(Duration::from_millis(300)).is_none(), "answered {silent:?}");
    }
    // a response where a request belongs: RST for CON
    p.send(&MessageBuilder::new(MessageType::Con, Code::CONTENT, 6, &[]).build());
    assert_eq!(Reply::parse(&p.recv_within(Duration::from_secs(5)).unwrap()).mtype, MessageType::Rst);
    // still serving
    let r = p.exchange(&empty(MessageType::Con, 7));
    assert_eq!(r.mtype, MessageType::Rst);
}

#[test]
fn oversized_requests_get_4_13_with_size1() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "p"}));
    let mut d = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    d.auth();
    let topic = d.default_topic();
    let req = d.uplink_request(MessageType::Con, &topic, &vec![b'a'; 1025]);
    let r = d.peer.exchange(&req);
    assert_eq!(r.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(r.option(60), Some(&[0x04, 0x00][..]));
    // far beyond the receive buffer: still a clean 4.13
    let req = d.uplink_request(MessageType::Con, &topic, &vec![b'a'; 9000]);
    let r = d.peer.exchange(&req);
    assert_eq!(r.code, Code::REQUEST_ENTITY_TOO_LARGE);
    let req = d.uplink_request(MessageType::Con, &topic, &vec![b'a'; 1024]);
    assert_eq!(d.peer.exchange(&req).code, Code::CHANGED);
    assert_eq!(server.stored(&pk, &dn).len(), 1);
}

#[test]
fn unknown_paths_and_proxies() {
    let server = Server::start();
    let mut p = Peer::new(server.endpoints.coap);
    let mid = p.next_mid();
    let r = p.exchange(
        &MessageBuilder::new(MessageType::Con, Code::GET, mid, &[1]).option(OptionNumber::URI_PATH, b"nothing").build(),
    );
    assert_eq!(r.code, Code::NOT_FOUND);
    let mid = p.next_mid();
    let r = p.exchange(
        &MessageBuilder::new(MessageType::Con, Code::GET, mid, &[1])
            .option(OptionNumber::PROXY_URI, b"coap://x/")
            .build(),
    );
    assert_eq!(r.code, Code::PROXYING_NOT_SUPPORTED);
    let mid = p.next_mid();
    let r = p.exchange(
        &MessageBuilder::new(MessageType::Con, Code::GET, mid, &[1]).option(OptionNumber::URI_PATH, b"topic").build(),
    );
    assert_eq!(r.code, Code::METHOD_NOT_ALLOWED);
}

/// No reply to an unauthenticated address is ever larger than what it sent.
#[test]
fn no_amplification_to_unauthenticated_peers() {
    let server = Server::start();
    let mut p = Peer::new(server.endpoints.aes);
    let mut requests: Vec<Vec<u8>> = vec![
        empty(MessageType::Con, 1),
        vec![0x40, 0x02, 0, 2, 0xf1],
        MessageBuilder::new(MessageType::Con, Code::POST, 3, &[])
            .option(OptionNumber::URI_PATH, b"auth")
            .payload(b"{}")
            .build(),
        MessageBuilder::new(MessageType::Con, Code::POST, 4, &[]).option(OptionNumber::URI_PATH, b"topic").build(),
        MessageBuilder::new(MessageType::Con, Code::GET, 5, &[]).build(),
    ];
    for i in 0..50u16 {
        let mid = p.next_mid();
        requests.push(
            MessageBuilder::new(MessageType::Con, Code::new(0, (i % 5 + 1) as u8), mid, &[])
                .option(OptionNumber(i * 7 + 1), b"")
                .build(),
        );
    }
    let (mut sent, mut received) = (0usize, 0usize);
    for r in &requests {
        p.send(r);
        sent += r.len();
        if let Some(reply) = p.recv_within(Duration::from_millis(500)) {
            assert!(reply.len() <= r.len(), "reply {reply:?} to {r:?} is larger");
            received += reply.len();
        }
    }
    assert!(received <= sent);
}

#[test]
fn libcoap_client_walks_through_the_plain_port() {
    if Command::new("coap-client-notls").arg("-h").output().is_err() {
        panic!("coap-client-notls is missing: apt-get install libcoap3-bin");
    }
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "walkthrough"}));
    let sim = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    let body = sim.auth_body(nbhub::auth::sign::SignMethod::HmacSha1, &[]);
    let port = server.endpoints.coap.port();
    let out = Command::new("coap-client-notls")
        .args(["-m", "post", "-t", "application/json", "-A", "application/json", "-B", "5", "-e"])
        .arg(body.to_string())
        .arg(format!("coap://127.0.0.1:{port}/auth"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json_start =
        stdout.find('{').unwrap_or_else(|| panic!("no token in {stdout:?} / {}", String::from_utf8_lossy(&out.stderr)));
    let token = serde_json::from_str::<serde_json::Value>(stdout[json_start..].trim()).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let out = Command::new("coap-client-notls")
        .args(["-m", "post", "-B", "5", "-O"])
        .arg(format!("2088,{token}"))
        .args(["-e", "{\"temperature\":22.5}"])
        .arg(format!("coap://127.0.0.1:{port}/topic/{pk}/{dn}/update"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 61 instead of 2088, as iotkit v3 sends it; libcoap must not choke on the critical option
    let out = Command::new("coap-client-notls")
        .args(["-m", "post", "-B", "5", "-O"])
        .arg(format!("61,{token}"))
        .args(["-e", "second"])
        .arg(format!("coap://127.0.0.1:{port}/topic/{pk}/{dn}/update"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stored = server.stored(&pk, &dn);
    assert_eq!(
        stored,
        vec![
            (format!("/{pk}/{dn}/update"), b"{\"temperature\":22.5}".to_vec()),
            (format!("/{pk}/{dn}/update"), b"second".to_vec())
        ]
    );
}

#[test]
fn a_reused_message_id_with_other_bytes_is_not_answered_from_the_cache() {
    let server = Server::start();
    let (pk, dn, secret) = server.product_and_device(json!({"name": "dedup"}));
    let mut d = AliDevice::new(server.endpoints.coap, &pk, &dn, &secret);
    let first = d.auth_request(d.auth_body(SignMethod::HmacSha1, &[]).to_string().as_bytes(), Some(50), Some(50));
    let token = d.peer.exchange(&first).json()["token"].clone();
    assert!(token.is_string());
    // byte-identical retransmission: the same answer
    assert_eq!(d.peer.exchange(&first).json()["token"], token);
    // same id, different message: ignored (never processed, never the cached reply)
    let mid = u16::from_be_bytes([first[2], first[3]]);
    let other = MessageBuilder::new(MessageType::Con, Code::GET, mid, &[1])
        .option(OptionNumber::URI_PATH, b"elsewhere")
        .build();
    d.peer.send(&other);
    assert!(d.peer.recv_within(Duration::from_millis(300)).is_none());

    // An error changed nothing and is not remembered: the same id is simply answered afresh.
    let mut p = Peer::new(server.endpoints.coap);
    let mid = p.next_mid();
    let missing =
        MessageBuilder::new(MessageType::Con, Code::GET, mid, &[1]).option(OptionNumber::URI_PATH, b"nothing").build();
    assert_eq!(p.exchange(&missing).code, Code::NOT_FOUND);
    assert_eq!(p.exchange(&missing).code, Code::NOT_FOUND);
    let other =
        MessageBuilder::new(MessageType::Con, Code::POST, mid, &[1]).option(OptionNumber::URI_PATH, b"auth").build();
    assert_eq!(p.exchange(&other).code, Code::BAD_REQUEST, "processed as the new request it is");
}

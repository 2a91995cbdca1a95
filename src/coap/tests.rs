//! The message layer in memory: an endpoint serving a small resource set, fed datagrams and
//! write completions by hand, its answers read back as bytes. The UDP tests (`tests/coap.rs`)
//! keep a smoke test of each case over real sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::endpoint::{Actions, Endpoint, EndpointConfig};
use super::message::{Code, Message, MessageBuilder, MessageType, empty};
use super::option::OptionNumber;
use super::pending::Ticket;
use super::resource::{Effects, Outcome, Persist, Request, Resources, Response, StoredId, WriteFailed, Written};
use crate::clock::{Now, UnixMs};

/// `POST /store` persists its payload and answers 2.04 with the stored id; `/topic` takes only
/// POST (4.05 otherwise); anything else is 4.04.
struct Resource;

impl Resources for Resource {
    type Writes = Vec<u8>;

    fn handle(&mut self, req: &Request<'_, '_>, _effects: &mut Effects<Vec<u8>>) -> Outcome<Vec<u8>> {
        match (&req.path[..], req.method()) {
            (["store"], Code::POST) => {
                let response = Response { with_message_id: true, ..Response::new(Code::CHANGED) };
                Persist::new(req.msg.payload.to_vec(), response).into()
            }
            (["topic"], Code::POST) => Outcome::code(Code::CHANGED),
            (["topic"], _) => Outcome::code(Code::METHOD_NOT_ALLOWED),
            _ => Outcome::code(Code::NOT_FOUND),
        }
    }
}

/// One endpoint and one peer, with a clock that moves only when told.
struct Harness {
    ep: Endpoint<Resource>,
    peer: SocketAddr,
    start: Instant,
    /// Writes asked for and not yet reported.
    writes: Vec<(Ticket, Vec<u8>)>,
}

impl Harness {
    fn new() -> Harness {
        let config = EndpointConfig {
            max_payload: 64,
            announced_max_payload: 64,
            dedup_capacity: 100,
            exchange_lifetime: Duration::from_secs(247),
            ack_timeout: Duration::from_secs(2),
            max_retransmit: 4,
            max_pending_writes: 10,
            max_outgoing: 100,
        };
        Harness {
            ep: Endpoint::new(Resource, config),
            peer: "192.0.2.7:40000".parse().unwrap(),
            start: Instant::now(),
            writes: Vec::new(),
        }
    }

    fn now(&self) -> Now {
        Now { instant: self.start, wall: UnixMs(1_000) }
    }

    /// Every datagram the endpoint sends in answer to `data`.
    fn send(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Actions::default();
        self.ep.handle_datagram(self.now(), self.peer, None, data, &mut out);
        // This resource records nothing without waiting for it: every write has a ticket.
        self.writes.extend(out.writes.into_iter().map(|(t, w)| (t.expect("a ticket"), w)));
        out.transmits.into_iter().map(|t| t.data.to_vec()).collect()
    }

    /// The one answer to `data`.
    fn answer(&mut self, data: &[u8]) -> Message<'static> {
        let sent = self.send(data);
        assert_eq!(sent.len(), 1, "one answer to {data:?}: {sent:?}");
        parsed(sent.into_iter().next().unwrap())
    }

    /// Reports the oldest write asked for as ended with `result`; what the endpoint sends.
    fn commit(&mut self, result: Written) -> Vec<Vec<u8>> {
        let (ticket, _) = self.writes.remove(0);
        let mut out = Actions::default();
        self.ep.handle_committed(self.now(), ticket, result, &mut out);
        out.transmits.into_iter().map(|t| t.data.to_vec()).collect()
    }
}

fn parsed(data: Vec<u8>) -> Message<'static> {
    Message::parse(Box::leak(data.into_boxed_slice())).expect("the endpoint sends well-formed messages")
}

fn con(code: Code, mid: u16, path: &str) -> MessageBuilder {
    MessageBuilder::new(MessageType::Con, code, mid, &[0xa1]).option(OptionNumber::URI_PATH, path.as_bytes())
}

#[test]
fn a_ping_is_answered_with_a_reset_of_the_same_id() {
    let mut h = Harness::new();
    let rst = h.send(&empty(MessageType::Con, 0x4242));
    assert_eq!(rst, [vec![0x70, 0x00, 0x42, 0x42]]);
}

#[test]
fn unknown_critical_options_get_4_02_on_a_con_and_a_reset_on_a_non() {
    let mut h = Harness::new();
    // 2091 is critical and unknown; Block1 (27) and If-Match (1) are critical and not served.
    for (mid, option) in [(1, 2091), (2, 27)] {
        let m = h.answer(&con(Code::POST, mid, "topic").option(OptionNumber(option), b"x").build());
        assert_eq!((m.mtype, m.code, m.mid, m.token), (MessageType::Ack, Code::BAD_OPTION, mid, &[0xa1][..]));
    }
    // Options go in ascending order: If-Match before the path.
    let conditional = MessageBuilder::new(MessageType::Con, Code::POST, 3, &[0xa1])
        .option(OptionNumber::IF_MATCH, b"x")
        .option(OptionNumber::URI_PATH, b"topic")
        .build();
    assert_eq!(h.answer(&conditional).code, Code::BAD_OPTION);
    let non = MessageBuilder::new(MessageType::Non, Code::POST, 4, &[3])
        .option(OptionNumber(9), b"x")
        .option(OptionNumber::URI_PATH, b"topic")
        .build();
    let m = h.answer(&non);
    assert_eq!((m.mtype, m.mid), (MessageType::Rst, 4));
    // Elective unknown options are ignored.
    let m = h.answer(&con(Code::POST, 5, "topic").option(OptionNumber(2090 + 6), b"x").build());
    assert_eq!(m.code, Code::CHANGED);
}

#[test]
fn too_large_requests_get_4_13_with_the_limit_in_size1() {
    let mut h = Harness::new();
    let m = h.answer(&con(Code::POST, 1, "topic").payload(&[b'a'; 65]).build());
    assert_eq!(m.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(m.option(OptionNumber::SIZE1), Some(&[64][..]));
    // Beyond the receive buffer: only the head was read, and it is enough to answer.
    let big = con(Code::POST, 2, "topic").payload(&[b'a'; 9000]).build();
    let mut out = Actions::default();
    h.ep.handle_oversized(h.peer, &big[..1500], &mut out);
    let m = parsed(out.transmits.remove(0).data.to_vec());
    assert_eq!((m.code, m.mid), (Code::REQUEST_ENTITY_TOO_LARGE, 2));
    assert_eq!(h.answer(&con(Code::POST, 3, "topic").payload(&[b'a'; 64]).build()).code, Code::CHANGED);
}

#[test]
fn proxies_unknown_paths_and_methods_are_refused_by_name() {
    let mut h = Harness::new();
    let proxy = MessageBuilder::new(MessageType::Con, Code::GET, 1, &[1]).option(OptionNumber::PROXY_URI, b"coap://x/");
    assert_eq!(h.answer(&proxy.build()).code, Code::PROXYING_NOT_SUPPORTED);
    assert_eq!(h.answer(&con(Code::GET, 2, "nothing").build()).code, Code::NOT_FOUND);
    assert_eq!(h.answer(&con(Code::GET, 3, "topic").build()).code, Code::METHOD_NOT_ALLOWED);
}

#[test]
fn malformed_datagrams_get_a_reset_when_con_and_nothing_otherwise() {
    let mut h = Harness::new();
    // A reserved option nibble, a payload marker with no payload, a token length of 9, an Empty
    // message with a token: RST with the same id, never more than 4 bytes.
    for bad in [
        vec![0x40, 0x02, 0x12, 0x34, 0xf1, 0x00],
        vec![0x40, 0x02, 0, 1, 0xff],
        vec![0x49, 0x02, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        vec![0x41, 0x00, 0, 3, 7],
    ] {
        assert_eq!(h.send(&bad), [vec![0x70, 0x00, bad[2], bad[3]]]);
    }
    // A malformed NON, another version, too short: silence.
    for silent in [vec![0x50, 0x02, 0, 4, 0xf1], vec![0x80, 0x02, 0, 5], b"\x00\x01garbage".to_vec(), vec![0x40]] {
        assert!(h.send(&silent).is_empty(), "answered {silent:?}");
    }
    // A response where a request belongs: RST for a CON.
    let m = h.answer(&MessageBuilder::new(MessageType::Con, Code::CONTENT, 6, &[]).build());
    assert_eq!(m.mtype, MessageType::Rst);
    assert_eq!(h.ep.take_stats().0.malformed, 8);
}

/// No answer to an unauthenticated address is ever larger than what provoked it.
#[test]
fn no_answer_is_larger_than_its_request() {
    let mut h = Harness::new();
    let mut requests = vec![
        empty(MessageType::Con, 1),
        vec![0x40, 0x02, 0, 2, 0xf1],
        MessageBuilder::new(MessageType::Con, Code::POST, 3, &[]).option(OptionNumber::URI_PATH, b"topic").build(),
        MessageBuilder::new(MessageType::Con, Code::GET, 5, &[]).build(),
        // The 4.13's Size1 is dropped rather than make the answer larger.
        MessageBuilder::new(MessageType::Con, Code::POST, 6, &[]).payload(&[0; 65]).build(),
    ];
    for i in 0..200u16 {
        requests.push(
            MessageBuilder::new(MessageType::Con, Code::new(0, (i % 5 + 1) as u8), 100 + i, &[])
                .option(OptionNumber(i * 7 + 1), b"")
                .build(),
        );
    }
    for r in &requests {
        for answer in h.send(r) {
            assert!(answer.len() <= r.len(), "answer {answer:?} to {r:?} is larger");
        }
    }
}

#[test]
fn a_retransmission_gets_the_same_answer_and_a_reused_id_with_other_bytes_gets_none() {
    let mut h = Harness::new();
    let first = con(Code::POST, 7, "topic").payload(b"one").build();
    let answer = h.send(&first);
    assert_eq!(h.send(&first), answer, "the same bytes again: the same answer");
    let other = con(Code::POST, 7, "topic").payload(b"two").build();
    assert!(h.send(&other).is_empty(), "the same id with other bytes is neither processed nor answered from the cache");
    assert_eq!(h.ep.take_stats().0.duplicates, 2);
    // An error changed nothing and is not remembered: the id is answered afresh.
    let missing = con(Code::GET, 8, "nothing").build();
    assert_eq!(h.answer(&missing).code, Code::NOT_FOUND);
    assert_eq!(h.answer(&con(Code::POST, 8, "topic").build()).code, Code::CHANGED, "processed as the new request");
}

#[test]
fn a_persisted_request_is_answered_only_once_its_write_ends() {
    let mut h = Harness::new();
    let req = con(Code::POST, 9, "store").payload(b"reading").build();
    assert!(h.send(&req).is_empty(), "no answer before the write is durable");
    assert_eq!(h.writes[0].1, b"reading");
    // Its retransmission while the write is pending is neither answered nor written again.
    assert!(h.send(&req).is_empty());
    assert_eq!(h.writes.len(), 1);
    let sent = h.commit(Ok(Some(StoredId(4711))));
    let m = parsed(sent[0].clone());
    assert_eq!((m.mtype, m.code, m.mid), (MessageType::Ack, Code::CHANGED, 9));
    assert_eq!(m.option(OptionNumber::ALI_MESSAGE_ID), Some(&b"4711"[..]));
    assert_eq!(h.send(&req), sent, "a later retransmission gets the stored answer");
    // A full disk: 5.03 with Max-Age; any other failure: 5.00. Neither is remembered.
    h.send(&con(Code::POST, 10, "store").build());
    let m = parsed(h.commit(Err(WriteFailed { retry_after_s: Some(10) })).remove(0));
    assert_eq!((m.code, m.option(OptionNumber::MAX_AGE)), (Code::SERVICE_UNAVAILABLE, Some(&[10][..])));
    h.send(&con(Code::POST, 11, "store").build());
    assert_eq!(parsed(h.commit(Err(WriteFailed { retry_after_s: None })).remove(0)).code, Code::INTERNAL_SERVER_ERROR);
    assert_eq!(h.ep.pending_writes(), 0);
}

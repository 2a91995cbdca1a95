//! A firmware upgrade over LwM2M Object 5, in memory: the reads, the observation, the package
//! URI, block-wise download, execute and the result after the client's reboot, as agent_tiny
//! does them.

use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::*;
use crate::coap::block::Block;
use crate::dialect::lwm2m::{TLV, Value, tlv};
use crate::identity::ObserveToken;
use crate::ota::package::{PackageId, PackageKind, PackageRecord};
use crate::ota::task::UpgradeTaskId;
use crate::ota::upgrade::{Retry, Stage};

const PACKAGE_SIZE: usize = 1300;

fn package() -> Vec<u8> {
    (0..PACKAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect()
}

/// Starts an upgrade of the device to `V2.0` (chunks of 500 bytes) with `retry`.
fn create_task(bed: &mut Bed, retry: Retry) -> UpgradeTaskId {
    let data = package();
    let record = PackageRecord {
        id: PackageId(1),
        product_key: ProductKey::new(PK).unwrap(),
        version: "V2.0".into(),
        kind: PackageKind::Firmware,
        size: data.len() as u64,
        chunk_size: 500,
        chunk_count: data.len().div_ceil(500) as u16,
        source_versions: Vec::new(),
        sha256: String::new(),
        created_at: 0,
    };
    let chunks = data.chunks(500).map(<[u8]>::to_vec).collect();
    let campaign = bed.services.campaign.clone();
    let mut created = pin!(campaign.create_task(record, chunks, vec![bed.device()], retry));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(created.as_mut().poll(&mut cx).is_pending(), "waits for the task to be stored");
    bed.recorded();
    let Poll::Ready(id) = created.as_mut().poll(&mut cx) else { panic!("stored, so created") };
    id.unwrap()
}

fn path_of(m: &Message<'_>) -> String {
    m.options_of(OptionNumber::URI_PATH).map(|s| format!("/{}", std::str::from_utf8(s).unwrap())).collect()
}

fn answer_with(m: &Message<'_>, code: Code, cf: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let b = MessageBuilder::new(MessageType::Ack, code, m.mid, m.token);
    let b = match cf {
        Some(cf) => b.uint_option(OptionNumber::CONTENT_FORMAT, cf),
        None => b,
    };
    b.payload(payload).build()
}

/// The one request among `sent`, which must be to `path`.
fn request_to(sent: Vec<Message<'static>>, path: &str) -> Message<'static> {
    let requests: Vec<_> = sent.into_iter().filter(|m| m.mtype == MessageType::Con).collect();
    assert_eq!(requests.iter().map(path_of).collect::<Vec<_>>(), [path], "{requests:?}");
    requests.into_iter().next().unwrap()
}

fn upgrade(bed: &Bed) -> crate::ota::upgrade::Upgrade {
    let device = bed.device();
    let mut s = device.state();
    bed.services.campaign.upgrade_of(device.id, &mut s).expect("an upgrade")
}

fn stage(bed: &Bed) -> Stage {
    upgrade(bed).stage
}

fn kick(bed: &mut Bed) -> Vec<Message<'static>> {
    let mut out = Actions::default();
    bed.ep.handle_kick(bed.now(), DeviceId(1), &mut out);
    bed.take(out)
}

/// The answer to `data`, once what it writes (a download's progress) is durable.
fn served(bed: &mut Bed, data: &[u8]) -> Message<'static> {
    let mut sent = bed.send(data);
    if sent.is_empty() {
        sent = bed.commit(0).1;
    }
    assert_eq!(sent.len(), 1, "one answer: {sent:?}");
    sent.remove(0)
}

fn block_request(mid: u16, path: &str, block: Option<Block>) -> Vec<u8> {
    let mut b = MessageBuilder::new(MessageType::Con, Code::GET, mid, &mid.to_be_bytes());
    for segment in path.trim_start_matches('/').split('/') {
        b = b.option(OptionNumber::URI_PATH, segment.as_bytes());
    }
    if let Some(block) = block {
        b = b.uint_option(OptionNumber::BLOCK2, block.value());
    }
    b.build()
}

/// Registers, starts the task and answers the version query with radio state good enough for a
/// slot; returns the observation of `/5/0/3` and the package URI write, both unanswered.
fn to_the_package_uri(bed: &mut Bed, retry: Retry) -> (UpgradeTaskId, Message<'static>, Message<'static>) {
    register_lwm2m(bed);
    let task = create_task(bed, retry);
    // The client is in its awake window: the tick starts the upgrade and asks for it.
    bed.services.campaign.tick(bed.now().wall);
    let rsrp = request_to(kick(bed), "/4/0/2");
    let sinr = request_to(bed.send(&answer_with(&rsrp, Code::CONTENT, Some(0), b"-90")), "/4/0/3");
    let cell =
        request_to(bed.send(&answer_with(&sinr, Code::CONTENT, Some(TLV), &tlv(&[(3, Value::Integer(12))]))), "/4/0/8");
    let version = request_to(bed.send(&answer_with(&cell, Code::CONTENT, Some(0), b"460011234")), "/3/0/3");
    assert_eq!(bed.device().state().radio.cell_id.as_deref(), Some("460011234"));
    assert_eq!(bed.device().state().radio.rsrp, Some(-90.0));
    let observe = request_to(bed.send(&answer_with(&version, Code::CONTENT, Some(0), b"V1.0")), "/5/0/3");
    assert_eq!(stage(bed), Stage::Notified, "the radio read first lets it take a slot at once");
    assert_eq!(observe.option(OptionNumber::OBSERVE), Some(&[][..]));
    assert_eq!(Some(ObserveToken::from_bytes(observe.token).unwrap()), bed.device().state().firmware_observe);
    let write = request_to(bed.send(&answer_with(&observe, Code::CONTENT, Some(0), b"0")), "/5/0/1");
    assert_eq!(write.uint_option(OptionNumber::CONTENT_FORMAT).unwrap(), Some(0));
    (task, observe, write)
}

#[test]
fn an_lwm2m_client_is_upgraded_over_object_5_and_its_result_counts_after_the_reboot() {
    let mut bed = Bed::with_ota(PortFamily::Plain, OtaProtocol::Lwm2m);
    let (task, observe, write) = to_the_package_uri(&mut bed, Retry::default());
    let uri = std::str::from_utf8(write.payload).unwrap().to_string();
    let key = crate::dialect::lwm2m::firmware::package_key(SECRET, task.0);
    assert_eq!(uri, format!("coap://192.0.2.1:5683/fw/{task}/{NODE}/{key}"), "no query; this instance's host");
    assert!(bed.send(&answer_with(&write, Code::CHANGED, None, b"")).is_empty());
    assert_eq!(stage(&bed), Stage::Downloading);
    // The client fetches 512-byte blocks; every answer carries Block2, the first Size2.
    let path = format!("/fw/{task}/{NODE}/{key}");
    let b512 = |num| Some(Block { num, more: false, szx: 5 });
    let first = served(&mut bed, &block_request(10, &path, b512(0)));
    assert_eq!(first.code, Code::CONTENT);
    assert_eq!(first.payload, &package()[..512]);
    assert_eq!(Block::parse(first.option(OptionNumber::BLOCK2).unwrap()), Ok(Block { num: 0, more: true, szx: 5 }));
    assert_eq!(first.uint_option(OptionNumber::SIZE2).unwrap(), Some(PACKAGE_SIZE as u32));
    // Any block, in any order: a download resumes where it stopped.
    let last = served(&mut bed, &block_request(11, &path, b512(2)));
    assert_eq!(last.payload, &package()[1024..]);
    assert!(!Block::parse(last.option(OptionNumber::BLOCK2).unwrap()).unwrap().more);
    assert!(upgrade(&bed).progress(3) >= 90, "the download's progress counts the block that ends it");
    let middle = served(&mut bed, &block_request(12, &path, b512(1)));
    assert_eq!(middle.payload, &package()[512..1024]);
    // Bad input: past the end, a reserved size, a key nobody holds, another method.
    assert_eq!(served(&mut bed, &block_request(13, &path, b512(3))).code, Code::BAD_OPTION);
    let reserved = MessageBuilder::new(MessageType::Con, Code::GET, 14, &[14])
        .option(OptionNumber::URI_PATH, b"fw")
        .option(OptionNumber::URI_PATH, task.to_string().as_bytes())
        .option(OptionNumber::URI_PATH, NODE.as_bytes())
        .option(OptionNumber::URI_PATH, key.as_bytes())
        .option(OptionNumber::BLOCK2, &[0x07])
        .build();
    assert_eq!(bed.answer(&reserved).code, Code::BAD_REQUEST);
    assert_eq!(
        served(&mut bed, &block_request(15, &format!("/fw/{task}/{NODE}/0000000000000000"), b512(0))).code,
        Code::NOT_FOUND
    );
    assert_eq!(served(&mut bed, &block_request(16, &format!("/fw/99/{NODE}/{key}"), b512(0))).code, Code::NOT_FOUND);
    // A block goes only to the device's own IP: no reflection of 1 KB answers at anyone else.
    let own = bed.peer;
    bed.peer = "203.0.113.5:5683".parse().unwrap();
    assert_eq!(served(&mut bed, &block_request(18, &path, b512(0))).code, Code::FORBIDDEN);
    // Nor does a copy of an older report under the observation, sent from there: acknowledged
    // only (the client's own report, numbered 10, came first).
    bed.peer = own;
    let sent = bed.send(&notification(observe.token, 19, 10, b"1"));
    assert_eq!(sent.iter().map(|m| (m.mtype, m.mid)).collect::<Vec<_>>(), [(MessageType::Ack, 19)]);
    bed.peer = "203.0.113.5:5683".parse().unwrap();
    let copied = bed.send(&notification(observe.token, 21, 9, b"2"));
    assert_eq!(copied.iter().map(|m| (m.mtype, m.code)).collect::<Vec<_>>(), [(MessageType::Ack, Code::EMPTY)]);
    bed.peer = own;
    assert_eq!(bed.device().state().address, Some(own), "a copy does not move the device");
    assert_eq!(stage(&bed), Stage::Downloading, "bad requests change nothing");
    // No Block2 asked: the server picks 512 and says so.
    let unasked = served(&mut bed, &block_request(17, &path, None));
    assert_eq!(Block::parse(unasked.option(OptionNumber::BLOCK2).unwrap()), Ok(Block { num: 0, more: true, szx: 5 }));
    // The client reports the download done under the /5/0/3 observation: the server checks the
    // state is still 2, then executes.
    let done = notification(observe.token, 20, 11, b"2");
    assert!(bed.send(&done).is_empty(), "nothing before the report's ACK");
    let (writes, sent) = bed.commit(0);
    assert!(writes.iter().any(|op| matches!(op, Op::Put { cf: crate::store::CF_UPGRADES, .. })), "{writes:?}");
    // agent_tiny moves to a state only when its report's ACK arrives: the ACK goes first.
    assert_eq!((sent[0].mtype, sent[0].mid), (MessageType::Ack, 20), "acknowledged once its stage is stored");
    let check = request_to(sent[1..].to_vec(), "/5/0/3");
    let execute = request_to(bed.send(&answer_with(&check, Code::CONTENT, Some(0), b"2")), "/5/0/2");
    assert_eq!((execute.code, execute.payload), (Code::POST, &[][..]));
    assert_eq!(stage(&bed), Stage::Downloaded);
    bed.send(&answer_with(&execute, Code::CHANGED, None, b""));
    assert_eq!(stage(&bed), Stage::Upgrading);
    // It reboots, registers again from a new address, and the result is read there.
    bed.peer = "198.51.100.9:6000".parse().unwrap();
    let (_, sent) = register_lwm2m_then(&mut bed);
    let result = request_to(sent, "/5/0/5");
    // Its report under the observation made before the reboot is acknowledged, never RST.
    let report = notification(observe.token, 22, 12, b"0");
    let mut acked = bed.send(&report);
    if acked.is_empty() {
        acked = bed.commit(0).1;
    }
    assert!(acked.iter().all(|m| m.mtype != MessageType::Rst), "{acked:?}");
    assert!(acked.iter().any(|m| m.mtype == MessageType::Ack && m.mid == 22), "{acked:?}");
    let confirm = request_to(bed.send(&answer_with(&result, Code::CONTENT, Some(0), b"1")), "/3/0/3");
    bed.send(&answer_with(&confirm, Code::CONTENT, Some(0), b"V2.0"));
    assert_eq!(stage(&bed), Stage::Succeeded);
    assert_eq!(bed.device().state().version.as_deref(), Some("V2.0"));
}

#[test]
fn an_error_answer_or_a_failed_update_result_fails_the_attempt_with_its_reason() {
    let mut bed = Bed::with_ota(PortFamily::Plain, OtaProtocol::Lwm2m);
    let (_, _, write) = to_the_package_uri(&mut bed, Retry::default());
    bed.send(&answer_with(&write, Code::BAD_REQUEST, None, b""));
    assert_eq!(stage(&bed), Stage::Failed);
    let failure = |bed: &Bed| upgrade(bed).failure;
    assert_eq!(failure(&bed).as_deref(), Some("The device answered 4.00 to the write of /5/0/1"));

    // A download the client gives up on: state back to 0, and the result says why.
    let mut bed = Bed::with_ota(PortFamily::Plain, OtaProtocol::Lwm2m);
    let (_, observe, write) = to_the_package_uri(&mut bed, Retry::default());
    bed.send(&answer_with(&write, Code::CHANGED, None, b""));
    assert!(bed.send(&notification(observe.token, 30, 2, b"0")).is_empty());
    let result = request_to(bed.commit(0).1, "/5/0/5");
    bed.send(&answer_with(&result, Code::CONTENT, Some(0), b"5"));
    assert_eq!(stage(&bed), Stage::Failed);
    assert_eq!(failure(&bed).as_deref(), Some("Integrity check failure for new downloaded package"));
}

#[test]
fn an_execute_whose_answer_was_lost_is_not_sent_again_to_the_rebooted_client() {
    let mut bed = Bed::with_ota(PortFamily::Plain, OtaProtocol::Lwm2m);
    let (task, observe, write) = to_the_package_uri(&mut bed, Retry::default());
    bed.send(&answer_with(&write, Code::CHANGED, None, b""));
    let key = crate::dialect::lwm2m::firmware::package_key(SECRET, task.0);
    let path = format!("/fw/{task}/{NODE}/{key}");
    for num in 0..3 {
        let block = served(&mut bed, &block_request(40 + num as u16, &path, Some(Block { num, more: false, szx: 5 })));
        assert_eq!(block.code, Code::CONTENT);
    }
    assert!(bed.send(&notification(observe.token, 50, 2, b"2")).is_empty());
    let check = request_to(bed.commit(0).1, "/5/0/3");
    let execute = request_to(bed.send(&answer_with(&check, Code::CONTENT, Some(0), b"2")), "/5/0/2");
    assert_eq!(execute.code, Code::POST);
    // The client executes and reboots; its answer is lost, and the Execute is given up.
    bed.wait(Duration::from_secs(600));
    assert_eq!(stage(&bed), Stage::Downloaded);
    bed.peer = "198.51.100.9:6000".parse().unwrap();
    let (_, sent) = register_lwm2m_then(&mut bed);
    // The Execute still waiting is preceded by a read of the state, and the new Register has
    // the result read: the client is idle and reports success, so nothing is executed again.
    let paths: Vec<String> = sent.iter().map(path_of).collect();
    assert_eq!(paths, ["/5/0/3", "/5/0/5"], "{sent:?}");
    let (state, result) = (sent[0].clone(), sent[1].clone());
    assert_eq!(state.option(OptionNumber::OBSERVE), None, "a plain read");
    let confirm = request_to(bed.send(&answer_with(&result, Code::CONTENT, Some(0), b"1")), "/3/0/3");
    bed.send(&answer_with(&confirm, Code::CONTENT, Some(0), b"V2.0"));
    assert_eq!(stage(&bed), Stage::Succeeded);
    let after = bed.send(&answer_with(&state, Code::CONTENT, Some(0), b"0"));
    assert!(after.iter().all(|m| path_of(m) != "/5/0/2"), "{after:?}");
}

#[test]
fn inside_dtls_the_package_is_named_coaps_and_served_only_inside_the_session() {
    let mut bed = Bed::with_psk(PortFamily::Dtls, OtaProtocol::Lwm2m, b"the-psk");
    let (task, _, write) = to_the_package_uri(&mut bed, Retry::default());
    let key = crate::dialect::lwm2m::firmware::package_key(SECRET, task.0);
    let uri = std::str::from_utf8(write.payload).unwrap();
    assert_eq!(uri, format!("coaps://192.0.2.1:5684/fw/{task}/{NODE}/{key}"));
    bed.send(&answer_with(&write, Code::CHANGED, None, b""));
    let path = format!("/fw/{task}/{NODE}/{key}");
    let block = Some(Block { num: 0, more: false, szx: 5 });
    assert_eq!(served(&mut bed, &block_request(60, &path, block)).code, Code::CONTENT);
    // The same request in clear, from the device's own address: its key would not protect it.
    bed.authenticated = None;
    assert_eq!(served(&mut bed, &block_request(61, &path, block)).code, Code::FORBIDDEN);
    // Another device's session may not fetch it either.
    bed.authenticated = Some(DeviceId(9));
    assert_eq!(served(&mut bed, &block_request(62, &path, block)).code, Code::FORBIDDEN);
}

#[test]
fn a_client_holding_an_older_package_gets_the_uri_and_an_installing_client_counts_as_executed() {
    let mut bed = Bed::with_ota(PortFamily::Plain, OtaProtocol::Lwm2m);
    register_lwm2m(&mut bed);
    let task = create_task(&mut bed, Retry::default());
    bed.services.campaign.tick(bed.now().wall);
    let mut next = request_to(kick(&mut bed), "/4/0/2");
    for (path, value) in [("/4/0/3", &b"-90"[..]), ("/4/0/8", b"10"), ("/3/0/3", b"7"), ("/5/0/3", b"V1.0")] {
        next = request_to(bed.send(&answer_with(&next, Code::CONTENT, Some(0), value)), path);
    }
    // The client still holds a package from before (state 2): that is not this attempt's
    // download, and it is given the URI.
    let write = request_to(bed.send(&answer_with(&next, Code::CONTENT, Some(0), b"2")), "/5/0/1");
    assert_eq!(stage(&bed), Stage::Notified, "what it held is not this attempt's download");
    assert!(std::str::from_utf8(write.payload).unwrap().contains(&format!("/fw/{task}/")));
    bed.send(&answer_with(&write, Code::CHANGED, None, b""));
    assert_eq!(stage(&bed), Stage::Downloading);
    // Downloaded, and its Execute's answer lost: the state read before the Execute is sent
    // again says it is installing, which counts as executed.
    let key = crate::dialect::lwm2m::firmware::package_key(SECRET, task.0);
    let path = format!("/fw/{task}/{NODE}/{key}");
    for num in 0..3 {
        served(&mut bed, &block_request(70 + num as u16, &path, Some(Block { num, more: false, szx: 5 })));
    }
    let observe = bed.device().state().firmware_observe.unwrap();
    assert!(bed.send(&notification(&observe.0, 80, 2, b"2")).is_empty());
    let check = request_to(bed.commit(0).1, "/5/0/3");
    bed.send(&answer_with(&check, Code::CONTENT, Some(0), b"3"));
    assert_eq!(stage(&bed), Stage::Upgrading);
}

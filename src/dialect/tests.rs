//! Both dialects in memory: one socket's resources behind a real endpoint, over a registry with
//! nothing stored and a writer that only records. Datagrams go in and write completions are
//! reported by hand; what the endpoint sends is read back as messages. The UDP tests keep a smoke
//! test of each resource over real sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{DeviceFacing, Services, Writes};
use crate::auth::sign::{SignMethod, auth_content, register_content};
use crate::clock::{Now, UnixMs};
use crate::coap::endpoint::{Actions, Endpoint, EndpointConfig};
use crate::coap::message::{Code, Message, MessageBuilder, MessageType};
use crate::coap::option::OptionNumber;
use crate::coap::pending::Ticket;
use crate::coap::resource::StoredId;
use crate::config::Config;
use crate::downlink::{CommandId, CommandRecord, CommandStatus, NewRecord, SendStrategy};
use crate::identity::{DeviceId, DeviceName, NodeId, ProductKey, Secret};
use crate::net::PortFamily;
use crate::ota::pcp::{FromDevice, FromPlatform, ResultCode, Version};
use crate::registry::{Device, Registry, Route};
use crate::simulate::{AlibabaSession, alibaba_auth};
use crate::store::records::{DeviceRecord, OtaProtocol, ProductRecord};
use crate::store::{Op, Recorder, recording};

const PK: &str = "p1";
const DN: &str = "d1";
const SECRET: &str = "device-secret";
const PRODUCT_SECRET: &str = "product-secret";
const NODE: &str = "861234567890001";

/// One socket of `family` serving one product with one device, and a clock moved by hand.
struct Bed {
    ep: Endpoint<DeviceFacing>,
    services: Services,
    recorder: Recorder,
    peer: SocketAddr,
    start: Instant,
    elapsed: Duration,
    /// Writes the endpoint waits for, oldest first.
    waiting: Vec<(Ticket, Writes)>,
    /// Writes nobody waits for, in order.
    detached: Vec<Writes>,
    /// The device whose DTLS session the datagrams come through, if any.
    authenticated: Option<DeviceId>,
    /// Holds the store the services read (writes go to the recorder).
    _dir: tempfile::TempDir,
}

impl Bed {
    fn new(family: PortFamily) -> Bed {
        Bed::with_ota(family, OtaProtocol::Pcp)
    }

    /// A bed whose product upgrades over `ota_protocol`.
    fn with_ota(family: PortFamily, ota_protocol: OtaProtocol) -> Bed {
        Bed::build(family, ota_protocol, None)
    }

    /// A bed whose device has the raw DTLS key `psk`, and whose requests come from inside its
    /// session.
    fn with_psk(family: PortFamily, ota_protocol: OtaProtocol, psk: &[u8]) -> Bed {
        let mut bed = Bed::build(family, ota_protocol, Some(hex::encode(psk)));
        bed.authenticated = Some(DeviceId(1));
        bed
    }

    fn build(family: PortFamily, ota_protocol: OtaProtocol, psk_hex: Option<String>) -> Bed {
        let (writer, recorder) = recording();
        let config = Config::load_with_env(None, Vec::new()).unwrap();
        let registry = Arc::new(Registry::new(Arc::new(config), writer));
        registry
            .insert_product(Arc::new(ProductRecord {
                product_key: ProductKey::new(PK).unwrap(),
                product_secret: Secret::new(PRODUCT_SECRET).unwrap(),
                name: "meters".into(),
                dynamic_registration: true,
                ota_protocol,
                awake_window_s: 20,
                created_at: 0,
                ack_timeout_ms: None,
                max_retransmit: None,
                unsigned_bootstrap: false,
            }))
            .unwrap();
        let record = DeviceRecord {
            product_key: ProductKey::new(PK).unwrap(),
            device_name: DeviceName::new(DN).unwrap(),
            device_secret: Secret::new(SECRET).unwrap(),
            node_id: Some(NodeId::new(NODE).unwrap()),
            psk_hex,
            ..crate::registry::device::test_record()
        };
        registry.insert(&Arc::new(Device::from_record(record, None, None))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), None, crate::store::MemoryBudget::of(8 << 20)).unwrap();
        let services = Services::new(registry, store);
        let addr = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
        services.cluster.peers.bound(addr(5683), addr(5682), addr(5684));
        let config = EndpointConfig {
            max_payload: 1024,
            announced_max_payload: 1024,
            dedup_capacity: 100,
            exchange_lifetime: Duration::from_secs(247),
            ack_timeout: Duration::from_secs(2),
            max_retransmit: 4,
            max_pending_writes: 10,
            max_outgoing: 100,
        };
        let facing = DeviceFacing::new(&services, Route { family, socket: 0 });
        Bed {
            ep: Endpoint::new(facing, config),
            services,
            recorder,
            peer: "192.0.2.7:40000".parse().unwrap(),
            start: Instant::now(),
            elapsed: Duration::ZERO,
            waiting: Vec::new(),
            detached: Vec::new(),
            authenticated: None,
            _dir: dir,
        }
    }

    fn now(&self) -> Now {
        Now { instant: self.start + self.elapsed, wall: UnixMs(1_800_000_000_000 + self.elapsed.as_millis() as u64) }
    }

    fn device(&self) -> Arc<Device> {
        self.services.registry.device(PK, DN).unwrap()
    }

    fn take(&mut self, out: Actions<Writes>) -> Vec<Message<'static>> {
        for (ticket, w) in out.writes {
            match ticket {
                Some(t) => self.waiting.push((t, w)),
                None => self.detached.push(w),
            }
        }
        out.transmits.into_iter().map(|t| parsed(t.data.to_vec())).collect()
    }

    /// Every datagram the endpoint sends in answer to `data`.
    fn send(&mut self, data: &[u8]) -> Vec<Message<'static>> {
        let mut out = Actions::default();
        self.ep.handle_datagram(self.now(), self.peer, self.authenticated, data, &mut out);
        self.take(out)
    }

    /// The one datagram the endpoint sends at once in answer to `data`.
    fn answer(&mut self, data: &[u8]) -> Message<'static> {
        let mut sent = self.send(data);
        assert_eq!(sent.len(), 1, "one answer: {sent:?}");
        sent.remove(0)
    }

    /// Reports the oldest write waited for as durable (as message `id`, for an uplink); returns
    /// what it held and what the endpoint sends now.
    fn commit(&mut self, id: u64) -> (Writes, Vec<Message<'static>>) {
        let (ticket, writes) = self.waiting.remove(0);
        let mut out = Actions::default();
        self.ep.handle_committed(self.now(), ticket, Ok(Some(StoredId(id))), &mut out);
        (writes, self.take(out))
    }

    /// Lets `d` pass and runs the endpoint's timers.
    fn wait(&mut self, d: Duration) -> Vec<Message<'static>> {
        self.elapsed += d;
        let mut out = Actions::default();
        self.ep.handle_timeout(self.now(), &mut out);
        self.take(out)
    }

    /// What the services recorded without anyone waiting (command states, upgrade steps).
    fn recorded(&self) -> Vec<Op> {
        self.recorder.take().into_iter().flatten().collect()
    }

    /// A command queued for the device, as if created over the admin API.
    fn queue_command(&self, payload: &[u8]) -> CommandId {
        let device = self.device();
        let now = self.now().wall;
        let new = NewRecord {
            payload: payload.to_vec(),
            topic: format!("/{PK}/{DN}/user/get"),
            strategy: SendStrategy::Delay,
            created_at: now.0,
            expires_at: now.plus_secs(3600).0,
        };
        let record = CommandRecord::pending(self.services.commands.new_id(), device.key(), new);
        let id = record.id;
        let s = device.state();
        self.services.commands.adopt(device.id, &s, vec![record], now);
        id
    }
}

fn parsed(data: Vec<u8>) -> Message<'static> {
    Message::parse(Box::leak(data.into_boxed_slice())).expect("the endpoint sends well-formed messages")
}

fn json_of(m: &Message<'_>) -> Value {
    serde_json::from_slice(m.payload).unwrap_or_else(|e| panic!("JSON expected ({e}): {:?}", m.payload))
}

fn command_states(ops: &[Op]) -> Vec<CommandStatus> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Put { cf: crate::store::CF_COMMANDS, value, .. } => {
                Some(serde_json::from_slice::<CommandRecord>(value).unwrap().status)
            }
            _ => None,
        })
        .collect()
}

/// A signed request to `path` with `fields` (JSON), signed by `secret` over `content`.
fn signed(path: &[&str], mut fields: Value, secret: &str, content: String, mid: u16) -> Vec<u8> {
    fields["sign"] = json!(SignMethod::HmacSha256.sign_hex(secret.as_bytes(), content.as_bytes()));
    let mut b = MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes());
    for p in path {
        b = b.option(OptionNumber::URI_PATH, p.as_bytes());
    }
    b.uint_option(OptionNumber::CONTENT_FORMAT, 50).payload(fields.to_string().as_bytes()).build()
}

/// `/auth` on `bed`: the session the answer hands out, once its writes are durable.
fn authenticate(bed: &mut Bed, mid: u16) -> AlibabaSession {
    assert!(bed.send(&alibaba_auth(PK, DN, SECRET, mid)).is_empty(), "no answer before the session is durable");
    let (writes, sent) = bed.commit(0);
    assert!(writes.iter().any(|op| matches!(op, Op::Put { cf: crate::store::CF_SESSIONS, .. })), "{writes:?}");
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].mtype, sent[0].code, sent[0].mid), (MessageType::Ack, Code::CONTENT, mid));
    AlibabaSession::from_answer(sent[0].payload, SECRET).expect("a session in the answer")
}

#[test]
fn auth_hands_out_a_session_once_it_is_durable_and_refuses_a_bad_signature() {
    let mut bed = Bed::new(PortFamily::Plain);
    let session = authenticate(&mut bed, 1);
    assert_eq!(session.token.len(), 32);
    assert!(session.key.is_none(), "no key on the plain port");
    let forged = alibaba_auth(PK, DN, "not-the-secret", 2);
    assert_eq!(bed.answer(&forged).code, Code::UNAUTHORIZED);
    assert_eq!(bed.answer(&alibaba_auth(PK, "nobody", SECRET, 3)).code, Code::UNAUTHORIZED);
    assert!(bed.waiting.is_empty(), "a refusal writes nothing");
    // The session counts as the device's contact.
    assert!(bed.device().state().last_seen.is_some());
}

#[test]
fn topic_uplinks_are_answered_with_their_message_id_once_stored() {
    let mut bed = Bed::new(PortFamily::Plain);
    let mut session = authenticate(&mut bed, 1);
    assert!(bed.send(&session.uplink(PK, DN, 2, br#"{"t":21}"#)).is_empty());
    let (writes, sent) = bed.commit(4242);
    let stored = writes.iter().find_map(|op| match op {
        Op::Uplink { topic, payload, .. } => Some((topic.to_string(), payload.clone())),
        _ => None,
    });
    assert_eq!(stored, Some((format!("/{PK}/{DN}/update"), br#"{"t":21}"#.to_vec())));
    assert_eq!((sent[0].code, sent[0].mid), (Code::CHANGED, 2));
    assert_eq!(sent[0].option(OptionNumber::ALI_MESSAGE_ID), Some(&b"4242"[..]));
    // A retransmission gets the same answer without a second write.
    let again = bed.answer(&session.uplink(PK, DN, 2, br#"{"t":21}"#));
    assert_eq!(again.code, Code::CHANGED);
    assert!(bed.waiting.is_empty());
    // Another device's topic, and an unknown token, change nothing.
    let foreign = MessageBuilder::new(MessageType::Con, Code::POST, 3, &[3])
        .option(OptionNumber::URI_PATH, b"topic")
        .option(OptionNumber::URI_PATH, PK.as_bytes())
        .option(OptionNumber::URI_PATH, b"other")
        .option(OptionNumber::URI_PATH, b"update")
        .option(OptionNumber::ALI_TOKEN, session.token.as_bytes())
        .payload(b"x")
        .build();
    assert_eq!(bed.answer(&foreign).code, Code::FORBIDDEN);
    session.token = "0".repeat(32);
    assert_eq!(bed.answer(&session.uplink(PK, DN, 4, b"x")).code, Code::UNAUTHORIZED);
    assert!(bed.waiting.is_empty());
}

#[test]
fn on_5682_a_replayed_seq_is_refused_and_a_write_failure_frees_it() {
    let mut bed = Bed::new(PortFamily::Aes);
    let mut session = authenticate(&mut bed, 1);
    assert!(session.key.is_some(), "a session key on 5682");
    let first = session.uplink(PK, DN, 2, b"secret data");
    assert!(bed.send(&first).is_empty());
    let (writes, sent) = bed.commit(1);
    assert!(writes.iter().any(|op| matches!(op, Op::SeenSeq { .. })), "the seq is stored with the uplink");
    assert_eq!(sent[0].code, Code::CHANGED);
    // The same seq in a new message: a replay.
    session.seq -= 1;
    assert_ne!(bed.answer(&session.uplink(PK, DN, 3, b"replayed")).code.class(), 2);
    // A write that fails unmarks the seq: the device may send it again.
    assert!(bed.send(&session.uplink(PK, DN, 4, b"lost")).is_empty());
    let (ticket, _) = bed.waiting.remove(0);
    let mut out = Actions::default();
    let failed = crate::coap::resource::WriteFailed { retry_after_s: None };
    bed.ep.handle_committed(bed.now(), ticket, Err(failed), &mut out);
    assert_eq!(bed.take(out)[0].code, Code::INTERNAL_SERVER_ERROR);
    session.seq -= 1;
    assert!(bed.send(&session.uplink(PK, DN, 5, b"again")).is_empty(), "the freed seq is accepted");
    let (writes, _) = bed.commit(2);
    let payload = writes.iter().find_map(|op| match op {
        Op::Uplink { payload, .. } => Some(payload.clone()),
        _ => None,
    });
    assert_eq!(payload.as_deref(), Some(&b"again"[..]), "stored decrypted");
}

#[test]
fn pull_hands_out_queued_commands_and_their_ack_delivers_them() {
    let mut bed = Bed::new(PortFamily::Plain);
    let session = authenticate(&mut bed, 1);
    let id = bed.queue_command(b"open valve");
    bed.recorded();
    let pull = MessageBuilder::new(MessageType::Con, Code::POST, 2, &[2])
        .option(OptionNumber::URI_PATH, b"pull")
        .option(OptionNumber::ALI_TOKEN, session.token.as_bytes())
        .build();
    // The request is acknowledged at once; the answer (a CON of its own) waits for SENT.
    let ack = bed.answer(&pull);
    assert_eq!((ack.mtype, ack.code), (MessageType::Ack, Code::EMPTY));
    let (writes, sent) = bed.commit(0);
    assert_eq!(command_states(&writes), [CommandStatus::Sent]);
    assert_eq!((sent[0].mtype, sent[0].code), (MessageType::Con, Code::CONTENT));
    let body = json_of(&sent[0]);
    assert_eq!(body["messages"][0]["id"], id.to_string());
    assert_eq!(body["messages"][0]["payload"], "b3BlbiB2YWx2ZQ==");
    let ack = MessageBuilder::new(MessageType::Ack, Code::EMPTY, sent[0].mid, &[]).build();
    assert!(bed.send(&ack).is_empty());
    assert_eq!(command_states(&bed.recorded()), [CommandStatus::Delivered]);
}

#[test]
fn registration_hands_out_the_device_secret_once() {
    let mut bed = Bed::new(PortFamily::Plain);
    let fields = json!({"productKey": PK, "deviceName": DN, "random": "r4nd", "signMethod": "hmacsha256"});
    let request = |mid| {
        signed(&["auth", "register", "device"], fields.clone(), PRODUCT_SECRET, register_content(PK, DN, "r4nd"), mid)
    };
    assert!(bed.send(&request(1)).is_empty());
    let (writes, sent) = bed.commit(0);
    assert!(writes.iter().any(|op| matches!(op, Op::PutDevice(_))));
    assert_eq!(sent[0].code, Code::CONTENT);
    assert_eq!(json_of(&sent[0])["deviceSecret"], SECRET, "{}", json_of(&sent[0]));
    assert_eq!(bed.answer(&request(2)).code, Code::FORBIDDEN, "registered already");
    let forged = signed(&["auth", "register", "device"], fields.clone(), "wrong", register_content(PK, DN, "r4nd"), 3);
    assert_eq!(bed.answer(&forged).code, Code::UNAUTHORIZED);
}

#[test]
fn bootstrap_names_this_instance_to_a_signed_request_only() {
    let mut bed = Bed::new(PortFamily::Plain);
    let fields =
        json!({"productKey": PK, "deviceName": DN, "clientId": format!("{PK}&{DN}"), "signmethod": "hmacsha256"});
    let content = |f: &Value| {
        let pairs: Vec<(String, String)> =
            f.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        auth_content(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    };
    let good = signed(&["bootstrap"], fields.clone(), SECRET, content(&fields), 1);
    let m = bed.answer(&good);
    assert_eq!(m.code, Code::CONTENT, "{:?}", String::from_utf8_lossy(m.payload));
    assert_eq!(json_of(&m)["resources"]["coap"], json!({"host": "192.0.2.1", "port": 5683}));
    assert!(bed.waiting.is_empty(), "a bootstrap reads only");
    let forged = signed(&["bootstrap"], fields.clone(), "wrong", content(&fields), 2);
    assert_eq!(bed.answer(&forged).code, Code::UNAUTHORIZED);
}

/// Binds the Huawei device and answers the server's observe request; its token.
fn bind(bed: &mut Bed) -> Vec<u8> {
    let bind = MessageBuilder::new(MessageType::Con, Code::POST, 1, &[1])
        .option(OptionNumber::URI_PATH, b"t")
        .option(OptionNumber::URI_PATH, b"r")
        .option(OptionNumber::URI_QUERY, format!("ep={NODE}").as_bytes())
        .build();
    assert!(bed.send(&bind).is_empty(), "answered in order after the writes before it");
    let (writes, sent) = bed.commit(0);
    assert!(writes.is_empty(), "a bind alone stores nothing");
    assert_eq!(sent[0].code, Code::CHANGED);
    let get = sent.iter().find(|m| m.code == Code::GET).expect("the observe request").clone();
    let path: Vec<&[u8]> = get.options_of(OptionNumber::URI_PATH).collect();
    assert_eq!(path, [b"t", b"d"]);
    assert!(bed.device().state().last_seen.is_none(), "a bind alone is no contact: it may be spoofed");
    let ack = MessageBuilder::new(MessageType::Ack, Code::CONTENT, get.mid, get.token).build();
    assert!(bed.send(&ack).is_empty());
    let presence = bed.detached.iter().flatten().any(|op| matches!(op, Op::Presence { .. }));
    assert!(presence, "the answered observe request is contact, stored");
    get.token.to_vec()
}

fn notification(token: &[u8], mid: u16, observe: u8, payload: &[u8]) -> Vec<u8> {
    MessageBuilder::new(MessageType::Con, Code::CONTENT, mid, token)
        .option(OptionNumber::OBSERVE, &[observe])
        .payload(payload)
        .build()
}

#[test]
fn a_huawei_bind_then_reports_are_stored_under_the_observe_token() {
    let mut bed = Bed::new(PortFamily::Plain);
    let token = bind(&mut bed);
    assert!(bed.send(&notification(&token, 2, 1, b"\x01\x02")).is_empty());
    let (writes, sent) = bed.commit(9);
    assert!(writes.iter().any(|op| matches!(op, Op::Uplink { topic, .. } if &**topic == "/t/d")));
    assert_eq!((sent[0].mtype, sent[0].mid), (MessageType::Ack, 2));
    // An unknown token is reset; a stale copy from elsewhere changes nothing.
    let rst = bed.answer(&notification(b"12345678", 3, 2, b"x"));
    assert_eq!(rst.mtype, MessageType::Rst);
    bed.peer = "198.51.100.1:1".parse().unwrap();
    let stale = bed.answer(&notification(&token, 4, 1, b"replayed"));
    assert_eq!((stale.mtype, stale.code), (MessageType::Ack, Code::EMPTY));
    assert!(bed.waiting.is_empty());
}

#[test]
fn a_queued_command_goes_down_after_a_report_and_its_answer_settles_it() {
    let mut bed = Bed::new(PortFamily::Plain);
    let token = bind(&mut bed);
    let id = bed.queue_command(b"\x09");
    bed.recorded();
    let sent = bed.send(&notification(&token, 2, 1, b"report"));
    let post = sent.iter().find(|m| m.code == Code::POST).expect("the command, at once");
    assert_eq!((post.mtype, post.payload, post.token), (MessageType::Con, &b"\x09"[..], &token[..]));
    assert_eq!(command_states(&bed.recorded()), [CommandStatus::Sent]);
    let answer = MessageBuilder::new(MessageType::Ack, Code::CHANGED, post.mid, post.token).payload(b"ok").build();
    bed.send(&answer);
    assert_eq!(command_states(&bed.recorded()), [CommandStatus::Successful]);
    let live = bed.services.commands.open(DeviceId(1), &bed.device().state());
    assert!(live.iter().all(|c| c.id != id), "settled commands leave the queue");
}

#[test]
fn an_unanswered_command_times_out_after_its_retransmissions() {
    let mut bed = Bed::new(PortFamily::Plain);
    let token = bind(&mut bed);
    bed.queue_command(b"\x0a");
    let sent = bed.send(&notification(&token, 2, 1, b"report"));
    assert!(sent.iter().any(|m| m.code == Code::POST));
    bed.recorded();
    let mut resent = 0;
    for _ in 0..40 {
        resent += bed.wait(Duration::from_secs(10)).iter().filter(|m| m.code == Code::POST).count();
    }
    assert_eq!(resent, bed.services.registry.config.downlink.max_retransmit as usize);
    assert_eq!(command_states(&bed.recorded()), [CommandStatus::Timeout]);
}

#[test]
fn a_pcp_version_answer_without_a_task_only_records_the_version() {
    let mut bed = Bed::new(PortFamily::Plain);
    let token = bind(&mut bed);
    let frame = FromDevice::Version { result: ResultCode::OK, version: Version::new("V1.0").unwrap() }.encode();
    let sent = bed.send(&notification(&token, 2, 1, &frame));
    assert!(sent.is_empty(), "answered once stored");
    let (writes, sent) = bed.commit(0);
    assert!(!writes.iter().any(|op| matches!(op, Op::Uplink { .. })), "PCP is not business data");
    assert!(writes.iter().any(|op| matches!(op, Op::PutDevice(_))));
    assert_eq!(sent[0].mtype, MessageType::Ack);
    assert_eq!(bed.device().state().version.as_deref(), Some("V1.0"));
    // A request for a chunk without an upgrade is answered as PCP says.
    let ask = FromDevice::ChunkRequest { version: Version::new("V2.0").unwrap(), chunk: 0 }.encode();
    bed.send(&notification(&token, 3, 2, &ask));
    let (_, sent) = bed.commit(0);
    let down = sent.iter().find(|m| m.code == Code::POST).expect("the answer goes down /t/d");
    let no_task = FromPlatform::Chunk { result: ResultCode::NO_TASK, chunk: 0, data: Vec::new() };
    assert_eq!(FromPlatform::parse(down.payload).unwrap(), no_task);
}

/// The registration a device record among `ops` stores.
fn stored_registration(ops: &[Op]) -> Option<crate::store::records::Registration> {
    ops.iter().find_map(|op| match op {
        Op::PutDevice(d) => d.current().and_then(|r| r.registration),
        _ => None,
    })
}

/// `POST /rd` as agent_tiny sends it, from the device's node id.
fn register(mid: u16, query: &[&str], links: &[u8]) -> Vec<u8> {
    let mut b = MessageBuilder::new(MessageType::Con, Code::POST, mid, &[0xd0, 1, 2, 3])
        .option(OptionNumber::URI_PATH, b"rd")
        .uint_option(OptionNumber::CONTENT_FORMAT, 40);
    for q in query {
        b = b.option(OptionNumber::URI_QUERY, q.as_bytes());
    }
    b.payload(links).build()
}

const AGENT_LINKS: &[u8] = br#"</>;rt="oma.lwm2m",</1/0>,</2>,</3/0>,</4/0>,</6/0>,</19/0>,</19/1>"#;

/// Registers the device as agent_tiny does and answers the observe request on `/19/0/0` with an
/// empty 2.05; the relation's token.
fn register_lwm2m(bed: &mut Bed) -> Vec<u8> {
    let (token, sent) = register_lwm2m_then(bed);
    assert!(sent.is_empty(), "{sent:?}");
    token
}

/// [`register_lwm2m`], and what the server sends once the registration took effect.
fn register_lwm2m_then(bed: &mut Bed) -> (Vec<u8>, Vec<Message<'static>>) {
    let before = bed.device().state().registration.clone();
    let ep = format!("ep={NODE}");
    let sent = bed.send(&register(1, &["lwm2m=1.0", &ep, "b=UQ", "lt=20"], AGENT_LINKS));
    assert!(sent.is_empty(), "answered in order after the writes before it: {sent:?}");
    let (writes, sent) = bed.commit(0);
    assert!(writes.is_empty(), "a Register alone stores nothing: it proves nothing yet");
    let created = sent.iter().find(|m| m.mtype == MessageType::Ack).expect("the answer");
    assert_eq!(created.code, Code::CREATED);
    let location: Vec<&[u8]> = created.options_of(OptionNumber::LOCATION_PATH).collect();
    assert_eq!(location, [&b"rd"[..], NODE.as_bytes()]);
    let get = sent.iter().find(|m| m.code == Code::GET).expect("the observe request").clone();
    let path: Vec<&[u8]> = get.options_of(OptionNumber::URI_PATH).collect();
    assert_eq!(path, [&b"19"[..], b"0", b"0"]);
    assert_eq!(get.uint_option(OptionNumber::ACCEPT).unwrap(), Some(42));
    assert_eq!(bed.device().state().registration, before, "nothing changes before the device answers");
    let ack = MessageBuilder::new(MessageType::Ack, Code::CONTENT, get.mid, get.token).build();
    let after = bed.send(&ack);
    let r = stored_registration(&bed.recorded()).expect("the registration is stored once the device answered");
    assert_eq!((r.lifetime_s, r.queue, r.version.as_str()), (20, true, "1.0"));
    assert_eq!(r.objects, ["/1/0", "/2", "/3/0", "/4/0", "/6/0", "/19/0", "/19/1"]);
    (get.token.to_vec(), after)
}

#[test]
fn an_lwm2m_client_registers_reports_on_object_19_and_takes_commands_as_writes() {
    let mut bed = Bed::new(PortFamily::Plain);
    let token = register_lwm2m(&mut bed);
    assert!(bed.send(&notification(&token, 2, 1, b"\xca\xfe")).is_empty());
    let (writes, sent) = bed.commit(11);
    let stored = writes.iter().find_map(|op| match op {
        Op::Uplink { topic, payload, .. } => Some((topic.to_string(), payload.clone())),
        _ => None,
    });
    assert_eq!(stored, Some(("/19/0/0".to_string(), b"\xca\xfe".to_vec())));
    assert_eq!(sent[0].mtype, MessageType::Ack);
    bed.queue_command(b"\x01\x02");
    bed.recorded();
    let sent = bed.send(&notification(&token, 3, 2, b"\x00"));
    let put = sent.iter().find(|m| m.code == Code::PUT).expect("the command, as a Write");
    let path: Vec<&[u8]> = put.options_of(OptionNumber::URI_PATH).collect();
    assert_eq!(path, [&b"19"[..], b"1", b"0"]);
    assert_eq!((put.mtype, put.payload), (MessageType::Con, &b"\x01\x02"[..]));
    assert_eq!(put.uint_option(OptionNumber::CONTENT_FORMAT).unwrap(), Some(42));
    let changed = MessageBuilder::new(MessageType::Ack, Code::CHANGED, put.mid, put.token).build();
    bed.send(&changed);
    assert_eq!(command_states(&bed.recorded()), [CommandStatus::Sent, CommandStatus::Delivered]);
    // A Write the client refuses fails its command, and the next one may go.
    bed.queue_command(b"\x03");
    bed.queue_command(b"\x04");
    bed.recorded();
    let sent = bed.send(&notification(&token, 4, 3, b"\x00"));
    let put = sent.iter().find(|m| m.code == Code::PUT).expect("the next command");
    let refused = MessageBuilder::new(MessageType::Ack, Code::METHOD_NOT_ALLOWED, put.mid, put.token).build();
    let sent = bed.send(&refused);
    assert_eq!(sent.iter().find(|m| m.code == Code::PUT).map(|m| m.payload), Some(&b"\x04"[..]));
    assert_eq!(command_states(&bed.recorded()), [CommandStatus::Sent, CommandStatus::Failed, CommandStatus::Sent]);
}

#[test]
fn update_and_deregister_name_the_registration_and_bad_requests_change_nothing() {
    let mut bed = Bed::new(PortFamily::Plain);
    register_lwm2m(&mut bed);
    // Bad input: each answered as LwM2M says, nothing written.
    let ep = format!("ep={NODE}");
    assert_eq!(bed.answer(&register(2, &["lt=20"], b"")).code, Code::BAD_REQUEST, "no endpoint");
    assert_eq!(bed.answer(&register(3, &["ep=999"], b"")).code, Code::FORBIDDEN, "unknown endpoint");
    assert_eq!(bed.answer(&register(4, &[&ep], b"</3/0")).code, Code::BAD_REQUEST, "malformed links");
    assert_eq!(bed.answer(&at(&["rd", "999"], Code::POST, 5, &[])).code, Code::NOT_FOUND, "unknown location");
    assert_eq!(bed.answer(&at(&["rd", NODE], Code::POST, 6, &["lt=x"])).code, Code::BAD_REQUEST);
    assert!(bed.waiting.is_empty());
    // Update: the lifetime and queue mode change, stored before 2.04.
    assert!(bed.send(&at(&["rd", NODE], Code::POST, 7, &["lt=300", "b=U"])).is_empty());
    let (writes, sent) = bed.commit(0);
    assert_eq!(sent[0].code, Code::CHANGED);
    assert_eq!(stored_registration(&writes).map(|r| (r.lifetime_s, r.queue)), Some((300, false)));
    // Deregister ends it and its relation.
    assert!(bed.send(&at(&["rd", NODE], Code::DELETE, 8, &[])).is_empty());
    let (_, sent) = bed.commit(0);
    assert_eq!(sent[0].code, Code::DELETED);
    let device = bed.device();
    let s = device.state();
    assert!(s.registration.is_none() && s.observe.is_none());
    drop(s);
    assert_eq!(bed.answer(&at(&["rd", NODE], Code::POST, 9, &[])).code, Code::NOT_FOUND);
}

#[test]
fn a_registration_past_its_lifetime_ends_with_its_relation() {
    let mut bed = Bed::new(PortFamily::Plain);
    register_lwm2m(&mut bed);
    let registry = &bed.services.registry;
    assert_eq!(registry.expire_registrations(bed.now().wall), 0);
    assert_eq!(registry.expire_registrations(bed.now().wall.plus_secs(21)), 1);
    assert!(bed.device().state().registration.is_none());
    assert!(bed.device().state().observe.is_none());
}

#[test]
fn a_client_that_registers_again_from_a_new_address_is_served_there() {
    let mut bed = Bed::new(PortFamily::Plain);
    let old = register_lwm2m(&mut bed);
    // A NAT rebinding while the device slept: it registers again from elsewhere.
    bed.peer = "198.51.100.9:5000".parse().unwrap();
    let token = register_lwm2m(&mut bed);
    assert_ne!(token, old, "a fresh relation");
    assert_eq!(bed.device().state().address, Some(bed.peer));
    bed.queue_command(b"\x07");
    let mut out = Actions::default();
    bed.ep.handle_kick(bed.now(), DeviceId(1), &mut out);
    let sent: Vec<_> = out.transmits.iter().map(|t| (t.peer, parsed(t.data.to_vec()).code)).collect();
    assert_eq!(sent, [(bed.peer, Code::PUT)], "the command goes to the new address");
    // The old relation no longer names the device.
    let stale = bed.answer(&notification(&old, 40, 9, b"x"));
    assert_eq!(stale.mtype, MessageType::Rst);
}

#[test]
fn pcp_rides_on_object_19_for_an_lwm2m_client() {
    let mut bed = Bed::new(PortFamily::Plain);
    let token = register_lwm2m(&mut bed);
    let ask = FromDevice::ChunkRequest { version: Version::new("V2.0").unwrap(), chunk: 0 }.encode();
    assert!(bed.send(&notification(&token, 2, 1, &ask)).is_empty());
    let (writes, sent) = bed.commit(0);
    assert!(!writes.iter().any(|op| matches!(op, Op::Uplink { .. })), "PCP is not business data");
    let down = sent.iter().find(|m| m.code == Code::PUT).expect("the answer goes down as a Write");
    let path: Vec<&[u8]> = down.options_of(OptionNumber::URI_PATH).collect();
    assert_eq!(path, [&b"19"[..], b"1", b"0"]);
    let no_task = FromPlatform::Chunk { result: ResultCode::NO_TASK, chunk: 0, data: Vec::new() };
    assert_eq!(FromPlatform::parse(down.payload).unwrap(), no_task);
}

/// Reads the resources of one instance's TLV: (id, value) pairs.
fn tlv_resources(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&kind, rest)) = b.split_first() {
        let (id, rest) = match kind & 0x20 {
            0 => (rest[0] as u16, &rest[1..]),
            _ => (u16::from_be_bytes([rest[0], rest[1]]), &rest[2..]),
        };
        let (len, rest) = match (kind >> 3) & 3 {
            0 => ((kind & 7) as usize, rest),
            1 => (rest[0] as usize, &rest[1..]),
            2 => (u16::from_be_bytes([rest[0], rest[1]]) as usize, &rest[2..]),
            _ => (u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize, &rest[3..]),
        };
        out.push((id, rest[..len].to_vec()));
        b = &rest[len..];
    }
    out
}

fn bootstrap_request(mid: u16, ep: &str) -> Vec<u8> {
    MessageBuilder::new(MessageType::Con, Code::POST, mid, &[0xb5])
        .option(OptionNumber::URI_PATH, b"bs")
        .option(OptionNumber::URI_QUERY, format!("ep={ep}").as_bytes())
        .build()
}

#[test]
fn a_bootstrap_provisions_the_client_step_by_step_and_never_sends_a_key_in_clear() {
    let mut bed = Bed::new(PortFamily::Plain);
    assert!(bed.send(&bootstrap_request(1, NODE)).is_empty());
    let (writes, sent) = bed.commit(0);
    assert!(writes.is_empty(), "a bootstrap stores nothing");
    assert_eq!(sent[0].code, Code::CHANGED);
    let mut step = sent.iter().find(|m| m.mtype == MessageType::Con).expect("the first write").clone();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let path: Vec<String> =
            step.options_of(OptionNumber::URI_PATH).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        seen.push((step.code, path.join("/"), tlv_resources(step.payload)));
        let ack = MessageBuilder::new(MessageType::Ack, Code::CHANGED, step.mid, step.token).build();
        match bed.send(&ack).into_iter().find(|m| m.mtype == MessageType::Con) {
            Some(next) => step = next,
            None => break,
        }
    }
    let steps: Vec<(Code, &str)> = seen.iter().map(|(c, p, _)| (*c, p.as_str())).collect();
    assert_eq!(steps, [(Code::DELETE, ""), (Code::PUT, "0/1"), (Code::PUT, "1/0"), (Code::POST, "bs")]);
    let security: std::collections::HashMap<u16, Vec<u8>> = seen[1].2.iter().cloned().collect();
    assert_eq!(security[&0], b"coap://192.0.2.1:5683", "its home, plain: it has no PSK");
    assert_eq!(
        (security[&1].as_slice(), security[&2].as_slice(), security[&5].as_slice()),
        (&[0][..], &[3][..], &[][..])
    );
    let server: std::collections::HashMap<u16, Vec<u8>> = seen[2].2.iter().cloned().collect();
    assert_eq!((server[&0].as_slice(), server[&7].as_slice()), (&[1][..], &b"U"[..]));

    // A device with a PSK: refused in clear, provisioned with its key inside its own session.
    let keyed = DeviceRecord {
        id: DeviceId(2),
        device_name: DeviceName::new("keyed").unwrap(),
        node_id: Some(NodeId::new("861111111111111").unwrap()),
        psk_hex: Some(hex::encode(b"the-psk")),
        ..bed.device().record_with(&bed.device().state())
    };
    bed.services.registry.insert(&Arc::new(Device::from_record(keyed, None, None))).unwrap();
    assert_eq!(bed.answer(&bootstrap_request(2, "861111111111111")).code, Code::FORBIDDEN);
    assert!(bed.waiting.is_empty());
    let mut out = Actions::default();
    bed.ep.handle_datagram(bed.now(), bed.peer, Some(DeviceId(2)), &bootstrap_request(3, "861111111111111"), &mut out);
    bed.take(out);
    let (_, sent) = bed.commit(0);
    let delete = sent.iter().find(|m| m.code == Code::DELETE).expect("the first write").clone();
    let mut out = Actions::default();
    let ack = MessageBuilder::new(MessageType::Ack, Code::DELETED, delete.mid, delete.token).build();
    bed.ep.handle_datagram(bed.now(), bed.peer, Some(DeviceId(2)), &ack, &mut out);
    let put = bed.take(out).into_iter().find(|m| m.code == Code::PUT).expect("the Security instance");
    let security: std::collections::HashMap<u16, Vec<u8>> = tlv_resources(put.payload).into_iter().collect();
    assert_eq!(security[&0], b"coaps://192.0.2.1:5684");
    assert_eq!(
        (security[&2].as_slice(), security[&3].as_slice(), security[&5].as_slice()),
        (&[0][..], &b"861111111111111"[..], &b"the-psk"[..])
    );
    // Another device's endpoint inside this session is refused.
    let mut out = Actions::default();
    bed.ep.handle_datagram(bed.now(), bed.peer, Some(DeviceId(2)), &bootstrap_request(4, NODE), &mut out);
    assert_eq!(bed.take(out)[0].code, Code::FORBIDDEN);
}

fn at(path: &[&str], code: Code, mid: u16, query: &[&str]) -> Vec<u8> {
    let mut b = MessageBuilder::new(MessageType::Con, code, mid, &[9]);
    for p in path {
        b = b.option(OptionNumber::URI_PATH, p.as_bytes());
    }
    for q in query {
        b = b.option(OptionNumber::URI_QUERY, q.as_bytes());
    }
    b.build()
}

#[test]
fn only_the_device_changes_its_registration_and_an_update_delivers_what_waits() {
    let mut bed = Bed::new(PortFamily::Plain);
    register_lwm2m(&mut bed);
    let device_at = bed.peer;
    // A stranger knowing the node id: a Deregister is refused, an Update changes nothing.
    bed.peer = "203.0.113.66:9999".parse().unwrap();
    assert_eq!(bed.answer(&at(&["rd", NODE], Code::DELETE, 20, &[])).code, Code::FORBIDDEN);
    assert!(bed.send(&at(&["rd", NODE], Code::POST, 21, &["lt=1"])).is_empty());
    let (writes, sent) = bed.commit(0);
    assert!(writes.is_empty(), "nothing stored from an unproven address");
    assert_eq!(sent[0].code, Code::CHANGED);
    let get = sent.iter().find(|m| m.code == Code::GET).expect("an observe request to that address").clone();
    let s = bed.device();
    assert_eq!(s.state().registration.as_ref().map(|r| r.lifetime_s), Some(20), "unchanged");
    assert_eq!(s.state().address, Some(device_at), "the downlink stays");
    // Were it the device (moved by a NAT), its answer there makes the update and address count.
    let ack = MessageBuilder::new(MessageType::Ack, Code::CONTENT, get.mid, get.token).build();
    bed.send(&ack);
    assert_eq!(s.state().registration.as_ref().map(|r| r.lifetime_s), Some(1));
    assert_eq!(s.state().address, Some(bed.peer));

    // An Update from the relation's address opens the window: what waits goes at once.
    bed.queue_command(b"\x05");
    let sent = bed.send(&at(&["rd", NODE], Code::POST, 22, &["lt=600"]));
    let put = sent.iter().find(|m| m.code == Code::PUT).expect("the waiting command");
    assert_eq!(put.payload, b"\x05");
    let (writes, sent) = bed.commit(0);
    assert!(writes.iter().any(|op| matches!(op, Op::PutDevice(_))));
    assert_eq!(sent[0].code, Code::CHANGED);
    assert_eq!(s.state().registration.as_ref().map(|r| r.lifetime_s), Some(600));
}

mod firmware;

//! UDP fuzz suite: sends generated and mutated datagrams to every CoAP port of a running nbhub
//! (random bytes, CoAP with corrupted fields and every option encoding, truncations, huge and
//! empty payloads, unknown critical options, `/auth` and `/topic` with one field wrong, broken AES
//! padding and seqs, PCP frames with wrong checksums and lengths, DTLS records and handshakes out
//! of order) from many source ports, interleaved with legitimate devices on 5683, 5682 and 5684.
//! Then checks that the legitimate devices were served and everything they were told was stored
//! is, that nothing was stored for a device the fuzzer never authenticated as, that the server is
//! alive and its memory bounded, and that no fuzzing address got back more bytes than it sent.
//! Every run has a seed; the same seed replays the same datagrams.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::client::{AdminArgs, AdminClient};
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::dtls::client::DtlsClient;
use nbhub::ota::pcp::{FromDevice, ResultCode, Version};
use nbhub::simulate::{AlibabaSession, alibaba_auth};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "nbhub-fuzz", about = "Fuzz a running nbhub over UDP and check it kept its promises")]
struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(long, default_value = "127.0.0.1:5683")]
    coap: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:5682")]
    aes: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:5684")]
    dtls: SocketAddr,
    /// Replays a run; a random one is picked (and printed) when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Fuzz datagrams to send in all.
    #[arg(long, default_value_t = 100_000)]
    datagrams: u64,
    /// Source ports the fuzz datagrams come from.
    #[arg(long, default_value_t = 32)]
    sources: usize,
    /// Milliseconds between rounds of legitimate traffic (within the devices' flow control, 5/s).
    #[arg(long, default_value_t = 250)]
    legit_every_ms: u64,
    /// The server's resident memory must stay below this.
    #[arg(long, default_value_t = 1024)]
    max_rss_mb: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Port {
    Coap,
    Aes,
    Dtls,
}

/// What the fuzzer knows about the server's products and devices.
struct Target {
    pk: String,
    /// A device whose credentials the fuzzer never uses: nothing may be stored for it.
    victim: String,
    victim_node: String,
    /// Well-formed requests to mutate.
    corpus: Vec<Vec<u8>>,
}

/// A fuzzing source port and what crossed it.
struct Source {
    socket: UdpSocket,
    sent: u64,
    received: u64,
}

fn main() {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("nbhub-fuzz: seed {seed}");
    let admin = args.admin.connect().unwrap_or_else(|e| fail(e));
    let report = run(&args, &admin, seed).unwrap_or_else(|e| fail(e));
    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    if report["failures"].as_array().is_some_and(|f| !f.is_empty()) {
        std::process::exit(1);
    }
}

fn run(args: &Args, admin: &AdminClient, seed: u64) -> Result<Value, Box<dyn std::error::Error>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let product = admin.post("/api/v1/products", &json!({"name": "nbhub-fuzz"}))?;
    let pk = product["product_key"].as_str().unwrap_or_default().to_string();
    let mut legit = Vec::new();
    for name in ["plain", "aes", "dtls"] {
        let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"device_name": name}))?;
        legit.push((name.to_string(), d["device_secret"].as_str().unwrap_or_default().to_string()));
    }
    let victim_node = format!("{:015}", rng.random_range(100_000_000_000_000u64..999_999_999_999_999));
    let v = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({"node_id": victim_node}))?;
    let victim = v["device_name"].as_str().unwrap_or_default().to_string();
    let target = Target { corpus: corpus(&pk, &victim, &victim_node, &mut rng), pk: pk.clone(), victim, victim_node };

    let mut devices = Legit::start(args, &pk, &legit)?;
    let mut sources: Vec<Source> = (0..args.sources)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.set_nonblocking(true)?;
            Ok(Source { socket, sent: 0, received: 0 })
        })
        .collect::<std::io::Result<_>>()?;
    let mut per_port: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut rss_max = rss(admin);
    let read_before = server_received(admin);
    let started = Instant::now();
    let mut last_round = started;
    let mut buf = vec![0u8; 65536];
    for n in 0..args.datagrams {
        let port = [Port::Coap, Port::Aes, Port::Dtls][rng.random_range(0..3)];
        let (kind, datagram) = generate(port, &target, &mut rng);
        let to = match port {
            Port::Coap => args.coap,
            Port::Aes => args.aes,
            Port::Dtls => args.dtls,
        };
        let source = &mut sources[rng.random_range(0..args.sources)];
        if source.socket.send_to(&datagram, to).is_ok() {
            source.sent += datagram.len() as u64;
            *per_port.entry(format!("{port:?}").to_lowercase()).or_default() += 1;
            *per_kind.entry(kind).or_default() += 1;
        }
        if n % 64 == 63 {
            drain(&mut sources, &mut buf);
            if last_round.elapsed() >= Duration::from_millis(args.legit_every_ms) {
                devices.round();
                last_round = Instant::now();
                rss_max = rss_max.max(rss(admin));
            }
        }
    }
    devices.round();
    std::thread::sleep(Duration::from_millis(500));
    drain(&mut sources, &mut buf);
    let elapsed = started.elapsed().as_secs_f64();
    rss_max = rss_max.max(rss(admin));

    let read: BTreeMap<_, _> =
        server_received(admin).into_iter().map(|(p, n)| (p, n.saturating_sub(read_before[p]))).collect();
    let mut failures: Vec<String> = Vec::new();
    if admin.get("/healthz").is_err() {
        failures.push("the server does not answer /healthz".into());
    }
    let victim_stored = stored(admin, &target.pk, &target.victim)?;
    if victim_stored > 0 {
        failures.push(format!("{victim_stored} messages stored for a device nobody authenticated as"));
    }
    let mut legit_report = BTreeMap::new();
    for d in &devices.devices {
        let n = stored(admin, &pk, &d.name)?;
        if n != d.acknowledged {
            failures.push(format!("device {}: {} acknowledged, {n} stored", d.name, d.acknowledged));
        }
        legit_report.insert(
            d.name.clone(),
            json!({"acknowledged": d.acknowledged, "stored": n, "unanswered": d.unanswered, "refused": d.refused}),
        );
        if d.unanswered > 0 || !d.refused.is_empty() {
            failures.push(format!(
                "device {}: {} requests never answered, refused with {:?}",
                d.name, d.unanswered, d.refused
            ));
        }
    }
    let (sent, received): (u64, u64) = sources.iter().fold((0, 0), |(s, r), x| (s + x.sent, r + x.received));
    let worst = sources.iter().filter(|s| s.sent > 0).map(|s| s.received as f64 / s.sent as f64).fold(0.0f64, f64::max);
    if sources.iter().any(|s| s.received > s.sent) {
        failures.push(format!("a fuzzing address got more bytes back than it sent (worst ratio {worst:.3})"));
    }
    if rss_max > args.max_rss_mb << 20 {
        failures.push(format!("resident memory reached {} MiB", rss_max >> 20));
    }
    Ok(json!({
        "seed": seed,
        "datagrams": per_port.values().sum::<u64>(),
        "datagrams_per_port": per_port,
        "datagrams_per_kind": per_kind,
        "datagrams_read_by_server_per_port": read,
        "seconds": elapsed,
        "fuzz_bytes_sent": sent,
        "bytes_received_by_fuzz_sources": received,
        "worst_amplification_per_source": worst,
        "max_resident_mib": rss_max as f64 / (1 << 20) as f64,
        "legit": legit_report,
        "legit_max_latency_ms": devices.max_latency.as_secs_f64() * 1000.0,
        "victim_messages_stored": victim_stored,
        "failures": failures,
    }))
}

fn drain(sources: &mut [Source], buf: &mut [u8]) {
    for s in sources {
        while let Ok((n, _)) = s.socket.recv_from(buf) {
            s.received += n as u64;
        }
    }
}

/// The server's resident memory.
fn rss(admin: &AdminClient) -> u64 {
    admin.metric("nbhub_process_resident_bytes") as u64
}

/// Datagrams the server read, per port.
fn server_received(admin: &AdminClient) -> BTreeMap<&'static str, u64> {
    ["coap", "aes", "dtls"]
        .into_iter()
        .map(|p| (p, admin.metric(&format!("nbhub_datagrams_received_total{{port=\"{p}\"}}")) as u64))
        .collect()
}

/// How many messages are stored for a device.
fn stored(admin: &AdminClient, pk: &str, dn: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let mut total = 0;
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/products/{pk}/devices/{dn}/messages?limit=1000");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let page = admin.get(&path)?;
        total += page["messages"].as_array().map_or(0, |m| m.len() as u64);
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok(total),
        }
    }
}

/// The legitimate devices: one per port, each sending one CON uplink per round.
struct Legit {
    devices: Vec<LegitDevice>,
    max_latency: Duration,
    pk: String,
}

struct LegitDevice {
    name: String,
    link: Link,
    session: Option<AlibabaSession>,
    mid: u16,
    acknowledged: u64,
    unanswered: u64,
    /// Answers other than 2.04, by code.
    refused: BTreeMap<String, u64>,
}

enum Link {
    Udp(UdpSocket),
    Dtls(Box<DtlsClient>),
}

impl Link {
    fn exchange(&mut self, request: &[u8], mid: u16) -> Option<Vec<u8>> {
        for _ in 0..4 {
            let answer = match self {
                Link::Udp(s) => {
                    s.send(request).ok()?;
                    let mut buf = vec![0u8; 2048];
                    let deadline = Instant::now() + Duration::from_secs(2);
                    loop {
                        let left = deadline.checked_duration_since(Instant::now())?;
                        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
                        match s.recv(&mut buf) {
                            Ok(n) if Message::parse(&buf[..n]).is_ok_and(|m| m.mid == mid) => {
                                break Some(buf[..n].to_vec());
                            }
                            Ok(_) => continue,
                            Err(_) => break None,
                        }
                    }
                }
                Link::Dtls(c) => c.exchange(request, Duration::from_secs(2)),
            };
            if answer.is_some() {
                return answer;
            }
        }
        None
    }
}

impl Legit {
    fn start(args: &Args, pk: &str, devices: &[(String, String)]) -> Result<Legit, Box<dyn std::error::Error>> {
        let mut out = Vec::new();
        for ((name, secret), port) in devices.iter().zip([args.coap, args.aes, args.dtls]) {
            let mid: u16 = rand::random();
            let (link, session) = if port == args.dtls {
                let socket = DtlsClient::bind(port);
                let mut c = DtlsClient::psk(socket, &format!("{pk}&{name}"), secret.as_bytes(), "PSK-AES128-CCM8");
                c.handshake(None, Duration::from_secs(5))?;
                (Link::Dtls(Box::new(c)), None)
            } else {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                s.connect(port)?;
                let mut link = Link::Udp(s);
                let answer = link.exchange(&alibaba_auth(pk, name, secret, mid), mid).ok_or("/auth unanswered")?;
                let m = Message::parse(&answer).map_err(|_| "malformed /auth answer")?;
                let session = AlibabaSession::from_answer(m.payload, secret).ok_or("/auth refused")?;
                (link, Some(session))
            };
            out.push(LegitDevice {
                name: name.clone(),
                link,
                session,
                mid,
                acknowledged: 0,
                unanswered: 0,
                refused: BTreeMap::new(),
            });
        }
        Ok(Legit { devices: out, max_latency: Duration::ZERO, pk: pk.to_string() })
    }

    /// One uplink from each device; only a 2.04 counts as acknowledged (stored).
    fn round(&mut self) {
        for d in &mut self.devices {
            d.mid = d.mid.wrapping_add(1);
            let payload = format!("{{\"reading\": {}}}", d.acknowledged);
            let request = match &mut d.session {
                Some(s) => s.uplink(&self.pk, &d.name, d.mid, payload.as_bytes()),
                // Inside DTLS the session is the identity: no token.
                None => MessageBuilder::new(MessageType::Con, Code::POST, d.mid, &d.mid.to_be_bytes())
                    .option(OptionNumber::URI_PATH, b"topic")
                    .option(OptionNumber::URI_PATH, self.pk.as_bytes())
                    .option(OptionNumber::URI_PATH, d.name.as_bytes())
                    .option(OptionNumber::URI_PATH, b"update")
                    .payload(payload.as_bytes())
                    .build(),
            };
            let sent = Instant::now();
            match d.link.exchange(&request, d.mid).and_then(|a| Message::parse(&a).ok().map(|m| m.code)) {
                Some(Code::CHANGED) => {
                    d.acknowledged += 1;
                    self.max_latency = self.max_latency.max(sent.elapsed());
                }
                Some(code) => *d.refused.entry(code.to_string()).or_default() += 1,
                None => d.unanswered += 1,
            }
        }
    }
}

/// Well-formed requests naming the victim (never with its credentials), to mutate and truncate.
fn corpus(pk: &str, victim: &str, node: &str, rng: &mut StdRng) -> Vec<Vec<u8>> {
    let token: String = (0..32).map(|_| char::from(b'a' + rng.random_range(0..26))).collect();
    let mut topic = AlibabaSession { token: token.clone(), key: None, seq: 0 };
    let mut out = vec![
        alibaba_auth(pk, victim, "not-the-secret", rng.random()),
        topic.uplink(pk, victim, rng.random(), br#"{"temperature": 21}"#),
        MessageBuilder::new(MessageType::Con, Code::POST, rng.random(), &[1, 2])
            .option(OptionNumber::URI_PATH, b"pull")
            .option(OptionNumber::ALI_TOKEN, token.as_bytes())
            .build(),
        MessageBuilder::new(MessageType::Con, Code::POST, rng.random(), &[3])
            .option(OptionNumber::URI_PATH, b"t")
            .option(OptionNumber::URI_PATH, b"r")
            .option(OptionNumber::URI_QUERY, format!("ep={node}").as_bytes())
            .build(),
        MessageBuilder::new(MessageType::Non, Code::CONTENT, rng.random(), &rng.random::<[u8; 8]>())
            .option(OptionNumber::OBSERVE, &[7])
            .payload(&FromDevice::ChunkRequest { version: Version::new("V1").expect("valid"), chunk: 3 }.encode())
            .build(),
    ];
    let key = nbhub::auth::cipher::SessionKey::derive("not-the-secret", "0123456789abcdef");
    let mut aes = AlibabaSession { token, key: Some(key), seq: 100 };
    out.push(aes.uplink(pk, victim, rng.random(), b"encrypted under a key nobody shares"));
    out
}

/// One fuzz datagram for `port` and the name of the generator that made it.
fn generate(port: Port, t: &Target, rng: &mut StdRng) -> (&'static str, Vec<u8>) {
    if port == Port::Dtls && rng.random_bool(0.6) {
        return ("dtls_record", dtls_record(rng));
    }
    match rng.random_range(0..12) {
        0 => ("random_bytes", random_bytes(rng)),
        1 | 2 => ("coap_random_options", coap_random(rng)),
        3 => {
            let mut d = t.corpus[rng.random_range(0..t.corpus.len())].clone();
            d.truncate(rng.random_range(0..d.len().max(1)));
            ("truncated", d)
        }
        4 | 5 => ("mutated", mutate(t.corpus[rng.random_range(0..t.corpus.len())].clone(), rng)),
        6 => ("payload_extremes", payload_extremes(t, rng)),
        7 => ("unknown_critical_option", unknown_critical(t, rng)),
        8 => ("auth_one_field_wrong", auth_one_field_wrong(t, rng)),
        9 => ("topic_bad_token_or_aes", topic_bad(t, rng)),
        10 => ("pcp_broken", pcp_broken(t, rng)),
        _ => ("huawei_bind_or_notify", huawei(t, rng)),
    }
}

fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..10) {
        0 => 0,
        1..=3 => rng.random_range(1..5),
        4..=7 => rng.random_range(5..64),
        8 => rng.random_range(64..1500),
        _ => rng.random_range(1500..9000),
    };
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// A CoAP header (sometimes with a bad version or token length) and options encoded by hand, so
/// every delta and length nibble appears, including the extended forms and the reserved 15.
fn coap_random(rng: &mut StdRng) -> Vec<u8> {
    let version = if rng.random_bool(0.9) { 1 } else { rng.random_range(0..4) };
    let tkl = if rng.random_bool(0.9) { rng.random_range(0..=8) } else { rng.random_range(9..16) };
    let mut v = vec![(version << 6) | (rng.random_range(0..4) << 4) | tkl, rng.random(), rng.random(), rng.random()];
    for _ in 0..tkl.min(8) {
        v.push(rng.random());
    }
    for _ in 0..rng.random_range(0..8) {
        let delta: u32 = match rng.random_range(0..4) {
            0 => rng.random_range(0..13),
            1 => rng.random_range(13..269),
            2 => rng.random_range(269..65_804),
            _ => [1, 3, 4, 6, 7, 11, 12, 14, 15, 17, 35, 39, 60, 61, 2088, 2089][rng.random_range(0..16)],
        };
        let len: usize = match rng.random_range(0..5) {
            0 => 0,
            1 | 2 => rng.random_range(1..13),
            3 => rng.random_range(13..269),
            _ => rng.random_range(269..1200),
        };
        let nibble = |x: u32| match x {
            0..=12 => (x as u8, Vec::new()),
            13..=268 => (13, vec![(x - 13) as u8]),
            _ => (14, ((x - 269).min(65_535) as u16).to_be_bytes().to_vec()),
        };
        let (dn, dext) = nibble(delta);
        let (ln, lext) = nibble(len as u32);
        // Now and then the reserved nibble 15, which is a format error unless it is the marker.
        let dn = if rng.random_bool(0.03) { 15 } else { dn };
        v.push((dn << 4) | ln);
        v.extend(dext);
        v.extend(lext);
        let mut value = vec![0u8; len];
        rng.fill_bytes(&mut value);
        v.extend(value);
    }
    if rng.random_bool(0.5) {
        v.push(0xFF);
        // Sometimes the marker with nothing after it (a format error).
        let mut p = vec![0u8; rng.random_range(0..200)];
        rng.fill_bytes(&mut p);
        v.extend(p);
    }
    v
}

fn mutate(mut d: Vec<u8>, rng: &mut StdRng) -> Vec<u8> {
    for _ in 0..rng.random_range(1..6) {
        if d.is_empty() {
            d.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..d.len());
        match rng.random_range(0..4) {
            0 => d[at] ^= 1 << rng.random_range(0..8),
            1 => d[at] = rng.random(),
            2 => d.insert(at, rng.random()),
            _ => {
                d.remove(at);
            }
        }
    }
    d
}

fn payload_extremes(t: &Target, rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..4) {
        0 => 0,
        1 => rng.random_range(1000..1200),
        2 => rng.random_range(1200..9000),
        _ => rng.random_range(9000..60_000),
    };
    let mut payload = vec![0u8; len];
    rng.fill_bytes(&mut payload);
    let mut s = AlibabaSession { token: "x".repeat(rng.random_range(1..80)), key: None, seq: 0 };
    s.uplink(&t.pk, &t.victim, rng.random(), &payload)
}

fn unknown_critical(t: &Target, rng: &mut StdRng) -> Vec<u8> {
    // Odd numbers are critical; these are none that nbhub knows.
    let number = [9u16, 13, 19, 21, 25, 41, 2049, 2091, 65_001][rng.random_range(0..9)];
    let mtype = if rng.random_bool(0.5) { MessageType::Con } else { MessageType::Non };
    MessageBuilder::new(mtype, Code::POST, rng.random(), &[9])
        .option(OptionNumber::URI_PATH, b"topic")
        .option(OptionNumber::URI_PATH, t.pk.as_bytes())
        .option(OptionNumber(number), &rng.random::<[u8; 3]>())
        .payload(b"x")
        .build()
}

fn auth_one_field_wrong(t: &Target, rng: &mut StdRng) -> Vec<u8> {
    let mut body = json!({"productKey": t.pk, "deviceName": t.victim, "clientId": format!("{}&{}", t.pk, t.victim),
        "signmethod": "hmacsha256", "seq": "1", "sign": "00".repeat(32)});
    match rng.random_range(0..7) {
        0 => body["sign"] = json!("zz"),
        1 => body["signmethod"] = json!("rot13"),
        2 => body["productKey"] = json!("x".repeat(rng.random_range(0..300))),
        3 => {
            body.as_object_mut()
                .map(|m| m.remove(["productKey", "deviceName", "sign", "clientId"][rng.random_range(0..4)]));
        }
        4 => body["seq"] = json!(-1),
        5 => body["deviceName"] = json!({"nested": [1, 2, 3]}),
        _ => body["ackMode"] = json!(rng.random::<i64>()),
    }
    let raw = if rng.random_bool(0.15) { b"{\"productKey\": ".to_vec() } else { body.to_string().into_bytes() };
    let cf = [50u32, 60, 0, 42, 11_050][rng.random_range(0..5)];
    MessageBuilder::new(MessageType::Con, Code::POST, rng.random(), &[4])
        .option(OptionNumber::URI_PATH, b"auth")
        .uint_option(OptionNumber::CONTENT_FORMAT, cf)
        .payload(&raw)
        .build()
}

fn topic_bad(t: &Target, rng: &mut StdRng) -> Vec<u8> {
    let token: String = (0..rng.random_range(0..64)).map(|_| char::from(rng.random_range(0x21..0x7f))).collect();
    let mut b = MessageBuilder::new(MessageType::Con, Code::POST, rng.random(), &[5])
        .option(OptionNumber::URI_PATH, b"topic")
        .option(OptionNumber::URI_PATH, t.pk.as_bytes())
        .option(OptionNumber::URI_PATH, t.victim.as_bytes())
        .option(OptionNumber::URI_PATH, b"update")
        .option(OptionNumber::ALI_TOKEN, token.as_bytes());
    // Seq values of every length; ciphertexts with broken padding (not a whole block, or random).
    if rng.random_bool(0.7) {
        let mut seq = vec![0u8; [0usize, 1, 15, 16, 17, 32][rng.random_range(0..6)]];
        rng.fill_bytes(&mut seq);
        b = b.option(OptionNumber::ALI_SEQ, &seq);
    }
    let mut body = vec![0u8; [0usize, 1, 15, 16, 31, 32, 48][rng.random_range(0..7)]];
    rng.fill_bytes(&mut body);
    b.payload(&body).build()
}

/// PCP frames with a wrong checksum, length or code, in a `/topic` uplink and a notification.
fn pcp_broken(t: &Target, rng: &mut StdRng) -> Vec<u8> {
    let msg =
        FromDevice::UpgradeResult { result: ResultCode(rng.random()), version: Version::new("V2").expect("valid") };
    let mut frame = msg.encode();
    match rng.random_range(0..4) {
        0 => frame[4] ^= 0xFF,                                      // checksum
        1 => frame[6..8].copy_from_slice(&rng.random::<[u8; 2]>()), // length field
        2 => frame[3] = rng.random_range(0..19),                    // unknown code
        _ => frame.truncate(rng.random_range(0..frame.len())),
    }
    if rng.random_bool(0.5) {
        let mut s = AlibabaSession { token: "no-such-token".into(), key: None, seq: 0 };
        s.uplink(&t.pk, &t.victim, rng.random(), &frame)
    } else {
        MessageBuilder::new(MessageType::Con, Code::CONTENT, rng.random(), &rng.random::<[u8; 4]>())
            .option(OptionNumber::OBSERVE, &[1])
            .payload(&frame)
            .build()
    }
}

fn huawei(t: &Target, rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => MessageBuilder::new(MessageType::Con, Code::POST, rng.random(), &[6])
            .option(OptionNumber::URI_PATH, b"t")
            .option(OptionNumber::URI_PATH, b"r")
            .option(OptionNumber::URI_QUERY, format!("ep={}", rng.random::<u64>()).as_bytes())
            .build(),
        // Posing as the victim: the server may ask it to confirm, never more than it was sent.
        1 => MessageBuilder::new(MessageType::Con, Code::POST, rng.random(), &[7])
            .option(OptionNumber::URI_PATH, b"t")
            .option(OptionNumber::URI_PATH, b"r")
            .option(OptionNumber::URI_QUERY, format!("ep={}", t.victim_node).as_bytes())
            .build(),
        2 => MessageBuilder::new(MessageType::Con, Code::GET, rng.random(), &[8])
            .option(OptionNumber::URI_PATH, b"t")
            .option(OptionNumber::URI_PATH, b"d")
            .build(),
        _ => {
            let mut token = vec![0u8; rng.random_range(0..=8)];
            rng.fill_bytes(&mut token);
            MessageBuilder::new(MessageType::Non, Code::CONTENT, rng.random(), &token)
                .option(OptionNumber::OBSERVE, &[rng.random()])
                .payload(b"not from the device")
                .build()
        }
    }
}

/// A DTLS record: any content type and version, epochs and sequence numbers, lengths that match
/// or not; handshake bodies of every type with fragment fields that lie.
fn dtls_record(rng: &mut StdRng) -> Vec<u8> {
    let content = [20u8, 21, 22, 22, 22, 23, rng.random()][rng.random_range(0..7)];
    let version = [[0xFE, 0xFD], [0xFE, 0xFF], [0x03, 0x03], rng.random()][rng.random_range(0..4)];
    let epoch: u16 = if rng.random_bool(0.8) { rng.random_range(0..2) } else { rng.random() };
    let mut body = Vec::new();
    if content == 22 {
        let msg_type = [1u8, 2, 3, 11, 12, 14, 16, 20, rng.random()][rng.random_range(0..9)];
        let len: u32 = rng.random_range(0..400);
        body.push(msg_type);
        body.extend_from_slice(&len.to_be_bytes()[1..]);
        body.extend_from_slice(&rng.random::<u16>().to_be_bytes()); // message_seq
        let offset: u32 = if rng.random_bool(0.7) { 0 } else { rng.random_range(0..len.max(1) * 2) };
        body.extend_from_slice(&offset.to_be_bytes()[1..]);
        let frag = rng.random_range(0..=len);
        body.extend_from_slice(&frag.to_be_bytes()[1..]);
        if msg_type == 1 && rng.random_bool(0.5) {
            // A ClientHello start: version, random, empty session, maybe a cookie.
            body.extend_from_slice(&[0xFE, 0xFD]);
            body.extend_from_slice(&rng.random::<[u8; 32]>());
            body.push(0);
            let cookie = rng.random_range(0..40);
            body.push(cookie);
            body.extend((0..cookie).map(|_| rng.random::<u8>()));
        }
        let mut rest = vec![0u8; rng.random_range(0..frag as usize + 1)];
        rng.fill_bytes(&mut rest);
        body.extend(rest);
    } else {
        body = random_bytes(rng);
        body.truncate(1400);
    }
    let mut v = vec![content, version[0], version[1]];
    v.extend_from_slice(&epoch.to_be_bytes());
    v.extend_from_slice(&rng.random::<[u8; 6]>()); // sequence number
    let len = if rng.random_bool(0.8) { body.len() as u16 } else { rng.random() };
    v.extend_from_slice(&len.to_be_bytes());
    v.extend(body);
    if rng.random_bool(0.1) {
        // Two records in one datagram.
        let second = v.clone();
        v.extend(second);
    }
    v
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-fuzz: {e}");
    std::process::exit(2);
}

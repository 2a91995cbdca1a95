//! LwM2M registration and reporting benchmark: N simulated clients, each on its own UDP socket,
//! register at once (`POST /rd`, answering the server's observe of `/19/0/0` as agent_tiny does,
//! with an empty 2.05), then each sends `--reports` CON notifications one after another, each
//! retransmitted as a CoAP client does. Reports
//! registrations/s and reports/s with their latency percentiles: a registration from its Register
//! leaving to the server's observe request arriving (the 2.01 comes first), a report until its ACK.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::client::AdminArgs;
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::{OptionNumber, content_format};
use nbhub::simulate::huawei_fleet;
use nbhub::simulate::tally::Latency;
use serde::Serialize;
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::Barrier;

#[derive(Parser, Clone)]
#[command(name = "nbhub-lwm2m-load", about = "LwM2M clients registering and reporting at once")]
struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    /// The server's plain CoAP port.
    #[arg(long, default_value = "127.0.0.1:5683")]
    coap: SocketAddr,
    #[arg(long, default_value_t = 2000)]
    devices: usize,
    /// CON notifications each client sends after registering, one in flight at a time.
    #[arg(long, default_value_t = 20)]
    reports: usize,
    /// Bytes of each report's payload.
    #[arg(long, default_value_t = 32)]
    payload_size: usize,
    /// A request unanswered this long counts as lost.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print the figures as one JSON line.
    #[arg(long)]
    json: bool,
}

/// What one phase gives: how many succeeded, how fast, and their latency.
#[derive(Serialize)]
struct Phase {
    seconds: f64,
    succeeded: usize,
    failed: usize,
    per_second: f64,
    latency_ms: Latency,
}

/// A request's latency and when its answer came.
type Answered = Option<(Duration, Instant)>;

impl Phase {
    /// The rate counts until the last answer: a lost request's timeout is not work.
    fn of(results: Vec<Answered>, began: Instant) -> Phase {
        let latencies: Vec<u32> =
            results.iter().flatten().map(|(d, _)| d.as_micros().min(u32::MAX as u128) as u32).collect();
        let last = results.iter().flatten().map(|(_, at)| *at).max().unwrap_or(began);
        let seconds = last.duration_since(began).as_secs_f64().max(1e-9);
        Phase {
            seconds,
            succeeded: latencies.len(),
            failed: results.len() - latencies.len(),
            per_second: (latencies.len() as f64 / seconds).round(),
            latency_ms: Latency::of(latencies),
        }
    }

    fn print(&self, label: &str) {
        let l = &self.latency_ms;
        println!(
            "{label:<14} {:>8.0}/s  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ok {}  failed {}",
            self.per_second, l.p50, l.p99, l.max, self.succeeded, self.failed
        );
    }
}

fn main() {
    let args = Args::parse();
    let admin = args.admin.connect().unwrap_or_else(|e| fail(e));
    let (pk, nodes) = huawei_fleet(&admin, &json!({"name": "nbhub-lwm2m-load", "awake_window_s": 30}), args.devices)
        .unwrap_or_else(|e| fail(e));
    eprintln!("created {} devices in product {pk}", nodes.len());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let registered = Arc::new(Barrier::new(nodes.len() + 1));
    let report = Arc::new(Barrier::new(nodes.len() + 1));
    let started = Instant::now();
    let tasks: Vec<_> = nodes
        .iter()
        .map(|(node, _)| runtime.spawn(client(node.clone(), args.clone(), registered.clone(), report.clone())))
        .collect();
    runtime.block_on(registered.wait());
    let reporting = Instant::now();
    runtime.block_on(report.wait());
    let mut registrations = Vec::new();
    let mut reports = Vec::new();
    for t in tasks {
        let (r, rs) = runtime.block_on(t).expect("a client task");
        registrations.push(r);
        reports.extend(rs);
    }
    let registrations = Phase::of(registrations, started);
    let reports = Phase::of(reports, reporting);
    if args.json {
        let out = json!({"devices": args.devices, "reports_per_device": args.reports, "registrations": registrations, "reports": reports});
        println!("{out}");
    } else {
        registrations.print("registrations");
        reports.print("reports");
    }
}

/// One client: registers, answers the observe, waits for everyone, reports.
async fn client(node: String, args: Args, registered: Arc<Barrier>, report: Arc<Barrier>) -> (Answered, Vec<Answered>) {
    let timeout = Duration::from_millis(args.timeout_ms);
    let socket = match UdpSocket::bind("127.0.0.1:0").await {
        Ok(s) if s.connect(args.coap).await.is_ok() => Some(s),
        _ => None,
    };
    // A fresh message id, as a client picks at boot; each message after takes the next (an id
    // repeated within EXCHANGE_LIFETIME is ignored as a duplicate, RFC 7252 §4.4).
    let first: u16 = rand::random();
    let registration = match &socket {
        Some(s) => register(s, &node, first, timeout).await,
        None => None,
    };
    registered.wait().await;
    let mut reports = Vec::with_capacity(args.reports);
    match (&socket, &registration) {
        (Some(s), Some((_, _, token))) => {
            let payload = vec![0x5a; args.payload_size];
            for i in 0..args.reports {
                let mid = first.wrapping_add(1 + i as u16);
                let answered = notify(s, token, mid, i as u32, &payload, timeout).await;
                reports.push(answered);
                // A lost report ends this client's run: its timeout is no work of the server's.
                if answered.is_none() {
                    break;
                }
            }
            reports.resize(args.reports, None);
        }
        _ => reports.resize(args.reports, None),
    }
    report.wait().await;
    (registration.map(|(d, at, _)| (d, at)), reports)
}

/// Sends `message` as a CON (RFC 7252 §4.2: again after 2 s, doubling, four times) until `done`
/// accepts a datagram; what it returned and when.
async fn exchange<T>(
    socket: &UdpSocket,
    message: &[u8],
    timeout: Duration,
    mut done: impl FnMut(&Message<'_>) -> Option<Option<T>>,
) -> Option<(T, Instant)> {
    let mut buf = [0u8; 1500];
    let give_up = tokio::time::Instant::now() + timeout;
    let mut wait = Duration::from_secs(2);
    for _ in 0..5 {
        socket.send(message).await.ok()?;
        let deadline = (tokio::time::Instant::now() + wait).min(give_up);
        wait *= 2;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            let Ok(m) = Message::parse(&buf[..n]) else { continue };
            match done(&m) {
                Some(Some(t)) => return Some((t, Instant::now())),
                // A refusal: no point in asking again.
                Some(None) => return None,
                None => {}
            }
        }
    }
    None
}

/// `POST /rd` as agent_tiny sends it; the time until the server's observe request, and its token.
async fn register(socket: &UdpSocket, node: &str, mid: u16, timeout: Duration) -> Option<(Duration, Instant, Vec<u8>)> {
    let request = MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes())
        .option(OptionNumber::URI_PATH, b"rd")
        .uint_option(OptionNumber::CONTENT_FORMAT, content_format::LINK_FORMAT)
        .option(OptionNumber::URI_QUERY, b"lwm2m=1.0")
        .option(OptionNumber::URI_QUERY, format!("ep={node}").as_bytes())
        .option(OptionNumber::URI_QUERY, b"b=UQ")
        .option(OptionNumber::URI_QUERY, b"lt=300")
        .payload(br#"</>;rt="oma.lwm2m",</1/0>,</3/0>,</4/0>,</19/0>,</19/1>"#)
        .build();
    let sent = Instant::now();
    let (token, at) = exchange(socket, &request, timeout, |m| match (m.mtype, m.code) {
        (MessageType::Ack, code) if m.mid == mid && code != Code::CREATED => Some(None),
        (MessageType::Con, Code::GET) => Some(Some((m.mid, m.token.to_vec()))),
        _ => None,
    })
    .await?;
    let (get_mid, token) = token;
    let ack = MessageBuilder::new(MessageType::Ack, Code::CONTENT, get_mid, &token).build();
    socket.send(&ack).await.ok()?;
    Some((at.duration_since(sent), at, token))
}

/// A CON notification of `/19/0/0`; the time until its ACK.
async fn notify(socket: &UdpSocket, token: &[u8], mid: u16, i: u32, payload: &[u8], timeout: Duration) -> Answered {
    let observe = (i + 2).to_be_bytes();
    let message = MessageBuilder::new(MessageType::Con, Code::CONTENT, mid, token)
        .option(OptionNumber::OBSERVE, &observe[1..])
        .uint_option(OptionNumber::CONTENT_FORMAT, content_format::OCTET_STREAM)
        .payload(payload)
        .build();
    let sent = Instant::now();
    let ((), at) =
        exchange(socket, &message, timeout, |m| (m.mtype == MessageType::Ack && m.mid == mid).then_some(Some(())))
            .await?;
    Some((at.duration_since(sent), at))
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-lwm2m-load: {e}");
    std::process::exit(1);
}

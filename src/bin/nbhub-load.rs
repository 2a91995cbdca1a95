//! Load generator: simulates many Alibaba devices that authenticate on 5682 and send encrypted
//! CON uplinks, then reports acknowledged messages per second and latency percentiles.
//!
//! The server's per-device flow control (5/s, 300/min by default) caps what one device may send;
//! to measure the server rather than the limit, run it with higher limits, e.g.
//! `NBHUB_DEVICE_MAX_PER_SECOND=100000 NBHUB_DEVICE_MAX_PER_MINUTE=10000000 nbhub serve`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::client::AdminArgs;
use nbhub::coap::message::{Code, Message};
use nbhub::simulate::{AlibabaSession, alibaba_auth};
use serde_json::json;
use tokio::net::UdpSocket;

#[derive(Parser, Clone)]
#[command(name = "nbhub-load", about = "Simulated NB-IoT devices sending encrypted uplinks to nbhub")]
struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    /// The server's AES port.
    #[arg(long, default_value = "127.0.0.1:5682")]
    aes: SocketAddr,
    #[arg(long, default_value_t = 2000)]
    devices: usize,
    /// Requests in flight per device (each device has its own socket, as real ones do).
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Seconds of sending after all devices have authenticated.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Messages per second over all devices; 0 sends as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 64)]
    payload_size: usize,
    /// A request unanswered this long counts as lost.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

struct SimDevice {
    pk: String,
    dn: String,
    secret: String,
    session: Option<AlibabaSession>,
}

fn main() {
    let args = Args::parse();
    let admin = args.admin.connect().unwrap_or_else(|e| fail(e));
    let setup = Instant::now();
    let fleet = admin.create_fleet("nbhub-load", "load", args.devices).unwrap_or_else(|e| fail(e));
    let pk = fleet.product_key;
    let devices: Vec<SimDevice> =
        fleet.devices.into_iter().map(|(dn, secret)| SimDevice { pk: pk.clone(), dn, secret, session: None }).collect();
    eprintln!("created product {pk} and {} devices in {:.1?}", devices.len(), setup.elapsed());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(run(devices, args));
}

/// Every device authenticates, then all send for `duration` seconds.
async fn run(devices: Vec<SimDevice>, args: Args) {
    let args = Arc::new(args);
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(tokio::sync::Barrier::new(devices.len() + 1));
    let auth_started = Instant::now();
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|d| {
            let (args, stop, ready) = (args.clone(), stop.clone(), ready.clone());
            tokio::spawn(async move { device(d, &args, &stop, &ready).await })
        })
        .collect();
    ready.wait().await;
    eprintln!("all devices authenticated in {:.1?}; sending for {} s", auth_started.elapsed(), args.duration);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut total = Stats::default();
    for t in tasks {
        total.merge(t.await.expect("device task"));
    }
    total.report(elapsed);
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-load: {e}");
    std::process::exit(1);
}

#[derive(Default)]
struct Stats {
    sent: u64,
    /// 2.04 received while sending (what the rate is computed from).
    ok: u64,
    /// 2.04 received after the stop for requests sent before it.
    after_stop: u64,
    other: HashMap<String, u64>,
    lost: u64,
    latencies_us: Vec<u32>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.after_stop += o.after_stop;
        self.lost += o.lost;
        for (k, v) in o.other {
            *self.other.entry(k).or_default() += v;
        }
        self.latencies_us.extend(o.latencies_us);
    }

    fn report(mut self, elapsed: Duration) {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if self.latencies_us.is_empty() {
                return 0.0;
            }
            let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
            self.latencies_us[i] as f64 / 1000.0
        };
        let secs = elapsed.as_secs_f64();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "seconds": secs,
                "sent": self.sent,
                "acknowledged_2_04": self.ok,
                "acknowledged_after_stop": self.after_stop,
                "other_codes": self.other,
                "unanswered": self.lost,
                "acknowledged_per_second": (self.ok as f64 / secs).round(),
                "latency_ms": {
                    "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p99.9": pct(0.999),
                    "max": self.latencies_us.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
                },
            }))
            .unwrap()
        );
    }
}

async fn device(mut d: SimDevice, args: &Args, stop: &AtomicBool, ready: &tokio::sync::Barrier) -> Stats {
    let socket = UdpSocket::bind("0.0.0.0:0").await.expect("device socket");
    socket.connect(args.aes).await.expect("connect");
    let mut mid: u16 = rand::random();
    let mut buf = vec![0u8; 2048];
    authenticate(&socket, &mut d, &mut mid, &mut buf).await;
    ready.wait().await;

    let payload: Vec<u8> = (0..args.payload_size).map(|i| b'a' + (i % 26) as u8).collect();
    let timeout = Duration::from_millis(args.timeout_ms);
    // Each device paces itself so that all together send `rate` messages per second.
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(args.devices as f64 / args.rate as f64));
    let mut next_send = tokio::time::Instant::now();
    let mut stats = Stats::default();
    let mut in_flight: HashMap<u16, Instant> = HashMap::with_capacity(args.window);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && in_flight.is_empty() {
            break;
        }
        // After the stop only the answers to what is in flight are awaited.
        while !stopping
            && in_flight.len() < args.window
            && interval.is_none_or(|_| tokio::time::Instant::now() >= next_send)
        {
            mid = mid.wrapping_add(1);
            let session = d.session.as_mut().expect("authenticated");
            if socket.send(&session.uplink(&d.pk, &d.dn, mid, &payload)).await.is_err() {
                break;
            }
            in_flight.insert(mid, Instant::now());
            stats.sent += 1;
            if let Some(i) = interval {
                next_send += i;
            }
        }
        if in_flight.is_empty() {
            if interval.is_some() && !stopping {
                tokio::time::sleep_until(next_send).await;
            }
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(50), socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let Ok(m) = Message::parse(&buf[..n]) else { continue };
                let Some(sent_at) = in_flight.remove(&m.mid) else { continue };
                if m.code == Code::CHANGED && stopping {
                    stats.after_stop += 1;
                } else if m.code == Code::CHANGED {
                    stats.ok += 1;
                    stats.latencies_us.push(sent_at.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    *stats.other.entry(m.code.to_string()).or_default() += 1;
                }
            }
            _ => {
                let before = in_flight.len();
                in_flight.retain(|_, t| t.elapsed() < timeout);
                stats.lost += (before - in_flight.len()) as u64;
            }
        }
    }
    stats
}

/// `/auth` on 5682 with hmacsha256, retried until answered.
async fn authenticate(socket: &UdpSocket, d: &mut SimDevice, mid: &mut u16, buf: &mut [u8]) {
    *mid = mid.wrapping_add(1);
    let req = alibaba_auth(&d.pk, &d.dn, &d.secret, *mid);
    loop {
        // A retransmission keeps the message id, so the server answers it from its dedup cache.
        let _ = socket.send(&req).await;
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), socket.recv(buf)).await else { continue };
        let Ok(m) = Message::parse(&buf[..n]) else { continue };
        if let Some(session) = AlibabaSession::from_answer(m.payload, &d.secret).filter(|s| s.key.is_some()) {
            d.session = Some(session);
            return;
        }
        eprintln!("nbhub-load: /auth of {} answered {}", d.dn, m.code);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

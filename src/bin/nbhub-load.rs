//! Load generator: simulates many Alibaba devices that authenticate on 5682 and send encrypted
//! CON uplinks, then reports acknowledged messages per second and latency percentiles.
//!
//! Before the real load the same devices, with the same sockets, window, duration and datagrams,
//! drive a trivial UDP echo server this process starts on loopback (skip it with `--no-ceiling`).
//! The echo server has nbhub's socket shell and nothing behind it, so its figure is what the
//! machine, the kernel's UDP path and this generator allow at all; nbhub's rate as a fraction of
//! it says more than the raw rate on shared, noisy cores.
//!
//! With `--codec FILE` a third phase follows: the script is uploaded as the product's codec and
//! the same devices send the same frames on `/sys/{pk}/{dn}/thing/model/up_raw`, which the codec
//! reads after each ACK. Its figures are the ACK rate on that topic and the decode rate: decoded
//! uplinks (the server's `nbhub_codec_decoded_total`) over the time from the phase's start until
//! every acknowledged uplink of it was decoded. The counter is exported about once a second, so
//! the decode rate is low by up to a second's worth over the phase.
//!
//! The server's per-device flow control (5/s, 300/min by default) caps what one device may send;
//! to measure the server rather than the limit, run it with higher limits, e.g.
//! `NBHUB_DEVICE_MAX_PER_SECOND=100000 NBHUB_DEVICE_MAX_PER_MINUTE=10000000 nbhub serve`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use clap::Parser;
use nbhub::client::{AdminArgs, AdminClient, Fleet};
use nbhub::coap::message::{Code, Message, MessageType};
use nbhub::simulate::tally::{Figures, Tally};
use nbhub::simulate::{AlibabaSession, alibaba_auth};
use nbhub::transport::mmsg::{self, RecvBatch};
use serde::Serialize;
use serde_json::json;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::runtime::Runtime;
use tokio::sync::Barrier;

#[derive(Parser)]
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
    /// Seconds of sending after all devices have authenticated (and as long again for the ceiling).
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
    /// Skip the UDP echo ceiling measured before the real load.
    #[arg(long)]
    no_ceiling: bool,
    /// Sockets of the echo server, as the server's `coap.sockets_per_port`.
    #[arg(long, default_value_t = 2)]
    echo_sockets: usize,
    /// A codec script (e.g. `codecs/alibaba-thermostat.js`): after the raw load, the devices send
    /// `--codec-frame` on their `up_raw` topic for as long again, decoded by it.
    #[arg(long)]
    codec: Option<std::path::PathBuf>,
    /// The frame (hex) every uplink carries when `--codec` is given, in place of
    /// `--payload-size` letters; the default is a property report `codecs/alibaba-thermostat.js`
    /// reads.
    #[arg(long, default_value = "000000000100eb01")]
    codec_frame: String,
    /// Print the figures as one JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

/// An authenticated device, on the socket it authenticated from.
struct Device {
    socket: UdpSocket,
    uplinks: Uplinks,
}

/// The next encrypted uplinks of one device's session.
struct Uplinks {
    pk: String,
    dn: String,
    session: AlibabaSession,
    mid: u16,
    /// Where they go: a custom topic (stored as bytes) or `up_raw` (read by the codec).
    topic: String,
}

impl Uplinks {
    /// The next request and its message id.
    fn next(&mut self, payload: &[u8]) -> (u16, Vec<u8>) {
        self.mid = self.mid.wrapping_add(1);
        (self.mid, self.session.uplink_on(&self.topic, self.mid, payload))
    }

    fn send_on_up_raw(&mut self) {
        self.topic = format!("/sys/{}/{}/thing/model/up_raw", self.pk, self.dn);
    }
}

fn main() {
    let args = Arc::new(Args::parse());
    let codec = args.codec.as_ref().map(|path| {
        let script = std::fs::read_to_string(path).unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));
        let frame = hex::decode(&args.codec_frame).unwrap_or_else(|e| fail(format!("--codec-frame: {e}")));
        (script, frame)
    });
    let payload: Arc<[u8]> = match &codec {
        Some((_, frame)) => frame.as_slice().into(),
        None => (0..args.payload_size).map(|i| b'a' + (i % 26) as u8).collect(),
    };
    let admin = args.admin.connect().unwrap_or_else(|e| fail(e));
    let setup = Instant::now();
    let fleet = admin.create_fleet("nbhub-load", "load", args.devices).unwrap_or_else(|e| fail(e));
    eprintln!("created product {} and {} devices in {:.1?}", fleet.product_key, fleet.devices.len(), setup.elapsed());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let auth_started = Instant::now();
    let mut devices = runtime.block_on(authenticate_all(fleet, args.aes));
    eprintln!("all devices authenticated in {:.1?}", auth_started.elapsed());
    let pk = devices.first().map(|d| d.uplinks.pk.clone()).unwrap_or_default();
    let ceiling = if args.no_ceiling {
        None
    } else {
        let (echo, addr) = start_echo(args.echo_sockets).unwrap_or_else(|e| fail(format!("echo server: {e}")));
        eprintln!("UDP echo ceiling on {addr}: sending for {} s", args.duration);
        let (back, figures) = runtime.block_on(phase(devices, Some(addr), &args, &payload));
        echo.shutdown_background();
        devices = back;
        Some(figures)
    };
    eprintln!("nbhub on {}: sending for {} s", args.aes, args.duration);
    let (mut devices, nbhub) = runtime.block_on(phase(devices, None, &args, &payload));
    let decoded = codec.map(|(script, frame)| {
        let body = json!({"script": script, "sample_base64": STANDARD.encode(&frame), "current": true});
        admin.post(&format!("/api/v1/products/{pk}/codecs"), &body).unwrap_or_else(|e| fail(format!("codec: {e}")));
        devices.iter_mut().for_each(|d| d.uplinks.send_on_up_raw());
        eprintln!("nbhub on {} with the codec: sending on up_raw for {} s", args.aes, args.duration);
        let before = decoded_so_far(&admin);
        let started = Instant::now();
        let (_, uplinks) = runtime.block_on(phase(devices, None, &args, &payload));
        Decoded::wait(&admin, before, started, uplinks)
    });
    Report::new(&args, ceiling, nbhub, decoded).print(args.json);
}

/// Uplinks the server's codecs have read so far, whatever came of it, and those read without
/// error.
fn decoded_so_far(admin: &AdminClient) -> (u64, u64) {
    let all = admin.metric_total("nbhub_codec_decoded_total") as u64;
    (all, admin.metric("nbhub_codec_decoded_total{outcome=\"ok\"}") as u64)
}

/// The codec phase: its uplinks, and how fast they were decoded.
#[derive(Serialize)]
struct Decoded {
    uplinks: Figures,
    /// Uplinks of the phase the codec read (all those acknowledged, unless it fell behind for
    /// good).
    decoded: u64,
    /// Those that failed to decode (thrown, stopped, …).
    failed: u64,
    /// Seconds from the phase's start until the last acknowledged uplink was decoded.
    seconds: f64,
    decoded_per_second: f64,
}

impl Decoded {
    /// Waits until every uplink the phase had acknowledged is decoded, or the count stands still
    /// for `STALL`.
    fn wait(admin: &AdminClient, before: (u64, u64), started: Instant, uplinks: Figures) -> Decoded {
        const STALL: Duration = Duration::from_secs(10);
        let acknowledged = uplinks.acknowledged_2_04 + uplinks.acknowledged_after_stop;
        let (mut now, mut moved) = (before, Instant::now());
        while now.0.saturating_sub(before.0) < acknowledged && moved.elapsed() < STALL {
            std::thread::sleep(Duration::from_millis(100));
            let read = decoded_so_far(admin);
            if read != now {
                (now, moved) = (read, Instant::now());
            }
        }
        let (decoded, ok) = (now.0.saturating_sub(before.0), now.1.saturating_sub(before.1));
        let seconds = moved.duration_since(started).as_secs_f64();
        let decoded_per_second = (decoded as f64 / seconds).round();
        Decoded { uplinks, decoded, failed: decoded.saturating_sub(ok), seconds, decoded_per_second }
    }
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-load: {e}");
    std::process::exit(1);
}

/// Every device of `fleet` opens its 5682 session, each from a socket of its own.
async fn authenticate_all(fleet: Fleet, server: SocketAddr) -> Vec<Device> {
    let Fleet { product_key, devices } = fleet;
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|(dn, secret)| {
            let pk = product_key.clone();
            tokio::spawn(async move {
                let socket = connected(server).await;
                let (session, mid) = authenticate(&socket, &pk, &dn, &secret).await;
                let topic = format!("/{pk}/{dn}/update");
                Device { socket, uplinks: Uplinks { pk, dn, session, mid, topic } }
            })
        })
        .collect();
    let mut authenticated = Vec::with_capacity(tasks.len());
    for t in tasks {
        authenticated.push(t.await.expect("device task"));
    }
    authenticated
}

async fn connected(server: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("0.0.0.0:0").await.expect("device socket");
    socket.connect(server).await.expect("connect");
    socket
}

/// `/auth` on 5682 with hmacsha256, retried until answered; the session and the message id used.
async fn authenticate(socket: &UdpSocket, pk: &str, dn: &str, secret: &str) -> (AlibabaSession, u16) {
    let mut buf = [0u8; 2048];
    loop {
        let mid: u16 = rand::random();
        let request = alibaba_auth(pk, dn, secret, mid);
        for _ in 0..AUTH_TRIES_PER_ID {
            let _ = socket.send(&request).await;
            let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buf)).await else { continue };
            let Ok(m) = Message::parse(&buf[..n]) else { continue };
            if let Some(session) = AlibabaSession::from_answer(m.payload, secret).filter(|s| s.key.is_some()) {
                return (session, mid);
            }
            eprintln!("nbhub-load: /auth of {dn} answered {}", m.code);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// `/auth` is sent this many times with one message id before it takes another. A retry with the
/// same id is answered from the server's dedup cache once the session is stored, however slow the
/// disk; a new id gets past an exchange of an earlier run's socket on the same port with that id,
/// which the server remembers for 247 s and ignores a different request under.
const AUTH_TRIES_PER_ID: usize = 3;

/// All devices send for `duration` seconds, to the echo server at `echo` or else to nbhub; they
/// come back for the next phase, with the phase's figures.
async fn phase(
    devices: Vec<Device>,
    echo: Option<SocketAddr>,
    args: &Arc<Args>,
    payload: &Arc<[u8]>,
) -> (Vec<Device>, Figures) {
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(devices.len() + 1));
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|mut d| {
            let (args, stop, ready, payload) = (args.clone(), stop.clone(), ready.clone(), payload.clone());
            tokio::spawn(async move {
                // Echoed on a socket of its own, bound and connected as the device's own was.
                let echo_socket = match echo {
                    Some(addr) => Some(connected(addr).await),
                    None => None,
                };
                ready.wait().await;
                let socket = echo_socket.as_ref().unwrap_or(&d.socket);
                let stats = send(socket, &mut d.uplinks, &payload, &args, &stop).await;
                (d, stats)
            })
        })
        .collect();
    ready.wait().await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut devices = Vec::with_capacity(tasks.len());
    let mut total = Tally::default();
    for t in tasks {
        let (d, stats) = t.await.expect("device task");
        devices.push(d);
        total.merge(stats);
    }
    (devices, total.figures(elapsed))
}

/// One device's uplinks until `stop`, keeping `window` in flight; then the answers to those.
async fn send(socket: &UdpSocket, uplinks: &mut Uplinks, payload: &[u8], args: &Args, stop: &AtomicBool) -> Tally {
    let timeout = Duration::from_millis(args.timeout_ms);
    // Each device paces itself so that all together send `rate` messages per second.
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(args.devices as f64 / args.rate as f64));
    let mut next_send = tokio::time::Instant::now();
    let mut buf = vec![0u8; 2048];
    let mut stats = Tally::default();
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
            let (mid, request) = uplinks.next(payload);
            if socket.send(&request).await.is_err() {
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
                // Read again: an answer that came after the stop is not within the measured time.
                stats.answered(m.code, sent_at, stop.load(Ordering::Relaxed));
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

/// Datagrams read per `recvmmsg`, their slot, and the reads per turn of the loop: what
/// `transport::udp::serve` uses on 5682 (its slot is `coap.max_payload` + 16 + 1024 by default).
const ECHO_BATCH: usize = 32;
const ECHO_SLOT: usize = 2064;
const ECHO_READS_PER_TURN: usize = 8;

/// Starts the echo server on a loopback port: `sockets` SO_REUSEPORT sockets bound as nbhub binds
/// its ports, each served by a task on a runtime of its own (as the server is a process of its
/// own), reading and answering in nbhub's batches.
fn start_echo(sockets: usize) -> io::Result<(Runtime, SocketAddr)> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let sockets = nbhub::transport::udp::bind("127.0.0.1:0".parse().expect("an address"), sockets.max(1))?;
    let addr = sockets[0].local_addr()?;
    for socket in sockets {
        runtime.spawn(echo(socket));
    }
    Ok((runtime, addr))
}

/// One echo socket, until its runtime is shut down: a turn reads up to `ECHO_READS_PER_TURN`
/// batches, then sends every answer with `sendmmsg`, as a turn of nbhub's socket loop does.
async fn echo(socket: std::net::UdpSocket) -> io::Result<()> {
    let socket = UdpSocket::from_std(socket)?;
    let fd = socket.as_raw_fd();
    let mut batch = RecvBatch::new(ECHO_BATCH, ECHO_SLOT);
    let mut outbox: Vec<(SocketAddr, Bytes)> = Vec::new();
    loop {
        socket.readable().await?;
        for _ in 0..ECHO_READS_PER_TURN {
            // Errors are WouldBlock, or ICMP reports that concern one peer: nothing to do.
            let Ok(n) = socket.try_io(Interest::READABLE, || batch.recv(fd)) else { break };
            outbox.extend((0..n).filter_map(|i| batch.get(i)).map(|(peer, data, _)| (peer, answer(data))));
            if n < batch.capacity() {
                break;
            }
        }
        let mut sent = 0;
        while sent < outbox.len() {
            match socket.try_io(Interest::WRITABLE, || mmsg::send(fd, &outbox[sent..])) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
                Err(_) => break,
            }
        }
        outbox.clear();
    }
}

/// The request back, same size, marked as a piggybacked 2.04 so that the devices count it as they
/// count nbhub's answers.
fn answer(request: &[u8]) -> Bytes {
    let mut answer = request.to_vec();
    if let [first, code, ..] = answer.as_mut_slice() {
        // Byte 0 is version (2 bits), type (2 bits) and token length.
        *first = (*first & 0xcf) | ((MessageType::Ack as u8) << 4);
        *code = Code::CHANGED.0;
    }
    Bytes::from(answer)
}

#[derive(Serialize)]
struct Report {
    devices: usize,
    window: usize,
    payload_size: usize,
    /// nbhub's rate over the ceiling's.
    ratio: Option<f64>,
    ceiling: Option<Figures>,
    nbhub: Figures,
    /// The codec phase, with `--codec`.
    decoded: Option<Decoded>,
    /// Its decode rate over the raw phase's ACK rate.
    decoded_ratio: Option<f64>,
}

impl Report {
    fn new(args: &Args, ceiling: Option<Figures>, nbhub: Figures, decoded: Option<Decoded>) -> Report {
        let ratio = ceiling.as_ref().map(|c| nbhub.acknowledged_per_second / c.acknowledged_per_second);
        let decoded_ratio = decoded.as_ref().map(|d| d.decoded_per_second / nbhub.acknowledged_per_second);
        let payload_size = if args.codec.is_some() { args.codec_frame.len() / 2 } else { args.payload_size };
        Report {
            devices: args.devices,
            window: args.window,
            payload_size,
            ratio,
            ceiling,
            nbhub,
            decoded,
            decoded_ratio,
        }
    }

    fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(&self).expect("serialisable"));
            return;
        }
        println!("{} devices, window {}, {}-byte payloads", self.devices, self.window, self.payload_size);
        if let Some(c) = &self.ceiling {
            c.print("UDP echo ceiling", "msgs", "");
        }
        self.nbhub.print("nbhub (5682 AES)", "msgs", "");
        if let Some(r) = self.ratio {
            println!("{:<30} {r:.2}", "nbhub / ceiling");
        }
        if let Some(d) = &self.decoded {
            d.uplinks.print("nbhub (5682 AES, up_raw)", "msgs", "");
            println!(
                "{:<30} {:>8.0} msgs/s  {} decoded ({} failed) in {:.1} s",
                "decoded by the codec", d.decoded_per_second, d.decoded, d.failed, d.seconds
            );
        }
        if let Some(r) = self.decoded_ratio {
            println!("{:<30} {r:.2}", "decoded / raw");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbhub::coap::message::MessageBuilder;

    #[test]
    fn the_echo_answers_as_nbhub_does_in_as_many_bytes() {
        let request = MessageBuilder::new(MessageType::Con, Code::POST, 0x1234, b"tk").payload(b"data").build();
        let echoed = answer(&request);
        assert_eq!(echoed.len(), request.len());
        let m = Message::parse(&echoed).unwrap();
        assert_eq!(
            (m.mtype, m.code, m.mid, m.token, m.payload),
            (MessageType::Ack, Code::CHANGED, 0x1234, &b"tk"[..], &b"data"[..])
        );
    }
}

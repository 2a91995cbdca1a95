//! DTLS load generator: full PSK handshakes per second against 5684 (each with the cookie
//! exchange, one uplink and a close_notify), then, with `--keep`, the server's memory per
//! established idle session. With `--server-pid` it also reports the server's own CPU time per
//! handshake, which is what its capacity is on a machine the generator does not share.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::client::AdminArgs;
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::dtls::client::{ClientConfig, DtlsClient};

#[derive(Parser)]
#[command(name = "nbhub-dtls-load", about = "DTLS PSK handshakes per second and memory per session against nbhub")]
struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(long, default_value = "127.0.0.1:5684")]
    dtls: SocketAddr,
    /// Devices created for the run; handshakes cycle through them.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Client threads, each running one handshake at a time.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Seconds of handshakes.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Cipher suites offered (OpenSSL names).
    #[arg(long, default_value = "PSK-AES128-CCM8")]
    ciphers: String,
    /// Afterwards, open this many sessions, keep them idle and report the server's memory per session.
    #[arg(long, default_value_t = 0)]
    keep: usize,
    /// The server's process id, for its CPU time and resident memory (Linux /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Handshake and close only, without the uplink in between.
    #[arg(long)]
    bare: bool,
    /// Certificate mode: no PSK (the server's certificate is not verified); handshakes are then
    /// bare, e.g. `--certificate --ciphers AES128-SHA` for the RSA suites.
    #[arg(long)]
    certificate: bool,
}

struct Device {
    pk: String,
    dn: String,
    secret: String,
}

fn main() {
    let args = Args::parse();
    let admin = args.admin.connect().unwrap_or_else(|e| fail(e));
    let fleet = admin.create_fleet("nbhub-dtls-load", "dtls", args.devices.max(1)).unwrap_or_else(|e| fail(e));
    let pk = fleet.product_key;
    let devices: Arc<Vec<Device>> =
        Arc::new(fleet.devices.into_iter().map(|(dn, secret)| Device { pk: pk.clone(), dn, secret }).collect());

    let cpu_before = args.server_pid.and_then(server_cpu);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.threads.max(1))
        .map(|w| {
            let (devices, stop, server) = (devices.clone(), stop.clone(), args.dtls);
            let mode = Mode { ciphers: args.ciphers.clone(), psk: !args.certificate };
            let payload: Option<&[u8]> = (!args.bare && !args.certificate).then_some(b"load");
            std::thread::spawn(move || run_worker(w, &devices, &stop, &mode, server, payload))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(args.duration));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut failures = 0;
    for w in workers {
        let (l, f) = w.join().expect("worker");
        latencies.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = args.server_pid.and_then(server_cpu);
    latencies.sort_unstable();
    let pct = |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)));
    let ms = |d: Option<&Duration>| d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0);
    let each = match (args.certificate, args.bare) {
        (true, _) => "cookie exchange, certificate handshake, close",
        (false, true) => "cookie exchange, PSK handshake, close",
        (false, false) => "cookie exchange, PSK handshake, one uplink, close",
    };
    println!(
        "handshakes: {} in {elapsed:.1} s = {:.0}/s (each: {each}), failures {failures}",
        latencies.len(),
        latencies.len() as f64 / elapsed
    );
    println!("latency ms: p50 {:.2}  p99 {:.2}  max {:.2}", ms(pct(0.5)), ms(pct(0.99)), ms(latencies.last()));
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        let cpu = after - before;
        println!(
            "server CPU: {cpu:.2} s = {:.0} µs per handshake, i.e. {:.0} handshakes per CPU-second",
            cpu * 1e6 / latencies.len().max(1) as f64,
            latencies.len() as f64 / cpu.max(1e-9)
        );
    }
    if args.keep > 0 {
        keep_sessions(&args, &devices);
    }
}

/// Handshakes back to back until `stop`; returns their latencies and the failures.
fn run_worker(
    w: usize,
    devices: &[Device],
    stop: &AtomicBool,
    mode: &Mode,
    server: SocketAddr,
    payload: Option<&[u8]>,
) -> (Vec<Duration>, usize) {
    let (mut latencies, mut failures) = (Vec::new(), 0);
    let mut i = w;
    while !stop.load(Ordering::Relaxed) {
        let d = &devices[i % devices.len()];
        i += 7;
        let t = Instant::now();
        match session(d, mode, server, payload) {
            Some(client) => {
                client.close();
                latencies.push(t.elapsed());
            }
            None => failures += 1,
        }
    }
    (latencies, failures)
}

/// The client side of every session.
struct Mode {
    ciphers: String,
    psk: bool,
}

/// A new port, a full handshake and, with a payload, one acknowledged uplink.
fn session(d: &Device, mode: &Mode, server: SocketAddr, payload: Option<&[u8]>) -> Option<DtlsClient> {
    let identity = format!("{}&{}", d.pk, d.dn);
    let psk = mode.psk.then_some((identity.as_str(), d.secret.as_bytes()));
    let config = ClientConfig { psk, ciphers: &mode.ciphers, encrypt_then_mac: true };
    let mut client = DtlsClient::new(DtlsClient::bind(server), &config);
    client.handshake(None, Duration::from_secs(5)).ok()?;
    let Some(payload) = payload else { return Some(client) };
    let mid: u16 = rand::random();
    let mut b = MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes());
    for seg in ["topic", &d.pk, &d.dn, "load"] {
        b = b.option(OptionNumber::URI_PATH, seg.as_bytes());
    }
    let reply = client.exchange(&b.payload(payload).build(), Duration::from_secs(5))?;
    (Message::parse(&reply).ok()?.code == Code::CHANGED).then_some(client)
}

fn keep_sessions(args: &Args, devices: &[Device]) {
    let Some(pid) = args.server_pid else {
        eprintln!("--keep needs --server-pid to read the server's memory");
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = server_rss(pid).unwrap_or(0);
    let mut kept: Vec<DtlsClient> = Vec::with_capacity(args.keep);
    let mode = Mode { ciphers: args.ciphers.clone(), psk: !args.certificate };
    let payload: Option<&[u8]> = (!args.certificate).then_some(b"keep");
    for i in 0..args.keep {
        match session(&devices[i % devices.len()], &mode, args.dtls, payload) {
            Some(c) => kept.push(c),
            None => eprintln!("session {i} failed"),
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = server_rss(pid).unwrap_or(0);
    println!(
        "idle sessions: {} kept; server RSS {:.1} MiB -> {:.1} MiB = {:.0} bytes per session",
        kept.len(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        after.saturating_sub(before) as f64 / kept.len().max(1) as f64
    );
    // Sockets close without close_notify: the sessions stay until the server's idle timeout.
    drop(kept.into_iter().map(|c| c.socket).collect::<Vec<UdpSocket>>());
}

/// utime + stime of `pid` in seconds.
fn server_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

/// Resident memory of `pid` in bytes.
fn server_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-dtls-load: {e}");
    std::process::exit(1);
}

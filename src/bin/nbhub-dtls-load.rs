//! DTLS load generator: full PSK handshakes per second against 5684 (each with the cookie
//! exchange, one uplink and a close_notify), then, with `--keep`, the server's memory per
//! established idle session. With `--server-pid` it also reports the server's own CPU time per
//! handshake, which is what its capacity is on a machine the generator does not share.
//!
//! With `--established N` it measures uplinks instead: N sessions are opened first, then each
//! sends CON uplinks (stored, fsynced under the default policy, before their ACK) with `--window`
//! in flight; then as many devices do the same on 5682 (`/auth`, then AES uplinks), driven the
//! same way, and the report gives both rates and their ratio: what DTLS costs over the cheapest
//! secure port, measured in the same run.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::client::AdminArgs;
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::dtls::client::{ClientConfig, DtlsClient};
use nbhub::simulate::tally::{Figures, Tally};
use nbhub::simulate::{AlibabaSession, alibaba_auth};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "nbhub-dtls-load", about = "DTLS PSK handshakes per second and memory per session against nbhub")]
struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(long, default_value = "127.0.0.1:5684")]
    dtls: SocketAddr,
    /// Devices created for the run; handshakes cycle through them. At least `--established`.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Client threads, each running one handshake at a time or, with `--established`, driving its
    /// share of the sessions.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Seconds of handshakes, or of uplinks on each port with `--established`.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Open this many PSK sessions, one device each, and measure uplinks over them, then over as
    /// many 5682 AES sessions; no handshakes per second.
    #[arg(long, default_value_t = 0)]
    established: usize,
    /// Uplinks in flight per session (`--established`).
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Bytes of each uplink's payload (`--established`).
    #[arg(long, default_value_t = 64)]
    payload_size: usize,
    /// The server's AES port (`--established`).
    #[arg(long, default_value = "127.0.0.1:5682")]
    aes: SocketAddr,
    /// Print the `--established` figures as one JSON line instead of a table.
    #[arg(long)]
    json: bool,
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
    let count = args.devices.max(args.established).max(1);
    let fleet = admin.create_fleet("nbhub-dtls-load", "dtls", count).unwrap_or_else(|e| fail(e));
    let pk = fleet.product_key;
    let devices: Arc<Vec<Device>> =
        Arc::new(fleet.devices.into_iter().map(|(dn, secret)| Device { pk: pk.clone(), dn, secret }).collect());
    if args.established > 0 {
        established(&args, &devices[..args.established]);
        return;
    }

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
        match session(d, mode, server, payload.map(|p| (rand::random(), p))) {
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

/// A new port, a full handshake and, given a message id and payload, one acknowledged uplink.
fn session(d: &Device, mode: &Mode, server: SocketAddr, first: Option<(u16, &[u8])>) -> Option<DtlsClient> {
    let identity = format!("{}&{}", d.pk, d.dn);
    let psk = mode.psk.then_some((identity.as_str(), d.secret.as_bytes()));
    let config = ClientConfig { psk, ciphers: &mode.ciphers, encrypt_then_mac: true };
    let mut client = DtlsClient::new(DtlsClient::bind(server), &config);
    client.handshake(None, Duration::from_secs(5)).ok()?;
    let Some((mid, payload)) = first else { return Some(client) };
    let reply = client.exchange(&uplink(d, mid, payload), Duration::from_secs(5))?;
    (Message::parse(&reply).ok()?.code == Code::CHANGED).then_some(client)
}

/// The uplink a PSK session sends: CON `POST /topic/{pk}/{dn}/load`, its message id as token.
fn uplink(d: &Device, mid: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes());
    for seg in ["topic", &d.pk, &d.dn, "load"] {
        b = b.option(OptionNumber::URI_PATH, seg.as_bytes());
    }
    b.payload(payload).build()
}

/// `--established`: uplinks over DTLS sessions, then over as many 5682 AES sessions, and the ratio.
fn established(args: &Args, devices: &[Device]) {
    let mode = Mode { ciphers: args.ciphers.clone(), psk: true };
    eprintln!("opening {} DTLS sessions ({})", devices.len(), args.ciphers);
    let dtls = run_sessions(args, devices, |d| Dtls::open(d, &mode, args.dtls));
    eprintln!("opening {} AES sessions on {}", devices.len(), args.aes);
    let aes = run_sessions(args, devices, |d| Aes::open(d, args.aes));
    let ratio = dtls.figures.acknowledged_per_second / aes.figures.acknowledged_per_second.max(1.0);
    let report = Report {
        sessions: devices.len(),
        window: args.window,
        payload_size: args.payload_size,
        ciphers: &args.ciphers,
        ratio,
        dtls,
        aes,
    };
    report.print(args.json);
}

/// One established session of either port, as [`drive`] runs it.
trait Session {
    fn fd(&self) -> RawFd;
    /// Sends the next uplink; its message id, or `None` if it could not be sent. Message ids
    /// follow the one the session was opened with, so none repeats that exchange's.
    fn send(&mut self, payload: &[u8]) -> Option<u16>;
    /// The message id and code of the answer waiting on the socket, if it is one.
    fn answer(&mut self) -> Option<(u16, Code)>;
    fn close(self);
}

/// A PSK session on 5684.
struct Dtls<'a> {
    device: &'a Device,
    client: DtlsClient,
    mid: u16,
}

impl<'a> Dtls<'a> {
    /// A handshake and one acknowledged uplink, as in handshake mode, then a non-blocking socket.
    fn open(device: &'a Device, mode: &Mode, server: SocketAddr) -> Option<Dtls<'a>> {
        let mid = rand::random();
        let client = session(device, mode, server, Some((mid, b"open")))?;
        client.socket.set_nonblocking(true).ok()?;
        Some(Dtls { device, client, mid })
    }
}

impl Session for Dtls<'_> {
    fn fd(&self) -> RawFd {
        self.client.socket.as_raw_fd()
    }

    fn send(&mut self, payload: &[u8]) -> Option<u16> {
        self.mid = self.mid.wrapping_add(1);
        self.client.send(&uplink(self.device, self.mid, payload))?;
        Some(self.mid)
    }

    fn answer(&mut self) -> Option<(u16, Code)> {
        // Called when a datagram is waiting, so this returns at once; only a record that is not
        // application data (none is expected) spins until the millisecond is up.
        let reply = self.client.recv(Duration::from_millis(1))?;
        let m = Message::parse(&reply).ok()?;
        Some((m.mid, m.code))
    }

    fn close(self) {
        self.client.close();
    }
}

/// An Alibaba session on 5682: `/auth`, then encrypted `/topic` uplinks.
struct Aes<'a> {
    device: &'a Device,
    socket: UdpSocket,
    session: AlibabaSession,
    mid: u16,
}

impl<'a> Aes<'a> {
    /// `/auth` from a new port, then a non-blocking socket. The answer waits until the session is
    /// durable, which takes seconds on a busy disk, so it is tried for about half a minute.
    fn open(device: &'a Device, server: SocketAddr) -> Option<Aes<'a>> {
        let socket = DtlsClient::bind(server);
        socket.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let mut buf = [0u8; 2048];
        for _ in 0..4 {
            let mid = rand::random();
            let request = alibaba_auth(&device.pk, &device.dn, &device.secret, mid);
            for _ in 0..AUTH_TRIES_PER_ID {
                socket.send(&request).ok()?;
                let Ok(n) = socket.recv(&mut buf) else { continue };
                let Ok(m) = Message::parse(&buf[..n]) else { continue };
                let session = AlibabaSession::from_answer(m.payload, &device.secret).filter(|s| s.key.is_some());
                if let Some(session) = session {
                    socket.set_nonblocking(true).ok()?;
                    return Some(Aes { device, socket, session, mid });
                }
            }
        }
        None
    }
}

/// `/auth` is sent this many times with one message id before it takes another. A retry with the
/// same id is answered from the server's dedup cache once the session is stored, however slow the
/// disk; a new id gets past an exchange of an earlier run's socket on the same port with that id,
/// which the server remembers for 247 s and ignores a different request under.
const AUTH_TRIES_PER_ID: usize = 3;

impl Session for Aes<'_> {
    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn send(&mut self, payload: &[u8]) -> Option<u16> {
        self.mid = self.mid.wrapping_add(1);
        self.socket.send(&self.session.uplink(&self.device.pk, &self.device.dn, self.mid, payload)).ok()?;
        Some(self.mid)
    }

    fn answer(&mut self) -> Option<(u16, Code)> {
        let mut buf = [0u8; 2048];
        let n = self.socket.recv(&mut buf).ok()?;
        let m = Message::parse(&buf[..n]).ok()?;
        Some((m.mid, m.code))
    }

    fn close(self) {}
}

/// Opens one session per device with `open`, spread over the threads; once all are open, every
/// thread drives its own for `duration` seconds. The figures of all of them.
fn run_sessions<'d, S: Session>(
    args: &Args,
    devices: &'d [Device],
    open: impl Fn(&'d Device) -> Option<S> + Sync,
) -> Port {
    let threads = args.threads.clamp(1, devices.len());
    let stop = AtomicBool::new(false);
    let ready = Barrier::new(threads + 1);
    let payload: Vec<u8> = (0..args.payload_size).map(|i| b'a' + (i % 26) as u8).collect();
    let opening = Instant::now();
    std::thread::scope(|scope| {
        let (stop, ready, open, payload) = (&stop, &ready, &open, &payload);
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                scope.spawn(move || {
                    let sessions: Vec<S> = devices.iter().skip(w).step_by(threads).filter_map(open).collect();
                    let opened = sessions.len();
                    ready.wait();
                    (opened, drive(sessions, args.window, payload, stop))
                })
            })
            .collect();
        ready.wait();
        eprintln!("opened in {:.1?}; sending for {} s", opening.elapsed(), args.duration);
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(args.duration));
        stop.store(true, Ordering::Relaxed);
        let elapsed = started.elapsed();
        let (mut opened, mut total) = (0, Tally::default());
        for w in workers {
            let (o, t) = w.join().expect("worker");
            opened += o;
            total.merge(t);
        }
        Port { sessions_failed: devices.len() - opened, figures: total.figures(elapsed) }
    })
}

/// A request unanswered this long counts as lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often requests are checked for that timeout, and the longest wait for a datagram.
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

/// Uplinks over `sessions` until `stop`, `window` in flight on each, then the answers to those:
/// one thread for hundreds of sessions, woken by epoll only for those with an answer waiting.
fn drive<S: Session>(mut sessions: Vec<S>, window: usize, payload: &[u8], stop: &AtomicBool) -> Tally {
    let mut stats = Tally::default();
    let epoll = Epoll::new(sessions.iter().map(|s| s.fd())).unwrap_or_else(|e| fail(format!("epoll: {e}")));
    let mut flights: Vec<Flight> = sessions.iter().map(|_| Flight::default()).collect();
    for (s, f) in sessions.iter_mut().zip(&mut flights) {
        f.fill(s, window, payload, &mut stats);
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut last_sweep = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && flights.iter().all(|f| f.in_flight.is_empty()) {
            break;
        }
        // After the stop only the answers to what is in flight are awaited.
        let window = if stopping { 0 } else { window };
        for i in epoll.wait(&mut events, SWEEP_INTERVAL) {
            let (s, f) = (&mut sessions[i], &mut flights[i]);
            if let Some((mid, code)) = s.answer()
                && let Some(sent_at) = f.settle(mid)
            {
                // Read again: an answer that came after the stop is not within the measured time.
                stats.answered(code, sent_at, stop.load(Ordering::Relaxed));
            }
            f.fill(s, window, payload, &mut stats);
        }
        if last_sweep.elapsed() >= SWEEP_INTERVAL {
            last_sweep = Instant::now();
            for (s, f) in sessions.iter_mut().zip(&mut flights) {
                let before = f.in_flight.len();
                f.in_flight.retain(|(_, t)| t.elapsed() < ANSWER_TIMEOUT);
                stats.lost += (before - f.in_flight.len()) as u64;
                f.fill(s, window, payload, &mut stats);
            }
        }
    }
    sessions.into_iter().for_each(Session::close);
    stats
}

/// One session's requests in flight: message id and when it was sent.
#[derive(Default)]
struct Flight {
    in_flight: Vec<(u16, Instant)>,
}

impl Flight {
    /// Sends until `window` requests are in flight.
    fn fill(&mut self, session: &mut impl Session, window: usize, payload: &[u8], stats: &mut Tally) {
        while self.in_flight.len() < window {
            let Some(mid) = session.send(payload) else { return };
            self.in_flight.push((mid, Instant::now()));
            stats.sent += 1;
        }
    }

    /// When the request `mid` was sent, if it was in flight.
    fn settle(&mut self, mid: u16) -> Option<Instant> {
        let i = self.in_flight.iter().position(|(m, _)| *m == mid)?;
        Some(self.in_flight.swap_remove(i).1)
    }
}

/// Readiness of many sockets at once, level-triggered: a socket is reported for as long as a
/// datagram waits on it.
struct Epoll(OwnedFd);

impl Epoll {
    /// Watches `fds` for reading; each is reported by its position.
    fn new(fds: impl Iterator<Item = RawFd>) -> io::Result<Epoll> {
        // SAFETY: epoll_create1 has no preconditions; its result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let epoll = Epoll(unsafe { OwnedFd::from_raw_fd(fd) });
        for (i, fd) in fds.enumerate() {
            let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
            // SAFETY: both descriptors are open and `event` outlives the call.
            if unsafe { libc::epoll_ctl(epoll.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(epoll)
    }

    /// The positions of the sockets with a datagram waiting, after waiting at most `timeout`.
    fn wait<'e>(&self, events: &'e mut [libc::epoll_event], timeout: Duration) -> impl Iterator<Item = usize> + 'e {
        let (len, ms) = (events.len() as libc::c_int, timeout.as_millis() as libc::c_int);
        // SAFETY: `events` has room for `len` entries; the kernel writes at most that many.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), len, ms) };
        // n < 0 is EINTR (nothing ready) or a bad descriptor, which cannot happen here.
        events[..n.max(0) as usize].iter().map(|e| e.u64 as usize)
    }
}

/// One port's result in `--established` mode.
#[derive(Serialize)]
struct Port {
    /// Sessions that could not be opened (and sent nothing).
    sessions_failed: usize,
    #[serde(flatten)]
    figures: Figures,
}

impl Port {
    fn print(&self, label: &str) {
        let failed = match self.sessions_failed {
            0 => String::new(),
            n => format!("  sessions failed {n}"),
        };
        self.figures.print(label, "uplinks", &failed);
    }
}

#[derive(Serialize)]
struct Report<'a> {
    sessions: usize,
    window: usize,
    payload_size: usize,
    ciphers: &'a str,
    /// The DTLS rate over the AES one.
    ratio: f64,
    dtls: Port,
    aes: Port,
}

impl Report<'_> {
    fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).expect("serialisable"));
            return;
        }
        println!(
            "{} sessions on each port, window {}, {}-byte payloads",
            self.sessions, self.window, self.payload_size
        );
        self.dtls.print(&format!("DTLS 5684 ({})", self.ciphers));
        self.aes.print("AES 5682");
        println!("{:<30} {:.2}", "dtls / aes", self.ratio);
    }
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
        match session(&devices[i % devices.len()], &mode, args.dtls, payload.map(|p| (rand::random(), p))) {
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

//! A simulated PCP device (seed 003 §3.8, SPEC §6) on the Huawei dialect, behaving as the LiteOS
//! agent does: it resends its requests (21, 22, 24) until answered, asks for chunks in order and
//! verifies each against the package it expects, keeps what it has across a sleep, resends 22
//! until the execute request arrives, reboots, then reports the upgrade result.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbhub::coap::message::{Code, MessageType};
use nbhub::ota::pcp::{FromDevice, FromPlatform, ResultCode, Version};

use super::{HuaweiDevice, Peer};

/// How many simulated devices download at once, and the most that ever did.
#[derive(Default)]
pub struct Concurrency {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Concurrency {
    fn start(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
    }
    fn end(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// What a simulated device does differently from a healthy one.
#[derive(Clone)]
pub struct Behaviour {
    pub version: String,
    /// The answer to a notification (0: accept).
    pub notify_result: u8,
    /// The upgrade result after the reboot (0: installed).
    pub install_result: u8,
    /// Whether it answers version queries.
    pub answers_query: bool,
    /// Answers the platform's requests in the ACK rather than in a notification after it.
    pub answers_in_ack: bool,
    /// Reports the upgrade result (24) after the reboot; if not, only a version query tells.
    pub reports_result: bool,
    /// After receiving this chunk it sleeps (hears nothing) for `sleep_for`, then reports data.
    pub sleep_after_chunk: Option<u16>,
    pub sleep_for: Duration,
    /// Pause between receiving a chunk and asking for the next.
    pub chunk_delay: Duration,
    /// How long an unanswered request waits before it is sent again.
    pub resend: Duration,
    pub reboot: Duration,
}

impl Behaviour {
    pub fn healthy(version: &str) -> Behaviour {
        Behaviour {
            version: version.into(),
            notify_result: 0,
            install_result: 0,
            answers_query: true,
            answers_in_ack: false,
            reports_result: true,
            sleep_after_chunk: None,
            sleep_for: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            resend: Duration::from_millis(300),
            reboot: Duration::from_millis(300),
        }
    }
}

/// What the device saw.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Chunks asked for, in order, resends not counted.
    pub requested: Vec<u16>,
    pub notifications: usize,
    pub queries: usize,
    /// Chunks whose bytes differed from the package.
    pub bad_chunks: usize,
    /// The whole image as assembled, once complete.
    pub image: Option<Vec<u8>>,
    pub upgrade_answered: bool,
    /// Frames from the platform that were not valid PCP.
    pub malformed: usize,
    /// Result codes of chunk answers that carried no chunk.
    pub chunk_refusals: Vec<ResultCode>,
}

struct Outstanding {
    msg: FromDevice,
    next_at: Instant,
    sent: bool,
}

struct Download {
    version: Version,
    chunk_size: usize,
    chunks: Vec<Option<Vec<u8>>>,
}

pub struct PcpDevice {
    pub dev: HuaweiDevice<Peer>,
    pub behaviour: Behaviour,
    pub log: Log,
    /// The package it expects to receive.
    package: Arc<Vec<u8>>,
    download: Option<Download>,
    outstanding: Option<Outstanding>,
    /// Answers to the platform's request being handled.
    replies: Vec<FromDevice>,
    asleep_until: Option<Instant>,
    rebooting_until: Option<Instant>,
    counted: bool,
    concurrency: Option<Arc<Concurrency>>,
    /// Where the server is; when it changes (a restart) the device binds there again.
    pub server: Arc<Mutex<SocketAddr>>,
    bound_to: SocketAddr,
}

impl PcpDevice {
    pub fn new(server: Arc<Mutex<SocketAddr>>, node: &str, behaviour: Behaviour, package: Arc<Vec<u8>>) -> PcpDevice {
        let addr = *server.lock().unwrap();
        PcpDevice {
            dev: HuaweiDevice::new(addr, node),
            behaviour,
            log: Log::default(),
            package,
            download: None,
            outstanding: None,
            replies: Vec::new(),
            asleep_until: None,
            rebooting_until: None,
            counted: false,
            concurrency: None,
            server,
            bound_to: addr,
        }
    }

    pub fn counting(mut self, c: Arc<Concurrency>) -> PcpDevice {
        self.concurrency = Some(c);
        self
    }

    pub fn version(&self) -> &str {
        &self.behaviour.version
    }

    fn send(&mut self, msg: &FromDevice) {
        self.dev.report(&msg.encode());
    }

    fn request(&mut self, msg: FromDevice, after: Duration) {
        self.outstanding = Some(Outstanding { msg, next_at: Instant::now() + after, sent: false });
    }

    /// Runs until `stop` is set or `limit` passes.
    pub fn run(mut self, stop: &AtomicBool, limit: Duration) -> PcpDevice {
        let deadline = Instant::now() + limit;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            self.poll();
        }
        self
    }

    /// One round: wake up, reboot, resend, then handle what arrives within 20 ms.
    pub fn poll(&mut self) {
        let now = Instant::now();
        let server = *self.server.lock().unwrap();
        if server != self.bound_to {
            // The server restarted elsewhere: bind there, keeping everything downloaded.
            self.dev.wire = Peer::new(server);
            self.bound_to = server;
            self.dev.bind();
        }
        if self.asleep_until.is_some_and(|t| now >= t) {
            self.asleep_until = None;
            // Business data: the platform learns the device is back.
            self.dev.report(br#"{"woke": true}"#);
        }
        if self.rebooting_until.is_some_and(|t| now >= t) {
            self.rebooting_until = None;
            let target = self.download.take().map(|d| d.version);
            let result = ResultCode(self.behaviour.install_result);
            if result == ResultCode::OK
                && let Some(v) = target
            {
                self.behaviour.version = v.to_string();
            }
            if self.behaviour.reports_result {
                let version = Version::new(&self.behaviour.version).unwrap();
                self.request(FromDevice::UpgradeResult { result, version }, Duration::ZERO);
            }
        }
        let radio_off = self.asleep_until.is_some() || self.rebooting_until.is_some();
        if !radio_off
            && let Some(o) = &mut self.outstanding
            && now >= o.next_at
        {
            o.next_at = now + self.behaviour.resend;
            let first = !std::mem::replace(&mut o.sent, true);
            let msg = o.msg.clone();
            if first && let FromDevice::ChunkRequest { chunk, .. } = msg {
                self.log.requested.push(chunk);
            }
            self.send(&msg);
        }
        let Some(reply) = self.dev.recv_reply(Duration::from_millis(20)) else { return };
        if radio_off {
            return;
        }
        if reply.mtype == MessageType::Con && reply.code == Code::POST {
            match FromPlatform::parse(&reply.payload) {
                Ok(msg) => self.handle(msg),
                Err(_) => self.log.malformed += 1,
            }
            // The answer to a request of the platform rides in the ACK, or follows it.
            let in_ack = self.behaviour.answers_in_ack && !self.replies.is_empty();
            let ack_payload = if in_ack { self.replies.remove(0).encode() } else { Vec::new() };
            self.dev.answer(&reply, Code::CHANGED, &ack_payload);
            for r in std::mem::take(&mut self.replies) {
                self.send(&r);
            }
        }
    }

    fn handle(&mut self, msg: FromPlatform) {
        let b = self.behaviour.clone();
        match msg {
            FromPlatform::QueryVersion => {
                self.log.queries += 1;
                if b.answers_query {
                    let version = Version::new(&b.version).unwrap();
                    self.replies.push(FromDevice::Version { result: ResultCode::OK, version });
                }
            }
            FromPlatform::NewVersion { version, chunk_size, chunk_count } => {
                self.log.notifications += 1;
                if version.as_str() == b.version {
                    return self.replies.push(FromDevice::NotifyAnswer { result: ResultCode::ALREADY_LATEST });
                }
                if b.notify_result != 0 {
                    return self.replies.push(FromDevice::NotifyAnswer { result: ResultCode(b.notify_result) });
                }
                self.replies.push(FromDevice::NotifyAnswer { result: ResultCode::OK });
                if self.download.as_ref().is_none_or(|d| d.version != version) {
                    self.download = Some(Download {
                        version,
                        chunk_size: chunk_size as usize,
                        chunks: vec![None; chunk_count as usize],
                    });
                }
                if !self.counted {
                    self.counted = true;
                    if let Some(c) = &self.concurrency {
                        c.start();
                    }
                }
                self.ask_next(Duration::ZERO);
            }
            FromPlatform::Chunk { result, chunk, data } => {
                let waiting = matches!(&self.outstanding, Some(Outstanding { msg: FromDevice::ChunkRequest { chunk: c, .. }, .. }) if *c == chunk);
                if !waiting {
                    return;
                }
                if result != ResultCode::OK {
                    self.log.chunk_refusals.push(result);
                    return;
                }
                let Some(d) = &mut self.download else { return };
                let at = chunk as usize * d.chunk_size;
                let expected = self.package.get(at..(at + d.chunk_size).min(self.package.len()));
                if expected != Some(&data[..]) {
                    self.log.bad_chunks += 1;
                }
                d.chunks[chunk as usize] = Some(data);
                self.outstanding = None;
                if b.sleep_after_chunk == Some(chunk) {
                    self.behaviour.sleep_after_chunk = None;
                    self.asleep_until = Some(Instant::now() + b.sleep_for);
                    return;
                }
                self.ask_next(b.chunk_delay);
            }
            FromPlatform::DownloadResultAnswer { .. } => {
                // Ignored, as the LiteOS agent does: it resends 22 until 23 comes.
            }
            FromPlatform::Execute => {
                if !matches!(&self.outstanding, Some(Outstanding { msg: FromDevice::DownloadResult { .. }, .. })) {
                    return;
                }
                self.outstanding = None;
                self.replies.push(FromDevice::ExecuteAnswer { result: ResultCode::OK });
                self.rebooting_until = Some(Instant::now() + b.reboot);
            }
            FromPlatform::UpgradeResultAnswer { .. } => {
                if matches!(&self.outstanding, Some(Outstanding { msg: FromDevice::UpgradeResult { .. }, .. })) {
                    self.outstanding = None;
                    self.log.upgrade_answered = true;
                }
            }
        }
    }

    /// Asks for the first chunk not kept yet, or reports the download complete.
    fn ask_next(&mut self, after: Duration) {
        let Some(d) = &self.download else { return };
        match d.chunks.iter().position(Option::is_none) {
            Some(n) => {
                let msg = FromDevice::ChunkRequest { version: d.version, chunk: n as u16 };
                self.request(msg, after);
            }
            None => {
                self.log.image = Some(d.chunks.iter().flatten().flatten().copied().collect());
                if self.counted {
                    self.counted = false;
                    if let Some(c) = &self.concurrency {
                        c.end();
                    }
                }
                self.request(FromDevice::DownloadResult { result: ResultCode::OK }, Duration::ZERO);
            }
        }
    }
}

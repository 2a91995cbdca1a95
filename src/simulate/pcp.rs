//! A simulated PCP device (seed 003 §3.8, SPEC §6) behaving as the LiteOS agent does: it resends
//! its requests (21, 22, 24) until answered, asks for chunks in order and verifies each against
//! the package it expects, keeps what it has across a sleep, resends 22 until the execute request
//! arrives, reboots, then reports the upgrade result.
//!
//! Free of I/O and clocks, so the tests' threads and the soak's run the same device: the caller
//! passes the time, hands over what the platform sent, and sends what comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::ota::pcp::{FromDevice, FromPlatform, ResultCode, Version};

/// How much of a shared budget simulated devices use while they download (each its own weight:
/// one per device, or its coverage level's share of a cell), and the most ever used at once.
#[derive(Default)]
pub struct Concurrency {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Concurrency {
    pub(crate) fn start(&self, weight: usize) {
        let n = self.now.fetch_add(weight, Ordering::SeqCst) + weight;
        self.peak.fetch_max(n, Ordering::SeqCst);
    }
    pub(crate) fn end(&self, weight: usize) {
        self.now.fetch_sub(weight, Ordering::SeqCst);
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

/// What the device reports on its own.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Pcp(FromDevice),
    /// Business data after a sleep: the platform learns the device is back.
    Woke,
}

/// Business data a woken device reports.
pub const WOKE: &[u8] = br#"{"woke": true}"#;

impl Report {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Report::Pcp(m) => m.encode(),
            Report::Woke => WOKE.to_vec(),
        }
    }
}

/// The answers to one request of the platform: the first may ride in the ACK.
pub struct Answers {
    pub in_ack: Option<FromDevice>,
    pub after: Vec<FromDevice>,
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
    pub behaviour: Behaviour,
    pub log: Log,
    /// The package it expects to receive.
    package: Arc<Vec<u8>>,
    download: Option<Download>,
    outstanding: Option<Outstanding>,
    asleep_until: Option<Instant>,
    rebooting_until: Option<Instant>,
    counted: bool,
    /// What it counts in while downloading, with its weight.
    concurrency: Option<(Arc<Concurrency>, usize)>,
}

impl PcpDevice {
    pub fn new(behaviour: Behaviour, package: Arc<Vec<u8>>) -> PcpDevice {
        PcpDevice {
            behaviour,
            log: Log::default(),
            package,
            download: None,
            outstanding: None,
            asleep_until: None,
            rebooting_until: None,
            counted: false,
            concurrency: None,
        }
    }

    /// Counts its downloads in `c` with `weight`.
    pub fn counting(mut self, c: Arc<Concurrency>, weight: usize) -> PcpDevice {
        self.concurrency = Some((c, weight));
        self
    }

    /// When [`PcpDevice::due`] next has something to do, if ever.
    pub fn next_due(&self) -> Option<Instant> {
        let request = self.outstanding.as_ref().filter(|_| !self.radio_off()).map(|o| o.next_at);
        [self.asleep_until, self.rebooting_until, request].into_iter().flatten().min()
    }

    pub fn version(&self) -> &str {
        &self.behaviour.version
    }

    /// The package the next campaign brings.
    pub fn expect(&mut self, package: Arc<Vec<u8>>) {
        self.package = package;
        self.log = Log::default();
    }

    /// Asleep or rebooting: what arrives is not heard, not even acknowledged.
    pub fn radio_off(&self) -> bool {
        self.asleep_until.is_some() || self.rebooting_until.is_some()
    }

    /// What is due at `now`: waking up, the result after a reboot, a request sent or sent again.
    pub fn due(&mut self, now: Instant) -> Vec<Report> {
        let mut out = Vec::new();
        if self.asleep_until.is_some_and(|t| now >= t) {
            self.asleep_until = None;
            out.push(Report::Woke);
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
            if self.behaviour.reports_result
                && let Ok(version) = Version::new(&self.behaviour.version)
            {
                self.request(FromDevice::UpgradeResult { result, version }, now);
            }
        }
        if !self.radio_off()
            && let Some(o) = &mut self.outstanding
            && now >= o.next_at
        {
            o.next_at = now + self.behaviour.resend;
            if !std::mem::replace(&mut o.sent, true)
                && let FromDevice::ChunkRequest { chunk, .. } = o.msg
            {
                self.log.requested.push(chunk);
            }
            out.push(Report::Pcp(o.msg.clone()));
        }
        out
    }

    /// A request of the platform (the payload of its CON POST) heard at `now`; `None` while the
    /// radio is off.
    pub fn receive(&mut self, payload: &[u8], now: Instant) -> Option<Answers> {
        if self.radio_off() {
            return None;
        }
        let mut replies = Vec::new();
        match FromPlatform::parse(payload) {
            Ok(msg) => self.handle(msg, now, &mut replies),
            Err(_) => self.log.malformed += 1,
        }
        let in_ack = (self.behaviour.answers_in_ack && !replies.is_empty()).then(|| replies.remove(0));
        Some(Answers { in_ack, after: replies })
    }

    fn request(&mut self, msg: FromDevice, at: Instant) {
        self.outstanding = Some(Outstanding { msg, next_at: at, sent: false });
    }

    fn handle(&mut self, msg: FromPlatform, now: Instant, replies: &mut Vec<FromDevice>) {
        let b = self.behaviour.clone();
        match msg {
            FromPlatform::QueryVersion => {
                self.log.queries += 1;
                if b.answers_query
                    && let Ok(version) = Version::new(&b.version)
                {
                    replies.push(FromDevice::Version { result: ResultCode::OK, version });
                }
            }
            FromPlatform::NewVersion { version, chunk_size, chunk_count } => {
                self.log.notifications += 1;
                if version.as_str() == b.version {
                    return replies.push(FromDevice::NotifyAnswer { result: ResultCode::ALREADY_LATEST });
                }
                if b.notify_result != 0 {
                    return replies.push(FromDevice::NotifyAnswer { result: ResultCode(b.notify_result) });
                }
                replies.push(FromDevice::NotifyAnswer { result: ResultCode::OK });
                if self.download.as_ref().is_none_or(|d| d.version != version) {
                    self.download = Some(Download {
                        version,
                        chunk_size: chunk_size as usize,
                        chunks: vec![None; chunk_count as usize],
                    });
                }
                if !self.counted {
                    self.counted = true;
                    if let Some((c, weight)) = &self.concurrency {
                        c.start(*weight);
                    }
                }
                self.ask_next(now);
            }
            FromPlatform::Chunk { result, chunk, data } => {
                let waiting = matches!(&self.outstanding, Some(Outstanding { msg: FromDevice::ChunkRequest { chunk: c, .. }, .. }) if *c == chunk);
                if !waiting {
                    return;
                }
                if result != ResultCode::OK {
                    return self.log.chunk_refusals.push(result);
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
                    self.asleep_until = Some(now + b.sleep_for);
                    return;
                }
                self.ask_next(now + b.chunk_delay);
            }
            FromPlatform::DownloadResultAnswer { .. } => {
                // Ignored, as the LiteOS agent does: it resends 22 until 23 comes.
            }
            FromPlatform::Execute => {
                if !matches!(&self.outstanding, Some(Outstanding { msg: FromDevice::DownloadResult { .. }, .. })) {
                    return;
                }
                self.outstanding = None;
                replies.push(FromDevice::ExecuteAnswer { result: ResultCode::OK });
                self.rebooting_until = Some(now + b.reboot);
            }
            FromPlatform::UpgradeResultAnswer { .. } => {
                if matches!(&self.outstanding, Some(Outstanding { msg: FromDevice::UpgradeResult { .. }, .. })) {
                    self.outstanding = None;
                    self.log.upgrade_answered = true;
                }
            }
        }
    }

    /// Asks (at `at`) for the first chunk not kept yet, or reports the download complete.
    fn ask_next(&mut self, at: Instant) {
        let Some(d) = &self.download else { return };
        match d.chunks.iter().position(Option::is_none) {
            Some(n) => {
                let msg = FromDevice::ChunkRequest { version: d.version, chunk: n as u16 };
                self.request(msg, at);
            }
            None => {
                self.log.image = Some(d.chunks.iter().flatten().flatten().copied().collect());
                if self.counted {
                    self.counted = false;
                    if let Some((c, weight)) = &self.concurrency {
                        c.end(*weight);
                    }
                }
                self.request(FromDevice::DownloadResult { result: ResultCode::OK }, at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: &str) -> Version {
        Version::new(v).unwrap()
    }

    /// A whole upgrade, driven in memory: the device asks for each chunk once, verifies the
    /// image, reboots into the new version and reports it.
    #[test]
    fn follows_the_platform_through_an_upgrade() {
        let package: Arc<Vec<u8>> = Arc::new((0..25u8).collect());
        let mut d = PcpDevice::new(Behaviour::healthy("V1"), package.clone());
        let t0 = Instant::now();
        let notify = FromPlatform::NewVersion { version: version("V2"), chunk_size: 10, chunk_count: 3 };
        let a = d.receive(&notify.encode(), t0).unwrap();
        assert_eq!(a.after, [FromDevice::NotifyAnswer { result: ResultCode::OK }]);
        assert_eq!(d.next_due(), Some(t0), "the first chunk request is due at once");
        for n in 0..3u16 {
            let asked = d.due(t0);
            assert_eq!(d.next_due(), Some(t0 + Duration::from_millis(300)), "then again after the resend time");
            assert_eq!(asked, [Report::Pcp(FromDevice::ChunkRequest { version: version("V2"), chunk: n })]);
            assert!(d.due(t0).is_empty(), "not sent again before the resend time");
            let data = package[n as usize * 10..(n as usize * 10 + 10).min(25)].to_vec();
            d.receive(&FromPlatform::Chunk { result: ResultCode::OK, chunk: n, data }.encode(), t0);
        }
        assert_eq!(d.log.image.as_deref(), Some(&package[..]));
        assert_eq!(d.due(t0), [Report::Pcp(FromDevice::DownloadResult { result: ResultCode::OK })]);
        let later = t0 + Duration::from_millis(300);
        assert_eq!(d.due(later), [Report::Pcp(FromDevice::DownloadResult { result: ResultCode::OK })], "resent");
        let a = d.receive(&FromPlatform::Execute.encode(), later).unwrap();
        assert_eq!(a.after, [FromDevice::ExecuteAnswer { result: ResultCode::OK }]);
        assert!(d.radio_off(), "rebooting");
        assert_eq!(d.next_due(), Some(later + Duration::from_millis(300)), "the reboot ends");
        assert!(d.receive(&FromPlatform::QueryVersion.encode(), later).is_none(), "nothing heard while rebooting");
        let up = d.due(later + Duration::from_millis(300));
        assert_eq!(up, [Report::Pcp(FromDevice::UpgradeResult { result: ResultCode::OK, version: version("V2") })]);
        assert_eq!(d.version(), "V2");
        d.receive(&FromPlatform::UpgradeResultAnswer { result: ResultCode::OK }.encode(), later);
        assert!(d.log.upgrade_answered && d.log.bad_chunks == 0 && d.log.requested == [0, 1, 2]);
    }

    #[test]
    fn a_chunk_that_differs_from_the_package_is_counted_and_garbage_is_malformed() {
        let mut d = PcpDevice::new(Behaviour::healthy("V1"), Arc::new(vec![1; 4]));
        let t0 = Instant::now();
        d.receive(&FromPlatform::NewVersion { version: version("V2"), chunk_size: 4, chunk_count: 1 }.encode(), t0);
        d.due(t0);
        d.receive(&FromPlatform::Chunk { result: ResultCode::OK, chunk: 0, data: vec![2; 4] }.encode(), t0);
        assert_eq!(d.log.bad_chunks, 1);
        assert!(d.receive(b"\x00garbage", t0).unwrap().after.is_empty());
        assert_eq!(d.log.malformed, 1);
    }
}

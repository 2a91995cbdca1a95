//! One device's upgrade within a task (SPEC §6, seed 003 §3.7): a state machine driven by what
//! the device says (PCP messages, any sign of life), by the clock (timeouts, asking again) and by
//! its cell's download budget. Free of I/O and clocks: the caller passes `now`, delivers what a
//! step asks to send and stores the record when a step says it changed.
//!
//! Real PCP agents resend their requests (21, 22, 24) every few seconds until answered, so every
//! request is answered each time it comes and changes the state at most once.

use serde::{Deserialize, Serialize};

use super::coverage::{CellBudget, Coverage};
use super::pcp::{FromDevice, FromPlatform, ResultCode, Version};
use super::task::UpgradeTaskId;
use crate::clock::UnixMs;
use crate::config::OtaConfig;
use crate::identity::DeviceId;

/// Where a device's upgrade stands (API.md's per-device `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    WaitingOnline,
    QueryingVersion,
    WaitingRadio,
    WaitingSlot,
    Notified,
    Downloading,
    Downloaded,
    Upgrading,
    Succeeded,
    Failed,
    Canceled,
}

impl Stage {
    pub const ALL: [Stage; 11] = [
        Stage::WaitingOnline,
        Stage::QueryingVersion,
        Stage::WaitingRadio,
        Stage::WaitingSlot,
        Stage::Notified,
        Stage::Downloading,
        Stage::Downloaded,
        Stage::Upgrading,
        Stage::Succeeded,
        Stage::Failed,
        Stage::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::WaitingOnline => "waiting_online",
            Stage::QueryingVersion => "querying_version",
            Stage::WaitingRadio => "waiting_radio",
            Stage::WaitingSlot => "waiting_slot",
            Stage::Notified => "notified",
            Stage::Downloading => "downloading",
            Stage::Downloaded => "downloaded",
            Stage::Upgrading => "upgrading",
            Stage::Succeeded => "succeeded",
            Stage::Failed => "failed",
            Stage::Canceled => "canceled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Stage::Succeeded | Stage::Failed | Stage::Canceled)
    }

    /// From the device's acceptance of the new version until its result: what it holds is this
    /// attempt's package.
    pub const ACCEPTED: [Stage; 3] = [Stage::Downloading, Stage::Downloaded, Stage::Upgrading];

    /// The device holds a download slot in its cell: from the notification until the download
    /// ends. Installing uses no radio, so the slot goes to the next device then.
    pub fn holds_slot(self) -> bool {
        matches!(self, Stage::Notified | Stage::Downloading)
    }

    /// The device was told to download and may still be asking for chunks.
    fn downloads(self) -> bool {
        matches!(self, Stage::Notified | Stage::Downloading | Stage::Downloaded | Stage::Upgrading)
    }
}

/// Failure reasons the platform reports (seed 003 §3.7, "固件升级失败原因"), verbatim.
pub mod reason {
    pub const TASK_CONFLICT: &str = "Task Conflict";
    pub const ONLINE_TIMEOUT: &str = "Waiting for the device online timeout";
    pub const VERSION_TIMEOUT: &str = "Waiting for report device firmware version timeout";
    pub const RADIO_TIMEOUT: &str = "Waiting for report cellId timeout";
    pub const START_DOWNLOAD_TIMEOUT: &str = "Waiting for device start download package timeout";
    pub const DOWNLOAD_TIMEOUT: &str = "Waiting for device downloaded package timeout";
    pub const START_UPDATE_TIMEOUT: &str = "Waiting for device start to update timeout";
    pub const RESULT_TIMEOUT: &str = "Wait for the device to report upgrade result timeout";
    pub const RESULT_AND_CHECK_TIMEOUT: &str = "Updating timeout and query device version for check timeout";
}

/// A result code a device reported, as a failure reason: the seed's text where it has one.
pub fn device_reason(code: ResultCode) -> String {
    match code {
        ResultCode::NO_SPACE => "Not enough storage for the new firmware package".into(),
        ResultCode::OUT_OF_MEMORY => "Out of memory during downloading process".into(),
        ResultCode::DOWNLOAD_TIMEOUT => "Connection lost during downloading process".into(),
        ResultCode::PACKAGE_CHECK_FAILED => "Integrity check failure for new downloaded package".into(),
        ResultCode::UNSUPPORTED_PACKAGE => "Unsupported package type".into(),
        ResultCode::INSTALL_FAILED => "Firmware update failed".into(),
        other => format!("The device refused: {} (result code {})", other.reason(), other.0),
    }
}

/// The answer to a device's request when it is in no upgrade at all: requests are answered (or
/// the device asks forever), answers are ignored.
pub fn without_task(msg: &FromDevice) -> Option<FromPlatform> {
    match msg {
        FromDevice::ChunkRequest { chunk, .. } => {
            Some(FromPlatform::Chunk { result: ResultCode::NO_TASK, chunk: *chunk, data: Vec::new() })
        }
        FromDevice::DownloadResult { .. } => Some(FromPlatform::DownloadResultAnswer { result: ResultCode::NO_TASK }),
        FromDevice::UpgradeResult { .. } => Some(FromPlatform::UpgradeResultAnswer { result: ResultCode::OK }),
        FromDevice::Version { .. } | FromDevice::NotifyAnswer { .. } | FromDevice::ExecuteAnswer { .. } => None,
    }
}

/// What the task upgrades to: the package as PCP describes it.
pub struct Target<'a> {
    pub version: &'a Version,
    pub chunk_count: u16,
    pub chunk_size: u16,
    /// Versions a device may upgrade from; empty: any.
    pub source_versions: &'a [String],
}

/// SPEC §6's timers (config `[ota]`), in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    pub online_ms: u64,
    pub query_ms: u64,
    pub radio_ms: u64,
    /// From the notification to the download result.
    pub download_ms: u64,
    /// From the download result to the execute answer, and from there to the upgrade result.
    pub upgrade_ms: u64,
    /// How long an unanswered request (19, 20, 23) or a silent download waits before it is sent
    /// again.
    pub resend_ms: u64,
}

impl From<&OtaConfig> for Timers {
    fn from(c: &OtaConfig) -> Timers {
        Timers {
            online_ms: c.online_timeout_s * 1000,
            query_ms: c.query_timeout_s * 1000,
            radio_ms: c.radio_timeout_s * 1000,
            download_ms: c.download_timeout_s * 1000,
            upgrade_ms: c.upgrade_timeout_s * 1000,
            resend_ms: c.resend_s * 1000,
        }
    }
}

/// A task's retry policy: a failed device starts over `count` more times, `interval_ms` apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    pub count: u8,
    pub interval_ms: u64,
}

/// What every step needs to know.
pub struct Ctx<'a> {
    pub now: UnixMs,
    pub target: &'a Target<'a>,
    pub timers: &'a Timers,
    pub retry: Retry,
}

/// A PCP answer to a device's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Frame(FromPlatform),
    /// Chunk `n` of the package: the caller reads it.
    Chunk(u16),
}

/// What the caller does after a step.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// A request for the device's downlink channel (it replaces one not yet sent).
    pub send: Option<FromPlatform>,
    pub answer: Option<Answer>,
    /// The record changed: store it.
    pub changed: bool,
    /// The stage or the download progress moved: tell subscribers.
    pub progressed: bool,
    /// The device's cell slot is free again.
    pub release: bool,
    /// The version the device said it runs.
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upgrade {
    pub task: UpgradeTaskId,
    pub device: DeviceId,
    pub stage: Stage,
    /// When the stage began; its timeout counts from here (the download's from `notified_at`).
    pub since: u64,
    pub updated_at: u64,
    pub notified_at: Option<u64>,
    /// One past the highest chunk asked for: devices ask in order, so this is how far they are.
    pub next_chunk: u16,
    /// Attempts after the first (the task's retry policy).
    pub attempt: u8,
    /// A retry starts no earlier than this.
    pub retry_at: Option<u64>,
    /// Why the upgrade failed, or why the previous attempt did while a retry waits.
    pub failure: Option<String>,
    /// The cell and coverage the download slot is held with.
    pub slot: Option<(String, Coverage)>,
    /// The upgrade result did not come; the version query decides.
    pub verifying: bool,
    /// The device said it already runs the new version; the version query confirms.
    pub confirming: bool,
    /// When the platform last asked, or the downloading device last asked for a chunk. Not
    /// stored: after a restart everything pending is asked again at once.
    #[serde(skip)]
    pub asked_at: Option<u64>,
}

impl Upgrade {
    /// Whether a request for `chunk` moves this download on: one beyond every chunk asked for
    /// before, within the package. Such requests are bounded by the download itself (one per
    /// chunk and attempt) and the cell budget bounds the downloads at once, so they are not
    /// charged to the device's flow control: LiteOS asks for the next chunk as soon as it holds
    /// one, faster than a per-second message limit allows. Asking again for a chunk is charged.
    pub fn advanced_by(&self, chunk: u16, chunk_count: u16) -> bool {
        self.stage.holds_slot() && chunk >= self.next_chunk && chunk < chunk_count
    }

    /// [`Upgrade::advanced_by`] for a block of a download fetched by URI, which ends in package
    /// chunk `chunk`: a block ending in the chunk reached last counts too, as blocks smaller than
    /// a chunk do (and a block asked again because its answer was lost).
    pub fn advanced_by_block(&self, chunk: u16, chunk_count: u16) -> bool {
        self.stage.holds_slot() && chunk.saturating_add(1) >= self.next_chunk && chunk < chunk_count
    }

    pub fn new(task: UpgradeTaskId, device: DeviceId, now: UnixMs) -> Upgrade {
        Upgrade {
            task,
            device,
            stage: Stage::WaitingOnline,
            since: now.0,
            updated_at: now.0,
            notified_at: None,
            next_chunk: 0,
            attempt: 0,
            retry_at: None,
            failure: None,
            slot: None,
            verifying: false,
            confirming: false,
            asked_at: None,
        }
    }

    /// A device already in another task's upgrade.
    pub fn conflict(task: UpgradeTaskId, device: DeviceId, now: UnixMs) -> Upgrade {
        Upgrade { stage: Stage::Failed, failure: Some(reason::TASK_CONFLICT.into()), ..Upgrade::new(task, device, now) }
    }

    /// Download progress, 0..=100.
    pub fn progress(&self, chunk_count: u16) -> u8 {
        match self.stage {
            Stage::Downloaded | Stage::Upgrading | Stage::Succeeded => 100,
            _ if chunk_count == 0 => 0,
            // 100 only once the device says the download is complete.
            _ => (self.next_chunk as u32 * 100 / chunk_count as u32).min(99) as u8,
        }
    }

    fn enter(&mut self, stage: Stage, now: UnixMs, step: &mut Step) {
        step.release |= self.stage.holds_slot() && !stage.holds_slot();
        self.stage = stage;
        self.since = now.0;
        self.asked_at = None;
        step.changed = true;
        step.progressed = true;
    }

    fn ask(&mut self, request: FromPlatform, now: UnixMs, step: &mut Step) {
        self.asked_at = Some(now.0);
        step.send = Some(request);
    }

    /// Ends this attempt; with retries left the device starts over after the interval.
    fn fail(&mut self, ctx: &Ctx, why: String, retryable: bool, step: &mut Step) {
        if retryable && self.attempt < ctx.retry.count {
            self.enter(Stage::WaitingOnline, ctx.now, step);
            self.attempt += 1;
            let at = ctx.now.0 + ctx.retry.interval_ms;
            self.retry_at = Some(at);
            self.since = at;
            self.next_chunk = 0;
            self.notified_at = None;
        } else {
            self.enter(Stage::Failed, ctx.now, step);
        }
        self.slot = None;
        self.verifying = false;
        self.confirming = false;
        self.failure = Some(why);
    }

    fn succeed(&mut self, ctx: &Ctx, step: &mut Step) {
        self.enter(Stage::Succeeded, ctx.now, step);
        self.slot = None;
        self.failure = None;
        self.verifying = false;
        self.confirming = false;
    }

    /// The device showed life: a waiting upgrade starts by asking its version.
    pub fn contact(&mut self, ctx: &Ctx) -> Step {
        let mut step = Step::default();
        if self.stage == Stage::WaitingOnline && self.retry_at.is_none_or(|at| ctx.now.0 >= at) {
            self.retry_at = None;
            self.enter(Stage::QueryingVersion, ctx.now, &mut step);
            self.ask(FromPlatform::QueryVersion, ctx.now, &mut step);
        }
        self.finish(ctx, step)
    }

    /// The operator stopped the task.
    pub fn stop(&mut self, ctx: &Ctx) -> Step {
        let mut step = Step::default();
        if !self.stage.is_final() {
            self.enter(Stage::Canceled, ctx.now, &mut step);
            self.slot = None;
            self.retry_at = None;
        }
        self.finish(ctx, step)
    }

    /// The device refused or could not do what was asked of it (an LwM2M error answer, a failed
    /// update result): the attempt fails with `why`, retried as the task allows.
    pub fn refused(&mut self, ctx: &Ctx, why: String) -> Step {
        let mut step = Step::default();
        if !self.stage.is_final() && self.stage != Stage::WaitingOnline {
            self.fail(ctx, why, true, &mut step);
        }
        self.finish(ctx, step)
    }

    /// A PCP message from the device.
    pub fn pcp(&mut self, ctx: &Ctx, msg: &FromDevice) -> Step {
        let mut step = Step::default();
        let target = ctx.target;
        match msg {
            FromDevice::Version { result, version } => {
                if *result == ResultCode::OK {
                    step.version = Some(version.to_string());
                }
                let querying =
                    self.stage == Stage::QueryingVersion || (self.stage == Stage::Upgrading && self.verifying);
                if querying {
                    self.version_answered(ctx, *result, version, &mut step);
                }
            }
            FromDevice::NotifyAnswer { result } => match (self.stage, *result) {
                (Stage::Notified, ResultCode::OK) => self.enter(Stage::Downloading, ctx.now, &mut step),
                (Stage::Notified | Stage::Downloading, ResultCode::ALREADY_LATEST) => {
                    self.enter(Stage::QueryingVersion, ctx.now, &mut step);
                    self.slot = None;
                    self.confirming = true;
                    self.ask(FromPlatform::QueryVersion, ctx.now, &mut step);
                }
                (Stage::Downloading, ResultCode::OK) => {}
                (Stage::Notified | Stage::Downloading, refused) => {
                    self.fail(ctx, device_reason(refused), true, &mut step)
                }
                _ => {}
            },
            FromDevice::ChunkRequest { version, chunk } => {
                step.answer = Some(if version != target.version || !self.stage.downloads() {
                    Answer::Frame(FromPlatform::Chunk { result: ResultCode::NO_TASK, chunk: *chunk, data: Vec::new() })
                } else if *chunk >= target.chunk_count {
                    Answer::Frame(FromPlatform::Chunk { result: ResultCode::NO_CHUNK, chunk: *chunk, data: Vec::new() })
                } else {
                    self.chunk_asked(ctx, *chunk, &mut step);
                    Answer::Chunk(*chunk)
                });
            }
            FromDevice::DownloadResult { result } => {
                let answer = match self.stage {
                    Stage::Notified | Stage::Downloading if *result == ResultCode::OK => {
                        self.enter(Stage::Downloaded, ctx.now, &mut step);
                        self.slot = None;
                        self.ask(FromPlatform::Execute, ctx.now, &mut step);
                        ResultCode::OK
                    }
                    Stage::Notified | Stage::Downloading => {
                        self.fail(ctx, device_reason(*result), true, &mut step);
                        ResultCode::OK
                    }
                    // The device resends 22 until the execute request reaches it.
                    Stage::Downloaded => {
                        self.ask(FromPlatform::Execute, ctx.now, &mut step);
                        ResultCode::OK
                    }
                    Stage::Upgrading | Stage::Succeeded | Stage::Failed => ResultCode::OK,
                    _ => ResultCode::NO_TASK,
                };
                step.answer = Some(Answer::Frame(FromPlatform::DownloadResultAnswer { result: answer }));
            }
            FromDevice::ExecuteAnswer { result } => {
                if self.stage == Stage::Downloaded {
                    if *result == ResultCode::OK {
                        self.enter(Stage::Upgrading, ctx.now, &mut step);
                    } else {
                        self.fail(ctx, device_reason(*result), true, &mut step);
                    }
                }
            }
            FromDevice::UpgradeResult { result, version } => {
                if *result == ResultCode::OK {
                    step.version = Some(version.to_string());
                }
                if self.stage.downloads() {
                    if *result != ResultCode::OK {
                        self.fail(ctx, device_reason(*result), true, &mut step);
                    } else if version == target.version {
                        self.succeed(ctx, &mut step);
                    } else {
                        let why =
                            format!("The device reports version {version} after the upgrade, not {}", target.version);
                        self.fail(ctx, why, true, &mut step);
                    }
                }
                // Answered whatever the state, or the device asks forever.
                step.answer = Some(Answer::Frame(FromPlatform::UpgradeResultAnswer { result: ResultCode::OK }));
            }
        }
        self.finish(ctx, step)
    }

    fn version_answered(&mut self, ctx: &Ctx, result: ResultCode, version: &Version, step: &mut Step) {
        let target = ctx.target;
        if result != ResultCode::OK {
            return self.fail(ctx, device_reason(result), true, step);
        }
        if version == target.version {
            return self.succeed(ctx, step);
        }
        if self.verifying {
            return self.fail(ctx, reason::RESULT_TIMEOUT.into(), true, step);
        }
        if self.confirming {
            let why = format!("The device says it already runs the new version, but reports {version}");
            return self.fail(ctx, why, false, step);
        }
        if !target.source_versions.is_empty() && !target.source_versions.iter().any(|v| v == version.as_str()) {
            let why = format!("The device runs {version}, which the package does not upgrade from");
            return self.fail(ctx, why, false, step);
        }
        self.enter(Stage::WaitingRadio, ctx.now, step);
    }

    fn chunk_asked(&mut self, ctx: &Ctx, chunk: u16, step: &mut Step) {
        let before = self.progress(ctx.target.chunk_count);
        if self.stage == Stage::Notified {
            self.enter(Stage::Downloading, ctx.now, step);
        }
        if self.stage == Stage::Downloading {
            self.asked_at = Some(ctx.now.0);
            self.next_chunk = self.next_chunk.max(chunk + 1);
            // Stored and announced every tenth, not every chunk.
            if self.progress(ctx.target.chunk_count) / 10 != before / 10 {
                step.changed = true;
                step.progressed = true;
            }
        }
    }

    /// Time passed: timeouts, requests to send again, and the radio and slot stages, which
    /// `radio` (the device's coverage and cell, if known) and `budget` decide. `awake`: the
    /// device is in its awake window, so a waiting upgrade may start without new contact.
    pub fn tick(&mut self, ctx: &Ctx, awake: bool, radio: Option<(&str, Coverage)>, budget: &mut CellBudget) -> Step {
        let now = ctx.now.0;
        let t = ctx.timers;
        let due = |from: u64, after: u64| now >= from.saturating_add(after);
        let resend = |asked: Option<u64>| asked.is_none_or(|a| due(a, t.resend_ms));
        if self.stage == Stage::WaitingOnline && awake {
            let step = self.contact(ctx);
            if step.changed {
                return step;
            }
        }
        let mut step = Step::default();
        match self.stage {
            Stage::WaitingOnline if due(self.since, t.online_ms) => {
                self.fail(ctx, reason::ONLINE_TIMEOUT.into(), true, &mut step)
            }
            Stage::QueryingVersion if due(self.since, t.query_ms) => {
                self.fail(ctx, reason::VERSION_TIMEOUT.into(), true, &mut step)
            }
            Stage::QueryingVersion if resend(self.asked_at) => self.ask(FromPlatform::QueryVersion, ctx.now, &mut step),
            Stage::WaitingRadio | Stage::WaitingSlot => match radio {
                Some((cell, coverage)) => {
                    if self.stage == Stage::WaitingRadio {
                        self.enter(Stage::WaitingSlot, ctx.now, &mut step);
                    }
                    if budget.acquire(self.device, cell, coverage) {
                        self.slot = Some((cell.to_string(), coverage));
                        self.enter(Stage::Notified, ctx.now, &mut step);
                        self.notified_at = Some(now);
                        let target = ctx.target;
                        let request = FromPlatform::NewVersion {
                            version: *target.version,
                            chunk_size: target.chunk_size,
                            chunk_count: target.chunk_count,
                        };
                        self.ask(request, ctx.now, &mut step);
                    }
                }
                None if self.stage == Stage::WaitingRadio && due(self.since, t.radio_ms) => {
                    self.fail(ctx, reason::RADIO_TIMEOUT.into(), true, &mut step)
                }
                None => {}
            },
            Stage::Notified | Stage::Downloading if due(self.notified_at.unwrap_or(self.since), t.download_ms) => {
                let why = if self.stage == Stage::Notified {
                    reason::START_DOWNLOAD_TIMEOUT
                } else {
                    reason::DOWNLOAD_TIMEOUT
                };
                self.fail(ctx, why.into(), true, &mut step)
            }
            // Unanswered, or the download went quiet (the device slept or rebooted): the same
            // notification again makes it resume from the chunk it kept.
            Stage::Notified | Stage::Downloading if resend(self.asked_at) => {
                let target = ctx.target;
                let request = FromPlatform::NewVersion {
                    version: *target.version,
                    chunk_size: target.chunk_size,
                    chunk_count: target.chunk_count,
                };
                self.ask(request, ctx.now, &mut step)
            }
            Stage::Downloaded if due(self.since, t.upgrade_ms) => {
                self.fail(ctx, reason::START_UPDATE_TIMEOUT.into(), true, &mut step)
            }
            Stage::Downloaded if resend(self.asked_at) => self.ask(FromPlatform::Execute, ctx.now, &mut step),
            Stage::Upgrading if !self.verifying && due(self.since, t.upgrade_ms) => {
                // No result: what the device runs now decides.
                self.verifying = true;
                self.since = now;
                step.changed = true;
                self.ask(FromPlatform::QueryVersion, ctx.now, &mut step);
            }
            Stage::Upgrading if self.verifying && due(self.since, t.query_ms) => {
                self.fail(ctx, reason::RESULT_AND_CHECK_TIMEOUT.into(), true, &mut step)
            }
            Stage::Upgrading if self.verifying && resend(self.asked_at) => {
                self.ask(FromPlatform::QueryVersion, ctx.now, &mut step)
            }
            _ => {}
        }
        self.finish(ctx, step)
    }

    fn finish(&mut self, ctx: &Ctx, step: Step) -> Step {
        if step.changed {
            self.updated_at = ctx.now.0;
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000;

    fn timers() -> Timers {
        Timers {
            online_ms: 86_400_000,
            query_ms: 180_000,
            radio_ms: 180_000,
            download_ms: 3_600_000,
            upgrade_ms: 1_800_000,
            resend_ms: 30_000,
        }
    }

    #[test]
    fn only_requests_for_new_chunks_of_a_download_move_it_on() {
        let mut up = Upgrade::new(UpgradeTaskId(1), DeviceId(7), UnixMs(T0));
        assert!(!up.advanced_by(0, 4), "not downloading yet");
        up.stage = Stage::Downloading;
        up.next_chunk = 2;
        assert!(up.advanced_by(2, 4) && up.advanced_by(3, 4));
        assert!(!up.advanced_by(1, 4), "asked before");
        assert!(!up.advanced_by(4, 4), "beyond the package");
        up.stage = Stage::Downloaded;
        assert!(!up.advanced_by(3, 4));
        // By URI, a block ending in the chunk reached last counts too.
        up.stage = Stage::Downloading;
        assert!(up.advanced_by_block(1, 4) && up.advanced_by_block(2, 4));
        assert!(!up.advanced_by_block(0, 4), "two chunks back");
        assert!(!up.advanced_by_block(4, 4), "beyond the package");
    }

    struct Bench {
        up: Upgrade,
        version: Version,
        sources: Vec<String>,
        timers: Timers,
        retry: Retry,
        budget: CellBudget,
        now: u64,
    }

    impl Bench {
        fn new() -> Bench {
            Bench {
                up: Upgrade::new(UpgradeTaskId(1), DeviceId(7), UnixMs(T0)),
                version: Version::new("V2.0").unwrap(),
                sources: Vec::new(),
                timers: timers(),
                retry: Retry::default(),
                budget: CellBudget::default(),
                now: T0,
            }
        }

        fn run<R>(&mut self, f: impl FnOnce(&mut Upgrade, &Ctx, &mut CellBudget) -> R) -> R {
            let target =
                Target { version: &self.version, chunk_count: 4, chunk_size: 100, source_versions: &self.sources };
            let ctx = Ctx { now: UnixMs(self.now), target: &target, timers: &self.timers, retry: self.retry };
            f(&mut self.up, &ctx, &mut self.budget)
        }

        fn pcp(&mut self, msg: FromDevice) -> Step {
            self.run(|u, c, _| u.pcp(c, &msg))
        }

        fn tick(&mut self, radio: Option<(&str, Coverage)>) -> Step {
            self.run(|u, c, b| u.tick(c, false, radio, b))
        }

        fn contact(&mut self) -> Step {
            self.run(|u, c, _| u.contact(c))
        }

        fn at(&mut self, offset_ms: u64) -> &mut Bench {
            self.now = T0 + offset_ms;
            self
        }

        fn version(&self, v: &str) -> FromDevice {
            FromDevice::Version { result: ResultCode::OK, version: Version::new(v).unwrap() }
        }

        /// Up to the notification, in cell "c1" at level 0.
        fn notified(&mut self) {
            assert_eq!(self.contact().send, Some(FromPlatform::QueryVersion));
            let v = self.version("V1.0");
            assert_eq!(self.pcp(v).version.as_deref(), Some("V1.0"));
            assert_eq!(self.up.stage, Stage::WaitingRadio);
            let step = self.tick(Some(("c1", Coverage::Level(0))));
            assert!(matches!(step.send, Some(FromPlatform::NewVersion { chunk_count: 4, chunk_size: 100, .. })));
            assert_eq!(self.up.stage, Stage::Notified);
        }
    }

    #[test]
    fn a_whole_upgrade_step_by_step() {
        let mut b = Bench::new();
        assert_eq!(b.tick(None), Step::default(), "nothing happens before the device shows life");
        b.notified();
        assert_eq!(b.budget.used("c1"), 1);
        b.pcp(FromDevice::NotifyAnswer { result: ResultCode::OK });
        assert_eq!(b.up.stage, Stage::Downloading);
        for n in [0, 1, 1, 2, 3] {
            let v = b.version;
            let step = b.pcp(FromDevice::ChunkRequest { version: v, chunk: n });
            assert_eq!(step.answer, Some(Answer::Chunk(n)), "every chunk, any number of times");
        }
        assert_eq!(b.up.progress(4), 99);
        let step = b.pcp(FromDevice::DownloadResult { result: ResultCode::OK });
        assert_eq!(step.send, Some(FromPlatform::Execute));
        assert!(step.release, "the cell slot is free once the download is done");
        assert_eq!(b.up.stage, Stage::Downloaded);
        // the device resends 22 until 23 reaches it: same answer, no second change
        let again = b.pcp(FromDevice::DownloadResult { result: ResultCode::OK });
        assert_eq!(again.answer, Some(Answer::Frame(FromPlatform::DownloadResultAnswer { result: ResultCode::OK })));
        assert!(!again.changed && again.send == Some(FromPlatform::Execute));
        b.pcp(FromDevice::ExecuteAnswer { result: ResultCode::OK });
        assert_eq!(b.up.stage, Stage::Upgrading);
        let v = b.version;
        let done = b.pcp(FromDevice::UpgradeResult { result: ResultCode::OK, version: v });
        assert!(done.changed && b.up.stage == Stage::Succeeded && b.up.progress(4) == 100);
        let repeat = b.pcp(FromDevice::UpgradeResult { result: ResultCode::OK, version: v });
        assert!(!repeat.changed && repeat.answer.is_some(), "a repeated 24 is answered, nothing changes");
    }

    #[test]
    fn the_target_version_already_running_succeeds_without_download() {
        let mut b = Bench::new();
        b.contact();
        let v = b.version("V2.0");
        let step = b.pcp(v);
        assert_eq!((b.up.stage, step.send), (Stage::Succeeded, None));
    }

    #[test]
    fn a_version_the_package_does_not_upgrade_from_fails_without_retry() {
        let mut b = Bench::new();
        b.sources = vec!["V1.1".into()];
        b.retry = Retry { count: 3, interval_ms: 0 };
        b.contact();
        let v = b.version("V1.0");
        b.pcp(v);
        assert_eq!(b.up.stage, Stage::Failed);
        assert!(b.up.failure.as_deref().unwrap().contains("V1.0"));
    }

    #[test]
    fn each_wait_has_its_own_timeout_and_reason() {
        let t = timers();
        let mut b = Bench::new();
        b.at(t.online_ms - 1).tick(None);
        assert_eq!(b.up.stage, Stage::WaitingOnline);
        b.at(t.online_ms).tick(None);
        assert_eq!(b.up.failure.as_deref(), Some(reason::ONLINE_TIMEOUT));

        let mut b = Bench::new();
        b.contact();
        // asked again while unanswered, then given up
        assert_eq!(b.at(t.resend_ms).tick(None).send, Some(FromPlatform::QueryVersion));
        b.at(t.query_ms).tick(None);
        assert_eq!(b.up.failure.as_deref(), Some(reason::VERSION_TIMEOUT));

        let mut b = Bench::new();
        b.contact();
        let v = b.version("V1.0");
        b.pcp(v);
        b.at(t.radio_ms).tick(None);
        assert_eq!(b.up.failure.as_deref(), Some(reason::RADIO_TIMEOUT));

        let mut b = Bench::new();
        b.notified();
        let step = b.at(t.download_ms).tick(None);
        assert!(step.release);
        assert_eq!(b.up.failure.as_deref(), Some(reason::START_DOWNLOAD_TIMEOUT));

        let mut b = Bench::new();
        b.notified();
        let v = b.version;
        b.pcp(FromDevice::ChunkRequest { version: v, chunk: 0 });
        b.at(t.download_ms).tick(None);
        assert_eq!(b.up.failure.as_deref(), Some(reason::DOWNLOAD_TIMEOUT));

        let mut b = Bench::new();
        b.notified();
        b.pcp(FromDevice::DownloadResult { result: ResultCode::OK });
        b.at(t.upgrade_ms).tick(None);
        assert_eq!(b.up.failure.as_deref(), Some(reason::START_UPDATE_TIMEOUT));
    }

    #[test]
    fn a_missing_upgrade_result_is_settled_by_asking_the_version() {
        let t = timers();
        for (answer, outcome) in
            [(Some("V2.0"), Stage::Succeeded), (Some("V1.0"), Stage::Failed), (None, Stage::Failed)]
        {
            let mut b = Bench::new();
            b.notified();
            b.pcp(FromDevice::DownloadResult { result: ResultCode::OK });
            b.pcp(FromDevice::ExecuteAnswer { result: ResultCode::OK });
            assert_eq!(b.at(t.upgrade_ms).tick(None).send, Some(FromPlatform::QueryVersion));
            assert_eq!(b.up.stage, Stage::Upgrading);
            match answer {
                Some(v) => {
                    let v = b.version(v);
                    b.pcp(v);
                }
                None => {
                    b.at(t.upgrade_ms + t.query_ms).tick(None);
                }
            }
            assert_eq!(b.up.stage, outcome);
            let expected = match answer {
                Some("V2.0") => None,
                Some(_) => Some(reason::RESULT_TIMEOUT),
                None => Some(reason::RESULT_AND_CHECK_TIMEOUT),
            };
            assert_eq!(b.up.failure.as_deref(), expected);
        }
    }

    #[test]
    fn device_refusals_and_failures_map_to_reasons_and_retry() {
        let mut b = Bench::new();
        b.retry = Retry { count: 1, interval_ms: 60_000 };
        b.notified();
        let step = b.pcp(FromDevice::NotifyAnswer { result: ResultCode::LOW_BATTERY });
        assert!(step.release);
        assert_eq!(b.up.stage, Stage::WaitingOnline, "retried");
        assert!(b.up.failure.as_deref().unwrap().contains("low battery"));
        assert_eq!(b.contact(), Step::default(), "not before the interval");
        b.at(60_000);
        b.notified();
        b.pcp(FromDevice::DownloadResult { result: ResultCode::OK });
        b.pcp(FromDevice::ExecuteAnswer { result: ResultCode::OK });
        let v = b.version("V2.0");
        let FromDevice::Version { version, .. } = v else { unreachable!() };
        b.pcp(FromDevice::UpgradeResult { result: ResultCode::INSTALL_FAILED, version });
        assert_eq!(b.up.stage, Stage::Failed, "no retries left");
        assert_eq!(b.up.failure.as_deref(), Some("Firmware update failed"));
    }

    #[test]
    fn a_repeated_notification_resumes_a_quiet_download() {
        let t = timers();
        let mut b = Bench::new();
        b.notified();
        let v = b.version;
        b.pcp(FromDevice::ChunkRequest { version: v, chunk: 0 });
        b.pcp(FromDevice::ChunkRequest { version: v, chunk: 1 });
        assert_eq!(b.at(t.resend_ms - 1).tick(None).send, None);
        assert!(matches!(b.at(t.resend_ms).tick(None).send, Some(FromPlatform::NewVersion { .. })));
        assert_eq!(b.pcp(FromDevice::ChunkRequest { version: v, chunk: 2 }).answer, Some(Answer::Chunk(2)));
        assert_eq!(b.up.next_chunk, 3);
    }

    #[test]
    fn already_latest_is_confirmed_by_the_version() {
        let mut b = Bench::new();
        b.notified();
        let step = b.pcp(FromDevice::NotifyAnswer { result: ResultCode::ALREADY_LATEST });
        assert!(step.release && step.send == Some(FromPlatform::QueryVersion));
        let v = b.version("V2.0");
        b.pcp(v);
        assert_eq!(b.up.stage, Stage::Succeeded);
    }

    #[test]
    fn requests_outside_a_download_are_refused_not_served() {
        let mut b = Bench::new();
        let v = b.version;
        let step = b.pcp(FromDevice::ChunkRequest { version: v, chunk: 0 });
        assert!(matches!(step.answer, Some(Answer::Frame(FromPlatform::Chunk { result: ResultCode::NO_TASK, .. }))));
        b.notified();
        let step = b.pcp(FromDevice::ChunkRequest { version: v, chunk: 4 });
        assert!(matches!(step.answer, Some(Answer::Frame(FromPlatform::Chunk { result: ResultCode::NO_CHUNK, .. }))));
        let other = Version::new("V9").unwrap();
        let step = b.pcp(FromDevice::ChunkRequest { version: other, chunk: 0 });
        assert!(matches!(step.answer, Some(Answer::Frame(FromPlatform::Chunk { result: ResultCode::NO_TASK, .. }))));
    }

    #[test]
    fn the_cell_budget_decides_who_is_notified() {
        let mut b = Bench::new();
        b.budget.acquire(DeviceId(99), "c1", Coverage::Level(2));
        b.contact();
        let v = b.version("V1.0");
        b.pcp(v);
        assert_eq!(b.tick(Some(("c1", Coverage::Level(0)))).send, None);
        assert_eq!(b.up.stage, Stage::WaitingSlot);
        b.budget.release(DeviceId(99));
        assert!(b.tick(Some(("c1", Coverage::Level(0)))).send.is_some());
        assert_eq!(b.up.stage, Stage::Notified);
        let step = b.run(|u, c, _| u.stop(c));
        assert!(step.release && b.up.stage == Stage::Canceled);
    }
}

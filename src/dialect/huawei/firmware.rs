//! Firmware upgrades over LwM2M Object 5 (seed 003 §3.7; wire rules in
//! [`crate::dialect::lwm2m::firmware`]) for clients of a product whose `ota_protocol` is `lwm2m`.
//! The campaign's upgrade state machine is the PCP one: each of its requests becomes LwM2M
//! operations, sent one after another, and what the client answers or notifies becomes the PCP
//! message that means the same, so timeouts, the cell budget, retries and failure reasons are
//! the same as a PCP task's.
//!
//! | the upgrade asks | the client is sent | what moves it on |
//! |---|---|---|
//! | query version | Read `/4/0/2`, `/4/0/3`, `/4/0/8` (radio), then `/3/0/3` | the version read |
//! | new version | Observe `/5/0/3`, Write `/5/0/1` = package URI | 2.04; blocks fetched; state 2 |
//! | execute | Execute `/5/0/2` | 2.04 |
//! | (result) | Read `/5/0/5` once the state returns to 0 or the client registers again, then `/3/0/3` | result 1 and the version |

use std::net::SocketAddr;
use std::sync::Arc;

use super::{Huawei, Started};
use crate::clock::Now;
use crate::coap::block::Block;
use crate::coap::message::{Code, MessageType};
use crate::coap::option::{OptionNumber, content_format};
use crate::coap::resource::{ExchangeKey, Outgoing, Reply, Request, Response};
use crate::dialect::lwm2m::firmware::{self as object5, Resource, UpdateResult, UpdateState};
use crate::dialect::refusal::Refusal;
use crate::dialect::{Effects, Notified, Outcome, Persist};
use crate::identity::ObserveToken;
use crate::net::PortFamily;
use crate::ota::campaign::NoBlock;
use crate::ota::pcp::{FromDevice, FromPlatform, ResultCode, Version};
use crate::ota::task::UpgradeTaskId;
use crate::ota::upgrade::Stage;
use crate::registry::{Device, DeviceState};
use crate::store::Ops;
use crate::store::records::OtaProtocol;

/// The block size a download gets when the client does not ask for one (agent_tiny asks 512).
const DEFAULT_BLOCK_SIZE: usize = 512;

/// One LwM2M operation of an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FirmwareOp {
    /// Radio state (Object 4), read before the version so that a device that needs the upgrade
    /// can take its cell slot as soon as its version is known. A client without it says 4.04,
    /// and the radio state it reports otherwise decides.
    ReadRadio(Resource),
    ReadVersion,
    /// After an update result of success: the version it runs now decides.
    ConfirmVersion,
    ObserveState,
    WritePackageUri(UpgradeTaskId),
    Execute,
    ReadResult,
}

impl FirmwareOp {
    /// What the operation touches, for a failure reason.
    fn resource(self) -> &'static str {
        match self {
            FirmwareOp::ReadRadio(r) => r.name(),
            FirmwareOp::ReadVersion | FirmwareOp::ConfirmVersion => Resource::FirmwareVersion.name(),
            FirmwareOp::ObserveState => Resource::UpdateState.name(),
            FirmwareOp::WritePackageUri(_) => "/5/0/1",
            FirmwareOp::Execute => "/5/0/2",
            FirmwareOp::ReadResult => Resource::UpdateResult.name(),
        }
    }
}

/// A chain of operations under way: the one sent, those still to send (last first), and the
/// campaign request it carries, if any.
pub(super) struct Chain {
    pub op: FirmwareOp,
    pub rest: Vec<FirmwareOp>,
    pub carrier: Option<ExchangeKey>,
    pub peer: SocketAddr,
}

impl Huawei {
    /// Whether `device` upgrades over Object 5: a registered LwM2M client of a product whose
    /// packages travel so.
    pub(super) fn over_object5(&self, device: &Device, s: &DeviceState) -> bool {
        s.registration.is_some()
            && self.registry.product(device.product_key.as_str()).is_some_and(|p| p.ota_protocol == OtaProtocol::Lwm2m)
    }

    /// The operations that carry the campaign's `request` to `device`, in order.
    pub(super) fn firmware_operations(
        &self,
        device: &Device,
        s: &mut DeviceState,
        request: &FromPlatform,
    ) -> Vec<FirmwareOp> {
        match request {
            FromPlatform::QueryVersion => vec![
                FirmwareOp::ReadRadio(Resource::SignalStrength),
                FirmwareOp::ReadRadio(Resource::LinkQuality),
                FirmwareOp::ReadRadio(Resource::CellId),
                FirmwareOp::ReadVersion,
            ],
            FromPlatform::NewVersion { .. } => match self.campaign.upgrade_of(device.id, s) {
                Some(up) => vec![FirmwareOp::ObserveState, FirmwareOp::WritePackageUri(up.task)],
                None => Vec::new(),
            },
            FromPlatform::Execute => vec![FirmwareOp::Execute],
            // Answers to a PCP device's requests: never queued.
            _ => Vec::new(),
        }
    }

    /// Sends the first of `ops` to `device` at `peer`; the rest follow as each is answered.
    pub(super) fn start_firmware(
        &mut self,
        device: &Arc<Device>,
        peer: SocketAddr,
        mut ops: Vec<FirmwareOp>,
        carrier: Option<ExchangeKey>,
    ) -> Option<Outgoing> {
        ops.reverse();
        let op = ops.pop()?;
        self.send_firmware(device, Chain { op, rest: ops, carrier, peer })
    }

    fn send_firmware(&mut self, device: &Arc<Device>, chain: Chain) -> Option<Outgoing> {
        let token = ObserveToken::generate().0;
        let message = match chain.op {
            FirmwareOp::ReadRadio(r) => object5::read(r, &token),
            FirmwareOp::ReadVersion | FirmwareOp::ConfirmVersion => object5::read(Resource::FirmwareVersion, &token),
            FirmwareOp::ReadResult => object5::read(Resource::UpdateResult, &token),
            FirmwareOp::ObserveState => {
                object5::observe(Resource::UpdateState, self.registry.firmware_observe(device)?)
            }
            FirmwareOp::WritePackageUri(task) => {
                let key = self.registry.firmware_observe(device)?;
                object5::write_package_uri(&token, &self.package_uri(task, key))
            }
            FirmwareOp::Execute => object5::execute_update(&token),
        };
        let exchange = self.registry.next_exchange();
        let retransmit = self.retransmit(device, false);
        let peer = chain.peer;
        self.started.insert(exchange, Started::Firmware { device: device.clone(), chain });
        Some(Outgoing { peer, message, retransmit, exchange })
    }

    /// Where the client fetches `task`'s package: this instance, on the port family it talks on.
    fn package_uri(&self, task: UpgradeTaskId, key: ObserveToken) -> String {
        let (scheme, family) = match self.route.family {
            PortFamily::Dtls => ("coaps", PortFamily::Dtls),
            _ => ("coap", PortFamily::Plain),
        };
        let own = self.cluster.peers.endpoint(&self.cluster.peers.name);
        // agent_tiny fetches over the session it registered on whatever the host says; clients
        // that follow the URI need `cluster.host` when the listener is on every address.
        let (host, port) = own.map_or(("localhost", 0), |e| (e.host.as_str(), e.port(family)));
        object5::package_uri(scheme, host, port, task.0, key)
    }

    /// How an operation ended: its answer moves the upgrade on, and the next operation follows.
    pub(super) fn firmware_answered(
        &mut self,
        now: Now,
        device: &Arc<Device>,
        chain: Chain,
        reply: &Reply<'_, '_>,
        effects: &mut Effects,
    ) {
        let Chain { op, mut rest, carrier, peer } = chain;
        let answered = match reply {
            Reply::Ack(msg) if msg.code.class() == 2 => {
                let cf = msg.uint_option(OptionNumber::CONTENT_FORMAT).ok().flatten();
                self.firmware_result(now, device, op, cf, msg.payload, &mut rest, effects);
                true
            }
            // The client has no Object 4 (modules often lack it): the radio it reports decides.
            Reply::Ack(_) if matches!(op, FirmwareOp::ReadRadio(_)) => true,
            Reply::Ack(msg) => {
                let why = format!("The device answered {} to the {} of {}", msg.code, verb(op), op.resource());
                effects
                    .writes
                    .extend(self.on_campaign(device, |campaign, s| campaign.refused(device, s, now.wall, why)));
                rest.clear();
                true
            }
            // Asked again when the upgrade next asks (the campaign resends).
            Reply::Reset | Reply::TimedOut | Reply::Unsent => {
                tracing::debug!(device = ?device, ?op, "firmware operation unanswered");
                false
            }
        };
        if answered && let Some(next) = rest.pop() {
            effects.outgoing.extend(self.send_firmware(device, Chain { op: next, rest, carrier, peer }));
            return;
        }
        if let Some(exchange) = carrier {
            let mut s = device.state();
            self.campaign.request_ended(device.id, &mut s, exchange, answered);
        }
        if answered {
            self.deliver(now, device, effects);
        }
    }

    /// What a 2.xx answer to `op` says.
    #[allow(clippy::too_many_arguments)]
    fn firmware_result(
        &mut self,
        now: Now,
        device: &Arc<Device>,
        op: FirmwareOp,
        cf: Option<u32>,
        payload: &[u8],
        rest: &mut Vec<FirmwareOp>,
        effects: &mut Effects,
    ) {
        let now_ms = now.wall;
        let writes = match op {
            FirmwareOp::ReadRadio(r) => self.radio_read(device, r, cf, payload).map(|op| smallvec::smallvec![op]),
            FirmwareOp::ReadVersion | FirmwareOp::ConfirmVersion => {
                let version = object5::text(cf, payload)
                    .ok_or_else(|| "The device's firmware version (/3/0/3) is empty or not text".to_string());
                let version = version.and_then(|text| {
                    Version::new(&text)
                        .map_err(|_| format!("The device reports firmware version {text:?}, longer than 16 characters"))
                });
                let msg = match (op, version) {
                    (_, Err(why)) => {
                        return effects
                            .writes
                            .extend(self.on_campaign(device, |c, s| c.refused(device, s, now_ms, why)));
                    }
                    (FirmwareOp::ReadVersion, Ok(version)) => FromDevice::Version { result: ResultCode::OK, version },
                    (_, Ok(version)) => FromDevice::UpgradeResult { result: ResultCode::OK, version },
                };
                self.on_campaign(device, |c, s| c.pcp(device, s, now_ms, &msg).ops)
            }
            FirmwareOp::ObserveState => {
                let state = object5::integer(cf, payload).and_then(UpdateState::from_value);
                // A client already downloading (the upgrade asked again after it went quiet) is
                // not sent the URI again: a Write then may restart or refuse the download. One
                // back at idle (it rebooted, or never got the Write) is.
                if state.is_some_and(|s| s != UpdateState::Idle) {
                    rest.retain(|op| !matches!(op, FirmwareOp::WritePackageUri(_)));
                }
                state.and_then(|state| self.update_state(now, device, state, effects))
            }
            FirmwareOp::WritePackageUri(_) => {
                let msg = FromDevice::NotifyAnswer { result: ResultCode::OK };
                self.on_campaign(device, |c, s| c.pcp(device, s, now_ms, &msg).ops)
            }
            FirmwareOp::Execute => {
                let msg = FromDevice::ExecuteAnswer { result: ResultCode::OK };
                self.on_campaign(device, |c, s| c.pcp(device, s, now_ms, &msg).ops)
            }
            FirmwareOp::ReadResult => match object5::integer(cf, payload).map(UpdateResult::from_value) {
                Some(UpdateResult::Succeeded) => {
                    rest.push(FirmwareOp::ConfirmVersion);
                    None
                }
                Some(UpdateResult::Failed(why)) => self.on_campaign(device, |c, s| c.refused(device, s, now_ms, why)),
                // Nothing finished yet: the upgrade's timers decide.
                Some(UpdateResult::Initial) | None => None,
            },
        };
        effects.writes.extend(writes);
    }

    /// The radio state a read of `resource` gives; the device to store if it changed.
    fn radio_read(
        &self,
        device: &Arc<Device>,
        resource: Resource,
        cf: Option<u32>,
        payload: &[u8],
    ) -> Option<crate::store::Op> {
        let mut s = device.state();
        let before = s.radio.clone();
        match resource {
            Resource::SignalStrength => s.radio.rsrp = Some(object5::integer(cf, payload)? as f64),
            Resource::LinkQuality => s.radio.sinr = Some(object5::integer(cf, payload)? as f64),
            Resource::CellId => {
                let id = object5::integer(cf, payload).map(|v| v.to_string()).or_else(|| object5::text(cf, payload))?;
                s.radio.cell_id = Some(id);
            }
            _ => return None,
        }
        (s.radio != before).then(|| crate::store::Op::PutDevice(device.clone()))
    }

    /// Runs `f` on the campaign under `device`'s lock; what it changed, if anything.
    fn on_campaign(
        &self,
        device: &Device,
        f: impl FnOnce(&crate::ota::campaign::Campaign, &mut DeviceState) -> Ops,
    ) -> Option<Ops> {
        let ops = {
            let mut s = device.state();
            f(&self.campaign, &mut s)
        };
        (!ops.is_empty()).then_some(ops)
    }

    /// The client's update state, notified or read: a finished download is one the upgrade
    /// executes; a return to idle (a reboot, or a failed download) is read for its result.
    /// What to store before the report is acknowledged.
    fn update_state(
        &mut self,
        now: Now,
        device: &Arc<Device>,
        state: UpdateState,
        effects: &mut Effects,
    ) -> Option<Ops> {
        match state {
            UpdateState::Downloaded => {
                let msg = FromDevice::DownloadResult { result: ResultCode::OK };
                let ops = self.on_campaign(device, |c, s| c.pcp(device, s, now.wall, &msg).ops);
                self.deliver(now, device, effects);
                ops
            }
            UpdateState::Idle => {
                self.read_result(device, &[Stage::Downloading, Stage::Downloaded, Stage::Upgrading], effects);
                None
            }
            UpdateState::Downloading | UpdateState::Updating => None,
        }
    }

    /// Reads the update result if `device`'s upgrade is in one of `stages`.
    fn read_result(&mut self, device: &Arc<Device>, stages: &[Stage], effects: &mut Effects) {
        let peer = {
            let mut s = device.state();
            let stage = self.campaign.upgrade_of(device.id, &mut s).map(|up| up.stage);
            if !stage.is_some_and(|st| stages.contains(&st)) || !self.over_object5(device, &s) {
                return;
            }
            s.address
        };
        if let Some(peer) = peer {
            effects.outgoing.extend(self.start_firmware(device, peer, vec![FirmwareOp::ReadResult], None));
        }
    }

    /// A client registered again (after the reboot an update makes): an upgrade waiting for its
    /// result reads it.
    pub(super) fn registered_again(&mut self, device: &Arc<Device>, effects: &mut Effects) {
        self.read_result(device, &[Stage::Upgrading], effects);
    }

    /// A notification under `device`'s firmware observation (`/5/0/3`): acknowledged, never
    /// stored as data.
    pub(super) fn firmware_notification(
        &mut self,
        req: &Request<'_, '_>,
        device: &Arc<Device>,
        effects: &mut Effects,
    ) -> Notified {
        let cf = req.msg.uint_option(OptionNumber::CONTENT_FORMAT).ok().flatten();
        let state = object5::integer(cf, req.msg.payload).and_then(UpdateState::from_value);
        tracing::debug!(device = ?device, ?state, "firmware update state");
        match (state.and_then(|state| self.update_state(req.now, device, state, effects)), req.msg.mtype) {
            (Some(writes), _) => Notified::Store { writes, undo: None, follow_up: None },
            (None, MessageType::Con) => Notified::Acknowledge,
            (None, _) => Notified::Drop,
        }
    }

    /// `GET /fw/<task>/<key>` with Block2: a block of the package of the download the key names.
    /// Any block may be asked, in any order, so a download resumes where it stopped.
    pub fn package_block(&mut self, req: &Request<'_, '_>) -> Outcome {
        if req.method() != Code::GET {
            return Outcome::code(Code::METHOD_NOT_ALLOWED);
        }
        let found = object5::package_of(req.path[1], req.path[2]).and_then(|(task, key)| {
            let device = self.registry.device_by_observe(&key).filter(|d| d.state().firmware_observe == Some(key))?;
            Some((UpgradeTaskId(task), device))
        });
        let Some((task, device)) = found else {
            return self.refuse_lwm2m(req, Refusal::NoPackage, None);
        };
        if req.authenticated.is_some_and(|id| id != device.id) {
            return self.refuse_lwm2m(req, Refusal::ForeignIdentity, Some(&device));
        }
        let block = match req.msg.option(OptionNumber::BLOCK2).map(Block::parse) {
            None => Block { num: 0, more: false, szx: Block::szx_for(DEFAULT_BLOCK_SIZE) },
            Some(Ok(b)) => b,
            Some(Err(_)) => return self.refuse_lwm2m(req, Refusal::BadBlock, Some(&device)),
        };
        let (served, ops) = {
            let mut s = device.state();
            if !s.enabled {
                drop(s);
                return self.refuse_lwm2m(req, Refusal::Disabled, Some(&device));
            }
            self.campaign.block(&device, &mut s, req.now.wall, task, block)
        };
        let response = match served {
            Ok(b) => Response {
                block2: Some(b.block),
                // The whole size with the first block, so the client knows what is coming.
                size2: (b.block.num == 0).then_some(b.size as u32),
                ..Response::with_payload(Code::CONTENT, content_format::OCTET_STREAM, b.data)
            },
            Err(NoBlock::PastEnd) => return self.refuse_lwm2m(req, Refusal::BlockPastEnd, Some(&device)),
            Err(NoBlock::NoDownload) => return self.refuse_lwm2m(req, Refusal::NoPackage, Some(&device)),
        };
        match ops.is_empty() {
            true => Outcome::Respond(response),
            // Progress is stored before the block that made it goes out.
            false => Persist::new(ops, response).into(),
        }
    }
}

fn verb(op: FirmwareOp) -> &'static str {
    match op {
        FirmwareOp::ReadRadio(_) | FirmwareOp::ReadVersion | FirmwareOp::ConfirmVersion | FirmwareOp::ReadResult => {
            "read"
        }
        FirmwareOp::ObserveState => "observation",
        FirmwareOp::WritePackageUri(_) => "write",
        FirmwareOp::Execute => "execute",
    }
}

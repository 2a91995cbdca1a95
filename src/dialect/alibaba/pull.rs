//! `POST /pull` (SPEC §3.4): an Alibaba device never serves requests, so it fetches its queued
//! commands, and any upgrade request of the platform ahead of them. The answer is a separate CON 2.05 listing them (encrypted on 5682); the device's ACK
//! of that response is what makes them DELIVERED.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use smallvec::SmallVec;

use super::Alibaba;
use super::body;
use super::topic::Authorized;
use crate::clock::{Now, UnixMs};
use crate::coap::message::Code;
use crate::coap::option::{OptionNumber, content_format};
use crate::coap::resource::{ExchangeKey, Reply, Request, Response};
use crate::dialect::refusal::Refusal;
use crate::dialect::{Outcome, Persist};
use crate::downlink::Settlement;
use crate::ingest;
use crate::ota::campaign::PlatformRequest;
use crate::registry::Device;
use crate::shadow::device;
use crate::store::Op;
use crate::store::records::OtaProtocol;

/// Most commands one answer carries (Alibaba's `pageSize` range).
const MAX_PAGE: usize = 10;

/// The id an upgrade request (PCP, SPEC §6) carries among the commands of a `/pull` answer; its
/// topic is `/ota/device/upgrade/{pk}/{dn}`.
pub const PCP_MESSAGE_ID: &str = "pcp";

/// The id of the shadow's `control` message among them; its topic is `/shadow/get/{pk}/{dn}`.
pub const SHADOW_MESSAGE_ID: &str = "shadow";

impl Alibaba {
    pub(super) fn pull(&mut self, req: &Request<'_, '_>) -> Outcome {
        // A /pull without a seq on 5682 would hand out commands to anyone who saw the token.
        let unproven = || Outcome::code(Code::BAD_REQUEST);
        let Authorized { device, payload, key, ops: auth_ops, undo, .. } =
            match self.authorize(req, |_| Ok(()), unproven) {
                Ok(a) => a,
                Err(o) => return o,
            };
        let page = match page_size(&payload, req) {
            Some(n) => n,
            None => return self.refuse(req, Refusal::BadPageSize, Some(&device)),
        };
        let now = req.now;
        let exchange = self.registry.next_exchange();
        let mut ops: SmallVec<[Op; 3]> = SmallVec::new();
        let (pcp, commands) = {
            let mut s = device.state();
            ops.extend(ingest::contact(
                &self.registry,
                &self.campaign,
                &device,
                &mut s,
                now.wall,
                req.peer,
                self.route,
            ));
            // An upgrade request goes first, in the place of one command (over PCP only: an
            // Alibaba device has no Object 5).
            let over_pcp = self.registry.ota_protocol(&device) == Some(OtaProtocol::Pcp);
            let pcp = match over_pcp.then(|| self.campaign.request(device.id, &mut s, exchange)) {
                Some(PlatformRequest::Send(request)) => Some(request.encode()),
                _ => None,
            };
            let room = page - pcp.is_some() as usize;
            let (commands, sent) = self.commands.pull(device.id, &s, now.wall, room, exchange);
            // SENT is durable before the commands leave (they leave once these writes are).
            ops.extend(sent);
            (pcp, commands)
        };
        ops.extend(auth_ops);
        let upgrade = pcp.as_ref().map(|frame| {
            let topic = format!("/ota/device/upgrade/{}/{}", device.product_key, device.device_name);
            serde_json::json!({"id": PCP_MESSAGE_ID, "topic": topic, "payload": STANDARD.encode(frame)})
        });
        // What the shadow wants, on every wake until a report matches it (seed 002 §7.2); beside
        // the page, so a shadow that stays unmatched never starves the commands.
        let control = self.shadow_control(&device, now.wall);
        let messages: Vec<_> = upgrade
            .into_iter()
            .chain(control)
            .chain(commands.iter().map(
                |c| serde_json::json!({"id": c.id.to_string(), "topic": c.topic, "payload": STANDARD.encode(&c.payload)}),
            ))
            .collect();
        let body = serde_json::json!({ "messages": messages }).to_string().into_bytes();
        let response = match key {
            // 5682: the answer is under the session key like everything else the device reads.
            Some(key) => Response { payload: key.encrypt(&body), ..Response::new(Code::CONTENT) },
            None => Response::with_payload(Code::CONTENT, content_format::JSON, body),
        };
        let receipt = (!commands.is_empty() || pcp.is_some()).then_some(exchange);
        if receipt.is_some() {
            self.pulls.insert(exchange, device);
        }
        Persist { separate: true, undo, receipt, ..Persist::new(ops, response) }.into()
    }

    /// A `control` message if the device's desired state asks for what it has not reported. It
    /// needs no receipt: it is sent again until a report clears it.
    fn shadow_control(&self, device: &Device, now: UnixMs) -> Option<serde_json::Value> {
        let shadow = match crate::shadow::get(&self.store, device.id) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(device = device.id.0, error = %e, "shadow unreadable; no control message sent");
                return None;
            }
        };
        if shadow.delta().is_empty() {
            return None;
        }
        let topic = device::get_topic(&device.product_key, &device.device_name);
        let payload = STANDARD.encode(device::control(&shadow, now.0));
        Some(serde_json::json!({"id": SHADOW_MESSAGE_ID, "topic": topic, "payload": payload}))
    }

    pub(super) fn settle_pull(&mut self, now: Now, device: &Device, exchange: ExchangeKey, reply: &Reply<'_, '_>) {
        self.campaign.request_ended(device.id, &mut device.state(), exchange, matches!(reply, Reply::Ack(_)));
        let settlement = match reply {
            Reply::Unsent => {
                self.commands.unsend(device, exchange);
                return;
            }
            Reply::Ack(_) => Settlement::Delivered,
            Reply::Reset => {
                Settlement::Failed { reason: "the device rejected the /pull answer (RST)".into(), result: None }
            }
            Reply::TimedOut => Settlement::TimedOut,
        };
        self.commands.settle(device, exchange, &settlement, now.wall);
    }
}

/// `{"pageSize": "1".."10"}` (string or number); an empty body asks for one.
fn page_size(payload: &[u8], req: &Request<'_, '_>) -> Option<usize> {
    if payload.is_empty() {
        return Some(1);
    }
    let cf = req.msg.uint_option(OptionNumber::CONTENT_FORMAT).ok()?;
    let fields = body::parse(cf, payload).ok()?;
    match fields.get("pageSize") {
        None => Some(1),
        Some(v) => v.parse().ok().filter(|n| (1..=MAX_PAGE).contains(n)),
    }
}

//! `POST /t/r?ep=<node id>`: the device announces itself. 2.04 once its contact is durable, then
//! the server's `GET /t/d` with Observe 0 and a fresh token (SPEC §4). LiteOS treats an ACK 5.00
//! as "device does not exist", so an unknown node id gets exactly that.

use smallvec::SmallVec;

use super::Huawei;
use crate::coap::message::{Code, MessageBuilder, MessageType};
use crate::coap::option::OptionNumber;
use crate::coap::resource::{Request, Response};
use crate::dialect::refusal::{Dialect, Refusal};
use crate::dialect::{Outcome, Persist};
use crate::identity::ObserveToken;
use crate::registry::Device;
use crate::telemetry::metric;

impl Huawei {
    pub fn bind(&mut self, req: &Request<'_, '_>) -> Outcome {
        if req.method() != Code::POST {
            return Outcome::code(Code::METHOD_NOT_ALLOWED);
        }
        let refuse = |refusal: Refusal, device: Option<&Device>| {
            refusal.record(Dialect::Huawei, device, req);
            Outcome::code(refusal.code())
        };
        let Some(ep) = req.query("ep").and_then(|ep| std::str::from_utf8(ep).ok()) else {
            return refuse(Refusal::BadQuery, None);
        };
        let Some(device) = self.named(req, ep) else {
            metrics::counter!(metric::AUTH, "result" => "unknown_node").increment(1);
            return refuse(Refusal::UnknownNode, None);
        };
        // Inside DTLS the session already names a device: it may only bind as itself.
        if req.authenticated.is_some_and(|id| id != device.id) {
            return refuse(Refusal::ForeignIdentity, Some(&device));
        }
        {
            let s = device.state();
            // A device that moved to another instance asks /bootstrap on 4.03.
            if !s.enabled {
                return refuse(Refusal::Disabled, Some(&device));
            }
            if !s.home.is_here() {
                return refuse(Refusal::Moved, Some(&device));
            }
        }
        // Not charged to the device's flow control: a bind proves nothing until the device
        // answers the observe request from that address, and node ids are no secret, so a
        // charge would let anyone spend the budget its reports need. What a bind costs is
        // bounded instead: one observe request to the address that asked, never retransmitted.
        metrics::counter!(metric::AUTH, "result" => "ok", "kind" => "bind").increment(1);
        let token = ObserveToken::generate();
        self.registry.ask_observe(&device, token, None);
        let message = MessageBuilder::new(MessageType::Con, Code::GET, 0, &token.0)
            .option(OptionNumber::OBSERVE, &[])
            .option(OptionNumber::URI_PATH, b"t")
            .option(OptionNumber::URI_PATH, b"d")
            .build();
        let follow_up = self.observe_request(req, &device, token, message);
        tracing::debug!(node_id = ep, peer = %req.peer, "bound");
        // Nothing to store yet (the bind counts once the device answers the observe request); the
        // 2.04 still goes through the writer so the observe request follows it.
        Persist { follow_up: Some(follow_up), ..Persist::new(SmallVec::new(), Response::new(Code::CHANGED)) }.into()
    }
}

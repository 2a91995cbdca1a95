//! The LwM2M registration interface (`POST /rd`, `POST /rd/<ep>`, `DELETE /rd/<ep>`; wire rules
//! in [`crate::dialect::lwm2m`]). A Register names the device by its node id and opens the same
//! observe channel a Huawei bind does, on `/19/0/0`: answered 2.01 with its location, the observe
//! request follows, and only the device's answer to it makes the registration effective, stored,
//! and the device heard (so a spoofed Register changes nothing, writes nothing, wakes nothing).

use std::sync::Arc;

use smallvec::smallvec;

use super::{Huawei, Started};
use crate::coap::message::Code;
use crate::coap::option::{OptionNumber, content_format};
use crate::coap::resource::{Outgoing, Request, Response};
use crate::dialect::lwm2m;
use crate::dialect::refusal::{Dialect, Refusal};
use crate::dialect::{Effects, Outcome, Persist};
use crate::identity::ObserveToken;
use crate::ingest;
use crate::registry::Device;
use crate::store::Op;
use crate::store::records::Registration;
use crate::telemetry::metric;

impl Huawei {
    pub(super) fn refuse_lwm2m(&self, req: &Request<'_, '_>, refusal: Refusal, device: Option<&Device>) -> Outcome {
        refusal.record(Dialect::Lwm2m, device, req);
        Outcome::code(refusal.code())
    }

    /// Register: `POST /rd?ep=<node id>&lt=..&b=..` with the client's objects in link format.
    pub fn register(&mut self, req: &Request<'_, '_>) -> Outcome {
        if req.method() != Code::POST {
            return Outcome::code(Code::METHOD_NOT_ALLOWED);
        }
        let register = match lwm2m::register(req.msg.options_of(OptionNumber::URI_QUERY)) {
            Ok(r) => r,
            Err(m) => return self.refuse_lwm2m(req, Refusal::BadRegistration(m), None),
        };
        match req.msg.uint_option(OptionNumber::CONTENT_FORMAT) {
            Ok(None | Some(content_format::LINK_FORMAT | content_format::TEXT | content_format::OCTET_STREAM)) => {}
            _ => return self.refuse_lwm2m(req, Refusal::LinksFormat, None),
        }
        let objects = match lwm2m::objects(req.msg.payload) {
            Ok(o) => o,
            Err(m) => return self.refuse_lwm2m(req, Refusal::BadRegistration(m), None),
        };
        let Some(device) = self.named(req, &register.endpoint) else {
            metrics::counter!(metric::AUTH, "result" => "unknown_endpoint", "kind" => "register").increment(1);
            return self.refuse_lwm2m(req, Refusal::UnknownEndpoint, None);
        };
        if req.authenticated.is_some_and(|id| id != device.id) {
            return self.refuse_lwm2m(req, Refusal::ForeignIdentity, Some(&device));
        }
        let registration = Registration {
            version: register.version,
            lifetime_s: register.lifetime_s,
            queue: register.queue,
            objects,
            updated_at: req.now.wall.0,
        };
        {
            let s = device.state();
            if !s.enabled {
                return self.refuse_lwm2m(req, Refusal::Disabled, Some(&device));
            }
            if !s.home.is_here() {
                return self.refuse_lwm2m(req, Refusal::Moved, Some(&device));
            }
        }
        // Not charged to flow control and not stored yet, like a bind: it takes effect (and is
        // stored) when the device answers the observe request from that address.
        metrics::counter!(metric::AUTH, "result" => "ok", "kind" => "register").increment(1);
        let token = ObserveToken::generate();
        self.registry.ask_observe(&device, token, Some(registration));
        let follow_up = self.observe_request(req, &device, token, lwm2m::observe_data(&token.0));
        tracing::debug!(endpoint = register.endpoint, peer = %req.peer, "registered");
        let response = Response { location_path: vec!["rd".into(), register.endpoint], ..Response::new(Code::CREATED) };
        Persist { follow_up: Some(follow_up), ..Persist::new(smallvec::SmallVec::new(), response) }.into()
    }

    /// The observe request that opens `device`'s channel after a bind or a Register, sent once
    /// to the sender: a spoofed request must not make the server retransmit at a stranger.
    pub(super) fn observe_request(
        &mut self,
        req: &Request<'_, '_>,
        device: &Arc<Device>,
        token: ObserveToken,
        message: Vec<u8>,
    ) -> Outgoing {
        let exchange = self.registry.next_exchange();
        let retransmit = self.retransmit(device, req.authenticated.is_none());
        self.started.insert(exchange, Started::Observe { device: device.clone(), token, peer: req.peer });
        Outgoing { peer: req.peer, message, retransmit, exchange }
    }

    /// Update (`POST /rd/<ep>`) and Deregister (`DELETE /rd/<ep>`) of an existing registration.
    /// Plain CoAP proves nothing about the sender and node ids are no secret, so only the device
    /// itself changes its registration: inside its DTLS session, or from the address its relation
    /// answered from. An Update from elsewhere (a NAT rebinding looks like that) changes nothing
    /// until the device answers an observe request sent there, as after a Register.
    pub fn registration(&mut self, req: &Request<'_, '_>, effects: &mut Effects) -> Outcome {
        let endpoint = req.path[1];
        let device = self.named(req, endpoint).filter(|d| d.state().registration.is_some());
        let Some(device) = device else { return self.refuse_lwm2m(req, Refusal::UnknownRegistration, None) };
        if req.authenticated.is_some_and(|id| id != device.id) {
            return self.refuse_lwm2m(req, Refusal::ForeignIdentity, Some(&device));
        }
        let proven = req.authenticated == Some(device.id) || device.state().address == Some(req.peer);
        match (req.method(), proven) {
            (Code::POST, true) => self.update(req, device, effects),
            (Code::POST, false) => self.update_elsewhere(req, device),
            (Code::DELETE, true) => self.deregister(req, device),
            (Code::DELETE, false) => self.refuse_lwm2m(req, Refusal::ForeignAddress, Some(&device)),
            _ => Outcome::code(Code::METHOD_NOT_ALLOWED),
        }
    }

    /// The Update's changes to `r`, or why it is malformed.
    fn updated(req: &Request<'_, '_>, r: &Registration) -> Result<Registration, Refusal> {
        let update = lwm2m::update(req.msg.options_of(OptionNumber::URI_QUERY)).map_err(Refusal::BadRegistration)?;
        let mut r = r.clone();
        // A payload only when the objects changed.
        if !req.msg.payload.is_empty() {
            r.objects = lwm2m::objects(req.msg.payload).map_err(Refusal::BadRegistration)?;
        }
        r.lifetime_s = update.lifetime_s.unwrap_or(r.lifetime_s);
        r.queue = update.queue.unwrap_or(r.queue);
        r.updated_at = req.now.wall.0;
        Ok(r)
    }

    fn update(&mut self, req: &Request<'_, '_>, device: Arc<Device>, effects: &mut Effects) -> Outcome {
        let now = req.now.wall;
        let mut ops = smallvec::SmallVec::new();
        let (previous, updated) = {
            let mut s = device.state();
            if !s.enabled || !s.home.is_here() {
                let refusal = if s.enabled { Refusal::Moved } else { Refusal::Disabled };
                drop(s);
                return self.refuse_lwm2m(req, refusal, Some(&device));
            }
            let Some(previous) = s.registration.clone() else {
                drop(s);
                return self.refuse_lwm2m(req, Refusal::UnknownRegistration, Some(&device));
            };
            let updated = match Self::updated(req, &previous) {
                Ok(u) => u,
                Err(refusal) => {
                    drop(s);
                    return self.refuse_lwm2m(req, refusal, Some(&device));
                }
            };
            s.registration = Some(updated.clone());
            // The device spoke: its awake window opens.
            ops.extend(ingest::contact(&self.registry, &self.campaign, &device, &mut s, now, req.peer, self.route));
            (previous, updated)
        };
        ops.push(Op::PutDevice(device.clone()));
        // A queue-mode client updates to open a window for what waits for it.
        self.deliver(req.now, &device, effects);
        let undo_device = device.clone();
        Persist {
            // Unless something newer replaced it meanwhile.
            undo: Some(Box::new(move || {
                let mut s = undo_device.state();
                if s.registration.as_ref() == Some(&updated) {
                    s.registration = Some(previous);
                }
            })),
            ..Persist::new(ops, Response::new(Code::CHANGED))
        }
        .into()
    }

    /// An Update from an address the relation did not answer from: the device, moved by a NAT,
    /// or anyone. Answered 2.04 with nothing changed; an observe request goes to that address,
    /// and the device's answer there makes the updated registration and the new address count.
    fn update_elsewhere(&mut self, req: &Request<'_, '_>, device: Arc<Device>) -> Outcome {
        let Some(current) = device.state().registration.clone() else {
            return self.refuse_lwm2m(req, Refusal::UnknownRegistration, Some(&device));
        };
        let updated = match Self::updated(req, &current) {
            Ok(u) => u,
            Err(refusal) => return self.refuse_lwm2m(req, refusal, Some(&device)),
        };
        let token = ObserveToken::generate();
        self.registry.ask_observe(&device, token, Some(updated));
        let follow_up = self.observe_request(req, &device, token, lwm2m::observe_data(&token.0));
        Persist { follow_up: Some(follow_up), ..Persist::new(smallvec::SmallVec::new(), Response::new(Code::CHANGED)) }
            .into()
    }

    /// Deregister: the registration and its relation end, stored before 2.02. If that write
    /// fails the client gets 5.00 and may ask again; the relation stays ended either way.
    fn deregister(&mut self, req: &Request<'_, '_>, device: Arc<Device>) -> Outcome {
        let token = {
            let mut s = device.state();
            s.registration = None;
            s.observe
        };
        if let Some(token) = token {
            self.registry.end_observe(&device, token);
        }
        tracing::debug!(endpoint = req.path[1], peer = %req.peer, "deregistered");
        Persist::new(smallvec![Op::PutDevice(device)], Response::new(Code::DELETED)).into()
    }
}

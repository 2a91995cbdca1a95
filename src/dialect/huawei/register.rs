//! The LwM2M registration interface (`POST /rd`, `POST /rd/<ep>`, `DELETE /rd/<ep>`; wire rules
//! in [`crate::dialect::lwm2m`]). A Register names the device by its node id and opens the same
//! observe channel a Huawei bind does, on `/19/0/0`: answered 2.01 with its location, the observe
//! request follows, and only the device's answer to it makes the registration effective, stored,
//! and the device heard (so a spoofed Register changes nothing, writes nothing, wakes nothing).

use smallvec::smallvec;

use super::{Huawei, Started};
use crate::coap::message::Code;
use crate::coap::option::{OptionNumber, content_format};
use crate::coap::resource::{Outgoing, Request, Response};
use crate::dialect::lwm2m;
use crate::dialect::refusal::{Dialect, Refusal};
use crate::dialect::{Outcome, Persist};
use crate::identity::ObserveToken;
use crate::ingest;
use crate::registry::Device;
use crate::store::Op;
use crate::store::records::Registration;
use crate::telemetry::metric;

impl Huawei {
    pub(super) fn refuse_lwm2m(&self, req: &Request<'_, '_>, refusal: Refusal, device: Option<&Device>) -> Outcome {
        refusal.record(Dialect::Lwm2m, device, req.peer);
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
        let Some(device) = self.registry.device_by_node(&register.endpoint) else {
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
        device: &std::sync::Arc<Device>,
        token: ObserveToken,
        message: Vec<u8>,
    ) -> Outgoing {
        let exchange = self.registry.next_exchange();
        let product = self.registry.product(device.product_key.as_str());
        let mut retransmit = crate::downlink::service::retransmit(&self.registry.config.downlink, product.as_deref());
        if req.authenticated.is_none() {
            retransmit.max_retransmit = 0;
            retransmit.give_up_after = retransmit.ack_timeout;
        }
        self.started.insert(exchange, Started::Observe { device: device.clone(), token, peer: req.peer });
        Outgoing { peer: req.peer, message, retransmit, exchange }
    }

    /// Update (`POST /rd/<ep>`) and Deregister (`DELETE /rd/<ep>`) of an existing registration.
    pub fn registration(&mut self, req: &Request<'_, '_>) -> Outcome {
        let endpoint = req.path[1];
        let device = self.registry.device_by_node(endpoint).filter(|d| d.state().registration.is_some());
        let Some(device) = device else { return self.refuse_lwm2m(req, Refusal::UnknownRegistration, None) };
        if req.authenticated.is_some_and(|id| id != device.id) {
            return self.refuse_lwm2m(req, Refusal::ForeignIdentity, Some(&device));
        }
        match req.method() {
            Code::POST => self.update(req, device),
            Code::DELETE => self.deregister(req, device),
            _ => Outcome::code(Code::METHOD_NOT_ALLOWED),
        }
    }

    fn update(&mut self, req: &Request<'_, '_>, device: std::sync::Arc<Device>) -> Outcome {
        let update = match lwm2m::update(req.msg.options_of(OptionNumber::URI_QUERY)) {
            Ok(u) => u,
            Err(m) => return self.refuse_lwm2m(req, Refusal::BadRegistration(m), Some(&device)),
        };
        // A payload only when the objects changed.
        let objects = match req.msg.payload.is_empty() {
            true => None,
            false => match lwm2m::objects(req.msg.payload) {
                Ok(o) => Some(o),
                Err(m) => return self.refuse_lwm2m(req, Refusal::BadRegistration(m), Some(&device)),
            },
        };
        let now = req.now.wall;
        let mut ops = smallvec::SmallVec::new();
        let previous = {
            let mut s = device.state();
            if !s.enabled || !s.home.is_here() {
                let refusal = if s.enabled { Refusal::Moved } else { Refusal::Disabled };
                drop(s);
                return self.refuse_lwm2m(req, refusal, Some(&device));
            }
            let Some(r) = s.registration.as_mut() else {
                drop(s);
                return self.refuse_lwm2m(req, Refusal::UnknownRegistration, Some(&device));
            };
            let previous = r.clone();
            r.lifetime_s = update.lifetime_s.unwrap_or(r.lifetime_s);
            r.queue = update.queue.unwrap_or(r.queue);
            if let Some(objects) = objects {
                r.objects = objects;
            }
            r.updated_at = now.0;
            // From where the relation answered, an Update is the device speaking (its awake
            // window opens); from elsewhere it only keeps the registration alive: plain CoAP
            // proves nothing about the sender, so a stranger may not move the device's downlink.
            if s.address == Some(req.peer) {
                ops.extend(ingest::contact(&self.registry, &self.campaign, &device, &mut s, now, req.peer, self.route));
            }
            previous
        };
        ops.push(Op::PutDevice(device.clone()));
        let undo_device = device.clone();
        Persist {
            undo: Some(Box::new(move || undo_device.state().registration = Some(previous))),
            ..Persist::new(ops, Response::new(Code::CHANGED))
        }
        .into()
    }

    fn deregister(&mut self, req: &Request<'_, '_>, device: std::sync::Arc<Device>) -> Outcome {
        let (previous, token) = {
            let mut s = device.state();
            (s.registration.take(), s.observe)
        };
        if let Some(token) = token {
            self.registry.end_observe(&device, token);
        }
        tracing::debug!(endpoint = req.path[1], peer = %req.peer, "deregistered");
        let undo_device = device.clone();
        Persist {
            undo: Some(Box::new(move || undo_device.state().registration = previous)),
            ..Persist::new(smallvec![Op::PutDevice(device)], Response::new(Code::DELETED))
        }
        .into()
    }
}

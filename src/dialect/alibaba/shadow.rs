//! `POST /topic/shadow/update/{pk}/{dn}` (seed 002 §7.2): a device reads or changes its shadow
//! and the reply travels in the CoAP response, once the change is durable. Refusals carry table
//! 7-3's codes in the reply (2.05/2.04 are for success: 4.00, or 4.09 for a version conflict).
//! Not stored as an uplink: the shadow is the record.

use std::sync::Arc;

use smallvec::SmallVec;

use super::Alibaba;
use super::topic::Authorized;
use crate::auth::cipher::SessionKey;
use crate::coap::message::Code;
use crate::coap::option::content_format;
use crate::coap::resource::{Later, Request, Response};
use crate::dialect::{Outcome, Persist};
use crate::ingest;
use crate::northbound::EventKind;
use crate::registry::AckMode;
use crate::shadow::device::{self, Request as ShadowRequest};
use crate::shadow::document::ShadowError;
use crate::shadow::{self, Change, Owner};
use crate::store::Op;

impl Alibaba {
    pub(super) fn shadow(&mut self, req: &Request<'_, '_>, authorized: Authorized) -> Outcome {
        let Authorized { device, payload, key, ops: auth_ops, undo, ack_mode } = authorized;
        let now = req.now.wall;
        let mut ops: SmallVec<[Op; 3]> = SmallVec::new();
        ops.extend(ingest::contact(
            &self.registry,
            &self.campaign,
            &device,
            &mut device.state(),
            now,
            req.peer,
            self.route,
        ));
        ops.extend(auth_ops);
        let response = match ShadowRequest::parse(&payload) {
            Err(e) => answer(&key, code_of(&e), device::error(&e, now.0)),
            Ok(ShadowRequest::Get) => match shadow::get(&self.store, device.id) {
                Ok(s) => answer(&key, Code::CONTENT, device::document(&s, now.0)),
                Err(e) => {
                    tracing::error!(device = device.id.0, error = %e, "shadow unreadable");
                    Response::new(Code::INTERNAL_SERVER_ERROR)
                }
            },
            Ok(ShadowRequest::Change { changes, version }) => {
                let owner = Owner {
                    id: device.id,
                    product_key: device.product_key.clone(),
                    device_name: device.device_name.clone(),
                };
                let announce = self.registry.wanted().wants(EventKind::Shadow);
                let change = Change::new(owner, now, announce, move |s| s.update(&changes, version, now.0));
                ops.push(Op::Revise(change.clone()));
                let content_format = key.is_none().then_some(content_format::JSON);
                let later = Later(Arc::new(move || {
                    let (code, body) = match change.outcome() {
                        Some(Ok(s)) => (Code::CHANGED, device::success(&s, now.0)),
                        Some(Err(e)) => (code_of(&e), device::error(&e, now.0)),
                        None => return (Code::INTERNAL_SERVER_ERROR, Vec::new()),
                    };
                    (code, seal(key.as_ref(), body))
                }));
                Response { later: Some(later), content_format, ..Response::new(Code::CHANGED) }
            }
        };
        Persist { separate: ack_mode == AckMode::Separate, undo, ..Persist::new(ops, response) }.into()
    }
}

fn code_of(e: &ShadowError) -> Code {
    match e {
        ShadowError::VersionConflict { .. } => Code::CONFLICT,
        _ => Code::BAD_REQUEST,
    }
}

/// A reply, under the session key on 5682.
fn answer(key: &Option<SessionKey>, code: Code, body: Vec<u8>) -> Response {
    match key {
        Some(_) => Response { payload: seal(key.as_ref(), body), ..Response::new(code) },
        None => Response::with_payload(code, content_format::JSON, body),
    }
}

fn seal(key: Option<&SessionKey>, body: Vec<u8>) -> Vec<u8> {
    match key {
        Some(key) => key.encrypt(&body),
        None => body,
    }
}

//! `POST /auth/register/device` (SPEC §3.5): a device that knows only its product's secret gets
//! its DeviceSecret, once, if the product allows dynamic registration.

use smallvec::smallvec;

use super::body::SignedBody;
use super::{Alibaba, admit};
use crate::auth::sign::{SignMethod, register_content};
use crate::coap::message::Code;
use crate::coap::resource::Request;
use crate::dialect::{Outcome, Persist};
use crate::store::Op;
use crate::telemetry::metric;

fn refuse(code: Code, reason: &'static str) -> Outcome {
    metrics::counter!(metric::AUTH, "result" => reason, "kind" => "register").increment(1);
    Outcome::code(code)
}

impl Alibaba {
    pub(super) fn register(&mut self, req: &Request<'_, '_>) -> Outcome {
        let body = match SignedBody::read(req, SignMethod::HmacSha256) {
            Ok(b) => b,
            Err((code, reason)) => return refuse(code, reason),
        };
        let [pk, dn, random, sign] = match body.require(["productKey", "deviceName", "random", "sign"]) {
            Ok(v) => v,
            Err((code, reason)) => return refuse(code, reason),
        };
        let Some(product) = self.registry.product(pk) else { return refuse(Code::UNAUTHORIZED, "unknown_product") };
        let content = register_content(pk, dn, random);
        if !body.method.verify(product.product_secret.expose().as_bytes(), content.as_bytes(), sign) {
            return refuse(Code::UNAUTHORIZED, "bad_signature");
        }
        if !product.dynamic_registration {
            return refuse(Code::FORBIDDEN, "registration_disabled");
        }
        let Some(device) = self.registry.device(pk, dn) else { return refuse(Code::FORBIDDEN, "unknown_device") };
        {
            let mut state = device.state();
            if !state.home.is_here() {
                return refuse(Code::FORBIDDEN, "moved");
            }
            if !state.enabled || state.activated() {
                return refuse(Code::FORBIDDEN, "already_activated");
            }
            if let Err(o) = admit(&mut state, req, &self.registry, &device) {
                return o;
            }
            // Reserved now so a concurrent request cannot get the secret too.
            state.registered = true;
        }
        metrics::counter!(metric::AUTH, "result" => "ok", "kind" => "register").increment(1);
        tracing::info!(product_key = pk, device_name = dn, peer = %req.peer, "device registered dynamically");
        let secret = device.secret.expose().to_string();
        let undo_device = device.clone();
        Persist {
            undo: Some(Box::new(move || undo_device.state().registered = false)),
            ..Persist::new(
                smallvec![Op::PutDevice(device.clone())],
                body.reply(serde_json::json!({ "deviceSecret": secret })),
            )
        }
        .into()
    }
}

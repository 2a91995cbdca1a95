//! `POST /bootstrap` (SPEC §10, seed 000): which instance a device lives at, as
//! `{"resources":{"coap":{"host","port"}}}` with the port of the family it asked on. Signed like
//! `/auth` (over every field but `sign` and `signmethod`) with the DeviceSecret; products that
//! allow it may ask unsigned. Answering changes nothing but a "nearest" task's placement.

use super::Alibaba;
use super::body::SignedBody;
use crate::auth::sign::{SignMethod, auth_content};
use crate::cluster::distribution::BootstrapAnswer;
use crate::coap::message::Code;
use crate::coap::resource::{Request, Response};
use crate::dialect::Outcome;
use crate::telemetry::metric;

fn refuse(code: Code, reason: &'static str) -> Outcome {
    metrics::counter!(metric::BOOTSTRAP, "result" => reason).increment(1);
    Outcome::code(code)
}

impl Alibaba {
    pub(super) fn bootstrap(&mut self, req: &Request<'_, '_>) -> Outcome {
        let body = match SignedBody::read(req, SignMethod::HmacMd5) {
            Ok(b) => b,
            Err((code, reason)) => return refuse(code, reason),
        };
        let [pk, dn] = match body.require(["productKey", "deviceName"]) {
            Ok(v) => v,
            Err((code, reason)) => return refuse(code, reason),
        };
        // Unknown devices and bad signatures get the same answer, as on /auth.
        let Some(device) = self.registry.device(pk, dn) else { return refuse(Code::UNAUTHORIZED, "unknown_device") };
        let sign = body.get("sign");
        let signed = sign.is_some();
        match sign {
            Some(sign) => {
                let content = auth_content(body.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                if !body.method.verify(device.secret.expose().as_bytes(), content.as_bytes(), sign) {
                    return refuse(Code::UNAUTHORIZED, "bad_signature");
                }
            }
            None if self.registry.product(pk).is_some_and(|p| p.unsigned_bootstrap) => {}
            None => return refuse(Code::UNAUTHORIZED, "unsigned"),
        }
        // Not charged to the device's flow control: a signed body carries no freshness, so
        // anyone who captured one could otherwise spend the budget the device's uplinks need.
        // Answering reads only (but for a "nearest" placement); the answer is no larger than the
        // request.
        if !device.state().enabled {
            return refuse(Code::FORBIDDEN, "disabled");
        }
        match self.cluster.bootstrap(&device, req.peer.ip(), self.family, signed) {
            BootstrapAnswer::Go { host, port } => {
                metrics::counter!(metric::BOOTSTRAP, "result" => "ok").increment(1);
                tracing::debug!(product_key = pk, device_name = dn, peer = %req.peer, %host, port, "bootstrap");
                Outcome::Respond(body.reply(serde_json::json!({"resources": {"coap": {"host": host, "port": port}}})))
            }
            BootstrapAnswer::Later(seconds) => {
                metrics::counter!(metric::BOOTSTRAP, "result" => "moving").increment(1);
                Outcome::Respond(Response { max_age: Some(seconds), ..Response::new(Code::SERVICE_UNAVAILABLE) })
            }
            BootstrapAnswer::Unknown(instance) => {
                tracing::error!(%instance, product_key = pk, device_name = dn, "bootstrap cannot name the device's home: configure cluster.host or the peer");
                refuse(Code::INTERNAL_SERVER_ERROR, "unknown_instance")
            }
        }
    }
}

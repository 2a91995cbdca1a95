//! `POST /auth` (SPEC §3.1): verify the device's signature and hand out a token (and on 5682 the
//! `random` its AES key derives from). The answer is sent only once the session is durable.

use smallvec::SmallVec;

use super::body::SignedBody;
use super::{Alibaba, admit};
use crate::auth::sign::{SignMethod, auth_content};
use crate::coap::message::Code;
use crate::coap::resource::Request;
use crate::dialect::{Outcome, Persist};
use crate::identity::Token;
use crate::net::PortFamily;
use crate::registry::{AckMode, SessionRecord};
use crate::store::Op;
use crate::telemetry::metric;

/// Sequence numbers on 5682 start here; the key is new for every session, so a fixed start
/// (the value Alibaba's own example shows) costs nothing.
const SEQ_OFFSET: u64 = 1;

fn refuse(code: Code, reason: &'static str) -> Outcome {
    metrics::counter!(metric::AUTH, "result" => reason).increment(1);
    Outcome::code(code)
}

/// The 2.05 body of a session: on 5682 with the `random` its key derives from.
fn answer(token: &Token, record: &SessionRecord) -> serde_json::Value {
    match &record.random {
        Some(random) => serde_json::json!({"random": random, "seqOffset": record.seq_offset, "token": token.as_str()}),
        None => serde_json::json!({"token": token.as_str()}),
    }
}

impl Alibaba {
    pub(super) fn auth(&mut self, req: &Request<'_, '_>) -> Outcome {
        let body = match SignedBody::read(req, SignMethod::HmacMd5) {
            Ok(b) => b,
            Err((code, reason)) => return refuse(code, reason),
        };
        let [pk, dn, client_id, sign] = match body.require(["productKey", "deviceName", "clientId", "sign"]) {
            Ok(v) => v,
            Err((code, reason)) => return refuse(code, reason),
        };
        if client_id.is_empty() || client_id.chars().count() > 64 {
            return refuse(Code::BAD_REQUEST, "bad_client_id");
        }
        let ack_mode = match body.get("ackMode") {
            None | Some("0") => AckMode::Piggybacked,
            Some("1") => AckMode::Separate,
            Some(_) => return refuse(Code::BAD_REQUEST, "bad_ack_mode"),
        };
        let Some(device) = self.registry.device(pk, dn) else { return refuse(Code::UNAUTHORIZED, "unknown_device") };
        let content = auth_content(body.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if !body.method.verify(device.secret.expose().as_bytes(), content.as_bytes(), sign) {
            return refuse(Code::UNAUTHORIZED, "bad_signature");
        }
        let now = req.now.wall;
        let sign = sign.to_ascii_lowercase();
        let contact;
        {
            let state = device.state();
            if !state.enabled {
                return refuse(Code::FORBIDDEN, "disabled");
            }
            // Device software falls back to /bootstrap, which names its new home.
            if !state.home.is_here() {
                return refuse(Code::FORBIDDEN, "moved");
            }
            drop(state);
            // A body signed before proves nothing fresh: it gets its session back, renewed, and
            // is neither contact nor charged to the device (anyone may have captured it).
            if let Some((token, record)) = self.registry.replayed_session(&device, self.family, &sign, now) {
                metrics::counter!(metric::AUTH, "result" => "replayed").increment(1);
                tracing::debug!(product_key = pk, device_name = dn, peer = %req.peer, ?token, "replayed /auth renewed its token");
                let reply = answer(&token, &record);
                let ops = smallvec::smallvec![crate::registry::sessions::put(token, &record)];
                return Persist { separate: ack_mode == AckMode::Separate, ..Persist::new(ops, body.reply(reply)) }
                    .into();
            }
            let mut state = device.state();
            if let Err(o) = admit(&mut state, req, &self.registry, &device) {
                return o;
            }
            contact =
                crate::ingest::contact(&self.registry, &self.campaign, &device, &mut state, now, req.peer, self.route);
        }
        let random = (self.family == PortFamily::Aes).then(|| hex::encode(rand::random::<[u8; 8]>()));
        let record = SessionRecord {
            device_id: device.id,
            family: self.family,
            random,
            seq_offset: SEQ_OFFSET,
            ack_mode,
            created_at: now.0,
            last_used: now.0,
            replaced_until: None,
            auth_sign: Some(sign),
        };
        let (token, session_ops) = self.registry.open_session(&device, record.clone(), now);
        let mut ops: SmallVec<[Op; 3]> = session_ops.into_iter().collect();
        ops.extend(contact);
        let reply = answer(&token, &record);
        metrics::counter!(metric::AUTH, "result" => "ok").increment(1);
        tracing::debug!(product_key = pk, device_name = dn, peer = %req.peer, ?token, "authenticated");
        Persist { separate: ack_mode == AckMode::Separate, ..Persist::new(ops, body.reply(reply)) }.into()
    }
}

//! `POST /auth` (SPEC §3.1): verify the device's signature and hand out a token (and on 5682 the
//! `random` its AES key derives from). The answer is sent only once the session is durable.

use smallvec::SmallVec;

use super::{Alibaba, admit, body};
use crate::auth::sign::{SignMethod, auth_content};
use crate::coap::message::Code;
use crate::coap::option::{OptionNumber, content_format};
use crate::coap::resource::{Outcome, Request, Response};
use crate::store::Op;
use crate::store::records::{AckMode, PortFamily, PresenceRecord, SessionRecord};
use crate::telemetry::metric;

/// Sequence numbers on 5682 start here; the key is new for every session, so a fixed start
/// (the value Alibaba's own example shows) costs nothing.
const SEQ_OFFSET: u64 = 1;

fn refuse(code: Code, reason: &'static str) -> Outcome {
    metrics::counter!(metric::AUTH, "result" => reason).increment(1);
    Outcome::code(code)
}

/// Accept and Content-Format may be absent, JSON or CBOR (seed 002 table 3-3: 4.06 / 4.15).
pub(super) fn negotiate(req: &Request<'_, '_>) -> Result<(Option<u32>, u32), Outcome> {
    let accept = match req.msg.uint_option(OptionNumber::ACCEPT) {
        Ok(None) => content_format::JSON,
        Ok(Some(f @ (content_format::JSON | content_format::CBOR))) => f,
        _ => return Err(Outcome::code(Code::NOT_ACCEPTABLE)),
    };
    let cf = match req.msg.uint_option(OptionNumber::CONTENT_FORMAT) {
        Ok(f @ (None | Some(content_format::JSON | content_format::CBOR))) => f,
        _ => return Err(Outcome::code(Code::UNSUPPORTED_CONTENT_FORMAT)),
    };
    Ok((cf, accept))
}

/// Encodes a flat string/number object in the representation the device asked for.
pub(super) fn encode_reply(accept: u32, value: serde_json::Value) -> Response {
    if accept == content_format::CBOR {
        let mut buf = Vec::new();
        ciborium::into_writer(&value, &mut buf).expect("a JSON value encodes as CBOR");
        Response::with_payload(Code::CONTENT, content_format::CBOR, buf)
    } else {
        Response::with_payload(Code::CONTENT, content_format::JSON, value.to_string().into_bytes())
    }
}

impl Alibaba {
    pub(super) fn auth(&self, req: &Request<'_, '_>) -> Outcome {
        let (cf, accept) = match negotiate(req) {
            Ok(v) => v,
            Err(o) => return o,
        };
        let Ok(fields) = body::parse(cf, req.msg.payload) else { return refuse(Code::BAD_REQUEST, "bad_body") };
        let field = |k: &str| fields.get(k).map(String::as_str);
        let (Some(pk), Some(dn), Some(client_id), Some(sign)) =
            (field("productKey"), field("deviceName"), field("clientId"), field("sign"))
        else {
            return refuse(Code::BAD_REQUEST, "missing_field");
        };
        if client_id.is_empty() || client_id.chars().count() > 64 {
            return refuse(Code::BAD_REQUEST, "bad_client_id");
        }
        let Some(method) = field("signmethod").map_or(Some(SignMethod::HmacMd5), SignMethod::parse) else {
            return refuse(Code::BAD_REQUEST, "bad_signmethod");
        };
        let ack_mode = match field("ackMode") {
            None | Some("0") => AckMode::Piggybacked,
            Some("1") => AckMode::Separate,
            Some(_) => return refuse(Code::BAD_REQUEST, "bad_ack_mode"),
        };
        let Some(device) = self.registry.device(pk, dn) else { return refuse(Code::UNAUTHORIZED, "unknown_device") };
        let content = auth_content(fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if !method.verify(device.secret.expose().as_bytes(), content.as_bytes(), sign) {
            return refuse(Code::UNAUTHORIZED, "bad_signature");
        }
        let now = req.now.wall;
        {
            let mut state = device.state();
            if !state.enabled {
                return refuse(Code::FORBIDDEN, "disabled");
            }
            if let Err(o) = admit(&mut state, req, &self.registry) {
                return o;
            }
            state.last_seen = Some(now);
            state.address = Some(req.peer);
        }
        let random = (self.family == PortFamily::Aes).then(|| hex::encode(rand::random::<[u8; 8]>()));
        let record = SessionRecord {
            device_id: device.id,
            family: self.family,
            random: random.clone(),
            seq_offset: SEQ_OFFSET,
            ack_mode,
            created_at: now.0,
            last_used: now.0,
            replaced_until: None,
        };
        let (token, session_ops) = self.registry.open_session(&device, record, now);
        let mut ops: SmallVec<[Op; 3]> = session_ops.into_iter().collect();
        ops.push(Op::Presence { device: device.id, record: PresenceRecord { last_seen: now, address: Some(req.peer) } });
        let reply = match random {
            Some(random) => serde_json::json!({"random": random, "seqOffset": SEQ_OFFSET, "token": token.as_str()}),
            None => serde_json::json!({"token": token.as_str()}),
        };
        metrics::counter!(metric::AUTH, "result" => "ok").increment(1);
        tracing::debug!(product_key = pk, device_name = dn, peer = %req.peer, ?token, "authenticated");
        Outcome::Persist {
            ops,
            response: encode_reply(accept, reply),
            separate: ack_mode == AckMode::Separate,
            undo: None,
        }
    }
}

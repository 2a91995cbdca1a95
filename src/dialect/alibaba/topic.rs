//! `POST /topic/<topic>` uplinks (SPEC §3.2): token from option 2088, 61 or `?token=`; on 5682 the
//! seq in option 2089 and the payload are AES-encrypted. Answered 2.04 with option 2090 (the stored
//! message id) once the uplink is durable.

use std::sync::Arc;

use smallvec::SmallVec;

use super::{Alibaba, over_budget};
use crate::auth::replay::Verdict;
use crate::coap::message::Code;
use crate::coap::option::{OptionNumber, content_format};
use crate::coap::resource::{Request, Response, Undo};
use crate::dialect::refusal::{Dialect, Refusal};
use crate::dialect::{Outcome, Persist};
use crate::identity::{DeviceName, ProductKey, Token};
use crate::ingest::{self, Accepted, Uplink};
use crate::net::PortFamily;
use crate::registry::AckMode;
use crate::registry::device::Device;
use crate::registry::sessions::SessionView;
use crate::registry::{Lookup, SeqOutcome};
use crate::store::Op;

/// The token as sent: options win over the query, 2088 over 61 (both exist in the field).
fn token<'a>(req: &'a Request<'_, '_>) -> Option<&'a [u8]> {
    req.msg
        .option(OptionNumber::ALI_TOKEN)
        .or_else(|| req.msg.option(OptionNumber::ALI_TOKEN_61))
        .or_else(|| req.query("token"))
}

/// Whether `segments` (after `topic`) name a topic of this device (SPEC §3.2):
/// `/{pk}/{dn}/…`, `/sys/{pk}/{dn}/…`, `/ota/device/{inform|progress|request}/{pk}/{dn}`,
/// `/shadow/update/{pk}/{dn}`.
pub fn owns_topic(pk: &ProductKey, dn: &DeviceName, segments: &[&str]) -> bool {
    let (pk, dn) = (pk.as_str(), dn.as_str());
    match segments {
        [p, d, rest @ ..] if *p == pk && *d == dn => !rest.is_empty() && rest.iter().all(|s| !s.is_empty()),
        ["sys", p, d, rest @ ..] if *p == pk && *d == dn => !rest.is_empty() && rest.iter().all(|s| !s.is_empty()),
        ["ota", "device", "inform" | "progress" | "request", p, d] | ["shadow", "update", p, d] => *p == pk && *d == dn,
        _ => false,
    }
}

/// A 5682 request's fresh seq and its decrypted payload.
struct Proven {
    seq: u64,
    payload: Vec<u8>,
}

/// Who sends a request: a token's session, or the device a DTLS PSK session authenticated.
enum Caller<'a> {
    Token(&'a [u8], SessionView),
    Link(Arc<Device>),
}

/// A request whose sender is known, allowed, within its flow control, and whose seq (on 5682)
/// is fresh and marked.
pub(super) struct Authorized {
    pub device: Arc<Device>,
    /// The payload, decrypted on 5682.
    pub payload: Vec<u8>,
    /// The session's key, to encrypt an answer with on 5682.
    pub key: Option<crate::auth::cipher::SessionKey>,
    /// Writes that make the seq mark and the session's renewed expiry durable.
    pub ops: SmallVec<[Op; 3]>,
    /// Unmarks the seq if those writes fail.
    pub undo: Option<Undo>,
    pub ack_mode: AckMode,
}

impl Alibaba {
    /// Authenticates a request by its token (or its DTLS session), checks the device is enabled
    /// and passes `allowed` (else the refusal it names), decrypts it on 5682 and admits it
    /// through flow control (unless it asks for the next chunk of a download). On 5682 a request without a seq proves nothing (the token travels
    /// in clear): `unproven` answers it, and nothing is changed or charged.
    #[allow(clippy::result_large_err)] // the error is the outcome handed straight back to the endpoint
    pub(super) fn authorize(
        &self,
        req: &Request<'_, '_>,
        allowed: impl FnOnce(&Device) -> Result<(), Refusal>,
        unproven: impl FnOnce() -> Outcome,
    ) -> Result<Authorized, Outcome> {
        let now = req.now.wall;
        let caller = match token(req) {
            Some(token) => match self.registry.sessions.lookup(token, self.family, now) {
                Lookup::Valid(s) => Caller::Token(token, s),
                Lookup::Invalid => return Err(self.refuse(req, Refusal::UnknownToken, None)),
            },
            // A PSK-authenticated DTLS session is already a device identity (SPEC §3.3).
            None => match req.authenticated.and_then(|id| self.registry.device_by_id(id)) {
                Some(device) => Caller::Link(device),
                None => return Err(self.refuse(req, Refusal::UnknownToken, None)),
            },
        };
        let device = match &caller {
            Caller::Token(_, s) => s.device.clone(),
            Caller::Link(d) => d.clone(),
        };
        let (enabled, here) = {
            let s = device.state();
            (s.enabled, s.home.is_here())
        };
        if !enabled {
            return Err(self.refuse(req, Refusal::Disabled, Some(&device)));
        }
        // A DTLS session outlives a move; the device is told to bootstrap.
        if !here {
            return Err(self.refuse(req, Refusal::Moved, Some(&device)));
        }
        allowed(&device).map_err(|r| self.refuse(req, r, Some(&device)))?;
        let (seq, payload) = match &caller {
            Caller::Token(token, session) if self.family == PortFamily::Aes => {
                match self.decrypt(req, token, session) {
                    Ok(Some(Proven { seq, payload })) => (Some(seq), payload),
                    Ok(None) => {
                        Refusal::Unproven.record(Dialect::Alibaba, Some(&device), req);
                        return Err(unproven());
                    }
                    Err(refused) => return Err(self.refused(req, refused, &device)),
                }
            }
            _ => (None, req.msg.payload.to_vec()),
        };
        if let Err(retry_after) =
            ingest::admit(&self.registry, &self.campaign, &device, &mut device.state(), &payload, now)
        {
            return Err(over_budget(req, &device, retry_after));
        }
        let mut ops = SmallVec::new();
        let mut undo: Option<Undo> = None;
        let (key, ack_mode) = match &caller {
            Caller::Token(token, session) => {
                let touch = match self.registry.sessions.accept(token, seq, now) {
                    SeqOutcome::Accepted { touch } => touch,
                    SeqOutcome::Replayed => return Err(self.refuse(req, Refusal::ReplayedSeq, Some(&device))),
                    SeqOutcome::Invalid => return Err(self.refuse(req, Refusal::UnknownToken, Some(&device))),
                };
                let token = Token::from_bytes(token).expect("a token that was found is well-formed");
                if let Some(seq) = seq {
                    ops.push(Op::SeenSeq {
                        token: token.clone(),
                        window: self.registry.config.auth.replay_window,
                        seq,
                    });
                    // If the write fails the device gets 5.00 and retries with the same seq.
                    let (registry, token) = (self.registry.clone(), token.clone());
                    undo = Some(Box::new(move || registry.sessions.unmark(token.as_bytes(), seq)));
                }
                if let Some(record) = touch {
                    ops.push(crate::registry::sessions::put(token, &record));
                }
                (session.key.clone(), session.ack_mode)
            }
            Caller::Link(_) => (None, AckMode::Piggybacked),
        };
        Ok(Authorized { device, payload, key, ops, undo, ack_mode })
    }

    /// Counts and logs a refusal; the answer carries its code.
    pub(super) fn refuse(&self, req: &Request<'_, '_>, refusal: Refusal, device: Option<&Device>) -> Outcome {
        refusal.record(Dialect::Alibaba, device, req);
        Outcome::code(refusal.code())
    }

    /// Like [`Alibaba::refuse`], for a 5682 decryption refusal (4.13 names the limit in Size1).
    fn refused(&self, req: &Request<'_, '_>, refusal: Refusal, device: &Device) -> Outcome {
        refusal.record(Dialect::Alibaba, Some(device), req);
        let size1 = (refusal == Refusal::TooLarge).then_some(self.registry.config.coap.max_payload as u32);
        Outcome::Respond(Response { size1, ..Response::new(refusal.code()) })
    }

    pub(super) fn topic(&mut self, req: &Request<'_, '_>) -> Outcome {
        let segments = &req.path[1..];
        // A segment is one topic level: no separators, no relative levels, no control bytes.
        let well_formed = !segments.iter().any(|s| *s == "." || *s == ".." || s.bytes().any(|b| b == b'/' || b < 0x20));
        let allowed = |d: &Device| {
            if !well_formed {
                Err(Refusal::BadTopic)
            } else if !owns_topic(&d.product_key, &d.device_name, segments) {
                Err(Refusal::ForeignTopic)
            } else {
                Ok(())
            }
        };
        // Link SDK 4.x sends empty uplinks without a seq: answered, with nothing stored (no 2090).
        let unproven = || Outcome::code(Code::CHANGED);
        let authorized = match self.authorize(req, allowed, unproven) {
            Ok(a) => a,
            Err(o) => return o,
        };
        if crate::shadow::device::is_update_topic(segments) {
            return self.shadow(req, authorized);
        }
        let Authorized { device, payload, key, ops: auth_ops, undo, ack_mode } = authorized;
        let mut topic = String::with_capacity(segments.iter().map(|s| s.len() + 1).sum());
        for s in segments {
            topic.push('/');
            topic.push_str(s);
        }
        let uplink = Uplink { topic, payload, peer: req.peer, route: self.route, now: req.now.wall };
        let accepted = ingest::accept(&self.registry, &self.campaign, &device, &mut device.state(), uplink);
        let (mut ops, response) = match accepted {
            Accepted::Data(ops) => (ops, Response { with_message_id: true, ..Response::new(Code::CHANGED) }),
            // Not business data: the answer travels in the response, once what it changed is stored.
            Accepted::Pcp { writes, answer } => {
                let answer = answer.unwrap_or_default();
                let payload = match (&key, answer.is_empty()) {
                    (Some(key), false) => key.encrypt(&answer),
                    _ => answer,
                };
                let response = if payload.is_empty() {
                    Response::new(Code::CHANGED)
                } else {
                    Response::with_payload(Code::CHANGED, content_format::OCTET_STREAM, payload)
                };
                (writes, response)
            }
        };
        ops.extend(auth_ops);
        Persist { separate: ack_mode == AckMode::Separate, undo, ..Persist::new(ops, response) }.into()
    }

    /// 5682: the seq from option 2089 and the plaintext payload, both under the session key;
    /// `None` for an empty request without a seq (Link SDK 4.x), which proves nothing.
    fn decrypt(&self, req: &Request<'_, '_>, token: &[u8], session: &SessionView) -> Result<Option<Proven>, Refusal> {
        let Some(key) = &session.key else { return Err(Refusal::UnknownToken) };
        let seq = match req.msg.option(OptionNumber::ALI_SEQ) {
            Some(opt) => match key.decrypt_seq(opt) {
                Some(seq) if seq >= session.seq_offset => seq,
                _ => return Err(Refusal::BadSeq),
            },
            None if req.msg.payload.is_empty() => return Ok(None),
            None => return Err(Refusal::MissingSeq),
        };
        let payload = if req.msg.payload.is_empty() {
            Vec::new()
        } else {
            key.decrypt(req.msg.payload).map_err(|_| Refusal::Undecryptable)?
        };
        if payload.len() > self.registry.config.coap.max_payload {
            return Err(Refusal::TooLarge);
        }
        if self.registry.sessions.check_seq(token, seq) != Verdict::Fresh {
            return Err(Refusal::ReplayedSeq);
        }
        Ok(Some(Proven { seq, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_ownership() {
        let pk = ProductKey::new("pk1").unwrap();
        let dn = DeviceName::new("dev").unwrap();
        let ok = |s: &[&str]| owns_topic(&pk, &dn, s);
        assert!(ok(&["pk1", "dev", "update"]));
        assert!(ok(&["pk1", "dev", "user", "data"]));
        assert!(ok(&["sys", "pk1", "dev", "thing", "deviceinfo", "update"]));
        assert!(ok(&["ota", "device", "inform", "pk1", "dev"]));
        assert!(ok(&["shadow", "update", "pk1", "dev"]));
        assert!(!ok(&["shadow", "update", "pk1", "other"]));
        assert!(!ok(&["shadow", "get", "pk1", "dev"]));
        assert!(!ok(&["pk1", "dev"]));
        assert!(!ok(&["pk1", "other", "update"]));
        assert!(!ok(&["pk2", "dev", "update"]));
        assert!(!ok(&["sys", "pk1", "dev"]));
        assert!(!ok(&["ota", "device", "upgrade", "pk1", "dev"]));
        assert!(!ok(&["pk1", "dev", ""]));
        assert!(!ok(&[]));
    }
}

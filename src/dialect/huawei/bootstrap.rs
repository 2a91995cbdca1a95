//! LwM2M client-initiated bootstrap (`POST /bs?ep=<node id>`, seed 003 §11): answered 2.04, then
//! the server provisions the client one CON at a time, each after the client acknowledged the one
//! before: Bootstrap-Delete, the Security and Server instances of its LwM2M server (the device's
//! home instance, as `/bootstrap` names it), Bootstrap-Finish. A device with a PSK is provisioned
//! only inside its own DTLS session: its key never travels in clear.

use std::sync::Arc;

use smallvec::SmallVec;

use super::{Huawei, Started};
use crate::cluster::distribution::BootstrapAnswer;
use crate::coap::message::Code;
use crate::coap::resource::{Outgoing, Reply, Request, Response};
use crate::dialect::lwm2m::{self, Provisioning};
use crate::dialect::refusal::Refusal;
use crate::dialect::{Effects, Outcome, Persist};
use crate::net::PortFamily;
use crate::registry::Device;
use crate::telemetry::metric;

impl Huawei {
    pub fn bootstrap_request(&mut self, req: &Request<'_, '_>) -> Outcome {
        if req.method() != Code::POST {
            return Outcome::code(Code::METHOD_NOT_ALLOWED);
        }
        let endpoint = req.query("ep").and_then(|ep| std::str::from_utf8(ep).ok()).filter(|ep| !ep.is_empty());
        let Some(endpoint) = endpoint else {
            return self.refuse_lwm2m(req, Refusal::BadRegistration(lwm2m::Malformed::NoEndpoint), None);
        };
        let Some(device) = self.named(req, endpoint) else {
            metrics::counter!(metric::AUTH, "result" => "unknown_endpoint", "kind" => "bootstrap").increment(1);
            return self.refuse_lwm2m(req, Refusal::UnknownEndpoint, None);
        };
        let inside_its_session = req.authenticated == Some(device.id);
        if req.authenticated.is_some() && !inside_its_session {
            return self.refuse_lwm2m(req, Refusal::ForeignIdentity, Some(&device));
        }
        if !device.state().enabled {
            return self.refuse_lwm2m(req, Refusal::Disabled, Some(&device));
        }
        let psk = device.psk_hex.as_deref().and_then(|h| hex::decode(h).ok());
        if psk.is_some() && !inside_its_session {
            return self.refuse_lwm2m(req, Refusal::KeyInClear, Some(&device));
        }
        let family = if psk.is_some() { PortFamily::Dtls } else { PortFamily::Plain };
        let (host, port) = match self.cluster.bootstrap(&device, req.peer.ip(), family, inside_its_session) {
            BootstrapAnswer::Go { host, port } => (host, port),
            BootstrapAnswer::Later(seconds) => {
                return Outcome::Respond(Response {
                    max_age: Some(seconds),
                    ..Response::new(Code::SERVICE_UNAVAILABLE)
                });
            }
            BootstrapAnswer::Unknown(instance) => {
                tracing::error!(%instance, endpoint, "bootstrap cannot name the device's home: configure cluster.host or the peer");
                return Outcome::code(Code::INTERNAL_SERVER_ERROR);
            }
        };
        let scheme = if psk.is_some() { "coaps" } else { "coap" };
        let uri = match host.contains(':') {
            true => format!("{scheme}://[{host}]:{port}"),
            false => format!("{scheme}://{host}:{port}"),
        };
        let provisioning = Provisioning {
            server_uri: &uri,
            psk: psk.as_deref().map(|key| (endpoint.as_bytes(), key)),
            lifetime_s: lwm2m::DEFAULT_LIFETIME_S,
            binding: "U",
        };
        let mut requests = lwm2m::bootstrap_requests(&provisioning);
        requests.reverse();
        metrics::counter!(metric::AUTH, "result" => "ok", "kind" => "bootstrap").increment(1);
        tracing::debug!(endpoint, peer = %req.peer, %uri, "bootstrapping");
        let follow_up = self.bootstrap_step(&device, req.peer, requests, !inside_its_session);
        Persist { follow_up, ..Persist::new(SmallVec::new(), Response::new(Code::CHANGED)) }.into()
    }

    /// The next provisioning request (`rest` holds them last first); sent once to an address
    /// nothing proved yet.
    fn bootstrap_step(
        &mut self,
        device: &Arc<Device>,
        peer: std::net::SocketAddr,
        mut rest: Vec<Vec<u8>>,
        once: bool,
    ) -> Option<Outgoing> {
        let message = rest.pop()?;
        let exchange = self.registry.next_exchange();
        let retransmit = self.retransmit(device, once);
        self.started.insert(exchange, Started::Bootstrap { device: device.clone(), peer, rest });
        Some(Outgoing { peer, message, retransmit, exchange })
    }

    /// How a provisioning request ended: the next follows a 2.xx; anything else ends the bootstrap.
    pub(super) fn bootstrap_answered(
        &mut self,
        device: &Arc<Device>,
        peer: std::net::SocketAddr,
        rest: Vec<Vec<u8>>,
        reply: &Reply<'_, '_>,
        effects: &mut Effects,
    ) {
        match reply {
            Reply::Ack(msg) if msg.code.class() == 2 => {
                if rest.is_empty() {
                    tracing::debug!(device = ?device, "bootstrap finished");
                    metrics::counter!(metric::AUTH, "result" => "finished", "kind" => "bootstrap").increment(1);
                }
                effects.outgoing.extend(self.bootstrap_step(device, peer, rest, false));
            }
            _ => {
                tracing::debug!(device = ?device, "the client refused or ignored a bootstrap write; bootstrap ended");
                metrics::counter!(metric::AUTH, "result" => "abandoned", "kind" => "bootstrap").increment(1);
            }
        }
    }
}

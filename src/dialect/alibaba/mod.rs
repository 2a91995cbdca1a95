//! Alibaba IoT CoAP dialect (seed 002 §3.3, SPEC §3): `/auth`, `/topic/...` uplinks, `/pull` for
//! queued commands, `/auth/register/device` and `/bootstrap` (SPEC §10), on the plain port
//! (5683), the AES port (5682) and inside DTLS (5684).

mod auth;
pub mod body;
mod bootstrap;
mod pull;
mod register;
mod shadow;
mod topic;

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::Now;
use crate::cluster::Cluster;
use crate::coap::message::Code;
use crate::coap::resource::{ExchangeKey, Reply, Request, Response};
use crate::dialect::refusal::{self, Dialect, OverBudget};
use crate::dialect::{Outcome, Services};
use crate::downlink::Commands;
use crate::net::PortFamily;
use crate::ota::campaign::Campaign;
use crate::registry::device::DeviceState;
use crate::registry::{Device, Registry, Route};
use crate::store::Store;

pub struct Alibaba {
    registry: Arc<Registry>,
    commands: Arc<Commands>,
    campaign: Arc<Campaign>,
    /// Where `/bootstrap` sends a device.
    cluster: Arc<Cluster>,
    /// Where device shadows are read.
    store: Store,
    family: PortFamily,
    route: Route,
    /// `/pull` answers not yet acknowledged, by the key of their separate response.
    pulls: HashMap<ExchangeKey, Arc<Device>>,
}

impl Alibaba {
    pub fn new(services: &Services, route: Route) -> Alibaba {
        Alibaba {
            registry: services.registry.clone(),
            commands: services.commands.clone(),
            campaign: services.campaign.clone(),
            cluster: services.cluster.clone(),
            store: services.store.clone(),
            family: route.family,
            route,
            pulls: HashMap::new(),
        }
    }

    /// The request if it is one of this dialect's resources.
    pub fn handle(&mut self, req: &Request<'_, '_>) -> Option<Outcome> {
        let handler: fn(&mut Self, &Request<'_, '_>) -> Outcome = match &req.path[..] {
            ["auth"] => Self::auth,
            ["bootstrap"] => Self::bootstrap,
            ["auth", "register", "device"] => Self::register,
            ["topic", ..] => Self::topic,
            ["pull"] => Self::pull,
            _ => return None,
        };
        if req.method() != Code::POST {
            return Some(Outcome::code(Code::METHOD_NOT_ALLOWED));
        }
        Some(handler(self, req))
    }

    /// How a `/pull` answer ended; false if `exchange` is not one.
    pub fn handle_reply(&mut self, now: Now, exchange: ExchangeKey, reply: &Reply<'_, '_>) -> bool {
        let Some(device) = self.pulls.remove(&exchange) else { return false };
        self.settle_pull(now, &device, exchange, reply);
        true
    }
}

/// Applies the device's flow control (SPEC §7): 4.29 with Max-Age saying when to retry.
#[allow(clippy::result_large_err)] // the error is the outcome handed straight back to the endpoint
fn admit(state: &mut DeviceState, req: &Request<'_, '_>, registry: &Registry, device: &Device) -> Result<(), Outcome> {
    state.admit(req.now.wall, &registry.config.device).map_err(|retry_after| over_budget(req, device, retry_after))
}

/// 4.29 with Max-Age saying when to retry, counted.
fn over_budget(req: &Request<'_, '_>, device: &Device, retry_after: u32) -> Outcome {
    refusal::over_budget(Dialect::Alibaba, device, req, OverBudget::Refused);
    Outcome::Respond(Response { max_age: Some(retry_after), ..Response::new(Code::TOO_MANY_REQUESTS) })
}

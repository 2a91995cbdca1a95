//! Alibaba IoT CoAP dialect (seed 002 §3.3, SPEC §3): `/auth`, `/topic/...` uplinks and
//! `/auth/register/device`, on the plain port (5683) and the AES port (5682).

mod auth;
pub mod body;
mod register;
mod topic;

use std::sync::Arc;

use crate::coap::message::Code;
use crate::coap::resource::{Outcome, Request, Resources, Response};
use crate::registry::Registry;
use crate::registry::device::DeviceState;
use crate::store::records::PortFamily;
use crate::telemetry::metric;

pub struct Alibaba {
    registry: Arc<Registry>,
    family: PortFamily,
}

impl Alibaba {
    pub fn new(registry: Arc<Registry>, family: PortFamily) -> Alibaba {
        Alibaba { registry, family }
    }
}

impl Resources for Alibaba {
    fn handle(&self, req: &Request<'_, '_>) -> Outcome {
        let handler: fn(&Self, &Request<'_, '_>) -> Outcome = match &req.path[..] {
            ["auth"] => Self::auth,
            ["auth", "register", "device"] => Self::register,
            ["topic", ..] => Self::topic,
            _ => return Outcome::code(Code::NOT_FOUND),
        };
        if req.method() != Code::POST {
            return Outcome::code(Code::METHOD_NOT_ALLOWED);
        }
        handler(self, req)
    }
}

/// Applies the device's flow control (SPEC §7): 4.29 with Max-Age saying when to retry.
#[allow(clippy::result_large_err)] // the error is the outcome handed straight back to the endpoint
fn admit(state: &mut DeviceState, req: &Request<'_, '_>, registry: &Registry) -> Result<(), Outcome> {
    state.admit(req.now.wall, &registry.config.device).map_err(|retry_after| {
        metrics::counter!(metric::FLOW_CONTROL).increment(1);
        Outcome::Respond(Response { max_age: Some(retry_after), ..Response::new(Code::TOO_MANY_REQUESTS) })
    })
}

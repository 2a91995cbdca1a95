//! Huawei's plain CoAP dialect (SPEC §4, as LiteOS's `oc_coap` agent speaks it): the device binds
//! with `POST /t/r?ep=<node id>`, the server observes `/t/d` with a token of its own, the device's
//! uplinks are notifications carrying that token (so a NAT rebinding changes nothing), and
//! commands go down as CON `POST /t/d`.

mod bind;
mod deliver;
mod uplink;

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::Now;
use crate::coap::resource::{Effects, ExchangeKey, Reply};
use crate::identity::{DeviceId, ObserveToken};
use crate::registry::{Device, Registry, Route};

/// Uplinks are stored under this topic (Huawei's have none; `/t/d` is the resource they belong to).
pub const UPLINK_TOPIC: &str = "/t/d";

/// An exchange this dialect started.
enum Started {
    /// `GET /t/d` with Observe 0, sent after a bind.
    Observe { device: Arc<Device>, token: ObserveToken },
    /// `POST /t/d` carrying the device's next command.
    Command { device: Arc<Device> },
}

pub struct Huawei {
    registry: Arc<Registry>,
    route: Route,
    started: HashMap<ExchangeKey, Started>,
}

impl Huawei {
    pub fn new(registry: Arc<Registry>, route: Route) -> Huawei {
        Huawei { registry, route, started: HashMap::new() }
    }

    /// How an exchange this dialect started ended; false if `exchange` is not one of them.
    pub fn handle_reply(
        &mut self,
        now: Now,
        exchange: ExchangeKey,
        reply: &Reply<'_, '_>,
        effects: &mut Effects,
    ) -> bool {
        match self.started.remove(&exchange) {
            Some(Started::Observe { device, token }) => self.observe_answered(now, &device, token, reply, effects),
            Some(Started::Command { device }) => self.command_answered(now, &device, exchange, reply, effects),
            None => return false,
        }
        true
    }

    /// The admin API queued something for a device this socket serves.
    pub fn handle_kick(&mut self, now: Now, device: DeviceId, effects: &mut Effects) {
        if let Some(device) = self.registry.device_by_id(device) {
            self.deliver(now, &device, effects);
        }
    }

    fn observe_answered(
        &mut self,
        now: Now,
        device: &Arc<Device>,
        token: ObserveToken,
        reply: &Reply<'_, '_>,
        effects: &mut Effects,
    ) {
        match reply {
            Reply::Ack(msg) if msg.code.class() == 2 => {
                if self.registry.establish_observe(device, token) {
                    tracing::debug!(device = ?device, "observe relation established");
                    self.deliver(now, device, effects);
                }
            }
            // An Empty ACK: the notification establishing the relation comes later.
            Reply::Ack(msg) if msg.code.class() == 0 => {}
            _ => {
                tracing::debug!(device = ?device, "the device refused or ignored the observe request");
                self.registry.drop_pending_observe(device, token);
            }
        }
    }
}

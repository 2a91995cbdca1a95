//! Device-facing protocols served over the CoAP endpoint: Alibaba's on every port, Huawei's on
//! the plain port and inside DTLS (SPEC §4).

pub mod alibaba;
pub mod huawei;
pub mod lwm2m;
pub mod refusal;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::clock::Now;
use crate::cluster::Cluster;
use crate::coap::message::Code;
use crate::coap::resource::{self, ExchangeKey, Reply, Request, Resources};
use crate::downlink::Commands;
use crate::identity::DeviceId;
use crate::net::PortFamily;
use crate::ota::campaign::Campaign;
use crate::registry::{Registry, Route};
use crate::store::{Store, StoreError};
use alibaba::Alibaba;
use huawei::Huawei;

/// What a device's request asks to be made durable before it is answered.
pub type Writes = crate::store::Ops;
pub type Outcome = resource::Outcome<Writes>;
pub type Persist = resource::Persist<Writes>;
pub type Notified = resource::Notified<Writes>;
pub type Effects = resource::Effects<Writes>;

/// The services the dialects serve devices with.
#[derive(Clone)]
pub struct Services {
    pub registry: Arc<Registry>,
    pub commands: Arc<Commands>,
    pub campaign: Arc<Campaign>,
    /// Where `/bootstrap` sends a device.
    pub cluster: Arc<Cluster>,
    /// For what a request reads but does not hold in memory (a device's shadow).
    pub store: Store,
}

impl Services {
    /// The services over `registry`, their state read from `store`.
    pub fn load(registry: Arc<Registry>, store: &Store) -> Result<Services, StoreError> {
        let commands = Arc::new(Commands::load(registry.clone(), store)?);
        let campaign = Arc::new(Campaign::load(registry.clone(), store)?);
        let cluster = Arc::new(Cluster::load(registry.clone(), commands.clone(), campaign.clone(), store)?);
        Ok(Services { registry, commands, campaign, cluster, store: store.clone() })
    }

    /// The services over `registry` with nothing stored yet in `store`.
    pub fn new(registry: Arc<Registry>, store: Store) -> Services {
        let commands = Arc::new(Commands::new(registry.clone()));
        let campaign = Arc::new(Campaign::new(registry.clone()));
        let cluster = Arc::new(Cluster::new(registry.clone(), commands.clone(), campaign.clone(), store.clone()));
        Services { registry, commands, campaign, cluster, store }
    }
}

/// The resources of one socket.
pub struct DeviceFacing {
    alibaba: Alibaba,
    /// Not on 5682, whose every request is under an Alibaba session key.
    huawei: Option<Huawei>,
}

impl DeviceFacing {
    pub fn new(services: &Services, route: Route) -> DeviceFacing {
        let huawei = (route.family != PortFamily::Aes).then(|| Huawei::new(services, route));
        DeviceFacing { alibaba: Alibaba::new(services, route), huawei }
    }
}

impl Resources for DeviceFacing {
    type Writes = Writes;

    fn handle(&mut self, req: &Request<'_, '_>, effects: &mut Effects) -> Outcome {
        if let Some(huawei) = &mut self.huawei {
            match &req.path[..] {
                ["t", "r"] => return huawei.bind(req),
                ["rd"] => return huawei.register(req),
                ["bs"] => return huawei.bootstrap_request(req),
                ["rd", _] => return huawei.registration(req, effects),
                [lwm2m::firmware::PACKAGE_PATH, _, _, _] => return huawei.package_block(req),
                _ => {}
            }
        }
        self.alibaba.handle(req).unwrap_or_else(|| Outcome::code(Code::NOT_FOUND))
    }

    fn handle_notification(&mut self, req: &Request<'_, '_>, effects: &mut Effects) -> Notified {
        match &mut self.huawei {
            Some(huawei) => huawei.notification(req, effects),
            None => Notified::Reject,
        }
    }

    fn handle_reply(&mut self, now: Now, exchange: ExchangeKey, reply: Reply<'_, '_>, effects: &mut Effects) {
        if let Some(huawei) = &mut self.huawei
            && huawei.handle_reply(now, exchange, &reply, effects)
        {
            return;
        }
        self.alibaba.handle_reply(now, exchange, &reply);
    }

    fn handle_kick(&mut self, now: Now, device: DeviceId, effects: &mut Effects) {
        // Alibaba devices fetch their commands themselves.
        if let Some(huawei) = &mut self.huawei {
            huawei.handle_kick(now, device, effects);
        }
    }
}

//! Huawei's plain CoAP dialect (SPEC §4, as LiteOS's `oc_coap` agent speaks it): the device binds
//! with `POST /t/r?ep=<node id>`, the server observes `/t/d` with a token of its own, the device's
//! uplinks are notifications carrying that token (so a NAT rebinding changes nothing), and
//! commands go down as CON `POST /t/d`.

mod bind;
mod bootstrap;
mod deliver;
mod firmware;
mod register;
mod upgrade;
mod uplink;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::clock::Now;
use crate::coap::resource::{ExchangeKey, Reply};
use crate::dialect::{Effects, Services};
use crate::downlink::Commands;
use crate::identity::{DeviceId, ObserveToken};
use crate::ingest::{self, Accepted, Uplink};
use crate::ota::campaign::Campaign;
use crate::registry::{Device, Registry, Route};
use crate::store::Op;

/// Uplinks are stored under this topic (Huawei's have none; `/t/d` is the resource they belong to).
pub const UPLINK_TOPIC: &str = "/t/d";

/// The form a device's observe channel takes: the raw Huawei one (`/t/d` both ways), or an LwM2M
/// client's object 19 (notifications of `/19/0/0` up, Writes to `/19/1/0` down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Raw,
    Lwm2m,
}

impl Channel {
    fn of(s: &crate::registry::DeviceState) -> Channel {
        if s.registration.is_some() { Channel::Lwm2m } else { Channel::Raw }
    }

    /// The channel of the relation `token` names, established or only asked for.
    fn of_relation(s: &crate::registry::DeviceState, token: ObserveToken) -> Channel {
        match s.pending_observe == Some(token) {
            true if s.pending_registration.is_some() => Channel::Lwm2m,
            true => Channel::Raw,
            false => Channel::of(s),
        }
    }

    fn topic(self) -> &'static str {
        match self {
            Channel::Raw => UPLINK_TOPIC,
            Channel::Lwm2m => crate::dialect::lwm2m::UPLINK_TOPIC,
        }
    }

    /// A command or PCP frame down the channel of the relation `token`.
    fn down(self, token: ObserveToken, payload: &[u8]) -> Vec<u8> {
        match self {
            Channel::Raw => upgrade::post_t_d(token, payload),
            // A request of its own: the relation's token names the observation, not this.
            Channel::Lwm2m => crate::dialect::lwm2m::write_command(&ObserveToken::generate().0, payload),
        }
    }
}

/// An exchange this dialect started.
enum Started {
    /// `GET /t/d` with Observe 0, sent to `peer` after its bind.
    Observe { device: Arc<Device>, token: ObserveToken, peer: SocketAddr },
    /// `POST /t/d` carrying the device's next command, under the relation `token` names.
    Command { device: Arc<Device>, token: ObserveToken },
    /// `POST /t/d` carrying a PCP request of the platform (ahead of commands).
    PcpRequest { device: Arc<Device>, token: ObserveToken },
    /// `POST /t/d` carrying the answer to a PCP request of the device.
    PcpAnswer { device: Arc<Device> },
    /// One request of an LwM2M bootstrap; `rest` are the ones still to send, last first.
    Bootstrap { device: Arc<Device>, peer: SocketAddr, rest: Vec<Vec<u8>> },
    /// One operation of an upgrade over LwM2M Object 5.
    Firmware { device: Arc<Device>, chain: firmware::Chain },
}

pub struct Huawei {
    registry: Arc<Registry>,
    /// Where a bootstrap sends a client.
    cluster: Arc<crate::cluster::Cluster>,
    commands: Arc<Commands>,
    campaign: Arc<Campaign>,
    route: Route,
    started: HashMap<ExchangeKey, Started>,
}

impl Huawei {
    /// The device whose node id (LwM2M endpoint name) a request names; noted for its trace,
    /// which then shows the request and its answer even before it proves anything.
    fn named(&self, req: &crate::coap::resource::Request<'_, '_>, node: &str) -> Option<Arc<Device>> {
        let device = self.registry.device_by_node(node)?;
        req.note.named(device.id);
        Some(device)
    }

    /// How a CON to `device` is retransmitted (its product's timers), or sent `once`.
    fn retransmit(&self, device: &Device, once: bool) -> crate::coap::resource::Retransmit {
        let product = self.registry.product(device.product_key.as_str());
        let r = crate::downlink::service::retransmit(&self.registry.config.downlink, product.as_deref());
        if once { r.once() } else { r }
    }

    pub fn new(services: &Services, route: Route) -> Huawei {
        Huawei {
            registry: services.registry.clone(),
            cluster: services.cluster.clone(),
            commands: services.commands.clone(),
            campaign: services.campaign.clone(),
            route,
            started: HashMap::new(),
        }
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
            Some(Started::Observe { device, token, peer }) => {
                self.observe_answered(now, &device, token, peer, reply, effects)
            }
            Some(Started::Command { device, token }) => {
                self.command_answered(now, &device, token, exchange, reply, effects)
            }
            Some(Started::PcpRequest { device, token }) => {
                self.pcp_request_answered(now, &device, token, exchange, reply, effects)
            }
            // Whatever became of it (the device asks again if it was lost), the next message may go.
            Some(Started::PcpAnswer { device }) => self.deliver(now, &device, effects),
            Some(Started::Bootstrap { device, peer, rest }) => {
                self.bootstrap_answered(&device, peer, rest, reply, effects)
            }
            Some(Started::Firmware { device, chain }) => self.firmware_answered(now, &device, chain, reply, effects),
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
        peer: SocketAddr,
        reply: &Reply<'_, '_>,
        effects: &mut Effects,
    ) {
        match reply {
            // The answer carries our random token: the device really is at `peer`. Only now does
            // the bind count as contact (address, socket, awake window), so a spoofed bind can
            // neither move a device's downlink nor wake it.
            Reply::Ack(msg) if msg.code.class() == 2 => {
                if self.registry.establish_observe(device, token) {
                    tracing::debug!(device = ?device, %peer, "observe relation established");
                    let mut s = device.state();
                    // A payload in the answer is the first notification (RFC 7641 §4.2): data.
                    // A PCP message there goes unanswered (nothing waits for these writes; the
                    // device asks again).
                    let mut ops = match msg.payload.is_empty() {
                        true => {
                            ingest::contact(&self.registry, &self.campaign, device, &mut s, now.wall, peer, self.route)
                        }
                        false => {
                            let topic = Channel::of(&s).topic().into();
                            let uplink =
                                Uplink { topic, payload: msg.payload.to_vec(), peer, route: self.route, now: now.wall };
                            match ingest::accept(&self.registry, &self.campaign, device, &mut s, uplink) {
                                Accepted::Data(ops) | Accepted::Pcp { writes: ops, .. } => ops,
                            }
                        }
                    };
                    // Always stored: a bind is the device's first word after a (re)start.
                    ops.retain(|op| !matches!(op, Op::Presence { .. }));
                    ops.push(Op::Presence { device: device.id, record: s.presence() });
                    effects.writes.push(ops);
                    let registered = s.registration.is_some();
                    drop(s);
                    self.deliver(now, device, effects);
                    if registered {
                        self.registered_again(device, effects);
                    }
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

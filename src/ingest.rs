//! The one path every dialect hands a decoded uplink to, once the dialect has proven who sent it:
//! flow control, classification (an upgrade's PCP message or business data), contact and
//! presence, events, and the writes to make durable before the device hears back. Dialects
//! decode the wire and encode the answers around it.

use std::net::SocketAddr;
use std::sync::Arc;

use smallvec::smallvec;

use crate::clock::UnixMs;
use crate::ota::campaign::Campaign;
use crate::registry::{Device, DeviceState, Registry, Route};
use crate::store::{Op, Ops};

/// An uplink as a dialect decoded it.
pub struct Uplink {
    /// Where a dialect without topics files its data.
    pub topic: String,
    pub payload: Vec<u8>,
    /// Where it came from, and the socket that heard it.
    pub peer: SocketAddr,
    pub route: Route,
    pub now: UnixMs,
}

/// What an admitted uplink changes.
pub enum Accepted {
    /// Business data: the writes store it as a message, with its event and the device's contact.
    Data(Ops),
    /// A PCP message moving the device's upgrade on (SPEC §6), not stored as data: `answer` goes
    /// back once `writes` are durable.
    Pcp { writes: Ops, answer: Option<Vec<u8>> },
}

/// Flow control (SPEC §7), charged to the device under its lock: `Err` holds the seconds after
/// which it may send again. A request for the next chunk of its download is not charged, so a
/// device's budget never stalls its own upgrade.
pub fn admit(
    registry: &Registry,
    campaign: &Campaign,
    device: &Device,
    s: &mut DeviceState,
    payload: &[u8],
    now: UnixMs,
) -> Result<(), u32> {
    if campaign.advances_download(device, s, payload) {
        return Ok(());
    }
    s.admit(now, &registry.config.device)
}

/// The device spoke from `peer` through `route`: what to store with the request (its presence
/// and status, [`Registry::contact`]), and the start of an upgrade that waited for it.
pub fn contact(
    registry: &Registry,
    campaign: &Campaign,
    device: &Arc<Device>,
    s: &mut DeviceState,
    now: UnixMs,
    peer: SocketAddr,
    route: Route,
) -> Ops {
    let mut ops = registry.contact(device, s, now, peer, route);
    campaign.contact(device, s, now, &mut ops);
    ops
}

/// Classifies an admitted uplink and gathers what it changes, under the device's lock.
pub fn accept(
    registry: &Registry,
    campaign: &Campaign,
    device: &Arc<Device>,
    s: &mut DeviceState,
    uplink: Uplink,
) -> Accepted {
    let Uplink { topic, payload, peer, route, now } = uplink;
    let mut contact = contact(registry, campaign, device, s, now, peer, route);
    if let Some(message) = campaign.pcp_message(device, &payload) {
        let outcome = campaign.pcp(device, s, now, &message);
        contact.extend(outcome.ops);
        return Accepted::Pcp { writes: contact, answer: outcome.answer };
    }
    contact.extend(campaign.radio_report(device, s, &payload));
    registry.activity.count(&device.product_key, now);
    let then = registry.after_uplink(device, &topic);
    let topic = topic.into_boxed_str();
    let mut writes: Ops = smallvec![Op::Uplink { device: device.id, received_at: now, topic, payload, then }];
    writes.extend(contact);
    Accepted::Data(writes)
}

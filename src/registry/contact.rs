//! What a device's contact changes beyond the request itself: where and when it was last heard
//! (stored at most once a minute), which socket serves it, and the status subscribers were told.

use std::sync::Arc;

use smallvec::SmallVec;

use super::device::DeviceState;
use super::{Device, Registry, Route, Status};
use crate::clock::UnixMs;
use crate::northbound::{Event, EventKind};
use crate::store::{AfterUplink, Op, UplinkEvent};

impl Registry {
    /// The device spoke from `peer` through `route`; returns what to store with the request: its
    /// presence when due, and a `device_status` event if it just came (back) online.
    pub fn contact(
        &self,
        device: &Arc<Device>,
        s: &mut DeviceState,
        now: UnixMs,
        peer: std::net::SocketAddr,
        route: Route,
    ) -> SmallVec<[Op; 3]> {
        let mut ops = SmallVec::new();
        self.tracer.seen(device.id, peer);
        if let Some(record) = s.heard(now, peer, route) {
            ops.push(Op::Presence { device: device.id, record });
        }
        ops.extend(self.announce(device, s, Status::Online, now));
        ops
    }

    /// Records `status` as announced: what to store if it changed (the status itself, and its
    /// event if someone subscribes), in one write.
    fn announce(&self, device: &Device, s: &mut DeviceState, status: Status, now: UnixMs) -> SmallVec<[Op; 2]> {
        let mut ops = SmallVec::new();
        if s.announced == status {
            return ops;
        }
        let previous = std::mem::replace(&mut s.announced, status);
        ops.push(Op::Announced { device: device.id, status: status.to_byte() });
        if self.wanted.wants(EventKind::DeviceStatus) {
            ops.push(Op::Event(Box::new(Event {
                kind: EventKind::DeviceStatus,
                product_key: device.product_key.clone(),
                device_name: device.device_name.clone(),
                time: now,
                data: serde_json::json!({ "status": status, "previous": previous }),
            })));
        }
        ops
    }

    /// Announces devices that turned abnormal or offline by staying silent; returns how many.
    pub fn sweep_statuses(&self, now: UnixMs) -> usize {
        let devices: Vec<_> = crate::sync::read(&self.devices).by_id.values().cloned().collect();
        let mut changed = 0;
        for d in devices {
            let mut s = d.state();
            let status = s.status(now, &self.config.device);
            if status == s.announced {
                continue;
            }
            changed += 1;
            // Queued under the device's lock, like every change of it.
            self.writer.record(self.announce(&d, &mut s, status, now));
        }
        changed
    }

    /// What follows `device`'s uplink on `topic` in its batch: a place in the decode queue if
    /// its product's codec reads it (its event then follows the decoding), else its event when
    /// uplink events are wanted at all.
    pub fn after_uplink(&self, device: &Arc<Device>, topic: &str) -> AfterUplink {
        let source = || device.clone() as Arc<dyn UplinkEvent>;
        if self.codecs.decodes(device.product_key.as_str(), device.device_name.as_str(), topic) {
            AfterUplink::Decode(source())
        } else if self.wanted.wants(EventKind::Uplink) {
            AfterUplink::Event(source())
        } else {
            AfterUplink::Nothing
        }
    }
}

//! Uplinks: notifications (NON, or CON) with a 2.xx code, the observe token and binary payload.
//! The token names the device; the address it came from is only where to send to next (SPEC §4).
//! A PCP message (SPEC §6) is not business data: it moves the device's upgrade on, and its answer
//! goes down the downlink channel once what it changed is stored.

use super::{Channel, Huawei};
use crate::coap::message::MessageType;
use crate::coap::option::OptionNumber;
use crate::coap::resource::Request;
use crate::dialect::Effects;
use crate::dialect::Notified;
use crate::dialect::refusal::{self, Dialect, OverBudget, Refusal};
use crate::identity::ObserveToken;
use crate::ingest::{self, Accepted, Uplink};
use crate::registry::Device;
use crate::registry::NotificationOrder;

impl Huawei {
    pub fn notification(&mut self, req: &Request<'_, '_>, effects: &mut Effects) -> Notified {
        let refuse = |refusal: Refusal, device: Option<&Device>| {
            refusal.record(Dialect::Huawei, device, req);
            Notified::Reject
        };
        let found =
            ObserveToken::from_bytes(req.msg.token).and_then(|t| Some((t, self.registry.device_by_observe(&t)?)));
        let Some((token, device)) = found else {
            return refuse(Refusal::UnknownObserve, None);
        };
        if req.authenticated.is_some_and(|id| id != device.id) {
            return refuse(Refusal::ForeignIdentity, Some(&device));
        }
        // Changes nothing: a CON gets an Empty ACK (so it is not sent again), a NON nothing.
        let ignore = || if req.msg.mtype == MessageType::Con { Notified::Acknowledge } else { Notified::Drop };
        if req.msg.code.class() != 2 {
            // The device ends the relation (RFC 7641 §3.2): nothing to store.
            return ignore();
        }
        let now = req.now.wall;
        let (accepted, channel) = {
            let mut s = device.state();
            if s.firmware_observe == Some(token) {
                drop(s);
                return self.firmware_notification(req, &device, effects);
            }
            if !s.enabled {
                return refuse(Refusal::Disabled, Some(&device));
            }
            if !s.home.is_here() {
                return refuse(Refusal::Moved, Some(&device));
            }
            // The token is the only proof plain CoAP has, and it travels in clear: a copy of an
            // earlier notification sent from elsewhere is acknowledged and changes nothing. From
            // the device's own address an older one is a reordered report, and is stored.
            let number = req.msg.uint_option(OptionNumber::OBSERVE).ok().flatten();
            let order = s.notification_order(number, req.peer, now);
            if order == NotificationOrder::Stale {
                Refusal::StaleNotification.record(Dialect::Huawei, Some(&device), req);
                return ignore();
            }
            if ingest::admit(&self.registry, &self.campaign, &device, &mut s, req.msg.payload, now).is_err() {
                // No 4.29 exists for a notification.
                refusal::over_budget(Dialect::Huawei, &device, req, OverBudget::Dropped);
                return Notified::Drop;
            }
            s.notification_accepted(order, number, now);
            let channel = Channel::of_relation(&s, token);
            let uplink = Uplink {
                topic: channel.topic().into(),
                payload: req.msg.payload.to_vec(),
                peer: req.peer,
                route: self.route,
                now,
            };
            (ingest::accept(&self.registry, &self.campaign, &device, &mut s, uplink), channel)
        };
        // The device acknowledged the relation with a separate notification rather than in the ACK.
        if self.registry.establish_observe(&device, token) {
            tracing::debug!(device = ?device, "observe relation established by a notification");
        }
        match accepted {
            Accepted::Data(writes) => {
                // The device is awake now: its next command leaves at once.
                self.deliver(req.now, &device, effects);
                Notified::Store { writes, undo: None, follow_up: None }
            }
            Accepted::Pcp { writes, answer } => {
                let follow_up = answer.map(|frame| self.pcp_answer(&device, channel, token, req.peer, &frame));
                if follow_up.is_none() {
                    // An answer to our request: the next one may follow.
                    self.deliver(req.now, &device, effects);
                }
                Notified::Store { writes, undo: None, follow_up }
            }
        }
    }
}

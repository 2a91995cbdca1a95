//! Uplinks: notifications (NON, or CON) with a 2.xx code, the observe token and binary payload.
//! The token names the device; the address it came from is only where to send to next (SPEC §4).
//! A PCP message (SPEC §6) is not business data: it moves the device's upgrade on, and its answer
//! goes down the downlink channel once what it changed is stored.

use smallvec::smallvec;

use super::{Huawei, UPLINK_TOPIC};
use crate::coap::message::MessageType;
use crate::coap::resource::{Effects, Notified, Request};
use crate::identity::ObserveToken;
use crate::store::Op;
use crate::telemetry::metric;

impl Huawei {
    pub fn notification(&mut self, req: &Request<'_, '_>, effects: &mut Effects) -> Notified {
        let Some(token) = ObserveToken::from_bytes(req.msg.token) else { return Notified::Reject };
        let Some(device) = self.registry.device_by_observe(&token) else { return Notified::Reject };
        if req.authenticated.is_some_and(|id| id != device.id) {
            return Notified::Reject;
        }
        if req.msg.code.class() != 2 {
            // The device ends the relation (RFC 7641 §3.2): nothing to store.
            return if req.msg.mtype == MessageType::Con { Notified::Acknowledge } else { Notified::Drop };
        }
        let now = req.now.wall;
        let contact = {
            let mut s = device.state();
            if !s.enabled || !s.home.is_here() {
                return Notified::Reject;
            }
            if s.admit(now, &self.registry.config.device).is_err() {
                // No 4.29 exists for a notification; unacknowledged, a CON comes again later.
                metrics::counter!(metric::FLOW_CONTROL).increment(1);
                return Notified::Drop;
            }
            let mut contact = self.registry.contact(&device, &mut s, now, req.peer, self.route);
            if let Some(pcp) = self.registry.pcp_message(&device, req.msg.payload) {
                let outcome = self.registry.upgrade_pcp(&device, &mut s, now, &pcp);
                contact.extend(outcome.ops);
                drop(s);
                self.registry.establish_observe(&device, token);
                let follow_up = outcome.answer.map(|frame| self.pcp_answer(&device, token, req.peer, &frame));
                if follow_up.is_none() {
                    // An answer to our request: the next one may follow.
                    self.deliver(req.now, &device, effects);
                }
                return Notified::Store { ops: contact, undo: None, follow_up };
            }
            contact.extend(self.registry.radio_report(&device, &mut s, req.msg.payload));
            contact
        };
        // The device acknowledged the relation with a separate notification rather than in the ACK.
        if self.registry.establish_observe(&device, token) {
            tracing::debug!(device = ?device, "observe relation established by a notification");
        }
        let mut ops = smallvec![Op::Uplink {
            device: device.id,
            received_at: now,
            topic: UPLINK_TOPIC.into(),
            payload: req.msg.payload.to_vec(),
            source: self.registry.event_source(&device),
        }];
        ops.extend(contact);
        // The device is awake now: its next command leaves at once.
        self.deliver(req.now, &device, effects);
        Notified::Store { ops, undo: None, follow_up: None }
    }
}

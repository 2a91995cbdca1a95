//! Commands down: CON `POST /t/d` with the observe token, one at a time; how the device answers
//! settles the command (SPEC §5): an ACK with 2.xx and a payload is SUCCESSFUL with that result,
//! without one DELIVERED, 4.xx/5.xx or RST FAILED, silence through every retransmission TIMEOUT.

use std::sync::Arc;

use super::{Channel, Huawei, Started};
use crate::clock::Now;
use crate::coap::message::Code;
use crate::coap::resource::{ExchangeKey, Outgoing, Reply};
use crate::dialect::Effects;
use crate::downlink::Settlement;
use crate::identity::ObserveToken;
use crate::registry::Device;

impl Huawei {
    /// Sends the device's waiting PCP request, else its next command, unless one is in flight or
    /// it has no observe relation.
    pub(super) fn deliver(&mut self, now: Now, device: &Arc<Device>, effects: &mut Effects) {
        if self.deliver_pcp(device, effects) {
            return;
        }
        let exchange = self.registry.next_exchange();
        let (command, token, peer, channel) = {
            let s = device.state();
            // Every uplink asks; most devices have nothing queued.
            if !self.commands.any(device.id, &s) {
                return;
            }
            let (Some(token), Some(peer)) = (s.observe, s.address) else { return };
            let Some(command) = self.commands.send_next(device.id, &s, now.wall, exchange) else { return };
            (command, token, peer, Channel::of(&s))
        };
        let message = channel.down(token, &command.payload);
        tracing::debug!(device = ?device, command = %command.id, %peer, "sending command");
        effects.outgoing.push(Outgoing { peer, message, retransmit: self.retransmit(device, false), exchange });
        self.started.insert(exchange, Started::Command { device: device.clone(), token });
    }

    pub(super) fn command_answered(
        &mut self,
        now: Now,
        device: &Arc<Device>,
        token: ObserveToken,
        exchange: ExchangeKey,
        reply: &Reply<'_, '_>,
        effects: &mut Effects,
    ) {
        let settlement = match reply {
            Reply::Ack(msg) if msg.code == Code::EMPTY => Settlement::Delivered,
            Reply::Ack(msg) if msg.code.class() == 2 && msg.payload.is_empty() => Settlement::Delivered,
            Reply::Ack(msg) if msg.code.class() == 2 => Settlement::Succeeded(msg.payload.to_vec()),
            Reply::Ack(msg) => Settlement::Failed {
                reason: format!("the device answered {}", msg.code),
                result: (!msg.payload.is_empty()).then(|| msg.payload.to_vec()),
            },
            Reply::Reset => Settlement::Failed { reason: "the device rejected the command (RST)".into(), result: None },
            Reply::TimedOut | Reply::Unsent => Settlement::TimedOut,
        };
        self.commands.settle(device, exchange, &settlement, now.wall);
        self.next_after(now, device, token, reply, effects);
    }

    /// After a downlink exchange under the relation `token` ended: what goes next.
    pub(super) fn next_after(
        &mut self,
        now: Now,
        device: &Arc<Device>,
        token: ObserveToken,
        reply: &Reply<'_, '_>,
        effects: &mut Effects,
    ) {
        match reply {
            // The device no longer knows the relation (it rebooted): the rest wait for its bind.
            Reply::Reset => self.registry.end_observe(device, token),
            // Silence: the rest wait for its next report.
            Reply::TimedOut | Reply::Unsent => {}
            // An answer means the device is listening: the next message follows.
            Reply::Ack(_) => self.deliver(now, device, effects),
        }
    }
}

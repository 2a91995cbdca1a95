//! PCP over the Huawei dialect (SPEC §6): the platform's requests and its answers to the device's
//! requests both go down as CON `POST /t/d` under the observe token; the device's answers come up
//! as notifications, or in the ACK of the request.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{Channel, Huawei, Started};
use crate::clock::Now;
use crate::coap::message::{Code, MessageBuilder, MessageType};
use crate::coap::option::{OptionNumber, content_format};
use crate::coap::resource::{ExchangeKey, Outgoing, Reply};
use crate::dialect::Effects;
use crate::identity::ObserveToken;
use crate::ota::campaign::PlatformRequest;
use crate::registry::Device;
use crate::store::records::OtaProtocol;

/// `POST /t/d` with `payload`, as commands go.
pub(super) fn post_t_d(token: ObserveToken, payload: &[u8]) -> Vec<u8> {
    MessageBuilder::new(MessageType::Con, Code::POST, 0, &token.0)
        .option(OptionNumber::OBSERVE, &[])
        .option(OptionNumber::URI_PATH, b"t")
        .option(OptionNumber::URI_PATH, b"d")
        .uint_option(OptionNumber::CONTENT_FORMAT, content_format::OCTET_STREAM)
        .payload(payload)
        .build()
}

impl Huawei {
    /// The answer to a device's PCP request, sent once: the device repeats its request until
    /// answered, so retransmitting the answer as well would only double the traffic.
    pub(super) fn pcp_answer(
        &mut self,
        device: &Arc<Device>,
        channel: Channel,
        token: ObserveToken,
        peer: SocketAddr,
        frame: &[u8],
    ) -> Outgoing {
        let retransmit = self.retransmit(device, true);
        let exchange = self.registry.next_exchange();
        self.started.insert(exchange, Started::PcpAnswer { device: device.clone() });
        Outgoing { peer, message: channel.down(token, frame), retransmit, exchange }
    }

    /// Sends the device's waiting PCP request (or, for an upgrade over Object 5, the first of its
    /// LwM2M operations); true if one is waiting or on its way (commands then wait: PCP goes
    /// first).
    pub(super) fn deliver_pcp(&mut self, device: &Arc<Device>, effects: &mut Effects) -> bool {
        let exchange = self.registry.next_exchange();
        let (frame, token, peer, channel) = {
            let mut s = device.state();
            let waiting = self.campaign.has_request(device.id, &mut s);
            // Every uplink asks; most devices have nothing waiting.
            if !waiting {
                return false;
            }
            let (Some(token), Some(peer)) = (s.observe, s.address) else { return true };
            let object5 = self.over_object5(device, &s);
            // A device of an Object 5 product that is not a registered LwM2M client is upgraded
            // once it registers (PCP is not what its product upgrades over); its commands go.
            if !object5 && self.registry.ota_protocol(device) == Some(OtaProtocol::Lwm2m) {
                return false;
            }
            let request = match self.campaign.request(device.id, &mut s, exchange) {
                PlatformRequest::None => return false,
                PlatformRequest::InFlight => return true,
                PlatformRequest::Send(request) => request,
            };
            if object5 {
                let ops = self.firmware_operations(device, &mut s, &request);
                drop(s);
                match self.start_firmware(device, peer, ops, Some(exchange)) {
                    Some(first) => effects.outgoing.push(first),
                    None => self.campaign.request_ended(device.id, &mut device.state(), exchange, true),
                }
                return true;
            }
            (request.encode(), token, peer, Channel::of(&s))
        };
        effects.outgoing.push(Outgoing {
            peer,
            message: channel.down(token, &frame),
            retransmit: self.retransmit(device, false),
            exchange,
        });
        self.started.insert(exchange, Started::PcpRequest { device: device.clone(), token });
        true
    }

    pub(super) fn pcp_request_answered(
        &mut self,
        now: Now,
        device: &Arc<Device>,
        token: ObserveToken,
        exchange: ExchangeKey,
        reply: &Reply<'_, '_>,
        effects: &mut Effects,
    ) {
        {
            let mut s = device.state();
            self.campaign.request_ended(device.id, &mut s, exchange, matches!(reply, Reply::Ack(_)));
            // The device may answer in the ACK itself.
            if let Reply::Ack(msg) = reply
                && let Some(pcp) = self.campaign.pcp_message(device, msg.payload)
            {
                let outcome = self.campaign.pcp(device, &mut s, now.wall, &pcp);
                if !outcome.ops.is_empty() {
                    effects.writes.push(outcome.ops);
                }
            }
        }
        self.next_after(now, device, token, reply, effects);
    }
}

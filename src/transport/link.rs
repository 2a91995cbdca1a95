//! What sits between a socket and its CoAP endpoint: nothing on the plain ports, DTLS sessions
//! on 5684. The socket loop in `udp` is the same for both.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;

use crate::clock::Now;
use crate::coap::endpoint::{Actions, Endpoint, Transmit};
use crate::coap::resource::Resources;
use crate::store::Ops;

/// Datagrams to send, each with its destination.
pub type Wire = Vec<(SocketAddr, Bytes)>;

/// One received datagram; `truncated` when it was longer than the receive buffer.
pub struct Datagram<'a> {
    pub peer: SocketAddr,
    pub data: &'a [u8],
    pub truncated: bool,
}

pub trait Link {
    /// Hands one received datagram to `endpoint`, unwrapping it first.
    fn receive<R: Resources>(
        &mut self,
        now: Now,
        datagram: Datagram<'_>,
        endpoint: &mut Endpoint<R>,
        actions: &mut Actions<R::Writes>,
        wire: &mut Wire,
    );

    /// Wraps the endpoint's CoAP datagrams for the wire.
    fn seal(&mut self, transmits: impl Iterator<Item = Transmit>, wire: &mut Wire);

    /// When [`Link::handle_timeout`] is next due.
    fn poll_timeout(&self) -> Option<Instant>;

    fn handle_timeout(&mut self, now: Instant, wire: &mut Wire);

    /// What the store must write for the link's own state (DTLS sessions), in order.
    fn take_writes(&mut self) -> Ops;

    /// Publishes the link's counters as metrics (about once a second).
    fn export_stats(&mut self, port: &'static str);
}

/// Plain CoAP over UDP (5683, and 5682 whose encryption lives in the dialect).
pub struct Plain;

impl Link for Plain {
    fn receive<R: Resources>(
        &mut self,
        now: Now,
        datagram: Datagram<'_>,
        endpoint: &mut Endpoint<R>,
        actions: &mut Actions<R::Writes>,
        _wire: &mut Wire,
    ) {
        let Datagram { peer, data, truncated } = datagram;
        if truncated {
            endpoint.handle_oversized(peer, data, actions);
        } else {
            endpoint.handle_datagram(now, peer, None, data, actions);
        }
    }

    fn seal(&mut self, transmits: impl Iterator<Item = Transmit>, wire: &mut Wire) {
        wire.extend(transmits.map(|t| (t.peer, t.data)));
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn handle_timeout(&mut self, _now: Instant, _wire: &mut Wire) {}

    fn take_writes(&mut self) -> Ops {
        Ops::new()
    }

    fn export_stats(&mut self, _port: &'static str) {}
}

//! CoAP over DTLS (5684): the peer table between the socket and the CoAP endpoint.

use std::time::Instant;

use crate::clock::Now;
use crate::coap::endpoint::{Actions, Endpoint, Transmit};
use crate::coap::resource::Resources;
use crate::dtls::peers::PeerTable;
use crate::dtls::psk::{self, Holder};
use crate::registry::{Device, Registry};
use crate::telemetry::metric;
use crate::transport::link::{Datagram, Link, Wire};

/// PSK identities name the registry's devices.
impl crate::dtls::psk::Keys for Registry {
    fn by_names(&self, product_key: &str, device_name: &str) -> Option<Holder> {
        self.device(product_key, device_name).map(|d| holder(&d))
    }

    fn by_node(&self, node: &str) -> Option<Holder> {
        self.device_by_node(node).map(|d| holder(&d))
    }
}

fn holder(device: &Device) -> Holder {
    let served = {
        let s = device.state();
        if !s.enabled {
            Err(psk::Refusal::Disabled)
        } else if !s.home.is_here() {
            Err(psk::Refusal::Moved)
        } else {
            Ok(())
        }
    };
    Holder { device: device.id, secret: device.secret.clone(), psk_hex: device.psk_hex.clone(), served }
}

pub struct Dtls {
    peers: PeerTable,
    /// Datagrams longer than the receive buffer: no DTLS record of ours is that long.
    oversized: u64,
    /// Responses for peers whose session ended before the answer was ready.
    unsent: u64,
    /// Gauge values last exported; sockets of a port add their deltas to one gauge.
    exported: (usize, usize),
}

impl Dtls {
    pub fn new(peers: PeerTable) -> Dtls {
        Dtls { peers, oversized: 0, unsent: 0, exported: (0, 0) }
    }
}

impl Link for Dtls {
    fn receive<R: Resources>(
        &mut self,
        now: Now,
        datagram: Datagram<'_>,
        endpoint: &mut Endpoint<R>,
        actions: &mut Actions<R::Writes>,
        wire: &mut Wire,
    ) {
        if datagram.truncated {
            self.oversized += 1;
            return;
        }
        self.peers.handle_datagram(now.instant, datagram.peer, datagram.data, wire, &mut |peer, device, plain| {
            endpoint.handle_datagram(now, peer, device, plain, actions)
        });
    }

    fn seal(&mut self, transmits: impl Iterator<Item = Transmit>, wire: &mut Wire) {
        for t in transmits {
            if !self.peers.send(t.peer, &t.data, wire) {
                self.unsent += 1;
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.peers.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant, wire: &mut Wire) {
        self.peers.handle_timeout(now, wire);
    }

    fn export_stats(&mut self, port: &'static str) {
        let s = self.peers.take_stats();
        metrics::counter!(metric::DTLS_HELLO_VERIFY, "port" => port).increment(s.hello_verify_requests);
        metrics::counter!(metric::DTLS_HANDSHAKES_STARTED, "port" => port).increment(s.started);
        for (suite, n) in s.completed {
            metrics::counter!(metric::DTLS_HANDSHAKES_COMPLETED, "port" => port, "suite" => suite).increment(n);
        }
        for (reason, n) in s.failed {
            metrics::counter!(metric::DTLS_HANDSHAKES_FAILED, "port" => port, "reason" => reason).increment(n);
        }
        for (limit, n) in s.refused {
            metrics::counter!(metric::DTLS_REFUSED, "port" => port, "limit" => limit).increment(n);
        }
        metrics::counter!(metric::DTLS_EVICTIONS, "port" => port, "reason" => "idle").increment(s.evicted_idle);
        metrics::counter!(metric::DTLS_CLOSED, "port" => port).increment(s.closed_by_peer);
        metrics::counter!(metric::DTLS_STRAY, "port" => port).increment(s.stray + std::mem::take(&mut self.oversized));
        metrics::counter!(metric::DTLS_UNSENT, "port" => port).increment(std::mem::take(&mut self.unsent));
        let now = (self.peers.sessions(), self.peers.handshakes_in_progress());
        let (sessions, handshakes) = std::mem::replace(&mut self.exported, now);
        metrics::gauge!(metric::DTLS_SESSIONS, "port" => port).increment(now.0 as f64 - sessions as f64);
        metrics::gauge!(metric::DTLS_HANDSHAKES_IN_PROGRESS, "port" => port)
            .increment(now.1 as f64 - handshakes as f64);
    }
}

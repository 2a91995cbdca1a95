//! The simulated PCP device of `nbhub::simulate::pcp` on a real socket: a Huawei device on 5683
//! reporting what the device sends as NON notifications and answering the platform's CON POSTs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbhub::coap::message::{Code, MessageType};
use nbhub::simulate::pcp::PcpDevice as Machine;
pub use nbhub::simulate::pcp::{Behaviour, Concurrency, Log};

use super::{HuaweiDevice, Peer};

pub struct PcpDevice {
    pub dev: HuaweiDevice<Peer>,
    pub sim: Machine,
    /// Where the server is; when it changes (a restart) the device binds there again.
    pub server: Arc<Mutex<SocketAddr>>,
    bound_to: SocketAddr,
}

impl PcpDevice {
    pub fn new(server: Arc<Mutex<SocketAddr>>, node: &str, behaviour: Behaviour, package: Arc<Vec<u8>>) -> PcpDevice {
        let addr = *server.lock().unwrap();
        PcpDevice { dev: HuaweiDevice::new(addr, node), sim: Machine::new(behaviour, package), server, bound_to: addr }
    }

    pub fn counting(mut self, c: Arc<Concurrency>) -> PcpDevice {
        self.sim = self.sim.counting(c, 1);
        self
    }

    pub fn log(&self) -> &Log {
        &self.sim.log
    }

    pub fn version(&self) -> &str {
        self.sim.version()
    }

    /// Runs until `stop` is set or `limit` passes.
    pub fn run(mut self, stop: &AtomicBool, limit: Duration) -> PcpDevice {
        let deadline = Instant::now() + limit;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            self.poll();
        }
        self
    }

    /// One round: what is due, then what arrives within 20 ms.
    pub fn poll(&mut self) {
        let server = *self.server.lock().unwrap();
        if server != self.bound_to {
            // The server restarted elsewhere: bind there, keeping everything downloaded.
            self.dev.wire = Peer::new(server);
            self.bound_to = server;
            self.dev.bind();
        }
        for r in self.sim.due(Instant::now()) {
            self.dev.report(&r.encode());
        }
        let Some(request) = self.dev.recv_reply(Duration::from_millis(20)) else { return };
        if request.mtype != MessageType::Con || request.code != Code::POST {
            return;
        }
        let Some(answers) = self.sim.receive(&request.payload, Instant::now()) else { return };
        let in_ack = answers.in_ack.map(|a| a.encode()).unwrap_or_default();
        self.dev.answer(&request, Code::CHANGED, &in_ack);
        for a in answers.after {
            self.dev.report(&a.encode());
        }
    }
}

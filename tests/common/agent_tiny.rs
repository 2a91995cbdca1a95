//! A blocking driver for [`nbhub::simulate::agent_tiny::AgentTiny`] on its own UDP socket: it
//! sends the client's requests, retransmits them while the server is away, and answers whatever
//! the server asks meanwhile.

use std::time::{Duration, Instant};

use nbhub::coap::message::{Message, MessageType};
use nbhub::simulate::agent_tiny::AgentTiny;

use super::Peer;

pub struct Driver {
    pub peer: Peer,
    pub client: AgentTiny,
}

impl Driver {
    pub fn new(server: std::net::SocketAddr, client: AgentTiny) -> Driver {
        Driver { peer: Peer::new(server), client }
    }

    fn serve(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let m = Message::parse(data).ok()?;
        match m.mtype {
            MessageType::Con => {
                let answer = self.client.serve(&m);
                self.peer.send(&answer);
                None
            }
            _ => Some(data.to_vec()),
        }
    }

    /// Sends a CON request and returns its answer, serving whatever the server asks meanwhile.
    pub fn exchange(&mut self, build: impl FnOnce(&AgentTiny, u16, [u8; 4]) -> Vec<u8>) -> Vec<u8> {
        let (mid, token) = (self.peer.next_mid(), self.peer.next_token());
        let data = build(&self.client, mid, token);
        self.send_and_wait(mid, &data)
    }

    fn send_and_wait(&mut self, mid: u16, data: &[u8]) -> Vec<u8> {
        self.peer.send(data);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut resend = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let Some(d) = self.peer.recv_within(Duration::from_millis(200)) else {
                // The server may be restarting: CoAP retransmits.
                if Instant::now() >= resend {
                    self.peer.send(data);
                    resend = Instant::now() + Duration::from_secs(2);
                }
                continue;
            };
            if let Some(other) = self.serve(&d)
                && Message::parse(&other).is_ok_and(|m| m.mtype == MessageType::Ack && m.mid == mid)
            {
                return other;
            }
        }
        panic!("no answer to the client's request; the server asked {:?}", self.client.served);
    }

    /// Serves the server's requests until `done` holds, within `within`.
    pub fn serve_until(&mut self, within: Duration, done: impl Fn(&AgentTiny) -> bool) {
        let deadline = Instant::now() + within;
        while !done(&self.client) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("not done within {within:?}; the server asked {:?}", self.client.served));
            if let Some(d) = self.peer.recv_within(left.min(Duration::from_millis(200))) {
                self.serve(&d);
            }
        }
    }

    pub fn register(&mut self) -> Vec<u8> {
        self.exchange(|c, mid, token| c.register(mid, &token))
    }

    /// Block `num`'s answer.
    pub fn fetch_block(&mut self, num: u32) -> Vec<u8> {
        self.exchange(|c, mid, token| c.block_request(num, mid, &token).expect("a package URI was written"))
    }

    /// Downloads from where it stands until the last block (or `until`, exclusive); true once done.
    pub fn download(&mut self, until: Option<u32>) -> bool {
        loop {
            let num = self.client.next_block();
            if until.is_some_and(|u| num >= u) {
                return false;
            }
            let answer = self.fetch_block(num);
            let more = self.client.block_answered(num, &Message::parse(&answer).unwrap()).unwrap();
            if !more {
                return true;
            }
        }
    }

    /// Reports the update state under the server's observation; the answer.
    pub fn notify_state(&mut self, state: i64) -> Vec<u8> {
        let mid = self.peer.next_mid();
        let data = self.client.state_notification(state, mid).expect("the server observes /5/0/3");
        let ack = self.send_and_wait(mid, &data);
        self.client.report_acked();
        ack
    }

    /// The reboot an update makes; it comes back on a new port, as after any reboot.
    pub fn reboot(&mut self) {
        self.peer = Peer::new(self.peer.server);
        self.client.reboot();
    }
}

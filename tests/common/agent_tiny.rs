//! A simulator of what LiteOS's `agent_tiny` (on wakaama) does on the wire where lwm2m-node-lib
//! differs: `POST /rd` with its link format and queue mode, an empty 2.05 to the `/19/0/0`
//! observe, CON notifications, Object 4 and 5 reads answered in TLV, the package fetched over the
//! socket it registered on in 512-byte blocks, and after the reboot an update makes, a new
//! Register and then the `/5/0/3` report under the observation made before it.

use std::time::{Duration, Instant};

use nbhub::coap::block::Block;
use nbhub::coap::message::{Code, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::dialect::lwm2m::{TLV, Value, tlv};

use super::{Peer, Reply};

pub const LINKS: &[u8] = br#"</>;rt="oma.lwm2m",</1/0>,</2>,</3/0>,</4/0>,</5/0>,</6/0>,</19/0>,</19/1>"#;

pub struct AgentTiny {
    pub peer: Peer,
    pub endpoint: String,
    pub version: String,
    /// `/5/0/3` and `/5/0/5`.
    pub state: i64,
    pub result: i64,
    /// The token and last number of the server's `/5/0/3` observation.
    pub fw_observe: Option<(Vec<u8>, u32)>,
    pub package_path: Option<Vec<String>>,
    /// The package as downloaded so far.
    pub downloaded: Vec<u8>,
    /// Every request the server sent, as `METHOD /path`.
    pub served: Vec<String>,
    /// The version the device runs after its update.
    pub new_version: String,
}

fn path_of(r: &Reply) -> String {
    r.options.iter().filter(|(n, _)| *n == 11).map(|(_, v)| format!("/{}", String::from_utf8_lossy(v))).collect()
}

impl AgentTiny {
    pub fn new(server: std::net::SocketAddr, endpoint: &str, version: &str, new_version: &str) -> AgentTiny {
        AgentTiny {
            peer: Peer::new(server),
            endpoint: endpoint.into(),
            version: version.into(),
            state: 0,
            result: 0,
            fw_observe: None,
            package_path: None,
            downloaded: Vec::new(),
            served: Vec::new(),
            new_version: new_version.into(),
        }
    }

    fn send(&self, data: &[u8]) {
        self.peer.send(data);
    }

    /// Answers one request of the server's as agent_tiny does.
    fn serve(&mut self, r: &Reply) {
        let path = path_of(r);
        let method = match r.code {
            Code::GET => "GET",
            Code::PUT => "PUT",
            Code::POST => "POST",
            _ => "OTHER",
        };
        self.served.push(format!("{method} {path}"));
        let answer = |code: Code, body: Option<Vec<u8>>| {
            let b = MessageBuilder::new(MessageType::Ack, code, r.mid, &r.token);
            match body {
                Some(body) => b.uint_option(OptionNumber::CONTENT_FORMAT, TLV).payload(&body).build(),
                None => b.build(),
            }
        };
        let int = |id: u16, v: i64| Some(tlv(&[(id, Value::Integer(v))]));
        let observing = r.option(OptionNumber::OBSERVE.0).is_some();
        let reply = match (r.code, path.as_str()) {
            // The data observation: an empty 2.05, data comes as notifications.
            (Code::GET, "/19/0/0") => MessageBuilder::new(MessageType::Ack, Code::CONTENT, r.mid, &r.token).build(),
            (Code::GET, "/3/0/3") => answer(Code::CONTENT, Some(tlv(&[(3, Value::Text(&self.version))]))),
            (Code::GET, "/4/0/2") => answer(Code::CONTENT, int(2, -88)),
            (Code::GET, "/4/0/3") => answer(Code::CONTENT, int(3, 12)),
            (Code::GET, "/4/0/8") => answer(Code::CONTENT, int(8, 24_577)),
            (Code::GET, "/5/0/3") => {
                if observing {
                    self.fw_observe = Some((r.token.clone(), 0));
                }
                answer(Code::CONTENT, int(3, self.state))
            }
            (Code::GET, "/5/0/5") => answer(Code::CONTENT, int(5, self.result)),
            (Code::PUT, "/5/0/1") => {
                let uri = String::from_utf8(r.payload.clone()).unwrap();
                // agent_tiny ignores the host and any query: only the path counts.
                let path = uri.splitn(4, '/').nth(3).unwrap_or_default();
                self.package_path = Some(path.split('/').map(String::from).collect());
                self.state = 1;
                self.result = 0;
                answer(Code::CHANGED, None)
            }
            (Code::POST, "/5/0/2") if self.state == 2 => {
                self.state = 3;
                answer(Code::CHANGED, None)
            }
            (Code::POST, "/5/0/2") => answer(Code::METHOD_NOT_ALLOWED, None),
            _ => answer(Code::NOT_FOUND, None),
        };
        self.send(&reply);
    }

    /// Sends a CON request and returns its answer, serving whatever the server asks meanwhile.
    pub fn exchange(&mut self, build: impl FnOnce(u16, [u8; 4]) -> Vec<u8>) -> Reply {
        let (mid, token) = (self.peer.next_mid(), self.peer.next_token());
        let data = build(mid, token);
        self.send(&data);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut resend = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let Some(d) = self.peer.recv_within(Duration::from_millis(200)) else {
                // The server may be restarting: CoAP retransmits.
                if Instant::now() >= resend {
                    self.send(&data);
                    resend = Instant::now() + Duration::from_secs(2);
                }
                continue;
            };
            let r = Reply::parse(&d);
            match r.mtype {
                MessageType::Ack if r.mid == mid => return r,
                MessageType::Con => self.serve(&r),
                _ => {}
            }
        }
        panic!("no answer to {:?}", path_of(&Reply::parse(&data)));
    }

    /// Serves the server's requests until `done` holds, within `within`.
    pub fn serve_until(&mut self, within: Duration, done: impl Fn(&AgentTiny) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("not done within {within:?}; the server asked {:?}", self.served));
            if let Some(d) = self.peer.recv_within(left.min(Duration::from_millis(200))) {
                let r = Reply::parse(&d);
                if r.mtype == MessageType::Con {
                    self.serve(&r);
                }
            }
        }
    }

    /// `POST /rd` in queue mode; the answer.
    pub fn register(&mut self) -> Reply {
        let query = [format!("ep={}", self.endpoint), "lwm2m=1.0".into(), "b=UQ".into(), "lt=300".into()];
        self.exchange(|mid, token| {
            let mut b = MessageBuilder::new(MessageType::Con, Code::POST, mid, &token)
                .option(OptionNumber::URI_PATH, b"rd")
                .uint_option(OptionNumber::CONTENT_FORMAT, 40);
            for q in &query {
                b = b.option(OptionNumber::URI_QUERY, q.as_bytes());
            }
            b.payload(LINKS).build()
        })
    }

    /// Block `num` of the package (512 bytes), over the socket it registered on.
    pub fn fetch_block(&mut self, num: u32) -> Reply {
        let path = self.package_path.clone().expect("a package URI was written");
        self.exchange(|mid, token| {
            let mut b = MessageBuilder::new(MessageType::Con, Code::GET, mid, &token);
            for segment in &path {
                b = b.option(OptionNumber::URI_PATH, segment.as_bytes());
            }
            b.uint_option(OptionNumber::BLOCK2, Block { num, more: false, szx: 5 }.value()).build()
        })
    }

    /// Downloads blocks from `from` on until the last (or `until`, exclusive); true once done.
    pub fn download(&mut self, from: u32, until: Option<u32>) -> bool {
        self.downloaded.truncate(from as usize * 512);
        let mut num = from;
        while until.is_none_or(|u| num < u) {
            let r = self.fetch_block(num);
            assert_eq!(r.code, Code::CONTENT, "block {num}: {:?}", r.code);
            let block = Block::parse(r.option(OptionNumber::BLOCK2.0).expect("every answer has Block2")).unwrap();
            assert_eq!((block.num, block.size()), (num, 512), "the server honours the size asked");
            self.downloaded.extend_from_slice(&r.payload);
            if !block.more {
                return true;
            }
            num += 1;
        }
        false
    }

    /// A CON notification of the update state under the observation made before (agent_tiny
    /// keeps it across the reboot); the answer.
    pub fn notify_state(&mut self, state: i64) -> Reply {
        self.state = state;
        let (token, number) = self.fw_observe.clone().expect("the server observes /5/0/3");
        self.fw_observe = Some((token.clone(), number + 1));
        let body = tlv(&[(3, Value::Integer(state))]);
        self.exchange(|mid, _| {
            MessageBuilder::new(MessageType::Con, Code::CONTENT, mid, &token)
                .uint_option(OptionNumber::OBSERVE, number + 1)
                .uint_option(OptionNumber::CONTENT_FORMAT, TLV)
                .payload(&body)
                .build()
        })
    }

    /// The reboot an update makes: a new socket (a new port, as after any reboot), the new
    /// version, state idle and result success.
    pub fn reboot(&mut self) {
        self.peer = Peer::new(self.peer.server);
        self.version = self.new_version.clone();
        self.state = 0;
        self.result = 1;
    }
}

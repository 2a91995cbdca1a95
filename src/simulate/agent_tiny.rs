//! A simulated LwM2M client behaving as LiteOS's `agent_tiny` (on wakaama) does on the wire in a
//! firmware upgrade over Object 5: `POST /rd` with its link format in queue mode, an empty 2.05
//! to the `/19/0/0` observation, Object 3, 4 and 5 reads answered in TLV, the package fetched
//! over the socket it registered on in 512-byte blocks (any block again after an interruption),
//! its `/5/0/3` reported as CON notifications under the server's observation, and after the
//! reboot an update makes, a new Register and the report under the observation made before it.
//!
//! Free of I/O: the caller sends what it builds and hands over what the server sent, so the tests'
//! blocking driver and the benchmark's tasks run the same client.

use std::sync::Arc;

use super::pcp::Concurrency;
use crate::coap::block::Block;
use crate::coap::message::{Code, Message, MessageBuilder, MessageType};
use crate::coap::option::{OptionNumber, content_format};

/// OMA LwM2M TLV's Content-Format.
const TLV: u32 = 11542;

/// One resource in TLV, written here rather than with the server's encoder, so the tests check
/// the server's decoder against another implementation: type byte `11` (resource with value),
/// an 8-bit id, the length in the type byte or one more byte.
fn tlv_resource(id: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 3);
    match value.len() {
        n @ 0..=7 => out.extend([0xC0 | n as u8, id]),
        n => out.extend([0xC8, id, n as u8]),
    }
    out.extend_from_slice(value);
    out
}

/// An integer resource as wakaama writes it: the shortest of 1, 2, 4 or 8 bytes.
fn tlv_integer(id: u8, v: i64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let len = match v {
        -128..=127 => 1,
        -32_768..=32_767 => 2,
        -2_147_483_648..=2_147_483_647 => 4,
        _ => 8,
    };
    tlv_resource(id, &bytes[8 - len..])
}

pub const LINKS: &[u8] = br#"</>;rt="oma.lwm2m",</1/0>,</2>,</3/0>,</4/0>,</5/0>,</6/0>,</19/0>,</19/1>"#;

/// The block size agent_tiny asks for.
pub const BLOCK_SIZE: usize = 512;

/// Radio conditions, as Object 4 gives them.
#[derive(Debug, Clone, Copy)]
pub struct Radio {
    pub rsrp: i64,
    pub sinr: i64,
    pub cell_id: i64,
}

pub struct AgentTiny {
    pub endpoint: String,
    pub version: String,
    /// The version it runs after the update.
    pub new_version: String,
    pub radio: Radio,
    /// `/5/0/3` and `/5/0/5`. A reported state takes effect when the report's ACK arrives, as
    /// in agent_tiny's FOTA state machine: an Execute before then is refused with 4.00.
    pub state: i64,
    reported: Option<i64>,
    pub result: i64,
    /// The token and last number of the server's `/5/0/3` observation.
    pub fw_observe: Option<(Vec<u8>, u32)>,
    /// The package URI's path, once written.
    pub package_path: Option<Vec<String>>,
    /// The package as downloaded so far.
    pub downloaded: Vec<u8>,
    /// Every request the server sent, as `METHOD /path`.
    pub served: Vec<String>,
    /// A budget its download counts against, from the URI write to the download's end.
    counting: Option<(Arc<Concurrency>, usize)>,
    counted: bool,
}

fn path_of(m: &Message<'_>) -> String {
    m.options_of(OptionNumber::URI_PATH).map(|s| format!("/{}", String::from_utf8_lossy(s))).collect()
}

impl AgentTiny {
    pub fn new(endpoint: &str, version: &str, new_version: &str) -> AgentTiny {
        AgentTiny {
            endpoint: endpoint.into(),
            version: version.into(),
            new_version: new_version.into(),
            radio: Radio { rsrp: -88, sinr: 12, cell_id: 24_577 },
            state: 0,
            reported: None,
            result: 0,
            fw_observe: None,
            package_path: None,
            downloaded: Vec::new(),
            served: Vec::new(),
            counting: None,
            counted: false,
        }
    }

    /// Counts its download in `c` with `weight` while it runs.
    pub fn counting(mut self, c: Arc<Concurrency>, weight: usize) -> AgentTiny {
        self.counting = Some((c, weight));
        self
    }

    /// `POST /rd` in queue mode.
    pub fn register(&self, mid: u16, token: &[u8]) -> Vec<u8> {
        let mut b = MessageBuilder::new(MessageType::Con, Code::POST, mid, token)
            .option(OptionNumber::URI_PATH, b"rd")
            .uint_option(OptionNumber::CONTENT_FORMAT, content_format::LINK_FORMAT);
        for q in [format!("ep={}", self.endpoint), "lwm2m=1.0".into(), "b=UQ".into(), "lt=300".into()] {
            b = b.option(OptionNumber::URI_QUERY, q.as_bytes());
        }
        b.payload(LINKS).build()
    }

    /// The radio in use for a download (`on`) or not: from the URI write until the report that
    /// ends it, or a reboot.
    fn downloading(&mut self, on: bool) {
        if on != self.counted {
            self.counted = on;
            if let Some((c, weight)) = &self.counting {
                if on { c.start(*weight) } else { c.end(*weight) }
            }
        }
    }

    /// The answer to a request of the server's.
    pub fn serve(&mut self, r: &Message<'_>) -> Vec<u8> {
        let path = path_of(r);
        let method = match r.code {
            Code::GET => "GET",
            Code::PUT => "PUT",
            Code::POST => "POST",
            _ => "OTHER",
        };
        self.served.push(format!("{method} {path}"));
        let answer = |code: Code, body: Option<Vec<u8>>| {
            let b = MessageBuilder::new(MessageType::Ack, code, r.mid, r.token);
            match body {
                Some(body) => b.uint_option(OptionNumber::CONTENT_FORMAT, TLV).payload(&body).build(),
                None => b.build(),
            }
        };
        let int = |id: u8, v: i64| Some(tlv_integer(id, v));
        match (r.code, path.as_str()) {
            // The data observation: an empty 2.05; data comes as notifications.
            (Code::GET, "/19/0/0") => answer(Code::CONTENT, None),
            (Code::GET, "/3/0/3") => answer(Code::CONTENT, Some(tlv_resource(3, self.version.as_bytes()))),
            (Code::GET, "/4/0/2") => answer(Code::CONTENT, int(2, self.radio.rsrp)),
            (Code::GET, "/4/0/3") => answer(Code::CONTENT, int(3, self.radio.sinr)),
            (Code::GET, "/4/0/8") => answer(Code::CONTENT, int(8, self.radio.cell_id)),
            (Code::GET, "/5/0/3") => {
                if r.option(OptionNumber::OBSERVE).is_some() {
                    self.fw_observe = Some((r.token.to_vec(), 0));
                }
                answer(Code::CONTENT, int(3, self.state))
            }
            (Code::GET, "/5/0/5") => answer(Code::CONTENT, int(5, self.result)),
            (Code::PUT, "/5/0/1") => {
                let uri = String::from_utf8_lossy(r.payload);
                // agent_tiny ignores the host and any query: only the path counts.
                let path = uri.splitn(4, '/').nth(3).unwrap_or_default();
                let path = path.split('?').next().unwrap_or_default();
                self.package_path = Some(path.split('/').map(String::from).collect());
                self.state = 1;
                self.downloading(true);
                self.result = 0;
                answer(Code::CHANGED, None)
            }
            (Code::POST, "/5/0/2") if self.state == 2 && self.reported.is_none() => {
                self.state = 3;
                answer(Code::CHANGED, None)
            }
            // agent_tiny's "execute update busy": 4.00.
            (Code::POST, "/5/0/2") => answer(Code::BAD_REQUEST, None),
            _ => answer(Code::NOT_FOUND, None),
        }
    }

    /// The request for block `num` of the package, once its URI was written.
    pub fn block_request(&self, num: u32, mid: u16, token: &[u8]) -> Option<Vec<u8>> {
        let mut b = MessageBuilder::new(MessageType::Con, Code::GET, mid, token);
        for segment in self.package_path.as_ref()? {
            b = b.option(OptionNumber::URI_PATH, segment.as_bytes());
        }
        let block = Block { num, more: false, szx: Block::szx_for(BLOCK_SIZE) };
        Some(b.uint_option(OptionNumber::BLOCK2, block.value()).build())
    }

    /// Takes the answer to block `num`: whether more follow, or what is wrong with it.
    pub fn block_answered(&mut self, num: u32, m: &Message<'_>) -> Result<bool, String> {
        if m.code != Code::CONTENT {
            return Err(format!("block {num} answered {}", m.code));
        }
        let block = m.option(OptionNumber::BLOCK2).ok_or("an answer without Block2")?;
        let block = Block::parse(block).map_err(|e| e.to_string())?;
        if (block.num, block.size()) != (num, BLOCK_SIZE) {
            return Err(format!("block {num} of {BLOCK_SIZE} answered as {block:?}"));
        }
        self.downloaded.truncate(num as usize * BLOCK_SIZE);
        self.downloaded.extend_from_slice(m.payload);
        Ok(block.more)
    }

    /// The next block to ask for: where the download stands.
    pub fn next_block(&self) -> u32 {
        (self.downloaded.len() / BLOCK_SIZE) as u32
    }

    /// A CON notification of the update state `state` under the server's observation; the
    /// state holds once [`AgentTiny::report_acked`].
    pub fn state_notification(&mut self, state: i64, mid: u16) -> Option<Vec<u8>> {
        self.reported = Some(state);
        if state != 1 {
            self.downloading(false);
        }
        let (token, number) = self.fw_observe.clone()?;
        self.fw_observe = Some((token.clone(), number + 1));
        let body = tlv_integer(3, state);
        Some(
            MessageBuilder::new(MessageType::Con, Code::CONTENT, mid, &token)
                .uint_option(OptionNumber::OBSERVE, number + 1)
                .uint_option(OptionNumber::CONTENT_FORMAT, TLV)
                .payload(&body)
                .build(),
        )
    }

    /// The server acknowledged the last state report.
    pub fn report_acked(&mut self) {
        if let Some(state) = self.reported.take() {
            self.state = state;
        }
    }

    /// The reboot an update makes: the new version, state idle and result success; the
    /// observation is kept, as agent_tiny keeps it.
    pub fn reboot(&mut self) {
        self.version = self.new_version.clone();
        self.downloading(false);
        self.state = 0;
        self.result = 1;
    }
}

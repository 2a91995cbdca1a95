//! Simulated devices for the load generators, the soak, the fuzz suite and the tests: a product of
//! Huawei devices made over the admin API and the bind as LiteOS performs it; Alibaba `/auth` and
//! `/topic` requests as the Link SDK builds them; a PCP device (`pcp`); an LwM2M client upgraded
//! over Object 5 (`agent_tiny`); a server run as a child process (`process`).

pub mod agent_tiny;
pub mod pcp;
pub mod process;
pub mod tally;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::UdpSocket;

use crate::auth::cipher::SessionKey;
use crate::auth::sign::{SignMethod, auth_content};
use crate::client::{AdminClient, ClientError};

use crate::coap::message::{Code, Message, MessageBuilder, MessageType};
use crate::coap::option::OptionNumber;

/// Binds as `node` (`POST /t/r?ep=`) with message id `mid` and accepts the server's observe
/// request; the socket (connected to the server) and the observe token. The caller's next
/// messages take the ids after `mid`: an id is not reused within EXCHANGE_LIFETIME (RFC 7252
/// §4.4), and a server ignores a different message under one it has seen.
pub async fn huawei_bind(node: &str, server: SocketAddr, mid: u16) -> Result<(UdpSocket, Vec<u8>), &'static str> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.map_err(|_| "no socket")?;
    socket.connect(server).await.map_err(|_| "no socket")?;
    let mut acked = false;
    let mut buf = [0u8; 2048];
    let request = MessageBuilder::new(MessageType::Con, Code::POST, mid, &[1])
        .option(OptionNumber::URI_PATH, b"t")
        .option(OptionNumber::URI_PATH, b"r")
        .option(OptionNumber::URI_QUERY, format!("ep={node}").as_bytes())
        .build();
    for _ in 0..5 {
        socket.send(&request).await.map_err(|_| "cannot send")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            let Ok(m) = Message::parse(&buf[..n]) else { continue };
            acked |= m.mtype == MessageType::Ack;
            if m.mtype == MessageType::Con && m.code == Code::GET {
                let ack = MessageBuilder::new(MessageType::Ack, Code::CONTENT, m.mid, m.token).build();
                socket.send(&ack).await.map_err(|_| "cannot send")?;
                return Ok((socket, m.token.to_vec()));
            }
        }
    }
    Err(if acked { "bound, no observe request" } else { "bind unanswered" })
}

/// Creates a product (`product` is its body) and `count` devices with node ids unique to this run
/// (node ids are unique per instance), imported in files of the largest size the server takes;
/// the product key and each device's (node id, name).
pub fn huawei_fleet(
    admin: &AdminClient,
    product: &Value,
    count: usize,
) -> Result<(String, Vec<(String, String)>), ClientError> {
    let created = admin.post("/api/v1/products", product)?;
    let pk = created["product_key"].as_str().unwrap_or_default().to_string();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let nodes: Vec<String> = (0..count).map(|i| format!("n{stamp}-{i}")).collect();
    Ok((pk.clone(), import_nodes(admin, &pk, &nodes)?))
}

/// Imports a device for each of `nodes` into product `pk`, in files of at most 100,000 rows;
/// each device's (node id, name).
pub fn import_nodes(admin: &AdminClient, pk: &str, nodes: &[String]) -> Result<Vec<(String, String)>, ClientError> {
    let mut named = Vec::with_capacity(nodes.len());
    for batch in nodes.chunks(100_000) {
        let mut file = String::with_capacity(batch.len() * 24);
        for node in batch {
            file.push_str(&json!({ "node_id": node }).to_string());
            file.push('\n');
        }
        let created = admin.post_bytes(&format!("/api/v1/products/{pk}/imports"), file.as_bytes())?;
        let devices = created["devices"].as_array().map(Vec::as_slice).unwrap_or_default();
        named.extend(devices.iter().map(|d| {
            let text = |k: &str| d[k].as_str().unwrap_or_default().to_string();
            (text("node_id"), text("device_name"))
        }));
    }
    Ok(named)
}

/// A signed `/auth` request (hmacsha256, JSON) for the device `pk`/`dn`.
pub fn alibaba_auth(pk: &str, dn: &str, secret: &str, mid: u16) -> Vec<u8> {
    let mut body = json!({"productKey": pk, "deviceName": dn, "clientId": format!("{pk}&{dn}"),
        "signmethod": "hmacsha256", "seq": "1"});
    let fields: Vec<(String, String)> = body
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let content = auth_content(fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    body["sign"] = json!(SignMethod::HmacSha256.sign_hex(secret.as_bytes(), content.as_bytes()));
    MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes())
        .option(OptionNumber::URI_PATH, b"auth")
        .uint_option(OptionNumber::CONTENT_FORMAT, 50)
        .uint_option(OptionNumber::ACCEPT, 50)
        .payload(body.to_string().as_bytes())
        .build()
}

/// A session `/auth` opened: its token, and on 5682 its key and first seq.
pub struct AlibabaSession {
    pub token: String,
    pub key: Option<SessionKey>,
    pub seq: u64,
}

impl AlibabaSession {
    /// The session an `/auth` answer payload carries (`None` if it carries none).
    pub fn from_answer(payload: &[u8], secret: &str) -> Option<AlibabaSession> {
        let v: Value = serde_json::from_slice(payload).ok()?;
        let token = v["token"].as_str()?.to_string();
        let key = v["random"].as_str().map(|r| SessionKey::derive(secret, r));
        Some(AlibabaSession { token, key, seq: v["seqOffset"].as_u64().unwrap_or(0) })
    }

    /// A CON uplink to `/topic/{pk}/{dn}/update`; on 5682 with the next seq and the payload
    /// encrypted.
    pub fn uplink(&mut self, pk: &str, dn: &str, mid: u16, payload: &[u8]) -> Vec<u8> {
        self.uplink_on(&format!("/{pk}/{dn}/update"), mid, payload)
    }

    /// A CON uplink to `/topic{topic}` (`topic` starts with `/`), as [`AlibabaSession::uplink`].
    pub fn uplink_on(&mut self, topic: &str, mid: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes())
            .option(OptionNumber::URI_PATH, b"topic");
        for segment in topic.split('/').filter(|s| !s.is_empty()) {
            b = b.option(OptionNumber::URI_PATH, segment.as_bytes());
        }
        let mut b = b.uint_option(OptionNumber::ACCEPT, 42).option(OptionNumber::ALI_TOKEN, self.token.as_bytes());
        match &self.key {
            Some(key) => {
                self.seq += 1;
                b = b.option(OptionNumber::ALI_SEQ, &key.encrypt_seq(self.seq));
                b.payload(&key.encrypt(payload)).build()
            }
            None => b.payload(payload).build(),
        }
    }
}

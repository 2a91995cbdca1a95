//! Simulated devices for the load generators: a product of Huawei devices made over the admin
//! API, and the bind as LiteOS performs it.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::UdpSocket;

use crate::client::{AdminClient, ClientError};

use crate::coap::message::{Code, Message, MessageBuilder, MessageType};
use crate::coap::option::OptionNumber;

/// Binds as `node` (`POST /t/r?ep=`) and accepts the server's observe request; the socket
/// (connected to the server) and the observe token.
pub async fn huawei_bind(node: &str, server: SocketAddr) -> Result<(UdpSocket, Vec<u8>), &'static str> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.map_err(|_| "no socket")?;
    socket.connect(server).await.map_err(|_| "no socket")?;
    let mut acked = false;
    let mut buf = [0u8; 2048];
    // A fresh message id, as a device picks at boot: a port reused from an earlier run must not
    // look like a retransmission.
    let request = MessageBuilder::new(MessageType::Con, Code::POST, rand::random(), &[1])
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
/// (node ids are unique per instance); the product key and each device's (node id, name).
pub fn huawei_fleet(
    admin: &AdminClient,
    product: &Value,
    count: usize,
) -> Result<(String, Vec<(String, String)>), ClientError> {
    let created = admin.post("/api/v1/products", product)?;
    let pk = created["product_key"].as_str().unwrap_or_default().to_string();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let nodes = (0..count)
        .map(|i| {
            let node = format!("n{stamp}-{i}");
            let d = admin.post(&format!("/api/v1/products/{pk}/devices"), &json!({ "node_id": node }))?;
            Ok((node, d["device_name"].as_str().unwrap_or_default().to_string()))
        })
        .collect::<Result<_, ClientError>>()?;
    Ok((pk, nodes))
}

//! Wake-up benchmark for commands: binds many simulated Huawei devices, lets them fall asleep,
//! queues commands for every one, then wakes them within `--spread-ms` (each sends one report,
//! at evenly spaced moments; 0 wakes them all at once) and measures, per device, the time from
//! its report leaving to its first command arriving. Reports p50/p99 and how many devices got
//! their command. With `--product-key` the devices are the first of an existing product's
//! devices that have node ids (those `nbhub-million` imported), else a new product is made.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use nbhub::client::{AdminArgs, AdminClient};
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::simulate::{huawei_bind, huawei_fleet};
use serde_json::json;
use tokio::sync::Barrier;

#[derive(Parser, Clone)]
#[command(name = "nbhub-wake", about = "Sleeping Huawei devices with queued commands waking at once")]
struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    /// The server's plain CoAP port.
    #[arg(long, default_value = "127.0.0.1:5683")]
    coap: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Commands queued per device before it wakes.
    #[arg(long, default_value_t = 2)]
    commands: usize,
    /// The reports are spread evenly over this long.
    #[arg(long, default_value_t = 1000)]
    spread_ms: u64,
    /// Use this product's devices (its awake window should be short) instead of making a product.
    #[arg(long)]
    product_key: Option<String>,
    /// A device not served within this long counts as missed.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
}

/// The product's awake window: devices are asleep once this has passed since their bind.
const AWAKE_WINDOW_S: u64 = 1;

fn main() {
    let args = Args::parse();
    let admin = args.admin.connect().unwrap_or_else(|e| fail(e));
    let (pk, nodes) = match &args.product_key {
        Some(pk) => (pk.clone(), existing(&admin, pk, args.devices).unwrap_or_else(|e| fail(e))),
        None => huawei_fleet(&admin, &json!({"name": "nbhub-wake", "awake_window_s": AWAKE_WINDOW_S}), args.devices)
            .unwrap_or_else(|e| fail(e)),
    };
    eprintln!("{} devices of product {pk}", nodes.len());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let bound = Arc::new(Barrier::new(nodes.len() + 1));
    let wake = Arc::new(Barrier::new(nodes.len() + 1));
    let tasks: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, (node, _))| {
            let offset = Duration::from_millis(args.spread_ms * i as u64 / nodes.len() as u64);
            runtime.spawn(device(node.clone(), args.clone(), offset, bound.clone(), wake.clone()))
        })
        .collect();
    runtime.block_on(bound.wait());
    // Asleep before anything is queued, else the commands would be sent at once.
    std::thread::sleep(Duration::from_millis(AWAKE_WINDOW_S * 1000 + 200));
    eprintln!("all bound and asleep; queueing {} commands per device", args.commands);
    let queued = Instant::now();
    let payload = base64::engine::general_purpose::STANDARD.encode(b"open valve 1");
    for (_, dn) in &nodes {
        for _ in 0..args.commands {
            admin
                .post(&format!("/api/v1/products/{pk}/devices/{dn}/commands"), &json!({"payload_base64": payload}))
                .unwrap_or_else(|e| fail(e));
        }
    }
    eprintln!("queued in {:.1?}; waking every device at once", queued.elapsed());
    let started = Instant::now();
    runtime.block_on(wake.wait());
    let mut latencies: Vec<u32> = Vec::new();
    let mut missed: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in tasks {
        match runtime.block_on(t) {
            Ok(Ok(us)) => latencies.push(us),
            Ok(Err(why)) => *missed.entry(why).or_default() += 1,
            Err(_) => *missed.entry("task failed").or_default() += 1,
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        latencies.get(((latencies.len().max(1) - 1) as f64 * p).round() as usize).map_or(0.0, |v| *v as f64 / 1000.0)
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "devices": args.devices,
            "commands_per_device": args.commands,
            "reports_spread_ms": args.spread_ms,
            "served": latencies.len(),
            "missed": missed,
            "seconds_until_all_served": elapsed.as_secs_f64(),
            "report_to_first_command_ms": {
                "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99),
                "max": latencies.last().map_or(0.0, |v| *v as f64 / 1000.0),
            },
        }))
        .unwrap()
    );
}

/// One device: binds, sleeps until told to wake, reports once and times its first command
/// (which it acknowledges as the released LiteOS agents do, with an empty 2.04).
async fn device(
    node: String,
    args: Args,
    offset: Duration,
    bound: Arc<Barrier>,
    wake: Arc<Barrier>,
) -> Result<u32, &'static str> {
    // Every device passes both barriers, bound or not, so one failure cannot stall the rest.
    // A fresh message id, as a device picks at boot: a port reused from an earlier run must not
    // look like a retransmission.
    let mid: u16 = rand::random();
    let bind = huawei_bind(&node, args.coap, mid).await;
    bound.wait().await;
    wake.wait().await;
    tokio::time::sleep(offset).await;
    let (socket, token) = bind?;
    let mut buf = [0u8; 2048];
    let report = MessageBuilder::new(MessageType::Non, Code::CONTENT, mid.wrapping_add(1), &token)
        .option(OptionNumber::OBSERVE, &[1])
        .payload(b"meter 42")
        .build();
    let sent = Instant::now();
    socket.send(&report).await.map_err(|_| "cannot send")?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(args.timeout_ms);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
        let Ok(m) = Message::parse(&buf[..n]) else { continue };
        if m.mtype == MessageType::Con && m.code == Code::POST {
            let latency = sent.elapsed().as_micros() as u32;
            let ack = MessageBuilder::new(MessageType::Ack, Code::CHANGED, m.mid, m.token).build();
            socket.send(&ack).await.map_err(|_| "cannot send")?;
            return Ok(latency);
        }
    }
    Err("no command")
}

/// The first `n` devices of `pk` that have node ids: (node id, name).
fn existing(admin: &AdminClient, pk: &str, n: usize) -> Result<Vec<(String, String)>, nbhub::client::ClientError> {
    let mut found = Vec::with_capacity(n);
    let mut after = String::new();
    while found.len() < n {
        let page = admin.get(&format!("/api/v1/products/{pk}/devices?limit=1000&after={after}"))?;
        for d in page["devices"].as_array().into_iter().flatten() {
            if let (Some(node), Some(name)) = (d["node_id"].as_str(), d["device_name"].as_str()) {
                found.push((node.to_string(), name.to_string()));
            }
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => break,
        }
    }
    found.truncate(n);
    Ok(found)
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-wake: {e}");
    std::process::exit(1);
}

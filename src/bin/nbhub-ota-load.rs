//! Upgrade campaign benchmark: binds many simulated PCP devices (Huawei dialect, each on its own
//! UDP socket) spread over cells at mixed coverage levels, runs one upgrade task over all of them
//! and reports chunks served per second and, per cell, the most download budget in use at once
//! (as the devices saw it: from accepting the notification to reporting the download) against
//! the cell's budget. With `--protocol lwm2m` the devices are LwM2M clients upgraded over Object
//! 5 as agent_tiny is (`nbhub::simulate::agent_tiny`: radio and version read, the package URI
//! written, 512-byte Block2 downloads, execute, reboot, result), counted from the URI write to
//! the download's end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::client::AdminArgs;
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::ota::coverage::{CELL_UNITS, Coverage};
use nbhub::simulate::agent_tiny::{self, AgentTiny};
use nbhub::simulate::pcp::{Behaviour, Concurrency, PcpDevice};
use nbhub::simulate::{huawei_bind, huawei_fleet};
use serde_json::json;
use tokio::sync::Barrier;

#[derive(Parser, Clone)]
#[command(name = "nbhub-ota-load", about = "An upgrade campaign over simulated PCP devices in many cells")]
struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    /// The server's plain CoAP port.
    #[arg(long, default_value = "127.0.0.1:5683")]
    coap: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    #[arg(long, default_value_t = 200)]
    cells: usize,
    /// Package size in bytes (chunks of 500).
    #[arg(long, default_value_t = 20_000)]
    package_bytes: usize,
    /// How long a device waits for an answer before asking again (the LiteOS agent: 2-4 s).
    #[arg(long, default_value_t = 3_000)]
    resend_ms: u64,
    /// The campaign's time limit.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// How the devices are upgraded: `pcp` (Huawei binds) or `lwm2m` (Object 5).
    #[arg(long, default_value = "pcp", value_parser = ["pcp", "lwm2m"])]
    protocol: String,
}

const CHUNK_SIZE: usize = 500;

/// Every 20th device hears its cell at level 2, three in 20 at level 1, the rest at level 0.
fn level_of(i: usize) -> u8 {
    match i % 20 {
        19 => 2,
        16..=18 => 1,
        _ => 0,
    }
}

fn main() {
    let args = Args::parse();
    let admin = args.admin.connect().unwrap_or_else(|e| fail(e));
    let product = json!({"name": "nbhub-ota-load", "awake_window_s": 3600, "ota_protocol": args.protocol});
    let (pk, nodes) = huawei_fleet(&admin, &product, args.devices).unwrap_or_else(|e| fail(e));
    let package: Arc<Vec<u8>> = Arc::new((0..args.package_bytes).map(|i| (i * 7 + i / 500) as u8).collect());
    let uploaded = admin
        .post_bytes(&format!("/api/v1/packages?product_key={pk}&version=V2&type=firmware&source_versions=V1"), &package)
        .unwrap_or_else(|e| fail(e));
    let package_id = uploaded["package_id"].as_str().unwrap_or_default().to_string();
    eprintln!("created {} devices in product {pk} and package {package_id}", nodes.len());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let cells: Arc<Vec<Arc<Concurrency>>> = Arc::new((0..args.cells).map(|_| Arc::default()).collect());
    let chunks = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Barrier::new(nodes.len() + 1));
    let tasks: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, (node, _))| {
            let sim =
                Sim { args: args.clone(), package: package.clone(), cells: cells.clone(), chunks: chunks.clone() };
            match args.protocol.as_str() {
                "lwm2m" => runtime.spawn(sim.lwm2m_device(node.clone(), i, ready.clone())),
                _ => runtime.spawn(sim.device(node.clone(), i, ready.clone())),
            }
        })
        .collect();
    runtime.block_on(ready.wait());
    // Radio reports are stored before the task starts asking for them.
    std::thread::sleep(Duration::from_secs(2));
    let devices: Vec<_> = nodes.iter().map(|(_, dn)| json!({"product_key": pk, "device_name": dn})).collect();
    let started = Instant::now();
    let task = admin
        .post("/api/v1/ota/tasks", &json!({"package_id": package_id, "devices": devices}))
        .unwrap_or_else(|e| fail(e));
    let task_id = task["task_id"].as_str().unwrap_or_default().to_string();
    eprintln!("task {task_id} started");
    let mut outcomes: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in tasks {
        let outcome = runtime.block_on(t).unwrap_or(Err("task failed"));
        *outcomes.entry(outcome.unwrap_or_else(|e| e)).or_default() += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let view = admin.get(&format!("/api/v1/ota/tasks/{task_id}")).unwrap_or_else(|e| fail(e));
    let peaks: Vec<u32> = cells.iter().map(|c| c.peak() as u32).collect();
    let served = chunks.load(Ordering::SeqCst);
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "devices": args.devices,
            "cells": args.cells,
            "package_bytes": args.package_bytes,
            "protocol": args.protocol,
            "chunks_per_device": match args.protocol.as_str() {
                "lwm2m" => args.package_bytes.div_ceil(agent_tiny::BLOCK_SIZE),
                _ => args.package_bytes.div_ceil(CHUNK_SIZE),
            },
            "device_outcomes": outcomes,
            "task_counts": view["counts"],
            "seconds": elapsed,
            "chunks_received": served,
            "chunks_per_second": served as f64 / elapsed,
            "cell_budget_units": CELL_UNITS,
            "peak_units_per_cell": {
                "max": peaks.iter().max(),
                "min": peaks.iter().min(),
                "cells_at_full_budget": peaks.iter().filter(|p| **p == CELL_UNITS).count(),
                "cells_over_budget": peaks.iter().filter(|p| **p > CELL_UNITS).count(),
            },
        }))
        .unwrap()
    );
}

#[derive(Clone)]
struct Sim {
    args: Args,
    package: Arc<Vec<u8>>,
    cells: Arc<Vec<Arc<Concurrency>>>,
    chunks: Arc<AtomicU64>,
}

impl Sim {
    /// One device: binds, reports its radio, then follows the platform through the upgrade as
    /// the LiteOS agent does (`nbhub::simulate::pcp`, which the tests and the soak run too);
    /// what it ended with.
    async fn device(self, node: String, i: usize, ready: Arc<Barrier>) -> Result<&'static str, &'static str> {
        let cell = i % self.args.cells;
        let level = level_of(i);
        // A fresh message id, as a device picks at boot; each message after takes the next.
        let mut mid: u16 = rand::random();
        let bound = huawei_bind(&node, self.args.coap, mid).await;
        let mut next_mid = move || {
            mid = mid.wrapping_add(1);
            mid
        };
        if let Ok((socket, token)) = &bound {
            let (rsrp, sinr) = [(-90, 10), (-110, 0), (-120, -5)][level as usize];
            let radio = json!({"rsrp": rsrp, "sinr": sinr, "cell_id": format!("cell-{cell}")}).to_string();
            // A CON until acknowledged, backing off as CoAP does: 10,000 reports at once overload
            // the server, which sheds what it cannot store in time, and a report lost for good
            // would leave the device without a radio state until its radio timeout.
            let mid = next_mid();
            let report = MessageBuilder::new(MessageType::Con, Code::CONTENT, mid, token)
                .option(OptionNumber::OBSERVE, &[1])
                .payload(radio.as_bytes())
                .build();
            let mut buf = [0u8; 256];
            let mut radio_acked = false;
            for attempt in 0..8 {
                let _ = socket.send(&report).await;
                let acked = tokio::time::timeout(Duration::from_secs(2 << attempt.min(3)), async {
                    while let Ok(n) = socket.recv(&mut buf).await {
                        if Message::parse(&buf[..n]).is_ok_and(|m| m.mtype == MessageType::Ack && m.mid == mid) {
                            return true;
                        }
                    }
                    false
                });
                if acked.await.unwrap_or(false) {
                    radio_acked = true;
                    break;
                }
            }
            if !radio_acked {
                ready.wait().await;
                return Err("radio report never acknowledged");
            }
        }
        ready.wait().await;
        let (socket, token) = bound?;
        let behaviour = Behaviour {
            resend: Duration::from_millis(self.args.resend_ms),
            reboot: Duration::from_millis(500),
            ..Behaviour::healthy("V1")
        };
        let units = Coverage::Level(level).units() as usize;
        let mut sim = PcpDevice::new(behaviour, self.package.clone()).counting(self.cells[cell].clone(), units);
        let mut observe = 1u8;
        let mut buf = [0u8; 2048];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.args.timeout_s);
        loop {
            for report in sim.due(Instant::now()) {
                observe = observe.wrapping_add(1);
                let _ = socket.send(&notification(&token, observe, next_mid(), &report.encode())).await;
            }
            if sim.log.bad_chunks > 0 {
                return Err("a chunk's bytes differ from the package");
            }
            if sim.log.upgrade_answered {
                self.chunks.fetch_add(sim.log.requested.len() as u64, Ordering::Relaxed);
                return Ok("upgraded");
            }
            let wake = sim.next_due().map_or(deadline, |t| tokio::time::Instant::from_std(t).min(deadline));
            let Some(n) = receive(&socket, &mut buf, wake, deadline).await? else { continue };
            let Ok(m) = Message::parse(&buf[..n]) else { continue };
            if m.mtype != MessageType::Con || m.code != Code::POST {
                continue;
            }
            let Some(answers) = sim.receive(m.payload, Instant::now()) else { continue };
            let in_ack = answers.in_ack.map(|a| a.encode()).unwrap_or_default();
            let ack = MessageBuilder::new(MessageType::Ack, Code::CHANGED, m.mid, m.token).payload(&in_ack).build();
            let _ = socket.send(&ack).await;
            for answer in answers.after {
                observe = observe.wrapping_add(1);
                let _ = socket.send(&notification(&token, observe, next_mid(), &answer.encode())).await;
            }
        }
    }
}

impl Sim {
    /// One LwM2M client: registers (its radio answered from Object 4 when read), then follows
    /// the server through the upgrade as agent_tiny does, one request of its own in flight at a
    /// time, retransmitted while unanswered; what it ended with.
    async fn lwm2m_device(self, node: String, i: usize, ready: Arc<Barrier>) -> Result<&'static str, &'static str> {
        let cell = i % self.args.cells;
        let level = level_of(i);
        let (rsrp, sinr) = [(-90, 10), (-110, 0), (-120, -5)][level as usize];
        let units = Coverage::Level(level).units() as usize;
        let mut client = AgentTiny::new(&node, "V1", "V2").counting(self.cells[cell].clone(), units);
        client.radio = agent_tiny::Radio { rsrp, sinr, cell_id: cell as i64 };
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.map_err(|_| "no socket");
        let socket = match socket {
            Ok(s) if s.connect(self.args.coap).await.is_ok() => Ok(s),
            _ => Err("no socket"),
        };
        let mut mid: u16 = rand::random();
        let next = |mid: &mut u16| {
            *mid = mid.wrapping_add(1);
            *mid
        };
        // The request of its own in flight: its id, bytes, when it was last sent, what it is.
        let mut pending: Option<(u16, Vec<u8>, Instant, Own)> = None;
        if let Ok(s) = &socket {
            let m = next(&mut mid);
            pending = Some((m, client.register(m, &[0xa0]), Instant::now(), Own::Register));
            let _ = s.send(&pending.as_ref().unwrap().1).await;
        }
        let resend = Duration::from_millis(self.args.resend_ms);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.args.timeout_s);
        let mut buf = [0u8; 2048];
        let mut registered = false;
        let mut readied = Some(ready);
        let mut rebooted_at = None;
        loop {
            // Ready once registered and observed (or once it cannot be).
            if (registered || socket.is_err())
                && let Some(r) = readied.take()
            {
                r.wait().await;
            }
            let socket = socket.as_ref().map_err(|e| *e)?;
            if let Some((m, data, sent, _)) = &mut pending
                && sent.elapsed() >= resend
            {
                *sent = Instant::now();
                let _ = socket.send(data).await;
                let _ = m;
            }
            if rebooted_at
                .is_some_and(|at| client.served.len() > at && client.served.last().is_some_and(|s| s == "GET /3/0/3"))
            {
                self.chunks
                    .fetch_add(client.downloaded.len().div_ceil(agent_tiny::BLOCK_SIZE) as u64, Ordering::Relaxed);
                return Ok("upgraded");
            }
            // What to do next of its own, when nothing is in flight.
            if pending.is_none() {
                let own = match client.state {
                    1 if client.downloaded.len() < self.package.len() => {
                        let m = next(&mut mid);
                        client.block_request(client.next_block(), m, &[0xb0]).map(|d| (m, d, Own::Block))
                    }
                    1 => {
                        if client.downloaded[..] != self.package[..] {
                            return Err("the package's bytes differ");
                        }
                        let m = next(&mut mid);
                        client.state_notification(2, m).map(|d| (m, d, Own::Report))
                    }
                    3 => {
                        client.reboot();
                        rebooted_at = Some(client.served.len());
                        let m = next(&mut mid);
                        Some((m, client.register(m, &[0xa1]), Own::Reregister))
                    }
                    _ => None,
                };
                if let Some((m, data, kind)) = own {
                    let _ = socket.send(&data).await;
                    pending = Some((m, data, Instant::now(), kind));
                }
            }
            let wake = pending
                .as_ref()
                .map_or(deadline, |(_, _, sent, _)| tokio::time::Instant::from_std(*sent + resend).min(deadline));
            let Some(n) = receive(socket, &mut buf, wake, deadline).await? else { continue };
            let Ok(m) = Message::parse(&buf[..n]) else { continue };
            match m.mtype {
                MessageType::Con => {
                    let answer = client.serve(&m);
                    let _ = socket.send(&answer).await;
                    registered |= m.code == Code::GET && client.served.last().is_some_and(|s| s == "GET /19/0/0");
                }
                MessageType::Ack if pending.as_ref().is_some_and(|p| p.0 == m.mid) => {
                    let (_, _, _, kind) = pending.take().expect("checked");
                    match kind {
                        Own::Block => {
                            let num = client.next_block();
                            if client.block_answered(num, &m).is_err() {
                                return Err("a block was refused");
                            }
                        }
                        Own::Reregister => {
                            let m = next(&mut mid);
                            if let Some(d) = client.state_notification(0, m) {
                                let _ = socket.send(&d).await;
                                pending = Some((m, d, Instant::now(), Own::Report));
                            }
                        }
                        Own::Report => client.report_acked(),
                        Own::Register => {}
                    }
                }
                _ => {}
            }
        }
    }
}

/// A datagram's length, or none if `wake` came first; an error past `deadline`.
async fn receive(
    socket: &tokio::net::UdpSocket,
    buf: &mut [u8],
    wake: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> Result<Option<usize>, &'static str> {
    match tokio::time::timeout_at(wake, socket.recv(buf)).await {
        Ok(Ok(n)) => Ok(Some(n)),
        Ok(Err(_)) => Err("socket error"),
        Err(_) if tokio::time::Instant::now() >= deadline => Err("unfinished at the time limit"),
        Err(_) => Ok(None),
    }
}

/// What an LwM2M client's own request in flight is.
#[derive(Clone, Copy)]
enum Own {
    Register,
    Block,
    Report,
    Reregister,
}

/// A NON 2.05 notification with the observe token, as LiteOS reports.
fn notification(token: &[u8], observe: u8, mid: u16, payload: &[u8]) -> Vec<u8> {
    MessageBuilder::new(MessageType::Non, Code::CONTENT, mid, token)
        .option(OptionNumber::OBSERVE, &[observe])
        .payload(payload)
        .build()
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-ota-load: {e}");
    std::process::exit(1);
}

//! Upgrade campaign benchmark: binds many simulated PCP devices (Huawei dialect, each on its own
//! UDP socket) spread over cells at mixed coverage levels, runs one upgrade task over all of them
//! and reports chunks served per second and, per cell, the most download budget in use at once
//! (as the devices saw it: from accepting the notification to reporting the download) against
//! the cell's budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::client::AdminArgs;
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::ota::coverage::{CELL_UNITS, Coverage};
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
    let (pk, nodes) = huawei_fleet(&admin, &json!({"name": "nbhub-ota-load", "awake_window_s": 3600}), args.devices)
        .unwrap_or_else(|e| fail(e));
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
            runtime.spawn(sim.device(node.clone(), i, ready.clone()))
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
            "chunks_per_device": args.package_bytes.div_ceil(CHUNK_SIZE),
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
        let bound = huawei_bind(&node, self.args.coap).await;
        if let Ok((socket, token)) = &bound {
            let (rsrp, sinr) = [(-90, 10), (-110, 0), (-120, -5)][level as usize];
            let radio = json!({"rsrp": rsrp, "sinr": sinr, "cell_id": format!("cell-{cell}")}).to_string();
            let _ = socket.send(&notification(token, 1, radio.as_bytes())).await;
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
                let _ = socket.send(&notification(&token, observe, &report.encode())).await;
            }
            if sim.log.bad_chunks > 0 {
                return Err("a chunk's bytes differ from the package");
            }
            if sim.log.upgrade_answered {
                self.chunks.fetch_add(sim.log.requested.len() as u64, Ordering::Relaxed);
                return Ok("upgraded");
            }
            let wake = sim.next_due().map_or(deadline, |t| tokio::time::Instant::from_std(t).min(deadline));
            let n = match tokio::time::timeout_at(wake, socket.recv(&mut buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return Err("socket error"),
                Err(_) if tokio::time::Instant::now() >= deadline => return Err("unfinished at the time limit"),
                Err(_) => continue,
            };
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
                let _ = socket.send(&notification(&token, observe, &answer.encode())).await;
            }
        }
    }
}

/// A NON 2.05 notification with the observe token, as LiteOS reports.
fn notification(token: &[u8], observe: u8, payload: &[u8]) -> Vec<u8> {
    MessageBuilder::new(MessageType::Non, Code::CONTENT, rand::random(), token)
        .option(OptionNumber::OBSERVE, &[observe])
        .payload(payload)
        .build()
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-ota-load: {e}");
    std::process::exit(1);
}

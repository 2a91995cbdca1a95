//! Distribution benchmark: creates a product with N devices (each with commands waiting) on a
//! source instance, moves them all to a peer with one distribution task, and reports how long the
//! move took; then checks at the destination that every device arrived with its commands.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::client::{AdminArgs, AdminClient};
use serde_json::json;

#[derive(Parser)]
#[command(name = "nbhub-distribution-load", about = "Moves many devices with their commands to a peer instance")]
struct Args {
    /// The source instance's admin API.
    #[command(flatten)]
    admin: AdminArgs,
    /// The destination's name in the source's cluster.peers.
    #[arg(long)]
    to: String,
    /// The destination's admin API and token (to check what arrived).
    #[arg(long)]
    dest_admin_url: String,
    #[arg(long)]
    dest_token: String,
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Commands waiting for each device.
    #[arg(long, default_value_t = 1)]
    commands: usize,
    /// Admin requests in flight while setting up and checking.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
}

/// Runs `f(i)` for `0..n` on `parallel` threads; the first error stops the run.
fn each(n: usize, parallel: usize, f: impl Fn(usize) -> Result<(), String> + Sync) -> Result<(), String> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        f(i)?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("worker panicked"))
    })
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let source = args.admin.connect()?;
    let dest = AdminClient::new(&args.dest_admin_url, &args.dest_token);
    let name = |i: usize| format!("dist-{i:06}");
    let e = |e: nbhub::client::ClientError| e.to_string();

    let started = Instant::now();
    let product = source.post("/api/v1/products", &json!({"name": "distribution-load"})).map_err(e)?;
    let pk = product["product_key"].as_str().unwrap_or_default().to_string();
    each(args.devices, args.parallel, |i| {
        let path = format!("/api/v1/products/{pk}/devices");
        source.post(&path, &json!({"device_name": name(i)})).map_err(e)?;
        for c in 0..args.commands {
            let body =
                json!({"payload_base64": "AQID", "expire_time": 86_400, "topic": format!("/{pk}/{}/c{c}", name(i))});
            source.post(&format!("{path}/{}/commands", name(i)), &body).map_err(e)?;
        }
        Ok(())
    })?;
    println!(
        "set up {} devices with {} commands each in {:.1} s",
        args.devices,
        args.commands,
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let task = source
        .post("/api/v1/distribution/tasks", &json!({"product_key": pk, "policy": "specified", "instance": args.to}))
        .map_err(e)?;
    let id = task["task_id"].as_str().unwrap_or_default().to_string();
    let deadline = started + Duration::from_secs(args.timeout_s);
    let done = loop {
        let t = source.get(&format!("/api/v1/distribution/tasks/{id}")).map_err(e)?;
        if t["status"] == "completed" || t["status"] == "failed" {
            break t;
        }
        if Instant::now() > deadline {
            return Err(format!("task {id} did not finish in {} s: {t}", args.timeout_s));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "task {id} {} in {secs:.2} s: {} devices/s, devices {}",
        done["status"].as_str().unwrap_or_default(),
        (args.devices as f64 / secs).round(),
        done["devices"]
    );

    let started = Instant::now();
    let missing = AtomicUsize::new(0);
    each(args.devices, args.parallel, |i| {
        let path = format!("/api/v1/products/{pk}/devices/{}/commands", name(i));
        let pending = match dest.get(&path) {
            Ok(v) => v["commands"].as_array().map_or(0, |c| c.iter().filter(|c| c["status"] == "PENDING").count()),
            Err(_) => 0,
        };
        if pending != args.commands {
            missing.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    })?;
    let missing = missing.into_inner();
    println!(
        "checked at the destination in {:.1} s: {} of {} devices arrived with all {} commands",
        started.elapsed().as_secs_f64(),
        args.devices - missing,
        args.devices,
        args.commands
    );
    if missing > 0 { Err(format!("{missing} devices missing or incomplete at the destination")) } else { Ok(()) }
}

//! A million devices on one server: starts nbhub on a fresh data directory, imports `--devices`
//! Huawei devices (files of 100,000), kills it with SIGKILL and starts it again, then wakes
//! `--wake` of them with queued commands (`nbhub-wake`) and runs `nbhub-load` beside them.
//! Reports the import time, the start-up time with every device stored, the resident memory
//! (empty, idle with every device, and the most seen under load), what each idle device costs,
//! how long listing and searching the product takes, and the figures of both tools.
//!
//! Loopback only; bounded by its arguments. Run from the repository after building:
//! `cargo build --release --bins && target/release/nbhub-million`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::simulate::import_nodes;
use nbhub::simulate::process::{ADMIN_TOKEN, ServerProcess, resident_bytes};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "nbhub-million", about = "Imports a million devices, restarts, and measures memory and wake-ups")]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    devices: usize,
    /// How many of them wake with queued commands (`nbhub-wake`).
    #[arg(long, default_value_t = 10_000)]
    wake: usize,
    /// Seconds of `nbhub-load` traffic (after as long again against its echo ceiling).
    #[arg(long, default_value_t = 10)]
    load_seconds: u64,
    /// `nbhub-load`'s own devices.
    #[arg(long, default_value_t = 2000)]
    load_devices: usize,
    /// Settings for the server (`NBHUB_STORE_MEMORY_MB=128`), repeatable.
    #[arg(long = "server-env", value_parser = setting)]
    server_env: Vec<(String, String)>,
    /// Where the server's data goes (a fresh temporary directory when unset; it is removed).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

const START_WITHIN: Duration = Duration::from_secs(600);

fn main() {
    let args = Args::parse();
    let temp = std::env::temp_dir().join(format!("nbhub-million-{}", std::process::id()));
    let dir = args.dir.clone().unwrap_or_else(|| temp.clone());
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(e));
    let mut env = vec![("NBHUB_DEVICE_MAX_PER_SECOND", "100000"), ("NBHUB_DEVICE_MAX_PER_MINUTE", "10000000")];
    env.extend(args.server_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut server = ServerProcess::start(&dir, &env, START_WITHIN).unwrap_or_else(|e| fail(e));
    std::thread::sleep(Duration::from_secs(1));
    let rss_empty = rss(&server);

    let admin = server.admin();
    let product =
        admin.post("/api/v1/products", &json!({"name": "million", "awake_window_s": 1})).unwrap_or_else(|e| fail(e));
    let pk = product["product_key"].as_str().unwrap_or_default().to_string();
    let nodes: Vec<String> = (0..args.devices).map(|i| format!("m{i:08}")).collect();
    let started = Instant::now();
    let imported = import_nodes(&admin, &pk, &nodes).unwrap_or_else(|e| fail(e));
    let import_s = started.elapsed().as_secs_f64();
    eprintln!("imported {} devices in {import_s:.1} s", imported.len());
    let rss_after_import = rss(&server);

    server.kill9();
    let startup = server.spawn(START_WITHIN).unwrap_or_else(|e| fail(e));
    eprintln!("served again {:.2} s after start", startup.as_secs_f64());
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = rss(&server);

    let listing = listing(&server, &pk);
    let wake = run(
        &server,
        "nbhub-wake",
        &["--coap", &server.endpoints.coap.to_string(), "--product-key", &pk, "--devices", &args.wake.to_string()],
    );
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (peak.clone(), done.clone(), server.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(r) = pid.and_then(resident_bytes) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let load = run(
        &server,
        "nbhub-load",
        &[
            "--aes",
            &server.endpoints.aes.to_string(),
            "--devices",
            &args.load_devices.to_string(),
            "--duration",
            &args.load_seconds.to_string(),
            "--json",
        ],
    );
    done.store(true, Ordering::Relaxed);
    sampler.join().ok();
    let rss_after_load = rss(&server);
    let mib = |b: u64| (b as f64 / 1048576.0 * 10.0).round() / 10.0;
    let figures = json!({
        "devices": imported.len(),
        "import_s": import_s,
        "imported_per_s": (imported.len() as f64 / import_s).round(),
        "startup_s": startup.as_secs_f64(),
        "rss_mib": {
            "empty": mib(rss_empty),
            "after_import": mib(rss_after_import),
            "idle_after_restart": mib(rss_idle),
            "peak_under_load": mib(peak.load(Ordering::Relaxed)),
            "after_load": mib(rss_after_load),
        },
        "bytes_per_idle_device": (rss_idle.saturating_sub(rss_empty)) / imported.len().max(1) as u64,
        "listing_ms": listing,
        "wake": wake,
        "load": load,
    });
    println!("{}", serde_json::to_string_pretty(&figures).unwrap_or_default());
    drop(server);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
}

/// How long listing takes over the product of every device: the first page, a page of a filter
/// nothing matches (it reads as many devices as one request may), and every page of it.
fn listing(server: &ServerProcess, pk: &str) -> Value {
    let admin = server.admin();
    let timed = |query: &str| {
        let started = Instant::now();
        let page = admin.get(&format!("/api/v1/products/{pk}/devices?{query}")).unwrap_or_else(|e| fail(e));
        (started.elapsed().as_secs_f64() * 1000.0, page["next"].as_str().map(str::to_string))
    };
    let (first, _) = timed("limit=100");
    let (bounded, _) = timed("version=none&limit=100");
    let started = Instant::now();
    let mut pages = 0;
    let mut after = String::new();
    loop {
        pages += 1;
        match timed(&format!("version=none&limit=100&after={after}")).1 {
            Some(next) => after = next,
            None => break,
        }
    }
    json!({
        "first_page_of_100": first,
        "filtered_page_reading_100000": bounded,
        "filtered_every_page": started.elapsed().as_secs_f64() * 1000.0,
        "filtered_pages": pages,
    })
}

fn setting(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or("expected NAME=VALUE")?;
    Ok((k.to_string(), v.to_string()))
}

/// Runs one of the other load tools against `server` and reads the JSON it prints.
fn run(server: &ServerProcess, tool: &str, args: &[&str]) -> Value {
    let bin = std::env::current_exe().unwrap_or_else(|e| fail(e)).with_file_name(tool);
    let out = Command::new(bin)
        .args(args)
        .env("NBHUB_ADMIN_URL", format!("http://{}", server.endpoints.admin))
        .env("NBHUB_ADMIN_TOKEN", ADMIN_TOKEN)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| fail(format!("{tool}: {e}")));
    if !out.status.success() {
        fail(format!("{tool} failed: {}", out.status));
    }
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| fail(format!("{tool} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))))
}

fn rss(server: &ServerProcess) -> u64 {
    server.rss().unwrap_or_else(|| fail("cannot read the server's memory"))
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-million: {e}");
    std::process::exit(1);
}

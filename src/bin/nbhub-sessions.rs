//! DTLS sessions across a crash: starts nbhub on a fresh data directory, imports `--sessions`
//! PSK devices, opens a DTLS session for each (OpenSSL's client, PSK-AES128-CCM8) that sends one
//! CoAP ping, kills the server with SIGKILL and starts it again on the same port, then has the
//! first `--resend` sessions ping again with no handshake. Reports the handshake rate, the bytes
//! stored per session, the restore time the server logs, start-up with and without the sessions,
//! and how many pings were answered after the restart with how many handshakes.
//!
//! Loopback only; bounded by its arguments. Run from the repository after building:
//! `cargo build --release --bins && target/release/nbhub-sessions`.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use clap::Parser;
use nbhub::dtls::client::DtlsClient;
use nbhub::simulate::process::ServerProcess;
use nbhub::store::{CF_DTLS_SESSIONS, MemoryBudget, Store};
use serde_json::json;

#[derive(Parser)]
#[command(name = "nbhub-sessions", about = "Opens DTLS sessions, kills the server, and measures what survives")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// How many of them ping again after the restart (each keeps its socket open until then).
    #[arg(long, default_value_t = 10_000)]
    resend: usize,
}

const START_WITHIN: Duration = Duration::from_secs(600);
const PSK: &[u8] = b"0123456789abcdef";

fn main() {
    let args = Args::parse();
    let resend = args.resend.min(args.sessions);
    let dir = std::env::temp_dir().join(format!("nbhub-sessions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(e));
    let port = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).unwrap_or_else(|e| fail(e)).port();
    let listen = format!("127.0.0.1:{port}");
    let env = [("NBHUB_DTLS_LISTEN", listen.as_str()), ("NBHUB_DTLS_MAX_SESSIONS", "1000000")];
    let mut server = ServerProcess::start(&dir, &env, START_WITHIN).unwrap_or_else(|e| fail(e));
    let admin = server.admin();
    let product = admin.post("/api/v1/products", &json!({"name": "sessions"})).unwrap_or_else(|e| fail(e));
    let pk = product["product_key"].as_str().unwrap_or_default().to_string();
    let nodes: Vec<String> = (0..args.sessions).map(|i| format!("s{i:08}")).collect();
    for batch in nodes.chunks(100_000) {
        let file: String =
            batch.iter().map(|n| json!({"node_id": n, "psk_hex": hex::encode(PSK)}).to_string() + "\n").collect();
        admin.post_bytes(&format!("/api/v1/products/{pk}/imports"), file.as_bytes()).unwrap_or_else(|e| fail(e));
    }
    // A restart of the server as it is now, without sessions: the baseline start-up.
    server.kill9();
    let start_empty = server.spawn(START_WITHIN).unwrap_or_else(|e| fail(e));

    let started = Instant::now();
    let mut kept = Vec::with_capacity(resend);
    for (i, node) in nodes.iter().enumerate() {
        // A loopback source of its own per 1,000 sessions: the kernel hands a closed socket's
        // port out again, and a new handshake from a reused address replaces that session.
        let source = std::net::Ipv4Addr::new(127, 0, (1 + i / 1000 / 250) as u8, (1 + i / 1000 % 250) as u8);
        let socket = UdpSocket::bind((source, 0)).unwrap_or_else(|e| fail(e));
        socket.connect(server.endpoints.dtls).unwrap_or_else(|e| fail(e));
        let mut client = DtlsClient::psk(socket, node, PSK, "PSK-AES128-CCM8");
        client.handshake(None, Duration::from_secs(10)).unwrap_or_else(|e| fail(format!("{node}: {e}")));
        if !ping(&mut client, 1) {
            fail(format!("{node}: no answer to its ping"));
        }
        if i < resend {
            kept.push(client);
        }
    }
    let opened = started.elapsed();
    println!(
        "opened {} sessions in {:.1} s ({:.0} handshakes/s)",
        args.sessions,
        opened.as_secs_f64(),
        args.sessions as f64 / opened.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(1)); // the last states are written (WAL)
    server.kill9();

    let store =
        Store::open(&server.data_dir().join("db"), None, MemoryBudget::of(64 << 20)).unwrap_or_else(|e| fail(e));
    let records = store.scan(CF_DTLS_SESSIONS, |k, v| Ok(k.len() + v.len())).unwrap_or_else(|e| fail(e));
    drop(store);
    let bytes: usize = records.iter().sum();
    println!(
        "stored: {} records, {} bytes per session (keys and values, before RocksDB's own overhead)",
        records.len(),
        bytes / args.sessions.max(1)
    );

    let start_full = server.spawn(START_WITHIN).unwrap_or_else(|e| fail(e));
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let restore_ms = log.lines().rev().find(|l| l.contains("DTLS sessions restored")).and_then(|l| {
        let plain: String = strip_ansi(l);
        plain.split_whitespace().find_map(|w| w.strip_prefix("ms=")).and_then(|v| v.parse::<u64>().ok())
    });
    println!(
        "start-up: {:.0} ms with the sessions stored, {:.0} ms without; restore {} ms (server log)",
        start_full.as_secs_f64() * 1e3,
        start_empty.as_secs_f64() * 1e3,
        restore_ms.map_or("?".to_string(), |m| m.to_string())
    );

    let started = Instant::now();
    let answered = kept.iter_mut().map(|c| ping(c, 2)).filter(|&ok| ok).count();
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(1200)); // counters are exported every second
    let metrics = server.admin().get_text("/metrics").unwrap_or_default();
    let after = |name: &str| {
        let values =
            metrics.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        values.sum::<f64>()
    };
    println!(
        "after the restart: {answered} of {resend} pings answered in {:.1} s with {} handshakes; {} sessions resumed, {} restored",
        took.as_secs_f64(),
        after("nbhub_dtls_handshakes_started_total"),
        after("nbhub_dtls_sessions_resumed_total"),
        after("nbhub_dtls_sessions_restored_total"),
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CoAP ping (an empty CON) inside the session; true if the server's RST came back.
fn ping(client: &mut DtlsClient, mid: u16) -> bool {
    let [hi, lo] = mid.to_be_bytes();
    client.send(&[0x40, 0x00, hi, lo]).is_some()
        && client.recv(Duration::from_secs(5)).is_some_and(|r| r.len() == 4 && r[0] & 0x30 == 0x30)
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("nbhub-sessions: {e}");
    std::process::exit(1)
}

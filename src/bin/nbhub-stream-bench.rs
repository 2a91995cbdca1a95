//! Measures a streaming outlet under load. Run nbhub with `[nats]` or `[mqtt]` on, drive it with
//! `nbhub-load`, and this tool reports the events that came through the engine per second and
//! their lag: from the event's time (nbhub's receipt of the uplink; its ACK follows once the
//! uplink is durably written) to the engine's acknowledgement of the event.
//!
//! - `nats`: after the run, reads the stream back; an event's acknowledgement time is the one
//!   JetStream stored with it, and the rate is events over the time between the first and last.
//! - `mqtt`: subscribes (QoS 1) for `--seconds` while the load runs; the time is when the event
//!   reached this subscriber, a little after the broker's PUBACK to nbhub.
//!
//! Both clocks are this machine's, so the lag needs no clock synchronisation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use nbhub::clock::UnixMs;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "nbhub-stream-bench", about = "Events/s and lag through nbhub's NATS or MQTT outlet")]
struct Args {
    #[command(subcommand)]
    engine: Engine,
}

#[derive(Subcommand)]
enum Engine {
    /// Read a JetStream stream back after a run.
    Nats {
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
        #[arg(long, default_value = "NBHUB")]
        stream: String,
    },
    /// Subscribe to the broker while a run goes on.
    Mqtt {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 1883)]
        port: u16,
        #[arg(long, default_value = "nbhub/#")]
        topic: String,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

/// One event: when nbhub took it, and when the engine had it (ms since the epoch).
struct Sample {
    event_ms: u64,
    engine_ms: u64,
}

fn event_ms(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    UnixMs::parse_rfc3339(v["time"].as_str()?).map(|t| t.0)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn nats(url: &str, stream: &str) -> Result<Vec<Sample>, String> {
    use async_nats::jetstream::consumer::{OrderedPullConsumer, pull};
    let client = async_nats::connect(url).await.map_err(|e| format!("{url}: {e}"))?;
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream(stream).await.map_err(|e| format!("stream {stream}: {e}"))?;
    let total = s.info().await.map_err(|e| e.to_string())?.state.messages;
    let consumer: OrderedPullConsumer =
        s.create_consumer(pull::OrderedConfig::default()).await.map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(total as usize);
    while (out.len() as u64) < total {
        let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await else { break };
        let info = m.info().map_err(|e| e.to_string())?;
        let engine_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as u64;
        if let Some(event_ms) = event_ms(&m.payload) {
            out.push(Sample { event_ms, engine_ms });
        }
    }
    Ok(out)
}

async fn mqtt(host: &str, port: u16, topic: &str, seconds: u64) -> Result<Vec<Sample>, String> {
    let mut options = rumqttc::MqttOptions::new(format!("nbhub-stream-bench-{}", std::process::id()), host, port);
    options.set_max_packet_size(1 << 20, 1 << 20).set_inflight(1000);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let event = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            e = eventloop.poll() => e.map_err(|e| format!("{host}:{port}: {e}"))?,
        };
        match event {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
                client.subscribe(topic, rumqttc::QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
                eprintln!("subscribed to {topic} for {seconds} s");
            }
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                if let Some(event_ms) = event_ms(&p.payload) {
                    out.push(Sample { event_ms, engine_ms: now_ms() });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let samples = runtime.block_on(async {
        match &args.engine {
            Engine::Nats { url, stream } => nats(url, stream).await,
            Engine::Mqtt { host, port, topic, seconds } => mqtt(host, *port, topic, *seconds).await,
        }
    });
    let samples = samples.unwrap_or_else(|e| {
        eprintln!("nbhub-stream-bench: {e}");
        std::process::exit(1)
    });
    if samples.is_empty() {
        eprintln!("nbhub-stream-bench: no events");
        std::process::exit(1);
    }
    let first = samples.iter().map(|s| s.engine_ms).min().unwrap_or(0);
    let last = samples.iter().map(|s| s.engine_ms).max().unwrap_or(0);
    let mut lags: Vec<u64> = samples.iter().map(|s| s.engine_ms.saturating_sub(s.event_ms)).collect();
    lags.sort_unstable();
    let span = (last - first).max(1) as f64 / 1000.0;
    println!(
        "{} events over {span:.1} s: {:.0} events/s, lag p50 {} ms, p99 {} ms, max {} ms",
        samples.len(),
        samples.len() as f64 / span,
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1],
    );
}

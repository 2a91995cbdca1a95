//! The uplink hot path in process: CoAP parse, AES-decrypt and replay check of a 5682 uplink
//! through the real endpoint and dialect, and group-committed persistence into a real RocksDB.
//!
//! `cargo bench --bench uplink`

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

mod common;
use nbhub::clock::Now;
use nbhub::coap::endpoint::{Actions, Endpoint, EndpointConfig};
use nbhub::coap::message::{Code, Message, MessageBuilder, MessageType};
use nbhub::coap::option::OptionNumber;
use nbhub::dialect::DeviceFacing;
use nbhub::identity::{DeviceName, ProductKey};
use nbhub::net::PortFamily;
use nbhub::registry::{AckMode, SessionRecord};
use nbhub::registry::{NewDevice, Route};
use nbhub::store::SyncPolicy;
use nbhub::store::{Completion, Job, WriterThread};
use nbhub::transport::udp::written;

struct Fixture {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    services: nbhub::dialect::Services,
    writer: nbhub::store::Writer,
    thread: Option<WriterThread>,
    /// (token, key) of one 5682 session per device.
    sessions: Vec<(String, nbhub::auth::cipher::SessionKey, ProductKey, DeviceName)>,
}

fn fixture(devices: usize, sync: SyncPolicy) -> Fixture {
    let common::Bed { dir, runtime, registry, store, thread, product: pk } = common::bed("benchProduct", sync);
    let services = nbhub::dialect::Services::new(registry.clone(), store);
    let writer = registry.writer().clone();
    let mut sessions = Vec::new();
    for i in 0..devices {
        let dn = DeviceName::new(format!("dev{i}")).unwrap();
        let device = runtime
            .block_on(registry.create_device(
                &pk,
                NewDevice { device_name: Some(dn.clone()), device_secret: None, node_id: None, psk_hex: None },
            ))
            .unwrap();
        let random = format!("{:016x}", i);
        let now = nbhub::clock::UnixMs::now();
        let record = SessionRecord {
            device_id: device.id,
            family: PortFamily::Aes,
            random: Some(random.clone()),
            seq_offset: 1,
            ack_mode: AckMode::Piggybacked,
            created_at: now.0,
            last_used: now.0,
            replaced_until: None,
            auth_sign: None,
        };
        let (token, ops) = registry.open_session(&device, record, now);
        runtime.block_on(writer.commit(ops)).unwrap();
        let key = nbhub::auth::cipher::SessionKey::derive(device.secret.expose(), &random);
        sessions.push((token.as_str().to_string(), key, pk.clone(), dn));
    }
    Fixture { _dir: dir, runtime, services, writer, thread: Some(thread), sessions }
}

fn uplink(token: &str, key: &nbhub::auth::cipher::SessionKey, pk: &str, dn: &str, mid: u16, seq: u64) -> Vec<u8> {
    MessageBuilder::new(MessageType::Con, Code::POST, mid, &mid.to_be_bytes())
        .option(OptionNumber::URI_PATH, b"topic")
        .option(OptionNumber::URI_PATH, pk.as_bytes())
        .option(OptionNumber::URI_PATH, dn.as_bytes())
        .option(OptionNumber::URI_PATH, b"update")
        .uint_option(OptionNumber::ACCEPT, 42)
        .option(OptionNumber::ALI_TOKEN, token.as_bytes())
        .option(OptionNumber::ALI_SEQ, &key.encrypt_seq(seq))
        .payload(&key.encrypt(br#"{"temperature":21.5,"humidity":40,"battery":3.61}"#))
        .build()
}

fn endpoint(f: &Fixture) -> Endpoint<DeviceFacing> {
    Endpoint::new(
        DeviceFacing::new(&f.services, Route { family: PortFamily::Aes, socket: 0 }),
        EndpointConfig {
            max_payload: 1040,
            announced_max_payload: 1024,
            dedup_capacity: 1_000_000,
            exchange_lifetime: Duration::from_secs(247),
            ack_timeout: Duration::from_secs(10),
            max_retransmit: 4,
            max_pending_writes: usize::MAX,
            max_outgoing: usize::MAX,
        },
    )
}

fn bench(c: &mut Criterion) {
    let mut f = fixture(1000, SyncPolicy::Wal);
    let (token, key, pk, dn) = f.sessions[0].clone();
    let sample = uplink(&token, &key, pk.as_str(), dn.as_str(), 1, 2);

    let mut g = c.benchmark_group("uplink");
    g.throughput(Throughput::Elements(1));
    g.bench_function("coap_parse", |b| b.iter(|| black_box(Message::parse(black_box(&sample)).unwrap().options.len())));

    // Endpoint + dialect: dedup, token lookup, seq and payload decryption, window, ops built.
    let mut ep = endpoint(&f);
    let peer: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let mut seq = 10u64;
    let mut mid = 0u16;
    let mut actions = Actions::default();
    g.bench_function("handle_aes_uplink", |b| {
        b.iter_custom(|iters| {
            // datagrams are prepared outside the timed region
            let datagrams: Vec<Vec<u8>> = (0..iters)
                .map(|_| {
                    seq += 1;
                    mid = mid.wrapping_add(1);
                    uplink(&token, &key, pk.as_str(), dn.as_str(), mid, seq)
                })
                .collect();
            let now = Now::read();
            let start = Instant::now();
            for d in &datagrams {
                ep.handle_datagram(now, peer, None, d, &mut actions);
                actions.writes.clear();
                actions.transmits.clear();
            }
            start.elapsed()
        })
    });

    // Group commit: 1000 uplinks from 1000 devices queued at once, committed, all completions seen.
    g.throughput(Throughput::Elements(1000));
    for sync in [SyncPolicy::Wal, SyncPolicy::Fsync] {
        let mut fx = fixture(1000, sync);
        let mut ep = endpoint(&fx);
        let mut seq = 10u64;
        let mut mid = 0u16;
        let (sink, mut done) = tokio::sync::mpsc::unbounded_channel();
        let name = format!("persist_1000_{sync:?}").to_lowercase();
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    seq += 1;
                    let datagrams: Vec<Vec<u8>> = fx
                        .sessions
                        .iter()
                        .map(|(t, k, p, d)| {
                            mid = mid.wrapping_add(1);
                            uplink(t, k, p.as_str(), d.as_str(), mid, seq)
                        })
                        .collect();
                    let now = Now::read();
                    let start = Instant::now();
                    let mut actions = Actions::default();
                    for (i, d) in datagrams.iter().enumerate() {
                        let peer = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 5000));
                        ep.handle_datagram(now, peer, None, d, &mut actions);
                    }
                    let n = actions.writes.len();
                    for (ticket, ops) in actions.writes.drain(..) {
                        fx.writer.submit(Job {
                            ops,
                            completion: Completion::Endpoint {
                                sink: sink.clone(),
                                ticket: ticket.expect("an uplink waits for its write").into(),
                            },
                        });
                    }
                    fx.runtime.block_on(async {
                        let mut seen = 0;
                        while seen < n {
                            let batch: Vec<nbhub::store::Committed> = done.recv().await.unwrap();
                            seen += batch.len();
                            for c in batch {
                                ep.handle_committed(now, c.ticket.into(), written(c.result), &mut actions);
                            }
                        }
                    });
                    total += start.elapsed();
                }
                total
            })
        });
        fx.thread.take().unwrap().stop();
    }
    g.finish();
    f.thread.take().unwrap().stop();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(20);
    targets = bench
}
criterion_main!(benches);

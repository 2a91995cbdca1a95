//! The DTLS server in process, without sockets: full PSK handshakes (cookie exchange included)
//! through the real peer table against an OpenSSL client, counting the server's time only, and
//! the record layer's cost per 64-byte datagram in each direction, per suite.
//!
//! `cargo bench --bench dtls`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

mod common;
use nbhub::dtls::peers::{Limits, PeerTable, Socket};
use nbhub::dtls::pipe::Pipe;
use nbhub::dtls::quota::{PrefixLengths, Quotas};
use nbhub::identity::DeviceName;
use nbhub::registry::NewDevice;
use nbhub::store::SyncPolicy;
use nbhub::store::WriterThread;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslStream, SslVerifyMode};

const PSK: &[u8] = b"0123456789abcdef";
const SUITES: [&str; 3] = ["PSK-AES128-CCM8", "PSK-AES128-GCM-SHA256", "PSK-AES128-CBC-SHA"];

struct Fixture {
    _dir: tempfile::TempDir,
    _thread: WriterThread,
    table: PeerTable,
    client_ctx: SslContext,
    next_port: u32,
}

fn fixture(suite: &str) -> Fixture {
    let common::Bed { dir, runtime, registry, thread, product, .. } = common::bed("benchDtls", SyncPolicy::Wal);
    let device = NewDevice {
        device_name: Some(DeviceName::new("meter").unwrap()),
        device_secret: None,
        node_id: None,
        psk_hex: Some(hex::encode(PSK)),
    };
    runtime.block_on(registry.create_device(&product, device)).unwrap();
    let ctx = nbhub::dtls::context::build(registry, suite, &[]).unwrap();
    let limits = Limits {
        handshakes: Quotas {
            total: 1000,
            per_address: 1000,
            per_prefix: 1000,
            prefix: PrefixLengths { v4: 24, v6: 56 },
        },
        max_sessions: 1_000_000,
        handshake_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(3600),
        mtu: 1280,
        cid_len: 6,
    };
    let mut c = SslContext::builder(SslMethod::dtls_client()).unwrap();
    c.set_cipher_list(suite).unwrap();
    c.set_verify(SslVerifyMode::NONE);
    c.set_psk_client_callback(|_, _, id, key| {
        let identity = b"benchDtls&meter\0";
        id[..identity.len()].copy_from_slice(identity);
        key[..PSK.len()].copy_from_slice(PSK);
        Ok(PSK.len())
    });
    Fixture {
        _dir: dir,
        _thread: thread,
        table: PeerTable::new(ctx, limits, Socket { index: 0, of: 1 }, None),
        client_ctx: c.build(),
        next_port: 0,
    }
}

impl Fixture {
    fn peer(&mut self) -> SocketAddr {
        self.next_port += 1;
        SocketAddr::from(([10, (self.next_port >> 16) as u8, (self.next_port >> 8) as u8, 1], self.next_port as u16))
    }

    /// One full handshake from a new address; returns the server's time and the client.
    fn handshake(&mut self) -> (Duration, SocketAddr, SslStream<Pipe>) {
        let peer = self.peer();
        let mut client = SslStream::new(Ssl::new(&self.client_ctx).unwrap(), Pipe::default()).unwrap();
        let mut server_time = Duration::ZERO;
        let mut wire = Vec::new();
        loop {
            let done = match client.connect() {
                Ok(()) => true,
                Err(e) if e.code() == ErrorCode::WANT_READ => false,
                Err(e) => panic!("client: {e}"),
            };
            for d in client.get_mut().take_outbound().collect::<Vec<_>>() {
                let t = Instant::now();
                self.table.handle_datagram(t, peer, &d, &mut wire, &mut |_, _, _| {});
                server_time += t.elapsed();
            }
            if done {
                return (server_time, peer, client);
            }
            for (_, d) in wire.drain(..) {
                client.get_mut().put(&d);
                let _ = client.connect();
            }
        }
    }
}

fn handshakes(c: &mut Criterion) {
    let mut g = c.benchmark_group("dtls_handshake_server_side");
    g.throughput(Throughput::Elements(1));
    for suite in SUITES {
        let mut f = fixture(suite);
        g.bench_function(suite, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (t, peer, mut client) = f.handshake();
                    total += t;
                    // close, so the table does not grow across samples
                    let _ = client.shutdown();
                    let mut wire = Vec::new();
                    for d in client.get_mut().take_outbound().collect::<Vec<_>>() {
                        f.table.handle_datagram(Instant::now(), peer, &d, &mut wire, &mut |_, _, _| {});
                    }
                }
                total
            })
        });
    }
    g.finish();
}

fn records(c: &mut Criterion) {
    let mut g = c.benchmark_group("dtls_record_64_bytes");
    g.throughput(Throughput::Elements(1));
    let payload = [7u8; 64];
    for suite in SUITES {
        let mut f = fixture(suite);
        let (_, peer, mut client) = f.handshake();
        g.bench_function(format!("{suite}/open"), |b| {
            b.iter_custom(|iters| {
                // Fresh records each time: the replay window drops repeats.
                let records: Vec<Vec<u8>> = (0..iters)
                    .map(|_| {
                        client.ssl_write(&payload).unwrap();
                        client.get_mut().take_outbound().next().unwrap()
                    })
                    .collect();
                let mut wire = Vec::new();
                let mut delivered = 0;
                let t = Instant::now();
                for r in &records {
                    f.table.handle_datagram(t, peer, r, &mut wire, &mut |_, _, d| delivered += d.len());
                }
                let elapsed = t.elapsed();
                assert_eq!(delivered, records.len() * payload.len());
                elapsed
            })
        });
        g.bench_function(format!("{suite}/seal"), |b| {
            let mut wire: Vec<(SocketAddr, Bytes)> = Vec::with_capacity(1024);
            b.iter(|| {
                assert!(f.table.send(peer, &payload, &mut wire));
                if wire.len() == 1024 {
                    wire.clear();
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = handshakes, records
}
criterion_main!(benches);

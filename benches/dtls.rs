//! The DTLS server in process, without sockets: full PSK handshakes (cookie exchange included)
//! through the real peer table against an OpenSSL client, counting the server's time only, and
//! the record layer's cost per 64-byte datagram in each direction, per suite.
//!
//! `cargo bench --bench dtls`

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nbhub::config::{Config, SyncPolicy};
use nbhub::dtls::peers::{Limits, PeerTable};
use nbhub::identity::{DeviceName, ProductKey};
use nbhub::registry::{NewDevice, NewProduct, Registry};
use nbhub::store::records::OtaProtocol;
use nbhub::store::{Store, WriterThread};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslStream, SslVerifyMode};

const PSK: &[u8] = b"0123456789abcdef";
const SUITES: [&str; 3] = ["PSK-AES128-CCM8", "PSK-AES128-GCM-SHA256", "PSK-AES128-CBC-SHA"];

#[derive(Default)]
struct Pipe {
    inbound: Option<Vec<u8>>,
    outbound: Vec<Vec<u8>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let d = self.inbound.take().ok_or(io::ErrorKind::WouldBlock)?;
        buf[..d.len()].copy_from_slice(&d);
        Ok(d.len())
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbound.push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    _thread: WriterThread,
    table: PeerTable,
    client_ctx: SslContext,
    next_port: u32,
}

fn fixture(suite: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::load_with_env(None, Vec::new()).unwrap();
    config.data_dir = dir.path().to_path_buf();
    let config = Arc::new(config);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = Store::open(&dir.path().join("db"), None).unwrap();
    let (writer, thread) = WriterThread::start(&store, SyncPolicy::Wal, 64).unwrap();
    let registry = Arc::new(runtime.block_on(Registry::load(config, store, writer)).unwrap());
    let pk = ProductKey::new("benchDtls").unwrap();
    runtime
        .block_on(registry.create_product(NewProduct {
            name: "bench".into(),
            product_key: Some(pk.clone()),
            product_secret: None,
            dynamic_registration: false,
            ota_protocol: OtaProtocol::Pcp,
            awake_window_s: 20,
        }))
        .unwrap();
    let device = NewDevice {
        device_name: Some(DeviceName::new("meter").unwrap()),
        device_secret: None,
        node_id: None,
        psk_hex: Some(hex::encode(PSK)),
    };
    runtime.block_on(registry.create_device(&pk, device)).unwrap();
    let ctx = nbhub::dtls::context::build(registry, suite, &[]).unwrap();
    let limits = Limits {
        max_handshakes: 1000,
        max_sessions: 1_000_000,
        handshake_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(3600),
        mtu: 1280,
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
    Fixture { _dir: dir, _thread: thread, table: PeerTable::new(ctx, limits), client_ctx: c.build(), next_port: 0 }
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
            for d in std::mem::take(&mut client.get_mut().outbound) {
                let t = Instant::now();
                self.table.handle_datagram(t, peer, &d, &mut wire, &mut |_, _, _| {});
                server_time += t.elapsed();
            }
            if done {
                return (server_time, peer, client);
            }
            for (_, d) in wire.drain(..) {
                client.get_mut().inbound = Some(d.to_vec());
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
                    for d in std::mem::take(&mut client.get_mut().outbound) {
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
                        client.get_mut().outbound.pop().unwrap()
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

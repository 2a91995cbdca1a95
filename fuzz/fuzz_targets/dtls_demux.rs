//! The DTLS peer table (the demultiplexer in front of OpenSSL and the record layer): a sequence of
//! datagrams from a few peers, with time passing, against a real registry. Input: repeated
//! `peer (1 byte) | length (2 bytes) | datagram`.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nbhub::config::Config;
use nbhub::dtls::peers::{Limits, PeerTable, Socket};
use nbhub::dtls::quota::{PrefixLengths, Quotas};
use nbhub::registry::Registry;
use nbhub::store::{Store, WriterThread};

struct Bed {
    table: Mutex<PeerTable>,
    _dir: tempfile::TempDir,
    _thread: WriterThread,
}

fn bed() -> &'static Bed {
    static BED: OnceLock<Bed> = OnceLock::new();
    BED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(Config::load_with_env(None, Vec::new()).unwrap());
        let store = Store::open(&dir.path().join("db"), None, config.store.memory()).unwrap();
        let (writer, thread) = WriterThread::start(&store, config.store.sync, 64).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let registry = Arc::new(runtime.block_on(Registry::load(config, &store, writer)).unwrap());
        let ctx = nbhub::dtls::context::build(registry, "", &[]).unwrap();
        let limits = Limits {
            handshakes: Quotas { total: 8, per_address: 8, per_prefix: 8, prefix: PrefixLengths { v4: 24, v6: 56 } },
            max_sessions: 8,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            mtu: 1280,
            cid_len: 6,
        };
        Bed {
            table: Mutex::new(PeerTable::new(ctx, limits, Socket { index: 0, of: 1 }, None)),
            _dir: dir,
            _thread: thread,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let mut table = bed().table.lock().unwrap_or_else(|p| p.into_inner());
    let mut now = Instant::now();
    let mut wire = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let peer = SocketAddr::from(([10, 0, 0, 1], 5000 + (rest[0] % 4) as u16));
        let len = (u16::from_be_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let datagram = &rest[3..3 + len];
        rest = &rest[3 + len..];
        table.handle_datagram(now, peer, datagram, &mut wire, &mut |_, _, _| {});
        now += Duration::from_millis(700);
        table.handle_timeout(now, &mut wire);
        wire.clear();
    }
    // Whatever the datagrams did, the peers they created expire.
    table.handle_timeout(now + Duration::from_secs(120), &mut wire);
    assert_eq!(table.handshakes_in_progress(), 0);
});

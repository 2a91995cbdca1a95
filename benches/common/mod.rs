//! What the benches share: a real registry on a RocksDB in a temporary directory, with one
//! product, and flow control out of the way (the benches measure the path, not the limits).

use std::sync::Arc;

use nbhub::config::Config;
use nbhub::identity::ProductKey;
use nbhub::registry::{NewProduct, Registry};
use nbhub::store::SyncPolicy;
use nbhub::store::records::OtaProtocol;
use nbhub::store::{Store, WriterThread};

pub struct Bed {
    pub dir: tempfile::TempDir,
    pub runtime: tokio::runtime::Runtime,
    pub registry: Arc<Registry>,
    #[allow(dead_code)] // read by the benches that build dialect services, not by every bench
    pub store: Store,
    pub thread: WriterThread,
    pub product: ProductKey,
}

pub fn bed(product: &str, sync: SyncPolicy) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::load_with_env(None, Vec::new()).unwrap();
    config.data_dir = dir.path().to_path_buf();
    config.store.sync = sync;
    config.device.max_per_second = u32::MAX;
    config.device.max_per_minute = u32::MAX;
    let config = Arc::new(config);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = Store::open(&dir.path().join("db"), None, config.store.memory()).unwrap();
    let (writer, thread) = WriterThread::start(&store, sync, config.store.max_batch).unwrap();
    let registry = Arc::new(runtime.block_on(Registry::load(config, &store, writer)).unwrap());
    let product = ProductKey::new(product).unwrap();
    runtime
        .block_on(registry.create_product(NewProduct {
            name: "bench".into(),
            product_key: Some(product.clone()),
            product_secret: None,
            dynamic_registration: false,
            ota_protocol: OtaProtocol::Pcp,
            awake_window_s: 20,
            ack_timeout_ms: None,
            max_retransmit: None,
            unsigned_bootstrap: false,
        }))
        .unwrap();
    Bed { dir, runtime, registry, store, thread, product }
}

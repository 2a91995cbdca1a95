//! The in-memory directory of products, devices and sessions, loaded from the store at start and
//! kept in step with it: every change is committed through the writer before it is reported done.
//!
//! Lock order: the directory's index, then a device's state, then a session shard or a shard of
//! a service beside the directory (commands, upgrades); never the other way round.

pub mod activity;
pub mod bulk;
mod contact;
pub mod device;
mod observe;
pub mod routes;
pub mod search;
pub mod sessions;

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::auth::replay::ReplayWindow;
use crate::clock::UnixMs;
use crate::coap::resource::{ExchangeKey, ExchangeKeys};
use crate::config::Config;
use crate::identity::{DeviceId, DeviceName, NodeId, ObserveToken, ProductKey, Secret, Token};
use crate::net::PortFamily;
use crate::northbound::Wanted;
use crate::store::records::{DeviceRecord, OtaProtocol, ProductRecord, Radio};
use crate::store::{META_NEXT_DEVICE_ID, Op, Store, StoreError, Writer};
use crate::sync::{read, write};
pub use device::{Device, DeviceState, Status};
pub use observe::NotificationOrder;
pub use routes::{Route, Routes};
pub use sessions::{AckMode, Lookup, SeqOutcome, Session, SessionRecord, SessionView, Sessions};

impl Borrow<str> for ProductKey {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}
impl Borrow<str> for DeviceName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}
impl Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The request contradicts itself or the configuration.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What another service keeps for each device beside the directory (its command queue): taken
/// with the writes deleting its stored form as the device is deleted, and put back if the
/// deletion cannot be stored. Both run under the device's lock.
pub trait Held {
    type Taken;
    fn take(&self, device: &Device, s: &DeviceState) -> (Self::Taken, Vec<Op>);
    fn put_back(&self, device: &Device, s: &DeviceState, taken: Self::Taken);
}

/// Two services' shares of a device, taken and put back together.
impl<A: Held, B: Held> Held for (A, B) {
    type Taken = (A::Taken, B::Taken);

    fn take(&self, device: &Device, s: &DeviceState) -> (Self::Taken, Vec<Op>) {
        let (a, mut ops) = self.0.take(device, s);
        let (b, more) = self.1.take(device, s);
        ops.extend(more);
        ((a, b), ops)
    }

    fn put_back(&self, device: &Device, s: &DeviceState, (a, b): Self::Taken) {
        self.0.put_back(device, s, a);
        self.1.put_back(device, s, b);
    }
}

pub struct NewProduct {
    pub name: String,
    pub product_key: Option<ProductKey>,
    pub product_secret: Option<Secret>,
    pub dynamic_registration: bool,
    pub ota_protocol: OtaProtocol,
    pub awake_window_s: u32,
    pub ack_timeout_ms: Option<u64>,
    pub max_retransmit: Option<u32>,
    pub unsigned_bootstrap: bool,
}

#[derive(Debug)]
pub struct NewDevice {
    pub device_name: Option<DeviceName>,
    pub device_secret: Option<Secret>,
    pub node_id: Option<NodeId>,
    pub psk_hex: Option<String>,
}

#[derive(Default)]
pub struct DevicePatch {
    pub enabled: Option<bool>,
    pub radio: Option<Radio>,
}

#[derive(Default)]
struct Devices {
    /// In name order, for listing and searching.
    by_product: HashMap<ProductKey, BTreeMap<DeviceName, Arc<Device>>>,
    by_node: HashMap<NodeId, Arc<Device>>,
    /// For DTLS PSK sessions, which name their device by id.
    by_id: HashMap<DeviceId, Arc<Device>>,
    /// Huawei uplinks name their device by the token of its observe relation (established or
    /// asked for at the latest bind).
    by_observe: HashMap<ObserveToken, Arc<Device>>,
}

impl Devices {
    fn insert(&mut self, d: &Arc<Device>) {
        if let Some(n) = &d.node_id {
            self.by_node.insert(n.clone(), d.clone());
        }
        let s = d.state();
        for t in [s.observe, s.firmware_observe].into_iter().flatten() {
            self.by_observe.insert(t, d.clone());
        }
        drop(s);
        self.by_product.entry(d.product_key.clone()).or_default().insert(d.device_name.clone(), d.clone());
        self.by_id.insert(d.id, d.clone());
    }

    fn remove(&mut self, d: &Device) {
        if let Some(m) = self.by_product.get_mut(&d.product_key) {
            m.remove(&d.device_name);
        }
        if let Some(n) = &d.node_id {
            self.by_node.remove(n);
        }
        self.by_id.remove(&d.id);
        let s = d.state();
        for t in [s.observe, s.pending_observe, s.firmware_observe].into_iter().flatten() {
            self.by_observe.remove(&t);
        }
    }
}

pub struct Registry {
    pub config: Arc<Config>,
    products: RwLock<HashMap<ProductKey, Arc<ProductRecord>>>,
    devices: RwLock<Devices>,
    pub sessions: Sessions,
    pub routes: Routes,
    next_device_id: AtomicU64,
    /// Keys of the exchanges the endpoints start, unique process-wide.
    exchanges: ExchangeKeys,
    writer: Writer,
    /// The event kinds subscribers want (set by the webhooks, read where events arise).
    wanted: Arc<Wanted>,
    /// Each product's codecs: which uplinks are decoded after they are stored.
    pub codecs: Arc<crate::codec::Directory>,
    /// Each product's uplinks per minute.
    pub activity: activity::Activity,
    /// The devices whose messages are traced.
    pub tracer: Arc<crate::coap::trace::Tracer>,
}

impl Registry {
    /// An empty directory whose changes go to `writer`.
    pub fn new(config: Arc<Config>, writer: Writer) -> Registry {
        Registry {
            sessions: Sessions::new(config.auth.token_ttl_s),
            config,
            products: RwLock::default(),
            devices: RwLock::default(),
            routes: Routes::default(),
            next_device_id: AtomicU64::new(1),
            exchanges: ExchangeKeys::default(),
            writer,
            wanted: Arc::new(Wanted::default()),
            codecs: Arc::default(),
            activity: activity::Activity::default(),
            tracer: Arc::default(),
        }
    }

    /// Loads products, devices, presence and live sessions; sessions that expired while the
    /// server was down are deleted from the store.
    pub async fn load(config: Arc<Config>, store: &Store, writer: Writer) -> Result<Registry, StoreError> {
        let now = UnixMs::now();
        let products = store.products()?.into_iter().map(|p| (p.product_key.clone(), Arc::new(p))).collect();
        let crate::store::Presence { contacts: mut presence, announced } = store.presence()?;
        let mut devices = Devices::default();
        let mut max_id = 0;
        for r in store.devices()? {
            max_id = max_id.max(r.id.0);
            let p = presence.remove(&r.id);
            let d = Arc::new(Device::from_record(r, p.as_ref().map(|p| p.last_seen), p.and_then(|p| p.address)));
            // What subscribers were told is stored; a change while the server was down is then
            // announced by the first sweep. Devices from before statuses were stored start from
            // their current one.
            {
                let mut s = d.state();
                s.announced = match announced.get(&d.id).and_then(|b| Status::from_byte(*b)) {
                    Some(status) => status,
                    None => s.status(now, &config.device),
                };
            }
            devices.insert(&d);
        }
        let next_device_id = store.meta_u64(META_NEXT_DEVICE_ID)?.unwrap_or(1).max(max_id + 1);
        let sessions = Sessions::new(config.auth.token_ttl_s);
        let mut stale = Vec::new();
        for (token, record, window) in sessions::stored(store)? {
            let Some(device) = devices.by_id.get(&record.device_id) else {
                stale.push(Op::DeleteSession(token));
                continue;
            };
            let window = match record.family {
                PortFamily::Aes => Some(window.unwrap_or_else(|| ReplayWindow::new(config.auth.replay_window))),
                PortFamily::Plain | PortFamily::Dtls => None,
            };
            // The stored last use may trail the real one by the write interval; a session must
            // not end earlier than promised because the server restarted.
            let mut record = record;
            record.last_used =
                (record.last_used + sessions::LAST_USED_WRITE_INTERVAL_MS).min(now.0).max(record.last_used);
            let session = Session::new(device.clone(), record, window);
            sessions.insert(token.clone(), session);
            if sessions.is_live(token.as_bytes(), now) {
                device.state().tokens.push(token);
            } else {
                sessions.remove(token.as_bytes());
                stale.push(Op::DeleteSession(token));
            }
        }
        if !stale.is_empty() {
            tracing::info!(count = stale.len(), "removing sessions that expired while stopped");
            writer.commit(stale).await?;
        }
        let (activity, old_minutes) = activity::Activity::load(store, now)?;
        writer.record(old_minutes);
        let registry = Registry {
            products: RwLock::new(products),
            devices: RwLock::new(devices),
            sessions,
            next_device_id: AtomicU64::new(next_device_id),
            codecs: Arc::new(crate::codec::Directory::load(store)?),
            activity,
            ..Registry::new(config, writer)
        };
        registry.export_gauges();
        Ok(registry)
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// The event kinds subscribers want, for the webhooks to set.
    pub fn wanted(&self) -> &Arc<Wanted> {
        &self.wanted
    }

    pub fn export_gauges(&self) {
        use crate::telemetry::metric;
        metrics::gauge!(metric::SESSIONS).set(self.sessions.len() as f64);
        let n: usize = read(&self.devices).by_product.values().map(|m| m.len()).sum();
        metrics::gauge!(metric::DEVICES).set(n as f64);
    }

    pub fn product(&self, pk: &str) -> Option<Arc<ProductRecord>> {
        read(&self.products).get(pk).cloned()
    }

    /// How `device`'s product upgrades its devices; none if the product is gone.
    pub fn ota_protocol(&self, device: &Device) -> Option<OtaProtocol> {
        read(&self.products).get(device.product_key.as_str()).map(|p| p.ota_protocol)
    }

    pub fn products(&self) -> Vec<Arc<ProductRecord>> {
        let mut v: Vec<_> = read(&self.products).values().cloned().collect();
        v.sort_by(|a, b| a.product_key.cmp(&b.product_key));
        v
    }

    pub fn device(&self, pk: &str, dn: &str) -> Option<Arc<Device>> {
        read(&self.devices).by_product.get(pk)?.get(dn).cloned()
    }

    pub fn device_by_id(&self, id: DeviceId) -> Option<Arc<Device>> {
        read(&self.devices).by_id.get(&id).cloned()
    }

    pub fn device_by_node(&self, node: &str) -> Option<Arc<Device>> {
        read(&self.devices).by_node.get(node).cloned()
    }

    /// A key for an exchange an endpoint starts.
    pub fn next_exchange(&self) -> ExchangeKey {
        self.exchanges.next()
    }

    /// All of a product's devices, ordered by name.
    pub fn devices_of(&self, pk: &str) -> Vec<Arc<Device>> {
        read(&self.devices).by_product.get(pk).map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    pub async fn create_product(&self, new: NewProduct) -> Result<Arc<ProductRecord>, RegistryError> {
        let key = new.product_key.unwrap_or_else(ProductKey::generate);
        let record = Arc::new(ProductRecord {
            product_key: key.clone(),
            product_secret: new.product_secret.unwrap_or_else(|| Secret::generate(16)),
            name: new.name,
            dynamic_registration: new.dynamic_registration,
            ota_protocol: new.ota_protocol,
            awake_window_s: new.awake_window_s,
            created_at: UnixMs::now().0,
            ack_timeout_ms: new.ack_timeout_ms,
            max_retransmit: new.max_retransmit,
            unsigned_bootstrap: new.unsigned_bootstrap,
        });
        self.insert_product(record.clone())?;
        if let Err(e) = self.writer.commit([Op::PutProduct(Box::new((*record).clone()))]).await {
            write(&self.products).remove(&key);
            return Err(e.into());
        }
        Ok(record)
    }

    /// Adds a new product to the directory, unless its key is taken.
    pub fn insert_product(&self, record: Arc<ProductRecord>) -> Result<(), RegistryError> {
        let mut products = write(&self.products);
        let key = &record.product_key;
        if products.contains_key(key) {
            return Err(RegistryError::Conflict(format!("product {key} already exists")));
        }
        products.insert(key.clone(), record);
        Ok(())
    }

    pub async fn create_device(&self, pk: &ProductKey, new: NewDevice) -> Result<Arc<Device>, RegistryError> {
        if self.product(pk.as_str()).is_none() {
            return Err(RegistryError::NotFound(format!("product {pk}")));
        }
        let device = Arc::new(Device::from_record(self.new_record(pk, new, Radio::default()), None, None));
        self.insert(&device)?;
        if let Err(e) = self.writer.commit([Op::PutDevice(device.clone())]).await {
            self.forget(&device);
            return Err(e.into());
        }
        self.export_gauges();
        Ok(device)
    }

    /// The record of a device about to be created: generated name and secret where not given.
    fn new_record(&self, pk: &ProductKey, new: NewDevice, radio: Radio) -> DeviceRecord {
        DeviceRecord {
            id: self.new_device_id(),
            product_key: pk.clone(),
            device_name: new.device_name.unwrap_or_else(DeviceName::generate),
            device_secret: new.device_secret.unwrap_or_else(|| Secret::generate(32)),
            node_id: new.node_id,
            psk_hex: new.psk_hex,
            enabled: true,
            registered: false,
            radio,
            created_at: UnixMs::now().0,
            observe: None,
            version: None,
            home: crate::identity::Home::Here,
            registration: None,
            firmware_observe: None,
        }
    }

    /// Adds a new device to the directory, unless its product has a device of that name or its
    /// node id is taken.
    pub fn insert(&self, device: &Arc<Device>) -> Result<(), RegistryError> {
        let mut devices = write(&self.devices);
        let pk = &device.product_key;
        if devices.by_product.get(pk).is_some_and(|names| names.contains_key(&device.device_name)) {
            return Err(RegistryError::Conflict(format!(
                "device {} already exists in product {pk}",
                device.device_name
            )));
        }
        if let Some(n) = &device.node_id
            && devices.by_node.contains_key(n)
        {
            return Err(RegistryError::Conflict(format!("node id {n} is already used by another device")));
        }
        devices.insert(device);
        Ok(())
    }

    /// Removes a device from the directory (one not stored after all, or deleted).
    pub fn forget(&self, device: &Device) {
        write(&self.devices).remove(device);
    }

    /// Stops serving `device` here if `decide` says so: its sessions and observe relations end.
    /// `decide` runs under the directory's lock, then the device's (the lock order). Returns the
    /// device's state, still locked, what `decide` returned, and the writes ending its sessions.
    pub fn detach<'d, R>(
        &self,
        device: &'d Device,
        decide: impl FnOnce(&mut DeviceState) -> Option<R>,
    ) -> Option<(std::sync::MutexGuard<'d, DeviceState>, R, Vec<Op>)> {
        let mut devices = write(&self.devices);
        let mut s = device.state();
        let decided = decide(&mut s)?;
        let mut ops = Vec::new();
        for t in s.tokens.drain(..) {
            self.sessions.remove(t.as_bytes());
            ops.push(Op::DeleteSession(t));
        }
        // A registration ends with the relation: the client registers at its new home.
        (s.registration, s.pending_registration) = (None, None);
        for t in [s.observe.take(), s.pending_observe.take(), s.firmware_observe.take()].into_iter().flatten() {
            devices.by_observe.remove(&t);
        }
        Some((s, decided, ops))
    }

    pub fn new_device_id(&self) -> DeviceId {
        DeviceId(self.next_device_id.fetch_add(1, Ordering::Relaxed))
    }

    pub async fn update_device(&self, pk: &str, dn: &str, patch: DevicePatch) -> Result<Arc<Device>, RegistryError> {
        let device = self.device(pk, dn).ok_or_else(|| RegistryError::NotFound(format!("device {pk}/{dn}")))?;
        let previous = {
            let mut s = device.state();
            if s.home == crate::identity::Home::Arriving {
                return Err(RegistryError::Conflict(format!("device {dn} is arriving from another instance")));
            }
            let previous = (s.enabled, s.radio.clone());
            if let Some(e) = patch.enabled {
                s.enabled = e;
            }
            if let Some(r) = patch.radio {
                s.radio = r;
            }
            previous
        };
        if let Err(e) = self.writer.commit([Op::PutDevice(device.clone())]).await {
            // Memory must not claim what the store does not hold.
            let mut s = device.state();
            (s.enabled, s.radio) = previous;
            return Err(e.into());
        }
        Ok(device)
    }

    /// Removes the device, its sessions, and what `held` keeps for it (its commands).
    pub async fn delete_device<H: Held>(&self, device: &Arc<Device>, held: &H) -> Result<(), RegistryError> {
        let (record, tokens, taken, mut ops) = {
            let mut s = device.state();
            if s.home == crate::identity::Home::Arriving {
                let dn = &device.device_name;
                return Err(RegistryError::Conflict(format!("device {dn} is arriving from another instance")));
            }
            let (taken, ops) = held.take(device, &s);
            s.deleted = true;
            (device.record_with(&s), s.tokens.clone(), taken, ops)
        };
        self.forget(device);
        for t in &tokens {
            self.sessions.remove(t.as_bytes());
        }
        ops.push(Op::DeleteDevice { record: Box::new(record), tokens });
        if let Err(e) = self.writer.commit(ops).await {
            // Still stored, so still served; its sessions were dropped and it must authenticate again.
            let mut s = device.state();
            s.deleted = false;
            held.put_back(device, &s, taken);
            drop(s);
            write(&self.devices).insert(device);
            return Err(e.into());
        }
        self.export_gauges();
        Ok(())
    }

    /// Deletes sessions that expired (idle past the TTL, or replaced and past their grace) from
    /// memory and the store; returns how many.
    pub async fn sweep_expired_sessions(&self, now: UnixMs) -> Result<usize, StoreError> {
        let gone = self.sessions.drain_expired(now);
        let n = gone.len();
        if n > 0 {
            self.writer.commit(gone.into_iter().map(Op::DeleteSession)).await?;
        }
        self.export_gauges();
        Ok(n)
    }

    /// The live session of `family` an identical signed `/auth` opened before, renewed for a
    /// full lifetime: the body travels in the clear, so this is a replay or the device itself
    /// (iotkit v3 always signs the same body on 5683; on 5682 the body's `seq` differs between
    /// initialisations, so there it is a replay or an application-level retry). Answering it with
    /// the same session keeps a captured `/auth` from cutting the real device off, and the
    /// renewal keeps a device that re-initialised from being stranded when that token's idle
    /// expiry was near. Returns the token and the record to store before it is revealed.
    pub fn replayed_session(
        &self,
        device: &Arc<Device>,
        family: PortFamily,
        sign: &str,
        now: UnixMs,
    ) -> Option<(Token, SessionRecord)> {
        // Lock order: device state, then a session shard (never the other way round).
        let state = device.state();
        state
            .tokens
            .iter()
            .find_map(|t| Some((t.clone(), self.sessions.renew_signed(t.as_bytes(), family, sign, now)?)))
    }

    /// Starts a session for `device`: the new token is usable at once; the device's previous
    /// token on the same port family keeps working for the grace period (the device may still
    /// retransmit with it). Returns the token and the writes that must be durable before it is
    /// revealed.
    pub fn open_session(&self, device: &Arc<Device>, record: SessionRecord, now: UnixMs) -> (Token, Vec<Op>) {
        let family = record.family;
        let grace_end = now.plus_secs(self.config.auth.token_grace_s);
        let mut ops = Vec::with_capacity(2);
        // Lock order: device state, then a session shard (never the other way round).
        let mut state = device.state();
        state.tokens.retain(|t| self.sessions.is_live(t.as_bytes(), now));
        for old in &state.tokens {
            if self.sessions.family(old.as_bytes()) == Some(family)
                && let Some(r) = self.sessions.replace(old.as_bytes(), grace_end)
            {
                ops.push(sessions::put(old.clone(), &r));
            }
        }
        let token = Token::generate();
        state.tokens.push(token.clone());
        let window = (family == PortFamily::Aes).then(|| ReplayWindow::new(self.config.auth.replay_window));
        ops.push(sessions::put(token.clone(), &record));
        self.sessions.insert(token.clone(), Session::new(device.clone(), record, window));
        (token, ops)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::sessions::AckMode;
    use super::*;
    use crate::store::WriterThread;

    /// A directory over a store in `dir` with one product, `p`, and its writer's thread.
    pub(super) async fn with_product(
        dir: &std::path::Path,
        adjust: impl FnOnce(&mut Config),
    ) -> (Registry, Store, WriterThread, ProductKey) {
        let mut config = Config::load_with_env(None, Vec::new()).unwrap();
        adjust(&mut config);
        let store = Store::open(dir, None, config.store.memory()).unwrap();
        let (writer, thread) = WriterThread::start(&store, config.store.sync, 16).unwrap();
        let registry = Registry::load(Arc::new(config), &store, writer).await.unwrap();
        let pk = ProductKey::new("p").unwrap();
        registry
            .create_product(NewProduct {
                name: "p".into(),
                product_key: Some(pk.clone()),
                product_secret: None,
                dynamic_registration: false,
                ota_protocol: OtaProtocol::Pcp,
                awake_window_s: 20,
                ack_timeout_ms: None,
                max_retransmit: None,
                unsigned_bootstrap: false,
            })
            .await
            .unwrap();
        (registry, store, thread, pk)
    }

    #[tokio::test]
    async fn expired_sessions_are_swept_from_memory_and_store() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, store, thread, pk) = with_product(dir.path(), |c| c.auth.token_ttl_s = 60).await;
        let device = registry
            .create_device(&pk, NewDevice { device_name: None, device_secret: None, node_id: None, psk_hex: None })
            .await
            .unwrap();
        let now = UnixMs::now();
        let session = |last_used: u64| SessionRecord {
            device_id: device.id,
            family: PortFamily::Plain,
            random: None,
            seq_offset: 1,
            ack_mode: AckMode::Piggybacked,
            created_at: last_used,
            last_used,
            replaced_until: None,
            auth_sign: None,
        };
        for last_used in [now.0 - 120_000, now.0] {
            let (_, ops) = registry.open_session(&device, session(last_used), now);
            registry.writer().commit(ops).await.unwrap();
        }
        // the second /auth replaced the first token; the first was idle past the TTL anyway
        assert_eq!(registry.sweep_expired_sessions(now).await.unwrap(), 1);
        assert_eq!(registry.sessions.len(), 1);
        assert_eq!(sessions::stored(&store).unwrap().len(), 1);
        thread.stop();
    }
}

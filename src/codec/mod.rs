//! Payload codecs: per product, an operator's script (Alibaba's data parsing or Huawei's
//! JavaScript codec, run unmodified in [`script`]) or a layout of fields ([`fields`]) that reads
//! a device's bytes as JSON and writes JSON commands as bytes. Versions are kept; one is current. Uplinks are stored and answered
//! first and decoded after, by the [`decoders`], so a bad script never costs a message.

pub mod command;
pub mod decoders;
pub mod engine;
pub mod fields;
pub mod script;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::UnixMs;
use crate::identity::ProductKey;
use crate::store::{CF_CODECS, Op, Store, StoreError, Writer, corrupt, json};
use crate::sync::{read, write};

/// Why a codec could not do what it was asked; the script's own message where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("the script does not load: {0}")]
    Compile(String),
    #[error("the script threw: {0}")]
    Thrown(String),
    #[error("the script ran past its {} ms budget and was stopped", .0.as_millis())]
    Timeout(Duration),
    #[error("the script needed more than its {} MiB of memory and was stopped", .0 >> 20)]
    Memory(usize),
    #[error("the script defines no {0} function")]
    Missing(&'static str),
    #[error("{0}")]
    BadResult(String),
    /// A field layout that does not hold together.
    #[error("the field layout is invalid: {0}")]
    BadLayout(String),
    /// A frame or command that does not fit a field layout.
    #[error("{0}")]
    Unfit(String),
}

impl CodecError {
    /// A stopped runtime may be left in any state: it is thrown away and built again.
    pub fn stops_runtime(&self) -> bool {
        matches!(self, CodecError::Timeout(_) | CodecError::Memory(_))
    }

    /// The error's kind, as stored and counted.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::Compile(_) => "compile",
            CodecError::Thrown(_) => "thrown",
            CodecError::Timeout(_) => "timeout",
            CodecError::Memory(_) => "memory",
            CodecError::Missing(_) => "missing",
            CodecError::BadResult(_) => "bad_result",
            CodecError::BadLayout(_) => "bad_layout",
            CodecError::Unfit(_) => "unfit",
        }
    }
}

/// Whose conventions a codec follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// `rawDataToProtocol`, `protocolToRawData`, `transformPayload` (seed 002 §9).
    Alibaba,
    /// `decode`, `encode` and the `msgType` shapes (seed 003 §4.4).
    Huawei,
}

/// Which of a codec's readings an uplink gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The device's raw data: Alibaba's `up_raw` (and `down_raw_reply`) topics, and every
    /// uplink of the dialects without topics (Huawei `/t/d`, LwM2M `/19/0/0`).
    Raw,
    /// A custom topic (`/{pk}/{dn}/…`, SPEC §3.2): Alibaba's `transformPayload`, or Huawei's
    /// `decode` given the topic.
    Custom,
}

/// The reading an uplink of device `dn` of product `pk` on `topic` gets from a codec of
/// `style`, if any. Alink JSON topics (`/sys/…`), upgrade and shadow topics are JSON already.
pub fn reading(style: Style, transforms: bool, pk: &str, dn: &str, topic: &str) -> Option<Reading> {
    if let Some(sys) = topic.strip_prefix("/sys/") {
        let raw = sys.ends_with("/thing/model/up_raw") || sys.ends_with("/thing/model/down_raw_reply");
        return raw.then_some(Reading::Raw);
    }
    if topic.starts_with("/ota/") || topic.starts_with("/shadow/") {
        return None;
    }
    let custom = topic.strip_prefix('/').and_then(|t| t.strip_prefix(pk)).and_then(|t| t.strip_prefix('/'));
    let custom = custom.and_then(|t| t.strip_prefix(dn)).is_some_and(|t| t.starts_with('/'));
    match (style, custom) {
        (_, false) => Some(Reading::Raw),
        (Style::Huawei, true) => Some(Reading::Custom),
        (Style::Alibaba, true) => transforms.then_some(Reading::Custom),
    }
}

/// A codec version as uploaded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodecRecord {
    pub product_key: ProductKey,
    pub version: u32,
    pub style: Style,
    /// It defines `transformPayload` (its custom topics are decoded).
    pub transforms: bool,
    #[serde(flatten)]
    pub source: Source,
    pub created_at: u64,
}

/// What an operator uploaded: stored as `"script"` or `"fields"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Script(String),
    Fields(fields::Layout),
}

impl Source {
    /// What it is, as the admin API names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Script(_) => "script",
            Source::Fields(_) => "fields",
        }
    }
}

impl CodecRecord {
    /// The reading an uplink of device `dn` on `topic` gets.
    pub fn reading(&self, dn: &str, topic: &str) -> Option<Reading> {
        reading(self.style, self.transforms, self.product_key.as_str(), dn, topic)
    }
}

/// `pk \0 'v' version (u32 BE)` → record; `pk \0 'c'` → the current version (u32 LE).
fn version_key(pk: &ProductKey, version: u32) -> Vec<u8> {
    let mut k = product_prefix(pk);
    k.push(b'v');
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn current_key(pk: &ProductKey) -> Vec<u8> {
    let mut k = product_prefix(pk);
    k.push(b'c');
    k
}

fn product_prefix(pk: &ProductKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(pk.as_str().len() + 6);
    k.extend_from_slice(pk.as_str().as_bytes());
    k.push(0);
    k
}

#[derive(Default)]
struct Versions {
    current: Option<u32>,
    all: BTreeMap<u32, Arc<CodecRecord>>,
}

/// Every product's codec versions, loaded at start and changed only through the writer.
#[derive(Default)]
pub struct Directory {
    products: RwLock<HashMap<ProductKey, Versions>>,
    /// Some product has a current codec: without one, uplinks skip the lookup.
    any_current: AtomicBool,
    /// One change at a time, so versions are numbered without gaps or twins.
    changing: tokio::sync::Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("product {0} has no codec version {1}")]
    NoVersion(ProductKey, u32),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Directory {
    pub fn load(store: &Store) -> Result<Directory, StoreError> {
        let mut products: HashMap<ProductKey, Versions> = HashMap::new();
        let mut currents = Vec::new();
        store.scan(CF_CODECS, |k, v| {
            let sep = k.iter().position(|b| *b == 0).ok_or_else(|| corrupt(k, "no product in codec key"))?;
            match &k[sep + 1..] {
                [b'v', ..] => {
                    let r: CodecRecord = json(k, v)?;
                    products.entry(r.product_key.clone()).or_default().all.insert(r.version, Arc::new(r));
                }
                [b'c'] => {
                    let pk = std::str::from_utf8(&k[..sep]).ok().and_then(|s| ProductKey::new(s).ok());
                    let version = v.try_into().ok().map(u32::from_le_bytes);
                    currents.push((pk.zip(version).ok_or_else(|| corrupt(k, "bad current codec"))?, k.to_vec()));
                }
                _ => return Err(corrupt(k, "unexpected codec key")),
            }
            Ok(())
        })?;
        for ((pk, version), k) in currents {
            let versions = products.get_mut(&pk).filter(|p| p.all.contains_key(&version));
            versions.ok_or_else(|| corrupt(&k, "current codec version is missing"))?.current = Some(version);
        }
        let any = products.values().any(|p| p.current.is_some());
        Ok(Directory { products: RwLock::new(products), any_current: AtomicBool::new(any), ..Directory::default() })
    }

    /// The product's current codec.
    pub fn current(&self, pk: &str) -> Option<Arc<CodecRecord>> {
        if !self.any_current.load(Ordering::Relaxed) {
            return None;
        }
        let products = read(&self.products);
        let p = products.get(pk)?;
        p.all.get(&p.current?).cloned()
    }

    /// Whether an uplink on `topic` from one of `pk`'s devices is decoded (on every uplink).
    pub fn decodes(&self, pk: &str, dn: &str, topic: &str) -> bool {
        self.current(pk).is_some_and(|c| c.reading(dn, topic).is_some())
    }

    pub fn version(&self, pk: &str, version: u32) -> Option<Arc<CodecRecord>> {
        read(&self.products).get(pk)?.all.get(&version).cloned()
    }

    /// The product's versions, oldest first, and which is current.
    pub fn versions(&self, pk: &str) -> (Vec<Arc<CodecRecord>>, Option<u32>) {
        match read(&self.products).get(pk) {
            Some(p) => (p.all.values().cloned().collect(), p.current),
            None => (Vec::new(), None),
        }
    }

    /// Stores a new version of the product's codec (numbered after the last), current at once
    /// when `make_current`.
    pub async fn add(
        &self,
        writer: &Writer,
        pk: &ProductKey,
        style: Style,
        transforms: bool,
        source: Source,
        make_current: bool,
    ) -> Result<Arc<CodecRecord>, DirectoryError> {
        let _one = self.changing.lock().await;
        let version = read(&self.products).get(pk).and_then(|p| p.all.keys().next_back().copied()).unwrap_or(0) + 1;
        let record = Arc::new(CodecRecord {
            product_key: pk.clone(),
            version,
            style,
            transforms,
            source,
            created_at: UnixMs::now().0,
        });
        let mut ops = vec![Op::put_json(CF_CODECS, version_key(pk, version), &*record)];
        if make_current {
            ops.push(Op::Put { cf: CF_CODECS, key: current_key(pk), value: version.to_le_bytes().to_vec() });
        }
        writer.commit(ops).await?;
        let mut products = write(&self.products);
        let p = products.entry(pk.clone()).or_default();
        p.all.insert(version, record.clone());
        if make_current {
            p.current = Some(version);
            self.any_current.store(true, Ordering::Relaxed);
        }
        Ok(record)
    }

    /// Makes `version` the product's current codec, or none.
    pub async fn set_current(
        &self,
        writer: &Writer,
        pk: &ProductKey,
        version: Option<u32>,
    ) -> Result<(), DirectoryError> {
        let _one = self.changing.lock().await;
        if let Some(v) = version
            && self.version(pk.as_str(), v).is_none()
        {
            return Err(DirectoryError::NoVersion(pk.clone(), v));
        }
        let op = match version {
            Some(v) => Op::Put { cf: CF_CODECS, key: current_key(pk), value: v.to_le_bytes().to_vec() },
            None => Op::Delete { cf: CF_CODECS, key: current_key(pk) },
        };
        writer.commit([op]).await?;
        let mut products = write(&self.products);
        products.entry(pk.clone()).or_default().current = version;
        self.any_current.store(products.values().any(|p| p.current.is_some()), Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_follow_the_vendors_topics() {
        let r = |style, transforms, topic| reading(style, transforms, "pk", "dn", topic);
        assert_eq!(r(Style::Alibaba, false, "/sys/pk/dn/thing/model/up_raw"), Some(Reading::Raw));
        assert_eq!(r(Style::Alibaba, false, "/sys/pk/dn/thing/model/down_raw_reply"), Some(Reading::Raw));
        assert_eq!(r(Style::Alibaba, false, "/sys/pk/dn/thing/event/property/post"), None);
        assert_eq!(r(Style::Alibaba, false, "/pk/dn/user/update"), None);
        assert_eq!(r(Style::Alibaba, true, "/pk/dn/user/update"), Some(Reading::Custom));
        assert_eq!(r(Style::Alibaba, true, "/pk/dnx/user/update"), Some(Reading::Raw));
        assert_eq!(r(Style::Alibaba, true, "/ota/device/inform/pk/dn"), None);
        assert_eq!(r(Style::Alibaba, false, "/t/d"), Some(Reading::Raw));
        assert_eq!(r(Style::Huawei, false, "/t/d"), Some(Reading::Raw));
        assert_eq!(r(Style::Huawei, false, "/19/0/0"), Some(Reading::Raw));
        assert_eq!(r(Style::Huawei, false, "/pk/dn/data"), Some(Reading::Custom));
        assert_eq!(r(Style::Huawei, false, "/sys/pk/dn/thing/event/property/post"), None);
    }
}

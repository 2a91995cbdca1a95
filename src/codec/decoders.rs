//! The workers that decode stored uplinks, off the socket tasks. An uplink a codec reads is
//! queued in its own batch (`CF_DECODE_QUEUE`, by message id, so in commit order); a dispatcher
//! thread hands each queued uplink to the worker of its device (one device's messages are decoded
//! in order), and the worker writes what the script read, the uplink's event and the queue
//! entry's removal as one batch. What was queued and not yet decoded when the server stopped
//! (or died) is decoded after it starts again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::watch;

use super::command::{self, Answer};
use super::engine::Engine;
use super::script::Budget;
use serde_json::{Map, Value};

use super::{CodecError, CodecRecord, Directory, Reading, Style};
use crate::clock::UnixMs;
use crate::identity::{DeviceId, DeviceName, ProductKey};
use crate::northbound::event::{Prepared, Record};
use crate::northbound::{EventKind, Wanted};
use crate::shadow::document::{Section, Shadow};
use crate::shadow::{self, Change, Owner};
use crate::store::records::{DecodeFailure, DecodedRecord, MessageRecord};
use crate::store::{CF_DECODE_QUEUE, CF_DECODED, CF_MESSAGES, MessageId, Op, Store, Writer, message_key};
use crate::telemetry::metric;

/// Queued uplinks read per scan of the queue.
const SCAN: usize = 256;
/// Uplinks handed to a worker ahead of it; beyond, the dispatcher waits (the rest stay queued
/// in the store, not in memory).
const AHEAD: usize = 1024;

/// An uplink waiting for its codec.
struct Queued {
    device: DeviceId,
    message: MessageId,
    product_key: String,
    device_name: String,
    /// Its event's outbox record, as queued.
    event: Vec<u8>,
}

/// What the decoders ask of the command service, which the codec does not know.
pub trait Downlink: Send + Sync {
    /// `device` answered a command: `answer`, read from the uplink `raw` as `decoded`. Called
    /// before the decode's own batch is queued, so a crash between the two repeats the answer
    /// (which then changes nothing) rather than loses it.
    fn answered(&self, store: &Store, device: DeviceId, answer: &Answer, raw: &[u8], decoded: &serde_json::Value);

    /// Queues on `topic` the JSON commands `encode` makes, given each a fresh command id, unless
    /// `device` still has one open there (it has not had the last ones yet).
    fn propose(&self, device: DeviceId, topic: &str, encode: &mut dyn FnMut(&dyn Fn() -> u64) -> Vec<Proposed>);
}

/// A command the server makes itself, encoded by the device's codec.
pub struct Proposed {
    pub id: u64,
    pub codec_version: u32,
    /// What the script encoded.
    pub message: serde_json::Value,
    pub payload: Vec<u8>,
}

/// What the decoders share.
#[derive(Clone)]
pub struct Shared {
    pub store: Store,
    pub writer: Writer,
    pub directory: Arc<Directory>,
    pub wanted: Arc<Wanted>,
    pub budget: Budget,
    pub downlink: Arc<dyn Downlink>,
}

/// Starts `workers` decoding threads and their dispatcher; they end once `stop` flips.
pub fn start(
    shared: Shared,
    workers: usize,
    stop: watch::Receiver<bool>,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::new();
    let mut senders = Vec::new();
    for i in 0..workers.max(1) {
        let (tx, rx) = sync_channel::<Queued>(AHEAD);
        // Built on its thread: a compiled script stays on the thread that compiled it.
        let shared = shared.clone();
        let run = move || Worker { shared, scripts: HashMap::new() }.run(rx);
        handles.push(std::thread::Builder::new().name(format!("nbhub-codec-{i}")).spawn(run)?);
        senders.push(tx);
    }
    let (store, writer) = (shared.store.clone(), shared.writer.clone());
    let decodes = writer.decodes();
    handles.push(
        std::thread::Builder::new()
            .name("nbhub-codec-queue".into())
            .spawn(move || dispatch(store, writer, decodes, senders, stop, runtime))?,
    );
    Ok(handles)
}

/// Hands queued uplinks to their workers as they are committed, oldest first.
fn dispatch(
    store: Store,
    writer: Writer,
    mut decodes: watch::Receiver<u64>,
    workers: Vec<SyncSender<Queued>>,
    mut stop: watch::Receiver<bool>,
    runtime: tokio::runtime::Handle,
) {
    // In memory only: after a restart everything still queued is handed out again.
    let mut next = 0u64;
    loop {
        if *stop.borrow() {
            return;
        }
        // Marked seen before the scan: a commit after it wakes the wait below.
        decodes.borrow_and_update();
        let queued = store.scan_from(CF_DECODE_QUEUE, &next.to_be_bytes(), SCAN, |k, v| {
            let id = u64::from_be_bytes(k.try_into().map_err(|_| crate::store::corrupt(k, "bad queue key"))?);
            Ok((id, v.to_vec()))
        });
        let queued = match queued {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the decode queue; trying again in a second");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        if queued.is_empty() {
            let woke = runtime.block_on(async {
                tokio::select! {
                    r = decodes.changed() => r.is_ok(),
                    _ = stop.changed() => false,
                }
            });
            if !woke {
                return;
            }
            continue;
        }
        for (id, event) in queued {
            next = id + 1;
            let Some((EventKind::Uplink, _, Record::Uplink { device, message, product_key, device_name })) =
                Record::decode(&event)
            else {
                tracing::error!(message = id, "unreadable decode queue entry; dropped");
                writer.record([Op::Delete { cf: CF_DECODE_QUEUE, key: id.to_be_bytes().to_vec() }]);
                continue;
            };
            let job = Queued { device, message, product_key, device_name, event };
            if workers[(device.0 % workers.len() as u64) as usize].send(job).is_err() {
                return;
            }
        }
    }
}

struct Worker {
    shared: Shared,
    /// Each product's compiled current codec, by version.
    scripts: HashMap<String, (u32, Engine)>,
}

impl Worker {
    fn run(&mut self, jobs: Receiver<Queued>) {
        while let Ok(job) = jobs.recv() {
            let mut ops = vec![Op::Delete { cf: CF_DECODE_QUEUE, key: job.message.0.to_be_bytes().to_vec() }];
            let key = message_key(job.device, job.message);
            let stored = match self.shared.store.get(CF_MESSAGES, &key) {
                Ok(stored) => stored,
                // Left queued: decoded after the next start.
                Err(e) => {
                    tracing::error!(error = %e, message = job.message.0, "cannot read a message to decode");
                    continue;
                }
            };
            // Gone with its device (or past retention): nothing to read, nothing to announce.
            if let Some(m) = stored.as_deref().and_then(MessageRecord::decode) {
                if let Some(codec) = self.shared.directory.current(&job.product_key)
                    && let Some(reading) = codec.reading(&job.device_name, &m.topic)
                {
                    let outcome = self.read(&codec, reading, &m);
                    if let Ok(decoded) = &outcome {
                        if let Some(answer) = command::answer(codec.style, &m.topic, decoded) {
                            self.shared.downlink.answered(&self.shared.store, job.device, &answer, &m.payload, decoded);
                        }
                        if let Some(reported) = command::properties(codec.style, decoded) {
                            ops.extend(self.report(&codec, &job, reported, m.received_at));
                        }
                    }
                    let record = DecodedRecord {
                        received_at: m.received_at,
                        codec_version: codec.version,
                        outcome: outcome.map_err(|e| DecodeFailure { kind: e.kind().into(), message: e.to_string() }),
                    };
                    ops.push(Op::Put { cf: CF_DECODED, key: key.to_vec(), value: record.encode() });
                }
                if self.shared.wanted.wants(EventKind::Uplink) {
                    ops.push(Op::Event(Box::new(Prepared(job.event))));
                }
            }
            self.shared.writer.record(ops);
        }
    }

    /// `job`'s device reported `properties` at `at`: its shadow's `reported` section takes them
    /// (the write returned), and what `desired` still asks beyond them goes to a device of a
    /// Huawei-style codec as commands the script encodes, on each report until one matches.
    fn report(&mut self, codec: &CodecRecord, job: &Queued, properties: Map<String, Value>, at: UnixMs) -> Option<Op> {
        let owner = Owner {
            id: job.device,
            product_key: ProductKey::new(&job.product_key).ok()?,
            device_name: DeviceName::new(&job.device_name).ok()?,
        };
        let changes = [(Section::Reported, Some(properties))];
        let edit = move |s: &mut Shadow| s.update(&changes, None, at.0);
        // The delta as it will be once this change is written (a change still queued ahead of
        // it is missed here and seen at the next report).
        let delta = match shadow::get(&self.shared.store, job.device) {
            Ok(mut predicted) => edit(&mut predicted).map(|()| predicted.delta()).unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %e, device = %owner.device_name, "cannot read a shadow");
                Map::new()
            }
        };
        if codec.style == Style::Huawei && !delta.is_empty() {
            let topic = shadow::device::get_topic(&owner.product_key, &owner.device_name);
            let Worker { shared, scripts } = self;
            let mut script = scripts.get_mut(codec.product_key.as_str()).map(|(_, s)| s);
            shared.downlink.propose(job.device, &topic, &mut |next_id| {
                let Some(script) = script.as_deref_mut() else { return Vec::new() };
                delta
                    .iter()
                    .filter_map(|(service, wanted)| {
                        let id = next_id();
                        let message =
                            command::outgoing(Style::Huawei, id, &command::property_set(service, wanted)?).ok()?;
                        match script.write(&message) {
                            Ok(payload) if !payload.is_empty() => {
                                Some(Proposed { id, codec_version: codec.version, message, payload })
                            }
                            Ok(_) => None,
                            Err(e) => {
                                tracing::debug!(service, error = %e, "codec cannot encode a shadow delta");
                                None
                            }
                        }
                    })
                    .collect()
            });
        }
        let announce = self.shared.wanted.wants(EventKind::Shadow);
        Some(Op::Revise(Change::new(owner, at, announce, edit)))
    }

    /// What the product's codec reads from `m`, counted; a runtime stopped by its budget is
    /// dropped so the next message gets a fresh one.
    fn read(
        &mut self,
        codec: &CodecRecord,
        reading: Reading,
        m: &MessageRecord,
    ) -> Result<serde_json::Value, CodecError> {
        let pk = codec.product_key.as_str();
        if self.scripts.get(pk).is_none_or(|(v, _)| *v != codec.version) {
            let script = Engine::build(&codec.source, self.shared.budget);
            match script {
                Ok(s) => {
                    self.scripts.insert(pk.to_string(), (codec.version, s));
                }
                Err(e) => {
                    metrics::counter!(metric::CODEC_DECODED, "outcome" => e.kind()).increment(1);
                    return Err(e);
                }
            }
        }
        let (_, script) = self.scripts.get_mut(pk).expect("compiled above");
        let started = Instant::now();
        let result = script.read(reading, &m.topic, &m.payload);
        metrics::histogram!(metric::CODEC_SECONDS).record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        metrics::counter!(metric::CODEC_DECODED, "outcome" => outcome).increment(1);
        if let Err(e) = &result {
            tracing::debug!(product_key = pk, version = codec.version, error = %e, "codec failed on an uplink");
            if e.stops_runtime() {
                self.scripts.remove(pk);
                metrics::counter!(metric::CODEC_RUNTIMES_REBUILT).increment(1);
            }
        }
        result
    }
}

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
use super::script::{Budget, Script};
use super::{CodecError, CodecRecord, Directory, Reading};
use crate::identity::DeviceId;
use crate::northbound::event::{Prepared, Record};
use crate::northbound::{EventKind, Wanted};
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

/// Who settles the commands devices answer in their uplinks (the command service); the codec
/// only reads the answer.
pub trait Answers: Send + Sync {
    /// `device` answered a command: `answer`, read from the uplink `raw` as `decoded`. Called
    /// before the decode's own batch is queued, so a crash between the two repeats the answer
    /// (which then changes nothing) rather than loses it.
    fn answered(&self, store: &Store, device: DeviceId, answer: &Answer, raw: &[u8], decoded: &serde_json::Value);
}

/// What the decoders share.
#[derive(Clone)]
pub struct Shared {
    pub store: Store,
    pub writer: Writer,
    pub directory: Arc<Directory>,
    pub wanted: Arc<Wanted>,
    pub budget: Budget,
    pub answers: Arc<dyn Answers>,
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
    scripts: HashMap<String, (u32, Script)>,
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
                    if let Ok(decoded) = &outcome
                        && let Some(answer) = command::answer(codec.style, &m.topic, decoded)
                    {
                        self.shared.answers.answered(&self.shared.store, job.device, &answer, &m.payload, decoded);
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
            let script = Script::compile(&codec.script, self.shared.budget);
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

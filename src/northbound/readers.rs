//! Who reads the outbox: webhook subscriptions and streaming outlets, each with the event kinds it
//! takes and the last event it took. Together they decide which kinds are appended at all
//! ([`Wanted`]: nothing for a kind nobody reads) and how far the outbox may be trimmed (below the
//! slowest reader, all of it when nobody reads).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::event::{EventKind, Wanted};
use super::stored;
use super::webhooks::WebhookId;
use crate::store::Writer;
use crate::sync::lock;

/// Events every reader has taken before the outbox is trimmed.
const TRIM_STEP: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reader {
    Webhook(WebhookId),
    /// A streaming outlet, by its name (`nats`, `mqtt`).
    Outlet(&'static str),
}

struct Position {
    kinds: Vec<EventKind>,
    /// The last event id taken.
    cursor: u64,
}

pub struct Readers {
    writer: Writer,
    wanted: Arc<Wanted>,
    readers: Mutex<HashMap<Reader, Position>>,
    /// Outbox ids below this are already trimmed.
    trimmed: Mutex<u64>,
}

impl Readers {
    pub fn new(writer: Writer, wanted: Arc<Wanted>) -> Arc<Readers> {
        Arc::new(Readers { writer, wanted, readers: Mutex::new(HashMap::new()), trimmed: Mutex::new(0) })
    }

    /// Counts `reader` from `cursor` on: the outbox keeps what it has not taken, and its kinds
    /// are appended from now on.
    pub fn add(&self, reader: Reader, kinds: &[EventKind], cursor: u64) {
        let mut readers = lock(&self.readers);
        readers.insert(reader, Position { kinds: kinds.to_vec(), cursor });
        self.update_wanted(&readers);
    }

    pub fn remove(&self, reader: Reader) {
        {
            let mut readers = lock(&self.readers);
            readers.remove(&reader);
            self.update_wanted(&readers);
        }
        self.trim();
    }

    /// The last event id `reader` took.
    pub fn cursor(&self, reader: Reader) -> Option<u64> {
        lock(&self.readers).get(&reader).map(|p| p.cursor)
    }

    /// `reader` took every event up to `cursor` (its own record of that is the caller's to write).
    pub fn advanced(&self, reader: Reader, cursor: u64) {
        if let Some(p) = lock(&self.readers).get_mut(&reader) {
            p.cursor = cursor;
        }
        self.trim();
    }

    /// What is appended follows the readers; set under their lock, so concurrent changes cannot
    /// leave a stale set behind.
    fn update_wanted(&self, readers: &HashMap<Reader, Position>) {
        self.wanted.set(readers.values().flat_map(|p| p.kinds.iter().copied()));
    }

    /// Drops outbox events every reader has taken, in steps of [`TRIM_STEP`] so range deletions
    /// stay few.
    fn trim(&self) {
        let (below, read) = match lock(&self.readers).values().map(|p| p.cursor).min() {
            Some(min) => (min + 1, true),
            None => (*self.writer.events().borrow() + 1, false),
        };
        let mut trimmed = lock(&self.trimmed);
        if below > *trimmed && (below - *trimmed >= TRIM_STEP || !read) {
            *trimmed = below;
            self.writer.record([stored::trim_outbox(below)]);
        }
    }
}

//! Messages whose answer waits for a durable write: what each gets once its write ends, under
//! the ticket the shell carries to the writer and back.

use std::collections::HashMap;
use std::net::SocketAddr;

use smallvec::SmallVec;

use super::message::MessageType;
use super::resource::{ExchangeKey, Outgoing, Response, Undo};

/// Names one message waiting for its write. The shell passes it through the write queue as a
/// number and hands it back; a number no message waits under finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

impl From<Ticket> for u64 {
    fn from(t: Ticket) -> u64 {
        t.0
    }
}

impl From<u64> for Ticket {
    fn from(n: u64) -> Ticket {
        Ticket(n)
    }
}

/// What a message waiting for a durable write gets once it is durable.
pub enum Answer {
    Response {
        response: Response,
        separate: bool,
        receipt: Option<ExchangeKey>,
        follow_up: Option<Outgoing>,
    },
    /// A notification: an Empty ACK for a CON, nothing for a NON; then `follow_up`.
    Notification {
        con: bool,
        follow_up: Option<Outgoing>,
    },
}

/// A message whose answer waits for a durable write.
pub struct Waiting {
    pub peer: SocketAddr,
    pub mtype: MessageType,
    pub mid: u16,
    pub token: SmallVec<[u8; 8]>,
    pub answer: Answer,
    /// Run if the write fails, so nothing in memory claims what was not stored.
    pub undo: Option<Undo>,
}

#[derive(Default)]
pub struct Pending {
    waiting: HashMap<Ticket, Waiting>,
    next: u64,
}

impl Pending {
    pub fn insert(&mut self, w: Waiting) -> Ticket {
        self.next += 1;
        let ticket = Ticket(self.next);
        self.waiting.insert(ticket, w);
        ticket
    }

    pub fn remove(&mut self, ticket: Ticket) -> Option<Waiting> {
        self.waiting.remove(&ticket)
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

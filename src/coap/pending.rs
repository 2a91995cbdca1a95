//! Messages whose answer waits for a durable write: what each gets once its write ends, under
//! the ticket the shell carries to the writer and back.

use std::collections::VecDeque;
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

/// Tickets are handed out in order and the writer commits in order, so the waiting messages
/// form a queue: slot `i` holds ticket `first + i`, and a ticket is found by subtraction instead
/// of a hash lookup on every uplink. A slot freed out of order stays empty until the ones before
/// it are taken; every write ends (durable, failed, or the writer gone), so none is held forever.
#[derive(Default)]
pub struct Pending {
    slots: VecDeque<Option<Waiting>>,
    /// The ticket in the first slot.
    first: u64,
    len: usize,
}

impl Pending {
    pub fn insert(&mut self, w: Waiting) -> Ticket {
        let ticket = Ticket(self.first + self.slots.len() as u64);
        self.slots.push_back(Some(w));
        self.len += 1;
        ticket
    }

    pub fn remove(&mut self, ticket: Ticket) -> Option<Waiting> {
        let at = usize::try_from(ticket.0.checked_sub(self.first)?).ok()?;
        let w = self.slots.get_mut(at)?.take()?;
        self.len -= 1;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.first += 1;
        }
        Some(w)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(mid: u16) -> Waiting {
        Waiting {
            peer: "10.0.0.1:5683".parse().unwrap(),
            mtype: MessageType::Con,
            mid,
            token: SmallVec::new(),
            answer: Answer::Notification { con: true, follow_up: None },
            undo: None,
        }
    }

    #[test]
    fn tickets_find_their_message_in_any_order_and_never_another() {
        let mut p = Pending::default();
        let t: Vec<Ticket> = (0..4).map(|i| p.insert(waiting(i))).collect();
        assert_eq!(p.len(), 4);
        assert_eq!(p.remove(t[2]).map(|w| w.mid), Some(2), "out of order");
        assert!(p.remove(t[2]).is_none(), "taken once");
        assert_eq!(p.remove(t[0]).map(|w| w.mid), Some(0));
        assert_eq!(p.remove(t[1]).map(|w| w.mid), Some(1));
        let later = p.insert(waiting(9));
        assert_eq!(p.remove(t[3]).map(|w| w.mid), Some(3));
        assert_eq!(p.remove(later).map(|w| w.mid), Some(9));
        assert!(p.is_empty());
        // A ticket from before, or never handed out, finds nothing.
        assert!(p.remove(t[0]).is_none());
        assert!(p.remove(Ticket::from(1_000)).is_none());
        assert!(p.remove(Ticket::from(u64::MAX)).is_none());
    }
}

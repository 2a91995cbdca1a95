//! The CON reliability layer (RFC 7252 §4.2) for messages the server sends on its own: each CON
//! is kept until its ACK or RST, retransmitted with exponential back-off, and given up after its
//! last retransmission or its deadline, whichever comes first. Model: Californium's
//! `ReliabilityLayer`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::message::{Code, Message};
use super::resource::{ExchangeKey, Retransmit};

/// A CON we sent (a separate response, or a request of our own) not acknowledged yet.
struct OutgoingCon {
    data: Bytes,
    attempts: u32,
    max_retransmit: u32,
    timeout: Duration,
    next_at: Instant,
    give_up_at: Instant,
    /// Whom to tell how it ended.
    exchange: Option<ExchangeKey>,
}

/// What came due in [`Reliability::due`].
pub enum Due {
    Retransmit {
        peer: SocketAddr,
        data: Bytes,
    },
    /// Every retransmission went unanswered.
    GaveUp {
        exchange: Option<ExchangeKey>,
    },
}

/// The kept CON was not sent: `max_outgoing` are already awaiting an ACK.
pub struct Full;

pub struct Reliability {
    outgoing: HashMap<(SocketAddr, u16), OutgoingCon>,
    /// Retransmission schedule; stale entries (already acknowledged) are skipped when popped.
    schedule: BinaryHeap<Reverse<(Instant, SocketAddr, u16)>>,
    max_outgoing: usize,
}

impl Reliability {
    pub fn new(max_outgoing: usize) -> Reliability {
        Reliability { outgoing: HashMap::new(), schedule: BinaryHeap::new(), max_outgoing }
    }

    /// CONs awaiting an ACK.
    pub fn len(&self) -> usize {
        self.outgoing.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outgoing.is_empty()
    }

    /// Keeps the CON `data` (message id `mid`) sent at `now` for retransmission. Every CON kept
    /// costs memory until it is acknowledged or given up, so beyond the limit it is refused.
    pub fn keep(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        mid: u16,
        data: Bytes,
        retransmit: Retransmit,
        exchange: Option<ExchangeKey>,
    ) -> Result<(), Full> {
        if self.outgoing.len() >= self.max_outgoing {
            return Err(Full);
        }
        let timeout = retransmit.ack_timeout;
        let give_up_at = now + retransmit.give_up_after;
        let next_at = (now + timeout).min(give_up_at);
        let con = OutgoingCon {
            data,
            attempts: 0,
            max_retransmit: retransmit.max_retransmit,
            timeout,
            next_at,
            give_up_at,
            exchange,
        };
        self.outgoing.insert((peer, mid), con);
        self.schedule.push(Reverse((next_at, peer, mid)));
        Ok(())
    }

    /// An ACK or RST from `peer`: if it answers one of our CONs, that CON is done and its
    /// exchange (`Some(None)` for one nobody follows) is returned. A piggybacked response must
    /// also carry the CON's token (RFC 7252 §5.3.2), which someone guessing message ids does not
    /// know.
    pub fn settle(&mut self, peer: SocketAddr, msg: &Message<'_>) -> Option<Option<ExchangeKey>> {
        let con = self.outgoing.get(&(peer, msg.mid))?;
        let tkl = (con.data[0] & 0x0f) as usize;
        if msg.code != Code::EMPTY && con.data.get(4..4 + tkl) != Some(msg.token) {
            return None;
        }
        self.outgoing.remove(&(peer, msg.mid)).map(|c| c.exchange)
    }

    /// The retransmissions and give-ups due at `now`, in order.
    pub fn due(&mut self, now: Instant, out: &mut Vec<Due>) {
        while let Some(Reverse((at, peer, mid))) = self.schedule.peek().copied() {
            if at > now {
                break;
            }
            self.schedule.pop();
            let Some(con) = self.outgoing.get_mut(&(peer, mid)) else { continue };
            if con.next_at != at {
                continue;
            }
            if con.attempts >= con.max_retransmit || now >= con.give_up_at {
                let exchange = con.exchange;
                self.outgoing.remove(&(peer, mid));
                out.push(Due::GaveUp { exchange });
                continue;
            }
            con.attempts += 1;
            con.timeout *= 2;
            con.next_at = (now + con.timeout).min(con.give_up_at);
            out.push(Due::Retransmit { peer, data: con.data.clone() });
            self.schedule.push(Reverse((con.next_at, peer, mid)));
        }
    }

    /// When [`Reliability::due`] next has something to do.
    pub fn next_due(&self) -> Option<Instant> {
        self.schedule.peek().map(|Reverse((at, _, _))| *at)
    }
}

//! One device's open commands, in creation order, and the rules for handing them out: strictly in
//! order, one exchange in flight at a time, the next only after the previous was acknowledged
//! (SPEC §5). Times are Unix milliseconds passed in; exchanges are the endpoint's keys.

use std::collections::VecDeque;

use super::command::{CommandId, CommandRecord, CommandStatus};
use crate::coap::resource::ExchangeKey;

/// More PENDING commands than a device may have (API: 429).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the device already has {0} pending commands")]
pub struct QueueFull(pub usize);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("command {0} is not open")]
    NotFound(CommandId),
    #[error("command {0} is {1} and can no longer be canceled")]
    NotPending(CommandId, &'static str),
}

/// How an exchange carrying commands ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Acknowledged without a result.
    Delivered,
    /// Acknowledged with a 2.xx result.
    Succeeded(Vec<u8>),
    /// Refused (4.xx/5.xx, or RST).
    Failed { reason: String, result: Option<Vec<u8>> },
    /// Never acknowledged.
    TimedOut,
}

struct Open {
    record: CommandRecord,
    /// The exchange it was last sent in, while that exchange is live. None for a SENT command
    /// restored after a restart: it is sent again when the device next wakes.
    exchange: Option<ExchangeKey>,
}

#[derive(Default)]
pub struct Queue {
    open: VecDeque<Open>,
}

impl Queue {
    /// Restores an open command read from the store (in id order).
    pub fn restore(&mut self, record: CommandRecord) {
        debug_assert!(record.status.is_open());
        self.open.push_back(Open { record, exchange: None });
    }

    pub fn pending(&self) -> usize {
        self.open.iter().filter(|o| o.record.status == CommandStatus::Pending).count()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub fn push(&mut self, record: CommandRecord, max_pending: usize) -> Result<(), QueueFull> {
        if self.pending() >= max_pending {
            return Err(QueueFull(max_pending));
        }
        self.open.push_back(Open { record, exchange: None });
        Ok(())
    }

    pub fn get(&self, id: CommandId) -> Option<&CommandRecord> {
        self.open.iter().find(|o| o.record.id == id).map(|o| &o.record)
    }

    /// The open commands, oldest first.
    pub fn records(&self) -> impl Iterator<Item = &CommandRecord> {
        self.open.iter().map(|o| &o.record)
    }

    /// Whether an exchange carrying commands is under way.
    pub fn in_flight(&self) -> bool {
        self.open.iter().any(|o| o.exchange.is_some())
    }

    /// Ends PENDING commands past their expiry and SENT ones without a live exchange (restored
    /// after a restart) past `sent_deadline_ms` after sending; each ended record is appended to
    /// `changed`.
    pub fn expire(&mut self, now: u64, sent_deadline_ms: u64, changed: &mut Vec<CommandRecord>) {
        self.open.retain_mut(|o| {
            let r = &mut o.record;
            let end = match r.status {
                CommandStatus::Pending => now >= r.expires_at,
                CommandStatus::Sent => {
                    o.exchange.is_none() && now >= r.sent_at.unwrap_or(0).saturating_add(sent_deadline_ms)
                }
                _ => true,
            };
            if end {
                if r.status == CommandStatus::Sent {
                    r.set(CommandStatus::Timeout, now);
                    r.reason = Some("not acknowledged before the server restarted, nor since".into());
                } else {
                    r.expire(now);
                }
                changed.push(r.clone());
            }
            !end
        });
    }

    /// When [`Queue::expire`] next has something to do for a PENDING command.
    pub fn next_expiry(&self) -> Option<u64> {
        self.open.iter().filter(|o| o.record.status == CommandStatus::Pending).map(|o| o.record.expires_at).min()
    }

    /// The next command to send, unless an exchange is in flight: the oldest open one, marked SENT
    /// under `exchange` (a SENT one restored after a restart goes again). Expired ones are ended
    /// first and appended to `changed`, as is the one handed out.
    pub fn send_next(
        &mut self,
        now: u64,
        exchange: ExchangeKey,
        sent_deadline_ms: u64,
        changed: &mut Vec<CommandRecord>,
    ) -> Option<CommandRecord> {
        self.expire(now, sent_deadline_ms, changed);
        if self.in_flight() {
            return None;
        }
        let o = self.open.front_mut()?;
        o.exchange = Some(exchange);
        o.record.set(CommandStatus::Sent, now);
        changed.push(o.record.clone());
        Some(o.record.clone())
    }

    /// Up to `n` commands for an Alibaba `/pull`, oldest first, as many as fit in `max_bytes` of
    /// answer (always at least one), marked SENT under `exchange`. Commands of an earlier pull not
    /// yet acknowledged go again: the device asking anew means it lost that answer.
    pub fn pull(
        &mut self,
        now: u64,
        n: usize,
        max_bytes: usize,
        exchange: ExchangeKey,
        sent_deadline_ms: u64,
        changed: &mut Vec<CommandRecord>,
    ) -> Vec<CommandRecord> {
        self.expire(now, sent_deadline_ms, changed);
        let mut out = Vec::new();
        let mut bytes = 0;
        for o in self.open.iter_mut().take(n) {
            // Its entry in the answer: `{"id":"…","topic":"…","payload":"<base64>"}`.
            bytes += o.record.payload.len().div_ceil(3) * 4 + o.record.topic.len() + 48;
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            o.exchange = Some(exchange);
            o.record.set(CommandStatus::Sent, now);
            changed.push(o.record.clone());
            out.push(o.record.clone());
        }
        out
    }

    /// Applies how `exchange` ended to the commands it carried; returns them as changed. An
    /// exchange superseded by a newer one (a repeated pull) changes nothing.
    pub fn settle(&mut self, exchange: ExchangeKey, settlement: &Settlement, now: u64) -> Vec<CommandRecord> {
        let mut changed = Vec::new();
        self.open.retain_mut(|o| {
            if o.exchange != Some(exchange) {
                return true;
            }
            let r = &mut o.record;
            match settlement {
                Settlement::Delivered => r.set(CommandStatus::Delivered, now),
                Settlement::Succeeded(result) => {
                    r.set(CommandStatus::Delivered, now);
                    r.set(CommandStatus::Successful, now);
                    r.result = Some(result.clone());
                }
                Settlement::Failed { reason, result } => {
                    r.set(CommandStatus::Failed, now);
                    r.reason = Some(reason.clone());
                    r.result = result.clone();
                }
                Settlement::TimedOut => {
                    r.set(CommandStatus::Timeout, now);
                    r.reason = Some("the device did not acknowledge it".into());
                }
            }
            changed.push(r.clone());
            false
        });
        changed
    }

    /// Takes out SENT command `id`, answered by its device before its ACK was heard.
    pub fn take_sent(&mut self, id: CommandId) -> Option<CommandRecord> {
        let i = self.open.iter().position(|o| o.record.id == id && o.record.status == CommandStatus::Sent)?;
        self.open.remove(i).map(|o| o.record)
    }

    /// Puts the commands of an exchange that never went out back to PENDING, as they were.
    pub fn unsend(&mut self, exchange: ExchangeKey) {
        for o in self.open.iter_mut().filter(|o| o.exchange == Some(exchange)) {
            o.exchange = None;
            o.record.status = CommandStatus::Pending;
            o.record.sent_at = None;
        }
    }

    /// Puts back a command whose cancellation could not be stored, in its place by id.
    pub fn reinstate(&mut self, record: CommandRecord) {
        let at = self.open.iter().position(|o| o.record.id > record.id).unwrap_or(self.open.len());
        self.open.insert(at, Open { record, exchange: None });
    }

    /// Cancels a PENDING command.
    pub fn cancel(&mut self, id: CommandId, now: u64) -> Result<CommandRecord, CancelError> {
        let i = self.open.iter().position(|o| o.record.id == id).ok_or(CancelError::NotFound(id))?;
        if self.open[i].record.status != CommandStatus::Pending {
            return Err(CancelError::NotPending(id, self.open[i].record.status.as_str()));
        }
        let mut r = self.open.remove(i).expect("position found").record;
        r.set(CommandStatus::Canceled, now);
        Ok(r)
    }

    /// Removes everything (the device is deleted); the records as they were.
    pub fn drain(&mut self) -> impl Iterator<Item = CommandRecord> + '_ {
        self.open.drain(..).map(|o| o.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(n: u64) -> ExchangeKey {
        ExchangeKey::from(n)
    }
    use crate::downlink::command::{NewRecord, SendStrategy};
    use crate::identity::{DeviceId, DeviceName, ProductKey};

    fn cmd(id: u64, strategy: SendStrategy, expires_at: u64) -> CommandRecord {
        let device = (DeviceId(1), ProductKey::new("p").unwrap(), DeviceName::new("d").unwrap());
        let new =
            NewRecord { payload: vec![id as u8], topic: "/p/d/user/get".into(), strategy, created_at: 0, expires_at };
        CommandRecord::pending(CommandId(id), device, new)
    }

    const DEADLINE: u64 = 180_000;

    #[test]
    fn one_at_a_time_in_order() {
        let mut q = Queue::default();
        for id in 1..=3 {
            q.push(cmd(id, SendStrategy::Delay, 1_000_000), 20).unwrap();
        }
        let mut changed = Vec::new();
        let first = q.send_next(10, x(100), DEADLINE, &mut changed).unwrap();
        assert_eq!((first.id, first.status, first.sent_at), (CommandId(1), CommandStatus::Sent, Some(10)));
        assert!(q.send_next(11, x(101), DEADLINE, &mut changed).is_none(), "one in flight at a time");
        let done = q.settle(x(100), &Settlement::Succeeded(b"ok".to_vec()), 20);
        assert_eq!(done[0].status, CommandStatus::Successful);
        assert_eq!((done[0].delivered_at, done[0].finished_at), (Some(20), Some(20)));
        assert_eq!(q.send_next(21, x(102), DEADLINE, &mut changed).unwrap().id, CommandId(2));
        assert!(q.settle(x(999), &Settlement::Delivered, 22).is_empty(), "unknown exchange");
        assert_eq!(q.settle(x(102), &Settlement::TimedOut, 23)[0].status, CommandStatus::Timeout);
        assert_eq!(q.send_next(24, x(103), DEADLINE, &mut changed).unwrap().id, CommandId(3));
    }

    #[test]
    fn limits_expiry_and_cancel() {
        let mut q = Queue::default();
        q.push(cmd(1, SendStrategy::Delay, 100), 2).unwrap();
        q.push(cmd(2, SendStrategy::Immediately, 100), 2).unwrap();
        assert_eq!(q.push(cmd(3, SendStrategy::Delay, 500), 2), Err(QueueFull(2)));
        q.push(cmd(3, SendStrategy::Delay, 500), 3).unwrap();
        let canceled = q.cancel(CommandId(3), 50).unwrap();
        assert_eq!(canceled.status, CommandStatus::Canceled);
        q.reinstate(cmd(3, SendStrategy::Delay, 500));
        assert_eq!(q.cancel(CommandId(3), 50).unwrap(), canceled);
        assert_eq!(q.cancel(CommandId(3), 50), Err(CancelError::NotFound(CommandId(3))));
        let mut changed = Vec::new();
        assert!(q.send_next(100, x(7), DEADLINE, &mut changed).is_none());
        let states: Vec<_> = changed.iter().map(|r| r.status).collect();
        assert_eq!(states, [CommandStatus::Expired, CommandStatus::Failed]);
        assert!(q.is_empty());
    }

    #[test]
    fn restored_sent_command_goes_again_or_times_out() {
        let mut q = Queue::default();
        let mut sent = cmd(1, SendStrategy::Delay, 1_000_000);
        sent.set(CommandStatus::Sent, 1_000);
        q.restore(sent.clone());
        q.push(cmd(2, SendStrategy::Delay, 1_000_000), 20).unwrap();
        assert!(q.cancel(CommandId(1), 2_000).is_err(), "a SENT command cannot be canceled");
        let mut changed = Vec::new();
        assert_eq!(q.send_next(2_000, x(5), DEADLINE, &mut changed).unwrap().id, CommandId(1));
        let mut q = Queue::default();
        q.restore(sent);
        q.expire(1_000 + DEADLINE, DEADLINE, &mut changed);
        assert_eq!(changed.last().unwrap().status, CommandStatus::Timeout);
    }

    #[test]
    fn a_repeated_pull_supersedes_the_earlier_one() {
        let mut q = Queue::default();
        for id in 1..=3 {
            q.push(cmd(id, SendStrategy::Delay, 1_000_000), 20).unwrap();
        }
        let mut changed = Vec::new();
        let ids = |v: Vec<CommandRecord>| v.into_iter().map(|r| r.id.0).collect::<Vec<_>>();
        assert_eq!(ids(q.pull(1, 2, 10_000, x(10), DEADLINE, &mut changed)), [1, 2]);
        assert_eq!(ids(q.pull(2, 10, 10_000, x(11), DEADLINE, &mut changed)), [1, 2, 3]);
        assert!(q.settle(x(10), &Settlement::TimedOut, 3).is_empty());
        q.unsend(x(11));
        assert_eq!(q.get(CommandId(1)).map(|r| (r.status, r.sent_at)), Some((CommandStatus::Pending, None)));
        assert_eq!(ids(q.pull(2, 10, 10, x(12), DEADLINE, &mut Vec::new())), [1], "one always fits");
        assert_eq!(ids(q.pull(2, 10, 10_000, x(11), DEADLINE, &mut Vec::new())), [1, 2, 3]);
        assert_eq!(q.settle(x(11), &Settlement::Delivered, 4).len(), 3);
        assert!(q.is_empty());
    }
}

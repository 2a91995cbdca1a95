//! Tokens handed out by `/auth` and what they stand for, sharded by token so concurrent sockets
//! rarely meet on a lock.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, MutexGuard};

use crate::auth::cipher::SessionKey;
use crate::auth::replay::{ReplayWindow, Verdict};
use crate::clock::UnixMs;
use crate::identity::{DeviceId, Token};
use crate::net::PortFamily;
use crate::registry::device::Device;
use crate::store::{CF_REPLAY, CF_SESSIONS, Op, Store, StoreError, corrupt, json};
use crate::sync::Sharded;

/// How often (at most) a session's sliding expiry is written back: a token's lifetime is days,
/// so an hour of staleness after a crash costs nothing and saves a write per uplink.
pub const LAST_USED_WRITE_INTERVAL_MS: u64 = 3_600_000;

/// How a session's requests are answered (the `/auth` body's `ackMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Result piggybacked on the ACK.
    #[default]
    Piggybacked,
    /// Empty ACK at once, the result later as a separate CON response.
    Separate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub device_id: DeviceId,
    pub family: PortFamily,
    /// The `random` of a 5682 session, from which its AES key is derived.
    pub random: Option<String>,
    pub seq_offset: u64,
    pub ack_mode: AckMode,
    pub created_at: u64,
    pub last_used: u64,
    /// Set when a newer `/auth` replaced this token: it then ends at this time regardless of use.
    pub replaced_until: Option<u64>,
    /// The `sign` of the `/auth` request that opened this session (to recognise its replay).
    #[serde(default)]
    pub auth_sign: Option<String>,
}

/// A session as stored, under its token; a 5682 session's anti-replay window is kept beside it
/// (merged by the store, so each accepted seq is a small write).
pub fn put(token: Token, record: &SessionRecord) -> Op {
    Op::put_json(CF_SESSIONS, token.as_bytes().to_vec(), record)
}

/// Every stored session with its anti-replay window (5682 sessions only have one).
pub fn stored(store: &Store) -> Result<Vec<(Token, SessionRecord, Option<ReplayWindow>)>, StoreError> {
    store.scan(CF_SESSIONS, |k, v| {
        let token = Token::from_bytes(k).ok_or_else(|| corrupt(k, "bad token key"))?;
        let record: SessionRecord = json(k, v)?;
        let window = store.get(CF_REPLAY, k)?.and_then(|w| ReplayWindow::decode(&w));
        Ok((token, record, window))
    })
}

pub struct Session {
    pub device: Arc<Device>,
    pub family: PortFamily,
    pub key: Option<SessionKey>,
    pub record: SessionRecord,
    /// `record.last_used` as last written to the store.
    persisted_last_used: u64,
    pub window: Option<ReplayWindow>,
}

impl Session {
    pub fn new(device: Arc<Device>, record: SessionRecord, window: Option<ReplayWindow>) -> Session {
        let key = record.random.as_deref().map(|r| SessionKey::derive(device.secret.expose(), r));
        Session { device, family: record.family, key, persisted_last_used: record.last_used, record, window }
    }

    fn expired(&self, now: UnixMs, ttl_s: u64) -> bool {
        let idle_end = UnixMs(self.record.last_used).plus_secs(ttl_s);
        now >= idle_end || self.record.replaced_until.is_some_and(|t| now.0 >= t)
    }
}

/// A valid session's facts, copied out so the shard lock is not held during crypto.
pub struct SessionView {
    pub device: Arc<Device>,
    pub family: PortFamily,
    pub key: Option<SessionKey>,
    pub seq_offset: u64,
    pub ack_mode: AckMode,
}

pub enum Lookup {
    Valid(SessionView),
    /// Unknown, expired, or its device is gone: the device must authenticate again (4.01).
    Invalid,
}

pub enum SeqOutcome {
    /// Accepted and marked. `touch` is the record to write back when the sliding expiry is due.
    Accepted {
        touch: Option<SessionRecord>,
    },
    Replayed,
    /// The session vanished between lookup and marking.
    Invalid,
}

pub struct Sessions {
    shards: Sharded<Token, Session>,
    ttl_s: u64,
}

impl Sessions {
    pub fn new(ttl_s: u64) -> Sessions {
        Sessions { shards: Sharded::new(64), ttl_s }
    }

    fn shard(&self, token: &[u8]) -> MutexGuard<'_, HashMap<Token, Session, RandomState>> {
        self.shards.shard(token)
    }

    pub fn insert(&self, token: Token, session: Session) {
        self.shard(token.as_bytes()).insert(token, session);
    }

    pub fn remove(&self, token: &[u8]) {
        self.shard(token).remove(token);
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Finds a usable session of `family`: each port family recognises only the tokens it
    /// issued.
    pub fn lookup(&self, token: &[u8], family: PortFamily, now: UnixMs) -> Lookup {
        let view = {
            let shard = self.shard(token);
            let Some(s) = shard.get(token) else { return Lookup::Invalid };
            // An expired session stays until the sweep, which also deletes its stored record.
            if s.family != family || s.expired(now, self.ttl_s) {
                return Lookup::Invalid;
            }
            SessionView {
                device: s.device.clone(),
                family: s.family,
                key: s.key.clone(),
                seq_offset: s.record.seq_offset,
                ack_mode: s.record.ack_mode,
            }
        };
        // Lock order is device before shard, so the device is checked after the shard is released.
        // A deleted device's sessions are removed (and their records deleted) by the deletion.
        if view.device.state().deleted {
            return Lookup::Invalid;
        }
        Lookup::Valid(view)
    }

    /// Checks a 5682 seq against the window without marking it.
    pub fn check_seq(&self, token: &[u8], seq: u64) -> Verdict {
        match self.shard(token).get(token).and_then(|s| s.window.as_ref()) {
            Some(w) => w.check(seq),
            None => Verdict::Replayed,
        }
    }

    /// Marks a seq (or, for sessions without a window, only refreshes the expiry).
    pub fn accept(&self, token: &[u8], seq: Option<u64>, now: UnixMs) -> SeqOutcome {
        let mut shard = self.shard(token);
        let Some(s) = shard.get_mut(token) else { return SeqOutcome::Invalid };
        if let (Some(seq), Some(w)) = (seq, s.window.as_mut()) {
            if w.check(seq) != Verdict::Fresh {
                return SeqOutcome::Replayed;
            }
            w.mark(seq);
        }
        s.record.last_used = s.record.last_used.max(now.0);
        let touch = (s.record.last_used >= s.persisted_last_used + LAST_USED_WRITE_INTERVAL_MS).then(|| {
            s.persisted_last_used = s.record.last_used;
            s.record.clone()
        });
        SeqOutcome::Accepted { touch }
    }

    /// Undoes [`Sessions::accept`]'s mark when the uplink could not be stored.
    pub fn unmark(&self, token: &[u8], seq: u64) {
        if let Some(w) = self.shard(token).get_mut(token).and_then(|s| s.window.as_mut()) {
            w.unmark(seq);
        }
    }

    /// Ends `token` at `until` (a newer `/auth` replaced it); returns the record to store.
    pub fn replace(&self, token: &[u8], until: UnixMs) -> Option<SessionRecord> {
        let mut shard = self.shard(token);
        let s = shard.get_mut(token)?;
        let end = s.record.replaced_until.map_or(until.0, |t| t.min(until.0));
        s.record.replaced_until = Some(end);
        Some(s.record.clone())
    }

    /// Whether `token` is live (used to prune a device's token list).
    pub fn is_live(&self, token: &[u8], now: UnixMs) -> bool {
        self.shard(token).get(token).is_some_and(|s| !s.expired(now, self.ttl_s))
    }

    /// Removes every expired session from memory and returns their tokens.
    pub fn drain_expired(&self, now: UnixMs) -> Vec<Token> {
        let mut gone = Vec::new();
        for mut m in self.shards.shards() {
            m.retain(|t, s| {
                let keep = !s.expired(now, self.ttl_s);
                if !keep {
                    gone.push(t.clone());
                }
                keep
            });
        }
        gone
    }

    /// If `token` is a live, unreplaced session of `family` opened by an `/auth` signed `sign`,
    /// renews its idle expiry to a full lifetime from `now` and returns the record to store.
    pub fn renew_signed(&self, token: &[u8], family: PortFamily, sign: &str, now: UnixMs) -> Option<SessionRecord> {
        let mut shard = self.shard(token);
        let s = shard.get_mut(token)?;
        if s.family != family
            || s.record.replaced_until.is_some()
            || s.expired(now, self.ttl_s)
            || s.record.auth_sign.as_deref() != Some(sign)
        {
            return None;
        }
        s.record.last_used = s.record.last_used.max(now.0);
        s.persisted_last_used = s.record.last_used;
        Some(s.record.clone())
    }

    /// The family of a live token.
    pub fn family(&self, token: &[u8]) -> Option<PortFamily> {
        self.shard(token).get(token).map(|s| s.family)
    }
}

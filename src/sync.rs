//! Locks taken the one way the server takes them. A poisoned lock (a thread panicked while
//! holding it) is used as it is: every guarded structure is left consistent between statements
//! that can panic, and refusing the lock forever would take a whole port or table down for one
//! failed request.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use foldhash::fast::RandomState;

pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A map split into independently locked shards, so concurrent sockets rarely meet on a lock.
/// A key picks its shard by its hash; look it up in that shard by the same borrowed form.
pub struct Sharded<K, V> {
    shards: Box<[Mutex<HashMap<K, V, RandomState>>]>,
    hasher: RandomState,
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    pub fn new(shards: usize) -> Sharded<K, V> {
        Sharded {
            shards: (0..shards).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: RandomState::default(),
        }
    }

    /// The locked shard that holds `key`, if the map holds it.
    pub fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, V, RandomState>>
    where
        K: std::borrow::Borrow<Q>,
    {
        lock(&self.shards[self.hasher.hash_one(key) as usize % self.shards.len()])
    }

    /// Runs `f` on the value under `key` (a default one if there is none), which stays only while
    /// `keep` holds for it: keys with nothing to keep take no room.
    pub fn update<R>(&self, key: K, keep: impl Fn(&V) -> bool, f: impl FnOnce(&mut V) -> R) -> R
    where
        V: Default,
    {
        let mut shard = self.shard(&key);
        match shard.get_mut(&key) {
            Some(v) => {
                let r = f(v);
                if !keep(v) {
                    shard.remove(&key);
                }
                r
            }
            None => {
                let mut v = V::default();
                let r = f(&mut v);
                if keep(&v) {
                    shard.insert(key, v);
                }
                r
            }
        }
    }

    /// Each shard in turn, locked.
    pub fn shards(&self) -> impl Iterator<Item = MutexGuard<'_, HashMap<K, V, RandomState>>> {
        self.shards.iter().map(|s| lock(s))
    }

    pub fn len(&self) -> usize {
        self.shards().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards().all(|m| m.is_empty())
    }
}

//! Counts per key within a bound (connections per source, tunnels per identity, mirrors per
//! pod): a sharded map whose entries exist only while their count is above zero, so the table
//! is bounded by what is held, whatever the number of keys that come and go.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
    sync::Mutex,
};

const SHARDS: usize = 16;

/// Counts per key, each within a bound; entries live only while their count is above zero.
///
/// A key is hashed twice: once to choose its shard, with foldhash seeded per instance (cheap,
/// and not predictable from outside), then inside the shard with std's SipHash, whose DoS
/// resistance the maps keep because some keys are a peer's source address.
pub struct KeyedCounts<K> {
    shards: [Mutex<HashMap<K, u32>>; SHARDS],
    shard_hash: hashbrown::DefaultHashBuilder,
}

impl<K: Hash + Eq + Clone> KeyedCounts<K> {
    pub fn new() -> Self {
        Self { shards: std::array::from_fn(|_| Mutex::new(HashMap::new())), shard_hash: Default::default() }
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, u32>> {
        &self.shards[self.shard_hash.hash_one(key) as usize % SHARDS]
    }

    /// Takes one unit for `key` if its count stays within `max`.
    pub fn take(&self, key: &K, max: u32) -> bool {
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        match shard.get_mut(key) {
            Some(n) if *n >= max => false,
            Some(n) => {
                *n += 1;
                true
            }
            None if max == 0 => false,
            None => {
                shard.insert(key.clone(), 1);
                true
            }
        }
    }

    /// Gives back a unit taken for `key`.
    pub fn give(&self, key: &K) {
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = shard.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                shard.remove(key);
            }
        }
    }

    /// Keys with a count above zero.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }
}

impl<K: Hash + Eq + Clone> Default for KeyedCounts<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bounded_per_key_and_forgotten_at_zero() {
        let k = KeyedCounts::new();
        assert!(k.take(&1u32, 2) && k.take(&1, 2));
        assert!(!k.take(&1, 2));
        assert!(k.take(&2, 2));
        assert!(!k.take(&3, 0), "a bound of 0 admits nothing");
        assert_eq!(k.len(), 2);
        k.give(&1);
        assert!(k.take(&1, 2));
        for key in [1, 1, 2] {
            k.give(&key);
        }
        assert_eq!(k.len(), 0);
    }
}

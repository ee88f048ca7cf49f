//! The memory tier: an LRU of verified, uncompressed chunks with a byte budget (`lru` crate),
//! shared by every file of an image.
//!
//! It holds `Bytes`, which are reference counted, so evicting a chunk never invalidates a read
//! that is still copying it. Keys name a chunk by where it sits in its layer's blob; the disk tier
//! ([`super::disk`]) names chunks by digest instead, which is what lets images share them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use lru::LruCache;

use crate::model::digest::Digest;

/// Identifies a chunk: the blob it comes from and where in the blob (compressed offset plus
/// offset inside the decompressed member, or the offset in an index-less layer's tar stream).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub layer: Digest,
    pub offset: u64,
    pub inner: u64,
}

/// An LRU of verified, uncompressed chunks with a byte budget.
pub struct ChunkCache {
    inner: Mutex<CacheInner>,
    budget: u64,
    /// Chunks dropped to stay within the budget.
    pub evictions: AtomicU64,
}

struct CacheInner {
    lru: LruCache<ChunkKey, Bytes>,
    bytes: u64,
}

impl ChunkCache {
    /// A cache holding at most `budget` bytes of chunk data.
    pub fn new(budget: u64) -> ChunkCache {
        ChunkCache {
            inner: Mutex::new(CacheInner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            budget,
            evictions: AtomicU64::new(0),
        }
    }

    pub fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        self.inner.lock().unwrap().lru.get(key).cloned()
    }

    /// Whether a chunk is held, without counting as a use.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.inner.lock().unwrap().lru.contains(key)
    }

    /// Stores a chunk, evicting the least recently used ones to stay within the budget. A chunk
    /// larger than the whole budget is not stored.
    pub fn insert(&self, key: ChunkKey, data: Bytes) {
        let len = data.len() as u64;
        if len > self.budget {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        if let Some(old) = inner.lru.put(key, data) {
            inner.bytes -= old.len() as u64;
        }
        inner.bytes += len;
        while inner.bytes > self.budget {
            match inner.lru.pop_lru() {
                Some((_, evicted)) => {
                    inner.bytes -= evicted.len() as u64;
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
    }

    /// Drops every chunk of a layer (used when a streamed layer fails verification).
    pub fn remove_layer(&self, layer: &Digest) {
        let mut inner = self.inner.lock().unwrap();
        let keys: Vec<ChunkKey> = inner
            .lru
            .iter()
            .filter(|(k, _)| k.layer == *layer)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(v) = inner.lru.pop(&k) {
                inner.bytes -= v.len() as u64;
            }
        }
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> ChunkKey {
        ChunkKey {
            layer: Digest::of(b"layer"),
            offset: n,
            inner: 0,
        }
    }

    #[test]
    fn cache_stays_within_budget_and_evicts_lru() {
        let cache = ChunkCache::new(10);
        cache.insert(key(1), Bytes::from_static(b"aaaa"));
        cache.insert(key(2), Bytes::from_static(b"bbbb"));
        let held = cache.get(&key(1)).unwrap(); // 1 is now most recent
        cache.insert(key(3), Bytes::from_static(b"cccc"));
        assert!(
            cache.get(&key(2)).is_none(),
            "least recently used is evicted"
        );
        assert!(cache.get(&key(1)).is_some());
        assert!(cache.get(&key(3)).is_some());
        assert_eq!(cache.bytes(), 8);
        // A chunk bigger than the budget is not stored, and what a reader holds stays valid.
        cache.insert(key(4), Bytes::from(vec![0u8; 11]));
        assert!(cache.get(&key(4)).is_none());
        cache.remove_layer(&Digest::of(b"layer"));
        assert_eq!(cache.bytes(), 0);
        assert_eq!(&held[..], b"aaaa");
    }
}

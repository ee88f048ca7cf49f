//! Where fetched bytes are kept, in two tiers that only ever hold verified bytes.
//!
//! - [`memory`]: an LRU of uncompressed chunks with a byte budget, one per opened image, keyed
//!   by where a chunk sits in its blob.
//! - [`disk`]: the tier that outlives a mount: chunks by digest and layer metadata (TOCs, seek
//!   indexes, learned profiles), shared by every mount and the snapshotter on one machine.
//!
//! [`ChunkTiers`] is the policy between them, in one place: what is kept where, and what counts
//! as held. Callers pass a chunk's memory key and digest, so this module knows nothing of layer
//! formats or of the reader that fills it.

pub mod disk;
pub mod memory;

use std::sync::Arc;

use bytes::Bytes;

use crate::model::digest::Digest;
use disk::DiskCache;
use memory::{ChunkCache, ChunkKey};

/// The tier a chunk was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
}

/// The memory tier of one image plus the machine's disk tier, if there is one.
#[derive(Clone)]
pub struct ChunkTiers {
    pub memory: Arc<ChunkCache>,
    pub disk: Option<Arc<DiskCache>>,
}

impl ChunkTiers {
    /// A chunk from memory, or from disk (then also kept in memory, as the next read of a hot
    /// chunk should not hash a file again).
    pub fn get(&self, key: &ChunkKey, digest: Option<&Digest>) -> Option<(Bytes, Tier)> {
        if let Some(data) = self.memory.get(key) {
            return Some((data, Tier::Memory));
        }
        let (disk, digest) = self.disk.as_ref().zip(digest)?;
        let data = disk.get(digest)?;
        self.memory.insert(key.clone(), data.clone());
        Some((data, Tier::Disk))
    }

    /// Keeps a verified chunk: on disk if there is a disk tier and the chunk has a digest, and
    /// in memory unless it is `background` filling that the disk took (background filling must
    /// not push out what readers use). `key` is `None` for chunks never stored (runs of zeros).
    pub fn keep(
        &self,
        key: Option<ChunkKey>,
        digest: Option<&Digest>,
        data: &Bytes,
        background: bool,
    ) {
        if let (Some(disk), Some(digest)) = (&self.disk, digest) {
            disk.put(digest, data);
            if background {
                return;
            }
        }
        if let Some(key) = key {
            self.memory.insert(key, data.clone());
        }
    }

    /// Whether the disk tier holds a chunk that memory does not: a read of it loads from disk.
    pub fn only_on_disk(&self, key: Option<&ChunkKey>, digest: Option<&Digest>) -> bool {
        !key.is_none_or(|k| self.memory.contains(k))
            && self
                .disk
                .as_ref()
                .zip(digest)
                .is_some_and(|(disk, d)| disk.has(d))
    }

    /// Whether either tier holds a chunk (a chunk that is never stored counts as held: reading
    /// it costs no fetch).
    pub fn holds(&self, key: Option<&ChunkKey>, digest: Option<&Digest>) -> bool {
        key.is_none_or(|k| self.memory.contains(k))
            || self
                .disk
                .as_ref()
                .zip(digest)
                .is_some_and(|(disk, d)| disk.has(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers(dir: Option<&std::path::Path>) -> ChunkTiers {
        ChunkTiers {
            memory: Arc::new(ChunkCache::new(1 << 20)),
            disk: dir.map(|d| Arc::new(DiskCache::open(d, 1 << 20).unwrap())),
        }
    }

    #[test]
    fn background_chunks_skip_memory_only_when_a_disk_holds_them() {
        let data = Bytes::from_static(b"chunk");
        let digest = Digest::of(&data);
        let key = ChunkKey {
            layer: Digest::of(b"layer"),
            offset: 7,
            inner: 0,
        };
        // Without a disk tier, background filling has nowhere else to go.
        let memory_only = tiers(None);
        memory_only.keep(Some(key.clone()), Some(&digest), &data, true);
        assert_eq!(
            memory_only.get(&key, Some(&digest)).unwrap().1,
            Tier::Memory
        );

        let dir = tempfile::tempdir().unwrap();
        let both = tiers(Some(dir.path()));
        both.keep(Some(key.clone()), Some(&digest), &data, true);
        assert!(
            !both.memory.contains(&key),
            "background fill stays out of memory"
        );
        assert!(both.holds(Some(&key), Some(&digest)));
        let (got, tier) = both.get(&key, Some(&digest)).unwrap();
        assert_eq!((&got[..], tier), (&b"chunk"[..], Tier::Disk));
        // The disk hit was promoted.
        assert_eq!(both.get(&key, Some(&digest)).unwrap().1, Tier::Memory);

        // A reader's chunk goes to both.
        let other = ChunkKey { offset: 8, ..key };
        both.keep(Some(other.clone()), Some(&digest), &data, false);
        assert!(both.memory.contains(&other));
        // Chunks that are never stored count as held; unknown ones do not.
        assert!(both.holds(None, None));
        let unknown = ChunkKey { offset: 9, ..other };
        assert!(!both.holds(Some(&unknown), Some(&Digest::of(b"nothing"))));
    }
}

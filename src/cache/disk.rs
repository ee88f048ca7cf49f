//! The disk tier of the chunk cache: verified chunks in files, named by their digest.
//!
//! Content addressing means a chunk shared by two layers or two images (a common base layer
//! converted twice, the same file in two images) is stored once, and a remount or a daemon
//! restart finds everything it fetched before. Layout under the cache directory:
//!
//! - `chunks/ab/abcdef…`: one file per chunk, named by the SHA-256 of its uncompressed bytes;
//! - `meta/NAME`: small verified documents (TOCs, configs, indexes of streamed layers);
//! - `tmp/`: files being written.
//!
//! Crash safety: a file is written under `tmp/` and renamed into place, so a name never points at
//! a half-written file; and every chunk is hashed again when it is loaded, so even a file damaged
//! later (a torn write after power loss, a disk error, a meddling user) is dropped, never served.
//! Hashing costs about 1 ms per MiB, far below any network fetch it saves.
//!
//! Loading maps the file (`memmap2`) and hands out `Bytes` backed by the mapping, so a chunk read
//! from disk is not copied before it is hashed and served.
//!
//! Budget: an LRU over file sizes, rebuilt at start-up from the files' mtimes (oldest first), and
//! files beyond the budget are deleted. Failures to write (no space, read-only directory) switch
//! the disk tier off for a while with one log line: reads keep working from memory and network.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use tracing::warn;

use crate::model::digest::Digest;

/// How long writes stay off after a write failed (no space, read-only).
const WRITE_BACKOFF: Duration = Duration::from_secs(30);

pub struct DiskCache {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
    /// Chunk files deleted to stay within the budget.
    pub evictions: std::sync::atomic::AtomicU64,
}

struct State {
    /// Chunk hex digest → file size, least recently used first out.
    lru: LruCache<String, u64>,
    bytes: u64,
    writes_off_until: Option<Instant>,
}

impl DiskCache {
    /// Opens (creating) a cache directory holding at most `budget` bytes of chunks.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<DiskCache> {
        for sub in ["chunks", "meta", "tmp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Leftovers of writes interrupted by a crash.
        for entry in std::fs::read_dir(dir.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let mut found = Vec::new();
        for shard in std::fs::read_dir(dir.join("chunks"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(shard.path())? {
                let file = file?;
                let meta = file.metadata()?;
                let name = file.file_name().to_string_lossy().into_owned();
                found.push((meta.modified().ok(), name, meta.len()));
            }
        }
        found.sort();
        let mut lru = LruCache::unbounded();
        let mut bytes = 0;
        for (_, name, len) in found {
            bytes += len;
            lru.put(name, len);
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            budget,
            state: Mutex::new(State {
                lru,
                bytes,
                writes_off_until: None,
            }),
            evictions: std::sync::atomic::AtomicU64::new(0),
        };
        cache.evict(&mut cache.state.lock().unwrap());
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of chunks held.
    pub fn bytes(&self) -> u64 {
        self.state.lock().unwrap().bytes
    }

    /// Number of chunks held.
    pub fn chunks(&self) -> usize {
        self.state.lock().unwrap().lru.len()
    }

    fn chunk_path(&self, hex: &str) -> PathBuf {
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Whether a chunk is held (without loading or verifying it).
    pub fn has(&self, digest: &Digest) -> bool {
        self.state.lock().unwrap().lru.contains(digest.hex())
    }

    /// A chunk, if held and still matching its digest.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let hex = digest.hex();
        // Touch it in the LRU; unknown digests are not looked for on disk.
        self.state.lock().unwrap().lru.get(hex)?;
        let path = self.chunk_path(hex);
        let data = map(&path);
        match data {
            Some(data) if Digest::of(&data) == *digest => Some(data),
            _ => {
                warn!("disk cache: dropping damaged chunk {}", path.display());
                self.forget(hex);
                None
            }
        }
    }

    /// Stores a verified chunk (best effort).
    pub fn put(&self, digest: &Digest, data: &[u8]) {
        let hex = digest.hex();
        {
            let mut state = self.state.lock().unwrap();
            if state.lru.get(hex).is_some() || !writes_allowed(&mut state) {
                return;
            }
        }
        let path = self.chunk_path(hex);
        match self.write_atomically(&path, data) {
            Ok(()) => {
                let mut state = self.state.lock().unwrap();
                if state.lru.put(hex.to_string(), data.len() as u64).is_none() {
                    state.bytes += data.len() as u64;
                }
                self.evict(&mut state);
            }
            Err(e) => self.write_failed(&path, e),
        }
    }

    /// A small document stored with [`DiskCache::put_meta`]. Callers verify what they load.
    pub fn get_meta(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join("meta").join(name)).ok()
    }

    pub fn put_meta(&self, name: &str, data: &[u8]) {
        if !writes_allowed(&mut self.state.lock().unwrap()) {
            return;
        }
        let path = self.dir.join("meta").join(name);
        if let Err(e) = self.write_atomically(&path, data) {
            self.write_failed(&path, e);
        }
    }

    /// A verified document from the `meta/` files, or fetched and stored for next time: the one
    /// way layer formats keep what they read before their index (TOCs, seek indexes, indexes of
    /// streamed layers). `decode` checks a stored copy (against the digest the image names, or
    /// the layer it belongs to) and returns `None` to refuse it, so that a damaged or stale file
    /// costs a fetch, never a wrong index; `fetch` returns only what it verified itself, and
    /// `encode` is what gets stored.
    pub async fn meta_or_fetch<T, E, Fut>(
        disk: Option<&DiskCache>,
        name: &str,
        decode: impl FnOnce(&[u8]) -> Option<T>,
        fetch: impl FnOnce() -> Fut,
        encode: impl FnOnce(&T) -> Vec<u8>,
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        if let Some(found) = disk.and_then(|d| d.get_meta(name)).and_then(|b| decode(&b)) {
            return Ok(found);
        }
        let fetched = fetch().await?;
        if let Some(disk) = disk {
            disk.put_meta(name, &encode(&fetched));
        }
        Ok(fetched)
    }

    fn write_atomically(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))?;
        tmp.write_all(data)?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    fn write_failed(&self, path: &Path, e: std::io::Error) {
        let mut state = self.state.lock().unwrap();
        if state.writes_off_until.is_none() {
            warn!(
                "disk cache: cannot write {} ({e}); serving from memory and network, retrying in {}s",
                path.display(),
                WRITE_BACKOFF.as_secs()
            );
        }
        state.writes_off_until = Some(Instant::now() + WRITE_BACKOFF);
    }

    fn forget(&self, hex: &str) {
        let mut state = self.state.lock().unwrap();
        if let Some(len) = state.lru.pop(hex) {
            state.bytes -= len;
        }
        let _ = std::fs::remove_file(self.chunk_path(hex));
    }

    fn evict(&self, state: &mut State) {
        self.evict_to(state, self.budget);
    }

    fn evict_to(&self, state: &mut State, budget: u64) {
        while state.bytes > budget {
            let Some((hex, len)) = state.lru.pop_lru() else {
                break;
            };
            state.bytes -= len;
            self.evictions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = std::fs::remove_file(self.chunk_path(&hex));
        }
    }

    /// Deletes least recently used chunks until at most `budget` bytes remain (`cache gc`).
    pub fn trim(&self, budget: u64) {
        self.evict_to(&mut self.state.lock().unwrap(), budget);
    }

    /// Deletes every chunk and document.
    pub fn clear(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap();
        for sub in ["chunks", "meta"] {
            std::fs::remove_dir_all(self.dir.join(sub))?;
            std::fs::create_dir_all(self.dir.join(sub))?;
        }
        state.lru.clear();
        state.bytes = 0;
        Ok(())
    }
}

fn writes_allowed(state: &mut State) -> bool {
    match state.writes_off_until {
        Some(until) if Instant::now() < until => false,
        Some(_) => {
            state.writes_off_until = None;
            true
        }
        None => true,
    }
}

/// Maps a file read-only into `Bytes` (an empty file is read normally: it cannot be mapped).
fn map(path: &Path) -> Option<Bytes> {
    let file = std::fs::File::open(path).ok()?;
    if file.metadata().ok()?.len() == 0 {
        return Some(Bytes::new());
    }
    // SAFETY: chunk files are never modified in place (they are replaced by rename), and the
    // bytes are hashed before use, so a file truncated under us cannot yield unchecked data;
    // at worst a concurrent truncation raises SIGBUS, which renaming rather than truncating
    // avoids.
    let mapped = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    Some(Bytes::from_owner(mapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_are_verified_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let data = b"some chunk".to_vec();
        let d = Digest::of(&data);
        assert!(cache.get(&d).is_none());
        cache.put(&d, &data);
        assert_eq!(&cache.get(&d).unwrap()[..], &data[..]);
        drop(cache);
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.chunks(), 1);
        assert_eq!(&cache.get(&d).unwrap()[..], &data[..]);
        // A damaged file is dropped, not served.
        let path = cache.chunk_path(d.hex());
        std::fs::write(&path, b"some chunK").unwrap();
        assert!(cache.get(&d).is_none());
        assert!(!path.exists());
        assert_eq!(cache.chunks(), 0);
    }

    #[test]
    fn budget_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 25).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10]).collect();
        let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
        cache.put(&digests[0], &chunks[0]);
        cache.put(&digests[1], &chunks[1]);
        assert!(cache.get(&digests[0]).is_some()); // 0 is now the most recent
        cache.put(&digests[2], &chunks[2]);
        assert!(cache.get(&digests[1]).is_none());
        assert!(cache.get(&digests[0]).is_some());
        assert_eq!(cache.bytes(), 20);
        // A smaller budget on reopen trims the cache.
        drop(cache);
        let cache = DiskCache::open(dir.path(), 10).unwrap();
        assert_eq!(cache.chunks(), 1);
    }

    #[test]
    fn a_read_only_directory_turns_writes_off_without_failing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        // Make writes fail: the tmp directory disappears (root ignores permission bits).
        std::fs::remove_dir_all(dir.path().join("tmp")).unwrap();
        let d = Digest::of(b"x");
        cache.put(&d, b"x");
        assert!(cache.get(&d).is_none());
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        cache.put(&d, b"x"); // still backing off
        assert!(cache.get(&d).is_none());
        cache.state.lock().unwrap().writes_off_until = Some(Instant::now());
        cache.put(&d, b"x");
        assert!(cache.get(&d).is_some(), "writes resume after the back-off");
    }
}

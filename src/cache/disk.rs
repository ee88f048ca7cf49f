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
//! Writing: `put` hands a chunk to one writer thread through a crossbeam channel and returns (the
//! queue is bounded in bytes, [`WRITE_QUEUE_BYTES`]); until its file is in place the chunk is
//! served from the queue. Creating and renaming a file costs 30-100 µs of kernel time (ext4
//! serialises creates in one directory), and a start stores thousands of chunks: written inline, on
//! the fetch runtime's threads, that cost sat between a verified chunk and the reader waiting for
//! it (python-app's learned-profile start spent about a third of the daemon's CPU in `ext4_create`
//! and `rename`). A plain thread rather than a tokio task: the work is blocking file I/O, and
//! crossbeam's channel can be sent to without a runtime. When the queue is full the sender writes
//! the chunk itself, so a disk slower than the network slows fetching down instead of growing
//! memory or dropping chunks. [`DiskCache::flush`] (unmount) and dropping the cache write what is
//! queued, and `lazylayer umount` waits for the daemon to exit, so a mount started next finds every
//! chunk.
//!
//! Sharing: mounts and the snapshotter on one machine may use one directory at the same time.
//! Each process indexes the files it finds at start-up and those it writes; a chunk another
//! process wrote since is found by its file (one `stat` or `open` on a miss, far below the fetch
//! it saves) and indexed then.
//!
//! Budget: an LRU over file sizes, rebuilt at start-up from the files' mtimes (oldest first), and
//! files beyond the budget are deleted. Failures to write (no space, read-only directory) switch
//! the disk tier off for a while with one log line: reads keep working from memory and network.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use tracing::{debug, warn};

use crate::model::digest::Digest;

/// How long writes stay off after a write failed (no space, read-only).
const WRITE_BACKOFF: Duration = Duration::from_secs(30);

/// Bytes of chunks waiting for the writer thread at most: most of a start's worth (python-app's
/// start stores about 40 MB of chunks), so that the writer can wait for idle CPU while the start
/// runs, and small enough for the daemon's memory bound. During a start most of it is shared with
/// the memory tier, which holds the same chunks (`Bytes` are reference-counted).
const WRITE_QUEUE_BYTES: u64 = 32 << 20;

pub struct DiskCache {
    shared: Arc<Shared>,
    /// To the writer thread; `None` once dropping.
    queue: Option<crossbeam_channel::Sender<(String, Bytes)>>,
    /// The writer's end too, for [`DiskCache::flush`] to write what is queued itself.
    queued: crossbeam_channel::Receiver<(String, Bytes)>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What the writer thread and the cache's users share.
struct Shared {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
    /// Signalled whenever a queued chunk is written (or failed to be).
    written: Condvar,
    /// Chunk files deleted to stay within the budget.
    evictions: AtomicU64,
}

struct State {
    /// Chunk hex digest → file size, least recently used first out.
    lru: LruCache<String, u64>,
    bytes: u64,
    /// Verified chunks handed to the writer and not yet in their files, by hex digest.
    queued: HashMap<String, Bytes>,
    queued_bytes: u64,
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
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            budget,
            state: Mutex::new(State {
                lru,
                bytes,
                queued: HashMap::new(),
                queued_bytes: 0,
                writes_off_until: None,
            }),
            written: Condvar::new(),
            evictions: AtomicU64::new(0),
        });
        shared.evict(&mut shared.state.lock().unwrap());
        let (queue, chunks) = crossbeam_channel::unbounded::<(String, Bytes)>();
        let writer = std::thread::Builder::new()
            .name("disk-cache-writer".into())
            .spawn({
                let (shared, chunks) = (shared.clone(), chunks.clone());
                move || {
                    // Only when a CPU is idle: on a small machine creating files took CPU from
                    // the container that was starting.
                    let idle = libc::sched_param { sched_priority: 0 };
                    // SAFETY: plain system call on the calling thread (pid 0) with a valid param.
                    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
                    for (hex, data) in chunks {
                        shared.write_chunk(&hex, &data);
                    }
                }
            })?;
        Ok(DiskCache {
            shared,
            queue: Some(queue),
            queued: chunks,
            writer: Some(writer),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Bytes of chunks held (queued ones included).
    pub fn bytes(&self) -> u64 {
        let state = self.shared.state.lock().unwrap();
        state.bytes + state.queued_bytes
    }

    /// Number of chunks held (queued ones included).
    pub fn chunks(&self) -> usize {
        let state = self.shared.state.lock().unwrap();
        state.lru.len() + state.queued.len()
    }

    /// Chunk files deleted to stay within the budget.
    pub fn evictions(&self) -> u64 {
        self.shared.evictions.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn chunk_path(&self, hex: &str) -> PathBuf {
        self.shared.chunk_path(hex)
    }

    /// Whether a chunk is held (without loading or verifying it).
    pub fn has(&self, digest: &Digest) -> bool {
        let hex = digest.hex();
        {
            let state = self.shared.state.lock().unwrap();
            if state.lru.contains(hex) || state.queued.contains_key(hex) {
                return true;
            }
        }
        self.shared.chunk_path(hex).exists()
    }

    /// A chunk, if held and still matching its digest.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let hex = digest.hex();
        let indexed = {
            let mut state = self.shared.state.lock().unwrap();
            if let Some(data) = state.queued.get(hex) {
                return Some(data.clone());
            }
            state.lru.get(hex).is_some()
        };
        let path = self.shared.chunk_path(hex);
        let Some(data) = map(&path) else {
            if indexed {
                // Another process sharing the directory evicted it, or someone deleted it.
                debug!("disk cache: chunk {} is gone", path.display());
                self.shared.forget(hex);
            }
            return None;
        };
        if Digest::of(&data) != *digest {
            warn!("disk cache: dropping damaged chunk {}", path.display());
            self.shared.forget(hex);
            return None;
        }
        if !indexed {
            self.shared.adopt(hex, data.len() as u64);
        }
        Some(data)
    }

    /// Stores a verified chunk (best effort), through the writer thread.
    pub fn put(&self, digest: &Digest, data: &Bytes) {
        let hex = digest.hex();
        let full = {
            let mut state = self.shared.state.lock().unwrap();
            if state.lru.get(hex).is_some()
                || state.queued.contains_key(hex)
                || !writes_allowed(&mut state)
            {
                return;
            }
            state.queued.insert(hex.to_string(), data.clone());
            state.queued_bytes += data.len() as u64;
            state.queued_bytes > WRITE_QUEUE_BYTES
        };
        let chunk = (hex.to_string(), data.clone());
        let refused = match &self.queue {
            Some(queue) if !full => queue.send(chunk).err().map(|e| e.into_inner()),
            _ => Some(chunk),
        };
        // A full queue: the disk is behind, and writing here makes the fetch wait for it.
        if let Some((hex, data)) = refused {
            self.shared.write_chunk(&hex, &data);
        }
    }

    /// Waits until every queued chunk is in its file (or failed to be written), writing them
    /// on the calling thread rather than waiting for the idle-priority writer.
    pub fn flush(&self) {
        while let Ok((hex, data)) = self.queued.try_recv() {
            self.shared.write_chunk(&hex, &data);
        }
        let mut state = self.shared.state.lock().unwrap();
        while !state.queued.is_empty() {
            state = self.shared.written.wait(state).unwrap();
        }
    }

    /// A small document stored with [`DiskCache::put_meta`]. Callers verify what they load.
    pub fn get_meta(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.shared.dir.join("meta").join(name)).ok()
    }

    pub fn put_meta(&self, name: &str, data: &[u8]) {
        if !writes_allowed(&mut self.shared.state.lock().unwrap()) {
            return;
        }
        let path = self.shared.dir.join("meta").join(name);
        if let Err(e) = self.shared.write_atomically(&path, data) {
            self.shared.write_failed(&path, e);
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

    /// Deletes least recently used chunks until at most `budget` bytes remain (`cache gc`).
    pub fn trim(&self, budget: u64) {
        self.flush();
        self.shared
            .evict_to(&mut self.shared.state.lock().unwrap(), budget);
    }

    /// Deletes every chunk and document.
    pub fn clear(&self) -> std::io::Result<()> {
        self.flush();
        let mut state = self.shared.state.lock().unwrap();
        for sub in ["chunks", "meta"] {
            std::fs::remove_dir_all(self.shared.dir.join(sub))?;
            std::fs::create_dir_all(self.shared.dir.join(sub))?;
        }
        state.lru.clear();
        state.bytes = 0;
        Ok(())
    }
}

impl Drop for DiskCache {
    /// Writes what is queued (here: the idle-priority writer may be starved) and ends the writer.
    fn drop(&mut self) {
        self.flush();
        self.queue = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Shared {
    fn chunk_path(&self, hex: &str) -> PathBuf {
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Writes a queued chunk into its file and takes it off the queue.
    fn write_chunk(&self, hex: &str, data: &Bytes) {
        let path = self.chunk_path(hex);
        let written = self.write_atomically(&path, data);
        let mut state = self.state.lock().unwrap();
        if state.queued.remove(hex).is_some() {
            state.queued_bytes -= data.len() as u64;
        }
        match written {
            Ok(()) => {
                if state.lru.put(hex.to_string(), data.len() as u64).is_none() {
                    state.bytes += data.len() as u64;
                }
                self.evict(&mut state);
            }
            Err(e) => {
                drop(state);
                self.write_failed(&path, e);
            }
        }
        self.written.notify_all();
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

    /// Indexes a chunk file another process wrote.
    fn adopt(&self, hex: &str, len: u64) {
        let mut state = self.state.lock().unwrap();
        if state.lru.put(hex.to_string(), len).is_none() {
            state.bytes += len;
        }
        self.evict(&mut state);
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
    // Populated: the whole file is read in as the mapping is made, in one go, rather than
    // page by page as the hash touches it (which made a cold walk of a tree from the disk cache
    // wait on one small disk read after another).
    let mapped = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.ok()?;
    Some(Bytes::from_owner(mapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_are_verified_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let data = Bytes::from_static(b"some chunk");
        let d = Digest::of(&data);
        assert!(cache.get(&d).is_none());
        cache.put(&d, &data);
        assert_eq!(&cache.get(&d).unwrap()[..], &data[..]);
        // Dropping waits for the writer: what was put is on disk for the next process.
        drop(cache);
        assert!(
            dir.path()
                .join("chunks")
                .join(&d.hex()[..2])
                .join(d.hex())
                .exists()
        );
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
    fn chunks_another_process_writes_are_found_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = (
            DiskCache::open(dir.path(), 1 << 20).unwrap(),
            DiskCache::open(dir.path(), 1 << 20).unwrap(),
        );
        let data = Bytes::from_static(b"written by the other mount");
        let d = Digest::of(&data);
        assert!(!reader.has(&d));
        writer.put(&d, &data);
        writer.flush();
        assert!(reader.has(&d));
        assert_eq!(&reader.get(&d).unwrap()[..], &data[..]);
        assert_eq!((reader.chunks(), reader.bytes()), (1, data.len() as u64));
        // What another process left is verified like any file: damaged, it is dropped.
        let other = Bytes::from_static(b"another chunk");
        let o = Digest::of(&other);
        let path = reader.chunk_path(o.hex());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"another chunK").unwrap();
        assert!(reader.get(&o).is_none());
        assert!(!path.exists());
        assert_eq!(reader.chunks(), 1);
    }

    #[test]
    fn a_chunk_beyond_the_write_queue_is_written_before_put_returns() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let big = Bytes::from(vec![7u8; WRITE_QUEUE_BYTES as usize + 1]);
        let d = Digest::of(&big);
        cache.put(&d, &big);
        assert!(cache.chunk_path(d.hex()).exists());
        assert!(cache.shared.state.lock().unwrap().queued.is_empty());
        assert_eq!(cache.bytes(), big.len() as u64);
    }

    #[test]
    fn budget_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 25).unwrap();
        let chunks: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 10])).collect();
        let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
        cache.put(&digests[0], &chunks[0]);
        cache.put(&digests[1], &chunks[1]);
        cache.flush();
        assert!(cache.get(&digests[0]).is_some()); // 0 is now the most recent
        cache.put(&digests[2], &chunks[2]);
        cache.flush();
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
        let x = Bytes::from_static(b"x");
        let d = Digest::of(&x);
        cache.put(&d, &x);
        cache.flush();
        assert!(cache.get(&d).is_none());
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        cache.put(&d, &x); // still backing off
        assert!(cache.get(&d).is_none());
        cache.shared.state.lock().unwrap().writes_off_until = Some(Instant::now());
        cache.put(&d, &x);
        cache.flush();
        assert!(cache.get(&d).is_some(), "writes resume after the back-off");
    }
}

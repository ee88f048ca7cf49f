//! File content: the chunk cache and the reader that fills it.
//!
//! A read of `len` bytes at `offset` of a file maps to the chunks that cover that range
//! ([`ChunkRef`]s from the layer's index). Each chunk is taken from the [`ChunkCache`] or
//! fetched: a ranged GET of its compressed span, inflated, and checked against its digest before
//! it enters the cache or reaches the reader, so a corrupted blob, a lying registry or a broken
//! proxy can make a read fail but never return wrong bytes.
//!
//! Concurrent reads of the same chunk share one fetch (in-flight deduplication): the first
//! reader starts it, the others wait on the same shared future. The cache holds `Bytes`, which
//! are reference counted, so evicting a chunk never invalidates a read that is still copying it.
//!
//! The cache is an LRU with a byte budget (`lru` crate) shared by every file of an image. It is
//! memory only for now; the disk tier and prefetching build on this interface.

pub mod scheduler;

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use lru::LruCache;

use crate::cache::disk::DiskCache;
use crate::fetch::scheduler::{Priority, RequestScheduler, SharedPriority};
use crate::layer::gzip_index::{self, Checkpoints};
use crate::layer::{ChunkRef, ChunkSource, Codec, LayerError, LayerFormat, tar_stream};
use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, LayerCompression};
use crate::source::retry::{self, RetryPolicy, Transient, Verdict};
use crate::source::stats::FetchStats;
use crate::source::{ImageSource, SourceError};

/// Identifies a chunk: the blob it comes from and where in the blob (compressed offset plus
/// offset inside the decompressed member, or the offset in an index-less layer's tar stream).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub layer: Digest,
    pub offset: u64,
    pub inner: u64,
}

impl ChunkKey {
    /// The cache key of a chunk, or `None` for chunks that are never stored (runs of zeros).
    pub fn of(layer: &Digest, chunk: &ChunkRef) -> Option<ChunkKey> {
        let (offset, inner) = match chunk.source {
            ChunkSource::Compressed {
                start,
                inner_offset,
                ..
            } => (start, inner_offset),
            ChunkSource::TarStream { offset } => (offset, 0),
            ChunkSource::Zeros => return None,
        };
        Some(ChunkKey {
            layer: layer.clone(),
            offset,
            inner,
        })
    }
}

/// An LRU of verified, uncompressed chunks with a byte budget.
pub struct ChunkCache {
    inner: Mutex<CacheInner>,
    budget: u64,
    /// Chunks dropped to stay within the budget.
    pub evictions: std::sync::atomic::AtomicU64,
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
            evictions: std::sync::atomic::AtomicU64::new(0),
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
                    self.evictions
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(
        "layer {layer}: chunk at blob offset {offset} does not match its digest \
         (expected {expected}, got {actual}); the blob is corrupt or was changed"
    )]
    ChunkDigest {
        layer: Digest,
        offset: u64,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {layer}: chunk at blob offset {offset} does not decompress: {reason}")]
    Decompress {
        layer: Digest,
        offset: u64,
        reason: String,
    },
    #[error("read of {len} bytes at offset {offset} is outside the file ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

type SharedFetch = Shared<BoxFuture<'static, Result<Bytes, Arc<ContentError>>>>;

/// A fetch in flight, and the priority its request waits at (raised when a more urgent reader
/// joins it).
type InFlight = (SharedFetch, SharedPriority);

/// The layer facts a chunk fetch needs.
#[derive(Clone, Debug)]
pub struct LayerInfo {
    pub descriptor: Descriptor,
    pub format: LayerFormat,
    /// Where inflating can start, for a layer read through a gzip seek index.
    pub checkpoints: Option<Checkpoints>,
}

/// Reads file content of one image through the cache.
pub struct ContentReader {
    fetcher: Fetcher,
    layers: Vec<LayerInfo>,
    inflight: Arc<Mutex<HashMap<ChunkKey, InFlight>>>,
    /// Every compressed chunk of each layer in blob order, for read amplification.
    neighbours: Vec<Vec<ChunkRef>>,
    /// Compressed bytes a reader's request may grow to with the chunks that follow it in the
    /// blob (0: off). See [`ContentReader::with_amplification`].
    amplify: u64,
}

/// What a fetch needs, cheap to clone into the future that runs it.
#[derive(Clone)]
struct Fetcher {
    source: Arc<dyn ImageSource>,
    cache: Arc<ChunkCache>,
    disk: Option<Arc<DiskCache>>,
    stats: Arc<FetchStats>,
    scheduler: Arc<RequestScheduler>,
    retry: Arc<RetryPolicy>,
}

impl Fetcher {
    /// Keeps a fetched, verified chunk: on disk if there is a disk tier, and in memory unless it
    /// was fetched in the background with a disk tier to hold it (background filling must not
    /// push out what readers use).
    fn keep(&self, layer: &Digest, chunk: &ChunkRef, data: &Bytes, priority: &SharedPriority) {
        if let (Some(disk), Some(digest)) = (&self.disk, &chunk.digest) {
            disk.put(digest, data);
            if priority.get() == Priority::Background {
                return;
            }
        }
        if let Some(key) = ChunkKey::of(layer, chunk) {
            self.cache.insert(key, data.clone());
        }
    }

    /// Whether a chunk is already held by either tier.
    fn holds(&self, layer: &Digest, chunk: &ChunkRef) -> bool {
        ChunkKey::of(layer, chunk).is_none_or(|k| self.cache.contains(&k))
            || self
                .disk
                .as_ref()
                .zip(chunk.digest.as_ref())
                .is_some_and(|(disk, d)| disk.has(d))
    }
}

impl ContentReader {
    pub fn new(
        source: Arc<dyn ImageSource>,
        cache: Arc<ChunkCache>,
        disk: Option<Arc<DiskCache>>,
        layers: Vec<LayerInfo>,
        stats: Arc<FetchStats>,
        scheduler: Arc<RequestScheduler>,
        retry: RetryPolicy,
    ) -> ContentReader {
        ContentReader {
            fetcher: Fetcher {
                source,
                cache,
                disk,
                stats,
                scheduler,
                retry: Arc::new(retry),
            },
            neighbours: vec![Vec::new(); layers.len()],
            layers,
            inflight: Arc::new(Mutex::new(HashMap::new())),
            amplify: 0,
        }
    }

    /// Read amplification (Nydus calls it `amplify_io`): a read that has to fetch extends its
    /// request with the missing chunks that follow in the blob, up to `bytes` of compressed
    /// data, and caches them. Start-up reads many small files that an image keeps side by side
    /// (a package's modules), one after the other; on a link with a round trip of tens of
    /// milliseconds, one slightly larger request is far cheaper than the round trips it saves.
    /// `chunks` holds each layer's compressed chunks in blob order.
    pub fn with_amplification(mut self, chunks: Vec<(usize, Vec<ChunkRef>)>, bytes: u64) -> Self {
        for (layer, list) in chunks {
            if let Some(slot) = self.neighbours.get_mut(layer) {
                *slot = list;
            }
        }
        self.amplify = bytes;
        self
    }

    /// `chunks` (of one layer, sorted in blob order) plus every chunk lying between two of them
    /// that are at most `max_gap` compressed bytes apart, so that the whole stretch is one
    /// request: a prefetch of files that sit close together but rarely back to back (a start-up
    /// profile's) then costs a few large requests instead of one per file, and a small gap costs
    /// less to carry along than the round trip it saves.
    pub fn fill_gaps(&self, layer: usize, chunks: &[ChunkRef], max_gap: u64) -> Vec<ChunkRef> {
        match self.neighbours.get(layer) {
            Some(list) => fill_gaps(list, chunks, max_gap),
            None => chunks.to_vec(),
        }
    }

    /// The missing chunks that share `last`'s compressed span (a gzip seek index's span holds
    /// many files: inflated once, all of them are had for free) and those that follow it back to
    /// back in its layer's blob, within the amplification budget counted from `first_start`.
    fn amplification(&self, layer: usize, first_start: u64, last: &ChunkRef) -> Vec<ChunkRef> {
        let (ChunkSource::Compressed { start, end, .. }, Some(list)) =
            (&last.source, self.neighbours.get(layer))
        else {
            return Vec::new();
        };
        let digest = &self.layers[layer].descriptor.digest;
        let from = list.partition_point(|c| compressed_start(c) < *start);
        let mut out = Vec::new();
        let mut reach = *end;
        for c in &list[from..] {
            let ChunkSource::Compressed {
                start: c_start,
                end: c_end,
                ..
            } = c.source
            else {
                break;
            };
            let same_span = c_start == *start;
            if !same_span
                && (self.amplify == 0 || c_start > reach || c_end - first_start > self.amplify)
            {
                break;
            }
            if self.fetcher.holds(digest, c) || c == last {
                if same_span {
                    continue;
                }
                break;
            }
            reach = reach.max(c_end);
            out.push(c.clone());
        }
        out
    }

    /// Reads `len` bytes at `offset` of a file of `size` bytes stored in `layer` as `chunks`;
    /// a read past the end is cut short, as `read(2)` is. Fetches wait for a request slot at
    /// `priority`.
    pub async fn read(
        &self,
        layer: usize,
        chunks: &[ChunkRef],
        size: u64,
        offset: u64,
        len: u64,
        priority: Priority,
    ) -> Result<Bytes, Arc<ContentError>> {
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = size.min(offset.saturating_add(len));
        // Chunks are sorted by file offset and tile the file (checked when the index was read).
        let first = chunks.partition_point(|c| c.file_offset + c.size <= offset);
        let wanted: Vec<&ChunkRef> = chunks[first..]
            .iter()
            .take_while(|c| c.file_offset < end)
            .collect();
        let digest = &self.layers[layer].descriptor.digest;
        let first_missing = wanted.iter().find(|c| {
            matches!(c.source, ChunkSource::Compressed { .. }) && !self.fetcher.holds(digest, c)
        });
        let extra = match (first_missing, wanted.last()) {
            (Some(first), Some(last)) if !self.fetcher.holds(digest, last) => {
                self.amplification(layer, compressed_start(first), last)
            }
            _ => Vec::new(),
        };
        if wanted.len() + extra.len() > 1 {
            let mut run: Vec<&ChunkRef> = wanted.clone();
            run.extend(extra.iter());
            self.start_merged_fetches(layer, &run, priority);
        }
        let pieces = futures_util::future::try_join_all(
            wanted.iter().map(|c| self.chunk(layer, c, priority)),
        )
        .await?;
        if let [only] = &pieces[..] {
            let c = wanted[0];
            return Ok(
                only.slice((offset - c.file_offset) as usize..(end - c.file_offset) as usize)
            );
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (c, data) in wanted.iter().zip(&pieces) {
            let from = offset.saturating_sub(c.file_offset) as usize;
            let to = ((end - c.file_offset) as usize).min(data.len());
            out.extend_from_slice(&data[from..to]);
        }
        Ok(out.freeze())
    }

    /// Registers one fetch for each run of missing chunks that lie back to back in the blob, so
    /// that a read spanning several chunks costs one request per run instead of one per chunk.
    /// The chunks are then awaited through [`ContentReader::chunk`] like any other.
    fn start_merged_fetches(&self, layer: usize, wanted: &[&ChunkRef], priority: Priority) {
        let info = &self.layers[layer];
        let mut inflight = self.inflight.lock().unwrap();
        let mut groups: Vec<Vec<ChunkRef>> = Vec::new();
        let mut run: Vec<ChunkRef> = Vec::new();
        // The furthest blob byte the current run needs.
        let mut run_reach = 0u64;
        for &c in wanted {
            let key = ChunkKey::of(&info.descriptor.digest, c);
            let missing = key.as_ref().is_some_and(|k| !inflight.contains_key(k))
                && !self.fetcher.holds(&info.descriptor.digest, c);
            let span = match c.source {
                ChunkSource::Compressed { start, end, .. } if missing => Some((start, end)),
                _ => None,
            };
            let Some((start, end)) = span else {
                groups.push(std::mem::take(&mut run));
                continue;
            };
            // Back to back, or overlapping (chunks of one gzip-index span share theirs).
            let extends = run.first().is_some_and(|first| {
                let run_start = compressed_start(first);
                run_start <= start
                    && start <= run_reach
                    && end.max(run_reach) - run_start <= MAX_MERGED_SPAN
            });
            if !extends {
                groups.push(std::mem::take(&mut run));
                run_reach = 0;
            }
            run_reach = run_reach.max(end);
            run.push(c.clone());
        }
        groups.push(run);
        for group in groups.into_iter().filter(|g| g.len() > 1) {
            let keys: Vec<ChunkKey> = group
                .iter()
                .map(|c| ChunkKey::of(&info.descriptor.digest, c).expect("compressed chunk"))
                .collect();
            let shared_priority = SharedPriority::new(priority);
            let run = fetch_run(
                self.fetcher.clone(),
                info.clone(),
                group,
                shared_priority.clone(),
            );
            // Chunks of the run that no reader awaits (amplification) are cached by the run;
            // their in-flight entries must not outlive it.
            let (registry, run_keys) = (self.inflight.clone(), keys.clone());
            let fetch = async move {
                let result = run.await;
                let mut inflight = registry.lock().unwrap();
                for key in &run_keys {
                    inflight.remove(key);
                }
                result
            }
            .boxed()
            .shared();
            for (i, key) in keys.into_iter().enumerate() {
                let one = fetch
                    .clone()
                    .map(move |r| r.map(|all| all[i].clone()))
                    .boxed()
                    .shared();
                inflight.insert(key, (one, shared_priority.clone()));
            }
        }
    }

    /// Requests waiting for a slot, per priority (background, prefetch, reader).
    pub fn queued(&self) -> [usize; 3] {
        self.fetcher.scheduler.queued()
    }

    /// The chunks of `chunks` that neither tier holds.
    pub fn missing(&self, layer: usize, chunks: &[ChunkRef]) -> Vec<ChunkRef> {
        let digest = &self.layers[layer].descriptor.digest;
        chunks
            .iter()
            .filter(|c| !self.fetcher.holds(digest, c))
            .cloned()
            .collect()
    }

    /// Fetches `chunks` (of any files) at `priority` into the caches (background fetches go to
    /// the disk tier only), merging neighbours into one request.
    pub async fn fetch_chunks(
        &self,
        layer: usize,
        chunks: &[ChunkRef],
        priority: Priority,
    ) -> Result<(), Arc<ContentError>> {
        let refs: Vec<&ChunkRef> = chunks.iter().collect();
        self.start_merged_fetches(layer, &refs, priority);
        futures_util::future::try_join_all(chunks.iter().map(|c| self.chunk(layer, c, priority)))
            .await?;
        Ok(())
    }

    /// One verified chunk, from the cache or fetched (once, however many readers want it).
    pub async fn chunk(
        &self,
        layer: usize,
        chunk: &ChunkRef,
        priority: Priority,
    ) -> Result<Bytes, Arc<ContentError>> {
        let info = &self.layers[layer];
        let f = &self.fetcher;
        let Some(key) = ChunkKey::of(&info.descriptor.digest, chunk) else {
            return Ok(Bytes::from(vec![0u8; chunk.size as usize]));
        };
        if let Some(data) = f.cache.get(&key) {
            f.stats.record_hit(&key.layer);
            return Ok(data);
        }
        if let (Some(disk), Some(digest)) = (&f.disk, &chunk.digest)
            && let Some(data) = disk.get(digest)
        {
            f.stats.record_disk_hit(&key.layer);
            f.cache.insert(key, data.clone());
            return Ok(data);
        }
        let fetch = {
            let mut inflight = self.inflight.lock().unwrap();
            let (fetch, shared_priority) = inflight.entry(key.clone()).or_insert_with(|| {
                let (fetcher, info, chunk) = (f.clone(), info.clone(), chunk.clone());
                let shared_priority = SharedPriority::new(priority);
                let request_priority = shared_priority.clone();
                let fetch = async move {
                    let started = Instant::now();
                    let data = refetching(&fetcher, &info, chunk.file_offset, || {
                        fetch_chunk(&fetcher, &info, &chunk, &request_priority)
                    })
                    .await
                    .map_err(Arc::new)?;
                    let layer = &info.descriptor.digest;
                    fetcher.stats.record_miss(layer, started.elapsed());
                    fetcher.keep(layer, &chunk, &data, &request_priority);
                    Ok(data)
                }
                .boxed()
                .shared();
                (fetch, shared_priority)
            });
            // Joining a fetch queued at a lower priority raises it to ours.
            shared_priority.raise(priority);
            fetch.clone()
        };
        let result = fetch.await;
        self.inflight.lock().unwrap().remove(&key);
        result
    }
}

/// `chunks` with the chunks of `list` (a layer's, in blob order) that lie in gaps of at most
/// `max_gap` bytes between two of them; see [`ContentReader::fill_gaps`].
fn fill_gaps(list: &[ChunkRef], chunks: &[ChunkRef], max_gap: u64) -> Vec<ChunkRef> {
    let mut out: Vec<ChunkRef> = Vec::with_capacity(chunks.len());
    for c in chunks {
        if let (Some(prev), ChunkSource::Compressed { start, .. }) = (out.last(), &c.source)
            && let ChunkSource::Compressed { end: prev_end, .. } = prev.source
            && prev_end < *start
            && start - prev_end <= max_gap
        {
            let from = list.partition_point(|n| compressed_start(n) < prev_end);
            let to = list.partition_point(|n| compressed_start(n) < *start);
            out.extend(list[from..to].iter().cloned());
        }
        out.push(c.clone());
    }
    out
}

/// Where a compressed chunk starts in its blob (0 for others, which are never amplified).
fn compressed_start(c: &ChunkRef) -> u64 {
    match c.source {
        ChunkSource::Compressed { start, .. } => start,
        _ => 0,
    }
}

/// Compressed bytes one merged request may span: large enough to cover a few chunks of a big
/// read, small enough that a failed request wastes little.
const MAX_MERGED_SPAN: u64 = 8 << 20;

/// Fetches back-to-back compressed chunks with one ranged request; inflates, verifies and caches
/// each.
async fn fetch_run(
    fetcher: Fetcher,
    info: LayerInfo,
    run: Vec<ChunkRef>,
    priority: SharedPriority,
) -> Result<Arc<Vec<Bytes>>, Arc<ContentError>> {
    let layer = &info.descriptor.digest;
    let span = |c: &ChunkRef| match c.source {
        ChunkSource::Compressed {
            start,
            end,
            inner_offset,
            codec,
        } => (start, end, inner_offset, codec),
        _ => unreachable!("only compressed chunks are merged"),
    };
    let started = Instant::now();
    let base = span(&run[0]).0;
    let last = run
        .iter()
        .map(|c| span(c).1)
        .max()
        .expect("a run is not empty");
    // Chunks sharing a compressed span (one gzip-index span holds many files) are inflated
    // together, once, as far as the furthest of them reaches.
    let mut wanted_len: HashMap<u64, u64> = HashMap::new();
    for c in &run {
        let (start, _, inner, _) = span(c);
        let len = wanted_len.entry(start).or_default();
        *len = (*len).max(inner + c.size);
    }
    let out = refetching(&fetcher, &info, run[0].file_offset, || async {
        let permit = fetcher.scheduler.acquire_shared(&priority).await;
        let compressed = fetcher.source.read_range(layer, base..last).await?;
        drop(permit);
        let mut out = Vec::with_capacity(run.len());
        let mut inflated: Option<(u64, Bytes)> = None;
        for c in &run {
            let (start, end, inner, codec) = span(c);
            if inflated.as_ref().is_none_or(|(at, _)| *at != start) {
                let piece = compressed.slice((start - base) as usize..(end - base) as usize);
                let data = inflate(&info, start, &piece, codec, 0, wanted_len[&start])?;
                inflated = Some((start, data));
            }
            let (_, span_data) = inflated.as_ref().expect("inflated above");
            let data = span_data.slice(inner as usize..(inner + c.size) as usize);
            verify(layer, start, c, &data)?;
            out.push(data);
        }
        Ok(out)
    })
    .await
    .map_err(Arc::new)?;
    let took = started.elapsed();
    for (c, data) in run.iter().zip(&out) {
        fetcher.stats.record_miss(layer, took);
        fetcher.keep(layer, c, data, &priority);
    }
    Ok(Arc::new(out))
}

/// Runs a fetch again while its bytes fail verification (damaged in transit; what the source
/// stores is checked again on the next try), within the retry policy. Transport failures were
/// already retried by the source. A fetch that still fails is logged once here, however many
/// readers wait on it, and each of them gets EIO.
async fn refetching<T, F, Fut>(
    fetcher: &Fetcher,
    info: &LayerInfo,
    file_offset: u64,
    attempt: F,
) -> Result<T, ContentError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ContentError>>,
{
    let layer = &info.descriptor.digest;
    let what = || format!("chunk at file offset {file_offset} of layer {layer}");
    let result = retry::retry(&fetcher.retry, what, attempt).await;
    if let Err(e) = &result {
        tracing::warn!(source = %fetcher.source.name(), %layer, file_offset, error = %e, "read failed; the next read of this data tries again");
    }
    result
}

impl Transient for ContentError {
    fn verdict(&self) -> Verdict {
        match self {
            ContentError::ChunkDigest { .. } | ContentError::Decompress { .. } => {
                Verdict::Retry(None)
            }
            ContentError::Layer(e) => e.verdict(),
            // Retried by the source already; out-of-range is a caller's mistake.
            ContentError::Source(_) | ContentError::OutOfRange { .. } => Verdict::Fatal,
        }
    }
}

fn verify(layer: &Digest, offset: u64, chunk: &ChunkRef, data: &[u8]) -> Result<(), ContentError> {
    if let Some(expected) = &chunk.digest {
        let actual = Digest::of(data);
        if actual != *expected {
            return Err(ContentError::ChunkDigest {
                layer: layer.clone(),
                offset,
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// Fetches, inflates and verifies one chunk.
async fn fetch_chunk(
    fetcher: &Fetcher,
    info: &LayerInfo,
    chunk: &ChunkRef,
    priority: &SharedPriority,
) -> Result<Bytes, ContentError> {
    let layer = &info.descriptor.digest;
    let source = fetcher.source.as_ref();
    // The slot stays taken while the source backs off between attempts: a registry that asks
    // us to slow down (429, 503) then sees fewer requests from us, not the same number.
    let _permit = fetcher.scheduler.acquire_shared(priority).await;
    let (data, offset) = match chunk.source {
        ChunkSource::Zeros => return Ok(Bytes::from(vec![0u8; chunk.size as usize])),
        ChunkSource::Compressed {
            start,
            end,
            inner_offset,
            codec,
        } => {
            let compressed = source.read_range(layer, start..end).await?;
            (
                inflate(info, start, &compressed, codec, inner_offset, chunk.size)?,
                start,
            )
        }
        ChunkSource::TarStream { offset } => {
            let compression = match info.format {
                LayerFormat::TarStream(c) => c,
                _ => LayerCompression::Gzip,
            };
            let data = tar_stream::restream(
                source,
                &info.descriptor,
                compression,
                offset..offset + chunk.size,
            )
            .await?;
            (data, offset)
        }
    };
    verify(layer, offset, chunk, &data)?;
    Ok(data)
}

fn inflate(
    info: &LayerInfo,
    offset: u64,
    compressed: &Bytes,
    codec: Codec,
    skip: u64,
    size: u64,
) -> Result<Bytes, ContentError> {
    let err = |reason: String| ContentError::Decompress {
        layer: info.descriptor.digest.clone(),
        offset,
        reason,
    };
    let mut reader: Box<dyn Read + '_> = match codec {
        Codec::Identity => {
            let (from, to) = (skip as usize, (skip + size) as usize);
            if to > compressed.len() {
                return Err(err(format!(
                    "span holds {} bytes, the chunk needs {to}",
                    compressed.len()
                )));
            }
            return Ok(compressed.slice(from..to));
        }
        Codec::Deflate { checkpoint } => {
            let point = info
                .checkpoints
                .as_ref()
                .and_then(|points| points.get(checkpoint as usize))
                .ok_or_else(|| err(format!("no checkpoint {checkpoint} in the gzip index")))?;
            let data = gzip_index::inflate_from(point, compressed, (skip + size) as usize)
                .map_err(|e| err(e.to_string()))?;
            return Ok(Bytes::from(data).slice(skip as usize..));
        }
        // One member holds the chunk; anything after it (the next entries' headers) is unused.
        Codec::Gzip => Box::new(flate2::read::GzDecoder::new(&compressed[..])),
        Codec::Zstd => Box::new(
            zstd::stream::read::Decoder::new(&compressed[..]).map_err(|e| err(e.to_string()))?,
        ),
    };
    std::io::copy(&mut reader.by_ref().take(skip), &mut std::io::sink())
        .map_err(|e| err(e.to_string()))?;
    let mut out = vec![0u8; size as usize];
    reader
        .read_exact(&mut out)
        .map_err(|e| err(format!("{e} (wanted {size} bytes after skipping {skip})")))?;
    Ok(Bytes::from(out))
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

    #[test]
    fn small_gaps_between_prefetched_chunks_are_filled() {
        let chunk = |start: u64, end: u64| ChunkRef {
            file_offset: 0,
            size: 1,
            source: ChunkSource::Compressed {
                start,
                end,
                inner_offset: 0,
                codec: Codec::Gzip,
            },
            digest: None,
        };
        // A layer of back-to-back chunks; two wanted ones 20 bytes apart, then a far one.
        let list: Vec<ChunkRef> = (0..10).map(|i| chunk(i * 10, i * 10 + 10)).collect();
        let wanted = [chunk(0, 10), chunk(30, 40), chunk(90, 100)];
        let filled = fill_gaps(&list, &wanted, 25);
        let starts: Vec<u64> = filled.iter().map(compressed_start).collect();
        assert_eq!(starts, [0, 10, 20, 30, 90]);
        assert_eq!(fill_gaps(&list, &wanted, 0).len(), 3);
        assert_eq!(fill_gaps(&[], &wanted, 1000).len(), 3);
    }

    #[test]
    fn inflate_checks_lengths() {
        let layer = LayerInfo {
            descriptor: Descriptor::new(
                crate::model::oci::MEDIA_OCI_LAYER_GZIP,
                Digest::of(b"x"),
                1,
            ),
            format: LayerFormat::Estargz,
            checkpoints: None,
        };
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, b"hello world").unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        assert_eq!(
            &inflate(&layer, 0, &gz, Codec::Gzip, 6, 5).unwrap()[..],
            b"world"
        );
        assert!(inflate(&layer, 0, &gz, Codec::Gzip, 6, 6).is_err());
        let zs = Bytes::from(zstd::encode_all(&b"hello world"[..], 3).unwrap());
        assert_eq!(
            &inflate(&layer, 0, &zs, Codec::Zstd, 0, 5).unwrap()[..],
            b"hello"
        );
        assert!(inflate(&layer, 0, &Bytes::from_static(b"junk"), Codec::Zstd, 0, 1).is_err());
    }
}

//! File content: the reader that turns a read of a file range into verified bytes.
//!
//! A read of `len` bytes at `offset` of a file maps to the chunks that cover that range
//! ([`ChunkRef`]s from the layer's index). Each chunk comes from the cache tiers
//! ([`crate::cache`]) or is fetched. The work is split by job:
//! - [`plan`]: which chunks one request carries (read amplification, gap filling, merged runs);
//! - [`inflight`]: concurrent reads of a chunk share one fetch;
//! - [`fetcher`]: the request (one range, or several in one when the source joins them),
//!   inflating and verification;
//! - [`resume`]: where inflating gzip index spans stopped, for the next read further in;
//! - [`scheduler`]: request slots shared by readers, prefetch and background filling, by
//!   priority.
//!
//! [`ContentReader`] ties them together for one image and is what `cat`, the FUSE mount and the
//! prefetcher call.

pub mod fetcher;
pub mod inflight;
pub mod plan;
pub mod resume;
pub mod scheduler;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};

use crate::cache::ChunkTiers;
use crate::cache::Tier;
use crate::cache::memory::ChunkKey;
use crate::layer::gzip_index::Checkpoints;
use crate::layer::{ChunkRef, ChunkSource, LayerError, LayerFormat};
use crate::model::digest::Digest;
use crate::model::oci::Descriptor;
use crate::source::retry::{RetryPolicy, Transient, Verdict};
use crate::source::stats::FetchStats;
use crate::source::{ImageSource, SourceError};
use fetcher::Fetcher;
use inflight::InFlight;
use scheduler::{Priority, RequestScheduler};

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

/// The layer facts a chunk fetch needs.
#[derive(Clone, Debug)]
pub struct LayerInfo {
    pub descriptor: Descriptor,
    pub format: LayerFormat,
    /// Where inflating can start, for a layer read through a gzip seek index.
    pub checkpoints: Option<Checkpoints>,
}

/// Reads file content of one image through the cache tiers.
pub struct ContentReader {
    fetcher: Fetcher,
    layers: Vec<LayerInfo>,
    inflight: InFlight,
    /// Every compressed chunk of each layer in blob order, for read amplification.
    neighbours: Vec<Vec<ChunkRef>>,
    /// Compressed bytes a reader's request may grow to with the chunks that follow it in the
    /// blob (0: off). See [`ContentReader::with_amplification`].
    amplify: u64,
}

impl ContentReader {
    pub fn new(
        source: Arc<dyn ImageSource>,
        tiers: ChunkTiers,
        layers: Vec<LayerInfo>,
        stats: Arc<FetchStats>,
        scheduler: Arc<RequestScheduler>,
        retry: RetryPolicy,
    ) -> ContentReader {
        ContentReader {
            fetcher: Fetcher {
                source,
                tiers,
                stats,
                scheduler,
                retry: Arc::new(retry),
                resume_points: Arc::default(),
            },
            neighbours: vec![Vec::new(); layers.len()],
            layers,
            inflight: InFlight::default(),
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
    /// that are at most `max_gap` compressed bytes apart ([`plan::fill_gaps`]): a prefetch of
    /// files that sit close together but rarely back to back (a start-up profile's) then costs a
    /// few large requests instead of one per file.
    pub fn fill_gaps(&self, layer: usize, chunks: &[ChunkRef], max_gap: u64) -> Vec<ChunkRef> {
        match self.neighbours.get(layer) {
            Some(list) => plan::fill_gaps(list, chunks, max_gap),
            None => chunks.to_vec(),
        }
    }

    /// A prioritised prefetch of `wanted` (files' chunks in the order they are needed) as
    /// requests over this image's layers: [`plan::prioritised_spans`] with gaps of up to
    /// `max_gap` filled; or, when the source asks for several ranges in one request,
    /// [`plan::need_ordered_spans`] of `window` bytes with gaps of up to `joined_gap` (a gap
    /// then saves a part header, not a round trip).
    pub fn prioritised_spans(
        &self,
        wanted: &[(usize, Vec<ChunkRef>)],
        max_gap: u64,
        joined_gap: u64,
        window: u64,
        max_span: u64,
    ) -> Vec<(usize, Vec<ChunkRef>)> {
        if self.joins_ranges() {
            plan::need_ordered_spans(&self.neighbours, wanted, joined_gap, window, max_span)
        } else {
            plan::prioritised_spans(&self.neighbours, wanted, max_gap, max_span)
        }
    }

    /// Whether the source carries several ranges in one request.
    pub fn joins_ranges(&self) -> bool {
        self.fetcher.source.joins_ranges()
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
                let resumes_at = match last.source {
                    ChunkSource::Compressed {
                        start,
                        inner_offset,
                        codec: crate::layer::Codec::Deflate { .. },
                        ..
                    } => self
                        .fetcher
                        .resume_points
                        .resumes_at(digest, start, inner_offset),
                    _ => 0,
                };
                plan::amplification(
                    &self.neighbours[layer],
                    plan::compressed_start(first),
                    last,
                    self.amplify,
                    resumes_at,
                    |c| self.fetcher.holds(digest, c),
                )
            }
            _ => Vec::new(),
        };
        if wanted.len() + extra.len() > 1 {
            let mut run: Vec<&ChunkRef> = wanted.clone();
            run.extend(extra.iter());
            // Files before the read in its gzip index span come along (they are on the way).
            run.sort_by_key(|c| plan::blob_order(c));
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
        let digest = &info.descriptor.digest;
        let on_the_way = self.on_the_way(layer, wanted);
        let extended: Vec<&ChunkRef>;
        let wanted = if on_the_way.is_empty() {
            wanted
        } else {
            let mut all = wanted.to_vec();
            all.extend(on_the_way.iter());
            all.sort_by_key(|c| plan::blob_order(c));
            all.dedup();
            extended = all;
            &extended
        };
        self.inflight.start_runs(
            digest,
            wanted,
            priority,
            |c| self.fetcher.holds(digest, c),
            self.fetcher.source.joins_ranges(),
            |run, priority, deliver| {
                (self.fetcher.clone())
                    .fetch_run(info.clone(), run, priority, deliver)
                    .boxed()
            },
        );
    }

    /// The chunks of `wanted`'s gzip seek index spans that a request inflates on its way to
    /// them anyway: from where it will resume in the span up to the end of the furthest wanted
    /// chunk. Kept instead of inflated and dropped, they cost no byte more, and a later read of
    /// them (a sibling prefetch that reached a file deep in a span, then a reader of the files
    /// before it) is a hit instead of a second fetch of the span's start: python-app's cold start
    /// from gzip with a seek index fetched such prefixes twice, 0.1-0.3 MB each.
    fn on_the_way(&self, layer: usize, wanted: &[&ChunkRef]) -> Vec<ChunkRef> {
        let digest = &self.layers[layer].descriptor.digest;
        // Per span start: the first wanted output and the end of the furthest, of the chunks
        // this request is to fetch (none when they are all held or in flight).
        let mut spans: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        for c in wanted {
            // Other codecs first: they never have chunks on the way, and the lookups below
            // would cost every merged read of them.
            let ChunkSource::Compressed {
                start,
                inner_offset,
                codec: crate::layer::Codec::Deflate { .. },
                ..
            } = c.source
            else {
                continue;
            };
            let to_fetch = !self.fetcher.holds(digest, c)
                && c.cache_key(digest)
                    .is_some_and(|key| !self.inflight.contains(&key));
            if to_fetch {
                let span = spans.entry(start).or_insert((u64::MAX, 0));
                span.0 = span.0.min(inner_offset);
                span.1 = span.1.max(inner_offset + c.size);
            }
        }
        let list = &self.neighbours[layer];
        let mut out = Vec::new();
        for (start, (first, reach)) in spans {
            let resumes_at = self.fetcher.resume_points.resumes_at(digest, start, first);
            let from = list.partition_point(|n| plan::blob_order(n) < (start, resumes_at));
            let passed: Vec<&ChunkRef> = list[from..]
                .iter()
                .take_while(|n| match n.source {
                    ChunkSource::Compressed {
                        start: n_start,
                        inner_offset,
                        ..
                    } => n_start == start && inner_offset + n.size <= reach,
                    _ => false,
                })
                .filter(|n| !self.fetcher.holds(digest, n))
                .collect();
            // Only after the last one another fetch brings (a request, a start-up pack): one
            // in flight would cut the run in two requests that each inflate from the span's
            // start (a pack's start fetched 40% more that way).
            let in_flight = passed.iter().rposition(|n| {
                n.cache_key(digest)
                    .is_some_and(|key| self.inflight.contains(&key))
            });
            let after = in_flight.map_or(0, |i| i + 1);
            out.extend(passed[after..].iter().map(|n| (*n).clone()));
        }
        out
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

    /// Which of `chunks` the disk tier holds and memory does not: what a read of them would load
    /// from disk.
    pub fn only_on_disk(&self, layer: usize, chunks: &[ChunkRef]) -> Vec<ChunkRef> {
        let digest = &self.layers[layer].descriptor.digest;
        chunks
            .iter()
            .filter(|c| {
                let key = c.cache_key(digest);
                self.fetcher
                    .tiers
                    .only_on_disk(key.as_ref(), c.digest.as_ref())
            })
            .cloned()
            .collect()
    }

    /// Loads `chunk` from the disk tier into memory (blocking file I/O: call it off the runtime's
    /// threads). Nothing is fetched when the disk does not hold it.
    pub fn load_from_disk(&self, layer: usize, chunk: &ChunkRef) {
        let digest = &self.layers[layer].descriptor.digest;
        if let Some(key) = chunk.cache_key(digest) {
            let _ = self.fetcher.tiers.get(&key, chunk.digest.as_ref());
        }
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

    /// Fetches a blob that carries chunks of this image's layers (a start-up pack, see
    /// [`crate::fs::profile_pack`]) in one request at prefetch priority. Meanwhile the
    /// `expected` chunks (those not cached and not in flight) count as in flight, so that their
    /// readers wait for the pack instead of fetching them a second time; `decode` turns the
    /// blob's bytes, as they arrive, into chunks by index into `expected`, and each is verified
    /// against its digest before it is kept or handed over. Returns the expected chunks the
    /// pack did not bring (absent, damaged or cut off; their readers fetch them from the layer)
    /// and how the fetch ended.
    pub async fn fetch_pack<E: std::fmt::Display>(
        &self,
        blob: &Descriptor,
        expected: Vec<(usize, ChunkRef)>,
        mut decode: impl FnMut(&[u8]) -> Result<Vec<(usize, Bytes)>, E>,
    ) -> (Vec<(usize, ChunkRef)>, Result<(), String>) {
        let priority = Priority::Prefetch;
        let mut waiting: Vec<Option<(ChunkKey, tokio::sync::oneshot::Sender<Bytes>)>> = expected
            .iter()
            .map(|(layer, chunk)| {
                let info = self.layers.get(*layer)?.clone();
                let key = chunk.cache_key(&info.descriptor.digest)?;
                if self.fetcher.holds(&info.descriptor.digest, chunk) {
                    return None;
                }
                let (fetcher, chunk) = (self.fetcher.clone(), chunk.clone());
                let fallback = move |priority| fetcher.fetch_one(info, chunk, priority).boxed();
                let sender = self.inflight.expect(key.clone(), priority, fallback)?;
                Some((key, sender))
            })
            .collect();
        let kept_as = scheduler::SharedPriority::new(priority);
        let permit = self.fetcher.scheduler.acquire(priority).await;
        let result = async {
            let mut stream = self
                .fetcher
                .source
                .blob_range(&blob.digest, 0..blob.size)
                .await
                .map_err(|e| e.to_string())?;
            while let Some(piece) = stream.next().await {
                let piece = piece.map_err(|e| e.to_string())?;
                for (i, data) in decode(&piece).map_err(|e| format!("the pack {e}"))? {
                    let Some((key, sender)) = waiting.get_mut(i).and_then(Option::take) else {
                        continue;
                    };
                    let (layer, chunk) = &expected[i];
                    let digest = &self.layers[*layer].descriptor.digest;
                    // Only chunks with a digest are expected (see `profile_pack`); the length
                    // is checked too, for callers that might not.
                    let checked = if data.len() as u64 == chunk.size {
                        fetcher::verify(digest, plan::compressed_start(chunk), chunk, &data)
                            .map_err(|e| e.to_string())
                    } else {
                        Err(format!(
                            "its record of a {}-byte chunk of layer {digest} holds {} bytes",
                            chunk.size,
                            data.len()
                        ))
                    };
                    if let Err(e) = checked {
                        tracing::warn!(
                            "start-up pack {}: {e}; that chunk is fetched from its layer",
                            blob.digest
                        );
                        waiting[i] = Some((key, sender));
                        continue;
                    }
                    self.fetcher.keep(digest, chunk, &data, &kept_as);
                    let _ = sender.send(data);
                    self.inflight.settle(&key);
                }
            }
            Ok(())
        }
        .await;
        drop(permit);
        let missed = waiting
            .into_iter()
            .zip(expected)
            .filter_map(|(waiting, chunk)| {
                let (key, sender) = waiting?;
                // Removed before the sender goes, so that a reader arriving now fetches anew.
                self.inflight.settle(&key);
                drop(sender);
                Some(chunk)
            })
            .collect();
        (missed, result)
    }

    /// One verified chunk, from the cache tiers or fetched (once, however many readers want it).
    pub async fn chunk(
        &self,
        layer: usize,
        chunk: &ChunkRef,
        priority: Priority,
    ) -> Result<Bytes, Arc<ContentError>> {
        let info = &self.layers[layer];
        let f = &self.fetcher;
        let Some(key) = chunk.cache_key(&info.descriptor.digest) else {
            return Ok(Bytes::from(vec![0u8; chunk.size as usize]));
        };
        match f.tiers.get(&key, chunk.digest.as_ref()) {
            Some((data, Tier::Memory)) => {
                f.stats.record_hit(&key.layer);
                return Ok(data);
            }
            Some((data, Tier::Disk)) => {
                f.stats.record_disk_hit(&key.layer);
                return Ok(data);
            }
            None => {}
        }
        self.inflight
            .join_or_start(key, priority, |priority| {
                (f.clone())
                    .fetch_one(info.clone(), chunk.clone(), priority)
                    .boxed()
            })
            .await
    }
}

impl Transient for ContentError {
    fn verdict(&self) -> Verdict {
        match self {
            // A chunk's compressed bytes have no digest of their own: bytes that do not inflate
            // may have been damaged on the way, as may those that fail their digest.
            ContentError::ChunkDigest { .. } | ContentError::Decompress { .. } => Verdict::Damaged,
            ContentError::Layer(e) => e.verdict(),
            // Retried by the source already; out-of-range is a caller's mistake.
            ContentError::Source(_) | ContentError::OutOfRange { .. } => Verdict::Fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;
    use crate::cache::memory::ChunkCache;
    use crate::layer::Codec;
    use crate::model::oci::MEDIA_OCI_LAYER_GZIP;
    use crate::source::memory::{Fault, MemorySource};

    /// One file of `n` chunks of 1000 bytes in a layer where each chunk is its own gzip member,
    /// as in eStargz (or, with [`Codec::Identity`], stored as is).
    struct Layer {
        memory: Arc<MemorySource>,
        info: LayerInfo,
        chunks: Vec<ChunkRef>,
        data: Vec<u8>,
    }

    fn layer(n: usize) -> Layer {
        layer_of(n, Codec::Gzip)
    }

    fn layer_of(n: usize, codec: Codec) -> Layer {
        let (mut blob, mut chunks, mut data) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let piece: Vec<u8> = (0..1000).map(|j| ((i * 7 + j) % 253) as u8).collect();
            let start = blob.len() as u64;
            if codec == Codec::Identity {
                blob.extend(&piece);
            } else {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(&piece).unwrap();
                blob.extend(gz.finish().unwrap());
            }
            chunks.push(ChunkRef {
                file_offset: (i * 1000) as u64,
                size: 1000,
                source: ChunkSource::Compressed {
                    start,
                    end: blob.len() as u64,
                    inner_offset: 0,
                    codec,
                },
                digest: Some(Digest::of(&piece)),
            });
            data.extend(piece);
        }
        let memory = MemorySource::new();
        let size = blob.len() as u64;
        let digest = memory.put(blob);
        Layer {
            memory,
            info: LayerInfo {
                descriptor: Descriptor::new(MEDIA_OCI_LAYER_GZIP, digest, size),
                format: LayerFormat::Estargz,
                checkpoints: None,
            },
            chunks,
            data,
        }
    }

    impl Layer {
        fn reader(&self, scheduler: Arc<RequestScheduler>, amplify: u64) -> ContentReader {
            let retry = RetryPolicy {
                max_attempts: Some(6),
                read_timeout: Duration::from_secs(5),
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
            };
            let tiers = ChunkTiers {
                memory: Arc::new(ChunkCache::new(1 << 20)),
                disk: None,
            };
            let stats = Arc::new(FetchStats::default());
            ContentReader::new(
                self.memory.clone(),
                tiers,
                vec![self.info.clone()],
                stats,
                scheduler,
                retry,
            )
            .with_amplification(vec![(0, self.chunks.clone())], amplify)
        }

        fn size(&self) -> u64 {
            self.data.len() as u64
        }

        /// The blob ranges requested so far.
        fn ranges(&self) -> Vec<std::ops::Range<u64>> {
            self.memory.ranges().into_iter().map(|(_, r)| r).collect()
        }

        fn span(&self, chunks: std::ops::Range<usize>) -> std::ops::Range<u64> {
            plan::compressed_start(&self.chunks[chunks.start])
                ..plan::compressed_start(&self.chunks[chunks.end - 1])
                    + match self.chunks[chunks.end - 1].source {
                        ChunkSource::Compressed { start, end, .. } => end - start,
                        _ => unreachable!(),
                    }
        }
    }

    /// Yields until `done` holds; a few thousand turns of the runtime at most, then fails, so a
    /// broken test fails instead of hanging.
    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("timed out waiting until {what}");
    }

    /// A gzip layer of 30 files of 20 KB (compressible text) and its seek index: one span.
    fn gzip_index_layer() -> (Layer, Vec<Vec<ChunkRef>>) {
        let files: Vec<(String, Vec<u8>)> = (0..30u32)
            .map(|i| {
                let content: Vec<u8> = (0..20_000u32)
                    .flat_map(|j| format!("{} ", (j * 7919 + i * 104729) % 100_003).into_bytes())
                    .take(20_000)
                    .collect();
                (format!("f{i:02}"), content)
            })
            .collect();
        let data = files.iter().flat_map(|(_, c)| c.clone()).collect();
        let blob = crate::layer::gzip(&crate::layer::tar_of(&files));
        let memory = MemorySource::new();
        let descriptor = Descriptor::of(MEDIA_OCI_LAYER_GZIP, &blob);
        let index_blob = crate::layer::gzip_index::build(
            &blob[..],
            &descriptor.digest,
            descriptor.size,
            None,
            4 << 20,
        )
        .unwrap();
        let index = crate::layer::gzip_index::parse(&descriptor, &index_blob).unwrap();
        memory.put(blob);
        let files: Vec<Vec<ChunkRef>> = index
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                crate::layer::EntryKind::File { chunks, .. } => Some(chunks.to_vec()),
                _ => None,
            })
            .collect();
        let layer = Layer {
            memory,
            info: LayerInfo {
                descriptor,
                format: LayerFormat::GzipIndex,
                checkpoints: index.checkpoints.clone(),
            },
            chunks: files.concat(),
            data,
        };
        (layer, files)
    }

    #[tokio::test]
    async fn a_later_read_in_a_gzip_index_span_resumes_where_the_last_request_stopped() {
        let (layer, files) = gzip_index_layer();
        let reader = layer.reader(RequestScheduler::new(4), 0);
        let read = |i: usize| reader.read(0, &files[i], 20_000, 0, 20_000, Priority::Reader);
        let want = |i: usize| &layer.data[i * 20_000..(i + 1) * 20_000];
        assert_eq!(&read(3).await.unwrap()[..], want(3));
        assert_eq!(&read(25).await.unwrap()[..], want(25));
        let ranges = layer.ranges();
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        // The first request runs from the checkpoint to the end of file 3 (files 0-2 come along
        // free); the second starts where that one stopped, not at the checkpoint again.
        let first = &ranges[0];
        assert!(first.end < ranges[1].end, "{ranges:?}");
        // (Inflating stopped at file 3's end, a little before the request's bytes did.)
        assert!(
            ranges[1].start > first.start + (first.end - first.start) * 3 / 4
                && ranges[1].start <= first.end,
            "{ranges:?}"
        );
        // The files between them came along free with the second request.
        assert_eq!(&read(10).await.unwrap()[..], want(10));
        assert_eq!(layer.ranges().len(), 2, "file 10 was fetched again");
    }

    #[tokio::test]
    async fn a_prefetch_deep_in_a_gzip_index_span_keeps_the_files_it_inflates_on_the_way() {
        let (layer, files) = gzip_index_layer();
        // No amplification: only what the request passes through may come along.
        let reader = layer.reader(RequestScheduler::new(4), 0);
        reader
            .fetch_chunks(0, &files[20], Priority::Prefetch)
            .await
            .unwrap();
        assert_eq!(layer.ranges().len(), 1);
        // Files 0-19 were inflated on the way to file 20: kept, they are no second request.
        for i in [0, 7, 19] {
            let got = reader.read(0, &files[i], 20_000, 0, 20_000, Priority::Reader);
            assert_eq!(&got.await.unwrap()[..], &layer.data[i * 20_000..][..20_000]);
        }
        assert_eq!(layer.ranges().len(), 1, "{:?}", layer.ranges());
        // Nothing past the wanted file was kept.
        assert_eq!(reader.missing(0, &files[21]).len(), files[21].len());

        // A fetch of chunks already held fetches nothing, not even the files before them.
        let reader = layer.reader(RequestScheduler::new(4), 0);
        let digest = &layer.info.descriptor.digest;
        for i in [24, 25] {
            for c in &files[i] {
                let data = &layer.data[i * 20_000 + c.file_offset as usize..][..c.size as usize];
                let data = Bytes::copy_from_slice(data);
                let priority = scheduler::SharedPriority::new(Priority::Reader);
                reader.fetcher.keep(digest, c, &data, &priority);
            }
        }
        let held = [files[24].clone(), files[25].clone()].concat();
        reader
            .fetch_chunks(0, &held, Priority::Prefetch)
            .await
            .unwrap();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(layer.ranges().len(), 1, "{:?}", layer.ranges());
    }

    #[tokio::test]
    async fn a_read_across_chunks_is_one_request_and_then_cached() {
        let layer = layer(4);
        let reader = layer.reader(RequestScheduler::new(4), 0);
        let (size, chunks) = (layer.size(), &layer.chunks);
        let got = reader
            .read(0, chunks, size, 500, 2000, Priority::Reader)
            .await;
        assert_eq!(&got.unwrap()[..], &layer.data[500..2500]);
        assert_eq!(layer.ranges(), [layer.span(0..3)]);
        let again = reader
            .read(0, chunks, size, 0, 3000, Priority::Reader)
            .await;
        assert_eq!(&again.unwrap()[..], &layer.data[..3000]);
        assert_eq!(layer.ranges().len(), 1, "served from the cache");
        // A read past the end is cut short, as read(2) is.
        let tail = reader
            .read(0, chunks, size, 3900, 500, Priority::Reader)
            .await;
        assert_eq!(&tail.unwrap()[..], &layer.data[3900..]);
    }

    #[tokio::test]
    async fn scattered_chunks_are_one_request_when_the_source_joins_ranges() {
        let mut layer = layer(10);
        let joining = MemorySource::joining();
        let blob = layer.memory.blob(&layer.info.descriptor, u64::MAX).await;
        joining.put(blob.unwrap());
        layer.memory = joining;
        let reader = layer.reader(RequestScheduler::new(4), 0);
        let pick = |ids: &[usize]| -> Vec<ChunkRef> {
            ids.iter().map(|&i| layer.chunks[i].clone()).collect()
        };
        // Reads of chunks `ids` (1000 bytes each) return the layer's bytes.
        let reads_right = |ids: &'static [usize]| {
            let (reader, layer) = (&reader, &layer);
            async move {
                for &i in ids {
                    let (offset, size) = (i as u64 * 1000, layer.size());
                    let got = reader.read(0, &layer.chunks, size, offset, 1000, Priority::Reader);
                    assert_eq!(&got.await.unwrap()[..], &layer.data[i * 1000..][..1000]);
                }
            }
        };
        reader
            .fetch_chunks(0, &pick(&[0, 2, 3, 6, 9]), Priority::Prefetch)
            .await
            .unwrap();
        // One request for four ranges (2 and 3 lie back to back), none range by range.
        let one = vec![
            layer.span(0..1),
            layer.span(2..4),
            layer.span(6..7),
            layer.span(9..10),
        ];
        assert_eq!(layer.memory.joined(), [one]);
        assert!(layer.ranges().is_empty());
        reads_right(&[0, 2, 3, 6, 9]).await;
        assert_eq!(layer.memory.joined().len(), 1, "served from the cache");

        // A byte damaged in the second range of a request fails that chunk's digest: the request
        // is made again, and only verified bytes are served.
        let second = (layer.span(1..2).end - layer.span(1..2).start) as usize;
        layer
            .memory
            .fault(crate::source::memory::Fault::CorruptAt(second + 3));
        reader
            .fetch_chunks(0, &pick(&[1, 4, 7]), Priority::Prefetch)
            .await
            .unwrap();
        let asked = layer.memory.joined();
        assert_eq!(asked.len(), 3, "{asked:?}");
        assert_eq!(
            asked[1],
            [layer.span(1..2), layer.span(4..5), layer.span(7..8)]
        );
        reads_right(&[1, 4, 7]).await;
        assert_eq!(layer.memory.joined().len(), 3);
    }

    #[tokio::test]
    async fn a_chunk_of_a_merged_run_is_served_before_the_rest_of_the_run_arrives() {
        let layer = layer(4);
        let reader = layer.reader(RequestScheduler::new(4), 0);
        let (size, chunks) = (layer.size(), &layer.chunks);
        // The run's stream stalls after its first chunk's bytes.
        let first_end = layer.span(0..1).end as usize;
        layer.memory.fault(Fault::Stall { after: first_end });
        let reader = Arc::new(reader);
        let whole = tokio::spawn({
            let (reader, chunks) = (reader.clone(), chunks.clone());
            async move {
                reader
                    .read(0, &chunks, size, 0, 4000, Priority::Prefetch)
                    .await
            }
        });
        wait_until("the run is requested", || layer.ranges().len() == 1).await;
        let first = tokio::time::timeout(
            Duration::from_secs(5),
            reader.read(0, chunks, size, 100, 10, Priority::Reader),
        )
        .await
        .expect("the first chunk is served while the run stalls");
        assert_eq!(&first.unwrap()[..], &layer.data[100..110]);
        assert!(!whole.is_finished(), "the rest of the run is still held");
        layer.memory.release();
        assert_eq!(&whole.await.unwrap().unwrap()[..], &layer.data[..]);
        assert_eq!(
            layer.ranges(),
            [layer.span(0..4)],
            "one request for the run"
        );
    }

    #[tokio::test]
    async fn concurrent_reads_of_a_chunk_share_one_fetch() {
        let layer = layer(3);
        let reader = layer.reader(RequestScheduler::new(4), 0);
        let (size, chunks) = (layer.size(), &layer.chunks);
        layer.memory.hold();
        let (a, b, ()) = tokio::join!(
            reader.read(0, chunks, size, 1000, 10, Priority::Reader),
            reader.read(0, chunks, size, 1500, 10, Priority::Prefetch),
            async {
                wait_until("the first request is made", || layer.ranges().len() == 1).await;
                layer.memory.release();
            },
        );
        assert_eq!(&a.unwrap()[..], &layer.data[1000..1010]);
        assert_eq!(&b.unwrap()[..], &layer.data[1500..1510]);
        assert_eq!(layer.ranges(), [layer.span(1..2)]);
    }

    #[tokio::test]
    async fn a_reader_joining_a_background_fetch_raises_its_priority() {
        let layer = layer(4);
        let scheduler = RequestScheduler::new(1);
        let reader = layer.reader(scheduler.clone(), 0);
        let held = scheduler.acquire(Priority::Reader).await;
        let (first, third) = (&layer.chunks[0], &layer.chunks[2]);
        let (background, prefetch, joined, ()) = tokio::join!(
            reader.fetch_chunks(0, std::slice::from_ref(first), Priority::Background),
            reader.fetch_chunks(0, std::slice::from_ref(third), Priority::Prefetch),
            reader.chunk(0, first, Priority::Reader),
            async {
                wait_until("both fetches queue", || {
                    scheduler.queued().iter().sum::<usize>() == 2
                })
                .await;
                drop(held);
            },
        );
        background.unwrap();
        prefetch.unwrap();
        assert_eq!(&joined.unwrap()[..], &layer.data[..1000]);
        // Without the raise, the prefetch would have gone before the background fetch.
        assert_eq!(layer.ranges(), [layer.span(0..1), layer.span(2..3)]);
    }

    #[tokio::test]
    async fn a_corrupt_chunk_is_fetched_again_and_never_served() {
        // Stored as is, a flipped byte still "inflates": only the digest can catch it.
        let layer = layer_of(2, Codec::Identity);
        let reader = layer.reader(RequestScheduler::new(4), 0);
        layer.memory.fault(Fault::Corrupt);
        let got = reader.chunk(0, &layer.chunks[1], Priority::Reader).await;
        assert_eq!(&got.unwrap()[..], &layer.data[1000..]);
        assert_eq!(layer.ranges().len(), 2, "the damaged transfer was repeated");

        let layer = layer_of(2, Codec::Identity);
        let reader = layer.reader(RequestScheduler::new(4), 0);
        for _ in 0..3 {
            layer.memory.fault(Fault::Corrupt);
        }
        let err = reader.chunk(0, &layer.chunks[1], Priority::Reader).await;
        let err = err.expect_err("three corrupt transfers");
        assert!(matches!(*err, ContentError::ChunkDigest { .. }), "{err}");
        assert_eq!(
            layer.ranges().len(),
            3,
            "DAMAGED_ATTEMPTS fetches of the same damage"
        );
        // Nothing bad was kept: the next read fetches and verifies again.
        let got = reader.chunk(0, &layer.chunks[1], Priority::Reader).await;
        assert_eq!(&got.unwrap()[..], &layer.data[1000..]);

        // Damaged differently each time, as on a link that flips bits: not the source's fault,
        // so more than three damaged transfers are outlasted.
        let layer = layer_of(2, Codec::Identity);
        let reader = layer.reader(RequestScheduler::new(4), 0);
        for at in 0..4 {
            layer.memory.fault(Fault::CorruptAt(at));
        }
        let got = reader.chunk(0, &layer.chunks[1], Priority::Reader).await;
        assert_eq!(&got.unwrap()[..], &layer.data[1000..]);
        assert_eq!(
            layer.ranges().len(),
            5,
            "four damaged transfers, then a good one"
        );
    }

    #[tokio::test]
    async fn a_pack_serves_its_verified_chunks_and_leaves_the_rest_to_the_layer() {
        let layer = layer(4);
        let reader = Arc::new(layer.reader(RequestScheduler::new(4), 0));
        // The pack: chunk 0, chunk 1 damaged, chunk 2; chunk 3 is not in it.
        let mut pack = layer.data[..3000].to_vec();
        pack[1500] ^= 1;
        let size = pack.len() as u64;
        let pack = Descriptor::new("application/octet-stream", layer.memory.put(pack), size);
        layer.memory.hold();
        let expected: Vec<(usize, ChunkRef)> =
            layer.chunks.iter().map(|c| (0, c.clone())).collect();
        let fetching = {
            let (reader, pack) = (reader.clone(), pack.clone());
            tokio::spawn(async move {
                let mut received = Vec::new();
                reader
                    .fetch_pack(&pack, expected, |bytes| {
                        received.extend_from_slice(bytes);
                        let whole = received.len() / 1000;
                        let done = (0..whole)
                            .map(|i| (i, Bytes::copy_from_slice(&received[i * 1000..][..1000])))
                            .collect();
                        received.drain(..whole * 1000);
                        Ok::<_, String>(done)
                    })
                    .await
            })
        };
        wait_until("the pack is requested", || {
            !layer.memory.ranges().is_empty()
        })
        .await;
        // A reader of chunk 0 waits for the pack rather than fetching it from the layer.
        let first = {
            let reader = reader.clone();
            let chunk = layer.chunks[0].clone();
            tokio::spawn(async move { reader.chunk(0, &chunk, Priority::Reader).await })
        };
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            layer.memory.ranges().len(),
            1,
            "chunk 0 was fetched beside the pack"
        );
        layer.memory.release();
        assert_eq!(&first.await.unwrap().unwrap()[..], &layer.data[..1000]);
        let (missed, result) = fetching.await.unwrap();
        result.unwrap();
        let missed: Vec<u64> = missed.iter().map(|(_, c)| c.file_offset).collect();
        assert_eq!(missed, [1000, 3000], "the damaged chunk and the absent one");
        assert_eq!(
            layer.memory.ranges(),
            [(pack.digest.clone(), 0..size)],
            "one request, the pack's"
        );
        // Verified chunks are kept; the damaged one is fetched from the layer, right.
        assert!(reader.missing(0, &layer.chunks[..3]).len() == 1);
        let got = reader.chunk(0, &layer.chunks[1], Priority::Reader).await;
        assert_eq!(&got.unwrap()[..], &layer.data[1000..2000]);
        assert_eq!(layer.ranges()[1], layer.span(1..2));
    }

    #[tokio::test]
    async fn amplification_brings_the_following_chunks_in_the_same_request() {
        let layer = layer(6);
        let budget = layer.span(0..3).end;
        let reader = layer.reader(RequestScheduler::new(4), budget);
        let (size, chunks) = (layer.size(), &layer.chunks);
        reader
            .read(0, chunks, size, 0, 10, Priority::Reader)
            .await
            .unwrap();
        assert_eq!(layer.ranges(), [layer.span(0..3)]);
        let got = reader
            .read(0, chunks, size, 2000, 1000, Priority::Reader)
            .await;
        assert_eq!(&got.unwrap()[..], &layer.data[2000..3000]);
        assert_eq!(
            layer.ranges().len(),
            1,
            "chunk 2 came with the first request"
        );

        let plain = layer.reader(RequestScheduler::new(4), 0);
        plain
            .read(0, chunks, size, 0, 10, Priority::Reader)
            .await
            .unwrap();
        assert_eq!(layer.ranges()[1..], [layer.span(0..1)]);
    }
}

//! File content: the reader that turns a read of a file range into verified bytes.
//!
//! A read of `len` bytes at `offset` of a file maps to the chunks that cover that range
//! ([`ChunkRef`]s from the layer's index). Each chunk comes from the cache tiers
//! ([`crate::cache`]) or is fetched. The work is split by job:
//! - [`plan`]: which chunks one request carries (read amplification, gap filling, merged runs);
//! - [`inflight`]: concurrent reads of a chunk share one fetch;
//! - [`fetcher`]: the ranged request, inflating and verification;
//! - [`scheduler`]: request slots shared by readers, prefetch and background filling, by
//!   priority.
//!
//! [`ContentReader`] ties them together for one image and is what `cat`, the FUSE mount and the
//! prefetcher call.

pub mod fetcher;
pub mod inflight;
pub mod plan;
pub mod scheduler;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;

use crate::cache::ChunkTiers;
use crate::cache::Tier;
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
                let digest = digest.clone();
                plan::amplification(
                    &self.neighbours[layer],
                    plan::compressed_start(first),
                    last,
                    self.amplify,
                    |c| self.fetcher.holds(&digest, c),
                )
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
        let digest = &info.descriptor.digest;
        self.inflight.start_runs(
            digest,
            wanted,
            priority,
            |c| self.fetcher.holds(digest, c),
            |run, priority| {
                (self.fetcher.clone())
                    .fetch_run(info.clone(), run, priority)
                    .boxed()
            },
        );
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
            ContentError::ChunkDigest { .. } | ContentError::Decompress { .. } => {
                Verdict::Retry(None)
            }
            ContentError::Layer(e) => e.verdict(),
            // Retried by the source already; out-of-range is a caller's mistake.
            ContentError::Source(_) | ContentError::OutOfRange { .. } => Verdict::Fatal,
        }
    }
}

//! The network side of a chunk read: one request for a chunk or a merged run, inflated
//! and checked against each chunk's digest before anything is kept or returned, so that a
//! corrupted blob, a lying registry or a broken proxy can make a read fail but never return
//! wrong bytes.
//!
//! Requests wait for a slot of the image's [`RequestScheduler`] at their priority. Transport
//! failures are retried by the source below; what fails verification is fetched again here,
//! within the same retry policy, because bytes damaged in transit are worth one more try while
//! a blob that is really corrupt fails every time and then surfaces as EIO.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;

use super::resume::{Lease, ResumePoints};
use super::scheduler::{Priority, RequestScheduler, SharedPriority};
use super::{ContentError, LayerInfo};
use crate::cache::ChunkTiers;
use crate::layer::{ChunkRef, ChunkSource, Codec, LayerFormat, codec, tar_stream};
use crate::model::digest::Digest;
use crate::model::oci::LayerCompression;
use crate::source::retry::{self, RetryPolicy};
use crate::source::stats::FetchStats;
use crate::source::{ImageSource, SourceError};

/// What a fetch needs, cheap to clone into the future that runs it.
#[derive(Clone)]
pub struct Fetcher {
    pub source: Arc<dyn ImageSource>,
    pub tiers: ChunkTiers,
    pub stats: Arc<FetchStats>,
    pub scheduler: Arc<RequestScheduler>,
    pub retry: Arc<RetryPolicy>,
    pub resume_points: Arc<ResumePoints>,
}

impl Fetcher {
    /// Whether either cache tier holds a chunk of `layer`.
    pub fn holds(&self, layer: &Digest, chunk: &ChunkRef) -> bool {
        self.tiers
            .holds(chunk.cache_key(layer).as_ref(), chunk.digest.as_ref())
    }

    pub(super) fn keep(
        &self,
        layer: &Digest,
        chunk: &ChunkRef,
        data: &Bytes,
        priority: &SharedPriority,
    ) {
        let background = priority.get() == Priority::Background;
        self.tiers.keep(
            chunk.cache_key(layer),
            chunk.digest.as_ref(),
            data,
            background,
        );
    }

    /// Fetches, verifies and keeps one chunk.
    pub async fn fetch_one(
        self,
        info: LayerInfo,
        chunk: ChunkRef,
        priority: SharedPriority,
    ) -> Result<Bytes, Arc<ContentError>> {
        let started = Instant::now();
        let data = self
            .refetching(&info, chunk.file_offset, || {
                self.fetch_chunk(&info, &chunk, &priority)
            })
            .await
            .map_err(Arc::new)?;
        let layer = &info.descriptor.digest;
        self.stats.record_miss(layer, started.elapsed());
        self.keep(layer, &chunk, &data, &priority);
        Ok(data)
    }

    /// Fetches a run of compressed chunks (see [`super::plan::merged_runs`]) with one request
    /// (for one range, or for several when the run has holes and the source joins them),
    /// inflating, verifying and keeping each chunk as soon as its bytes are in, and handing it to
    /// `deliver[i]` then: a reader waiting for the first chunk of a 2 MiB run gets it after its
    /// own bytes, not after the whole run's. A retried attempt hands over only the chunks not yet
    /// delivered.
    pub async fn fetch_run(
        self,
        info: LayerInfo,
        run: Vec<ChunkRef>,
        priority: SharedPriority,
        deliver: Vec<tokio::sync::oneshot::Sender<Bytes>>,
    ) -> Result<(), Arc<ContentError>> {
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
        // together, once, as far as the furthest of them reaches ([`codec::RunInflater`]).
        let mut wanted_len: HashMap<u64, u64> = HashMap::new();
        for c in &run {
            let (start, _, inner, _) = span(c);
            let len = wanted_len.entry(start).or_default();
            *len = (*len).max(inner + c.size);
        }
        let deliver: std::sync::Mutex<Vec<Option<_>>> =
            std::sync::Mutex::new(deliver.into_iter().map(Some).collect());
        let first_output = run
            .iter()
            .filter(|c| span(c).0 == base)
            .map(|c| span(c).2)
            .min()
            .unwrap_or_default();
        self.refetching(&info, run[0].file_offset, || async {
            let permit = self.scheduler.acquire_shared(&priority).await;
            let mut inflating =
                codec::RunInflater::new(info.checkpoints.as_ref(), wanted_len.clone());
            let (from, lease) = self
                .resume(layer, &mut inflating, (base, last), first_output, span(&run[0]).3)
                .await;
            let ranges = super::plan::run_ranges(&run, from);
            tracing::trace!(%layer, from, to = last, span_start = base, chunks = run.len(), ranges = ranges.len(), first_output, wanted = wanted_len[&base], "fetching a run");
            let mut stream = if let [range] = &ranges[..] {
                self.source.blob_range(layer, range.clone()).await?
            } else {
                self.source.blob_ranges(layer, &ranges).await?
            };
            // The ranges' bytes arrive back to back; `received` holds them, and `at[k]` is where
            // range k starts in it.
            let (mut at, mut total) = (Vec::with_capacity(ranges.len()), 0u64);
            for r in &ranges {
                at.push(total);
                total += r.end - r.start;
            }
            let mut received = bytes::BytesMut::with_capacity(total as usize);
            let mut k = 0;
            for (i, c) in run.iter().enumerate() {
                let (start, end, inner, codec) = span(c);
                while ranges[k].end < end {
                    k += 1;
                }
                let (range, range_at) = (&ranges[k], at[k] as usize);
                while (received.len() as u64) < at[k] + (end - range.start) {
                    match stream.next().await {
                        Some(piece) => received.extend_from_slice(&piece?),
                        None => {
                            return Err(SourceError::EndedEarly {
                                what: format!(
                                    "{} range(s) within {}..{last} of blob {layer}",
                                    ranges.len(),
                                    ranges[0].start
                                ),
                            }
                            .into());
                        }
                    }
                }
                let data = inflating
                    .chunk(&received[range_at..], range.start, (start, end), codec, inner, c.size)
                    .map_err(|reason| decompress_error(layer, start, reason))?;
                verify(layer, start, c, &data)?;
                if let Some(to) = deliver.lock().unwrap()[i].take() {
                    self.stats.record_miss(layer, started.elapsed());
                    self.keep(layer, c, &data, &priority);
                    let _ = to.send(data);
                }
            }
            self.keep_resume_points(layer, inflating);
            drop((lease, permit));
            Ok(())
        })
        .await
        .map_err(Arc::new)
    }

    /// Runs a fetch again while its bytes fail verification (damaged in transit; what the
    /// source stores is checked again on the next try), within the retry policy; only damage
    /// that repeats counts as the blob's own ([`retry::retry_repeated_damage`]). Transport
    /// failures were already retried by the source. A fetch that still fails is logged once
    /// here, however many readers wait on it, and each of them gets EIO.
    async fn refetching<T, F, Fut>(
        &self,
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
        let result = retry::retry_repeated_damage(&self.retry, what, attempt).await;
        if let Err(e) = &result {
            tracing::warn!(source = %self.source.name(), %layer, file_offset, error = %e, "read failed; the next read of this data tries again");
        }
        result
    }

    /// Fetches, inflates and verifies one chunk.
    async fn fetch_chunk(
        &self,
        info: &LayerInfo,
        chunk: &ChunkRef,
        priority: &SharedPriority,
    ) -> Result<Bytes, ContentError> {
        let layer = &info.descriptor.digest;
        let source = self.source.as_ref();
        // The slot stays taken while the source backs off between attempts: a registry that
        // asks us to slow down (429, 503) then sees fewer requests from us, not the same number.
        let _permit = self.scheduler.acquire_shared(priority).await;
        let (data, offset) = match chunk.source {
            ChunkSource::Zeros => return Ok(Bytes::from(vec![0u8; chunk.size as usize])),
            ChunkSource::Compressed {
                start,
                end,
                inner_offset,
                codec,
            } => {
                let wanted = HashMap::from([(start, inner_offset + chunk.size)]);
                let mut inflating = codec::RunInflater::new(info.checkpoints.as_ref(), wanted);
                let (base, lease) = self
                    .resume(layer, &mut inflating, (start, end), inner_offset, codec)
                    .await;
                tracing::trace!(%layer, from = base, to = end, span_start = start, "fetching a chunk");
                let compressed = source.read_range(layer, base..end).await?;
                let data = inflating
                    .chunk(
                        &compressed,
                        base,
                        (start, end),
                        codec,
                        inner_offset,
                        chunk.size,
                    )
                    .map_err(|reason| decompress_error(layer, start, reason))?;
                self.keep_resume_points(layer, inflating);
                drop(lease);
                (data, start)
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

    /// Starts `inflating` the gzip index span at blob offset `start` of `layer` where an earlier
    /// request stopped, if it stopped before output `first_output` (the first the request
    /// needs) and before `end`; returns the blob offset the request starts at and its claim on
    /// the span ([`ResumePoints::take`]). Other codecs start at `start`.
    async fn resume(
        &self,
        layer: &Digest,
        inflating: &mut codec::RunInflater<'_>,
        (start, end): (u64, u64),
        first_output: u64,
        codec: Codec,
    ) -> (u64, Option<Lease<'_>>) {
        if !matches!(codec, Codec::Deflate { .. }) {
            return (start, None);
        }
        let (point, lease) = self
            .resume_points
            .take(layer, start, first_output, end)
            .await;
        let from = point.map_or(start, |span| inflating.resume(start, span));
        (from, Some(lease))
    }

    fn keep_resume_points(&self, layer: &Digest, inflating: codec::RunInflater<'_>) {
        for (start, span) in inflating.into_spans() {
            self.resume_points.keep(layer, start, span);
        }
    }
}

/// A chunk's decompression error, naming its layer and blob offset.
fn decompress_error(layer: &Digest, offset: u64, reason: String) -> ContentError {
    ContentError::Decompress {
        layer: layer.clone(),
        offset,
        reason,
    }
}

pub(super) fn verify(
    layer: &Digest,
    offset: u64,
    chunk: &ChunkRef,
    data: &[u8],
) -> Result<(), ContentError> {
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

//! A source wrapper that counts every request and byte that passes through it, per layer, into
//! the image's [`FetchStats`] (what `lazylayer stats`, the control socket and the metrics
//! endpoint report). It sits directly above the retrying source, so a retried request counts
//! once per attempt the user would see on the wire, and below the disk-backed source, so a blob
//! served from disk costs no request.
//!
//! Being where every request passes, it is also where each one is logged, at debug level
//! (`LAZYLAYER_LOG=debug`): what was asked for, and for a range its offset and length.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, FetchedManifest};
use crate::model::reference::ManifestSelector;
use crate::source::stats::FetchStats;
use crate::source::{ByteStream, ImageSource, SourceError};

/// Counts requests and bytes of everything fetched through it.
pub struct CountingSource {
    inner: Arc<dyn ImageSource>,
    stats: Arc<FetchStats>,
}

impl CountingSource {
    /// Wraps `source`; the returned counters see every request made through the wrapper.
    pub fn wrap(source: Arc<dyn ImageSource>) -> (Arc<dyn ImageSource>, Arc<FetchStats>) {
        let stats = Arc::new(FetchStats::default());
        let counted = Arc::new(CountingSource {
            inner: source,
            stats: stats.clone(),
        });
        (counted, stats)
    }
}

impl CountingSource {
    /// The stream of blob `digest` that `open` answers with, its bytes counted as they pass and
    /// the wait for its answer noted ([`FetchStats::record_answer`]).
    async fn counted(
        &self,
        digest: &Digest,
        open: impl std::future::Future<Output = Result<ByteStream, SourceError>>,
    ) -> Result<ByteStream, SourceError> {
        let sent = std::time::Instant::now();
        let stream = open.await?;
        self.stats.record_answer(sent.elapsed());
        let stats = self.stats.clone();
        let digest = digest.clone();
        Ok(Box::pin(stream.inspect(move |piece| {
            if let Ok(bytes) = piece {
                stats.record_bytes(&digest, bytes.len() as u64);
            }
        })))
    }
}

#[async_trait]
impl ImageSource for CountingSource {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        tracing::debug!(image = %self.inner.name(), manifest = %selector, "request");
        self.inner.manifest(selector).await
    }

    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError> {
        self.stats.record_request(&descriptor.digest);
        tracing::debug!(blob = %descriptor.digest, size = descriptor.size, "request");
        let data = self.inner.blob(descriptor, limit).await?;
        self.stats
            .record_bytes(&descriptor.digest, data.len() as u64);
        Ok(data)
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        self.stats.record_request(digest);
        tracing::debug!(blob = %digest, start = range.start, len = range.end - range.start, "range request");
        self.counted(digest, self.inner.blob_range(digest, range))
            .await
    }

    async fn blob_ranges(
        &self,
        digest: &Digest,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<ByteStream, SourceError> {
        if !self.inner.joins_ranges() {
            // One request per range below: counted as such.
            for range in ranges {
                self.stats.record_request(digest);
                tracing::debug!(blob = %digest, start = range.start, len = range.end - range.start, "range request");
            }
        } else {
            self.stats.record_request(digest);
            tracing::debug!(blob = %digest, start = ranges.first().map_or(0, |r| r.start), ranges = ranges.len(), len = ranges.iter().map(|r| r.end - r.start).sum::<u64>(), "range request");
        }
        self.counted(digest, self.inner.blob_ranges(digest, ranges))
            .await
    }

    fn joins_ranges(&self) -> bool {
        self.inner.joins_ranges()
    }

    async fn referrers(
        &self,
        subject: &Digest,
        artifact_types: &[&str],
    ) -> Result<Vec<Descriptor>, SourceError> {
        tracing::debug!(subject = %subject, ?artifact_types, "referrers request");
        self.inner.referrers(subject, artifact_types).await
    }
}

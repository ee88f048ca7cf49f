//! Where image bytes come from, behind one trait.
//!
//! The rest of lazylayer (image resolution, formats, the mount) asks an [`ImageSource`] for
//! manifests, small whole blobs and byte ranges of layer blobs; it never knows whether they come
//! from a registry, a local OCI layout or an S3 bucket. Every source returns only
//! verified manifests and small blobs; layer ranges cannot be verified as a whole and are checked
//! chunk by chunk by the format readers.
//!
//! The trait is object-safe (via `async_trait`) because the source is chosen at run time from
//! the reference the user typed, and a boxed future per request is negligible next to a network
//! round trip.

pub mod config;
pub mod counting;
pub mod disk_backed;
pub mod image;
pub mod layout;
#[cfg(test)]
pub mod memory;
pub mod open;
pub mod registry;
pub mod retry;
pub mod retrying;
pub mod s3;
pub mod stats;

use std::ops::Range;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, FetchedManifest};
use crate::model::reference::ManifestSelector;

/// Seconds since the epoch: when a remembered answer (a tag, referrers, a registry's features)
/// was seen, kept in the disk cache's records.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
use crate::source::retry::{Transient, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// What a backend (registry, layout, S3) reported, with its own verdict on retrying.
    /// Each backend converts its error type with `From`, so this module names none of them.
    #[error("{error}")]
    Backend {
        error: Box<dyn std::error::Error + Send + Sync>,
        verdict: Verdict,
    },
    #[error(
        "{what}: no data for {secs:.0} s ({attempts} attempts); the source is down or unreachable \
         (raise --read-timeout to wait longer)"
    )]
    TimedOut {
        what: String,
        secs: f64,
        attempts: u32,
    },
    #[error("{what}: the source ended the stream early")]
    EndedEarly { what: String },
}

impl SourceError {
    /// Wraps a backend's error, keeping its verdict.
    pub fn backend<E>(error: E) -> SourceError
    where
        E: Transient + std::error::Error + Send + Sync + 'static,
    {
        let verdict = error.verdict();
        SourceError::Backend {
            error: Box::new(error),
            verdict,
        }
    }
}

impl Transient for SourceError {
    fn verdict(&self) -> Verdict {
        match self {
            SourceError::Backend { verdict, .. } => *verdict,
            SourceError::TimedOut { .. } => Verdict::Fatal,
            SourceError::EndedEarly { .. } => Verdict::Retry(None),
        }
    }
}

/// `ranges` of a blob as one stream, opened one [`ImageSource::blob_range`] each: what a source
/// that cannot join ranges does for [`ImageSource::blob_ranges`].
pub(crate) async fn range_by_range<S: ImageSource + ?Sized>(
    source: &S,
    digest: &Digest,
    ranges: &[Range<u64>],
) -> Result<ByteStream, SourceError> {
    if let [range] = ranges {
        return source.blob_range(digest, range.clone()).await;
    }
    let mut streams = Vec::with_capacity(ranges.len());
    for range in ranges {
        streams.push(source.blob_range(digest, range.clone()).await?);
    }
    Ok(Box::pin(futures_util::stream::iter(streams).flatten()))
}

/// A stream of blob bytes; see [`ImageSource::blob_range`].
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, SourceError>> + Send>>;

#[async_trait]
pub trait ImageSource: Send + Sync {
    /// What to call this source in messages (`127.0.0.1:5000/test/app`, `oci:/images`).
    fn name(&self) -> String;

    /// Fetches a manifest or index by tag or digest, verified against its digest.
    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError>;

    /// Fetches a whole blob of at most `limit` bytes, verified against the descriptor's digest
    /// and size.
    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError>;

    /// Streams exactly the bytes `range` of a blob, or ends with an error.
    async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError>;

    /// Streams the bytes of `ranges` of a blob (ascending, not overlapping), one range after
    /// the other, or ends with an error. Sources that can carry several ranges in one request
    /// say so with [`ImageSource::joins_ranges`]; the others open one stream per range here.
    async fn blob_ranges(
        &self,
        digest: &Digest,
        ranges: &[Range<u64>],
    ) -> Result<ByteStream, SourceError> {
        range_by_range(self, digest, ranges).await
    }

    /// Whether [`ImageSource::blob_ranges`] costs one request for all its ranges, so that a
    /// fetch of chunks scattered through a blob is better asked for at once than range by
    /// range. Wrappers pass it on.
    fn joins_ranges(&self) -> bool {
        false
    }

    /// Descriptors of the manifests of any of `artifact_types` whose `subject` is the manifest
    /// `subject` (OCI referrers), in the order the registry lists them: one lookup for all the
    /// kinds a caller wants. No default: a wrapper that forgot to pass this on would hide
    /// every published index.
    async fn referrers(
        &self,
        subject: &Digest,
        artifact_types: &[&str],
    ) -> Result<Vec<Descriptor>, SourceError>;

    /// Reads the bytes `range` of a blob into memory.
    async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes, SourceError> {
        let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
        let mut stream = self.blob_range(digest, range).await?;
        while let Some(piece) = stream.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out.freeze())
    }
}

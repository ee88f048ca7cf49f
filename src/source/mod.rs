//! Where image bytes come from, behind one trait.
//!
//! The rest of lazylayer (image resolution, formats, the mount) asks an [`ImageSource`] for
//! manifests, small whole blobs and byte ranges of layer blobs; it never knows whether they come
//! from a registry, a local OCI layout or (later) an object store. Every source returns only
//! verified manifests and small blobs; layer ranges cannot be verified as a whole and are checked
//! chunk by chunk by the format readers.
//!
//! The trait is object-safe (via `async_trait`) because the source is chosen at run time from
//! the reference the user typed, and a boxed future per request is negligible next to a network
//! round trip.

pub mod image;
pub mod layout;
pub mod registry;
pub mod retry;
pub mod s3;

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::model::digest::Digest;
use crate::model::oci::Descriptor;
use crate::model::reference::{ImageRef, ManifestSelector};
use crate::source::layout::{LayoutError, LayoutSource};
use crate::source::registry::{Registry, RegistryConfig, RegistryError, Repository};
use crate::source::retry::{RetryingSource, Transient, Verdict};
use crate::source::s3::{S3Error, S3Source};

/// A manifest as a source served it, already checked against its digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    /// What the source said the media type is (HTTP `Content-Type`, or the layout's index
    /// entry); the JSON's own `mediaType` wins when set.
    pub media_type: Option<String>,
    pub digest: Digest,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    S3(#[from] S3Error),
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

impl Transient for SourceError {
    fn verdict(&self) -> Verdict {
        match self {
            SourceError::Registry(e) => e.verdict(),
            // Local files: trying again reads the same bytes.
            SourceError::Layout(_) => Verdict::Fatal,
            SourceError::S3(e) => e.verdict(),
            SourceError::TimedOut { .. } => Verdict::Fatal,
            SourceError::EndedEarly { .. } => Verdict::Retry(None),
        }
    }
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

    /// Descriptors of the manifests of `artifact_type` whose `subject` is the manifest
    /// `subject` (OCI referrers). No default: a wrapper that forgot to pass this on would hide
    /// every published index.
    async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
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

#[async_trait]
impl ImageSource for Repository {
    fn name(&self) -> String {
        self.display_name()
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        Ok(Repository::manifest(self, selector).await?)
    }

    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError> {
        Ok(Repository::blob(self, &descriptor.digest, descriptor.size, limit).await?)
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        let stream = Repository::blob_range(self, digest, range).await?;
        Ok(Box::pin(stream.map(|r| r.map_err(SourceError::from))))
    }

    async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>, SourceError> {
        Ok(Repository::referrers(self, subject, artifact_type).await?)
    }
}

/// Opens the source a reference names and says which manifest in it the reference means.
/// For a registry this makes one request (`GET /v2/`) so that a wrong host, a dead registry or
/// a non-registry URL is reported before anything else.
pub async fn open(
    reference: &ImageRef,
    config: &RegistryConfig,
) -> Result<(Arc<dyn ImageSource>, ManifestSelector), SourceError> {
    match reference {
        ImageRef::Registry(r) => {
            let registry = Registry::new(r, config)?;
            let what = || format!("registry {}", r.registry);
            crate::source::retry::retry(&config.retry, what, || async {
                Ok::<_, SourceError>(registry.ping().await?)
            })
            .await?;
            let repo = Arc::new(registry.repository(&r.repository));
            Ok((
                RetryingSource::wrap(repo, config.retry.clone()),
                r.selector(),
            ))
        }
        ImageRef::S3(r) => {
            let what = || format!("s3://{}/{}", r.bucket, r.prefix);
            let s3 = crate::source::retry::retry(&config.retry, what, || async {
                S3Source::open(r, &config.s3, config.connect_timeout, config.stall_timeout)
                    .await
                    .map_err(SourceError::from)
            })
            .await?;
            let selector = s3.selector(r)?;
            Ok((
                RetryingSource::wrap(Arc::new(s3), config.retry.clone()),
                selector,
            ))
        }
        ImageRef::Layout(l) => {
            let layout = LayoutSource::open(&l.path)?;
            let selector = layout.selector(l)?;
            Ok((Arc::new(layout), selector))
        }
    }
}

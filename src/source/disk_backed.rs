//! A source wrapper that serves small whole blobs (image configs) from the disk cache when it
//! holds them, verified against their digests, so that remounting an image costs no blob request.
//! Layer ranges pass through: their chunks are cached, verified, one level up by the content
//! reader, which knows their digests.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::cache::disk::DiskCache;
use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, FetchedManifest};
use crate::model::reference::ManifestSelector;
use crate::source::{ByteStream, ImageSource, SourceError};

/// A source whose small whole blobs (image configs) come from the disk cache when it has them,
/// verified against their digests, so that remounting an image costs no blob request at all.
pub struct DiskBackedSource {
    inner: Arc<dyn ImageSource>,
    disk: Arc<DiskCache>,
}

impl DiskBackedSource {
    pub fn wrap(inner: Arc<dyn ImageSource>, disk: Arc<DiskCache>) -> Arc<dyn ImageSource> {
        Arc::new(DiskBackedSource { inner, disk })
    }
}

#[async_trait]
impl ImageSource for DiskBackedSource {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        self.inner.manifest(selector).await
    }

    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError> {
        let name = format!("blob-{}", descriptor.digest.hex());
        if let Some(cached) = self.disk.get_meta(&name)
            && cached.len() as u64 == descriptor.size
            && Digest::of(&cached) == descriptor.digest
        {
            return Ok(Bytes::from(cached));
        }
        let data = self.inner.blob(descriptor, limit).await?;
        self.disk.put_meta(&name, &data);
        Ok(data)
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        self.inner.blob_range(digest, range).await
    }
    async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>, SourceError> {
        self.inner.referrers(subject, artifact_type).await
    }
}

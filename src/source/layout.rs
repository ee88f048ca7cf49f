//! Images in a local OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/`).
//!
//! Used for `oci:PATH[:TAG]` references: inspecting or converting images that were never pushed,
//! and as the simplest [`ImageSource`]. Blobs are read with positional reads; everything is
//! verified the same way as registry content, because a layout on disk can be as corrupt as a
//! response on the wire. Blob paths are built only from validated digests, so a hostile
//! `index.json` cannot point outside `blobs/`.

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use crate::model::digest::{Digest, DigestError};
use crate::model::oci::FetchedManifest;
use crate::model::oci::{Descriptor, ImageIndex, MAX_MANIFEST_BYTES};
use crate::model::reference::{LayoutRef, ManifestSelector};
use crate::source::retry::{Transient, Verdict};
use crate::source::{ByteStream, ImageSource, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not an OCI image layout: {reason}", path.display())]
    NotALayout { path: PathBuf, reason: String },
    #[error("no image tagged `{tag}` in layout {} (tags: {})", path.display(), available.join(", "))]
    TagNotFound {
        path: PathBuf,
        tag: String,
        available: Vec<String>,
    },
    #[error("layout {} holds {count} images; name one as oci:PATH:TAG (tags: {})", path.display(), available.join(", "))]
    Ambiguous {
        path: PathBuf,
        count: usize,
        available: Vec<String>,
    },
    #[error("blob {digest} is missing from layout {}", path.display())]
    BlobMissing { path: PathBuf, digest: Digest },
    #[error("blob {digest} in layout {} is {size} bytes, more than the {limit}-byte limit", path.display())]
    TooLarge {
        path: PathBuf,
        digest: Digest,
        size: u64,
        limit: u64,
    },
    #[error("blob in layout {} failed verification: {source}", path.display())]
    Digest { path: PathBuf, source: DigestError },
    #[error("range {start}-{end} is outside blob {digest} ({size} bytes) in layout {}", path.display())]
    RangeOutside {
        path: PathBuf,
        digest: Digest,
        start: u64,
        end: u64,
        size: u64,
    },
}

impl Transient for LayoutError {
    /// Local files: trying again reads the same bytes.
    fn verdict(&self) -> Verdict {
        Verdict::Fatal
    }
}

impl From<LayoutError> for SourceError {
    fn from(e: LayoutError) -> Self {
        SourceError::backend(e)
    }
}

/// An opened OCI image layout.
pub struct LayoutSource {
    root: PathBuf,
    index: ImageIndex,
}

impl LayoutSource {
    /// Opens the layout at `root`: checks `oci-layout` and parses `index.json`.
    pub fn open(root: &Path) -> Result<LayoutSource, LayoutError> {
        let not_layout = |reason: String| LayoutError::NotALayout {
            path: root.to_path_buf(),
            reason,
        };
        let marker = root.join("oci-layout");
        let marker_text = std::fs::read(&marker)
            .map_err(|e| not_layout(format!("cannot read {}: {e}", marker.display())))?;
        let marker_json: serde_json::Value = serde_json::from_slice(&marker_text)
            .map_err(|e| not_layout(format!("oci-layout is not JSON: {e}")))?;
        if marker_json
            .get("imageLayoutVersion")
            .and_then(|v| v.as_str())
            != Some("1.0.0")
        {
            return Err(not_layout(
                "oci-layout does not declare imageLayoutVersion 1.0.0".into(),
            ));
        }
        let index_path = root.join("index.json");
        let index_bytes = std::fs::read(&index_path).map_err(|source| LayoutError::Io {
            path: index_path.clone(),
            source,
        })?;
        let index: ImageIndex = serde_json::from_slice(&index_bytes)
            .map_err(|e| not_layout(format!("index.json is malformed: {e}")))?;
        Ok(LayoutSource {
            root: root.to_path_buf(),
            index,
        })
    }

    /// Which manifest a layout reference means: its digest, its tag, or the only image.
    pub fn selector(&self, reference: &LayoutRef) -> Result<ManifestSelector, LayoutError> {
        self.index
            .select(reference.tag.as_deref(), reference.digest.as_ref())
            .map_err(|count| LayoutError::Ambiguous {
                path: self.root.clone(),
                count,
                available: self.index.tags(),
            })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    fn open_blob(&self, digest: &Digest) -> Result<(std::fs::File, u64), LayoutError> {
        let path = self.blob_path(digest);
        let file = std::fs::File::open(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                LayoutError::BlobMissing {
                    path: self.root.clone(),
                    digest: digest.clone(),
                }
            } else {
                LayoutError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let len = file
            .metadata()
            .map_err(|source| LayoutError::Io { path, source })?
            .len();
        Ok((file, len))
    }

    /// Reads a whole blob of at most `limit` bytes and verifies it.
    fn read_verified(&self, digest: &Digest, limit: u64) -> Result<Bytes, LayoutError> {
        let (mut file, len) = self.open_blob(digest)?;
        if len > limit {
            return Err(LayoutError::TooLarge {
                path: self.root.clone(),
                digest: digest.clone(),
                size: len,
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes)
            .map_err(|source| LayoutError::Io {
                path: self.blob_path(digest),
                source,
            })?;
        digest
            .verify(&bytes)
            .map_err(|source| LayoutError::Digest {
                path: self.root.clone(),
                source,
            })?;
        Ok(Bytes::from(bytes))
    }

    fn read_range_sync(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes, LayoutError> {
        let (mut file, len) = self.open_blob(digest)?;
        if range.end > len || range.start > range.end {
            return Err(LayoutError::RangeOutside {
                path: self.root.clone(),
                digest: digest.clone(),
                start: range.start,
                end: range.end.saturating_sub(1),
                size: len,
            });
        }
        let io = |source| LayoutError::Io {
            path: self.blob_path(digest),
            source,
        };
        file.seek(SeekFrom::Start(range.start)).map_err(io)?;
        let mut buf = vec![0; (range.end - range.start) as usize];
        file.read_exact(&mut buf).map_err(io)?;
        Ok(Bytes::from(buf))
    }
}

#[async_trait]
impl ImageSource for LayoutSource {
    fn name(&self) -> String {
        format!("oci:{}", self.root.display())
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        let (digest, entry) =
            self.index
                .lookup(selector)
                .ok_or_else(|| LayoutError::TagNotFound {
                    path: self.root.clone(),
                    tag: selector.to_string(),
                    available: self.index.tags(),
                })?;
        let bytes = self.read_verified(&digest, MAX_MANIFEST_BYTES)?;
        Ok(FetchedManifest {
            bytes,
            media_type: entry.map(|e| e.media_type.clone()),
            digest,
        })
    }

    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError> {
        Ok(self.read_verified(&descriptor.digest, limit)?)
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        let bytes = self.read_range_sync(digest, range)?;
        Ok(Box::pin(futures_util::stream::once(
            async move { Ok(bytes) },
        )))
    }
    /// Referrers live in registries only.
    async fn referrers(
        &self,
        _subject: &Digest,
        _artifact_types: &[&str],
    ) -> Result<Vec<Descriptor>, SourceError> {
        Ok(Vec::new())
    }
}

//! A source wrapper that serves what it can from the disk cache, so that a remount costs no
//! request and an image read before mounts while its registry is down.
//!
//! - Manifests by digest and small whole blobs (image configs) come from the cache when it holds
//!   them, verified against their digests: content-addressed, so never stale.
//! - A manifest by tag is always asked of the source (tags move), and the answer is remembered
//!   for that tag. When the source cannot be reached (a transport failure, or no answer within
//!   [`UNREACHABLE_AFTER`]) and the tag was resolved before, the manifest it resolved to last is
//!   used, with a warning that says so and when; what the source refuses (unknown tag, bad
//!   credentials) is reported as it is, never papered over.
//! - Referrers (seek indexes of gzip layers, start-up profiles) are remembered and fall back the
//!   same way. An answer younger than [`REFERRERS_FRESH`] is used without asking: the run that
//!   resolves an image and the process it starts to serve it ask once between them.
//!
//! The wait before falling back is short because a start is waiting on it, paid once per image
//! (after one fallback the referrers fall back at once), and it only applies to a tag or
//! referrers list seen before: with nothing remembered, the source's own retry policy
//! (`--read-timeout`) decides. Layer ranges pass through: their chunks are cached, verified, one
//! level up by the content reader, which knows their digests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cache::disk::DiskCache;
use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, FetchedManifest};
use crate::model::reference::ManifestSelector;
use crate::source::retry::{Transient, Verdict};
use crate::source::{ByteStream, ImageSource, SourceError};

/// How long a tag or referrers request may go unanswered before the remembered answer is used.
/// A reachable registry answers in a few round trips; one that has not answered in 5 s is down
/// or cut off, and the container start waiting on it should not wait for `--read-timeout`.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(5);

/// How long a referrers answer is used without asking again. A minute: an artifact published
/// since is found by the next mount after that, and one start (its processes, its resolutions)
/// asks once.
pub const REFERRERS_FRESH: Duration = Duration::from_secs(60);

/// The referrers of one subject, as stored under `referrers-HEX-KIND`.
#[derive(Serialize, Deserialize)]
struct ReferrersRecord {
    referrers: Vec<Descriptor>,
    /// Seconds since the epoch when the source gave them.
    seen: u64,
}

/// A source whose content-addressed documents come from the disk cache when it has them, and
/// whose tags and referrers fall back to the last answer when the source is unreachable.
pub struct DiskBackedSource {
    inner: Arc<dyn ImageSource>,
    disk: Arc<DiskCache>,
    /// Set once a request fell back: the rest of this image's resolution (the referrers after
    /// its manifest) takes remembered answers without waiting again.
    found_unreachable: AtomicBool,
}

/// A manifest as stored under `manifest-HEX`.
#[derive(Serialize, Deserialize)]
struct StoredManifest {
    media_type: Option<String>,
    /// Manifests are JSON, so UTF-8; one that is not is simply not stored.
    text: String,
}

/// What a tag resolved to, as stored under `tag-HEX` (HEX: SHA-256 of `source:tag`).
#[derive(Serialize, Deserialize)]
struct TagRecord {
    digest: Digest,
    /// Seconds since the Unix epoch, for the warning.
    resolved_at: u64,
}

impl DiskBackedSource {
    pub fn wrap(inner: Arc<dyn ImageSource>, disk: Arc<DiskCache>) -> Arc<dyn ImageSource> {
        Arc::new(DiskBackedSource {
            inner,
            disk,
            found_unreachable: AtomicBool::new(false),
        })
    }

    fn stored_manifest(&self, digest: &Digest) -> Option<FetchedManifest> {
        let stored = self.disk.get_meta(&format!("manifest-{}", digest.hex()))?;
        let stored: StoredManifest = serde_json::from_slice(&stored).ok()?;
        let bytes = Bytes::from(stored.text.into_bytes());
        (Digest::of(&bytes) == *digest).then(|| FetchedManifest {
            bytes,
            media_type: stored.media_type,
            digest: digest.clone(),
        })
    }

    fn store_manifest(&self, manifest: &FetchedManifest) {
        let Ok(text) = std::str::from_utf8(&manifest.bytes) else {
            return;
        };
        let stored = StoredManifest {
            media_type: manifest.media_type.clone(),
            text: text.to_string(),
        };
        let name = format!("manifest-{}", manifest.digest.hex());
        self.disk
            .put_meta(&name, &serde_json::to_vec(&stored).expect("serialises"));
    }

    /// Runs `ask` against the source; with a remembered answer, for at most
    /// [`UNREACHABLE_AFTER`] (not at all once this image's source was found unreachable),
    /// falling back to that answer, after `warn` has said why, when the source cannot be
    /// reached. Returns the answer and whether it is the remembered one.
    async fn or_remembered<T>(
        &self,
        ask: impl std::future::Future<Output = Result<T, SourceError>>,
        remembered: Option<T>,
        warn: impl FnOnce(&str),
    ) -> Result<(T, bool), SourceError> {
        let Some(remembered) = remembered else {
            return Ok((ask.await?, false));
        };
        let wait = match self.found_unreachable.load(Ordering::Relaxed) {
            true => Duration::ZERO,
            false => UNREACHABLE_AFTER,
        };
        let why = match tokio::time::timeout(wait, ask).await {
            Ok(Ok(answer)) => return Ok((answer, false)),
            Ok(Err(e)) if !unreachable(&e) => return Err(e),
            Ok(Err(e)) => e.to_string(),
            Err(_) if wait.is_zero() => "it could not be reached for this image's manifest".into(),
            Err(_) => format!("no answer within {} s", wait.as_secs()),
        };
        self.found_unreachable.store(true, Ordering::Relaxed);
        warn(&why);
        Ok((remembered, true))
    }

    fn tag_record_name(&self, tag: &str) -> String {
        let key = format!("{}:{tag}", self.inner.name());
        format!("tag-{}", Digest::of(key.as_bytes()).hex())
    }

    fn referrers_name(subject: &Digest, artifact_types: &[&str]) -> String {
        let kind = Digest::of(artifact_types.join("\n").as_bytes());
        format!("referrers-{}-{}", subject.hex(), &kind.hex()[..16])
    }
}

/// Whether `e` says the source could not be reached (worth an offline answer), as opposed to a
/// refusal that the remembered answer must not hide.
fn unreachable(e: &SourceError) -> bool {
    matches!(e, SourceError::TimedOut { .. }) || matches!(e.verdict(), Verdict::Retry(_))
}

#[async_trait]
impl ImageSource for DiskBackedSource {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        match selector {
            ManifestSelector::Digest(digest) => {
                if let Some(stored) = self.stored_manifest(digest) {
                    return Ok(stored);
                }
                let fetched = self.inner.manifest(selector).await?;
                self.store_manifest(&fetched);
                Ok(fetched)
            }
            ManifestSelector::Tag(tag) => {
                let record_name = self.tag_record_name(tag);
                let record: Option<TagRecord> = self
                    .disk
                    .get_meta(&record_name)
                    .and_then(|r| serde_json::from_slice(&r).ok());
                let remembered = record
                    .as_ref()
                    .and_then(|r| self.stored_manifest(&r.digest));
                let image = self.inner.name();
                let ask = self.inner.manifest(selector);
                let (fetched, fell_back) = self
                    .or_remembered(ask, remembered, |why| {
                        let (digest, age) = record.as_ref().map_or_else(Default::default, |r| {
                            (
                                r.digest.to_string(),
                                super::now_secs().saturating_sub(r.resolved_at),
                            )
                        });
                        tracing::warn!(
                            "{image}:{tag}: the registry cannot be reached ({why}); using the \
                             manifest this tag named {age} s ago, {digest}, from the cache (the tag \
                             may have moved since; mount by digest to pin it)"
                        );
                    })
                    .await?;
                if !fell_back {
                    self.store_manifest(&fetched);
                    let record = TagRecord {
                        digest: fetched.digest.clone(),
                        resolved_at: super::now_secs(),
                    };
                    self.disk.put_meta(
                        &record_name,
                        &serde_json::to_vec(&record).expect("serialises"),
                    );
                }
                Ok(fetched)
            }
        }
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

    async fn blob_ranges(
        &self,
        digest: &Digest,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<ByteStream, SourceError> {
        self.inner.blob_ranges(digest, ranges).await
    }

    fn joins_ranges(&self) -> bool {
        self.inner.joins_ranges()
    }

    async fn referrers(
        &self,
        subject: &Digest,
        artifact_types: &[&str],
    ) -> Result<Vec<Descriptor>, SourceError> {
        let name = Self::referrers_name(subject, artifact_types);
        let remembered: Option<ReferrersRecord> = self
            .disk
            .get_meta(&name)
            .and_then(|r| serde_json::from_slice(&r).ok());
        if let Some(fresh) = remembered
            .as_ref()
            .filter(|r| super::now_secs().saturating_sub(r.seen) < REFERRERS_FRESH.as_secs())
        {
            return Ok(fresh.referrers.clone());
        }
        let image = self.inner.name();
        let (found, fell_back) = self
            .or_remembered(
                self.inner.referrers(subject, artifact_types),
                remembered.map(|r| r.referrers),
                |why| {
                    tracing::warn!(
                        "{image}@{subject}: the registry cannot be reached ({why}); using the \
                         referrers found last time, from the cache"
                    );
                },
            )
            .await?;
        if !fell_back {
            let record = ReferrersRecord {
                referrers: found.clone(),
                seen: super::now_secs(),
            };
            self.disk
                .put_meta(&name, &serde_json::to_vec(&record).expect("serialises"));
        }
        Ok(found)
    }
}

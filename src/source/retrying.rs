//! A source whose reads are retried by the [`RetryPolicy`], and whose range reads resume.
//!
//! A broken range read is reopened at the first byte not yet handed out instead of fetching the
//! whole range again (moby's pull threw partial layers away; on a bad link that turns one
//! failure into a restart of the largest transfer). The caller sees one uninterrupted stream of
//! exactly the bytes it asked for, or an error once the policy gives up.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, FetchedManifest};
use crate::model::reference::ManifestSelector;
use crate::source::retry::{Backoff, RetryPolicy, Transient, retry};
use crate::source::{ByteStream, ImageSource, SourceError};

/// A source whose reads are retried, and whose range reads resume where they broke off.
pub struct RetryingSource {
    inner: Arc<dyn ImageSource>,
    policy: Arc<RetryPolicy>,
}

impl RetryingSource {
    pub fn wrap(inner: Arc<dyn ImageSource>, policy: RetryPolicy) -> Arc<dyn ImageSource> {
        Arc::new(RetryingSource {
            inner,
            policy: Arc::new(policy),
        })
    }
}

#[async_trait]
impl ImageSource for RetryingSource {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        let what = || format!("manifest {selector} from {}", self.inner.name());
        retry(&self.policy, what, || self.inner.manifest(selector)).await
    }

    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError> {
        let what = || format!("blob {} from {}", descriptor.digest, self.inner.name());
        retry(&self.policy, what, || self.inner.blob(descriptor, limit)).await
    }

    async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>, SourceError> {
        let what = || format!("referrers of {subject} in {}", self.inner.name());
        retry(&self.policy, what, || {
            self.inner.referrers(subject, artifact_type)
        })
        .await
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        let mut resuming = Resuming {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            digest: digest.clone(),
            next: range.start,
            end: range.end,
            stream: None,
        };
        // Open eagerly so that a fatal error (a missing blob) is reported by this call, as the
        // unwrapped source would.
        resuming.open().await?;
        Ok(Box::pin(futures_util::stream::unfold(
            resuming,
            |mut r| async move {
                match r.next_piece().await {
                    Ok(Some(piece)) => Some((Ok(piece), r)),
                    Ok(None) => None,
                    Err(e) => {
                        r.next = r.end; // the stream ends after its error
                        Some((Err(e), r))
                    }
                }
            },
        )))
    }
}

/// A range read that reopens itself at the first missing byte after a failure.
struct Resuming {
    inner: Arc<dyn ImageSource>,
    policy: Arc<RetryPolicy>,
    digest: Digest,
    /// First byte not yet handed out.
    next: u64,
    end: u64,
    stream: Option<ByteStream>,
}

impl Resuming {
    fn describe(&self) -> String {
        format!(
            "bytes {}-{} of blob {} from {}",
            self.next,
            self.end.saturating_sub(1),
            self.digest,
            self.inner.name()
        )
    }

    /// Opens the rest of the range, retrying.
    async fn open(&mut self) -> Result<(), SourceError> {
        let (inner, digest, range) = (&self.inner, &self.digest, self.next..self.end);
        let what = || format!("bytes {range:?} of blob {digest} from {}", inner.name());
        let stream = retry(&self.policy, what, || {
            inner.blob_range(digest, range.clone())
        })
        .await?;
        self.stream = Some(stream);
        Ok(())
    }

    /// The next piece of the range, resuming after failures; `None` at the end.
    async fn next_piece(&mut self) -> Result<Option<Bytes>, SourceError> {
        let policy = self.policy.clone();
        let mut backoff = Backoff::new(&policy);
        loop {
            if self.next >= self.end {
                return Ok(None);
            }
            let failure = match self.stream.as_mut() {
                None => {
                    let range = self.next..self.end;
                    let opened = tokio::time::timeout(
                        backoff.remaining(),
                        self.inner.blob_range(&self.digest, range),
                    )
                    .await;
                    match opened {
                        Ok(Ok(s)) => {
                            self.stream = Some(s);
                            continue;
                        }
                        Ok(Err(e)) => e,
                        Err(_) => return Err(timed_out(&backoff, self.describe())),
                    }
                }
                Some(stream) => {
                    match tokio::time::timeout(backoff.remaining(), stream.next()).await {
                        Ok(Some(Ok(piece))) => {
                            let take = piece.len().min((self.end - self.next) as usize);
                            self.next += take as u64;
                            return Ok(Some(piece.slice(..take)));
                        }
                        Ok(Some(Err(e))) => e,
                        Ok(None) => SourceError::EndedEarly {
                            what: self.describe(),
                        },
                        Err(_) => return Err(timed_out(&backoff, self.describe())),
                    }
                }
            };
            self.stream = None;
            match backoff.failed(failure.verdict()) {
                Some(wait) => {
                    tracing::debug!(read = %self.describe(), error = %failure, ?wait, "resuming range read");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(failure),
            }
        }
    }
}

/// The error for a read that went `--read-timeout` without a byte.
fn timed_out(backoff: &Backoff, what: String) -> SourceError {
    let (timeout, attempts) = backoff.give_up();
    SourceError::TimedOut {
        what,
        secs: timeout.as_secs_f64(),
        attempts,
    }
}

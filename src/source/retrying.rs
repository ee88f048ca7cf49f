//! A source whose reads are retried by the [`RetryPolicy`], and whose range reads resume.
//!
//! A broken range read (of one range or of several asked for at once) is reopened at the first
//! byte not yet handed out instead of fetching the
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
        artifact_types: &[&str],
    ) -> Result<Vec<Descriptor>, SourceError> {
        let what = || format!("referrers of {subject} in {}", self.inner.name());
        retry(&self.policy, what, || {
            self.inner.referrers(subject, artifact_types)
        })
        .await
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        self.blob_ranges(digest, std::slice::from_ref(&range)).await
    }

    async fn blob_ranges(
        &self,
        digest: &Digest,
        ranges: &[Range<u64>],
    ) -> Result<ByteStream, SourceError> {
        let mut resuming = Resuming {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            digest: digest.clone(),
            rest: ranges.iter().filter(|r| !r.is_empty()).cloned().collect(),
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
                        r.rest.clear(); // the stream ends after its error
                        Some((Err(e), r))
                    }
                }
            },
        )))
    }

    fn joins_ranges(&self) -> bool {
        self.inner.joins_ranges()
    }
}

/// A read of ranges that reopens itself at the first missing byte after a failure.
struct Resuming {
    inner: Arc<dyn ImageSource>,
    policy: Arc<RetryPolicy>,
    digest: Digest,
    /// The bytes not yet handed out, in order.
    rest: Vec<Range<u64>>,
    stream: Option<ByteStream>,
}

impl Resuming {
    fn describe(&self) -> String {
        let more = match self.rest.len() {
            0 | 1 => String::new(),
            n => format!(" and {} more ranges", n - 1),
        };
        let (start, end) = self.rest.first().map_or((0, 0), |r| (r.start, r.end));
        format!(
            "bytes {start}-{}{more} of blob {} from {}",
            end.saturating_sub(1),
            self.digest,
            self.inner.name()
        )
    }

    /// Opens the rest of the ranges, retrying.
    async fn open(&mut self) -> Result<(), SourceError> {
        let (inner, digest, rest) = (&self.inner, &self.digest, &self.rest);
        let described = self.describe();
        let what = || described.clone();
        let stream = retry(&self.policy, what, || inner.blob_ranges(digest, rest)).await?;
        self.stream = Some(stream);
        Ok(())
    }

    /// Marks the first `n` bytes of the rest handed out.
    fn advance(&mut self, mut n: u64) {
        while n > 0 {
            let Some(first) = self.rest.first_mut() else {
                return;
            };
            let take = n.min(first.end - first.start);
            first.start += take;
            n -= take;
            if first.is_empty() {
                self.rest.remove(0);
            }
        }
    }

    /// The next piece of the ranges, resuming after failures; `None` at the end.
    async fn next_piece(&mut self) -> Result<Option<Bytes>, SourceError> {
        let policy = self.policy.clone();
        let mut backoff = Backoff::new(&policy);
        loop {
            if self.rest.is_empty() {
                return Ok(None);
            }
            let failure = match self.stream.as_mut() {
                None => {
                    let opened = tokio::time::timeout(
                        backoff.remaining(),
                        self.inner.blob_ranges(&self.digest, &self.rest),
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
                        // An empty piece is no progress: returning it would start the
                        // caller's next call with a fresh budget, and a source that sends
                        // nothing and breaks, again and again, would be retried forever.
                        Ok(Some(Ok(piece))) if piece.is_empty() => continue,
                        Ok(Some(Ok(piece))) => {
                            let left: u64 = self.rest.iter().map(|r| r.end - r.start).sum();
                            let take = piece.len().min(left as usize);
                            self.advance(take as u64);
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
                    backoff.report(|| self.describe(), &failure);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::source::memory::{Fault, MemorySource};
    use crate::source::retry::Verdict;

    fn quick() -> RetryPolicy {
        RetryPolicy {
            max_attempts: Some(3),
            read_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    fn blob() -> Vec<u8> {
        (0..1000u32).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_broken_range_read_resumes_at_the_first_missing_byte() {
        let memory = MemorySource::new();
        let digest = memory.put(blob());
        memory.fault(Fault::EndEarly { after: 300 });
        memory.fault(Fault::EndEarly { after: 200 });
        let source = RetryingSource::wrap(memory.clone(), quick());
        let got = source.read_range(&digest, 100..900).await.unwrap();
        assert_eq!(&got[..], &blob()[100..900]);
        let ranges: Vec<Range<u64>> = memory.ranges().into_iter().map(|(_, r)| r).collect();
        assert_eq!(ranges, [100..900, 400..900, 600..900]);
    }

    #[tokio::test]
    async fn a_broken_read_of_several_ranges_resumes_with_the_bytes_still_missing() {
        let memory = MemorySource::joining();
        let digest = memory.put(blob());
        // 150 bytes in: the first range and half of the second were handed out.
        memory.fault(Fault::EndEarly { after: 150 });
        let source = RetryingSource::wrap(memory.clone(), quick());
        let ranges = [100..200, 300..400, 500..600];
        let mut stream = source.blob_ranges(&digest, &ranges).await.unwrap();
        let mut got = Vec::new();
        while let Some(piece) = stream.next().await {
            got.extend_from_slice(&piece.unwrap());
        }
        let want: Vec<u8> = ranges
            .iter()
            .flat_map(|r| blob()[r.start as usize..r.end as usize].to_vec())
            .collect();
        assert_eq!(got, want);
        assert_eq!(memory.joined(), [ranges.to_vec(), vec![350..400, 500..600]]);
        assert!(memory.ranges().is_empty());
    }

    #[tokio::test]
    async fn a_read_that_keeps_breaking_gives_up_after_the_attempts() {
        let memory = MemorySource::new();
        let digest = memory.put(blob());
        for _ in 0..3 {
            memory.fault(Fault::EndEarly { after: 0 });
        }
        let source = RetryingSource::wrap(memory.clone(), quick());
        assert!(source.read_range(&digest, 0..1000).await.is_err());
        assert_eq!(memory.ranges().len(), 3, "max_attempts requests, no more");
    }

    #[tokio::test]
    async fn fatal_errors_are_not_retried_and_transient_ones_are() {
        let memory = MemorySource::new();
        let digest = memory.put(blob());
        memory.fault(Fault::Refuse(Verdict::Fatal));
        let source = RetryingSource::wrap(memory.clone(), quick());
        assert!(source.read_range(&digest, 0..10).await.is_err());
        assert_eq!(memory.ranges().len(), 1);

        memory.fault(Fault::Refuse(Verdict::Retry(None)));
        let got = source.read_range(&digest, 0..10).await.unwrap();
        assert_eq!(&got[..], &blob()[..10]);
        assert_eq!(memory.ranges().len(), 3);
    }
}

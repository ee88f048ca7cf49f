//! An in-memory [`ImageSource`] for unit tests of the read path (built only for tests).
//!
//! It holds blobs by digest and logs every request, so that a test can assert what a read cost
//! (how many requests, which ranges) rather than only what it returned; faults queued with
//! [`MemorySource::fault`] break the next range reads in the ways transport and storage do
//! (corrupt bytes, a stream that ends early, a refused request, a stream that stalls). A
//! [`MemorySource::hold`] keeps range reads waiting until released, so that concurrent readers
//! can be lined up. Integration
//! tests talk to the real registry, S3 and layouts instead; this exists so that planning,
//! sharing, retrying and verification are tested without a network or root.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, FetchedManifest};
use crate::model::reference::ManifestSelector;
use crate::source::retry::{Transient, Verdict};
use crate::source::{ByteStream, ImageSource, SourceError};

/// What the next range read does wrong.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Returns the right length with the first byte flipped.
    Corrupt,
    /// Returns the right length with the byte at this index (within the range) flipped.
    CorruptAt(usize),
    /// Sends this many bytes, then fails as a dropped connection does.
    EndEarly { after: usize },
    /// Fails before sending anything, with this verdict.
    Refuse(Verdict),
    /// Sends this many bytes, then the rest only after [`MemorySource::release`] (it holds
    /// later range reads too, as [`MemorySource::hold`] does).
    Stall { after: usize },
}

#[derive(Debug, thiserror::Error)]
#[error("in-memory source: {0}")]
struct MemoryError(&'static str, Verdict);

impl Transient for MemoryError {
    fn verdict(&self) -> Verdict {
        self.1
    }
}

#[derive(Default)]
pub struct MemorySource {
    blobs: Mutex<HashMap<Digest, Bytes>>,
    faults: Mutex<VecDeque<Fault>>,
    /// Every range request, in the order they were made.
    ranges: Mutex<Vec<(Digest, Range<u64>)>>,
    /// Whether it answers several ranges in one request, as a registry does; then those
    /// requests are logged in `joined`, not in `ranges`.
    joins: bool,
    joined: Mutex<Vec<Vec<Range<u64>>>>,
    hold: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

impl MemorySource {
    pub fn new() -> Arc<MemorySource> {
        Arc::new(MemorySource::default())
    }

    /// A source that answers several ranges in one request ([`ImageSource::joins_ranges`]).
    pub fn joining() -> Arc<MemorySource> {
        Arc::new(MemorySource {
            joins: true,
            ..MemorySource::default()
        })
    }

    /// The requests for several ranges at once made so far (of a [`MemorySource::joining`]).
    pub fn joined(&self) -> Vec<Vec<Range<u64>>> {
        self.joined.lock().unwrap().clone()
    }

    /// Stores a blob; returns its digest.
    pub fn put(&self, data: impl Into<Bytes>) -> Digest {
        let data = data.into();
        let digest = Digest::of(&data);
        self.blobs.lock().unwrap().insert(digest.clone(), data);
        digest
    }

    /// Queues a fault for the next range read that has none yet.
    pub fn fault(&self, fault: Fault) {
        self.faults.lock().unwrap().push_back(fault);
    }

    /// Range requests made so far.
    pub fn ranges(&self) -> Vec<(Digest, Range<u64>)> {
        self.ranges.lock().unwrap().clone()
    }

    /// Makes range reads wait (after being logged) until [`MemorySource::release`].
    pub fn hold(&self) {
        *self.hold.lock().unwrap() = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }

    /// Lets every held range read, and all later ones, through.
    pub fn release(&self) {
        if let Some(gate) = self.hold.lock().unwrap().take() {
            gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS);
        }
    }

    /// The bytes of `ranges`, back to back, broken by the next queued fault if any.
    async fn serve(
        &self,
        digest: &Digest,
        ranges: &[Range<u64>],
    ) -> Result<ByteStream, SourceError> {
        let gate = self.hold.lock().unwrap().clone();
        if let Some(gate) = gate {
            let _ = gate.acquire().await.expect("never closed");
        }
        let data = {
            let blobs = self.blobs.lock().unwrap();
            let blob = blobs
                .get(digest)
                .ok_or_else(|| error("no such blob", Verdict::Fatal))?;
            let mut data = Vec::new();
            for range in ranges {
                if range.end > blob.len() as u64 || range.start > range.end {
                    return Err(error("range outside the blob", Verdict::Fatal));
                }
                data.extend_from_slice(&blob[range.start as usize..range.end as usize]);
            }
            Bytes::from(data)
        };
        let fault = self.faults.lock().unwrap().pop_front();
        let pieces: Vec<Result<Bytes, SourceError>> = match fault {
            None => vec![Ok(data)],
            Some(Fault::Corrupt) | Some(Fault::CorruptAt(_)) => {
                let at = match fault {
                    Some(Fault::CorruptAt(at)) => at,
                    _ => 0,
                };
                let mut bad = data.to_vec();
                if let Some(byte) = bad.get_mut(at) {
                    *byte ^= 0xff;
                }
                vec![Ok(Bytes::from(bad))]
            }
            Some(Fault::EndEarly { after }) => vec![
                Ok(data.slice(..after.min(data.len()))),
                Err(error("connection reset", Verdict::Retry(None))),
            ],
            Some(Fault::Refuse(verdict)) => return Err(error("refused", verdict)),
            Some(Fault::Stall { after }) => {
                let gate = self
                    .hold
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(0)))
                    .clone();
                let after = after.min(data.len());
                let (first, rest) = (data.slice(..after), data.slice(after..));
                let rest = async move {
                    let _ = gate.acquire().await.expect("never closed");
                    Ok(rest)
                };
                let stream =
                    futures_util::stream::iter([Ok(first)]).chain(futures_util::stream::once(rest));
                return Ok(Box::pin(stream));
            }
        };
        Ok(Box::pin(futures_util::stream::iter(pieces)))
    }
}

fn error(what: &'static str, verdict: Verdict) -> SourceError {
    SourceError::backend(MemoryError(what, verdict))
}

#[async_trait]
impl ImageSource for MemorySource {
    fn name(&self) -> String {
        "memory".into()
    }

    async fn manifest(&self, _: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        Err(error("holds no manifests", Verdict::Fatal))
    }

    async fn blob(&self, descriptor: &Descriptor, _limit: u64) -> Result<Bytes, SourceError> {
        let blobs = self.blobs.lock().unwrap();
        blobs
            .get(&descriptor.digest)
            .cloned()
            .ok_or_else(|| error("no such blob", Verdict::Fatal))
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        self.ranges
            .lock()
            .unwrap()
            .push((digest.clone(), range.clone()));
        self.serve(digest, std::slice::from_ref(&range)).await
    }

    async fn blob_ranges(
        &self,
        digest: &Digest,
        ranges: &[Range<u64>],
    ) -> Result<ByteStream, SourceError> {
        if !self.joins || ranges.len() == 1 {
            return crate::source::range_by_range(self, digest, ranges).await;
        }
        self.joined.lock().unwrap().push(ranges.to_vec());
        self.serve(digest, ranges).await
    }

    fn joins_ranges(&self) -> bool {
        self.joins
    }

    async fn referrers(&self, _: &Digest, _: &[&str]) -> Result<Vec<Descriptor>, SourceError> {
        Ok(Vec::new())
    }
}

//! Resume points: where inflating a gzip seek index span stopped, kept so that the next read
//! further into that span fetches only what follows.
//!
//! A gzip index span can be entered only at its checkpoint. Without resume points a read in a
//! span whose beginning an earlier request already fetched would fetch and inflate that
//! beginning again: start-up reads walk through a layer's spans file after file, and each of
//! those reads paid for the whole stretch from the checkpoint. Each request's inflater is kept
//! instead, positioned where its bytes ended, and the next request in the span starts there.
//!
//! Trade-offs: a kept inflater is zlib's state, about 40 KiB (mostly deflate's 32 KiB window),
//! so an image keeps them for at most [`RESUME_SPANS`] spans, least recently used going first
//! (the spans a start-up is reading through at once are few), and [`POINTS_PER_SPAN`] per span
//! (readers and prefetches move through one span at different places). A request takes out the
//! point furthest in before what it needs and keeps its own inflater when it has succeeded.
//! What a resumed inflater gives is verified against the chunk digests like any other read.
//!
//! Concurrent reads of one span (a reader and the prefetch of its directory's files, two
//! readers) would each fetch the span from its checkpoint, the same bytes twice at once. A
//! request therefore claims the span while it fetches ([`Lease`]); another that needs output
//! from where one of those started waits for it and resumes where it ended. The claim is
//! taken after the request slot: the request that holds it is already on the wire, so a reader
//! never waits behind a background request still queued for a slot.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use tokio::sync::Notify;

use crate::layer::gzip_index::SpanInflater;
use crate::model::digest::Digest;

/// Spans whose resume points an image keeps, and points kept per span (see the module doc).
const RESUME_SPANS: usize = 48;
const POINTS_PER_SPAN: usize = 3;

/// A span: its layer and the blob offset it starts at.
type SpanKey = (Digest, u64);

/// A request fetching a span now: its id, who to wake when it ends, the output it started at.
type Busy = (u64, Arc<Notify>, u64);

struct State {
    points: LruCache<SpanKey, Vec<SpanInflater>>,
    busy: HashMap<SpanKey, Vec<Busy>>,
    next_id: u64,
}

/// Kept inflaters of one image's gzip index spans, by layer and blob offset of the span.
pub struct ResumePoints {
    state: Mutex<State>,
}

impl Default for ResumePoints {
    fn default() -> Self {
        ResumePoints {
            state: Mutex::new(State {
                points: LruCache::new(NonZeroUsize::new(RESUME_SPANS).expect("not zero")),
                busy: HashMap::new(),
                next_id: 0,
            }),
        }
    }
}

/// A request's claim on a span while it fetches it; dropping it wakes requests waiting for it.
pub struct Lease<'a> {
    points: &'a ResumePoints,
    key: SpanKey,
    id: u64,
    notify: Arc<Notify>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut state = self.points.state.lock().unwrap();
        if let Some(list) = state.busy.get_mut(&self.key) {
            list.retain(|b| b.0 != self.id);
            if list.is_empty() {
                state.busy.remove(&self.key);
            }
        }
        self.notify.notify_waiters();
    }
}

impl ResumePoints {
    /// Claims the span at blob offset `start` of `layer` for a request for its output from
    /// `output` on, whose bytes end at blob offset `end`, with the kept point furthest in that
    /// the request can start at. While another request that started at or before `output`
    /// fetches the span, waits for it to end first: the bytes before `output` are what that
    /// request is fetching, and fetching them twice at once only halves the link for both.
    pub async fn take(
        &self,
        layer: &Digest,
        start: u64,
        output: u64,
        end: u64,
    ) -> (Option<SpanInflater>, Lease<'_>) {
        let key = (layer.clone(), start);
        loop {
            let (id, notify) = {
                let mut state = self.state.lock().unwrap();
                let ahead = state
                    .busy
                    .get(&key)
                    .and_then(|list| list.iter().find(|b| b.2 <= output))
                    .map(|b| (b.0, b.1.clone()));
                match ahead {
                    Some(ahead) => ahead,
                    None => {
                        let point = state.points.get_mut(&key).and_then(|list| {
                            let usable = |p: &SpanInflater| {
                                let (consumed, produced) = p.position();
                                produced <= output && start + consumed < end
                            };
                            let best = (0..list.len())
                                .filter(|&i| usable(&list[i]))
                                .max_by_key(|&i| list[i].produced())?;
                            Some(list.swap_remove(best))
                        });
                        let from = point.as_ref().map_or(0, SpanInflater::produced);
                        let id = state.next_id;
                        state.next_id += 1;
                        let notify = Arc::new(Notify::new());
                        state
                            .busy
                            .entry(key.clone())
                            .or_default()
                            .push((id, notify.clone(), from));
                        let lease = Lease {
                            points: self,
                            key,
                            id,
                            notify,
                        };
                        return (point, lease);
                    }
                }
            };
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // The request may have ended between the lock above and `enable`.
            let still_busy = self
                .state
                .lock()
                .unwrap()
                .busy
                .get(&key)
                .is_some_and(|list| list.iter().any(|b| b.0 == id));
            if still_busy {
                woken.await;
            }
        }
    }

    /// Span output offset where a request for output from `output` on in the span at `start`
    /// of `layer` would start inflating: where the kept point furthest in before it stopped,
    /// or 0.
    pub fn resumes_at(&self, layer: &Digest, start: u64, output: u64) -> u64 {
        let state = self.state.lock().unwrap();
        state
            .points
            .peek(&(layer.clone(), start))
            .into_iter()
            .flatten()
            .map(SpanInflater::produced)
            .filter(|&produced| produced <= output)
            .max()
            .unwrap_or(0)
    }

    /// Keeps `span` (of the span at `start` of `layer`); of a span's points, the one least far
    /// in goes when there are too many.
    pub fn keep(&self, layer: &Digest, start: u64, mut span: SpanInflater) {
        // Only its state is kept: the output it gave (up to a span's worth) is delivered.
        span.continue_to(span.produced());
        let mut state = self.state.lock().unwrap();
        let key = (layer.clone(), start);
        let list = state.points.get_or_insert_mut(key, Vec::new);
        if list.iter().any(|p| p.produced() == span.produced()) {
            return;
        }
        list.push(span);
        if list.len() > POINTS_PER_SPAN {
            let least = (0..list.len())
                .min_by_key(|&i| list[i].produced())
                .expect("not empty");
            list.swap_remove(least);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use bytes::Bytes;

    use super::*;
    use crate::layer::gzip_index::Checkpoint;

    #[tokio::test]
    async fn a_kept_point_keeps_its_position_not_its_output_and_serves_only_later_reads() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut deflate =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        deflate.write_all(&data).unwrap();
        let blob = deflate.finish().unwrap();
        let start = Checkpoint {
            input: 0,
            bits: 0,
            output: 0,
            window: Bytes::new(),
        };
        let mut span = SpanInflater::new(&start, 100_000).unwrap();
        span.feed(&blob).unwrap();
        let (consumed, produced) = span.position();
        assert_eq!(produced, 100_000);
        let layer = Digest::of(b"layer");
        let points = ResumePoints::default();
        let end = blob.len() as u64;
        points.keep(&layer, 0, span);
        // A read of output before where it stopped cannot use it.
        let (none, lease) = points.take(&layer, 0, 50_000, end).await;
        assert!(none.is_none());
        drop(lease);
        let (kept, _lease) = points.take(&layer, 0, 100_000, end).await;
        let mut kept = kept.expect("kept for a read from where it stopped");
        assert_eq!(kept.position(), (consumed, produced));
        assert!(kept.get(0, 1).is_none(), "its output was kept too");
        kept.continue_to(data.len() as u64);
        kept.feed(&blob[consumed as usize..]).unwrap();
        assert!(kept.get(100_000, 100_000) == Some(&data[100_000..200_000]));
    }
}

//! In-flight deduplication: concurrent reads of the same chunk share one fetch.
//!
//! The first reader of a missing chunk starts its fetch as a shared future under the chunk's key;
//! later readers await the same future, and one that is more urgent raises the priority its
//! request waits at (a prefetch that a reader catches up with must not keep the reader queued
//! behind other prefetches). A merged run registers each of its chunks, so a reader of any one of
//! them joins the run instead of starting a second request, and gets its chunk as soon as the
//! run has verified it (a oneshot per chunk), not when the whole run is in. A run is spawned:
//! readers that got their chunks stop polling, and the run must still finish the chunks it
//! keeps for others (amplification) and give its request slot back.
//!
//! Entries are removed when their fetch completes, whether it succeeded or not: a failed fetch
//! is not remembered, the next read tries again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::sync::oneshot;

use super::ContentError;
use super::plan;
use super::scheduler::{Priority, SharedPriority};
use crate::cache::memory::ChunkKey;
use crate::layer::ChunkRef;
use crate::model::digest::Digest;
use crate::source::SourceError;

pub type Fetch<T> = BoxFuture<'static, Result<T, Arc<ContentError>>>;
type SharedFetch = Shared<Fetch<Bytes>>;

/// The fetches in flight for one image, by chunk.
#[derive(Clone, Default)]
pub struct InFlight {
    fetches: Arc<Mutex<HashMap<ChunkKey, (SharedFetch, SharedPriority)>>>,
}

impl InFlight {
    /// The chunk `key`: joins its fetch in flight, raising it to `priority`, or starts one with
    /// `start`, which gets the priority its request is to wait at.
    pub async fn join_or_start(
        &self,
        key: ChunkKey,
        priority: Priority,
        start: impl FnOnce(SharedPriority) -> Fetch<Bytes>,
    ) -> Result<Bytes, Arc<ContentError>> {
        let fetch = {
            let mut fetches = self.fetches.lock().unwrap();
            let (fetch, shared_priority) = fetches.entry(key.clone()).or_insert_with(|| {
                let shared_priority = SharedPriority::new(priority);
                (start(shared_priority.clone()).shared(), shared_priority)
            });
            shared_priority.raise(priority);
            fetch.clone()
        };
        let result = fetch.await;
        self.fetches.lock().unwrap().remove(&key);
        result
    }

    /// Whether a fetch of the chunk `key` is in flight.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.fetches.lock().unwrap().contains_key(key)
    }

    /// Registers the chunk `key` as on its way from elsewhere (a start-up pack): readers of it
    /// wait for the returned sender's bytes rather than fetching, and if the sender is dropped
    /// without sending they fetch it with `fallback`. `None` when the chunk is already in
    /// flight. The entry stays until [`InFlight::settle`] removes it.
    pub fn expect(
        &self,
        key: ChunkKey,
        priority: Priority,
        fallback: impl FnOnce(SharedPriority) -> Fetch<Bytes> + Send + 'static,
    ) -> Option<oneshot::Sender<Bytes>> {
        let mut fetches = self.fetches.lock().unwrap();
        if fetches.contains_key(&key) {
            return None;
        }
        let (sender, receiver) = oneshot::channel();
        let shared_priority = SharedPriority::new(priority);
        let raised = shared_priority.clone();
        let fetch = async move {
            match receiver.await {
                Ok(data) => Ok(data),
                Err(_) => fallback(raised).await,
            }
        }
        .boxed()
        .shared();
        fetches.insert(key, (fetch, shared_priority));
        Some(sender)
    }

    /// Removes an entry of [`InFlight::expect`]: once its bytes are kept in the cache tiers, or
    /// before its sender is dropped (its readers then fetch it themselves).
    pub fn settle(&self, key: &ChunkKey) {
        self.fetches.lock().unwrap().remove(key);
    }

    /// Starts one fetch (with `start`) for each merged run of the chunks of `wanted` (of
    /// `layer`, in blob order) that are neither `held` nor in flight (runs go across holes when
    /// `joined`, see [`plan::merged_runs`]), and registers each chunk
    /// of the run under its key, so that [`InFlight::join_or_start`] finds it. `start` gets one
    /// sender per chunk of the run, to hand each over as soon as it is verified.
    pub fn start_runs(
        &self,
        layer: &Digest,
        wanted: &[&ChunkRef],
        priority: Priority,
        held: impl Fn(&ChunkRef) -> bool,
        joined: bool,
        start: impl Fn(Vec<ChunkRef>, SharedPriority, Vec<oneshot::Sender<Bytes>>) -> Fetch<()>,
    ) {
        let mut fetches = self.fetches.lock().unwrap();
        let needs_fetch = |c: &ChunkRef| {
            c.cache_key(layer)
                .is_some_and(|k| !fetches.contains_key(&k))
                && !held(c)
        };
        let runs = plan::merged_runs(wanted, needs_fetch, joined);
        for run in runs {
            let keys: Vec<ChunkKey> = run
                .iter()
                .map(|c| c.cache_key(layer).expect("a merged chunk is compressed"))
                .collect();
            let (senders, receivers): (Vec<_>, Vec<_>) =
                keys.iter().map(|_| oneshot::channel()).unzip();
            let shared_priority = SharedPriority::new(priority);
            let fetch = start(run, shared_priority.clone(), senders);
            // Chunks of the run that no reader awaits (amplification) are kept by the run;
            // their entries must not outlive it.
            let (registry, run_keys) = (self.fetches.clone(), keys.clone());
            let task = tokio::spawn(async move {
                let result = fetch.await;
                let mut fetches = registry.lock().unwrap();
                for key in &run_keys {
                    fetches.remove(key);
                }
                result
            });
            let outcome: Fetch<()> = async move {
                task.await
                    .unwrap_or_else(|e| Err(run_ended(format!("a merged fetch ({e})"))))
            }
            .boxed();
            let outcome = outcome.shared();
            for (key, chunk) in keys.into_iter().zip(receivers) {
                let outcome = outcome.clone();
                let one = async move {
                    match chunk.await {
                        Ok(data) => Ok(data),
                        // The run ended without this chunk: it failed, and says why.
                        Err(_) => Err(outcome
                            .await
                            .err()
                            .unwrap_or_else(|| run_ended("a merged fetch".into()))),
                    }
                }
                .boxed()
                .shared();
                fetches.insert(key, (one, shared_priority.clone()));
            }
        }
    }
}

/// The error of a chunk whose run ended without handing it over.
fn run_ended(what: String) -> Arc<ContentError> {
    Arc::new(ContentError::Source(SourceError::EndedEarly { what }))
}

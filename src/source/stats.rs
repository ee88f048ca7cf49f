//! What reading an image cost: requests, bytes, cache hits and fetch latency, per layer.
//!
//! Counters are updated on the hot path, so totals are atomics and the per-layer table is a
//! small map behind a mutex taken once per request or chunk (never per byte). Latency samples
//! are kept in a fixed-size ring per layer, enough for stable percentiles without growing with
//! the life of a mount.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::digest::Digest;

/// Latency samples kept per layer.
const LATENCY_SAMPLES: usize = 4096;

#[derive(Debug, Default)]
struct LayerCounters {
    requests: u64,
    bytes: u64,
    cache_hits: u64,
    disk_hits: u64,
    cache_misses: u64,
    latencies_us: Vec<u32>,
    next_sample: usize,
}

/// Counters shared by everything that fetches for one image.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Requests sent to the source (ranged GETs, whole-blob streams, config and TOC reads).
    pub requests: AtomicU64,
    /// Bytes received from the source.
    pub bytes: AtomicU64,
    pub cache_hits: AtomicU64,
    /// Chunks found on disk after a memory miss (they are not counted as misses).
    pub disk_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Set once background filling has fetched everything (or when there is none to do).
    pub background_complete: std::sync::atomic::AtomicBool,
    /// Set once prioritised files (eStargz landmark, learned profile) have been prefetched, or
    /// at once when there are none.
    pub profile_prefetched: std::sync::atomic::AtomicBool,
    /// The shortest wait for a range request's answer to begin, in microseconds (0: none yet):
    /// about one round trip to the source, what a prefetch sizes its requests in flight by.
    quickest_answer_us: AtomicU64,
    layers: Mutex<HashMap<Digest, LayerCounters>>,
}

impl FetchStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn layer(&self, digest: &Digest, update: impl FnOnce(&mut LayerCounters)) {
        let mut layers = self.layers.lock().unwrap();
        update(layers.entry(digest.clone()).or_default());
    }

    /// Notes that a range request's answer began `took` after it was sent.
    pub fn record_answer(&self, took: Duration) {
        let us = (took.as_micros() as u64).max(1);
        let _ = self
            .quickest_answer_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                (now == 0 || us < now).then_some(us)
            });
    }

    /// About one round trip to the source: the quickest answer to a range request so far.
    pub fn round_trip(&self) -> Option<Duration> {
        match self.quickest_answer_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub fn record_request(&self, digest: &Digest) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.layer(digest, |c| c.requests += 1);
    }

    pub fn record_bytes(&self, digest: &Digest, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.layer(digest, |c| c.bytes += n);
    }

    pub fn record_hit(&self, digest: &Digest) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
        self.layer(digest, |c| c.cache_hits += 1);
    }

    pub fn record_disk_hit(&self, digest: &Digest) {
        self.disk_hits.fetch_add(1, Ordering::Relaxed);
        self.layer(digest, |c| c.disk_hits += 1);
    }

    /// A chunk that had to be fetched, and how long the fetch took.
    pub fn record_miss(&self, digest: &Digest, took: Duration) {
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        let us = took.as_micros().min(u32::MAX as u128) as u32;
        self.layer(digest, |c| {
            c.cache_misses += 1;
            if c.latencies_us.len() < LATENCY_SAMPLES {
                c.latencies_us.push(us);
            } else {
                c.latencies_us[c.next_sample] = us;
                c.next_sample = (c.next_sample + 1) % LATENCY_SAMPLES;
            }
        });
    }

    /// Per-layer figures for `digest` (zeros for a layer nothing was fetched from).
    pub fn layer_report(&self, digest: &Digest) -> LayerStats {
        let layers = self.layers.lock().unwrap();
        let Some(c) = layers.get(digest) else {
            return LayerStats::default();
        };
        let mut sorted = c.latencies_us.clone();
        sorted.sort_unstable();
        let pct = |p: f64| -> Option<f64> {
            if sorted.is_empty() {
                return None;
            }
            let i = ((sorted.len() - 1) as f64 * p).round() as usize;
            Some(sorted[i] as f64 / 1000.0)
        };
        LayerStats {
            requests: c.requests,
            fetched_bytes: c.bytes,
            cache_hits: c.cache_hits,
            disk_hits: c.disk_hits,
            cache_misses: c.cache_misses,
            fetch_ms_p50: pct(0.5),
            fetch_ms_p90: pct(0.9),
            fetch_ms_p99: pct(0.99),
        }
    }
}

/// One layer's figures, as `lazylayer stats` shows them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerStats {
    pub requests: u64,
    pub fetched_bytes: u64,
    pub cache_hits: u64,
    #[serde(default)]
    pub disk_hits: u64,
    pub cache_misses: u64,
    /// Chunk fetch latency percentiles (fetch, inflate and verify), in milliseconds.
    pub fetch_ms_p50: Option<f64>,
    pub fetch_ms_p90: Option<f64>,
    pub fetch_ms_p99: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_layer_counters_and_percentiles() {
        let stats = FetchStats::default();
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        stats.record_request(&a);
        stats.record_bytes(&a, 100);
        stats.record_hit(&a);
        for ms in 1..=100 {
            stats.record_miss(&a, Duration::from_millis(ms));
        }
        stats.record_request(&b);
        let ra = stats.layer_report(&a);
        assert_eq!(
            (
                ra.requests,
                ra.fetched_bytes,
                ra.cache_hits,
                ra.cache_misses
            ),
            (1, 100, 1, 100)
        );
        assert_eq!(ra.fetch_ms_p50, Some(51.0));
        assert_eq!(ra.fetch_ms_p99, Some(99.0));
        assert_eq!(stats.layer_report(&b).fetch_ms_p50, None);
        assert_eq!(FetchStats::get(&stats.requests), 2);
        // The ring keeps the sample count bounded.
        for _ in 0..LATENCY_SAMPLES * 2 {
            stats.record_miss(&b, Duration::from_millis(1));
        }
        assert_eq!(
            stats.layers.lock().unwrap()[&b].latencies_us.len(),
            LATENCY_SAMPLES
        );
    }
}

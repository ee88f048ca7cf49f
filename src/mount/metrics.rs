//! A Prometheus text endpoint for a running mount (`--metrics-addr`, off by default).
//!
//! Plain HTTP/1.1 on a TCP listener, one response per connection: scrapers need nothing more,
//! and a web framework would be the heaviest dependency of the daemon for one page.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::fs::ImageFs;
use crate::source::stats::FetchStats;

/// The metrics page.
pub fn render(fs: &ImageFs) -> String {
    let stats = fs.stats();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        "lazylayer_fetch_requests_total",
        "counter",
        "Requests sent to the image source, per layer blob.",
    );
    family(
        "lazylayer_fetch_bytes_total",
        "counter",
        "Bytes received from the image source, per layer blob.",
    );
    family(
        "lazylayer_fetch_latency_seconds",
        "summary",
        "Chunk fetch latency (fetch, inflate, verify), per layer.",
    );
    family(
        "lazylayer_cache_hits_total",
        "counter",
        "Chunks served from a cache tier.",
    );
    family(
        "lazylayer_cache_misses_total",
        "counter",
        "Chunks that had to be fetched.",
    );
    family(
        "lazylayer_cache_evictions_total",
        "counter",
        "Chunks evicted to stay within a tier's budget.",
    );
    family(
        "lazylayer_cache_bytes",
        "gauge",
        "Bytes held by a cache tier.",
    );
    family(
        "lazylayer_retries_total",
        "counter",
        "Failed attempts of remote reads that were retried.",
    );
    family(
        "lazylayer_failed_reads_total",
        "counter",
        "Remote reads that failed after their retry budget (readers got EIO).",
    );
    family(
        "lazylayer_queue_depth",
        "gauge",
        "Requests waiting for a slot, per priority.",
    );
    for layer in &fs.layers {
        let l = stats.layer_report(&layer.digest);
        let d = &layer.digest;
        let _ = writeln!(
            out,
            "lazylayer_fetch_requests_total{{layer=\"{d}\"}} {}",
            l.requests
        );
        let _ = writeln!(
            out,
            "lazylayer_fetch_bytes_total{{layer=\"{d}\"}} {}",
            l.fetched_bytes
        );
        for (q, v) in [
            ("0.5", l.fetch_ms_p50),
            ("0.9", l.fetch_ms_p90),
            ("0.99", l.fetch_ms_p99),
        ] {
            if let Some(ms) = v {
                let _ = writeln!(
                    out,
                    "lazylayer_fetch_latency_seconds{{layer=\"{d}\",quantile=\"{q}\"}} {}",
                    ms / 1000.0
                );
            }
        }
    }
    let get = FetchStats::get;
    let disk = fs.disk();
    let _ = writeln!(
        out,
        "lazylayer_cache_hits_total{{tier=\"memory\"}} {}",
        get(&stats.cache_hits)
    );
    let _ = writeln!(
        out,
        "lazylayer_cache_hits_total{{tier=\"disk\"}} {}",
        get(&stats.disk_hits)
    );
    let _ = writeln!(
        out,
        "lazylayer_cache_misses_total {}",
        get(&stats.cache_misses)
    );
    let _ = writeln!(
        out,
        "lazylayer_cache_evictions_total{{tier=\"memory\"}} {}",
        fs.cache().evictions.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "lazylayer_cache_bytes{{tier=\"memory\"}} {}",
        fs.cache().bytes()
    );
    if let Some(disk) = disk {
        let _ = writeln!(
            out,
            "lazylayer_cache_evictions_total{{tier=\"disk\"}} {}",
            disk.evictions()
        );
        let _ = writeln!(
            out,
            "lazylayer_cache_bytes{{tier=\"disk\"}} {}",
            disk.bytes()
        );
    }
    let (retries, exhausted) = crate::source::retry::counters();
    let _ = writeln!(out, "lazylayer_retries_total {retries}");
    let _ = writeln!(out, "lazylayer_failed_reads_total {exhausted}");
    let [background, prefetch, reader] = fs.queued();
    for (priority, n) in [
        ("reader", reader),
        ("prefetch", prefetch),
        ("background", background),
    ] {
        let _ = writeln!(out, "lazylayer_queue_depth{{priority=\"{priority}\"}} {n}");
    }
    out
}

/// Binds the endpoint (before mounting, so a taken port is an error the user sees).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the metrics page until the task is dropped.
pub async fn serve(listener: TcpListener, fs: Arc<ImageFs>) -> std::io::Result<()> {
    loop {
        let (mut conn, _) = listener.accept().await?;
        let body = render(&fs);
        tokio::spawn(async move {
            // The request itself does not matter: every path serves the page.
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

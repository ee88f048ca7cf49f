//! The control socket of a running mount: connect, read one JSON [`StatsReport`], done.
//!
//! A Unix socket rather than a file in the mount: the mounted tree must stay exactly the image's
//! (conformance tests compare it with a reference unpack), and a socket needs no periodic writes.
//! Access is limited by the socket's mode (owner only), like the mount itself.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::fs::ImageFs;
use crate::source::stats::{FetchStats, LayerStats};

/// What `lazylayer stats` shows.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsReport {
    pub image: String,
    pub mountpoint: String,
    pub pid: u32,
    /// Whether the process `pid` serves only this mount and exits once it is unmounted (a
    /// `lazylayer mount`, not the snapshotter): `umount` then waits for it.
    #[serde(default)]
    pub exits_on_unmount: bool,
    pub requests: u64,
    pub fetched_bytes: u64,
    pub cache_hits: u64,
    #[serde(default)]
    pub disk_hits: u64,
    pub cache_misses: u64,
    /// Failed attempts that were retried, and reads that failed after their retry budget.
    #[serde(default)]
    pub retries: u64,
    #[serde(default)]
    pub failed_reads: u64,
    /// Whether background filling has fetched every chunk of the image.
    #[serde(default)]
    pub background_complete: bool,
    /// Whether the files of the image's start-up profile have been prefetched.
    #[serde(default)]
    pub profile_prefetched: bool,
    /// Bytes of chunks held in the memory cache now.
    pub cache_bytes: u64,
    pub layers: Vec<LayerReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LayerReport {
    pub digest: String,
    pub format: String,
    /// Compressed size of the layer blob.
    pub size: u64,
    #[serde(flatten)]
    pub stats: LayerStats,
}

impl StatsReport {
    pub fn new(fs: &ImageFs, mountpoint: &Path, exits_on_unmount: bool) -> StatsReport {
        let stats = fs.stats();
        StatsReport {
            image: fs.image.source.clone(),
            mountpoint: mountpoint.display().to_string(),
            pid: std::process::id(),
            exits_on_unmount,
            requests: FetchStats::get(&stats.requests),
            fetched_bytes: FetchStats::get(&stats.bytes),
            cache_hits: FetchStats::get(&stats.cache_hits),
            disk_hits: FetchStats::get(&stats.disk_hits),
            cache_misses: FetchStats::get(&stats.cache_misses),
            retries: crate::source::retry::counters().0,
            failed_reads: crate::source::retry::counters().1,
            background_complete: stats
                .background_complete
                .load(std::sync::atomic::Ordering::Relaxed),
            profile_prefetched: stats
                .profile_prefetched
                .load(std::sync::atomic::Ordering::Relaxed),
            cache_bytes: fs.cache().bytes(),
            layers: fs
                .layers
                .iter()
                .map(|l| LayerReport {
                    digest: l.digest.to_string(),
                    format: l.format.name().to_string(),
                    size: l.size,
                    stats: stats.layer_report(&l.digest),
                })
                .collect(),
        }
    }
}

/// Creates an owner-only (0600) Unix socket at `socket`, replacing one a dead process left: the
/// stats socket (bound before the mount is reported ready, so that `lazylayer stats` right after
/// `mount --daemon` returns finds it), and `cri-proxy`'s.
pub fn bind(socket: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a daemon that died is in the way; a live one would have answered.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves stats on `listener` until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    fs: Arc<ImageFs>,
    mountpoint: std::path::PathBuf,
    exits_on_unmount: bool,
) -> std::io::Result<()> {
    loop {
        let (mut conn, _) = listener.accept().await?;
        let report = StatsReport::new(&fs, &mountpoint, exits_on_unmount);
        tokio::spawn(async move {
            let json = serde_json::to_vec(&report).expect("stats serialise");
            if let Err(e) = conn.write_all(&json).await {
                warn!("stats client went away: {e}");
            }
        });
    }
}

/// Reads the stats of the mount whose control socket is `socket`.
pub async fn query(socket: &Path) -> std::io::Result<StatsReport> {
    let mut conn = UnixStream::connect(socket).await?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf).await?;
    serde_json::from_slice(&buf).map_err(std::io::Error::other)
}

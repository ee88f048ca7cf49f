//! [`CliError`]: every failure the command line reports, with the image, path or option it
//! concerns and what to do. `main` prints it once, without a `Debug` dump.

use crate::cli::config::ConfigError;
use crate::fetch::ContentError;
use crate::fs::ImageFsError;
use crate::model::reference::ReferenceError;
use crate::source::SourceError;
use crate::source::image::ImageError;

/// Errors of the command-line layer: bad arguments, or a failure below, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("--platform: {0}")]
    Platform(String),
    #[error("--user: {0}")]
    User(String),
    #[error("--{name}: {value} is not a positive number of seconds")]
    Timeout { name: &'static str, value: f64 },
    #[error(
        "--docker-config {path}: no such file; name the config.json that `docker login` wrote, \
         or leave the flag out to use $DOCKER_CONFIG/config.json or ~/.docker/config.json"
    )]
    DockerConfig { path: String },
    #[error(
        "hosts directory {path} does not exist: name containerd's registry hosts directory \
         (DIR/HOST[:PORT]/hosts.toml), or leave the option out for /etc/containerd/certs.d"
    )]
    HostsDir { path: String },
    #[error("--max-attempts: must be at least 1")]
    Attempts,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("image {image}: {source}")]
    Open { image: String, source: ImageFsError },
    #[error("image {image}: {path}: {reason}")]
    Path {
        image: String,
        path: String,
        reason: String,
    },
    #[error("image {image}: {path}: {source}")]
    Read {
        image: String,
        path: String,
        source: std::sync::Arc<ContentError>,
    },
    #[error(
        "image {image}: {path} was printed as it streamed, but its layer could not be verified \
         afterwards, so the output must not be trusted: {source}"
    )]
    Unverified {
        image: String,
        path: String,
        source: Box<crate::layer::LayerError>,
    },
    #[error("{0}")]
    Size(String),
    #[error("--cache-dir {dir}: {source}")]
    CacheDir { dir: String, source: std::io::Error },
    #[error(transparent)]
    Mount(#[from] crate::mount::MountError),
    #[error("{dir}: no lazylayer mount answers there ({socket}: {source})")]
    NoMount {
        dir: String,
        socket: String,
        source: std::io::Error,
    },
    #[error("starting the background daemon: {0}")]
    Daemon(String),
    #[error(transparent)]
    Snapshot(#[from] crate::containerd::snapshotter::SnapshotError),
    #[error(transparent)]
    Pull(#[from] crate::containerd::pull::PullError),
    #[error(transparent)]
    CriProxy(#[from] crate::containerd::cri_proxy::CriProxyError),
    #[error(transparent)]
    Convert(#[from] crate::convert::ConvertError),
    #[error("--{flag} {path}: {reason}")]
    Prioritize {
        flag: &'static str,
        path: String,
        reason: String,
    },
    #[error("--address {address}: {source}")]
    Serve {
        address: String,
        source: std::io::Error,
    },
    #[error("run: {0}")]
    Run(String),
    #[error("{0}")]
    Publish(String),
    #[error("writing to standard output: {0}")]
    Output(std::io::Error),
}

//! What sources need to know to reach their backends: timeouts, credentials, the retry policy
//! and where S3 is. Plain data, so that the CLI, the config file and the snapshotter fill one
//! struct and every backend reads its part of it. Each field's default lives here.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::source::retry::RetryPolicy;

/// How to reach image sources (registries and S3). Defaults suit a registry on the internet;
/// tests shorten timeouts.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Talk plain HTTP to every registry. Off by default: only loopback hosts get plain HTTP
    /// without asking, so credentials never cross a network unencrypted by accident.
    pub plain_http: bool,
    /// Credentials given on the command line; they win over Docker's config file.
    pub credentials: Option<Credentials>,
    /// Docker `config.json` to read credentials from; `None` disables the lookup. Defaults to
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, where `docker login` writes.
    pub docker_config: Option<PathBuf>,
    /// containerd's registry hosts directory (`hosts.toml` per registry: mirrors, CAs, client
    /// certificates; see `source::registry::hosts`); `None` or a missing directory: each registry
    /// is reached directly. Defaults to `/etc/containerd/certs.d`, where containerd's CRI plugin is
    /// usually pointed (`config_path`), so that lazy reads take the paths the node's pulls take.
    pub hosts_dir: Option<PathBuf>,
    /// TCP + TLS connect timeout. 10 s: long enough for a slow TLS handshake across the world,
    /// short enough that a dead registry is reported before a user gives up.
    pub connect_timeout: Duration,
    /// Give up on a response when no bytes arrived for this long. 30 s: registries behind
    /// throttling proxies pause for seconds, but a silent half-minute means a dead connection.
    pub stall_timeout: Duration,
    /// How long a blob redirect target is reused. 5 min: well inside the 20 min that
    /// distribution's S3 driver signs URLs for, and a stale one only costs one retry.
    pub redirect_ttl: Duration,
    /// How failed reads are retried; see [`RetryPolicy`].
    pub retry: RetryPolicy,
    /// Where `s3://` references are read from (endpoint, region); the connect and stall
    /// timeouts and the retry policy above apply to them too.
    pub s3: S3Config,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            plain_http: false,
            credentials: None,
            docker_config: default_docker_config_path(),
            hosts_dir: Some(PathBuf::from("/etc/containerd/certs.d")),
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            redirect_ttl: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            s3: S3Config::default(),
        }
    }
}

/// How to reach S3; every field falls back to the environment as the AWS tools do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct S3Config {
    /// Endpoint of an S3-compatible store (`http://127.0.0.1:9000`); requests then use
    /// path-style addressing, which every such store supports. `None`: AWS itself.
    pub endpoint: Option<String>,
    /// Region to sign for. `None`: from the environment or profile, else `us-east-1`.
    pub region: Option<String>,
}

/// A user name and password (or access token used as password).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ username: {:?}, password: <redacted> }}",
            self.username
        )
    }
}

impl Credentials {
    /// Parses `USER:PASSWORD` as given to `--user`.
    pub fn parse(s: &str) -> Result<Credentials, String> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }),
            _ => Err("expected USER:PASSWORD".to_string()),
        }
    }
}

/// Where Docker keeps `config.json`: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

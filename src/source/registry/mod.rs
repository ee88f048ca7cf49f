//! A client for the OCI distribution API (registry v2), built for lazy reading.
//!
//! Design:
//! - One [`Registry`] per host holds the HTTP connection pool, the auth state and remembered
//!   blob redirects; a [`Repository`] is a cheap handle on one repository of it. Everything is
//!   `Send + Sync` so that FUSE workers, the prefetcher and the snapshotter share one client and
//!   one pool of connections per host.
//! - Manifests and configs are small and fetched whole, size-capped and checked against their
//!   digest before they are returned. Layer blobs are read by byte range and handed out as a
//!   stream, so a reader gets its first byte when it arrives, not when the range completes.
//! - Redirects are followed by hand: a blob GET that answers 307 to an object store or CDN is
//!   retried there *without* the registry's `Authorization` (those URLs carry their own
//!   signature, and our token must not leak to a third party), and the target URL is remembered
//!   for [`RegistryConfig::redirect_ttl`] so later ranges of the same blob skip the registry
//!   round trip. A failing remembered URL (expired signature) is dropped and the registry asked
//!   again.
//! - Plain HTTP is used only when asked (`--plain-http`) or for loopback registries, as
//!   containerd does; everything else is HTTPS with the system's CA roots.
//! - Timeouts: a connect timeout, and a stall timeout that fires when no bytes arrive for that
//!   long (reqwest's read timeout), rather than a whole-request deadline that would cut off a
//!   large but progressing transfer. Retries with backoff are layered on top by the fetcher.

pub mod auth;
mod push;
pub mod referrers;

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use url::Url;

use crate::model::digest::{Digest, DigestError};
use crate::model::reference::{ManifestSelector, RegistryRef};
use crate::source::FetchedManifest;
use crate::source::retry::{RetryPolicy, Transient, Verdict};
use auth::{Authenticator, Credentials};

/// How to reach registries. Defaults suit a registry on the internet; tests shorten timeouts.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Talk plain HTTP to every registry. Off by default: only loopback hosts get plain HTTP
    /// without asking, so credentials never cross a network unencrypted by accident.
    pub plain_http: bool,
    /// Credentials given on the command line; they win over Docker's config file.
    pub credentials: Option<Credentials>,
    /// Docker `config.json` to read credentials from; `None` disables the lookup. Defaults to
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, where `docker login` writes.
    pub docker_config: Option<PathBuf>,
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
    pub s3: crate::source::s3::S3Config,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            plain_http: false,
            credentials: None,
            docker_config: auth::default_docker_config_path(),
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            redirect_ttl: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            s3: crate::source::s3::S3Config::default(),
        }
    }
}

/// Everything that can go wrong talking to a registry. Each variant names the registry, URL or
/// object involved, and what the user can do where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "cannot reach registry {registry} at {url}: {reason} (is it running and reachable?{})",
        if url.starts_with("https:") { " for a registry without TLS use --plain-http" } else { "" }
    )]
    Connect {
        registry: String,
        url: String,
        reason: String,
    },
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error(
        "unauthorized at registry {registry}: {detail} (pass --user USER:PASSWORD or `docker login` to store credentials)"
    )]
    Unauthorized { registry: String, detail: String },
    #[error("registry {registry} asks for unsupported auth scheme `{scheme}`")]
    UnsupportedAuth { registry: String, scheme: String },
    #[error("registry {registry} sent an unusable auth challenge: {reason}")]
    BadChallenge { registry: String, reason: String },
    #[error("cannot get a token for registry {registry} from {realm}: {reason}")]
    Token {
        registry: String,
        realm: String,
        reason: String,
    },
    #[error("cannot read docker config {}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{what} not found: {url} (check the repository name, tag or digest)")]
    NotFound { what: &'static str, url: String },
    #[error("{url} answered HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        url: String,
        status: StatusCode,
        body: String,
        /// The server's `Retry-After`, for 429 and 503.
        retry_after: Option<Duration>,
    },
    #[error("{what} {digest} from {url} is {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        what: &'static str,
        digest: String,
        url: String,
        size: u64,
        limit: u64,
    },
    #[error("{what} from {url} failed verification: {source}")]
    Digest {
        what: &'static str,
        url: String,
        source: DigestError,
    },
    #[error("bad range response from {url}: {reason}")]
    BadRange { url: String, reason: String },
    #[error("range {start}-{end} of blob {digest} is outside the blob{} at {url}", size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    RangeNotSatisfiable {
        digest: Digest,
        start: u64,
        end: u64,
        size: Option<u64>,
        url: String,
    },
    #[error("response body from {url} ended after {got} of {expected} bytes")]
    Truncated {
        url: String,
        expected: u64,
        got: u64,
    },
    #[error("too many redirects fetching {url}")]
    TooManyRedirects { url: String },
}

/// A URL as it may appear in messages and logs: without user info, query or fragment, which
/// is where pre-signed object-store URLs keep their signatures.
pub(crate) fn shown(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// Formats a reqwest error with its causes ("error sending request: connection refused").
pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else {
        String::new()
    };
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        // reqwest repeats the URL (which may carry a signed query) and hyper names its
        // layer; keep the causes.
        let full = err.to_string();
        let s = full
            .split(" for url (")
            .next()
            .unwrap_or_default()
            .to_string();
        let noise = s == "error sending request" || s.starts_with("client error (");
        if !out.contains(&s) && !noise {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        cur = err.source();
    }
    if out.is_empty() { e.to_string() } else { out }
}

/// One registry host: connection pool, auth state, remembered redirects.
pub struct Registry {
    /// Host as written in references (`docker.io`, `127.0.0.1:5000`), for messages and creds.
    name: String,
    base: Url,
    http: reqwest::Client,
    auth: Authenticator,
    redirect_ttl: Duration,
    redirects: Mutex<HashMap<String, (Url, Instant)>>,
}

/// A repository within a registry; the object range reads go through.
pub struct Repository {
    registry: std::sync::Arc<Registry>,
    name: String,
    scope: String,
}

/// A stream of body bytes from a range read.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, RegistryError>> + Send>>;

impl Registry {
    /// A client for the registry of `reference`. Reads credentials (from `config` or Docker's
    /// config file) but makes no request yet.
    pub fn new(
        reference: &RegistryRef,
        config: &RegistryConfig,
    ) -> Result<std::sync::Arc<Registry>, RegistryError> {
        let scheme = if config.plain_http || reference.is_loopback() {
            "http"
        } else {
            "https"
        };
        let base_str = format!("{scheme}://{}/", reference.api_host());
        let base = Url::parse(&base_str).map_err(|e| RegistryError::Connect {
            registry: reference.registry.clone(),
            url: base_str.clone(),
            reason: e.to_string(),
        })?;
        let credentials = match &config.credentials {
            Some(c) => Some(c.clone()),
            None => match &config.docker_config {
                Some(path) => auth::docker_config_credentials(path, &reference.registry)?,
                None => None,
            },
        };
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.stall_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("lazylayer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RegistryError::Connect {
                registry: reference.registry.clone(),
                url: base_str.clone(),
                reason: describe_reqwest(&e),
            })?;
        Ok(std::sync::Arc::new(Registry {
            name: reference.registry.clone(),
            base,
            auth: Authenticator::new(reference.registry.clone(), credentials, http.clone()),
            http,
            redirect_ttl: config.redirect_ttl,
            redirects: Mutex::new(HashMap::new()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn repository(self: &std::sync::Arc<Self>, name: &str) -> Repository {
        Repository {
            registry: self.clone(),
            name: name.to_string(),
            scope: format!("repository:{name}:pull"),
        }
    }

    /// `GET /v2/`: checks that the host speaks the registry API and learns its auth challenge,
    /// so the first real request goes out with credentials instead of collecting a 401.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let url = self.base.join("v2/").expect("static path");
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| self.transport_error(&url, &e))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED => {
                let www = header_str(&resp, reqwest::header::WWW_AUTHENTICATE);
                self.auth.learn_challenge(www.as_deref());
                Ok(())
            }
            StatusCode::NOT_FOUND => Err(RegistryError::NotFound {
                what: "registry API (GET /v2/)",
                url: shown(&url),
            }),
            _ => Err(status_error(resp, &url).await),
        }
    }

    fn transport_error(&self, url: &Url, e: &reqwest::Error) -> RegistryError {
        if e.is_connect() || (e.is_timeout() && !e.is_body()) {
            RegistryError::Connect {
                registry: self.name.clone(),
                url: shown(url),
                reason: describe_reqwest(e),
            }
        } else {
            RegistryError::Transport {
                url: shown(url),
                reason: describe_reqwest(e),
            }
        }
    }

    /// Sends a request built by `build` with auth for `scope`, and handles one 401 by learning
    /// the challenge or renewing the token and sending again.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        url: &Url,
        scope: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        for attempt in 0..2 {
            let authorization = self.auth.authorization(scope).await?;
            let sent = authorization.is_some();
            let mut req = build();
            if let Some(a) = authorization {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| self.transport_error(url, &e))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let www = header_str(&resp, reqwest::header::WWW_AUTHENTICATE);
            let retry = self.auth.unauthorized(www.as_deref(), scope, sent).await;
            if attempt == 1 || !retry {
                let detail = if sent {
                    format!("credentials refused for {url}")
                } else {
                    format!("{url} requires authentication")
                };
                return Err(RegistryError::Unauthorized {
                    registry: self.name.clone(),
                    detail,
                });
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn remembered_redirect(&self, digest: &Digest) -> Option<Url> {
        let mut map = self.redirects.lock().expect("redirect lock");
        match map.get(digest.hex()) {
            Some((url, at)) if at.elapsed() < self.redirect_ttl => Some(url.clone()),
            Some(_) => {
                map.remove(digest.hex());
                None
            }
            None => None,
        }
    }

    fn remember_redirect(&self, digest: &Digest, url: Url) {
        self.redirects
            .lock()
            .expect("redirect lock")
            .insert(digest.hex().to_string(), (url, Instant::now()));
    }

    fn forget_redirect(&self, digest: &Digest) {
        self.redirects
            .lock()
            .expect("redirect lock")
            .remove(digest.hex());
    }
}

fn header_str(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An error for an unexpected status, with the start of the body (registries explain there).
async fn status_error(resp: reqwest::Response, url: &Url) -> RegistryError {
    let status = resp.status();
    let retry_after = header_str(&resp, reqwest::header::RETRY_AFTER)
        .as_deref()
        .and_then(parse_retry_after);
    let body = resp.text().await.unwrap_or_default();
    let mut body: String = body.trim().chars().take(300).collect();
    body.retain(|c| !c.is_control());
    RegistryError::Status {
        url: shown(url),
        status,
        body,
        retry_after,
    }
}

/// `Retry-After` is either seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    let secs = (when.timestamp() - chrono::Utc::now().timestamp()).max(0);
    Some(Duration::from_secs(secs as u64))
}

impl Transient for RegistryError {
    fn verdict(&self) -> Verdict {
        match self {
            RegistryError::Connect { .. }
            | RegistryError::Transport { .. }
            | RegistryError::Truncated { .. }
            | RegistryError::BadRange { .. }
            // The token endpoint may be down for a while, as any server.
            | RegistryError::Token { .. }
            // Bytes that fail their digest were damaged on the way; the stored ones are checked
            // by digest too, so a second look is all it takes to tell.
            | RegistryError::Digest { .. } => Verdict::Retry(None),
            RegistryError::Status {
                status,
                retry_after,
                ..
            } => match status.as_u16() {
                // 501 and 505 say the server cannot do this at all.
                501 | 505 => Verdict::Fatal,
                408 | 429 | 500..=599 => Verdict::Retry(*retry_after),
                _ => Verdict::Fatal,
            },
            RegistryError::Unauthorized { .. }
            | RegistryError::UnsupportedAuth { .. }
            | RegistryError::BadChallenge { .. }
            | RegistryError::Config { .. }
            | RegistryError::NotFound { .. }
            | RegistryError::TooLarge { .. }
            | RegistryError::RangeNotSatisfiable { .. }
            | RegistryError::TooManyRedirects { .. } => Verdict::Fatal,
        }
    }
}

/// Parses `Content-Range: bytes START-END/TOTAL` into (START, END, TOTAL); TOTAL may be `*`.
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (a <= b).then_some((a, b, total))
}

impl Repository {
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `registry/repository`, for messages.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.registry.name, self.name)
    }

    fn url(&self, kind: &str, reference: &str) -> Url {
        self.registry
            .base
            .join(&format!("v2/{}/{kind}/{reference}", self.name))
            .expect("repository names and references are URL-safe after validation")
    }

    /// Fetches a manifest or index by tag or digest. By digest, the bytes must hash to it; by
    /// tag, the registry's `Docker-Content-Digest` (when it sends a sha256 one) must agree with
    /// the bytes, so a proxy cannot swap content under a tag unnoticed.
    pub async fn manifest(
        &self,
        selector: &ManifestSelector,
    ) -> Result<FetchedManifest, RegistryError> {
        let reference = selector.to_string();
        let url = self.url("manifests", &reference);
        let http = &self.registry.http;
        let resp = self
            .registry
            .send(
                || {
                    http.get(url.clone())
                        .header(ACCEPT, crate::model::oci::MANIFEST_ACCEPT)
                },
                &url,
                &self.scope,
            )
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(RegistryError::NotFound {
                    what: "manifest",
                    url: shown(&url),
                });
            }
            _ => return Err(status_error(resp, &url).await),
        }
        let media_type = header_str(&resp, CONTENT_TYPE);
        let header_digest = header_str(&resp, "docker-content-digest".parse().expect("static"));
        let bytes = read_capped(
            resp,
            &url,
            "manifest",
            &reference,
            crate::model::oci::MAX_MANIFEST_BYTES,
        )
        .await?;
        let actual = Digest::of(&bytes);
        let expected = match selector {
            ManifestSelector::Digest(d) => Some(d.clone()),
            ManifestSelector::Tag(_) => header_digest
                .filter(|h| h.starts_with("sha256:"))
                .map(|h| {
                    h.parse::<Digest>().map_err(|source| RegistryError::Digest {
                        what: "manifest digest header",
                        url: shown(&url),
                        source,
                    })
                })
                .transpose()?,
        };
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(RegistryError::Digest {
                what: "manifest",
                url: shown(&url),
                source: DigestError::Mismatch { expected, actual },
            });
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest: actual,
        })
    }

    /// Fetches a whole small blob (config, TOC, index artifact), at most `limit` bytes, and
    /// checks it against `digest` and `size` before returning it.
    pub async fn blob(
        &self,
        digest: &Digest,
        size: u64,
        limit: u64,
    ) -> Result<Bytes, RegistryError> {
        let (resp, url) = self.open_blob(digest, None).await?;
        if size > limit {
            return Err(RegistryError::TooLarge {
                what: "blob",
                digest: digest.to_string(),
                url: shown(&url),
                size,
                limit,
            });
        }
        if resp.status() != StatusCode::OK {
            return Err(blob_status_error(resp, &url).await);
        }
        let bytes = read_capped(resp, &url, "blob", &digest.to_string(), limit).await?;
        digest
            .verify(&bytes)
            .map_err(|source| RegistryError::Digest {
                what: "blob",
                url: shown(&url),
                source,
            })?;
        Ok(bytes)
    }

    /// Streams bytes `range` of blob `digest`. The stream yields exactly `range.end -
    /// range.start` bytes or ends with an error; it never yields bytes from outside the range.
    /// A server that ignores `Range` (200 with the whole blob) is tolerated by skipping ahead,
    /// at the cost of the skipped transfer.
    pub async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, RegistryError> {
        if range.is_empty() {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let (resp, url) = self.open_blob(digest, Some(range.clone())).await?;
        let want = range.end - range.start;
        let outside = |size| RegistryError::RangeNotSatisfiable {
            digest: digest.clone(),
            start: range.start,
            end: range.end - 1,
            size,
            url: shown(&url),
        };
        let skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(&resp, CONTENT_RANGE).unwrap_or_default();
                match parse_content_range(&cr) {
                    Some((a, b, _)) if a == range.start && b == range.end - 1 => 0,
                    // Servers clip a range that runs past the end of the blob.
                    Some((a, b, Some(total))) if a == range.start && b + 1 == total => {
                        return Err(outside(Some(total)));
                    }
                    _ => {
                        return Err(RegistryError::BadRange {
                            url: shown(&url),
                            reason: format!(
                                "asked for bytes {}-{}, got Content-Range `{cr}`",
                                range.start,
                                range.end - 1
                            ),
                        });
                    }
                }
            }
            StatusCode::OK => {
                tracing::warn!(url = %shown(&url), "server ignored the Range header; skipping to the requested offset");
                range.start
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let total = header_str(&resp, CONTENT_RANGE)
                    .and_then(|v| v.strip_prefix("bytes */")?.trim().parse().ok());
                return Err(outside(total));
            }
            _ => return Err(blob_status_error(resp, &url).await),
        };
        Ok(Box::pin(RangeBody {
            inner: Box::pin(resp.bytes_stream()),
            url: shown(&url),
            skip,
            remaining: want,
            expected: want,
        }))
    }

    /// Reads bytes `range` of blob `digest` into memory.
    pub async fn read_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
        let mut stream = self.blob_range(digest, range).await?;
        while let Some(piece) = stream.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out.freeze())
    }

    /// Sends the blob GET, via a remembered redirect target when there is one, following
    /// redirects by hand. Returns the final response and the URL that produced it.
    async fn open_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<(reqwest::Response, Url), RegistryError> {
        let reg = &self.registry;
        let with_range = |req: reqwest::RequestBuilder| match &range {
            Some(r) => req.header(RANGE, format!("bytes={}-{}", r.start, r.end - 1)),
            None => req,
        };
        if let Some(target) = reg.remembered_redirect(digest) {
            match with_range(reg.http.get(target.clone())).send().await {
                Ok(resp) if resp.status().is_success() => return Ok((resp, target)),
                Ok(resp) => {
                    tracing::debug!(url = %shown(&target), status = %resp.status(), "remembered redirect failed; asking the registry again");
                }
                Err(e) => {
                    tracing::debug!(url = %shown(&target), error = %describe_reqwest(&e), "remembered redirect failed; asking the registry again");
                }
            }
            reg.forget_redirect(digest);
        }
        let mut url = self.url("blobs", &digest.to_string());
        let first = url.clone();
        let mut resp = reg
            .send(
                || with_range(reg.http.get(first.clone())),
                &url,
                &self.scope,
            )
            .await?;
        for _ in 0..5 {
            if !resp.status().is_redirection() {
                return Ok((resp, url));
            }
            let location = header_str(&resp, LOCATION).ok_or_else(|| RegistryError::BadRange {
                url: shown(&url),
                reason: format!("HTTP {} without a Location header", resp.status()),
            })?;
            let next = url.join(&location).map_err(|e| RegistryError::BadRange {
                url: shown(&url),
                reason: format!("bad redirect Location `{location}`: {e}"),
            })?;
            let same_origin = next.origin() == reg.base.origin();
            resp = if same_origin {
                let n = next.clone();
                reg.send(|| with_range(reg.http.get(n.clone())), &next, &self.scope)
                    .await?
            } else {
                tracing::debug!(blob = %digest, target = %next.host_str().unwrap_or(""), "blob redirected to another host");
                let resp = with_range(reg.http.get(next.clone()))
                    .send()
                    .await
                    .map_err(|e| reg.transport_error(&next, &e))?;
                // Only a target that answered is worth going straight to next time.
                if resp.status().is_success() {
                    reg.remember_redirect(digest, next.clone());
                }
                resp
            };
            url = next;
        }
        Err(RegistryError::TooManyRedirects {
            url: shown(&self.url("blobs", &digest.to_string())),
        })
    }
}

async fn blob_status_error(resp: reqwest::Response, url: &Url) -> RegistryError {
    if resp.status() == StatusCode::NOT_FOUND {
        RegistryError::NotFound {
            what: "blob",
            url: shown(url),
        }
    } else {
        status_error(resp, url).await
    }
}

/// Reads a whole body of at most `limit` bytes.
async fn read_capped(
    resp: reqwest::Response,
    url: &Url,
    what: &'static str,
    name: &str,
    limit: u64,
) -> Result<Bytes, RegistryError> {
    let too_large = |size| RegistryError::TooLarge {
        what,
        digest: name.to_string(),
        url: shown(url),
        size,
        limit,
    };
    if let Some(len) = resp.content_length()
        && len > limit
    {
        return Err(too_large(len));
    }
    let mut out = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| RegistryError::Transport {
            url: shown(url),
            reason: describe_reqwest(&e),
        })?;
        if (out.len() + piece.len()) as u64 > limit {
            return Err(too_large((out.len() + piece.len()) as u64));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out.freeze())
}

/// The body of a range response, trimmed to exactly the requested bytes.
struct RangeBody {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    url: String,
    /// Bytes still to drop before the range starts (only when the server ignored `Range`).
    skip: u64,
    remaining: u64,
    expected: u64,
}

impl Stream for RangeBody {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.remaining == 0 {
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let (expected, got) = (self.expected, self.expected - self.remaining);
                    self.remaining = 0;
                    return Poll::Ready(Some(Err(RegistryError::Truncated {
                        url: self.url.clone(),
                        expected,
                        got,
                    })));
                }
                Poll::Ready(Some(Err(e))) => {
                    self.remaining = 0;
                    return Poll::Ready(Some(Err(RegistryError::Transport {
                        url: self.url.clone(),
                        reason: describe_reqwest(&e),
                    })));
                }
                Poll::Ready(Some(Ok(mut piece))) => {
                    if self.skip > 0 {
                        let drop = self.skip.min(piece.len() as u64);
                        self.skip -= drop;
                        piece = piece.slice(drop as usize..);
                    }
                    if piece.is_empty() {
                        continue;
                    }
                    let take = self.remaining.min(piece.len() as u64);
                    self.remaining -= take;
                    return Poll::Ready(Some(Ok(piece.slice(..take as usize))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 0-9/x"), None);
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-9/100"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn retry_after_and_verdicts() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("soon"), None);
        let status = |code: u16, retry_after| RegistryError::Status {
            url: "u".into(),
            status: StatusCode::from_u16(code).unwrap(),
            body: String::new(),
            retry_after,
        };
        let later = Some(Duration::from_secs(2));
        assert_eq!(status(503, later).verdict(), Verdict::Retry(later));
        assert_eq!(status(429, None).verdict(), Verdict::Retry(None));
        assert_eq!(status(408, None).verdict(), Verdict::Retry(None));
        assert_eq!(status(502, None).verdict(), Verdict::Retry(None));
        for fatal in [400, 403, 404, 405, 416, 501] {
            assert_eq!(status(fatal, None).verdict(), Verdict::Fatal, "{fatal}");
        }
    }

    #[test]
    fn shown_urls_lose_credentials_and_signatures() {
        let url =
            Url::parse("https://user:pw@bucket.s3.example/blob?X-Amz-Signature=secret#f").unwrap();
        assert_eq!(shown(&url), "https://bucket.s3.example/blob");
    }

    #[tokio::test]
    async fn range_body_skips_trims_and_reports_truncation() {
        let pieces: Vec<reqwest::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"0123")),
            Ok(Bytes::from_static(b"456789")),
        ];
        let body = RangeBody {
            inner: Box::pin(futures_util::stream::iter(pieces)),
            url: "u".into(),
            skip: 3,
            remaining: 5,
            expected: 5,
        };
        let got: Vec<_> = body.collect().await;
        let bytes: Vec<u8> = got.into_iter().flat_map(|r| r.unwrap().to_vec()).collect();
        assert_eq!(bytes, b"34567");

        let short: Vec<reqwest::Result<Bytes>> = vec![Ok(Bytes::from_static(b"01"))];
        let body = RangeBody {
            inner: Box::pin(futures_util::stream::iter(short)),
            url: "u".into(),
            skip: 0,
            remaining: 4,
            expected: 4,
        };
        let got: Vec<_> = body.collect().await;
        assert_eq!(got.len(), 2);
        assert!(matches!(
            got[1],
            Err(RegistryError::Truncated {
                expected: 4,
                got: 2,
                ..
            })
        ));
    }
}

//! A client for the OCI distribution API (registry v2), built for lazy reading.
//!
//! Design:
//! - One [`Registry`] per host (the registry itself, or one of its mirrors) holds the HTTP
//!   connection pool, the auth state and remembered blob redirects; a [`Repository`] is a cheap
//!   handle on one repository of it. Everything is `Send + Sync` so that FUSE workers, the
//!   prefetcher and the snapshotter share one client and one pool of connections per host.
//! - Manifests and configs are small and fetched whole, size-capped and checked against their
//!   digest before they are returned. Layer blobs are read by byte range and handed out as a
//!   stream, so a reader gets its first byte when it arrives, not when the range completes.
//! - Redirects are followed by hand: a blob GET that answers 307 to an object store or CDN is
//!   retried there *without* the registry's `Authorization` (those URLs carry their own
//!   signature, and our token must not leak to a third party), and the target URL is remembered
//!   for [`FetchConfig::redirect_ttl`] so later ranges of the same blob skip the registry
//!   round trip. A failing remembered URL (expired signature) is dropped and the registry asked
//!   again.
//! - Which hosts serve a registry, and with which CAs, client certificates and headers, comes
//!   from containerd's hosts.toml ([`hosts`]); a [`Registry`] is one such host and a
//!   [`MirroredRepository`] reads through all of them in order. Without configuration, plain
//!   HTTP is used only when asked (`--plain-http`) or for loopback registries, as containerd
//!   does; everything else is HTTPS with the system's CA roots.
//! - Several ranges of one blob go in one request when the host allows
//!   (`Range: bytes=a-b,c-d`, answered `multipart/byteranges`, as distribution and most HTTP
//!   servers do): a start-up prefetch of files scattered through a layer costs one round trip
//!   per few MiB instead of one per file. A host that answers such a request with the whole blob
//!   or with fewer ranges (some object stores behind redirects, pull-through mirrors that do not
//!   hold the blob yet) is asked for one range per request from then on.
//! - Timeouts: a connect timeout, and a stall timeout that fires when no bytes arrive for that
//!   long (reqwest's read timeout), rather than a whole-request deadline that would cut off a
//!   large but progressing transfer. Retries with backoff are layered on top by the fetcher.

pub mod auth;
mod body;
mod error;
pub mod hosts;
mod mirrored;
mod push;
pub mod referrers;
mod tls;

use std::collections::HashMap;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use url::Url;

use crate::model::digest::{Digest, DigestError};
use crate::model::oci::FetchedManifest;
use crate::model::reference::ManifestSelector;
use crate::source::config::FetchConfig;
use auth::Authenticator;
use body::{Multipart, MultipartBody, RangeBody, parse_content_range, read_capped};
pub use error::RegistryError;
use error::{blob_status_error, describe_reqwest, header_str, shown, status_error};
use hosts::RegistryHost;
pub use mirrored::MirroredRepository;

/// One registry host: connection pool, auth state, remembered redirects.
pub struct Registry {
    /// Host as written in references (`docker.io`, `127.0.0.1:5000`) or, for a mirror, as its
    /// URL names it; for messages and credentials.
    name: String,
    /// The API root (`https://HOST/v2/`), which request paths are joined to.
    api: Url,
    capabilities: hosts::Capabilities,
    http: tls::HostClients,
    auth: Authenticator,
    redirect_ttl: Duration,
    redirects: Mutex<HashMap<String, (Url, Instant)>>,
    /// Whether the registry answers the referrers API, once it has answered (see
    /// `Repository::referrers`).
    referrers_api: Mutex<Option<bool>>,
    /// Where that is kept for the next process (see [`Registry::remember_in`]).
    memory: std::sync::OnceLock<std::sync::Arc<crate::cache::disk::DiskCache>>,
    /// When a connection to it last failed, for [`MirroredRepository`] to try the next host
    /// first for a while.
    unreachable_since: Mutex<Option<Instant>>,
    /// The hosts.toml that configured this host, for messages.
    configured_in: Option<std::path::PathBuf>,
    /// Whether it answered a range read with the whole blob (warned about once).
    ignored_range: AtomicBool,
    /// Whether it failed to answer several ranges in one request; then each range is a request.
    single_ranges: AtomicBool,
}

/// What a registry's features are remembered as in the disk cache, and for how long: a registry
/// upgraded to the referrers API is asked again a day later.
#[derive(serde::Serialize, serde::Deserialize)]
struct Features {
    referrers_api: bool,
    /// Seconds since the epoch when it was seen.
    seen: u64,
}
const FEATURES_TTL_SECS: u64 = 24 * 3600;

/// A repository within a registry; the object range reads go through.
pub struct Repository {
    registry: std::sync::Arc<Registry>,
    name: String,
    scope: String,
}

/// A stream of body bytes from a range read.
pub type RangeStream = Pin<Box<dyn Stream<Item = Result<Bytes, RegistryError>> + Send>>;

impl Registry {
    /// A client for one host serving a registry: the registry itself or a mirror (see
    /// [`hosts`]). Reads credentials (from `config` or Docker's config file, for `name`) and
    /// the host's CA and client certificate files, but makes no request yet.
    pub fn for_host(
        name: &str,
        host: &RegistryHost,
        config: &FetchConfig,
    ) -> Result<std::sync::Arc<Registry>, RegistryError> {
        let credentials = match &config.credentials {
            Some(c) => Some(c.clone()),
            None => match &config.docker_config {
                Some(path) => auth::docker_config_credentials(path, name)?,
                None => None,
            },
        };
        let (connect_timeout, stall_timeout) = (config.connect_timeout, config.stall_timeout);
        let headers = host.headers.clone();
        let builder = move || {
            let builder = reqwest::Client::builder()
                .connect_timeout(connect_timeout)
                .read_timeout(stall_timeout)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("lazylayer/", env!("CARGO_PKG_VERSION")));
            if headers.is_empty() {
                builder
            } else {
                builder.default_headers(headers.clone())
            }
        };
        let http = tls::HostClients::new(builder, name, host)?;
        Ok(std::sync::Arc::new(Registry {
            name: name.to_string(),
            api: host.api.clone(),
            capabilities: host.capabilities,
            auth: Authenticator::new(name.to_string(), credentials, http.clone()),
            http,
            redirect_ttl: config.redirect_ttl,
            redirects: Mutex::new(HashMap::new()),
            referrers_api: Mutex::new(None),
            memory: std::sync::OnceLock::new(),
            unreachable_since: Mutex::new(None),
            configured_in: host.configured_in.clone(),
            ignored_range: AtomicBool::new(false),
            single_ranges: AtomicBool::new(false),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn configured_in(&self) -> Option<std::path::PathBuf> {
        self.configured_in.clone()
    }

    /// Whether a connection to this host failed within [`mirrored::UNREACHABLE_FOR`].
    fn recently_unreachable(&self) -> bool {
        self.unreachable_since
            .lock()
            .unwrap()
            .is_some_and(|at| at.elapsed() < mirrored::UNREACHABLE_FOR)
    }

    /// Notes that the host answered.
    fn reachable(&self) {
        *self.unreachable_since.lock().unwrap() = None;
    }

    /// Keeps what this client learns of the registry (whether it has the referrers API) in
    /// `disk`, and starts from what an earlier process learned, so that a mount's referrers
    /// lookup is one request, not the two a first contact sends.
    pub fn remember_in(&self, disk: std::sync::Arc<crate::cache::disk::DiskCache>) {
        let known = disk
            .get_meta(&self.features_name())
            .and_then(|b| serde_json::from_slice::<Features>(&b).ok())
            .filter(|f| crate::source::now_secs().saturating_sub(f.seen) < FEATURES_TTL_SECS);
        if let Some(known) = known {
            *self.referrers_api.lock().unwrap() = Some(known.referrers_api);
        }
        let _ = self.memory.set(disk);
    }

    /// Notes whether the registry has the referrers API.
    fn learned_referrers_api(&self, has_api: bool) {
        let known = self.referrers_api.lock().unwrap().replace(has_api);
        if let (Some(disk), true) = (self.memory.get(), known != Some(has_api)) {
            let features = Features {
                referrers_api: has_api,
                seen: crate::source::now_secs(),
            };
            let json = serde_json::to_vec(&features).expect("serialises");
            disk.put_meta(&self.features_name(), &json);
        }
    }

    fn features_name(&self) -> String {
        let digest = crate::model::digest::Digest::of(self.api.as_str().as_bytes());
        format!("registry-{}.json", &digest.hex()[..16])
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
        let url = self.api.clone();
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
        if let Some(client_side) = tls::certificate_failure(e) {
            return RegistryError::Certificate {
                registry: self.name.clone(),
                url: shown(url),
                reason: describe_reqwest(e),
                client_side,
                hosts_toml: match &self.configured_in {
                    Some(file) => file.display().to_string(),
                    None => format!("DIR/{}/hosts.toml (DIR: --hosts-dir)", self.name),
                },
            };
        }
        if e.is_connect() || (e.is_timeout() && !e.is_body()) {
            *self.unreachable_since.lock().unwrap() = Some(Instant::now());
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
            .api
            .join(&format!("{}/{kind}/{reference}", self.name))
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
        let (resp, url) = self.open_blob(digest, &[]).await?;
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
    ) -> Result<RangeStream, RegistryError> {
        if range.is_empty() {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let (resp, url) = self.open_blob(digest, std::slice::from_ref(&range)).await?;
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
                // A pull-through mirror does this for every blob it does not hold yet: said
                // once per host, not per read.
                if !self.registry.ignored_range.swap(true, Ordering::Relaxed) {
                    tracing::warn!(host = %self.registry.name, url = %shown(&url), "registry host ignored a Range header and sent the whole blob; reads skip to their offset, at the cost of the skipped transfer (a pull-through mirror does this until it holds the blob)");
                } else {
                    tracing::debug!(url = %shown(&url), "server ignored the Range header; skipping to the requested offset");
                }
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

    /// Whether [`Repository::blob_ranges`] asks for several ranges in one request (until the
    /// host shows it cannot answer that).
    pub fn joins_ranges(&self) -> bool {
        !self.registry.single_ranges.load(Ordering::Relaxed)
    }

    /// Streams the bytes of `ranges` of blob `digest` (ascending, not overlapping), one after
    /// the other, asked for in one request: the stream yields exactly the ranges' bytes, in
    /// order, or ends with an error. A host that cannot answer several ranges at once (see the
    /// module doc) gets one request per range, now and from then on.
    pub async fn blob_ranges(
        &self,
        digest: &Digest,
        ranges: &[Range<u64>],
    ) -> Result<RangeStream, RegistryError> {
        let ranges: Vec<Range<u64>> = ranges.iter().filter(|r| !r.is_empty()).cloned().collect();
        if ranges.len() > 1
            && self.joins_ranges()
            && let Some(stream) = self.joined_ranges(digest, &ranges).await?
        {
            return Ok(stream);
        }
        // One request per range, all sent at once and read in order.
        let streams = futures_util::future::try_join_all(
            ranges.iter().map(|r| self.blob_range(digest, r.clone())),
        )
        .await?;
        Ok(Box::pin(futures_util::stream::iter(streams).flatten()))
    }

    /// `ranges` in one request; `None` when the host answered with something else than those
    /// ranges (it is then marked as answering one range per request).
    async fn joined_ranges(
        &self,
        digest: &Digest,
        ranges: &[Range<u64>],
    ) -> Result<Option<RangeStream>, RegistryError> {
        let (resp, url) = self.open_blob(digest, ranges).await?;
        let parts = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let kind = header_str(&resp, CONTENT_TYPE).unwrap_or_default();
                let single = header_str(&resp, CONTENT_RANGE)
                    .and_then(|cr| parse_content_range(&cr))
                    .and_then(|(first, last, _)| Multipart::covering(first, last, ranges));
                Multipart::new(&kind, ranges).or(single)
            }
            // The whole blob, or a refusal of the list itself (some servers answer a list of
            // ranges 416, 400 or 501); one range per request gets each its own answer.
            StatusCode::OK
            | StatusCode::RANGE_NOT_SATISFIABLE
            | StatusCode::BAD_REQUEST
            | StatusCode::NOT_IMPLEMENTED => None,
            _ => return Err(blob_status_error(resp, &url).await),
        };
        let Some(parts) = parts else {
            // Dropped unread: the whole blob is not worth the transfer.
            self.registry.single_ranges.store(true, Ordering::Relaxed);
            tracing::debug!(host = %self.registry.name, url = %shown(&url), status = %resp.status(), "host does not answer several ranges in one request; asking for one range per request");
            return Ok(None);
        };
        Ok(Some(Box::pin(MultipartBody::new(
            Box::pin(resp.bytes_stream()),
            shown(&url),
            parts,
        ))))
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

    /// Sends the blob GET (for `ranges`, or the whole blob when there are none), via a remembered
    /// redirect target when there is one, following redirects by hand. Returns the final response and the URL that produced it.
    async fn open_blob(
        &self,
        digest: &Digest,
        ranges: &[Range<u64>],
    ) -> Result<(reqwest::Response, Url), RegistryError> {
        let reg = &self.registry;
        let header = (!ranges.is_empty()).then(|| {
            let list: Vec<String> = ranges
                .iter()
                .map(|r| format!("{}-{}", r.start, r.end - 1))
                .collect();
            format!("bytes={}", list.join(","))
        });
        let with_range = |req: reqwest::RequestBuilder| match &header {
            Some(h) => req.header(RANGE, h),
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
            let same_origin = next.origin() == reg.api.origin();
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

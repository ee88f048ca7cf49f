//! What can go wrong talking to a registry, how it reads in a message, and whether trying again
//! can help.
//!
//! Messages name the registry and the URL (shown without user info or query, where pre-signed
//! object-store URLs keep their signatures) and say what the user can do. The retry verdicts
//! follow HTTP: transport failures, truncated bodies, 408, 429 and 5xx (but 501 and 505) are
//! transient; what the server refused on purpose is not.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use url::Url;

use crate::model::digest::{Digest, DigestError};
use crate::source::SourceError;
use crate::source::retry::{Transient, Verdict};

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
        "TLS with registry {registry} at {url} failed: {reason} ({})",
        if *client_side {
            format!("the registry wants a client certificate it accepts: name it as `client` in {hosts_toml}")
        } else {
            format!("if its certificate is signed by a private CA, name the CA file as `ca` in {hosts_toml}")
        }
    )]
    Certificate {
        registry: String,
        url: String,
        reason: String,
        /// The registry refused our (missing) client certificate, rather than we its.
        client_side: bool,
        /// The hosts.toml that configures this host, or where one would.
        hosts_toml: String,
    },
    #[error("registry hosts configuration {}: {reason}", path.display())]
    HostsConfig { path: PathBuf, reason: String },
    #[error("cannot use {} for registry host {host} (configured in {}): {reason}", file.display(), configured_in.display())]
    TlsFile {
        host: String,
        file: PathBuf,
        configured_in: PathBuf,
        reason: String,
    },
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
    #[error(
        "credential helper docker-credential-{helper} (named in {}) for {registry}: {reason}",
        config.display()
    )]
    CredentialHelper {
        helper: String,
        config: PathBuf,
        registry: String,
        reason: String,
    },
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

impl From<RegistryError> for SourceError {
    fn from(e: RegistryError) -> Self {
        SourceError::backend(e)
    }
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

/// Formats a reqwest error with its causes ("connection refused"), in words a user can act on:
/// reqwest's own framing ("error sending request", "error decoding response body") says how it
/// failed inside, not what happened on the wire.
pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out: nothing arrived within the connect or stall timeout (raise \
         --connect-timeout or --stall-timeout for a slow link)"
            .to_string()
    } else if e.is_body() || e.is_decode() {
        "the response broke off while it was being received".to_string()
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
        let noise = s == "error sending request"
            || s == "error decoding response body"
            || s == "error reading a body from connection"
            || s == "request or response body error"
            || s.starts_with("client error (")
            || (e.is_timeout() && (s == "operation timed out" || s == "timed out"));
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

pub(super) fn header_str(
    resp: &reqwest::Response,
    name: reqwest::header::HeaderName,
) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An error for an unexpected status, with the start of the body (registries explain there).
pub(super) async fn status_error(resp: reqwest::Response, url: &Url) -> RegistryError {
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
            | RegistryError::Token { .. } => Verdict::Retry(None),
            // Bytes that fail their digest were damaged on the way, or are broken in storage;
            // a second look tells which.
            RegistryError::Digest { .. } => Verdict::Damaged,
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
            | RegistryError::CredentialHelper { .. }
            | RegistryError::Certificate { .. }
            | RegistryError::HostsConfig { .. }
            | RegistryError::TlsFile { .. }
            | RegistryError::NotFound { .. }
            | RegistryError::TooLarge { .. }
            | RegistryError::RangeNotSatisfiable { .. }
            | RegistryError::TooManyRedirects { .. } => Verdict::Fatal,
        }
    }
}

pub(super) async fn blob_status_error(resp: reqwest::Response, url: &Url) -> RegistryError {
    if resp.status() == StatusCode::NOT_FOUND {
        RegistryError::NotFound {
            what: "blob",
            url: shown(url),
        }
    } else {
        status_error(resp, url).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

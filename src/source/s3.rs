//! Images in an S3 bucket: an OCI image layout (`index.json`, `blobs/sha256/...`) under a key
//! prefix, read with ranged GETs.
//!
//! Design:
//! - The client is `object_store` (its `aws` feature): SigV4 signing, path-style addressing for
//!   S3-compatible stores, connection pooling. Version 0.12 is used because it shares reqwest
//!   0.12 and ring with the registry client; 0.13+ brings a second HTTP stack and aws-lc.
//!   Its own retries are turned off: [`crate::source::retrying::RetryingSource`] retries every source the
//!   same way, resuming broken ranges, so two retry loops would multiply attempts.
//! - Credentials come from where AWS tools look: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
//!   (`AWS_SESSION_TOKEN`), else the `AWS_PROFILE` (or `default`) profile of
//!   `~/.aws/credentials`. With none, requests go unsigned (a public bucket); the instance
//!   metadata service is never asked, so nothing reaches for a link-local address.
//!   Region: `--s3-region`, `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile in `~/.aws/config`,
//!   else `us-east-1`. Endpoint: `--s3-endpoint`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`.
//! - Everything is verified as registry content is: manifests and configs against their digest
//!   before use, layer ranges chunk by chunk by the format readers; a range body shorter than
//!   asked for is an error, never a short read.
//! - Stalls: a body that sends nothing for the stall timeout is abandoned (and retried above).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as KeyPath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, RetryConfig};

use crate::model::digest::{Digest, DigestError};
use crate::model::oci::FetchedManifest;
use crate::model::oci::{Descriptor, ImageIndex, MAX_MANIFEST_BYTES};
use crate::model::reference::{ManifestSelector, S3Ref};
use crate::source::config::S3Config;
use crate::source::retry::{Transient, Verdict};
use crate::source::{ByteStream, ImageSource, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error(
        "{url} not found (check the bucket and prefix: it must hold an OCI image layout, \
         index.json and blobs/sha256/)"
    )]
    NotFound { url: String },
    #[error(
        "access to {url} refused: {detail} (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
         or AWS_PROFILE and ~/.aws/credentials, and the region)"
    )]
    Denied { url: String, detail: String },
    #[error("reading {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("{url} did not send a byte for {secs} s")]
    Stalled { url: String, secs: f64 },
    #[error("{url}: asked for bytes {start}-{end}, the response ended after {got}")]
    Truncated {
        url: String,
        start: u64,
        end: u64,
        got: u64,
    },
    #[error("{url} is not an OCI image index: {reason}")]
    BadIndex { url: String, reason: String },
    #[error("no image tagged `{tag}` in {layout} (tags: {})", available.join(", "))]
    TagNotFound {
        layout: String,
        tag: String,
        available: Vec<String>,
    },
    #[error("{layout} holds {count} images; name one as s3://BUCKET/PREFIX:TAG (tags: {})", available.join(", "))]
    Ambiguous {
        layout: String,
        count: usize,
        available: Vec<String>,
    },
    #[error("{url} is {size} bytes, more than the {limit}-byte limit")]
    TooLarge { url: String, size: u64, limit: u64 },
    #[error("{url} failed verification: {source}")]
    Digest { url: String, source: DigestError },
    #[error("cannot read AWS credentials from {}: {reason}", path.display())]
    Credentials { path: PathBuf, reason: String },
    #[error("S3 client for bucket {bucket}: {reason}")]
    Client { bucket: String, reason: String },
}

impl From<S3Error> for SourceError {
    fn from(e: S3Error) -> Self {
        SourceError::backend(e)
    }
}

impl Transient for S3Error {
    fn verdict(&self) -> Verdict {
        match self {
            S3Error::Request { .. } | S3Error::Stalled { .. } | S3Error::Truncated { .. } => {
                Verdict::Retry(None)
            }
            S3Error::Digest { .. } => Verdict::Damaged,
            S3Error::NotFound { .. }
            | S3Error::Denied { .. }
            | S3Error::BadIndex { .. }
            | S3Error::TagNotFound { .. }
            | S3Error::Ambiguous { .. }
            | S3Error::TooLarge { .. }
            | S3Error::Credentials { .. }
            | S3Error::Client { .. } => Verdict::Fatal,
        }
    }
}

/// An OCI image layout in a bucket.
pub struct S3Source {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    index: ImageIndex,
    stall_timeout: Duration,
}

/// Looks a variable up in the process environment; a parameter so tests can pass their own.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

struct Keys {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// Values of `section` in an INI file as the AWS tools write them (`key = value` lines).
fn ini_section(text: &str, section: &str) -> Option<Vec<(String, String)>> {
    let mut found = None;
    let mut current = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim() == section;
            if current {
                found.get_or_insert_with(Vec::new);
            }
            continue;
        }
        if current && let Some((k, v)) = line.split_once('=') {
            found
                .get_or_insert_with(Vec::new)
                .push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    found
}

fn aws_dir(env: Env) -> Option<PathBuf> {
    env("HOME").map(|h| PathBuf::from(h).join(".aws"))
}

fn credentials(env: Env) -> Result<Option<Keys>, S3Error> {
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Some(Keys {
            access_key_id: id,
            secret_access_key: secret,
            session_token: env("AWS_SESSION_TOKEN"),
        }));
    }
    let path = match env("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => PathBuf::from(p),
        None => match aws_dir(env) {
            Some(dir) => dir.join("credentials"),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(S3Error::Credentials {
                path,
                reason: e.to_string(),
            });
        }
    };
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let Some(values) = ini_section(&text, &profile) else {
        return Err(S3Error::Credentials {
            path,
            reason: format!("no [{profile}] profile (set AWS_PROFILE to one that exists)"),
        });
    };
    let get = |k: &str| {
        values
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(id), Some(secret)) => Ok(Some(Keys {
            access_key_id: id,
            secret_access_key: secret,
            session_token: get("aws_session_token"),
        })),
        _ => Err(S3Error::Credentials {
            path,
            reason: format!("profile [{profile}] lacks aws_access_key_id or aws_secret_access_key"),
        }),
    }
}

fn region(config: &S3Config, env: Env) -> String {
    if let Some(r) = config
        .region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
    {
        return r;
    }
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let section = if profile == "default" {
        profile
    } else {
        format!("profile {profile}")
    };
    let path = env("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| aws_dir(env).map(|d| d.join("config")));
    path.and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| ini_section(&text, &section))
        .and_then(|values| values.into_iter().find(|(k, _)| k == "region"))
        .map(|(_, v)| v)
        .unwrap_or_else(|| "us-east-1".into())
}

impl S3Source {
    /// Connects to the bucket of `reference` and reads the layout's `index.json`.
    pub async fn open(
        reference: &S3Ref,
        config: &S3Config,
        connect_timeout: Duration,
        stall_timeout: Duration,
    ) -> Result<S3Source, S3Error> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let bucket = reference.bucket.clone();
        let endpoint = config
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"));
        let mut options = ClientOptions::new()
            .with_connect_timeout(connect_timeout)
            // Whole-request timeouts would cut off a large but progressing range; stalls are
            // caught per piece of the body instead.
            .with_timeout_disabled();
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(region(config, &env))
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &endpoint {
            options = options.with_allow_http(endpoint.starts_with("http://"));
            builder = builder
                .with_endpoint(endpoint.trim_end_matches('/'))
                .with_virtual_hosted_style_request(false);
        }
        builder = match credentials(&env)? {
            Some(keys) => {
                let b = builder
                    .with_access_key_id(keys.access_key_id)
                    .with_secret_access_key(keys.secret_access_key);
                match keys.session_token {
                    Some(t) => b.with_token(t),
                    None => b,
                }
            }
            None => builder.with_skip_signature(true),
        };
        let store = builder
            .with_client_options(options)
            .build()
            .map_err(|e| S3Error::Client {
                bucket: bucket.clone(),
                reason: e.to_string(),
            })?;
        let mut source = S3Source {
            store: Arc::new(store),
            bucket,
            prefix: reference.prefix.clone(),
            index: ImageIndex {
                schema_version: 2,
                media_type: None,
                manifests: Vec::new(),
                annotations: Default::default(),
            },
            stall_timeout,
        };
        let index_key = source.key("index.json");
        let bytes = source.read_whole(&index_key, MAX_MANIFEST_BYTES).await?;
        source.index = serde_json::from_slice(&bytes).map_err(|e| S3Error::BadIndex {
            url: source.url(&index_key),
            reason: e.to_string(),
        })?;
        Ok(source)
    }

    /// Which manifest the reference means.
    pub fn selector(&self, reference: &S3Ref) -> Result<ManifestSelector, S3Error> {
        self.index
            .select(reference.tag.as_deref(), reference.digest.as_ref())
            .map_err(|count| S3Error::Ambiguous {
                layout: self.layout_name(),
                count,
                available: self.index.tags(),
            })
    }

    fn layout_name(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn key(&self, name: &str) -> KeyPath {
        if self.prefix.is_empty() {
            KeyPath::from(name)
        } else {
            KeyPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn blob_key(&self, digest: &Digest) -> KeyPath {
        self.key(&format!("blobs/sha256/{}", digest.hex()))
    }

    fn url(&self, key: &KeyPath) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn error(&self, key: &KeyPath, e: object_store::Error) -> S3Error {
        let url = self.url(key);
        let short = |s: String| s.chars().take(300).collect::<String>();
        match e {
            object_store::Error::NotFound { .. } => S3Error::NotFound { url },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => S3Error::Denied {
                url,
                detail: short(source.to_string()),
            },
            other => S3Error::Request {
                url,
                reason: short(other.to_string()),
            },
        }
    }

    /// Waits for a response's head at most the stall timeout (object_store's own whole-request
    /// timeout is off, so that long bodies are not cut off).
    async fn within_stall<T>(
        &self,
        key: &KeyPath,
        request: impl std::future::Future<Output = T>,
    ) -> Result<T, S3Error> {
        tokio::time::timeout(self.stall_timeout, request)
            .await
            .map_err(|_| S3Error::Stalled {
                url: self.url(key),
                secs: self.stall_timeout.as_secs_f64(),
            })
    }

    /// Reads a whole object of at most `limit` bytes.
    async fn read_whole(&self, key: &KeyPath, limit: u64) -> Result<Bytes, S3Error> {
        let result = self
            .within_stall(key, self.store.get(key))
            .await?
            .map_err(|e| self.error(key, e))?;
        if result.meta.size > limit {
            return Err(S3Error::TooLarge {
                url: self.url(key),
                size: result.meta.size,
                limit,
            });
        }
        let expected = result.meta.size;
        let bytes = self.collect(key, result.into_stream(), 0..expected).await?;
        Ok(bytes)
    }

    /// Reads a whole blob and checks it against its digest.
    async fn read_verified(&self, digest: &Digest, limit: u64) -> Result<Bytes, S3Error> {
        let key = self.blob_key(digest);
        let bytes = self.read_whole(&key, limit).await?;
        digest.verify(&bytes).map_err(|source| S3Error::Digest {
            url: self.url(&key),
            source,
        })?;
        Ok(bytes)
    }

    async fn collect(
        &self,
        key: &KeyPath,
        stream: futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>,
        range: Range<u64>,
    ) -> Result<Bytes, S3Error> {
        let mut out = bytes::BytesMut::with_capacity((range.end - range.start) as usize);
        let mut body = self.exact(key, stream, range);
        while let Some(piece) = body.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out.freeze())
    }

    /// A body as exactly `range.end - range.start` bytes: a short body is an error, extra bytes
    /// are dropped, and a piece that does not come within the stall timeout ends it.
    fn exact(
        &self,
        key: &KeyPath,
        stream: futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>,
        range: Range<u64>,
    ) -> futures_util::stream::BoxStream<'static, Result<Bytes, S3Error>> {
        struct State {
            inner: futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>,
            got: u64,
            want: u64,
            done: bool,
        }
        let url = self.url(key);
        let stall = self.stall_timeout;
        let start = range.start;
        let end = range.end.saturating_sub(1);
        let state = State {
            inner: stream,
            got: 0,
            want: range.end - range.start,
            done: false,
        };
        futures_util::stream::unfold(state, move |mut s| {
            let url = url.clone();
            async move {
                if s.done || s.got == s.want {
                    return None;
                }
                let item = match tokio::time::timeout(stall, s.inner.next()).await {
                    Err(_) => Err(S3Error::Stalled {
                        url,
                        secs: stall.as_secs_f64(),
                    }),
                    Ok(None) => Err(S3Error::Truncated {
                        url,
                        start,
                        end,
                        got: s.got,
                    }),
                    Ok(Some(Err(e))) => Err(S3Error::Request {
                        url,
                        reason: e.to_string(),
                    }),
                    Ok(Some(Ok(piece))) => {
                        let take = piece.len().min((s.want - s.got) as usize);
                        s.got += take as u64;
                        Ok(piece.slice(..take))
                    }
                };
                s.done = item.is_err();
                Some((item, s))
            }
        })
        .boxed()
    }
}

#[async_trait]
impl ImageSource for S3Source {
    fn name(&self) -> String {
        self.layout_name()
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        let (digest, entry) = self
            .index
            .lookup(selector)
            .ok_or_else(|| S3Error::TagNotFound {
                layout: self.layout_name(),
                tag: selector.to_string(),
                available: self.index.tags(),
            })?;
        let bytes = self.read_verified(&digest, MAX_MANIFEST_BYTES).await?;
        Ok(FetchedManifest {
            bytes,
            media_type: entry.map(|e| e.media_type.clone()),
            digest,
        })
    }

    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError> {
        if descriptor.size > limit {
            return Err(S3Error::TooLarge {
                url: self.url(&self.blob_key(&descriptor.digest)),
                size: descriptor.size,
                limit,
            }
            .into());
        }
        Ok(self.read_verified(&descriptor.digest, limit).await?)
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        if range.is_empty() {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let key = self.blob_key(digest);
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..GetOptions::default()
        };
        let result = self
            .within_stall(&key, self.store.get_opts(&key, options))
            .await?
            .map_err(|e| self.error(&key, e))?;
        if result.range.start != range.start {
            return Err(S3Error::Request {
                url: self.url(&key),
                reason: format!(
                    "asked for bytes from {}, got them from {}",
                    range.start, result.range.start
                ),
            }
            .into());
        }
        let body = self.exact(&key, result.into_stream(), range);
        Ok(Box::pin(body.map(|r| r.map_err(SourceError::from))))
    }
    /// Referrers live in registries only.
    async fn referrers(
        &self,
        _subject: &Digest,
        _artifact_types: &[&str],
    ) -> Result<Vec<Descriptor>, SourceError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_region_from_env_and_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap().to_string();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = AKD\naws_secret_access_key = SD\n\n# team\n[team]\naws_access_key_id=AKT\naws_secret_access_key=ST\naws_session_token=TT\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[default]\nregion = eu-west-1\n[profile team]\nregion = ap-south-1\n",
        )
        .unwrap();
        let env_of = |vars: Vec<(&'static str, String)>| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        };
        let plain = env_of(vec![("HOME", home.clone())]);
        let keys = credentials(&plain).unwrap().unwrap();
        assert_eq!(
            (keys.access_key_id.as_str(), keys.session_token),
            ("AKD", None)
        );
        assert_eq!(region(&S3Config::default(), &plain), "eu-west-1");

        let team = env_of(vec![("HOME", home.clone()), ("AWS_PROFILE", "team".into())]);
        let keys = credentials(&team).unwrap().unwrap();
        assert_eq!(keys.access_key_id, "AKT");
        assert_eq!(keys.session_token.as_deref(), Some("TT"));
        assert_eq!(region(&S3Config::default(), &team), "ap-south-1");

        // Environment variables win over files; a flag wins over both.
        let vars = env_of(vec![
            ("HOME", home.clone()),
            ("AWS_ACCESS_KEY_ID", "AKE".into()),
            ("AWS_SECRET_ACCESS_KEY", "SE".into()),
            ("AWS_REGION", "us-west-2".into()),
        ]);
        assert_eq!(credentials(&vars).unwrap().unwrap().access_key_id, "AKE");
        assert_eq!(region(&S3Config::default(), &vars), "us-west-2");
        let flag = S3Config {
            region: Some("eu-north-1".into()),
            ..S3Config::default()
        };
        assert_eq!(region(&flag, &vars), "eu-north-1");

        let missing = env_of(vec![("HOME", home.clone()), ("AWS_PROFILE", "nope".into())]);
        let err = credentials(&missing).err().unwrap().to_string();
        assert!(err.contains("no [nope] profile"), "{err}");
        let nowhere = env_of(vec![("HOME", "/nonexistent".into())]);
        assert!(credentials(&nowhere).unwrap().is_none());
        assert_eq!(region(&S3Config::default(), &nowhere), "us-east-1");
    }
}

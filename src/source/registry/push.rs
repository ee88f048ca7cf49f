//! Pushing to a registry: blobs (monolithic upload) and manifests, as `lazylayer convert` needs.
//!
//! A blob the registry already has is not sent again (`HEAD` first). An upload is a `POST` that
//! opens an upload session, then one `PUT` of the whole blob to the session's location with the
//! digest; the registry checks the digest itself. The repository handle asks for a
//! `pull,push` token scope. Bodies are streamed from their file, so a large layer never sits in
//! memory, and can be sent again if the first attempt meets a `401` (token renewal).

use std::path::Path;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};

use super::{Registry, RegistryError, Repository, header_str, shown, status_error};
use crate::model::digest::Digest;

impl Repository {
    /// A handle on `target`'s repository whose requests carry a token good for pushing (what
    /// `convert`, `index` and `profile push` write through), on the first of its hosts that may
    /// be pushed to (containerd's rule; the registry itself unless hosts.toml says otherwise).
    pub fn for_push(
        target: &crate::model::reference::RegistryRef,
        config: &crate::source::config::FetchConfig,
    ) -> Result<Repository, RegistryError> {
        let hosts =
            super::hosts::registry_hosts(config.hosts_dir.as_deref(), target, config.plain_http)?;
        let host = hosts.iter().find(|h| h.capabilities.push).ok_or_else(|| {
            RegistryError::HostsConfig {
                path: hosts[0].configured_in.clone().unwrap_or_default(),
                reason: format!("no host of {} has the push capability", target.registry),
            }
        })?;
        let registry = Registry::for_host(&host.name(&target.registry), host, config)?;
        let name = &target.repository;
        Ok(Repository {
            registry,
            name: name.to_string(),
            scope: format!("repository:{name}:pull,push"),
        })
    }

    /// Whether the registry has blob `digest` in this repository.
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        let url = self.url("blobs", &digest.to_string());
        let http = &self.registry.http;
        let resp = self
            .registry
            .send(|| http.head(url.clone()), &url, &self.scope)
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(resp, &url).await),
        }
    }

    /// Checks that these credentials may push here, before any work that a refusal would waste
    /// (`convert` reads and rewrites every layer before its first upload): opens an upload session
    /// and cancels it. A registry that does not cancel sessions expires them itself.
    pub async fn check_push_access(&self) -> Result<(), RegistryError> {
        let session = self.start_upload().await?;
        let http = &self.registry.http;
        // Best effort: the session is empty, and the answer does not change the verdict.
        let _ = self
            .registry
            .send(|| http.delete(session.clone()), &session, &self.scope)
            .await;
        Ok(())
    }

    /// Opens an upload session; returns its location.
    async fn start_upload(&self) -> Result<reqwest::Url, RegistryError> {
        let start = self.url("blobs", "uploads/");
        let http = &self.registry.http;
        let resp = self
            .registry
            .send(
                || http.post(start.clone()).header(CONTENT_LENGTH, 0),
                &start,
                &self.scope,
            )
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(resp, &start).await);
        }
        let location = header_str(&resp, LOCATION).ok_or_else(|| RegistryError::Transport {
            url: shown(&start),
            reason: "upload session without a Location".into(),
        })?;
        start.join(&location).map_err(|e| RegistryError::Transport {
            url: shown(&start),
            reason: format!("bad upload location {location:?}: {e}"),
        })
    }

    /// Uploads the file at `path` as blob `digest` (`size` bytes), unless the registry has it.
    pub async fn push_blob(
        &self,
        digest: &Digest,
        size: u64,
        path: &Path,
    ) -> Result<(), RegistryError> {
        self.upload(digest, size, || match std::fs::File::open(path) {
            Ok(file) => reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
                tokio::fs::File::from_std(file),
            )),
            // Surfaces as a transport error of the PUT, naming the URL.
            Err(e) => reqwest::Body::wrap_stream(futures_util::stream::once(async move {
                Err::<bytes::Bytes, _>(e)
            })),
        })
        .await
    }

    /// Uploads `bytes` as blob `digest`, unless the registry has it: for small blobs made in
    /// memory (artifacts' configs, profiles).
    pub async fn push_bytes(
        &self,
        digest: &Digest,
        bytes: &bytes::Bytes,
    ) -> Result<(), RegistryError> {
        self.upload(digest, bytes.len() as u64, || {
            reqwest::Body::from(bytes.clone())
        })
        .await
    }

    /// One monolithic upload of the blob `body()` gives (`size` bytes), unless the registry
    /// has it; `body` is called again for a retry.
    async fn upload(
        &self,
        digest: &Digest,
        size: u64,
        body: impl Fn() -> reqwest::Body,
    ) -> Result<(), RegistryError> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        let mut url = self.start_upload().await?;
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let http = &self.registry.http;
        let resp = self
            .registry
            .send(
                || {
                    http.put(url.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_LENGTH, size)
                        .body(body())
                },
                &url,
                &self.scope,
            )
            .await?;
        match resp.status() {
            StatusCode::CREATED | StatusCode::ACCEPTED | StatusCode::NO_CONTENT => Ok(()),
            _ => Err(status_error(resp, &url).await),
        }
    }

    /// Puts a manifest under `reference` (a tag or its digest). Returns whether the registry
    /// says it indexed the manifest's `subject` (the `OCI-Subject` header of registries with the
    /// referrers API).
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<bool, RegistryError> {
        let url = self.url("manifests", reference);
        let http = &self.registry.http;
        let body = bytes::Bytes::copy_from_slice(bytes);
        let resp = self
            .registry
            .send(
                || {
                    http.put(url.clone())
                        .header(CONTENT_TYPE, media_type)
                        .body(body.clone())
                },
                &url,
                &self.scope,
            )
            .await?;
        match resp.status() {
            StatusCode::CREATED | StatusCode::OK | StatusCode::ACCEPTED => {
                Ok(resp.headers().contains_key("oci-subject"))
            }
            _ => Err(status_error(resp, &url).await),
        }
    }
}

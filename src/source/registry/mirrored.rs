//! A repository read through every host that serves it: the mirrors its registry's hosts.toml
//! names, in order, then the registry itself (see [`super::hosts`]).
//!
//! Each request goes to the first host with the capability it needs (a tag's resolution and
//! referrers: `resolve`; blobs and manifests by digest: `pull`) and, when that host fails for any
//! reason, to the next, as containerd does; the last host's error is the one returned, so that the
//! registry's own answer (a 404, a refusal) is what the retry policy and the user see. A mirror
//! cannot hand out wrong bytes unnoticed: manifests and whole blobs are checked against their
//! digest here, and a chunk a mount serves against its digest in the layer's index where the index
//! gives one, whichever host sent it.
//!
//! A host whose connection failed is tried after the others for [`UNREACHABLE_FOR`], so that a
//! dead mirror costs one failed connection per half minute, not one per read (a black-holed one
//! would cost a whole connect timeout each time). Failed mid-transfer, a range read is resumed by
//! the retry layer above, which then lands on the next host.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::hosts::{self, Capabilities};
use super::{Registry, RegistryError, Repository};
use crate::cache::disk::DiskCache;
use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, FetchedManifest};
use crate::model::reference::{ManifestSelector, RegistryRef};
use crate::source::config::FetchConfig;
use crate::source::{ByteStream, ImageSource, SourceError};

/// How long a host whose connection failed goes to the back of the line.
pub const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

/// A repository and the hosts it is read from, in the order they are tried.
pub struct MirroredRepository {
    hosts: Vec<Repository>,
    /// `registry/repository` as the reference names it, for messages.
    display: String,
}

impl MirroredRepository {
    /// The repository `reference` names, with the hosts its registry's hosts.toml (under
    /// `config.hosts_dir`) gives. Reads that configuration, credentials and certificate files;
    /// makes no request.
    pub fn open(
        reference: &RegistryRef,
        config: &FetchConfig,
    ) -> Result<MirroredRepository, RegistryError> {
        let hosts =
            hosts::registry_hosts(config.hosts_dir.as_deref(), reference, config.plain_http)?;
        let hosts = hosts
            .iter()
            .map(|h| {
                let registry = Registry::for_host(&h.name(&reference.registry), h, config)?;
                Ok(registry.repository(&reference.repository))
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        if hosts.len() > 1 {
            let order: Vec<&str> = hosts.iter().map(|r| r.registry.api.as_str()).collect();
            tracing::debug!(registry = %reference.registry, hosts = ?order, "reading through mirrors");
        }
        Ok(MirroredRepository {
            hosts,
            // Without tag or digest: sources are named by repository (profiles are kept by it).
            display: format!("{}/{}", reference.registry, reference.repository),
        })
    }

    /// See [`Registry::remember_in`]; for every host.
    pub fn remember_in(&self, disk: Arc<DiskCache>) {
        for repo in &self.hosts {
            repo.registry.remember_in(disk.clone());
        }
    }

    /// Pings every host that can resolve, at once: fine when one answers (a mirror may stand
    /// in for a registry this node cannot reach); else the last host's error.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let candidates = self.candidates(|c| c.resolve, "resolve")?;
        let results =
            futures_util::future::join_all(candidates.iter().map(|r| r.registry.ping())).await;
        let mut last = None;
        for result in results {
            match result {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one host was pinged"))
    }

    /// The hosts with capability `wanted`, recently unreachable ones last.
    fn candidates(
        &self,
        wanted: fn(&Capabilities) -> bool,
        what: &str,
    ) -> Result<Vec<&Repository>, RegistryError> {
        let mut hosts: Vec<&Repository> = self
            .hosts
            .iter()
            .filter(|r| wanted(&r.registry.capabilities))
            .collect();
        if hosts.is_empty() {
            let server = &self.hosts[self.hosts.len() - 1];
            return Err(RegistryError::HostsConfig {
                path: server.registry.configured_in().unwrap_or_default(),
                reason: format!("no host of {} may {what}", self.display),
            });
        }
        // A stable sort keeps the configured order within each group.
        hosts.sort_by_key(|r| r.registry.recently_unreachable());
        Ok(hosts)
    }

    /// Runs `op` on the hosts with capability `wanted` until one succeeds.
    async fn on_hosts<'a, T, F, Fut>(
        &'a self,
        wanted: fn(&Capabilities) -> bool,
        what: &str,
        op: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(&'a Repository) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let hosts = self.candidates(wanted, what)?;
        let count = hosts.len();
        let mut last = None;
        for (i, repo) in hosts.into_iter().enumerate() {
            let was_unreachable = repo.registry.recently_unreachable();
            match op(repo).await {
                Ok(value) => {
                    repo.registry.reachable();
                    return Ok(value);
                }
                Err(e) => {
                    if i + 1 < count {
                        let newly_down =
                            matches!(e, RegistryError::Connect { .. }) && !was_unreachable;
                        if newly_down {
                            tracing::warn!(host = %repo.registry.name, error = %e, "registry host unreachable; using the next one for {}s", UNREACHABLE_FOR.as_secs());
                        } else {
                            tracing::debug!(host = %repo.registry.name, error = %e, "registry host failed; trying the next one");
                        }
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one host was tried"))
    }
}

#[async_trait]
impl ImageSource for MirroredRepository {
    fn name(&self) -> String {
        self.display.clone()
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        // A tag is resolved; a digest names content any pulling host may serve (it is verified).
        let wanted: fn(&Capabilities) -> bool = match selector {
            ManifestSelector::Tag(_) => |c| c.resolve,
            ManifestSelector::Digest(_) => |c| c.pull,
        };
        Ok(self
            .on_hosts(wanted, "resolve", |r| r.manifest(selector))
            .await?)
    }

    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError> {
        Ok(self
            .on_hosts(
                |c| c.pull,
                "pull",
                |r| r.blob(&descriptor.digest, descriptor.size, limit),
            )
            .await?)
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        let stream = self
            .on_hosts(|c| c.pull, "pull", |r| r.blob_range(digest, range.clone()))
            .await?;
        Ok(Box::pin(stream.map(|r| r.map_err(SourceError::from))))
    }

    async fn blob_ranges(
        &self,
        digest: &Digest,
        ranges: &[Range<u64>],
    ) -> Result<ByteStream, SourceError> {
        let stream = self
            .on_hosts(|c| c.pull, "pull", |r| r.blob_ranges(digest, ranges))
            .await?;
        Ok(Box::pin(stream.map(|r| r.map_err(SourceError::from))))
    }

    /// Each host answers for itself: one that cannot join ranges gets them one by one.
    fn joins_ranges(&self) -> bool {
        self.hosts.iter().any(Repository::joins_ranges)
    }

    async fn referrers(
        &self,
        subject: &Digest,
        artifact_types: &[&str],
    ) -> Result<Vec<Descriptor>, SourceError> {
        Ok(self
            .on_hosts(
                |c| c.resolve,
                "resolve",
                |r| r.referrers(subject, artifact_types),
            )
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::reference::ImageRef;

    /// Profiles and caches know a source by its name: the same for every tag and digest of a
    /// repository, or a run (by tag) and its mount server (pinned by digest) would disagree.
    #[test]
    fn a_repository_is_named_without_its_tag_or_digest() {
        let config = FetchConfig {
            hosts_dir: None,
            docker_config: None,
            ..FetchConfig::default()
        };
        let digest = "sha256:".to_string() + &"ab".repeat(32);
        for reference in [
            "registry.example:5000/team/app:1.0".to_string(),
            format!("registry.example:5000/team/app@{digest}"),
        ] {
            let ImageRef::Registry(r) = ImageRef::parse(&reference).unwrap() else {
                unreachable!("a registry reference")
            };
            let repo = MirroredRepository::open(&r, &config).unwrap();
            assert_eq!(repo.name(), "registry.example:5000/team/app");
        }
    }
}

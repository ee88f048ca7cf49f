//! Remote layers: what makes a layer remote, and mounting a run of them lazily.
//!
//! A layer is remote when containerd's `Prepare` names where it comes from (the CRI plugin's or
//! stargz-snapshotter's labels) and it has a lazy index we could fetch and verify. A run of
//! remote layers is served by one FUSE mount of their merged tree on the topmost one's `fs/`;
//! images pinned by manifest digest are resolved once and remembered, as every layer of a pull
//! asks for the same image.
//!
//! A pull prepares its layers one after another (each stands on the one below), but their lazy
//! indexes need not load that way: when an image is first resolved, every layer's index check
//! starts at once, and each `Prepare` then waits only for its own layer's check, which has been
//! running since the first. A pull thus costs the slowest TOC rather than the sum of them
//! (python-app's three: 0.18 + 0.07 + 0.10 s through a 20 ms link). With a disk cache, the
//! loaded indexes stay there for the mount that follows.
//!
//! `lazylayer pull` hands the snapshotter its own resolution of the image (manifest, config and
//! what is published next to it) in labels on the first `Prepare`; checked against the
//! manifest digest, it saves resolving the image again, two round trips before the first index
//! request. Other clients (the CRI plugin, `ctr-remote`) send none, and the image is resolved.
//!
//! Once every layer's check has passed (its published start-up profile, if any, is fetched
//! beside the checks), the whole image is opened ahead of its mount, so that its prioritised
//! files (the eStargz landmark's, a profile's) and its background fill start during the pull,
//! not when the first container mounts it. The first mount of the
//! whole image takes that opened image; one that nobody mounts within [`OPENED_AHEAD_KEPT`]
//! is dropped (what it prefetched stays in the disk cache).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::store::RemoteLayer;
use super::{
    IMAGE_LABELS, LAYER_LABELS, MANIFEST_LABEL, RESOLUTION_LABELS, SnapshotError, Snapshotter,
};
use crate::fs::{ImageFs, ImageFsOptions};
use crate::layer::tar_stream::Ignore;
use crate::model::oci::FetchedManifest;
use crate::model::reference::ImageRef;
use crate::mount::{Companions, MountOptions, detach};
use crate::source::ImageSource;
use crate::source::config::FetchConfig;
use crate::source::image::{Layer, Resolution, ResolvedImage};
use crate::source::open::{OpenedImage, open_image, open_resolved};

/// One FUSE mount serving a run of remote layers.
pub(super) struct LazyMount {
    dir: PathBuf,
    session: fuser::BackgroundSession,
    companions: Companions,
}

/// A resolved image, the (uncounted) source it came from, and the check of each layer's lazy
/// index (in the image's order), all started when the image was resolved.
#[derive(Clone)]
pub(super) struct RemoteImage {
    raw: Arc<dyn ImageSource>,
    image: ResolvedImage,
    checks: Vec<IndexCheck>,
    /// The whole image opened ahead of its mount, until a mount takes it.
    ahead: Arc<std::sync::Mutex<Option<OpenedAhead>>>,
}

/// The whole image opened ahead, or `None` when a layer is not lazy or opening failed (the
/// mount then opens it itself and reports why).
type OpenedAhead = Shared<BoxFuture<'static, Option<Arc<ImageFs>>>>;

/// How long an image opened ahead of its mount waits to be mounted: `ctr run` and the kubelet
/// create the container within seconds of the pull.
pub(super) const OPENED_AHEAD_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

/// Opens the whole image once all `checks` pass; the returned slot holds it for a mount.
fn open_ahead(
    raw: Arc<dyn ImageSource>,
    image: ResolvedImage,
    checks: Vec<IndexCheck>,
    options: ImageFsOptions,
) -> Arc<std::sync::Mutex<Option<OpenedAhead>>> {
    let open: OpenedAhead = async move {
        let checked = async {
            for check in checks {
                check.await.ok()?;
            }
            Some(())
        };
        let profile = ImageFs::fetch_profile_ahead(raw.clone(), &image, &options);
        tokio::join!(checked, profile).0?;
        let opened = OpenedImage::stacked(raw, image, options.disk.clone());
        match ImageFs::open(opened, &options).await {
            Ok(fs) => Some(Arc::new(fs)),
            Err(e) => {
                tracing::debug!("opening ahead of the mount: {e}");
                None
            }
        }
    }
    .boxed()
    .shared();
    let slot = Arc::new(std::sync::Mutex::new(Some(open.clone())));
    let kept = Arc::downgrade(&slot);
    tokio::spawn(async move {
        // Shared futures run only when polled: this is what runs it now.
        open.await;
        tokio::time::sleep(OPENED_AHEAD_KEPT).await;
        if let Some(slot) = kept.upgrade() {
            slot.lock().unwrap().take();
        }
    });
    slot
}

/// A layer's lazy index fetched and verified, or why it cannot be (shared by every `Prepare`
/// that asks).
type IndexCheck = Shared<BoxFuture<'static, Result<(), String>>>;

/// Starts checking every layer's lazy index at once, through `source`.
fn start_checks(
    source: &Arc<dyn ImageSource>,
    layers: &[Layer],
    disk: Option<Arc<crate::cache::disk::DiskCache>>,
) -> Vec<IndexCheck> {
    layers
        .iter()
        .map(|layer| {
            if layer.lazy_index.is_none() {
                let no_index = "it has no lazy index (not eStargz or zstd:chunked)".to_string();
                return futures_util::future::ready(Err(no_index)).boxed().shared();
            }
            let (source, layer, disk) = (source.clone(), layer.clone(), disk.clone());
            // Spawned, so that it runs whether or not a Prepare is waiting for it yet.
            let task = tokio::spawn(async move {
                crate::layer::load(source, &layer, Arc::new(Ignore), disk.as_deref())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
            async move { task.await.map_err(|e| e.to_string())? }
                .boxed()
                .shared()
        })
        .collect()
}

/// Resolved images remembered: a few pulls' worth (an entry is a manifest and a config).
pub(super) const REMEMBERED_IMAGES: usize = 64;

impl Snapshotter {
    /// Mounts the run of remote layers that ends at snapshot `name` on its directory (once).
    pub(super) async fn mount_remote(&self, name: &str) -> Result<PathBuf, SnapshotError> {
        let mut mounts = self.mounts.lock().await;
        if let Some(mounted) = mounts.get(name) {
            return Ok(mounted.dir.clone());
        }
        let (dir, remote, depth) = {
            let store = self.store();
            let record = store
                .get(name)
                .ok_or_else(|| SnapshotError::NotFound(name.to_string()))?;
            let remote = record.remote.clone().ok_or_else(|| {
                SnapshotError::FailedPrecondition(format!("snapshot {name} is not remote"))
            })?;
            (
                self.dir(record.id).join("fs"),
                remote,
                store.chain(name).len(),
            )
        };
        let failed = |reason: String| remote.failed(reason);
        let resolved = self.remote_image(&remote, None).await?;
        let position = layer_position(&resolved.image, &remote).map_err(failed)?;
        if position + 1 != depth {
            return Err(failed(format!(
                "it is layer {} of the image but snapshot {name} stands on {} layers",
                position + 1,
                depth
            )));
        }
        let ahead = if depth == resolved.image.layers.len() {
            let taken = resolved.ahead.lock().unwrap().take();
            match taken {
                Some(open) => open.await,
                None => None,
            }
        } else {
            None
        };
        let fs = match ahead {
            Some(fs) => {
                fs.restart_profile_window();
                fs
            }
            None => {
                // A source that counts what this mount fetches and keeps indexes on disk.
                let disk = self.config.image_fs.disk.clone();
                let mut opened = OpenedImage::stacked(resolved.raw, resolved.image, disk);
                opened.image.layers.truncate(depth);
                let fs = ImageFs::open(opened, &self.config.image_fs)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                Arc::new(fs)
            }
        };
        if !self.kept.as_ref().is_some_and(|k| k.has(&dir)) {
            let _ = detach(&dir);
        }
        let options = MountOptions {
            // Containers run as any user, and their setuid binaries and devices must work.
            allow_other: true,
            suid_dev: true,
            ..MountOptions::default()
        };
        let served = crate::mount::mount(
            fs.clone(),
            &dir,
            &options,
            tokio::runtime::Handle::current(),
            self.kept.as_ref(),
        )
        .map_err(|e| failed(e.to_string()))?;
        let session = served.session;
        let companions = Companions::start(fs, &dir, false);
        tracing::info!(
            "{} {} layer(s) of {} at {}",
            if served.resumed.is_some() {
                "took over the mount of"
            } else {
                "mounted"
            },
            depth,
            remote.image,
            dir.display()
        );
        mounts.insert(
            name.to_string(),
            LazyMount {
                dir: dir.clone(),
                session,
                companions,
            },
        );
        Ok(dir)
    }

    /// How to reach `image`'s registry: with the credentials the kubelet gave for it when a
    /// `cri-proxy` has them, else with the snapshotter's own.
    async fn registry_config(&self, image: &str) -> FetchConfig {
        let mut config = self.config.registry.clone();
        if let Some(proxy) = &self.config.cri_proxy {
            match crate::containerd::cri_proxy::credentials_for(proxy, image).await {
                Ok(Some(credentials)) => config.credentials = Some(credentials),
                Ok(None) => {
                    tracing::debug!(image, "no pull of this image carried credentials")
                }
                Err(e) => {
                    tracing::warn!("{e}; reading the image with the snapshotter's own credentials")
                }
            }
        }
        config
    }

    /// Resolves the image a remote layer belongs to and starts checking its layers' indexes.
    /// Images pinned by manifest digest are resolved once and remembered: every layer of a pull
    /// asks for the same image, and each resolution costs two round trips (manifest, config),
    /// none when `handed` (from `lazylayer pull`) is right.
    async fn remote_image(
        &self,
        remote: &RemoteLayer,
        handed: Option<Resolution>,
    ) -> Result<RemoteImage, SnapshotError> {
        let pinned = remote
            .manifest
            .clone()
            .map(|manifest| (remote.image.clone(), manifest));
        let remembered = pinned
            .as_ref()
            .and_then(|key| self.images.lock().unwrap().get(key).cloned());
        if let Some(remembered) = remembered {
            return Ok(remembered);
        }
        let failed = |reason: String| remote.failed(reason);
        let reference = ImageRef::parse(&remote.image).map_err(|e| failed(e.to_string()))?;
        let disk = self.config.image_fs.disk.clone();
        let registry = self.registry_config(&remote.image).await;
        let platform = &self.config.platform;
        let handed = match (handed, &remote.manifest) {
            (Some(handed), Some(pin)) => {
                open_resolved(&reference, pin, handed, &registry, platform, disk.clone())
                    .await
                    .inspect_err(|e| {
                        tracing::debug!("the resolution handed over is not used: {e}");
                    })
                    .ok()
            }
            _ => None,
        };
        let opened = match handed {
            Some(opened) => opened,
            None => {
                let pin = remote.manifest.as_ref();
                open_image(&reference, pin, &registry, platform, disk.clone())
                    .await
                    .map_err(|e| failed(e.to_string()))?
            }
        };
        let checks = start_checks(&opened.source, &opened.image.layers, disk);
        // Only a remembered image is opened ahead: one resolved per Prepare would be opened
        // (and filled) once per layer.
        let ahead = match pinned {
            Some(_) => open_ahead(
                opened.raw.clone(),
                opened.image.clone(),
                checks.clone(),
                self.config.image_fs.clone(),
            ),
            None => Default::default(),
        };
        let resolved = RemoteImage {
            ahead,
            checks,
            raw: opened.raw,
            image: opened.image,
        };
        if let Some(key) = pinned {
            // Two Prepares racing here both resolve; the second one's entry wins, harmlessly.
            self.images.lock().unwrap().put(key, resolved.clone());
        }
        Ok(resolved)
    }

    /// Waits for a remote layer's lazy index to be fetched and verified: the layer can then be
    /// mounted lazily.
    pub(super) async fn check_remote(
        &self,
        remote: &RemoteLayer,
        handed: Option<Resolution>,
    ) -> Result<(), SnapshotError> {
        let failed = |reason: String| remote.failed(reason);
        let image = self.remote_image(remote, handed).await?;
        let position = layer_position(&image.image, remote).map_err(failed)?;
        let checked = image.checks[position].clone().await;
        if checked.is_err()
            && let Some(manifest) = &remote.manifest
        {
            // Not remembered: a failure may be the network's, and the next pull should try again.
            let key = (remote.image.clone(), manifest.clone());
            self.images.lock().unwrap().pop(&key);
        }
        checked.map_err(failed)
    }
}

impl RemoteLayer {
    /// The error for this layer failing for `reason`.
    fn failed(&self, reason: String) -> SnapshotError {
        SnapshotError::Remote {
            image: self.image.clone(),
            layer: self.layer.clone(),
            reason,
        }
    }
}

/// Takes the resolution `lazylayer pull` handed over out of `labels` (they are not stored: the
/// image is remembered instead). Labels that do not parse are dropped, and the image is then
/// resolved as usual.
pub(super) fn handed_resolution(labels: &mut BTreeMap<String, String>) -> Option<Resolution> {
    let [manifest, config, published] =
        RESOLUTION_LABELS.map(|name| labels.remove(name).map(String::into_bytes));
    let published = serde_json::from_slice(&published?).ok()?;
    let manifest = bytes::Bytes::from(manifest?);
    Some(Resolution {
        manifest: FetchedManifest {
            digest: crate::model::digest::Digest::of(&manifest),
            bytes: manifest,
            media_type: None,
        },
        config: bytes::Bytes::from(config?),
        published,
    })
}

/// The remote layer named by a `Prepare`'s labels, if they name one.
pub(super) fn remote_layer(labels: &BTreeMap<String, String>) -> Option<RemoteLayer> {
    let first = |names: &[&str]| names.iter().find_map(|n| labels.get(*n)).cloned();
    let image = first(&IMAGE_LABELS)?;
    let layer = first(&LAYER_LABELS)?.parse().ok()?;
    let manifest = labels.get(MANIFEST_LABEL).and_then(|m| m.parse().ok());
    Some(RemoteLayer {
        image,
        manifest,
        layer,
    })
}

pub(super) fn layer_position(image: &ResolvedImage, remote: &RemoteLayer) -> Result<usize, String> {
    image
        .layers
        .iter()
        .position(|l| l.descriptor.digest == remote.layer)
        .ok_or_else(|| format!("manifest {} has no such layer", image.manifest_digest))
}

impl LazyMount {
    pub(super) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Stops serving but leaves the mount and its kept connection to the next snapshotter.
    pub(super) fn leave(self) {
        self.companions.stop();
        // Dropping the session would unmount.
        std::mem::forget(self.session);
    }
}

pub(super) async fn unmount(
    mounted: LazyMount,
    kept: Option<&crate::mount::takeover::KeptConnections>,
) {
    mounted.companions.stop();
    if let Some(kept) = kept {
        kept.forget(&mounted.dir);
    }
    if let Err(e) = detach(&mounted.dir) {
        tracing::warn!("{}: {e}", mounted.dir.display());
    }
    let session = mounted.session;
    let _ = tokio::task::spawn_blocking(move || session.join()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containerd::snapshotter::tests::labels;

    #[tokio::test]
    async fn every_layers_index_check_starts_at_once() {
        use crate::model::digest::Digest;
        use crate::model::oci::{Descriptor, LazyIndex, MEDIA_OCI_LAYER_GZIP};
        use crate::source::memory::MemorySource;

        let memory = MemorySource::new();
        memory.hold();
        let layers: Vec<Layer> = (0..3u8)
            .map(|i| {
                // Not eStargz inside: the check fails, but only after its tail was fetched.
                let blob = vec![i; 1000];
                Layer {
                    descriptor: Descriptor::new(
                        MEDIA_OCI_LAYER_GZIP,
                        memory.put(blob.clone()),
                        1000,
                    ),
                    diff_id: Digest::of(&blob),
                    lazy_index: Some(LazyIndex::Estargz {
                        toc_digest: Digest::of(b"toc"),
                    }),
                }
            })
            .collect();
        let source: Arc<dyn ImageSource> = memory.clone();
        let checks = start_checks(&source, &layers, None);
        // Every layer's tail is requested while none has been answered yet.
        let all_asked = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while memory.ranges().len() < layers.len() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        let asked: Vec<Digest> = memory.ranges().into_iter().map(|(d, _)| d).collect();
        assert!(all_asked.is_ok(), "only {asked:?} were asked for at once");
        memory.release();
        for check in checks {
            let failed = check.await.unwrap_err();
            assert!(failed.contains("footer"), "{failed}");
        }
    }

    #[test]
    fn remote_layers_are_named_by_cri_or_stargz_labels() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let cri = labels(&[
            ("containerd.io/snapshot/cri.image-ref", "reg/app:1"),
            ("containerd.io/snapshot/cri.layer-digest", &digest),
        ]);
        let r = remote_layer(&cri).unwrap();
        assert_eq!((r.image.as_str(), &r.manifest), ("reg/app:1", &None));
        let stargz = labels(&[
            (
                "containerd.io/snapshot/remote/stargz.reference",
                "reg/app:1",
            ),
            ("containerd.io/snapshot/remote/stargz.digest", &digest),
        ]);
        assert_eq!(remote_layer(&stargz), Some(r));
        assert!(remote_layer(&labels(&[("containerd.io/snapshot/cri.image-ref", "x")])).is_none());
        let bad = labels(&[
            ("containerd.io/snapshot/cri.image-ref", "reg/app:1"),
            ("containerd.io/snapshot/cri.layer-digest", "sha256:zz"),
        ]);
        assert!(remote_layer(&bad).is_none());
    }
}

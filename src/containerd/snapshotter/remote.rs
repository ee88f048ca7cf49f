//! Remote layers: what makes a layer remote, and mounting a run of them lazily.
//!
//! A layer is remote when containerd's `Prepare` names where it comes from (the CRI plugin's or
//! stargz-snapshotter's labels) and it has a lazy index we could fetch and verify. A run of
//! remote layers is served by one FUSE mount of their merged tree on the topmost one's `fs/`;
//! images pinned by manifest digest are resolved once and remembered, as every layer of a pull
//! asks for the same image.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::store::RemoteLayer;
use super::{IMAGE_LABELS, LAYER_LABELS, MANIFEST_LABEL, SnapshotError, Snapshotter};
use crate::fs::ImageFs;
use crate::layer::tar_stream::Ignore;
use crate::model::reference::ImageRef;
use crate::mount::{Companions, MountOptions, detach};
use crate::source::image::ResolvedImage;
use crate::source::open::{OpenedImage, open_image};
use crate::source::{self, ImageSource};

/// One FUSE mount serving a run of remote layers.
pub(super) struct LazyMount {
    dir: PathBuf,
    session: fuser::BackgroundSession,
    companions: Companions,
}

/// A resolved image and the (uncounted) source it came from.
pub(super) type RemoteImage = (Arc<dyn ImageSource>, ResolvedImage);

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
        let mut opened = self.resolve(&remote).await?;
        let position = layer_position(&opened.image, &remote).map_err(failed)?;
        if position + 1 != depth {
            return Err(failed(format!(
                "it is layer {} of the image but snapshot {name} stands on {} layers",
                position + 1,
                depth
            )));
        }
        opened.image.layers.truncate(depth);
        let fs = ImageFs::open(opened, &self.config.image_fs)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let fs = Arc::new(fs);
        let _ = detach(&dir);
        let options = MountOptions {
            // Containers run as any user, and their setuid binaries and devices must work.
            allow_other: true,
            suid_dev: true,
            ..MountOptions::default()
        };
        let session = crate::mount::mount(
            fs.clone(),
            &dir,
            &options,
            tokio::runtime::Handle::current(),
        )
        .map_err(|e| failed(e.to_string()))?;
        let companions = Companions::start(fs, &dir);
        tracing::info!(
            "mounted {} layer(s) of {} at {}",
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

    /// Resolves the image a remote layer belongs to, with a source that counts what it fetches
    /// and keeps indexes in the disk cache. Images pinned by manifest digest are resolved once
    /// and remembered: every layer of a pull asks for the same image, and each resolution costs
    /// two round trips (manifest, config) before the layer's own TOC.
    async fn resolve(&self, remote: &RemoteLayer) -> Result<OpenedImage, SnapshotError> {
        let failed = |reason: String| remote.failed(reason);
        let pinned = remote
            .manifest
            .clone()
            .map(|manifest| (remote.image.clone(), manifest));
        let remembered = pinned
            .as_ref()
            .and_then(|key| self.images.lock().unwrap().get(key).cloned());
        let disk = self.config.image_fs.disk.clone();
        if let Some((raw, image)) = remembered {
            let (source, stats) = source::open::stack(raw.clone(), disk);
            return Ok(OpenedImage {
                raw,
                source,
                stats,
                image,
            });
        }
        let reference = ImageRef::parse(&remote.image).map_err(|e| failed(e.to_string()))?;
        let opened = open_image(
            &reference,
            remote.manifest.as_ref(),
            &self.config.registry,
            &self.config.platform,
            disk,
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        if let Some(key) = pinned {
            self.images
                .lock()
                .unwrap()
                .put(key, (opened.raw.clone(), opened.image.clone()));
        }
        Ok(opened)
    }

    /// Fetches and verifies a remote layer's lazy index: the layer can then be mounted lazily.
    pub(super) async fn check_remote(&self, remote: &RemoteLayer) -> Result<(), SnapshotError> {
        let failed = |reason: String| remote.failed(reason);
        let OpenedImage { source, image, .. } = self.resolve(remote).await?;
        let layer = &image.layers[layer_position(&image, remote).map_err(failed)?];
        if layer.lazy_index.is_none() {
            return Err(failed(
                "it has no lazy index (not eStargz or zstd:chunked)".into(),
            ));
        }
        crate::layer::load(
            source,
            layer,
            Arc::new(Ignore),
            self.config.image_fs.disk.as_deref(),
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        Ok(())
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

pub(super) async fn unmount(mounted: LazyMount) {
    mounted.companions.stop();
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

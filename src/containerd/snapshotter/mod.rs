//! A containerd snapshotter whose image layers are lazily mounted images.
//!
//! containerd talks to us over its snapshots gRPC API ([`service`]); this module holds the
//! semantics, modelled on containerd's own overlayfs snapshotter so that everything above it
//! (unpacking, `ctr run`, garbage collection) behaves the same:
//! - every snapshot has a directory `ROOT/snapshots/ID/` with `fs/` (its contents, or the upper
//!   directory of an active snapshot) and `work/` (overlayfs's work directory);
//! - an active snapshot mounts as overlayfs: its `fs/` over its parents' directories; a view of
//!   one layer is a read-only bind mount; a snapshot without parent is a bind mount of `fs/`;
//! - `Commit` turns an active snapshot into a committed one under a new name, `Remove` refuses a
//!   snapshot that has children, metadata lives in [`store`].
//!
//! Remote layers. When containerd prepares the snapshot a layer will be unpacked into, and the
//! request carries the target name (`containerd.io/snapshot.ref`) and where the layer comes from
//! (image reference and layer digest, in the CRI plugin's `containerd.io/snapshot/cri.*` labels,
//! which `lazylayer pull` also sets, or stargz-snapshotter's `.../remote/stargz.*` ones), and the
//! layer has a lazy index (eStargz or zstd:chunked), we fetch and verify that index, record the
//! target as a committed snapshot of our own and answer "already exists": containerd then skips
//! downloading and unpacking the layer. Layers without a lazy index, or whose index cannot be
//! fetched, get an ordinary active snapshot and containerd unpacks them as usual.
//!
//! Unlike stargz-snapshotter, which mounts every layer on its own and stacks them in overlayfs,
//! a run of remote layers is served by ONE FUSE mount of their merged tree (the same [`ImageFs`]
//! `lazylayer mount` uses), mounted on the topmost remote snapshot's `fs/`: a lookup costs one
//! map probe in our tree whatever the number of layers, instead of one probe per layer in the
//! kernel. A layer counts as remote only while everything below it is remote too, so the merged
//! run is always the bottom of the stack and needs no whiteouts of its own; local layers above
//! it are ordinary overlayfs lower directories. Mounts are made on first use (a container's
//! `Prepare`, a `View`) and shared by every container on top of the same snapshot. That side lives in
//! `remote.rs`.
//!
//! Restarts: the metadata file survives, and so do the FUSE connections: each mount's is kept
//! (systemd's store or a holder process, `mount::takeover`) and the next process takes it over
//! while the service already answers, so running containers only wait. Mount points whose
//! connection was not kept (the holder died too) are detached and mounted again; containers
//! running on them must be restarted. Kept connections no active snapshot needs any more are
//! closed once recovery is done. See kernel-notes/ for the kernel's side.

pub mod filter;
mod remote;
pub mod service;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use containerd_client::types::Mount;

use crate::fs::ImageFsOptions;
use crate::model::digest::Digest;
use crate::model::oci::Platform;
use crate::mount::detach;
use crate::mount::takeover::KeptConnections;
use crate::source::config::FetchConfig;
use remote::{LazyMount, REMEMBERED_IMAGES, RemoteImage, handed_resolution, remote_layer, unmount};
use store::{Kind, Record, RemoteLayer, Store};

/// The label containerd's unpacker sets on the snapshot a layer is prepared in: the name the
/// committed layer will have (its chain ID).
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// Image reference of a layer being unpacked (CRI's name first, then stargz-snapshotter's).
pub const IMAGE_LABELS: [&str; 2] = [
    "containerd.io/snapshot/cri.image-ref",
    "containerd.io/snapshot/remote/stargz.reference",
];
/// Compressed digest of the layer being unpacked.
pub const LAYER_LABELS: [&str; 2] = [
    "containerd.io/snapshot/cri.layer-digest",
    "containerd.io/snapshot/remote/stargz.digest",
];
/// Manifest the layer belongs to (pins the image when the reference is a tag).
pub const MANIFEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";
/// `lazylayer pull`'s own resolution of the image, handed over so that the snapshotter need
/// not ask the registry again (two round trips less before the layers' indexes are fetched):
/// the manifest's bytes, the config's bytes, and what was published next to the manifest
/// (JSON). Checked against the manifest label's digest; the published artifacts named are
/// verified when fetched, and trusted as the client is (containerd's clients are root). Never
/// stored.
pub const RESOLUTION_LABELS: [&str; 3] = [
    "containerd.io/snapshot/lazylayer.manifest",
    "containerd.io/snapshot/lazylayer.config",
    "containerd.io/snapshot/lazylayer.published",
];

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("remote layer {layer} of {image}: {reason}")]
    Remote {
        image: String,
        layer: Digest,
        reason: String,
    },
}

fn io_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.to_string();
    move |source| SnapshotError::Io { what, source }
}

/// Creates `path` (not its parents) with exactly `mode`.
fn make_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        // Left by a crash mid-Prepare: its id was never recorded, so nothing uses it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        other => other?,
    }
    // The umask may have taken bits away from the mode given at creation.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Settings of a snapshotter.
#[derive(Clone)]
pub struct SnapshotterConfig {
    /// Snapshot directories and the metadata file live here.
    pub root: PathBuf,
    /// How remote layers are fetched (credentials, timeouts, retries).
    pub registry: FetchConfig,
    /// The platform to pick when a reference names a multi-platform index.
    pub platform: Platform,
    /// How each lazily mounted run of layers reads and caches.
    pub image_fs: ImageFsOptions,
    /// A `lazylayer cri-proxy` to ask for an image's registry credentials (the kubelet's);
    /// `None`: the snapshotter's own only.
    pub cri_proxy: Option<PathBuf>,
    /// Keep each mount's FUSE connection (in systemd's store or a holder process) for the
    /// snapshotter that replaces this one: a restart, crash or upgrade then does not break
    /// running containers. On for the daemon; tests of the pure logic leave it off.
    pub keep_connections: bool,
}

pub struct Snapshotter {
    config: SnapshotterConfig,
    /// Where mounts' connections are kept, when they are.
    kept: Option<KeptConnections>,
    store: std::sync::Mutex<Store>,
    /// By snapshot name: the remote snapshots whose directory is a live FUSE mount. Held while a
    /// mount is being made, so two containers starting together mount once.
    mounts: tokio::sync::Mutex<HashMap<String, LazyMount>>,
    /// Images resolved by (reference, manifest digest), with the source that reads them.
    images: std::sync::Mutex<lru::LruCache<(String, Digest), RemoteImage>>,
}

/// What a snapshot's lower directories are, before remote ones are mounted.
enum Lower {
    Local(PathBuf),
    Remote(String),
}

/// What `stat` and `list` report.
pub struct SnapshotInfo {
    pub name: String,
    pub record: Record,
}

impl Snapshotter {
    /// Opens (or creates) the snapshotter at `config.root` and detaches mount points a previous
    /// process left behind; [`Snapshotter::recover`] then mounts again what active snapshots
    /// stand on.
    pub async fn open(config: SnapshotterConfig) -> Result<Snapshotter, SnapshotError> {
        let snapshots = config.root.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(io_error(snapshots.display()))?;
        let store = Store::open(&config.root).map_err(io_error("snapshot metadata"))?;
        let kept = if config.keep_connections {
            KeptConnections::open(&crate::mount::run_dir())
                .map_err(|e| {
                    tracing::warn!(
                        "cannot keep FUSE connections for a restarted snapshotter ({e}): a \
                         restart will break running containers"
                    )
                })
                .ok()
        } else {
            None
        };
        let taken_over = kept.as_ref().map(|k| k.kept_mounts()).unwrap_or_default();
        for (_, record) in store.iter().filter(|(_, r)| r.remote.is_some()) {
            let dir = snapshots.join(record.id.to_string()).join("fs");
            if taken_over.contains(&crate::mount::mount_id(&dir)) {
                continue;
            }
            // A killed daemon leaves its mounts behind, answering ENOTCONN.
            if crate::mount::check_not_mounted(&dir).is_err() {
                tracing::warn!(
                    "{}: the previous snapshotter's FUSE connection was not kept (its holder \
                     is gone, or it kept none): mounting it again; containers that were \
                     running on it must be restarted",
                    dir.display()
                );
                let _ = detach(&dir);
            }
        }
        Ok(Snapshotter {
            kept,
            config,
            store: std::sync::Mutex::new(store),
            mounts: tokio::sync::Mutex::new(HashMap::new()),
            images: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(REMEMBERED_IMAGES).expect("non-zero"),
            )),
        })
    }

    /// Mounts again the remote layers every active snapshot and view stands on. Runs while the
    /// service already answers (a registry that is slow or down must not keep containerd
    /// waiting for the socket); a request that needs a mount first makes it itself.
    pub async fn recover(&self) {
        let active: Vec<String> = self
            .store()
            .iter()
            .filter(|(_, r)| r.kind != Kind::Committed)
            .map(|(k, _)| k.clone())
            .collect();
        for key in active {
            match self.mounts(&key).await {
                Ok(_) => tracing::info!("recovered the mounts of snapshot {key}"),
                Err(e) => tracing::warn!("snapshot {key}: cannot mount its layers again: {e}"),
            }
        }
        // What the previous process kept and no active snapshot stands on: nobody needs it.
        let Some(kept) = &self.kept else { return };
        let mounted: Vec<String> = {
            let mounts = self.mounts.lock().await;
            mounts
                .values()
                .map(|m| crate::mount::mount_id(m.dir()))
                .collect()
        };
        let unclaimed: Vec<String> = kept
            .kept_mounts()
            .into_iter()
            .filter(|k| !mounted.contains(k))
            .collect();
        if unclaimed.is_empty() {
            return;
        }
        kept.forget_keys(&unclaimed);
        for (_, record) in self.store().iter().filter(|(_, r)| r.remote.is_some()) {
            let dir = self.dir(record.id).join("fs");
            if unclaimed.contains(&crate::mount::mount_id(&dir)) {
                tracing::debug!("{}: no snapshot uses it now: unmounted", dir.display());
                let _ = detach(&dir);
            }
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.config.root.join("snapshots").join(id.to_string())
    }

    /// Creates an active snapshot (`Prepare`), or records a remote layer and answers
    /// [`SnapshotError::AlreadyExists`] for its target (see the module documentation).
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let handed = handed_resolution(&mut labels);
        if let (Some(target), Some(remote)) =
            (labels.get(TARGET_LABEL).cloned(), remote_layer(&labels))
        {
            if self.store().get(&target).is_some() {
                return Err(SnapshotError::AlreadyExists(target));
            }
            if self.all_remote(parent) {
                match self.check_remote(&remote, handed).await {
                    Ok(()) => {
                        self.create(&target, parent, Kind::Committed, labels, Some(remote))?;
                        return Err(SnapshotError::AlreadyExists(target));
                    }
                    Err(e) => tracing::warn!("{e}; containerd will download and unpack it"),
                }
            }
        }
        self.create(key, parent, Kind::Active, labels, None)?;
        self.mounts(key).await
    }

    /// Creates a read-only view of `parent` (`View`).
    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(key, parent, Kind::View, labels, None)?;
        self.mounts(key).await
    }

    /// Whether `parent` and everything below it are remote layers (true for no parent).
    fn all_remote(&self, parent: &str) -> bool {
        parent.is_empty()
            || self
                .store()
                .chain(parent)
                .iter()
                .all(|(_, r)| r.remote.is_some())
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        remote: Option<RemoteLayer>,
    ) -> Result<(), SnapshotError> {
        let mut store = self.store();
        if store.get(key).is_some() {
            return Err(SnapshotError::AlreadyExists(key.to_string()));
        }
        let parent = (!parent.is_empty()).then(|| parent.to_string());
        if let Some(parent) = &parent {
            match store.get(parent) {
                None => return Err(SnapshotError::NotFound(parent.clone())),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "parent {parent} is not a committed snapshot"
                    )));
                }
                Some(_) => {}
            }
        }
        let id = store.next_id();
        let dir = self.dir(id);
        // containerd's overlayfs snapshotter's modes, whatever the process umask: `fs/` becomes
        // a container's root or upper directory, and 0777 there would let anyone write into it.
        let mut dirs = vec![(dir.clone(), 0o700), (dir.join("fs"), 0o755)];
        if kind == Kind::Active {
            dirs.push((dir.join("work"), 0o711));
        }
        for (path, mode) in dirs {
            make_dir(&path, mode).map_err(io_error(path.display()))?;
        }
        let now = store::now_nanos();
        let record = Record {
            id,
            kind,
            parent,
            labels,
            created: now,
            updated: now,
            remote,
        };
        store.put(key.to_string(), record).map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            io_error("snapshot metadata")(e)
        })
    }

    /// The mounts that make snapshot `key` (active or view) a root filesystem.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let (record, lowers) = {
            let store = self.store();
            let record = store
                .get(key)
                .cloned()
                .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
            let mut lowers = Vec::new();
            if let Some(parent) = &record.parent {
                for (name, r) in store.chain(parent) {
                    if r.remote.is_some() {
                        lowers.push(Lower::Remote(name.clone()));
                        break;
                    }
                    lowers.push(Lower::Local(self.dir(r.id).join("fs")));
                }
            }
            (record, lowers)
        };
        let mut dirs = Vec::with_capacity(lowers.len());
        for lower in lowers {
            dirs.push(match lower {
                Lower::Local(dir) => dir,
                Lower::Remote(name) => self.mount_remote(&name).await?,
            });
        }
        let dir = self.dir(record.id);
        let path = |p: &Path| p.display().to_string();
        let bind = |source: &Path, mode: &str| Mount {
            r#type: "bind".into(),
            source: path(source),
            target: String::new(),
            options: vec![mode.into(), "rbind".into()],
        };
        let lowerdir = || {
            format!(
                "lowerdir={}",
                dirs.iter().map(|d| path(d)).collect::<Vec<_>>().join(":")
            )
        };
        let overlay = |options: Vec<String>| Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        };
        Ok(vec![match (record.kind, dirs.len()) {
            (Kind::Active, 0) => bind(&dir.join("fs"), "rw"),
            (Kind::Active, _) => overlay(vec![
                "index=off".into(),
                format!("workdir={}", path(&dir.join("work"))),
                format!("upperdir={}", path(&dir.join("fs"))),
                lowerdir(),
            ]),
            (_, 0) => bind(&dir.join("fs"), "ro"),
            (_, 1) => bind(&dirs[0], "ro"),
            (_, _) => overlay(vec![lowerdir()]),
        }])
    }

    /// Turns active snapshot `key` into committed snapshot `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let mut store = self.store();
        let record = store
            .get(key)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        if record.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        if store.get(name).is_some() {
            return Err(SnapshotError::AlreadyExists(name.to_string()));
        }
        // As containerd's own snapshotters: a committed snapshot is new (created = updated =
        // now) and carries the Commit's labels, not the active snapshot's.
        let mut committed = record;
        committed.kind = Kind::Committed;
        committed.labels = labels;
        committed.created = store::now_nanos();
        committed.updated = committed.created;
        store
            .replace(key, Some((name.to_string(), committed)))
            .map_err(io_error("snapshot metadata"))?;
        Ok(())
    }

    /// Removes snapshot `key`, which must have no children; unmounts it if it is a live remote
    /// mount.
    pub async fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let record = {
            let mut store = self.store();
            if store.get(key).is_none() {
                return Err(SnapshotError::NotFound(key.to_string()));
            }
            if store.has_children(key) {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} has children; remove them first"
                )));
            }
            store
                .replace(key, None)
                .map_err(io_error("snapshot metadata"))?
        };
        if let Some(mounted) = self.mounts.lock().await.remove(key) {
            unmount(mounted, self.kept.as_ref()).await;
        }
        let dir = self.dir(record.id);
        std::fs::remove_dir_all(&dir).map_err(io_error(dir.display()))
    }

    pub fn stat(&self, key: &str) -> Result<SnapshotInfo, SnapshotError> {
        let store = self.store();
        let record = store
            .get(key)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        Ok(SnapshotInfo {
            name: key.to_string(),
            record,
        })
    }

    /// Replaces the labels of `key` (all of them when `fields` is empty, else those named
    /// `labels.NAME`, or all for `labels`), as containerd's `Update` does.
    pub fn update_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: &[String],
    ) -> Result<SnapshotInfo, SnapshotError> {
        let mut store = self.store();
        let mut record = store
            .get(key)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        if fields.is_empty() || fields.iter().any(|f| f == "labels") {
            record.labels = labels;
        } else {
            for field in fields {
                let Some(name) = field.strip_prefix("labels.") else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update {field} of snapshot {key}; only labels can change"
                    )));
                };
                match labels.get(name) {
                    Some(value) => record.labels.insert(name.to_string(), value.clone()),
                    None => record.labels.remove(name),
                };
            }
        }
        record.updated = store::now_nanos();
        store
            .put(key.to_string(), record.clone())
            .map_err(io_error("snapshot metadata"))?;
        Ok(SnapshotInfo {
            name: key.to_string(),
            record,
        })
    }

    pub fn list(&self) -> Vec<SnapshotInfo> {
        self.store()
            .iter()
            .map(|(name, record)| SnapshotInfo {
                name: name.clone(),
                record: record.clone(),
            })
            .collect()
    }

    /// Disk space and inodes a snapshot's own directory uses (an active snapshot's writes, a
    /// local layer's files). Remote layers use none: their chunks live in the shared cache.
    pub fn usage(&self, key: &str) -> Result<(u64, u64), SnapshotError> {
        let record = self.stat(key)?.record;
        if record.remote.is_some() {
            return Ok((0, 0));
        }
        let dir = self.dir(record.id).join("fs");
        disk_usage(&dir).map_err(io_error(dir.display()))
    }

    /// Deletes snapshot directories no snapshot refers to (left by a crash mid-operation).
    pub fn cleanup(&self) -> Result<(), SnapshotError> {
        let known: std::collections::HashSet<u64> = self.store().ids().collect();
        let snapshots = self.config.root.join("snapshots");
        let entries = std::fs::read_dir(&snapshots).map_err(io_error(snapshots.display()))?;
        for entry in entries.flatten() {
            let orphan = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| !known.contains(&id));
            if orphan {
                let _ = detach(&entry.path().join("fs"));
                std::fs::remove_dir_all(entry.path()).map_err(io_error(entry.path().display()))?;
            }
        }
        Ok(())
    }

    /// Whether mounts' connections are kept for the next snapshotter.
    pub fn keeps_connections(&self) -> bool {
        self.kept.is_some()
    }

    /// On shutdown: unmounts every lazy mount, or, when their connections are kept, leaves them
    /// to the next snapshotter (running containers wait for it instead of failing).
    pub async fn close(&self) {
        for (_, mounted) in self.mounts.lock().await.drain() {
            match &self.kept {
                Some(_) => mounted.leave(),
                None => unmount(mounted, None).await,
            }
        }
    }
}

/// Bytes (allocated) and inodes under `dir`, hard links counted once, not crossing mounts.
fn disk_usage(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let root_dev = std::fs::symlink_metadata(dir)?.dev();
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0, 0);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.dev() != root_dev || !seen.insert(meta.ino()) {
            continue;
        }
        bytes += meta.blocks() * 512;
        inodes += 1;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    async fn open(root: &Path) -> Snapshotter {
        Snapshotter::open(SnapshotterConfig {
            root: root.to_path_buf(),
            registry: FetchConfig::default(),
            cri_proxy: None,
            platform: Platform::host(),
            image_fs: ImageFsOptions::default(),
            keep_connections: false,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn local_snapshots_follow_containerds_overlay_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).await;
        let m = s.prepare("a", "", BTreeMap::new()).await.unwrap();
        assert_eq!(m[0].r#type, "bind");
        assert!(m[0].options.contains(&"rw".to_string()));
        assert!(matches!(
            s.prepare("a", "", BTreeMap::new()).await,
            Err(SnapshotError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.prepare("b", "a", BTreeMap::new()).await,
            Err(SnapshotError::InvalidArgument(_))
        ));
        s.commit("base", "a", labels(&[("x", "1")])).unwrap();
        assert!(matches!(s.stat("a"), Err(SnapshotError::NotFound(_))));
        assert_eq!(s.stat("base").unwrap().record.labels["x"], "1");
        let m = s.prepare("c", "base", BTreeMap::new()).await.unwrap();
        assert_eq!(m[0].r#type, "overlay");
        let lower = format!("lowerdir={}", s.dir(1).join("fs").display());
        assert!(m[0].options.contains(&lower), "{:?}", m[0].options);
        let v = s.view("v", "base", BTreeMap::new()).await.unwrap();
        assert_eq!(v[0].r#type, "bind");
        assert!(v[0].options.contains(&"ro".to_string()));
        assert!(matches!(
            s.remove("base").await,
            Err(SnapshotError::FailedPrecondition(_))
        ));
        s.remove("c").await.unwrap();
        s.remove("v").await.unwrap();
        s.remove("base").await.unwrap();
        assert!(s.list().is_empty());
        assert!(!s.dir(1).exists());
    }

    #[tokio::test]
    async fn snapshot_directories_have_containerds_modes_and_commit_starts_anew() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).await;
        // SAFETY: umask only changes the mode of files created afterwards; restored below.
        let old = unsafe { libc::umask(0) };
        let prepared = s.prepare("a", "", labels(&[("from", "prepare")])).await;
        unsafe { libc::umask(old) };
        prepared.unwrap();
        let mode = |p: &str| {
            let path = s.dir(1).join(p);
            std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
        };
        assert_eq!((mode(""), mode("fs"), mode("work")), (0o700, 0o755, 0o711));

        let prepared = s.stat("a").unwrap().record;
        std::thread::sleep(std::time::Duration::from_millis(5));
        s.commit("base", "a", labels(&[("from", "commit")]))
            .unwrap();
        let committed = s.stat("base").unwrap().record;
        assert_eq!(committed.labels, labels(&[("from", "commit")]));
        assert!(committed.created > prepared.created);
        assert_eq!(committed.created, committed.updated);
    }

    #[tokio::test]
    async fn labels_update_by_field_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path()).await;
            s.prepare("a", "", labels(&[("keep", "1"), ("drop", "2")]))
                .await
                .unwrap();
            let info = s
                .update_labels(
                    "a",
                    labels(&[("new", "3")]),
                    &["labels.drop".into(), "labels.new".into()],
                )
                .unwrap();
            assert_eq!(info.record.labels, labels(&[("keep", "1"), ("new", "3")]));
            assert!(matches!(
                s.update_labels("a", BTreeMap::new(), &["parent".into()]),
                Err(SnapshotError::InvalidArgument(_))
            ));
        }
        let s = open(dir.path()).await;
        assert_eq!(
            s.stat("a").unwrap().record.labels,
            labels(&[("keep", "1"), ("new", "3")])
        );
        std::fs::create_dir_all(dir.path().join("snapshots/99/fs")).unwrap();
        s.cleanup().unwrap();
        assert!(!dir.path().join("snapshots/99").exists());
        assert!(s.dir(1).exists());
    }
}

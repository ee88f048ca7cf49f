//! Learned start-up profiles: which files an image's start read, in order, to prefetch next time.
//!
//! For the first seconds after a mount (`window`), every file a reader touches for the first
//! time is recorded. The list is stored in the disk cache's directory, keyed by the image's
//! repository (not its digest), so a newer tag of the same image, which usually shares most
//! files, benefits too. When an image is mounted and a profile exists, those files are fetched
//! in that order at prefetch priority, ahead of the readers that will ask for them: a second
//! machine with an empty cache but the profile starts with few round trips on its critical path.
//!
//! Each file also keeps the byte ranges that were read, when that was not the whole file: a
//! start reads a few pages of many large shared libraries (python-app's start reads 11.6 MB of
//! compressed chunks, its files whole are 16-18 MB), and the bytes a prefetch fetches beyond what
//! the start reads take the link the start needs. Ranges are in file offsets, not chunk numbers,
//! so that they still mean the same bytes in a newer image whose chunks are cut elsewhere; they
//! are widened to whole chunks when the profile is used.
//!
//! Paths that no longer exist in the new image are skipped; the profile is rewritten by the next
//! mount that records one.
//!
//! A profile can also be published next to the image (`lazylayer profile push`): an OCI artifact
//! whose `subject` is the image manifest, found through the referrers lookup the image's
//! resolution makes anyway ([`crate::source::image`]). A mount with no learned profile of its own
//! reads the published one ([`fetch_published`]), so the first start on a new machine is
//! prefetched too. The learned profile wins when both exist: it is what this machine's own
//! starts of the image read (its command, its configuration), and it costs no request. A
//! published profile is trusted as much as the repository that serves it: it can only name
//! files of the image, each prefetched once, so the worst it can do is fetch what was not needed,
//! never more than the image holds; and one larger than [`MAX_PROFILE_BYTES`] is refused. A
//! published profile may come with a pack of its files' bytes, fetched in one request instead
//! of the profile's ranges of the layers ([`crate::fs::profile_pack`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cache::disk::DiskCache;
use crate::fs::tree::{Ino, MergedTree, NodeKind};
use crate::layer::ChunkRef;
use crate::model::digest::Digest;
use crate::model::oci::{
    Descriptor, MEDIA_PROFILE_BLOB, MEDIA_PROFILE_PACK, Manifest, PROFILE_ARTIFACT_TYPE,
};
use crate::model::reference::ManifestSelector;
use crate::source::{ImageSource, SourceError};

/// How long after mounting reads are recorded: long enough for an application to start, short
/// enough that later, request-driven reads do not crowd the list.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// The largest profile accepted, as JSON: 8 MiB holds over 100,000 paths with their ranges
/// (python-app's start reads 1,300 files: a 120 KB profile).
pub const MAX_PROFILE_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile artifact {artifact}: {source}")]
    Source {
        artifact: Digest,
        source: SourceError,
    },
    #[error(
        "profile artifact {artifact} is not a lazylayer profile of manifest {subject}: {reason}"
    )]
    NotOurs {
        artifact: Digest,
        subject: Digest,
        reason: String,
    },
    #[error(
        "profile artifact {artifact}: its profile is {size} bytes, more than the {MAX_PROFILE_BYTES}-byte limit"
    )]
    TooLarge { artifact: Digest, size: u64 },
    #[error("profile {digest} does not parse: {reason}")]
    Malformed { digest: Digest, reason: String },
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    /// The image (repository) the profile was recorded for.
    pub image: String,
    /// Paths in the order they were first read.
    pub files: Vec<String>,
    /// For files not read whole: the `[start, end)` byte ranges that were, sorted and disjoint.
    /// A file of `files` without an entry here is fetched whole.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ranges: BTreeMap<String, Vec<[u64; 2]>>,
}

impl Profile {
    /// Reads a profile's JSON (as stored, or as published: see [`fetch_published`]).
    pub fn parse(bytes: &[u8], digest: &Digest) -> Result<Profile, ProfileError> {
        if bytes.len() as u64 > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge {
                artifact: digest.clone(),
                size: bytes.len() as u64,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| ProfileError::Malformed {
            digest: digest.clone(),
            reason: e.to_string(),
        })
    }

    /// What to prefetch in `tree`, in the profile's order, per file: the chunks that hold the
    /// ranges the recorded start read (all of them for a file read whole). Paths that are not
    /// regular files of `tree` are skipped, and a path listed twice counts once.
    pub fn work(&self, tree: &MergedTree) -> Vec<(usize, Vec<ChunkRef>)> {
        self.work_by_path(tree)
            .into_iter()
            .map(|(_, layer, chunks)| (layer, chunks))
            .collect()
    }

    /// [`Profile::work`] with each file's path.
    pub fn work_by_path(&self, tree: &MergedTree) -> PathWork {
        let mut seen = std::collections::HashSet::new();
        self.files
            .iter()
            .filter(|path| seen.insert(path.as_str()))
            .filter_map(|path| {
                let ino = tree.lookup_path(path.as_bytes())?;
                let NodeKind::File { layer, chunks, .. } = &tree.node(ino)?.kind else {
                    return None;
                };
                let chunks: Vec<ChunkRef> = match self.ranges.get(path) {
                    None => chunks.to_vec(),
                    Some(ranges) => chunks
                        .iter()
                        .filter(|c| {
                            let end = c.file_offset + c.size;
                            ranges.iter().any(|r| r[0] < end && c.file_offset < r[1])
                        })
                        .cloned()
                        .collect(),
                };
                (!chunks.is_empty()).then(|| (path.clone(), *layer, chunks))
            })
            .collect()
    }
}

/// A profile's work with the path of each file: `(path, layer, chunks)` in the profile's order
/// ([`Profile::work_by_path`]).
pub type PathWork = Vec<(String, usize, Vec<ChunkRef>)>;

/// A published profile: the list, and the pack of its chunks' bytes when one was published
/// with it ([`crate::fs::profile_pack`]).
pub struct Published {
    pub profile: Profile,
    pub pack: Option<Descriptor>,
}

/// The name of an image's profile in the cache's `meta/` directory.
pub fn file_name(image: &str) -> String {
    format!("profile-{}.json", &Digest::of(image.as_bytes()).hex()[..16])
}

pub fn load(disk: &DiskCache, image: &str) -> Option<Profile> {
    let bytes = disk.get_meta(&file_name(image))?;
    serde_json::from_slice::<Profile>(&bytes)
        .ok()
        .filter(|p| p.image == image)
}

/// Keeps `profile` as the learned profile of its image.
pub fn store(disk: &DiskCache, profile: &Profile) {
    let json = serde_json::to_vec_pretty(profile).expect("profile serialises");
    disk.put_meta(&file_name(&profile.image), &json);
}

/// Reads the profile published as `artifact`, a referrer of manifest `subject`: the artifact's
/// manifest, then its profile blob, each verified against its digest, and where its pack is.
pub async fn fetch_published(
    source: &dyn ImageSource,
    subject: &Digest,
    artifact: &Descriptor,
) -> Result<Published, ProfileError> {
    let from_source = |source| ProfileError::Source {
        artifact: artifact.digest.clone(),
        source,
    };
    let not_ours = |reason: &str| ProfileError::NotOurs {
        artifact: artifact.digest.clone(),
        subject: subject.clone(),
        reason: reason.to_string(),
    };
    let fetched = source
        .manifest(&ManifestSelector::Digest(artifact.digest.clone()))
        .await
        .map_err(from_source)?;
    let Ok(Manifest::Image(manifest)) =
        Manifest::parse(&fetched.bytes, fetched.media_type.as_deref())
    else {
        return Err(not_ours("not an image manifest"));
    };
    if manifest.artifact_type.as_deref() != Some(PROFILE_ARTIFACT_TYPE) {
        return Err(not_ours("another artifactType"));
    }
    if manifest.subject.as_ref().map(|s| &s.digest) != Some(subject) {
        return Err(not_ours("another subject"));
    }
    let (blob, pack) = match manifest.layers.as_slice() {
        [blob] => (blob, None),
        [blob, pack] if pack.media_type == MEDIA_PROFILE_PACK => (blob, Some(pack.clone())),
        _ => {
            return Err(not_ours(
                "not one profile blob, optionally followed by a pack",
            ));
        }
    };
    if blob.media_type != MEDIA_PROFILE_BLOB {
        return Err(not_ours("its blob is not a profile"));
    }
    if blob.size > MAX_PROFILE_BYTES {
        return Err(ProfileError::TooLarge {
            artifact: artifact.digest.clone(),
            size: blob.size,
        });
    }
    let bytes = source
        .blob(blob, MAX_PROFILE_BYTES)
        .await
        .map_err(from_source)?;
    Ok(Published {
        profile: Profile::parse(&bytes, &blob.digest)?,
        pack,
    })
}

/// What was read during the window: files in the order of their first read, and per file the
/// byte ranges read, sorted and merged.
#[derive(Default)]
struct Reads {
    order: Vec<Ino>,
    ranges: HashMap<Ino, Vec<[u64; 2]>>,
}

impl Reads {
    fn add(&mut self, ino: Ino, start: u64, end: u64) {
        let ranges = self.ranges.entry(ino).or_insert_with(|| {
            self.order.push(ino);
            Vec::new()
        });
        if start < end {
            merge_range(ranges, start, end);
        }
    }
}

/// Adds `[start, end)` to sorted, disjoint `ranges`, joining the ranges it overlaps or touches.
fn merge_range(ranges: &mut Vec<[u64; 2]>, start: u64, end: u64) {
    let first = ranges.partition_point(|r| r[1] < start);
    let last = ranges.partition_point(|r| r[0] <= end);
    if first == last {
        ranges.insert(first, [start, end]);
        return;
    }
    let merged = [start.min(ranges[first][0]), end.max(ranges[last - 1][1])];
    ranges.splice(first..last, [merged]);
}

/// Records first reads during the window.
pub struct Recorder {
    started: Mutex<Instant>,
    window: Duration,
    order: Mutex<Reads>,
    saved: AtomicBool,
}

impl Recorder {
    pub fn new(window: Duration) -> Recorder {
        Recorder {
            started: Mutex::new(Instant::now()),
            window,
            order: Mutex::new(Reads::default()),
            saved: AtomicBool::new(false),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Starts the window again now, forgetting what was recorded: for an image opened ahead of
    /// its mount (the snapshotter opens it at pull time), the window starts with the mount.
    pub fn restart(&self) {
        *self.started.lock().unwrap() = Instant::now();
        *self.order.lock().unwrap() = Default::default();
    }

    /// Records nothing more and saves nothing: for a mount taken over from an earlier daemon,
    /// whose reads are not a start.
    pub fn stop(&self) {
        self.saved.store(true, Ordering::Relaxed);
        *self.order.lock().unwrap() = Default::default();
    }

    /// Notes a read of `len` bytes at `offset` of `ino` (within the window only; the file's
    /// place in the order is that of its first read).
    pub fn record(&self, ino: Ino, offset: u64, len: u64) {
        if self.saved.load(Ordering::Relaxed)
            || self.started.lock().unwrap().elapsed() > self.window
        {
            return;
        }
        self.order
            .lock()
            .unwrap()
            .add(ino, offset, offset.saturating_add(len));
    }

    /// Stores what was recorded (once; later calls do nothing). Nothing is stored when nothing
    /// was read, so that an idle mount does not erase a useful profile.
    pub fn save(&self, disk: &DiskCache, image: &str, tree: &MergedTree) {
        if self.saved.swap(true, Ordering::Relaxed) {
            return;
        }
        let reads = std::mem::take(&mut *self.order.lock().unwrap());
        if reads.order.is_empty() {
            return;
        }
        let mut paths = HashMap::new();
        tree.walk(crate::fs::tree::ROOT, |path, ino| {
            paths
                .entry(ino)
                .or_insert_with(|| String::from_utf8_lossy(path).into_owned());
        });
        let mut profile = Profile {
            image: image.to_string(),
            files: Vec::new(),
            ranges: BTreeMap::new(),
        };
        for ino in &reads.order {
            let Some(path) = paths.get(ino) else { continue };
            profile.files.push(path.clone());
            let size = match tree.node(*ino).map(|n| &n.kind) {
                Some(NodeKind::File { size, .. }) => *size,
                _ => 0,
            };
            let read = &reads.ranges[ino];
            let whole = read.first().is_some_and(|r| r[0] == 0 && r[1] >= size);
            if !whole && !read.is_empty() {
                profile.ranges.insert(path.clone(), read.clone());
            }
        }
        store(disk, &profile);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_reads_in_order_within_the_window() {
        let recorder = Recorder::new(Duration::from_secs(60));
        for ino in [5, 3, 5, 9, 3] {
            recorder.record(ino, 0, 10);
        }
        assert_eq!(recorder.order.lock().unwrap().order, vec![5, 3, 9]);
        let closed = Recorder::new(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        closed.record(1, 0, 10);
        assert!(closed.order.lock().unwrap().order.is_empty());
        // A mount taken over from another daemon records nothing, and forgets what it had.
        recorder.stop();
        recorder.record(7, 0, 10);
        assert!(recorder.order.lock().unwrap().order.is_empty());
    }

    /// One layer: `big` of four 100-byte chunks, `small` of one.
    fn tree() -> MergedTree {
        use crate::layer::{ChunkSource, Codec, EntryKind, LayerEntry};
        let file = |path: &str, chunks: u64, at: u64| LayerEntry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File {
                size: chunks * 100,
                chunks: (0..chunks)
                    .map(|i| ChunkRef {
                        file_offset: i * 100,
                        size: 100,
                        source: ChunkSource::Compressed {
                            start: at + i * 10,
                            end: at + i * 10 + 10,
                            inner_offset: 0,
                            codec: Codec::Gzip,
                        },
                        digest: None,
                    })
                    .collect::<Vec<_>>()
                    .into(),
            },
            meta: Default::default(),
        };
        let entries = vec![file("lib/big.so", 4, 0), file("lib/small.py", 1, 40)];
        MergedTree::build([(Digest::of(b"layer"), entries)]).unwrap()
    }

    #[test]
    fn a_saved_profile_prefetches_the_chunks_that_were_read_in_order() {
        let tree = tree();
        let (big, small) = (
            tree.lookup_path(b"lib/big.so").unwrap(),
            tree.lookup_path(b"lib/small.py").unwrap(),
        );
        let recorder = Recorder::new(Duration::from_secs(60));
        recorder.record(small, 0, 4096); // the kernel asks past the end
        recorder.record(big, 250, 10); // the third chunk
        recorder.record(big, 0, 50); // the first
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 1 << 20).unwrap();
        recorder.save(&disk, "registry/app", &tree);
        let profile = load(&disk, "registry/app").unwrap();
        assert_eq!(profile.files, ["lib/small.py", "lib/big.so"]);
        // Read whole: no ranges kept.
        assert!(!profile.ranges.contains_key("lib/small.py"));
        assert_eq!(profile.ranges["lib/big.so"], vec![[0, 50], [250, 260]]);
        let work = profile.work(&tree);
        let offsets: Vec<Vec<u64>> = work
            .iter()
            .map(|(_, chunks)| chunks.iter().map(|c| c.file_offset).collect())
            .collect();
        assert_eq!(offsets, vec![vec![0], vec![0, 200]]);
        // A profile of another image is not loaded.
        assert!(load(&disk, "registry/other").is_none());
    }

    #[test]
    fn a_hostile_profile_fetches_no_more_than_the_image_holds() {
        let tree = tree();
        let json = serde_json::json!({
            "image": "elsewhere/app",
            "files": ["lib/small.py", "lib/small.py", "../../etc/shadow", "lib", "lib/big.so",
                      "lib/big.so", "no/such/file"],
            "ranges": {"lib/big.so": [[350, 10_000_000_000u64]]}
        });
        let bytes = serde_json::to_vec(&json).unwrap();
        let profile = Profile::parse(&bytes, &Digest::of(&bytes)).unwrap();
        let work = profile.work(&tree);
        // Each file once, in order; paths that are not files of the image skipped; ranges
        // beyond the file select only its chunks.
        let chunks: Vec<u64> = work
            .iter()
            .flat_map(|(_, c)| c.iter().map(|c| c.file_offset))
            .collect();
        assert_eq!(work.len(), 2);
        assert_eq!(chunks, vec![0, 300]);

        let huge = vec![b' '; MAX_PROFILE_BYTES as usize + 1];
        let refused = Profile::parse(&huge, &Digest::of(&huge)).unwrap_err();
        assert!(refused.to_string().contains("limit"), "{refused}");
        let refused = Profile::parse(b"{\"files\": 3}", &Digest::of(b"x")).unwrap_err();
        assert!(refused.to_string().contains("does not parse"), "{refused}");
    }

    #[test]
    fn ranges_read_are_kept_sorted_and_merged() {
        let recorder = Recorder::new(Duration::from_secs(60));
        for (offset, len) in [(100, 10), (0, 10), (50, 10), (10, 5), (55, 50), (200, 0)] {
            recorder.record(7, offset, len);
        }
        let reads = recorder.order.lock().unwrap();
        assert_eq!(reads.ranges[&7], vec![[0, 15], [50, 110]]);
        let mut ranges = vec![[0, 5], [10, 15], [20, 25]];
        merge_range(&mut ranges, 3, 22);
        assert_eq!(ranges, vec![[0, 25]]);
        merge_range(&mut ranges, 30, 40);
        merge_range(&mut ranges, 26, 28);
        assert_eq!(ranges, vec![[0, 25], [26, 28], [30, 40]]);
    }
}

//! Learned start-up profiles: which files an image's start read, in order, to prefetch next time.
//!
//! For the first seconds after a mount (`window`), every file a reader touches for the first
//! time is recorded. The list is stored in the disk cache's directory, keyed by the image's
//! repository (not its digest), so a newer tag of the same image, which usually shares most
//! files, benefits too. When an image is mounted and a profile exists, those files are fetched
//! in that order at prefetch priority, ahead of the readers that will ask for them: a second
//! machine with an empty cache but the profile starts with few round trips on its critical path.
//!
//! Paths that no longer exist in the new image are skipped; the profile is rewritten by the next
//! mount that records one.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cache::disk::DiskCache;
use crate::fs::tree::{Ino, MergedTree};
use crate::model::digest::Digest;

/// How long after mounting reads are recorded: long enough for an application to start, short
/// enough that later, request-driven reads do not crowd the list.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    /// The image (repository) the profile was recorded for.
    pub image: String,
    /// Paths in the order they were first read.
    pub files: Vec<String>,
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

/// Records first reads during the window.
pub struct Recorder {
    started: Mutex<Instant>,
    window: Duration,
    order: Mutex<(HashSet<Ino>, Vec<Ino>)>,
    saved: AtomicBool,
}

impl Recorder {
    pub fn new(window: Duration) -> Recorder {
        Recorder {
            started: Mutex::new(Instant::now()),
            window,
            order: Mutex::new((HashSet::new(), Vec::new())),
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

    /// Notes a read of `ino` (only the first one counts, and only within the window).
    pub fn record(&self, ino: Ino) {
        if self.started.lock().unwrap().elapsed() > self.window {
            return;
        }
        let mut order = self.order.lock().unwrap();
        if order.0.insert(ino) {
            order.1.push(ino);
        }
    }

    /// Stores what was recorded (once; later calls do nothing). Nothing is stored when nothing
    /// was read, so that an idle mount does not erase a useful profile.
    pub fn save(&self, disk: &DiskCache, image: &str, tree: &MergedTree) {
        if self.saved.swap(true, Ordering::Relaxed) {
            return;
        }
        let inodes = self.order.lock().unwrap().1.clone();
        if inodes.is_empty() {
            return;
        }
        let mut paths = std::collections::HashMap::new();
        tree.walk(crate::fs::tree::ROOT, |path, ino| {
            paths
                .entry(ino)
                .or_insert_with(|| String::from_utf8_lossy(path).into_owned());
        });
        let profile = Profile {
            image: image.to_string(),
            files: inodes
                .iter()
                .filter_map(|ino| paths.get(ino).cloned())
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&profile).expect("profile serialises");
        disk.put_meta(&file_name(image), &json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_reads_in_order_within_the_window() {
        let recorder = Recorder::new(Duration::from_secs(60));
        for ino in [5, 3, 5, 9, 3] {
            recorder.record(ino);
        }
        assert_eq!(recorder.order.lock().unwrap().1, vec![5, 3, 9]);
        let closed = Recorder::new(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        closed.record(1);
        assert!(closed.order.lock().unwrap().1.is_empty());
    }
}

//! Speculative prefetch of a file's siblings: the first read miss in a directory also fetches
//! the other small files of that directory.
//!
//! Only for images without hints: with a landmark or a profile, the prioritised prefetch knows
//! what the start reads, and guesses would take its link.
//!
//! Without hints (no landmark, no profile) a start is a chain of misses, each a round trip: a
//! Python start imports one module after another, each a `.pyc` in some `__pycache__`, and
//! python-app's start made ~72 mostly serial requests through a 20 ms link. The modules a
//! start imports crowd into a few directories (the standard library's `__pycache__`,
//! `encodings/`, `lib-dynload/`), and their files lie side by side in the layer (tar order is
//! directory order), so one request for a directory's small files turns many later misses into
//! hits at the cost of one transfer.
//!
//! Trade-offs: it fetches files nobody reads (a start imports a fraction of the standard
//! library), so it is bounded per directory by [`SiblingPrefetch::budget`] compressed bytes
//! and takes only small files (large ones are read sequentially and get read-ahead); it runs at
//! prefetch priority, behind any blocked reader; and it happens once per directory. Files are
//! taken in blob order from the one that missed, those after it first (a start tends to move
//! forward through a directory) and then those before it, so that what lies nearest goes in
//! the same request.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::fs::tree::{Ino, MergedTree, NodeKind, ROOT};
use crate::layer::{ChunkRef, ChunkSource};

/// Files larger than this (uncompressed) are not taken along: a large file is read
/// sequentially, and read-ahead follows it better than a guess.
pub const MAX_SIBLING_SIZE: u64 = 512 << 10;

/// Which directories were prefetched, and where each file lives.
pub struct SiblingPrefetch {
    /// Compressed bytes taken per directory (0: off).
    budget: u64,
    /// The directory each file was first found in, by inode (0 for none).
    parent_of: Vec<Ino>,
    done: Mutex<HashSet<Ino>>,
}

impl SiblingPrefetch {
    pub fn new(tree: &MergedTree, budget: u64) -> SiblingPrefetch {
        let mut parent_of = Vec::new();
        if budget > 0 {
            parent_of = vec![0; tree.inode_count() as usize + 1];
            let mut dirs = vec![ROOT];
            while let Some(dir) = dirs.pop() {
                for &child in tree.children(dir).into_iter().flat_map(|c| c.values()) {
                    match tree.node(child).map(|n| &n.kind) {
                        Some(NodeKind::Dir { .. }) => dirs.push(child),
                        Some(_) if parent_of[child as usize] == 0 => {
                            parent_of[child as usize] = dir
                        }
                        _ => {}
                    }
                }
            }
        }
        SiblingPrefetch {
            budget,
            parent_of,
            done: Mutex::new(HashSet::new()),
        }
    }

    /// Whether a miss of `ino` would prefetch its siblings (its directory's have not been yet):
    /// cheap, so that a read asks this before it checks the caches for a miss.
    pub fn pending(&self, ino: Ino) -> bool {
        self.dir_of(ino)
            .is_some_and(|dir| !self.done.lock().unwrap().contains(&dir))
    }

    /// The siblings to fetch because `ino` just missed, per layer in blob order, or nothing if
    /// its directory was prefetched before (or this is off).
    pub fn work(&self, tree: &MergedTree, ino: Ino) -> Vec<(usize, Vec<ChunkRef>)> {
        let Some(dir) = self.dir_of(ino) else {
            return Vec::new();
        };
        if !self.done.lock().unwrap().insert(dir) {
            return Vec::new();
        }
        siblings(tree, dir, ino, self.budget)
    }

    fn dir_of(&self, ino: Ino) -> Option<Ino> {
        self.parent_of
            .get(ino as usize)
            .copied()
            .filter(|&d| d != 0)
    }
}

/// The compressed chunks of `dir`'s small regular files in `file`'s layer, in blob order,
/// within `budget` compressed bytes: the files after `file` first, then those before it.
fn siblings(tree: &MergedTree, dir: Ino, file: Ino, budget: u64) -> Vec<(usize, Vec<ChunkRef>)> {
    let Some(NodeKind::File {
        layer: file_layer, ..
    }) = tree.node(file).map(|n| &n.kind)
    else {
        return Vec::new();
    };
    // (blob start, compressed bytes, chunks) of each candidate.
    let mut files: Vec<(u64, u64, &[ChunkRef])> = Vec::new();
    let mut file_start = None;
    for &child in tree.children(dir).into_iter().flat_map(|c| c.values()) {
        let Some(NodeKind::File {
            size,
            layer,
            chunks,
        }) = tree.node(child).map(|n| &n.kind)
        else {
            continue;
        };
        let spans: Vec<(u64, u64)> = chunks
            .iter()
            .filter_map(|c| match c.source {
                ChunkSource::Compressed { start, end, .. } => Some((start, end)),
                _ => None,
            })
            .collect();
        let Some(start) = spans.iter().map(|s| s.0).min() else {
            continue;
        };
        if child == file {
            file_start = Some(start);
            continue;
        }
        if layer != file_layer || *size > MAX_SIBLING_SIZE {
            continue;
        }
        let end = spans.iter().map(|s| s.1).max().unwrap_or(start);
        files.push((start, end - start, chunks));
    }
    let Some(from) = file_start else {
        return Vec::new();
    };
    files.sort_by_key(|f| f.0);
    let split = files.partition_point(|f| f.0 < from);
    let (before, after) = files.split_at(split);
    let mut taken: Vec<(u64, &[ChunkRef])> = Vec::new();
    let mut spent = 0;
    for (start, bytes, chunks) in after.iter().chain(before.iter().rev()) {
        if spent + bytes > budget {
            break;
        }
        spent += bytes;
        taken.push((*start, chunks));
    }
    taken.sort_by_key(|t| t.0);
    let chunks: Vec<ChunkRef> = taken
        .into_iter()
        .flat_map(|(_, chunks)| chunks.iter().cloned())
        .collect();
    if chunks.is_empty() {
        return Vec::new();
    }
    vec![(*file_layer, chunks)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Codec, EntryKind, LayerEntry};

    /// Each file is one chunk of 10 compressed bytes, in the order given.
    fn tree(files: &[(&str, u64)]) -> MergedTree {
        let mut offset = 0;
        let entries = files
            .iter()
            .map(|(path, size)| {
                let chunk = ChunkRef {
                    file_offset: 0,
                    size: *size,
                    source: ChunkSource::Compressed {
                        start: offset,
                        end: offset + 10,
                        inner_offset: 0,
                        codec: Codec::Gzip,
                    },
                    digest: None,
                };
                offset += 10;
                LayerEntry {
                    path: path.as_bytes().to_vec(),
                    kind: EntryKind::File {
                        size: *size,
                        chunks: vec![chunk].into(),
                    },
                    meta: Default::default(),
                }
            })
            .collect();
        MergedTree::build([(crate::model::digest::Digest::of(b"layer"), entries)]).unwrap()
    }

    fn starts(work: &[(usize, Vec<ChunkRef>)]) -> Vec<u64> {
        work.iter()
            .flat_map(|(_, c)| c.iter().map(crate::fetch::plan::compressed_start))
            .collect()
    }

    #[test]
    fn a_miss_takes_the_small_files_of_its_directory_once_within_the_budget() {
        let t = tree(&[
            ("lib/a.pyc", 100),
            ("lib/b.pyc", 100),
            ("lib/big.so", MAX_SIBLING_SIZE + 1),
            ("lib/c.pyc", 100),
            ("lib/d.pyc", 100),
            ("lib/sub/e.pyc", 100),
            ("other/f.pyc", 100),
        ]);
        let siblings = SiblingPrefetch::new(&t, 25);
        let b = t.lookup_path(b"lib/b.pyc").unwrap();
        // After b first (c, d: the large file is skipped), within 25 bytes: c and d, not a.
        assert_eq!(starts(&siblings.work(&t, b)), [30, 40]);
        // Once per directory.
        let a = t.lookup_path(b"lib/a.pyc").unwrap();
        assert!(siblings.work(&t, a).is_empty());
        // Files of subdirectories and other directories are not siblings.
        let f = t.lookup_path(b"other/f.pyc").unwrap();
        assert!(siblings.work(&t, f).is_empty());

        // A larger budget also takes those before the miss.
        let siblings = SiblingPrefetch::new(&t, 1000);
        assert_eq!(starts(&siblings.work(&t, b)), [0, 30, 40]);
        // Off.
        let off = SiblingPrefetch::new(&t, 0);
        assert!(off.work(&t, b).is_empty());
    }
}

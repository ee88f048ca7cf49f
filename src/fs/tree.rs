//! The merged tree: all layers of an image applied into one in-memory filesystem tree.
//!
//! Layers are applied bottom to top once, when the image is opened, following the OCI image
//! spec's changeset rules; afterwards a lookup is one map probe per path component whatever the
//! number of layers (the stacking cost is paid at build time, not per `stat`).
//!
//! Rules, per layer:
//! - Whiteouts are applied first, to what the lower layers built: `.wh.NAME` removes `NAME`,
//!   `.wh..wh..opq` empties its directory. Doing them before the layer's own entries makes the
//!   result independent of where in the tar the whiteouts appear, which is what the spec asks
//!   ("whiteouts apply only to lower layers"). Whiteout files never become nodes.
//! - A directory entry over an existing directory updates its metadata and keeps its children;
//!   any other entry replaces what was at its path (a file replacing a directory drops the whole
//!   subtree, a directory replacing a file starts empty).
//! - A hard link adds a name for the target's node: one inode, `nlink` counted.
//! - Missing parent directories are created (mode 0755, root-owned), as tar extraction does.
//! - A symlink in an entry's parent path (or a whiteout's) is followed inside the image, as
//!   containerd's applier resolves parents against the root: `bin -> usr/bin` then `bin/ls` adds
//!   `usr/bin/ls` and keeps the link; `..` stops at the root; a loop refuses the layer.
//! - Symlinks read mode 0777, as every symlink does on Linux, whatever their header says.
//!
//! Memory: a node keeps its name in its parent's map, never its whole path, and the layers' entry
//! paths it is built from are at most [`crate::layer::MAX_PATH_BYTES`] (Linux's `PATH_MAX`; longer
//! ones refuse the layer, as containerd cannot unpack them either). So an entry costs at most
//! about 4 KiB of path while the tree is built and its name's length after, however deep it lies.
//!
//! Inode numbers are indexes into one vector (`ino - 1`), so they are stable for the life of the
//! tree and cost nothing to look up. Nodes dropped by later layers stay allocated but unreachable;
//! images rarely replace much, and compacting would renumber inodes.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::layer::{ChunkRef, EntryKind, LayerEntry, LayerError, Meta};
use crate::model::digest::Digest;

pub type Ino = u64;
pub const ROOT: Ino = 1;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Symlinks followed while resolving one path before giving up (Linux's limit).
const MAX_SYMLINKS: usize = 40;

#[derive(Clone, Debug)]
pub enum NodeKind {
    Dir {
        children: BTreeMap<Box<[u8]>, Ino>,
        parent: Ino,
    },
    File {
        size: u64,
        /// Index of the layer (bottom = 0) whose blob holds the content.
        layer: usize,
        chunks: Arc<[ChunkRef]>,
    },
    Symlink {
        target: Box<[u8]>,
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub kind: NodeKind,
    pub meta: Meta,
    /// Hard links to a non-directory; for a directory, 2 plus its subdirectories.
    pub nlink: u32,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }

    /// Size as `stat` reports it: content length, link target length, 0 for devices.
    pub fn size(&self) -> u64 {
        match &self.kind {
            NodeKind::File { size, .. } => *size,
            NodeKind::Symlink { target } => target.len() as u64,
            NodeKind::Dir { .. } => 4096,
            _ => 0,
        }
    }

    /// The type letter `ls -l` shows (`d`, `-`, `l`, `c`, `b`, `p`).
    pub fn type_char(&self) -> char {
        match self.kind {
            NodeKind::Dir { .. } => 'd',
            NodeKind::File { .. } => '-',
            NodeKind::Symlink { .. } => 'l',
            NodeKind::Char { .. } => 'c',
            NodeKind::Block { .. } => 'b',
            NodeKind::Fifo => 'p',
        }
    }

    /// The `S_IF*` type bits.
    pub fn file_type_bits(&self) -> u32 {
        match self.kind {
            NodeKind::Dir { .. } => 0o040000,
            NodeKind::File { .. } => 0o100000,
            NodeKind::Symlink { .. } => 0o120000,
            NodeKind::Char { .. } => 0o020000,
            NodeKind::Block { .. } => 0o060000,
            NodeKind::Fifo => 0o010000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("too many levels of symbolic links")]
    SymlinkLoop,
    #[error("is a directory")]
    IsADirectory,
}

#[derive(Debug)]
pub struct MergedTree {
    nodes: Vec<Node>,
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

fn implicit_dir_meta() -> Meta {
    Meta {
        mode: 0o755,
        ..Meta::default()
    }
}

impl MergedTree {
    /// Applies `layers` (bottom first) into one tree. Each item is the layer's blob digest (for
    /// error messages) and its entries in tar order.
    pub fn build(
        layers: impl IntoIterator<Item = (Digest, Vec<LayerEntry>)>,
    ) -> Result<MergedTree, LayerError> {
        let mut tree = MergedTree::empty();
        for (index, (digest, entries)) in layers.into_iter().enumerate() {
            tree.apply(index, &digest, entries)?;
        }
        tree.count_dir_links();
        Ok(tree)
    }

    /// A tree with only its root, to which layers are added one by one with
    /// [`MergedTree::add_layer`]: `convert` checks each layer it writes this way, so that it
    /// refuses what a mount of its output would refuse. Directory link counts are only right
    /// after [`MergedTree::build`].
    pub fn empty() -> MergedTree {
        MergedTree {
            nodes: vec![Node {
                kind: NodeKind::Dir {
                    children: BTreeMap::new(),
                    parent: ROOT,
                },
                meta: implicit_dir_meta(),
                nlink: 2,
            }],
        }
    }

    /// Applies the next layer up (`index` counts from the bottom) as [`MergedTree::build`] does.
    pub fn add_layer(
        &mut self,
        index: usize,
        digest: &Digest,
        entries: Vec<LayerEntry>,
    ) -> Result<(), LayerError> {
        self.apply(index, digest, entries)
    }

    pub fn node(&self, ino: Ino) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    fn node_mut(&mut self, ino: Ino) -> &mut Node {
        &mut self.nodes[(ino - 1) as usize]
    }

    /// Number of inodes allocated (an upper bound of the reachable ones).
    pub fn inode_count(&self) -> u64 {
        self.nodes.len() as u64
    }

    fn add(&mut self, kind: NodeKind, meta: Meta) -> Ino {
        self.nodes.push(Node {
            kind,
            meta,
            nlink: 1,
        });
        self.nodes.len() as Ino
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        match &self.node(parent)?.kind {
            NodeKind::Dir { children, .. } => children.get(name).copied(),
            _ => None,
        }
    }

    /// A directory's entries, sorted by name.
    pub fn children(&self, dir: Ino) -> Option<&BTreeMap<Box<[u8]>, Ino>> {
        match &self.node(dir)?.kind {
            NodeKind::Dir { children, .. } => Some(children),
            _ => None,
        }
    }

    pub fn parent(&self, dir: Ino) -> Option<Ino> {
        match &self.node(dir)?.kind {
            NodeKind::Dir { parent, .. } => Some(*parent),
            _ => None,
        }
    }

    /// Walks `path` from the root without following symlinks.
    pub fn lookup_path(&self, path: &[u8]) -> Option<Ino> {
        components(path).try_fold(ROOT, |dir, name| self.lookup(dir, name))
    }

    /// Resolves an absolute or root-relative path as the kernel would inside the image: symlinks
    /// in the middle are followed, the last one only when `follow_last`; `..` stops at the root.
    pub fn resolve(&self, path: &[u8], follow_last: bool) -> Result<Ino, ResolveError> {
        let mut budget = MAX_SYMLINKS;
        self.resolve_from(ROOT, path, follow_last, &mut budget)
    }

    fn resolve_from(
        &self,
        start: Ino,
        path: &[u8],
        follow_last: bool,
        budget: &mut usize,
    ) -> Result<Ino, ResolveError> {
        let mut dir = if path.starts_with(b"/") { ROOT } else { start };
        let parts: Vec<&[u8]> = components(path).collect();
        for (i, name) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            if !self.node(dir).is_some_and(Node::is_dir) {
                return Err(ResolveError::NotADirectory);
            }
            let next = match *name {
                b"." => dir,
                b".." => self.parent(dir).unwrap_or(ROOT),
                name => self.lookup(dir, name).ok_or(ResolveError::NotFound)?,
            };
            match &self.node(next).expect("child inode exists").kind {
                NodeKind::Symlink { target } if !last || follow_last => {
                    if *budget == 0 {
                        return Err(ResolveError::SymlinkLoop);
                    }
                    *budget -= 1;
                    dir = self.resolve_from(dir, target, true, budget)?;
                }
                _ => dir = next,
            }
        }
        Ok(dir)
    }

    /// Removes a name; the node loses a link (a directory's whole subtree does).
    fn unlink(&mut self, parent: Ino, name: &[u8]) {
        let removed = match &mut self.node_mut(parent).kind {
            NodeKind::Dir { children, .. } => children.remove(name),
            _ => None,
        };
        if let Some(ino) = removed {
            self.release(ino);
        }
    }

    fn release(&mut self, ino: Ino) {
        let node = self.node_mut(ino);
        if let NodeKind::Dir { children, .. } = &mut node.kind {
            let children: Vec<Ino> = std::mem::take(children).into_values().collect();
            for child in children {
                self.release(child);
            }
        } else {
            node.nlink = node.nlink.saturating_sub(1);
        }
    }

    /// The directory at `path`, creating missing ones and replacing other non-directories in
    /// the way. A symlink on the way is followed (inside the image), as containerd's applier
    /// resolves a parent path: `bin -> usr/bin` then `bin/ls` puts `ls` in `usr/bin`, and a
    /// dangling link gets its target created. `None` for a symlink loop.
    fn ensure_dir(&mut self, path: &[u8]) -> Option<Ino> {
        let mut budget = MAX_SYMLINKS;
        self.ensure_dir_from(ROOT, path, &mut budget)
    }

    fn ensure_dir_from(&mut self, start: Ino, path: &[u8], budget: &mut usize) -> Option<Ino> {
        let mut dir = if path.starts_with(b"/") { ROOT } else { start };
        for name in components(path) {
            dir = match name {
                b"." => dir,
                b".." => self.parent(dir).unwrap_or(ROOT),
                name => {
                    let existing = self.lookup(dir, name);
                    let node = existing.and_then(|c| self.node(c));
                    let link = node.and_then(|n| match &n.kind {
                        NodeKind::Symlink { target } => Some(target.to_vec()),
                        _ => None,
                    });
                    match (existing, link) {
                        (Some(child), _) if node.is_some_and(Node::is_dir) => child,
                        (_, Some(target)) => {
                            *budget = budget.checked_sub(1)?;
                            self.ensure_dir_from(dir, &target, budget)?
                        }
                        (existing, None) => {
                            if existing.is_some() {
                                self.unlink(dir, name);
                            }
                            let child = self.add(
                                NodeKind::Dir {
                                    children: BTreeMap::new(),
                                    parent: dir,
                                },
                                implicit_dir_meta(),
                            );
                            self.insert(dir, name, child);
                            child
                        }
                    }
                }
            };
        }
        Some(dir)
    }

    fn insert(&mut self, dir: Ino, name: &[u8], child: Ino) {
        if let NodeKind::Dir { children, .. } = &mut self.node_mut(dir).kind {
            children.insert(name.into(), child);
        }
    }

    fn apply(
        &mut self,
        layer: usize,
        digest: &Digest,
        entries: Vec<LayerEntry>,
    ) -> Result<(), LayerError> {
        let bad = |path: &[u8], reason: &str| LayerError::BadEntry {
            layer: digest.clone(),
            path: String::from_utf8_lossy(path).into_owned(),
            reason: reason.into(),
        };
        // Whiteouts first: they delete from the lower layers only.
        for entry in &entries {
            let (parent, name) = split_parent(&entry.path);
            let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) else {
                continue;
            };
            let Some(dir) = self
                .resolve(parent, true)
                .ok()
                .filter(|&d| self.node(d).is_some_and(Node::is_dir))
            else {
                continue; // whiting out inside something that does not exist: nothing to do
            };
            if name == OPAQUE_MARKER {
                let names: Vec<Box<[u8]>> = self
                    .children(dir)
                    .map(|c| c.keys().cloned().collect())
                    .unwrap_or_default();
                for child in names {
                    self.unlink(dir, &child);
                }
            } else if !target.is_empty() {
                self.unlink(dir, target);
            }
        }
        for entry in entries {
            let (parent_path, name) = split_parent(&entry.path);
            if name.starts_with(WHITEOUT_PREFIX) {
                continue;
            }
            if entry.path.is_empty() {
                match entry.kind {
                    EntryKind::Dir => self.node_mut(ROOT).meta = entry.meta,
                    _ => return Err(bad(b"/", "the root must be a directory")),
                }
                continue;
            }
            let parent = self
                .ensure_dir(parent_path)
                .ok_or_else(|| bad(&entry.path, "its parent path is a symlink loop"))?;
            let existing = self.lookup(parent, name);
            let kind = match entry.kind {
                EntryKind::Dir => {
                    if let Some(ino) = existing.filter(|&i| self.node(i).is_some_and(Node::is_dir))
                    {
                        self.node_mut(ino).meta = entry.meta;
                        continue;
                    }
                    NodeKind::Dir {
                        children: BTreeMap::new(),
                        parent,
                    }
                }
                EntryKind::Hardlink { target } => {
                    // The link's parents resolve as the entry's do; the link itself is linked.
                    let target_ino = self.resolve(&target, false).ok().ok_or_else(|| {
                        bad(&entry.path, "hard link to a path that does not exist")
                    })?;
                    if self.node(target_ino).is_some_and(Node::is_dir) {
                        return Err(bad(&entry.path, "hard link to a directory"));
                    }
                    if existing == Some(target_ino) {
                        continue;
                    }
                    if existing.is_some() {
                        self.unlink(parent, name);
                    }
                    self.node_mut(target_ino).nlink += 1;
                    self.insert(parent, name, target_ino);
                    continue;
                }
                EntryKind::File { size, chunks } => NodeKind::File {
                    size,
                    layer,
                    chunks,
                },
                EntryKind::Symlink { target } => NodeKind::Symlink {
                    target: target.into(),
                },
                EntryKind::Char { major, minor } => NodeKind::Char { major, minor },
                EntryKind::Block { major, minor } => NodeKind::Block { major, minor },
                EntryKind::Fifo => NodeKind::Fifo,
            };
            if existing.is_some() {
                self.unlink(parent, name);
            }
            let mut meta = entry.meta;
            if matches!(kind, NodeKind::Symlink { .. }) {
                // Linux has no symlink permissions (they read 0777), so an unpacked image's
                // symlinks show 0777 whatever their tar header says.
                meta.mode = 0o777;
            }
            let ino = self.add(kind, meta);
            self.insert(parent, name, ino);
        }
        Ok(())
    }

    fn count_dir_links(&mut self) {
        for i in 0..self.nodes.len() {
            let subdirs = match &self.nodes[i].kind {
                NodeKind::Dir { children, .. } => children
                    .values()
                    .filter(|&&c| self.nodes[(c - 1) as usize].is_dir())
                    .count() as u32,
                _ => continue,
            };
            self.nodes[i].nlink = 2 + subdirs;
        }
    }

    /// Every reachable path below `dir`, depth first in name order, with its inode; the root
    /// itself is reported as the empty path.
    pub fn walk(&self, dir: Ino, mut visit: impl FnMut(&[u8], Ino)) {
        fn go(
            tree: &MergedTree,
            dir: Ino,
            prefix: &mut Vec<u8>,
            visit: &mut dyn FnMut(&[u8], Ino),
        ) {
            if let Some(children) = tree.children(dir) {
                for (name, &ino) in children {
                    let len = prefix.len();
                    if !prefix.is_empty() {
                        prefix.push(b'/');
                    }
                    prefix.extend_from_slice(name);
                    visit(prefix, ino);
                    go(tree, ino, prefix, visit);
                    prefix.truncate(len);
                }
            }
        }
        visit(b"", dir);
        go(self, dir, &mut Vec::new(), &mut visit);
    }

    /// A short digest of what the kernel may have cached from this tree: every path with its
    /// inode number, type, size and owner. Two trees with the same fingerprint answer every
    /// lookup the same, so a mount made from one can be served by the other (a daemon taking
    /// over a mount after a restart checks this).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        self.walk(ROOT, |path, ino| {
            let Some(node) = self.node(ino) else { return };
            hash.update(path);
            hash.update([0, node.type_char() as u8]);
            for n in [
                ino,
                node.size(),
                node.meta.mode.into(),
                node.meta.uid.into(),
            ] {
                hash.update(n.to_le_bytes());
            }
        });
        hex::encode(&hash.finalize()[..8])
    }
}

//! Conformance: an image as lazylayer reads it must equal the reference unpack (`umoci unpack`).
//!
//! Both sides are reduced to one [`Record`] per path (type, permissions, owner, size, link
//! count, link target, device numbers, xattrs, mtime of non-directories, SHA-256 of contents)
//! and compared as sorted maps, so a failure lists exactly which paths differ and how.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use futures_util::StreamExt;
use lazylayer::fs::ImageFs;
use lazylayer::fs::tree::NodeKind;
use sha2::{Digest as _, Sha256};

use super::{require_tool, shared_images};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only (directory sizes are filesystem-specific).
    pub size: Option<u64>,
    /// Non-directories only (directory link counts depend on the filesystem too).
    pub nlink: Option<u64>,
    pub target: Option<Vec<u8>>,
    pub rdev: Option<(u32, u32)>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub mtime: Option<i64>,
    pub sha256: Option<String>,
}

pub type Tree = BTreeMap<Vec<u8>, Record>;

/// Unpacks `tag` of the shared layout with umoci into `dir` and returns the rootfs path.
pub fn umoci_unpack(tag: &str, dir: &Path) -> std::path::PathBuf {
    require_tool("umoci");
    let bundle = dir.join(format!("umoci-{tag}"));
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", shared_images().display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle.join("rootfs")
}

fn hash_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The tree on disk below `root` (not including `root` itself).
pub fn disk_tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let kind = if ft.is_dir() {
                stack.push(path.clone());
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                '-'
            };
            let rdev = meta.rdev();
            let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = if kind == 'l' {
                Vec::new()
            } else {
                xattr::list(&path)
                    .unwrap()
                    .map(|name| {
                        let value = xattr::get(&path, &name).unwrap().unwrap_or_default();
                        (name.as_bytes().to_vec(), value)
                    })
                    .collect()
            };
            xattrs.sort();
            out.insert(
                rel,
                Record {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    size: (kind == '-').then(|| meta.size()),
                    nlink: (kind != 'd').then(|| meta.nlink()),
                    target: (kind == 'l').then(|| {
                        std::fs::read_link(&path)
                            .unwrap()
                            .as_os_str()
                            .as_bytes()
                            .to_vec()
                    }),
                    rdev: matches!(kind, 'c' | 'b').then(|| {
                        let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
                        let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
                        (major as u32, minor as u32)
                    }),
                    xattrs,
                    mtime: (kind != 'd').then(|| meta.mtime()),
                    sha256: (kind == '-').then(|| hash_file(&path)),
                },
            );
        }
    }
    out
}

/// The tree as lazylayer reads it, contents included (read through the chunk reader, many
/// files at once as a mount's readers would).
pub async fn image_tree(fs: &Arc<ImageFs>) -> Tree {
    let mut paths = Vec::new();
    fs.tree.walk(lazylayer::fs::tree::ROOT, |path, ino| {
        if !path.is_empty() {
            paths.push((path.to_vec(), ino));
        }
    });
    let records = futures_util::stream::iter(paths)
        .map(|(path, ino)| {
            let fs = fs.clone();
            async move {
                let node = fs.tree.node(ino).unwrap();
                let kind = node.type_char();
                let sha256 = match node.kind {
                    NodeKind::File { size, .. } => {
                        let mut hasher = Sha256::new();
                        let mut offset = 0;
                        while offset < size {
                            let data = fs.read(ino, offset, 8 << 20).await.unwrap_or_else(|e| {
                                panic!("reading {}: {e}", String::from_utf8_lossy(&path))
                            });
                            assert!(!data.is_empty(), "short read");
                            hasher.update(&data);
                            offset += data.len() as u64;
                        }
                        Some(hex::encode(hasher.finalize()))
                    }
                    _ => None,
                };
                let mut xattrs = node.meta.xattrs.clone();
                xattrs.sort();
                let record = Record {
                    kind,
                    mode: node.meta.mode,
                    uid: node.meta.uid,
                    gid: node.meta.gid,
                    size: (kind == '-').then(|| node.size()),
                    nlink: (kind != 'd').then_some(node.nlink as u64),
                    target: match &node.kind {
                        NodeKind::Symlink { target } => Some(target.to_vec()),
                        _ => None,
                    },
                    rdev: match node.kind {
                        NodeKind::Char { major, minor } | NodeKind::Block { major, minor } => {
                            Some((major, minor))
                        }
                        _ => None,
                    },
                    xattrs,
                    mtime: (kind != 'd').then_some(node.meta.mtime),
                    sha256,
                };
                (path, record)
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    records.into_iter().collect()
}

/// Asserts two trees are equal, listing up to 20 differences.
pub fn assert_same_tree(what: &str, expected: &Tree, actual: &Tree) {
    let mut diffs = Vec::new();
    for (path, e) in expected {
        match actual.get(path) {
            None => diffs.push(format!("missing: {}", String::from_utf8_lossy(path))),
            Some(a) if a != e => diffs.push(format!(
                "differs: {}\n    expected {e:?}\n    actual   {a:?}",
                String::from_utf8_lossy(path)
            )),
            _ => {}
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("unexpected: {}", String::from_utf8_lossy(path)));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} of {} paths differ from the reference:\n{}",
        diffs.len(),
        expected.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

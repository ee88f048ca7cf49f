//! The FUSE operations: an opened image answered to the kernel.
//!
//! Metadata operations (`lookup`, `getattr`, `readdir`, `getxattr`, ...) are answered inline on
//! the FUSE worker thread from the in-memory tree: they never touch the network, so they cannot
//! be held up by a slow fetch. A read of cached chunks is answered on the worker thread too; one
//! that must wait is handed to the tokio runtime with its reply object and answered when its
//! chunks arrive, while the worker goes straight back to the kernel for the next request. So a
//! read waiting on the network blocks neither `stat` nor reads of cached data from other
//! processes (see `kernel-notes/` for the threading choice).
//!
//! The image never changes while mounted, so every reply tells the kernel to cache: long entry
//! and attribute timeouts, and `FOPEN_KEEP_CACHE` so the page cache survives close and reopen.
//! Where the kernel allows, opens and flushes are answered "not implemented" once, and it then
//! opens files itself with that same caching and sends no more opens, releases or flushes.
//! Writes of any kind get `EROFS` (the mount is also read-only, so the kernel refuses most of
//! them before they reach us).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tracing::{debug, warn};

use crate::fs::ImageFs;
use crate::fs::tree::{Ino, Node, NodeKind};

/// How long the kernel may cache names and attributes. The tree is immutable for the life of
/// the mount, so this could be forever; a day keeps the kernel's caches from holding entries for
/// long-gone lookups on machines that never evict.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// The attributes of a negative lookup reply; only the node id (0) matters to the kernel.
const NEGATIVE_ENTRY: FileAttr = FileAttr {
    ino: INodeNo(0),
    size: 0,
    blocks: 0,
    atime: UNIX_EPOCH,
    mtime: UNIX_EPOCH,
    ctime: UNIX_EPOCH,
    crtime: UNIX_EPOCH,
    kind: FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: BLOCK as u32,
    flags: 0,
};

/// Whether an image's extended attribute is shown. overlayfs keeps its own metadata in
/// `trusted.overlay.*` attributes of its layers (opaque directories, redirects, metacopy); when
/// a mount is a container's lower layer (the snapshotter), such attributes carried in by an
/// image would be read by overlayfs as instructions, so they are not part of the image we serve.
fn visible_xattr(name: &[u8]) -> bool {
    !name.starts_with(b"trusted.overlay.")
}

/// Largest read request we ask the kernel for (it derives `max_pages` from this): 1 MiB reads
/// mean one request per MiB of a sequential read instead of eight at the default 128 KiB.
pub const MAX_REQUEST_BYTES: u32 = 1 << 20;

/// What we ask the kernel for when it offers it, all helping a read-only, immutable tree:
/// readdirplus (attributes with names, saving a lookup per entry), cached symlinks, parallel
/// lookups, requests larger than 128 KiB.
pub const INIT_CAPABILITIES: InitFlags = InitFlags::FUSE_DO_READDIRPLUS
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_MAX_PAGES);

/// Background requests (readahead, async reads) the kernel may have in flight to us.
const MAX_BACKGROUND: u16 = 64;

/// Block size `stat` reports, and the unit `st_blocks` is rounded to: a 4 KiB-block filesystem,
/// so that `du` over the mount agrees with `du` over an unpacked copy on ext4.
const BLOCK: u64 = 4096;

pub struct ImageFilesystem {
    fs: Arc<ImageFs>,
    runtime: tokio::runtime::Handle,
    /// The kernel opens files (and directories) itself once an open is answered `ENOSYS`, with
    /// the page cache kept: set when it said in `FUSE_INIT` that it can.
    no_open: bool,
    no_opendir: bool,
}

impl ImageFilesystem {
    pub fn new(fs: Arc<ImageFs>, runtime: tokio::runtime::Handle) -> ImageFilesystem {
        ImageFilesystem {
            fs,
            runtime,
            no_open: false,
            no_opendir: false,
        }
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.fs.tree.node(ino.0).ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: Ino, node: &Node) -> FileAttr {
        let size = node.size();
        let mtime = if node.meta.mtime >= 0 {
            UNIX_EPOCH + Duration::from_secs(node.meta.mtime as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(node.meta.mtime.unsigned_abs())
        };
        let rdev = match node.kind {
            NodeKind::Char { major, minor } | NodeKind::Block { major, minor } => {
                makedev(major, minor)
            }
            _ => 0,
        };
        let blocks = match node.kind {
            NodeKind::File { .. } | NodeKind::Dir { .. } => size.div_ceil(BLOCK) * (BLOCK / 512),
            _ => 0,
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: Self::file_type(node),
            perm: (node.meta.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: node.meta.uid,
            gid: node.meta.gid,
            rdev,
            blksize: BLOCK as u32,
            flags: 0,
        }
    }

    fn file_type(node: &Node) -> FileType {
        match node.kind {
            NodeKind::Dir { .. } => FileType::Directory,
            NodeKind::File { .. } => FileType::RegularFile,
            NodeKind::Symlink { .. } => FileType::Symlink,
            NodeKind::Char { .. } => FileType::CharDevice,
            NodeKind::Block { .. } => FileType::BlockDevice,
            NodeKind::Fifo => FileType::NamedPipe,
        }
    }

    /// `.`, `..` and the children of `dir`, from position `offset` on.
    fn dir_entries(&self, dir: Ino, offset: u64) -> Result<Vec<DirEntry<'_>>, Errno> {
        let children = self.fs.tree.children(dir).ok_or(Errno::ENOTDIR)?;
        let parent = self.fs.tree.parent(dir).unwrap_or(dir);
        let dots = [(dir, &b"."[..]), (parent, &b".."[..])];
        Ok(dots
            .into_iter()
            .chain(children.iter().map(|(name, &ino)| (ino, &name[..])))
            .enumerate()
            .skip(offset as usize)
            .map(|(i, (ino, name))| (ino, i as u64 + 1, name))
            .collect())
    }
}

/// A directory entry to return: inode, offset of the next entry, name.
type DirEntry<'a> = (Ino, u64, &'a [u8]);

/// Linux's `makedev` for the `rdev` field.
fn makedev(major: u32, minor: u32) -> u32 {
    // The FUSE ABI carries a 32-bit rdev that the kernel reads with `new_decode_dev`: minor's
    // low byte, then 12 bits of major, then the rest of minor.
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn is_write(flags: OpenFlags) -> bool {
    !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY)
        || flags.0 & (libc::O_TRUNC | libc::O_APPEND | libc::O_CREAT) != 0
}

impl Filesystem for ImageFilesystem {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger requests: the kernel sizes max_pages from max(max_write, max_readahead).
        if let Err(max) = config.set_max_readahead(MAX_REQUEST_BYTES) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_write(MAX_REQUEST_BYTES) {
            let _ = config.set_max_write(max);
        }
        // Readahead and async reads are "background" requests, of which the kernel keeps at most
        // max_background (default 16) in flight per mount; reads wait on the network, not on us,
        // so allow more of them to overlap.
        if let Err(max) = config.set_max_background(MAX_BACKGROUND) {
            let _ = config.set_max_background(max);
        }
        for flag in INIT_CAPABILITIES.iter() {
            if config.add_capabilities(flag).is_err() {
                debug!("kernel does not offer {flag:?}");
            }
        }
        // Not in INIT_CAPABILITIES: nothing to ask for, only to know. A connection taken over
        // (whose INIT is made up) answers opens as before, which is right on any kernel.
        self.no_open = config
            .capabilities()
            .contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        self.no_opendir = config
            .capabilities()
            .contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.tree.lookup(parent.0, name.as_bytes()) {
            Some(ino) => {
                let node = self.fs.tree.node(ino).expect("child inode exists");
                reply.entry(&TTL, &self.attr(ino, node), Generation(0));
            }
            None if self.fs.tree.node(parent.0).is_some_and(Node::is_dir) => {
                // A negative entry: node id 0 with a timeout makes the kernel cache the miss
                // (an ENOENT error would be asked again on every lookup). The tree never grows,
                // and interpreters probe many missing paths at start (Python's sys.path).
                reply.entry(&TTL, &NEGATIVE_ENTRY, Generation(0))
            }
            None => reply.error(Errno::ENOTDIR),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(node) => reply.attr(&TTL, &self.attr(ino.0, node)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).map(|n| &n.kind) {
            Ok(NodeKind::Symlink { target }) => reply.data(target),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino).map(|n| &n.kind) {
            Ok(_) if is_write(flags) => reply.error(Errno::EROFS),
            Ok(NodeKind::Dir { .. }) => reply.error(Errno::EISDIR),
            // Every file would get the same answer (no handle, keep the cache), which is what
            // the kernel assumes from now on when told "no open": no open or release request
            // again for any file of the mount, two round trips less per file opened.
            Ok(_) if self.no_open => reply.error(Errno::ENOSYS),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        tracing::trace!(ino = ino.0, offset, size, "read");
        let fs = self.fs.clone();
        let mut read = Box::pin(async move { fs.read(ino.0, offset, size as u64).await });
        let answer =
            move |reply: ReplyData,
                  result: Result<bytes::Bytes, Arc<crate::fetch::ContentError>>| {
                match result {
                    Ok(data) => reply.data(&data),
                    Err(e) => {
                        warn!("read of inode {} at {offset} (+{size}) failed: {e}", ino.0);
                        reply.error(Errno::EIO);
                    }
                }
            };
        // A read of cached chunks is answered here, on the FUSE thread, rather than after a hop
        // to the runtime's threads: reading a tree from the disk cache is mostly such reads, and
        // the hop (and the runtime's two threads doing every disk load) cost more than the load.
        // A read that must wait is handed to the runtime, which polls it again with a real
        // waker.
        let _runtime = self.runtime.enter();
        let mut waiting = std::task::Context::from_waker(std::task::Waker::noop());
        match read.as_mut().poll(&mut waiting) {
            std::task::Poll::Ready(result) => answer(reply, result),
            std::task::Poll::Pending => {
                self.runtime.spawn(async move { answer(reply, read.await) });
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(_) if is_write(flags) => reply.error(Errno::EROFS),
            // As for files (see `open`): the kernel's default is the answer below.
            Ok(node) if node.is_dir() && self.no_opendir => reply.error(Errno::ENOSYS),
            Ok(node) if node.is_dir() => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.dir_entries(ino.0, offset) {
            Ok(entries) => {
                for (child, next, name) in entries {
                    let node = self.fs.tree.node(child).expect("child inode exists");
                    if reply.add(
                        INodeNo(child),
                        next,
                        Self::file_type(node),
                        OsStr::from_bytes(name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.dir_entries(ino.0, offset) {
            Ok(entries) => {
                for (child, next, name) in entries {
                    let node = self.fs.tree.node(child).expect("child inode exists");
                    let attr = self.attr(child, node);
                    if reply.add(
                        INodeNo(child),
                        next,
                        OsStr::from_bytes(name),
                        &TTL,
                        &attr,
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Report the compressed image size as used space: what the image costs the registry,
        // and a stable figure (the local cache comes and goes).
        let used: u64 = self
            .fs
            .layers
            .iter()
            .map(|l| l.size)
            .sum::<u64>()
            .div_ceil(BLOCK);
        reply.statfs(
            used,
            0,
            0,
            self.fs.tree.inode_count(),
            0,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let found = node
            .meta
            .xattrs
            .iter()
            .find(|(k, _)| k == name.as_bytes() && visible_xattr(k));
        match found {
            None => reply.error(Errno::ENODATA),
            Some((_, value)) if size == 0 => reply.size(value.len() as u32),
            Some((_, value)) if value.len() > size as usize => reply.error(Errno::ERANGE),
            Some((_, value)) => reply.data(value),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (k, _) in node.meta.xattrs.iter().filter(|(k, _)| visible_xattr(k)) {
            names.extend_from_slice(k);
            names.push(0);
        }
        if size == 0 {
            reply.size(names.len() as u32);
        } else if names.len() > size as usize {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(&names);
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.node(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            // Permission bits are enforced by the kernel (`default_permissions`).
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever buffered for writing; "no flush" stops the kernel sending one on
        // every close (a round trip each) for the rest of the mount.
        reply.error(Errno::ENOSYS);
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Programs probe files with ioctls (isatty's TCGETS); "not a terminal" is the answer.
        reply.error(Errno::ENOTTY);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_numbers_use_the_kernels_encoding() {
        assert_eq!(super::makedev(1, 3), 0x103);
        assert_eq!(super::makedev(5, 1), 0x501);
        assert_eq!(super::makedev(8, 0x12345), 0x12300845);
    }

    #[test]
    fn overlayfs_metadata_in_an_image_is_not_served() {
        assert!(!super::visible_xattr(b"trusted.overlay.opaque"));
        assert!(!super::visible_xattr(b"trusted.overlay.redirect"));
        assert!(super::visible_xattr(b"security.capability"));
        assert!(super::visible_xattr(b"user.overlay.opaque"));
        assert!(super::visible_xattr(b"trusted.overlayx"));
    }
}

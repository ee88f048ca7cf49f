//! Taking over a mount's FUSE connection after a restart, a crash or an upgrade of the daemon, so
//! that the processes reading the mount (running containers) never notice.
//!
//! The kernel ends a FUSE connection only when its last `/dev/fuse` descriptor is closed. So each
//! mount's descriptor is duplicated into a store that outlives the daemon: systemd's file
//! descriptor store when we run under a unit that has one ([`systemd`]), else a holder process
//! ([`holder`]). While no daemon runs, the kernel queues requests (readers wait, they do not
//! fail); requests the dead daemon had read but not answered stay in the connection's
//! processing queue.
//!
//! A new daemon finds the descriptor under the mount's name and resumes on it ([`resume`]):
//! - fuser only serves a session that has seen `FUSE_INIT`, and the kernel sends that once per
//!   connection. So the session is created on one end of a socket pair that carries a synthetic
//!   `INIT`; after that handshake the real descriptor is `dup3`ed onto the session's descriptor
//!   number, and from then on fuser reads the real connection. What the kernel negotiated the
//!   first time stays in force (it lives in the kernel).
//! - `FUSE_NOTIFY_RESEND` (Linux 6.9+) makes the kernel queue again every request still waiting
//!   for an answer, so those the dead daemon took are answered too.
//! - Node ids are indexes in the merged tree, which the same layers always build the same way,
//!   and file handles carry no state (every open answers handle 0): the kernel's dentries, open
//!   files and page cache stay valid. The name a connection is kept under carries a fingerprint
//!   of the tree; a daemon that builds a different tree (the tag moved, other layers) does not
//!   take it, and the mount falls back to unmount and mount again.
//! - A daemon started while the previous one still serves (an upgrade) takes the connection the
//!   same way; for a moment both read it, which the kernel allows (each request goes to one
//!   reader). The caller then stops the old daemon and asks for a second resend
//!   ([`Resumed::resend`]) once it has exited.
//! - All worker threads read the one descriptor (no `FUSE_DEV_IOC_CLONE`): a cloned descriptor
//!   is private to the dying process, and the kernel fails the requests in its queue with
//!   `ECONNABORTED` when it closes.

pub mod holder;
mod systemd;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use tracing::{debug, warn};

use crate::fs::ImageFs;

/// Where a connection is kept.
enum Store {
    Systemd(systemd::SystemdStore),
    Holder(holder::Holder),
}

/// This process's kept connections: where they go, and those an earlier process left.
pub struct KeptConnections {
    store: Store,
}

/// What a kept connection is named: the mount point it serves and the tree it was built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionName {
    mount: String,
    tree: String,
}

/// Prefix of our names in a store (systemd's is shared with whatever else the unit keeps).
const NAME_PREFIX: &str = "lazylayer-";

impl ConnectionName {
    pub fn new(dir: &Path, fs: &ImageFs) -> ConnectionName {
        ConnectionName {
            mount: crate::mount::mount_id(dir),
            tree: fs.tree.fingerprint(),
        }
    }

    fn encode(&self) -> String {
        format!("{NAME_PREFIX}{}-{}", self.mount, self.tree)
    }

    fn decode(name: &str) -> Option<ConnectionName> {
        let (mount, tree) = name.strip_prefix(NAME_PREFIX)?.split_once('-')?;
        Some(ConnectionName {
            mount: mount.to_string(),
            tree: tree.to_string(),
        })
    }
}

impl KeptConnections {
    /// The store for this process: systemd's when systemd listens for our notifications, else the
    /// holder in `run_dir` (started if none runs). Call once per process: systemd's descriptors
    /// are claimed by the first call.
    pub fn open(run_dir: &Path) -> io::Result<KeptConnections> {
        if let Some(store) = systemd::SystemdStore::from_env() {
            debug!("FUSE connections are kept in systemd's file descriptor store");
            return Ok(KeptConnections {
                store: Store::Systemd(store),
            });
        }
        std::fs::create_dir_all(run_dir)?;
        let holder = holder::Holder::start(&holder::socket_path(run_dir))?;
        Ok(KeptConnections {
            store: Store::Holder(holder),
        })
    }

    /// Whether a connection is kept for a mount at `dir`, without starting a holder (for a
    /// command that is about to start the daemon that would take it).
    pub fn kept_for(run_dir: &Path, dir: &Path) -> bool {
        let key = crate::mount::mount_id(dir);
        let names = if std::env::var_os("NOTIFY_SOCKET").is_some() {
            // Only the unit's own process can see systemd's store; it decides when it starts.
            return false;
        } else {
            match holder::Holder::existing(&holder::socket_path(run_dir)) {
                Some(holder) => holder.names().unwrap_or_default(),
                None => return false,
            }
        };
        names
            .iter()
            .filter_map(|n| ConnectionName::decode(n))
            .any(|n| n.mount == key)
    }

    fn names(&self) -> Vec<ConnectionName> {
        let names = match &self.store {
            Store::Systemd(store) => store.names(),
            Store::Holder(holder) => holder.names().unwrap_or_else(|e| {
                warn!("asking the fuse holder for kept connections: {e}");
                Vec::new()
            }),
        };
        names
            .iter()
            .filter_map(|n| ConnectionName::decode(n))
            .collect()
    }

    /// Keeps `fd`, the connection of the mount `name`.
    pub fn keep(&self, name: &ConnectionName, fd: BorrowedFd<'_>) -> io::Result<()> {
        match &self.store {
            Store::Systemd(store) => store.keep(&name.encode(), fd),
            Store::Holder(holder) => holder.keep(&name.encode(), fd),
        }
    }

    /// The mount points (as [`crate::mount::mount_id`]s) an earlier process kept connections for.
    pub fn kept_mounts(&self) -> Vec<String> {
        self.names().into_iter().map(|n| n.mount).collect()
    }

    /// Whether a connection is kept for the mount at `dir`.
    pub fn has(&self, dir: &Path) -> bool {
        let key = crate::mount::mount_id(dir);
        self.names().iter().any(|n| n.mount == key)
    }

    /// The connection kept for the mount at `dir`, if it serves the tree `name` describes. One
    /// kept for another tree is forgotten (it cannot be taken over), and said why.
    pub fn take(&self, name: &ConnectionName, dir: &Path) -> Option<OwnedFd> {
        let kept: Vec<ConnectionName> = self
            .names()
            .into_iter()
            .filter(|n| n.mount == name.mount)
            .collect();
        let mut found = None;
        for other in kept {
            if other == *name && found.is_none() {
                let taken = match &self.store {
                    Store::Systemd(store) => Ok(store.take(&other.encode())),
                    Store::Holder(holder) => holder.take(&other.encode()),
                };
                match taken {
                    Ok(fd) => found = fd,
                    Err(e) => warn!("{}: taking its kept FUSE connection: {e}", dir.display()),
                }
            } else {
                warn!(
                    "{}: the kept FUSE connection was serving another tree (tree {}, this image \
                     builds {}): not taken over; mounting again, so readers of the old mount \
                     fail",
                    dir.display(),
                    other.tree,
                    name.tree
                );
                self.forget_name(&other);
            }
        }
        found
    }

    fn forget_name(&self, name: &ConnectionName) {
        let forgotten = match &self.store {
            Store::Systemd(store) => store.forget(&name.encode()),
            Store::Holder(holder) => holder.forget(&name.encode()),
        };
        if let Err(e) = forgotten {
            debug!("forgetting kept connection {}: {e}", name.encode());
        }
    }

    /// Stops keeping the connection of the mount at `dir` (it is being unmounted).
    pub fn forget(&self, dir: &Path) {
        let key = crate::mount::mount_id(dir);
        for name in self.names().into_iter().filter(|n| n.mount == key) {
            self.forget_name(&name);
        }
    }

    /// Stops keeping the connections of the mounts with these keys (from [`kept_mounts`]).
    ///
    /// [`kept_mounts`]: KeptConnections::kept_mounts
    pub fn forget_keys(&self, keys: &[String]) {
        for name in self.names().into_iter().filter(|n| keys.contains(&n.mount)) {
            self.forget_name(&name);
        }
    }
}

/// `FUSE_INIT`'s opcode.
const FUSE_INIT: u32 = 26;
/// `FUSE_NOTIFY_RESEND`'s notification code (Linux 6.9+).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// The `INIT` request fuser's handshake reads on a resumed session: `fuse_in_header` then
/// `fuse_init_in`, for protocol 7.40 with every capability we ask for offered (what fuser and
/// our `init` answer goes nowhere; the kernel keeps what was negotiated at mount).
fn synthetic_init() -> Vec<u8> {
    let offered = super::fuse::INIT_CAPABILITIES | fuser::InitFlags::FUSE_INIT_EXT;
    let bits = offered.bits();
    let mut message = Vec::with_capacity(104);
    message.extend(104u32.to_ne_bytes()); // len
    message.extend(FUSE_INIT.to_ne_bytes()); // opcode
    message.extend(1u64.to_ne_bytes()); // unique
    message.extend(0u64.to_ne_bytes()); // nodeid
    message.extend([0u8; 16]); // uid, gid, pid, padding
    message.extend(7u32.to_ne_bytes()); // major
    message.extend(40u32.to_ne_bytes()); // minor
    message.extend(super::fuse::MAX_REQUEST_BYTES.to_ne_bytes()); // max_readahead
    message.extend((bits as u32).to_ne_bytes()); // flags
    message.extend(((bits >> 32) as u32).to_ne_bytes()); // flags2
    message.extend([0u8; 44]); // unused
    message
}

/// A connection taken over from an earlier daemon.
pub struct Resumed {
    /// The connection (a duplicate of the session's descriptor).
    fd: OwnedFd,
}

impl Resumed {
    /// Queues again every request still waiting for an answer. Taking over already did this
    /// once; call it again when the earlier daemon was still serving and has exited since: what
    /// it had read and not answered is lost otherwise. Requests this process is answering are
    /// queued too and answered twice; the kernel ignores the second answer.
    pub fn resend(&self) -> io::Result<()> {
        resend(self.fd.as_fd())
    }
}

/// A fuser session for `filesystem` on the already initialised connection `fd`.
pub fn resume<FS: fuser::Filesystem + Send + 'static>(
    filesystem: FS,
    fd: OwnedFd,
    config: fuser::Config,
) -> io::Result<(fuser::BackgroundSession, Resumed)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    nix::unistd::write(&theirs, &synthetic_init())?;
    let acl = config.acl;
    let session = fuser::Session::from_fd(filesystem, ours, acl, config)?;
    let slot = session.as_fd().as_raw_fd();
    // SAFETY: `slot` is the session's own open descriptor; dup3 atomically makes it refer to the
    // FUSE connection instead of the socket (which it closes). Nothing reads it concurrently:
    // the session's threads start with `spawn` below.
    if unsafe { libc::dup3(fd.as_raw_fd(), slot, libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(theirs);
    resend(fd.as_fd())?;
    Ok((session.spawn()?, Resumed { fd }))
}

/// Asks the kernel to queue again the requests the previous daemon read but did not answer.
fn resend(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut header = Vec::with_capacity(16);
    header.extend(16u32.to_ne_bytes()); // len
    header.extend(FUSE_NOTIFY_RESEND.to_ne_bytes()); // error: the notification code
    header.extend(0u64.to_ne_bytes()); // unique 0: a notification
    match nix::unistd::write(fd, &header) {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            warn!(
                "this kernel cannot resend requests to a new FUSE daemon (FUSE_NOTIFY_RESEND is \
                 Linux 6.9+): reads that were in flight when the previous daemon stopped stay \
                 blocked until their process is killed"
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_ignore_other_entries_of_the_store() {
        let name = ConnectionName {
            mount: "0123456789abcdef".into(),
            tree: "fedcba9876543210".into(),
        };
        assert_eq!(ConnectionName::decode(&name.encode()), Some(name.clone()));
        assert!(name.encode().len() < 255, "systemd's FDNAME limit");
        assert_eq!(ConnectionName::decode("sshd-socket"), None);
        assert_eq!(ConnectionName::decode("lazylayer-nodash"), None);
    }

    #[test]
    fn the_synthetic_init_is_what_the_kernel_would_send() {
        let init = synthetic_init();
        assert_eq!(init.len(), 104);
        assert_eq!(u32::from_ne_bytes(init[0..4].try_into().unwrap()), 104);
        assert_eq!(
            u32::from_ne_bytes(init[4..8].try_into().unwrap()),
            FUSE_INIT
        );
        assert_eq!(u32::from_ne_bytes(init[40..44].try_into().unwrap()), 7);
    }
}

//! systemd's file descriptor store: under a unit with `FileDescriptorStoreMax=`, systemd itself
//! holds the connections across `systemctl restart` and crashes, and closes them when the unit
//! is stopped (its readers then fail, as they would without a store).
//!
//! Keeping is an `sd_notify` datagram (`FDSTORE=1`, `FDNAME=`) with the descriptor attached;
//! the next process of the unit finds them as `LISTEN_FDS` from descriptor 3 on, named in
//! `LISTEN_FDNAMES`. Forgetting is `FDSTOREREMOVE=1`; systemd also drops a descriptor by itself
//! once it reports `POLLERR` (the mount is gone).

use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket,
};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

pub struct SystemdStore {
    notify: UnixAddr,
    /// Descriptors the unit's previous process stored, by name, until taken.
    stored: Mutex<BTreeMap<String, OwnedFd>>,
}

impl SystemdStore {
    /// The store of the unit this process runs in, if systemd listens for its notifications.
    pub fn from_env() -> Option<SystemdStore> {
        let notify = std::env::var_os("NOTIFY_SOCKET")?;
        let notify = notify.as_encoded_bytes();
        let notify = match notify.strip_prefix(b"@") {
            Some(abstract_name) => UnixAddr::new_abstract(abstract_name).ok()?,
            None => UnixAddr::new(notify).ok()?,
        };
        Some(SystemdStore {
            notify,
            stored: Mutex::new(listened_fds()),
        })
    }

    fn notify(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let fds = fd.map(|fd| [fd.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
        sendmsg(
            sock.as_raw_fd(),
            &[IoSlice::new(text.as_bytes())],
            &cmsgs,
            MsgFlags::empty(),
            Some(&self.notify),
        )?;
        Ok(())
    }

    pub fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.notify(&format!("FDSTORE=1\nFDNAME={name}\n"), Some(fd))
    }

    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        self.stored.lock().unwrap().remove(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.stored.lock().unwrap().keys().cloned().collect()
    }

    pub fn forget(&self, name: &str) -> io::Result<()> {
        self.stored.lock().unwrap().remove(name);
        self.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), None)
    }
}

/// The descriptors systemd passed to this process, by name (`sd_listen_fds_with_names`).
fn listened_fds() -> BTreeMap<String, OwnedFd> {
    let var = |name: &str| std::env::var(name).ok();
    let for_us = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = var("LISTEN_FDS").and_then(|n| n.parse::<i32>().ok());
    let (true, Some(count)) = (for_us, count) else {
        return BTreeMap::new();
    };
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    (0..count)
        .map(|i| {
            let fd = LISTEN_FDS_START + i;
            let name = names.next().unwrap_or("unknown").to_string();
            // SAFETY: systemd passed descriptors LISTEN_FDS_START.. to this process (LISTEN_PID
            // is ours); nothing else in this process claims them.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            (name, unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect()
}

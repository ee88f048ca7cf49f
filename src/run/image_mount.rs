//! One lazy mount per image, shared by every run of that image.
//!
//! Runs of one image (one manifest digest, read through one disk cache) at the same time use one
//! FUSE mount, so they share its chunk cache in memory, its in-flight requests and its prefetch,
//! not only the disk cache. The mount is served by a process of its own (this binary, started
//! by the first run with the run's options: see `cli::run`), not by the run that started it: a
//! run ends when its command does, whoever else still reads the image.
//!
//! Its directory, `RUN_DIR/images/KEY`, holds `lower/` (the mount), `users/PID` (one file per run
//! using it), `server.pid` and `server.log`. Joining and leaving hold an exclusive `flock` on `KEY/lock`, so a
//! run that joins while the last one leaves either finds the mount serving or starts a new one.
//! The last run to leave unmounts it (the server then stores its chunks and profile and exits)
//! and removes the directory. A run that was killed leaves its `users/PID`; users whose process
//! is gone do not count, and [`clean_stale`] (run by every run) ends mounts nobody uses.
//!
//! The price: a run whose image is not mounted yet starts a process to serve it (a few tens of
//! milliseconds, measured in tools/bench's `run warm` row), and the options of the run that
//! started the server (prefetch, cache sizes) hold for all who join.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where shared image mounts live.
fn images_dir() -> PathBuf {
    crate::mount::run_dir().join("images")
}

/// The mount of one image, joined by this run until [`ImageMount::leave`].
pub struct ImageMount {
    dir: PathBuf,
}

impl ImageMount {
    /// Joins the mount of image `key` (a file name: digest and cache, hashed), starting its server
    /// with `start(lower, log)` when nobody serves it. `start` returns the server's pid once the
    /// mount serves, or says why it could not.
    pub fn join(
        key: &str,
        start: impl FnOnce(&Path, &Path) -> Result<u32, String>,
    ) -> Result<ImageMount, String> {
        let dir = images_dir().join(key);
        let failed = |e: io::Error| format!("{}: {e}", dir.display());
        let _lock = Lock::wait(&dir).map_err(failed)?;
        let users = dir.join("users");
        let me = users.join(std::process::id().to_string());
        std::fs::create_dir_all(&users)
            .and_then(|()| std::fs::create_dir_all(dir.join("lower")))
            .and_then(|()| std::fs::write(&me, b""))
            .map_err(failed)?;
        let mount = ImageMount { dir };
        if !mount.serves() {
            // A server that died left its mount point dead (ENOTCONN); nothing else is there.
            let _ = crate::mount::detach(&mount.lower());
            match start(&mount.lower(), &mount.dir.join("server.log")) {
                Ok(pid) => {
                    let _ = std::fs::write(mount.dir.join("server.pid"), pid.to_string());
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&me);
                    mount.end_if_unused();
                    return Err(e);
                }
            }
        }
        Ok(mount)
    }

    /// The image's merged tree, for the run's overlay.
    pub fn lower(&self) -> PathBuf {
        self.dir.join("lower")
    }

    /// Whether a file system is mounted at `lower` and answers.
    fn serves(&self) -> bool {
        match (self.lower().metadata(), self.dir.metadata()) {
            (Ok(lower), Ok(dir)) => lower.dev() != dir.dev(),
            _ => false,
        }
    }

    /// Leaves the mount; the last run to leave ends it.
    pub fn leave(self) {
        let Ok(_lock) = Lock::wait(&self.dir) else {
            return;
        };
        let _ = std::fs::remove_file(self.dir.join("users").join(std::process::id().to_string()));
        self.end_if_unused();
    }

    /// With the lock held: when no live run uses the mount, unmounts it, waits for its server to
    /// store what it learned (a run right after must find its chunks and profile), and removes
    /// the directory.
    fn end_if_unused(&self) {
        if live_users(&self.dir.join("users")) > 0 {
            return;
        }
        let lower = self.lower();
        if crate::mount::unmount(&lower).is_err() {
            // Busy (a killed run's overlay still on it) or already gone: detach what is there.
            let _ = crate::mount::detach(&lower);
        }
        let server = std::fs::read_to_string(self.dir.join("server.pid"));
        if let Some(pid) = server.ok().and_then(|p| p.trim().parse().ok())
            && !crate::mount::wait_for_server(pid, &crate::mount::control_socket(&lower))
        {
            tracing::warn!(
                "{}: unmounted, but its server (pid {pid}) has not exited after {} s",
                lower.display(),
                crate::mount::SERVER_EXIT_WAIT.as_secs()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs in `users/` whose process lives (the files of killed runs are removed).
fn live_users(users: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(users) else {
        return 0;
    };
    let mut live = 0;
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().parse::<u32>().ok();
        match pid {
            Some(pid) if crate::mount::alive(pid) => live += 1,
            _ => {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    live
}

/// Ends the image mounts left with no live run (their runs were killed). Mounts being joined or
/// left right now (locked) are skipped: a server starting for a cold image may hold its lock for
/// seconds, and that run ends its mount itself if it fails.
pub fn clean_stale() {
    let Ok(entries) = std::fs::read_dir(images_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if let Ok(Some(_lock)) = Lock::try_take(&dir)
            && live_users(&dir.join("users")) == 0
        {
            tracing::info!(
                "ending {}: the runs that used it were killed",
                dir.display()
            );
            ImageMount { dir }.end_if_unused();
        }
    }
}

/// An exclusive `flock` on `DIR/lock`, released when dropped (closing the file releases it).
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    /// Takes the lock of `dir`, waiting for whoever holds it.
    fn wait(dir: &Path) -> io::Result<Lock> {
        Lock::take(dir, true)?.ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }

    /// Takes the lock of `dir`, or `None` when another holds it.
    fn try_take(dir: &Path) -> io::Result<Option<Lock>> {
        Lock::take(dir, false)
    }

    fn take(dir: &Path, wait: bool) -> io::Result<Option<Lock>> {
        let path = dir.join("lock");
        loop {
            std::fs::create_dir_all(dir)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            let operation = if wait {
                libc::LOCK_EX
            } else {
                libc::LOCK_EX | libc::LOCK_NB
            };
            // SAFETY: flock(2) on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), operation) } != 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EWOULDBLOCK) => Ok(None),
                    _ => Err(e),
                };
            }
            // The last run may have removed the directory while we waited: then this lock is on
            // a file nobody else will open, and the directory must be made again.
            let held = file.metadata()?.ino();
            if path.metadata().is_ok_and(|m| m.ino() == held) {
                return Ok(Some(Lock { _file: file }));
            }
        }
    }
}

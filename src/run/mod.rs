//! `lazylayer run`: a process in a remote image's filesystem, with no daemon and no download.
//!
//! The image is mounted lazily once for all runs of it ([`image_mount`]: the same `ImageFs`, disk
//! cache and profiles as `mount`, served by a process of its own). One run is one directory under
//! the run directory (`RUN_DIR/containers/ID`): `tmp/`, a tmpfs holding the overlay's upper and
//! work directories (or `--upper DIR` and a work directory beside it, to keep the changes);
//! `rootfs/`, the overlay of those over the image mount, which the container sees;
//! `config.json`, the runtime spec ([`spec`]); `runc/`, runc's state; and `pid`, this process.
//! runc (Debian's package) runs the container in the foreground, so stdio, the terminal and the
//! exit status pass through it.
//!
//! Everything is undone when the run ends, whichever way it ends; a run that was killed leaves
//! its directory behind, and the next run removes it (its `pid` no longer lives): the overlay and
//! tmpfs are detached and runc's state deleted, then image mounts no live run uses are ended.
//! Root only: FUSE with `allow_other`, overlayfs and runc's namespaces need it.

pub mod image_mount;
pub mod spec;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where runs keep their directories.
pub fn runs_dir() -> PathBuf {
    crate::mount::run_dir().join("containers")
}

/// runc on `PATH`, if it is installed.
pub fn find_runc() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("runc"))
        .find(|p| p.is_file())
}

/// Creates a run's directory `dir` with its `pid` already in it (made under a hidden name and
/// renamed), so that a run starting at the same moment never takes it for a killed run's.
pub fn create(dir: &Path) -> io::Result<()> {
    let name = dir.file_name().ok_or(io::ErrorKind::InvalidInput)?;
    let hidden = dir.with_file_name(format!(".{}", name.to_string_lossy()));
    std::fs::create_dir_all(&hidden)?;
    std::fs::write(hidden.join("pid"), std::process::id().to_string())?;
    for sub in ["tmp", "rootfs", "runc"] {
        std::fs::create_dir(hidden.join(sub))?;
    }
    std::fs::rename(&hidden, dir)
}

/// Removes what runs that were killed left behind: directories whose `pid` is not alive, then
/// the image mounts they used.
pub fn clean_stale(runc: &Path) {
    let entries = std::fs::read_dir(runs_dir())
        .into_iter()
        .flatten()
        .flatten();
    for entry in entries {
        let dir = entry.path();
        let pid = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        let alive = match pid {
            Some(pid) => crate::mount::alive(pid),
            // Killed between creating its hidden directory and writing its pid (a run being made
            // right now has its pid written within microseconds).
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default().as_secs() < 60),
        };
        if !alive {
            tracing::info!("removing what a killed run left in {}", dir.display());
            remove(&dir, runc);
        }
    }
    image_mount::clean_stale();
}

/// Undoes one run's directory: runc's state, the overlay and the tmpfs (each detached, so a busy
/// one goes when its last user does), then the files.
pub fn remove(dir: &Path, runc: &Path) {
    if let Some(id) = dir.file_name() {
        let _ = std::process::Command::new(runc)
            .arg("--root")
            .arg(dir.join("runc"))
            .args(["delete", "--force"])
            .arg(id)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    for sub in ["rootfs", "tmp"] {
        let _ = crate::mount::detach(&dir.join(sub));
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!("cannot remove {}: {e}", dir.display());
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn mount(source: &str, target: &Path, fstype: &str, data: &str) -> io::Result<()> {
    let (source, fstype) = (CString::new(source)?, CString::new(fstype)?);
    let (target, data) = (cstring(target)?, CString::new(data)?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// A tmpfs at `target`, for the overlay's upper and work directories.
pub fn mount_tmpfs(target: &Path) -> io::Result<()> {
    mount("tmpfs", target, "tmpfs", "mode=0755")
}

/// The overlay of `upper` (with `work`) over `lower`, at `target`.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    if [lower, upper, work]
        .iter()
        .any(|p| p.as_os_str().as_bytes().iter().any(|b| b",:".contains(b)))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "overlay paths cannot contain `,` or `:`",
        ));
    }
    mount("overlay", target, "overlay", &data)
}

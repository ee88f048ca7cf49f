//! Mounting an opened image with FUSE, and talking to a running mount.
//!
//! A mount is one [`ImageFs`] served by [`fuse::ImageFilesystem`] on a few FUSE worker threads
//! (sharing one `/dev/fuse` descriptor), with reads completed on the tokio runtime. A daemon
//! can keep that descriptor where its successor takes it over ([`takeover`]), so a restart or an
//! upgrade does not break the mount's readers. Next to it the
//! daemon listens on a small control socket ([`control`]) that `lazylayer stats` reads; the
//! socket lives in a run directory and is named after the mount point, so a client needs only the
//! directory the user typed.
//!
//! Mount options: read-only; `default_permissions` so the kernel checks modes against the image's
//! owners (we never re-implement permission checks); `suid` and `dev`, because the mount is made
//! by root to serve as a container's root filesystem, where setuid binaries such as `su` and
//! device nodes must behave as they would in an unpacked copy.

pub mod control;
pub mod fuse;
pub mod metrics;
pub mod takeover;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::os::fd::AsFd;

use fuser::{BackgroundSession, Config, MountOption};
use takeover::{ConnectionName, KeptConnections};

use crate::fs::ImageFs;

/// How a mount is made.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let users other than the one who mounted access the tree (needed when containers run as
    /// other users). Off by default, as for every FUSE filesystem.
    pub allow_other: bool,
    /// Honour setuid bits and device nodes in the image. Off for inspection mounts (`nosuid,
    /// nodev`): an image from a registry is untrusted input, and a setuid root shell or a
    /// device node in it must not become one on the host. A container rootfs needs them on
    /// (`sudo`, `ping`), which is what `--suid-dev` and the snapshotter ask for.
    pub suid_dev: bool,
    /// FUSE worker threads. Reads do not occupy a worker while they wait for the network, so a
    /// few threads suffice; 2 lets one `stat` proceed while another thread copies a large reply.
    pub threads: usize,
    /// Kernel readahead for the mount, in KiB. The kernel's default for a FUSE mount is 128 KiB,
    /// which caps sequential reads at 128–256 KiB requests however large `max_pages` is; 1 MiB
    /// matches our largest request, so a sequential reader costs one request per MiB.
    pub read_ahead_kb: u32,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            suid_dev: false,
            threads: 2,
            read_ahead_kb: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{dir}: not a directory (create it first: mkdir -p {dir})")]
    NotADirectory { dir: String },
    #[error("cannot mount at {dir}: {source} (is /dev/fuse available, and are you root?)")]
    Mount { dir: String, source: io::Error },
    #[error("cannot unmount {dir}: {source}")]
    Unmount { dir: String, source: io::Error },
    #[error(
        "{dir} is already a lazylayer mount (of {image}); unmount it first: lazylayer umount {dir}"
    )]
    AlreadyMounted { dir: String, image: String },
}

/// Refuses a directory that already is a lazylayer mount: a second mount would stack on it,
/// share its control socket and log, and one `umount` would take both down.
pub fn check_not_mounted(dir: &Path) -> Result<(), MountError> {
    let Ok(absolute) = std::path::absolute(dir) else {
        return Ok(());
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut fields = line.split(' ').map(unescape_mount_field);
        let (Some(source), Some(point)) = (fields.next(), fields.next()) else {
            continue;
        };
        if let Some(image) = source.strip_prefix(FS_NAME_PREFIX)
            && Path::new(&point) == absolute
        {
            return Err(MountError::AlreadyMounted {
                dir: dir.display().to_string(),
                image: image.to_string(),
            });
        }
    }
    Ok(())
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How our mounts' source starts in the mount table (`lazylayer:IMAGE`).
const FS_NAME_PREFIX: &str = "lazylayer:";

/// A mount being served.
pub struct Served {
    /// fuser's session; dropping it unmounts a mount made here, not one taken over.
    pub session: BackgroundSession,
    /// An earlier daemon's connection taken over, instead of a new mount.
    pub resumed: Option<takeover::Resumed>,
}

/// Mounts `fs` at `dir` and returns once the kernel has the mount.
///
/// With `kept`, the mount's FUSE connection is kept there for a daemon that replaces this one,
/// and a connection an earlier daemon kept for `dir` is taken over if it serves the same tree
/// (see [`takeover`]); one that cannot be is unmounted (`umount -l`) and `dir` mounted anew.
pub fn mount(
    fs: Arc<ImageFs>,
    dir: &Path,
    options: &MountOptions,
    runtime: tokio::runtime::Handle,
    kept: Option<&KeptConnections>,
) -> Result<Served, MountError> {
    let mount_error = |source| MountError::Mount {
        dir: dir.display().to_string(),
        source,
    };
    let name = kept.map(|_| ConnectionName::new(dir, &fs));
    if let (Some(kept), Some(name)) = (kept, &name)
        && kept.has(dir)
    {
        if let Some(fd) = kept.take(name, dir) {
            let filesystem = fuse::ImageFilesystem::new(fs.clone(), runtime.clone());
            match takeover::resume(filesystem, fd, fuser_config(&fs, options)) {
                Ok((session, resumed)) => {
                    tracing::info!("{}: took over the running mount", dir.display());
                    fs.stop_profile();
                    return Ok(Served {
                        session,
                        resumed: Some(resumed),
                    });
                }
                Err(e) => tracing::warn!(
                    "{}: taking over the running mount failed ({e}); mounting again, so                      readers of the old mount fail",
                    dir.display()
                ),
            }
            kept.forget(dir);
        }
        let _ = detach(dir);
    }
    check_not_mounted(dir)?;
    if !dir.is_dir() {
        return Err(MountError::NotADirectory {
            dir: dir.display().to_string(),
        });
    }
    let filesystem = fuse::ImageFilesystem::new(fs.clone(), runtime);
    let session =
        fuser::Session::new(filesystem, dir, &fuser_config(&fs, options)).map_err(mount_error)?;
    if let (Some(kept), Some(name)) = (kept, &name)
        && let Err(e) = kept.keep(name, session.as_fd())
    {
        tracing::warn!(
            "{}: cannot keep the FUSE connection for a restarted lazylayer ({e}); a restart \
             will break this mount's readers",
            dir.display()
        );
    }
    let session = session.spawn().map_err(mount_error)?;
    set_read_ahead(dir, options.read_ahead_kb);
    Ok(Served {
        session,
        resumed: None,
    })
}

/// fuser's settings for a mount of `fs`.
fn fuser_config(fs: &ImageFs, options: &MountOptions) -> Config {
    let mut mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("{FS_NAME_PREFIX}{}", fs.image.source)),
        MountOption::Subtype("lazylayer".into()),
        MountOption::DefaultPermissions,
    ];
    if options.suid_dev {
        mount_options.extend([MountOption::Suid, MountOption::Dev]);
    } else {
        mount_options.extend([MountOption::NoSuid, MountOption::NoDev]);
    }
    let mut config = Config::default();
    if options.allow_other {
        // fuser mounts with `allow_other` for this ACL, and also stops refusing (EACCES) the
        // requests of other users, which it does under its default, owner-only ACL whatever the
        // mount options say.
        config.acl = fuser::SessionACL::All;
    }
    config.mount_options = mount_options;
    config.n_threads = Some(options.threads.max(1));
    // Every worker reads the one descriptor: a cloned one would be private to this process, and
    // the requests in its queue would fail when the process dies (see `takeover`).
    config.clone_fd = false;
    config
}

/// Raises the mount's readahead through its backing device's sysfs entry (best effort: without
/// it reads still work, in smaller requests).
fn set_read_ahead(dir: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, kb.to_string()) {
        tracing::debug!("cannot set {knob}: {e}");
    }
}

/// The tasks that serve a mounted image besides FUSE: its stats socket (so `lazylayer stats DIR`
/// answers) and the timer that saves its start-up profile when the profile window closes.
pub struct Companions {
    socket: PathBuf,
    fs: Arc<ImageFs>,
    control: tokio::task::JoinHandle<()>,
    profile_timer: Option<tokio::task::JoinHandle<()>>,
}

impl Companions {
    /// Starts them for `fs` mounted at `dir`; call on the tokio runtime. `exits_on_unmount`:
    /// this process serves only this mount (see [`control::StatsReport::exits_on_unmount`]).
    pub fn start(fs: Arc<ImageFs>, dir: &Path, exits_on_unmount: bool) -> Companions {
        let socket = control_socket(dir);
        let control = match control::bind(&socket) {
            Ok(listener) => {
                let (socket, fs, dir) = (socket.clone(), fs.clone(), dir.to_path_buf());
                tokio::spawn(async move {
                    if let Err(e) = control::serve(listener, fs, dir, exits_on_unmount).await {
                        tracing::warn!("stats socket {}: {e}", socket.display());
                    }
                })
            }
            Err(e) => {
                tracing::warn!("stats socket {}: {e}", socket.display());
                tokio::spawn(async {})
            }
        };
        let profile_timer = fs.profile_window().map(|window| {
            let fs = fs.clone();
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                fs.save_profile();
            })
        });
        Companions {
            socket,
            fs,
            control,
            profile_timer,
        }
    }

    /// Stops them, saving the profile recorded so far.
    pub fn stop(self) {
        self.control.abort();
        if let Some(timer) = self.profile_timer {
            timer.abort();
        }
        self.fs.save_profile();
        self.fs.flush_cache();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Detaches a lazylayer mount at `dir` whose connection is dead (its daemon died and nothing
/// kept the connection: every access fails with `ENOTCONN`), saying so; whether it did. A live
/// mount that nobody serves at the moment would block the check: it gives up after a second and
/// leaves it.
pub fn detach_if_dead(dir: &Path) -> bool {
    if check_not_mounted(dir).is_ok() {
        return false;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let probed = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(
            std::fs::metadata(&probed)
                .err()
                .and_then(|e| e.raw_os_error()),
        );
    });
    let dead = matches!(
        rx.recv_timeout(std::time::Duration::from_secs(1)),
        Ok(Some(libc::ENOTCONN | libc::ECONNABORTED))
    );
    if dead {
        tracing::warn!(
            "{}: its lazylayer mount was dead (the daemon died and nothing kept its FUSE \
             connection); detached it to mount again. Processes that had files open there must \
             be restarted",
            dir.display()
        );
        let _ = detach(dir);
    }
    dead
}

/// Detaches whatever is mounted at `dir` (`umount -l`): it disappears from the tree at once and
/// is released when its last user goes. This also clears a mount whose daemon died.
pub fn detach(dir: &Path) -> Result<(), MountError> {
    umount(dir, libc::MNT_DETACH)
}

/// Unmounts whatever is mounted at `dir` (as `umount DIR` would).
pub fn unmount(dir: &Path) -> Result<(), MountError> {
    umount(dir, 0)
}

fn umount(dir: &Path, flags: libc::c_int) -> Result<(), MountError> {
    let err = |source| MountError::Unmount {
        dir: dir.display().to_string(),
        source,
    };
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(err(if e.raw_os_error() == Some(libc::EINVAL) {
        io::Error::other("not a mount point")
    } else {
        e
    }))
}

/// Where running mounts keep their control sockets (`LAZYLAYER_RUN_DIR` overrides, for tests
/// and unprivileged experiments).
pub fn run_dir() -> PathBuf {
    std::env::var_os("LAZYLAYER_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/lazylayer"))
}

/// Whether process `pid` still exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// How long an unmount waits for the process that served the mount to store its chunks and
/// profile and exit.
pub const SERVER_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// After an unmount: waits until the mount's server `pid` has exited or removed its control
/// `socket` (its last step), at most [`SERVER_EXIT_WAIT`]; whether it finished. A mount started
/// right after must find the chunks and the start-up profile that server stores on its way out.
pub fn wait_for_server(pid: u32, socket: &Path) -> bool {
    let deadline = std::time::Instant::now() + SERVER_EXIT_WAIT;
    while socket.exists() && alive(pid) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

/// The control socket of the mount at `dir`.
pub fn control_socket(dir: &Path) -> PathBuf {
    run_dir().join(format!("mount-{}.sock", mount_id(dir)))
}

/// A short name for the mount point `dir`: its absolute path, hashed (for socket, log and kept
/// connection names, which must be short and plain).
pub fn mount_id(dir: &Path) -> String {
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let digest = crate::model::digest::Digest::of(absolute.as_os_str().as_bytes());
    digest.hex()[..16].to_string()
}

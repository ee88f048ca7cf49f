//! The FUSE descriptor holder: a small process that keeps duplicates of the daemons' `/dev/fuse`
//! descriptors, so that a connection outlives the daemon that serves it.
//!
//! Outside systemd (which has its own store, see `systemd.rs`), the first daemon that keeps a
//! connection starts `lazylayer fuse-holder` in a session of its own (a crash or a `kill` of
//! the daemon's process group does not reach it). It does nothing but hold descriptors, so it has
//! nothing to crash on: one thread, one `poll` loop, no network, no image data.
//!
//! Protocol: one `SOCK_SEQPACKET` Unix socket in the run directory; each message is one line of
//! text, a descriptor travels beside it (`SCM_RIGHTS`):
//! - `KEEP NAME` + descriptor: hold it; the asking connection owns it. Answer `OK`.
//! - `TAKE NAME`: answer `FD NAME` + a duplicate, or `NONE`; the asking connection owns it now.
//! - `LIST`: answer `NAMES` and the names held, separated by spaces.
//! - `FORGET NAME`: close it. Answer `OK`.
//!
//! A connection whose owner is gone (its socket closed: the daemon exited or died) is an orphan
//! until a new daemon takes it; one not taken within [`ORPHAN_KEPT`] is closed, which ends it as
//! the old daemon's death would have (readers get `ENOTCONN`): a daemon that never comes back must
//! not leave readers blocked forever. A connection the kernel ended (unmounted, aborted) shows as
//! `POLLERR` on its descriptor and is dropped. With nothing held and nobody connected the holder
//! exits.
//!
//! The protocol is the contract between versions: an upgraded daemon talks to the holder an
//! older one started.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, listen, recvmsg, sendmsg, socket,
};
use tracing::{debug, info, warn};

/// How long a connection whose daemon is gone waits for a new one to take it: longer than any
/// restart (systemd's `RestartSec`, a crash loop's backoff, reopening an image), short enough
/// that readers of a mount nobody will serve again fail instead of hanging.
pub const ORPHAN_KEPT: Duration = Duration::from_secs(120);

/// How long a new holder waits for its first client before deciding it is not needed.
const FIRST_CLIENT_WAIT: Duration = Duration::from_secs(10);

/// Largest message: a `LIST` answer with a few thousand names.
const MAX_MESSAGE: usize = 256 * 1024;

/// The holder's socket in `run_dir`.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("fuse-holder.sock")
}

/// Sends `text` (and `fd`) as one message.
fn send(sock: RawFd, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let fds = fd.map(|fd| [fd.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    sendmsg::<()>(
        sock,
        &[IoSlice::new(text.as_bytes())],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message; `None` when the peer closed the connection.
fn receive(sock: RawFd) -> io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in this process for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
    Ok(Some((text, fds.into_iter().next())))
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// A connection held for a daemon.
struct Held {
    fd: OwnedFd,
    /// The client that kept or took it, while connected.
    owner: Option<u64>,
    /// Since when it has had no owner.
    orphaned: Option<Instant>,
}

/// Runs the holder on `socket` until it holds nothing and nobody is connected. Returns at once
/// if another holder already answers there.
pub fn serve(socket: &Path) -> io::Result<()> {
    if Client::connect(socket).is_ok() {
        debug!("a holder already serves {}", socket.display());
        return Ok(());
    }
    let _ = std::fs::remove_file(socket);
    let listener = seqpacket()?;
    bind(listener.as_raw_fd(), &UnixAddr::new(socket)?)?;
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listen(&listener, Backlog::new(64)?)?;
    info!("holding FUSE connections on {}", socket.display());
    let started = Instant::now();
    let mut next_client = 0u64;
    let mut clients: Vec<(u64, OwnedFd)> = Vec::new();
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    loop {
        let names: Vec<String> = held.keys().cloned().collect();
        let (listener_ready, client_ready, ended) = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                clients
                    .iter()
                    .map(|(_, c)| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
            );
            // No events asked: only POLLERR, which /dev/fuse reports once its connection ended.
            fds.extend(
                names
                    .iter()
                    .map(|n| PollFd::new(held[n].fd.as_fd(), PollFlags::empty())),
            );
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let client_ready: Vec<u64> = clients
                .iter()
                .zip(&fds[1..])
                .filter(|(_, f)| ready(f))
                .map(|((id, _), _)| *id)
                .collect();
            let ended: Vec<String> = names
                .iter()
                .zip(&fds[1 + clients.len()..])
                .filter(|(_, f)| ready(f))
                .map(|(n, _)| n.clone())
                .collect();
            (ready(&fds[0]), client_ready, ended)
        };
        for name in ended {
            held.remove(&name);
            debug!("connection {name} ended (unmounted): no longer held");
        }
        if listener_ready {
            match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(fd) => {
                    next_client += 1;
                    clients.push((next_client, unsafe { OwnedFd::from_raw_fd(fd) }));
                }
                Err(e) => warn!("fuse holder: accepting a client: {e}"),
            }
        }
        for id in client_ready {
            let Some(at) = clients.iter().position(|(c, _)| *c == id) else {
                continue;
            };
            let sock = clients[at].1.as_raw_fd();
            let handled = match receive(sock) {
                Ok(Some((text, fd))) => answer(&mut held, id, sock, text.trim(), fd),
                Ok(None) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Err(e) => Err(e),
            };
            if handled.is_err() {
                clients.remove(at);
                for (name, h) in held.iter_mut().filter(|(_, h)| h.owner == Some(id)) {
                    h.owner = None;
                    h.orphaned = Some(Instant::now());
                    info!(
                        "the daemon serving {name} is gone: holding its connection for a new one \
                         (at most {} s)",
                        ORPHAN_KEPT.as_secs()
                    );
                }
            }
        }
        let expired: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.orphaned.is_some_and(|t| t.elapsed() > ORPHAN_KEPT))
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            held.remove(&name);
            warn!(
                "no lazylayer took over FUSE connection {name} within {} s: closed it, so its \
                 readers fail (ENOTCONN) instead of waiting; unmount it (lazylayer umount DIR) \
                 and mount again",
                ORPHAN_KEPT.as_secs()
            );
        }
        if held.is_empty() && clients.is_empty() && started.elapsed() > FIRST_CLIENT_WAIT {
            let _ = std::fs::remove_file(socket);
            info!("nothing left to hold: exiting");
            return Ok(());
        }
    }
}

/// Handles one request from client `id`.
fn answer(
    held: &mut BTreeMap<String, Held>,
    id: u64,
    sock: RawFd,
    text: &str,
    fd: Option<OwnedFd>,
) -> io::Result<()> {
    let (verb, name) = text.split_once(' ').unwrap_or((text, ""));
    let valid = !name.is_empty() && !name.contains(char::is_whitespace);
    match (verb, fd) {
        ("KEEP", Some(fd)) if valid => {
            held.insert(
                name.to_string(),
                Held {
                    fd,
                    owner: Some(id),
                    orphaned: None,
                },
            );
            debug!("holding connection {name}");
            send(sock, "OK", None)
        }
        ("TAKE", None) if valid => match held.get_mut(name) {
            Some(h) => {
                h.owner = Some(id);
                h.orphaned = None;
                info!("connection {name} taken over by a new daemon");
                send(sock, &format!("FD {name}"), Some(h.fd.as_fd()))
            }
            None => send(sock, "NONE", None),
        },
        ("LIST", None) => {
            let names: Vec<&str> = held.keys().map(String::as_str).collect();
            send(sock, &format!("NAMES {}", names.join(" ")), None)
        }
        ("FORGET", None) if valid => {
            held.remove(name);
            send(sock, "OK", None)
        }
        _ => send(sock, "ERROR unknown request", None),
    }
}

/// One connection to the holder.
struct Client {
    sock: OwnedFd,
}

impl Client {
    fn connect(path: &Path) -> io::Result<Client> {
        let sock = seqpacket()?;
        connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(Client { sock })
    }

    /// Sends one request and reads its answer.
    fn ask(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<(String, Option<OwnedFd>)> {
        send(self.sock.as_raw_fd(), text, fd)?;
        receive(self.sock.as_raw_fd())?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the fuse holder exited"))
    }
}

/// A daemon's side of the holder: keeps, takes and forgets connections; starts the holder when
/// none runs, and starts a new one (giving it every connection again) if it dies.
pub struct Holder {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    client: Mutex<Client>,
    /// This process's own duplicates of what it kept, to hand to a new holder.
    kept: Mutex<BTreeMap<String, OwnedFd>>,
}

impl Holder {
    /// Connects to the holder at `path`, starting one if none answers.
    pub fn start(path: &Path) -> io::Result<Holder> {
        let client = match Client::connect(path) {
            Ok(client) => client,
            Err(_) => spawn(path)?,
        };
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            client: Mutex::new(client),
            kept: Mutex::new(BTreeMap::new()),
        });
        let watched = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("fuse-holder-watch".into())
            .spawn(move || watch(watched))?;
        Ok(Holder { inner })
    }

    /// Connects to a holder already running at `path`, if one is.
    pub fn existing(path: &Path) -> Option<Holder> {
        let client = Client::connect(path).ok()?;
        Some(Holder {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                client: Mutex::new(client),
                kept: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    fn ask(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<(String, Option<OwnedFd>)> {
        self.inner.client.lock().unwrap().ask(text, fd)
    }

    pub fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let ours = fd.try_clone_to_owned()?;
        let (answer, _) = self.ask(&format!("KEEP {name}"), Some(fd))?;
        expect_ok(&answer)?;
        self.inner
            .kept
            .lock()
            .unwrap()
            .insert(name.to_string(), ours);
        Ok(())
    }

    pub fn take(&self, name: &str) -> io::Result<Option<OwnedFd>> {
        match self.ask(&format!("TAKE {name}"), None)? {
            (answer, Some(fd)) if answer.starts_with("FD ") => {
                let ours = fd.try_clone()?;
                self.inner
                    .kept
                    .lock()
                    .unwrap()
                    .insert(name.to_string(), ours);
                Ok(Some(fd))
            }
            (answer, _) if answer == "NONE" => Ok(None),
            (answer, _) => Err(io::Error::other(format!("fuse holder answered {answer:?}"))),
        }
    }

    pub fn names(&self) -> io::Result<Vec<String>> {
        let (answer, _) = self.ask("LIST", None)?;
        let names = answer
            .strip_prefix("NAMES")
            .ok_or_else(|| io::Error::other(format!("fuse holder answered {answer:?}")))?;
        Ok(names.split_whitespace().map(String::from).collect())
    }

    pub fn forget(&self, name: &str) -> io::Result<()> {
        self.inner.kept.lock().unwrap().remove(name);
        let (answer, _) = self.ask(&format!("FORGET {name}"), None)?;
        expect_ok(&answer)
    }
}

fn expect_ok(answer: &str) -> io::Result<()> {
    match answer {
        "OK" => Ok(()),
        other => Err(io::Error::other(format!("fuse holder answered {other:?}"))),
    }
}

/// Starts `lazylayer fuse-holder` for `path` in a session of its own and connects to it.
fn spawn(path: &Path) -> io::Result<Client> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path.with_extension("log"))?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("fuse-holder")
        .env("LAZYLAYER_RUN_DIR", path.parent().unwrap_or(Path::new("/")))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the holder from our session and process
    // group, so signals meant for the daemon (a terminal's Ctrl-C, `kill -- -PGID`) miss it.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(client) = Client::connect(path) {
            // Reaped by nobody: it outlives us by design, and init adopts it when we exit.
            std::mem::forget(child);
            return Ok(client);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(io::Error::other(format!(
                "the fuse holder exited at start ({status}); see {}",
                path.with_extension("log").display()
            )));
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "the fuse holder did not start within 5 s; see {}",
                path.with_extension("log").display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the holder to go away (its end of our socket closes) and replaces it: a new holder
/// gets every connection this process kept, so that a later crash of ours still finds them.
fn watch(inner: std::sync::Weak<Inner>) {
    loop {
        let watched = {
            let Some(inner) = inner.upgrade() else { return };
            let client = inner.client.lock().unwrap();
            match client.sock.try_clone() {
                Ok(fd) => fd,
                Err(_) => return,
            }
        };
        // POLLRDHUP only: answers to requests do not wake us, the holder's exit does.
        let mut fds = [PollFd::new(
            watched.as_fd(),
            PollFlags::from_bits_retain(libc::POLLRDHUP),
        )];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        let mut client = inner.client.lock().unwrap();
        if !same_socket(&client.sock, &watched) {
            // Already replaced.
            continue;
        }
        warn!(
            "the fuse holder ({}) exited: its FUSE connections were lost, unless this process \
             lives on; starting a new holder and giving it this process's connections",
            inner.path.display()
        );
        match spawn(&inner.path) {
            Ok(new) => {
                *client = new;
                let kept = inner.kept.lock().unwrap();
                for (name, fd) in kept.iter() {
                    if let Err(e) = client
                        .ask(&format!("KEEP {name}"), Some(fd.as_fd()))
                        .and_then(|(a, _)| expect_ok(&a))
                    {
                        warn!("giving connection {name} to the new fuse holder: {e}");
                    }
                }
                info!(
                    "the new fuse holder keeps this process's {} connection(s)",
                    kept.len()
                );
            }
            Err(e) => {
                warn!(
                    "starting a new fuse holder: {e}; mounts will not survive a restart of this \
                     process"
                );
                return;
            }
        }
    }
}

/// Whether two descriptors are the same open socket.
fn same_socket(a: &OwnedFd, b: &OwnedFd) -> bool {
    use std::os::unix::fs::MetadataExt;
    let meta = |fd: &OwnedFd| {
        std::fs::File::from(fd.try_clone().ok()?)
            .metadata()
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    meta(a).is_some() && meta(a) == meta(b)
}

//! A real containerd (Debian's 1.6) with its own root, state and socket under a temp dir, used
//! with `ctr-remote` (Debian's stargz-snapshotter) as the reference eStargz and zstd:chunked
//! writer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::{Registry, RegistryAuth, poll_until, require_tool, wait_until};

pub struct Containerd {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

/// Lazy formats the reference writer produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LazyFormat {
    Estargz,
    ZstdChunked,
}

impl LazyFormat {
    pub fn flag(self) -> &'static str {
        match self {
            LazyFormat::Estargz => "--estargz",
            LazyFormat::ZstdChunked => "--zstdchunked",
        }
    }

    pub fn tag_suffix(self) -> &'static str {
        match self {
            LazyFormat::Estargz => "esgz",
            LazyFormat::ZstdChunked => "zstdchunked",
        }
    }
}

impl Containerd {
    pub fn start() -> Containerd {
        Containerd::start_with(None)
    }

    /// Starts containerd with a `[proxy_plugins]` entry named `lazylayer` of type `snapshot`
    /// for the snapshotter listening on `snapshotter`.
    pub fn with_snapshotter(snapshotter: &std::path::Path) -> Containerd {
        Containerd::start_with(Some(snapshotter))
    }

    fn start_with(snapshotter: Option<&std::path::Path>) -> Containerd {
        let mut config = "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string();
        if let Some(address) = snapshotter {
            config += &format!(
                "[proxy_plugins]\n  [proxy_plugins.lazylayer]\n    type = \"snapshot\"\n    \
                 address = \"{}\"\n",
                address.display()
            );
        }
        Containerd::start_config(tempfile::tempdir().unwrap(), &config)
    }

    /// Starts containerd with its CRI plugin, configured by the fragment users are told to
    /// merge (deploy/containerd/config.toml) with the test's paths put in: every image through
    /// `snapshotter`, registry hosts from `hosts_dir`, and `sandbox_image` as the pause image.
    /// The CRI API is served on [`Containerd::socket`]. OOM score adjustments are kept at or
    /// above containerd's own: the test machines refuse the pause container's -998.
    pub fn with_cri(
        snapshotter: &Snapshotter,
        hosts_dir: &Path,
        sandbox_image: &str,
    ) -> Containerd {
        let fragment = include_str!("../../deploy/containerd/config.toml")
            .replace("version = 2\n", "")
            .replace(
                "/run/lazylayer/snapshotter.sock",
                snapshotter.socket.to_str().unwrap(),
            )
            .replace(
                "/var/lib/lazylayer/snapshotter",
                snapshotter.root().to_str().unwrap(),
            )
            .replace("/etc/containerd/certs.d", hosts_dir.to_str().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "{fragment}\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{sandbox_image}\"\n  \
             root_dir = \"{}\"\n  restrict_oom_score_adj = true\n",
            dir.path().join("cri").display()
        );
        Containerd::start_config(dir, &config)
    }

    /// Starts containerd with `config` (top-level keys first, then tables) between the lines
    /// that give it its own root, state and socket under `dir`.
    fn start_config(dir: tempfile::TempDir, config: &str) -> Containerd {
        require_tool("containerd");
        require_tool("ctr-remote");
        let socket = dir.path().join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{config}\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            sock = socket.display(),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let containerd = Containerd { child, dir, socket };
        wait_until(
            Duration::from_secs(20),
            || containerd.ctr(&["version"]).status.success(),
            || {
                let log = std::fs::read_to_string(containerd.dir.path().join("containerd.log"));
                format!("containerd did not start: {}", log.unwrap_or_default())
            },
        );
        containerd
    }

    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr-remote")
            .arg("-a")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `ctr-remote ARGS` and returns its standard output; panics with its errors.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr-remote {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The end of containerd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "\n--- containerd log (last 30 lines) ---\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// Waits (at most `timeout`) until containerd answers snapshot calls through the `lazylayer`
    /// proxy plugin again: it redials a restarted snapshotter with backoff (at most 3 s between
    /// attempts in 1.6), and its calls fail with "unavailable" until it has.
    pub fn wait_until_reconnected(&self, timeout: Duration) {
        wait_until(
            timeout,
            || {
                let ls = ["snapshots", "--snapshotter", "lazylayer", "ls"];
                self.ctr(&ls).status.success()
            },
            || "containerd did not reconnect to the restarted snapshotter".into(),
        );
    }

    /// Waits (at most `timeout`) until task `id` no longer runs, then deletes the task.
    pub fn wait_for_task_exit(&self, id: &str, timeout: Duration) {
        wait_until(
            timeout,
            || {
                let out = self.ctr(&["task", "ls"]);
                let listing = String::from_utf8_lossy(&out.stdout);
                !listing
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(id) && l.contains("RUNNING"))
            },
            || format!("task {id} did not stop"),
        );
        let _ = self.ctr(&["task", "rm", id]);
    }

    /// Pulls `REPO:latest` from `registry`, converts it with `ctr-remote image convert` to
    /// `format`, and pushes the result as `REPO:<suffix>`. Returns the pushed reference.
    pub fn convert(&self, registry: &Registry, repo: &str, format: LazyFormat) -> String {
        let src = format!("{}/{repo}:latest", registry.host());
        let dst = format!("{}/{repo}:{}", registry.host(), format.tag_suffix());
        self.ctr_ok(&["images", "pull", "--plain-http", &src]);
        self.ctr_ok(&["image", "convert", format.flag(), "--oci", &src, &dst]);
        // A push through loopback has failed once in a full run with "unexpected EOF" from
        // the registry connection; pushing again is harmless (blobs already there are skipped).
        let push = ["image", "push", "--plain-http", &dst];
        for _ in 0..2 {
            if self.ctr(&push).status.success() {
                return dst;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        self.ctr_ok(&push);
        dst
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// python-app pushed to a fresh registry and converted to eStargz by ctr-remote; the registry
/// and the eStargz reference.
pub fn python_app_as_estargz() -> (Registry, String) {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let containerd = Containerd::start();
    let estargz = containerd.convert(&registry, "test/app", LazyFormat::Estargz);
    (registry, estargz)
}

/// `lazylayer snapshotter` on its own socket and root, with its own cache; killed on drop.
pub struct Snapshotter {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// More `snapshotter` flags, kept for restarts.
    extra: Vec<String>,
}

impl Snapshotter {
    pub fn start() -> Snapshotter {
        Snapshotter::start_with(&[])
    }

    /// As [`Snapshotter::start`], with more flags.
    pub fn start_with(extra: &[&str]) -> Snapshotter {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("snapshotter.sock");
        let mut snapshotter = Snapshotter {
            child: None,
            dir,
            socket,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        snapshotter.restart();
        snapshotter
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Starts the process (again), and waits until its socket accepts connections.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("snapshotter.log"))
            .unwrap();
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("snapshotter")
            .arg("--address")
            .arg(&self.socket)
            .arg("--root")
            .arg(self.root())
            .arg("--cache-dir")
            .arg(self.cache())
            .args(["--no-background-fetch", "--profile-window", "0"])
            .args(&self.extra)
            .env("LAZYLAYER_CONFIG", "/dev/null")
            .env("LAZYLAYER_RUN_DIR", self.dir.path().join("run"))
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env("LAZYLAYER_LOG", "lazylayer=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start lazylayer snapshotter");
        self.child = Some(child);
        wait_until(
            Duration::from_secs(30),
            || std::os::unix::net::UnixStream::connect(&self.socket).is_ok(),
            || format!("snapshotter did not start: {}", self.log()),
        );
    }

    /// Kills the process with SIGKILL, leaving its mounts behind as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM, as `systemctl stop` or an upgrade does, and waits for
    /// it to exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// The run directory: control sockets, and the fuse holder's socket and log.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("snapshotter.log")).unwrap_or_default()
    }

    /// Mount points of our FUSE mounts under this snapshotter's root.
    pub fn fuse_mounts(&self) -> Vec<PathBuf> {
        let root = self.root();
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(' ');
                let (source, dir) = (fields.next()?, fields.next()?);
                (source.starts_with("lazylayer:") && dir.starts_with(root.to_str()?))
                    .then(|| PathBuf::from(dir))
            })
            .collect()
    }

    /// Runs `lazylayer ARGS` with this snapshotter's run directory (for `stats`).
    /// The snapshotter's disk cache directory.
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn lazylayer(&self, args: &[&str]) -> super::Run {
        let run_dir = self.dir.path().join("run");
        super::lazylayer(args, &[("LAZYLAYER_RUN_DIR", run_dir.to_str().unwrap())])
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: it unmounts what it mounted.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self.fuse_mounts() {
            let path = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// `lazylayer cri-proxy` in front of a containerd's CRI image service; killed on drop.
pub struct CriProxy {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl CriProxy {
    /// Starts the proxy on `socket` (chosen ahead, for the snapshotter's `--cri-proxy`).
    pub fn start(containerd: &Containerd, socket: PathBuf) -> CriProxy {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("cri-proxy.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("cri-proxy")
            .arg("--address")
            .arg(&socket)
            .arg("--backend")
            .arg(&containerd.socket)
            .env("LAZYLAYER_LOG", "lazylayer=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start lazylayer cri-proxy");
        let proxy = CriProxy { child, dir, socket };
        wait_until(
            Duration::from_secs(20),
            || std::os::unix::net::UnixStream::connect(&proxy.socket).is_ok(),
            || format!("cri-proxy did not start: {}", proxy.log()),
        );
        proxy
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cri-proxy.log")).unwrap_or_default()
    }
}

impl Drop for CriProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

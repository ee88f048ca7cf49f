//! A real containerd (Debian's 1.6) with its own root, state and socket under a temp dir, used
//! with `ctr-remote` (Debian's stargz-snapshotter) as the reference eStargz and zstd:chunked
//! writer.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{Registry, RegistryAuth, require_tool};

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
        require_tool("containerd");
        require_tool("ctr-remote");
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if containerd.ctr(&["version"]).status.success() {
                return containerd;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "containerd did not start: {}",
            std::fs::read_to_string(containerd.dir.path().join("containerd.log"))
                .unwrap_or_default()
        );
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr-remote")
            .arg("-a")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn ctr_ok(&self, args: &[&str]) {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr-remote {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Pulls `REPO:latest` from `registry`, converts it with `ctr-remote image convert` to
    /// `format`, and pushes the result as `REPO:<suffix>`. Returns the pushed reference.
    pub fn convert(&self, registry: &Registry, repo: &str, format: LazyFormat) -> String {
        let src = format!("{}/{repo}:latest", registry.host());
        let dst = format!("{}/{repo}:{}", registry.host(), format.tag_suffix());
        self.ctr_ok(&["images", "pull", "--plain-http", &src]);
        self.ctr_ok(&["image", "convert", format.flag(), "--oci", &src, &dst]);
        self.ctr_ok(&["image", "push", "--plain-http", &dst]);
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

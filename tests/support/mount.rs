//! A `lazylayer mount --daemon` for tests, unmounted when dropped (even when the test fails), so
//! no mount outlives its test.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{lazylayer, poll_until, wait_until};

pub struct Mounted {
    pub dir: tempfile::TempDir,
    /// Control sockets and daemon logs of this mount.
    pub run_dir: tempfile::TempDir,
    /// The disk cache, when the mount has its own.
    _cache: Option<tempfile::TempDir>,
}

impl Mounted {
    /// Mounts `reference` in the background with a fresh disk cache of its own and returns once
    /// it serves.
    pub fn new(reference: &str) -> Mounted {
        let cache = tempfile::tempdir().unwrap();
        let mut mounted = Mounted::with_cache(reference, cache.path());
        mounted._cache = Some(cache);
        mounted
    }

    /// Mounts `reference` using the disk cache at `cache_dir` (shared between mounts to test
    /// what survives a remount).
    pub fn with_cache(reference: &str, cache_dir: &Path) -> Mounted {
        Mounted::with_args(reference, cache_dir, &[])
    }

    /// As [`Mounted::with_cache`], with more `mount` options.
    pub fn with_args(reference: &str, cache_dir: &Path, extra: &[&str]) -> Mounted {
        Mounted::with_env(reference, cache_dir, extra, &[])
    }

    /// As [`Mounted::with_args`], with more environment for the daemon (credentials).
    pub fn with_env(
        reference: &str,
        cache_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "mount",
            "--daemon",
            "--cache-dir",
            cache_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.extend([reference, dir.path().to_str().unwrap()]);
        let mut envs = vec![("LAZYLAYER_RUN_DIR", run_dir.path().to_str().unwrap())];
        envs.extend_from_slice(env);
        let run = lazylayer(&args, &envs);
        assert!(
            run.status.success(),
            "mount {reference} failed: {}",
            run.stderr
        );
        Mounted {
            dir,
            run_dir,
            _cache: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    /// `lazylayer stats --json` of this mount.
    pub fn stats(&self) -> Value {
        let run = lazylayer(
            &["stats", "--json", self.path().to_str().unwrap()],
            &[("LAZYLAYER_RUN_DIR", self.run_dir.path().to_str().unwrap())],
        );
        assert!(
            run.status.success(),
            "stats failed: {}\ndaemon log:\n{}",
            run.stderr,
            self.daemon_log()
        );
        run.json()
    }

    /// The daemon's log, for failure messages.
    pub fn daemon_log(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.run_dir.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|x| x == "log") {
                out += &std::fs::read_to_string(entry.path()).unwrap_or_default();
            }
        }
        out
    }

    /// Runs python-app's `python3 /app/main.py` chrooted into the mount and asserts it prints
    /// `app ok`.
    pub fn run_app(&self) {
        let out = Command::new("chroot")
            .arg(self.path())
            .args(["python3", "/app/main.py"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("app ok"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Bytes fetched so far and the compressed size of all layers, from `stats`.
    pub fn fetched_and_total(&self) -> (u64, u64) {
        fetched_and_total(&self.stats())
    }

    /// Waits until the mount reports its prioritised files (landmark, learned profile)
    /// prefetched; fails the test after `timeout`.
    pub fn wait_until_prefetched(&self, timeout: std::time::Duration) {
        wait_until(
            timeout,
            || self.stats()["profile_prefetched"] == true,
            || "prefetch of prioritised files did not finish".into(),
        );
    }

    /// Whether the kernel still lists the mount.
    pub fn is_mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = self.path().to_str().unwrap();
        mounts.lines().any(|l| l.split(' ').nth(4) == Some(dir))
    }
}

impl Drop for Mounted {
    /// Unmounts with `lazylayer umount`; if that fails or hangs (a test failed with reads
    /// stuck), detaches the mount lazily so nothing is left behind either way.
    fn drop(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("umount")
            .arg(self.path())
            // Where the mount's control socket is: `umount` asks it which daemon to wait for.
            .env("LAZYLAYER_RUN_DIR", self.run_dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut status = None;
        let ms = std::time::Duration::from_millis;
        poll_until(ms(10_000), ms(50), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        let unmounted = match status {
            Some(status) => status.success(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        };
        if !unmounted && self.is_mounted() {
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}

/// Bytes fetched and the compressed size of all layers, from a `lazylayer stats --json` report.
pub fn fetched_and_total(stats: &Value) -> (u64, u64) {
    let total = stats["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    (stats["fetched_bytes"].as_u64().unwrap(), total)
}

//! `netem-proxy` (tools/netem-proxy) in front of a real server, injecting faults; stopped when
//! dropped. Its per-request log tells a test what was injected.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct FaultProxy {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl FaultProxy {
    /// Starts a proxy to `127.0.0.1:upstream` with netem-proxy's fault options `args`.
    pub fn start(upstream: u16, args: &[&str]) -> FaultProxy {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_netem-proxy"))
            .arg("--upstream")
            .arg(format!("127.0.0.1:{upstream}"))
            .arg("--log")
            .arg(&log)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start netem-proxy");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("netem-proxy did not start: {line:?}"));
        FaultProxy {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// The logged requests: `(method, path, outcome, carried Authorization)`.
    pub fn requests(&self) -> Vec<(String, String, String, bool)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                (f.len() == 6).then(|| {
                    (
                        f[1].to_string(),
                        f[2].to_string(),
                        f[3].to_string(),
                        f[4] == "auth",
                    )
                })
            })
            .collect()
    }

    /// The logged requests' paths and when each arrived (milliseconds since the proxy started).
    pub fn arrivals(&self) -> Vec<(String, u64)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                Some((f.get(2)?.to_string(), f.get(5)?.parse().ok()?))
            })
            .collect()
    }

    /// Requests seen so far, per outcome (`ok` or the fault's name).
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (_, _, outcome, _) in self.requests() {
            *counts.entry(outcome).or_default() += 1;
        }
        counts
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A real S3 server on loopback: `s3s-fs` (crate s3s-fs, installed by tools/setup), which serves
//! the directories under its root as buckets and verifies SigV4 signatures against one key pair.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, require_tool, wait_until};

pub const ACCESS_KEY: &str = "lazylayer-test";
pub const SECRET_KEY: &str = "lazylayer-test-secret";

pub struct S3Server {
    child: Child,
    pub port: u16,
    /// Buckets are directories here, objects files under them.
    pub root: tempfile::TempDir,
    /// The server's log.
    pub log: tempfile::NamedTempFile,
}

impl S3Server {
    pub fn start() -> S3Server {
        require_tool("s3s-fs");
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start s3s-fs");
        let server = S3Server {
            child,
            port,
            root,
            log,
        };
        wait_until(
            Duration::from_secs(15),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            || "s3s-fs did not start".into(),
        );
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket and copies the OCI layout at `layout` under `prefix` in it.
    pub fn put_layout(&self, bucket: &str, prefix: &str, layout: &Path) {
        let dest = self.root.path().join(bucket).join(prefix);
        std::fs::create_dir_all(&dest).unwrap();
        copy_dir(layout, &dest);
    }

    /// Environment for a lazylayer command that reads from this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".to_string()),
            // No stray profile of the machine may change what a test sees.
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_string()),
            ("AWS_CONFIG_FILE", "/nonexistent".to_string()),
        ]
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target: PathBuf = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Test support: real components on loopback (Debian's docker-registry, skopeo), a token server
//! for the registry's bearer-token auth, and a tiny HTTP server for the few cases no real
//! component can produce (wrong bytes, redirects to another host, a stalled connection).
//!
//! Every process and directory is owned by a value whose `Drop` stops or removes it, so a
//! failing test leaves nothing behind. Ports are picked free per test so tests run in parallel.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod conformance;
pub mod containerd;
pub mod http;
pub mod mount;
pub mod proxy;
pub mod s3;
pub mod token;

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The shared OCI image layout with `debian-bookworm`, `python3` and `python-app`.
pub fn shared_images() -> PathBuf {
    let dir = std::env::var_os("LAZYLAYER_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/images"));
    assert!(
        dir.join("index.json").exists(),
        "test images not found at {} (set LAZYLAYER_IMAGES to the OCI layout of ../shared/images)",
        dir.display()
    );
    dir
}

/// Tags in the shared layout, with their manifest digests, from its `index.json`.
pub fn shared_tags() -> Vec<(String, String)> {
    let index: Value =
        serde_json::from_slice(&std::fs::read(shared_images().join("index.json")).unwrap())
            .unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The manifest digest of `tag` in the shared layout.
pub fn shared_manifest_digest(tag: &str) -> String {
    shared_tags()
        .into_iter()
        .find(|(t, _)| t == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in shared images"))
        .1
}

/// The digest of layer `index` (bottom = 0) of `tag` in the shared layout.
pub fn shared_layer(tag: &str, index: usize) -> String {
    shared_json(&shared_manifest_digest(tag))["layers"][index]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("{tag} has no layer {index}"))
        .to_string()
}

/// Reads a blob of the shared layout by digest (`sha256:...`).
pub fn shared_blob(digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::read(shared_images().join("blobs/sha256").join(hex)).unwrap()
}

/// Parses a blob of the shared layout as JSON.
pub fn shared_json(digest: &str) -> Value {
    serde_json::from_slice(&shared_blob(digest)).unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails the test with a clear message when a required system tool is missing.
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{name}` is not installed: run `bash tools/setup` first"
    );
}

/// How a test registry authenticates clients.
pub enum RegistryAuth {
    None,
    /// htpasswd file with one bcrypt user.
    Htpasswd {
        user: String,
        password: String,
    },
    /// Bearer tokens from a token server, verified with `cert` (PEM).
    Token {
        realm: String,
        service: String,
        issuer: String,
        cert: PathBuf,
    },
}

/// A CA made with openssl for a test, and what it signed: a server certificate for 127.0.0.1
/// and a client certificate.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestCa {
    pub fn new() -> TestCa {
        require_tool("openssl");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = ["-newkey", "rsa:2048", "-nodes"];
        openssl(
            &[
                &["req", "-x509"][..],
                &key,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=lazylayer-test-ca",
                ],
            ]
            .concat(),
        );
        std::fs::write(d.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        // Extensions make the certificate X.509 v3, which rustls (webpki) requires.
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=client")] {
            let (k, csr, crt) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
            );
            openssl(
                &[
                    &["req"][..],
                    &key,
                    &["-keyout", &k, "-out", &csr, "-subj", subject],
                ]
                .concat(),
            );
            let mut sign = vec![
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
            ];
            let ext = format!("{name}.ext");
            sign.extend(["-extfile", &ext]);
            openssl(&sign);
        }
        TestCa {
            ca: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            dir,
        }
    }
}

/// A running Debian `docker-registry` (distribution 2.8) with filesystem storage.
pub struct Registry {
    child: Child,
    pub port: u16,
    /// Config, logs and (unless shared) storage live here.
    pub dir: tempfile::TempDir,
    pub storage: PathBuf,
}

impl Registry {
    /// Starts a registry with its own empty storage.
    pub fn start(auth: RegistryAuth) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("data");
        Registry::start_on(storage, auth, dir)
    }

    /// Starts a second registry process over the storage of `other` (read-only use), so that
    /// auth variants can serve already-pushed images without pushing again.
    pub fn start_sharing(other: &Registry, auth: RegistryAuth) -> Registry {
        Registry::start_on(other.storage.clone(), auth, tempfile::tempdir().unwrap())
    }

    /// As [`Registry::start_sharing`], serving HTTPS with `tls` (and asking clients for a
    /// certificate signed by `tls.client_ca` when there is one).
    pub fn start_tls_sharing(other: &Registry, tls: &TestCa, client_ca: bool) -> Registry {
        let storage_yaml = format!(
            "storage: {{filesystem: {{rootdirectory: {}}}}}\n",
            other.storage.display()
        );
        let clientcas = if client_ca {
            format!(", clientcas: [{}]", tls.ca.display())
        } else {
            String::new()
        };
        let http = format!(
            ", tls: {{certificate: {}, key: {}{clientcas}}}",
            tls.server_cert.display(),
            tls.server_key.display()
        );
        Registry::start_with(
            other.storage.clone(),
            storage_yaml,
            RegistryAuth::None,
            tempfile::tempdir().unwrap(),
            (&http, ""),
        )
    }

    /// A pull-through cache of `origin` (distribution's proxy mode), with storage of its own: a
    /// node's registry mirror.
    pub fn start_mirror_of(origin: &Registry) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("data");
        let storage_yaml = format!(
            "storage: {{filesystem: {{rootdirectory: {}}}}}\n",
            storage.display()
        );
        let proxy = format!("proxy: {{remoteurl: \"http://{}\"}}\n", origin.host());
        Registry::start_with(storage, storage_yaml, RegistryAuth::None, dir, ("", &proxy))
    }

    /// Starts a registry whose storage is S3 (`bucket` at `endpoint`) with blob GETs answered
    /// by redirects to pre-signed S3 URLs, as registries in front of object stores run.
    /// `storage` is where the bucket's objects live on disk, for `blob_data_path`.
    pub fn start_on_s3(
        endpoint: &str,
        bucket: &str,
        keys: (&str, &str),
        storage: PathBuf,
        auth: RegistryAuth,
    ) -> Registry {
        let storage_yaml = format!(
            "storage:\n  s3: {{accesskey: {}, secretkey: {}, region: us-east-1, regionendpoint: \"{endpoint}\", bucket: {bucket}, secure: false, v4auth: true, rootdirectory: /}}\n  redirect: {{disable: false}}\n",
            keys.0, keys.1
        );
        Registry::start_with(
            storage,
            storage_yaml,
            auth,
            tempfile::tempdir().unwrap(),
            ("", ""),
        )
    }

    fn start_on(storage: PathBuf, auth: RegistryAuth, dir: tempfile::TempDir) -> Registry {
        let storage_yaml = format!(
            "storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n",
            storage.display()
        );
        Registry::start_with(storage, storage_yaml, auth, dir, ("", ""))
    }

    /// `extra`: more of the `http` map (`, tls: {...}`), and more top-level config.
    fn start_with(
        storage: PathBuf,
        storage_yaml: String,
        auth: RegistryAuth,
        dir: tempfile::TempDir,
        extra: (&str, &str),
    ) -> Registry {
        require_tool("docker-registry");
        std::fs::create_dir_all(&storage).unwrap();
        let port = free_port();
        let auth_yaml = match auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Htpasswd { user, password } => {
                require_tool("htpasswd");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", &user, &password])
                    .output()
                    .unwrap();
                assert!(out.status.success());
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, out.stdout).unwrap();
                format!(
                    "auth: {{htpasswd: {{realm: basic-realm, path: {}}}}}\n",
                    path.display()
                )
            }
            RegistryAuth::Token {
                realm,
                service,
                issuer,
                cert,
            } => format!(
                "auth: {{token: {{realm: \"{realm}\", service: {service}, issuer: {issuer}, rootcertbundle: {}}}}}\n",
                cert.display()
            ),
        };
        let config = format!(
            "version: 0.1\nlog: {{level: info}}\n{storage_yaml}http: {{addr: 127.0.0.1:{port}{}}}\n{auth_yaml}{}",
            extra.0, extra.1
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Registry::spawn(dir.path());
        let registry = Registry {
            child,
            port,
            dir,
            storage,
        };
        registry.wait_ready();
        registry
    }

    /// Runs `docker-registry` with the config in `dir`, appending to its log there.
    fn spawn(dir: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("registry.log"))
            .unwrap();
        Command::new("docker-registry")
            // The AWS SDK in distribution refuses to start with a CA bundle it cannot load into
            // its transport; the tests' S3 is plain HTTP anyway.
            .env_remove("AWS_CA_BUNDLE")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry")
    }

    /// Kills the registry process (SIGKILL): its port refuses connections until
    /// [`Registry::start_again`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again on the same port and storage after [`Registry::kill`].
    pub fn start_again(&mut self) {
        self.child = Registry::spawn(self.dir.path());
        self.wait_ready();
    }

    fn wait_ready(&self) {
        wait_until(
            Duration::from_secs(15),
            || http_get_status(self.port, "/v2/").is_some(),
            || {
                format!(
                    "registry on port {} did not start; log:\n{}",
                    self.port,
                    self.log()
                )
            },
        );
    }

    /// Where the registry's filesystem storage keeps a blob (`sha256:...`), for tests that
    /// damage it behind the registry's back.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Freezes the registry process (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&self) {
        let ok = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status();
        assert!(ok.unwrap().success());
    }

    pub fn resume(&self) {
        let ok = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        assert!(ok.unwrap().success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Lines in the log so far: a mark for [`Registry::requests_since`].
    pub fn log_mark(&self) -> usize {
        self.log().lines().count()
    }

    /// Requests in the access log after its first `from` lines that match `pattern`.
    pub fn requests_since(&self, from: usize, pattern: &str) -> Vec<String> {
        self.log()
            .lines()
            .skip(from)
            .filter(|l| l.starts_with("127.0.0.1 - ") && l.contains(pattern))
            .map(str::to_string)
            .collect()
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `tag` of the shared layout to `REPO:latest` with skopeo.
    pub fn push_shared(&self, tag: &str, repo: &str) {
        self.push_shared_as(tag, repo, "latest");
    }

    pub fn push_shared_as(&self, tag: &str, repo: &str, dest_tag: &str) {
        require_tool("skopeo");
        let out = Command::new("skopeo")
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", shared_images().display()))
            .arg(format!("docker://{}/{repo}:{dest_tag}", self.host()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo push of {tag} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Uploads `body` as a blob of `repo` with the registry's own API (a monolithic upload),
    /// returning its digest.
    pub fn put_blob(&self, repo: &str, body: &[u8]) -> String {
        let digest = format!("sha256:{}", sha256_hex(body));
        let started = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%header{location}",
                "-X",
                "POST",
            ])
            .arg(format!("http://{}/v2/{repo}/blobs/uploads/", self.host()))
            .output()
            .unwrap();
        let location = String::from_utf8_lossy(&started.stdout).trim().to_string();
        assert!(!location.is_empty(), "no upload location: {started:?}");
        let location = if location.starts_with('/') {
            format!("http://{}{location}", self.host())
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let file = self.dir.path().join("blob-upload");
        std::fs::write(&file, body).unwrap();
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/stderr",
                "-w",
                "%{http_code}",
                "-X",
                "PUT",
            ])
            .args(["-H", "Content-Type: application/octet-stream"])
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(format!("{location}{separator}digest={digest}"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "201",
            "PUT blob failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        digest
    }

    /// Pushes a linux/amd64 image of gzip `layers` (bottom first) as `repo:tag` with the given
    /// config `diff_ids` (the right ones when `None`: the digests of the gunzipped layers), and
    /// returns the digests of the layers as pushed.
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        diff_ids: Option<Vec<String>>,
    ) -> Vec<String> {
        self.push_image_with(repo, tag, layers, diff_ids, Value::Null)
    }

    /// As [`Registry::push_image`], with `runtime` as the config's `config` section (Env, Cmd,
    /// WorkingDir...; `Null` for none).
    pub fn push_image_with(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        diff_ids: Option<Vec<String>>,
        runtime: Value,
    ) -> Vec<String> {
        let diff_ids = diff_ids.unwrap_or_else(|| {
            layers
                .iter()
                .map(|gz| {
                    let mut tar = Vec::new();
                    std::io::Read::read_to_end(
                        &mut flate2::read::GzDecoder::new(&gz[..]),
                        &mut tar,
                    )
                    .expect("push_image takes gzip layers");
                    format!("sha256:{}", sha256_hex(&tar))
                })
                .collect()
        });
        let digests: Vec<String> = layers.iter().map(|l| self.put_blob(repo, l)).collect();
        let mut config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if !runtime.is_null() {
            config["config"] = runtime;
        }
        let config = config.to_string();
        let config_digest = self.put_blob(repo, config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers.iter().zip(&digests).map(|(l, d)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d,
                "size": l.len(),
            })).collect::<Vec<_>>(),
        })
        .to_string();
        self.put_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            manifest.as_bytes(),
        );
        digests
    }

    /// Uploads a manifest or index with the registry's own API (PUT), returning its digest.
    pub fn put_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        let file = self.dir.path().join(format!("manifest-{tag}.json"));
        std::fs::write(&file, body).unwrap();
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/stderr",
                "-w",
                "%{http_code}",
                "-X",
                "PUT",
            ])
            .args(["-H", &format!("Content-Type: {media_type}")])
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(format!("http://{}/v2/{repo}/manifests/{tag}", self.host()))
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            code,
            "201",
            "PUT manifest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("sha256:{}", sha256_hex(body))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The status code of a plain `GET path` on 127.0.0.1:port, or `None` if nothing answers.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    use std::io::Write;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// The result of running the `lazylayer` binary.
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        assert!(
            self.status.success(),
            "lazylayer failed: {}\n{}",
            self.stderr,
            self.stdout
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    /// Asserts a clean failure: exit code 1, an `error:` line mentioning every `needle`, and no
    /// panic or `Debug` dump.
    pub fn assert_error(&self, needles: &[&str]) {
        assert_eq!(
            self.status.code(),
            Some(1),
            "expected failure, got {:?}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        assert!(self.stderr.contains("error:"), "{}", self.stderr);
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                self.stderr
            );
        }
        for bad in ["panicked", "RUST_BACKTRACE", "Error {", "Some("] {
            assert!(
                !self.stderr.contains(bad),
                "stderr has {bad:?}:\n{}",
                self.stderr
            );
        }
    }
}

/// Runs `lazylayer ARGS` with an empty Docker config directory (so the host's credentials never
/// leak into a test) plus `envs`, killing it if it runs longer than a minute.
pub fn lazylayer(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let docker_config = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lazylayer"));
    cmd.args(args)
        .env("DOCKER_CONFIG", docker_config.path())
        .env_remove("LAZYLAYER_USER")
        .env_remove("LAZYLAYER_LOG")
        // An empty config file: a machine's /etc/lazylayer/config.toml must not change tests.
        .env("LAZYLAYER_CONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("run lazylayer");
    let output = wait_with_deadline(child, Duration::from_secs(60));
    Run {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Polls `done` every `every` until it holds or `timeout` has passed; says whether it held. The
/// one polling loop of the suite (daemons starting and stopping, mounts, counters).
pub fn poll_until(timeout: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// [`poll_until`] every 50 ms, failing the test with `failure()` (built only then, so that it
/// can carry a log) if `done` never holds.
pub fn wait_until(timeout: Duration, done: impl FnMut() -> bool, failure: impl FnOnce() -> String) {
    if !poll_until(timeout, Duration::from_millis(50), done) {
        panic!("{} (waited {timeout:?})", failure());
    }
}

/// Waits for a child, killing it (and failing the test) if it hangs past `deadline`.
pub fn wait_with_deadline(child: Child, deadline: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("lazylayer hung for more than {deadline:?}");
        }
    }
}

/// A tar of one sparse file `hole` (3 MiB: a few bytes at its start, middle and end, holes
/// between) written by GNU tar in PAX sparse format `version` ("1.0" or "0.1"), and the file's
/// bytes. Checks that GNU tar really wrote a `GNUSparseFile` entry.
pub fn gnu_sparse_tar(version: &str) -> (Vec<u8>, Vec<u8>) {
    use std::io::{Seek, SeekFrom, Write};
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("root");
    std::fs::create_dir(&dir).unwrap();
    let mut expected = vec![0u8; 3 << 20];
    let mut file = std::fs::File::create(dir.join("hole")).unwrap();
    for (at, text) in [
        (0usize, &b"start"[..]),
        (1 << 20, b"middle"),
        ((3 << 20) - 3, b"end"),
    ] {
        expected[at..at + text.len()].copy_from_slice(text);
        file.seek(SeekFrom::Start(at as u64)).unwrap();
        file.write_all(text).unwrap();
    }
    drop(file);
    let tar_path = work.path().join("layer.tar");
    let made = Command::new("tar")
        .args([
            "--format=posix",
            "--sparse",
            &format!("--sparse-version={version}"),
        ])
        .args(["--owner=0", "--group=0", "--mtime=@0", "-C"])
        .arg(&dir)
        .arg("-cf")
        .arg(&tar_path)
        .arg("hole")
        .status()
        .unwrap();
    assert!(made.success());
    let tar = std::fs::read(&tar_path).unwrap();
    let first = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path_bytes()
        .into_owned();
    assert!(
        String::from_utf8_lossy(&first).contains("GNUSparseFile"),
        "{version}: GNU tar did not write a sparse entry: {}",
        String::from_utf8_lossy(&first)
    );
    (tar, expected)
}

/// A gzip layer of `entries`: (path, entry type, link target or file content).
pub fn layer_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for &(path, kind, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        let body: &[u8] = match kind {
            tar::EntryType::Regular => data.as_bytes(),
            tar::EntryType::Link | tar::EntryType::Symlink => {
                header.set_link_name(data).unwrap();
                &[]
            }
            _ => &[],
        };
        header.set_size(body.len() as u64);
        tar.append_data(&mut header, path, body).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// The pid of the `lazylayer fuse-holder` serving the run directory `run_dir`, if one runs.
pub fn fuse_holder_pid(run_dir: &Path) -> Option<i32> {
    let wanted = format!("LAZYLAYER_RUN_DIR={}", run_dir.display());
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let holder = cmdline.split(|&b| b == 0).any(|a| a == b"fuse-holder");
            let ours = environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes());
            (holder && ours).then_some(pid)
        })
}

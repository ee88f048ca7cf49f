//! The containerd snapshotter end to end: Debian's containerd 1.6 with `lazylayer snapshotter`
//! as a proxy plugin, images pulled with `lazylayer pull` from Debian's registry, containers run
//! by runc.

mod support;

use std::time::Duration;

use support::containerd::{Containerd, Snapshotter, python_app_as_estargz};
use support::{Registry, RegistryAuth, wait_until};

/// `ctr` through the test's containerd, asserting success; returns stdout.
fn ctr(containerd: &Containerd, args: &[&str]) -> String {
    containerd.ctr_ok(args)
}

fn pull(containerd: &Containerd, snapshotter: &Snapshotter, reference: &str) -> String {
    let run = snapshotter.lazylayer(&[
        "pull",
        "--address",
        containerd.socket.to_str().unwrap(),
        reference,
    ]);
    assert!(
        run.status.success(),
        "lazylayer pull failed: {}\n--- snapshotter log ---\n{}{}",
        run.stderr,
        snapshotter.log(),
        containerd.log_tail()
    );
    run.stdout
}

fn run_app(containerd: &Containerd, reference: &str, id: &str) {
    let out = ctr(
        containerd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lazylayer",
            reference,
            id,
            "python3",
            "/app/main.py",
        ],
    );
    assert!(out.contains("app ok"), "app printed: {out}");
}

/// Fetched and compressed bytes of the snapshotter's one lazy mount, from `lazylayer stats`.
fn fetched_and_total(snapshotter: &Snapshotter) -> (u64, u64) {
    let mounts = snapshotter.fuse_mounts();
    assert_eq!(
        mounts.len(),
        1,
        "expected one lazy mount: {mounts:?}\n{}\n{}",
        std::fs::read_to_string("/proc/self/mounts").unwrap(),
        snapshotter.log()
    );
    let stats = snapshotter
        .lazylayer(&["stats", "--json", mounts[0].to_str().unwrap()])
        .json();
    support::mount::fetched_and_total(&stats)
}

#[test]
fn lazily_pulled_estargz_image_runs_shares_its_mount_survives_a_restart_and_is_cleaned_up() {
    let (registry, estargz) = python_app_as_estargz();
    let mut snapshotter = Snapshotter::start();
    let containerd = Containerd::with_snapshotter(&snapshotter.socket);

    let mark = registry.log_mark();
    let out = pull(&containerd, &snapshotter, &estargz);
    assert_eq!(out.matches("lazy (fetched on demand)").count(), 3, "{out}");
    assert!(snapshotter.fuse_mounts().is_empty(), "mounted before use");
    // The pull resolved the image (manifest by tag, config) and handed that to the snapshotter,
    // which asked the registry for the layers' indexes only, not for manifest or config again.
    let manifests = registry.requests_since(mark, "/manifests/");
    let tag = format!("/manifests/{} ", estargz.rsplit(':').next().unwrap());
    let by_tag: Vec<_> = manifests.iter().filter(|l| l.contains(&tag)).collect();
    assert_eq!(by_tag.len(), 1, "{manifests:#?}");
    let by_digest = registry.requests_since(mark, "/manifests/sha256:");
    assert!(by_digest.is_empty(), "manifest asked again: {by_digest:#?}");
    let blobs = registry.requests_since(mark, "/blobs/");
    let whole = blobs
        .iter()
        .filter(|l| l.contains("\"GET ") && !l.contains(" 206 "));
    assert_eq!(whole.count(), 1, "the config was asked again: {blobs:#?}");

    run_app(&containerd, &estargz, "first");
    // A container running as another user than root starts too (overlayfs reads its lower
    // layers with the credentials of its mounter, root; the direct case is in formats.rs).
    let out = ctr(
        &containerd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lazylayer",
            &estargz,
            "nobody",
            // ctr 1.6 has no --user: the image's setpriv drops to nobody before the app runs.
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "python3",
            "/app/main.py",
        ],
    );
    assert!(
        out.contains("app ok"),
        "the app as uid 65534 printed: {out}"
    );
    let (fetched, total) = fetched_and_total(&snapshotter);
    eprintln!("python-app start through the snapshotter fetched {fetched} of {total} bytes");
    assert!(
        fetched * 2 < total,
        "the app's start fetched {fetched} of {total} bytes"
    );

    // `ctr snapshots` answers through containerd's metadata and our List/Stat/Usage.
    let list = ctr(
        &containerd,
        &["snapshots", "--snapshotter", "lazylayer", "ls"],
    );
    assert_eq!(list.matches("Committed").count(), 3, "{list}");
    let tree = ctr(
        &containerd,
        &["snapshots", "--snapshotter", "lazylayer", "tree"],
    );
    assert_eq!(
        tree.lines().filter(|l| l.contains("sha256:")).count(),
        3,
        "{tree}"
    );
    let layer = list
        .lines()
        .find(|l| l.contains("Committed"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    let info = ctr(
        &containerd,
        &["snapshots", "--snapshotter", "lazylayer", "info", layer],
    );
    assert!(info.contains("\"Kind\": \"Committed\""), "{info}");
    let usage = ctr(
        &containerd,
        &["snapshots", "--snapshotter", "lazylayer", "usage"],
    );
    assert!(usage.contains("sha256:"), "{usage}");

    // Two running containers stand on the same lazy mount.
    for id in ["c1", "c2"] {
        ctr(
            &containerd,
            &[
                "run",
                "-d",
                "--snapshotter",
                "lazylayer",
                &estargz,
                id,
                "sleep",
                "600",
            ],
        );
    }
    assert_eq!(snapshotter.fuse_mounts().len(), 1);
    for id in ["c1", "c2"] {
        let _ = containerd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    for id in ["c1", "c2"] {
        containerd.wait_for_task_exit(id, Duration::from_secs(30));
        ctr(&containerd, &["containers", "rm", id]);
    }

    // After a crash the restarted snapshotter serves again, by itself, the mount an existing
    // container stands on (taking over its kept connection), and runs new containers.
    ctr(
        &containerd,
        &[
            "containers",
            "create",
            "--snapshotter",
            "lazylayer",
            &estargz,
            "idle",
        ],
    );
    snapshotter.kill();
    snapshotter.restart();
    wait_until(
        Duration::from_secs(30),
        || snapshotter.fuse_mounts().len() == 1,
        || {
            let log = snapshotter.log();
            format!(
                "the restarted snapshotter did not mount the idle container's layers again: {log}"
            )
        },
    );
    let idle_root = snapshotter.fuse_mounts()[0].join("app/main.py");
    assert!(
        std::fs::read(&idle_root).is_ok(),
        "recovered mount does not serve"
    );
    containerd.wait_until_reconnected(Duration::from_secs(20));
    run_app(&containerd, &estargz, "after-restart");
    ctr(&containerd, &["containers", "rm", "idle"]);

    // Removing the image lets containerd's GC remove every snapshot: mounts and directories go.
    ctr(&containerd, &["images", "rm", "--sync", &estargz]);
    let list = ctr(
        &containerd,
        &["snapshots", "--snapshotter", "lazylayer", "ls"],
    );
    assert_eq!(list.lines().count(), 1, "snapshots left: {list}");
    assert!(snapshotter.fuse_mounts().is_empty());
    let left: Vec<_> = std::fs::read_dir(snapshotter.root().join("snapshots"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "directories left: {left:?}");
    drop(registry);
}

#[test]
fn gzip_image_without_a_lazy_index_is_unpacked_by_containerd_and_runs() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let snapshotter = Snapshotter::start();
    let containerd = Containerd::with_snapshotter(&snapshotter.socket);
    let reference = format!("{}/test/app:latest", registry.host());
    let out = pull(&containerd, &snapshotter, &reference);
    assert_eq!(out.matches("downloaded and unpacked").count(), 3, "{out}");
    run_app(&containerd, &reference, "gzip");
    assert!(snapshotter.fuse_mounts().is_empty());
    // Pulling again finds every layer in place.
    let again = pull(&containerd, &snapshotter, &reference);
    assert_eq!(again.matches("already present").count(), 3, "{again}");
}

/// containerd's own snapshotter conformance suite (`snapshots/testsuite` from Debian's
/// golang-github-containerd-containerd-dev) against `lazylayer snapshotter`, through
/// containerd's proxy client: the Go harness in tests/snapshotter-suite starts a fresh
/// snapshotter for each sub-test. Every sub-test passes (the suite itself skips `Rename` on
/// every snapshotter).
#[test]
fn containerd_snapshotter_conformance_suite_passes() {
    support::require_tool("go");
    let work = tempfile::tempdir().unwrap();
    let harness = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshotter-suite");
    let binary = work.path().join("suite.test");
    let gopath = format!("{}:/usr/share/gocode", work.path().display());
    let built = std::process::Command::new("go")
        .args(["test", "-c", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(&harness)
        .env("GO111MODULE", "off")
        .env("GOPATH", &gopath)
        .env("GOCACHE", work.path().join("cache"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "building the suite failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = std::process::Command::new(&binary)
        .args(["-test.root", "-test.v", "-test.timeout", "10m"])
        .env("LAZYLAYER_BIN", env!("CARGO_BIN_EXE_lazylayer"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    let passed = out
        .lines()
        .filter(|l| l.trim_start().starts_with("--- PASS: "))
        .count();
    assert!(
        run.status.success() && !out.contains("--- FAIL"),
        "containerd's snapshotter suite failed:\n{out}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The suite's 20 sub-tests that run (Rename is skipped upstream) plus the test itself.
    assert!(passed >= 21, "only {passed} passed:\n{out}");
}

/// What the kubelet does through CRI, for the tests: one pod on the host network, containers in
/// it, images pulled (through `images`, containerd's image service or a `cri-proxy`).
struct Kubelet {
    images: k8s_cri::v1::image_service_client::ImageServiceClient<tonic::transport::Channel>,
    runtime: k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    sandbox_config: k8s_cri::v1::PodSandboxConfig,
    sandbox: String,
    logs: tempfile::TempDir,
}

impl Kubelet {
    /// Starts the pod (its sandbox image is containerd's `sandbox_image`).
    async fn start(containerd: &Containerd, image_service: &std::path::Path) -> Kubelet {
        use k8s_cri::v1 as cri;
        let channel = containerd_client::connect(&containerd.socket)
            .await
            .unwrap();
        let images = containerd_client::connect(image_service).await.unwrap();
        let mut runtime = cri::runtime_service_client::RuntimeServiceClient::new(channel);
        let version = runtime
            .version(cri::VersionRequest::default())
            .await
            .unwrap_or_else(|e| panic!("CRI not served: {e}{}", containerd.log_tail()));
        assert_eq!(version.into_inner().runtime_name, "containerd");
        let logs = tempfile::tempdir().unwrap();
        let sandbox_config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "lazy".into(),
                uid: "lazy-uid".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            // A pod on the host network keeps the host's name (runc cannot set one without a
            // UTS namespace of its own), as the kubelet leaves it empty for such pods.
            log_directory: logs.path().to_str().unwrap().into(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox = runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}{}", containerd.log_tail()))
            .into_inner()
            .pod_sandbox_id;
        Kubelet {
            images: cri::image_service_client::ImageServiceClient::new(images),
            runtime,
            sandbox_config,
            sandbox,
            logs,
        }
    }

    /// PullImage, with the credentials a pull secret would give; returns the image's id.
    async fn pull(&mut self, image: &str, auth: Option<k8s_cri::v1::AuthConfig>) -> String {
        self.images
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                auth,
                sandbox_config: Some(self.sandbox_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("PullImage {image}: {e}"))
            .into_inner()
            .image_ref
    }

    /// Creates and starts container `name` of `image` running `command`, waits for it to exit
    /// and removes it; returns its exit code and its log (CRI's format: TIME STREAM TAG LINE).
    /// A failure's message ends with `context()` (the snapshotter's log).
    async fn run(
        &mut self,
        name: &str,
        image: &str,
        command: &[&str],
        context: &dyn Fn() -> String,
    ) -> (i32, String) {
        use k8s_cri::v1 as cri;
        let log_path = format!("{name}.log");
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: self.sandbox.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                command: command.iter().map(|c| c.to_string()).collect(),
                log_path: log_path.clone(),
                linux: Some(cri::LinuxContainerConfig::default()),
                ..Default::default()
            }),
            sandbox_config: Some(self.sandbox_config.clone()),
        };
        // As the kubelet, try again while containerd says it cannot reach the snapshotter: after
        // a snapshotter restart its connection may still be the dead one for a moment.
        let started = std::time::Instant::now();
        let container = loop {
            match self.runtime.create_container(request.clone()).await {
                Ok(created) => break created.into_inner().container_id,
                Err(e)
                    if e.code() == tonic::Code::Unavailable
                        && started.elapsed() < Duration::from_secs(20) =>
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("CreateContainer {image}: {e}\n{}", context()),
            }
        };
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {image}: {e}\n{}", context()));
        let started = std::time::Instant::now();
        let status = loop {
            let status = self
                .runtime
                .container_status(cri::ContainerStatusRequest {
                    container_id: container.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if status.state == cri::ContainerState::ContainerExited as i32 {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{image}: the container did not exit"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let output = std::fs::read_to_string(self.logs.path().join(&log_path)).unwrap_or_default();
        self.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: container,
            })
            .await
            .unwrap();
        (status.exit_code, output)
    }

    async fn remove_image(&mut self, image_ref: String) {
        self.images
            .remove_image(k8s_cri::v1::RemoveImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: image_ref,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }

    async fn stop(mut self) {
        let id = self.sandbox.clone();
        self.runtime
            .stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .unwrap();
        self.runtime
            .remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .unwrap();
    }
}

fn assert_app_ran(image: &str, (code, output): (i32, String)) {
    assert_eq!(code, 0, "{image}: {output}");
    assert!(
        output.lines().any(|l| l.contains(" stdout F app ok")),
        "{image} printed: {output}"
    );
}

/// Kubernetes' path, for real: containerd's CRI plugin configured by deploy/containerd/config.toml
/// (every image, the pause image included, through the snapshotter) and driven by a CRI client
/// as the kubelet drives it: PullImage of an eStargz image (ctr-remote's) and of a gzip image
/// with its seek index (`lazylayer index`), RunPodSandbox on the host network (no CNI),
/// CreateContainer and StartContainer; the app's output is checked, its layers are served lazily,
/// and RemoveImage unmounts them.
#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_pulls_and_runs_lazy_images_through_the_cri_plugin() {
    let (registry, estargz) = tokio::task::spawn_blocking(python_app_as_estargz)
        .await
        .unwrap();
    registry.push_shared("python-app", "test/gz");
    let gzip = format!("{}/test/gz:latest", registry.host());
    let indexed = support::lazylayer(&["index", &gzip], &[]);
    assert!(indexed.status.success(), "{}", indexed.stderr);
    let pause = pause_image(&registry);

    let snapshotter = Snapshotter::start();
    let hosts = tempfile::tempdir().unwrap();
    let containerd = Containerd::with_cri(&snapshotter, hosts.path(), &pause);
    let mut kubelet = Kubelet::start(&containerd, &containerd.socket).await;
    for (name, image) in [("estargz", &estargz), ("gzip-indexed", &gzip)] {
        let pulled = kubelet.pull(image, None).await;
        assert_app_ran(
            image,
            kubelet
                .run(name, image, &["python3", "/app/main.py"], &|| {
                    snapshotter.log()
                })
                .await,
        );
        let (fetched, total) = fetched_and_total(&snapshotter);
        assert!(
            fetched > 0 && fetched < total,
            "{image}: fetched {fetched} of {total} bytes"
        );
        kubelet.remove_image(pulled).await;
        wait_until(
            Duration::from_secs(30),
            || snapshotter.fuse_mounts().is_empty(),
            || {
                format!(
                    "{image}: still mounted after RemoveImage\n{}",
                    snapshotter.log()
                )
            },
        );
    }
    kubelet.stop().await;
}

/// A private image under Kubernetes: the registry wants bearer tokens, and the only credentials
/// are the ones the kubelet's PullImage carries (a pull secret). Through `lazylayer cri-proxy`
/// the snapshotter reads the image lazily with them, renews its token after it expires, and
/// after a crash of its own (SIGKILL) mounts and reads it again for the next container; the
/// password appears in no log of ours.
#[tokio::test(flavor = "multi_thread")]
async fn private_images_are_read_lazily_with_the_kubelets_credentials_through_cri_proxy() {
    let (anon, estargz) = tokio::task::spawn_blocking(python_app_as_estargz)
        .await
        .unwrap();
    let password = "pull-secret-Zq8v";
    let tokens = support::token::TokenServer::start(support::token::TokenPolicy {
        user: "kubelet".into(),
        password: password.into(),
        valid_for: 4,
        expires_in: 3,
    });
    let private = Registry::start_sharing(
        &anon,
        RegistryAuth::Token {
            realm: tokens.realm(),
            service: tokens.service.clone(),
            issuer: tokens.issuer.clone(),
            cert: tokens.cert.clone(),
        },
    );
    let image = estargz.replace(&anon.host(), &private.host());
    let pause = pause_image(&anon);

    let proxy_dir = tempfile::tempdir().unwrap();
    let proxy_socket = proxy_dir.path().join("cri.sock");
    let mut snapshotter = Snapshotter::start_with(&["--cri-proxy", proxy_socket.to_str().unwrap()]);
    let hosts = tempfile::tempdir().unwrap();
    let containerd = Containerd::with_cri(&snapshotter, hosts.path(), &pause);
    let proxy = support::containerd::CriProxy::start(&containerd, proxy_socket);
    let mut kubelet = Kubelet::start(&containerd, &proxy.socket).await;
    let auth = k8s_cri::v1::AuthConfig {
        username: "kubelet".into(),
        password: password.into(),
        ..Default::default()
    };
    kubelet.pull(&image, Some(auth)).await;
    assert_app_ran(
        &image,
        kubelet
            .run("app", &image, &["python3", "/app/main.py"], &|| {
                snapshotter.log()
            })
            .await,
    );
    let (fetched, total) = fetched_and_total(&snapshotter);
    assert!(
        fetched > 0 && fetched < total,
        "fetched {fetched} of {total}"
    );

    // Cold files, read after the token expired, and again after a snapshotter crash.
    let mount = snapshotter.fuse_mounts().remove(0);
    // Files the app does not read (time zones, documentation): not fetched yet.
    let files: Vec<std::path::PathBuf> = walk(&mount.join("usr/share"))
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .collect();
    assert!(files.len() > 100, "{} files", files.len());
    let issued = tokens.requests();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for f in &files[..files.len() / 2] {
        std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}\n{}", f.display(), snapshotter.log()));
    }
    assert!(tokens.requests() > issued, "the token was never renewed");
    // A crash: the next container mounts the image again, with the proxy's credentials.
    snapshotter.kill();
    snapshotter.restart();
    assert_app_ran(
        &image,
        kubelet
            .run("again", &image, &["python3", "/app/main.py"], &|| {
                snapshotter.log()
            })
            .await,
    );
    assert_eq!(snapshotter.fuse_mounts(), std::slice::from_ref(&mount));
    for f in &files[files.len() / 2..] {
        std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}\n{}", f.display(), snapshotter.log()));
    }
    for (what, log) in [
        ("snapshotter", snapshotter.log()),
        ("cri-proxy", proxy.log()),
    ] {
        assert!(
            !log.contains(password),
            "the password is in the {what}'s log"
        );
    }
    kubelet.stop().await;
}

/// Every regular file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    files
}

/// A pause image of the machine's own `sleep` and the libraries it needs, with `sleep infinity`
/// as its command, pushed as `test/pause:latest`: a pod sandbox's process must stay up, and the
/// sandbox must share no layer with the images under test (containerd would stack their upper
/// layers on its already unpacked one).
fn pause_image(registry: &Registry) -> String {
    let layer = std::process::Command::new("tar")
        .args(["-czhf", "-", "-C", "/"])
        .args([
            "usr/bin/sleep",
            "lib/x86_64-linux-gnu/libc.so.6",
            "lib64/ld-linux-x86-64.so.2",
        ])
        .output()
        .unwrap();
    assert!(
        layer.status.success(),
        "{}",
        String::from_utf8_lossy(&layer.stderr)
    );
    registry.push_image_with(
        "test/pause",
        "latest",
        &[layer.stdout],
        None,
        serde_json::json!({"Cmd": ["/usr/bin/sleep", "infinity"]}),
    );
    format!("{}/test/pause:latest", registry.host())
}

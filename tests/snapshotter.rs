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

    let out = pull(&containerd, &snapshotter, &estargz);
    assert_eq!(out.matches("lazy (fetched on demand)").count(), 3, "{out}");
    assert!(snapshotter.fuse_mounts().is_empty(), "mounted before use");

    run_app(&containerd, &estargz, "first");
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
        wait_for_task_exit(&containerd, id);
        ctr(&containerd, &["containers", "rm", id]);
    }

    // A crash leaves a dead mount; the restarted snapshotter mounts again what an existing
    // container stands on, by itself, and runs new containers.
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
    wait_until_containerd_reconnects(&containerd);
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

/// containerd redials a proxy snapshotter with backoff (at most 3 s between attempts in 1.6);
/// calls fail with "unavailable" until it has.
fn wait_until_containerd_reconnects(containerd: &Containerd) {
    wait_until(
        Duration::from_secs(20),
        || {
            let ls = ["snapshots", "--snapshotter", "lazylayer", "ls"];
            containerd.ctr(&ls).status.success()
        },
        || "containerd did not reconnect to the restarted snapshotter".into(),
    );
}

fn wait_for_task_exit(containerd: &Containerd, id: &str) {
    wait_until(
        Duration::from_secs(30),
        || {
            let out = containerd.ctr(&["task", "ls"]);
            let listing = String::from_utf8_lossy(&out.stdout);
            !listing
                .lines()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains("RUNNING"))
        },
        || format!("task {id} did not stop"),
    );
    let _ = containerd.ctr(&["task", "rm", id]);
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

/// Kubernetes' path, for real: containerd's CRI plugin configured by deploy/containerd/config.toml
/// (every image, the pause image included, through the snapshotter) and driven by a CRI client
/// as the kubelet drives it: PullImage of an eStargz image (ctr-remote's) and of a gzip image
/// with its seek index (`lazylayer index`), RunPodSandbox on the host network (no CNI),
/// CreateContainer and StartContainer; the app's output is checked, its layers are served lazily,
/// and RemoveImage unmounts them.
#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_pulls_and_runs_lazy_images_through_the_cri_plugin() {
    use k8s_cri::v1 as cri;
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
    let channel = containerd_client::connect(&containerd.socket)
        .await
        .unwrap();
    let mut images = cri::image_service_client::ImageServiceClient::new(channel.clone());
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
        // A pod on the host network keeps the host's name (runc cannot set one without a UTS
        // namespace of its own), as the kubelet leaves it empty for such pods.
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

    for (name, image) in [("estargz", &estargz), ("gzip-indexed", &gzip)] {
        let spec = cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        };
        let pulled = images
            .pull_image(cri::PullImageRequest {
                image: Some(spec.clone()),
                auth: None,
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("PullImage {image}: {e}\n{}", snapshotter.log()))
            .into_inner()
            .image_ref;
        let log_path = format!("{name}.log");
        let container = runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(spec.clone()),
                    command: vec!["python3".into(), "/app/main.py".into()],
                    log_path: log_path.clone(),
                    linux: Some(cri::LinuxContainerConfig::default()),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {image}: {e}{}", containerd.log_tail()))
            .into_inner()
            .container_id;
        runtime
            .start_container(cri::StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {image}: {e}{}", containerd.log_tail()));
        let started = std::time::Instant::now();
        let status = loop {
            let status = runtime
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
        let output = std::fs::read_to_string(logs.path().join(&log_path)).unwrap_or_default();
        assert_eq!(status.exit_code, 0, "{image}: {output}");
        // CRI's log format: TIME STREAM TAG LINE.
        assert!(
            output.lines().any(|l| l.contains(" stdout F app ok")),
            "{image} printed: {output}"
        );
        let (fetched, total) = fetched_and_total(&snapshotter);
        assert!(
            fetched > 0 && fetched < total,
            "{image}: fetched {fetched} of {total} bytes"
        );

        runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: container,
            })
            .await
            .unwrap();
        images
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: pulled,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
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
    runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        })
        .await
        .unwrap();
    runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: sandbox,
        })
        .await
        .unwrap();
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

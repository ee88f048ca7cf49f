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

//! `lazylayer run` end to end: images from Debian's registry, run by Debian's runc over the lazy
//! mount and an overlay; stdio, exit codes, the image config's Env/WorkingDir/Cmd, `-e`,
//! `-v`, and nothing left behind, even by a run that was killed.

mod support;

use std::path::Path;
use std::time::Duration;

use lazylayer::fs::profile_pack::{PackDecoder, PackWriter};
use serde_json::json;
use support::{Registry, RegistryAuth, Run, lazylayer, shared_blob, shared_layer, wait_until};

/// `lazylayer run ARGS` with its own run directory and disk cache.
fn run(run_dir: &Path, cache: &Path, args: &[&str]) -> Run {
    let mut full = vec!["run", "--cache-dir", cache.to_str().unwrap()];
    full.extend_from_slice(args);
    lazylayer(&full, &[("LAZYLAYER_RUN_DIR", run_dir.to_str().unwrap())])
}

/// Whether a process whose command line matches `pattern` runs (a container's, seen from the
/// host).
fn running(pattern: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The entries of `dir` (none if it does not exist).
fn entries(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// FUSE mounts below `run_dir`.
fn fuse_mounts(run_dir: &Path) -> usize {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let prefix = run_dir.to_str().unwrap();
    mounts
        .lines()
        .filter(|l| l.contains(prefix) && l.contains(" - fuse"))
        .count()
}

/// What a run may leave: nothing under its run directory, no mount anywhere below it.
fn assert_nothing_left(run_dir: &Path) {
    for dir in ["containers", "images"] {
        let left = entries(&run_dir.join(dir));
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let prefix = run_dir.to_str().unwrap();
    assert!(
        !mounts.lines().any(|l| l.contains(prefix)),
        "mounts left behind:\n{mounts}"
    );
}

#[test]
fn python_app_runs_and_exit_codes_env_workdir_and_volumes_come_through() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let debian_layer = shared_blob(&shared_layer("debian-bookworm", 0));
    registry.push_image_with(
        "test/configured",
        "latest",
        &[debian_layer],
        None,
        json!({"Env": ["PATH=/usr/bin:/bin", "GREETING=hello"], "WorkingDir": "/usr/share",
               "Cmd": ["sh", "-c", "echo $GREETING from $(pwd)"]}),
    );
    let run_dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (run_dir, cache) = (run_dir.path(), cache.path());

    let app = run(run_dir, cache, &[&format!("{}/test/app", registry.host())]);
    assert!(
        app.status.success() && app.stdout.starts_with("app ok"),
        "{}{}",
        app.stdout,
        app.stderr
    );

    let image = format!("{}/test/configured", registry.host());
    let defaults = run(run_dir, cache, &[&image]);
    assert_eq!(
        defaults.stdout, "hello from /usr/share\n",
        "{}",
        defaults.stderr
    );

    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("f"), "from the host\n").unwrap();
    let volume = format!("{}:/data:ro", host_dir.path().display());
    let given = run(
        run_dir,
        cache,
        &[
            "-e",
            "GREETING=bye",
            "-v",
            &volume,
            "-w",
            "/data",
            &image,
            "--",
            "sh",
            "-c",
            "echo $GREETING from $(pwd); cat f; touch g 2>/dev/null || echo read-only",
        ],
    );
    assert_eq!(
        given.stdout, "bye from /data\nfrom the host\nread-only\n",
        "{}",
        given.stderr
    );

    for code in [0, 3] {
        let exited = run(
            run_dir,
            cache,
            &[&image, "sh", "-c", &format!("exit {code}")],
        );
        assert_eq!(exited.status.code(), Some(code), "{}", exited.stderr);
    }
    // Killed by a signal from outside (PID 1 of a container ignores one from inside): 128+9.
    let killed = std::thread::spawn({
        let (run_dir, cache, image) = (run_dir.to_path_buf(), cache.to_path_buf(), image.clone());
        move || run(&run_dir, &cache, &[&image, "sleep", "1234.5"])
    });
    wait_until(
        Duration::from_secs(60),
        || running("^sleep 1234.5"),
        || "the container did not start".into(),
    );
    std::process::Command::new("pkill")
        .args(["-KILL", "-f", "^sleep 1234.5"])
        .status()
        .unwrap();
    let killed = killed.join().unwrap();
    assert_eq!(killed.status.code(), Some(137), "{}", killed.stderr);

    assert_nothing_left(run_dir);
}

#[test]
fn runs_of_one_image_at_once_share_one_mount_kept_until_the_last_ends() {
    let debian = format!("oci:{}:debian-bookworm", support::shared_images().display());
    let run_dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let signals = tempfile::tempdir().unwrap();
    let volume = format!("{}:/x", signals.path().display());
    // Each container says it started, waits for its go, then reads a file of the image.
    let start = |name: &str| {
        let (run_dir, cache) = (run_dir.path().to_path_buf(), cache.path().to_path_buf());
        let (debian, volume) = (debian.clone(), volume.clone());
        let script = format!(
            "touch /x/{name}-started; while [ ! -e /x/{name}-go ]; do sleep 0.05; done; \
             cat /etc/debian_version"
        );
        std::thread::spawn(move || {
            run(
                &run_dir,
                &cache,
                &["-v", &volume, &debian, "sh", "-c", &script],
            )
        })
    };
    let started = |name: &str| signals.path().join(format!("{name}-started")).exists();
    let go = |name: &str| std::fs::write(signals.path().join(format!("{name}-go")), "").unwrap();
    let done = |run: std::thread::JoinHandle<Run>| {
        let run = run.join().unwrap();
        assert!(run.status.success(), "{}", run.stderr);
        assert!(run.stdout.starts_with("12."), "{}", run.stdout);
    };

    // The first run mounts the image; the second joins it.
    let first = start("a");
    wait_until(
        Duration::from_secs(60),
        || started("a"),
        || "the first container did not start".into(),
    );
    let second = start("b");
    wait_until(
        Duration::from_secs(60),
        || started("b"),
        || "the second container did not start".into(),
    );
    assert_eq!(fuse_mounts(run_dir.path()), 1, "two runs of one image");
    assert_eq!(entries(&run_dir.path().join("images")).len(), 1);

    // The run that mounted it ends first: the mount stays for the other, which reads after.
    go("a");
    done(first);
    assert_eq!(
        fuse_mounts(run_dir.path()),
        1,
        "the mount went with its first run"
    );
    go("b");
    done(second);
    assert_nothing_left(run_dir.path());
}

#[test]
fn bad_input_gets_clear_errors_and_a_killed_run_is_cleaned_up_by_the_next() {
    let layout = format!("oci:{}", support::shared_images().display());
    let debian = format!("{layout}:debian-bookworm");
    let run_dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (run_dir, cache) = (run_dir.path(), cache.path());

    run(run_dir, cache, &[&format!("{layout}:nope")]).assert_error(&["nope", "debian-bookworm"]);
    let missing = run(run_dir, cache, &[&debian, "no-such-command"]);
    assert_eq!(missing.status.code(), Some(127), "{}", missing.stderr);
    assert!(
        missing.stderr.contains("no-such-command"),
        "{}",
        missing.stderr
    );
    let no_runc = lazylayer(
        &["run", &debian, "true"],
        &[
            ("PATH", "/nonexistent"),
            ("LAZYLAYER_RUN_DIR", run_dir.to_str().unwrap()),
        ],
    );
    no_runc.assert_error(&["runc", "apt-get install runc"]);
    run(
        run_dir,
        cache,
        &["--volume", "relative:/x", &debian, "true"],
    )
    .assert_error(&["--volume", "absolute"]);

    // A run killed outright leaves its directory, mounts and container; the next run removes
    // them, container included.
    let mut killed = std::process::Command::new(env!("CARGO_BIN_EXE_lazylayer"))
        .args([
            "run",
            "--cache-dir",
            cache.to_str().unwrap(),
            &debian,
            "sleep",
            "2345.5",
        ])
        .env("LAZYLAYER_RUN_DIR", run_dir)
        .env("LAZYLAYER_CONFIG", "/dev/null")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sleeping = || running("^sleep 2345.5");
    wait_until(Duration::from_secs(60), sleeping, || {
        "the container did not start".into()
    });
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(
        std::fs::read_dir(run_dir.join("containers"))
            .unwrap()
            .count()
            == 1,
        "the killed run left nothing to clean, so this tests nothing"
    );
    let next = run(run_dir, cache, &[&debian, "true"]);
    assert!(next.status.success(), "{}", next.stderr);
    assert!(!sleeping(), "the killed run's container still runs");
    assert_nothing_left(run_dir);
}

#[test]
fn a_recorded_profile_published_next_to_the_image_prefetches_a_new_machines_start() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let image = format!("{}/test/app:esgz", registry.host());
    let converted = lazylayer(
        &[
            "convert",
            "-q",
            &format!("{}/test/app", registry.host()),
            &image,
        ],
        &[],
    );
    assert!(converted.status.success(), "{}", converted.stderr);
    let run_dir = tempfile::tempdir().unwrap();
    let env = [("LAZYLAYER_RUN_DIR", run_dir.path().to_str().unwrap())];
    let caches: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let cache = |i: usize| caches[i].path().to_str().unwrap();
    let profile = |action: &str, i: usize| {
        lazylayer(&["profile", action, "--cache-dir", cache(i), &image], &env)
    };

    // No profile published yet: once the registry is known (a first contact asks the referrers
    // API and the fallback tag at once), a mount's lookup is one request.
    let lookups = |from: usize| {
        registry.requests_since(from, "/referrers/").len()
            + registry.requests_since(from, "/manifests/sha256-").len()
    };
    let true_run = |i: usize| {
        let ran = lazylayer(&["run", "--cache-dir", cache(i), &image, "true"], &env);
        assert!(ran.status.success(), "{}", ran.stderr);
    };
    true_run(3);
    let before = registry.log_mark();
    true_run(3);
    assert!(lookups(before) <= 1, "{}", registry.log());
    profile("pull", 3).assert_error(&["no start-up profile is published"]);

    // Recorded on one machine (cache 0) and published.
    let recorded = lazylayer(
        &[
            "profile",
            "record",
            "--timeout",
            "120",
            "--cache-dir",
            cache(0),
            &image,
        ],
        &env,
    );
    assert!(
        recorded.status.success() && recorded.stdout.contains("app ok"),
        "{}{}",
        recorded.stdout,
        recorded.stderr
    );
    let files = profile("show", 0).stdout;
    assert!(files.contains("/app/main.py\n"), "{files}");
    let pushed = profile("push", 0);
    assert!(pushed.status.success(), "{}", pushed.stderr);
    let artifact = pushed
        .stderr
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .expect("push names the artifact")
        .trim_end_matches(',')
        .to_string();
    assert!(pushed.stderr.contains("a pack of"), "{}", pushed.stderr);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(registry.blob_data_path(&artifact)).unwrap())
            .unwrap();
    let pack = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    // A new machine (cache 1): its mount fetches the published profile and prefetches its
    // files before anybody reads; reading them then asks the registry for nothing more.
    let mark = registry.log_mark();
    let mounted =
        support::mount::Mounted::with_args(&image, caches[1].path(), &["--no-background-fetch"]);
    mounted.wait_until_prefetched(Duration::from_secs(60));
    assert_eq!(
        registry
            .requests_since(mark, &format!("/manifests/{artifact}"))
            .len(),
        1,
        "the profile artifact was not fetched:\n{}",
        registry.log()
    );
    // Its files' bytes came in one request, the pack's.
    assert_eq!(
        registry
            .requests_since(mark, &format!("/blobs/{pack}"))
            .len(),
        1,
        "{}",
        registry.log()
    );
    let prefetched = registry.requests_since(mark, "/blobs/").len();
    let mark = registry.log_mark();
    mounted.run_app();
    let after = registry.requests_since(mark, "/blobs/");
    assert!(
        after.len() <= 3,
        "{prefetched} blob requests before the app ran, and these while it ran:\n{}",
        after.join("\n")
    );
    drop(mounted);

    // `convert --prioritize-profile` rebuilds the image with the published profile's files
    // first: python-app's upper layers lack their parent directories' entries, which
    // ctr-remote's `optimize` refuses. A mount of the result that uses no profile prefetches
    // them (its landmark) and the app then asks for little.
    let prioritized = format!("{}/test/app:prioritized", registry.host());
    let source = format!("{}/test/app", registry.host());
    let converted = lazylayer(
        &[
            "convert",
            "-q",
            "--prioritize-profile",
            &image,
            &source,
            &prioritized,
        ],
        &[],
    );
    assert!(converted.status.success(), "{}", converted.stderr);
    let landmarked = support::mount::Mounted::with_args(
        &prioritized,
        caches[4].path(),
        &["--no-background-fetch", "--profile-window", "0"],
    );
    landmarked.wait_until_prefetched(Duration::from_secs(60));
    let mark = registry.log_mark();
    landmarked.run_app();
    let after = registry.requests_since(mark, "/blobs/");
    assert!(after.len() <= 3, "{}", after.join("\n"));
    drop(landmarked);
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), "not a profile").unwrap();
    let garbage = garbage.path().to_str().unwrap();
    lazylayer(
        &[
            "convert",
            "--prioritize-profile",
            garbage,
            &source,
            &prioritized,
        ],
        &[],
    )
    .assert_error(&["--prioritize-profile", garbage, "does not parse"]);

    // `profile pull` keeps it as the learned profile of another machine (cache 2).
    let pulled = profile("pull", 2);
    assert!(pulled.status.success(), "{}", pulled.stderr);
    assert_eq!(profile("show", 2).stdout, files);

    // A pack whose bytes for /app/main.py were changed (and put first): that chunk fails its
    // digest, is fetched from its layer, and the app reads the image's bytes.
    let pack_path = registry.blob_data_path(&pack);
    let mut decoder = PackDecoder::new(u64::MAX);
    let mut records = decoder.feed(&std::fs::read(&pack_path).unwrap()).unwrap();
    let main = records
        .iter()
        .position(|r| r.path == "app/main.py")
        .expect("the pack holds /app/main.py");
    let mut tampered = records.remove(main);
    let mut data = tampered.data.to_vec();
    let at = data.windows(6).position(|w| w == b"app ok").unwrap();
    data[at] = b'A';
    tampered.data = data.into();
    let mut writer = PackWriter::new(3);
    for r in std::iter::once(&tampered).chain(&records) {
        writer.add(&r.path, r.offset, &r.data);
    }
    std::fs::write(&pack_path, writer.finish()).unwrap();
    let damaged =
        support::mount::Mounted::with_args(&image, caches[5].path(), &["--no-background-fetch"]);
    damaged.wait_until_prefetched(Duration::from_secs(60));
    damaged.run_app();
    let log = damaged.daemon_log();
    assert!(
        log.contains(&format!("start-up pack {pack}")) && log.contains("does not match its digest"),
        "{log}"
    );
    drop(damaged);

    // A tampered profile blob is refused by its digest; mounts go on without it.
    let blob = manifest["layers"][0]["digest"].as_str().unwrap();
    let path = registry.blob_data_path(blob);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.iter().position(|&b| b == b'/').unwrap();
    bytes[at] = b'x';
    std::fs::write(&path, bytes).unwrap();
    profile("clear", 2);
    profile("pull", 2).assert_error(&[blob]);
    let tampered = support::mount::Mounted::with_cache(&image, caches[2].path());
    assert!(tampered.join("app/main.py").exists());
    let log = tampered.daemon_log();
    assert!(
        log.contains("published start-up profile is not used") && log.contains(blob),
        "{log}"
    );
}

//! A bad network between lazylayer and a real registry (netem-proxy injecting resets,
//! truncations, flipped bytes, stalls, 5xx/429 and dead redirects): reads still return the
//! reference bytes; a frozen registry fails reads with EIO at their deadline instead of hanging
//! them, and they work again once it is back; a registry killed for 15 s fails no read; a
//! token endpoint that is down for a while only delays the first request; the retry budget comes
//! from flags over the config file.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::conformance::{assert_same_tree, disk_tree, umoci_unpack};
use support::containerd::python_app_as_estargz;
use support::mount::Mounted;
use support::proxy::FaultProxy;
use support::token::{TokenPolicy, TokenServer};
use support::{Registry, RegistryAuth, lazylayer};

/// Every file of python-app read through a proxy that breaks 20% of the requests (mount-time
/// requests included) in every way it knows: no read fails and no byte differs.
#[test]
fn every_file_reads_right_through_a_proxy_breaking_a_fifth_of_requests() {
    let (registry, estargz) = python_app_as_estargz();
    let work = tempfile::tempdir().unwrap();
    let reference_root = umoci_unpack("python-app", work.path());
    let expected = disk_tree(&reference_root);

    let proxy = FaultProxy::start(
        registry.port,
        &["--fault-rate", "0.2", "--stall-secs", "3", "--seed", "7"],
    );
    let through_proxy = estargz.replace(&registry.host(), &format!("127.0.0.1:{}", proxy.port));
    let cache = tempfile::tempdir().unwrap();
    let mounted = Mounted::with_args(
        &through_proxy,
        cache.path(),
        &[
            "--no-background-fetch",
            "--stall-timeout",
            "1",
            "--max-attempts",
            "10",
            "--read-timeout",
            "30",
            "--max-requests",
            "16",
        ],
    );
    // Sixteen readers at once, as a container start has many: faults that make a reader wait
    // (stalls, Retry-After) overlap instead of adding up. Then the whole tree is compared.
    let failed = read_all_in_parallel(mounted.path(), 16);
    assert!(failed.is_empty(), "reads failed: {failed:?}");
    let actual = disk_tree(mounted.path());
    assert_same_tree("read through a faulty proxy", &expected, &actual);

    let stats = mounted.stats();
    let counts = proxy.counts();
    let requests: usize = counts.values().sum();
    let faults = requests - counts.get("ok").copied().unwrap_or(0);
    eprintln!(
        "fault report: {requests} requests, {faults} faults injected {counts:?}; \
         lazylayer: {} retries, {} failed reads, {} range requests, {} bytes",
        stats["retries"], stats["failed_reads"], stats["requests"], stats["fetched_bytes"]
    );
    let log = mounted.daemon_log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert_eq!(
        stats["failed_reads"],
        0,
        "reads failed: {stats}\n{}",
        warnings.join("\n")
    );
    assert!(
        faults * 10 >= requests,
        "too few faults to mean anything: {counts:?}"
    );
    for kind in ["reset", "truncate", "flip", "stall", "503", "429", "500"] {
        assert!(counts.contains_key(kind), "no {kind} injected: {counts:?}");
    }
    assert!(
        stats["retries"].as_u64().unwrap() >= faults as u64 / 2,
        "faults were not retried: {stats}"
    );
}

/// A frozen registry (SIGSTOP: connections open, nothing answered) fails a read with EIO once
/// the read has gone `--read-timeout` without a byte, the mount keeps answering metadata, and
/// the same read succeeds when the registry is back.
#[test]
fn frozen_registry_fails_reads_at_their_deadline_and_they_recover() {
    let (registry, estargz) = python_app_as_estargz();
    let work = tempfile::tempdir().unwrap();
    let reference_root = umoci_unpack("python-app", work.path());
    let cache = tempfile::tempdir().unwrap();
    let mounted = Mounted::with_args(
        &estargz,
        cache.path(),
        &[
            "--no-background-fetch",
            "--stall-timeout",
            "1",
            "--read-timeout",
            "4",
            "--max-attempts",
            "100",
        ],
    );
    let path = "usr/bin/python3.11";
    let expected = std::fs::read(reference_root.join(path)).unwrap();

    registry.pause();
    let started = Instant::now();
    let err = std::fs::read(mounted.join(path)).expect_err("read from a frozen registry");
    let waited = started.elapsed();
    let listed = std::fs::read_dir(mounted.join("usr/lib")).map(|d| d.count());
    registry.resume();
    assert_eq!(err.raw_os_error(), Some(5), "expected EIO, got {err}");
    // A bound against hanging, far above the 4 s deadline; not a speed check.
    assert!(
        waited < Duration::from_secs(40),
        "the read hung for {waited:?}"
    );
    assert!(
        listed.as_ref().is_ok_and(|&n| n > 0),
        "metadata stopped: {listed:?}"
    );

    let data = std::fs::read(mounted.join(path)).expect("read after the registry is back");
    assert!(data == expected, "{path}: wrong bytes after recovery");
    let stats = mounted.stats();
    assert!(stats["failed_reads"].as_u64().unwrap() >= 1, "{stats}");
}

/// A registry that goes away for 15 s (killed: connections refused) while a container's
/// files are read, and comes back on the same port, costs the readers time and no error: with
/// default retry settings no read fails and every byte matches.
#[test]
fn registry_killed_for_fifteen_seconds_fails_no_read() {
    let (mut registry, estargz) = python_app_as_estargz();
    let work = tempfile::tempdir().unwrap();
    let reference_root = umoci_unpack("python-app", work.path());
    let expected = disk_tree(&reference_root);
    let cache = tempfile::tempdir().unwrap();
    let mounted = Mounted::with_args(&estargz, cache.path(), &["--no-background-fetch"]);

    let root = mounted.path().to_path_buf();
    let readers = std::thread::spawn(move || read_all_in_parallel(&root, 8));
    std::thread::sleep(Duration::from_millis(300));
    registry.kill();
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(15));
    registry.start_again();
    eprintln!("registry was down for {:?}", outage.elapsed());
    let failed = readers.join().unwrap();
    assert!(failed.is_empty(), "reads failed: {failed:?}");

    let stats = mounted.stats();
    assert_eq!(stats["failed_reads"], 0, "reads failed: {stats}");
    assert!(
        stats["retries"].as_u64().unwrap() > 0,
        "no read met the outage, so the test tested nothing: {stats}"
    );
    let actual = disk_tree(mounted.path());
    assert_same_tree("read across a registry outage", &expected, &actual);
    assert!(
        mounted.daemon_log().contains("still retrying"),
        "the outage was not reported in the log:\n{}",
        mounted.daemon_log()
    );
}

/// An image read whole before mounts while its registry is down: by digest from the disk cache
/// alone (no request), by tag with the manifest the tag named last and a warning that says so.
#[test]
fn a_cached_image_mounts_with_its_registry_down() {
    let mut registry = Registry::start(RegistryAuth::None);
    registry.push_shared("debian-bookworm", "test/debian");
    let digest = support::shared_manifest_digest("debian-bookworm");
    let by_tag = format!("{}/test/debian:latest", registry.host());
    let by_digest = format!("{}/test/debian@{digest}", registry.host());
    let cache = tempfile::tempdir().unwrap();
    let expected = {
        let online = Mounted::with_args(&by_tag, cache.path(), &["--no-background-fetch"]);
        disk_tree(online.path())
    };
    registry.kill();

    let offline = Mounted::with_args(&by_digest, cache.path(), &["--no-background-fetch"]);
    assert_same_tree(
        "by digest, registry down",
        &expected,
        &disk_tree(offline.path()),
    );
    let stats = offline.stats();
    assert_eq!(stats["requests"], 0, "{stats}");
    drop(offline);

    let started = Instant::now();
    let tagged = Mounted::with_args(&by_tag, cache.path(), &["--no-background-fetch"]);
    eprintln!(
        "mount by tag with the registry down took {:?}",
        started.elapsed()
    );
    assert_same_tree(
        "by tag, registry down",
        &expected,
        &disk_tree(tagged.path()),
    );
    let log = tagged.daemon_log();
    assert!(
        log.contains("cannot be reached") && log.contains(&digest) && log.contains("WARN"),
        "no warning that the tag was resolved from the cache:\n{log}"
    );
    drop(tagged);

    // What the registry refuses is not papered over: an unknown tag is an error once it is back.
    registry.start_again();
    let dir = tempfile::tempdir().unwrap();
    lazylayer(
        &[
            "mount",
            "--cache-dir",
            cache.path().to_str().unwrap(),
            &format!("{}/test/debian:nope", registry.host()),
            dir.path().to_str().unwrap(),
        ],
        &[],
    )
    .assert_error(&["nope", "not found"]);
}

/// SIGTERM to a foreground mount while a file is open leaves no dead mount: the mount leaves the
/// tree at once, the open file keeps reading, and the process exits 0 once it is closed.
#[test]
fn sigterm_with_a_file_open_detaches_and_serves_it_until_closed() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let image = format!("oci:{}:debian-bookworm", support::shared_images().display());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lazylayer"))
        .args(["mount", "--cache-dir", "none", &image])
        .arg(dir.path())
        .env("LAZYLAYER_RUN_DIR", run_dir.path())
        .env("LAZYLAYER_CONFIG", "/dev/null")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let file_path = dir.path().join("etc/os-release");
    support::wait_until(
        Duration::from_secs(60),
        || file_path.exists(),
        || "the mount did not come up".into(),
    );
    let is_mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == dir.path().to_str())
    };
    let mut file = std::fs::File::open(&file_path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let mut head = [0u8; 4];
    file.read_exact(&mut head).unwrap();

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    support::wait_until(
        Duration::from_secs(10),
        || !is_mounted(),
        || "the busy mount was not detached".into(),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with a file still open"
    );
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).unwrap();
    assert_eq!(&head, b"PRET");
    assert_eq!(4 + rest.len(), len, "the open file did not read to its end");

    drop(file);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the file was closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("busy"), "{stderr}");
    assert!(!is_mounted());
}

/// The token endpoint answers 503 to its first three requests: the client retries and gets in.
/// The retry budget follows flags over the config file: a file allowing one attempt fails, the
/// flag allowing more wins over it.
#[test]
fn token_endpoint_down_for_a_while_and_retry_budget_precedence() {
    let anon = Registry::start(RegistryAuth::None);
    anon.push_shared("python-app", "test/app");
    let tokens = TokenServer::start(TokenPolicy {
        user: "bob".into(),
        password: "hunter2".into(),
        valid_for: 300,
        expires_in: 300,
    });
    let realm = tokens.realm();
    let token_port: u16 = realm
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let one_attempt = config_dir.path().join("config.toml");
    std::fs::write(&one_attempt, "[fetch]\nmax_attempts = 1\n").unwrap();

    let mut results = Vec::new();
    for (flags, config) in [
        (vec![], None),
        (vec![], Some(&one_attempt)),
        (vec!["--max-attempts", "4"], Some(&one_attempt)),
    ] {
        let proxy = FaultProxy::start(token_port, &["--fail-first", "3"]);
        let registry = Registry::start_sharing(
            &anon,
            RegistryAuth::Token {
                realm: realm.replace(&token_port.to_string(), &proxy.port.to_string()),
                service: tokens.service.clone(),
                issuer: tokens.issuer.clone(),
                cert: tokens.cert.clone(),
            },
        );
        let reference = format!("{}/test/app:latest", registry.host());
        let mut args = vec!["inspect", "--user", "bob:hunter2"];
        args.extend(flags);
        args.push(&reference);
        let config = config.map(|p| p.to_str().unwrap().to_string());
        let envs: Vec<(&str, &str)> = config
            .iter()
            .map(|c| ("LAZYLAYER_CONFIG", c.as_str()))
            .collect();
        let run = lazylayer(&args, &envs);
        results.push((run, proxy.counts()));
    }
    let (default_run, counts) = &results[0];
    assert!(
        default_run.status.success(),
        "default budget: {}",
        default_run.stderr
    );
    assert_eq!(counts.get("503"), Some(&3), "{counts:?}");
    assert!(counts.get("ok").is_some_and(|&n| n >= 1), "{counts:?}");

    let (file_run, _) = &results[1];
    file_run.assert_error(&["cannot get a token", "503"]);

    let (flag_run, _) = &results[2];
    assert!(
        flag_run.status.success(),
        "--max-attempts over the file: {}",
        flag_run.stderr
    );
}

/// A typo in the config file is named, not ignored, before anything is fetched.
#[test]
fn a_typo_in_the_config_file_is_named() {
    let config_dir = tempfile::tempdir().unwrap();
    let typo = config_dir.path().join("config.toml");
    std::fs::write(&typo, "[fetch]\nmax_atempts = 1\n").unwrap();
    lazylayer(
        &["inspect", "127.0.0.1:1/x"],
        &[("LAZYLAYER_CONFIG", typo.to_str().unwrap())],
    )
    .assert_error(&["config.toml", "max_atempts"]);
}

/// Reads every regular file under `root` with `threads` readers; returns the failures.
fn read_all_in_parallel(root: &Path, threads: usize) -> Vec<(PathBuf, std::io::Error)> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                files(&entry.path(), out);
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    let mut all = Vec::new();
    files(root, &mut all);
    let all = std::sync::Arc::new(all);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..threads)
        .map(|_| {
            let (all, next) = (all.clone(), next.clone());
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(path) = all.get(i) else { break };
                    if let Err(e) = std::fs::read(path) {
                        failed.push((path.clone(), e));
                    }
                }
                failed
            })
        })
        .collect();
    readers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect()
}

/// `--read-timeout` bounds a wait without bytes, not a transfer: listing a gzip image streams
/// all of its layers (73 MB) through a 100 Mbit/s link, several times the timeout, and works.
#[test]
fn a_transfer_that_keeps_moving_outlives_the_read_timeout() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let link = FaultProxy::start(registry.port, &["--bandwidth", "100"]);
    let started = Instant::now();
    let run = lazylayer(
        &[
            "ls",
            "--read-timeout",
            "2",
            "--stall-timeout",
            "1",
            &format!("127.0.0.1:{}/test/app:latest", link.port),
            "/app",
        ],
        &[],
    );
    let took = started.elapsed();
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.contains("main.py"), "{}", run.stdout);
    // Only a check that the case is the one described, not a speed assertion.
    assert!(
        took > Duration::from_secs(4),
        "the transfer took {took:?}, too short to exceed the 2 s read timeout"
    );
}

/// What crossed the link, as the benchmark reads it: `/_netem/stats` counts forwarded requests
/// and response body bytes, and is itself neither forwarded nor counted.
#[test]
fn link_stats_count_requests_and_body_bytes() {
    use std::io::{Read, Write};
    use support::http::{HttpServer, Response};
    let body = vec![7u8; 100_000];
    let server = HttpServer::start(move |_| Response::new(200).body(body.clone()));
    let proxy = FaultProxy::start(server.port, &[]);
    let get = |path: &str| {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = Vec::new();
        conn.read_to_end(&mut response).unwrap();
        String::from_utf8_lossy(&response).into_owned()
    };
    get("/v2/a");
    get("/v2/b");
    let stats = get("/_netem/stats");
    let json = &stats[stats.find('{').unwrap()..];
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(json["requests"], 2, "{stats}");
    assert_eq!(json["body_bytes"], 200_000, "{stats}");
    assert_eq!(proxy.requests().len(), 2);
}

/// A client that opens with a TLS handshake (an HTTPS probe, as Go clients and containerd send
/// before falling back to HTTP) gets an answer at once instead of waiting for its own timeout.
#[test]
fn tls_handshake_gets_an_immediate_bad_request() {
    use std::io::{Read, Write};
    use support::http::{HttpServer, Response};
    let server = HttpServer::start(|_| Response::new(200));
    let proxy = FaultProxy::start(server.port, &[]);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The start of a TLS 1.2 ClientHello record: handshake type, version, length, hello.
    conn.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ])
    .unwrap();
    let started = Instant::now();
    let mut response = Vec::new();
    let read = conn.read_to_end(&mut response);
    assert!(read.is_ok(), "no answer within 5 s: {read:?}");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 400 "),
        "answered {response:?} after {:?}",
        started.elapsed()
    );
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
}

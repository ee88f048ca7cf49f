//! The registry client and `lazylayer inspect` against Debian's docker-registry (distribution
//! 2.8) with the shared images pushed by skopeo, with htpasswd and token auth; plus the few
//! misbehaviours no real registry produces on demand (wrong bytes, redirects, stalls), served by
//! the tests' own small HTTP server.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use lazylayer::model::digest::Digest;
use lazylayer::model::reference::ImageRef;
use lazylayer::source::config::Credentials;
use lazylayer::source::config::FetchConfig;
use lazylayer::source::registry::{Registry as Client, RegistryError, Repository};
use serde_json::{Value, json};
use support::http::{HttpServer, Response};
use support::token::{TokenPolicy, TokenServer};
use support::{
    Registry, RegistryAuth, lazylayer, shared_blob, shared_images, shared_json, shared_tags,
};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Checks an `inspect --json` report against the manifest and config in the shared layout.
fn check_report(report: &Value, manifest_digest: &str) {
    let manifest = shared_json(manifest_digest);
    let config = shared_json(manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(report["manifest_digest"], manifest_digest);
    // The shared manifests carry no `mediaType`; the layout's index.json and the registry's
    // Content-Type both say OCI manifest.
    assert_eq!(report["manifest_media_type"], OCI_MANIFEST);
    assert_eq!(report["config_digest"], manifest["config"]["digest"]);
    let platform = format!(
        "{}/{}",
        config["os"].as_str().unwrap(),
        config["architecture"].as_str().unwrap()
    );
    assert_eq!(report["platform"], platform.as_str());
    let want = manifest["layers"].as_array().unwrap();
    let got = report["layers"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let mut total = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g["digest"], w["digest"], "layer {i}");
        assert_eq!(g["size"], w["size"], "layer {i}");
        assert_eq!(g["media_type"], w["mediaType"], "layer {i}");
        assert_eq!(g["diff_id"], config["rootfs"]["diff_ids"][i], "layer {i}");
        assert_eq!(g["compression"], "gzip", "layer {i}");
        assert_eq!(g["lazy_index"], Value::Null, "layer {i}");
        total += w["size"].as_u64().unwrap();
    }
    assert_eq!(report["compressed_size"], total);
}

#[test]
fn inspect_reports_every_shared_image_by_tag_by_digest_and_from_the_layout() {
    let reg = Registry::start(RegistryAuth::None);
    let tags = shared_tags();
    assert_eq!(tags.len(), 3, "expected the three shared images");
    for (tag, digest) in tags {
        reg.push_shared(&tag, &format!("test/{tag}"));
        let by_tag = format!("{}/test/{tag}:latest", reg.host());
        let report = lazylayer(&["inspect", "--json", &by_tag], &[]).json();
        check_report(&report, &digest);
        assert_eq!(report["reference"], by_tag.as_str());
        assert_eq!(report["index_digest"], Value::Null);

        let by_digest = format!("{}/test/{tag}@{digest}", reg.host());
        check_report(
            &lazylayer(&["inspect", "--json", &by_digest], &[]).json(),
            &digest,
        );

        let layout = format!("oci:{}:{tag}", shared_images().display());
        check_report(
            &lazylayer(&["inspect", "--json", &layout], &[]).json(),
            &digest,
        );
    }
    // The human form names every layer digest and the lazy-index column.
    let run = lazylayer(
        &["inspect", &format!("{}/test/python-app", reg.host())],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    for layer in shared_json(&support::shared_manifest_digest("python-app"))["layers"]
        .as_array()
        .unwrap()
    {
        assert!(
            run.stdout.contains(layer["digest"].as_str().unwrap()),
            "{}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("LAZY INDEX") && run.stdout.contains("linux/amd64"));

    let missing = lazylayer(
        &["inspect", &format!("{}/test/nothere:v1", reg.host())],
        &[],
    );
    missing.assert_error(&["manifest not found", "test/nothere", "v1"]);
    let bad_layout_tag = lazylayer(
        &[
            "inspect",
            &format!("oci:{}:nope", shared_images().display()),
        ],
        &[],
    );
    bad_layout_tag.assert_error(&["nope", "python-app"]);
}

#[test]
fn an_index_resolves_to_the_requested_platform() {
    let reg = Registry::start(RegistryAuth::None);
    let (app, debian) = (
        support::shared_manifest_digest("python-app"),
        support::shared_manifest_digest("debian-bookworm"),
    );
    reg.push_shared_as("python-app", "test/multi", "amd");
    reg.push_shared_as("debian-bookworm", "test/multi", "arm");
    let entry = |digest: &str, platform: Value| {
        json!({"mediaType": OCI_MANIFEST, "digest": digest,
               "size": shared_blob(digest).len(), "platform": platform})
    };
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        entry(&app, json!({"os": "linux", "architecture": "amd64"})),
        entry(&debian, json!({"os": "linux", "architecture": "arm64", "variant": "v8"})),
    ]});
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = reg.put_manifest("test/multi", "latest", OCI_INDEX, &index_bytes);
    let image = format!("{}/test/multi", reg.host());

    let default = lazylayer(&["inspect", "--json", &image], &[]).json();
    check_report(&default, &app);
    assert_eq!(default["index_digest"], index_digest.as_str());
    assert_eq!(
        default["index_platforms"],
        json!(["linux/amd64", "linux/arm64/v8"])
    );

    for platform in ["linux/arm64", "linux/arm64/v8", "linux/aarch64"] {
        let arm = lazylayer(&["inspect", "--json", "--platform", platform, &image], &[]).json();
        assert_eq!(arm["manifest_digest"], debian.as_str(), "{platform}");
        assert_eq!(arm["platform"], "linux/arm64");
        assert_eq!(arm["index_digest"], index_digest.as_str());
    }

    let by_digest = format!("{}/test/multi@{index_digest}", reg.host());
    check_report(
        &lazylayer(&["inspect", "--json", &by_digest], &[]).json(),
        &app,
    );

    let text = lazylayer(&["inspect", &image], &[]);
    assert!(
        text.stdout.contains(&format!("index      {index_digest}")),
        "{}",
        text.stdout
    );

    lazylayer(&["inspect", "--platform", "linux/s390x", &image], &[]).assert_error(&[
        "linux/s390x",
        "linux/amd64",
        "linux/arm64/v8",
        "--platform",
    ]);
    lazylayer(&["inspect", "--platform", "linux", &image], &[]).assert_error(&["--platform"]);

    // A single-platform manifest (no index) is checked against its config's platform.
    let single = format!("{}/test/multi:amd", reg.host());
    check_report(
        &lazylayer(
            &["inspect", "--json", "--platform", "linux/amd64", &single],
            &[],
        )
        .json(),
        &app,
    );
    lazylayer(&["inspect", "--platform", "windows/arm", &single], &[]).assert_error(&[
        "windows/arm",
        "linux/amd64",
        "--platform",
    ]);
}

#[test]
fn lazy_index_annotations_are_reported_per_layer() {
    let reg = Registry::start(RegistryAuth::None);
    reg.push_shared("python-app", "test/app");
    let mut manifest = shared_json(&support::shared_manifest_digest("python-app"));
    let toc = Digest::of(b"toc").to_string();
    let chunked = Digest::of(b"chunked").to_string();
    manifest["layers"][0]["annotations"] = json!({"containerd.io/snapshot/stargz/toc.digest": toc});
    manifest["layers"][1]["annotations"] = json!({
        "io.github.containers.zstd-chunked.manifest-checksum": chunked,
        "io.github.containers.zstd-chunked.manifest-position": "100:200:300:1",
    });
    reg.put_manifest(
        "test/app",
        "lazy",
        OCI_MANIFEST,
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let image = format!("{}/test/app:lazy", reg.host());
    let report = lazylayer(&["inspect", "--json", &image], &[]).json();
    let layers = &report["layers"];
    assert_eq!(
        layers[0]["lazy_index"],
        json!({"kind": "estargz", "toc_digest": toc})
    );
    assert_eq!(
        layers[1]["lazy_index"],
        json!({"kind": "zstd-chunked", "manifest_checksum": chunked, "manifest_position": "100:200:300:1"})
    );
    assert_eq!(layers[2]["lazy_index"], Value::Null);
    let text = lazylayer(&["inspect", &image], &[]);
    assert!(
        text.stdout.contains("estargz (toc sha256:"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("zstd:chunked"), "{}", text.stdout);

    manifest["layers"][0]["annotations"] =
        json!({"containerd.io/snapshot/stargz/toc.digest": "sha256:not-a-digest"});
    reg.put_manifest(
        "test/app",
        "broken",
        OCI_MANIFEST,
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let layer0 = manifest["layers"][0]["digest"].as_str().unwrap();
    lazylayer(
        &["inspect", &format!("{}/test/app:broken", reg.host())],
        &[],
    )
    .assert_error(&["toc.digest", layer0]);
}

fn client(host: &str, repo: &str, config: &FetchConfig) -> Repository {
    let ImageRef::Registry(r) = ImageRef::parse(&format!("{host}/{repo}")).unwrap() else {
        panic!()
    };
    // The registry alone, without a hosts directory's mirrors.
    let hosts = lazylayer::source::registry::hosts::registry_hosts(None, &r, false).unwrap();
    Client::for_host(&r.registry, &hosts[0], config)
        .unwrap()
        .repository(&r.repository)
}

fn no_docker_config() -> FetchConfig {
    FetchConfig {
        docker_config: None,
        ..FetchConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn range_reads_return_exactly_the_requested_bytes() {
    let reg = Registry::start(RegistryAuth::None);
    reg.push_shared("python-app", "test/app");
    let repo = client(&reg.host(), "test/app", &no_docker_config());
    let manifest = shared_json(&support::shared_manifest_digest("python-app"));
    let layer: Digest = support::shared_layer("python-app", 2).parse().unwrap();
    let blob = shared_blob(&layer.to_string());
    let len = blob.len() as u64;
    for range in [0..1, 0..4096, 1000..70_000, len - 10..len, 0..len] {
        let got = repo.read_range(&layer, range.clone()).await.unwrap();
        assert_eq!(
            &got[..],
            &blob[range.start as usize..range.end as usize],
            "{range:?}"
        );
    }
    assert!(repo.read_range(&layer, 5..5).await.unwrap().is_empty());
    let err = repo
        .read_range(&layer, len - 10..len + 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::RangeNotSatisfiable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
    assert!(err.to_string().contains(&format!("({len} bytes)")), "{err}");
    let err = repo
        .read_range(&layer, len + 5..len + 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::RangeNotSatisfiable { .. }),
        "{err}"
    );

    let config: Digest = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let size = manifest["config"]["size"].as_u64().unwrap();
    let bytes = repo.blob(&config, size, 1 << 20).await.unwrap();
    assert_eq!(&bytes[..], &shared_blob(&config.to_string())[..]);
    let err = repo.blob(&layer, len, 1 << 20).await.unwrap_err();
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");
}

/// Several ranges of a blob go to distribution in one request (`multipart/byteranges`) and come
/// back as exactly their bytes, in order; a pull-through mirror that does not hold the blob yet
/// answers such a request with the whole blob, so that host then gets one range per request,
/// with the same bytes.
#[tokio::test(flavor = "multi_thread")]
async fn several_ranges_are_one_request_and_a_host_that_cannot_gets_them_one_by_one() {
    use futures_util::StreamExt;
    let origin = Registry::start(RegistryAuth::None);
    origin.push_shared("python-app", "test/app");
    let layer: Digest = support::shared_layer("python-app", 2).parse().unwrap();
    let blob = shared_blob(&layer.to_string());
    let len = blob.len() as u64;
    let ranges = [10..20, 1000..70_000, 70_100..70_101, len - 10..len];
    let want: Vec<u8> = ranges
        .iter()
        .flat_map(|r| blob[r.start as usize..r.end as usize].to_vec())
        .collect();
    let read = |repo: Repository| {
        let (ranges, layer) = (ranges.clone(), layer.clone());
        async move {
            let mut stream = repo.blob_ranges(&layer, &ranges).await.unwrap();
            let mut got = Vec::new();
            while let Some(piece) = stream.next().await {
                got.extend_from_slice(&piece.unwrap());
            }
            (got, repo.joins_ranges())
        }
    };
    // Our GETs of that blob in a registry's log.
    let gets = |log: String| {
        log.lines()
            .filter(|l| {
                l.contains("response completed")
                    && l.contains("lazylayer/")
                    && l.contains(&format!("/blobs/{layer}"))
            })
            .count()
    };
    let (got, joins) = read(client(&origin.host(), "test/app", &no_docker_config())).await;
    assert!(got == want, "the ranges' bytes, in order");
    assert!(joins);
    support::wait_until(
        Duration::from_secs(5),
        || gets(origin.log()) >= 1,
        || origin.log(),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gets(origin.log()), 1, "{}", origin.log());

    let mirror = Registry::start_mirror_of(&origin);
    let (got, joins) = read(client(&mirror.host(), "test/app", &no_docker_config())).await;
    assert!(
        got == want,
        "the ranges' bytes, in order, through the mirror"
    );
    assert!(
        !joins,
        "the mirror sent the whole blob: one range per request from now on"
    );
    // The request for all four, then one per range.
    support::wait_until(
        Duration::from_secs(5),
        || gets(mirror.log()) >= 5,
        || mirror.log(),
    );
}

#[test]
fn htpasswd_auth_uses_user_flag_env_and_docker_config() {
    let anon = Registry::start(RegistryAuth::None);
    anon.push_shared("debian-bookworm", "test/debian");
    let reg = Registry::start_sharing(
        &anon,
        RegistryAuth::Htpasswd {
            user: "alice".into(),
            password: "s3cret".into(),
        },
    );
    let image = format!("{}/test/debian", reg.host());
    let digest = support::shared_manifest_digest("debian-bookworm");

    lazylayer(&["inspect", &image], &[]).assert_error(&[
        "unauthorized",
        reg.host().as_str(),
        "--user",
    ]);
    let wrong = lazylayer(&["inspect", "--user", "alice:wrong", &image], &[]);
    wrong.assert_error(&["unauthorized", "credentials refused"]);
    assert!(
        !wrong.stderr.contains("alice:wrong"),
        "password echoed: {}",
        wrong.stderr
    );

    check_report(
        &lazylayer(
            &["inspect", "--json", "--user", "alice:s3cret", &image],
            &[],
        )
        .json(),
        &digest,
    );
    check_report(
        &lazylayer(
            &["inspect", "--json", &image],
            &[("LAZYLAYER_USER", "alice:s3cret")],
        )
        .json(),
        &digest,
    );

    let dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(
        dir.path().join("config.json"),
        json!({"auths": {reg.host(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let cfg_dir = dir.path().to_str().unwrap();
    check_report(
        &lazylayer(
            &["inspect", "--json", &image],
            &[("DOCKER_CONFIG", cfg_dir)],
        )
        .json(),
        &digest,
    );
    let explicit = dir.path().join("config.json");
    check_report(
        &lazylayer(
            &[
                "inspect",
                "--json",
                "--docker-config",
                explicit.to_str().unwrap(),
                &image,
            ],
            &[],
        )
        .json(),
        &digest,
    );

    // Credential helpers, as Docker runs them: `credHelpers` for this registry wins over
    // `credsStore`, which wins over `auths`. The helper gets the registry on stdin.
    let helpers = tempfile::tempdir().unwrap();
    for (name, body) in [
        (
            "good",
            r#"read s; [ "$s" = "$LL_HOST" ] || exit 9; echo '{"Username":"alice","Secret":"s3cret"}'"#,
        ),
        ("locked", "echo 'the keyring is locked'; exit 1"),
        ("hangs", "sleep 60"),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let path = helpers.path().join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        helpers.path().display(),
        std::env::var("PATH").unwrap()
    );
    let with_helpers = |config: serde_json::Value| {
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        lazylayer(
            &["inspect", "--json", &image],
            &[
                ("DOCKER_CONFIG", cfg_dir),
                ("PATH", &path),
                ("LL_HOST", &reg.host()),
            ],
        )
    };
    let wrong = base64::engine::general_purpose::STANDARD.encode("alice:wrong");
    check_report(
        &with_helpers(
            json!({"credsStore": "locked", "credHelpers": {reg.host(): "good"},
                             "auths": {reg.host(): {"auth": wrong}}}),
        )
        .json(),
        &digest,
    );
    check_report(
        &with_helpers(json!({"credsStore": "good", "auths": {reg.host(): {"auth": wrong}}})).json(),
        &digest,
    );
    with_helpers(json!({"credsStore": "locked"})).assert_error(&[
        "docker-credential-locked",
        "config.json",
        "keyring is locked",
    ]);
    with_helpers(json!({"credsStore": "missing"}))
        .assert_error(&["docker-credential-missing", "not found on PATH"]);
    let started = std::time::Instant::now();
    with_helpers(json!({"credHelpers": {reg.host(): "hangs"}}))
        .assert_error(&["docker-credential-hangs", "no answer within 10 s"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    std::fs::write(
        dir.path().join("config.json"),
        json!({"auths": {reg.host(): {"auth": auth}}}).to_string(),
    )
    .unwrap();

    // A `--docker-config` that names no file is an error, not an anonymous request.
    lazylayer(
        &[
            "inspect",
            "--docker-config",
            dir.path().join("typo.json").to_str().unwrap(),
            &image,
        ],
        &[],
    )
    .assert_error(&["--docker-config", "typo.json"]);

    // A push these credentials may not make fails before any layer is converted.
    let refused = lazylayer(
        &[
            "convert",
            "--user",
            "alice:wrong",
            &format!("oci:{}:debian-bookworm", shared_images().display()),
            &format!("{}/test/converted:x", reg.host()),
        ],
        &[],
    );
    refused.assert_error(&["pushing to", "test/converted", "credentials refused"]);
    assert!(
        !refused.stderr.contains("layer 1/"),
        "converted before the push was refused: {}",
        refused.stderr
    );

    // A mount's daemon lives as long as the mount: its command line (readable by every user in
    // /proc) must not hold the password, and it still authenticates.
    let cache = tempfile::tempdir().unwrap();
    let mounted = support::mount::Mounted::with_args(
        &format!("{image}:latest"),
        cache.path(),
        &["--no-background-fetch", "-vu", "alice:s3cret"],
    );
    assert!(
        std::fs::read(mounted.join("etc/os-release"))
            .unwrap()
            .starts_with(b"PRETTY_NAME")
    );
    let pid = mounted.stats()["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("mount"), "{cmdline}");
    assert!(
        !cmdline.contains("s3cret"),
        "password in the daemon's argv: {cmdline}"
    );
}

fn token_registry(anon: &Registry, policy: TokenPolicy) -> (TokenServer, Registry) {
    let tokens = TokenServer::start(policy);
    let reg = Registry::start_sharing(
        anon,
        RegistryAuth::Token {
            realm: tokens.realm(),
            service: tokens.service.clone(),
            issuer: tokens.issuer.clone(),
            cert: tokens.cert.clone(),
        },
    );
    (tokens, reg)
}

fn bob() -> TokenPolicy {
    TokenPolicy {
        user: "bob".into(),
        password: "hunter2".into(),
        valid_for: 300,
        expires_in: 300,
    }
}

#[test]
fn token_auth_with_credentials_and_clear_errors_without() {
    let anon = Registry::start(RegistryAuth::None);
    anon.push_shared("python3", "test/py");
    let (tokens, reg) = token_registry(&anon, bob());
    let image = format!("{}/test/py", reg.host());
    check_report(
        &lazylayer(&["inspect", "--json", "--user", "bob:hunter2", &image], &[]).json(),
        &support::shared_manifest_digest("python3"),
    );
    assert!(tokens.requests() >= 1);
    lazylayer(&["inspect", &image], &[]).assert_error(&[
        "unauthorized",
        "token server",
        "anonymous",
    ]);
    lazylayer(&["inspect", "--user", "bob:nope", &image], &[]).assert_error(&[
        "unauthorized",
        "token server",
        "refused the given credentials",
    ]);
}

/// Reads ranges of a layer in a loop for `duration`; every read must return the right bytes.
async fn read_for(repo: &Repository, layer: &Digest, blob: &[u8], duration: Duration) -> usize {
    let start = Instant::now();
    let mut reads = 0;
    let mut offset = 0usize;
    while start.elapsed() < duration {
        let end = (offset + 65_536).min(blob.len());
        let got = repo
            .read_range(layer, offset as u64..end as u64)
            .await
            .unwrap_or_else(|e| panic!("read {reads} at {offset} failed: {e}"));
        assert_eq!(&got[..], &blob[offset..end]);
        reads += 1;
        offset = (offset + 1_000_003) % (blob.len() - 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reads
}

/// Range reads through a token-auth registry whose tokens are refused `valid_for` seconds after
/// issue while the client is told `expires_in`. Returns the number of times the registry
/// refused an expired token (distribution logs "token not to be used after" for each).
async fn token_renewal_case(valid_for: i64, expires_in: u64) -> usize {
    let anon = Registry::start(RegistryAuth::None);
    anon.push_shared("python3", "test/py");
    let policy = TokenPolicy {
        valid_for,
        expires_in,
        ..bob()
    };
    let (tokens, reg) = token_registry(&anon, policy);
    let config = FetchConfig {
        credentials: Some(Credentials::parse("bob:hunter2").unwrap()),
        ..no_docker_config()
    };
    let repo = client(&reg.host(), "test/py", &config);
    repo.registry().ping().await.unwrap();
    let layer: Digest = support::shared_layer("python3", 1).parse().unwrap();
    let blob = shared_blob(&layer.to_string());
    let reads = read_for(&repo, &layer, &blob, Duration::from_secs(6)).await;
    assert!(reads > 10, "only {reads} reads");
    assert!(
        tokens.requests() >= 3,
        "expected the token to be renewed at least twice, token server saw {} requests",
        tokens.requests()
    );
    reg.log()
        .lines()
        .filter(|l| l.contains("token not to be used after"))
        .count()
}

/// The token server says 2 s and the registry accepts the token for 4 s (JWT times are whole
/// seconds): the client renews ahead of `expires_in`, so the registry never refuses a token.
#[tokio::test(flavor = "multi_thread")]
async fn token_is_renewed_before_it_expires_during_range_reads() {
    assert_eq!(
        token_renewal_case(4, 2).await,
        0,
        "an expired token was presented"
    );
}

/// The token server says the token lives an hour but the registry refuses it after 2 s: the
/// client must notice the 401 and fetch a new token without failing the read.
#[tokio::test(flavor = "multi_thread")]
async fn token_refused_mid_run_is_renewed_without_a_failed_read() {
    assert!(
        token_renewal_case(2, 3600).await >= 1,
        "the registry never refused a token"
    );
}

/// A server that answers with bytes that do not match what was asked for.
#[test]
fn content_that_does_not_match_its_digest_is_rejected() {
    let app = support::shared_manifest_digest("python-app");
    let manifest_bytes = shared_blob(&app);
    let manifest = shared_json(&app);
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    let (app2, config2) = (app.clone(), config.clone());
    let server = HttpServer::start(move |req| {
        let path = req.path();
        let oci = |body: Vec<u8>| {
            Response::new(200)
                .header("Content-Type", OCI_MANIFEST)
                .body(body)
        };
        if path == "/v2/" {
            Response::new(200)
        } else if path == format!("/v2/bad/manifests/{app2}") {
            let mut tampered = manifest_bytes.clone();
            tampered.push(b' ');
            oci(tampered)
        } else if path == "/v2/bad/manifests/latest" {
            let wrong = Digest::of(b"something else").to_string();
            oci(manifest_bytes.clone()).header("Docker-Content-Digest", &wrong)
        } else if path == "/v2/badconfig/manifests/latest" {
            oci(manifest_bytes.clone())
        } else if path == format!("/v2/badconfig/blobs/{config2}") {
            let mut cfg = shared_blob(&config2);
            cfg[10] ^= 1;
            Response::new(200).body(cfg)
        } else if path == "/v2/huge/manifests/latest" {
            oci(vec![b' '; 5 << 20])
        } else {
            Response::new(404)
        }
    });
    let host = format!("127.0.0.1:{}", server.port);
    lazylayer(&["inspect", &format!("{host}/bad@{app}")], &[])
        .assert_error(&["does not match", &app]);
    lazylayer(&["inspect", &format!("{host}/bad:latest")], &[]).assert_error(&["does not match"]);
    lazylayer(&["inspect", &format!("{host}/badconfig")], &[])
        .assert_error(&["does not match", &config]);
    lazylayer(&["inspect", &format!("{host}/huge")], &[]).assert_error(&["limit"]);
}

/// A registry front that redirects blob GETs to another host (as distribution does with S3 or
/// a CDN): the registry's Authorization must not follow, and the target must be reused until
/// it stops working.
#[tokio::test(flavor = "multi_thread")]
async fn blob_redirects_drop_authorization_and_are_remembered() {
    let layer: Digest = support::shared_layer("python-app", 2).parse().unwrap();
    let blob = Arc::new(shared_blob(&layer.to_string()));
    let signature = Arc::new(AtomicUsize::new(1));
    let cdn_seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();

    let (sig, seen, bytes) = (signature.clone(), cdn_seen.clone(), blob.clone());
    let cdn = HttpServer::start(move |req| {
        seen.lock()
            .unwrap()
            .push(req.header("authorization").map(str::to_string));
        let current = sig.load(Ordering::SeqCst).to_string();
        if req.query("sig").as_deref() != Some(current.as_str()) {
            return Response::new(403).body("signature expired");
        }
        Response::ranged(req, &bytes)
    });
    let front_blob_gets = Arc::new(AtomicUsize::new(0));
    let (sig, gets, cdn_port) = (signature.clone(), front_blob_gets.clone(), cdn.port);
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:pw")
    );
    let front = HttpServer::start(move |req| {
        if req.header("authorization") != Some(basic.as_str()) {
            return Response::new(401).header("WWW-Authenticate", "Basic realm=\"front\"");
        }
        if req.path() == "/v2/" {
            return Response::new(200);
        }
        if let Some(hex) = req.path().strip_prefix("/v2/test/app/blobs/sha256:") {
            gets.fetch_add(1, Ordering::SeqCst);
            let location = format!(
                "http://localhost:{cdn_port}/blobs/{hex}?sig={}",
                sig.load(Ordering::SeqCst)
            );
            return Response::new(307).header("Location", &location);
        }
        Response::new(404)
    });

    let config = FetchConfig {
        credentials: Some(Credentials::parse("alice:pw").unwrap()),
        ..no_docker_config()
    };
    let repo = client(&format!("127.0.0.1:{}", front.port), "test/app", &config);
    repo.registry().ping().await.unwrap();
    let read = |r: std::ops::Range<u64>| {
        let (repo, layer, blob) = (&repo, &layer, &blob);
        async move {
            let got = repo.read_range(layer, r.clone()).await.unwrap();
            assert_eq!(&got[..], &blob[r.start as usize..r.end as usize]);
        }
    };
    read(0..100).await;
    read(5000..90_000).await;
    assert_eq!(
        front_blob_gets.load(Ordering::SeqCst),
        1,
        "second range should skip the registry"
    );
    assert_eq!(cdn_seen.lock().unwrap().len(), 2);

    // The signed URL expires: the client drops it and asks the registry for a fresh one.
    signature.store(2, Ordering::SeqCst);
    read(100..200).await;
    assert_eq!(front_blob_gets.load(Ordering::SeqCst), 2);
    let seen = cdn_seen.lock().unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen.iter().all(Option::is_none),
        "Authorization leaked to the redirect target: {seen:?}"
    );
}

#[test]
fn dead_and_stalled_registries_fail_with_a_clear_error() {
    let port = support::free_port();
    // Retried until --read-timeout (60 s by default), as an outage would be.
    lazylayer(
        &[
            "inspect",
            "--read-timeout",
            "2",
            &format!("127.0.0.1:{port}/x"),
        ],
        &[],
    )
    .assert_error(&["cannot reach registry", &format!("127.0.0.1:{port}")]);

    let stalled = HttpServer::start(|req| {
        if req.path() == "/v2/" {
            return Response::new(200);
        }
        std::thread::sleep(Duration::from_secs(30));
        Response::new(500)
    });
    let started = Instant::now();
    // Each stalled attempt ends after --stall-timeout; stalls are retried (an outage costs
    // latency, not errors) until --read-timeout passes without a byte.
    lazylayer(
        &[
            "inspect",
            "--stall-timeout",
            "1",
            "--read-timeout",
            "3",
            &format!("127.0.0.1:{}/x", stalled.port),
        ],
        &[],
    )
    .assert_error(&["timed out", "--stall-timeout"]);
    // Not a timing assertion on speed: only that our timeouts, not the server, ended it.
    assert!(started.elapsed() < Duration::from_secs(25));

    lazylayer(&["inspect", "--stall-timeout", "0", "x"], &[]).assert_error(&["--stall-timeout"]);
}

/// Layers whose bytes match their digest but are not what their media type says (not gzip; gzip
/// of something that is not tar) can never be read: the error names the layer at once, after one
/// download, instead of downloading the layer again for each retry.
#[test]
fn malformed_layers_with_valid_digests_fail_after_one_download() {
    let registry = Registry::start(RegistryAuth::None);
    let not_tar = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &[b'A'; 3000]).unwrap();
        gz.finish().unwrap()
    };
    for (tag, layer) in [
        ("not-gzip", b"this is not a gzip stream at all".repeat(100)),
        ("not-tar", not_tar),
    ] {
        let layer_digest = registry
            .push_image(
                "test/bad",
                tag,
                &[layer],
                Some(vec![Digest::of(b"unknown").to_string()]),
            )
            .remove(0);
        let reference = format!("{}/test/bad:{tag}", registry.host());
        lazylayer(&["ls", &reference, "/"], &[]).assert_error(&[&layer_digest]);
        let downloads = registry
            .log()
            .lines()
            .filter(|l| l.contains(&format!("GET /v2/test/bad/blobs/{layer_digest}")))
            .count();
        assert_eq!(
            downloads, 1,
            "{tag}: the layer was downloaded {downloads} times"
        );
    }
}

/// A GNU sparse file in a plain gzip layer reads as containerd unpacks it, with its holes as
/// zeros: `cat` while the layer streams, `ls -l` and a mount.
#[test]
fn a_sparse_file_reads_with_its_holes_through_cat_ls_and_a_mount() {
    let registry = Registry::start(RegistryAuth::None);
    let (tar, expected) = support::gnu_sparse_tar("1.0");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    registry.push_image("test/sparse", "latest", &[gz.finish().unwrap()], None);
    let image = format!("{}/test/sparse:latest", registry.host());
    let cat = std::process::Command::new(env!("CARGO_BIN_EXE_lazylayer"))
        .args(["cat", &image, "/hole"])
        .env("LAZYLAYER_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(
        cat.status.success(),
        "{}",
        String::from_utf8_lossy(&cat.stderr)
    );
    assert!(cat.stdout == expected, "cat printed other bytes");
    let listed = lazylayer(&["ls", "-l", &image, "/"], &[]);
    assert!(
        listed.stdout.contains(&format!("{} ", expected.len())) && listed.stdout.contains("hole"),
        "{}",
        listed.stdout
    );
    assert!(
        !listed.stdout.contains("GNUSparseFile"),
        "{}",
        listed.stdout
    );
    let mounted = support::mount::Mounted::new(&image);
    assert!(std::fs::read(mounted.join("hole")).unwrap() == expected);
}

/// A layer that matches its digest but not the config's `rootfs.diff_ids` is refused, as
/// containerd refuses it, naming the layer and the config field; once, not retried.
#[test]
fn a_layer_that_is_not_its_diff_id_is_refused() {
    let registry = Registry::start(RegistryAuth::None);
    let layer = support::layer_of(&[("hello", tar::EntryType::Regular, "hello")]);
    let pushed = registry.push_image("test/diffid", "good", std::slice::from_ref(&layer), None);
    let good = format!("{}/test/diffid:good", registry.host());
    let listed = lazylayer(&["ls", &good, "/"], &[]);
    assert!(listed.stdout.contains("hello"), "{}", listed.stderr);
    let wrong = Digest::of(b"some other layer").to_string();
    registry.push_image("test/diffid", "bad", &[layer], Some(vec![wrong.clone()]));
    let bad = format!("{}/test/diffid:bad", registry.host());
    lazylayer(&["ls", &bad, "/"], &[]).assert_error(&[&pushed[0], &wrong, "rootfs.diff_ids"]);
    let downloads = registry
        .log()
        .lines()
        .filter(|l| l.contains(&format!("GET /v2/test/diffid/blobs/{}", pushed[0])))
        .count();
    assert_eq!(downloads, 2, "good once, bad once (not retried)");
}

/// Writes `DIR/HOST/hosts.toml` (containerd's hosts directory layout) and returns DIR's path.
fn hosts_toml(root: &std::path::Path, host: &str, text: &str) -> String {
    let dir = root.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), text).unwrap();
    root.to_str().unwrap().to_string()
}

/// A registry behind TLS with a private CA (openssl) and then also wanting client certificates:
/// refused, without retries, with a message saying what to configure; read once hosts.toml names
/// the CA (a path relative to its directory), or says skip_verify, and the client certificate.
/// Broken files are errors naming them, and leave other registries working.
#[test]
fn a_tls_registry_is_read_with_the_ca_and_client_certificate_its_hosts_toml_names() {
    let tls = support::TestCa::new();
    let plain = Registry::start(RegistryAuth::None);
    plain.push_shared("debian-bookworm", "test/tls");
    let server = Registry::start_tls_sharing(&plain, &tls, false);
    let hosts = tempfile::tempdir().unwrap();
    let host = server.host();
    let host_dir = hosts.path().join(&host);
    let image = format!("{host}/test/tls:latest");
    let expected = std::fs::read(
        support::conformance::umoci_unpack("debian-bookworm", hosts.path()).join("etc/os-release"),
    )
    .unwrap();
    let cat = |dir: &str| lazylayer(&["cat", "--hosts-dir", dir, &image, "/etc/os-release"], &[]);

    let dir = hosts_toml(
        hosts.path(),
        &host,
        &format!("server = \"https://{host}\"\n"),
    );
    let started = Instant::now();
    cat(&dir).assert_error(&[&host, "certificate", "`ca`", "hosts.toml"]);
    // Not a timing assertion on speed: a certificate failure is not retried until
    // --read-timeout (60 s), as a refused connection would be.
    assert!(started.elapsed() < Duration::from_secs(30));

    std::fs::copy(&tls.ca, host_dir.join("ca.crt")).unwrap();
    hosts_toml(
        hosts.path(),
        &host,
        &format!("server = \"https://{host}\"\nca = \"ca.crt\"\n"),
    );
    let run = cat(&dir);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stdout.as_bytes(), expected);

    hosts_toml(
        hosts.path(),
        &host,
        &format!("server = \"https://{host}\"\nskip_verify = true\n"),
    );
    let run = cat(&dir);
    assert!(run.status.success(), "{}", run.stderr);

    // Broken configuration: named, and the plain registry in the same directory still reads.
    hosts_toml(
        hosts.path(),
        &host,
        &format!("server = \"https://{host}\"\nca = \"absent.crt\"\n"),
    );
    cat(&dir).assert_error(&["absent.crt", "hosts.toml"]);
    hosts_toml(hosts.path(), &host, "server = [\"unclosed\"\n");
    cat(&dir).assert_error(&[&host_dir.join("hosts.toml").display().to_string()]);
    let other = format!("{}/test/tls:latest", plain.host());
    let run = lazylayer(
        &["cat", "--hosts-dir", &dir, &other, "/etc/os-release"],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);

    // A registry that wants a client certificate.
    let strict = Registry::start_tls_sharing(&plain, &tls, true);
    let host = strict.host();
    let host_dir = hosts.path().join(&host);
    let image = format!("{host}/test/tls:latest");
    let cat = |dir: &str| lazylayer(&["cat", "--hosts-dir", dir, &image, "/etc/os-release"], &[]);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::copy(&tls.ca, host_dir.join("ca.crt")).unwrap();
    std::fs::copy(&tls.client_cert, host_dir.join("client.cert")).unwrap();
    std::fs::copy(&tls.client_key, host_dir.join("client.key")).unwrap();
    let base = format!("server = \"https://{host}\"\nca = \"ca.crt\"\n");
    hosts_toml(hosts.path(), &host, &base);
    cat(&dir).assert_error(&[&host, "client certificate", "`client`"]);
    hosts_toml(
        hosts.path(),
        &host,
        &format!("{base}client = [[\"client.cert\", \"client.key\"]]\n"),
    );
    let run = cat(&dir);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stdout.as_bytes(), expected);
    // A key that is not the certificate's: both files named.
    hosts_toml(
        hosts.path(),
        &host,
        &format!(
            "{base}client = [[\"client.cert\", \"{}\"]]\n",
            tls.server_key.display()
        ),
    );
    cat(&dir).assert_error(&[&host, "client.cert", &tls.server_key.display().to_string()]);
}

/// A node's mirror named in hosts.toml (docker-registry as a pull-through cache of the origin)
/// serves a mount's lazy reads; when the mirror stops mid-mount, the reads go on from the
/// registry itself, with the right bytes and no failed read.
#[test]
fn lazy_reads_go_through_the_hosts_toml_mirror_and_survive_its_loss() {
    let origin = Registry::start(RegistryAuth::None);
    let image = format!("{}/test/app:lazy", origin.host());
    let shared = format!("oci:{}:debian-bookworm", shared_images().display());
    let run = lazylayer(&["convert", &shared, &image], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    let mut mirror = Registry::start_mirror_of(&origin);
    let hosts = tempfile::tempdir().unwrap();
    let dir = hosts_toml(
        hosts.path(),
        &origin.host(),
        &format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            origin.host(),
            mirror.host()
        ),
    );
    let rootfs = support::conformance::umoci_unpack("debian-bookworm", hosts.path());
    let mut files: Vec<String> = [
        "usr/bin",
        "usr/lib/x86_64-linux-gnu",
        "etc",
        "usr/share/doc",
    ]
    .iter()
    .flat_map(|d| std::fs::read_dir(rootfs.join(d)).unwrap())
    .map(|e| e.unwrap().path())
    .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
    .map(|p| p.strip_prefix(&rootfs).unwrap().display().to_string())
    .collect();
    files.sort();
    // Our requests for content, in a registry log after `from` bytes.
    let ours = |log: String, from: usize| {
        log[from..]
            .lines()
            .filter(|l| {
                l.contains("lazylayer/") && (l.contains("/blobs/") || l.contains("/manifests/"))
            })
            .count()
    };
    let origin_from = origin.log().len();
    let cache = tempfile::tempdir().unwrap();
    let mount = support::mount::Mounted::with_args(
        &image,
        cache.path(),
        &["--hosts-dir", &dir, "--no-background-fetch"],
    );
    let check = |range: std::ops::Range<usize>| {
        for f in &files[range] {
            let got = std::fs::read(mount.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(got == std::fs::read(rootfs.join(f)).unwrap(), "{f}");
        }
    };
    let half = files.len() / 2;
    check(0..half.min(40));
    assert!(ours(mirror.log(), 0) > 0, "no lazy read reached the mirror");
    assert_eq!(
        ours(origin.log(), origin_from),
        0,
        "the registry was asked for content while its mirror was up"
    );
    let origin_from = origin.log().len();

    mirror.kill();
    check(half..files.len());
    assert!(
        ours(origin.log(), origin_from) > 0,
        "no read reached the registry itself"
    );
    let log = mount.daemon_log();
    assert!(log.contains("registry host unreachable"), "{log}");
    let stats = mount.stats();
    assert_eq!(stats["failed_reads"], 0, "{stats}");
}

//! S3 as an image source, against a real S3 server on loopback (`s3s-fs`, which checks SigV4
//! signatures): the shared images and an eStargz python-app (written by ctr-remote, copied to an
//! OCI layout by skopeo) stored as OCI layouts in a bucket read exactly like `umoci unpack` of
//! the same images; the mounted eStargz app runs while fetching only part of the image; wrong
//! credentials, a wrong prefix and an ambiguous layout get clear errors. A registry whose
//! storage driver is S3 redirects blob reads there; they go without the registry's credentials,
//! straight to S3 after the first redirect.

mod support;

use std::process::Command;

use support::conformance::{assert_same_tree, disk_tree, umoci_unpack};
use support::containerd::python_app_as_estargz;
use support::mount::Mounted;
use support::proxy::FaultProxy;
use support::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use support::{Registry, RegistryAuth, lazylayer, shared_images, shared_layer};

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn images_in_a_bucket_read_like_umoci_and_the_mounted_app_runs() {
    let s3 = S3Server::start();
    s3.put_layout("images", "shared", &shared_images());
    let (_registry, estargz) = python_app_as_estargz();
    let esgz = tempfile::tempdir().unwrap();
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{estargz}"))
        .arg(format!("oci:{}:python-app", esgz.path().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s3.put_layout("images", "esgz", esgz.path());
    let env = s3.env();
    let envs = env_refs(&env);
    let work = tempfile::tempdir().unwrap();
    let reference_root = umoci_unpack("python-app", work.path());

    // inspect, ls and cat straight from the bucket.
    let run = lazylayer(&["inspect", "s3://images/shared:python-app"], &envs);
    assert!(run.status.success(), "inspect: {}", run.stderr);
    assert!(
        run.stdout.contains(&shared_layer("python-app", 2)[7..19]),
        "{}",
        run.stdout
    );
    let run = lazylayer(&["ls", "s3://images/esgz:python-app", "/app"], &envs);
    assert!(run.status.success(), "ls: {}", run.stderr);
    assert!(run.stdout.contains("main.py"), "{}", run.stdout);
    let run = lazylayer(
        &["cat", "s3://images/esgz:python-app", "/etc/os-release"],
        &envs,
    );
    assert!(run.status.success(), "cat: {}", run.stderr);
    assert_eq!(
        run.stdout.as_bytes(),
        std::fs::read(reference_root.join("etc/os-release")).unwrap()
    );

    // The plain gzip image, mounted, equals umoci's tree. The endpoint comes from the flag here.
    let flag_env: Vec<(&str, &str)> = envs
        .iter()
        .copied()
        .filter(|(k, _)| *k != "AWS_ENDPOINT_URL")
        .collect();
    let cache = tempfile::tempdir().unwrap();
    let endpoint = s3.endpoint();
    let mounted = Mounted::with_env(
        "s3://images/shared:python-app",
        cache.path(),
        &["--s3-endpoint", &endpoint],
        &flag_env,
    );
    assert_same_tree(
        "gzip python-app from S3",
        &disk_tree(&reference_root),
        &disk_tree(mounted.path()),
    );
    drop(mounted);

    // The eStargz image runs its app, fetching a fraction of it.
    let cache = tempfile::tempdir().unwrap();
    let mounted = Mounted::with_env(
        "s3://images/esgz:python-app",
        cache.path(),
        &["--no-background-fetch"],
        &envs,
    );
    mounted.run_app();
    let (fetched, total) = mounted.fetched_and_total();
    assert!(
        fetched * 2 < total,
        "fetched {fetched} of {total} bytes to run the app"
    );
}

#[test]
fn bad_credentials_prefix_or_tag_are_clear_errors() {
    let s3 = S3Server::start();
    s3.put_layout("images", "shared", &shared_images());
    let env = s3.env();
    let mut wrong = env.clone();
    for (k, v) in wrong.iter_mut() {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = "not-the-secret".into();
        }
    }
    lazylayer(
        &["inspect", "s3://images/shared:python-app"],
        &env_refs(&wrong),
    )
    .assert_error(&[
        "s3://images/shared/index.json",
        "refused",
        "AWS_SECRET_ACCESS_KEY",
    ]);
    let envs = env_refs(&env);
    lazylayer(&["inspect", "s3://images/elsewhere:python-app"], &envs)
        .assert_error(&["s3://images/elsewhere/index.json", "not found"]);
    lazylayer(&["inspect", "s3://images/shared"], &envs)
        .assert_error(&["holds 3 images", "python-app"]);
    lazylayer(&["inspect", "s3://images/shared:nope"], &envs)
        .assert_error(&["no image tagged `nope`", "debian-bookworm"]);
}

/// A registry whose storage is S3 answers blob GETs with 307s to pre-signed S3 URLs: the mount
/// follows them without the registry's credentials, and after the first redirect of a blob its
/// range reads go straight to S3.
#[test]
fn registry_on_s3_redirects_and_credentials_stay_with_the_registry() {
    let s3 = S3Server::start();
    // s3s-fs lacks the multipart listing distribution needs for uploads, so the images are
    // pushed to a filesystem registry and its storage tree (the same layout the S3 driver
    // uses) copied into the bucket; the S3-backed registry then only reads, as in production.
    let (fs_registry, estargz) = python_app_as_estargz();
    s3.put_layout("registry", "", &fs_registry.storage);
    // A proxy in front of S3 sees every request that reaches it.
    let s3_proxy = FaultProxy::start(s3.port, &[]);
    let registry = Registry::start_on_s3(
        &format!("http://127.0.0.1:{}", s3_proxy.port),
        "registry",
        (ACCESS_KEY, SECRET_KEY),
        s3.root.path().join("registry"),
        RegistryAuth::Htpasswd {
            user: "alice".into(),
            password: "wonderland".into(),
        },
    );
    let reference = estargz.replace(&fs_registry.host(), &registry.host());
    let cache = tempfile::tempdir().unwrap();
    let mounted = Mounted::with_args(
        &reference,
        cache.path(),
        &["--no-background-fetch", "--user", "alice:wonderland"],
    );
    mounted.run_app();

    // The registry's own S3 calls are signed with its keys in a header; the client's are the
    // pre-signed URLs the registry handed out, and must carry nothing else.
    let client_gets: Vec<_> = s3_proxy
        .requests()
        .into_iter()
        .filter(|(method, path, _, _)| method == "GET" && path.contains("X-Amz-Signature="))
        .collect();
    let with_auth = client_gets.iter().filter(|r| r.3).count();
    assert_eq!(
        with_auth,
        0,
        "{with_auth} of {} pre-signed GETs carried an Authorization header",
        client_gets.len()
    );
    let registry_blob_gets = registry
        .log()
        .lines()
        .filter(|l| {
            l.contains("response completed")
                && l.contains("http.request.method=GET")
                && l.contains("/blobs/sha256:")
        })
        .count();
    let distinct_blobs: std::collections::BTreeSet<_> = client_gets
        .iter()
        .filter_map(|(_, path, _, _)| path.split("/blobs/sha256/").nth(1))
        .map(|p| p.split('/').nth(1).unwrap_or_default().to_string())
        .collect();
    eprintln!(
        "{} pre-signed GETs at S3 for {} blobs, {registry_blob_gets} blob GETs at the registry",
        client_gets.len(),
        distinct_blobs.len()
    );
    assert!(
        client_gets.len() > 2 * distinct_blobs.len(),
        "too few range reads to tell: {} for {} blobs",
        client_gets.len(),
        distinct_blobs.len()
    );
    assert!(
        registry_blob_gets <= 2 * distinct_blobs.len(),
        "{registry_blob_gets} blob GETs went to the registry for {} blobs",
        distinct_blobs.len()
    );
}

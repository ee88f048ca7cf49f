//! `lazylayer convert`: every shared image rewritten as eStargz reads back equal to `umoci
//! unpack` of the original, byte-identically on a second run; a converted image pushed to the
//! real registry is pulled and run by plain containerd, its TOCs are read by stargz-snapshotter's
//! own tooling (`ctr-remote image get-toc-digest`), and `--prioritize` files are prefetched at
//! mount through the landmark, and by the snapshotter as soon as `lazylayer pull` has the TOCs.

mod support;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use lazylayer::fs::{ImageFs, ImageFsOptions};
use lazylayer::layer::LayerFormat;
use lazylayer::model::oci::{ANNOTATION_ESTARGZ_TOC as ESTARGZ_TOC, Platform};
use lazylayer::model::reference::ImageRef;
use lazylayer::source::config::FetchConfig;
use lazylayer::source::open::open_image;
use lazylayer::source::stats::FetchStats;
use support::conformance::{assert_same_tree, disk_tree, image_tree, umoci_unpack};
use support::containerd::{Containerd, Snapshotter};
use support::mount::Mounted;
use support::proxy::FaultProxy;
use support::{Registry, RegistryAuth, lazylayer, shared_images};

fn convert(src: &str, dst: &str, extra: &[&str]) -> String {
    let mut args = vec!["convert", "--plain-http"];
    args.extend_from_slice(extra);
    args.extend([src, dst]);
    let run = lazylayer(&args, &[]);
    assert!(run.status.success(), "convert {src} {dst}: {}", run.stderr);
    run.stdout
}

async fn open(reference: &str) -> Arc<ImageFs> {
    let reference = ImageRef::parse(reference).unwrap();
    let opened = open_image(
        &reference,
        None,
        &FetchConfig::default(),
        &Platform::host(),
        None,
    )
    .await
    .unwrap();
    Arc::new(
        ImageFs::open(opened, &ImageFsOptions::default())
            .await
            .unwrap_or_else(|e| panic!("open {reference}: {e}")),
    )
}

/// Every file of an OCI layout, by path relative to it, with its bytes.
fn layout_files(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let name = path.strip_prefix(root).unwrap().display().to_string();
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// The config's diff IDs must be the digests of the layers' uncompressed tar streams.
fn assert_diff_ids_match(layout: &Path, manifest: &serde_json::Value) {
    let blob = |digest: &str| {
        std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(diff_ids.len(), layers.len());
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let compressed = blob(layer["digest"].as_str().unwrap());
        let mut tar = Vec::new();
        if layer["mediaType"].as_str().unwrap().ends_with("+zstd") {
            zstd::stream::read::Decoder::new(&compressed[..])
                .unwrap()
                .read_to_end(&mut tar)
                .unwrap();
        } else {
            flate2::read::MultiGzDecoder::new(&compressed[..])
                .read_to_end(&mut tar)
                .unwrap();
        }
        assert_eq!(
            format!("sha256:{}", support::sha256_hex(&tar)),
            diff_id.as_str().unwrap()
        );
        let toc = layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"].as_str();
        assert!(toc.is_some_and(|t| t.starts_with("sha256:")), "{layer}");
    }
}

fn manifest_of(layout: &Path, tag: &str) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()
        .clone();
    let digest = entry["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(digest)).unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_images_as_estargz_match_umoci_and_convert_identically_twice() {
    shared_images_convert_to("estargz", LayerFormat::Estargz).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_images_as_zstd_chunked_match_umoci_and_convert_identically_twice() {
    shared_images_convert_to("zstd-chunked", LayerFormat::ZstdChunked).await;
}

async fn shared_images_convert_to(flag: &str, format: LayerFormat) {
    let work = tempfile::tempdir().unwrap();
    let (first, second) = (work.path().join("first"), work.path().join("second"));
    for tag in ["debian-bookworm", "python3", "python-app"] {
        let src = format!("oci:{}:{tag}", shared_images().display());
        let dst = format!("oci:{}:{tag}", first.display());
        let printed = convert(&src, &dst, &["-q", "--format", flag]);
        assert!(printed.is_empty(), "--quiet printed {printed}");
        let again = format!("oci:{}:{tag}", second.display());
        convert(&src, &again, &["-q", "--format", flag]);

        let manifest = manifest_of(&first, tag);
        assert_diff_ids_match(&first, &manifest);

        let fs = open(&dst).await;
        for layer in &fs.layers {
            assert_eq!(layer.format, format, "{dst}: {}", layer.digest);
        }
        let compressed: u64 = fs.layers.iter().map(|l| l.size).sum();
        let opened_with = FetchStats::get(&fs.stats().bytes);
        assert!(
            opened_with * 10 < compressed,
            "{dst}: opening fetched {opened_with} of {compressed} bytes"
        );
        let expected = disk_tree(&umoci_unpack(tag, work.path()));
        assert_same_tree(
            &format!("{tag} converted"),
            &expected,
            &image_tree(&fs).await,
        );
        drop(fs);
        if tag == "python-app" {
            let mounted = Mounted::new(&dst);
            let through_fuse = tokio::task::block_in_place(|| disk_tree(mounted.path()));
            assert_same_tree("python-app converted, mounted", &expected, &through_fuse);
        }
    }
    let (a, b) = (layout_files(&first), layout_files(&second));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the two conversions wrote different blobs"
    );
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs between two conversions");
    }
}

#[test]
fn pushed_conversion_runs_under_plain_containerd_and_prefetches_prioritised_files() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let src = format!("{}/test/app:latest", registry.host());
    let dst = format!("{}/test/app:converted", registry.host());
    let work = tempfile::tempdir().unwrap();
    let list = work.path().join("startup.txt");
    let prioritised = ["app/main.py", "usr/bin/python3.11", "etc/debian_version"];
    std::fs::write(
        &list,
        format!("# what the app reads first\n/{}\n", prioritised.join("\n/")),
    )
    .unwrap();
    let printed = convert(&src, &dst, &["--prioritize", list.to_str().unwrap()]);
    assert!(printed.contains(&dst), "{printed}");
    let zstd = format!("{}/test/app:converted-zstd", registry.host());
    convert(&src, &zstd, &["-q", "--format", "zstd-chunked"]);

    // Plain containerd (overlayfs snapshotter, full pull) runs both.
    let containerd = Containerd::start();
    for (reference, id) in [(&dst, "converted"), (&zstd, "converted-zstd")] {
        containerd.ctr_ok(&["images", "pull", "--plain-http", reference]);
        let out = containerd.ctr_ok(&["run", "--rm", reference, id, "python3", "/app/main.py"]);
        assert!(out.contains("app ok"), "{reference}: {out}");
    }

    // stargz-snapshotter's readers find every layer's TOC and agree on its digest.
    for (reference, flags) in [(&dst, &[][..]), (&zstd, &["--zstdchunked"][..])] {
        let inspect = lazylayer(&["inspect", "--json", reference], &[]).json();
        for layer in inspect["layers"].as_array().unwrap() {
            let digest = layer["digest"].as_str().unwrap();
            let mut args = vec!["images", "get-toc-digest"];
            args.extend_from_slice(flags);
            args.push(digest);
            let toc = containerd.ctr_ok(&args);
            let annotated = layer["annotations"][ESTARGZ_TOC].as_str();
            assert_eq!(Some(toc.trim()), annotated, "{reference} layer {digest}");
        }
    }

    // The prioritised files are fetched at mount, before anyone reads them. No background
    // fill: it would add requests of its own while the test counts.
    let cache = tempfile::tempdir().unwrap();
    let mounted = Mounted::with_args(&dst, cache.path(), &["--no-background-fetch"]);
    mounted.wait_until_prefetched(std::time::Duration::from_secs(30));
    let before = mounted.stats()["requests"].as_u64().unwrap();
    for path in prioritised {
        std::fs::read(mounted.join(path)).unwrap();
    }
    assert_eq!(
        mounted.stats()["requests"].as_u64().unwrap(),
        before,
        "reading prioritised files made requests"
    );
    // A file that was not prioritised is not there yet.
    std::fs::read(mounted.join("usr/lib/python3.11/zipfile.py")).unwrap();
    assert!(mounted.stats()["requests"].as_u64().unwrap() > before);
    drop(mounted);

    // The snapshotter starts that prefetch during the pull: the prioritised chunks reach its
    // disk cache while no container exists and nothing is mounted (the pull itself fetches
    // TOCs only, which go to meta/). The pull goes through a link with a long round trip.
    const RTT_MS: u64 = 400;
    let link = FaultProxy::start(registry.port, &["--rtt-ms", &RTT_MS.to_string()]);
    let through_link = format!("127.0.0.1:{}/test/app:converted", link.port);
    let snapshotter = Snapshotter::start();
    let lazy = Containerd::with_snapshotter(&snapshotter.socket);
    let pulled = snapshotter.lazylayer(&[
        "pull",
        "--address",
        lazy.socket.to_str().unwrap(),
        &through_link,
    ]);
    assert!(
        pulled.status.success(),
        "{}\n{}",
        pulled.stderr,
        snapshotter.log()
    );
    // Every layer's TOC is asked for at once: the first requests for the layers arrive within
    // one round trip of each other (one after another, they would be a round trip apart each).
    let arrivals = link.arrivals();
    let inspect = lazylayer(&["inspect", "--json", &dst], &[]).json();
    let firsts: Vec<u64> = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            let digest = layer["digest"].as_str().unwrap();
            arrivals
                .iter()
                .find(|(path, _)| path.ends_with(digest))
                .unwrap_or_else(|| panic!("no request for layer {digest}: {arrivals:?}"))
                .1
        })
        .collect();
    let spread = firsts.iter().max().unwrap() - firsts.iter().min().unwrap();
    assert!(
        firsts.len() > 1 && spread < RTT_MS,
        "layers' first requests arrived at {firsts:?} ms: {arrivals:?}"
    );
    let chunks = snapshotter.cache().join("chunks");
    support::wait_until(
        std::time::Duration::from_secs(30),
        || files_under(&chunks) > 0,
        || format!("nothing prefetched after the pull\n{}", snapshotter.log()),
    );
    assert!(snapshotter.fuse_mounts().is_empty(), "mounted before use");
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                files_under(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn bad_input_gets_errors_that_name_it() {
    let shared = format!("oci:{}:python-app", shared_images().display());
    let work = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:out", work.path().display());
    lazylayer(&["convert", "oci:/nonexistent/layout:x", &dst], &[])
        .assert_error(&["/nonexistent/layout"]);
    let hostile = work.path().join("list.txt");
    std::fs::write(&hostile, "app/main.py\n../../etc/shadow\n").unwrap();
    lazylayer(
        &[
            "convert",
            "--prioritize",
            hostile.to_str().unwrap(),
            &shared,
            &dst,
        ],
        &[],
    )
    .assert_error(&["--prioritize", "../../etc/shadow", "`..`"]);
    lazylayer(&["convert", &shared, "s3://bucket/prefix:tag"], &[])
        .assert_error(&["s3://bucket/prefix:tag", "oci:"]);
    assert!(
        !work.path().join("index.json").exists(),
        "nothing is written on failure"
    );
    // `index` publishes next to an image in a registry, nowhere else.
    lazylayer(&["index", &shared], &[]).assert_error(&["python-app", "registry", "convert"]);
    lazylayer(&["index", "--span", "4K", "127.0.0.1:1/x:y"], &[]).assert_error(&["--span", "64K"]);
}

#[test]
fn gzip_image_with_a_published_seek_index_mounts_lazily() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let reference = format!("{}/test/app:latest", registry.host());
    let manifest_digest = support::shared_manifest_digest("python-app");
    let index = || {
        let run = lazylayer(&["index", "--plain-http", &reference], &[]);
        assert!(run.status.success(), "index: {}", run.stderr);
        run.stdout
    };
    let printed = index();
    assert!(printed.contains("3 gzip layer(s) indexed"), "{printed}");
    // The same bytes again: the artifact is not duplicated under the fallback tag.
    assert_eq!(index(), printed);
    // Debian's registry has no referrers API: the artifact is listed once under the fallback tag.
    let fallback = format!(
        "http://{}/v2/test/app/manifests/sha256-{}",
        registry.host(),
        manifest_digest.trim_start_matches("sha256:")
    );
    let listed = std::process::Command::new("curl")
        .args([
            "-sf",
            "-H",
            "Accept: application/vnd.oci.image.index.v1+json",
            &fallback,
        ])
        .output()
        .unwrap();
    assert!(listed.status.success(), "no fallback tag at {fallback}");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let referrers = listed["manifests"].as_array().unwrap();
    assert_eq!(referrers.len(), 1, "{listed}");
    assert_eq!(
        referrers[0]["artifactType"],
        "application/vnd.lazylayer.gzip-index.v1"
    );
    let inspect = lazylayer(&["inspect", "--json", &reference], &[]).json();
    for layer in inspect["layers"].as_array().unwrap() {
        assert_eq!(layer["lazy_index"]["kind"], "gzip-index", "{layer}");
    }

    // The image itself is unchanged: the same manifest digest as the source layout's.
    assert_eq!(inspect["manifest_digest"], manifest_digest.as_str());

    let cache = tempfile::tempdir().unwrap();
    let mounted = Mounted::with_args(&reference, cache.path(), &["--no-background-fetch"]);
    let main = std::fs::read_to_string(mounted.join("app/main.py")).unwrap();
    assert!(main.contains("app ok"), "{main}");
    let (fetched, total) = mounted.fetched_and_total();
    eprintln!("app/main.py through the gzip index: fetched {fetched} of {total} bytes");
    // The indexes (a 32 KiB window per MiB of output, most of what is fetched) and one request
    // for the file and what follows it: each a small share of the image.
    let stats = mounted.stats();
    let layers = stats["layers"].as_array().unwrap();
    let content: u64 = layers
        .iter()
        .map(|l| l["fetched_bytes"].as_u64().unwrap())
        .sum();
    let requests: u64 = layers.iter().map(|l| l["requests"].as_u64().unwrap()).sum();
    assert!(
        content * 20 < total && (fetched - content) * 20 < total && requests == 1,
        "reading one small file fetched {fetched} of {total} bytes, {content} of them content: {stats}"
    );
    for layer in layers {
        assert_eq!(layer["format"], "gzip+index", "{layer}");
    }

    // Every file, read through the checkpoints, equals umoci's unpack of the image.
    let work = tempfile::tempdir().unwrap();
    let expected = disk_tree(&umoci_unpack("python-app", work.path()));
    assert_same_tree(
        "python-app through its gzip index",
        &expected,
        &disk_tree(mounted.path()),
    );
}

/// The writer refuses what the readers refuse: a hard link whose target no layer below or
/// before it holds is an error naming the layer and the link, and nothing is written; a hard
/// link to a file of a lower layer is fine and reads back as the same file.
#[test]
fn convert_refuses_a_hard_link_to_a_missing_target() {
    use tar::EntryType::{Directory, Link, Regular};
    let registry = Registry::start(RegistryAuth::None);
    let base = support::layer_of(&[("etc/", Directory, ""), ("etc/real", Regular, "content\n")]);
    let dangling = support::layer_of(&[("etc/link", Link, "etc/missing")]);
    let linked = support::layer_of(&[("etc/link", Link, "etc/real")]);
    let bad = registry.push_image("test/links", "bad", &[base.clone(), dangling], None);
    registry.push_image("test/links", "good", &[base, linked], None);
    let work = tempfile::tempdir().unwrap();
    let bad_ref = format!("{}/test/links:bad", registry.host());
    // The readers' verdict, which the writer must share.
    lazylayer(&["ls", "--plain-http", &bad_ref, "/etc"], &[]).assert_error(&[&bad[1], "etc/link"]);
    let dst = format!("oci:{}:out", work.path().display());
    lazylayer(&["convert", "--plain-http", &bad_ref, &dst], &[]).assert_error(&[
        &bad[1],
        "etc/link",
        "does not exist",
    ]);
    assert!(
        !work.path().join("index.json").exists(),
        "nothing is written on failure"
    );
    convert(&format!("{}/test/links:good", registry.host()), &dst, &[]);
    let cat = lazylayer(&["cat", &dst, "/etc/link"], &[]);
    assert!(cat.status.success(), "{}", cat.stderr);
    assert_eq!(cat.stdout, "content\n");
}

//! Layer formats and the mount against the reference tools: every shared image, as plain gzip
//! and as eStargz and zstd:chunked written by `ctr-remote image convert` (stargz-snapshotter,
//! through a real containerd), read by lazylayer from a real registry, must equal `umoci unpack`
//! of the same image, both through the library and through a FUSE mount walked like any
//! directory. Also: a chunk corrupted in the registry's storage is detected, never served; the
//! mounted python-app runs; concurrent readers get the right bytes; a stalled fetch does not
//! stall metadata operations.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lazylayer::fs::tree::{Ino, NodeKind};
use lazylayer::fs::{ImageFs, ImageFsOptions};
use lazylayer::layer::{ChunkSource, LayerFormat};
use lazylayer::model::oci::Platform;
use lazylayer::model::reference::ImageRef;
use lazylayer::source::config::FetchConfig;
use lazylayer::source::open::open_image;
use lazylayer::source::stats::FetchStats;
use support::conformance::{assert_same_tree, disk_tree, image_tree, umoci_unpack};
use support::containerd::{Containerd, LazyFormat, python_app_as_estargz};
use support::mount::Mounted;
use support::{Registry, RegistryAuth, lazylayer, wait_until};

async fn open(reference: &str) -> Arc<ImageFs> {
    open_with(reference, &ImageFsOptions::default()).await
}

async fn open_with(reference: &str, options: &ImageFsOptions) -> Arc<ImageFs> {
    let reference = ImageRef::parse(reference).unwrap();
    let opened = open_image(
        &reference,
        None,
        &FetchConfig::default(),
        &Platform::host(),
        options.disk.clone(),
    )
    .await
    .unwrap();
    Arc::new(
        ImageFs::open(opened, options)
            .await
            .unwrap_or_else(|e| panic!("open {reference}: {e}")),
    )
}

/// Pushes `tag`, converts it to both lazy formats, and checks all three against umoci.
/// Returns the registry and the eStargz reference for further checks.
async fn conformance(tag: &str) -> (Registry, String) {
    let registry = Registry::start(RegistryAuth::None);
    let repo = format!("test/{tag}");
    registry.push_shared(tag, &repo);
    let containerd = Containerd::start();
    let estargz = containerd.convert(&registry, &repo, LazyFormat::Estargz);
    let zstd = containerd.convert(&registry, &repo, LazyFormat::ZstdChunked);
    drop(containerd);

    let work = tempfile::tempdir().unwrap();
    let expected = disk_tree(&umoci_unpack(tag, work.path()));
    assert!(
        expected.len() > 1000,
        "reference unpack of {tag} looks empty"
    );

    let gzip = format!("{}/{repo}:latest", registry.host());
    for (reference, want) in [
        (
            &gzip,
            LayerFormat::TarStream(lazylayer::model::oci::LayerCompression::Gzip),
        ),
        (&estargz, LayerFormat::Estargz),
        (&zstd, LayerFormat::ZstdChunked),
    ] {
        let fs = open(reference).await;
        let compressed: u64 = fs.layers.iter().map(|l| l.size).sum();
        for layer in &fs.layers {
            assert_eq!(layer.format, want, "{reference}: layer {}", layer.digest);
        }
        let opened_with = FetchStats::get(&fs.stats().bytes);
        if want != LayerFormat::TarStream(lazylayer::model::oci::LayerCompression::Gzip) {
            // Opening a lazy image fetches the TOCs only: a small share of the image.
            assert!(
                opened_with * 20 < compressed,
                "{reference}: opening fetched {opened_with} of {compressed} bytes"
            );
            // At most a footer and a TOC per layer (the image's config is counted apart).
            let toc_requests: u64 = fs
                .layers
                .iter()
                .map(|l| fs.stats().layer_report(&l.digest).requests)
                .sum();
            assert!(
                toc_requests <= 2 * fs.layers.len() as u64,
                "{reference}: opening made {toc_requests} layer requests"
            );
        }
        let actual = image_tree(&fs).await;
        assert_same_tree(&format!("{tag} as {}", want.name()), &expected, &actual);
        drop(fs);

        // The same through the kernel: mount, walk with ordinary syscalls, compare.
        let mounted = Mounted::new(reference);
        let through_fuse = tokio::task::block_in_place(|| disk_tree(mounted.path()));
        assert_same_tree(
            &format!("{tag} as {}, mounted", want.name()),
            &expected,
            &through_fuse,
        );
        let stats = mounted.stats();
        let shared = support::shared_json(&support::shared_manifest_digest(tag));
        assert_eq!(
            stats["layers"].as_array().unwrap().len(),
            shared["layers"].as_array().unwrap().len()
        );
        drop(mounted);
    }
    (registry, estargz)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_app_in_all_formats_matches_umoci_and_corruption_is_caught() {
    let (registry, estargz) = conformance("python-app").await;
    // The requests counted below are the reads' own: no sibling prefetch beside them.
    let no_siblings = ImageFsOptions {
        sibling_bytes: 0,
        ..ImageFsOptions::default()
    };

    // A read spanning several missing chunks that lie back to back costs one request.
    let fs = open_with(&estargz, &no_siblings).await;
    let ino = fs.tree.resolve(b"/usr/bin/python3.11", true).unwrap();
    let NodeKind::File { size, chunks, .. } = fs.tree.node(ino).unwrap().kind.clone() else {
        panic!("python3.11 is not a file")
    };
    assert!(chunks.len() >= 2, "python3.11 should span several chunks");
    let before = FetchStats::get(&fs.stats().requests);
    let data = fs.read(ino, 0, size).await.unwrap();
    assert_eq!(data.len() as u64, size);
    assert_eq!(FetchStats::get(&fs.stats().requests) - before, 1);
    drop(fs);

    // A sequential reader gets read-ahead: after a few reads in order, the rest of the file is
    // fetched in the background, and reading it later misses nothing.
    let fs = open_with(&estargz, &no_siblings).await;
    let piece = 64 << 10;
    for i in 0..6 {
        fs.read(ino, i * piece, piece).await.unwrap();
    }
    tokio::task::block_in_place(|| {
        wait_until(
            Duration::from_secs(20),
            || FetchStats::get(&fs.stats().cache_misses) >= chunks.len() as u64,
            || "read-ahead never fetched the file".into(),
        )
    });
    let misses = FetchStats::get(&fs.stats().cache_misses);
    let rest = fs.read(ino, 6 * piece, size).await.unwrap();
    assert_eq!(rest.len() as u64, size - 6 * piece);
    assert_eq!(FetchStats::get(&fs.stats().cache_misses), misses);
    drop(fs);

    // Sibling prefetch: the first miss in a directory brings its other small files, so a
    // module imported next reads without a request (no amplification here, which would bring
    // the next file along by itself).
    let fs = open_with(
        &estargz,
        &ImageFsOptions {
            amplify_bytes: 0,
            ..ImageFsOptions::default()
        },
    )
    .await;
    let dir = fs.tree.lookup_path(b"usr/lib/python3.11").unwrap();
    let small: Vec<Ino> = fs.tree.children(dir).unwrap().values().copied()
        .filter(|&i| matches!(fs.tree.node(i).map(|n| &n.kind), Some(NodeKind::File { size, .. }) if *size > 0 && *size < 64 << 10))
        .collect();
    assert!(small.len() > 10, "{} small files", small.len());
    let (first, later) = (small[0], small[small.len() / 2]);
    fs.read(first, 0, 1 << 20).await.unwrap();
    tokio::task::block_in_place(|| {
        wait_until(
            Duration::from_secs(20),
            || {
                let before = FetchStats::get(&fs.stats().requests);
                std::thread::sleep(Duration::from_millis(300));
                FetchStats::get(&fs.stats().requests) == before
            },
            || "the sibling prefetch never settled".into(),
        )
    });
    let settled = FetchStats::get(&fs.stats().requests);
    fs.read(later, 0, 1 << 20).await.unwrap();
    assert_eq!(
        FetchStats::get(&fs.stats().requests),
        settled,
        "reading a sibling of the first file made a request"
    );
    drop(fs);

    // Corrupt one chunk of /usr/bin/python3.11 in the registry's own storage.
    let fs = open_with(&estargz, &no_siblings).await;
    let ino = fs.tree.resolve(b"/usr/bin/python3.11", true).unwrap();
    let node = fs.tree.node(ino).unwrap();
    let NodeKind::File { layer, chunks, .. } = &node.kind else {
        panic!("python3.11 is not a file")
    };
    let ChunkSource::Compressed { start, end, .. } = chunks[0].source else {
        panic!("eStargz chunk is not compressed")
    };
    let digest = &fs.layers[*layer].digest;
    let data = registry.blob_data_path(&digest.to_string());
    let mut blob = std::fs::read(&data).unwrap();
    let at = (start + (end - start) / 2) as usize;
    blob[at] ^= 0x55;
    std::fs::write(&data, &blob).unwrap();

    let fresh = open(&estargz).await;
    let err = fresh
        .read(ino, 0, chunks[0].size)
        .await
        .expect_err("a corrupted chunk must not be served");
    let msg = err.to_string();
    assert!(msg.contains(&digest.to_string()), "{msg}");
    assert!(
        msg.contains("does not match its digest") || msg.contains("does not decompress"),
        "{msg}"
    );
    // The command line reports it and prints nothing of the file.
    let run = lazylayer(&["cat", &estargz, "/usr/bin/python3.11"], &[]);
    run.assert_error(&["/usr/bin/python3.11", &digest.to_string()]);
    assert!(run.stdout.is_empty(), "corrupted file content was printed");
    // Other files of the same layer are still readable.
    let ok = lazylayer(&["cat", &estargz, "/etc/os-release"], &[]);
    assert!(ok.status.success(), "{}", ok.stderr);
    assert!(ok.stdout.contains("bookworm"));

    // Through a mount: EIO for that read only, a log line naming the layer, and the mount
    // keeps serving everything else.
    tokio::task::block_in_place(|| {
        let mounted = Mounted::new(&estargz);
        let err = std::fs::read(mounted.join("usr/bin/python3.11")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let release = std::fs::read_to_string(mounted.join("usr/lib/os-release")).unwrap();
        assert!(release.contains("bookworm"));
        let log: String = std::fs::read_dir(mounted.run_dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert!(
            log.contains(&digest.to_string()),
            "daemon log lacks the layer: {log}"
        );
    });
}

/// The mounted python-app runs its app, fetching well under the image's size; many threads
/// reading random ranges get the reference bytes; a fetch stuck on a frozen registry does not
/// hold up `stat` and `readdir`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mounted_python_app_runs_and_serves_concurrent_readers() {
    let (registry, estargz) = python_app_as_estargz();
    let work = tempfile::tempdir().unwrap();
    let reference_root = umoci_unpack("python-app", work.path());

    tokio::task::block_in_place(|| {
        // Without background filling, so that what the start itself fetched is measured.
        let cache = tempfile::tempdir().unwrap();
        // Without amplification and sibling prefetch too, so that the chunks it fetched are the
        // chunks the app read (what the learned profile below is compared against).
        let mounted = Mounted::with_args(
            &estargz,
            cache.path(),
            &[
                "--no-background-fetch",
                "--amplify-io",
                "0",
                "--prefetch-siblings",
                "0",
            ],
        );
        mounted.run_app();
        let (fetched, total) = mounted.fetched_and_total();
        assert!(
            fetched * 3 < total,
            "starting the app fetched {fetched} of {total} bytes"
        );
        let first_misses = mounted.stats()["cache_misses"].as_u64().unwrap();
        // A second mount on the same directory is refused, and the first one keeps serving.
        let dir = mounted.path().to_str().unwrap();
        let mount_entries = || {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
            mounts
                .lines()
                .filter(|l| l.split(' ').nth(1) == Some(dir))
                .count()
        };
        lazylayer(&["mount", "--daemon", &estargz, dir], &[]).assert_error(&[
            dir,
            "already a lazylayer mount",
            "lazylayer umount",
        ]);
        assert_eq!(mount_entries(), 1);
        assert!(mounted.stats()["cache_misses"].as_u64().unwrap() >= first_misses);
        // Unmounting ends the daemon and removes its control socket.
        let run_dir = mounted.run_dir.path().to_path_buf();
        assert!(mounted.is_mounted());
        let dir = mounted.path().to_path_buf();
        let run = lazylayer(&["umount", dir.to_str().unwrap()], &[]);
        assert!(run.status.success(), "{}", run.stderr);
        assert!(!mounted.is_mounted());
        wait_until(
            Duration::from_secs(10),
            || {
                !std::fs::read_dir(&run_dir)
                    .unwrap()
                    .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "sock"))
            },
            || "daemon did not exit after umount".into(),
        );
        drop(mounted);

        // Learned profile: the start above was recorded. A "second machine" with an empty cache
        // but that profile prefetches it, so the app's own reads then miss little.
        let cache_dir = cache.path().to_str().unwrap();
        let profile = lazylayer(
            &["profile", "show", &estargz, "--cache-dir", cache_dir],
            &[],
        );
        assert!(profile.status.success(), "{}", profile.stderr);
        assert!(
            profile.stdout.lines().any(|l| l == "/app/main.py"),
            "{}",
            profile.stdout
        );
        let second = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(second.path().join("meta")).unwrap();
        for entry in std::fs::read_dir(cache.path().join("meta")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_owned();
            if name.to_string_lossy().starts_with("profile-") {
                std::fs::copy(&path, second.path().join("meta").join(name)).unwrap();
            }
        }
        let mounted = Mounted::with_args(
            &estargz,
            second.path(),
            &[
                "--no-background-fetch",
                "--amplify-io",
                "0",
                "--prefetch-siblings",
                "0",
            ],
        );
        mounted.wait_until_prefetched(std::time::Duration::from_secs(120));
        let prefetched = mounted.stats()["cache_misses"].as_u64().unwrap();
        assert!(
            prefetched * 2 > first_misses,
            "prefetched only {prefetched} chunks"
        );
        mounted.run_app();
        let missed = mounted.stats()["cache_misses"].as_u64().unwrap() - prefetched;
        assert!(
            missed * 4 < first_misses,
            "with the profile the start still missed {missed} chunks (first: {first_misses})"
        );
        drop(mounted);

        // Concurrency: 8 threads, random ranges of the 6 largest files, against the reference.
        let mounted = Mounted::new(&estargz);
        let files = [
            "usr/bin/python3.11",
            "usr/lib/x86_64-linux-gnu/libcrypto.so.3",
            "usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30",
            "usr/bin/perl5.36.0",
            "usr/lib/locale/C.utf8/LC_COLLATE",
            "usr/local/lib/python3.11/dist-packages/yaml/_yaml.cpython-311-x86_64-linux-gnu.so",
        ];
        std::thread::scope(|scope| {
            for t in 0..8u64 {
                let (mounted, reference_root) = (&mounted, &reference_root);
                scope.spawn(move || {
                    use std::os::unix::fs::FileExt;
                    let mut seed = 0x9e3779b97f4a7c15u64.wrapping_mul(t + 1);
                    let mut next = || {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed
                    };
                    for _ in 0..150 {
                        let name = files[(next() % files.len() as u64) as usize];
                        let expected = std::fs::read(reference_root.join(name)).unwrap();
                        let file = std::fs::File::open(mounted.join(name)).unwrap();
                        let offset = next() % expected.len() as u64;
                        let len = (1 + next() % 300_000).min(expected.len() as u64 - offset);
                        let mut buf = vec![0u8; len as usize];
                        file.read_exact_at(&mut buf, offset).unwrap();
                        assert!(
                            buf == expected[offset as usize..(offset + len) as usize],
                            "{name} at {offset}+{len} differs from the reference"
                        );
                    }
                });
            }
        });
        drop(mounted);

        // Reads stuck on a frozen registry (more of them than there are FUSE worker threads)
        // leave metadata operations free.
        let mounted = Mounted::new(&estargz);
        registry.pause();
        let (tx, rx) = std::sync::mpsc::channel();
        let readers: Vec<_> = files[..4]
            .iter()
            .map(|name| {
                let (victim, tx) = (mounted.join(name), tx.clone());
                std::thread::spawn(move || {
                    let data = std::fs::read(&victim);
                    let _ = tx.send(());
                    data
                })
            })
            .collect();
        // Give the reads time to reach the registry and hang there.
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(
            rx.try_recv().is_err(),
            "reads should be waiting on the frozen registry"
        );
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let root = mounted.path().to_path_buf();
        std::thread::spawn(move || {
            let entries = disk_tree_metadata_only(&root.join("usr/lib/python3.11"));
            let _ = done_tx.send(entries);
        });
        let entries = done_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("stat/readdir hung behind blocked reads");
        assert!(entries > 100, "walked only {entries} entries");
        registry.resume();
        for (reader, name) in readers.into_iter().zip(files) {
            let data = reader.join().unwrap().unwrap();
            assert!(
                data == std::fs::read(reference_root.join(name)).unwrap(),
                "{name} differs"
            );
        }
    });
}

/// The disk cache: a remount of an image read before costs no request at all, and a second image
/// sharing layers with the first fetches only its own layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_cache_survives_remount_and_is_shared_between_images() {
    let (registry, estargz) = python_app_as_estargz();
    registry.push_shared("python3", "test/python3");
    let host = registry.host();
    tokio::task::block_in_place(|| {
        // Restart: read everything, unmount, mount again, read everything: nothing fetched.
        let cache = tempfile::tempdir().unwrap();
        let first = Mounted::with_cache(&estargz, cache.path());
        let tree = disk_tree(first.path());
        assert!(first.stats()["fetched_bytes"].as_u64().unwrap() > 10_000_000);
        drop(first);
        let second = Mounted::with_cache(&estargz, cache.path());
        // The first read in a directory that loads from the disk tier also loads the
        // directory's other small files into memory meanwhile: reading them next costs no disk
        // load.
        let dir = second.join("usr/lib/python3.11/encodings");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && p.metadata().unwrap().len() < 64 << 10)
            .collect();
        files.sort();
        assert!(files.len() > 20, "{files:?}");
        std::fs::read(&files[0]).unwrap();
        let before = second.stats();
        assert!(before["disk_hits"].as_u64().unwrap() >= 1, "{before}");
        // The loads take milliseconds; each file is read once (the page cache keeps it after).
        std::thread::sleep(Duration::from_secs(2));
        for f in &files[1..] {
            std::fs::read(f).unwrap();
        }
        let after = second.stats();
        assert_eq!(
            after["disk_hits"], before["disk_hits"],
            "siblings were read from disk: {after}"
        );
        let hits = |s: &serde_json::Value| s["cache_hits"].as_u64().unwrap();
        assert!(
            hits(&after) >= hits(&before) + files.len() as u64 - 1,
            "{before} -> {after}"
        );
        assert_same_tree(
            "remount from the disk cache",
            &tree,
            &disk_tree(second.path()),
        );
        let stats = second.stats();
        assert_eq!(stats["requests"], 0, "remount fetched: {stats}");
        assert_eq!(stats["fetched_bytes"], 0);
        drop(second);

        // Cross-image: python3 and python-app share their two lower layers.
        let cache = tempfile::tempdir().unwrap();
        let python3 = Mounted::with_cache(&format!("{host}/test/python3:latest"), cache.path());
        disk_tree(python3.path());
        drop(python3);
        let app = Mounted::with_cache(&format!("{host}/test/app:latest"), cache.path());
        disk_tree(app.path());
        let stats = app.stats();
        let layers = stats["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 3);
        for shared in &layers[..2] {
            assert_eq!(
                shared["requests"], 0,
                "a shared layer was fetched again: {shared}"
            );
            assert_eq!(shared["cache_misses"], 0, "{shared}");
        }
        assert!(layers[2]["requests"].as_u64().unwrap() > 0, "{}", layers[2]);
        drop(app);

        // Background filling: left alone, a mount fetches the whole image into the disk cache;
        // then every file reads with the registry frozen.
        let filled = tempfile::tempdir().unwrap();
        let metrics_addr = format!("127.0.0.1:{}", support::free_port());
        let mounted = Mounted::with_args(
            &estargz,
            filled.path(),
            &[
                "--background-bandwidth",
                "1G",
                "--metrics-addr",
                &metrics_addr,
            ],
        );
        wait_until(
            Duration::from_secs(180),
            || mounted.stats()["background_complete"] == true,
            || "background fetch did not finish".into(),
        );
        // The Prometheus endpoint reports the disk tier the background fill populated.
        let page = {
            use std::io::{Read, Write};
            let mut conn = std::net::TcpStream::connect(&metrics_addr).unwrap();
            conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut page = String::new();
            conn.read_to_string(&mut page).unwrap();
            page
        };
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        for family in [
            "lazylayer_fetch_requests_total{layer=",
            "lazylayer_queue_depth{priority=\"reader\"}",
        ] {
            assert!(page.contains(family), "{family} missing:\n{page}");
        }
        let disk_bytes: u64 = page
            .lines()
            .find_map(|l| l.strip_prefix("lazylayer_cache_bytes{tier=\"disk\"} "))
            .expect("disk bytes")
            .parse()
            .unwrap();
        assert!(
            disk_bytes > 100_000_000,
            "disk tier holds only {disk_bytes} bytes"
        );
        registry.pause();
        let (tx, rx) = std::sync::mpsc::channel();
        let root = mounted.path().to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(disk_tree(&root));
        });
        let offline = rx.recv_timeout(std::time::Duration::from_secs(120));
        registry.resume();
        let offline = offline.expect("reading the filled mount needed the (frozen) registry");
        assert_same_tree("filled in the background, read offline", &tree, &offline);
        drop(mounted);

        // `lazylayer cache`: stats, gc to a budget, clear.
        let dir = cache.path().to_str().unwrap();
        let chunks = |run: &support::Run| -> u64 {
            let line = run.stdout.lines().last().unwrap_or_default();
            line.split(": ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let before = lazylayer(&["cache", "stats", "--cache-dir", dir], &[]);
        assert!(chunks(&before) > 1000, "{}", before.stdout);
        let gc = lazylayer(
            &["cache", "gc", "--cache-dir", dir, "--cache-size", "10M"],
            &[],
        );
        assert!(gc.status.success(), "{}", gc.stderr);
        // The budget is in bytes: what is left on disk fits it, whatever the chunks' sizes
        // (which of them are newest decides how many remain, so their count proves nothing).
        let after = lazylayer(&["cache", "stats", "--cache-dir", dir], &[]);
        assert!(chunks(&after) < chunks(&before), "{}", after.stdout);
        let on_disk = chunk_file_bytes(&cache.path().join("chunks"));
        assert!(
            on_disk > 0 && on_disk <= 10 << 20,
            "{on_disk} bytes of chunks left after gc to 10M: {}",
            after.stdout
        );
        assert!(after.stdout.contains("MB") && !after.stdout.contains("GB"));
        lazylayer(&["cache", "clear", "--cache-dir", dir], &[]);
        let cleared = lazylayer(&["cache", "stats", "--cache-dir", dir], &[]);
        assert_eq!(chunks(&cleared), 0, "{}", cleared.stdout);
    });
}

/// Bytes in the chunk files under a cache's `chunks/` directory (one level of shards).
fn chunk_file_bytes(chunks: &std::path::Path) -> u64 {
    std::fs::read_dir(chunks)
        .unwrap()
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .map(|file| file.unwrap().metadata().unwrap().len())
        .sum()
}

/// Random interleavings of reads, read-ahead, evictions (a memory tier far smaller than the
/// working set), disk-tier hits and background filling: every read returns the reference bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_interleavings_of_reads_evictions_and_prefetch_return_reference_bytes() {
    let (_registry, estargz) = python_app_as_estargz();
    random_interleavings(&estargz).await;
}

/// The same through a gzip seek index, where concurrent reads of one span wait for each other
/// and resume where the last request stopped ([`lazylayer::fetch::resume`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_interleavings_through_a_gzip_seek_index_return_reference_bytes() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let gzip = format!("{}/test/app:latest", registry.host());
    let run = support::lazylayer(&["index", "--plain-http", &gzip], &[]);
    assert!(run.status.success(), "index: {}", run.stderr);
    let fs = random_interleavings(&gzip).await;
    for layer in &fs.layers {
        assert_eq!(
            layer.format,
            LayerFormat::GzipIndex,
            "layer {}",
            layer.digest
        );
    }
}

/// Twelve readers at random places of `reference`'s files through a small memory tier; returns
/// the mount for more checks.
async fn random_interleavings(reference: &str) -> Arc<ImageFs> {
    let work = tempfile::tempdir().unwrap();
    let reference_root = umoci_unpack("python-app", work.path());
    let cache = tempfile::tempdir().unwrap();
    let options = ImageFsOptions {
        cache_bytes: 4 << 20,
        disk: Some(Arc::new(
            lazylayer::cache::disk::DiskCache::open(cache.path(), 64 << 20).unwrap(),
        )),
        request_slots: 3,
        background_fill: true,
        profile_window: None,
        ..ImageFsOptions::default()
    };
    let fs = open_with(reference, &options).await;
    // Files of many sizes, from every layer.
    let mut files = Vec::new();
    fs.tree.walk(lazylayer::fs::tree::ROOT, |path, ino| {
        if let Some(NodeKind::File { size, .. }) = fs.tree.node(ino).map(|n| &n.kind)
            && *size > 0
            && files.len() < 400
            && (path.starts_with(b"usr/lib")
                || path.starts_with(b"usr/local")
                || path.starts_with(b"usr/bin"))
        {
            files.push((String::from_utf8_lossy(path).into_owned(), ino, *size));
        }
    });
    assert!(files.len() > 100);
    let files = Arc::new(files);
    let mut tasks = Vec::new();
    for t in 0..12u64 {
        let (fs, files, root) = (fs.clone(), files.clone(), reference_root.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x2545f4914f6cdd1du64.wrapping_mul(t + 7);
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for _ in 0..120 {
                let (path, ino, size) = &files[(next() % files.len() as u64) as usize];
                let expected = std::fs::read(root.join(path)).unwrap();
                // Mostly sequential runs (read-ahead), sometimes random jumps.
                let mut offset = next() % size;
                for _ in 0..(1 + next() % 6) {
                    let len = 1 + next() % (256 << 10);
                    let data = fs.read(*ino, offset, len).await.unwrap();
                    let end = (offset + len).min(*size);
                    assert!(
                        data[..] == expected[offset as usize..end as usize],
                        "{path} at {offset}+{len} differs from the reference"
                    );
                    offset = end;
                    if offset >= *size {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(fs.cache().bytes() <= 4 << 20);
    assert!(
        FetchStats::get(&fs.stats().disk_hits) > 0,
        "the disk tier was never used"
    );
    fs
}

/// Walks a directory with `readdir` and `lstat` only (no file contents): how many entries.
fn disk_tree_metadata_only(root: &std::path::Path) -> usize {
    let mut count = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            }
            count += 1;
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python3_in_all_formats_matches_umoci() {
    conformance("python3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debian_in_all_formats_matches_umoci() {
    conformance("debian-bookworm").await;
}

#[test]
fn corrupted_stream_layer_is_refused() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let top = support::shared_layer("python-app", 2);
    let data = registry.blob_data_path(&top);
    let mut blob = std::fs::read(&data).unwrap();
    let at = blob.len() / 2;
    blob[at] ^= 0x55;
    std::fs::write(&data, &blob).unwrap();
    let reference = format!("{}/test/app:latest", registry.host());
    let run = lazylayer(&["ls", &reference, "/app"], &[]);
    run.assert_error(&[&top]);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[test]
fn ls_and_cat_show_the_merged_tree() {
    let registry = Registry::start(RegistryAuth::None);
    registry.push_shared("python-app", "test/app");
    let reference = format!("{}/test/app:latest", registry.host());

    let run = lazylayer(&["ls", "-l", &reference, "/"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    let bin = run
        .stdout
        .lines()
        .find(|l| l.ends_with(" bin -> usr/bin"))
        .unwrap_or_else(|| panic!("no bin symlink in:\n{}", run.stdout));
    assert!(bin.starts_with("lrwxrwxrwx"), "{bin}");

    // Whiteouts of the top layer: /usr/share/doc is gone, /usr/share still there.
    let run = lazylayer(&["ls", &reference, "/usr/share"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        !run.stdout.lines().any(|l| l == "doc" || l == "man"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .lines()
            .any(|l| l == "zoneinfo" || l == "common-licenses")
    );
    lazylayer(&["ls", &reference, "/usr/share/doc"], &[]).assert_error(&[
        "/usr/share/doc",
        "no such file or directory",
        &reference,
    ]);

    // Symlinks are followed inside the image; the setuid bit shows.
    let run = lazylayer(&["ls", "-l", &reference, "/bin/su"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.starts_with("-rwsr-xr-x"), "{}", run.stdout);

    let run = lazylayer(&["ls", "-R", &reference, "/app"], &[]);
    assert_eq!(run.stdout, "/app:\nmain.py\n");

    let run = lazylayer(&["cat", "--stats", &reference, "/app/main.py"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    let main_py = std::fs::read(
        support::conformance::umoci_unpack("python-app", registry.dir.path()).join("app/main.py"),
    )
    .unwrap();
    assert_eq!(run.stdout.as_bytes(), &main_py[..]);
    assert!(run.stderr.contains("requests"), "{}", run.stderr);

    lazylayer(&["cat", &reference, "/usr"], &[]).assert_error(&["/usr", "is a directory"]);
    lazylayer(&["cat", &reference, "/nope"], &[]).assert_error(&["/nope", "no such file"]);
}

/// A file early in an index-less layer is printed as soon as its bytes have streamed past: here
/// the layer's transfer stalls for good after 40% of it, and `cat` still prints the file (then
/// reports that the layer could not be verified, since its end never came).
#[test]
fn cat_prints_a_file_before_its_layer_has_finished_streaming() {
    use support::http::{HttpServer, Response};
    let manifest_digest = support::shared_manifest_digest("debian-bookworm");
    let manifest = support::shared_blob(&manifest_digest);
    let manifest_json: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let config_digest = manifest_json["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let layer_digest = manifest_json["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let config = support::shared_blob(&config_digest);
    let blob = support::shared_blob(&layer_digest);
    let cut = blob.len() * 2 / 5;

    // The last text file of at least 1 KB that lies wholly inside the part that will arrive.
    let mut candidate = None;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..cut]));
    for entry in archive.entries().unwrap() {
        let Ok(mut entry) = entry else { break };
        if entry.header().entry_type() != tar::EntryType::Regular || entry.size() < 1000 {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        if std::io::Read::read_to_end(&mut entry, &mut data).is_err() {
            break;
        }
        if let Ok(text) = String::from_utf8(data) {
            candidate = Some((path, text));
        }
    }
    let (path, text) = candidate.expect("a text file in the first 40% of the layer");

    let server = HttpServer::start(move |req| match req.path() {
        "/v2/" => Response::new(200),
        "/v2/test/debian/manifests/latest" => Response::new(200)
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone()),
        p if p == format!("/v2/test/debian/blobs/{config_digest}") => {
            Response::new(200).body(config.clone())
        }
        p if p == format!("/v2/test/debian/blobs/{layer_digest}") => {
            Response::new(200).body(blob.clone()).stall_after(cut)
        }
        _ => Response::new(404),
    });
    let reference = format!("127.0.0.1:{}/test/debian:latest", server.port);
    let run = lazylayer(
        &[
            "cat",
            "--stall-timeout",
            "3",
            // This server stalls every attempt at the same byte; one attempt shows the point.
            "--max-attempts",
            "1",
            &reference,
            &format!("/{path}"),
        ],
        &[],
    );
    assert_eq!(
        run.stdout, text,
        "the file was not printed before the stall"
    );
    run.assert_error(&["timed out", "must not be trusted", &path]);
}

/// Read amplification: reading a file fetches the files that follow it in the blob in the same
/// request (up to the budget), so reading the next one costs no request; with amplification
/// off it costs one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_amplified_with_the_chunks_that_follow_in_the_blob() {
    let (_registry, estargz) = python_app_as_estargz();
    let budget = 512 << 10;
    let amplified = open_with(
        &estargz,
        &ImageFsOptions {
            amplify_bytes: budget,
            sibling_bytes: 0,
            ..ImageFsOptions::default()
        },
    )
    .await;
    // Two different small files whose compressed chunks lie back to back in one layer.
    let mut by_start = std::collections::HashMap::new();
    let mut files = Vec::new();
    amplified.tree.walk(lazylayer::fs::tree::ROOT, |_, ino| {
        if let Some(NodeKind::File { layer, chunks, .. }) =
            amplified.tree.node(ino).map(|n| &n.kind)
            && let [only] = &chunks[..]
            && let ChunkSource::Compressed { start, end, .. } = only.source
        {
            by_start.insert((*layer, start), ino);
            files.push((ino, *layer, start, end));
        }
    });
    let (first, second) = files
        .iter()
        .find_map(|&(ino, layer, start, end)| {
            let next = *by_start.get(&(layer, end))?;
            (next != ino && end - start < budget / 4).then_some((ino, next))
        })
        .expect("two neighbouring single-chunk files");
    let requests = |fs: &ImageFs| FetchStats::get(&fs.stats().requests);

    let before = requests(&amplified);
    amplified.read(first, 0, 1 << 20).await.unwrap();
    let after_first = requests(&amplified);
    assert_eq!(after_first, before + 1, "the first file is one request");
    amplified.read(second, 0, 1 << 20).await.unwrap();
    assert_eq!(
        requests(&amplified),
        after_first,
        "the neighbour came with the first request"
    );

    let plain = open_with(
        &estargz,
        &ImageFsOptions {
            amplify_bytes: 0,
            sibling_bytes: 0,
            ..ImageFsOptions::default()
        },
    )
    .await;
    plain.read(first, 0, 1 << 20).await.unwrap();
    let after_first = requests(&plain);
    plain.read(second, 0, 1 << 20).await.unwrap();
    assert_eq!(requests(&plain), after_first + 1, "without amplification");
}

/// Other users read a mount made with `--allow-other` (a container running as a non-root user
/// on `lazylayer mount`), and not one made without it.
#[test]
fn other_users_read_a_mount_only_with_allow_other() {
    support::require_tool("setpriv");
    let image = format!("oci:{}:python-app", support::shared_images().display());
    let cache = tempfile::tempdir().unwrap();
    let private = Mounted::with_cache(&image, cache.path());
    let shared = Mounted::with_args(&image, cache.path(), &["--allow-other"]);
    let as_nobody = |mounted: &Mounted| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(mounted.join("etc/os-release"))
            .output()
            .unwrap()
    };
    let read = as_nobody(&shared);
    assert!(
        read.status.success(),
        "uid 65534 cannot read a mount made with --allow-other: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(
        read.stdout,
        std::fs::read(shared.join("etc/os-release")).unwrap()
    );
    assert!(
        !as_nobody(&private).status.success(),
        "uid 65534 read a mount made without --allow-other"
    );
}

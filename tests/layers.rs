//! Hand-made layers for each rule of the OCI layer changeset semantics and for hostile input,
//! built here with the `tar` crate, gzip-compressed, indexed by the streaming reader and applied
//! by the merged tree exactly as a registry layer would be.

use std::io::Write;

mod support;

use lazylayer::fs::tree::{MergedTree, NodeKind, ResolveError};
use lazylayer::layer::tar_stream::{Ignore, index_reader};
use lazylayer::layer::{ChunkSource, EntryKind, LayerError, LayerIndex, STREAM_CHUNK_BYTES};
use lazylayer::model::digest::Digest;
use lazylayer::model::oci::LayerCompression;
use tar::{EntryType, Header};

/// Builds one layer entry by entry. Names and link targets are written as raw bytes so that
/// hostile ones (which the `tar` crate's safe setters refuse) can be tested too.
struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Layer {
        Layer {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn entry(mut self, kind: EntryType, name: &[u8], mode: u32, link: &[u8], data: &[u8]) -> Self {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(EntryType::Regular, name.as_bytes(), 0o644, b"", data)
    }

    fn dir(self, name: &str, mode: u32) -> Self {
        self.entry(EntryType::Directory, name.as_bytes(), mode, b"", b"")
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(
            EntryType::Symlink,
            name.as_bytes(),
            0o777,
            target.as_bytes(),
            b"",
        )
    }

    fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(
            EntryType::Link,
            name.as_bytes(),
            0o644,
            target.as_bytes(),
            b"",
        )
    }

    fn with_header(mut self, name: &str, data: &[u8], edit: impl FnOnce(&mut Header)) -> Self {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        edit(&mut h);
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.tar
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    fn gzip(self) -> Vec<u8> {
        let tar = self.tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }
}

fn index(blob: &[u8]) -> Result<LayerIndex, LayerError> {
    index_reader(
        blob,
        &Digest::of(blob),
        blob.len() as u64,
        None,
        LayerCompression::Gzip,
        &Ignore,
    )
}

fn build(layers: Vec<Layer>) -> Result<MergedTree, LayerError> {
    let indexes = layers
        .into_iter()
        .map(|l| index(&l.gzip()))
        .collect::<Result<Vec<_>, _>>()?;
    MergedTree::build(indexes.into_iter().map(|i| (i.digest, i.entries)))
}

fn names(tree: &MergedTree, dir: &str) -> Vec<String> {
    let ino = tree.lookup_path(dir.as_bytes()).expect(dir);
    tree.children(ino)
        .unwrap()
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

fn all_paths(tree: &MergedTree) -> Vec<String> {
    let mut out = Vec::new();
    tree.walk(lazylayer::fs::tree::ROOT, |p, _| {
        out.push(String::from_utf8_lossy(p).into_owned())
    });
    out
}

#[test]
fn whiteouts_remove_lower_entries_and_never_appear() {
    let tree = build(vec![
        Layer::new()
            .dir("a", 0o755)
            .file("a/x", b"x")
            .file("a/y", b"y")
            .dir("b", 0o755)
            .file("b/z", b"z"),
        Layer::new()
            .file("a/.wh.x", b"")
            .file(".wh.b", b"")
            .file(".wh.never-existed", b""),
    ])
    .unwrap();
    assert_eq!(names(&tree, "a"), ["y"]);
    assert!(tree.lookup_path(b"b").is_none());
    assert!(all_paths(&tree).iter().all(|p| !p.contains(".wh.")));
}

#[test]
fn whiteout_then_recreate_in_the_same_layer() {
    let tree = build(vec![
        Layer::new().dir("d", 0o755).file("d/old", b"1"),
        // The new `d` comes before its whiteout in the tar: whiteouts still only hit lower layers.
        Layer::new().file("d", b"now a file").file(".wh.d", b""),
    ])
    .unwrap();
    let d = tree.node(tree.lookup_path(b"d").unwrap()).unwrap();
    assert!(matches!(d.kind, NodeKind::File { size: 10, .. }));
}

#[test]
fn opaque_directory_hides_lower_content_but_keeps_its_own() {
    let tree = build(vec![
        Layer::new()
            .dir("d", 0o755)
            .file("d/old", b"1")
            .dir("d/sub", 0o755)
            .file("d/sub/deep", b"2")
            .file("keep", b"k"),
        Layer::new()
            .dir("d", 0o750)
            .file("d/new", b"3")
            .dir("d/sub", 0o755)
            .file("d/.wh..wh..opq", b""),
    ])
    .unwrap();
    assert_eq!(names(&tree, "d"), ["new", "sub"]);
    assert!(
        names(&tree, "d/sub").is_empty(),
        "lower d/sub/deep must be hidden"
    );
    assert!(tree.lookup_path(b"keep").is_some());
    let d = tree.node(tree.lookup_path(b"d").unwrap()).unwrap();
    assert_eq!(d.meta.mode, 0o750);
}

#[test]
fn file_replaces_directory_and_directory_replaces_file() {
    let tree = build(vec![
        Layer::new()
            .dir("p", 0o755)
            .dir("p/q", 0o755)
            .file("p/q/r", b"r")
            .file("f", b"file"),
        Layer::new()
            .file("p", b"now a file")
            .dir("f", 0o700)
            .file("f/inner", b"i"),
    ])
    .unwrap();
    let p = tree.node(tree.lookup_path(b"p").unwrap()).unwrap();
    assert!(matches!(p.kind, NodeKind::File { .. }));
    assert!(tree.lookup_path(b"p/q/r").is_none());
    assert_eq!(names(&tree, "f"), ["inner"]);
}

#[test]
fn directory_over_directory_merges_children_and_takes_new_metadata() {
    let mut upper = Layer::new();
    upper = upper.with_header("d/", b"", |h| {
        h.set_entry_type(EntryType::Directory);
        h.set_mode(0o1777);
        h.set_uid(5);
        h.set_gid(6);
        h.set_mtime(1_600_000_000);
    });
    let tree = build(vec![
        Layer::new().dir("d", 0o700).file("d/a", b"a"),
        upper.file("d/b", b"b"),
    ])
    .unwrap();
    assert_eq!(names(&tree, "d"), ["a", "b"]);
    let d = tree.node(tree.lookup_path(b"d").unwrap()).unwrap();
    assert_eq!(
        (d.meta.mode, d.meta.uid, d.meta.gid, d.meta.mtime),
        (0o1777, 5, 6, 1_600_000_000)
    );
    // A directory's link count is 2 plus its subdirectories.
    let root = tree.node(lazylayer::fs::tree::ROOT).unwrap();
    assert_eq!(root.nlink, 3);
}

#[test]
fn hardlinks_share_one_inode_and_count_links() {
    let tree = build(vec![
        Layer::new()
            .file("f", b"shared")
            .hardlink("g", "f")
            .hardlink("h", "./f"),
        Layer::new()
            .file(".wh.h", b"")
            .dir("sub", 0o755)
            .hardlink("sub/i", "g"),
    ])
    .unwrap();
    let f = tree.lookup_path(b"f").unwrap();
    assert_eq!(tree.lookup_path(b"g"), Some(f));
    assert_eq!(tree.lookup_path(b"sub/i"), Some(f));
    assert!(tree.lookup_path(b"h").is_none());
    assert_eq!(tree.node(f).unwrap().nlink, 3, "f, g, sub/i");
}

#[test]
fn special_files_modes_owners_times_and_xattrs() {
    let layer = Layer::new()
        .symlink("bin", "usr/bin")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .with_header("usr/bin/su", b"#!", |h| {
            h.set_mode(0o4755);
            h.set_uid(0);
            h.set_gid(42);
            h.set_mtime(1_234_567_890);
        })
        .with_header("usr/bin/wall", b"", |h| h.set_mode(0o2755))
        .dir("tmp", 0o1777)
        .with_header("dev/null", b"", |h| {
            h.set_entry_type(EntryType::Char);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            h.set_mode(0o666);
        })
        .with_header("dev/sda", b"", |h| {
            h.set_entry_type(EntryType::Block);
            h.set_device_major(8).unwrap();
            h.set_device_minor(0).unwrap();
        })
        .with_header("run/fifo", b"", |h| h.set_entry_type(EntryType::Fifo))
        .pax(&[
            ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
            ("SCHILY.xattr.user.note", b"hello"),
        ])
        .file("usr/bin/ping", b"ping");
    let tree = build(vec![layer]).unwrap();
    let node = |p: &str| tree.node(tree.lookup_path(p.as_bytes()).expect(p)).unwrap();
    assert!(matches!(&node("bin").kind, NodeKind::Symlink { target } if &target[..] == b"usr/bin"));
    let su = node("usr/bin/su");
    assert_eq!(
        (su.meta.mode, su.meta.gid, su.meta.mtime),
        (0o4755, 42, 1_234_567_890)
    );
    assert_eq!(node("usr/bin/wall").meta.mode, 0o2755);
    assert_eq!(node("tmp").meta.mode, 0o1777);
    assert!(matches!(
        node("dev/null").kind,
        NodeKind::Char { major: 1, minor: 3 }
    ));
    assert!(matches!(
        node("dev/sda").kind,
        NodeKind::Block { major: 8, minor: 0 }
    ));
    assert!(matches!(node("run/fifo").kind, NodeKind::Fifo));
    // Missing parents (dev/, run/) are created as root-owned 0755 directories.
    assert_eq!(node("dev").meta.mode, 0o755);
    let mut xattrs = node("usr/bin/ping").meta.xattrs.clone();
    xattrs.sort();
    assert_eq!(
        xattrs,
        vec![
            (
                b"security.capability".to_vec(),
                b"\x01\x00\x00\x02".to_vec()
            ),
            (b"user.note".to_vec(), b"hello".to_vec()),
        ]
    );
    // Paths resolve through symlinks; the setuid file is reachable as /bin/su.
    assert_eq!(
        tree.resolve(b"/bin/su", true),
        Ok(tree.lookup_path(b"usr/bin/su").unwrap())
    );
}

#[test]
fn later_duplicate_wins_and_absolute_names_stay_inside() {
    let tree = build(vec![
        Layer::new()
            .file("/etc/conf", b"first")
            .file("./etc/conf", b"second!"),
    ])
    .unwrap();
    let conf = tree.node(tree.lookup_path(b"etc/conf").unwrap()).unwrap();
    assert!(matches!(conf.kind, NodeKind::File { size: 7, .. }));
    assert_eq!(names(&tree, ""), ["etc"]);
}

#[test]
fn symlink_resolution_stays_in_the_image_and_detects_loops() {
    let tree = build(vec![
        Layer::new()
            .symlink("up", "../../../../etc")
            .dir("etc", 0o755)
            .file("etc/passwd", b"root")
            .symlink("loop1", "loop2")
            .symlink("loop2", "loop1")
            .symlink("dangling", "nowhere"),
    ])
    .unwrap();
    assert_eq!(
        tree.resolve(b"/up/passwd", true),
        Ok(tree.lookup_path(b"etc/passwd").unwrap())
    );
    assert_eq!(
        tree.resolve(b"/loop1", true),
        Err(ResolveError::SymlinkLoop)
    );
    assert_eq!(
        tree.resolve(b"/dangling", true),
        Err(ResolveError::NotFound)
    );
    assert_eq!(
        tree.resolve(b"/etc/passwd/x", true),
        Err(ResolveError::NotADirectory)
    );
    assert!(tree.resolve(b"/loop1", false).is_ok());
}

#[test]
fn file_content_is_cut_into_verified_chunks() {
    let big: Vec<u8> = (0..STREAM_CHUNK_BYTES * 2 + 100)
        .map(|i| (i % 251) as u8)
        .collect();
    let blob = Layer::new()
        .file("small", b"abc")
        .file("big", &big)
        .file("empty", b"")
        .gzip();
    let index = index(&blob).unwrap();
    let file = |name: &[u8]| {
        index
            .entries
            .iter()
            .find(|e| e.path == name)
            .map(|e| match &e.kind {
                EntryKind::File { size, chunks } => (*size, chunks.clone()),
                _ => panic!("not a file"),
            })
            .unwrap()
    };
    let (size, chunks) = file(b"big");
    assert_eq!(size, big.len() as u64);
    assert_eq!(chunks.len(), 3);
    let tar = {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut out).unwrap();
        out
    };
    for c in chunks.iter() {
        let ChunkSource::TarStream { offset } = c.source else {
            panic!("streamed layer chunk should point into the tar stream")
        };
        let bytes = &tar[offset as usize..(offset + c.size) as usize];
        assert_eq!(
            bytes,
            &big[c.file_offset as usize..(c.file_offset + c.size) as usize]
        );
        assert_eq!(c.digest.as_ref(), Some(&Digest::of(bytes)));
    }
    assert_eq!(file(b"empty").1.len(), 0);
}

#[test]
fn hostile_layers_are_refused_with_a_clear_error() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            Layer::new()
                .entry(EntryType::Regular, b"../evil", 0o644, b"", b"x")
                .gzip(),
            "..",
        ),
        (
            Layer::new()
                .entry(EntryType::Regular, b"a/../../evil", 0o644, b"", b"x")
                .gzip(),
            "..",
        ),
        (
            Layer::new()
                .entry(EntryType::Link, b"link", 0o644, b"../../etc/shadow", b"")
                .gzip(),
            "..",
        ),
        (
            Layer::new()
                .entry(EntryType::Symlink, b"noslink", 0o777, b"", b"")
                .gzip(),
            "link without a target",
        ),
    ];
    for (blob, needle) in cases {
        let err = index(&blob)
            .and_then(|i| MergedTree::build([(i.digest, i.entries)]))
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    let tree_err = |layer: Layer| build(vec![layer]).unwrap_err().to_string();
    assert!(tree_err(Layer::new().hardlink("l", "missing")).contains("does not exist"));
    assert!(tree_err(Layer::new().dir("d", 0o755).hardlink("l", "d")).contains("to a directory"));
    assert!(tree_err(Layer::new().file("", b"x")).contains("root must be a directory"));
}

#[test]
fn corrupt_or_truncated_streams_are_refused() {
    let blob = Layer::new().file("a", &[7u8; 5000]).file("b", b"b").gzip();
    let digest = Digest::of(&blob);
    // Wrong digest: the whole layer is refused even though it parses.
    let err = index_reader(
        &blob[..],
        &Digest::of(b"other"),
        blob.len() as u64,
        None,
        LayerCompression::Gzip,
        &Ignore,
    )
    .unwrap_err();
    assert!(matches!(err, LayerError::DigestMismatch { .. }), "{err}");
    // Truncated: an error, not a panic or a partial index.
    let cut = &blob[..blob.len() / 2];
    let err = index_reader(
        cut,
        &digest,
        blob.len() as u64,
        None,
        LayerCompression::Gzip,
        &Ignore,
    )
    .unwrap_err();
    assert!(err.to_string().contains(&digest.to_string()), "{err}");
    // A whole gzip stream of a tar cut inside a file's data: said in words, not read_exact's.
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut tar).unwrap();
    let cut_tar = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar[..3000]).unwrap();
        gz.finish().unwrap()
    };
    let err = index(&cut_tar).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("truncated"), "{text}");
    assert!(!text.contains("fill whole buffer"), "{text}");
    // Not gzip at all.
    let junk = b"this is not a gzip stream at all".to_vec();
    let err = index_reader(
        &junk[..],
        &Digest::of(&junk),
        junk.len() as u64,
        None,
        LayerCompression::Gzip,
        &Ignore,
    )
    .unwrap_err();
    assert!(err.to_string().contains("tar"), "{err}");
    // Trailing garbage after the archive is refused too (it is not part of the digested blob).
    let mut padded = blob.clone();
    padded.extend_from_slice(b"junk");
    let err = index_reader(
        &padded[..],
        &digest,
        blob.len() as u64,
        None,
        LayerCompression::Gzip,
        &Ignore,
    )
    .unwrap_err();
    assert!(err.to_string().contains(&digest.to_string()), "{err}");
}

/// GNU tar's PAX sparse files (formats 1.0 and 0.1, as `tar --sparse --format=posix` writes
/// them) read as the file itself: its real name, size and bytes with the holes as zeros, never
/// the internal `GNUSparseFile.NNN/` name or the map.
#[test]
fn gnu_sparse_files_read_as_their_real_name_and_content() {
    for version in ["1.0", "0.1"] {
        let (tar, expected) = support::gnu_sparse_tar(version);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let index = index(&gz.finish().unwrap()).unwrap();
        assert_eq!(index.entries.len(), 1, "{version}");
        let entry = &index.entries[0];
        assert_eq!(entry.path, b"hole", "{version}");
        let EntryKind::File { size, chunks } = &entry.kind else {
            panic!("{version}: not a file: {:?}", entry.kind)
        };
        assert_eq!(*size, expected.len() as u64, "{version}");
        let mut content = Vec::new();
        for chunk in chunks.iter() {
            assert_eq!(chunk.file_offset, content.len() as u64, "{version}");
            match chunk.source {
                ChunkSource::TarStream { offset } => {
                    content.extend_from_slice(&tar[offset as usize..(offset + chunk.size) as usize])
                }
                ChunkSource::Zeros => content.resize(content.len() + chunk.size as usize, 0),
                ref other => panic!("{version}: unexpected chunk source {other:?}"),
            }
        }
        assert!(content == expected, "{version}: content differs");
        assert!(
            chunks.iter().any(|c| c.source == ChunkSource::Zeros),
            "{version}: no hole was kept as one"
        );
    }
}

/// A layer whose blob matches its digest but whose tar stream is not the config's diff_id is
/// refused, as containerd's unpacker refuses it; the right diff_id passes.
#[test]
fn a_diff_id_that_does_not_match_the_stream_is_refused() {
    let blob = Layer::new().file("a", b"content").gzip();
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut tar).unwrap();
    let check = |diff_id: &Digest| {
        index_reader(
            &blob[..],
            &Digest::of(&blob),
            blob.len() as u64,
            Some(diff_id),
            LayerCompression::Gzip,
            &Ignore,
        )
    };
    check(&Digest::of(&tar)).unwrap();
    let wrong = Digest::of(b"another layer's tar");
    let err = check(&wrong).unwrap_err();
    assert!(
        matches!(&err, LayerError::DiffIdMismatch { expected, actual, .. }
            if *expected == wrong && *actual == Digest::of(&tar)),
        "{err}"
    );
    assert!(err.to_string().contains("rootfs.diff_ids"), "{err}");
    assert_eq!(
        lazylayer::source::retry::Transient::verdict(&err),
        lazylayer::source::retry::Verdict::Fatal
    );
}

/// What containerd's applier does with symlinks: their mode reads 0777 whatever the header says,
/// and an entry below a symlink goes where the link points (inside the image), the link stays.
#[test]
fn entries_below_a_symlink_land_at_its_target_and_symlinks_read_0777() {
    let tree = build(vec![
        Layer::new()
            .dir("usr", 0o755)
            .dir("usr/bin", 0o755)
            .entry(EntryType::Symlink, b"bin", 0o644, b"usr/bin", b"")
            .symlink("escape", "../../../opt")
            .symlink("dangling", "srv/data")
            .symlink("loop", "loop"),
        Layer::new()
            .file("bin/ls", b"ls")
            .file("escape/tool", b"tool")
            .file("dangling/x", b"x"),
    ])
    .unwrap();
    let node = |p: &str| tree.node(tree.lookup_path(p.as_bytes()).expect(p)).unwrap();
    assert!(matches!(&node("bin").kind, NodeKind::Symlink { target } if &target[..] == b"usr/bin"));
    assert_eq!(node("bin").meta.mode, 0o777);
    assert!(matches!(
        node("usr/bin/ls").kind,
        NodeKind::File { size: 2, .. }
    ));
    // `..` stops at the root, as the applier's root-scoped resolution does.
    assert!(matches!(node("opt/tool").kind, NodeKind::File { .. }));
    assert!(matches!(node("escape").kind, NodeKind::Symlink { .. }));
    assert!(matches!(node("srv/data/x").kind, NodeKind::File { .. }));
    assert_eq!(
        names(&tree, ""),
        ["bin", "dangling", "escape", "loop", "opt", "srv", "usr"]
    );
    // A whiteout reaches through a symlinked parent too.
    let tree = build(vec![
        Layer::new()
            .dir("usr", 0o755)
            .dir("usr/bin", 0o755)
            .file("usr/bin/ls", b"ls")
            .symlink("bin", "usr/bin"),
        Layer::new().file("bin/.wh.ls", b""),
    ])
    .unwrap();
    assert_eq!(tree.lookup_path(b"usr/bin/ls"), None);
    // Writing below a symlink loop is refused, not guessed at.
    let looped = build(vec![
        Layer::new().symlink("loop", "loop"),
        Layer::new().file("loop/x", b"x"),
    ]);
    assert!(
        matches!(looped, Err(LayerError::BadEntry { .. })),
        "{looped:?}"
    );
}

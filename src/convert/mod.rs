//! `lazylayer convert`: rewrite an image's layers as eStargz or zstd:chunked, deterministically.
//!
//! Each layer is streamed once from the source and indexed with the same hardened tar reader a
//! mount uses for index-less layers (`layer::tar_stream`): hostile names (`..`, NUL) are refused
//! there, the blob is verified against its digest, and the file contents are spooled to a
//! temporary file on the way. The layer is then written again from that index, entry by entry,
//! by the format's writer ([`chunked`]), optionally with prioritised files first and the
//! prefetch landmark after them. Entries are re-encoded as fresh tar headers (GNU long names,
//! PAX records for xattrs) from the normalised metadata, so two conversions of the same input
//! give the same bytes whatever tool wrote it. Each layer's entries are also applied to a
//! [`MergedTree`] of the layers below it before the layer is written, so the writer refuses
//! exactly what a mount of its output would (a hard link to a missing path or to a directory,
//! a symlink loop in a parent path), and nothing is written for such an image.
//!
//! The new config is the old one with `rootfs.diff_ids` replaced (the digests of the new
//! uncompressed tar streams, which include the TOC entry); history and everything else is kept.
//! The manifest is a plain OCI manifest whose layers carry the TOC digest annotation, so the
//! image is pulled and run by any client, and lazily by eStargz-aware ones.

pub mod chunked;
pub mod output;
pub mod seek_index;

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::fs::tree::MergedTree;
use crate::layer::tar_stream::{self, StreamObserver};
use crate::layer::{ChunkSource, EntryKind, LayerEntry, LayerError};
use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, MAX_CONFIG_BYTES, Platform};
use crate::model::reference::ImageRef;
use crate::source::config::FetchConfig;
use crate::source::image;
use crate::source::open::{OpenedImage, open_image};
use crate::source::{ImageSource, SourceError};

/// The layer formats `convert` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Estargz,
    ZstdChunked,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Reference(#[from] crate::model::reference::ReferenceError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("image {image}: config {digest} is not a JSON object")]
    Config { image: String, digest: Digest },
    #[error("writing layer {layer} of {image}: {source}")]
    Write {
        image: String,
        layer: Digest,
        source: io::Error,
    },
    #[error("{0}")]
    Output(String),
}

/// How to convert.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub format: Format,
    /// Paths (normalised, no leading `/`) to put first in their layer, before the landmark.
    pub prioritize: Vec<Vec<u8>>,
    /// Uncompressed bytes per chunk. 4 MiB, stargz-snapshotter's default: a big file costs a
    /// request per 4 MiB read, a small file is one chunk whatever this is.
    pub chunk_size: u64,
    /// Compression level. gzip: 6 (zlib's default) compresses nearly as well as 9 at a fraction
    /// of the time. zstd: 3 (its default) beats gzip 6 in size and speed.
    pub level: u32,
}

impl ConvertOptions {
    pub fn new(format: Format) -> ConvertOptions {
        ConvertOptions {
            format,
            prioritize: Vec::new(),
            chunk_size: 4 << 20,
            level: match format {
                Format::Estargz => 6,
                Format::ZstdChunked => 3,
            },
        }
    }
}

/// One converted layer, its blob in a temporary file.
pub struct ConvertedLayer {
    pub descriptor: Descriptor,
    pub diff_id: Digest,
    pub blob: tempfile::NamedTempFile,
    pub source: Digest,
}

/// A converted image, ready to be written to a layout or pushed.
pub struct ConvertedImage {
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
    pub config: Vec<u8>,
    pub config_descriptor: Descriptor,
    pub layers: Vec<ConvertedLayer>,
}

/// Progress of a conversion, for the command line to show. Layers are numbered from 0.
pub trait Progress: Send + Sync {
    fn layer_started(&self, _index: usize, _count: usize, _source: &Descriptor) {}
    /// `bytes` more of the layer's uncompressed file data have streamed in.
    fn layer_read(&self, _index: usize, _bytes: u64) {}
    fn layer_done(&self, _index: usize, _count: usize, _source: &Descriptor, _new: &Descriptor) {}
}

pub struct Silent;
impl Progress for Silent {}

/// Keeps the file data of a streamed layer in a temporary file, by tar stream offset.
struct Spool {
    progress: Arc<dyn Progress>,
    layer: usize,
    file: Mutex<(std::fs::File, u64)>,
    /// Tar stream offset of a chunk → where it is in the spool file.
    at: Mutex<HashMap<u64, u64>>,
    failed: Mutex<Option<io::Error>>,
}

impl StreamObserver for Spool {
    fn chunk(&self, offset: u64, data: &Bytes, _digest: &Digest) {
        let mut file = self.file.lock().unwrap();
        let position = file.1;
        if let Err(e) = file.0.write_all(data) {
            self.failed.lock().unwrap().get_or_insert(e);
            return;
        }
        file.1 += data.len() as u64;
        self.at.lock().unwrap().insert(offset, position);
        self.progress.layer_read(self.layer, data.len() as u64);
    }

    fn cancelled(&self) -> bool {
        self.failed.lock().unwrap().is_some()
    }
}

/// Reads a spooled file's content, chunk after chunk.
struct SpooledContent<'a> {
    spool: &'a mut std::fs::File,
    /// (spool position, length) of each chunk, in file order.
    pieces: std::collections::VecDeque<(u64, u64)>,
    remaining_in_piece: u64,
}

impl Read for SpooledContent<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.remaining_in_piece == 0 {
            let Some((position, len)) = self.pieces.pop_front() else {
                return Ok(0);
            };
            self.spool.seek(io::SeekFrom::Start(position))?;
            self.remaining_in_piece = len;
        }
        let want = buf.len().min(self.remaining_in_piece as usize);
        let n = self.spool.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.remaining_in_piece -= n as u64;
        Ok(n)
    }
}

/// Entries an eStargz writer adds itself: dropped when converting an eStargz layer again.
fn is_estargz_metadata(path: &[u8]) -> bool {
    [chunked::TOC_NAME, chunked::LANDMARK, chunked::NO_LANDMARK]
        .iter()
        .any(|name| path == name.as_bytes())
}

/// The order entries are written in, and how many of them go before the landmark: prioritised
/// files (in the list's order) first, each after its parent directories that are in the layer,
/// then everything else in tar order. Only what
/// can move safely moves: a path the layer has once, not a hard link (its target must come
/// first) and not the target of one.
fn write_order(entries: &[LayerEntry], prioritize: &[Vec<u8>]) -> (Vec<usize>, usize) {
    let mut count: HashMap<&[u8], usize> = HashMap::new();
    let mut link_targets = BTreeSet::new();
    for e in entries {
        *count.entry(&e.path).or_default() += 1;
        if let EntryKind::Hardlink { target } = &e.kind {
            link_targets.insert(target.as_slice());
        }
    }
    let position: HashMap<&[u8], usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_slice(), i))
        .collect();
    let movable = |i: usize| {
        let e = &entries[i];
        count[e.path.as_slice()] == 1
            && !matches!(e.kind, EntryKind::Hardlink { .. })
            && !link_targets.contains(e.path.as_slice())
    };
    let mut first = Vec::new();
    let mut taken = vec![false; entries.len()];
    for path in prioritize {
        let Some(&i) = position.get(path.as_slice()) else {
            continue;
        };
        if taken[i] || !movable(i) || !matches!(entries[i].kind, EntryKind::File { .. }) {
            continue;
        }
        // Parent directories first, outermost first.
        let mut parents = Vec::new();
        let mut p = path.as_slice();
        while let Some(slash) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..slash];
            if let Some(&d) = position.get(p)
                && !taken[d]
                && movable(d)
            {
                parents.push(d);
            }
        }
        for d in parents.into_iter().rev() {
            taken[d] = true;
            first.push(d);
        }
        taken[i] = true;
        first.push(i);
    }
    let moved = first.len();
    let mut order = first;
    order.extend((0..entries.len()).filter(|&i| !taken[i]));
    (order, moved)
}

/// Streams `layer`, indexes and spools it, and writes it in the wanted format into a temporary
/// file.
async fn convert_layer(
    source: Arc<dyn ImageSource>,
    image_name: &str,
    (index, layer): (usize, &image::Layer),
    options: &ConvertOptions,
    progress: Arc<dyn Progress>,
    merged: &mut MergedTree,
) -> Result<ConvertedLayer, ConvertError> {
    let layer_index = index;
    let digest = layer.descriptor.digest.clone();
    let write_error = |source: io::Error| ConvertError::Write {
        image: image_name.to_string(),
        layer: digest.clone(),
        source,
    };
    let spool_file = tempfile::tempfile().map_err(write_error)?;
    let spool = Arc::new(Spool {
        progress,
        layer: index,
        file: Mutex::new((spool_file, 0)),
        at: Mutex::new(HashMap::new()),
        failed: Mutex::new(None),
    });
    let compression = layer
        .compression()
        .map_err(|_| LayerError::UnsupportedMediaType {
            layer: digest.clone(),
            media_type: layer.descriptor.media_type.clone(),
        })?;
    let index = tar_stream::index(source, layer, compression, spool.clone()).await;
    if let Some(e) = spool.failed.lock().unwrap().take() {
        return Err(write_error(e));
    }
    let index = index?;
    let spool =
        Arc::try_unwrap(spool).map_err(|_| write_error(io::Error::other("spool in use")))?;
    let (mut spool_file, _) = spool.file.into_inner().unwrap();
    let at = spool.at.into_inner().unwrap();
    let entries: Vec<LayerEntry> = index
        .entries
        .into_iter()
        .filter(|e| !is_estargz_metadata(&e.path))
        .collect();
    // What the readers refuse (a hard link to a path that does not exist, to a directory, a
    // symlink loop in a parent path), the writer refuses too, before writing anything.
    merged.add_layer(layer_index, &digest, entries.clone())?;
    let options = options.clone();
    let blob = tempfile::NamedTempFile::new().map_err(write_error)?;
    let out = blob.reopen().map_err(write_error)?;
    let written = tokio::task::spawn_blocking(move || -> io::Result<chunked::Written> {
        let (order, moved) = write_order(&entries, &options.prioritize);
        let mut writer = chunked::ChunkedWriter::new(
            options.format,
            io::BufWriter::with_capacity(1 << 20, out),
            options.chunk_size,
            options.level,
        );
        if moved == 0 {
            writer.landmark(false)?;
        }
        for (n, &i) in order.iter().enumerate() {
            let entry = &entries[i];
            let pieces = match &entry.kind {
                EntryKind::File { chunks, .. } => chunks
                    .iter()
                    .map(|c| match c.source {
                        ChunkSource::TarStream { offset } => at
                            .get(&offset)
                            .map(|&p| (p, c.size))
                            .ok_or_else(|| io::Error::other("chunk missing from the spool")),
                        _ => Err(io::Error::other("unexpected chunk source")),
                    })
                    .collect::<io::Result<_>>()?,
                _ => Default::default(),
            };
            let mut content = SpooledContent {
                spool: &mut spool_file,
                pieces,
                remaining_in_piece: 0,
            };
            writer.append(entry, &mut content)?;
            if n + 1 == moved {
                writer.landmark(true)?;
            }
        }
        let (mut out, written) = writer.finish()?;
        out.flush()?;
        Ok(written)
    })
    .await
    .map_err(|e| write_error(io::Error::other(e)))?
    .map_err(write_error)?;
    Ok(ConvertedLayer {
        descriptor: Descriptor {
            annotations: written.annotations,
            ..Descriptor::new(written.media_type, written.digest, written.size)
        },
        diff_id: written.diff_id,
        blob,
        source: digest,
    })
}

/// Converts image `reference` to `options.format`.
pub async fn convert(
    reference: &str,
    registry: &FetchConfig,
    platform: &Platform,
    options: &ConvertOptions,
    progress: Arc<dyn Progress>,
) -> Result<ConvertedImage, ConvertError> {
    let parsed = ImageRef::parse(reference)?;
    let OpenedImage { source, image, .. } =
        open_image(&parsed, None, registry, platform, None).await?;
    let name = parsed.to_string();
    let config_bytes = source
        .blob(&image.manifest.config, MAX_CONFIG_BYTES)
        .await?;
    let mut layers = Vec::with_capacity(image.layers.len());
    let mut merged = MergedTree::empty();
    for (i, layer) in image.layers.iter().enumerate() {
        progress.layer_started(i, image.layers.len(), &layer.descriptor);
        let converted = convert_layer(
            source.clone(),
            &name,
            (i, layer),
            options,
            progress.clone(),
            &mut merged,
        )
        .await?;
        progress.layer_done(
            i,
            image.layers.len(),
            &layer.descriptor,
            &converted.descriptor,
        );
        layers.push(converted);
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&config_bytes).map_err(|_| ConvertError::Config {
            image: name.clone(),
            digest: image.manifest.config.digest.clone(),
        })?;
    let diff_ids: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| l.diff_id.to_string().into())
        .collect();
    match config.get_mut("rootfs").and_then(|r| r.as_object_mut()) {
        Some(rootfs) => {
            rootfs.insert("diff_ids".into(), diff_ids.into());
        }
        None => {
            return Err(ConvertError::Config {
                image: name,
                digest: image.manifest.config.digest.clone(),
            });
        }
    }
    let config = serde_json::to_vec(&config).map_err(|e| ConvertError::Output(e.to_string()))?;
    let config_descriptor = Descriptor::of(crate::model::oci::MEDIA_OCI_CONFIG, &config);
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::model::oci::MEDIA_OCI_MANIFEST,
        "config": config_descriptor,
        "layers": layers.iter().map(|l| &l.descriptor).collect::<Vec<_>>(),
    });
    if !image.manifest.annotations.is_empty() {
        manifest["annotations"] = serde_json::to_value(&image.manifest.annotations)
            .map_err(|e| ConvertError::Output(e.to_string()))?;
    }
    let manifest =
        serde_json::to_vec(&manifest).map_err(|e| ConvertError::Output(e.to_string()))?;
    Ok(ConvertedImage {
        manifest_digest: Digest::of(&manifest),
        manifest,
        config,
        config_descriptor,
        layers,
    })
}

/// Reads a `--prioritize` list: one path per line, `#` comments and blank lines ignored.
pub fn parse_prioritize(text: &str) -> Result<Vec<Vec<u8>>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| crate::layer::normalize_path(l.as_bytes()).map_err(|e| format!("{l}: {e}")))
        .collect()
}

/// Writes tar headers for normalised entries.
pub struct TarWriter;

impl TarWriter {
    /// The header blocks of `entry` (with GNU long-name blocks and a PAX block for xattrs when
    /// needed), without its content.
    pub fn header_bytes(entry: &LayerEntry) -> io::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        if !entry.meta.xattrs.is_empty() {
            let mut records = Vec::new();
            for (k, v) in &entry.meta.xattrs {
                let mut record = b"SCHILY.xattr.".to_vec();
                record.extend_from_slice(k);
                record.push(b'=');
                record.extend_from_slice(v);
                record.push(b'\n');
                records.extend(pax_record(&record));
            }
            let mut pax = tar::Header::new_ustar();
            pax.set_entry_type(tar::EntryType::XHeader);
            pax.set_path("PaxHeaders/entry")?;
            pax.set_size(records.len() as u64);
            pax.set_mode(0o644);
            pax.set_cksum();
            builder.append(&pax, &records[..])?;
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(entry.meta.mode);
        header.set_uid(entry.meta.uid as u64);
        header.set_gid(entry.meta.gid as u64);
        header.set_mtime(entry.meta.mtime.max(0) as u64);
        header.set_size(0);
        let mut path = if entry.path.is_empty() {
            b"./".to_vec()
        } else {
            entry.path.clone()
        };
        let os = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_owned();
        match &entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                if !path.ends_with(b"/") {
                    path.push(b'/');
                }
            }
            EntryKind::File { size, .. } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(*size);
            }
            EntryKind::Symlink { target } | EntryKind::Hardlink { target } => {
                header.set_entry_type(if matches!(entry.kind, EntryKind::Symlink { .. }) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                builder.append_link(&mut header, os(&path), os(target))?;
                return without_end_of_archive(builder);
            }
            EntryKind::Char { major, minor } | EntryKind::Block { major, minor } => {
                header.set_entry_type(if matches!(entry.kind, EntryKind::Char { .. }) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                header.set_device_major(*major)?;
                header.set_device_minor(*minor)?;
            }
            EntryKind::Fifo => header.set_entry_type(tar::EntryType::Fifo),
        }
        builder.append_data(&mut header, os(&path), io::empty())?;
        without_end_of_archive(builder)
    }
}

/// The builder's bytes without the two zero blocks it always ends an archive with.
fn without_end_of_archive(builder: tar::Builder<Vec<u8>>) -> io::Result<Vec<u8>> {
    let mut bytes = builder.into_inner()?;
    bytes.truncate(bytes.len().saturating_sub(1024));
    Ok(bytes)
}

/// A PAX record "LEN KEY=VALUE\n", whose length counts its own digits.
fn pax_record(key_value: &[u8]) -> Vec<u8> {
    let mut len = key_value.len() + 2;
    loop {
        let total = len.to_string().len() + 1 + key_value.len();
        if total == len {
            break;
        }
        len = total;
    }
    let mut out = format!("{len} ").into_bytes();
    out.extend_from_slice(key_value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Meta;

    fn entry(path: &str, kind: EntryKind) -> LayerEntry {
        LayerEntry {
            path: path.as_bytes().to_vec(),
            kind,
            meta: Meta::default(),
        }
    }

    fn file(path: &str) -> LayerEntry {
        entry(
            path,
            EntryKind::File {
                size: 0,
                chunks: Arc::from(Vec::new()),
            },
        )
    }

    #[test]
    fn pax_records_count_their_own_length() {
        assert_eq!(pax_record(b"a=b\n"), b"6 a=b\n");
        let long = vec![b'x'; 95];
        let record = pax_record(&long);
        let (len, _) = std::str::from_utf8(&record)
            .unwrap()
            .split_once(' ')
            .unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), record.len());
    }

    #[test]
    fn prioritised_files_move_first_with_their_directories_but_links_stay() {
        let entries = vec![
            entry("usr", EntryKind::Dir),
            entry("usr/bin", EntryKind::Dir),
            file("usr/bin/a"),
            file("usr/bin/b"),
            entry(
                "usr/bin/c",
                EntryKind::Hardlink {
                    target: b"usr/bin/b".to_vec(),
                },
            ),
            file("etc/x"),
            file("etc/x"),
        ];
        let wanted = ["usr/bin/b", "usr/bin/c", "etc/x", "missing"]
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect::<Vec<_>>();
        // b is a link target, c a link, x is there twice: none may move.
        let (order, n) = write_order(&entries, &wanted);
        assert_eq!((order, n), ((0..7).collect(), 0));
        let (order, n) = write_order(&entries, &[b"usr/bin/a".to_vec()]);
        assert_eq!(n, 3);
        assert_eq!(order, vec![0, 1, 2, 3, 4, 5, 6]);
        let (order, n) = write_order(&entries[2..], &[b"etc/x".to_vec(), b"usr/bin/a".to_vec()]);
        assert_eq!((order, n), (vec![0, 1, 2, 3, 4], 1));
    }

    #[test]
    fn prioritize_lists_are_normalised_and_hostile_paths_refused() {
        assert_eq!(
            parse_prioritize("# start-up\n/usr/bin/python3\n\n./app/main.py\n").unwrap(),
            vec![b"usr/bin/python3".to_vec(), b"app/main.py".to_vec()]
        );
        assert!(parse_prioritize("../etc/shadow").is_err());
    }
}

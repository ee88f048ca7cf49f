//! Layer formats: turning one layer blob into a list of entries and chunk locations.
//!
//! Every format ends up in the same shape, a [`LayerIndex`]: the layer's entries in tar order,
//! with each regular file's content described as [`ChunkRef`]s that say where its bytes live and
//! what they must hash to. The merged tree and the content reader never look at the format again.
//!
//! - [`estargz`]: gzip layers with a TOC at the end (`stargz.index.json`), found through a footer;
//!   each chunk is its own gzip member, so it can be fetched and inflated alone.
//! - [`zstd_chunked`]: zstd layers whose TOC sits in a skippable frame that the layer's annotations
//!   point at; each chunk is its own zstd frame.
//! - [`gzip_index`]: plain gzip layers with a seek index published next to the image
//!   (`lazylayer index`): chunks are inflated from the checkpoint before them.
//! - [`tar_stream`]: layers without an index (plain gzip, zstd or uncompressed tar). They are
//!   streamed once, in order, and cut into chunks as they go; each chunk's digest is computed on
//!   the way and trusted once the whole blob has matched its digest, so that a chunk evicted from
//!   the cache and fetched again (by streaming the layer again) is still verified.
//!
//! Entry paths are normalised here, once, and hostile names (`..` components, NUL bytes) are
//! refused here, so no later stage sees them.

pub mod codec;
pub mod estargz;
pub mod gzip_index;
pub mod sparse;
pub mod tar_stream;
pub mod toc;
pub mod zstd_chunked;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cache::disk::DiskCache;
use crate::cache::memory::ChunkKey;
use crate::model::digest::Digest;
use crate::model::oci::{LayerCompression, LazyIndex};
use crate::source::image::Layer;
use crate::source::retry::{Transient, Verdict};
use crate::source::{ImageSource, SourceError};

/// Largest uncompressed chunk accepted from a TOC. eStargz and zstd:chunked writers use chunks of
/// a few MiB at most; a larger claim is a hostile or broken TOC trying to make us allocate.
pub const MAX_CHUNK_BYTES: u64 = 64 << 20;

/// Size of the chunks a streamed (index-less) layer is cut into. 1 MiB keeps the per-chunk
/// bookkeeping small (a digest per MiB) while a re-fetch after eviction wastes little.
pub const STREAM_CHUNK_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Content that is wrong although it matched its digest (or has none to match).
    #[error("layer {layer}: {reason}")]
    Malformed { layer: Digest, reason: String },
    /// Bytes that do not decode and could not be checked against a digest first (the eStargz
    /// TOC's gzip member: its digest is of the JSON inside).
    #[error(
        "layer {layer}: {reason} (these bytes could not be checked against a digest first; if \
         this persists, the layer is broken in the registry)"
    )]
    Undecodable { layer: Digest, reason: String },
    #[error("layer {layer}: entry {:?}: {reason}", shortened(path))]
    BadEntry {
        layer: Digest,
        path: String,
        reason: String,
    },
    #[error("layer {layer}: {what} does not match its digest (expected {expected}, got {actual})")]
    DigestMismatch {
        layer: Digest,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {layer}: unsupported media type {media_type}")]
    UnsupportedMediaType { layer: Digest, media_type: String },
    /// The layer matched its blob digest but not the image config's `rootfs.diff_ids`: the
    /// config describes other layers. containerd refuses such an image when it unpacks it.
    #[error(
        "layer {layer}: wrong diff id calculated on extraction: its uncompressed content is \
         {actual} but the image config's rootfs.diff_ids says {expected}; the image's config \
         does not describe its layers (rebuild or re-push the image)"
    )]
    DiffIdMismatch {
        layer: Digest,
        expected: Digest,
        actual: Digest,
    },
}

/// Worth loading the layer again? Only if its bytes may have been damaged in transit: they
/// failed their digest, or they did not decode before any digest could check them
/// ([`LayerError::Undecodable`]). What is malformed or hostile although it matched its digest
/// is refused again however often it is fetched, and transport failures were already retried
/// by the source.
impl Transient for LayerError {
    fn verdict(&self) -> Verdict {
        match self {
            LayerError::Undecodable { .. } | LayerError::DigestMismatch { .. } => Verdict::Damaged,
            LayerError::Source(_)
            | LayerError::Malformed { .. }
            | LayerError::BadEntry { .. }
            | LayerError::DiffIdMismatch { .. }
            | LayerError::UnsupportedMediaType { .. } => Verdict::Fatal,
        }
    }
}

/// A path as an error message shows it: a hostile one can be megabytes long, so the middle of
/// a long one is left out (its start and end say where it is).
fn shortened(path: &str) -> String {
    const SHOWN: usize = 120;
    if path.len() <= 2 * SHOWN {
        return path.to_string();
    }
    let start = path.floor_char_boundary(SHOWN);
    let end = path.ceil_char_boundary(path.len() - SHOWN);
    format!(
        "{}...({} bytes)...{}",
        &path[..start],
        end - start,
        &path[end..]
    )
}

impl LayerError {
    pub(crate) fn malformed(layer: &Digest, reason: impl Into<String>) -> LayerError {
        LayerError::Malformed {
            layer: layer.clone(),
            reason: reason.into(),
        }
    }
}

/// How a layer's content is laid out, which decides how a chunk is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerFormat {
    Estargz,
    ZstdChunked,
    /// No index: the tar is streamed, compressed this way.
    TarStream(LayerCompression),
    /// Plain gzip with a seek index artifact ([`gzip_index`]).
    GzipIndex,
}

impl LayerFormat {
    pub fn name(&self) -> &'static str {
        match self {
            LayerFormat::Estargz => "estargz",
            LayerFormat::ZstdChunked => "zstd:chunked",
            LayerFormat::TarStream(LayerCompression::Gzip) => "gzip",
            LayerFormat::TarStream(LayerCompression::Zstd) => "zstd",
            LayerFormat::TarStream(LayerCompression::None) => "tar",
            LayerFormat::GzipIndex => "gzip+index",
        }
    }
}

/// How a compressed chunk is inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    Gzip,
    Zstd,
    /// Stored as is (uncompressed tar layers).
    Identity,
    /// Raw deflate entered at a checkpoint of the layer's gzip seek index.
    Deflate {
        checkpoint: u32,
    },
}

/// Where one chunk of a file's content lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkSource {
    /// An independently compressed span of the blob: inflate `start..end`, skip `inner_offset`
    /// bytes, take the chunk's size.
    Compressed {
        start: u64,
        end: u64,
        inner_offset: u64,
        codec: Codec,
    },
    /// Bytes at this offset of the uncompressed tar stream (index-less layers).
    TarStream { offset: u64 },
    /// A run of zero bytes that the writer did not store (zstd:chunked `chunkType: zeros`).
    Zeros,
}

/// One chunk of a regular file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Where the chunk starts within the file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    pub source: ChunkSource,
    /// What the uncompressed bytes must hash to; `None` only for [`ChunkSource::Zeros`].
    pub digest: Option<Digest>,
}

impl ChunkRef {
    /// The chunk's memory-cache key within `layer`, or `None` for chunks that are never stored
    /// (runs of zeros).
    pub fn cache_key(&self, layer: &Digest) -> Option<ChunkKey> {
        let (offset, inner) = match self.source {
            ChunkSource::Compressed {
                start,
                inner_offset,
                ..
            } => (start, inner_offset),
            ChunkSource::TarStream { offset } => (offset, 0),
            ChunkSource::Zeros => return None,
        };
        Some(ChunkKey {
            layer: layer.clone(),
            offset,
            inner,
        })
    }
}

/// The type-specific part of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
        chunks: Arc<[ChunkRef]>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link to another path (normalised like entry paths).
    Hardlink {
        target: Vec<u8>,
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// Ownership, permissions, times and xattrs: what `stat` and `getxattr` report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One tar entry, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerEntry {
    /// Path relative to the root, components joined by `/`, no leading `./` or `/`, no trailing
    /// `/`; empty for the root itself.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub meta: Meta,
}

/// Everything the merged tree needs from one layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerIndex {
    /// The layer blob's digest (what chunks are fetched from).
    pub digest: Digest,
    pub format: LayerFormat,
    pub entries: Vec<LayerEntry>,
    /// eStargz prefetch landmark: the compressed bytes `0..end` hold the files the image's author
    /// marked as needed at start-up (`None` when the layer has no landmark).
    pub prefetch_end: Option<u64>,
    /// Where inflating can start, for layers read through a gzip seek index (not cached with
    /// the index: such layers are loaded from their cached index blob instead).
    #[serde(skip)]
    pub checkpoints: Option<gzip_index::Checkpoints>,
}

/// The longest path an entry may have, in bytes: `/` + path + NUL must fit Linux's `PATH_MAX`
/// (4096). Nothing can open a longer path in one call, and containerd cannot unpack it either;
/// bounding it bounds what every entry costs in memory. Without the bound an entry's path grows
/// with its depth, so a deep tree costs memory quadratic in its depth: a 372 KB layer of 10,000
/// nested directories held 415 MB of paths.
pub const MAX_PATH_BYTES: usize = 4094;

/// Normalises a tar or TOC path: strips `./` and `/` prefixes and trailing `/`, drops `.`
/// components and empty ones. `..` components and NUL bytes are refused: no layer needs them and
/// they are how hostile layers try to write outside the tree; so are paths longer than
/// [`MAX_PATH_BYTES`].
pub fn normalize_path(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.contains(&0) {
        return Err("name contains a NUL byte".into());
    }
    let too_long = || {
        format!(
            "path is longer than {MAX_PATH_BYTES} bytes (Linux's PATH_MAX): nothing could open it \
             and containerd could not unpack it"
        )
    };
    // A hostile header can carry megabytes of path: never more than the bound is built.
    let mut out = Vec::with_capacity(raw.len().min(MAX_PATH_BYTES + 1));
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => return Err("name contains a `..` component".into()),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
                if out.len() > MAX_PATH_BYTES {
                    return Err(too_long());
                }
            }
        }
    }
    Ok(out)
}

/// Checks that `chunks` tile `0..size` exactly, in order, each within the size bound.
pub(crate) fn check_chunks(chunks: &[ChunkRef], size: u64) -> Result<(), String> {
    let mut next = 0u64;
    for c in chunks {
        if c.file_offset != next {
            return Err(if c.file_offset < next {
                format!("chunks overlap at offset {}", c.file_offset)
            } else {
                format!("chunks leave a gap at offset {next}")
            });
        }
        if c.size == 0 || c.size > MAX_CHUNK_BYTES {
            return Err(format!(
                "chunk at offset {} has size {} (allowed: 1..={MAX_CHUNK_BYTES})",
                c.file_offset, c.size
            ));
        }
        next = c
            .file_offset
            .checked_add(c.size)
            .ok_or("chunk offsets overflow")?;
    }
    if next != size {
        return Err(format!("chunks cover {next} bytes of a {size}-byte file"));
    }
    Ok(())
}

/// Reads a layer's index: from its TOC when it has one, else by streaming it. `observer` sees
/// every entry and chunk of file data that streaming a layer produces (so the caller can cache
/// the data); it is not called for TOC formats, whose data is fetched on demand.
///
/// With a disk cache, what was loaded before is loaded from there: TOCs are checked against
/// their digests again; the index of a streamed layer (derived data, not verifiable without the
/// blob) is trusted as written, since it was written only after its blob had been verified.
pub async fn load(
    source: Arc<dyn ImageSource>,
    layer: &Layer,
    observer: tar_stream::ChunkSink,
    disk: Option<&DiskCache>,
) -> Result<LayerIndex, LayerError> {
    let digest = &layer.descriptor.digest;
    let compression = layer
        .compression()
        .map_err(|_| LayerError::UnsupportedMediaType {
            layer: digest.clone(),
            media_type: layer.descriptor.media_type.clone(),
        })?;
    match (&layer.lazy_index, compression) {
        (Some(LazyIndex::Estargz { toc_digest }), LayerCompression::Gzip) => {
            estargz::load(source.as_ref(), &layer.descriptor, toc_digest, disk).await
        }
        (
            Some(LazyIndex::ZstdChunked {
                manifest_checksum,
                manifest_position,
            }),
            LayerCompression::Zstd,
        ) => {
            zstd_chunked::load(
                source.as_ref(),
                &layer.descriptor,
                manifest_checksum,
                manifest_position,
                disk,
            )
            .await
        }
        (Some(LazyIndex::GzipIndex { index }), LayerCompression::Gzip) => {
            gzip_index::load(source.as_ref(), &layer.descriptor, index, disk).await
        }
        // An index annotation on a layer of another compression cannot be honoured: the
        // chunks would not inflate. Reading the layer as a plain stream is always correct.
        (_, compression) => {
            DiskCache::meta_or_fetch(
                disk,
                // The index was checked against one config's diff_id: an image whose config
                // names another diff_id for the same blob must not take it on trust.
                &format!("stream-index-{}-{}.json", digest.hex(), layer.diff_id.hex()),
                |stored| {
                    serde_json::from_slice::<LayerIndex>(stored)
                        .ok()
                        .filter(|index| index.digest == *digest)
                },
                || tar_stream::index(source, layer, compression, observer),
                |index| serde_json::to_vec(index).expect("index serialises"),
            )
            .await
        }
    }
}

/// A tar of regular files (mode 0644, owned by root, mtime 0), for tests.
#[cfg(test)]
pub(crate) fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, &data[..]).unwrap();
    }
    tar.into_inner().unwrap()
}

/// `data` gzip-compressed, for tests.
#[cfg(test)]
pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, data).unwrap();
    gz.finish().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index of a streamed layer stored in the disk cache was checked against one config's
    /// diff_id; an image naming another diff_id for the same blob streams it again and is refused.
    #[tokio::test]
    async fn a_stored_stream_index_does_not_vouch_for_another_diff_id() {
        use crate::model::oci::{Descriptor, MEDIA_OCI_LAYER_GZIP};
        use crate::source::memory::MemorySource;

        let tar = tar_of(&[("hello".into(), b"hello".to_vec())]);
        let blob = gzip(&tar);

        let memory = MemorySource::new();
        let size = blob.len() as u64;
        let descriptor = Descriptor::new(MEDIA_OCI_LAYER_GZIP, memory.put(blob), size);
        let layer = |diff_id: Digest| Layer {
            descriptor: descriptor.clone(),
            diff_id,
            lazy_index: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), u64::MAX).unwrap();
        let source: Arc<dyn ImageSource> = memory.clone();
        let load = |layer: Layer| {
            let source = source.clone();
            let disk = &disk;
            async move { load(source, &layer, Arc::new(tar_stream::Ignore), Some(disk)).await }
        };
        load(layer(Digest::of(&tar))).await.unwrap();
        load(layer(Digest::of(&tar))).await.unwrap();
        assert_eq!(
            memory.ranges().len(),
            1,
            "the second load uses the stored index"
        );
        let err = load(layer(Digest::of(b"other"))).await.unwrap_err();
        assert!(matches!(err, LayerError::DiffIdMismatch { .. }), "{err}");
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normalize_path(b"./usr/bin/").unwrap(), b"usr/bin");
        assert_eq!(normalize_path(b"/etc//passwd").unwrap(), b"etc/passwd");
        assert_eq!(normalize_path(b".").unwrap(), b"");
        assert_eq!(normalize_path(b"./").unwrap(), b"");
        assert_eq!(normalize_path(b"a/./b").unwrap(), b"a/b");
        assert!(normalize_path(b"../etc/passwd").is_err());
        assert!(normalize_path(b"a/../../b").is_err());
        assert!(normalize_path(b"a\0b").is_err());
        // PATH_MAX: the longest path that fits passes, one byte more is refused, however it is
        // padded with `./` and slashes.
        let longest = vec![b'a'; MAX_PATH_BYTES];
        assert_eq!(normalize_path(&longest).unwrap(), longest);
        let padded = [b"./".repeat(5000), longest.clone(), b"//".to_vec()].concat();
        assert_eq!(normalize_path(&padded).unwrap(), longest);
        let deep = b"d/".repeat(MAX_PATH_BYTES / 2 + 1);
        assert!(normalize_path(&deep).unwrap_err().contains("PATH_MAX"));
        // Such a path is shown shortened in errors.
        let shown = LayerError::BadEntry {
            layer: Digest::of(b"layer"),
            path: String::from_utf8(deep).unwrap(),
            reason: "too long".into(),
        }
        .to_string();
        assert!(shown.len() < 400 && shown.contains("bytes)"), "{shown}");
    }

    fn chunk(file_offset: u64, size: u64) -> ChunkRef {
        ChunkRef {
            file_offset,
            size,
            source: ChunkSource::Zeros,
            digest: None,
        }
    }

    #[test]
    fn chunk_tables_must_tile_the_file() {
        assert!(check_chunks(&[chunk(0, 4), chunk(4, 6)], 10).is_ok());
        assert!(check_chunks(&[], 0).is_ok());
        assert!(
            check_chunks(&[chunk(0, 4), chunk(3, 7)], 10)
                .unwrap_err()
                .contains("overlap")
        );
        assert!(
            check_chunks(&[chunk(0, 4), chunk(5, 5)], 10)
                .unwrap_err()
                .contains("gap")
        );
        assert!(
            check_chunks(&[chunk(0, 4)], 10)
                .unwrap_err()
                .contains("cover")
        );
        assert!(check_chunks(&[chunk(0, MAX_CHUNK_BYTES + 1)], MAX_CHUNK_BYTES + 1).is_err());
    }
}

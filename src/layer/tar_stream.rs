//! Layers without an index: stream the blob once, in order, and index it on the way.
//!
//! A plain `tar+gzip` layer cannot be read at an offset: inflating byte N needs every byte before
//! it. So the layer is fetched with one request and inflated as the bytes arrive; each tar entry
//! is reported to a [`StreamObserver`] the moment its header has been parsed, and each file's
//! content is cut into [`STREAM_CHUNK_BYTES`] chunks that are reported as soon as they have
//! streamed past. A reader therefore gets a file's first byte when that byte arrives, not when
//! the whole layer has (the lesson of docker-registry #956).
//!
//! Verification: a plain tar has no per-file digests, so the only thing to check against is the
//! blob digest, known only at the end. Each chunk's SHA-256 is computed as it streams and kept in
//! the index; the index is returned only after the whole blob has matched its digest. From then
//! on those chunk digests are trusted, so when a chunk has been evicted from the cache and is
//! fetched again (by streaming the layer again up to it, see [`restream`]), it is verified like
//! any eStargz chunk. Observers that use data before the end (`cat` printing as it streams) must
//! treat the stream's final result as the verdict.
//!
//! The uncompressed stream is hashed too and must match the layer's diff_id (the config's
//! `rootfs.diff_ids`), as containerd's unpacker requires: a blob that matches its digest but not
//! the config is the image's own inconsistency, refused and never retried. Only streamed layers
//! (and `convert` and `index`, which stream whole layers) are checked; a lazily read eStargz,
//! zstd:chunked or seek-indexed layer is never read whole in order, and its chunks are checked
//! against its index instead. A stored index is named by blob and diff_id, so the index one image
//! built does not vouch for another whose config disagrees.
//!
//! The work runs on a blocking thread (`tar` and `flate2` are synchronous readers) fed by the
//! async HTTP body through `SyncIoBridge`, so inflating never stalls the async runtime.

use std::io::{self, Read};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::TryStreamExt;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::sparse::{self, SparseRecords};
use super::{
    ChunkRef, ChunkSource, Codec, EntryKind, LayerEntry, LayerError, LayerFormat, LayerIndex, Meta,
    STREAM_CHUNK_BYTES, normalize_path,
};
use crate::model::digest::{Digest, DigestHasher};
use crate::model::oci::{Descriptor, LayerCompression};
use crate::source::ImageSource;
use crate::source::image::Layer;

/// Sees a streamed layer's entries and data as they go past.
pub trait StreamObserver: Send + Sync {
    /// An entry's header has been parsed (its content, if any, follows as chunks).
    fn entry(&self, _entry: &LayerEntry) {}
    /// A chunk of file data at `offset` of the uncompressed tar stream, and its digest (the one
    /// recorded in the entry's [`ChunkRef`]); the blob as a whole is not yet verified.
    fn chunk(&self, _offset: u64, _data: &Bytes, _digest: &Digest) {}
    /// `len` bytes of zeros in the file's content, in order among its chunks: a hole of a sparse
    /// file, which the stream does not carry.
    fn hole(&self, _len: u64) {}
    /// Polled between entries: `true` stops the stream early (with an error).
    fn cancelled(&self) -> bool {
        false
    }
}

/// An observer that ignores everything.
pub struct Ignore;
impl StreamObserver for Ignore {}

pub type ChunkSink = Arc<dyn StreamObserver>;

/// Wraps the compressed reader: hashes and counts every byte the decompressor takes.
struct Hashing<R> {
    inner: R,
    hasher: DigestHasher,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn decompressor<'a, R: Read + 'a>(
    reader: R,
    compression: LayerCompression,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        // Layers may be several concatenated gzip members (pigz, some writers): read them all.
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
        LayerCompression::None => Box::new(reader),
    })
}

fn bad_entry(layer: &Digest, path: &[u8], reason: impl Into<String>) -> LayerError {
    LayerError::BadEntry {
        layer: layer.clone(),
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.into(),
    }
}

fn io_error(layer: &Digest, e: io::Error) -> LayerError {
    // Source errors travel through the blocking bridge as io::Error; unwrap them so the user
    // sees the registry's message, not "other error".
    match e.downcast::<crate::source::SourceError>() {
        Ok(source) => LayerError::Source(source),
        // `read_exact`'s own words ("failed to fill whole buffer") say nothing to a user.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => LayerError::malformed(
            layer,
            "reading the layer as tar: its data ends in the middle of the archive (truncated)",
        ),
        Err(e) => LayerError::malformed(layer, format!("reading the layer as tar: {e}")),
    }
}

/// Set when the async side stops waiting (its future was dropped); the blocking side then stops
/// at its next read instead of streaming a layer nobody wants any more.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A reader that fails once `cancelled` is set.
struct Cancellable<R> {
    inner: R,
    cancelled: Arc<AtomicBool>,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(io::Error::other("cancelled"));
        }
        self.inner.read(buf)
    }
}

/// Runs `work` on a blocking thread over a synchronous reader of `stream`, stopping it if the
/// returned future is dropped.
pub(crate) async fn on_blocking_thread<T: Send + 'static>(
    stream: crate::source::ByteStream,
    digest: &Digest,
    work: impl FnOnce(Box<dyn Read + Send>) -> Result<T, LayerError> + Send + 'static,
) -> Result<T, LayerError> {
    let reader = StreamReader::new(stream.map_err(io::Error::other));
    let cancelled = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancelled.clone());
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || {
        let _enter = handle.enter();
        work(Box::new(Cancellable {
            inner: SyncIoBridge::new(reader),
            cancelled,
        }))
    })
    .await
    .map_err(|e| LayerError::malformed(digest, format!("streaming task failed: {e}")));
    drop(guard);
    result?
}

/// Indexes an index-less layer by streaming all of it from `source`; its uncompressed stream
/// must hash to the layer's diff_id (the image config's `rootfs.diff_ids`).
pub async fn index(
    source: Arc<dyn ImageSource>,
    layer: &Layer,
    compression: LayerCompression,
    observer: ChunkSink,
) -> Result<LayerIndex, LayerError> {
    let (digest, size) = (layer.descriptor.digest.clone(), layer.descriptor.size);
    let diff_id = layer.diff_id.clone();
    let stream = source.blob_range(&digest, 0..size).await?;
    on_blocking_thread(stream, &layer.descriptor.digest, move |reader| {
        index_reader(
            reader,
            &digest,
            size,
            Some(&diff_id),
            compression,
            observer.as_ref(),
        )
    })
    .await
}

/// Indexes a layer from any reader of its compressed bytes; the blob must hash to `digest` and
/// be `size` bytes long, and its uncompressed stream hash to `diff_id` when one is given.
pub fn index_reader<R: Read>(
    reader: R,
    digest: &Digest,
    size: u64,
    diff_id: Option<&Digest>,
    compression: LayerCompression,
    observer: &dyn StreamObserver,
) -> Result<LayerIndex, LayerError> {
    index_reader_with(
        reader,
        digest,
        size,
        diff_id,
        compression,
        |compressed| decompressor(compressed, compression),
        observer,
    )
}

/// As [`index_reader`], with the decompressor that `open` puts over the compressed bytes (the
/// gzip seek index builder's records checkpoints on the way).
pub fn index_reader_with<R: Read>(
    reader: R,
    digest: &Digest,
    size: u64,
    diff_id: Option<&Digest>,
    compression: LayerCompression,
    open: impl for<'r> FnOnce(&'r mut dyn Read) -> io::Result<Box<dyn Read + 'r>>,
    observer: &dyn StreamObserver,
) -> Result<LayerIndex, LayerError> {
    let mut hashing = Hashing {
        inner: reader,
        hasher: DigestHasher::default(),
        count: 0,
    };
    let parsed = (|| {
        let decompressed = open(&mut hashing).map_err(|e| io_error(digest, e))?;
        let mut archive = tar::Archive::new(Hashing {
            inner: decompressed,
            hasher: DigestHasher::default(),
            count: 0,
        });
        let entries = read_entries(&mut archive, digest, compression, observer)?;
        // Whatever follows the end-of-archive marker still belongs to the blob and its digests.
        let mut uncompressed = archive.into_inner();
        io::copy(uncompressed.by_ref(), &mut io::sink()).map_err(|e| io_error(digest, e))?;
        Ok((entries, uncompressed.hasher.finish()))
    })();
    let (entries, uncompressed) = match parsed {
        Ok(parsed) => parsed,
        // Content that does not parse was damaged on the way or is broken at its source; only
        // the blob digest tells which, and which decides whether fetching it again can help
        // (a damaged blob is retried, a broken one refused at once). The rest of the blob is
        // read for that, as a retry would read all of it.
        Err(e @ (LayerError::Malformed { .. } | LayerError::BadEntry { .. }))
            if !observer.cancelled() =>
        {
            io::copy(&mut hashing, &mut io::sink()).map_err(|e| io_error(digest, e))?;
            let actual = hashing.hasher.finish();
            if actual != *digest {
                return Err(LayerError::DigestMismatch {
                    layer: digest.clone(),
                    what: "blob".into(),
                    expected: digest.clone(),
                    actual,
                });
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| io_error(digest, e))?;
    if hashing.count != size {
        return Err(LayerError::malformed(
            digest,
            format!("blob is {} bytes, the manifest says {size}", hashing.count),
        ));
    }
    let actual = hashing.hasher.finish();
    if actual != *digest {
        return Err(LayerError::DigestMismatch {
            layer: digest.clone(),
            what: "blob".into(),
            expected: digest.clone(),
            actual,
        });
    }
    // Checked after the blob digest: bytes that match it are what the registry serves, so a
    // diff_id that differs is the image's own inconsistency (its config describes other
    // layers), refused as containerd's unpacker refuses it, and never worth fetching again.
    if let Some(expected) = diff_id.filter(|&d| *d != uncompressed) {
        return Err(LayerError::DiffIdMismatch {
            layer: digest.clone(),
            expected: expected.clone(),
            actual: uncompressed,
        });
    }
    Ok(LayerIndex {
        digest: digest.clone(),
        format: LayerFormat::TarStream(compression),
        entries,
        prefetch_end: None,
        checkpoints: None,
    })
}

/// A regular file's content as it streams past, cut into chunks.
struct FileData<'a, 'e, R: Read> {
    entry: &'a mut tar::Entry<'e, R>,
    layer: &'a Digest,
    compression: LayerCompression,
    observer: &'a dyn StreamObserver,
    chunks: &'a mut Vec<ChunkRef>,
}

impl<R: Read> FileData<'_, '_, R> {
    /// Reads the next `len` bytes of the entry (at `at` in the tar stream), the file's bytes
    /// from `file_offset` on.
    fn stream(&mut self, at: u64, file_offset: u64, len: u64) -> Result<(), LayerError> {
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(STREAM_CHUNK_BYTES);
            let mut buf = vec![0u8; piece as usize];
            self.entry
                .read_exact(&mut buf)
                .map_err(|e| io_error(self.layer, e))?;
            let data = Bytes::from(buf);
            let offset = at + done;
            let source = match self.compression {
                // An uncompressed layer can be read at any offset: no need to stream again.
                LayerCompression::None => ChunkSource::Compressed {
                    start: offset,
                    end: offset + piece,
                    inner_offset: 0,
                    codec: Codec::Identity,
                },
                _ => ChunkSource::TarStream { offset },
            };
            let digest = Digest::of(&data);
            self.observer.chunk(offset, &data, &digest);
            self.chunks.push(ChunkRef {
                file_offset: file_offset + done,
                size: piece,
                source,
                digest: Some(digest),
            });
            done += piece;
        }
        Ok(())
    }

    /// A hole: the file's bytes `start..end` read as zeros.
    fn zeros(&mut self, start: u64, end: u64) {
        for hole in sparse::holes(start, end) {
            self.observer.hole(hole.len);
            self.chunks.push(ChunkRef {
                file_offset: hole.offset,
                size: hole.len,
                source: ChunkSource::Zeros,
                digest: None,
            });
        }
    }
}

fn pax_number(value: &[u8]) -> Option<f64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

fn read_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    layer: &Digest,
    compression: LayerCompression,
    observer: &dyn StreamObserver,
) -> Result<Vec<LayerEntry>, LayerError> {
    let mut out = Vec::new();
    for entry in archive.entries().map_err(|e| io_error(layer, e))? {
        if observer.cancelled() {
            return Err(LayerError::malformed(layer, "streaming cancelled"));
        }
        let mut entry = entry.map_err(|e| io_error(layer, e))?;
        let raw_path = entry.path_bytes().into_owned();
        let path = normalize_path(&raw_path).map_err(|r| bad_entry(layer, &raw_path, r))?;
        let header = entry.header().clone();
        let bad = |reason: String| bad_entry(layer, &raw_path, reason);
        let mut meta = Meta {
            mode: header.mode().map_err(|e| bad(e.to_string()))? & 0o7777,
            uid: header.uid().map_err(|e| bad(e.to_string()))? as u32,
            gid: header.gid().map_err(|e| bad(e.to_string()))? as u32,
            mtime: header.mtime().map_err(|e| bad(e.to_string()))? as i64,
            xattrs: Vec::new(),
        };
        let mut sparse_records = SparseRecords::default();
        if let Some(pax) = entry.pax_extensions().map_err(|e| io_error(layer, e))? {
            for ext in pax {
                let ext = ext.map_err(|e| io_error(layer, e))?;
                let key = ext.key_bytes();
                if sparse_records.take(key, ext.value_bytes()) {
                    continue;
                }
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    meta.xattrs
                        .push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if key == b"mtime" {
                    if let Some(t) = pax_number(ext.value_bytes()) {
                        meta.mtime = t.floor() as i64;
                    }
                } else if key == b"uid" {
                    if let Some(v) = pax_number(ext.value_bytes()) {
                        meta.uid = v as u32;
                    }
                } else if key == b"gid"
                    && let Some(v) = pax_number(ext.value_bytes())
                {
                    meta.gid = v as u32;
                }
            }
        }
        let sparse = sparse_records.finish().map_err(&bad)?;
        let path = match &sparse {
            Some(sparse) => normalize_path(&sparse.name).map_err(&bad)?,
            None => path,
        };
        let link_target = || -> Result<Vec<u8>, LayerError> {
            Ok(entry
                .link_name_bytes()
                .ok_or_else(|| bad("link without a target".into()))?
                .into_owned())
        };
        let device = || -> Result<(u32, u32), LayerError> {
            let major = header.device_major().map_err(|e| bad(e.to_string()))?;
            let minor = header.device_minor().map_err(|e| bad(e.to_string()))?;
            Ok((major.unwrap_or(0), minor.unwrap_or(0)))
        };
        use tar::EntryType as T;
        let kind = match header.entry_type() {
            T::Directory => EntryKind::Dir,
            T::Symlink => EntryKind::Symlink {
                target: link_target()?,
            },
            T::Link => {
                let target = link_target()?;
                EntryKind::Hardlink {
                    target: normalize_path(&target)
                        .map_err(|r| bad(format!("hard link target: {r}")))?,
                }
            }
            T::Char => {
                let (major, minor) = device()?;
                EntryKind::Char { major, minor }
            }
            T::Block => {
                let (major, minor) = device()?;
                EntryKind::Block { major, minor }
            }
            T::Fifo => EntryKind::Fifo,
            T::Regular | T::Continuous => {
                // Filled in below once the content has streamed past.
                EntryKind::File {
                    size: sparse.as_ref().map_or(entry.size(), |s| s.real_size),
                    chunks: Arc::from(Vec::new()),
                }
            }
            T::GNUSparse => {
                return Err(bad(
                    "old GNU sparse headers are not supported (PAX sparse formats 0.1 and 1.0 are)"
                        .into(),
                ));
            }
            other => return Err(bad(format!("unsupported tar entry type {other:?}"))),
        };
        let mut entry_out = LayerEntry { path, kind, meta };
        observer.entry(&entry_out);
        if let EntryKind::File { size, .. } = entry_out.kind {
            let start = entry.raw_file_position();
            let stored = entry.size();
            let mut chunks = Vec::with_capacity(stored.div_ceil(STREAM_CHUNK_BYTES) as usize);
            let mut data = FileData {
                entry: &mut entry,
                layer,
                compression,
                observer,
                chunks: &mut chunks,
            };
            match sparse {
                None => data.stream(start, 0, size)?,
                Some(sparse) => {
                    let (regions, map_bytes) = match sparse.map {
                        Some(map) => (map, 0),
                        None => {
                            sparse::read_map(data.entry, stored).map_err(|e| match e.kind() {
                                io::ErrorKind::InvalidData => bad(e.to_string()),
                                _ => io_error(layer, e),
                            })?
                        }
                    };
                    sparse::check(&regions, size, stored - map_bytes).map_err(&bad)?;
                    let mut at = start + map_bytes;
                    let mut end = 0;
                    for region in regions {
                        data.zeros(end, region.offset);
                        data.stream(at, region.offset, region.len)?;
                        at += region.len;
                        end = region.offset + region.len;
                    }
                    data.zeros(end, size);
                }
            }
            entry_out.kind = EntryKind::File {
                size,
                chunks: Arc::from(chunks),
            };
        }
        out.push(entry_out);
    }
    Ok(out)
}

/// Streams a layer again from its start and returns the uncompressed bytes `wanted` (offsets
/// of the tar stream). Used when a chunk of an index-less layer has been evicted; the caller
/// verifies the result against the chunk digest recorded by [`index`].
pub async fn restream(
    source: &dyn ImageSource,
    descriptor: &Descriptor,
    compression: LayerCompression,
    wanted: Range<u64>,
) -> Result<Bytes, LayerError> {
    let digest = descriptor.digest.clone();
    let stream = source.blob_range(&digest, 0..descriptor.size).await?;
    on_blocking_thread(stream, &descriptor.digest, move |reader| {
        let mut decompressed =
            decompressor(reader, compression).map_err(|e| io_error(&digest, e))?;
        io::copy(
            &mut decompressed.by_ref().take(wanted.start),
            &mut io::sink(),
        )
        .map_err(|e| io_error(&digest, e))?;
        let mut buf = vec![0u8; (wanted.end - wanted.start) as usize];
        decompressed
            .read_exact(&mut buf)
            .map_err(|e| io_error(&digest, e))?;
        Ok(Bytes::from(buf))
    })
    .await
}

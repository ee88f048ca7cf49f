//! Seek indexes for plain gzip layers: lazy loading for images nobody can rebuild (the idea of
//! AWS SOCI).
//!
//! A gzip stream cannot be entered at an arbitrary byte: inflating needs the bit position of a
//! deflate block and the 32 KiB of output before it (the window back-references reach into). So
//! the layer is streamed once, by `lazylayer index`, stopping at deflate block boundaries
//! (zlib's `Z_BLOCK`); every [`IndexFile::span`] bytes of output a [`Checkpoint`] records where
//! the next block starts (byte and bit), how much output precedes it and that window. Reading
//! later starts at the checkpoint before the wanted bytes: one ranged GET of that span, raw
//! inflate primed with the leftover bits (`inflatePrime`) and the window
//! (`inflateSetDictionary`), skip to the file. Spans hold a few MiB of output, so the whole
//! decompressed span is cut into its files' chunks at once ([`crate::fetch`] groups the chunks
//! of one span into one fetch and one inflate).
//!
//! The index also carries the layer's file table, built by the same tar parser as streamed
//! layers, with file content cut into chunks that never cross a checkpoint and each chunk's
//! SHA-256, so every chunk read is verified as an eStargz chunk is.
//!
//! Trust: the index is published next to the image as an OCI artifact whose `subject` is the
//! image manifest, found through the registry's referrers API (or its tag fallback). It is as
//! trustworthy as the repository it comes from, like the image's own tags: the blob digest of the
//! layer it describes is checked, its shape is checked (hostile paths, checkpoints out of order,
//! chunks outside the stream), but chunk digests cannot be checked against the layer without
//! reading all of it, which is what the index exists to avoid.
//!
//! zlib's `inflatePrime`, `inflateGetDictionary` and the `Z_BLOCK` stops are not exposed by
//! `flate2`; they come from `libz-rs-sys`, the C API of the pure-Rust `zlib-rs` that `flate2`
//! already builds on here, so no C library is linked. The unsafe FFI stays inside
//! [`RawInflate`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::tar_stream::{self, StreamObserver};
use super::{
    ChunkRef, ChunkSource, Codec, EntryKind, LayerEntry, LayerError, LayerFormat, LayerIndex,
    check_chunks, normalize_path,
};
use crate::cache::disk::DiskCache;
use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, LayerCompression};
use crate::source::ImageSource;

// The artifact's names live with the other media types, in the image model, so that image
// resolution can find an index without depending on this reader.
pub use crate::model::oci::{
    ANNOTATION_GZIP_INDEX_LAYER as ANNOTATION_LAYER, GZIP_INDEX_ARTIFACT_TYPE as ARTIFACT_TYPE,
    MEDIA_GZIP_INDEX_BLOB as MEDIA_INDEX_BLOB,
};

/// Output between checkpoints when none is asked for. A read fetches and inflates one span
/// (about a third of this compressed); smaller spans fetch less per cold file but cost a 32 KiB
/// window each in the index. SOCI's default is 4 MiB; start-up reads many small files scattered
/// over a layer, so half of that fetches markedly less for 2x the windows.
pub const DEFAULT_SPAN: u64 = 2 << 20;

/// Compressed size bound of an index blob, and of its JSON once inflated: the file table of a
/// huge layer is a few MiB; more is a hostile or broken blob.
const MAX_INDEX_BLOB: u64 = 64 << 20;
const MAX_INDEX_JSON: u64 = 256 << 20;
/// Most output one span may hold: a read inflates up to a whole span into memory, so an index
/// (or a layer with a giant deflate block) that asks for more is refused.
pub const MAX_SPAN_OUTPUT: u64 = 64 << 20;
/// Deflate's window.
const WINDOW: usize = 32 << 10;
const FORMAT_VERSION: u32 = 1;

/// Where inflating a layer can start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Blob offset of the first whole byte of the block that starts here.
    pub input: u64,
    /// How many (high) bits of the byte before `input` belong to that block (0..=7).
    pub bits: u8,
    /// Offset in the uncompressed tar stream.
    pub output: u64,
    /// The (up to) 32 KiB of output before `output`.
    pub window: Bytes,
}

impl Checkpoint {
    /// First blob byte a fetch from this checkpoint needs.
    pub fn first_byte(&self) -> u64 {
        self.input - u64::from(self.bits > 0)
    }
}

/// The checkpoints of one layer, in order, as chunk fetches use them.
pub type Checkpoints = Arc<[Checkpoint]>;

/// A checkpoint as stored: the window in base64.
#[derive(Serialize, Deserialize)]
struct StoredCheckpoint {
    input: u64,
    bits: u8,
    output: u64,
    window: String,
}

/// One layer's index blob, before compression.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexFile {
    version: u32,
    /// The gzip layer this indexes, and its size.
    layer: Digest,
    layer_size: u64,
    /// Output between checkpoints, as asked for when it was built.
    span: u64,
    /// Length of the uncompressed tar stream.
    uncompressed_size: u64,
    checkpoints: Vec<StoredCheckpoint>,
    /// The tar entries; file chunks are [`ChunkSource::TarStream`] offsets with digests.
    entries: Vec<LayerEntry>,
}

/// Zlib's inflate through its C API. Owns the stream; all `unsafe` is here.
struct RawInflate {
    stream: Box<libz_rs_sys::z_stream>,
}

// SAFETY: the z_stream owns its state exclusively; the raw pointers in it only point into that
// state or into buffers that live for one call.
unsafe impl Send for RawInflate {}

impl RawInflate {
    /// `window_bits` as for `inflateInit2`: -15 raw deflate, 31 gzip.
    fn new(window_bits: i32) -> io::Result<RawInflate> {
        let mut stream = Box::new(libz_rs_sys::z_stream::default());
        // SAFETY: `stream` is a valid, default-initialised z_stream (allocator fields set);
        // version and size are this library's own.
        let ret = unsafe {
            libz_rs_sys::inflateInit2_(
                &mut *stream,
                window_bits,
                libz_rs_sys::zlibVersion(),
                std::mem::size_of::<libz_rs_sys::z_stream>() as i32,
            )
        };
        if ret != libz_rs_sys::Z_OK {
            return Err(io::Error::other(format!("inflateInit2 failed ({ret})")));
        }
        Ok(RawInflate { stream })
    }

    /// Inflates from `input` into `output`; returns (consumed, produced, zlib return code).
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> (usize, usize, i32) {
        let s = &mut *self.stream;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = output.as_mut_ptr();
        s.avail_out = output.len().min(u32::MAX as usize) as u32;
        let (in_before, out_before) = (s.avail_in, s.avail_out);
        // SAFETY: next_in/next_out point at live slices of the lengths given.
        let ret = unsafe { libz_rs_sys::inflate(s, flush) };
        let consumed = (in_before - s.avail_in) as usize;
        let produced = (out_before - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        (consumed, produced, ret)
    }

    fn data_type(&self) -> i32 {
        self.stream.data_type
    }

    fn reset(&mut self) -> io::Result<()> {
        // SAFETY: the stream was initialised by `new`.
        match unsafe { libz_rs_sys::inflateReset(&mut *self.stream) } {
            libz_rs_sys::Z_OK => Ok(()),
            ret => Err(io::Error::other(format!("inflateReset failed ({ret})"))),
        }
    }

    /// The current window (the last up to 32 KiB of output).
    fn window(&mut self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; WINDOW];
        let mut len: u32 = 0;
        // SAFETY: buf holds 32 KiB, the most inflateGetDictionary writes.
        let ret =
            unsafe { libz_rs_sys::inflateGetDictionary(&*self.stream, buf.as_mut_ptr(), &mut len) };
        if ret != libz_rs_sys::Z_OK {
            return Err(io::Error::other(format!(
                "inflateGetDictionary failed ({ret})"
            )));
        }
        buf.truncate(len as usize);
        Ok(buf)
    }

    /// Feeds `bits` (0..=7) low bits of `value` ahead of the input.
    fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: the stream was initialised by `new`.
        let ret =
            unsafe { libz_rs_sys::inflatePrime(&mut *self.stream, bits as i32, value as i32) };
        if ret != libz_rs_sys::Z_OK {
            return Err(io::Error::other(format!("inflatePrime failed ({ret})")));
        }
        Ok(())
    }

    fn set_dictionary(&mut self, dictionary: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe a live slice.
        let ret = unsafe {
            libz_rs_sys::inflateSetDictionary(
                &mut *self.stream,
                dictionary.as_ptr(),
                dictionary.len() as u32,
            )
        };
        if ret != libz_rs_sys::Z_OK {
            return Err(io::Error::other(format!(
                "inflateSetDictionary failed ({ret})"
            )));
        }
        Ok(())
    }
}

impl Drop for RawInflate {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, ended once.
        unsafe { libz_rs_sys::inflateEnd(&mut *self.stream) };
    }
}

/// What [`CheckpointingReader`] has recorded, shared with the tar parser's observer.
#[derive(Default)]
struct Trace {
    checkpoints: Vec<Checkpoint>,
    /// Length of the uncompressed stream, set when it has ended.
    produced: u64,
}

/// A reader of a gzip blob's uncompressed bytes that records a [`Checkpoint`] every `span`
/// bytes of output (and at the start of every gzip member, so no span crosses one).
struct CheckpointingReader<R> {
    inner: R,
    zlib: RawInflate,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
    /// Blob bytes handed to zlib so far.
    consumed: u64,
    produced: u64,
    span: u64,
    member_started: bool,
    done: bool,
    trace: Arc<Mutex<Trace>>,
}

impl<R: Read> CheckpointingReader<R> {
    fn new(inner: R, span: u64, trace: Arc<Mutex<Trace>>) -> io::Result<Self> {
        Ok(CheckpointingReader {
            inner,
            zlib: RawInflate::new(31)?,
            buf: vec![0u8; 64 << 10],
            pos: 0,
            len: 0,
            eof: false,
            consumed: 0,
            produced: 0,
            span,
            member_started: false,
            done: false,
            trace,
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.pos == self.len && !self.eof {
            self.pos = 0;
            self.len = self.inner.read(&mut self.buf)?;
            self.eof = self.len == 0;
        }
        Ok(())
    }

    fn maybe_checkpoint(&mut self) -> io::Result<()> {
        let dt = self.zlib.data_type();
        // 128: stopped at the end of a block (or of the gzip header); 64: that was the last one.
        if dt & 128 == 0 || dt & 64 != 0 {
            return Ok(());
        }
        let points = &mut self.trace.lock().unwrap().checkpoints;
        let due = !self.member_started
            || points
                .last()
                .is_none_or(|last| self.produced - last.output >= self.span);
        if due {
            self.member_started = true;
            // An empty gzip member leaves two checkpoints at one output offset: the data there
            // is in the later member.
            if points
                .last()
                .is_some_and(|last| last.output == self.produced)
            {
                points.pop();
            }
            points.push(Checkpoint {
                input: self.consumed,
                bits: (dt & 7) as u8,
                output: self.produced,
                window: Bytes::from(self.zlib.window()?),
            });
        }
        Ok(())
    }
}

impl<R: Read> Read for CheckpointingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.done {
                return Ok(0);
            }
            self.fill()?;
            // Called even without input left: zlib may still hold output for a full buffer.
            let (consumed, produced, ret) =
                self.zlib
                    .inflate(&self.buf[self.pos..self.len], out, libz_rs_sys::Z_BLOCK);
            self.pos += consumed;
            self.consumed += consumed as u64;
            self.produced += produced as u64;
            match ret {
                libz_rs_sys::Z_OK | libz_rs_sys::Z_BUF_ERROR => {
                    self.maybe_checkpoint()?;
                    if consumed == 0 && produced == 0 && self.pos == self.len {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "gzip stream ends early",
                        ));
                    }
                }
                libz_rs_sys::Z_STREAM_END => {
                    // Another member may follow (pigz, concatenated writers).
                    self.fill()?;
                    if self.pos == self.len {
                        self.done = true;
                        self.trace.lock().unwrap().produced = self.produced;
                    } else {
                        self.zlib.reset()?;
                        self.member_started = false;
                    }
                }
                ret => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("corrupt gzip data (zlib {ret})"),
                    ));
                }
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

/// Part of a chunk on one side of a checkpoint: stream offset, length, digest.
type Piece = (u64, u64, Digest);

/// Records, for each 1 MiB chunk the tar parser cuts, the digests of its pieces on either side
/// of checkpoints, so that no chunk of the index crosses one.
struct Splitter {
    trace: Arc<Mutex<Trace>>,
    /// Chunk offset in the tar stream -> (offset, len, digest) of its pieces, for split chunks.
    split: Mutex<HashMap<u64, Vec<Piece>>>,
}

impl StreamObserver for Splitter {
    fn chunk(&self, offset: u64, data: &Bytes, _digest: &Digest) {
        let end = offset + data.len() as u64;
        // The inflater runs ahead of the tar parser: every checkpoint inside this chunk has been
        // recorded by the time the parser hands the chunk over.
        let cuts: Vec<u64> = self
            .trace
            .lock()
            .unwrap()
            .checkpoints
            .iter()
            .map(|c| c.output)
            .filter(|&o| o > offset && o < end)
            .collect();
        if cuts.is_empty() {
            return;
        }
        let mut pieces = Vec::with_capacity(cuts.len() + 1);
        let mut from = offset;
        for to in cuts.into_iter().chain([end]) {
            let piece = &data[(from - offset) as usize..(to - offset) as usize];
            pieces.push((from, to - from, Digest::of(piece)));
            from = to;
        }
        self.split.lock().unwrap().insert(offset, pieces);
    }
}

/// Builds the index blob (zstd-compressed JSON) of a gzip layer read from `reader`; the blob must
/// hash to `digest` and be `size` bytes. Deterministic: the same layer and span give the same
/// bytes.
pub fn build(
    reader: impl Read,
    digest: &Digest,
    size: u64,
    span: u64,
) -> Result<Vec<u8>, LayerError> {
    let trace = Arc::new(Mutex::new(Trace::default()));
    let splitter = Splitter {
        trace: trace.clone(),
        split: Mutex::new(HashMap::new()),
    };
    let recorder = trace.clone();
    let index = tar_stream::index_reader_with(
        reader,
        digest,
        size,
        LayerCompression::Gzip,
        move |compressed| -> io::Result<Box<dyn Read + '_>> {
            Ok(Box::new(CheckpointingReader::new(
                compressed, span, recorder,
            )?))
        },
        &splitter,
    )?;
    let split = splitter.split.into_inner().unwrap();
    let mut entries = index.entries;
    for entry in &mut entries {
        if let EntryKind::File { size, chunks } = &mut entry.kind {
            let mut out = Vec::with_capacity(chunks.len());
            for c in chunks.iter() {
                let ChunkSource::TarStream { offset } = c.source else {
                    return Err(LayerError::malformed(
                        digest,
                        "gzip layer read as another format",
                    ));
                };
                match split.get(&offset) {
                    None => out.push(c.clone()),
                    Some(pieces) => out.extend(pieces.iter().map(|(o, len, d)| ChunkRef {
                        file_offset: c.file_offset + (o - offset),
                        size: *len,
                        source: ChunkSource::TarStream { offset: *o },
                        digest: Some(d.clone()),
                    })),
                }
            }
            check_chunks(&out, *size).map_err(|r| LayerError::malformed(digest, r))?;
            *chunks = Arc::from(out);
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let Trace {
        checkpoints,
        produced,
    } = std::mem::take(&mut *trace.lock().unwrap());
    let file = IndexFile {
        version: FORMAT_VERSION,
        layer: digest.clone(),
        layer_size: size,
        span,
        uncompressed_size: produced,
        checkpoints: checkpoints
            .iter()
            .map(|c| StoredCheckpoint {
                input: c.input,
                bits: c.bits,
                output: c.output,
                window: b64.encode(&c.window),
            })
            .collect(),
        entries,
    };
    let json = serde_json::to_vec(&file).expect("index serialises");
    // What readers will refuse (a deflate block longer than a span may hold) is refused here.
    let layer = Descriptor::new(
        crate::model::oci::MEDIA_OCI_LAYER_GZIP,
        digest.clone(),
        size,
    );
    parse_json(&layer, &json)?;
    zstd::bulk::compress(&json, 19)
        .map_err(|e| LayerError::malformed(digest, format!("compressing the index: {e}")))
}

/// Reads a layer's index from its index blob (`index`, found through the image's referrers):
/// entries whose chunks point at checkpoint spans, and the checkpoints.
pub async fn load(
    source: &dyn ImageSource,
    layer: &Descriptor,
    index: &Descriptor,
    disk: Option<&DiskCache>,
) -> Result<LayerIndex, LayerError> {
    let blob = DiskCache::meta_or_fetch(
        disk,
        &format!("gzip-index-{}", index.digest.hex()),
        |stored| (Digest::of(stored) == index.digest).then(|| Bytes::copy_from_slice(stored)),
        // The source checks the digest, and refuses a blob over the limit before fetching it.
        || source.blob(index, MAX_INDEX_BLOB),
        |blob| blob.to_vec(),
    )
    .await?;
    parse(layer, &blob)
}

/// Decodes and checks an index blob for `layer`.
pub fn parse(layer: &Descriptor, blob: &[u8]) -> Result<LayerIndex, LayerError> {
    let digest = &layer.digest;
    let bad = |reason: String| LayerError::malformed(digest, format!("gzip index: {reason}"));
    let mut json = Vec::new();
    zstd::stream::read::Decoder::new(blob)
        .map_err(|e| bad(e.to_string()))?
        .take(MAX_INDEX_JSON + 1)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("does not decompress: {e}")))?;
    if json.len() as u64 > MAX_INDEX_JSON {
        return Err(bad(format!("more than {MAX_INDEX_JSON} bytes of JSON")));
    }
    parse_json(layer, &json)
}

/// Checks an index's JSON for `layer` and maps its chunks onto checkpoint spans.
pub fn parse_json(layer: &Descriptor, json: &[u8]) -> Result<LayerIndex, LayerError> {
    let digest = &layer.digest;
    let bad = |reason: String| LayerError::malformed(digest, format!("gzip index: {reason}"));
    let file: IndexFile =
        serde_json::from_slice(json).map_err(|e| bad(format!("does not parse: {e}")))?;
    if file.version != FORMAT_VERSION {
        return Err(bad(format!(
            "version {} (this lazylayer reads version {FORMAT_VERSION}; rebuild it with `lazylayer index`)",
            file.version
        )));
    }
    if file.layer != *digest || file.layer_size != layer.size {
        return Err(bad(format!(
            "describes layer {} ({} bytes), not this one",
            file.layer, file.layer_size
        )));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut checkpoints: Vec<Checkpoint> = Vec::with_capacity(file.checkpoints.len());
    for stored in &file.checkpoints {
        let window = b64
            .decode(&stored.window)
            .map_err(|e| bad(format!("checkpoint window: {e}")))?;
        let ordered = checkpoints
            .last()
            .is_none_or(|p| stored.input > p.input && stored.output > p.output);
        if stored.bits > 7
            || window.len() > WINDOW
            || window.len() as u64 > stored.output
            || stored.input > layer.size
            || (stored.bits > 0 && stored.input == 0)
            || !ordered
        {
            return Err(bad(format!(
                "checkpoint at byte {} (output {}) is out of order or out of range",
                stored.input, stored.output
            )));
        }
        checkpoints.push(Checkpoint {
            input: stored.input,
            bits: stored.bits,
            output: stored.output,
            window: Bytes::from(window),
        });
    }
    if checkpoints.first().is_none_or(|c| c.output != 0) {
        return Err(bad("no checkpoint at the start of the stream".into()));
    }
    let ends = checkpoints
        .iter()
        .skip(1)
        .map(|c| c.output)
        .chain([file.uncompressed_size]);
    for (point, end) in checkpoints.iter().zip(ends) {
        if end < point.output || end - point.output > MAX_SPAN_OUTPUT {
            return Err(bad(format!(
                "the span at output {} holds {} bytes (at most {MAX_SPAN_OUTPUT})",
                point.output,
                end.saturating_sub(point.output)
            )));
        }
    }
    let mut entries = file.entries;
    for entry in &mut entries {
        let path = normalize_path(&entry.path).map_err(|r| LayerError::BadEntry {
            layer: digest.clone(),
            path: String::from_utf8_lossy(&entry.path).into_owned(),
            reason: r,
        })?;
        entry.path = path;
        let EntryKind::File { size, chunks } = &mut entry.kind else {
            continue;
        };
        check_chunks(chunks, *size).map_err(|r| bad(r.to_string()))?;
        let mut mapped = Vec::with_capacity(chunks.len());
        for c in chunks.iter() {
            let (ChunkSource::TarStream { offset }, Some(_)) = (&c.source, &c.digest) else {
                return Err(bad("a chunk without a stream offset or digest".into()));
            };
            let end = offset
                .checked_add(c.size)
                .filter(|&e| e <= file.uncompressed_size);
            let i = checkpoints.partition_point(|p| p.output <= *offset) - 1;
            let next = checkpoints.get(i + 1);
            if end.is_none() || next.is_some_and(|n| end > Some(n.output)) {
                return Err(bad(format!(
                    "chunk at stream offset {offset} crosses a checkpoint or the stream's end"
                )));
            }
            let point = &checkpoints[i];
            mapped.push(ChunkRef {
                source: ChunkSource::Compressed {
                    start: point.first_byte(),
                    end: next.map_or(layer.size, |n| n.input),
                    inner_offset: offset - point.output,
                    codec: Codec::Deflate {
                        checkpoint: i as u32,
                    },
                },
                ..c.clone()
            });
        }
        *chunks = Arc::from(mapped);
    }
    Ok(LayerIndex {
        digest: digest.clone(),
        format: LayerFormat::GzipIndex,
        entries,
        prefetch_end: None,
        checkpoints: Some(Arc::from(checkpoints)),
    })
}

/// Inflates `len` bytes of output starting at `checkpoint`, from `compressed` (the blob from the
/// checkpoint's first byte on).
pub fn inflate_from(checkpoint: &Checkpoint, compressed: &[u8], len: usize) -> io::Result<Vec<u8>> {
    let mut zlib = RawInflate::new(-15)?;
    let mut input = compressed;
    if checkpoint.bits > 0 {
        let (&first, rest) = input
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "empty span"))?;
        zlib.prime(checkpoint.bits, first >> (8 - checkpoint.bits))?;
        input = rest;
    }
    if !checkpoint.window.is_empty() {
        zlib.set_dictionary(&checkpoint.window)?;
    }
    let mut out = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let (consumed, produced, ret) =
            zlib.inflate(input, &mut out[filled..], libz_rs_sys::Z_NO_FLUSH);
        input = &input[consumed..];
        filled += produced;
        match ret {
            libz_rs_sys::Z_OK | libz_rs_sys::Z_BUF_ERROR if produced > 0 || consumed > 0 => {}
            libz_rs_sys::Z_STREAM_END if filled == len => {}
            libz_rs_sys::Z_STREAM_END | libz_rs_sys::Z_OK | libz_rs_sys::Z_BUF_ERROR => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("span gives {filled} bytes, {len} wanted"),
                ));
            }
            ret => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("corrupt deflate data (zlib {ret})"),
                ));
            }
        }
    }
    Ok(out)
}

/// Reads an index-less gzip layer's stream from `source` and builds its index blob.
pub async fn build_from(
    source: Arc<dyn ImageSource>,
    layer: &Descriptor,
    span: u64,
) -> Result<Vec<u8>, LayerError> {
    if LayerCompression::from_media_type(&layer.media_type).ok() != Some(LayerCompression::Gzip) {
        return Err(LayerError::UnsupportedMediaType {
            layer: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        });
    }
    let (digest, size) = (layer.digest.clone(), layer.size);
    let stream = source.blob_range(&digest, 0..size).await?;
    tar_stream::on_blocking_thread(stream, &layer.digest, move |reader| {
        build(reader, &digest, size, span)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzip tar of files with varied, partly compressible content, big enough for many blocks.
    fn layer_tar_gz() -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut seed = 7u64;
        for i in 0..40 {
            let len = [10, 5000, 300_000, 1_500_000][i % 4];
            let data: Vec<u8> = (0..len)
                .map(|j| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if j % 3 == 0 {
                        (seed >> 59) as u8
                    } else {
                        b'a' + (j % 7) as u8
                    }
                })
                .collect();
            let mut header = tar::Header::new_gnu();
            header.set_size(len as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, format!("dir/file-{i}"), &data[..])
                .unwrap();
        }
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        gz.finish().unwrap()
    }

    fn descriptor(blob: &[u8]) -> Descriptor {
        Descriptor::of(crate::model::oci::MEDIA_OCI_LAYER_GZIP, blob)
    }

    /// Every file of the index, read chunk by chunk from its checkpoint, equals the tar's.
    fn assert_every_chunk_inflates(blob: &[u8], index: &LayerIndex) {
        let points = index.checkpoints.clone().unwrap();
        let mut tar = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
        let mut expected: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for e in tar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            expected.insert(e.path_bytes().into_owned(), data);
        }
        let mut files = 0;
        for entry in &index.entries {
            let EntryKind::File { chunks, .. } = &entry.kind else {
                continue;
            };
            files += 1;
            let mut content = Vec::new();
            for c in chunks.iter() {
                let ChunkSource::Compressed {
                    start,
                    end,
                    inner_offset,
                    codec: Codec::Deflate { checkpoint },
                } = c.source
                else {
                    panic!("{:?}", c.source);
                };
                let data = inflate_from(
                    &points[checkpoint as usize],
                    &blob[start as usize..end as usize],
                    (inner_offset + c.size) as usize,
                )
                .unwrap();
                let piece = &data[inner_offset as usize..];
                assert_eq!(Some(Digest::of(piece)), c.digest);
                content.extend_from_slice(piece);
            }
            assert!(content == expected[&entry.path], "{:?}", entry.path);
        }
        assert_eq!(files, expected.len());
    }

    #[test]
    fn every_chunk_inflates_from_its_checkpoint_and_matches() {
        let blob = layer_tar_gz();
        let desc = descriptor(&blob);
        let index_blob = build(&blob[..], &desc.digest, desc.size, 256 << 10).unwrap();
        assert_eq!(
            index_blob,
            build(&blob[..], &desc.digest, desc.size, 256 << 10).unwrap(),
            "not deterministic"
        );
        let index = parse(&desc, &index_blob).unwrap();
        let points = index.checkpoints.clone().unwrap();
        assert!(points.len() > 20, "only {} checkpoints", points.len());
        assert!(points.iter().any(|p| p.bits > 0), "no checkpoint mid-byte");
        assert_every_chunk_inflates(&blob, &index);
    }

    #[test]
    fn concatenated_gzip_members_get_a_checkpoint_each() {
        // The same tar cut into three members (as pigz-like writers do), with an empty member
        // in between: no span may cross from one member into the next.
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&layer_tar_gz()[..])
            .read_to_end(&mut tar)
            .unwrap();
        let member = |part: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, part).unwrap();
            gz.finish().unwrap()
        };
        let third = tar.len() / 3 + 12_345;
        let mut blob = member(&tar[..third]);
        blob.extend(member(b""));
        blob.extend(member(&tar[third..2 * third]));
        blob.extend(member(&tar[2 * third..]));
        let desc = descriptor(&blob);
        let index = parse(
            &desc,
            &build(&blob[..], &desc.digest, desc.size, 4 << 20).unwrap(),
        )
        .unwrap();
        let outputs: Vec<u64> = index
            .checkpoints
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.output)
            .collect();
        for cut in [third as u64, 2 * third as u64] {
            assert!(
                outputs.contains(&cut),
                "no checkpoint at {cut}: {outputs:?}"
            );
        }
        assert_every_chunk_inflates(&blob, &index);
    }

    #[test]
    fn bad_indexes_are_refused() {
        let blob = layer_tar_gz();
        let desc = descriptor(&blob);
        let index_blob = build(&blob[..], &desc.digest, desc.size, 1 << 20).unwrap();
        let other = descriptor(b"another layer");
        assert!(
            parse(&other, &index_blob)
                .unwrap_err()
                .to_string()
                .contains("not this one")
        );
        assert!(parse(&desc, b"junk").is_err());
        let json = zstd::decode_all(&index_blob[..]).unwrap();
        let mut value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let tamper = |value: &serde_json::Value| {
            zstd::encode_all(&serde_json::to_vec(value).unwrap()[..], 1).unwrap()
        };
        let original = value.clone();
        value["entries"][1]["path"] = serde_json::json!(b"../../etc/passwd".to_vec());
        assert!(matches!(
            parse(&desc, &tamper(&value)),
            Err(LayerError::BadEntry { .. })
        ));
        let mut value = original.clone();
        value["checkpoints"].as_array_mut().unwrap().swap(1, 2);
        assert!(
            parse(&desc, &tamper(&value))
                .unwrap_err()
                .to_string()
                .contains("order")
        );
        for size in [10u64, 1 << 40] {
            let mut value = original.clone();
            value["uncompressedSize"] = serde_json::json!(size);
            let err = parse(&desc, &tamper(&value)).unwrap_err().to_string();
            assert!(err.contains("span"), "{err}");
        }
        // A chunk placed past the stream's end.
        let mut value = original;
        let file = value["entries"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|e| e["kind"].get("File").is_some())
            .unwrap();
        file["kind"]["File"]["chunks"][0]["source"]["TarStream"]["offset"] =
            serde_json::json!(1u64 << 40);
        let err = parse(&desc, &tamper(&value)).unwrap_err().to_string();
        assert!(err.contains("end"), "{err}");
        // Not a gzip stream at all.
        assert!(
            build(
                &b"plain bytes"[..],
                &Digest::of(b"plain bytes"),
                11,
                1 << 20
            )
            .is_err()
        );
    }
}

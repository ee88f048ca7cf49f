//! Building an index: the layer is streamed once, stopping at deflate block boundaries; every
//! span of output a [`Checkpoint`] is recorded, and the tar parser's file chunks are cut so that
//! none crosses a checkpoint. Deterministic, so the same layer and span give the same blob.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;

use super::format::{IndexFile, StoredCheckpoint, parse_json};
use super::zlib::RawInflate;
use super::{Checkpoint, FORMAT_VERSION, OUTPUT_MARK};
use crate::layer::tar_stream::{self, StreamObserver};
use crate::layer::{ChunkRef, ChunkSource, EntryKind, LayerError, check_chunks};
use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, LayerCompression};
use crate::source::ImageSource;
use crate::source::image::Layer;

/// What [`CheckpointingReader`] has recorded, shared with the tar parser's observer.
#[derive(Default)]
pub(super) struct Trace {
    checkpoints: Vec<Checkpoint>,
    /// Blob bytes consumed when the output reached each multiple of [`OUTPUT_MARK`].
    marks: Vec<u64>,
    /// Length of the uncompressed stream, set when it has ended.
    produced: u64,
}

/// A reader of a gzip blob's uncompressed bytes that records a [`Checkpoint`] every `span`
/// bytes of output (and at the start of every gzip member, so no span crosses one).
pub(super) struct CheckpointingReader<R> {
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
            // Output stops at every mark, so that the input consumed there is known exactly.
            let to_mark = OUTPUT_MARK - self.produced % OUTPUT_MARK;
            let room = out.len().min(to_mark as usize);
            // Called even without input left: zlib may still hold output for a full buffer.
            let (consumed, produced, ret) = self.zlib.inflate(
                &self.buf[self.pos..self.len],
                &mut out[..room],
                libz_rs_sys::Z_BLOCK,
            );
            self.pos += consumed;
            self.consumed += consumed as u64;
            self.produced += produced as u64;
            if produced > 0 && self.produced.is_multiple_of(OUTPUT_MARK) {
                self.trace.lock().unwrap().marks.push(self.consumed);
            }
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
pub(super) type Piece = (u64, u64, Digest);

/// Records, for each 1 MiB chunk the tar parser cuts, the digests of its pieces on either side
/// of checkpoints, so that no chunk of the index crosses one.
pub(super) struct Splitter {
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
/// hash to `digest` and be `size` bytes, and its uncompressed stream to `diff_id` when given.
/// Deterministic: the same layer and span give the same bytes.
pub fn build(
    reader: impl Read,
    digest: &Digest,
    size: u64,
    diff_id: Option<&Digest>,
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
        diff_id,
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
        marks,
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
        mark_every: OUTPUT_MARK,
        // As deltas: small numbers compress far better than growing offsets.
        marks: marks
            .iter()
            .scan(0, |last, &m| Some(m - std::mem::replace(last, m)))
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

/// Reads an index-less gzip layer's stream from `source` and builds its index blob.
pub async fn build_from(
    source: Arc<dyn ImageSource>,
    image_layer: &Layer,
    span: u64,
) -> Result<Vec<u8>, LayerError> {
    let layer = &image_layer.descriptor;
    let diff_id = image_layer.diff_id.clone();
    if LayerCompression::from_media_type(&layer.media_type).ok() != Some(LayerCompression::Gzip) {
        return Err(LayerError::UnsupportedMediaType {
            layer: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        });
    }
    let (digest, size) = (layer.digest.clone(), layer.size);
    let stream = source.blob_range(&digest, 0..size).await?;
    tar_stream::on_blocking_thread(stream, &layer.digest, move |reader| {
        build(reader, &digest, size, Some(&diff_id), span)
    })
    .await
}

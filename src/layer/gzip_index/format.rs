//! The index blob: zstd-compressed JSON of the checkpoints (windows in base64) and the layer's
//! file table, and its checks on the way in, which refuse hostile paths, checkpoints out of
//! order and chunks outside the stream before anything is read through the index.

use std::io::Read;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Checkpoint, FORMAT_VERSION, MAX_INDEX_JSON, MAX_SPAN_OUTPUT, WINDOW};
use crate::layer::{
    ChunkRef, ChunkSource, Codec, EntryKind, LayerEntry, LayerError, LayerFormat, LayerIndex,
    check_chunks, normalize_path,
};
use crate::model::digest::Digest;
use crate::model::oci::Descriptor;

/// A checkpoint as stored: the window in base64.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredCheckpoint {
    pub(super) input: u64,
    pub(super) bits: u8,
    pub(super) output: u64,
    pub(super) window: String,
}

/// One layer's index blob, before compression.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IndexFile {
    pub(super) version: u32,
    /// The gzip layer this indexes, and its size.
    pub(super) layer: Digest,
    pub(super) layer_size: u64,
    /// Output between checkpoints, as asked for when it was built.
    pub(super) span: u64,
    /// Length of the uncompressed tar stream.
    pub(super) uncompressed_size: u64,
    pub(super) checkpoints: Vec<StoredCheckpoint>,
    /// Output between marks (0: no marks, as in indexes written before marks existed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) mark_every: u64,
    /// Blob bytes consumed when the output reached each multiple of `mark_every`, each as the
    /// difference from the one before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) marks: Vec<u64>,
    /// The tar entries; file chunks are [`ChunkSource::TarStream`] offsets with digests.
    pub(super) entries: Vec<LayerEntry>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    // Absolute blob offsets of the marks, each at most the blob's size and none before the last.
    let mut marks = Vec::with_capacity(file.marks.len());
    if !file.marks.is_empty() {
        if file.mark_every < 4096
            || file.marks.len() as u64 > file.uncompressed_size / file.mark_every
        {
            return Err(bad(format!(
                "{} marks every {} bytes of output do not fit its stream",
                file.marks.len(),
                file.mark_every
            )));
        }
        let mut at = 0u64;
        for delta in &file.marks {
            at = at
                .checked_add(*delta)
                .filter(|&a| a <= layer.size)
                .ok_or_else(|| bad("a mark lies past the layer's end".into()))?;
            marks.push(at);
        }
    }
    // Where the bytes a chunk ending at `output` needs end: the mark at or after that output,
    // within its span; without one, the span's end.
    let needed_end = |output: u64, start: u64, span_end: u64| {
        let k = output.div_ceil(file.mark_every.max(1));
        k.checked_sub(1)
            .and_then(|i| marks.get(i as usize))
            .map_or(span_end, |&m| m.min(span_end))
            .max(start + 1)
    };
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
            let span_end = next.map_or(layer.size, |n| n.input);
            mapped.push(ChunkRef {
                source: ChunkSource::Compressed {
                    start: point.first_byte(),
                    end: needed_end(offset + c.size, point.first_byte(), span_end),
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

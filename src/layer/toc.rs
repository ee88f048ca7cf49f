//! The table of contents shared by eStargz and zstd:chunked.
//!
//! Both formats describe a layer with the same JSON (CRFS's `stargz.index.json`): a list of
//! entries in tar order, regular files carrying the offset of their first compressed chunk and
//! `chunk` entries carrying the rest. zstd:chunked adds `endOffset` (where a chunk's frame ends)
//! and `chunkType: zeros`; eStargz leaves the end implicit (the next chunk's offset, or the TOC)
//! and may pack several small files into one gzip member (`innerOffset`).
//!
//! Everything in a TOC is input from the network, so the conversion checks what the rest of the
//! code relies on: names are normalised and hostile ones refused, each file's chunks tile it
//! exactly, chunk spans stay inside the blob, and sizes stay under [`MAX_CHUNK_BYTES`].

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;

use super::{
    ChunkRef, ChunkSource, Codec, EntryKind, LayerEntry, LayerError, MAX_CHUNK_BYTES, Meta,
    check_chunks, normalize_path,
};
use crate::model::digest::Digest;

/// Largest uncompressed TOC accepted. Debian's base image needs 2 MiB for 6,700 entries, so this
/// allows images of several hundred thousand files while refusing a TOC that would exhaust memory.
pub const MAX_TOC_BYTES: u64 = 128 << 20;

/// The eStargz landmark entries: files before `.prefetch.landmark` are needed at start-up.
const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

#[derive(Debug, Deserialize)]
pub struct Toc {
    #[serde(default)]
    pub version: u32,
    pub entries: Vec<TocEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub modtime: Option<String>,
    #[serde(default)]
    pub link_name: String,
    #[serde(default)]
    pub mode: i64,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub dev_major: u32,
    #[serde(default)]
    pub dev_minor: u32,
    /// Values are base64 (Go's encoding of `[]byte`).
    #[serde(default)]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub end_offset: Option<u64>,
    #[serde(default)]
    pub chunk_offset: u64,
    #[serde(default)]
    pub chunk_size: u64,
    #[serde(default)]
    pub chunk_digest: Option<String>,
    #[serde(default)]
    pub inner_offset: u64,
    #[serde(default)]
    pub chunk_type: Option<String>,
}

/// A TOC turned into entries, plus the prefetch landmark when there is one.
pub struct ConvertedToc {
    pub entries: Vec<LayerEntry>,
    pub prefetch_end: Option<u64>,
}

pub fn parse(layer: &Digest, json: &[u8]) -> Result<Toc, LayerError> {
    serde_json::from_slice(json)
        .map_err(|e| LayerError::malformed(layer, format!("TOC is not valid JSON: {e}")))
}

fn parse_time(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp())
}

/// A file whose chunks are still being collected.
struct OpenFile {
    entry: LayerEntry,
    size: u64,
    chunks: Vec<ChunkRef>,
}

/// Converts a TOC. `data_end` is where chunk data ends in the blob (the TOC's own offset):
/// the implicit end of the last chunk, and a bound for every chunk.
pub fn convert(
    layer: &Digest,
    toc: Toc,
    codec: Codec,
    data_end: u64,
) -> Result<ConvertedToc, LayerError> {
    let mut offsets: Vec<u64> = toc
        .entries
        .iter()
        .filter(|e| e.kind == "chunk" || (e.kind == "reg" && e.size > 0))
        .map(|e| e.offset)
        .collect();
    offsets.push(data_end);
    offsets.sort_unstable();
    offsets.dedup();

    let mut entries = Vec::with_capacity(toc.entries.len());
    let mut open: Option<OpenFile> = None;
    let mut prefetch_end = None;
    for e in toc.entries {
        let bad = |reason: String| LayerError::BadEntry {
            layer: layer.clone(),
            path: e.name.clone(),
            reason,
        };
        if e.kind == "chunk" {
            let file = open
                .as_mut()
                .filter(|f| normalize_path(e.name.as_bytes()).ok().as_ref() == Some(&f.entry.path))
                .ok_or_else(|| bad("chunk entry does not follow its file".into()))?;
            let chunk = chunk_ref(&e, file.size, &offsets, codec, data_end).map_err(bad)?;
            file.chunks.push(chunk);
            continue;
        }
        if let Some(file) = open.take() {
            entries.push(finish_file(layer, file)?);
        }
        if e.name == PREFETCH_LANDMARK {
            prefetch_end = Some(e.offset);
            continue;
        }
        if e.name == NO_PREFETCH_LANDMARK {
            continue;
        }
        let path = normalize_path(e.name.as_bytes()).map_err(&bad)?;
        let mut xattrs = Vec::with_capacity(e.xattrs.len());
        for (k, v) in &e.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|err| bad(format!("xattr {k} is not base64: {err}")))?;
            xattrs.push((k.as_bytes().to_vec(), value));
        }
        let meta = Meta {
            mode: (e.mode & 0o7777) as u32,
            uid: e.uid,
            gid: e.gid,
            mtime: e.modtime.as_deref().and_then(parse_time).unwrap_or(0),
            xattrs,
        };
        let kind = match e.kind.as_str() {
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink {
                target: e.link_name.as_bytes().to_vec(),
            },
            "hardlink" => EntryKind::Hardlink {
                target: normalize_path(e.link_name.as_bytes())
                    .map_err(|r| bad(format!("hard link target: {r}")))?,
            },
            "char" => EntryKind::Char {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            "block" => EntryKind::Block {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            "fifo" => EntryKind::Fifo,
            "reg" => {
                let mut chunks = Vec::new();
                if e.size > 0 {
                    chunks.push(chunk_ref(&e, e.size, &offsets, codec, data_end).map_err(&bad)?);
                }
                open = Some(OpenFile {
                    entry: LayerEntry {
                        path,
                        kind: EntryKind::Dir, // replaced in finish_file
                        meta,
                    },
                    size: e.size,
                    chunks,
                });
                continue;
            }
            other => return Err(bad(format!("unknown entry type {other:?}"))),
        };
        entries.push(LayerEntry { path, kind, meta });
    }
    if let Some(file) = open.take() {
        entries.push(finish_file(layer, file)?);
    }
    Ok(ConvertedToc {
        entries,
        prefetch_end,
    })
}

fn chunk_ref(
    e: &TocEntry,
    file_size: u64,
    offsets: &[u64],
    codec: Codec,
    data_end: u64,
) -> Result<ChunkRef, String> {
    let file_offset = e.chunk_offset;
    if file_offset >= file_size {
        return Err(format!(
            "chunk offset {file_offset} is beyond the file size {file_size}"
        ));
    }
    let size = if e.chunk_size > 0 {
        e.chunk_size
    } else {
        file_size - file_offset
    };
    if size > MAX_CHUNK_BYTES {
        return Err(format!(
            "chunk of {size} bytes exceeds the limit of {MAX_CHUNK_BYTES}"
        ));
    }
    let digest = match e.chunk_digest.as_deref() {
        Some(d) => Some(d.parse::<Digest>().map_err(|err| err.to_string())?),
        // A file stored as one chunk may carry only the file digest.
        None if file_offset == 0 && size == file_size => e
            .digest
            .as_deref()
            .map(|d| d.parse::<Digest>().map_err(|err| err.to_string()))
            .transpose()?,
        None => None,
    };
    if e.chunk_type.as_deref() == Some("zeros") {
        return Ok(ChunkRef {
            file_offset,
            size,
            source: ChunkSource::Zeros,
            digest: None,
        });
    }
    let digest = digest.ok_or("chunk has no digest to verify it against")?;
    let start = e.offset;
    let end = match e.end_offset {
        Some(end) => end,
        None => *offsets
            .iter()
            .find(|&&o| o > start)
            .ok_or("chunk starts outside the layer's data")?,
    };
    if start >= end || end > data_end {
        return Err(format!(
            "chunk span {start}..{end} is outside the layer's data (0..{data_end})"
        ));
    }
    // A compressed span far larger than any chunk is a TOC trying to make us fetch the blob.
    if end - start > 2 * MAX_CHUNK_BYTES {
        return Err(format!("chunk span {start}..{end} is implausibly large"));
    }
    Ok(ChunkRef {
        file_offset,
        size,
        source: ChunkSource::Compressed {
            start,
            end,
            inner_offset: e.inner_offset,
            codec,
        },
        digest: Some(digest),
    })
}

fn finish_file(layer: &Digest, file: OpenFile) -> Result<LayerEntry, LayerError> {
    let OpenFile {
        mut entry,
        size,
        chunks,
    } = file;
    check_chunks(&chunks, size).map_err(|reason| LayerError::BadEntry {
        layer: layer.clone(),
        path: String::from_utf8_lossy(&entry.path).into_owned(),
        reason,
    })?;
    entry.kind = EntryKind::File {
        size,
        chunks: Arc::from(chunks),
    };
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn layer() -> Digest {
        D1.parse().unwrap()
    }

    fn convert_json(json: &str) -> Result<ConvertedToc, LayerError> {
        convert(
            &layer(),
            parse(&layer(), json.as_bytes())?,
            Codec::Gzip,
            1000,
        )
    }

    #[test]
    fn chunked_file_and_landmark() {
        let json = format!(
            r#"{{"version":1,"entries":[
            {{"name":"bin/","type":"dir","mode":493,"modtime":"2024-01-02T03:04:05Z"}},
            {{"name":"bin/app","type":"reg","size":10,"offset":100,"chunkSize":4,"chunkDigest":"{D1}","mode":2541,"uid":7}},
            {{"name":"bin/app","type":"chunk","offset":200,"chunkOffset":4,"chunkDigest":"{D2}"}},
            {{"name":".prefetch.landmark","type":"reg","size":1,"offset":300,"chunkDigest":"{D1}"}},
            {{"name":"bin/sh","type":"symlink","linkName":"app"}}
            ]}}"#
        );
        let toc = convert_json(&json).unwrap();
        assert_eq!(toc.prefetch_end, Some(300));
        assert_eq!(toc.entries.len(), 3);
        assert_eq!(toc.entries[0].meta.mtime, 1704164645);
        let app = &toc.entries[1];
        assert_eq!(app.path, b"bin/app");
        assert_eq!(app.meta.mode, 0o4755);
        let EntryKind::File { size, chunks } = &app.kind else {
            panic!("not a file")
        };
        assert_eq!(*size, 10);
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            chunks[0].source,
            ChunkSource::Compressed {
                start: 100,
                end: 200,
                inner_offset: 0,
                codec: Codec::Gzip
            }
        );
        assert_eq!((chunks[1].file_offset, chunks[1].size), (4, 6));
        assert_eq!(
            chunks[1].source,
            ChunkSource::Compressed {
                start: 200,
                end: 300,
                inner_offset: 0,
                codec: Codec::Gzip
            }
        );
    }

    #[test]
    fn hostile_tocs_are_refused() {
        let cases = [
            (
                r#"{"entries":[{"name":"../x","type":"dir"}]}"#.to_string(),
                "..",
            ),
            (
                format!(
                    r#"{{"entries":[{{"name":"a","type":"reg","size":10,"offset":10,"chunkSize":4,"chunkDigest":"{D1}"}}]}}"#
                ),
                "cover",
            ),
            (
                format!(
                    r#"{{"entries":[{{"name":"a","type":"reg","size":10,"offset":5000,"chunkDigest":"{D1}"}}]}}"#
                ),
                "outside",
            ),
            (
                r#"{"entries":[{"name":"a","type":"reg","size":10,"offset":10}]}"#.to_string(),
                "no digest",
            ),
            (
                format!(
                    r#"{{"entries":[{{"name":"a","type":"chunk","offset":10,"chunkDigest":"{D1}"}}]}}"#
                ),
                "does not follow",
            ),
            (
                format!(
                    r#"{{"entries":[{{"name":"a","type":"reg","size":99999999999,"offset":10,"chunkDigest":"{D1}"}}]}}"#
                ),
                "exceeds",
            ),
            (
                r#"{"entries":[{"name":"a","type":"whatever"}]}"#.to_string(),
                "unknown entry type",
            ),
            (r#"{"entries":"#.to_string(), "not valid JSON"),
            (
                r#"{"entries":[{"name":"a\u0000b","type":"dir"}]}"#.to_string(),
                "NUL",
            ),
        ];
        for (json, needle) in cases {
            let err = convert_json(&json).err().expect(&json).to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}

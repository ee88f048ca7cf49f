//! Writing eStargz: a gzip tar whose chunks can each be inflated alone, plus a table of contents.
//!
//! Layout (the format `layer::estargz` reads, as stargz-snapshotter writes it):
//! - every chunk of file content (at most the chunk size, 4 MiB by default) starts a new gzip
//!   member; its TOC entry records where that member starts in the blob. Tar headers and padding
//!   travel in whatever member is open, so a member holds one chunk and then the headers of
//!   the entries that follow, which a reader of the chunk never inflates;
//! - prioritised files come first, followed by a one-byte `.prefetch.landmark` file in its own
//!   member (a reader prefetches the blob up to it); without prioritised files the layer starts
//!   with `.no.prefetch.landmark`;
//! - the TOC (`stargz.index.json`) is a tar entry in a member of its own, followed by the tar
//!   end-of-archive blocks, then the 51-byte footer: an empty gzip member whose extra field says
//!   where the TOC member starts.
//!
//! So the blob is still an ordinary tar+gzip: any client can pull and unpack it (and finds the
//! two extra files `stargz.index.json` and the landmark, which lazy readers hide).
//!
//! Determinism: gzip headers carry no time or name, compression level and chunk size are fixed,
//! the TOC is serialised with a fixed field order, so the same entries give the same bytes.

use std::io::{self, Write};

use base64::Engine;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde::Serialize;

use super::TarWriter;
use crate::digest::{Digest, DigestHasher};
use crate::layer::{EntryKind, LayerEntry};

pub const TOC_NAME: &str = "stargz.index.json";
pub const LANDMARK: &str = ".prefetch.landmark";
pub const NO_LANDMARK: &str = ".no.prefetch.landmark";
/// The landmark file's one byte, as stargz-snapshotter writes it.
const LANDMARK_CONTENT: u8 = 0xf;

/// A TOC entry, in the field order and naming of stargz-snapshotter's `TOCEntry`; fields that
/// do not apply are left out.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub gid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub dev_major: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub dev_minor: u64,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub xattrs: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_offset: Option<u64>,
    #[serde(skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct Toc<'a> {
    version: u32,
    entries: &'a [TocEntry],
}

/// The TOC entry for `entry`, without chunk fields.
pub fn toc_entry(entry: &LayerEntry) -> TocEntry {
    let (kind, size, link_name, dev) = match &entry.kind {
        EntryKind::Dir => ("dir", 0, Vec::new(), (0, 0)),
        EntryKind::File { size, .. } => ("reg", *size, Vec::new(), (0, 0)),
        EntryKind::Symlink { target } => ("symlink", 0, target.clone(), (0, 0)),
        EntryKind::Hardlink { target } => ("hardlink", 0, target.clone(), (0, 0)),
        EntryKind::Char { major, minor } => ("char", 0, Vec::new(), (*major, *minor)),
        EntryKind::Block { major, minor } => ("block", 0, Vec::new(), (*major, *minor)),
        EntryKind::Fifo => ("fifo", 0, Vec::new(), (0, 0)),
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    TocEntry {
        name: String::from_utf8_lossy(&entry.path).into_owned(),
        kind,
        size,
        modtime: chrono::DateTime::from_timestamp(entry.meta.mtime, 0)
            .filter(|_| entry.meta.mtime != 0)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default(),
        link_name: String::from_utf8_lossy(&link_name).into_owned(),
        mode: entry.meta.mode as u64,
        uid: entry.meta.uid as u64,
        gid: entry.meta.gid as u64,
        dev_major: dev.0 as u64,
        dev_minor: dev.1 as u64,
        xattrs: entry
            .meta
            .xattrs
            .iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), b64.encode(v)))
            .collect(),
        ..TocEntry::default()
    }
}

/// Counts and hashes what reaches the output (the compressed blob).
pub struct Counted<W> {
    pub inner: W,
    pub written: u64,
    pub hasher: DigestHasher,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a finished layer is.
pub struct Written {
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    pub toc_digest: Digest,
}

pub struct EstargzWriter<W: Write> {
    out: Counted<W>,
    member: Option<GzEncoder<Vec<u8>>>,
    /// The uncompressed tar stream: its digest is the layer's diff ID.
    tar: DigestHasher,
    tar_size: u64,
    entries: Vec<TocEntry>,
    chunk_size: u64,
    level: u32,
}

impl<W: Write> EstargzWriter<W> {
    pub fn new(out: W, chunk_size: u64, level: u32) -> EstargzWriter<W> {
        EstargzWriter {
            out: Counted {
                inner: out,
                written: 0,
                hasher: DigestHasher::default(),
            },
            member: None,
            tar: DigestHasher::default(),
            tar_size: 0,
            entries: Vec::new(),
            chunk_size: chunk_size.max(1),
            level,
        }
    }

    /// Ends the open gzip member, if any, writing it out.
    fn close_member(&mut self) -> io::Result<()> {
        if let Some(member) = self.member.take() {
            let bytes = member.finish()?;
            self.out.write_all(&bytes)?;
        }
        Ok(())
    }

    fn open_member(&mut self) -> &mut GzEncoder<Vec<u8>> {
        let level = Compression::new(self.level);
        self.member
            .get_or_insert_with(|| flate2::GzBuilder::new().write(Vec::new(), level))
    }

    /// Appends uncompressed tar bytes to the open member.
    fn write_tar(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tar.update(bytes);
        self.tar_size += bytes.len() as u64;
        self.open_member().write_all(bytes)
    }

    /// Appends one entry; `content` yields a regular file's bytes (exactly its size).
    pub fn append(&mut self, entry: &LayerEntry, content: &mut dyn io::Read) -> io::Result<()> {
        let header = TarWriter::header_bytes(entry)?;
        self.write_tar(&header)?;
        let mut toc = toc_entry(entry);
        let EntryKind::File { size, .. } = entry.kind else {
            self.entries.push(toc);
            return Ok(());
        };
        let mut done = 0u64;
        let mut whole = DigestHasher::default();
        let mut chunk_entries = Vec::new();
        let mut buf = Vec::new();
        while done < size {
            let len = self.chunk_size.min(size - done);
            buf.resize(len as usize, 0);
            content.read_exact(&mut buf)?;
            whole.update(&buf);
            // Each chunk starts a member of its own, so it can be inflated alone.
            self.close_member()?;
            let offset = self.out.written;
            self.write_tar(&buf)?;
            let chunk_digest = Digest::of(&buf).to_string();
            if done == 0 {
                toc.offset = offset;
                toc.chunk_size = if len < size { len } else { 0 };
                toc.chunk_digest = chunk_digest;
            } else {
                chunk_entries.push(TocEntry {
                    name: toc.name.clone(),
                    kind: "chunk",
                    offset,
                    chunk_offset: done,
                    chunk_size: if done + len < size { len } else { 0 },
                    chunk_digest,
                    ..TocEntry::default()
                });
            }
            done += len;
        }
        let padding = (512 - size % 512) % 512;
        self.write_tar(&vec![0u8; padding as usize])?;
        if size > 0 {
            toc.digest = whole.finish().to_string();
        }
        self.entries.push(toc);
        self.entries.extend(chunk_entries);
        Ok(())
    }

    /// Appends the landmark file: `.prefetch.landmark` after prioritised files, or
    /// `.no.prefetch.landmark` first when there are none.
    pub fn landmark(&mut self, prioritised: bool) -> io::Result<()> {
        let name = if prioritised { LANDMARK } else { NO_LANDMARK };
        let entry = LayerEntry {
            path: name.as_bytes().to_vec(),
            kind: EntryKind::File {
                size: 1,
                chunks: std::sync::Arc::from(Vec::new()),
            },
            meta: crate::layer::Meta {
                mode: 0o644,
                ..Default::default()
            },
        };
        self.append(&entry, &mut &[LANDMARK_CONTENT][..])
    }

    /// Writes the TOC, the end of the tar and the footer; returns what the layer is.
    pub fn finish(mut self) -> io::Result<(W, Written)> {
        let json = serde_json::to_vec(&Toc {
            version: 1,
            entries: &self.entries,
        })
        .map_err(io::Error::other)?;
        let toc_digest = Digest::of(&json);
        self.close_member()?;
        let toc_offset = self.out.written;
        let toc_entry = LayerEntry {
            path: TOC_NAME.as_bytes().to_vec(),
            kind: EntryKind::File {
                size: json.len() as u64,
                chunks: std::sync::Arc::from(Vec::new()),
            },
            meta: crate::layer::Meta {
                mode: 0o644,
                ..Default::default()
            },
        };
        self.write_tar(&TarWriter::header_bytes(&toc_entry)?)?;
        self.write_tar(&json)?;
        let padding = (512 - json.len() % 512) % 512;
        self.write_tar(&vec![0u8; padding])?;
        self.write_tar(&[0u8; 1024])?;
        self.close_member()?;
        self.out.write_all(&footer(toc_offset))?;
        self.out.flush()?;
        let Counted {
            inner,
            written,
            hasher,
        } = self.out;
        Ok((
            inner,
            Written {
                digest: hasher.finish(),
                size: written,
                diff_id: self.tar.finish(),
                uncompressed_size: self.tar_size,
                toc_digest,
            },
        ))
    }
}

/// The eStargz footer: an empty gzip member (stored block) whose extra field holds the TOC
/// offset as 16 hex digits and `STARGZ`, 51 bytes in all.
pub fn footer(toc_offset: u64) -> Vec<u8> {
    let payload = format!("{toc_offset:016x}STARGZ");
    let mut out = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
    out.extend_from_slice(&(4 + payload.len() as u16).to_le_bytes());
    out.extend_from_slice(b"SG");
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(payload.as_bytes());
    // An empty final stored block, then CRC-32 and size of nothing.
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::estargz::parse_footer;

    #[test]
    fn the_footer_is_what_the_reader_parses() {
        let footer = footer(0x1234_5678);
        assert_eq!(footer.len(), 51);
        assert_eq!(parse_footer(&footer), Some((0x1234_5678, 51)));
        // It is a valid, empty gzip member.
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&footer[..]), &mut out)
            .unwrap();
        assert!(out.is_empty());
    }
}

//! Writing eStargz and zstd:chunked: a compressed tar whose chunks can each be decompressed
//! alone, plus a table of contents.
//!
//! Both formats cut the compressed stream the same way and share the TOC; they differ in the
//! compressor and in where the TOC goes.
//!
//! eStargz (the format `layer::estargz` reads, as stargz-snapshotter writes it):
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
//! zstd:chunked (as containers/storage and `ctr-remote --zstdchunked` write it): every chunk is
//! a zstd frame instead of a gzip member, and chunk entries also record `endOffset`. The tar ends
//! with its end-of-archive blocks; the TOC, zstd-compressed, is a skippable frame after it (the
//! layer's annotations give its position and checksum), and a last skippable frame repeats that
//! position with a magic for readers without the annotations. A plain zstd reader
//! skips both frames, so the blob is an ordinary tar+zstd.
//!
//! Determinism: gzip headers carry no time or name, compression level and chunk size are fixed,
//! the TOC is serialised with a fixed field order, so the same entries give the same bytes.

use std::io::{self, Write};

use base64::Engine;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde::Serialize;

use super::Format;
use crate::model::oci::{
    ANNOTATION_ESTARGZ_TOC, ANNOTATION_ESTARGZ_UNCOMPRESSED_SIZE, ANNOTATION_ZSTD_CHUNKED_CHECKSUM,
    ANNOTATION_ZSTD_CHUNKED_POSITION, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD,
};
use std::collections::BTreeMap;

use super::TarWriter;
use crate::layer::{EntryKind, LayerEntry};
use crate::model::digest::{Digest, DigestHasher};

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
    pub media_type: &'static str,
    /// What lazy readers need to find and check the TOC.
    pub annotations: BTreeMap<String, String>,
}

/// One independently decompressible piece of the blob being written.
enum Member {
    Gzip(GzEncoder<Vec<u8>>),
    Zstd(zstd::Encoder<'static, Vec<u8>>),
}

impl Member {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Member::Gzip(e) => e.write_all(bytes),
            Member::Zstd(e) => e.write_all(bytes),
        }
    }

    fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Member::Gzip(e) => e.finish(),
            Member::Zstd(e) => e.finish(),
        }
    }
}

/// zstd's skippable frame magic (the first of the 16 allowed values), as containers/storage uses.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// Ends the zstd:chunked footer. Writers disagree on one letter: containers/storage writes
/// `GNUlInUx`, stargz-snapshotter (Debian's `ctr-remote`, the reference our tests read with)
/// `GnUlInUx`, and each one's footer parser accepts only its own. Readers of both projects find
/// the TOC through the layer's annotations first, which we always write, so the footer matters
/// only to stargz-snapshotter's annotation-less paths (`ctr-remote images get-toc-digest`).
const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";
/// The zstd:chunked TOC type: the CRFS-style JSON.
const MANIFEST_TYPE_CRFS: u64 = 1;

pub struct ChunkedWriter<W: Write> {
    format: Format,
    out: Counted<W>,
    member: Option<Member>,
    /// The uncompressed tar stream: its digest is the layer's diff ID.
    tar: DigestHasher,
    tar_size: u64,
    entries: Vec<TocEntry>,
    /// zstd:chunked: the entry of the chunk whose frame is open, to record where it ends.
    open_chunk: Option<usize>,
    chunk_size: u64,
    level: u32,
}

impl<W: Write> ChunkedWriter<W> {
    pub fn new(format: Format, out: W, chunk_size: u64, level: u32) -> ChunkedWriter<W> {
        ChunkedWriter {
            format,
            out: Counted {
                inner: out,
                written: 0,
                hasher: DigestHasher::default(),
            },
            member: None,
            tar: DigestHasher::default(),
            tar_size: 0,
            entries: Vec::new(),
            open_chunk: None,
            chunk_size: chunk_size.max(1),
            level,
        }
    }

    /// Ends the open member, if any, writing it out; the chunk that started it (zstd:chunked)
    /// learns where it ends.
    fn close_member(&mut self) -> io::Result<()> {
        if let Some(member) = self.member.take() {
            let bytes = member.finish()?;
            self.out.write_all(&bytes)?;
        }
        if let Some(chunk) = self.open_chunk.take() {
            self.entries[chunk].end_offset = Some(self.out.written);
        }
        Ok(())
    }

    /// Appends uncompressed tar bytes to the open member (opening one if needed).
    fn write_tar(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tar.update(bytes);
        self.tar_size += bytes.len() as u64;
        if self.member.is_none() {
            self.member = Some(match self.format {
                Format::Estargz => Member::Gzip(
                    flate2::GzBuilder::new().write(Vec::new(), Compression::new(self.level)),
                ),
                Format::ZstdChunked => {
                    let mut encoder = zstd::Encoder::new(Vec::new(), self.level as i32)?;
                    // The frame's size is unknown when it starts; a checksum lets a reader
                    // of the frame alone detect damage, as containers/storage writes it.
                    encoder.include_checksum(true)?;
                    Member::Zstd(encoder)
                }
            });
        }
        self.member.as_mut().expect("opened above").write_all(bytes)
    }

    /// Appends one entry; `content` yields a regular file's bytes (exactly its size).
    pub fn append(&mut self, entry: &LayerEntry, content: &mut dyn io::Read) -> io::Result<()> {
        let header = TarWriter::header_bytes(entry)?;
        self.write_tar(&header)?;
        let toc = toc_entry(entry);
        let EntryKind::File { size, .. } = entry.kind else {
            self.entries.push(toc);
            return Ok(());
        };
        let file = self.entries.len();
        self.entries.push(toc);
        let mut done = 0u64;
        let mut whole = DigestHasher::default();
        let mut buf = Vec::new();
        while done < size {
            let len = self.chunk_size.min(size - done);
            buf.resize(len as usize, 0);
            content.read_exact(&mut buf)?;
            whole.update(&buf);
            // Each chunk starts a member of its own, so it can be decompressed alone.
            self.close_member()?;
            let offset = self.out.written;
            self.write_tar(&buf)?;
            let chunk_digest = Digest::of(&buf).to_string();
            let chunk_size = if len < size { len } else { 0 };
            if done == 0 {
                let e = &mut self.entries[file];
                (e.offset, e.chunk_size, e.chunk_digest) = (offset, chunk_size, chunk_digest);
            } else {
                self.entries.push(TocEntry {
                    name: self.entries[file].name.clone(),
                    kind: "chunk",
                    offset,
                    chunk_offset: done,
                    chunk_size,
                    chunk_digest,
                    ..TocEntry::default()
                });
            }
            if self.format == Format::ZstdChunked {
                self.open_chunk = Some(self.entries.len() - 1);
            }
            done += len;
        }
        let padding = (512 - size % 512) % 512;
        self.write_tar(&vec![0u8; padding as usize])?;
        if size > 0 {
            self.entries[file].digest = whole.finish().to_string();
        }
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
        self.close_member()?;
        let mut annotations = BTreeMap::from([(
            ANNOTATION_ESTARGZ_TOC.to_string(),
            Digest::of(&json).to_string(),
        )]);
        match self.format {
            Format::Estargz => {
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
            }
            Format::ZstdChunked => {
                self.write_tar(&[0u8; 1024])?;
                self.close_member()?;
                let compressed = zstd::encode_all(&json[..], self.level as i32)?;
                let length = u32::try_from(compressed.len())
                    .map_err(|_| io::Error::other("TOC too large for a skippable frame"))?;
                self.out.write_all(&SKIPPABLE_MAGIC.to_le_bytes())?;
                self.out.write_all(&length.to_le_bytes())?;
                let toc_offset = self.out.written;
                self.out.write_all(&compressed)?;
                let mut footer = Vec::with_capacity(48);
                footer.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
                footer.extend_from_slice(&40u32.to_le_bytes());
                for n in [
                    toc_offset,
                    compressed.len() as u64,
                    json.len() as u64,
                    MANIFEST_TYPE_CRFS,
                ] {
                    footer.extend_from_slice(&n.to_le_bytes());
                }
                footer.extend_from_slice(ZSTD_CHUNKED_MAGIC);
                self.out.write_all(&footer)?;
                annotations.insert(
                    ANNOTATION_ZSTD_CHUNKED_CHECKSUM.to_string(),
                    Digest::of(&compressed).to_string(),
                );
                annotations.insert(
                    ANNOTATION_ZSTD_CHUNKED_POSITION.to_string(),
                    format!(
                        "{toc_offset}:{}:{}:{MANIFEST_TYPE_CRFS}",
                        compressed.len(),
                        json.len()
                    ),
                );
            }
        }
        annotations.insert(
            ANNOTATION_ESTARGZ_UNCOMPRESSED_SIZE.to_string(),
            self.tar_size.to_string(),
        );
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
                media_type: match self.format {
                    Format::Estargz => MEDIA_OCI_LAYER_GZIP,
                    Format::ZstdChunked => MEDIA_OCI_LAYER_ZSTD,
                },
                annotations,
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
    use crate::layer::estargz::{index_from_json, parse_footer, toc_json};
    use crate::layer::tar_stream::{Ignore, index_reader};
    use crate::layer::zstd_chunked::index_from_toc;
    use crate::layer::{ChunkSource, Codec, LayerIndex, Meta};
    use crate::model::oci::LayerCompression;
    use std::io::Read;
    use std::sync::Arc;

    /// Entries of every kind, a long name, an xattr and a file split into several chunks.
    fn sample() -> Vec<(LayerEntry, Vec<u8>)> {
        let meta = |mode| Meta {
            mode,
            uid: 1000,
            gid: 100,
            mtime: 1_700_000_000,
            xattrs: Vec::new(),
        };
        let file = |path: &str, data: &[u8]| {
            (
                LayerEntry {
                    path: path.as_bytes().to_vec(),
                    kind: EntryKind::File {
                        size: data.len() as u64,
                        chunks: Arc::from(Vec::new()),
                    },
                    meta: meta(0o644),
                },
                data.to_vec(),
            )
        };
        let other = |path: &str, kind| {
            (
                LayerEntry {
                    path: path.as_bytes().to_vec(),
                    kind,
                    meta: meta(0o755),
                },
                Vec::new(),
            )
        };
        let long = format!("usr/{}/deep.txt", "d".repeat(150));
        let mut capped = file("usr/bin/ping", b"ping!");
        capped.0.meta.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2])];
        vec![
            other("usr", EntryKind::Dir),
            other("usr/bin", EntryKind::Dir),
            file("usr/bin/big", &(0..100u8).collect::<Vec<_>>()),
            file("empty", b""),
            capped,
            file(&long, b"far down"),
            other(
                "usr/bin/link",
                EntryKind::Symlink {
                    target: format!("../{}", "t".repeat(120)).into_bytes(),
                },
            ),
            other(
                "usr/bin/hard",
                EntryKind::Hardlink {
                    target: b"usr/bin/ping".to_vec(),
                },
            ),
            other("dev-null", EntryKind::Char { major: 1, minor: 3 }),
            other("pipe", EntryKind::Fifo),
        ]
    }

    fn write(format: Format) -> (Vec<u8>, Written) {
        let mut writer = ChunkedWriter::new(format, Vec::new(), 30, 6);
        writer.landmark(false).unwrap();
        for (entry, data) in sample() {
            writer.append(&entry, &mut &data[..]).unwrap();
        }
        let (blob, written) = writer.finish().unwrap();
        assert_eq!(written.digest, Digest::of(&blob));
        assert_eq!(written.size, blob.len() as u64);
        (blob, written)
    }

    /// What a reader makes of the blob through its TOC equals the input, and every chunk,
    /// decompressed alone from its offset, holds the file's bytes.
    fn check_toc_index(index: &LayerIndex, blob: &[u8], codec: Codec) {
        let expected = sample();
        let entries: Vec<_> = index.entries.iter().collect();
        assert_eq!(entries.len(), expected.len());
        for (got, (want, data)) in entries.iter().zip(&expected) {
            assert_eq!(got.path, want.path);
            assert_eq!(
                got.meta,
                want.meta,
                "{:?}",
                String::from_utf8_lossy(&got.path)
            );
            let EntryKind::File { size, chunks } = &got.kind else {
                assert_eq!(got.kind, want.kind);
                continue;
            };
            assert_eq!(*size, data.len() as u64);
            let mut content = Vec::new();
            for chunk in chunks.iter() {
                let ChunkSource::Compressed {
                    start,
                    end,
                    inner_offset,
                    ..
                } = chunk.source
                else {
                    panic!("not a compressed chunk");
                };
                let piece = &blob[start as usize..end as usize];
                let mut out = Vec::new();
                match codec {
                    Codec::Gzip => flate2::read::GzDecoder::new(piece)
                        .read_to_end(&mut out)
                        .map(|_| ()),
                    _ => zstd::stream::read::Decoder::new(piece)
                        .unwrap()
                        .read_to_end(&mut out)
                        .map(|_| ()),
                }
                .unwrap();
                let bytes = &out[inner_offset as usize..][..chunk.size as usize];
                assert_eq!(Some(Digest::of(bytes)), chunk.digest);
                content.extend_from_slice(bytes);
            }
            assert_eq!(&content, data);
            assert!(chunks.len() > 1 || data.len() <= 30);
        }
    }

    /// A plain reader of the blob (one tar stream) finds the same entries, and the diff ID is
    /// that stream's digest.
    fn check_plain_tar(blob: &[u8], written: &Written, compression: LayerCompression) {
        let index = index_reader(
            blob,
            &written.digest,
            written.size,
            Some(&written.diff_id),
            compression,
            &Ignore,
        )
        .unwrap();
        let names: Vec<String> = index
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .filter(|n| n != TOC_NAME && n != NO_LANDMARK)
            .collect();
        let expected: Vec<String> = sample()
            .iter()
            .map(|(e, _)| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(names, expected);
        let mut tar = Vec::new();
        match compression {
            LayerCompression::Gzip => flate2::read::MultiGzDecoder::new(blob).read_to_end(&mut tar),
            _ => zstd::stream::read::Decoder::new(blob)
                .unwrap()
                .read_to_end(&mut tar),
        }
        .unwrap();
        assert_eq!(Digest::of(&tar), written.diff_id);
    }

    #[test]
    fn estargz_output_reads_back_through_its_toc_and_as_plain_tar() {
        let (blob, written) = write(Format::Estargz);
        let (toc_offset, footer_size) = parse_footer(&blob).unwrap();
        assert_eq!(footer_size, 51);
        let json = toc_json(&written.digest, &blob[toc_offset as usize..blob.len() - 51]).unwrap();
        assert_eq!(
            written.annotations[ANNOTATION_ESTARGZ_TOC],
            Digest::of(&json).to_string()
        );
        let index = index_from_json(&written.digest, &json, toc_offset).unwrap();
        check_toc_index(&index, &blob, Codec::Gzip);
        check_plain_tar(&blob, &written, LayerCompression::Gzip);
    }

    #[test]
    fn zstd_chunked_output_reads_back_through_its_toc_and_as_plain_tar() {
        let (blob, written) = write(Format::ZstdChunked);
        let position = &written.annotations[ANNOTATION_ZSTD_CHUNKED_POSITION];
        let (offset, length, uncompressed, _) =
            crate::layer::zstd_chunked::parse_position(position).unwrap();
        let compressed = &blob[offset as usize..(offset + length) as usize];
        assert_eq!(
            written.annotations[ANNOTATION_ZSTD_CHUNKED_CHECKSUM],
            Digest::of(compressed).to_string()
        );
        let index = index_from_toc(&written.digest, compressed, uncompressed, offset - 8).unwrap();
        check_toc_index(&index, &blob, Codec::Zstd);
        check_plain_tar(&blob, &written, LayerCompression::Zstd);
        // The footer repeats the position for readers without annotations.
        let footer = &blob[blob.len() - 40..];
        assert_eq!(&footer[32..], ZSTD_CHUNKED_MAGIC);
        assert_eq!(u64::from_le_bytes(footer[..8].try_into().unwrap()), offset);
    }

    #[test]
    fn the_same_entries_give_the_same_bytes() {
        assert_eq!(write(Format::Estargz).0, write(Format::Estargz).0);
        assert_eq!(write(Format::ZstdChunked).0, write(Format::ZstdChunked).0);
    }

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

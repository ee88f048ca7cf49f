//! Start-up packs: the bytes a published profile's start reads, published beside the profile.
//!
//! A profile says which chunks a start reads; fetching them from the layers still costs what the
//! layer format makes them cost. A plain gzip layer read through a seek index must be inflated
//! from the checkpoint before each file, so python-app's published profile fetched about twice
//! the bytes its start reads (1.98x in tools/bench/results/2026-12-07T0928Z.md), in some hundred
//! requests; eStargz comes closer (1.11x, the TOCs included) but still pays a request per run
//! of neighbouring files. A pack holds the chunks the profile names, uncompressed and then
//! compressed together as one zstd stream in the profile's order: a mount fetches it in one
//! request, and each chunk is usable as soon as its record has arrived. With packs, the same
//! starts fetched 0.83x (eStargz, 11 requests) and 1.02x (gzip, 13 requests, the seek indexes
//! included) the bytes they read, and took 1.1x and 1.2x the physical floor
//! (tools/bench/results/2026-12-07T1232Z.md, before requests carried several ranges).
//!
//! Every chunk a pack brings is checked against the chunk digest the image's own index gives
//! (the eStargz TOC, the zstd:chunked manifest, the seek index) before it is kept or served, so a
//! pack can never make a mount serve a byte its image does not hold: a chunk that fails, or that
//! the pack lacks, is fetched from its layer as without a pack. Records for paths or offsets the
//! image has no chunk at are skipped, the decoded stream may hold no more than the chunks the
//! profile names (a small compressed pack cannot unfold into gigabytes), and the pack blob may
//! not be larger than the image's layers together.
//!
//! Trade-offs: the registry stores the start-up bytes twice, in the layers and in the pack
//! (`profile push --list-only` publishes the list alone); a pack belongs to one manifest (the
//! artifact's subject) and a new image needs a new push, as its profile does. A learned profile
//! (this machine's own) has no pack: it wins over a published one because it says what this
//! machine's starts read, and its chunks are usually still in the disk cache.
//!
//! Format, inside one zstd stream: the magic `LLPACK1\n`, then records of path length (u16 LE),
//! path (as in profiles: no leading slash), file offset (u64 LE), length (u32 LE) and that many
//! bytes of the file.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

use crate::fetch::scheduler::Priority;
use crate::fetch::{ContentError, ContentReader};
use crate::fs::profile::PathWork;
use crate::layer::{ChunkRef, ChunkSource};
use crate::model::oci::Descriptor;

const MAGIC: &[u8; 8] = b"LLPACK1\n";
/// The longest path a record holds (`PATH_MAX`); a file with a longer one is left out of packs.
const MAX_PATH: usize = 4096;
/// Bytes a record adds to its data: path length, path, offset, length.
const RECORD_OVERHEAD: u64 = 2 + MAX_PATH as u64 + 8 + 4;
/// The largest record: a chunk is never larger than a seek index span may be.
const MAX_RECORD: u64 = crate::layer::gzip_index::MAX_SPAN_OUTPUT;
/// zstd level of `profile push`'s packs: a pack is made once and fetched at every start on every
/// machine, so the level is high. python-app's 30.2 MB of start-up chunks: level 19 8.95 MB in
/// 13.5 s, 12 10.2 MB in 2 s, 9 10.2 MB in 0.8 s, 3 11.2 MB in 0.15 s (`zstd` CLI, this
/// machine); the 1.2 MB between 19 and 12 are 50 ms of every start at 200 Mbit/s.
const PACK_LEVEL: i32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("is not a lazylayer start-up pack")]
    NotAPack,
    #[error("does not decompress: {0}")]
    Zstd(String),
    #[error("unfolds to more than the {limit} bytes its profile's chunks can fill")]
    TooLarge { limit: u64 },
    #[error("has a record of {len} bytes, larger than any chunk")]
    HugeRecord { len: u64 },
    #[error("has a record whose path is not UTF-8")]
    BadPath,
}

/// One chunk's bytes as a pack carries them.
#[derive(Debug, PartialEq)]
pub struct Record {
    pub path: String,
    pub offset: u64,
    pub data: Bytes,
}

/// Writes a pack.
pub struct PackWriter {
    encoder: zstd::stream::Encoder<'static, Vec<u8>>,
}

impl PackWriter {
    pub fn new(level: i32) -> PackWriter {
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), level).expect("zstd level");
        encoder.write_all(MAGIC).expect("writing to memory");
        PackWriter { encoder }
    }

    /// Adds a record; `false` (nothing added) for a path longer than [`MAX_PATH`] or data
    /// larger than any chunk, which the format cannot hold.
    pub fn add(&mut self, path: &str, offset: u64, data: &[u8]) -> bool {
        if path.len() > MAX_PATH || data.len() as u64 > MAX_RECORD {
            return false;
        }
        let header = [
            &(path.len() as u16).to_le_bytes()[..],
            path.as_bytes(),
            &offset.to_le_bytes(),
            &(data.len() as u32).to_le_bytes(),
        ];
        for piece in header.into_iter().chain([data]) {
            self.encoder.write_all(piece).expect("writing to memory");
        }
        true
    }

    pub fn finish(self) -> Vec<u8> {
        self.encoder.finish().expect("writing to memory")
    }
}

/// Reads a pack as its bytes arrive: each [`PackDecoder::feed`] returns the records completed.
pub struct PackDecoder {
    zstd: zstd::stream::raw::Decoder<'static>,
    scratch: Vec<u8>,
    /// Decoded bytes not yet returned as records.
    pending: Vec<u8>,
    decoded: u64,
    limit: u64,
    magic_seen: bool,
}

impl PackDecoder {
    /// A decoder that refuses to unfold more than `limit` bytes.
    pub fn new(limit: u64) -> PackDecoder {
        PackDecoder {
            zstd: zstd::stream::raw::Decoder::new().expect("a zstd context"),
            scratch: vec![0; 128 << 10],
            pending: Vec::new(),
            decoded: 0,
            limit,
            magic_seen: false,
        }
    }

    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<Record>, PackError> {
        let mut input = InBuffer::around(input);
        loop {
            let mut output = OutBuffer::around(&mut self.scratch[..]);
            self.zstd
                .run(&mut input, &mut output)
                .map_err(|e| PackError::Zstd(e.to_string()))?;
            let produced = output.pos();
            self.decoded += produced as u64;
            if self.decoded > self.limit {
                return Err(PackError::TooLarge { limit: self.limit });
            }
            self.pending.extend_from_slice(&self.scratch[..produced]);
            if input.pos() == input.src.len() && produced < self.scratch.len() {
                break;
            }
        }
        self.records()
    }

    fn records(&mut self) -> Result<Vec<Record>, PackError> {
        let mut at = 0;
        if !self.magic_seen {
            if self.pending.len() < MAGIC.len() {
                return Ok(Vec::new());
            }
            if &self.pending[..MAGIC.len()] != MAGIC {
                return Err(PackError::NotAPack);
            }
            self.magic_seen = true;
            at = MAGIC.len();
        }
        let mut records = Vec::new();
        loop {
            let rest = &self.pending[at..];
            let Some(path_len) = rest.get(..2) else { break };
            let path_len = u16::from_le_bytes([path_len[0], path_len[1]]) as usize;
            let head = 2 + path_len + 12;
            let Some(header) = rest.get(..head) else {
                break;
            };
            let number = |from: usize, to: usize| {
                let mut bytes = [0u8; 8];
                bytes[..to - from].copy_from_slice(&header[from..to]);
                u64::from_le_bytes(bytes)
            };
            let offset = number(2 + path_len, 10 + path_len);
            let len = number(10 + path_len, head);
            if len > MAX_RECORD {
                return Err(PackError::HugeRecord { len });
            }
            let Some(data) = rest.get(head..head + len as usize) else {
                break;
            };
            let path = std::str::from_utf8(&header[2..2 + path_len])
                .map_err(|_| PackError::BadPath)?
                .to_string();
            records.push(Record {
                path,
                offset,
                data: Bytes::copy_from_slice(data),
            });
            at += head + len as usize;
        }
        self.pending.drain(..at);
        Ok(records)
    }
}

/// Whether a pack carries `chunk`: chunks fetched from a layer's blob by range, whose digest the
/// image's index gives (a streamed layer's content arrives with its stream anyway).
fn packable(chunk: &ChunkRef) -> bool {
    matches!(chunk.source, ChunkSource::Compressed { .. }) && chunk.digest.is_some()
}

/// Builds the pack of `work` (a profile's, see [`crate::fs::profile::Profile::work_by_path`])
/// from `content`, reading the chunks through the cache tiers (a profile just recorded into the
/// same cache costs no request). Returns the pack and how many chunks it holds.
pub async fn build(
    content: &ContentReader,
    work: &PathWork,
) -> Result<(Vec<u8>, usize), Arc<ContentError>> {
    let chunks: Vec<(&str, usize, &ChunkRef)> = work
        .iter()
        .flat_map(|(path, layer, chunks)| {
            chunks
                .iter()
                .filter(|c| packable(c))
                .map(move |c| (path.as_str(), *layer, c))
        })
        .collect();
    let mut writer = PackWriter::new(PACK_LEVEL);
    // In order (the pack's order is the start's), several fetched at once.
    let mut fetched = futures_util::stream::iter(&chunks)
        .map(|(_, layer, c)| content.chunk(*layer, c, Priority::Prefetch))
        .buffered(16);
    let (mut n, mut added) = (0, 0);
    while let Some(data) = fetched.next().await {
        let (path, _, c) = chunks[n];
        added += usize::from(writer.add(path, c.file_offset, &data?));
        n += 1;
    }
    Ok((writer.finish(), added))
}

/// Prefetches `work`'s chunks from the pack `blob` (see [`ContentReader::fetch_pack`]) and
/// returns the chunks it did not bring, for the profile's prefetch to fetch from the layers.
/// `image` names the image in log lines.
pub async fn prefetch(
    content: &ContentReader,
    blob: &Descriptor,
    work: PathWork,
    image: &str,
) -> Vec<(usize, Vec<ChunkRef>)> {
    let mut expected = Vec::new();
    let mut by_place = HashMap::new();
    let mut leftover = Vec::new();
    for (path, layer, chunks) in work {
        let (packed, other): (Vec<ChunkRef>, Vec<ChunkRef>) =
            chunks.into_iter().partition(packable);
        for c in packed {
            by_place.insert((path.clone(), c.file_offset), expected.len());
            expected.push((layer, c));
        }
        if !other.is_empty() {
            leftover.push((layer, other));
        }
    }
    let limit = MAGIC.len() as u64
        + expected
            .iter()
            .map(|(_, c)| c.size + RECORD_OVERHEAD)
            .sum::<u64>();
    let mut decoder = PackDecoder::new(limit);
    let started = std::time::Instant::now();
    let (missed, result) = content
        .fetch_pack(blob, expected, |bytes| {
            Ok::<_, PackError>(
                decoder
                    .feed(bytes)?
                    .into_iter()
                    .filter_map(|r| Some((*by_place.get(&(r.path, r.offset))?, r.data)))
                    .collect(),
            )
        })
        .await;
    match result {
        Ok(()) => tracing::debug!(
            "{image}: start-up pack {} ({} bytes) in {:?}, {} chunks not in it",
            blob.digest,
            blob.size,
            started.elapsed(),
            missed.len()
        ),
        // A prefetch: what it did not bring is fetched from the layers.
        Err(e) => tracing::debug!("{image}: start-up pack {}: {e}", blob.digest),
    }
    leftover.extend(missed.into_iter().map(|(layer, c)| (layer, vec![c])));
    leftover
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack_of(records: &[(&str, u64, Vec<u8>)]) -> Vec<u8> {
        let mut writer = PackWriter::new(3);
        for (path, offset, data) in records {
            assert!(writer.add(path, *offset, data));
        }
        writer.finish()
    }

    #[test]
    fn records_come_out_as_the_bytes_arrive() {
        let records = [
            ("usr/lib/a.so", 0, vec![7u8; 300_000]),
            ("usr/lib/a.so", 1 << 20, b"second chunk".to_vec()),
            ("app/main.py", 0, b"print('hi')\n".to_vec()),
        ];
        let pack = pack_of(&records);
        let mut decoder = PackDecoder::new(1 << 30);
        let mut got = Vec::new();
        // One byte at a time at first (a header split anywhere), then in larger pieces.
        for piece in pack[..40].chunks(1).chain(pack[40..].chunks(1000)) {
            got.extend(decoder.feed(piece).unwrap());
        }
        let want: Vec<Record> = records
            .iter()
            .map(|(path, offset, data)| Record {
                path: path.to_string(),
                offset: *offset,
                data: Bytes::from(data.clone()),
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn hostile_packs_are_refused() {
        let err = |pack: &[u8], limit: u64| PackDecoder::new(limit).feed(pack).unwrap_err();
        // Not zstd, not a pack, more than the profile can use, a record larger than any chunk.
        assert!(matches!(
            err(b"junk, not zstd", 1 << 20),
            PackError::Zstd(_)
        ));
        let other = zstd::encode_all(&b"GIF89a and more"[..], 3).unwrap();
        assert!(matches!(err(&other, 1 << 20), PackError::NotAPack));
        let bomb = pack_of(&[("f", 0, vec![0u8; 10 << 20])]);
        assert!(bomb.len() < 10_000);
        assert!(matches!(
            err(&bomb, 1 << 20),
            PackError::TooLarge { limit } if limit == 1 << 20
        ));
        let mut raw = MAGIC.to_vec();
        raw.extend(1u16.to_le_bytes());
        raw.push(b'f');
        raw.extend(0u64.to_le_bytes());
        raw.extend(u32::MAX.to_le_bytes());
        let huge = zstd::encode_all(&raw[..], 3).unwrap();
        assert!(matches!(err(&huge, u64::MAX), PackError::HugeRecord { .. }));
        let mut raw = MAGIC.to_vec();
        raw.extend(1u16.to_le_bytes());
        raw.push(0xff);
        raw.extend(0u64.to_le_bytes());
        raw.extend(0u32.to_le_bytes());
        let bad = zstd::encode_all(&raw[..], 3).unwrap();
        assert!(matches!(err(&bad, u64::MAX), PackError::BadPath));
        // What the format cannot hold is left out when writing.
        let mut writer = PackWriter::new(3);
        assert!(!writer.add(&"d/".repeat(3000), 0, b"x"));
        assert!(writer.add("f", 0, b"x"));
        let records = PackDecoder::new(1 << 20).feed(&writer.finish()).unwrap();
        assert_eq!(records.len(), 1);
    }
}

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
//! (`inflateSetDictionary`), skip to the file. The index also records, every [`OUTPUT_MARK`]
//! bytes of output, how much of the blob inflating had consumed by then, so a chunk's
//! compressed range ends where its output is complete, not at the span's end: a file early in a
//! span costs only the bytes up to it. Chunks of one span that one request carries are
//! inflated once, step by step as the bytes arrive ([`SpanInflater`]), and where a request
//! stopped is kept for the next read further into the span ([`crate::fetch::resume`]).
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
//! already builds on here, so no C library is linked. The unsafe FFI stays inside [`zlib`].

mod builder;
mod format;
mod zlib;

pub use builder::{build, build_from};
pub use format::{parse, parse_json};
pub use zlib::{SpanInflater, inflate_from};

use std::sync::Arc;

use bytes::Bytes;

use super::{LayerError, LayerIndex};
use crate::cache::disk::DiskCache;
use crate::model::digest::Digest;
use crate::model::oci::Descriptor;
use crate::source::ImageSource;

/// Output between checkpoints when none is asked for. A read fetches and inflates from the
/// checkpoint before it (about a third of the output's size, compressed), or from where the
/// last request in the span stopped; smaller spans fetch less per first read in a span but cost
/// a 32 KiB window each in the index. SOCI's default is 4 MiB. On python-app at 20 ms /
/// 200 Mbit/s, 1 MiB against 2 MiB: cold starts fetched 39 vs 42 MB (index included) and were
/// as fast in the bench (2.93 vs 2.92 s; 2.86 vs 2.99 s in a quieter loop), starts with a
/// published profile 1.83 vs 1.99 s for 23 vs 30 MB; the index doubles (2.8 MB) and the pull
/// takes 50 ms more. 512 KiB was no faster than 1 MiB and its index costs the pull 160 ms.
pub const DEFAULT_SPAN: u64 = 1 << 20;

/// Compressed size bound of an index blob, and of its JSON once inflated: the file table of a
/// huge layer is a few MiB; more is a hostile or broken blob.
const MAX_INDEX_BLOB: u64 = 64 << 20;
const MAX_INDEX_JSON: u64 = 256 << 20;
/// Most output one span may hold: a read inflates up to a whole span into memory, so an index
/// (or a layer with a giant deflate block) that asks for more is refused.
pub const MAX_SPAN_OUTPUT: u64 = 64 << 20;
/// Output between two marks: the index records how much of the blob inflating has consumed at
/// every multiple of this, so a read fetches from its checkpoint only as far as the end of what
/// it wants (about a tenth of this compressed past it) rather than to the span's end.
const OUTPUT_MARK: u64 = 32 << 10;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Read;

    use crate::layer::{ChunkSource, Codec, EntryKind};

    /// A gzip tar of files with varied, partly compressible content, big enough for many blocks.
    fn layer_tar_gz() -> Vec<u8> {
        crate::layer::gzip(&crate::layer::tar_of(&layer_files()))
    }

    /// The files of [`layer_tar_gz`].
    fn layer_files() -> Vec<(String, Vec<u8>)> {
        let mut seed = 7u64;
        (0..40)
            .map(|i| {
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
                (format!("dir/file-{i}"), data)
            })
            .collect()
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
        let index_blob = build(&blob[..], &desc.digest, desc.size, None, 256 << 10).unwrap();
        assert_eq!(
            index_blob,
            build(&blob[..], &desc.digest, desc.size, None, 256 << 10).unwrap(),
            "not deterministic"
        );
        let index = parse(&desc, &index_blob).unwrap();
        let points = index.checkpoints.clone().unwrap();
        assert!(points.len() > 20, "only {} checkpoints", points.len());
        assert!(points.iter().any(|p| p.bits > 0), "no checkpoint mid-byte");
        // Chunks early in their span need its first bytes only (the marks say how many).
        let spans_ends: Vec<u64> = points.iter().skip(1).map(|p| p.input).collect();
        let short = index
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => Some(chunks.iter()),
                _ => None,
            })
            .flatten()
            .filter(|c| match c.source {
                ChunkSource::Compressed { end, .. } => !spans_ends.contains(&end),
                _ => false,
            })
            .count();
        assert!(short > 20, "only {short} chunks end before their span");
        assert_every_chunk_inflates(&blob, &index);
        // Fed as a request's bytes arrive (a lone first byte, then pieces), a span gives the
        // same output as inflated at once.
        for (i, point) in points.iter().enumerate().take(8) {
            let next = &points[i + 1];
            let span = &blob[point.first_byte() as usize..next.input as usize];
            let len = (next.output - point.output) as usize;
            let whole = inflate_from(point, span, len).unwrap();
            let mut fed = SpanInflater::new(point, len as u64).unwrap();
            for piece in [&span[..1], &span[1..1000], &span[1000..]] {
                fed.feed(piece).unwrap();
            }
            assert!(fed.get(0, len as u64) == Some(&whole[..]), "span {i}");
            // Stopped early and continued from where it stopped (as a later request does).
            let mut first = SpanInflater::new(point, 5000).unwrap();
            first.feed(&span[..span.len() / 2]).unwrap();
            let (consumed, produced) = first.position();
            assert_eq!(produced, 5000);
            first.continue_to(len as u64);
            first.feed(&span[consumed as usize..]).unwrap();
            assert!(first.get(0, 1).is_none(), "kept output it dropped");
            assert!(
                first.get(produced, len as u64 - produced) == Some(&whole[produced as usize..]),
                "span {i} continued"
            );
        }
    }

    #[test]
    fn concatenated_gzip_members_get_a_checkpoint_each() {
        // The same tar cut into three members (as pigz-like writers do), with an empty member
        // in between: no span may cross from one member into the next.
        let tar = crate::layer::tar_of(&layer_files());
        let member = crate::layer::gzip;
        let third = tar.len() / 3 + 12_345;
        let mut blob = member(&tar[..third]);
        blob.extend(member(b""));
        blob.extend(member(&tar[third..2 * third]));
        blob.extend(member(&tar[2 * third..]));
        let desc = descriptor(&blob);
        let index = parse(
            &desc,
            &build(&blob[..], &desc.digest, desc.size, None, 4 << 20).unwrap(),
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
        let index_blob = build(&blob[..], &desc.digest, desc.size, None, 1 << 20).unwrap();
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
        // Marks past the layer's end, or more of them than the stream has output for.
        let mut value = original.clone();
        value["marks"][0] = serde_json::json!(1u64 << 40);
        let err = parse(&desc, &tamper(&value)).unwrap_err().to_string();
        assert!(err.contains("past the layer"), "{err}");
        let mut value = original.clone();
        value["markEvery"] = serde_json::json!(1u64 << 30);
        let err = parse(&desc, &tamper(&value)).unwrap_err().to_string();
        assert!(err.contains("marks"), "{err}");
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
                None,
                1 << 20
            )
            .is_err()
        );
    }
}

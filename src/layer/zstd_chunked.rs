//! zstd:chunked: a zstd layer whose TOC sits in a skippable frame near its end.
//!
//! Every file (and every chunk of a large file) is its own zstd frame, so a chunk can be fetched
//! and decompressed alone; a plain zstd reader sees one valid `tar+zstd` stream and skips the
//! metadata frames. The layer's annotations give the TOC's position
//! (`offset:length:uncompressedLength:type`, type 1 = the CRFS JSON TOC) and the SHA-256 of its
//! compressed bytes, so loading costs exactly one request, and the TOC is verified against the
//! (verified) manifest before it is used.
//!
//! Writers differ in details we accept: containers/storage writes `endOffset` for each chunk and
//! `chunkType: zeros` for holes; stargz-snapshotter's writer (`ctr-remote --zstdchunked`) leaves
//! the end implicit, as eStargz does.

use std::io::Read;

use super::toc::{self, MAX_TOC_BYTES};
use super::{Codec, LayerError, LayerFormat, LayerIndex};
use crate::cache::disk::DiskCache;
use crate::model::digest::Digest;
use crate::model::oci::Descriptor;
use crate::source::ImageSource;

/// The only TOC type defined: the CRFS-style JSON.
const MANIFEST_TYPE_CRFS: u64 = 1;

/// Parses `offset:length:uncompressedLength:type`.
pub fn parse_position(position: &str) -> Result<(u64, u64, u64, u64), String> {
    let parts: Vec<u64> = position
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| format!("manifest position {position:?} is not four numbers"))?;
    match parts[..] {
        [offset, length, uncompressed, kind] => Ok((offset, length, uncompressed, kind)),
        _ => Err(format!(
            "manifest position {position:?} is not four numbers"
        )),
    }
}

pub async fn load(
    source: &dyn ImageSource,
    descriptor: &Descriptor,
    checksum: &Digest,
    position: &str,
    disk: Option<&DiskCache>,
) -> Result<LayerIndex, LayerError> {
    let layer = &descriptor.digest;
    let bad = |reason: String| LayerError::malformed(layer, format!("zstd:chunked TOC: {reason}"));
    let (offset, length, uncompressed, kind) = parse_position(position).map_err(bad)?;
    if kind != MANIFEST_TYPE_CRFS {
        return Err(bad(format!("unsupported TOC type {kind}")));
    }
    let end = offset
        .checked_add(length)
        .filter(|&end| end <= descriptor.size)
        .ok_or_else(|| bad(format!("{offset}+{length} is outside the blob")))?;
    if length > MAX_TOC_BYTES || uncompressed > MAX_TOC_BYTES {
        return Err(bad(format!(
            "{uncompressed} bytes ({length} compressed) exceeds the limit of {MAX_TOC_BYTES}"
        )));
    }
    let compressed = DiskCache::meta_or_fetch(
        disk,
        &format!("zstd-toc-{}", checksum.hex()),
        |stored| (Digest::of(stored) == *checksum).then(|| bytes::Bytes::copy_from_slice(stored)),
        || async {
            let compressed = source.read_range(layer, offset..end).await?;
            let actual = Digest::of(&compressed);
            if actual != *checksum {
                return Err(LayerError::DigestMismatch {
                    layer: layer.clone(),
                    what: "zstd:chunked TOC".into(),
                    expected: checksum.clone(),
                    actual,
                });
            }
            Ok(compressed)
        },
        |compressed| compressed.to_vec(),
    )
    .await?;
    // Chunk frames end where the TOC's skippable frame (8-byte header) begins.
    index_from_toc(layer, &compressed, uncompressed, offset.saturating_sub(8))
}

/// Inflates a zstd:chunked TOC (already checked against its checksum) of `uncompressed` bytes
/// and builds the index; chunk data ends at `data_end`. Public for the fuzzer.
pub fn index_from_toc(
    layer: &Digest,
    compressed: &[u8],
    uncompressed: u64,
    data_end: u64,
) -> Result<LayerIndex, LayerError> {
    let bad = |reason: String| LayerError::malformed(layer, format!("zstd:chunked TOC: {reason}"));
    if uncompressed > MAX_TOC_BYTES {
        return Err(bad(format!(
            "{uncompressed} bytes exceeds the limit of {MAX_TOC_BYTES}"
        )));
    }
    // The annotation is trusted for the bound, not for an allocation up front.
    let mut json = Vec::with_capacity(uncompressed.min(1 << 20) as usize);
    zstd::stream::read::Decoder::new(compressed)
        .map_err(|e| bad(e.to_string()))?
        .take(uncompressed + 1)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("does not decompress: {e}")))?;
    if json.len() as u64 != uncompressed {
        return Err(bad(format!(
            "decompresses to {} bytes, the annotation says {uncompressed}",
            json.len()
        )));
    }
    let converted = toc::convert(layer, toc::parse(layer, &json)?, Codec::Zstd, data_end)?;
    Ok(LayerIndex {
        digest: layer.clone(),
        format: LayerFormat::ZstdChunked,
        entries: converted.entries,
        prefetch_end: converted.prefetch_end,
        checkpoints: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        assert_eq!(
            parse_position("2230984:19019:135678:1").unwrap(),
            (2230984, 19019, 135678, 1)
        );
        assert!(parse_position("1:2:3").is_err());
        assert!(parse_position("1:2:3:x").is_err());
        assert!(parse_position("").is_err());
    }

    #[test]
    fn toc_sizes_are_bounds_not_promises() {
        let layer = Digest::of(b"layer");
        let json = br#"{"version":1,"entries":[{"name":"a","type":"dir"}]}"#;
        let frame = zstd::encode_all(&json[..], 3).unwrap();
        assert!(index_from_toc(&layer, &frame, json.len() as u64, 100).is_ok());
        // An annotation claiming more than the cap is refused before anything is allocated.
        let err = index_from_toc(&layer, &frame, MAX_TOC_BYTES + 1, 100).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // One that disagrees with what the frame holds is refused either way.
        for claimed in [json.len() as u64 - 1, json.len() as u64 + 1] {
            let err = index_from_toc(&layer, &frame, claimed, 100).unwrap_err();
            assert!(err.to_string().contains("decompresses to"), "{err}");
        }
        // A frame that inflates past the claimed size is cut off, not read to the end.
        let bomb = zstd::encode_all(&vec![b' '; 8 << 20][..], 19).unwrap();
        let err = index_from_toc(&layer, &bomb, 1000, 100).unwrap_err();
        assert!(err.to_string().contains("decompresses to 1001"), "{err}");
    }
}

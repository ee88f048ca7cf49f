//! eStargz: a gzip layer that ends with its own table of contents.
//!
//! Layout: `[gzip members with tar headers and file chunks][gzip member: tar with
//! stargz.index.json][footer]`. The footer is an empty gzip member whose header's extra field
//! holds the TOC offset as 16 hex digits followed by `STARGZ` (51 bytes; the older stargz footer
//! is 47 bytes, without the `SG` subfield header).
//!
//! Loading costs one request in the common case: the tail of the blob is fetched speculatively
//! ([`tail_guess`] bytes), which holds the footer and, for most layers, the whole TOC. A bigger
//! TOC costs a second, serial request for the part before the tail. The guess grows with the
//! layer, because TOCs do: they are 0.6-0.9% of the layers of python-app as ctr-remote writes
//! them (309 KB of a 52 MB base layer, 19 KB of 2.2 MB), so a fixed 64 KiB guess cost the base
//! layer a second round trip on the pull's critical path. 1/128 of the layer (at least 64 KiB,
//! at most 1 MiB) covers those; the over-fetch is a few milliseconds at 200 Mbit/s, less than
//! the round trip it saves.
//!
//! The TOC is trusted only after it matches the layer's `containerd.io/snapshot/stargz/toc.digest`
//! annotation (the manifest is verified, so the TOC is too); each chunk then carries its own
//! digest. An eStargz layer without that annotation is read as a plain gzip stream, which is
//! always correct because eStargz is valid tar+gzip.

use std::io::Read;

use bytes::{Bytes, BytesMut};

use super::toc::{self, MAX_TOC_BYTES};
use super::{Codec, LayerError, LayerFormat, LayerIndex};
use crate::cache::disk::DiskCache;
use crate::model::digest::Digest;
use crate::model::oci::Descriptor;
use crate::source::ImageSource;

const FOOTER_SIZE: u64 = 51;
const LEGACY_FOOTER_SIZE: u64 = 47;
const TOC_NAME: &[u8] = b"stargz.index.json";
/// How much of a `size`-byte blob's tail to fetch first (module doc: why this much).
fn tail_guess(size: u64) -> u64 {
    (size / 128).clamp(64 << 10, 1 << 20)
}

/// Finds the TOC offset in a footer. Accepts the eStargz footer and the legacy stargz one.
pub fn parse_footer(tail: &[u8]) -> Option<(u64, u64)> {
    let try_parse = |footer: &[u8], payload_at: usize| -> Option<u64> {
        if footer.len() < payload_at + 22 || footer[0] != 0x1f || footer[1] != 0x8b {
            return None;
        }
        if footer[3] & 0x04 == 0 {
            return None; // no FEXTRA field
        }
        let payload = &footer[payload_at..payload_at + 22];
        if &payload[16..] != b"STARGZ" {
            return None;
        }
        u64::from_str_radix(std::str::from_utf8(&payload[..16]).ok()?, 16).ok()
    };
    if tail.len() as u64 >= FOOTER_SIZE {
        let footer = &tail[tail.len() - FOOTER_SIZE as usize..];
        // 10-byte gzip header, 2-byte XLEN, subfield id "SG" and its 2-byte length.
        if &footer[12..14] == b"SG"
            && let Some(offset) = try_parse(footer, 16)
        {
            return Some((offset, FOOTER_SIZE));
        }
    }
    if tail.len() as u64 >= LEGACY_FOOTER_SIZE {
        let footer = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
        if let Some(offset) = try_parse(footer, 12) {
            return Some((offset, LEGACY_FOOTER_SIZE));
        }
    }
    None
}

/// Extracts `stargz.index.json` from the TOC's gzip member, refusing one over the size bound.
pub fn toc_json(layer: &Digest, compressed: &[u8]) -> Result<Vec<u8>, LayerError> {
    let gz = flate2::read::GzDecoder::new(compressed);
    let mut archive = tar::Archive::new(gz);
    let bad = |reason: String| LayerError::Undecodable {
        layer: layer.clone(),
        reason: format!("eStargz TOC: {reason}"),
    };
    let mut entries = archive.entries().map_err(|e| bad(e.to_string()))?;
    let mut entry = entries
        .next()
        .ok_or_else(|| bad("empty TOC archive".into()))?
        .map_err(|e| bad(e.to_string()))?;
    if entry.path_bytes().as_ref() != TOC_NAME {
        return Err(bad(format!(
            "expected {}, found {:?}",
            String::from_utf8_lossy(TOC_NAME),
            String::from_utf8_lossy(&entry.path_bytes())
        )));
    }
    if entry.size() > MAX_TOC_BYTES {
        return Err(bad(format!(
            "TOC is {} bytes, more than the limit of {MAX_TOC_BYTES}",
            entry.size()
        )));
    }
    // A tar header's size is a bound to check, not an allocation to make up front.
    let mut json = Vec::with_capacity(entry.size().min(1 << 20) as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| bad(e.to_string()))?;
    Ok(json)
}

pub async fn load(
    source: &dyn ImageSource,
    descriptor: &Descriptor,
    toc_digest: &Digest,
    disk: Option<&DiskCache>,
) -> Result<LayerIndex, LayerError> {
    let layer = &descriptor.digest;
    // Stored as the TOC offset (8 bytes, little endian) followed by the TOC JSON.
    let (toc_offset, json) = DiskCache::meta_or_fetch(
        disk,
        &format!("estargz-toc-{}", toc_digest.hex()),
        |stored| {
            let (offset, json) = stored.split_at_checked(8)?;
            (Digest::of(json) == *toc_digest).then(|| {
                (
                    u64::from_le_bytes(offset.try_into().expect("8 bytes")),
                    json.to_vec(),
                )
            })
        },
        || fetch_toc(source, descriptor, toc_digest),
        |(offset, json)| [&offset.to_le_bytes()[..], json].concat(),
    )
    .await?;
    index_from_json(layer, &json, toc_offset)
}

/// Finds the TOC through the footer, fetches it and checks it against `toc_digest`: its blob
/// offset and its JSON.
async fn fetch_toc(
    source: &dyn ImageSource,
    descriptor: &Descriptor,
    toc_digest: &Digest,
) -> Result<(u64, Vec<u8>), LayerError> {
    let layer = &descriptor.digest;
    let size = descriptor.size;
    if size < LEGACY_FOOTER_SIZE {
        return Err(LayerError::malformed(
            layer,
            format!("{size} bytes is too small for an eStargz layer"),
        ));
    }
    let tail_start = size.saturating_sub(tail_guess(size));
    let tail = source.read_range(layer, tail_start..size).await?;
    let (toc_offset, footer_size) = parse_footer(&tail).ok_or_else(|| {
        LayerError::malformed(
            layer,
            "annotated as eStargz but has no eStargz footer (the annotation or the blob is wrong)",
        )
    })?;
    let toc_end = size - footer_size;
    if toc_offset >= toc_end || toc_end - toc_offset > MAX_TOC_BYTES {
        return Err(LayerError::malformed(
            layer,
            format!("eStargz footer points at a TOC at {toc_offset}, outside the blob or too big"),
        ));
    }
    let compressed: Bytes = if toc_offset >= tail_start {
        tail.slice((toc_offset - tail_start) as usize..(toc_end - tail_start) as usize)
    } else {
        let head = source.read_range(layer, toc_offset..tail_start).await?;
        let mut all = BytesMut::with_capacity((toc_end - toc_offset) as usize);
        all.extend_from_slice(&head);
        all.extend_from_slice(&tail[..(toc_end - tail_start) as usize]);
        all.freeze()
    };
    let json = toc_json(layer, &compressed)?;
    let actual = Digest::of(&json);
    if actual != *toc_digest {
        return Err(LayerError::DigestMismatch {
            layer: layer.clone(),
            what: "eStargz TOC".into(),
            expected: toc_digest.clone(),
            actual,
        });
    }
    Ok((toc_offset, json))
}

/// Builds the index from a TOC already checked against its digest (public for the fuzzer).
pub fn index_from_json(
    layer: &Digest,
    json: &[u8],
    toc_offset: u64,
) -> Result<LayerIndex, LayerError> {
    if toc_offset == 0 {
        return Err(LayerError::malformed(layer, "eStargz TOC at offset 0"));
    }
    let converted = toc::convert(layer, toc::parse(layer, json)?, Codec::Gzip, toc_offset)?;
    Ok(LayerIndex {
        digest: layer.clone(),
        format: LayerFormat::Estargz,
        entries: converted.entries,
        prefetch_end: converted.prefetch_end,
        checkpoints: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footers() {
        // Footer as the eStargz writer emits it for a TOC at 0x20a2d8.
        let mut footer = vec![
            0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        footer.extend_from_slice(b"000000000020a2d8STARGZ");
        footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(footer.len(), 51);
        assert_eq!(parse_footer(&footer), Some((0x20a2d8, 51)));
        let mut legacy = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0];
        legacy.extend_from_slice(b"0000000000000400STARGZ");
        legacy.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_footer(&legacy), Some((0x400, 47)));
        assert_eq!(parse_footer(&[0u8; 51]), None);
        let mut bad_hex = footer.clone();
        bad_hex[16] = b'z';
        assert_eq!(parse_footer(&bad_hex), None);
    }
}

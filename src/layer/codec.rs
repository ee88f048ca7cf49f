//! Inflating one chunk's compressed span, whatever its [`Codec`]: the only place that knows how
//! each codec's bytes turn into a chunk's bytes.
//!
//! A chunk is `size` bytes found `skip` bytes into what its span inflates to (an eStargz or
//! zstd:chunked member may hold several chunks of one file; a gzip seek index span holds many
//! files). Nothing past the chunk is inflated. Errors are plain reasons: the caller knows the
//! layer and offset to name.

use std::io::Read;

use bytes::Bytes;

use super::Codec;
use super::gzip_index::{self, Checkpoints};

/// The `size` bytes at `skip` of what `compressed` inflates to. `checkpoints` are the layer's
/// gzip seek index checkpoints, needed only by [`Codec::Deflate`].
pub fn inflate(
    compressed: &Bytes,
    codec: Codec,
    checkpoints: Option<&Checkpoints>,
    skip: u64,
    size: u64,
) -> Result<Bytes, String> {
    let mut reader: Box<dyn Read + '_> = match codec {
        Codec::Identity => {
            let (from, to) = (skip as usize, (skip + size) as usize);
            if to > compressed.len() {
                return Err(format!(
                    "span holds {} bytes, the chunk needs {to}",
                    compressed.len()
                ));
            }
            return Ok(compressed.slice(from..to));
        }
        Codec::Deflate { checkpoint } => {
            let point = checkpoints
                .and_then(|points| points.get(checkpoint as usize))
                .ok_or_else(|| format!("no checkpoint {checkpoint} in the gzip index"))?;
            let data = gzip_index::inflate_from(point, compressed, (skip + size) as usize)
                .map_err(|e| e.to_string())?;
            return Ok(Bytes::from(data).slice(skip as usize..));
        }
        // One member holds the chunk; anything after it (the next entries' headers) is unused.
        Codec::Gzip => Box::new(flate2::read::GzDecoder::new(&compressed[..])),
        Codec::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(&compressed[..]).map_err(|e| e.to_string())?)
        }
    };
    std::io::copy(&mut reader.by_ref().take(skip), &mut std::io::sink())
        .map_err(|e| e.to_string())?;
    let mut out = vec![0u8; size as usize];
    reader
        .read_exact(&mut out)
        .map_err(|e| format!("{e} (wanted {size} bytes after skipping {skip})"))?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflate_checks_lengths() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, b"hello world").unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        assert_eq!(
            &inflate(&gz, Codec::Gzip, None, 6, 5).unwrap()[..],
            b"world"
        );
        assert!(inflate(&gz, Codec::Gzip, None, 6, 6).is_err());
        let zs = Bytes::from(zstd::encode_all(&b"hello world"[..], 3).unwrap());
        assert_eq!(
            &inflate(&zs, Codec::Zstd, None, 0, 5).unwrap()[..],
            b"hello"
        );
        assert!(inflate(&Bytes::from_static(b"junk"), Codec::Zstd, None, 0, 1).is_err());
        let raw = Bytes::from_static(b"plain");
        assert_eq!(
            &inflate(&raw, Codec::Identity, None, 1, 3).unwrap()[..],
            b"lai"
        );
        assert!(inflate(&raw, Codec::Identity, None, 1, 5).is_err());
        let deflate = Codec::Deflate { checkpoint: 0 };
        assert!(
            inflate(&raw, deflate, None, 0, 1)
                .unwrap_err()
                .contains("no checkpoint 0")
        );
    }
}

//! Inflating one chunk's compressed span, whatever its [`Codec`]: the only place that knows how
//! each codec's bytes turn into a chunk's bytes.
//!
//! A chunk is `size` bytes found `skip` bytes into what its span inflates to (an eStargz or
//! zstd:chunked member may hold several chunks of one file; a gzip seek index span holds many
//! files). Nothing past the chunk is inflated. Errors are plain reasons: the caller knows the
//! layer and offset to name.

use std::collections::HashMap;
use std::io::Read;

use bytes::Bytes;

use super::Codec;
use super::gzip_index::{self, Checkpoints, SpanInflater};

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

/// The chunks of one ranged request, inflated as its bytes arrive. Chunks
/// sharing a span (one gzip seek index span holds many files, one eStargz member may hold
/// several chunks) are inflated from it once: a gzip index span step by step, each chunk as
/// soon as the bytes up to its end are in; other spans whole, once their bytes are in.
pub struct RunInflater<'a> {
    checkpoints: Option<&'a Checkpoints>,
    /// Per span (by its first blob byte): how far into its output the request's chunks reach.
    wanted: HashMap<u64, u64>,
    /// Gzip index spans begun: the inflater and the blob offset it has been fed up to.
    deflating: HashMap<u64, (SpanInflater, u64)>,
    /// The last other span inflated, by first blob byte.
    whole: Option<(u64, Bytes)>,
}

impl<'a> RunInflater<'a> {
    /// `wanted`: for each span of the request, by first blob byte, how far into its output the
    /// request's chunks reach.
    pub fn new(checkpoints: Option<&'a Checkpoints>, wanted: HashMap<u64, u64>) -> Self {
        RunInflater {
            checkpoints,
            wanted,
            deflating: HashMap::new(),
            whole: None,
        }
    }

    /// Continues the gzip index span starting at blob offset `start` with `span`, an inflater
    /// kept from an earlier request; returns the blob offset the request must start at.
    pub fn resume(&mut self, start: u64, mut span: SpanInflater) -> u64 {
        let (consumed, _) = span.position();
        let wanted = self.wanted.get(&start).copied().unwrap_or_default();
        span.continue_to(wanted);
        self.deflating.insert(start, (span, start + consumed));
        start + consumed
    }

    /// The gzip index spans inflated, by blob offset where each starts, to keep for requests
    /// further into them.
    pub fn into_spans(self) -> impl Iterator<Item = (u64, SpanInflater)> {
        self.deflating
            .into_iter()
            .map(|(start, (span, _))| (start, span))
    }

    /// The `size` bytes at `skip` of the span `start..end`, whose bytes `received` holds (from
    /// blob offset `base` on, at least up to `end`).
    pub fn chunk(
        &mut self,
        received: &[u8],
        base: u64,
        (start, end): (u64, u64),
        codec: Codec,
        skip: u64,
        size: u64,
    ) -> Result<Bytes, String> {
        let wanted = self.wanted.get(&start).copied().unwrap_or(skip + size);
        let bytes = |from: u64| &received[(from - base) as usize..(end - base) as usize];
        if let Codec::Deflate { checkpoint } = codec {
            let (span, fed) = match self.deflating.entry(start) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let point = self
                        .checkpoints
                        .and_then(|points| points.get(checkpoint as usize))
                        .ok_or_else(|| format!("no checkpoint {checkpoint} in the gzip index"))?;
                    // Inflating stops at the end of the last chunk wanted: a later request
                    // resumes there, so the next file of the span is fetched then, whole.
                    let span = SpanInflater::new(point, wanted).map_err(|e| e.to_string())?;
                    e.insert((span, start))
                }
            };
            // Fed even without new bytes: zlib may hold bits of bytes it took that give more.
            let new = if end > *fed { bytes(*fed) } else { &[][..] };
            span.feed(new).map_err(|e| e.to_string())?;
            *fed = (*fed).max(end);
            return span
                .get(skip, size)
                .map(Bytes::copy_from_slice)
                .ok_or_else(|| {
                    format!(
                        "span gives {} bytes, {} wanted",
                        span.produced(),
                        skip + size
                    )
                });
        }
        if self.whole.as_ref().is_none_or(|(at, _)| *at != start) {
            let piece = Bytes::copy_from_slice(bytes(start));
            self.whole = Some((start, inflate(&piece, codec, self.checkpoints, 0, wanted)?));
        }
        let (_, data) = self.whole.as_ref().expect("inflated above");
        Ok(data.slice(skip as usize..(skip + size) as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflate_checks_lengths() {
        let gz = Bytes::from(crate::layer::gzip(b"hello world"));
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

//! The gzip seek index: its blob (zstd) or JSON straight, then inflating a span from each
//! checkpoint it accepted over fuzzer bytes; and building an index from a fuzzed gzip layer.
#![no_main]

use lazylayer::model::digest::Digest;
use lazylayer::layer::gzip_index;
use lazylayer::layer::{ChunkSource, Codec, EntryKind};
use lazylayer::model::oci::{Descriptor, MEDIA_OCI_LAYER_GZIP};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let layer = Descriptor::new(MEDIA_OCI_LAYER_GZIP, Digest::of(b"fuzz"), 1 << 20);
    match selector % 3 {
        0 => {
            let _ = gzip_index::parse(&layer, rest);
        }
        1 => {
            // Valid JSON reaches the span arithmetic; the span bytes are the fuzzer's too.
            let split = rest.len() / 2;
            let Ok(index) = gzip_index::parse_json(&layer, &rest[..split]) else {
                return;
            };
            let points = index.checkpoints.unwrap();
            for entry in &index.entries {
                let EntryKind::File { chunks, .. } = &entry.kind else {
                    continue;
                };
                for c in chunks.iter() {
                    if let ChunkSource::Compressed {
                        inner_offset,
                        codec: Codec::Deflate { checkpoint },
                        ..
                    } = c.source
                    {
                        let want = (inner_offset + c.size).min(1 << 20) as usize;
                        let _ = gzip_index::inflate_from(
                            &points[checkpoint as usize],
                            &rest[split..],
                            want,
                        );
                    }
                }
            }
        }
        _ => {
            let _ = gzip_index::build(rest, &Digest::of(rest), rest.len() as u64, None, 64 << 10);
        }
    }
});

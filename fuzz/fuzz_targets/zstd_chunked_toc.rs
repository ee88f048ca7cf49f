//! The zstd:chunked TOC: the manifest-position annotation, the zstd frame and the TOC JSON.
#![no_main]

use lazylayer::model::digest::Digest;
use lazylayer::layer::zstd_chunked;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layer = Digest::of(b"fuzz");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = zstd_chunked::parse_position(text);
    }
    // First 8 bytes: where chunk data ends; the rest: the compressed TOC. The uncompressed
    // size comes from the frame itself when it says, so the fuzzer can get past the length check.
    if data.len() < 8 {
        return;
    }
    let data_end = u64::from_le_bytes(data[..8].try_into().unwrap());
    let compressed = &data[8..];
    let uncompressed = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten()
        .unwrap_or(compressed.len() as u64);
    let _ = zstd_chunked::index_from_toc(&layer, compressed, uncompressed, data_end);
    // Plain JSON straight into the TOC reader, compressed here, to explore the JSON side fast.
    if let Ok(frame) = zstd::encode_all(compressed, 1) {
        let _ = zstd_chunked::index_from_toc(&layer, &frame, compressed.len() as u64, data_end);
    }
});

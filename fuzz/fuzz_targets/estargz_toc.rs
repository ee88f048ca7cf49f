//! The eStargz footer, the TOC's tar+gzip member and the TOC JSON, each from fuzzer bytes.
#![no_main]

use lazylayer::model::digest::Digest;
use lazylayer::layer::estargz;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layer = Digest::of(b"fuzz");
    let toc_offset = estargz::parse_footer(data).map_or(1, |(offset, _)| offset.max(1));
    // A well-formed member reaches the JSON parser with what it unpacked; raw bytes reach it
    // directly, so the fuzzer need not learn gzip and tar to explore the JSON side.
    if let Ok(json) = estargz::toc_json(&layer, data) {
        let _ = estargz::index_from_json(&layer, &json, toc_offset);
    }
    let _ = estargz::index_from_json(&layer, data, toc_offset);
});

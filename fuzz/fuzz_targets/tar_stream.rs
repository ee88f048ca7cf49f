//! The streaming tar reader of index-less layers: tar headers (ustar, GNU, PAX), long names,
//! whiteouts, hard links, inside gzip or zstd or bare.
#![no_main]

use lazylayer::model::digest::Digest;
use lazylayer::layer::tar_stream::{self, Ignore};
use lazylayer::model::oci::LayerCompression;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, blob)) = data.split_first() else {
        return;
    };
    let compression = match selector % 3 {
        0 => LayerCompression::None,
        1 => LayerCompression::Gzip,
        _ => LayerCompression::Zstd,
    };
    // The digest is the blob's own, so a well-formed archive is indexed to the end.
    let digest = Digest::of(blob);
    let _ = tar_stream::index_reader(blob, &digest, blob.len() as u64, None, compression, &Ignore);
});

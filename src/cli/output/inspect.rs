//! `lazylayer inspect`: what an image is made of, and whether each layer can be read lazily.
//!
//! The report is one serde struct, printed either as JSON (`--json`, stable field names for
//! scripts) or as an aligned table for people. Nothing here fetches layer bytes.

use std::fmt::Write as _;

use serde::Serialize;

use crate::model::digest::Digest;
use crate::model::oci::{LayerCompression, LazyIndex};
use crate::source::image::ResolvedImage;

#[derive(Debug, Serialize)]
pub struct InspectReport {
    /// The reference as given, normalised.
    pub reference: String,
    /// Digest of the index the reference named, when it named one.
    pub index_digest: Option<Digest>,
    /// Platforms the index offered.
    pub index_platforms: Vec<String>,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub platform: String,
    pub config_digest: Digest,
    pub compressed_size: u64,
    pub layers: Vec<LayerReport>,
    /// The start-up profile published next to the image (`lazylayer profile push`): its
    /// artifact's digest, or `null`.
    pub published_profile: Option<Digest>,
}

#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub diff_id: Digest,
    /// `none`, `gzip` or `zstd`; absent when the media type is not a layer type we read.
    pub compression: Option<LayerCompression>,
    /// The lazy index the layer carries; `null` for a plain layer.
    pub lazy_index: Option<LazyIndex>,
    /// The layer descriptor's annotations, as the manifest has them.
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl InspectReport {
    pub fn new(reference: String, image: &ResolvedImage) -> InspectReport {
        let outer = image.indexes.first();
        InspectReport {
            reference,
            index_digest: outer.map(|i| i.digest.clone()),
            index_platforms: outer
                .map(|i| i.platforms.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            manifest_digest: image.manifest_digest.clone(),
            manifest_media_type: image.manifest_media_type.clone(),
            platform: image.platform.to_string(),
            config_digest: image.manifest.config.digest.clone(),
            compressed_size: image.compressed_size(),
            layers: image
                .layers
                .iter()
                .map(|l| LayerReport {
                    digest: l.descriptor.digest.clone(),
                    media_type: l.descriptor.media_type.clone(),
                    size: l.descriptor.size,
                    diff_id: l.diff_id.clone(),
                    compression: l.compression().ok(),
                    lazy_index: l.lazy_index.clone(),
                    annotations: l.descriptor.annotations.clone(),
                })
                .collect(),
            published_profile: image.profile.as_ref().map(|p| p.digest.clone()),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "image      {}", self.reference);
        if let Some(index) = &self.index_digest {
            let _ = writeln!(
                out,
                "index      {index} (platforms: {})",
                self.index_platforms.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "manifest   {} ({})",
            self.manifest_digest, self.manifest_media_type
        );
        let _ = writeln!(out, "platform   {}", self.platform);
        let _ = writeln!(out, "config     {}", self.config_digest);
        if let Some(profile) = &self.published_profile {
            let _ = writeln!(out, "profile    {profile} (published start-up profile)");
        }
        let _ = writeln!(
            out,
            "layers     {}, {} compressed\n",
            self.layers.len(),
            human_bytes(self.compressed_size)
        );
        let rows: Vec<[String; 5]> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let lazy = match &l.lazy_index {
                    None if l.compression.is_none() => "unsupported media type".to_string(),
                    None => "none".to_string(),
                    Some(LazyIndex::Estargz { toc_digest }) => {
                        format!("estargz (toc {})", toc_digest.short())
                    }
                    Some(z @ LazyIndex::ZstdChunked { .. }) => z.kind().to_string(),
                    Some(LazyIndex::GzipIndex { index }) => {
                        format!("gzip index (artifact blob {})", index.digest.short())
                    }
                };
                [
                    (i + 1).to_string(),
                    l.digest.to_string(),
                    l.media_type.clone(),
                    human_bytes(l.size),
                    lazy,
                ]
            })
            .collect();
        let header = ["#", "DIGEST", "MEDIA TYPE", "SIZE", "LAZY INDEX"].map(String::from);
        let mut widths = [0usize; 5];
        for row in std::iter::once(&header).chain(&rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        out
    }
}

/// Sizes in decimal units, as registries and `docker images` print them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_bytes_uses_decimal_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(51_094_365), "51.1 MB");
        assert_eq!(human_bytes(2_136_473), "2.1 MB");
    }
}

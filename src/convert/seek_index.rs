//! `lazylayer index`: make an image lazy without rebuilding it, by publishing gzip seek indexes
//! next to it (the idea of AWS SOCI).
//!
//! Every plain gzip layer of the image is streamed once and indexed
//! ([`crate::layer::gzip_index::build`]); the indexes are pushed as the layers of one OCI artifact
//! manifest (`artifactType` [`GZIP_INDEX_ARTIFACT_TYPE`], empty config, each blob annotated with the digest
//! of the layer it indexes) whose `subject` is the image manifest. The image itself is not
//! touched: its digest, signatures and every client that pulls it are unaffected. Mounts find the
//! artifact through the referrers API, or through the `sha256-HEX` fallback tag that is kept here
//! for registries without that API (distribution 2.8).
//!
//! Layers that are already lazy (eStargz, zstd:chunked) or not gzip are left alone. Running it
//! again gives the same blobs and the same artifact (the index is deterministic), so publishing
//! twice adds nothing.

use std::sync::Arc;

use super::{ConvertError, Progress};
use crate::layer::gzip_index;
use crate::model::digest::Digest;
use crate::model::oci::{
    ANNOTATION_GZIP_INDEX_LAYER, GZIP_INDEX_ARTIFACT_TYPE, MEDIA_GZIP_INDEX_BLOB,
};
use crate::model::oci::{Descriptor, LayerCompression, LazyIndex, Platform};
use crate::model::reference::ImageRef;
use crate::source::config::FetchConfig;
use crate::source::open::{OpenedImage, open_image};

/// What `index` published.
pub struct Published {
    /// The artifact manifest's digest, or `None` when no layer needed an index.
    pub artifact: Option<Digest>,
    /// (layer, index blob) for every layer indexed.
    pub indexed: Vec<(Descriptor, Descriptor)>,
    /// Layers left alone, and why.
    pub skipped: Vec<(Descriptor, &'static str)>,
}

/// Builds seek indexes for the gzip layers of `reference` (a registry image) and publishes them
/// as a referrer of its manifest. `span`: uncompressed bytes between checkpoints.
pub async fn index(
    reference: &str,
    registry: &FetchConfig,
    platform: &Platform,
    span: u64,
    progress: Arc<dyn Progress>,
) -> Result<Published, ConvertError> {
    let parsed = ImageRef::parse(reference)?;
    let ImageRef::Registry(target) = &parsed else {
        return Err(ConvertError::Output(format!(
            "{reference}: `index` publishes next to an image in a registry; for an OCI layout or \
             S3 use `lazylayer convert` to write a lazy copy instead"
        )));
    };
    let OpenedImage { source, image, .. } =
        open_image(&parsed, None, registry, platform, None).await?;
    let count = image.layers.len();
    let why_not =
        |layer: &crate::source::image::Layer| match (&layer.lazy_index, layer.compression().ok()) {
            (Some(LazyIndex::Estargz { .. } | LazyIndex::ZstdChunked { .. }), _) => {
                Some("already lazy (it has a TOC)")
            }
            (_, Some(LayerCompression::Gzip)) => None,
            _ => Some("not gzip"),
        };
    let failed = |e: crate::source::registry::RegistryError| {
        ConvertError::Output(format!("publishing the index of {reference}: {e}"))
    };
    let repository =
        crate::source::registry::Repository::for_push(target, registry).map_err(failed)?;
    // Reading every gzip layer takes minutes: a refused push is found out first.
    if image.layers.iter().any(|l| why_not(l).is_none()) {
        repository.check_push_access().await.map_err(failed)?;
    }
    let mut indexed = Vec::new();
    let mut skipped = Vec::new();
    for (i, layer) in image.layers.iter().enumerate() {
        if let Some(why) = why_not(layer) {
            skipped.push((layer.descriptor.clone(), why));
            continue;
        }
        progress.layer_started(i, count, &layer.descriptor);
        let blob = gzip_index::build_from(source.clone(), layer, span).await?;
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(
            ANNOTATION_GZIP_INDEX_LAYER.to_string(),
            layer.descriptor.digest.to_string(),
        );
        let descriptor = Descriptor {
            annotations,
            ..Descriptor::of(MEDIA_GZIP_INDEX_BLOB, &blob)
        };
        progress.layer_done(i, count, &layer.descriptor, &descriptor);
        indexed.push((layer.descriptor.clone(), descriptor, blob));
    }
    if indexed.is_empty() {
        return Ok(Published {
            artifact: None,
            indexed: Vec::new(),
            skipped,
        });
    }

    let subject = Descriptor::new(
        image.manifest_media_type.clone(),
        image.manifest_digest.clone(),
        image.manifest_size,
    );
    let blobs: Vec<_> = indexed
        .iter()
        .map(|(_, d, blob)| (d.clone(), bytes::Bytes::from(blob.clone())))
        .collect();
    let referrer = repository
        .publish_artifact(
            &subject,
            GZIP_INDEX_ARTIFACT_TYPE,
            &blobs,
            Default::default(),
        )
        .await
        .map_err(failed)?;
    Ok(Published {
        artifact: Some(referrer.digest),
        indexed: indexed.into_iter().map(|(l, d, _)| (l, d)).collect(),
        skipped,
    })
}

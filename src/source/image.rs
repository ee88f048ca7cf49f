//! Resolving a reference to one runnable image: manifest, config and layers.
//!
//! A tag may name an index (multi-platform image); it is resolved to the entry for the wanted
//! platform, as `docker pull` does, and the choice is recorded so that `inspect` can say which of
//! the offered platforms was taken. Nested indexes are followed a few levels deep (some tools emit
//! an index of indexes); deeper nesting is treated as hostile.
//!
//! Resolution costs one manifest request per level plus one config request: the minimum the
//! format allows, since the layer list lives in the manifest and the diff IDs in the config.

use bytes::Bytes;

use crate::model::digest::Digest;
use crate::model::oci::{
    Descriptor, FetchedManifest, ImageConfig, ImageManifest, LayerCompression, LazyIndex,
    MAX_CONFIG_BYTES, Manifest, ManifestError, Platform,
};
use crate::model::reference::ManifestSelector;
use crate::source::{ImageSource, SourceError};

/// Indexes nested deeper than this are refused (real images use at most two levels).
const MAX_INDEX_DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("image {image}: {what} {digest} is malformed: {source}")]
    Malformed {
        image: String,
        what: &'static str,
        digest: Digest,
        source: ManifestError,
    },
    #[error(
        "image {image} has no manifest for platform {wanted}; it offers: {} (choose one with --platform)",
        if available.is_empty() { "none".to_string() } else { available.join(", ") }
    )]
    NoMatchingPlatform {
        image: String,
        wanted: Platform,
        available: Vec<String>,
    },
    #[error("image {image}: {reason}")]
    Inconsistent { image: String, reason: String },
}

/// An index that was resolved to one of its entries.
#[derive(Clone, Debug)]
pub struct ResolvedIndex {
    pub digest: Digest,
    /// Platforms the index offered, in its order.
    pub platforms: Vec<Platform>,
}

/// A layer of a resolved image.
#[derive(Clone, Debug)]
pub struct Layer {
    pub descriptor: Descriptor,
    /// Digest of the uncompressed tar (from the config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    pub lazy_index: Option<LazyIndex>,
}

impl Layer {
    pub fn compression(&self) -> Result<LayerCompression, ManifestError> {
        LayerCompression::from_media_type(&self.descriptor.media_type)
    }
}

/// One image, resolved to a single platform, with everything needed to read its layers.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The source's name, for messages.
    pub source: String,
    /// The index the reference pointed to, outermost first, when it pointed to one.
    pub indexes: Vec<ResolvedIndex>,
    pub manifest_digest: Digest,
    /// Length of the manifest's bytes (what a descriptor of it says).
    pub manifest_size: u64,
    pub manifest_media_type: String,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
    /// The manifest and config as fetched (verified against their digests), for a caller that
    /// stores them (`lazylayer pull` writes them to containerd's content store).
    pub manifest_bytes: Bytes,
    pub config_bytes: Bytes,
    /// The platform the image is for: the matched index entry's, else the config's.
    pub platform: Platform,
    pub layers: Vec<Layer>,
    /// The newest start-up profile published as a referrer of the manifest (`lazylayer profile
    /// push`): its artifact manifest's descriptor, read when the image is mounted.
    pub profile: Option<Descriptor>,
}

impl ResolvedImage {
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.descriptor.size).sum()
    }

    /// What this image was resolved from, for [`resolved_from`] to rebuild it elsewhere
    /// without asking the source again.
    pub fn resolution(&self) -> Resolution {
        let gzip_indexes = self
            .layers
            .iter()
            .filter(|l| unindexed_gzip(&l.descriptor))
            .filter_map(|l| match &l.lazy_index {
                Some(LazyIndex::GzipIndex { index }) => {
                    Some((l.descriptor.digest.clone(), index.clone()))
                }
                _ => None,
            })
            .collect();
        Resolution {
            manifest: FetchedManifest {
                bytes: self.manifest_bytes.clone(),
                media_type: Some(self.manifest_media_type.clone()),
                digest: self.manifest_digest.clone(),
            },
            config: self.config_bytes.clone(),
            published: Published {
                gzip_indexes,
                profile: self.profile.clone(),
            },
        }
    }
}

/// Resolves `selector` in `source` to the image for `platform`.
pub async fn resolve(
    source: &dyn ImageSource,
    selector: &ManifestSelector,
    platform: &Platform,
) -> Result<ResolvedImage, ImageError> {
    let image = source.name();
    let malformed = |what, digest: &Digest, source| ImageError::Malformed {
        image: image.clone(),
        what,
        digest: digest.clone(),
        source,
    };
    let mut indexes = Vec::new();
    let mut chosen_platform = None;
    let mut selector = selector.clone();
    let (fetched, manifest) = loop {
        let fetched = source.manifest(&selector).await?;
        let parsed = Manifest::parse(&fetched.bytes, fetched.media_type.as_deref())
            .map_err(|e| malformed("manifest", &fetched.digest, e))?;
        let index = match parsed {
            Manifest::Image(m) => break (fetched, *m),
            Manifest::Index(index) => index,
        };
        if indexes.len() >= MAX_INDEX_DEPTH {
            return Err(ImageError::Inconsistent {
                image,
                reason: format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
            });
        }
        let platforms: Vec<Platform> = index
            .manifests
            .iter()
            .filter_map(|d| d.platform.clone())
            .collect();
        let entry = index
            .manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .or(match index.manifests.as_slice() {
                // A single entry without a platform (an OCI layout's index, or a nested index)
                // is simply "the" image.
                [only] if only.platform.is_none() => Some(only),
                _ => None,
            })
            .ok_or_else(|| ImageError::NoMatchingPlatform {
                image: image.clone(),
                wanted: platform.clone(),
                available: platforms.iter().map(ToString::to_string).collect(),
            })?;
        if entry.platform.is_some() {
            chosen_platform = entry.platform.clone().map(Platform::normalized);
        }
        selector = ManifestSelector::Digest(entry.digest.clone());
        indexes.push(ResolvedIndex {
            digest: fetched.digest,
            platforms,
        });
    };
    // The config and the referrers (seek indexes, a start-up profile) each depend on the
    // manifest only: one round trip for both.
    let wants_indexes = manifest.layers.iter().any(unindexed_gzip);
    let lookup = tokio::time::timeout(
        REFERRERS_WAIT,
        find_published(source, &fetched.digest, wants_indexes),
    );
    let (config_bytes, published) =
        tokio::join!(source.blob(&manifest.config, MAX_CONFIG_BYTES), lookup);
    let config_bytes = config_bytes?;
    // The layers still read correctly without their seek indexes (streamed whole), and a start
    // without its profile is only slower.
    let published = match published {
        Ok(Ok(published)) => published,
        Ok(Err(e)) => {
            tracing::warn!(%image, "looking for seek indexes and a start-up profile: {e}");
            Published::default()
        }
        Err(_) => {
            tracing::warn!(
                %image,
                "looking for seek indexes and a start-up profile: no answer within {} s; going \
                 on without them",
                REFERRERS_WAIT.as_secs()
            );
            Published::default()
        }
    };
    let parts = Resolution {
        manifest: fetched,
        config: config_bytes,
        published,
    };
    assemble(image, indexes, chosen_platform, manifest, parts, platform)
}

/// What a resolution fetched, before it is checked and put together: enough to rebuild the
/// [`ResolvedImage`] without the source (`lazylayer pull` hands it to the snapshotter, see
/// [`ResolvedImage::resolution`]).
#[derive(Clone, Debug)]
pub struct Resolution {
    pub manifest: FetchedManifest,
    pub config: Bytes,
    pub published: Published,
}

/// The image of a resolution made elsewhere, checked as [`resolve`] checks what it fetched: the
/// manifest must have the digest `pin` and the config the digest the manifest gives it.
pub fn resolved_from(
    image: String,
    pin: &Digest,
    parts: Resolution,
    platform: &Platform,
) -> Result<ResolvedImage, ImageError> {
    let inconsistent = |reason: String| ImageError::Inconsistent {
        image: image.clone(),
        reason,
    };
    if Digest::of(&parts.manifest.bytes) != *pin {
        return Err(inconsistent(format!(
            "the manifest handed over is not {pin}"
        )));
    }
    let manifest =
        match Manifest::parse(&parts.manifest.bytes, parts.manifest.media_type.as_deref()) {
            Ok(Manifest::Image(m)) => *m,
            Ok(Manifest::Index(_)) => {
                return Err(inconsistent(format!(
                    "{pin} is an index, not an image manifest"
                )));
            }
            Err(e) => {
                return Err(ImageError::Malformed {
                    image,
                    what: "manifest",
                    digest: pin.clone(),
                    source: e,
                });
            }
        };
    if Digest::of(&parts.config) != manifest.config.digest {
        return Err(inconsistent(format!(
            "the config handed over is not {}",
            manifest.config.digest
        )));
    }
    assemble(image, Vec::new(), None, manifest, parts, platform)
}

/// A gzip layer with no lazy index of its own: a published seek index can make it lazy.
fn unindexed_gzip(d: &Descriptor) -> bool {
    matches!(LazyIndex::of(d), Ok(None))
        && LayerCompression::from_media_type(&d.media_type).ok() == Some(LayerCompression::Gzip)
}

/// Checks a fetched manifest and config against each other and the platform, and puts the
/// image together.
fn assemble(
    image: String,
    indexes: Vec<ResolvedIndex>,
    chosen_platform: Option<Platform>,
    manifest: ImageManifest,
    parts: Resolution,
    platform: &Platform,
) -> Result<ResolvedImage, ImageError> {
    let Resolution {
        manifest: fetched,
        config: config_bytes,
        published,
    } = parts;
    let malformed = |what, digest: &Digest, source| ImageError::Malformed {
        image: image.clone(),
        what,
        digest: digest.clone(),
        source,
    };
    let manifest_media_type = manifest
        .media_type
        .clone()
        .or(fetched.media_type.clone())
        .unwrap_or_else(|| crate::model::oci::MEDIA_OCI_MANIFEST.to_string());
    let config = ImageConfig::parse(&config_bytes)
        .map_err(|e| malformed("config", &manifest.config.digest, e))?;
    // A manifest reached without an index says its platform in its config only; containerd
    // refuses one that is not the platform asked for, and so do we, rather than hand a linux/amd64
    // tree to someone who asked for windows/arm. Configs that leave the platform (or its variant)
    // out are taken as they are.
    let mut offered = config.platform();
    if offered.variant.is_none() {
        offered.variant.clone_from(&platform.variant);
    }
    let unstated = config.os.is_empty() || config.architecture.is_empty();
    if chosen_platform.is_none() && !unstated && !platform.matches(&offered) {
        return Err(ImageError::NoMatchingPlatform {
            image,
            wanted: platform.clone(),
            available: vec![config.platform().normalized().to_string()],
        });
    }
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::Inconsistent {
            image,
            reason: format!(
                "manifest {} lists {} layers but its config lists {} diff_ids",
                fetched.digest,
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        });
    }
    let mut layers = manifest
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .map(|(descriptor, diff_id)| {
            let lazy_index =
                LazyIndex::of(descriptor).map_err(|e| malformed("manifest", &fetched.digest, e))?;
            Ok(Layer {
                descriptor: descriptor.clone(),
                diff_id: diff_id.clone(),
                lazy_index,
            })
        })
        .collect::<Result<Vec<Layer>, ImageError>>()?;
    for layer in layers.iter_mut().filter(|l| unindexed_gzip(&l.descriptor)) {
        if let Some(index) = published.gzip_indexes.get(&layer.descriptor.digest) {
            layer.lazy_index = Some(LazyIndex::GzipIndex {
                index: index.clone(),
            });
        }
    }
    Ok(ResolvedImage {
        source: image,
        indexes,
        manifest_size: fetched.bytes.len() as u64,
        manifest_bytes: fetched.bytes.clone(),
        config_bytes,
        manifest_digest: fetched.digest,
        manifest_media_type,
        platform: chosen_platform.unwrap_or_else(|| config.platform().normalized()),
        manifest,
        config,
        layers,
        profile: published.profile,
    })
}

/// How long the referrers lookup may hold up a resolution: a registry answers it in a round
/// trip or two (404 included); one that has not in 10 s is left behind, and the image is read
/// without seek indexes or profile rather than not at all. Longer than the disk cache's
/// `UNREACHABLE_AFTER`, so that referrers remembered there are used first.
const REFERRERS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What was published next to an image manifest for lazylayer.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// Gzip seek index blobs (by `lazylayer index`), by the digest of the layer each indexes.
    #[serde(default, skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub gzip_indexes: std::collections::HashMap<Digest, Descriptor>,
    /// The newest start-up profile artifact (by `lazylayer profile push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Descriptor>,
}

/// The referrers of `manifest`, in one lookup: its start-up profile and, when `want_indexes`,
/// its gzip seek indexes. Later artifacts win over earlier ones.
async fn find_published(
    source: &dyn ImageSource,
    manifest: &Digest,
    want_indexes: bool,
) -> Result<Published, ImageError> {
    use crate::model::oci::{
        ANNOTATION_CREATED, ANNOTATION_GZIP_INDEX_LAYER as ANNOTATION_LAYER,
        GZIP_INDEX_ARTIFACT_TYPE, MEDIA_GZIP_INDEX_BLOB as MEDIA_INDEX_BLOB, PROFILE_ARTIFACT_TYPE,
    };
    let types: &[&str] = match want_indexes {
        true => &[GZIP_INDEX_ARTIFACT_TYPE, PROFILE_ARTIFACT_TYPE],
        false => &[PROFILE_ARTIFACT_TYPE],
    };
    let mut found = Published::default();
    for referrer in source.referrers(manifest, types).await? {
        if referrer.artifact_type.as_deref() == Some(PROFILE_ARTIFACT_TYPE) {
            // RFC 3339 times in UTC, as `profile push` writes them, sort as text.
            let created = |d: &Descriptor| d.annotations.get(ANNOTATION_CREATED).cloned();
            if found
                .profile
                .as_ref()
                .is_none_or(|p| created(p) <= created(&referrer))
            {
                found.profile = Some(referrer);
            }
            continue;
        }
        let fetched = source
            .manifest(&ManifestSelector::Digest(referrer.digest.clone()))
            .await?;
        let Ok(Manifest::Image(artifact)) =
            Manifest::parse(&fetched.bytes, fetched.media_type.as_deref())
        else {
            continue;
        };
        let ours = artifact.artifact_type.as_deref() == Some(GZIP_INDEX_ARTIFACT_TYPE)
            && artifact
                .subject
                .as_ref()
                .is_some_and(|s| s.digest == *manifest);
        if !ours {
            continue;
        }
        for blob in artifact.layers {
            let layer = blob
                .annotations
                .get(ANNOTATION_LAYER)
                .and_then(|d| d.parse::<Digest>().ok());
            if let (Some(layer), true) = (layer, blob.media_type == MEDIA_INDEX_BLOB) {
                found.gzip_indexes.insert(layer, blob);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"CONFIG","size":SIZE},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":100}]}"#;
    const CONFIG: &str = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:2222222222222222222222222222222222222222222222222222222222222222"]}}"#;

    fn handed(manifest: &str, config: &str, published: Published) -> Resolution {
        let manifest = Bytes::from(manifest.to_string());
        Resolution {
            manifest: FetchedManifest {
                digest: Digest::of(&manifest),
                bytes: manifest,
                media_type: None,
            },
            config: Bytes::from(config.to_string()),
            published,
        }
    }

    #[test]
    fn a_resolution_handed_over_rebuilds_the_image_and_is_checked_by_digest() {
        let manifest = MANIFEST
            .replace("CONFIG", &Digest::of(CONFIG.as_bytes()).to_string())
            .replace("SIZE", &CONFIG.len().to_string());
        let pin = Digest::of(manifest.as_bytes());
        let layer: Digest = format!("sha256:{}", "1".repeat(64)).parse().unwrap();
        let index = Descriptor::new("application/x-index", Digest::of(b"index"), 5);
        let profile = Descriptor::new("application/x-profile", Digest::of(b"profile"), 7);
        let published = Published {
            gzip_indexes: [(layer.clone(), index.clone())].into(),
            profile: Some(profile.clone()),
        };
        let platform = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        };
        let image = resolved_from(
            "reg/app".into(),
            &pin,
            handed(&manifest, CONFIG, published),
            &platform,
        )
        .unwrap();
        assert_eq!(image.manifest_digest, pin);
        assert_eq!(image.profile, Some(profile));
        assert!(matches!(
            &image.layers[0].lazy_index,
            Some(LazyIndex::GzipIndex { index: i }) if *i == index
        ));
        // What the image hands on rebuilds the same image.
        let again = resolved_from("reg/app".into(), &pin, image.resolution(), &platform).unwrap();
        assert_eq!(again.manifest_bytes, image.manifest_bytes);
        assert_eq!(again.config_bytes, image.config_bytes);
        assert_eq!(again.profile, image.profile);
        assert_eq!(again.layers[0].lazy_index, image.layers[0].lazy_index);

        // Another manifest than the one containerd names, or a config that is not the manifest's.
        let other = Digest::of(b"another manifest");
        let wrong_pin = resolved_from("reg/app".into(), &other, image.resolution(), &platform);
        assert!(
            matches!(wrong_pin, Err(ImageError::Inconsistent { .. })),
            "{wrong_pin:?}"
        );
        let tampered = CONFIG.replace("amd64", "arm64");
        let bad_config = handed(&manifest, &tampered, Published::default());
        let refused = resolved_from("reg/app".into(), &pin, bad_config, &platform);
        assert!(
            matches!(&refused, Err(ImageError::Inconsistent { reason, .. }) if reason.contains("config")),
            "{refused:?}"
        );
    }
}

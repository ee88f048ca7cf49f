//! The OCI / Docker image model: descriptors, manifests, indexes, configs and platforms.
//!
//! Registries serve four manifest shapes that mean two things: an image manifest (OCI
//! `application/vnd.oci.image.manifest.v1+json`, Docker schema 2) and a list of per-platform
//! manifests (OCI index, Docker manifest list). They share JSON field names, so one set of serde
//! types parses both; the media type decides which it is. Docker schema 1 is not supported (it is
//! deprecated and registries convert on the fly when asked with the right `Accept`).
//!
//! Parsing is strict where a wrong answer would be served later (digests, sizes, media types) and
//! lenient about fields we do not use, so that annotations or new optional fields from newer
//! writers do not break reading.
//!
//! Layers are classified here once ([`LayerCompression`], [`LazyIndex`]) so that later stages
//! (formats, mount, snapshotter) match on enums instead of re-reading strings.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::model::digest::Digest;

/// `artifactType` of a gzip seek index artifact's manifest (the referrers API filters on it).
pub const GZIP_INDEX_ARTIFACT_TYPE: &str = "application/vnd.lazylayer.gzip-index.v1";
/// Media type of one layer's gzip seek index blob (`layer::gzip_index`): JSON, zstd-compressed.
pub const MEDIA_GZIP_INDEX_BLOB: &str = "application/vnd.lazylayer.gzip-index.v1+json+zstd";
/// Annotation on each seek index blob's descriptor: the digest of the layer it indexes.
pub const ANNOTATION_GZIP_INDEX_LAYER: &str = "dev.lazylayer.gzip-index.layer";
/// `artifactType` of a published start-up profile's manifest (`lazylayer profile push`).
pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.lazylayer.profile.v1";
/// Media type of the profile blob in it: the JSON of `fs::profile::Profile`.
pub const MEDIA_PROFILE_BLOB: &str = "application/vnd.lazylayer.profile.v1+json";
/// Media type of the optional second blob of a published profile: the bytes its files' chunks
/// hold, zstd-compressed (`fs::profile_pack`).
pub const MEDIA_PROFILE_PACK: &str = "application/vnd.lazylayer.profile.pack.v1+zstd";
/// Annotation on a published profile's manifest (and so on its referrers entry): when it was
/// pushed, RFC 3339 in UTC. Of several, the newest is used.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `Accept` list for manifest requests: every shape we can read, images first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Annotation with the eStargz TOC digest (stargz-snapshotter's name).
pub const ANNOTATION_ESTARGZ_TOC: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Annotation with the uncompressed size of an eStargz layer.
pub const ANNOTATION_ESTARGZ_UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
/// zstd:chunked TOC checksum and position, as containers/storage writes them.
pub const ANNOTATION_ZSTD_CHUNKED_CHECKSUM: &str =
    "io.github.containers.zstd-chunked.manifest-checksum";
pub const ANNOTATION_ZSTD_CHUNKED_POSITION: &str =
    "io.github.containers.zstd-chunked.manifest-position";
/// Older spellings without `github.` seen in some documents; accepted as aliases.
const ANNOTATION_ZSTD_CHUNKED_CHECKSUM_ALT: &str = "io.containers.zstd-chunked.manifest-checksum";
const ANNOTATION_ZSTD_CHUNKED_POSITION_ALT: &str = "io.containers.zstd-chunked.manifest-position";
/// Tag name of an entry in an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest manifest or index we accept. containerd uses 4 MiB; a manifest is a few KiB even for
/// hundreds of layers, so anything bigger is hostile or broken.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest image config we accept (history and env of big images stay well under 1 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// A content descriptor: what a manifest says about a blob it references.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// What an artifact manifest is (entries of a referrers index carry it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A descriptor of `size` bytes with digest `digest`, nothing else set.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
            artifact_type: None,
        }
    }

    /// A descriptor of `bytes`.
    pub fn of(media_type: impl Into<String>, bytes: &[u8]) -> Descriptor {
        Descriptor::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Set on artifact manifests (OCI 1.1), such as a gzip seek index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI index or Docker manifest list.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Looking images up in the `index.json` of an OCI image layout (on disk or in a bucket).
impl ImageIndex {
    /// The tags (`org.opencontainers.image.ref.name`) of the layout's entries.
    pub fn tags(&self) -> Vec<String> {
        self.manifests
            .iter()
            .filter_map(|d| d.annotations.get(ANNOTATION_REF_NAME).cloned())
            .collect()
    }

    pub fn entry_for_tag(&self, tag: &str) -> Option<&Descriptor> {
        self.manifests
            .iter()
            .find(|d| d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(tag))
    }

    /// The manifest digest `selector` names and its entry in the index, if it has one (a digest
    /// may name a manifest the index does not list). `None` for a tag the index lacks.
    pub fn lookup(
        &self,
        selector: &crate::model::reference::ManifestSelector,
    ) -> Option<(Digest, Option<&Descriptor>)> {
        use crate::model::reference::ManifestSelector;
        match selector {
            ManifestSelector::Digest(d) => {
                Some((d.clone(), self.manifests.iter().find(|m| &m.digest == d)))
            }
            ManifestSelector::Tag(t) => {
                let entry = self.entry_for_tag(t)?;
                Some((entry.digest.clone(), Some(entry)))
            }
        }
    }

    /// Which manifest a reference means: its digest, its tag, or the only entry. `Err` carries
    /// the number of entries when there are several and the reference names none.
    pub fn select(
        &self,
        tag: Option<&str>,
        digest: Option<&Digest>,
    ) -> Result<crate::model::reference::ManifestSelector, usize> {
        use crate::model::reference::ManifestSelector;
        match (digest, tag) {
            (Some(d), _) => Ok(ManifestSelector::Digest(d.clone())),
            (None, Some(t)) => Ok(ManifestSelector::Tag(t.to_string())),
            (None, None) => match self.manifests.as_slice() {
                [only] => Ok(ManifestSelector::Digest(only.digest.clone())),
                many => Err(many.len()),
            },
        }
    }
}

/// The parts of an image config that lazylayer reads. Everything else is kept by digest, not
/// parsed, so unknown fields are fine.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
    pub rootfs: RootFs,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

/// A manifest as fetched, parsed by what its media type says it is.
#[derive(Clone, Debug)]
pub enum Manifest {
    Image(Box<ImageManifest>),
    Index(ImageIndex),
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "unsupported manifest media type `{0}` (lazylayer reads OCI and Docker schema 2 manifests and indexes)"
    )]
    UnsupportedMediaType(String),
    #[error("malformed {what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("malformed {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

impl Manifest {
    /// Parses manifest bytes. `content_type` is what the server said (may be absent or generic,
    /// as with files in an OCI layout); the `mediaType` field inside the JSON decides when it is
    /// set, and the presence of `manifests` vs `layers` when neither says.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            schema_version: Option<u32>,
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
            layers: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
            what: "manifest",
            source,
        })?;
        let declared = probe
            .media_type
            .as_deref()
            .or(content_type.map(|c| c.split(';').next().unwrap_or(c).trim()))
            .filter(|m| !m.is_empty() && *m != "application/json" && *m != "text/plain");
        let is_index = match declared {
            Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST) => true,
            Some(MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST) => false,
            Some(other) => return Err(ManifestError::UnsupportedMediaType(other.to_string())),
            None => probe.manifests.is_some() && probe.layers.is_none(),
        };
        if probe.schema_version != Some(2) {
            return Err(ManifestError::Invalid {
                what: "manifest",
                reason: format!(
                    "schemaVersion is {:?}, expected 2 (schema 1 manifests are not supported)",
                    probe.schema_version
                ),
            });
        }
        if is_index {
            let index: ImageIndex =
                serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                    what: "image index",
                    source,
                })?;
            Ok(Manifest::Index(index))
        } else {
            let manifest: ImageManifest =
                serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                    what: "image manifest",
                    source,
                })?;
            Ok(Manifest::Image(Box::new(manifest)))
        }
    }
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig, ManifestError> {
        let config: ImageConfig =
            serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                what: "image config",
                source,
            })?;
        if config.rootfs.kind != "layers" {
            return Err(ManifestError::Invalid {
                what: "image config",
                reason: format!("rootfs.type is `{}`, expected `layers`", config.rootfs.kind),
            });
        }
        Ok(config)
    }

    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}

/// An OS/architecture/variant triple, as in index entries and `--platform`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the machine lazylayer runs on (Linux, by Go's architecture names).
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "arm" => "arm",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
        .normalized()
    }

    /// Parses `os/arch[/variant]`, as `docker --platform` takes it.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || {
            format!(
                "`{s}` is not a platform: expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8"
            )
        };
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        let p = match parts.as_slice() {
            [os, arch] => Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            },
            [os, arch, variant] => Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            },
            _ => return Err(bad()),
        };
        Ok(p.normalized())
    }

    /// containerd's normalisation: lower-case, `aarch64`→`arm64` (variant `v8` implied),
    /// `x86_64`→`amd64`, `arm` defaults to `v7`.
    pub fn normalized(mut self) -> Platform {
        self.os = self.os.to_ascii_lowercase();
        self.architecture = match self.architecture.to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" => "amd64".into(),
            "aarch64" => "arm64".into(),
            "i386" => "386".into(),
            other => other.to_string(),
        };
        self.variant = match (self.architecture.as_str(), self.variant.take()) {
            ("arm64", Some(v)) if v == "v8" => None,
            ("arm", None) => Some("v7".into()),
            ("amd64", Some(v)) if v == "v1" => None,
            (_, v) => v.map(|v| v.to_ascii_lowercase()),
        };
        self
    }

    /// Whether an image built for `other` runs as `self` asks: same OS and architecture, and the
    /// same variant once both are normalised.
    pub fn matches(&self, other: &Platform) -> bool {
        let a = self.clone().normalized();
        let b = other.clone().normalized();
        a.os == b.os && a.architecture == b.architecture && a.variant == b.variant
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// How a layer blob is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// Classifies a layer media type. OCI and Docker spellings, including the non-distributable
    /// ("foreign") variants, are accepted; anything else is an error naming the type.
    pub fn from_media_type(media_type: &str) -> Result<LayerCompression, ManifestError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Self::None),
            MEDIA_OCI_LAYER_GZIP
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Self::Gzip),
            MEDIA_OCI_LAYER_ZSTD
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Self::Zstd),
            other => Err(ManifestError::UnsupportedMediaType(other.to_string())),
        }
    }
}

/// The index a layer carries that lets it be read lazily, found from its annotations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LazyIndex {
    /// eStargz: a gzip layer whose TOC (`stargz.index.json`) digest is annotated.
    Estargz { toc_digest: Digest },
    /// zstd:chunked: a zstd layer whose TOC position (`offset:length:uncompressed:type`) and
    /// checksum are annotated.
    ZstdChunked {
        manifest_checksum: Digest,
        manifest_position: String,
    },
    /// Plain gzip with a seek index blob published as a referrer of the image manifest (found
    /// at resolution, not in the layer's annotations).
    GzipIndex { index: Descriptor },
}

impl LazyIndex {
    /// Reads the lazy-index annotations of a layer descriptor. A malformed digest in an
    /// annotation is an error: a reader would otherwise verify the TOC against garbage.
    pub fn of(layer: &Descriptor) -> Result<Option<LazyIndex>, ManifestError> {
        let a = &layer.annotations;
        let digest = |key: &str, value: &String| {
            value.parse::<Digest>().map_err(|e| ManifestError::Invalid {
                what: "layer annotation",
                reason: format!("{key} on layer {}: {e}", layer.digest),
            })
        };
        let checksum = a
            .get_key_value(ANNOTATION_ZSTD_CHUNKED_CHECKSUM)
            .or_else(|| a.get_key_value(ANNOTATION_ZSTD_CHUNKED_CHECKSUM_ALT));
        let position = a
            .get(ANNOTATION_ZSTD_CHUNKED_POSITION)
            .or_else(|| a.get(ANNOTATION_ZSTD_CHUNKED_POSITION_ALT));
        // stargz-snapshotter's zstd:chunked writer also sets the eStargz TOC annotation; the
        // zstd:chunked pair is the one that locates the TOC in a zstd layer.
        if let (Some((key, sum)), Some(pos)) = (checksum, position) {
            return Ok(Some(LazyIndex::ZstdChunked {
                manifest_checksum: digest(key, sum)?,
                manifest_position: pos.clone(),
            }));
        }
        match a.get(ANNOTATION_ESTARGZ_TOC) {
            Some(v) => Ok(Some(LazyIndex::Estargz {
                toc_digest: digest(ANNOTATION_ESTARGZ_TOC, v)?,
            })),
            None => Ok(None),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            LazyIndex::Estargz { .. } => "estargz",
            LazyIndex::ZstdChunked { .. } => "zstd:chunked",
            LazyIndex::GzipIndex { .. } => "gzip index",
        }
    }
}

/// A manifest as a source served it, already checked against its digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    /// What the source said the media type is (HTTP `Content-Type`, or the layout's index
    /// entry); the JSON's own `mediaType` wins when set.
    pub media_type: Option<String>,
    pub digest: Digest,
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn layer(annotations: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: D.parse().unwrap(),
            size: 1,
            platform: None,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            urls: vec![],
            artifact_type: None,
        }
    }

    #[test]
    fn platform_parse_and_normalise() {
        assert_eq!(
            Platform::parse("linux/amd64").unwrap().to_string(),
            "linux/amd64"
        );
        assert_eq!(
            Platform::parse("linux/aarch64").unwrap().to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::parse("linux/arm").unwrap().to_string(),
            "linux/arm/v7"
        );
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//x").is_err());
        assert!(Platform::parse("a/b/c/d").is_err());
        let arm64 = Platform::parse("linux/arm64").unwrap();
        assert!(arm64.matches(&Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        }));
        assert!(!arm64.matches(&Platform::parse("linux/amd64").unwrap()));
        assert!(
            !Platform::parse("linux/arm/v6")
                .unwrap()
                .matches(&Platform::parse("linux/arm/v7").unwrap())
        );
    }

    #[test]
    fn manifest_kind_comes_from_media_type_or_shape() {
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D}","size":2}},"layers":[]}}"#
        );
        assert!(matches!(
            Manifest::parse(image.as_bytes(), Some(MEDIA_DOCKER_MANIFEST)),
            Ok(Manifest::Image(_))
        ));
        assert!(matches!(
            Manifest::parse(image.as_bytes(), None),
            Ok(Manifest::Image(_))
        ));
        let index = r#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            Manifest::parse(index.as_bytes(), None),
            Ok(Manifest::Index(_))
        ));
        assert!(matches!(
            Manifest::parse(index.as_bytes(), Some("application/vnd.foo")),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        let schema1 = r#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(Manifest::parse(schema1.as_bytes(), None).is_err());
        assert!(Manifest::parse(b"not json", None).is_err());
        // A declared image manifest that lacks `config` is malformed, not an index.
        let broken = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
        assert!(matches!(
            Manifest::parse(broken.as_bytes(), None),
            Err(ManifestError::Json { .. })
        ));
    }

    #[test]
    fn layer_compression_from_media_type() {
        use LayerCompression::*;
        for (m, c) in [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
        ] {
            assert_eq!(LayerCompression::from_media_type(m).unwrap(), c);
        }
        let err = LayerCompression::from_media_type("application/x-foo").unwrap_err();
        assert!(err.to_string().contains("application/x-foo"));
    }

    #[test]
    fn lazy_index_detection() {
        assert_eq!(LazyIndex::of(&layer(&[])).unwrap(), None);
        assert_eq!(
            LazyIndex::of(&layer(&[(ANNOTATION_ESTARGZ_TOC, D)])).unwrap(),
            Some(LazyIndex::Estargz {
                toc_digest: D.parse().unwrap()
            })
        );
        let z = LazyIndex::of(&layer(&[
            (ANNOTATION_ZSTD_CHUNKED_CHECKSUM, D),
            (ANNOTATION_ZSTD_CHUNKED_POSITION, "10:20:30:1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(z.kind(), "zstd:chunked");
        let alt = LazyIndex::of(&layer(&[
            (ANNOTATION_ZSTD_CHUNKED_CHECKSUM_ALT, D),
            (ANNOTATION_ZSTD_CHUNKED_POSITION_ALT, "1:2:3:1"),
        ]))
        .unwrap();
        assert!(alt.is_some());
        let both = LazyIndex::of(&layer(&[
            (ANNOTATION_ESTARGZ_TOC, D),
            (ANNOTATION_ZSTD_CHUNKED_CHECKSUM_ALT, D),
            (ANNOTATION_ZSTD_CHUNKED_POSITION_ALT, "1:2:3:1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(both.kind(), "zstd:chunked");
        assert!(LazyIndex::of(&layer(&[(ANNOTATION_ESTARGZ_TOC, "sha256:nothex")])).is_err());
    }
}

//! Referrers: artifacts that point at a manifest through their `subject` (distribution spec
//! 1.1), such as the gzip seek indexes `lazylayer index` publishes.
//!
//! A registry that implements the referrers API answers `GET /v2/NAME/referrers/DIGEST` with an
//! index of them. One that does not (distribution 2.8, Debian's `docker-registry`) answers 404;
//! writers then keep that index themselves under the tag `sha256-HEX` of the subject (the spec's
//! tag schema fallback), and readers look there next. Both are read here, and the fallback tag
//! is what [`Repository::put_referrer`] updates when the registry did not take the `subject`
//! itself.

use reqwest::StatusCode;
use reqwest::header::ACCEPT;

use super::{RegistryError, Repository, read_capped, shown, status_error};
use crate::model::digest::Digest;
use crate::model::oci::{
    Descriptor, ImageIndex, ImageManifest, MAX_MANIFEST_BYTES, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
};

/// Media type and content of the empty config an artifact without one carries (OCI 1.1).
const MEDIA_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";
use crate::model::reference::ManifestSelector;

/// The fallback tag under which a registry without the referrers API keeps `subject`'s
/// referrers.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

impl Repository {
    /// The manifests that name `subject` as theirs and are of one of `artifact_types`: from the
    /// referrers API, else from the fallback tag; none when neither has any.
    pub async fn referrers(
        &self,
        subject: &Digest,
        artifact_types: &[&str],
    ) -> Result<Vec<Descriptor>, RegistryError> {
        let mut url = self.url("referrers", &subject.to_string());
        // The API filters on one type; for several, all are asked for and filtered here.
        if let [artifact_type] = artifact_types {
            url.query_pairs_mut()
                .append_pair("artifactType", artifact_type);
        }
        // Whether the registry has the API is learned from its first answer (200 or 404). Until
        // then the fallback tag is asked at the same time, so that a registry without the API
        // (distribution 2.8) costs one round trip, not two, and after that one request.
        let api = *self.registry.referrers_api.lock().unwrap();
        let index = match api {
            Some(false) => self.fallback_index(subject).await?,
            Some(true) => self.referrers_api(subject, &url).await?,
            None => {
                let (from_api, from_tag) = tokio::join!(
                    self.referrers_api(subject, &url),
                    self.fallback_index(subject)
                );
                match from_api? {
                    Some(index) => Some(index),
                    None => from_tag?,
                }
            }
        };
        let Some(index) = index else {
            return Ok(Vec::new());
        };
        // A registry may ignore the filter (it is optional in the spec).
        Ok(index
            .manifests
            .into_iter()
            .filter(|d| {
                d.artifact_type
                    .as_deref()
                    .is_some_and(|t| artifact_types.contains(&t))
            })
            .collect())
    }

    /// The referrers API's index of `subject`, or `None` if the registry has no such API (404);
    /// what it answered is remembered for the registry.
    async fn referrers_api(
        &self,
        subject: &Digest,
        url: &url::Url,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        let http = &self.registry.http;
        let resp = self
            .registry
            .send(
                || http.get(url.clone()).header(ACCEPT, MEDIA_OCI_INDEX),
                url,
                &self.scope,
            )
            .await?;
        let has_api = match resp.status() {
            StatusCode::OK => true,
            StatusCode::NOT_FOUND => false,
            _ => return Err(status_error(resp, url).await),
        };
        self.registry.learned_referrers_api(has_api);
        if !has_api {
            return Ok(None);
        }
        let bytes = read_capped(
            resp,
            url,
            "referrers index",
            &subject.to_string(),
            MAX_MANIFEST_BYTES,
        )
        .await?;
        parse_index(&bytes, url).map(Some)
    }

    /// The index under `subject`'s fallback tag, if there is one.
    async fn fallback_index(&self, subject: &Digest) -> Result<Option<ImageIndex>, RegistryError> {
        let tag = ManifestSelector::Tag(fallback_tag(subject));
        match self.manifest(&tag).await {
            Ok(fetched) => Ok(Some(parse_index(
                &fetched.bytes,
                &self.url("manifests", &tag.to_string()),
            )?)),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Publishes `blobs` as one OCI artifact of `artifact_type` (empty config, `annotations` on
    /// its manifest) whose subject is the manifest `subject`; returns the artifact manifest's
    /// descriptor, as its referrers list it.
    pub async fn publish_artifact(
        &self,
        subject: &Descriptor,
        artifact_type: &str,
        blobs: &[(Descriptor, bytes::Bytes)],
        annotations: std::collections::BTreeMap<String, String>,
    ) -> Result<Descriptor, RegistryError> {
        let empty = bytes::Bytes::from_static(EMPTY);
        let config = Descriptor::of(MEDIA_EMPTY, EMPTY);
        self.push_bytes(&config.digest, &empty).await?;
        for (descriptor, bytes) in blobs {
            self.push_bytes(&descriptor.digest, bytes).await?;
        }
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_MANIFEST.to_string()),
            artifact_type: Some(artifact_type.to_string()),
            config,
            layers: blobs.iter().map(|(d, _)| d.clone()).collect(),
            subject: Some(subject.clone()),
            annotations: annotations.clone(),
        };
        let bytes = serde_json::to_vec(&manifest).expect("manifest serialises");
        let referrer = Descriptor {
            artifact_type: Some(artifact_type.to_string()),
            annotations,
            ..Descriptor::of(MEDIA_OCI_MANIFEST, &bytes)
        };
        self.put_referrer(&subject.digest, &bytes, &referrer)
            .await?;
        Ok(referrer)
    }

    /// Puts an artifact manifest whose `subject` is `subject`, by its digest, and makes it
    /// findable: a registry with the referrers API says so (`OCI-Subject`); for one without,
    /// `referrer` is merged into the fallback tag's index.
    pub async fn put_referrer(
        &self,
        subject: &Digest,
        manifest: &[u8],
        referrer: &Descriptor,
    ) -> Result<(), RegistryError> {
        let handled = self
            .put_manifest(&referrer.digest.to_string(), &referrer.media_type, manifest)
            .await?;
        if handled {
            return Ok(());
        }
        let mut index = self.fallback_index(subject).await?.unwrap_or(ImageIndex {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_INDEX.to_string()),
            manifests: Vec::new(),
            annotations: Default::default(),
        });
        if index.manifests.iter().any(|d| d.digest == referrer.digest) {
            return Ok(());
        }
        index.manifests.push(referrer.clone());
        let bytes = serde_json::to_vec(&index).expect("index serialises");
        self.put_manifest(&fallback_tag(subject), MEDIA_OCI_INDEX, &bytes)
            .await?;
        Ok(())
    }
}

fn parse_index(bytes: &[u8], url: &url::Url) -> Result<ImageIndex, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Transport {
        url: shown(url),
        reason: format!("referrers index does not parse: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tag_is_algorithm_dash_hex() {
        let d = Digest::of(b"x");
        assert_eq!(fallback_tag(&d), format!("sha256-{}", d.hex()));
    }
}

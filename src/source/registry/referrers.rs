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
use crate::model::oci::{Descriptor, ImageIndex, MAX_MANIFEST_BYTES, MEDIA_OCI_INDEX};
use crate::model::reference::ManifestSelector;

/// The fallback tag under which a registry without the referrers API keeps `subject`'s
/// referrers.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

impl Repository {
    /// The manifests that name `subject` as theirs and are of `artifact_type`: from the
    /// referrers API, else from the fallback tag; none when neither has any.
    pub async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        let mut url = self.url("referrers", &subject.to_string());
        url.query_pairs_mut()
            .append_pair("artifactType", artifact_type);
        let http = &self.registry.http;
        let resp = self
            .registry
            .send(
                || http.get(url.clone()).header(ACCEPT, MEDIA_OCI_INDEX),
                &url,
                &self.scope,
            )
            .await?;
        let index = match resp.status() {
            StatusCode::OK => {
                let bytes = read_capped(
                    resp,
                    &url,
                    "referrers index",
                    &subject.to_string(),
                    MAX_MANIFEST_BYTES,
                )
                .await?;
                parse_index(&bytes, &url)?
            }
            StatusCode::NOT_FOUND => match self.fallback_index(subject).await? {
                Some(index) => index,
                None => return Ok(Vec::new()),
            },
            _ => return Err(status_error(resp, &url).await),
        };
        // A registry may ignore the filter (it is optional in the spec).
        Ok(index
            .manifests
            .into_iter()
            .filter(|d| d.artifact_type.as_deref() == Some(artifact_type))
            .collect())
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

//! Where a converted image goes: an OCI image layout directory (`oci:PATH[:TAG]`).
//!
//! Blobs are written under `blobs/sha256/` through a temporary name and renamed, so a reader
//! never sees half a blob; `index.json` gets the manifest under the tag (replacing an entry of
//! the same tag) and is rewritten atomically last, so the layout is valid at every moment.
//! Registry destinations are pushed by `registry::push`; push access is checked before the
//! conversion starts ([`check_push_access`]).

use std::io;
use std::path::Path;

use super::{ConvertError, ConvertedImage};
use crate::model::digest::Digest;
use crate::model::oci::{ANNOTATION_REF_NAME as REF_NAME, MEDIA_OCI_MANIFEST};
use crate::model::reference::{LayoutRef, RegistryRef};
use crate::source::config::FetchConfig;
use crate::source::registry::RegistryError;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ConvertError + '_ {
    move |e| ConvertError::Output(format!("{}: {e}", path.display()))
}

/// Writes `bytes` as the blob `digest` of the layout at `root` (kept if already there).
fn put_blob(
    root: &Path,
    digest: &Digest,
    write: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<(), ConvertError> {
    let dir = root.join("blobs").join("sha256");
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let path = dir.join(digest.hex());
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!(".{}.tmp", digest.hex()));
    write(&tmp).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_error(&path))
}

/// Writes `image` into the layout `dest` under its tag (`latest` when none is given).
pub fn write_layout(image: &ConvertedImage, dest: &LayoutRef) -> Result<(), ConvertError> {
    let root = &dest.path;
    std::fs::create_dir_all(root).map_err(io_error(root))?;
    let marker = root.join("oci-layout");
    if !marker.exists() {
        std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_error(&marker))?;
    }
    for layer in &image.layers {
        put_blob(root, &layer.descriptor.digest, |tmp| {
            std::fs::copy(layer.blob.path(), tmp).map(|_| ())
        })?;
    }
    put_blob(root, &image.config_descriptor.digest, |tmp| {
        std::fs::write(tmp, &image.config)
    })?;
    put_blob(root, &image.manifest_digest, |tmp| {
        std::fs::write(tmp, &image.manifest)
    })?;

    let index_path = root.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            ConvertError::Output(format!("{}: not an OCI index: {e}", index_path.display()))
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            serde_json::json!({"schemaVersion": 2, "manifests": []})
        }
        Err(e) => return Err(io_error(&index_path)(e)),
    };
    let tag = dest.tag.clone().unwrap_or_else(|| "latest".to_string());
    let manifests = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| {
            ConvertError::Output(format!("{}: has no manifests list", index_path.display()))
        })?;
    manifests.retain(|m| m["annotations"][REF_NAME].as_str() != Some(tag.as_str()));
    manifests.push(serde_json::json!({
        "mediaType": MEDIA_OCI_MANIFEST,
        "digest": image.manifest_digest.to_string(),
        "size": image.manifest.len(),
        "annotations": {REF_NAME: tag},
    }));
    let bytes = serde_json::to_vec(&index).map_err(|e| ConvertError::Output(e.to_string()))?;
    let tmp = root.join(".index.json.tmp");
    std::fs::write(&tmp, bytes).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, &index_path).map_err(io_error(&index_path))
}

fn push_failed(target: &RegistryRef) -> impl Fn(RegistryError) -> ConvertError + Copy + '_ {
    move |e| ConvertError::Output(format!("pushing to {target}: {e}"))
}

fn push_repository(
    target: &RegistryRef,
    config: &FetchConfig,
) -> Result<crate::source::registry::Repository, ConvertError> {
    crate::source::registry::Repository::for_push(target, config).map_err(push_failed(target))
}

/// Fails at once if `target` refuses these credentials a push, before a conversion that could
/// take minutes is thrown away.
pub async fn check_push_access(
    target: &RegistryRef,
    config: &FetchConfig,
) -> Result<(), ConvertError> {
    push_repository(target, config)?
        .check_push_access()
        .await
        .map_err(push_failed(target))
}

/// Pushes `image` to `target` (layers, config, then the manifest under the tag).
pub async fn push(
    image: &ConvertedImage,
    target: &RegistryRef,
    config: &FetchConfig,
) -> Result<(), ConvertError> {
    let failed = push_failed(target);
    let repository = push_repository(target, config)?;
    for layer in &image.layers {
        repository
            .push_blob(
                &layer.descriptor.digest,
                layer.descriptor.size,
                layer.blob.path(),
            )
            .await
            .map_err(failed)?;
    }
    let config_file = tempfile::NamedTempFile::new()
        .and_then(|f| std::fs::write(f.path(), &image.config).map(|_| f))
        .map_err(|e| ConvertError::Output(format!("staging the config: {e}")))?;
    repository
        .push_blob(
            &image.config_descriptor.digest,
            image.config_descriptor.size,
            config_file.path(),
        )
        .await
        .map_err(failed)?;
    let reference = match (&target.tag, &target.digest) {
        (Some(tag), _) => tag.clone(),
        (None, _) => image.manifest_digest.to_string(),
    };
    repository
        .put_manifest(&reference, MEDIA_OCI_MANIFEST, &image.manifest)
        .await
        .map_err(failed)?;
    Ok(())
}

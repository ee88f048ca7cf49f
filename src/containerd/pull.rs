//! `lazylayer pull`: a containerd client that pulls an image without downloading it.
//!
//! `ctr pull` gives a proxy snapshotter nothing to go on: its unpacker prepares each layer's
//! snapshot without saying where the layer comes from, so a remote snapshotter cannot serve it.
//! This client does what containerd's own pull does, over containerd's gRPC API, with the labels
//! that turn the unpack of a lazy layer into a no-op:
//! 1. resolve the image with our own registry client (same auth and flags as `inspect`);
//! 2. take a lease, so nothing written is garbage-collected before the image record holds it;
//! 3. for each layer, bottom up, prepare its snapshot (named by its chain ID) through
//!    containerd with the `containerd.io/snapshot/cri.*` labels (image, layer, manifest). The
//!    first `Prepare` also carries what step 1 fetched (manifest, config, published profile and
//!    seek indexes, in `containerd.io/snapshot/lazylayer.*` labels, when each fits containerd's
//!    4 KiB label limit), so that our snapshotter starts on the layers' indexes at once instead
//!    of resolving the image again (two round trips). Our
//!    snapshotter answers "already exists" for layers it mounts lazily; for any other layer (or
//!    another snapshotter) the blob is streamed into containerd's content store, applied by
//!    containerd's differ, and committed, exactly as `ctr pull` would;
//! 4. store manifest and config in the content store with the garbage-collection labels that
//!    keep the snapshots alive, and create (or update) the image record.
//!
//! The result is an ordinary containerd image: `ctr run --snapshotter lazylayer REF` starts it,
//! `ctr image rm` removes it and containerd's GC removes its snapshots.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::types::{Descriptor as ApiDescriptor, Mount};
use futures_util::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::containerd::snapshotter::{
    IMAGE_LABELS, LAYER_LABELS, MANIFEST_LABEL, RESOLUTION_LABELS, TARGET_LABEL,
};
use crate::model::digest::Digest;
use crate::model::oci::{Descriptor, Platform};
use crate::model::reference::{ImageRef, ReferenceError};
use crate::source::config::FetchConfig;
use crate::source::image::{self, ResolvedImage};
use crate::source::open::{OpenedImage, open_image};
use crate::source::{ImageSource, SourceError};

/// Bytes per message when streaming a blob into the content store (containerd accepts up to
/// 16 MiB per message; 1 MiB keeps memory flat).
const WRITE_PIECE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(
        "{0}: lazylayer pull needs a registry reference (containerd cannot pull from oci: or s3:)"
    )]
    NotRegistry(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(
        "cannot reach containerd at {address}: {reason} (is it running? --address or CONTAINERD_ADDRESS)"
    )]
    Connect { address: String, reason: String },
    #[error("containerd: {what}: {}", status.message())]
    Containerd { what: String, status: Status },
    #[error(
        "image {image}: snapshotter {snapshotter} is not known to containerd; add it as a \
         [proxy_plugins] entry of type \"snapshot\" (see deploy/README.md)"
    )]
    UnknownSnapshotter { image: String, snapshotter: String },
}

/// What to pull into which containerd.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// containerd namespace the image is created in (`default` is what `ctr` uses).
    pub namespace: String,
    /// Snapshotter to unpack into (as named in containerd's config).
    pub snapshotter: String,
    pub registry: FetchConfig,
    pub platform: Platform,
}

/// How one layer ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The snapshotter serves it lazily: nothing was downloaded.
    Lazy,
    /// Downloaded and unpacked by containerd.
    Unpacked,
    /// Its snapshot existed already (shared with another image, or pulled before).
    Present,
}

pub struct PullReport {
    pub image: String,
    pub manifest: Digest,
    pub layers: Vec<(Digest, LayerOutcome)>,
    pub seconds: f64,
}

/// A connection to containerd, in one namespace, under one lease.
struct Client {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Client {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        if let Ok(ns) = self.namespace.parse() {
            metadata.insert("containerd-namespace", ns);
        }
        if let Some(lease) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            metadata.insert("containerd-lease", lease);
        }
        request
    }

    fn snapshots(&self) -> snap::snapshots_client::SnapshotsClient<Channel> {
        snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    fn content(&self) -> api::content_client::ContentClient<Channel> {
        api::content_client::ContentClient::new(self.channel.clone())
    }
}

/// How long calls that reach the snapshotter are tried again while containerd answers
/// `unavailable`: containerd redials a proxy snapshotter that restarted with backoff (up to 3 s
/// between attempts in 1.6) and fails calls at once meanwhile.
const SNAPSHOTTER_REDIAL: Duration = Duration::from_secs(15);

/// Runs `call` until it gives something other than `unavailable`, or [`SNAPSHOTTER_REDIAL`] has
/// passed. A call refused that way never reached the snapshotter, so trying it again is safe.
async fn until_available<T, Fut>(mut call: impl FnMut() -> Fut) -> Result<T, Status>
where
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + SNAPSHOTTER_REDIAL;
    let mut delay = Duration::from_millis(100);
    loop {
        match call().await {
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tracing::debug!("containerd: {}; trying again", status.message());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

fn failed(what: impl Into<String>) -> impl FnOnce(Status) -> PullError {
    let what = what.into();
    move |status| PullError::Containerd { what, status }
}

/// The chain ID of a layer stack, as the OCI image spec defines it: a layer's diff ID for the
/// bottom layer, else the digest of "PARENT_CHAIN DIFF_ID".
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chain: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

fn api_descriptor(d: &Descriptor) -> ApiDescriptor {
    ApiDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: d.size as i64,
        annotations: d.annotations.clone().into_iter().collect(),
    }
}

/// Pulls `reference` into containerd for `options.snapshotter`.
pub async fn pull(reference: &str, options: &PullOptions) -> Result<PullReport, PullError> {
    let started = Instant::now();
    let parsed = ImageRef::parse(reference)?;
    let ImageRef::Registry(registry_ref) = &parsed else {
        return Err(PullError::NotRegistry(reference.to_string()));
    };
    let name = registry_ref.to_string();
    let OpenedImage { source, image, .. } =
        open_image(&parsed, None, &options.registry, &options.platform, None).await?;
    let (manifest, config) = (image.manifest_bytes.clone(), image.config_bytes.clone());

    let channel = containerd_client::connect(&options.address)
        .await
        .map_err(|e| PullError::Connect {
            address: options.address.display().to_string(),
            reason: std::error::Error::source(&e)
                .map_or_else(|| e.to_string(), ToString::to_string),
        })?;
    let mut client = Client {
        channel,
        namespace: options.namespace.clone(),
        lease: None,
    };
    // The lease keeps everything written below alive until the image record refers to it; it
    // expires by itself should this process die half way.
    let expire = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let lease = api::leases_client::LeasesClient::new(client.channel.clone())
        .create(client.request(api::CreateRequest {
            id: String::new(),
            labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
        }))
        .await
        .map_err(failed("creating a lease"))?
        .into_inner()
        .lease
        .map(|l| l.id);
    client.lease = lease.clone();

    let result = unpack_and_record(
        &client,
        &name,
        source.as_ref(),
        &image,
        &manifest,
        &config,
        options,
    )
    .await;
    if let Some(id) = lease {
        client.lease = None;
        let deleted = api::leases_client::LeasesClient::new(client.channel.clone())
            .delete(client.request(api::DeleteRequest { id, sync: false }))
            .await;
        if let Err(e) = deleted {
            tracing::warn!("deleting the pull's lease: {}", e.message());
        }
    }
    let layers = result?;
    Ok(PullReport {
        image: name,
        manifest: image.manifest_digest,
        layers,
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn unpack_and_record(
    client: &Client,
    name: &str,
    source: &dyn ImageSource,
    image: &ResolvedImage,
    manifest: &[u8],
    config: &[u8],
    options: &PullOptions,
) -> Result<Vec<(Digest, LayerOutcome)>, PullError> {
    let diff_ids: Vec<Digest> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    let chains = chain_ids(&diff_ids);
    let mut outcomes = Vec::with_capacity(image.layers.len());
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        image.manifest.config.digest.to_string(),
    )]);
    let mut parent = String::new();
    // Handed over with the first layer the snapshotter sees; it remembers the image after that.
    let mut handed = resolution_labels(image);
    for (i, (layer, chain)) in image.layers.iter().zip(&chains).enumerate() {
        let chain = chain.to_string();
        let unpack = Unpack {
            layer,
            chain: &chain,
            parent: &parent,
            handed: &mut handed,
        };
        let outcome = unpack_layer(client, name, source, image, unpack, options).await?;
        if outcome == LayerOutcome::Unpacked {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.descriptor.digest.to_string(),
            );
        }
        outcomes.push((layer.descriptor.digest.clone(), outcome));
        parent = chain;
    }
    // The config holds the snapshots (GC follows parents from the top one), the manifest holds
    // the config and any downloaded layers, the image holds the manifest.
    let config_labels = HashMap::from([(
        format!("containerd.io/gc.ref.snapshot.{}", options.snapshotter),
        parent,
    )]);
    write_content(
        client,
        &image.manifest.config,
        futures_util::stream::iter([Ok(bytes::Bytes::copy_from_slice(config))]),
        config_labels,
    )
    .await?;
    let manifest_descriptor = Descriptor {
        media_type: image.manifest_media_type.clone(),
        digest: image.manifest_digest.clone(),
        size: manifest.len() as u64,
        annotations: Default::default(),
        ..image.manifest.config.clone()
    };
    write_content(
        client,
        &manifest_descriptor,
        futures_util::stream::iter([Ok(bytes::Bytes::copy_from_slice(manifest))]),
        manifest_labels,
    )
    .await?;
    let now = prost_types::Timestamp::from(std::time::SystemTime::now());
    let record = api::Image {
        name: name.to_string(),
        labels: HashMap::new(),
        target: Some(api_descriptor(&manifest_descriptor)),
        created_at: Some(now),
        updated_at: Some(now),
    };
    let mut images = api::images_client::ImagesClient::new(client.channel.clone());
    let created = images
        .create(client.request(api::CreateImageRequest {
            image: Some(record.clone()),
            source_date_epoch: None,
        }))
        .await;
    match created {
        Ok(_) => {}
        Err(status) if status.code() == Code::AlreadyExists => {
            images
                .update(client.request(api::UpdateImageRequest {
                    image: Some(record),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(failed(format!("updating image {name}")))?;
        }
        Err(status) => return Err(failed(format!("creating image {name}"))(status)),
    }
    Ok(outcomes)
}

/// The labels that hand `image`'s resolution to the snapshotter, or none when one of them would
/// be larger than containerd accepts (4096 bytes for a label's name and value): the
/// snapshotter then asks the registry itself.
fn resolution_labels(image: &ResolvedImage) -> HashMap<String, String> {
    const MAX_LABEL: usize = 4096;
    let resolution = image.resolution();
    let (Ok(manifest), Ok(config), Ok(published)) = (
        String::from_utf8(resolution.manifest.bytes.to_vec()),
        String::from_utf8(resolution.config.to_vec()),
        serde_json::to_string(&resolution.published),
    ) else {
        return HashMap::new();
    };
    let labels: HashMap<String, String> = RESOLUTION_LABELS
        .iter()
        .map(ToString::to_string)
        .zip([manifest, config, published])
        .collect();
    if labels.iter().any(|(k, v)| k.len() + v.len() > MAX_LABEL) {
        return HashMap::new();
    }
    labels
}

/// One layer to unpack, on `parent`, into the snapshot named `chain`; `handed` holds the
/// resolution labels until a `Prepare` has carried them.
struct Unpack<'a> {
    layer: &'a image::Layer,
    chain: &'a str,
    parent: &'a str,
    handed: &'a mut HashMap<String, String>,
}

async fn unpack_layer(
    client: &Client,
    name: &str,
    source: &dyn ImageSource,
    image: &ResolvedImage,
    unpack: Unpack<'_>,
    options: &PullOptions,
) -> Result<LayerOutcome, PullError> {
    let Unpack {
        layer,
        chain,
        parent,
        handed,
    } = unpack;
    let snapshots = client.snapshots();
    let stat = until_available(|| {
        let mut snapshots = snapshots.clone();
        let request = client.request(snap::StatSnapshotRequest {
            snapshotter: options.snapshotter.clone(),
            key: chain.to_string(),
        });
        async move { snapshots.stat(request).await }
    })
    .await;
    match stat {
        Ok(_) => return Ok(LayerOutcome::Present),
        Err(status) if status.code() == Code::NotFound => {}
        Err(status) if status.message().contains("snapshotter not loaded") => {
            return Err(PullError::UnknownSnapshotter {
                image: name.to_string(),
                snapshotter: options.snapshotter.clone(),
            });
        }
        Err(status) => return Err(failed(format!("snapshot {chain}"))(status)),
    }
    let digest = &layer.descriptor.digest;
    let mut labels = HashMap::from([
        (TARGET_LABEL.to_string(), chain.to_string()),
        (IMAGE_LABELS[0].to_string(), name.to_string()),
        (LAYER_LABELS[0].to_string(), digest.to_string()),
        (
            MANIFEST_LABEL.to_string(),
            image.manifest_digest.to_string(),
        ),
    ]);
    labels.extend(std::mem::take(handed));
    let nanos = crate::containerd::snapshotter::store::now_nanos();
    let key = format!("extract-{nanos}-{chain}");
    let prepared = until_available(|| {
        let mut snapshots = snapshots.clone();
        let request = client.request(snap::PrepareSnapshotRequest {
            snapshotter: options.snapshotter.clone(),
            key: key.clone(),
            parent: parent.to_string(),
            labels: labels.clone(),
        });
        async move { snapshots.prepare(request).await }
    })
    .await;
    let mounts: Vec<Mount> = match prepared {
        Err(status) if status.code() == Code::AlreadyExists => return Ok(LayerOutcome::Lazy),
        Err(status) => return Err(failed(format!("preparing layer {digest}"))(status)),
        Ok(response) => response.into_inner().mounts,
    };
    // Not lazily servable: download and unpack it the way containerd's own pull does.
    let unpacked = async {
        let stream = source.blob_range(digest, 0..layer.descriptor.size).await?;
        write_content(
            client,
            &layer.descriptor,
            stream,
            HashMap::from([(
                "containerd.io/uncompressed".to_string(),
                layer.diff_id.to_string(),
            )]),
        )
        .await?;
        api::diff_client::DiffClient::new(client.channel.clone())
            .apply(client.request(api::ApplyRequest {
                diff: Some(api_descriptor(&layer.descriptor)),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(failed(format!("applying layer {digest}")))?;
        client
            .snapshots()
            .commit(client.request(snap::CommitSnapshotRequest {
                snapshotter: options.snapshotter.clone(),
                name: chain.to_string(),
                key: key.clone(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(failed(format!("committing layer {digest}")))?;
        Ok::<_, PullError>(())
    }
    .await;
    if let Err(e) = unpacked {
        let _ = client
            .snapshots()
            .remove(client.request(snap::RemoveSnapshotRequest {
                snapshotter: options.snapshotter.clone(),
                key,
            }))
            .await;
        return Err(e);
    }
    Ok(LayerOutcome::Unpacked)
}

/// Streams a blob into containerd's content store (verified there against its digest), or only
/// sets its labels when the store has it already.
async fn write_content(
    client: &Client,
    descriptor: &Descriptor,
    data: impl futures_util::Stream<Item = Result<bytes::Bytes, SourceError>> + Send + Unpin + 'static,
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    let digest = descriptor.digest.to_string();
    let mut content = client.content();
    let known = content
        .info(client.request(api::InfoRequest {
            digest: digest.clone(),
        }))
        .await;
    if known.is_ok() {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        content
            .update(client.request(api::UpdateRequest {
                info: Some(api::Info {
                    digest,
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(failed(format!("labelling {}", descriptor.digest)))?;
        return Ok(());
    }
    let nanos = crate::containerd::snapshotter::store::now_nanos();
    let write_ref = format!("lazylayer-pull-{nanos}-{}", descriptor.digest.hex());
    let total = descriptor.size as i64;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let source_error = std::sync::Arc::new(std::sync::Mutex::new(None));
    let feeder = tokio::spawn({
        let source_error = source_error.clone();
        let mut data = data;
        let write_ref = write_ref.clone();
        async move {
            let mut offset = 0i64;
            while let Some(piece) = data.next().await {
                let piece = match piece {
                    Ok(piece) => piece,
                    Err(e) => {
                        *source_error.lock().unwrap() = Some(e);
                        return;
                    }
                };
                for part in piece.chunks(WRITE_PIECE) {
                    let message = api::WriteContentRequest {
                        action: api::WriteAction::Write as i32,
                        r#ref: write_ref.clone(),
                        total,
                        expected: digest.clone(),
                        offset,
                        data: part.to_vec(),
                        labels: HashMap::new(),
                    };
                    offset += part.len() as i64;
                    if sender.send(message).await.is_err() {
                        return;
                    }
                }
            }
            let _ = sender
                .send(api::WriteContentRequest {
                    action: api::WriteAction::Commit as i32,
                    r#ref: write_ref,
                    total,
                    expected: digest,
                    offset,
                    data: Vec::new(),
                    labels,
                })
                .await;
        }
    });
    let requests = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(receiver);
    let written = async {
        let mut responses = content.write(client.request(requests)).await?.into_inner();
        while responses.message().await?.is_some() {}
        Ok::<_, Status>(())
    }
    .await;
    let _ = feeder.await;
    if let Some(e) = source_error.lock().unwrap().take() {
        return Err(PullError::Source(e));
    }
    match written {
        Ok(()) => Ok(()),
        Err(status) if status.code() == Code::AlreadyExists => Ok(()),
        Err(status) => Err(failed(format!("writing {}", descriptor.digest))(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // The spec's own example (image-spec config.md, "Layer ChainID").
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], Digest::of(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }
}

//! Opening the image a reference names: the one place that maps an [`ImageRef`] to a backend
//! and stacks the source wrappers, always in the same order.
//!
//! [`open`] picks the backend: a registry (pinged first, so that a wrong host or a dead registry
//! is reported before anything else), an S3 bucket, or a local layout. Remote sources come back
//! wrapped in [`RetryingSource`]; a local layout is not, because reading a file again reads the
//! same bytes.
//!
//! [`open_image`] is what callers use: [`open`], then [`stack`] (the counter, then the disk tier
//! in front of it), then [`image::resolve`] through that stack, so that the manifest and config
//! requests are counted too and a remount serves the config from disk. It sends the registry's
//! ping beside the manifest request rather than before it (a round trip less for every pull and
//! mount), and still reports the ping's failure first when both fail; once the image is resolved
//! the ping is not waited for, so an image the disk cache holds mounts with its registry down.

use std::sync::Arc;

use crate::cache::disk::DiskCache;
use crate::model::digest::Digest;
use crate::model::oci::Platform;
use crate::model::reference::{ImageRef, ManifestSelector};
use crate::source::config::FetchConfig;
use crate::source::counting::CountingSource;
use crate::source::disk_backed::DiskBackedSource;
use crate::source::image::{self, ImageError, ResolvedImage};
use crate::source::layout::LayoutSource;
use crate::source::registry::MirroredRepository;
use crate::source::retry::retry;
use crate::source::retrying::RetryingSource;
use crate::source::s3::S3Source;
use crate::source::stats::FetchStats;
use crate::source::{ImageSource, SourceError};

/// An image resolved to one platform, and the source stack it is read through.
pub struct OpenedImage {
    /// The backend with its retries only, for a caller that keeps it to [`stack`] again later
    /// (the snapshotter remembers resolved images across the layers of one pull).
    pub raw: Arc<dyn ImageSource>,
    /// `raw` as [`stack`] wraps it: read the image through this.
    pub source: Arc<dyn ImageSource>,
    /// What `source` fetched, from the manifest on.
    pub stats: Arc<FetchStats>,
    pub image: ResolvedImage,
}

impl OpenedImage {
    /// `image`, read from `raw` through a fresh [`stack`] (its own counters).
    pub fn stacked(
        raw: Arc<dyn ImageSource>,
        image: ResolvedImage,
        disk: Option<Arc<DiskCache>>,
    ) -> OpenedImage {
        let (source, stats) = stack(raw.clone(), disk);
        OpenedImage {
            raw,
            source,
            stats,
            image,
        }
    }
}

/// Opens the image `reference` names, or with `pin` the manifest of that digest in the same
/// repository (a containerd snapshot names the exact manifest it was pulled from), and resolves
/// it for `platform` through [`stack`].
pub async fn open_image(
    reference: &ImageRef,
    pin: Option<&Digest>,
    config: &FetchConfig,
    platform: &Platform,
    disk: Option<Arc<DiskCache>>,
) -> Result<OpenedImage, ImageError> {
    let (raw, mut selector, check) = connect(reference, config, disk.as_ref()).await?;
    if let Some(digest) = pin {
        selector = ManifestSelector::Digest(digest.clone());
    }
    let (source, stats) = stack(raw.clone(), disk);
    let check = tokio::spawn(check);
    let image = match image::resolve(source.as_ref(), &selector, platform).await {
        // The ping only explains failures: a resolved image (perhaps from the disk cache, with
        // the registry down) does not wait for it.
        Ok(image) => {
            check.abort();
            image
        }
        Err(e) => {
            // A registry that is not one explains a failed manifest request better than it does.
            if let Ok(Err(checked)) = check.await {
                return Err(checked.into());
            }
            return Err(e);
        }
    };
    Ok(OpenedImage {
        raw,
        source,
        stats,
        image,
    })
}

/// As [`open_image`], with the image resolved elsewhere: `handed` is what `lazylayer pull`
/// fetched, handed to the snapshotter with the layers it prepares. It is checked against `pin`
/// (the manifest digest containerd names) and the config digest in it; no request is made.
pub async fn open_resolved(
    reference: &ImageRef,
    pin: &Digest,
    handed: image::Resolution,
    config: &FetchConfig,
    platform: &Platform,
    disk: Option<Arc<DiskCache>>,
) -> Result<OpenedImage, ImageError> {
    let (raw, _, _) = connect(reference, config, disk.as_ref()).await?;
    let image = image::resolved_from(raw.name(), pin, handed, platform)?;
    let (source, stats) = stack(raw.clone(), disk);
    Ok(OpenedImage {
        raw,
        source,
        stats,
        image,
    })
}

/// The one order of source wrappers over a backend that [`open`] returned: a counter directly
/// above it, so that what reaches the network is counted (each retry is a request on the wire),
/// and the disk tier in front of the counter, so that a blob served from disk costs nothing.
pub fn stack(
    raw: Arc<dyn ImageSource>,
    disk: Option<Arc<DiskCache>>,
) -> (Arc<dyn ImageSource>, Arc<FetchStats>) {
    let (counted, stats) = CountingSource::wrap(raw);
    let source = match disk {
        Some(disk) => DiskBackedSource::wrap(counted, disk),
        None => counted,
    };
    (source, stats)
}

/// Opens the source a reference names and says which manifest in it the reference means.
/// For a registry this makes one request (`GET /v2/`) so that a wrong host, a dead registry or
/// a non-registry URL is reported before anything else.
pub async fn open(
    reference: &ImageRef,
    config: &FetchConfig,
) -> Result<(Arc<dyn ImageSource>, ManifestSelector), SourceError> {
    let (source, selector, check) = connect(reference, config, None).await?;
    check.await?;
    Ok((source, selector))
}

/// A registry's API check, left for the caller to run beside its first request.
type Check = futures_util::future::BoxFuture<'static, Result<(), SourceError>>;

/// As [`open`], with the registry's ping not yet sent; a registry keeps what it learns of
/// itself in `disk` (see [`Registry::remember_in`]).
async fn connect(
    reference: &ImageRef,
    config: &FetchConfig,
    disk: Option<&Arc<DiskCache>>,
) -> Result<(Arc<dyn ImageSource>, ManifestSelector, Check), SourceError> {
    use futures_util::FutureExt;
    let checked = || futures_util::future::ready(Ok(())).boxed();
    match reference {
        ImageRef::Registry(r) => {
            let repo = Arc::new(MirroredRepository::open(r, config)?);
            if let Some(disk) = disk {
                repo.remember_in(disk.clone());
            }
            let (policy, name, pinged) = (config.retry.clone(), r.registry.clone(), repo.clone());
            let check = async move {
                let what = || format!("registry {name}");
                retry(&policy, what, || async {
                    Ok::<_, SourceError>(pinged.ping().await?)
                })
                .await
            }
            .boxed();
            Ok((
                RetryingSource::wrap(repo, config.retry.clone()),
                r.selector(),
                check,
            ))
        }
        ImageRef::S3(r) => {
            let what = || format!("s3://{}/{}", r.bucket, r.prefix);
            let s3 = retry(&config.retry, what, || async {
                S3Source::open(r, &config.s3, config.connect_timeout, config.stall_timeout)
                    .await
                    .map_err(SourceError::from)
            })
            .await?;
            let selector = s3.selector(r)?;
            Ok((
                RetryingSource::wrap(Arc::new(s3), config.retry.clone()),
                selector,
                checked(),
            ))
        }
        ImageRef::Layout(l) => {
            let layout = LayoutSource::open(&l.path)?;
            let selector = layout.selector(l)?;
            Ok((Arc::new(layout), selector, checked()))
        }
    }
}

//! Opening the source a reference names, wrapped for retries.
//!
//! The one place that maps an [`ImageRef`] to a backend: a registry (pinged first, so that a
//! wrong host or a dead registry is reported before anything else), an S3 bucket, or a local
//! layout. Remote sources come back wrapped in [`RetryingSource`]; a local layout is not,
//! because reading a file again reads the same bytes.

use std::sync::Arc;

use crate::model::reference::{ImageRef, ManifestSelector};
use crate::source::config::FetchConfig;
use crate::source::layout::LayoutSource;
use crate::source::registry::Registry;
use crate::source::retry::retry;
use crate::source::retrying::RetryingSource;
use crate::source::s3::S3Source;
use crate::source::{ImageSource, SourceError};

/// Opens the source a reference names and says which manifest in it the reference means.
/// For a registry this makes one request (`GET /v2/`) so that a wrong host, a dead registry or
/// a non-registry URL is reported before anything else.
pub async fn open(
    reference: &ImageRef,
    config: &FetchConfig,
) -> Result<(Arc<dyn ImageSource>, ManifestSelector), SourceError> {
    match reference {
        ImageRef::Registry(r) => {
            let registry = Registry::new(r, config)?;
            let what = || format!("registry {}", r.registry);
            retry(&config.retry, what, || async {
                Ok::<_, SourceError>(registry.ping().await?)
            })
            .await?;
            let repo = Arc::new(registry.repository(&r.repository));
            Ok((
                RetryingSource::wrap(repo, config.retry.clone()),
                r.selector(),
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
            ))
        }
        ImageRef::Layout(l) => {
            let layout = LayoutSource::open(&l.path)?;
            let selector = layout.selector(l)?;
            Ok((Arc::new(layout), selector))
        }
    }
}

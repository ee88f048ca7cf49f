//! containerd's snapshots gRPC service, answered by a [`Snapshotter`].
//!
//! containerd reaches a proxy snapshotter over a Unix socket and speaks the same API as its own
//! built-in ones. The server code is generated (build.rs) from the message types the
//! `containerd-client` crate generates from containerd's .proto files; this file only converts
//! between those messages and [`Snapshotter`] calls, and maps errors to the gRPC codes
//! containerd turns back into its error kinds (NotFound, AlreadyExists, ...), which its
//! unpacker and garbage collector act on.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use containerd_client::services::v1::snapshots as api;
use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::filter::SnapshotFilter;
use super::store::Kind;
use super::{SnapshotError, SnapshotInfo, Snapshotter};

/// `google.protobuf.Empty`, as prost maps it.
pub type Empty = ();

include!(concat!(
    env!("OUT_DIR"),
    "/containerd.services.snapshots.v1.Snapshots.rs"
));

use snapshots_server::{Snapshots, SnapshotsServer};

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Status {
        let message = e.to_string();
        match e {
            SnapshotError::NotFound(_) => Status::not_found(message),
            SnapshotError::AlreadyExists(_) => Status::already_exists(message),
            SnapshotError::FailedPrecondition(_) => Status::failed_precondition(message),
            SnapshotError::InvalidArgument(_) => Status::invalid_argument(message),
            SnapshotError::Io { .. } | SnapshotError::Remote { .. } => Status::internal(message),
        }
    }
}

fn timestamp(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

fn info(snapshot: SnapshotInfo) -> api::Info {
    let record = snapshot.record;
    api::Info {
        name: snapshot.name,
        parent: record.parent.unwrap_or_default(),
        kind: match record.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(record.created)),
        updated_at: Some(timestamp(record.updated)),
        labels: record.labels.into_iter().collect(),
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

struct Service(Arc<Snapshotter>);

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!("prepare {} on {:?}", r.key, r.parent);
        let mounts = self.0.prepare(&r.key, &r.parent, labels(r.labels)).await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self.0.view(&r.key, &r.parent, labels(r.labels)).await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let mounts = self.0.mounts(&request.into_inner().key).await?;
        Ok(Response::new(api::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        self.0.commit(&r.name, &r.key, labels(r.labels))?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.0.remove(&request.into_inner().key).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let snapshot = self.0.stat(&request.into_inner().key)?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info(snapshot)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(new) = r.info else {
            return Err(Status::invalid_argument("update without snapshot info"));
        };
        let fields = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let snapshot = self
            .0
            .update_labels(&new.name, labels(new.labels), &fields)?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info(snapshot)),
        }))
    }

    type ListStream =
        Pin<Box<dyn Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send + 'static>>;

    /// The snapshots the request's filters select, in batches.
    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filter = SnapshotFilter::parse(&request.into_inner().filters)
            .map_err(Status::invalid_argument)?;
        let infos: Vec<api::Info> = self
            .0
            .list()
            .into_iter()
            .filter(|s| filter.matches(s))
            .map(info)
            .collect();
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|batch| {
                Ok(api::ListSnapshotsResponse {
                    info: batch.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let (size, inodes) = self.0.usage(&request.into_inner().key)?;
        Ok(Response::new(api::UsageResponse {
            size: size as i64,
            inodes: inodes as i64,
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.0.cleanup()?;
        Ok(Response::new(()))
    }
}

/// Serves `snapshotter` on the Unix socket `address` until `shutdown` completes.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a previous process is in the way; nobody listens on it any more.
    let _ = std::fs::remove_file(address);
    let listener = tokio::net::UnixListener::bind(address)?;
    let incoming = tonic::codegen::tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service(snapshotter)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}

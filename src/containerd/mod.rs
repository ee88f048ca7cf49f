//! lazylayer inside containerd: [`snapshotter`] is the remote snapshotter (a gRPC proxy plugin
//! that mounts layers lazily), [`pull`] is `lazylayer pull`, which creates an image's snapshots
//! through containerd without downloading its layers.

pub mod pull;
pub mod snapshotter;

//! lazylayer inside containerd: [`snapshotter`] is the remote snapshotter (a gRPC proxy plugin
//! that mounts layers lazily), [`pull`] is `lazylayer pull`, which creates an image's snapshots
//! through containerd without downloading its layers, and [`cri_proxy`] keeps the kubelet's
//! registry credentials for the snapshotter.

pub mod cri_proxy;
pub mod pull;
pub mod snapshotter;

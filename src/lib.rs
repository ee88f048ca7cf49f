//! lazylayer: mount container images before they are downloaded.
//!
//! The read path, top to bottom; each stage is a folder (README.md, "Architecture"):
//!
//! ```text
//! mount (FUSE ops) ─► fs (ImageFs, merged tree) ─► fetch (ContentReader: plan, share, verify)
//!     ─► cache (memory LRU, disk tier) ─► layer (formats, codecs) ─► source (registry, layout, S3)
//! ```
//!
//! - [`model`]: what an image is: references, digests, OCI manifests, configs and media types;
//! - [`source`]: where bytes come from ([`source::ImageSource`]: registry, OCI layout, S3), the
//!   wrappers around it (retries, counting, disk-backed configs) stacked in one order by
//!   [`source::open::open_image`], and resolving a reference to one platform's image;
//! - [`layer`]: one module per layer format (eStargz, zstd:chunked, gzip + seek index, plain tar
//!   streams) turning a layer into a file table with chunk references;
//! - [`cache`]: the memory tier (an LRU per image), the disk tier (chunks and layer metadata
//!   across mounts) and the policy between them;
//! - [`fetch`]: file content through the caches: read planning, shared in-flight fetches,
//!   verified range requests, request priorities;
//! - [`fs`]: the opened image: merged tree, read-ahead, prefetch, start-up profiles, streamed
//!   reads;
//! - [`mount`]: FUSE operations, mount options, the control socket and metrics;
//! - [`containerd`]: the remote snapshotter and `lazylayer pull`;
//! - [`run`]: `lazylayer run`, a container from a lazily mounted image through runc;
//! - [`convert`]: rewriting images to eStargz / zstd:chunked and publishing gzip seek indexes;
//! - [`cli`]: the `lazylayer` command, its config file and its output.
//!
//! Modules import only from those below them in this list's read path (`model` ← `cache` ←
//! `source` ← `layer` ← `fetch` ← `fs` ← `mount` ← `containerd` ← `cli`; `convert` uses `layer`
//! and `source`, `run` uses `mount`), so that each can be read, and tested, without those above it.

pub mod cache;
pub mod cli;
pub mod containerd;
pub mod convert;
pub mod fetch;
pub mod fs;
pub mod layer;
pub mod model;
pub mod mount;
pub mod run;
pub mod source;

//! lazylayer: mount container images before they are downloaded.
//!
//! The read path, top to bottom (each stage is its own module; see README.md):
//!
//! ```text
//! FUSE op ─► merged tree ─► chunk ─► chunk cache ─► fetcher ─► source (registry, layout)
//! ```
//!
//! What exists so far is the bottom of that path and the image model:
//! - [`reference`]: image references, normalised as Docker does;
//! - [`digest`]: content digests and verification;
//! - [`oci`]: manifests, indexes, configs, platforms, layer media types and lazy indexes;
//! - [`registry`]: the distribution API client (auth, ranges, redirects);
//! - [`layout`]: local OCI image layouts;
//! - [`source`]: the trait both sources implement;
//! - [`image`]: resolving a reference to one platform's image;
//! - [`inspect`] and [`cli`]: the `lazylayer` command.

pub mod chunk;
pub mod cli;
pub mod config;
pub mod convert;
pub mod digest;
pub mod disk_cache;
pub mod image;
pub mod imagefs;
pub mod inspect;
pub mod layer;
pub mod layout;
pub mod listing;
pub mod mount;
pub mod oci;
pub mod profile;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod retry;
pub mod s3;
pub mod scheduler;
pub mod snapshotter;
pub mod source;
pub mod stats;
pub mod stream_read;
pub mod tree;

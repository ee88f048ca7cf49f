//! The image model: what the rest of lazylayer reads and writes, free of any I/O.
//!
//! [`reference`] parses what users type (normalised as Docker does), [`digest`] names and
//! verifies content, [`oci`] holds manifests, indexes, configs, platforms, media types and the
//! annotations that announce lazy indexes.

pub mod digest;
pub mod oci;
pub mod reference;

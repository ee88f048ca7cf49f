//! Where fetched bytes are kept. The memory tier (an LRU of verified chunks) lives beside the
//! reader that fills it in [`crate::fetch`]; [`disk`] is the tier that outlives a mount: verified
//! chunks by digest and layer metadata (TOCs, seek indexes, learned profiles), shared by every
//! mount and the snapshotter on one machine.

pub mod disk;

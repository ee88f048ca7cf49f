//! What the read-only subcommands print: `ls` listings and `inspect` reports.

pub mod inspect;
pub mod listing;

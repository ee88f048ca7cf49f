//! `cache`: looking after the machine's disk cache.

use super::args::{CacheAction, CacheArgs};
use super::error::CliError;
use super::options::{cache_dir_error, open_cache, size_flag};
use crate::cli::output::inspect::human_bytes;

pub(super) fn cache(args: CacheArgs) -> Result<(), CliError> {
    let budget = size_flag("cache-size", &args.cache_size)?;
    // Opening would create the directory: a command that only looks must not.
    if !args.cache_dir.is_dir() {
        return Err(cache_dir_error(&args.cache_dir)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no cache there",
        )));
    }
    let disk = open_cache(&args.cache_dir, u64::MAX)?;
    let (chunks, bytes) = (disk.chunks(), disk.bytes());
    match args.action {
        CacheAction::Stats => println!(
            "{}: {} chunks, {}",
            args.cache_dir.display(),
            chunks,
            human_bytes(bytes)
        ),
        CacheAction::Gc => {
            disk.trim(budget);
            println!(
                "{}: {} chunks, {} (removed {} chunks, {})",
                args.cache_dir.display(),
                disk.chunks(),
                human_bytes(disk.bytes()),
                chunks - disk.chunks(),
                human_bytes(bytes - disk.bytes())
            )
        }
        CacheAction::Clear => {
            disk.clear().map_err(cache_dir_error(&args.cache_dir))?;
            println!(
                "{}: removed {} chunks, {}",
                args.cache_dir.display(),
                chunks,
                human_bytes(bytes)
            );
        }
    }
    Ok(())
}

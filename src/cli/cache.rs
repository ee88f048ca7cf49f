//! `cache` and `profile`: looking after the machine's disk cache and the start-up profiles in it.

use super::args::{CacheAction, CacheArgs, ProfileAction, ProfileArgs};
use super::error::CliError;
use super::options::{cache_dir_error, open_cache, size_flag};
use super::read::write_stdout;
use crate::cli::output::inspect::human_bytes;
use crate::model::reference::ImageRef;
use crate::source::{self};

pub(super) async fn profile(args: ProfileArgs) -> Result<(), CliError> {
    let reference = ImageRef::parse(&args.reference)?;
    let (source, _) = source::open::open(&reference, &args.remote.registry_config()?).await?;
    let image = source.name();
    let disk = open_cache(&args.cache_dir, u64::MAX)?;
    let Some(profile) = crate::fs::profile::load(&disk, &image) else {
        return Err(CliError::Path {
            image,
            path: args.cache_dir.display().to_string(),
            reason: "no start-up profile recorded in this cache".into(),
        });
    };
    match args.action {
        ProfileAction::Show => {
            let mut out = String::new();
            for f in &profile.files {
                out.push('/');
                out.push_str(f);
                out.push('\n');
            }
            write_stdout(out.as_bytes())?;
        }
        ProfileAction::Clear => {
            std::fs::remove_file(
                disk.dir()
                    .join("meta")
                    .join(crate::fs::profile::file_name(&image)),
            )
            .map_err(cache_dir_error(&args.cache_dir))?;
            eprintln!(
                "lazylayer: removed the profile of {image} ({} files)",
                profile.files.len()
            );
        }
    }
    Ok(())
}

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

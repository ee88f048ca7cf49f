//! Reading an image without mounting it: `ls`, `cat` and `inspect`, and the image resolution
//! they share with `mount`.

use super::args::{CatArgs, InspectArgs, LsArgs, RemoteArgs};
use super::error::CliError;
use crate::cache::disk::DiskCache;
use crate::cli::output::inspect::{InspectReport, human_bytes};
use crate::cli::output::listing::{self, ListOptions};
use crate::fs::stream_read::{self, Outcome};
use crate::fs::tree::{NodeKind, ResolveError};
use crate::fs::{ImageFs, ImageFsError, ImageFsOptions};
use crate::model::reference::ImageRef;
use crate::source::open::{OpenedImage, open_image};
use crate::source::retry::RetryPolicy;
use crate::source::stats::FetchStats;

/// An image resolved to one platform, with the name errors give it and its retry policy.
pub(super) struct Resolved {
    pub name: String,
    pub opened: OpenedImage,
    pub retry: RetryPolicy,
}

pub(super) async fn resolve_image(
    reference: &str,
    remote: &RemoteArgs,
    disk: Option<std::sync::Arc<DiskCache>>,
) -> Result<Resolved, CliError> {
    let reference = ImageRef::parse(reference)?;
    let config = remote.registry_config()?;
    let opened = open_image(&reference, None, &config, &remote.platform()?, disk).await?;
    Ok(Resolved {
        name: reference.to_string(),
        opened,
        retry: config.retry,
    })
}

impl Resolved {
    async fn open(self) -> Result<(String, ImageFs), CliError> {
        let options = ImageFsOptions {
            retry: self.retry,
            ..ImageFsOptions::default()
        };
        let fs = ImageFs::open(self.opened, &options)
            .await
            .map_err(|source| CliError::Open {
                image: self.name.clone(),
                source,
            })?;
        Ok((self.name, fs))
    }
}

fn print_stats(stats: &FetchStats) {
    eprintln!(
        "fetched {} in {} requests (chunk cache: {} hits, {} misses)",
        human_bytes(FetchStats::get(&stats.bytes)),
        FetchStats::get(&stats.requests),
        FetchStats::get(&stats.cache_hits),
        FetchStats::get(&stats.cache_misses),
    );
}

fn path_error(image: &str, path: &str, e: ResolveError) -> CliError {
    CliError::Path {
        image: image.to_string(),
        path: path.to_string(),
        reason: e.to_string(),
    }
}

pub(super) async fn ls(args: LsArgs) -> Result<(), CliError> {
    let (name, fs) = resolve_image(&args.reference, &args.remote, None)
        .await?
        .open()
        .await?;
    // Like ls: a symlink to a directory is listed as the directory unless -l asks for the link.
    let ino = fs
        .tree
        .resolve(args.path.as_bytes(), !args.long)
        .map_err(|e| path_error(&name, &args.path, e))?;
    let options = ListOptions {
        long: args.long,
        recursive: args.recursive,
        all: args.all,
    };
    write_stdout_with(|out| listing::list(out, &fs.tree, ino, &args.path, options))?;
    if args.stats {
        print_stats(fs.stats());
    }
    Ok(())
}

/// Writes to stdout; a closed pipe (`| head`) ends output quietly, as it does for `cat`.
pub(super) fn write_stdout(bytes: &[u8]) -> Result<bool, CliError> {
    use std::io::Write;
    write_stdout_with(|out| out.write_all(bytes))
}

/// Lets `write` write to stdout as it goes (output too large to build first); a closed pipe
/// ends it quietly, as for [`write_stdout`]. Returns whether everything was written.
pub(super) fn write_stdout_with(
    write: impl FnOnce(&mut std::io::BufWriter<std::io::StdoutLock<'static>>) -> std::io::Result<()>,
) -> Result<bool, CliError> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::Output(e)),
    }
}

pub(super) async fn cat(args: CatArgs) -> Result<(), CliError> {
    /// How much to ask for at a time: several chunks, so their fetches run concurrently.
    const PIECE: u64 = 8 << 20;
    let resolved = resolve_image(&args.reference, &args.remote, None).await?;
    // Layers without an index would have to be downloaded whole before the tree exists; try to
    // find the file while they stream and print it as it arrives.
    if resolved
        .opened
        .image
        .layers
        .iter()
        .any(|l| l.lazy_index.is_none())
    {
        let mut output = Ok(());
        let mut printed = false;
        let outcome = stream_read::read_file(
            resolved.opened.source.clone(),
            &resolved.opened.image,
            args.path.as_bytes(),
            |data| match write_stdout(data) {
                Ok(more) => {
                    printed = true;
                    more
                }
                Err(e) => {
                    output = Err(e);
                    false
                }
            },
        )
        .await
        .map_err(|e| {
            if printed {
                CliError::Unverified {
                    image: resolved.name.clone(),
                    path: args.path.clone(),
                    source: Box::new(e),
                }
            } else {
                CliError::Open {
                    image: resolved.name.clone(),
                    source: ImageFsError::Layer(e),
                }
            }
        })?;
        output?;
        match outcome {
            Outcome::Done => {
                if args.stats {
                    print_stats(&resolved.opened.stats);
                }
                return Ok(());
            }
            Outcome::NotFound => {
                return Err(path_error(
                    &resolved.name,
                    &args.path,
                    ResolveError::NotFound,
                ));
            }
            Outcome::Fallback => {}
        }
    }
    let (name, fs) = resolved.open().await?;
    let ino = fs
        .tree
        .resolve(args.path.as_bytes(), true)
        .map_err(|e| path_error(&name, &args.path, e))?;
    let size = match &fs.tree.node(ino).map(|n| &n.kind) {
        Some(NodeKind::File { size, .. }) => *size,
        Some(NodeKind::Dir { .. }) => {
            return Err(path_error(&name, &args.path, ResolveError::IsADirectory));
        }
        _ => {
            return Err(CliError::Path {
                image: name,
                path: args.path,
                reason: "not a regular file".into(),
            });
        }
    };
    let mut offset = 0;
    while offset < size {
        let data = fs
            .read(ino, offset, PIECE)
            .await
            .map_err(|source| CliError::Read {
                image: name.clone(),
                path: args.path.clone(),
                source,
            })?;
        if data.is_empty() || !write_stdout(&data)? {
            break;
        }
        offset += data.len() as u64;
    }
    if args.stats {
        print_stats(fs.stats());
    }
    Ok(())
}

pub(super) async fn inspect(args: InspectArgs) -> Result<(), CliError> {
    let reference = ImageRef::parse(&args.reference)?;
    let config = args.remote.registry_config()?;
    let platform = args.remote.platform()?;
    let opened = open_image(&reference, None, &config, &platform, None).await?;
    let report = InspectReport::new(reference.to_string(), &opened.image);
    let text = if args.json {
        format!("{}\n", report.to_json())
    } else {
        report.to_text()
    };
    write_stdout(text.as_bytes())?;
    Ok(())
}

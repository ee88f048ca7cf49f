//! Command-line interface: the `lazylayer` binary's subcommands, dispatched to the library.
//!
//! - [`args`]: what clap parses; `options`: flags, config file and defaults merged into library
//!   options; `size`: sizes as users type them; [`error`]: what the user is told when
//!   something fails;
//! - one file per group of subcommands: `read` (`ls`, `cat`, `inspect`), `mount` (`mount`,
//!   `stats`), `containerd` (`snapshotter`, `pull`), `convert` (`convert`, `index`),
//!   `cache` (`cache`, `profile`), `run` (`run`);
//! - [`config`]: the config file; [`output`]: tables and reports.

pub mod args;
mod cache;
pub mod config;
mod containerd;
mod convert;
pub mod error;
mod mount;
mod options;
pub mod output;
mod profile;
mod read;
mod run;
mod size;

pub use args::Cli;
use args::Command;
pub use error::CliError;

/// Runs a parsed command line. Output goes to stdout; errors are returned for `main` to print.
/// The exit code is success, except for `run`, which passes its command's on.
pub async fn run(cli: Cli) -> Result<std::process::ExitCode, CliError> {
    let done = match cli.command {
        Command::Inspect(args) => read::inspect(args).await,
        Command::Ls(args) => read::ls(args).await,
        Command::Cat(args) => read::cat(args).await,
        Command::Mount(args) => mount::mount(args).await,
        Command::Umount(args) => mount::umount(args).await,
        Command::Stats(args) => mount::stats(args).await,
        Command::Cache(args) => cache::cache(args),
        Command::Profile(command) => profile::profile(command).await,
        Command::Snapshotter(args) => containerd::snapshotter(args).await,
        Command::CriProxy(args) => containerd::cri_proxy(args).await,
        // Served by `main` before any runtime starts.
        Command::FuseHolder => Ok(()),
        Command::Pull(args) => containerd::pull(args).await,
        Command::Convert(args) => convert::convert(args).await,
        Command::Index(args) => convert::index(args).await,
        Command::Run(args) => return run::run(args).await,
    };
    done.map(|()| std::process::ExitCode::SUCCESS)
}

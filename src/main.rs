//! The `lazylayer` binary: parse arguments, set up logging, run, report errors.

use std::process::ExitCode;

use clap::Parser;
use lazylayer::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "lazylayer=debug,info",
        _ => "lazylayer=trace,debug",
    };
    let spec = std::env::var("LAZYLAYER_LOG").ok();
    let mut filter = spec
        .as_deref()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(default_level));
    // fuser's own messages are routine for us, unless asked for by name or with -vv: it warns
    // about every operation a file system leaves to its defaults (those ENOSYS answers are
    // deliberate), "Failed to send FUSE reply: No such file or directory" is a reply to a
    // request the kernel already dropped (an interrupted read), and "Unmount failed: Invalid
    // argument" comes after every `umount`, which had already unmounted.
    if cli.verbose < 2 && !spec.as_deref().is_some_and(|s| s.contains("fuser")) {
        for quiet in ["fuser=error", "fuser::reply=off", "fuser::mnt=off"] {
            filter = filter.add_directive(quiet.parse().expect("a valid directive"));
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    if matches!(cli.command, cli::args::Command::FuseHolder) {
        // No runtime: the holder is one thread in a poll loop, the process that must not fail.
        let socket = lazylayer::mount::takeover::holder::socket_path(&lazylayer::mount::run_dir());
        return match lazylayer::mount::takeover::holder::serve(&socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lazylayer: error: fuse holder on {}: {e}", socket.display());
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lazylayer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lazylayer: error: {e}");
            ExitCode::FAILURE
        }
    };
    // Work still running on blocking threads (a layer stream after another layer failed) would
    // panic when the runtime's drivers shut down under it; the process is ending anyway.
    std::mem::forget(runtime);
    code
}

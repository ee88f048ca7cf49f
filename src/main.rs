//! The `lazylayer` binary: parse arguments, set up logging, run, report errors.

use std::process::ExitCode;

use clap::Parser;
use lazylayer::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // fuser warns about every operation a file system leaves to its defaults; those answers
    // (ENOSYS) are deliberate here, so only its errors are shown.
    let default_level = match cli.verbose {
        0 => "warn,fuser=error",
        1 => "lazylayer=debug,info,fuser=error",
        _ => "lazylayer=trace,debug",
    };
    let filter =
        EnvFilter::try_from_env("LAZYLAYER_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

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
        Ok(()) => ExitCode::SUCCESS,
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

//! Command-line interface: argument definitions and dispatch to the library.
//!
//! Each subcommand's options are a struct here; shared remote options (auth, plain HTTP,
//! timeouts, platform) are one flattened struct so every command that reads an image spells them
//! the same way. The help text is written for someone who has never used lazylayer.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::image::{self, ImageError};
use crate::inspect::InspectReport;
use crate::oci::Platform;
use crate::reference::{ImageRef, ReferenceError};
use crate::registry::RegistryConfig;
use crate::registry::auth::Credentials;
use crate::source::{self, SourceError};

#[derive(Parser, Debug)]
#[command(
    name = "lazylayer",
    version,
    about = "Mount container images before they are downloaded",
    long_about = "lazylayer reads container images straight from an OCI registry (or a local OCI \
layout), fetching only the bytes that are used.\n\n\
Image references follow Docker's rules: `python:3.12` is docker.io/library/python:3.12, \
`HOST:PORT/NAME[:TAG][@sha256:DIGEST]` names another registry, and `oci:PATH[:TAG]` an OCI \
image layout directory.",
    after_help = "Examples:\n  \
lazylayer inspect python:3.12\n  \
lazylayer inspect --json 127.0.0.1:5000/test/python-app:latest\n  \
lazylayer inspect --platform linux/arm64 ghcr.io/OWNER/IMAGE:TAG\n  \
lazylayer inspect oci:./images:python-app\n\n\
Set LAZYLAYER_LOG=debug (or -v) to see each request."
)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). LAZYLAYER_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show an image's manifest, platform and layers, and which layers carry a lazy index.
    #[command(
        long_about = "Resolve REF to one image manifest (choosing the platform from an index), \
fetch its config, and list each layer: digest, media type, compressed size, and whether it \
carries a lazy index (an eStargz TOC or zstd:chunked annotations) that lets lazylayer read it \
without downloading it whole. No layer bytes are fetched."
    )]
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Image reference: NAME[:TAG], HOST[:PORT]/NAME[:TAG][@DIGEST], or oci:PATH[:TAG].
    pub reference: String,

    /// Print the report as JSON (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Options for reaching an image's source. Shared by every command that reads an image.
#[derive(Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Platform to pick from a multi-platform image, as OS/ARCH[/VARIANT].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", default_value_t = Platform::host().to_string())]
    pub platform: String,

    /// Talk plain HTTP to the registry (loopback registries get it without asking).
    #[arg(long)]
    pub plain_http: bool,

    /// Registry credentials as USER:PASSWORD. Without it, Docker's config.json is read.
    #[arg(
        long,
        short = 'u',
        value_name = "USER:PASSWORD",
        env = "LAZYLAYER_USER",
        hide_env_values = true
    )]
    pub user: Option<String>,

    /// Docker config file to read credentials from [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json].
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,

    /// Seconds to wait for a connection to the registry.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Seconds without a byte before a transfer is abandoned as stalled.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub stall_timeout: f64,
}

/// Errors of the command-line layer: bad arguments, or a failure below, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("--platform: {0}")]
    Platform(String),
    #[error("--user: {0}")]
    User(String),
    #[error("--{name}: {value} is not a positive number of seconds")]
    Timeout { name: &'static str, value: f64 },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

fn seconds(name: &'static str, value: f64) -> Result<Duration, CliError> {
    if value.is_finite() && value > 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(CliError::Timeout { name, value })
    }
}

impl RemoteArgs {
    pub fn registry_config(&self) -> Result<RegistryConfig, CliError> {
        let mut config = RegistryConfig {
            plain_http: self.plain_http,
            credentials: self
                .user
                .as_deref()
                .map(Credentials::parse)
                .transpose()
                .map_err(CliError::User)?,
            connect_timeout: seconds("connect-timeout", self.connect_timeout)?,
            stall_timeout: seconds("stall-timeout", self.stall_timeout)?,
            ..RegistryConfig::default()
        };
        if let Some(path) = &self.docker_config {
            config.docker_config = Some(path.clone());
        }
        Ok(config)
    }

    pub fn platform(&self) -> Result<Platform, CliError> {
        Platform::parse(&self.platform).map_err(CliError::Platform)
    }
}

/// Runs a parsed command line. Output goes to stdout; errors are returned for `main` to print.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Inspect(args) => inspect(args).await,
    }
}

async fn inspect(args: InspectArgs) -> Result<(), CliError> {
    let reference = ImageRef::parse(&args.reference)?;
    let platform = args.remote.platform()?;
    let config = args.remote.registry_config()?;
    let (source, selector) = source::open(&reference, &config).await?;
    let image = image::resolve(source.as_ref(), &selector, &platform).await?;
    let report = InspectReport::new(reference.to_string(), &image);
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

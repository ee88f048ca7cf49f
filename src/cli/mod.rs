//! Command-line interface: argument definitions and dispatch to the library.
//!
//! Each subcommand's options are a struct here; shared remote options (auth, plain HTTP,
//! timeouts, platform) are one flattened struct so every command that reads an image spells them
//! the same way. The help text is written for someone who has never used lazylayer.

pub mod config;
pub mod output;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cache::disk::DiskCache;
use crate::cli::config::{ConfigError, ConfigFile};
use crate::cli::output::inspect::{InspectReport, human_bytes};
use crate::cli::output::listing::{self, ListOptions};
use crate::fetch::ContentError;
use crate::fs::stream_read::{self, Outcome};
use crate::fs::tree::{NodeKind, ResolveError};
use crate::fs::{ImageFs, ImageFsError, ImageFsOptions};
use crate::model::oci::Platform;
use crate::model::reference::{ImageRef, ReferenceError};
use crate::source::config::Credentials;
use crate::source::config::FetchConfig;
use crate::source::image::ImageError;
use crate::source::open::{OpenedImage, open_image};
use crate::source::retry::RetryPolicy;
use crate::source::stats::FetchStats;
use crate::source::{self, SourceError};

#[derive(Parser, Debug)]
#[command(
    name = "lazylayer",
    version,
    about = "Mount container images before they are downloaded",
    long_about = "lazylayer reads container images straight from an OCI registry (or a local OCI \
layout), fetching only the bytes that are used.\n\n\
Image references follow Docker's rules: `python:3.12` is docker.io/library/python:3.12, \
`HOST:PORT/NAME[:TAG][@sha256:DIGEST]` names another registry, `oci:PATH[:TAG]` an OCI \
image layout directory, and `s3://BUCKET/PREFIX[:TAG]` an OCI image layout in an S3 bucket \
(credentials as the AWS tools find them: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE \
and ~/.aws/credentials; --s3-endpoint for S3-compatible stores).",
    after_help = "Examples:\n  \
lazylayer inspect python:3.12\n  \
lazylayer inspect --json 127.0.0.1:5000/test/python-app:latest\n  \
lazylayer inspect --platform linux/arm64 ghcr.io/OWNER/IMAGE:TAG\n  \
lazylayer inspect oci:./images:python-app\n  \
lazylayer ls --s3-endpoint http://127.0.0.1:9000 s3://images/python-app:latest /app\n  \
lazylayer ls -l 127.0.0.1:5000/test/python-app:latest /app\n  \
lazylayer cat 127.0.0.1:5000/test/python-app:latest /etc/os-release\n  \
lazylayer mount --daemon 127.0.0.1:5000/test/python-app:latest /mnt/app\n\n\
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

    /// List a directory of an image's merged filesystem without mounting or pulling it.
    #[command(
        long_about = "List PATH (default /) in the merged filesystem of image REF: all layers \
applied, deletions (whiteouts) honoured. Layers with a lazy index (eStargz, zstd:chunked) cost \
one request each for their table of contents; layers without one are streamed once to index \
them. File contents are not fetched.\n\nOwners are printed as numbers and times in UTC."
    )]
    Ls(LsArgs),

    /// Print a file of an image, fetching only the chunks it needs.
    #[command(
        long_about = "Write the file at PATH in image REF to standard output. Symlinks are \
followed inside the image. With a lazy index only the file's chunks are fetched, each verified \
against its digest before it is printed."
    )]
    Cat(CatArgs),

    /// Mount an image read-only; files are fetched as they are read.
    #[command(
        long_about = "Mount the merged filesystem of image REF at DIR, read-only, and return \
once the mount is serving: layer tables of contents are loaded, no file contents are fetched. \
A read then fetches only the chunks it needs (each verified against its digest) and keeps them \
in a memory cache shared by all files of the mount.\n\n\
Runs in the foreground until Ctrl-C or SIGTERM, then unmounts. With --daemon it returns as soon \
as the mount serves and keeps serving in the background; stop it with `lazylayer umount DIR`.\n\n\
Layers without a lazy index (plain gzip) are streamed once while mounting, to index them.",
        after_help = "Examples:\n  \
mkdir -p /mnt/app && lazylayer mount --daemon 127.0.0.1:5000/test/app:latest /mnt/app\n  \
chroot /mnt/app python3 /app/main.py\n  \
lazylayer stats /mnt/app\n  \
lazylayer umount /mnt/app"
    )]
    Mount(MountArgs),

    /// Unmount a lazylayer mount (the daemon serving it then exits).
    Umount(UmountArgs),

    /// Show what a running mount has fetched: per layer bytes, requests, cache hits, latency.
    Stats(StatsArgs),

    /// Inspect or trim the disk cache: `cache stats`, `cache gc`, `cache clear`.
    #[command(
        long_about = "The disk cache holds verified chunks named by their digest, shared by every \
image and mount, plus the tables of contents and configs needed to remount without the network. \
`stats` shows its size; `gc` deletes least recently used chunks until it fits --cache-size; \
`clear` deletes everything (running mounts keep working from memory and the network)."
    )]
    Cache(CacheArgs),

    /// Show or delete an image's learned start-up profile (the files its start read, in order).
    Profile(ProfileArgs),

    /// Serve containerd's snapshots API: image layers are mounted lazily instead of unpacked.
    #[command(
        long_about = "Run a containerd snapshotter (a `[proxy_plugins]` entry of type \
\"snapshot\") on the Unix socket --address. Layers that carry a lazy index (eStargz, \
zstd:chunked) and are pulled with `lazylayer pull` (or by the CRI plugin with snapshot \
annotations) are not downloaded: the snapshotter mounts the image's layers as one lazily \
fetched filesystem and containers run on overlayfs over it. Other layers are unpacked by \
containerd as usual.\n\n\
Runs in the foreground until SIGTERM or Ctrl-C. Snapshots survive restarts: on start, the \
mounts of existing snapshots are made again.",
        after_help = "Examples:\n  \
lazylayer snapshotter --address /run/lazylayer/snapshotter.sock --root /var/lib/lazylayer/snapshotter\n\n\
containerd config (then restart containerd):\n  \
[proxy_plugins]\n    [proxy_plugins.lazylayer]\n      type = \"snapshot\"\n      \
address = \"/run/lazylayer/snapshotter.sock\"\n\n\
Then: lazylayer pull REF && ctr run --snapshotter lazylayer --rm REF NAME CMD"
    )]
    Snapshotter(SnapshotterArgs),

    /// Rewrite an image as eStargz or zstd:chunked so that it can be mounted lazily.
    #[command(
        long_about = "Read image SRC (registry reference, oci:PATH[:TAG] or s3://...), rewrite \
every layer as eStargz (gzip members per chunk plus a table of contents; the default) or \
zstd:chunked (--format zstd-chunked: zstd frames per chunk) and write the result to DST: an \
OCI layout (oci:PATH[:TAG]) or a registry reference (pushed). The result is still an ordinary \
tar+gzip (tar+zstd) image that every client pulls and runs; lazylayer, stargz-snapshotter and \
other lazy readers fetch it chunk by chunk.\n\n\
Converting the same input twice gives byte-identical layers, config and manifest.\n\n\
--prioritize FILE lists paths (one per line) that the image needs at start-up: they are put \
first in their layer, followed by the prefetch landmark, and a mount fetches them at once.",
        after_help = "Examples:\n  \
lazylayer convert oci:../shared/images:python-app oci:/tmp/out:python-app-esgz\n  \
lazylayer convert 127.0.0.1:5000/test/app:latest 127.0.0.1:5000/test/app:esgz\n  \
lazylayer convert --prioritize startup.txt python:3.12 registry.example.com/python:3.12-esgz"
    )]
    Convert(ConvertArgs),

    /// Publish seek indexes for an image's gzip layers, so that it mounts lazily as it is.
    #[command(
        long_about = "For every plain gzip layer of REF (an image in a registry), stream the layer once and build a seek index: checkpoints of the gzip decompressor (with their 32 KiB windows) every --span bytes of output, and the layer's file table with a digest per chunk. The indexes are pushed as one OCI artifact whose subject is REF's manifest; the image itself is not changed, so its digest and every client that pulls it are unaffected.\n\n`mount`, `pull` and the snapshotter find the artifact through the registry's referrers API, or the `sha256-HEX` fallback tag written for registries without it, and read those layers lazily: a file costs one ranged request for the span around it. Layers that are already eStargz or zstd:chunked are left alone. Running it twice publishes the same bytes.",
        after_help = "Examples:\n  \
lazylayer index 127.0.0.1:5000/test/app:latest\n  \
lazylayer mount 127.0.0.1:5000/test/app:latest /mnt/app   # now lazy"
    )]
    Index(IndexArgs),

    /// Pull an image into containerd lazily (for `ctr run --snapshotter lazylayer`).
    #[command(
        long_about = "Resolve REF, and create it in containerd as `ctr pull` would, but unpack \
through the lazylayer snapshotter with the labels that let it mount lazy layers instead of \
downloading them. Layers without a lazy index are downloaded and unpacked by containerd. \
Registry options are the same as for `inspect`.",
        after_help = "Examples:\n  \
lazylayer pull 127.0.0.1:5000/test/python-app:esgz\n  \
ctr run --rm --snapshotter lazylayer 127.0.0.1:5000/test/python-app:esgz app1 python3 /app/main.py"
    )]
    Pull(PullArgs),
}

#[derive(Args, Debug)]
pub struct SnapshotterArgs {
    /// Unix socket to serve containerd's snapshots API on.
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/run/lazylayer/snapshotter.sock"
    )]
    pub address: PathBuf,

    /// Where snapshots and their metadata live (keep it across restarts).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/lazylayer/snapshotter"
    )]
    pub root: PathBuf,

    #[command(flatten)]
    pub read: ReadArgs,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Image to convert: NAME[:TAG], HOST[:PORT]/NAME[:TAG][@DIGEST], oci:PATH[:TAG], s3://...
    pub source: String,

    /// Where to write it: oci:PATH[:TAG] (an OCI layout) or HOST[:PORT]/NAME[:TAG] (pushed).
    pub destination: String,

    /// Layer format to write.
    #[arg(long, value_enum, default_value = "estargz")]
    pub format: ConvertFormat,

    /// File listing the paths needed at start-up, one per line: written first, before the
    /// prefetch landmark.
    #[arg(long, value_name = "FILE")]
    pub prioritize: Option<PathBuf>,

    /// Print nothing but errors.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Image to index: NAME[:TAG] or HOST[:PORT]/NAME[:TAG][@DIGEST].
    pub reference: String,

    /// Uncompressed bytes between checkpoints. A cold read fetches and inflates the span around
    /// it; smaller spans fetch less per read and make a bigger index (32 KiB per checkpoint).
    #[arg(long, value_name = "SIZE", default_value = "2M")]
    pub span: String,

    /// Print nothing but errors.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ConvertFormat {
    /// gzip members per chunk and a TOC at the end (stargz-snapshotter, lazylayer).
    Estargz,
    /// zstd frames per chunk and a TOC in a skippable frame (containers/storage, lazylayer).
    ZstdChunked,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image reference: NAME[:TAG] or HOST[:PORT]/NAME[:TAG][@DIGEST].
    pub reference: String,

    /// containerd's socket.
    #[arg(
        long,
        short = 'a',
        value_name = "SOCKET",
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub address: PathBuf,

    /// containerd namespace to create the image in.
    #[arg(
        long,
        short = 'n',
        value_name = "NAME",
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,

    /// Snapshotter to unpack into, as named in containerd's config.
    #[arg(long, value_name = "NAME", default_value = "lazylayer")]
    pub snapshotter: String,

    /// Print nothing but errors.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Args, Debug)]
pub struct ProfileArgs {
    #[arg(value_enum)]
    pub action: ProfileAction,

    /// Image reference (profiles are kept per repository).
    pub reference: String,

    /// The disk cache directory the profile lives in.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/lazylayer/cache")]
    pub cache_dir: PathBuf,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ProfileAction {
    Show,
    Clear,
}

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[arg(value_enum)]
    pub action: CacheAction,

    /// The disk cache directory.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/lazylayer/cache")]
    pub cache_dir: PathBuf,

    /// With gc: the size to trim to, e.g. 5G.
    #[arg(long, value_name = "SIZE", default_value = "10G")]
    pub cache_size: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CacheAction {
    Stats,
    Gc,
    Clear,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Image reference: NAME[:TAG], HOST[:PORT]/NAME[:TAG][@DIGEST], or oci:PATH[:TAG].
    pub reference: String,

    /// Existing directory to mount on.
    pub dir: PathBuf,

    /// Return once the mount serves, and keep serving in the background.
    #[arg(long)]
    pub daemon: bool,

    /// Let other users access the mount (for containers running as non-root users).
    #[arg(long)]
    pub allow_other: bool,

    /// Honour setuid bits and device nodes in the image. Off by default (nosuid,nodev): an
    /// image is untrusted input. Turn on only for a container rootfs you trust.
    #[arg(long)]
    pub suid_dev: bool,

    #[command(flatten)]
    pub read: ReadArgs,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// With --daemon: where the daemon writes its log [default: RUN_DIR/mount-ID.log].
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// How an image's contents are read and cached; shared by `mount` and `snapshotter`.
#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// Grow a read's request with the chunks that follow it in the layer, up to this many
    /// compressed bytes (0: off). Start-up reads many small neighbouring files; one larger
    /// request costs less than their round trips.
    #[arg(long, value_name = "SIZE", default_value = "512K")]
    pub amplify_io: String,

    /// Memory for cached chunks, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory_cache_size: String,

    /// Directory of the disk cache (chunks by digest, shared by all images and kept across
    /// restarts); `none` keeps chunks in memory only.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/lazylayer/cache")]
    pub cache_dir: PathBuf,

    /// Disk space the cache may use, e.g. 10G.
    #[arg(long, value_name = "SIZE", default_value = "10G")]
    pub cache_size: String,

    /// Do not fetch the rest of the image into the disk cache in the background.
    #[arg(long)]
    pub no_background_fetch: bool,

    /// Bandwidth the background fetch may use, per second (readers always go first).
    #[arg(long, value_name = "SIZE", default_value = "32M")]
    pub background_bandwidth: String,

    /// Requests in flight to the registry at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub max_requests: usize,

    /// Seconds after mounting during which first reads are recorded as the image's start-up
    /// profile (prefetched on the next mount); 0 turns profiles off.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub profile_window: f64,
}

impl ReadArgs {
    /// The disk cache these flags ask for (`None` for `--cache-dir none`).
    pub fn disk_cache(&self) -> Result<Option<std::sync::Arc<DiskCache>>, CliError> {
        if self.cache_dir.as_os_str() == "none" {
            return Ok(None);
        }
        let budget = size_flag("cache-size", &self.cache_size)?;
        Ok(Some(std::sync::Arc::new(open_cache(
            &self.cache_dir,
            budget,
        )?)))
    }

    /// Options for opening an image with these flags, the given disk tier and retry policy.
    pub fn image_fs_options(
        &self,
        disk: Option<std::sync::Arc<DiskCache>>,
        retry: RetryPolicy,
    ) -> Result<ImageFsOptions, CliError> {
        let background = size_flag("background-bandwidth", &self.background_bandwidth)?;
        Ok(ImageFsOptions {
            cache_bytes: size_flag("memory-cache-size", &self.memory_cache_size)?,
            disk,
            request_slots: self.max_requests.max(1),
            background_bytes_per_second: (!self.no_background_fetch && background > 0)
                .then_some(background),
            profile_window: (self.profile_window > 0.0)
                .then(|| seconds("profile-window", self.profile_window))
                .transpose()?,
            retry,
            amplify_bytes: size_flag("amplify-io", &self.amplify_io)?,
        })
    }
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    /// The mount point.
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// The mount point.
    pub dir: PathBuf,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Image reference: NAME[:TAG], HOST[:PORT]/NAME[:TAG][@DIGEST], or oci:PATH[:TAG].
    pub reference: String,

    /// Path inside the image.
    #[arg(default_value = "/")]
    pub path: String,

    /// Long format: mode, links, owner, group, size, mtime, symlink targets.
    #[arg(short = 'l')]
    pub long: bool,

    /// List subdirectories recursively.
    #[arg(short = 'R')]
    pub recursive: bool,

    /// Include names that start with a dot.
    #[arg(short = 'a')]
    pub all: bool,

    /// Print bytes and requests fetched (to standard error).
    #[arg(long)]
    pub stats: bool,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    /// Image reference: NAME[:TAG], HOST[:PORT]/NAME[:TAG][@DIGEST], or oci:PATH[:TAG].
    pub reference: String,

    /// Path of the file inside the image.
    pub path: String,

    /// Print bytes and requests fetched (to standard error).
    #[arg(long)]
    pub stats: bool,

    #[command(flatten)]
    pub remote: RemoteArgs,
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

    /// Seconds to wait for a connection to the registry [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub connect_timeout: Option<f64>,

    /// Seconds without a byte before one attempt is abandoned as stalled (and retried)
    /// [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub stall_timeout: Option<f64>,

    /// Attempts per remote read before it fails; a failed range read resumes at the first
    /// byte not yet received [default: 5].
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Seconds a read may go without receiving a byte, retries included, before it fails
    /// (EIO in a mount) [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub read_timeout: Option<f64>,

    /// Endpoint of an S3-compatible store for s3:// references, e.g. http://127.0.0.1:9000
    /// (path-style addressing) [default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS].
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// Region for s3:// references [default: $AWS_REGION, $AWS_DEFAULT_REGION, the profile's
    /// region in ~/.aws/config, else us-east-1].
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,

    /// Config file with defaults for these options (TOML, `[fetch]` section)
    /// [default: /etc/lazylayer/config.toml if it exists].
    #[arg(long, value_name = "FILE", env = "LAZYLAYER_CONFIG")]
    pub config: Option<PathBuf>,
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
    #[error("--max-attempts: must be at least 1")]
    Attempts,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("image {image}: {source}")]
    Open { image: String, source: ImageFsError },
    #[error("image {image}: {path}: {reason}")]
    Path {
        image: String,
        path: String,
        reason: String,
    },
    #[error("image {image}: {path}: {source}")]
    Read {
        image: String,
        path: String,
        source: std::sync::Arc<ContentError>,
    },
    #[error(
        "image {image}: {path} was printed as it streamed, but its layer could not be verified \
         afterwards, so the output must not be trusted: {source}"
    )]
    Unverified {
        image: String,
        path: String,
        source: Box<crate::layer::LayerError>,
    },
    #[error("{0}")]
    Size(String),
    #[error("--cache-dir {dir}: {source}")]
    CacheDir { dir: String, source: std::io::Error },
    #[error(transparent)]
    Mount(#[from] crate::mount::MountError),
    #[error("{dir}: no lazylayer mount answers there ({socket}: {source})")]
    NoMount {
        dir: String,
        socket: String,
        source: std::io::Error,
    },
    #[error("starting the background daemon: {0}")]
    Daemon(String),
    #[error(transparent)]
    Snapshot(#[from] crate::containerd::snapshotter::SnapshotError),
    #[error(transparent)]
    Pull(#[from] crate::containerd::pull::PullError),
    #[error(transparent)]
    Convert(#[from] crate::convert::ConvertError),
    #[error("--prioritize {path}: {reason}")]
    Prioritize { path: String, reason: String },
    #[error("--address {address}: {source}")]
    Serve {
        address: String,
        source: std::io::Error,
    },
    #[error("writing to standard output: {0}")]
    Output(std::io::Error),
}

fn seconds(name: &'static str, value: f64) -> Result<Duration, CliError> {
    if value.is_finite() && value > 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(CliError::Timeout { name, value })
    }
}

impl RemoteArgs {
    /// The registry settings: flags first, then the config file, then built-in defaults.
    pub fn registry_config(&self) -> Result<FetchConfig, CliError> {
        let file = ConfigFile::load(self.config.as_deref())?.fetch;
        let defaults = FetchConfig::default();
        let secs = |name: &'static str, flag: Option<f64>, file: Option<f64>, default: Duration| {
            flag.or(file).map_or(Ok(default), |v| seconds(name, v))
        };
        let retry = RetryPolicy {
            max_attempts: self
                .max_attempts
                .or(file.max_attempts)
                .unwrap_or(defaults.retry.max_attempts),
            read_timeout: secs(
                "read-timeout",
                self.read_timeout,
                file.read_timeout,
                defaults.retry.read_timeout,
            )?,
            initial_backoff: secs(
                "initial_backoff",
                None,
                file.initial_backoff,
                defaults.retry.initial_backoff,
            )?,
            max_backoff: secs(
                "max_backoff",
                None,
                file.max_backoff,
                defaults.retry.max_backoff,
            )?,
        };
        if retry.max_attempts == 0 {
            return Err(CliError::Attempts);
        }
        let mut config = FetchConfig {
            plain_http: self.plain_http,
            credentials: self
                .user
                .as_deref()
                .map(Credentials::parse)
                .transpose()
                .map_err(CliError::User)?,
            connect_timeout: secs(
                "connect-timeout",
                self.connect_timeout,
                file.connect_timeout,
                defaults.connect_timeout,
            )?,
            stall_timeout: secs(
                "stall-timeout",
                self.stall_timeout,
                file.stall_timeout,
                defaults.stall_timeout,
            )?,
            retry,
            s3: crate::source::config::S3Config {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
            },
            ..defaults
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
        Command::Ls(args) => ls(args).await,
        Command::Cat(args) => cat(args).await,
        Command::Mount(args) => mount(args).await,
        Command::Umount(args) => {
            crate::mount::unmount(&args.dir)?;
            Ok(())
        }
        Command::Stats(args) => stats(args).await,
        Command::Cache(args) => cache(args),
        Command::Profile(args) => profile(args).await,
        Command::Snapshotter(args) => snapshotter(args).await,
        Command::Pull(args) => pull(args).await,
        Command::Convert(args) => convert(args).await,
        Command::Index(args) => index(args).await,
    }
}

/// Parses sizes such as `512M`, `2G`, `65536` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 512M or 2G"))?;
    let shift = match unit
        .trim_end_matches(['B', 'b', 'i'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A size option's value, or an error naming the option.
fn size_flag(flag: &str, value: &str) -> Result<u64, CliError> {
    parse_size(value).map_err(|e| CliError::Size(format!("--{flag}: {e}")))
}

/// Opens the disk cache at `dir` (creating it), or an error naming the directory.
fn open_cache(dir: &std::path::Path, budget: u64) -> Result<DiskCache, CliError> {
    DiskCache::open(dir, budget).map_err(cache_dir_error(dir))
}

fn cache_dir_error(dir: &std::path::Path) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |source| CliError::CacheDir {
        dir: dir.display().to_string(),
        source,
    }
}

/// Environment variable that tells a daemon child to report readiness on stdout.
const READY_ENV: &str = "LAZYLAYER_REPORT_READY";

async fn mount(args: MountArgs) -> Result<(), CliError> {
    // Bad sizes are reported before a daemon is started.
    args.read.image_fs_options(None, RetryPolicy::default())?;
    if args.daemon {
        return daemonize(&args);
    }
    let disk = args.read.disk_cache()?;
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(
            crate::mount::metrics::bind(addr)
                .await
                .map_err(|e| CliError::Daemon(format!("--metrics-addr {addr}: {e}")))?,
        ),
        None => None,
    };
    let resolved = resolve_image(&args.reference, &args.remote, disk.clone()).await?;
    let name = resolved.name.clone();
    let options = args.read.image_fs_options(disk, resolved.retry)?;
    let fs = ImageFs::open(resolved.opened, &options)
        .await
        .map_err(|source| CliError::Open {
            image: name.clone(),
            source,
        })?;
    let fs = std::sync::Arc::new(fs);
    let mount_options = crate::mount::MountOptions {
        allow_other: args.allow_other,
        suid_dev: args.suid_dev,
        ..Default::default()
    };
    let session = crate::mount::mount(
        fs.clone(),
        &args.dir,
        &mount_options,
        tokio::runtime::Handle::current(),
    )?;
    let companions = crate::mount::Companions::start(fs.clone(), &args.dir);
    let metrics = metrics_listener.map(|listener| {
        let fs = fs.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::mount::metrics::serve(listener, fs).await {
                tracing::error!("metrics endpoint: {e}");
            }
        })
    });
    if std::env::var_os(READY_ENV).is_some() {
        println!("ready");
    } else {
        eprintln!(
            "lazylayer: {name} mounted at {} (Ctrl-C to unmount; `lazylayer stats {}` for figures)",
            args.dir.display(),
            args.dir.display()
        );
    }
    // The session ends when the file system is unmounted, by us on a signal or by anyone else.
    let mut ended = tokio::task::spawn_blocking(move || session.join());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Daemon(e.to_string()))?;
    let unmount_requested = tokio::select! {
        _ = &mut ended => false,
        _ = tokio::signal::ctrl_c() => true,
        _ = terminate.recv() => true,
    };
    if unmount_requested {
        crate::mount::unmount(&args.dir)?;
        let _ = ended.await;
    } else {
        // The connection ended without an unmount (aborted through fusectl): do not leave a
        // dead mount point behind. An ordinary `umount` already removed it; that error is moot.
        let _ = crate::mount::unmount(&args.dir);
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    companions.stop();
    Ok(())
}

async fn snapshotter(args: SnapshotterArgs) -> Result<(), CliError> {
    use crate::containerd::snapshotter::{Snapshotter, SnapshotterConfig, service};
    let disk = args.read.disk_cache()?;
    let registry = args.remote.registry_config()?;
    let config = SnapshotterConfig {
        root: args.root.clone(),
        platform: args.remote.platform()?,
        image_fs: args.read.image_fs_options(disk, registry.retry.clone())?,
        registry,
    };
    let snapshotter = std::sync::Arc::new(Snapshotter::open(config).await?);
    let recovery = tokio::spawn({
        let snapshotter = snapshotter.clone();
        async move { snapshotter.recover().await }
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Daemon(e.to_string()))?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    eprintln!(
        "lazylayer: snapshotter serving on {} (root {})",
        args.address.display(),
        args.root.display()
    );
    let served = service::serve(snapshotter.clone(), &args.address, shutdown).await;
    recovery.abort();
    snapshotter.close().await;
    served.map_err(|source| CliError::Serve {
        address: args.address.display().to_string(),
        source,
    })
}

/// A progress bar per layer on a terminal (bytes read and rate); one line per finished layer
/// when standard error is not a terminal.
struct ConvertProgress {
    bars: indicatif::MultiProgress,
    layers: std::sync::Mutex<std::collections::HashMap<usize, indicatif::ProgressBar>>,
}

impl ConvertProgress {
    /// Bars per layer, or nothing at all with `--quiet`.
    fn unless_quiet(quiet: bool) -> std::sync::Arc<dyn crate::convert::Progress> {
        if quiet {
            std::sync::Arc::new(crate::convert::Silent)
        } else {
            std::sync::Arc::new(ConvertProgress {
                bars: indicatif::MultiProgress::new(),
                layers: Default::default(),
            })
        }
    }
}

impl crate::convert::Progress for ConvertProgress {
    fn layer_started(&self, index: usize, count: usize, source: &crate::model::oci::Descriptor) {
        let bar = self.bars.add(indicatif::ProgressBar::new_spinner());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {spinner} {bytes} read ({bytes_per_sec}) {elapsed}",
            )
            .expect("static template"),
        );
        bar.set_prefix(format!(
            "layer {}/{count} {}",
            index + 1,
            source.digest.short()
        ));
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        self.layers.lock().unwrap().insert(index, bar);
    }

    fn layer_read(&self, index: usize, bytes: u64) {
        if let Some(bar) = self.layers.lock().unwrap().get(&index) {
            bar.inc(bytes);
        }
    }

    fn layer_done(
        &self,
        index: usize,
        count: usize,
        source: &crate::model::oci::Descriptor,
        new: &crate::model::oci::Descriptor,
    ) {
        let mb = |n: u64| n as f64 / 1e6;
        let Some(bar) = self.layers.lock().unwrap().remove(&index) else {
            return;
        };
        let line = format!(
            "layer {}/{count} {} ({:.1} MB) -> {} ({:.1} MB), {:.1} s",
            index + 1,
            source.digest.short(),
            mb(source.size),
            new.digest.short(),
            mb(new.size),
            bar.elapsed().as_secs_f64()
        );
        if self.bars.is_hidden() {
            eprintln!("{line}");
        }
        bar.set_style(indicatif::ProgressStyle::with_template("{msg}").expect("static template"));
        bar.finish_with_message(line);
    }
}

async fn convert(args: ConvertArgs) -> Result<(), CliError> {
    let destination = ImageRef::parse(&args.destination)?;
    if let ImageRef::S3(_) = destination {
        return Err(CliError::Convert(crate::convert::ConvertError::Output(
            format!(
                "{}: writing to S3 is not supported; write an OCI layout (oci:DIR) and upload it",
                args.destination
            ),
        )));
    }
    let mut options = crate::convert::ConvertOptions::new(match args.format {
        ConvertFormat::Estargz => crate::convert::Format::Estargz,
        ConvertFormat::ZstdChunked => crate::convert::Format::ZstdChunked,
    });
    if let Some(path) = &args.prioritize {
        let bad = |reason: String| CliError::Prioritize {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        options.prioritize = crate::convert::parse_prioritize(&text).map_err(bad)?;
    }
    let config = args.remote.registry_config()?;
    let progress = ConvertProgress::unless_quiet(args.quiet);
    let image = crate::convert::convert(
        &args.source,
        &config,
        &args.remote.platform()?,
        &options,
        progress,
    )
    .await?;
    match &destination {
        ImageRef::Layout(layout) => crate::convert::output::write_layout(&image, layout)?,
        ImageRef::Registry(target) => crate::convert::output::push(&image, target, &config).await?,
        ImageRef::S3(_) => unreachable!("refused before converting"),
    }
    if !args.quiet {
        println!("{} {}", destination, image.manifest_digest);
    }
    Ok(())
}

async fn index(args: IndexArgs) -> Result<(), CliError> {
    let span = size_flag("span", &args.span)?;
    if !(64 << 10..=crate::layer::gzip_index::MAX_SPAN_OUTPUT).contains(&span) {
        return Err(CliError::Size(
            "--span: from 64K (each checkpoint stores a 32 KiB window) to 64M (a read inflates \
             up to a whole span)"
                .into(),
        ));
    }
    let config = args.remote.registry_config()?;
    let progress = ConvertProgress::unless_quiet(args.quiet);
    let published = crate::convert::seek_index::index(
        &args.reference,
        &config,
        &args.remote.platform()?,
        span,
        progress,
    )
    .await?;
    if args.quiet {
        return Ok(());
    }
    for (layer, why) in &published.skipped {
        println!("layer {}: skipped, {why}", layer.digest.short());
    }
    match &published.artifact {
        Some(artifact) => println!(
            "{} gzip layer(s) indexed; index artifact {artifact} refers to {}",
            published.indexed.len(),
            args.reference
        ),
        None => println!("{}: no gzip layer needs an index", args.reference),
    }
    Ok(())
}

async fn pull(args: PullArgs) -> Result<(), CliError> {
    use crate::containerd::pull::{LayerOutcome, PullOptions};
    let options = PullOptions {
        address: args.address.clone(),
        namespace: args.namespace.clone(),
        snapshotter: args.snapshotter.clone(),
        registry: args.remote.registry_config()?,
        platform: args.remote.platform()?,
    };
    let report = crate::containerd::pull::pull(&args.reference, &options).await?;
    if !args.quiet {
        for (i, (digest, outcome)) in report.layers.iter().enumerate() {
            let how = match outcome {
                LayerOutcome::Lazy => "lazy (fetched on demand)",
                LayerOutcome::Unpacked => "downloaded and unpacked (no lazy index)",
                LayerOutcome::Present => "already present",
            };
            println!(
                "layer {}/{} {}: {how}",
                i + 1,
                report.layers.len(),
                digest.short()
            );
        }
        println!(
            "{} ({}) pulled into namespace {} for snapshotter {} in {:.2} s",
            report.image, report.manifest, args.namespace, args.snapshotter, report.seconds
        );
    }
    Ok(())
}

/// Starts this same command without `--daemon` in the background and waits until it reports that
/// the mount serves (or fails, in which case its log explains why).
fn daemonize(args: &MountArgs) -> Result<(), CliError> {
    use std::io::BufRead;
    let socket = crate::mount::control_socket(&args.dir);
    let log = args
        .log_file
        .clone()
        .unwrap_or_else(|| socket.with_extension("log"));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::Daemon(format!("{}: {e}", dir.display())))?;
    }
    let log_file = std::fs::File::create(&log)
        .map_err(|e| CliError::Daemon(format!("{}: {e}", log.display())))?;
    let exe = std::env::current_exe().map_err(|e| CliError::Daemon(e.to_string()))?;
    let child_args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    let mut child = std::process::Command::new(exe)
        .args(child_args)
        .env(READY_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(|e| CliError::Daemon(e.to_string()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    if line.trim() == "ready" {
        eprintln!(
            "lazylayer: mounted at {} (daemon pid {}, log {})",
            args.dir.display(),
            child.id(),
            log.display()
        );
        return Ok(());
    }
    let _ = child.wait();
    let reason = std::fs::read_to_string(&log).unwrap_or_default();
    let reason = reason
        .lines()
        .rfind(|l| l.contains("error"))
        .unwrap_or("the daemon exited before the mount was ready")
        .trim_start_matches("lazylayer: error: ")
        .to_string();
    Err(CliError::Daemon(format!(
        "{reason} (log: {})",
        log.display()
    )))
}

async fn profile(args: ProfileArgs) -> Result<(), CliError> {
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

fn cache(args: CacheArgs) -> Result<(), CliError> {
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

async fn stats(args: StatsArgs) -> Result<(), CliError> {
    let socket = crate::mount::control_socket(&args.dir);
    let report = crate::mount::control::query(&socket)
        .await
        .map_err(|source| CliError::NoMount {
            dir: args.dir.display().to_string(),
            socket: socket.display().to_string(),
            source,
        })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("stats serialise")
        );
        return Ok(());
    }
    let total: u64 = report.layers.iter().map(|l| l.size).sum();
    println!("image      {}", report.image);
    println!("mounted at {} (pid {})", report.mountpoint, report.pid);
    println!(
        "fetched    {} of {} compressed, {} requests; chunks: {} memory hits, {} disk hits, {} fetched; {} in memory",
        human_bytes(report.fetched_bytes),
        human_bytes(total),
        report.requests,
        report.cache_hits,
        report.disk_hits,
        report.cache_misses,
        human_bytes(report.cache_bytes)
    );
    if report.retries + report.failed_reads > 0 {
        println!(
            "retries    {} retried attempts, {} reads failed after their retry budget",
            report.retries, report.failed_reads
        );
    }
    println!();
    println!(
        "{:<2} {:<20} {:<12} {:>10} {:>10} {:>6} {:>7} {:>7} {:>7} {:>20}",
        "#",
        "LAYER",
        "FORMAT",
        "SIZE",
        "FETCHED",
        "REQS",
        "HITS",
        "DISK",
        "MISSES",
        "FETCH MS p50/p90/p99"
    );
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    for (i, l) in report.layers.iter().enumerate() {
        println!(
            "{:<2} {:<20} {:<12} {:>10} {:>10} {:>6} {:>7} {:>7} {:>7} {:>20}",
            i + 1,
            &l.digest[..l.digest.len().min(19)],
            l.format,
            human_bytes(l.size),
            human_bytes(l.stats.fetched_bytes),
            l.stats.requests,
            l.stats.cache_hits,
            l.stats.disk_hits,
            l.stats.cache_misses,
            format!(
                "{}/{}/{}",
                ms(l.stats.fetch_ms_p50),
                ms(l.stats.fetch_ms_p90),
                ms(l.stats.fetch_ms_p99)
            )
        );
    }
    Ok(())
}

/// An image resolved to one platform, with the name errors give it and its retry policy.
struct Resolved {
    name: String,
    opened: OpenedImage,
    retry: RetryPolicy,
}

async fn resolve_image(
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

async fn ls(args: LsArgs) -> Result<(), CliError> {
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
    let out = listing::list(&fs.tree, ino, &args.path, options);
    write_stdout(out.as_bytes())?;
    if args.stats {
        print_stats(fs.stats());
    }
    Ok(())
}

/// Writes to stdout; a closed pipe (`| head`) ends output quietly, as it does for `cat`.
fn write_stdout(bytes: &[u8]) -> Result<bool, CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::Output(e)),
    }
}

async fn cat(args: CatArgs) -> Result<(), CliError> {
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

async fn inspect(args: InspectArgs) -> Result<(), CliError> {
    let reference = ImageRef::parse(&args.reference)?;
    let config = args.remote.registry_config()?;
    let platform = args.remote.platform()?;
    let opened = open_image(&reference, None, &config, &platform, None).await?;
    let report = InspectReport::new(reference.to_string(), &opened.image);
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

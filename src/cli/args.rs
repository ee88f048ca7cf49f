//! The command line as clap parses it: one struct per subcommand, and the option groups that
//! several share ([`RemoteArgs`] for reaching a source, [`ReadArgs`] for reading and caching), so
//! every command spells them the same way. The help text is written for someone who has never
//! used lazylayer.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::size::size_text;
use crate::fs::{ImageFsOptions, profile};
use crate::model::oci::Platform;

/// The machine's disk cache, shared by `mount`, `snapshotter`, `cache` and `profile`: one
/// directory, so that what one of them fetched the others find.
const DEFAULT_CACHE_DIR: &str = "/var/lib/lazylayer/cache";

/// Disk space the cache may use unless `--cache-size` says otherwise.
const DEFAULT_CACHE_SIZE: &str = "10G";

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
Runs in the foreground until Ctrl-C or SIGTERM, then unmounts. If a file in the mount is still \
open then, the mount is detached from the tree (as `umount -l`) and its open files are served \
until they are closed; it exits 0 after that (a second signal exits at once). With --daemon it \
returns as soon as the mount serves and keeps serving in the background; stop it with \
`lazylayer umount DIR` (which refuses a busy mount, as umount does).\n\n\
Layers without a lazy index (plain gzip) are streamed once while mounting, to index them.",
        after_help = "Examples:\n  \
mkdir -p /mnt/app && lazylayer mount --daemon 127.0.0.1:5000/test/app:latest /mnt/app\n  \
chroot /mnt/app python3 /app/main.py\n  \
lazylayer stats /mnt/app\n  \
lazylayer umount /mnt/app"
    )]
    Mount(MountArgs),

    /// Unmount a lazylayer mount; returns once its daemon has stored what it fetched and exited.
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

    /// Record, publish, fetch, show or delete an image's start-up profile (the files its start
    /// reads, in order, prefetched by every mount of the image).
    #[command(
        subcommand,
        long_about = "An image's start-up profile lists the files its start reads, in order; a mount prefetches them in a few large requests before the application asks. A mount learns one by itself (the files read in its first --profile-window seconds, kept in the disk cache), `profile record` records one in a throwaway container, and `profile push` publishes it next to the image in its registry (an OCI artifact whose subject is the image manifest; the image and its digest are untouched), where every mount, pull and snapshotter on any machine finds it with the image. A profile learned on this machine wins over a published one.",
        after_help = "Examples:\n  \
lazylayer profile record 127.0.0.1:5000/test/app:esgz\n  \
lazylayer profile push 127.0.0.1:5000/test/app:esgz\n  \
lazylayer profile pull 127.0.0.1:5000/test/app:esgz\n  \
lazylayer profile show 127.0.0.1:5000/test/app:esgz"
    )]
    Profile(ProfileCommand),

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
    /// Serve the kubelet's CRI image service in front of containerd's, keeping each pull's
    /// registry credentials (in memory) for the snapshotter's lazy reads.
    #[command(
        long_about = "Serve Kubernetes' CRI ImageService on a Unix socket, forwarding every call \
to containerd's CRI plugin (--backend). containerd does not pass the credentials of a pull to \
snapshotters; this proxy keeps the AuthConfig of each PullImage in memory, per repository, and \
gives it to `lazylayer snapshotter --cri-proxy SOCKET` when it resolves that image, so that \
private images are read lazily with the credentials the kubelet got from the pod's pull \
secrets. Nothing is written to disk or logged; a restart of the snapshotter finds them here \
again, a restart of the proxy forgets them until the next pull of the image.\n\n\
Runs in the foreground until SIGTERM or Ctrl-C.",
        after_help = "Examples:\n  \
lazylayer cri-proxy --address /run/lazylayer/cri.sock --backend /run/containerd/containerd.sock\n  \
lazylayer snapshotter --cri-proxy /run/lazylayer/cri.sock ...\n\n\
kubelet flags: --container-runtime-endpoint unix:///run/containerd/containerd.sock \
--image-service-endpoint unix:///run/lazylayer/cri.sock"
    )]
    CriProxy(CriProxyArgs),
    /// Internal: holds FUSE connections for daemons that keep theirs (started by them).
    #[command(hide = true)]
    FuseHolder,

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
first in their layer, followed by the prefetch landmark, and a mount fetches them at once. \
--prioritize-profile takes them from a start-up profile instead (`lazylayer profile record`, then \
`profile push`): the profile published next to image REF, or a profile FILE. Layers that lack \
their parent directories' entries (ordinary in images built by Docker) convert as they are.",
        after_help = "Examples:\n  \
lazylayer convert oci:../shared/images:python-app oci:/tmp/out:python-app-esgz\n  \
lazylayer convert --prioritize-profile 127.0.0.1:5000/test/app 127.0.0.1:5000/test/app 127.0.0.1:5000/test/app:esgz\n  \
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

    /// Run a command in an image with runc, fetching its files as they are read (root only).
    #[command(
        long_about = "Run a command in the filesystem of image REF, as `docker run` would, with no \
daemon and no download: the image is mounted lazily (as `mount` does, sharing its disk cache), a \
writable overlay goes over it (a tmpfs, or --upper DIR to keep the changes), and runc (Debian's \
package) runs the image's Entrypoint with the given command or its Cmd, with its Env, WorkingDir and \
User. stdin (with -i), stdout, stderr and the exit status pass through; a container killed by \
signal N exits 128+N; SIGINT and SIGTERM go to the container.\n\n\
Nothing is kept when the command ends: mounts, overlay and runc state are removed (--rm is \
accepted and is what always happens), and what a killed run left behind is removed by the next. \
Root only (FUSE, overlayfs and runc's namespaces need it); rootless runs are not supported.\n\n\
As in docker, -v is --volume and -u the container's user: here --verbose has no short form, \
and registry credentials are --registry-user.",
        after_help = "Examples:\n  \
lazylayer run --rm 127.0.0.1:5000/test/python-app:latest\n  \
lazylayer run -e DEBUG=1 -v /srv/data:/data:ro debian:bookworm -- ls -l /data\n  \
lazylayer run -it --network none debian:bookworm -- bash",
        mut_arg("user", registry_user),
        arg(verbose_without_short())
    )]
    Run(RunArgs),
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

    /// A `lazylayer cri-proxy` socket to ask for the registry credentials the kubelet gave for
    /// an image (Kubernetes pull secrets), before the snapshotter's own (--user, Docker's
    /// config.json).
    #[arg(long, value_name = "SOCKET")]
    pub cri_proxy: Option<PathBuf>,

    #[command(flatten)]
    pub read: ReadArgs,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Args, Debug)]
pub struct CriProxyArgs {
    /// Unix socket to serve the CRI image service (and the snapshotter's credential lookups) on;
    /// created with mode 0600.
    #[arg(long, value_name = "SOCKET", default_value = "/run/lazylayer/cri.sock")]
    pub address: PathBuf,

    /// containerd's socket, whose CRI image service every call is forwarded to.
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub backend: PathBuf,
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

    /// Put the files of a start-up profile first, as --prioritize does: a profile file (JSON,
    /// as `profile push` publishes it) or an image reference whose published profile to use.
    #[arg(long, value_name = "REF|FILE", conflicts_with = "prioritize")]
    pub prioritize_profile: Option<String>,

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

    /// Uncompressed bytes between checkpoints [default: 1M]. A cold read fetches and inflates
    /// from the checkpoint before it to its own end; smaller spans fetch less per read and make
    /// a bigger index (32 KiB per checkpoint).
    #[arg(long, value_name = "SIZE")]
    pub span: Option<String>,

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
pub struct RunArgs {
    /// Image reference: NAME[:TAG], HOST[:PORT]/NAME[:TAG][@DIGEST], or oci:PATH[:TAG].
    pub reference: String,

    /// The command and its arguments (after the image's Entrypoint); default: the image's Cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,

    /// Remove everything when the command ends (what always happens; accepted as docker's).
    #[arg(long)]
    pub rm: bool,

    /// Keep stdin open and pass it to the command.
    #[arg(short, long)]
    pub interactive: bool,

    /// Give the command a terminal.
    #[arg(short, long)]
    pub tty: bool,

    /// Set an environment variable (K=V), or pass the host's value of K.
    #[arg(short, long = "env", value_name = "K[=V]")]
    pub env: Vec<String>,

    /// Bind-mount a host directory or file: HOST:CONTAINER[:ro].
    #[arg(short, long = "volume", value_name = "HOST:CTR[:ro]")]
    pub volume: Vec<String>,

    /// Working directory in the container [default: the image's WorkingDir, else /].
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// User to run as: NAME or UID, optionally :GROUP or :GID (names from the image's /etc/passwd
    /// and /etc/group) [default: the image's User, else root].
    #[arg(
        short = 'u',
        long = "user",
        id = "run_user",
        value_name = "USER[:GROUP]"
    )]
    pub run_user: Option<String>,

    /// The host's network (and its resolv.conf and hosts), or none (loopback only) [default:
    /// host; none for `profile record`].
    #[arg(long, value_enum)]
    pub network: Option<crate::run::spec::Network>,

    /// Keep the container's changes in DIR (the overlay's upper directory) instead of a tmpfs.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,

    #[command(flatten)]
    pub read: ReadArgs,

    #[command(flatten)]
    pub remote: RemoteArgs,
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

/// In commands that run containers, -u is the container's user (as in docker): the registry
/// user is --registry-user.
fn registry_user(arg: clap::Arg) -> clap::Arg {
    arg.long("registry-user").short(None)
}

/// In commands that run containers, -v is --volume (as in docker): --verbose is defined there
/// without it, so that the global one is not propagated with its -v.
fn verbose_without_short() -> clap::Arg {
    clap::Arg::new("verbose")
        .long("verbose")
        .action(clap::ArgAction::Count)
        .help("More log output (--verbose: debug, twice: trace). LAZYLAYER_LOG overrides.")
}

#[derive(Subcommand, Debug)]
pub enum ProfileCommand {
    /// Run the image's start in a throwaway container and record the files it reads (root only).
    #[command(
        long_about = "Run the image (its Entrypoint and Cmd, or the given command) as `lazylayer run` does, from a lazy mount, with a tmpfs over it and no network unless --network host, and record every file it reads, in order, with the ranges read, until it exits or --timeout passes (a server never exits: the timeout ends it, and is no failure). The profile is stored in the disk cache as the image's learned profile, replacing one learned before; `profile push` publishes it. Takes run's options (-e, -v, -w, -u, --upper).",
        mut_arg("user", registry_user),
        arg(verbose_without_short())
    )]
    Record(Box<ProfileRecordArgs>),
    /// Publish the image's profile next to it in its registry (the image itself is untouched).
    #[command(
        long_about = "Publish the profile kept for the image in the disk cache (recorded, or learned by a mount) as an OCI artifact (artifactType application/vnd.lazylayer.profile.v1) whose subject is the image manifest: through the referrers API, or under the sha256-HEX fallback tag for registries without it, as `lazylayer index` does. Needs push access to the image's repository. A newer push wins over older ones.\n\nBeside the list of files, the artifact carries a pack: the bytes of the chunks the profile names, zstd-compressed in the order the start reads them (read through the disk cache, fetched when not there). A mount fetches it in one request instead of many ranges of the layers, and checks every chunk against the digest the image's own index gives before using it. It costs the registry those bytes a second time; --list-only leaves it out."
    )]
    Push(ProfilePushArgs),
    /// Fetch the profile published next to the image into the disk cache, as its learned one.
    Pull(ProfileArgs),
    /// List the files of the image's profile in the disk cache, in order.
    Show(ProfileArgs),
    /// Delete the image's profile from the disk cache.
    Clear(ProfileArgs),
}

#[derive(Args, Debug)]
pub struct ProfileRecordArgs {
    /// Stop the command after this many seconds and keep what it read until then.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub timeout: f64,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct ProfilePushArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,

    /// Publish the list of files only, without the pack of their bytes (mounts then fetch them
    /// from the layers, in more requests and, for a gzip image read through a seek index, about
    /// twice the bytes).
    #[arg(long)]
    pub list_only: bool,
}

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Image reference (profiles are kept per repository).
    pub reference: String,

    /// The disk cache directory the profile lives in.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[arg(value_enum)]
    pub action: CacheAction,

    /// The disk cache directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,

    /// With gc: the size to trim to, e.g. 5G.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_CACHE_SIZE)]
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

    /// Return once the mount serves, and keep serving in the background. Implies
    /// --keep-connection.
    #[arg(long)]
    pub daemon: bool,

    /// Keep the mount's FUSE connection in a holder process (or systemd's file descriptor
    /// store, under a unit with FileDescriptorStoreMax=) so that a restarted or upgraded
    /// lazylayer mounting the same image on the same directory takes it over: readers wait
    /// during the restart instead of failing. SIGTERM then leaves the mount to the next
    /// process; `lazylayer umount DIR` unmounts.
    #[arg(long, env = "LAZYLAYER_KEEP_CONNECTION", hide_env = true)]
    pub keep_connection: bool,

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
    #[arg(long, value_name = "SIZE", default_value_t = size_text(ImageFsOptions::default().amplify_bytes))]
    pub amplify_io: String,

    /// On the first read miss in a directory, also fetch its other small files, up to this many
    /// compressed bytes (0: off). A start reads many modules of one directory one by one.
    /// Images with an eStargz landmark or a learned profile do without: those say what to fetch.
    #[arg(long, value_name = "SIZE", default_value_t = size_text(ImageFsOptions::default().sibling_bytes))]
    pub prefetch_siblings: String,

    /// Memory for cached chunks, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value_t = size_text(ImageFsOptions::default().cache_bytes))]
    pub memory_cache_size: String,

    /// Directory of the disk cache (chunks by digest, shared by all images and kept across
    /// restarts); `none` keeps chunks in memory only.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,

    /// Disk space the cache may use, e.g. 10G.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_CACHE_SIZE)]
    pub cache_size: String,

    /// Do not fetch the rest of the image into the disk cache in the background. Not needed
    /// for speed: the background fetch only sends requests while no reader or prefetch has
    /// sent one for a short quiet period, so it never competes with a start.
    #[arg(long)]
    pub no_background_fetch: bool,

    /// Cap the background fetch's bandwidth, per second, e.g. 10M (default: no cap; it uses
    /// the link only while nobody reads).
    #[arg(long, value_name = "SIZE")]
    pub background_bandwidth: Option<String>,

    /// Requests in flight to the registry at once.
    #[arg(long, value_name = "N", default_value_t = ImageFsOptions::default().request_slots)]
    pub max_requests: usize,

    /// Seconds after mounting during which first reads are recorded as the image's start-up
    /// profile (prefetched on the next mount); 0 turns profiles off.
    #[arg(long, value_name = "SECONDS", default_value_t = profile::DEFAULT_WINDOW.as_secs_f64())]
    pub profile_window: f64,
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

    /// containerd's registry hosts directory: DIR/HOST[:PORT]/hosts.toml names a registry's
    /// mirrors (tried in order, the registry last), CA and client certificates, skip_verify and
    /// headers, as for containerd's own pulls [default: /etc/containerd/certs.d].
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,

    /// Seconds to wait for a connection to the registry [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub connect_timeout: Option<f64>,

    /// Seconds without a byte before one attempt is abandoned as stalled (and retried)
    /// [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub stall_timeout: Option<f64>,

    /// Attempts per remote read before it fails, for failing fast; without it an outage is
    /// retried until --read-timeout. A failed range read resumes at the first byte not yet
    /// received [default: none].
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Seconds a read may go without receiving a byte, retries included, before it fails
    /// (EIO in a mount): an outage shorter than this costs readers latency, not errors
    /// [default: 60].
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

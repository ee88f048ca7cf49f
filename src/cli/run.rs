//! `run`: mount the image, lay an overlay over it, run runc in the foreground, undo it all.

use std::path::{Path, PathBuf};

use std::os::unix::process::CommandExt;

use super::args::{MountArgs, ProfileRecordArgs, RunArgs};
use super::error::CliError;
use super::mount::{background_command, start_server};
use super::read::resolve_image;
use crate::run::image_mount::ImageMount;
use crate::run::spec::{self, ImageRuntime, SpecInput, Volume};

/// What a run failed at before its command could start.
fn failed(what: impl std::fmt::Display) -> CliError {
    CliError::Run(what.to_string())
}

/// Set in the environment of the process a run starts to serve its image: the manifest digest
/// to serve (what the run's reference resolved to) and where.
const SERVE_MANIFEST_ENV: &str = "LAZYLAYER_RUN_SERVE_MANIFEST";
const SERVE_AT_ENV: &str = "LAZYLAYER_RUN_SERVE_AT";

pub(super) async fn run(args: RunArgs) -> Result<std::process::ExitCode, CliError> {
    Ok(execute(args, None).await?.code)
}

/// `profile record`: a run of its own (no shared mount, no network by default) whose server
/// records every file read until the command ends or `timeout` passes, and stores that as the
/// image's learned profile on its way out.
pub(super) async fn record(args: ProfileRecordArgs) -> Result<(), CliError> {
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        return Err(failed("--timeout must be a positive number of seconds"));
    }
    let no_cache =
        || failed("--cache-dir none: a recorded profile is kept in the disk cache; give it one");
    // Checked before the container runs, not after: with no disk cache nothing is recorded.
    if args.run.read.cache_dir.as_os_str() == "none" {
        return Err(no_cache());
    }
    let timeout = std::time::Duration::from_secs_f64(args.timeout);
    let cache_dir = args.run.read.cache_dir.clone();
    let ran = execute(args.run, Some(timeout)).await?;
    let Some(disk) = ran.disk else {
        return Err(no_cache());
    };
    let Some(profile) = crate::fs::profile::load(&disk, &ran.image) else {
        return Err(failed(format!(
            "{}: the command read no file of the image, so there is no profile to keep",
            ran.image
        )));
    };
    let ended = match (ran.timed_out, ran.code == std::process::ExitCode::SUCCESS) {
        (true, _) => format!("stopped after {} s", args.timeout),
        (false, true) => "exited".to_string(),
        (false, false) => {
            "failed; check that it runs without network, or pass --network host".into()
        }
    };
    eprintln!(
        "lazylayer: recorded {} files read by {} (the command {ended}) in {}; publish it with \
         `lazylayer profile push`",
        profile.files.len(),
        ran.image,
        cache_dir.display()
    );
    Ok(())
}

/// How a run ended.
struct Ran {
    code: std::process::ExitCode,
    /// `record`'s timeout ended it.
    timed_out: bool,
    /// The image's source name (what profiles are kept under) and the disk cache.
    image: String,
    disk: Option<std::sync::Arc<crate::cache::disk::DiskCache>>,
}

async fn execute(mut args: RunArgs, record: Option<std::time::Duration>) -> Result<Ran, CliError> {
    if let (Some(manifest), Some(at)) = (
        std::env::var_os(SERVE_MANIFEST_ENV),
        std::env::var_os(SERVE_AT_ENV),
    ) {
        if let Some(timeout) = record {
            // The whole run is recorded, however long it takes to start.
            args.read.profile_window = (timeout + RECORD_MARGIN).as_secs_f64();
        }
        serve_image(args, &manifest.to_string_lossy(), at.into()).await?;
        std::process::exit(0);
    }
    let runc = crate::run::find_runc().ok_or_else(|| {
        failed("runc is not installed (or not on PATH): install it with `apt-get install runc`")
    })?;
    let volumes = args
        .volume
        .iter()
        .map(|v| Volume::parse(v).map_err(|e| failed(format!("--volume {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    crate::run::clean_stale(&runc);

    let disk = args.read.disk_cache()?;
    // Bad sizes are reported here, not by the process that serves the image.
    args.read.image_fs_options(None, Default::default())?;
    let resolved = resolve_image(&args.reference, &args.remote, disk.clone()).await?;
    let name = resolved.name.clone();
    let source_name = resolved.opened.image.source.clone();
    let manifest = resolved.opened.image.manifest_digest.clone();
    let image = ImageRuntime::from_config(&resolved.opened.image.config_bytes)
        .map_err(|e| failed(format!("image {name}: its config: {e}")))?;
    let argv = spec::argv(&image, &args.command).map_err(|e| failed(format!("{name}: {e}")))?;

    let id = format!("lazylayer-{}", std::process::id());
    let dir = crate::run::runs_dir().join(&id);
    crate::run::create(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    let cache = std::path::absolute(&args.read.cache_dir).unwrap_or(args.read.cache_dir.clone());
    // A recording mount is nobody else's: its profile must be this run's reads only.
    let sharing = match record {
        None => String::new(),
        Some(_) => format!("\nrecord {id}"),
    };
    let key = crate::model::digest::Digest::of(
        format!("{manifest}\n{}{sharing}", cache.display()).as_bytes(),
    );
    let user = args.remote.user.as_deref();
    let shared = ImageMount::join(&key.hex()[..16], |lower, log| {
        let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let args_os = std::env::args_os().skip(1).collect();
        let mut command = background_command(args_os, "--registry-user", None, user)?;
        command
            .env(SERVE_MANIFEST_ENV, manifest.to_string())
            .env(SERVE_AT_ENV, lower)
            // Not in the run's process group: a Ctrl-C meant for this run's container must not
            // end the mount that other runs use.
            .process_group(0);
        start_server(command, log_file, log).map_err(|e| format!("serving image {name}: {e}"))
    });
    let made = Run {
        dir: dir.clone(),
        runc: runc.clone(),
        upper: args.upper.clone(),
    };
    let shared = match shared {
        Ok(shared) => shared,
        Err(e) => {
            made.undo();
            return Err(failed(e));
        }
    };
    let network = args.network.unwrap_or(match record {
        Some(_) => spec::Network::None,
        None => spec::Network::Host,
    });
    let launch = Launch {
        image: &image,
        argv,
        volumes: &volumes,
        lower: &shared.lower(),
        network,
        timeout: record,
    };
    let outcome = made.start(&args, launch).await;
    made.undo();
    // The last run out waits for the server to store what it learned (the recorded profile).
    shared.leave();
    let (code, timed_out) = outcome?;
    Ok(Ran {
        code,
        timed_out,
        image: source_name,
        disk,
    })
}

/// What `profile record` adds to its timeout for the recording window: the mount is made, and
/// its window starts, before the container starts.
const RECORD_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The process a run starts to serve its image: a foreground `mount` of the manifest the run
/// resolved, for the runs that share it (see [`crate::run::image_mount`]); it ends when the last
/// of them unmounts it.
async fn serve_image(args: RunArgs, manifest: &str, at: PathBuf) -> Result<(), CliError> {
    let manifest = manifest
        .parse()
        .map_err(|e| failed(format!("{SERVE_MANIFEST_ENV}: {e}")))?;
    let reference = crate::model::reference::ImageRef::parse(&args.reference)?.pinned(manifest);
    super::mount::mount(MountArgs {
        reference: reference.to_string(),
        dir: at,
        daemon: false,
        keep_connection: false,
        // The container's users are not the one who mounted, and its setuid binaries (su,
        // ping) and device nodes must work as in an unpacked image.
        allow_other: true,
        suid_dev: true,
        read: args.read,
        metrics_addr: None,
        log_file: None,
        remote: args.remote,
    })
    .await
}

/// What a run's container is made of, besides its command line's flags.
struct Launch<'a> {
    image: &'a ImageRuntime,
    argv: Vec<String>,
    volumes: &'a [Volume],
    /// The image's mount, under the overlay.
    lower: &'a Path,
    network: spec::Network,
    /// Kill the container after this long (`profile record`).
    timeout: Option<std::time::Duration>,
}

/// One run's directory, undone by [`Run::undo`].
struct Run {
    dir: PathBuf,
    runc: PathBuf,
    upper: Option<PathBuf>,
}

impl Run {
    /// The overlay, the spec, then runc in the foreground; returns the command's exit status,
    /// and whether the timeout ended it.
    async fn start(
        &self,
        args: &RunArgs,
        launch: Launch<'_>,
    ) -> Result<(std::process::ExitCode, bool), CliError> {
        let Launch {
            image,
            argv,
            volumes,
            lower,
            network,
            timeout,
        } = launch;
        let (upper, work) = match &self.upper {
            Some(upper) => {
                let work = work_dir_for(upper);
                for d in [upper, &work] {
                    std::fs::create_dir_all(d)
                        .map_err(|e| failed(format!("--upper {}: {e}", d.display())))?;
                }
                (upper.clone(), work)
            }
            None => {
                let tmp = self.dir.join("tmp");
                crate::run::mount_tmpfs(&tmp)
                    .map_err(|e| failed(format!("tmpfs at {}: {e}", tmp.display())))?;
                let (upper, work) = (tmp.join("upper"), tmp.join("work"));
                for d in [&upper, &work] {
                    std::fs::create_dir_all(d)
                        .map_err(|e| failed(format!("{}: {e}", d.display())))?;
                }
                (upper, work)
            }
        };
        let rootfs = self.dir.join("rootfs");
        crate::run::mount_overlay(lower, &upper, &work, &rootfs)
            .map_err(|e| failed(format!("overlay at {}: {e}", rootfs.display())))?;
        let user = args
            .run_user
            .clone()
            .or_else(|| image.user.clone())
            .unwrap_or_default();
        let (uid, gid) = spec::user_ids(&user, &rootfs).map_err(|e| failed(format!("-u: {e}")))?;
        let id = self.id();
        let env = spec::environment(image, &args.env, args.tty);
        // runc reports a missing command as a failure of its own (exit 1); docker says 127.
        if !spec::command_exists(&rootfs, &argv[0], &env) {
            eprintln!(
                "lazylayer: error: run: `{}` is not in image {} (looked on its PATH)",
                argv[0], args.reference
            );
            return Ok((std::process::ExitCode::from(127), false));
        }
        let spec = spec::runtime_spec(&SpecInput {
            rootfs: &rootfs,
            args: argv,
            env,
            cwd: args
                .workdir
                .clone()
                .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
                .unwrap_or_else(|| "/".into()),
            uid,
            gid,
            tty: args.tty,
            hostname: &id,
            network,
            volumes,
        });
        std::fs::write(
            self.dir.join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("a spec serialises"),
        )
        .map_err(|e| failed(format!("{}: {e}", self.dir.display())))?;

        let mut command = tokio::process::Command::new(&self.runc);
        command
            .arg("--root")
            .arg(self.dir.join("runc"))
            .args(["run", "--bundle"])
            .arg(&self.dir)
            .arg(&id);
        if !args.interactive && !args.tty {
            command.stdin(std::process::Stdio::null());
        }
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("starting {}: {e}", self.runc.display())))?;
        let pid = child.id();
        let forward = |signal: libc::c_int| {
            if let Some(pid) = pid {
                // SAFETY: kill(2) on a child we started and have not reaped.
                unsafe { libc::kill(pid as libc::pid_t, signal) };
            }
        };
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(failed)?;
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(failed)?;
        let deadline = tokio::time::sleep(timeout.unwrap_or(std::time::Duration::MAX));
        tokio::pin!(deadline);
        let mut timed_out = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.map_err(failed)?,
                _ = terminate.recv() => forward(libc::SIGTERM),
                _ = interrupt.recv() => forward(libc::SIGINT),
                _ = &mut deadline, if timeout.is_some() && !timed_out => {
                    timed_out = true;
                    // runc passes on the signals it gets, but not SIGKILL (nobody can catch it).
                    let _ = tokio::process::Command::new(&self.runc)
                        .arg("--root")
                        .arg(self.dir.join("runc"))
                        .args(["kill", &id, "KILL"])
                        .status()
                        .await;
                }
            }
        };
        use std::os::unix::process::ExitStatusExt;
        let code = match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        };
        Ok((
            std::process::ExitCode::from(code.clamp(0, 255) as u8),
            timed_out,
        ))
    }

    fn id(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Undoes the run's mounts and state; `--upper` keeps its directory, not its work directory.
    /// The overlay and tmpfs are detached by [`crate::run::remove`], the same undoing a later run
    /// applies to a killed one.
    fn undo(&self) {
        if let Some(upper) = &self.upper {
            let _ = std::fs::remove_dir_all(work_dir_for(upper));
        }
        crate::run::remove(&self.dir, &self.runc);
    }
}

/// The overlay's work directory for `--upper DIR`: beside it, on the same filesystem as
/// overlayfs requires.
fn work_dir_for(upper: &Path) -> PathBuf {
    let name = upper
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upper".into());
    upper.with_file_name(format!(".{name}.work"))
}

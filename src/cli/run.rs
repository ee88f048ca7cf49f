//! `run`: mount the image, lay an overlay over it, run runc in the foreground, undo it all.

use std::path::{Path, PathBuf};

use super::args::RunArgs;
use super::error::CliError;
use super::read::resolve_image;
use crate::fs::ImageFs;
use crate::run::spec::{self, ImageRuntime, SpecInput, Volume};

/// What a run failed at before its command could start.
fn failed(what: impl std::fmt::Display) -> CliError {
    CliError::Run(what.to_string())
}

pub(super) async fn run(args: RunArgs) -> Result<std::process::ExitCode, CliError> {
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
    let resolved = resolve_image(&args.reference, &args.remote, disk.clone()).await?;
    let name = resolved.name.clone();
    let image = ImageRuntime::from_config(&resolved.opened.image.config_bytes)
        .map_err(|e| failed(format!("image {name}: its config: {e}")))?;
    let argv = spec::argv(&image, &args.command).map_err(|e| failed(format!("{name}: {e}")))?;
    let options = args.read.image_fs_options(disk, resolved.retry)?;
    let fs = std::sync::Arc::new(ImageFs::open(resolved.opened, &options).await.map_err(
        |source| CliError::Open {
            image: name.clone(),
            source,
        },
    )?);

    let id = format!("lazylayer-{}", std::process::id());
    let dir = crate::run::runs_dir().join(&id);
    let made = Run {
        dir: dir.clone(),
        runc: runc.clone(),
        upper: args.upper.clone(),
    };
    crate::run::create(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;

    let mount_options = crate::mount::MountOptions {
        // The container's users are not the one who mounted, and its setuid binaries (su,
        // ping) and device nodes must work as in an unpacked image.
        allow_other: true,
        suid_dev: true,
        ..Default::default()
    };
    let session = crate::mount::mount(
        fs.clone(),
        &dir.join("lower"),
        &mount_options,
        tokio::runtime::Handle::current(),
    )?;
    let companions = crate::mount::Companions::start(fs.clone(), &dir.join("lower"), false);
    let outcome = made.start(&args, &image, argv, &volumes).await;
    companions.stop();
    made.undo();
    drop(session);
    outcome
}

/// One run's directory, undone by [`Run::undo`].
struct Run {
    dir: PathBuf,
    runc: PathBuf,
    upper: Option<PathBuf>,
}

impl Run {
    /// The overlay, the spec, then runc in the foreground; returns the command's exit status.
    async fn start(
        &self,
        args: &RunArgs,
        image: &ImageRuntime,
        argv: Vec<String>,
        volumes: &[Volume],
    ) -> Result<std::process::ExitCode, CliError> {
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
        crate::run::mount_overlay(&self.dir.join("lower"), &upper, &work, &rootfs)
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
            return Ok(std::process::ExitCode::from(127));
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
            network: args.network,
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
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.map_err(failed)?,
                _ = terminate.recv() => forward(libc::SIGTERM),
                _ = interrupt.recv() => forward(libc::SIGINT),
            }
        };
        use std::os::unix::process::ExitStatusExt;
        let code = match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        };
        Ok(std::process::ExitCode::from(code.clamp(0, 255) as u8))
    }

    fn id(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Undoes the run's mounts and state; `--upper` keeps its directory, not its work directory.
    /// The overlay, tmpfs and lower mount are detached by [`crate::run::remove`], the same
    /// undoing a later run applies to a killed one; lower, still served by this process, is
    /// released when its session is dropped.
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

//! `mount` (in the foreground or as a daemon that reports readiness), and `stats` of a running
//! mount through its control socket.

use super::args::{MountArgs, StatsArgs, UmountArgs};
use super::error::CliError;
use super::read::{resolve_image, write_stdout};
use crate::cli::output::inspect::human_bytes;
use crate::fs::ImageFs;
use crate::mount::takeover::KeptConnections;
use crate::source::retry::RetryPolicy;

/// Environment variable that tells a daemon child to report readiness on stdout.
const READY_ENV: &str = "LAZYLAYER_REPORT_READY";

pub(super) async fn mount(args: MountArgs) -> Result<(), CliError> {
    // Bad sizes are reported before a daemon is started.
    args.read.image_fs_options(None, RetryPolicy::default())?;
    // A mount whose connection an earlier daemon kept is taken over, not refused; one left dead
    // by a daemon whose connection was not kept is cleared when this mount keeps its own.
    if args.daemon {
        if !KeptConnections::kept_for(&crate::mount::run_dir(), &args.dir) {
            crate::mount::detach_if_dead(&args.dir);
            crate::mount::check_not_mounted(&args.dir)?;
        }
        return daemonize(&args);
    }
    let kept = if args.keep_connection {
        match KeptConnections::open(&crate::mount::run_dir()) {
            Ok(kept) => Some(kept),
            Err(e) => {
                tracing::warn!(
                    "cannot keep the FUSE connection of {} for a restarted lazylayer ({e}): a \
                     restart will break its readers",
                    args.dir.display()
                );
                None
            }
        }
    } else {
        None
    };
    if !kept.as_ref().is_some_and(|k| k.has(&args.dir)) {
        if kept.is_some() {
            crate::mount::detach_if_dead(&args.dir);
        }
        crate::mount::check_not_mounted(&args.dir)?;
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
    // A daemon still serving the mount (a new version started while it runs) is told to stop
    // once this one serves: nothing waits meanwhile.
    let previous = match &kept {
        Some(kept) if kept.has(&args.dir) => previous_daemon(&args.dir).await,
        _ => None,
    };
    let served = crate::mount::mount(
        fs.clone(),
        &args.dir,
        &mount_options,
        tokio::runtime::Handle::current(),
        kept.as_ref(),
    )?;
    if let (Some(pid), Some(resumed)) = (previous, &served.resumed) {
        hand_over(pid, &args.dir, resumed).await;
    }
    let session = served.session;
    let companions = crate::mount::Companions::start(fs.clone(), &args.dir, true);
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
    if unmount_requested && kept.is_some() {
        // The connection is kept: the mount stays, its readers wait, and the next lazylayer
        // mounting this image here serves them. Exiting without dropping the session is what
        // leaves the mount in place.
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        companions.stop();
        tracing::info!(
            "{}: stopped serving; the mount stays for the next lazylayer to take over \
             (`lazylayer umount {}` unmounts it)",
            args.dir.display(),
            args.dir.display()
        );
        std::process::exit(0);
    }
    if unmount_requested {
        match crate::mount::unmount(&args.dir) {
            Ok(()) => {
                let _ = ended.await;
            }
            // A file is still open (a shell in the tree, a running container): refusing would
            // leave the mount with nobody serving it. Detach it from the tree instead and serve
            // what is open until it is closed; the kernel then ends the session.
            Err(crate::mount::MountError::Unmount { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) =>
            {
                crate::mount::detach(&args.dir)?;
                tracing::warn!(
                    "{} is busy: detached from the tree; files still open there are served until \
                     they are closed, then lazylayer exits (a second Ctrl-C or SIGTERM stops at \
                     once, and those files then fail)",
                    args.dir.display()
                );
                // After a second signal the session is left to end with the process.
                tokio::select! {
                    _ = &mut ended => {}
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
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

/// The daemon serving the mount at `dir` now, if it is another `lazylayer mount` process.
async fn previous_daemon(dir: &std::path::Path) -> Option<u32> {
    let socket = crate::mount::control_socket(dir);
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        crate::mount::control::query(&socket),
    );
    match asked.await {
        Ok(Ok(report)) if report.exits_on_unmount && report.pid != std::process::id() => {
            Some(report.pid)
        }
        _ => None,
    }
}

/// Stops the daemon `pid` that served the mount at `dir` until this one took it over, and has
/// the kernel resend what it read and did not answer.
async fn hand_over(pid: u32, dir: &std::path::Path, resumed: &crate::mount::takeover::Resumed) {
    // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    // Its exit, not its socket's removal: until then it may still read requests.
    let deadline = tokio::time::Instant::now() + crate::mount::SERVER_EXIT_WAIT;
    while !exited(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    if !exited(pid) {
        tracing::warn!(
            "{}: the daemon that served it before (pid {pid}) has not exited after {} s",
            dir.display(),
            crate::mount::SERVER_EXIT_WAIT.as_secs()
        );
    }
    if let Err(e) = resumed.resend() {
        tracing::warn!(
            "{}: resending the requests of pid {pid}: {e}",
            dir.display()
        );
    }
    tracing::info!(
        "{}: took over from the running daemon (pid {pid})",
        dir.display()
    );
}

/// Whether process `pid` has exited: every one of its threads gone or a zombie. The main thread
/// alone is not enough: it shows as a zombie while the other threads of an exiting process are
/// still being torn down, and one of them may still take a request from the connection, which
/// the resend that follows would then miss.
fn exited(pid: u32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    threads.flatten().all(|thread| {
        match std::fs::read_to_string(thread.path().join("stat")) {
            // The state follows the command name, which is in parentheses and may hold any byte.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    })
}

/// Unmounts, then waits for the daemon that served the mount to finish: it stores the chunks
/// still queued for the disk cache and the start-up profile on its way out, and a mount started
/// right after `umount` returns (a remount, another image sharing the cache) must find them.
pub(super) async fn umount(args: UmountArgs) -> Result<(), CliError> {
    let socket = crate::mount::control_socket(&args.dir);
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        crate::mount::control::query(&socket),
    );
    // A snapshotter's mount answers with the snapshotter, which stays.
    let daemon = match asked.await {
        Ok(Ok(report)) if report.exits_on_unmount => Some(report.pid),
        _ => None,
    };
    crate::mount::unmount(&args.dir)?;
    let Some(pid) = daemon else { return Ok(()) };
    let finished =
        tokio::task::spawn_blocking(move || crate::mount::wait_for_server(pid, &socket)).await;
    if !finished.unwrap_or(false) {
        tracing::warn!(
            "{}: unmounted, but its daemon (pid {pid}) has not exited after {} s",
            args.dir.display(),
            crate::mount::SERVER_EXIT_WAIT.as_secs()
        );
    }
    Ok(())
}

/// Starts this same command without `--daemon` in the background and waits until it reports that
/// the mount serves (or fails, in which case its log explains why).
fn daemonize(args: &MountArgs) -> Result<(), CliError> {
    let socket = crate::mount::control_socket(&args.dir);
    let log = args
        .log_file
        .clone()
        .unwrap_or_else(|| socket.with_extension("log"));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::Daemon(format!("{}: {e}", dir.display())))?;
    }
    // Appended to: after a crash, the next daemon must not erase what the dead one said.
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| CliError::Daemon(format!("{}: {e}", log.display())))?;
    let args_os = std::env::args_os().skip(1).filter(|a| a != "--daemon");
    let mut command = background_command(
        args_os.collect(),
        "--user",
        Some('u'),
        args.remote.user.as_deref(),
    )
    .map_err(CliError::Daemon)?;
    command.env("LAZYLAYER_KEEP_CONNECTION", "true");
    let pid = start_server(command, log_file, &log).map_err(CliError::Daemon)?;
    eprintln!(
        "lazylayer: mounted at {} (daemon pid {pid}, log {})",
        args.dir.display(),
        log.display()
    );
    Ok(())
}

/// Starts `command`, a lazylayer that serves a mount (`mount`, or a run's image server), with its
/// log in `log_file` (at `log`), and waits until it reports that the mount serves. Returns its
/// pid, or why it failed: the last error line of its log.
pub(super) fn start_server(
    mut command: std::process::Command,
    log_file: std::fs::File,
    log: &std::path::Path,
) -> Result<u32, String> {
    use std::io::BufRead;
    // What the log held before (an earlier daemon's lines) is not this one's reason.
    let earlier = log_file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let mut child = command
        .env(READY_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", command.get_program().to_string_lossy()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    if line.trim() == "ready" {
        return Ok(child.id());
    }
    let _ = child.wait();
    let reason = std::fs::read(log).unwrap_or_default();
    let reason = String::from_utf8_lossy(reason.get(earlier..).unwrap_or_default());
    let reason = reason
        .lines()
        .rfind(|l| l.contains("error"))
        .unwrap_or("the daemon exited before the mount was ready")
        .trim_start_matches("lazylayer: error: ")
        .to_string();
    Err(format!("{reason} (log: {})", log.display()))
}

/// This binary with the command line `args` for a process that serves in the background, the
/// registry credentials `user` (option `long`, or `short`) moved from its command line to its
/// environment: /proc/PID/cmdline is readable by every user for as long as the process lives,
/// /proc/PID/environ only by its owner.
pub(super) fn background_command(
    args: Vec<std::ffi::OsString>,
    long: &str,
    short: Option<char>,
    user: Option<&str>,
) -> Result<std::process::Command, String> {
    let args = without_credentials(args, long, short);
    if let Some(secret) = user.and_then(|u| u.split_once(':')).map(|(_, p)| p)
        && !secret.is_empty()
        && args.iter().any(|a| a.to_string_lossy().contains(secret))
    {
        return Err(format!(
            "could not keep the password out of the command line of the process serving in \
             the background; pass it in LAZYLAYER_USER instead of {long}"
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut command = std::process::Command::new(exe);
    command.args(args);
    if let Some(user) = user {
        command.env("LAZYLAYER_USER", user);
    }
    Ok(command)
}

/// The command line `args` without the option `long` (and its `short` form) and its value.
fn without_credentials(
    args: Vec<std::ffi::OsString>,
    long: &str,
    short: Option<char>,
) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            out.push(arg);
            out.extend(args);
            break;
        }
        if text.strip_prefix(long).is_some_and(|v| v.starts_with('=')) {
            continue;
        }
        if text == long {
            args.next();
            continue;
        }
        // A cluster of short flags (`-u X`, `-uX`, `-vu X`): `u` takes the rest, or the next
        // argument.
        if let Some(short) = short
            && let Some(flags) = text.strip_prefix('-').filter(|f| !f.starts_with('-'))
            && let Some(at) = flags.find(short)
        {
            if at + 1 == flags.len() {
                args.next();
            }
            if at > 0 {
                out.push(format!("-{}", &flags[..at]).into());
            }
            continue;
        }
        out.push(arg);
    }
    out
}

pub(super) async fn stats(args: StatsArgs) -> Result<(), CliError> {
    let socket = crate::mount::control_socket(&args.dir);
    let report = crate::mount::control::query(&socket)
        .await
        .map_err(|source| CliError::NoMount {
            dir: args.dir.display().to_string(),
            socket: socket.display().to_string(),
            source,
        })?;
    if args.json {
        let json = serde_json::to_string_pretty(&report).expect("stats serialise");
        write_stdout(format!("{json}\n").as_bytes())?;
        return Ok(());
    }
    // Written at once, so that `| head` ends it quietly (see `write_stdout`).
    use std::fmt::Write;
    let mut out = String::new();
    let total: u64 = report.layers.iter().map(|l| l.size).sum();
    let _ = writeln!(out, "image      {}", report.image);
    let _ = writeln!(out, "mounted at {} (pid {})", report.mountpoint, report.pid);
    let _ = writeln!(
        out,
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
        let _ = writeln!(
            out,
            "retries    {} retried attempts, {} reads failed after their retry budget",
            report.retries, report.failed_reads
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
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
        let _ = writeln!(
            out,
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
    write_stdout(out.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_command_line_has_no_credentials() {
        let args =
            |line: &str| -> Vec<std::ffi::OsString> { line.split(' ').map(Into::into).collect() };
        for (given, daemon) in [
            ("mount --user a:pw img dir", "mount img dir"),
            ("mount --user=a:pw img dir", "mount img dir"),
            ("mount -u a:pw img dir", "mount img dir"),
            ("mount -ua:pw img dir", "mount img dir"),
            ("mount -vu a:pw img dir", "mount -v img dir"),
            ("mount -vvua:pw img dir", "mount -vv img dir"),
            ("mount -v img -- -u", "mount -v img -- -u"),
        ] {
            let out = without_credentials(args(given), "--user", Some('u'));
            assert_eq!(out, args(daemon), "{given}");
        }
        // `run`: -u is the container's user, the credentials are --registry-user.
        for (given, server) in [
            ("run --registry-user a:pw -u 1000 img", "run -u 1000 img"),
            ("run --registry-user=a:pw -it img sh", "run -it img sh"),
        ] {
            let out = without_credentials(args(given), "--registry-user", None);
            assert_eq!(out, args(server), "{given}");
        }
    }
}

//! `mount` (in the foreground or as a daemon that reports readiness), and `stats` of a running
//! mount through its control socket.

use super::args::{MountArgs, StatsArgs, UmountArgs};
use super::error::CliError;
use super::read::{resolve_image, write_stdout};
use crate::cli::output::inspect::human_bytes;
use crate::fs::ImageFs;
use crate::source::retry::RetryPolicy;

/// Environment variable that tells a daemon child to report readiness on stdout.
const READY_ENV: &str = "LAZYLAYER_REPORT_READY";

pub(super) async fn mount(args: MountArgs) -> Result<(), CliError> {
    // Bad sizes are reported before a daemon is started.
    args.read.image_fs_options(None, RetryPolicy::default())?;
    crate::mount::check_not_mounted(&args.dir)?;
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

/// How long `umount` waits for the daemon to store its chunks and profile and exit.
const DAEMON_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

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
    let deadline = std::time::Instant::now() + DAEMON_EXIT_WAIT;
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    while socket.exists() && proc_dir.exists() {
        if std::time::Instant::now() > deadline {
            tracing::warn!(
                "{}: unmounted, but its daemon (pid {pid}) has not exited after {} s",
                args.dir.display(),
                DAEMON_EXIT_WAIT.as_secs()
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
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
    let child_args = daemon_args(std::env::args_os().skip(1).collect());
    let user = args.remote.user.as_deref();
    // /proc/PID/cmdline is readable by every user for as long as the mount lives; the
    // environment (/proc/PID/environ) only by the daemon's owner.
    if let Some(secret) = user.and_then(|u| u.split_once(':')).map(|(_, p)| p)
        && !secret.is_empty()
        && child_args
            .iter()
            .any(|a| a.to_string_lossy().contains(secret))
    {
        return Err(CliError::Daemon(
            "could not keep the password out of the daemon's command line; pass it in \
             LAZYLAYER_USER instead of --user"
                .into(),
        ));
    }
    let mut command = std::process::Command::new(exe);
    command.args(child_args);
    if let Some(user) = user {
        command.env("LAZYLAYER_USER", user);
    }
    let mut child = command
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

/// The daemon's arguments: the command line without `--daemon` and without `--user`/`-u` and
/// its value, which the daemon gets in its environment instead.
fn daemon_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            out.push(arg);
            out.extend(args);
            break;
        }
        if text == "--daemon" || text.starts_with("--user=") {
            continue;
        }
        if text == "--user" {
            args.next();
            continue;
        }
        // A cluster of short flags (`-u X`, `-uX`, `-vu X`): `u` takes the rest, or the next
        // argument.
        if let Some(flags) = text.strip_prefix('-').filter(|f| !f.starts_with('-'))
            && let Some(at) = flags.find('u')
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
    fn the_daemons_command_line_has_no_credentials() {
        let args =
            |line: &str| -> Vec<std::ffi::OsString> { line.split(' ').map(Into::into).collect() };
        for (given, daemon) in [
            ("mount --daemon --user a:pw img dir", "mount img dir"),
            ("mount --user=a:pw --daemon img dir", "mount img dir"),
            ("mount -u a:pw --daemon img dir", "mount img dir"),
            ("mount -ua:pw --daemon img dir", "mount img dir"),
            ("mount --daemon -vu a:pw img dir", "mount -v img dir"),
            ("mount --daemon -vvua:pw img dir", "mount -vv img dir"),
            ("mount --daemon -v img -- -u", "mount -v img -- -u"),
        ] {
            assert_eq!(daemon_args(args(given)), args(daemon), "{given}");
        }
    }
}

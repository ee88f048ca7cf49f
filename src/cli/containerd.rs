//! The containerd side: the `snapshotter` daemon and `pull` into containerd.

use super::args::{CriProxyArgs, PullArgs, SnapshotterArgs};
use super::error::CliError;

pub(super) async fn snapshotter(args: SnapshotterArgs) -> Result<(), CliError> {
    use crate::containerd::snapshotter::{Snapshotter, SnapshotterConfig, service};
    let disk = args.read.disk_cache()?;
    let registry = args.remote.registry_config()?;
    let config = SnapshotterConfig {
        root: args.root.clone(),
        platform: args.remote.platform()?,
        image_fs: args.read.image_fs_options(disk, registry.retry.clone())?,
        registry,
        cri_proxy: args.cri_proxy.clone(),
        keep_connections: true,
    };
    let snapshotter = std::sync::Arc::new(Snapshotter::open(config).await?);
    let recovery = tokio::spawn({
        let snapshotter = snapshotter.clone();
        async move { snapshotter.recover().await }
    });
    let shutdown = stop_requested()?;
    eprintln!(
        "lazylayer: snapshotter serving on {} (root {})",
        args.address.display(),
        args.root.display()
    );
    let served = service::serve(snapshotter.clone(), &args.address, shutdown).await;
    recovery.abort();
    snapshotter.close().await;
    let served = served.map_err(|source| CliError::Serve {
        address: args.address.display().to_string(),
        source,
    });
    if snapshotter.keeps_connections() && served.is_ok() {
        // The mounts stay for the next snapshotter. Exit before anything is dropped: a read
        // still in flight would otherwise be answered EIO as its task is dropped with the
        // runtime; left unanswered, the next snapshotter gets it again from the kernel.
        std::process::exit(0);
    }
    served
}

/// Resolves on SIGTERM or Ctrl-C: how the foreground daemons are told to stop.
fn stop_requested() -> Result<impl std::future::Future<Output = ()>, CliError> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Daemon(e.to_string()))?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    })
}

pub(super) async fn cri_proxy(args: CriProxyArgs) -> Result<(), CliError> {
    let shutdown = stop_requested()?;
    eprintln!(
        "lazylayer: CRI image service proxy serving on {} in front of {}",
        args.address.display(),
        args.backend.display()
    );
    crate::containerd::cri_proxy::serve(&args.address, &args.backend, shutdown).await?;
    Ok(())
}

pub(super) async fn pull(args: PullArgs) -> Result<(), CliError> {
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

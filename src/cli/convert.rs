//! `convert` (write a lazy copy of an image) and `index` (publish gzip seek indexes next to an
//! image), with their progress lines.

use super::args::{ConvertArgs, ConvertFormat, IndexArgs};
use super::error::CliError;
use super::options::size_flag;
use crate::model::reference::ImageRef;

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

pub(super) async fn convert(args: ConvertArgs) -> Result<(), CliError> {
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
            flag: "prioritize",
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        options.prioritize = crate::convert::parse_prioritize(&text).map_err(bad)?;
    }
    let config = args.remote.registry_config()?;
    if let Some(from) = &args.prioritize_profile {
        options.prioritize = prioritize_profile(from, &args.remote).await?;
    }
    if let ImageRef::Registry(target) = &destination {
        crate::convert::output::check_push_access(target, &config).await?;
    }
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

/// The paths of `--prioritize-profile`: a profile file, else the profile published next to
/// the image `from` names.
async fn prioritize_profile(
    from: &str,
    remote: &super::args::RemoteArgs,
) -> Result<Vec<Vec<u8>>, CliError> {
    let bad = |reason: String| CliError::Prioritize {
        flag: "prioritize-profile",
        path: from.to_string(),
        reason,
    };
    let profile = if std::path::Path::new(from).is_file() {
        let bytes = std::fs::read(from).map_err(|e| bad(e.to_string()))?;
        let digest = crate::model::digest::Digest::of(&bytes);
        crate::fs::profile::Profile::parse(&bytes, &digest).map_err(|e| bad(e.to_string()))?
    } else {
        let reference = ImageRef::parse(from)?;
        let config = remote.registry_config()?;
        let opened =
            crate::source::open::open_image(&reference, None, &config, &remote.platform()?, None)
                .await?;
        let image = &opened.image;
        let Some(artifact) = &image.profile else {
            return Err(bad(format!(
                "not a file, and image {from} ({}) has no published start-up profile",
                image.manifest_digest
            )));
        };
        crate::fs::profile::fetch_published(&*opened.source, &image.manifest_digest, artifact)
            .await
            .map_err(|e| bad(e.to_string()))?
            .profile
    };
    crate::convert::parse_prioritize(&profile.files.join("\n")).map_err(bad)
}

pub(super) async fn index(args: IndexArgs) -> Result<(), CliError> {
    let span = match &args.span {
        Some(span) => size_flag("span", span)?,
        None => crate::layer::gzip_index::DEFAULT_SPAN,
    };
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

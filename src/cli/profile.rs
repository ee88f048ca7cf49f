//! `profile`: record, publish, fetch, show and delete images' start-up profiles (see
//! [`crate::fs::profile`]). Profiles live in the disk cache, keyed by the image's repository;
//! published ones live next to the image in its registry.

use bytes::Bytes;

use super::args::{ProfileArgs, ProfileCommand, ProfilePushArgs};
use super::error::CliError;
use super::options::{cache_dir_error, open_cache};
use super::read::write_stdout;
use crate::cache::disk::DiskCache;
use crate::fs::profile::{self, MAX_PROFILE_BYTES, Profile};
use crate::fs::{ImageFs, ImageFsOptions};
use crate::model::oci::{
    ANNOTATION_CREATED, Descriptor, MEDIA_PROFILE_BLOB, MEDIA_PROFILE_PACK, PROFILE_ARTIFACT_TYPE,
};
use crate::model::reference::ImageRef;
use crate::source::open::{OpenedImage, open_image};

pub(super) async fn profile(command: ProfileCommand) -> Result<(), CliError> {
    match command {
        ProfileCommand::Record(args) => super::run::record(*args).await,
        ProfileCommand::Push(args) => push(args).await,
        ProfileCommand::Pull(args) => pull(args).await,
        ProfileCommand::Show(args) => show(args, false).await,
        ProfileCommand::Clear(args) => show(args, true).await,
    }
}

/// The image `args` name, resolved, and the disk cache.
async fn open(args: &ProfileArgs) -> Result<(OpenedImage, DiskCache), CliError> {
    let reference = ImageRef::parse(&args.reference)?;
    let config = args.remote.registry_config()?;
    let opened = open_image(&reference, None, &config, &args.remote.platform()?, None).await?;
    let disk = open_cache(&args.cache_dir, u64::MAX)?;
    Ok((opened, disk))
}

fn no_profile(image: &str, args: &ProfileArgs) -> CliError {
    CliError::Path {
        image: image.to_string(),
        path: args.cache_dir.display().to_string(),
        reason: "no start-up profile in this cache: record one with `lazylayer profile record`, \
                 fetch a published one with `lazylayer profile pull`, or mount the image once"
            .into(),
    }
}

async fn show(args: ProfileArgs, clear: bool) -> Result<(), CliError> {
    let (opened, disk) = open(&args).await?;
    let image = opened.image.source;
    let Some(profile) = profile::load(&disk, &image) else {
        return Err(no_profile(&image, &args));
    };
    if clear {
        std::fs::remove_file(disk.dir().join("meta").join(profile::file_name(&image)))
            .map_err(cache_dir_error(&args.cache_dir))?;
        eprintln!(
            "lazylayer: removed the profile of {image} ({} files)",
            profile.files.len()
        );
        return Ok(());
    }
    let mut out = String::new();
    for f in &profile.files {
        out.push('/');
        out.push_str(f);
        out.push('\n');
    }
    write_stdout(out.as_bytes())?;
    Ok(())
}

async fn push(push: ProfilePushArgs) -> Result<(), CliError> {
    let args = &push.profile;
    let reference = ImageRef::parse(&args.reference)?;
    let ImageRef::Registry(target) = &reference else {
        return Err(CliError::Publish(format!(
            "{reference}: `profile push` publishes next to an image in a registry"
        )));
    };
    let (opened, disk) = open(args).await?;
    let image = opened.image.clone();
    let Some(profile) = profile::load(&disk, &image.source) else {
        return Err(no_profile(&image.source, args));
    };
    let bytes = Bytes::from(serde_json::to_vec(&profile).expect("a profile serialises"));
    let failed = |e: crate::source::registry::RegistryError| {
        CliError::Publish(format!("publishing the profile of {}: {e}", args.reference))
    };
    if bytes.len() as u64 > MAX_PROFILE_BYTES {
        return Err(CliError::Publish(format!(
            "the profile of {} is {} bytes, more than the {MAX_PROFILE_BYTES}-byte limit mounts accept",
            args.reference,
            bytes.len()
        )));
    }
    let config = args.remote.registry_config()?;
    let mut blobs = vec![(Descriptor::of(MEDIA_PROFILE_BLOB, &bytes), bytes)];
    let mut packed = String::new();
    if !push.list_only {
        let options = ImageFsOptions {
            disk: Some(std::sync::Arc::new(disk)),
            retry: config.retry.clone(),
            sibling_bytes: 0,
            amplify_bytes: 0,
            ..ImageFsOptions::default()
        };
        let fs = ImageFs::open(opened, &options)
            .await
            .map_err(|source| CliError::Open {
                image: args.reference.clone(),
                source,
            })?;
        let (pack, chunks) = fs.profile_pack(&profile).await.map_err(|e| {
            CliError::Publish(format!(
                "reading the start-up files of {} for the profile's pack: {e} \
                 (--list-only publishes the profile without it)",
                args.reference
            ))
        })?;
        if chunks == 0 {
            // Layers without a lazy index stream whole anyway: nothing to pack.
            packed = ", no pack: none of its files is in a layer with a lazy index".into();
        } else {
            packed = format!(", a pack of {chunks} chunks in {} bytes", pack.len());
            let pack = Bytes::from(pack);
            blobs.push((Descriptor::of(MEDIA_PROFILE_PACK, &pack), pack));
        }
    }
    let repository =
        crate::source::registry::Repository::for_push(target, &config).map_err(failed)?;
    let subject = Descriptor::new(
        image.manifest_media_type.clone(),
        image.manifest_digest.clone(),
        image.manifest_size,
    );
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(
        ANNOTATION_CREATED.to_string(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    let artifact = repository
        .publish_artifact(&subject, PROFILE_ARTIFACT_TYPE, &blobs, annotations)
        .await
        .map_err(failed)?;
    eprintln!(
        "lazylayer: published the profile of {} ({} files{packed}) as {}, a referrer of {}",
        args.reference,
        profile.files.len(),
        artifact.digest,
        image.manifest_digest
    );
    Ok(())
}

async fn pull(args: ProfileArgs) -> Result<(), CliError> {
    let (opened, disk) = open(&args).await?;
    let image = &opened.image;
    let Some(artifact) = &image.profile else {
        return Err(CliError::Path {
            image: args.reference.clone(),
            path: format!("@{}", image.manifest_digest),
            reason: "no start-up profile is published for this manifest (`lazylayer profile push` \
                     publishes one)"
                .into(),
        });
    };
    let published = profile::fetch_published(&*opened.source, &image.manifest_digest, artifact)
        .await
        .map_err(|e| CliError::Publish(format!("{}: {e}", args.reference)))?
        .profile;
    let stored = Profile {
        image: image.source.clone(),
        ..published
    };
    profile::store(&disk, &stored);
    eprintln!(
        "lazylayer: fetched the published profile of {} ({} files) into {}",
        args.reference,
        stored.files.len(),
        args.cache_dir.display()
    );
    Ok(())
}

//! An opened image: its merged tree plus the reader for file contents.
//!
//! Opening resolves nothing by itself: the caller passes a resolved image. Opening then reads
//! every layer's index concurrently (a TOC for eStargz and zstd:chunked, a full stream for
//! index-less layers, whose file data lands in the chunk cache on the way) and builds the merged
//! tree. After that, metadata operations touch memory only and reads go through the
//! [`ContentReader`]. This is the object `ls`, `cat` and the FUSE mount share.

pub mod profile;
pub mod profile_pack;
pub mod readahead;
pub mod siblings;
pub mod stream_read;
pub mod tree;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::cache::ChunkTiers;
use crate::cache::disk::DiskCache;
use crate::cache::memory::{ChunkCache, ChunkKey};
use crate::fetch::scheduler::{Priority, RequestScheduler};
use crate::fetch::{ContentError, ContentReader, LayerInfo};
use crate::fs::tree::{Ino, MergedTree, NodeKind};
use crate::layer::tar_stream::StreamObserver;
use crate::layer::{self, LayerError, LayerFormat};
use crate::layer::{ChunkRef, ChunkSource};
use crate::model::digest::Digest;
use crate::source::ImageSource;
use crate::source::image::ResolvedImage;
use crate::source::open::OpenedImage;
use crate::source::retry::{self, RetryPolicy};
use crate::source::stats::FetchStats;
use profile::Recorder;
use readahead::ReadAhead;
use siblings::SiblingPrefetch;

/// Settings for an opened image.
#[derive(Clone)]
pub struct ImageFsOptions {
    /// Bytes of uncompressed chunks kept in memory. 512 MiB holds the working set of a typical
    /// application start (a Python or JVM runtime touches 50–200 MiB) with room for a second
    /// image, and is small next to the memory of a machine that runs containers.
    pub cache_bytes: u64,
    /// The disk tier, shared by every image of the process (chunks are content addressed, so
    /// images that share content share it); `None` keeps everything in memory.
    pub disk: Option<Arc<DiskCache>>,
    /// Requests in flight to the source at once: 8. Six go to a prioritised prefetch (see
    /// `PREFETCH_PARALLEL`), whose many small spans each wait out a round trip, and two stay
    /// free for readers' misses. Whole-layer downloads do best with fewer (moby uses 3), but
    /// lazy reads are small ranges: with 4, a published profile's start of python-app (20 ms /
    /// 200 Mbit/s) fetched more (64 KiB gaps filled) and took longer, 1.49 s against 1.41 s.
    pub request_slots: usize,
    /// Fetch the rest of every lazily read layer into the disk tier while nobody waits (needs
    /// a disk tier). Its requests wait for quiet (see `fetch::scheduler`), so it never competes
    /// with a start; off by default here, on by default in the CLI and the snapshotter.
    pub background_fill: bool,
    /// A cap on the background fill's bytes per second; `None`: as fast as the link allows
    /// while it is idle, which the quiet rule makes safe.
    pub background_bytes_per_second: Option<u64>,
    /// Record the files read in this long after opening as the image's start-up profile, and
    /// prefetch the files of the profile learned before or else of the one published next to
    /// the image (`None`: none of it). Learned profiles need a disk tier to be kept.
    pub profile_window: Option<std::time::Duration>,
    /// How fetches whose bytes fail verification are tried again, and how a layer index that
    /// fails to load is; transport failures are retried below, by the source.
    pub retry: RetryPolicy,
    /// Compressed bytes a reader's request may grow to with the chunks that follow it in the
    /// blob (read amplification; 0 turns it off). See `ContentReader::with_amplification`.
    /// 2 MiB (80 ms at 200 Mbit/s): a start without hints misses file after file, mostly in
    /// the part of the layer it reads first, and each request saved is a round trip the
    /// application waits for. python-app eStargz through a 20 ms / 200 Mbit/s link, 3
    /// interleaved cold starts each (8 request slots, background fill held during the start):
    /// 128K 2.78 s, 24.3 MB, 93 requests; 512K 2.67 s, 25.9 MB; 1M 2.55 s, 28.1 MB; 2M 2.36 s,
    /// 29.0 MB, 54 requests; 4M 2.29 s, 32.1 MB; 8M 2.34 s. (With 4 slots and background fill
    /// competing, 2M had been slower than 128K.) Images with a landmark or profile are capped at
    /// [`HINTED_AMPLIFY`].
    pub amplify_bytes: u64,
    /// Compressed bytes of a directory's other small files fetched on the first miss in it
    /// (0 turns it off, as a landmark or a profile does; see [`siblings`]). 4 MiB: 160 ms at
    /// 200 Mbit/s, the price of a few of the round trips it saves when a start imports a
    /// package's modules one by one
    /// (python-app through a 20 ms link, 3 runs each: off 4.69 s and 24.4 MB, 1M 4.02 s, 4M
    /// 3.81 s and 28.5 MB; 16M fetched the same bytes as 4M).
    pub sibling_bytes: u64,
}

impl Default for ImageFsOptions {
    fn default() -> Self {
        ImageFsOptions {
            cache_bytes: 512 << 20,
            disk: None,
            request_slots: 8,
            background_fill: false,
            background_bytes_per_second: None,
            profile_window: None,
            retry: RetryPolicy::default(),
            amplify_bytes: 2 << 20,
            sibling_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageFsError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: Arc<ContentError>,
    },
}

/// What one layer turned out to be when it was opened.
#[derive(Clone, Debug)]
pub struct OpenedLayer {
    pub digest: Digest,
    pub format: LayerFormat,
    pub size: u64,
    pub prefetch_end: Option<u64>,
}

pub struct ImageFs {
    pub image: ResolvedImage,
    pub tree: MergedTree,
    pub layers: Vec<OpenedLayer>,
    content: Arc<ContentReader>,
    /// Sequential-read detection per inode.
    read_ahead: ReadAhead,
    cache: Arc<ChunkCache>,
    stats: Arc<FetchStats>,
    disk: Option<Arc<DiskCache>>,
    recorder: Option<Recorder>,
    siblings: SiblingPrefetch,
    /// The same for the disk tier: the first read in a directory that finds its chunk on disk,
    /// not in memory, loads the directory's other small files from disk meanwhile.
    disk_siblings: SiblingPrefetch,
}

/// Puts the file data of a streamed layer into the caches as it goes past. Writing to the disk
/// tier before the blob is verified is safe: a chunk file is named by its content's digest and
/// is used only where a verified index asks for that digest.
struct CacheFiller {
    tiers: ChunkTiers,
    layer: Digest,
}

impl StreamObserver for CacheFiller {
    fn chunk(&self, offset: u64, data: &Bytes, digest: &Digest) {
        let key = ChunkKey {
            layer: self.layer.clone(),
            offset,
            inner: 0,
        };
        self.tiers.keep(Some(key), Some(digest), data, false);
    }
}

impl ImageFs {
    /// Reads every layer's index and builds the merged tree. The image's counters
    /// ([`OpenedImage::stats`]) go on counting what its reads fetch.
    pub async fn open(
        opened: OpenedImage,
        options: &ImageFsOptions,
    ) -> Result<ImageFs, ImageFsError> {
        let OpenedImage {
            source,
            stats,
            image,
            ..
        } = opened;
        let cache = Arc::new(ChunkCache::new(options.cache_bytes));
        let tiers = ChunkTiers {
            memory: cache.clone(),
            disk: options.disk.clone(),
        };
        let loads = image.layers.iter().map(|layer| {
            let source = source.clone();
            let digest = layer.descriptor.digest.clone();
            let filler = Arc::new(CacheFiller {
                tiers: tiers.clone(),
                layer: digest.clone(),
            });
            let cache = cache.clone();
            let disk = options.disk.clone();
            let policy = &options.retry;
            async move {
                let what = || format!("index of layer {digest}");

                retry::retry(policy, what, || async {
                    let result =
                        layer::load(source.clone(), layer, filler.clone(), disk.as_deref()).await;
                    if result.is_err() {
                        // Data streamed before a failed verification must not be served.
                        cache.remove_layer(&digest);
                    }
                    result
                })
                .await
            }
        });
        // A learned profile (this machine's own) wins; else the published one is read while the
        // layers' indexes load.
        let learned = learned_profile(&image, options);
        let published = async {
            let artifact = image.profile.as_ref()?;
            if learned.is_some() || options.profile_window.is_none() {
                return None;
            }
            match profile::fetch_published(&*source, &image.manifest_digest, artifact).await {
                Ok(published) => Some(published),
                Err(e) => {
                    tracing::warn!(
                        "{}: its published start-up profile is not used: {e}",
                        image.source
                    );
                    None
                }
            }
        };
        let (indexes, published) =
            tokio::join!(futures_util::future::try_join_all(loads), published);
        let indexes = indexes?;
        let layers: Vec<OpenedLayer> = indexes
            .iter()
            .zip(&image.layers)
            .map(|(index, layer)| OpenedLayer {
                digest: index.digest.clone(),
                format: index.format,
                size: layer.descriptor.size,
                prefetch_end: index.prefetch_end,
            })
            .collect();
        let infos = image
            .layers
            .iter()
            .zip(&indexes)
            .map(|(layer, index)| LayerInfo {
                descriptor: layer.descriptor.clone(),
                format: index.format,
                checkpoints: index.checkpoints.clone(),
            })
            .collect();
        let tree = MergedTree::build(indexes.into_iter().map(|i| (i.digest, i.entries)))?;
        // Every compressed chunk in blob order: the neighbours a read is amplified with, what
        // background filling fetches, and where the landmark's chunks are found.
        let all_chunks = chunks_in_blob_order(&tree, &layers);
        let image_bytes: u64 = image.layers.iter().map(|l| l.descriptor.size).sum();
        let (profile, pack) = match (learned, published) {
            (Some(learned), _) => (Some(learned), None),
            (None, Some(published)) => {
                let pack = published.pack.filter(|pack| {
                    let fits = pack.size <= image_bytes;
                    if !fits {
                        tracing::warn!(
                            "{}: its published start-up pack {} is {} bytes, more than the \
                             image's layers hold ({image_bytes}): not used",
                            image.source,
                            pack.digest,
                            pack.size
                        );
                    }
                    fits
                });
                (Some(published.profile), pack)
            }
            (None, None) => (None, None),
        };
        // Prioritised files: the eStargz landmark's (the image author's list), then the
        // profile's, from its pack when it has one.
        let mut work = landmark_work(&all_chunks, &layers);
        let mut from_pack = None;
        if let Some(profile) = profile {
            match pack {
                Some(pack) => from_pack = Some((pack, profile.work_by_path(&tree))),
                None => work.extend(profile.work(&tree)),
            }
        }
        let hinted = !work.is_empty() || from_pack.is_some();
        // A landmark or a profile says what the start reads; sibling prefetch and wide read
        // amplification only guess, and their guesses would take the link from the
        // prioritised prefetch.
        let (sibling_bytes, amplify_bytes) = if !hinted {
            (options.sibling_bytes, options.amplify_bytes)
        } else {
            (0, options.amplify_bytes.min(HINTED_AMPLIFY))
        };
        let scheduler = RequestScheduler::new(options.request_slots);
        scheduler.hold_background();
        let content = Arc::new(
            ContentReader::new(
                source,
                tiers,
                infos,
                stats.clone(),
                scheduler,
                options.retry.clone(),
            )
            .with_amplification(all_chunks.clone(), amplify_bytes),
        );
        let recorder = options
            .profile_window
            .filter(|_| options.disk.is_some())
            .map(Recorder::new);
        let background = options.background_fill && options.disk.is_some();
        if hinted {
            tokio::spawn(prefetch_hints(
                content.clone(),
                work,
                from_pack,
                stats.clone(),
                image.source.clone(),
            ));
        } else {
            stats
                .profile_prefetched
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if background {
            tokio::spawn(fill_in_background(
                content.clone(),
                all_chunks,
                options.background_bytes_per_second,
                stats.clone(),
            ));
        } else {
            stats
                .background_complete
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let siblings = SiblingPrefetch::new(&tree, sibling_bytes);
        let disk_siblings = SiblingPrefetch::new(
            &tree,
            if options.disk.is_some() {
                DISK_SIBLING_BYTES
            } else {
                0
            },
        );
        Ok(ImageFs {
            siblings,
            disk_siblings,
            image,
            tree,
            layers,
            content,
            read_ahead: ReadAhead::default(),
            cache,
            stats,
            disk: options.disk.clone(),
            recorder,
        })
    }

    /// Reads up to `len` bytes at `offset` of a regular file; empty past the end or for
    /// anything that is not a regular file.
    ///
    /// A read that continues where the previous read of the same file ended extends a streak,
    /// and the bytes after it are fetched ahead in the background, in a window that doubles with
    /// the streak (up to [`readahead::MAX_READ_AHEAD`]) and collapses on a seek, as mountpoint-s3's
    /// prefetcher does. The kernel's own readahead asks for one window at a time; this keeps
    /// the network busy with the next windows meanwhile.
    pub async fn read(&self, ino: Ino, offset: u64, len: u64) -> Result<Bytes, Arc<ContentError>> {
        let Some(NodeKind::File {
            size,
            layer,
            chunks,
        }) = self.tree.node(ino).map(|n| &n.kind)
        else {
            return Ok(Bytes::new());
        };
        if let Some(recorder) = &self.recorder {
            recorder.record(ino, offset, len);
        }
        // The chunk this read starts in decides whether its directory's other files are
        // loaded from disk or fetched (each once per directory); found only when one is pending.
        let first = || {
            let at = chunks.partition_point(|c| c.file_offset + c.size <= offset);
            chunks.get(at).map(std::slice::from_ref).unwrap_or_default()
        };
        if self.disk_siblings.pending(ino) && !self.content.only_on_disk(*layer, first()).is_empty()
        {
            let work = self.disk_siblings.work(&self.tree, ino);
            tokio::spawn(load_from_disk(self.content.clone(), work));
        }
        if self.siblings.pending(ino) && !self.content.missing(*layer, first()).is_empty() {
            let work = self.siblings.work(&self.tree, ino);
            if !work.is_empty() {
                tokio::spawn(prefetch_group(
                    self.content.clone(),
                    work,
                    "sibling prefetch",
                ));
            }
        }
        let window = self.read_ahead.window(ino, offset, len);
        let ahead = offset.saturating_add(len);
        if window > 0 && ahead < *size {
            let (content, layer, chunks, size) =
                (self.content.clone(), *layer, chunks.clone(), *size);
            tokio::spawn(async move {
                // A failure here is not the reader's: the real read will fetch again.
                let _ = content
                    .read(layer, &chunks, size, ahead, window, Priority::Prefetch)
                    .await;
            });
        }
        self.content
            .read(*layer, chunks, *size, offset, len, Priority::Reader)
            .await
    }

    /// Stores the start-up profile recorded so far (once; see [`crate::fs::profile`]).
    pub fn save_profile(&self) {
        if let (Some(recorder), Some(disk)) = (&self.recorder, &self.disk) {
            recorder.save(disk, &self.image.source, &self.tree);
        }
    }

    /// Waits until the chunks fetched so far are in the disk tier's files (see
    /// [`DiskCache::flush`]): on unmount, so that the next mount finds them.
    pub fn flush_cache(&self) {
        if let Some(disk) = &self.disk {
            disk.flush();
        }
    }

    /// Starts the profile's recording window now (see [`Recorder::restart`]).
    pub fn restart_profile_window(&self) {
        if let Some(recorder) = &self.recorder {
            recorder.restart();
        }
    }

    /// Fetches the published start-up profile that [`ImageFs::open`] would read for `image`
    /// into the disk cache, where `open` then finds it. For a caller that loads the layers'
    /// indexes before opening (the snapshotter checks them during a pull): the profile then
    /// arrives beside the indexes, not a round trip or two after them. Failures are left for
    /// `open` to report.
    pub async fn fetch_profile_ahead(
        raw: Arc<dyn ImageSource>,
        image: &ResolvedImage,
        options: &ImageFsOptions,
    ) {
        let (Some(artifact), Some(disk)) = (&image.profile, &options.disk) else {
            return;
        };
        if options.profile_window.is_none() || learned_profile(image, options).is_some() {
            return;
        }
        let (source, _) = crate::source::open::stack(raw, Some(disk.clone()));
        let _ = profile::fetch_published(&*source, &image.manifest_digest, artifact).await;
    }

    /// The pack of `profile`'s chunks in this image (see [`profile_pack`]) and how many chunks
    /// it holds, read through the cache tiers.
    pub async fn profile_pack(
        &self,
        profile: &profile::Profile,
    ) -> Result<(Vec<u8>, usize), Arc<ContentError>> {
        profile_pack::build(&self.content, &profile.work_by_path(&self.tree)).await
    }

    /// Records no start-up profile: the mount was taken over from an earlier daemon, and what
    /// its containers read now is not their start.
    pub fn stop_profile(&self) {
        if let Some(recorder) = &self.recorder {
            recorder.stop();
        }
    }

    /// How long reads are recorded for the profile, when they are.
    pub fn profile_window(&self) -> Option<std::time::Duration> {
        self.recorder.as_ref().map(Recorder::window)
    }

    pub fn stats(&self) -> &FetchStats {
        &self.stats
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_deref()
    }

    /// Requests waiting for a slot, per priority (background, prefetch, reader).
    pub fn queued(&self) -> [usize; 3] {
        self.content.queued()
    }
}

/// This machine's own profile of `image`, when profiles are used at all.
fn learned_profile(image: &ResolvedImage, options: &ImageFsOptions) -> Option<profile::Profile> {
    options
        .disk
        .as_deref()
        .filter(|_| options.profile_window.is_some())
        .and_then(|disk| profile::load(disk, &image.source))
}

/// Every compressed chunk of every file in the merged tree, per layer (bottom layer first, as
/// lower layers are needed by more images), in blob order so that neighbours merge into one
/// request. Chunks of streamed layers are left out: they were all cached when the layer streamed.
fn chunks_in_blob_order(tree: &MergedTree, layers: &[OpenedLayer]) -> Vec<(usize, Vec<ChunkRef>)> {
    let mut per_layer: Vec<Vec<ChunkRef>> = vec![Vec::new(); layers.len()];
    let mut seen = std::collections::HashSet::new();
    tree.walk(crate::fs::tree::ROOT, |_, ino| {
        if let Some(NodeKind::File { layer, chunks, .. }) = tree.node(ino).map(|n| &n.kind)
            && seen.insert(ino)
        {
            per_layer[*layer].extend(
                chunks
                    .iter()
                    .filter(|c| matches!(c.source, ChunkSource::Compressed { .. }))
                    .cloned(),
            );
        }
    });
    per_layer
        .into_iter()
        .enumerate()
        .filter(|(_, chunks)| !chunks.is_empty())
        .map(|(layer, mut chunks)| {
            chunks.sort_by_key(crate::fetch::plan::blob_order);
            (layer, chunks)
        })
        .collect()
}

/// Compressed bytes of a directory's small files loaded from the disk tier on the first read
/// in it that finds its chunk there and not in memory. A walk of a tree from disk (a restart, a
/// backup, `tar`) reads file after file, each waiting for its disk reads; loading the next ones
/// meanwhile, a few at a time, overlaps those waits. Large next to a directory's small files:
/// disk reads are cheap, and what is loaded is in memory when the walk gets there.
const DISK_SIBLING_BYTES: u64 = 16 << 20;

/// Disk loads [`load_from_disk`] runs at once: enough to keep a disk's queue busy while the
/// walk itself waits on one.
const DISK_LOADS: usize = 4;

/// Loads `work`'s chunks that are only on disk into memory, [`DISK_LOADS`] at a time, on
/// blocking threads.
async fn load_from_disk(content: Arc<ContentReader>, work: Vec<(usize, Vec<ChunkRef>)>) {
    let loads = work.into_iter().flat_map(|(layer, chunks)| {
        let missing = content.only_on_disk(layer, &chunks);
        missing.into_iter().map(move |c| (layer, c))
    });
    let loads: Vec<(usize, ChunkRef)> = loads.collect();
    futures_util::stream::iter(loads)
        .map(|(layer, chunk)| {
            let content = content.clone();
            tokio::task::spawn_blocking(move || content.load_from_disk(layer, &chunk))
        })
        .buffer_unordered(DISK_LOADS)
        .for_each(|_| async {})
        .await;
}

/// Read amplification at most, for images whose start is prefetched from a landmark or a
/// profile: a miss there is a file the hints left out or one the prefetch has not reached yet,
/// and a wide window would fetch what the prefetch brings anyway (python-app's published
/// profile with 4M: 15-16.7 MB fetched against 13 MB, and no faster). 128 KiB still brings a
/// missed file's immediate neighbours.
const HINTED_AMPLIFY: u64 = 128 << 10;

/// Compressed bytes per background request, and how many run at once. Small, so that the
/// requests in flight when a reader arrives (the scheduler stops new ones) are done within a few
/// tens of milliseconds (1 MiB is 40 ms at 200 Mbit/s); two at once keep the link busy while
/// one waits out its round trip, and leave request slots to readers.
const BACKGROUND_REQUEST: u64 = 1 << 20;
const BACKGROUND_PARALLEL: usize = 2;

async fn fill_in_background(
    content: Arc<ContentReader>,
    work: Vec<(usize, Vec<ChunkRef>)>,
    bytes_per_second: Option<u64>,
    stats: Arc<FetchStats>,
) {
    let started = std::time::Instant::now();
    let mut fetched = 0u64;
    let batches = work.into_iter().flat_map(|(layer, chunks)| {
        crate::fetch::plan::spans_of(&chunks, BACKGROUND_REQUEST)
            .into_iter()
            .map(move |b| (layer, b))
    });
    let mut done = futures_util::stream::iter(batches)
        .map(|(layer, batch)| {
            let content = content.clone();
            async move {
                let missing = content.missing(layer, &batch);
                let bytes: u64 = missing.iter().map(|c| c.size).sum();
                if !missing.is_empty()
                    && let Err(e) = content
                        .fetch_chunks(layer, &missing, Priority::Background)
                        .await
                {
                    tracing::debug!("background fetch: {e}");
                }
                bytes
            }
        })
        .buffer_unordered(BACKGROUND_PARALLEL);
    while let Some(bytes) = done.next().await {
        fetched += bytes;
        let Some(rate) = bytes_per_second else {
            continue;
        };
        // Stay under the cap: pause until the bytes so far fit the time so far.
        let due = std::time::Duration::from_secs_f64(fetched as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    stats
        .background_complete
        .store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The chunks an eStargz layer's author placed before its prefetch landmark (the files its
/// workload needs first), per layer.
fn landmark_work(
    all_chunks: &[(usize, Vec<ChunkRef>)],
    layers: &[OpenedLayer],
) -> Vec<(usize, Vec<ChunkRef>)> {
    let mut work = Vec::new();
    for (index, chunks) in all_chunks {
        let Some(end) = layers[*index].prefetch_end.filter(|&e| e > 0) else {
            continue;
        };
        let before: Vec<ChunkRef> = chunks
            .iter()
            .filter(|c| matches!(c.source, ChunkSource::Compressed { start, .. } if start < end))
            .cloned()
            .collect();
        if !before.is_empty() {
            work.push((*index, before));
        }
    }
    work
}

/// Compressed bytes between two prioritised chunks that are fetched along rather than split
/// into two requests, for a source that takes one range per request (S3, a registry host that
/// cannot join ranges; see [`JOINED_GAP`] for the others): 16 KiB take 0.7 ms at 200 Mbit/s, far less than the round trip a second
/// request costs once the link is kept full by [`PREFETCH_PARALLEL`] requests. Measured with a
/// published profile of python-app (eStargz, 20 ms / 200 Mbit/s, interleaved starts, medians):
/// 64 KiB gaps with 3 in flight 1.49 s, 14.2 MB in 57 requests; 16 KiB with 6 in flight 1.41-1.44
/// s, 12.9 MB in 103; 8 KiB with 6 1.6 s, 12.7 MB; no gap filling with 8 in flight 1.58 s,
/// 12.6 MB in 200 (the app reads 11.65 MB). Earlier, with 3 in flight: 256 KiB 2.26 s and 16.9 MB.
const PREFETCH_GAP: u64 = 16 << 10;

/// [`PREFETCH_GAP`] for a source that asks for a span's ranges in one request
/// ([`crate::source::ImageSource::joins_ranges`]): a gap then costs a part header of about 150
/// bytes, not a round trip, so only gaps hardly larger than that are worth carrying. Measured on
/// python-app's learned profile (same link, 4 interleaved starts each): spans planned with 16 KiB
/// gaps and joined fetched 12.8-13.9 MB in 29 requests, with 1 KiB gaps 12.3-13.4 MB in 29; one
/// range per request, 12.9-13.9 MB in 103.
const JOINED_GAP: u64 = 1 << 10;

/// Compressed bytes between two chunks of a sibling group fetched along: 256 KiB take 10 ms at
/// 200 Mbit/s, half a 20 ms round trip. Cold starts without hints were measured with it; the
/// prioritised prefetch, whose list is exact, does better with [`PREFETCH_GAP`].
const GROUP_GAP: u64 = 256 << 10;

/// Compressed bytes one prioritised request spans at most: 2 MiB take 80 ms at 200 Mbit/s,
/// four round trips of 20 ms, so a few in flight keep the link full, and a reader that wants a
/// chunk of a span in flight gets it as soon as that chunk's bytes are in. Measured (before
/// runs handed chunks over early) on python-app's learned profile at 20 ms / 200 Mbit/s, 3
/// starts each: 2 MiB spans with 256 KiB gaps 1.94-2.05 s (about 60 requests),
/// 1 MiB spans 2.04-2.59 s, 64 KiB gaps 2.13-2.22 s (about 90), 5 in flight 2.17-2.50 s.
const PREFETCH_SPAN: u64 = 2 << 20;

/// Prioritised requests in flight when each carries one range, and at most when they carry
/// several: with spans cut at small gaps many are a few tens of KiB, so six keep a 20 ms / 200
/// Mbit/s link busy across their round trips; two fewer than the default request slots, so a
/// reader's miss still finds one free.
const PREFETCH_PARALLEL: usize = 6;

/// Compressed bytes of one need-ordered request ([`crate::fetch::plan::need_ordered_spans`], for
/// a source that joins ranges): what the start needs within 512 KiB of the request's first
/// chunk. Blob-order 2 MiB spans put an early file in nearly every span, and with six in flight
/// python3.11's first chunk (2 MB), needed first, arrived near the end of the prefetch. Measured
/// on python-app's learned profile at 20 ms / 200 Mbit/s (dev loop, interleaved starts, 4 in
/// flight): 512 KiB 1.23-1.24 s, 256 KiB 1.37 s, blob-order spans 1.32-1.38 s.
const NEED_WINDOW: u64 = 512 << 10;

/// Need-ordered requests in flight, at least (whatever their bytes): a request of one large
/// chunk must not hold the others back. With one, starts took 1.31-1.38 s instead of 1.15-1.30.
const MIN_REQUESTS_IN_FLIGHT: usize = 4;

/// Bytes of need-ordered requests in flight, at least: about what four 512 KiB requests hold,
/// the best at 20 ms / 200 Mbit/s (with more, what is needed first shares the link with later
/// requests and arrives later: 6 x 512 KiB 1.33-1.37 s).
const MIN_IN_FLIGHT: u64 = 2 << 20;

/// ... and at most: a start-up set is rarely larger, and a failed request wastes no more.
const MAX_IN_FLIGHT: u64 = 32 << 20;

/// Need-ordered bytes in flight, in round trips' worth of the rate bytes arrive at. That rate is
/// itself what is in flight over a round trip plus its transfer, so the budget settles near
/// (this - 1) bandwidth-delay products: enough to keep the link busy while later requests are
/// asked for (at 80 ms / 200 Mbit/s it settled at 5.2-6.5 MB). A fixed four requests of 512
/// KiB were 9% slower than blob-order spans at 80 ms. Learned profile, dev loop, medians of 3-4
/// interleaved starts, this against blob-order spans with six in flight: 20 ms / 200 Mbit/s
/// 1.25 vs 1.27 s, 80 ms 1.53 vs 1.49 s, 20 ms / 1000 Mbit/s 1.19 vs 1.23 s (measured with up to
/// the 8 request slots in flight, before they were held to [`PREFETCH_PARALLEL`]).
const IN_FLIGHT_ROUND_TRIPS: f64 = 3.0;

/// Fetches what the image's hints say its start reads: the prioritised files (`work`:
/// landmark, profile) and, at the same time, a published profile's pack with the files it
/// covers (then those the pack did not bring, from the layers).
async fn prefetch_hints(
    content: Arc<ContentReader>,
    work: Vec<(usize, Vec<ChunkRef>)>,
    from_pack: Option<(crate::model::oci::Descriptor, profile::PathWork)>,
    stats: Arc<FetchStats>,
    image: String,
) {
    let pack = async {
        if let Some((blob, work)) = from_pack {
            let missed = profile_pack::prefetch(&content, &blob, work, &image).await;
            if !missed.is_empty() {
                prefetch_files(content.clone(), missed, &stats).await;
            }
        }
    };
    tokio::join!(prefetch_files(content.clone(), work, &stats), pack);
    stats
        .profile_prefetched
        .store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Fetches prioritised files (landmark, profile) at prefetch priority, planned as a whole
/// ([`ContentReader::prioritised_spans`]): planned 32 files at a time, python-app's learned
/// profile cost about 140 requests, most of them small; planned at once, about 100, and 29 once
/// each span's ranges went in one request (a registry that joins ranges). A span whose
/// chunks a reader fetched meanwhile is skipped when its turn comes.
///
/// With a source that joins ranges the spans are in need order, and how many bytes are in flight
/// follows the link ([`in_flight_budget`]): few enough that what is needed first gets most of
/// the link, enough to keep it busy, in at most [`PREFETCH_PARALLEL`] requests (the other request
/// slots stay free for readers' misses). Otherwise [`PREFETCH_PARALLEL`] requests.
async fn prefetch_files(
    content: Arc<ContentReader>,
    work: Vec<(usize, Vec<ChunkRef>)>,
    stats: &FetchStats,
) {
    if work.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let spans =
        content.prioritised_spans(&work, PREFETCH_GAP, JOINED_GAP, NEED_WINDOW, PREFETCH_SPAN);
    tracing::debug!(
        "prioritised prefetch: {} files, {} compressed bytes wanted, {} in {} spans",
        work.len(),
        compressed_bytes(&work),
        compressed_bytes(&spans),
        spans.len()
    );
    let fetch = |(layer, span): (usize, Vec<ChunkRef>)| {
        let content = content.clone();
        async move {
            let missing = content.missing(layer, &span);
            if missing.is_empty() {
                return;
            }
            if let Err(e) = content
                .fetch_chunks(layer, &missing, Priority::Prefetch)
                .await
            {
                tracing::debug!("prioritised prefetch: {e}");
            }
        }
    };
    if !content.joins_ranges() {
        let mut done = futures_util::stream::iter(spans)
            .map(fetch)
            .buffer_unordered(PREFETCH_PARALLEL);
        while done.next().await.is_some() {}
    } else {
        let received = FetchStats::get(&stats.bytes);
        let mut spans = spans.into_iter().peekable();
        let mut running = futures_util::stream::FuturesUnordered::new();
        let mut in_flight = 0u64;
        loop {
            let budget = in_flight_budget(stats, started, received);
            while let Some(next) = spans.peek() {
                let size = compressed_bytes(std::slice::from_ref(next));
                let full = running.len() >= PREFETCH_PARALLEL
                    || (running.len() >= MIN_REQUESTS_IN_FLIGHT && in_flight + size > budget);
                if full {
                    break;
                }
                let span = spans.next().expect("peeked");
                in_flight += size;
                let fetched = fetch(span);
                running.push(async move {
                    fetched.await;
                    size
                });
            }
            match running.next().await {
                Some(size) => in_flight -= size,
                None => break,
            }
        }
    }
    tracing::debug!("prioritised prefetch done in {:?}", started.elapsed());
}

/// Compressed bytes a need-ordered prefetch keeps in flight: [`IN_FLIGHT_ROUND_TRIPS`] round
/// trips (the quickest answer of the source so far) at the rate bytes have arrived since the
/// prefetch began (`received` bytes then), within [`MIN_IN_FLIGHT`] and [`MAX_IN_FLIGHT`].
fn in_flight_budget(stats: &FetchStats, started: std::time::Instant, received: u64) -> u64 {
    let Some(round_trip) = stats.round_trip() else {
        return MIN_IN_FLIGHT;
    };
    // The first round trip carries no bytes.
    let sending = started.elapsed().saturating_sub(round_trip);
    if sending < round_trip {
        return MIN_IN_FLIGHT;
    }
    let rate =
        FetchStats::get(&stats.bytes).saturating_sub(received) as f64 / sending.as_secs_f64();
    ((IN_FLIGHT_ROUND_TRIPS * rate * round_trip.as_secs_f64()) as u64)
        .clamp(MIN_IN_FLIGHT, MAX_IN_FLIGHT)
}

/// The compressed bytes that hold `work`'s chunks (a frame shared by several chunks counted once).
fn compressed_bytes(work: &[(usize, Vec<ChunkRef>)]) -> u64 {
    let mut frames = std::collections::HashSet::new();
    for (layer, chunks) in work {
        for c in chunks {
            if let ChunkSource::Compressed { start, end, .. } = c.source {
                frames.insert((*layer, start, end));
            }
        }
    }
    frames.iter().map(|(_, start, end)| end - start).sum()
}

/// Fetches one group of files' chunks at prefetch priority, per layer in blob order with small
/// gaps filled, so that neighbours go in one request; `what` names it in debug logs.
async fn prefetch_group(
    content: Arc<ContentReader>,
    group: Vec<(usize, Vec<ChunkRef>)>,
    what: &'static str,
) {
    let mut per_layer: std::collections::BTreeMap<usize, Vec<ChunkRef>> = Default::default();
    for (layer, chunks) in group {
        per_layer.entry(layer).or_default().extend(chunks);
    }
    for (layer, mut chunks) in per_layer {
        chunks.sort_by_key(crate::fetch::plan::blob_order);
        chunks.dedup();
        let chunks = content.fill_gaps(layer, &chunks, GROUP_GAP);
        let missing = content.missing(layer, &chunks);
        if !missing.is_empty()
            && let Err(e) = content
                .fetch_chunks(layer, &missing, Priority::Prefetch)
                .await
        {
            tracing::debug!("{what}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_need_ordered_prefetch_keeps_more_in_flight_on_a_longer_link() {
        let began = Instant::now() - Duration::from_millis(500);
        let stats = FetchStats::default();
        // No answer yet: the least.
        assert_eq!(in_flight_budget(&stats, began, 0), MIN_IN_FLIGHT);
        // 80 ms round trips, 10 MB in the 0.42 s after the first: about 24 MB/s, so three round
        // trips' worth is about 5.7 MB.
        stats.record_answer(Duration::from_millis(120));
        stats.record_answer(Duration::from_millis(80));
        stats
            .bytes
            .store(10_000_000, std::sync::atomic::Ordering::Relaxed);
        let long = in_flight_budget(&stats, began, 0);
        assert!((5_000_000..6_500_000).contains(&long), "{long}");
        // Bytes from before the prefetch began do not count.
        assert_eq!(in_flight_budget(&stats, began, 9_900_000), MIN_IN_FLIGHT);
        // The same rate over 20 ms round trips: the least.
        let short = FetchStats::default();
        short.record_answer(Duration::from_millis(20));
        short
            .bytes
            .store(12_000_000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(in_flight_budget(&short, began, 0), MIN_IN_FLIGHT);
        // A fast link: capped.
        short
            .bytes
            .store(10_000_000_000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(in_flight_budget(&short, began, 0), MAX_IN_FLIGHT);
    }
}

//! An opened image: its merged tree plus the reader for file contents.
//!
//! Opening resolves nothing by itself: the caller passes a resolved image. Opening then reads
//! every layer's index concurrently (a TOC for eStargz and zstd:chunked, a full stream for
//! index-less layers, whose file data lands in the chunk cache on the way) and builds the merged
//! tree. After that, metadata operations touch memory only and reads go through the
//! [`ContentReader`]. This is the object `ls`, `cat` and the FUSE mount share.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::chunk::{ChunkCache, ChunkKey, ContentError, ContentReader, LayerInfo};
use crate::digest::Digest;
use crate::disk_cache::DiskCache;
use crate::image::ResolvedImage;
use crate::layer::tar_stream::StreamObserver;
use crate::layer::{self, LayerError, LayerFormat};
use crate::oci::Descriptor;
use crate::reference::ManifestSelector;
use crate::source::{ByteStream, FetchedManifest, ImageSource, SourceError};
use crate::stats::FetchStats;
use crate::tree::{Ino, MergedTree, NodeKind};

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
}

impl Default for ImageFsOptions {
    fn default() -> Self {
        ImageFsOptions {
            cache_bytes: 512 << 20,
            disk: None,
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

/// First read-ahead window of a sequential streak, and the largest one.
const MIN_READ_AHEAD: u64 = 1 << 20;
pub const MAX_READ_AHEAD: u64 = 16 << 20;
/// Files tracked for streaks before the table is reset (bounds its memory).
const MAX_STREAKS: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Streak {
    /// Where a sequential reader's next read would start.
    next: u64,
    window: u64,
}

pub struct ImageFs {
    pub image: ResolvedImage,
    pub tree: MergedTree,
    pub layers: Vec<OpenedLayer>,
    content: Arc<ContentReader>,
    /// Sequential-read detection per inode, for read-ahead.
    streaks: std::sync::Mutex<HashMap<Ino, Streak>>,
    cache: Arc<ChunkCache>,
    stats: Arc<FetchStats>,
}

/// Counts requests and bytes of everything fetched through it.
pub struct CountingSource {
    inner: Arc<dyn ImageSource>,
    stats: Arc<FetchStats>,
}

impl CountingSource {
    /// Wraps `source`; the returned counters see every request made through the wrapper.
    pub fn wrap(source: Arc<dyn ImageSource>) -> (Arc<dyn ImageSource>, Arc<FetchStats>) {
        let stats = Arc::new(FetchStats::default());
        let counted = Arc::new(CountingSource {
            inner: source,
            stats: stats.clone(),
        });
        (counted, stats)
    }
}

#[async_trait]
impl ImageSource for CountingSource {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn manifest(&self, selector: &ManifestSelector) -> Result<FetchedManifest, SourceError> {
        self.inner.manifest(selector).await
    }

    async fn blob(&self, descriptor: &Descriptor, limit: u64) -> Result<Bytes, SourceError> {
        self.stats.record_request(&descriptor.digest);
        let data = self.inner.blob(descriptor, limit).await?;
        self.stats
            .record_bytes(&descriptor.digest, data.len() as u64);
        Ok(data)
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        self.stats.record_request(digest);
        let stream = self.inner.blob_range(digest, range).await?;
        let stats = self.stats.clone();
        let digest = digest.clone();
        Ok(Box::pin(stream.inspect(move |piece| {
            if let Ok(bytes) = piece {
                stats.record_bytes(&digest, bytes.len() as u64);
            }
        })))
    }
}

/// Puts the file data of a streamed layer into the caches as it goes past. Writing to the disk
/// tier before the blob is verified is safe: a chunk file is named by its content's digest and
/// is used only where a verified index asks for that digest.
struct CacheFiller {
    cache: Arc<ChunkCache>,
    disk: Option<Arc<DiskCache>>,
    layer: Digest,
}

impl StreamObserver for CacheFiller {
    fn chunk(&self, offset: u64, data: &Bytes, digest: &Digest) {
        if let Some(disk) = &self.disk {
            disk.put(digest, data);
        }
        self.cache.insert(
            ChunkKey {
                layer: self.layer.clone(),
                offset,
                inner: 0,
            },
            data.clone(),
        );
    }
}

impl ImageFs {
    /// Reads every layer's index and builds the merged tree.
    pub async fn open(
        source: Arc<dyn ImageSource>,
        image: ResolvedImage,
        options: &ImageFsOptions,
    ) -> Result<ImageFs, ImageFsError> {
        let (source, stats) = CountingSource::wrap(source);
        ImageFs::open_counted(source, stats, image, options).await
    }

    /// As [`ImageFs::open`], for a source already wrapped by [`CountingSource::wrap`] (so that
    /// the counters also include what the caller fetched before).
    pub async fn open_counted(
        source: Arc<dyn ImageSource>,
        stats: Arc<FetchStats>,
        image: ResolvedImage,
        options: &ImageFsOptions,
    ) -> Result<ImageFs, ImageFsError> {
        let cache = Arc::new(ChunkCache::new(options.cache_bytes));
        let loads = image.layers.iter().map(|layer| {
            let source = source.clone();
            let digest = layer.descriptor.digest.clone();
            let filler = Arc::new(CacheFiller {
                cache: cache.clone(),
                disk: options.disk.clone(),
                layer: digest.clone(),
            });
            let cache = cache.clone();
            let disk = options.disk.clone();
            async move {
                let result = layer::load(source, layer, filler, disk.as_deref()).await;
                if result.is_err() {
                    // Data streamed before a failed verification must not be served.
                    cache.remove_layer(&digest);
                }
                result
            }
        });
        let indexes = futures_util::future::try_join_all(loads).await?;
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
        let tree = MergedTree::build(indexes.into_iter().map(|i| (i.digest, i.entries)))?;
        let infos = image
            .layers
            .iter()
            .zip(&layers)
            .map(|(layer, opened)| LayerInfo {
                descriptor: layer.descriptor.clone(),
                format: opened.format,
            })
            .collect();
        let content = Arc::new(ContentReader::new(
            source,
            cache.clone(),
            options.disk.clone(),
            infos,
            stats.clone(),
        ));
        Ok(ImageFs {
            image,
            tree,
            layers,
            content,
            streaks: std::sync::Mutex::new(HashMap::new()),
            cache,
            stats,
        })
    }

    /// Reads up to `len` bytes at `offset` of a regular file; empty past the end or for
    /// anything that is not a regular file.
    ///
    /// A read that continues where the previous read of the same file ended extends a streak,
    /// and the bytes after it are fetched ahead in the background, in a window that doubles with
    /// the streak (up to [`MAX_READ_AHEAD`]) and collapses on a seek, as mountpoint-s3's
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
        let window = self.streak(ino, offset, len);
        let ahead = offset.saturating_add(len);
        if window > 0 && ahead < *size {
            let (content, layer, chunks, size) =
                (self.content.clone(), *layer, chunks.clone(), *size);
            tokio::spawn(async move {
                // A failure here is not the reader's: the real read will fetch again.
                let _ = content.read(layer, &chunks, size, ahead, window).await;
            });
        }
        self.content.read(*layer, chunks, *size, offset, len).await
    }

    /// Updates the streak of `ino` and returns how far to read ahead (0: not sequential).
    fn streak(&self, ino: Ino, offset: u64, len: u64) -> u64 {
        let mut streaks = self.streaks.lock().unwrap();
        if streaks.len() > MAX_STREAKS {
            streaks.clear();
        }
        let streak = streaks.entry(ino).or_insert(Streak { next: 0, window: 0 });
        streak.window = if offset > 0 && offset == streak.next {
            (streak.window * 2).clamp(MIN_READ_AHEAD, MAX_READ_AHEAD)
        } else {
            0
        };
        streak.next = offset.saturating_add(len);
        streak.window
    }

    pub fn stats(&self) -> &FetchStats {
        &self.stats
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }
}

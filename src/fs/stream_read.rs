//! Reading one file out of index-less layers while they stream: the first byte as soon as it
//! arrives.
//!
//! Opening an image normally indexes every layer before anything can be looked up, and for a
//! layer without an index that means downloading all of it. For a single file that is wasteful
//! when the file sits early in a layer: this module searches the layers from the top down and
//! hands the file's bytes to the caller the moment they have streamed past, while the rest of the
//! layer keeps streaming so that the blob digest can still be checked at the end.
//!
//! Whether a path's fate is decided by a layer can be told from that layer's entries alone only in
//! the simple cases; in every other case this module gives up ([`Outcome::Fallback`]) and the
//! caller builds the full merged tree. Giving up is always correct, only slower. It gives up when:
//! the path or one of its parents is whited out or made opaque, a parent is not a directory
//! (a symlink such as `/bin -> usr/bin` must be resolved against the merged tree), or the entry
//! found is not a regular file (hard links and symlinks point elsewhere).
//!
//! Bytes handed out before the end are not yet verified: the caller must treat an error returned
//! after output as "what was printed cannot be trusted" (`lazylayer cat` exits non-zero).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::layer::tar_stream::{self, StreamObserver};
use crate::layer::{self, EntryKind, LayerEntry, LayerError, normalize_path};
use crate::source::ImageSource;
use crate::source::image::ResolvedImage;

/// How the search ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The whole file was handed out and its layer verified.
    Done,
    /// No layer has the path (and nothing could redirect it).
    NotFound,
    /// The layers' entries alone cannot decide; use the merged tree.
    Fallback,
}

/// What one entry means for the wanted path.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Irrelevant,
    Found(u64),
    Undecidable,
}

fn is_ancestor(dir: &[u8], path: &[u8]) -> bool {
    dir.is_empty() || (path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/')
}

fn classify(target: &[u8], entry: &LayerEntry) -> Verdict {
    let (dir, name) = match entry.path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&entry.path[..i], &entry.path[i + 1..]),
        None => (&b""[..], &entry.path[..]),
    };
    if name == b".wh..wh..opq" {
        return if is_ancestor(dir, target) {
            Verdict::Undecidable
        } else {
            Verdict::Irrelevant
        };
    }
    if let Some(hidden) = name.strip_prefix(b".wh.") {
        let mut whited = dir.to_vec();
        if !whited.is_empty() {
            whited.push(b'/');
        }
        whited.extend_from_slice(hidden);
        return if whited == target || is_ancestor(&whited, target) {
            Verdict::Undecidable
        } else {
            Verdict::Irrelevant
        };
    }
    if entry.path == target {
        return match entry.kind {
            EntryKind::File { size, .. } => Verdict::Found(size),
            _ => Verdict::Undecidable,
        };
    }
    if !entry.path.is_empty()
        && is_ancestor(&entry.path, target)
        && !matches!(entry.kind, EntryKind::Dir)
    {
        return Verdict::Undecidable;
    }
    Verdict::Irrelevant
}

enum Event {
    Found,
    Data(Bytes),
    FileDone,
    Undecidable,
}

/// Watches a streaming layer for the target and forwards its bytes.
struct Watch {
    target: Vec<u8>,
    tx: mpsc::Sender<Event>,
    remaining: std::sync::Mutex<u64>,
    /// Set once the target has been seen: later entries of the same layer cannot hide it
    /// (whiteouts apply to lower layers only).
    found: AtomicBool,
    stop: AtomicBool,
}

impl Watch {
    fn send(&self, event: Event) {
        // The receiver only goes away when the caller has stopped listening.
        if self.tx.blocking_send(event).is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// The next bytes of the file being streamed, while any of it is still wanted.
    fn data(&self, data: Bytes) {
        let mut remaining = self.remaining.lock().unwrap();
        if *remaining == 0 {
            return;
        }
        *remaining -= data.len() as u64;
        let done = *remaining == 0;
        drop(remaining);
        self.send(Event::Data(data));
        if done {
            self.send(Event::FileDone);
        }
    }
}

impl StreamObserver for Watch {
    fn entry(&self, entry: &LayerEntry) {
        if self.found.load(Ordering::Relaxed) {
            return;
        }
        match classify(&self.target, entry) {
            Verdict::Irrelevant => {}
            Verdict::Undecidable => {
                self.send(Event::Undecidable);
                self.stop.store(true, Ordering::Relaxed);
            }
            Verdict::Found(size) => {
                self.found.store(true, Ordering::Relaxed);
                *self.remaining.lock().unwrap() = size;
                self.send(Event::Found);
                if size == 0 {
                    self.send(Event::FileDone);
                }
            }
        }
    }

    fn chunk(&self, _offset: u64, data: &Bytes, _digest: &crate::model::digest::Digest) {
        self.data(data.clone());
    }

    fn hole(&self, len: u64) {
        // Zeros, handed out a piece at a time from one static buffer (a hole can be gigabytes).
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        let mut left = len;
        while left > 0 {
            let piece = left.min(ZEROS.len() as u64);
            self.data(Bytes::from_static(&ZEROS[..piece as usize]));
            left -= piece;
        }
    }

    fn cancelled(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Searches `image`'s layers from the top for `path` and passes its bytes to `out` as they
/// arrive. `out` returns `false` to stop early (a closed pipe); that still counts as done.
pub async fn read_file(
    source: Arc<dyn ImageSource>,
    image: &ResolvedImage,
    path: &[u8],
    mut out: impl FnMut(&[u8]) -> bool,
) -> Result<Outcome, LayerError> {
    let Ok(target) = normalize_path(path) else {
        return Ok(Outcome::Fallback);
    };
    if target.is_empty() {
        return Ok(Outcome::Fallback);
    }
    for layer in image.layers.iter().rev() {
        if layer.lazy_index.is_some() {
            // An indexed layer's TOC is cheap: decide from its entries, read through the tree.
            let index =
                layer::load(source.clone(), layer, Arc::new(tar_stream::Ignore), None).await?;
            match index
                .entries
                .iter()
                .map(|e| classify(&target, e))
                .find(|v| *v != Verdict::Irrelevant)
            {
                None => continue,
                Some(_) => return Ok(Outcome::Fallback),
            }
        }
        let compression = layer
            .compression()
            .map_err(|_| LayerError::UnsupportedMediaType {
                layer: layer.descriptor.digest.clone(),
                media_type: layer.descriptor.media_type.clone(),
            })?;
        let (tx, mut rx) = mpsc::channel(16);
        let watch = Arc::new(Watch {
            target: target.clone(),
            tx,
            remaining: std::sync::Mutex::new(0),
            found: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let (task_source, task_layer) = (source.clone(), layer.clone());
        let task = tokio::spawn(async move {
            tar_stream::index(task_source, &task_layer, compression, watch).await
        });
        let mut found = false;
        let mut writing = true;
        while let Some(event) = rx.recv().await {
            match event {
                Event::Undecidable => {
                    task.abort();
                    return Ok(Outcome::Fallback);
                }
                Event::Found => found = true,
                Event::Data(data) => {
                    if writing {
                        writing = out(&data);
                    }
                }
                Event::FileDone => break,
            }
        }
        drop(rx);
        // Whether or not the file was here, the layer's verdict (digest) decides.
        let result = task
            .await
            .map_err(|e| LayerError::malformed(&layer.descriptor.digest, e.to_string()))?;
        match result {
            Ok(_) if found => return Ok(Outcome::Done),
            Ok(_) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Outcome::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Meta;

    fn entry(path: &str, kind: EntryKind) -> LayerEntry {
        LayerEntry {
            path: path.as_bytes().to_vec(),
            kind,
            meta: Meta::default(),
        }
    }

    fn file(path: &str) -> LayerEntry {
        entry(
            path,
            EntryKind::File {
                size: 3,
                chunks: Arc::from(vec![]),
            },
        )
    }

    #[test]
    fn verdicts() {
        let t = b"usr/lib/os-release";
        assert_eq!(classify(t, &file("usr/lib/os-release")), Verdict::Found(3));
        assert_eq!(
            classify(t, &file("usr/lib/os-release2")),
            Verdict::Irrelevant
        );
        assert_eq!(
            classify(t, &entry("usr", EntryKind::Dir)),
            Verdict::Irrelevant
        );
        assert_eq!(classify(t, &file("usr/lib")), Verdict::Undecidable);
        let link = EntryKind::Symlink {
            target: b"x".to_vec(),
        };
        assert_eq!(
            classify(t, &entry("usr", link.clone())),
            Verdict::Undecidable
        );
        assert_eq!(
            classify(t, &entry("usr/lib/os-release", link)),
            Verdict::Undecidable
        );
        assert_eq!(classify(t, &file("usr/.wh.lib")), Verdict::Undecidable);
        assert_eq!(
            classify(t, &file("usr/lib/.wh.os-release")),
            Verdict::Undecidable
        );
        assert_eq!(classify(t, &file("usr/lib/.wh.other")), Verdict::Irrelevant);
        assert_eq!(classify(t, &file("usr/.wh..wh..opq")), Verdict::Undecidable);
        assert_eq!(classify(t, &file(".wh..wh..opq")), Verdict::Undecidable);
        assert_eq!(classify(t, &file("etc/.wh..wh..opq")), Verdict::Irrelevant);
        assert_eq!(
            classify(t, &file("usr/libx/.wh..wh..opq")),
            Verdict::Irrelevant
        );
    }
}

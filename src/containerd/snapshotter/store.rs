//! The snapshotter's metadata: every snapshot's kind, parent, labels and storage, in one JSON file.
//!
//! containerd keeps its own record of snapshots (per namespace, in its bolt database) and asks
//! the backend by backend key; this file is the backend's side. It is small (one entry per layer
//! and container) and changes a few times per container start, so the whole map is rewritten on
//! every change, to a temporary file renamed over the old one: a crash leaves the old or the new
//! state, never a torn one. Directories on disk are named by a numeric id, never by the key
//! (keys contain `/` and arbitrary text from clients).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::digest::Digest;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// Where a remote (lazily mounted) layer's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// Image reference as the client gave it (registry, repository, tag or digest).
    pub image: String,
    /// The manifest the layer was pulled with, when the client said (pins a tag).
    pub manifest: Option<Digest>,
    /// Compressed digest of the layer blob.
    pub layer: Digest,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory, `snapshots/ID`.
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    pub created: i64,
    pub updated: i64,
    /// Set for a committed layer served lazily; its directory is then a FUSE mount point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayer>,
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    next_id: u64,
    snapshots: BTreeMap<String, Record>,
}

pub struct Store {
    file: PathBuf,
    state: State,
}

pub fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

impl Store {
    /// Loads `root/metadata.json`, or starts empty when there is none.
    pub fn open(root: &Path) -> io::Result<Store> {
        let file = root.join("metadata.json");
        let state = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: {e} (move it away to start with no snapshots)",
                        file.display()
                    ),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e),
        };
        Ok(Store { file, state })
    }

    fn save(&self) -> io::Result<()> {
        let tmp = self.file.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.file)
    }

    pub fn get(&self, key: &str) -> Option<&Record> {
        self.state.snapshots.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.state.snapshots.iter()
    }

    pub fn has_children(&self, key: &str) -> bool {
        self.state
            .snapshots
            .values()
            .any(|r| r.parent.as_deref() == Some(key))
    }

    pub fn next_id(&mut self) -> u64 {
        self.state.next_id += 1;
        self.state.next_id
    }

    /// Inserts or replaces `key`'s record and persists the change.
    pub fn put(&mut self, key: String, record: Record) -> io::Result<()> {
        let old = self.state.snapshots.insert(key.clone(), record);
        self.save().inspect_err(|_| {
            match old {
                Some(old) => self.state.snapshots.insert(key.clone(), old),
                None => self.state.snapshots.remove(&key),
            };
        })
    }

    /// Removes `key` (and adds `new`, for a commit) in one persisted change.
    pub fn replace(&mut self, key: &str, new: Option<(String, Record)>) -> io::Result<Record> {
        let old = self
            .state
            .snapshots
            .remove(key)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if let Some((name, record)) = &new {
            self.state.snapshots.insert(name.clone(), record.clone());
        }
        self.save().inspect_err(|_| {
            if let Some((name, _)) = &new {
                self.state.snapshots.remove(name);
            }
            self.state.snapshots.insert(key.to_string(), old.clone());
        })?;
        Ok(old)
    }

    /// The chain from `key` down to its base layer, `key` first.
    pub fn chain(&self, key: &str) -> Vec<(&String, &Record)> {
        let mut chain = Vec::new();
        let mut next = self.state.snapshots.get_key_value(key);
        while let Some((name, record)) = next {
            chain.push((name, record));
            next = record
                .parent
                .as_deref()
                .and_then(|p| self.state.snapshots.get_key_value(p));
        }
        chain
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.state.snapshots.values().map(|r| r.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, parent: Option<&str>) -> Record {
        Record {
            id,
            kind: Kind::Committed,
            parent: parent.map(str::to_string),
            labels: BTreeMap::new(),
            created: 1,
            updated: 1,
            remote: None,
        }
    }

    #[test]
    fn changes_survive_reopening_and_chains_walk_to_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.put("base".into(), record(1, None)).unwrap();
        store.put("mid".into(), record(2, Some("base"))).unwrap();
        store.put("active".into(), record(3, Some("mid"))).unwrap();
        let moved = store
            .replace("active", Some(("top".into(), record(3, Some("mid")))))
            .unwrap();
        assert_eq!(moved.id, 3);
        let store = Store::open(dir.path()).unwrap();
        assert!(store.get("active").is_none());
        let chain: Vec<&str> = store.chain("top").iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(chain, ["top", "mid", "base"]);
        assert!(store.has_children("base"));
        assert!(!store.has_children("top"));
    }

    #[test]
    fn a_corrupt_metadata_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metadata.json"), b"{not json").unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("metadata.json"), "{err}");
    }
}

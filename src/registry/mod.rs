//! The store's catalogue: which models exist, what each is made of, and what it depends on.
//!
//! FastChat's model_registry.py keeps `ModelInfo` (simple name, link, description) for a fixed
//! list of models; llmfs's registry also records *how* to produce each entry's files: a base is a
//! directory of Hugging Face files (referenced in place, or copied into the store), a variant names
//! its base and a recipe (a dtype cast, a quantized container, a delta).
//!
//! The catalogue is plain data (this file: entries, records, the dependency graph in
//! `graph.rs`); `store.rs` keeps it and the entries' files in a store.

pub mod add;
pub mod fingerprint;
pub mod gc;
pub mod graph;
pub mod known_models;
pub mod recipe;
mod store;
pub mod walk;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::Objects;

use crate::format::{Dtype, FileHeaderError};
pub use crate::store::{set_upload_progress, upload_prefix, StagingDir, REMOTE_POLL};
pub use fingerprint::Fingerprint;
use recipe::{DeltaCodec, ImportFormat, QuantConfig};
pub use store::{now_secs, Store, StoreLock, REGISTRY_KEY};

/// FastChat's `ModelInfo` (model_registry.py): what a person sees when choosing a model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub simple_name: String,
    pub link: String,
    pub description: String,
}

/// One registered model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub kind: EntryKind,
    pub info: ModelInfo,
    /// Model family: llmfs's short name of the FastChat model adapter (`vicuna` for
    /// VicunaAdapter; `adapter::adapter_of_family` gives the class), and the FastChat
    /// conversation template name.
    pub family: String,
    pub template: String,
    /// Template whose Jinja form the mount puts into tokenizer_config.json, if any.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Seconds since the epoch; also the mtime of the entry's files in the mount.
    pub created: u64,
    /// Unique per registration (nanoseconds at creation): the mount's inode numbers follow it, so
    /// a name removed and registered again within one second never shows the old entry's pages.
    /// Registries written before it existed read as 0, and `created` stands in.
    #[serde(default)]
    pub generation: u64,
}

impl Entry {
    /// What identifies this registration of the name.
    pub fn generation(&self) -> u64 {
        if self.generation != 0 {
            self.generation
        } else {
            self.created
        }
    }
}

/// A fresh generation for a new entry.
pub fn new_generation() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryKind {
    /// A Hugging Face model directory: `dir` is either the user's (in place) or a copy in the store.
    Base { dir: PathBuf, copied: bool, files: Vec<FileRecord> },
    /// Every floating tensor of `base` converted to `dtype`.
    Cast { base: String, dtype: Dtype },
    /// The linear weights of `base` stored group-wise quantized in containers under
    /// `STORE/models/NAME/` (one per base weight file, same name), dequantized on read.
    Quantized {
        base: String,
        config: QuantConfig,
        files: Vec<FileRecord>,
        /// Relative error ‖x'−x‖/‖x‖ of each quantized tensor, measured when it was made.
        errors: BTreeMap<String, f64>,
    },
    /// A fine-tune of `base`: one container per target file under `STORE/models/NAME/`.
    Delta { base: String, codec: DeltaCodec, files: Vec<FileRecord> },
    /// A delta made by another tool (FastChat's make_delta, a PEFT LoRA adapter), copied into
    /// `STORE/models/NAME/` and applied on read.
    Imported { base: String, format: ImportFormat, files: Vec<FileRecord> },
    /// Several entries merged by one of mergekit's methods (`llmfs merge`), computed on read.
    /// `config` is the parsed mergekit configuration (as `merge::MergeConfig` serializes it; the
    /// registry keeps it as plain JSON), `source` what the user gave (the YAML, or the short
    /// form's arguments), `parents` every entry it names, base first. `files`: the whole-tensor
    /// statistics `llmfs merge` computed, one file under `STORE/models/NAME/`
    /// (`merge::stats_file`); empty for a merge that needs none, and for entries made before
    /// merges stored them (their reads compute them).
    Merge {
        parents: Vec<String>,
        config: serde_json::Value,
        source: String,
        seed: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<FileRecord>,
    },
}

impl EntryKind {
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::Base { .. } => "base",
            EntryKind::Cast { .. } => "cast",
            EntryKind::Quantized { .. } => "quantized",
            EntryKind::Delta { .. } => "delta",
            EntryKind::Imported { format: ImportFormat::Fastchat, .. } => "fastchat-delta",
            EntryKind::Imported { format: ImportFormat::Lora, .. } => "lora",
            EntryKind::Merge { .. } => "merge",
        }
    }
    pub fn files_mut(&mut self) -> &mut [FileRecord] {
        match self {
            EntryKind::Base { files, .. }
            | EntryKind::Quantized { files, .. }
            | EntryKind::Delta { files, .. }
            | EntryKind::Imported { files, .. }
            | EntryKind::Merge { files, .. } => files,
            EntryKind::Cast { .. } => &mut [],
        }
    }
    /// The files the entry records (none for a cast).
    pub fn files(&self) -> &[FileRecord] {
        match self {
            EntryKind::Base { files, .. }
            | EntryKind::Quantized { files, .. }
            | EntryKind::Delta { files, .. }
            | EntryKind::Imported { files, .. }
            | EntryKind::Merge { files, .. } => files,
            EntryKind::Cast { .. } => &[],
        }
    }
    /// The entry this one is derived from (a merge: its first parent, the base if it has one).
    pub fn base(&self) -> Option<&str> {
        match self {
            EntryKind::Base { .. } => None,
            EntryKind::Merge { parents, .. } => parents.first().map(String::as_str),
            EntryKind::Cast { base, .. }
            | EntryKind::Quantized { base, .. }
            | EntryKind::Delta { base, .. }
            | EntryKind::Imported { base, .. } => Some(base),
        }
    }
}

/// A file of a base directory, as it was when added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub role: FileRole,
    pub fingerprint: Fingerprint,
    /// Where the bytes are in an object store: a key of the registry's store (a file the entry
    /// owns, never rewritten: a new version gets a new key), or `s3://BUCKET/KEY` (a base added
    /// in place). None: a local file, under the entry's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

impl FileRecord {
    /// The record names `meta`'s object (an upload of the file), fingerprinted by its etag.
    pub fn name_object(&mut self, meta: &crate::store::ObjectMeta) {
        self.object = Some(meta.key.clone());
        self.fingerprint = Fingerprint::of_object(meta.size, &meta.etag);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    /// A `*.safetensors` file.
    Weights,
    /// `model.safetensors.index.json`.
    Index,
    /// Anything else: config, tokenizer, README …
    Other,
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The whole catalogue.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    pub version: u32,
    pub entries: BTreeMap<String, Entry>,
    /// Files of entries written through `MOUNT/<base>/deltas/` that were opened for writing and
    /// are not stored as written (a daemon killed mid-copy leaves them): such an entry is
    /// incomplete until each is written and closed, or removed. See [`Registry::unfinished`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unfinished: BTreeMap<String, Unfinished>,
    /// The store this catalogue was loaded from (not serialized): its local directory…
    #[serde(skip)]
    pub store_root: PathBuf,
    /// …and, for an object store, how its files' bytes are read.
    #[serde(skip)]
    pub objects: Option<Objects>,
    /// The etag of `registry.json` this was loaded at (None: there was none): what
    /// [`Store::save`] commits against.
    #[serde(skip)]
    pub loaded_etag: Option<String>,
}

/// The unfinished files of one registration of an entry (`generation`: a list left by an entry
/// that was removed is not inherited by a new one of the same name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unfinished {
    pub generation: u64,
    pub files: BTreeSet<String>,
}

impl Registry {
    /// Files of entry `name` that were being written and are not stored as written: empty for a
    /// complete entry.
    pub fn unfinished(&self, name: &str) -> Vec<&str> {
        match (self.entries.get(name), self.unfinished.get(name)) {
            (Some(e), Some(u)) if u.generation == e.generation() => {
                u.files.iter().map(|f| f.as_str()).collect()
            }
            _ => vec![],
        }
    }

    /// Note that `file` of entry `name` (which must exist) is being written.
    pub fn mark_unfinished(&mut self, name: &str, file: &str) {
        self.prune_unfinished();
        let Some(generation) = self.entries.get(name).map(|e| e.generation()) else { return };
        let u = self.unfinished.entry(name.to_owned()).or_default();
        if u.generation != generation {
            *u = Unfinished { generation, files: BTreeSet::new() };
        }
        u.files.insert(file.to_owned());
    }

    /// `file` of entry `name` is stored as written, or gone: no longer unfinished.
    pub fn clear_unfinished(&mut self, name: &str, file: &str) -> bool {
        let removed = self.unfinished.get_mut(name).is_some_and(|u| u.files.remove(file));
        self.prune_unfinished();
        removed
    }

    /// Drop lists of entries that are gone or registered anew, and empty ones.
    fn prune_unfinished(&mut self) {
        let entries = &self.entries;
        self.unfinished.retain(|n, u| {
            !u.files.is_empty() && entries.get(n).is_some_and(|e| e.generation() == u.generation)
        });
    }

    /// Where entry `name` keeps the files it owns (containers, copies).
    pub fn entry_dir(&self, name: &str) -> PathBuf {
        self.store_root.join("models").join(name)
    }

    pub fn get(&self, name: &str) -> Result<&Entry, Error> {
        self.entries.get(name).ok_or_else(|| Error::NotFound(name.to_owned()))
    }

    /// The chain from `name` down to its base directory: `[name, its base, …, the base entry]`.
    /// Refuses a missing link or a cycle (which a hand-edited registry could contain).
    pub fn chain(&self, name: &str) -> Result<Vec<&str>, Error> {
        let mut chain: Vec<&str> = vec![];
        let mut current = name;
        loop {
            let (key, entry) = self.entries.get_key_value(current).ok_or_else(|| match chain.last() {
                None => Error::NotFound(current.to_owned()),
                Some(child) => Error::MissingBase { entry: child.to_string(), base: current.to_owned() },
            })?;
            if chain.contains(&key.as_str()) {
                return Err(Error::Cycle(name.to_owned()));
            }
            chain.push(key.as_str());
            match entry.kind.base() {
                Some(base) => current = base,
                None => return Ok(chain),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid name {0:?}: use letters, digits, '.', '_' and '-', not starting with '.'")]
    InvalidName(String),
    #[error("invalid file path {0:?}: components must not be empty, '.' or '..'")]
    InvalidFilePath(String),
    #[error("no entry named {0:?} (see `llmfs ls`)")]
    NotFound(String),
    #[error("an entry named {0:?} already exists")]
    Exists(String),
    #[error("{name:?} is a parent of {dependents}; remove those first")]
    HasDependents { name: String, dependents: String },
    #[error("entry {entry:?} names parent {base:?}, which does not exist")]
    MissingBase { entry: String, base: String },
    #[error("entry {0:?} is part of a cycle of parents")]
    Cycle(String),
    #[error("{}: the registry is corrupt: {reason} (restore it or move it away)", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    NotAModel { path: PathBuf, reason: String },
    #[error(transparent)]
    Header(#[from] FileHeaderError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Another process committed the registry between this one's load and save (object stores:
    /// [`Store::update`] retries that by itself; [`Store::save`] leaves it to the caller).
    #[error("the registry changed meanwhile (another node wrote it); try again")]
    Conflict,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to an I/O error.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

/// Names become directory names: `[A-Za-z0-9._-]+`, no leading dot (so no `.` or `..`), ≤ 255 bytes.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_owned()))
    }
}

/// A file of an entry is named by its path relative to the entry's directory: components joined
/// by `/`, each any name the local filesystem allows (dotfiles, spaces, non-ASCII) except empty,
/// `.` and `..`, none holding NUL, none over 255 bytes; no leading or trailing `/`. So
/// `1_Pooling/config.json` and `.gitattributes` are file names, and no name leaves the entry.
pub fn validate_file_path(path: &str) -> Result<()> {
    let ok = !path.is_empty()
        && path.len() <= 4096
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255 && !c.contains('\0'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidFilePath(path.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn names_are_validated() {
        for good in ["llama-2-7b", "a", "Qwen1.5_0.5B", "x.y-z_1"] {
            validate_name(good).unwrap();
            validate_file_path(good).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "é", &"x".repeat(256)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["1_Pooling/config.json", ".gitattributes", "a b+é.txt", "x/.y/z", "..a"] {
            validate_file_path(good).unwrap();
        }
        for bad in ["", ".", "..", "/a", "a/", "a//b", "a/../b", "../x", "a/./b", "a\0b", &"x".repeat(256)] {
            assert!(validate_file_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn corrupt_registry_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(store.registry_path(), b"{\"version\": 1, \"entries\": {").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("registry.json") && err.contains("corrupt"), "{err}");
    }

    #[test]
    fn chain_refuses_cycles_and_missing_bases() {
        let entry = |kind| Entry {
            kind,
            info: ModelInfo::default(),
            family: "x".into(),
            template: "one_shot".into(),
            chat_template: None,
            created: 0,
            generation: 0,
        };
        let mut r = Registry::default();
        r.entries.insert("a".into(), entry(EntryKind::Cast { base: "b".into(), dtype: Dtype::F16 }));
        r.entries.insert("b".into(), entry(EntryKind::Cast { base: "a".into(), dtype: Dtype::F16 }));
        r.entries.insert("c".into(), entry(EntryKind::Cast { base: "zz".into(), dtype: Dtype::F16 }));
        assert!(matches!(r.chain("a"), Err(Error::Cycle(_))));
        assert!(matches!(r.chain("c"), Err(Error::MissingBase { .. })));
        r.entries
            .insert("zz".into(), entry(EntryKind::Base { dir: "/x".into(), copied: false, files: vec![] }));
        assert_eq!(r.chain("c").unwrap(), vec!["c", "zz"]);
    }

    #[test]
    fn unfinished_files_follow_the_registration_and_survive_a_save() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entry = Entry {
            kind: EntryKind::Base { dir: "/x".into(), copied: false, files: vec![] },
            info: ModelInfo::default(),
            family: "x".into(),
            template: "one_shot".into(),
            chat_template: None,
            created: 1,
            generation: 7,
        };
        store
            .update(|r| {
                r.entries.insert("a".into(), entry.clone());
                r.mark_unfinished("a", "sub/model.safetensors");
                r.mark_unfinished("gone", "x");
                Ok(())
            })
            .unwrap();
        let r = store.load().unwrap();
        assert_eq!(r.unfinished("a"), ["sub/model.safetensors"]);
        assert!(r.unfinished("gone").is_empty());
        // A new registration of the name does not inherit the list.
        store
            .update(|r| {
                r.entries.insert("a".into(), Entry { generation: 8, ..entry.clone() });
                Ok(())
            })
            .unwrap();
        assert!(store.load().unwrap().unfinished("a").is_empty());
        let mut r = store.load().unwrap();
        r.entries.insert("a".into(), entry.clone());
        assert!(!r.clear_unfinished("a", "sub/model.safetensors") || r.unfinished("a").is_empty());
    }

    #[test]
    fn commits_replace_the_registry_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for v in [2, 3] {
            store
                .update(|r| {
                    r.version = v;
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(store.load().unwrap().version, 3);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["lock", "models", "registry.json", "tmp"]);
    }

    #[test]
    fn open_sweeps_temporaries_of_dead_processes_only() {
        let dir = tempfile::tempdir().unwrap();
        // pid 0 never names a user process; our own pid is alive.
        let dead = dir.path().join(".registry.json.0.77.tmp");
        let dead_put = dir.path().join(".llmfs-tmp.0.3.1f");
        let live = dir.path().join(format!(".registry.json.{}.78.tmp", std::process::id()));
        let other = dir.path().join(".notes.tmp");
        for p in [&dead, &live, &other] {
            fs::write(p, b"x").unwrap();
        }
        Store::open(dir.path()).unwrap();
        assert!(!dead.exists() && !dead_put.exists(), "a dead process's temporary survived");
        assert!(
            live.exists() && other.exists(),
            "a live process's temporary or an unrelated file was removed"
        );
    }
}

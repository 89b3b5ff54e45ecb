//! The catalogue over [`crate::store::Node`], the same code for both kinds of store: a local
//! directory (the embedded default) or an object store plus a local directory of this node's
//! own. The store's layout and the steps that differ by backend are `store::node`'s.
//!
//! The registry is one JSON object, `registry.json`, committed conditionally on the etag it was
//! loaded at, under this node's write lock: a crash leaves the old or the new catalogue, never
//! half of one, and two nodes of an object store never lose each other's changes. The daemon
//! only reads, and reloads when [`Store::registry_stamp`] changes, so entries added while
//! mounted appear without remounting.

use std::path::{Path, PathBuf};

use super::{validate_file_path, validate_name};
use super::{Entry, EntryKind, Error, Registry, Result};
use crate::store::{Node, Objects, Staged, StagingDir, WriteLock};

/// A store: its objects and this node's directory, and how this process reads the objects'
/// bytes.
#[derive(Clone, Debug)]
pub struct Store {
    node: Node,
    /// How this process reads the object store's files (the mount puts its disk cache here).
    objects: Option<Objects>,
}

/// The registry's key.
pub const REGISTRY_KEY: &str = "registry.json";

/// Held while a command changes the catalogue; released on drop.
pub type StoreLock = WriteLock;

impl Store {
    /// `--store DIR`, else `$LLMFS_STORE`, else `~/.local/share/llmfs`.
    pub fn default_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("LLMFS_STORE") {
            return dir.into();
        }
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/".into()).join(".local/share/llmfs")
    }

    /// `s3://BUCKET[/PREFIX]` (credentials and endpoint from the AWS environment; this node's
    /// directory `$LLMFS_NODE_DIR`, else `~/.cache/llmfs/s3/BUCKET[/PREFIX]`) or a directory.
    pub fn open_location(location: &Path) -> Result<Store> {
        let node = Node::open(location)?;
        let objects = node.fetcher().map(|f| Objects(std::sync::Arc::new(f)));
        Ok(Store { node, objects })
    }

    /// Opens (creating if needed, mode 0700) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root: PathBuf = root.into();
        Store::open_location(&root)
    }

    /// What `--store` names: the directory or `s3://BUCKET[/PREFIX]`.
    pub fn location(&self) -> String {
        self.node.location()
    }

    /// The store with this node's directory and the steps that differ by backend.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Reads this process's object-store files through `objects` (the mount's disk cache).
    pub fn with_objects(mut self, objects: Objects) -> Store {
        self.objects = Some(objects);
        self
    }

    /// How this process reads the store's objects (None: a local store's files are read where
    /// they are).
    pub fn objects(&self) -> Option<&Objects> {
        self.objects.as_ref()
    }

    /// The store's directory (of an object store: this node's directory).
    pub fn root(&self) -> &Path {
        self.node.dir()
    }
    pub fn registry_path(&self) -> PathBuf {
        self.root().join(REGISTRY_KEY)
    }
    pub fn log_path(&self) -> PathBuf {
        self.root().join("llmfs.log")
    }
    /// Where entry `name` keeps the files it owns (local stores).
    pub fn entry_dir(&self, name: &str) -> PathBuf {
        self.node.entry_dir(name)
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.node.tmp_dir()
    }

    /// Something that changes whenever the registry is committed, for a daemon to notice other
    /// processes' changes cheaply (see [`Node::stamp`]: no FUSE request waits on the network).
    pub fn registry_stamp(&self) -> Option<String> {
        self.node.stamp(REGISTRY_KEY)
    }

    /// The catalogue as it is now (empty if the store is new).
    pub fn load(&self) -> Result<Registry> {
        let object = self.node.read(REGISTRY_KEY)?;
        let mut registry = self.parse(object.as_ref().map(|o| &o.bytes[..]))?;
        registry.loaded_etag = object.map(|o| o.etag);
        Ok(registry)
    }

    /// The registry in `bytes` (None: a new, empty one), checked.
    fn parse(&self, bytes: Option<&[u8]>) -> Result<Registry> {
        let path = PathBuf::from(self.node.key_location(REGISTRY_KEY));
        let Some(bytes) = bytes else {
            return Ok(Registry {
                version: 1,
                store_root: self.root().to_owned(),
                objects: self.objects.clone(),
                ..Default::default()
            });
        };
        let mut registry: Registry = serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt { path: path.clone(), reason: e.to_string() })?;
        registry.store_root = self.root().to_owned();
        registry.objects = self.objects.clone();
        let corrupt = |reason: String| Error::Corrupt { path: path.clone(), reason };
        for (name, entry) in &registry.entries {
            validate_name(name).map_err(|_| corrupt(format!("bad entry name {name:?}")))?;
            // File names become paths under the entry's directory: none may leave it.
            let files = entry.kind.files();
            if let Some(f) = files.iter().find(|f| validate_file_path(&f.name).is_err()) {
                return Err(corrupt(format!("entry {name:?} names file {:?}", f.name)));
            }
            let unfinished = registry.unfinished.get(name).map(|u| &u.files);
            if let Some(f) = unfinished.into_iter().flatten().find(|f| validate_file_path(f).is_err()) {
                return Err(corrupt(format!("entry {name:?} names unfinished file {f:?}")));
            }
            if let EntryKind::Quantized { config, .. } = &entry.kind {
                if !matches!(config.bits, 4 | 8) || config.group_size == 0 {
                    return Err(corrupt(format!(
                        "entry {name:?} has an invalid quantization config {config:?}"
                    )));
                }
            }
        }
        Ok(registry)
    }

    /// Serializes this node's changes to the catalogue (an object store's other nodes are kept
    /// apart by the conditional write in [`Store::save`]).
    pub fn lock(&self) -> Result<StoreLock> {
        Ok(self.node.write_lock()?)
    }

    /// Commits the catalogue, conditional on it being as `registry` was loaded. Callers hold the
    /// lock. [`Error::Conflict`] if another node committed since (load again and redo the
    /// change).
    pub fn save(&self, registry: &Registry, lock: &StoreLock) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(registry).expect("the registry always serializes");
        use crate::store::StoreError;
        match self.node.commit(lock, REGISTRY_KEY, bytes, registry.loaded_etag.as_deref()) {
            Ok(_) => Ok(()),
            Err(StoreError::Precondition { .. } | StoreError::AlreadyExists { .. }) => Err(Error::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// Load, change, save, atomically: the one way commands modify the catalogue. `f` may run
    /// more than once (in an object store, again on the newer catalogue whenever another node
    /// committed first), so it must only change `registry`.
    pub fn update<T>(&self, mut f: impl FnMut(&mut Registry) -> Result<T>) -> Result<T> {
        let mut out = None;
        self.node.update(REGISTRY_KEY, |old| {
            let mut registry = self.parse(old)?;
            out = Some(f(&mut registry)?);
            Ok::<_, Error>(serde_json::to_vec_pretty(&registry).expect("the registry always serializes"))
        })?;
        Ok(out.expect("the closure ran"))
    }

    /// Register a new entry whose files (if any) are `staged`: one atomic registry update,
    /// refused if the name was taken or a parent removed meanwhile; the staged files are put in
    /// place in that update (see [`Staged::place`]) and their records name the objects uploaded
    /// for them. Returns the entry as registered.
    pub fn insert_entry(&self, name: &str, entry: &Entry, staged: Option<Staged>) -> Result<Entry> {
        let mut entry = entry.clone();
        if let Some(staged) = &staged {
            for record in entry.kind.files_mut() {
                if let Some(meta) = staged.object(&record.name) {
                    record.name_object(meta);
                }
            }
        }
        let mut staged = staged;
        let result = self.update(|registry| {
            if registry.entries.contains_key(name) {
                return Err(Error::Exists(name.to_owned()));
            }
            // The entry was made from the catalogue as it was loaded; a parent removed since
            // (another command, another node) refuses it rather than registering an orphan.
            for parent in entry.kind.parents() {
                registry.get(parent)?;
            }
            if let Some(staged) = staged.as_mut() {
                staged.place()?;
            }
            registry.entries.insert(name.to_owned(), entry.clone());
            Ok(())
        });
        if let Err(e) = result {
            if let Some(staged) = staged {
                staged.discard();
            }
            return Err(e);
        }
        Ok(entry)
    }

    /// [`Store::insert_entry`] with the files its records name in `staging` (a command wrote
    /// them there): uploaded first on an object store, moved in by the registry update locally.
    pub fn insert_staged(&self, name: &str, entry: &Entry, staging: StagingDir) -> Result<Entry> {
        let files = entry.kind.files();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        let staged = self.node.stage_dir(name, staging, &names)?;
        self.insert_entry(name, entry, Some(staged))
    }

    /// Deletes objects of the store (best effort: what fails is left for `llmfs gc`).
    pub fn delete_objects<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        self.node.delete_objects(keys)
    }

    /// Removes what entry `entry` (just removed from the registry) owned: its directory and
    /// the objects its records name (not a base added in place: those are the user's).
    pub fn remove_owned(&self, name: &str, entry: &Entry) {
        if !matches!(entry.kind, EntryKind::Base { copied: false, .. }) {
            let files = entry.kind.files();
            self.node.remove_entry_files(name, files.iter().filter_map(|f| f.object.as_deref()));
        }
    }

    /// A fresh private staging directory under `tmp/`, removed on drop unless kept.
    pub fn staging_dir(&self, label: &str) -> Result<StagingDir> {
        Ok(self.node.staging_dir(label)?)
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

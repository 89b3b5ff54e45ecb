//! Where the catalogue and the entries' files live, for both kinds of store: a local directory
//! (the embedded default) or an object store plus a local directory of this node's own.
//!
//! The registry is one JSON file, `registry.json`, replaced atomically (write a temporary file,
//! fsync, rename, fsync the directory): a crash leaves the old or the new catalogue, never half of
//! one. Writers serialize on an exclusive `flock` of `lock`; the daemon only reads, and reloads
//! when the file's mtime changes, so entries added while mounted appear without remounting.
//!
//! Store layout:
//! ```text
//! STORE/registry.json   the catalogue
//! STORE/lock            flock'ed by every command that changes the catalogue
//! STORE/models/NAME/    files owned by entry NAME (copies made by `add --copy`, containers)
//! STORE/tmp/            staging; anything here is garbage after a crash and is swept
//! STORE/llmfs.log       the daemon's log
//! ```
//!
//! On an object store `registry.json` is the key of that name, changed by a conditional write
//! (`store::update_object`), and an entry's files are objects under `models/NAME/UPLOAD-ID/`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{fingerprint, io_err, new_generation, validate_file_path, validate_name};
use super::{Entry, EntryKind, Error, FileRecord, Fingerprint, Registry, Result};
use crate::store::Objects;

/// A store: a local directory (the embedded default), or an object store with a local
/// directory of this node's own (staging, the daemon's log, its disk cache).
#[derive(Clone, Debug)]
pub struct Store {
    /// The store's directory, or this node's directory of an object store.
    root: PathBuf,
    /// The object store holding the registry and the entries' files.
    remote: Option<Arc<crate::store::Store>>,
    /// How this process reads the object store's files (the mount puts its disk cache here).
    objects: Option<Objects>,
    /// What [`Store::registry_stamp`] answers for an object store.
    polled: Arc<std::sync::Mutex<Polled>>,
}

/// The registry's etag in an object store as last seen (None: no registry yet), and whether a
/// poller keeps it fresh.
#[derive(Debug, Default)]
struct Polled {
    stamp: Option<String>,
    polling: bool,
}

/// The registry's etag now (None: there is none).
fn head_stamp(remote: &crate::store::Store) -> std::result::Result<Option<String>, crate::store::StoreError> {
    match remote.head(REGISTRY_KEY) {
        Ok(m) => Ok(Some(m.etag)),
        Err(crate::store::StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How often a daemon asks an object store whether the registry changed: entries added or
/// removed by another node show within this (plus the kernel's 1 s entry timeout).
pub const REMOTE_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// The registry's key in an object store.
pub const REGISTRY_KEY: &str = "registry.json";

/// Held while a command changes the catalogue; released on drop (flock goes with the fd).
pub struct StoreLock {
    _file: File,
}

impl Store {
    /// `--store DIR`, else `$LLMFS_STORE`, else `~/.local/share/llmfs`.
    pub fn default_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("LLMFS_STORE") {
            return dir.into();
        }
        home().join(".local/share/llmfs")
    }

    /// `s3://BUCKET[/PREFIX]` (credentials and endpoint from the AWS environment; this node's
    /// directory `$LLMFS_NODE_DIR`, else `~/.cache/llmfs/s3/BUCKET[/PREFIX]`) or a directory.
    pub fn open_location(location: &Path) -> Result<Store> {
        let Some(url) = location.to_str().filter(|l| l.starts_with("s3://")) else {
            return Store::open(location);
        };
        let remote = Arc::new(crate::store::Store::open(url)?);
        let node = match std::env::var_os("LLMFS_NODE_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let (bucket, prefix) = crate::store::S3Config::parse_url(url)?;
                home().join(".cache/llmfs/s3").join(bucket).join(prefix)
            }
        };
        let mut store = Store::open(node)?;
        store.objects = Some(Objects(Arc::new(crate::store::Fetched::new(remote.clone(), store.tmp_dir()))));
        store.remote = Some(remote);
        Ok(store)
    }

    /// Opens (creating if needed, mode 0700) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root: PathBuf = root.into();
        for dir in [root.clone(), root.join("models"), root.join("tmp")] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err(&dir))?;
        }
        let root = root.canonicalize().map_err(io_err(&root))?;
        remove_dead_tmp_files(&root);
        Ok(Store { root, remote: None, objects: None, polled: Arc::default() })
    }

    /// What `--store` names: the directory or `s3://BUCKET[/PREFIX]`.
    pub fn location(&self) -> String {
        match &self.remote {
            Some(r) => r.location(),
            None => self.root.display().to_string(),
        }
    }

    /// The object store, if the store is one.
    pub fn remote(&self) -> Option<&Arc<crate::store::Store>> {
        self.remote.as_ref()
    }

    /// Reads this process's object-store files through `objects` (the mount's disk cache).
    pub fn with_objects(mut self, objects: Objects) -> Store {
        self.objects = Some(objects);
        self
    }

    pub fn objects(&self) -> Option<&Objects> {
        self.objects.as_ref()
    }

    /// The store's directory (of an object store: this node's directory).
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn registry_path(&self) -> PathBuf {
        self.root.join("registry.json")
    }
    pub fn log_path(&self) -> PathBuf {
        self.root.join("llmfs.log")
    }
    /// Where entry `name` keeps the files it owns (local stores).
    pub fn entry_dir(&self, name: &str) -> PathBuf {
        self.root.join("models").join(name)
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Something that changes whenever the registry is committed, for a daemon to notice other
    /// processes' changes cheaply: locally its file's inode (every save renames a new file in,
    /// which catches two saves within one timestamp tick) and mtime; in an object store its
    /// etag, as a poller thread last saw it (a HEAD every [`REMOTE_POLL`], so that no FUSE
    /// request waits on the network, nor on a server that is down), or as this process's own
    /// last commit left it.
    pub fn registry_stamp(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let Some(remote) = &self.remote else {
            let meta = fs::metadata(self.registry_path()).ok()?;
            return Some(format!("{}.{}", meta.ino(), fingerprint::mtime_ns(&meta)));
        };
        let mut polled = self.polled.lock().unwrap_or_else(|e| e.into_inner());
        if !polled.polling {
            polled.polling = true;
            polled.stamp = head_stamp(remote).unwrap_or(None);
            let (remote, weak) = (remote.clone(), Arc::downgrade(&self.polled));
            std::thread::Builder::new()
                .name("llmfs-registry-poll".into())
                .spawn(move || loop {
                    std::thread::sleep(REMOTE_POLL);
                    let Some(polled) = weak.upgrade() else { return };
                    // Unreachable: keep what was known (the next poll asks again).
                    if let Ok(stamp) = head_stamp(&remote) {
                        polled.lock().unwrap_or_else(|e| e.into_inner()).stamp = stamp;
                    }
                })
                .map_err(|e| tracing::error!("no registry poller: {e}"))
                .ok();
        }
        polled.stamp.clone()
    }

    /// This process committed the registry at `etag`.
    fn committed(&self, etag: &str) {
        self.polled.lock().unwrap_or_else(|e| e.into_inner()).stamp = Some(etag.to_owned());
    }

    /// The catalogue as it is now (empty if the store is new).
    pub fn load(&self) -> Result<Registry> {
        let path = self.registry_path();
        let (bytes, etag) = match &self.remote {
            Some(r) => match r.get(REGISTRY_KEY) {
                Ok(o) => (Some(o.bytes.to_vec()), Some(o.etag)),
                Err(crate::store::StoreError::NotFound { .. }) => (None, None),
                Err(e) => return Err(e.into()),
            },
            None => match fs::read(&path) {
                Ok(b) => (Some(b), None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => (None, None),
                Err(e) => return Err(Error::Io { path, source: e }),
            },
        };
        let mut registry = self.parse(bytes.as_deref())?;
        registry.loaded_etag = etag;
        Ok(registry)
    }

    /// The registry in `bytes` (None: a new, empty one), checked.
    fn parse(&self, bytes: Option<&[u8]>) -> Result<Registry> {
        let path = match &self.remote {
            Some(r) => PathBuf::from(format!("{}/{REGISTRY_KEY}", r.location())),
            None => self.registry_path(),
        };
        let Some(bytes) = bytes else {
            return Ok(Registry {
                version: 1,
                store_root: self.root.clone(),
                objects: self.objects.clone(),
                ..Default::default()
            });
        };
        let mut registry: Registry = serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt { path: path.clone(), reason: e.to_string() })?;
        registry.store_root = self.root.clone();
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
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Io { path, source: io::Error::last_os_error() });
        }
        Ok(StoreLock { _file: file })
    }

    /// Replaces the catalogue atomically. Callers hold the lock. In an object store the write
    /// is conditional on the registry being as `registry` was loaded: [`Error::Conflict`] if
    /// another node committed since (load again and redo the change).
    pub fn save(&self, registry: &Registry, _lock: &StoreLock) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(registry).expect("the registry always serializes");
        let Some(remote) = &self.remote else { return write_atomic(&self.registry_path(), &bytes) };
        use crate::store::StoreError;
        let put = match &registry.loaded_etag {
            Some(etag) => remote.put_if_match(REGISTRY_KEY, bytes.into(), etag),
            None => remote.put_if_absent(REGISTRY_KEY, bytes.into()),
        };
        match put {
            Ok(etag) => {
                self.committed(&etag);
                Ok(())
            }
            Err(StoreError::Precondition { .. } | StoreError::AlreadyExists { .. }) => Err(Error::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// Load, change, save, atomically: the one way commands modify the catalogue. `f` may run
    /// more than once (in an object store, again on the newer catalogue whenever another node
    /// committed first), so it must only change `registry`.
    pub fn update<T>(&self, mut f: impl FnMut(&mut Registry) -> Result<T>) -> Result<T> {
        let lock = self.lock()?;
        let Some(remote) = &self.remote else {
            let mut registry = self.load()?;
            let out = f(&mut registry)?;
            self.save(&registry, &lock)?;
            return Ok(out);
        };
        let mut out = None;
        let committed = crate::store::update_object(remote, REGISTRY_KEY, |old| {
            let mut registry = self.parse(old)?;
            out = Some(f(&mut registry)?);
            Ok(serde_json::to_vec_pretty(&registry).expect("the registry always serializes"))
        });
        match committed {
            Ok(c) => {
                self.committed(&c.etag);
                Ok(out.expect("the closure ran"))
            }
            Err(crate::store::UpdateError::Rejected(e)) => Err(e),
            Err(crate::store::UpdateError::Store(e)) => Err(e.into()),
        }
    }

    /// Register a new entry, moving `staging` (its files) to `models/NAME/` first: one atomic
    /// registry update, refused if the name was taken meanwhile. A directory already there is an
    /// orphan of a crash between a rename and a save, and is replaced. In an object store the
    /// staged files are uploaded first, each to a key of its own ([`Store::upload`]), and the
    /// entry's records name them. Returns the entry as registered.
    pub fn insert_entry(&self, name: &str, entry: &Entry, staging: Option<StagingDir>) -> Result<Entry> {
        if self.remote.is_some() {
            return self.insert_uploading(name, entry, staging.as_ref().map(|s| s.path()));
        }
        let dir = self.entry_dir(name);
        let mut staging = staging;
        self.update(|registry| {
            if registry.entries.contains_key(name) {
                return Err(Error::Exists(name.to_owned()));
            }
            if let Some(staging) = staging.take() {
                let _ = fs::remove_dir_all(&dir);
                staging.keep(&dir)?;
            }
            registry.entries.insert(name.to_owned(), entry.clone());
            Ok(())
        })?;
        Ok(entry.clone())
    }

    /// Register a new entry in an object store, uploading first each of its files that is in
    /// `dir` (each to a key of its own under a fresh [`upload_prefix`]); its records then name
    /// them. Refused if the name was taken meanwhile (the uploads are deleted again).
    pub fn insert_uploading(&self, name: &str, entry: &Entry, dir: Option<&Path>) -> Result<Entry> {
        let mut entry = entry.clone();
        let mut uploaded = vec![];
        let result = (|| {
            if let Some(dir) = dir {
                let prefix = upload_prefix(name);
                for record in entry.kind.files_mut() {
                    let path = dir.join(&record.name);
                    if path.is_file() {
                        self.upload(record, &format!("{prefix}/{}", record.name), &path)?;
                        uploaded.push(record.object.clone().expect("just uploaded"));
                    }
                }
            }
            self.update(|registry| {
                if registry.entries.contains_key(name) {
                    return Err(Error::Exists(name.to_owned()));
                }
                registry.entries.insert(name.to_owned(), entry.clone());
                Ok(())
            })
        })();
        if result.is_err() {
            self.delete_objects(uploaded.iter().map(String::as_str));
        }
        result.map(|()| entry)
    }

    /// Uploads local file `path` to the object store as `key` (multipart, with the progress
    /// callback of [`Store::set_upload_progress`]), and makes `record` name it.
    pub fn upload(&self, record: &mut FileRecord, key: &str, path: &Path) -> Result<()> {
        let remote = self.remote.as_ref().expect("uploads go to an object store");
        let size = fs::metadata(path).map_err(io_err(path))?.len();
        let mut done = 0;
        let etag = remote.put_file(key, path, &mut |n| {
            upload_progress(n.saturating_sub(done));
            done = n;
        })?;
        record.object = Some(key.to_owned());
        record.fingerprint = Fingerprint::of_object(size, &etag);
        Ok(())
    }

    /// Deletes objects of the store (best effort: what fails is left for `llmfs gc`).
    pub fn delete_objects<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let Some(remote) = &self.remote else { return };
        for key in keys {
            if !key.starts_with("s3://") {
                if let Err(e) = remote.delete(key) {
                    eprintln!("llmfs: {e} (left for `llmfs gc`)");
                }
            }
        }
    }

    /// Removes what entry `entry` (just removed from the registry) owned: its directory, or in
    /// an object store the objects its records name (not a base added in place: those are the
    /// user's).
    pub fn remove_owned(&self, name: &str, entry: &Entry) {
        if self.remote.is_some() {
            if !matches!(entry.kind, EntryKind::Base { copied: false, .. }) {
                self.delete_objects(entry.kind.files().iter().filter_map(|f| f.object.as_deref()));
            }
        } else if !matches!(entry.kind, EntryKind::Base { copied: false, .. }) {
            let _ = fs::remove_dir_all(self.entry_dir(name));
        }
    }

    /// A fresh private staging directory under `tmp/`, removed on drop unless kept.
    pub fn staging_dir(&self, label: &str) -> Result<StagingDir> {
        let path = self.tmp_dir().join(format!("{label}.{}.{}", std::process::id(), unique()));
        fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err(&path))?;
        Ok(StagingDir { path: Some(path) })
    }
}

/// Where the files of one upload for entry `name` go in an object store: a prefix no other
/// upload uses, so objects are never rewritten (a crash leaves only unreferenced ones, for gc).
pub fn upload_prefix(name: &str) -> String {
    format!("models/{name}/{:016x}{:08x}", new_generation(), unique() as u32)
}

/// The progress callback of uploads in this process (bytes uploaded since the last call).
type Progress = Box<dyn FnMut(u64) + Send>;
static UPLOAD_PROGRESS: std::sync::Mutex<Option<Progress>> = std::sync::Mutex::new(None);

/// Shows upload progress (`llmfs add` on an object store draws a bar with it).
pub fn set_upload_progress(f: Option<Progress>) {
    *UPLOAD_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()) = f;
}

fn upload_progress(n: u64) {
    if let Some(f) = UPLOAD_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        f(n)
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    nanos ^ (NEXT.fetch_add(1, Ordering::Relaxed) << 32)
}

/// A staging directory that is deleted unless `keep` moves it into place.
pub struct StagingDir {
    path: Option<PathBuf>,
}

impl StagingDir {
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("staging dir is present until kept")
    }
    /// Renames the staging directory to `dest` (atomic on one filesystem) and keeps it.
    pub fn keep(mut self, dest: &Path) -> Result<()> {
        let path = self.path.take().expect("kept once");
        // The store is private: whatever was copied or written in, its directories are 0700 and
        // its files 0600, subdirectories included.
        make_private(&path)?;
        fs::rename(&path, dest).map_err(io_err(dest))?;
        sync_dir(dest.parent().unwrap_or(Path::new("/")));
        Ok(())
    }
}

/// Modes 0700 (directories) and 0600 (files) for everything under `dir` (symlinks are not
/// followed: staging directories hold none).
fn make_private(dir: &Path) -> Result<()> {
    for item in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = item.map_err(io_err(dir))?.path();
        let kind = fs::symlink_metadata(&path).map_err(io_err(&path))?.file_type();
        if kind.is_dir() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).map_err(io_err(&path))?;
            make_private(&path)?;
        } else if kind.is_file() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Write a file so that a crash leaves either the old or the new content: tmp, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // ".{file}.{pid}.{n}.tmp": the pid lets `Store::open` sweep what a killed process left.
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        unique()
    ));
    let result = (|| {
        let mut f = OpenOptions::new().create_new(true).write(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io { path: path.to_owned(), source: e });
    }
    sync_dir(dir);
    Ok(())
}

/// Remove the temporary files of [`write_atomic`] in `dir` whose process is gone (a kill -9
/// between create and rename); those of a live process are its update in progress.
fn remove_dead_tmp_files(dir: &Path) {
    for item in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else { continue };
        let pid = stem.rsplit('.').nth(1).unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_file(item.path());
        }
    }
}

fn sync_dir(dir: &Path) {
    // Best effort: makes the rename durable; some filesystems refuse fsync on directories.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/".into())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

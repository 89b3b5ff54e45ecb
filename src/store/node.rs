//! A store as one process uses it: its objects (a local directory or an object store) and this
//! node's own directory, with the few operations whose steps differ by backend, so that nothing
//! above `src/store` asks which backend it is on:
//!
//! - **the catalogue's commits**: read a key with its etag, write it back under this node's
//!   write lock only if it is unchanged ([`Node::commit`], [`Node::update`]), and say cheaply
//!   whether it changed ([`Node::stamp`]: a `stat` locally, a poller's HEAD on an object store);
//! - **an entry's new files**: staged first ([`Node::stage_dir`], [`Node::stage_copy`],
//!   [`Node::stage_file`]: uploaded to keys of their own on an object store, kept in a staging
//!   directory locally), then put in place under the write lock by the commit that names them
//!   ([`Staged::place`]: a rename locally, nothing on an object store), or discarded;
//! - **their removal** ([`Node::remove_entry_files`], [`Node::remove_file`]).
//!
//! Layout of a local store (the embedded default):
//! ```text
//! STORE/registry.json   the catalogue (an object; replaced atomically: tmp, fsync, rename)
//! STORE/lock            flock'ed by every process that commits (the local backend's own lock)
//! STORE/models/NAME/    files owned by entry NAME (copies made by `add --copy`, containers)
//! STORE/tmp/            staging; anything here is garbage after a crash and is swept
//! STORE/llmfs.log       the daemon's log
//! ```
//! On an object store the catalogue is the object `registry.json`, an entry's files are objects
//! under `models/NAME/UPLOAD-ID/` (never rewritten: a crash leaves only unreferenced objects, for
//! `llmfs gc`), and this node's directory (`$LLMFS_NODE_DIR`, else
//! `~/.cache/llmfs/s3/BUCKET[/PREFIX]`) holds `lock`, `tmp/`, the log and the disk cache.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::{Cond, Fetched, Object, ObjectMeta, S3Config, Store, StoreError, UpdateError};

/// How often a daemon asks an object store whether the catalogue changed: entries added or
/// removed by another node show within this (plus the kernel's 1 s entry timeout).
pub const REMOTE_POLL: Duration = Duration::from_secs(2);

/// A store and this node's directory. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Node {
    objects: Arc<Store>,
    /// The store's directory, or this node's directory of an object store.
    dir: PathBuf,
    /// What [`Node::stamp`] answers on an object store.
    polled: Arc<Mutex<Polled>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("location", &self.location()).field("dir", &self.dir).finish()
    }
}

/// A key's etag as a poller last saw it (None: no object), and whether a poller runs.
#[derive(Debug, Default)]
struct Polled {
    stamp: Option<String>,
    polling: bool,
}

/// Held while this node commits; released on drop (the flock goes with the fd). Locally it is
/// the local backend's own lock, so writes made while holding it go through [`Node::commit`].
pub struct WriteLock {
    _file: File,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |e| StoreError::Io { key: path.display().to_string(), reason: e.to_string() }
}

impl Node {
    /// `s3://BUCKET[/PREFIX]` (credentials and endpoint from the AWS environment) or a directory
    /// (created if needed, mode 0700).
    pub fn open(location: &Path) -> Result<Node, StoreError> {
        let Some(url) = location.to_str().filter(|l| l.starts_with("s3://")) else {
            let dir = make_node_dir(location)?;
            return Ok(Node::with(Arc::new(Store::local(&dir)?), dir));
        };
        let objects = Arc::new(Store::open(url)?);
        let dir = match std::env::var_os("LLMFS_NODE_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let (bucket, prefix) = S3Config::parse_url(url)?;
                home().join(".cache/llmfs/s3").join(bucket).join(prefix)
            }
        };
        Ok(Node::with(objects, make_node_dir(&dir)?))
    }

    fn with(objects: Arc<Store>, dir: PathBuf) -> Node {
        Node { objects, dir, polled: Arc::default() }
    }

    /// What `--store` names: the directory or `s3://BUCKET[/PREFIX]`.
    pub fn location(&self) -> String {
        self.objects.location()
    }

    /// Where object `key` is, for messages: its path locally, its URL on an object store.
    pub fn key_location(&self, key: &str) -> String {
        format!("{}/{key}", self.location())
    }

    /// The store's directory (of an object store: this node's directory).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Where entry `name` keeps the files it owns in a local store.
    pub fn entry_dir(&self, name: &str) -> PathBuf {
        self.dir.join("models").join(name)
    }

    /// How this process fetches an object store's files into local ones (None: a local store's
    /// files are read where they are).
    pub fn fetcher(&self) -> Option<Fetched> {
        (!self.objects.is_local()).then(|| Fetched::new(self.objects.clone(), self.tmp_dir()))
    }

    /// Whether an entry may name files on this machine's disk in place (`add` without
    /// `--copy`): in a local store; an object store's other nodes could not read them.
    pub fn keeps_local_paths(&self) -> bool {
        self.objects.is_local()
    }

    /// The objects under `prefix` (see [`Store::list`]).
    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.objects.list(prefix)
    }

    /// Object `key` and its etag, None if there is none.
    pub fn read(&self, key: &str) -> Result<Option<Object>, StoreError> {
        match self.objects.get(key) {
            Ok(o) => Ok(Some(o)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Serializes this node's commits (an object store's other nodes are kept apart by the
    /// conditional write in [`Node::commit`]).
    pub fn write_lock(&self) -> Result<WriteLock, StoreError> {
        let path = self.dir.join("lock");
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
            return Err(io_err(&path)(io::Error::last_os_error()));
        }
        Ok(WriteLock { _file: file })
    }

    /// Writes `bytes` as `key` if it is still at `etag` (None: if there is none yet), under the
    /// held lock; returns the new etag. [`StoreError::Precondition`] or
    /// [`StoreError::AlreadyExists`] when another node committed since it was read.
    pub fn commit(
        &self,
        _lock: &WriteLock,
        key: &str,
        bytes: Vec<u8>,
        etag: Option<&str>,
    ) -> Result<String, StoreError> {
        let cond = match etag {
            Some(etag) => Cond::Match(etag),
            None => Cond::Absent,
        };
        let etag = self.objects.put_held(key, Bytes::from(bytes), cond)?;
        self.committed(&etag);
        Ok(etag)
    }

    /// Replaces `key` with `f(its bytes)` atomically (None: there is none yet), under this
    /// node's lock. `f` may run again on newer bytes when another node committed first, so it
    /// must be a pure function of them. Returning the bytes unchanged writes nothing.
    pub fn update<E: From<StoreError>>(
        &self,
        key: &str,
        f: impl FnMut(Option<&[u8]>) -> Result<Vec<u8>, E>,
    ) -> Result<(), E> {
        let _lock = self.write_lock()?;
        let mut put = |key: &str, bytes: Bytes, cond: Cond| {
            let etag = self.objects.put_held(key, bytes, cond)?;
            self.committed(&etag);
            Ok(etag)
        };
        match super::commit::retry_update(&self.objects, key, f, &mut put) {
            Ok(_) => Ok(()),
            Err(UpdateError::Rejected(e)) => Err(e),
            Err(UpdateError::Store(e)) => Err(e.into()),
        }
    }

    /// Something that changes whenever `key` (the catalogue) is committed, for a daemon to
    /// notice other processes' commits cheaply: locally its etag now (a `stat`: every commit
    /// renames a new file in); on an object store its etag as a poller thread last saw it (a
    /// HEAD every [`REMOTE_POLL`], so that no FUSE request waits on the network, nor on a
    /// server that is down), or as this process's own last commit left it.
    pub fn stamp(&self, key: &str) -> Option<String> {
        if self.objects.is_local() {
            return self.objects.head(key).ok().map(|m| m.etag);
        }
        let mut polled = self.polled.lock().unwrap_or_else(|e| e.into_inner());
        if !polled.polling {
            polled.polling = true;
            polled.stamp = head_etag(&self.objects, key).unwrap_or(None);
            let (objects, weak, key) = (self.objects.clone(), Arc::downgrade(&self.polled), key.to_owned());
            std::thread::Builder::new()
                .name("llmfs-registry-poll".into())
                .spawn(move || loop {
                    std::thread::sleep(REMOTE_POLL);
                    let Some(polled) = weak.upgrade() else { return };
                    // Unreachable: keep what was known (the next poll asks again).
                    if let Ok(stamp) = head_etag(&objects, &key) {
                        polled.lock().unwrap_or_else(|e| e.into_inner()).stamp = stamp;
                    }
                })
                .map_err(|e| tracing::error!("no registry poller: {e}"))
                .ok();
        }
        polled.stamp.clone()
    }

    /// This process committed at `etag`.
    fn committed(&self, etag: &str) {
        self.polled.lock().unwrap_or_else(|e| e.into_inner()).stamp = Some(etag.to_owned());
    }

    /// A fresh private staging directory under `tmp/`, removed on drop unless kept.
    pub fn staging_dir(&self, label: &str) -> Result<StagingDir, StoreError> {
        let path = self.tmp_dir().join(format!("{label}.{}.{}", std::process::id(), unique()));
        fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err(&path))?;
        Ok(StagingDir { path: Some(path) })
    }

    /// The files `names` of `staging` as entry `name`'s: on an object store each is uploaded now
    /// to a key of its own (a missing one is skipped), locally the directory waits for
    /// [`Staged::place`].
    pub fn stage_dir(&self, name: &str, staging: StagingDir, names: &[&str]) -> Result<Staged, StoreError> {
        if self.objects.is_local() {
            return Ok(Staged::local(self, name, Some(staging)));
        }
        self.upload_all(name, staging.path(), names)
    }

    /// Files `names` (relative paths) of the user's directory `from` as entry `name`'s own
    /// copies: uploaded from where they are on an object store, copied into a staging
    /// directory locally (the entry's directory appears whole or not at all).
    pub fn stage_copy(&self, name: &str, from: &Path, names: &[&str]) -> Result<Staged, StoreError> {
        if !self.objects.is_local() {
            return self.upload_all(name, from, names);
        }
        let staging = self.copy_to_staging(&format!("add-{name}"), from, names)?;
        Ok(Staged::local(self, name, Some(staging)))
    }

    /// A new staging directory holding copies (fsynced) of files `names` (relative paths) of
    /// `from`; a file missing there is [`StoreError::NotFound`] with its path as the key.
    pub fn copy_to_staging(
        &self,
        label: &str,
        from: &Path,
        names: &[&str],
    ) -> Result<StagingDir, StoreError> {
        let staging = self.staging_dir(label)?;
        for file in names {
            let (src, dst) = (from.join(file), staging.path().join(file));
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            fs::copy(&src, &dst).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::NotFound { key: src.display().to_string() },
                _ => io_err(&src)(e),
            })?;
            File::open(&dst).and_then(|f| f.sync_all()).map_err(io_err(&dst))?;
        }
        Ok(staging)
    }

    fn upload_all(&self, name: &str, dir: &Path, names: &[&str]) -> Result<Staged, StoreError> {
        let prefix = upload_prefix(name);
        let mut staged = Staged::local(self, name, None);
        for file in names {
            let path = dir.join(file);
            if path.is_file() {
                let meta = self.upload(&format!("{prefix}/{file}"), &path)?;
                staged.uploaded.push((file.to_string(), meta));
            }
        }
        Ok(staged)
    }

    /// One new file `file` of entry `name`, coded into `tmp`: uploaded now on an object store;
    /// locally renamed into the entry's directory by [`Staged::place_as`] (under the name the
    /// file has then: a rename may move it meanwhile).
    pub fn stage_file(&self, name: &str, file: &str, tmp: &Path) -> Result<Staged, StoreError> {
        let mut staged = Staged::local(self, name, None);
        if self.objects.is_local() {
            staged.file = Some(tmp.to_owned());
        } else {
            let meta = self.upload(&format!("{}/{file}", upload_prefix(name)), tmp)?;
            staged.uploaded.push((file.to_owned(), meta));
        }
        Ok(staged)
    }

    /// Uploads local file `path` as object `key` (multipart, reporting to the progress callback
    /// of [`set_upload_progress`]).
    fn upload(&self, key: &str, path: &Path) -> Result<ObjectMeta, StoreError> {
        let size = fs::metadata(path).map_err(io_err(path))?.len();
        let mut done = 0;
        let etag = self.objects.put_file(key, path, &mut |n| {
            upload_progress(n.saturating_sub(done));
            done = n;
        })?;
        Ok(ObjectMeta { key: key.into(), size, etag, last_modified: std::time::SystemTime::now() })
    }

    /// Deletes object `key` (a missing one is no error).
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.objects.delete(key)
    }

    /// Deletes objects of the store (best effort: what fails is left for `llmfs gc`). Keys of
    /// other buckets (`s3://…`: models added in place) are the user's and stay.
    pub fn delete_objects<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        for key in keys {
            if !key.starts_with("s3://") {
                if let Err(e) = self.objects.delete(key) {
                    eprintln!("llmfs: {e} (left for `llmfs gc`)");
                }
            }
        }
    }

    /// Removes what a removed entry owned: its local directory and the objects `objects`.
    pub fn remove_entry_files<'a>(&self, name: &str, objects: impl IntoIterator<Item = &'a str>) {
        self.delete_objects(objects);
        let _ = fs::remove_dir_all(self.entry_dir(name));
    }

    /// Removes one stored file of entry `name`: its object, or its file in the entry's
    /// directory.
    pub fn remove_file(&self, name: &str, file: &str, object: Option<&str>) {
        match object {
            Some(key) => self.delete_objects([key]),
            None => {
                let _ = fs::remove_file(self.entry_dir(name).join(file));
            }
        }
    }
}

/// New files of one entry on their way in (see [`Node`]): the objects already uploaded, or what
/// [`Staged::place`] moves into the entry's directory.
pub struct Staged {
    node: Node,
    name: String,
    /// A staging directory that becomes the entry's directory (local).
    dir: Option<StagingDir>,
    /// Where one file was coded, to go into the entry's directory (local).
    file: Option<PathBuf>,
    /// Uploaded objects, by file name (object store).
    uploaded: Vec<(String, ObjectMeta)>,
}

impl Staged {
    fn local(node: &Node, name: &str, dir: Option<StagingDir>) -> Staged {
        Staged { node: node.clone(), name: name.to_owned(), dir, file: None, uploaded: vec![] }
    }

    /// Where the staged files are now, if they wait in a local staging directory.
    pub fn local_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// The object file `file` was uploaded to, if it was.
    pub fn object(&self, file: &str) -> Option<&ObjectMeta> {
        self.uploaded.iter().find(|(f, _)| f == file).map(|(_, m)| m)
    }

    /// Puts a staged directory in place (call it under the write lock, in the commit that
    /// names its files): it replaces whatever is at the entry's directory (an orphan of a crash
    /// between a rename and a commit). Uploaded objects are in place already.
    pub fn place(&mut self) -> Result<(), StoreError> {
        if let Some(staging) = self.dir.take() {
            let dest = self.node.entry_dir(&self.name);
            let _ = fs::remove_dir_all(&dest);
            staging.keep(&dest)?;
        }
        self.uploaded.clear();
        Ok(())
    }

    /// Puts a staged file in place as `file` of the entry (under the write lock, in the commit
    /// that names it). Uploaded objects are in place already.
    pub fn place_as(&mut self, file: &str) -> Result<(), StoreError> {
        if let Some(tmp) = self.file.take() {
            let path = self.node.entry_dir(&self.name).join(file);
            if let Some(parent) = path.parent() {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(io_err(parent))?;
            }
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        self.uploaded.clear();
        Ok(())
    }

    /// Deletes what was staged and not placed (uploaded objects; a staging directory goes on
    /// drop).
    pub fn discard(self) {
        self.node.delete_objects(self.uploaded.iter().map(|(_, m)| m.key.as_str()));
    }
}

/// The etag of `key` now (None: there is none).
fn head_etag(objects: &Store, key: &str) -> Result<Option<String>, StoreError> {
    match objects.head(key) {
        Ok(m) => Ok(Some(m.etag)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Creates `dir` with `models/` and `tmp/` (mode 0700) and sweeps what killed processes left.
fn make_node_dir(dir: &Path) -> Result<PathBuf, StoreError> {
    for d in [dir.to_owned(), dir.join("models"), dir.join("tmp")] {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(io_err(&d))?;
    }
    let dir = dir.canonicalize().map_err(io_err(dir))?;
    remove_dead_tmp_files(&dir);
    Ok(dir)
}

/// Where the files of one upload for entry `name` go in an object store: a prefix no other
/// upload uses, so objects are never rewritten (a crash leaves only unreferenced ones, for gc).
pub fn upload_prefix(name: &str) -> String {
    let generation =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    format!("models/{name}/{generation:016x}{:08x}", unique() as u32)
}

/// The progress callback of uploads in this process (bytes uploaded since the last call).
type Progress = Box<dyn FnMut(u64) + Send>;
static UPLOAD_PROGRESS: Mutex<Option<Progress>> = Mutex::new(None);

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
    fn keep(mut self, dest: &Path) -> Result<(), StoreError> {
        let path = self.path.take().expect("kept once");
        // The store is private: whatever was copied or written in, its directories are 0700 and
        // its files 0600, subdirectories included.
        make_private(&path)?;
        fs::rename(&path, dest).map_err(io_err(dest))?;
        sync_dir(dest.parent().unwrap_or(Path::new("/")));
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Modes 0700 (directories) and 0600 (files) for everything under `dir` (symlinks are not
/// followed: staging directories hold none).
fn make_private(dir: &Path) -> Result<(), StoreError> {
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

/// Removes the temporary files of writes in `dir` whose process is gone (a kill -9 between
/// create and rename): the local backend's `.llmfs-tmp.PID.N.T`, and older versions'
/// `.FILE.PID.N.tmp`. Those of a live process are its write in progress.
fn remove_dead_tmp_files(dir: &Path) {
    for item in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let pid = if let Some(rest) = name.strip_prefix(super::local::TMP_PREFIX) {
            rest.split('.').next().unwrap_or("")
        } else if let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) {
            stem.rsplit('.').nth(1).unwrap_or("")
        } else {
            continue;
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_conditional_and_the_stamp_follows_them() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path()).unwrap();
        assert_eq!(node.stamp("registry.json"), None);
        let lock = node.write_lock().unwrap();
        let e1 = node.commit(&lock, "registry.json", b"one".to_vec(), None).unwrap();
        assert_eq!(node.stamp("registry.json").as_deref(), Some(e1.as_str()));
        assert!(matches!(
            node.commit(&lock, "registry.json", b"x".to_vec(), None),
            Err(StoreError::AlreadyExists { .. })
        ));
        let e2 = node.commit(&lock, "registry.json", b"two".to_vec(), Some(&e1)).unwrap();
        assert!(matches!(
            node.commit(&lock, "registry.json", b"lost".to_vec(), Some(&e1)),
            Err(StoreError::Precondition { .. })
        ));
        drop(lock);
        assert_eq!(node.stamp("registry.json").as_deref(), Some(e2.as_str()));
        let mode = fs::metadata(dir.path().join("registry.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the store is private");
        node.update("registry.json", |old| Ok::<_, StoreError>([old.unwrap(), b"!"].concat())).unwrap();
        assert_eq!(&node.read("registry.json").unwrap().unwrap().bytes[..], b"two!");
    }

    #[test]
    fn updates_from_many_threads_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path()).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let node = node.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        node.update("r", |old| {
                            Ok::<_, StoreError>(
                                [old.unwrap_or_default(), format!("{t}-{i}\n").as_bytes()].concat(),
                            )
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(std::str::from_utf8(&node.read("r").unwrap().unwrap().bytes).unwrap().lines().count(), 80);
    }

    #[test]
    fn staged_files_appear_only_when_placed() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path()).unwrap();
        let staging = node.staging_dir("t").unwrap();
        fs::create_dir(staging.path().join("sub")).unwrap();
        fs::write(staging.path().join("sub/a"), b"a").unwrap();
        let mut staged = node.stage_dir("e", staging, &["sub/a"]).unwrap();
        assert!(staged.object("sub/a").is_none(), "nothing is uploaded locally");
        assert!(!node.entry_dir("e").exists());
        staged.place().unwrap();
        assert_eq!(fs::read(node.entry_dir("e").join("sub/a")).unwrap(), b"a");
        let mode = fs::metadata(node.entry_dir("e").join("sub/a")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let tmp = node.tmp_dir().join("coded");
        fs::write(&tmp, b"b").unwrap();
        node.stage_file("e", "b", &tmp).unwrap().place_as("x/b").unwrap();
        assert_eq!(fs::read(node.entry_dir("e").join("x/b")).unwrap(), b"b");
        node.remove_file("e", "x/b", None);
        assert!(!node.entry_dir("e").join("x/b").exists());
        let unplaced = node.stage_copy("f", &node.entry_dir("e"), &["sub/a"]).unwrap();
        unplaced.discard();
        assert!(!node.entry_dir("f").exists());
        assert_eq!(fs::read_dir(node.tmp_dir()).unwrap().count(), 0, "no staging left behind");
        node.remove_entry_files("e", []);
        assert!(!node.entry_dir("e").exists());
    }
}

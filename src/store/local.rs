//! The local-directory backend: today's store, unchanged on disk. A key is a relative path under
//! the root. Writes go to a temporary file beside the target (`.llmfs-tmp.*`, never listed),
//! fsynced, then committed under an exclusive `flock` of `ROOT/lock` (the lock the registry
//! takes today, so old and new processes serialise): rename for a plain put, `link(2)` for
//! put-if-absent (fails atomically if the key exists), etag compare + rename for put-if-match.
//! Reads are `pread`s of the file, never mappings (a file changed under a mapping would SIGBUS;
//! only `source`'s reads of bases map, with a handler for that).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{Cond, Object, ObjectMeta, StoreError};

/// The lock file at the root (not an object: never listed).
const LOCK_FILE: &str = "lock";
/// Temporary files start with this (not objects: never listed).
pub(super) const TMP_PREFIX: &str = ".llmfs-tmp.";
/// Copy buffer for `put_file`, and how often it reports progress.
const COPY_CHUNK: usize = 8 << 20;

pub(super) struct LocalDir {
    root: PathBuf,
}

/// An update's step: the new bytes for the old ones, or `None` to leave them.
pub(super) type UpdateFn<'a> = dyn FnMut(Option<&[u8]>) -> Result<Option<Vec<u8>>, StoreError> + 'a;

/// Held while a write commits; released on drop (the flock goes with the fd).
struct Lock(#[allow(dead_code)] File);

fn io_err(key: &str) -> impl Fn(io::Error) -> StoreError + '_ {
    move |e| match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound { key: key.into() },
        _ => StoreError::Io { key: key.into(), reason: e.to_string() },
    }
}

/// Size, mtime (ns) and inode: a rename gives a new inode, so every commit changes it.
fn etag_of(meta: &fs::Metadata) -> String {
    format!("{:x}-{:x}.{:x}-{:x}", meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino())
}

fn object_meta(key: &str, meta: &fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        key: key.into(),
        size: meta.len(),
        etag: etag_of(meta),
        last_modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

impl LocalDir {
    pub(super) fn open(root: PathBuf) -> Result<LocalDir, StoreError> {
        fs::create_dir_all(&root).map_err(|e| StoreError::Config(format!("{}: {e}", root.display())))?;
        Ok(LocalDir { root })
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn lock(&self) -> Result<Lock, StoreError> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(LOCK_FILE))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(LOCK_FILE)(io::Error::last_os_error()));
        }
        Ok(Lock(file))
    }

    pub(super) fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let meta = fs::metadata(self.path(key)).map_err(io_err(key))?;
        if !meta.is_file() {
            return Err(StoreError::NotFound { key: key.into() });
        }
        Ok(object_meta(key, &meta))
    }

    pub(super) fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes, StoreError> {
        let file = File::open(self.path(key)).map_err(io_err(key))?;
        let meta = file.metadata().map_err(io_err(key))?;
        if etag.is_some_and(|e| e != etag_of(&meta)) {
            return Err(StoreError::Precondition { key: key.into() });
        }
        let size = meta.len();
        if range.end > size {
            return Err(StoreError::Range { key: key.into(), start: range.start, end: range.end, size });
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        file.read_exact_at(&mut buf, range.start).map_err(io_err(key))?;
        Ok(buf.into())
    }

    pub(super) fn get(&self, key: &str) -> Result<Object, StoreError> {
        let mut file = File::open(self.path(key)).map_err(io_err(key))?;
        let meta = file.metadata().map_err(io_err(key))?;
        if !meta.is_file() {
            return Err(StoreError::NotFound { key: key.into() });
        }
        let mut buf = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut buf).map_err(io_err(key))?;
        // The etag of the file we read, not of whatever replaced it since (renames keep the fd's inode).
        Ok(Object { bytes: buf.into(), etag: etag_of(&meta) })
    }

    pub(super) fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let mut out = Vec::new();
        let start = if prefix.is_empty() { self.root.clone() } else { self.path(prefix) };
        let mut stack = vec![(start, prefix.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                    continue
                }
                Err(e) => return Err(io_err(&rel)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err(&rel))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
                if name.starts_with(TMP_PREFIX) || (rel.is_empty() && name == LOCK_FILE) {
                    continue;
                }
                let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&key)(e)),
                };
                if meta.is_dir() {
                    stack.push((entry.path(), key));
                } else if meta.is_file() {
                    out.push(object_meta(&key, &meta));
                }
            }
        }
        Ok(out)
    }

    /// A temporary file beside `key`'s path, created exclusively.
    fn tmp_file(&self, key: &str) -> Result<(PathBuf, File), StoreError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dest = self.path(key);
        let dir = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(io_err(key))?;
        let nanos =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_nanos();
        let name = format!(
            "{TMP_PREFIX}{}.{}.{nanos:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        // The store is private: its objects are 0600 (the registry and the containers).
        let file =
            OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io_err(key))?;
        Ok((path, file))
    }

    pub(super) fn put(&self, key: &str, bytes: &[u8], cond: Cond) -> Result<String, StoreError> {
        self.put_with(key, bytes, cond, true)
    }

    /// [`LocalDir::put`] by a process that holds the lock already (`store::node::WriteLock`: a
    /// second flock of it from the same process would wait for itself).
    pub(super) fn put_held(&self, key: &str, bytes: &[u8], cond: Cond) -> Result<String, StoreError> {
        self.put_with(key, bytes, cond, false)
    }

    fn put_with(&self, key: &str, bytes: &[u8], cond: Cond, lock: bool) -> Result<String, StoreError> {
        let (tmp, mut file) = self.tmp_file(key)?;
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        drop(file);
        let result = written.map_err(io_err(key)).and_then(|()| self.commit(key, &tmp, cond, lock));
        let _ = fs::remove_file(&tmp); // gone already after a rename; after link or an error it is ours
        result
    }

    pub(super) fn put_file(
        &self,
        key: &str,
        src: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<String, StoreError> {
        let src_key = src.display().to_string();
        let mut input = File::open(src).map_err(io_err(&src_key))?;
        let (tmp, mut file) = self.tmp_file(key)?;
        let copied = (|| -> Result<(), StoreError> {
            let mut buf = vec![0u8; COPY_CHUNK];
            let mut done = 0u64;
            loop {
                let n = input.read(&mut buf).map_err(io_err(&src_key))?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n]).map_err(io_err(key))?;
                done += n as u64;
                progress(done);
            }
            file.sync_all().map_err(io_err(key))
        })();
        drop(file);
        let result = copied.and_then(|()| self.commit(key, &tmp, Cond::None, true));
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Moves the fsynced `tmp` to `key` if `cond` holds, under the lock (taken here unless the
    /// caller holds it); returns the new etag.
    fn commit(&self, key: &str, tmp: &Path, cond: Cond, lock: bool) -> Result<String, StoreError> {
        let dest = self.path(key);
        let _lock = if lock { Some(self.lock()?) } else { None };
        match cond {
            Cond::None => fs::rename(tmp, &dest).map_err(io_err(key))?,
            Cond::Absent => match fs::hard_link(tmp, &dest) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(StoreError::AlreadyExists { key: key.into() })
                }
                r => r.map_err(io_err(key))?,
            },
            Cond::Match(etag) => {
                let current = match fs::metadata(&dest) {
                    Ok(meta) => etag_of(&meta),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(io_err(key)(e)),
                };
                if current != etag {
                    return Err(StoreError::Precondition { key: key.into() });
                }
                fs::rename(tmp, &dest).map_err(io_err(key))?;
            }
        }
        sync_dir(dest.parent().unwrap_or(&self.root));
        Ok(etag_of(&fs::metadata(&dest).map_err(io_err(key))?))
    }

    pub(super) fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        match fs::remove_file(self.path(key)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r.map_err(io_err(key)),
        }
    }

    /// Read-modify-write under the lock: no other local writer can come between, so it never
    /// conflicts (the S3 backend retries instead). Returns the bytes now stored, their etag, and
    /// whether they were written (`f` returning `None` leaves the old ones).
    pub(super) fn update(
        &self,
        key: &str,
        f: &mut UpdateFn<'_>,
    ) -> Result<(Vec<u8>, String, bool), StoreError> {
        let _lock = self.lock()?;
        let dest = self.path(key);
        let old = match fs::read(&dest) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(key)(e)),
        };
        let Some(new) = f(old.as_deref())? else {
            let etag = etag_of(&fs::metadata(&dest).map_err(io_err(key))?);
            return Ok((old.unwrap_or_default(), etag, false));
        };
        let (tmp, mut file) = self.tmp_file(key)?;
        let written = file.write_all(&new).and_then(|()| file.sync_all());
        drop(file);
        let result = written.and_then(|()| fs::rename(&tmp, &dest)).map_err(io_err(key));
        let _ = fs::remove_file(&tmp);
        result?;
        sync_dir(dest.parent().unwrap_or(&self.root));
        let etag = etag_of(&fs::metadata(&dest).map_err(io_err(key))?);
        Ok((new, etag, true))
    }
}

/// Best effort: makes a rename durable; some filesystems refuse fsync on directories.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

//! A cache of whole files on local disk, bounded in bytes, that survives restarts.
//!
//! Each entry is one file `DIR/<key>` holding exactly the cached bytes (so the kernel can serve
//! it directly: FUSE passthrough, mmap) and a sidecar `DIR/<key>.meta` that commits it: its
//! length, a BLAKE3 tree hash of its content, and the inode and ctime the data file had when it
//! was committed. Nothing here knows what the bytes are: a key is a hash of whatever identifies
//! the content (for a decoded variant file: the entry's generation, the file, the fingerprints of
//! everything it is decoded from, the codec parameters), so the same cache can hold other
//! whole objects (object-store chunks) later.
//!
//! Crash safety: a fill is written to `DIR/tmp/`, its hash computed, fsynced, renamed into
//! place, and only then the sidecar written (fsynced, renamed, directory fsynced). A crash or
//! kill -9 at any point leaves either a committed entry or garbage that the next open of the
//! cache sweeps: data without a sidecar, or anything under `tmp/`. A committed entry is checked
//! before it is served: its sidecar, its length, its inode and ctime (any write, truncate or
//! chmod through the filesystem changes the ctime, which cannot be set back) and, with
//! [`Verify::Full`], the content hash the first time it is opened in this process. An entry
//! that fails is removed and filled again, never served.
//!
//! Fills are single-flight: concurrent callers for one key wait on the first one's fill. The
//! filled file is handed out as soon as its bytes are written (in the page cache); fsync and the
//! commit happen on a background thread, so a first reader does not wait on the disk.
//! [`DiskCache::flush`] waits for those commits (at unmount). The content hash is a tree of leaf
//! hashes: a fill may give the hashes of pieces it wrote ([`Leaf`]: the memory tier's copy to
//! disk does, hashing as it copies), so the commit need not read those back; the sidecar then
//! records the leaves' bounds. Otherwise the commit hashes the file in fixed pieces.
//!
//! Bounded: entries are kept in LRU order (by last use, persisted as the sidecar's mtime) and
//! the least recently used are removed before a fill that would pass the capacity. Space is
//! counted in whole 4 KiB blocks, fills in progress included. A file still open elsewhere keeps
//! its blocks until closed (POSIX unlink semantics); what the cache directory holds stays within
//! the capacity. One process uses a directory at a time (an `flock` on `DIR/lock`).
//!
//! # Files
//!
//! * this file: the types, the directory's layout (the sidecar [`Meta`]) and [`DiskCache::open`],
//!   which sweeps what a crash left and reloads the committed entries in LRU order;
//! * `key.rs`: [`Key`] and [`KeyBuilder`], what names an entry;
//! * `fill.rs`: lookups and single-flight fills, and the check of a committed entry;
//! * `commit.rs`: the background commit (hash, fsync, renames) and waiting for commits;
//! * `eviction.rs`: space accounting in blocks, LRU order and eviction;
//! * `spare_core.rs`: a commit's read-back hash waits for a spare core;
//! * `hash.rs`: the content's tree hash and the leaves a fill gives;
//! * `tests.rs`: fills, eviction, crash leftovers and damaged entries, on real directories.

mod commit;
mod eviction;
mod fill;
mod hash;
mod key;
mod spare_core;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::SystemTime;

use lru::LruCache;
use serde::{Deserialize, Serialize};

use eviction::blocks;
pub use hash::{content_hash, Leaf};
pub use key::{Key, KeyBuilder};

/// Bumped whenever the layout of a cache directory changes: older entries are then ignored.
const FORMAT: u32 = 1;

/// How much of a committed entry is checked before it is first served in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Length, inode and ctime: catches every change made through the filesystem.
    Stat,
    /// Those, and the content hash (reads the whole file once per process): also catches
    /// corruption below the filesystem.
    Full,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskCacheError {
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    /// Another process holds the directory; `holder` is what it wrote into `DIR/lock` (see
    /// [`DiskCache::set_holder`]), empty if nothing.
    #[error("{}: in use by {}", dir.display(), if holder.is_empty() { "another llmfs process" } else { holder.as_str() })]
    Locked { dir: PathBuf, holder: String },
}

fn io_err(path: &Path, e: std::io::Error) -> DiskCacheError {
    DiskCacheError::Io { path: path.to_owned(), reason: e.to_string() }
}

/// The sidecar that commits an entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    len: u64,
    /// Hex tree hash of the content ([`content_hash`]).
    hash: String,
    /// Where each leaf of the hash ends, when the fill chose them; empty: [`HASH_PIECE`](hash::HASH_PIECE) each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    leaves: Vec<u64>,
    ino: u64,
    ctime_ns: i64,
    /// What the content is, for people reading the directory and the logs.
    label: String,
}

/// What a fill wrote besides the bytes: the leaf hashes it took (or none), and whether the
/// commit should re-fold the file (see `commit.rs`): it was written in pieces that do not start
/// at 2 MiB boundaries, so the page cache holds it in small folios.
#[derive(Debug)]
pub struct Written {
    pub leaves: Vec<Leaf>,
    pub refold: bool,
}

/// A fill just written, to commit: its file (open for writing), where it lies until the
/// commit renames it, and what the fill said of it.
struct Filled {
    file: File,
    tmp: PathBuf,
    written: Written,
}

/// A cached file, open for reading.
#[derive(Debug)]
pub struct Cached {
    pub file: File,
    /// Where the entry lives once committed (the file may still be under `tmp/` until then).
    pub path: PathBuf,
    pub len: u64,
}

/// Counters for logs, tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub entries: usize,
    pub used_bytes: u64,
    pub fills: u64,
    pub hits: u64,
    pub rejected: u64,
    pub evictions: u64,
}

type Slot = Arc<OnceLock<Result<Option<Arc<Cached>>, String>>>;

struct State {
    entries: LruCache<Key, Meta>,
    /// Blocks of committed entries and of fills in progress.
    used: u64,
    /// Single flight: a key being resolved (checked or filled, until committed).
    slots: HashMap<Key, Slot>,
    /// Entries whose content hash was checked (or computed) by this process.
    verified: HashSet<Key>,
    stats: DiskStats,
}

pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    verify: Verify,
    state: Mutex<State>,
    /// Commits running in the background, and a signal when one ends (shared with the commit
    /// threads, which let go of the cache before they signal: once [`DiskCache::flush`]
    /// returns, dropping the cache releases its directory).
    pending: Arc<(Mutex<usize>, Condvar)>,
    /// Callers waiting for commits now (an unmount's flush, a fill waiting for room): commits
    /// then hash at once instead of waiting for a spare core (see `spare_core.rs`).
    hurried: Arc<AtomicUsize>,
    lock_file: File,
}

fn ctime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec())
}

impl DiskCache {
    /// Open (creating) the cache in `dir`, holding at most `capacity` bytes; sweep what a crash
    /// left and evict down to the capacity.
    pub fn open(dir: &Path, capacity: u64, verify: Verify) -> Result<DiskCache, DiskCacheError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("tmp"))
            .map_err(|e| io_err(dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } != 0
        {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default().trim().to_owned();
            return Err(DiskCacheError::Locked { dir: dir.to_owned(), holder });
        }
        // Whoever held it before is gone: its note goes with it.
        let _ = lock.set_len(0);
        // Nothing under tmp/ is committed: a fill or commit that a crash cut short.
        for e in std::fs::read_dir(dir.join("tmp")).map_err(|e| io_err(dir, e))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let mut found: Vec<(SystemTime, Key, Meta)> = vec![];
        let mut names: HashSet<String> = HashSet::new();
        for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?.flatten() {
            names.insert(e.file_name().to_string_lossy().into_owned());
        }
        for name in &names {
            let path = dir.join(name);
            if let Some(hex) = name.strip_suffix(".meta") {
                let meta = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
                    .filter(|m| m.format == FORMAT);
                let data_len = std::fs::metadata(dir.join(hex)).map(|m| m.len()).ok();
                match (Key::parse(hex), meta) {
                    (Some(key), Some(meta)) if data_len == Some(meta.len) => {
                        let used = std::fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((used, key, meta));
                    }
                    _ => {
                        tracing::info!(
                            "disk cache: removing {} (unreadable, of another format or its data gone)",
                            path.display()
                        );
                        let _ = std::fs::remove_file(&path);
                        let _ = std::fs::remove_file(dir.join(hex));
                    }
                }
            } else if Key::parse(name).is_some() && !names.contains(&format!("{name}.meta")) {
                // Data that was never committed (a crash between its rename and the sidecar's).
                let _ = std::fs::remove_file(&path);
            }
        }
        found.sort_by_key(|(t, ..)| *t);
        let mut entries = LruCache::unbounded();
        let mut used = 0;
        for (_, key, meta) in found {
            used += blocks(meta.len);
            entries.put(key, meta);
        }
        let cache = DiskCache {
            dir: dir.to_owned(),
            capacity,
            verify,
            state: Mutex::new(State {
                entries,
                used,
                slots: HashMap::new(),
                verified: HashSet::new(),
                stats: DiskStats::default(),
            }),
            pending: Arc::new((Mutex::new(0), Condvar::new())),
            hurried: Arc::new(AtomicUsize::new(0)),
            lock_file: lock,
        };
        {
            let mut st = cache.lock();
            cache.evict_until(&mut st, 0, None);
            tracing::info!(
                dir = %dir.display(),
                entries = st.entries.len(),
                used_bytes = st.used,
                capacity,
                verify = ?verify,
                "disk cache opened"
            );
        }
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Say who holds the directory, for a process that finds it locked
    /// ([`DiskCacheError::Locked`]): one line in `DIR/lock`, the file the lock is on.
    pub fn set_holder(&self, holder: &str) {
        let _ = self.lock_file.set_len(0);
        let _ = self.lock_file.write_all_at(holder.as_bytes(), 0);
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> DiskStats {
        let st = self.lock();
        DiskStats { entries: st.entries.len(), used_bytes: st.used, ..st.stats }
    }
}

#[cfg(test)]
mod tests;

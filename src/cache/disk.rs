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
//! hashes: a fill may hash its own pieces as it writes them ([`Leaf`]: while they are hot in the
//! cache, on the threads that made them), so the commit need not read the file back; the
//! sidecar then records the leaves' bounds. Otherwise the commit hashes the file in fixed pieces.
//!
//! Bounded: entries are kept in LRU order (by last use, persisted as the sidecar's mtime) and
//! the least recently used are removed before a fill that would pass the capacity. Space is
//! counted in whole 4 KiB blocks, fills in progress included. A file still open elsewhere keeps
//! its blocks until closed (POSIX unlink semantics); what the cache directory holds stays within
//! the capacity. One process uses a directory at a time (an `flock` on `DIR/lock`).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use lru::LruCache;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::with_scratch;

/// Bumped whenever the layout of a cache directory changes: older entries are then ignored.
const FORMAT: u32 = 1;
/// The tree hash's leaves: a piece of this many bytes is hashed per task, in parallel.
const HASH_PIECE: u64 = 2 << 20;
const BLOCK: u64 = 4096;

/// A content identity: BLAKE3 of length-prefixed parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl Key {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    fn parse(hex: &str) -> Option<Key> {
        if hex.len() != 64 {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(k))
    }
}

/// Builds a [`Key`] from the parts that identify some content.
pub struct KeyBuilder(blake3::Hasher);

impl KeyBuilder {
    /// `domain` keeps keys of different kinds of content apart.
    pub fn new(domain: &str) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&FORMAT.to_le_bytes());
        let mut b = KeyBuilder(h);
        b.part(domain.as_bytes());
        b
    }
    /// Add one part (length-prefixed, so parts cannot run into each other).
    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }
    pub fn finish(&self) -> Key {
        Key(*self.0.finalize().as_bytes())
    }
}

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

/// The hash of bytes `start..start + len` of a file being filled: a leaf of its content hash.
/// A fill that returns leaves for (some of) the bytes it wrote spares the commit reading them
/// back; bytes no leaf covers are hashed from the file.
#[derive(Clone, Copy, Debug)]
pub struct Leaf {
    pub start: u64,
    pub len: u64,
    pub hash: [u8; 32],
}

impl Leaf {
    pub fn of(start: u64, bytes: &[u8]) -> Leaf {
        Leaf { start, len: bytes.len() as u64, hash: *blake3::hash(bytes).as_bytes() }
    }
}

/// The sidecar that commits an entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    len: u64,
    /// Hex tree hash of the content ([`content_hash`]).
    hash: String,
    /// Where each leaf of the hash ends, when the fill chose them; empty: [`HASH_PIECE`] each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    leaves: Vec<u64>,
    ino: u64,
    ctime_ns: i64,
    /// What the content is, for people reading the directory and the logs.
    label: String,
}

/// A fill just written, to commit: its file (open for writing), where it lies until the
/// commit renames it, and the leaf hashes the fill gave.
struct Filled {
    file: File,
    tmp: PathBuf,
    leaves: Vec<Leaf>,
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
    lock_file: File,
}

fn blocks(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK + BLOCK
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

    /// The cached bytes for `key` (`len` of them), filling them with `fill` if they are not
    /// cached (or fail their check). `fill` gets an empty file of length `len` and must write
    /// every byte; it returns the [`Leaf`] hashes of what it wrote, or none. `Ok(None)`: this content cannot be cached (larger than the cache, or the
    /// cache directory failed: logged) and the caller serves it some other way. A fill's error
    /// is returned (as its message) and nothing is cached.
    pub fn get_or_fill(
        self: &Arc<Self>,
        key: &Key,
        len: u64,
        label: &str,
        fill: impl FnOnce(&File) -> Result<Vec<Leaf>, String>,
    ) -> Result<Option<Arc<Cached>>, String> {
        self.get_or_fill_as(key, len, label, "decoded", fill)
    }

    /// [`DiskCache::get_or_fill`], saying `verb` of the fill in the log ("decoded", or "stored
    /// from memory" for a file the memory tier decoded).
    pub fn get_or_fill_as(
        self: &Arc<Self>,
        key: &Key,
        len: u64,
        label: &str,
        verb: &str,
        fill: impl FnOnce(&File) -> Result<Vec<Leaf>, String>,
    ) -> Result<Option<Arc<Cached>>, String> {
        let slot = self.lock().slots.entry(*key).or_default().clone();
        // Filled further up this thread's stack (see `Filling`): served without the cache.
        let Some(_filling) = super::Filling::enter(&slot) else { return Ok(None) };
        let mut leader_committing = None;
        let result = slot
            .get_or_init(|| {
                let (r, commit) = self.resolve(key, len, label, verb, fill, &slot);
                leader_committing = Some(commit);
                r
            })
            .clone();
        if leader_committing == Some(false) {
            // Resolved from a committed entry, or failed: later callers start afresh. (A fill
            // keeps its slot until its commit ends, so callers meanwhile share the filled file.)
            let mut st = self.lock();
            if st.slots.get(key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                st.slots.remove(key);
            }
        }
        result
    }

    /// The cached file (checked) or a new fill; and whether a commit was started.
    fn resolve(
        self: &Arc<Self>,
        key: &Key,
        len: u64,
        label: &str,
        verb: &str,
        fill: impl FnOnce(&File) -> Result<Vec<Leaf>, String>,
        slot: &Slot,
    ) -> (Result<Option<Arc<Cached>>, String>, bool) {
        match self.resolve_inner(key, len, label, verb, fill) {
            Ok(Some((cached, Some(filled)))) => {
                self.commit_in_background(*key, len, label.to_owned(), filled, slot.clone());
                (Ok(Some(cached)), true)
            }
            Ok(Some((cached, None))) => (Ok(Some(cached)), false),
            Ok(None) => (Ok(None), false),
            Err(e) => (Err(e), false),
        }
    }

    /// Whether `key` is being resolved now (checked, filled or committed).
    pub fn in_flight(&self, key: &Key) -> bool {
        self.lock().slots.contains_key(key)
    }

    /// The committed entry for `key` (of `len` bytes) if there is one and it passes its check;
    /// nothing is filled.
    pub fn get(&self, key: &Key, len: u64) -> Option<Arc<Cached>> {
        let meta = self.lock().entries.get(key).cloned()?;
        let cached = self.check(key, &meta, len).ok()?;
        self.touch(key);
        Some(Arc::new(cached))
    }

    /// A hit, or a fill with the file and temporary path to commit.
    #[allow(clippy::type_complexity)]
    fn resolve_inner(
        &self,
        key: &Key,
        len: u64,
        label: &str,
        verb: &str,
        fill: impl FnOnce(&File) -> Result<Vec<Leaf>, String>,
    ) -> Result<Option<(Arc<Cached>, Option<Filled>)>, String> {
        let committed = self.lock().entries.get(key).cloned();
        if let Some(meta) = committed {
            match self.check(key, &meta, len) {
                Ok(cached) => {
                    let mut st = self.lock();
                    st.stats.hits += 1;
                    drop(st);
                    self.touch(key);
                    return Ok(Some((Arc::new(cached), None)));
                }
                Err(reason) => {
                    tracing::warn!(
                        "disk cache: {label} ({}) failed its check, decoding it again: {reason}",
                        key.hex()
                    );
                    let mut st = self.lock();
                    st.stats.rejected += 1;
                    self.remove(&mut st, key);
                }
            }
        }
        let need = blocks(len);
        if need > self.capacity {
            return Ok(None);
        }
        // Room is made by evicting committed entries; fills and commits in progress count
        // too, so when they hold the room, wait for a commit (its entry can then go) and try
        // again, or serve this file uncached if none is under way.
        loop {
            let mut st = self.lock();
            self.evict_until(&mut st, need, Some(key));
            if st.used + need <= self.capacity {
                st.used += need;
                break;
            }
            drop(st);
            if !self.wait_for_a_commit() {
                tracing::info!(
                    "disk cache: no room for {label} beside the fills in progress; serving it uncached"
                );
                return Ok(None);
            }
        }
        let unreserve = || self.lock().used -= need;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join("tmp").join(format!(
            "{}.{}.{}",
            key.hex(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp) {
            Ok(f) => f,
            Err(e) => {
                unreserve();
                tracing::error!("disk cache: cannot create {}: {e}; serving {label} uncached", tmp.display());
                return Ok(None);
            }
        };
        if let Err(e) = file.set_len(len) {
            unreserve();
            let _ = std::fs::remove_file(&tmp);
            tracing::error!("disk cache: {}: {e}; serving {label} uncached", tmp.display());
            return Ok(None);
        }
        let start = Instant::now();
        let leaves = match fill(&file) {
            Ok(leaves) => leaves,
            Err(e) => {
                unreserve();
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        tracing::info!(
            bytes = len,
            secs = format!("{:.3}", start.elapsed().as_secs_f64()),
            "disk cache: {verb} {label} ({})",
            key.hex()
        );
        let reader = match File::open(&tmp) {
            Ok(f) => f,
            Err(e) => {
                unreserve();
                let _ = std::fs::remove_file(&tmp);
                tracing::error!("disk cache: reopening {}: {e}; serving {label} uncached", tmp.display());
                return Ok(None);
            }
        };
        self.lock().stats.fills += 1;
        Ok(Some((
            Arc::new(Cached { file: reader, path: self.dir.join(key.hex()), len }),
            Some(Filled { file, tmp, leaves }),
        )))
    }

    /// Is the committed entry still what was committed? The open file if so.
    fn check(&self, key: &Key, meta: &Meta, len: u64) -> Result<Cached, String> {
        let path = self.dir.join(key.hex());
        let file = File::open(&path).map_err(|e| format!("cannot open: {e}"))?;
        let st = file.metadata().map_err(|e| e.to_string())?;
        if meta.len != len || st.len() != len {
            return Err(format!("length {} where {len} was expected", st.len()));
        }
        if st.ino() != meta.ino || ctime_ns(&st) != meta.ctime_ns {
            return Err("changed since it was committed (inode or ctime)".into());
        }
        let checked = self.lock().verified.contains(key);
        if self.verify == Verify::Full && !checked {
            if !valid_ends(&meta.leaves, len) {
                return Err("its sidecar's hash leaves do not tile the file".into());
            }
            let hash = hash_leaves(&file, &leaf_ends(len, &meta.leaves), true)
                .map_err(|e| format!("reading it: {e}"))?;
            if hash != meta.hash {
                return Err("content hash differs".into());
            }
            self.lock().verified.insert(*key);
        }
        Ok(Cached { file, path, len })
    }

    /// Record a use: LRU order here, and the sidecar's mtime for the next process.
    fn touch(&self, key: &Key) {
        if let Ok(f) = File::options().write(true).open(self.dir.join(format!("{}.meta", key.hex()))) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    fn commit_in_background(self: &Arc<Self>, key: Key, len: u64, label: String, filled: Filled, slot: Slot) {
        *self.pending.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let this = self.clone();
        let pending = self.pending.clone();
        std::thread::spawn(move || {
            let Filled { file, tmp, leaves } = filled;
            let result = this.commit(&key, len, &label, &file, &tmp, leaves);
            let mut st = this.lock();
            match result {
                Ok(meta) => {
                    st.entries.put(key, meta);
                    st.verified.insert(key);
                }
                Err(e) => {
                    tracing::error!("disk cache: committing {label}: {e}; it will be decoded again");
                    st.used -= blocks(len);
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            if st.slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                st.slots.remove(&key);
            }
            drop(st);
            drop(this);
            *pending.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            pending.1.notify_all();
        });
    }

    /// Wait until a background commit ends (false: none is running).
    fn wait_for_a_commit(&self) -> bool {
        let pending = self.pending.0.lock().unwrap_or_else(|e| e.into_inner());
        if *pending == 0 {
            return false;
        }
        drop(self.pending.1.wait(pending));
        true
    }

    /// Wait until every background commit has finished (before unmounting, so that what was
    /// decoded survives the daemon).
    pub fn flush(&self) {
        let mut pending = self.pending.0.lock().unwrap_or_else(|e| e.into_inner());
        while *pending > 0 {
            pending = self.pending.1.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Remove least recently used entries until `need` more bytes fit (never `keep`).
    fn evict_until(&self, st: &mut State, need: u64, keep: Option<&Key>) {
        while st.used + need > self.capacity {
            let victim = st.entries.iter().rev().map(|(k, _)| *k).find(|k| Some(k) != keep);
            let Some(victim) = victim else { break };
            let label = st.entries.peek(&victim).map(|m| m.label.clone()).unwrap_or_default();
            tracing::info!("disk cache: evicting {label} ({})", victim.hex());
            st.stats.evictions += 1;
            self.remove(st, &victim);
        }
    }

    /// Drop a committed entry: its sidecar first, so a crash midway leaves only garbage.
    fn remove(&self, st: &mut State, key: &Key) {
        if let Some(meta) = st.entries.pop(key) {
            st.used -= blocks(meta.len);
        }
        st.verified.remove(key);
        let _ = std::fs::remove_file(self.dir.join(format!("{}.meta", key.hex())));
        let _ = std::fs::remove_file(self.dir.join(key.hex()));
    }
}

impl DiskCache {
    /// Hash, fsync, rename into place, then write the sidecar that commits the entry.
    fn commit(
        &self,
        key: &Key,
        len: u64,
        label: &str,
        file: &File,
        tmp: &Path,
        leaves: Vec<Leaf>,
    ) -> Result<Meta, String> {
        // On this thread alone, at the lowest priority: a reader is loading what was just
        // decoded, and the next file may be decoding on the pool. (At nice 10 the hash still
        // took 8% of a 2-core first load's CPU, on its critical path; at 19 it gets 1.5% of a
        // busy core, and the rest when the load is done, before the unmount that waits for it.)
        // SAFETY: setpriority on this thread (a Linux thread id is a process id for it).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        let (hash, leaves) = match tile(leaves, len) {
            // The fill's own leaves, and the gaps between them read back (a safetensors header's
            // padding, say: a few bytes).
            Some(tiling) => (
                combine(file, len, &tiling).map_err(|e| format!("hashing: {e}"))?,
                tiling.iter().map(|(end, _)| *end).collect(),
            ),
            None => {
                (hash_leaves(file, &leaf_ends(len, &[]), false).map_err(|e| format!("hashing: {e}"))?, vec![])
            }
        };
        file.sync_all().map_err(|e| format!("fsync: {e}"))?;
        let data = self.dir.join(key.hex());
        std::fs::rename(tmp, &data).map_err(|e| format!("rename: {e}"))?;
        // After the rename, which changes the ctime on Linux filesystems.
        let st = std::fs::metadata(&data).map_err(|e| e.to_string())?;
        let meta = Meta {
            format: FORMAT,
            len,
            hash,
            leaves,
            ino: st.ino(),
            ctime_ns: ctime_ns(&st),
            label: label.to_owned(),
        };
        let side_tmp = self.dir.join("tmp").join(format!("{}.meta", key.hex()));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&side_tmp)
            .map_err(|e| e.to_string())?;
        f.write_all(&serde_json::to_vec(&meta).expect("a sidecar serializes")).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&side_tmp, self.dir.join(format!("{}.meta", key.hex())))
            .map_err(|e| e.to_string())?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())?;
        Ok(meta)
    }
}

/// BLAKE3 over the file's length and the hashes of its [`HASH_PIECE`]-byte pieces, hashed in
/// parallel on the rayon pool (a plain BLAKE3 of the whole file would run on one core).
pub fn content_hash(file: &File, len: u64) -> std::io::Result<String> {
    hash_leaves(file, &leaf_ends(len, &[]), true)
}

/// Where the leaves of a `len`-byte file's hash end: `recorded` (a sidecar's), else every
/// [`HASH_PIECE`] bytes.
fn leaf_ends(len: u64, recorded: &[u64]) -> Vec<u64> {
    if !recorded.is_empty() {
        return recorded.to_vec();
    }
    (1..=len.div_ceil(HASH_PIECE)).map(|i| (i * HASH_PIECE).min(len)).collect()
}

/// Recorded leaf ends (a sidecar's) that can be checked: none, or increasing to `len`, each
/// leaf small enough to read into scratch memory.
fn valid_ends(ends: &[u64], len: u64) -> bool {
    let mut at = 0;
    for &end in ends {
        if end <= at || end - at > LARGEST_LEAF {
            return false;
        }
        at = end;
    }
    ends.is_empty() || at == len
}

const LARGEST_LEAF: u64 = 64 << 20;

/// The root over the length and the leaves' hashes (the one formula for every leaf layout).
fn root(len: u64, leaves: &[[u8; 32]]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&len.to_le_bytes());
    for leaf in leaves {
        h.update(leaf);
    }
    h.finalize().to_hex().to_string()
}

/// The content hash with leaves ending at `ends`, reading the file (on the rayon pool, or with
/// `parallel` false on this thread).
fn hash_leaves(file: &File, ends: &[u64], parallel: bool) -> std::io::Result<String> {
    let leaf = |i: usize| {
        let at = if i == 0 { 0 } else { ends[i - 1] };
        with_scratch((ends[i] - at) as usize, |buf| {
            file.read_exact_at(buf, at)?;
            Ok(*blake3::hash(buf).as_bytes())
        })
    };
    let leaves: Vec<[u8; 32]> = if parallel {
        (0..ends.len()).into_par_iter().map(leaf).collect::<std::io::Result<_>>()?
    } else {
        (0..ends.len()).map(leaf).collect::<std::io::Result<_>>()?
    };
    Ok(root(ends.last().copied().unwrap_or(0), &leaves))
}

/// A fill's leaves laid end to end over `0..len`, gaps becoming leaves of their own (split at
/// [`HASH_PIECE`]): the ends of the whole tiling, with each given leaf's hash, or None when
/// there are none, they overlap, pass the end or one is too large to check in scratch memory.
fn tile(mut leaves: Vec<Leaf>, len: u64) -> Option<Vec<(u64, Option<[u8; 32]>)>> {
    if leaves.is_empty() {
        return None;
    }
    leaves.retain(|l| l.len > 0);
    leaves.sort_by_key(|l| l.start);
    let mut ends = vec![];
    let mut at = 0;
    let gap_to = |to: u64, ends: &mut Vec<(u64, Option<[u8; 32]>)>, at: &mut u64| {
        while *at < to {
            *at = (*at + HASH_PIECE).min(to);
            ends.push((*at, None));
        }
    };
    for l in &leaves {
        if l.start < at || l.start + l.len > len || l.len > LARGEST_LEAF {
            return None;
        }
        gap_to(l.start, &mut ends, &mut at);
        at = l.start + l.len;
        ends.push((at, Some(l.hash)));
    }
    gap_to(len, &mut ends, &mut at);
    Some(ends)
}

/// The content hash from a tiling ([`tile`]): given leaves as they are, gaps read from the file.
fn combine(file: &File, len: u64, tiling: &[(u64, Option<[u8; 32]>)]) -> std::io::Result<String> {
    let mut hashes = Vec::with_capacity(tiling.len());
    let mut at = 0;
    for &(end, hash) in tiling {
        hashes.push(match hash {
            Some(h) => h,
            None => with_scratch((end - at) as usize, |buf| {
                file.read_exact_at(buf, at)?;
                Ok::<_, std::io::Error>(*blake3::hash(buf).as_bytes())
            })?,
        });
        at = end;
    }
    Ok(root(len, &hashes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        KeyBuilder::new("test").part(&[n]).finish()
    }

    fn fill_with(byte: u8) -> impl FnOnce(&File) -> Result<Vec<Leaf>, String> {
        move |f: &File| {
            let len = f.metadata().unwrap().len() as usize;
            f.write_all_at(&vec![byte; len], 0).map_err(|e| e.to_string())?;
            Ok(vec![])
        }
    }

    fn read_all(c: &Cached) -> Vec<u8> {
        let mut v = vec![0; c.len as usize];
        c.file.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn fills_once_commits_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
        let c = cache.get_or_fill(&key(1), 10_000, "one", fill_with(7)).unwrap().unwrap();
        assert_eq!(read_all(&c), vec![7; 10_000]);
        cache.flush();
        let again = cache.get_or_fill(&key(1), 10_000, "one", |_| panic!("filled twice")).unwrap().unwrap();
        assert_eq!(read_all(&again), vec![7; 10_000]);
        assert_eq!(cache.stats().fills, 1);
        drop(cache);
        let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
        let c = cache.get_or_fill(&key(1), 10_000, "one", |_| panic!("not kept")).unwrap().unwrap();
        assert_eq!(read_all(&c), vec![7; 10_000]);
    }

    #[test]
    fn stays_within_capacity_evicting_least_recent() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(DiskCache::open(dir.path(), 5 * (8192 + BLOCK), Verify::Stat).unwrap());
        for n in 0..10 {
            cache.get_or_fill(&key(n), 8192, "k", fill_with(n)).unwrap().unwrap();
            cache.flush();
            assert!(cache.stats().used_bytes <= cache.capacity());
            let on_disk: u64 =
                std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
            assert!(on_disk <= cache.capacity(), "{on_disk} bytes on disk");
        }
        assert_eq!(cache.stats().entries, 5);
        assert!(cache.get_or_fill(&key(1), 1 << 30, "huge", fill_with(0)).unwrap().is_none());
    }

    #[test]
    fn a_changed_or_truncated_entry_is_filled_again() {
        for (verify, damage) in [(Verify::Full, "flip"), (Verify::Stat, "flip"), (Verify::Stat, "truncate")] {
            let dir = tempfile::tempdir().unwrap();
            {
                let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, verify).unwrap());
                cache.get_or_fill(&key(3), 5000, "x", fill_with(3)).unwrap();
                cache.flush();
            }
            let data = dir.path().join(key(3).hex());
            let f = OpenOptions::new().write(true).open(&data).unwrap();
            match damage {
                "flip" => f.write_all_at(&[4], 4000).unwrap(),
                _ => f.set_len(4000).unwrap(),
            }
            let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, verify).unwrap());
            let c = cache.get_or_fill(&key(3), 5000, "x", fill_with(3)).unwrap().unwrap();
            assert_eq!(read_all(&c), vec![3; 5000], "{verify:?} {damage}");
            assert_eq!(cache.stats().rejected + cache.stats().fills, 2 - (damage == "truncate") as u64);
        }
    }

    #[test]
    fn content_damaged_below_the_filesystem_is_caught_by_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
            cache.get_or_fill(&key(5), 5000, "x", fill_with(5)).unwrap();
            cache.flush();
        }
        // Same length, inode and ctime, other bytes: what only the hash can see.
        let meta_path = dir.path().join(format!("{}.meta", key(5).hex()));
        let mut meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
        meta.hash = "0".repeat(64);
        std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
        let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
        cache.get_or_fill(&key(5), 5000, "x", fill_with(5)).unwrap().unwrap();
        assert_eq!((cache.stats().rejected, cache.stats().fills), (1, 1));
    }

    #[test]
    fn concurrent_callers_share_one_fill_and_failures_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
        let fills = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, fills) = (cache.clone(), fills.clone());
                std::thread::spawn(move || {
                    let c = cache
                        .get_or_fill(&key(9), 3000, "x", |f| {
                            fills.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            fill_with(9)(f)
                        })
                        .unwrap()
                        .unwrap();
                    read_all(&c)
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), vec![9; 3000]);
        }
        assert_eq!(fills.load(Ordering::SeqCst), 1);
        assert!(cache.get_or_fill(&key(10), 100, "bad", |_| Err("boom".into())).is_err());
        let c = cache.get_or_fill(&key(10), 100, "bad", fill_with(1)).unwrap().unwrap();
        assert_eq!(read_all(&c), vec![1; 100]);
    }

    #[test]
    fn crash_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp").join("half-written"), b"x").unwrap();
        // Data renamed into place, its sidecar never written.
        std::fs::write(dir.path().join(key(2).hex()), b"uncommitted").unwrap();
        let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
        assert_eq!(cache.stats().entries, 0);
        assert!(!dir.path().join(key(2).hex()).exists());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        match DiskCache::open(dir.path(), 1 << 20, Verify::Full) {
            Err(DiskCacheError::Locked { holder, .. }) => assert_eq!(holder, ""),
            _ => panic!("a second open of a held directory"),
        }
        cache.set_holder("the test");
        match DiskCache::open(dir.path(), 1 << 20, Verify::Full) {
            Err(e @ DiskCacheError::Locked { .. }) => {
                assert!(e.to_string().ends_with("in use by the test"), "{e}")
            }
            _ => panic!("a second open of a held directory"),
        }
        drop(cache);
        let cache = DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap();
        assert_eq!(std::fs::read(dir.path().join("lock")).unwrap(), b"", "{:?}", cache.dir());
    }

    /// A fill that hashes its own pieces (some of them, out of order, with gaps between them)
    /// commits the same hash the file's bytes give with those leaves: a full check passes after
    /// a restart, and catches a byte changed below the filesystem in a gap or in a piece. Leaves
    /// that overlap are not trusted: the commit hashes the file itself.
    #[test]
    fn leaves_from_the_fill_commit_a_hash_the_check_agrees_with() {
        let content: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
        let leaves_of = |ranges: &[(usize, usize)]| -> Vec<Leaf> {
            ranges.iter().map(|&(a, b)| Leaf::of(a as u64, &content[a..b])).collect()
        };
        let cases: [(&[(usize, usize)], bool); 2] =
            [(&[(50_000, 100_000), (0, 10), (20, 50_000)], true), (&[(0, 60_000), (50_000, 100_000)], false)];
        for (n, (ranges, trusted)) in cases.into_iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            {
                let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
                let c = cache
                    .get_or_fill(&key(n as u8), content.len() as u64, "x", |f| {
                        f.write_all_at(&content, 0).map_err(|e| e.to_string())?;
                        Ok(leaves_of(ranges))
                    })
                    .unwrap()
                    .unwrap();
                assert_eq!(read_all(&c), content);
                cache.flush();
            }
            let meta_path = dir.path().join(format!("{}.meta", key(n as u8).hex()));
            let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
            assert_eq!(!meta.leaves.is_empty(), trusted, "case {n}: {:?}", meta.leaves);
            if trusted {
                // The given leaves and the gaps before them (10..20 is one).
                assert_eq!(meta.leaves, vec![10, 20, 50_000, 100_000]);
            }
            let reopen = || Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
            let cache = reopen();
            let c =
                cache.get_or_fill(&key(n as u8), content.len() as u64, "x", |_| panic!("not kept")).unwrap();
            assert_eq!(read_all(&c.unwrap()), content);
            drop(cache);
            // A byte changed in a gap, then in a leaf, with the inode and ctime kept: only the
            // hash sees it (filled again the same way after each).
            for at in [15u64, 70_000] {
                let meta_before = std::fs::read(&meta_path).unwrap();
                let data = dir.path().join(key(n as u8).hex());
                let st = std::fs::metadata(&data).unwrap();
                let mut m: Meta = serde_json::from_slice(&meta_before).unwrap();
                let f = OpenOptions::new().write(true).open(&data).unwrap();
                f.write_all_at(&[content[at as usize] ^ 1], at).unwrap();
                drop(f);
                m.ctime_ns = ctime_ns(&std::fs::metadata(&data).unwrap());
                assert_eq!(m.ino, st.ino());
                std::fs::write(&meta_path, serde_json::to_vec(&m).unwrap()).unwrap();
                let cache = reopen();
                let c = cache.get_or_fill(&key(n as u8), content.len() as u64, "x", |f| {
                    f.write_all_at(&content, 0).map_err(|e| e.to_string())?;
                    Ok(leaves_of(ranges))
                });
                assert_eq!(read_all(&c.unwrap().unwrap()), content);
                assert_eq!((cache.stats().rejected, cache.stats().fills), (1, 1), "case {n}, byte {at}");
                cache.flush();
            }
        }
    }
}

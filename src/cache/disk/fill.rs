//! Looking an entry up and filling it: [`DiskCache::get_or_fill`] resolves a key once however
//! many callers ask (single flight, through the key's slot), serves a committed entry after its
//! check (length, inode, ctime, and with [`Verify::Full`] the content hash once per process) or
//! reserves room, has the caller fill a temporary file and hands it out before the commit.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::hash::{hash_leaves, leaf_ends, valid_ends};
use super::{blocks, ctime_ns, Cached, DiskCache, Filled, Key, Leaf, Meta, Slot, Verify, Written};

impl DiskCache {
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
        self.get_or_fill_written(key, len, label, verb, |f| {
            fill(f).map(|leaves| Written { leaves, refold: false })
        })
    }

    /// [`DiskCache::get_or_fill_as`] with a fill that also says how it wrote the file
    /// ([`Written`]).
    pub fn get_or_fill_written(
        self: &Arc<Self>,
        key: &Key,
        len: u64,
        label: &str,
        verb: &str,
        fill: impl FnOnce(&File) -> Result<Written, String>,
    ) -> Result<Option<Arc<Cached>>, String> {
        let slot = self.lock().slots.entry(*key).or_default().clone();
        // Filled further up this thread's stack (see `Filling`): served without the cache.
        let Some(_filling) = crate::cache::Filling::enter(&slot) else { return Ok(None) };
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
        fill: impl FnOnce(&File) -> Result<Written, String>,
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
        fill: impl FnOnce(&File) -> Result<Written, String>,
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
        let written = match fill(&file) {
            Ok(written) => written,
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
            Some(Filled { file, tmp, written }),
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
            let hash =
                hash_leaves(&file, &leaf_ends(len, &meta.leaves)).map_err(|e| format!("reading it: {e}"))?;
            if hash != meta.hash {
                return Err("content hash differs".into());
            }
            self.lock().verified.insert(*key);
        }
        Ok(Cached { file, path, len })
    }
}

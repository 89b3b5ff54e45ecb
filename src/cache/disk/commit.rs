//! Committing a fill, on a background thread so the first reader does not wait on the disk:
//! hash the content (from the fill's leaves where it gave them), fsync, rename into place, then
//! write the sidecar that commits the entry (fsynced, renamed, directory fsynced), in that
//! order so a crash at any point leaves a committed entry or garbage the next open sweeps.
//! [`DiskCache::flush`] waits for the commits in flight.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::hash::{combine, leaf_ends, tile};
use super::spare_core::SpareCore;
use super::{blocks, ctime_ns, DiskCache, Filled, Key, Meta, Slot, Written, FORMAT};

impl DiskCache {
    pub(super) fn commit_in_background(
        self: &Arc<Self>,
        key: Key,
        len: u64,
        label: String,
        filled: Filled,
        slot: Slot,
    ) {
        *self.pending.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let this = self.clone();
        let pending = self.pending.clone();
        let (label2, tmp2, slot2) = (label.clone(), filled.tmp.clone(), slot.clone());
        let spawned = std::thread::Builder::new().name("llmfs-commit".into()).spawn(move || {
            let Filled { file, tmp, written } = filled;
            let result = this.commit(&key, len, &label, &file, &tmp, written);
            this.end_commit(key, len, &label, result, &tmp, &slot);
            drop(this);
            *pending.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            pending.1.notify_all();
        });
        if let Err(e) = spawned {
            // The closure (with the fill's file) is gone: end the commit as a failed one, so the
            // fill is decoded again and nobody waits for it.
            self.end_commit(key, len, &label2, Err(format!("no thread for it: {e}")), &tmp2, &slot2);
            *self.pending.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            self.pending.1.notify_all();
        }
    }

    /// Record a commit's outcome: the entry, or (failed) its room given back and its file
    /// removed; either way its slot let go, so later callers resolve the key afresh.
    fn end_commit(
        &self,
        key: Key,
        len: u64,
        label: &str,
        result: Result<Meta, String>,
        tmp: &Path,
        slot: &Slot,
    ) {
        let mut st = self.lock();
        match result {
            Ok(meta) => {
                st.entries.put(key, meta);
                st.verified.insert(key);
            }
            Err(e) => {
                tracing::error!("disk cache: committing {label}: {e}; it will be decoded again");
                st.used -= blocks(len);
                let _ = std::fs::remove_file(tmp);
            }
        }
        if st.slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            st.slots.remove(&key);
        }
    }

    /// Wait until a background commit ends (false: none is running).
    pub(super) fn wait_for_a_commit(&self) -> bool {
        let pending = self.pending.0.lock().unwrap_or_else(|e| e.into_inner());
        if *pending == 0 {
            return false;
        }
        let _hurry = Hurry::new(&self.hurried);
        drop(self.pending.1.wait(pending));
        true
    }

    /// Wait until every background commit has finished (before unmounting, so that what was
    /// decoded survives the daemon).
    pub fn flush(&self) {
        let _hurry = Hurry::new(&self.hurried);
        let mut pending = self.pending.0.lock().unwrap_or_else(|e| e.into_inner());
        while *pending > 0 {
            pending = self.pending.1.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Hash, fsync, rename into place, then write the sidecar that commits the entry.
    fn commit(
        &self,
        key: &Key,
        len: u64,
        label: &str,
        file: &File,
        tmp: &Path,
        written: Written,
    ) -> Result<Meta, String> {
        let Written { leaves, refold: refold_it } = written;
        // On this thread alone, at the lowest priority: a reader is loading what was just
        // decoded, and the next file may be decoding on the pool. (At nice 10 the hash still
        // took 8% of a 2-core first load's CPU, on its critical path; at 19 it gets 1.5% of a
        // busy core, and the rest when the load is done, before the unmount that waits for it.)
        // SAFETY: setpriority on this thread (a Linux thread id is a process id for it).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        // What the fill gave no leaves for is read back, one leaf at a time, each once a core is
        // spare: with autogroup scheduling nice 19 does not keep this thread off the loader's
        // cores (see spare_core.rs).
        let mut spare = SpareCore::new();
        let mut pace = || spare.wait(|| self.hurried.load(Ordering::Relaxed) > 0);
        let (hash, leaves) = match tile(leaves, len) {
            // The fill's own leaves, and the gaps between them read back (a safetensors header's
            // padding, say: a few bytes).
            Some(tiling) => (
                combine(file, len, &tiling, &mut pace).map_err(|e| format!("hashing: {e}"))?,
                tiling.iter().map(|(end, _)| *end).collect(),
            ),
            None => {
                let tiling: Vec<_> = leaf_ends(len, &[]).into_iter().map(|end| (end, None)).collect();
                (combine(file, len, &tiling, &mut pace).map_err(|e| format!("hashing: {e}"))?, vec![])
            }
        };
        file.sync_all().map_err(|e| format!("fsync: {e}"))?;
        if refold_it {
            refold(file, len, &mut pace);
        }
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

/// Bytes of one span of [`refold`]: the size of a folio a mapping takes with one page-table
/// entry on x86-64.
const SPAN: u64 = 2 << 20;

/// Rewrite each whole 2 MiB span of a file just fsynced so the page cache holds it in 2 MiB
/// folios: read the span, drop its clean pages, write it back whole. A file filled in pieces
/// that start at a tensor's offset (fills by `pwrite` where the host takes back free 2 MiB
/// blocks, `vfs::decoded::pwrite`) is held in small folios, which a loader's mapping after a
/// remount faults in page by page: a 562 MB file so written was touched in 10.4 ms and read at
/// 13.0 GB/s through a mapping, and in 3.3 ms and at 16.6 GB/s once re-folded (0 % to 100 %
/// `FilePmdMapped`; the rewrite took 0.17 s here, after the commit's fsync). The bytes are the
/// same, already on disk: a span a reader has mapped keeps its pages (the drop skips mapped
/// pages), one read meanwhile comes from the disk, and a failed step leaves the span as it was
/// or rewritten with the same bytes, so errors are only logged. The file is dirty again after
/// (a second writeback of the same bytes); the fsynced copy is what commits it.
fn refold(file: &File, len: u64, pace: &mut impl FnMut()) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; SPAN as usize];
    let mut start = 0;
    while start + SPAN <= len {
        pace();
        if let Err(e) = file.read_exact_at(&mut buf, start) {
            tracing::warn!("disk cache: re-folding at {start}: {e}");
            return;
        }
        // SAFETY: posix_fadvise on a descriptor we own; it only drops clean, unmapped pages.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                start as libc::off_t,
                SPAN as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        if let Err(e) = file.write_all_at(&buf, start) {
            tracing::warn!("disk cache: re-folding at {start}: {e}");
            return;
        }
        start += SPAN;
    }
}

/// One caller waiting for commits, counted in [`DiskCache`]'s `hurried` while it lives.
struct Hurry<'a>(&'a AtomicUsize);

impl<'a> Hurry<'a> {
    fn new(count: &'a AtomicUsize) -> Hurry<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Hurry(count)
    }
}

impl Drop for Hurry<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

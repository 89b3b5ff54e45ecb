//! The memory tier of whole decoded files, bounded in bytes, in front of the disk tier
//! ([`super::disk`]).
//!
//! Why: a fill written into one file by `pwrite` goes at one writer's pace however many threads
//! write, because the filesystem takes the file's inode lock for every buffered write (issue 13:
//! 16 threads filled one ext4 or tmpfs file at 4.7-6.6 GB/s by `pwrite`, and `fill_bench`
//! filled a tmpfs file at 23-41 GB/s through a shared mapping, whose page faults take no such
//! lock). So a file is decoded straight into a shared mapping of a memfd (shmem: no disk, no
//! writeback, huge pages where the kernel gives shmem any), every pool thread writing its own
//! pieces in place, with no copy through scratch memory. Once complete the memfd is sealed
//! against any change (`F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK`) and handed out: FUSE
//! passthrough takes it as a backing file like any other regular file. The caller then writes
//! it to the disk tier behind the reader (a plain commit there: crash safe, hashed, checked
//! when served later) and marks it [`MemoryCache::persisted`]: only then may it be evicted.
//!
//! Bounded: entries and fills in progress count their length (rounded up to 2 MiB, the huge
//! page) against the capacity; before a fill the least recently used persisted entries are
//! dropped until it fits, and when it cannot fit (the tier is full of fills in progress or of
//! entries not yet written to disk) the caller fills the disk tier directly. A dropped entry
//! still open (a passthrough backing file, a handle) keeps its pages until closed, as an
//! unlinked file keeps its blocks: what the tier holds stays within the capacity.
//!
//! Single flight: concurrent callers for one key wait on the first one's fill. A fill's error
//! is returned to each waiting caller and not kept. Nothing here is verified against anything:
//! the bytes were decoded by this process and sealed; a crash loses the tier, whose entries the
//! disk tier either committed whole or never did.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use lru::LruCache;

use super::disk::Key;

const UNIT: u64 = 2 << 20;

fn footprint(len: u64) -> u64 {
    len.div_ceil(UNIT).max(1) * UNIT
}

/// A decoded file in memory: a sealed memfd of `len` bytes.
#[derive(Debug)]
pub struct MemFile {
    pub file: File,
    pub len: u64,
    persisted: AtomicBool,
}

/// Counters for logs, tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub entries: usize,
    pub used_bytes: u64,
    pub fills: u64,
    pub hits: u64,
    pub evictions: u64,
    /// Fills that found no room and went to the disk tier.
    pub full: u64,
}

type Slot = Arc<OnceLock<Result<Option<Arc<MemFile>>, String>>>;

struct State {
    entries: LruCache<Key, Arc<MemFile>>,
    /// Footprints of entries and of fills in progress.
    used: u64,
    slots: HashMap<Key, Slot>,
    stats: MemoryStats,
}

pub struct MemoryCache {
    capacity: u64,
    state: Mutex<State>,
    /// Entries not yet persisted, and a signal when one is (for [`MemoryCache::flush`]).
    pending: (Mutex<usize>, Condvar),
}

impl MemoryCache {
    pub fn new(capacity: u64) -> MemoryCache {
        MemoryCache {
            capacity,
            state: Mutex::new(State {
                entries: LruCache::unbounded(),
                used: 0,
                slots: HashMap::new(),
                stats: MemoryStats::default(),
            }),
            pending: (Mutex::new(0), Condvar::new()),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> MemoryStats {
        let st = self.lock();
        MemoryStats { entries: st.entries.len(), used_bytes: st.used, ..st.stats }
    }

    /// The entry for `key`, if the tier holds it (a use, for the LRU order).
    pub fn get(&self, key: &Key) -> Option<Arc<MemFile>> {
        let mut st = self.lock();
        let hit = st.entries.get(key).cloned();
        if hit.is_some() {
            st.stats.hits += 1;
        }
        hit
    }

    /// The entry for `key` (`len` bytes), filled now with `fill` if the tier lacks it; and
    /// whether this call filled it (the caller then persists it, and calls
    /// [`MemoryCache::persisted`]). `fill` gets the file's bytes (a shared mapping of fresh,
    /// zeroed memory) and must write every byte; it may give back the pages it has written
    /// through the [`WrittenPages`] (their bytes stay in the memfd). `Ok(None)`: no room (or no memfd), the caller
    /// uses the disk tier.
    pub fn get_or_fill(
        &self,
        key: &Key,
        len: u64,
        label: &str,
        fill: impl FnOnce(&mut [u8], WrittenPages<'_>) -> Result<(), String>,
    ) -> Result<Option<(Arc<MemFile>, bool)>, String> {
        if let Some(hit) = self.get(key) {
            return Ok(Some((hit, false)));
        }
        let slot = self.lock().slots.entry(*key).or_default().clone();
        // Filled further up this thread's stack (see `Filling`): the disk tier serves it.
        let Some(_filling) = super::Filling::enter(&slot) else { return Ok(None) };
        let mut filled = false;
        let result = slot
            .get_or_init(|| {
                let r = self.fill(key, len, label, fill);
                filled = matches!(r, Ok(Some(_)));
                r
            })
            .clone();
        let mut st = self.lock();
        if st.slots.get(key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            st.slots.remove(key);
        }
        Ok(result?.map(|m| (m, filled)))
    }

    fn fill(
        &self,
        key: &Key,
        len: u64,
        label: &str,
        fill: impl FnOnce(&mut [u8], WrittenPages<'_>) -> Result<(), String>,
    ) -> Result<Option<Arc<MemFile>>, String> {
        let need = footprint(len);
        {
            let mut st = self.lock();
            self.evict_until(&mut st, need);
            if st.used + need > self.capacity {
                st.stats.full += 1;
                tracing::info!("memory cache: no room for {label}; decoding it into the disk cache");
                return Ok(None);
            }
            st.used += need;
        }
        let unreserve = || self.lock().used -= need;
        let start = std::time::Instant::now();
        let made = match filled_memfd(label, len, fill) {
            Ok(Some(f)) => f,
            Ok(None) => {
                unreserve();
                return Ok(None);
            }
            Err(e) => {
                unreserve();
                return Err(e);
            }
        };
        tracing::info!(
            bytes = len,
            secs = format!("{:.3}", start.elapsed().as_secs_f64()),
            "memory cache: decoded {label} ({})",
            key.hex()
        );
        let entry = Arc::new(MemFile { file: made, len, persisted: AtomicBool::new(false) });
        *self.pending.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let mut st = self.lock();
        st.entries.put(*key, entry.clone());
        st.stats.fills += 1;
        Ok(Some(entry))
    }

    /// `key`'s entry has been written to the disk tier (or could not be, or there is none):
    /// it may now be evicted.
    pub fn persisted(&self, key: &Key) {
        let entry = self.lock().entries.peek(key).cloned();
        if let Some(e) = entry {
            if !e.persisted.swap(true, Ordering::SeqCst) {
                *self.pending.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                self.pending.1.notify_all();
            }
        }
    }

    /// Wait until every entry filled has been persisted (before unmounting).
    pub fn flush(&self) {
        let mut pending = self.pending.0.lock().unwrap_or_else(|e| e.into_inner());
        while *pending > 0 {
            pending = self.pending.1.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Drop least recently used persisted entries until `need` more bytes fit.
    fn evict_until(&self, st: &mut State, need: u64) {
        while st.used + need > self.capacity {
            let victim =
                st.entries.iter().rev().find(|(_, e)| e.persisted.load(Ordering::SeqCst)).map(|(k, _)| *k);
            let Some(victim) = victim else { break };
            if let Some(e) = st.entries.pop(&victim) {
                st.used -= footprint(e.len);
                st.stats.evictions += 1;
                tracing::info!("memory cache: evicting {} (in the disk cache)", victim.hex());
            }
        }
    }
}

/// A sealed memfd of `len` bytes written by `fill` through one shared mapping; None (logged)
/// where the kernel gives no memfd or mapping.
fn filled_memfd(
    label: &str,
    len: u64,
    fill: impl FnOnce(&mut [u8], WrittenPages<'_>) -> Result<(), String>,
) -> Result<Option<File>, String> {
    let name = std::ffi::CString::new(format!("llmfs:{label}").replace('\0', "")).expect("no NUL");
    // SAFETY: memfd_create reads a NUL-terminated name; the descriptor is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        tracing::warn!("memory cache: memfd_create: {}", std::io::Error::last_os_error());
        return Ok(None);
    }
    // SAFETY: a descriptor just returned to us, owned by the File from here on.
    let file = unsafe { File::from_raw_fd(fd) };
    if let Err(e) = file.set_len(len) {
        tracing::warn!("memory cache: sizing a memfd of {len} bytes: {e}");
        return Ok(None);
    }
    if len > 0 {
        let Some(mut map) = SharedMap::new(&file, len as usize) else { return Ok(None) };
        let (bytes, written) = map.split();
        fill(bytes, written)?;
    }
    // Sealed: no write, no resize, ever (the mapping is gone, which F_SEAL_WRITE requires).
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(format!("sealing the memfd: {}", std::io::Error::last_os_error()));
    }
    Ok(Some(file))
}

/// A shared, writable mapping of a whole file, unmapped on drop: how a fill writes a memfd here,
/// and a disk-cache file where many threads fill it (`vfs::decoded`).
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

impl SharedMap {
    /// `file` (opened for reading and writing, `len` bytes long, and ours alone while mapped)
    /// mapped whole; None (logged) where the kernel maps none.
    pub fn new(file: &File, len: usize) -> Option<SharedMap> {
        // SAFETY: a fresh shared mapping of a file the caller owns, `len` bytes long (its size);
        // nothing else writes or resizes the file while it is mapped (callers' contract).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            tracing::warn!("mmap of a {len}-byte cache file: {}", std::io::Error::last_os_error());
            return None;
        }
        // Huge pages where the kernel gives shmem any (shmem_enabled advise or always): one fault
        // per 2 MiB instead of 512. Best effort.
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Some(SharedMap { ptr: ptr as *mut u8, len })
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The mapping's bytes, and the means to give back the pages of the ranges written.
    pub fn split(&mut self) -> (&mut [u8], WrittenPages<'_>) {
        let written = WrittenPages { ptr: self.ptr, len: self.len, _map: std::marker::PhantomData };
        (self.bytes(), written)
    }
}

/// Gives back this process's page-table entries of written ranges of a [`SharedMap`], keeping
/// their bytes: a filled file's pages are page cache (or shmem) that readers share, but while
/// they are mapped here they count in the daemon's RSS, so without this the daemon's peak RSS
/// grew by the size of every file it filled (6 GB for a 6 GB model, issue 23).
///
/// `MADV_DONTNEED` on a shared mapping drops the page-table entries only: a dirty page is marked
/// dirty in the page cache as its entry goes and is written back as any other, a memfd's (shmem)
/// page stays in the memfd, and a later touch maps the same page again (`release_keeps_the_bytes`
/// below checks both). Never `MADV_REMOVE`, which frees the file's pages, nor on a private
/// mapping, whose written pages `MADV_DONTNEED` would discard: hence only from a `SharedMap`.
#[derive(Clone, Copy)]
pub struct WrittenPages<'a> {
    ptr: *mut u8,
    len: usize,
    _map: std::marker::PhantomData<&'a mut SharedMap>,
}

// SAFETY: only passed to madvise, on ranges of the shared mapping it borrows; concurrent calls and
// concurrent writes to the same pages are safe (a write after the entry went faults the page in
// again; see the type's doc).
unsafe impl Send for WrittenPages<'_> {}
// SAFETY: as above.
unsafe impl Sync for WrittenPages<'_> {}

impl WrittenPages<'_> {
    /// Give back the pages of bytes `range` of the mapping, done with for now. The range is
    /// widened to whole pages: a page shared with a neighbouring range still being written by
    /// another thread loses its entry too, and that write maps it again (one page fault), no
    /// byte lost. Best effort: an error (none is expected) leaves the pages mapped.
    pub fn release(&self, range: std::ops::Range<usize>) {
        static PAGE: OnceLock<usize> = OnceLock::new();
        // SAFETY: sysconf has no preconditions.
        let page = *PAGE.get_or_init(|| (unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize).max(4096));
        let start = range.start / page * page;
        let end = range.end.min(self.len).div_ceil(page) * page;
        if start >= end {
            return;
        }
        // SAFETY: [start, end) lies within the mapping (mapped in whole pages from a page-aligned
        // address, `end` at most the page after its last byte), which outlives `self`; on a
        // shared mapping MADV_DONTNEED keeps the bytes (see the type's doc).
        unsafe { libc::madvise(self.ptr.add(start) as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn key(n: u8) -> Key {
        super::super::disk::KeyBuilder::new("test").part(&[n]).finish()
    }

    fn read_all(m: &MemFile) -> Vec<u8> {
        let mut v = vec![0; m.len as usize];
        m.file.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn fills_once_seals_and_stays_within_capacity() {
        let cache = MemoryCache::new(3 * UNIT);
        let (m, filled) = cache
            .get_or_fill(&key(1), 5000, "one", |b, _| {
                b.fill(7);
                Ok(())
            })
            .unwrap()
            .unwrap();
        assert!(filled);
        assert_eq!(read_all(&m), vec![7; 5000]);
        assert!(m.file.write_all_at(b"x", 0).is_err(), "a sealed memfd was written");
        let (again, filled) =
            cache.get_or_fill(&key(1), 5000, "one", |_, _| panic!("filled twice")).unwrap().unwrap();
        assert!(!filled && Arc::ptr_eq(&m, &again));
        // Two more fit; a fourth needs an eviction, which only a persisted entry allows.
        for n in 2..=3 {
            cache
                .get_or_fill(&key(n), UNIT, "x", |b, _| {
                    b.fill(n);
                    Ok(())
                })
                .unwrap()
                .unwrap();
        }
        assert!(cache.get_or_fill(&key(4), 10, "x", |_, _| Ok(())).unwrap().is_none(), "over the capacity");
        cache.persisted(&key(2));
        let (m4, _) = cache
            .get_or_fill(&key(4), 10, "x", |b, _| {
                b.fill(4);
                Ok(())
            })
            .unwrap()
            .unwrap();
        assert_eq!(read_all(&m4), vec![4; 10]);
        assert!(cache.get(&key(2)).is_none() && cache.get(&key(1)).is_some());
        assert!(cache.stats().used_bytes <= cache.capacity());
        for n in [1, 3, 4] {
            cache.persisted(&key(n));
        }
        cache.flush();
    }

    #[test]
    fn concurrent_callers_share_one_fill_and_failures_are_not_kept() {
        let cache = Arc::new(MemoryCache::new(64 * UNIT));
        let fills = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, fills) = (cache.clone(), fills.clone());
                std::thread::spawn(move || {
                    let (m, _) = cache
                        .get_or_fill(&key(9), 3 * UNIT, "x", |b, _| {
                            fills.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            b.fill(9);
                            Ok(())
                        })
                        .unwrap()
                        .unwrap();
                    read_all(&m) == vec![9; 3 * UNIT as usize]
                })
            })
            .collect();
        assert!(threads.into_iter().all(|t| t.join().unwrap()));
        assert_eq!(fills.load(Ordering::SeqCst), 1);
        assert!(cache.get_or_fill(&key(10), 100, "bad", |_, _| Err("boom".into())).is_err());
        assert_eq!(cache.stats().used_bytes, footprint(3 * UNIT), "a failed fill keeps its room");
        let (m, _) = cache
            .get_or_fill(&key(10), 100, "bad", |b, _| {
                b.fill(1);
                Ok(())
            })
            .unwrap()
            .unwrap();
        assert_eq!(read_all(&m), vec![1; 100]);
    }

    /// Whether each of the `pages` pages from `ptr` is mapped in this process (the present bit
    /// of /proc/self/pagemap, readable without privileges).
    fn mapped_pages(ptr: *const u8, pages: usize) -> Vec<bool> {
        let page = 4096;
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut raw = vec![0u8; pages * 8];
        pagemap.read_exact_at(&mut raw, (ptr as u64 / page) * 8).unwrap();
        raw.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().unwrap()) >> 63 == 1).collect()
    }

    /// `WrittenPages::release` drops the pages' entries from this process and keeps their bytes,
    /// on a memfd (shmem: the memory tier) and on a file on disk (a disk-cache fill), where the
    /// bytes also reach the disk (written back after the entries went: still dirty).
    #[test]
    fn release_keeps_the_bytes() {
        assert_eq!(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }, 4096, "the test counts 4 KiB pages");
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::CString::new("llmfs-test").unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is the File's.
        let memfd = unsafe { File::from_raw_fd(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC)) };
        let on_disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let len = 64 * 4096 + 100;
        let pattern: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        for (what, file) in [("memfd", &memfd), ("file on disk", &on_disk)] {
            file.set_len(len as u64).unwrap();
            let mut map = SharedMap::new(file, len).unwrap();
            let (bytes, written) = map.split();
            bytes.copy_from_slice(&pattern);
            let ptr = bytes.as_ptr();
            assert!(mapped_pages(ptr, 65).iter().all(|m| *m), "{what}: written pages not mapped");
            // Bytes 10..(32 pages + 5): pages 0 to 32 (the range widened to whole pages) go.
            written.release(10..32 * 4096 + 5);
            let mapped = mapped_pages(ptr, 65);
            assert!(mapped[..33].iter().all(|m| !m) && mapped[33..].iter().all(|m| *m), "{what}: {mapped:?}");
            assert!(bytes[..] == pattern[..], "{what}: the mapping reads other bytes after a release");
            written.release(0..len);
            assert!(mapped_pages(ptr, 65).iter().all(|m| !m), "{what}: pages left mapped");
            drop(map);
            let mut back = vec![0; len];
            file.read_exact_at(&mut back, 0).unwrap();
            assert!(back == pattern, "{what}: the file lost bytes written before a release");
        }
        // From the disk, not the page cache: the released pages were still dirty.
        on_disk.sync_all().unwrap();
        // SAFETY: advice on a descriptor we own.
        unsafe { libc::posix_fadvise(on_disk.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut back = vec![0; len];
        on_disk.read_exact_at(&mut back, 0).unwrap();
        assert!(back == pattern, "the file on disk lost bytes written before a release");
    }
}

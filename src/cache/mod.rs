//! The LRU of decoded tensor chunks, bounded in bytes, with one decode per chunk however many
//! readers want it.
//!
//! Each key maps to a slot (`OnceLock`): the first reader to ask runs the decode inside
//! `get_or_init`, and every other reader of that chunk — a second FUSE thread, the prefetcher —
//! blocks on the same slot instead of decoding again. A slot's bytes are counted against the
//! budget when it is inserted (its size is known up front), and the least recently used slots are
//! dropped until the total is under budget again; readers still holding an evicted chunk keep
//! their `Arc` until they finish copying, so memory above the budget is bounded by the number of
//! in-flight reads times the chunk size. A failed decode is not cached: the next read retries.

pub mod disk;
pub mod memory;
pub mod objects;

use std::hash::Hash;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, OnceLock};

use lru::LruCache;

type Slot<E> = Arc<OnceLock<Result<Arc<ChunkBuf>, E>>>;

/// The memory of one decoded chunk. Chunks of 1 MiB and more get an anonymous mapping of their
/// own, 2 MiB-aligned and marked for transparent huge pages: a fresh heap chunk cost a memset
/// and 512 page faults, which profiling showed to be a third of the daemon's CPU on a first
/// read, where a huge page is one fault. The mappings of evicted 2 MiB chunks are kept (a few)
/// for the next decodes, which then pay neither faults nor zeroing. Smaller chunks (tensor
/// tails, norms) live on the heap.
pub struct ChunkBuf {
    mem: Mem,
}

enum Mem {
    Heap(Vec<u8>),
    /// `len` bytes in use at `ptr`, of a mapping of `map_len` bytes.
    Mapped {
        ptr: std::ptr::NonNull<u8>,
        len: usize,
        map_len: usize,
    },
}

// SAFETY: the mapping is owned by this value alone (like a Vec's buffer).
unsafe impl Send for ChunkBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for ChunkBuf {}

const HUGE_PAGE: usize = 2 << 20;

/// Huge-page mappings of dropped chunks, ready for reuse (addresses). Eight (16 MiB) cover a
/// sequential reader, which evicts about one chunk per chunk it decodes, and several at once.
static SPARE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
const MAX_SPARE: usize = 8;

impl ChunkBuf {
    /// `len` bytes for a decoder to fill. Their contents are unspecified (zeros, or the bytes
    /// of an evicted chunk): the decoder must write every byte, as it does into scratch memory.
    pub fn for_decode(len: usize) -> ChunkBuf {
        if Self::is_mapped(len) {
            if len.div_ceil(HUGE_PAGE) == 1 {
                if let Some(addr) = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                    let ptr = std::ptr::NonNull::new(addr as *mut u8).expect("a mapping's address");
                    return ChunkBuf { mem: Mem::Mapped { ptr, len, map_len: HUGE_PAGE } };
                }
            }
            if let Some(mem) = map_aligned(len) {
                return ChunkBuf { mem };
            }
        }
        ChunkBuf { mem: Mem::Heap(vec![0; len]) }
    }

    fn is_mapped(len: usize) -> bool {
        len >= HUGE_PAGE / 2
    }

    /// The memory a chunk of `len` bytes takes: a mapped one, whole huge pages.
    pub fn footprint(len: usize) -> u64 {
        (if Self::is_mapped(len) { len.div_ceil(HUGE_PAGE) * HUGE_PAGE } else { len }) as u64
    }
}

/// An anonymous mapping of `len` bytes rounded up to whole huge pages, starting on a huge-page
/// boundary (the kernel only backs aligned 2 MiB ranges with huge pages), advised for THP.
fn map_aligned(len: usize) -> Option<Mem> {
    let map_len = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a fresh anonymous mapping; map_len + HUGE_PAGE cannot overflow for chunk sizes.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), map_len + HUGE_PAGE, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    // SAFETY: both ranges lie inside the mapping just made, and nothing refers to them.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let tail = start + map_len + HUGE_PAGE - (aligned + map_len);
        if tail > 0 {
            libc::munmap((aligned + map_len) as *mut libc::c_void, tail);
        }
        // Advice only: without THP the mapping still works, with 4 KiB pages.
        libc::madvise(aligned as *mut libc::c_void, map_len, libc::MADV_HUGEPAGE);
    }
    Some(Mem::Mapped { ptr: std::ptr::NonNull::new(aligned as *mut u8)?, len, map_len })
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        if let Mem::Mapped { ptr, map_len, .. } = self.mem {
            if map_len == HUGE_PAGE {
                let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
                if spare.len() < MAX_SPARE {
                    spare.push(ptr.as_ptr() as usize);
                    return;
                }
            }
            // SAFETY: the mapping was made by map_aligned, and this value (or the spare list it
            // came from) was its only owner.
            unsafe { libc::munmap(ptr.as_ptr() as *mut libc::c_void, map_len) };
        }
    }
}

impl Deref for ChunkBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.mem {
            Mem::Heap(v) => v,
            // SAFETY: `len` bytes at `ptr` are mapped, initialized (zero or written) and owned.
            Mem::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) },
        }
    }
}

impl DerefMut for ChunkBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.mem {
            Mem::Heap(v) => v,
            // SAFETY: as in deref, and `&mut self` makes the access unique.
            Mem::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), *len) },
        }
    }
}

pub struct ChunkCache<K: Hash + Eq, E> {
    inner: Mutex<Inner<K, E>>,
    capacity: u64,
}

struct Inner<K: Hash + Eq, E> {
    slots: LruCache<K, (Slot<E>, u64)>,
    used: u64,
}

/// Counters for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub used_bytes: u64,
    pub chunks: usize,
}

thread_local! {
    /// The slots (by address) this thread is in the middle of filling or waiting on.
    static FILLING: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's mark on a single-flight slot while it fills it or waits for it. A rayon worker
/// that fills a slot and waits for its own pieces runs other jobs of its pool meanwhile, and one
/// of them can ask for that very slot: waiting on it then waits for itself forever (a reader hung
/// in CI this way). [`Filling::enter`] says so instead, and the caller does without the slot.
pub(crate) struct Filling(usize);

impl Filling {
    /// None when this thread is already filling `slot` further up its stack.
    pub(crate) fn enter<T>(slot: &Arc<T>) -> Option<Filling> {
        let id = Arc::as_ptr(slot) as *const () as usize;
        FILLING.with(|f| {
            let mut f = f.borrow_mut();
            if f.contains(&id) {
                return None;
            }
            f.push(id);
            Some(Filling(id))
        })
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        FILLING.with(|f| {
            let mut f = f.borrow_mut();
            if let Some(i) = f.iter().rposition(|x| *x == self.0) {
                f.swap_remove(i);
            }
        })
    }
}

impl<K: Hash + Eq + Clone, E: Clone> ChunkCache<K, E> {
    pub fn new(capacity_bytes: u64) -> Self {
        ChunkCache {
            inner: Mutex::new(Inner { slots: LruCache::unbounded(), used: 0 }),
            capacity: capacity_bytes,
        }
    }

    /// The chunk for `key`, decoding it with `decode` if no one has (or is doing so now).
    /// `decode` gets `size` bytes of unspecified contents and must write all of them. The
    /// memory the chunk takes is counted against the budget from the start.
    pub fn get_or_decode(
        &self,
        key: K,
        size: u64,
        decode: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Arc<ChunkBuf>, E> {
        let slot = self.slot(&key, size);
        let Some(_filling) = Filling::enter(&slot) else {
            // This thread is decoding this very chunk further up its stack: a copy of its own.
            let mut buf = ChunkBuf::for_decode(size as usize);
            return decode(&mut buf).map(|()| Arc::new(buf));
        };
        let result = slot
            .get_or_init(|| {
                let mut buf = ChunkBuf::for_decode(size as usize);
                decode(&mut buf).map(|()| Arc::new(buf))
            })
            .clone();
        if result.is_err() {
            self.forget(&key, &slot);
        }
        result
    }

    /// Drop `key`'s chunk (a sequential reader is done with it): its memory goes back for the
    /// next decode once the last reader holding it lets go. A decode in progress finishes for
    /// those waiting on it; later readers decode again.
    pub fn discard(&self, key: &K) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, size)) = inner.slots.pop(key) {
            inner.used -= size;
        }
    }

    /// Whether `key` is cached or being decoded (the prefetcher skips those).
    pub fn contains(&self, key: &K) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).slots.contains(key)
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        CacheStats { used_bytes: inner.used, chunks: inner.slots.len() }
    }

    fn slot(&self, key: &K, size: u64) -> Slot<E> {
        // A poisoned lock only means another reader panicked mid-update of plain counters: go on.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((slot, _)) = inner.slots.get(key) {
            return slot.clone();
        }
        let slot: Slot<E> = Arc::new(OnceLock::new());
        let size = ChunkBuf::footprint(size as usize);
        inner.slots.put(key.clone(), (slot.clone(), size));
        inner.used += size;
        while inner.used > self.capacity && inner.slots.len() > 1 {
            match inner.slots.pop_lru() {
                Some((_, (_, evicted))) => inner.used -= evicted,
                None => break,
            }
        }
        slot
    }

    fn forget(&self, key: &K, slot: &Slot<E>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.slots.peek(key).is_some_and(|(s, _)| Arc::ptr_eq(s, slot)) {
            if let Some((_, size)) = inner.slots.pop(key) {
                inner.used -= size;
            }
        }
    }
}

/// Run `f` with `len` bytes of this thread's scratch memory (contents unspecified: `f` writes
/// before it reads), reused across calls: a decode otherwise pays an allocation, zeroing and page
/// faults per chunk. The thread keeps a stack of buffers, so a nested call (a recipe over a
/// recipe, a second buffer, a rayon task run while waiting) gets one of its own, reused too.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut buf = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| s.borrow_mut().push(buf));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_thread_asking_for_the_chunk_it_is_decoding_gets_a_copy_not_a_deadlock() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cache: ChunkCache<u32, String> = ChunkCache::new(1 << 20);
            let got = cache.get_or_decode(7, 4, |outer| {
                // As a rayon worker would when it steals another reader's job for this chunk.
                let inner = cache.get_or_decode(7, 4, |b| {
                    b.copy_from_slice(b"abcd");
                    Ok(())
                })?;
                outer.copy_from_slice(&inner[..]);
                Ok(())
            });
            let _ = tx.send(got.map(|b| b.to_vec()));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("deadlocked on its own slot");
        assert_eq!(got.unwrap(), b"abcd");
    }

    #[test]
    fn stays_within_budget_and_evicts_least_recent() {
        let cache: ChunkCache<u32, ()> = ChunkCache::new(300);
        for k in 0..10 {
            cache
                .get_or_decode(k, 100, |b| {
                    b.fill(k as u8);
                    Ok(())
                })
                .unwrap();
            assert!(cache.stats().used_bytes <= 300);
        }
        assert!(cache.contains(&9) && cache.contains(&8) && !cache.contains(&0));
    }

    #[test]
    fn one_decode_however_many_readers() {
        let cache: Arc<ChunkCache<u32, ()>> = Arc::new(ChunkCache::new(1 << 20));
        let decodes = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, decodes) = (cache.clone(), decodes.clone());
                std::thread::spawn(move || {
                    cache
                        .get_or_decode(7, 4, |b| {
                            decodes.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            b.copy_from_slice(&[1, 2, 3, 4]);
                            Ok(())
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(&t.join().unwrap()[..], &[1, 2, 3, 4]);
        }
        assert_eq!(decodes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failures_are_not_cached() {
        let cache: ChunkCache<u32, String> = ChunkCache::new(1000);
        assert!(cache.get_or_decode(1, 10, |_| Err("boom".to_string())).is_err());
        assert_eq!(cache.stats(), CacheStats::default());
        let ok = cache.get_or_decode(1, 1, |b| {
            b[0] = 5;
            Ok(())
        });
        assert_eq!(&ok.unwrap()[..], &[5]);
    }

    #[test]
    fn nested_scratch_buffers_are_distinct_and_reused() {
        let addrs = || {
            with_scratch(100, |a| {
                a.fill(1);
                let inner = with_scratch(50, |b| {
                    b.fill(2);
                    b.as_ptr() as usize
                });
                assert!(a.iter().all(|&x| x == 1), "the nested call wrote into the outer buffer");
                (a.as_ptr() as usize, inner)
            })
        };
        let first = addrs();
        assert_ne!(first.0, first.1);
        assert_eq!(addrs(), first, "a second round should reuse both buffers");
    }

    #[test]
    fn chunk_buffers_are_writable_and_aligned_when_mapped() {
        for len in [
            0,
            1,
            4095,
            HUGE_PAGE / 2 - 1,
            HUGE_PAGE / 2,
            HUGE_PAGE,
            HUGE_PAGE + 12345,
            3 * HUGE_PAGE,
            HUGE_PAGE,
            HUGE_PAGE - 8,
        ] {
            let mut b = ChunkBuf::for_decode(len);
            assert_eq!(b.len(), len);
            for (i, x) in b.iter_mut().enumerate() {
                *x = i as u8;
            }
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as u8));
            if let Mem::Mapped { ptr, map_len, .. } = b.mem {
                assert_eq!(ptr.as_ptr() as usize % HUGE_PAGE, 0);
                assert!(map_len >= len && map_len % HUGE_PAGE == 0);
            }
        }
    }
}

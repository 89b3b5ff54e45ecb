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

use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

use lru::LruCache;

/// `Arc<Vec<u8>>` rather than `Arc<[u8]>`: converting a decoded Vec into `Arc<[u8]>` copies it.
type Slot<E> = Arc<OnceLock<Result<Arc<Vec<u8>>, E>>>;

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

impl<K: Hash + Eq + Clone, E: Clone> ChunkCache<K, E> {
    pub fn new(capacity_bytes: u64) -> Self {
        ChunkCache { inner: Mutex::new(Inner { slots: LruCache::unbounded(), used: 0 }), capacity: capacity_bytes }
    }

    /// The chunk for `key`, decoding it with `decode` if no one has (or is doing so now).
    /// `size` is the decoded size, counted against the budget from the start.
    pub fn get_or_decode(&self, key: K, size: u64, decode: impl FnOnce() -> Result<Vec<u8>, E>) -> Result<Arc<Vec<u8>>, E> {
        let slot = self.slot(&key, size);
        let result = slot.get_or_init(|| decode().map(Arc::new)).clone();
        if result.is_err() {
            self.forget(&key, &slot);
        }
        result
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn stays_within_budget_and_evicts_least_recent() {
        let cache: ChunkCache<u32, ()> = ChunkCache::new(300);
        for k in 0..10 {
            cache.get_or_decode(k, 100, || Ok(vec![k as u8; 100])).unwrap();
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
                        .get_or_decode(7, 4, || {
                            decodes.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![1, 2, 3, 4])
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
        assert!(cache.get_or_decode(1, 10, || Err("boom".to_string())).is_err());
        assert_eq!(cache.stats(), CacheStats::default());
        assert_eq!(&cache.get_or_decode(1, 1, || Ok(vec![5])).unwrap()[..], &[5]);
    }
}

//! The bound: space counted in whole blocks ([`blocks`]: fills in progress included), entries
//! in LRU order by last use (kept across restarts as the sidecar's mtime), and eviction of the
//! least recently used before a fill that would pass the capacity.

use std::fs::File;
use std::time::SystemTime;

use super::{DiskCache, Key, State};

pub(super) const BLOCK: u64 = 4096;

pub(super) fn blocks(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK + BLOCK
}

impl DiskCache {
    /// Record a use: LRU order here, and the sidecar's mtime for the next process.
    pub(super) fn touch(&self, key: &Key) {
        if let Ok(f) = File::options().write(true).open(self.dir.join(format!("{}.meta", key.hex()))) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Remove least recently used entries until `need` more bytes fit (never `keep`).
    pub(super) fn evict_until(&self, st: &mut State, need: u64, keep: Option<&Key>) {
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
    pub(super) fn remove(&self, st: &mut State, key: &Key) {
        if let Some(meta) = st.entries.pop(key) {
            st.used -= blocks(meta.len);
        }
        st.verified.remove(key);
        let _ = std::fs::remove_file(self.dir.join(format!("{}.meta", key.hex())));
        let _ = std::fs::remove_file(self.dir.join(key.hex()));
    }
}

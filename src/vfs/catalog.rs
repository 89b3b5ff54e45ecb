//! The mount's catalog: the registry as last loaded, and the views built from it.
//!
//! Both come from I/O that can stall — a registry reload is a GET on an object store, a view's
//! build reads headers (ranged GETs) and fingerprints — so neither runs under the catalog's lock,
//! which every FUSE request takes. A reload reads the new registry first, then swaps it in under
//! the lock; a view is built from a snapshot of the registry (an `Arc`) and cached only if that
//! registry is still the current one. Requests for other entries never wait on such I/O:
//! builds of one entry's view are serialized on that entry's own slot, and a request that finds
//! another reloading waits at most [`RELOAD_WAIT`] for it, then goes on with the registry it has
//! (as a node that polls an object store sees other nodes' changes a poll late anyway).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Fs, FsError, FsResult};
use crate::registry::{Registry, Store};
use crate::variant::{self, Content, EntryView};

/// What says the registry changed (see `Store::registry_stamp`).
pub(super) type RegistryStamp = String;

pub(super) fn registry_stamp(store: &Store) -> Option<RegistryStamp> {
    store.registry_stamp()
}

/// How long a request waits for another request's reload of the registry before it goes on
/// with the one it has. A local reload takes milliseconds, so a request after a write through
/// this mount sees the write; a stalled object store holds no request longer than this.
const RELOAD_WAIT: Duration = Duration::from_secs(2);

pub(super) struct Catalog {
    pub(super) registry: Arc<Registry>,
    /// Identity of registry.json when loaded (None: not there).
    pub(super) loaded_mtime: Option<RegistryStamp>,
    /// When `registry` was loaded.
    pub(super) loaded_at: Instant,
    pub(super) views: HashMap<String, (u64, Arc<EntryView>)>,
}

/// The catalog's work in progress, kept apart from its lock.
#[derive(Default)]
pub(super) struct Loading {
    /// A reload is running (its requester does the I/O; the others wait on `reloaded`, bounded).
    reloading: Mutex<bool>,
    reloaded: Condvar,
    /// One slot per entry whose view is being built: builds of one entry run one at a time (a
    /// second opener waits for the first's view instead of building it again).
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Ends a reload however its requester leaves (a panic included), waking the waiters.
struct Reloading<'a>(&'a Loading);

impl Drop for Reloading<'_> {
    fn drop(&mut self) {
        *self.0.reloading.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.reloaded.notify_all();
    }
}

impl Fs {
    /// Reload the registry if it changed. A corrupt registry keeps the last good one.
    pub(super) fn refresh(&self) {
        let deadline = Instant::now() + RELOAD_WAIT;
        loop {
            let stamp = registry_stamp(&self.store);
            if self.catalog.read().unwrap_or_else(|e| e.into_inner()).loaded_mtime == stamp {
                return;
            }
            {
                let mut reloading = self.loading.reloading.lock().unwrap_or_else(|e| e.into_inner());
                if *reloading {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return;
                    }
                    // Then look again: that reload may have read the registry before a change
                    // this request must see (a write through this mount just before it).
                    let _ = self.loading.reloaded.wait_timeout(reloading, left);
                    continue;
                }
                *reloading = true;
            }
            let _reloading = Reloading(&self.loading);
            // Sessions begun from here on saw the registry being loaded (see `forget_entry`).
            let loading = Instant::now();
            match self.store.load() {
                Ok(registry) => self.install(Arc::new(registry), stamp, loading),
                Err(e) => tracing::error!("keeping the last good registry: {e}"),
            }
            return;
        }
    }

    /// Swap in a registry just loaded: views whose entry (or any entry down its chain) changed
    /// are dropped, and the kernel forgets the names of changed and removed entries.
    fn install(&self, registry: Arc<Registry>, stamp: Option<RegistryStamp>, loading: Instant) {
        let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        tracing::info!(entries = registry.entries.len(), "registry reloaded");
        let old = catalog.registry.clone();
        // A delta written through deltas/ gains files without changing its generation; its
        // unfinished files count too: they answer EIO (see `view`).
        let changed = |n: &str| {
            old.entries.get(n) != registry.entries.get(n) || old.unfinished(n) != registry.unfinished(n)
        };
        let stale: Vec<String> = catalog
            .views
            .keys()
            .filter(|name| registry.ancestors(name).map_or(true, |all| all.iter().any(|n| changed(n))))
            .cloned()
            .collect();
        let gone: Vec<String> = old
            .entries
            .iter()
            .filter(|(n, e)| registry.entries.get(*n).is_none_or(|new| new.generation() != e.generation()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &stale {
            catalog.views.remove(name);
        }
        for name in gone.iter().filter(|n| !registry.entries.contains_key(*n)) {
            self.staging.forget_entry(name, catalog.loaded_at);
        }
        if let Some(forget) = self.forget_name.get() {
            // Gone entries, and changed ones (a delta stored again through deltas/ keeps its
            // inodes): the kernel forgets their names, and with them cached sizes.
            for name in gone.iter().chain(&stale) {
                forget(name);
            }
        }
        catalog.registry = registry;
        catalog.loaded_mtime = stamp;
        catalog.loaded_at = loading;
    }

    pub(super) fn entry_created(&self, name: &str) -> Option<u64> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .registry
            .entries
            .get(name)
            .map(|e| e.generation())
    }

    fn cached_view(&self, name: &str, created: u64) -> Option<Arc<EntryView>> {
        let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        catalog.views.get(name).filter(|(c, _)| *c == created).map(|(_, v)| v.clone())
    }

    /// The view of entry `name` at generation `created`, built on first use, outside the
    /// catalog's lock.
    pub(super) fn view(&self, name: &str, created: u64) -> FsResult<Arc<EntryView>> {
        if let Some(view) = self.cached_view(name, created) {
            return Ok(view);
        }
        let slot = {
            let mut building = self.loading.building.lock().unwrap_or_else(|e| e.into_inner());
            building.entry(name.to_owned()).or_default().clone()
        };
        let _building = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(view) = self.cached_view(name, created) {
            return Ok(view);
        }
        let registry = {
            let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            if catalog.registry.entries.get(name).map(|e| e.generation()) != Some(created) {
                return Err(FsError::new(libc::ENOENT));
            }
            catalog.registry.clone()
        };
        let mut view = variant::build_view(&registry, name).map_err(|e| FsError::eio(e.to_string()))?;
        // The entry as GGUF files too, where llama.cpp's converter maps its architecture.
        match variant::gguf::files_with_notes(name, &view) {
            Ok((files, notes)) => {
                view.files.extend(files);
                for note in notes {
                    tracing::info!(entry = name, "GGUF: {note}");
                }
            }
            Err(why) => tracing::info!(entry = name, "no GGUF files: {why}"),
        }
        // A stored file whose later writing did not finish (a failed store, a writer that died)
        // holds bytes nobody finished writing: it answers EIO, never those bytes.
        let unfinished = registry.unfinished(name);
        for file in view.files.iter_mut().filter(|f| unfinished.contains(&f.name.as_str())) {
            file.content = Content::Broken("unfinished: write it again, or rm it".into());
        }
        let view = Arc::new(view);
        for file in &view.files {
            if let Content::Broken(reason) = &file.content {
                tracing::error!(entry = name, file = file.name, "cannot be served: {reason}");
            }
        }
        let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        // Built from the registry that is current: kept. A reload meanwhile may have made it
        // stale without seeing it; this request is served from it, the next builds anew.
        if Arc::ptr_eq(&catalog.registry, &registry) {
            catalog.views.insert(name.to_owned(), (created, view.clone()));
        }
        drop(catalog);
        let mut building = self.loading.building.lock().unwrap_or_else(|e| e.into_inner());
        if building.get(name).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            building.remove(name);
        }
        Ok(view)
    }
}

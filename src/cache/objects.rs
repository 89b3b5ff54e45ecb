//! The mount's near tier for object-store files: each object is fetched whole (parallel ranged
//! GETs pinned to its etag) into the disk cache, keyed by the store's location, the key and the
//! etag, so it survives remounts and daemon restarts, is checked like every cached file, and
//! counts against the disk cache's size. Decoders and passthrough then read the local copy at
//! disk speed. An object the cache cannot hold is fetched into an unlinked temporary file.
//!
//! The decoders need not wait for the whole object: [`ObjectFiles::incoming`] hands out the
//! cache's fill file as it is written (`store::Incoming`), so a cold load decodes its first
//! tensors while the rest is in flight. The fill is the disk cache's own (single flight, its
//! room reserved, committed only once complete; a failed fetch leaves nothing behind), run on
//! a thread of its own; [`ObjectFiles::local_copy`] (the whole file, for passthrough) joins
//! that fill through the cache's single flight.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::disk::{DiskCache, Key, KeyBuilder};
use crate::store::{fetch_in_background, Fetched, Incoming, ObjectError, ObjectFiles, Store};

pub struct CachedObjects {
    fetched: Fetched,
    disk: Arc<DiskCache>,
    /// Fetches in progress, by the cache's key: a second reader of an object joins its fetch.
    /// Taken out when the fetch ends (the copy is then in the cache, or the fetch failed and a
    /// later read fetches again).
    arriving: Arc<Mutex<HashMap<Key, Arc<Incoming>>>>,
}

impl CachedObjects {
    pub fn new(fetched: Fetched, disk: Arc<DiskCache>) -> Self {
        CachedObjects { fetched, disk, arriving: Arc::default() }
    }
}

/// Fetches `object` (`store_key` of `store`) at `etag` into the disk cache under `key`,
/// handing the fill file to `into` first and recording each part as it arrives. A fill the
/// cache does not run (another caller's fill won the key: it is joined and its file handed
/// whole; or the cache cannot hold the object) is served the other way. The cache's own
/// (read-only) file when it holds the object.
fn fetch_cached(
    disk: &Arc<DiskCache>,
    fetched: &Fetched,
    key: &Key,
    (object, etag, size): (&str, &str, u64),
    store: &Store,
    store_key: &str,
    into: &Incoming,
) -> Result<Option<File>, ObjectError> {
    let address = fetched.address(object);
    // The fill reports its error as text; the object's own failure is kept typed beside it, so
    // an object changed in the store is told apart from a store that did not answer.
    let failed = Mutex::new(None);
    let mut filled_here = false;
    let cached = disk
        .get_or_fill(key, size, &address, |f| {
            filled_here = true;
            into.set_file(f.try_clone().map_err(|e| e.to_string())?);
            store
                .fetch_into_telling(store_key, etag, size, f, &mut |r| into.arrivals.arrived(r))
                .map(|()| vec![])
                .map_err(|e| {
                    let text = e.to_string();
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(ObjectError::of(e, etag));
                    text
                })
        })
        .map_err(|text| {
            failed.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or(ObjectError::Unavailable(text))
        })?;
    match cached {
        Some(c) => {
            if !filled_here {
                into.set_file(c.file.try_clone().map_err(|e| ObjectError::Unavailable(e.to_string()))?);
            }
            Ok(Some(c.file.try_clone().map_err(|e| ObjectError::Unavailable(e.to_string()))?))
        }
        None => fetched.download_into(object, etag, size, into).map(|()| None),
    }
}

impl CachedObjects {
    /// The disk cache's key of an object's bytes at `etag`.
    fn key(&self, object: &str, etag: &str) -> Key {
        KeyBuilder::new("object").part(self.fetched.address(object).as_bytes()).part(etag.as_bytes()).finish()
    }
}

impl ObjectFiles for CachedObjects {
    /// From the cached copy when there is one (a remount builds its views from local headers,
    /// not a GET or two per file), else from the store.
    fn read_range(
        &self,
        object: &str,
        etag: &str,
        size: u64,
        range: Range<u64>,
    ) -> Result<Vec<u8>, ObjectError> {
        if let Some(cached) = self.disk.get(&self.key(object, etag), size) {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; range.end.saturating_sub(range.start) as usize];
            if range.end <= size && cached.file.read_exact_at(&mut buf, range.start).is_ok() {
                return Ok(buf);
            }
        }
        self.fetched.read_range(object, etag, size, range)
    }

    fn etag(&self, object: &str) -> Result<String, ObjectError> {
        self.fetched.etag(object)
    }

    fn local_copy(&self, object: &str, etag: &str, size: u64) -> Result<File, ObjectError> {
        let key = self.key(object, etag);
        // A fetch in progress is joined (its fill holds the cache's key: the lookup below would
        // wait for it too, but this way its error is the typed one).
        let arriving = self.arriving.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        if let Some(incoming) = arriving {
            incoming.arrivals.wait_all()?;
        }
        let (store, store_key) = self.fetched.resolve(object).map_err(ObjectError::Unavailable)?;
        let into = Incoming::new(size);
        let fetched =
            fetch_cached(&self.disk, &self.fetched, &key, (object, etag, size), &store, &store_key, &into);
        into.arrivals.finish(fetched.as_ref().map(|_| ()).map_err(Clone::clone));
        match fetched? {
            Some(cached) => Ok(cached),
            None => into.whole_file()?.try_clone().map_err(|e| ObjectError::Unavailable(e.to_string())),
        }
    }

    fn incoming(&self, object: &str, etag: &str, size: u64) -> Result<Arc<Incoming>, ObjectError> {
        let key = self.key(object, etag);
        let joined = || self.arriving.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        if let Some(incoming) = joined() {
            return Ok(incoming);
        }
        // Outside the map's lock: the first check of a cached copy in a process may hash it.
        if let Some(cached) = self.disk.get(&key, size) {
            let file = cached.file.try_clone().map_err(|e| ObjectError::Unavailable(e.to_string()))?;
            return Ok(Arc::new(Incoming::whole(file, size)));
        }
        let (store, store_key) = self.fetched.resolve(object).map_err(ObjectError::Unavailable)?;
        let incoming = Arc::new(Incoming::new(size));
        {
            let mut arriving = self.arriving.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(raced) = arriving.get(&key) {
                return Ok(raced.clone());
            }
            arriving.insert(key, incoming.clone());
        }
        let (disk, fetched, map) = (self.disk.clone(), self.fetched.clone(), self.arriving.clone());
        let (object, etag) = (object.to_owned(), etag.to_owned());
        let started = fetch_in_background(
            incoming.clone(),
            move |into| {
                fetch_cached(&disk, &fetched, &key, (&object, &etag, size), &store, &store_key, into)
                    .map(|_| ())
            },
            move |_| {
                map.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            },
        );
        if let Err(e) = started {
            self.arriving.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            return Err(e);
        }
        Ok(incoming)
    }

    fn address(&self, object: &str) -> String {
        self.fetched.address(object)
    }
}

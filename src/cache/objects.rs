//! The mount's near tier for object-store files: each object is fetched whole (parallel ranged
//! GETs pinned to its etag) into the disk cache, keyed by the store's location, the key and the
//! etag, so it survives remounts and daemon restarts, is checked like every cached file, and
//! counts against the disk cache's size. Decoders and passthrough then read the local copy at
//! disk speed. An object the cache cannot hold is fetched into an unlinked temporary file.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use super::disk::{DiskCache, Key, KeyBuilder};
use crate::store::{Fetched, ObjectError, ObjectFiles};

pub struct CachedObjects {
    fetched: Fetched,
    disk: Arc<DiskCache>,
}

impl CachedObjects {
    pub fn new(fetched: Fetched, disk: Arc<DiskCache>) -> Self {
        CachedObjects { fetched, disk }
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
        let address = self.fetched.address(object);
        let key = self.key(object, etag);
        let (store, store_key) = self.fetched.resolve(object).map_err(ObjectError::Unavailable)?;
        // The fill reports its error as text; the object's own failure is kept typed beside it,
        // so an object changed in the store is told apart from a store that did not answer.
        let failed = std::sync::Mutex::new(None);
        let cached = self
            .disk
            .get_or_fill(&key, size, &address, |f| {
                store.fetch_into(&store_key, etag, size, f).map(|()| vec![]).map_err(|e| {
                    let text = e.to_string();
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(ObjectError::of(e, etag));
                    text
                })
            })
            .map_err(|text| {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .unwrap_or(ObjectError::Unavailable(text))
            })?;
        match cached {
            Some(c) => c.file.try_clone().map_err(|e| ObjectError::Unavailable(e.to_string())),
            None => self.fetched.download(object, etag, size),
        }
    }

    fn address(&self, object: &str) -> String {
        self.fetched.address(object)
    }
}

//! How llmfs reads the files of an object store ([`ObjectFiles`]), and [`Fetched`], what a
//! command uses: each object downloaded whole
//! (parallel ranged GETs, pinned to its etag) into an unlinked temporary file of this node's
//! `tmp/` the first time it is read, and shared by every reader in the process. The mount uses
//! its disk cache instead (`cache::objects`), so fetched objects survive remounts.
//!
//! Objects are named by keys of the registry's store, or by `s3://BUCKET/KEY` for a base added
//! in place from another place of the object store (its bucket is opened with the same
//! credentials and endpoint).

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{FinishGuard, Incoming, StoreError};
use crate::store;

/// Why an object's bytes could not be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// The object is not (or no longer) the version the entry recorded: a GET pinned to its
    /// etag failed its precondition, or it is gone. Served as a changed base file is.
    #[error("changed in the store since it was added (etag {etag} is gone)")]
    Changed { etag: String },
    /// The store did not answer, or a local copy could not be made: a later read tries again.
    #[error("{0}")]
    Unavailable(String),
}

impl ObjectError {
    /// A store error met while reading the object at `etag`.
    pub fn of(e: StoreError, etag: &str) -> Self {
        match e {
            StoreError::Precondition { .. } | StoreError::NotFound { .. } => {
                ObjectError::Changed { etag: etag.to_owned() }
            }
            e => ObjectError::Unavailable(e.to_string()),
        }
    }
}

/// Access to the objects of a store: what a `source::SourceFile` of an object-store file reads
/// through. Object names are keys of the registry's store, or `s3://BUCKET/KEY` addresses.
pub trait ObjectFiles: Send + Sync {
    /// Bytes `range` of the object (of `size` bytes) as it was at `etag` (an error if it
    /// changed since).
    fn read_range(
        &self,
        object: &str,
        etag: &str,
        size: u64,
        range: Range<u64>,
    ) -> Result<Vec<u8>, ObjectError>;
    /// The object's etag now.
    fn etag(&self, object: &str) -> Result<String, ObjectError>;
    /// A local file holding exactly the `size` bytes of the object at `etag`, fetched on first
    /// use (the caller reads it with `pread` only). Returns once every byte is there: what
    /// needs the whole file (FUSE passthrough's backing file) uses this.
    fn local_copy(&self, object: &str, etag: &str, size: u64) -> Result<File, ObjectError>;
    /// The local copy of the object at `etag` as it arrives: returns at once, with the fetch
    /// started (or joined, or done before) in the background; its reader waits per range. One
    /// fetch per object at a time, however many callers: a second caller gets the same copy.
    fn incoming(&self, object: &str, etag: &str, size: u64) -> Result<Arc<Incoming>, ObjectError>;
    /// The object's full address, for messages.
    fn address(&self, object: &str) -> String;
}

/// A shared [`ObjectFiles`] (Debug shows nothing: it may hold a client with credentials).
#[derive(Clone)]
pub struct Objects(pub Arc<dyn ObjectFiles>);

impl fmt::Debug for Objects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Objects")
    }
}

impl std::ops::Deref for Objects {
    type Target = dyn ObjectFiles;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// An object at an etag.
type ObjectAt = (String, String);

/// Cloning shares everything (the fetch threads hold a clone).
#[derive(Clone)]
pub struct Fetched {
    store: Arc<store::Store>,
    tmp: PathBuf,
    /// Stores of other buckets, opened on first use.
    others: Arc<Mutex<HashMap<String, Arc<store::Store>>>>,
    /// Local copies by (object, etag), whole or arriving (a failed one is taken out, so a later
    /// read fetches again).
    copies: Arc<Mutex<HashMap<ObjectAt, Arc<Incoming>>>>,
}

impl Fetched {
    pub fn new(store: Arc<store::Store>, tmp: PathBuf) -> Self {
        Fetched { store, tmp, others: Arc::default(), copies: Arc::default() }
    }

    /// The store and key that object `object` names.
    pub fn resolve(&self, object: &str) -> Result<(Arc<store::Store>, String), String> {
        resolve(&self.store, &self.others, object)
    }

    /// Downloads `object` at `etag` into a new unlinked file under this node's `tmp/`, handing
    /// the file to `into` first and recording each part there as it arrives (the caller
    /// finishes `into` with the outcome).
    pub fn download_into(
        &self,
        object: &str,
        etag: &str,
        size: u64,
        into: &Incoming,
    ) -> Result<(), ObjectError> {
        let (store, key) = self.resolve(object).map_err(ObjectError::Unavailable)?;
        let path = self.tmp.join(format!(".fetch.{}.{}", std::process::id(), unique()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| ObjectError::Unavailable(format!("{}: {e}", path.display())))?;
        let _ = std::fs::remove_file(&path);
        into.set_file(file.try_clone().map_err(|e| ObjectError::Unavailable(e.to_string()))?);
        store
            .fetch_into_telling(&key, etag, size, &file, &mut |r| into.arrivals.arrived(r))
            .map_err(|e| ObjectError::of(e, etag))
    }
}

/// Runs `fetch` on a thread of its own, finishing `incoming` with its outcome (after `then`,
/// which takes the copy out of its single-flight map: a failed copy must not be found again).
pub fn fetch_in_background(
    incoming: Arc<Incoming>,
    fetch: impl FnOnce(&Incoming) -> Result<(), ObjectError> + Send + 'static,
    then: impl FnOnce(&Result<(), ObjectError>) + Send + 'static,
) -> Result<(), ObjectError> {
    let inc = incoming.clone();
    std::thread::Builder::new()
        .name("llmfs-fetch".into())
        .spawn(move || {
            let guard = FinishGuard(&inc.arrivals);
            let outcome = fetch(&inc);
            then(&outcome);
            guard.finish(outcome);
        })
        .map(|_| ())
        .map_err(|e| ObjectError::Unavailable(format!("no thread to fetch with: {e}")))
}

/// `s3://BUCKET/KEY` → that bucket's store (cached in `others`) and KEY; anything else is a key
/// of `store`.
pub fn resolve(
    store: &Arc<store::Store>,
    others: &Mutex<HashMap<String, Arc<store::Store>>>,
    object: &str,
) -> Result<(Arc<store::Store>, String), String> {
    let Some(rest) = object.strip_prefix("s3://") else { return Ok((store.clone(), object.to_owned())) };
    let (bucket, key) = rest.split_once('/').ok_or_else(|| format!("{object}: no key in the address"))?;
    let mut others = others.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = others.get(bucket) {
        return Ok((s.clone(), key.to_owned()));
    }
    let s = Arc::new(store::Store::open(&format!("s3://{bucket}")).map_err(|e| e.to_string())?);
    others.insert(bucket.to_owned(), s.clone());
    Ok((s, key.to_owned()))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl ObjectFiles for Fetched {
    fn read_range(
        &self,
        object: &str,
        etag: &str,
        _size: u64,
        range: Range<u64>,
    ) -> Result<Vec<u8>, ObjectError> {
        let (store, key) = self.resolve(object).map_err(ObjectError::Unavailable)?;
        store.get_range_at(&key, range, Some(etag)).map(|b| b.to_vec()).map_err(|e| ObjectError::of(e, etag))
    }

    fn etag(&self, object: &str) -> Result<String, ObjectError> {
        let (store, key) = self.resolve(object).map_err(ObjectError::Unavailable)?;
        store.head(&key).map(|m| m.etag).map_err(|e| ObjectError::Unavailable(e.to_string()))
    }

    fn local_copy(&self, object: &str, etag: &str, size: u64) -> Result<File, ObjectError> {
        let incoming = self.incoming(object, etag, size)?;
        incoming.whole_file()?.try_clone().map_err(|e| ObjectError::Unavailable(e.to_string()))
    }

    fn incoming(&self, object: &str, etag: &str, size: u64) -> Result<Arc<Incoming>, ObjectError> {
        let id = (object.to_owned(), etag.to_owned());
        let mut copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = copies.get(&id) {
            return Ok(c.clone());
        }
        let incoming = Arc::new(Incoming::new(size));
        copies.insert(id.clone(), incoming.clone());
        drop(copies);
        let this = self.clone();
        let (object, etag) = (object.to_owned(), etag.to_owned());
        let forget = {
            let this = this.clone();
            let id = id.clone();
            move |outcome: &Result<(), ObjectError>| {
                if outcome.is_err() {
                    this.copies.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                }
            }
        };
        let started = fetch_in_background(
            incoming.clone(),
            move |into| this.download_into(&object, &etag, size, into),
            forget,
        );
        if let Err(e) = started {
            self.copies.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            return Err(e);
        }
        Ok(incoming)
    }

    fn address(&self, object: &str) -> String {
        match object.starts_with("s3://") {
            true => object.to_owned(),
            false => format!("{}/{object}", self.store.location()),
        }
    }
}

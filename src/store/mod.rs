//! Where the store's bytes live: a local directory (the embedded default) or an S3-compatible
//! object store (AWS S3, MinIO, Ceph, SeaweedFS), behind one [`Store`] with the few operations
//! llmfs needs: ranged and whole reads, puts (plain, multipart from a local file with progress,
//! put-if-absent, put-if-match), head, list, delete. S3 types never leave this module.
//!
//! # Design
//!
//! - **Sync API over one private runtime.** The daemon is synchronous (fuser threads, rayon), so
//!   every call blocks; the S3 backend runs `object_store` on one tokio runtime owned by this
//!   module (`s3::runtime`, a few worker threads named `llmfs-store`). Nothing outside
//!   `src/store` sees async code. Calls must not be made from inside that runtime (they never are:
//!   its threads run only this module's futures).
//! - **Nothing hangs.** Every S3 request has a connect timeout and a whole-request timeout
//!   (body included); failed requests (connection refused or reset, timeouts, 5xx, 429 and S3's
//!   `SlowDown` throttling) are retried with jittered exponential backoff, for at most
//!   [`Limits::retry_total`]; on top of that each operation runs under a hard deadline of
//!   [`Limits::bound`] (70 s with the defaults). A server that is down, unreachable or stalled
//!   mid-body therefore gives an error within that bound, never wrong bytes (a body re-fetched
//!   after an error must carry the same etag) and never a reader hung forever.
//! - **Conditional writes or no writes.** The registry commits with If-Match / If-None-Match.
//!   Before the first write a store is probed ([`Store::ensure_writable`]): put-if-absent on an
//!   existing key must fail, put-if-match with a wrong etag must fail. A server that accepts
//!   either is refused for writing with one line ([`StoreError::NoConditionalWrites`]); reads
//!   still work. The local directory gets the same semantics from `link(2)` (if-absent) and an
//!   exclusive `flock` of `ROOT/lock` (if-match), the lock [`Node::write_lock`] takes.
//! - **Credentials** come from the standard AWS environment (or [`S3Config`] fields in tests) and
//!   are handed to the client once; no `Debug` impl here prints them, and `object_store`'s own
//!   builder (whose derived `Debug` would) never leaves `s3.rs`. https verifies certificates;
//!   plain http needs `AWS_ALLOW_HTTP=true`.
//!
//! Files: `local.rs` (the directory backend), `s3.rs` (config, runtime, limits, the S3 backend),
//! `commit.rs` (the probe and [`update_object`], the retrying read-modify-write),
//! `reader.rs` (parallel ranged reads with sequential prefetch, as mountpoint-s3 does them).
//!
//! # How llmfs uses it
//!
//! The layers flow one way, each importing only the ones before it:
//!
//! ```text
//! store (bytes: keys, ranges, etags)  →  registry (plain data: entries, records, fingerprints)
//!   →  recipes (cast, quantize, delta, import: how a variant's tensors come from its base's)
//!   →  variant views (which bytes each virtual file holds)  →  cache (decoded chunks, disk tier)
//!   →  vfs (FUSE)
//! ```
//!
//! - **registry** (`registry::Store`, over [`Node`]): `registry.json` is an object on both
//!   backends, committed under this node's write lock with put-if-match on the etag it was
//!   loaded at ([`Node::commit`], [`Node::update`] which redoes the change on a conflict). A
//!   daemon notices other processes' commits by [`Node::stamp`]: a `stat` locally, a `head`
//!   every few seconds by a poller on an object store.
//! - **files an entry owns** are uploaded with [`Store::put_file`] to keys no other upload uses
//!   (`models/NAME/UPLOAD-ID/FILE`), then one registry commit names them (`FileRecord::object`,
//!   with size and etag as the fingerprint): an upload killed midway leaves only unreferenced
//!   objects, which `llmfs gc` finds by diffing [`Store::list`] against the registry.
//! - **reads**: a `source::SourceFile` of an object reads its header with two ranged GETs and,
//!   when its bytes are needed, the whole object with [`Store::fetch_into_telling`] (parallel
//!   ranged GETs pinned to the recorded etag) into a local file: the disk cache in the mount
//!   (`cache::objects`), an unlinked temporary file for a command ([`Fetched`]). Codecs,
//!   recipes and views read that file as it arrives ([`Incoming`]: each read waits for its own
//!   range only), so decoding overlaps the fetch; passthrough takes the file once whole.

mod commit;
mod fetched;
pub mod gc;
mod incoming;
mod local;
mod node;
mod reader;
mod s3;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

use bytes::Bytes;

pub use commit::{update_object, Committed, UpdateError, MAX_COMMIT_TIME};
pub use fetched::{fetch_in_background, Fetched, ObjectError, ObjectFiles, Objects};
pub use incoming::{Arrivals, FinishGuard, Incoming};
pub use node::{set_upload_progress, upload_prefix, Node, Staged, StagingDir, WriteLock, REMOTE_POLL};
pub use reader::{ObjectReader, ReadOptions};
pub use s3::{Limits, S3Config};

/// Why a store operation failed. Cloneable (plain strings) so a reader can keep and repeat it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{key}: no such object")]
    NotFound { key: String },
    /// A put-if-absent found the key already there.
    #[error("{key}: already exists")]
    AlreadyExists { key: String },
    /// A put-if-match found a different etag (someone else wrote first), or no object.
    #[error("{key}: changed since it was read")]
    Precondition { key: String },
    /// The probe found that the server ignores If-None-Match or If-Match: writing could lose
    /// concurrent updates, so nothing is written.
    #[error(
        "{location}: the server does not honour conditional writes ({detail}); llmfs will not write to it"
    )]
    NoConditionalWrites { location: String, detail: String },
    /// The operation passed its hard deadline ([`Limits::bound`]).
    #[error("{key}: no answer from the store within {secs} s")]
    Timeout { key: String, secs: u64 },
    /// Conflicting updates kept winning for longer than [`MAX_COMMIT_TIME`].
    #[error("{key}: gave up after {attempts} conflicting concurrent updates")]
    Contention { key: String, attempts: u32 },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("{key}: range {start}..{end} is outside the object ({size} bytes)")]
    Range { key: String, start: u64, end: u64, size: u64 },
    #[error("store configuration: {0}")]
    Config(String),
    /// Anything else (I/O, network after retries, permissions), with the backend's message.
    #[error("{key}: {reason}")]
    Io { key: String, reason: String },
}

/// What a head, list or write says about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the store (without an S3 prefix).
    pub key: String,
    pub size: u64,
    /// Opaque; changes whenever the object is rewritten. Local: size, mtime and inode.
    pub etag: String,
    pub last_modified: SystemTime,
}

/// An object's bytes with the etag they were read at.
#[derive(Clone, Debug)]
pub struct Object {
    pub bytes: Bytes,
    pub etag: String,
}

enum Backend {
    Local(local::LocalDir),
    S3(s3::S3Store),
}

/// One store: where llmfs's catalogue and containers live. Cheap to share (`Arc<Store>`); all
/// methods take `&self` and are safe to call from many threads.
pub struct Store {
    backend: Backend,
    /// The probe's outcome, run once before the first write.
    writable: OnceLock<Result<(), StoreError>>,
}

impl fmt::Debug for Store {
    // Only the location: S3 credentials must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("location", &self.location()).finish()
    }
}

impl Store {
    /// `s3://BUCKET[/PREFIX]` (configured from the AWS environment, see [`S3Config::from_env`])
    /// or a local directory path.
    pub fn open(location: &str) -> Result<Store, StoreError> {
        if location.starts_with("s3://") {
            Store::s3(S3Config::from_env(location)?)
        } else {
            Store::local(location)
        }
    }

    /// A local directory (created if missing).
    pub fn local(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        Ok(Store::with(Backend::Local(local::LocalDir::open(root.into())?)))
    }

    pub fn s3(config: S3Config) -> Result<Store, StoreError> {
        Ok(Store::with(Backend::S3(s3::S3Store::new(config)?)))
    }

    fn with(backend: Backend) -> Store {
        Store { backend, writable: OnceLock::new() }
    }

    /// `s3://bucket/prefix` or the directory, for messages.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Local(l) => l.root().display().to_string(),
            Backend::S3(s) => s.location(),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }

    /// The local directory, for callers that keep a local-only fast path.
    pub fn local_root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local(l) => Some(l.root()),
            Backend::S3(_) => None,
        }
    }

    /// `range` of the object's bytes; the range must lie within the object.
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.get_range_at(key, range, None)
    }

    /// [`Store::get_range`] of the object only as it was at `etag` (If-Match), else
    /// [`StoreError::Precondition`]: a reader pinned to an etag never mixes two versions.
    pub fn get_range_at(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes, StoreError> {
        check_key(key)?;
        if range.start > range.end {
            return Err(StoreError::Range { key: key.into(), start: range.start, end: range.end, size: 0 });
        }
        match &self.backend {
            Backend::Local(l) => l.get_range(key, range, etag),
            Backend::S3(s) => s.get_range(key, range, etag),
        }
    }

    /// The whole object and the etag it was read at.
    pub fn get(&self, key: &str) -> Result<Object, StoreError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(l) => l.get(key),
            Backend::S3(s) => s.get(key),
        }
    }

    pub fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(l) => l.head(key),
            Backend::S3(s) => s.head(key),
        }
    }

    /// Every object under `prefix` (a `/`-separated directory: `models/a` lists `models/a/…`,
    /// not `models/ab`; "" lists the whole store), sorted by key.
    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let mut out = match &self.backend {
            Backend::Local(l) => l.list(prefix)?,
            Backend::S3(s) => s.list(prefix)?,
        };
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Writes (replaces) the object. Returns the new etag.
    pub fn put(&self, key: &str, bytes: Bytes) -> Result<String, StoreError> {
        self.write_check(key)?;
        match &self.backend {
            Backend::Local(l) => l.put(key, &bytes, Cond::None),
            Backend::S3(s) => s.put(key, bytes, Cond::None),
        }
    }

    /// Writes the object only if the key does not exist (If-None-Match: *), else
    /// [`StoreError::AlreadyExists`].
    pub fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<String, StoreError> {
        self.write_check(key)?;
        self.put_cond(key, bytes, Cond::Absent)
    }

    /// Replaces the object only if its etag is still `etag` (If-Match), else
    /// [`StoreError::Precondition`] (also when the object is gone).
    pub fn put_if_match(&self, key: &str, bytes: Bytes, etag: &str) -> Result<String, StoreError> {
        self.write_check(key)?;
        self.put_cond(key, bytes, Cond::Match(etag))
    }

    /// A conditional put by a process holding this node's write lock (`node::WriteLock`),
    /// which the local backend's own commits take: locally it must not be taken twice.
    fn put_held(&self, key: &str, bytes: Bytes, cond: Cond) -> Result<String, StoreError> {
        self.write_check(key)?;
        match &self.backend {
            Backend::Local(l) => l.put_held(key, &bytes, cond),
            Backend::S3(s) => s.put(key, bytes, cond),
        }
    }

    /// Unchecked by the probe (the probe itself uses it).
    fn put_cond(&self, key: &str, bytes: Bytes, cond: Cond) -> Result<String, StoreError> {
        match &self.backend {
            Backend::Local(l) => l.put(key, &bytes, cond),
            Backend::S3(s) => s.put(key, bytes, cond),
        }
    }

    /// Uploads a local file as the object (replacing it), streaming it from disk: multipart in
    /// parts of 16 MiB or more with several in flight on S3, a copy and rename locally.
    /// `progress` is called with the bytes done so far, on the calling thread.
    pub fn put_file(
        &self,
        key: &str,
        file: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<String, StoreError> {
        self.write_check(key)?;
        match &self.backend {
            Backend::Local(l) => l.put_file(key, file, progress),
            Backend::S3(s) => s.put_file(key, file, progress),
        }
    }

    /// Deletes the object; deleting a missing key succeeds (as on S3).
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.write_check(key)?;
        self.delete_unchecked(key)
    }

    fn delete_unchecked(&self, key: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(l) => l.delete(key),
            Backend::S3(s) => s.delete(key),
        }
    }

    /// Reads `range` fast: parts of `opts.part_size` fetched with up to `opts.max_in_flight`
    /// GETs at once, handed to `sink` in order as `(offset, bytes)` on the calling thread. An
    /// error from `sink` stops the read (the GETs still in flight are dropped).
    pub fn read_range_parallel(
        &self,
        key: &str,
        range: Range<u64>,
        opts: &ReadOptions,
        sink: &mut dyn FnMut(u64, Bytes) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.read_range_parallel_at(key, range, None, opts, sink)
    }

    /// [`Store::read_range_parallel`] of the object only as it was at `etag` (every part's GET
    /// carries If-Match): an object rewritten midway fails with [`StoreError::Precondition`]
    /// instead of mixing two versions.
    pub fn read_range_parallel_at(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        opts: &ReadOptions,
        sink: &mut dyn FnMut(u64, Bytes) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(l) => reader::read_parts_serial(range, opts, sink, |r| l.get_range(key, r, etag)),
            Backend::S3(s) => s.read_range_parallel(key, range, etag, opts, sink),
        }
    }

    /// Downloads the `size` bytes of object `key` at `etag` into `file` (from offset 0), with
    /// parallel ranged GETs.
    pub fn fetch_into(
        &self,
        key: &str,
        etag: &str,
        size: u64,
        file: &std::fs::File,
    ) -> Result<(), StoreError> {
        self.fetch_into_telling(key, etag, size, file, &mut |_| {})
    }

    /// [`Store::fetch_into`], calling `arrived` with each part's range once it is written (in
    /// file order), so readers of the file can start on what is there ([`Incoming`]).
    pub fn fetch_into_telling(
        &self,
        key: &str,
        etag: &str,
        size: u64,
        file: &std::fs::File,
        arrived: &mut dyn FnMut(Range<u64>),
    ) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let io = |e: std::io::Error| StoreError::Io { key: key.into(), reason: format!("local copy: {e}") };
        let mut written = 0;
        self.read_range_parallel_at(
            key,
            0..size,
            Some(etag),
            &ReadOptions::default(),
            &mut |offset, bytes| {
                file.write_all_at(&bytes, offset).map_err(io)?;
                written += bytes.len() as u64;
                arrived(offset..offset + bytes.len() as u64);
                Ok(())
            },
        )?;
        if written != size {
            return Err(StoreError::Io {
                key: key.into(),
                reason: format!("{written} of {size} bytes read"),
            });
        }
        Ok(())
    }

    /// The start-up probe: does the server honour conditional writes? Run once per `Store`
    /// (a definite outcome is kept); every write calls it first. Local directories always pass.
    pub fn ensure_writable(&self) -> Result<(), StoreError> {
        if let Some(known) = self.writable.get() {
            return known.clone();
        }
        // Only a definite answer is kept: a server that was unreachable is probed again.
        match commit::probe(self) {
            r @ (Ok(()) | Err(StoreError::NoConditionalWrites { .. })) => {
                self.writable.get_or_init(|| r).clone()
            }
            Err(e) => Err(e),
        }
    }

    fn write_check(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        self.ensure_writable()
    }

    fn s3_backend(&self) -> Option<&s3::S3Store> {
        match &self.backend {
            Backend::S3(s) => Some(s),
            Backend::Local(_) => None,
        }
    }

    fn local_backend(&self) -> Option<&local::LocalDir> {
        match &self.backend {
            Backend::Local(l) => Some(l),
            Backend::S3(_) => None,
        }
    }
}

// Shared by every FUSE and rayon thread.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Store>();
    send_sync::<ObjectReader>();
};

/// The precondition of a put.
#[derive(Clone, Copy, Debug)]
enum Cond<'a> {
    None,
    Absent,
    Match(&'a str),
}

/// Keys are relative `/`-separated paths the same on every backend: no leading or trailing `/`,
/// no empty, `.` or `..` segment, no NUL or backslash, at most 1024 bytes (S3's limit).
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| Err(StoreError::InvalidKey { key: key.into(), reason });
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if key.contains('\0') || key.contains('\\') {
        return bad("contains NUL or a backslash");
    }
    if key.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return bad("has an empty, `.` or `..` segment (or a leading or trailing `/`)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_the_same_everywhere() {
        for ok in ["registry.json", "models/a/model.safetensors", ".hidden/x", "a b/c"] {
            assert_eq!(check_key(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/abs", "a//b", "a/", "../x", "a/./b", "a\\b", "a\0b"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_key(&"a".repeat(1025)).is_err());
    }

    #[test]
    fn local_store_passes_the_probe_and_does_every_operation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        assert!(store.is_local());
        store.ensure_writable().unwrap();
        let e1 = store.put_if_absent("a/b", Bytes::from_static(b"hello")).unwrap();
        assert_eq!(
            store.put_if_absent("a/b", Bytes::from_static(b"x")),
            Err(StoreError::AlreadyExists { key: "a/b".into() })
        );
        assert_eq!(&store.get_range("a/b", 1..4).unwrap()[..], b"ell");
        let e2 = store.put_if_match("a/b", Bytes::from_static(b"world!"), &e1).unwrap();
        assert_ne!(e1, e2);
        assert_eq!(
            store.put_if_match("a/b", Bytes::from_static(b"lost"), &e1),
            Err(StoreError::Precondition { key: "a/b".into() })
        );
        let got = store.get("a/b").unwrap();
        assert_eq!((&got.bytes[..], got.etag.as_str()), (&b"world!"[..], e2.as_str()));
        assert_eq!(store.head("a/b").unwrap().size, 6);
        assert_eq!(store.list("a").unwrap().len(), 1);
        assert!(store.list("").unwrap().iter().all(|m| m.key != "lock"));
        store.delete("a/b").unwrap();
        store.delete("a/b").unwrap();
        assert_eq!(store.head("a/b"), Err(StoreError::NotFound { key: "a/b".into() }));
    }
}

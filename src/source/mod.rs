//! A file llmfs reads from, checked against the fingerprint it was added with, and why bytes
//! could not be read: the ground the recipes (`codec`, `delta`) and the views (`variant`) stand on.

pub mod checked;
mod mapped;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::format::{self, Header};
use crate::registry::{FileRecord, Fingerprint};
use crate::store::{Incoming, ObjectError, Objects};

/// Why bytes could not be produced. Every variant maps to EIO in the mount, with this message
/// (which names the file) in the log: nothing is ever served wrong silently.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {reason}")]
    Changed { path: String, reason: String },
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{0}")]
    Decode(String),
}

impl ReadError {
    fn io(path: &std::path::Path, e: io::Error) -> Self {
        ReadError::Io { path: path.display().to_string(), reason: e.to_string() }
    }
}

/// A file llmfs reads from (a base file, a stored container, a decoded file in the disk cache),
/// with the fingerprint it must still have. It is opened once and read with `pread`, or in place
/// through a mapping ([`SourceFile::read_mapped`]: the fills' bulk reads of bases, made safe
/// against a file that shrinks under it by `mapped.rs`'s SIGBUS handler). Either way short or
/// different bytes are caught: the fingerprint at every open, and after every read the file's
/// size, mtime and ctime against what they were when it was opened (an edit in place while a
/// variant is open, anywhere in the file, changes the ctime, which cannot be set back).
///
/// A file in an object store (a [`FileRecord`] with an `object`) is fetched whole into a local
/// file the first time its bytes are needed (by [`ObjectFiles`]: a temporary file for a
/// command, the disk cache in the mount), and read from there; its header alone is read with
/// ranged GETs, so building a view fetches nothing else. Its bytes are read as they arrive
/// ([`SourceFile::read_exact_at`] waits for its range only, so a decode overlaps the fetch);
/// [`SourceFile::file`] waits for the whole copy (passthrough hands it to the kernel). Every
/// GET is pinned to the recorded etag; `llmfs check` asks the store with a HEAD.
#[derive(Debug)]
pub struct SourceFile {
    /// The local path, or the object's address (for messages).
    pub path: PathBuf,
    pub fingerprint: Fingerprint,
    /// Where an object-store file's bytes come from, and its key there.
    remote: Option<(Objects, String)>,
    /// Opened and fully verified (sampled hash) on first use; the outcome is kept, with the
    /// file's (size, mtime, ctime) then (None: a file of llmfs's own, not checked per read).
    /// An object-store file's is its whole local copy.
    opened: OnceLock<Result<(File, Option<Stamp>), ReadError>>,
    /// An object-store file's local copy as it arrives (None: not asked for yet, or its fetch
    /// failed and the next read fetches again).
    incoming: Mutex<Option<Arc<Incoming>>>,
    /// A local file mapped for [`SourceFile::read_mapped`] on first use (None: read by `pread`).
    mapped: OnceLock<Option<mapped::Mapping>>,
}

/// (size, mtime ns, ctime ns) of an open file.
type Stamp = (u64, i64, i64);

fn stamp(file: &File) -> io::Result<Stamp> {
    Ok(stamp_of(&file.metadata()?))
}

fn stamp_of(m: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    (m.len(), ns(m.mtime(), m.mtime_nsec()), ns(m.ctime(), m.ctime_nsec()))
}

impl SourceFile {
    pub fn new(path: PathBuf, fingerprint: Fingerprint) -> Self {
        SourceFile {
            path,
            fingerprint,
            remote: None,
            opened: OnceLock::new(),
            incoming: Mutex::default(),
            mapped: OnceLock::new(),
        }
    }

    /// File `record` of an entry whose local files are in `dir`; an object-store file is read
    /// through `objects` (None: no store can read it, every read fails with a clear error).
    pub fn of_record(dir: &Path, record: &FileRecord, objects: Option<&Objects>) -> Self {
        let Some(object) = &record.object else {
            return SourceFile::new(dir.join(&record.name), record.fingerprint.clone());
        };
        let opened = OnceLock::new();
        let path = match objects {
            Some(o) => PathBuf::from(o.address(object)),
            None => {
                let _ = opened.set(Err(ReadError::Io {
                    path: object.clone(),
                    reason: "lives in an object store, and this registry was not opened on one".into(),
                }));
                PathBuf::from(object)
            }
        };
        SourceFile {
            path,
            fingerprint: record.fingerprint.clone(),
            remote: objects.map(|o| (o.clone(), object.clone())),
            opened,
            incoming: Mutex::default(),
            mapped: OnceLock::new(),
        }
    }

    /// Whether the bytes live in an object store.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The safetensors header (of an object-store file: two ranged reads, no whole fetch).
    pub fn header(&self) -> Result<Header, format::FileHeaderError> {
        let wrap = |source| format::FileHeaderError { path: self.path.clone(), source };
        let Some((objects, object)) = self.remote_unopened() else {
            return match &self.remote {
                // Fetched already: read it from the local copy.
                Some(_) => format::read_header(
                    self.file().map_err(|e| wrap(io::Error::other(e.to_string()).into()))?,
                )
                .map_err(wrap),
                None => format::read_header_path(&self.path),
            };
        };
        let size = self.fingerprint.size;
        let etag = self.fingerprint.etag.as_deref().unwrap_or_default();
        let get = |r: Range<u64>| {
            objects
                .read_range(object, etag, size, r)
                .map_err(|e| wrap(io::Error::other(e.to_string()).into()))
        };
        if size < 8 {
            return Err(wrap(format::HeaderError::TooShort(size)));
        }
        let prefix = get(0..8)?;
        let len = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        if len > format::MAX_HEADER_SIZE || len.saturating_add(8) > size {
            return format::parse_header_prefix(&prefix, size).map_err(wrap);
        }
        let mut bytes = prefix;
        bytes.extend(get(8..8 + len)?);
        format::parse_header_prefix(&bytes, size).map_err(wrap)
    }

    /// The whole file (small files: configs, tokenizers).
    pub fn read_all(&self) -> Result<Vec<u8>, ReadError> {
        let mut buf = vec![0u8; self.fingerprint.size as usize];
        self.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// An object-store file that is not fetched yet.
    fn remote_unopened(&self) -> Option<(&Objects, &str)> {
        match &self.remote {
            Some((o, key)) if self.opened.get().is_none() => Some((o, key.as_str())),
            _ => None,
        }
    }

    /// A file llmfs wrote itself and holds open (a decoded file of the disk cache, checked by
    /// the cache before it is handed out): trusted as it is. Not checked per read: the cache
    /// renames it into place (a new ctime) while it is read.
    pub fn already_open(path: PathBuf, file: File) -> io::Result<Self> {
        let st = stamp(&file)?;
        let fingerprint = Fingerprint { size: st.0, mtime_ns: st.1, hash: String::new(), etag: None };
        Ok(SourceFile {
            path,
            fingerprint,
            remote: None,
            opened: OnceLock::from(Ok((file, None))),
            incoming: Mutex::default(),
            mapped: OnceLock::new(),
        })
    }

    /// The cheap check (size and mtime), as a reason (without the path) if it fails.
    pub fn stat_problem(&self) -> Option<String> {
        if self.remote.is_some() {
            return None;
        }
        match std::fs::metadata(&self.path) {
            Err(e) => Some(format!("cannot be read: {e}")),
            Ok(meta) if !self.fingerprint.matches_stat(&meta) => Some(format!(
                "changed since it was added (size {} → {}, or its modification time)",
                self.fingerprint.size,
                meta.len()
            )),
            Ok(_) => None,
        }
    }

    /// Checks the file is still the one that was added: called whenever a virtual file that reads
    /// from it is opened. The first call also verifies the sampled hash; later ones also
    /// compare the open file with what it was then (a write in place, even one that restores the
    /// mtime, changes the ctime).
    ///
    /// An object-store file's fetch starts here (once), every GET pinned to the recorded etag,
    /// and the check returns when its first part has arrived: an object changed since it was
    /// added fails that part (EIO at the open, as a changed local file), the rest arrives while
    /// the file is read. A copy fetched before holds exactly the bytes the entry was made from,
    /// so it is served without asking the store again (a HEAD per open cost warm loads a third
    /// of their speed). `llmfs check` asks ([`SourceFile::object_unchanged`]).
    pub fn check(&self) -> Result<(), ReadError> {
        if self.remote.is_some() {
            let first = 0..self.fingerprint.size.min(1);
            return self.arrived(first);
        }
        if let Some(reason) = self.stat_problem() {
            return Err(ReadError::Changed { path: self.path.display().to_string(), reason });
        }
        self.unchanged_since_opened().map(|_| ())
    }

    /// An object-store file: fetches it whole (or waits for its fetch in progress), for a
    /// prefetch that goes one object after another.
    pub fn fetch_whole(&self) -> Result<(), ReadError> {
        match self.remote {
            Some(_) => self.arrived(0..self.fingerprint.size),
            None => self.check(),
        }
    }

    /// An object-store file's local copy as it arrives: started on first use, and again after
    /// a failed fetch.
    fn incoming(&self) -> Result<Arc<Incoming>, ReadError> {
        let Some((objects, object)) = &self.remote else { unreachable!("only an object-store file arrives") };
        if let Some(Err(e)) = self.opened.get() {
            // No store can read it (see `of_record`).
            return Err(e.clone());
        }
        let mut slot = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = &*slot {
            return Ok(i.clone());
        }
        let etag = self.fingerprint.etag.as_deref().unwrap_or_default();
        let i = objects.incoming(object, etag, self.fingerprint.size).map_err(|e| self.object_error(e))?;
        *slot = Some(i.clone());
        Ok(i)
    }

    /// Waits until bytes `r` of an object-store file have arrived. A failed fetch is forgotten,
    /// so a later read fetches again (the store may be back).
    fn arrived(&self, r: Range<u64>) -> Result<(), ReadError> {
        let incoming = self.incoming()?;
        self.arrival_outcome(&incoming, incoming.arrivals.wait_for(r))
    }

    fn arrival_outcome<T>(
        &self,
        incoming: &Arc<Incoming>,
        outcome: Result<T, ObjectError>,
    ) -> Result<T, ReadError> {
        outcome.map_err(|e| {
            let mut slot = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|i| Arc::ptr_eq(i, incoming)) {
                *slot = None;
            }
            self.object_error(e)
        })
    }

    /// An object's error as a read error that names the object.
    fn object_error(&self, e: ObjectError) -> ReadError {
        match e {
            // As a changed local base file: EIO, and the same line in the log.
            ObjectError::Changed { .. } => ReadError::Changed { path: self.where_(), reason: e.to_string() },
            ObjectError::Unavailable(reason) => ReadError::Io { path: self.where_(), reason },
        }
    }

    /// The open file, if its size, mtime and ctime are what they were when it was opened.
    fn unchanged_since_opened(&self) -> Result<&File, ReadError> {
        let (file, opened) = self.opened()?;
        match opened.map(|st| stamp(file).map(|now| now == st)) {
            None | Some(Ok(true)) => Ok(file),
            Some(Ok(false)) => Err(ReadError::Changed {
                path: self.path.display().to_string(),
                reason: "changed while mounted (size, modification or change time differs)".into(),
            }),
            Some(Err(e)) => Err(ReadError::io(&self.path, e)),
        }
    }

    /// The open file (verified on first use).
    pub fn file(&self) -> Result<&File, ReadError> {
        self.opened().map(|(f, _)| f)
    }

    fn opened(&self) -> Result<&(File, Option<Stamp>), ReadError> {
        if let Some(known) = self.opened.get() {
            return known.as_ref().map_err(Clone::clone);
        }
        match self.open_now() {
            // A store that is down now may be back for the next read: fetch again then.
            Err(e) if self.remote.is_some() => return Err(e),
            // A racing thread may have set it first; both opened the same file.
            now => {
                let _ = self.opened.set(now);
            }
        }
        self.opened.get().expect("set above").as_ref().map_err(Clone::clone)
    }

    fn open_now(&self) -> Result<(File, Option<Stamp>), ReadError> {
        if let Some((objects, object)) = &self.remote {
            let etag = self.fingerprint.etag.as_deref().unwrap_or_default();
            let file =
                objects.local_copy(object, etag, self.fingerprint.size).map_err(|e| self.object_error(e))?;
            return Ok((file, None));
        }
        let changed = |reason| ReadError::Changed { path: self.path.display().to_string(), reason };
        let file = File::open(&self.path).map_err(|e| changed(format!("cannot be read: {e}")))?;
        let meta = file.metadata().map_err(|e| ReadError::io(&self.path, e))?;
        // Its sampled hash, unless this node checked it with this same stat before (see
        // `checked`); its size and mtime against the fingerprint's in any case.
        if !self.fingerprint.matches_stat(&meta) || !checked::trusted(&self.path, &meta, &self.fingerprint) {
            if let Some(reason) = self.fingerprint.verify_open(&file) {
                return Err(changed(reason));
            }
            checked::passed(&self.path, &meta, &self.fingerprint);
        }
        // The stat from before the check: a write during it shows at the next open.
        Ok((file, Some(stamp_of(&meta))))
    }

    /// An object-store file: does the object still have the recorded etag (a HEAD)?
    pub fn object_unchanged(&self) -> Result<(), ReadError> {
        let Some((objects, object)) = &self.remote else { return Ok(()) };
        let want = self.fingerprint.etag.as_deref().unwrap_or_default();
        let now =
            objects.etag(object).map_err(|e| ReadError::Io { path: self.where_(), reason: e.to_string() })?;
        if now != want {
            return Err(ReadError::Changed {
                path: self.where_(),
                reason: format!("changed in the store since it was added (etag {want} → {now})"),
            });
        }
        Ok(())
    }

    fn where_(&self) -> String {
        self.path.display().to_string()
    }

    /// Read exactly `buf.len()` bytes at `offset`, then check that the file did not change
    /// since it was opened (a write during the read changes it before it returns).
    /// An object-store file's bytes are read from its local copy as soon as they have arrived.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
        if self.remote.is_some() {
            if let Some(Ok((file, _))) = self.opened.get() {
                return file.read_exact_at(buf, offset).map_err(|e| ReadError::io(&self.path, e));
            }
            let incoming = self.incoming()?;
            return self.arrival_outcome(&incoming, incoming.read_exact_at(buf, offset));
        }
        self.file()?.read_exact_at(buf, offset).map_err(|e| ReadError::io(&self.path, e))?;
        self.unchanged_since_opened().map(|_| ())
    }

    /// `f` over bytes `offset..offset + len` of the file in place, through a shared mapping,
    /// with no copy (see `mapped.rs`); checked afterwards as [`SourceFile::read_exact_at`] is,
    /// and an error where a mapped page could not be read (the file shrank). `Err(f)` where the
    /// file is not mapped (an object-store file, a file that did not open, a range past the
    /// size it was opened with, `LLMFS_MAP_SOURCES=0`): the caller reads it by `pread`.
    pub fn read_mapped<R, F: FnOnce(&[u8]) -> R>(
        &self,
        offset: u64,
        len: usize,
        f: F,
    ) -> Result<Result<R, ReadError>, F> {
        let Some(m) = self.mapping() else { return Err(f) };
        if offset.checked_add(len as u64).is_none_or(|end| end > m.len()) {
            return Err(f);
        }
        Ok(m.read(offset, len, f)
            .map_err(|mapped::Shrank| ReadError::Changed {
                path: self.path.display().to_string(),
                reason: "shrank while mounted (a mapped page past its end)".into(),
            })
            .and_then(|out| self.unchanged_since_opened().map(|_| out)))
    }

    fn mapping(&self) -> Option<&mapped::Mapping> {
        if self.remote.is_some() || !map_sources() {
            return None;
        }
        self.mapped
            .get_or_init(|| {
                let (file, stamp) = self.opened().ok()?;
                mapped::Mapping::new(file, stamp.as_ref()?.0)
            })
            .as_ref()
    }
}

/// Whether local source files are read through mappings ([`SourceFile::read_mapped`]), or all
/// by `pread` with `LLMFS_MAP_SOURCES=0` (for comparisons).
fn map_sources() -> bool {
    static MAP: OnceLock<bool> = OnceLock::new();
    *MAP.get_or_init(|| std::env::var("LLMFS_MAP_SOURCES").as_deref() != Ok("0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::FileRole;
    use crate::store::ObjectFiles;
    use std::sync::mpsc;
    use std::time::Duration;

    /// An object store whose fetches the test drives: each `incoming` hands out the next copy
    /// the test made, and counts the fetches started.
    struct Driven {
        copies: Mutex<Vec<Arc<Incoming>>>,
        started: Mutex<usize>,
    }

    impl ObjectFiles for Driven {
        fn read_range(&self, _: &str, _: &str, _: u64, _: Range<u64>) -> Result<Vec<u8>, ObjectError> {
            Err(ObjectError::Unavailable("no ranged reads here".into()))
        }
        fn etag(&self, _: &str) -> Result<String, ObjectError> {
            Ok("e1".into())
        }
        fn local_copy(&self, o: &str, e: &str, size: u64) -> Result<File, ObjectError> {
            let i = self.incoming(o, e, size)?;
            i.whole_file()?.try_clone().map_err(|e| ObjectError::Unavailable(e.to_string()))
        }
        fn incoming(&self, _: &str, _: &str, _: u64) -> Result<Arc<Incoming>, ObjectError> {
            *self.started.lock().unwrap() += 1;
            self.copies.lock().unwrap().pop().ok_or_else(|| ObjectError::Unavailable("no copy".into()))
        }
        fn address(&self, object: &str) -> String {
            format!("s3://test/{object}")
        }
    }

    /// A remote source file of `size` bytes over `driven`.
    fn remote(driven: &Arc<Driven>, size: u64) -> Arc<SourceFile> {
        let record = FileRecord {
            name: "model.safetensors".into(),
            role: FileRole::Weights,
            fingerprint: Fingerprint { size, mtime_ns: 0, hash: String::new(), etag: Some("e1".into()) },
            object: Some("models/base/u1/model.safetensors".into()),
        };
        let objects = Objects(driven.clone());
        Arc::new(SourceFile::of_record(Path::new("/nonexistent"), &record, Some(&objects)))
    }

    /// A copy of `size` bytes being fetched into a file of `dir`, and the file to write it with.
    fn arriving(dir: &Path, name: &str, size: u64) -> (Arc<Incoming>, File) {
        let path = dir.join(name);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        let i = Arc::new(Incoming::new(size));
        i.set_file(f.try_clone().unwrap());
        (i, f)
    }

    /// `source.read_exact_at(len bytes at offset)` on a thread, its outcome sent back.
    fn read_async(
        source: &Arc<SourceFile>,
        offset: u64,
        len: usize,
    ) -> mpsc::Receiver<Result<Vec<u8>, ReadError>> {
        let (tx, rx) = mpsc::channel();
        let s = source.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; len];
            let _ = tx.send(s.read_exact_at(&mut buf, offset).map(|()| buf));
        });
        rx
    }

    #[test]
    fn a_remote_file_is_read_as_its_parts_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let (copy, f) = arriving(dir.path(), "c", 300);
        let driven = Arc::new(Driven { copies: Mutex::new(vec![copy.clone()]), started: Mutex::new(0) });
        let source = remote(&driven, 300);
        // Out of order: the last part first. A read of it returns while the rest is on its way
        // (a read that waited for the whole copy would not).
        f.write_all_at(&[3u8; 100], 200).unwrap();
        copy.arrivals.arrived(200..300);
        let got = read_async(&source, 250, 50).recv_timeout(Duration::from_secs(10));
        assert_eq!(got.expect("read before the whole copy arrived").unwrap(), vec![3u8; 50]);
        // A read of what has not arrived waits for it, and for it only.
        let first = read_async(&source, 0, 150);
        assert!(first.recv_timeout(Duration::from_millis(100)).is_err(), "returned before its bytes came");
        f.write_all_at(&[1u8; 100], 0).unwrap();
        copy.arrivals.arrived(0..100);
        assert!(first.recv_timeout(Duration::from_millis(100)).is_err(), "half of its range is there");
        f.write_all_at(&[2u8; 100], 100).unwrap();
        copy.arrivals.arrived(100..200);
        let got = first.recv_timeout(Duration::from_secs(10)).expect("woken").unwrap();
        assert_eq!(got, [vec![1u8; 100], vec![2u8; 50]].concat());
        copy.arrivals.finish(Ok(()));
        source.check().unwrap();
        assert_eq!(*driven.started.lock().unwrap(), 1, "one fetch for every read");
    }

    #[test]
    fn a_fetch_that_fails_midway_fails_its_readers_and_the_next_read_fetches_again() {
        let dir = tempfile::tempdir().unwrap();
        let (broken, f) = arriving(dir.path(), "broken", 200);
        let (again, g) = arriving(dir.path(), "again", 200);
        // Popped from the end: `broken` first.
        let driven = Arc::new(Driven {
            copies: Mutex::new(vec![again.clone(), broken.clone()]),
            started: Mutex::new(0),
        });
        let source = remote(&driven, 200);
        f.write_all_at(&[1u8; 100], 0).unwrap();
        broken.arrivals.arrived(0..100);
        source.check().unwrap();
        let waiting = read_async(&source, 50, 100);
        assert!(waiting.recv_timeout(Duration::from_millis(100)).is_err());
        broken.arrivals.finish(Err(ObjectError::Unavailable("connection refused".into())));
        let err = waiting.recv_timeout(Duration::from_secs(10)).expect("woken by the failure").unwrap_err();
        assert!(
            matches!(&err, ReadError::Io { path, reason } if path.contains("models/base/u1/model.safetensors") && reason.contains("refused")),
            "{err:?}"
        );
        // The next read starts a new fetch, and gets its bytes.
        g.write_all_at(&[5u8; 200], 0).unwrap();
        again.arrivals.finish(Ok(()));
        let got = read_async(&source, 50, 100).recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(got, vec![5u8; 100]);
        assert_eq!(*driven.started.lock().unwrap(), 2);
        // A changed object is told as such.
        let (changed, _h) = arriving(dir.path(), "changed", 10);
        let driven = Arc::new(Driven { copies: Mutex::new(vec![changed.clone()]), started: Mutex::new(0) });
        let source = remote(&driven, 10);
        changed.arrivals.finish(Err(ObjectError::Changed { etag: "e1".into() }));
        assert!(matches!(source.check(), Err(ReadError::Changed { .. })));
    }
}

//! A file llmfs reads from, checked against the fingerprint it was added with, and why bytes
//! could not be read: the ground the recipes (`codec`, `delta`) and the views (`variant`) stand on.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::format::{self, Header};
use crate::registry::{FileRecord, Fingerprint};
use crate::store::{ObjectError, Objects};

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
/// with the fingerprint it must still have. It is opened once and read with `pread`, never
/// mapped: a file changed under a mapping would SIGBUS the daemon, while `pread` only returns
/// short or different bytes, which the checks catch: the fingerprint at every open, and after
/// every read the file's size, mtime and ctime against what they were when it was opened (an
/// edit in place while a variant is open, anywhere in the file, changes the ctime, which cannot
/// be set back).
///
/// A file in an object store (a [`FileRecord`] with an `object`) is fetched whole into a local
/// file the first time its bytes are needed (by [`ObjectFiles`]: a temporary file for a
/// command, the disk cache in the mount), and read from there; its header alone is read with
/// ranged GETs, so building a view fetches nothing else. Its check is a HEAD: the etag must
/// still be the one recorded (every GET is pinned to that etag too).
#[derive(Debug)]
pub struct SourceFile {
    /// The local path, or the object's address (for messages).
    pub path: PathBuf,
    pub fingerprint: Fingerprint,
    /// Where an object-store file's bytes come from, and its key there.
    remote: Option<(Objects, String)>,
    /// Opened and fully verified (sampled hash) on first use; the outcome is kept, with the
    /// file's (size, mtime, ctime) then (None: a file of llmfs's own, not checked per read).
    opened: OnceLock<Result<(File, Option<Stamp>), ReadError>>,
}

/// (size, mtime ns, ctime ns) of an open file.
type Stamp = (u64, i64, i64);

fn stamp(file: &File) -> io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    Ok((m.len(), ns(m.mtime(), m.mtime_nsec()), ns(m.ctime(), m.ctime_nsec())))
}

impl SourceFile {
    pub fn new(path: PathBuf, fingerprint: Fingerprint) -> Self {
        SourceFile { path, fingerprint, remote: None, opened: OnceLock::new() }
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
        Ok(SourceFile { path, fingerprint, remote: None, opened: OnceLock::from(Ok((file, None))) })
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
    /// An object-store file is fetched here (once), every GET pinned to the recorded etag: an
    /// object changed since it was added fails that fetch (EIO), and a copy fetched before
    /// holds exactly the bytes the entry was made from, so it is served without asking the
    /// store again (a HEAD per open cost warm loads a third of their speed). `llmfs check`
    /// asks ([`SourceFile::object_unchanged`]).
    pub fn check(&self) -> Result<&File, ReadError> {
        if self.remote.is_some() {
            return self.file();
        }
        if let Some(reason) = self.stat_problem() {
            return Err(ReadError::Changed { path: self.path.display().to_string(), reason });
        }
        self.unchanged_since_opened()
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
            let file = objects.local_copy(object, etag, self.fingerprint.size).map_err(|e| match e {
                // As a changed local base file: EIO, and the same line in the log.
                ObjectError::Changed { .. } => {
                    ReadError::Changed { path: self.where_(), reason: e.to_string() }
                }
                ObjectError::Unavailable(reason) => ReadError::Io { path: self.where_(), reason },
            })?;
            return Ok((file, None));
        }
        if let Some(reason) = self.fingerprint.verify(&self.path) {
            return Err(ReadError::Changed { path: self.path.display().to_string(), reason });
        }
        let file = File::open(&self.path).map_err(|e| ReadError::io(&self.path, e))?;
        let st = stamp(&file).map_err(|e| ReadError::io(&self.path, e))?;
        Ok((file, Some(st)))
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
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
        self.file()?.read_exact_at(buf, offset).map_err(|e| ReadError::io(&self.path, e))?;
        self.unchanged_since_opened().map(|_| ())
    }
}

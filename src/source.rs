//! A file llmfs reads from, checked against the fingerprint it was added with, and why bytes
//! could not be read: the ground the recipes (`codec`, `delta`) and the views (`variant`) stand on.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::registry::Fingerprint;

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
#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub fingerprint: Fingerprint,
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
        SourceFile { path, fingerprint, opened: OnceLock::new() }
    }

    /// A file llmfs wrote itself and holds open (a decoded file of the disk cache, checked by
    /// the cache before it is handed out): trusted as it is. Not checked per read: the cache
    /// renames it into place (a new ctime) while it is read.
    pub fn already_open(path: PathBuf, file: File) -> io::Result<Self> {
        let st = stamp(&file)?;
        let fingerprint = Fingerprint { size: st.0, mtime_ns: st.1, hash: String::new() };
        Ok(SourceFile { path, fingerprint, opened: OnceLock::from(Ok((file, None))) })
    }

    /// The cheap check (size and mtime), as a reason (without the path) if it fails.
    pub fn stat_problem(&self) -> Option<String> {
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
    pub fn check(&self) -> Result<&File, ReadError> {
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
        self.opened
            .get_or_init(|| {
                if let Some(reason) = self.fingerprint.verify(&self.path) {
                    return Err(ReadError::Changed { path: self.path.display().to_string(), reason });
                }
                let file = File::open(&self.path).map_err(|e| ReadError::io(&self.path, e))?;
                let st = stamp(&file).map_err(|e| ReadError::io(&self.path, e))?;
                Ok((file, Some(st)))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Read exactly `buf.len()` bytes at `offset`, then check that the file did not change
    /// since it was opened (a write during the read changes it before it returns).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
        self.file()?.read_exact_at(buf, offset).map_err(|e| ReadError::io(&self.path, e))?;
        self.unchanged_since_opened().map(|_| ())
    }
}

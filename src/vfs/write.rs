//! The write path: `cp -r FINETUNED MOUNT/<base>/deltas/NEW/` stores a delta.
//!
//! `mkdir deltas/NEW` opens a staging session (a directory under `STORE/tmp/`). Each file written
//! into it is staged on disk there (never held in memory). A safetensors file whose bytes arrive
//! in order is also coded while it is written: each chunk of each tensor is coded against the
//! base on the rayon pool as soon as it is complete (`delta::stream`), into a container in the
//! staging directory, so close has only the last chunks left. When the file is closed (flush),
//! that container is finished, or, if the writes did not allow it (a rewrite of bytes already
//! coded, a hole, a header that does not parse, any other file), the staged file is coded then
//! (`delta::make::store_file`; the same container bytes either way); it moves to
//! `STORE/models/NEW/`, and the registry gains it in one atomic update: entry NEW appears with its
//! first closed file and grows with each one. A failure to store (a full disk, say) is returned by
//! close() itself, so `cp` reports it; the staged bytes stay until the file is written again or
//! removed. A daemon killed mid-write leaves only staging directories, swept at the next start:
//! the registry never names a half-written file.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{FsError, FsResult};
use crate::delta::stream::Stream;
use crate::delta::{self, DeltaCodec};
use crate::registry::{self, EntryKind, Store};

/// One `deltas/NEW/` directory being written.
///
/// A staged file lives until its last writer's handle is released, not until its first store:
/// the kernel sends a FLUSH for every close(2) of any descriptor of the file, and a descriptor
/// inherited by a forked child is closed at the child's exec while the parent still writes. Such
/// a FLUSH stores the file as it is then; the writer's own close stores it again, complete.
struct Session {
    dir: PathBuf,
    /// Staged files by name (being written, or stored and still open for writing).
    files: HashMap<String, PathBuf>,
    /// Per staged file: open write handles, the write version (bumped by every write, resize
    /// and truncating open), the version last stored, and a lock that runs one store at a time.
    state: HashMap<String, FileState>,
    /// Files being coded as they are written (`delta::stream`), by name.
    streams: HashMap<String, Arc<Stream>>,
    /// The base's tensors, found once for the session's streams (None: not yet, or the base
    /// cannot be read now: files are then coded at close, which reports why).
    base: Option<Arc<delta::make::BaseTensors>>,
}

#[derive(Default)]
struct FileState {
    writers: usize,
    version: u64,
    stored: Option<u64>,
    storing: Arc<Mutex<()>>,
}

impl FileState {
    /// The staged bytes are the stored ones (nothing written since the last store).
    fn clean(&self) -> bool {
        self.stored == Some(self.version)
    }
}

/// Numbers the streams' containers, so a stream started anew never meets its predecessor's file.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(0);

impl Session {
    /// A private staging directory `STORE/tmp/write-NAME.PID.SECS` (the sweep reads the PID).
    fn new(store: &Store, name: &str) -> FsResult<Session> {
        let dir =
            store.tmp_dir().join(format!("write-{name}.{}.{}", std::process::id(), registry::now_secs()));
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| io_fs("staging", e))?;
        Ok(Session { dir, files: HashMap::new(), state: HashMap::new(), streams: HashMap::new(), base: None })
    }

    /// Start coding staged `file` as it is written (dropping any stream it had).
    fn restart_stream(&mut self, store: &Store, base: &str, file: &str) {
        self.streams.remove(file);
        if !file.ends_with(".safetensors") {
            return;
        }
        if self.base.is_none() {
            let tensors = store
                .load()
                .ok()
                .and_then(|r| delta::make::base_view(&r, base).ok())
                .map(|v| delta::make::BaseTensors::of(&v));
            self.base = tensors.map(Arc::new);
        }
        let (Some(path), Some(tensors)) = (self.files.get(file), &self.base) else { return };
        let container =
            self.dir.join(format!(".{file}.{}.container", NEXT_STREAM.fetch_add(1, Ordering::Relaxed)));
        if let Some(s) = Stream::new(path, file, container, tensors.clone()) {
            self.streams.insert(file.to_owned(), Arc::new(s));
        }
    }
}

/// All sessions of a mount, keyed by (base entry, new entry).
#[derive(Default)]
pub struct Staging {
    sessions: Mutex<HashMap<(String, String), Session>>,
}

fn errno_of(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
        _ => libc::EIO,
    }
}

fn io_fs(what: &str, e: io::Error) -> FsError {
    FsError { errno: errno_of(&e), message: Some(format!("{what}: {e}")) }
}

/// A registry error as an errno: a full disk stays ENOSPC, anything else is EIO.
fn registry_fs(e: registry::Error) -> FsError {
    match &e {
        registry::Error::Io { source, .. } => {
            FsError { errno: errno_of(source), message: Some(e.to_string()) }
        }
        _ => FsError::eio(e.to_string()),
    }
}

impl Staging {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `mkdir MOUNT/<base>/deltas/<name>`.
    pub fn mkdir(&self, store: &Store, base: &str, name: &str) -> FsResult<()> {
        registry::validate_name(name)
            .map_err(|e| FsError { errno: libc::EINVAL, message: Some(e.to_string()) })?;
        let registry = store.load().map_err(registry_fs)?;
        registry.get(base).map_err(|_| FsError::new(libc::ENOENT))?;
        let mut sessions = self.lock();
        if registry.entries.contains_key(name) || sessions.keys().any(|(_, n)| n == name) {
            return Err(FsError::new(libc::EEXIST));
        }
        sessions.insert((base.to_owned(), name.to_owned()), Session::new(store, name)?);
        Ok(())
    }

    pub fn has_session(&self, base: &str, name: &str) -> bool {
        self.lock().contains_key(&(base.to_owned(), name.to_owned()))
    }

    /// Names of the sessions open under `base`.
    pub fn sessions(&self, base: &str) -> Vec<String> {
        self.lock().keys().filter(|(b, _)| b == base).map(|(_, n)| n.clone()).collect()
    }

    /// Staged files of a session with their current sizes.
    pub fn staged(&self, base: &str, name: &str) -> Vec<(String, u64)> {
        let sessions = self.lock();
        let Some(s) = sessions.get(&(base.to_owned(), name.to_owned())) else { return vec![] };
        s.files.iter().map(|(f, p)| (f.clone(), fs::metadata(p).map_or(0, |m| m.len()))).collect()
    }

    pub fn staged_size(&self, base: &str, name: &str, file: &str) -> Option<u64> {
        let sessions = self.lock();
        let path = sessions.get(&(base.to_owned(), name.to_owned()))?.files.get(file)?;
        Some(fs::metadata(path).map_or(0, |m| m.len()))
    }

    /// Open staged file `file` for writing, creating (and truncating, when `truncate`) it; a
    /// session is opened implicitly for a delta entry that already exists (writing more files).
    pub fn open(&self, store: &Store, base: &str, name: &str, file: &str, truncate: bool) -> FsResult<File> {
        registry::validate_name(file)
            .map_err(|e| FsError { errno: libc::EINVAL, message: Some(e.to_string()) })?;
        let key = (base.to_owned(), name.to_owned());
        let mut sessions = self.lock();
        if !sessions.contains_key(&key) {
            sessions.insert(key.clone(), Session::new(store, name)?);
        }
        let session = sessions.get_mut(&key).expect("inserted above");
        let path = session.dir.join(file);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_fs("staging", e))?;
        let new = session.files.insert(file.to_owned(), path).is_none();
        let state = session.state.entry(file.to_owned()).or_default();
        state.writers += 1;
        if truncate {
            state.version += 1;
        }
        if truncate || new {
            // Empty now (or about to be filled by a copy of the stored file, which a stream
            // never sees as written, so it then codes nothing and close codes the staged file).
            session.restart_stream(store, base, file);
        }
        Ok(f)
    }

    /// Note a change of staged `file`'s bytes; returns its stream, if it has one.
    fn changed(&self, base: &str, name: &str, file: &str) -> Option<Arc<Stream>> {
        let mut sessions = self.lock();
        let s = sessions.get_mut(&(base.to_owned(), name.to_owned()))?;
        if let Some(state) = s.state.get_mut(file) {
            state.version += 1;
        }
        s.streams.get(file).cloned()
    }

    /// `data.len()` bytes were written at `offset` of staged `file`: code what is now complete.
    pub fn written(&self, base: &str, name: &str, file: &str, offset: u64, len: u64) {
        if let Some(s) = self.changed(base, name, file) {
            s.written(offset, len);
        }
    }

    /// Staged `file` was truncated or extended to `size`.
    pub fn resized(&self, store: &Store, base: &str, name: &str, file: &str, size: u64) {
        let stream = self.changed(base, name, file);
        if size == 0 {
            // `open(O_TRUNC)` where the kernel sends the truncation separately: start afresh.
            if let Some(s) = self.lock().get_mut(&(base.to_owned(), name.to_owned())) {
                if s.streams.contains_key(file) {
                    s.restart_stream(store, base, file);
                }
            }
        } else if let Some(s) = stream {
            s.resized(size);
        }
    }

    /// The staged file, for reads of a file still being written.
    pub fn staged_path(&self, base: &str, name: &str, file: &str) -> Option<PathBuf> {
        self.lock().get(&(base.to_owned(), name.to_owned()))?.files.get(file).cloned()
    }

    /// Store staged `file` as part of delta entry `name` over `base` (close() of a written file).
    pub fn commit(&self, store: &Store, base: &str, name: &str, file: &str) -> FsResult<()> {
        let storing = {
            let sessions = self.lock();
            let state = sessions.get(&(base.to_owned(), name.to_owned())).and_then(|s| s.state.get(file));
            // Removed while open (rm, or a discarded failed store): nothing to store.
            let Some(state) = state else { return Ok(()) };
            state.storing.clone()
        };
        // One store of a file at a time (two FLUSHes of one file can arrive together).
        let _storing = storing.lock().unwrap_or_else(|e| e.into_inner());
        let (staged, stream, version) = {
            let mut sessions = self.lock();
            let Some(s) = sessions.get_mut(&(base.to_owned(), name.to_owned())) else { return Ok(()) };
            let (Some(staged), Some(state)) = (s.files.get(file).cloned(), s.state.get(file)) else {
                return Ok(());
            };
            if state.clean() {
                return Ok(());
            }
            let version = state.version;
            // A stream codes one writing of the file: taken now, whatever comes of it.
            (staged, s.streams.remove(file), version)
        };
        let registry = store.load().map_err(registry_fs)?;
        let base_entry = registry.get(base).map_err(registry_fs)?.clone();
        let view = delta::make::base_view(&registry, base).map_err(registry_fs)?;
        let dir = store.entry_dir(name);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| io_fs("store", e))?;
        let size = fs::metadata(&staged).map_err(|e| io_fs("staging", e))?.len();
        let streamed = match stream.and_then(|s| s.finish(size)) {
            Some(Ok(done)) => Some(done),
            Some(Err(e)) => return Err(registry_fs(e)),
            None => None,
        };
        let (tmp, record) = match streamed {
            // Coded while it was written: the container is complete in the staging directory.
            Some(done) => done,
            None => {
                let tmp = dir.join(format!(".{file}.{}.tmp", std::process::id()));
                let _ = fs::remove_file(&tmp);
                let base_tensors = delta::make::BaseTensors::of(&view);
                // store_file names the container after its source, so code from the staged path.
                let record = delta::make::store_file(&staged, &tmp, &base_tensors, DeltaCodec::Lossless)
                    .map_err(registry_fs)?;
                (tmp, record)
            }
        };
        let dest = dir.join(file);
        let result = store.update(|r| {
            match r.entries.get_mut(name) {
                Some(e) => match &mut e.kind {
                    EntryKind::Delta { base: b, files, .. } if b == base => {
                        files.retain(|f| f.name != file);
                        files.push(record.clone());
                        files.sort_by(|a, b| a.name.cmp(&b.name));
                    }
                    _ => return Err(registry::Error::Exists(name.to_owned())),
                },
                None => {
                    let entry = delta::make::new_entry(
                        name,
                        base,
                        &base_entry,
                        DeltaCodec::Lossless,
                        vec![record.clone()],
                    );
                    r.entries.insert(name.to_owned(), entry);
                }
            }
            // Into place while holding the store lock, so the registry and the file agree.
            fs::rename(&tmp, &dest).map_err(registry::io_err(&dest))?;
            Ok(())
        });
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(registry_fs(e));
        }
        // Stored as of `version`: clean unless written meanwhile. The staged file stays while a
        // writer has it open ([`Staging::closed`] removes it).
        if let Some(state) =
            self.lock().get_mut(&(base.to_owned(), name.to_owned())).and_then(|s| s.state.get_mut(file))
        {
            state.stored = Some(version);
        }
        Ok(())
    }

    /// A writer's handle of staged `file` was released (after its last store or discard). With
    /// no writer left the staged copy goes: the stored file speaks for it, and with nothing
    /// left staged the entry speaks for the directory (a later `llmfs rm NAME` leaves no trace).
    pub fn closed(&self, base: &str, name: &str, file: &str) {
        let key = (base.to_owned(), name.to_owned());
        let mut sessions = self.lock();
        let Some(s) = sessions.get_mut(&key) else { return };
        let Some(state) = s.state.get_mut(file) else { return };
        state.writers = state.writers.saturating_sub(1);
        if state.writers > 0 {
            return;
        }
        s.state.remove(file);
        s.streams.remove(file);
        if let Some(p) = s.files.remove(file) {
            let _ = fs::remove_file(p);
        }
        if s.files.is_empty() {
            if let Some(s) = sessions.remove(&key) {
                let _ = fs::remove_dir_all(s.dir);
            }
        }
    }

    /// Whether staged `file` holds bytes not stored yet.
    fn unstored(s: &Session, file: &str) -> bool {
        s.files.contains_key(file) && !s.state.get(file).is_some_and(FileState::clean)
    }

    /// Forget a staged file (its store failed and its writer is gone).
    pub fn discard(&self, base: &str, name: &str, file: &str) {
        if let Some(s) = self.lock().get_mut(&(base.to_owned(), name.to_owned())) {
            s.streams.remove(file);
            if let Some(p) = s.files.remove(file) {
                let _ = fs::remove_file(p);
            }
        }
    }

    /// `rm MOUNT/<base>/deltas/<name>/<file>`: drop a staged file, and a stored one from the entry.
    pub fn unlink(&self, store: &Store, base: &str, name: &str, file: &str) -> FsResult<()> {
        let mut was_staged = false;
        if let Some(s) = self.lock().get_mut(&(base.to_owned(), name.to_owned())) {
            s.streams.remove(file);
            if let Some(p) = s.files.remove(file) {
                let _ = fs::remove_file(p);
                was_staged = true;
            }
        }
        let removed = store
            .update(|r| match r.entries.get_mut(name).map(|e| &mut e.kind) {
                Some(EntryKind::Delta { base: b, files, .. }) if b == base => {
                    let before = files.len();
                    files.retain(|f| f.name != file);
                    if files.len() == before {
                        return Err(registry::Error::NotFound(file.to_owned()));
                    }
                    Ok(())
                }
                _ => Err(registry::Error::NotFound(name.to_owned())),
            })
            .map_err(|e| match e {
                registry::Error::NotFound(_) => FsError::new(libc::ENOENT),
                e => registry_fs(e),
            });
        match removed {
            Ok(()) => {
                let _ = fs::remove_file(store.entry_dir(name).join(file));
                Ok(())
            }
            // Only staged (never stored): dropping it was the whole of rm.
            Err(e) if e.errno == libc::ENOENT && was_staged => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `rmdir MOUNT/<base>/deltas/<name>`: the entry goes with its (empty) directory.
    pub fn rmdir(&self, store: &Store, base: &str, name: &str) -> FsResult<()> {
        let key = (base.to_owned(), name.to_owned());
        if let Some(s) = self.lock().get(&key) {
            // Files stored and still open count as the entry's (checked below), not as staged.
            if s.files.keys().any(|f| Self::unstored(s, f)) {
                return Err(FsError::new(libc::ENOTEMPTY));
            }
        }
        let removed = store.update(|r| match r.entries.get(name).map(|e| &e.kind) {
            Some(EntryKind::Delta { base: b, files, .. }) if b == base => {
                if !files.is_empty() {
                    return Err(registry::Error::Invalid("not empty".into()));
                }
                if !r.dependents(name).is_empty() {
                    return Err(registry::Error::HasDependents {
                        name: name.to_owned(),
                        dependents: r.dependents(name).join(", "),
                    });
                }
                r.entries.remove(name);
                Ok(true)
            }
            _ => Ok(false),
        });
        match removed {
            Err(registry::Error::Invalid(_)) => return Err(FsError::new(libc::ENOTEMPTY)),
            Err(registry::Error::HasDependents { .. }) => return Err(FsError::new(libc::EBUSY)),
            Err(e) => return Err(registry_fs(e)),
            Ok(false) if !self.has_session(base, name) => return Err(FsError::new(libc::ENOENT)),
            Ok(_) => {}
        }
        if let Some(s) = self.lock().remove(&key) {
            let _ = fs::remove_dir_all(s.dir);
        }
        let _ = fs::remove_dir_all(store.entry_dir(name));
        Ok(())
    }
}

/// Write `data` at `offset` of a staged file.
pub fn write_at(file: &File, offset: u64, data: &[u8]) -> FsResult<u32> {
    file.write_all_at(data, offset).map_err(|e| io_fs("staging write", e))?;
    Ok(data.len() as u32)
}

/// Remove what a killed daemon left: staging directories of processes that no longer run, and
/// half-written containers. Called when a mount starts.
pub fn sweep(store: &Store) {
    let alive = |pid: &str| PathBuf::from("/proc").join(pid).exists();
    if let Ok(items) = fs::read_dir(store.tmp_dir()) {
        for item in items.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            // "{label}.{pid}.{n}": the pid is the second-to-last field.
            let pid = name.rsplit('.').nth(1).unwrap_or("");
            if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && !alive(pid) {
                tracing::info!("removing {name}, left by a process that is gone");
                let _ = fs::remove_dir_all(item.path());
            }
        }
    }
    if let Ok(dirs) = fs::read_dir(store.root().join("models")) {
        for dir in dirs.flatten() {
            for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                // ".{file}.{pid}.tmp": a commit in progress, or one whose process died.
                let pid = n.rsplit('.').nth(1).unwrap_or("");
                if n.starts_with('.') && n.ends_with(".tmp") && !alive(pid) {
                    let _ = fs::remove_file(f.path());
                }
            }
        }
    }
}

//! The write path: `cp -r FINETUNED MOUNT/<base>/deltas/NEW/` stores a delta.
//!
//! `mkdir deltas/NEW` opens a staging session (a directory under `STORE/tmp/`). Each file written
//! into it, at any depth (`1_Pooling/config.json`, `.gitattributes`), is staged on disk there
//! (never held in memory) under a number of its own, so a rename moves only its name. A
//! safetensors file whose bytes arrive in order is also coded while it is written: each chunk of
//! each tensor is coded against the base on the rayon pool as soon as it is complete
//! (`delta::stream`), into a container in the staging directory, so close has only the last
//! chunks left. When the file is closed (flush), that container is finished, or, if the writes did
//! not allow it (a rewrite of bytes already coded, a hole, a header that does not parse, any other
//! file), the staged file is coded then (`delta::make::store_file`; the same container bytes
//! either way); it moves to `STORE/models/NEW/<path>`, and the registry gains it in one atomic
//! update. What decides how a file is coded is its content, never its name: a file whose bytes
//! are a safetensors file is coded tensor by tensor against the base under any name, so weights
//! written as `.tmpXXXX` or `*.incomplete` and renamed into place are deltas like any other. A
//! failure to store (a full disk, say) is returned by close() itself, so `cp` reports it, and by
//! every later close of that file until it is written again: no descriptor's close() says a file
//! is stored when it is not.
//!
//! Unfinished files: opening a file for writing names it in the registry's `unfinished` list of
//! the entry (creating the entry, empty, if this is its first file) before the open returns, and
//! the store at close removes it in the same update that records the file; a write after that
//! store names it again. A daemon killed mid-copy thus leaves the files it was writing listed:
//! `llmfs ls`, `info` and `check` say the entry is incomplete until they are written again (or
//! removed). Staging directories a killed daemon left are swept at the next start.
//!
//! Rename (files and directories, within one entry, replacing a file of the target name): the
//! stored record and container move with the name, in one registry update made under the store
//! lock; a staged file (still open) just changes name, and is stored under its new one.
//!
//! Lock order: the store's lock (a registry update), then the sessions' mutex; never a registry
//! update, a save, a hash of the base or any other I/O that can stall while holding the sessions'
//! mutex, which every request about `deltas/` takes (an object store that stops answering must
//! not freeze `ls deltas/`).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::error::{io_fs, registry_fs};
use super::{FsError, FsResult};
use crate::delta::stream::Stream;
use crate::delta::{self, DeltaCodec};
use crate::registry::{self, EntryKind, Registry, Store};

/// One `deltas/NEW/` directory being written.
///
/// A staged file lives until its last writer's handle is released, not until its first store:
/// the kernel sends a FLUSH for every close(2) of any descriptor of the file, and a descriptor
/// inherited by a forked child is closed at the child's exec while the parent still writes. Such
/// a FLUSH stores the file as it is then; the writer's own close stores it again, complete.
struct Session {
    dir: PathBuf,
    /// Staged files by their path in the entry.
    names: HashMap<String, u64>,
    /// Staged files by number (a handle names its file by number: renames do not move it).
    staged: HashMap<u64, Staged>,
    /// Directories made with mkdir inside the entry (those holding no file exist only here).
    dirs: BTreeSet<String>,
    /// The base's tensors for the session's streams, found once, outside the sessions' mutex
    /// (None: not yet, or the base cannot be read now: files are then coded at close, which
    /// reports why, and the next open tries again). See [`Staging::base_tensors`].
    base: Arc<Mutex<Option<Arc<delta::make::BaseTensors>>>>,
    /// When it began (see [`Staging::forget_entry`]).
    started: std::time::Instant,
}

/// A file being written: its staged bytes and how far they are stored.
struct Staged {
    /// Its path in the entry; None once removed or replaced while open (nothing to store).
    name: Option<String>,
    path: PathBuf,
    writers: usize,
    /// Bumped by every write, resize and truncating open.
    version: u64,
    /// The version last stored.
    stored: Option<u64>,
    /// Runs one store of the file at a time.
    storing: Arc<Mutex<()>>,
    /// A write failed: the staged bytes are not what was written, and are never stored.
    failed: Option<String>,
    /// Coding as it is written (`delta::stream`).
    stream: Option<Arc<Stream>>,
    /// The registry lists it as unfinished.
    marked: bool,
    /// A store of it is between its registry change and its save: a write meanwhile lists it
    /// as unfinished again (after that store, which holds the store's lock).
    committing: bool,
    /// The copy of the stored bytes into the staged file (rewriting a stored file without
    /// O_TRUNC): every other open waits for it, so its copy never lands on their writes.
    fill: Arc<Fill>,
}

/// Where the copy-in of a staged file stands.
#[derive(Default)]
struct Fill {
    /// None while the first opener copies; then Ok, or why the copy failed.
    done: Mutex<Option<Result<(), String>>>,
    ready: Condvar,
}

impl Fill {
    fn finished() -> Arc<Fill> {
        Arc::new(Fill { done: Mutex::new(Some(Ok(()))), ready: Condvar::new() })
    }

    fn set(&self, result: Result<(), String>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.ready.notify_all();
    }

    /// Wait until the copy-in is over; its result.
    fn wait(&self) -> Result<(), String> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*done {
                Some(result) => return result.clone(),
                None => done = self.ready.wait(done).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

impl Staged {
    /// The staged bytes are the stored ones (nothing written since the last store).
    fn clean(&self) -> bool {
        self.stored == Some(self.version)
    }
}

/// Numbers staged files and streams' containers, so nothing started anew meets its predecessor.
static NEXT: AtomicU64 = AtomicU64::new(0);

fn next_id() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `dir/name`, or `name` at the entry's top.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// `path` is `dir` or lies under it.
pub(super) fn within(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// `path` with its leading `from` replaced by `to` (`path` within `from`).
pub(super) fn moved(path: &str, from: &str, to: &str) -> String {
    format!("{to}{}", &path[from.len()..])
}

impl Session {
    /// A private staging directory `STORE/tmp/write-NAME.PID.SECS` (the sweep reads the PID).
    fn new(store: &Store, name: &str) -> FsResult<Session> {
        let dir = store.tmp_dir().join(format!(
            "write-{name}.{}.{}{}",
            std::process::id(),
            registry::now_secs(),
            next_id()
        ));
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| io_fs("staging", e))?;
        Ok(Session {
            dir,
            names: HashMap::new(),
            staged: HashMap::new(),
            dirs: BTreeSet::new(),
            base: Arc::default(),
            started: std::time::Instant::now(),
        })
    }

    /// Start coding staged file `id` as it is written (dropping any stream it had), against
    /// the base's tensors `base` (found by [`Staging::base_tensors`]). Every file gets one: a
    /// stream gives up at once on bytes that are not a safetensors file.
    fn restart_stream(&mut self, id: u64, base: Option<&Arc<delta::make::BaseTensors>>) {
        let container = self.dir.join(format!(".stream-{}.container", next_id()));
        let Some(s) = self.staged.get_mut(&id) else { return };
        s.stream = None;
        if let Some(tensors) = base {
            // The stream's name decides only that it tries (it codes `*.safetensors`) and the
            // record's name, which the store replaces with the file's path.
            s.stream = Stream::new(&s.path, "stream.safetensors", container, tensors.clone()).map(Arc::new);
        }
    }

    /// Forget staged file `name` (removed, or replaced by a rename): an open writer keeps its
    /// bytes until it closes, and nothing of it is stored.
    fn orphan(&mut self, name: &str) {
        if let Some(id) = self.names.remove(name) {
            if let Some(s) = self.staged.get_mut(&id) {
                s.name = None;
                s.stream = None;
            }
        }
    }
}

/// All sessions of a mount, keyed by (base entry, new entry).
#[derive(Default)]
pub struct Staging {
    sessions: Mutex<HashMap<(String, String), Session>>,
}

type Sessions = HashMap<(String, String), Session>;

fn key(base: &str, name: &str) -> (String, String) {
    (base.to_owned(), name.to_owned())
}

/// Runs `f` (a load, change and save of the registry) again while another node's commit got in
/// between ([`registry::Error::Conflict`], as EAGAIN: object stores only; a local store's lock
/// keeps others out), for up to [`crate::store::MAX_COMMIT_TIME`].
fn retry_conflicts<T>(mut f: impl FnMut() -> FsResult<T>) -> FsResult<T> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match f() {
            Err(e) if e.errno == libc::EAGAIN && start.elapsed() < crate::store::MAX_COMMIT_TIME => {
                std::thread::sleep(
                    pause + std::time::Duration::from_nanos(u64::from(next_id() as u32 % 5_000_000)),
                );
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// Whether the file at `path` holds a safetensors file (a header that parses and fits).
fn is_safetensors(path: &Path) -> bool {
    File::open(path).is_ok_and(|f| crate::format::read_header(&f).is_ok())
}

/// The files of delta entry `name` over `base` in `r`, if it is one.
fn delta_files<'a>(r: &'a mut Registry, base: &str, name: &str) -> Option<&'a mut Vec<registry::FileRecord>> {
    match r.entries.get_mut(name).map(|e| &mut e.kind) {
        Some(EntryKind::Delta { base: b, files, .. }) if b == base => Some(files),
        _ => None,
    }
}

/// The files of delta entry `name` over `base` in `r`, the entry made (empty) if there is none
/// yet (the first file written into `deltas/NAME/`); EEXIST if `name` is another entry.
fn delta_entry<'a>(
    r: &'a mut Registry,
    base: &str,
    name: &str,
) -> FsResult<&'a mut Vec<registry::FileRecord>> {
    if !r.entries.contains_key(name) {
        let base_entry = r.get(base).map_err(registry_fs)?.clone();
        let entry = delta::make::new_entry(name, base, &base_entry, DeltaCodec::Lossless, vec![]);
        r.entries.insert(name.to_owned(), entry);
    }
    delta_files(r, base, name).ok_or(FsError::new(libc::EEXIST))
}

/// Create `path`'s parent directories (private, like the store).
fn make_parents(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) => fs::DirBuilder::new().recursive(true).mode(0o700).create(p),
        None => Ok(()),
    }
}

impl Staging {
    fn lock(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session of `name`, opened if there is none (writing into an existing delta entry).
    fn session<'a>(
        sessions: &'a mut Sessions,
        store: &Store,
        base: &str,
        name: &str,
    ) -> FsResult<&'a mut Session> {
        Ok(match sessions.entry(key(base, name)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Session::new(store, name)?),
        })
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
        sessions.insert(key(base, name), Session::new(store, name)?);
        Ok(())
    }

    /// `mkdir MOUNT/<base>/deltas/<name>/<dir>` (the caller checked that nothing is there).
    pub fn mkdir_sub(&self, store: &Store, base: &str, name: &str, dir: &str) -> FsResult<()> {
        registry::validate_file_path(dir)
            .map_err(|e| FsError { errno: libc::EINVAL, message: Some(e.to_string()) })?;
        let mut sessions = self.lock();
        let s = Self::session(&mut sessions, store, base, name)?;
        if s.names.contains_key(dir) || !s.dirs.insert(dir.to_owned()) {
            return Err(FsError::new(libc::EEXIST));
        }
        Ok(())
    }

    /// `path` left its directory (rm, rename): the directories above it stay until rmdir, as on
    /// any filesystem, also when no file implies them any more.
    pub fn keep_parents(&self, store: &Store, base: &str, name: &str, path: &str) -> FsResult<()> {
        if !path.contains('/') {
            return Ok(());
        }
        let mut sessions = self.lock();
        let s = Self::session(&mut sessions, store, base, name)?;
        let mut dir = path;
        while let Some((parent, _)) = dir.rsplit_once('/') {
            s.dirs.insert(parent.to_owned());
            dir = parent;
        }
        Self::drop_if_idle(&mut sessions, base, name);
        Ok(())
    }

    /// `rmdir` of a directory inside an entry (the caller checked it is empty).
    pub fn rmdir_sub(&self, base: &str, name: &str, dir: &str) -> FsResult<()> {
        let mut sessions = self.lock();
        // (A directory only its files imply goes with them: nothing to remove here.)
        if let Some(s) = sessions.get_mut(&key(base, name)) {
            s.dirs.remove(dir);
        }
        Self::drop_if_idle(&mut sessions, base, name);
        Ok(())
    }

    /// The base's tensors for session (`base`, `name`)'s streams: found at the session's first
    /// need, outside the sessions' mutex (a sampled hash of every base file, a download on an
    /// object store), so no other request waits on it; a base that cannot be read now is tried
    /// again at the next need.
    fn base_tensors(&self, store: &Store, base: &str, name: &str) -> Option<Arc<delta::make::BaseTensors>> {
        let slot = self.lock().get(&key(base, name))?.base.clone();
        let mut found = slot.lock().unwrap_or_else(|e| e.into_inner());
        if found.is_none() {
            *found = store
                .load()
                .ok()
                .and_then(|r| delta::make::base_view(&r, base).ok())
                .map(|v| Arc::new(delta::make::BaseTensors::of(&v)));
        }
        found.clone()
    }

    pub fn has_session(&self, base: &str, name: &str) -> bool {
        self.lock().contains_key(&key(base, name))
    }

    /// Names of the sessions open under `base`.
    pub fn sessions(&self, base: &str) -> Vec<String> {
        self.lock().keys().filter(|(b, _)| b == base).map(|(_, n)| n.clone()).collect()
    }

    /// Paths of a session's staged files, and the directories made in it.
    pub fn paths(&self, base: &str, name: &str) -> (Vec<String>, Vec<String>) {
        let sessions = self.lock();
        let Some(s) = sessions.get(&key(base, name)) else { return (vec![], vec![]) };
        (s.names.keys().cloned().collect(), s.dirs.iter().cloned().collect())
    }

    pub fn staged_size(&self, base: &str, name: &str, file: &str) -> Option<u64> {
        let path = self.staged_path(base, name, file)?;
        Some(fs::metadata(path).map_or(0, |m| m.len()))
    }

    /// The staged file, for reads of a file still being written.
    /// The number of staged file `file`, if it is staged.
    pub fn staged_id(&self, base: &str, name: &str, file: &str) -> Option<u64> {
        self.lock().get(&key(base, name))?.names.get(file).copied()
    }

    pub fn staged_path(&self, base: &str, name: &str, file: &str) -> Option<PathBuf> {
        let sessions = self.lock();
        let s = sessions.get(&key(base, name))?;
        Some(s.staged.get(s.names.get(file)?)?.path.clone())
    }

    /// Open staged file `file` (a path in the entry) for writing, creating (and truncating, when
    /// `truncate`) it; a session is opened implicitly for a delta entry that already exists
    /// (writing more files). Returns the staged file and its number, and whether it was staged
    /// before this open. The file is listed as unfinished in the registry before this returns.
    ///
    /// `fill`: if this open stages the file anew (it was not staged), the caller copies the
    /// stored bytes into it and then calls [`Staging::filled`]; an open of a file being filled
    /// so waits for that copy to end before it returns (its writes would be overwritten by it),
    /// and fails if the copy did.
    pub fn open(
        &self,
        store: &Store,
        base: &str,
        name: &str,
        file: &str,
        truncate: bool,
        fill: bool,
    ) -> FsResult<(File, u64, bool)> {
        registry::validate_file_path(file)
            .map_err(|e| FsError { errno: libc::EINVAL, message: Some(e.to_string()) })?;
        Self::session(&mut self.lock(), store, base, name)?;
        let tensors = self.base_tensors(store, base, name);
        let (f, id, existed, marked, filling) = {
            let mut sessions = self.lock();
            let session = Self::session(&mut sessions, store, base, name)?;
            let existed = session.names.get(file).copied();
            let id = existed.unwrap_or_else(next_id);
            let path = session.dir.join(format!("{id}"));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(truncate)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io_fs("staging", e))?;
            let s = session.staged.entry(id).or_insert_with(|| Staged {
                name: Some(file.to_owned()),
                path,
                writers: 0,
                version: 0,
                stored: None,
                storing: Arc::new(Mutex::new(())),
                failed: None,
                stream: None,
                marked: false,
                committing: false,
                fill: if fill && !truncate { Arc::new(Fill::default()) } else { Fill::finished() },
            });
            session.names.insert(file.to_owned(), id);
            s.writers += 1;
            if truncate {
                s.version += 1;
                s.failed = None;
            }
            let (marked, filling) = (s.marked, s.fill.clone());
            if truncate || existed.is_none() {
                // Empty now (or about to be filled by a copy of the stored file, which a stream
                // never sees as written, so it then codes nothing and close codes the staged file).
                session.restart_stream(id, tensors.as_ref());
            }
            (f, id, existed.is_some(), marked, filling)
        };
        if existed {
            // Outside the sessions' mutex: the filler needs it to finish.
            if let Err(e) = filling.wait() {
                self.closed(base, name, id);
                return Err(FsError::eio(format!("{name}/{file}: copying the stored file failed: {e}")));
            }
            if truncate {
                // A copy-in that was running when this open truncated wrote after it.
                if let Err(e) = f.set_len(0) {
                    self.closed(base, name, id);
                    return Err(io_fs("staging", e));
                }
            }
        }
        if !marked {
            if let Err(e) = self.mark(store, base, name, id) {
                if !existed {
                    // Nobody will fill it: opens that joined meanwhile fail too.
                    filling.set(Err(e.message.clone().unwrap_or_else(|| "the open failed".into())));
                }
                self.closed(base, name, id);
                return Err(e);
            }
        }
        Ok((f, id, existed))
    }

    /// The copy of the stored bytes into staged file `id` (see [`Staging::open`]'s `fill`) is
    /// over: the opens waiting for it go on (or fail with it). A failed copy also keeps the
    /// staged bytes from ever being stored.
    pub fn filled(&self, base: &str, name: &str, id: u64, result: Result<(), String>) {
        let fill = {
            let mut sessions = self.lock();
            let Some(s) = sessions.get_mut(&key(base, name)).and_then(|s| s.staged.get_mut(&id)) else {
                return;
            };
            if let Err(e) = &result {
                s.failed = Some(format!("copying the stored file failed: {e}"));
                s.stream = None;
            }
            s.fill.clone()
        };
        fill.set(result);
    }

    /// List staged file `id` as unfinished in the registry (creating the entry, empty, if it is
    /// the first file of a new delta).
    fn mark(&self, store: &Store, base: &str, name: &str, id: u64) -> FsResult<()> {
        self.update_staged(
            store,
            (base, name, id),
            |r, _, file| {
                delta_entry(r, base, name)?;
                r.mark_unfinished(name, file);
                Ok(())
            },
            |lock, r, ()| store.save(r, lock).map_err(registry_fs),
            |s, ()| s.marked = true,
        )
    }

    /// A registry update about staged file `id`, under the store's lock (so no other update
    /// comes between its steps): `change` the registry as it is now, given the file and its name
    /// now (a rename may have moved it), under the sessions' mutex; `save` it (and move what goes
    /// with it) without that mutex, so no request waits on the store's I/O; then note what was
    /// saved in the file (`done`), under the mutex again. Nothing runs if the file is gone or was
    /// removed or replaced (nothing of it is to be recorded).
    fn update_staged<P>(
        &self,
        store: &Store,
        (base, name, id): (&str, &str, u64),
        mut change: impl FnMut(&mut Registry, &mut Staged, &str) -> FsResult<P>,
        mut save: impl FnMut(&registry::StoreLock, &Registry, &mut P) -> FsResult<()>,
        mut done: impl FnMut(&mut Staged, P),
    ) -> FsResult<()> {
        retry_conflicts(|| {
            let lock = store.lock().map_err(registry_fs)?;
            let mut r = store.load().map_err(registry_fs)?;
            let mut planned = {
                let mut sessions = self.lock();
                let Some(s) = sessions.get_mut(&key(base, name)).and_then(|s| s.staged.get_mut(&id)) else {
                    return Ok(());
                };
                let Some(file) = s.name.clone() else { return Ok(()) };
                change(&mut r, s, &file)?
            };
            let saved = save(&lock, &r, &mut planned);
            let mut sessions = self.lock();
            if let Some(s) = sessions.get_mut(&key(base, name)).and_then(|s| s.staged.get_mut(&id)) {
                s.committing = false;
                if saved.is_ok() {
                    done(s, planned);
                }
            }
            saved
        })
    }

    /// Note a change of staged file `id`'s bytes; returns its stream, and whether it must be
    /// listed as unfinished again (it was stored, and is now being changed).
    fn changed(&self, base: &str, name: &str, id: u64) -> (Option<Arc<Stream>>, bool) {
        let mut sessions = self.lock();
        let Some(s) = sessions.get_mut(&key(base, name)).and_then(|s| s.staged.get_mut(&id)) else {
            return (None, false);
        };
        s.version += 1;
        (s.stream.clone(), (!s.marked || s.committing) && s.name.is_some())
    }

    /// `len` bytes were written at `offset` of staged file `id`: code what is now complete.
    pub fn written(
        &self,
        store: &Store,
        base: &str,
        name: &str,
        id: u64,
        offset: u64,
        len: u64,
    ) -> FsResult<()> {
        let (stream, unmarked) = self.changed(base, name, id);
        if unmarked {
            self.mark(store, base, name, id)?;
        }
        if let Some(s) = stream {
            s.written(offset, len);
        }
        Ok(())
    }

    /// A write into staged file `id` failed: it is never stored as it is.
    pub fn write_failed(&self, base: &str, name: &str, id: u64, reason: String) {
        if let Some(s) = self.lock().get_mut(&key(base, name)).and_then(|s| s.staged.get_mut(&id)) {
            s.failed = Some(reason);
            s.stream = None;
        }
    }

    /// Staged file `file` was truncated or extended to `size`.
    pub fn resized(&self, store: &Store, base: &str, name: &str, file: &str, size: u64) -> FsResult<()> {
        let Some(id) = self.lock().get(&key(base, name)).and_then(|s| s.names.get(file).copied()) else {
            return Ok(());
        };
        let (stream, unmarked) = self.changed(base, name, id);
        if unmarked {
            self.mark(store, base, name, id)?;
        }
        if size == 0 {
            // `open(O_TRUNC)` where the kernel sends the truncation separately: start afresh.
            let tensors = self.base_tensors(store, base, name);
            let mut sessions = self.lock();
            if let Some(s) = sessions.get_mut(&key(base, name)) {
                if s.staged.get(&id).is_some_and(|f| f.stream.is_some()) {
                    s.restart_stream(id, tensors.as_ref());
                }
            }
        } else if let Some(s) = stream {
            s.resized(size);
        }
        Ok(())
    }

    /// Store staged file `id` as part of delta entry `name` over `base` (close() of a written
    /// file). Ok at once if it is stored as it is, or was removed; the error if a write of it
    /// failed or it cannot be stored.
    pub fn commit(&self, store: &Store, base: &str, name: &str, id: u64) -> FsResult<()> {
        let storing = {
            let sessions = self.lock();
            match sessions.get(&key(base, name)).and_then(|s| s.staged.get(&id)) {
                Some(s) => s.storing.clone(),
                None => return Ok(()),
            }
        };
        // One store of a file at a time (two FLUSHes of one file can arrive together).
        let _storing = storing.lock().unwrap_or_else(|e| e.into_inner());
        let (staged, stream, version, dir, shown) = {
            let mut sessions = self.lock();
            let Some(session) = sessions.get_mut(&key(base, name)) else { return Ok(()) };
            let dir = session.dir.clone();
            let Some(s) = session.staged.get_mut(&id) else { return Ok(()) };
            let Some(shown) = s.name.clone() else { return Ok(()) };
            if let Some(reason) = &s.failed {
                return Err(FsError {
                    errno: libc::EIO,
                    message: Some(format!("{name}/{shown}: {reason}; the file was not stored")),
                });
            }
            if s.clean() {
                return Ok(());
            }
            // A stream codes one writing of the file: taken now, whatever comes of it.
            (s.path.clone(), s.stream.take(), s.version, dir, shown)
        };
        let size = fs::metadata(&staged).map_err(|e| io_fs("staging", e))?.len();
        let streamed = match stream.and_then(|s| s.finish(size)) {
            Some(Ok(done)) => Some(done),
            Some(Err(e)) => return Err(registry_fs(e)),
            None => None,
        };
        let (tmp, mut record) = match streamed {
            // Coded while it was written: the container is complete in the staging directory.
            Some(done) => done,
            None => {
                let registry = store.load().map_err(registry_fs)?;
                let view = delta::make::base_view(&registry, base).map_err(|e| FsError {
                    errno: libc::EIO,
                    message: Some(format!(
                        "{name}/{shown} not stored: its base {base} cannot be read as it was added \
                         ({e}); a delta is coded against the base's bytes as added, so no file is \
                         stored over a changed base: `llmfs check {base}` says what to do"
                    )),
                })?;
                let base_tensors = delta::make::BaseTensors::of(&view);
                // store_file codes by its source's name: give it one that says what the bytes
                // are (a link to the staged file), whatever the file is called.
                let code_dir = dir.join(format!(".code-{}", next_id()));
                fs::DirBuilder::new().mode(0o700).create(&code_dir).map_err(|e| io_fs("staging", e))?;
                let leaf = shown.rsplit('/').next().unwrap_or(&shown);
                let as_name = if is_safetensors(&staged) {
                    "weights.safetensors"
                } else if leaf == registry::INDEX_FILE {
                    registry::INDEX_FILE
                } else {
                    "file"
                };
                let src = code_dir.join(as_name);
                let tmp = dir.join(format!(".code-{}.container", next_id()));
                let result = fs::hard_link(&staged, &src)
                    .map_err(registry::io_err(&src))
                    .and_then(|()| delta::make::store_file(&src, &tmp, &base_tensors, DeltaCodec::Lossless));
                let _ = fs::remove_dir_all(&code_dir);
                (tmp, result.map_err(registry_fs)?)
            }
        };
        // In an object store the container goes to a key of its own first; the registry update
        // below names it (or, if the file went meanwhile, the object is deleted again).
        let mut uploaded = None;
        if store.remote().is_some() {
            let key = format!("{}/{}", registry::upload_prefix(name), shown);
            store.upload(&mut record, &key, &tmp).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                FsError::eio(format!("{name}/{shown} not stored: {e}"))
            })?;
            uploaded = Some(key);
        }
        let mut replaced = None;
        let mut used = false;
        // Under the name it has now (a rename may have moved it while it was coded).
        let result = self.update_staged(
            store,
            (base, name, id),
            |r, s, file| {
                record.name = file.to_owned();
                let files = delta_entry(r, base, name)?;
                replaced = files.iter().find(|f| f.name == file).and_then(|f| f.object.clone());
                files.retain(|f| f.name != file);
                files.push(record.clone());
                files.sort_by(|a, b| a.name.cmp(&b.name));
                // Written since this version was taken: still unfinished.
                let finished = s.version == version;
                if finished {
                    r.clear_unfinished(name, file);
                }
                s.committing = true;
                Ok((file.to_owned(), finished))
            },
            |lock, r, (file, _)| {
                if uploaded.is_none() {
                    // Into place while holding the store lock, so the registry and the file agree.
                    let dest = store.entry_dir(name).join(&*file);
                    make_parents(&dest).map_err(|e| io_fs("store", e))?;
                    fs::rename(&tmp, &dest).map_err(|e| io_fs("store", e))?;
                }
                store.save(r, lock).map_err(registry_fs)?;
                used = true;
                Ok(())
            },
            |s, (_, finished)| {
                // Stored as of `version`: clean unless written meanwhile. The staged file stays
                // while a writer has it open ([`Staging::closed`] removes it).
                s.stored = Some(version);
                if finished {
                    s.marked = false;
                }
            },
        );
        let _ = fs::remove_file(&tmp);
        // The object no record names any more: the replaced version, or this one if unused.
        let unused = if used { replaced } else { uploaded };
        store.delete_objects(unused.as_deref());
        result
    }

    /// A writer's handle of staged file `id` was released (after its last store). With no
    /// writer left the staged copy goes: the stored file speaks for it (or, if it could not be
    /// stored, the registry still lists it as unfinished), and with nothing left staged or made
    /// the entry speaks for the directory (a later `llmfs rm NAME` leaves no trace).
    pub fn closed(&self, base: &str, name: &str, id: u64) {
        let mut sessions = self.lock();
        let Some(s) = sessions.get_mut(&key(base, name)) else { return };
        let Some(f) = s.staged.get_mut(&id) else { return };
        f.writers = f.writers.saturating_sub(1);
        if f.writers > 0 {
            return;
        }
        let f = s.staged.remove(&id).expect("found above");
        let _ = fs::remove_file(&f.path);
        if let Some(n) = &f.name {
            if s.names.get(n) == Some(&id) {
                s.names.remove(n);
            }
        }
        Self::drop_if_idle(&mut sessions, base, name);
    }

    /// Entry `name`, which a registry loaded at `seen` still had, was removed (by another process
    /// or node): its sessions with nothing staged go, with the directories made in them, which
    /// would otherwise outlive the entry. Only sessions begun before `seen` were the removed
    /// entry's: a `mkdir deltas/NAME` after the removal starts a new one, which stays.
    pub fn forget_entry(&self, name: &str, seen: std::time::Instant) {
        let mut sessions = self.lock();
        let idle: Vec<_> = sessions
            .iter()
            .filter(|(k, s)| k.1 == name && s.staged.is_empty() && s.started < seen)
            .map(|(k, _)| k.clone())
            .collect();
        for k in idle {
            if let Some(s) = sessions.remove(&k) {
                let _ = fs::remove_dir_all(s.dir);
            }
        }
    }

    /// End a session with nothing staged and no directory of its own.
    fn drop_if_idle(sessions: &mut Sessions, base: &str, name: &str) {
        if sessions.get(&key(base, name)).is_some_and(|s| s.staged.is_empty() && s.dirs.is_empty()) {
            if let Some(s) = sessions.remove(&key(base, name)) {
                let _ = fs::remove_dir_all(s.dir);
            }
        }
    }

    /// `rm MOUNT/<base>/deltas/<name>/<file>`: drop a staged file, and a stored one (or an
    /// unfinished one) from the entry.
    pub fn unlink(&self, store: &Store, base: &str, name: &str, file: &str) -> FsResult<()> {
        let was_staged = {
            let mut sessions = self.lock();
            match sessions.get_mut(&key(base, name)) {
                Some(s) if s.names.contains_key(file) => {
                    s.orphan(file);
                    true
                }
                _ => false,
            }
        };
        let removed = retry_conflicts(|| {
            (|| -> registry::Result<()> {
                let lock = store.lock()?;
                let mut r = store.load()?;
                let unfinished = r.clear_unfinished(name, file);
                let files =
                    delta_files(&mut r, base, name).ok_or_else(|| registry::Error::NotFound(name.into()))?;
                let before = files.len();
                let object = files.iter().find(|f| f.name == file).and_then(|f| f.object.clone());
                files.retain(|f| f.name != file);
                if files.len() == before && !unfinished {
                    return Err(registry::Error::NotFound(file.to_owned()));
                }
                store.save(&r, &lock)?;
                // Still under the lock: a file of this name stored by another descriptor's close
                // right after this update must not lose its container to this removal.
                match object {
                    Some(key) => store.delete_objects([key.as_str()]),
                    None => {
                        let _ = fs::remove_file(store.entry_dir(name).join(file));
                    }
                }
                Ok(())
            })()
            .map_err(|e| match e {
                registry::Error::NotFound(_) => FsError::new(libc::ENOENT),
                e => registry_fs(e),
            })
        });
        match removed {
            Ok(()) => Ok(()),
            // Only staged (never stored): dropping it was the whole of rm.
            Err(e) if e.errno == libc::ENOENT && was_staged => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `rename` within delta entry `name` over `base`: the file or directory `from` becomes `to`
    /// (the caller checked the target: nothing there, a file replaced by a file, or an empty
    /// directory replaced by a directory). Stored files move with their records and containers
    /// in one registry update; staged ones change name.
    pub fn rename(&self, store: &Store, base: &str, name: &str, from: &str, to: &str) -> FsResult<()> {
        registry::validate_file_path(to)
            .map_err(|e| FsError { errno: libc::EINVAL, message: Some(e.to_string()) })?;
        if within(to, from) {
            // Into itself (POSIX: EINVAL), or onto itself (nothing to do).
            return if to == from { Ok(()) } else { Err(FsError::new(libc::EINVAL)) };
        }
        retry_conflicts(|| self.rename_once(store, base, name, from, to))
    }

    fn rename_once(&self, store: &Store, base: &str, name: &str, from: &str, to: &str) -> FsResult<()> {
        // The store's lock for the whole rename (no other registry update comes between its
        // steps); the sessions' mutex only for the staged files, after the store's I/O.
        let lock = store.lock().map_err(registry_fs)?;
        let mut r = store.load().map_err(registry_fs)?;
        let dir = store.entry_dir(name);
        // Stored files: records and containers.
        let mut moves: Vec<(PathBuf, PathBuf)> = vec![];
        let mut moving_records: Vec<String> = vec![];
        // The objects of a stored file the rename replaces: no record names them after it.
        let mut replaced: Vec<String> = vec![];
        if let Some(files) = delta_files(&mut r, base, name) {
            let moving: Vec<String> =
                files.iter().filter(|f| within(&f.name, from)).map(|f| f.name.clone()).collect();
            if !moving.is_empty() {
                replaced.extend(files.iter().filter(|f| f.name == to).filter_map(|f| f.object.clone()));
                files.retain(|f| f.name != to);
            }
            moving_records = moving;
            for f in files.iter_mut().filter(|f| within(&f.name, from)) {
                let new = moved(&f.name, from, to);
                // An object keeps its key: its record alone is renamed.
                if f.object.is_none() {
                    moves.push((dir.join(&f.name), dir.join(&new)));
                }
                f.name = new;
            }
            files.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let unfinished: Vec<String> = r
            .unfinished(name)
            .into_iter()
            .filter(|f| within(f, from) || *f == to)
            .map(str::to_owned)
            .collect();
        for f in &unfinished {
            r.clear_unfinished(name, f);
        }
        for f in unfinished.iter().filter(|f| within(f, from)) {
            r.mark_unfinished(name, &moved(f, from, to));
        }
        let mut done = vec![];
        let mut result = Ok(());
        for (old, new) in &moves {
            match make_parents(new).and_then(|()| fs::rename(old, new)) {
                Ok(()) => done.push((old, new)),
                Err(e) => {
                    result = Err(io_fs("store", e));
                    break;
                }
            }
        }
        if result.is_ok() && (!moving_records.is_empty() || !unfinished.is_empty()) {
            result = store.save(&r, &lock).map_err(registry_fs);
        }
        if let Err(e) = result {
            for (old, new) in done.into_iter().rev() {
                let _ = fs::rename(new, old);
            }
            return Err(e);
        }
        // Still under the lock, as in unlink.
        store.delete_objects(replaced.iter().map(String::as_str));
        for (old, _) in &moves {
            // Leave no empty directories behind in the store.
            let mut p = old.parent();
            while let Some(d) = p.filter(|d| *d != dir && fs::remove_dir(d).is_ok()) {
                p = d.parent();
            }
        }
        // Staged files and made directories.
        let mut sessions = self.lock();
        if let Some(s) = sessions.get_mut(&key(base, name)) {
            let moving: Vec<String> = s.names.keys().filter(|n| within(n, from)).cloned().collect();
            if !moving.is_empty() || !moving_records.is_empty() {
                // A file renamed over one still open for writing replaces it, as on any
                // filesystem: that writer now writes a file no name leads to (nothing stored).
                s.orphan(to);
            }
            for old in moving {
                let id = s.names.remove(&old).expect("listed above");
                let new = moved(&old, from, to);
                if let Some(f) = s.staged.get_mut(&id) {
                    f.name = Some(new.clone());
                }
                s.names.insert(new, id);
            }
            let dirs: Vec<String> = s.dirs.iter().filter(|d| within(d, from)).cloned().collect();
            if !dirs.is_empty() {
                s.dirs.remove(to);
            }
            for d in dirs {
                s.dirs.remove(&d);
                s.dirs.insert(moved(&d, from, to));
            }
        }
        Ok(())
    }

    /// `rmdir MOUNT/<base>/deltas/<name>`: the entry goes with its (empty) directory.
    pub fn rmdir(&self, store: &Store, base: &str, name: &str) -> FsResult<()> {
        if let Some(s) = self.lock().get(&key(base, name)) {
            // Files stored and still open count as the entry's (checked below), not as staged.
            let unstored = s.staged.values().any(|f| f.name.is_some() && !f.clean());
            if unstored || !s.dirs.is_empty() {
                return Err(FsError::new(libc::ENOTEMPTY));
            }
        }
        let removed = store.update(|r| match r.entries.get(name).map(|e| &e.kind) {
            Some(EntryKind::Delta { base: b, files, .. }) if b == base => {
                if !files.is_empty() || !r.unfinished(name).is_empty() {
                    return Err(registry::Error::Invalid("not empty".into()));
                }
                if !r.dependents(name).is_empty() {
                    return Err(registry::Error::HasDependents {
                        name: name.to_owned(),
                        dependents: r.dependents(name).join(", "),
                    });
                }
                r.entries.remove(name);
                // Under the store's lock: an entry of this name made right after this update
                // (mkdir and a first file) keeps its files.
                let _ = fs::remove_dir_all(store.entry_dir(name));
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
        if let Some(s) = self.lock().remove(&key(base, name)) {
            let _ = fs::remove_dir_all(s.dir);
        }
        Ok(())
    }
}

/// Write `data` at `offset` of a staged file.
pub fn write_at(file: &File, offset: u64, data: &[u8]) -> FsResult<u32> {
    // Only a hole is checked: a write that runs out of disk gets the disk's own ENOSPC.
    fits(file, offset)?;
    file.write_all_at(data, offset).map_err(|e| io_fs("staging write", e))?;
    Ok(data.len() as u32)
}

/// EFBIG if staged file `file` grown to `size` bytes by a hole (a write past its end, a
/// truncate that extends it) would be larger than the staging filesystem can hold: a write at a
/// huge offset (or `truncate -s 1T`) makes a sparse file that costs nothing until it is stored,
/// and storing reads (and codes) every byte of it, holes included. Its current size plus the
/// free space is what a real file could reach.
pub fn fits(file: &File, size: u64) -> FsResult<()> {
    use std::os::fd::AsRawFd;
    let now = file.metadata().map_err(|e| io_fs("staging", e))?.len();
    if size <= now {
        return Ok(());
    }
    // SAFETY: fstatvfs fills the struct we pass, for a descriptor we hold open.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Ok(()); // Unknown: the write itself says if the disk is full.
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    if size - now > free {
        return Err(FsError {
            errno: libc::EFBIG,
            message: Some(format!(
                "a file of {size} bytes does not fit: the staging filesystem has {free} bytes free \
                 (a write at a huge offset or a truncate far past the end makes a sparse file, which \
                 is stored whole)"
            )),
        });
    }
    Ok(())
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
    // Containers of an older version's commits (".{file}.{pid}.tmp" in the entry's directory)
    // whose process died; a stored file of that form (a dotfile of the model) stays.
    let registry = store.load().unwrap_or_default();
    if let Ok(dirs) = fs::read_dir(store.root().join("models")) {
        for dir in dirs.flatten() {
            let entry = dir.file_name().to_string_lossy().into_owned();
            let stored = |n: &str| match registry.entries.get(&entry).map(|e| &e.kind) {
                Some(EntryKind::Delta { files, .. }) => files.iter().any(|f| f.name == n),
                _ => true,
            };
            for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                let pid = n.rsplit('.').nth(1).unwrap_or("");
                let numeric = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
                if n.starts_with('.') && n.ends_with(".tmp") && numeric && !alive(pid) && !stored(&n) {
                    let _ = fs::remove_file(f.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_entry_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let staging = Staging::default();
        for bad in ["../x", "a/../b", "/abs", "a//b", "a/", ".", ""] {
            let e = staging.open(&store, "base", "new", bad, true, false).err().map(|e| e.errno);
            assert_eq!(e, Some(libc::EINVAL), "open of {bad:?}");
            let e = staging.mkdir_sub(&store, "base", "new", bad).err().map(|e| e.errno);
            assert_eq!(e, Some(libc::EINVAL), "mkdir of {bad:?}");
            let e = staging.rename(&store, "base", "new", "a", bad).err().map(|e| e.errno);
            assert_eq!(e, Some(libc::EINVAL), "rename to {bad:?}");
        }
        assert!(store.load().unwrap().entries.is_empty());
    }

    /// Two opens of one stored file without O_TRUNC: the second waits until the first's copy
    /// of the stored bytes is in, so that copy cannot overwrite the second's writes.
    #[test]
    fn a_second_open_waits_for_the_copy_in_of_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        crate::demo::write_model(&model, &crate::demo::ModelSpec::tiny()).unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        crate::registry::add::add(&store, "base", &model, &Default::default()).unwrap();
        let staging = Arc::new(Staging::default());
        let (first, id, existed) = staging.open(&store, "base", "new", "a.txt", false, true).unwrap();
        assert!(!existed);
        let (tx, rx) = std::sync::mpsc::channel();
        let second = {
            let (staging, store) = (staging.clone(), store.clone());
            std::thread::spawn(move || {
                let (f, _, existed) = staging.open(&store, "base", "new", "a.txt", false, true).unwrap();
                assert!(existed);
                // Its early write, which the first open's copy must not overwrite.
                f.write_all_at(b"B", 0).unwrap();
                tx.send(()).unwrap();
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(rx.try_recv().is_err(), "the second open returned while the first was copying");
        first.write_all_at(b"stored", 0).unwrap();
        staging.filled("base", "new", id, Ok(()));
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the second open never returned");
        second.join().unwrap();
        let path = staging.staged_path("base", "new", "a.txt").unwrap();
        assert_eq!(fs::read(path).unwrap(), b"Btored");

        // A failed copy fails the opens that waited for it, and the file is never stored.
        let (_f, id, _) = staging.open(&store, "base", "new", "b.txt", false, true).unwrap();
        let waiter = {
            let (staging, store) = (staging.clone(), store.clone());
            std::thread::spawn(move || staging.open(&store, "base", "new", "b.txt", false, true).map(drop))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        staging.filled("base", "new", id, Err("a read failed".into()));
        let e = waiter.join().unwrap().unwrap_err();
        assert!(e.errno == libc::EIO && e.message.unwrap().contains("a read failed"));
        let e = staging.commit(&store, "base", "new", id).unwrap_err();
        assert!(e.message.unwrap().contains("not stored"));
    }

    #[test]
    fn paths_move_with_their_directory() {
        assert!(within("a/b", "a") && within("a", "a") && !within("ab", "a") && !within("a", "a/b"));
        assert_eq!(moved("a/b/c", "a/b", "z"), "z/c");
        assert_eq!(join("", "x"), "x");
        assert_eq!(join("d", "x"), "d/x");
    }
}

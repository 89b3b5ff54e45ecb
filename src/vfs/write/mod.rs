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
//!
//! Files: `session.rs` (one `deltas/NEW/` directory being written: its staged files and
//! their copy-in), this file (the requests: mkdir, open, write, close, truncate), `commit.rs`
//! (the registry transactions: store a closed file, unlink, rename, rmdir) and `disk.rs` (the
//! staging files themselves: writes, the sparse-file bound, the sweep at start).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::{io_fs, registry_fs};
use super::{FsError, FsResult};
use crate::delta::stream::Stream;
use crate::delta::{self};
use crate::registry::{self, Registry, Store};

mod commit;
mod disk;
mod session;

use commit::{delta_entry, retry_conflicts};
pub use disk::{fits, sweep, write_at};
pub use session::join;
use session::{is_safetensors, make_parents, next_id, Fill, Session, Staged};
pub(in crate::vfs) use session::{moved, within};

/// All sessions of a mount, keyed by (base entry, new entry).
#[derive(Default)]
pub struct Staging {
    sessions: Mutex<HashMap<(String, String), Session>>,
}

type Sessions = HashMap<(String, String), Session>;

fn key(base: &str, name: &str) -> (String, String) {
    (base.to_owned(), name.to_owned())
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
}

#[cfg(test)]
mod tests;

//! The write path's registry transactions: storing a closed file (`commit`), `unlink`,
//! `rename` and `rmdir` of stored files. Each is a load-change-save of the registry (redone on an
//! object store's conflict), made without holding the sessions' mutex across it.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use crate::delta::{self, DeltaCodec};
use crate::registry::{self, EntryKind, Registry, Store};
use crate::vfs::error::{io_fs, registry_fs};
use crate::vfs::{FsError, FsResult};

use super::{is_safetensors, key, make_parents, moved, next_id, within, Staging};

/// Runs `f` (a load, change and save of the registry) again while another node's commit got in
/// between ([`registry::Error::Conflict`], as EAGAIN: object stores only; a local store's lock
/// keeps others out), for up to [`crate::store::MAX_COMMIT_TIME`].
pub(super) fn retry_conflicts<T>(mut f: impl FnMut() -> FsResult<T>) -> FsResult<T> {
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

/// The files of delta entry `name` over `base` in `r`, if it is one.
pub(super) fn delta_files<'a>(
    r: &'a mut Registry,
    base: &str,
    name: &str,
) -> Option<&'a mut Vec<registry::FileRecord>> {
    match r.entries.get_mut(name).map(|e| &mut e.kind) {
        Some(EntryKind::Delta { base: b, files, .. }) if b == base => Some(files),
        _ => None,
    }
}

/// The files of delta entry `name` over `base` in `r`, the entry made (empty) if there is none
/// yet (the first file written into `deltas/NAME/`); EEXIST if `name` is another entry.
pub(super) fn delta_entry<'a>(
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

impl Staging {
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
        // On an object store the container goes to a key of its own now; the registry update
        // below names it (or, if the file went meanwhile, the object is deleted again). Locally
        // that update renames it into the entry's directory.
        let mut staged = store.node().stage_file(name, &shown, &tmp).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            FsError::eio(format!("{name}/{shown} not stored: {e}"))
        })?;
        if let Some(meta) = staged.object(&shown) {
            record.name_object(meta);
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
                // Into place while holding the store lock, so the registry and the file agree.
                staged.place_as(file).map_err(|e| FsError::eio(format!("{name}/{file} not stored: {e}")))?;
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
        match used {
            true => store.delete_objects(replaced.as_deref()),
            false => staged.discard(),
        }
        result
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
                store.node().remove_file(name, file, object.as_deref());
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

//! The requests that change `<entry>/deltas/`: mkdir, create, write, truncate, flush, unlink,
//! rmdir and rename, forwarded to the write path's staging (`write/`) with the inode table kept
//! in step.

use super::*;

impl Fs {
    /// `mkdir <entry>/deltas/NAME`, or a directory inside it.
    pub fn mkdir(&self, parent: u64, name: &str) -> FsResult<Attr> {
        // What is stored now (another descriptor's close may have just changed it).
        self.refresh();
        match self.node(parent)? {
            Node::Deltas { entry, .. } => self.staging.mkdir(&self.store, &entry, name)?,
            Node::DeltaDir { entry, name: delta, dir, .. } => {
                let path = write::join(&dir, name);
                let t = self.delta_tree(&entry, &delta);
                if find(&t.files, &t.dirs, &path).is_some() {
                    return Err(FsError::new(libc::EEXIST));
                }
                self.staging.mkdir_sub(&self.store, &entry, &delta, &path)?;
            }
            _ => return Err(FsError::new(libc::EROFS)),
        }
        self.lookup(parent, name)
    }

    /// `open(O_CREAT)` in `<entry>/deltas/NAME/` or a directory inside it.
    pub fn create(&self, parent: u64, file: &str) -> FsResult<(Attr, Opened)> {
        // What is stored now (another descriptor's close may have just changed it).
        self.refresh();
        let Node::DeltaDir { entry, created, name, dir } = self.node(parent)? else {
            return Err(FsError::new(libc::EROFS));
        };
        let path = write::join(&dir, file);
        let (f, id, _) = self.staging.open(&self.store, &entry, &name, &path, true, false)?;
        let node = Node::DeltaFile { entry: entry.clone(), created, name: name.clone(), file: path };
        let ino = self.ino(node.clone());
        let attr = self.attr_of(ino, &node)?;
        let target = Target::Staged { file: Arc::new(f), base: entry, name, id, writer: true };
        Ok((attr, self.insert_handle(ino, target)))
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (file, base, name, id) = {
            let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            match handles.get(&fh).map(|h| &h.target) {
                Some(Target::Staged { file, base, name, id, writer: true }) => {
                    (file.clone(), base.clone(), name.clone(), *id)
                }
                _ => return Err(FsError::new(libc::EBADF)),
            }
        };
        let n = write::write_at(&file, offset, data).inspect_err(|e| {
            // Never store a file some write of which was lost: every close of it says so.
            let reason = e.message.clone().unwrap_or_else(|| "a write failed".into());
            self.staging.write_failed(&base, &name, id, reason);
        })?;
        // Code what the file now holds in order while the copy goes on (delta::stream).
        self.staging.written(&self.store, &base, &name, id, offset, data.len() as u64)?;
        Ok(n)
    }

    /// `truncate`/`ftruncate` of a file in deltas/ (cp may size it first). A stored file that is
    /// not open is staged, resized and stored again.
    /// `through_handle`: ftruncate(2) of an open descriptor (stored at its close, like its
    /// writes) rather than truncate(2) of a path, which is stored now: the descriptor that staged
    /// the file may be closed already, its RELEASE still on its way, and nothing would store it.
    pub fn set_size(&self, ino: u64, size: u64, through_handle: bool) -> FsResult<Attr> {
        let node = self.node(ino)?;
        let Node::DeltaFile { entry, name, file, .. } = &node else {
            return Err(FsError::new(libc::EROFS));
        };
        // truncate(2) without a handle opens the file as a writer would, also when it is staged:
        // a staged file whose last writer is being released (RELEASE is asynchronous to close)
        // goes, and a size set on it alone was lost.
        let staged = if through_handle { self.staging.staged_path(entry, name, file) } else { None };
        let Some(path) = staged else {
            let opened = self.open(ino, true, size == 0)?;
            let mut result = Ok(());
            if size != 0 {
                result = self.set_size(ino, size, true).map(drop);
            }
            let result = result.and_then(|()| self.flush(opened.fh));
            self.release(opened.fh);
            result?;
            // The size as stored now, not as the catalog had it before this store.
            self.refresh();
            return self.attr_of(ino, &node);
        };
        let f =
            std::fs::OpenOptions::new().write(true).open(path).map_err(|e| FsError::eio(e.to_string()))?;
        write::fits(&f, size)?;
        f.set_len(size).map_err(|e| FsError::eio(e.to_string()))?;
        self.staging.resized(&self.store, entry, name, file, size)?;
        if !through_handle {
            if let Some(id) = self.staging.staged_id(entry, name, file) {
                self.staging.commit(&self.store, entry, name, id)?;
            }
        }
        self.attr_of(ino, &node)
    }

    /// close() of a handle: a file written through it (or through any other descriptor) and not
    /// stored as it is now is stored, and the error (a full disk, an earlier failed write of
    /// the file) returned to close().
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let job = match self.handles.lock().unwrap_or_else(|e| e.into_inner()).get(&fh).map(|h| &h.target) {
            Some(Target::Staged { base, name, id, writer: true, .. }) => (base.clone(), name.clone(), *id),
            _ => return Ok(()),
        };
        self.staging.commit(&self.store, &job.0, &job.1, job.2)
    }

    pub fn unlink(&self, parent: u64, file: &str) -> FsResult<()> {
        // What is stored now (another descriptor's close may have just changed it).
        self.refresh();
        let Node::DeltaDir { entry, created, name, dir } = self.node(parent)? else {
            return Err(FsError::new(libc::EROFS));
        };
        let path = write::join(&dir, file);
        if find(&self.delta_tree(&entry, &name).files, &[], &path) == Some(Kind::Dir) {
            return Err(FsError::new(libc::EISDIR));
        }
        self.staging.unlink(&self.store, &entry, &name, &path)?;
        self.staging.keep_parents(&self.store, &entry, &name, &path)?;
        let node = Node::DeltaFile { entry, created, name, file: path };
        // Its inode names nothing now (a file of that name written later is a new one).
        self.inodes.write().unwrap_or_else(|e| e.into_inner()).forget(&node);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        // What is stored now (another descriptor's close may have just changed it).
        self.refresh();
        match self.node(parent)? {
            Node::Deltas { entry, .. } => self.staging.rmdir(&self.store, &entry, name),
            Node::DeltaDir { entry, name: delta, dir, .. } => {
                let path = write::join(&dir, name);
                let t = self.delta_tree(&entry, &delta);
                match find(&t.files, &t.dirs, &path) {
                    None => Err(FsError::new(libc::ENOENT)),
                    Some(Kind::File) => Err(FsError::new(libc::ENOTDIR)),
                    Some(Kind::Dir) if !children(&t.files, &t.dirs, &path).is_empty() => {
                        Err(FsError::new(libc::ENOTEMPTY))
                    }
                    Some(Kind::Dir) => self.staging.rmdir_sub(&entry, &delta, &path),
                }
            }
            _ => Err(FsError::new(libc::EROFS)),
        }
    }

    /// `rename(2)` inside one `<entry>/deltas/NAME/` (files and directories, replacing a file or
    /// an empty directory of the target name). Out of the entry, into another, or of an entry's
    /// directory itself: EXDEV (so `mv` copies instead); anywhere else: EROFS.
    pub fn rename(&self, parent: u64, name: &str, newparent: u64, newname: &str, flags: u32) -> FsResult<()> {
        // What is stored now (another descriptor's close may have just changed it).
        self.refresh();
        const NOREPLACE: u32 = 1;
        if flags & !NOREPLACE != 0 {
            // RENAME_EXCHANGE, RENAME_WHITEOUT.
            return Err(FsError::new(libc::EINVAL));
        }
        let (from_dir, to_dir) = (self.node(parent)?, self.node(newparent)?);
        let (entry, delta, from, to) = match (&from_dir, &to_dir) {
            (
                Node::DeltaDir { entry, created, name: n, dir },
                Node::DeltaDir { entry: e2, created: c2, name: n2, dir: d2 },
            ) if entry == e2 && created == c2 && n == n2 => {
                (entry.clone(), n.clone(), write::join(dir, name), write::join(d2, newname))
            }
            (Node::DeltaDir { .. } | Node::Deltas { .. }, _)
            | (_, Node::DeltaDir { .. } | Node::Deltas { .. }) => {
                return Err(FsError {
                    errno: libc::EXDEV,
                    message: Some(format!(
                        "rename of {name:?} to {newname:?}: only within one deltas/<name>/ directory"
                    )),
                })
            }
            _ => return Err(FsError::new(libc::EROFS)),
        };
        let t = self.delta_tree(&entry, &delta);
        let source = find(&t.files, &t.dirs, &from).ok_or(FsError::new(libc::ENOENT))?;
        match (source, find(&t.files, &t.dirs, &to)) {
            (_, Some(_)) if from == to => return Ok(()),
            (_, Some(_)) if flags & NOREPLACE != 0 => return Err(FsError::new(libc::EEXIST)),
            (Kind::File, Some(Kind::Dir)) => return Err(FsError::new(libc::EISDIR)),
            (Kind::Dir, Some(Kind::File)) => return Err(FsError::new(libc::ENOTDIR)),
            (Kind::Dir, Some(Kind::Dir)) if !children(&t.files, &t.dirs, &to).is_empty() => {
                return Err(FsError::new(libc::ENOTEMPTY))
            }
            _ => {}
        }
        self.staging.rename(&self.store, &entry, &delta, &from, &to)?;
        self.staging.keep_parents(&self.store, &entry, &delta, &from)?;
        self.inodes.write().unwrap_or_else(|e| e.into_inner()).rename(&entry, &delta, &from, &to);
        Ok(())
    }
}

/// Copy a stored file's bytes into a staging file (rewriting a stored delta file in place).
pub(super) fn stage_copy(stored: &VFile, to: &std::fs::File) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    const PIECE: u64 = 8 << 20;
    // A private cache: the shared one is keyed by inode, and this file has none of its own.
    let cache = Cache::new(4 * CHUNK_SIZE);
    let mut offset = 0;
    while offset < stored.size {
        let bytes = read::read_range(stored, offset, PIECE, &cache).map_err(|e| e.to_string())?;
        to.write_all_at(&bytes, offset).map_err(|e| e.to_string())?;
        offset += bytes.len() as u64;
    }
    Ok(())
}

pub(super) fn read_staged(file: &std::fs::File, offset: u64, size: u32) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let n = offset.saturating_add(size as u64).min(len).saturating_sub(offset) as usize;
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

//! The filesystem: the tree of entries and files, inode numbers, open handles, reads.
//!
//! This module holds the operations as plain methods returning `Result<_, FsError>`; `fuse.rs`
//! only forwards fuser calls here (mountpoint-s3's split), so everything but the wire protocol is
//! testable without a mount.
//!
//! Tree: `/` lists one directory per registry entry; `/<entry>/` holds the entry's files and a
//! `deltas/` directory. Files are immutable once visible, so they get long attribute timeouts and
//! keep-cache; the root and the entry directories are re-read from the registry (when its mtime
//! changes) so entries added or removed while mounted appear and vanish without a remount.
//! Inode numbers are assigned on first sight and never reused within a mount; an entry removed
//! and added again under the same name is a new generation with new inodes.
//!
//! Files: this one (`Fs`: lookup, getattr, readdir, open, read, release, with read-ahead),
//! `inodes.rs` (the inode table and path lookups), `catalog.rs` (the registry as last loaded and
//! the views built from it, swapped in without blocking requests), `decoded/` (fills of the
//! disk cache; `pwrite.rs`: those written in aligned spans), `deltas.rs` (the requests that
//! change `deltas/`), `write/` (their staging and registry transactions), `error.rs` (errno),
//! `fuse.rs` (the wire protocol), `mount.rs`.

mod catalog;
mod decoded;
mod deltas;
mod error;
pub mod fuse;
mod inodes;
pub mod mount;
pub mod write;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::registry::Store;
pub use crate::variant::check_sources;
pub use crate::variant::read::{self, panic_message, Cache, ChunkKey, CHUNK_SIZE};
use crate::variant::{self, Content, EntryView, VFile};
use catalog::Catalog;
use deltas::{read_staged, stage_copy};
pub use error::{FsError, FsResult};
use inodes::{children, find, Inodes, Node};

pub const ROOT_INO: u64 = 1;
pub const DELTAS_DIR: &str = "deltas";

/// The largest read-ahead window a sequential reader grows to, in bytes.
const MAX_PREFETCH: u64 = 8 * CHUNK_SIZE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Attributes without FUSE types.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    /// Whether it may change while mounted (root, entry dirs, deltas/): short timeouts.
    pub mutable: bool,
    /// Whether it can be written (deltas/ and what is under it).
    pub writable: bool,
}

/// An open file: its handle, and for a file whose bytes are a real file's, that file (which the
/// kernel can read directly: FUSE passthrough).
pub struct Opened {
    pub fh: u64,
    pub backing: Option<Arc<variant::SourceFile>>,
    /// Whether the kernel may keep the file's cached pages across opens: true for files that
    /// never change while visible, false for what can be rewritten through deltas/.
    pub keep_cache: bool,
}

/// The paths of what is in `<base>/deltas/<name>/`: files (staged, stored, unfinished) and the
/// directories made in it.
struct DeltaTree {
    files: std::collections::BTreeSet<String>,
    dirs: Vec<String>,
}

/// An open file: what it reads and how its reader has been moving (for prefetch).
struct Handle {
    target: Target,
    next_offset: u64,
    window: u64,
    /// A sequential reader's cached chunks before this offset have been dropped (drop-behind);
    /// shared with its prefetch tasks, which must not put such a chunk back.
    dropped_to: Arc<std::sync::atomic::AtomicU64>,
}

enum Target {
    /// A visible (immutable) file.
    Read(VFile),
    /// A file being written into `deltas/NEW/`, staged on disk until close(): staged file `id`
    /// of the session, which knows its name (renames move it) and whether a write of it failed.
    /// `writer`: opened for writing (counted by the staging, which drops the staged copy when
    /// the last writer is released); a reader of a file being written has `writer` false.
    Staged { file: Arc<std::fs::File>, base: String, name: String, id: u64, writer: bool },
}

/// A callback into the FUSE layer that invalidates one name under the root.
type ForgetName = Box<dyn Fn(&str) + Send + Sync>;

pub struct Fs {
    store: Store,
    catalog: RwLock<Catalog>,
    /// Reloads of the registry and builds of views, done outside `catalog`'s lock (catalog.rs).
    loading: catalog::Loading,
    inodes: RwLock<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    cache: Arc<Cache>,
    mount_time: SystemTime,
    staging: write::Staging,
    /// Tells the kernel to forget a cached name under the root (set by the FUSE layer).
    forget_name: std::sync::OnceLock<ForgetName>,
    /// Decoded files on local disk (decoded/), when the mount has one.
    disk: std::sync::OnceLock<Arc<crate::cache::disk::DiskCache>>,
    /// Decoded files in memory, in front of the disk cache (decoded/).
    memory: std::sync::OnceLock<Arc<crate::cache::memory::MemoryCache>>,
    /// The view of each entry whose objects were prefetched (see `prefetch_objects`).
    prefetched: Mutex<HashMap<String, std::sync::Weak<EntryView>>>,
    /// The entries whose files are being decoded into the disk cache (decoded/).
    entry_fills: decoded::EntryFills,
}

impl Fs {
    pub fn new(store: Store, cache_size: u64) -> Result<Fs, crate::registry::Error> {
        write::sweep(&store);
        let registry = store.load()?;
        let loaded_mtime = catalog::registry_stamp(&store);
        Ok(Fs {
            store,
            catalog: RwLock::new(Catalog {
                registry: Arc::new(registry),
                loaded_mtime,
                loaded_at: std::time::Instant::now(),
                views: HashMap::new(),
            }),
            loading: catalog::Loading::default(),
            inodes: RwLock::new(Inodes::default()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            cache: Arc::new(Cache::new(cache_size)),
            mount_time: SystemTime::now(),
            staging: write::Staging::default(),
            forget_name: std::sync::OnceLock::new(),
            disk: std::sync::OnceLock::new(),
            memory: std::sync::OnceLock::new(),
            prefetched: Mutex::default(),
            entry_fills: Default::default(),
        })
    }

    /// Install how to make the kernel forget a cached root entry: called for every entry that a
    /// registry reload shows removed or registered anew, so the name never resolves to what it
    /// was (the kernel would otherwise keep it for the entry timeout).
    pub fn on_forget_name(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.forget_name.set(Box::new(f));
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Serve synthesized files from their decoded copies in `disk` (see decoded/).
    pub fn set_disk_cache(&self, disk: Arc<crate::cache::disk::DiskCache>) {
        let _ = self.disk.set(disk);
    }

    fn node(&self, ino: u64) -> FsResult<Node> {
        self.inodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .node(ino)
            .cloned()
            .ok_or(FsError::new(libc::ENOENT))
    }

    fn ino(&self, node: Node) -> u64 {
        self.inodes.write().unwrap_or_else(|e| e.into_inner()).ino(node)
    }

    fn attr_of(&self, ino: u64, node: &Node) -> FsResult<Attr> {
        // The mtime of everything of an entry is the entry's creation second.
        let secs = |name: &str| {
            let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            let created = catalog.registry.entries.get(name).map_or(0, |e| e.created);
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(created)
        };
        let dir = |mtime, writable| Attr { ino, kind: Kind::Dir, size: 0, mtime, mutable: true, writable };
        Ok(match node {
            Node::Root => dir(self.mount_time, false),
            Node::Entry { name, .. } | Node::Dir { entry: name, .. } => dir(secs(name), false),
            Node::Deltas { entry, .. } | Node::DeltaDir { entry, .. } => dir(secs(entry), true),
            Node::File { entry, created, file } => {
                let view = self.view(entry, *created)?;
                let f = view.file(file).ok_or(FsError::new(libc::ENOENT))?;
                // A delta entry's files can be removed or replaced through deltas/: short timeouts.
                let mutable = self.is_writable_entry(entry);
                Attr { ino, kind: Kind::File, size: f.size, mtime: secs(entry), mutable, writable: false }
            }
            Node::DeltaFile { entry, name, file, .. } => {
                let size = match self.staging.staged_size(entry, name, file) {
                    Some(size) => size,
                    // An unfinished file (its writer died) shows as empty until written again.
                    None => self.committed(name, file).map_or(0, |f| f.size),
                };
                Attr { ino, kind: Kind::File, size, mtime: secs(entry), mutable: true, writable: true }
            }
            Node::Gone(_) => return Err(FsError::new(libc::ENOENT)),
        })
    }

    /// A stored file of delta entry `name`.
    fn committed(&self, name: &str, file: &str) -> FsResult<VFile> {
        let created = self.entry_created(name).ok_or(FsError::new(libc::ENOENT))?;
        let view = self.view(name, created)?;
        view.file(file).cloned().ok_or(FsError::new(libc::ENOENT))
    }

    /// Whether entry `name`'s files can change while mounted (a delta, written through deltas/).
    fn is_writable_entry(&self, name: &str) -> bool {
        let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        matches!(
            catalog.registry.entries.get(name).map(|e| &e.kind),
            Some(crate::registry::EntryKind::Delta { .. })
        )
    }

    /// Whether `name` is a delta of `base`, stored (in the registry) or being written.
    fn is_delta_of(&self, base: &str, name: &str) -> bool {
        if self.staging.has_session(base, name) {
            return true;
        }
        let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        matches!(catalog.registry.entries.get(name).map(|e| &e.kind), Some(crate::registry::EntryKind::Delta { base: b, .. }) if b == base)
    }

    /// What `<base>/deltas/<name>/` holds: staged, stored and unfinished files, made directories.
    fn delta_tree(&self, base: &str, name: &str) -> DeltaTree {
        let (staged, dirs) = self.staging.paths(base, name);
        let mut files: std::collections::BTreeSet<String> = staged.into_iter().collect();
        if self.is_delta_of(base, name) {
            if let Some(c) = self.entry_created(name) {
                if let Ok(view) = self.view(name, c) {
                    files.extend(view.files.iter().map(|f| f.name.clone()));
                }
            }
            let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            files.extend(catalog.registry.unfinished(name).into_iter().map(str::to_owned));
        }
        DeltaTree { files, dirs }
    }

    /// The file paths of entry `entry`'s view.
    fn entry_paths(&self, entry: &str, created: u64) -> FsResult<Vec<String>> {
        Ok(self.view(entry, created)?.files.iter().map(|f| f.name.clone()).collect())
    }

    /// Check that `node` still exists in the current registry (or staging).
    fn live(&self, node: &Node) -> bool {
        match node {
            Node::Root => true,
            Node::Entry { name: entry, created }
            | Node::Deltas { entry, created }
            | Node::File { entry, created, .. } => self.entry_created(entry) == Some(*created),
            Node::Dir { entry, created, dir } => {
                self.entry_created(entry) == Some(*created)
                    && self.entry_paths(entry, *created).is_ok_and(|p| find(&p, &[], dir) == Some(Kind::Dir))
            }
            Node::DeltaDir { entry, created, name, dir } => {
                self.entry_created(entry) == Some(*created)
                    && self.is_delta_of(entry, name)
                    && (dir.is_empty() || {
                        let t = self.delta_tree(entry, name);
                        find(&t.files, &t.dirs, dir) == Some(Kind::Dir)
                    })
            }
            Node::DeltaFile { entry, created, name, file } => {
                self.entry_created(entry) == Some(*created) && {
                    let t = self.delta_tree(entry, name);
                    t.files.contains(file)
                }
            }
            Node::Gone(_) => false,
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        read::test_panic(name);
        self.refresh();
        let node = match self.node(parent)? {
            Node::Root => {
                let created = self.entry_created(name).ok_or(FsError::new(libc::ENOENT))?;
                Node::Entry { name: name.to_owned(), created }
            }
            Node::Entry { name: entry, created } if name == DELTAS_DIR => Node::Deltas { entry, created },
            Node::Entry { name: entry, created } => self.entry_child(entry, created, String::new(), name)?,
            Node::Dir { entry, created, dir } => self.entry_child(entry, created, dir, name)?,
            Node::Deltas { entry, created } => {
                Node::DeltaDir { entry, created, name: name.to_owned(), dir: String::new() }
            }
            Node::DeltaDir { entry, created, name: delta, dir } => {
                let path = write::join(&dir, name);
                let t = self.delta_tree(&entry, &delta);
                match find(&t.files, &t.dirs, &path) {
                    Some(Kind::File) => Node::DeltaFile { entry, created, name: delta, file: path },
                    Some(Kind::Dir) => Node::DeltaDir { entry, created, name: delta, dir: path },
                    None => return Err(FsError::new(libc::ENOENT)),
                }
            }
            Node::File { .. } | Node::DeltaFile { .. } => return Err(FsError::new(libc::ENOTDIR)),
            Node::Gone(_) => return Err(FsError::new(libc::ENOENT)),
        };
        if !self.live(&node) {
            return Err(FsError::new(libc::ENOENT));
        }
        let ino = self.ino(node.clone());
        self.attr_of(ino, &node)
    }

    /// `name` in directory `dir` of a (read-only) entry: a file or a subdirectory.
    fn entry_child(&self, entry: String, created: u64, dir: String, name: &str) -> FsResult<Node> {
        let path = write::join(&dir, name);
        match find(&self.entry_paths(&entry, created)?, &[], &path) {
            Some(Kind::File) => Ok(Node::File { entry, created, file: path }),
            Some(Kind::Dir) => Ok(Node::Dir { entry, created, dir: path }),
            None => Err(FsError::new(libc::ENOENT)),
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        self.refresh();
        self.attr_of(ino, &node)
    }

    /// Directory listing (without `.` and `..`).
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, Kind, String)>> {
        self.refresh();
        let node = self.node(ino)?;
        if !self.live(&node) {
            return Err(FsError::new(libc::ENOENT));
        }
        match node {
            Node::Root => {
                let names: Vec<(String, u64)> = {
                    let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
                    catalog.registry.entries.iter().map(|(n, e)| (n.clone(), e.generation())).collect()
                };
                Ok(names
                    .into_iter()
                    .map(|(name, created)| {
                        (self.ino(Node::Entry { name: name.clone(), created }), Kind::Dir, name)
                    })
                    .collect())
            }
            Node::Entry { name: entry, created } => {
                let mut out = vec![(
                    self.ino(Node::Deltas { entry: entry.clone(), created }),
                    Kind::Dir,
                    DELTAS_DIR.to_owned(),
                )];
                // A file or directory of the model named `deltas` is hidden by the write folder.
                let paths = self.entry_paths(&entry, created)?;
                for (child, kind) in children(&paths, &[], "").into_iter().filter(|(n, _)| n != DELTAS_DIR) {
                    out.push(self.entry_node(&entry, created, "", child, kind));
                }
                Ok(out)
            }
            Node::Dir { entry, created, dir } => {
                let paths = self.entry_paths(&entry, created)?;
                Ok(children(&paths, &[], &dir)
                    .into_iter()
                    .map(|(child, kind)| self.entry_node(&entry, created, &dir, child, kind))
                    .collect())
            }
            Node::Deltas { entry, created } => {
                let mut names = self.staging.sessions(&entry);
                {
                    let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
                    for (n, e) in &catalog.registry.entries {
                        if matches!(&e.kind, crate::registry::EntryKind::Delta { base, .. } if *base == entry)
                        {
                            names.push(n.clone());
                        }
                    }
                }
                names.sort();
                names.dedup();
                Ok(names
                    .into_iter()
                    .map(|name| {
                        let node = Node::DeltaDir {
                            entry: entry.clone(),
                            created,
                            name: name.clone(),
                            dir: String::new(),
                        };
                        (self.ino(node), Kind::Dir, name)
                    })
                    .collect())
            }
            Node::DeltaDir { entry, created, name, dir } => {
                let t = self.delta_tree(&entry, &name);
                Ok(children(&t.files, &t.dirs, &dir)
                    .into_iter()
                    .map(|(child, kind)| {
                        let path = write::join(&dir, &child);
                        let (entry, name) = (entry.clone(), name.clone());
                        let node = match kind {
                            Kind::File => Node::DeltaFile { entry, created, name, file: path },
                            Kind::Dir => Node::DeltaDir { entry, created, name, dir: path },
                        };
                        (self.ino(node), kind, child)
                    })
                    .collect())
            }
            Node::File { .. } | Node::DeltaFile { .. } => Err(FsError::new(libc::ENOTDIR)),
            Node::Gone(_) => Err(FsError::new(libc::ENOENT)),
        }
    }

    /// A listing row for `child` of directory `dir` of a read-only entry.
    fn entry_node(
        &self,
        entry: &str,
        created: u64,
        dir: &str,
        child: String,
        kind: Kind,
    ) -> (u64, Kind, String) {
        let path = write::join(dir, &child);
        let entry = entry.to_owned();
        let node = match kind {
            Kind::File => Node::File { entry, created, file: path },
            Kind::Dir => Node::Dir { entry, created, dir: path },
        };
        (self.ino(node), kind, child)
    }

    /// Open a file. For reading, every file it reads from must be unchanged since it was added,
    /// so a changed base gives EIO here rather than wrong bytes later. Writing is allowed under
    /// `deltas/` only.
    pub fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<Opened> {
        // A delta's files change when written through deltas/: serve the registry as it is now.
        self.refresh();
        let node = self.node(ino)?;
        let (target, where_) = match node.clone() {
            Node::File { entry, created, file } => {
                if write {
                    return Err(FsError::new(libc::EROFS));
                }
                let view = self.view(&entry, created)?;
                self.prefetch_objects(&entry, &view, &file);
                (
                    Target::Read(view.file(&file).ok_or(FsError::new(libc::ENOENT))?.clone()),
                    format!("{entry}/{file}"),
                )
            }
            Node::DeltaFile { entry, name, file, .. } => {
                let committed = self.committed(&name, &file);
                if write {
                    let fill = committed.is_ok() && !truncate;
                    let (f, id, staged) =
                        self.staging.open(&self.store, &entry, &name, &file, truncate, fill)?;
                    if let (Ok(stored), false, false) = (&committed, truncate, staged) {
                        // Rewriting a stored file: stage its bytes first, so a partial write
                        // changes only what it covers (the kernel sends O_TRUNC as a separate
                        // truncate when it did not negotiate atomic O_TRUNC). A second open of
                        // the file waits in staging.open until this copy is over.
                        let copied = stage_copy(stored, &f);
                        self.staging.filled(&entry, &name, id, copied.clone());
                        if let Err(e) = copied {
                            self.staging.closed(&entry, &name, id);
                            return Err(FsError::eio(format!("{name}/{file}: {e}")));
                        }
                    }
                    let target = Target::Staged { file: Arc::new(f), base: entry, name, id, writer: true };
                    return Ok(self.insert_handle(ino, target));
                }
                if let Some(path) = self.staging.staged_path(&entry, &name, &file) {
                    // A reader of a file still being written sees what is staged.
                    let f = std::fs::File::open(path).map_err(|e| FsError::eio(e.to_string()))?;
                    let target =
                        Target::Staged { file: Arc::new(f), base: entry, name, id: 0, writer: false };
                    return Ok(self.insert_handle(ino, target));
                }
                if committed.is_err() && self.delta_tree(&entry, &name).files.contains(&file) {
                    return Err(FsError::eio(format!(
                        "{name}/{file}: unfinished (its writer stopped before close); write it again"
                    )));
                }
                (Target::Read(committed?), format!("{entry}/deltas/{name}/{file}"))
            }
            Node::Gone(_) => return Err(FsError::new(libc::ENOENT)),
            _ => return Err(FsError::new(libc::EISDIR)),
        };
        if let Target::Read(vfile) = &target {
            check_sources(vfile).map_err(|e| FsError::eio(format!("{where_}: {e}")))?;
        }
        let target = self.served_decoded(&node, target)?;
        Ok(self.insert_handle(ino, target))
    }

    /// At the first open of a file of `view` (entry `entry`), fetch in the background, one
    /// after another, the object-store files that its other files read from: a loader opens
    /// the next shard while this one is decoded or read, and finds its objects (the shard, the
    /// delta's container, the base's) fetched or on their way. The opened file's own are fetched
    /// by its open (`check_sources`, in parallel).
    fn prefetch_objects(&self, entry: &str, view: &Arc<EntryView>, opened: &str) {
        {
            let mut done = self.prefetched.lock().unwrap_or_else(|e| e.into_inner());
            if done.get(entry).and_then(std::sync::Weak::upgrade).is_some_and(|v| Arc::ptr_eq(&v, view)) {
                return;
            }
            done.insert(entry.to_owned(), Arc::downgrade(view));
        }
        let mut mine = vec![];
        let mut others = vec![];
        for f in &view.files {
            let out = if f.name == opened { &mut mine } else { &mut others };
            match &f.content {
                Content::Passthrough(source) => out.push(source.clone()),
                Content::Synth(synth) => synth.tensors.iter().for_each(|t| t.source.files(out)),
                Content::Generated(_) | Content::Broken(_) => {}
            }
        }
        let mut seen: std::collections::HashSet<usize> =
            mine.iter().map(|s| Arc::as_ptr(s) as usize).collect();
        others.retain(|s| s.is_remote() && seen.insert(Arc::as_ptr(s) as usize));
        if others.is_empty() {
            return;
        }
        let entry = entry.to_owned();
        let spawned = std::thread::Builder::new().name("llmfs-prefetch".into()).spawn(move || {
            // One whole object after another: started all at once, they would share the
            // bandwidth with the opened file's own fetch, which its reader waits for.
            for source in others {
                if let Err(e) = source.fetch_whole() {
                    tracing::info!("{entry}: prefetch of {} stopped: {e}", source.path.display());
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("no prefetch thread: {e}");
        }
    }

    fn insert_handle(&self, ino: u64, target: Target) -> Opened {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let backing = match &target {
            Target::Read(VFile { content: Content::Passthrough(source), .. }) => Some(source.clone()),
            _ => None,
        };
        let keep_cache = match self.node(ino) {
            Ok(Node::File { entry, .. }) => !self.is_writable_entry(&entry),
            _ => false,
        };
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Handle { target, next_offset: 0, window: 0, dropped_to: Default::default() });
        Opened { fh, backing, keep_cache }
    }

    /// Read into a buffer of this thread's that is reused across requests, so a read costs
    /// neither an allocation nor zeroing nor page faults; `reply` gets the bytes.
    pub fn read<R>(&self, fh: u64, offset: u64, size: u32, reply: impl FnOnce(FsResult<&[u8]>) -> R) -> R {
        let file = match self.track(fh, offset, size) {
            Ok(Ok(file)) => file,
            Ok(Err(staged)) => {
                return reply(
                    read_staged(&staged, offset, size).as_deref().map_err(|e| FsError::eio(e.to_string())),
                )
            }
            Err(e) => return reply(Err(e)),
        };
        let n = read::read_len(&file, offset, size as u64);
        if let Some(found) = read::within_one_chunk(&file, offset, n, &self.cache) {
            return match found {
                Ok((chunk, range)) => reply(Ok(&chunk[range])),
                Err(e) => reply(Err(e.into())),
            };
        }
        crate::cache::with_scratch(n, |buf| match read::read_into(&file, offset, buf, &self.cache) {
            Ok(()) => reply(Ok(buf)),
            Err(e) => reply(Err(e.into())),
        })
    }

    /// Note where handle `fh`'s reader is going, prefetch for a sequential one, and return what it
    /// reads: a visible file, or (Err) a staged one.
    fn track(&self, fh: u64, offset: u64, size: u32) -> FsResult<Result<VFile, Arc<std::fs::File>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let (file, prefetch_from, window, behind, passed) = {
            let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            let h = handles.get_mut(&fh).ok_or(FsError::new(libc::EBADF))?;
            let file = match &h.target {
                Target::Read(f) => f.clone(),
                Target::Staged { file, .. } => return Ok(Err(file.clone())),
            };
            // Sequential reads grow the read-ahead window (doubling up to MAX_PREFETCH); a seek
            // resets it, as mountpoint-s3's prefetcher does. "Sequential" tolerates reordering:
            // the kernel's read-ahead sends several requests at once and the FUSE threads take
            // them in any order, so a read near the furthest point reached still counts.
            let end = offset + size as u64;
            // Chunks a sequential reader has left more than MAX_PREFETCH behind (reordered
            // requests stay within that) are dropped from the cache, as mountpoint-s3's
            // prefetcher drops what it has served: streaming a file then neither evicts other
            // readers' chunks nor needs fresh memory for each chunk it decodes.
            let mut behind = None;
            if h.next_offset != 0 && offset.abs_diff(h.next_offset) <= MAX_PREFETCH {
                h.window = (h.window * 2).clamp(CHUNK_SIZE, MAX_PREFETCH);
                h.next_offset = h.next_offset.max(end);
                let to = h.next_offset.saturating_sub(MAX_PREFETCH);
                let dropped = h.dropped_to.load(Relaxed);
                if to > dropped + CHUNK_SIZE {
                    behind = Some(dropped..to);
                    h.dropped_to.store(to, Relaxed);
                }
            } else {
                h.window = 0;
                h.next_offset = end;
                h.dropped_to.store(offset, Relaxed);
            }
            (file, h.next_offset, h.window, behind, h.dropped_to.clone())
        };
        if window > 0 {
            read::prefetch(&file, prefetch_from, window, &self.cache, passed);
        }
        if let Some(r) = behind {
            read::drop_behind(&file, r.start, r.end, &self.cache);
        }
        Ok(Ok(file))
    }

    /// Drop a handle; a written file not yet stored (no flush came) is stored now. If it cannot
    /// be, its staged bytes are dropped with its last writer: close() already returned the
    /// error, keeping them would keep a full disk full, and the registry still lists the file
    /// as unfinished.
    pub fn release(&self, fh: u64) {
        if let Err(e) = self.flush(fh) {
            tracing::error!("storing a written file failed: {}", e.message.unwrap_or_default());
        }
        if let Some(Handle { target: Target::Staged { base, name, id, writer: true, .. }, .. }) =
            self.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh)
        {
            self.staging.closed(&base, &name, id);
        }
    }
}

/// Sizes of the store's filesystem, for statfs of the mount.
pub struct StoreStatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
}

impl Fs {
    pub fn store_statfs(&self) -> Option<StoreStatfs> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.store.root().as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(StoreStatfs {
            blocks: st.f_blocks as u64,
            bfree: st.f_bfree as u64,
            bavail: st.f_bavail as u64,
            files: st.f_files as u64,
            ffree: st.f_ffree as u64,
            bsize: st.f_frsize as u32,
        })
    }
}

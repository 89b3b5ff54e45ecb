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

mod decoded;
pub mod fuse;
pub mod mount;
pub mod read;
pub mod write;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::registry::{Registry, Store};
use crate::variant::{self, Content, EntryView, VFile};
pub use read::{Cache, ChunkKey, CHUNK_SIZE};

pub const ROOT_INO: u64 = 1;
pub const DELTAS_DIR: &str = "deltas";

/// The largest read-ahead window a sequential reader grows to, in bytes.
const MAX_PREFETCH: u64 = 8 * CHUNK_SIZE;

/// An errno with the reason, which the FUSE layer logs.
#[derive(Debug)]
pub struct FsError {
    pub errno: i32,
    pub message: Option<String>,
}

impl FsError {
    pub fn new(errno: i32) -> Self {
        FsError { errno, message: None }
    }
    pub fn eio(message: impl Into<String>) -> Self {
        FsError { errno: libc::EIO, message: Some(message.into()) }
    }
}

impl From<variant::ReadError> for FsError {
    fn from(e: variant::ReadError) -> Self {
        FsError::eio(e.to_string())
    }
}

pub type FsResult<T> = Result<T, FsError>;

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

/// What an inode names. `created` is the entry's generation (unique per registration).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Node {
    Root,
    Entry {
        name: String,
        created: u64,
    },
    Deltas {
        entry: String,
        created: u64,
    },
    File {
        entry: String,
        created: u64,
        file: String,
    },
    /// `<entry>/deltas/<name>/`: delta entry `name` over `entry`, stored or being written.
    DeltaDir {
        entry: String,
        created: u64,
        name: String,
    },
    DeltaFile {
        entry: String,
        created: u64,
        name: String,
        file: String,
    },
}

#[derive(Default)]
struct Inodes {
    by_node: HashMap<Node, u64>,
    nodes: Vec<Node>,
}

impl Inodes {
    fn ino(&mut self, node: Node) -> u64 {
        if let Some(&ino) = self.by_node.get(&node) {
            return ino;
        }
        self.nodes.push(node.clone());
        let ino = self.nodes.len() as u64 + ROOT_INO;
        self.by_node.insert(node, ino);
        ino
    }
    fn node(&self, ino: u64) -> Option<&Node> {
        if ino == ROOT_INO {
            return Some(&Node::Root);
        }
        self.nodes.get(ino.checked_sub(ROOT_INO + 1)? as usize)
    }
}

/// What says registry.json changed: its inode (every save renames a new file in) and mtime.
/// The inode alone catches two saves within one timestamp tick, which mtime alone would miss.
type RegistryStamp = (u64, SystemTime);

fn registry_stamp(store: &Store) -> Option<RegistryStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(store.registry_path()).ok()?;
    Some((meta.ino(), meta.modified().ok()?))
}

struct Catalog {
    registry: Registry,
    /// Identity of registry.json when loaded (None: not there).
    loaded_mtime: Option<RegistryStamp>,
    views: HashMap<String, (u64, Arc<EntryView>)>,
}

/// An open file: what it reads and how its reader has been moving (for prefetch).
struct Handle {
    target: Target,
    next_offset: u64,
    window: u64,
    /// A sequential reader's cached chunks before this offset have been dropped (drop-behind).
    dropped_to: u64,
}

enum Target {
    /// A visible (immutable) file.
    Read(VFile),
    /// A file being written into `deltas/NEW/`, staged on disk until close().
    /// `failed`: a write failed (a full disk): the file is incomplete and must not be stored.
    /// `writer`: opened for writing (counted by the staging, which drops the staged copy when
    /// the last writer is released).
    Staged {
        file: Arc<std::fs::File>,
        base: String,
        name: String,
        fname: String,
        dirty: bool,
        failed: bool,
        writer: bool,
    },
}

/// A callback into the FUSE layer that invalidates one name under the root.
type ForgetName = Box<dyn Fn(&str) + Send + Sync>;

pub struct Fs {
    store: Store,
    catalog: RwLock<Catalog>,
    inodes: RwLock<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    cache: Arc<Cache>,
    mount_time: SystemTime,
    staging: write::Staging,
    /// Tells the kernel to forget a cached name under the root (set by the FUSE layer).
    forget_name: std::sync::OnceLock<ForgetName>,
    /// Decoded files on local disk (decoded.rs), when the mount has one.
    disk: std::sync::OnceLock<Arc<crate::cache::disk::DiskCache>>,
}

impl Fs {
    pub fn new(store: Store, cache_size: u64) -> Result<Fs, crate::registry::Error> {
        write::sweep(&store);
        let registry = store.load()?;
        let loaded_mtime = registry_stamp(&store);
        Ok(Fs {
            store,
            catalog: RwLock::new(Catalog { registry, loaded_mtime, views: HashMap::new() }),
            inodes: RwLock::new(Inodes::default()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            cache: Arc::new(Cache::new(cache_size)),
            mount_time: SystemTime::now(),
            staging: write::Staging::default(),
            forget_name: std::sync::OnceLock::new(),
            disk: std::sync::OnceLock::new(),
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

    /// Serve synthesized files from their decoded copies in `disk` (see decoded.rs).
    pub fn set_disk_cache(&self, disk: Arc<crate::cache::disk::DiskCache>) {
        let _ = self.disk.set(disk);
    }

    /// Reload the registry if it changed on disk. A corrupt registry keeps the last good one.
    fn refresh(&self) {
        let mtime = registry_stamp(&self.store);
        if self.catalog.read().unwrap_or_else(|e| e.into_inner()).loaded_mtime == mtime {
            return;
        }
        let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        if catalog.loaded_mtime == mtime {
            return;
        }
        match self.store.load() {
            Ok(registry) => {
                tracing::info!(entries = registry.entries.len(), "registry reloaded");
                // A view is stale when its entry or any entry down its chain changed (a delta
                // written through deltas/ gains files without changing its generation).
                let old = &catalog.registry;
                let changed = |n: &str| old.entries.get(n) != registry.entries.get(n);
                let stale: Vec<String> = catalog
                    .views
                    .keys()
                    .filter(|name| {
                        registry.chain(name).map_or(true, |chain| chain.iter().any(|n| changed(n)))
                    })
                    .cloned()
                    .collect();
                let gone: Vec<String> = old
                    .entries
                    .iter()
                    .filter(|(n, e)| {
                        registry.entries.get(*n).is_none_or(|new| new.generation() != e.generation())
                    })
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in &stale {
                    catalog.views.remove(name);
                }
                if let Some(forget) = self.forget_name.get() {
                    // Gone entries, and changed ones (a delta stored again through deltas/ keeps
                    // its inodes): the kernel forgets their names, and with them cached sizes.
                    for name in gone.iter().chain(&stale) {
                        forget(name);
                    }
                }
                catalog.registry = registry;
                catalog.loaded_mtime = mtime;
            }
            Err(e) => tracing::error!("keeping the last good registry: {e}"),
        }
    }

    fn entry_created(&self, name: &str) -> Option<u64> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .registry
            .entries
            .get(name)
            .map(|e| e.generation())
    }

    /// The view of entry `name` at generation `created`, built on first use.
    fn view(&self, name: &str, created: u64) -> FsResult<Arc<EntryView>> {
        if let Some((c, v)) = self.catalog.read().unwrap_or_else(|e| e.into_inner()).views.get(name) {
            if *c == created {
                return Ok(v.clone());
            }
        }
        let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        if catalog.registry.entries.get(name).map(|e| e.generation()) != Some(created) {
            return Err(FsError::new(libc::ENOENT));
        }
        let view =
            Arc::new(variant::build_view(&catalog.registry, name).map_err(|e| FsError::eio(e.to_string()))?);
        for file in &view.files {
            if let Content::Broken(reason) = &file.content {
                tracing::error!(entry = name, file = file.name, "cannot be served: {reason}");
            }
        }
        catalog.views.insert(name.to_owned(), (created, view.clone()));
        Ok(view)
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
            Node::Entry { name, .. } => dir(secs(name), false),
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
                    None => self.committed(name, file)?.size,
                };
                Attr { ino, kind: Kind::File, size, mtime: secs(entry), mutable: true, writable: true }
            }
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

    /// Check that `node` still exists in the current registry (or staging).
    fn live(&self, node: &Node) -> bool {
        match node {
            Node::Root => true,
            Node::Entry { name: entry, created }
            | Node::Deltas { entry, created }
            | Node::File { entry, created, .. } => self.entry_created(entry) == Some(*created),
            Node::DeltaDir { entry, created, name } => {
                self.entry_created(entry) == Some(*created) && self.is_delta_of(entry, name)
            }
            Node::DeltaFile { entry, created, name, file } => {
                self.entry_created(entry) == Some(*created)
                    && (self.staging.staged_size(entry, name, file).is_some()
                        || self.committed(name, file).is_ok())
            }
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        self.refresh();
        let node = match self.node(parent)? {
            Node::Root => {
                let created = self.entry_created(name).ok_or(FsError::new(libc::ENOENT))?;
                Node::Entry { name: name.to_owned(), created }
            }
            Node::Entry { name: entry, created } => {
                if name == DELTAS_DIR {
                    Node::Deltas { entry, created }
                } else {
                    let view = self.view(&entry, created)?;
                    view.file(name).ok_or(FsError::new(libc::ENOENT))?;
                    Node::File { entry, created, file: name.to_owned() }
                }
            }
            Node::Deltas { entry, created } => Node::DeltaDir { entry, created, name: name.to_owned() },
            Node::DeltaDir { entry, created, name: delta } => {
                Node::DeltaFile { entry, created, name: delta, file: name.to_owned() }
            }
            Node::File { .. } | Node::DeltaFile { .. } => return Err(FsError::new(libc::ENOTDIR)),
        };
        if !self.live(&node) {
            return Err(FsError::new(libc::ENOENT));
        }
        let ino = self.ino(node.clone());
        self.attr_of(ino, &node)
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
            Node::Entry { name, created } => {
                let view = self.view(&name, created)?;
                let mut out = vec![(
                    self.ino(Node::Deltas { entry: name.clone(), created }),
                    Kind::Dir,
                    DELTAS_DIR.to_owned(),
                )];
                for f in &view.files {
                    let node = Node::File { entry: name.clone(), created, file: f.name.clone() };
                    out.push((self.ino(node), Kind::File, f.name.clone()));
                }
                Ok(out)
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
                        (
                            self.ino(Node::DeltaDir { entry: entry.clone(), created, name: name.clone() }),
                            Kind::Dir,
                            name,
                        )
                    })
                    .collect())
            }
            Node::DeltaDir { entry, created, name } => {
                let mut files: Vec<String> =
                    self.staging.staged(&entry, &name).into_iter().map(|(f, _)| f).collect();
                if let Some(c) = self.entry_created(&name) {
                    if let Ok(view) = self.view(&name, c) {
                        files.extend(view.files.iter().map(|f| f.name.clone()));
                    }
                }
                files.sort();
                files.dedup();
                Ok(files
                    .into_iter()
                    .map(|file| {
                        let node = Node::DeltaFile {
                            entry: entry.clone(),
                            created,
                            name: name.clone(),
                            file: file.clone(),
                        };
                        (self.ino(node), Kind::File, file)
                    })
                    .collect())
            }
            Node::File { .. } | Node::DeltaFile { .. } => Err(FsError::new(libc::ENOTDIR)),
        }
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
                (
                    Target::Read(view.file(&file).ok_or(FsError::new(libc::ENOENT))?.clone()),
                    format!("{entry}/{file}"),
                )
            }
            Node::DeltaFile { entry, name, file, .. } => {
                let committed = self.committed(&name, &file);
                if write {
                    let staged = self.staging.staged_path(&entry, &name, &file).is_some();
                    let f = self.staging.open(&self.store, &entry, &name, &file, truncate)?;
                    if let (Ok(stored), false, false) = (&committed, truncate, staged) {
                        // Rewriting a stored file: stage its bytes first, so a partial write
                        // changes only what it covers (the kernel sends O_TRUNC as a separate
                        // truncate when it did not negotiate atomic O_TRUNC).
                        if let Err(e) = stage_copy(stored, &f) {
                            self.staging.closed(&entry, &name, &file);
                            return Err(FsError::eio(format!("{name}/{file}: {e}")));
                        }
                    }
                    let target = Target::Staged {
                        file: Arc::new(f),
                        base: entry,
                        name,
                        fname: file,
                        dirty: truncate,
                        failed: false,
                        writer: true,
                    };
                    return Ok(self.insert_handle(ino, target));
                }
                if let Some(path) = self.staging.staged_path(&entry, &name, &file) {
                    // A reader of a file still being written sees what is staged.
                    let f = std::fs::File::open(path).map_err(|e| FsError::eio(e.to_string()))?;
                    let target = Target::Staged {
                        file: Arc::new(f),
                        base: entry,
                        name,
                        fname: file,
                        dirty: false,
                        failed: false,
                        writer: false,
                    };
                    return Ok(self.insert_handle(ino, target));
                }
                (Target::Read(committed?), format!("{entry}/deltas/{name}/{file}"))
            }
            _ => return Err(FsError::new(libc::EISDIR)),
        };
        if let Target::Read(vfile) = &target {
            check_sources(vfile).map_err(|e| FsError::eio(format!("{where_}: {e}")))?;
        }
        let target = self.served_decoded(&node, target)?;
        Ok(self.insert_handle(ino, target))
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
            .insert(fh, Handle { target, next_offset: 0, window: 0, dropped_to: 0 });
        Opened { fh, backing, keep_cache }
    }

    /// `mkdir <entry>/deltas/NAME`.
    pub fn mkdir(&self, parent: u64, name: &str) -> FsResult<Attr> {
        let Node::Deltas { entry, .. } = self.node(parent)? else {
            return Err(FsError::new(libc::EROFS));
        };
        self.staging.mkdir(&self.store, &entry, name)?;
        self.lookup(parent, name)
    }

    /// `open(O_CREAT)` in `<entry>/deltas/NAME/`.
    pub fn create(&self, parent: u64, file: &str) -> FsResult<(Attr, Opened)> {
        let Node::DeltaDir { entry, created, name } = self.node(parent)? else {
            return Err(FsError::new(libc::EROFS));
        };
        let f = self.staging.open(&self.store, &entry, &name, file, true)?;
        let node =
            Node::DeltaFile { entry: entry.clone(), created, name: name.clone(), file: file.to_owned() };
        let ino = self.ino(node.clone());
        let attr = self.attr_of(ino, &node)?;
        let target = Target::Staged {
            file: Arc::new(f),
            base: entry,
            name,
            fname: file.to_owned(),
            dirty: true,
            failed: false,
            writer: true,
        };
        Ok((attr, self.insert_handle(ino, target)))
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (file, base, name, fname) = {
            let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            match handles.get_mut(&fh).map(|h| &mut h.target) {
                Some(Target::Staged { file, dirty, base, name, fname, .. }) => {
                    *dirty = true;
                    (file.clone(), base.clone(), name.clone(), fname.clone())
                }
                Some(Target::Read(_)) => return Err(FsError::new(libc::EBADF)),
                None => return Err(FsError::new(libc::EBADF)),
            }
        };
        let n = write::write_at(&file, offset, data).inspect_err(|_| {
            if let Some(Handle { target: Target::Staged { failed, .. }, .. }) =
                self.handles.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&fh)
            {
                *failed = true;
            }
        })?;
        // Code what the file now holds in order while the copy goes on (delta::stream).
        self.staging.written(&base, &name, &fname, offset, data.len() as u64);
        Ok(n)
    }

    /// `truncate`/`ftruncate` of a file being written (cp may size it first).
    pub fn set_size(&self, ino: u64, size: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        let Node::DeltaFile { entry, name, file, .. } = &node else {
            return Err(FsError::new(libc::EROFS));
        };
        let path = self.staging.staged_path(entry, name, file).ok_or(FsError::new(libc::EPERM))?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(size))
            .map_err(|e| FsError::eio(e.to_string()))?;
        self.staging.resized(&self.store, entry, name, file, size);
        self.attr_of(ino, &node)
    }

    /// close() of a handle: a file written through it is stored now, and the error (a full disk)
    /// returned to close().
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let job = {
            let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            match handles.get_mut(&fh).map(|h| &mut h.target) {
                Some(Target::Staged { base, name, fname, failed: true, .. }) => {
                    // Never store a file some write of which was lost: drop it, and say so again.
                    self.staging.discard(base, name, fname);
                    return Err(FsError {
                        errno: libc::EIO,
                        message: Some(format!("{name}/{fname}: a write failed; the file was not stored")),
                    });
                }
                Some(Target::Staged { base, name, fname, dirty, .. }) if *dirty => {
                    *dirty = false;
                    Some((base.clone(), name.clone(), fname.clone()))
                }
                _ => None,
            }
        };
        match job {
            Some((base, name, file)) => {
                self.staging.commit(&self.store, &base, &name, &file).inspect_err(|_| {
                    // Keep it dirty so that release (or another flush) tries again.
                    if let Some(Handle { target: Target::Staged { dirty, .. }, .. }) =
                        self.handles.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&fh)
                    {
                        *dirty = true;
                    }
                })
            }
            None => Ok(()),
        }
    }

    pub fn unlink(&self, parent: u64, file: &str) -> FsResult<()> {
        let Node::DeltaDir { entry, name, .. } = self.node(parent)? else {
            return Err(FsError::new(libc::EROFS));
        };
        self.staging.unlink(&self.store, &entry, &name, file)
    }

    pub fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        let Node::Deltas { entry, .. } = self.node(parent)? else {
            return Err(FsError::new(libc::EROFS));
        };
        self.staging.rmdir(&self.store, &entry, name)
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
        let (file, prefetch_from, window, behind) = {
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
                if to > h.dropped_to + CHUNK_SIZE {
                    behind = Some(h.dropped_to..to);
                    h.dropped_to = to;
                }
            } else {
                h.window = 0;
                h.next_offset = end;
                h.dropped_to = offset;
            }
            (file, h.next_offset, h.window, behind)
        };
        if window > 0 {
            read::prefetch(&file, prefetch_from, window, &self.cache);
        }
        if let Some(r) = behind {
            read::drop_behind(&file, r.start, r.end, &self.cache);
        }
        Ok(Ok(file))
    }

    /// Drop a handle; a written file not yet stored (no flush came) is stored now. If it cannot
    /// be, its staged bytes are dropped too: close() already returned the error, and keeping
    /// them would keep a full disk full.
    pub fn release(&self, fh: u64) {
        if let Err(e) = self.flush(fh) {
            tracing::error!(
                "storing a written file failed, dropping its staged bytes: {}",
                e.message.unwrap_or_default()
            );
            if let Some(Handle { target: Target::Staged { base, name, fname, .. }, .. }) =
                self.handles.lock().unwrap_or_else(|e| e.into_inner()).get(&fh)
            {
                self.staging.discard(base, name, fname);
            }
        }
        if let Some(Handle { target: Target::Staged { base, name, fname, writer: true, .. }, .. }) =
            self.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh)
        {
            self.staging.closed(&base, &name, &fname);
        }
    }
}

/// Copy a stored file's bytes into a staging file (rewriting a stored delta file in place).
fn stage_copy(stored: &VFile, to: &std::fs::File) -> Result<(), String> {
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

fn read_staged(file: &std::fs::File, offset: u64, size: u32) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let n = offset.saturating_add(size as u64).min(len).saturating_sub(offset) as usize;
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Every source file a virtual file reads from must still match its fingerprint.
pub fn check_sources(file: &VFile) -> Result<(), variant::ReadError> {
    match &file.content {
        Content::Passthrough(source) => source.check().map(|_| ()),
        Content::Generated(_) => Ok(()),
        Content::Broken(reason) => Err(variant::ReadError::Decode(reason.clone())),
        Content::Synth(synth) => {
            let mut sources = vec![];
            for t in &synth.tensors {
                t.source.files(&mut sources);
            }
            sources.sort_by_key(|s| Arc::as_ptr(s) as usize);
            sources.dedup_by_key(|s| Arc::as_ptr(s) as usize);
            // In parallel: a first open verifies each file's sampled hash (6 MiB read and hashed
            // per file), which for a delta over a sharded base is several files.
            use rayon::prelude::*;
            sources.par_iter().try_for_each(|s| s.check().map(|_| ()))
        }
    }
}

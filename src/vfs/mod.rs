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

pub mod fuse;
pub mod mount;
pub mod read;

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
}

/// An open file: its handle, and for a file whose bytes are a real file's, that file (which the
/// kernel can read directly: FUSE passthrough).
pub struct Opened {
    pub fh: u64,
    pub backing: Option<Arc<variant::SourceFile>>,
}

/// What an inode names. Entries carry their creation time as a generation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Node {
    Root,
    Entry { name: String, created: u64 },
    Deltas { entry: String, created: u64 },
    File { entry: String, created: u64, file: String },
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

struct Catalog {
    registry: Registry,
    /// mtime of registry.json when loaded (None: not there).
    loaded_mtime: Option<SystemTime>,
    views: HashMap<String, (u64, Arc<EntryView>)>,
}

/// An open file: what it reads and how its reader has been moving (for prefetch).
struct Handle {
    ino: u64,
    file: VFile,
    next_offset: u64,
    window: u64,
}

pub struct Fs {
    store: Store,
    catalog: RwLock<Catalog>,
    inodes: RwLock<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    cache: Arc<Cache>,
    mount_time: SystemTime,
}

impl Fs {
    pub fn new(store: Store, cache_size: u64) -> Result<Fs, crate::registry::Error> {
        let registry = store.load()?;
        let loaded_mtime = std::fs::metadata(store.registry_path()).and_then(|m| m.modified()).ok();
        Ok(Fs {
            store,
            catalog: RwLock::new(Catalog { registry, loaded_mtime, views: HashMap::new() }),
            inodes: RwLock::new(Inodes::default()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            cache: Arc::new(Cache::new(cache_size)),
            mount_time: SystemTime::now(),
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Reload the registry if it changed on disk. A corrupt registry keeps the last good one.
    fn refresh(&self) {
        let mtime = std::fs::metadata(self.store.registry_path()).and_then(|m| m.modified()).ok();
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
                catalog.views.retain(|name, (created, _)| registry.entries.get(name).is_some_and(|e| e.created == *created));
                catalog.registry = registry;
                catalog.loaded_mtime = mtime;
            }
            Err(e) => tracing::error!("keeping the last good registry: {e}"),
        }
    }

    fn entry_created(&self, name: &str) -> Option<u64> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner()).registry.entries.get(name).map(|e| e.created)
    }

    /// The view of entry `name` at generation `created`, built on first use.
    fn view(&self, name: &str, created: u64) -> FsResult<Arc<EntryView>> {
        if let Some((c, v)) = self.catalog.read().unwrap_or_else(|e| e.into_inner()).views.get(name) {
            if *c == created {
                return Ok(v.clone());
            }
        }
        let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        if catalog.registry.entries.get(name).map(|e| e.created) != Some(created) {
            return Err(FsError::new(libc::ENOENT));
        }
        let view = Arc::new(variant::build_view(&catalog.registry, name).map_err(|e| FsError::eio(e.to_string()))?);
        for file in &view.files {
            if let Content::Broken(reason) = &file.content {
                tracing::error!(entry = name, file = file.name, "cannot be served: {reason}");
            }
        }
        catalog.views.insert(name.to_owned(), (created, view.clone()));
        Ok(view)
    }

    fn node(&self, ino: u64) -> FsResult<Node> {
        self.inodes.read().unwrap_or_else(|e| e.into_inner()).node(ino).cloned().ok_or(FsError::new(libc::ENOENT))
    }

    fn ino(&self, node: Node) -> u64 {
        self.inodes.write().unwrap_or_else(|e| e.into_inner()).ino(node)
    }

    fn attr_of(&self, ino: u64, node: &Node) -> FsResult<Attr> {
        let secs = |created: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(created);
        Ok(match node {
            Node::Root => Attr { ino, kind: Kind::Dir, size: 0, mtime: self.mount_time, mutable: true },
            Node::Entry { created, .. } => Attr { ino, kind: Kind::Dir, size: 0, mtime: secs(*created), mutable: true },
            Node::Deltas { created, .. } => Attr { ino, kind: Kind::Dir, size: 0, mtime: secs(*created), mutable: true },
            Node::File { entry, created, file } => {
                let view = self.view(entry, *created)?;
                let f = view.file(file).ok_or(FsError::new(libc::ENOENT))?;
                Attr { ino, kind: Kind::File, size: f.size, mtime: secs(*created), mutable: false }
            }
        })
    }

    /// Check that `node` still exists in the current registry.
    fn live(&self, node: &Node) -> bool {
        match node {
            Node::Root => true,
            Node::Entry { name: entry, created } | Node::Deltas { entry, created } | Node::File { entry, created, .. } => {
                self.entry_created(entry) == Some(*created)
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
            Node::Deltas { .. } => return Err(FsError::new(libc::ENOENT)),
            Node::File { .. } => return Err(FsError::new(libc::ENOTDIR)),
        };
        if !self.live(&node) {
            return Err(FsError::new(libc::ENOENT));
        }
        let ino = self.ino(node.clone());
        self.attr_of(ino, &node)
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        if !matches!(node, Node::File { .. }) {
            self.refresh();
        }
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
                    catalog.registry.entries.iter().map(|(n, e)| (n.clone(), e.created)).collect()
                };
                Ok(names
                    .into_iter()
                    .map(|(name, created)| (self.ino(Node::Entry { name: name.clone(), created }), Kind::Dir, name))
                    .collect())
            }
            Node::Entry { name, created } => {
                let view = self.view(&name, created)?;
                let mut out = vec![(self.ino(Node::Deltas { entry: name.clone(), created }), Kind::Dir, DELTAS_DIR.to_owned())];
                for f in &view.files {
                    let node = Node::File { entry: name.clone(), created, file: f.name.clone() };
                    out.push((self.ino(node), Kind::File, f.name.clone()));
                }
                Ok(out)
            }
            Node::Deltas { .. } => Ok(vec![]),
            Node::File { .. } => Err(FsError::new(libc::ENOTDIR)),
        }
    }

    /// Open a file for reading: checks that every file it reads from is unchanged since it was
    /// added, so a changed base gives EIO here rather than wrong bytes later.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<Opened> {
        let Node::File { entry, created, file } = self.node(ino)? else {
            return Err(FsError::new(libc::EISDIR));
        };
        if write {
            return Err(FsError::new(libc::EROFS));
        }
        let view = self.view(&entry, created)?;
        let vfile = view.file(&file).ok_or(FsError::new(libc::ENOENT))?.clone();
        check_sources(&vfile).map_err(|e| FsError::eio(format!("{entry}/{file}: {e}")))?;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let backing = match &vfile.content {
            Content::Passthrough(source) => Some(source.clone()),
            _ => None,
        };
        let handle = Handle { ino, file: vfile, next_offset: 0, window: 0 };
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, handle);
        Ok(Opened { fh, backing })
    }

    /// Read into a buffer of this thread's that is reused across requests, so a read costs
    /// neither an allocation nor zeroing nor page faults; `reply` gets the bytes.
    pub fn read<R>(&self, fh: u64, offset: u64, size: u32, reply: impl FnOnce(FsResult<&[u8]>) -> R) -> R {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (file, ino) = match self.track(fh, offset, size) {
            Ok(x) => x,
            Err(e) => return reply(Err(e)),
        };
        let n = read::read_len(&file, offset, size as u64);
        if let Some(found) = read::within_one_chunk(&file, ino, offset, n, &self.cache) {
            return match found {
                Ok((chunk, range)) => reply(Ok(&chunk[range])),
                Err(e) => reply(Err(e.into())),
            };
        }
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < n {
                buf.resize(n, 0);
            }
            match read::read_into(&file, ino, offset, &mut buf[..n], &self.cache) {
                Ok(()) => reply(Ok(&buf[..n])),
                Err(e) => reply(Err(e.into())),
            }
        })
    }

    /// Note where handle `fh`'s reader is going, prefetch for a sequential one, and return what it
    /// reads.
    fn track(&self, fh: u64, offset: u64, size: u32) -> FsResult<(VFile, u64)> {
        let (file, ino, prefetch_from, window) = {
            let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            let h = handles.get_mut(&fh).ok_or(FsError::new(libc::EBADF))?;
            // Sequential reads grow the read-ahead window (doubling up to MAX_PREFETCH); a seek
            // resets it, as mountpoint-s3's prefetcher does.
            if offset == h.next_offset && offset != 0 {
                h.window = (h.window * 2).clamp(CHUNK_SIZE, MAX_PREFETCH);
            } else {
                h.window = 0;
            }
            h.next_offset = offset + size as u64;
            (h.file.clone(), h.ino, h.next_offset, h.window)
        };
        if window > 0 {
            read::prefetch(&file, ino, prefetch_from, window, &self.cache);
        }
        Ok((file, ino))
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh);
    }
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
            sources.iter().try_for_each(|s| s.check().map(|_| ()))
        }
    }
}

//! One `deltas/NEW/` directory being written: its staged files, each staged file's copy-in
//! from a file of the same name already stored, and the path helpers of the write path.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::delta::stream::Stream;
use crate::delta::{self};
use crate::registry::{self, Store};
use crate::vfs::error::io_fs;
use crate::vfs::FsResult;

/// One `deltas/NEW/` directory being written.
///
/// A staged file lives until its last writer's handle is released, not until its first store:
/// the kernel sends a FLUSH for every close(2) of any descriptor of the file, and a descriptor
/// inherited by a forked child is closed at the child's exec while the parent still writes. Such
/// a FLUSH stores the file as it is then; the writer's own close stores it again, complete.
pub(super) struct Session {
    pub(super) dir: PathBuf,
    /// Staged files by their path in the entry.
    pub(super) names: HashMap<String, u64>,
    /// Staged files by number (a handle names its file by number: renames do not move it).
    pub(super) staged: HashMap<u64, Staged>,
    /// Directories made with mkdir inside the entry (those holding no file exist only here).
    pub(super) dirs: BTreeSet<String>,
    /// The base's tensors for the session's streams, found once, outside the sessions' mutex
    /// (None: not yet, or the base cannot be read now: files are then coded at close, which
    /// reports why, and the next open tries again). See [`Staging::base_tensors`].
    pub(super) base: Arc<Mutex<Option<Arc<delta::make::BaseTensors>>>>,
    /// When it began (see [`Staging::forget_entry`]).
    pub(super) started: std::time::Instant,
}

/// A file being written: its staged bytes and how far they are stored.
pub(super) struct Staged {
    /// Its path in the entry; None once removed or replaced while open (nothing to store).
    pub(super) name: Option<String>,
    pub(super) path: PathBuf,
    pub(super) writers: usize,
    /// Bumped by every write, resize and truncating open.
    pub(super) version: u64,
    /// The version last stored.
    pub(super) stored: Option<u64>,
    /// Runs one store of the file at a time.
    pub(super) storing: Arc<Mutex<()>>,
    /// A write failed: the staged bytes are not what was written, and are never stored.
    pub(super) failed: Option<String>,
    /// Coding as it is written (`delta::stream`).
    pub(super) stream: Option<Arc<Stream>>,
    /// The registry lists it as unfinished.
    pub(super) marked: bool,
    /// A store of it is between its registry change and its save: a write meanwhile lists it
    /// as unfinished again (after that store, which holds the store's lock).
    pub(super) committing: bool,
    /// The copy of the stored bytes into the staged file (rewriting a stored file without
    /// O_TRUNC): every other open waits for it, so its copy never lands on their writes.
    pub(super) fill: Arc<Fill>,
}

/// Where the copy-in of a staged file stands.
#[derive(Default)]
pub(super) struct Fill {
    /// None while the first opener copies; then Ok, or why the copy failed.
    pub(super) done: Mutex<Option<Result<(), String>>>,
    pub(super) ready: Condvar,
}

impl Fill {
    pub(super) fn finished() -> Arc<Fill> {
        Arc::new(Fill { done: Mutex::new(Some(Ok(()))), ready: Condvar::new() })
    }

    pub(super) fn set(&self, result: Result<(), String>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.ready.notify_all();
    }

    /// Wait until the copy-in is over; its result.
    pub(super) fn wait(&self) -> Result<(), String> {
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
    pub(super) fn clean(&self) -> bool {
        self.stored == Some(self.version)
    }
}

/// Numbers staged files and streams' containers, so nothing started anew meets its predecessor.
static NEXT: AtomicU64 = AtomicU64::new(0);

pub(super) fn next_id() -> u64 {
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
pub(in crate::vfs) fn within(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// `path` with its leading `from` replaced by `to` (`path` within `from`).
pub(in crate::vfs) fn moved(path: &str, from: &str, to: &str) -> String {
    format!("{to}{}", &path[from.len()..])
}

impl Session {
    /// A private staging directory `STORE/tmp/write-NAME.PID.SECS` (the sweep reads the PID).
    pub(super) fn new(store: &Store, name: &str) -> FsResult<Session> {
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
    pub(super) fn restart_stream(&mut self, id: u64, base: Option<&Arc<delta::make::BaseTensors>>) {
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
    pub(super) fn orphan(&mut self, name: &str) {
        if let Some(id) = self.names.remove(name) {
            if let Some(s) = self.staged.get_mut(&id) {
                s.name = None;
                s.stream = None;
            }
        }
    }
}

/// Whether the file at `path` holds a safetensors file (a header that parses and fits).
pub(super) fn is_safetensors(path: &Path) -> bool {
    File::open(path).is_ok_and(|f| crate::format::read_header(&f).is_ok())
}

/// Create `path`'s parent directories (private, like the store).
pub(super) fn make_parents(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) => fs::DirBuilder::new().recursive(true).mode(0o700).create(p),
        None => Ok(()),
    }
}

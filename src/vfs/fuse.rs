//! Links fuser's calls to [`Fs`]: translate types, reply, log errors. Nothing else lives here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

use super::{Attr, Fs, FsError, Kind};
use crate::variant::SourceFile;

/// Immutable files: the kernel may keep attributes and names for an hour.
const TTL_IMMUTABLE: Duration = Duration::from_secs(3600);
/// Directories whose listing follows the registry: re-checked every second.
const TTL_MUTABLE: Duration = Duration::from_secs(1);
/// 1 MiB reads and read-ahead: the kernel's default 128 KiB means 8x the requests per byte.
const MAX_IO: u32 = 1 << 20;

pub struct FuseFs {
    fs: Arc<Fs>,
    uid: u32,
    gid: u32,
    passthrough: Passthrough,
}

/// FUSE passthrough (Linux 6.9+, needs CAP_SYS_ADMIN): files whose bytes are a real file's are
/// read by the kernel straight from that file, never through the daemon. The kernel wants one
/// backing id per inode for as long as any handle of it is open, hence the two maps (the
/// pattern of fuser's passthrough example). When the kernel or our privileges do not allow it,
/// `enabled` turns off and those files are read through the daemon like any other.
#[derive(Default)]
struct Passthrough {
    enabled: AtomicBool,
    by_handle: Mutex<HashMap<u64, Arc<BackingId>>>,
    /// The backing id of each inode with open handles, and the file it is for.
    by_inode: Mutex<HashMap<u64, (Weak<BackingId>, std::path::PathBuf)>>,
}

/// Options for [`mount`].
pub struct MountConfig {
    pub allow_other: bool,
    pub threads: usize,
}

/// Mount `fs` at `mountpoint` and serve until unmounted. Returns a session that `run` serves.
pub fn session(
    fs: Arc<Fs>,
    mountpoint: &Path,
    opts: &MountConfig,
) -> std::io::Result<fuser::Session<FuseFs>> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("llmfs".into()),
        MountOption::Subtype("llmfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    fuser::Session::new(FuseFs { fs, uid, gid, passthrough: Passthrough::default() }, mountpoint, &config)
}

/// How long an open waits for the handles of an inode's previous version to be released.
const OLD_VERSION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl FuseFs {
    fn attr(&self, a: &Attr) -> FileAttr {
        let (kind, perm, nlink) = match (a.kind, a.writable) {
            (Kind::Dir, false) => (FileType::Directory, 0o555, 2),
            (Kind::Dir, true) => (FileType::Directory, 0o755, 2),
            (Kind::File, false) => (FileType::RegularFile, 0o444, 1),
            (Kind::File, true) => (FileType::RegularFile, 0o644, 1),
        };
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: MAX_IO,
            flags: 0,
        }
    }
}

impl FuseFs {
    /// The inode's backing id, registering `source`'s file with the kernel if no open handle
    /// holds one. The kernel takes one backing file per inode at a time: while handles of
    /// another file are open on this inode (a delta rewritten through deltas/ while its old
    /// decoded copy is still read), the open is refused with EBUSY rather than served the
    /// other file's bytes. The kernel sends RELEASE after close(2) has returned, so a reader
    /// that closes the old version and opens the new one at once is not refused: the open waits
    /// (at most [`OLD_VERSION_WAIT`]) for the old handles' RELEASEs, which other FUSE threads
    /// serve.
    fn backing_id(
        &self,
        ino: u64,
        source: &SourceFile,
        reply: &ReplyOpen,
    ) -> std::io::Result<Arc<BackingId>> {
        let deadline = std::time::Instant::now() + OLD_VERSION_WAIT;
        let mut by_inode = loop {
            let by_inode = lock(&self.passthrough.by_inode);
            match by_inode.get(&ino).and_then(|(id, path)| Some((id.upgrade()?, path))) {
                Some((id, path)) if *path == source.path => return Ok(id),
                Some(_) if std::time::Instant::now() < deadline => {
                    drop(by_inode);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Some(_) => return Err(std::io::Error::from_raw_os_error(libc::EBUSY)),
                None => break by_inode,
            }
        };
        let file = source.file().map_err(std::io::Error::other)?;
        let id = Arc::new(reply.open_backing(file)?);
        by_inode.insert(ino, (Arc::downgrade(&id), source.path.clone()));
        Ok(id)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ttl(a: &Attr) -> Duration {
    if a.mutable {
        TTL_MUTABLE
    } else {
        TTL_IMMUTABLE
    }
}

/// Log the reason (EIO always, others at debug) and turn an error into fuser's errno.
fn errno(op: &str, e: FsError) -> Errno {
    match (&e.message, e.errno) {
        (Some(m), libc::EIO) => tracing::error!("{op}: {m}"),
        (Some(m), _) => tracing::warn!("{op}: {m}"),
        (None, n) => tracing::debug!("{op}: errno {n}"),
    }
    Errno::from_i32(e.errno)
}

/// Run one request's handler. A panic in it (a bug) fails that request alone: the reply, dropped
/// unsent while unwinding, answers EIO (fuser's `Drop`), the reason goes to the log, and the
/// daemon goes on serving every other request.
fn guard(op: &str, f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        tracing::error!("{op}: {}; the request got EIO", crate::vfs::panic_message(&*panic));
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for 1 MiB; take what the kernel allows when it caps lower.
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        // Stack depth 1: backing files may live on a plain filesystem (or an overlay of one).
        // O_TRUNC arrives with open() (else the kernel truncates through setattr after opening).
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // LLMFS_PASSTHROUGH=0 turns it off (benchmarks compare reads through the daemon).
        let wanted = std::env::var("LLMFS_PASSTHROUGH").map_or(true, |v| v != "0");
        let passthrough = wanted
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.enabled.store(passthrough, Ordering::Relaxed);
        tracing::info!(abi = ?config.kernel_abi(), passthrough, "kernel connection initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guard("lookup", || {
            let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
            match self.fs.lookup(parent.0, name) {
                Ok(a) => reply.entry(&ttl(&a), &self.attr(&a), Generation(0)),
                Err(e) => reply.error(errno("lookup", e)),
            }
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guard("getattr", || match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(&a), &self.attr(&a)),
            Err(e) => reply.error(errno("getattr", e)),
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guard("open", || {
            let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
            let truncate = flags.0 & libc::O_TRUNC != 0;
            let opened = match self.fs.open(ino.0, write, truncate) {
                Ok(o) => o,
                Err(e) => return reply.error(errno("open", e)),
            };
            if let Some(source) = opened.backing.filter(|_| self.passthrough.enabled.load(Ordering::Relaxed))
            {
                match self.backing_id(ino.0, &source, &reply) {
                    Ok(id) => {
                        // Noted before the reply: from the reply on, the reader may close the
                        // file and its RELEASE be served by another thread (a RELEASE that
                        // found nothing to drop would leave this version held for good).
                        lock(&self.passthrough.by_handle).insert(opened.fh, id.clone());
                        reply.opened_passthrough(FileHandle(opened.fh), FopenFlags::empty(), &id);
                        return;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        tracing::warn!("open: another version of inode {} is still open: EBUSY", ino.0);
                        self.fs.release(opened.fh);
                        return reply.error(Errno::EBUSY);
                    }
                    Err(e) => {
                        tracing::info!("FUSE passthrough unavailable, reading through the daemon: {e}");
                        self.passthrough.enabled.store(false, Ordering::Relaxed);
                    }
                }
            }
            // Files that never change while visible: let the page cache keep what it has read.
            let flags = if opened.keep_cache { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
            reply.opened(FileHandle(opened.fh), flags)
        })
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guard("read", || {
            self.fs.read(fh.0, offset, size, |result| match result {
                Ok(data) => reply.data(data),
                Err(e) => reply.error(errno("read", e)),
            })
        })
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guard("release", || {
            self.fs.release(fh.0);
            if lock(&self.passthrough.by_handle).remove(&fh.0).is_some() {
                lock(&self.passthrough.by_inode).retain(|_, (id, _)| id.strong_count() > 0);
            }
            reply.ok();
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guard("flush", || {
            // close(): a file written into deltas/ is stored now, and close() gets the error.
            match self.fs.flush(fh.0) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("flush", e)),
            }
        })
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        guard("fsync", || match self.fs.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", e)),
        })
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        guard("mkdir", || {
            let Some(name) = name.to_str() else { return reply.error(Errno::EINVAL) };
            match self.fs.mkdir(parent.0, name) {
                Ok(a) => reply.entry(&ttl(&a), &self.attr(&a), Generation(0)),
                Err(e) => reply.error(errno("mkdir", e)),
            }
        })
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        guard("create", || {
            let Some(name) = name.to_str() else { return reply.error(Errno::EINVAL) };
            match self.fs.create(parent.0, name) {
                Ok((a, opened)) => reply.created(
                    &ttl(&a),
                    &self.attr(&a),
                    Generation(0),
                    FileHandle(opened.fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno("create", e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guard("write", || match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", e)),
        })
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guard("setattr", || {
            // Only a size change means anything (cp truncates); modes and times are fixed by the
            // registry, and accepting them silently keeps `cp -a` working.
            let result = match size {
                Some(size) => self.fs.set_size(ino.0, size, fh.is_some()),
                None => self.fs.getattr(ino.0),
            };
            match result {
                Ok(a) => reply.attr(&ttl(&a), &self.attr(&a)),
                Err(e) => reply.error(errno("setattr", e)),
            }
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard("unlink", || {
            let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
            match self.fs.unlink(parent.0, name) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("unlink", e)),
            }
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guard("rmdir", || {
            let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
            match self.fs.rmdir(parent.0, name) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rmdir", e)),
            }
        })
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        guard("readdir", || {
            let entries = match self.fs.readdir(ino.0) {
                Ok(e) => e,
                Err(e) => return reply.error(errno("readdir", e)),
            };
            let dots = [(ino.0, Kind::Dir, ".".to_owned()), (ino.0, Kind::Dir, "..".to_owned())];
            for (i, (child, kind, name)) in dots.into_iter().chain(entries).enumerate().skip(offset as usize)
            {
                let kind = if kind == Kind::Dir { FileType::Directory } else { FileType::RegularFile };
                if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                    break;
                }
            }
            reply.ok();
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guard("rename", || {
            let (Some(name), Some(newname)) = (name.to_str(), newname.to_str()) else {
                return reply.error(Errno::EINVAL);
            };
            match self.fs.rename(parent.0, name, newparent.0, newname, flags.bits()) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rename", e)),
            }
        })
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Every registry change is durable when it returns (an fsynced rename): nothing to do.
        reply.ok()
    }

    /// No file of the mount is a terminal or takes an ioctl: ENOTTY, as a regular file answers.
    /// (Python's `open` asks TCGETS of every file it opens, to choose its buffering; fuser's
    /// default answer is ENOSYS with a warning in the log per open.)
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The store's filesystem: where what is written into deltas/ goes (tools that check free
        // space before writing, such as huggingface_hub, see what is there).
        match self.fs.store_statfs() {
            Some(s) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, 255, s.bsize),
            None => reply.statfs(0, 0, 0, 0, 0, MAX_IO, 255, MAX_IO),
        }
    }
}

//! Running the daemon: mount in the foreground, daemonize, find and unmount llmfs mounts.
//!
//! `llmfs mount` without `--foreground` starts itself again with `--foreground` in a new session,
//! its output going to the store's log, and returns once the kernel lists the mount (or fails with
//! the log's last lines when the child dies first). Re-executing rather than forking keeps the
//! daemon free of a forked copy of a threaded process.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fuse::{self, MountConfig};
use super::Fs;
use crate::cache::disk::{DiskCache, Verify};
use crate::registry::Store;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{}: {reason}", path.display())]
    Mountpoint { path: PathBuf, reason: String },
    #[error("the daemon did not come up: {0}")]
    Daemon(String),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Settings of one mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub cache_size: u64,
    pub allow_other: bool,
    pub threads: usize,
    /// Where decoded files are kept (None: no disk cache).
    pub disk_cache: Option<DiskCacheOptions>,
}

/// `--disk-cache DIR --disk-cache-size SIZE --disk-cache-verify full|stat`.
#[derive(Clone, Debug)]
pub struct DiskCacheOptions {
    pub dir: PathBuf,
    /// None: [`DEFAULT_DISK_CACHE_SIZE`], at most half of what the disk has free (counting what
    /// the cache already holds as free).
    pub size: Option<u64>,
    pub verify: Verify,
}

/// The disk cache's size when none is given: room for a few fine-tunes of an 8B model.
pub const DEFAULT_DISK_CACHE_SIZE: u64 = 32 << 30;

/// Open the disk cache of `opts`. A cache that cannot be opened (another daemon holds it, an
/// unwritable directory) is logged and the mount goes on without one.
fn open_disk_cache(opts: &DiskCacheOptions) -> Option<Arc<DiskCache>> {
    let size = opts.size.unwrap_or_else(|| {
        let free = free_bytes(&opts.dir).unwrap_or(0) + dir_bytes(&opts.dir);
        DEFAULT_DISK_CACHE_SIZE.min(free / 2)
    });
    if size == 0 {
        tracing::info!("disk cache off");
        return None;
    }
    match DiskCache::open(&opts.dir, size, opts.verify) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::error!("disk cache off: {e}");
            None
        }
    }
}

/// Free bytes (for an unprivileged user) on the filesystem that holds `dir` or its nearest
/// existing parent.
fn free_bytes(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes of the files directly in `dir` (the disk cache's entries).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf, MountError> {
    let bad = |reason: String| MountError::Mountpoint { path: mountpoint.to_owned(), reason };
    let meta = std::fs::metadata(mountpoint).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    let canonical = mountpoint.canonicalize().map_err(|e| bad(e.to_string()))?;
    if is_mounted(&canonical) {
        return Err(bad("an llmfs mount is already there (llmfs umount it first)".into()));
    }
    Ok(canonical)
}

/// Serve in this process until unmounted or sent SIGINT/SIGTERM/SIGHUP.
pub fn run_foreground(store: Store, mountpoint: &Path, opts: &MountOptions) -> Result<(), MountError> {
    let mountpoint = check_mountpoint(mountpoint)?;
    keep_freed_chunks_in_heap();
    let disk = opts.disk_cache.as_ref().and_then(open_disk_cache);
    // An object store's files are fetched into the disk cache (when there is one).
    let store = match (store.remote().cloned(), &disk) {
        (Some(remote), Some(disk)) => {
            let fetched = crate::registry::objects::Fetched::new(remote, store.tmp_dir());
            let cached = crate::cache::objects::CachedObjects::new(fetched, disk.clone());
            store.with_objects(crate::source::Objects(Arc::new(cached)))
        }
        _ => store,
    };
    let fs = Arc::new(Fs::new(store, opts.cache_size)?);
    if let Some(disk) = &disk {
        fs.set_disk_cache(disk.clone());
    }
    // Block the signals in this thread before any other starts, so every thread inherits the
    // mask and only the waiter below receives them.
    let signals = block_signals();
    // A panic escaping any task on the rayon pool (the read path's prefetch catches its own;
    // the write path's coding tasks run there too) is logged, not the end of the daemon (rayon's
    // default aborts the process). Threads start here, after the signal mask is set.
    let pool = rayon::ThreadPoolBuilder::new()
        .panic_handler(|panic| tracing::error!("a task on the rayon pool: {}", super::panic_message(&*panic)))
        .build_global();
    if let Err(e) = pool {
        tracing::info!("rayon pool already set up, its panic handler unchanged: {e}");
    }
    let mut session = fuse::session(
        fs.clone(),
        &mountpoint,
        &MountConfig { allow_other: opts.allow_other, threads: opts.threads },
    )?;
    raise_readahead(&mountpoint);
    // Invalidations go out from their own thread: sent from inside a request on the root (a
    // lookup that reloaded the registry) they could wait on the very lock that request holds.
    let notifier = session.notifier();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for name in rx {
            let _ = notifier.inval_entry(fuser::INodeNo(super::ROOT_INO), std::ffi::OsStr::new(&name));
        }
    });
    let tx = std::sync::Mutex::new(tx);
    fs.on_forget_name(move |name| {
        let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(name.to_owned());
    });
    let mut unmounter = session.unmount_callable();
    let mp = mountpoint.clone();
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait reads the set we built and writes one int.
        unsafe { libc::sigwait(&signals, &mut sig) };
        tracing::info!(signal = sig, "unmounting {}", mp.display());
        if let Err(e) = unmounter.unmount() {
            tracing::error!("unmount failed: {e}");
        }
    });
    tracing::info!(mountpoint = %mountpoint.display(), cache_size = opts.cache_size, threads = opts.threads, "serving");
    session.run()?;
    if let Some(disk) = &disk {
        // What was decoded is committed before the daemon goes, so the next mount finds it.
        disk.flush();
    }
    tracing::info!("unmounted");
    Ok(())
}

/// The kernel sizes a FUSE mount's buffered reads by its backing device's read-ahead (128 KiB by
/// default), whatever max_readahead the daemon offers. Raising it to 1 MiB makes each request 8x
/// larger, for 8x fewer round trips per byte. Needs root; without it reads stay at 128 KiB.
fn raise_readahead(mountpoint: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mp = mountpoint.to_string_lossy();
    let Some(dev) = info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && unescape_mountinfo(f[4]) == mp).then(|| f[2].to_owned())
    }) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, "1024") {
        Ok(()) => tracing::info!("read-ahead raised to 1 MiB ({knob})"),
        Err(e) => tracing::info!("read-ahead left at the kernel's default ({knob}: {e})"),
    }
}

/// Decoded chunks are 2 MiB: above glibc's default mmap threshold, each would be a fresh mapping
/// whose pages fault in (and get zeroed by the kernel) on every decode. Serving them from the heap,
/// and not trimming it eagerly, lets a chunk reuse the memory of one just evicted. The heap stays
/// about the cache's size, which the cache budget already accounts for.
fn keep_freed_chunks_in_heap() {
    // SAFETY: mallopt only sets allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        // One arena: a chunk freed by one thread (eviction) is reused by another (a decode);
        // with per-thread arenas each would hoard its own free chunks.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Start the daemon (this binary with `--foreground`) and wait until the mount is live.
pub fn spawn_daemon(store: &Store, mountpoint: &Path, args: &[String]) -> Result<(), MountError> {
    let mountpoint = check_mountpoint(mountpoint)?;
    let log_path = store.log_path();
    let log = OpenOptions::new().create(true).append(true).mode(0o600).open(&log_path)?;
    let start = log.metadata()?.len();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal and session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if is_mounted(&mountpoint) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(MountError::Daemon(format!(
                "it exited with {status}: {}",
                log_tail(&log_path, start)
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(MountError::Daemon(format!("no mount after 60 s: {}", log_tail(&log_path, start))));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Mount points of llmfs filesystems, from /proc/self/mountinfo.
pub fn llmfs_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return vec![] };
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut fields = right.split(' ');
            let (fstype, source) = (fields.next()?, fields.next()?);
            let mp = left.split(' ').nth(4)?;
            // Mounted by root the type is plain `fuse` (the subtype is lost), by fusermount
            // `fuse.llmfs`; the source is our FSName either way.
            let ours = fstype == "fuse.llmfs" || (fstype.starts_with("fuse") && source == "llmfs");
            ours.then(|| PathBuf::from(unescape_mountinfo(mp)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(mountpoint: &Path) -> bool {
    llmfs_mounts().iter().any(|m| m == mountpoint)
}

/// Unmount an llmfs mount, also a stale one whose daemon died.
pub fn unmount(mountpoint: &Path) -> Result<(), MountError> {
    // A dead daemon's mount point cannot be stat'ed (ENOTCONN), so canonicalize its parent.
    let canonical = match mountpoint.canonicalize() {
        Ok(p) => p,
        Err(_) => {
            let parent = mountpoint.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            parent.canonicalize()?.join(mountpoint.file_name().unwrap_or_default())
        }
    };
    if !is_mounted(&canonical) {
        return Err(MountError::Mountpoint {
            path: mountpoint.to_owned(),
            reason: "no llmfs mount there".into(),
        });
    }
    let c_path = std::ffi::CString::new(canonical.as_os_str().as_encoded_bytes()).map_err(|_| {
        MountError::Mountpoint { path: canonical.clone(), reason: "path contains NUL".into() }
    })?;
    // SAFETY: umount2 reads a NUL-terminated path.
    let ok = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } == 0;
    if !ok {
        // Not root: fusermount is setuid and unmounts the user's own FUSE mounts.
        let status = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&canonical)
            .status()
            .or_else(|_| Command::new("fusermount").args(["-u", "-z"]).arg(&canonical).status())?;
        if !status.success() {
            return Err(MountError::Mountpoint {
                path: canonical,
                reason: format!("fusermount failed ({status})"),
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(&canonical) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape_mountinfo(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(super::unescape_mountinfo(r"/x\04"), r"/x\04");
    }
}

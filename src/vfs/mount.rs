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
use crate::cache::disk::{DiskCache, DiskCacheError, Verify};
use crate::registry::Store;

mod holders;
pub mod status;
pub use holders::Holder;
pub use status::{DiskCacheState, MountStatus};

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
    /// Bytes of decoded files kept in memory, in front of the disk cache (None: the default,
    /// [`default_memory_cache_size`]; 0: none).
    pub memory_cache_size: Option<u64>,
    /// Entries to decode once mounted (foreground: from the daemon, through the mount).
    pub warm: Vec<String>,
}

/// The memory tier's size when none is given: none. Measured on the lent 16-core host
/// (6000 MiB model, first loads, 16 GiB tier against none, the same call): an f16 cast 2.3
/// against 6.0 GB/s and a lossless delta 2.4 against 5.0 when the disk tier was filled by
/// `pwrite` (scripts/bench_load_results.md), and again with the disk tier filled through
/// mappings (session 16, `16core-session16-memtier.txt`): f16 2.5-2.8 against 9.7-10.2, q8
/// 2.4-2.6 against 10.4-10.7, LoRA 2.1-2.6 against 6.0-6.9. The memfd is served by passthrough
/// as a cache file is (checked on 2 cores: both copy out at the same rate); what costs is the
/// memory fill itself and the second write of every file, to disk, behind the reader. On 2
/// cores it is slower too. So it stays an option (`--memory-cache-size`) until it measures
/// faster.
pub fn default_memory_cache_size() -> u64 {
    0
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

/// How long a new daemon waits for a disk cache held by a daemon that is going away (its mount
/// already gone: committing what it decoded) or by `llmfs warm`.
const WAIT_FOR_CACHE: Duration = Duration::from_secs(30);

/// What a daemon writes into its disk cache's lock file: `llmfs pid PID, the mount at PATH`.
fn holder_note(mountpoint: &Path) -> String {
    format!("llmfs pid {}, the mount at {}", std::process::id(), mountpoint.display())
}

/// The mount point a lock holder's note names, if it is a mount still serving.
pub fn serving_holder(holder: &str) -> Option<PathBuf> {
    holder_is_serving(holder)
        .then(|| PathBuf::from(holder.split_once(", the mount at ").map(|(_, mp)| mp).unwrap_or_default()))
}

/// Whether the holder a locked cache names ([`holder_note`]) is a mount still serving: then
/// waiting is pointless. A holder that is not (unmounted and committing, `llmfs warm`, or a note
/// we cannot read) is waited for.
fn holder_is_serving(holder: &str) -> bool {
    let Some((pid, mp)) = holder.strip_prefix("llmfs pid ").and_then(|r| r.split_once(", the mount at "))
    else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = pid.parse::<libc::pid_t>().is_ok_and(|p| unsafe { libc::kill(p, 0) } == 0);
    alive && is_mounted(Path::new(mp))
}

/// Open the disk cache of `opts`, noting `note` as its holder (see [`DiskCache::set_holder`]). A cache held by a daemon that
/// is going away is waited for (at most [`WAIT_FOR_CACHE`]); one that cannot be had (another
/// mount serves from it, an unwritable directory) leaves the mount without one, which the
/// returned state says (for the terminal and the mount's status).
pub fn open_disk_cache(opts: &DiskCacheOptions, note: &str) -> (Option<Arc<DiskCache>>, DiskCacheState) {
    let size = opts.size.unwrap_or_else(|| {
        let free = free_bytes(&opts.dir).unwrap_or(0) + dir_bytes(&opts.dir);
        DEFAULT_DISK_CACHE_SIZE.min(free / 2)
    });
    if size == 0 {
        tracing::info!("disk cache off");
        return (None, DiskCacheState::Off);
    }
    let start = Instant::now();
    let mut said = false;
    loop {
        match DiskCache::open(&opts.dir, size, opts.verify) {
            Ok(c) => {
                c.set_holder(note);
                // Held now: the base files this node checked are kept beside the entries.
                crate::source::checked::keep_in(&opts.dir);
                if said {
                    tracing::info!("disk cache free after {:.1} s", start.elapsed().as_secs_f64());
                }
                return (Some(Arc::new(c)), DiskCacheState::On { dir: opts.dir.clone(), capacity: size });
            }
            Err(DiskCacheError::Locked { holder, .. })
                if !holder_is_serving(&holder) && start.elapsed() < WAIT_FOR_CACHE =>
            {
                if !said {
                    tracing::info!("disk cache {}: waiting for {holder} to let go of it", opts.dir.display());
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::error!("disk cache off: {e}");
                return (None, DiskCacheState::Unusable { dir: opts.dir.clone(), reason: e.to_string() });
            }
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
    let (disk, cache_state) = match &opts.disk_cache {
        Some(o) => open_disk_cache(o, &holder_note(&mountpoint)),
        None => (None, DiskCacheState::Off),
    };
    let status = MountStatus {
        pid: std::process::id(),
        mountpoint: mountpoint.clone(),
        store: store.location(),
        disk_cache: cache_state,
    };
    if let Some(line) = status.warning() {
        // The terminal of a foreground mount (a daemon's stderr is its log; `mount` repeats it).
        eprintln!("llmfs: {line}");
    }
    // Published before the mount shows up: `mount` reads it as soon as it does.
    let published = status::publish(&status);
    // An object store's files are fetched into the disk cache (when there is one).
    let store = match (store.node().fetcher(), &disk) {
        (Some(fetched), Some(disk)) => {
            let cached = crate::cache::objects::CachedObjects::new(fetched, disk.clone());
            store.with_objects(crate::store::Objects(Arc::new(cached)))
        }
        _ => store,
    };
    let fs = Arc::new(Fs::new(store, opts.cache_size)?);
    if let Some(disk) = &disk {
        fs.set_disk_cache(disk.clone());
    }
    // In front of the disk cache only: a file decoded into memory is written there behind the
    // reader, and evicted from memory once it is. Without one (`--disk-cache 0`), variant files
    // decode on the read path, as they always did.
    let memory_size = opts.memory_cache_size.unwrap_or_else(default_memory_cache_size);
    let memory = (memory_size > 0 && disk.is_some())
        .then(|| Arc::new(crate::cache::memory::MemoryCache::new(memory_size)));
    if let Some(memory) = &memory {
        tracing::info!(capacity = memory_size, "memory cache of decoded files");
        fs.set_memory_cache(memory.clone());
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
    if !opts.warm.is_empty() {
        let (mp, names) = (mountpoint.clone(), opts.warm.clone());
        std::thread::spawn(move || {
            let failed = match weight_files(&mp, &names) {
                Ok(files) => open_weights(&files, &|_| {}),
                Err(name) => vec![format!("{name}: no such entry")],
            };
            if failed.is_empty() {
                tracing::info!("warmed {}", names.join(", "));
            } else {
                tracing::error!("warming {}: {}", names.join(", "), failed.join("; "));
            }
        });
    }
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
    let served = session.run();
    if let Some(memory) = memory {
        // Every file decoded into memory is written to the disk cache first.
        memory.flush();
    }
    if let Some(disk) = &disk {
        // What was decoded is committed before the daemon goes, so the next mount finds it.
        disk.flush();
    }
    // Let go of the disk cache (its flock), then of the status file, whose release `umount`
    // waits for. Where something still holds the cache, both go at exit, the cache's lock
    // first (it was opened first, and exit closes descriptors in order).
    drop(fs);
    let released = disk.is_none_or(|d| Arc::try_unwrap(d).is_ok());
    if released {
        drop(published);
    } else {
        std::mem::forget(published);
    }
    served?;
    tracing::info!("unmounted");
    Ok(())
}

/// The weight files (`*.safetensors`) of entries `names` under a mount, with their sizes; the
/// name of an entry the mount does not have.
pub fn weight_files(mountpoint: &Path, names: &[String]) -> Result<Vec<(PathBuf, u64)>, String> {
    let mut files = vec![];
    for name in names {
        let rd = std::fs::read_dir(mountpoint.join(name)).map_err(|_| name.clone())?;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                files.push((p, e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    Ok(files)
}

/// Open (and close) `files` of a mount, all at once: each open returns once its file is decoded
/// into the cache (`mount --warm`, `warm` through a mount). `done` is told each file's size as
/// its open returns; the files that failed, with why.
pub fn open_weights(files: &[(PathBuf, u64)], done: &(dyn Fn(u64) + Sync)) -> Vec<String> {
    let failed = std::sync::Mutex::new(vec![]);
    std::thread::scope(|scope| {
        for (path, len) in files {
            let failed = &failed;
            scope.spawn(move || match std::fs::File::open(path) {
                Ok(_) => done(*len),
                Err(e) => {
                    failed.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{}: {e}", path.display()))
                }
            });
        }
    });
    failed.into_inner().unwrap_or_else(|e| e.into_inner())
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

/// Start the daemon (this binary with `--foreground`) and wait until the mount is live; its
/// status (None where it could publish none), whose [`MountStatus::warning`] the caller shows.
pub fn spawn_daemon(
    store: &Store,
    mountpoint: &Path,
    args: &[String],
) -> Result<Option<MountStatus>, MountError> {
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
            return Ok(status::read(&mountpoint).map(|(s, _)| s));
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

/// How long `umount` waits for the daemon to end after the mount is gone: it commits what it
/// decoded (an fsync of each file decoded in its last seconds) and lets go of the disk cache.
const WAIT_FOR_DAEMON: Duration = Duration::from_secs(120);

/// How long `umount` waits in silence for the daemon to end before it says what it waits for.
const QUIET_WAIT: Duration = Duration::from_secs(1);

/// What [`unmount`] saw.
pub struct Unmounted {
    /// The daemon is still running after [`WAIT_FOR_DAEMON`] (files still open on a lazily
    /// unmounted mount): its disk cache is not free yet.
    pub daemon_still_running: Option<u32>,
    /// The processes that held files on the mount when it was detached and still run.
    pub holders: Vec<Holder>,
}

/// Unmount an llmfs mount, also a stale one whose daemon died, and wait (bounded) until its
/// daemon has ended, so that its disk cache is free for the next mount. The mount is detached at
/// once (new opens fail); the daemon ends when the files still open on it are closed. If it has
/// not ended after [`QUIET_WAIT`], `waiting(pid, holders)` is called once, with the processes
/// that held files on the mount and still run (empty: it is committing its decoded files).
pub fn unmount(mountpoint: &Path, waiting: impl FnOnce(u32, &[Holder])) -> Result<Unmounted, MountError> {
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
    // Its status file, held open: its lock is released when the daemon ends.
    let daemon = status::read(&canonical);
    // Before the detach, while /proc still names the mount point in their paths.
    let mut holders = if daemon.is_some() { holders::holders(&canonical) } else { Vec::new() };
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
    let daemon_still_running = match daemon {
        Some((_, file)) if status::wait_for_exit(&file, QUIET_WAIT) => None,
        Some((st, file)) => {
            holders.retain(|h| holders::alive(h.pid));
            waiting(st.pid, &holders);
            (!status::wait_for_exit(&file, WAIT_FOR_DAEMON)).then_some(st.pid)
        }
        None => None,
    };
    holders.retain(|h| holders::alive(h.pid));
    Ok(Unmounted { daemon_still_running, holders })
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape_mountinfo(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(super::unescape_mountinfo(r"/x\04"), r"/x\04");
    }
}

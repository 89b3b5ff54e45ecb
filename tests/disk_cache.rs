//! The disk cache of decoded files (`llmfs mount --disk-cache DIR --disk-cache-size SIZE`), on
//! real mounts: a variant file is decoded once into the cache and read from there (FUSE
//! passthrough, or the daemon's pread) with the same bytes as `llmfs export`; the cache stays
//! within its size, survives a remount, re-decodes a damaged or half-written file instead of
//! serving it, decodes a file once however many open it at once; a changed base gives EIO, not
//! cached bytes; a base edited in place while a variant is open is caught on the read path.
//!
//! Same fixtures as tests/mount.rs: a store with a generated model and casts, mounts owned by
//! guards with watchdogs, blocking file operations under deadlines.

mod common;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{assert_same_bytes, daemon_pids, with_deadline, DaemonGuard, MountGuard, TestStore};
use llmfs::demo::ModelSpec;
use llmfs::format::Dtype;

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const OP: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Two bf16 shards of ~4.7 MB (tests/mount.rs's model): the f32 cast's are ~9.4 MB.
fn spec() -> ModelSpec {
    ModelSpec {
        hidden: 256,
        intermediate: 688,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        vocab: 3000,
        dtype: Dtype::BF16,
        shards: 2,
        seed: 23,
    }
}

struct Fixture {
    ts: TestStore,
    model: PathBuf,
    cache: PathBuf,
    mounts: std::cell::Cell<usize>,
}

impl Fixture {
    /// `base` (the model, in place), `f16` and `f32` casts, and a lossless delta `ft` of a
    /// fine-tune of it.
    fn new(spec: &ModelSpec) -> Fixture {
        let ts = TestStore::new();
        let model = ts.path("model");
        common::write_model(&model, spec);
        let cache = ts.path("cache");
        let fx = Fixture { ts, model, cache, mounts: Default::default() };
        fx.ok(&["add", "base", fx.model.to_str().unwrap()]);
        fx.ok(&["cast", "f16", "--base", "base", "--dtype", "f16"]);
        fx.ok(&["cast", "f32", "--base", "base", "--dtype", "f32"]);
        let ft = fx.ts.path("ft");
        llmfs::demo::write_finetune(&fx.model, &ft, 0.01, 5).unwrap();
        fx.ok(&["delta", "make", "ft", "--base", "base", "--target", ft.to_str().unwrap()]);
        fx
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ts.ok(args)
    }

    fn root(&self) -> PathBuf {
        self.ts.tmp.path().canonicalize().unwrap()
    }

    fn export(&self, name: &str) -> PathBuf {
        let out = self.root().join("export").join(name);
        if !out.exists() {
            self.ok(&["export", name, out.to_str().unwrap()]);
        }
        out
    }

    /// A fresh foreground mount with the fixture's disk cache (and `extra` arguments).
    fn mount(&self, extra: &[&str]) -> MountGuard {
        let n = self.mounts.get();
        self.mounts.set(n + 1);
        let mut args = vec![];
        if !extra.contains(&"--disk-cache") {
            args.extend(["--disk-cache", self.cache.to_str().unwrap()]);
        }
        args.extend(extra);
        MountGuard::new(&self.ts, &self.root().join(format!("mnt{n}")), &args)
    }

    /// The cache's committed data files whose label (in the sidecar) is `label`.
    fn cached_files(&self, label: &str) -> Vec<PathBuf> {
        let mut out = vec![];
        for e in fs::read_dir(&self.cache).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "meta") {
                let meta: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
                if meta["label"] == label {
                    out.push(p.with_extension(""));
                }
            }
        }
        out
    }

    /// Bytes of every file in the cache directory (entries, sidecars, fills in progress).
    fn cache_bytes(&self) -> u64 {
        let mut n = 0;
        for dir in [self.cache.clone(), self.cache.join("tmp")] {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        n += m.len();
                    }
                }
            }
        }
        n
    }
}

fn read(path: &Path) -> Vec<u8> {
    let p = path.to_owned();
    with_deadline(&format!("reading {}", path.display()), OP, move || fs::read(&p))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn try_read(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_owned();
    with_deadline(&format!("reading {}", path.display()), OP, move || fs::read(&p))
}

/// How many times the daemon logged decoding `label` (into memory or the disk cache).
fn decodes(m: &MountGuard, label: &str) -> usize {
    decodes_in(&m.log_text(), label)
}

fn decodes_in(log: &str, label: &str) -> usize {
    log.lines()
        .filter(|l| {
            (l.contains("disk cache: decoded") || l.contains("memory cache: decoded"))
                && l.contains(&format!(" {label} "))
        })
        .count()
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// Wait until the cache has committed `label` (commits run in the background).
fn wait_committed(fx: &Fixture, label: &str) {
    let start = Instant::now();
    while fx.cached_files(label).is_empty() {
        assert!(start.elapsed() < OP, "{label} was never committed to the disk cache");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn decoded_once_and_read_from_the_cache_after_a_remount() {
    let fx = Fixture::new(&spec());
    let want: Vec<(String, Vec<u8>)> = ["f16", "f32", "ft"]
        .iter()
        .flat_map(|n| [SHARD1, SHARD2].map(|s| (format!("{n}/{s}"), fs::read(fx.export(n).join(s)).unwrap())))
        .collect();
    {
        let m = fx.mount(&[]);
        for (label, bytes) in &want {
            assert_same_bytes(&read(&m.path().join(label)), bytes, &format!("{label}, first mount"));
            // Read again, through a new descriptor: still one decode.
            assert_same_bytes(&read(&m.path().join(label)), bytes, &format!("{label}, again"));
        }
        for (label, _) in &want {
            assert_eq!(decodes(&m, label), 1, "{label} decoded other than once:\n{}", m.log_text());
        }
    }
    for (label, _) in &want {
        assert_eq!(fx.cached_files(label).len(), 1, "{label} is not in the cache after unmounting");
    }
    // A remount (a new daemon) reads every file from the cache, decoding nothing.
    let m = fx.mount(&[]);
    for (label, bytes) in &want {
        assert_same_bytes(&read(&m.path().join(label)), bytes, &format!("{label}, after a remount"));
        assert_eq!(decodes(&m, label), 0, "{label} was decoded again after a remount:\n{}", m.log_text());
    }
}

#[test]
fn the_cache_stays_within_its_size_evicting_least_recently_used() {
    let fx = Fixture::new(&spec());
    let size = 24 * MIB; // two f32 shards (9.4 MB each) fit, three do not
    let files: Vec<String> =
        ["f32", "f16", "ft"].iter().flat_map(|n| [SHARD1, SHARD2].map(|s| format!("{n}/{s}"))).collect();
    // The disk tier alone (the memory tier would serve the second round from memory).
    let m = fx.mount(&["--disk-cache-size", "24MiB", "--memory-cache-size", "0"]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Watch the directory the whole time: never over the size, fills in progress included.
    let watcher = {
        let (dir, stop) = (fx.cache.clone(), stop.clone());
        std::thread::spawn(move || {
            let fx_like = |d: &Path| -> u64 {
                [d.to_owned(), d.join("tmp")]
                    .iter()
                    .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            };
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(fx_like(&dir));
                std::thread::sleep(Duration::from_millis(1));
            }
            peak
        })
    };
    for round in 0..2 {
        for f in &files {
            let want =
                fs::read(fx.export(f.split('/').next().unwrap()).join(f.split('/').nth(1).unwrap())).unwrap();
            assert_same_bytes(&read(&m.path().join(f)), &want, &format!("{f}, round {round}"));
            let n = fx.cache_bytes();
            if n > size {
                let list: Vec<String> = [fx.cache.clone(), fx.cache.join("tmp")]
                    .iter()
                    .flat_map(|d| fs::read_dir(d).unwrap().flatten())
                    .map(|e| format!("{} {}", e.path().display(), e.metadata().unwrap().len()))
                    .collect();
                panic!("the cache holds {n} bytes > {size}:\n{}", list.join("\n"));
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = watcher.join().unwrap();
    assert!(peak <= size, "the cache directory reached {peak} bytes, over its {size}");
    assert!(m.log_text().contains("disk cache: evicting"), "nothing was evicted:\n{}", m.log_text());
    // Evicted files were decoded again in the second round: more decodes than files.
    let total: usize = files.iter().map(|f| decodes(&m, f)).sum();
    assert!(total > files.len(), "{total} decodes of {} files: no eviction took effect", files.len());
}

#[test]
fn a_truncated_or_changed_cache_file_is_decoded_again_never_served() {
    let fx = Fixture::new(&spec());
    let label = format!("ft/{SHARD1}");
    let want = fs::read(fx.export("ft").join(SHARD1)).unwrap();
    {
        let m = fx.mount(&[]);
        assert_same_bytes(&read(&m.path().join(&label)), &want, "first read");
    }
    for damage in ["flip", "truncate", "flip-stat"] {
        let [data] = &fx.cached_files(&label)[..] else { panic!("{label}: not one cache file") };
        let f = fs::OpenOptions::new().write(true).open(data).unwrap();
        match damage {
            "truncate" => f.set_len(want.len() as u64 / 2).unwrap(),
            _ => f.write_all_at(&[!want[want.len() - 100]], want.len() as u64 - 100).unwrap(),
        }
        drop(f);
        let extra: &[&str] = match damage {
            "flip" => &["--disk-cache-verify", "full"],
            "flip-stat" => &["--disk-cache-verify", "stat"],
            _ => &[],
        };
        let m = fx.mount(extra);
        assert_same_bytes(
            &read(&m.path().join(&label)),
            &want,
            &format!("after a {damage} of the cache file"),
        );
        assert_eq!(decodes(&m, &label), 1, "{damage}: not decoded again:\n{}", m.log_text());
        drop(m);
        wait_committed(&fx, &label);
    }
}

#[test]
fn two_readers_opening_at_once_decode_once() {
    let fx = Fixture::new(&spec());
    let label = format!("ft/{SHARD2}");
    let want = Arc::new(fs::read(fx.export("ft").join(SHARD2)).unwrap());
    let m = fx.mount(&[]);
    let barrier = Arc::new(Barrier::new(4));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (path, barrier) = (m.path().join(&label), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                fs::read(path)
            })
        })
        .collect();
    for r in readers {
        assert_same_bytes(&r.join().unwrap().unwrap(), &want, "a concurrent reader");
    }
    assert_eq!(decodes(&m, &label), 1, "decoded other than once:\n{}", m.log_text());
}

#[test]
fn a_base_changed_after_caching_gives_eio_not_cached_bytes() {
    if common::skip_on_s3(
        "add uploads the base to the bucket: changing its source changes nothing llmfs reads",
    ) {
        return;
    }
    let fx = Fixture::new(&spec());
    let shard2 = fx.model.join(SHARD2);
    let want = fs::read(fx.export("f16").join(SHARD2)).unwrap();
    {
        let m = fx.mount(&[]);
        assert_same_bytes(&read(&m.path().join("f16").join(SHARD2)), &want, "f16 cached");
    }
    wait_committed(&fx, &format!("f16/{SHARD2}"));
    // Rewritten in place with its size and mtime kept: only the ctime and the sampled hash
    // (its header and first 4 MiB are hashed whole) say so.
    let meta = fs::metadata(&shard2).unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(&shard2).unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, meta.len() / 2).unwrap();
    f.write_all_at(&[byte[0] ^ 0x11], meta.len() / 2).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(meta.modified().unwrap())).unwrap();
    drop(f);
    let m = fx.mount(&[]);
    for name in ["f16", "ft"] {
        assert_eq!(errno_of(try_read(&m.path().join(name).join(SHARD2))), Some(libc::EIO), "{name}/{SHARD2}");
    }
    assert!(m.wait_log_line(&[SHARD2, "changed"], Duration::from_secs(5)).is_some(), "{}", m.log_text());
    // The other shard still reads from the cache.
    assert_same_bytes(
        &read(&m.path().join("f16").join(SHARD1)),
        &fs::read(fx.export("f16").join(SHARD1)).unwrap(),
        "f16 shard 1",
    );
}

/// Bytes the process `pid` has read by read(2) and pread(2) so far.
fn read_chars(pid: libc::pid_t) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let line = io.lines().find(|l| l.starts_with("rchar:")).unwrap();
    line["rchar:".len()..].trim().parse().unwrap()
}

/// A remount trusts the base files the previous daemon checked (their sampled hash: 6 MiB read
/// each) while their stat is what it was then, and checks again one whose ctime moved (a chmod
/// here; a write in place is the test above). Opening both shards of the cast reads less than
/// 2 MiB in the daemon when trusted, 12 MiB or more when checked.
#[test]
fn a_remount_trusts_the_base_files_checked_before_with_the_same_stat() {
    if common::skip_on_s3("an object-store file is checked by its etag, not by a sampled hash") {
        return;
    }
    let fx = Fixture::new(&spec());
    {
        let m = fx.mount(&[]);
        for shard in [SHARD1, SHARD2] {
            read(&m.path().join("f16").join(shard));
        }
    }
    for shard in [SHARD1, SHARD2] {
        wait_committed(&fx, &format!("f16/{shard}"));
    }
    let read_by_opens = |m: &MountGuard| {
        let pid = m.pid().expect("the daemon's pid");
        let before = read_chars(pid);
        for shard in [SHARD1, SHARD2] {
            drop(File::open(m.path().join("f16").join(shard)).unwrap());
        }
        read_chars(pid) - before
    };
    let trusted = read_by_opens(&fx.mount(&[]));
    assert!(trusted < 2 * MIB, "the daemon read {trusted} bytes to open two cached shards");
    for shard in [SHARD1, SHARD2] {
        // A chmod to its own mode: only the ctime moves.
        let p = fx.model.join(shard);
        fs::set_permissions(&p, fs::metadata(&p).unwrap().permissions()).unwrap();
    }
    let m = fx.mount(&[]);
    let checked = read_by_opens(&m);
    assert!(checked >= 12 * MIB, "the daemon read {checked} bytes: it did not check the chmodded shards");
    assert_same_bytes(
        &read(&m.path().join("f16").join(SHARD1)),
        &fs::read(fx.export("f16").join(SHARD1)).unwrap(),
        "f16 shard 1 after the chmod",
    );
}

/// A variant file being read through the daemon (no disk cache) while its base is edited in
/// place, beyond the fingerprint's whole-hashed first 4 MiB and with the mtime put back: the
/// next read that reaches the daemon fails with EIO, and so does the next open, even with the
/// disk cache (issue 12).
#[test]
fn a_base_edited_in_place_while_open_is_caught() {
    if common::skip_on_s3(
        "add uploads the base to the bucket: changing its source changes nothing llmfs reads",
    ) {
        return;
    }
    let big = ModelSpec { vocab: 12000, ..spec() }; // shard 1 ~ 9 MB
    let fx = Fixture::new(&big);
    let shard1 = fx.model.join(SHARD1);
    let len = fs::metadata(&shard1).unwrap().len();
    assert!(len > 6 * MIB, "shard 1 is {len} bytes");
    let want = fs::read(fx.export("f16").join(SHARD1)).unwrap();
    let uncached = fx.mount(&["--disk-cache", "0", "--cache-size", "4MiB"]);
    let cached = fx.mount(&[]);
    let open = |m: &MountGuard| File::open(m.path().join("f16").join(SHARD1)).unwrap();
    let (a, b) = (open(&uncached), open(&cached));
    let mut buf = vec![0u8; MIB as usize];
    a.read_exact_at(&mut buf, 0).unwrap();
    assert_same_bytes(&buf, &want[..MIB as usize], "before the edit");
    // Edit 6 MiB in: outside the whole-hashed head; keep the mtime.
    let meta = fs::metadata(&shard1).unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(&shard1).unwrap();
    f.write_all_at(&[0xAB; 64], 6 * MIB).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(meta.modified().unwrap())).unwrap();
    drop(f);
    // SAFETY: fadvise on an open fd: drop its cached pages so the read reaches the daemon.
    unsafe { libc::posix_fadvise(a.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let r = a.read_exact_at(&mut buf, (want.len() as u64 / 2).next_multiple_of(MIB));
    assert_eq!(errno_of(r), Some(libc::EIO), "a read through the daemon after the base was edited");
    // The disk cache's open handle keeps the variant's bytes as registered (decoded before the
    // edit); a new open in either mount is refused.
    b.read_exact_at(&mut buf, 0).unwrap();
    assert_same_bytes(&buf, &want[..MIB as usize], "the cached copy, already open");
    for m in [&uncached, &cached] {
        let r = File::open(m.path().join("f16").join(SHARD1));
        assert_eq!(errno_of(r), Some(libc::EIO), "a new open after the base was edited");
    }
}

/// kill -9 of the daemon while it fills the cache: nothing half-written is ever served; the
/// next mount decodes the file again and reads it right.
#[test]
fn kill_9_during_a_fill_leaves_nothing_served_wrong() {
    // f32 shards of ~50 MB: a fill long enough to be caught in the middle.
    let big = ModelSpec { hidden: 512, intermediate: 1376, layers: 6, vocab: 16000, ..spec() };
    let fx = Fixture::new(&big);
    let label = format!("f32/{SHARD1}");
    let want = fs::read(fx.export("f32").join(SHARD1)).unwrap();
    let guard = DaemonGuard::new(&fx.root().join("kmnt"));
    let mps = guard.path.to_str().unwrap().to_owned();
    let cache = fx.cache.to_str().unwrap().to_owned();
    fx.ok(&["mount", &mps, "--disk-cache", &cache]);
    let pids = daemon_pids(&guard.path);
    assert_eq!(pids.len(), 1);
    let path = guard.path.join(&label);
    let reader = std::thread::spawn(move || fs::read(path));
    // As soon as the fill has started (a file under tmp/), kill the daemon.
    let start = Instant::now();
    while fs::read_dir(fx.cache.join("tmp")).map_or(0, |d| d.count()) == 0 {
        assert!(start.elapsed() < OP, "no fill started");
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    match reader.join().unwrap() {
        Ok(bytes) => assert_same_bytes(&bytes, &want, "a read that finished before the kill"),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED | libc::EIO)),
            "the reader got {e}"
        ),
    }
    fx.ok(&["umount", &mps]);
    let m = fx.mount(&[]);
    assert_same_bytes(&read(&m.path().join(&label)), &want, "after the kill, a new mount");
    assert!(
        fx.cached_files(&label).len() <= 1,
        "more than one committed copy of {label}: {:?}",
        fx.cached_files(&label)
    );
    drop(guard);
}

/// What the daemons of `fx`'s store logged (STORE/llmfs.log) from byte `from` on.
fn daemon_log_since(fx: &Fixture, from: u64) -> String {
    let log = fs::read(fx.ts.store.join("llmfs.log")).unwrap_or_default();
    String::from_utf8_lossy(&log[(from as usize).min(log.len())..]).into_owned()
}

fn daemon_log_len(fx: &Fixture) -> u64 {
    fs::metadata(fx.ts.store.join("llmfs.log")).map_or(0, |m| m.len())
}

/// A user's `llmfs umount` then `llmfs mount` at once (daemonized, as users run them): the new
/// daemon has the disk cache the old one was committing to when the mount went away, and serves
/// every file from it without decoding any again. (It used to find the cache locked by the old
/// daemon and run the whole mount without one, saying so only in the log.)
#[test]
fn a_mount_right_after_umount_keeps_the_disk_cache() {
    // f32 shards of ~50 MB: commits that take a while after the mount is gone.
    let big = ModelSpec { hidden: 512, intermediate: 1376, layers: 6, vocab: 16000, ..spec() };
    let fx = Fixture::new(&big);
    let want: Vec<(String, Vec<u8>)> = ["f32", "ft"]
        .iter()
        .flat_map(|n| [SHARD1, SHARD2].map(|s| (format!("{n}/{s}"), fs::read(fx.export(n).join(s)).unwrap())))
        .collect();
    let guard = DaemonGuard::new(&fx.root().join("umnt"));
    let mps = guard.path.to_str().unwrap().to_owned();
    let cache = fx.cache.to_str().unwrap().to_owned();
    for round in 0..3 {
        let from = daemon_log_len(&fx);
        let mounted = fx.ts.run_full(["mount", &mps, "--disk-cache", &cache]);
        assert!(mounted.status.success(), "round {round}: mount failed: {}", mounted.stderr);
        assert!(!mounted.stderr.contains("warning"), "round {round}: {}", mounted.stderr);
        for (label, bytes) in &want {
            assert_same_bytes(&read(&guard.path.join(label)), bytes, &format!("{label}, round {round}"));
        }
        let log = daemon_log_since(&fx, from);
        assert!(!log.contains("disk cache off") && !log.contains("waiting for"), "round {round}:\n{log}");
        for (label, _) in &want {
            let n = decodes_in(&log, label);
            assert_eq!(n, usize::from(round == 0), "round {round}: {label} decoded {n} times:\n{log}");
        }
        // Returns once the daemon has ended: it committed its fills and let go of the cache.
        fx.ok(&["umount", &mps]);
        assert!(
            daemon_pids(&guard.path).is_empty(),
            "round {round}: umount returned before its daemon ended"
        );
    }
}

/// A mount whose disk cache another mount holds runs without one and says so: on the terminal
/// of `llmfs mount` (daemonized) and of a foreground mount, and in `llmfs status`.
#[test]
fn a_mount_without_its_disk_cache_says_so() {
    let fx = Fixture::new(&spec());
    let first = fx.mount(&[]);
    let guard = DaemonGuard::new(&fx.root().join("second"));
    let mps = guard.path.to_str().unwrap().to_owned();
    let mounted = fx.ts.run_full(["mount", &mps, "--disk-cache", fx.cache.to_str().unwrap()]);
    assert!(mounted.status.success(), "{}", mounted.stderr);
    let pid = first.pid().unwrap();
    for needle in ["warning", "running without its disk cache", &format!("in use by llmfs pid {pid}")] {
        assert!(mounted.stderr.contains(needle), "no {needle:?} in mount's stderr: {}", mounted.stderr);
    }
    let status = fx.ok(&["status"]);
    let line_of = |mp: &Path| {
        status.lines().find(|l| l.starts_with(&format!("{}  ", mp.display()))).unwrap_or_default().to_owned()
    };
    assert!(line_of(&guard.path).contains("NO DISK CACHE"), "{status}");
    assert!(line_of(first.path()).contains(&format!("disk cache {}", fx.cache.display())), "{status}");
    // Its files still read right, decoded on the read path.
    let label = format!("f16/{SHARD1}");
    assert_same_bytes(
        &read(&guard.path.join(&label)),
        &fs::read(fx.export("f16").join(SHARD1)).unwrap(),
        &label,
    );
    // A foreground mount writes the warning to its terminal (here its log).
    let third = fx.mount(&[]);
    assert!(third.log_text().contains("llmfs: warning:"), "{}", third.log_text());
    drop(guard);
}

/// `llmfs warm` decodes entries into the disk cache before any mount, and a mount then decodes
/// nothing; with a mount holding the cache, `warm` goes through the mount.
#[test]
fn warm_decodes_ahead_and_through_a_mount() {
    let fx = Fixture::new(&spec());
    let cache = fx.cache.to_str().unwrap().to_owned();
    let labels = |n: &str| [SHARD1, SHARD2].map(|s| format!("{n}/{s}"));
    let warmed = fx.ts.run_full(["warm", "f16", "ft", "--disk-cache", &cache]);
    assert!(warmed.status.success(), "{}", warmed.stderr);
    // Its last line says how fast it decoded: "warm: SIZE in S s (R GB/s), committed C s later".
    let rate = |stderr: &str, then: &str| {
        stderr.lines().find_map(|l| {
            let rest = l.strip_prefix("warm: ")?.split_once(" s (")?.1;
            let (rate, after) = rest.split_once(" GB/s), ")?;
            after.starts_with(then).then_some(())?;
            rate.parse::<f64>().ok()
        })
    };
    let decoded = rate(&warmed.stderr, "committed ");
    assert!(decoded.is_some_and(|r| r > 0.0), "no rate in warm's stderr: {}", warmed.stderr);
    for label in labels("f16").iter().chain(&labels("ft")) {
        assert_eq!(fx.cached_files(label).len(), 1, "{label} not in the cache after warm");
    }
    let refused = fx.ts.run_full(["warm", "nope", "--disk-cache", &cache]);
    assert!(!refused.status.success() && refused.stderr.contains("nope"), "{}", refused.stderr);
    let m = fx.mount(&[]);
    for n in ["f16", "ft"] {
        for (label, s) in labels(n).iter().zip([SHARD1, SHARD2]) {
            assert_same_bytes(&read(&m.path().join(label)), &fs::read(fx.export(n).join(s)).unwrap(), label);
            assert_eq!(decodes(&m, label), 0, "{label} decoded again after warm:\n{}", m.log_text());
        }
    }
    // The mount holds the cache: warm opens f32's files through it.
    let through = fx.ts.run_full(["warm", "f32", "--disk-cache", &cache]);
    assert!(through.status.success(), "{}", through.stderr);
    assert!(through.stderr.contains("warming through it"), "{}", through.stderr);
    let opened = rate(&through.stderr, "committed by the mount");
    assert!(opened.is_some_and(|r| r > 0.0), "no rate in warm's stderr: {}", through.stderr);
    for label in labels("f32") {
        wait_committed(&fx, &label);
        assert_eq!(decodes(&m, &label), 1, "{label}:\n{}", m.log_text());
    }
}

/// The memory tier (`--memory-cache-size`): files decode into memory, are served from there and
/// written to the disk cache behind the reader; a tier too small for the next file evicts what
/// is on disk already or sends the fill to the disk cache, and every byte reads right.
#[test]
fn the_memory_tier_serves_fills_and_persists_them() {
    let fx = Fixture::new(&spec());
    let want: Vec<(String, Vec<u8>)> = ["f16", "f32", "ft"]
        .iter()
        .flat_map(|n| [SHARD1, SHARD2].map(|s| (format!("{n}/{s}"), fs::read(fx.export(n).join(s)).unwrap())))
        .collect();
    {
        // One f32 shard (9.4 MB: 10 MiB of 2 MiB units) fits, not two.
        let m = fx.mount(&["--memory-cache-size", "12MiB"]);
        for (label, bytes) in &want {
            assert_same_bytes(&read(&m.path().join(label)), bytes, &format!("{label}, memory tier"));
        }
        let log = m.log_text();
        assert!(log.contains("memory cache: decoded"), "nothing decoded into memory:\n{log}");
        // 12 MiB cannot hold the six files: some went to the disk tier or made room.
        assert!(
            log.contains("memory cache: no room") || log.contains("memory cache: evicting"),
            "the memory tier never ran full:\n{log}"
        );
        for (label, _) in &want {
            wait_committed(&fx, label);
            assert_eq!(decodes_in(&log, label), 1, "{label} decoded other than once:\n{log}");
        }
    }
    // Everything reached the disk cache: a new mount decodes nothing.
    let m = fx.mount(&["--memory-cache-size", "0"]);
    for (label, bytes) in &want {
        assert_same_bytes(&read(&m.path().join(label)), bytes, &format!("{label}, after a remount"));
        assert_eq!(decodes(&m, label), 0, "{label} decoded again:\n{}", m.log_text());
    }
    assert!(!m.log_text().contains("memory cache:"), "--memory-cache-size 0 used memory:\n{}", m.log_text());
}

//! Shared helpers of the integration tests: a throw-away store, running the `llmfs` binary with a
//! deadline, and small generated models.
//!
//! Each test binary includes this with `mod common;` and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use llmfs::demo::{self, ModelSpec};
use llmfs::format::Dtype;

/// How long any one CLI command may run before the test kills it and fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The `llmfs` binary cargo built for these tests.
pub fn llmfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_llmfs")
}

/// A command for the `llmfs` binary with a clean environment for the store: `LLMFS_STORE` is
/// removed so that only what a test passes decides which store is used.
pub fn llmfs_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(llmfs_bin());
    cmd.args(args).env_remove("LLMFS_STORE").env("RUST_BACKTRACE", "0").stdin(Stdio::null());
    cmd
}

/// What a finished command did.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Wall-clock time from spawn to exit.
    pub elapsed: Duration,
    /// Peak resident set size of the process, in KiB (from wait4's rusage).
    pub max_rss_kib: u64,
}

/// Runs `cmd` to completion, killing it (and failing the test) if it runs past `timeout`.
/// stdout and stderr are drained on threads so a chatty child cannot block on a full pipe.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Finished {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let description = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {description}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let pid = child.id() as libc::pid_t;
    let mut raw_status: libc::c_int = 0;
    // SAFETY: rusage is plain old data, zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut timed_out = false;
    loop {
        // SAFETY: wait4 on our own child; the pointers are to live locals.
        let r = unsafe { libc::wait4(pid, &mut raw_status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("wait4 on {description}: {e}");
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            // SAFETY: as above; blocking reap of the killed child.
            unsafe { libc::wait4(pid, &mut raw_status, 0, &mut usage) };
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    if timed_out {
        panic!("{description} ran past {timeout:?} and was killed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    }
    Finished {
        status: ExitStatus::from_raw(raw_status),
        stdout,
        stderr,
        elapsed,
        max_rss_kib: usage.ru_maxrss.max(0) as u64,
    }
}

/// Runs `llmfs ARGS` (no `--store`, `LLMFS_STORE` unset) with the default timeout.
pub fn run_llmfs<I, S>(args: I) -> (ExitStatus, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let f = run_command(llmfs_command(args), DEFAULT_TIMEOUT);
    (f.status, f.stdout, f.stderr)
}

/// A temporary directory holding a store (`DIR/store`, created by the first command that opens
/// it) and whatever model directories a test generates next to it. Removed on drop.
pub struct TestStore {
    pub tmp: tempfile::TempDir,
    pub store: PathBuf,
}

impl Default for TestStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TestStore {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new().prefix("llmfs-test-").tempdir().expect("a temp dir");
        let store = tmp.path().join("store");
        TestStore { tmp, store }
    }

    /// A path inside the temporary directory (outside the store).
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.tmp.path().join(rel)
    }

    pub fn registry_path(&self) -> PathBuf {
        self.store.join("registry.json")
    }

    /// `llmfs --store STORE ARGS`, with the default timeout.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = llmfs_command([OsStr::new("--store"), self.store.as_os_str()]);
        cmd.args(args);
        cmd
    }

    /// Runs `llmfs --store STORE ARGS`, returning (status, stdout, stderr).
    pub fn run<I, S>(&self, args: I) -> (ExitStatus, String, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let f = self.run_full(args);
        (f.status, f.stdout, f.stderr)
    }

    /// Like [`TestStore::run`], also reporting time and peak memory.
    pub fn run_full<I, S>(&self, args: I) -> Finished
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_timeout(args, DEFAULT_TIMEOUT)
    }

    pub fn run_timeout<I, S>(&self, args: I, timeout: Duration) -> Finished
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_command(self.command(args), timeout)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cmd = self.command(args);
        let description = format!("{cmd:?}");
        let f = run_command(cmd, DEFAULT_TIMEOUT);
        assert!(f.status.success(), "{description} failed ({}):\nstdout:\n{}\nstderr:\n{}", f.status, f.stdout, f.stderr);
        f.stdout
    }

    /// Runs a command that must succeed and print JSON; returns it parsed.
    pub fn json<I, S>(&self, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
    }

    /// Writes the small test model into `self.path(rel)` and returns its path.
    pub fn model(&self, rel: &str) -> PathBuf {
        let dir = self.path(rel);
        write_small_model(&dir);
        dir
    }

    /// What a failed command must leave as it was.
    pub fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot {
            registry: std::fs::read(self.registry_path()).ok(),
            root: list(&self.store),
            models: list(&self.store.join("models")),
            tmp: list(&self.store.join("tmp")),
        }
    }

    /// Asserts that the store is as `before` was: registry.json byte-identical (or still absent),
    /// nothing new in the store's root (but the directories and lock file any command creates),
    /// in models/ or in tmp/.
    pub fn assert_unchanged(&self, before: &StoreSnapshot, context: &str) {
        let after = self.snapshot();
        match (&before.registry, &after.registry) {
            (None, None) => {}
            (None, Some(_)) => panic!("{context}: registry.json was created"),
            (Some(_), None) => panic!("{context}: registry.json was removed"),
            (Some(a), Some(b)) => assert!(a == b, "{context}: registry.json changed"),
        }
        let allowed: BTreeSet<String> = ["lock", "models", "tmp"].iter().map(|s| s.to_string()).collect();
        let new_in_root: Vec<_> = after.root.difference(&before.root).filter(|n| !allowed.contains(*n)).collect();
        assert!(new_in_root.is_empty(), "{context}: new files in the store: {new_in_root:?}");
        assert_eq!(after.models, before.models, "{context}: STORE/models/ changed");
        assert!(after.tmp.is_empty(), "{context}: leftovers in STORE/tmp/: {:?}", after.tmp);
    }
}

/// The parts of a store a failed command must not change.
#[derive(Clone, Debug)]
pub struct StoreSnapshot {
    pub registry: Option<Vec<u8>>,
    pub root: BTreeSet<String>,
    pub models: BTreeSet<String>,
    pub tmp: BTreeSet<String>,
}

fn list(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("a directory entry").file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// A LLaMA-shaped model of a few hundred KB in one `model.safetensors` (BF16, 2 layers):
/// 3 + 9 × 2 = 21 tensors.
pub fn small_spec() -> ModelSpec {
    ModelSpec { hidden: 64, intermediate: 128, layers: 2, heads: 4, kv_heads: 4, vocab: 256, dtype: Dtype::BF16, shards: 1, seed: 11 }
}

/// Tensors in a model of `spec`.
pub fn tensor_count(spec: &ModelSpec) -> usize {
    spec.tensors().iter().map(Vec::len).sum()
}

/// Writes the small model (see [`small_spec`]) into `dir`.
pub fn write_small_model(dir: &Path) {
    write_model(dir, &small_spec());
}

/// Writes a generated model of `spec` into `dir`.
pub fn write_model(dir: &Path, spec: &ModelSpec) {
    demo::write_model(dir, spec).unwrap_or_else(|e| panic!("writing a model into {}: {e}", dir.display()));
}

/// Writes a minimal safetensors-looking file: the 8-byte length of `header_json`, the JSON, then
/// `data_len` zero bytes. The header is not validated: tests use this to build broken files.
pub fn write_raw_safetensors(path: &Path, header_json: &str, data_len: usize) {
    let mut bytes = (header_json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header_json.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

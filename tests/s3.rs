//! The storage layer (`llmfs::store`) against a real S3 server (SeaweedFS on 127.0.0.1, started
//! and killed by the test) and against misbehaving stub servers. Skips the SeaweedFS tests with a
//! message when `weed` is not installed, unless LLMFS_REQUIRE_S3=1.

mod s3_common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use llmfs::store::{update_object, Limits, ObjectReader, ReadOptions, Store, StoreError};
use s3_common::stub::{Mode, Stub};
use s3_common::{s3_config, Weed, SECRET};

fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Etags differ between backends; the transcript names them by the order they first appear.
struct Transcript {
    lines: Vec<String>,
    etags: Vec<String>,
}

impl Transcript {
    fn etag(&mut self, e: &str) -> String {
        let i = self.etags.iter().position(|x| x == e).unwrap_or_else(|| {
            self.etags.push(e.to_string());
            self.etags.len() - 1
        });
        format!("etag#{i}")
    }

    fn push(&mut self, what: &str, r: Result<String, StoreError>) {
        let line = match r {
            Ok(v) => format!("{what}: ok {v}"),
            // The kind of error, not its message (which names the backend's paths).
            Err(e) => format!("{what}: err {}", format!("{e:?}").split([' ', '{', '(']).next().unwrap()),
        };
        self.lines.push(line);
    }
}

fn blake(b: &[u8]) -> String {
    blake3::hash(b).to_hex()[..16].to_string()
}

/// Every operation, in an order that covers their interplay; returns what each gave.
fn exercise(store: &Arc<Store>, tmp: &std::path::Path) -> Vec<String> {
    let mut t = Transcript { lines: Vec::new(), etags: Vec::new() };
    let small = data(1000, 1);
    let big = data(40 << 20, 2); // > 16 MiB: multipart on S3
    let medium = data(3 << 20, 3); // one PUT

    store.ensure_writable().unwrap();
    let e1 = store.put("a/small", Bytes::from(small.clone())).unwrap();
    let r = t.etag(&e1);
    t.push("put", Ok(r));
    let r = store.put_if_absent("a/small", Bytes::from_static(b"x")).map(|e| t.etag(&e));
    t.push("put_if_absent existing", r);
    let r = store.put_if_absent("a/new", Bytes::from_static(b"new")).map(|e| t.etag(&e));
    t.push("put_if_absent new", r);
    let got = store.get("a/small").unwrap();
    assert_eq!(got.bytes, small);
    assert_eq!(got.etag, e1, "get's etag is the put's");
    let r = Ok(format!("{} {}", blake(&got.bytes), t.etag(&got.etag)));
    t.push("get", r);
    for range in [0..1000u64, 0..1, 999..1000, 100..200, 500..500] {
        let r = store.get_range("a/small", range.clone()).map(|b| {
            assert_eq!(&b[..], &small[range.start as usize..range.end as usize]);
            blake(&b)
        });
        t.push(&format!("get_range {range:?}"), r);
    }
    t.push("get_range past the end", store.get_range("a/small", 900..1001).map(|b| blake(&b)));
    t.push("get missing", store.get("a/missing").map(|o| blake(&o.bytes)));
    t.push("get_range missing", store.get_range("a/missing", 0..1).map(|b| blake(&b)));
    t.push("head missing", store.head("a/missing").map(|m| m.size.to_string()));
    let head = store.head("a/small").unwrap();
    assert_eq!((head.size, head.key.as_str()), (1000, "a/small"));
    let r = Ok(format!("{} {}", head.size, t.etag(&head.etag)));
    t.push("head", r);
    let r =
        store.put_if_match("a/small", Bytes::from_static(b"lost"), "\"not-the-etag\"").map(|e| t.etag(&e));
    t.push("put_if_match wrong", r);
    let e2 = store.put_if_match("a/small", Bytes::from_static(b"second"), &e1).unwrap();
    assert_ne!(e1, e2);
    let r = t.etag(&e2);
    t.push("put_if_match right", Ok(r));
    let r = store.put_if_match("a/small", Bytes::from_static(b"lost"), &e1).map(|e| t.etag(&e));
    t.push("put_if_match stale", r);
    let r = store.put_if_match("a/none", Bytes::from_static(b"lost"), &e1).map(|e| t.etag(&e));
    t.push("put_if_match absent", r);
    assert_eq!(&store.get("a/small").unwrap().bytes[..], b"second");

    // put_file: one PUT and multipart, with progress.
    for (name, bytes) in [("medium", &medium), ("big", &big)] {
        let src = tmp.join(name);
        std::fs::write(&src, bytes).unwrap();
        let mut seen = Vec::new();
        let key = format!("models/m/{name}.safetensors");
        let etag = store.put_file(&key, &src, &mut |done| seen.push(done)).unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "progress not increasing: {seen:?}");
        assert_eq!(seen.last().copied(), Some(bytes.len() as u64));
        assert_eq!(store.head(&key).unwrap().etag, etag);
        t.push(&format!("put_file {name}"), Ok(store.head(&key).unwrap().size.to_string()));
    }
    let key = "models/m/big.safetensors";
    for range in [0..(8u64 << 20), (16 << 20) - 3..(16 << 20) + 3, (40 << 20) - 5..40 << 20] {
        let r = store.get_range(key, range.clone()).map(|b| {
            assert_eq!(&b[..], &big[range.start as usize..range.end as usize]);
            blake(&b)
        });
        t.push(&format!("big get_range {range:?}"), r);
    }
    // Whole object through the parallel reader, and sequentially and randomly through ObjectReader.
    let opts = ReadOptions { part_size: 8 << 20, max_in_flight: 4 };
    let mut whole = Vec::new();
    store
        .read_range_parallel(key, 0..big.len() as u64, &opts, &mut |off, b| {
            assert_eq!(off, whole.len() as u64);
            whole.extend_from_slice(&b);
            Ok(())
        })
        .unwrap();
    assert!(whole == big, "read_range_parallel gave other bytes");
    t.push("read_range_parallel", Ok(blake(&whole)));
    let reader = ObjectReader::open(store.clone(), key, opts).unwrap();
    assert_eq!(reader.size(), big.len() as u64);
    let mut seq = Vec::new();
    let mut off = 0u64;
    loop {
        let b = reader.read_at(off, 1 << 20).unwrap();
        if b.is_empty() {
            break;
        }
        off += b.len() as u64;
        seq.extend_from_slice(&b);
    }
    assert!(seq == big, "sequential ObjectReader gave other bytes");
    for (o, l) in [(33 << 20, 5000usize), (7, 3 << 20), ((40 << 20) - 10, 100), (12 << 20, 9 << 20)] {
        let b = reader.read_at(o, l).unwrap();
        let end = (o as usize + l).min(big.len());
        assert_eq!(&b[..], &big[o as usize..end], "read_at({o}, {l})");
    }
    t.push("reader", Ok(blake(&seq)));

    // A reader is pinned to the etag it opened at: a rewrite fails it, never mixes versions.
    // (Parts already fetched are still served: they are of the version it opened at.)
    let pinned =
        ObjectReader::open(store.clone(), "a/small", ReadOptions { part_size: 2, max_in_flight: 1 }).unwrap();
    assert_eq!(&pinned.read_at(0, 2).unwrap()[..], b"se");
    store.put("a/small", Bytes::from_static(b"rewritten")).unwrap();
    t.push("pinned reader after a rewrite", pinned.read_at(4, 2).map(|b| blake(&b)));
    let r = store.get_range_at("a/small", 0..3, Some(&e2)).map(|b| blake(&b));
    t.push("get_range_at an old etag", r);

    let listed: Vec<String> =
        store.list("models").unwrap().iter().map(|m| format!("{}={}", m.key, m.size)).collect();
    t.push("list models", Ok(listed.join(",")));
    let listed: Vec<String> = store.list("a").unwrap().iter().map(|m| m.key.clone()).collect();
    t.push("list a", Ok(listed.join(",")));
    t.push("list a/sm (not a directory)", Ok(store.list("a/sm").unwrap().len().to_string()));
    t.push("list nothing", Ok(store.list("zzz").unwrap().len().to_string()));
    t.push("invalid key", store.get("../x").map(|o| blake(&o.bytes)));
    t.push("delete", store.delete("a/new").map(|()| String::new()));
    t.push("delete missing", store.delete("a/new").map(|()| String::new()));
    t.push("head deleted", store.head("a/new").map(|m| m.size.to_string()));
    let listed: Vec<String> = store.list("a").unwrap().iter().map(|m| m.key.clone()).collect();
    t.push("list a after delete", Ok(listed.join(",")));
    t.lines
}

#[test]
fn every_operation_gives_the_same_results_on_s3_and_a_local_directory() {
    let Some(weed) = Weed::start("every_operation_gives_the_same_results_on_s3_and_a_local_directory") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let local = Arc::new(Store::local(local_dir.path()).unwrap());
    let on_local = exercise(&local, tmp.path());
    let s3 = Arc::new(weed.store("prefix/of/this-test"));
    let on_s3 = exercise(&s3, tmp.path());
    for (l, s) in on_local.iter().zip(&on_s3) {
        println!("local: {l}\n   s3: {s}");
    }
    assert_eq!(on_local, on_s3);
    assert!(on_local.iter().any(|l| l.starts_with("put_if_absent existing: err AlreadyExists")));
    assert!(on_local.iter().any(|l| l.starts_with("put_if_match wrong: err Precondition")));
    // The prefix scopes the store: nothing of it outside, and the bucket root sees it under it.
    let root = weed.store("");
    assert!(root
        .list("")
        .unwrap()
        .iter()
        .all(|m| m.key.starts_with("prefix/of/this-test/") || m.key.starts_with(".")));
}

/// Lines `PROCESS-I\n` appended by `update_object`, as a registry update would add an entry.
fn append_line(store: &Store, line: &str) -> u32 {
    update_object(store, "registry.json", |old| {
        let mut v = old.unwrap_or_default().to_vec();
        v.extend_from_slice(line.as_bytes());
        v.push(b'\n');
        Ok::<_, String>(v)
    })
    .unwrap()
    .attempts
}

const PROCESSES: usize = 8;
const UPDATES_PER_PROCESS: usize = 12;

/// Run as a child process by `registry_updates_from_8_processes_lose_nothing`: `LLMFS_TEST_STORE`
/// says where (a directory, or `s3 ENDPOINT PREFIX`), `LLMFS_TEST_CHILD` which child it is.
#[test]
#[ignore = "helper: run as a child process by registry_updates_from_8_processes_lose_nothing"]
fn registry_child() {
    let (Ok(place), Ok(child)) = (std::env::var("LLMFS_TEST_STORE"), std::env::var("LLMFS_TEST_CHILD"))
    else {
        panic!("run only by registry_updates_from_8_processes_lose_nothing")
    };
    let store = match place.split_once(' ') {
        Some(("s3", rest)) => {
            let (endpoint, prefix) = rest.split_once(' ').unwrap();
            // The product's limits, not the tests' short ones: this checks that no update is
            // lost, and 8 writers on a busy 2-core machine can keep one PUT waiting past 5 s.
            Store::s3(s3_config(endpoint, prefix, Limits::default())).unwrap()
        }
        _ => Store::local(&place).unwrap(),
    };
    let mut conflicts = 0;
    for i in 0..UPDATES_PER_PROCESS {
        conflicts += append_line(&store, &format!("{child}-{i}")) - 1;
    }
    println!("child {child}: {conflicts} conflicts retried");
}

fn run_children(place: &str) {
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|c| {
            Command::new(&exe)
                .args(["--exact", "registry_child", "--ignored", "--nocapture", "--test-threads=1"])
                .env("LLMFS_TEST_STORE", place)
                .env("LLMFS_TEST_CHILD", c.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{text}");
        if let Some(line) = text.lines().find(|l| l.starts_with("child ")) {
            println!("{line}");
        }
    }
}

fn assert_all_lines(store: &Store) {
    let got = store.get("registry.json").unwrap();
    let text = String::from_utf8(got.bytes.to_vec()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let distinct: HashSet<&str> = lines.iter().copied().collect();
    assert_eq!(lines.len(), PROCESSES * UPDATES_PER_PROCESS, "updates lost or doubled");
    assert_eq!(distinct.len(), PROCESSES * UPDATES_PER_PROCESS);
    for c in 0..PROCESSES {
        // Each process's own updates stay in its order.
        let mine: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with(&format!("{c}-"))).collect();
        let want: Vec<String> = (0..UPDATES_PER_PROCESS).map(|i| format!("{c}-{i}")).collect();
        assert_eq!(mine, want);
    }
}

#[test]
fn registry_updates_from_8_processes_lose_nothing() {
    let local = tempfile::tempdir().unwrap();
    run_children(local.path().to_str().unwrap());
    assert_all_lines(&Store::local(local.path()).unwrap());

    let Some(weed) = Weed::start("registry_updates_from_8_processes_lose_nothing") else { return };
    run_children(&format!("s3 {} concurrent", weed.endpoint()));
    assert_all_lines(&weed.store("concurrent"));
}

#[test]
fn a_server_killed_mid_read_gives_an_error_within_the_bound_and_reads_work_after_restart() {
    let Some(mut weed) = Weed::start("a_server_killed_mid_read…") else { return };
    let limits = s3_common::test_limits();
    let store = Arc::new(Store::s3(weed.config("faults", limits)).unwrap());
    let big = data(48 << 20, 9);
    store.put("obj", Bytes::from(big.clone())).unwrap();
    let opts = ReadOptions { part_size: 8 << 20, max_in_flight: 2 };
    let reader = ObjectReader::open(store.clone(), "obj", opts.clone()).unwrap();
    assert_eq!(&reader.read_at(0, 1 << 20).unwrap()[..], &big[..1 << 20]);

    let bound = limits.bound();
    // Killed in the middle of a whole-object parallel read (from its sink, after the first part):
    // the parts still needed fail within the bound; what was delivered is right.
    let mut killed_at = None;
    let r = store.read_range_parallel("obj", 0..big.len() as u64, &opts, &mut |off, b| {
        assert_eq!(&b[..], &big[off as usize..off as usize + b.len()]);
        if killed_at.is_none() {
            weed.kill();
            killed_at = Some(Instant::now());
        }
        Ok(())
    });
    let took = killed_at.expect("no part delivered").elapsed();
    println!("parallel read, server killed after its first part: {took:?}: {r:?}");
    assert!(r.is_err() && took <= bound + Duration::from_secs(2), "{took:?} {r:?}");
    // A sequential reader going on after the kill: right bytes from what it had prefetched, then
    // an error (in bounded time), never a hang or wrong bytes.
    let mut off = 1u64 << 20;
    let err = loop {
        let start = Instant::now();
        match reader.read_at(off, 1 << 20) {
            Ok(b) => {
                assert!(!b.is_empty(), "read past the prefetched parts succeeded with the server down");
                assert_eq!(&b[..], &big[off as usize..off as usize + b.len()]);
                off += b.len() as u64;
            }
            Err(e) => {
                assert!(start.elapsed() <= bound + Duration::from_secs(2), "{:?}", start.elapsed());
                break e;
            }
        }
    };
    println!("sequential reader: served {} MiB from prefetched parts, then {err}", off >> 20);
    for what in ["reader", "get_range", "parallel", "head"] {
        let start = Instant::now();
        let r = match what {
            "reader" => reader.read_at(40 << 20, 1 << 20).map(|_| ()),
            "get_range" => store.get_range("obj", 0..10).map(|_| ()),
            "parallel" => store.read_range_parallel("obj", 0..big.len() as u64, &opts, &mut |_, _| Ok(())),
            _ => store.head("obj").map(|_| ()),
        };
        let took = start.elapsed();
        println!("{what} with the server down: {took:?}: {r:?}");
        assert!(r.is_err(), "{what} succeeded with the server killed");
        assert!(took <= bound + Duration::from_secs(2), "{what} took {took:?}, bound {bound:?}");
        // It did retry (backoff from 100 ms) rather than fail at once.
        assert!(took >= Duration::from_millis(200), "{what} gave up after {took:?} without retrying");
    }

    weed.restart();
    assert_eq!(&reader.read_at(40 << 20, 1 << 20).unwrap()[..], &big[40 << 20..41 << 20]);
    assert_eq!(&store.get_range("obj", 0..10).unwrap()[..], &big[..10]);
    let mut n = 0u64;
    store
        .read_range_parallel("obj", 0..big.len() as u64, &opts, &mut |off, b| {
            assert_eq!(&b[..], &big[off as usize..off as usize + b.len()]);
            n += b.len() as u64;
            Ok(())
        })
        .unwrap();
    assert_eq!(n, big.len() as u64);

    // An upload killed midway (after its first part) fails in bounded time and leaves nothing
    // visible under its key: a multipart object exists only once completed.
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), &big).unwrap();
    let mut killed_at = None;
    let r = store.put_file("models/x/upload.safetensors", src.path(), &mut |_| {
        if killed_at.is_none() {
            weed.kill();
            killed_at = Some(Instant::now());
        }
    });
    let took = killed_at.expect("no progress reported").elapsed();
    println!("put_file, server killed after its first part: {took:?}: {r:?}");
    assert!(r.is_err() && took <= bound + Duration::from_secs(2), "{took:?} {r:?}");
    weed.restart();
    assert_eq!(
        store.head("models/x/upload.safetensors"),
        Err(StoreError::NotFound { key: "models/x/upload.safetensors".into() })
    );
    assert!(store.list("models").unwrap().is_empty());
}

#[test]
fn a_frozen_server_times_out_within_the_bound_and_reads_resume_when_it_thaws() {
    let Some(weed) = Weed::start("a_frozen_server_times_out…") else { return };
    let limits = Limits { request: Duration::from_secs(2), ..s3_common::test_limits() };
    let store = Arc::new(Store::s3(weed.config("frozen", limits)).unwrap());
    let big = data(24 << 20, 11);
    store.put("obj", Bytes::from(big.clone())).unwrap();
    let reader = ObjectReader::open(store.clone(), "obj", ReadOptions::default()).unwrap();
    weed.freeze(true);
    for what in ["reader", "get"] {
        let start = Instant::now();
        let r = match what {
            "reader" => reader.read_at(16 << 20, 1 << 20).map(|_| ()),
            _ => store.get("obj").map(|_| ()),
        };
        let took = start.elapsed();
        println!("{what} from a frozen server: {took:?}: {r:?}");
        assert!(r.is_err(), "{what} succeeded from a frozen server");
        assert!(
            took >= limits.request && took <= limits.bound() + Duration::from_secs(2),
            "{what}: {took:?}"
        );
    }
    weed.freeze(false);
    assert_eq!(&reader.read_at(16 << 20, 1 << 20).unwrap()[..], &big[16 << 20..17 << 20]);
    assert!(store.get("obj").unwrap().bytes == big);
}

fn stub_store(stub: &Stub, limits: Limits) -> Store {
    Store::s3(s3_config(&stub.endpoint(), "", limits)).unwrap()
}

#[test]
fn a_server_that_ignores_conditional_writes_is_refused_for_writing() {
    let stub = Stub::start(Mode::IgnoresConditions, &[("/llmfs-test/registry.json", b"{}")]);
    let store = stub_store(&stub, s3_common::test_limits());
    let err = store.ensure_writable().unwrap_err();
    let line = err.to_string();
    println!("{line}");
    assert!(matches!(err, StoreError::NoConditionalWrites { .. }), "{err:?}");
    assert!(
        !line.contains('\n') && line.contains("conditional writes") && line.contains("If-None-Match"),
        "{line}"
    );
    // Every write is refused with the same line; reads still work.
    assert_eq!(store.put("x", Bytes::from_static(b"1")).unwrap_err(), err);
    assert_eq!(store.delete("registry.json").unwrap_err(), err);
    let update = update_object(&store, "registry.json", |_| Ok::<_, String>(b"lost".to_vec()));
    assert!(matches!(update, Err(llmfs::store::UpdateError::Store(StoreError::NoConditionalWrites { .. }))));
    assert_eq!(&store.get("registry.json").unwrap().bytes[..], b"{}");
    assert!(!line.contains(SECRET));
}

#[test]
fn throttling_503_is_retried_with_backoff_then_succeeds() {
    let stub = Stub::start(Mode::Throttle(3), &[("/llmfs-test/k", b"hello")]);
    let store = stub_store(&stub, s3_common::test_limits());
    let start = Instant::now();
    assert_eq!(&store.get("k").unwrap().bytes[..], b"hello");
    assert_eq!(stub.hits(), 4, "3 throttled answers and one success");
    // Three backoffs, each at least half of 100 ms, 200 ms, 400 ms (jittered).
    assert!(start.elapsed() >= Duration::from_millis(50), "{:?}", start.elapsed());
}

#[test]
fn endless_throttling_and_a_stalled_body_fail_within_the_bound() {
    // Requests time out well before the retry time is up, so a stalled body is retried too.
    let limits = Limits {
        request: Duration::from_secs(1),
        retry_total: Duration::from_secs(3),
        ..s3_common::test_limits()
    };
    for mode in [Mode::Throttle(usize::MAX), Mode::Stall] {
        let stub = Stub::start(mode, &[("/llmfs-test/k", &[7u8; 1000])]);
        let store = stub_store(&stub, limits);
        let start = Instant::now();
        let r = store.get("k");
        let took = start.elapsed();
        println!("{mode:?}: {took:?} {r:?}");
        assert!(r.is_err(), "{mode:?}: {r:?}");
        assert!(took <= limits.bound() + Duration::from_secs(1), "{mode:?} took {took:?}");
        assert!(stub.hits() >= 2, "{mode:?}: not retried ({} requests)", stub.hits());
        assert!(!format!("{r:?}").contains(SECRET));
    }
}

#[test]
fn credentials_never_appear_in_debug_output() {
    let config = s3_config("http://127.0.0.1:1", "p", s3_common::test_limits());
    let store = Store::s3(config.clone()).unwrap();
    for shown in [format!("{config:?}"), format!("{store:?}"), format!("{config:#?}")] {
        assert!(!shown.contains(SECRET) && !shown.contains(s3_common::KEY_ID), "{shown}");
    }
    assert!(format!("{store:?}").contains("s3://llmfs-test/p"));
}

#[test]
fn plain_http_needs_allow_http() {
    let mut config = s3_config("http://127.0.0.1:1", "", s3_common::test_limits());
    config.allow_http = false;
    let err = Store::s3(config).unwrap_err();
    assert!(err.to_string().contains("AWS_ALLOW_HTTP=true"), "{err}");
}

/// Throughput of the read paths against SeaweedFS on this machine (not a CI check: numbers
/// only). `cargo test --release --test s3 bench_reads -- --ignored --nocapture`;
/// LLMFS_BENCH_MB sets the object size (default 256).
#[test]
#[ignore = "benchmark: run by hand"]
fn bench_reads() {
    let Some(weed) = Weed::start("bench_reads") else { return };
    let mb: usize = std::env::var("LLMFS_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let size = mb << 20;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("obj");
    std::fs::write(&src, data(size, 5)).unwrap();
    let rate = |t: Duration| format!("{:.0} MB/s", size as f64 / 1e6 / t.as_secs_f64());
    let s3 = Arc::new(Store::s3(weed.config("bench", Limits::default())).unwrap());
    let t = Instant::now();
    s3.put_file("obj", &src, &mut |_| {}).unwrap();
    println!("put_file {mb} MiB (multipart, 4 in flight): {}", rate(t.elapsed()));
    let t = Instant::now();
    assert_eq!(s3.get("obj").unwrap().bytes.len(), size);
    println!("one whole GET: {}", rate(t.elapsed()));
    for in_flight in [1, 2, 4, 8] {
        let opts = ReadOptions { part_size: 8 << 20, max_in_flight: in_flight };
        let t = Instant::now();
        let mut n = 0;
        s3.read_range_parallel("obj", 0..size as u64, &opts, &mut |_, b| {
            n += b.len();
            Ok(())
        })
        .unwrap();
        assert_eq!(n, size);
        println!("read_range_parallel, 8 MiB parts, {in_flight} in flight: {}", rate(t.elapsed()));
    }
    let reader = ObjectReader::open(s3.clone(), "obj", ReadOptions::default()).unwrap();
    let t = Instant::now();
    let mut off = 0u64;
    while off < size as u64 {
        off += reader.read_at(off, 1 << 20).unwrap().len() as u64;
    }
    println!("ObjectReader, sequential 1 MiB reads (window up to 8 x 8 MiB): {}", rate(t.elapsed()));
    let local = Arc::new(Store::local(tmp.path()).unwrap());
    let reader = ObjectReader::open(local, "obj", ReadOptions::default()).unwrap();
    let t = Instant::now();
    let mut off = 0u64;
    while off < size as u64 {
        off += reader.read_at(off, 1 << 20).unwrap().len() as u64;
    }
    println!("local directory, sequential 1 MiB reads (page cache warm): {}", rate(t.elapsed()));
}

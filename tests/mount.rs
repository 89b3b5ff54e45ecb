//! Real mounts (DESIGN.md, "The user's contract", mount tree and semantics): every byte read
//! through FUSE — whole files, random preads, mmap, `cp -r`, Python's safetensors, concurrent
//! readers — equals `llmfs export`; casts equal a reference conversion; a changed base gives EIO
//! with a log line; entries come and go while mounted; daemon mode, stale mounts; stable inodes.
//!
//! Each test has its own store, generated model (sharded, bf16, a few MB) and mount. Mounts are
//! owned by guards that unmount on drop (also on panic) and have a watchdog that kills a stuck
//! daemon; blocking file operations run under `with_deadline`, commands under a timeout.
//! Needs /dev/fuse and permission to mount (root, or fusermount3).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{
    assert_same_bytes, daemon_pids, llmfs_mounted, run_command, wait_until, with_deadline, DaemonGuard,
    MountGuard, TestStore,
};
use half::{bf16, f16};
use llmfs::demo::{ModelSpec, SplitMix64};
use llmfs::format::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const INDEX: &str = "model.safetensors.index.json";
const ENTRIES: [&str; 3] = ["base", "f16", "f32"];
/// Deadline of one blocking file operation (a read of a whole file, a listing, a stat).
const OP: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// Two shards, bf16; vocab 3000 so the f32 embedding (3 MB) spans two 2 MiB decode chunks and
/// ends mid-chunk; kv_heads < heads for an odd shape. Shard 1 is ~4.7 MB (bf16), under the
/// fingerprint's whole-hashed 4 MiB head at its middle.
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

/// A store with `base` (the generated model, added in place), `f16` and `f32` (casts of it).
struct Fixture {
    ts: TestStore,
    model: PathBuf,
    mounts: std::cell::Cell<usize>,
}

impl Fixture {
    fn new() -> Fixture {
        let ts = TestStore::new();
        let model = ts.path("model");
        common::write_model(&model, &spec());
        let fx = Fixture { ts, model, mounts: Default::default() };
        fx.ok(&["add", "base", fx.model.to_str().unwrap()]);
        fx.ok(&["cast", "f16", "--base", "base", "--dtype", "f16"]);
        fx.ok(&["cast", "f32", "--base", "base", "--dtype", "f32"]);
        fx
    }

    fn root(&self) -> PathBuf {
        self.ts.tmp.path().canonicalize().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ts.ok(args)
    }

    /// `llmfs export NAME` into DIR/export/NAME (once).
    fn export(&self, name: &str) -> PathBuf {
        let out = self.root().join("export").join(name);
        if !out.exists() {
            self.ok(&["export", name, out.to_str().unwrap()]);
        }
        out
    }

    /// A fresh foreground mount at a new mount point.
    fn mount(&self, extra: &[&str]) -> MountGuard {
        let n = self.mounts.get();
        self.mounts.set(n + 1);
        MountGuard::new(&self.ts, &self.root().join(format!("mnt{n}")), extra)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn read(path: &Path) -> Vec<u8> {
    let p = path.to_owned();
    with_deadline(&format!("reading {}", path.display()), OP, move || fs::read(&p))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn try_open(path: &Path) -> std::io::Result<File> {
    let p = path.to_owned();
    with_deadline(&format!("opening {}", path.display()), OP, move || File::open(p))
}

fn stat(path: &Path) -> std::io::Result<fs::Metadata> {
    let p = path.to_owned();
    with_deadline(&format!("stat {}", path.display()), OP, move || fs::metadata(p))
}

/// Names in a directory (sorted), with their d_ino.
fn list(path: &Path) -> std::io::Result<BTreeMap<String, u64>> {
    let p = path.to_owned();
    with_deadline(&format!("listing {}", path.display()), OP, move || {
        fs::read_dir(p)?.map(|e| e.map(|e| (e.file_name().to_string_lossy().into_owned(), e.ino()))).collect()
    })
}

fn names(path: &Path) -> BTreeSet<String> {
    list(path).unwrap_or_else(|e| panic!("listing {}: {e}", path.display())).into_keys().collect()
}

/// The files of a (real) directory: name → bytes.
fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap()))
        .collect()
}

/// Runs an external command under `timeout 60`; returns (success, stdout, stderr).
fn sh(program: &str, args: &[&OsStr]) -> (bool, String, String) {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60", program]).args(args);
    let f = run_command(cmd, Duration::from_secs(90));
    (f.status.success(), f.stdout, f.stderr)
}

fn os<P: AsRef<OsStr> + ?Sized>(p: &P) -> &OsStr {
    p.as_ref()
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// A safetensors file's layout, checked against the spec: 8-byte little-endian length, JSON
/// padded with spaces to 8-byte alignment, tensors contiguous from 0 to the end of the file.
/// Returns (name, start, end) in offset order, absolute in the file.
fn checked_layout(bytes: &[u8], what: &str) -> Vec<(String, u64, u64)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "{what}: header not 8-byte aligned");
    let json = &bytes[8..8 + n];
    let text_end = json.iter().rposition(|b| *b != b' ').map_or(0, |p| p + 1);
    assert_eq!(json[text_end - 1], b'}', "{what}: the header does not end in a JSON object");
    let header: Value =
        serde_json::from_slice(&json[..text_end]).unwrap_or_else(|e| panic!("{what}: header JSON: {e}"));
    let mut tensors: Vec<(String, u64, u64)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            (k.clone(), o[0].as_u64().unwrap() + 8 + n as u64, o[1].as_u64().unwrap() + 8 + n as u64)
        })
        .collect();
    tensors.sort_by_key(|t| (t.1, t.2));
    let mut at = 8 + n as u64;
    for (name, start, end) in &tensors {
        assert_eq!(*start, at, "{what}: gap or overlap before {name}");
        assert!(end >= start);
        at = *end;
    }
    assert_eq!(at, bytes.len() as u64, "{what}: tensors do not end at the end of the file");
    tensors
}

/// The reference conversion of little-endian bf16 bytes to `to`.
fn convert_bf16(data: &[u8], to: Dtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 * to.size());
    for pair in data.chunks_exact(2) {
        let v = bf16::from_le_bytes([pair[0], pair[1]]).to_f32();
        match to {
            Dtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            _ => unreachable!(),
        }
    }
    out
}

fn shards() -> [&'static str; 2] {
    [SHARD1, SHARD2]
}

// ---------------------------------------------------------------------------------------------
// 1. Whole files: export, original, reference casts, header, index
// ---------------------------------------------------------------------------------------------

#[test]
fn files_equal_export_original_and_reference_casts() {
    let fx = Fixture::new();
    let m = fx.mount(&[]);
    let mp = m.path();
    assert_eq!(names(mp), ENTRIES.iter().map(|s| s.to_string()).collect());

    let mut mounted: BTreeMap<&str, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for name in ENTRIES {
        let exported = dir_files(&fx.export(name));
        let mut listed = names(&mp.join(name));
        assert!(listed.remove("deltas"), "{name}: no deltas/");
        assert_eq!(listed, exported.keys().cloned().collect(), "{name}: files differ from the export's");
        let mut files = BTreeMap::new();
        for (file, want) in &exported {
            let path = mp.join(name).join(file);
            assert_eq!(stat(&path).unwrap().len(), want.len() as u64, "{name}/{file}: stat size");
            let got = read(&path);
            assert_same_bytes(&got, want, &format!("{name}/{file} vs export"));
            files.insert(file.clone(), got);
        }
        mounted.insert(name, files);
    }

    // The base's files are the original files (tokenizer_config.json may gain a chat_template).
    let original = dir_files(&fx.model);
    assert_eq!(mounted["base"].keys().collect::<Vec<_>>(), original.keys().collect::<Vec<_>>());
    for (file, want) in &original {
        let got = &mounted["base"][file];
        if file == "tokenizer_config.json" && got != want {
            let (g, w): (Value, Value) =
                (serde_json::from_slice(got).unwrap(), serde_json::from_slice(want).unwrap());
            for (k, v) in w.as_object().unwrap() {
                assert_eq!(&g[k], v, "tokenizer_config.json: key {k} changed");
            }
            assert!(g["chat_template"].is_string(), "tokenizer_config.json differs but has no chat_template");
        } else {
            assert_same_bytes(got, want, &format!("base/{file} vs the original"));
        }
    }

    // Casts: same tensors in the same order, bit patterns of the reference conversion.
    let base_index: Value = serde_json::from_slice(&mounted["base"][INDEX]).unwrap();
    for (name, dtype, st_dtype) in
        [("f16", Dtype::F16, safetensors::Dtype::F16), ("f32", Dtype::F32, safetensors::Dtype::F32)]
    {
        let mut total = 0u64;
        for shard in shards() {
            let what = format!("{name}/{shard}");
            let (base_bytes, var_bytes) = (&mounted["base"][shard], &mounted[name][shard]);
            let layout = checked_layout(var_bytes, &what);
            let base_st = SafeTensors::deserialize(base_bytes).unwrap();
            let var_st =
                SafeTensors::deserialize(var_bytes).unwrap_or_else(|e| panic!("{what}: safetensors: {e:?}"));
            let base_order = SafeTensors::read_metadata(base_bytes).unwrap().1.offset_keys();
            let (_, var_meta) = SafeTensors::read_metadata(var_bytes).unwrap();
            assert_eq!(
                var_meta.offset_keys(),
                base_order,
                "{what}: tensor names or order differ from the base's"
            );
            assert_eq!(layout.iter().map(|t| t.0.clone()).collect::<Vec<_>>(), base_order);
            assert_eq!(
                var_meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str),
                Some("pt"),
                "{what}: __metadata__.format"
            );
            for t in &base_order {
                let (b, v) = (base_st.tensor(t).unwrap(), var_st.tensor(t).unwrap());
                assert_eq!(b.dtype(), safetensors::Dtype::BF16);
                assert_eq!(v.dtype(), st_dtype, "{what}: {t} dtype");
                assert_eq!(v.shape(), b.shape(), "{what}: {t} shape");
                assert_same_bytes(
                    v.data(),
                    &convert_bf16(b.data(), dtype),
                    &format!("{what}: tensor {t} vs the reference cast"),
                );
                total += v.data().len() as u64;
            }
        }
        let index: Value =
            serde_json::from_slice(&mounted[name][INDEX]).unwrap_or_else(|e| panic!("{name}/{INDEX}: {e}"));
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total), "{name}/{INDEX}: total_size");
        assert_eq!(index["weight_map"], base_index["weight_map"], "{name}/{INDEX}: weight_map");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Random preads
// ---------------------------------------------------------------------------------------------

#[test]
fn random_preads_match_export() {
    let fx = Fixture::new();
    let want = Arc::new(fs::read(fx.export("f32").join(SHARD1)).unwrap());
    // A cache of two chunks: decoded chunks are evicted and decoded again.
    let m = fx.mount(&["--cache-size", "4MiB"]);
    let path = m.path().join("f32").join(SHARD1);
    // Offsets near tensor starts and chunk boundaries are where off-by-ones live.
    let mut edges = vec![0u64, 8];
    for (_, start, end) in checked_layout(&want, "f32 export") {
        edges.extend([start, end]);
        edges.extend((start..end).step_by(2 * MIB as usize).skip(1));
    }
    with_deadline("2000 preads", Duration::from_secs(300), move || {
        let file = File::open(&path).unwrap();
        let size = want.len() as u64;
        assert_eq!(file.metadata().unwrap().len(), size);
        let mut rng = SplitMix64(0x5eed_0f11_f5ed);
        let mut buf = vec![0u8; 3 * MIB as usize];
        for i in 0..2000 {
            if i % 50 == 0 {
                // Drop the page cache now and then, so the daemon serves reads again.
                // SAFETY: fadvise on an open fd.
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
            let r = rng.next_u64();
            let len = match r % 8 {
                0 => 0,
                1 => rng.next_u64() % 4097,
                _ => rng.next_u64() % (3 * MIB + 1),
            } as usize;
            let offset = match (r >> 8) % 10 {
                0 => size + rng.next_u64() % (4 * MIB),
                1 => size.saturating_sub(rng.next_u64() % 65536),
                2 | 3 => {
                    let e = edges[(rng.next_u64() % edges.len() as u64) as usize];
                    (e + rng.next_u64() % 64).saturating_sub(32)
                }
                _ => rng.next_u64() % size,
            };
            let n = file
                .read_at(&mut buf[..len], offset)
                .unwrap_or_else(|e| panic!("pread #{i} ({offset}, {len}): {e}"));
            let (from, to) =
                (offset.min(size) as usize, (offset.saturating_add(len as u64)).min(size) as usize);
            assert_eq!(n, to - from, "pread #{i} ({offset}, {len}) of a {size}-byte file: byte count");
            assert_same_bytes(&buf[..n], &want[from..to], &format!("pread #{i} ({offset}, {len})"));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 3. mmap
// ---------------------------------------------------------------------------------------------

/// Maps `len` bytes at `offset` of `path` and copies them out, touching pages in a random order
/// first (faults out of order) — all under a deadline.
fn mmap_read(path: &Path, offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let p = path.to_owned();
    with_deadline(&format!("mmap of {}", path.display()), OP, move || {
        let file = File::open(&p).unwrap();
        // SAFETY: a fresh read-only private mapping of an open file, unmapped below; the file is
        // immutable while mounted.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        // SAFETY: the mapping is `len` bytes long and lives until munmap.
        let slice = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        let pages = len.div_ceil(4096);
        let mut rng = SplitMix64(seed);
        let mut sum = 0u64;
        for _ in 0..pages {
            sum = sum.wrapping_add(slice[(rng.next_u64() as usize % pages) * 4096] as u64);
        }
        std::hint::black_box(sum);
        let out = slice.to_vec();
        // SAFETY: unmapping what we mapped; `slice` is not used after.
        unsafe { libc::munmap(ptr, len) };
        out
    })
}

#[test]
fn mmap_reads_the_same_bytes() {
    let fx = Fixture::new();
    let m = fx.mount(&["--cache-size", "8MiB"]);
    for (name, file) in [("f32", SHARD1), ("f16", SHARD2), ("base", SHARD1), ("f32", INDEX)] {
        let want = fs::read(fx.export(name).join(file)).unwrap();
        let path = m.path().join(name).join(file);
        assert_same_bytes(&mmap_read(&path, 0, want.len(), 1), &want, &format!("mmap of {name}/{file}"));
        if want.len() as u64 > 3 * MIB {
            // A window at a page-aligned offset, ending mid-page.
            let (off, len) = (MIB + 4096 * 3, (MIB + MIB / 2 + 123) as usize);
            let got = mmap_read(&path, off, len, 2);
            assert_same_bytes(
                &got,
                &want[off as usize..off as usize + len],
                &format!("mmap window of {name}/{file}"),
            );
        }
    }
}

/// Python's `open` asks every file it opens whether it is a terminal (TCGETS): the mount answers
/// ENOTTY as any regular file does, rather than ENOSYS with a warning in the log per open.
#[test]
fn a_terminal_ioctl_is_enotty_without_a_log_line() {
    let fx = Fixture::new();
    let m = fx.mount(&[]);
    for name in ["f32", "base"] {
        let f = File::open(m.path().join(name).join(SHARD1)).unwrap();
        let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: TCGETS writes at most one termios into the buffer given.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, termios.as_mut_ptr()) };
        assert_eq!(r, -1, "TCGETS on {name}/{SHARD1} succeeded");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTTY),
            "TCGETS on {name}/{SHARD1}"
        );
    }
    let log = m.log_text();
    assert!(!log.contains("Not Implemented"), "the daemon logged an unimplemented request:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// 4. Standard tools: cp -r, diff, ls -l, du -b, sha256sum
// ---------------------------------------------------------------------------------------------

fn sha256s(dir: &Path, files: &[String]) -> BTreeMap<String, String> {
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    let args: Vec<&OsStr> = paths.iter().map(|p| p.as_os_str()).collect();
    let (ok, out, err) = sh("sha256sum", &args);
    assert!(ok, "sha256sum in {}: {err}", dir.display());
    out.lines()
        .map(|l| {
            let (hash, path) = l.split_once("  ").unwrap();
            (Path::new(path).file_name().unwrap().to_string_lossy().into_owned(), hash.to_owned())
        })
        .collect()
}

#[test]
fn standard_tools_see_the_exported_files() {
    let fx = Fixture::new();
    let m = fx.mount(&[]);
    let copies = fx.root().join("copies");
    fs::create_dir_all(&copies).unwrap();
    for name in ENTRIES {
        let export = fx.export(name);
        let sizes: BTreeMap<String, u64> = fs::read_dir(&export)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
            .collect();
        let src = m.path().join(name);

        let copy = copies.join(name);
        let (ok, _, err) = sh("cp", &[os("-r"), src.as_os_str(), copy.as_os_str()]);
        assert!(ok, "cp -r {}: {err}", src.display());
        let (ok, out, err) =
            sh("diff", &[os("-r"), os("-x"), os("deltas"), copy.as_os_str(), export.as_os_str()]);
        assert!(ok, "diff -r of the copy of {name} and its export:\n{out}{err}");
        assert!(copy.join("deltas").is_dir(), "cp -r did not copy {name}/deltas/");
        assert_eq!(fs::read_dir(copy.join("deltas")).unwrap().count(), 0, "{name}/deltas/ is not empty");
        for file in sizes.keys() {
            let (ok, out, err) = sh("cmp", &[src.join(file).as_os_str(), export.join(file).as_os_str()]);
            assert!(ok, "cmp {name}/{file}: {out}{err}");
        }

        let (ok, out, err) = sh("ls", &[os("-l"), src.as_os_str()]);
        assert!(ok, "ls -l: {err}");
        let mut listed = BTreeMap::new();
        for line in out.lines().filter(|l| l.starts_with('-')) {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f[0], "-r--r--r--", "ls -l: {line}");
            listed.insert(f[f.len() - 1].to_owned(), f[4].parse::<u64>().unwrap());
        }
        assert_eq!(listed, sizes, "ls -l {name}: sizes");
        assert!(
            out.lines().any(|l| l.starts_with('d') && l.ends_with(" deltas")),
            "ls -l {name}: no deltas dir:\n{out}"
        );

        let (ok, out, err) = sh("du", &[os("-sb"), src.as_os_str()]);
        assert!(ok, "du -sb: {err}");
        let du: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(du, sizes.values().sum::<u64>(), "du -sb {name}");

        let files: Vec<String> = sizes.keys().cloned().collect();
        assert_eq!(sha256s(&src, &files), sha256s(&export, &files), "sha256sum {name}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Python's safetensors
// ---------------------------------------------------------------------------------------------

const PY_CHECKSUMS: &str = r#"
import sys
import numpy as np
from safetensors import safe_open
for path in sys.argv[1:]:
    with safe_open(path, framework="numpy") as f:
        for k in f.keys():
            a = f.get_tensor(k)
            assert a.dtype == np.float32, (k, a.dtype)
            s = int(np.ascontiguousarray(a).view(np.uint32).astype(np.uint64).sum())
            print(k, "x".join(str(d) for d in a.shape), s)
"#;

#[test]
fn python_safetensors_loads_the_f32_cast() {
    let (ok, _, err) = sh("python3", &[os("-c"), os("import safetensors, numpy")]);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("python3 with safetensors and numpy is needed (pip install safetensors numpy): {err}");
        }
        eprintln!("note: skipping: python3 cannot import safetensors and numpy (pip install safetensors numpy): {err}");
        return;
    }
    let fx = Fixture::new();
    let m = fx.mount(&[]);
    // Expected: from the exported bytes, in Rust.
    let mut want = BTreeMap::new();
    for shard in shards() {
        let bytes = fs::read(fx.export("f32").join(shard)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let sum = view
                .data()
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes(w.try_into().unwrap()) as u64)
                .fold(0u64, u64::wrapping_add);
            let shape = view.shape().iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
            want.insert(name, format!("{shape} {sum}"));
        }
    }
    let paths: Vec<PathBuf> = shards().iter().map(|s| m.path().join("f32").join(s)).collect();
    let mut args = vec![os("-c"), os(PY_CHECKSUMS)];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let (ok, out, err) = sh("python3", &args);
    assert!(ok, "python3 safe_open on the mount failed:\n{err}");
    let got: BTreeMap<String, String> = out
        .lines()
        .map(|l| {
            let (name, rest) = l.split_once(' ').unwrap();
            (name.to_owned(), rest.to_owned())
        })
        .collect();
    assert_eq!(got.len(), common::tensor_count(&spec()));
    assert_eq!(got, want, "tensors as Python's safetensors reads them from the mount");
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrent readers
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_readers_match_export() {
    let fx = Fixture::new();
    let jobs = [
        ("f32", SHARD1),
        ("f32", SHARD1),
        ("f32", SHARD2),
        ("f16", SHARD1),
        ("f16", SHARD1),
        ("f16", SHARD2),
        ("base", SHARD2),
        ("f32", INDEX),
    ];
    let want: BTreeMap<(&str, &str), Arc<Vec<u8>>> =
        jobs.iter().map(|&(n, f)| ((n, f), Arc::new(fs::read(fx.export(n).join(f)).unwrap()))).collect();
    // Smaller than what the readers decode together: they contend for the cache.
    let m = fx.mount(&["--cache-size", "8MiB"]);
    let barrier = Arc::new(Barrier::new(jobs.len()));
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, &(name, file)) in jobs.iter().enumerate() {
        let (path, want, barrier, tx) =
            (m.path().join(name).join(file), want[&(name, file)].clone(), barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(|| {
                let f = File::open(&path).unwrap();
                let piece = 131_071 * (i + 1);
                let mut offsets: Vec<usize> = (0..want.len()).step_by(piece).collect();
                if i % 2 == 1 {
                    offsets.reverse();
                }
                let mut buf = vec![0u8; piece];
                barrier.wait();
                for off in offsets {
                    let end = (off + piece).min(want.len());
                    f.read_exact_at(&mut buf[..end - off], off as u64)
                        .unwrap_or_else(|e| panic!("reader {i}: {}: {e}", path.display()));
                    assert_same_bytes(
                        &buf[..end - off],
                        &want[off..end],
                        &format!("reader {i}: {} at {off}", path.display()),
                    );
                }
            });
            let _ = tx.send((
                i,
                result.map_err(|p| p.downcast_ref::<String>().cloned().unwrap_or_else(|| "panicked".into())),
            ));
        });
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(180);
    for _ in 0..jobs.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, r) = rx.recv_timeout(left).expect("concurrent readers did not finish within 180 s");
        if let Err(e) = r {
            panic!("reader {i} ({:?}): {e}", jobs[i]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. A base changed after add
// ---------------------------------------------------------------------------------------------

#[test]
fn changed_base_gives_eio_and_a_log_line() {
    if common::skip_on_s3(
        "add uploads the base to the bucket: changing its source changes nothing llmfs reads",
    ) {
        return;
    }
    let fx = Fixture::new();
    let (shard1, shard2) = (fx.model.join(SHARD1), fx.model.join(SHARD2));
    // Exports refuse a changed base too: make them first.
    let (f16_export, base_export) = (fx.export("f16"), fx.export("base"));

    // (a) A size change while mounted: opens of files reading from it fail with EIO.
    {
        let m = fx.mount(&[]);
        let mp = m.path();
        assert_same_bytes(
            &read(&mp.join("f16").join(SHARD2)),
            &fs::read(f16_export.join(SHARD2)).unwrap(),
            "f16 before the change",
        );
        let f = fs::OpenOptions::new().append(true).open(&shard2).unwrap();
        (&f).write_all(b"x").unwrap();
        drop(f);
        assert_eq!(
            fs::metadata(&shard2).unwrap().len(),
            fs::metadata(base_export.join(SHARD2)).unwrap().len() + 1
        );
        for name in ["f16", "base"] {
            assert_eq!(
                errno_of(try_open(&mp.join(name).join(SHARD2))),
                Some(libc::EIO),
                "open of {name}/{SHARD2} after its base grew"
            );
        }
        let line = m.wait_log_line(&[SHARD2, "changed"], Duration::from_secs(5));
        assert!(line.is_some(), "no log line names {SHARD2} as changed:\n{}", m.log_text());
        eprintln!("log: {}", line.unwrap());
        // Files that do not read from it are still served.
        assert_same_bytes(
            &read(&mp.join("f16").join(SHARD1)),
            &fs::read(f16_export.join(SHARD1)).unwrap(),
            "f16 shard 1",
        );
        let f = fx.ts.run(["check", "f16"]);
        assert!(!f.0.success(), "llmfs check f16 passed with a changed base");
        assert!(
            f.1.contains(SHARD2) || f.2.contains(SHARD2),
            "llmfs check does not name {SHARD2}:\n{}{}",
            f.1,
            f.2
        );
    }

    // (b) A content change that keeps size and mtime: a fresh mount's first open verifies the
    // sampled hash and fails.
    let meta = fs::metadata(&shard1).unwrap();
    let offset = meta.len() / 2;
    assert!(offset < 4 * MIB, "the changed byte must be in the fingerprint's whole-hashed head");
    let f = fs::OpenOptions::new().read(true).write(true).open(&shard1).unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, offset).unwrap();
    f.write_all_at(&[byte[0] ^ 0x5a], offset).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(meta.modified().unwrap())).unwrap();
    drop(f);
    let after = fs::metadata(&shard1).unwrap();
    assert_eq!(
        (after.len(), after.mtime(), after.mtime_nsec()),
        (meta.len(), meta.mtime(), meta.mtime_nsec())
    );

    let m = fx.mount(&[]);
    let mp = m.path();
    assert_eq!(
        errno_of(try_open(&mp.join("f32").join(SHARD1))),
        Some(libc::EIO),
        "first open of f32/{SHARD1} in a fresh mount"
    );
    assert_eq!(errno_of(try_open(&mp.join("base").join(SHARD1))), Some(libc::EIO), "open of base/{SHARD1}");
    let line = m.wait_log_line(&[SHARD1, "hash"], Duration::from_secs(5));
    assert!(line.is_some(), "no log line names {SHARD1} and its changed hash:\n{}", m.log_text());
    eprintln!("log: {}", line.unwrap());
    // Files that do not read from the shards are still served: the base's config.json, with
    // the cast's dtype.
    let served: serde_json::Value =
        serde_json::from_slice(&read(&mp.join("f32").join("config.json"))).unwrap();
    let mut want: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.model.join("config.json")).unwrap()).unwrap();
    want["dtype"] = "float32".into();
    if want.get("torch_dtype").is_some() {
        want["torch_dtype"] = "float32".into();
    }
    assert_eq!(served, want, "f32/config.json");
}

/// A base file truncated while a cast that reads it is open: the daemon reads bases through
/// mappings, where a page past the new end raises SIGBUS. The read answers EIO, and the daemon
/// lives on and serves the rest. (Without the disk cache, so the cast is decoded on the read
/// path after the truncation, one request at a time.)
#[test]
fn a_base_truncated_under_an_open_cast_gives_eio_not_a_dead_daemon() {
    if common::skip_on_s3(
        "add uploads the base to the bucket: truncating its source changes nothing llmfs reads",
    ) {
        return;
    }
    let fx = Fixture::new();
    let f16_export = fx.export("f16");
    let shard1 = fx.model.join(SHARD1);
    let m = fx.mount(&["--disk-cache", "0", "--cache-size", "4MiB"]);
    let path = m.path().join("f16").join(SHARD1);
    let want = fs::read(f16_export.join(SHARD1)).unwrap();
    let f = File::open(&path).unwrap();
    let mut head = vec![0u8; 1 << 20];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_same_bytes(&head, &want[..head.len()], "f16 head before the truncation");
    let len = fs::metadata(&shard1).unwrap().len();
    fs::OpenOptions::new().write(true).open(&shard1).unwrap().set_len(len / 2).unwrap();
    let tail = want.len() - (1 << 20);
    let got = with_deadline("a read after the truncation", Duration::from_secs(60), move || {
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact_at(&mut buf, tail as u64).map(|()| buf)
    });
    assert_eq!(errno_of(got), Some(libc::EIO), "read of f16/{SHARD1}'s tail after its base was truncated");
    // The daemon is alive: files that do not read from the truncated shard are still served.
    assert_same_bytes(
        &read(&m.path().join("f16").join(SHARD2)),
        &fs::read(f16_export.join(SHARD2)).unwrap(),
        "f16 shard 2 after shard 1's base was truncated",
    );
    assert!(!pid_dead(m.pid().unwrap()), "the daemon died");
}

// ---------------------------------------------------------------------------------------------
// 8. Entries added and removed while mounted
// ---------------------------------------------------------------------------------------------

/// Polls the listing of `dir` until `pred` holds; returns how long it took.
fn wait_listing(dir: &Path, timeout: Duration, pred: impl Fn(&BTreeSet<String>) -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if pred(&names(dir)) {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn entries_appear_and_vanish_while_mounted() {
    let fx = Fixture::new();
    let m = fx.mount(&[]);
    let mp = m.path();
    assert_eq!(names(mp).len(), 3);

    fx.ok(&["cast", "late-f16", "--base", "base", "--dtype", "f16"]);
    fx.ok(&["add", "late-base", fx.model.to_str().unwrap()]);
    let took =
        wait_listing(mp, Duration::from_millis(2500), |n| n.contains("late-f16") && n.contains("late-base"));
    assert!(took.is_some(), "new entries not listed after 2.5 s: {:?}", names(mp));
    for (name, file) in [("late-f16", SHARD2), ("late-base", "config.json")] {
        let want = fs::read(fx.export(name).join(file)).unwrap();
        assert_same_bytes(&read(&mp.join(name).join(file)), &want, &format!("{name}/{file}"));
    }

    fx.ok(&["rm", "late-f16"]);
    fx.ok(&["rm", "late-base"]);
    let took = wait_listing(mp, Duration::from_millis(2500), |n| {
        !n.contains("late-f16") && !n.contains("late-base")
    });
    assert!(took.is_some(), "removed entries still listed after 2.5 s: {:?}", names(mp));
    let start = Instant::now();
    while stat(&mp.join("late-f16")).is_ok() {
        assert!(
            start.elapsed() < Duration::from_millis(2500),
            "late-f16 can still be looked up 2.5 s after rm"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(errno_of(stat(&mp.join("late-f16"))), Some(libc::ENOENT));
    assert_eq!(names(mp), ENTRIES.iter().map(|s| s.to_string()).collect());
}

// ---------------------------------------------------------------------------------------------
// 9. Chat template, deltas/
// ---------------------------------------------------------------------------------------------

#[test]
fn chat_template_and_empty_deltas_dirs() {
    let fx = Fixture::new();
    fx.ok(&["add", "chat", fx.model.to_str().unwrap(), "--chat-template", "vicuna_v1.1"]);
    let m = fx.mount(&[]);
    let mp = m.path();
    let path = mp.join("chat").join("tokenizer_config.json");
    let bytes = read(&path);
    assert_eq!(stat(&path).unwrap().len(), bytes.len() as u64, "stat size of tokenizer_config.json");
    let v: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("tokenizer_config.json through the mount is not JSON ({e})"));
    let template = v["chat_template"].as_str().expect("a chat_template string");
    assert!(!template.trim().is_empty());
    let original: Value =
        serde_json::from_slice(&fs::read(fx.model.join("tokenizer_config.json")).unwrap()).unwrap();
    for (k, val) in original.as_object().unwrap() {
        assert_eq!(&v[k], val, "tokenizer_config.json: key {k}");
    }
    assert_same_bytes(
        &bytes,
        &fs::read(fx.export("chat").join("tokenizer_config.json")).unwrap(),
        "tokenizer_config.json vs export",
    );

    let entries = names(mp);
    assert_eq!(entries.len(), 4);
    for e in &entries {
        let deltas = mp.join(e).join("deltas");
        assert!(stat(&deltas).unwrap().is_dir(), "{e}/deltas is not a directory");
        assert!(list(&deltas).unwrap().is_empty(), "{e}/deltas is not empty");
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Daemon mode, stale mounts
// ---------------------------------------------------------------------------------------------

/// Whether process `pid` has exited (reaped, or a zombie).
fn pid_dead(pid: libc::pid_t) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// `llmfs umount` while processes still use the mount, as a loader that keeps its safetensors
/// mapped or a shell `cd`'d into it does: the mount is detached at once, but the daemon (and its
/// disk cache) stays until they let go. `umount` names them (a child with a file open, this
/// process with a mapping whose descriptor is closed) instead of waiting in silence, and
/// returns once they have let go and the daemon has ended.
#[test]
fn umount_names_what_holds_the_mount_and_returns_when_it_is_let_go() {
    let fx = Fixture::new();
    let guard = DaemonGuard::new(&fx.root().join("busy"));
    let mp = guard.path.clone();
    let mps = mp.to_str().unwrap();
    fx.ok(&["mount", mps]);
    let file = mp.join("f16").join(SHARD2);
    let mut child = Command::new("sleep").arg("3").stdin(File::open(&file).unwrap()).spawn().unwrap();
    let len = fs::metadata(&file).unwrap().len() as usize;
    let map = {
        let f = File::open(&file).unwrap();
        // SAFETY: a new read-only shared mapping of a whole file; unmapped below, never read.
        unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) }
    };
    assert_ne!(map, libc::MAP_FAILED, "mmap of {}", file.display());
    let map = map as usize;
    let unmapper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: the mapping made above, not used by anything else.
        unsafe { libc::munmap(map as *mut libc::c_void, len) };
    });
    let start = Instant::now();
    let f = fx.ts.run_full(["umount", mps]);
    let waited = start.elapsed();
    child.wait().unwrap();
    unmapper.join().unwrap();
    assert!(f.status.success(), "llmfs umount: {}", f.stderr);
    assert!(!llmfs_mounted(&mp), "still mounted after llmfs umount");
    for who in [format!("{} (sleep)", child.id()), format!("{} (", std::process::id())] {
        assert!(f.stderr.contains(&who), "umount did not name {who}: {}", f.stderr);
    }
    assert!(waited >= Duration::from_millis(2500), "returned after {waited:?}, before the child let go");
    assert!(daemon_pids(&mp).is_empty(), "umount returned before its daemon ended");
}

#[test]
fn daemon_mode_and_stale_mounts() {
    let fx = Fixture::new();
    let guard = DaemonGuard::new(&fx.root().join("dmnt"));
    let mp = guard.path.clone();
    let mps = mp.to_str().unwrap();
    let config = fs::read(fx.export("f16").join(SHARD2)).unwrap();

    // Mounted and serving when `llmfs mount` returns.
    fx.ok(&["mount", mps]);
    assert!(llmfs_mounted(&mp));
    assert_eq!(names(&mp), ENTRIES.iter().map(|s| s.to_string()).collect(), "ls right after llmfs mount");
    assert_same_bytes(&read(&mp.join("f16").join(SHARD2)), &config, "f16 through the daemon");
    assert_eq!(daemon_pids(&mp).len(), 1, "one daemon");

    fx.ok(&["umount", mps]);
    assert!(!llmfs_mounted(&mp), "still mounted after llmfs umount");
    assert!(names(&mp).is_empty(), "the mount point is not empty after umount");
    assert!(
        wait_until(Duration::from_secs(10), || daemon_pids(&mp).is_empty()),
        "the daemon did not exit after umount"
    );
    let log = fs::read_to_string(fx.ts.store.join("llmfs.log")).unwrap_or_default();
    assert!(log.contains("serving"), "STORE/llmfs.log has no 'serving' line:\n{log}");

    // kill -9: the mount is stale (ENOTCONN) until `llmfs umount` clears it.
    fx.ok(&["mount", mps]);
    let pids = daemon_pids(&mp);
    assert_eq!(pids.len(), 1, "one daemon");
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    // Gone or a zombie: its files (the FUSE device) are closed by then.
    assert!(wait_until(Duration::from_secs(10), || pid_dead(pids[0])), "the daemon survived kill -9");
    assert!(llmfs_mounted(&mp), "the stale mount vanished by itself");
    let stale = errno_of(stat(&mp.join("f16")));
    assert!(matches!(stale, Some(libc::ENOTCONN | libc::ECONNABORTED)), "a stale mount's stat: {stale:?}");
    let f = fx.ts.run(["mount", mps]);
    assert!(!f.0.success(), "llmfs mount over a stale mount succeeded");
    assert!(f.2.contains("dead llmfs mount") && f.2.contains("llmfs umount"), "no hint: {}", f.2);
    fx.ok(&["umount", mps]);
    assert!(!llmfs_mounted(&mp), "the stale mount is still there after llmfs umount");

    // A new mount serves again.
    fx.ok(&["mount", mps]);
    assert_same_bytes(&read(&mp.join("f16").join(SHARD2)), &config, "f16 after remounting");
    fx.ok(&["umount", mps]);
    assert!(!llmfs_mounted(&mp));
    drop(guard);
}

/// kill -9 of the daemon while 8 readers are busy decoding (a cache of two chunks and no disk
/// cache keep every reader going to the daemon): each reader gets the right bytes or an error — never wrong
/// bytes — and none hangs; `llmfs umount` then clears the dead mount and a new one serves.
#[test]
fn kill_9_during_reads_under_load() {
    let fx = Fixture::new();
    let jobs = [("f32", SHARD1), ("f16", SHARD1), ("f32", SHARD2), ("f16", SHARD2)];
    let want: BTreeMap<(&str, &str), Arc<Vec<u8>>> =
        jobs.iter().map(|&(n, f)| ((n, f), Arc::new(fs::read(fx.export(n).join(f)).unwrap()))).collect();
    let guard = DaemonGuard::new(&fx.root().join("kmnt"));
    let mp = guard.path.clone();
    let mps = mp.to_str().unwrap();
    // No disk cache: decoded copies would be read by the kernel, never reaching the daemon
    // (tests/disk_cache.rs kills it during a fill).
    fx.ok(&["mount", mps, "--cache-size", "4MiB", "--disk-cache", "0"]);
    let pids = daemon_pids(&mp);
    assert_eq!(pids.len(), 1, "one daemon");

    // Each reader: random preads, each checked, until the first error (the daemon is gone).
    let readers = 8;
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..readers {
        let (name, file) = jobs[i % jobs.len()];
        let (path, want, tx) = (mp.join(name).join(file), want[&(name, file)].clone(), tx.clone());
        let (served, killed) = (served.clone(), killed.clone());
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(|| {
                let f = File::open(&path).unwrap();
                let mut rng = SplitMix64(i as u64 + 1);
                let mut buf = vec![0u8; 3 * MIB as usize];
                loop {
                    // SAFETY: fadvise on an open fd; drops the page cache so reads reach the daemon.
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                    let offset = rng.next_u64() % want.len() as u64;
                    let len = 1 + (rng.next_u64() % (3 * MIB)) as usize;
                    let end = (offset as usize + len).min(want.len());
                    match f.read_at(&mut buf[..len], offset) {
                        // A read cut short by the kill returns what had arrived: a prefix.
                        Ok(n)
                            if n < end - offset as usize
                                && killed.load(std::sync::atomic::Ordering::SeqCst) =>
                        {
                            assert_same_bytes(
                                &buf[..n],
                                &want[offset as usize..][..n],
                                &format!("reader {i}: short pread ({offset}, {len})"),
                            );
                        }
                        Ok(n) => {
                            assert_same_bytes(
                                &buf[..n],
                                &want[offset as usize..end],
                                &format!("reader {i}: pread ({offset}, {len})"),
                            );
                            served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(e) => return e.raw_os_error(),
                    }
                }
            });
            let _ = tx.send((
                i,
                result.map_err(|p| p.downcast_ref::<String>().cloned().unwrap_or_else(|| "panicked".into())),
            ));
        });
    }
    drop(tx);
    assert!(
        wait_until(Duration::from_secs(60), || served.load(std::sync::atomic::Ordering::SeqCst)
            >= 4 * readers),
        "the readers did not get going"
    );
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    for _ in 0..readers {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, r) = rx.recv_timeout(left).expect("a reader hung after kill -9 of the daemon");
        match r {
            Ok(errno) => assert!(
                matches!(errno, Some(libc::ENOTCONN | libc::ECONNABORTED | libc::EIO)),
                "reader {i} ended with errno {errno:?}"
            ),
            Err(e) => panic!("reader {i}: {e}"),
        }
    }
    assert!(wait_until(Duration::from_secs(10), || pid_dead(pids[0])), "the daemon survived kill -9");

    fx.ok(&["umount", mps]);
    assert!(!llmfs_mounted(&mp), "the dead mount is still there after llmfs umount");
    fx.ok(&["mount", mps]);
    assert_same_bytes(&read(&mp.join("f32").join(SHARD2)), &want[&("f32", SHARD2)], "f32 after remounting");
    fx.ok(&["umount", mps]);
    drop(guard);
}

// ---------------------------------------------------------------------------------------------
// 11. Stable inodes and mtimes
// ---------------------------------------------------------------------------------------------

/// (path relative to the mount) → (ino, size, mtime s, mtime ns), for the entry dirs and files.
fn snapshot(mp: &Path) -> BTreeMap<String, (u64, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    for (entry, dino) in list(mp).unwrap() {
        let dir = mp.join(&entry);
        let m = stat(&dir).unwrap();
        assert_eq!(m.ino(), dino, "{entry}: readdir's d_ino and stat's differ");
        out.insert(entry.clone(), (m.ino(), 0, m.mtime(), m.mtime_nsec()));
        for (file, fino) in list(&dir).unwrap() {
            let path = dir.join(&file);
            let (a, b) = (stat(&path).unwrap(), stat(&path).unwrap());
            assert_eq!(
                (a.ino(), a.len(), a.mtime(), a.mtime_nsec()),
                (b.ino(), b.len(), b.mtime(), b.mtime_nsec()),
                "{entry}/{file}: two stats differ"
            );
            assert_eq!(a.ino(), fino, "{entry}/{file}: readdir's d_ino and stat's differ");
            out.insert(
                format!("{entry}/{file}"),
                (a.ino(), if a.is_dir() { 0 } else { a.len() }, a.mtime(), a.mtime_nsec()),
            );
        }
    }
    out
}

#[test]
fn inodes_and_mtimes_are_stable() {
    let fx = Fixture::new();
    let m = fx.mount(&[]);
    let mp = m.path();
    let first = snapshot(mp);
    let inos: BTreeSet<u64> = first.values().map(|v| v.0).collect();
    assert_eq!(inos.len(), first.len(), "inode numbers are not unique");

    // Read a file, let the directories' attribute timeouts (1 s) pass and change the registry
    // (it is reloaded): the entry directories are looked up again; nothing may move.
    read(&mp.join("f16").join(SHARD1));
    std::thread::sleep(Duration::from_millis(1200));
    fx.ok(&["cast", "other", "--base", "base", "--dtype", "f32"]);
    assert!(wait_until(Duration::from_secs(3), || names(mp).contains("other")));
    let mut second = snapshot(mp);
    second.retain(|k, _| k != "other" && !k.starts_with("other/"));
    assert_eq!(second, first, "inodes, sizes or mtimes changed");

    // A re-lookup of every name without the kernel's caches: the daemon's answers (the same
    // code) are stable, for a fresh Fs too (inode numbers are per mount, mtimes are not).
    let store = fx.ts.open_store();
    let fs_ = llmfs::vfs::Fs::new(store, 1 << 20).unwrap();
    for entry in ENTRIES {
        let e1 = fs_.lookup(llmfs::vfs::ROOT_INO, entry).unwrap();
        let e2 = fs_.lookup(llmfs::vfs::ROOT_INO, entry).unwrap();
        assert_eq!(e1.ino, e2.ino, "{entry}: re-lookup gave another inode");
        for file in names(&mp.join(entry)) {
            let a = fs_.lookup(e1.ino, &file).unwrap();
            let b = fs_.lookup(e2.ino, &file).unwrap();
            assert_eq!(
                (a.ino, a.size, a.mtime),
                (b.ino, b.size, b.mtime),
                "{entry}/{file}: re-lookup differs"
            );
            let c = fs_.getattr(a.ino).unwrap();
            assert_eq!(
                (c.ino, c.size, c.mtime),
                (a.ino, a.size, a.mtime),
                "{entry}/{file}: getattr differs from lookup"
            );
            let (_, size, s, ns) = first[&format!("{entry}/{file}")];
            let mtime = a.mtime.duration_since(std::time::UNIX_EPOCH).unwrap();
            assert_eq!(
                (mtime.as_secs() as i64, mtime.subsec_nanos() as i64),
                (s, ns),
                "{entry}/{file}: mtime of a fresh Fs"
            );
            if !matches!(a.kind, llmfs::vfs::Kind::Dir) {
                assert_eq!(a.size, size);
            }
        }
    }
    drop(m);

    // A remount: same sizes and mtimes.
    let m2 = fx.mount(&[]);
    let mut third = snapshot(m2.path());
    third.retain(|k, _| k != "other" && !k.starts_with("other/"));
    let strip = |s: &BTreeMap<String, (u64, u64, i64, i64)>| {
        s.iter().map(|(k, v)| (k.clone(), (v.1, v.2, v.3))).collect::<BTreeMap<_, _>>()
    };
    assert_eq!(strip(&third), strip(&first), "sizes or mtimes changed across a remount");
}

/// Drop-behind: a sequential reader's chunks leave the cache once it is well past them (the
/// kernel's page cache holds those bytes), so streaming a file leaves the cache nearly empty;
/// random reads keep their chunks (LRU); both read the same bytes. Through `Fs` directly: the
/// kernel's read-ahead would make the request pattern of a real mount vary.
#[test]
fn sequential_readers_drop_chunks_behind_them() {
    let ts = TestStore::new();
    let model = ts.path("model");
    let big = ModelSpec {
        hidden: 1024,
        intermediate: 2816,
        layers: 2,
        heads: 8,
        kv_heads: 8,
        vocab: 4096,
        ..common::small_spec()
    };
    common::write_model(&model, &big);
    ts.ok(["add", "base", model.to_str().unwrap()]);
    ts.ok(["cast", "f16", "--base", "base", "--dtype", "f16"]);
    let fs = llmfs::vfs::Fs::new(ts.open_store(), 1 << 30).unwrap();
    let entry = fs.lookup(llmfs::vfs::ROOT_INO, "f16").unwrap();
    let file = fs.lookup(entry.ino, "model.safetensors").unwrap();
    assert!(file.size > 48 * MIB, "the test needs a file well over the drop-behind distance: {}", file.size);
    let read = |fh: u64, offset: u64| fs.read(fh, offset, MIB as u32, |r| r.unwrap().to_vec());

    let fh = fs.open(file.ino, false, false).unwrap().fh;
    let mut sequential = Vec::new();
    while (sequential.len() as u64) < file.size {
        sequential.extend(read(fh, sequential.len() as u64));
    }
    fs.release(fh);
    // What is left: the last MAX_PREFETCH (16 MiB) read and what the prefetcher decoded ahead.
    let left = fs.cache().stats().used_bytes;
    assert!(left <= 40 * MIB, "a sequential read of {} MiB left {} MiB cached", file.size / MIB, left / MIB);

    // Random 1 MiB reads (a permutation of the file's pieces): no drop-behind, the same bytes.
    let pieces = file.size.div_ceil(MIB);
    let stride = if pieces % 37 == 0 { 41 } else { 37 }; // coprime with `pieces` (both prime)
    let fh = fs.open(file.ino, false, false).unwrap().fh;
    let mut random = vec![0u8; file.size as usize];
    for i in 0..pieces {
        let offset = (i * stride % pieces) * MIB;
        let bytes = read(fh, offset);
        random[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
    }
    fs.release(fh);
    assert_same_bytes(&random, &sequential, "random reads vs a sequential read");
    let kept = fs.cache().stats().used_bytes;
    assert!(kept >= file.size * 9 / 10, "random reads kept {} MiB of {} MiB", kept / MIB, file.size / MIB);
}

/// The daemon's peak RSS (VmHWM) and current RSS (VmRSS), in bytes.
fn daemon_memory(pid: libc::pid_t) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon's /proc status");
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Fills through a shared mapping (`LLMFS_FILL_BY_MAPPING=1`) give back each piece's pages as
/// it is written, so decoding a file much larger than the bound leaves the daemon's peak RSS
/// within `--cache-size` + 64 MiB over what it had once mounted, into the disk cache and into
/// the memory tier (a memfd: the pages given back stay in it); the bytes read are the export's.
/// With `LLMFS_FILL_DROP_MAPPED=0` the same fill counts the file in the peak, which shows the
/// measure sees the pages.
#[test]
fn mapped_fills_keep_the_daemon_small() {
    let mut ts = TestStore::new();
    let model = ts.path("model");
    // 68M elements: 136 MB in bf16, a 272 MB f32 cast.
    let big = ModelSpec {
        hidden: 1024,
        intermediate: 2816,
        layers: 4,
        heads: 8,
        kv_heads: 8,
        vocab: 8192,
        ..common::small_spec()
    };
    common::write_model(&model, &big);
    ts.ok(["add", "base", model.to_str().unwrap()]);
    ts.ok(["cast", "f32", "--base", "base", "--dtype", "f32"]);
    let root = ts.tmp.path().canonicalize().unwrap();
    let export = root.join("export");
    ts.ok(["export", "f32", export.to_str().unwrap()]);
    let want = fs::read(export.join("model.safetensors")).unwrap();
    let size = want.len() as u64;
    const CACHE_SIZE: u64 = 16 * MIB;
    assert!(size > 3 * (CACHE_SIZE + 64 * MIB), "the file must be well over the bound: {size}");

    ts.env.push(("LLMFS_FILL_BY_MAPPING".into(), "1".into()));
    // (drop the mapped pages, memory tier size, what the peak is checked against)
    let cases = [("1", "0", true), ("1", "1GiB", true), ("0", "0", false)];
    for (n, (drop, memory, bounded)) in cases.into_iter().enumerate() {
        ts.env.retain(|(k, _)| k != "LLMFS_FILL_DROP_MAPPED");
        ts.env.push(("LLMFS_FILL_DROP_MAPPED".into(), drop.into()));
        let what = format!("LLMFS_FILL_DROP_MAPPED={drop}, --memory-cache-size {memory}");
        let cache = root.join(format!("cache{n}"));
        let m = MountGuard::new(
            &ts,
            &root.join(format!("mnt{n}")),
            &[
                "--cache-size",
                &CACHE_SIZE.to_string(),
                "--disk-cache",
                cache.to_str().unwrap(),
                "--memory-cache-size",
                memory,
            ],
        );
        let pid = m.pid().unwrap();
        // `--backend auto` probes the GPU beside the mount (a Vulkan instance: tens of MiB with
        // lavapipe); the size once mounted is taken after it, so the bound is the fill's alone.
        assert!(
            m.wait_log_line(&["backend auto:"], Duration::from_secs(60)).is_some(),
            "{what}: no backend chosen within 60 s:\n{}",
            m.log_text()
        );
        let (_, mounted) = daemon_memory(pid);
        let got = read(&m.path().join("f32/model.safetensors"));
        let (peak, _) = daemon_memory(pid);
        assert_same_bytes(&got, &want, &what);
        let over = peak.saturating_sub(mounted);
        eprintln!(
            "{what}: {} MiB once mounted, peak {} MiB ({} MiB over)",
            mounted / MIB,
            peak / MIB,
            over / MIB
        );
        // On an object store the daemon also holds the GETs in flight that fetch the cast's
        // base into the disk cache: 8 parts of 8 MiB (`store::ReadOptions`' default).
        let fetching = if common::s3_mode() { 64 * MIB } else { 0 };
        if bounded {
            assert!(
                over <= CACHE_SIZE + 64 * MIB + fetching,
                "{what}: the daemon's peak RSS grew by {} MiB reading a {} MiB file",
                over / MIB,
                size / MIB
            );
        } else {
            assert!(over >= size / 2, "{what}: the mapped pages did not count ({} MiB)", over / MIB);
        }
        // Decoded once, into the tier asked for.
        let log = m.log_text();
        let tier = if memory == "0" { "disk cache: decoded" } else { "memory cache: decoded" };
        assert!(log.contains(tier), "{what}: no '{tier}' in the log:\n{log}");
    }
}

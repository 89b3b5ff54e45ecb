//! Deltas (DESIGN.md: `llmfs delta make`, the writable `MOUNT/<base>/deltas/`, "what you write is
//! what you read"): lossless deltas read back byte-identical through `export` and a real mount,
//! also when the target's structure differs from the base's; the lossy codecs (q8, bitdelta)
//! stay within their bounds; the write path (cp -r, shuffled pwrites, parallel writers, rm,
//! rmdir, errors); bad input; a full disk; kill -9 of the daemon mid-write; deltas over variants
//! and over deltas.
//!
//! Every process runs under a timeout, every blocking file operation under `with_deadline`, and
//! every mount (FUSE or tmpfs) is owned by a guard that unmounts it on drop, also on panic.
//! Needs /dev/fuse and root (the full-disk test mounts a tmpfs).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_same_bytes, llmfs_mounted, run_command, wait_until, with_deadline, Finished, MountGuard, TestStore,
};
use half::{bf16, f16};
use llmfs::codec::delta as codec;
use llmfs::demo::{self, ModelSpec, SplitMix64};
use llmfs::format::{self, Dtype};
use serde_json::Value;

/// Deadline of one blocking file operation (reading a directory's files, a cp).
const OP: Duration = Duration::from_secs(120);
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const INDEX: &str = "model.safetensors.index.json";

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// Small, two shards, bf16; vocab × hidden = 384 000 elements, so the embedding and lm_head span
/// two lossless chunks (256 Ki elements) and end mid-chunk; kv_heads < heads for odd shapes.
fn spec(shards: usize) -> ModelSpec {
    ModelSpec {
        hidden: 128,
        intermediate: 344,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 3000,
        dtype: Dtype::BF16,
        shards,
        seed: 5,
    }
}

/// A store with entry `base` (the generated model of `spec`, added in place).
struct Fx {
    ts: TestStore,
    base: PathBuf,
    mounts: std::cell::Cell<usize>,
    /// `--disk-cache DIR` for every mount (S3 full-disk tests: the objects a mount reads go
    /// there, off the full disk that holds the node's staging).
    disk_cache: Option<PathBuf>,
}

impl Fx {
    fn new() -> Fx {
        Self::with_spec(&spec(2))
    }

    fn with_spec(spec: &ModelSpec) -> Fx {
        let ts = TestStore::new();
        let base = ts.path("base-model");
        common::write_model(&base, spec);
        let fx = Fx { ts, base, mounts: Default::default(), disk_cache: None };
        fx.ok(&[os("add"), os("base"), os(&fx.base)]);
        fx
    }

    fn root(&self) -> PathBuf {
        self.ts.tmp.path().canonicalize().unwrap()
    }

    fn ok(&self, args: &[&OsStr]) -> String {
        self.ts.ok(args)
    }

    /// A fine-tune of `from` (default: the base model) in DIR/`rel`.
    fn finetune(&self, rel: &str, seed: u64) -> PathBuf {
        self.finetune_of(&self.base, rel, seed)
    }

    fn finetune_of(&self, from: &Path, rel: &str, seed: u64) -> PathBuf {
        let out = self.ts.path(rel);
        demo::write_finetune(from, &out, 0.01, seed)
            .unwrap_or_else(|e| panic!("writing a fine-tune into {}: {e}", out.display()));
        out
    }

    /// `llmfs delta make NAME --base BASE --target DIR [--codec C]`.
    fn make(&self, name: &str, base: &str, target: &Path, codec: Option<&str>) {
        let mut args =
            vec![os("delta"), os("make"), os(name), os("--base"), os(base), os("--target"), os(target)];
        if let Some(c) = codec {
            args.extend([os("--codec"), os(c)]);
        }
        self.ok(&args);
    }

    /// `llmfs export NAME` into a fresh directory.
    fn export(&self, name: &str) -> PathBuf {
        let mut n = 0;
        let out = loop {
            let p = self.root().join(format!("export-{name}-{n}"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        self.ok(&[os("export"), os(name), os(&out)]);
        out
    }

    fn mount(&self) -> MountGuard {
        let n = self.mounts.get();
        self.mounts.set(n + 1);
        let cache = self.disk_cache.as_ref().map(|d| d.to_str().expect("a UTF-8 path"));
        let extra: Vec<&str> = cache.into_iter().flat_map(|d| ["--disk-cache", d]).collect();
        MountGuard::new(&self.ts, &self.root().join(format!("mnt{n}")), &extra)
    }

    fn info(&self, name: &str) -> Value {
        self.ts.json([os("info"), os(name), os("--json")])
    }

    fn ls(&self) -> Vec<Value> {
        self.ts.json(["ls", "--json"]).as_array().expect("ls --json is a list").clone()
    }

    #[track_caller]
    fn check_ok(&self) {
        let f = self.ts.run_full(["check"]);
        assert!(f.status.success(), "llmfs check failed:\n{}\n{}", f.stdout, f.stderr);
        self.ts.assert_no_garbage("after a passing check");
    }

    fn tmp_listing(&self) -> BTreeSet<String> {
        names_in(&self.ts.store.join("tmp"))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn os<P: AsRef<OsStr> + ?Sized>(p: &P) -> &OsStr {
    p.as_ref()
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Every regular file of `dir` with its bytes (no deadline: use `read_files` on a mount).
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let rd = fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    rd.map(|e| e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())))
        .filter(|e| fs::metadata(e.path()).map(|m| m.is_file()).unwrap_or(true))
        .map(|e| {
            let p = e.path();
            let bytes = fs::read(&p).unwrap_or_else(|err| panic!("reading {}: {err}", p.display()));
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

/// `files_of` under a deadline (for directories of a mount).
fn read_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let d = dir.to_owned();
    with_deadline(&format!("reading the files of {}", dir.display()), OP, move || files_of(&d))
}

fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_owned();
    with_deadline(&format!("reading {}", path.display()), OP, move || fs::read(&p))
}

/// `got` holds exactly the files of `want`, byte for byte.
#[track_caller]
fn assert_same_files(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    let (g, w): (BTreeSet<_>, BTreeSet<_>) = (got.keys().collect(), want.keys().collect());
    assert_eq!(g, w, "{what}: file names differ");
    for (name, bytes) in want {
        assert_same_bytes(&got[name], bytes, &format!("{what}: {name}"));
    }
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// close(2) that reports its error (dropping a File ignores it; llmfs stores a file on close).
fn close_checked(f: File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: we own fd (into_raw_fd) and close it once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `cp -r SRC/. DEST/` under a timeout (it may fail: the caller checks).
fn cp_r(src: &Path, dest: &Path) -> Finished {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "100", "cp", "-r"]).arg(src.join(".")).arg(format!("{}/", dest.display()));
    run_command(cmd, OP)
}

#[track_caller]
fn cp_r_ok(src: &Path, dest: &Path) {
    let f = cp_r(src, dest);
    assert!(
        f.status.success(),
        "cp -r {} {} failed ({}): {}",
        src.display(),
        dest.display(),
        f.status,
        f.stderr
    );
}

/// A stat under the mount (with a deadline); Ok(()) if it exists.
fn exists_errno(path: &Path) -> Option<i32> {
    let p = path.to_owned();
    with_deadline(&format!("stat {}", path.display()), OP, move || errno_of(fs::metadata(&p)))
}

/// A command that must fail with exactly one line on stderr.
#[track_caller]
fn assert_refused(f: &Finished, what: &str, needle: &str) {
    assert!(!f.status.success(), "{what}: succeeded but should be refused\nstdout:\n{}", f.stdout);
    let lines: Vec<&str> = f.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line on stderr, got:\n{}", f.stderr);
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "{what}: the error line does not mention {needle:?}: {}",
        lines[0]
    );
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// The tensors of a safetensors file in offset order, and its header's length (data start).
fn read_tensors(path: &Path) -> (Vec<Tensor>, u64) {
    let header = format::read_header_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let f = File::open(path).unwrap();
    let tensors = header
        .tensors
        .iter()
        .map(|t| {
            let mut bytes = vec![0u8; t.len() as usize];
            f.read_exact_at(&mut bytes, header.data_start + t.start).unwrap();
            Tensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), bytes }
        })
        .collect();
    (tensors, header.data_start)
}

/// The base model's tensors by name, across its shards.
fn tensors_of_dir(dir: &Path) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for name in names_in(dir) {
        if name.ends_with(".safetensors") {
            for t in read_tensors(&dir.join(name)).0 {
                out.insert(t.name.clone(), t);
            }
        }
    }
    out
}

/// Writes a safetensors file whose JSON lists the tensors in *reverse* offset order, with
/// `__metadata__` last and no padding (data need not start 8-byte aligned): still valid, but
/// unlike what llmfs would write, so only a verbatim header reads back identical.
fn write_odd_safetensors(path: &Path, tensors: &[Tensor]) {
    let mut offsets = vec![];
    let mut at = 0u64;
    for t in tensors {
        offsets.push((at, at + t.bytes.len() as u64));
        at += t.bytes.len() as u64;
    }
    let mut entries: Vec<String> = tensors
        .iter()
        .zip(&offsets)
        .map(|(t, (s, e))| {
            format!(
                "{}:{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{s},{e}]}}",
                serde_json::to_string(&t.name).unwrap(),
                t.dtype.name(),
                t.shape
            )
        })
        .collect();
    entries.reverse();
    entries.push("\"__metadata__\":{\"format\":\"pt\",\"note\":\"hand written\"}".into());
    let json = format!("{{{}}}", entries.join(","));
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    for t in tensors {
        out.extend_from_slice(&t.bytes);
    }
    fs::write(path, out).unwrap();
    format::read_header_path(path).unwrap_or_else(|e| panic!("the hand-written file is not valid: {e}"));
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        other => panic!("not a float dtype: {other}"),
    }
}

fn round_to(dtype: Dtype, v: f32) -> f32 {
    match dtype {
        Dtype::BF16 => bf16::from_f32(v).to_f32(),
        Dtype::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Bit pattern of element `i` as an integer ordered like the values (for an ulp distance).
fn ordered(dtype: Dtype, bytes: &[u8], i: usize) -> i64 {
    let (bits, sign) = match dtype.size() {
        2 => {
            let b = u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as i64;
            (b & 0x7fff, b & 0x8000 != 0)
        }
        4 => {
            let b = u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()) as i64;
            (b & 0x7fff_ffff, b & 0x8000_0000 != 0)
        }
        _ => unreachable!(),
    };
    if sign {
        -bits
    } else {
        bits
    }
}

/// Largest ulp distance between two tensors of the same float dtype.
fn max_ulps(dtype: Dtype, a: &[u8], b: &[u8]) -> i64 {
    assert_eq!(a.len(), b.len());
    (0..a.len() / dtype.size())
        .map(|i| (ordered(dtype, a, i) - ordered(dtype, b, i)).abs())
        .max()
        .unwrap_or(0)
}

/// Half an ulp of `v` in `dtype`, relative bound (2^-8 for bf16, 2^-11 for f16, 2^-24 for f32).
fn half_ulp(dtype: Dtype, v: f32) -> f32 {
    let rel = match dtype {
        Dtype::BF16 => 2f32.powi(-8),
        Dtype::F16 => 2f32.powi(-11),
        _ => 2f32.powi(-24),
    };
    v.abs() * rel + f32::MIN_POSITIVE
}

/// Kills and reaps a background child (a cp) on drop.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct TmpfsGuard(PathBuf);

impl TmpfsGuard {
    fn new(dir: &Path, size: &str) -> TmpfsGuard {
        fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", "30", "mount", "-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir);
        let f = run_command(cmd, Duration::from_secs(40));
        assert!(f.status.success(), "mounting a tmpfs at {}: {}", dir.display(), f.stderr);
        TmpfsGuard(dir.to_owned())
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2 reads a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            // SAFETY: as above; lazy, so it cannot block.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A target that differs from the base in structure, in DIR/`rel`: one `model.safetensors`
/// instead of two shards (tensors matched across shards by name) with a hand-written header,
/// holding the fine-tune's tensors except: layer 0's q_proj in another shape (same bytes),
/// layer 1's k_proj as F32, and three tensors the base lacks (2-D bf16, 1-D f32, I64); no
/// shard index; plus README.md, tokenizer.json, an empty file and a garbage x.safetensors.
fn structural_target(fx: &Fx, ft: &Path, rel: &str) -> PathBuf {
    let out = fx.ts.path(rel);
    fs::create_dir_all(&out).unwrap();
    let mut tensors = read_tensors(&ft.join(SHARD1)).0;
    tensors.extend(read_tensors(&ft.join(SHARD2)).0);
    for t in &mut tensors {
        if t.name == "model.layers.0.self_attn.q_proj.weight" {
            t.shape = vec![t.shape[0] * 2, t.shape[1] / 2];
        }
        if t.name == "model.layers.1.self_attn.k_proj.weight" {
            let v = to_f32(t.dtype, &t.bytes);
            t.bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            t.dtype = Dtype::F32;
        }
    }
    tensors.insert(
        3,
        Tensor {
            name: "extra.matrix".into(),
            dtype: Dtype::BF16,
            shape: vec![64, 128],
            bytes: demo::random_tensor(99, 64 * 128, Dtype::BF16, false),
        },
    );
    tensors.push(Tensor {
        name: "extra.bias".into(),
        dtype: Dtype::F32,
        shape: vec![300],
        bytes: demo::random_tensor(98, 300, Dtype::F32, false),
    });
    tensors.push(Tensor {
        name: "extra.ids".into(),
        dtype: Dtype::I64,
        shape: vec![10],
        bytes: (0..10i64).flat_map(|i| (i * 7 - 3).to_le_bytes()).collect(),
    });
    write_odd_safetensors(&out.join("model.safetensors"), &tensors);
    for f in ["config.json", "generation_config.json", "tokenizer_config.json"] {
        fs::copy(ft.join(f), out.join(f)).unwrap();
    }
    fs::write(out.join("README.md"), "# a fine-tune\n\nWith a model card.\n".repeat(20)).unwrap();
    let vocab: serde_json::Map<String, Value> =
        (0..3000).map(|i| (format!("tok{i}"), Value::from(i))).collect();
    fs::write(
        out.join("tokenizer.json"),
        serde_json::to_vec(&serde_json::json!({"model": {"type": "BPE", "vocab": vocab}})).unwrap(),
    )
    .unwrap();
    fs::write(out.join("empty.txt"), b"").unwrap();
    let mut garbage = 20u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"{this is not json!!}");
    garbage.extend(demo::random_tensor(3, 5000, Dtype::BF16, false));
    fs::write(out.join("x.safetensors"), garbage).unwrap();
    out
}

/// The `llmfs.based` list of a container in STORE/models/NAME/.
fn based_of(fx: &Fx, name: &str, file: &str) -> BTreeSet<String> {
    let copy = fx.ts.path(format!("based-{name}-{file}"));
    fs::write(&copy, fx.ts.stored_file(name, file)).unwrap();
    let h = format::read_header_path(&copy).unwrap();
    let based = h
        .metadata
        .get("llmfs.based")
        .and_then(Value::as_str)
        .expect("llmfs.based in the container's metadata");
    serde_json::from_str(based).unwrap()
}

fn dir_size(dir: &Path) -> u64 {
    names_in(dir).iter().map(|n| fs::metadata(dir.join(n)).unwrap().len()).sum()
}

// ---------------------------------------------------------------------------------------------
// 1. llmfs delta make, lossless
// ---------------------------------------------------------------------------------------------

#[test]
fn lossless_delta_make_reads_back_identical() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 1);
    let want = files_of(&ft);
    assert!(want.contains_key(INDEX) && want.contains_key(SHARD2), "{:?}", want.keys());
    fx.make("ft", "base", &ft, None);

    assert_same_files(&files_of(&fx.export("ft")), &want, "export of ft");

    let info = fx.info("ft");
    assert_eq!(info["kind"], "delta", "{info:#}");
    assert_eq!(info["recipe"]["base"], "base");
    assert_eq!(info["recipe"]["codec"], "lossless");
    let stored = info["recipe"]["stored_bytes"].as_u64().expect("stored_bytes");
    let target_size = dir_size(&ft);
    assert!(
        stored > 0 && stored < target_size * 3 / 4,
        "stored {stored} bytes of a {target_size}-byte target"
    );
    assert_eq!(info["size"].as_u64(), Some(target_size), "{info:#}");
    let ls = fx.ls();
    let entry = ls.iter().find(|e| e["name"] == "ft").expect("ft in ls");
    assert_eq!(entry["kind"], "delta");
    assert_eq!(entry["base"], "base");
    // Each weight tensor was coded against its base twin (the fine-tune keeps every shape).
    let based = based_of(&fx, "ft", SHARD2);
    assert!(based.contains("lm_head.weight") && based.contains("model.norm.weight"), "{based:?}");
    fx.check_ok();

    let m = fx.mount();
    assert_same_files(&read_files(&m.path().join("ft")), &want, "MOUNT/ft");
    let listed = read_files(&m.path().join("base/deltas/ft"));
    assert_same_files(&listed, &want, "MOUNT/base/deltas/ft");
    // Unaligned reads across chunk boundaries equal the target too.
    let p = m.path().join("ft").join(SHARD1);
    let want1 = want[SHARD1].clone();
    with_deadline("preads", OP, move || {
        let f = File::open(&p).unwrap();
        let mut rng = SplitMix64(17);
        for _ in 0..200 {
            let off = (rng.next_u64() % want1.len() as u64) as usize;
            let len = ((rng.next_u64() % 700_000) as usize + 1).min(want1.len() - off);
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off as u64).unwrap();
            assert!(buf == want1[off..off + len], "pread of {len} at {off} differs");
        }
    });
}

#[test]
fn lossless_delta_of_a_differently_structured_target() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 2);
    let target = structural_target(&fx, &ft, "struct");
    let want = files_of(&target);
    fx.make("st", "base", &target, None);
    assert_same_files(&files_of(&fx.export("st")), &want, "export of st");

    // Matched across the base's two shards by name; other shapes/dtypes/new names stored whole.
    let based = based_of(&fx, "st", "model.safetensors");
    for n in [
        "model.embed_tokens.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ] {
        assert!(based.contains(n), "{n} not coded against the base: {based:?}");
    }
    for n in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "extra.matrix",
        "extra.bias",
        "extra.ids",
    ] {
        assert!(!based.contains(n), "{n} has no base twin but was coded against one");
    }
    let stored = fx.info("st")["recipe"]["stored_bytes"].as_u64().unwrap();
    assert!(stored < dir_size(&target), "stored {stored} of {}", dir_size(&target));

    // Four shards with an index (another split than the base's two), fine-tuned.
    let three = fx.ts.path("four-base");
    common::write_model(&three, &spec(4));
    let ft3 = fx.finetune_of(&three, "four-ft", 3);
    assert!(ft3.join("model-00004-of-00004.safetensors").exists() && ft3.join(INDEX).exists());
    fx.make("three", "base", &ft3, None);
    let want3 = files_of(&ft3);
    assert_same_files(&files_of(&fx.export("three")), &want3, "export of three");
    let based3 = based_of(&fx, "three", "model-00004-of-00004.safetensors");
    assert!(based3.contains("lm_head.weight"), "{based3:?}");
    fx.check_ok();

    let m = fx.mount();
    assert_same_files(&read_files(&m.path().join("st")), &want, "MOUNT/st");
    assert_same_files(&read_files(&m.path().join("base/deltas/st")), &want, "MOUNT/base/deltas/st");
    assert_same_files(&read_files(&m.path().join("three")), &want3, "MOUNT/three");
}

// ---------------------------------------------------------------------------------------------
// 2. Lossy codecs
// ---------------------------------------------------------------------------------------------

/// Checks an exported lossy delta of `target` (the structural target) against the codec's
/// formulas: headers verbatim, twins within bounds, everything else exact.
fn check_lossy(codec_name: &str, got_dir: &Path, target: &Path, base: &HashMap<String, Tensor>) {
    let got = files_of(got_dir);
    let want = files_of(target);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{codec_name}: file names");
    for (name, w) in &want {
        if name != "model.safetensors" {
            assert_same_bytes(&got[name], w, &format!("{codec_name}: {name}"));
        }
    }
    let (want_t, want_start) = read_tensors(&target.join("model.safetensors"));
    let (got_t, got_start) = read_tensors(&got_dir.join("model.safetensors"));
    assert_eq!(got_start, want_start, "{codec_name}: header length");
    assert_same_bytes(
        &got["model.safetensors"][..got_start as usize],
        &want["model.safetensors"][..want_start as usize],
        &format!("{codec_name}: header"),
    );
    assert_eq!(got_t.len(), want_t.len());
    let mut lossy = 0;
    for (g, t) in got_t.iter().zip(&want_t) {
        assert_eq!((&g.name, g.dtype, &g.shape), (&t.name, t.dtype, &t.shape));
        let what = format!("{codec_name}: {}", t.name);
        let twin =
            base.get(&t.name).filter(|b| b.shape == t.shape && b.dtype == t.dtype && t.dtype.is_float());
        let b = match (codec_name, twin) {
            ("q8", Some(b)) => b,
            ("bitdelta", Some(b)) if t.shape.len() == 2 => b,
            _ => {
                assert_same_bytes(&g.bytes, &t.bytes, &format!("{what} (no lossy twin: exact)"));
                continue;
            }
        };
        lossy += 1;
        let (tv, bv, gv) = (to_f32(t.dtype, &t.bytes), to_f32(t.dtype, &b.bytes), to_f32(t.dtype, &g.bytes));
        let n = tv.len();
        let mut reference = vec![0u8; t.bytes.len()];
        if codec_name == "q8" {
            // |x' − x| ≤ scale/2 + rounding, scale = max|target − base| of the group / 127.
            for (gi, group) in (0..n).collect::<Vec<_>>().chunks(codec::DELTA_Q8_GROUP).enumerate() {
                let amax = group.iter().map(|&i| (tv[i] - bv[i]).abs()).fold(0f32, f32::max);
                let scale = amax / 127.0;
                for &i in group {
                    let tol = scale * 0.5 * 1.001 + half_ulp(t.dtype, gv[i].abs().max(tv[i].abs())) + 1e-12;
                    assert!(
                        (gv[i] - tv[i]).abs() <= tol,
                        "{what}: element {i} (group {gi}): got {} want {} (scale {scale})",
                        gv[i],
                        tv[i]
                    );
                }
            }
            let (q, scales) = codec::encode_q8(&t.bytes, &b.bytes, t.dtype);
            codec::decode_q8_range(&q, &scales, &b.bytes, t.dtype, 0..n, &mut reference);
        } else {
            // x' = round(base ± row_scale), the sign of target − base, row_scale = mean |target − base|.
            let cols = t.shape[1];
            for r in 0..t.shape[0] {
                let row = r * cols..(r + 1) * cols;
                let scale =
                    (row.clone().map(|i| (tv[i] - bv[i]).abs() as f64).sum::<f64>() / cols as f64) as f32;
                for i in row {
                    let s = if tv[i] - bv[i] < 0.0 { -scale } else { scale };
                    let expect = round_to(t.dtype, bv[i] + s);
                    let tol = half_ulp(t.dtype, expect) * 2.0 + scale * 1e-5;
                    assert!((gv[i] - expect).abs() <= tol, "{what}: element {i}: got {} expected {expect} (base {}, target {}, row scale {scale})", gv[i], bv[i], tv[i]);
                }
            }
            let (signs, scales) = codec::encode_bitdelta(&t.bytes, &b.bytes, t.dtype, t.shape[0], cols);
            codec::decode_bitdelta_range(&signs, &scales, &b.bytes, t.dtype, cols, 0..n, &mut reference);
        }
        let ulps = max_ulps(t.dtype, &g.bytes, &reference);
        assert!(ulps <= 1, "{what}: {ulps} ulps from llmfs::codec::delta's own decode");
        if codec_name == "bitdelta" {
            assert!(
                g.bytes != t.bytes,
                "{what}: bitdelta reproduced the target exactly: was it coded at all?"
            );
        }
    }
    assert!(lossy >= 10, "{codec_name}: only {lossy} tensors were lossy-coded");
}

/// What a correct lossy read gives, built with llmfs::codec::delta's own encode + decode: the
/// target's file with each lossy-coded tensor's bytes replaced (the header is kept verbatim).
fn expected_lossy(codec_name: &str, target: &Path, base: &HashMap<String, Tensor>, out: &Path) {
    fs::create_dir_all(out).unwrap();
    for (n, b) in files_of(target) {
        fs::write(out.join(n), b).unwrap();
    }
    let (tensors, start) = read_tensors(&target.join("model.safetensors"));
    let mut bytes = fs::read(target.join("model.safetensors")).unwrap()[..start as usize].to_vec();
    for t in tensors {
        let twin =
            base.get(&t.name).filter(|b| b.shape == t.shape && b.dtype == t.dtype && t.dtype.is_float());
        let n = t.shape.iter().product::<usize>();
        let mut decoded = vec![0u8; t.bytes.len()];
        match (codec_name, twin) {
            ("q8", Some(b)) => {
                let (q, scales) = codec::encode_q8(&t.bytes, &b.bytes, t.dtype);
                codec::decode_q8_range(&q, &scales, &b.bytes, t.dtype, 0..n, &mut decoded);
            }
            ("bitdelta", Some(b)) if t.shape.len() == 2 => {
                let (signs, scales) =
                    codec::encode_bitdelta(&t.bytes, &b.bytes, t.dtype, t.shape[0], t.shape[1]);
                codec::decode_bitdelta_range(
                    &signs,
                    &scales,
                    &b.bytes,
                    t.dtype,
                    t.shape[1],
                    0..n,
                    &mut decoded,
                );
            }
            _ => decoded = t.bytes.clone(),
        }
        bytes.extend(decoded);
    }
    fs::write(out.join("model.safetensors"), bytes).unwrap();
}

/// The lossy checks themselves: they accept the codec's own round trip and reject the target
/// unchanged (bitdelta) or a tensor moved by more than the bound (q8).
#[test]
fn lossy_checks_accept_the_codecs_round_trip() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 4);
    let target = structural_target(&fx, &ft, "struct");
    let base = tensors_of_dir(&fx.base);
    for codec_name in ["q8", "bitdelta"] {
        let out = fx.ts.path(format!("expected-{codec_name}"));
        expected_lossy(codec_name, &target, &base, &out);
        check_lossy(codec_name, &out, &target, &base);
    }
    let unchanged = std::panic::catch_unwind(|| check_lossy("bitdelta", &target, &target, &base));
    assert!(unchanged.is_err(), "the bitdelta check accepted the exact target");
    // q8 with one element pushed far off.
    let out = fx.ts.path("expected-q8");
    let mut bytes = fs::read(out.join("model.safetensors")).unwrap();
    let (tensors, start) = read_tensors(&out.join("model.safetensors"));
    let at = start as usize
        + tensors.iter().take_while(|t| t.name != "lm_head.weight").map(|t| t.bytes.len()).sum::<usize>()
        + 2 * 1000;
    bytes[at + 1] ^= 0x08;
    fs::write(out.join("model.safetensors"), bytes).unwrap();
    let off = std::panic::catch_unwind(|| check_lossy("q8", &out, &target, &base));
    assert!(off.is_err(), "the q8 check accepted a value far off");
}

#[test]
fn lossy_codecs_stay_within_their_bounds() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 4);
    let target = structural_target(&fx, &ft, "struct");
    let base = tensors_of_dir(&fx.base);
    fx.make("q8", "base", &target, Some("q8"));
    fx.make("bd", "base", &target, Some("bitdelta"));
    for (entry, codec_name) in [("q8", "q8"), ("bd", "bitdelta")] {
        let info = fx.info(entry);
        assert_eq!(info["recipe"]["codec"], codec_name, "{info:#}");
        let stored = info["recipe"]["stored_bytes"].as_u64().unwrap();
        assert!(stored < dir_size(&target), "{entry}: stored {stored}");
    }
    let q8_dir = fx.export("q8");
    let bd_dir = fx.export("bd");
    check_lossy("q8", &q8_dir, &target, &base);
    check_lossy("bitdelta", &bd_dir, &target, &base);
    fx.check_ok();
    // The mount serves the same bytes as export.
    let m = fx.mount();
    assert_same_files(&read_files(&m.path().join("q8")), &files_of(&q8_dir), "MOUNT/q8 vs export");
    assert_same_files(&read_files(&m.path().join("bd")), &files_of(&bd_dir), "MOUNT/bd vs export");
}

// ---------------------------------------------------------------------------------------------
// 3. The write path through a real mount
// ---------------------------------------------------------------------------------------------

#[test]
fn cp_r_into_deltas_stores_a_delta_then_rm_removes_it() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 5);
    let want = files_of(&ft);
    let m = fx.mount();
    let deltas = m.path().join("base/deltas");
    let d = deltas.join("new");
    fs::create_dir(&d).unwrap();
    cp_r_ok(&ft, &d);

    assert_same_files(&read_files(&m.path().join("new")), &want, "MOUNT/new");
    assert_same_files(&read_files(&d), &want, "MOUNT/base/deltas/new");
    assert_same_files(&files_of(&fx.export("new")), &want, "export of new");
    // sha256sum, another reader, agrees too.
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60", "sha256sum"]).current_dir(m.path().join("new")).args(want.keys());
    let mounted = run_command(cmd, OP);
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60", "sha256sum"]).current_dir(&ft).args(want.keys());
    let original = run_command(cmd, OP);
    assert!(mounted.status.success() && original.status.success());
    assert_eq!(mounted.stdout, original.stdout);

    let ls = fx.ls();
    let e = ls.iter().find(|e| e["name"] == "new").expect("new listed by llmfs ls");
    assert_eq!((e["kind"].as_str(), e["base"].as_str()), (Some("delta"), Some("base")));
    let info = fx.info("new");
    assert!(info["recipe"]["stored_bytes"].as_u64().unwrap() < dir_size(&ft), "{info:#}");
    fx.check_ok();
    assert!(
        fx.tmp_listing().is_empty()
            || names_in(&fx.ts.store.join("tmp")).iter().all(|n| n.starts_with("write-new")),
        "{:?}",
        fx.tmp_listing()
    );

    // rm of one file: gone from the entry, the mount and the store.
    fs::remove_file(d.join("generation_config.json")).unwrap();
    let files: Vec<String> = fx.info("new")["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !files.contains(&"generation_config.json".to_string()) && files.len() == want.len() - 1,
        "{files:?}"
    );
    assert!(fx.ts.stored_size("new", "generation_config.json").is_none(), "{:?}", fx.ts.stored_files("new"));
    let left = read_files(&m.path().join("new"));
    let mut want_left = want.clone();
    want_left.remove("generation_config.json");
    assert_same_files(&left, &want_left, "MOUNT/new after rm of one file");
    assert_eq!(exists_errno(&d.join("generation_config.json")), Some(libc::ENOENT));
    // (A stat of MOUNT/new/generation_config.json may still be answered from the kernel's
    // cache: see `a_removed_file_vanishes_from_the_entry_dir`.) Opening it fails.
    assert_eq!(errno_of(read(&m.path().join("new/generation_config.json"))), Some(libc::ENOENT));

    // rm -r of the directory: the entry is gone.
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60", "rm", "-r"]).arg(&d);
    let rm = run_command(cmd, OP);
    assert!(rm.status.success(), "rm -r: {}", rm.stderr);
    assert!(fx.ls().iter().all(|e| e["name"] != "new"), "new still listed after rm -r");
    assert!(
        fx.ts.stored_files("new").is_empty(),
        "STORE/models/new left behind: {:?}",
        fx.ts.stored_files("new")
    );
    assert!(fx.tmp_listing().is_empty(), "STORE/tmp: {:?}", fx.tmp_listing());
    assert!(
        wait_until(Duration::from_secs(5), || exists_errno(&m.path().join("new")) == Some(libc::ENOENT)),
        "MOUNT/new still there"
    );
    assert_eq!(exists_errno(&d), Some(libc::ENOENT));
    fx.check_ok();

    // The name is free again: a second delta under it reads back the new bytes.
    let ft2 = fx.finetune("ft2", 6);
    fs::create_dir(&d).unwrap();
    cp_r_ok(&ft2, &d);
    let want2 = files_of(&ft2);
    assert!(
        wait_until(Duration::from_secs(5), || read_files(&m.path().join("new")) == want2),
        "MOUNT/new does not show the second delta"
    );
    assert_same_files(&files_of(&fx.export("new")), &want2, "export of the second new");
}

#[test]
fn mkdir_and_writes_that_are_refused() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 7);
    fx.make("taken", "base", &ft, None);
    let m = fx.mount();
    let deltas = m.path().join("base/deltas");
    let run = |what: &str, f: Box<dyn FnOnce() -> std::io::Result<()> + Send>| with_deadline(what, OP, f);

    // Names taken: an entry (a delta of base, the base itself), a session open now.
    for taken in ["taken", "base"] {
        let p = deltas.join(taken);
        assert_eq!(
            errno_of(run("mkdir taken", Box::new(move || fs::create_dir(&p)))),
            Some(libc::EEXIST),
            "mkdir deltas/{taken}"
        );
    }
    let p = deltas.join("open");
    run("mkdir", Box::new(move || fs::create_dir(&p))).unwrap();
    let p = deltas.join("open");
    assert_eq!(errno_of(run("mkdir again", Box::new(move || fs::create_dir(&p)))), Some(libc::EEXIST));
    // Invalid names.
    for bad in [".hidden", "a b"] {
        let p = deltas.join(bad);
        let r = run("mkdir invalid", Box::new(move || fs::create_dir(&p)));
        assert!(r.is_err(), "mkdir deltas/{bad:?} succeeded");
    }
    assert!(fx.ls().iter().all(|e| e["name"] != ".hidden" && e["name"] != "a b"));
    // A dotfile inside a delta directory is a file like any other (`.gitattributes`).
    let p = deltas.join("open/.x");
    run("create .x", Box::new(move || fs::write(&p, b"x"))).unwrap();
    let p = deltas.join("open/.x");
    assert_eq!(run("read .x", Box::new(move || fs::read(&p).map(|b| assert_eq!(b, b"x")))).ok(), Some(()));
    let p = deltas.join("open/.x");
    run("rm .x", Box::new(move || fs::remove_file(&p))).unwrap();

    // Writing anywhere but under deltas/.
    let ro = [libc::EROFS, libc::EACCES, libc::EPERM];
    let cases: Vec<(&str, PathBuf)> = vec![
        ("touch MOUNT/base/x", m.path().join("base/x")),
        ("touch MOUNT/x", m.path().join("x")),
        ("write MOUNT/taken/x", m.path().join("taken/x")),
    ];
    for (what, p) in cases {
        let e = errno_of(run(
            what,
            Box::new(move || OpenOptions::new().write(true).create(true).truncate(true).open(&p).map(drop)),
        ));
        assert!(e.is_some_and(|e| ro.contains(&e)), "{what}: {e:?}");
    }
    for (what, p) in [
        ("open MOUNT/base/config.json for write", m.path().join("base/config.json")),
        ("open MOUNT/taken/config.json for write", m.path().join("taken/config.json")),
    ] {
        let e = errno_of(run(what, Box::new(move || OpenOptions::new().write(true).open(&p).map(drop))));
        assert!(e.is_some_and(|e| ro.contains(&e)), "{what}: {e:?}");
    }
    for (what, p) in [
        ("mkdir MOUNT/base/sub", m.path().join("base/sub")),
        ("mkdir MOUNT/newentry", m.path().join("newentry")),
    ] {
        let e = errno_of(run(what, Box::new(move || fs::create_dir(&p))));
        assert!(e.is_some_and(|e| ro.contains(&e)), "{what}: {e:?}");
    }
    let p = m.path().join("base/config.json");
    let e = errno_of(run("rm MOUNT/base/config.json", Box::new(move || fs::remove_file(&p))));
    assert!(e.is_some_and(|e| ro.contains(&e)), "rm MOUNT/base/config.json: {e:?}");
    assert!(fx.ts.path("base-model/config.json").exists());
    // Nothing of that reached the store; the base still reads back as it was.
    assert_same_files(&read_files(&m.path().join("base")), &files_of(&fx.base), "MOUNT/base");
    fx.check_ok();
}

#[test]
fn shuffled_pwrites_and_parallel_writers_read_back_identical() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 8);
    let target = structural_target(&fx, &ft, "struct");
    let want_ft = files_of(&ft);
    let want_st = files_of(&target);
    let m = fx.mount();
    let deltas = m.path().join("base/deltas");

    // One file in pwrite chunks of an odd size, in shuffled order, then the rest the same way.
    fs::create_dir(deltas.join("pw")).unwrap();
    let dir = deltas.join("pw");
    let files = want_ft.clone();
    with_deadline("shuffled pwrites", OP, move || {
        let mut rng = SplitMix64(9);
        for (name, bytes) in &files {
            const CHUNK: usize = 65_536 + 13;
            let mut order: Vec<usize> = (0..bytes.len().div_ceil(CHUNK)).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let f = OpenOptions::new().write(true).create(true).truncate(true).open(dir.join(name)).unwrap();
            for c in order {
                let s = c * CHUNK;
                f.write_all_at(&bytes[s..(s + CHUNK).min(bytes.len())], s as u64).unwrap();
            }
            close_checked(f).unwrap_or_else(|e| panic!("close of {name}: {e}"));
        }
    });
    assert_same_files(&read_files(&m.path().join("pw")), &want_ft, "MOUNT/pw");
    assert_same_files(&read_files(&deltas.join("pw")), &want_ft, "MOUNT/base/deltas/pw");

    // Every file of the structural target at once, one thread each, into one directory.
    fs::create_dir(deltas.join("par")).unwrap();
    let dir = deltas.join("par");
    let files = want_st.clone();
    with_deadline("parallel writers", OP, move || {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(files.len()));
        let handles: Vec<_> = files
            .into_iter()
            .map(|(name, bytes)| {
                let (dir, barrier) = (dir.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut f = File::create(dir.join(&name)).unwrap();
                    for piece in bytes.chunks(200_000) {
                        f.write_all(piece).unwrap();
                    }
                    close_checked(f).map_err(|e| format!("close of {name}: {e}"))
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    });
    assert_same_files(&read_files(&m.path().join("par")), &want_st, "MOUNT/par");
    assert_same_files(&read_files(&deltas.join("par")), &want_st, "MOUNT/base/deltas/par");
    assert_same_files(&files_of(&fx.export("par")), &want_st, "export of par");
    assert_same_files(&files_of(&fx.export("pw")), &want_ft, "export of pw");
    fx.check_ok();
}

#[test]
fn rewriting_a_stored_file_serves_the_new_bytes() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 10);
    let ft2 = fx.finetune("ft2", 11);
    let m = fx.mount();
    let d = m.path().join("base/deltas/new");
    fs::create_dir(&d).unwrap();
    cp_r_ok(&ft, &d);
    assert_same_files(&read_files(&m.path().join("new")), &files_of(&ft), "MOUNT/new, first copy");
    assert_same_files(&read_files(&d), &files_of(&ft), "MOUNT/base/deltas/new, first copy");
    // The same names again (cp opens them O_TRUNC), other bytes.
    cp_r_ok(&ft2, &d);
    let want2 = files_of(&ft2);
    assert_same_files(&files_of(&fx.export("new")), &want2, "export after the second copy");
    assert_same_files(&read_files(&d), &want2, "MOUNT/base/deltas/new after the second copy");
    assert_same_files(&read_files(&m.path().join("new")), &want2, "MOUNT/new after the second copy");
}

/// A shard held open while another file of its entry is committed through deltas/ (the next
/// file of a `cp -r`, whose RELEASE reaches the daemon after cp has returned): opening the shard
/// again serves it, at once. (Its decoded copy was keyed by the entry's whole record, so the
/// second open decoded a second copy and found the kernel's backing file of the inode still the
/// first: EBUSY after two seconds, a CI flake.)
#[test]
fn a_shard_held_open_while_its_entry_gains_a_file_opens_again() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 18);
    let want = files_of(&ft);
    let m = fx.mount();
    let d = m.path().join("base/deltas/new");
    fs::create_dir(&d).unwrap();
    cp_r_ok(&ft, &d);
    let shard = m.path().join("new/model-00001-of-00002.safetensors");
    let p = shard.clone();
    let held = with_deadline("opening the shard", OP, move || fs::File::open(&p).unwrap());
    fs::write(d.join("notes.txt"), b"one more file of the entry\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || exists_errno(&m.path().join("new/notes.txt")).is_none()),
        "MOUNT/new/notes.txt did not appear"
    );
    let again = read(&shard).unwrap_or_else(|e| panic!("opening {} again: {e}", shard.display()));
    assert_same_bytes(&again, &want["model-00001-of-00002.safetensors"], "the shard opened again");
    drop(held);
}

/// Opens and closes of a file served by passthrough, from several threads at once: a reader's
/// close reaches the daemon as RELEASE, on another FUSE thread, as soon as the open's reply is
/// out. After the file's delta is rewritten, its new version opens. (The daemon noted a
/// handle's backing file only after replying to its open, so a RELEASE served first left the
/// old version held for good: EBUSY on the next version, a CI flake.)
#[test]
fn quick_opens_and_closes_leave_no_old_version_held() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 19);
    let ft2 = fx.finetune("ft2", 20);
    let m = fx.mount();
    let d = m.path().join("base/deltas/new");
    fs::create_dir(&d).unwrap();
    cp_r_ok(&ft, &d);
    let shard = m.path().join("new/model-00001-of-00002.safetensors");
    let p = shard.clone();
    with_deadline("opening and closing the shard", Duration::from_secs(120), move || {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..400 {
                        let mut byte = [0u8; 1];
                        File::open(&p).and_then(|f| f.read_exact_at(&mut byte, 0)).unwrap();
                    }
                });
            }
        })
    });
    cp_r_ok(&ft2, &d);
    let again = read(&shard).unwrap_or_else(|e| panic!("opening {} after the rewrite: {e}", shard.display()));
    assert_same_bytes(&again, &files_of(&ft2)["model-00001-of-00002.safetensors"], "the rewritten shard");
}

#[test]
fn a_removed_file_vanishes_from_the_entry_dir() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 16);
    let m = fx.mount();
    let d = m.path().join("base/deltas/new");
    fs::create_dir(&d).unwrap();
    cp_r_ok(&ft, &d);
    assert_same_files(&read_files(&m.path().join("new")), &files_of(&ft), "MOUNT/new");
    fs::remove_file(d.join("generation_config.json")).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || exists_errno(&m.path().join("new/generation_config.json")) == Some(libc::ENOENT)),
        "stat MOUNT/new/generation_config.json still succeeds 5 s after rm MOUNT/base/deltas/new/generation_config.json"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn delta_make_refuses_bad_input_with_one_line() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 12);
    let ft_s = ft.to_str().unwrap();

    // Another architecture.
    let other = fx.ts.path("other-arch");
    fs::create_dir_all(&other).unwrap();
    for (n, b) in files_of(&ft) {
        fs::write(other.join(n), b).unwrap();
    }
    let mut config: Value = serde_json::from_slice(&fs::read(other.join("config.json")).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    fs::write(other.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let before = fx.ts.snapshot();
    let f = fx.ts.run_full(["delta", "make", "x", "--base", "base", "--target", other.to_str().unwrap()]);
    assert_refused(&f, "another architecture", "architecture");
    fx.ts.assert_unchanged(&before, "another architecture");

    // A missing base, a missing target, an invalid name, a bad codec.
    let f = fx.ts.run_full(["delta", "make", "x", "--base", "nope", "--target", ft_s]);
    assert_refused(&f, "missing base", "nope");
    fx.ts.assert_unchanged(&before, "missing base");
    let missing = fx.ts.path("no-such-dir");
    let f = fx.ts.run_full(["delta", "make", "x", "--base", "base", "--target", missing.to_str().unwrap()]);
    assert_refused(&f, "missing target", "no-such-dir");
    fx.ts.assert_unchanged(&before, "missing target");
    let f = fx.ts.run_full(["delta", "make", ".x", "--base", "base", "--target", ft_s]);
    assert_refused(&f, "invalid name", ".x");
    fx.ts.assert_unchanged(&before, "invalid name");
    let f = fx.ts.run_full(["delta", "make", "x", "--base", "base", "--target", ft_s, "--codec", "zip"]);
    assert!(!f.status.success(), "--codec zip accepted");
    fx.ts.assert_unchanged(&before, "bad codec");

    // A name that is taken (by the base, then by a delta).
    let f = fx.ts.run_full(["delta", "make", "base", "--base", "base", "--target", ft_s]);
    assert_refused(&f, "name taken by the base", "base");
    fx.ts.assert_unchanged(&before, "name taken by the base");
    fx.make("ft", "base", &ft, None);
    let before = fx.ts.snapshot();
    let f = fx.ts.run_full(["delta", "make", "ft", "--base", "base", "--target", ft_s]);
    assert_refused(&f, "name taken", "ft");
    fx.ts.assert_unchanged(&before, "name taken");
    assert_same_files(&files_of(&fx.export("ft")), &files_of(&ft), "ft after the refused second make");

    // A truncated safetensors file in the target is stored verbatim and reads back identical.
    let trunc = fx.ts.path("trunc");
    fs::create_dir_all(&trunc).unwrap();
    fs::copy(ft.join("config.json"), trunc.join("config.json")).unwrap();
    let shard = fs::read(ft.join(SHARD1)).unwrap();
    fs::write(trunc.join(SHARD1), &shard[..shard.len() / 2]).unwrap();
    fx.make("trunc", "base", &trunc, None);
    assert_same_files(&files_of(&fx.export("trunc")), &files_of(&trunc), "export of trunc");
    fx.check_ok();
}

/// Any close of any descriptor of a file sends the daemon a FLUSH: here a dup's, as a forked
/// child's exec does with the descriptors it inherited while the parent still writes. That FLUSH
/// stores the file as it is then; the writer's own close must store it again, complete. (It once
/// ended the staging instead, and the rest of the file was lost: found by tests run in parallel,
/// whose spawned commands inherited other tests' descriptors.)
#[test]
fn a_flush_midway_through_a_write_does_not_lose_the_rest() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 21);
    let m = fx.mount();
    let d = m.path().join("base/deltas/mid");
    fs::create_dir(&d).unwrap();
    let want = files_of(&ft);
    let (dir, files) = (d.clone(), want.clone());
    with_deadline("writing with flushes midway", OP, move || {
        for (name, bytes) in &files {
            let mut f = File::create(dir.join(name)).unwrap();
            for piece in bytes.chunks(bytes.len().div_ceil(3).max(1)) {
                f.write_all(piece).unwrap();
                // SAFETY: a dup of our open descriptor, closed at once.
                unsafe {
                    let fd = libc::dup(std::os::fd::AsRawFd::as_raw_fd(&f));
                    assert!(fd >= 0);
                    libc::close(fd);
                }
            }
            close_checked(f).unwrap_or_else(|e| panic!("close of {name}: {e}"));
        }
    });
    assert_same_files(&read_files(&m.path().join("mid")), &want, "MOUNT/mid");
    assert_same_files(&read_files(&d), &want, "MOUNT/base/deltas/mid");
    assert_same_files(&files_of(&fx.export("mid")), &want, "export of mid");
    fx.check_ok();
}

#[test]
fn a_truncated_file_written_into_deltas_is_stored_verbatim() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 13);
    let m = fx.mount();
    let d = m.path().join("base/deltas/half");
    fs::create_dir(&d).unwrap();
    let shard = fs::read(ft.join(SHARD1)).unwrap();
    let half = shard[..shard.len() / 2 + 3].to_vec();
    let (p, h) = (d.join(SHARD1), half.clone());
    with_deadline("writing half a shard", OP, move || {
        let mut f = File::create(&p).unwrap();
        f.write_all(&h).unwrap();
        close_checked(f).unwrap();
    });
    // Also a header cut mid-JSON.
    let (p, h) = (d.join(SHARD2), fs::read(ft.join(SHARD2)).unwrap()[..100].to_vec());
    with_deadline("writing a cut header", OP, move || {
        let mut f = File::create(&p).unwrap();
        f.write_all(&h).unwrap();
        close_checked(f).unwrap();
    });
    let want: BTreeMap<String, Vec<u8>> = [
        (SHARD1.to_string(), half),
        (SHARD2.to_string(), fs::read(ft.join(SHARD2)).unwrap()[..100].to_vec()),
    ]
    .into();
    assert_same_files(&read_files(&m.path().join("half")), &want, "MOUNT/half");
    assert_same_files(&read_files(&d), &want, "MOUNT/base/deltas/half");
    assert_same_files(&files_of(&fx.export("half")), &want, "export of half");
    fx.check_ok();
}

// ---------------------------------------------------------------------------------------------
// 5. Full disk
// ---------------------------------------------------------------------------------------------

/// ~22 MB of bf16 in two shards of ~11 MB: more than a 12 MiB store can take.
fn big_spec(shards: usize) -> ModelSpec {
    ModelSpec {
        hidden: 256,
        intermediate: 688,
        layers: 4,
        heads: 4,
        kv_heads: 4,
        vocab: 16000,
        dtype: Dtype::BF16,
        shards,
        seed: 31,
    }
}

/// What must still read back after a failed copy: the base, a cast, and the target.
struct Wanted {
    base: BTreeMap<String, Vec<u8>>,
    f32: BTreeMap<String, Vec<u8>>,
    ft: BTreeMap<String, Vec<u8>>,
}

/// After a failed copy: the daemon serves, and every file visible under MOUNT/new (if the entry
/// exists) and every file the registry lists for it is byte-identical to its source.
fn check_after_enospc(fx: &Fx, m: &MountGuard, want: &Wanted) {
    // SAFETY: signal 0 only checks that the daemon (our child) exists.
    assert!(m.pid().is_some_and(|p| unsafe { libc::kill(p, 0) } == 0), "the daemon died:\n{}", m.log_text());
    assert!(llmfs_mounted(m.path()));
    assert_same_files(&read_files(&m.path().join("base")), &want.base, "MOUNT/base after ENOSPC");
    assert_same_files(&read_files(&m.path().join("f32")), &want.f32, "MOUNT/f32 after ENOSPC");
    let Some(entry) = fx.ls().into_iter().find(|e| e["name"] == "new") else {
        assert!(exists_errno(&m.path().join("new")).is_some(), "MOUNT/new without an entry");
        return;
    };
    // A file stored and then written again without success (a FLUSH stored part of it, then
    // the disk filled) is unfinished: it answers EIO, never the part stored. Every other file
    // of MOUNT/new (all the registry lists, nothing else) reads exactly as written.
    let unfinished: BTreeSet<String> =
        entry["unfinished"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned()).collect();
    let listed: BTreeSet<String> = fs::read_dir(m.path().join("new"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "deltas") // every entry's write folder
        .collect();
    let recorded: BTreeSet<String> = fx.info("new")["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    let top_level: BTreeSet<String> =
        recorded.iter().filter_map(|f| f.split('/').next()).map(str::to_owned).collect();
    assert_eq!(listed, top_level, "MOUNT/new lists other than the registry's files");
    for name in &recorded {
        let path = m.path().join("new").join(name);
        if unfinished.contains(name) {
            assert_eq!(
                errno_of(read(&path)),
                Some(libc::EIO),
                "MOUNT/new/{name}, unfinished, read other than EIO"
            );
        } else {
            let bytes = read(&path).unwrap_or_else(|e| panic!("MOUNT/new/{name}: {e}"));
            let want = want.ft.get(name).unwrap_or_else(|| panic!("MOUNT/new/{name} is no file of the copy"));
            assert_same_bytes(&bytes, want, &format!("MOUNT/new/{name} after ENOSPC (a half entry?)"));
        }
    }
}

/// A store on a 12 MiB tmpfs with `base` (~11 MB in two shards, added in place, so outside the
/// tmpfs), an f32 cast of it, and a ~22 MB fine-tune. Returns the tmpfs guard first: keep it
/// declared before the fixture so it is unmounted after the mount, before the temp dirs go.
///
/// S3: the node directory (the staging of `deltas/` writes) is what is on the tmpfs, from the
/// first mount on (add, cast and the export of `want` fetch and upload through a node directory
/// on the ordinary disk), and the mounts' disk cache (where the objects read go) is off it.
fn full_disk_fixture() -> (tempfile::TempDir, TmpfsGuard, Fx, PathBuf, Wanted) {
    let disk_dir = tempfile::Builder::new().prefix("llmfs-tmpfs-").tempdir().unwrap();
    let tmpfs = TmpfsGuard::new(disk_dir.path(), "12m");
    let mut ts = TestStore::new();
    let base = ts.path("base-model");
    common::write_model(&base, &big_spec(2));
    let ft = ts.path("ft");
    demo::write_finetune(&base, &ft, 0.01, 14).unwrap();
    assert!(dir_size(&ft) > 20 << 20, "target of {} bytes", dir_size(&ft));
    let full = disk_dir.path().join("store");
    if !ts.is_s3() {
        ts.store = full.clone();
    }
    let mut fx = Fx { ts, base, mounts: Default::default(), disk_cache: None };
    fx.ok(&[os("add"), os("base"), os(&fx.base)]);
    fx.ok(&[os("cast"), os("f32"), os("--base"), os("base"), os("--dtype"), os("f32")]);
    let want = Wanted { base: files_of(&fx.base), f32: files_of(&fx.export("f32")), ft: files_of(&ft) };
    if fx.ts.is_s3() {
        fx.disk_cache = Some(fx.ts.path("disk-cache"));
        fx.ts.command_node = Some(fx.ts.store.clone());
        fx.ts.store = full;
    }
    (disk_dir, tmpfs, fx, ft, want)
}

fn rm_rf(p: &Path) -> Finished {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60", "rm", "-rf"]).arg(p);
    run_command(cmd, OP)
}

#[test]
fn full_disk_fails_the_copy_and_leaves_no_half_entry() {
    let (_disk_dir, _tmpfs, fx, ft, want) = full_disk_fixture();
    {
        let m = fx.mount();
        let d = m.path().join("base/deltas/new");
        fs::create_dir(&d).unwrap();
        let f = cp_r(&ft, &d);
        assert!(!f.status.success(), "cp of {} bytes into a 12 MiB store succeeded", dir_size(&ft));
        assert!(
            f.stderr.contains("No space left") || f.stderr.contains("Input/output error"),
            "cp: {}",
            f.stderr
        );
        check_after_enospc(&fx, &m, &want);

        // Our own write + close of a file bigger than the disk: the error comes at write or
        // close, and close reports it.
        let (p, bytes) = (
            d.join("big.safetensors"),
            [fs::read(ft.join(SHARD1)).unwrap(), fs::read(ft.join(SHARD2)).unwrap()].concat(),
        );
        //
        // First a FLUSH after a few bytes (the close of a second descriptor): it stores the
        // file as it is then. Any close(2) of a descriptor of the file sends one, among them the
        // exec of a child that another thread of this test binary forks while the file is open
        // (the descriptor is close-on-exec): CI's flake was such a FLUSH landing in the write or
        // not, by chance, so the file was either never stored or stored in part and then failed.
        // Made here on purpose, the file is always the second: it is listed in MOUNT/new and
        // answers EIO (unfinished), never the part stored.
        const HEAD: usize = 4096;
        let (flushed, e) = with_deadline("writing past a full disk", OP, move || {
            let mut f = File::create(&p).unwrap();
            f.write_all(&bytes[..HEAD]).unwrap();
            let flushed = close_checked(f.try_clone().unwrap()).map_err(|e| e.to_string());
            let w = f.write_all(&bytes[HEAD..]);
            let c = close_checked(f);
            (flushed, w.and(c).err().map(|e| e.raw_os_error()))
        });
        // The FLUSH's store fits: cp's failed files left the room their staging held.
        assert_eq!(flushed, Ok(()), "the store of {HEAD} bytes at a FLUSH");
        assert!(
            matches!(e, Some(Some(libc::ENOSPC)) | Some(Some(libc::EIO))),
            "write+close past a full disk: {e:?}"
        );
        let unfinished = &fx.info("new")["unfinished"];
        assert!(
            unfinished.as_array().unwrap().iter().any(|f| f == "big.safetensors"),
            "big.safetensors, stored in part and then failed, is not unfinished: {unfinished}"
        );
        check_after_enospc(&fx, &m, &want);
    }
    // A daemon restart sweeps the staging the old one left.
    let m = fx.mount();
    assert!(fx.tmp_listing().is_empty(), "STORE/tmp after a daemon restart: {:?}", fx.tmp_listing());
    assert_no_dot_files_in_models(&fx);
    check_after_enospc(&fx, &m, &want);
    // What could not be stored is listed unfinished: check refuses the entry until it is
    // written again or removed.
    let f = fx.ts.run_full(["check"]);
    assert!(!f.status.success() && f.stdout.contains("unfinished"), "check after ENOSPC:\n{}", f.stdout);
    // With the space back, rm -r removes what was stored, and a small delta fits.
    let rm = rm_rf(&m.path().join("base/deltas/new"));
    assert!(rm.status.success(), "rm -r: {}", rm.stderr);
    fx.check_ok();
    assert!(fx.ls().iter().all(|e| e["name"] != "new"), "new still listed after rm -r");
    assert!(
        fx.ts.stored_files("new").is_empty(),
        "STORE/models/new after rm -r: {:?}",
        fx.ts.stored_files("new")
    );
    assert!(fx.tmp_listing().is_empty(), "STORE/tmp: {:?}", fx.tmp_listing());
    let small = fx.ts.path("small");
    fs::create_dir_all(&small).unwrap();
    for n in ["config.json", "generation_config.json", "tokenizer_config.json"] {
        fs::copy(ft.join(n), small.join(n)).unwrap();
    }
    let d = m.path().join("base/deltas/small");
    fs::create_dir(&d).unwrap();
    cp_r_ok(&small, &d);
    assert_same_files(&read_files(&m.path().join("small")), &files_of(&small), "MOUNT/small");
}

/// Issue 12: with a file open on two descriptors, a write that fails on one (a full disk) means
/// the file is not stored, and every close of it says so, the other descriptor's too; the
/// registry lists it unfinished until it is written again.
#[test]
fn a_failed_write_on_one_descriptor_fails_every_close() {
    let (_disk_dir, _tmpfs, fx, ft, _want) = full_disk_fixture();
    let m = fx.mount();
    let d = m.path().join("base/deltas/two");
    fs::create_dir(&d).unwrap();
    let p = d.join("big.safetensors");
    let bytes = [fs::read(ft.join(SHARD1)).unwrap(), fs::read(ft.join(SHARD2)).unwrap()].concat();
    let (a_write, a_close, b_close) = with_deadline("two descriptors, one full disk", OP, move || {
        let mut a = File::create(&p).unwrap();
        let mut b = OpenOptions::new().write(true).open(&p).unwrap();
        b.write_all(b"small").unwrap();
        let a_write = a.write_all(&bytes).err().and_then(|e| e.raw_os_error());
        // B closes first: its own writes went through, but the file's did not.
        let b_close = close_checked(b).err().and_then(|e| e.raw_os_error());
        let a_close = close_checked(a).err().and_then(|e| e.raw_os_error());
        (a_write, a_close, b_close)
    });
    assert_eq!(a_write, Some(libc::ENOSPC), "the write past a full disk");
    assert!(b_close.is_some(), "close of the other descriptor succeeded although nothing was stored");
    assert!(a_close.is_some(), "close of the failed descriptor succeeded");
    let info = fx.info("two");
    // A FLUSH from another test's forked child (its exec closes the descriptors it inherited)
    // may have stored the file before the write failed: whatever was stored, the file stays
    // unfinished, so the entry never shows it as a whole file.
    assert_eq!(info["unfinished"], serde_json::json!(["big.safetensors"]), "{info:#}");
    let shown = m.path().join("two/big.safetensors");
    let e = with_deadline("reading the unfinished file", OP, move || errno_of(fs::read(&shown)));
    assert!(e.is_some(), "MOUNT/two/big.safetensors reads although its write failed: {info:#}");
    let f = fx.ts.run_full(["check"]);
    assert!(!f.status.success() && f.stdout.contains("big.safetensors"), "check:\n{}", f.stdout);
    // Removing it completes (here: empties) the entry.
    fs::remove_file(d.join("big.safetensors")).unwrap();
    assert!(fx.info("two")["unfinished"].as_array().unwrap().is_empty());
    fx.check_ok();
}

/// A stored file rewritten through deltas/ whose rewrite failed (a full disk) is unfinished:
/// it answers EIO, neither its old bytes nor a part of the new ones, until written again.
#[test]
fn a_stored_file_whose_rewrite_failed_answers_eio() {
    let (_disk_dir, _tmpfs, fx, ft, _want) = full_disk_fixture();
    let m = fx.mount();
    let d = m.path().join("base/deltas/re");
    fs::create_dir(&d).unwrap();
    let p = d.join("notes.txt");
    fs::write(&p, b"first").unwrap();
    assert_eq!(fs::read(m.path().join("re/notes.txt")).unwrap(), b"first");
    let bytes = [fs::read(ft.join(SHARD1)).unwrap(), fs::read(ft.join(SHARD2)).unwrap()].concat();
    let (write, close) = with_deadline("a rewrite past a full disk", OP, move || {
        let mut f = File::create(&p).unwrap();
        let write = f.write_all(&bytes).err().and_then(|e| e.raw_os_error());
        (write, close_checked(f).err().and_then(|e| e.raw_os_error()))
    });
    assert_eq!(write, Some(libc::ENOSPC), "the rewrite past a full disk");
    assert!(close.is_some(), "close of a file that was not stored succeeded");
    assert_eq!(fx.info("re")["unfinished"], serde_json::json!(["notes.txt"]));
    let shown = m.path().join("re/notes.txt");
    let e = with_deadline("reading the unfinished file", OP, move || errno_of(fs::read(&shown)));
    assert_eq!(e, Some(libc::EIO), "MOUNT/re/notes.txt reads although its rewrite failed");
}

#[test]
fn rm_r_after_a_full_disk_cleans_the_staging() {
    let (_disk_dir, _tmpfs, fx, ft, want) = full_disk_fixture();
    let m = fx.mount();
    let d = m.path().join("base/deltas/new");
    fs::create_dir(&d).unwrap();
    let f = cp_r(&ft, &d);
    assert!(!f.status.success(), "cp of {} bytes into a 12 MiB store succeeded", dir_size(&ft));
    check_after_enospc(&fx, &m, &want);
    let rm = rm_rf(&d);
    assert!(rm.status.success(), "rm -r right after ENOSPC: {}", rm.stderr);
    assert!(fx.ls().iter().all(|e| e["name"] != "new"), "new still listed after rm -r");
    assert!(fx.tmp_listing().is_empty(), "STORE/tmp after rm -r: {:?}", fx.tmp_listing());
    assert!(
        fx.ts.stored_files("new").is_empty(),
        "STORE/models/new after rm -r: {:?}",
        fx.ts.stored_files("new")
    );
    check_after_enospc(&fx, &m, &want);
}

// ---------------------------------------------------------------------------------------------
// 6. kill -9 of the daemon mid-write
// ---------------------------------------------------------------------------------------------

#[test]
fn kill_9_mid_write_leaves_no_staging_and_no_half_entry() {
    let spec = ModelSpec { shards: 4, seed: 41, ..big_spec(4) };
    let fx = Fx::with_spec(&spec);
    let ft = fx.finetune("ft", 15);
    let want = files_of(&ft);
    let mp = fx.root().join("mnt-kill");
    // The kill races the daemon: it may finish storing the file seen unfinished before SIGKILL
    // lands, and then nothing is left to find. The registry a dead daemon left tells which
    // happened; such a round is run again under a new name (bounded), every assertion kept.
    let (mut caught, mut missed) = (None, vec![]);
    for round in 0..5 {
        let name = format!("new{round}");
        let m = MountGuard::new(&fx.ts, &mp, &[]);
        let pid = m.pid().unwrap();
        let d = m.path().join("base/deltas").join(&name);
        fs::create_dir(&d).unwrap();
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", "100", "cp", "-r"]).arg(ft.join(".")).arg(format!("{}/", d.display()));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut cp = ChildGuard(Some(cmd.spawn().unwrap()));
        // Kill when a file is stored and another is being written (the registry lists it as
        // unfinished), or at the latest when cp ends.
        let mid_copy = || {
            let r = fx.ts.registry_json();
            r["entries"][&name]["files"].as_array().is_some_and(|f| !f.is_empty())
                && r["unfinished"][&name]["files"].as_array().is_some_and(|f| !f.is_empty())
        };
        let start = Instant::now();
        let mut mid = false;
        loop {
            if mid_copy() {
                mid = true;
                break;
            }
            if cp.0.as_mut().unwrap().try_wait().unwrap().is_some()
                || start.elapsed() > Duration::from_secs(60)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let status = with_deadline("cp after the kill", OP, move || cp.0.take().unwrap().wait().unwrap());
        eprintln!("round {round}: killed mid-write: {mid}; cp: {status}");
        assert!(mid, "could not catch cp mid-write (it ended first)");
        assert!(!status.success(), "cp succeeded although the daemon was killed");

        let f = fx.ts.run_full([os("umount"), os(m.path())]);
        assert!(f.status.success(), "llmfs umount of a dead mount: {}", f.stderr);
        assert!(!llmfs_mounted(m.path()));
        drop(m);
        let left = fx.ts.registry_json();
        if left["unfinished"][&name]["files"].as_array().is_some_and(|f| !f.is_empty()) {
            caught = Some((name, d));
            break;
        }
        eprintln!("round {round}: the daemon stored the file in flight before the kill landed; again");
        missed.push(d);
    }
    let (name, d) = caught.expect("no round of 5 killed the daemon with a file unfinished");
    let m = MountGuard::new(&fx.ts, &mp, &[]);
    assert!(fx.tmp_listing().is_empty(), "STORE/tmp after a restart: {:?}", fx.tmp_listing());
    assert_no_dot_files_in_models(&fx);
    let listed: Vec<String> = fx.info(&name)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!listed.is_empty(), "registry lists {listed:?}");
    let got = read_files(&m.path().join(&name));
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), listed, "MOUNT/{name} lists what the registry does");
    for file in &listed {
        assert_same_bytes(&got[file], &want[file], &format!("MOUNT/{name}/{file} after kill -9"));
    }
    // The file being written when the daemon died is unfinished: check fails, naming it.
    let f = fx.ts.run_full(["check"]);
    assert!(!f.status.success(), "check passed an entry whose copy was killed:\n{}", f.stdout);
    let unfinished = fx.info(&name)["unfinished"].as_array().unwrap().clone();
    assert!(!unfinished.is_empty(), "no unfinished file after kill -9");
    for u in &unfinished {
        let u = u.as_str().unwrap();
        assert!(f.stdout.contains(u), "check does not name {u}:\n{}", f.stdout);
    }
    // Writing the files again completes it (and the rounds missed, for the checks below).
    for d in missed.iter().chain([&d]) {
        cp_r_ok(&ft, d);
    }
    assert!(fx.info(&name)["unfinished"].as_array().unwrap().is_empty());
    assert_same_files(
        &read_files(&m.path().join(&name)),
        &want,
        &format!("MOUNT/{name} after a second cp -r"),
    );
    // A container stored but not yet named by the registry when the daemon died (an object
    // uploaded before its commit, on S3) is what gc is for.
    fx.ts.ok(["gc", "--min-age", "0"]);
    fx.check_ok();
    // The restarted daemon takes a whole copy.
    let again = m.path().join("base/deltas/again");
    fs::create_dir(&again).unwrap();
    cp_r_ok(&ft, &again);
    assert_same_files(&read_files(&m.path().join("again")), &want, "MOUNT/again after the restart");
    assert_same_files(&files_of(&fx.export("again")), &want, "export of again");
}

// ---------------------------------------------------------------------------------------------
// 7. Deltas over variants and over deltas
// ---------------------------------------------------------------------------------------------

#[test]
fn deltas_over_a_cast_and_over_a_delta() {
    let fx = Fx::new();
    fx.ok(&[os("cast"), os("f32"), os("--base"), os("base"), os("--dtype"), os("f32")]);
    let f32_dir = fx.export("f32");
    let ft32 = fx.finetune_of(&f32_dir, "ft32", 20);
    fx.make("ft32", "f32", &ft32, None);
    let want32 = files_of(&ft32);
    assert_same_files(&files_of(&fx.export("ft32")), &want32, "export of ft32 (over a cast)");
    let based = based_of(&fx, "ft32", SHARD1);
    assert!(based.contains("model.embed_tokens.weight"), "not coded against the f32 cast: {based:?}");
    assert!(fx.info("ft32")["recipe"]["stored_bytes"].as_u64().unwrap() < dir_size(&ft32));

    // A chain: d1 over base, d2 over d1, and d3 over d2 written through the mount.
    let ft1 = fx.finetune("ft1", 21);
    fx.make("d1", "base", &ft1, None);
    let ft2 = fx.finetune_of(&ft1, "ft2", 22);
    fx.make("d2", "d1", &ft2, None);
    let ft3 = fx.finetune_of(&ft2, "ft3", 23);
    let want2 = files_of(&ft2);
    assert_same_files(&files_of(&fx.export("d2")), &want2, "export of d2 (delta of a delta)");
    let f = fx.ts.run_full(["rm", "d1"]);
    assert_refused(&f, "rm of a delta another delta depends on", "d2");

    let m = fx.mount();
    assert_same_files(&read_files(&m.path().join("ft32")), &want32, "MOUNT/ft32");
    assert_same_files(&read_files(&m.path().join("f32/deltas/ft32")), &want32, "MOUNT/f32/deltas/ft32");
    assert_same_files(&read_files(&m.path().join("d2")), &want2, "MOUNT/d2");
    assert_same_files(&read_files(&m.path().join("d1")), &files_of(&ft1), "MOUNT/d1");
    let d3 = m.path().join("d2/deltas/d3");
    fs::create_dir(&d3).unwrap();
    cp_r_ok(&ft3, &d3);
    let want3 = files_of(&ft3);
    assert_same_files(
        &read_files(&m.path().join("d3")),
        &want3,
        "MOUNT/d3 (written over a delta of a delta)",
    );
    assert_same_files(&files_of(&fx.export("d3")), &want3, "export of d3");
    // A delta written over the cast through the mount.
    let d4 = m.path().join("f32/deltas/d4");
    fs::create_dir(&d4).unwrap();
    cp_r_ok(&ft32, &d4);
    assert_same_files(&read_files(&m.path().join("d4")), &want32, "MOUNT/d4 (written over a cast)");
    let e = fx.info("d3");
    assert_eq!((e["kind"].as_str(), e["recipe"]["base"].as_str()), (Some("delta"), Some("d2")));
    fx.check_ok();
}

/// The containers of entry `name` in the store, by file.
fn containers_of(fx: &Fx, name: &str) -> BTreeMap<String, Vec<u8>> {
    fx.ts.stored_contents(name)
}

/// No half-written files (dot files) left in the entries' directories of a local store. An
/// object store has no such files: what is written is staged in the node's tmp/ (checked by the
/// callers) and uploaded whole.
fn assert_no_dot_files_in_models(fx: &Fx) {
    if fx.ts.is_s3() {
        return;
    }
    for dir in names_in(&fx.ts.store.join("models")) {
        let left: Vec<_> = names_in(&fx.ts.store.join("models").join(&dir))
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "STORE/models/{dir}: {left:?}");
    }
}

/// Files written into `deltas/` are coded while they are written (`delta::stream`) when their
/// bytes come in order; out of order, rewritten or interleaved with other files, they still read
/// back byte-identical, and whichever way a file was coded its container is the very one `delta
/// make` writes for the same bytes.
#[test]
fn streamed_writes_store_what_delta_make_stores() {
    let fx = Fx::new();
    let ft = fx.finetune("ft", 21);
    let ft2 = fx.finetune("ft2", 22);
    let want = files_of(&ft);
    let want2 = files_of(&ft2);
    fx.make("mk", "base", &ft, None);
    let made = containers_of(&fx, "mk");
    let m = fx.mount();
    let deltas = m.path().join("base/deltas");

    // 1. cp -r: in order.
    fs::create_dir(deltas.join("cp")).unwrap();
    cp_r_ok(&ft, &deltas.join("cp"));

    // 2. Both shards through two descriptors at once, pieces of an odd size taken in turn.
    fs::create_dir(deltas.join("inter")).unwrap();
    let dir = deltas.join("inter");
    let files = want.clone();
    with_deadline("interleaved writers", OP, move || {
        let mut open: Vec<(File, &Vec<u8>, usize)> = files
            .iter()
            .map(|(n, b)| {
                (OpenOptions::new().write(true).create(true).truncate(true).open(dir.join(n)).unwrap(), b, 0)
            })
            .collect();
        const PIECE: usize = 100_003;
        while open.iter().any(|(_, b, at)| at < &b.len()) {
            for (f, b, at) in open.iter_mut() {
                let end = (*at + PIECE).min(b.len());
                f.write_all_at(&b[*at..end], *at as u64).unwrap();
                *at = end;
            }
        }
        for (f, _, _) in open {
            close_checked(f).unwrap();
        }
    });

    // 3. A gap filled last (writes past the prefix wait for it), and 4. a rewrite below the
    // prefix (bytes already coded change: the file is coded again at close).
    fs::create_dir(deltas.join("gap")).unwrap();
    fs::create_dir(deltas.join("rew")).unwrap();
    let (gap, rew) = (deltas.join("gap"), deltas.join("rew"));
    let (files, files2) = (want.clone(), want2.clone());
    let mixed = with_deadline("gap and rewrite", OP, move || {
        let mut mixed = BTreeMap::new();
        for (name, bytes) in &files {
            let (a, b) = (bytes.len() / 3, 2 * bytes.len() / 3);
            let f = OpenOptions::new().write(true).create(true).truncate(true).open(gap.join(name)).unwrap();
            f.write_all_at(&bytes[..a], 0).unwrap();
            f.write_all_at(&bytes[b..], b as u64).unwrap();
            f.write_all_at(&bytes[a..b], a as u64).unwrap();
            close_checked(f).unwrap();

            let f = OpenOptions::new().write(true).create(true).truncate(true).open(rew.join(name)).unwrap();
            f.write_all_at(bytes, 0).unwrap();
            let mut end = bytes.clone();
            let other = &files2[name];
            if other.len() == bytes.len() && name.ends_with(".safetensors") {
                // Same layout (same base): the second half of the data from the other fine-tune.
                let h = format::parse_header(bytes).unwrap();
                let from = (h.data_start as usize + bytes.len()) / 2;
                f.write_all_at(&other[from..], from as u64).unwrap();
                end[from..].copy_from_slice(&other[from..]);
            }
            close_checked(f).unwrap();
            mixed.insert(name.clone(), end);
        }
        mixed
    });
    assert_ne!(mixed, want, "the rewrite changed nothing");

    for (name, what) in [("cp", &want), ("inter", &want), ("gap", &want), ("rew", &mixed)] {
        assert_same_files(&read_files(&m.path().join(name)), what, &format!("MOUNT/{name}"));
        assert_same_files(&read_files(&deltas.join(name)), what, &format!("MOUNT/base/deltas/{name}"));
    }
    drop(m);
    for name in ["cp", "inter", "gap"] {
        let got = containers_of(&fx, name);
        assert_eq!(got.keys().collect::<Vec<_>>(), made.keys().collect::<Vec<_>>(), "files of {name}");
        for (file, bytes) in &made {
            assert!(got[file] == *bytes, "{name}/{file}: the container differs from delta make's");
        }
    }
    assert_same_files(&files_of(&fx.export("rew")), &mixed, "export of rew");
    assert!(fx.tmp_listing().is_empty(), "staging left behind: {:?}", fx.tmp_listing());
    fx.check_ok();
}

/// truncate(2) of a stored file right after a close() of it (whose RELEASE the kernel sends
/// asynchronously, so the file may still be staged for that closing descriptor): the new size
/// is what stat answers at once and what is stored. It used to be lost now and then (the staged
/// copy it was set on went with the release: stat said 0, then the old bytes came back), and
/// stat answered the old size for the attribute timeout.
#[test]
fn truncate_right_after_a_close_keeps_the_new_size() {
    let fx = Fx::new();
    let m = fx.mount();
    let d = m.path().join("base/deltas/new");
    fs::create_dir(&d).unwrap();
    let d2 = d.clone();
    let got = with_deadline("truncate after close", OP, move || {
        (0..10)
            .map(|i| {
                let p = d2.join(format!("notes{i}.txt"));
                fs::write(&p, b"second!").unwrap();
                // An open for writing that changes nothing but the time (its close stores).
                File::options().write(true).open(&p).unwrap().set_modified(std::time::UNIX_EPOCH).unwrap();
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: truncate(2) reads a NUL-terminated path.
                assert_eq!(unsafe { libc::truncate(c.as_ptr(), 2) }, 0);
                (fs::metadata(&p).unwrap().len(), fs::read(&p).unwrap())
            })
            .collect::<Vec<_>>()
    });
    for (i, (size, bytes)) in got.iter().enumerate() {
        assert_eq!((*size, bytes.as_slice()), (2, &b"se"[..]), "notes{i}.txt right after truncate");
    }
    let exported = files_of(&fx.export("new"));
    for i in 0..10 {
        assert_eq!(exported[&format!("notes{i}.txt")], b"se", "exported notes{i}.txt");
    }
    fx.check_ok();
}

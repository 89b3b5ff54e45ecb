//! The reference-model test (mountpoint-s3's `reftests`): random sequences of operations — add,
//! cast, quantize, delta make, write a fine-tune into `deltas/`, rm, read a range — applied both
//! to a real llmfs mount (through the CLI and the mounted files) and to [`Reference`], a small
//! in-memory model of what every file of every entry must contain. The reference is the only
//! definition of correctness here: it computes each file's bytes on its own, from the generated
//! models and the library's *reference* functions (`quant::quantize` + `dequantize_reference`,
//! `half`'s round-to-nearest-even conversions, `HeaderBuilder`'s spec layout), never from what
//! the mount or `llmfs export` produce. Every read through the mount is compared byte for byte,
//! every listing name for name, every refusal (a taken name, an entry others depend on) must be a
//! refusal.
//!
//! Operations are generated from a seeded SplitMix64 rather than proptest: each case needs a real
//! mount, so shrinking by re-running is too slow to be automatic. An [`Op`] names entries and
//! files by index into the current (sorted) lists, so any op list is valid against any state and
//! a failing list can be cut down by hand and kept as a `regression_*` test (see the bottom).
//!
//! CI: `CASES` sequences of `OPS` operations from a fixed seed (about 10 s). By hand:
//! `LLMFS_REFMODEL_CASES=50 [LLMFS_REFMODEL_SEED=N] [LLMFS_REFMODEL_OPS=M] cargo test --test reference_model -- --nocapture`.
//! Needs /dev/fuse and permission to mount, as tests/mount.rs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{run_command, with_deadline, MountGuard, TestStore};
use half::{bf16, f16};
use llmfs::codec::quant::{self, QuantConfig, QuantFloat};
use llmfs::codec::quant_file::is_linear_weight;
use llmfs::demo::{self, ModelSpec, SplitMix64};
use llmfs::format::{self, Dtype, HeaderBuilder};
use serde_json::Value;

/// Sequences run in CI, and operations per sequence: about 10 s on two cores.
const CASES: usize = 12;
const OPS: usize = 40;
const SEED: u64 = 0x11F5_2EF0;
/// Deadline of one blocking file operation or listing.
const OP_DEADLINE: Duration = Duration::from_secs(60);
/// How long a change made through the CLI may take to show in the mount's listings.
const VISIBLE: Duration = Duration::from_secs(10);
const INDEX: &str = "model.safetensors.index.json";

/// The generated models entries are added from: three dtypes, one sharded (with an index), odd
/// shapes (kv_heads < heads, an intermediate size that is not a power of two).
fn specs() -> Vec<ModelSpec> {
    vec![
        ModelSpec {
            hidden: 32,
            intermediate: 64,
            layers: 1,
            heads: 2,
            kv_heads: 2,
            vocab: 64,
            dtype: Dtype::BF16,
            shards: 1,
            seed: 1,
        },
        ModelSpec {
            hidden: 32,
            intermediate: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 96,
            dtype: Dtype::F16,
            shards: 2,
            seed: 2,
        },
        ModelSpec {
            hidden: 16,
            intermediate: 40,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            vocab: 50,
            dtype: Dtype::F32,
            shards: 1,
            seed: 3,
        },
    ]
}

/// Group sizes the quantize op draws from: each ≤ the smallest row (16 columns) of every spec.
const GROUPS: [usize; 4] = [3, 4, 8, 16];
/// Names per kind of entry: few, so that names are taken (a refusal) and reused after an rm.
const POOL: usize = 3;

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// `llmfs add mN SPEC_DIR --chat-template none`.
    Add { spec: usize, name: usize },
    /// `llmfs cast cN --base ENTRY --dtype f16|f32`.
    Cast { entry: usize, f32: bool, name: usize },
    /// `llmfs quantize qN --base ENTRY --bits 8|4 --group-size G [--asymmetric]`.
    Quantize { entry: usize, bits4: bool, group: usize, asym: bool, name: usize },
    /// `llmfs delta make dN --base ENTRY --target FT` (FT: a fine-tune of ENTRY's root model).
    DeltaMake { entry: usize, seed: u64, name: usize },
    /// `cp -r FT/. MOUNT/ENTRY/deltas/wN/`.
    WriteDelta { entry: usize, seed: u64, name: usize },
    /// `llmfs rm ENTRY`.
    Rm { entry: usize },
    /// pread of `len` bytes at `offset % size` of one file of one entry (`len == 0`: the whole file).
    Read { entry: usize, file: usize, offset: u64, len: usize },
}

fn generate(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = SplitMix64(seed);
    let mut r = |m: u64| (rng.next_u64() % m) as usize;
    (0..n)
        .map(|i| match if i == 0 { 0 } else { r(100) } {
            0..=13 => Op::Add { spec: r(3), name: r(POOL as u64) },
            14..=27 => Op::Cast { entry: r(64), f32: r(2) == 1, name: r(POOL as u64) },
            28..=41 => Op::Quantize {
                entry: r(64),
                bits4: r(2) == 1,
                group: r(GROUPS.len() as u64),
                asym: r(2) == 1,
                name: r(POOL as u64),
            },
            42..=49 => Op::DeltaMake { entry: r(64), seed: r(1000) as u64, name: r(POOL as u64) },
            50..=56 => Op::WriteDelta { entry: r(64), seed: r(1000) as u64, name: r(POOL as u64) },
            57..=66 => Op::Rm { entry: r(64) },
            _ => Op::Read {
                entry: r(64),
                file: r(64),
                offset: r(1 << 30) as u64,
                len: if r(5) == 0 { 0 } else { 1 + r(70_000) },
            },
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The reference
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Arc<Vec<u8>>,
}

/// One safetensors file as tensors in file order and its `__metadata__`.
#[derive(Clone, Debug)]
struct Weights {
    metadata: Vec<(String, String)>,
    tensors: Vec<Tensor>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Base,
    Cast,
    Quantized,
    Delta,
}

#[derive(Clone, Debug)]
struct RefEntry {
    kind: Kind,
    /// The entry it is derived from (what `rm` must protect).
    base: Option<String>,
    /// The generated model at the root of its chain (what fine-tunes are made from).
    root: usize,
    /// Every file's exact bytes.
    files: BTreeMap<String, Arc<Vec<u8>>>,
    /// The weight files' tensors, from which variants derive theirs.
    weights: BTreeMap<String, Weights>,
}

/// What each entry of the store must show.
#[derive(Default)]
struct Reference {
    entries: BTreeMap<String, RefEntry>,
}

fn parse_weights(bytes: &[u8]) -> Weights {
    let h = format::parse_header(bytes).expect("a generated safetensors file parses");
    let metadata = h.metadata.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect();
    let tensors = h
        .tensors
        .iter()
        .map(|t| Tensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: Arc::new(
                bytes[(h.data_start + t.start) as usize..(h.data_start + t.end) as usize].to_vec(),
            ),
        })
        .collect();
    Weights { metadata, tensors }
}

/// The spec layout: header from HeaderBuilder (metadata in order, tensors in order), then data.
fn render(w: &Weights) -> Vec<u8> {
    let mut b = HeaderBuilder::new();
    for (k, v) in &w.metadata {
        b = b.metadata(k, v);
    }
    for t in &w.tensors {
        b.tensor(&t.name, t.dtype, &t.shape);
    }
    let (mut bytes, _) = b.build();
    for t in &w.tensors {
        bytes.extend_from_slice(&t.data);
    }
    bytes
}

/// A real directory as the reference sees it: every file's bytes, weight files parsed.
fn entry_of_dir(dir: &Path, kind: Kind, base: Option<String>, root: usize) -> RefEntry {
    let mut files = BTreeMap::new();
    let mut weights = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = fs::read(e.path()).unwrap();
        if name.ends_with(".safetensors") {
            weights.insert(name.clone(), parse_weights(&bytes));
        }
        files.insert(name, Arc::new(bytes));
    }
    RefEntry { kind, base, root, files, weights }
}

/// A variant: the base's files, each weight file rebuilt from `f` of its tensors with
/// `llmfs: label` added to the metadata, and the shard index's `metadata.total_size` set to the
/// variant's tensor bytes (everything else in the index kept).
fn derive(
    kind: Kind,
    base_name: &str,
    base: &RefEntry,
    label: &str,
    f: impl Fn(&Tensor) -> Tensor,
) -> RefEntry {
    let mut weights = BTreeMap::new();
    let mut files = base.files.clone();
    let mut total = 0u64;
    for (name, w) in &base.weights {
        let mut metadata = w.metadata.clone();
        match metadata.iter_mut().find(|(k, _)| k == "llmfs") {
            Some(kv) => kv.1 = label.to_owned(),
            None => metadata.push(("llmfs".into(), label.to_owned())),
        }
        let derived = Weights { metadata, tensors: w.tensors.iter().map(&f).collect() };
        total += derived.tensors.iter().map(|t| t.data.len() as u64).sum::<u64>();
        files.insert(name.clone(), Arc::new(render(&derived)));
        weights.insert(name.clone(), derived);
    }
    if let Some(index) = base.files.get(INDEX) {
        let mut v: Value = serde_json::from_slice(index).unwrap();
        let obj = v.as_object_mut().unwrap();
        let meta = obj.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
        meta.as_object_mut().unwrap().insert("total_size".into(), total.into());
        let mut bytes = serde_json::to_vec_pretty(&v).unwrap();
        bytes.push(b'\n');
        files.insert(INDEX.into(), Arc::new(bytes));
    }
    RefEntry { kind, base: Some(base_name.to_owned()), root: base.root, files, weights }
}

fn to_f32(dtype: Dtype, b: &[u8]) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        other => unreachable!("{other} is not a float"),
    }
}

/// Round-to-nearest-even conversion of a float tensor (f16/bf16 → f32 is exact, so one rounding).
fn cast_tensor(t: &Tensor, to: Dtype) -> Tensor {
    if !t.dtype.is_float() || t.dtype == to {
        return t.clone();
    }
    let mut out = Vec::with_capacity(t.data.len() / t.dtype.size() * to.size());
    for e in t.data.chunks_exact(t.dtype.size()) {
        let v = to_f32(t.dtype, e);
        match to {
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
    Tensor { dtype: to, data: Arc::new(out), ..t.clone() }
}

fn roundtrip<T: QuantFloat>(bytes: &[u8], rows: usize, cols: usize, cfg: QuantConfig) -> Vec<u8> {
    let data: Vec<T> = bytes.chunks_exact(T::SIZE).map(T::read_le).collect();
    let q = quant::quantize::<T>(&data, rows, cols, cfg);
    let mut out = vec![T::default(); rows * cols];
    quant::dequantize_reference(q.view(), 0..rows * cols, &mut out);
    let mut bytes = vec![0u8; out.len() * T::SIZE];
    for (b, v) in bytes.chunks_exact_mut(T::SIZE).zip(out) {
        v.write_le(b);
    }
    bytes
}

/// FastChat's compress + decompress of the linear weights (the library's scalar reference).
fn quantize_tensor(t: &Tensor, cfg: QuantConfig) -> Tensor {
    if !is_linear_weight(&t.name, &t.shape, t.dtype) || t.shape.contains(&0) {
        return t.clone();
    }
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let data = match t.dtype {
        Dtype::F32 => roundtrip::<f32>(&t.data, rows, cols, cfg),
        Dtype::F16 => roundtrip::<f16>(&t.data, rows, cols, cfg),
        Dtype::BF16 => roundtrip::<bf16>(&t.data, rows, cols, cfg),
        other => unreachable!("{other}"),
    };
    Tensor { data: Arc::new(data), ..t.clone() }
}

impl Reference {
    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
    fn pick(&self, i: usize) -> Option<String> {
        let names = self.names();
        (!names.is_empty()).then(|| names[i % names.len()].clone())
    }
    /// Re-quantizing dequantized values only adds error: `quantize` refuses an entry with a
    /// quantized entry anywhere down its chain.
    fn quantized_chain(&self, name: &str) -> bool {
        let mut at = Some(name);
        while let Some(n) = at {
            let e = &self.entries[n];
            if e.kind == Kind::Quantized {
                return true;
            }
            at = e.base.as_deref();
        }
        false
    }
    fn dependents(&self, name: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(_, e)| e.base.as_deref() == Some(name))
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The system under test
// ---------------------------------------------------------------------------------------------

// The mount drops before its temporary directory (fields drop in order).
struct World {
    mount: MountGuard,
    ts: TestStore,
    model_dirs: Vec<PathBuf>,
    reference: Reference,
    /// What happened so far, printed when a check fails.
    log: Vec<String>,
    finetunes: usize,
    /// Counters for the summary line: commands that succeeded / were refused, bytes compared.
    stats: Stats,
}

#[derive(Debug, Default)]
struct Stats {
    done: usize,
    refused: usize,
    reads: usize,
    bytes: u64,
}

impl World {
    fn new() -> World {
        let ts = TestStore::new();
        let model_dirs: Vec<PathBuf> = specs()
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let dir = ts.path(format!("model{i}"));
                common::write_model(&dir, spec);
                dir
            })
            .collect();
        // Create the store (an empty catalogue) before mounting it.
        ts.ok(["ls"]);
        let mp = ts.path("mnt");
        let mount = MountGuard::new(&ts, &mp, &[]);
        World {
            ts,
            mount,
            model_dirs,
            reference: Reference::default(),
            log: vec![],
            finetunes: 0,
            stats: Stats::default(),
        }
    }

    #[track_caller]
    fn fail(&self, what: String) -> ! {
        panic!(
            "{what}\n--- operations so far ---\n{}\n--- daemon log ---\n{}",
            self.log.join("\n"),
            self.mount.log_text()
        );
    }

    /// Runs `llmfs ARGS`; checks it succeeded exactly when `expect_ok`.
    fn cli(&mut self, args: &[&str], expect_ok: bool) {
        self.log.push(format!(
            "    llmfs {}  (expect {})",
            args.join(" "),
            if expect_ok { "success" } else { "a refusal" }
        ));
        let f = self.ts.run_full(args);
        if expect_ok {
            self.stats.done += 1;
        } else {
            self.stats.refused += 1;
        }
        if f.status.success() != expect_ok {
            self.fail(format!(
                "llmfs {} {} ({}), expected {}:\n{}{}",
                args.join(" "),
                if f.status.success() { "succeeded" } else { "failed" },
                f.status,
                if expect_ok { "success" } else { "a refusal" },
                f.stdout,
                f.stderr
            ));
        }
    }

    fn finetune(&mut self, root: usize, seed: u64) -> PathBuf {
        self.finetunes += 1;
        let dir = self.ts.path(format!("ft{}", self.finetunes));
        demo::write_finetune(&self.model_dirs[root], &dir, 0.5, seed).unwrap();
        dir
    }

    fn apply(&mut self, op: &Op) {
        self.log.push(format!("{op:?}"));
        match *op {
            Op::Add { spec, name } => {
                let name = format!("m{name}");
                let dir = self.model_dirs[spec].clone();
                let ok = !self.reference.entries.contains_key(&name);
                self.cli(&["add", &name, dir.to_str().unwrap(), "--chat-template", "none"], ok);
                if ok {
                    self.reference.entries.insert(name, entry_of_dir(&dir, Kind::Base, None, spec));
                }
            }
            Op::Cast { entry, f32, name } => {
                let Some(base) = self.reference.pick(entry) else { return };
                let name = format!("c{name}");
                let (dtype, arg) = if f32 { (Dtype::F32, "f32") } else { (Dtype::F16, "f16") };
                let ok = !self.reference.entries.contains_key(&name);
                self.cli(&["cast", &name, "--base", &base, "--dtype", arg], ok);
                if ok {
                    let mut e = derive(
                        Kind::Cast,
                        &base,
                        &self.reference.entries[&base],
                        &format!("cast {name}"),
                        |t| cast_tensor(t, dtype),
                    );
                    // A cast's config.json names its dtype (`dtype`, and `torch_dtype` where the
                    // base's has it), pretty-printed as transformers writes it; unchanged if it
                    // already says so.
                    if let Some(config) = e.files.get("config.json").cloned() {
                        let torch = if f32 { "float32" } else { "float16" };
                        let mut json: serde_json::Map<String, Value> =
                            serde_json::from_slice(&config).unwrap();
                        let before = json.clone();
                        if json.get("dtype").and_then(Value::as_str) != Some(torch)
                            || json.get("torch_dtype").is_some_and(|v| v.as_str() != Some(torch))
                        {
                            json.insert("dtype".into(), torch.into());
                            if json.contains_key("torch_dtype") {
                                json.insert("torch_dtype".into(), torch.into());
                            }
                        }
                        if json != before {
                            let mut bytes = serde_json::to_vec_pretty(&Value::Object(json)).unwrap();
                            bytes.push(b'\n');
                            e.files.insert("config.json".into(), Arc::new(bytes));
                        }
                    }
                    self.reference.entries.insert(name, e);
                }
            }
            Op::Quantize { entry, bits4, group, asym, name } => {
                let Some(base) = self.reference.pick(entry) else { return };
                let name = format!("q{name}");
                let cfg = QuantConfig {
                    bits: if bits4 { 4 } else { 8 },
                    group_size: GROUPS[group],
                    symmetric: !asym,
                };
                let ok =
                    !self.reference.entries.contains_key(&name) && !self.reference.quantized_chain(&base);
                let (bits, gs) = (cfg.bits.to_string(), cfg.group_size.to_string());
                let mut args = vec!["quantize", &name, "--base", &base, "--bits", &bits, "--group-size", &gs];
                if asym {
                    args.push("--asymmetric");
                }
                self.cli(&args, ok);
                if ok {
                    let e = derive(
                        Kind::Quantized,
                        &base,
                        &self.reference.entries[&base],
                        &format!("quantized {name}"),
                        |t| quantize_tensor(t, cfg),
                    );
                    self.reference.entries.insert(name, e);
                }
            }
            Op::DeltaMake { entry, seed, name } => {
                let Some(base) = self.reference.pick(entry) else { return };
                let name = format!("d{name}");
                let root = self.reference.entries[&base].root;
                let ft = self.finetune(root, seed);
                let ok = !self.reference.entries.contains_key(&name);
                self.cli(&["delta", "make", &name, "--base", &base, "--target", ft.to_str().unwrap()], ok);
                if ok {
                    self.reference.entries.insert(name, entry_of_dir(&ft, Kind::Delta, Some(base), root));
                }
            }
            Op::WriteDelta { entry, seed, name } => {
                let Some(base) = self.reference.pick(entry) else { return };
                let name = format!("w{name}");
                let root = self.reference.entries[&base].root;
                let ft = self.finetune(root, seed);
                let ok = !self.reference.entries.contains_key(&name);
                let dest = self.mount.path().join(&base).join("deltas").join(&name);
                let mut cmd = Command::new("timeout");
                cmd.args(["-k", "5", "60", "cp", "-r"]).arg(ft.join(".")).arg(format!("{}/", dest.display()));
                self.log.push(format!(
                    "    cp -r {}/. {}/  (expect {})",
                    ft.display(),
                    dest.display(),
                    if ok { "success" } else { "a refusal" }
                ));
                let f = run_command(cmd, Duration::from_secs(90));
                if f.status.success() != ok {
                    self.fail(format!(
                        "cp -r {} {}: {} ({})",
                        ft.display(),
                        dest.display(),
                        f.status,
                        f.stderr
                    ));
                }
                if ok {
                    self.reference.entries.insert(name, entry_of_dir(&ft, Kind::Delta, Some(base), root));
                }
            }
            Op::Rm { entry } => {
                let Some(name) = self.reference.pick(entry) else { return };
                let ok = self.reference.dependents(&name).is_empty();
                self.cli(&["rm", &name], ok);
                if ok {
                    self.reference.entries.remove(&name);
                }
            }
            Op::Read { entry, file, offset, len } => {
                let Some(name) = self.reference.pick(entry) else { return };
                let e = &self.reference.entries[&name];
                let (fname, want) =
                    e.files.iter().nth(file % e.files.len()).map(|(n, b)| (n.clone(), b.clone())).unwrap();
                self.read_and_compare(&name, &fname, &want, offset, len);
                return;
            }
        }
        self.compare_listings();
    }

    /// pread through the mount and compare with the reference's bytes.
    fn read_and_compare(&mut self, entry: &str, file: &str, want: &[u8], offset: u64, len: usize) {
        // A debugging knob for exploring past a known failure: LLMFS_REFMODEL_SKIP=FILE,... .
        if std::env::var("LLMFS_REFMODEL_SKIP").is_ok_and(|v| v.split(',').any(|f| f == file)) {
            return;
        }
        let path = self.mount.path().join(entry).join(file);
        let size = want.len() as u64;
        let (off, len) = if len == 0 || size == 0 { (0, size as usize) } else { (offset % size, len) };
        let p = path.clone();
        let got = with_deadline(
            &format!("reading {}", path.display()),
            OP_DEADLINE,
            move || -> std::io::Result<(u64, Vec<u8>)> {
                let f = File::open(&p)?;
                let st = f.metadata()?.len();
                let mut buf = vec![0u8; len];
                let mut n = 0;
                while n < len {
                    let r = f.read_at(&mut buf[n..], off + n as u64)?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                buf.truncate(n);
                Ok((st, buf))
            },
        );
        let what = format!("{entry}/{file} [{off}, +{len}) of {size}");
        self.log.push(format!("    read {what}"));
        match got {
            Err(e) => self.fail(format!("{what}: {e}")),
            Ok((st, _)) if st != size => self.fail(format!("{what}: the mount says the file has {st} bytes")),
            Ok((_, bytes)) => {
                self.stats.reads += 1;
                self.stats.bytes += bytes.len() as u64;
                let end = (off as usize + len).min(want.len());
                let expect = &want[off as usize..end];
                if bytes != expect {
                    let first = bytes
                        .iter()
                        .zip(expect)
                        .position(|(a, b)| a != b)
                        .unwrap_or(bytes.len().min(expect.len()));
                    self.fail(format!(
                        "{what}: {} bytes read, {} expected; first difference at offset {}",
                        bytes.len(),
                        expect.len(),
                        off as usize + first
                    ));
                }
            }
        }
    }

    fn listing(&self, dir: &Path) -> std::io::Result<BTreeSet<String>> {
        let d = dir.to_owned();
        with_deadline(&format!("listing {}", dir.display()), OP_DEADLINE, move || {
            fs::read_dir(d)?.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect()
        })
    }

    /// The root lists exactly the reference's entries (once the daemon has seen the change), and
    /// each entry directory its files and `deltas`.
    fn compare_listings(&self) {
        let want: BTreeSet<String> = self.reference.entries.keys().cloned().collect();
        let start = Instant::now();
        loop {
            match self.listing(self.mount.path()) {
                Ok(got) if got == want => break,
                Ok(got) if start.elapsed() > VISIBLE => {
                    self.fail(format!("the mount lists {got:?}, the reference {want:?}"))
                }
                Err(e) if start.elapsed() > VISIBLE => self.fail(format!("listing the mount: {e}")),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        for (name, e) in &self.reference.entries {
            let mut want: BTreeSet<String> = e.files.keys().cloned().collect();
            want.insert("deltas".into());
            match self.listing(&self.mount.path().join(name)) {
                Ok(got) if got == want => {}
                other => self.fail(format!("{name}/ lists {other:?}, the reference {want:?}")),
            }
        }
    }
}

fn run_ops(ops: &[Op]) {
    let mut world = World::new();
    for op in ops {
        world.apply(op);
    }
    // Finally every file of every entry, whole.
    let all: Vec<(String, String, Arc<Vec<u8>>)> = world
        .reference
        .entries
        .iter()
        .flat_map(|(n, e)| e.files.iter().map(move |(f, b)| (n.clone(), f.clone(), b.clone())))
        .collect();
    world.log.push("(final: every file, whole)".into());
    for (entry, file, bytes) in all {
        world.read_and_compare(&entry, &file, &bytes, 0, 0);
    }
    eprintln!("  {:?}, {} entries at the end", world.stats, world.reference.entries.len());
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn mount_matches_the_reference_model() {
    let cases = env_usize("LLMFS_REFMODEL_CASES", CASES);
    let ops = env_usize("LLMFS_REFMODEL_OPS", OPS);
    let seed = std::env::var("LLMFS_REFMODEL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(SEED);
    for case in 0..cases {
        let case_seed = seed.wrapping_add(case as u64);
        let list = generate(case_seed, ops);
        eprintln!(
            "reference model: case {case} (LLMFS_REFMODEL_SEED={case_seed} LLMFS_REFMODEL_CASES=1), {} ops",
            list.len()
        );
        run_ops(&list);
    }
}

// ---------------------------------------------------------------------------------------------
// Shrunk failures, kept (named after what they guard)
// ---------------------------------------------------------------------------------------------

/// A cast of a delta entry of a sharded model: the delta's index is a stored (synthesized) file,
/// which `map_weights` did not rewrite, so the cast's `model.safetensors.index.json` kept the
/// delta's `metadata.total_size` (its f16 bytes), not the cast's (f32).
#[test]
fn regression_index_total_size_of_a_cast_of_a_delta() {
    run_ops(&[
        Op::Add { spec: 1, name: 0 },
        Op::DeltaMake { entry: 0, seed: 1, name: 0 },
        Op::Cast { entry: 0, f32: true, name: 0 },
    ]);
}

/// The same for a variant of a variant: the first cast's index is a generated file, which the
/// second cast kept as it was (the f32 total of c0 for the f16 c1).
#[test]
fn regression_index_total_size_of_a_cast_of_a_cast() {
    run_ops(&[
        Op::Add { spec: 1, name: 0 },
        Op::Cast { entry: 0, f32: true, name: 0 },
        Op::Cast { entry: 0, f32: false, name: 1 },
    ]);
}

/// `rm m0` then `add m0` (another model) while the kernel still holds the old `m0` dentry: the
/// entry's inode is keyed by (name, created-in-seconds) and the daemon does not invalidate the
/// kernel's entry on reload, so for up to TTL_MUTABLE (1 s) `m0/` resolves to the removed
/// generation (ENOENT, which readdir shows as an empty directory) — and when both happen within
/// one second the generation is the *same* inode, whose file attributes (size) and pages the
/// kernel keeps for an hour: the new m0's files are served with the old m0's bytes.
/// Timing-dependent: the first form of this list (one round) failed in 2 of 3 runs while the
/// machine was loaded (the new m0/model.safetensors read with the new size and the old bytes,
/// "first difference at offset 0"), and passes on an idle machine.
#[test]
fn regression_name_reused_after_rm_shows_the_new_entry() {
    // Whether rm and add fall in one second is up to the clock: four rounds make a pass by luck
    // (the kernel revalidating in between) unlikely.
    let mut ops = vec![Op::Add { spec: 0, name: 0 }, Op::Read { entry: 0, file: 2, offset: 0, len: 0 }];
    for spec in [2, 0, 2, 0] {
        ops.extend([
            Op::Rm { entry: 0 },
            Op::Add { spec, name: 0 },
            Op::Read { entry: 0, file: 2, offset: 0, len: 0 },
        ]);
    }
    run_ops(&ops);
}

/// From the CI seed (case 0): a delta w1 written through `w0/deltas/w1/` (w0 itself written
/// through `m0/deltas/`), a refused `cp` into `m0/deltas/w1/` (taken), then `llmfs rm w1`: the
/// free name w1 is refused (`mkdir …/deltas/w1`: EEXIST) by the next write through the mount.
#[test]
fn regression_name_of_a_removed_written_delta_can_be_written_again() {
    run_ops(&[
        Op::Add { spec: 0, name: 0 },
        Op::WriteDelta { entry: 0, seed: 1, name: 0 },
        Op::WriteDelta { entry: 1, seed: 2, name: 1 },
        Op::WriteDelta { entry: 0, seed: 3, name: 1 },
        Op::Rm { entry: 2 },
        Op::WriteDelta { entry: 0, seed: 4, name: 1 },
    ]);
}

//! `llmfs quantize` end to end (DESIGN.md, "The user's contract", "FastChat compatibility"):
//! every element a mount serves for a quantized entry is bit-identical to the codec's reference
//! (`quant::quantize` then `dequantize_reference` of the base tensor) for the linear weights and
//! byte-identical to the base for the rest; `llmfs info` reports the configuration, sizes and
//! errors; `llmfs check` notices a corrupt container or a changed base (and the mount answers
//! EIO); bad input is refused with one line and leaves the store as it was; a cast can be
//! quantized; random preads equal `llmfs export`.
//!
//! Each test has its own store, generated model (sharded, a few MB) and mount. Mounts are owned by
//! `MountGuard`s (tests/common) that unmount on drop, also on panic; blocking file operations run
//! under `with_deadline`, commands under a timeout. Needs /dev/fuse and permission to mount.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{assert_one_line_error, assert_same_bytes, tensor_count, with_deadline, MountGuard, TestStore};
use half::{bf16, f16};
use llmfs::codec::quant::{self, QuantConfig, QuantFloat};
use llmfs::codec::quant_file::is_linear_weight;
use llmfs::demo::{ModelSpec, SplitMix64};
use llmfs::format::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const SHARDS: [&str; 2] = [SHARD1, SHARD2];
const INDEX: &str = "model.safetensors.index.json";
/// Deadline of one blocking file operation (a read of a whole file, an open, a listing).
const OP: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// Two shards; hidden 256 so the default group size (256) fits every row; intermediate 384 so
/// down_proj's rows are 1.5 default groups (a padded last group); kv_heads < heads for a shorter
/// k/v projection. A shard is about 1 MB in bf16 (under the fingerprint's whole-hashed 4 MiB).
fn spec(dtype: Dtype) -> ModelSpec {
    ModelSpec {
        hidden: 256,
        intermediate: 384,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        dtype,
        shards: 2,
        seed: 31,
    }
}

/// The configurations every test quantizes with: (entry name, CLI arguments, the config).
fn configs() -> Vec<(&'static str, Vec<&'static str>, QuantConfig)> {
    vec![
        // FastChat's default: 8 bits, symmetric, group 256.
        ("q8", vec![], QuantConfig { bits: 8, group_size: 256, symmetric: true }),
        (
            "q4a128",
            vec!["--bits", "4", "--group-size", "128", "--asymmetric"],
            QuantConfig { bits: 4, group_size: 128, symmetric: false },
        ),
        // 100 divides neither 256 nor 384: padded last groups.
        (
            "q8a100",
            vec!["--group-size", "100", "--asymmetric"],
            QuantConfig { bits: 8, group_size: 100, symmetric: false },
        ),
        // Odd: padded rows of 259 and 385 codes, so nibbles straddle rows.
        (
            "q4g7",
            vec!["--bits", "4", "--group-size", "7"],
            QuantConfig { bits: 4, group_size: 7, symmetric: true },
        ),
    ]
}

/// A store with `base` (a generated model of `dtype`, added in place from TMP/model).
fn store_with_base(dtype: Dtype) -> (TestStore, PathBuf) {
    let ts = TestStore::new();
    let model = ts.path("model");
    common::write_model(&model, &spec(dtype));
    ts.ok(["add", "base", s(&model)]);
    (ts, model)
}

/// `llmfs quantize NAME --base BASE ARGS`, which must succeed.
fn quantize(ts: &TestStore, name: &str, base: &str, args: &[&str]) {
    let mut all = vec!["quantize", name, "--base", base];
    all.extend_from_slice(args);
    ts.ok(all);
}

/// `llmfs export NAME` into TMP/export/NAME; returns the directory.
fn export(ts: &TestStore, name: &str) -> PathBuf {
    let out = ts.path("export").join(name);
    if !out.exists() {
        ts.ok(["export", name, s(&out)]);
    }
    out
}

/// A fresh foreground mount of `ts`'s store at TMP/mnt-LABEL.
fn mount(ts: &TestStore, label: &str) -> MountGuard {
    MountGuard::new(ts, &ts.path(format!("mnt-{label}")), &[])
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn read(path: &Path) -> Vec<u8> {
    let p = path.to_owned();
    with_deadline(&format!("reading {}", path.display()), OP, move || fs::read(&p))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Opens and reads a whole file; the error's errno if either fails.
fn try_read(path: &Path) -> Result<Vec<u8>, i32> {
    let p = path.to_owned();
    with_deadline(&format!("reading {}", path.display()), OP, move || fs::read(&p))
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Sorted names of a directory's entries.
fn names(dir: &Path) -> BTreeSet<String> {
    let p = dir.to_owned();
    with_deadline(&format!("listing {}", dir.display()), OP, move || {
        fs::read_dir(&p).and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<BTreeSet<_>>>()
        })
    })
    .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
}

/// One tensor of a safetensors file.
struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    fn is_linear(&self) -> bool {
        is_linear_weight(&self.name, &self.shape, self.dtype)
    }
}

/// The tensors of a safetensors file, in offset order (parsed by the `safetensors` crate, which
/// checks the header against the spec).
fn parse(bytes: &[u8], what: &str) -> Vec<Tensor> {
    let st =
        SafeTensors::deserialize(bytes).unwrap_or_else(|e| panic!("{what}: not a safetensors file: {e:?}"));
    let mut out: Vec<(usize, Tensor)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = Dtype::parse(&format!("{:?}", view.dtype()))
                .unwrap_or_else(|| panic!("{what}: {name}: dtype {:?}", view.dtype()));
            let offset = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            (offset, Tensor { name, dtype, shape: view.shape().to_vec(), data: view.data().to_vec() })
        })
        .collect();
    out.sort_by_key(|(o, _)| *o);
    out.into_iter().map(|(_, t)| t).collect()
}

/// The weight files of a model directory on disk: file name → tensors.
fn model_tensors(dir: &Path) -> BTreeMap<String, Vec<Tensor>> {
    SHARDS.iter().map(|f| (f.to_string(), parse(&fs::read(dir.join(f)).unwrap(), f))).collect()
}

/// The reference: `quant::quantize` then `dequantize_reference` of a tensor's elements, as
/// little-endian bytes of its dtype, and the relative error ‖x'−x‖/‖x‖.
fn reference(t: &Tensor, cfg: QuantConfig) -> (Vec<u8>, f64) {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    match t.dtype {
        Dtype::F16 => reference_as::<f16>(&t.data, rows, cols, cfg),
        Dtype::BF16 => reference_as::<bf16>(&t.data, rows, cols, cfg),
        Dtype::F32 => reference_as::<f32>(&t.data, rows, cols, cfg),
        other => panic!("{}: no reference for dtype {other}", t.name),
    }
}

fn reference_as<T: QuantFloat>(bytes: &[u8], rows: usize, cols: usize, cfg: QuantConfig) -> (Vec<u8>, f64) {
    let n = rows * cols;
    assert_eq!(bytes.len(), n * T::SIZE);
    let data: Vec<T> = bytes.chunks_exact(T::SIZE).map(T::read_le).collect();
    let qt = quant::quantize(&data, rows, cols, cfg);
    let mut back = vec![T::default(); n];
    quant::dequantize_reference(qt.view(), 0..n, &mut back);
    let mut out = vec![0u8; n * T::SIZE];
    let (mut num, mut den) = (0f64, 0f64);
    for ((o, y), x) in out.chunks_exact_mut(T::SIZE).zip(&back).zip(&data) {
        y.write_le(o);
        let (x, y) = (x.to_f32() as f64, y.to_f32() as f64);
        num += (y - x) * (y - x);
        den += x * x;
    }
    let err = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    (out, err)
}

/// Bit-for-bit comparison of two tensors' bytes, reporting the first differing element.
#[track_caller]
fn assert_same_elements(got: &[u8], want: &[u8], dtype: Dtype, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {} bytes, expected {}", got.len(), want.len());
    if got == want {
        return;
    }
    let size = dtype.size();
    let (i, (g, w)) = got
        .chunks_exact(size)
        .zip(want.chunks_exact(size))
        .enumerate()
        .find(|(_, (g, w))| g != w)
        .expect("a difference");
    let value = |b: &[u8]| match dtype {
        Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        _ => f32::NAN,
    };
    let count = got.chunks_exact(size).zip(want.chunks_exact(size)).filter(|(g, w)| g != w).count();
    panic!(
        "{what}: {count} elements differ; first at element {i}: got {g:02x?} ({}), expected {w:02x?} ({})",
        value(g),
        value(w)
    );
}

/// Little-endian bf16 bytes widened to f32 (exact).
fn bf16_to_f32(data: &[u8]) -> Vec<u8> {
    data.chunks_exact(2).flat_map(|p| bf16::from_le_bytes([p[0], p[1]]).to_f32().to_le_bytes()).collect()
}

/// Checks every file of MOUNT/NAME against `llmfs export NAME`, and every tensor of its weight
/// files against the reference: for linear weights the reference dequantization of the base
/// tensor (`base`: file → tensors, as the base entry serves them), for the rest the base's bytes.
/// Returns the reference relative error of each quantized tensor.
fn verify_variant(
    ts: &TestStore,
    mp: &Path,
    name: &str,
    cfg: QuantConfig,
    base: &BTreeMap<String, Vec<Tensor>>,
) -> BTreeMap<String, f64> {
    let dir = mp.join(name);
    let exported = export(ts, name);
    // Every entry's directory also has an (empty) deltas/ folder, which export does not make.
    let mut files = names(&dir);
    assert!(files.remove("deltas"), "{name}: no deltas/ in the mount: {files:?}");
    assert_eq!(files, names(&exported), "{name}: the mount and the export list different files");
    assert!(files.contains(INDEX) && SHARDS.iter().all(|f| files.contains(*f)), "{name}: files {files:?}");
    let mut errors = BTreeMap::new();
    for file in &files {
        let bytes = read(&dir.join(file));
        assert_same_bytes(
            &bytes,
            &fs::read(exported.join(file)).unwrap(),
            &format!("{name}/{file}: mount against export"),
        );
        let Some(base_tensors) = base.get(file) else { continue };
        let what = format!("{name}/{file}");
        let tensors = parse(&bytes, &what);
        let got_names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        let want_names: Vec<&str> = base_tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(got_names, want_names, "{what}: tensors (in offset order) differ from the base's");
        for (got, want) in tensors.iter().zip(base_tensors) {
            let what = format!("{what}: {}", got.name);
            assert_eq!((got.dtype, &got.shape), (want.dtype, &want.shape), "{what}: dtype and shape");
            if want.is_linear() {
                let (expect, err) = reference(want, cfg);
                assert_same_elements(&got.data, &expect, got.dtype, &format!("{what} (quantized, {cfg:?})"));
                errors.insert(got.name.clone(), err);
            } else {
                assert_same_elements(&got.data, &want.data, got.dtype, &format!("{what} (not quantized)"));
            }
        }
    }
    // The index keeps the base's weight map.
    let index: Value = serde_json::from_slice(&read(&dir.join(INDEX))).expect("the index is JSON");
    let expect_map: BTreeMap<String, String> =
        base.iter().flat_map(|(f, ts)| ts.iter().map(move |t| (t.name.clone(), f.clone()))).collect();
    let got_map: BTreeMap<String, String> = index["weight_map"]
        .as_object()
        .expect("a weight_map")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(got_map, expect_map, "{name}/{INDEX}: weight_map");
    errors
}

/// `llmfs ARGS` must fail with one line naming every needle and leave the store unchanged.
#[track_caller]
fn refused(ts: &TestStore, args: &[&str], needles: &[&str]) {
    let before = ts.snapshot();
    let f = ts.run_full(args);
    assert_one_line_error(&f, needles);
    ts.assert_unchanged(&before, &format!("after `llmfs {}`", args.join(" ")));
}

/// Flips one byte of `path` at `offset`, keeping its size and modification time.
fn flip_byte_keep_mtime(path: &Path, offset: u64) {
    let meta = fs::metadata(path).unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, offset).unwrap();
    f.write_all_at(&[byte[0] ^ 0x5a], offset).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(meta.modified().unwrap())).unwrap();
    drop(f);
    let after = fs::metadata(path).unwrap();
    assert_eq!(
        (after.len(), after.modified().unwrap()),
        (meta.len(), meta.modified().unwrap()),
        "{}: size or mtime changed",
        path.display()
    );
}

/// An offset in the middle of a safetensors file's data (past its header).
fn mid_data_offset(path: &Path) -> u64 {
    let bytes = fs::read(path).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let offset = header_end + (bytes.len() as u64 - header_end) / 2;
    assert!(offset > header_end && offset < bytes.len() as u64);
    offset
}

// ---------------------------------------------------------------------------------------------
// 1. Through a mount: every element equals the reference, every file equals export
// ---------------------------------------------------------------------------------------------

fn mount_serves_the_reference(dtype: Dtype) {
    let (ts, model) = store_with_base(dtype);
    for (name, args, _) in configs() {
        quantize(&ts, name, "base", &args);
    }
    let base = model_tensors(&model);
    let linear = base.values().flatten().filter(|t| t.is_linear()).count();
    assert_eq!(linear, 2 * 7 + 1, "the model's linear weights (7 a layer and lm_head)");
    let m = mount(&ts, "all");
    for (name, _, cfg) in configs() {
        let errors = verify_variant(&ts, m.path(), name, cfg, &base);
        assert_eq!(errors.len(), linear, "{name}: quantized tensors");
    }
    // The base itself is served unchanged.
    for f in SHARDS {
        assert_same_bytes(
            &read(&m.path().join("base").join(f)),
            &fs::read(model.join(f)).unwrap(),
            &format!("base/{f}"),
        );
    }
}

#[test]
fn mount_serves_the_reference_bf16() {
    mount_serves_the_reference(Dtype::BF16);
}

#[test]
fn mount_serves_the_reference_f16() {
    mount_serves_the_reference(Dtype::F16);
}

#[test]
fn mount_serves_the_reference_f32() {
    mount_serves_the_reference(Dtype::F32);
}

// ---------------------------------------------------------------------------------------------
// 2. llmfs info
// ---------------------------------------------------------------------------------------------

#[test]
fn info_reports_config_sizes_and_errors() {
    for dtype in [Dtype::BF16, Dtype::F32] {
        let (ts, model) = store_with_base(dtype);
        let base = model_tensors(&model);
        let linear: Vec<&Tensor> = base.values().flatten().filter(|t| t.is_linear()).collect();
        let linear_bytes: u64 = linear.iter().map(|t| t.data.len() as u64).sum();
        let base_weight_bytes: u64 = SHARDS.iter().map(|f| fs::metadata(model.join(f)).unwrap().len()).sum();
        for (name, args, cfg) in configs() {
            quantize(&ts, name, "base", &args);
            let what = format!("{dtype} {name}");
            let info = ts.json(["info", name, "--json"]);
            assert_eq!(info["kind"], "quantized", "{what}: {info:#}");
            assert_eq!(info["tensors"].as_u64(), Some(tensor_count(&spec(dtype)) as u64), "{what}: tensors");
            let r = &info["recipe"];
            assert_eq!(r["base"], "base", "{what}: {r:#}");
            assert_eq!(r["bits"].as_u64(), Some(cfg.bits as u64), "{what}: bits");
            assert_eq!(r["group_size"].as_u64(), Some(cfg.group_size as u64), "{what}: group_size");
            assert_eq!(r["symmetric"].as_bool(), Some(cfg.symmetric), "{what}: symmetric");
            assert_eq!(
                r["quantized_tensors"].as_u64(),
                Some(linear.len() as u64),
                "{what}: quantized_tensors"
            );

            // Sizes: what is on disk, against the base's weight files.
            let containers: u64 = SHARDS
                .iter()
                .map(|f| fs::metadata(ts.store.join("models").join(name).join(f)).unwrap().len())
                .sum();
            let on_disk = r["on_disk_bytes"].as_u64().expect("on_disk_bytes");
            assert_eq!(on_disk, containers, "{what}: on_disk_bytes against the containers' sizes");
            assert_eq!(r["base_weight_bytes"].as_u64(), Some(base_weight_bytes), "{what}: base_weight_bytes");
            assert!(
                on_disk < base_weight_bytes,
                "{what}: {on_disk} bytes on disk, not smaller than {base_weight_bytes}"
            );
            let ratio = r["disk_ratio"].as_f64().expect("disk_ratio");
            assert!(
                (ratio - base_weight_bytes as f64 / on_disk as f64).abs() < 1e-9,
                "{what}: disk_ratio {ratio}"
            );
            // Exactly the codes (padding included) and the scales (and minimums) of the linear
            // weights, plus two small headers.
            let data: u64 = linear
                .iter()
                .map(|t| {
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    let parts = if cfg.symmetric { 1 } else { 2 };
                    (cfg.q_len(rows, cols) + parts * cfg.n_groups(rows, cols) * dtype.size()) as u64
                })
                .sum();
            assert!(
                on_disk > data && on_disk - data < 2 * 8192,
                "{what}: {on_disk} bytes on disk for {data} bytes of codes and scales"
            );
            // Of the linear weights alone, about bytes per element over bytes per code where the
            // groups are large (2 for 8 bits of bf16, 4 for 4 bits; twice that from f32).
            let ideal = (dtype.size() * 8) as f64 / cfg.bits as f64;
            let linear_ratio = linear_bytes as f64 / on_disk as f64;
            assert!(
                linear_ratio < ideal,
                "{what}: linear weights {linear_bytes} bytes against {on_disk} on disk"
            );
            if cfg.group_size >= 128 {
                assert!(linear_ratio > 0.85 * ideal, "{what}: linear weights {linear_bytes} bytes against {on_disk} on disk: ratio {linear_ratio:.3}, ideal {ideal}");
            }
            assert!(
                ratio > linear_ratio,
                "{what}: the whole-model ratio {ratio} (embeddings and norms stay in the base)"
            );

            // Errors: per tensor, as the reference measures them; the maximum within a sane bound.
            let errs = r["relative_errors"].as_object().expect("relative_errors");
            assert_eq!(errs.len(), linear.len(), "{what}: relative_errors has one per quantized tensor");
            let mut max = 0f64;
            for t in &linear {
                let (_, want) = reference(t, cfg);
                let got = errs
                    .get(&t.name)
                    .and_then(Value::as_f64)
                    .unwrap_or_else(|| panic!("{what}: no error for {}", t.name));
                assert!(
                    (got - want).abs() <= 1e-9 * want.max(1e-12),
                    "{what}: {}: reported error {got}, reference {want}",
                    t.name
                );
                max = max.max(want);
            }
            let reported_max = r["max_relative_error"].as_f64().expect("max_relative_error");
            assert!(
                (reported_max - max).abs() <= 1e-9 * max,
                "{what}: max_relative_error {reported_max}, reference {max}"
            );
            let bound = if cfg.bits == 8 { 0.02 } else { 0.2 };
            assert!(
                reported_max > 0.0 && reported_max < bound,
                "{what}: max_relative_error {reported_max} not in (0, {bound})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. llmfs check: a corrupt container, a changed base
// ---------------------------------------------------------------------------------------------

#[test]
fn check_finds_a_corrupt_container_and_a_changed_base() {
    let (ts, model) = store_with_base(Dtype::BF16);
    quantize(&ts, "q", "base", &["--bits", "4", "--group-size", "128", "--asymmetric"]);
    let exported = export(&ts, "q");
    let out = ts.ok(["check", "q"]);
    assert!(out.contains("ok"), "llmfs check q: {out}");

    // (a) One byte of a container, size and mtime kept.
    let container = ts.store.join("models").join("q").join(SHARD1);
    let offset = mid_data_offset(&container);
    flip_byte_keep_mtime(&container, offset);
    let f = ts.run_full(["check", "q"]);
    assert!(!f.status.success(), "llmfs check q passed with a corrupt container:\n{}{}", f.stdout, f.stderr);
    let said = format!("{}{}", f.stdout, f.stderr);
    assert!(said.contains(s(&container)), "llmfs check does not name {}:\n{said}", container.display());
    {
        let m = mount(&ts, "corrupt");
        assert_eq!(
            try_read(&m.path().join("q").join(SHARD1)).err(),
            Some(libc::EIO),
            "q/{SHARD1} with a corrupt container"
        );
        // The other shard reads from an intact container.
        assert_same_bytes(
            &read(&m.path().join("q").join(SHARD2)),
            &fs::read(exported.join(SHARD2)).unwrap(),
            &format!("q/{SHARD2}"),
        );
    }
    // Restored (same bytes, same mtime): whole again.
    flip_byte_keep_mtime(&container, offset);
    let out = ts.ok(["check", "q"]);
    assert!(out.contains("ok"), "llmfs check q after the restore: {out}");

    // (b) One byte of the base's second shard, size and mtime kept.
    let shard = model.join(SHARD2);
    flip_byte_keep_mtime(&shard, mid_data_offset(&shard));
    let f = ts.run_full(["check", "q"]);
    assert!(!f.status.success(), "llmfs check q passed with a changed base:\n{}{}", f.stdout, f.stderr);
    let said = format!("{}{}", f.stdout, f.stderr);
    assert!(said.contains(s(&shard)), "llmfs check does not name {}:\n{said}", shard.display());
    let m = mount(&ts, "changed");
    assert_eq!(
        try_read(&m.path().join("q").join(SHARD2)).err(),
        Some(libc::EIO),
        "q/{SHARD2} with a changed base"
    );
    assert!(
        m.wait_log_line(&[SHARD2], Duration::from_secs(5)).is_some(),
        "no log line names {SHARD2}:\n{}",
        m.log_text()
    );
    assert_same_bytes(
        &read(&m.path().join("q").join(SHARD1)),
        &fs::read(exported.join(SHARD1)).unwrap(),
        &format!("q/{SHARD1}"),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_input_is_refused_and_leaves_the_store_unchanged() {
    let (ts, _model) = store_with_base(Dtype::BF16);
    quantize(&ts, "q", "base", &[]);
    ts.ok(["cast", "qf32", "--base", "q", "--dtype", "f32"]);

    refused(&ts, &["quantize", "x", "--base", "base", "--bits", "3"], &["3"]);
    refused(&ts, &["quantize", "x", "--base", "base", "--bits", "16"], &["16"]);
    refused(&ts, &["quantize", "x", "--base", "base", "--group-size", "0"], &["group"]);
    refused(&ts, &["quantize", "x", "--base", "q"], &["already quantized"]);
    refused(&ts, &["quantize", "x", "--base", "qf32"], &["already quantized"]);
    refused(&ts, &["quantize", "q", "--base", "base"], &["\"q\"", "exists"]);
    refused(&ts, &["quantize", "base", "--base", "base", "--bits", "4"], &["\"base\"", "exists"]);
    refused(&ts, &["quantize", "x", "--base", "nope"], &["nope"]);

    // A base changed since add (a byte, size and mtime kept: only the hash tells).
    let other = ts.path("other");
    common::write_model(&other, &ModelSpec { seed: 77, ..spec(Dtype::BF16) });
    ts.ok(["add", "other", s(&other)]);
    let shard = other.join(SHARD1);
    let offset = mid_data_offset(&shard);
    flip_byte_keep_mtime(&shard, offset);
    refused(&ts, &["quantize", "x", "--base", "other"], &[SHARD1]);
    flip_byte_keep_mtime(&shard, offset);
    ts.ok(["check", "other"]);
    // And one whose size changed.
    let shard = other.join(SHARD2);
    let f = fs::OpenOptions::new().append(true).open(&shard).unwrap();
    f.write_all_at(b"x", fs::metadata(&shard).unwrap().len()).unwrap();
    drop(f);
    refused(&ts, &["quantize", "x", "--base", "other", "--bits", "4"], &[SHARD2]);

    // The good entries are still fine.
    ts.ok(["check", "q"]);
}

/// Rows shorter than the group (128 columns at FastChat's default 256) and rows that are not a
/// multiple of it (300 columns) are padded with zeros to whole groups, as FastChat's compress
/// does (tests/fastchat_quant.rs holds the codec to torch on both shapes): quantize accepts them
/// and every linear weight reads back as the reference.
#[test]
fn rows_shorter_than_the_group_or_not_a_multiple_are_padded() {
    let ts = TestStore::new();
    let model = ts.path("model");
    let narrow = ModelSpec { hidden: 128, intermediate: 300, ..spec(Dtype::BF16) };
    common::write_model(&model, &narrow);
    ts.ok(["add", "base", s(&model)]);
    let base = model_tensors(&model);
    let widths: BTreeSet<usize> =
        base.values().flatten().filter(|t| t.is_linear()).map(|t| t.shape[1]).collect();
    assert!(widths.contains(&128) && widths.contains(&300), "column counts {widths:?}");
    for (name, args, cfg) in [
        ("q8", vec![], QuantConfig { bits: 8, group_size: 256, symmetric: true }),
        (
            "q4a",
            vec!["--bits", "4", "--asymmetric"],
            QuantConfig { bits: 4, group_size: 256, symmetric: false },
        ),
        ("q8g1000", vec!["--group-size", "1000"], QuantConfig { bits: 8, group_size: 1000, symmetric: true }),
    ] {
        quantize(&ts, name, "base", &args);
        let out = export(&ts, name);
        let mut checked = 0;
        for (file, tensors) in &base {
            let got = parse(&fs::read(out.join(file)).unwrap(), file);
            for (g, want) in got.iter().zip(tensors) {
                let what = format!("{name}/{file}: {}", g.name);
                if want.is_linear() {
                    assert_same_elements(&g.data, &reference(want, cfg).0, g.dtype, &what);
                    checked += 1;
                } else {
                    assert_same_elements(&g.data, &want.data, g.dtype, &what);
                }
            }
        }
        assert_eq!(checked, 2 * 7 + 1, "{name}: linear weights checked");
        ts.ok(["check", name]);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Quantizing a cast
// ---------------------------------------------------------------------------------------------

#[test]
fn quantizing_a_cast_dequantizes_to_the_reference_of_its_tensors() {
    let (ts, model) = store_with_base(Dtype::BF16);
    ts.ok(["cast", "c32", "--base", "base", "--dtype", "f32"]);
    // The f32 cast's tensors: bf16 widened, exactly.
    let base: BTreeMap<String, Vec<Tensor>> = model_tensors(&model)
        .into_iter()
        .map(|(f, ts)| {
            (
                f,
                ts.into_iter()
                    .map(|t| Tensor { data: bf16_to_f32(&t.data), dtype: Dtype::F32, ..t })
                    .collect(),
            )
        })
        .collect();
    let picked: Vec<_> = configs().into_iter().filter(|(n, _, _)| matches!(*n, "q8" | "q4g7")).collect();
    for (name, args, _) in &picked {
        quantize(&ts, name, "c32", args);
        let info = ts.json(["info", name, "--json"]);
        assert_eq!(
            info["dtypes"],
            serde_json::json!({"F32": tensor_count(&spec(Dtype::BF16))}),
            "{name}: {info:#}"
        );
    }
    let m = mount(&ts, "cast");
    for (name, _, cfg) in &picked {
        let errors = verify_variant(&ts, m.path(), name, *cfg, &base);
        assert_eq!(errors.len(), 2 * 7 + 1, "{name}: quantized tensors");
    }
    // Quantizing the f32 values is not quantizing the bf16 ones then widening (the scales differ
    // in precision): make sure the test would tell them apart.
    let t = base[SHARD1].iter().find(|t| t.is_linear()).unwrap();
    let cfg = picked[0].2;
    let narrow =
        model_tensors(&model).remove(SHARD1).unwrap().into_iter().find(|x| x.name == t.name).unwrap();
    assert_ne!(
        reference(t, cfg).0,
        bf16_to_f32(&reference(&narrow, cfg).0),
        "{}: f32 and bf16 references coincide",
        t.name
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Random preads
// ---------------------------------------------------------------------------------------------

#[test]
fn random_preads_match_export() {
    let (ts, _model) = store_with_base(Dtype::BF16);
    let picked: Vec<_> = configs().into_iter().filter(|(n, _, _)| matches!(*n, "q4g7" | "q8a100")).collect();
    for (name, args, _) in &picked {
        quantize(&ts, name, "base", args);
    }
    let m = mount(&ts, "preads");
    let mut rng = SplitMix64(0x05EE_D0F9_A4D5);
    for (name, _, _) in &picked {
        for file in SHARDS {
            let want = fs::read(export(&ts, name).join(file)).unwrap();
            let path = m.path().join(name).join(file);
            let size = want.len() as u64;
            // 500 preads in one open file, at random offsets (a few past the end) and lengths from
            // 1 byte to 300 KB (crossing tensors and FUSE's 128 KiB requests).
            let plan: Vec<(u64, usize)> = (0..500)
                .map(|i| {
                    let offset = rng.next_u64() % (size + 64);
                    let len = match i % 4 {
                        0 => 1 + (rng.next_u64() % 16) as usize,
                        1 => 1 + (rng.next_u64() % 4096) as usize,
                        2 => 1 + (rng.next_u64() % 65536) as usize,
                        _ => 1 + (rng.next_u64() % 300_000) as usize,
                    };
                    (offset, len)
                })
                .collect();
            let p = path.clone();
            let reads = plan.clone();
            let got: Vec<Vec<u8>> = with_deadline(
                &format!("500 preads of {}", path.display()),
                Duration::from_secs(120),
                move || {
                    let f = File::open(&p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()));
                    reads
                        .iter()
                        .map(|&(offset, len)| {
                            let mut buf = vec![0u8; len];
                            let mut n = 0;
                            while n < len {
                                let r = f
                                    .read_at(&mut buf[n..], offset + n as u64)
                                    .unwrap_or_else(|e| panic!("pread({offset}, {len}): {e}"));
                                if r == 0 {
                                    break;
                                }
                                n += r;
                            }
                            buf.truncate(n);
                            buf
                        })
                        .collect()
                },
            );
            for (i, (&(offset, len), bytes)) in plan.iter().zip(&got).enumerate() {
                let start = (offset as usize).min(want.len());
                let end = (offset as usize).saturating_add(len).min(want.len());
                assert_same_bytes(
                    bytes,
                    &want[start..end],
                    &format!("{name}/{file}: pread #{i} ({offset}, {len}) of {size} bytes"),
                );
            }
        }
    }
}

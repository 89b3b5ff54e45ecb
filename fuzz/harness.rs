//! The fuzz harnesses: one function per target, each feeding untrusted bytes to one of llmfs's
//! parsers the way the daemon or a command would, and checking the one property every parser owes
//! its caller: it returns (Ok or a clear error), never panics, never hangs, and never allocates
//! more than the input justifies.
//!
//! The functions live here rather than in `fuzz_targets/*.rs` so that `tests/regressions.rs`
//! replays a finding through exactly the call the fuzzer made (`#[path]`-included there), and
//! `gen_corpus.rs` writes seeds in exactly the layout each harness decodes.
//!
//! Input layouts (all integers little-endian):
//! - `safetensors_header`: a whole safetensors file.
//! - `registry`: the bytes of `registry.json`.
//! - `quant_container`: `[flags u8][group_size u16][rows u16][cols u16][a u16][b u16]` then a
//!   container file; flags: bit 0 4-bit, bit 1 asymmetric, bits 2-3 dtype (F16, BF16, F32, U8).
//! - `delta_chunk`: `[esize u8][base mode u8][elements u24]` then a zstd frame.
//! - `delta_container`: `[flags u8][numel u24][rows u16]` then a delta container file.
//! - `peft_config`: `[format u8][config length u16][adapter_config.json][weights]`; empty weights
//!   use a valid adapter (or FastChat delta) of the fixture's base.
//! - `merge_stats`: a merge's stored statistics file (`merge::stats_file`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use llmfs::codec::delta as dcodec;
use llmfs::codec::quant::QuantConfig;
use llmfs::codec::quant_file::QuantSource;
use llmfs::delta::import::{self, ImportFormat};
use llmfs::delta::DeltaCodec;
use llmfs::demo::{self, ModelSpec};
use llmfs::format::{self, Dtype, HeaderBuilder};
use llmfs::registry::{
    self, Entry, EntryKind, FileRecord, FileRole, Fingerprint, ModelInfo, Registry, Store,
};
use llmfs::variant::source::{LosslessSource, LossySource};
use llmfs::variant::{self, Content, SourceFile, TensorSource};

/// Largest output a harness decodes in one read (keeps each run fast and bounded).
const MAX_OUT: usize = 2 << 20;

/// The base every container target is checked against: a LLaMA-shaped model of a few KB
/// (hidden 16, one layer), so seeds stay small.
pub fn tiny_spec() -> ModelSpec {
    ModelSpec {
        hidden: 16,
        intermediate: 32,
        layers: 1,
        heads: 2,
        kv_heads: 2,
        vocab: 32,
        dtype: Dtype::BF16,
        shards: 1,
        seed: 5,
    }
}

/// A scratch directory for this process, with a store holding the tiny model as entry `base`
/// (added in place). Built once; left behind when the fuzzer exits (it is a few KB).
pub struct Fixture {
    pub root: PathBuf,
    pub store: Store,
    pub base_dir: PathBuf,
}

pub fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("llmfs-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("scratch dir");
        let base_dir = root.join("base");
        demo::write_model(&base_dir, &tiny_spec()).expect("writing the tiny model");
        let store = Store::open(root.join("store")).expect("store");
        registry::add::add(&store, "base", &base_dir, &Default::default()).expect("adding the tiny model");
        Fixture { root, store, base_dir }
    })
}

/// A fresh directory `name` under the fixture's scratch directory.
fn scratch(name: &str) -> PathBuf {
    let dir = fixture().root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn u16_at(d: &[u8], i: usize) -> usize {
    u16::from_le_bytes([d[i], d[i + 1]]) as usize
}

fn u24_at(d: &[u8], i: usize) -> usize {
    u32::from_le_bytes([d[i], d[i + 1], d[i + 2], 0]) as usize
}

/// A source file over `bytes`, written to `path`, with its fingerprint (as the store records it).
fn source_file(path: &Path, bytes: &[u8]) -> Arc<SourceFile> {
    std::fs::write(path, bytes).expect("writing the input");
    Arc::new(SourceFile::new(path.to_owned(), Fingerprint::of(path).expect("fingerprint")))
}

/// Read a few bounded ranges of every synthesized tensor of `view` (errors are fine).
fn read_view(view: &variant::EntryView, salt: usize) {
    for file in &view.files {
        let Content::Synth(synth) = &file.content else { continue };
        for t in &synth.tensors {
            let esize = t.source.dtype().size();
            let n = ((t.end - t.start) / esize as u64) as usize;
            read_ranges(&t.source, n, esize, salt);
        }
    }
}

fn read_ranges(source: &TensorSource, n: usize, esize: usize, salt: usize) {
    if n == 0 {
        return;
    }
    let max = MAX_OUT / esize;
    let a = salt % n;
    for r in [0..n.min(max), a..n.min(a + 1 + salt % 4099).min(a + max), n - 1..n] {
        let mut out = vec![0u8; r.len() * esize];
        let _ = source.read(r, &mut out);
    }
}

// -------------------------------------------------------------------------------------------
// safetensors_header
// -------------------------------------------------------------------------------------------

pub fn safetensors_header(data: &[u8]) {
    let whole = format::parse_header(data);
    let prefix = format::parse_header_prefix(data, data.len() as u64);
    assert_eq!(
        whole.is_ok(),
        prefix.is_ok(),
        "parse_header and parse_header_prefix disagree: {whole:?} vs {prefix:?}"
    );
    if let Ok(h) = &whole {
        assert_eq!(h.file_size(), data.len() as u64, "an accepted header must describe the whole buffer");
        // What we accept, the builder writes back spec-exact and we parse back the same tensors.
        let mut b = HeaderBuilder::new();
        for (k, v) in &h.metadata {
            b = b.metadata(k, v.as_str().expect("metadata values are strings"));
        }
        for t in &h.tensors {
            b.tensor(&t.name, t.dtype, &t.shape);
        }
        let (bytes, infos) = b.build();
        assert_eq!(bytes.len() % 8, 0);
        let mut file = bytes.clone();
        file.resize(bytes.len() + h.tensors.last().map_or(0, |t| t.end) as usize, 0);
        let again = format::parse_header(&file).expect("a built header parses");
        assert_eq!(again.tensors, infos);
        let names = |ts: &[format::TensorInfo]| {
            ts.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.len())).collect::<Vec<_>>()
        };
        assert_eq!(names(&again.tensors), names(&h.tensors));
    }
    // The prefix parser is also given sizes the buffer does not have (a delta container's claim).
    let n = data.len() as u64;
    for size in [0, n / 2, n + 8, u64::MAX / 2, u64::MAX] {
        let _ = format::parse_header_prefix(data, size);
    }
}

// -------------------------------------------------------------------------------------------
// registry
// -------------------------------------------------------------------------------------------

pub fn registry(data: &[u8]) {
    let _ = serde_json::from_slice::<Registry>(data);
    let dir = scratch("registry");
    std::fs::write(dir.join("registry.json"), data).expect("writing registry.json");
    let store = Store::open(&dir).expect("store");
    let Ok(reg) = store.load() else { return };
    for name in reg.entries.keys() {
        let _ = reg.chain(name);
        let _ = reg.dependents(name);
        if let Ok(view) = variant::build_view(&reg, name) {
            let _ = variant::tensor_stats(&view);
            read_view(&view, name.len());
        }
    }
}

// -------------------------------------------------------------------------------------------
// quant_container
// -------------------------------------------------------------------------------------------

pub const QUANT_PREFIX: usize = 11;

pub fn quant_config(flags: u8, group_size: usize) -> (QuantConfig, Dtype) {
    let config =
        QuantConfig { bits: if flags & 1 == 1 { 4 } else { 8 }, group_size, symmetric: flags & 2 == 0 };
    (config, [Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::U8][(flags >> 2) as usize & 3])
}

pub fn quant_container(data: &[u8]) {
    if data.len() < QUANT_PREFIX {
        return;
    }
    let (config, dtype) = quant_config(data[0], u16_at(data, 1));
    let (rows, cols, a, b) = (u16_at(data, 3), u16_at(data, 5), u16_at(data, 7), u16_at(data, 9));
    let container = &data[QUANT_PREFIX..];
    let dir = scratch("quant");
    let file = source_file(&dir.join("model.safetensors"), container);
    let Ok(header) = format::read_header_path(&file.path) else {
        assert!(format::parse_header(container).is_err(), "read_header refused what parse_header accepts");
        return;
    };
    for t in &header.tensors {
        let Some(stem) = t.name.strip_suffix(".q") else { continue };
        let Ok(Some(q)) = QuantSource::find(&file, &header, stem, &[rows, cols], dtype, config) else {
            continue;
        };
        let n = rows * cols;
        if n == 0 {
            continue;
        }
        let esize = dtype.size();
        let max = MAX_OUT / esize;
        let start = a % n;
        for r in [0..n.min(max), start..(start + 1 + b).min(n).min(start + max), n - 1..n] {
            let mut out = vec![0u8; r.len() * esize];
            let _ = q.read(r, &mut out);
        }
    }
}

// -------------------------------------------------------------------------------------------
// delta_chunk
// -------------------------------------------------------------------------------------------

pub const CHUNK_PREFIX: usize = 5;

/// The base bytes the delta_chunk harness decodes against: a fixed pattern.
pub fn chunk_base(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed as u32).to_le_bytes()[3]).collect()
}

pub fn delta_chunk(data: &[u8]) {
    if data.len() < CHUNK_PREFIX {
        return;
    }
    let esize = (data[0] % 10) as usize;
    let base_mode = data[1] % 3;
    let elems = u24_at(data, 2) % (dcodec::DELTA_CHUNK_ELEMS + 2);
    let frame = &data[CHUNK_PREFIX..];
    let len = elems * esize.max(1) + usize::from(esize == 3); // a partial element, sometimes
    if len > MAX_OUT + 16 {
        return;
    }
    let base = match base_mode {
        0 => None,
        1 => Some(chunk_base(len, data[1])),
        _ => Some(chunk_base(len + 1, data[1])),
    };
    let mut out = vec![0u8; len];
    let _ = dcodec::decode_lossless_chunk(frame, base.as_deref(), esize, &mut out);

    // Round trip: any bytes, encoded against any base, decode back exactly.
    if matches!(esize, 1 | 2 | 4 | 8) {
        let target = &frame[..(frame.len() / esize * esize).min(64 << 10)];
        let base = chunk_base(target.len(), data[1]);
        let base = (base_mode != 0).then_some(&base[..]);
        let enc = dcodec::encode_lossless(target, base, esize, 1);
        let n = target.len() / esize;
        assert_eq!(enc.n_chunks(), dcodec::chunk_count(n));
        for c in 0..enc.n_chunks() {
            let r = dcodec::chunk_elems(c, n);
            let (lo, hi) = (r.start * esize, r.end * esize);
            let mut got = vec![0u8; hi - lo];
            dcodec::decode_lossless_chunk(enc.frame(c), base.map(|b| &b[lo..hi]), esize, &mut got)
                .expect("own frame decodes");
            assert!(got == target[lo..hi], "round trip differs in chunk {c}");
        }
    }
}

// -------------------------------------------------------------------------------------------
// delta_container
// -------------------------------------------------------------------------------------------

pub const DELTA_PREFIX: usize = 6;

fn entry(kind: EntryKind) -> Entry {
    Entry {
        kind,
        info: ModelInfo::default(),
        family: "llama".into(),
        template: "llama-2".into(),
        chat_template: None,
        created: 0,
        generation: 0,
    }
}

pub fn delta_container(data: &[u8]) {
    if data.len() < DELTA_PREFIX {
        return;
    }
    let flags = data[0];
    let numel = u24_at(data, 1);
    let rows = u16_at(data, 4);
    let container = &data[DELTA_PREFIX..];
    let fx = fixture();

    // 1. As the mount sees it: a delta entry over the fixture's base whose one container is the
    //    input, described by build_view and read through the tensor sources it builds.
    let name = if flags & 1 == 0 { "model.safetensors" } else { "config.json" };
    let dir = fx.store.entry_dir("d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("entry dir");
    let file = source_file(&dir.join(name), container);
    let mut reg = fx.store.load().expect("fixture registry");
    let codec = [DeltaCodec::Lossless, DeltaCodec::Q8, DeltaCodec::Bitdelta][(flags >> 1) as usize % 3];
    let record = FileRecord {
        name: name.into(),
        role: FileRole::Weights,
        fingerprint: file.fingerprint.clone(),
        object: None,
    };
    reg.entries
        .insert("d".into(), entry(EntryKind::Delta { base: "base".into(), codec, files: vec![record] }));
    if let Ok(view) = variant::build_view(&reg, "d") {
        read_view(&view, numel);
    }

    // 2. The sources directly, with a shape and dtype from the input.
    let Ok(header) = format::read_header_path(&file.path) else { return };
    let dtype = [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::U8, Dtype::I64][(flags >> 3) as usize % 5];
    let esize = dtype.size();
    // A base tensor for the lossy codecs and based lossless tensors: a pattern file.
    let base_path = fx.root.join("delta-base");
    if !base_path.exists() {
        std::fs::write(&base_path, chunk_base(MAX_OUT + 64, 7)).expect("base pattern");
    }
    let base_file =
        Arc::new(SourceFile::new(base_path.clone(), Fingerprint::of(&base_path).expect("fingerprint")));
    let base = TensorSource::Stored { file: base_file, offset: 0, dtype };
    let shape: Vec<usize> =
        if rows > 0 && numel % rows == 0 { vec![rows, numel / rows] } else { vec![numel] };
    for t in &header.tensors {
        let stem = t
            .name
            .strip_suffix(".frames")
            .or_else(|| t.name.strip_suffix(".q"))
            .or_else(|| t.name.strip_suffix(".signs"));
        let Some(stem) = stem else { continue };
        let based = (flags & 0x80 != 0).then(|| base.clone());
        if let Ok(src) = LosslessSource::open(&file, &header, stem, dtype, numel, based) {
            read_ranges(&TensorSource::Delta(Arc::new(src)), numel, esize, rows);
        }
        if let Ok(Some(src)) = LossySource::open(&file, &header, stem, &shape, dtype, base.clone()) {
            read_ranges(&TensorSource::LossyDelta(Arc::new(src)), numel, esize, rows);
        }
    }
}

// -------------------------------------------------------------------------------------------
// peft_config
// -------------------------------------------------------------------------------------------

pub const PEFT_PREFIX: usize = 3;

/// A valid LoRA adapter for the fixture's base: q_proj and v_proj of layer 0, rank 2, f32.
pub fn valid_adapter() -> Vec<u8> {
    let h = tiny_spec().hidden;
    let mut b = HeaderBuilder::new().metadata("format", "pt");
    let mut data = vec![];
    for m in ["q_proj", "v_proj"] {
        let p = format!("base_model.model.model.layers.0.self_attn.{m}");
        b.tensor(&format!("{p}.lora_A.weight"), Dtype::F32, &[2, h]);
        b.tensor(&format!("{p}.lora_B.weight"), Dtype::F32, &[h, 2]);
        data.extend(demo::random_tensor(3, 4 * h, Dtype::F32, false));
    }
    let (mut bytes, _) = b.build();
    bytes.extend(data);
    bytes
}

pub const VALID_ADAPTER_CONFIG: &str = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj","v_proj"],"fan_in_fan_out":false,"use_rslora":false}"#;

/// A valid FastChat delta for the fixture's base: the same tensors, f16.
pub fn valid_fastchat_delta() -> Vec<u8> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES
        .get_or_init(|| {
            let dir = scratch("fastchat-delta");
            demo::write_model(&dir, &ModelSpec { dtype: Dtype::F16, seed: 99, ..tiny_spec() })
                .expect("delta model");
            std::fs::read(dir.join("model.safetensors")).expect("delta weights")
        })
        .clone()
}

pub fn peft_config(data: &[u8]) {
    if data.len() < PEFT_PREFIX {
        return;
    }
    let format = if data[0] & 1 == 0 { ImportFormat::Lora } else { ImportFormat::Fastchat };
    let rest = &data[PEFT_PREFIX..];
    let (config, weights) = rest.split_at(u16_at(data, 1).min(rest.len()));
    let fx = fixture();
    let dir = scratch("import");
    let default;
    let weights = if weights.is_empty() {
        default = if format == ImportFormat::Lora { valid_adapter() } else { valid_fastchat_delta() };
        &default[..]
    } else {
        weights
    };
    match format {
        ImportFormat::Lora => {
            std::fs::write(dir.join("adapter_config.json"), config).unwrap();
            std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
        }
        ImportFormat::Fastchat => {
            std::fs::write(dir.join("config.json"), config).unwrap();
            std::fs::write(dir.join("model.safetensors"), weights).unwrap();
        }
    }
    if import::import(&fx.store, "imp", "base", &dir, format).is_ok() {
        let reg = fx.store.load().expect("registry");
        if let Ok(view) = variant::build_view(&reg, "imp") {
            read_view(&view, config.len());
        }
        fx.store
            .update(|r| {
                r.entries.remove("imp");
                Ok(())
            })
            .expect("removing the import");
        let _ = std::fs::remove_dir_all(fx.store.entry_dir("imp"));
    }
}

// -------------------------------------------------------------------------------------------
// merge_stats
// -------------------------------------------------------------------------------------------

/// A merge's stored statistics file: `stats_file::decode` returns a table or an error naming
/// where; an accepted table re-encodes to bytes that decode to the same table; and statistics
/// that `check_fits` accepts for a small merge of each method are resolved for a range and
/// applied by that merge without panicking (what the daemon does with a stored file's numbers).
pub fn merge_stats(data: &[u8]) {
    use llmfs::compute::mergekit::{name_key, Gta, GtaParent, Kernel, Sparsify, Stats, TensorMerge};
    use llmfs::merge::stats_file;
    let Ok(table) = stats_file::decode(data) else { return };
    let again = stats_file::encode(&table);
    let back = stats_file::decode(&again).expect("an encoded table decodes");
    assert_eq!(stats_file::encode(&back), again, "the round trip changed the table");
    const N: usize = 24;
    let parents: Vec<Vec<f32>> =
        (0..4).map(|k| (0..N).map(|i| ((i * 7 + k * 3) % 11) as f32 / 16.0 - 0.3).collect()).collect();
    for compact in table.values() {
        let n_parents = match &compact.stats {
            Stats::Gta(p) => p.len().min(3),
            _ => 1,
        };
        let gta = |sparsify| {
            Kernel::Gta(Gta {
                consensus: true,
                sparsify,
                parents: vec![GtaParent { weight: 0.5, density: 0.5, gamma: 0.1, epsilon: 0.1 }; n_parents],
                normalize: true,
                rescale: true,
                lambda: 1.0,
            })
        };
        let kernels = [
            (gta(Some(Sparsify::Magnitude)), n_parents + 1),
            (gta(Some(Sparsify::MagnitudeOutliers)), n_parents + 1),
            (gta(Some(Sparsify::Random)), n_parents + 1),
            (gta(Some(Sparsify::Della)), n_parents + 1),
            (Kernel::Slerp { t: 0.3 }, 2),
            (Kernel::Nuslerp { t: 0.4 }, 3),
            (Kernel::ModelStock, 3),
        ];
        for (kernel, inputs) in kernels {
            let m = TensorMerge {
                kernel,
                dtype: Dtype::BF16,
                base: Some(0),
                shape: vec![4, N / 4],
                seed: 1,
                name_key: name_key("w"),
                threads: 1,
            };
            if stats_file::check_fits(compact, &m).is_err() {
                continue;
            }
            let refs: Vec<&[f32]> = parents[..inputs].iter().map(Vec::as_slice).collect();
            let stats = compact.resolve(&m, &refs, 0);
            let mut out = vec![0f32; N];
            let _ = m.apply_cpu(&stats, &refs, 0, &mut out);
        }
    }
}

//! A delta entry's files as the mount shows them: each target file rebuilt from its container;
//! and an imported delta's (`fastchat`, `lora`: see `delta::import`), its tensors applied to the base's.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::format::{self, Dtype, Header};
use crate::registry::recipe::ImportFormat;
use crate::registry::{self, FileRecord, FileRole, Registry};
use crate::source::SourceFile;
use crate::variant::source::{LazyFactors, LosslessSource, LossySource, TensorSource};
use crate::variant::view::{
    self as variant, Content, EntryView, LogicalTensor, SynthFile, SynthTensor, VFile, ViewError, WeightFile,
};

/// Container metadata keys (the container format: `delta`'s module doc). The makers in `delta`
/// write them; they are defined here, on the lower side.
pub(crate) mod keys {
    pub const KIND: &str = "llmfs.kind";
    pub const CODEC: &str = "llmfs.codec";
    pub const SIZE: &str = "llmfs.size";
    pub const BASED: &str = "llmfs.based";
    pub const KIND_SAFETENSORS: &str = "safetensors";
    pub const KIND_VERBATIM: &str = "verbatim";
    pub const HEADER: &str = "__header__";
    /// The tensor name under which a verbatim file's bytes are coded.
    pub const FILE: &str = "file";
}

/// Describe delta entry `name` (containers `files`) over its base's view.
pub fn delta_view(
    registry: &Registry,
    name: &str,
    files: &[FileRecord],
    base: &EntryView,
) -> Result<EntryView, ViewError> {
    let invalid = |reason: String| ViewError::Invalid { entry: name.to_owned(), reason };
    let base_tensors = BaseTensors::of(base);
    let dir = registry.entry_dir(name);
    let mut view = EntryView::default();
    for record in files {
        let source = Arc::new(SourceFile::of_record(&dir, record, registry.objects.as_ref()));
        if let Some(reason) = source.stat_problem() {
            view.files.push(VFile {
                name: record.name.clone(),
                size: 0,
                content: Content::Broken(format!("{}: {reason}", source.path.display())),
            });
            continue;
        }
        let container = source.header().map_err(|e| invalid(e.to_string()))?;
        let meta =
            |k: &str| container.metadata.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let size: u64 = meta(keys::SIZE)
            .parse()
            .map_err(|_| invalid(format!("{}: no {} in its metadata", record.name, keys::SIZE)))?;
        let bad = |e: String| invalid(format!("{}: {e}", record.name));
        let (header_bytes, tensors) = if meta(keys::KIND) == keys::KIND_SAFETENSORS {
            let h = container.tensor(keys::HEADER).ok_or_else(|| bad("no __header__".into()))?;
            if h.len() > 8 + format::MAX_HEADER_SIZE {
                return Err(bad("stored header is over the size limit".into()));
            }
            let mut prefix = vec![0u8; h.len() as usize];
            source
                .read_exact_at(&mut prefix, container.data_start + h.start)
                .map_err(|e| bad(e.to_string()))?;
            let target = format::parse_header_prefix(&prefix, size).map_err(|e| bad(e.to_string()))?;
            if target.data_start != prefix.len() as u64 {
                return Err(bad("stored header has trailing bytes".into()));
            }
            let based: HashSet<String> =
                serde_json::from_str(&meta(keys::BASED)).map_err(|e| bad(e.to_string()))?;
            let mut logical = vec![];
            let mut synth = vec![];
            for t in &target.tensors {
                let base = if based.contains(&t.name) {
                    let twin = base_tensors.twin(&t.name, &t.shape, t.dtype).ok_or_else(|| {
                        bad(format!("{}: its base tensor is gone or changed shape", t.name))
                    })?;
                    Some(twin.source.clone())
                } else {
                    None
                };
                let lossy = match &base {
                    Some(b) => LossySource::open(&source, &container, &t.name, &t.shape, t.dtype, b.clone())
                        .map_err(&bad)?,
                    None => None,
                };
                let src = match lossy {
                    Some(l) => TensorSource::LossyDelta(Arc::new(l)),
                    None => TensorSource::Delta(Arc::new(
                        LosslessSource::open(&source, &container, &t.name, t.dtype, t.numel(), base)
                            .map_err(&bad)?,
                    )),
                };
                logical.push(LogicalTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    source: src.clone(),
                });
                synth.push(SynthTensor {
                    name: t.name.clone(),
                    start: target.data_start + t.start,
                    end: target.data_start + t.end,
                    source: src,
                });
            }
            // The bytes are rebuilt tensor by tensor whatever the file is called, but only a
            // top-level `*.safetensors` is one of the model's weight files (what a cast or a
            // quantization of this entry converts): the same rule as `add` and `delta make`, so a
            // safetensors file written through deltas/ under another name or in a subdirectory
            // stays a plain file for the entries built on this one.
            if registry::walk::role_of(&record.name) == FileRole::Weights {
                view.weights.insert(
                    record.name.clone(),
                    WeightFile { tensors: logical, metadata: target.metadata.clone() },
                );
            }
            (prefix, synth)
        } else {
            let src = LosslessSource::open(&source, &container, keys::FILE, Dtype::U8, size as usize, None)
                .map_err(&bad)?;
            (
                vec![],
                vec![SynthTensor {
                    name: keys::FILE.into(),
                    start: 0,
                    end: size,
                    source: TensorSource::Delta(Arc::new(src)),
                }],
            )
        };
        view.files.push(VFile {
            name: record.name.clone(),
            size,
            content: Content::Synth(Arc::new(SynthFile::new(header_bytes, tensors))),
        });
    }
    Ok(view)
}

/// The base's tensors by name, across all its shards.
pub struct BaseTensors(HashMap<String, LogicalTensor>);

impl BaseTensors {
    pub fn of(view: &EntryView) -> Self {
        BaseTensors(
            view.weights.values().flat_map(|w| &w.tensors).map(|t| (t.name.clone(), t.clone())).collect(),
        )
    }
    /// The base twin of a target tensor: same name, shape and dtype.
    pub(crate) fn twin(&self, name: &str, shape: &[usize], dtype: Dtype) -> Option<&LogicalTensor> {
        self.0.get(name).filter(|t| t.shape == shape && t.source.dtype() == dtype)
    }
}

const PEFT_PREFIX: &str = "base_model.model.";

/// The view of an imported entry whose files are in `dir`.
pub fn imported_view(
    registry: &Registry,
    name: &str,
    files: &[FileRecord],
    format: ImportFormat,
    base: &EntryView,
) -> Result<EntryView, ViewError> {
    import_view(&registry.entry_dir(name), registry.objects.as_ref(), files, format, base)
        .map_err(|reason| ViewError::Invalid { entry: name.to_owned(), reason })
}

pub(crate) fn import_view(
    dir: &Path,
    objects: Option<&crate::store::Objects>,
    files: &[FileRecord],
    format: ImportFormat,
    base: &EntryView,
) -> Result<EntryView, String> {
    // Every tensor of the imported weight files, by name.
    let mut tensors: HashMap<String, (Arc<SourceFile>, Arc<Header>)> = HashMap::new();
    let mut sources = vec![];
    for record in files.iter().filter(|f| f.role == FileRole::Weights) {
        let source = Arc::new(SourceFile::of_record(dir, record, objects));
        if let Some(reason) = source.stat_problem() {
            return Err(format!("{}: {reason}", source.path.display()));
        }
        let header = source.header().map_err(|e| e.to_string())?;
        sources.push((source, Arc::new(header)));
    }
    for (i, (_, header)) in sources.iter().enumerate() {
        for t in &header.tensors {
            tensors.insert(t.name.clone(), (sources[i].0.clone(), header.clone()));
        }
    }
    let stored = |name: &str| -> Option<(TensorSource, Vec<usize>)> {
        let (file, header) = tensors.get(name)?;
        let t = header.tensor(name)?;
        Some((
            TensorSource::Stored { file: file.clone(), offset: header.data_start + t.start, dtype: t.dtype },
            t.shape.clone(),
        ))
    };
    let mut view = match format {
        ImportFormat::Fastchat => {
            let to_f16 = |s: TensorSource| {
                if s.dtype() == Dtype::F16 {
                    s
                } else {
                    TensorSource::Cast { inner: Arc::new(s), to: Dtype::F16 }
                }
            };
            variant::map_weights(base, "fastchat delta", |t| {
                if !t.source.dtype().is_float() {
                    return Ok(t.clone());
                }
                let (delta, shape) = stored(&t.name).ok_or_else(|| {
                    format!(
                        "the delta has no tensor {:?} (FastChat's apply_delta needs every base tensor)",
                        t.name
                    )
                })?;
                if shape != t.shape || !delta.dtype().is_float() {
                    return Err(format!(
                        "tensor {:?}: the delta's shape {shape:?} does not match the base's {:?}",
                        t.name, t.shape
                    ));
                }
                let source = TensorSource::AddF16 {
                    base: Arc::new(to_f16(t.source.clone())),
                    delta: Arc::new(to_f16(delta)),
                };
                Ok(LogicalTensor { source, ..t.clone() })
            })?
        }
        ImportFormat::Lora => {
            // Through its record: in an object store the file is an object, not under `dir`.
            let record = files.iter().find(|f| f.name == "adapter_config.json");
            let source = record.map(|r| SourceFile::of_record(dir, r, objects));
            let shown = source.as_ref().map_or(dir.join("adapter_config.json"), |s| s.path.clone());
            let config: Value = source
                .filter(|s| s.fingerprint.size <= 1 << 20)
                .and_then(|s| s.read_all().ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| format!("{}: missing, over 1 MiB, or not JSON", shown.display()))?;
            let r = config
                .get("r")
                .and_then(Value::as_u64)
                .filter(|&r| r > 0)
                .ok_or("adapter_config.json: r must be a positive integer")? as usize;
            let alpha = config
                .get("lora_alpha")
                .and_then(Value::as_f64)
                .ok_or("adapter_config.json: no lora_alpha")?;
            let rslora = config.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
            let transposed = config.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false);
            if config.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
                return Err("DoRA adapters are not supported".into());
            }
            let scale = if rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 } as f32;
            let mut used = std::collections::HashSet::new();
            let mut view = variant::map_weights(base, "lora merge", |t| {
                let Some(stem) = t.name.strip_suffix(".weight") else { return Ok(t.clone()) };
                let (Some((a, a_shape)), Some((b, b_shape))) = (
                    stored(&format!("{PEFT_PREFIX}{stem}.lora_A.weight")),
                    stored(&format!("{PEFT_PREFIX}{stem}.lora_B.weight")),
                ) else {
                    return Ok(t.clone());
                };
                used.insert(stem.to_owned());
                let (rows, cols) = match t.shape[..] {
                    [rows, cols] => (rows, cols),
                    _ => return Err(format!("{}: LoRA on a tensor of shape {:?}", t.name, t.shape)),
                };
                let (out_dim, in_dim) = if transposed { (cols, rows) } else { (rows, cols) };
                if a_shape != [r, in_dim] || b_shape != [out_dim, r] {
                    return Err(format!(
                        "{}: lora_A {a_shape:?} and lora_B {b_shape:?} do not fit rank {r} and the base's {:?}",
                        t.name, t.shape
                    ));
                }
                if !a.dtype().is_float() || !b.dtype().is_float() {
                    return Err(format!("{}: LoRA factors must be float tensors", t.name));
                }
                // The merge computes in f32 and rounds to the weight's dtype: an integer (or F64)
                // weight has no such merge, and would fail every read. Refuse it here.
                if !t.source.dtype().is_float() {
                    return Err(format!(
                        "{}: the adapter targets a {} weight; LoRA merges only into F16, BF16 or F32 weights",
                        t.name,
                        t.source.dtype()
                    ));
                }
                let (a_len, b_len) = (r * in_dim, out_dim * r);
                let factors = Arc::new(LazyFactors {
                    a,
                    b,
                    a_len,
                    b_len,
                    rank: r,
                    scale,
                    transposed,
                    loaded: Default::default(),
                });
                Ok(LogicalTensor {
                    source: TensorSource::Lora { base: Arc::new(t.source.clone()), factors, cols },
                    ..t.clone()
                })
            })?;
            let lora_tensors = tensors
                .keys()
                .filter(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
                .count();
            if lora_tensors == 0 {
                return Err("adapter_model.safetensors holds no lora_A/lora_B tensors".into());
            }
            if 2 * used.len() != lora_tensors {
                let unused = lora_tensors.saturating_sub(2 * used.len());
                return Err(format!("{unused} of {lora_tensors} adapter tensors match no base weight (its target modules do not fit this base)"));
            }
            // A merged model keeps the base's files (config, tokenizer): drop the adapter's.
            view.files
                .retain(|f| !matches!(f.name.as_str(), "adapter_config.json" | "adapter_model.safetensors"));
            return Ok(view);
        }
    };
    // FastChat: the delta's non-weight files (tokenizer, config) take the place of the base's.
    for record in files.iter().filter(|f| f.role == FileRole::Other) {
        let source = Arc::new(SourceFile::of_record(dir, record, objects));
        let file = variant::VFile {
            name: record.name.clone(),
            size: record.fingerprint.size,
            content: Content::Passthrough(source),
        };
        match view.files.iter_mut().find(|f| f.name == record.name) {
            Some(existing) => *existing = file,
            None => view.files.push(file),
        }
    }
    // apply_delta writes f16 tensors, and a config that says so: whatever dtype the delta's
    // config.json (served above) names, or `from_pretrained(dtype="auto")` would convert every
    // tensor back (the FastChat import loaded at 0.08x of plain on 2 cores, session 17).
    if view.weights.values().flat_map(|w| &w.tensors).all(|t| t.source.dtype() == Dtype::F16) {
        super::config_with_dtype(&mut view, Dtype::F16);
    }
    Ok(view)
}

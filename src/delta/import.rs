//! `llmfs delta import`: deltas made by other tools, applied on read.
//!
//! - `fastchat`: a directory FastChat's make_delta.py wrote (a full model whose tensors are
//!   target − base, fp16). Read back as apply_delta.py writes it: every tensor of the base, as
//!   `f16(f16(base) + f16(delta))` (compute::merge::add_f16), in the base's file layout; the
//!   delta's non-weight files (its tokenizer, as apply_delta saves the delta's) over the base's.
//! - `lora`: a PEFT adapter (adapter_config.json, adapter_model.safetensors) merged on read as
//!   merge_and_unload does: `W + s·B·A` on its target modules, s = lora_alpha / r (or
//!   lora_alpha / √r with use_rslora), in the base's dtype and layout.
//!
//! The imported files are copied into `STORE/models/NAME/` (so the entry does not depend on the
//! directory it came from) and fingerprinted like any base file.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::compute::merge::LoraFactors;
use crate::format::{self, Dtype, Header};
use crate::registry::add::{copy_to_staging, Added};
pub use crate::registry::recipe::ImportFormat;
use crate::registry::walk::gone;
use crate::registry::{
    self, io_err, Entry, EntryKind, Error, FileRecord, FileRole, Fingerprint, Registry, Store,
};
use crate::variant::{self, Content, EntryView, LogicalTensor, SourceFile, TensorSource, ViewError};

const PEFT_PREFIX: &str = "base_model.model.";

/// Import `from` as entry `name` over `base`: validate it against the base, copy it in, register.
pub fn import(
    store: &Store,
    name: &str,
    base: &str,
    from: &Path,
    format: ImportFormat,
) -> Result<Added, Error> {
    registry::validate_name(name)?;
    let registry = store.load()?;
    if registry.entries.contains_key(name) {
        return Err(Error::Exists(name.to_owned()));
    }
    let base_entry = registry.get(base)?.clone();
    let base_view = super::make::base_view(&registry, base)?;
    if !fs::metadata(from).map_err(io_err(from))?.is_dir() {
        return Err(Error::NotAModel { path: from.to_owned(), reason: "not a directory".into() });
    }
    let walked = importable_files(from)?;
    let (files, notes) = (walked.with_roles(), walked.notes);
    // Validate against the base before copying anything: the same check the view makes.
    let probe: Vec<FileRecord> = files
        .iter()
        .map(|(n, role)| {
            let p = from.join(n);
            Ok(FileRecord {
                name: n.clone(),
                role: *role,
                fingerprint: Fingerprint::of(&p).map_err(gone(&p))?,
            })
        })
        .collect::<Result<_, Error>>()?;
    import_view(from, &probe, format, &base_view)
        .map_err(|e| Error::Invalid(format!("{}: {e}", from.display())))?;

    let staging = copy_to_staging(store, &format!("import-{name}"), from, &files)?;
    let records = files
        .iter()
        .map(|(file, role)| {
            let dst = staging.path().join(file);
            Ok(FileRecord {
                name: file.clone(),
                role: *role,
                fingerprint: Fingerprint::of(&dst).map_err(io_err(&dst))?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let entry = Entry {
        kind: EntryKind::Imported { base: base.to_owned(), format, files: records },
        info: registry::ModelInfo {
            simple_name: name.to_owned(),
            link: String::new(),
            description: format!("{base} with a {} delta from {}", format.name(), from.display()),
        },
        family: base_entry.family.clone(),
        template: base_entry.template.clone(),
        chat_template: base_entry.chat_template.clone(),
        created: registry::now_secs(),
        generation: registry::new_generation(),
    };
    store.insert_entry(name, &entry, Some(staging))?;
    Ok(Added { entry, notes })
}

/// The directory to import, walked as `registry::walk` keeps it (every file, top-level
/// `*.safetensors` as weights).
fn importable_files(dir: &Path) -> Result<registry::walk::Walk, Error> {
    let walked = registry::walk::walk(dir)?;
    if !walked.with_roles().iter().any(|(_, r)| *r == FileRole::Weights) {
        return Err(Error::NotAModel {
            path: dir.to_owned(),
            reason: "no *.safetensors weights at its top level to import".into(),
        });
    }
    Ok(walked)
}

/// The view of an imported entry whose files are in `dir`.
pub fn imported_view(
    registry: &Registry,
    name: &str,
    files: &[FileRecord],
    format: ImportFormat,
    base: &EntryView,
) -> Result<EntryView, ViewError> {
    import_view(&registry.entry_dir(name), files, format, base)
        .map_err(|reason| ViewError::Invalid { entry: name.to_owned(), reason })
}

fn import_view(
    dir: &Path,
    files: &[FileRecord],
    format: ImportFormat,
    base: &EntryView,
) -> Result<EntryView, String> {
    // Every tensor of the imported weight files, by name.
    let mut tensors: HashMap<String, (Arc<SourceFile>, Arc<Header>)> = HashMap::new();
    let mut sources = vec![];
    for record in files.iter().filter(|f| f.role == FileRole::Weights) {
        let source = Arc::new(SourceFile::new(dir.join(&record.name), record.fingerprint.clone()));
        if let Some(reason) = source.stat_problem() {
            return Err(format!("{}: {reason}", source.path.display()));
        }
        let header = format::read_header_path(&source.path).map_err(|e| e.to_string())?;
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
            let config_path = dir.join("adapter_config.json");
            let config: Value = fs::metadata(&config_path)
                .ok()
                .filter(|m| m.len() <= 1 << 20)
                .and_then(|_| fs::read(&config_path).ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| format!("{}: missing, over 1 MiB, or not JSON", config_path.display()))?;
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
        let source = Arc::new(SourceFile::new(dir.join(&record.name), record.fingerprint.clone()));
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
    Ok(view)
}

/// LoRA factors read (and widened to f32) on first use, then kept: every chunk of the merged
/// weight needs all of A and its rows of B.
#[derive(Debug)]
pub struct LazyFactors {
    a: TensorSource,
    b: TensorSource,
    /// Elements of A (r × in) and B (out × r).
    a_len: usize,
    b_len: usize,
    rank: usize,
    scale: f32,
    transposed: bool,
    loaded: std::sync::OnceLock<Result<Arc<LoraFactors>, String>>,
}

impl LazyFactors {
    pub fn get(&self) -> Result<Arc<LoraFactors>, variant::ReadError> {
        self.loaded
            .get_or_init(|| {
                let widen = |s: &TensorSource, n: usize| -> Result<Vec<f32>, String> {
                    if !s.dtype().is_float() {
                        return Err(format!("a LoRA factor is {}, not a float tensor", s.dtype()));
                    }
                    let mut bytes = vec![0u8; n * s.dtype().size()];
                    s.read(0..n, &mut bytes).map_err(|e| e.to_string())?;
                    Ok((0..n).map(|i| crate::compute::merge::load(s.dtype(), &bytes, i)).collect())
                };
                Ok(Arc::new(LoraFactors {
                    a: widen(&self.a, self.a_len)?,
                    b: widen(&self.b, self.b_len)?,
                    rank: self.rank,
                    scale: self.scale,
                    transposed: self.transposed,
                }))
            })
            .clone()
            .map_err(variant::ReadError::Decode)
    }
}

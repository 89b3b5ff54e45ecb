//! What bytes each file of an entry holds.
//!
//! An entry's files are described once, as an [`EntryView`]: a list of [`VFile`]s, each either a
//! real file read through ([`Content::Passthrough`]), a small generated file (a tokenizer config
//! with a chat template, a shard index with new sizes), or a synthesized safetensors file
//! ([`Content::Synth`]): header bytes built once, then tensors whose bytes come from a
//! [`TensorSource`] — stored bytes, or a recipe over another source (a cast, a dequantization …).
//! Views compose: a variant's view is its base's view with each weight tensor's source wrapped.
//!
//! Nothing here knows about FUSE or the cache: `vfs` maps byte ranges onto these descriptions and
//! caches what [`TensorSource::read`] produces.

mod source;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

pub use crate::source::{ReadError, SourceFile};
pub use source::TensorSource;

use crate::adapter;
use crate::codec::quant_file::QuantSource;
use crate::format::{self, HeaderBuilder};
use crate::registry::{Entry, EntryKind, FileRole, Registry, INDEX_FILE};

/// One file of an entry as the mount shows it.
#[derive(Clone, Debug)]
pub struct VFile {
    pub name: String,
    pub size: u64,
    pub content: Content,
}

#[derive(Clone, Debug)]
pub enum Content {
    /// A real file, served byte for byte (checked against its fingerprint on open).
    Passthrough(Arc<SourceFile>),
    /// Small bytes built when the view was made.
    Generated(Arc<[u8]>),
    /// A synthesized safetensors file.
    Synth(Arc<SynthFile>),
    /// A file that cannot be served (its base changed or is gone): every open gets EIO and this
    /// reason in the log.
    Broken(String),
}

/// A synthesized safetensors file: header bytes, then tensors in offset order with no gaps.
#[derive(Debug)]
pub struct SynthFile {
    /// Unique for the life of the process: the cache keys decoded chunks by it, so two versions
    /// of a file (a delta file rewritten through deltas/) never share a chunk.
    pub id: u64,
    pub header: Vec<u8>,
    pub tensors: Vec<SynthTensor>,
}

impl SynthFile {
    pub fn new(header: Vec<u8>, tensors: Vec<SynthTensor>) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        SynthFile { id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), header, tensors }
    }
}

#[derive(Debug)]
pub struct SynthTensor {
    pub name: String,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
    pub source: TensorSource,
}

/// A tensor of an entry, before it is laid out in a file.
#[derive(Clone, Debug)]
pub struct LogicalTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub source: TensorSource,
}

/// A weight file before layout: its tensors in file order, and the header's `__metadata__`.
#[derive(Clone, Debug)]
pub struct WeightFile {
    pub tensors: Vec<LogicalTensor>,
    pub metadata: serde_json::Map<String, Value>,
}

/// Every file of one entry.
#[derive(Clone, Debug, Default)]
pub struct EntryView {
    pub files: Vec<VFile>,
    /// The logical weight files (by file name), from which variants derive theirs.
    pub weights: BTreeMap<String, WeightFile>,
}

impl EntryView {
    pub fn file(&self, name: &str) -> Option<&VFile> {
        self.files.iter().find(|f| f.name == name)
    }
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error("{entry}: {reason}")]
    Invalid { entry: String, reason: String },
}

/// Describe the files of entry `name`.
pub fn build_view(registry: &Registry, name: &str) -> Result<EntryView, ViewError> {
    // Walk the chain first so a cycle or a missing base is an error, not a stack overflow.
    let chain = registry.chain(name)?;
    let mut view = None;
    for entry_name in chain.iter().rev() {
        let entry = registry.get(entry_name)?;
        view = Some(match (&entry.kind, view) {
            (EntryKind::Base { dir, files, .. }, _) => base_view(entry, dir, files),
            (EntryKind::Cast { dtype, .. }, Some(base)) => {
                map_weights(&base, &format!("cast {entry_name}"), |t| {
                    let source = if t.source.dtype().is_float() && t.source.dtype() != *dtype {
                        TensorSource::Cast { inner: Arc::new(t.source.clone()), to: *dtype }
                    } else {
                        t.source.clone()
                    };
                    Ok(LogicalTensor { source, ..t.clone() })
                })
                .map_err(|reason| ViewError::Invalid { entry: entry_name.to_string(), reason })?
            }
            (EntryKind::Quantized { config, files, .. }, Some(base)) => {
                let containers = open_containers(registry, entry_name, files)?;
                map_weights(&base, &format!("quantized {entry_name}"), |t| {
                    let found = containers
                        .iter()
                        .find_map(|(file, header)| {
                            QuantSource::find(file, header, &t.name, &t.shape, t.source.dtype(), *config)
                                .transpose()
                        })
                        .transpose()?;
                    Ok(match found {
                        Some(q) => LogicalTensor { source: TensorSource::Dequant(Arc::new(q)), ..t.clone() },
                        None => t.clone(),
                    })
                })
                .map_err(|reason| ViewError::Invalid { entry: entry_name.to_string(), reason })?
            }
            (EntryKind::Delta { files, .. }, Some(base)) => {
                crate::delta::view::delta_view(registry, entry_name, files, &base)?
            }
            (EntryKind::Imported { format, files, .. }, Some(base)) => {
                crate::delta::import::imported_view(registry, entry_name, files, *format, &base)?
            }
            (_, None) => unreachable!("a chain ends in a base"),
        });
    }
    Ok(view.expect("a chain is never empty"))
}

/// The containers an entry owns in `STORE/models/NAME/`, with their parsed headers. A container
/// that changed since it was written is an error for the whole entry: its tensors are unknown.
fn open_containers(
    registry: &Registry,
    name: &str,
    files: &[crate::registry::FileRecord],
) -> Result<Vec<(Arc<SourceFile>, format::Header)>, ViewError> {
    let dir = registry.entry_dir(name);
    files
        .iter()
        .map(|record| {
            let source = Arc::new(SourceFile::new(dir.join(&record.name), record.fingerprint.clone()));
            let invalid = |reason: String| ViewError::Invalid { entry: name.to_owned(), reason };
            if let Some(reason) = source.stat_problem() {
                return Err(invalid(format!("{}: {reason}", source.path.display())));
            }
            let header = format::read_header_path(&source.path).map_err(|e| invalid(e.to_string()))?;
            Ok((source, header))
        })
        .collect()
}

fn base_view(entry: &Entry, dir: &Path, records: &[crate::registry::FileRecord]) -> EntryView {
    let mut view = EntryView::default();
    for record in records {
        let path = dir.join(&record.name);
        let source = Arc::new(SourceFile::new(path.clone(), record.fingerprint.clone()));
        let mut file = VFile {
            name: record.name.clone(),
            size: record.fingerprint.size,
            content: Content::Passthrough(source.clone()),
        };
        if let Some(reason) = source.stat_problem() {
            file.content = Content::Broken(format!("{}: {reason}", path.display()));
        } else if record.role == FileRole::Weights {
            match format::read_header_path(&path) {
                Ok(header) => {
                    let tensors = header
                        .tensors
                        .iter()
                        .map(|t| LogicalTensor {
                            name: t.name.clone(),
                            shape: t.shape.clone(),
                            source: TensorSource::Stored {
                                file: source.clone(),
                                offset: header.data_start + t.start,
                                dtype: t.dtype,
                            },
                        })
                        .collect();
                    view.weights
                        .insert(record.name.clone(), WeightFile { tensors, metadata: header.metadata });
                }
                Err(e) => file.content = Content::Broken(e.to_string()),
            }
        } else if record.name == "tokenizer_config.json" {
            if let Some(content) = with_chat_template(entry, &source) {
                file.size = content.len() as u64;
                file.content = Content::Generated(content);
            }
        }
        view.files.push(file);
    }
    view
}

/// The tokenizer config with the entry's chat template added, when the entry asks for one.
fn with_chat_template(entry: &Entry, source: &SourceFile) -> Option<Arc<[u8]>> {
    let jinja = adapter::chat_template_jinja(entry.chat_template.as_deref()?)?;
    let original = std::fs::read(&source.path).ok()?;
    adapter::tokenizer_config_with_template(Some(&original), &jinja).ok().map(Arc::from)
}

/// A variant's view: the base's files, with weights rebuilt tensor by tensor through `map`, and
/// the shard index (if any) given the new sizes. `label` goes into each header's metadata.
pub fn map_weights(
    base: &EntryView,
    label: &str,
    mut map: impl FnMut(&LogicalTensor) -> Result<LogicalTensor, String>,
) -> Result<EntryView, String> {
    let mut view = EntryView::default();
    for (file_name, weight_file) in &base.weights {
        let tensors = weight_file.tensors.iter().map(&mut map).collect::<Result<Vec<_>, _>>()?;
        view.weights
            .insert(file_name.clone(), WeightFile { tensors, metadata: weight_file.metadata.clone() });
    }
    let mut total_tensor_bytes = 0u64;
    for base_file in &base.files {
        let file = match (view.weights.get(&base_file.name), &base_file.content) {
            (_, Content::Broken(_)) => base_file.clone(),
            (Some(weights), _) => {
                let synth = layout(label, weights);
                total_tensor_bytes += synth.tensors.last().map_or(0, |t| t.end) - synth.header.len() as u64;
                let size = synth.tensors.last().map_or(synth.header.len() as u64, |t| t.end);
                VFile { name: base_file.name.clone(), size, content: Content::Synth(Arc::new(synth)) }
            }
            (None, _) => base_file.clone(),
        };
        view.files.push(file);
    }
    if let Some(index) = view.files.iter_mut().find(|f| f.name == INDEX_FILE) {
        // Whatever the base's index is (a file, generated, a delta's stored file), the variant's
        // is the same JSON with its own total size.
        match read_whole(index).and_then(|bytes| rewrite_index(&bytes, total_tensor_bytes)) {
            Ok(bytes) => {
                index.size = bytes.len() as u64;
                index.content = Content::Generated(bytes.into());
            }
            Err(reason) => index.content = Content::Broken(format!("{INDEX_FILE}: {reason}")),
        }
    }
    Ok(view)
}

/// All bytes of a small file of a view (a shard index: bounded to 64 MiB).
fn read_whole(file: &VFile) -> Result<Vec<u8>, String> {
    if file.size > 64 << 20 {
        return Err(format!("{} bytes is too large for a shard index", file.size));
    }
    match &file.content {
        Content::Passthrough(source) => std::fs::read(&source.path).map_err(|e| e.to_string()),
        Content::Generated(bytes) => Ok(bytes.to_vec()),
        Content::Broken(reason) => Err(reason.clone()),
        Content::Synth(synth) => {
            let mut out = vec![0u8; file.size as usize];
            out[..synth.header.len()].copy_from_slice(&synth.header);
            for t in &synth.tensors {
                let esize = t.source.dtype().size() as u64;
                let dst = &mut out[t.start as usize..t.end as usize];
                t.source.read(0..((t.end - t.start) / esize) as usize, dst).map_err(|e| e.to_string())?;
            }
            Ok(out)
        }
    }
}

/// Lay a weight file out: tensors in the base's order, contiguous, after a spec-exact header
/// that keeps the base's `__metadata__` (transformers checks `format: pt`) and says what made it.
fn layout(label: &str, weights: &WeightFile) -> SynthFile {
    let mut builder = HeaderBuilder::new();
    for (k, v) in &weights.metadata {
        builder = builder.metadata(k, v.as_str().unwrap_or_default());
    }
    builder = builder.metadata("llmfs", label);
    for t in &weights.tensors {
        builder.tensor(&t.name, t.source.dtype(), &t.shape);
    }
    let (header, infos) = builder.build();
    let data_start = header.len() as u64;
    let tensors = infos
        .into_iter()
        .zip(&weights.tensors)
        .map(|(info, t)| SynthTensor {
            name: info.name,
            start: data_start + info.start,
            end: data_start + info.end,
            source: t.source.clone(),
        })
        .collect();
    SynthFile::new(header, tensors)
}

/// The shard index with `metadata.total_size` set to the variant's; everything else kept.
fn rewrite_index(bytes: &[u8], total_size: u64) -> Result<Vec<u8>, String> {
    let mut index: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let obj = index.as_object_mut().ok_or("not a JSON object")?;
    let metadata = obj.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
    if let Some(m) = metadata.as_object_mut() {
        m.insert("total_size".into(), total_size.into());
    }
    let mut out = serde_json::to_vec_pretty(&index).expect("JSON serializes");
    out.push(b'\n');
    Ok(out)
}

/// Summary numbers for `llmfs info`.
pub fn tensor_stats(view: &EntryView) -> (usize, BTreeMap<String, usize>) {
    let mut count = 0;
    let mut dtypes = BTreeMap::new();
    for w in view.weights.values() {
        for t in &w.tensors {
            count += 1;
            *dtypes.entry(t.source.dtype().to_string()).or_insert(0) += 1;
        }
    }
    (count, dtypes)
}

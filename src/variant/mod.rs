//! What bytes each file of an entry holds.
//!
//! An entry's files are described once, as an [`EntryView`]: a list of [`VFile`]s, each either a
//! real file read through ([`Content::Passthrough`]), a small generated file (a tokenizer config
//! with a chat template, a shard index with new sizes), or a synthesized safetensors file
//! ([`Content::Synth`]): header bytes built once, then tensors whose bytes come from a
//! [`TensorSource`] — stored bytes, or a recipe over another source (a cast, a dequantization …).
//! Views compose: a variant's view is its base's view with each weight tensor's source wrapped.
//!
//! `view` holds the vocabulary, `source` the tensor sources; this module's [`build_view`] walks an
//! entry's chain and applies each recipe (a delta's or an import's through [`delta`]).
//!
//! Nothing here knows about FUSE or the cache: `vfs` maps byte ranges onto these descriptions and
//! caches what [`TensorSource::read`] produces.

pub mod delta;
pub mod source;
pub mod view;

use std::path::Path;
use std::sync::Arc;

pub use crate::source::{ReadError, SourceFile};
pub use source::TensorSource;
pub use view::{
    check_sources, map_weights, tensor_stats, Content, EntryView, LogicalTensor, SynthFile, SynthTensor,
    VFile, ViewError, WeightFile,
};

use crate::adapter;
use crate::codec::quant_file::QuantSource;
use crate::format;
use crate::registry::{Entry, EntryKind, FileRole, Registry};

/// Describe the files of entry `name`.
pub fn build_view(registry: &Registry, name: &str) -> Result<EntryView, ViewError> {
    // Walk the chain first so a cycle or a missing base is an error, not a stack overflow.
    let chain = registry.chain(name)?;
    let mut view = None;
    for entry_name in chain.iter().rev() {
        let entry = registry.get(entry_name)?;
        view = Some(match (&entry.kind, view) {
            (EntryKind::Base { dir, files, .. }, _) => base_view(registry, entry, dir, files),
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
                delta::delta_view(registry, entry_name, files, &base)?
            }
            (EntryKind::Imported { format, files, .. }, Some(base)) => {
                delta::imported_view(registry, entry_name, files, *format, &base)?
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
            let source = Arc::new(registry.source(&dir, record));
            let invalid = |reason: String| ViewError::Invalid { entry: name.to_owned(), reason };
            if let Some(reason) = source.stat_problem() {
                return Err(invalid(format!("{}: {reason}", source.path.display())));
            }
            let header = source.header().map_err(|e| invalid(e.to_string()))?;
            Ok((source, header))
        })
        .collect()
}

fn base_view(
    registry: &Registry,
    entry: &Entry,
    dir: &Path,
    records: &[crate::registry::FileRecord],
) -> EntryView {
    let mut view = EntryView::default();
    for record in records {
        let source = Arc::new(registry.source(dir, record));
        let path = source.path.clone();
        let mut file = VFile {
            name: record.name.clone(),
            size: record.fingerprint.size,
            content: Content::Passthrough(source.clone()),
        };
        if let Some(reason) = source.stat_problem() {
            file.content = Content::Broken(format!("{}: {reason}", path.display()));
        } else if record.role == FileRole::Weights {
            match source.header() {
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
    let original = source.read_all().ok()?;
    adapter::tokenizer_config_with_template(Some(&original), &jinja).ok().map(Arc::from)
}

//! A base entry: a Hugging Face model directory, its files served as they are (the tokenizer
//! config with the entry's chat template added when asked), its weight files parsed into
//! tensors stored verbatim, from which every other recipe derives.

use std::path::Path;
use std::sync::Arc;

use crate::adapter;
use crate::registry::{Entry, FileRecord, FileRole, Registry};
use crate::source::{ReadError, SourceFile};
use crate::variant::source::TensorSource;
use crate::variant::view::{Content, EntryView, LogicalTensor, VFile, ViewError, WeightFile};

/// A base's files. A local file that cannot be read is a broken file of the view (EIO when
/// opened, the rest of the entry served); an object that cannot be read now fails the whole
/// view, which is then built again on the next lookup (the store may be back).
pub(super) fn view(
    registry: &Registry,
    name: &str,
    entry: &Entry,
    dir: &Path,
    records: &[FileRecord],
) -> Result<EntryView, ViewError> {
    let mut view = EntryView::default();
    // A model that ships its chat template beside the tokenizer config (transformers 5 saves it
    // as chat_template.jinja) has one: llmfs adds none.
    let own_template =
        records.iter().any(|r| r.name == "chat_template.jinja" || r.name == "chat_template.json");
    let unreadable = |source: &SourceFile, reason: String| -> Result<(), ViewError> {
        match source.is_remote() {
            true => Err(ViewError::Invalid { entry: name.to_owned(), reason }),
            false => Ok(()),
        }
    };
    for record in records {
        let source = Arc::new(SourceFile::of_record(dir, record, registry.objects.as_ref()));
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
                Err(e) => {
                    unreadable(&source, e.to_string())?;
                    file.content = Content::Broken(e.to_string());
                }
            }
        } else if record.name == "tokenizer_config.json" && !own_template {
            match with_chat_template(entry, &source) {
                Ok(Some(content)) => {
                    file.size = content.len() as u64;
                    file.content = Content::Generated(content);
                }
                Ok(None) => {}
                Err(e) => {
                    unreadable(&source, e.to_string())?;
                    file.content = Content::Broken(e.to_string());
                }
            }
        }
        view.files.push(file);
    }
    Ok(view)
}

/// The tokenizer config with the entry's chat template added, when the entry asks for one
/// (None: it does not, or the config cannot take one); an error if the file cannot be read.
fn with_chat_template(entry: &Entry, source: &SourceFile) -> Result<Option<Arc<[u8]>>, ReadError> {
    let Some(jinja) = entry.chat_template.as_deref().and_then(adapter::chat_template_jinja) else {
        return Ok(None);
    };
    let original = source.read_all()?;
    Ok(adapter::tokenizer_config_with_template(Some(&original), &jinja).ok().map(Arc::from))
}

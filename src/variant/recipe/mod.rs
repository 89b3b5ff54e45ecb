//! Recipes: how an entry's view is made from its parents' views. One file per recipe — a base
//! directory, a cast, a quantized copy, a delta and the imported deltas (FastChat's, LoRA) —
//! each with the tensor sources it wraps around its parents' (`variant::source`). A recipe's
//! parameters are plain data in the registry (`registry::recipe`); the makers that write what a
//! recipe stores are commands above this layer (`quantize`, `delta`).

pub mod base;
pub mod cast;
pub mod delta;
pub mod merge;
pub mod quantized;

use std::sync::Arc;

use serde_json::Value;

use super::view::{read_whole, Content, EntryView, VFile, ViewError};
use crate::format::Dtype;
use crate::registry::{self, Entry, EntryKind, Registry, Store};
use crate::source::SourceFile;

/// Entry `name`'s view from its parents' (`parents`, in the order `EntryKind::parents` gives).
pub(super) fn view(
    registry: &Registry,
    name: &str,
    entry: &Entry,
    parents: &[Arc<EntryView>],
) -> Result<EntryView, ViewError> {
    match (&entry.kind, parents) {
        (EntryKind::Base { dir, files, .. }, []) => base::view(registry, name, entry, dir, files),
        (EntryKind::Cast { dtype, .. }, [base]) => cast::view(name, base, *dtype),
        (EntryKind::Quantized { config, files, .. }, [base]) => {
            quantized::view(registry, name, files, *config, base)
        }
        (EntryKind::Delta { files, .. }, [base]) => delta::delta_view(registry, name, files, base),
        (EntryKind::Imported { format, files, .. }, [base]) => {
            delta::imported_view(registry, name, files, *format, base)
        }
        (EntryKind::Merge { parents: names, config, seed, files, .. }, parents)
            if parents.len() == names.len() =>
        {
            merge::view(registry, name, files, config, *seed, names, parents)
        }
        (kind, _) => Err(ViewError::Invalid {
            entry: name.to_owned(),
            reason: format!("a {} entry with {} parent views", kind.name(), parents.len()),
        }),
    }
}

/// The containers an entry owns in `STORE/models/NAME/`, with their parsed headers. A container
/// that changed since it was written is an error for the whole entry: its tensors are unknown.
fn open_containers(
    registry: &Registry,
    name: &str,
    files: &[crate::registry::FileRecord],
) -> Result<Vec<(Arc<SourceFile>, crate::format::Header)>, ViewError> {
    let dir = registry.entry_dir(name);
    files
        .iter()
        .map(|record| {
            let source = Arc::new(SourceFile::of_record(&dir, record, registry.objects.as_ref()));
            let invalid = |reason: String| ViewError::Invalid { entry: name.to_owned(), reason };
            if let Some(reason) = source.stat_problem() {
                return Err(invalid(format!("{}: {reason}", source.path.display())));
            }
            let header = source.header().map_err(|e| invalid(e.to_string()))?;
            Ok((source, header))
        })
        .collect()
}

/// The torch dtype names config.json uses.
fn torch_dtype(dtype: Dtype) -> Option<&'static str> {
    match dtype {
        Dtype::F16 => Some("float16"),
        Dtype::BF16 => Some("bfloat16"),
        Dtype::F32 => Some("float32"),
        _ => None,
    }
}

/// A variant whose weights are all in `dtype` says so in its config.json, so that loaders that
/// take the dtype from it (`from_pretrained(dtype="auto")`) keep the variant's tensors as they
/// are instead of converting them back to the base's dtype: `dtype` is set, and `torch_dtype`
/// where the base's config has it (older transformers read only that). A config.json that is
/// not a JSON object, or says nothing different, is left as it is.
fn config_with_dtype(view: &mut EntryView, dtype: Dtype) {
    edit_config(view, |config| set_dtype(config, dtype));
}

/// Set `dtype` (and `torch_dtype` where the config has it) to `dtype`'s torch name (a config
/// that already says so is not rewritten: see [`edit_config`]).
fn set_dtype(config: &mut serde_json::Map<String, Value>, dtype: Dtype) {
    let Some(name) = torch_dtype(dtype) else { return };
    config.insert("dtype".into(), Value::String(name.into()));
    if config.contains_key("torch_dtype") {
        config.insert("torch_dtype".into(), Value::String(name.into()));
    }
}

/// Change the view's config.json with `change`; the file is rewritten only if that changed
/// something (a config.json that is not a JSON object is left as it is).
fn edit_config(view: &mut EntryView, change: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let Some(file) = view.files.iter_mut().find(|f| f.name == "config.json") else { return };
    let Ok(bytes) = read_whole(file) else { return };
    let Ok(Value::Object(mut config)) = serde_json::from_slice::<Value>(&bytes) else { return };
    let before = config.clone();
    change(&mut config);
    if config == before {
        return;
    }
    // As transformers writes it: two-space indent, a newline at the end.
    let Ok(mut out) = serde_json::to_vec_pretty(&Value::Object(config)) else { return };
    out.push(b'\n');
    *file =
        VFile { name: file.name.clone(), size: out.len() as u64, content: Content::Generated(out.into()) };
}

/// Register entry `name` made by recipe `kind` from `base` (its first parent): it inherits the
/// base's family, templates and ModelInfo link, and is refused if its view cannot be built.
pub fn register(store: &Store, name: &str, base: &str, kind: EntryKind) -> Result<Entry, registry::Error> {
    registry::validate_name(name)?;
    let entry = store.update(|r| {
        let entry = new_entry(r, name, base, kind.clone())?;
        r.entries.insert(name.to_owned(), entry.clone());
        // Refuse what cannot be served before anyone mounts it.
        super::build_view(r, name).map_err(|e| registry::Error::Invalid(e.to_string()))?;
        Ok(entry)
    })?;
    Ok(entry)
}

/// Entry `name` made by recipe `kind` from `base` in `r` (not inserted): it inherits the base's
/// family, templates and ModelInfo link. Refused if the name is taken or `base` is unknown.
pub fn new_entry(r: &Registry, name: &str, base: &str, kind: EntryKind) -> Result<Entry, registry::Error> {
    if r.entries.contains_key(name) {
        return Err(registry::Error::Exists(name.to_owned()));
    }
    let b = r.get(base)?.clone();
    Ok(Entry {
        kind,
        info: registry::ModelInfo {
            simple_name: name.to_owned(),
            link: b.info.link.clone(),
            description: format!("{} of {base}", "variant"),
        },
        family: b.family,
        template: b.template,
        chat_template: b.chat_template,
        created: registry::now_secs(),
        generation: registry::new_generation(),
    })
}

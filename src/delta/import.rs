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

use std::fs;
use std::path::Path;

use crate::registry::add::{copy_to_staging, Added};
pub use crate::registry::recipe::ImportFormat;
use crate::registry::walk::gone;
use crate::registry::{self, io_err, Entry, EntryKind, Error, FileRecord, FileRole, Fingerprint, Store};
use crate::variant::recipe::delta::import_view;

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
                object: None,
            })
        })
        .collect::<Result<_, Error>>()?;
    import_view(from, None, &probe, format, &base_view)
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
                object: None,
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
    let entry = store.insert_staged(name, &entry, staging)?;
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

//! `llmfs add`: register a Hugging Face model directory as a base entry.
//!
//! Everything that can be wrong with the directory is found before the catalogue is touched:
//! every safetensors header is parsed strictly, the shard index must agree with the shards, and
//! the name must be free. Only then are files copied (into a staging directory renamed into place)
//! and fingerprinted, and the entry written in one atomic registry update.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    io_err, validate_name, Entry, EntryKind, Error, FileRecord, FileRole, Fingerprint, ModelInfo, Result,
    Store, INDEX_FILE,
};
use crate::{adapter, format};

/// What the user asked for with `llmfs add`.
#[derive(Clone, Debug, Default)]
pub struct AddOptions {
    pub copy: bool,
    pub link: Option<String>,
    pub description: Option<String>,
    /// `auto` (None here), `none`, or a template name.
    pub chat_template: ChatTemplateChoice,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ChatTemplateChoice {
    /// Use the family's template when the model's tokenizer_config.json has no chat_template.
    #[default]
    Auto,
    None,
    Named(String),
}

impl std::str::FromStr for ChatTemplateChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            name if adapter::template(name).is_some() => Ok(Self::Named(name.to_owned())),
            other => Err(format!(
                "unknown template {other:?}; one of: auto, none, {}",
                adapter::template_names().join(", ")
            )),
        }
    }
}

/// A model directory after validation: its files and what they are.
#[derive(Debug)]
pub struct ScannedModel {
    pub dir: PathBuf,
    pub files: Vec<(String, FileRole)>,
    pub tensor_count: usize,
}

/// Validate a model directory without touching the store.
pub fn scan_model_dir(dir: &Path) -> Result<ScannedModel> {
    let meta = fs::metadata(dir).map_err(io_err(dir))?;
    if !meta.is_dir() {
        return Err(Error::NotAModel { path: dir.to_owned(), reason: "not a directory".into() });
    }
    let dir = dir.canonicalize().map_err(io_err(dir))?;
    let mut files = vec![];
    let mut torch_weights = false;
    for item in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let item = item.map_err(io_err(&dir))?;
        let name = item.file_name().to_string_lossy().into_owned();
        // Follow symlinks: the Hugging Face cache's snapshot directories are links into blobs/.
        let path = dir.join(&name);
        let is_file = fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false);
        if name.starts_with('.') || !is_file || validate_name(&name).is_err() {
            continue;
        }
        let role = if name.ends_with(".safetensors") {
            FileRole::Weights
        } else if name == INDEX_FILE {
            FileRole::Index
        } else {
            if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
                // Served only as safetensors: skip pickles (variants could not be synthesized).
                torch_weights = true;
                continue;
            }
            FileRole::Other
        };
        files.push((name, role));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let weights: Vec<String> =
        files.iter().filter(|(_, r)| *r == FileRole::Weights).map(|(n, _)| n.clone()).collect();
    if weights.is_empty() {
        let reason = if torch_weights {
            "has only PyTorch .bin/.pt weights; convert them to safetensors first, e.g. \
             python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('DIR').save_pretrained('OUT', safe_serialization=True)\""
                .to_owned()
        } else {
            "not a model directory: no *.safetensors weights".to_owned()
        };
        return Err(Error::NotAModel { path: dir, reason });
    }
    let mut tensor_names = std::collections::HashMap::new();
    for w in &weights {
        let header = format::read_header_path(&dir.join(w))?;
        for t in header.tensors {
            if let Some(other) = tensor_names.insert(t.name.clone(), w.as_str()) {
                return Err(Error::NotAModel {
                    path: dir.join(w),
                    reason: format!("tensor {:?} is also in {other}", t.name),
                });
            }
        }
    }
    if files.iter().any(|(_, r)| *r == FileRole::Index) {
        check_index(&dir.join(INDEX_FILE), &tensor_names)?;
    }
    Ok(ScannedModel { dir, files, tensor_count: tensor_names.len() })
}

/// The shard index must map every tensor to the shard that holds it.
fn check_index(path: &Path, tensors: &std::collections::HashMap<String, &str>) -> Result<()> {
    let bad = |reason: String| Error::NotAModel { path: path.to_owned(), reason };
    let bytes = fs::read(path).map_err(io_err(path))?;
    let index: Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no weight_map object".into()))?;
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a string")))?;
        match tensors.get(tensor) {
            Some(actual) if *actual == file => {}
            Some(actual) => return Err(bad(format!("maps {tensor:?} to {file}, but it is in {actual}"))),
            None => return Err(bad(format!("maps {tensor:?} to {file}, which has no such tensor"))),
        }
    }
    if map.len() != tensors.len() {
        return Err(bad(format!("lists {} tensors, the shards hold {}", map.len(), tensors.len())));
    }
    Ok(())
}

/// Register the model directory at `path` as base entry `name`.
pub fn add(store: &Store, name: &str, path: &Path, opts: &AddOptions) -> Result<Entry> {
    validate_name(name)?;
    let scanned = scan_model_dir(path)?;
    if store.load()?.entries.contains_key(name) {
        return Err(Error::Exists(name.to_owned()));
    }
    let config = read_json(&scanned.dir.join("config.json"));
    // FastChat matches the model path; the entry name is often more telling, so try it first.
    let mut family = adapter::detect(name, config.as_ref());
    if family == adapter::UNKNOWN {
        let basename = scanned.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        family = adapter::detect(&basename, config.as_ref());
    }
    let has_template = read_json(&scanned.dir.join("tokenizer_config.json"))
        .is_some_and(|t| t.get("chat_template").is_some_and(|v| !v.is_null()));
    let chat_template = match &opts.chat_template {
        ChatTemplateChoice::None => None,
        ChatTemplateChoice::Named(n) => Some(n.clone()),
        ChatTemplateChoice::Auto if has_template || family.name == "unknown" => None,
        ChatTemplateChoice::Auto => Some(family.template.to_owned()),
    };
    let mut info = super::known_models::lookup(name).unwrap_or_else(|| ModelInfo {
        simple_name: name.to_owned(),
        link: String::new(),
        description: String::new(),
    });
    if let Some(link) = &opts.link {
        info.link = link.clone();
    }
    if let Some(d) = &opts.description {
        info.description = d.clone();
    }

    // Copy into staging first: the entry's directory appears whole or not at all.
    let staging = if opts.copy { Some(copy_to_staging(store, name, &scanned)?) } else { None };
    let fingerprint_dir = staging.as_ref().map_or(scanned.dir.clone(), |s| s.path().to_owned());
    let files = scanned
        .files
        .iter()
        .map(|(file, role)| {
            let p = fingerprint_dir.join(file);
            Ok(FileRecord {
                name: file.clone(),
                role: *role,
                fingerprint: Fingerprint::of(&p).map_err(io_err(&p))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let dir = if opts.copy { store.entry_dir(name) } else { scanned.dir.clone() };
    let entry = Entry {
        kind: EntryKind::Base { dir: dir.clone(), copied: opts.copy, files },
        info,
        family: family.name.to_owned(),
        template: family.template.to_owned(),
        chat_template,
        created: super::now_secs(),
        generation: super::new_generation(),
    };
    store.insert_entry(name, &entry, staging)?;
    Ok(entry)
}

fn copy_to_staging(store: &Store, name: &str, scanned: &ScannedModel) -> Result<super::StagingDir> {
    let staging = store.staging_dir(&format!("add-{name}"))?;
    for (file, _) in &scanned.files {
        let (src, dst) = (scanned.dir.join(file), staging.path().join(file));
        fs::copy(&src, &dst).map_err(io_err(&dst))?;
        fs::File::open(&dst).and_then(|f| f.sync_all()).map_err(io_err(&dst))?;
    }
    Ok(staging)
}

pub(crate) fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

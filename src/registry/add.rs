//! `llmfs add`: register a Hugging Face model directory as a base entry.
//!
//! Everything that can be wrong with the directory is found before the catalogue is touched:
//! every safetensors header is parsed strictly, the shard index must agree with the shards, and
//! the name must be free. Only then are files copied (into a staging directory renamed into place)
//! and fingerprinted, and the entry written in one atomic registry update.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::walk::{self, gone};
use super::{
    io_err, validate_name, Entry, EntryKind, Error, FileRecord, FileRole, Fingerprint, ModelInfo, Result,
    Store, INDEX_FILE,
};
use crate::store::StoreError;
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
    /// Every kept file (relative path, see [`walk`]) and its role.
    pub files: Vec<(String, FileRole)>,
    pub tensor_count: usize,
    /// What the walk left out or followed outside the directory, one line each.
    pub notes: Vec<String>,
}

/// Validate a model directory without touching the store.
pub fn scan_model_dir(dir: &Path) -> Result<ScannedModel> {
    let walked = walk::walk(dir)?;
    let files = walked.with_roles();
    let dir = walked.root;
    let weights: Vec<&str> =
        files.iter().filter(|(_, r)| *r == FileRole::Weights).map(|(n, _)| n.as_str()).collect();
    if weights.is_empty() {
        // PyTorch pickles are kept beside safetensors weights, but cannot stand in for them:
        // variants are synthesized from safetensors only.
        let reason = if files.iter().any(|(n, _)| walk::is_pickle(n)) {
            "has only PyTorch .bin/.pt weights; convert them to safetensors first, e.g. \
             python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('DIR').save_pretrained('OUT', safe_serialization=True)\""
                .to_owned()
        } else {
            "not a model directory: no *.safetensors weights at its top level".to_owned()
        };
        return Err(Error::NotAModel { path: dir, reason });
    }
    let mut tensor_names = std::collections::HashMap::new();
    for w in &weights {
        let header = format::read_header_path(&dir.join(w))?;
        for t in header.tensors {
            if let Some(other) = tensor_names.insert(t.name.clone(), *w) {
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
    let tensor_count = tensor_names.len();
    Ok(ScannedModel { dir, files, tensor_count, notes: walked.notes })
}

/// The name FastChat would be given for the model at `dir`: its basename, or for a Hugging Face
/// cache snapshot (`models--ORG--NAME/snapshots/REV/`, whose basename is a commit hash) the
/// repository id `ORG/NAME` it was downloaded as.
fn model_path_name(dir: &Path) -> String {
    let name = |p: Option<&Path>| p.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
    let parent = dir.parent();
    if name(parent).as_deref() == Some("snapshots") {
        if let Some(repo) = name(parent.and_then(Path::parent)) {
            if let Some(id) = repo.strip_prefix("models--") {
                return id.replacen("--", "/", 1);
            }
        }
    }
    name(Some(dir)).unwrap_or_default()
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
    // An index naming shards beside an unsharded model.safetensors is what save_pretrained
    // leaves when an unsharded save follows a sharded one (the same hint as `llmfs check`'s).
    let unsharded = tensors.values().any(|f| *f == "model.safetensors");
    let hint = |file: &str| match unsharded && file != "model.safetensors" {
        true => format!(
            " (a stale index beside model.safetensors, as save_pretrained leaves when an unsharded save \
             follows a sharded one: remove {})",
            path.display()
        ),
        false => String::new(),
    };
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a string")))?;
        match tensors.get(tensor) {
            Some(actual) if *actual == file => {}
            Some(actual) => {
                return Err(bad(format!("maps {tensor:?} to {file}, but it is in {actual}{}", hint(file))))
            }
            None => {
                return Err(bad(format!("maps {tensor:?} to {file}, which has no such tensor{}", hint(file))))
            }
        }
    }
    if map.len() != tensors.len() {
        return Err(bad(format!("lists {} tensors, the shards hold {}", map.len(), tensors.len())));
    }
    Ok(())
}

/// A new entry, and the lines saying what its directory's walk left out or followed.
#[derive(Debug)]
pub struct Added {
    pub entry: Entry,
    pub notes: Vec<String>,
}

/// Register the model directory at `path` as base entry `name`.
pub fn add(store: &Store, name: &str, path: &Path, opts: &AddOptions) -> Result<Added> {
    validate_name(name)?;
    let scanned = scan_model_dir(path)?;
    register(store, name, scanned, opts)
}

/// Register the model at `url` (`s3://BUCKET/PATH`, a Hugging Face directory's files under
/// PATH/) in place: its objects are recorded with their etags and read from there; `rm` leaves
/// them alone. Validated as `add` validates a directory, on a local shadow of it (the small
/// files, and sparse weight files holding only their headers), without downloading weights.
pub fn add_objects(store: &Store, name: &str, url: &str, opts: &AddOptions) -> Result<Added> {
    validate_name(name)?;
    let Some(objects) = store.objects() else {
        return Err(Error::Invalid(format!(
            "{url}: a model in an object store is added in place to a store there (--store s3://BUCKET[/PREFIX])"
        )));
    };
    let (bucket, prefix) = crate::store::S3Config::parse_url(url)?;
    let bucket_store = crate::store::Store::open(&format!("s3://{bucket}"))?;
    let listed = bucket_store.list(&prefix)?;
    let shadow = store.staging_dir(&format!("add-{name}-shadow"))?;
    let mut records = std::collections::BTreeMap::new();
    for meta in &listed {
        let rel = meta.key.strip_prefix(&prefix).unwrap_or(&meta.key).trim_start_matches('/').to_owned();
        if super::validate_file_path(&rel).is_err() {
            continue;
        }
        let record = FileRecord {
            name: rel.clone(),
            role: walk::role_of(&rel),
            fingerprint: Fingerprint::of_object(meta.size, &meta.etag),
            object: Some(format!("s3://{bucket}/{}", meta.key)),
        };
        let path = shadow.path().join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let file = fs::File::create(&path).map_err(io_err(&path))?;
        file.set_len(meta.size).map_err(io_err(&path))?;
        let object = record.object.as_deref().expect("set above");
        let get = |r: std::ops::Range<u64>| {
            objects.read_range(object, &meta.etag, meta.size, r).map_err(|e| Error::Invalid(e.to_string()))
        };
        let head = match record.role {
            // The 8-byte length and the JSON header (scan_model_dir checks them strictly).
            FileRole::Weights if meta.size >= 8 => {
                let mut bytes = get(0..8)?;
                let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
                if len <= format::MAX_HEADER_SIZE && len + 8 <= meta.size {
                    bytes.extend(get(8..8 + len)?);
                }
                bytes
            }
            FileRole::Weights => vec![],
            _ if meta.size <= 64 << 20 => get(0..meta.size)?,
            _ => vec![],
        };
        use std::os::unix::fs::FileExt;
        file.write_all_at(&head, 0).map_err(io_err(&path))?;
        records.insert(rel, record);
    }
    let scanned = scan_model_dir(shadow.path()).map_err(|e| match e {
        Error::NotAModel { reason, .. } => Error::NotAModel { path: PathBuf::from(url), reason },
        e => e,
    })?;
    let files = scanned.files.iter().filter_map(|(f, _)| records.remove(f)).collect();
    let described = describe(name, &scanned.dir, Path::new(&prefix), opts);
    let entry = described.entry(EntryKind::Base { dir: PathBuf::from(url), copied: false, files });
    let entry = store.insert_entry(name, &entry, None)?;
    Ok(Added { entry, notes: scanned.notes })
}

/// What a new base entry says of its model besides its files.
struct Described {
    family: adapter::Family,
    chat_template: Option<String>,
    info: ModelInfo,
}

impl Described {
    /// The new entry, of `kind`.
    fn entry(self, kind: EntryKind) -> Entry {
        Entry {
            kind,
            info: self.info,
            family: self.family.name.to_owned(),
            template: self.family.template.to_owned(),
            chat_template: self.chat_template,
            created: super::now_secs(),
            generation: super::new_generation(),
        }
    }
}

/// The family, chat template and ModelInfo of a model whose files are in `dir`, named `name`
/// and found at `path` (FastChat matches the model path too).
fn describe(name: &str, dir: &Path, path: &Path, opts: &AddOptions) -> Described {
    let config = read_json(&dir.join("config.json"));
    // FastChat matches the model path; the entry name is often more telling, so try it first.
    let mut family = adapter::detect(name, config.as_ref());
    if family == adapter::UNKNOWN {
        family = adapter::detect(&model_path_name(path), config.as_ref());
    }
    let has_template = read_json(&dir.join("tokenizer_config.json"))
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
    Described { family, chat_template, info }
}

/// Everything after the scan: a file that vanishes from here on is an error, and nothing changes.
fn register(store: &Store, name: &str, scanned: ScannedModel, opts: &AddOptions) -> Result<Added> {
    if store.load()?.entries.contains_key(name) {
        return Err(Error::Exists(name.to_owned()));
    }
    let described = describe(name, &scanned.dir, &scanned.dir, opts);

    // An entry in an object store must own its files (other nodes cannot read a local path):
    // they are uploaded from where they are. A local store's copy goes to staging first, so the
    // entry's directory appears whole or not at all.
    let copied = opts.copy || !store.node().keeps_local_paths();
    let names: Vec<&str> = scanned.files.iter().map(|(f, _)| f.as_str()).collect();
    let staged = match copied {
        true => Some(store.node().stage_copy(name, &scanned.dir, &names).map_err(vanished)?),
        false => None,
    };
    let local_copy = staged.as_ref().and_then(|s| s.local_dir());
    let fingerprint_dir = local_copy.unwrap_or(&scanned.dir).to_owned();
    let dir = if local_copy.is_some() { store.entry_dir(name) } else { scanned.dir.clone() };
    let files = scanned
        .files
        .iter()
        .map(|(file, role)| {
            let p = fingerprint_dir.join(file);
            Ok(FileRecord {
                name: file.clone(),
                role: *role,
                fingerprint: Fingerprint::of(&p).map_err(gone(&p))?,
                object: None,
            })
        })
        .collect::<Result<Vec<_>>>();
    let files = match files {
        Ok(files) => files,
        Err(e) => {
            if let Some(staged) = staged {
                staged.discard();
            }
            return Err(e);
        }
    };
    let entry = described.entry(EntryKind::Base { dir, copied, files });
    let entry = store.insert_entry(name, &entry, staged)?;
    Ok(Added { entry, notes: scanned.notes })
}

/// Copy `files` (relative paths) from `from` into a new staging directory, subdirectories too.
pub(crate) fn copy_to_staging(
    store: &Store,
    label: &str,
    from: &Path,
    files: &[(String, FileRole)],
) -> Result<super::StagingDir> {
    let names: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
    store.node().copy_to_staging(label, from, &names).map_err(vanished)
}

/// A file missing while it is copied in vanished mid-add (see [`gone`]).
fn vanished(e: StoreError) -> Error {
    match e {
        StoreError::NotFound { key } => gone(Path::new(&key))(std::io::ErrorKind::NotFound.into()),
        e => e.into(),
    }
}

pub(crate) fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_vanishes_mid_add_is_an_error_and_changes_nothing() {
        for copy in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let model = d.path().join("m");
            crate::demo::write_model(&model, &crate::demo::ModelSpec::tiny()).unwrap();
            std::fs::create_dir_all(model.join("1_Pooling")).unwrap();
            std::fs::write(model.join("1_Pooling/config.json"), "{}").unwrap();
            let store = Store::open(d.path().join("store")).unwrap();
            let scanned = scan_model_dir(&model).unwrap();
            assert!(scanned.files.iter().any(|(n, _)| n == "1_Pooling/config.json"));
            // Gone between the walk and the copy / fingerprint.
            std::fs::remove_file(model.join("1_Pooling/config.json")).unwrap();
            let opts = AddOptions { copy, ..Default::default() };
            let e = register(&store, "m", scanned, &opts).unwrap_err().to_string();
            assert!(e.contains("1_Pooling/config.json") && e.contains("vanished"), "copy={copy}: {e}");
            assert!(store.load().unwrap().entries.is_empty(), "copy={copy}: an entry was registered");
            assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "staging left behind");
            assert!(!store.entry_dir("m").exists());
        }
    }
}

//! Making deltas: `llmfs delta make`, and each file written into `MOUNT/<base>/deltas/NEW/`.
//!
//! A target file becomes one container ([`store_file`]): a safetensors file that parses has each
//! tensor coded against the base tensor of the same name (found in any of the base's shards)
//! when shape and dtype agree, and stored whole otherwise; any other file is stored whole. Both
//! are coded losslessly unless a lossy codec was asked for, so by default every byte written reads
//! back identical. Tensor data is written to a side file first and appended after the container's
//! header, so no file is ever held in memory whole (one tensor at a time is).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{keys, DeltaCodec};
use crate::codec::delta as codec;
use crate::format::{self, Dtype, HeaderBuilder};
use crate::registry::{self, io_err, Entry, EntryKind, Error, FileRecord, FileRole, Fingerprint, Store};
use crate::variant::{self, EntryView, LogicalTensor};

/// The base's tensors by name, across all its shards.
pub struct BaseTensors(HashMap<String, LogicalTensor>);

impl BaseTensors {
    pub fn of(view: &EntryView) -> Self {
        BaseTensors(view.weights.values().flat_map(|w| &w.tensors).map(|t| (t.name.clone(), t.clone())).collect())
    }
    /// The base twin of a target tensor: same name, shape and dtype.
    pub(crate) fn twin(&self, name: &str, shape: &[usize], dtype: Dtype) -> Option<&LogicalTensor> {
        self.0.get(name).filter(|t| t.shape == shape && t.source.dtype() == dtype)
    }
}

/// Store target file `src` as container `dest` (a new file). Returns its record (fingerprint of
/// the container, role of the target file).
pub fn store_file(src: &Path, dest: &Path, base: &BaseTensors, codec: DeltaCodec) -> Result<FileRecord, Error> {
    let file = File::open(src).map_err(io_err(src))?;
    let size = file.metadata().map_err(io_err(src))?.len();
    let name = src.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let header = if name.ends_with(".safetensors") { format::read_header(&file).ok() } else { None };
    let data_path = dest.with_extension("data.tmp");
    let result = (|| {
        let mut data = BufWriter::with_capacity(8 << 20, File::create(&data_path).map_err(io_err(&data_path))?);
        let mut builder = HeaderBuilder::new().metadata(keys::SIZE, &size.to_string()).metadata(keys::CODEC, codec.name());
        let mut parts: Vec<(String, Dtype, Vec<usize>)> = vec![];
        let role = match &header {
            Some(h) => {
                let mut prefix = vec![0u8; h.data_start as usize];
                file.read_exact_at(&mut prefix, 0).map_err(io_err(src))?;
                write_part(&mut data, &mut parts, keys::HEADER, Dtype::U8, &prefix, &data_path)?;
                let mut based = vec![];
                for t in &h.tensors {
                    let mut target = vec![0u8; t.len() as usize];
                    file.read_exact_at(&mut target, h.data_start + t.start).map_err(io_err(src))?;
                    let twin = base.twin(&t.name, &t.shape, t.dtype);
                    if encode_tensor(&mut data, &mut parts, &t.name, t.dtype, &t.shape, &target, twin, codec, &data_path)? {
                        based.push(t.name.clone());
                    }
                }
                builder = builder
                    .metadata(keys::KIND, keys::KIND_SAFETENSORS)
                    .metadata(keys::BASED, &serde_json::to_string(&based).expect("strings serialize"));
                if name == registry::INDEX_FILE { FileRole::Index } else { FileRole::Weights }
            }
            None => {
                let bytes = fs::read(src).map_err(io_err(src))?;
                encode_tensor(&mut data, &mut parts, keys::FILE, Dtype::U8, &[bytes.len()], &bytes, None, DeltaCodec::Lossless, &data_path)?;
                builder = builder.metadata(keys::KIND, keys::KIND_VERBATIM);
                if name == registry::INDEX_FILE { FileRole::Index } else { FileRole::Other }
            }
        };
        data.flush().map_err(io_err(&data_path))?;
        drop(data);
        for (n, dtype, shape) in &parts {
            builder.tensor(n, *dtype, shape);
        }
        let (container_header, _) = builder.build();
        let mut out = OpenOptions::new().create_new(true).write(true).mode(0o600).open(dest).map_err(io_err(dest))?;
        out.write_all(&container_header).map_err(io_err(dest))?;
        io::copy(&mut File::open(&data_path).map_err(io_err(&data_path))?, &mut out).map_err(io_err(dest))?;
        out.sync_all().map_err(io_err(dest))?;
        let fingerprint = Fingerprint::of(dest).map_err(io_err(dest))?;
        Ok(FileRecord { name, role, fingerprint })
    })();
    let _ = fs::remove_file(&data_path);
    if result.is_err() {
        let _ = fs::remove_file(dest);
    }
    result
}

fn write_part(
    data: &mut impl Write,
    parts: &mut Vec<(String, Dtype, Vec<usize>)>,
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    path: &Path,
) -> Result<(), Error> {
    data.write_all(bytes).map_err(io_err(path))?;
    parts.push((name.to_owned(), dtype, vec![bytes.len() / dtype.size()]));
    Ok(())
}

/// Code one tensor; true when it was coded against its base twin.
#[allow(clippy::too_many_arguments)]
fn encode_tensor(
    data: &mut impl Write,
    parts: &mut Vec<(String, Dtype, Vec<usize>)>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    target: &[u8],
    twin: Option<&LogicalTensor>,
    codec: DeltaCodec,
    path: &Path,
) -> Result<bool, Error> {
    let base = match twin {
        Some(t) => {
            let mut b = vec![0u8; target.len()];
            t.source.read(0..target.len() / dtype.size(), &mut b).map_err(|e| Error::Invalid(e.to_string()))?;
            Some(b)
        }
        None => None,
    };
    match (codec, &base) {
        (DeltaCodec::Q8, Some(b)) if dtype.is_float() => {
            let (q, scales) = codec::encode_q8(target, b, dtype);
            write_part(data, parts, &format!("{name}.q"), Dtype::I8, bytemuck::cast_slice(&q), path)?;
            write_part(data, parts, &format!("{name}.scale"), Dtype::F32, bytemuck::cast_slice(&scales), path)?;
        }
        (DeltaCodec::Bitdelta, Some(b)) if dtype.is_float() && shape.len() == 2 => {
            let (signs, scales) = codec::encode_bitdelta(target, b, dtype, shape[0], shape[1]);
            write_part(data, parts, &format!("{name}.signs"), Dtype::U8, &signs, path)?;
            write_part(data, parts, &format!("{name}.scale"), Dtype::F32, bytemuck::cast_slice(&scales), path)?;
        }
        _ => {
            let encoded = codec::encode_lossless(target, base.as_deref(), dtype.size(), codec::DEFAULT_LEVEL);
            write_part(data, parts, &format!("{name}.frames"), Dtype::U8, &encoded.frames, path)?;
            let offsets: Vec<u8> = encoded.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
            write_part(data, parts, &format!("{name}.offsets"), Dtype::U64, &offsets, path)?;
        }
    }
    Ok(base.is_some())
}

/// The base view a delta is made against, checked to be servable.
pub fn base_view(registry: &registry::Registry, base: &str) -> Result<EntryView, Error> {
    registry.chain(base)?;
    let view = variant::build_view(registry, base).map_err(|e| Error::Invalid(e.to_string()))?;
    for file in &view.files {
        crate::vfs::check_sources(file).map_err(|e| Error::Invalid(format!("{base}: {}: {e}", file.name)))?;
    }
    Ok(view)
}

/// A target of another architecture than its base is refused: its tensors would not line up.
pub fn check_architecture(base: &EntryView, target_dir: &Path) -> Result<(), Error> {
    let read = |bytes: Option<Vec<u8>>| bytes.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let base_config = base.file("config.json").and_then(|f| match &f.content {
        variant::Content::Passthrough(s) => read(fs::read(&s.path).ok()),
        variant::Content::Generated(b) => read(Some(b.to_vec())),
        _ => None,
    });
    let target_config = read(fs::read(target_dir.join("config.json")).ok());
    if let (Some(b), Some(t)) = (base_config, target_config) {
        for key in ["architectures", "model_type"] {
            if b.get(key).is_some() && t.get(key).is_some() && b.get(key) != t.get(key) {
                return Err(Error::Invalid(format!(
                    "{}: {key} is {} but the base's is {}: a delta needs the same architecture",
                    target_dir.join("config.json").display(),
                    t[key],
                    b[key]
                )));
            }
        }
    }
    Ok(())
}

/// `llmfs delta make NAME --base BASE --target DIR --codec C`.
pub fn make_delta(store: &Store, name: &str, base: &str, target_dir: &Path, codec: DeltaCodec, progress: impl Fn(u64)) -> Result<Entry, Error> {
    registry::validate_name(name)?;
    let registry = store.load()?;
    if registry.entries.contains_key(name) {
        return Err(Error::Exists(name.to_owned()));
    }
    let base_entry = registry.get(base)?.clone();
    let view = base_view(&registry, base)?;
    if !fs::metadata(target_dir).map_err(io_err(target_dir))?.is_dir() {
        return Err(Error::NotAModel { path: target_dir.to_owned(), reason: "not a directory".into() });
    }
    check_architecture(&view, target_dir)?;
    let base_tensors = BaseTensors::of(&view);
    let staging = store.staging_dir(&format!("delta-{name}"))?;
    let mut files = vec![];
    let mut names: Vec<String> = fs::read_dir(target_dir)
        .map_err(io_err(target_dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| registry::validate_name(n).is_ok() && fs::metadata(target_dir.join(n)).is_ok_and(|m| m.is_file()))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::NotAModel { path: target_dir.to_owned(), reason: "no files to store".into() });
    }
    for file_name in &names {
        let src = target_dir.join(file_name);
        files.push(store_file(&src, &staging.path().join(file_name), &base_tensors, codec)?);
        progress(fs::metadata(&src).map(|m| m.len()).unwrap_or(0));
    }
    let entry = new_entry(name, base, &base_entry, codec, files);
    store.insert_entry(name, &entry, Some(staging))?;
    Ok(entry)
}

/// A delta entry over `base`, inheriting its family and templates.
pub fn new_entry(name: &str, base: &str, base_entry: &Entry, codec: DeltaCodec, files: Vec<FileRecord>) -> Entry {
    Entry {
        kind: EntryKind::Delta { base: base.to_owned(), codec, files },
        info: registry::ModelInfo {
            simple_name: name.to_owned(),
            link: String::new(),
            description: format!("fine-tune of {base}, stored as a {} delta", codec.name()),
        },
        family: base_entry.family.clone(),
        template: base_entry.template.clone(),
        chat_template: None,
        created: registry::now_secs(),
        generation: registry::new_generation(),
    }
}

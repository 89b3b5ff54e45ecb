//! Making deltas: `llmfs delta make`, and each file written into `MOUNT/<base>/deltas/NEW/`.
//!
//! A target file becomes one container ([`store_file`]): a safetensors file that parses has each
//! tensor coded against the base tensor of the same name (found in any of the base's shards)
//! when shape and dtype agree, and stored whole otherwise; any other file is stored whole. Both
//! are coded losslessly unless a lossy codec was asked for, so by default every byte written reads
//! back identical. A container is written in one pass ([`ContainerWriter`]): its header space is
//! reserved from the parts' names (known from the target's header before anything is coded) and
//! the parts go straight into place behind it. Lossless tensors are coded a batch of chunks at a
//! time, in parallel, so memory holds a few MiB whatever the tensor's size (the lossy codecs read
//! one tensor at a time). Files written into `deltas/` are coded the same way while they are
//! being written (`delta::stream`), into the same container bytes.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::DeltaCodec;
use crate::cache::with_scratch;
use crate::codec::delta as codec;
use crate::format::{self, Dtype, HeaderBuilder};
use crate::registry::add::Added;
use crate::registry::{self, io_err, Entry, EntryKind, Error, FileRecord, FileRole, Fingerprint, Store};
use crate::variant::recipe::delta::keys;
pub use crate::variant::recipe::delta::BaseTensors;
use crate::variant::{self, EntryView, LogicalTensor};

/// What a container of a target file holds before any of it is coded: its `__metadata__` and the
/// names of its parts in order. Everything here follows from the target's header and the base, so
/// the container's header space can be reserved up front and the parts written straight into
/// place ([`ContainerWriter`]), whether the file is coded at once ([`store_file`]) or chunk by
/// chunk as it is written (`delta::stream`).
pub(crate) struct Layout {
    pub metadata: Vec<(&'static str, String)>,
    pub parts: Vec<String>,
    pub role: FileRole,
}

impl Layout {
    /// The layout of a safetensors target with header `h` (`size`: the file's size).
    pub fn safetensors(
        name: &str,
        size: u64,
        h: &format::Header,
        base: &BaseTensors,
        codec: DeltaCodec,
    ) -> Layout {
        let mut parts = vec![keys::HEADER.to_owned()];
        let mut based = vec![];
        for t in &h.tensors {
            let twin = base.twin(&t.name, &t.shape, t.dtype).is_some();
            if twin {
                based.push(t.name.clone());
            }
            let suffixes: &[&str] = match codec {
                DeltaCodec::Q8 if twin && t.dtype.is_float() => &["q", "scale"],
                DeltaCodec::Bitdelta if twin && t.dtype.is_float() && t.shape.len() == 2 => {
                    &["signs", "scale"]
                }
                _ => &["frames", "offsets"],
            };
            parts.extend(suffixes.iter().map(|s| format!("{}.{s}", t.name)));
        }
        Layout {
            metadata: vec![
                (keys::SIZE, size.to_string()),
                (keys::CODEC, codec.name().to_owned()),
                (keys::KIND, keys::KIND_SAFETENSORS.to_owned()),
                (keys::BASED, serde_json::to_string(&based).expect("strings serialize")),
            ],
            parts,
            role: if name == registry::INDEX_FILE { FileRole::Index } else { FileRole::Weights },
        }
    }

    /// The layout of any other file: its bytes as one lossless tensor.
    pub fn verbatim(name: &str, size: u64, codec: DeltaCodec) -> Layout {
        Layout {
            metadata: vec![
                (keys::SIZE, size.to_string()),
                (keys::CODEC, codec.name().to_owned()),
                (keys::KIND, keys::KIND_VERBATIM.to_owned()),
            ],
            parts: vec![format!("{}.frames", keys::FILE), format!("{}.offsets", keys::FILE)],
            role: if name == registry::INDEX_FILE { FileRole::Index } else { FileRole::Other },
        }
    }
}

/// Writes a container in one pass: the parts go straight into place after a header space
/// reserved from the [`Layout`] (the final header, padded with spaces to fill it exactly, is
/// written last), so nothing is staged in a side file or copied, and the disk starts writing the
/// parts back while later ones are still being coded. The header's JSON may thus end in more
/// spaces than alignment needs, which the safetensors format allows.
pub(crate) struct ContainerWriter {
    file: File,
    path: std::path::PathBuf,
    reserve: u64,
    metadata: Vec<(&'static str, String)>,
    parts: Vec<(String, Dtype, Vec<usize>)>,
    /// Bytes of parts written so far, and where the current part started.
    len: u64,
    part_start: u64,
    /// Up to where writeback was started (`sync_file_range`).
    kicked: u64,
}

/// Start the disk writing a container's parts back every this many bytes.
const WRITEBACK_STEP: u64 = 32 << 20;

impl ContainerWriter {
    /// Create `path` (a new file) for a container of `layout`.
    pub fn create(path: &Path, layout: &Layout) -> Result<ContainerWriter, Error> {
        // The header with every part empty, plus the most its numbers can grow: each part has one
        // shape number and two offsets (at most 20 digits each, one digit now) and a dtype name.
        let mut builder = HeaderBuilder::new();
        for (k, v) in &layout.metadata {
            builder = builder.metadata(k, v);
        }
        for p in &layout.parts {
            builder.tensor(p, Dtype::U8, &[0]);
        }
        let (empty, _) = builder.build();
        let reserve = (empty.len() as u64 + layout.parts.len() as u64 * (3 * 19 + 8) + 64).div_ceil(8) * 8;
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err(path))?;
        Ok(ContainerWriter {
            file,
            path: path.to_owned(),
            reserve,
            metadata: layout.metadata.clone(),
            parts: vec![],
            len: 0,
            part_start: 0,
            kicked: 0,
        })
    }

    /// Append bytes to the current part.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.file.write_all_at(bytes, self.reserve + self.len).map_err(io_err(&self.path))?;
        self.len += bytes.len() as u64;
        if self.len - self.kicked >= WRITEBACK_STEP {
            // Best effort: only starts the writeback, so the final fsync has less left to wait for.
            // SAFETY: a plain syscall on a descriptor this writer owns.
            unsafe {
                libc::sync_file_range(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    (self.reserve + self.kicked) as i64,
                    (self.len - self.kicked) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.kicked = self.len;
        }
        Ok(())
    }

    /// Bytes written into the current part so far.
    pub fn part_len(&self) -> u64 {
        self.len - self.part_start
    }

    /// End the current part: it is named `name` and holds `dtype` elements.
    pub fn end_part(&mut self, name: &str, dtype: Dtype) {
        let n = (self.len - self.part_start) as usize / dtype.size();
        self.parts.push((name.to_owned(), dtype, vec![n]));
        self.part_start = self.len;
    }

    /// A whole part at once.
    pub fn part(&mut self, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<(), Error> {
        self.write(bytes)?;
        self.end_part(name, dtype);
        Ok(())
    }

    /// Write the header into its space and make the container durable.
    pub fn finish(self) -> Result<(), Error> {
        let mut builder = HeaderBuilder::new();
        for (k, v) in &self.metadata {
            builder = builder.metadata(k, v);
        }
        for (n, dtype, shape) in &self.parts {
            builder.tensor(n, *dtype, shape);
        }
        let (mut header, _) = builder.build();
        if header.len() as u64 > self.reserve {
            return Err(Error::Invalid(format!(
                "{}: container header outgrew its space",
                self.path.display()
            )));
        }
        header.resize(self.reserve as usize, b' ');
        header[..8].copy_from_slice(&(self.reserve - 8).to_le_bytes());
        self.file.write_all_at(&header, 0).map_err(io_err(&self.path))?;
        self.file.sync_all().map_err(io_err(&self.path))
    }
}

/// Chunks coded per batch when a whole file is coded: enough to keep every core busy, few enough
/// that memory stays a few MiB whatever the tensor's size.
const BATCH_CHUNKS: usize = 32;

/// Code chunk `chunk` of a tensor of `numel` `dtype` elements whose bytes start at `at` in `src`,
/// against `twin` (None: stored whole): the chunk's lossless frame.
pub(crate) fn encode_chunk_at(
    src: &File,
    at: u64,
    dtype: Dtype,
    numel: usize,
    chunk: usize,
    twin: Option<&LogicalTensor>,
) -> Result<Vec<u8>, Error> {
    let esize = dtype.size();
    let elems = codec::chunk_elems(chunk, numel);
    let len = elems.len() * esize;
    with_scratch(len, |target| {
        src.read_exact_at(target, at + (elems.start * esize) as u64)
            .map_err(|e| Error::Invalid(format!("reading the target: {e}")))?;
        match twin {
            Some(t) => with_scratch(len, |base| {
                t.source.read(elems, base).map_err(|e| Error::Invalid(e.to_string()))?;
                Ok(codec::encode_lossless_chunk(target, Some(base), esize, codec::DEFAULT_LEVEL))
            }),
            None => Ok(codec::encode_lossless_chunk(target, None, esize, codec::DEFAULT_LEVEL)),
        }
    })
}

/// Code a whole tensor losslessly from `src` into parts `NAME.frames` and `NAME.offsets`, a batch
/// of chunks at a time (in parallel), so memory never holds more than a batch.
#[allow(clippy::too_many_arguments)]
fn encode_lossless_from(
    out: &mut ContainerWriter,
    src: &File,
    at: u64,
    name: &str,
    dtype: Dtype,
    numel: usize,
    twin: Option<&LogicalTensor>,
) -> Result<(), Error> {
    use rayon::prelude::*;
    let chunks = codec::chunk_count(numel);
    let mut offsets = Vec::with_capacity(chunks + 1);
    offsets.push(0u64);
    for batch in (0..chunks).step_by(BATCH_CHUNKS) {
        let frames: Vec<Vec<u8>> = (batch..(batch + BATCH_CHUNKS).min(chunks))
            .into_par_iter()
            .map(|c| encode_chunk_at(src, at, dtype, numel, c, twin))
            .collect::<Result<_, _>>()?;
        for f in frames {
            out.write(&f)?;
            offsets.push(out.part_len());
        }
    }
    out.end_part(&format!("{name}.frames"), Dtype::U8);
    let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    out.part(&format!("{name}.offsets"), Dtype::U64, &bytes)
}

/// Store target file `src` as container `dest` (a new file). Returns its record (fingerprint of
/// the container, role of the target file).
pub fn store_file(
    src: &Path,
    dest: &Path,
    base: &BaseTensors,
    codec: DeltaCodec,
) -> Result<FileRecord, Error> {
    let name = src.file_name().unwrap_or_default().to_string_lossy().into_owned();
    store_file_named(src, &name, dest, base, codec)
}

/// [`store_file`] for the file the entry names `name` (a relative path, see `registry::walk`):
/// only a top-level `*.safetensors` is coded tensor by tensor against the base; any other file,
/// a `*.safetensors` in a subdirectory too, is stored verbatim (it reads back byte-identical
/// either way, and variants leave it alone).
pub fn store_file_named(
    src: &Path,
    name: &str,
    dest: &Path,
    base: &BaseTensors,
    codec: DeltaCodec,
) -> Result<FileRecord, Error> {
    let file = File::open(src).map_err(crate::registry::walk::gone(src))?;
    let size = file.metadata().map_err(io_err(src))?.len();
    let name = name.to_owned();
    let weights = registry::walk::role_of(&name) == FileRole::Weights;
    let header = if weights { format::read_header(&file).ok() } else { None };
    let layout = match &header {
        Some(h) => Layout::safetensors(&name, size, h, base, codec),
        None => Layout::verbatim(&name, size, codec),
    };
    let result = (|| {
        let mut out = ContainerWriter::create(dest, &layout)?;
        match &header {
            Some(h) => {
                let mut prefix = vec![0u8; h.data_start as usize];
                file.read_exact_at(&mut prefix, 0).map_err(io_err(src))?;
                out.part(keys::HEADER, Dtype::U8, &prefix)?;
                for t in &h.tensors {
                    let twin = base.twin(&t.name, &t.shape, t.dtype);
                    let at = h.data_start + t.start;
                    match (codec, twin) {
                        (DeltaCodec::Q8, Some(_)) | (DeltaCodec::Bitdelta, Some(_))
                            if t.dtype.is_float() && (codec == DeltaCodec::Q8 || t.shape.len() == 2) =>
                        {
                            let mut target = vec![0u8; t.len() as usize];
                            file.read_exact_at(&mut target, at).map_err(io_err(src))?;
                            encode_tensor(&mut out, &t.name, t.dtype, &t.shape, &target, twin, codec)?;
                        }
                        _ => encode_lossless_from(&mut out, &file, at, &t.name, t.dtype, t.numel(), twin)?,
                    }
                }
            }
            None => encode_lossless_from(&mut out, &file, 0, keys::FILE, Dtype::U8, size as usize, None)?,
        }
        out.finish()?;
        let fingerprint = Fingerprint::of(dest).map_err(io_err(dest))?;
        Ok(FileRecord { name, role: layout.role, fingerprint, object: None })
    })();
    if result.is_err() {
        let _ = fs::remove_file(dest);
    }
    result
}

/// Code one tensor with a lossy codec against its base twin (read whole: the codecs' groups and
/// rows need it).
fn encode_tensor(
    out: &mut ContainerWriter,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    target: &[u8],
    twin: Option<&LogicalTensor>,
    codec: DeltaCodec,
) -> Result<(), Error> {
    let t = twin.expect("lossy codecs code tensors with a twin");
    let mut b = vec![0u8; target.len()];
    t.source.read(0..target.len() / dtype.size(), &mut b).map_err(|e| Error::Invalid(e.to_string()))?;
    match codec {
        DeltaCodec::Q8 => {
            let (q, scales) = codec::encode_q8(target, &b, dtype);
            out.part(&format!("{name}.q"), Dtype::I8, bytemuck::cast_slice(&q))?;
            out.part(&format!("{name}.scale"), Dtype::F32, bytemuck::cast_slice(&scales))
        }
        _ => {
            let (signs, scales) = codec::encode_bitdelta(target, &b, dtype, shape[0], shape[1]);
            out.part(&format!("{name}.signs"), Dtype::U8, &signs)?;
            out.part(&format!("{name}.scale"), Dtype::F32, bytemuck::cast_slice(&scales))
        }
    }
}

/// The base view a delta is made against, checked to be servable.
pub fn base_view(registry: &registry::Registry, base: &str) -> Result<EntryView, Error> {
    registry.ancestors(base)?;
    let view = variant::build_view(registry, base).map_err(|e| Error::Invalid(e.to_string()))?;
    for file in &view.files {
        crate::variant::check_sources(file)
            .map_err(|e| Error::Invalid(format!("{base}: {}: {e}", file.name)))?;
    }
    Ok(view)
}

/// A target of another architecture than its base is refused: its tensors would not line up.
pub fn check_architecture(base: &EntryView, target_dir: &Path) -> Result<(), Error> {
    let read =
        |bytes: Option<Vec<u8>>| bytes.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let base_config = base.file("config.json").and_then(|f| match &f.content {
        variant::Content::Passthrough(s) => read(s.read_all().ok()),
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
pub fn make_delta(
    store: &Store,
    name: &str,
    base: &str,
    target_dir: &Path,
    codec: DeltaCodec,
    progress: impl Fn(u64),
) -> Result<Added, Error> {
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
    let walked = registry::walk::walk(target_dir)?;
    if walked.files.is_empty() {
        return Err(Error::NotAModel { path: target_dir.to_owned(), reason: "no files to store".into() });
    }
    let base_tensors = BaseTensors::of(&view);
    let staging = store.staging_dir(&format!("delta-{name}"))?;
    let mut files = vec![];
    for (file_name, size) in &walked.files {
        let (src, dest) = (walked.root.join(file_name), staging.path().join(file_name));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        files.push(store_file_named(&src, file_name, &dest, &base_tensors, codec)?);
        progress(*size);
    }
    let entry = new_entry(name, base, &base_entry, codec, files);
    let entry = store.insert_staged(name, &entry, staging)?;
    Ok(Added { entry, notes: walked.notes })
}

/// A delta entry over `base`, inheriting its family and templates.
pub fn new_entry(
    name: &str,
    base: &str,
    base_entry: &Entry,
    codec: DeltaCodec,
    files: Vec<FileRecord>,
) -> Entry {
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

//! A whole GGUF file from a Hugging Face directory on disk, through the plan: what
//! `examples/gguf_write.rs` and the converter comparison use, and a reference for serving a plan
//! (header bytes, then each tensor's rows converted, then its padding).
//!
//! Reads with `pread` only, one tensor at a time.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::convert::{convert_rows, ConvertError, Quantizer};
use super::{plan, GgufError, GgufPlan, GgufTarget, HfTensor, ModelFiles, TensorSource};
use crate::codec::ggml::GgmlType;
use crate::format::safetensors::{read_header_path, FileHeaderError};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Header(#[from] FileHeaderError),
    #[error("{0}: no *.safetensors weights")]
    NoWeights(PathBuf),
    #[error(transparent)]
    Plan(#[from] GgufError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error("writing the output: {0}")]
    Write(io::Error),
}

/// The files of `dir` that the converter reads.
pub struct DirFiles {
    pub config: Vec<u8>,
    pub tokenizer_json: Option<Vec<u8>>,
    pub tokenizer_model: Option<Vec<u8>>,
    pub tokenizer_config: Option<Vec<u8>>,
    pub generation_config: Option<Vec<u8>>,
    pub added_tokens: Option<Vec<u8>>,
    pub chat_template_jinja: Option<Vec<u8>>,
}

impl DirFiles {
    pub fn read(dir: &Path) -> Result<DirFiles, DirError> {
        let opt = |name: &str| -> Result<Option<Vec<u8>>, DirError> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(DirError::Io { path, source }),
            }
        };
        let config_path = dir.join("config.json");
        let config =
            std::fs::read(&config_path).map_err(|source| DirError::Io { path: config_path, source })?;
        DirFiles::with_config(config, opt)
    }

    /// `config` and the optional files, each read by `read` (None: absent): the one list of
    /// what the converter reads besides config.json, for a directory and a mounted view alike.
    pub fn with_config<E>(
        config: Vec<u8>,
        mut read: impl FnMut(&str) -> Result<Option<Vec<u8>>, E>,
    ) -> Result<DirFiles, E> {
        Ok(DirFiles {
            config,
            tokenizer_json: read("tokenizer.json")?,
            tokenizer_model: read("tokenizer.model")?,
            tokenizer_config: read("tokenizer_config.json")?,
            generation_config: read("generation_config.json")?,
            added_tokens: read("added_tokens.json")?,
            chat_template_jinja: read("chat_template.jinja")?,
        })
    }

    pub fn model_files(&self) -> ModelFiles<'_> {
        ModelFiles {
            config: &self.config,
            tokenizer_json: self.tokenizer_json.as_deref(),
            tokenizer_model: self.tokenizer_model.as_deref(),
            tokenizer_config: self.tokenizer_config.as_deref(),
            generation_config: self.generation_config.as_deref(),
            added_tokens: self.added_tokens.as_deref(),
            chat_template_jinja: self.chat_template_jinja.as_deref(),
        }
    }
}

/// Where each HF tensor's bytes are: (file, absolute offset, length).
pub type TensorLocations = std::collections::HashMap<String, (PathBuf, u64, u64)>;

/// The safetensors tensors of `dir` (`model*.safetensors`, the converter's part names, in
/// file-name order) and where their bytes are.
pub fn read_tensors(dir: &Path) -> Result<(Vec<HfTensor>, TensorLocations), DirError> {
    let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DirError::Io { path: dir.to_owned(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("model") && n.ends_with(".safetensors"))
        })
        .collect();
    parts.sort();
    if parts.is_empty() {
        return Err(DirError::NoWeights(dir.to_owned()));
    }
    let mut tensors = Vec::new();
    let mut locations = TensorLocations::new();
    for (part, path) in parts.iter().enumerate() {
        let header = read_header_path(path)?;
        for t in &header.tensors {
            tensors.push(HfTensor { part, name: t.name.clone(), shape: t.shape.clone(), dtype: t.dtype });
            locations.insert(t.name.clone(), (path.clone(), header.data_start + t.start, t.len()));
        }
    }
    Ok((tensors, locations))
}

/// Plan `target` for `dir` and write the whole file to `out`. `quantize(ty, values, out)` encodes
/// rows of f32 values as blocks of a quantized type.
pub fn write_from_dir(
    dir: &Path,
    target: GgufTarget,
    name: &str,
    out: &mut dyn Write,
    quantize: &mut Quantizer,
) -> Result<GgufPlan, DirError> {
    let files = DirFiles::read(dir)?;
    let (tensors, locations) = read_tensors(dir)?;
    let plan = plan(&files.model_files(), &tensors, target, name)?;
    let mut read = |hf_name: &str| -> Result<Vec<u8>, DirError> {
        let (path, offset, len) = &locations[hf_name];
        let file = File::open(path).map_err(|source| DirError::Io { path: path.clone(), source })?;
        let mut src = vec![0u8; *len as usize];
        file.read_exact_at(&mut src, *offset)
            .map_err(|source| DirError::Io { path: path.clone(), source })?;
        Ok(src)
    };
    write_plan(&plan, &mut read, quantize, out)?;
    Ok(plan)
}

/// Write a planned file to `out`: the header, then each tensor's rows converted from the bytes
/// `read(hf_name)` returns for its HF source (the whole tensor, raw little-endian), then its
/// padding. What a server of the plan does for the whole file; a byte range maps the same way
/// through [`GgufPlan::segments`] and [`super::PlannedTensor::rows_of`].
pub fn write_plan<E>(
    plan: &GgufPlan,
    read: &mut dyn FnMut(&str) -> Result<Vec<u8>, E>,
    quantize: &mut Quantizer,
    out: &mut dyn Write,
) -> Result<(), E>
where
    E: From<ConvertError> + From<WriteFailed>,
{
    out.write_all(&plan.header).map_err(|e| E::from(WriteFailed(e)))?;
    let mut buf = Vec::new();
    for t in &plan.tensors {
        let src = match &t.source {
            TensorSource::Hf { name, .. } => read(name)?,
            TensorSource::Computed(_) => Vec::new(),
        };
        buf.clear();
        convert_rows(t, &src, 0, t.n_rows(), &mut buf, quantize)?;
        out.write_all(&buf).map_err(|e| E::from(WriteFailed(e)))?;
        out.write_all(&vec![0u8; t.padding as usize]).map_err(|e| E::from(WriteFailed(e)))?;
    }
    Ok(())
}

/// Writing the output failed.
#[derive(Debug, thiserror::Error)]
#[error("writing the output: {0}")]
pub struct WriteFailed(pub io::Error);

impl From<WriteFailed> for DirError {
    fn from(e: WriteFailed) -> DirError {
        DirError::Write(e.0)
    }
}

/// A stand-in quantizer until the ggml kernels land: zero blocks of the right size (headers and
/// sizes are exact, block contents are not).
pub fn zero_blocks(ty: GgmlType, values: &[f32], out: &mut Vec<u8>) -> Result<(), String> {
    let blocks = values.len() / ty.block_elems();
    out.resize(out.len() + blocks * ty.block_bytes(), 0);
    Ok(())
}

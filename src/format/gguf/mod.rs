//! GGUF, llama.cpp's file layout: an entry's tensors as the file llama.cpp's
//! `convert_hf_to_gguf.py` (and, for Q4_0 / Q4_K_M, `llama-quantize` on its F16 output) writes,
//! planned without converting anything.
//!
//! [`plan`] takes what the converter reads — config.json, the tokenizer files, the safetensors
//! tensors' names, shapes and dtypes — and returns a [`GgufPlan`]: the complete header bytes
//! (GGUF v3: magic, version, counts, key-values, tensor infos, zero padding to the 32-byte
//! alignment), and for each tensor its GGUF name, ggml dims and type, absolute byte range, and
//! where its bytes come from ([`TensorSource`]: an HF tensor read through a [`RowMap`] — identity,
//! or the LLaMA Q/K permute — and cast or quantized to the tensor's type; or values computed here,
//! like Llama 3's `rope_freqs`). Zero padding follows each tensor up to the alignment. The file's
//! size is known from the plan alone, which is what lets the mount `stat` a GGUF file before
//! anything is converted; any byte range of it maps to header bytes, padding, or whole ggml blocks
//! of rows of one tensor ([`GgufPlan::segments`], [`PlannedTensor::rows_of`]).
//!
//! Pinned to llama-cpp-python 0.3.36's vendored llama.cpp (conversion/{base,llama,qwen}.py,
//! gguf-py, src/llama-quant.cpp) with transformers 5's config defaults. What is not reproduced is
//! refused with a typed error ([`GgufError`]) rather than written differently: no file rather than
//! a wrong one. Known differences, by design: `general.name` is the name given (the converter's
//! model-card and directory-name heuristics for basename/finetune/organization/version/license/
//! tags are not run); added tokens that are not `normalized` are written as they are (the
//! converter re-encodes and decodes them through transformers, which returns them unchanged for
//! the tokenizers of these families).
//!
//! Layout: `value` (KV values, header encoding), `reader` (strict header parser), `spm`
//! (tokenizer.model protobuf), `vocab` (tokenizer translation), `arch` (hyperparameters, tensor
//! names, permute, rope_freqs), `types` (per-tensor type choice), `convert` (row casts).

pub mod arch;
pub mod convert;
pub mod dir;
pub mod reader;
pub mod spm;
pub mod types;
pub mod value;
pub mod vocab;

use serde_json::{Map, Value as Json};

use crate::codec::ggml::GgmlType;
use crate::format::Dtype;

pub use arch::Arch;
pub use reader::{parse, parse_header, GgufFile, ReadError};
pub use value::{TensorInfo, Value, ValueType, GGUF_DEFAULT_ALIGNMENT};

/// The GGUF files llmfs serves for an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgufTarget {
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_K_M,
}

impl GgufTarget {
    pub const ALL: [GgufTarget; 5] =
        [GgufTarget::F16, GgufTarget::BF16, GgufTarget::Q8_0, GgufTarget::Q4_0, GgufTarget::Q4_K_M];

    /// The file name's suffix (`<entry>-F16.gguf`).
    pub fn name(self) -> &'static str {
        match self {
            GgufTarget::F16 => "F16",
            GgufTarget::BF16 => "BF16",
            GgufTarget::Q8_0 => "Q8_0",
            GgufTarget::Q4_0 => "Q4_0",
            GgufTarget::Q4_K_M => "Q4_K_M",
        }
    }

    pub fn parse(s: &str) -> Option<GgufTarget> {
        GgufTarget::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufTarget::F16 => 1,
            GgufTarget::BF16 => 32,
            GgufTarget::Q8_0 => 7,
            GgufTarget::Q4_0 => 2,
            GgufTarget::Q4_K_M => 15,
        }
    }

    /// Whether llama-quantize makes it from the F16 file (else the converter writes it directly).
    pub fn via_quantize(self) -> bool {
        matches!(self, GgufTarget::Q4_0 | GgufTarget::Q4_K_M)
    }
}

/// Why no GGUF file can be planned. Each names the problem; callers add the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    #[error("{file} is not valid JSON: {reason}")]
    BadJson { file: &'static str, reason: String },
    #[error("unsupported architecture {0} (GGUF views cover llama, mistral, qwen2 and qwen3)")]
    UnsupportedArch(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("config.json lacks the hyperparameter {0}")]
    MissingHparam(String),
    #[error("config.json's {key} = {value} is not usable")]
    BadHparam { key: String, value: String },
    #[error("tokenizer cannot be translated: {0}")]
    Tokenizer(String),
    #[error("tensor {0:?} has no GGUF name for this architecture")]
    UnmappedTensor(String),
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("duplicate GGUF tensor {0:?}")]
    DuplicateTensor(String),
}

/// The repository files the converter reads (contents; `None` where the file is absent).
#[derive(Clone, Copy, Default)]
pub struct ModelFiles<'a> {
    pub config: &'a [u8],
    pub tokenizer_json: Option<&'a [u8]>,
    pub tokenizer_model: Option<&'a [u8]>,
    pub tokenizer_config: Option<&'a [u8]>,
    pub generation_config: Option<&'a [u8]>,
    /// `added_tokens.json` (SentencePiece vocabularies only).
    pub added_tokens: Option<&'a [u8]>,
    /// `chat_template.jinja` (used when tokenizer_config.json has no `chat_template`).
    pub chat_template_jinja: Option<&'a [u8]>,
}

/// A tensor of the HF checkpoint. The converter reads the shards in file-name order and each
/// shard's tensors sorted by name (gguf-py's `SafetensorsLocal`); [`plan`] sorts by
/// (`part`, `name`) to get that order, whatever order they are given in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfTensor {
    /// Index of the shard in file-name order (0 for a single `model.safetensors`).
    pub part: usize,
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

/// How the output rows of a tensor come from the rows of its HF source. A "row" is one index of
/// the HF tensor's first axis (for a 2-D weight, one ggml row of `ne0` elements; for a 1-D bias,
/// one element).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMap {
    Identity,
    /// LlamaModel.permute with `heads` (n_head for q, n_head_kv for k): the rows of each head,
    /// split in two halves, interleaved. Output row `h*2*half + i*2 + j` is input row
    /// `h*2*half + j*half + i` (`half = rows / heads / 2`).
    QkPermute {
        heads: usize,
    },
}

impl RowMap {
    /// The source row of output row `dst` of a tensor with `rows` rows.
    pub fn src_row(self, dst: usize, rows: usize) -> usize {
        match self {
            RowMap::Identity => dst,
            RowMap::QkPermute { heads } => {
                let per_head = rows / heads;
                let half = per_head / 2;
                let (h, r) = (dst / per_head, dst % per_head);
                let (i, j) = (r / 2, r % 2);
                h * per_head + j * half + i
            }
        }
    }
}

/// Where a tensor's bytes come from.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorSource {
    /// An HF tensor, rows mapped by `rows`, each converted from `dtype` to the planned type:
    /// F32/F16/BF16 by round-to-nearest-even casts ([`convert::convert_rows`]), quantized types by
    /// ggml's reference quantizers from the row's f32 values — rounded to f16 first when
    /// `through_f16` (Q4_0 / Q4_K_M: llama-quantize reads the F16 file).
    Hf { name: String, dtype: Dtype, shape: Vec<usize>, rows: RowMap, through_f16: bool },
    /// Values computed by the plan (F32), e.g. `rope_freqs`.
    Computed(Vec<f32>),
}

/// One tensor of the planned file.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    /// ggml order: ne0 (the row length) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute offset of the tensor's data in the file.
    pub offset: u64,
    /// Bytes of data (whole blocks); `padding` zero bytes follow.
    pub len: u64,
    pub padding: u64,
    pub source: TensorSource,
}

impl PlannedTensor {
    /// Elements per ggml row.
    pub fn row_elems(&self) -> u64 {
        self.dims[0]
    }
    /// Bytes per ggml row.
    pub fn row_bytes(&self) -> u64 {
        self.ggml_type.row_bytes(self.dims[0] as usize).unwrap_or(0) as u64
    }
    pub fn n_rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }
    /// The ggml rows `[first, last)` that the tensor-relative byte range `[start, end)` touches.
    pub fn rows_of(&self, start: u64, end: u64) -> (u64, u64) {
        let rb = self.row_bytes().max(1);
        (start / rb, end.div_ceil(rb).min(self.n_rows()))
    }
}

/// A piece of the file: header bytes, a tensor's data, or zero padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Header { offset: u64, len: u64 },
    Tensor { index: usize, offset: u64, len: u64 },
    Padding { offset: u64, len: u64 },
}

/// A planned GGUF file.
#[derive(Clone, Debug)]
pub struct GgufPlan {
    pub target: GgufTarget,
    /// Bytes `[0, header.len())` of the file, padding included; tensor data starts right after.
    pub header: Vec<u8>,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<PlannedTensor>,
    /// The file's size.
    pub size: u64,
    /// Things the converter would also have warned about (unknown pre-tokenizer, fallbacks).
    pub warnings: Vec<String>,
}

impl GgufPlan {
    /// The file as consecutive segments covering `[0, size)`.
    pub fn segments(&self) -> Vec<Segment> {
        let mut out = vec![Segment::Header { offset: 0, len: self.header.len() as u64 }];
        for (index, t) in self.tensors.iter().enumerate() {
            out.push(Segment::Tensor { index, offset: t.offset, len: t.len });
            if t.padding > 0 {
                out.push(Segment::Padding { offset: t.offset + t.len, len: t.padding });
            }
        }
        out
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Ordered key-values with gguf-py's semantics: setting an existing key replaces its value in
/// place (a Python dict), removing drops it.
#[derive(Clone, Debug, Default)]
pub struct Kvs(pub Vec<(String, Value)>);

impl Kvs {
    pub fn set(&mut self, key: &str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }
    /// gguf-py's `add_array`: an empty array is not written.
    pub fn set_array(&mut self, key: &str, elem: ValueType, items: Vec<Value>) {
        if !items.is_empty() {
            self.set(key, Value::Array(elem, items.into()));
        }
    }
    pub fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }
}

fn json_object(bytes: &[u8], file: &'static str) -> Result<Map<String, Json>, GgufError> {
    match serde_json::from_slice::<Json>(bytes) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(_) => Err(GgufError::BadJson { file, reason: "not an object".into() }),
        Err(e) => Err(GgufError::BadJson { file, reason: e.to_string() }),
    }
}

/// Plan the GGUF file `target` of a model named `name`. Pure: reads only its arguments.
/// (Planning several targets of one model: [`prepare`] once, then [`Prepared::plan`] each.)
pub fn plan(
    files: &ModelFiles,
    tensors: &[HfTensor],
    target: GgufTarget,
    name: &str,
) -> Result<GgufPlan, GgufError> {
    prepare(files, tensors, name)?.plan(target)
}

/// A tensor of the converter's F16 file: its GGUF name, ggml dims, the HF shape (what the
/// per-target type choice looks at) and where its bytes come from.
#[derive(Clone, Debug)]
struct Prepped {
    name: String,
    dims: Vec<u64>,
    hf_shape: Vec<usize>,
    source: TensorSource,
}

/// What every target's plan of one model shares, worked out once: config.json parsed, the
/// tensors named, ordered and checked, and the key-values with the tokenizer translated (the
/// costly part: a 128k-token vocabulary and its merges). Each [`Prepared::plan`] only chooses
/// the tensor types, orders, lays out and encodes its header.
#[derive(Clone, Debug)]
pub struct Prepared {
    arch: Arch,
    n_head: usize,
    n_kv: usize,
    n_layer: u64,
    tensors: Vec<Prepped>,
    /// The key-values of the F16 file (its `general.file_type` is replaced per target, in place).
    kvs: Kvs,
    /// What the shared part notes (an unknown pre-tokenizer): every plan's warnings start with it.
    pub warnings: Vec<String>,
}

/// Everything of [`plan`] that does not depend on the target. Pure: reads only its arguments.
pub fn prepare(files: &ModelFiles, tensors: &[HfTensor], name: &str) -> Result<Prepared, GgufError> {
    let config = json_object(files.config, "config.json")?;
    let hf_arch = config
        .get("architectures")
        .and_then(Json::as_array)
        .and_then(|a| a.first())
        .and_then(Json::as_str)
        .ok_or_else(|| GgufError::UnsupportedArch("(config.json has no architectures)".into()))?
        .to_owned();
    let arch = Arch::from_hf(&hf_arch).ok_or_else(|| GgufError::UnsupportedArch(hf_arch.clone()))?;
    for key in
        ["text_config", "quantization_config", "num_local_experts", "llm_config", "transformer_layer_config"]
    {
        if config.get(key).is_some_and(|v| !v.is_null()) {
            return Err(GgufError::Unsupported(format!("config.json has {key}")));
        }
    }
    if config.contains_key("draft_vocab_size") {
        return Err(GgufError::Unsupported("EAGLE-3 draft model".into()));
    }
    let hp = arch::Hparams::new(&config, arch);
    let mut warnings = Vec::new();

    // Tensors in the converter's order, with their GGUF names and sources.
    let n_head = hp.u64("num_attention_heads")? as usize;
    let n_kv = hp.u64("num_key_value_heads")? as usize;
    let n_layer = hp.u64("num_hidden_layers")?;
    let mut planned: Vec<Prepped> = Vec::new();
    let rp = hp.rope_parameters();
    if arch == Arch::Llama
        && rp.get("rope_type").and_then(Json::as_str).is_some_and(|t| t.eq_ignore_ascii_case("llama3"))
    {
        let freqs = arch::llama3_rope_freqs(&hp, &rp)?;
        planned.push(Prepped {
            name: "rope_freqs.weight".into(),
            dims: vec![freqs.len() as u64],
            hf_shape: vec![freqs.len()],
            source: TensorSource::Computed(freqs),
        });
    }
    let mut sorted: Vec<&HfTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| (a.part, &a.name).cmp(&(b.part, &b.name)));
    for t in sorted {
        let mut hf_name = t.name.clone();
        if hf_name.ends_with(".attention.masked_bias")
            || hf_name.ends_with(".attention.bias")
            || hf_name.ends_with(".rotary_emb.inv_freq")
        {
            continue;
        }
        if hf_name.contains("language_model.") {
            hf_name = hf_name.replace("language_model.", "");
        }
        if arch == Arch::Llama && hf_name.contains("text_model.") {
            hf_name = hf_name.replace("text_model.", "");
        }
        if hf_arch == "LlamaModel" || hf_arch == "Qwen2Model" {
            hf_name = format!("model.{hf_name}");
        }
        if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
            return Err(GgufError::BadTensor {
                name: t.name.clone(),
                reason: format!("dtype {} is not converted", t.dtype),
            });
        }
        if t.shape.is_empty() || t.shape.len() > 4 || t.shape.contains(&0) {
            return Err(GgufError::BadTensor {
                name: t.name.clone(),
                reason: format!("shape {:?}", t.shape),
            });
        }
        let gguf_name =
            arch::map_tensor_name(arch, &hf_name).ok_or_else(|| GgufError::UnmappedTensor(t.name.clone()))?;
        let mut rows = RowMap::Identity;
        if arch == Arch::Llama {
            let heads = if hf_name.ends_with("q_proj.weight") || hf_name.ends_with("q_proj.bias") {
                Some(n_head)
            } else if hf_name.ends_with("k_proj.weight") || hf_name.ends_with("k_proj.bias") {
                Some(n_kv)
            } else {
                None
            };
            if let Some(heads) = heads {
                if heads == 0 || t.shape[0] % (heads * 2) != 0 {
                    return Err(GgufError::BadTensor {
                        name: t.name.clone(),
                        reason: format!("{} rows cannot be permuted for {heads} heads", t.shape[0]),
                    });
                }
                rows = RowMap::QkPermute { heads };
            }
        }
        if let Some(bid) = gguf_name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|b| b.parse::<u64>().ok())
        {
            if bid >= n_layer {
                return Err(GgufError::BadTensor {
                    name: t.name.clone(),
                    reason: format!("layer {bid} but num_hidden_layers is {n_layer}"),
                });
            }
        }
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        let source = TensorSource::Hf {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            rows,
            through_f16: false,
        };
        if planned.iter().any(|p| p.name == gguf_name) {
            return Err(GgufError::DuplicateTensor(gguf_name));
        }
        planned.push(Prepped { name: gguf_name, dims, hf_shape: t.shape.clone(), source });
    }
    if planned.is_empty() {
        return Err(GgufError::Unsupported("no tensors".into()));
    }

    // Key-values in the converter's order.
    let total_params: u64 = planned.iter().map(|p| p.dims.iter().product::<u64>()).sum();
    let mut kvs = Kvs::default();
    kvs.set("general.architecture", Value::str(arch.name()));
    kvs.set("general.type", Value::str("model"));
    if let Some(gc) = files.generation_config {
        // The converter ignores a generation_config.json it cannot parse.
        if let Ok(gc) = json_object(gc, "generation_config.json") {
            sampling_kvs(&gc, &mut kvs)?;
        }
    }
    if !name.is_empty() {
        kvs.set("general.name", Value::str(name));
    }
    if total_params > 0 {
        kvs.set("general.size_label", Value::Str(size_label(total_params)));
    }
    arch::hparam_kvs(arch, &hp, GgufTarget::F16.file_type(), &mut kvs)?;
    kvs.set("general.quantization_version", Value::U32(2));
    let tok = vocab::TokenizerFiles {
        config: &config,
        tokenizer_json: files.tokenizer_json.map(|b| json_object(b, "tokenizer.json")).transpose()?,
        tokenizer_model: files.tokenizer_model,
        tokenizer_config: files
            .tokenizer_config
            .map(|b| json_object(b, "tokenizer_config.json"))
            .transpose()?,
        added_tokens_json: files.added_tokens.map(|b| json_object(b, "added_tokens.json")).transpose()?,
        chat_template_jinja: files.chat_template_jinja.map(|b| String::from_utf8_lossy(b).into_owned()),
    };
    let vocab_size = hp.u64("vocab_size")?;
    match arch {
        Arch::Llama => vocab::llama_vocab(&tok, vocab_size, &mut kvs, &mut warnings)?,
        Arch::Qwen2 | Arch::Qwen3 => vocab::qwen_vocab(&tok, vocab_size, &mut kvs, &mut warnings)?,
    }
    Ok(Prepared { arch, n_head, n_kv, n_layer, tensors: planned, kvs, warnings })
}

impl Prepared {
    /// The plan of the GGUF file `target`.
    pub fn plan(&self, target: GgufTarget) -> Result<GgufPlan, GgufError> {
        let (arch, n_head, n_kv, n_layer) = (self.arch, self.n_head, self.n_kv, self.n_layer);
        let mut warnings = self.warnings.clone();
        let mut kvs = self.kvs.clone();
        // The converter's types: the F16 file's for llama-quantize's targets.
        let f16_types_target = if target.via_quantize() { GgufTarget::F16 } else { target };
        let mut planned: Vec<(String, Vec<u64>, GgmlType, TensorSource)> =
            Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let ty = match &t.source {
                TensorSource::Computed(_) => GgmlType::F32,
                TensorSource::Hf { .. } => types::converter_type(f16_types_target, &t.name, &t.hf_shape),
            };
            if target == GgufTarget::Q8_0 && ty == GgmlType::F16 {
                warnings.push(format!(
                    "{}: rows of {} are not a multiple of 32: F16 (as the converter falls back)",
                    t.name,
                    t.hf_shape[t.hf_shape.len() - 1]
                ));
            }
            planned.push((t.name.clone(), t.dims.clone(), ty, t.source.clone()));
        }
        if !target.via_quantize() {
            kvs.set("general.file_type", Value::U32(target.file_type()));
        }
        plan_layout(target, arch, n_head, n_kv, n_layer, planned, kvs, warnings)
    }
}

/// The part of a plan after the converter's types: llama-quantize's re-typing (Q4_0, Q4_K_M),
/// the layout and the header.
#[allow(clippy::too_many_arguments)]
fn plan_layout(
    target: GgufTarget,
    arch: Arch,
    n_head: usize,
    n_kv: usize,
    n_layer: u64,
    mut planned: Vec<(String, Vec<u64>, GgmlType, TensorSource)>,
    mut kvs: Kvs,
    mut warnings: Vec<String>,
) -> Result<GgufPlan, GgufError> {
    // llama-quantize: the F16 file's KVs with quantization_version and file_type moved to the end,
    // tensors in the loader's order, re-typed.
    if target.via_quantize() {
        kvs.remove("general.quantization_version");
        kvs.remove("general.file_type");
        kvs.set("general.quantization_version", Value::U32(2));
        kvs.set("general.file_type", Value::U32(target.file_type()));
        planned.sort_by(|a, b| types::quantize_order(&a.0, &b.0));
        let n_layer = n_layer as usize;
        let is_70b = n_layer == 80 && (arch == Arch::Qwen2 || (arch == Arch::Llama && n_head != n_kv));
        let inputs: Vec<types::QuantInput> =
            planned.iter().map(|p| types::QuantInput { name: &p.0, dims: &p.1, ty: p.2 }).collect();
        let new_types = types::quantize_types(target, &types::QuantModel { n_layer, is_70b }, &inputs);
        for (p, ty) in planned.iter_mut().zip(new_types) {
            if ty == GgmlType::F16 && p.2 == GgmlType::F16 && p.1.len() >= 2 {
                warnings.push(format!(
                    "{}: rows of {} are not whole quantization blocks: kept F16 (llama-quantize's fallback)",
                    p.0, p.1[0]
                ));
            }
            if let TensorSource::Hf { through_f16, .. } = &mut p.3 {
                *through_f16 = p.2 == GgmlType::F16;
            }
            p.2 = ty;
        }
    }

    // Layout.
    let align = GGUF_DEFAULT_ALIGNMENT;
    let mut infos = Vec::with_capacity(planned.len());
    let mut rel = 0u64;
    let mut lens = Vec::with_capacity(planned.len());
    for (gguf_name, dims, ty, _) in &planned {
        let row = ty.row_bytes(dims[0] as usize).ok_or_else(|| GgufError::BadTensor {
            name: gguf_name.clone(),
            reason: format!("rows of {} are not whole {ty} blocks", dims[0]),
        })? as u64;
        let len = dims[1..].iter().try_fold(row, |a, d| a.checked_mul(*d)).ok_or_else(|| {
            GgufError::BadTensor { name: gguf_name.clone(), reason: "size overflows".into() }
        })?;
        infos.push(TensorInfo { name: gguf_name.clone(), dims: dims.clone(), ggml_type: *ty, offset: rel });
        lens.push(len);
        rel += value::pad(len, align);
    }
    let header = value::encode_header(&kvs.0, &infos, align);
    let data_start = header.len() as u64;
    let tensors: Vec<PlannedTensor> = planned
        .into_iter()
        .zip(infos.iter().zip(lens))
        .map(|((name, dims, ggml_type, source), (info, len))| PlannedTensor {
            name,
            dims,
            ggml_type,
            offset: data_start + info.offset,
            len,
            padding: value::pad(len, align) - len,
            source,
        })
        .collect();
    Ok(GgufPlan { target, header, kvs: kvs.0, tensors, size: data_start + rel, warnings })
}

/// `Metadata.load`'s sampling keys from generation_config.json, in `set_gguf_meta_model`'s order.
fn sampling_kvs(gc: &Map<String, Json>, kvs: &mut Kvs) -> Result<(), GgufError> {
    let num = |k: &str| gc.get(k).filter(|v| !v.is_null());
    let bad = |k: &str, v: &Json| GgufError::BadJson {
        file: "generation_config.json",
        reason: format!("{k} = {v}"),
    };
    if let Some(v) = num("sequence") {
        kvs.set("general.sampling.sequence", Value::str(v.as_str().ok_or_else(|| bad("sequence", v))?));
    }
    let int = |k: &str, key: &str, kvs: &mut Kvs| -> Result<(), GgufError> {
        if let Some(v) = num(k) {
            let i = v.as_i64().and_then(|i| i32::try_from(i).ok()).ok_or_else(|| bad(k, v))?;
            kvs.set(key, Value::I32(i));
        }
        Ok(())
    };
    let float = |k: &str, v: Option<&Json>, key: &str, kvs: &mut Kvs| -> Result<(), GgufError> {
        if let Some(v) = v {
            kvs.set(key, Value::F32(v.as_f64().ok_or_else(|| bad(k, v))? as f32));
        }
        Ok(())
    };
    int("top_k", "general.sampling.top_k", kvs)?;
    float("top_p", num("top_p"), "general.sampling.top_p", kvs)?;
    float("min_p", num("min_p"), "general.sampling.min_p", kvs)?;
    float("xtc_probability", num("xtc_probability"), "general.sampling.xtc_probability", kvs)?;
    float("xtc_threshold", num("xtc_threshold"), "general.sampling.xtc_threshold", kvs)?;
    float("temperature", num("temperature"), "general.sampling.temp", kvs)?;
    int("penalty_last_n", "general.sampling.penalty_last_n", kvs)?;
    let repeat = num("penalty_repeat").or_else(|| num("repetition_penalty"));
    float("penalty_repeat", repeat, "general.sampling.penalty_repeat", kvs)?;
    int("mirostat", "general.sampling.mirostat", kvs)?;
    float("mirostat_tau", num("mirostat_tau"), "general.sampling.mirostat_tau", kvs)?;
    float("mirostat_eta", num("mirostat_eta"), "general.sampling.mirostat_eta", kvs)?;
    Ok(())
}

/// gguf-py's `size_label` (`model_weight_count_rounded_notation`, min_digits 2) for a dense model.
pub fn size_label(n: u64) -> String {
    let x = n as f64;
    let (scaled, suffix) = if x > 1e12 {
        (x * 1e-12, "T")
    } else if x > 1e9 {
        (x * 1e-9, "B")
    } else if x > 1e6 {
        (x * 1e-6, "M")
    } else {
        (x * 1e-3, "K")
    };
    // Python's round() is half-to-even; len(str(...).lstrip('0')) counts the integer's digits.
    let rounded = scaled.round_ties_even() as u64;
    let digits = if rounded == 0 { 0 } else { rounded.to_string().len() };
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

#[cfg(test)]
mod tests;

//! The safetensors format: parse untrusted headers strictly, synthesize spec-exact ones.
//!
//! Every weight file llmfs registers or serves goes through [`read_header`], which follows the
//! spec to the letter (8-byte little-endian length, a JSON object, tensors whose `data_offsets`
//! tile the data region exactly, known dtypes, sizes that agree with shapes) and never allocates a
//! size it read from the file before checking it against the file's real size and
//! [`MAX_HEADER_SIZE`]. Synthesized files get their header from [`HeaderBuilder`], built once per
//! file and kept as bytes (never re-rendered, so bytes never depend on hash-map order).
//!
//! We parse ourselves rather than through the `safetensors` crate because we need the raw offsets
//! of a file we read with `pread` (or through `source`'s guarded mappings), and error messages that
//! name the file and the problem.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The same bound as the safetensors crate: a header larger than this is refused before any
/// allocation, whatever the file declares.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// Element types of the safetensors spec that llmfs knows how to size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(non_camel_case_types)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E4M3,
    F8_E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::BOOL,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E4M3" => Dtype::F8_E4M3,
            "F8_E5M2" => Dtype::F8_E5M2,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::F8_E4M3 | Dtype::F8_E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// The 16/32-bit floats llmfs converts between (casts, quantization, deltas).
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a parsed header. Offsets are relative to the start of the data region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed header: tensors in offset order.
#[derive(Clone, Debug)]
pub struct Header {
    /// Size of the whole header (8-byte prefix + JSON); tensor data starts here.
    pub data_start: u64,
    pub tensors: Vec<TensorInfo>,
    pub metadata: Map<String, Value>,
}

impl Header {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// Total file size this header describes.
    pub fn file_size(&self) -> u64 {
        self.data_start + self.tensors.last().map_or(0, |t| t.end)
    }
}

/// Why a safetensors file was refused. Each names the problem precisely; callers add the path.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("truncated: {0} bytes, shorter than the 8-byte header length")]
    TooShort(u64),
    #[error("header length {0} exceeds the limit of {MAX_HEADER_SIZE} bytes")]
    HeaderTooLarge(u64),
    #[error("header length {len} runs past the end of the {file_size}-byte file (truncated?)")]
    HeaderPastEnd { len: u64, file_size: u64 },
    #[error("header is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("header JSON is not an object")]
    NotAnObject,
    #[error("tensor {0:?}: {1}")]
    InvalidTensor(String, String),
    #[error("tensor {0:?}: unknown dtype {1:?}")]
    UnknownDtype(String, String),
    #[error("tensor {name:?}: data_offsets [{start}, {end}] do not match shape {shape:?} of {dtype} ({expected} bytes)")]
    SizeMismatch { name: String, start: u64, end: u64, shape: Vec<usize>, dtype: Dtype, expected: u64 },
    #[error("tensor {0:?}: data_offsets overlap or leave a gap before it (starts at {1}, expected {2})")]
    InvalidOffset(String, u64, u64),
    #[error(
        "tensor data ends at {data_end} but the file has {actual} data bytes (truncated or trailing garbage)"
    )]
    DataSizeMismatch { data_end: u64, actual: u64 },
    #[error("__metadata__ must map strings to strings")]
    InvalidMetadata,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A header error with the file it came from, for one clear line.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FileHeaderError {
    pub path: PathBuf,
    #[source]
    pub source: HeaderError,
}

/// Read and validate the header of the safetensors file at `path`.
pub fn read_header_path(path: &Path) -> Result<Header, FileHeaderError> {
    let wrap = |source| FileHeaderError { path: path.to_owned(), source };
    let file = File::open(path).map_err(|e| wrap(e.into()))?;
    read_header(&file).map_err(wrap)
}

/// Read and validate the header of an open safetensors file (pread only; the file may be shared).
pub fn read_header(file: &File) -> Result<Header, HeaderError> {
    let file_size = file.metadata()?.len();
    if file_size < 8 {
        return Err(HeaderError::TooShort(file_size));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)?;
    let len = check_header_len(u64::from_le_bytes(len_bytes), file_size)?;
    // Safe to allocate: `len` is bounded by both the file size and MAX_HEADER_SIZE.
    let mut json = vec![0u8; len as usize];
    file.read_exact_at(&mut json, 8)?;
    parse_json(&json, file_size)
}

/// Validate a complete in-memory safetensors buffer's header (the fuzz entry point).
pub fn parse_header(buffer: &[u8]) -> Result<Header, HeaderError> {
    let file_size = buffer.len() as u64;
    let prefix = buffer.get(..8).ok_or(HeaderError::TooShort(file_size))?;
    let len = check_header_len(u64::from_le_bytes(prefix.try_into().unwrap()), file_size)?;
    parse_json(&buffer[8..8 + len as usize], file_size)
}

/// Validate a header given its bytes (`prefix`: the 8-byte length and the JSON, possibly followed
/// by more) and the size of the whole file it heads.
pub fn parse_header_prefix(prefix: &[u8], file_size: u64) -> Result<Header, HeaderError> {
    let len_bytes = prefix.get(..8).ok_or(HeaderError::TooShort(prefix.len() as u64))?;
    let len = check_header_len(u64::from_le_bytes(len_bytes.try_into().unwrap()), file_size)?;
    let json = prefix
        .get(8..8 + len as usize)
        .ok_or(HeaderError::HeaderPastEnd { len, file_size: prefix.len() as u64 })?;
    parse_json(json, file_size)
}

fn check_header_len(len: u64, file_size: u64) -> Result<u64, HeaderError> {
    if len > MAX_HEADER_SIZE {
        return Err(HeaderError::HeaderTooLarge(len));
    }
    if len.checked_add(8).is_none_or(|end| end > file_size) {
        return Err(HeaderError::HeaderPastEnd { len, file_size });
    }
    Ok(len)
}

fn parse_json(json: &[u8], file_size: u64) -> Result<Header, HeaderError> {
    let data_start = 8 + json.len() as u64;
    let value: Value = serde_json::from_slice(json).map_err(|e| HeaderError::InvalidJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(HeaderError::NotAnObject);
    };
    let mut metadata = Map::new();
    let mut tensors = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            let Value::Object(m) = v else { return Err(HeaderError::InvalidMetadata) };
            if !m.values().all(Value::is_string) {
                return Err(HeaderError::InvalidMetadata);
            }
            metadata = m;
            continue;
        }
        tensors.push(parse_tensor(name, &v)?);
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut expected_start = 0u64;
    for t in &tensors {
        if t.start != expected_start {
            return Err(HeaderError::InvalidOffset(t.name.clone(), t.start, expected_start));
        }
        expected_start = t.end;
    }
    let actual = file_size - data_start;
    if expected_start != actual {
        return Err(HeaderError::DataSizeMismatch { data_end: expected_start, actual });
    }
    Ok(Header { data_start, tensors, metadata })
}

fn parse_tensor(name: String, v: &Value) -> Result<TensorInfo, HeaderError> {
    let bad = |msg: &str| HeaderError::InvalidTensor(name.clone(), msg.to_owned());
    let obj = v.as_object().ok_or_else(|| bad("entry is not an object"))?;
    let dtype_str = obj.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("missing dtype"))?;
    let dtype = Dtype::parse(dtype_str)
        .ok_or_else(|| HeaderError::UnknownDtype(name.clone(), dtype_str.to_owned()))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("shape must be a list of non-negative integers"))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("data_offsets must be [start, end]"))?;
    let (Some(start), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
        return Err(bad("data_offsets must be non-negative integers"));
    };
    if end < start {
        return Err(bad("data_offsets end before they start"));
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| bad("shape overflows"))?;
    if end - start != expected {
        return Err(HeaderError::SizeMismatch { name, start, end, shape, dtype, expected });
    }
    Ok(TensorInfo { name, dtype, shape, start, end })
}

/// Builds a spec-exact header for a synthesized file: tensors laid out in the order given, with no
/// gaps, JSON padded with spaces so that the data starts 8-byte aligned.
#[derive(Default)]
pub struct HeaderBuilder {
    metadata: Map<String, Value>,
    tensors: Vec<(String, Dtype, Vec<usize>)>,
}

impl HeaderBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn metadata(mut self, key: &str, value: &str) -> Self {
        self.metadata.insert(key.to_owned(), Value::String(value.to_owned()));
        self
    }
    pub fn tensor(&mut self, name: &str, dtype: Dtype, shape: &[usize]) {
        self.tensors.push((name.to_owned(), dtype, shape.to_vec()));
    }

    /// The header bytes (length prefix, JSON, padding) and each tensor's data offsets.
    pub fn build(self) -> (Vec<u8>, Vec<TensorInfo>) {
        let mut map = Map::new();
        if !self.metadata.is_empty() {
            map.insert("__metadata__".into(), Value::Object(self.metadata));
        }
        let mut infos = Vec::with_capacity(self.tensors.len());
        let mut offset = 0u64;
        for (name, dtype, shape) in self.tensors {
            let len = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
            map.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            infos.push(TensorInfo { name, dtype, shape, start: offset, end: offset + len });
            offset += len;
        }
        let mut json = serde_json::to_vec(&Value::Object(map)).expect("a JSON map always serializes");
        let padded = json.len().div_ceil(8) * 8;
        json.resize(padded, b' ');
        let mut bytes = Vec::with_capacity(8 + json.len());
        bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&json);
        (bytes, infos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header_json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header_json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header_json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    #[test]
    fn builder_output_parses_back_and_is_aligned() {
        let mut b = HeaderBuilder::new().metadata("format", "pt");
        b.tensor("a", Dtype::F16, &[3, 5]);
        b.tensor("b", Dtype::F32, &[7]);
        let (bytes, infos) = b.build();
        assert_eq!(bytes.len() % 8, 0);
        let data: u64 = infos.iter().map(|t| t.len()).sum();
        let mut file = bytes.clone();
        file.resize(bytes.len() + data as usize, 0);
        let h = parse_header(&file).unwrap();
        assert_eq!(h.tensors, infos);
        assert_eq!(h.data_start as usize, bytes.len());
        assert_eq!(h.metadata["format"], "pt");
        // Agrees with the reference implementation.
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), &[3, 5]);
    }

    #[test]
    fn truncated_file_is_refused() {
        assert!(matches!(parse_header(&[1, 2, 3]), Err(HeaderError::TooShort(3))));
        let f = file_with(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 10);
        assert!(matches!(parse_header(&f), Err(HeaderError::DataSizeMismatch { .. })));
    }

    #[test]
    fn huge_declared_length_is_refused_without_allocating() {
        let mut f = 10_000_000_000u64.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(matches!(parse_header(&f), Err(HeaderError::HeaderTooLarge(_))));
        let mut f = 1000u64.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(matches!(parse_header(&f), Err(HeaderError::HeaderPastEnd { .. })));
        let mut f = u64::MAX.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(parse_header(&f).is_err());
    }

    #[test]
    fn invalid_json_and_overlaps_are_refused() {
        let f = file_with("{not json", 0);
        assert!(matches!(parse_header(&f), Err(HeaderError::InvalidJson(_))));
        let f = file_with(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
            24,
        );
        assert!(matches!(parse_header(&f), Err(HeaderError::InvalidOffset(..))));
        let f = file_with(r#"{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#, 16);
        assert!(matches!(parse_header(&f), Err(HeaderError::SizeMismatch { .. })));
        let f = file_with(r#"{"a":{"dtype":"Q9","shape":[4],"data_offsets":[0,16]}}"#, 16);
        assert!(matches!(parse_header(&f), Err(HeaderError::UnknownDtype(..))));
        let f =
            file_with(r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#, 16);
        assert!(matches!(parse_header(&f), Err(HeaderError::InvalidTensor(..))));
        let f = file_with(r#"{"__metadata__":{"a":1}}"#, 0);
        assert!(matches!(parse_header(&f), Err(HeaderError::InvalidMetadata)));
    }

    #[test]
    fn json_attack_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        let f = file_with(&deep, 0);
        assert!(matches!(parse_header(&f), Err(HeaderError::InvalidJson(_))));
    }
}

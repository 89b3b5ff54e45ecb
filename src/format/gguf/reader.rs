//! A strict, bounded GGUF header reader: for tests, `llmfs check`, and anything that must look
//! inside a GGUF file it did not write.
//!
//! Like [`crate::format::safetensors`], it never allocates a size it read before checking it
//! against the bytes that are really there, never panics, and names the problem: every count and
//! length is checked against the remaining input (an array of n elements needs at least n bytes),
//! string lengths against [`MAX_STRING`], nesting against [`MAX_DEPTH`], tensor data against the
//! file's size, alignment and each other (no overlap).

use super::value::{pad, TensorInfo, Value, ValueType, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::codec::ggml::GgmlType;

/// Largest string accepted (a chat template or a tokenizer's JSON can be megabytes; nothing
/// legitimate is near this).
pub const MAX_STRING: u64 = 64 << 20;
/// Arrays of arrays are allowed this deep (gguf-py writes none; ggml refuses nested arrays).
pub const MAX_DEPTH: u32 = 2;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;

/// Why a GGUF header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("truncated: the header needs more than the {0} bytes available")]
    Truncated(u64),
    #[error("not a GGUF file (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (2 and 3 are read)")]
    BadVersion(u32),
    #[error("{what} count {count} cannot fit in the {left} bytes left")]
    CountTooLarge { what: &'static str, count: u64, left: u64 },
    #[error("string of {0} bytes exceeds the limit")]
    StringTooLong(u64),
    #[error("string is not UTF-8 (at byte {0})")]
    NotUtf8(u64),
    #[error("unknown value type {0}")]
    BadValueType(u32),
    #[error("arrays nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("duplicate key {0:?}")]
    DuplicateKey(String),
    #[error("general.alignment must be a non-zero power of two u32, got {0}")]
    BadAlignment(String),
    #[error("tensor {name:?}: {n} dimensions (at most {MAX_DIMS})")]
    TooManyDims { name: String, n: u32 },
    #[error("tensor {name:?}: unknown or unsupported ggml type {id}")]
    BadTensorType { name: String, id: u32 },
    #[error("tensor {name:?}: shape {dims:?} overflows or has a zero dimension")]
    BadShape { name: String, dims: Vec<u64> },
    #[error("tensor {name:?}: row of {ne0} elements is not a whole number of {ty} blocks")]
    PartialBlock { name: String, ne0: u64, ty: GgmlType },
    #[error("duplicate tensor {0:?}")]
    DuplicateTensor(String),
    #[error("tensor {name:?}: offset {offset} is not a multiple of the alignment {align}")]
    Misaligned { name: String, offset: u64, align: u64 },
    #[error("tensor {name:?}: data [{start}, {end}) overlaps another tensor or runs past the end of the {file_size}-byte file")]
    BadRange { name: String, start: u64, end: u64, file_size: u64 },
}

/// A parsed GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the data region starts (the header's size, padded).
    pub data_offset: u64,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Absolute byte range of a tensor's data.
    pub fn tensor_range(&self, t: &TensorInfo) -> (u64, u64) {
        let start = self.data_offset + t.offset;
        (start, start + tensor_nbytes(t).unwrap_or(0))
    }
}

/// Bytes of a tensor's data: whole rows of whole blocks.
pub fn tensor_nbytes(t: &TensorInfo) -> Option<u64> {
    let ne0 = *t.dims.first()?;
    let row = t.ggml_type.row_bytes(usize::try_from(ne0).ok()?)? as u64;
    t.dims[1..].iter().try_fold(row, |acc, d| acc.checked_mul(*d))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn take(&mut self, n: u64) -> Result<&'a [u8], ReadError> {
        if n > self.left() {
            return Err(ReadError::Truncated(self.buf.len() as u64));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String, ReadError> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(ReadError::StringTooLong(len));
        }
        let at = self.pos as u64;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| ReadError::NotUtf8(at + e.utf8_error().valid_up_to() as u64))
    }

    fn value(&mut self, ty: ValueType, depth: u32) -> Result<Value, ReadError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.arr::<1>()?[0]),
            ValueType::I8 => Value::I8(self.arr::<1>()?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.arr()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.arr()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.arr()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.arr()?)),
            ValueType::Bool => Value::Bool(self.arr::<1>()?[0] != 0),
            ValueType::Str => Value::Str(self.string()?),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.arr()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.arr()?)),
            ValueType::Array => {
                if depth >= MAX_DEPTH {
                    return Err(ReadError::TooDeep);
                }
                let id = self.u32()?;
                let elem = ValueType::from_id(id).ok_or(ReadError::BadValueType(id))?;
                let n = self.u64()?;
                // Every element takes at least one byte: a count beyond what is left is a lie.
                if n > self.left() {
                    return Err(ReadError::CountTooLarge { what: "array", count: n, left: self.left() });
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(elem, items.into())
            }
        })
    }
}

/// Parse a GGUF header from `prefix` (the file's first bytes, at least the whole header) of a
/// file of `file_size` bytes. Tensor data is checked against `file_size`, not read.
pub fn parse_header(prefix: &[u8], file_size: u64) -> Result<GgufFile, ReadError> {
    let mut c = Cursor { buf: prefix, pos: 0 };
    let magic: [u8; 4] = c.arr()?;
    if magic != GGUF_MAGIC {
        return Err(ReadError::BadMagic(magic));
    }
    let version = c.u32()?;
    if version != 2 && version != 3 {
        return Err(ReadError::BadVersion(version));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // A KV takes at least 8 + 4 bytes, a tensor info at least 8 + 4 + 8 + 4 + 8.
    if n_kv > c.left() / 12 {
        return Err(ReadError::CountTooLarge { what: "key-value", count: n_kv, left: c.left() });
    }
    let mut kvs: Vec<(String, Value)> = Vec::with_capacity(n_kv as usize);
    let mut keys = std::collections::HashSet::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let id = c.u32()?;
        let ty = ValueType::from_id(id).ok_or(ReadError::BadValueType(id))?;
        let value = c.value(ty, 0)?;
        if !keys.insert(key.clone()) {
            return Err(ReadError::DuplicateKey(key));
        }
        kvs.push((key, value));
    }
    let alignment = match kvs.iter().find(|(k, _)| k == "general.alignment") {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => *a as u64,
        Some((_, v)) => return Err(ReadError::BadAlignment(format!("{v:?}"))),
    };
    if n_tensors > c.left() / 32 {
        return Err(ReadError::CountTooLarge { what: "tensor", count: n_tensors, left: c.left() });
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims > MAX_DIMS {
            return Err(ReadError::TooManyDims { name, n: n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64()?);
        }
        let id = c.u32()?;
        let ggml_type =
            GgmlType::from_id(id).ok_or_else(|| ReadError::BadTensorType { name: name.clone(), id })?;
        let offset = c.u64()?;
        if !names.insert(name.clone()) {
            return Err(ReadError::DuplicateTensor(name));
        }
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }
    let data_offset = pad(c.pos as u64, alignment);
    // Check every tensor: shape, whole blocks, alignment, in the file, no overlap.
    let mut ranges: Vec<(u64, u64, usize)> = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let n = t.dims.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d));
        if t.dims.is_empty() || t.dims.contains(&0) || n.is_none_or(|n| n > (1 << 50)) {
            return Err(ReadError::BadShape { name: t.name.clone(), dims: t.dims.clone() });
        }
        if t.dims[0] % t.ggml_type.block_elems() as u64 != 0 {
            return Err(ReadError::PartialBlock { name: t.name.clone(), ne0: t.dims[0], ty: t.ggml_type });
        }
        if t.offset % alignment != 0 {
            return Err(ReadError::Misaligned { name: t.name.clone(), offset: t.offset, align: alignment });
        }
        let len = tensor_nbytes(t)
            .ok_or_else(|| ReadError::BadShape { name: t.name.clone(), dims: t.dims.clone() })?;
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_size => ranges.push((s, e, i)),
            _ => {
                return Err(ReadError::BadRange {
                    name: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_size,
                })
            }
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            let t = &tensors[w[1].2];
            return Err(ReadError::BadRange { name: t.name.clone(), start: w[1].0, end: w[1].1, file_size });
        }
    }
    Ok(GgufFile { version, kvs, tensors, alignment, data_offset })
}

/// Parse a whole file held in memory.
pub fn parse(bytes: &[u8]) -> Result<GgufFile, ReadError> {
    parse_header(bytes, bytes.len() as u64)
}

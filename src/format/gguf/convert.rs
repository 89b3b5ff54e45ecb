//! A planned tensor's bytes from its HF source: the row map applied, each row cast as the
//! converter casts it (torch `.to(float32)` for other dtypes, numpy's `astype(float16)`, gguf-py's
//! `BF16.quantize_blocks` = ggml's `ggml_compute_fp32_to_bf16`), or handed as f32 values to a
//! quantizer for the block types (the ggml reference quantizers live in `codec::ggml`).
//!
//! Values of Q4_0 / Q4_K_M tensors pass through f16 first ([`TensorSource::Hf`]'s `through_f16`):
//! llama-quantize reads the F16 file, so its input is `f32(f16(x))`, not the checkpoint's values.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{PlannedTensor, TensorSource};
use crate::codec::ggml::GgmlType;
use crate::format::Dtype;

/// Encodes whole rows of f32 values as blocks of a quantized ggml type, appending to the output
/// (the ggml reference quantizers; `dir::zero_blocks` stands in until they land).
pub type Quantizer<'a> = dyn FnMut(GgmlType, &[f32], &mut Vec<u8>) -> Result<(), String> + 'a;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("tensor {name}: source has {got} bytes, expected {want}")]
    SourceSize { name: String, got: usize, want: usize },
    #[error("tensor {name}: rows [{first}, {last}) are out of range")]
    Rows { name: String, first: u64, last: u64 },
    #[error("tensor {name}: source dtype {dtype} cannot be converted")]
    Dtype { name: String, dtype: Dtype },
    #[error("tensor {name}: quantizing to {ty} failed: {reason}")]
    Quantize { name: String, ty: GgmlType, reason: String },
}

/// gguf-py's BF16 rounding (= ggml_compute_fp32_to_bf16): NaN made quiet, else round to nearest even.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return (((n & 0xffff_0000) | (64 << 16)) >> 16) as u16;
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

/// The source's raw little-endian elements `bytes` as the converter sees them (torch float32),
/// appended to `values`: whole slices, which the compiler vectorizes (one element at a time,
/// with a match on the dtype each, was most of a GGUF fill's time).
pub fn extend_f32(values: &mut Vec<f32>, bytes: &[u8], dtype: Dtype) {
    match dtype {
        Dtype::F32 => {
            values.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        }
        Dtype::BF16 => values.extend(
            bytes.chunks_exact(2).map(|b| f32::from_bits(((b[1] as u32) << 24) | ((b[0] as u32) << 16))),
        ),
        Dtype::F16 => {
            let h: Vec<f16> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            let at = values.len();
            values.resize(at + h.len(), 0.0);
            h.convert_to_f32_slice(&mut values[at..]);
        }
        _ => values.extend((0..bytes.len() / dtype.size()).map(|i| element(bytes, i, dtype))),
    }
}

/// One element of the source as the converter sees it (torch float32).
fn element(src: &[u8], i: usize, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_le_bytes([src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]]),
        Dtype::F16 => f16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32(),
        Dtype::F64 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&src[8 * i..8 * i + 8]);
            f64::from_le_bytes(b) as f32
        }
        _ => 0.0,
    }
}

/// Elements converted at a time: whole rows, few enough that their f32 values stay in the
/// core's L2 cache between the cast and the quantizer (a fill piece's ~2 M values, 8 MB of f32
/// made whole before any was quantized, did not), and what `codec::ggml::quantize_rows` runs
/// on the calling thread without splitting it.
const BATCH_ELEMS: usize = 16 * 1024;

/// The output rows `[first, last)` of `t` (ggml rows: `row_elems` elements each), converted from
/// the HF source tensor's raw little-endian bytes `src` (the whole tensor), appended to `out`.
/// `quantize(ty, values, out)` encodes whole rows of f32 values as blocks of a quantized type;
/// it is handed at most [`BATCH_ELEMS`] values (or one row, if longer) at a time.
pub fn convert_rows(
    t: &PlannedTensor,
    src: &[u8],
    first: u64,
    last: u64,
    out: &mut Vec<u8>,
    quantize: &mut Quantizer,
) -> Result<(), ConvertError> {
    let name = || t.name.clone();
    if first > last || last > t.n_rows() {
        return Err(ConvertError::Rows { name: name(), first, last });
    }
    let row_elems = t.row_elems() as usize;
    let (a, b) = (first as usize * row_elems, last as usize * row_elems);
    let batch = (BATCH_ELEMS / row_elems.max(1)).max(1) * row_elems;
    let mut scratch = Vec::new();
    match &t.source {
        TensorSource::Computed(v) => {
            let v = v.get(a..b).ok_or(ConvertError::Rows { name: name(), first, last })?;
            for values in v.chunks(batch.max(1)) {
                emit(t, values, out, quantize, &mut scratch)?;
            }
        }
        TensorSource::Hf { dtype, shape, rows, through_f16, .. } => {
            if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
                return Err(ConvertError::Dtype { name: name(), dtype: *dtype });
            }
            let n: usize = shape.iter().product();
            if src.len() != n * dtype.size() {
                return Err(ConvertError::SourceSize {
                    name: name(),
                    got: src.len(),
                    want: n * dtype.size(),
                });
            }
            // The row map acts on the HF tensor's first axis: `unit` elements per HF row.
            let hf_rows = shape[0];
            let unit = n / hf_rows;
            let size = dtype.size();
            // The HF bytes of output elements [from, to), in runs within one HF row each.
            let runs = |from: usize, to: usize| {
                let mut e = from;
                std::iter::from_fn(move || {
                    (e < to).then(|| {
                        let (hf_row, within) = (e / unit, e % unit);
                        let take = (unit - within).min(to - e);
                        let base = (rows.src_row(hf_row, hf_rows) * unit + within) * size;
                        e += take;
                        &src[base..base + take * size]
                    })
                })
            };
            // Exact copies where the converter keeps the source's f16 bits (NaN payloads included).
            if t.ggml_type == GgmlType::F16 && *dtype == Dtype::F16 {
                runs(a, b).for_each(|bytes| out.extend_from_slice(bytes));
                return Ok(());
            }
            let mut values: Vec<f32> = Vec::with_capacity(batch.min(b - a));
            let mut halves: Vec<f16> = Vec::new();
            let mut e = a;
            while e < b {
                let end = (e + batch).min(b);
                values.clear();
                runs(e, end).for_each(|bytes| extend_f32(&mut values, bytes, *dtype));
                if *through_f16 {
                    halves.resize(values.len(), f16::ZERO);
                    halves.convert_from_f32_slice(&values);
                    halves.convert_to_f32_slice(&mut values);
                }
                emit(t, &values, out, quantize, &mut scratch)?;
                e = end;
            }
        }
    }
    Ok(())
}

/// Whole rows of f32 `values` of `t` in its ggml type, appended to `out` (`scratch`: the f16
/// values of an F16 tensor, reused from batch to batch).
fn emit(
    t: &PlannedTensor,
    values: &[f32],
    out: &mut Vec<u8>,
    quantize: &mut Quantizer,
    scratch: &mut Vec<f16>,
) -> Result<(), ConvertError> {
    match t.ggml_type {
        GgmlType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => {
            // Whole slices: F16C eight at a time where the CPU has it (the same rounding, to
            // nearest even, as one at a time and as numpy's astype(float16)).
            scratch.resize(values.len(), f16::ZERO);
            scratch.convert_from_f32_slice(values);
            out.extend(scratch.iter().flat_map(|v| v.to_le_bytes()));
        }
        GgmlType::BF16 => out.extend(values.iter().flat_map(|v| f32_to_bf16_bits(*v).to_le_bytes())),
        ty => quantize(ty, values, out).map_err(|reason| ConvertError::Quantize {
            name: t.name.clone(),
            ty,
            reason,
        })?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_ggml_s() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // Halfway cases round to even.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        // A signalling NaN becomes quiet with its upper payload kept.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
    }
}

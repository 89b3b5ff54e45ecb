//! Tensors in and out of the kernels: stored bytes decoded and cast to the merge's compute dtype
//! (mergekit's `LoadTensor` casts each input on load), merged values encoded to the output dtype.

use half::{bf16, f16};

use super::round;
use crate::format::Dtype;

/// Decode little-endian `src` of `from` and cast each value to `to` (mergekit's cast on load).
pub fn load_as(from: Dtype, to: Dtype, src: &[u8]) -> Vec<f32> {
    let n = if from.is_float() { src.len() / from.size() } else { 0 };
    let mut v = vec![0f32; n];
    load_into(from, to, src, &mut v);
    v
}

/// [`load_as`] into `dst` (`src.len() / from.size()` values; a non-float `from` writes nothing).
pub fn load_into(from: Dtype, to: Dtype, src: &[u8], dst: &mut [f32]) {
    match from {
        Dtype::F32 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = round(to, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Dtype::F16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = round(to, f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        Dtype::BF16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = round(to, bf16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        _ => {}
    }
}

/// Encode f32 values as little-endian `to` (round to nearest even).
pub fn encode(to: Dtype, v: &[f32]) -> Vec<u8> {
    let size = if matches!(to, Dtype::BF16 | Dtype::F16) { 2 } else { 4 };
    let mut out = vec![0u8; v.len() * size];
    encode_into(to, v, &mut out);
    out
}

/// [`encode`] into `out` (`v.len()` values of `to`: 2 bytes for bf16/f16, else 4).
pub fn encode_into(to: Dtype, v: &[f32], out: &mut [u8]) {
    match to {
        Dtype::BF16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        _ => {
            for (o, &x) in out.chunks_exact_mut(4).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

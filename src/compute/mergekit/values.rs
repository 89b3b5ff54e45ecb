//! Tensors in and out of the kernels: stored bytes decoded and cast to the merge's compute dtype
//! (mergekit's `LoadTensor` casts each input on load), merged values encoded to the output dtype.

use half::f16;

use super::round;
use super::torch::round_bf16;
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
            // A bf16 value is exact in f32 and stays itself when rounded to bf16 again (a NaN
            // already quiet), so only an f16 compute dtype rounds; the widening is half's
            // `to_f32` (the bits shifted up, a NaN made quiet) written out so it vectorizes.
            let widen = |b: &[u8]| {
                let h = u16::from_le_bytes([b[0], b[1]]);
                let h = if h & 0x7fff > 0x7f80 { h | 0x0040 } else { h };
                f32::from_bits((h as u32) << 16)
            };
            if to == Dtype::F16 {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = round(to, widen(b));
                }
            } else {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = widen(b);
                }
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
            // `bf16::from_f32`'s bits: `round_bf16` is its rounding (tested bit for bit), inlined.
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&((round_bf16(x).to_bits() >> 16) as u16).to_le_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The inlined bf16 paths against half's, on every bf16 pattern (NaNs, infinities,
    /// subnormals) and, for encode, f32 values around every rounding case.
    #[test]
    fn bf16_load_and_encode_are_halfs() {
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        for to in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let got = load_as(Dtype::BF16, to, &src);
            for (h, g) in (0..=u16::MAX).zip(&got) {
                let want = round(to, bf16::from_bits(h).to_f32());
                assert_eq!(g.to_bits(), want.to_bits(), "{h:#06x} to {to}");
            }
        }
        let xs: Vec<f32> = (0..=u32::MAX / 65519).map(|i| f32::from_bits(i * 65519)).collect();
        let want: Vec<u8> = xs.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
        assert_eq!(encode(Dtype::BF16, &xs), want);
    }
}

//! The element types of the lossy codecs: F16, BF16 and F32 read as f32 and written back with
//! one rounding ([`Float`]), and [`with_float!`] to run a generic body for a tensor's dtype. Both
//! `q8.rs` and `bitdelta.rs` compute through it, so it is a file of its own.

use half::{bf16, f16};

use super::bitdelta::BITDELTA_BLOCK;

/// A float dtype the lossy codecs read and write.
pub(super) trait Float: Send + Sync {
    const N: usize;
    fn get(b: &[u8]) -> f32;
    fn put(v: f32, b: &mut [u8]);
    /// Exactly [`Float::get`] for every value but NaN (branch-free, so loops vectorize).
    fn widen(b: &[u8]) -> f32;
    /// `put` of each of `v` (no NaN among them) into `out`, vectorized.
    fn narrow_block(v: &[f32; BITDELTA_BLOCK], out: &mut [u8]);
}

pub(super) struct F16;
pub(super) struct BF16;
pub(super) struct F32;

impl Float for F16 {
    const N: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
    #[inline(always)]
    fn put(v: f32, b: &mut [u8]) {
        b[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
    }
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        crate::compute::cast::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn narrow_block(v: &[f32; BITDELTA_BLOCK], out: &mut [u8]) {
        // F16C where the CPU has it: round to nearest even, as `half` does (with F16C too).
        let mut h = [0u16; BITDELTA_BLOCK];
        crate::compute::cast::f32_to_f16_bits(v, &mut h);
        for h in h.iter_mut() {
            *h = h.to_le();
        }
        out.copy_from_slice(bytemuck::cast_slice(&h));
    }
}

impl Float for BF16 {
    const N: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        bf16::from_le_bytes([b[0], b[1]]).to_f32()
    }
    #[inline(always)]
    fn put(v: f32, b: &mut [u8]) {
        b[..2].copy_from_slice(&bf16::from_f32(v).to_le_bytes())
    }
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
    }
    #[inline(always)]
    fn narrow_block(v: &[f32; BITDELTA_BLOCK], out: &mut [u8]) {
        // Round to nearest even: `half`'s rounding for every value but NaN. Into words, then one
        // copy (two bytes stored per element compiled to byte shuffles).
        let mut h = [0u16; BITDELTA_BLOCK];
        for (h, &x) in h.iter_mut().zip(v) {
            *h = crate::compute::cast::bf16_bits_from_f32(x).to_le();
        }
        out.copy_from_slice(bytemuck::cast_slice(&h));
    }
}

impl Float for F32 {
    const N: usize = 4;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn put(v: f32, b: &mut [u8]) {
        b[..4].copy_from_slice(&v.to_le_bytes())
    }
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        Self::get(b)
    }
    #[inline(always)]
    fn narrow_block(v: &[f32; BITDELTA_BLOCK], out: &mut [u8]) {
        for (o, &x) in out.chunks_exact_mut(4).zip(v) {
            o.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Run `$body` with `$T` bound to the element type of `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::format::Dtype::F16 => {
                type $T = $crate::codec::delta::float::F16;
                $body
            }
            $crate::format::Dtype::BF16 => {
                type $T = $crate::codec::delta::float::BF16;
                $body
            }
            $crate::format::Dtype::F32 => {
                type $T = $crate::codec::delta::float::F32;
                $body
            }
            other => panic!("lossy delta codecs take F16, BF16 or F32, not {other}"),
        }
    };
}

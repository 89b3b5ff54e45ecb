//! Float element types as torch computes in them (f32, f16, bf16: each op in f32, rounded once
//! to the type), and the view of a quantized tensor's bytes that the dequantization kernels
//! take. Shared by the codecs (the CPU kernels, `codec::quant`) and the GPU kernels, so neither
//! imports the other.

use half::{bf16, f16};

use super::cast::{bf16_bits_from_f32, f16_bits_from_f32, f16_bits_to_f32, f32_to_f16_bits};
use crate::registry::recipe::QuantConfig;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type torch quantizes: f32, f16 or bf16. All arithmetic is done in f32 and
/// rounded to `Self` after each op ([`QuantFloat::round`]), which is what torch's CPU kernels
/// do for reduced-precision types (`opmath_t` = float, one rounding per op).
pub trait QuantFloat:
    Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + bytemuck::Pod + 'static + sealed::Sealed
{
    /// The safetensors dtype name.
    const DTYPE: &'static str;
    /// Bytes per element.
    const SIZE: usize;
    /// Exact widening.
    fn to_f32(self) -> f32;
    /// Round to nearest even, as torch's casts from float.
    fn from_f32(x: f32) -> Self;
    /// The bit pattern, zero-extended (for bit-exact comparisons).
    fn to_bits_u32(self) -> u32;
    /// Reads one little-endian element from the first `SIZE` bytes of `b`.
    fn read_le(b: &[u8]) -> Self;
    /// Writes one little-endian element into the first `SIZE` bytes of `out`.
    fn write_le(self, out: &mut [u8]);
    /// The value an f32 result has once torch stores it in this dtype.
    #[inline]
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
    /// `round` over a slice, in place; vectorized where the type allows.
    fn round_slice(buf: &mut [f32]);
    /// `dst[i] = from_f32(src[i])`; vectorized where the type allows.
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);
}

impl QuantFloat for f32 {
    const DTYPE: &'static str = "F32";
    const SIZE: usize = 4;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
    #[inline]
    fn read_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline]
    fn write_le(self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.to_le_bytes());
    }
    #[inline]
    fn round(x: f32) -> f32 {
        x
    }
    #[inline]
    fn round_slice(_buf: &mut [f32]) {}
    #[inline]
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl QuantFloat for f16 {
    const DTYPE: &'static str = "F16";
    const SIZE: usize = 2;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // Branch-free, so loops over it vectorize (half's checks the CPU at every call).
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_bits(f16_bits_from_f32(x))
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
    #[inline]
    fn read_le(b: &[u8]) -> Self {
        f16::from_le_bytes([b[0], b[1]])
    }
    #[inline]
    fn write_le(self, out: &mut [u8]) {
        out[..2].copy_from_slice(&self.to_le_bytes());
    }
    #[inline]
    fn round(x: f32) -> f32 {
        f16_bits_to_f32(f16_bits_from_f32(x))
    }
    #[inline(always)]
    fn round_slice(buf: &mut [f32]) {
        // Branch-free, so it vectorizes in place (no round trip through a buffer of f16).
        for v in buf.iter_mut() {
            *v = f16_bits_to_f32(f16_bits_from_f32(*v));
        }
    }
    #[inline(always)]
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        f32_to_f16_bits(src, bytemuck::cast_slice_mut(dst));
    }
}

impl QuantFloat for bf16 {
    const DTYPE: &'static str = "BF16";
    const SIZE: usize = 2;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        bf16::from_bits(bf16_bits_from_f32(x))
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
    #[inline]
    fn read_le(b: &[u8]) -> Self {
        bf16::from_le_bytes([b[0], b[1]])
    }
    #[inline]
    fn write_le(self, out: &mut [u8]) {
        out[..2].copy_from_slice(&self.to_le_bytes());
    }
    #[inline]
    fn round(x: f32) -> f32 {
        f32::from_bits((bf16_bits_from_f32(x) as u32) << 16)
    }
    #[inline(always)]
    fn round_slice(buf: &mut [f32]) {
        for v in buf.iter_mut() {
            *v = f32::from_bits((bf16_bits_from_f32(*v) as u32) << 16);
        }
    }
    #[inline(always)]
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(bf16_bits_from_f32(s));
        }
    }
}

/// Like [`QuantView`], with `scale` and `min` as little-endian bytes of `T` (no alignment
/// needed: a safetensors payload is not aligned for `T`).
#[derive(Debug, Clone, Copy)]
pub struct QuantBytesView<'a> {
    pub rows: usize,
    pub cols: usize,
    pub config: QuantConfig,
    pub q: &'a [u8],
    pub scale: &'a [u8],
    pub min: &'a [u8],
}

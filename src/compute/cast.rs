//! Dtype casts between f32, f16 and bf16: round to nearest even, NaN stays NaN, Inf stays Inf,
//! overflow becomes Inf — what torch's `.to(dtype)` does on the CPU.
//!
//! f16 and bf16 both widen to f32 exactly, so every cast goes through f32 with a single rounding
//! at the end, which is the correctly rounded result. The conversions are torch's own bit-level
//! routines (below), written branch-free so that one pass over a slice vectorizes; on x86-64 the
//! pass is compiled for AVX2 too and picked at run time (8 lanes instead of SSE2's 4). `half`'s
//! slice conversions call a non-inlined F16C routine per 8 values and do bf16 one at a time,
//! which measured 2-4x slower.

use half::{bf16, f16};

use super::{typed, typed_mut};
use crate::format::Dtype;

#[derive(Debug, thiserror::Error)]
#[error("cannot cast {from} to {to}: only F16, BF16 and F32 are converted")]
pub struct CastError {
    pub from: Dtype,
    pub to: Dtype,
}

/// Convert whole elements of `from` in `src` to `to` in `dst` (`dst.len() / to.size() ==
/// src.len() / from.size()`).
pub fn cast(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<(), CastError> {
    if !from.is_float() || !to.is_float() {
        return Err(CastError { from, to });
    }
    let n = src.len() / from.size();
    assert_eq!(src.len(), n * from.size(), "partial element in cast source");
    assert_eq!(dst.len(), n * to.size(), "cast destination has the wrong size");
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    // Aligned slices are converted in place; unaligned ones (rare: buffers come from the allocator)
    // go through aligned copies so the result is the same either way.
    match (aligned(from, src), aligned_mut(to, dst)) {
        (true, true) => convert_aligned(from, to, src, dst),
        _ => {
            let mut s = vec![0u32; src.len().div_ceil(4)];
            let mut d = vec![0u32; dst.len().div_ceil(4)];
            let sb = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut s)[..src.len()];
            sb.copy_from_slice(src);
            let db = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut d)[..dst.len()];
            convert_aligned(from, to, sb, db);
            dst.copy_from_slice(db);
        }
    }
    Ok(())
}

fn aligned(d: Dtype, b: &[u8]) -> bool {
    (b.as_ptr() as usize) % d.size() == 0
}
fn aligned_mut(d: Dtype, b: &mut [u8]) -> bool {
    (b.as_ptr() as usize) % d.size() == 0
}

fn convert_aligned(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if to == Dtype::F16 && from != Dtype::F16 && has_f16c() {
            let out = typed_mut::<u16>(dst).expect("aligned");
            match from {
                Dtype::F32 => f32_to_f16_bits(typed::<f32>(src).expect("aligned"), out),
                // SAFETY: `bf16_to_f16_f16c` only requires AVX2 and F16C, which were just checked.
                _ => unsafe { bf16_to_f16_f16c(typed::<u16>(src).expect("aligned"), out) },
            }
            return;
        }
        if from == Dtype::F16 && to == Dtype::F32 && has_f16c() {
            let (src, out) = (typed::<u16>(src).expect("aligned"), typed_mut::<f32>(dst).expect("aligned"));
            // SAFETY: `f16_to_f32_f16c` only requires AVX2 and F16C, which were just checked.
            unsafe { f16_to_f32_f16c(src, out) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: `convert_avx2` only requires AVX2, which was just checked.
            unsafe { convert_avx2(from, to, src, dst) };
            return;
        }
    }
    convert_any(from, to, src, dst);
}

/// [`convert_any`] compiled for AVX2. The conversions are integer and IEEE operations with one
/// exact result, so the bits are the same at any vector width.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn convert_avx2(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) {
    convert_any(from, to, src, dst);
}

/// Whether the F16C paths below can run (checked once per call; the check is a cached load).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_f16c() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c")
}

/// `dst[i] = f16_bits_from_f32(src[i])` for a slice: the same bits, with F16C where the CPU has
/// it (the compiler does not emit VCVTPS2PH from the portable routine, which is 3-6x slower).
pub(crate) fn f32_to_f16_bits(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_f16c() {
            // SAFETY: `f32_to_f16_f16c` only requires AVX2 and F16C, which were just checked.
            unsafe { f32_to_f16_f16c(src, dst) };
            return;
        }
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = f16_bits_from_f32(x);
    }
}

/// To f16 with VCVTPS2PH (round to nearest even), 8 values at a time: `load(i)` gives 8 f32s
/// from element `i` of the source, whose elements `widen` reads one at a time for the tail and
/// for NaNs. VCVTPS2PH keeps a NaN's payload where torch's routine makes it `sign | 0x7E00`;
/// a block with a NaN (never, in real weights) is redone the portable way so the bits agree.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn to_f16_blocks<S: Copy>(
    n: usize,
    load: impl Fn(usize) -> std::arch::x86_64::__m256,
    src: &[S],
    widen: impl Fn(S) -> f32,
    dst: &mut [u16],
) {
    use std::arch::x86_64::*;
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        let f = load(i);
        if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(f, f)) != 0 {
            for j in i..i + 8 {
                dst[j] = f16_bits_from_f32(widen(src[j]));
            }
            continue;
        }
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
        // SAFETY: i + 8 <= whole <= dst.len(); an unaligned store.
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h) };
    }
    for j in whole..n {
        dst[j] = f16_bits_from_f32(widen(src[j]));
    }
}

/// f16 to f32 with VCVTPH2PS, 8 values at a time: exact, like the portable routine
/// ([`f16_bits_to_f32`], 3x slower: the widening of a FastChat import's two inputs was 17 % of its
/// fill); a block holding a NaN is widened the portable way, so a NaN's bits never depend on
/// the path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_to_f32_f16c(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(src.len(), dst.len());
    let whole = src.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let block = &src[i..i + 8];
        if block.iter().fold(false, |nan, &h| nan | (h & 0x7C00 == 0x7C00 && h & 0x03FF != 0)) {
            for j in i..i + 8 {
                dst[j] = f16_bits_to_f32(src[j]);
            }
            continue;
        }
        // SAFETY: i + 8 <= whole <= src.len() = dst.len(); unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(block.as_ptr() as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    for j in whole..src.len() {
        dst[j] = f16_bits_to_f32(src[j]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    // SAFETY: to_f16_blocks asks for i + 8 <= src.len(); an unaligned load.
    let load = |i: usize| unsafe { _mm256_loadu_ps(src.as_ptr().add(i)) };
    // SAFETY: this function's features are the ones to_f16_blocks needs.
    unsafe { to_f16_blocks(src.len(), load, src, |x| x, dst) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn bf16_to_f16_f16c(src: &[u16], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let load = |i: usize| {
        // SAFETY: to_f16_blocks asks for i + 8 <= src.len(); an unaligned load.
        let h = unsafe { _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    };
    // SAFETY: this function's features are the ones to_f16_blocks needs.
    unsafe { to_f16_blocks(src.len(), load, src, |b| f32::from_bits((b as u32) << 16), dst) }
}

/// One pass per (from, to) pair, each a loop the compiler vectorizes.
#[inline(always)]
fn convert_any(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) {
    #[inline(always)]
    fn each<S: bytemuck::Pod, D: bytemuck::Pod>(src: &[u8], dst: &mut [u8], f: impl Fn(S) -> D) {
        let (src, dst) = (typed::<S>(src).expect("aligned"), typed_mut::<D>(dst).expect("aligned"));
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f(s);
        }
    }
    let bf16_to_f32 = |b: u16| f32::from_bits((b as u32) << 16);
    match (from, to) {
        (Dtype::BF16, Dtype::F16) => each(src, dst, |b: u16| f16_bits_from_f32(bf16_to_f32(b))),
        (Dtype::BF16, Dtype::F32) => each(src, dst, bf16_to_f32),
        (Dtype::F16, Dtype::BF16) => each(src, dst, |h: u16| bf16_bits_from_f32(f16_bits_to_f32(h))),
        (Dtype::F16, Dtype::F32) => each(src, dst, f16_bits_to_f32),
        (Dtype::F32, Dtype::F16) => each(src, dst, f16_bits_from_f32),
        (Dtype::F32, Dtype::BF16) => each(src, dst, bf16_bits_from_f32),
        _ => unreachable!("checked by cast"),
    }
}

/// f32 → f16 bits, round to nearest even: `fp16_ieee_from_fp32_value` of the FP16 library,
/// which is what torch's `c10::Half(float)` runs (c10/util/Half.h). Branch-free (the two
/// conditionals become selects), so loops over it vectorize.
#[inline(always)]
pub(crate) fn f16_bits_from_f32(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    let base = f32::from_bits((bias >> 1) + 0x0780_0000) + base;
    let bits = base.to_bits();
    let nonsign = ((bits >> 13) & 0x0000_7C00) + (bits & 0x0000_0FFF);
    ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

/// f16 bits → f32, exact: `fp16_ieee_to_fp32_value` of the FP16 library, branch-free.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let w = (h as u32) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);
    let exp_offset = 0xE0u32 << 23;
    let exp_scale = f32::from_bits(0x0780_0000); // 2^-112
    let normalized = f32::from_bits((two_w >> 4) + exp_offset) * exp_scale;
    let magic_mask = 126u32 << 23;
    let denormalized = f32::from_bits((two_w >> 17) | magic_mask) - 0.5;
    let denormalized_cutoff = 1u32 << 27;
    let magnitude = if two_w < denormalized_cutoff { denormalized.to_bits() } else { normalized.to_bits() };
    f32::from_bits(sign | magnitude)
}

/// torch's `c10::BFloat16` rounding (`round_to_nearest_even`): NaN becomes the positive quiet
/// NaN 0x7FC0, everything else rounds to nearest even. Written branch-free so loops over it
/// vectorize (half's bf16 slice conversion is scalar).
#[inline(always)]
pub(crate) fn bf16_bits_from_f32(x: f32) -> u16 {
    let u = x.to_bits();
    let rounded = (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7FC0
    } else {
        rounded
    }
}

/// One element, the obvious way: the reference the fast path is tested against.
pub fn cast_one_reference(from: Dtype, to: Dtype, src: &[u8]) -> Vec<u8> {
    let x: f64 = match from {
        Dtype::F32 => f32::from_le_bytes(src.try_into().unwrap()) as f64,
        Dtype::F16 => f16::from_le_bytes(src.try_into().unwrap()).to_f64(),
        Dtype::BF16 => bf16::from_le_bytes(src.try_into().unwrap()).to_f64(),
        _ => panic!("not a float"),
    };
    match to {
        Dtype::F32 => (x as f32).to_le_bytes().to_vec(),
        Dtype::F16 => f16::from_f64(x).to_le_bytes().to_vec(),
        // Bit-level round to nearest even, independent of `half` (whose from_f64 rounds twice).
        Dtype::BF16 => {
            let b = (x as f32).to_bits(); // exact: every source dtype fits in f32
            let h = if (x as f32).is_nan() { (b >> 16) | 0x40 } else { (b + 0x7FFF + ((b >> 16) & 1)) >> 16 };
            (h as u16).to_le_bytes().to_vec()
        }
        _ => panic!("not a float"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FLOATS: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

    fn is_nan(d: Dtype, b: &[u8]) -> bool {
        match d {
            Dtype::F32 => f32::from_le_bytes(b.try_into().unwrap()).is_nan(),
            Dtype::F16 => f16::from_le_bytes(b.try_into().unwrap()).is_nan(),
            _ => bf16::from_le_bytes(b.try_into().unwrap()).is_nan(),
        }
    }

    fn check(from: Dtype, to: Dtype, src: &[u8]) {
        let mut dst = vec![0u8; src.len() / from.size() * to.size()];
        cast(from, to, src, &mut dst).unwrap();
        for (i, (s, d)) in src.chunks(from.size()).zip(dst.chunks(to.size())).enumerate() {
            let want = cast_one_reference(from, to, s);
            if is_nan(from, s) {
                assert!(is_nan(to, d), "{from}->{to} element {i}: NaN lost");
            } else {
                assert_eq!(d, &want[..], "{from}->{to} element {i} of {s:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn every_element_matches_the_reference(bytes in proptest::collection::vec(any::<u8>(), 0..20_000), offset in 0usize..4) {
            for from in FLOATS {
                for to in FLOATS {
                    // An odd offset exercises the unaligned path.
                    let src = &bytes[offset.min(bytes.len())..];
                    let n = src.len() / from.size();
                    check(from, to, &src[..n * from.size()]);
                }
            }
        }
    }

    #[test]
    fn specials_are_kept() {
        let vals =
            [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 65504.0, 65520.0, 1e-8, -3.0e38];
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        check(Dtype::F32, Dtype::F16, &src);
        check(Dtype::F32, Dtype::BF16, &src);
        let mut dst = vec![0u8; vals.len() * 2];
        cast(Dtype::F32, Dtype::F16, &src, &mut dst).unwrap();
        let h: Vec<f16> = dst.chunks(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
        assert!(h[4].is_nan() && h[2].is_infinite() && h[6].is_infinite() && h[1].is_sign_negative());
    }

    proptest! {
        /// The F16C paths give the portable routine's bits for every input, NaNs included (the
        /// GPU kernels and FastChat's dequantization are checked against those bits).
        #[test]
        fn to_f16_is_bit_exact_with_the_portable_routine(words in proptest::collection::vec(any::<u32>(), 0..300), nan_every in 1usize..40) {
            let f: Vec<f32> = words.iter().enumerate()
                .map(|(i, &w)| if i % nan_every == 0 { f32::from_bits(w | 0x7F80_0001) } else { f32::from_bits(w) })
                .collect();
            let mut got = vec![0u16; f.len()];
            f32_to_f16_bits(&f, &mut got);
            for (i, (&x, &h)) in f.iter().zip(&got).enumerate() {
                prop_assert_eq!(h, f16_bits_from_f32(x), "f32 element {} ({:#x})", i, x.to_bits());
            }
            let b: Vec<u8> = words.iter().flat_map(|&w| ((w >> 16) as u16).to_le_bytes()).collect();
            let mut out = vec![0u8; b.len()];
            cast(Dtype::BF16, Dtype::F16, &b, &mut out).unwrap();
            for (i, (src, dst)) in b.chunks(2).zip(out.chunks(2)).enumerate() {
                let want = f16_bits_from_f32(f32::from_bits((u16::from_le_bytes([src[0], src[1]]) as u32) << 16));
                prop_assert_eq!(u16::from_le_bytes([dst[0], dst[1]]), want, "bf16 element {}", i);
            }
        }
    }

    /// Every f16, NaNs included, widens to the portable routine's bits on every path.
    #[test]
    fn every_f16_widens_to_the_portable_routines_bits() {
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        let mut out = vec![0u8; all.len() * 2];
        cast(Dtype::F16, Dtype::F32, &all, &mut out).unwrap();
        for (h, got) in (0..=u16::MAX).zip(out.chunks(4)) {
            let got = u32::from_le_bytes(got.try_into().unwrap());
            assert_eq!(got, f16_bits_to_f32(h).to_bits(), "f16 {h:#06x}");
        }
    }

    #[test]
    fn integers_are_refused() {
        assert!(cast(Dtype::I64, Dtype::F32, &[0; 8], &mut [0; 4]).is_err());
    }
}

//! The `q8` lossy delta codec: `target - base` as int8 codes, one f32 scale per group of
//! [`DELTA_Q8_GROUP`] consecutive elements (the arithmetic is defined in the parent module's doc,
//! *Lossy codecs*), encoded whole and decoded by element range.

use std::ops::Range;

use rayon::prelude::*;

use super::bitdelta::BITDELTA_BLOCK;
use super::float::Float;
use crate::format::Dtype;

/// Elements per `q8` group: 128, as in common int8/int4 weight formats; the f32 scale costs
/// 4 / 128 = 3 % over the 8-bit codes, and a smaller group tracks the delta's scale more closely
/// (which bounds the error: `scale / 2` per element).
pub const DELTA_Q8_GROUP: usize = 128;

/// The `q8` groups that hold elements `elems`: the `scales` a [`decode_q8_range`] of `elems`
/// needs are `scales[q8_groups(&elems)]`.
pub fn q8_groups(elems: &Range<usize>) -> Range<usize> {
    if elems.is_empty() {
        return 0..0;
    }
    elems.start / DELTA_Q8_GROUP..(elems.end - 1) / DELTA_Q8_GROUP + 1
}

fn encode_q8_t<T: Float>(target: &[u8], base: &[u8]) -> (Vec<i8>, Vec<f32>) {
    let n = target.len() / T::N;
    let mut q = vec![0i8; n];
    let mut scales = vec![0f32; n.div_ceil(DELTA_Q8_GROUP)];
    let g_bytes = DELTA_Q8_GROUP * T::N;
    q.par_chunks_mut(DELTA_Q8_GROUP)
        .zip(scales.par_iter_mut())
        .zip(target.par_chunks(g_bytes).zip(base.par_chunks(g_bytes)))
        .with_min_len(256)
        .for_each(|((q, scale), (t, b))| {
            let mut d = [0f32; DELTA_Q8_GROUP];
            let mut amax = 0f32;
            for (i, d) in d.iter_mut().enumerate().take(q.len()) {
                *d = T::get(&t[i * T::N..]) - T::get(&b[i * T::N..]);
                if d.is_finite() {
                    amax = amax.max(d.abs());
                }
            }
            let s = amax / 127.0;
            *scale = s;
            if s > 0.0 {
                for (q, d) in q.iter_mut().zip(d.iter()) {
                    // `as i8` saturates and sends NaN to 0.
                    *q = (d / s).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
            }
        });
    (q, scales)
}

/// Encode `target - base` as `q8`: one `i8` code per element and one f32 scale per group of
/// [`DELTA_Q8_GROUP`] consecutive elements (row-major; the last group shorter). See the module
/// doc for the arithmetic.
///
/// # Panics
/// If `dtype` is not F16, BF16 or F32, or the buffers are not the same whole number of elements.
pub fn encode_q8(target: &[u8], base: &[u8], dtype: Dtype) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(target.len(), base.len(), "base and target lengths differ");
    assert!(target.len() % dtype.size() == 0, "not a whole number of elements");
    with_float!(dtype, T => encode_q8_t::<T>(target, base))
}

// Always inlined: in the AVX2 copy below, a call would run this SSE2 code (it did: the
// profile showed `decode_q8_t` itself, in xmm registers, at 60 % of a q8 delta's fill).
#[inline(always)]
fn decode_q8_t<T: Float>(q: &[i8], scales: &[f32], base: &[u8], elems: Range<usize>, out: &mut [u8]) {
    let g0 = elems.start / DELTA_Q8_GROUP;
    let mut i = elems.start;
    while i < elems.end {
        let g = i / DELTA_Q8_GROUP;
        let seg_end = ((g + 1) * DELTA_Q8_GROUP).min(elems.end);
        let s = scales[g - g0];
        let j0 = i - elems.start;
        let len = seg_end - i;
        let qs = &q[j0..j0 + len];
        let bs = &base[j0 * T::N..(j0 + len) * T::N];
        let os = &mut out[j0 * T::N..(j0 + len) * T::N];
        let whole = len / BITDELTA_BLOCK * BITDELTA_BLOCK;
        for ((q, b), o) in qs[..whole]
            .chunks_exact(BITDELTA_BLOCK)
            .zip(bs.chunks_exact(BITDELTA_BLOCK * T::N))
            .zip(os.chunks_exact_mut(BITDELTA_BLOCK * T::N))
        {
            q8_block::<T>(q, s, b, o);
        }
        for ((&q, b), o) in qs[whole..]
            .iter()
            .zip(bs[whole * T::N..].chunks_exact(T::N))
            .zip(os[whole * T::N..].chunks_exact_mut(T::N))
        {
            T::put(T::get(b) + q as f32 * s, o);
        }
        i = seg_end;
    }
}

/// The same bits as `T::put(T::get(b) + q as f32 * s)` for each of [`BITDELTA_BLOCK`] elements,
/// written so that the compiler vectorizes it (`half`'s conversions one at a time do not): the
/// sum is rounded by the branch-free conversions of `Float::narrow_block`, and a block holding a
/// NaN (never, in real weights; NaN payloads are where those conversions and `half`'s may
/// differ) is redone one element at a time.
#[inline(always)]
fn q8_block<T: Float>(q: &[i8], s: f32, base: &[u8], out: &mut [u8]) {
    let (q, base, out) =
        (&q[..BITDELTA_BLOCK], &base[..BITDELTA_BLOCK * T::N], &mut out[..BITDELTA_BLOCK * T::N]);
    let mut v = [0f32; BITDELTA_BLOCK];
    for (i, v) in v.iter_mut().enumerate() {
        *v = T::widen(&base[i * T::N..(i + 1) * T::N]) + q[i] as f32 * s;
    }
    if v.iter().fold(false, |any, x| any | x.is_nan()) {
        for ((&q, b), o) in q.iter().zip(base.chunks_exact(T::N)).zip(out.chunks_exact_mut(T::N)) {
            T::put(T::get(b) + q as f32 * s, o);
        }
        return;
    }
    T::narrow_block(&v, out);
}

/// [`decode_q8_t`] compiled for AVX2 (8 lanes instead of SSE2's 4), picked at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_q8_avx2<T: Float>(
    q: &[i8],
    scales: &[f32],
    base: &[u8],
    elems: Range<usize>,
    out: &mut [u8],
) {
    decode_q8_t::<T>(q, scales, base, elems, out)
}

/// Decode `elems` with AVX2 where the CPU has it.
fn decode_q8_serial<T: Float>(q: &[i8], scales: &[f32], base: &[u8], elems: Range<usize>, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the function only requires AVX2, just checked.
        return unsafe { decode_q8_avx2::<T>(q, scales, base, elems, out) };
    }
    decode_q8_t::<T>(q, scales, base, elems, out)
}

/// Decode elements `elems` (tensor element indices) of a `q8` delta into `out`.
///
/// Slicing contract: element-wise inputs cover exactly `elems`, per-group inputs exactly the
/// groups that touch it:
/// * `q`: the codes of `elems` (`q_all[elems]`), `elems.len()` of them;
/// * `scales`: the scales of groups [`q8_groups`]`(&elems)` (`scales_all[q8_groups(&elems)]`);
/// * `base`: the base's bytes of `elems`, `elems.len() × dtype.size()`;
/// * `out`: `elems.len() × dtype.size()` bytes.
///
/// # Panics
/// If `dtype` is not F16, BF16 or F32 or a slice does not match the contract.
pub fn decode_q8_range(
    q: &[i8],
    scales: &[f32],
    base: &[u8],
    dtype: Dtype,
    elems: Range<usize>,
    out: &mut [u8],
) {
    let e = dtype.size();
    assert_eq!(q.len(), elems.len(), "q must hold the codes of exactly `elems`");
    assert_eq!(scales.len(), q8_groups(&elems).len(), "scales must cover exactly the groups of `elems`");
    assert_eq!(base.len(), elems.len() * e, "base must hold exactly `elems`");
    assert_eq!(out.len(), elems.len() * e, "out must hold exactly `elems`");
    with_float!(dtype, T => decode_q8_serial::<T>(q, scales, base, elems, out))
}

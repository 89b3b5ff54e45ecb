//! AVX2 intrinsics for the two loops that dominate GGUF fills, where LLVM's autovectorizer
//! left the portable lanes code at 128 bits with shuffles and spills (perf on a 2-core fill:
//! `make_qkx2_quants`' search was 84% of a Q4_K_M fill, Q8_0's block 57% of its fill).
//!
//! Each function does the f32 operations of its portable twin (`kquants::qkx2_search_x8`,
//! `legacy::quantize_q8_0_lanes`) lane for lane and in the same order: separate multiplies and
//! adds (AVX2 has no FMA; the `fma` feature is never enabled), the same comparisons with the
//! same NaN outcomes (`_CMP_*_OQ` is false on NaN, as Rust's `<`/`>` are), so the bytes are
//! ggml's. The tests compare them with the scalar references on every element.
//!
//! Every function here is `unsafe` only because it needs AVX2: each caller checks
//! `is_x86_feature_detected!("avx2")` first (with a SAFETY line), and the loads and stores take
//! fixed-size arrays, so none can leave its slice.

use std::arch::x86_64::*;

use super::block::{BlockQ8_0, F16Bits};
use super::float::fp32_to_fp16;
use super::kquants::SUB;

/// ggml's `nearest_int` on 8 lanes: the 1.5 * 2^23 magic number, then the mantissa bits.
#[inline(always)]
unsafe fn nearest_int(v: __m256) -> __m256i {
    let val = _mm256_add_ps(v, _mm256_set1_ps(12582912.0));
    _mm256_sub_epi32(
        _mm256_and_si256(_mm256_castps_si256(val), _mm256_set1_epi32(0x007f_ffff)),
        _mm256_set1_epi32(0x0040_0000),
    )
}

/// `nearest_int(iscale * (x - min)).clamp(0, nmax) as f32`.
#[inline(always)]
unsafe fn code(iscale: __m256, x: __m256, min: __m256, nmax: __m256i) -> __m256 {
    let l = nearest_int(_mm256_mul_ps(iscale, _mm256_sub_ps(x, min)));
    _mm256_cvtepi32_ps(_mm256_min_epi32(_mm256_max_epi32(l, _mm256_setzero_si256()), nmax))
}

#[inline(always)]
unsafe fn load(a: &[f32; SUB]) -> __m256 {
    _mm256_loadu_ps(a.as_ptr())
}

#[inline(always)]
unsafe fn store(a: &mut [f32; SUB], v: __m256) {
    _mm256_storeu_ps(a.as_mut_ptr(), v)
}

/// `kquants::qkx2_search_x8` in AVX2: one `__m256` is the 8 lanes (sub-blocks).
///
/// # Safety
/// The CPU must have AVX2.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn qkx2_search_x8(
    nmax: i32,
    xt: &[[f32; SUB]; 32],
    wt: &[[f32; SUB]; 32],
    sum_w: &[f32; SUB],
    sum_x: &[f32; SUB],
    iscale0: &[f32; SUB],
    scale_io: &mut [f32; SUB],
    min_io: &mut [f32; SUB],
    max: &[f32; SUB],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    best_l: &mut [[f32; SUB]; 32],
) {
    let nmaxf = nmax as f32;
    let nmax_i = _mm256_set1_epi32(nmax);
    let zero = _mm256_setzero_ps();
    let (sum_w, sum_x, max) = (load(sum_w), load(sum_x), load(max));
    let mut scale = load(scale_io);
    let mut min = load(min_io);
    let iscale = load(iscale0);
    let mut best_error = zero;
    for i in 0..32 {
        let x = load(&xt[i]);
        let lf = code(iscale, x, min, nmax_i);
        store(&mut best_l[i], lf);
        let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, lf), min), x);
        best_error = _mm256_add_ps(best_error, _mm256_mul_ps(load(&wt[i]), _mm256_mul_ps(diff, diff)));
    }
    let mut laux = [[0.0f32; SUB]; 32];
    for is in 0..=nstep {
        let num = rmin + rdelta * is as f32 + nmaxf;
        // (max - min) with the min of the best candidate so far, as in ggml.
        let iscale = _mm256_div_ps(_mm256_set1_ps(num), _mm256_sub_ps(max, min));
        let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
        for i in 0..32 {
            let x = load(&xt[i]);
            let lf = code(iscale, x, min, nmax_i);
            store(&mut laux[i], lf);
            let wl = _mm256_mul_ps(load(&wt[i]), lf);
            sum_l = _mm256_add_ps(sum_l, wl);
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, lf));
            sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, x));
        }
        let d = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
        let ok = _mm256_cmp_ps::<_CMP_GT_OQ>(d, zero);
        let mut this_scale =
            _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)), d);
        let mut this_min =
            _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)), d);
        let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(this_min, zero);
        this_min = _mm256_blendv_ps(this_min, zero, positive);
        this_scale = _mm256_blendv_ps(this_scale, _mm256_div_ps(sum_xl, sum_l2), positive);
        let mut cur_error = zero;
        for i in 0..32 {
            let diff = _mm256_sub_ps(
                _mm256_add_ps(_mm256_mul_ps(this_scale, load(&laux[i])), this_min),
                load(&xt[i]),
            );
            cur_error = _mm256_add_ps(cur_error, _mm256_mul_ps(load(&wt[i]), _mm256_mul_ps(diff, diff)));
        }
        let better = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LT_OQ>(cur_error, best_error));
        best_error = _mm256_blendv_ps(best_error, cur_error, better);
        scale = _mm256_blendv_ps(scale, this_scale, better);
        min = _mm256_blendv_ps(min, this_min, better);
        for i in 0..32 {
            let kept = _mm256_blendv_ps(load(&best_l[i]), load(&laux[i]), better);
            store(&mut best_l[i], kept);
        }
    }
    store(scale_io, scale);
    store(min_io, min);
}

/// `legacy::quantize_q8_0_lanes` in AVX2 for a block without NaN (the caller checks): the
/// largest |x| by `maxps` over 8 lanes, then `(int8_t)roundf(x * id)` on 8 lanes at a time.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_q8_0(x: &[f32; 32], y: &mut BlockQ8_0) -> bool {
    quantize_q8_0_v(std::array::from_fn(|i| _mm256_loadu_ps(x[8 * i..].as_ptr())), y)
}

/// [`quantize_q8_0`] of 32 bf16 values (little-endian bytes), widened to f32 in registers (a
/// bf16 is the top half of its f32, so the widening is exact: torch's `.to(float32)`).
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_q8_0_bf16(x: &[u8; 64], y: &mut BlockQ8_0) -> bool {
    quantize_q8_0_v(
        std::array::from_fn(|i| {
            let h = _mm_loadu_si128(x[16 * i..].as_ptr().cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }),
        y,
    )
}

/// The body of [`quantize_q8_0`] on the block's 32 values in 4 registers. With AVX2 enabled
/// on it, not only `#[inline(always)]`: the closures below are functions of their own, which
/// get the intrinsics inlined only where they inherit the feature (without, the bf16 fill ran
/// every intrinsic as a call, 5x slower).
///
/// # Safety
/// The CPU must have AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_0_v(v: [__m256; 4], y: &mut BlockQ8_0) -> bool {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let a: [__m256; 4] = std::array::from_fn(|i| _mm256_and_ps(v[i], abs));
    // A sum of magnitudes is NaN only if one of them is (inf + inf is inf).
    let sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(sum, sum)) != 0 {
        return false;
    }
    // maxps(m, a) = m > a ? m : a, ggml's MAX(amax, fabsf(x)); without NaN the largest value
    // does not depend on the order.
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    // The largest lane, in registers (halves, then pairs, then neighbours): the magnitudes are
    // all +0.0 or more, so it is the chain's `amax` from 0.0 whichever order it is taken in.
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
    let amax = _mm_cvtss_f32(m);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = F16Bits::from_bits(fp32_to_fp16(d));
    let idv = _mm256_set1_ps(id);
    let r: [__m256i; 4] = std::array::from_fn(|i| {
        let x0 = _mm256_mul_ps(v[i], idv);
        // float::c_roundf_to_i32: cvttps2dq (0x80000000 for NaN and out of range, as C's cast
        // on x86-64), then a step away from zero where the dropped fraction is at least a half,
        // except for 0x80000000 itself.
        let t = _mm256_cvttps_epi32(x0);
        let frac = _mm256_sub_ps(x0, _mm256_cvtepi32_ps(t));
        let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5)));
        let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, _mm256_set1_ps(-0.5)));
        let stepped = _mm256_add_epi32(_mm256_sub_epi32(t, up), down);
        let special = _mm256_cmpeq_epi32(t, _mm256_set1_epi32(i32::MIN));
        // `as int8_t`: the low byte.
        _mm256_and_si256(_mm256_blendv_epi8(stepped, t, special), _mm256_set1_epi32(0xff))
    });
    // Bytes 0..32 in order: packs interleave 128-bit halves, the permute puts them back.
    let p01 = _mm256_packus_epi32(r[0], r[1]);
    let p23 = _mm256_packus_epi32(r[2], r[3]);
    let bytes =
        _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(y.qs.as_mut_ptr().cast(), bytes);
    true
}

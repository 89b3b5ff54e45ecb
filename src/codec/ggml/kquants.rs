//! The K-quants llama.cpp's Q4_K_M uses (Q4_K, Q5_K, Q6_K): ggml-quants.c's
//! `quantize_row_q{4,5,6}_K_ref` without an importance matrix, with `make_qkx2_quants` and
//! `make_qx_quants` (`rmse_type` 1, no weights), one 256-element super-block per call.
//!
//! Exactness rests on doing each f32 operation ggml does, in its order: no reassociation, no
//! fused multiply-add. ggml-base is compiled with `-O3 -std=gnu11`, which lets GCC contract
//! `a*b + c`, but without `-mfma` (its flags never get `-march`, even with GGML_NATIVE), so an
//! x86-64 libggml has no FMA instruction and rounds every product: as Rust does. (A libggml
//! built for a target with FMA in its baseline, such as aarch64, may contract and differ.)

// The ports keep the C's index loops, so each line can be read against ggml-quants.c.
#![allow(clippy::needless_range_loop)]

use super::block::{BlockQ4K, BlockQ5K, BlockQ6K, F16Bits};
use super::float::{fp16_to_fp32, fp32_to_fp16, nearest_int};
use super::QK_K;

/// ggml's `GROUP_MAX_EPS`.
const GROUP_MAX_EPS: f32 = 1e-15;

/// `get_scale_min_k4` (ggml-quants.c): sub-block j's 6-bit scale and min out of the 12 bytes.
#[inline(always)]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `make_qkx2_quants` for n = 32 with `use_mad` false (the only way the Q4_K/Q5_K refs call it):
/// codes `l` in 0..=nmax and (scale, -min) minimizing the weighted squared error
/// of `scale*l + min` over `nstep+1` candidate scales. Returns (scale, the_min).
#[cfg(test)]
pub(crate) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32; 32],
    weights: &[f32; 32],
    l_out: &mut [u8; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = 32;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        l_out[i] = l.clamp(0, nmax) as u8;
        let diff = scale * l_out[i] as f32 + min - x[i];
        let diff = diff * diff;
        best_error += weights[i] * diff;
    }
    // (ggml returns early here when nstep < 1; the callers pass 15 and 20.)
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = diff * diff;
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                *l_out = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Sub-blocks per super-block in Q4_K/Q5_K: the lanes of `make_qkx2_quants_x8`.
pub(super) const SUB: usize = QK_K / 32;

/// The search of [`make_qkx2_quants_x8`] once its lanes' sums and first scale are known: the
/// codes of the first scale and their error, then `nstep + 1` candidate scales, each lane
/// keeping its best (codes in `best_l` as f32, `scale`, `min`). `super::avx2` has the same
/// function in AVX2 intrinsics, operation for operation.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn qkx2_search_x8(
    nmax: i32,
    xt: &[[f32; SUB]; 32],
    wt: &[[f32; SUB]; 32],
    sum_w: &[f32; SUB],
    sum_x: &[f32; SUB],
    iscale0: &[f32; SUB],
    scale: &mut [f32; SUB],
    min: &mut [f32; SUB],
    max: &[f32; SUB],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    best_l: &mut [[f32; SUB]; 32],
) {
    let nmaxf = nmax as f32;
    let mut iscale = *iscale0;
    // The codes are kept as f32 (small integers, exact) while searching, so the loops stay in
    // vector registers: no packing to bytes and back on each candidate.
    let mut best_error = [0.0f32; SUB];
    for i in 0..32 {
        for j in 0..SUB {
            let lf = nearest_int(iscale[j] * (xt[i][j] - min[j])).clamp(0, nmax) as f32;
            best_l[i][j] = lf;
            let diff = scale[j] * lf + min[j] - xt[i][j];
            best_error[j] += wt[i][j] * (diff * diff);
        }
    }
    let mut laux = [[0.0f32; SUB]; 32];
    for is in 0..=nstep {
        let num = rmin + rdelta * is as f32 + nmaxf;
        for j in 0..SUB {
            // (max - min) with the min of the best candidate so far, as in ggml.
            iscale[j] = num / (max[j] - min[j]);
        }
        let mut sum_l = [0.0f32; SUB];
        let mut sum_l2 = [0.0f32; SUB];
        let mut sum_xl = [0.0f32; SUB];
        for i in 0..32 {
            for j in 0..SUB {
                let lf = nearest_int(iscale[j] * (xt[i][j] - min[j])).clamp(0, nmax) as f32;
                laux[i][j] = lf;
                let w = wt[i][j];
                sum_l[j] += w * lf;
                sum_l2[j] += w * lf * lf;
                sum_xl[j] += w * lf * xt[i][j];
            }
        }
        let mut this_scale = [0.0f32; SUB];
        let mut this_min = [0.0f32; SUB];
        let mut ok = [false; SUB];
        for j in 0..SUB {
            let d = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            ok[j] = d > 0.0;
            this_scale[j] = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / d;
            this_min[j] = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / d;
            if this_min[j] > 0.0 {
                this_min[j] = 0.0;
                this_scale[j] = sum_xl[j] / sum_l2[j];
            }
        }
        // ggml computes the error only where D > 0; computing it everywhere and using it only
        // there is the same (it has no side effects).
        let mut cur_error = [0.0f32; SUB];
        for i in 0..32 {
            for j in 0..SUB {
                let diff = this_scale[j] * laux[i][j] + this_min[j] - xt[i][j];
                cur_error[j] += wt[i][j] * (diff * diff);
            }
        }
        // Each lane takes its candidate or keeps its best by a select, not a branch per lane
        // and a strided copy of its 32 codes.
        let mut better = [false; SUB];
        for j in 0..SUB {
            better[j] = ok[j] && cur_error[j] < best_error[j];
            if better[j] {
                best_error[j] = cur_error[j];
                scale[j] = this_scale[j];
                min[j] = this_min[j];
            }
        }
        for i in 0..32 {
            for j in 0..SUB {
                best_l[i][j] = if better[j] { laux[i][j] } else { best_l[i][j] };
            }
        }
    }
}

/// `make_qkx2_quants` (n = 32, `use_mad` false) on the 8 sub-blocks of a super-block at once:
/// lane j is sub-block j, and every lane does exactly the scalar function's f32 operations in
/// its order (each running sum stays sequential within its lane), so the results are
/// `make_qkx2_quants`'s bit for bit (a test compares them); the lanes only give the CPU
/// independent dependency chains (the scalar search is latency-bound on its sums) and let LLVM
/// use SIMD. `xt[i][j]` is element i of sub-block j; returns (scales, the_mins) and fills `lt`
/// likewise.
#[inline(always)]
fn make_qkx2_quants_x8(
    nmax: i32,
    xt: &[[f32; SUB]; 32],
    wt: &[[f32; SUB]; 32],
    lt: &mut [[u8; SUB]; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> ([f32; SUB], [f32; SUB]) {
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = [0.0f32; SUB];
    for j in 0..SUB {
        sum_x[j] = sum_w[j] * xt[0][j];
    }
    for i in 1..32 {
        for j in 0..SUB {
            let x = xt[i][j];
            if x < min[j] {
                min[j] = x;
            }
            if x > max[j] {
                max[j] = x;
            }
            let w = wt[i][j];
            sum_w[j] += w;
            sum_x[j] += w * x;
        }
    }
    let nmaxf = nmax as f32;
    let mut scale = [0.0f32; SUB];
    let mut iscale = [0.0f32; SUB];
    let mut flat = [false; SUB];
    for j in 0..SUB {
        if min[j] > 0.0 {
            min[j] = 0.0;
        }
        // ggml returns early for such a lane (codes 0, scale 0); this one runs along on
        // infinities and NaNs, and its results are replaced at the end.
        flat[j] = max[j] == min[j];
        iscale[j] = nmaxf / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }
    let flat_min = min;
    let mut best_l = [[0.0f32; SUB]; 32];
    // Either search, on the same arguments: the AVX2 twin where the CPU has it.
    macro_rules! search {
        ($f:path) => {
            $f(
                nmax,
                xt,
                wt,
                &sum_w,
                &sum_x,
                &iscale,
                &mut scale,
                &mut min,
                &max,
                rmin,
                rdelta,
                nstep,
                &mut best_l,
            )
        };
    }
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    if avx2 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe {
            search!(super::avx2::qkx2_search_x8)
        };
    } else {
        search!(qkx2_search_x8);
    }
    let mut the_min = [0.0f32; SUB];
    for j in 0..SUB {
        if flat[j] {
            scale[j] = 0.0;
            min[j] = flat_min[j];
        }
        the_min[j] = -min[j];
    }
    for i in 0..32 {
        for j in 0..SUB {
            lt[i][j] = if flat[j] { 0 } else { best_l[i][j] as u8 };
        }
    }
    (scale, the_min)
}

/// The part Q4_K and Q5_K share: per sub-block of 32, `make_qkx2_quants` with weights
/// `av_x + |x|`; then the 6-bit scales and mins, d and dmin; then the codes again from the
/// quantized scales. Fills `y`'s d, dmin, scales and returns the 256 codes.
#[inline(always)]
fn qkx_superblock(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    d_out: &mut F16Bits,
    dmin_out: &mut F16Bits,
    scales_out: &mut [u8; 12],
) -> [u8; QK_K] {
    // Transposed: lane j of row i is element i of sub-block j (see make_qkx2_quants_x8).
    let mut xt = [[0.0f32; SUB]; 32];
    for (j, xs) in x.chunks_exact(32).enumerate() {
        for (i, v) in xs.iter().enumerate() {
            xt[i][j] = *v;
        }
    }
    let mut sum_x2 = [0.0f32; SUB];
    for row in &xt {
        for j in 0..SUB {
            sum_x2[j] += row[j] * row[j];
        }
    }
    let mut av_x = [0.0f32; SUB];
    for j in 0..SUB {
        av_x[j] = (sum_x2[j] / 32.0).sqrt();
    }
    let mut wt = [[0.0f32; SUB]; 32];
    for (w, row) in wt.iter_mut().zip(&xt) {
        for j in 0..SUB {
            w[j] = av_x[j] + row[j].abs();
        }
    }
    let mut lt = [[0u8; SUB]; 32];
    let (scales, mins) = make_qkx2_quants_x8(nmax, &xt, &wt, &mut lt, rmin, 0.1, nstep);
    let mut l_all = [0u8; QK_K];
    for (i, row) in lt.iter().enumerate() {
        for j in 0..SUB {
            l_all[32 * j + i] = row[j];
        }
    }
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..SUB {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    for j in 0..QK_K / 32 {
        // `uint8_t ls = nearest_int(...)`: the int's low byte, then MIN(63, ls).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            scales_out[j] = ls;
            scales_out[j + 4] = lm;
        } else {
            scales_out[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            scales_out[j - 4] |= (ls >> 4) << 6;
            scales_out[j] |= (lm >> 4) << 6;
        }
    }
    *d_out = F16Bits::from_bits(fp32_to_fp16(max_scale / 63.0));
    *dmin_out = F16Bits::from_bits(fp32_to_fp16(max_min / 63.0));

    let dd = fp16_to_fp32(d_out.bits());
    let dmin = fp16_to_fp32(dmin_out.bits());
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, scales_out);
        let d = dd * sc as f32;
        if d == 0.0 {
            continue; // keeps make_qkx2_quants' codes, as ggml does
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / d);
            l_all[32 * j + ii] = l.clamp(0, nmax) as u8;
        }
    }
    l_all
}

/// `quantize_row_q4_K_ref`, one super-block.
#[inline(always)]
pub fn quantize_q4_k(x: &[f32; QK_K], y: &mut BlockQ4K) {
    let l = qkx_superblock(x, 15, -1.0, 20, &mut y.d, &mut y.dmin, &mut y.scales);
    for (q, j) in y.qs.chunks_exact_mut(32).zip((0..QK_K).step_by(64)) {
        for i in 0..32 {
            q[i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// `dequantize_row_q4_K`, one super-block.
pub fn dequantize_q4_k(x: &BlockQ4K, y: &mut [f32; QK_K]) {
    let d = fp16_to_fp32(x.d.bits());
    let min = fp16_to_fp32(x.dmin.bits());
    for (n, q) in x.qs.chunks_exact(32).enumerate() {
        let (sc, m) = get_scale_min_k4(2 * n, &x.scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = get_scale_min_k4(2 * n + 1, &x.scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let out = &mut y[64 * n..64 * n + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0xF) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `quantize_row_q5_K_ref`, one super-block.
#[inline(always)]
pub fn quantize_q5_k(x: &[f32; QK_K], y: &mut BlockQ5K) {
    let l = qkx_superblock(x, 31, -0.5, 15, &mut y.d, &mut y.dmin, &mut y.scales);
    y.qh = [0; 32];
    let (mut m1, mut m2) = (1u8, 2u8);
    for (ql, n) in y.qs.chunks_exact_mut(32).zip((0..QK_K).step_by(64)) {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                y.qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                y.qh[j] |= m2;
            }
            ql[j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// `dequantize_row_q5_K`, one super-block.
pub fn dequantize_q5_k(x: &BlockQ5K, y: &mut [f32; QK_K]) {
    let d = fp16_to_fp32(x.d.bits());
    let min = fp16_to_fp32(x.dmin.bits());
    let (mut u1, mut u2) = (1u8, 2u8);
    for (n, ql) in x.qs.chunks_exact(32).enumerate() {
        let (sc, m) = get_scale_min_k4(2 * n, &x.scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = get_scale_min_k4(2 * n + 1, &x.scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let out = &mut y[64 * n..64 * n + 64];
        for l in 0..32 {
            let h1 = if x.qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if x.qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            out[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// `make_qx_quants(16, 32, x, L, rmse_type = 1, qw = NULL)`: signed codes stored as l + 32 and
/// the scale among 19 candidates that maximizes sumlx²/suml2 with weights x².
#[cfg(test)]
pub(crate) fn make_qx_quants_q6(x: &[f32; 16], l_out: &mut [i8; 16]) -> f32 {
    const NMAX: i32 = 32;
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let mut iscale = -(NMAX as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..16 {
        let l = nearest_int(iscale * x[i]).clamp(-NMAX, NMAX - 1);
        l_out[i] = (l + NMAX) as i8;
        let w = x[i] * x[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(NMAX as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        let mut ls = [0i8; 16];
        for i in 0..16 {
            let l = nearest_int(iscale * x[i]).clamp(-NMAX, NMAX - 1);
            ls[i] = (l + NMAX) as i8;
            let w = x[i] * x[i];
            let lf = l as f32;
            sumlx += w * x[i] * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            // ggml recomputes the codes with the same iscale: the same values as `ls`.
            *l_out = ls;
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Sub-blocks per super-block in Q6_K: the lanes of `make_qx_quants_q6_x16`.
const SUB6: usize = QK_K / 16;

/// `make_qx_quants_q6` on the 16 sub-blocks of a Q6_K super-block at once, lane j being
/// sub-block j, each lane doing the scalar function's operations in its order (bit for bit the
/// same; a test compares them). `xt[i][j]` is element i of sub-block j.
#[inline(always)]
fn make_qx_quants_q6_x16(xt: &[[f32; SUB6]; 16], lt: &mut [[i8; SUB6]; 16]) -> [f32; SUB6] {
    const NMAX: i32 = 32;
    let mut max = [0.0f32; SUB6];
    let mut amax = [0.0f32; SUB6];
    for row in xt {
        for j in 0..SUB6 {
            let ax = row[j].abs();
            if ax > amax[j] {
                amax[j] = ax;
                max[j] = row[j];
            }
        }
    }
    let mut iscale = [0.0f32; SUB6];
    for j in 0..SUB6 {
        iscale[j] = -(NMAX as f32) / max[j];
    }
    // Codes as f32 while searching (exact small integers), as in make_qkx2_quants_x8.
    let mut best_l = [[0.0f32; SUB6]; 16];
    let mut sumlx = [0.0f32; SUB6];
    let mut suml2 = [0.0f32; SUB6];
    for i in 0..16 {
        for j in 0..SUB6 {
            let x = xt[i][j];
            let lf = nearest_int(iscale[j] * x).clamp(-NMAX, NMAX - 1) as f32;
            best_l[i][j] = lf;
            let w = x * x;
            sumlx[j] += w * x * lf;
            suml2[j] += w * lf * lf;
        }
    }
    let mut scale = [0.0f32; SUB6];
    let mut best = [0.0f32; SUB6];
    for j in 0..SUB6 {
        scale[j] = if suml2[j] != 0.0 { sumlx[j] / suml2[j] } else { 0.0 };
        best[j] = scale[j] * sumlx[j];
    }
    let mut ls = [[0.0f32; SUB6]; 16];
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let num = -(NMAX as f32 + 0.1 * is as f32);
        for j in 0..SUB6 {
            iscale[j] = num / max[j];
        }
        let mut sumlx = [0.0f32; SUB6];
        let mut suml2 = [0.0f32; SUB6];
        for i in 0..16 {
            for j in 0..SUB6 {
                let x = xt[i][j];
                let lf = nearest_int(iscale[j] * x).clamp(-NMAX, NMAX - 1) as f32;
                ls[i][j] = lf;
                let w = x * x;
                sumlx[j] += w * x * lf;
                suml2[j] += w * lf * lf;
            }
        }
        let mut better = [false; SUB6];
        for j in 0..SUB6 {
            better[j] = suml2[j] > 0.0 && sumlx[j] * sumlx[j] > best[j] * suml2[j];
            if better[j] {
                scale[j] = sumlx[j] / suml2[j];
                best[j] = scale[j] * sumlx[j];
            }
        }
        for i in 0..16 {
            for j in 0..SUB6 {
                best_l[i][j] = if better[j] { ls[i][j] } else { best_l[i][j] };
            }
        }
    }
    for i in 0..16 {
        for j in 0..SUB6 {
            lt[i][j] = (best_l[i][j] as i32 + NMAX) as i8;
        }
    }
    for j in 0..SUB6 {
        // ggml's early return for an all-zero sub-block: codes 0, scale 0.
        if amax[j] < GROUP_MAX_EPS {
            for row in lt.iter_mut() {
                row[j] = 0;
            }
            scale[j] = 0.0;
        }
    }
    scale
}

/// `quantize_row_q6_K_ref`, one super-block.
#[inline(always)]
pub fn quantize_q6_k(x: &[f32; QK_K], y: &mut BlockQ6K) {
    let mut xt = [[0.0f32; SUB6]; 16];
    for (j, xs) in x.chunks_exact(16).enumerate() {
        for (i, v) in xs.iter().enumerate() {
            xt[i][j] = *v;
        }
    }
    let mut lt = [[0i8; SUB6]; 16];
    let scales = make_qx_quants_q6_x16(&xt, &mut lt);
    let mut l_all = [0i8; QK_K];
    for (i, row) in lt.iter().enumerate() {
        for (j, l) in row.iter().enumerate() {
            l_all[16 * j + i] = *l;
        }
    }
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &scale in &scales {
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }

    if max_abs_scale < GROUP_MAX_EPS {
        *y = bytemuck::Zeroable::zeroed();
        y.d = F16Bits::from_bits(fp32_to_fp16(0.0));
        return;
    }

    let iscale = -128.0 / max_scale;
    y.d = F16Bits::from_bits(fp32_to_fp16(1.0 / iscale));
    for ib in 0..QK_K / 16 {
        // MIN(127, nearest_int(...)) stored in an int8_t: the low byte.
        y.scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }

    let dd = fp16_to_fp32(y.d.bits());
    for j in 0..QK_K / 16 {
        let d = dd * y.scales[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l_all[16 * j + ii] = (l + 32) as i8;
        }
    }

    let l = bytemuck::cast_ref::<[i8; QK_K], [u8; QK_K]>(&l_all);
    for half in 0..2 {
        let j = 128 * half;
        let ql = &mut y.ql[64 * half..64 * half + 64];
        let qh = &mut y.qh[32 * half..32 * half + 32];
        for i in 0..32 {
            let q1 = l[j + i] & 0xF;
            let q2 = l[j + i + 32] & 0xF;
            let q3 = l[j + i + 64] & 0xF;
            let q4 = l[j + i + 96] & 0xF;
            ql[i] = q1 | (q3 << 4);
            ql[i + 32] = q2 | (q4 << 4);
            qh[i] = (l[j + i] >> 4)
                | ((l[j + i + 32] >> 4) << 2)
                | ((l[j + i + 64] >> 4) << 4)
                | ((l[j + i + 96] >> 4) << 6);
        }
    }
}

/// `dequantize_row_q6_K`, one super-block.
pub fn dequantize_q6_k(x: &BlockQ6K, y: &mut [f32; QK_K]) {
    let d = fp16_to_fp32(x.d.bits());
    for half in 0..2 {
        let ql = &x.ql[64 * half..64 * half + 64];
        let qh = &x.qh[32 * half..32 * half + 32];
        let sc = &x.scales[8 * half..8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            out[l] = d * sc[is] as f32 * q1 as f32;
            out[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
            out[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
            out[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests;

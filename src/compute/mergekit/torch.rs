//! torch's CPU float arithmetic, replayed bit for bit: rounding to bf16/f16 after each op
//! (`.to(dtype)`), python scalars entering an op, `addcmul_` as a fused multiply-add, and the
//! whole-tensor reductions (ATen's cascade `sum`, its two-pass parallel split above 32768
//! elements, `vector_norm`). Every method's file builds on these; nothing here knows a method.

use half::f16;

use crate::format::Dtype;

/// Round an f32 to the nearest value of `dtype` (ties to even), as torch's `.to(dtype)`.
#[inline(always)]
pub fn round(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::BF16 => round_bf16(x),
        Dtype::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// `bf16::from_f32(x).to_f32()` (half's rounding: to nearest even, a NaN made quiet) in plain
/// integer arithmetic the compiler inlines and vectorizes: the merge kernels round after every
/// operation, and a call per rounding was most of a linear merge's time.
#[inline(always)]
pub(super) fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return f32::from_bits((b | 0x0040_0000) & 0xffff_0000);
    }
    let up = (b & 0x8000 != 0) && (b & 0x1_7fff != 0);
    f32::from_bits(((b >> 16) + up as u32) << 16)
}

/// `out[i] = p[i] * w + out[i]` with one rounding (fused), as torch's `addcmul_` on f32: by the
/// CPU's FMA instruction where it has one (the portable `mul_add` is a library call without
/// the target feature, several times slower), else `mul_add`. The same bits either way.
pub(super) fn fma_accumulate(out: &mut [f32], p: &[f32], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2") {
        // 256-bit vectors too (FMA alone compiles to 128-bit ones).
        #[target_feature(enable = "avx2,fma")]
        fn fused(out: &mut [f32], p: &[f32], w: f32) {
            for (o, &x) in out.iter_mut().zip(p) {
                *o = x.mul_add(w, *o);
            }
        }
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { fused(out, p, w) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "fma")]
        fn fused(out: &mut [f32], p: &[f32], w: f32) {
            for (o, &x) in out.iter_mut().zip(p) {
                *o = x.mul_add(w, *o);
            }
        }
        // SAFETY: the CPU has FMA (checked just above).
        return unsafe { fused(out, p, w) };
    }
    for (o, &x) in out.iter_mut().zip(p) {
        *o = x.mul_add(w, *o);
    }
}

/// A python float entering a torch op on a `dtype` tensor (`torch.tensor([w], dtype=...)`,
/// c10's Half/BFloat16 constructors take a float: f64 → f32 → dtype, two roundings).
#[inline]
pub fn scalar(dtype: Dtype, x: f64) -> f32 {
    round(dtype, x as f32)
}

/// torch's CPU sum of a contiguous f32 row (ATen `SumKernel.cpp`: `vectorized_inner_sum`,
/// `row_sum`, `multi_row_sum`): 8-lane vectors, 4 vector accumulators, a 4-level cascade, the
/// scalar tail summed first, then the lanes in order. Matches torch 2.x's AVX2/AVX512 builds on
/// rows it reduces on one thread; bf16/f16 rows are summed as f32 (their accumulation type).
#[allow(clippy::needless_range_loop)] // the loops mirror ATen's, index for index
pub fn torch_sum(x: &[f32]) -> f32 {
    const V: usize = 8;
    const ILP: usize = 4;
    let vec_size = x.len() / V;
    let size_ilp = vec_size / ILP;
    let mut ps = multi_row_sum(&x[..size_ilp * ILP * V], size_ilp);
    for i in size_ilp * ILP..vec_size {
        for l in 0..V {
            ps[l] += x[i * V + l];
        }
    }
    for k in 1..ILP {
        for l in 0..V {
            ps[l] += ps[k * V + l];
        }
    }
    let mut acc = 0f32;
    for &v in &x[vec_size * V..] {
        acc += v;
    }
    for &p in &ps[..V] {
        acc += p;
    }
    acc
}

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// `multi_row_sum` over `size` rows of 32 lanes (4 accumulators × 8 lanes).
#[allow(clippy::needless_range_loop)] // the loops mirror ATen's, index for index
fn multi_row_sum(x: &[f32], size: usize) -> [f32; 32] {
    const LEVELS: usize = 4;
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[0f32; 32]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..32 {
                acc[0][k] += x[i * 32 + k];
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..32 {
                acc[j][k] += acc[j - 1][k];
                acc[j - 1][k] = 0.0;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..32 {
            acc[0][k] += x[i * 32 + k];
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..32 {
            acc[0][k] += acc[j][k];
        }
    }
    acc[0]
}

/// torch's CPU `vector_norm` (p = 2) of a contiguous row: squares accumulated in 8 f32 lanes,
/// the lanes then the tail added in order, `sqrt`. Rounded to `dtype` for bf16/f16 tensors.
#[allow(clippy::needless_range_loop)]
pub(super) fn norm(dtype: Dtype, x: &[f32]) -> f32 {
    const V: usize = 8;
    let n = x.len() / V * V;
    let mut lanes = [0f32; V];
    for c in x[..n].chunks_exact(V) {
        for l in 0..V {
            lanes[l] += c[l] * c[l];
        }
    }
    let mut s = 0f32;
    for &v in &lanes {
        s += v;
    }
    for &v in &x[n..] {
        s += v * v;
    }
    round(dtype, s.sqrt())
}

/// torch's `GRAIN_SIZE`: reductions over fewer elements run on one thread.
const GRAIN: usize = 32768;

/// A sum over a tensor of `dtype` values as torch computes it with `threads` intra-op threads
/// (`TensorIteratorBase::parallel_reduce`: below `GRAIN` or on one thread, one cascade sum;
/// else `two_pass_reduction`: `at::parallel_for`'s chunks of `max(GRAIN, ceil(n / threads))`
/// elements, each summed into a buffer of the output dtype, the buffers then added in order).
pub(super) fn sum(dtype: Dtype, x: &[f32], threads: usize) -> f32 {
    let n = x.len();
    if n < GRAIN || threads <= 1 {
        return round(dtype, torch_sum(x));
    }
    let chunk = GRAIN.max(n.div_ceil(threads));
    let mut dst = 0f32;
    for c in x.chunks(chunk) {
        dst = round(dtype, dst + round(dtype, torch_sum(c)));
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn round_bf16_is_halfs_rounding_on_every_pattern_class() {
        // Every 4099th bit pattern (all exponents, both signs, NaN payloads, subnormals), and
        // every pattern around the rounding bits of a few values (ties, just below and above).
        let strided = (0..=u32::MAX / 4099).map(|i| i * 4099);
        let near = [0x3f80_0000u32, 0x0001_0000, 0x7f7f_0000, 0xff80_0000, 0x7f80_0001]
            .into_iter()
            .flat_map(|b| (0..0x2_0000u32).map(move |k| b.wrapping_add(k).wrapping_sub(0x1_0000)));
        for b in strided.chain(near) {
            let x = f32::from_bits(b);
            let want = bf16::from_f32(x).to_f32().to_bits();
            assert_eq!(round_bf16(x).to_bits(), want, "bits {b:#010x}");
        }
    }

    #[test]
    fn fma_accumulate_is_mul_add() {
        let p: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let mut got: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: Vec<f32> = got.iter().zip(&p).map(|(&o, &x)| x.mul_add(0.3, o)).collect();
        fma_accumulate(&mut got, &p, 0.3);
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn sums_split_like_torch_above_its_grain() {
        // Below 32768 elements, one cascade sum; above, per-thread partials rounded to the dtype.
        let x: Vec<f32> = (0..70_000).map(|i| round(Dtype::BF16, 1.0 + (i % 7) as f32 / 64.0)).collect();
        let one = sum(Dtype::BF16, &x, 1);
        let two = sum(Dtype::BF16, &x, 2);
        let (a, b) = x.split_at(35_000);
        assert_eq!(
            two,
            round(Dtype::BF16, round(Dtype::BF16, torch_sum(a)) + round(Dtype::BF16, torch_sum(b)))
        );
        assert_eq!(one, round(Dtype::BF16, torch_sum(&x)));
        assert_eq!(sum(Dtype::F32, &x[..1000], 8), torch_sum(&x[..1000]));
    }
}

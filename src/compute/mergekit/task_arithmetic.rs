//! Generalized task arithmetic's mix (`generalized_task_arithmetic.py`): each parent's delta
//! from the base, sparsified ([`super::sparsify`]) and weighted, then TIES's sign consensus and
//! disjoint mean (or a plain sum), normalize, lambda, added back to the base. Task arithmetic,
//! TIES, DARE, breadcrumbs and DELLA are rows of this one kernel.
//!
//! The range is mixed a block of [`BLOCK`] elements at a time: each parent's weighted delta for
//! the block goes into a small buffer that stays in L1, and every step (delta, mask, weight, sum,
//! sign vote, disjoint mean) is one branch-free pass over it that the compiler vectorizes, with
//! torch's f32 operations in torch's order (per element, the same operations as mergekit's
//! tensor passes: `apply_gta_reference` in the tests is the per-element transcription they are
//! checked against). The magnitude cut-off's tied elements (the few equal to the cut that
//! torch's sort put before it) are restored by a walk over the sorted tie list, not a search
//! per element.

use half::f16;

use super::sparsify::{stream_key, work_dtype};
use super::torch::round_bf16;
use super::{round, scalar, Gta, Keep, KernelError, ParentStats, Sparsify, Stats, TensorMerge};
use crate::format::Dtype;

/// Elements mixed per block: 3 parents' weighted deltas and the block's sums take about 12 KiB,
/// well inside L1, and a block is long enough for the per-block setup to be noise.
const BLOCK: usize = 512;

impl TensorMerge {
    pub(super) fn apply_gta(
        &self,
        g: &Gta,
        stats: &Stats,
        parents: &[&[f32]],
        start: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        // generalized_task_arithmetic.py l.96-150.
        let b = self.base.ok_or_else(|| KernelError::Invalid("task arithmetic needs a base".into()))?;
        let others = self.non_base(parents.len());
        let all = ParentStats { keep: Keep::All, factor: None };
        let mut per = Vec::with_capacity(others.len());
        for k in 0..others.len() {
            per.push(match stats {
                Stats::Gta(v) => v
                    .get(k)
                    .ok_or_else(|| KernelError::Invalid("apply: statistics for fewer parents".into()))?,
                _ if !self.needs_stats() => &all,
                _ => return Err(KernelError::Invalid("apply: statistics of another method".into())),
            });
        }
        let inputs: Vec<&[f32]> = others.iter().map(|&j| parents[j]).collect();
        let mix = Mix { merge: self, g, per: &per, inputs: &inputs, base: parents[b], start };
        // One instance of the loops per compute dtype, so the rounding inlines into them.
        match self.dtype {
            Dtype::BF16 => mix.run_best(round_bf16, out),
            Dtype::F16 => mix.run_best(|x| f16::from_f32(x).to_f32(), out),
            _ => mix.run_best(|x| x, out),
        }
        Ok(())
    }
}

/// The divisor of normalize where no sign vote masks the weights: their sum in the compute
/// dtype `d` (a serial f32 sum, as torch sums a handful of scalars), or 1 when it is below 1e-8
/// in magnitude (mergekit's guard against dividing by zero). The CPU and the GPU kernels share it.
pub fn plain_divisor(d: Dtype, weights: &[f32]) -> f32 {
    let mut s = 0f32;
    for &x in weights {
        s += x;
    }
    let s = round(d, s);
    if s.abs() < round(d, 1e-8) {
        1.0
    } else {
        s
    }
}

/// One call's inputs to the block loop.
struct Mix<'a> {
    merge: &'a TensorMerge,
    g: &'a Gta,
    /// Per non-base parent, in input order.
    per: &'a [&'a ParentStats],
    inputs: &'a [&'a [f32]],
    base: &'a [f32],
    /// The range's first element in the whole tensor.
    start: usize,
}

impl Mix<'_> {
    /// [`Mix::run`] in 256-bit vectors where the CPU has AVX2 (the build's baseline is SSE2's
    /// 128): the same operations, each rounded as before, so the same bits; about twice the
    /// elements per instruction in the loops that are most of a TIES read's time.
    fn run_best<R: Fn(f32) -> f32 + Copy>(&self, r: R, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2<R: Fn(f32) -> f32 + Copy>(mix: &Mix, r: R, out: &mut [f32]) {
                mix.run(r, out)
            }
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2(self, r, out) };
        }
        self.run(r, out)
    }

    /// `r` is `round(dtype, ·)` for the compute dtype.
    #[inline(always)]
    fn run<R: Fn(f32) -> f32 + Copy>(&self, r: R, out: &mut [f32]) {
        let d = self.merge.dtype;
        let g = self.g;
        let len = out.len();
        let kp = self.inputs.len();
        // DELLA ranks within whole rows: its block is the whole range (aligned to rows by
        // `granularity`).
        let della = self.per.iter().any(|p| matches!(p.keep, Keep::Della { .. }));
        let block = if della { len.max(1) } else { BLOCK };
        // deltas.mul_(weights): weights as a tensor of the compute dtype.
        let w: Vec<f32> = g.parents.iter().map(|p| scalar(d, p.weight)).collect();
        let lambda = g.lambda as f32;
        let plain_div = plain_divisor(d, &w);
        // Per parent, the next tie (an index into its sorted list) at or after this block.
        let mut next_tie: Vec<usize> = self
            .per
            .iter()
            .map(|p| match &p.keep {
                Keep::Top { ties, .. } | Keep::Band { ties, .. } => {
                    ties.partition_point(|&t| (t as usize) < self.start)
                }
                _ => 0,
            })
            .collect();
        let mut xs = vec![0f32; kp * block];
        let mut delta = vec![0f32; block];
        let mut acc = vec![0f32; block];
        let mut sum = vec![0f32; block];
        let mut div = vec![0f32; block];
        let mut s = 0;
        while s < len {
            let e = (s + block).min(len);
            let n = e - s;
            let base = &self.base[s..e];
            for (k, x) in xs.chunks_exact_mut(block).enumerate() {
                let x = &mut x[..n];
                let delta = &mut delta[..n];
                for ((dl, &p), &y) in delta.iter_mut().zip(&self.inputs[k][s..e]).zip(base) {
                    *dl = r(p - y);
                }
                self.sparsify(k, r, s, delta, x, &mut next_tie[k]);
                // deltas * weight, in the compute dtype.
                let wk = w[k];
                for v in x.iter_mut() {
                    *v = r(*v * wk);
                }
            }
            let (acc, sum, div) = (&mut acc[..n], &mut sum[..n], &mut div[..n]);
            // Sums over the parents accumulate in f32 in parent order, from 0 (torch's sum over
            // dim 0 of the stacked deltas), and round once.
            sum.fill(0.0);
            for x in xs.chunks_exact(block) {
                for (a, &v) in sum.iter_mut().zip(&x[..n]) {
                    *a += v;
                }
            }
            if g.consensus {
                // get_mask(method="sum"): majority = sign(sum of deltas), >= 0 counts as +; the
                // mixed delta sums the agreeing parents' deltas (the others add their `x * 0`),
                // the divisor their weights.
                for a in sum.iter_mut() {
                    *a = if r(*a) >= 0.0 { 1.0 } else { -1.0 };
                }
                acc.fill(0.0);
                div.fill(0.0);
                for (x, &wk) in xs.chunks_exact(block).zip(&w) {
                    for (((a, dv), &maj), &v) in
                        acc.iter_mut().zip(div.iter_mut()).zip(sum.iter()).zip(&x[..n])
                    {
                        let sign = if v > 0.0 {
                            1.0
                        } else if v < 0.0 {
                            -1.0
                        } else {
                            0.0
                        };
                        let on = sign == maj;
                        *a += if on { v } else { v * 0.0 };
                        *dv += if on { wk } else { 0.0 };
                    }
                }
                for dv in div.iter_mut() {
                    let v = r(*dv);
                    *dv = if v == 0.0 { 1.0 } else { v };
                }
            } else {
                acc.copy_from_slice(sum);
                div.fill(plain_div);
            }
            for (((o, &a), &dv), &y) in out[s..e].iter_mut().zip(acc.iter()).zip(div.iter()).zip(base) {
                let mut mixed = r(a);
                if g.normalize {
                    mixed = r(mixed / dv);
                }
                if g.lambda != 1.0 {
                    mixed = r(mixed * lambda);
                }
                *o = r(y + mixed);
            }
            s = e;
        }
    }

    /// Parent `k`'s delta over block elements `s..` of the range, sparsified into `x` as
    /// `sparsify.py` does (kept or `x * 0`), rescaled, back in the compute dtype. `next_tie`
    /// walks the parent's sorted tie list along the blocks.
    #[inline(always)]
    fn sparsify<R: Fn(f32) -> f32 + Copy>(
        &self,
        k: usize,
        r: R,
        s: usize,
        delta: &[f32],
        x: &mut [f32],
        next_tie: &mut usize,
    ) {
        let ps = self.per[k];
        let Some(method) = self.g.sparsify.filter(|_| ps.keep != Keep::All) else {
            x.copy_from_slice(delta);
            return;
        };
        let m = self.merge;
        let work = match method {
            Sparsify::Random | Sparsify::Della => work_dtype(m.dtype),
            _ => m.dtype,
        };
        // The block's first element in the whole tensor (masks and tie lists index by it).
        let first = self.start + s;
        match &ps.keep {
            Keep::Top { mag, ties } => {
                // Magnitudes above the cut are kept; of those equal to it, the listed ties.
                for (o, &v) in x.iter_mut().zip(delta) {
                    *o = if v.abs() > *mag { v } else { v * 0.0 };
                }
                restore_ties(ties, next_tie, first, delta, x, |a| a == *mag);
            }
            Keep::Band { lo, hi, ties } => {
                for (o, &v) in x.iter_mut().zip(delta) {
                    let a = v.abs();
                    *o = if a > *lo && a < *hi { v } else { v * 0.0 };
                }
                restore_ties(ties, next_tie, first, delta, x, |a| a == *lo || a == *hi);
            }
            keep => m.mask_range(keep, stream_key(m.seed, m.name_key, k), first, m.row_len(), delta, work, x),
        }
        if let Some(f) = ps.factor {
            for v in x.iter_mut() {
                *v = round(work, *v * f);
            }
        }
        // `.to(tensor.dtype)` after a work-dtype computation.
        for v in x.iter_mut() {
            *v = r(*v);
        }
    }
}

/// Keep the listed ties of a block (elements `first..` of the tensor): `ties` is sorted, and
/// `next_tie` is the first of them not before `first`; it moves past the block's. A listed
/// element is kept only where its magnitude is the tied one (`tied`), as a per-element check
/// against the list would.
fn restore_ties(
    ties: &[u32],
    next_tie: &mut usize,
    first: usize,
    delta: &[f32],
    x: &mut [f32],
    tied: impl Fn(f32) -> bool,
) {
    let end = first + x.len();
    while let Some(&t) = ties.get(*next_tie) {
        let i = t as usize;
        if i >= end {
            break;
        }
        if i >= first && tied(delta[i - first].abs()) {
            x[i - first] = delta[i - first];
        }
        *next_tie += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::sort::torch_sort;
    use super::super::tests::{all_kernels, gta, merge, parents};
    use super::super::Kernel;
    use super::*;
    use proptest::prelude::*;

    /// The mix as it was first written, one element at a time over whole-range passes (the
    /// transcription of `generalized_task_arithmetic.py` l.96-150 that the block loop must equal).
    fn apply_gta_reference(
        tm: &TensorMerge,
        g: &Gta,
        stats: &Stats,
        parents: &[&[f32]],
        start: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        // generalized_task_arithmetic.py l.96-150.
        let d = tm.dtype;
        let b = tm.base.ok_or_else(|| KernelError::Invalid("task arithmetic needs a base".into()))?;
        let others = tm.non_base(parents.len());
        let len = out.len();
        let row = tm.row_len();
        let all = ParentStats { keep: Keep::All, factor: None };
        let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(others.len());
        for (k, &j) in others.iter().enumerate() {
            let delta: Vec<f32> = parents[j].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect();
            let ps = match stats {
                Stats::Gta(v) => v
                    .get(k)
                    .ok_or_else(|| KernelError::Invalid("apply: statistics for fewer parents".into()))?,
                _ if !tm.needs_stats() => &all,
                _ => return Err(KernelError::Invalid("apply: statistics of another method".into())),
            };
            let delta = match g.sparsify {
                Some(method) if ps.keep != Keep::All => {
                    let work = match method {
                        Sparsify::Random | Sparsify::Della => work_dtype(d),
                        _ => d,
                    };
                    let mut m = vec![0f32; len];
                    tm.mask_range(
                        &ps.keep,
                        stream_key(tm.seed, tm.name_key, k),
                        start,
                        row,
                        &delta,
                        work,
                        &mut m,
                    );
                    if let Some(f) = ps.factor {
                        for x in m.iter_mut() {
                            *x = round(work, *x * f);
                        }
                    }
                    // `.to(tensor.dtype)` after a work-dtype computation.
                    for x in m.iter_mut() {
                        *x = round(d, *x);
                    }
                    m
                }
                _ => delta,
            };
            deltas.push(delta);
        }
        // deltas.mul_(weights): weights as a tensor of the compute dtype.
        let w: Vec<f32> = g.parents.iter().map(|p| scalar(d, p.weight)).collect();
        for (delta, &wj) in deltas.iter_mut().zip(&w) {
            for x in delta.iter_mut() {
                *x = round(d, *x * wj);
            }
        }
        let lambda = g.lambda as f32;
        let plain_div = plain_divisor(d, &w);
        for i in 0..len {
            let (mixed, divisor) = if g.consensus {
                // get_mask(method="sum"): majority = sign(sum of deltas), >= 0 counts as +.
                let mut s = 0f32;
                for dl in &deltas {
                    s += dl[i];
                }
                let majority = if round(d, s) >= 0.0 { 1.0 } else { -1.0 };
                let (mut m, mut dv) = (0f32, 0f32);
                for (dl, &wj) in deltas.iter().zip(&w) {
                    let x = dl[i];
                    let sign = if x > 0.0 {
                        1.0
                    } else if x < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    let on = sign == majority;
                    m += if on { x } else { x * 0.0 };
                    dv += if on { wj } else { 0.0 };
                }
                let dv = round(d, dv);
                (round(d, m), if dv == 0.0 { 1.0 } else { dv })
            } else {
                let mut m = 0f32;
                for dl in &deltas {
                    m += dl[i];
                }
                (round(d, m), plain_div)
            };
            let mut mixed = mixed;
            if g.normalize {
                mixed = round(d, mixed / divisor);
            }
            if g.lambda != 1.0 {
                mixed = round(d, mixed * lambda);
            }
            out[i] = round(d, parents[b][i] + mixed);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The block loop against the per-element reference, every element's bits, for every
        /// task arithmetic row (each sparsifier, consensus or not, rescaled or not), on ranges
        /// that start and end anywhere (ties cut across blocks and ranges) and long enough
        /// for several blocks.
        #[test]
        fn block_mix_matches_reference(rows in 1usize..12, cols in 1usize..700, chunk in 1usize..3000, seed in any::<u64>(), di in 0usize..3, density in 0.05f64..1.0) {
            let d = [Dtype::BF16, Dtype::F16, Dtype::F32][di];
            let mut kernels: Vec<(Kernel, Option<usize>, usize)> =
                all_kernels().into_iter().filter(|(k, _, _)| matches!(k, Kernel::Gta(_))).collect();
            for s in [Sparsify::Magnitude, Sparsify::MagnitudeOutliers] {
                kernels.push((gta(true, Some(s), density, false), Some(0), 4));
                kernels.push((gta(false, Some(s), density, true), Some(0), 3));
            }
            for (k, base, inputs) in kernels {
                let Kernel::Gta(g) = &k else { unreachable!() };
                let m = merge(&k, base, d, vec![rows, cols]);
                let n = rows * cols;
                let ps = parents(d, n, inputs, seed);
                let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
                let stats = if m.needs_stats() { m.stats(&refs).unwrap() } else { Stats::None };
                let step = chunk.div_ceil(m.granularity()) * m.granularity();
                let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
                let mut s = 0;
                while s < n {
                    let e = (s + step).min(n);
                    let sl: Vec<&[f32]> = refs.iter().map(|p| &p[s..e]).collect();
                    m.apply_gta(g, &stats, &sl, s, &mut got[s..e]).unwrap();
                    apply_gta_reference(&m, g, &stats, &sl, s, &mut want[s..e]).unwrap();
                    s = e;
                }
                let gb: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
                let wb: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                prop_assert_eq!(gb, wb, "{:?}", k);
            }
        }

        /// TIES and task arithmetic against a direct transcription of mergekit's tensor code
        /// (whole-tensor sort, per-model passes).
        #[test]
        fn gta_matches_reference(n in 1usize..400, density in 0.05f64..1.0, seed in any::<u64>(), di in 0usize..3, consensus in any::<bool>()) {
            let d = [Dtype::BF16, Dtype::F16, Dtype::F32][di];
            let k = gta(consensus, Some(Sparsify::Magnitude), density, false);
            let m = merge(&k, Some(0), d, vec![n]);
            let ps = parents(d, n, 4, seed);
            let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
            let got = m.merge_whole(&refs).unwrap();
            let Kernel::Gta(g) = &k else { unreachable!() };
            let want = reference_gta(g, d, &ps);
            let gb: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
            let wb: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(gb, wb);
        }
    }

    /// mergekit's `GeneralizedTaskArithmeticMerge.merge_group` with `magnitude` sparsification,
    /// written out directly: a full stable sort per model, then the per-model passes.
    fn reference_gta(g: &Gta, d: Dtype, ps: &[Vec<f32>]) -> Vec<f32> {
        let n = ps[0].len();
        let base = &ps[0];
        let mut deltas = Vec::new();
        for (k, p) in ps[1..].iter().enumerate() {
            let delta: Vec<f32> = p.iter().zip(base).map(|(&x, &b)| round(d, x - b)).collect();
            let dens = g.parents[k].density;
            let mut mask = vec![1f32; n];
            if dens < 1.0 {
                let kk = ((dens * n as f64) as usize).max(1);
                let mut pairs: Vec<(f32, u32)> =
                    delta.iter().enumerate().map(|(i, &x)| (x.abs(), i as u32)).collect();
                torch_sort(&mut pairs, true);
                let idx: Vec<usize> = pairs.iter().map(|p| p.1 as usize).collect();
                mask = vec![0f32; n];
                for &i in &idx[..kk] {
                    mask[i] = 1.0;
                }
            }
            let w = scalar(d, g.parents[k].weight);
            deltas.push(
                delta.iter().zip(&mask).map(|(&x, &m)| round(d, round(d, x * m) * w)).collect::<Vec<f32>>(),
            );
        }
        let w: Vec<f32> = g.parents.iter().map(|p| scalar(d, p.weight)).collect();
        (0..n)
            .map(|i| {
                let (mut mixed, mut div) = (0f32, 0f32);
                if g.consensus {
                    let sum: f32 = deltas.iter().map(|dl| dl[i]).fold(0.0, |a, b| a + b);
                    let maj = if round(d, sum) >= 0.0 { 1.0 } else { -1.0 };
                    for (dl, &wj) in deltas.iter().zip(&w) {
                        let s = if dl[i] > 0.0 {
                            1.0
                        } else if dl[i] < 0.0 {
                            -1.0
                        } else {
                            0.0
                        };
                        if s == maj {
                            mixed += dl[i];
                            div += wj;
                        }
                    }
                    div = round(d, div);
                    if div == 0.0 {
                        div = 1.0;
                    }
                } else {
                    for dl in &deltas {
                        mixed += dl[i];
                    }
                    div = round(d, w.iter().fold(0.0, |a, b| a + b));
                }
                let mut mixed = round(d, mixed);
                if g.normalize {
                    mixed = round(d, mixed / div);
                }
                if g.lambda != 1.0 {
                    mixed = round(d, mixed * g.lambda as f32);
                }
                round(d, base[i] + mixed)
            })
            .collect()
    }
}

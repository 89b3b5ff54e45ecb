//! Generalized task arithmetic's mix (`generalized_task_arithmetic.py`): each parent's delta
//! from the base, sparsified ([`super::sparsify`]) and weighted, then TIES's sign consensus and
//! disjoint mean (or a plain sum), normalize, lambda, added back to the base. Task arithmetic,
//! TIES, DARE, breadcrumbs and DELLA are rows of this one kernel.

use super::sparsify::{stream_key, work_dtype};
use super::{round, scalar, Gta, Keep, KernelError, ParentStats, Sparsify, Stats, TensorMerge};

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
        let d = self.dtype;
        let b = self.base.ok_or_else(|| KernelError::Invalid("task arithmetic needs a base".into()))?;
        let others = self.non_base(parents.len());
        let len = out.len();
        let row = self.row_len();
        let all = ParentStats { keep: Keep::All, factor: None };
        let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(others.len());
        for (k, &j) in others.iter().enumerate() {
            let delta: Vec<f32> = parents[j].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect();
            let ps = match stats {
                Stats::Gta(v) => v
                    .get(k)
                    .ok_or_else(|| KernelError::Invalid("apply: statistics for fewer parents".into()))?,
                _ if !self.needs_stats() => &all,
                _ => return Err(KernelError::Invalid("apply: statistics of another method".into())),
            };
            let delta = match g.sparsify {
                Some(method) if ps.keep != Keep::All => {
                    let work = match method {
                        Sparsify::Random | Sparsify::Della => work_dtype(d),
                        _ => d,
                    };
                    let mut m = vec![0f32; len];
                    self.mask_range(
                        &ps.keep,
                        stream_key(self.seed, self.name_key, k),
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
        let plain_div = {
            let mut s = 0f32;
            for &x in &w {
                s += x;
            }
            let s = round(d, s);
            if s.abs() < round(d, 1e-8) {
                1.0
            } else {
                s
            }
        };
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
}

#[cfg(test)]
mod tests {
    use super::super::sort::torch_sort;
    use super::super::tests::{gta, merge, parents};
    use super::super::Kernel;
    use super::*;
    use crate::format::Dtype;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
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

//! mergekit 0.1.5's merge methods as numbers: per-tensor statistics, then an elementwise apply.
//!
//! Each method is split in two so a reader can compute any element range of a merged tensor:
//! [`TensorMerge::stats`] reads the parents' whole tensors once and keeps the few numbers that
//! depend on all of them (magnitude cut-offs of each parent delta, L1 rescale factors, SLERP /
//! NuSLERP / model stock norms and dot products), small enough to store with the entry; then
//! [`TensorMerge::apply`] computes any range `[start, start + len)` from the parents' same range.
//! Ranges must start and end on multiples of [`TensorMerge::granularity`] (1, except DELLA,
//! whose probabilities rank magnitudes within a row).
//!
//! Values travel as f32 holding numbers representable in the compute dtype `dtype` (mergekit's
//! `dtype:`; inputs are cast to it on load, `LoadTensor.execute`). Every torch operation is
//! replayed with its rounding: an op on bf16/f16 tensors computes in f32 and rounds the result
//! (`r`), sums over the models accumulate in f32 in model order and round once (torch's
//! `cascade_sum` over dim 0), python scalars enter as f32. The upstream lines each kernel
//! follows are cited where they are replayed:
//!
//! - linear (`merge_methods/linear.py`): f32 `addcmul_` per model, f32 divide, one rounding.
//! - task arithmetic, TIES, DARE, breadcrumbs, DELLA (`generalized_task_arithmetic.py`,
//!   `sparsify.py`): all in `dtype`.
//! - slerp (`slerp.py`): f32 coefficients from chunked norms, `coef_a * x + coef_b * y` in f32.
//! - nuslerp (`nuslerp.py`, flattened), model stock (`model_stock.py`): all in `dtype`.
//!
//! Whole-tensor reductions replay torch's CPU order: `torch_sum` is ATen's cascade sum (8 f32
//! lanes, 4 accumulators, 4 levels) and, over more than 32768 elements, its two-pass parallel
//! reduction with partials rounded to the output dtype (`TensorMerge::threads`: mergekit's own
//! bits depend on its torch thread count); `norm` is `vector_norm`'s 8-lane accumulation;
//! linear's `addcmul_` is a fused multiply-add; TIES/breadcrumbs cut-offs replay libstdc++'s
//! introsort (`torch_sort`), so ties at the cut fall where torch's unstable argsort puts them.
//! Checked against mergekit 0.1.5 / torch 2.15 (AVX512 build, 2 threads) by
//! scripts/mergekit_check.py: bit-identical except (1) slerp's coefficients, which torch computes
//! with SLEEF's vectorized `sin`/`acos` and llmfs with glibc's `sinf`/`acosf` (they differ in the
//! last bit for some arguments: bf16/f16 outputs ≥ 99.99 % identical, the rest 1 ulp; f32 outputs
//! of an affected tensor differ by a few ulp throughout), (2) one f16 model-stock factor (f16
//! norm/dot accumulation). Random masks (DARE, DELLA) come from a counter-based hash of (seed,
//! tensor, parent, element), not torch's generator: same kept share and L1 rescale, other draws.
//!
//! The files, one concern each: `torch` (torch's float ops and reductions), `sort` (torch's
//! sort replayed, for cut-offs), `linear` (linear, passthrough), `sparsify` (TIES / DARE /
//! breadcrumbs / DELLA masks and rescale), `task_arithmetic` (the generalized task arithmetic
//! mix: sign consensus, disjoint mean), `slerp` (slerp, nuslerp), `model_stock`, `values`
//! (decode and cast on load, encode on write), `tie_runs` (the compact form stored with a merge:
//! kept ties as index intervals). This file holds the types and the dispatch.
//!
//! The GPU (`--features gpu`) computes the apply of linear and task arithmetic without DELLA
//! (`compute::gpu::mergekit`, `shaders/mergekit_apply.wgsl`) from the statistics computed here,
//! with the same bits: [`TensorMerge::apply`] sends a range there when `compute::backend` chose
//! the GPU for that method, [`TensorMerge::apply_cpu`] is the reference (tests/gpu.rs).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::format::Dtype;

mod linear;
mod model_stock;
mod slerp;
mod sort;
mod sparsify;
mod task_arithmetic;
mod tie_runs;
mod torch;
mod values;

pub use sort::{torch_select, torch_sort};
pub use sparsify::{name_key, stream_key, uniform, work_dtype};
pub use task_arithmetic::plain_divisor;
pub use tie_runs::{CompactStats, TieRuns};
pub use torch::{round, scalar, torch_sum};
pub use values::{encode, encode_into, load_as, load_into, zeroed_tensor, Recycling, VALUES};

/// The sparsifier of a generalized task arithmetic method (`sparsify.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sparsify {
    /// Keep the `density` largest magnitudes (`magnitude`).
    Magnitude,
    /// Bernoulli(`density`) masks (`bernoulli`, DARE).
    Random,
    /// Drop the `gamma` largest, then the smallest down to `density` (`magnitude_outliers`).
    MagnitudeOutliers,
    /// Bernoulli masks with probabilities ranked by magnitude within a row (`della_magprune`).
    Della,
}

/// One non-base parent of a task arithmetic merge, its parameters resolved for this tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GtaParent {
    pub weight: f64,
    pub density: f64,
    pub gamma: f64,
    pub epsilon: f64,
}

/// Generalized task arithmetic: (sign consensus or none) × sparsifier × normalize/rescale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gta {
    pub consensus: bool,
    pub sparsify: Option<Sparsify>,
    /// In the order of the inputs, base excluded.
    pub parents: Vec<GtaParent>,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f64,
}

/// A merge method with its parameters resolved for one tensor: only numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Kernel {
    /// One weight per input, in input order.
    Linear {
        weights: Vec<f64>,
        normalize: bool,
    },
    Gta(Gta),
    /// Interpolation factor from the base (input `base`) to the other input.
    Slerp {
        t: f64,
    },
    /// `t = w1 / (w0 + w1)` over the two non-base inputs; flattened (mergekit's default).
    Nuslerp {
        t: f64,
    },
    ModelStock,
    /// One input; `scale` multiplies it.
    Passthrough {
        scale: Option<f64>,
    },
}

/// Everything needed to compute one merged tensor, apart from the parents' values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorMerge {
    pub kernel: Kernel,
    /// Compute dtype: the config's `dtype`, else the inputs' promoted dtype.
    pub dtype: Dtype,
    /// Index of the base among the inputs, where the method has one.
    pub base: Option<usize>,
    pub shape: Vec<usize>,
    /// Random masks: the merge's seed and a key of the tensor's name ([`name_key`]).
    pub seed: u64,
    pub name_key: u64,
    /// torch's intra-op thread count in the mergekit run being matched: torch splits a sum over
    /// more than 32768 elements into that many partial sums, each rounded to the output dtype
    /// (`two_pass_reduction`), so mergekit's own bits depend on it. 1: one serial sum.
    #[serde(default = "one")]
    pub threads: usize,
}

/// Whole-tensor quantities of one merged tensor, computed once by [`TensorMerge::stats`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Stats {
    None,
    /// Per non-base parent, in input order.
    Gta(Vec<ParentStats>),
    Slerp {
        coef_a: f32,
        coef_b: f32,
    },
    Nuslerp {
        s0: f32,
        s1: f32,
        sin_theta: f32,
        colinear: bool,
    },
    ModelStock {
        t: f32,
    },
}

/// Which elements of one parent's delta survive sparsification, and the rescale factor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParentStats {
    pub keep: Keep,
    /// `before / after` of an L1 rescale, in the work dtype; `None` when not rescaled.
    pub factor: Option<f32>,
}

/// A parent delta's sparsification mask, as keys of a total order on (magnitude, index).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Keep {
    All,
    Nothing,
    /// Keep magnitudes `m > mag`, and of those `== mag` the indices listed in `ties` (sorted):
    /// the ones torch's unstable argsort put before the cut.
    Top {
        mag: f32,
        ties: Vec<u32>,
    },
    /// Keep magnitudes `lo < m < hi`, and of those equal to `lo` or `hi` the indices in `ties`.
    Band {
        lo: f32,
        hi: f32,
        ties: Vec<u32>,
    },
    /// Bernoulli with probability `p` (already in the work dtype).
    Random {
        p: f32,
    },
    /// DELLA: per-row ranks; `lo = density - epsilon`, `eps = epsilon`.
    Della {
        lo: f64,
        eps: f64,
    },
}

/// Errors a merge can meet on its inputs' values (configs are checked before).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Invalid(String),
}

fn one() -> usize {
    1
}

impl TensorMerge {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements per row (the last dimension; the whole tensor for 0-d/1-d).
    fn row_len(&self) -> usize {
        match self.shape.len() {
            0 => 1,
            1 => self.shape[0].max(1),
            _ => self.shape[1..].iter().product::<usize>().max(1),
        }
    }

    /// Ranges given to [`apply`](Self::apply) start and end on multiples of this.
    pub fn granularity(&self) -> usize {
        match &self.kernel {
            Kernel::Gta(g) if g.sparsify == Some(Sparsify::Della) => self.row_len(),
            _ => 1,
        }
    }

    /// Whether [`stats`](Self::stats) needs the parents' values (otherwise it is `Stats::None`
    /// or computed from the parameters alone and the whole tensors need not be read).
    pub fn needs_stats(&self) -> bool {
        match &self.kernel {
            Kernel::Linear { .. } | Kernel::Passthrough { .. } => false,
            Kernel::Gta(g) => g.sparsify.is_some() && g.parents.iter().any(|p| p.density < 1.0),
            _ => true,
        }
    }

    fn non_base(&self, n: usize) -> Vec<usize> {
        (0..n).filter(|&i| Some(i) != self.base).collect()
    }

    /// Whole-tensor statistics. `parents[i]` is input `i`'s whole tensor, as values of `dtype`.
    pub fn stats(&self, parents: &[&[f32]]) -> Result<Stats, KernelError> {
        let n = self.numel();
        if parents.iter().any(|p| p.len() != n) {
            return Err(KernelError::Invalid("stats: parents must be whole tensors".into()));
        }
        Ok(match &self.kernel {
            Kernel::Linear { .. } | Kernel::Passthrough { .. } => Stats::None,
            Kernel::Gta(g) => {
                let b =
                    self.base.ok_or_else(|| KernelError::Invalid("task arithmetic needs a base".into()))?;
                let others = self.non_base(parents.len());
                // The parents' cut-offs are independent: on the rayon pool, so a tensor's first
                // read is not one core's three whole-tensor selections in a row (each holds its
                // magnitudes, 8 bytes an element, while it runs).
                let out = others
                    .par_iter()
                    .enumerate()
                    .map(|(k, &j)| self.parent_stats(g, &g.parents[k], k, parents[j], parents[b]))
                    .collect::<Result<Vec<_>, _>>()?;
                Stats::Gta(out)
            }
            Kernel::Slerp { t } => self.slerp_stats(*t, parents),
            Kernel::Nuslerp { t } => self.nuslerp_stats(*t, parents),
            Kernel::ModelStock => self.model_stock_stats(parents),
        })
    }

    /// Compute elements `[start, start + out.len())` of the merged tensor from the parents' same
    /// range (`parents[i]` is input `i`'s values in the compute dtype). Output values are in the
    /// compute dtype (cast to `out_dtype` by the writer). On the GPU where the backend chose it
    /// for this method (`compute::backend::merge_on_gpu`: linear and task arithmetic without
    /// DELLA), else [`apply_cpu`](Self::apply_cpu): the same bits either way.
    pub fn apply(
        &self,
        stats: &Stats,
        parents: &[&[f32]],
        start: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        self.check_range(parents, start, out.len())?;
        if super::backend::merge_on_gpu(self, stats, parents, start, out) {
            return Ok(());
        }
        self.apply_cpu(stats, parents, start, out)
    }

    fn check_range(&self, parents: &[&[f32]], start: usize, len: usize) -> Result<(), KernelError> {
        if parents.iter().any(|p| p.len() != len) {
            return Err(KernelError::Invalid("apply: parents' ranges differ in length".into()));
        }
        let g = self.granularity();
        if start % g != 0 || (len % g != 0 && start + len != self.numel()) {
            return Err(KernelError::Invalid(format!("apply: range not aligned to {g} elements")));
        }
        Ok(())
    }

    /// [`apply`](Self::apply) on the CPU: the reference every other device is checked against.
    pub fn apply_cpu(
        &self,
        stats: &Stats,
        parents: &[&[f32]],
        start: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        self.check_range(parents, start, out.len())?;
        match (&self.kernel, stats) {
            (Kernel::Passthrough { scale }, _) => self.apply_passthrough(*scale, parents, out),
            (Kernel::Linear { weights, normalize }, _) => {
                self.apply_linear(weights, *normalize, parents, out)
            }
            (Kernel::Gta(gta), st) => self.apply_gta(gta, st, parents, start, out)?,
            (Kernel::Slerp { .. }, Stats::Slerp { coef_a, coef_b }) => {
                self.apply_slerp(*coef_a, *coef_b, parents, out)
            }
            (Kernel::Nuslerp { t }, Stats::Nuslerp { s0, s1, sin_theta, colinear }) => {
                self.apply_nuslerp(*t, (*s0, *s1, *sin_theta, *colinear), parents, out)
            }
            (Kernel::ModelStock, Stats::ModelStock { t }) => self.apply_model_stock(*t, parents, out),
            _ => return Err(KernelError::Invalid("apply: statistics of another method".into())),
        }
        Ok(())
    }

    /// The whole tensor in one call: stats, then apply over everything.
    pub fn merge_whole(&self, parents: &[&[f32]]) -> Result<Vec<f32>, KernelError> {
        let stats = if self.needs_stats() { self.stats(parents)? } else { Stats::None };
        let mut out = vec![0f32; self.numel()];
        self.apply(&stats, parents, 0, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn gta(consensus: bool, sparsify: Option<Sparsify>, density: f64, rescale: bool) -> Kernel {
        Kernel::Gta(Gta {
            consensus,
            sparsify,
            parents: (0..3)
                .map(|k| GtaParent { weight: 0.3 + 0.2 * k as f64, density, gamma: 0.05, epsilon: 0.1 })
                .collect(),
            normalize: consensus,
            rescale,
            lambda: 0.9,
        })
    }

    pub(crate) fn all_kernels() -> Vec<(Kernel, Option<usize>, usize)> {
        vec![
            (Kernel::Linear { weights: vec![0.5, 0.3, 0.2, 0.1], normalize: true }, None, 4),
            (gta(false, None, 1.0, false), Some(0), 4),
            (gta(true, Some(Sparsify::Magnitude), 0.4, false), Some(0), 4),
            (gta(true, Some(Sparsify::Magnitude), 0.4, true), Some(0), 4),
            (gta(true, Some(Sparsify::Random), 0.5, true), Some(0), 4),
            (gta(false, Some(Sparsify::Random), 0.5, true), Some(0), 4),
            (gta(false, Some(Sparsify::MagnitudeOutliers), 0.7, false), Some(0), 4),
            (gta(true, Some(Sparsify::MagnitudeOutliers), 0.7, false), Some(0), 4),
            (gta(true, Some(Sparsify::Della), 0.5, true), Some(0), 4),
            (gta(false, Some(Sparsify::Della), 0.5, true), Some(0), 4),
            (Kernel::Slerp { t: 0.3 }, Some(0), 2),
            (Kernel::Nuslerp { t: 0.4 }, Some(2), 3),
            (Kernel::Nuslerp { t: 0.4 }, None, 2),
            (Kernel::ModelStock, Some(0), 4),
            (Kernel::Passthrough { scale: Some(0.5) }, None, 1),
        ]
    }

    /// Parents: a base and fine-tunes of it, rounded to `d`, with some unchanged elements.
    pub(crate) fn parents(d: Dtype, n: usize, inputs: usize, seed: u64) -> Vec<Vec<f32>> {
        let base: Vec<f32> = (0..n).map(|i| round(d, (uniform(seed, i as u64) - 0.5) * 0.1)).collect();
        let mut out = vec![base.clone()];
        for k in 1..inputs {
            let s = stream_key(seed, 7, k);
            out.push(
                base.iter()
                    .enumerate()
                    .map(|(i, &b)| {
                        let u = uniform(s, i as u64);
                        if u < 0.1 {
                            b
                        } else {
                            round(d, b + (u - 0.5) * 0.02)
                        }
                    })
                    .collect(),
            );
        }
        out
    }

    pub(crate) fn merge(kernel: &Kernel, base: Option<usize>, d: Dtype, shape: Vec<usize>) -> TensorMerge {
        TensorMerge {
            kernel: kernel.clone(),
            dtype: d,
            base,
            shape,
            seed: 5,
            name_key: name_key("w"),
            threads: 2,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any split into aligned ranges gives the same bits as the whole tensor.
        #[test]
        fn chunks_equal_whole(rows in 1usize..9, cols in 1usize..70, chunk in 1usize..200, seed in any::<u64>(), di in 0usize..3) {
            let d = [Dtype::BF16, Dtype::F16, Dtype::F32][di];
            for (k, base, inputs) in all_kernels() {
                let m = merge(&k, base, d, vec![rows, cols]);
                let ps = parents(d, rows * cols, inputs, seed);
                let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
                let whole = m.merge_whole(&refs).unwrap();
                let stats = m.stats(&refs).unwrap();
                let g = m.granularity();
                let step = chunk.div_ceil(g) * g;
                let mut out = vec![0f32; rows * cols];
                let mut s = 0;
                while s < rows * cols {
                    let e = (s + step).min(rows * cols);
                    let sl: Vec<&[f32]> = refs.iter().map(|p| &p[s..e]).collect();
                    m.apply(&stats, &sl, s, &mut out[s..e]).unwrap();
                    s = e;
                }
                let wb: Vec<u32> = whole.iter().map(|x| x.to_bits()).collect();
                let ob: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                prop_assert_eq!(wb, ob, "{:?}", k);
                // Every output is a value of the compute dtype.
                prop_assert!(whole.iter().all(|&x| x.is_nan() || round(d, x) == x));
            }
        }
    }
}

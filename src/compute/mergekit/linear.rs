//! Linear (`linear.py`): a weighted sum of the inputs in f32 (`addcmul_` per input, in input
//! order), optionally divided by the weights' sum, rounded once; and passthrough (one input,
//! optionally scaled). Neither needs whole-tensor statistics.

use super::torch::{fma_accumulate, round_bf16};
use super::{round, TensorMerge};
use crate::format::Dtype;

/// The sum divided by the weights' sum where asked, rounded to the compute dtype (`r`).
#[inline(always)]
fn finish(out: &mut [f32], normalize: bool, den: f32, r: impl Fn(f32) -> f32) {
    for o in out.iter_mut() {
        *o = r(if normalize { *o / den } else { *o });
    }
}

impl TensorMerge {
    /// linear.py l.27-38: f32 (addcmul_ per input, in input order), f32 divide, round.
    pub(super) fn apply_linear(&self, weights: &[f64], normalize: bool, parents: &[&[f32]], out: &mut [f32]) {
        let d = self.dtype;
        let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        let mut den = 0f32;
        for &x in &w {
            den += x;
        }
        // A block at a time, so the sum stays in L1 across the inputs' passes (a chunk's whole
        // range is megabytes: every pass over it went to memory).
        const BLOCK: usize = 2048;
        for (at, out) in (0..).step_by(BLOCK).zip(out.chunks_mut(BLOCK)) {
            out.fill(0.0);
            for (p, &wj) in parents.iter().zip(&w) {
                fma_accumulate(out, &p[at..at + out.len()], wj);
            }
            match d {
                // The rounding chosen outside the loop, so it inlines and the loop vectorizes.
                Dtype::BF16 => finish(out, normalize, den, round_bf16),
                _ => finish(out, normalize, den, |x| round(d, x)),
            }
        }
    }

    /// Passthrough: the one input, times `scale` (f32, one rounding) where given.
    pub(super) fn apply_passthrough(&self, scale: Option<f64>, parents: &[&[f32]], out: &mut [f32]) {
        let d = self.dtype;
        match scale {
            None => out.copy_from_slice(parents[0]),
            Some(s) => {
                let s = s as f32;
                for (o, &x) in out.iter_mut().zip(parents[0]) {
                    *o = round(d, x * s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{merge, parents};
    use super::super::{round, Kernel};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Linear against f64 arithmetic: within one rounding of the compute dtype.
        #[test]
        fn linear_close_to_exact(n in 1usize..300, seed in any::<u64>()) {
            let k = Kernel::Linear { weights: vec![0.5, 0.25, 0.25], normalize: true };
            let m = merge(&k, None, Dtype::BF16, vec![n]);
            let ps = parents(Dtype::BF16, n, 3, seed);
            let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
            let got = m.merge_whole(&refs).unwrap();
            for i in 0..n {
                let exact = 0.5 * ps[0][i] as f64 + 0.25 * ps[1][i] as f64 + 0.25 * ps[2][i] as f64;
                let ulp = (exact.abs().max(1e-30)) * 2f64.powi(-7);
                prop_assert!((got[i] as f64 - exact).abs() <= ulp, "{} vs {}", got[i], exact);
            }
        }

        /// The blocked loop against a per-element transcription of linear.py (f32 FMAs in input
        /// order from 0, the divide, one rounding), every element, any dtype and length.
        #[test]
        fn linear_matches_reference(n in 1usize..6000, seed in any::<u64>(), di in 0usize..3, normalize in any::<bool>()) {
            let d = [Dtype::BF16, Dtype::F16, Dtype::F32][di];
            let weights = vec![0.5, 0.3, 0.2, 0.1];
            let k = Kernel::Linear { weights: weights.clone(), normalize };
            let m = merge(&k, None, d, vec![n]);
            let ps = parents(d, n, 4, seed);
            let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
            let got = m.merge_whole(&refs).unwrap();
            let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
            let den = w.iter().fold(0f32, |a, &b| a + b);
            for i in 0..n {
                let mut acc = 0f32;
                for (p, &wj) in ps.iter().zip(&w) {
                    acc = p[i].mul_add(wj, acc);
                }
                let want = round(d, if normalize { acc / den } else { acc });
                prop_assert_eq!(got[i].to_bits(), want.to_bits(), "element {}", i);
            }
        }
    }
}

//! Linear (`linear.py`): a weighted sum of the inputs in f32 (`addcmul_` per input, in input
//! order), optionally divided by the weights' sum, rounded once; and passthrough (one input,
//! optionally scaled). Neither needs whole-tensor statistics.

use super::torch::{fma_accumulate, round_bf16};
use super::values::widen_bf16;
use super::{round, Kernel, TensorMerge};
use crate::format::Dtype;

/// The sum divided by the weights' sum where asked, rounded to the compute dtype (`r`).
#[inline(always)]
fn finish(out: &mut [f32], normalize: bool, den: f32, r: impl Fn(f32) -> f32) {
    for o in out.iter_mut() {
        *o = r(if normalize { *o / den } else { *o });
    }
}

/// [`TensorMerge::apply_linear_bf16`]'s loop: per block of elements, the f32 sum from 0 of each
/// input's value times its weight (fused, in input order, as `fma_accumulate`), then the
/// finish (divide, round to the compute dtype: bf16 where `round_to_dtype`, else f32) and the
/// output's bf16 encoding.
#[inline(always)]
fn linear_bf16(inputs: &[&[u8]], w: &[f32], den: f32, normalize: bool, round_to_dtype: bool, out: &mut [u8]) {
    const BLOCK: usize = 256;
    let mut sums = [0f32; BLOCK];
    for (at, out) in (0..).step_by(2 * BLOCK).zip(out.chunks_mut(2 * BLOCK)) {
        let sums = &mut sums[..out.len() / 2];
        sums.fill(0.0);
        for (p, &wj) in inputs.iter().zip(w) {
            for (s, b) in sums.iter_mut().zip(p[at..at + out.len()].chunks_exact(2)) {
                *s = widen_bf16(b).mul_add(wj, *s);
            }
        }
        // The choices outside the loops, so each inlines and vectorizes.
        match (normalize, round_to_dtype) {
            (true, true) => encode_bf16(sums, out, |x| round_bf16(x / den)),
            (true, false) => encode_bf16(sums, out, |x| x / den),
            (false, true) => encode_bf16(sums, out, round_bf16),
            (false, false) => encode_bf16(sums, out, |x| x),
        }
    }
}

/// `finish(x)` of each sum, encoded as bf16 (`encode_into`'s bits).
#[inline(always)]
fn encode_bf16(sums: &[f32], out: &mut [u8], finish: impl Fn(f32) -> f32) {
    for (o, &x) in out.chunks_exact_mut(2).zip(sums) {
        o.copy_from_slice(&((round_bf16(finish(x)).to_bits() >> 16) as u16).to_le_bytes());
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

    /// Whether [`apply_linear_bf16`](Self::apply_linear_bf16) computes this merge: linear, its
    /// compute dtype bf16 or f32 (a bf16 input's values unchanged by the cast on load), the
    /// output bf16, and the apply not sent to the GPU.
    pub fn linear_bf16_applies(&self, out_dtype: Dtype) -> bool {
        matches!(self.kernel, Kernel::Linear { .. })
            && matches!(self.dtype, Dtype::BF16 | Dtype::F32)
            && out_dtype == Dtype::BF16
            && !super::super::backend::merge_linear_may_use_gpu()
    }

    /// A range of a linear merge from its bf16 inputs' bytes (`inputs[i]`: input `i`'s range)
    /// to bf16 output bytes, where [`linear_bf16_applies`](Self::linear_bf16_applies): the
    /// bits of decoding ([`load_into`](super::load_into)), [`apply_linear`](Self::apply_linear)
    /// and [`encode_into`](super::encode_into), with no f32 copy of the inputs and one pass of
    /// each input through a small accumulator that stays in L1 (the separate passes were most of
    /// a linear read's CPU apart from the copies of the files' bytes).
    pub fn apply_linear_bf16(&self, inputs: &[&[u8]], out: &mut [u8]) {
        let Kernel::Linear { weights, normalize } = &self.kernel else {
            unreachable!("linear_bf16_applies checked the kernel")
        };
        let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        let mut den = 0f32;
        for &x in &w {
            den += x;
        }
        let round_to_dtype = self.dtype == Dtype::BF16;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2,fma")]
            fn fused(
                inputs: &[&[u8]],
                w: &[f32],
                den: f32,
                normalize: bool,
                round_to_dtype: bool,
                out: &mut [u8],
            ) {
                linear_bf16(inputs, w, den, normalize, round_to_dtype, out)
            }
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { fused(inputs, &w, den, *normalize, round_to_dtype, out) };
        }
        linear_bf16(inputs, &w, den, *normalize, round_to_dtype, out)
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

        /// The fused bf16 path against decode, apply and encode: every output byte, on bf16
        /// patterns of every class (NaNs, infinities, subnormals, zeros of both signs).
        #[test]
        fn linear_bf16_is_decode_apply_encode(
            raw in proptest::collection::vec(any::<u16>(), 4..3000),
            wide in any::<bool>(),
            normalize in any::<bool>(),
            k in 1usize..5,
        ) {
            let d = if wide { Dtype::F32 } else { Dtype::BF16 };
            let weights: Vec<f64> = [0.5, -0.3, 0.2, 1e-3][..k].to_vec();
            let m = merge(&Kernel::Linear { weights, normalize }, None, d, vec![raw.len() / k]);
            if !m.linear_bf16_applies(Dtype::BF16) {
                return Ok(()); // another test chose the GPU for this process's merges
            }
            let n = raw.len() / k;
            let bytes: Vec<Vec<u8>> =
                raw.chunks_exact(n).take(k).map(|c| c.iter().flat_map(|h| h.to_le_bytes()).collect()).collect();
            let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
            let mut got = vec![0u8; 2 * n];
            m.apply_linear_bf16(&refs, &mut got);
            let values: Vec<Vec<f32>> = refs.iter().map(|b| super::super::load_as(Dtype::BF16, d, b)).collect();
            let vrefs: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            let mut merged = vec![0f32; n];
            m.apply_cpu(&super::super::Stats::None, &vrefs, 0, &mut merged).unwrap();
            let want = super::super::encode(Dtype::BF16, &merged);
            prop_assert_eq!(got, want);
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

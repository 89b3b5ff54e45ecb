//! The sparsifiers of generalized task arithmetic (`sparsify.py`): which elements of each
//! parent's delta survive (TIES/breadcrumbs magnitude cut-offs, DARE's Bernoulli masks, DELLA's
//! rank-weighted masks) and the L1 rescale factor, as whole-tensor statistics ([`Keep`]) and a
//! range-wise mask. Random masks come from a counter-based hash of (seed, tensor, parent,
//! element), so any range is computed alone and gives the same bits.

use rayon::prelude::*;

use super::sort::torch_select_magnitudes;
use super::torch::sum;
use super::{round, scalar, Gta, GtaParent, Keep, KernelError, ParentStats, Sparsify, TensorMerge};
use crate::format::Dtype;

/// A stable 64-bit key of a tensor name for the mask generator.
pub fn name_key(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

#[inline]
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of one parent's mask stream: (seed, tensor, parent).
pub fn stream_key(seed: u64, name_key: u64, parent: usize) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ name_key) ^ parent as u64)
}

/// A uniform draw in [0, 1) for element `index` of a stream: 24 bits, exact in f32.
#[inline]
pub fn uniform(stream: u64, index: u64) -> f32 {
    let h = splitmix64(stream ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
    (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// DARE/DELLA's work dtype (`sparsify.py` `bernoulli`, `della_magprune`): bf16 stays bf16 on
/// the CPU, f16 is upcast to f32 (`torch.bernoulli` has no f16 CPU kernel).
pub fn work_dtype(d: Dtype) -> Dtype {
    if d == Dtype::BF16 {
        Dtype::BF16
    } else {
        Dtype::F32
    }
}

/// The indices of the pairs `(magnitude, index)` of `v` (of a tensor of `n` elements) whose
/// magnitude is tied with a cut (`tied`), increasing. Through a bitmap of the tensor: there can
/// be millions of them, and collecting then sorting them was a tenth of a TIES merge's CPU.
fn sorted_ties(v: &[(f32, u32)], n: usize, tied: impl Fn(f32) -> bool) -> Vec<u32> {
    let mut bits = vec![0u64; n.div_ceil(64)];
    let mut count = 0;
    for &(m, i) in v {
        let t = tied(m);
        bits[i as usize / 64] |= (t as u64) << (i % 64);
        count += t as usize;
    }
    let mut out = Vec::with_capacity(count);
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            out.push((w * 64) as u32 + word.trailing_zeros());
            word &= word - 1;
        }
    }
    out
}

/// `out[i] = (|round(parent[i] - base[i])|, at + i)`, in 256-bit vectors where the CPU has
/// AVX2 (the build's baseline is SSE2): the same bits.
fn magnitudes_into(d: Dtype, parent: &[f32], base: &[f32], at: u32, out: &mut [(f32, u32)]) {
    #[inline(always)]
    fn each(round: impl Fn(f32) -> f32, parent: &[f32], base: &[f32], at: u32, out: &mut [(f32, u32)]) {
        for (i, ((o, &x), &y)) in out.iter_mut().zip(parent).zip(base).enumerate() {
            *o = (round(x - y).abs(), at + i as u32);
        }
    }
    #[inline(always)]
    fn by_dtype(d: Dtype, parent: &[f32], base: &[f32], at: u32, out: &mut [(f32, u32)]) {
        match d {
            Dtype::BF16 => each(super::torch::round_bf16, parent, base, at, out),
            _ => each(|x| round(d, x), parent, base, at, out),
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2(d: Dtype, parent: &[f32], base: &[f32], at: u32, out: &mut [(f32, u32)]) {
            by_dtype(d, parent, base, at, out)
        }
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2(d, parent, base, at, out) };
    }
    by_dtype(d, parent, base, at, out)
}

impl TensorMerge {
    pub(super) fn parent_stats(
        &self,
        g: &Gta,
        p: &GtaParent,
        k: usize,
        parent: &[f32],
        base: &[f32],
    ) -> Result<ParentStats, KernelError> {
        let d = self.dtype;
        let n = parent.len();
        let Some(method) = g.sparsify else {
            return Ok(ParentStats { keep: Keep::All, factor: None });
        };
        // `sparsify.py`: every sparsifier returns the tensor untouched at density >= 1.
        if p.density >= 1.0 {
            return Ok(ParentStats { keep: Keep::All, factor: None });
        }
        let keep = match method {
            Sparsify::Magnitude => {
                if p.density <= 0.0 || n == 0 {
                    Keep::Nothing
                } else {
                    // l.63: k = max(1, int(density * numel)); argsort(|delta| as f32, descending)[:k].
                    let kk = ((p.density * n as f64) as usize).max(1);
                    let mut v = self.magnitudes(parent, base);
                    torch_select_magnitudes(&mut v, true, &[kk - 1]);
                    let mag = v[kk - 1].0;
                    let ties = sorted_ties(&v[..kk], n, |m| m == mag);
                    super::values::MAGNITUDES.give(v);
                    Keep::Top { mag, ties }
                }
            }
            Sparsify::MagnitudeOutliers => {
                // l.99-110: target_n = int(density*n), n_top = int(gamma*n), n_bot = max(0, n-target_n-n_top);
                // ascending sort; keep sorted[n_bot : n_bot + target_n].
                let target = (p.density * n as f64) as usize;
                let n_top = (p.gamma * n as f64) as usize;
                let n_bot = n.saturating_sub(target + n_top);
                let hi_rank = (n_bot + target).min(n);
                if target == 0 || n_bot >= hi_rank {
                    Keep::Nothing
                } else {
                    let mut v = self.magnitudes(parent, base);
                    torch_select_magnitudes(&mut v, false, &[n_bot, hi_rank - 1]);
                    let (lo, hi) = (v[n_bot].0, v[hi_rank - 1].0);
                    let ties = sorted_ties(&v[n_bot..hi_rank], n, |m| m == lo || m == hi);
                    super::values::MAGNITUDES.give(v);
                    Keep::Band { lo, hi, ties }
                }
            }
            Sparsify::Random => {
                // l.130: torch.full_like(tensor, density, dtype=work_dtype).
                Keep::Random { p: scalar(work_dtype(d), p.density) }
            }
            Sparsify::Della => {
                if p.density <= 0.0 {
                    Keep::Nothing
                } else {
                    if p.density + p.epsilon >= 1.0 || p.density - p.epsilon <= 0.0 {
                        return Err(KernelError::Invalid(
                            "Epsilon must be chosen such that density +/- epsilon is in (0, 1)".into(),
                        ));
                    }
                    Keep::Della { lo: p.density - p.epsilon, eps: p.epsilon }
                }
            }
        };
        let work = match method {
            Sparsify::Random | Sparsify::Della => work_dtype(d),
            _ => d,
        };
        let factor = if g.rescale && !matches!(keep, Keep::All | Keep::Nothing) {
            // `rescaled_masked_tensor` l.40-55: L1 norms in the work dtype, `masked * (before / after)`,
            // unless either is below eps.
            let stream = stream_key(self.seed, self.name_key, k);
            let row = self.row_len();
            let delta: Vec<f32> = parent.iter().zip(base).map(|(&x, &y)| round(d, x - y)).collect();
            let mut masked = vec![0f32; n];
            self.mask_range(&keep, stream, 0, row, &delta, work, &mut masked);
            let abs: Vec<f32> = delta.iter().map(|&x| round(work, x).abs()).collect();
            let before = sum(work, &abs, self.threads);
            let abs: Vec<f32> = masked.iter().map(|x| x.abs()).collect();
            let after = sum(work, &abs, self.threads);
            let eps = round(work, 1e-7);
            if before < eps || after < eps {
                None
            } else {
                Some(round(work, before / after))
            }
        } else {
            None
        };
        Ok(ParentStats { keep, factor })
    }

    /// `(|parent - base| in the compute dtype, index)` of every element: what torch's argsort of
    /// the delta's magnitudes orders. One pass over the whole tensor at its first read, split
    /// over the rayon pool (no delta tensor of its own), into a recycled buffer (every element
    /// written).
    fn magnitudes(&self, parent: &[f32], base: &[f32]) -> Vec<(f32, u32)> {
        /// Elements per task: enough to make a task's overhead noise.
        const PIECE: usize = 1 << 16;
        let d = self.dtype;
        let mut v = super::values::MAGNITUDES.take(parent.len());
        v.par_chunks_mut(PIECE).enumerate().for_each(|(c, out)| {
            let at = c * PIECE;
            magnitudes_into(d, &parent[at..], &base[at..], at as u32, out);
        });
        v
    }

    /// `tensor * mask` over `delta[..]` (elements `start..`), in the work dtype.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mask_range(
        &self,
        keep: &Keep,
        stream: u64,
        start: usize,
        row: usize,
        delta: &[f32],
        work: Dtype,
        out: &mut [f32],
    ) {
        match keep {
            Keep::All => out.copy_from_slice(delta),
            Keep::Nothing => {
                for (o, &x) in out.iter_mut().zip(delta) {
                    *o = x * 0.0;
                }
            }
            Keep::Top { mag, ties } => {
                for (i, (o, &x)) in out.iter_mut().zip(delta).enumerate() {
                    let m = x.abs();
                    let keep = m > *mag || (m == *mag && ties.binary_search(&((start + i) as u32)).is_ok());
                    *o = if keep { x } else { x * 0.0 };
                }
            }
            Keep::Band { lo, hi, ties } => {
                for (i, (o, &x)) in out.iter_mut().zip(delta).enumerate() {
                    let m = x.abs();
                    let keep = (m > *lo && m < *hi)
                        || ((m == *lo || m == *hi) && ties.binary_search(&((start + i) as u32)).is_ok());
                    *o = if keep { x } else { x * 0.0 };
                }
            }
            Keep::Random { p } => {
                for (i, (o, &x)) in out.iter_mut().zip(delta).enumerate() {
                    let m = if uniform(stream, (start + i) as u64) < *p { 1.0 } else { 0.0 };
                    *o = round(work, round(work, x) * m);
                }
            }
            Keep::Della { lo, eps } => {
                // l.160-170, per row: ranks = argsort(argsort(|x|)) + 1 in the work dtype,
                // rank_norm = ((ranks - min) / (max - min)).clamp(0, 1),
                // probs = (density - epsilon) + rank_norm * 2 * epsilon.
                let w = work;
                let lo32 = *lo as f32;
                let eps32 = *eps as f32;
                for (r, (orow, xrow)) in out.chunks_mut(row).zip(delta.chunks(row)).enumerate() {
                    let base = start + r * row;
                    let mut order: Vec<u32> = (0..xrow.len() as u32).collect();
                    order.sort_by(|&a, &b| {
                        xrow[a as usize].abs().total_cmp(&xrow[b as usize].abs()).then(a.cmp(&b))
                    });
                    let mut rank = vec![0f32; xrow.len()];
                    for (pos, &i) in order.iter().enumerate() {
                        rank[i as usize] = round(w, round(w, pos as f32) + 1.0);
                    }
                    let min = round(w, 1.0);
                    let max = round(w, round(w, (xrow.len() - 1) as f32) + 1.0);
                    let span = round(w, max - min);
                    for (i, (o, &x)) in orow.iter_mut().zip(xrow).enumerate() {
                        let rn = round(w, round(w, rank[i] - min) / span).clamp(0.0, 1.0);
                        let prob = round(w, lo32 + round(w, round(w, rn * 2.0) * eps32));
                        let m = if uniform(stream, (base + i) as u64) < prob { 1.0 } else { 0.0 };
                        *o = round(w, round(w, x) * m);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{gta, merge, parents};
    use super::super::Stats;
    use super::*;

    #[test]
    fn dare_keeps_density_within_three_sigma_and_matches_l1() {
        let n = 200_000;
        let d = Dtype::F32;
        let k = gta(false, Some(Sparsify::Random), 0.3, true);
        let m = merge(&k, Some(0), d, vec![n]);
        let ps = parents(d, n, 4, 1);
        let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
        let Stats::Gta(st) = m.stats(&refs).unwrap() else { panic!() };
        let delta: Vec<f32> = ps[1].iter().zip(&ps[0]).map(|(&x, &b)| x - b).collect();
        let mut masked = vec![0f32; n];
        m.mask_range(&st[0].keep, stream_key(5, name_key("w"), 0), 0, n, &delta, d, &mut masked);
        let nonzero = delta.iter().filter(|&&x| x != 0.0).count() as f64;
        let kept = masked.iter().filter(|&&x| x != 0.0).count() as f64;
        let p = 0.3;
        let sigma = (nonzero * p * (1.0 - p)).sqrt();
        assert!((kept - nonzero * p).abs() < 3.0 * sigma, "kept {kept} of {nonzero}");
        // L1 rescale: |masked| * factor sums to |delta|.
        let f = st[0].factor.unwrap();
        let l1: f64 = delta.iter().map(|x| x.abs() as f64).sum();
        let l1m: f64 = masked.iter().map(|x| (x * f).abs() as f64).sum();
        assert!((l1 - l1m).abs() / l1 < 1e-4, "{l1} vs {l1m}");
    }

    #[test]
    fn masks_depend_on_seed_tensor_and_parent_only() {
        let a = stream_key(1, name_key("x"), 0);
        assert_eq!(a, stream_key(1, name_key("x"), 0));
        assert_ne!(a, stream_key(2, name_key("x"), 0));
        assert_ne!(a, stream_key(1, name_key("y"), 0));
        assert_ne!(a, stream_key(1, name_key("x"), 1));
        assert_eq!(uniform(a, 12345), uniform(a, 12345));
    }
}

//! A merge's whole-tensor statistics in the compact form stored with the entry: each parent's
//! kept ties at the magnitude cut as index intervals instead of an index list.
//!
//! Why: a bf16 fine-tune's deltas take few distinct magnitudes, so millions of elements of a
//! tensor share the cut's magnitude and the list of the kept ones runs to megabytes (40 MB for a
//! 1 GB model's TIES merge of three fine-tunes). But torch's introsort moves runs of equal
//! elements together, so taken in index order the tied elements are kept or dropped in a few
//! hundred runs per tensor. A run is stored as the interval from its first to its last index;
//! that is exact: between a run's first and last element lies no tied element that is dropped
//! (else the run would end there), so a tied element is kept iff it lies inside an interval.
//! A read rebuilds the kept ties of its range from the intervals and the parents' values there
//! ([`CompactStats::resolve`]); no read needs the whole tensor.

use std::ops::Range;

use rayon::prelude::*;

use super::torch::round_bf16;
use super::{round, Keep, Stats, TensorMerge};
use crate::format::Dtype;

/// Inclusive index intervals `(first, last)`, increasing and disjoint.
pub type TieRuns = Vec<(u32, u32)>;

/// [`Stats`] with every tie list empty, and per parent (in `Stats::Gta`'s order) the intervals
/// that hold its kept ties (empty for masks without ties, and for other methods: no entries).
#[derive(Clone, Debug, PartialEq)]
pub struct CompactStats {
    pub stats: Stats,
    pub runs: Vec<TieRuns>,
}

/// The cut magnitudes of a mask with ties, and its tie list.
fn cut(keep: &Keep) -> Option<(f32, f32, &[u32])> {
    match keep {
        Keep::Top { mag, ties } => Some((*mag, *mag, ties)),
        Keep::Band { lo, hi, ties } => Some((*lo, *hi, ties)),
        _ => None,
    }
}

fn clear_ties(keep: &mut Keep) {
    if let Keep::Top { ties, .. } | Keep::Band { ties, .. } = keep {
        ties.clear();
    }
}

impl CompactStats {
    /// The compact form of `stats`, `merge`'s statistics over the whole tensors `parents`.
    pub fn compact(merge: &TensorMerge, stats: &Stats, parents: &[&[f32]]) -> CompactStats {
        let (Stats::Gta(per), Some(b)) = (stats, merge.base) else {
            return CompactStats { stats: stats.clone(), runs: vec![] };
        };
        let others = merge.non_base(parents.len());
        let runs = per
            .par_iter()
            .zip(&others)
            .map(|(p, &j)| match cut(&p.keep) {
                Some((lo, hi, ties)) => runs_of(ties, |range, f| {
                    each_tied(merge.dtype, (parents[j], parents[b]), 0, range, (lo, hi), f)
                }),
                None => vec![],
            })
            .collect();
        let mut stats = stats.clone();
        if let Stats::Gta(per) = &mut stats {
            per.iter_mut().for_each(|p| clear_ties(&mut p.keep));
        }
        CompactStats { stats, runs }
    }

    /// The statistics for elements `[start, start + len)`: each tie list holds the kept ties of
    /// that range (all `apply` looks at), rebuilt from the intervals and `parents`, the inputs'
    /// values in that range.
    pub fn resolve(&self, merge: &TensorMerge, parents: &[&[f32]], start: usize) -> Stats {
        let (Stats::Gta(per), Some(b)) = (&self.stats, merge.base) else {
            return self.stats.clone();
        };
        let others = merge.non_base(parents.len());
        let mut out = per.clone();
        for ((p, runs), &j) in out.iter_mut().zip(&self.runs).zip(&others) {
            if let Some((lo, hi, _)) = cut(&p.keep) {
                let ties = ties_in(runs, start, parents[j].len(), |range, f| {
                    each_tied(merge.dtype, (parents[j], parents[b]), start, range, (lo, hi), f)
                });
                if let Keep::Top { ties: t, .. } | Keep::Band { ties: t, .. } = &mut p.keep {
                    *t = ties;
                }
            }
        }
        Stats::Gta(out)
    }
}

/// Calls `f` with every tied index of a range, in increasing order (see [`each_tied`]).
type TiedIn<'a> = dyn FnMut(usize) + 'a;

/// The runs of `ties` (sorted, each a tied index) among the tied elements of `0..` in index
/// order (`tied(range, f)` calls `f` with each tied index of `range`), as intervals. Every
/// index up to the last tie is visited.
fn runs_of(ties: &[u32], tied: impl Fn(Range<usize>, &mut TiedIn)) -> TieRuns {
    let mut runs = vec![];
    let mut open: Option<(u32, u32)> = None;
    let mut next = 0;
    let end = ties.last().map_or(0, |&t| t as usize + 1);
    tied(0..end, &mut |i| {
        if ties.get(next) == Some(&(i as u32)) {
            next += 1;
            open = Some((open.map_or(i as u32, |r| r.0), i as u32));
        } else if let Some(r) = open.take() {
            runs.push(r);
        }
    });
    runs.extend(open);
    debug_assert_eq!(next, ties.len(), "every listed tie is tied");
    runs
}

/// The tied elements of `[start, start + len)` inside `runs`, in order (`tied` as for
/// [`runs_of`]).
fn ties_in(
    runs: &[(u32, u32)],
    start: usize,
    len: usize,
    tied: impl Fn(Range<usize>, &mut TiedIn),
) -> Vec<u32> {
    let end = start + len;
    let first = runs.partition_point(|r| (r.1 as usize) < start);
    let mut out = vec![];
    for &(a, z) in &runs[first..] {
        if a as usize >= end {
            break;
        }
        let (lo, hi) = ((a as usize).max(start), (z as usize + 1).min(end));
        tied(lo..hi, &mut |i| out.push(i as u32));
    }
    out
}

/// Calls `f` with each index `i` of `range` (increasing) whose delta's magnitude,
/// `|round(parent - base)|` at position `i - at` of `(parent, base)`, is `cut.0` or `cut.1`.
/// Why so: this scan visits every element of every parent of a TIES merge (at `llmfs merge`,
/// and per range at each read); element by element behind a closure it was a third of the
/// merge's time. Here 64 elements make a bit mask in a branch-free loop the compiler
/// vectorizes, with the rounding chosen once, and only the set bits are visited.
fn each_tied(
    dtype: Dtype,
    (parent, base): (&[f32], &[f32]),
    at: usize,
    range: Range<usize>,
    cut: (f32, f32),
    f: &mut TiedIn,
) {
    let (p, b) = (&parent[range.start - at..range.end - at], &base[range.start - at..range.end - at]);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // 256-bit compares where the CPU has them (the build's baseline is SSE2): same result.
        #[target_feature(enable = "avx2")]
        fn avx2(dtype: Dtype, p: &[f32], b: &[f32], first: usize, cut: (f32, f32), f: &mut TiedIn) {
            each_tied_in(dtype, p, b, first, cut, f)
        }
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2(dtype, p, b, range.start, cut, f) };
    }
    each_tied_in(dtype, p, b, range.start, cut, f)
}

#[inline(always)]
fn each_tied_in(dtype: Dtype, p: &[f32], b: &[f32], first: usize, cut: (f32, f32), f: &mut TiedIn) {
    match dtype {
        Dtype::BF16 => each_tied_with(round_bf16, p, b, first, cut, f),
        Dtype::F16 => each_tied_with(|x| round(Dtype::F16, x), p, b, first, cut, f),
        _ => each_tied_with(|x| x, p, b, first, cut, f),
    }
}

#[inline(always)]
fn each_tied_with(
    round: impl Fn(f32) -> f32,
    parent: &[f32],
    base: &[f32],
    first: usize,
    (lo, hi): (f32, f32),
    f: &mut TiedIn,
) {
    // A flag byte per element (the compare loop vectorizes), read back eight at a time: most
    // words are zero, and a set byte's low bit is the lowest set bit of its word.
    let mut flags = [0u8; 64];
    for (c, (pc, bc)) in parent.chunks(64).zip(base.chunks(64)).enumerate() {
        if pc.len() < 64 {
            flags = [0u8; 64];
        }
        for ((t, &x), &y) in flags.iter_mut().zip(pc).zip(bc) {
            let m = round(x - y).abs();
            *t = ((m == lo) | (m == hi)) as u8;
        }
        for (w, word) in flags.chunks_exact(8).enumerate() {
            let mut bits = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            while bits != 0 {
                f(first + c * 64 + w * 8 + bits.trailing_zeros() as usize / 8);
                bits &= bits - 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{all_kernels, merge};
    use super::super::{stream_key, uniform};
    use super::*;
    use proptest::prelude::*;

    /// A base and fine-tunes whose deltas take few magnitudes (as bf16 fine-tunes' do), so the
    /// cut falls among many ties.
    fn coarse(n: usize, inputs: usize, seed: u64) -> Vec<Vec<f32>> {
        let base: Vec<f32> = (0..n).map(|i| round(Dtype::BF16, 1.0 + uniform(seed, i as u64))).collect();
        let mut out = vec![base.clone()];
        for k in 1..inputs {
            let s = stream_key(seed, 3, k);
            let step = 1.0 / 128.0;
            out.push(
                base.iter()
                    .enumerate()
                    .map(|(i, &b)| {
                        round(Dtype::BF16, b + ((uniform(s, i as u64) * 5.0) as i32 - 2) as f32 * step)
                    })
                    .collect(),
            );
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Resolved over any aligned split, the compact form gives the tie lists of the range
        /// and the same bits as the full statistics.
        #[test]
        fn compact_statistics_apply_as_the_full_ones(rows in 1usize..9, cols in 1usize..200, chunk in 1usize..300, seed in any::<u64>()) {
            let d = Dtype::BF16;
            for (k, base, inputs) in all_kernels() {
                let m = merge(&k, base, d, vec![rows, cols]);
                let n = rows * cols;
                let ps = coarse(n, inputs, seed);
                let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
                let stats = m.stats(&refs).unwrap();
                let compact = CompactStats::compact(&m, &stats, &refs);
                let whole = m.merge_whole(&refs).unwrap();
                let g = m.granularity();
                let step = chunk.div_ceil(g) * g;
                let mut out = vec![0f32; n];
                let mut s = 0;
                while s < n {
                    let e = (s + step).min(n);
                    let sl: Vec<&[f32]> = refs.iter().map(|p| &p[s..e]).collect();
                    let local = compact.resolve(&m, &sl, s);
                    if let (Stats::Gta(full), Stats::Gta(part)) = (&stats, &local) {
                        for (f, p) in full.iter().zip(part) {
                            if let (Some((_, _, ft)), Some((_, _, pt))) = (cut(&f.keep), cut(&p.keep)) {
                                let want: Vec<u32> = ft.iter().copied().filter(|&t| (s..e).contains(&(t as usize))).collect();
                                prop_assert_eq!(pt, &want[..]);
                            }
                        }
                    }
                    m.apply(&local, &sl, s, &mut out[s..e]).unwrap();
                    s = e;
                }
                let wb: Vec<u32> = whole.iter().map(|x| x.to_bits()).collect();
                let ob: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                prop_assert_eq!(wb, ob, "{:?}", k);
            }
        }
    }

    #[test]
    fn runs_are_the_kept_stretches_of_the_tied_elements() {
        // Tied: every even index; kept: 2, 4, 8, 10, 12.
        let even = |r: Range<usize>, f: &mut TiedIn| r.filter(|i| i % 2 == 0).for_each(f);
        let runs = runs_of(&[2, 4, 8, 10, 12], even);
        assert_eq!(runs, vec![(2, 4), (8, 12)]);
        assert_eq!(ties_in(&runs, 3, 8, even), vec![4, 8, 10]);
        assert_eq!(ties_in(&runs, 0, 2, even), Vec::<u32>::new());
    }

    /// The bit-mask scan finds exactly the elements an element-by-element test finds, at any
    /// offset and length, in every dtype.
    #[test]
    fn each_tied_visits_exactly_the_tied_elements() {
        for (d, seed) in [(Dtype::BF16, 1), (Dtype::F16, 2), (Dtype::F32, 3)] {
            let ps = coarse(1000, 2, seed);
            let (p, b) = (&ps[1], &ps[0]);
            let mags: Vec<f32> = p.iter().zip(b).map(|(&x, &y)| round(d, x - y).abs()).collect();
            let (lo, hi) = (mags[7], mags[500]);
            for (at, range) in [(0, 0..1000), (0, 3..130), (100, 164..229), (0, 999..1000), (5, 5..5)] {
                let want: Vec<usize> = range.clone().filter(|&i| mags[i] == lo || mags[i] == hi).collect();
                let mut got = vec![];
                each_tied(d, (&p[at..], &b[at..]), at, range.clone(), (lo, hi), &mut |i| got.push(i));
                assert_eq!(got, want, "{d:?} {range:?}");
            }
        }
    }
}

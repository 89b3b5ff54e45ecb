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

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

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
fn round_bf16(x: f32) -> f32 {
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
fn fma_accumulate(out: &mut [f32], p: &[f32], w: f32) {
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
fn work_dtype(d: Dtype) -> Dtype {
    if d == Dtype::BF16 {
        Dtype::BF16
    } else {
        Dtype::F32
    }
}

/// torch's descending order of magnitudes: NaN first, then larger before smaller.
fn sorts_before_descending(a: &(f32, u32), b: &(f32, u32)) -> bool {
    (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0
}

/// torch's ascending order of magnitudes: smaller before larger, NaN last.
fn sorts_before_ascending(a: &(f32, u32), b: &(f32, u32)) -> bool {
    (!a.0.is_nan() && b.0.is_nan()) || a.0 < b.0
}

/// torch's CPU `sort`/`argsort` of one f32 row, unstable (ATen `SortingKernel.cpp` calls
/// `std::sort` on (value, index) pairs compared by value; torch's wheels use libstdc++): its
/// introsort replayed step by step, so equal magnitudes come out in the same order as torch's.
pub fn torch_sort(v: &mut [(f32, u32)], descending: bool) {
    // Two comparators, each its own instance of the sort (a `dyn` comparator was an indirect
    // call per comparison: most of a TIES merge's time).
    if descending {
        sort_by(v, &sorts_before_descending)
    } else {
        sort_by(v, &sorts_before_ascending)
    }
}

/// What [`torch_sort`] puts at positions `need` (each of them exact), with every element in the
/// same stretch between needed positions as torch's sort puts there, in some order: the sort's
/// replay, skipping every side of a partition that holds no needed position and every leaf
/// (16 or fewer elements) that holds none. Its sides are never crossed by the later steps (after
/// a partition, no element of the right side compares below one of the left), so which elements
/// land left of a position does not depend on how the skipped sides would have been sorted. A
/// top-k set then costs a few passes over the data instead of a whole sort (`log2 n` of them).
pub fn torch_select(v: &mut [(f32, u32)], descending: bool, need: &[usize]) {
    if descending {
        select_by(v, &sorts_before_descending, need)
    } else {
        select_by(v, &sorts_before_ascending, need)
    }
}

fn select_by<C: Fn(&(f32, u32), &(f32, u32)) -> bool + Sync>(v: &mut [(f32, u32)], comp: &C, need: &[usize]) {
    let n = v.len();
    if n < 2 {
        return;
    }
    let lg = (usize::BITS - 1 - n.leading_zeros()) as usize;
    introsort_steps(v, 0, Some(need), 2 * lg, comp);
}

/// libstdc++'s `std::sort` with `comp` (strict weak order), step by step.
fn sort_by<C: Fn(&(f32, u32), &(f32, u32)) -> bool + Sync>(v: &mut [(f32, u32)], comp: &C) {
    let n = v.len();
    if n < 2 {
        return;
    }
    let lg = (usize::BITS - 1 - n.leading_zeros()) as usize;
    introsort_steps(v, 0, None, 2 * lg, comp);
    // __final_insertion_sort
    if n > 16 {
        insertion_sort(v, 0, 16, comp);
        for i in 16..n {
            unguarded_linear_insert(v, i, comp);
        }
    } else {
        insertion_sort(v, 0, n, comp);
    }
}

/// Subarrays at least this long are sorted on two threads (rayon's join): after a partition
/// the two sides are independent, so the replay's steps, and so its result, are the same.
const PARALLEL_SORT_MIN: usize = 1 << 16;

/// libstdc++'s `__introsort_loop` on all of `v` (`need`: None; the caller's final insertion
/// sort orders the leaves), or only its steps that decide positions `need` of it (`v` starting
/// at position `offset` of the whole; the leaves holding one are insertion-sorted here):
/// partition around a median of three, sort the right side, loop on the left, heap sort past
/// the depth limit; sides of 16 or fewer are leaves.
fn introsort_steps<C: Fn(&(f32, u32), &(f32, u32)) -> bool + Sync>(
    v: &mut [(f32, u32)],
    offset: usize,
    need: Option<&[usize]>,
    mut depth: usize,
    comp: &C,
) {
    let mut v = v;
    let wanted = |offset: usize, len: usize| {
        need.is_none_or(|need| need.iter().any(|&p| p >= offset && p < offset + len))
    };
    while v.len() > 16 {
        if !wanted(offset, v.len()) {
            return;
        }
        if depth == 0 {
            heap_sort(v, comp);
            return;
        }
        depth -= 1;
        let last = v.len();
        // __unguarded_partition_pivot: median of (first + 1, mid, last - 1) moved to first.
        let mid = last / 2;
        let (a, b, c) = (1, mid, last - 1);
        let m = if comp(&v[a], &v[b]) {
            if comp(&v[b], &v[c]) {
                b
            } else if comp(&v[a], &v[c]) {
                c
            } else {
                a
            }
        } else if comp(&v[a], &v[c]) {
            a
        } else if comp(&v[b], &v[c]) {
            c
        } else {
            b
        };
        v.swap(0, m);
        // __unguarded_partition(first + 1, last, pivot = first)
        let (mut lo, mut hi) = (1, last);
        let cut = loop {
            while comp(&v[lo], &v[0]) {
                lo += 1;
            }
            hi -= 1;
            while comp(&v[0], &v[hi]) {
                hi -= 1;
            }
            if lo >= hi {
                break lo;
            }
            v.swap(lo, hi);
            lo += 1;
        };
        let (left, right) = std::mem::take(&mut v).split_at_mut(cut);
        if last >= PARALLEL_SORT_MIN {
            rayon::join(
                || introsort_steps(right, offset + cut, need, depth, comp),
                || introsort_steps(left, offset, need, depth, comp),
            );
            return;
        }
        introsort_steps(right, offset + cut, need, depth, comp);
        v = left;
    }
    if need.is_some() && wanted(offset, v.len()) {
        let len = v.len();
        insertion_sort(v, 0, len, comp);
    }
}

fn insertion_sort<C: Fn(&(f32, u32), &(f32, u32)) -> bool>(
    v: &mut [(f32, u32)],
    first: usize,
    last: usize,
    comp: &C,
) {
    for i in first + 1..last {
        if comp(&v[i], &v[first]) {
            let val = v[i];
            v.copy_within(first..i, first + 1);
            v[first] = val;
        } else {
            unguarded_linear_insert(v, i, comp);
        }
    }
}

fn unguarded_linear_insert<C: Fn(&(f32, u32), &(f32, u32)) -> bool>(
    v: &mut [(f32, u32)],
    mut last: usize,
    comp: &C,
) {
    let val = v[last];
    while comp(&val, &v[last - 1]) {
        v[last] = v[last - 1];
        last -= 1;
    }
    v[last] = val;
}

/// `__partial_sort(first, last, last)`: libstdc++'s make_heap then sort_heap.
fn heap_sort<C: Fn(&(f32, u32), &(f32, u32)) -> bool>(v: &mut [(f32, u32)], comp: &C) {
    let len = v.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let val = v[parent];
        adjust_heap(v, parent, len, val, comp);
        if parent == 0 {
            break;
        }
        parent -= 1;
    }
    let mut last = len;
    while last > 1 {
        last -= 1;
        let val = v[last];
        v[last] = v[0];
        adjust_heap(v, 0, last, val, comp);
    }
}

fn adjust_heap<C: Fn(&(f32, u32), &(f32, u32)) -> bool>(
    v: &mut [(f32, u32)],
    mut hole: usize,
    len: usize,
    val: (f32, u32),
    comp: &C,
) {
    let top = hole;
    let mut second = hole;
    while len > 2 && second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if comp(&v[second], &v[second - 1]) {
            second -= 1;
        }
        v[hole] = v[second];
        hole = second;
    }
    if len & 1 == 0 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        v[hole] = v[second - 1];
        hole = second - 1;
    }
    // __push_heap
    let mut parent = hole.saturating_sub(1) / 2;
    while hole > top && comp(&v[parent], &val) {
        v[hole] = v[parent];
        hole = parent;
        parent = hole.saturating_sub(1) / 2;
    }
    v[hole] = val;
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
fn norm(dtype: Dtype, x: &[f32]) -> f32 {
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

fn one() -> usize {
    1
}

/// torch's `GRAIN_SIZE`: reductions over fewer elements run on one thread.
const GRAIN: usize = 32768;

/// A sum over a tensor of `dtype` values as torch computes it with `threads` intra-op threads
/// (`TensorIteratorBase::parallel_reduce`: below `GRAIN` or on one thread, one cascade sum;
/// else `two_pass_reduction`: `at::parallel_for`'s chunks of `max(GRAIN, ceil(n / threads))`
/// elements, each summed into a buffer of the output dtype, the buffers then added in order).
fn sum(dtype: Dtype, x: &[f32], threads: usize) -> f32 {
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
        let d = self.dtype;
        Ok(match &self.kernel {
            Kernel::Linear { .. } | Kernel::Passthrough { .. } => Stats::None,
            Kernel::Gta(g) => {
                let b =
                    self.base.ok_or_else(|| KernelError::Invalid("task arithmetic needs a base".into()))?;
                let others = self.non_base(parents.len());
                let mut out = Vec::new();
                for (k, &j) in others.iter().enumerate() {
                    let p = &g.parents[k];
                    let delta: Vec<f32> =
                        parents[j].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect();
                    out.push(self.parent_stats(g, p, k, &delta)?);
                }
                Stats::Gta(out)
            }
            Kernel::Slerp { t } => self.slerp_stats(*t, parents),
            Kernel::Nuslerp { t } => self.nuslerp_stats(*t, parents),
            Kernel::ModelStock => self.model_stock_stats(parents),
        })
    }

    fn parent_stats(
        &self,
        g: &Gta,
        p: &GtaParent,
        k: usize,
        delta: &[f32],
    ) -> Result<ParentStats, KernelError> {
        let d = self.dtype;
        let n = delta.len();
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
                    let mut v: Vec<(f32, u32)> =
                        delta.iter().enumerate().map(|(i, &x)| (x.abs(), i as u32)).collect();
                    torch_select(&mut v, true, &[kk - 1]);
                    let mag = v[kk - 1].0;
                    let mut ties: Vec<u32> = v[..kk].iter().filter(|e| e.0 == mag).map(|e| e.1).collect();
                    ties.sort_unstable();
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
                    let mut v: Vec<(f32, u32)> =
                        delta.iter().enumerate().map(|(i, &x)| (x.abs(), i as u32)).collect();
                    torch_select(&mut v, false, &[n_bot, hi_rank - 1]);
                    let (lo, hi) = (v[n_bot].0, v[hi_rank - 1].0);
                    let mut ties: Vec<u32> =
                        v[n_bot..hi_rank].iter().filter(|e| e.0 == lo || e.0 == hi).map(|e| e.1).collect();
                    ties.sort_unstable();
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
            let mut masked = vec![0f32; n];
            self.mask_range(&keep, stream, 0, row, delta, work, &mut masked);
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

    /// `tensor * mask` over `delta[..]` (elements `start..`), in the work dtype.
    #[allow(clippy::too_many_arguments)]
    fn mask_range(
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

    fn slerp_stats(&self, t: f64, parents: &[&[f32]]) -> Stats {
        // slerp.py l.30-80, for one output (the batch's leading axis is 1 here).
        let b = self.base.unwrap_or(0);
        let (a, v) = (parents[b], parents[1 - b]);
        const CHUNK: usize = 1024 * 1024;
        let t32 = t as f32;
        let n = a.len();
        if n == 0 {
            return Stats::Slerp { coef_a: 1.0 - t32, coef_b: t32 };
        }
        // Norms of chunk norms: a norm over the stacked chunks axis (an outer reduction, in order).
        let chunk_norms = |x: &[f32]| -> f32 {
            let mut s = 0f32;
            for c in x.chunks(CHUNK) {
                let q = norm(Dtype::F32, c);
                s += q * q;
            }
            s.sqrt()
        };
        let na = chunk_norms(a);
        let nb = chunk_norms(v);
        let eps = 1e-8f32;
        let na = if na > eps { na } else { 1.0 };
        let nb = if nb > eps { nb } else { 1.0 };
        let mut dot = 0f32;
        for (ca, cb) in a.chunks(CHUNK).zip(v.chunks(CHUNK)) {
            let prod: Vec<f32> = ca.iter().zip(cb).map(|(&x, &y)| (x / na) * (y / nb)).collect();
            dot += sum(Dtype::F32, &prod, self.threads);
        }
        let dot = dot.clamp(-1.0, 1.0);
        let linear = dot.abs() > 0.9995f32;
        let theta = (if linear { 0.0 } else { dot }).acos();
        let sin_theta = theta.sin();
        let one_t = 1.0 - t32;
        let coef_a = if linear { one_t } else { (one_t * theta).sin() / sin_theta };
        let coef_b = if linear { t32 } else { (t32 * theta).sin() / sin_theta };
        Stats::Slerp { coef_a, coef_b }
    }

    fn nuslerp_stats(&self, t: f64, parents: &[&[f32]]) -> Stats {
        // nuslerp.py l.17-50 with flatten=True, in the compute dtype.
        let d = self.dtype;
        let nb = self.non_base(parents.len());
        let (v0, v1) = self.nuslerp_inputs(parents, &nb);
        let clamp_min = round(d, 1e-7);
        let n0 = norm(d, &v0).max(clamp_min);
        let n1 = norm(d, &v1).max(clamp_min);
        let prod: Vec<f32> =
            v0.iter().zip(&v1).map(|(&x, &y)| round(d, round(d, x / n0) * round(d, y / n1))).collect();
        let cos = sum(d, &prod, self.threads).clamp(-1.0, 1.0);
        let eps2 = round(d, 1e-16);
        let colinear = round(d, 1.0 - round(d, cos * cos)) <= eps2;
        let theta = round(d, (if colinear { 0.0 } else { cos }).acos());
        let sin_theta = round(d, theta.sin());
        let s0 = round(d, round(d, theta * (1.0 - t) as f32).sin());
        let s1 = round(d, round(d, theta * t as f32).sin());
        Stats::Nuslerp { s0, s1, sin_theta, colinear }
    }

    /// NuSLERP's two vectors over `parents` (whole or a range): task vectors when there is a base.
    fn nuslerp_inputs(&self, parents: &[&[f32]], nb: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let d = self.dtype;
        match self.base {
            Some(b) => (
                parents[nb[0]].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect(),
                parents[nb[1]].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect(),
            ),
            None => (parents[nb[0]].to_vec(), parents[nb[1]].to_vec()),
        }
    }

    fn model_stock_stats(&self, parents: &[&[f32]]) -> Stats {
        // model_stock.py l.28-63 (filter_wise=False): everything in the compute dtype.
        let d = self.dtype;
        let b = self.base.unwrap_or(0);
        let others = self.non_base(parents.len());
        let offsets: Vec<Vec<f32>> = others
            .iter()
            .map(|&j| parents[j].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect())
            .collect();
        let norms: Vec<f32> = offsets.iter().map(|o| norm(d, o)).collect();
        let mut cos = Vec::new();
        let min = round(d, 1e-6);
        for a in 0..offsets.len() {
            for c in a + 1..offsets.len() {
                let np = round(d, norms[a] * norms[c]);
                let prod: Vec<f32> =
                    offsets[a].iter().zip(&offsets[c]).map(|(&x, &y)| round(d, x * y)).collect();
                let dot = sum(d, &prod, self.threads);
                cos.push(round(d, dot / np.max(min)).clamp(-1.0, 1.0));
            }
        }
        // `mean` on bf16/f16: f32 sum, f32 divide, one rounding (ATen mean_out).
        let mut s = 0f32;
        for &c in &cos {
            s += c;
        }
        let cos_theta = round(d, s / cos.len() as f32);
        let count = offsets.len() as f32;
        let den = round(d, 1.0 + round(d, (count - 1.0) * cos_theta));
        let singular = den.abs() < round(d, 1e-6);
        let t = if singular { 0.0 } else { round(d, round(d, count * cos_theta) / den) };
        Stats::ModelStock { t }
    }

    /// Compute elements `[start, start + out.len())` of the merged tensor from the parents' same
    /// range (`parents[i]` is input `i`'s values in the compute dtype). Output values are in the
    /// compute dtype (cast to `out_dtype` by the writer).
    pub fn apply(
        &self,
        stats: &Stats,
        parents: &[&[f32]],
        start: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let len = out.len();
        if parents.iter().any(|p| p.len() != len) {
            return Err(KernelError::Invalid("apply: parents' ranges differ in length".into()));
        }
        let g = self.granularity();
        if start % g != 0 || (len % g != 0 && start + len != self.numel()) {
            return Err(KernelError::Invalid(format!("apply: range not aligned to {g} elements")));
        }
        let d = self.dtype;
        match (&self.kernel, stats) {
            (Kernel::Passthrough { scale }, _) => match scale {
                None => out.copy_from_slice(parents[0]),
                Some(s) => {
                    let s = *s as f32;
                    for (o, &x) in out.iter_mut().zip(parents[0]) {
                        *o = round(d, x * s);
                    }
                }
            },
            (Kernel::Linear { weights, normalize }, _) => {
                // linear.py l.27-38: f32 (addcmul_ per input, in input order), f32 divide, round.
                let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
                let mut den = 0f32;
                for &x in &w {
                    den += x;
                }
                out.fill(0.0);
                for (p, &wj) in parents.iter().zip(&w) {
                    fma_accumulate(out, p, wj);
                }
                for o in out.iter_mut() {
                    let r = if *normalize { *o / den } else { *o };
                    *o = round(d, r);
                }
            }
            (Kernel::Gta(gta), st) => self.apply_gta(gta, st, parents, start, out)?,
            (Kernel::Slerp { .. }, Stats::Slerp { coef_a, coef_b }) => {
                let b = self.base.unwrap_or(0);
                for ((o, &x), &y) in out.iter_mut().zip(parents[b]).zip(parents[1 - b]) {
                    *o = round(d, coef_a * x + coef_b * y);
                }
            }
            (Kernel::Nuslerp { t }, Stats::Nuslerp { s0, s1, sin_theta, colinear }) => {
                let nb = self.non_base(parents.len());
                let (v0, v1) = self.nuslerp_inputs(parents, &nb);
                let (a, c) = ((1.0 - t) as f32, *t as f32);
                for (i, o) in out.iter_mut().enumerate() {
                    let r = if *colinear {
                        round(d, round(d, a * v0[i]) + round(d, c * v1[i]))
                    } else {
                        round(d, round(d, round(d, s0 * v0[i]) + round(d, s1 * v1[i])) / sin_theta)
                    };
                    *o = match self.base {
                        Some(b) => round(d, parents[b][i] + r),
                        None => r,
                    };
                }
            }
            (Kernel::ModelStock, Stats::ModelStock { t }) => {
                let b = self.base.unwrap_or(0);
                let others = self.non_base(parents.len());
                let count = others.len() as f32;
                let one_t = round(d, 1.0 - t);
                for (i, o) in out.iter_mut().enumerate() {
                    // python's sum() starts from int 0: `0 + w1` rounds -0 to +0.
                    let mut acc = round(d, 0.0 + parents[others[0]][i]);
                    for &j in &others[1..] {
                        acc = round(d, acc + parents[j][i]);
                    }
                    let avg = round(d, acc / count);
                    *o = round(d, round(d, t * avg) + round(d, one_t * parents[b][i]));
                }
            }
            _ => return Err(KernelError::Invalid("apply: statistics of another method".into())),
        }
        Ok(())
    }

    fn apply_gta(
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

    /// The whole tensor in one call: stats, then apply over everything.
    pub fn merge_whole(&self, parents: &[&[f32]]) -> Result<Vec<f32>, KernelError> {
        let stats = if self.needs_stats() { self.stats(parents)? } else { Stats::None };
        let mut out = vec![0f32; self.numel()];
        self.apply(&stats, parents, 0, &mut out)?;
        Ok(out)
    }
}

/// Decode little-endian `src` of `from` and cast each value to `to` (mergekit's cast on load).
pub fn load_as(from: Dtype, to: Dtype, src: &[u8]) -> Vec<f32> {
    let n = if from.is_float() { src.len() / from.size() } else { 0 };
    let mut v = vec![0f32; n];
    load_into(from, to, src, &mut v);
    v
}

/// [`load_as`] into `dst` (`src.len() / from.size()` values; a non-float `from` writes nothing).
pub fn load_into(from: Dtype, to: Dtype, src: &[u8], dst: &mut [f32]) {
    match from {
        Dtype::F32 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = round(to, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Dtype::F16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = round(to, f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        Dtype::BF16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = round(to, bf16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        _ => {}
    }
}

/// Encode f32 values as little-endian `to` (round to nearest even).
pub fn encode(to: Dtype, v: &[f32]) -> Vec<u8> {
    let size = if matches!(to, Dtype::BF16 | Dtype::F16) { 2 } else { 4 };
    let mut out = vec![0u8; v.len() * size];
    encode_into(to, v, &mut out);
    out
}

/// [`encode`] into `out` (`v.len()` values of `to`: 2 bytes for bf16/f16, else 4).
pub fn encode_into(to: Dtype, v: &[f32], out: &mut [u8]) {
    match to {
        Dtype::BF16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        _ => {
            for (o, &x) in out.chunks_exact_mut(4).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    fn gta(consensus: bool, sparsify: Option<Sparsify>, density: f64, rescale: bool) -> Kernel {
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

    fn all_kernels() -> Vec<(Kernel, Option<usize>, usize)> {
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
    fn parents(d: Dtype, n: usize, inputs: usize, seed: u64) -> Vec<Vec<f32>> {
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

    fn merge(kernel: &Kernel, base: Option<usize>, d: Dtype, shape: Vec<usize>) -> TensorMerge {
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

    proptest! {
        /// The introsort replay is a sort: a permutation, ordered by value (ties in any order).
        #[test]
        fn torch_sort_sorts(vals in proptest::collection::vec(0u8..12, 0..3000), desc in any::<bool>()) {
            let mut v: Vec<(f32, u32)> = vals.iter().enumerate().map(|(i, &x)| (x as f32 / 4.0, i as u32)).collect();
            torch_sort(&mut v, desc);
            let mut ids: Vec<u32> = v.iter().map(|e| e.1).collect();
            ids.sort_unstable();
            prop_assert!(ids.iter().enumerate().all(|(i, &x)| i as u32 == x));
            let ordered = v.windows(2).all(|w| if desc { w[0].0 >= w[1].0 } else { w[0].0 <= w[1].0 });
            prop_assert!(ordered);
            prop_assert!(v.iter().all(|e| e.0 == vals[e.1 as usize] as f32 / 4.0));
        }
    }

    proptest! {
        #[test]
        fn torch_select_agrees_with_torch_sort(
            vals in proptest::collection::vec(0u8..12, 1..5000),
            desc in any::<bool>(),
            a in any::<proptest::sample::Index>(),
            b in any::<proptest::sample::Index>(),
        ) {
            let v: Vec<(f32, u32)> = vals.iter().enumerate().map(|(i, &x)| (x as f32, i as u32)).collect();
            let (p, q) = { let (p, q) = (a.index(v.len()), b.index(v.len())); (p.min(q), p.max(q)) };
            let mut sorted = v.clone();
            torch_sort(&mut sorted, desc);
            let mut selected = v.clone();
            torch_select(&mut selected, desc, &[p, q]);
            prop_assert_eq!(selected[p], sorted[p]);
            prop_assert_eq!(selected[q], sorted[q]);
            // The same elements before p, and between p and q.
            let set = |s: &[(f32, u32)]| { let mut ids: Vec<u32> = s.iter().map(|e| e.1).collect(); ids.sort(); ids };
            prop_assert_eq!(set(&selected[..p]), set(&sorted[..p]));
            prop_assert_eq!(set(&selected[p..=q]), set(&sorted[p..=q]));
        }
    }

    /// Large enough for the parallel partitions: the result is the sequential replay's, on any
    /// number of threads (ties, which the replay exists for, everywhere).
    #[test]
    fn torch_sort_is_the_same_on_one_thread_and_many() {
        let n = 3 * PARALLEL_SORT_MIN + 1234;
        let vals: Vec<(f32, u32)> =
            (0..n).map(|i| (((i as u64 * 2654435761) % 97) as f32 - 48.0, i as u32)).collect();
        for desc in [true, false] {
            let sorted = |threads| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut v = vals.clone();
                pool.install(|| torch_sort(&mut v, desc));
                v.iter().map(|p| p.1).collect::<Vec<u32>>()
            };
            let one = sorted(1);
            assert_eq!(one, sorted(4), "descending {desc}");
            // The select replay's parallel sides too: the needed positions and the sets between.
            let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
            let mut sel = vals.clone();
            let need = [n / 3, n / 2];
            pool.install(|| torch_select(&mut sel, desc, &need));
            for p in need {
                assert_eq!(sel[p].1, one[p], "position {p}, descending {desc}");
            }
            let mut got: Vec<u32> = sel[..n / 3].iter().map(|e| e.1).collect();
            let mut want = one[..n / 3].to_vec();
            got.sort();
            want.sort();
            assert_eq!(got, want, "the first {} elements, descending {desc}", n / 3);
            let keys: Vec<f32> = one.iter().map(|&i| vals[i as usize].0).collect();
            assert!(keys.windows(2).all(|w| if desc { w[0] >= w[1] } else { w[0] <= w[1] }));
        }
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

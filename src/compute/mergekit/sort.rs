//! torch's CPU `sort`/`argsort` of magnitudes, replayed step by step (libstdc++'s introsort, as
//! ATen's `SortingKernel.cpp` calls it), so equal magnitudes land where torch's unstable sort puts
//! them: the TIES / breadcrumbs cut-offs keep exactly mergekit's elements. `torch_select` replays
//! only the steps that decide a few positions (a top-k cut-off without a whole sort).

/// A comparator of the replay (a strict weak order on the pairs' values), with its scans of one
/// block of [`partition`]: generic loops here; the key orders' are vectorized.
trait Order: Sync {
    fn before(&self, a: &(f32, u32), b: &(f32, u32)) -> bool;

    /// The offsets `t` of the elements of `block` that do not sort before `pivot`, increasing,
    /// into `buf`; their count.
    fn left_stops(
        &self,
        block: &[(f32, u32); SCAN_BLOCK],
        pivot: &(f32, u32),
        buf: &mut [u8; SCAN_BUF],
    ) -> usize {
        let mut count = 0;
        for (t, e) in block.iter().enumerate() {
            buf[count] = t as u8;
            count += !self.before(e, pivot) as usize;
        }
        count
    }

    /// The offsets `t` (counted back from the block's last element) of the elements of `block`
    /// that `pivot` does not sort before, increasing, into `buf`; their count.
    fn right_stops(
        &self,
        block: &[(f32, u32); SCAN_BLOCK],
        pivot: &(f32, u32),
        buf: &mut [u8; SCAN_BUF],
    ) -> usize {
        let mut count = 0;
        for (t, e) in block.iter().rev().enumerate() {
            buf[count] = t as u8;
            count += !self.before(pivot, e) as usize;
        }
        count
    }
}

/// torch's descending order of magnitudes: NaN first, then larger before smaller.
struct FloatDescending;
/// torch's ascending order of magnitudes: smaller before larger, NaN last.
struct FloatAscending;

impl Order for FloatDescending {
    fn before(&self, a: &(f32, u32), b: &(f32, u32)) -> bool {
        // `&`/`|`, not `&&`/`||`: no branches, so the block scans stay branch-free.
        (a.0.is_nan() & !b.0.is_nan()) | (a.0 > b.0)
    }
}

impl Order for FloatAscending {
    fn before(&self, a: &(f32, u32), b: &(f32, u32)) -> bool {
        (!a.0.is_nan() & b.0.is_nan()) | (a.0 < b.0)
    }
}

/// Every NaN's key in [`magnitude_key`]: above +inf's bits, so NaNs sort as one value above all.
const NAN_KEY: u32 = 0x7f80_0001;

/// A value with the sign bit clear (a magnitude, or a NaN) as a `u32` in the comparators' order:
/// its bits (monotone in the value for non-negative floats; `abs` leaves no -0.0), every NaN
/// the same key above +inf. Why: one integer compare per comparison instead of two NaN tests
/// and a float compare, in the scans that are most of a cut-off's time.
#[inline(always)]
fn magnitude_key(x: f32) -> u32 {
    x.to_bits().min(NAN_KEY)
}

/// [`FloatDescending`] (`DESCENDING`) or [`FloatAscending`] on values whose sign bits are clear,
/// compared by [`magnitude_key`]: the same result for every such pair (NaN first when
/// descending, last when ascending, all NaNs equal), so the replay makes the same moves.
struct KeyOrder<const DESCENDING: bool>;

impl<const DESCENDING: bool> Order for KeyOrder<DESCENDING> {
    fn before(&self, a: &(f32, u32), b: &(f32, u32)) -> bool {
        let (a, b) = (magnitude_key(a.0), magnitude_key(b.0));
        if DESCENDING {
            a > b
        } else {
            a < b
        }
    }

    // Left stops (not before the pivot): keys <= the pivot's when descending, >= when ascending.
    fn left_stops(
        &self,
        block: &[(f32, u32); SCAN_BLOCK],
        pivot: &(f32, u32),
        buf: &mut [u8; SCAN_BUF],
    ) -> usize {
        key_stops(self, block, pivot, !DESCENDING, false, buf)
    }

    // Right stops (the pivot not before them): keys >= the pivot's when descending, <= when
    // ascending.
    fn right_stops(
        &self,
        block: &[(f32, u32); SCAN_BLOCK],
        pivot: &(f32, u32),
        buf: &mut [u8; SCAN_BUF],
    ) -> usize {
        key_stops(self, block, pivot, DESCENDING, true, buf)
    }
}

/// A key order's block scan: the stops are the elements whose key is `>=` the pivot's (`ge`)
/// or `<=` it, their offsets counted back from the block's last element where `rev` (a right
/// scan). In 256-bit vectors where the CPU has AVX2 (8 keys compared at once, their stops'
/// offsets written 8 at a time from a table), else the generic loops: the same offsets.
fn key_stops<O: Order>(
    order: &O,
    block: &[(f32, u32); SCAN_BLOCK],
    pivot: &(f32, u32),
    ge: bool,
    rev: bool,
    buf: &mut [u8; SCAN_BUF],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU has AVX2 and POPCNT, checked just above.
        return unsafe { key_stops_avx2(block, magnitude_key(pivot.0), ge, rev, buf) };
    }
    let _ = ge;
    let mut count = 0;
    if rev {
        for (t, e) in block.iter().rev().enumerate() {
            buf[count] = t as u8;
            count += !order.before(pivot, e) as usize;
        }
    } else {
        for (t, e) in block.iter().enumerate() {
            buf[count] = t as u8;
            count += !order.before(e, pivot) as usize;
        }
    }
    count
}

/// For each 8-bit mask, the positions of its set bits packed into bytes, lowest first.
const SET_BITS: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut m = 0;
    while m < 256 {
        let (mut packed, mut n, mut bit) = (0u64, 0, 0);
        while bit < 8 {
            if m & (1 << bit) != 0 {
                packed |= (bit as u64) << (8 * n);
                n += 1;
            }
            bit += 1;
        }
        table[m] = packed;
        m += 1;
    }
    table
};

/// [`key_stops`] in AVX2: per 8 pairs, their keys gathered into one vector and compared with
/// the pivot's; the stops' offsets (from [`SET_BITS`], plus the 8's first offset) stored as 8
/// bytes after the buffer's last stop, of which the stops' count are kept.
///
/// # Safety
/// The CPU must have AVX2 and POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn key_stops_avx2(
    block: &[(f32, u32); SCAN_BLOCK],
    pivot_key: u32,
    ge: bool,
    rev: bool,
    buf: &mut [u8; SCAN_BUF],
) -> usize {
    use std::arch::x86_64::*;
    // Keys are at most NAN_KEY < 2^31: signed compares order them as unsigned ones do.
    let kp = _mm256_set1_epi32(pivot_key as i32);
    let nan = _mm256_set1_epi32(NAN_KEY as i32);
    let p = block.as_ptr() as *const __m256i;
    let mut count = 0;
    for jj in 0..SCAN_BLOCK / 8 {
        // A right scan's offsets increase from the block's end: its 8s last to first.
        let j = if rev { SCAN_BLOCK / 8 - 1 - jj } else { jj };
        // Pairs 8j..8j+8 of the block: 64 bytes inside it.
        let (a, b) = (_mm256_loadu_si256(p.add(2 * j)), _mm256_loadu_si256(p.add(2 * j + 1)));
        // (k0 i0 k1 i1 | k2 i2 k3 i3), (k4 .. | ..) -> k0 k1 k4 k5 | k2 k3 k6 k7 -> k0 .. k7.
        let k = _mm256_shuffle_ps::<0x88>(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b));
        let k = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_castps_si256(k));
        let k = _mm256_min_epi32(k, nan);
        // Not a stop: the pivot's key above the element's (ge) or below it.
        let passes = if ge { _mm256_cmpgt_epi32(kp, k) } else { _mm256_cmpgt_epi32(k, kp) };
        let stops = !(_mm256_movemask_ps(_mm256_castsi256_ps(passes)) as u8);
        let (m, first) = if rev { (stops.reverse_bits(), SCAN_BLOCK - 8 - 8 * j) } else { (stops, 8 * j) };
        let offsets = SET_BITS[m as usize] + 0x0101_0101_0101_0101 * first as u64;
        // count <= 8 * jj, so the 8 bytes end within SCAN_BLOCK + 8 = SCAN_BUF.
        buf.as_mut_ptr().add(count).cast::<u64>().write_unaligned(offsets);
        count += m.count_ones() as usize;
    }
    count
}

/// Whether every value's sign bit is clear, so the key comparators order `v` as the float ones
/// do (one pass that vectorizes; the callers' magnitudes always are).
fn all_sign_clear(v: &[(f32, u32)]) -> bool {
    v.iter().fold(0u32, |acc, e| acc | e.0.to_bits()) >> 31 == 0
}

/// torch's CPU `sort`/`argsort` of one f32 row, unstable (ATen `SortingKernel.cpp` calls
/// `std::sort` on (value, index) pairs compared by value; torch's wheels use libstdc++): its
/// introsort replayed step by step, so equal magnitudes come out in the same order as torch's.
pub fn torch_sort(v: &mut [(f32, u32)], descending: bool) {
    // Two comparators, each its own instance of the sort (a `dyn` comparator was an indirect
    // call per comparison: most of a TIES merge's time).
    match (descending, all_sign_clear(v)) {
        (true, true) => sort_by(v, &KeyOrder::<true>),
        (false, true) => sort_by(v, &KeyOrder::<false>),
        (true, false) => sort_by(v, &FloatDescending),
        (false, false) => sort_by(v, &FloatAscending),
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
    torch_select_checked(v, descending, need, all_sign_clear(v))
}

/// [`torch_select`] of magnitudes (`|x|`, so every sign bit clear, NaNs' too), which it takes
/// without checking: the check is a pass over the whole row, as much time as the cheaper
/// comparisons saved on a TIES merge (`llmfs merge`, 1 GB on 2 cores).
pub fn torch_select_magnitudes(v: &mut [(f32, u32)], descending: bool, need: &[usize]) {
    debug_assert!(all_sign_clear(v), "magnitudes have no sign bit set");
    torch_select_checked(v, descending, need, true)
}

fn torch_select_checked(v: &mut [(f32, u32)], descending: bool, need: &[usize], sign_clear: bool) {
    match (descending, sign_clear) {
        (true, true) => select_by(v, &KeyOrder::<true>, need),
        (false, true) => select_by(v, &KeyOrder::<false>, need),
        (true, false) => select_by(v, &FloatDescending, need),
        (false, false) => select_by(v, &FloatAscending, need),
    }
}

fn select_by<C: Order>(v: &mut [(f32, u32)], comp: &C, need: &[usize]) {
    let n = v.len();
    if n < 2 {
        return;
    }
    let lg = (usize::BITS - 1 - n.leading_zeros()) as usize;
    introsort_steps(v, 0, Some(need), 2 * lg, comp);
}

/// libstdc++'s `std::sort` with `comp` (strict weak order), step by step.
fn sort_by<C: Order>(v: &mut [(f32, u32)], comp: &C) {
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
fn introsort_steps<C: Order>(
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
        median_to_front(v, comp);
        let cut = partition(v, comp);
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

/// Elements per block of [`partition`]'s scans: offsets fit a `u8`, two buffers of them and
/// the block they index stay in L1.
const SCAN_BLOCK: usize = 128;
/// A scan's buffer: a block's offsets and 8 bytes of slack (the vectorized scans store 8 at once).
const SCAN_BUF: usize = SCAN_BLOCK + 8;

/// `__unguarded_partition(first + 1, last, pivot = first)` on `v` (the pivot at `v[0]`),
/// returning the cut. Hoare's scans pair the i-th element from the left that does not sort
/// before the pivot with the i-th from the right that the pivot does not sort before, and swap
/// each pair until the scans cross. While more than a block lies between them, each side is
/// scanned a block at a time (BlockQuicksort, Edelkamp and Weiss 2016): a block's stops are
/// found branch-free into a buffer of offsets, and the two buffers are paired in order — the
/// same pairs, so the same swaps, as Hoare's. The crossing is left to Hoare's own scans
/// ([`hoare_from`]), from the state after the last pair. Random magnitudes against a median
/// pivot make every branch of the plain scans a coin toss: most of a cut-off's time before.
fn partition<C: Order>(v: &mut [(f32, u32)], comp: &C) -> usize {
    let last = v.len();
    let pivot = v[0];
    // Hoare's state at the top of its loop: after k swaps, one past the k-th left stop and the
    // k-th right stop; before any, 1 and `last`.
    let (mut lo, mut hi) = (1usize, last);
    // Positions `lscan..rscan` are unscanned (so unmoved).
    let (mut lscan, mut rscan) = (1usize, last);
    let (mut lbuf, mut rbuf) = ([0u8; SCAN_BUF], [0u8; SCAN_BUF]);
    // A block's first position (left) or last (right, whose offsets count down), the next
    // unpaired stop in its buffer and the buffer's count.
    let (mut lstart, mut lnext, mut lcount) = (0usize, 0usize, 0usize);
    let (mut rstart, mut rnext, mut rcount) = (0usize, 0usize, 0usize);
    loop {
        if lnext == lcount {
            if rscan - lscan < SCAN_BLOCK {
                break;
            }
            let block = v[lscan..lscan + SCAN_BLOCK].try_into().expect("a block");
            (lstart, lnext, lcount) = (lscan, 0, comp.left_stops(block, &pivot, &mut lbuf));
            lscan += SCAN_BLOCK;
        }
        if rnext == rcount {
            if rscan - lscan < SCAN_BLOCK {
                break;
            }
            let block = v[rscan - SCAN_BLOCK..rscan].try_into().expect("a block");
            (rstart, rnext, rcount) = (rscan - 1, 0, comp.right_stops(block, &pivot, &mut rbuf));
            rscan -= SCAN_BLOCK;
        }
        let pairs = (lcount - lnext).min(rcount - rnext);
        for t in 0..pairs {
            v.swap(lstart + lbuf[lnext + t] as usize, rstart - rbuf[rnext + t] as usize);
        }
        if pairs > 0 {
            lo = lstart + lbuf[lnext + pairs - 1] as usize + 1;
            hi = rstart - rbuf[rnext + pairs - 1] as usize;
        }
        lnext += pairs;
        rnext += pairs;
    }
    hoare_from(v, &pivot, lo, hi, comp)
}

/// Hoare's loop as libstdc++ writes it, from the state (`lo`, `hi`) at the top of the loop.
fn hoare_from<C: Order>(
    v: &mut [(f32, u32)],
    pivot: &(f32, u32),
    mut lo: usize,
    mut hi: usize,
    comp: &C,
) -> usize {
    loop {
        while comp.before(&v[lo], pivot) {
            lo += 1;
        }
        hi -= 1;
        while comp.before(pivot, &v[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        v.swap(lo, hi);
        lo += 1;
    }
}

/// `__move_median_to_first(first, first + 1, mid, last - 1)`: the median of those three moved
/// to the front as the pivot (it also makes Hoare's unguarded scans stop within the row).
fn median_to_front<C: Order>(v: &mut [(f32, u32)], comp: &C) {
    let last = v.len();
    let (a, b, c) = (1, last / 2, last - 1);
    let m = if comp.before(&v[a], &v[b]) {
        if comp.before(&v[b], &v[c]) {
            b
        } else if comp.before(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if comp.before(&v[a], &v[c]) {
        a
    } else if comp.before(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(0, m);
}

fn insertion_sort<C: Order>(v: &mut [(f32, u32)], first: usize, last: usize, comp: &C) {
    for i in first + 1..last {
        if comp.before(&v[i], &v[first]) {
            let val = v[i];
            v.copy_within(first..i, first + 1);
            v[first] = val;
        } else {
            unguarded_linear_insert(v, i, comp);
        }
    }
}

fn unguarded_linear_insert<C: Order>(v: &mut [(f32, u32)], mut last: usize, comp: &C) {
    let val = v[last];
    while comp.before(&val, &v[last - 1]) {
        v[last] = v[last - 1];
        last -= 1;
    }
    v[last] = val;
}

/// `__partial_sort(first, last, last)`: libstdc++'s make_heap then sort_heap.
fn heap_sort<C: Order>(v: &mut [(f32, u32)], comp: &C) {
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

fn adjust_heap<C: Order>(v: &mut [(f32, u32)], mut hole: usize, len: usize, val: (f32, u32), comp: &C) {
    let top = hole;
    let mut second = hole;
    while len > 2 && second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if comp.before(&v[second], &v[second - 1]) {
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
    while hole > top && comp.before(&v[parent], &val) {
        v[hole] = v[parent];
        hole = parent;
        parent = hole.saturating_sub(1) / 2;
    }
    v[hole] = val;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
        /// The block scans make Hoare's swaps: the same permutation and cut as the plain loop,
        /// on rows long enough for many blocks, with ties (most values repeat) and NaNs.
        #[test]
        fn block_partition_is_hoares(
            vals in proptest::collection::vec(0u8..40, 17..3000),
            desc in any::<bool>(),
            key in any::<bool>(),
        ) {
            let mut v: Vec<(f32, u32)> = vals
                .iter()
                .enumerate()
                .map(|(i, &x)| (match x { 39 => f32::NAN, 38 => f32::from_bits(0x7fc0_1234), _ => x as f32 }, i as u32))
                .collect();
            /// The block partition and Hoare's loop on `v`, the pivot as the replay picks it (a
            /// median of three: the scans' sentinels): (cut, permutation) of each.
            type Cut = (usize, Vec<(u32, u32)>);
            fn both<O: Order>(v: &mut [(f32, u32)], order: &O) -> (Cut, Cut) {
                let bits = |v: &[(f32, u32)]| v.iter().map(|e| (e.0.to_bits(), e.1)).collect::<Vec<_>>();
                median_to_front(v, order);
                let (mut fast, mut plain) = (v.to_vec(), v.to_vec());
                let pv = plain[0];
                let cf = partition(&mut fast, order);
                let cp = hoare_from(&mut plain, &pv, 1, v.len(), order);
                ((cf, bits(&fast)), (cp, bits(&plain)))
            }
            // Every order, the key ones' vectorized scans too (the values' signs are clear).
            let (fast, plain) = match (desc, key) {
                (true, false) => both(&mut v, &FloatDescending),
                (false, false) => both(&mut v, &FloatAscending),
                (true, true) => both(&mut v, &KeyOrder::<true>),
                (false, true) => both(&mut v, &KeyOrder::<false>),
            };
            prop_assert_eq!(fast, plain);
        }
    }

    proptest! {
        /// The key comparators make the float ones' moves: on values with the sign bit clear
        /// (many ties, NaNs of several payloads, +0.0, +inf, a subnormal) the same permutation,
        /// bit for bit, for the whole sort and for the select; rows with a sign bit set
        /// (-0.0, negatives, -NaN) take the float comparators.
        #[test]
        fn key_comparators_make_the_float_ones_moves(
            vals in proptest::collection::vec(0u8..24, 0..5000),
            desc in any::<bool>(),
            neg in any::<bool>(),
            a in any::<proptest::sample::Index>(),
            b in any::<proptest::sample::Index>(),
        ) {
            let special = [
                f32::NAN,
                f32::from_bits(0x7f80_0001),
                f32::from_bits(0x7fff_ffff),
                f32::INFINITY,
                0.0,
                f32::from_bits(1),
                f32::MAX,
            ];
            let v: Vec<(f32, u32)> = vals
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let m = special.get(x as usize).copied().unwrap_or(x as f32 / 8.0);
                    (if neg && i % 7 == 3 { -m } else { m }, i as u32)
                })
                .collect();
            let bits = |v: &[(f32, u32)]| v.iter().map(|e| (e.0.to_bits(), e.1)).collect::<Vec<_>>();
            let float = |v: &mut [(f32, u32)], need: Option<&[usize]>| match (desc, need) {
                (true, None) => sort_by(v, &FloatDescending),
                (false, None) => sort_by(v, &FloatAscending),
                (true, Some(need)) => select_by(v, &FloatDescending, need),
                (false, Some(need)) => select_by(v, &FloatAscending, need),
            };
            let (mut got, mut want) = (v.clone(), v.clone());
            torch_sort(&mut got, desc);
            float(&mut want, None);
            prop_assert_eq!(bits(&got), bits(&want));
            if !v.is_empty() {
                let (p, q) = { let (p, q) = (a.index(v.len()), b.index(v.len())); (p.min(q), p.max(q)) };
                let (mut got, mut want) = (v.clone(), v.clone());
                torch_select(&mut got, desc, &[p, q]);
                float(&mut want, Some(&[p, q]));
                prop_assert_eq!(bits(&got), bits(&want));
                if !neg {
                    let mut got = v.clone();
                    torch_select_magnitudes(&mut got, desc, &[p, q]);
                    prop_assert_eq!(bits(&got), bits(&want));
                }
            }
        }
    }
}

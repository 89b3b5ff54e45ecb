//! The BitDelta lossy codec (Liu et al. 2024): the sign of `target - base` per element and one
//! f32 scale per row (the arithmetic and the sign-bit layout are defined in the parent module's
//! doc, *Lossy codecs*). The decoder is the read path's hot loop: whole blocks of 64 elements
//! vectorized (AVX2 picked at run time), large ranges split across the rayon pool, and the
//! element-by-element decoder kept as the tests' reference.

use std::ops::Range;

use rayon::prelude::*;

use super::float::Float;
use super::{bitdelta_rows, bitdelta_sign_bytes};
use crate::format::Dtype;

fn encode_bitdelta_t<T: Float>(target: &[u8], base: &[u8], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let n = rows * cols;
    let mut signs = vec![0u8; n.div_ceil(8)];
    let mut scales = vec![0f32; rows];
    if cols == 0 {
        return (signs, scales);
    }
    let row_bytes = cols * T::N;
    scales.par_iter_mut().zip(target.par_chunks(row_bytes).zip(base.par_chunks(row_bytes))).for_each(
        |(s, (t, b))| {
            let sum: f64 = t
                .chunks_exact(T::N)
                .zip(b.chunks_exact(T::N))
                .map(|(t, b)| (T::get(t) - T::get(b)).abs() as f64)
                .sum();
            *s = (sum / cols as f64) as f32;
        },
    );
    // Sign bits: 8 elements per byte, row boundaries anywhere inside a byte.
    signs.par_iter_mut().enumerate().with_min_len(4096).for_each(|(j, byte)| {
        for k in 0..8 {
            let i = j * 8 + k;
            if i >= n {
                break;
            }
            let d = T::get(&target[i * T::N..]) - T::get(&base[i * T::N..]);
            if d < 0.0 {
                *byte |= 1 << k;
            }
        }
    });
    (signs, scales)
}

/// Encode `target - base` of a `rows × cols` tensor as BitDelta: packed sign bits (see the
/// module doc for the layout) and one f32 scale per row (mean |target − base|).
///
/// # Panics
/// If `dtype` is not F16, BF16 or F32 or a buffer does not hold `rows × cols` elements.
pub fn encode_bitdelta(
    target: &[u8],
    base: &[u8],
    dtype: Dtype,
    rows: usize,
    cols: usize,
) -> (Vec<u8>, Vec<f32>) {
    let n = rows.checked_mul(cols).expect("rows × cols overflows");
    assert_eq!(target.len(), n * dtype.size(), "target must hold rows × cols elements");
    assert_eq!(base.len(), target.len(), "base and target lengths differ");
    with_float!(dtype, T => encode_bitdelta_t::<T>(target, base, rows, cols))
}

/// One element the obvious way (`half`'s conversions): the reference the blocks below are
/// tested against, and what they fall back to for the few elements outside whole blocks and
/// for blocks with a NaN.
#[inline(always)]
fn bitdelta_one<T: Float>(neg: bool, s: f32, base: &[u8], out: &mut [u8]) {
    T::put(T::get(base) + if neg { -s } else { s }, out);
}

/// Elements per block of the fast path: 8 sign bytes.
pub(super) const BITDELTA_BLOCK: usize = 64;

/// Decodes at least this many elements per task when a range is split across the pool.
const BITDELTA_PAR_MIN: usize = 1 << 18;

/// The same bits as [`bitdelta_one`] for each of 64 elements starting at a byte boundary of the
/// signs, written so that the compiler vectorizes it: the sign is XORed into the scale's sign
/// bit (`-s` is exactly that), the sum is rounded by the branch-free conversions, and a block
/// holding a NaN (never, in real weights; NaN payloads are where those conversions and `half`'s
/// may differ) is redone one element at a time.
#[inline(always)]
fn bitdelta_block<T: Float>(signs: &[u8], s: f32, base: &[u8], out: &mut [u8]) {
    let (signs, base, out) = (&signs[..8], &base[..BITDELTA_BLOCK * T::N], &mut out[..BITDELTA_BLOCK * T::N]);
    let sbits = s.to_bits();
    let mut v = [0f32; BITDELTA_BLOCK];
    // The 64 signs as two 32-bit words, element k's bit shifted up to the sign position: one
    // variable shift per lane (a test of one bit of a byte per element compiled to shuffles).
    let word = u64::from_le_bytes(signs.try_into().expect("8 sign bytes"));
    for (half, v) in v.chunks_exact_mut(32).enumerate() {
        let bits = (word >> (32 * half)) as u32;
        for (k, v) in v.iter_mut().enumerate() {
            let i = 32 * half + k;
            let sign = (bits << (31 - k)) & 0x8000_0000;
            *v = T::widen(&base[i * T::N..(i + 1) * T::N]) + f32::from_bits(sbits ^ sign);
        }
    }
    if v.iter().fold(false, |any, x| any | x.is_nan()) {
        for i in 0..BITDELTA_BLOCK {
            let neg = signs[i / 8] >> (i % 8) & 1 == 1;
            bitdelta_one::<T>(neg, s, &base[i * T::N..], &mut out[i * T::N..]);
        }
        return;
    }
    T::narrow_block(&v, out);
}

// Always inlined: in the AVX2 copy below, a call would run this SSE2 code (as it did).
#[inline(always)]
fn decode_bitdelta_t<T: Float>(
    signs: &[u8],
    scales: &[f32],
    base: &[u8],
    cols: usize,
    elems: Range<usize>,
    out: &mut [u8],
) {
    let r0 = elems.start / cols;
    let byte0 = elems.start / 8;
    let one = |i: usize, s: f32, out: &mut [u8]| {
        let j = i - elems.start;
        let neg = (signs[i / 8 - byte0] >> (i % 8)) & 1 == 1;
        bitdelta_one::<T>(neg, s, &base[j * T::N..], &mut out[j * T::N..]);
    };
    let mut i = elems.start;
    while i < elems.end {
        let r = i / cols;
        let seg_end = ((r + 1) * cols).min(elems.end);
        let s = scales[r - r0];
        // Up to a byte boundary, then whole blocks, then the rest of the row.
        let head_end = i.next_multiple_of(8).min(seg_end);
        (i..head_end).for_each(|i| one(i, s, out));
        i = head_end;
        while i + BITDELTA_BLOCK <= seg_end {
            let j = (i - elems.start) * T::N;
            let b = i / 8 - byte0;
            bitdelta_block::<T>(&signs[b..b + 8], s, &base[j..], &mut out[j..]);
            i += BITDELTA_BLOCK;
        }
        (i..seg_end).for_each(|i| one(i, s, out));
        i = seg_end;
    }
}

/// [`decode_bitdelta_t`] compiled for AVX2 (8 lanes instead of SSE2's 4), picked at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_bitdelta_avx2<T: Float>(
    signs: &[u8],
    scales: &[f32],
    base: &[u8],
    cols: usize,
    elems: Range<usize>,
    out: &mut [u8],
) {
    decode_bitdelta_t::<T>(signs, scales, base, cols, elems, out)
}

/// Decode `elems` on this thread, with AVX2 where the CPU has it.
fn decode_bitdelta_serial<T: Float>(
    signs: &[u8],
    scales: &[f32],
    base: &[u8],
    cols: usize,
    elems: Range<usize>,
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the function only requires AVX2, just checked.
        return unsafe { decode_bitdelta_avx2::<T>(signs, scales, base, cols, elems, out) };
    }
    decode_bitdelta_t::<T>(signs, scales, base, cols, elems, out)
}

/// Decode `elems`, split into pieces of whole sign bytes across the rayon pool when it is large
/// (a read of one 2 MiB chunk on the FUSE path is then decoded on every core).
fn decode_bitdelta_par<T: Float>(
    signs: &[u8],
    scales: &[f32],
    base: &[u8],
    cols: usize,
    elems: Range<usize>,
    out: &mut [u8],
) {
    if elems.len() < 2 * BITDELTA_PAR_MIN {
        return decode_bitdelta_serial::<T>(signs, scales, base, cols, elems, out);
    }
    let (r0, byte0) = (elems.start / cols, elems.start / 8);
    // Piece boundaries at multiples of 8 elements: no sign byte is shared by two pieces' ends
    // except through the first (unaligned) piece, and pieces only read the signs.
    let first_end = (elems.start + BITDELTA_PAR_MIN).next_multiple_of(8);
    let mut cuts = vec![elems.start];
    let mut at = first_end;
    while at < elems.end {
        cuts.push(at);
        at += BITDELTA_PAR_MIN;
    }
    cuts.push(elems.end);
    let mut outs = Vec::with_capacity(cuts.len() - 1);
    let mut rest = out;
    for w in cuts.windows(2) {
        let (piece, tail) = rest.split_at_mut((w[1] - w[0]) * T::N);
        outs.push((w[0]..w[1], piece));
        rest = tail;
    }
    outs.into_par_iter().for_each(|(sub, out)| {
        let rows = bitdelta_rows(cols, &sub);
        let bytes = bitdelta_sign_bytes(&sub);
        let b = (sub.start - elems.start) * T::N..(sub.end - elems.start) * T::N;
        decode_bitdelta_serial::<T>(
            &signs[bytes.start - byte0..bytes.end - byte0],
            &scales[rows.start - r0..rows.end - r0],
            &base[b],
            cols,
            sub,
            out,
        );
    });
}

/// The pre-block decoder, kept for the tests that hold the fast one to it element by element.
#[cfg(test)]
pub(super) fn decode_bitdelta_reference(
    signs: &[u8],
    scales: &[f32],
    base: &[u8],
    dtype: Dtype,
    cols: usize,
    elems: Range<usize>,
    out: &mut [u8],
) {
    fn each<T: Float>(
        signs: &[u8],
        scales: &[f32],
        base: &[u8],
        cols: usize,
        elems: Range<usize>,
        out: &mut [u8],
    ) {
        let (r0, byte0) = (elems.start / cols, elems.start / 8);
        for i in elems.clone() {
            let j = i - elems.start;
            let neg = (signs[i / 8 - byte0] >> (i % 8)) & 1 == 1;
            bitdelta_one::<T>(neg, scales[i / cols - r0], &base[j * T::N..], &mut out[j * T::N..]);
        }
    }
    if elems.is_empty() {
        return;
    }
    with_float!(dtype, T => each::<T>(signs, scales, base, cols, elems, out))
}

/// Decode elements `elems` (row-major element indices) of a BitDelta delta of a tensor with
/// rows of `cols` elements into `out`.
///
/// Slicing contract:
/// * `signs`: the bytes holding the bits of `elems`, [`bitdelta_sign_bytes`]`(&elems)` of the
///   stored signs (the first byte's low bits and the last byte's high bits are ignored);
/// * `scales`: the scales of rows [`bitdelta_rows`]`(cols, &elems)`;
/// * `base`: the base's bytes of `elems`, `elems.len() × dtype.size()`;
/// * `out`: `elems.len() × dtype.size()` bytes.
///
/// # Panics
/// If `dtype` is not F16, BF16 or F32 or a slice does not match the contract.
pub fn decode_bitdelta_range(
    signs: &[u8],
    scales: &[f32],
    base: &[u8],
    dtype: Dtype,
    cols: usize,
    elems: Range<usize>,
    out: &mut [u8],
) {
    let e = dtype.size();
    assert_eq!(signs.len(), bitdelta_sign_bytes(&elems).len(), "signs must hold the bytes of `elems`");
    assert_eq!(
        scales.len(),
        bitdelta_rows(cols, &elems).len(),
        "scales must cover exactly the rows of `elems`"
    );
    assert_eq!(base.len(), elems.len() * e, "base must hold exactly `elems`");
    assert_eq!(out.len(), elems.len() * e, "out must hold exactly `elems`");
    if elems.is_empty() {
        return;
    }
    with_float!(dtype, T => decode_bitdelta_par::<T>(signs, scales, base, cols, elems, out))
}

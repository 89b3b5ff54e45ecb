//! Delta codecs: a fine-tuned tensor stored relative to its base (FastChat's `make_delta` /
//! `apply_delta`, stored compactly).
//!
//! # Why this exists
//!
//! A fine-tune changes every weight a little. FastChat ships such models as `target - base` in
//! the same dtype, which is as large as the model and not even exact (the subtraction rounds).
//! llmfs stores a delta against the base tensor of the same name, shape and dtype, and the read
//! path rebuilds the target on every read, decoding only the chunks (or groups, or rows) that
//! the read touches. Three codecs:
//!
//! * **lossless** (the default): exact, bit for bit, for any dtype;
//! * **`q8`**: group-wise int8 of `target - base` (in f32), one f32 scale per group;
//! * **`bitdelta`**: BitDelta (Liu et al. 2024): the sign of `target - base` per element and
//!   one f32 scale per row.
//!
//! # Lossless: transform, byte planes, chunks, zstd
//!
//! Per element, the target's bit pattern is combined with the base's as an `esize`-byte
//! little-endian unsigned integer ([`Transform`]): **XOR** (`t ^ b`), **integer difference**
//! (`t - b`, wrapping), or **ulp distance** ([`Transform::Ulp`]: map both sign-magnitude
//! patterns to order-preserving integers, subtract, zigzag, so `±m` representable values
//! becomes `2m` / `2m - 1`). A tensor with no base (a new tensor) is the same codec with
//! base = 0 (XOR and Sub are then the identity; Ulp moves the sign to bit 0).
//!
//! Within a chunk, the transformed elements are split into **byte planes**: the byte 0 of every
//! element, then every byte 1, and so on. When target and base are close, the high bytes (sign,
//! exponent, top of the mantissa) of the delta are mostly zero and the low bytes noise; kept
//! apart, zstd's entropy stage sees each plane's own, much narrower, statistics and its match
//! finder sees long zero runs.
//!
//! Measured with `cargo run --release --example delta_ratio` (4 Mi elements, base =
//! `demo::random_tensor`, target = `round(base + N(0, k·std))`, ratio = raw / compressed; the
//! full table is in the example's output):
//!
//! ```text
//! dtype target    lvl | ulp+planes xor+planes      xor sub+planes      sub | no base
//! BF16  same        1 |   11275.01   11275.01 11275.01   11275.01 11275.01 |   1.473
//! BF16  k=0.001     1 |       7.21       6.57     5.30       4.87     5.54 |   1.473
//! BF16  k=0.001     3 |       7.23       6.54     5.34       4.90     5.67 |
//! BF16  k=0.001     9 |       7.87       7.04     5.97       5.53     6.35 |
//! BF16  k=0.01      1 |       3.37       2.93     2.38       2.59     2.45 |
//! BF16  k=0.01      3 |       3.22       2.86     2.32       2.51     2.53 |
//! BF16  k=0.01      9 |       3.21       2.86     2.40       2.57     2.59 |
//! BF16  k=0.1       1 |       1.88       1.73     1.56       1.72     1.54 |
//! BF16  k=0.1       3 |       1.88       1.74     1.57       1.72     1.60 |
//! BF16  k=0.1       9 |       1.92       1.78     1.59       1.75     1.63 |
//! F16   k=0.001     1 |       3.65       3.15     2.50       2.75     2.61 |   1.186
//! F16   k=0.01      1 |       1.98       1.79     1.62       1.78     1.60 |
//! F16   k=0.1       1 |       1.42       1.39     1.25       1.42     1.27 |
//! F32   k=0.001     1 |       1.78       1.71     1.46       1.61     1.42 |   1.191
//! F32   k=0.01      1 |       1.54       1.49     1.27       1.44     1.25 |
//! F32   k=0.1       1 |       1.31       1.27     1.15       1.26     1.14 |
//! ZipNN 0.5.4 on the same bf16 XOR deltas (scripts/zipnn_compare.py): 5.51 / 2.65 / 1.83
//! ```
//!
//! The default is **`Ulp` + byte planes at zstd level 1** ([`LosslessOptions::DEFAULT`],
//! [`DEFAULT_LEVEL`]). Why:
//!
//! * Byte planes win in every case (XOR: +11 to +24 %); unsplit elements mix a noisy low byte
//!   with a near-constant high byte in every pair, so zstd sees neither's statistics.
//! * `Ulp` beats XOR and integer difference for every dtype and noise level (bf16: +8 to +15 %
//!   over XOR + planes; one tie with Sub on f16 at k = 0.1). XOR turns a 1-ulp change into a
//!   run of flipped low bits when a carry ripples, and any change across a power of two flips
//!   exponent bits; plain subtraction fixes that but sign-extends negative differences into
//!   0xFF high bytes and is reversed for negative floats. Ulp distance + zigzag keeps a small
//!   change small whatever its sign, the value's sign or an exponent crossing, so the high
//!   planes stay zero. It is a bijection on bit patterns, so NaNs, infinities and integer
//!   tensors still round-trip exactly. Results are not mixed, so no per-tensor flag is stored.
//!   `Ulp` is defined for 1, 2, 4 and 8-byte elements; other widths use XOR + planes
//!   ([`LosslessOptions::default_for`]).
//! * Against ZipNN's delta mode (XOR, byte grouping, Huffman) llmfs is 1.31× / 1.27× smaller at
//!   k = 0.001 / 0.01 but only 1.03× at k = 0.1, where the ulp deltas are close to their
//!   order-0 entropy (2.02× is the order-0 bound of the planes; conditioning on the base's
//!   exponent would reach ~2.2×, a possible later refinement: sort each chunk by base exponent).
//!
//! Decode (one core, H100 host's Xeon, bf16, level 1): zstd 0.7-1.6 GB/s depending on the noise
//! (slowest on the noisiest deltas, whose low plane is near-random Huffman literals); the fused
//! plane join + inverse transform runs at 4-5 GB/s, so zstd dominates. The whole
//! [`decode_lossless_chunk`] measured 0.5-1.2 GB/s of output per core over all dtypes and
//! levels (noisy run to run; bf16 level 1: 0.5-1.0 at k = 0.001, 1.2 at k = 0.01, 0.7 at
//! k = 0.1).
//!
//! The tensor is cut into chunks of [`DELTA_CHUNK_ELEMS`] elements (the last one shorter), each
//! transformed, split and compressed **independently** as one zstd frame with the frame's
//! content size and **content checksum** (xxhash64, low 32 bits) and no dictionary. A read
//! decodes only the chunks it touches; a corrupted stored chunk fails its checksum and the read
//! gets an error, never wrong bytes.
//!
//! # Stored layout ([`EncodedChunks`])
//!
//! * `frames`: the chunks' zstd frames, back to back, in chunk order;
//! * `offsets`: `n_chunks + 1` byte offsets into `frames`; chunk `c` is
//!   `frames[offsets[c]..offsets[c + 1]]`, `offsets[0] == 0`, `offsets[n_chunks] == frames.len()`;
//! * chunk `c` holds elements [`chunk_elems`]`(c, n_elems)`; its decompressed content is the
//!   planes of those elements: `n = len` bytes of plane 0, then `n` of plane 1, …
//!   (`n × esize` bytes in all).
//!
//! Which transform (and `esize`) a tensor was stored with is the container's business (its
//! `__metadata__`); the functions here take it as an argument ([`LosslessOptions`]) and default
//! to [`LosslessOptions::DEFAULT`].
//!
//! # Decoding untrusted frames
//!
//! [`decode_lossless_chunk`] takes a frame read from disk and must neither panic nor let the
//! frame choose how much memory is used. It checks the frame header itself (magic, checksum
//! flag set, no dictionary, declared content size equal to the chunk's size, exactly one frame)
//! and then runs zstd's one-shot decoder into a buffer of exactly the chunk's size: the one-shot
//! decoder uses the destination as its window and allocates nothing that depends on the frame,
//! so memory is the chunk (a per-thread scratch buffer reused across calls) plus a per-thread
//! zstd context of fixed size, whatever the frame declares.
//!
//! # The fast path
//!
//! The per-element transform fused with the plane split ([`forward_to_planes`]) and its inverse
//! ([`inverse_from_planes`]) work on blocks of [`BLOCK`] elements held as integers in a stack
//! array, one pass per plane, so each inner loop is a fixed-length loop over plain integers that
//! the compiler vectorizes. [`delta_forward`] / [`delta_inverse`] are the bare transform (no
//! planes), the shape a GPU kernel will take. Each has an element-by-element reference
//! (`*_reference`, byte loops with explicit borrow/carry) that the tests hold it to.
//!
//! # Lossy codecs
//!
//! Both work on F16, BF16 and F32 only, compute in f32, and round the reconstruction once to
//! the dtype (round to nearest even, `half`). They are meant for finite weights: a NaN or
//! infinite difference is not preserved (q8 gives it code 0, bitdelta counts it in the row's
//! mean, which then is not finite).
//!
//! * `q8`: elements, in row-major order, are cut into groups of [`DELTA_Q8_GROUP`] consecutive
//!   elements (the last group shorter; a group may span two rows when the row length is not a
//!   multiple, which is harmless: each group has its own scale). Per group,
//!   `scale = max |d| / 127` (f32, `d = f32(t) - f32(b)`), `q = round_half_even(d / scale)`
//!   clamped to ±127 (0 where `scale == 0`), `x' = dtype(f32(b) + f32(q) * scale)`. So
//!   `|x' - t| <= scale / 2` plus f32 and dtype rounding.
//! * `bitdelta`: for `rows × cols`, `scale[r] = mean |d|` over row `r` (summed in f64, stored as
//!   f32), one sign bit per element, `x' = dtype(f32(b) ± scale[r])` (+ where `d >= 0` or `d` is
//!   NaN). Sign bits are packed flat in row-major element order, **LSB first**: element `i` is
//!   bit `i % 8` of byte `i / 8`, and a set bit means negative; `ceil(rows·cols / 8)` bytes, the
//!   unused high bits of the last byte are 0.

pub use crate::compute::delta_ops::{bitdelta_rows, bitdelta_sign_bytes, Transform};
use std::cell::RefCell;
use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::format::Dtype;

/// Elements per lossless chunk: 256 Ki.
///
/// * Ratio: zstd's gain from a larger chunk has flattened out here (bf16 deltas, the example's
///   `chunk size` table: 64 Ki elements lose up to 2 % against 256 Ki, 1 Mi gains nothing)
///   while per-frame overhead (~20 bytes of header, block headers and checksum, 8 bytes of
///   offset) stays below 0.01 %.
/// * Reads: a power of two, so a chunk is 256 KiB / 512 KiB / 1 MiB / 2 MiB of output for 1 /
///   2 / 4 / 8-byte elements and divides the read path's 2 MiB cache chunk
///   (`vfs::read::CHUNK_SIZE`): one cache chunk of a bf16 tensor is 4 delta chunks, decoded in
///   parallel, and a read never decodes more than one chunk it does not need at each end.
/// * Memory: the decode scratch (one chunk of output) fits in L2, so the plane join and the
///   inverse transform run from cache.
pub const DELTA_CHUNK_ELEMS: usize = 1 << 18;

/// Elements per `q8` group: 128, as in common int8/int4 weight formats; the f32 scale costs
/// 4 / 128 = 3 % over the 8-bit codes, and a smaller group tracks the delta's scale more closely
/// (which bounds the error: `scale / 2` per element).
pub const DELTA_Q8_GROUP: usize = 128;

/// The zstd level llmfs encodes lossless deltas with: 1. On the measured deltas (module doc)
/// level 1 compresses as well as level 3 (within ±4 %, usually better) at a fraction of the
/// encode time; level 9 gains ≤ 9 % (only on near-identical tensors) for ~10× the encode time.
/// Decode speed hardly depends on the level.
pub const DEFAULT_LEVEL: i32 = 1;

/// Elements per block of the fused transform + plane (un)split: large enough for full vectors
/// of every width, small enough that the block's integers stay in registers / L1.
pub const BLOCK: usize = 64;

/// The knobs of the lossless codec. Only [`LosslessOptions::DEFAULT`] is what llmfs writes;
/// the others exist so `examples/delta_ratio.rs` can measure the alternatives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LosslessOptions {
    pub transform: Transform,
    /// Split each chunk into byte planes before compressing (otherwise elements stay
    /// interleaved).
    pub planes: bool,
}

impl LosslessOptions {
    /// What llmfs stores for 1, 2, 4 and 8-byte elements; see the module doc for why.
    pub const DEFAULT: LosslessOptions = LosslessOptions { transform: Transform::Ulp, planes: true };

    /// What llmfs stores for `esize`-byte elements: [`Self::DEFAULT`], or XOR with planes for
    /// the widths `Ulp` does not cover.
    pub fn default_for(esize: usize) -> LosslessOptions {
        if Self::DEFAULT.transform.supports(esize) {
            Self::DEFAULT
        } else {
            LosslessOptions { transform: Transform::Xor, planes: true }
        }
    }
}

/// Errors of the lossless delta decoder: the caller's buffers do not fit, or a stored frame is
/// not what llmfs wrote.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// An element of zero bytes.
    #[error("element size must be at least 1 byte")]
    ZeroElementSize,
    /// The transform is not defined for this element size.
    #[error("transform {transform:?} does not support {esize}-byte elements")]
    Unsupported { transform: Transform, esize: usize },
    /// The output buffer is not a whole number of elements.
    #[error("output of {len} bytes is not a whole number of {esize}-byte elements")]
    PartialElement { len: usize, esize: usize },
    /// The chunk holds more elements than a lossless chunk can.
    #[error("output of {elems} elements is longer than a chunk ({max} elements)")]
    ChunkTooLong { elems: usize, max: usize },
    /// The base slice does not cover exactly the output's elements.
    #[error("base has {got} bytes, expected {expected} (the output's length)")]
    BaseLength { expected: usize, got: usize },
    /// The frame does not start with a zstd frame header.
    #[error("stored chunk is not a zstd frame ({0} bytes, bad magic or header)")]
    NotAFrame(usize),
    /// The frame was written without a content checksum, so corruption could not be detected.
    #[error("stored chunk has no content checksum")]
    NoChecksum,
    /// The frame needs a dictionary; llmfs never writes one.
    #[error("stored chunk needs a zstd dictionary")]
    Dictionary,
    /// The frame does not declare its decompressed size.
    #[error("stored chunk does not declare its size")]
    UnknownSize,
    /// The frame declares (or decodes to) a size other than the chunk's.
    #[error("stored chunk decodes to {got} bytes, expected {expected}")]
    SizeMismatch { expected: usize, got: u64 },
    /// The stored bytes are not exactly one frame (truncated, or bytes after it).
    #[error("stored chunk of {got} bytes is not exactly one zstd frame")]
    FrameLength { got: usize },
    /// zstd rejected the frame: corrupt data or a content checksum mismatch.
    #[error("stored chunk is corrupt: {0}")]
    Corrupt(String),
}

/// A tensor's lossless delta: independent zstd frames, one per chunk. See the module doc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedChunks {
    /// The frames back to back, in chunk order.
    pub frames: Vec<u8>,
    /// `n_chunks + 1` offsets into `frames`, starting at 0 and ending at `frames.len()`.
    pub offsets: Vec<u64>,
}

impl EncodedChunks {
    pub fn n_chunks(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The stored frame of chunk `c`.
    pub fn frame(&self, c: usize) -> &[u8] {
        &self.frames[self.offsets[c] as usize..self.offsets[c + 1] as usize]
    }
}

/// Number of lossless chunks of a tensor of `n_elems` elements (0 for an empty tensor).
pub fn chunk_count(n_elems: usize) -> usize {
    n_elems.div_ceil(DELTA_CHUNK_ELEMS)
}

/// The elements of chunk `chunk` of a tensor of `n_elems` elements (empty past the end).
pub fn chunk_elems(chunk: usize, n_elems: usize) -> Range<usize> {
    let start = chunk.saturating_mul(DELTA_CHUNK_ELEMS).min(n_elems);
    start..start.saturating_add(DELTA_CHUNK_ELEMS).min(n_elems)
}

/// The chunks that hold elements `elems` of a tensor.
pub fn chunks_covering(elems: &Range<usize>) -> Range<usize> {
    if elems.is_empty() {
        return 0..0;
    }
    elems.start / DELTA_CHUNK_ELEMS..(elems.end - 1) / DELTA_CHUNK_ELEMS + 1
}

// ---------------------------------------------------------------------------------------------
// Per-element transform: fast paths and references.
// ---------------------------------------------------------------------------------------------

/// An element as an unsigned little-endian integer (1, 2, 4 or 8 bytes).
trait Word: Copy + Default + std::ops::BitXor<Output = Self> + std::ops::BitOr<Output = Self> {
    const N: usize;
    fn load(b: &[u8]) -> Self;
    fn store(self, b: &mut [u8]);
    fn byte(self, k: usize) -> u8;
    fn from_byte(v: u8, k: usize) -> Self;
    fn wsub(self, o: Self) -> Self;
    fn wadd(self, o: Self) -> Self;
    /// `Transform::Ulp` forward: `zigzag(ord(t) - ord(b))`.
    fn ulp_fwd(self, b: Self) -> Self;
    /// `Transform::Ulp` inverse: `ord⁻¹(unzigzag(d) + ord(b))`.
    fn ulp_inv(self, b: Self) -> Self;
}

macro_rules! word {
    ($t:ty, $s:ty) => {
        impl Word for $t {
            const N: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn load(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b[..Self::N].try_into().unwrap())
            }
            #[inline(always)]
            fn store(self, b: &mut [u8]) {
                b[..Self::N].copy_from_slice(&self.to_le_bytes())
            }
            #[inline(always)]
            fn byte(self, k: usize) -> u8 {
                (self >> (8 * k)) as u8
            }
            #[inline(always)]
            fn from_byte(v: u8, k: usize) -> Self {
                (v as $t) << (8 * k)
            }
            #[inline(always)]
            fn wsub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            #[inline(always)]
            fn wadd(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn ulp_fwd(self, b: Self) -> Self {
                const SH: u32 = <$t>::BITS - 1;
                // ord: negative (top bit set) flips the other bits; an involution.
                let ord = |v: $t| v ^ ((((v as $s) >> SH) as $t) >> 1);
                let d = ord(self).wrapping_sub(ord(b));
                (d << 1) ^ (((d as $s) >> SH) as $t)
            }
            #[inline(always)]
            fn ulp_inv(self, b: Self) -> Self {
                const SH: u32 = <$t>::BITS - 1;
                let ord = |v: $t| v ^ ((((v as $s) >> SH) as $t) >> 1);
                let d = (self >> 1) ^ (0 as $t).wrapping_sub(self & 1);
                ord(d.wrapping_add(ord(b)))
            }
        }
    };
}
word!(u8, i8);
word!(u16, i16);
word!(u32, i32);
word!(u64, i64);

/// Reference of `Transform::Ulp` for one element of `bits` ≤ 64 bits held in a u64, written
/// with explicit sign tests instead of shifts.
fn ulp_reference(forward: bool, v: u64, b: u64, bits: u32) -> u64 {
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let top = 1u64 << (bits - 1);
    let ord = |x: u64| if x & top != 0 { x ^ (top - 1) } else { x };
    if forward {
        let d = ord(v).wrapping_sub(ord(b)) & mask;
        if d & top != 0 {
            (!d << 1 | 1) & mask
        } else {
            d << 1 & mask
        }
    } else {
        let d = if v & 1 == 1 { !(v >> 1) & mask } else { v >> 1 };
        ord(d.wrapping_add(ord(b)) & mask)
    }
}

fn ulp_elem_reference(forward: bool, a: &[u8], b: &[u8], out: &mut [u8]) {
    let n = a.len();
    assert!(Transform::Ulp.supports(n), "Ulp needs 1, 2, 4 or 8-byte elements, not {n}");
    let mut av = [0u8; 8];
    let mut bv = [0u8; 8];
    av[..n].copy_from_slice(a);
    bv[..n].copy_from_slice(b);
    let r = ulp_reference(forward, u64::from_le_bytes(av), u64::from_le_bytes(bv), 8 * n as u32);
    out.copy_from_slice(&r.to_le_bytes()[..n]);
}

/// Reference forward transform of one element of any width: byte loop with explicit borrow.
fn forward_elem_reference(tr: Transform, t: &[u8], b: &[u8], d: &mut [u8]) {
    match tr {
        Transform::Xor => {
            for k in 0..t.len() {
                d[k] = t[k] ^ b[k];
            }
        }
        Transform::Sub => {
            let mut borrow = 0u16;
            for k in 0..t.len() {
                let v = (t[k] as u16).wrapping_sub(b[k] as u16).wrapping_sub(borrow);
                d[k] = v as u8;
                borrow = (v >> 15) & 1;
            }
        }
        Transform::Ulp => ulp_elem_reference(true, t, b, d),
    }
}

/// Reference inverse transform of one element of any width: byte loop with explicit carry.
fn inverse_elem_reference(tr: Transform, d: &[u8], b: &[u8], t: &mut [u8]) {
    match tr {
        Transform::Xor => {
            for k in 0..d.len() {
                t[k] = d[k] ^ b[k];
            }
        }
        Transform::Sub => {
            let mut carry = 0u16;
            for k in 0..d.len() {
                let v = d[k] as u16 + b[k] as u16 + carry;
                t[k] = v as u8;
                carry = v >> 8;
            }
        }
        Transform::Ulp => ulp_elem_reference(false, d, b, t),
    }
}

/// Element by element definition of [`delta_forward`].
pub fn delta_forward_reference(tr: Transform, esize: usize, target: &[u8], base: &[u8], out: &mut [u8]) {
    assert!(esize > 0 && target.len() % esize == 0);
    assert!(base.len() == target.len() && out.len() == target.len());
    for ((t, b), d) in
        target.chunks_exact(esize).zip(base.chunks_exact(esize)).zip(out.chunks_exact_mut(esize))
    {
        forward_elem_reference(tr, t, b, d);
    }
}

/// Element by element definition of [`delta_inverse`].
pub fn delta_inverse_reference(tr: Transform, esize: usize, delta: &[u8], base: &[u8], out: &mut [u8]) {
    assert!(esize > 0 && delta.len() % esize == 0);
    assert!(base.len() == delta.len() && out.len() == delta.len());
    for ((d, b), t) in
        delta.chunks_exact(esize).zip(base.chunks_exact(esize)).zip(out.chunks_exact_mut(esize))
    {
        inverse_elem_reference(tr, d, b, t);
    }
}

#[inline(always)]
fn map_words<W: Word>(a: &[u8], b: &[u8], out: &mut [u8], f: impl Fn(W, W) -> W) {
    for ((a, b), o) in a.chunks_exact(W::N).zip(b.chunks_exact(W::N)).zip(out.chunks_exact_mut(W::N)) {
        f(W::load(a), W::load(b)).store(o);
    }
}

/// `out = transform(target, base)` per element (no planes). All three slices have the same
/// length, a multiple of `esize`.
///
/// # Panics
/// On mismatched lengths or `esize == 0`.
pub fn delta_forward(tr: Transform, esize: usize, target: &[u8], base: &[u8], out: &mut [u8]) {
    assert!(esize > 0 && target.len() % esize == 0);
    assert!(base.len() == target.len() && out.len() == target.len());
    match (tr, esize) {
        (Transform::Xor, _) => {
            for ((t, b), o) in target.iter().zip(base).zip(out.iter_mut()) {
                *o = t ^ b;
            }
        }
        (Transform::Sub, 1) => map_words::<u8>(target, base, out, W::wsub),
        (Transform::Ulp, 1) => map_words::<u8>(target, base, out, W::ulp_fwd),
        (Transform::Sub, 2) => map_words::<u16>(target, base, out, W::wsub),
        (Transform::Ulp, 2) => map_words::<u16>(target, base, out, W::ulp_fwd),
        (Transform::Sub, 4) => map_words::<u32>(target, base, out, W::wsub),
        (Transform::Ulp, 4) => map_words::<u32>(target, base, out, W::ulp_fwd),
        (Transform::Sub, 8) => map_words::<u64>(target, base, out, W::wsub),
        (Transform::Ulp, 8) => map_words::<u64>(target, base, out, W::ulp_fwd),
        _ => delta_forward_reference(tr, esize, target, base, out),
    }
}

/// `out = inverse(delta, base)` per element (no planes): the target's bytes.
///
/// # Panics
/// On mismatched lengths or `esize == 0`.
pub fn delta_inverse(tr: Transform, esize: usize, delta: &[u8], base: &[u8], out: &mut [u8]) {
    assert!(esize > 0 && delta.len() % esize == 0);
    assert!(base.len() == delta.len() && out.len() == delta.len());
    match (tr, esize) {
        (Transform::Xor, _) => {
            for ((d, b), o) in delta.iter().zip(base).zip(out.iter_mut()) {
                *o = d ^ b;
            }
        }
        (Transform::Sub, 1) => map_words::<u8>(delta, base, out, W::wadd),
        (Transform::Ulp, 1) => map_words::<u8>(delta, base, out, W::ulp_inv),
        (Transform::Sub, 2) => map_words::<u16>(delta, base, out, W::wadd),
        (Transform::Ulp, 2) => map_words::<u16>(delta, base, out, W::ulp_inv),
        (Transform::Sub, 4) => map_words::<u32>(delta, base, out, W::wadd),
        (Transform::Ulp, 4) => map_words::<u32>(delta, base, out, W::ulp_inv),
        (Transform::Sub, 8) => map_words::<u64>(delta, base, out, W::wadd),
        (Transform::Ulp, 8) => map_words::<u64>(delta, base, out, W::ulp_inv),
        _ => delta_inverse_reference(tr, esize, delta, base, out),
    }
}

/// Shorthand so `W::wsub` names the trait method in the dispatch tables above.
use self::Word as W;

/// Reference of [`forward_to_planes`]: transform each element, then write its byte `k` to
/// plane `k`.
pub fn forward_to_planes_reference(
    tr: Transform,
    esize: usize,
    target: &[u8],
    base: Option<&[u8]>,
    planes: &mut [u8],
) {
    assert!(esize > 0 && target.len() % esize == 0 && planes.len() == target.len());
    let n = target.len() / esize;
    let zero = vec![0u8; esize];
    let mut d = vec![0u8; esize];
    for i in 0..n {
        let t = &target[i * esize..][..esize];
        let b = base.map_or(&zero[..], |b| &b[i * esize..][..esize]);
        forward_elem_reference(tr, t, b, &mut d);
        for k in 0..esize {
            planes[k * n + i] = d[k];
        }
    }
}

/// Reference of [`inverse_from_planes`].
pub fn inverse_from_planes_reference(
    tr: Transform,
    esize: usize,
    planes: &[u8],
    base: Option<&[u8]>,
    out: &mut [u8],
) {
    assert!(esize > 0 && out.len() % esize == 0 && planes.len() == out.len());
    let n = out.len() / esize;
    let zero = vec![0u8; esize];
    let mut d = vec![0u8; esize];
    for i in 0..n {
        for k in 0..esize {
            d[k] = planes[k * n + i];
        }
        let b = base.map_or(&zero[..], |b| &b[i * esize..][..esize]);
        inverse_elem_reference(tr, &d, b, &mut out[i * esize..][..esize]);
    }
}

#[inline(always)]
fn forward_planes_w<W: Word>(target: &[u8], base: Option<&[u8]>, planes: &mut [u8], f: impl Fn(W, W) -> W) {
    let n = target.len() / W::N;
    let full = n - n % BLOCK;
    let mut tmp = [W::default(); BLOCK];
    for i0 in (0..full).step_by(BLOCK) {
        let t = &target[i0 * W::N..][..BLOCK * W::N];
        for (j, v) in tmp.iter_mut().enumerate() {
            *v = W::load(&t[j * W::N..]);
        }
        match base {
            Some(base) => {
                let b = &base[i0 * W::N..][..BLOCK * W::N];
                for (j, v) in tmp.iter_mut().enumerate() {
                    *v = f(*v, W::load(&b[j * W::N..]));
                }
            }
            None => {
                for v in tmp.iter_mut() {
                    *v = f(*v, W::default());
                }
            }
        }
        for k in 0..W::N {
            let p: &mut [u8; BLOCK] = (&mut planes[k * n + i0..][..BLOCK]).try_into().unwrap();
            for (o, v) in p.iter_mut().zip(tmp.iter()) {
                *o = v.byte(k);
            }
        }
    }
    for i in full..n {
        let mut v = W::load(&target[i * W::N..]);
        v = f(v, base.map_or(W::default(), |b| W::load(&b[i * W::N..])));
        for k in 0..W::N {
            planes[k * n + i] = v.byte(k);
        }
    }
}

#[inline(always)]
fn inverse_planes_w<W: Word>(planes: &[u8], base: Option<&[u8]>, out: &mut [u8], f: impl Fn(W, W) -> W) {
    let n = out.len() / W::N;
    let full = n - n % BLOCK;
    for i0 in (0..full).step_by(BLOCK) {
        let mut tmp = [W::default(); BLOCK];
        for k in 0..W::N {
            let p: &[u8; BLOCK] = (&planes[k * n + i0..][..BLOCK]).try_into().unwrap();
            for (v, &x) in tmp.iter_mut().zip(p.iter()) {
                *v = *v | W::from_byte(x, k);
            }
        }
        match base {
            Some(base) => {
                let b = &base[i0 * W::N..][..BLOCK * W::N];
                for (j, v) in tmp.iter_mut().enumerate() {
                    *v = f(*v, W::load(&b[j * W::N..]));
                }
            }
            None => {
                for v in tmp.iter_mut() {
                    *v = f(*v, W::default());
                }
            }
        }
        let o = &mut out[i0 * W::N..][..BLOCK * W::N];
        for (j, v) in tmp.iter().enumerate() {
            v.store(&mut o[j * W::N..]);
        }
    }
    for i in full..n {
        let mut v = W::default();
        for k in 0..W::N {
            v = v | W::from_byte(planes[k * n + i], k);
        }
        v = f(v, base.map_or(W::default(), |b| W::load(&b[i * W::N..])));
        v.store(&mut out[i * W::N..]);
    }
}

/// Transform `target` against `base` (None: zeros, i.e. no transform) and split the result into
/// byte planes: `planes[k * n + i]` is byte `k` of element `i`'s delta, `n = target.len() /
/// esize`. The fast path of [`forward_to_planes_reference`].
///
/// # Panics
/// On mismatched lengths or `esize == 0`.
pub fn forward_to_planes(tr: Transform, esize: usize, target: &[u8], base: Option<&[u8]>, planes: &mut [u8]) {
    assert!(esize > 0 && target.len() % esize == 0 && planes.len() == target.len());
    assert!(base.is_none_or(|b| b.len() == target.len()));
    macro_rules! go {
        ($w:ty) => {
            match tr {
                Transform::Xor => forward_planes_w::<$w>(target, base, planes, |a, b| a ^ b),
                Transform::Sub => forward_planes_w::<$w>(target, base, planes, W::wsub),
                Transform::Ulp => forward_planes_w::<$w>(target, base, planes, W::ulp_fwd),
            }
        };
    }
    match esize {
        1 => go!(u8),
        2 => go!(u16),
        4 => go!(u32),
        8 => go!(u64),
        _ => forward_to_planes_reference(tr, esize, target, base, planes),
    }
}

/// Join byte planes and undo the transform against `base` (None: zeros): the inverse of
/// [`forward_to_planes`]. The fast path of [`inverse_from_planes_reference`].
///
/// # Panics
/// On mismatched lengths or `esize == 0`.
pub fn inverse_from_planes(tr: Transform, esize: usize, planes: &[u8], base: Option<&[u8]>, out: &mut [u8]) {
    assert!(esize > 0 && out.len() % esize == 0 && planes.len() == out.len());
    assert!(base.is_none_or(|b| b.len() == out.len()));
    macro_rules! go {
        ($w:ty) => {
            match tr {
                Transform::Xor => inverse_planes_w::<$w>(planes, base, out, |a, b| a ^ b),
                Transform::Sub => inverse_planes_w::<$w>(planes, base, out, W::wadd),
                Transform::Ulp => inverse_planes_w::<$w>(planes, base, out, W::ulp_inv),
            }
        };
    }
    match esize {
        1 => go!(u8),
        2 => go!(u16),
        4 => go!(u32),
        8 => go!(u64),
        _ => inverse_from_planes_reference(tr, esize, planes, base, out),
    }
}

// ---------------------------------------------------------------------------------------------
// Lossless codec.
// ---------------------------------------------------------------------------------------------

/// Lay out one chunk as it is compressed: transformed, split into planes or not.
fn chunk_payload(opts: LosslessOptions, esize: usize, target: &[u8], base: Option<&[u8]>, out: &mut [u8]) {
    if opts.planes {
        forward_to_planes(opts.transform, esize, target, base, out);
    } else {
        match base {
            Some(b) => delta_forward(opts.transform, esize, target, b, out),
            None => delta_forward(opts.transform, esize, target, &vec![0u8; target.len()], out),
        }
    }
}

/// Encode a tensor's lossless delta with [`LosslessOptions::default_for`]`(esize)`: `target` against `base`
/// (same length; None for a new tensor), `esize`-byte elements, zstd `level` (see
/// [`DEFAULT_LEVEL`]). Chunks are encoded in parallel (rayon).
///
/// # Panics
/// If `esize == 0`, `target.len()` is not a multiple of `esize`, or `base` has another length.
/// (`encode_lossless_with` also panics for a transform that does not support `esize`.)
pub fn encode_lossless(target: &[u8], base: Option<&[u8]>, esize: usize, level: i32) -> EncodedChunks {
    encode_lossless_with(target, base, esize, level, LosslessOptions::default_for(esize))
}

/// [`encode_lossless`] with explicit options (for measuring the alternatives).
pub fn encode_lossless_with(
    target: &[u8],
    base: Option<&[u8]>,
    esize: usize,
    level: i32,
    opts: LosslessOptions,
) -> EncodedChunks {
    assert!(esize > 0, "element size must be at least 1");
    assert!(opts.transform.supports(esize), "{:?} does not support {esize}-byte elements", opts.transform);
    assert!(target.len() % esize == 0, "target is not a whole number of elements");
    assert!(base.is_none_or(|b| b.len() == target.len()), "base and target lengths differ");
    let n = target.len() / esize;
    let frames: Vec<Vec<u8>> = (0..chunk_count(n))
        .into_par_iter()
        .map(|c| {
            let r = chunk_elems(c, n);
            let bytes = r.start * esize..r.end * esize;
            encode_chunk_with(&target[bytes.clone()], base.map(|b| &b[bytes]), esize, level, opts)
        })
        .collect();
    let mut offsets = Vec::with_capacity(frames.len() + 1);
    offsets.push(0u64);
    let total: usize = frames.iter().map(Vec::len).sum();
    let mut all = Vec::with_capacity(total);
    for f in frames {
        all.extend_from_slice(&f);
        offsets.push(all.len() as u64);
    }
    EncodedChunks { frames: all, offsets }
}

/// A zstd compression context for one level, the payload scratch and the output scratch.
type EncoderState = (i32, zstd::bulk::Compressor<'static>, Vec<u8>, Vec<u8>);

thread_local! {
    /// Per thread: a zstd compression context for one level (with the content size and checksum
    /// flags set), the payload scratch (one chunk of planes) and the output scratch (zstd's bound
    /// for one chunk), reused across chunks so encoding allocates only each frame it returns.
    static ENCODER: RefCell<Option<EncoderState>> = const { RefCell::new(None) };
}

/// Encode ONE chunk of a tensor's lossless delta with [`LosslessOptions::default_for`]`(esize)`:
/// `target` is the chunk's elements ([`chunk_elems`]), `base` the base's same elements (None for
/// a tensor with no base). Returns the chunk's zstd frame, exactly the frame
/// [`encode_lossless`] stores for that chunk, so a tensor can be coded chunk by chunk as its bytes
/// arrive (the `deltas/` write path) and read back with [`decode_lossless_chunk`].
///
/// # Panics
/// Like [`encode_lossless`], and if `target` holds more than [`DELTA_CHUNK_ELEMS`] elements.
pub fn encode_lossless_chunk(target: &[u8], base: Option<&[u8]>, esize: usize, level: i32) -> Vec<u8> {
    let opts = LosslessOptions::default_for(esize);
    assert!(esize > 0 && target.len() % esize == 0, "target is not a whole number of elements");
    assert!(base.is_none_or(|b| b.len() == target.len()), "base and target lengths differ");
    assert!(target.len() / esize <= DELTA_CHUNK_ELEMS, "more than one chunk");
    encode_chunk_with(target, base, esize, level, opts)
}

fn encode_chunk_with(
    target: &[u8],
    base: Option<&[u8]>,
    esize: usize,
    level: i32,
    opts: LosslessOptions,
) -> Vec<u8> {
    ENCODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, ..)| *l != level) {
            let mut c = zstd::bulk::Compressor::new(level).expect("zstd compression context");
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).expect("zstd checksum flag");
            c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))
                .expect("zstd content size flag");
            *cell = Some((level, c, Vec::new(), Vec::new()));
        }
        let (_, comp, payload, out) = cell.as_mut().expect("just set");
        payload.resize(target.len(), 0);
        chunk_payload(opts, esize, target, base, payload);
        let bound = zstd::zstd_safe::compress_bound(target.len());
        if out.len() < bound {
            out.resize(bound, 0);
        }
        // The output holds zstd's bound, so compressing cannot fail but for allocation failure.
        let n = comp.compress_to_buffer(&payload[..], &mut out[..]).expect("zstd compress");
        out[..n].to_vec()
    })
}

/// zstd's frame magic number, little-endian (RFC 8878, 3.1.1).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Check what the frame header says before zstd decodes a byte (RFC 8878, 3.1.1.1): one frame,
/// with a content checksum, no dictionary, declaring exactly `expected` bytes.
fn check_frame(frame: &[u8], expected: usize) -> Result<(), DeltaError> {
    if frame.len() < 6 || frame[..4] != ZSTD_MAGIC {
        return Err(DeltaError::NotAFrame(frame.len()));
    }
    let fhd = frame[4];
    if fhd & 0b100 == 0 {
        return Err(DeltaError::NoChecksum);
    }
    if fhd & 0b11 != 0 {
        return Err(DeltaError::Dictionary);
    }
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size == expected as u64 => {}
        Ok(Some(size)) => return Err(DeltaError::SizeMismatch { expected, got: size }),
        Ok(None) => return Err(DeltaError::UnknownSize),
        Err(_) => return Err(DeltaError::NotAFrame(frame.len())),
    }
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(len) if len == frame.len() => Ok(()),
        _ => Err(DeltaError::FrameLength { got: frame.len() }),
    }
}

thread_local! {
    /// Per thread: a zstd decoding context (fixed size) and the scratch the planes are
    /// decompressed into (grows to the largest chunk decoded on this thread: at most
    /// `DELTA_CHUNK_ELEMS × esize` bytes).
    static DECODER: RefCell<Option<(zstd::bulk::Decompressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Decode ONE whole chunk of a lossless delta with [`LosslessOptions::default_for`]`(esize)` into `out`.
///
/// `out.len()` is the chunk's element count ([`chunk_elems`]) × `esize`; `base`, when the
/// tensor has one, is the base's bytes of the same elements (same length as `out`). The frame
/// is untrusted: anything but the frame llmfs wrote for exactly these elements is an error
/// (never a panic, never wrong bytes short of a checksum collision), and memory stays at
/// `out.len()` plus a fixed-size zstd context whatever the frame declares.
pub fn decode_lossless_chunk(
    frame: &[u8],
    base: Option<&[u8]>,
    esize: usize,
    out: &mut [u8],
) -> Result<(), DeltaError> {
    decode_lossless_chunk_with(frame, base, esize, LosslessOptions::default_for(esize), out)
}

/// [`decode_lossless_chunk`] with explicit options.
pub fn decode_lossless_chunk_with(
    frame: &[u8],
    base: Option<&[u8]>,
    esize: usize,
    opts: LosslessOptions,
    out: &mut [u8],
) -> Result<(), DeltaError> {
    if esize == 0 {
        return Err(DeltaError::ZeroElementSize);
    }
    if !opts.transform.supports(esize) {
        return Err(DeltaError::Unsupported { transform: opts.transform, esize });
    }
    if out.len() % esize != 0 {
        return Err(DeltaError::PartialElement { len: out.len(), esize });
    }
    if out.len() / esize > DELTA_CHUNK_ELEMS {
        return Err(DeltaError::ChunkTooLong { elems: out.len() / esize, max: DELTA_CHUNK_ELEMS });
    }
    if let Some(b) = base {
        if b.len() != out.len() {
            return Err(DeltaError::BaseLength { expected: out.len(), got: b.len() });
        }
    }
    check_frame(frame, out.len())?;
    DECODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            let d = zstd::bulk::Decompressor::new().map_err(|e| DeltaError::Corrupt(e.to_string()))?;
            *cell = Some((d, Vec::new()));
        }
        let (dec, scratch) = cell.as_mut().expect("just set");
        // Without planes and without base, the XOR / Sub payload is the output itself.
        let direct = !opts.planes && base.is_none() && opts.transform != Transform::Ulp;
        let buf: &mut [u8] = if direct {
            &mut *out
        } else {
            if scratch.len() < out.len() {
                scratch.resize(out.len(), 0);
            }
            &mut scratch[..out.len()]
        };
        let got = dec.decompress_to_buffer(frame, buf).map_err(|e| DeltaError::Corrupt(e.to_string()))?;
        if got != out.len() {
            return Err(DeltaError::SizeMismatch { expected: out.len(), got: got as u64 });
        }
        if !direct {
            let payload = &scratch[..out.len()];
            if opts.planes {
                inverse_from_planes(opts.transform, esize, payload, base, out);
            } else {
                match base {
                    Some(b) => delta_inverse(opts.transform, esize, payload, b, out),
                    None => delta_inverse(opts.transform, esize, payload, &vec![0u8; out.len()], out),
                }
            }
        }
        Ok(())
    })
}

/// Decode a whole tensor (all chunks, in parallel): a convenience for tests and tools; the read
/// path decodes chunk by chunk.
pub fn decode_lossless_all(
    enc: &EncodedChunks,
    base: Option<&[u8]>,
    esize: usize,
    opts: LosslessOptions,
    out: &mut [u8],
) -> Result<(), DeltaError> {
    if esize == 0 {
        return Err(DeltaError::ZeroElementSize);
    }
    if out.len() % esize != 0 {
        return Err(DeltaError::PartialElement { len: out.len(), esize });
    }
    let n = out.len() / esize;
    if enc.offsets.len() != chunk_count(n) + 1 {
        return Err(DeltaError::FrameLength { got: enc.frames.len() });
    }
    out.par_chunks_mut(DELTA_CHUNK_ELEMS * esize).enumerate().try_for_each(|(c, o)| {
        let (a, b) = (enc.offsets[c] as usize, enc.offsets[c + 1] as usize);
        let frame = enc.frames.get(a..b).ok_or(DeltaError::FrameLength { got: enc.frames.len() })?;
        let r = chunk_elems(c, n);
        decode_lossless_chunk_with(frame, base.map(|b| &b[r.start * esize..r.end * esize]), esize, opts, o)
    })
}

// ---------------------------------------------------------------------------------------------
// Lossy codecs: f32 arithmetic over F16 / BF16 / F32 elements.
// ---------------------------------------------------------------------------------------------

/// A float dtype the lossy codecs read and write.
trait Float: Send + Sync {
    const N: usize;
    fn get(b: &[u8]) -> f32;
    fn put(v: f32, b: &mut [u8]);
    /// Exactly [`Float::get`] for every value but NaN (branch-free, so loops vectorize).
    fn widen(b: &[u8]) -> f32;
    /// `put` of each of `v` (no NaN among them) into `out`, vectorized.
    fn narrow_block(v: &[f32; BITDELTA_BLOCK], out: &mut [u8]);
}

struct F16;
struct BF16;
struct F32;

impl Float for F16 {
    const N: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
    #[inline(always)]
    fn put(v: f32, b: &mut [u8]) {
        b[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
    }
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        crate::compute::cast::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn narrow_block(v: &[f32; BITDELTA_BLOCK], out: &mut [u8]) {
        // F16C where the CPU has it: round to nearest even, as `half` does (with F16C too).
        let mut h = [0u16; BITDELTA_BLOCK];
        crate::compute::cast::f32_to_f16_bits(v, &mut h);
        for (o, h) in out.chunks_exact_mut(2).zip(h) {
            o.copy_from_slice(&h.to_le_bytes());
        }
    }
}

impl Float for BF16 {
    const N: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        bf16::from_le_bytes([b[0], b[1]]).to_f32()
    }
    #[inline(always)]
    fn put(v: f32, b: &mut [u8]) {
        b[..2].copy_from_slice(&bf16::from_f32(v).to_le_bytes())
    }
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
    }
    #[inline(always)]
    fn narrow_block(v: &[f32; BITDELTA_BLOCK], out: &mut [u8]) {
        // Round to nearest even: `half`'s rounding for every value but NaN.
        for (o, &x) in out.chunks_exact_mut(2).zip(v) {
            o.copy_from_slice(&crate::compute::cast::bf16_bits_from_f32(x).to_le_bytes());
        }
    }
}

impl Float for F32 {
    const N: usize = 4;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn put(v: f32, b: &mut [u8]) {
        b[..4].copy_from_slice(&v.to_le_bytes())
    }
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        Self::get(b)
    }
    #[inline(always)]
    fn narrow_block(v: &[f32; BITDELTA_BLOCK], out: &mut [u8]) {
        for (o, &x) in out.chunks_exact_mut(4).zip(v) {
            o.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Run `$body` with `$T` bound to the element type of `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            Dtype::F16 => {
                type $T = F16;
                $body
            }
            Dtype::BF16 => {
                type $T = BF16;
                $body
            }
            Dtype::F32 => {
                type $T = F32;
                $body
            }
            other => panic!("lossy delta codecs take F16, BF16 or F32, not {other}"),
        }
    };
}

/// The `q8` groups that hold elements `elems`: the `scales` a [`decode_q8_range`] of `elems`
/// needs are `scales[q8_groups(&elems)]`.
pub fn q8_groups(elems: &Range<usize>) -> Range<usize> {
    if elems.is_empty() {
        return 0..0;
    }
    elems.start / DELTA_Q8_GROUP..(elems.end - 1) / DELTA_Q8_GROUP + 1
}

fn encode_q8_t<T: Float>(target: &[u8], base: &[u8]) -> (Vec<i8>, Vec<f32>) {
    let n = target.len() / T::N;
    let mut q = vec![0i8; n];
    let mut scales = vec![0f32; n.div_ceil(DELTA_Q8_GROUP)];
    let g_bytes = DELTA_Q8_GROUP * T::N;
    q.par_chunks_mut(DELTA_Q8_GROUP)
        .zip(scales.par_iter_mut())
        .zip(target.par_chunks(g_bytes).zip(base.par_chunks(g_bytes)))
        .with_min_len(256)
        .for_each(|((q, scale), (t, b))| {
            let mut d = [0f32; DELTA_Q8_GROUP];
            let mut amax = 0f32;
            for (i, d) in d.iter_mut().enumerate().take(q.len()) {
                *d = T::get(&t[i * T::N..]) - T::get(&b[i * T::N..]);
                if d.is_finite() {
                    amax = amax.max(d.abs());
                }
            }
            let s = amax / 127.0;
            *scale = s;
            if s > 0.0 {
                for (q, d) in q.iter_mut().zip(d.iter()) {
                    // `as i8` saturates and sends NaN to 0.
                    *q = (d / s).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
            }
        });
    (q, scales)
}

/// Encode `target - base` as `q8`: one `i8` code per element and one f32 scale per group of
/// [`DELTA_Q8_GROUP`] consecutive elements (row-major; the last group shorter). See the module
/// doc for the arithmetic.
///
/// # Panics
/// If `dtype` is not F16, BF16 or F32, or the buffers are not the same whole number of elements.
pub fn encode_q8(target: &[u8], base: &[u8], dtype: Dtype) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(target.len(), base.len(), "base and target lengths differ");
    assert!(target.len() % dtype.size() == 0, "not a whole number of elements");
    with_float!(dtype, T => encode_q8_t::<T>(target, base))
}

fn decode_q8_t<T: Float>(q: &[i8], scales: &[f32], base: &[u8], elems: Range<usize>, out: &mut [u8]) {
    let g0 = elems.start / DELTA_Q8_GROUP;
    let mut i = elems.start;
    while i < elems.end {
        let g = i / DELTA_Q8_GROUP;
        let seg_end = ((g + 1) * DELTA_Q8_GROUP).min(elems.end);
        let s = scales[g - g0];
        let j0 = i - elems.start;
        let len = seg_end - i;
        let qs = &q[j0..j0 + len];
        let bs = &base[j0 * T::N..(j0 + len) * T::N];
        let os = &mut out[j0 * T::N..(j0 + len) * T::N];
        for ((&q, b), o) in qs.iter().zip(bs.chunks_exact(T::N)).zip(os.chunks_exact_mut(T::N)) {
            T::put(T::get(b) + q as f32 * s, o);
        }
        i = seg_end;
    }
}

/// Decode elements `elems` (tensor element indices) of a `q8` delta into `out`.
///
/// Slicing contract: element-wise inputs cover exactly `elems`, per-group inputs exactly the
/// groups that touch it:
/// * `q`: the codes of `elems` (`q_all[elems]`), `elems.len()` of them;
/// * `scales`: the scales of groups [`q8_groups`]`(&elems)` (`scales_all[q8_groups(&elems)]`);
/// * `base`: the base's bytes of `elems`, `elems.len() × dtype.size()`;
/// * `out`: `elems.len() × dtype.size()` bytes.
///
/// # Panics
/// If `dtype` is not F16, BF16 or F32 or a slice does not match the contract.
pub fn decode_q8_range(
    q: &[i8],
    scales: &[f32],
    base: &[u8],
    dtype: Dtype,
    elems: Range<usize>,
    out: &mut [u8],
) {
    let e = dtype.size();
    assert_eq!(q.len(), elems.len(), "q must hold the codes of exactly `elems`");
    assert_eq!(scales.len(), q8_groups(&elems).len(), "scales must cover exactly the groups of `elems`");
    assert_eq!(base.len(), elems.len() * e, "base must hold exactly `elems`");
    assert_eq!(out.len(), elems.len() * e, "out must hold exactly `elems`");
    with_float!(dtype, T => decode_q8_t::<T>(q, scales, base, elems, out))
}

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
const BITDELTA_BLOCK: usize = 64;

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
    for (g, &byte) in signs.iter().enumerate() {
        for k in 0..8 {
            let neg = ((byte as u32 & (1 << k)) != 0) as u32;
            let i = g * 8 + k;
            v[i] = T::widen(&base[i * T::N..(i + 1) * T::N]) + f32::from_bits(sbits ^ (neg << 31));
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
fn decode_bitdelta_reference(
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

#[cfg(test)]
mod tests;

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
//!
//! # Files
//!
//! * `lossless.rs`: the lossless codec: [`LosslessOptions`], the chunk geometry, the encoder and
//!   the decoder of untrusted frames;
//! * `transform.rs`: the per-element transforms and the byte-plane (un)split, fast paths and
//!   their references (shared by the lossless encoder and decoder);
//! * `float.rs`: the F16 / BF16 / F32 element access both lossy codecs compute through;
//! * `q8.rs` and `bitdelta.rs`: the two lossy codecs;
//! * `tests.rs`: the tests of all of them (they cut across the files: round trips go through the
//!   transform and the frames, the lossy tests share their fixtures).

// First: `with_float!` is defined there, and a macro is in scope only after its module.
#[macro_use]
mod float;

mod bitdelta;
mod lossless;
mod q8;
mod transform;

pub use crate::compute::delta_ops::{bitdelta_rows, bitdelta_sign_bytes, Transform};
pub use bitdelta::{decode_bitdelta_range, encode_bitdelta};
pub use lossless::{
    chunk_count, chunk_elems, chunks_covering, decode_lossless_all, decode_lossless_chunk,
    decode_lossless_chunk_with, encode_lossless, encode_lossless_chunk, encode_lossless_with, DeltaError,
    EncodedChunks, LosslessOptions, DEFAULT_LEVEL, DELTA_CHUNK_ELEMS,
};
pub use q8::{decode_q8_range, encode_q8, q8_groups, DELTA_Q8_GROUP};
pub use transform::{
    delta_forward, delta_forward_reference, delta_inverse, delta_inverse_reference, forward_to_planes,
    forward_to_planes_reference, inverse_from_planes, inverse_from_planes_reference, BLOCK,
};

#[cfg(test)]
mod tests;

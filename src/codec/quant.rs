//! Group-wise quantization (8 and 4 bits, symmetric or asymmetric), bit-exact with FastChat.
//!
//! # Why this exists
//!
//! `llmfs quantize` stores a model's linear weights as small integer codes plus one scale (and,
//! asymmetric, one minimum) per group, and the read path turns them back into f16/bf16/f32 on
//! every read. The contract (DESIGN.md, "FastChat compatibility") is that the values read are
//! **bit-identical** to FastChat's `decompress(compress(t, config), config)` run by torch on the
//! CPU (fschat 0.2.36, `fastchat/model/compression.py`, lines 226-312). "Close" is not enough: a
//! user must be able to swap FastChat's `--load-8bit` for an llmfs mount and get the same logits.
//!
//! # The arithmetic, and why it is spelled out op by op
//!
//! FastChat's quantizer is a handful of eager torch ops. Torch rounds the result of *every* op
//! to the tensor's dtype; for f16/bf16 the CPU kernels compute each op in f32 (torch's
//! `opmath_t`) and round once to the dtype. So llmfs evaluates each op in f32 and rounds to `T`
//! after each one ([`QuantFloat::round`]), never fusing two ops:
//!
//! ```text
//! symmetric  (compression.py:261-264, 292-294), B = 2^(bits-1) - 1
//!   amax  = max |x| over the group (padding zeros included)
//!   scale = T(T(1 / amax) * B)            # `B / t` is `t.reciprocal() * B` in torch (_tensor.py __rdiv__)
//!   q     = int8(round_half_even(clamp(T(x * scale), -B, B)))
//!   x'    = T(q / scale)
//! asymmetric (compression.py:267-275, 296-298), B = 2^bits - 1
//!   mn, mx = min, max over the group (padding zeros included)
//!   scale = T(T(1 / T(mx - mn)) * B)
//!   q     = uint8(round_half_even(clamp(T(T(x - mn) * scale), 0, B)))
//!   x'    = T(T(q / scale) + mn)
//! ```
//!
//! `q / scale` is a true division; it is **not** replaced by a multiplication with a hoisted
//! reciprocal, which differs in the last bit (the checked-in FastChat cases catch it for f32).
//! Likewise `B / t` must be the two-rounding `T(T(1/t) * B)`: a single `T(B / t)` differs from
//! torch on f16 inputs.
//!
//! # Degenerate groups (measured on torch 2.15.0, x86-64 AVX2; `scripts/fastchat_quant_check.py --probe`)
//!
//! An all-zero group (symmetric) or a constant group (asymmetric, `mx == mn`) gives
//! `scale = B * (1/0) = +inf`, so `0 * inf = NaN` reaches the integer cast. Casting NaN to an
//! integer is undefined in C++; torch's CPU cast gives 0 for both int8 and uint8, for either
//! sign of NaN and in both its vectorized and scalar loops ([`SYM_NAN_CODE`],
//! [`ASYM_NAN_CODE`]). Decompression then computes `0 / inf = +0.0`. So:
//!
//! * symmetric, all-zero group: codes 0, scale `+inf`, every element decodes to **`+0.0`**
//!   (bit pattern 0), also where the input was `-0.0`;
//! * asymmetric, constant group `c`: codes 0, `min = c`, scale `+inf`, every element decodes to
//!   `+0.0 + c`, i.e. **exactly `c`** (and `+0.0` where `c` is `±0.0`);
//! * f16 groups so small that `1/amax` or `B * (1/amax)` overflows to `inf` (|x| ≲ 2e-3 for
//!   8 bits): nonzero elements get codes ±B, zeros get the NaN code, and everything decodes to
//!   a zero with the code's sign (symmetric: `-0.0` for negative inputs) or to `mn`
//!   (asymmetric).
//!
//! llmfs special-cases none of this: it stores the code torch stores and runs the same ops, so
//! every zero's sign comes out as torch's. Inputs holding NaN or ±inf are not FastChat
//! weights; they go through the same ops (NaN propagates through min/max as in torch) but are
//! not checked against torch.
//!
//! # The fast path
//!
//! [`dequantize_range`] walks the requested range one (row, group) segment at a time, loads the
//! group's scale and minimum once, and runs each op over a chunk of 256 values so it vectorizes
//! (compiled twice: SSE2 and, chosen at run time, AVX2 — IEEE division and the bit-level
//! roundings give the same bits at any vector width, and Rust never contracts into FMA). A 4-bit
//! segment of 32 or more values builds the group's 16 possible outputs with the same ops and
//! looks codes up. [`dequantize_reference`] is the element-by-element definition the tests hold
//! the fast path to.
//!
//! # On-disk layout of a [`QuantizedTensor`]
//!
//! A 2-D tensor `rows × cols` is cut along dim 1 (FastChat's `group_dim=1`) into
//! `groups_per_row = ceil(cols / group_size)` groups per row; the last group of each row is
//! padded with zeros to `group_size` (compression.py:248-257). A group size larger than the row
//! is allowed, as in FastChat: the row is one padded group.
//!
//! * `q`: the codes of the *padded* tensor, `rows × groups_per_row × group_size` of them,
//!   row-major (code index `r * padded_cols + c`), padding codes included (they are what torch
//!   holds, and keeping them keeps the code index arithmetic trivial).
//!   * 8 bits: one byte per code; symmetric codes are the `i8` bit pattern, asymmetric codes
//!     are the `u8`.
//!   * 4 bits: two codes per byte, **low nibble first** (code `i` is in byte `i / 2`, bits
//!     `4 * (i % 2) ..`); `ceil(n_codes / 2)` bytes, the unused high nibble of an odd last
//!     byte is 0. Symmetric codes are the 4-bit two's complement of the `i8` code (−7..=7, and
//!     −8 where torch's NaN cast gave a negative code: the decoded value is `code / ±inf` or
//!     `code / 0`, which depends on the code's sign only); asymmetric codes are 0..=15.
//!     Nibbles can straddle rows when `padded_cols` is odd.
//! * `scale`: one per group, `rows × groups_per_row`, row-major, in the tensor's dtype (what
//!   torch holds, including `inf`).
//! * `min`: asymmetric only, same shape as `scale`; empty when symmetric.

use std::ops::Range;

use rayon::prelude::*;

pub use crate::compute::float::{QuantBytesView, QuantFloat};
pub use crate::registry::recipe::{QuantConfig, QuantError};

/// What torch (2.15.0, x86-64) gives for `NaN.to(torch.int8)` in FastChat's compress
/// (compression.py:264): found with `scripts/fastchat_quant_check.py --probe`.
pub const SYM_NAN_CODE: i8 = 0;
/// What torch (2.15.0, x86-64) gives for `NaN.to(torch.uint8)` (compression.py:275).
pub const ASYM_NAN_CODE: u8 = 0;

/// A quantized 2-D tensor, owning its buffers. Layout: see the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor<T> {
    pub rows: usize,
    pub cols: usize,
    pub config: QuantConfig,
    /// Codes of the padded tensor, packed per `config.bits`.
    pub q: Vec<u8>,
    /// One scale per group, row-major.
    pub scale: Vec<T>,
    /// One minimum per group (asymmetric); empty when symmetric.
    pub min: Vec<T>,
}

impl<T: QuantFloat> QuantizedTensor<T> {
    /// Borrows the buffers for [`dequantize_range`].
    pub fn view(&self) -> QuantView<'_, T> {
        QuantView {
            rows: self.rows,
            cols: self.cols,
            config: self.config,
            q: &self.q,
            scale: &self.scale,
            min: &self.min,
        }
    }

    /// The whole dequantized tensor, row-major `rows × cols`.
    pub fn dequantize(&self) -> Vec<T> {
        let n = self.rows * self.cols;
        let mut out = vec![T::default(); n];
        dequantize_range(self.view(), 0..n, &mut out);
        out
    }
}

/// Borrowed quantized tensor: the buffers may come straight from a file.
#[derive(Debug, Clone, Copy)]
pub struct QuantView<'a, T> {
    pub rows: usize,
    pub cols: usize,
    pub config: QuantConfig,
    pub q: &'a [u8],
    pub scale: &'a [T],
    pub min: &'a [T],
}

impl<'a, T: QuantFloat> QuantView<'a, T> {
    /// A view whose buffer lengths are checked against the shape; use it for data read from
    /// disk, so that [`dequantize_range`] cannot index out of bounds.
    pub fn new(
        rows: usize,
        cols: usize,
        config: QuantConfig,
        q: &'a [u8],
        scale: &'a [T],
        min: &'a [T],
    ) -> Result<Self, QuantError> {
        check_lengths(rows, cols, config, q.len(), scale.len(), min.len())?;
        Ok(QuantView { rows, cols, config, q, scale, min })
    }
}

impl<'a> QuantBytesView<'a> {
    /// A view whose buffer lengths are checked for element type `T`.
    pub fn new<T: QuantFloat>(
        rows: usize,
        cols: usize,
        config: QuantConfig,
        q: &'a [u8],
        scale: &'a [u8],
        min: &'a [u8],
    ) -> Result<Self, QuantError> {
        for (what, b) in [("scale bytes", scale), ("min bytes", min)] {
            if b.len() % T::SIZE != 0 {
                return Err(QuantError::LengthMismatch {
                    what,
                    expected: b.len() / T::SIZE * T::SIZE,
                    got: b.len(),
                });
            }
        }
        check_lengths(rows, cols, config, q.len(), scale.len() / T::SIZE, min.len() / T::SIZE)?;
        Ok(QuantBytesView { rows, cols, config, q, scale, min })
    }
}

fn check_lengths(
    rows: usize,
    cols: usize,
    config: QuantConfig,
    q: usize,
    scale: usize,
    min: usize,
) -> Result<(), QuantError> {
    config.check_shape(rows, cols)?;
    let groups = config.n_groups(rows, cols);
    let expect = [
        ("q", config.q_len(rows, cols), q),
        ("scale", groups, scale),
        ("min", if config.symmetric { 0 } else { groups }, min),
    ];
    for (what, expected, got) in expect {
        if expected != got {
            return Err(QuantError::LengthMismatch { what, expected, got });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Quantize
// ---------------------------------------------------------------------------------------------

/// Quantizes a row-major `rows × cols` tensor as FastChat's `compress` (compression.py:226-276),
/// in parallel over rows.
///
/// # Panics
/// If `cfg` is invalid for `cols` or `data.len() != rows * cols`.
pub fn quantize<T: QuantFloat>(data: &[T], rows: usize, cols: usize, cfg: QuantConfig) -> QuantizedTensor<T> {
    if let Err(e) = cfg.check_shape(rows, cols) {
        panic!("quantize: {e}");
    }
    assert_eq!(data.len(), rows * cols, "quantize: data length does not match {rows}x{cols}");
    let gpr = cfg.groups_per_row(cols);
    let padded = cfg.padded_cols(cols);
    let mut codes = vec![0u8; rows * padded];
    let mut scale = vec![T::default(); rows * gpr];
    let mut min = if cfg.symmetric { Vec::new() } else { vec![T::default(); rows * gpr] };

    if rows > 0 && gpr > 0 {
        let work = |(r, (codes_r, scale_r)): (usize, (&mut [u8], &mut [T])), min_r: &mut [T]| {
            quantize_row(&data[r * cols..(r + 1) * cols], cfg, codes_r, scale_r, min_r);
        };
        if cfg.symmetric {
            codes
                .par_chunks_mut(padded)
                .zip(scale.par_chunks_mut(gpr))
                .enumerate()
                .for_each(|x| work(x, &mut []));
        } else {
            codes
                .par_chunks_mut(padded)
                .zip(scale.par_chunks_mut(gpr))
                .zip(min.par_chunks_mut(gpr))
                .enumerate()
                .for_each(|(r, ((c, s), m))| work((r, (c, s)), m));
        }
    }

    let q = if cfg.bits == 4 { pack_nibbles(&codes, cfg.symmetric) } else { codes };
    QuantizedTensor { rows, cols, config: cfg, q, scale, min }
}

/// [`quantize_row_any`], compiled for AVX2 when the CPU has it: baseline x86-64 has no
/// rounding instruction, so `round_ties_even` was a call to libm's `rintf` per value (a third of
/// the time), and the loops ran 4 lanes wide at most.
fn quantize_row<T: QuantFloat>(
    row: &[T],
    cfg: QuantConfig,
    codes: &mut [u8],
    scale: &mut [T],
    min: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: `quantize_row_avx2` only requires AVX2, which was just checked.
            unsafe { quantize_row_avx2(row, cfg, codes, scale, min) };
            return;
        }
    }
    quantize_row_any(row, cfg, codes, scale, min);
}

/// IEEE arithmetic and exact rounding give the same bits at any vector width.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2<T: QuantFloat>(
    row: &[T],
    cfg: QuantConfig,
    codes: &mut [u8],
    scale: &mut [T],
    min: &mut [T],
) {
    quantize_row_any(row, cfg, codes, scale, min);
}

/// Quantizes one row: `codes` is the padded row's codes (one byte each, i8 bit pattern when
/// symmetric), `scale`/`min` its groups' parameters.
#[inline(always)]
fn quantize_row_any<T: QuantFloat>(
    row: &[T],
    cfg: QuantConfig,
    codes: &mut [u8],
    scale: &mut [T],
    min: &mut [T],
) {
    let gs = cfg.group_size;
    let b = cfg.bound();
    for (gi, codes_g) in codes.chunks_mut(gs).enumerate() {
        let start = gi * gs;
        let vals = &row[start..row.len().min(start + gs)];
        let padded = vals.len() < gs;
        if cfg.symmetric {
            // compression.py:262 — `torch.max(data.abs(), ...)`; the padding zeros never raise
            // a maximum of absolute values, so starting from 0 includes them. NaN propagates,
            // as torch's max does.
            let amax = vals.iter().fold(0.0f32, |m, v| nan_max(m, v.to_f32().abs()));
            // `B / t` is `t.reciprocal() * B` (torch/_tensor.py `__rdiv__`): two roundings.
            let s = T::round(T::round(1.0 / amax) * b);
            scale[gi] = T::from_f32(s);
            // compression.py:263-264; padding codes as torch computes them (0 * s).
            let code = |x: f32| {
                let y = T::round(x * s).clamp(-b, b).round_ties_even();
                (if y.is_nan() { SYM_NAN_CODE } else { y as i8 }) as u8
            };
            for (c, v) in codes_g.iter_mut().zip(vals) {
                *c = code(v.to_f32());
            }
            codes_g[vals.len()..].fill(code(0.0));
        } else {
            // compression.py:268-269: padding zeros take part in min and max.
            let init = if padded { 0.0f32 } else { vals[0].to_f32() };
            let (mn, mx) = vals.iter().fold((init, init), |(lo, hi), v| {
                let v = v.to_f32();
                (nan_min(lo, v), nan_max(hi, v))
            });
            let s = T::round(T::round(1.0 / T::round(mx - mn)) * b);
            scale[gi] = T::from_f32(s);
            min[gi] = T::from_f32(mn);
            // compression.py:272-275.
            let code = |x: f32| {
                let y = T::round(T::round(x - mn) * s).clamp(0.0, b).round_ties_even();
                if y.is_nan() {
                    ASYM_NAN_CODE
                } else {
                    y as u8
                }
            };
            for (c, v) in codes_g.iter_mut().zip(vals) {
                *c = code(v.to_f32());
            }
            codes_g[vals.len()..].fill(code(0.0));
        }
    }
}

/// torch's max: NaN wins.
#[inline]
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}

/// torch's min: NaN wins.
#[inline]
fn nan_min(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b < a {
        b
    } else {
        a
    }
}

/// Packs one-byte codes two per byte, low nibble first. A symmetric code becomes its 4-bit
/// two's complement; torch's NaN code, whatever its value, keeps only its sign (−8 or 0), which
/// is all that `code / ±inf` or `code / 0` looks at.
fn pack_nibbles(codes: &[u8], symmetric: bool) -> Vec<u8> {
    let nib = |c: u8| -> u8 {
        if symmetric {
            let v = c as i8;
            if v < -8 {
                0x8
            } else {
                (v as u8) & 0xF
            }
        } else {
            c & 0xF
        }
    };
    codes.chunks(2).map(|p| nib(p[0]) | p.get(1).map_or(0, |&h| nib(h) << 4)).collect()
}

// ---------------------------------------------------------------------------------------------
// Dequantize
// ---------------------------------------------------------------------------------------------

/// Elements processed per inner step: big enough to vectorize, small enough for the stack.
const CHUNK: usize = 256;

/// Where the per-group parameters come from: typed slices or little-endian bytes.
trait Params<T> {
    fn scale(&self, g: usize) -> f32;
    fn min(&self, g: usize) -> f32;
}

impl<T: QuantFloat> Params<T> for QuantView<'_, T> {
    #[inline]
    fn scale(&self, g: usize) -> f32 {
        self.scale[g].to_f32()
    }
    #[inline]
    fn min(&self, g: usize) -> f32 {
        self.min[g].to_f32()
    }
}

struct BytesParams<'a, T> {
    scale: &'a [u8],
    min: &'a [u8],
    _t: std::marker::PhantomData<T>,
}

impl<T: QuantFloat> Params<T> for BytesParams<'_, T> {
    #[inline]
    fn scale(&self, g: usize) -> f32 {
        T::read_le(&self.scale[g * T::SIZE..]).to_f32()
    }
    #[inline]
    fn min(&self, g: usize) -> f32 {
        T::read_le(&self.min[g * T::SIZE..]).to_f32()
    }
}

/// Dequantizes the elements `elems` of the original (unpadded, row-major `rows × cols`) tensor
/// into `out`, bit-identical to FastChat's `decompress` (compression.py:291-298). `elems` may
/// start and end anywhere, mid-row and mid-group.
///
/// # Panics
/// If `elems` is not within `0..rows*cols`, `out.len() != elems.len()`, or the view's buffers
/// are shorter than its shape needs (build it with [`QuantView::new`] to check that first).
pub fn dequantize_range<T: QuantFloat>(qt: QuantView<'_, T>, elems: Range<usize>, out: &mut [T]) {
    dequantize_core::<T, _>(qt.rows, qt.cols, qt.config, qt.q, &qt, elems, out);
}

/// [`dequantize_range`] on little-endian bytes: `scale`/`min` of the view are bytes of `T`, and
/// `out` receives `elems.len() * T::SIZE` little-endian bytes.
///
/// # Panics
/// As [`dequantize_range`], with `out.len() != elems.len() * T::SIZE`.
pub fn dequantize_range_bytes<T: QuantFloat>(qt: QuantBytesView<'_>, elems: Range<usize>, out: &mut [u8]) {
    assert_eq!(out.len(), elems.len() * T::SIZE, "dequantize_range_bytes: output length");
    let params = BytesParams::<T> { scale: qt.scale, min: qt.min, _t: std::marker::PhantomData };
    if cfg!(target_endian = "little") {
        if let Ok(typed) = bytemuck::try_cast_slice_mut::<u8, T>(out) {
            // Aligned (chunk buffers and scratch are): decode in place, in one call.
            dequantize_core::<T, _>(qt.rows, qt.cols, qt.config, qt.q, &params, elems, typed);
            return;
        }
    }
    let mut tmp = [T::default(); CHUNK];
    let mut start = elems.start;
    for out_chunk in out.chunks_mut(CHUNK * T::SIZE) {
        let n = out_chunk.len() / T::SIZE;
        dequantize_core::<T, _>(qt.rows, qt.cols, qt.config, qt.q, &params, start..start + n, &mut tmp[..n]);
        for (v, o) in tmp[..n].iter().zip(out_chunk.chunks_exact_mut(T::SIZE)) {
            v.write_le(o);
        }
        start += n;
    }
}

fn check_range(rows: usize, cols: usize, elems: &Range<usize>, out_len: usize) {
    assert!(
        elems.start <= elems.end && elems.end <= rows * cols,
        "dequantize: range {elems:?} outside a {rows}x{cols} tensor"
    );
    assert_eq!(out_len, elems.len(), "dequantize: output length does not match the range");
}

/// The fast path: walks `elems` one (row, group) segment at a time, loads the group's scale and
/// minimum once, and runs each step over a [`CHUNK`] of values so the division, the rounding to
/// `T` and the conversion vectorize.
fn dequantize_core<T: QuantFloat, P: Params<T>>(
    rows: usize,
    cols: usize,
    cfg: QuantConfig,
    q: &[u8],
    params: &P,
    elems: Range<usize>,
    out: &mut [T],
) {
    check_range(rows, cols, &elems, out.len());
    if elems.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // f16 and bf16 scales can divide with an FMA (exact for all of them: see `divide`).
        // F16C too: the fused 8-bit pass converts with it (every CPU with FMA has it).
        if T::SIZE == 2
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: `dequantize_core_avx2_fma` only requires AVX2, FMA and F16C, just checked.
            unsafe { dequantize_core_avx2_fma(cfg, q, params, elems, cols, out) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: `dequantize_core_avx2` only requires the CPU to support AVX2, which was
            // just checked.
            unsafe { dequantize_core_avx2(cfg, q, params, elems, cols, out) };
            return;
        }
    }
    dequantize_segments::<T, P, false>(cfg, q, params, elems, cols, out);
}

/// [`dequantize_core_avx2`] with the division done by [`divide`]'s FMA sequence, for 2-byte
/// dtypes whose scales it is proven exact for.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_core_avx2_fma<T: QuantFloat, P: Params<T>>(
    cfg: QuantConfig,
    q: &[u8],
    params: &P,
    elems: Range<usize>,
    cols: usize,
    out: &mut [T],
) {
    dequantize_segments::<T, P, true>(cfg, q, params, elems, cols, out);
}

/// The same loop compiled for AVX2: the division and the conversions run 8 lanes wide instead
/// of SSE2's 4. IEEE division and the bit-level rounding give the same bits at any width, and
/// Rust never contracts `a / b + c` into an FMA, so the result is the same as on any CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_core_avx2<T: QuantFloat, P: Params<T>>(
    cfg: QuantConfig,
    q: &[u8],
    params: &P,
    elems: Range<usize>,
    cols: usize,
    out: &mut [T],
) {
    dequantize_segments::<T, P, false>(cfg, q, params, elems, cols, out);
}

/// The body of [`dequantize_core`], inlined into each instruction-set variant.
#[inline(always)]
fn dequantize_segments<T: QuantFloat, P: Params<T>, const FMA: bool>(
    cfg: QuantConfig,
    q: &[u8],
    params: &P,
    elems: Range<usize>,
    cols: usize,
    out: &mut [T],
) {
    let gs = cfg.group_size;
    let gpr = cfg.groups_per_row(cols);
    let padded = gpr * gs;
    let mut buf = [0.0f32; CHUNK];
    let mut pos = elems.start;
    let mut o = 0;
    while pos < elems.end {
        let (r, c) = (pos / cols, pos % cols);
        let gi = c / gs;
        let seg_end = cols.min((gi + 1) * gs).min(c + (elems.end - pos));
        let g = r * gpr + gi;
        let s = params.scale(g);
        let m = if cfg.symmetric { 0.0 } else { params.min(g) };
        let mut k = r * padded + c; // code index
        let mut n_left = seg_end - c;
        if cfg.bits == 4 && n_left >= LUT_MIN {
            // A 4-bit group has only 16 possible outputs: compute them with the same ops, then
            // look each code up. Same bits, no division per element.
            let b = &mut buf[..16];
            for (x, v) in b.iter_mut().enumerate() {
                *v = nibble_value(x as u8, cfg.symmetric);
            }
            finish_chunk::<T, FMA>(b, s, m, cfg.symmetric);
            let mut lut = [T::default(); 16];
            T::from_f32_slice(b, &mut lut);
            let dst = &mut out[o..o + n_left];
            // Values of `dst` already written; the scalar lookup does the rest.
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if FMA && T::SIZE == 2 {
                // From a byte boundary on, 32 values at a time with two byte shuffles.
                let start = k % 2;
                lookup_nibbles(q, k, &lut, &mut dst[..start]);
                let lut16: [u16; 16] = bytemuck::cast(lut);
                // SAFETY: FMA is set only by `dequantize_core_avx2_fma`, after AVX2 was detected.
                done = start
                    + unsafe {
                        lookup_nibbles_avx2(
                            &q[(k + start) / 2..],
                            &lut16,
                            bytemuck::cast_slice_mut(&mut dst[start..]),
                        )
                    };
            }
            lookup_nibbles(q, k + done, &lut, &mut dst[done..]);
            o += n_left;
        } else {
            #[cfg(target_arch = "x86_64")]
            if FMA && cfg.bits == 8 && T::SIZE == 2 && fused_exact(s, m) {
                let dst: &mut [u16] = bytemuck::cast_slice_mut(&mut out[o..o + n_left]);
                let codes = &q[k..k + n_left];
                let min = (!cfg.symmetric).then_some(m);
                // SAFETY: FMA is set only by `dequantize_core_avx2_fma`, which runs after AVX2,
                // FMA and F16C were detected.
                let done = unsafe {
                    if T::DTYPE == "BF16" {
                        dequantize8_fused::<true>(codes, cfg.symmetric, s, min, dst)
                    } else {
                        dequantize8_fused::<false>(codes, cfg.symmetric, s, min, dst)
                    }
                };
                k += done;
                o += done;
                n_left -= done;
            }
            while n_left > 0 {
                let n = n_left.min(CHUNK);
                let b = &mut buf[..n];
                decode_codes(q, cfg, k, b);
                finish_chunk::<T, FMA>(b, s, m, cfg.symmetric);
                T::from_f32_slice(b, &mut out[o..o + n]);
                k += n;
                o += n;
                n_left -= n;
            }
        }
        pos = seg_end + r * cols;
    }
}

/// Whether [`dequantize8_fused`] gives the bits of the generic path for scale `s` and min `m`:
/// the FMA division's range, and a finite min (a NaN min must come out as torch's canonical
/// NaN, which the generic conversions produce).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn fused_exact(s: f32, m: f32) -> bool {
    fma_division_exact(s) && m.is_finite()
}

/// 8-bit codes of one group segment to bf16 (`BF16`) or f16 bits, 8 at a time in one pass: the
/// same operations as `decode_codes` + `finish_chunk` + `from_f32_slice` (code to f32, the FMA
/// division, for the asymmetric case rounding to the dtype and adding the min in f32, rounding
/// to the dtype), without the trips through an f32 buffer, which made bf16 output a third the
/// speed of f32 output. Only where [`fused_exact`] holds, so no NaN arises and bf16 rounding is
/// the plain round-half-even on the bits. Returns how many values it wrote (a multiple of 8);
/// the caller does the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize8_fused<const BF16: bool>(
    codes: &[u8],
    symmetric: bool,
    s: f32,
    min: Option<f32>,
    out: &mut [u16],
) -> usize {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn to_half<const BF16: bool>(y: __m256) -> __m128i {
        if BF16 {
            // Round half to even on the bits: + 0x7FFF + the kept lsb, keep the high half.
            let b = _mm256_castps_si256(y);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
            let hi = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                _mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)),
                lsb,
            ));
            // Pack the 8 u32 (each < 2^16) to u16: per 128-bit lane, then the lanes' halves together.
            let packed = _mm256_packus_epi32(hi, hi);
            _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed))
        } else {
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y)
        }
    }
    #[inline(always)]
    unsafe fn widen<const BF16: bool>(h: __m128i) -> __m256 {
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            _mm256_cvtph_ps(h)
        }
    }
    let n = codes.len().min(out.len()) / 8 * 8;
    let (vs, vr) = (_mm256_set1_ps(s), _mm256_set1_ps(1.0 / s));
    let vm = _mm256_set1_ps(min.unwrap_or(0.0));
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= codes.len() and out.len().
        let raw = _mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i);
        let ints = if symmetric { _mm256_cvtepi8_epi32(raw) } else { _mm256_cvtepu8_epi32(raw) };
        let v = _mm256_cvtepi32_ps(ints);
        let q = _mm256_mul_ps(v, vr);
        let mut h = to_half::<BF16>(_mm256_fmadd_ps(_mm256_fnmadd_ps(q, vs, v), vr, q));
        if min.is_some() {
            h = to_half::<BF16>(_mm256_add_ps(widen::<BF16>(h), vm));
        }
        _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
        i += 8;
    }
    n
}

/// Segments at least this long use the 4-bit lookup table (building it costs 16 divisions).
const LUT_MIN: usize = 32;

/// The ops of compression.py:294 (symmetric) or 297-298 (asymmetric) on decoded codes, in f32,
/// with the intermediate rounding to `T`; the caller does the final rounding to `T`.
#[inline(always)]
fn finish_chunk<T: QuantFloat, const FMA: bool>(b: &mut [f32], s: f32, m: f32, symmetric: bool) {
    // `data / scale`: a true division, one rounding to T.
    divide::<FMA>(b, s);
    if !symmetric {
        // `data.add_(mn)`: the quotient was stored as T first.
        T::round_slice(b);
        for v in b.iter_mut() {
            *v += m;
        }
    }
}

/// Whether [`divide`]'s FMA sequence gives the quotient's bits for scale `s`: away from the ends
/// of the range, where v·(1/s) would overflow (|v| < 256) or go subnormal.
#[inline(always)]
fn fma_division_exact(s: f32) -> bool {
    let r = 1.0 / s;
    s.is_normal() && r.is_normal() && r.abs() < 1e36 && r.abs() > 1e-30
}

/// `v / s` for each value, correctly rounded. With `FMA` (and `s`, `1/s` well inside the normal
/// range) without a
/// division per value: q = v·r for r = 1/s, then q + (v − q·s)·r, whose residual the FMA computes
/// exactly (Markstein's correction). A division costs several times the two FMAs and was the
/// bound of dequantization; the sequence is used only where it is proven to give the quotient's
/// bits: for every code value (−128..=255) over every f16 and every bf16 scale, which
/// `fma_division_is_exact_for_every_code_and_every_half_scale` checks one by one.
#[inline(always)]
fn divide<const FMA: bool>(b: &mut [f32], s: f32) {
    let r = 1.0 / s;
    if FMA && fma_division_exact(s) {
        for v in b.iter_mut() {
            let q = *v * r;
            *v = (-q).mul_add(s, *v).mul_add(r, q);
        }
    } else {
        for v in b.iter_mut() {
            *v /= s;
        }
    }
}

/// A 4-bit code's value: the nibble sign-extended (symmetric) or as is.
#[inline(always)]
fn nibble_value(x: u8, symmetric: bool) -> f32 {
    if symmetric {
        (((x << 4) as i8) >> 4) as f32
    } else {
        (x & 0xF) as f32
    }
}

/// `out[i] = lut[nibble k + i]`, low nibble first.
#[inline(always)]
fn lookup_nibbles<T: Copy>(q: &[u8], k: usize, lut: &[T; 16], out: &mut [T]) {
    let n = out.len();
    let mut i = 0;
    if k % 2 == 1 && n > 0 {
        out[0] = lut[(q[k / 2] >> 4) as usize];
        i = 1;
    }
    let first_byte = (k + i) / 2;
    let pairs = (n - i) / 2;
    for (pair, &byte) in out[i..i + 2 * pairs].chunks_exact_mut(2).zip(&q[first_byte..first_byte + pairs]) {
        pair[0] = lut[(byte & 0xF) as usize];
        pair[1] = lut[(byte >> 4) as usize];
    }
    i += 2 * pairs;
    if i < n {
        out[i] = lut[(q[(k + i) / 2] & 0xF) as usize];
    }
}

/// [`lookup_nibbles`] for 2-byte values from a byte boundary: `out[2j] = lut[bytes[j] & 15]`,
/// `out[2j + 1] = lut[bytes[j] >> 4]`, 16 bytes (32 values) at a time: the table split into its
/// low and high bytes, one byte shuffle each, the halves interleaved. (The compiler turns the
/// scalar loop into a word-insert per value with spills.) Returns how many values it wrote, a
/// multiple of 32; the caller does the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lookup_nibbles_avx2(bytes: &[u8], lut: &[u16; 16], out: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let (lo_table, hi_table) = (lut.map(|v| v as u8), lut.map(|v| (v >> 8) as u8));
    let lo_table = _mm_loadu_si128(lo_table.as_ptr() as *const __m128i);
    let hi_table = _mm_loadu_si128(hi_table.as_ptr() as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    let blocks = bytes.len().min(out.len() / 2) / 16;
    for b in 0..blocks {
        // SAFETY: 16 * b + 16 <= bytes.len() and 32 * b + 32 <= out.len().
        let x = _mm_loadu_si128(bytes.as_ptr().add(16 * b) as *const __m128i);
        let low = _mm_and_si128(x, mask);
        let high = _mm_and_si128(_mm_srli_epi16::<4>(x), mask);
        // Nibble indices in value order: low nibble of byte j, then its high nibble.
        for (idx, at) in [(_mm_unpacklo_epi8(low, high), 0), (_mm_unpackhi_epi8(low, high), 16)] {
            let (l, h) = (_mm_shuffle_epi8(lo_table, idx), _mm_shuffle_epi8(hi_table, idx));
            let dst = out.as_mut_ptr().add(32 * b + at);
            _mm_storeu_si128(dst as *mut __m128i, _mm_unpacklo_epi8(l, h));
            _mm_storeu_si128(dst.add(8) as *mut __m128i, _mm_unpackhi_epi8(l, h));
        }
    }
    blocks * 32
}

/// Codes `k .. k + out.len()` as f32 (exact: |code| ≤ 255).
#[inline(always)]
fn decode_codes(q: &[u8], cfg: QuantConfig, k: usize, out: &mut [f32]) {
    let n = out.len();
    match (cfg.bits, cfg.symmetric) {
        (8, true) => {
            for (o, &c) in out.iter_mut().zip(&q[k..k + n]) {
                *o = c as i8 as f32;
            }
        }
        (8, false) => {
            for (o, &c) in out.iter_mut().zip(&q[k..k + n]) {
                *o = c as f32;
            }
        }
        (_, sym) => {
            let nib = move |x: u8| nibble_value(x, sym);
            let mut i = 0;
            if k % 2 == 1 {
                out[0] = nib(q[k / 2] >> 4);
                i = 1;
            }
            let first_byte = (k + i) / 2;
            let pairs = (n - i) / 2;
            for (j, &byte) in q[first_byte..first_byte + pairs].iter().enumerate() {
                out[i + 2 * j] = nib(byte);
                out[i + 2 * j + 1] = nib(byte >> 4);
            }
            i += 2 * pairs;
            if i < n {
                out[i] = nib(q[(k + i) / 2]);
            }
        }
    }
}

/// The scalar reference: one element at a time, straight from compression.py:291-298. Slow; it
/// is the definition the fast path is tested against.
pub fn dequantize_reference<T: QuantFloat>(qt: QuantView<'_, T>, elems: Range<usize>, out: &mut [T]) {
    check_range(qt.rows, qt.cols, &elems, out.len());
    let cfg = qt.config;
    let gpr = cfg.groups_per_row(qt.cols);
    let padded = cfg.padded_cols(qt.cols);
    for (o, i) in out.iter_mut().zip(elems) {
        let (r, c) = (i / qt.cols, i % qt.cols);
        let g = r * gpr + c / cfg.group_size;
        let k = r * padded + c;
        let code: f32 = if cfg.bits == 8 {
            if cfg.symmetric {
                qt.q[k] as i8 as f32
            } else {
                qt.q[k] as f32
            }
        } else {
            let nib = (qt.q[k / 2] >> (4 * (k % 2))) & 0xF;
            if cfg.symmetric {
                if nib >= 8 {
                    nib as f32 - 16.0
                } else {
                    nib as f32
                }
            } else {
                nib as f32
            }
        };
        let x = T::round(code / qt.scale[g].to_f32());
        *o = if cfg.symmetric { T::from_f32(x) } else { T::from_f32(x + qt.min[g].to_f32()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cast::{bf16_bits_from_f32, f16_bits_from_f32, f16_bits_to_f32};
    use half::{bf16, f16};
    use proptest::prelude::*;

    /// `divide::<true>` compiled as dequantization runs it.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn divide_fma(b: &mut [f32], s: f32) {
        divide::<true>(b, s);
    }

    /// The byte-shuffle nibble lookup against the scalar one, for every length up to 200
    /// values and random tables and codes.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn nibble_lookup_avx2_matches_scalar() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Rng(9);
        for n in 0..200usize {
            let lut: [u16; 16] = std::array::from_fn(|_| rng.next() as u16);
            let bytes: Vec<u8> = (0..n.div_ceil(2) + 3).map(|_| rng.next() as u8).collect();
            let mut want = vec![0u16; n];
            lookup_nibbles(&bytes, 0, &lut, &mut want);
            let mut got = vec![0u16; n];
            // SAFETY: AVX2 was checked above.
            let done = unsafe { lookup_nibbles_avx2(&bytes, &lut, &mut got) };
            assert_eq!(done, n / 32 * 32);
            assert_eq!(got[..done], want[..done], "n {n}");
        }
    }

    /// The fused 8-bit kernel against the plain operations (IEEE division, rounding to the
    /// dtype, adding the min in f32, rounding again), for every code byte over every f16 and
    /// every bf16 scale the kernel accepts, symmetric and with a few mins.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn fused_8bit_matches_the_plain_ops_for_every_code_and_every_half_scale() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c"))
        {
            return;
        }
        fn check<T: QuantFloat>(scale_of: impl Fn(u16) -> f32) {
            let codes: Vec<u8> = (0..=255).collect();
            let mut got = vec![0u16; 256];
            let mut checked = 0;
            for bits in 0..=u16::MAX {
                let s = scale_of(bits);
                for (symmetric, min) in [
                    (true, None),
                    (false, Some(0.0)),
                    (false, Some(-0.71875)),
                    (false, Some(T::round(3.3e-3))),
                ] {
                    if !fused_exact(s, min.unwrap_or(0.0)) {
                        continue;
                    }
                    // SAFETY: the features were checked above.
                    let n = unsafe {
                        if T::DTYPE == "BF16" {
                            dequantize8_fused::<true>(&codes, symmetric, s, min, &mut got)
                        } else {
                            dequantize8_fused::<false>(&codes, symmetric, s, min, &mut got)
                        }
                    };
                    assert_eq!(n, 256);
                    for (&c, &g) in codes.iter().zip(&got) {
                        let v = if symmetric { c as i8 as f32 } else { c as f32 };
                        let want = match min {
                            None => T::from_f32(v / s),
                            Some(m) => T::from_f32(T::round(v / s) + m),
                        };
                        assert_eq!(
                            g as u32,
                            want.to_bits_u32(),
                            "{} code {c} scale {s:e} min {min:?}",
                            T::DTYPE
                        );
                    }
                    checked += 1;
                }
            }
            assert!(checked > 100_000, "{checked}");
        }
        check::<f16>(|b| f16::from_bits(b).to_f32());
        check::<bf16>(|b| bf16::from_bits(b).to_f32());
    }

    /// The proof behind the FMA division: every code value a stored tensor can hold, over every
    /// scale an f16 or bf16 tensor can store, gives the bits of the IEEE quotient (as FastChat's
    /// torch division does). Skipped only on a CPU without AVX2+FMA, where it is not used.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn fma_division_is_exact_for_every_code_and_every_half_scale() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let codes: Vec<f32> = (-128..=255).map(|c| c as f32).collect();
        let mut got = codes.clone();
        for bits in 0..=u16::MAX {
            for s in [f16::from_bits(bits).to_f32(), bf16::from_bits(bits).to_f32()] {
                got.copy_from_slice(&codes);
                // SAFETY: AVX2 and FMA were checked above.
                unsafe { divide_fma(&mut got, s) };
                for (c, g) in codes.iter().zip(&got) {
                    let want = c / s;
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "{c} / {s:e} ({:#x}): {g:e} ({:#x}), want {want:e} ({:#x})",
                        s.to_bits(),
                        g.to_bits(),
                        want.to_bits()
                    );
                }
            }
        }
    }

    /// xorshift: deterministic test data without another dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn normal_ish(&mut self) -> f32 {
            // Sum of uniforms, scaled: enough spread for quantization tests.
            let mut s = 0.0f32;
            for _ in 0..4 {
                s += (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            s
        }
    }

    fn random_tensor<T: QuantFloat>(rng: &mut Rng, n: usize, mag: f32) -> Vec<T> {
        (0..n).map(|_| T::from_f32(rng.normal_ish() * mag)).collect()
    }

    fn bits_eq<T: QuantFloat>(a: &[T], b: &[T]) -> Option<usize> {
        a.iter().zip(b).position(|(x, y)| x.to_bits_u32() != y.to_bits_u32())
    }

    fn configs() -> Vec<QuantConfig> {
        let mut v = Vec::new();
        for bits in [8, 4] {
            for symmetric in [true, false] {
                for group_size in [1, 2, 3, 7, 16, 33, 64, 256, 1000] {
                    v.push(QuantConfig { bits, group_size, symmetric });
                }
            }
        }
        v
    }

    fn fast_vs_reference<T: QuantFloat>(seed: u64) {
        let mut rng = Rng(seed);
        for cfg in configs() {
            let (rows, cols) = (5, 97);
            let mut data: Vec<T> = random_tensor(&mut rng, rows * cols, 2.0);
            // Row 1 all zero, row 3 constant: the degenerate groups.
            for c in 0..cols {
                data[cols + c] = T::from_f32(0.0);
                data[3 * cols + c] = T::from_f32(0.75);
            }
            let qt = quantize(&data, rows, cols, cfg);
            let n = rows * cols;
            let mut want = vec![T::default(); n];
            dequantize_reference(qt.view(), 0..n, &mut want);
            // Whole tensor, then many ranges starting/ending mid-row and mid-group.
            let ranges = std::iter::once(0..n).chain((0..60).map(|_| {
                let a = (rng.next() as usize) % (n + 1);
                let b = (rng.next() as usize) % (n + 1);
                a.min(b)..a.max(b)
            }));
            for range in ranges {
                let mut got = vec![T::default(); range.len()];
                dequantize_range(qt.view(), range.clone(), &mut got);
                assert_eq!(bits_eq(&got, &want[range.clone()]), None, "{cfg:?} {range:?}");
                // Byte interface, on the same range.
                let scale_b: Vec<u8> = qt.scale.iter().flat_map(|s| le(*s)).collect();
                let min_b: Vec<u8> = qt.min.iter().flat_map(|s| le(*s)).collect();
                let view = QuantBytesView::new::<T>(rows, cols, cfg, &qt.q, &scale_b, &min_b).unwrap();
                let mut got_b = vec![0u8; range.len() * T::SIZE];
                dequantize_range_bytes::<T>(view, range.clone(), &mut got_b);
                let want_b: Vec<u8> = want[range.clone()].iter().flat_map(|s| le(*s)).collect();
                assert_eq!(got_b, want_b, "bytes {cfg:?} {range:?}");
                // An output that is not aligned for T takes the copying path: the same bytes.
                let mut odd = vec![0u8; range.len() * T::SIZE + 1];
                dequantize_range_bytes::<T>(view, range.clone(), &mut odd[1..]);
                assert_eq!(&odd[1..], &want_b[..], "unaligned bytes {cfg:?} {range:?}");
            }
        }
    }

    fn le<T: QuantFloat>(v: T) -> Vec<u8> {
        let mut b = vec![0u8; T::SIZE];
        v.write_le(&mut b);
        b
    }

    #[test]
    fn fast_matches_reference_f32() {
        fast_vs_reference::<f32>(1);
    }

    #[test]
    fn fast_matches_reference_f16() {
        fast_vs_reference::<f16>(2);
    }

    #[test]
    fn fast_matches_reference_bf16() {
        fast_vs_reference::<bf16>(3);
    }

    #[test]
    fn default_is_fastchat_default() {
        assert_eq!(QuantConfig::default(), QuantConfig { bits: 8, group_size: 256, symmetric: true });
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let c = QuantConfig { bits: 3, ..Default::default() };
        assert_eq!(c.validate(10), Err(QuantError::UnsupportedBits(3)));
        let c = QuantConfig { group_size: 0, ..Default::default() };
        assert_eq!(c.validate(10), Err(QuantError::ZeroGroupSize));
        assert!(QuantConfig { group_size: 1000, ..Default::default() }.validate(10).is_ok());
        let c = QuantConfig { group_size: usize::MAX / 2, ..Default::default() };
        assert!(c.check_shape(3, 10).is_err());
    }

    #[test]
    fn view_new_checks_lengths() {
        let cfg = QuantConfig { bits: 4, group_size: 3, symmetric: false };
        // 2 rows × 5 cols → 2 groups a row, 6 padded cols, 12 codes, 6 bytes.
        let q = [0u8; 6];
        let s = [1.0f32; 4];
        assert!(QuantView::new(2, 5, cfg, &q, &s, &s).is_ok());
        assert!(matches!(
            QuantView::new(2, 5, cfg, &q[..5], &s, &s),
            Err(QuantError::LengthMismatch { what: "q", .. })
        ));
        assert!(matches!(
            QuantView::new(2, 5, cfg, &q, &s, &s[..0]),
            Err(QuantError::LengthMismatch { what: "min", .. })
        ));
        let sb = [0u8; 7];
        assert!(QuantBytesView::new::<f16>(2, 5, cfg, &q, &sb, &sb).is_err());
    }

    #[test]
    fn odd_padded_rows_pack_across_rows() {
        // group 3, cols 3: padded row of 3 codes, so row 1 starts on a high nibble.
        let cfg = QuantConfig { bits: 4, group_size: 3, symmetric: true };
        let data: Vec<f32> = vec![1.0, -1.0, 0.5, -0.25, 0.0, 0.25, 7.0, 3.5, -7.0];
        let qt = quantize(&data, 3, 3, cfg);
        assert_eq!(qt.q.len(), 5);
        let out = qt.dequantize();
        // 3.5 * (7/7) = 3.5 rounds half to even: 4.
        assert_eq!(out, vec![1.0, -1.0, 4.0 / 7.0, -0.25, 0.0, 0.25, 7.0, 4.0, -7.0]);
    }

    #[test]
    fn symmetric_8bit_known_values() {
        // scale = 127 / 2 = 63.5: 1.0 → 63.5 → 64 (half to even) → 64/63.5.
        let cfg = QuantConfig { bits: 8, group_size: 4, symmetric: true };
        let qt = quantize(&[2.0f32, 1.0, -0.5, 0.0], 1, 4, cfg);
        assert_eq!(qt.q, vec![127, 64, (-32i8) as u8, 0]);
        assert_eq!(qt.scale, vec![63.5]);
        assert_eq!(qt.dequantize(), vec![2.0, 64.0 / 63.5, -32.0 / 63.5, 0.0]);
    }

    fn check_f16_conversions(step: usize) {
        for w in (0..=u32::MAX).step_by(step) {
            let x = f32::from_bits(w);
            let want = f16::from_f32(x);
            let got = f16_bits_from_f32(x);
            if x.is_nan() {
                assert!(f16::from_bits(got).is_nan(), "{w:#x}");
            } else {
                assert_eq!(got, want.to_bits(), "{w:#x} ({x:e})");
            }
        }
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_bits_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
            }
        }
    }

    #[test]
    fn f16_conversions_match_half_sampled() {
        // A prime stride visits every exponent and many mantissas; the ignored test below
        // checks all 2^32 patterns (run it in release).
        check_f16_conversions(4099);
    }

    #[test]
    #[ignore = "exhaustive: 2^32 conversions, run with --release --ignored"]
    fn f16_conversions_match_half_exhaustive() {
        check_f16_conversions(1);
    }

    #[test]
    fn bf16_rounding_matches_torch() {
        assert_eq!(bf16_bits_from_f32(1.0), 0x3F80);
        // 1 + 2^-8 is a tie between 1.0 and 1 + 2^-7: even mantissa wins.
        assert_eq!(bf16_bits_from_f32(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits_from_f32(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(bf16_bits_from_f32(f32::NAN), 0x7FC0);
        assert_eq!(bf16_bits_from_f32(-f32::NAN), 0x7FC0);
        assert_eq!(bf16_bits_from_f32(f32::INFINITY), 0x7F80);
        assert_eq!(bf16_bits_from_f32(f32::MAX), 0x7F80);
    }

    fn proptest_case<T: QuantFloat>(
        rows: usize,
        cols: usize,
        cfg: QuantConfig,
        vals: &[f32],
        range: (usize, usize),
    ) -> Result<(), TestCaseError> {
        let data: Vec<T> = vals.iter().map(|&v| T::from_f32(v)).collect();
        let qt = quantize(&data, rows, cols, cfg);
        let n = rows * cols;
        let mut fast = vec![T::default(); n];
        let mut reference = vec![T::default(); n];
        dequantize_range(qt.view(), 0..n, &mut fast);
        dequantize_reference(qt.view(), 0..n, &mut reference);
        prop_assert_eq!(bits_eq(&fast, &reference), None);
        let (a, b) = (range.0 % (n + 1), range.1 % (n + 1));
        let r = a.min(b)..a.max(b);
        let mut part = vec![T::default(); r.len()];
        dequantize_range(qt.view(), r.clone(), &mut part);
        prop_assert_eq!(bits_eq(&part, &reference[r]), None);

        // Round-trip error: within half a step (1/scale) of the group, plus the roundings of
        // the quotient, the min addition and the input (a few ulps of T at the group's
        // magnitude).
        let gpr = cfg.groups_per_row(cols);
        let eps = match T::SIZE {
            4 => f32::EPSILON,
            _ if T::DTYPE == "F16" => 1.0 / 1024.0,
            _ => 1.0 / 128.0,
        };
        for i in 0..n {
            let (r, c) = (i / cols, i % cols);
            let g = r * gpr + c / cfg.group_size;
            let s = qt.scale[g].to_f32();
            let x = data[i].to_f32();
            let y = fast[i].to_f32();
            if !s.is_finite() || s == 0.0 || !y.is_finite() {
                continue; // degenerate group: checked bit-exactly against torch instead
            }
            let gstart = r * cols + (c / cfg.group_size) * cfg.group_size;
            let gend = r * cols + (cols.min((c / cfg.group_size + 1) * cfg.group_size));
            let mag = data[gstart..gend].iter().fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
            let bound = 0.5 / s * (1.0 + 4.0 * eps) + 4.0 * eps * mag + f32::MIN_POSITIVE;
            prop_assert!((x - y).abs() <= bound, "x={x} y={y} s={s} bound={bound} cfg={cfg:?}");
        }
        Ok(())
    }

    fn arb_case() -> impl Strategy<Value = (usize, usize, QuantConfig, Vec<f32>, (usize, usize))> {
        (1usize..6, 1usize..70, prop_oneof![Just(4u8), Just(8u8)], 1usize..80, any::<bool>(), -8i32..8)
            .prop_flat_map(|(rows, cols, bits, group_size, symmetric, exp)| {
                let mag = 2f32.powi(exp);
                let cfg = QuantConfig { bits, group_size, symmetric };
                let vals = prop::collection::vec(
                    prop_oneof![8 => -mag..mag, 1 => Just(0.0f32), 1 => Just(mag / 2.0)],
                    rows * cols,
                );
                (Just(rows), Just(cols), Just(cfg), vals, (any::<usize>(), any::<usize>()))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn prop_f32((rows, cols, cfg, vals, range) in arb_case()) {
            proptest_case::<f32>(rows, cols, cfg, &vals, range)?;
        }

        #[test]
        fn prop_f16((rows, cols, cfg, vals, range) in arb_case()) {
            proptest_case::<f16>(rows, cols, cfg, &vals, range)?;
        }

        #[test]
        fn prop_bf16((rows, cols, cfg, vals, range) in arb_case()) {
            proptest_case::<bf16>(rows, cols, cfg, &vals, range)?;
        }
    }
}

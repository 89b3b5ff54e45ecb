//! The decoder: FastChat's `decompress` (compression.py:291-298) over any range of elements,
//! from typed buffers ([`dequantize_range`]) or little-endian bytes
//! ([`dequantize_range_bytes`], the read path's), and the element-by-element
//! [`dequantize_reference`] that defines it. The read path's hot loop: the kernels per
//! instruction set live here, apart from the encoder, which runs once per `llmfs quantize`.
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

use std::ops::Range;

use super::{QuantBytesView, QuantConfig, QuantFloat, QuantView};

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
pub(super) fn fused_exact(s: f32, m: f32) -> bool {
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
pub(super) unsafe fn dequantize8_fused<const BF16: bool>(
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
pub(super) fn divide<const FMA: bool>(b: &mut [f32], s: f32) {
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
pub(super) fn lookup_nibbles<T: Copy>(q: &[u8], k: usize, lut: &[T; 16], out: &mut [T]) {
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
pub(super) unsafe fn lookup_nibbles_avx2(bytes: &[u8], lut: &[u16; 16], out: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    // The table's low and high bytes, split in registers: this runs once per group (128
    // values), and two `[u16; 16]::map` calls to split it were a tenth of a q4 fill's thread.
    let (t0, t1) = (
        _mm_loadu_si128(lut.as_ptr() as *const __m128i),
        _mm_loadu_si128(lut.as_ptr().add(8) as *const __m128i),
    );
    let byte = _mm_set1_epi16(0xFF);
    let lo_table = _mm_packus_epi16(_mm_and_si128(t0, byte), _mm_and_si128(t1, byte));
    let hi_table = _mm_packus_epi16(_mm_srli_epi16::<8>(t0), _mm_srli_epi16::<8>(t1));
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

//! Adding a difference to a base: FastChat's fp16 delta add and a LoRA merge.
//!
//! FastChat's apply_delta.py (fschat 0.2.36, l.138-140) loads base and delta as fp16 and does
//! `param.data += delta` on the CPU: torch computes each element in f32 and rounds to f16. f32
//! holds the sum of two f16 values with enough precision that this single rounding equals the
//! correctly rounded f16 sum, so [`add_f16`] is bit-identical to torch.
//!
//! PEFT's merge (peft 0.21.2, tuners/lora/layer.py l.1044-1072 and l.1006-1008) computes
//! `delta = (B @ A) * scale` in f32 and adds it to the weight in the weight's dtype
//! (`dtype(f32(W) + delta)`). [`lora_rows`] does the same with f32 accumulation; its sums run in
//! another order than the BLAS PEFT calls, so results agree within f32 rounding of the product
//! (|error| ≤ r · ε_f32 · Σ|B·A| per element), which is below one bf16/f16 ulp except at rare ties.

use half::{bf16, f16};

use super::cast::CastError;
use crate::format::Dtype;

/// `out = f16(a + b)` elementwise on little-endian f16 bytes. Works in blocks through f32 with
/// the casts' vectorized conversions (exact widening; F16C's round-to-nearest-even narrowing):
/// the same single rounding as one value at a time. (`half`'s slice conversions, used before,
/// took 15 % of a FastChat import's fill on 2 cores, 4 values at a time, plus a copy in and out.)
pub fn add_f16(a: &[u8], b: &[u8], out: &mut [u8]) {
    assert!(a.len() == b.len() && a.len() == out.len() && a.len() % 2 == 0, "add_f16: lengths");
    const BLOCK: usize = 2048;
    let (mut x, mut y) = ([0f32; BLOCK], [0f32; BLOCK]);
    for ((ca, cb), co) in a.chunks(2 * BLOCK).zip(b.chunks(2 * BLOCK)).zip(out.chunks_mut(2 * BLOCK)) {
        let n = ca.len() / 2;
        let (x, y) = (&mut x[..n], &mut y[..n]);
        let widen = |from: &[u8], to: &mut [f32]| {
            super::cast::cast(Dtype::F16, Dtype::F32, from, bytemuck::cast_slice_mut(to))
        };
        widen(ca, x).expect("f16 is a float");
        widen(cb, y).expect("f16 is a float");
        for (x, y) in x.iter_mut().zip(y.iter()) {
            *x += *y;
        }
        super::cast::cast(Dtype::F32, Dtype::F16, bytemuck::cast_slice(x), co).expect("f16 is a float");
    }
}

/// `out = f16(f16(base) + delta)`: FastChat's add over a base of `from` (F16, BF16 or F32) that
/// it loads as fp16 first, `delta` and `out` f16. The same bits as casting `base` to f16 and
/// [`add_f16`], in one pass where the CPU has F16C (the cast, the two widenings, the add and
/// the narrowing were four passes over memory: 63 % of a FastChat import's fill thread on 2
/// cores); a block of 8 whose sum holds a NaN is done the two-step way, so NaNs come out as
/// they did.
pub fn add_f16_of(from: Dtype, base: &[u8], delta: &[u8], out: &mut [u8]) -> Result<(), CastError> {
    if !from.is_float() {
        return Err(CastError { from, to: Dtype::F16 });
    }
    let n = out.len() / 2;
    assert!(
        base.len() == n * from.size() && delta.len() == 2 * n && out.len() == 2 * n,
        "add_f16_of: lengths"
    );
    if from == Dtype::F16 {
        add_f16(base, delta, out);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if super::cast::has_f16c() {
        if let (Ok(d), Ok(o)) =
            (bytemuck::try_cast_slice::<u8, u16>(delta), bytemuck::try_cast_slice_mut::<u8, u16>(out))
        {
            let whole = n / 8 * 8;
            // SAFETY: AVX2 and F16C were just checked; lengths asserted above.
            unsafe { add_f16_of_f16c(from, base, d, o, whole) };
            let s = from.size();
            return add_f16_of_two_step(from, &base[whole * s..], &delta[2 * whole..], &mut out[2 * whole..]);
        }
    }
    add_f16_of_two_step(from, base, delta, out)
}

/// [`add_f16_of`] as a cast to f16 then [`add_f16`], in blocks.
fn add_f16_of_two_step(from: Dtype, base: &[u8], delta: &[u8], out: &mut [u8]) -> Result<(), CastError> {
    const BLOCK: usize = 2048;
    let mut h = [0u8; 2 * BLOCK];
    let s = from.size();
    for ((b, d), o) in base.chunks(s * BLOCK).zip(delta.chunks(2 * BLOCK)).zip(out.chunks_mut(2 * BLOCK)) {
        let h = &mut h[..d.len()];
        super::cast::cast(from, Dtype::F16, b, h)?;
        add_f16(h, d, o);
    }
    Ok(())
}

/// The first `whole` (a multiple of 8) elements of [`add_f16_of`] for a BF16 or F32 base, 8 at a
/// time in registers: VCVTPS2PH rounds the base to f16 and the sum back (round to nearest even,
/// as the two-step path's F16C conversions), VCVTPH2PS widens exactly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn add_f16_of_f16c(from: Dtype, base: &[u8], delta: &[u16], out: &mut [u16], whole: usize) {
    use std::arch::x86_64::*;
    let s = from.size();
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= n elements in each slice (asserted by the caller); unaligned
        // loads and stores.
        unsafe {
            let b = base.as_ptr().add(i * s);
            let wide = if from == Dtype::BF16 {
                let h = _mm_loadu_si128(b as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                _mm256_loadu_ps(b as *const f32)
            };
            let base_h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(wide);
            let d = _mm_loadu_si128(delta.as_ptr().add(i) as *const __m128i);
            let sum = _mm256_add_ps(_mm256_cvtph_ps(base_h), _mm256_cvtph_ps(d));
            if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(sum, sum)) != 0 {
                let o = std::slice::from_raw_parts_mut(out.as_mut_ptr().add(i) as *mut u8, 16);
                let d = std::slice::from_raw_parts(delta.as_ptr().add(i) as *const u8, 16);
                add_f16_of_two_step(from, &base[i * s..(i + 8) * s], d, o).expect("a float");
                continue;
            }
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(sum);
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
        }
    }
}

/// Element `i` of a little-endian float buffer of `dtype`, widened to f32.
pub fn load(dtype: Dtype, bytes: &[u8], i: usize) -> f32 {
    let s = dtype.size();
    let b = &bytes[i * s..(i + 1) * s];
    match dtype {
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => panic!("load: {dtype} is not a float"),
    }
}

pub fn store(dtype: Dtype, bytes: &mut [u8], i: usize, v: f32) {
    let s = dtype.size();
    let b = &mut bytes[i * s..(i + 1) * s];
    match dtype {
        Dtype::F32 => b.copy_from_slice(&v.to_le_bytes()),
        Dtype::F16 => b.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
        Dtype::BF16 => b.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
        _ => panic!("store: {dtype} is not a float"),
    }
}

/// The LoRA factors of one weight, widened to f32: `a` is r × in, `b` is out × r (row-major).
#[derive(Debug)]
pub struct LoraFactors {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
    /// The weight is stored transposed (`fan_in_fan_out`, GPT-2's Conv1D): W is in × out.
    pub transposed: bool,
}

/// Merge elements `elems` (row-major over W's `cols`) of `W + scale · B·A` into `out`, where
/// `w` holds the same elements of W in `dtype`. A `dtype` that is not F16, BF16 or F32 is an
/// error (import refuses such adapters; a hand-edited registry could still name one): it
/// reaches here from a read, which must answer EIO, never panic.
///
/// Each element's sum is `Σ_j B[o, j] · A[j, i]` from 0.0 in order j = 0..r, each term a fused
/// multiply-add (`f32::mul_add`: one rounding, as BLAS's FMA kernels do), computed for a tile of
/// columns at a time ([`lora_rows_tiled`]): the loop over the tile is the inner one, so it
/// vectorizes, and the bits are those of one element at a time whatever the tile's width (the
/// copy for the widest vectors the CPU has is chosen here). Fused, the r terms are half the
/// vector operations of a multiply then an add: on 2 cores (AVX-512) the kernel took 54 % of a
/// LoRA fill's thread time that way.
pub fn lora_rows(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
) -> Result<(), CastError> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: `lora_rows_avx512` only requires AVX-512F, which was just checked.
            return unsafe { lora_rows_avx512(f, dtype, cols, elems, w, out) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: `lora_rows_avx2` only requires AVX2 and FMA, which were just checked.
            return unsafe { lora_rows_avx2(f, dtype, cols, elems, w, out) };
        }
    }
    // Without FMA instructions (x86-64 before AVX2) `mul_add` is libm's `fmaf`: slow, same bits.
    portable_tiles::<16, 2>(f, dtype, cols, elems, w, out)
}

/// [`lora_rows_tiled`] compiled for AVX2 and FMA: 4 rows × 24 sums at a time (12 registers of
/// 8). Each sum is the same fused multiply-adds in the same order at any tile shape, so the bits
/// are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lora_rows_avx2(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
) -> Result<(), CastError> {
    // SAFETY (of the closure): this function runs only where AVX2 and FMA are.
    lora_rows_tiled::<24, 4>(f, dtype, cols, elems, w, out, |b, a, a_cols, i0| unsafe {
        simd::tile_4x24_avx2(b, a, a_cols, i0)
    })
}

/// [`lora_rows_avx2`] for AVX-512 (which has FMA): 4 rows × 96 sums at a time (24 registers of
/// 16), the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn lora_rows_avx512(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
) -> Result<(), CastError> {
    // SAFETY (of the closure): this function runs only where AVX-512F is.
    lora_rows_tiled::<96, 4>(f, dtype, cols, elems, w, out, |b, a, a_cols, i0| unsafe {
        simd::tile_4x96_avx512(b, a, a_cols, i0)
    })
}

/// [`lora_rows`] with `ROWS` × `TILE` sums held in registers across the r terms (the baseline
/// x86-64 target: 2 × 16 in 8 SSE registers). Whole rows go `ROWS` at a time: each vector of A
/// loaded serves `ROWS` rows' sums. One row at a time, every multiply-add needed a load of A
/// (from L2: A is r × in, 256 KiB and more), and the kernel ran at a third of the FMA units'
/// rate; the partial rows at a range's ends still go one at a time.
/// `full_tile(b, a, a_cols, i0)` sums a whole tile ([`rows_tile_sums`] with `width == TILE`, or
/// the same in explicit vector registers).
#[inline(always)]
fn lora_rows_tiled<const TILE: usize, const ROWS: usize>(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
    full_tile: impl Fn(&[&[f32]; ROWS], &[f32], usize, usize) -> [[f32; TILE]; ROWS],
) -> Result<(), CastError> {
    if !dtype.is_float() {
        return Err(CastError { from: dtype, to: Dtype::F32 });
    }
    let r = f.rank;
    let a_cols = f.a.len() / r; // A is r × in
    let mut acc = Vec::new();
    let mut e = elems.start;
    while e < elems.end {
        let (row, c0) = (e / cols, e % cols);
        // A block of `ROWS` whole rows, or what is left of this row.
        let whole = !f.transposed && c0 == 0 && elems.end - e >= ROWS * cols;
        let n = if whole { ROWS * cols } else { cols.min(c0 + (elems.end - e)) - c0 };
        acc.clear();
        acc.resize(n, 0f32);
        if f.transposed {
            for j in 0..r {
                // W[i, o] for i = row, o in c0..c0 + n: B's column j along o, one value of A.
                let a = f.a[j * a_cols + row];
                for (x, o) in acc.iter_mut().zip(c0..c0 + n) {
                    *x = f.b[o * r + j].mul_add(a, *x);
                }
            }
        } else if whole {
            // W[o, i] for o in row..row + ROWS: B's rows o times A's rows along i, by tiles of
            // TILE columns, ROWS × TILE sums in registers across all r terms.
            let b: [&[f32]; ROWS] = std::array::from_fn(|k| &f.b[(row + k) * r..(row + k + 1) * r]);
            let mut t0 = 0;
            while t0 < cols {
                let width = TILE.min(cols - t0);
                let sums = if width == TILE {
                    full_tile(&b, &f.a, a_cols, t0)
                } else {
                    rows_tile_sums::<TILE, ROWS>(&b, &f.a, a_cols, t0, width)
                };
                for (k, s) in sums.iter().enumerate() {
                    acc[k * cols + t0..][..width].copy_from_slice(&s[..width]);
                }
                t0 += width;
            }
        } else {
            // W[o, i] for o = row, i in c0..c0 + n: B's row o times A's rows along i.
            let b = [&f.b[row * r..(row + 1) * r]];
            let mut t0 = 0;
            while t0 < n {
                let width = TILE.min(n - t0);
                let sums = rows_tile_sums::<TILE, 1>(&b, &f.a, a_cols, c0 + t0, width);
                acc[t0..][..width].copy_from_slice(&sums[0][..width]);
                t0 += width;
            }
        }
        let (s, k0) = (dtype.size(), e - elems.start);
        let bytes = k0 * s..(k0 + acc.len()) * s;
        add_scaled(dtype, &w[bytes.clone()], &acc, f.scale, &mut out[bytes]);
        e += n;
    }
    Ok(())
}

/// [`lora_rows_tiled`] with `ROWS` × `TILE` portable tiles ([`rows_tile_sums`] for whole ones):
/// the baseline x86-64 copy, and other shapes in the tests.
fn portable_tiles<const TILE: usize, const ROWS: usize>(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
) -> Result<(), CastError> {
    lora_rows_tiled::<TILE, ROWS>(f, dtype, cols, elems, w, out, |b, a, a_cols, i0| {
        rows_tile_sums(b, a, a_cols, i0, TILE)
    })
}

/// `out = dtype(f32(w) + acc · scale)` element by element (`w`, `out` little-endian `dtype`, a
/// float), in one pass the compiler vectorizes: the casts' own branch-free conversions, so the
/// same bits as casting `w` to f32, adding and casting back (which took two more passes over
/// memory: 43 % of the kernel's time once the sums were in registers).
#[inline(always)]
fn add_scaled(dtype: Dtype, w: &[u8], acc: &[f32], scale: f32, out: &mut [u8]) {
    use super::cast::{bf16_bits_from_f32, f16_bits_from_f32, f16_bits_to_f32};
    let n = acc.len();
    let s = dtype.size();
    let (w, out) = (&w[..n * s], &mut out[..n * s]);
    // Indexed loops over slices of known length: the form LLVM vectorizes (chunked iterators
    // zipped together were 4x slower).
    let halves = (bytemuck::try_cast_slice::<u8, u16>(w), bytemuck::try_cast_slice_mut::<u8, u16>(out));
    let half = matches!(dtype, Dtype::BF16 | Dtype::F16) && cfg!(target_endian = "little");
    if let (Ok(w), Ok(out), true) = (halves.0, halves.1, half) {
        // 2-byte aligned (as buffers from the allocator are): whole words.
        if dtype == Dtype::BF16 {
            for i in 0..n {
                out[i] = bf16_bits_from_f32(f32::from_bits((w[i] as u32) << 16) + acc[i] * scale);
            }
        } else {
            for i in 0..n {
                out[i] = f16_bits_from_f32(f16_bits_to_f32(w[i]) + acc[i] * scale);
            }
        }
        return;
    }
    match dtype {
        Dtype::BF16 => {
            for i in 0..n {
                let x = f32::from_bits((u16::from_le_bytes([w[2 * i], w[2 * i + 1]]) as u32) << 16);
                let b = bf16_bits_from_f32(x + acc[i] * scale).to_le_bytes();
                (out[2 * i], out[2 * i + 1]) = (b[0], b[1]);
            }
        }
        Dtype::F16 => {
            for i in 0..n {
                let x = f16_bits_to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]]));
                let b = f16_bits_from_f32(x + acc[i] * scale).to_le_bytes();
                (out[2 * i], out[2 * i + 1]) = (b[0], b[1]);
            }
        }
        _ => {
            for i in 0..n {
                let x = f32::from_le_bytes(w[4 * i..4 * i + 4].try_into().expect("4 bytes"));
                out[4 * i..4 * i + 4].copy_from_slice(&(x + acc[i] * scale).to_le_bytes());
            }
        }
    }
}

/// `sums[k][c] = Σ_j b[k][j] · a[j, i0 + c]` for c < `width` (≤ `TILE`), from 0.0 in order
/// j = 0..r, each term a fused multiply-add; `a` row-major with `a_cols` columns. A whole tile
/// is summed in a local array, which the compiler keeps in registers (sums written through a
/// reference went back to memory at every term); a narrower one (a row's last columns) loops
/// over `width`.
#[inline(always)]
fn rows_tile_sums<const TILE: usize, const ROWS: usize>(
    b: &[&[f32]; ROWS],
    a: &[f32],
    a_cols: usize,
    i0: usize,
    width: usize,
) -> [[f32; TILE]; ROWS] {
    let r = b[0].len();
    let mut sums = [[0f32; TILE]; ROWS];
    if width == TILE {
        for j in 0..r {
            let a: &[f32; TILE] = a[j * a_cols + i0..][..TILE].try_into().expect("TILE values");
            for (k, row) in sums.iter_mut().enumerate() {
                let bj = b[k][j];
                for c in 0..TILE {
                    row[c] = bj.mul_add(a[c], row[c]);
                }
            }
        }
    } else {
        for j in 0..r {
            let a = &a[j * a_cols + i0..][..width];
            for (k, row) in sums.iter_mut().enumerate() {
                let bj = b[k][j];
                for (x, &a) in row[..width].iter_mut().zip(a) {
                    *x = bj.mul_add(a, *x);
                }
            }
        }
    }
    sums
}

/// [`rows_tile_sums`] of whole tiles in explicit vector registers: LLVM kept the generic version's
/// 4 × 96 sums in memory, storing every one back at every term. The same fused multiply-adds
/// in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    macro_rules! tile_kernel {
        ($name:ident, $feature:literal, $vec:ty, $lanes:literal, $vecs:literal, $zero:ident, $load:ident,
         $set1:ident, $fmadd:ident, $store:ident) => {
            /// `sums[k][c] = Σ_j b[k][j] · a[j, i0 + c]`, j in order, for 4 rows and a whole tile.
            ///
            /// # Safety
            /// The CPU must have the target feature this is compiled for.
            #[target_feature(enable = $feature)]
            pub unsafe fn $name(
                b: &[&[f32]; 4],
                a: &[f32],
                a_cols: usize,
                i0: usize,
            ) -> [[f32; $lanes * $vecs]; 4] {
                let r = b[0].len();
                assert!(b.iter().all(|b| b.len() == r), "B's rows");
                assert!(r == 0 || (r - 1) * a_cols + i0 + $lanes * $vecs <= a.len(), "A's tile");
                let mut acc = [[$zero(); $vecs]; 4];
                for j in 0..r {
                    // SAFETY: within `a` (asserted above for the last j).
                    let ap = unsafe { a.as_ptr().add(j * a_cols + i0) };
                    let av: [$vec; $vecs] = std::array::from_fn(|v| unsafe { $load(ap.add(v * $lanes)) });
                    for k in 0..4 {
                        let bj = $set1(b[k][j]);
                        for v in 0..$vecs {
                            acc[k][v] = $fmadd(bj, av[v], acc[k][v]);
                        }
                    }
                }
                let mut sums = [[0f32; $lanes * $vecs]; 4];
                for k in 0..4 {
                    for v in 0..$vecs {
                        // SAFETY: `sums[k]` holds $vecs vectors.
                        unsafe { $store(sums[k].as_mut_ptr().add(v * $lanes), acc[k][v]) };
                    }
                }
                sums
            }
        };
    }
    tile_kernel!(
        tile_4x24_avx2,
        "avx2,fma",
        __m256,
        8,
        3,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps
    );
    tile_kernel!(
        tile_4x96_avx512,
        "avx512f",
        __m512,
        16,
        6,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps
    );
}

/// The obvious loop, one element at a time: the reference [`lora_rows`] is tested against.
#[cfg(test)]
fn lora_one_at_a_time(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
) {
    let r = f.rank;
    let a_cols = f.a.len() / r;
    for (k, e) in elems.enumerate() {
        let (row, col) = (e / cols, e % cols);
        let (o, i) = if f.transposed { (col, row) } else { (row, col) };
        let mut acc = 0f32;
        for j in 0..r {
            acc = f.b[o * r + j].mul_add(f.a[j * a_cols + i], acc);
        }
        store(dtype, out, k, load(dtype, w, k) + acc * f.scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::SplitMix64;

    #[test]
    fn f16_add_is_the_correctly_rounded_sum() {
        let mut rng = SplitMix64(3);
        let n = 50_000;
        let a: Vec<u8> = (0..n)
            .flat_map(|_| (rng.next_u64() as u16 & 0x7bff ^ (rng.next_u64() as u16 & 0x8000)).to_le_bytes())
            .collect();
        let b: Vec<u8> = (0..n).flat_map(|_| f16::from_f32(rng.normal() * 0.01).to_le_bytes()).collect();
        let mut out = vec![0u8; 2 * n];
        add_f16(&a, &b, &mut out);
        for i in 0..n {
            let x = f16::from_le_bytes([a[2 * i], a[2 * i + 1]]).to_f64()
                + f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64();
            assert_eq!(&out[2 * i..2 * i + 2], &f16::from_f64(x).to_le_bytes(), "element {i}");
        }
        // Infinities, NaNs, overflow to infinity, subnormals and signed zeros.
        let specials = [
            f16::INFINITY,
            f16::NEG_INFINITY,
            f16::NAN,
            f16::MAX,
            f16::MIN_POSITIVE_SUBNORMAL,
            f16::NEG_ZERO,
        ];
        let (a, b): (Vec<u8>, Vec<u8>) = (0..36)
            .map(|i| (specials[i % 6].to_le_bytes(), specials[i / 6].to_le_bytes()))
            .fold((vec![], vec![]), |(mut a, mut b), (x, y)| {
                a.extend(x);
                b.extend(y);
                (a, b)
            });
        let mut out = vec![0u8; a.len()];
        add_f16(&a, &b, &mut out);
        for i in 0..36 {
            let want = f16::from_f32(specials[i % 6].to_f32() + specials[i / 6].to_f32());
            let got = f16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{i}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn add_f16_of_gives_the_bits_of_a_cast_then_the_add() {
        let mut rng = SplitMix64(5);
        for from in [Dtype::BF16, Dtype::F32, Dtype::F16] {
            for n in [0, 7, 8, 1000, 4099] {
                // Random bit patterns (NaNs, infinities, subnormals, values past f16's range among
                // them) and, every few elements, small normal values as real weights are.
                let base: Vec<u8> = (0..n)
                    .flat_map(|i| {
                        let v =
                            if i % 3 == 0 { rng.next_u64() as u32 } else { (rng.normal() * 0.1).to_bits() };
                        match from {
                            Dtype::F32 => v.to_le_bytes().to_vec(),
                            Dtype::BF16 => ((v >> 16) as u16).to_le_bytes().to_vec(),
                            _ => f16::from_f32(f32::from_bits(v)).to_le_bytes().to_vec(),
                        }
                    })
                    .collect();
                let delta: Vec<u8> = (0..n)
                    .flat_map(|i| {
                        let h = if i % 5 == 0 {
                            rng.next_u64() as u16
                        } else {
                            f16::from_f32(rng.normal() * 0.01).to_bits()
                        };
                        h.to_le_bytes()
                    })
                    .collect();
                let mut want = vec![0u8; 2 * n];
                let mut h = vec![0u8; 2 * n];
                super::super::cast::cast(from, Dtype::F16, &base, &mut h).unwrap();
                add_f16(&h, &delta, &mut want);
                let mut got = vec![0u8; 2 * n];
                add_f16_of(from, &base, &delta, &mut got).unwrap();
                assert!(got == want, "{from} n={n}");
                // At odd addresses: the two-step path.
                let (mut d_odd, mut o_odd) = (vec![0u8; 2 * n + 1], vec![0u8; 2 * n + 1]);
                d_odd[1..].copy_from_slice(&delta);
                add_f16_of(from, &base, &d_odd[1..], &mut o_odd[1..]).unwrap();
                assert!(o_odd[1..] == want, "odd: {from} n={n}");
            }
        }
        assert!(add_f16_of(Dtype::I32, &[0; 4], &[0; 2], &mut [0; 2]).is_err());
    }

    type Tiled =
        fn(&LoraFactors, Dtype, usize, std::ops::Range<usize>, &[u8], &mut [u8]) -> Result<(), CastError>;

    #[test]
    fn lora_rows_gives_the_bits_of_one_element_at_a_time() {
        let mut rng = SplitMix64(17);
        for (rows, cols, r, transposed, dtype) in [
            (9, 37, 4, false, Dtype::F16),
            (9, 37, 4, true, Dtype::BF16),
            (5, 64, 16, false, Dtype::F32),
            (33, 7, 2, true, Dtype::F16),
            (3, 200, 16, false, Dtype::BF16),
            (19, 300, 8, false, Dtype::F16),
        ] {
            // Factors sized for W = out × in (not transposed) or in × out (transposed).
            let (out_dim, in_dim) = if transposed { (cols, rows) } else { (rows, cols) };
            let a: Vec<f32> = (0..r * in_dim).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..out_dim * r).map(|_| rng.normal()).collect();
            let f = LoraFactors { a, b, rank: r, scale: 0.37, transposed };
            let n = rows * cols;
            let w: Vec<u8> = (0..n)
                .flat_map(|_| {
                    let v = rng.normal();
                    match dtype {
                        Dtype::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                        Dtype::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                        _ => v.to_le_bytes().to_vec(),
                    }
                })
                .collect();
            let s = dtype.size();
            for range in [0..n, 3..n - 2, cols - 1..cols + 1, 5..5, cols + 2..3 * cols - 1] {
                let (wr, len) = (&w[range.start * s..range.end * s], range.len() * s);
                let (mut got, mut want) = (vec![0u8; len], vec![0u8; len]);
                lora_one_at_a_time(&f, dtype, cols, range.clone(), wr, &mut want);
                // The dispatch (AVX2 where the machine has it) and the baseline's 32-wide tiles.
                lora_rows(&f, dtype, cols, range.clone(), wr, &mut got).unwrap();
                assert!(got == want, "{rows}x{cols} r{r} transposed={transposed} {dtype} {range:?}");
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // The AVX2 copy, which the dispatch skips on a machine with AVX-512.
                    got.fill(0);
                    // SAFETY: AVX2 and FMA were just checked.
                    unsafe { lora_rows_avx2(&f, dtype, cols, range.clone(), wr, &mut got) }.unwrap();
                    assert!(
                        got == want,
                        "avx2: {rows}x{cols} r{r} transposed={transposed} {dtype} {range:?}"
                    );
                }
                // W and the output at odd addresses (the byte-wise path of `add_scaled`).
                let (mut w_odd, mut out_odd) = (vec![0u8; len + 1], vec![0u8; len + 1]);
                w_odd[1..].copy_from_slice(wr);
                lora_rows(&f, dtype, cols, range.clone(), &w_odd[1..], &mut out_odd[1..]).unwrap();
                assert!(out_odd[1..] == want, "odd: {rows}x{cols} r{r} {dtype} {range:?}");
                // The portable tiles of other shapes (wider, narrower, one row, odd row counts).
                let tilings: [(&str, Tiled); 3] = [
                    ("16 x 2", portable_tiles::<16, 2>),
                    ("32 x 1", portable_tiles::<32, 1>),
                    ("8 x 3", portable_tiles::<8, 3>),
                ];
                for (shape, tiled) in tilings {
                    got.fill(0);
                    tiled(&f, dtype, cols, range.clone(), wr, &mut got).unwrap();
                    assert!(
                        got == want,
                        "tiles {shape}: {rows}x{cols} r{r} transposed={transposed} {dtype} {range:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn lora_on_a_weight_that_is_not_a_float_is_an_error_not_a_panic() {
        let f = LoraFactors { a: vec![1.0; 4], b: vec![1.0; 4], rank: 2, scale: 1.0, transposed: false };
        for dtype in [Dtype::I8, Dtype::U8, Dtype::F64, Dtype::I32] {
            let w = vec![0u8; 4 * dtype.size()];
            let mut out = w.clone();
            assert!(lora_rows(&f, dtype, 2, 0..4, &w, &mut out).is_err(), "{dtype}");
        }
    }

    #[test]
    fn lora_matches_a_float64_reference() {
        let (out_dim, in_dim, r) = (7usize, 11usize, 3usize);
        let mut rng = SplitMix64(9);
        let a: Vec<f32> = (0..r * in_dim).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..out_dim * r).map(|_| rng.normal()).collect();
        let w: Vec<u8> = (0..out_dim * in_dim).flat_map(|_| rng.normal().to_le_bytes()).collect();
        let f = LoraFactors { a: a.clone(), b: b.clone(), rank: r, scale: 0.5, transposed: false };
        let mut out = vec![0u8; w.len()];
        // A range starting mid-row, as the read path asks.
        lora_rows(&f, Dtype::F32, in_dim, 5..out_dim * in_dim, &w[5 * 4..], &mut out[5 * 4..]).unwrap();
        for e in 5..out_dim * in_dim {
            let (o, i) = (e / in_dim, e % in_dim);
            let delta: f64 =
                (0..r).map(|j| b[o * r + j] as f64 * a[j * in_dim + i] as f64).sum::<f64>() * 0.5;
            let want = load(Dtype::F32, &w, e) as f64 + delta;
            let got = load(Dtype::F32, &out, e) as f64;
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "element {e}: {got} vs {want}");
        }
    }
}

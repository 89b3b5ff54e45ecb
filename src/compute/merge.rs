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
/// Each element's sum is `Σ_j B[o, j] · A[j, i]` from 0.0 in order j = 0..r (Rust never fuses
/// the multiply-add), computed for a tile of columns at a time ([`lora_rows_tiled`]): the loop
/// over the tile is the inner one, so it vectorizes, and the bits are those of one element at a
/// time whatever the tile's width (the copy for the widest vectors the CPU has is chosen here).
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
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: `lora_rows_avx2` only requires AVX2, which was just checked.
            return unsafe { lora_rows_avx2(f, dtype, cols, elems, w, out) };
        }
    }
    lora_rows_tiled::<32>(f, dtype, cols, elems, w, out)
}

/// [`lora_rows_tiled`] compiled for AVX2, 64 sums at a time (8 registers of 8). Without FMA (not
/// enabled here, and Rust never fuses a multiply and an add) each sum is the same IEEE multiplies
/// and adds in the same order at any vector width, so the bits are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lora_rows_avx2(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
) -> Result<(), CastError> {
    lora_rows_tiled::<64>(f, dtype, cols, elems, w, out)
}

/// [`lora_rows_avx2`] for AVX-512: 128 sums at a time (8 registers of 16), the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lora_rows_avx512(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
) -> Result<(), CastError> {
    lora_rows_tiled::<128>(f, dtype, cols, elems, w, out)
}

/// [`lora_rows`] with `TILE` sums held in registers across the r terms of a row segment (the
/// baseline x86-64 target: 32, 8 SSE registers).
#[inline(always)]
fn lora_rows_tiled<const TILE: usize>(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [u8],
) -> Result<(), CastError> {
    if !dtype.is_float() {
        return Err(CastError { from: dtype, to: Dtype::F32 });
    }
    let r = f.rank;
    let a_cols = f.a.len() / r; // A is r × in
    let (mut acc, mut wide) = (Vec::new(), Vec::new());
    let mut e = elems.start;
    while e < elems.end {
        let (row, c0) = (e / cols, e % cols);
        let c1 = cols.min(c0 + (elems.end - e));
        acc.clear();
        acc.resize(c1 - c0, 0f32);
        if f.transposed {
            for j in 0..r {
                // W[i, o] for i = row, o in c0..c1: B's column j along o, one value of A.
                let a = f.a[j * a_cols + row];
                for (x, o) in acc.iter_mut().zip(c0..c1) {
                    *x += f.b[o * r + j] * a;
                }
            }
        } else {
            // W[o, i] for o = row, i in c0..c1: B's row o times A's rows along i, by tiles of
            // TILE columns, each tile's sums kept in registers across all r terms (summed term by
            // term over the whole segment, every term loaded and stored every sum again).
            let b = &f.b[row * r..(row + 1) * r];
            for (t, sums) in acc.chunks_mut(TILE).enumerate() {
                tile_sums::<TILE>(b, &f.a, a_cols, c0 + t * TILE, sums);
            }
        }
        // out = dtype(f32(W) + acc · scale), a slice at a time (per-element conversions cost
        // more than the r multiply-adds).
        let (s, k0) = (dtype.size(), e - elems.start);
        let bytes = k0 * s..(k0 + acc.len()) * s;
        wide.resize(acc.len(), 0f32);
        super::cast::cast(dtype, Dtype::F32, &w[bytes.clone()], bytemuck::cast_slice_mut(&mut wide))?;
        for (x, &a) in wide.iter_mut().zip(&acc) {
            *x += a * f.scale;
        }
        super::cast::cast(Dtype::F32, dtype, bytemuck::cast_slice(&wide), &mut out[bytes])?;
        e += c1 - c0;
    }
    Ok(())
}

/// `sums[k] = Σ_j b[j] · a[j, i0 + k]` from 0.0 in order j = 0..r, `a` row-major with `a_cols`
/// columns: a whole `TILE` in registers, a shorter remainder through memory.
#[inline(always)]
fn tile_sums<const TILE: usize>(b: &[f32], a: &[f32], a_cols: usize, i0: usize, sums: &mut [f32]) {
    if sums.len() == TILE {
        let mut tile = [0f32; TILE];
        for (j, &bj) in b.iter().enumerate() {
            let a: &[f32; TILE] = a[j * a_cols + i0..][..TILE].try_into().expect("TILE values");
            for k in 0..TILE {
                tile[k] += bj * a[k];
            }
        }
        sums.copy_from_slice(&tile);
    } else {
        for (j, &bj) in b.iter().enumerate() {
            for (x, &a) in sums.iter_mut().zip(&a[j * a_cols + i0..]) {
                *x += bj * a;
            }
        }
    }
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
            acc += f.b[o * r + j] * f.a[j * a_cols + i];
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
                for tiled in [lora_rows_tiled::<32>, lora_rows_tiled::<64>] {
                    got.fill(0);
                    tiled(&f, dtype, cols, range.clone(), wr, &mut got).unwrap();
                    assert!(
                        got == want,
                        "tiles: {rows}x{cols} r{r} transposed={transposed} {dtype} {range:?}"
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

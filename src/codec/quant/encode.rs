//! The encoder: FastChat's `compress` (compression.py:226-276), row by row in parallel, each
//! op rounded to the dtype as torch rounds it (see the parent module's doc for the arithmetic and
//! for what torch does with degenerate groups, which [`SYM_NAN_CODE`] and [`ASYM_NAN_CODE`]
//! record), and the 4-bit codes packed two a byte.

use rayon::prelude::*;

use super::{QuantConfig, QuantFloat, QuantizedTensor};

/// What torch (2.15.0, x86-64) gives for `NaN.to(torch.int8)` in FastChat's compress
/// (compression.py:264): found with `scripts/fastchat_quant_check.py --probe`.
pub const SYM_NAN_CODE: i8 = 0;
/// What torch (2.15.0, x86-64) gives for `NaN.to(torch.uint8)` (compression.py:275).
pub const ASYM_NAN_CODE: u8 = 0;

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

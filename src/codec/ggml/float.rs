//! The scalar conversions ggml's quantizers are built on, ported bit for bit.
//!
//! ggml-base (where ggml-quants.c lives) converts with its own C code, never F16C: these are
//! `ggml_compute_fp32_to_fp16` and friends from ggml/src/ggml-impl.h. They agree with IEEE
//! round-to-nearest-even (`half::f16::from_f32`) on every non-NaN input; a NaN becomes ggml's
//! canonical 0x7E00 with its sign, where `half` keeps payload bits, hence the port.

/// `ggml_compute_fp32_to_fp16` (ggml-impl.h): round to nearest even; NaN to ±0x7E00.
#[inline]
pub fn fp32_to_fp16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 0x1.0p+112f
    let scale_to_zero = f32::from_bits(0x0880_0000); // 0x1.0p-110f
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;

    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let mut bias = shl1_w & 0xFF00_0000;
    if bias < 0x7100_0000 {
        bias = 0x7100_0000;
    }

    #[allow(clippy::assign_op_pattern)] // the C's operand order
    {
        base = f32::from_bits((bias >> 1) + 0x0780_0000) + base;
    }
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    // The C returns a uint32_t expression as ggml_fp16_t: truncated to 16 bits.
    ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

/// `ggml_compute_fp16_to_fp32` (ggml-impl.h): exact.
#[inline]
pub fn fp16_to_fp32(h: u16) -> f32 {
    let w = (h as u32) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);

    let exp_offset = 0xE0u32 << 23;
    let exp_scale = f32::from_bits(0x0780_0000); // 0x1.0p-112f
    let normalized_value = f32::from_bits((two_w >> 4) + exp_offset) * exp_scale;

    let magic_mask = 126u32 << 23;
    let magic_bias = 0.5f32;
    let denormalized_value = f32::from_bits((two_w >> 17) | magic_mask) - magic_bias;

    let denormalized_cutoff = 1u32 << 27;
    let result = sign
        | if two_w < denormalized_cutoff { denormalized_value.to_bits() } else { normalized_value.to_bits() };
    f32::from_bits(result)
}

/// `ggml_compute_fp32_to_bf16` (ggml-impl.h): round to nearest even; a NaN keeps its top bits
/// and is made quiet.
#[inline]
pub fn fp32_to_bf16(s: f32) -> u16 {
    let i = s.to_bits();
    if (i & 0x7fff_ffff) > 0x7f80_0000 {
        return ((i >> 16) | 64) as u16;
    }
    (i.wrapping_add(0x7fff + ((i >> 16) & 1)) >> 16) as u16
}

/// `ggml_compute_bf16_to_fp32`.
#[inline]
pub fn bf16_to_fp32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `nearest_int` (ggml-quants.c): round to nearest even through the 1.5*2^23 magic number.
/// Exact for |fval| <= 4194303 (ggml asserts that in debug builds); beyond, it returns the
/// same garbage ggml's release build does.
#[inline(always)]
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12582912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// A C cast of a float to an integer type, as x86-64 compiles it (`cvttss2si`): truncation
/// toward zero, and 0x80000000 for NaN and out of range (where C leaves it undefined). A cast
/// to a narrower type (`(int8_t)f`, `(uint8_t)f`) then keeps the low bits: `c_f32_to_i32(f) as i8`.
#[inline(always)]
pub fn c_f32_to_i32(f: f32) -> i32 {
    if (-2147483648.0..2147483648.0).contains(&f) {
        f as i32
    } else {
        i32::MIN
    }
}

/// `(int)roundf(x)` with C's x86-64 cast (`c_f32_to_i32(x.round())`), without a call to libm's
/// `roundf` (x86-64's baseline has no rounding instruction): truncate, then step away from zero
/// when the dropped fraction is at least a half. The fraction `x - trunc(x)` is exact, and
/// from 2^23 up every f32 is an integer (fraction 0).
#[inline(always)]
pub fn c_roundf_to_i32(x: f32) -> i32 {
    let t = c_f32_to_i32(x);
    let frac = x - t as f32;
    // Without branches: the fraction's sign is random in real data (mispredictions cost more
    // than the call this replaces).
    let r = t.wrapping_add((frac >= 0.5) as i32).wrapping_sub((frac <= -0.5) as i32);
    // i32::MIN: NaN or out of range, where roundf's result casts to i32::MIN as well.
    if t == i32::MIN {
        t
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn fp16_matches_ieee_rne_on_every_non_nan_pattern_class() {
        // Every f16 value and the midpoints around it, plus the f32 exponent range's ends.
        for h in 0..=u16::MAX {
            let v = f16::from_bits(h);
            if v.is_nan() {
                assert_eq!(fp32_to_fp16(v.to_f32()) & 0x7fff, 0x7E00);
                continue;
            }
            assert_eq!(fp16_to_fp32(h).to_bits(), v.to_f32().to_bits(), "{h:#x}");
            let f = v.to_f32();
            assert_eq!(fp32_to_fp16(f), h, "{h:#x}");
            for d in [-2i32, -1, 1, 2] {
                let g = f32::from_bits((f.to_bits() as i32).wrapping_add(d << 12) as u32);
                if !g.is_nan() {
                    assert_eq!(fp32_to_fp16(g), f16::from_f32(g).to_bits(), "{g:e}");
                }
            }
        }
        let mut x = 0x9E37_79B9u32;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let g = f32::from_bits(x);
            if !g.is_nan() {
                assert_eq!(fp32_to_fp16(g), f16::from_f32(g).to_bits(), "{g:e}");
                assert_eq!(fp32_to_bf16(g), bf16::from_f32(g).to_bits(), "{g:e}");
            }
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (f, i) in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (3.49, 3), (-7.6, -8)] {
            assert_eq!(nearest_int(f), i, "{f}");
        }
        assert_eq!(nearest_int(4194303.0), 4194303);
        assert_eq!(nearest_int(-4194303.0), -4194303);
    }

    #[test]
    fn c_roundf_is_roundf() {
        let mut x = 0x1234_5678u32;
        let check = |v: f32| {
            assert_eq!(c_roundf_to_i32(v), c_f32_to_i32(v.round()), "{v:e}");
        };
        for v in [0.5, -0.5, 1.5, -1.5, 2.5, 0.49999997, -0.49999997, 8388607.5, -0.0, 127.0] {
            check(v);
        }
        for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 2147483520.0, -2147483648.0, 3e9] {
            check(v);
        }
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            check(f32::from_bits(x));
            check((x >> 9) as f32 / 1024.0 - 4096.0);
        }
    }

    #[test]
    fn c_casts_are_x86_s() {
        assert_eq!(c_f32_to_i32(16.9), 16);
        assert_eq!(c_f32_to_i32(-0.9), 0);
        assert_eq!(c_f32_to_i32(f32::NAN), i32::MIN);
        assert_eq!(c_f32_to_i32(f32::INFINITY), i32::MIN);
        assert_eq!(c_f32_to_i32(3e9), i32::MIN);
        assert_eq!(c_f32_to_i32(-2147483648.0), i32::MIN);
    }
}

//! The 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): ggml-quants.c's
//! `quantize_row_*_ref` and `dequantize_row_*`, one block per call, in the C's operation order.
//!
//! C's float-to-small-integer casts (`(int8_t)(x0 + 8.5f)`) go through `c_f32_to_i32` so that
//! even non-finite inputs give the bytes an x86-64 build of ggml gives.

// The ports keep the C's index loops, so each line can be read against ggml-quants.c.
#![allow(clippy::needless_range_loop)]

use super::block::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, F16Bits};
use super::float::{bf16_to_fp32, c_f32_to_i32, c_roundf_to_i32, fp16_to_fp32, fp32_to_fp16};

/// ggml's `MIN(a, b)`: `((a) < (b) ? (a) : (b))`.
#[inline(always)]
fn cmin(a: i32, b: i32) -> i32 {
    if a < b {
        a
    } else {
        b
    }
}

/// The absolute maximum and the signed value holding it (the first one, as C's `<` keeps).
#[inline(always)]
fn signed_absmax(x: &[f32; 32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// `quantize_row_q4_0_ref`, one block.
#[inline(always)]
pub fn quantize_q4_0(x: &[f32; 32], y: &mut BlockQ4_0) {
    let max = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = F16Bits::from_bits(fp32_to_fp16(d));
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let xi0 = cmin(15, c_f32_to_i32(x0 + 8.5) as i8 as i32) as u8;
        let xi1 = cmin(15, c_f32_to_i32(x1 + 8.5) as i8 as i32) as u8;
        y.qs[j] = xi0 | (xi1 << 4);
    }
}

/// `dequantize_row_q4_0`, one block.
pub fn dequantize_q4_0(x: &BlockQ4_0, y: &mut [f32; 32]) {
    let d = fp16_to_fp32(x.d.bits());
    for j in 0..16 {
        let x0 = (x.qs[j] & 0x0F) as i32 - 8;
        let x1 = (x.qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// min and max of a block as `quantize_row_q4_1_ref` finds them (FLT_MAX / -FLT_MAX starts).
#[inline(always)]
fn min_max(x: &[f32; 32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `quantize_row_q4_1_ref`, one block.
#[inline(always)]
pub fn quantize_q4_1(x: &[f32; 32], y: &mut BlockQ4_1) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = F16Bits::from_bits(fp32_to_fp16(d));
    y.m = F16Bits::from_bits(fp32_to_fp16(min));
    for j in 0..16 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[16 + j] - min) * id;
        let xi0 = cmin(15, c_f32_to_i32(x0 + 0.5) as i8 as i32) as u8;
        let xi1 = cmin(15, c_f32_to_i32(x1 + 0.5) as i8 as i32) as u8;
        y.qs[j] = xi0 | (xi1 << 4);
    }
}

/// `dequantize_row_q4_1`, one block.
pub fn dequantize_q4_1(x: &BlockQ4_1, y: &mut [f32; 32]) {
    let d = fp16_to_fp32(x.d.bits());
    let m = fp16_to_fp32(x.m.bits());
    for j in 0..16 {
        let x0 = (x.qs[j] & 0x0F) as i32;
        let x1 = (x.qs[j] >> 4) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// `quantize_row_q5_0_ref`, one block.
#[inline(always)]
pub fn quantize_q5_0(x: &[f32; 32], y: &mut BlockQ5_0) {
    let max = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = F16Bits::from_bits(fp32_to_fp16(d));
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let xi0 = cmin(31, c_f32_to_i32(x0 + 16.5) as i8 as i32) as u8;
        let xi1 = cmin(31, c_f32_to_i32(x1 + 16.5) as i8 as i32) as u8;
        y.qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) as u32) >> 4) << j;
        qh |= (((xi1 & 0x10) as u32) >> 4) << (j + 16);
    }
    y.qh = qh.to_le_bytes();
}

/// `dequantize_row_q5_0`, one block.
pub fn dequantize_q5_0(x: &BlockQ5_0, y: &mut [f32; 32]) {
    let d = fp16_to_fp32(x.d.bits());
    let qh = u32::from_le_bytes(x.qh);
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((x.qs[j] & 0x0F) | xh_0) as i32 - 16;
        let x1 = ((x.qs[j] >> 4) | xh_1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `quantize_row_q5_1_ref`, one block.
#[inline(always)]
pub fn quantize_q5_1(x: &[f32; 32], y: &mut BlockQ5_1) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = F16Bits::from_bits(fp32_to_fp16(d));
    y.m = F16Bits::from_bits(fp32_to_fp16(min));
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[16 + j] - min) * id;
        // `(uint8_t)(x0 + 0.5f)`: no MIN here in ggml.
        let xi0 = c_f32_to_i32(x0 + 0.5) as u8;
        let xi1 = c_f32_to_i32(x1 + 0.5) as u8;
        y.qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) as u32) >> 4) << j;
        qh |= (((xi1 & 0x10) as u32) >> 4) << (j + 16);
    }
    y.qh = qh.to_le_bytes();
}

/// `dequantize_row_q5_1`, one block.
pub fn dequantize_q5_1(x: &BlockQ5_1, y: &mut [f32; 32]) {
    let d = fp16_to_fp32(x.d.bits());
    let m = fp16_to_fp32(x.m.bits());
    let qh = u32::from_le_bytes(x.qh);
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((x.qs[j] & 0x0F) | xh_0) as i32;
        let x1 = ((x.qs[j] >> 4) | xh_1) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// `quantize_row_q8_0_ref`, one block.
pub fn quantize_q8_0(x: &[f32; 32], y: &mut BlockQ8_0) {
    let mut amax = 0.0f32;
    for &v in x {
        // MAX(amax, fabsf(v)) = amax > |v| ? amax : |v|
        let a = v.abs();
        amax = if amax > a { amax } else { a };
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = F16Bits::from_bits(fp32_to_fp16(d));
    for j in 0..32 {
        let x0 = x[j] * id;
        // `y[i].qs[j] = roundf(x0)`: half away from zero, then C's cast to int8_t.
        y.qs[j] = c_roundf_to_i32(x0) as i8;
    }
}

/// [`quantize_q8_0`] as the fill runs it: the same bytes (a test checks every element against
/// the reference on random blocks, and tests/ggml_quant.rs against ggml), in a form LLVM turns
/// into SIMD. The scalar `MAX(amax, |x|)` chain is one long dependency (4 cycles an element);
/// here 8 lanes each keep their own maximum, which is `maxps` (`a > b ? a : b`, ggml's `MAX`),
/// and the largest of the lanes is the chain's result: a maximum does not depend on the order
/// its values come in, as long as none is NaN. A NaN makes ggml's chain order-dependent (it is
/// kept until the next element replaces it), so a block holding one takes the reference.
#[inline(always)]
pub fn quantize_q8_0_lanes(x: &[f32; 32], y: &mut BlockQ8_0) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        if !unsafe { super::avx2::quantize_q8_0(x, y) } {
            quantize_q8_0(x, y); // a NaN in the block
        }
        return;
    }
    let mut lanes = [0.0f32; 8];
    // A sum of magnitudes is NaN only if one of them is (inf + inf is inf).
    let mut sum = [0.0f32; 8];
    for i in 0..4 {
        for k in 0..8 {
            let a = x[8 * i + k].abs();
            lanes[k] = if lanes[k] > a { lanes[k] } else { a };
            sum[k] += a;
        }
    }
    if sum.iter().any(|s| s.is_nan()) {
        return quantize_q8_0(x, y);
    }
    let mut amax = 0.0f32;
    for a in lanes {
        amax = if amax > a { amax } else { a };
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = F16Bits::from_bits(fp32_to_fp16(d));
    for j in 0..32 {
        y.qs[j] = c_roundf_to_i32(x[j] * id) as i8;
    }
}

/// [`quantize_q8_0_lanes`] of 32 bf16 values (little-endian bytes) widened to f32 (exactly, as
/// torch's `.to(float32)`): with AVX2, widened in registers, so a GGUF fill of a bf16 model
/// never writes the f32 values to memory.
#[inline(always)]
pub fn quantize_q8_0_bf16(x: &[u8; 64], y: &mut BlockQ8_0) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        if unsafe { super::avx2::quantize_q8_0_bf16(x, y) } {
            return;
        }
    }
    let f: [f32; 32] = std::array::from_fn(|j| bf16_to_fp32(u16::from_le_bytes([x[2 * j], x[2 * j + 1]])));
    quantize_q8_0_lanes(&f, y) // a NaN in the block, or no AVX2
}

/// `dequantize_row_q8_0`, one block.
pub fn dequantize_q8_0(x: &BlockQ8_0, y: &mut [f32; 32]) {
    let d = fp16_to_fp32(x.d.bits());
    for j in 0..32 {
        y[j] = x.qs[j] as f32 * d;
    }
}

//! Unit and property tests of the quantizers: block layouts on hand-computed blocks, error
//! bounds of quantize-then-dequantize, thread-count independence and size errors. Bit-exactness
//! against ggml itself is tests/ggml_quant.rs (scripts/ggml_quant_check.py).

use std::mem::offset_of;

use proptest::prelude::*;

use super::block::*;
use super::float::{fp16_to_fp32, fp32_to_fp16};
use super::kquants::get_scale_min_k4;
use super::*;

const QUANTIZED: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn roundtrip(ty: GgmlType, x: &[f32], n_per_row: usize) -> Vec<f32> {
    let mut q = vec![0u8; x.len() / n_per_row * ty.row_bytes(n_per_row).unwrap()];
    quantize_rows(ty, x, n_per_row, &mut q).unwrap();
    let mut y = vec![0f32; x.len()];
    dequantize_rows(ty, &q, n_per_row, &mut y).unwrap();
    y
}

#[test]
fn field_offsets_are_ggml_common_h_s() {
    assert_eq!(offset_of!(BlockQ4_0, qs), 2);
    assert_eq!(offset_of!(BlockQ5_0, qh), 2);
    assert_eq!(offset_of!(BlockQ5_0, qs), 6);
    assert_eq!(offset_of!(BlockQ5_1, qh), 4);
    assert_eq!(offset_of!(BlockQ8_0, qs), 2);
    assert_eq!(offset_of!(BlockQ4K, dmin), 2);
    assert_eq!(offset_of!(BlockQ4K, scales), 4);
    assert_eq!(offset_of!(BlockQ4K, qs), 16);
    assert_eq!(offset_of!(BlockQ5K, qh), 16);
    assert_eq!(offset_of!(BlockQ5K, qs), 48);
    assert_eq!(offset_of!(BlockQ6K, qh), 128);
    assert_eq!(offset_of!(BlockQ6K, scales), 192);
    assert_eq!(offset_of!(BlockQ6K, d), 208);
    for ty in GgmlType::ALL {
        assert_eq!(ty.row_bytes(ty.block_elems()), Some(ty.block_bytes()));
    }
}

#[test]
fn q8_0_block_by_hand() {
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let mut q = [0u8; 34];
    quantize_rows(GgmlType::Q8_0, &x, 32, &mut q).unwrap();
    let d = 16.0f32 / 127.0;
    assert_eq!(u16::from_le_bytes([q[0], q[1]]), fp32_to_fp16(d));
    for j in 0..32 {
        let want = ((j as f32 - 16.0) * (1.0 / d)).round() as i8;
        assert_eq!(q[2 + j] as i8, want, "element {j}");
    }
    assert_eq!(q[2] as i8, -127);
}

#[test]
fn q4_0_block_by_hand() {
    // -8..7 twice: the first largest magnitude is -8, so d = -8 / -8 = 1 and code = x + 8.
    let x: Vec<f32> = (0..32).map(|j| (j % 16) as f32 - 8.0).collect();
    let mut q = [0u8; 18];
    quantize_rows(GgmlType::Q4_0, &x, 32, &mut q).unwrap();
    assert_eq!(u16::from_le_bytes([q[0], q[1]]), 0x3C00);
    for j in 0..16 {
        assert_eq!(q[2 + j], (j as u8) | ((j as u8) << 4), "byte {j}");
    }
    assert_eq!(roundtrip(GgmlType::Q4_0, &x, 32), x);
}

#[test]
fn q5_0_high_bits_by_hand() {
    // d = -16 / -16 = 1: code = x + 16, elements 16..31 get the 5th bit.
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let mut q = [0u8; 22];
    quantize_rows(GgmlType::Q5_0, &x, 32, &mut q).unwrap();
    assert_eq!(u16::from_le_bytes([q[0], q[1]]), 0x3C00);
    assert_eq!(u32::from_le_bytes([q[2], q[3], q[4], q[5]]), 0xFFFF_0000);
    assert_eq!(roundtrip(GgmlType::Q5_0, &x, 32), x);
}

#[test]
fn k_scale_packing_round_trips_every_6_bit_pair() {
    // The packing of quantize_row_q4_K_ref, unpacked by get_scale_min_k4.
    for seed in 0..64u32 {
        let ls: [u8; 8] = std::array::from_fn(|j| ((seed * 7 + j as u32 * 13) % 64) as u8);
        let lm: [u8; 8] = std::array::from_fn(|j| ((seed * 11 + j as u32 * 29 + 5) % 64) as u8);
        let mut s = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                s[j] = ls[j];
                s[j + 4] = lm[j];
            } else {
                s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
                s[j - 4] |= (ls[j] >> 4) << 6;
                s[j] |= (lm[j] >> 4) << 6;
            }
        }
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &s), (ls[j], lm[j]));
        }
    }
}

#[test]
fn zeros_and_constants_decode_exactly_enough() {
    for ty in QUANTIZED {
        let n = ty.block_elems() * 2;
        assert!(roundtrip(ty, &vec![0.0; n], n).iter().all(|v| *v == 0.0), "{ty}");
        // A constant block: every type represents it within its f16 scale's rounding.
        for c in [0.37f32, -1.5] {
            for v in roundtrip(ty, &vec![c; n], n) {
                assert!((v - c).abs() <= c.abs() * 0.01, "{ty} {c} -> {v}");
            }
        }
    }
}

#[test]
fn bytes_do_not_depend_on_the_thread_count() {
    let n = 1 << 20;
    let mut s = 1u32;
    let x: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for ty in GgmlType::ALL {
        let bytes = n / 4096 * ty.row_bytes(4096).unwrap();
        let (mut a, mut b) = (vec![0u8; bytes], vec![0u8; bytes]);
        one.install(|| quantize_rows(ty, &x, 4096, &mut a)).unwrap();
        three.install(|| quantize_rows(ty, &x, 4096, &mut b)).unwrap();
        assert!(a == b, "{ty}");
        let (mut da, mut db) = (vec![0f32; n], vec![0f32; n]);
        one.install(|| dequantize_rows(ty, &a, 4096, &mut da)).unwrap();
        three.install(|| dequantize_rows(ty, &a, 4096, &mut db)).unwrap();
        assert!(da.iter().zip(&db).all(|(p, q)| p.to_bits() == q.to_bits()), "{ty}");
    }
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    let x = vec![0.5f32; 512];
    let mut q = vec![0u8; 2 * 144];
    assert_eq!(quantize_rows(GgmlType::Q4_K, &x, 256, &mut q), Ok(()));
    assert!(matches!(
        quantize_rows(GgmlType::Q4_K, &x[..288], 288, &mut q),
        Err(GgmlError::RowNotWholeBlocks { block: 256, .. })
    ));
    assert!(matches!(quantize_rows(GgmlType::Q8_0, &x, 0, &mut q), Err(GgmlError::RowNotWholeBlocks { .. })));
    assert!(matches!(
        quantize_rows(GgmlType::Q4_K, &x[..500], 256, &mut q),
        Err(GgmlError::PartialRow { .. })
    ));
    assert!(matches!(
        quantize_rows(GgmlType::Q4_K, &x, 256, &mut q[..287]),
        Err(GgmlError::DstSize { want: 288, got: 287, .. })
    ));
    let mut y = vec![0f32; 512];
    assert!(matches!(
        dequantize_rows(GgmlType::Q4_K, &q[..100], 256, &mut y),
        Err(GgmlError::SrcSize { want: 288, .. })
    ));
    assert_eq!(quantize_rows(GgmlType::F32, &[], 32, &mut []), Ok(()));
}

/// Largest |x - dequantize(quantize(x))| allowed in a block whose values span [min, max].
/// From each format's arithmetic: half a step of the scale, a whole step where the code is
/// clipped (Q4_0/Q5_0's positive end), for the K-quants the 6- or 8-bit rounding of sub-block
/// scales and mins against the super-block's largest; plus the f16 rounding of the scales,
/// relative (2^-11) or, where a scale is an f16 subnormal, absolute (2^-25) times the code.
fn bound(ty: GgmlType, min: f32, max: f32) -> f32 {
    let amax = min.abs().max(max.abs());
    let range = max - min.min(0.0);
    let f16 = 1.0 / 1024.0;
    let sub = 2f32.powi(-25);
    match ty {
        GgmlType::Q8_0 => amax * (0.5 / 127.0 + f16) + 128.0 * sub,
        GgmlType::Q4_0 => amax * (1.0 / 8.0 + f16) + 8.0 * sub,
        GgmlType::Q5_0 => amax * (1.0 / 16.0 + f16) + 16.0 * sub,
        GgmlType::Q4_1 => (max - min) * (0.5 / 15.0 + f16) + amax * f16 + 16.0 * sub,
        GgmlType::Q5_1 => (max - min) * (0.5 / 31.0 + f16) + amax * f16 + 32.0 * sub,
        GgmlType::Q4_K => range * (1.0 / 15.0 + 16.0 / 126.0 + f16) + 64.0 * 16.0 * sub,
        GgmlType::Q5_K => range * (1.0 / 31.0 + 32.0 / 126.0 + f16) + 64.0 * 32.0 * sub,
        GgmlType::Q6_K => amax * (1.0 / 32.0 + 33.0 / 256.0 + f16) + 128.0 * 32.0 * sub,
        _ => 0.0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn dequantized_error_is_bounded(
        mantissas in proptest::collection::vec(-1.0f32..1.0, 512),
        exp in -3i32..4,
        offset in -0.5f32..0.5,
        outlier in 0usize..512,
        outlier_mul in 1.0f32..20.0,
    ) {
        let scale = 10f32.powi(exp);
        let mut x: Vec<f32> = mantissas.iter().map(|m| (m + offset) * scale).collect();
        x[outlier] *= outlier_mul;
        for ty in QUANTIZED {
            let y = roundtrip(ty, &x, 512);
            let b = ty.block_elems();
            for (xb, yb) in x.chunks(b).zip(y.chunks(b)) {
                let min = xb.iter().copied().fold(f32::INFINITY, f32::min);
                let max = xb.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lim = bound(ty, min, max);
                for (a, q) in xb.iter().zip(yb) {
                    prop_assert!((a - q).abs() <= lim, "{ty}: {a} -> {q}, bound {lim}");
                }
            }
        }
    }

    #[test]
    fn f16_and_bf16_rows_are_ieee_round_to_nearest_even(x in proptest::collection::vec(any::<f32>(), 64)) {
        let mut h = vec![0u8; 128];
        quantize_rows(GgmlType::F16, &x, 64, &mut h).unwrap();
        let mut b = vec![0u8; 128];
        quantize_rows(GgmlType::BF16, &x, 64, &mut b).unwrap();
        for (i, v) in x.iter().enumerate() {
            let hb = u16::from_le_bytes([h[2 * i], h[2 * i + 1]]);
            let bb = u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
            if v.is_nan() {
                prop_assert!(fp16_to_fp32(hb).is_nan());
                prop_assert!(half::bf16::from_bits(bb).is_nan());
            } else {
                prop_assert_eq!(hb, half::f16::from_f32(*v).to_bits());
                prop_assert_eq!(bb, half::bf16::from_f32(*v).to_bits());
            }
        }
    }
}

/// Rows that reach every branch of the kernels: random values at several scales, zeros, -0.0,
/// constants, one-signed blocks, outliers, subnormals, huge values, and unless `finite`,
/// infinities, NaNs and random bit patterns, each kind in runs that start at varying offsets
/// (so a block can mix two kinds).
fn awkward_rows(n: usize, seed: u32, finite: bool) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    let mut r = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    let mut x = Vec::with_capacity(n);
    while x.len() < n {
        let kind = r() % 12;
        if finite && matches!(kind, 7 | 8 | 10) {
            continue;
        }
        let run = 1 + (r() % 300) as usize;
        for _ in 0..run {
            let u = (r() >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            x.push(match kind {
                0 => 0.0,
                1 => -0.0,
                2 => 0.125,
                3 => u.abs() + 0.01,
                4 => -u.abs() - 0.01,
                5 => u * 1e-38,
                6 => u * 3e38,
                7 if r() % 64 == 0 => f32::NAN,
                8 if r() % 64 == 0 => [f32::INFINITY, f32::NEG_INFINITY][(r() % 2) as usize],
                9 if r() % 16 == 0 => u * 1000.0,
                10 => f32::from_bits(r()),
                _ => u * 10f32.powi((r() % 7) as i32 - 3),
            });
        }
    }
    x.truncate(n);
    x
}

/// The fast kernels (lanes, compiled for AVX2 where the CPU has it) against the references
/// compiled for the baseline (Q8_0: the scalar port itself), every byte, on 256 rows of 4096
/// awkward values per type. tests/ggml_quant.rs compares the same kernels with ggml's C.
///
/// The K-quants are compared on finite rows only: an infinity there turns into NaNs whose
/// sign, and so the f16 bits of a scale, depends on which operand of a commutative operation
/// the compiler puts first (x86 keeps the first NaN operand's sign) — fixed by neither C nor
/// LLVM, so not the same between two builds of one source. The AVX2 build is the one checked
/// against ggml's own, non-finite rows included (tests/ggml_quant.rs).
#[test]
fn fast_kernels_are_the_references_byte_for_byte() {
    for ty in QUANTIZED {
        for seed in 0..8 {
            let finite = matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K);
            let x = awkward_rows(32 * 4096, seed, finite);
            let bytes = 32 * ty.row_bytes(4096).unwrap();
            let (mut fast, mut reference) = (vec![0u8; bytes], vec![0u8; bytes]);
            quantize_rows(ty, &x, 4096, &mut fast).unwrap();
            rows::quantize_rows_baseline(ty, &x, 4096, &mut reference);
            if let Some(at) = fast.iter().zip(&reference).position(|(a, b)| a != b) {
                let block = at / ty.block_bytes();
                let e = block * ty.block_elems();
                panic!(
                    "{ty} seed {seed}: byte {at} (block {block}) differs; input {:?}",
                    &x[e..e + ty.block_elems()]
                );
            }
        }
    }
}

/// Q8_0 straight from bf16 (what a GGUF fill of a bf16 model runs) against the scalar reference
/// on the widened values, every byte: awkward rows cut to bf16, and random bit patterns (NaNs
/// with payloads, infinities, subnormals).
#[test]
fn q8_0_from_bf16_is_the_reference_on_the_widened_values() {
    for seed in 0..8u32 {
        let mut bits: Vec<u16> =
            awkward_rows(32 * 4096, seed, false).iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let mut s = seed.wrapping_mul(747_796_405) | 1;
        for b in bits.iter_mut().skip(seed as usize).step_by(7 + seed as usize) {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            *b = s as u16;
        }
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
        let n = GgmlType::Q8_0.row_bytes(x.len()).unwrap();
        let (mut fast, mut reference) = (vec![0u8; n], vec![0u8; n]);
        super::quantize_q8_0_bf16(&bytes, &mut fast).unwrap();
        rows::quantize_rows_baseline(GgmlType::Q8_0, &x, 4096, &mut reference);
        if let Some(at) = fast.iter().zip(&reference).position(|(a, b)| a != b) {
            let e = at / 34 * 32;
            panic!("seed {seed}: byte {at} differs; input {:?}", &x[e..e + 32]);
        }
    }
    let mut q = vec![0u8; 34];
    assert!(super::quantize_q8_0_bf16(&[0u8; 62], &mut q).is_err());
    assert!(super::quantize_q8_0_bf16(&[0u8; 64], &mut q[..33]).is_err());
}

//! Tests of the group-wise quantizer: the fast dequantization paths (and their kernels) against
//! the reference, known values, config and length checks, and property tests of quantize +
//! dequantize.

#[cfg(target_arch = "x86_64")]
use super::decode::{dequantize8_fused, divide, fused_exact, lookup_nibbles, lookup_nibbles_avx2};
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
            for (symmetric, min) in
                [(true, None), (false, Some(0.0)), (false, Some(-0.71875)), (false, Some(T::round(3.3e-3)))]
            {
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
                    assert_eq!(g as u32, want.to_bits_u32(), "{} code {c} scale {s:e} min {min:?}", T::DTYPE);
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

//! Tests of the delta codecs: fast paths against references, exact round trips, hostile
//! frames, and the lossy codecs' error bounds.

use super::bitdelta::decode_bitdelta_reference;
use super::float::Float;
use super::lossless::ZSTD_MAGIC;
use super::transform::{ulp_reference, Word};
use super::*;
use crate::format::Dtype;
use proptest::prelude::*;

const ESIZES: [usize; 6] = [1, 2, 3, 4, 8, 16];
const TRANSFORMS: [Transform; 3] = [Transform::Xor, Transform::Sub, Transform::Ulp];

fn opts_all() -> Vec<LosslessOptions> {
    let mut v = Vec::new();
    for transform in TRANSFORMS {
        for planes in [true, false] {
            v.push(LosslessOptions { transform, planes });
        }
    }
    v
}

/// `base` plus a small random integer per element (so deltas look like a fine-tune's).
fn near(base: &[u8], esize: usize, seed: u64) -> Vec<u8> {
    let mut rng = crate::demo::SplitMix64(seed);
    let mut t = base.to_vec();
    for e in t.chunks_exact_mut(esize) {
        let r = rng.next_u64();
        if r % 3 == 0 {
            continue; // unchanged element
        }
        let step = (r >> 8) % 7;
        let neg = (r >> 16) & 1 == 1;
        // Add ±step with carry to the element as a little-endian integer.
        let mut carry = step as u16;
        for b in e.iter_mut() {
            let v = if neg { (*b as u16).wrapping_sub(carry) } else { *b as u16 + carry };
            *b = v as u8;
            carry = if neg { (v >> 15) & 1 } else { v >> 8 };
        }
    }
    t
}

fn round_trip(target: &[u8], base: Option<&[u8]>, esize: usize, opts: LosslessOptions) {
    if !opts.transform.supports(esize) {
        return;
    }
    let enc = encode_lossless_with(target, base, esize, 1, opts);
    let n = target.len() / esize;
    assert_eq!(enc.n_chunks(), chunk_count(n));
    assert_eq!(enc.offsets[0], 0);
    assert_eq!(*enc.offsets.last().unwrap(), enc.frames.len() as u64);
    let mut out = vec![0xAAu8; target.len()];
    for c in 0..enc.n_chunks() {
        let r = chunk_elems(c, n);
        let bytes = r.start * esize..r.end * esize;
        decode_lossless_chunk_with(
            enc.frame(c),
            base.map(|b| &b[bytes.clone()]),
            esize,
            opts,
            &mut out[bytes],
        )
        .unwrap();
    }
    assert!(out == target, "round trip differs (esize {esize}, {opts:?}, base {})", base.is_some());
    let mut all = vec![0x55u8; target.len()];
    decode_lossless_all(&enc, base, esize, opts, &mut all).unwrap();
    assert!(all == target);
}

#[test]
fn ulp_known_values() {
    // bf16 1.0 = 0x3F80; one ulp up is 0x3F81 (+1 → zigzag 2), one down 0x3F7F (−1 → 1).
    let one = 0x3F80u16;
    assert_eq!(0x3F81u16.ulp_fwd(one), 2);
    assert_eq!(0x3F7Fu16.ulp_fwd(one), 1);
    // Across zero: +0 (0x0000) to −0 (0x8000) is one step down; to the smallest negative
    // subnormal (0x8001) two.
    assert_eq!(0x8000u16.ulp_fwd(0), 1);
    assert_eq!(0x8001u16.ulp_fwd(0), 3);
    // Negative values: −1.0 (0xBF80) to −1.0 − ulp (0xBF81) is one step down.
    assert_eq!(0xBF81u16.ulp_fwd(0xBF80), 1);
    for (t, b) in [(0x3F81u16, one), (0x8001, 0), (0xFFFF, 0x7FFF), (0x1234, 0xFEDC)] {
        assert_eq!(t.ulp_fwd(b).ulp_inv(b), t);
        assert_eq!(ulp_reference(true, t as u64, b as u64, 16), t.ulp_fwd(b) as u64);
    }
}

#[test]
fn ulp_is_a_bijection_on_u8() {
    for b in 0..=255u8 {
        let mut seen = [false; 256];
        for t in 0..=255u8 {
            let d = t.ulp_fwd(b);
            assert_eq!(d as u64, ulp_reference(true, t as u64, b as u64, 8));
            assert_eq!(d.ulp_inv(b), t);
            assert!(!seen[d as usize]);
            seen[d as usize] = true;
        }
    }
}

#[test]
fn chunk_arithmetic() {
    assert_eq!(chunk_count(0), 0);
    assert_eq!(chunk_count(1), 1);
    assert_eq!(chunk_count(DELTA_CHUNK_ELEMS), 1);
    assert_eq!(chunk_count(DELTA_CHUNK_ELEMS + 1), 2);
    assert_eq!(chunk_elems(0, 10), 0..10);
    assert_eq!(chunk_elems(1, DELTA_CHUNK_ELEMS + 3), DELTA_CHUNK_ELEMS..DELTA_CHUNK_ELEMS + 3);
    assert!(chunk_elems(5, 10).is_empty());
    assert_eq!(chunks_covering(&(0..0)), 0..0);
    assert_eq!(chunks_covering(&(3..DELTA_CHUNK_ELEMS + 1)), 0..2);
    assert_eq!(chunks_covering(&(DELTA_CHUNK_ELEMS..DELTA_CHUNK_ELEMS + 1)), 1..2);
}

#[test]
fn transform_matches_reference_on_known_values() {
    // 0x0100 - 0x0001 = 0x00FF (borrow across bytes); 0x0001 - 0x0002 wraps to 0xFFFF.
    let t = [0x00, 0x01, 0x01, 0x00];
    let b = [0x01, 0x00, 0x02, 0x00];
    let mut d = [0u8; 4];
    delta_forward(Transform::Sub, 2, &t, &b, &mut d);
    assert_eq!(d, [0xFF, 0x00, 0xFF, 0xFF]);
    delta_forward_reference(Transform::Sub, 2, &t, &b, &mut d);
    assert_eq!(d, [0xFF, 0x00, 0xFF, 0xFF]);
    delta_forward(Transform::Xor, 2, &t, &b, &mut d);
    assert_eq!(d, [0x01, 0x01, 0x03, 0x00]);
    let mut planes = [0u8; 4];
    forward_to_planes(Transform::Sub, 2, &t, Some(&b), &mut planes);
    assert_eq!(planes, [0xFF, 0xFF, 0x00, 0xFF]);
}

#[test]
fn empty_and_one_element() {
    for opts in opts_all() {
        for esize in ESIZES {
            round_trip(&[], None, esize, opts);
            round_trip(&[], Some(&[]), esize, opts);
            let t: Vec<u8> = (0..esize as u8).collect();
            let b: Vec<u8> = (0..esize as u8).map(|x| x.wrapping_mul(37)).collect();
            round_trip(&t, None, esize, opts);
            round_trip(&t, Some(&b), esize, opts);
        }
    }
}

#[test]
fn multi_chunk_round_trip() {
    // Three chunks, the last one partial, for each fast-path width and one odd width.
    for esize in [1usize, 2, 3, 4, 8] {
        let n = 2 * DELTA_CHUNK_ELEMS + 1000 + 3;
        let base =
            crate::demo::random_tensor(esize as u64, n * esize / 2 + 1, crate::format::Dtype::BF16, false);
        let base = &base[..n * esize];
        let target = near(base, esize, 7);
        for opts in opts_all() {
            round_trip(&target, Some(base), esize, opts);
        }
        round_trip(&target, None, esize, LosslessOptions::default_for(esize));
    }
}

/// Coding chunk by chunk (the write path codes each chunk as its bytes arrive) gives exactly the
/// frames of coding the whole tensor, and they decode back.
#[test]
fn chunk_by_chunk_equals_whole_tensor() {
    for esize in [1usize, 2, 3, 4] {
        let n = 2 * DELTA_CHUNK_ELEMS + 777;
        let base = crate::demo::random_tensor(
            esize as u64 + 9,
            n * esize / 2 + 1,
            crate::format::Dtype::BF16,
            false,
        );
        let base = &base[..n * esize];
        let target = near(base, esize, 3);
        for b in [Some(base), None] {
            let whole = encode_lossless(&target, b, esize, DEFAULT_LEVEL);
            assert_eq!(whole.n_chunks(), chunk_count(n));
            for c in 0..chunk_count(n) {
                let r = chunk_elems(c, n);
                let bytes = r.start * esize..r.end * esize;
                let frame = encode_lossless_chunk(
                    &target[bytes.clone()],
                    b.map(|b| &b[bytes.clone()]),
                    esize,
                    DEFAULT_LEVEL,
                );
                assert_eq!(frame, whole.frame(c), "esize {esize}, chunk {c}, base {}", b.is_some());
                let mut out = vec![0u8; bytes.len()];
                decode_lossless_chunk(&frame, b.map(|b| &b[bytes.clone()]), esize, &mut out).unwrap();
                assert!(out == target[bytes], "esize {esize}, chunk {c}: round trip");
            }
        }
    }
}

#[test]
fn identical_target_compresses_to_almost_nothing() {
    let n = DELTA_CHUNK_ELEMS;
    let base = crate::demo::random_tensor(1, n, crate::format::Dtype::BF16, false);
    let enc = encode_lossless(&base, Some(&base), 2, DEFAULT_LEVEL);
    assert!(enc.frames.len() < 200, "{} bytes", enc.frames.len());
}

fn esize_strategy() -> impl Strategy<Value = usize> {
    prop::sample::select(ESIZES.to_vec())
}

fn transform_strategy() -> impl Strategy<Value = Transform> {
    prop::sample::select(TRANSFORMS.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The fused fast paths equal their element-by-element references.
    #[test]
    fn fast_paths_match_references(
        esize in esize_strategy(),
        tr in transform_strategy(),
        n in 0usize..700,
        seed in any::<u64>(),
        with_base in any::<bool>(),
    ) {
        prop_assume!(tr.supports(esize));
        let mut rng = crate::demo::SplitMix64(seed);
        let t: Vec<u8> = (0..n * esize).map(|_| rng.next_u64() as u8).collect();
        let b: Vec<u8> = (0..n * esize).map(|_| rng.next_u64() as u8).collect();
        let base = with_base.then_some(&b[..]);
        let mut fast = vec![0u8; t.len()];
        let mut slow = vec![0u8; t.len()];
        forward_to_planes(tr, esize, &t, base, &mut fast);
        forward_to_planes_reference(tr, esize, &t, base, &mut slow);
        prop_assert_eq!(&fast, &slow);
        let mut back = vec![0u8; t.len()];
        let mut back_ref = vec![0u8; t.len()];
        inverse_from_planes(tr, esize, &fast, base, &mut back);
        inverse_from_planes_reference(tr, esize, &fast, base, &mut back_ref);
        prop_assert_eq!(&back, &back_ref);
        prop_assert_eq!(&back, &t);

        delta_forward(tr, esize, &t, &b, &mut fast);
        delta_forward_reference(tr, esize, &t, &b, &mut slow);
        prop_assert_eq!(&fast, &slow);
        delta_inverse(tr, esize, &fast, &b, &mut back);
        delta_inverse_reference(tr, esize, &fast, &b, &mut back_ref);
        prop_assert_eq!(&back, &back_ref);
        prop_assert_eq!(&back, &t);
    }

    /// Random bytes, with and without a random base, round trip exactly.
    #[test]
    fn lossless_round_trip_random(
        esize in esize_strategy(),
        n in prop_oneof![0usize..300, (DELTA_CHUNK_ELEMS - 2)..(DELTA_CHUNK_ELEMS + 2)],
        seed in any::<u64>(),
        with_base in any::<bool>(),
        planes in any::<bool>(),
        transform in transform_strategy(),
    ) {
        let mut rng = crate::demo::SplitMix64(seed);
        let t: Vec<u8> = (0..n * esize).map(|_| rng.next_u64() as u8).collect();
        let b: Vec<u8> = (0..n * esize).map(|_| rng.next_u64() as u8).collect();
        round_trip(&t, with_base.then_some(&b[..]), esize, LosslessOptions { transform, planes });
    }

    /// Base/target pairs that are close (a fine-tune's shape) round trip exactly.
    #[test]
    fn lossless_round_trip_near(
        esize in esize_strategy(),
        n in 0usize..5000,
        seed in any::<u64>(),
        transform in transform_strategy(),
    ) {
        prop_assume!(transform.supports(esize));
        let mut rng = crate::demo::SplitMix64(seed);
        let b: Vec<u8> = (0..n * esize).map(|_| rng.next_u64() as u8).collect();
        let t = near(&b, esize, seed ^ 1);
        round_trip(&t, Some(&b), esize, LosslessOptions { transform, planes: true });
    }

    /// Arbitrary bytes as a frame: an error or (for a frame that happens to be valid) the right
    /// size, never a panic.
    #[test]
    fn hostile_random_frames(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        with_magic in any::<bool>(),
        esize in esize_strategy(),
        n in 0usize..100,
    ) {
        let mut frame = bytes;
        if with_magic {
            let mut f = ZSTD_MAGIC.to_vec();
            f.extend_from_slice(&frame);
            frame = f;
        }
        let base = vec![0u8; n * esize];
        let mut out = vec![0u8; n * esize];
        let _ = decode_lossless_chunk(&frame, Some(&base), esize, &mut out);
        let _ = decode_lossless_chunk(&frame, None, esize, &mut out);
    }

    /// A flipped bit anywhere in a real frame is an error, or decodes to the original bytes;
    /// never different bytes.
    #[test]
    fn bit_flip_is_caught(seed in any::<u64>(), bit in any::<prop::sample::Index>(), n in 1usize..3000) {
        let esize = 2;
        let base = crate::demo::random_tensor(seed, n, crate::format::Dtype::BF16, false);
        let target = near(&base, esize, seed);
        let enc = encode_lossless(&target, Some(&base), esize, 3);
        let mut frame = enc.frame(0).to_vec();
        let b = bit.index(frame.len() * 8);
        frame[b / 8] ^= 1 << (b % 8);
        let mut out = vec![0u8; target.len()];
        match decode_lossless_chunk(&frame, Some(&base), esize, &mut out) {
            Err(_) => {}
            Ok(()) => prop_assert!(out == target, "flip of bit {} decoded to wrong bytes", b),
        }
    }

    /// Every truncation of a real frame is an error.
    #[test]
    fn truncated_frames_fail(seed in any::<u64>(), n in 1usize..3000, cut in any::<prop::sample::Index>()) {
        let base = crate::demo::random_tensor(seed, n, crate::format::Dtype::BF16, false);
        let target = near(&base, 2, seed);
        let enc = encode_lossless(&target, Some(&base), 2, 3);
        let frame = enc.frame(0);
        let cut = cut.index(frame.len());
        let mut out = vec![0u8; target.len()];
        prop_assert!(decode_lossless_chunk(&frame[..cut], Some(&base), 2, &mut out).is_err());
    }

    /// q8: every element within scale/2 of the target, plus f32 and dtype rounding; a sub-range
    /// decode equals the same range of a full decode.
    #[test]
    fn q8_error_bound_and_ranges(
        dtype in prop::sample::select(vec![Dtype::F16, Dtype::BF16, Dtype::F32]),
        n in 0usize..1000,
        k in prop::sample::select(vec![0.0f32, 0.001, 0.1, 1.0]),
        seed in any::<u64>(),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let (base, target) = lossy_pair(seed, n, dtype, k);
        let (q, scales) = encode_q8(&target, &base, dtype);
        prop_assert_eq!(q.len(), n);
        prop_assert_eq!(scales.len(), n.div_ceil(DELTA_Q8_GROUP));
        let e = dtype.size();
        let mut full = vec![0u8; n * e];
        decode_q8_range(&q, &scales, &base, dtype, 0..n, &mut full);
        for i in 0..n {
            let t = get(dtype, &target[i * e..]);
            let bv = get(dtype, &base[i * e..]);
            let x = get(dtype, &full[i * e..]);
            let s = scales[i / DELTA_Q8_GROUP];
            let tol = s * 0.5 * (1.0 + 1e-5) + (t.abs() + bv.abs()) * 1e-6 + half_ulp(dtype, x.abs().max(t.abs()));
            prop_assert!((x - t).abs() <= tol, "elem {}: t {} x {} scale {} tol {}", i, t, x, s, tol);
            // Exactly the defined arithmetic, element by element (the vectorized blocks too).
            let mut want = vec![0u8; e];
            put(dtype, bv + q[i] as f32 * s, &mut want);
            prop_assert!(full[i * e..(i + 1) * e] == want[..], "elem {} not dtype(base + q * scale)", i);
        }
        let (lo, hi) = (a.index(n + 1), b.index(n + 1));
        let r = lo.min(hi)..lo.max(hi);
        let mut part = vec![0u8; r.len() * e];
        decode_q8_range(&q[r.clone()], &scales[q8_groups(&r)], &base[r.start * e..r.end * e], dtype, r.clone(), &mut part);
        prop_assert!(part[..] == full[r.start * e..r.end * e]);
    }

    /// bitdelta: every element is exactly dtype(base ± row scale); a sub-range decode equals
    /// the same range of a full decode.
    #[test]
    fn bitdelta_exact_and_ranges(
        dtype in prop::sample::select(vec![Dtype::F16, Dtype::BF16, Dtype::F32]),
        rows in 0usize..12,
        cols in 0usize..70,
        k in prop::sample::select(vec![0.0f32, 0.01, 0.3]),
        seed in any::<u64>(),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let n = rows * cols;
        let (base, target) = lossy_pair(seed, n, dtype, k);
        let (signs, scales) = encode_bitdelta(&target, &base, dtype, rows, cols);
        prop_assert_eq!(signs.len(), n.div_ceil(8));
        prop_assert_eq!(scales.len(), rows);
        if n % 8 != 0 {
            prop_assert_eq!(signs[n / 8] >> (n % 8), 0, "unused high bits must be 0");
        }
        let e = dtype.size();
        let mut full = vec![0u8; n * e];
        decode_bitdelta_range(&signs, &scales[bitdelta_rows(cols, &(0..n))], &base, dtype, cols, 0..n, &mut full);
        for r in 0..rows {
            let mean: f64 = (0..cols)
                .map(|c| (get(dtype, &target[(r * cols + c) * e..]) - get(dtype, &base[(r * cols + c) * e..])).abs() as f64)
                .sum::<f64>() / cols.max(1) as f64;
            prop_assert_eq!(scales[r], mean as f32);
            for c in 0..cols {
                let i = r * cols + c;
                let t = get(dtype, &target[i * e..]);
                let bv = get(dtype, &base[i * e..]);
                let sign = if t - bv < 0.0 { -1.0 } else { 1.0 };
                let mut want = vec![0u8; e];
                put(dtype, bv + sign * scales[r], &mut want);
                prop_assert!(full[i * e..(i + 1) * e] == want[..], "row {} col {}", r, c);
            }
        }
        let (lo, hi) = (a.index(n + 1), b.index(n + 1));
        let er = lo.min(hi)..lo.max(hi);
        let mut part = vec![0u8; er.len() * e];
        decode_bitdelta_range(
            &signs[bitdelta_sign_bytes(&er)],
            &scales[bitdelta_rows(cols, &er)],
            &base[er.start * e..er.end * e],
            dtype,
            cols,
            er.clone(),
            &mut part,
        );
        prop_assert!(part[..] == full[er.start * e..er.end * e]);
    }
}

#[test]
fn frame_of_another_chunk_is_rejected() {
    let n = DELTA_CHUNK_ELEMS + 100;
    let base = crate::demo::random_tensor(3, n, Dtype::BF16, false);
    let target = near(&base, 2, 3);
    let enc = encode_lossless(&target, Some(&base), 2, 3);
    // The short last chunk's frame given for the full first chunk, and the other way round.
    let mut out0 = vec![0u8; DELTA_CHUNK_ELEMS * 2];
    let e =
        decode_lossless_chunk(enc.frame(1), Some(&base[..DELTA_CHUNK_ELEMS * 2]), 2, &mut out0).unwrap_err();
    assert!(matches!(e, DeltaError::SizeMismatch { .. }), "{e}");
    let mut out1 = vec![0u8; 200];
    let e =
        decode_lossless_chunk(enc.frame(0), Some(&base[DELTA_CHUNK_ELEMS * 2..]), 2, &mut out1).unwrap_err();
    assert!(matches!(e, DeltaError::SizeMismatch { .. }), "{e}");
    // Two frames back to back are not one chunk.
    let mut two = enc.frame(1).to_vec();
    two.extend_from_slice(enc.frame(1));
    let e = decode_lossless_chunk(&two, Some(&base[DELTA_CHUNK_ELEMS * 2..]), 2, &mut out1).unwrap_err();
    assert!(matches!(e, DeltaError::FrameLength { .. }), "{e}");
    // A transform the element size does not support.
    let ulp = LosslessOptions { transform: Transform::Ulp, planes: true };
    let e = decode_lossless_chunk_with(enc.frame(1), None, 3, ulp, &mut out1[..198]).unwrap_err();
    assert!(matches!(e, DeltaError::Unsupported { .. }), "{e}");
    // Wrong caller buffers.
    assert!(matches!(
        decode_lossless_chunk(enc.frame(1), None, 0, &mut out1),
        Err(DeltaError::ZeroElementSize)
    ));
    assert!(matches!(
        decode_lossless_chunk(enc.frame(1), None, 3, &mut out1),
        Err(DeltaError::PartialElement { .. })
    ));
    assert!(matches!(
        decode_lossless_chunk(enc.frame(1), Some(&base[..10]), 2, &mut out1),
        Err(DeltaError::BaseLength { .. })
    ));
}

#[test]
fn frame_without_checksum_is_rejected() {
    let data = vec![7u8; 1000];
    let frame = zstd::bulk::compress(&data, 3).unwrap(); // checksum off by default
    let mut out = vec![0u8; 1000];
    let e = decode_lossless_chunk(&frame, None, 1, &mut out).unwrap_err();
    assert!(matches!(e, DeltaError::NoChecksum), "{e}");
}

#[test]
fn corrupted_payload_fails_checksum() {
    // A raw (incompressible) block: flipping a data byte changes no structure, only the
    // checksum can catch it.
    let mut rng = crate::demo::SplitMix64(9);
    let data: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    let enc =
        encode_lossless_with(&data, None, 1, 3, LosslessOptions { transform: Transform::Xor, planes: false });
    assert!(enc.frames.len() > 4096, "stored raw");
    let mut frame = enc.frame(0).to_vec();
    let mid = frame.len() / 2;
    frame[mid] ^= 0x10;
    let mut out = vec![0u8; 4096];
    let e = decode_lossless_chunk_with(
        &frame,
        None,
        1,
        LosslessOptions { transform: Transform::Xor, planes: false },
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(e, DeltaError::Corrupt(_)), "{e}");
    assert!(e.to_string().contains("checksum") || e.to_string().contains("orrupt"), "{e}");
}

#[test]
fn huge_declared_size_allocates_nothing() {
    // A frame declaring 2^40 bytes for a 100-byte chunk is rejected from its header.
    let data = vec![0u8; 100];
    let mut frame = zstd::bulk::compress(&data, 1).unwrap();
    // Rewrite the header by hand: magic, FHD = single segment + 8-byte FCS + checksum.
    frame.truncate(0);
    frame.extend_from_slice(&ZSTD_MAGIC);
    frame.push(0b1110_0100);
    frame.extend_from_slice(&(1u64 << 40).to_le_bytes());
    frame.extend_from_slice(&[1, 0, 0]); // last raw block of size 0
    frame.extend_from_slice(&[0; 4]);
    let mut out = vec![0u8; 100];
    let e = decode_lossless_chunk(&frame, None, 1, &mut out).unwrap_err();
    assert!(matches!(e, DeltaError::SizeMismatch { .. }), "{e}");
}

fn get(dtype: Dtype, b: &[u8]) -> f32 {
    with_float!(dtype, T => T::get(b))
}

fn put(dtype: Dtype, v: f32, b: &mut [u8]) {
    with_float!(dtype, T => T::put(v, b))
}

fn half_ulp(dtype: Dtype, x: f32) -> f32 {
    let (mant, min_normal_ulp) = match dtype {
        Dtype::F16 => (10, 2f32.powi(-24)),
        Dtype::BF16 => (7, 2f32.powi(-133)),
        _ => (23, 2f32.powi(-149)),
    };
    let exp = if x > 0.0 { x.log2().floor() } else { -150.0 };
    (2f32.powf(exp - mant as f32)).max(min_normal_ulp) * 0.5
}

/// A base tensor and a target = dtype(base + N(0, k · 0.02)).
fn lossy_pair(seed: u64, n: usize, dtype: Dtype, k: f32) -> (Vec<u8>, Vec<u8>) {
    let base = crate::demo::random_tensor(seed, n, dtype, false);
    let e = dtype.size();
    let mut rng = crate::demo::SplitMix64(seed ^ 0xD1FF);
    let mut target = base.clone();
    for i in 0..n {
        let v = get(dtype, &base[i * e..]) + rng.normal() * k * 0.02;
        put(dtype, v, &mut target[i * e..]);
    }
    (base, target)
}

/// The vectorized bitdelta decoder against the element-by-element one it replaced, on random
/// bytes (any bit pattern: NaNs, infinities, subnormals in the base; NaN, infinite, subnormal,
/// negative and zero scales), row lengths around the 64-element block, and random sub-ranges
/// (unaligned starts and ends, ranges large enough to be split across the pool): every output
/// element must have the same bits, but for NaNs, which must be NaN in both (a NaN's sign and
/// payload are not defined here: the compiler may turn `b + -s` into `b - s`, which gives the
/// NaN another sign, and did so in one of two inlined copies of the same scalar code).
#[test]
fn bitdelta_fast_decode_is_bit_exact_with_the_scalar_one() {
    let mut rng = crate::demo::SplitMix64(0xB17D);
    let shapes = [(3, 1), (5, 63), (4, 64), (3, 65), (7, 129), (2, 1000), (600, 1024), (1, (1 << 19) + 77)];
    for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
        let e = dtype.size();
        for (case, &(rows, cols)) in shapes.iter().enumerate() {
            let n = rows * cols;
            let mut base = vec![0u8; n * e];
            base.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
            // Mostly ordinary values, a few special ones, so that most blocks take the fast path.
            let special = |r: u64| match r % 8 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                3 => 1e-40,
                4 => 0.0,
                _ => -1e3,
            };
            if case % 2 == 0 {
                for i in 0..n {
                    let r = rng.next_u64();
                    let v = if r % 97 == 0 { special(r >> 8) } else { rng.normal() };
                    put(dtype, v, &mut base[i * e..]);
                }
            }
            let mut signs = vec![0u8; n.div_ceil(8)];
            signs.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
            let scales: Vec<f32> = (0..rows)
                .map(|_| {
                    let r = rng.next_u64();
                    if r % 5 == 0 {
                        special(r >> 8)
                    } else {
                        f32::from_bits(r as u32 & 0x3FFF_FFFF) * 1e-3
                    }
                })
                .collect();
            let mut ranges = Vec::with_capacity(7);
            ranges.push(0..n);
            for _ in 0..6 {
                let (a, b) = (rng.next_u64() as usize % (n + 1), rng.next_u64() as usize % (n + 1));
                ranges.push(a.min(b)..a.max(b));
            }
            for er in ranges {
                let args = (
                    &signs[bitdelta_sign_bytes(&er)],
                    &scales[bitdelta_rows(cols, &er)],
                    &base[er.start * e..er.end * e],
                );
                let mut fast = vec![0xAAu8; er.len() * e];
                let mut slow = vec![0x55u8; er.len() * e];
                decode_bitdelta_range(args.0, args.1, args.2, dtype, cols, er.clone(), &mut fast);
                decode_bitdelta_reference(args.0, args.1, args.2, dtype, cols, er.clone(), &mut slow);
                let differs = |i: usize| {
                    let (f, s) = (&fast[i * e..(i + 1) * e], &slow[i * e..(i + 1) * e]);
                    f != s && !(get(dtype, f).is_nan() && get(dtype, s).is_nan())
                };
                if let Some(i) = (0..er.len()).find(|&i| differs(i)) {
                    panic!(
                        "{dtype} {rows}x{cols} elems {er:?}: element {} is {:02x?}, the scalar decoder gives {:02x?}",
                        er.start + i,
                        &fast[i * e..(i + 1) * e],
                        &slow[i * e..(i + 1) * e]
                    );
                }
            }
        }
    }
}

/// The vectorized q8 decoder against the defined arithmetic element by element (`half`'s
/// conversions), bases with NaNs, infinities and subnormals among ordinary values (a block
/// holding a NaN takes the scalar path), scales special too, random sub-ranges: the same bits
/// but for NaNs, which must be NaN in both.
#[test]
fn q8_fast_decode_is_bit_exact_with_the_formula() {
    let mut rng = crate::demo::SplitMix64(0x0A8);
    let special = |r: u64| [f32::NAN, f32::INFINITY, -0.0, 1e-40, 0.0, -1e3][(r % 6) as usize];
    for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
        let e = dtype.size();
        for n in [1, 63, 64, 127, 128, 129, 1000, 70_001] {
            let mut base = vec![0u8; n * e];
            for i in 0..n {
                let r = rng.next_u64();
                put(dtype, if r % 89 == 0 { special(r >> 8) } else { rng.normal() }, &mut base[i * e..]);
            }
            let q: Vec<i8> = (0..n).map(|_| rng.next_u64() as i8).collect();
            let scales: Vec<f32> = (0..n.div_ceil(DELTA_Q8_GROUP))
                .map(|_| {
                    let r = rng.next_u64();
                    if r % 7 == 0 {
                        special(r >> 8)
                    } else {
                        rng.normal() * 1e-3
                    }
                })
                .collect();
            let (a, b) = (rng.next_u64() as usize % (n + 1), rng.next_u64() as usize % (n + 1));
            for r in [0..n, a.min(b)..a.max(b)] {
                let mut out = vec![0xAAu8; r.len() * e];
                decode_q8_range(
                    &q[r.clone()],
                    &scales[q8_groups(&r)],
                    &base[r.start * e..r.end * e],
                    dtype,
                    r.clone(),
                    &mut out,
                );
                for (k, i) in r.clone().enumerate() {
                    let mut want = vec![0u8; e];
                    put(
                        dtype,
                        get(dtype, &base[i * e..]) + q[i] as f32 * scales[i / DELTA_Q8_GROUP],
                        &mut want,
                    );
                    let got = &out[k * e..(k + 1) * e];
                    assert!(
                        got == &want[..] || (get(dtype, got).is_nan() && get(dtype, &want).is_nan()),
                        "{dtype} n {n} elems {r:?}: element {i} is {got:02x?}, the formula gives {want:02x?}"
                    );
                }
            }
        }
    }
}

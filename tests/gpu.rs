//! The GPU backend against the CPU kernels: every kernel on random inputs, odd sizes, ranges
//! that start and end mid-row, and sizes over one dispatch's limit (a context with 4 KiB chunks
//! splits every call into many dispatches; one test exceeds 65535 workgroups in a single
//! dispatch). Bit-identical everywhere except the LoRA merge, held to the f32-accumulation
//! bound documented in `compute::gpu`.
//!
//! Without a GPU adapter the tests print a note and pass, unless `LLMFS_REQUIRE_GPU=1` (CI sets
//! it, with lavapipe installed).
#![cfg(feature = "gpu")]

use std::sync::OnceLock;

use half::{bf16, f16};
use llmfs::codec::delta::{self, Transform};
use llmfs::codec::quant::{self, QuantBytesView, QuantConfig, QuantFloat};
use llmfs::compute::gpu::{GpuContext, GpuError, GpuOptions};
use llmfs::compute::{cast, merge};
use llmfs::demo::SplitMix64;
use llmfs::format::Dtype;

/// The contexts every test runs on, or None when there is no adapter: the default one, one
/// with 4 KiB chunks and DMA copies (every call is many chunks, all buffer sets in flight) and
/// the same with kernels reading and writing host-visible memory directly (where the device
/// allows it; the default does too).
fn contexts() -> Option<&'static [GpuContext; 3]> {
    static CTX: OnceLock<Option<[GpuContext; 3]>> = OnceLock::new();
    CTX.get_or_init(|| {
        let small = GpuOptions {
            max_chunk_bytes: 4096,
            direct_inputs: false,
            direct_output: false,
            ..Default::default()
        };
        let direct = GpuOptions { direct_inputs: true, direct_output: true, copy_threads: 3, ..small };
        match (GpuContext::new(), GpuContext::with_options(small), GpuContext::with_options(direct)) {
            (Ok(a), Ok(b), Ok(c)) => {
                eprintln!("GPU tests on {} (direct transfers: {:?})", a.device_name(), c.direct());
                Some([a, b, c])
            }
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                if std::env::var("LLMFS_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("LLMFS_REQUIRE_GPU=1 but no GPU: {e}");
                }
                assert!(matches!(e, GpuError::NoAdapter(_)), "unexpected error: {e}");
                eprintln!("note: skipping GPU tests: {e}");
                None
            }
        }
    })
    .as_ref()
}

macro_rules! gpu_or_skip {
    () => {
        match contexts() {
            Some(c) => [&c[0], &c[1], &c[2]],
            None => return,
        }
    };
}

fn rng_bytes(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn is_nan(d: Dtype, b: &[u8]) -> bool {
    match d {
        Dtype::F32 => f32::from_le_bytes(b.try_into().unwrap()).is_nan(),
        Dtype::F16 => f16::from_le_bytes(b.try_into().unwrap()).is_nan(),
        Dtype::BF16 => bf16::from_le_bytes(b.try_into().unwrap()).is_nan(),
        _ => false,
    }
}

/// Bit-identical, except that where both are NaN the payloads may differ (which NaN operand
/// x86 propagates depends on the compiler's operand order).
fn assert_same(d: Dtype, gpu: &[u8], cpu: &[u8], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let e = d.size();
    for (i, (g, c)) in gpu.chunks(e).zip(cpu.chunks(e)).enumerate() {
        if g != c && !(is_nan(d, g) && is_nan(d, c)) {
            panic!("{what}: element {i}: gpu {g:02x?} cpu {c:02x?}");
        }
    }
}

/// Weights like a model's, with every degenerate group FastChat has: all-zero and constant
/// groups, tiny f16 groups, and a few outliers.
fn weights(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|_| rng.normal() * 0.02).collect();
    let kind = rng.next_u64() % 4;
    for (i, x) in v.iter_mut().enumerate() {
        match (kind, i % 97) {
            (1, 0..=40) => *x = 0.0,
            (2, 0..=40) => *x = 0.125,
            (3, 0..=40) => *x *= 1e-3,
            _ if i % 331 == 0 => *x *= 100.0,
            _ => {}
        }
    }
    v
}

fn dequant_case<T: QuantFloat>(
    ctxs: [&GpuContext; 3],
    rng: &mut SplitMix64,
    rows: usize,
    cols: usize,
    cfg: QuantConfig,
) {
    let data: Vec<T> = weights(rng, rows * cols).into_iter().map(T::from_f32).collect();
    let qt = quant::quantize(&data, rows, cols, cfg);
    let le = |v: &[T]| -> Vec<u8> {
        let mut b = vec![0u8; v.len() * T::SIZE];
        for (x, o) in v.iter().zip(b.chunks_mut(T::SIZE)) {
            x.write_le(o);
        }
        b
    };
    let (scale, min) = (le(&qt.scale), le(&qt.min));
    let view = QuantBytesView::new::<T>(rows, cols, cfg, &qt.q, &scale, &min).unwrap();
    let n = rows * cols;
    let a = (rng.next_u64() as usize) % (n / 3 + 1);
    let b = n - (rng.next_u64() as usize) % (n / 3 + 1);
    for range in [0..n, a..b.max(a)] {
        let mut cpu = vec![0u8; range.len() * T::SIZE];
        quant::dequantize_range_bytes::<T>(view, range.clone(), &mut cpu);
        for ctx in ctxs {
            let mut gpu = vec![0u8; cpu.len()];
            ctx.dequantize_range_bytes::<T>(view, range.clone(), &mut gpu).unwrap();
            let d = Dtype::parse(T::DTYPE).unwrap();
            assert_same(d, &gpu, &cpu, &format!("dequant {} {rows}x{cols} {cfg:?} {range:?}", T::DTYPE));
        }
    }
}

#[test]
fn dequantize_matches_cpu() {
    let ctxs = gpu_or_skip!();
    let mut rng = SplitMix64(1);
    for bits in [8u8, 4] {
        for symmetric in [true, false] {
            for group_size in [1usize, 7, 32, 128, 300] {
                let cfg = QuantConfig { bits, group_size, symmetric };
                for (rows, cols) in [(1, 1), (3, 5), (13, 37), (64, 129), (7, 256)] {
                    dequant_case::<f32>(ctxs, &mut rng, rows, cols, cfg);
                    dequant_case::<f16>(ctxs, &mut rng, rows, cols, cfg);
                    dequant_case::<bf16>(ctxs, &mut rng, rows, cols, cfg);
                }
            }
        }
    }
}

/// Scales of every bit pattern (NaN, inf, zero, subnormals) exercise the soft division.
#[test]
fn dequantize_arbitrary_scales() {
    let ctxs = gpu_or_skip!();
    let mut rng = SplitMix64(2);
    for (bits, symmetric) in [(8u8, true), (8, false), (4, true), (4, false)] {
        let (rows, cols, gs) = (9usize, 70usize, 16usize);
        let cfg = QuantConfig { bits, group_size: gs, symmetric };
        let groups = cfg.n_groups(rows, cols);
        let q = rng_bytes(&mut rng, cfg.q_len(rows, cols));
        for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let scale = rng_bytes(&mut rng, groups * d.size());
            let min = if symmetric { Vec::new() } else { rng_bytes(&mut rng, groups * d.size()) };
            let range = 3..rows * cols - 2;
            let mut cpu = vec![0u8; range.len() * d.size()];
            let mut gpu = cpu.clone();
            macro_rules! go {
                ($t:ty) => {{
                    let v = QuantBytesView::new::<$t>(rows, cols, cfg, &q, &scale, &min).unwrap();
                    quant::dequantize_range_bytes::<$t>(v, range.clone(), &mut cpu);
                    for ctx in ctxs {
                        ctx.dequantize_range_bytes::<$t>(v, range.clone(), &mut gpu).unwrap();
                        assert_same(
                            d,
                            &gpu,
                            &cpu,
                            &format!("arbitrary scales {d} bits {bits} sym {symmetric}"),
                        );
                    }
                }};
            }
            match d {
                Dtype::F32 => go!(f32),
                Dtype::F16 => go!(f16),
                _ => go!(bf16),
            }
        }
    }
}

#[test]
fn casts_match_cpu() {
    let ctxs = gpu_or_skip!();
    let mut rng = SplitMix64(3);
    let floats = [Dtype::F32, Dtype::F16, Dtype::BF16];
    for n in [1usize, 2, 3, 1001, 40_000] {
        for from in floats {
            let src = rng_bytes(&mut rng, n * from.size());
            for to in floats {
                let mut cpu = vec![0u8; n * to.size()];
                cast::cast(from, to, &src, &mut cpu).unwrap();
                for ctx in ctxs {
                    let mut gpu = vec![0u8; cpu.len()];
                    ctx.cast(from, to, &src, &mut gpu).unwrap();
                    assert_same(to, &gpu, &cpu, &format!("cast {from}->{to} n={n}"));
                }
            }
        }
    }
    let mut out = [0u8; 4];
    assert!(matches!(ctxs[0].cast(Dtype::I32, Dtype::F32, &[0; 4], &mut out), Err(GpuError::Unsupported(_))));
}

/// Every f16 bit pattern through f16 -> f32 -> f16 and f16 -> bf16, and f32 patterns around
/// every f16 rounding boundary.
#[test]
fn casts_exhaustive_f16() {
    let ctxs = gpu_or_skip!();
    let src: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for to in [Dtype::F32, Dtype::BF16] {
        let mut cpu = vec![0u8; src.len() / 2 * to.size()];
        cast::cast(Dtype::F16, to, &src, &mut cpu).unwrap();
        let mut gpu = vec![0u8; cpu.len()];
        ctxs[0].cast(Dtype::F16, to, &src, &mut gpu).unwrap();
        assert_same(to, &gpu, &cpu, &format!("f16 -> {to}"));
    }
    // f32 values at and next to the midpoints between f16 neighbours, subnormals included.
    let mut f32s = Vec::new();
    for h in 0u32..0x7C00 {
        let mid = (h << 13) + 0x3800_0000 + 0x1000; // rough midpoints across the range
        for d in [-1i32, 0, 1] {
            f32s.extend_from_slice(&((mid as i32 + d) as u32).to_le_bytes());
            f32s.extend_from_slice(&((mid as i32 + d) as u32 | 0x8000_0000).to_le_bytes());
        }
        f32s.extend_from_slice(&(h << 16 | h).to_le_bytes()); // tiny and subnormal f32s
    }
    for to in [Dtype::F16, Dtype::BF16] {
        let mut cpu = vec![0u8; f32s.len() / 4 * to.size()];
        cast::cast(Dtype::F32, to, &f32s, &mut cpu).unwrap();
        let mut gpu = vec![0u8; cpu.len()];
        ctxs[0].cast(Dtype::F32, to, &f32s, &mut gpu).unwrap();
        assert_same(to, &gpu, &cpu, &format!("f32 -> {to} boundaries"));
    }
}

#[test]
fn add_f16_matches_cpu() {
    let ctxs = gpu_or_skip!();
    let mut rng = SplitMix64(4);
    for n in [1usize, 2, 7, 5000, 77_777] {
        // Arbitrary bits against arbitrary bits, and weights against small deltas.
        let a = rng_bytes(&mut rng, 2 * n);
        let b: Vec<u8> = if n % 2 == 1 {
            rng_bytes(&mut rng, 2 * n)
        } else {
            (0..n).flat_map(|_| f16::from_f32(rng.normal() * 1e-3).to_le_bytes()).collect()
        };
        let mut cpu = vec![0u8; 2 * n];
        merge::add_f16(&a, &b, &mut cpu);
        for ctx in ctxs {
            let mut gpu = vec![0u8; 2 * n];
            ctx.add_f16(&a, &b, &mut gpu).unwrap();
            assert_same(Dtype::F16, &gpu, &cpu, &format!("add_f16 n={n}"));
        }
    }
}

#[test]
fn bitdelta_matches_cpu() {
    let ctxs = gpu_or_skip!();
    let mut rng = SplitMix64(5);
    for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for (rows, cols) in [(1usize, 1usize), (5, 3), (17, 61), (40, 1000)] {
            let n = rows * cols;
            // Base: arbitrary bit patterns for half the cases (subnormals, NaN, inf).
            let base_all: Vec<u8> = if cols % 2 == 1 {
                rng_bytes(&mut rng, n * d.size())
            } else {
                let mut b = vec![0u8; n * d.size()];
                for i in 0..n {
                    merge::store(d, &mut b, i, rng.normal() * 0.02);
                }
                b
            };
            let signs_all = rng_bytes(&mut rng, n.div_ceil(8));
            let scales_all: Vec<f32> = (0..rows)
                .map(
                    |r| if r % 3 == 2 { f32::from_bits(rng.next_u64() as u32) } else { rng.uniform() * 1e-3 },
                )
                .collect();
            let a = (rng.next_u64() as usize) % n;
            let b = a + (rng.next_u64() as usize) % (n - a) + 1;
            for range in [0..n, a..b] {
                let signs = &signs_all[delta::bitdelta_sign_bytes(&range)];
                let scales = &scales_all[delta::bitdelta_rows(cols, &range)];
                let base = &base_all[range.start * d.size()..range.end * d.size()];
                let mut cpu = vec![0u8; base.len()];
                delta::decode_bitdelta_range(signs, scales, base, d, cols, range.clone(), &mut cpu);
                for ctx in ctxs {
                    let mut gpu = vec![0u8; base.len()];
                    ctx.decode_bitdelta_range(signs, scales, base, d, cols, range.clone(), &mut gpu).unwrap();
                    assert_same(d, &gpu, &cpu, &format!("bitdelta {d} {rows}x{cols} {range:?}"));
                }
            }
        }
    }
}

#[test]
fn lossless_delta_apply_matches_cpu() {
    let ctxs = gpu_or_skip!();
    let mut rng = SplitMix64(6);
    for esize in [1usize, 2, 4, 8] {
        for tr in [Transform::Xor, Transform::Sub, Transform::Ulp] {
            for n in [1usize, 3, 4, 5, 1023, 10_001] {
                let delta = rng_bytes(&mut rng, n * esize);
                let base = rng_bytes(&mut rng, n * esize);
                for with_base in [true, false] {
                    let b = with_base.then_some(&base[..]);
                    let mut cpu = vec![0u8; n * esize];
                    delta::inverse_from_planes(tr, esize, &delta, b, &mut cpu);
                    for ctx in ctxs {
                        let mut gpu = vec![0u8; n * esize];
                        ctx.inverse_from_planes(tr, esize, &delta, b, &mut gpu).unwrap();
                        assert_eq!(gpu, cpu, "planes {tr:?} esize {esize} n {n} base {with_base}");
                    }
                }
                let mut cpu = vec![0u8; n * esize];
                delta::delta_inverse(tr, esize, &delta, &base, &mut cpu);
                let mut gpu = vec![0u8; n * esize];
                ctxs[1].delta_inverse(tr, esize, &delta, &base, &mut gpu).unwrap();
                assert_eq!(gpu, cpu, "no planes {tr:?} esize {esize} n {n}");
            }
        }
    }
    let mut out = [0u8; 6];
    assert!(matches!(
        ctxs[0].inverse_from_planes(Transform::Xor, 3, &[0; 6], None, &mut out),
        Err(GpuError::Unsupported(_))
    ));
}

/// The LoRA merge within the f32-accumulation bound of `compute::gpu`'s doc:
/// `|gpu - cpu| ≤ 2·(r + 2)·ε·(|W| + |s|·Σ_j |B_oj A_ji|)` before rounding to the dtype, so at
/// most one ulp of f16/bf16 apart.
#[test]
fn lora_merge_within_bound() {
    let ctxs = gpu_or_skip!();
    let mut rng = SplitMix64(7);
    for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for (out_dim, in_dim, r, transposed) in [
            (1, 1, 1, false),
            (37, 53, 3, false),
            (70, 129, 16, true),
            (130, 67, 64, false),
            (64, 64, 20, true),
        ] {
            let a: Vec<f32> = (0..r * in_dim).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..out_dim * r).map(|_| rng.normal() * 0.1).collect();
            let f = merge::LoraFactors { a, b, rank: r, scale: 0.75, transposed };
            let (rows, cols) = if transposed { (in_dim, out_dim) } else { (out_dim, in_dim) };
            let n = rows * cols;
            let mut w_all = vec![0u8; n * d.size()];
            for i in 0..n {
                merge::store(d, &mut w_all, i, rng.normal());
            }
            let s0 = (rng.next_u64() as usize) % n;
            for range in [0..n, s0..n, s0 / 2..(s0 + 1).min(n)] {
                let w = &w_all[range.start * d.size()..range.end * d.size()];
                let mut cpu = vec![0u8; w.len()];
                merge::lora_rows(&f, d, cols, range.clone(), w, &mut cpu).unwrap();
                for ctx in ctxs {
                    let mut gpu = vec![0u8; w.len()];
                    ctx.lora_rows(&f, d, cols, range.clone(), w, &mut gpu).unwrap();
                    for (k, e) in range.clone().enumerate() {
                        let (row, col) = (e / cols, e % cols);
                        let (o, i) = if transposed { (col, row) } else { (row, col) };
                        let mag: f32 = (0..r).map(|j| (f.b[o * r + j] * f.a[j * in_dim + i]).abs()).sum();
                        let wv = merge::load(d, w, k);
                        let bound = 2.0 * (r as f32 + 2.0) * f32::EPSILON * (wv.abs() + f.scale.abs() * mag);
                        let (g, c) = (merge::load(d, &gpu, k), merge::load(d, &cpu, k));
                        let ulp = match d {
                            Dtype::F16 => (f16::from_f32(c).to_f32()
                                - f16::from_bits(f16::from_f32(c).to_bits() + 1).to_f32())
                            .abs(),
                            Dtype::BF16 => (bf16::from_f32(c).to_f32()
                                - bf16::from_bits(bf16::from_f32(c).to_bits() + 1).to_f32())
                            .abs(),
                            _ => 0.0,
                        };
                        assert!(
                            (g - c).abs() <= bound + ulp * 1.0001,
                            "lora {d} {rows}x{cols} r={r} t={transposed} {range:?} element {e}: gpu {g} cpu {c} bound {bound} ulp {ulp}"
                        );
                    }
                }
            }
        }
    }
}

/// One dispatch over 65535 workgroups (the per-dimension limit): the 2-D grid path.
#[test]
fn over_one_dimension_of_workgroups() {
    let _ = gpu_or_skip!();
    // 64 MiB chunks: f16 -> f32 is one invocation per output word, so a chunk of 2^24 words
    // is 65536 workgroups, one more than a dimension allows.
    let ctx =
        GpuContext::with_options(GpuOptions { max_chunk_bytes: 64 << 20, ..Default::default() }).unwrap();
    let max = ctx.chunk_bytes();
    let n = (1usize << 24) + 1001;
    if max < 64 << 20 {
        eprintln!("note: chunk limit {max} < 64 MiB; the 2-D grid is covered by the chunked tests only");
    }
    let mut rng = SplitMix64(8);
    let src: Vec<u8> = (0..n).flat_map(|_| f16::from_f32(rng.normal()).to_le_bytes()).collect();
    let mut cpu = vec![0u8; n * 4];
    cast::cast(Dtype::F16, Dtype::F32, &src, &mut cpu).unwrap();
    let mut gpu = vec![0u8; n * 4];
    ctx.cast(Dtype::F16, Dtype::F32, &src, &mut gpu).unwrap();
    assert!(gpu == cpu, "large cast differs");
}

// ---- mergekit's apply (linear, task arithmetic, TIES, DARE, breadcrumbs) ----

use llmfs::compute::mergekit::{self, Gta, GtaParent, Kernel, Sparsify, Stats, TensorMerge};
use proptest::prelude::*;

/// `k` inputs of `n` values of `d`: a base and fine-tunes of it (small deltas, a fifth of them
/// zero, quantized so magnitudes tie at the cut-offs), with `specials` every 37th element (±0,
/// f32 subnormals, values near the dtype's overflow, an infinity); or, with `raw`, random bit
/// patterns of `d` (every exponent; NaNs made 1.0).
fn merge_inputs(
    rng: &mut SplitMix64,
    d: Dtype,
    n: usize,
    k: usize,
    specials: bool,
    raw: bool,
) -> Vec<Vec<f32>> {
    let big = match d {
        Dtype::F16 => 6.0e4,
        _ => 3.0e38,
    };
    let special = [0.0, -0.0, 1.0e-40, -3.0e-39, big, -big, f32::INFINITY, 1.0e-7];
    let base: Vec<f32> = (0..n).map(|_| rng.normal() * 0.02).collect();
    (0..k)
        .map(|j| {
            (0..n)
                .map(|i| {
                    let v = if raw {
                        let b = rng.next_u64() as u32;
                        let x = match d {
                            Dtype::F16 => f16::from_bits(b as u16).to_f32(),
                            Dtype::BF16 => f32::from_bits(b << 16),
                            _ => f32::from_bits(b),
                        };
                        if x.is_nan() {
                            1.0
                        } else {
                            x
                        }
                    } else if specials && (i * 7 + j) % 37 == 0 {
                        special[(rng.next_u64() % special.len() as u64) as usize]
                    } else if j == 0 || rng.next_u64() % 5 == 0 {
                        base[i]
                    } else {
                        base[i] + (rng.normal() * 8.0).round() / 4096.0
                    };
                    mergekit::round(d, v)
                })
                .collect()
        })
        .collect()
}

/// The methods the GPU kernel takes, over `k` inputs (input 0 the base where there is one).
fn gpu_merge_methods(rng: &mut SplitMix64, k: usize, raw_weights: bool) -> Vec<(Kernel, Option<usize>)> {
    let w = |rng: &mut SplitMix64| {
        if raw_weights {
            let x = f32::from_bits(rng.next_u64() as u32);
            if x.is_finite() {
                x as f64
            } else {
                0.5
            }
        } else {
            rng.uniform() as f64 * 2.0 - 0.5
        }
    };
    let weights: Vec<f64> = (0..k).map(|_| w(rng)).collect();
    let parents: Vec<GtaParent> = (1..k)
        .map(|j| GtaParent {
            weight: w(rng),
            // Some parents dense (their mask is everything), the others 5-95 %.
            density: if j % 3 == 0 { 1.0 } else { 0.05 + 0.9 * rng.uniform() as f64 },
            gamma: 0.01 + 0.1 * rng.uniform() as f64,
            epsilon: 0.0,
        })
        .collect();
    let gta = |consensus: bool, sparsify: Option<Sparsify>, rescale: bool, lambda: f64| {
        Kernel::Gta(Gta {
            consensus,
            sparsify,
            parents: parents.clone(),
            normalize: consensus || sparsify.is_none(),
            rescale,
            lambda,
        })
    };
    vec![
        (Kernel::Linear { weights: weights.clone(), normalize: true }, None),
        (Kernel::Linear { weights, normalize: false }, None),
        (gta(false, None, false, 1.0), Some(0)), // task_arithmetic
        (gta(true, Some(Sparsify::Magnitude), false, 1.0), Some(0)), // ties
        (gta(true, Some(Sparsify::Magnitude), true, 0.7), Some(0)), // ties, rescale, lambda
        (gta(true, Some(Sparsify::Random), true, 1.0), Some(0)), // dare_ties
        (gta(false, Some(Sparsify::Random), true, 1.0), Some(0)), // dare_linear
        (gta(false, Some(Sparsify::MagnitudeOutliers), false, 1.0), Some(0)), // breadcrumbs
        (gta(true, Some(Sparsify::MagnitudeOutliers), true, 0.5), Some(0)), // breadcrumbs_ties
    ]
}

/// Every method on every context against `TensorMerge::apply_cpu`, the range cut into pieces
/// at `cuts` (elements of the whole tensor), each element's bits. `k` inputs of `rows × cols`.
fn merge_case(
    ctxs: [&GpuContext; 3],
    seed: u64,
    d: Dtype,
    (rows, cols): (usize, usize),
    k: usize,
    raw: bool,
    cuts: &[usize],
) {
    let mut rng = SplitMix64(seed);
    let n = rows * cols;
    let inputs = merge_inputs(&mut rng, d, n, k, !raw, raw);
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c % (n + 1)).collect();
    bounds.extend([0, n]);
    bounds.sort_unstable();
    bounds.dedup();
    for (kernel, base) in gpu_merge_methods(&mut rng, k, raw) {
        let m = TensorMerge {
            kernel: kernel.clone(),
            dtype: d,
            base,
            shape: vec![rows, cols],
            seed: seed ^ 0x5eed,
            name_key: mergekit::name_key("model.layers.0.mlp.up_proj.weight"),
            threads: 2,
        };
        assert!(llmfs::compute::gpu::mergekit::supported(&m, k), "{kernel:?}");
        let stats = if m.needs_stats() { m.stats(&refs).unwrap() } else { Stats::None };
        let mut cpu = vec![0f32; n];
        for w in bounds.windows(2) {
            let sl: Vec<&[f32]> = refs.iter().map(|p| &p[w[0]..w[1]]).collect();
            m.apply_cpu(&stats, &sl, w[0], &mut cpu[w[0]..w[1]]).unwrap();
        }
        for (ci, ctx) in ctxs.iter().enumerate() {
            let mut gpu = vec![0f32; n];
            for w in bounds.windows(2) {
                let sl: Vec<&[f32]> = refs.iter().map(|p| &p[w[0]..w[1]]).collect();
                ctx.mergekit_apply(&m, &stats, &sl, w[0], &mut gpu[w[0]..w[1]]).unwrap();
            }
            for i in 0..n {
                let (g, c) = (gpu[i], cpu[i]);
                assert!(
                    g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()),
                    "context {ci}, {d}, {k} inputs, {rows}x{cols}, cuts {bounds:?}: element {i}: gpu {g:e} ({:#010x}) cpu {c:e} ({:#010x})\n{kernel:?}",
                    g.to_bits(),
                    c.to_bits()
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// Model-like inputs with special values, 2-9 inputs (8 parents and a base), any dtype, any cut of the range.
    #[test]
    fn mergekit_apply_matches_cpu(seed in any::<u64>(), di in 0usize..3, k in 2usize..=9, rows in 1usize..40, cols in 1usize..300, cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        let ctxs = match contexts() {
            Some(c) => [&c[0], &c[1], &c[2]],
            None => return Ok(()),
        };
        let d = [Dtype::BF16, Dtype::F16, Dtype::F32][di];
        merge_case(ctxs, seed, d, (rows, cols), k, false, &cuts);
    }

    /// Random bit patterns as inputs and (linear) weights: every exponent, subnormal products,
    /// cancellations, overflow; the soft-float multiply, FMA, divide and roundings against the
    /// CPU's instructions.
    #[test]
    fn mergekit_apply_matches_cpu_on_any_bits(seed in any::<u64>(), di in 0usize..3, k in 2usize..=9, n in 1usize..3000) {
        let ctxs = match contexts() {
            Some(c) => [&c[0], &c[1], &c[2]],
            None => return Ok(()),
        };
        let d = [Dtype::BF16, Dtype::F16, Dtype::F32][di];
        merge_case(ctxs, seed, d, (1, n), k, true, &[n / 3]);
    }
}

/// Tensors over one chunk of the default context: the chunk boundaries, the tie lists cut per
/// chunk and the hash's element index past 2^20.
#[test]
fn mergekit_apply_over_many_chunks() {
    let ctxs = gpu_or_skip!();
    merge_case(ctxs, 11, Dtype::BF16, (1100, 1000), 4, false, &[123_457]);
}

/// What the GPU kernel does not take is refused as Unsupported (the backend runs the CPU).
#[test]
fn mergekit_apply_refuses_what_it_does_not_compute() {
    let ctxs = gpu_or_skip!();
    let m = TensorMerge {
        kernel: Kernel::Slerp { t: 0.5 },
        dtype: Dtype::BF16,
        base: Some(0),
        shape: vec![4],
        seed: 0,
        name_key: 0,
        threads: 1,
    };
    let x = [0f32; 4];
    let mut out = [0f32; 4];
    assert!(!llmfs::compute::gpu::mergekit::supported(&m, 2));
    let r = ctxs[0].mergekit_apply(&m, &Stats::Slerp { coef_a: 0.5, coef_b: 0.5 }, &[&x, &x], 0, &mut out);
    assert!(matches!(r, Err(GpuError::Unsupported(_))), "{r:?}");
    let ten = vec![&x[..]; 10];
    let lin = TensorMerge { kernel: Kernel::Linear { weights: vec![1.0; 10], normalize: false }, ..m };
    assert!(!llmfs::compute::gpu::mergekit::supported(&lin, 10));
    assert!(matches!(
        ctxs[0].mergekit_apply(&lin, &Stats::None, &ten, 0, &mut out),
        Err(GpuError::Unsupported(_))
    ));
}

/// `hardware_only` (what `--backend auto` asks) refuses a software adapter before opening it,
/// and opens a hardware one as the default options do.
#[test]
fn hardware_only_refuses_a_software_adapter() {
    let [ctx, _, _] = gpu_or_skip!();
    let hw = GpuContext::with_options(GpuOptions { hardware_only: true, ..Default::default() });
    match (ctx.is_software(), hw) {
        (true, Err(GpuError::Software(name))) => assert!(ctx.device_name().starts_with(&name)),
        (false, Ok(c)) => assert_eq!(c.device_name(), ctx.device_name()),
        (soft, other) => panic!("software adapter {soft}: {:?}", other.map(|c| c.device_name())),
    }
}

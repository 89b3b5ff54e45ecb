//! GPU kernels against the CPU kernels on all cores (rayon), per kernel: the GPU kernel alone
//! (inputs resident), the GPU end to end (upload + kernel + readback, as the read path calls
//! it) and the CPU; plus the PCIe (upload / readback) and HBM (device copy) bounds. Prints a
//! markdown table with the device named. Run: `scripts/bench_gpu.sh`.
//!
//! Throughput is GB/s of *output* (the bytes a reader gets); LoRA shapes are W = 4096×4096 and
//! 4096×11008 in f16, ranks 16 and 64.

use std::time::{Duration, Instant};

use half::f16;
use llmfs::codec::delta::{self, Transform};
use llmfs::codec::quant::{self, QuantBytesView, QuantConfig};
use llmfs::compute::gpu::GpuContext;
use llmfs::compute::merge::{self, LoraFactors};
use llmfs::demo::SplitMix64;
use llmfs::format::Dtype;
use rayon::prelude::*;

/// Best of `reps` runs (after one warm-up).
fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps).map(|_| {
        let t = Instant::now();
        f();
        t.elapsed()
    }).min().unwrap()
}

fn gbs(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

struct Row {
    kernel: String,
    shape: String,
    out_bytes: usize,
    gpu_kernel: Duration,
    gpu_e2e: Duration,
    cpu: Duration,
}

fn main() {
    let ctx = match GpuContext::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench_gpu: {e}");
            std::process::exit(1);
        }
    };
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    let mut rng = SplitMix64(42);
    // Work the CPU does in parallel: pieces of 1 Mi elements (like the read path's chunks).
    const PIECE: usize = 1 << 20;

    for (r, c) in [(4096usize, 4096usize), (4096, 11008)] {
        let n = r * c;
        let w16: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.normal() * 0.02)).collect();
        let wbytes: Vec<u8> = bytemuck::cast_slice(&w16).to_vec();
        // Dequantization, 8 and 4 bits, FastChat's default group (256), symmetric, to f16.
        for bits in [8u8, 4] {
            let cfg = QuantConfig { bits, group_size: 256, symmetric: true };
            let qt = quant::quantize(&w16, r, c, cfg);
            let scale: Vec<u8> = bytemuck::cast_slice(&qt.scale).to_vec();
            let view = QuantBytesView::new::<f16>(r, c, cfg, &qt.q, &scale, &[]).unwrap();
            let mut out = vec![0u8; 2 * n];
            let cpu = best(reps, || {
                out.par_chunks_mut(2 * PIECE).enumerate().for_each(|(i, o)| {
                    let a = i * PIECE;
                    quant::dequantize_range_bytes::<f16>(view, a..a + o.len() / 2, o);
                })
            });
            let want = out.clone();
            let e2e = best(reps, || ctx.dequantize_range_bytes::<f16>(view, 0..n, &mut out).unwrap());
            assert!(out == want, "GPU dequantization differs from the CPU");
            let (_, k) = ctx.measure_kernels(10, |g| g.dequantize_range_bytes::<f16>(view, 0..n, &mut out).unwrap());
            rows.push(Row { kernel: format!("dequant int{bits} → f16 (g256, sym)"), shape: format!("{r}×{c}"), out_bytes: 2 * n, gpu_kernel: k, gpu_e2e: e2e, cpu });
        }
        // Lossless delta apply (Ulp transform, byte planes, bf16-sized elements, with base).
        {
            let planes: Vec<u8> = (0..2 * n).map(|i| if i < n { rng.next_u64() as u8 } else { (rng.next_u64() % 3) as u8 }).collect();
            let mut out = vec![0u8; 2 * n];
            let cpu = best(reps, || {
                // The stored layout: planes per chunk of DELTA_CHUNK_ELEMS, chunks in parallel.
                let ce = delta::DELTA_CHUNK_ELEMS;
                out.par_chunks_mut(2 * ce).zip(planes.par_chunks(2 * ce)).zip(wbytes.par_chunks(2 * ce)).for_each(|((o, p), b)| {
                    delta::inverse_from_planes(Transform::Ulp, 2, p, Some(b), o);
                });
            });
            let e2e = best(reps, || ctx.inverse_from_planes(Transform::Ulp, 2, &planes, Some(&wbytes), &mut out).unwrap());
            let (_, k) = ctx.measure_kernels(10, |g| g.inverse_from_planes(Transform::Ulp, 2, &planes, Some(&wbytes), &mut out).unwrap());
            rows.push(Row { kernel: "delta apply (lossless, ulp, 2-byte)".into(), shape: format!("{r}×{c}"), out_bytes: 2 * n, gpu_kernel: k, gpu_e2e: e2e, cpu });
        }
        // LoRA merge into f16 W, ranks 16 and 64.
        for rank in [16usize, 64] {
            let f = LoraFactors {
                a: (0..rank * c).map(|_| rng.normal() * 0.01).collect(),
                b: (0..r * rank).map(|_| rng.normal() * 0.01).collect(),
                rank,
                scale: 2.0,
                transposed: false,
            };
            let mut out = vec![0u8; 2 * n];
            let cpu = best(reps.min(3), || {
                out.par_chunks_mut(2 * c * 16).zip(wbytes.par_chunks(2 * c * 16)).enumerate().for_each(|(i, (o, w))| {
                    let a = i * c * 16;
                    merge::lora_rows(&f, Dtype::F16, c, a..a + o.len() / 2, w, o);
                })
            });
            let e2e = best(reps, || ctx.lora_rows(&f, Dtype::F16, c, 0..n, &wbytes, &mut out).unwrap());
            let (_, k) = ctx.measure_kernels(10, |g| g.lora_rows(&f, Dtype::F16, c, 0..n, &wbytes, &mut out).unwrap());
            rows.push(Row { kernel: format!("LoRA merge r={rank} (f16 W)"), shape: format!("{r}×{c}"), out_bytes: 2 * n, gpu_kernel: k, gpu_e2e: e2e, cpu });
        }
    }
    let (up, down, copy) = ctx.measure_transfers(256 << 20, 5).unwrap();

    println!("## GPU kernels vs CPU ({threads} rayon threads)\n");
    println!("Device: **{}**  ", ctx.device_name());
    println!("CPU: {threads} threads; chunk size {} MiB; best of {reps} runs.\n", ctx.chunk_bytes() >> 20);
    println!("| kernel | shape | GPU kernel GB/s | GPU end-to-end GB/s | CPU GB/s | end-to-end vs CPU |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1}× |",
            r.kernel,
            r.shape,
            gbs(r.out_bytes, r.gpu_kernel),
            gbs(r.out_bytes, r.gpu_e2e),
            gbs(r.out_bytes, r.cpu),
            r.cpu.as_secs_f64() / r.gpu_e2e.as_secs_f64()
        );
    }
    println!("\nBounds (256 MiB buffers): upload (host → device, incl. memcpy into the mapped staging buffer) **{up:.1} GB/s**, readback (device → host) **{down:.1} GB/s**, device copy (bytes copied; HBM traffic is 2×) **{copy:.1} GB/s**.");
}

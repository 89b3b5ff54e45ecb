//! GPU kernels against the CPU kernels on all cores (rayon), per kernel: the GPU kernel alone
//! (inputs resident), the GPU end to end (upload + kernel + readback, as the read path calls
//! it) with each way of moving the bytes (staged DMA copies; the kernel writing its output
//! into host memory; the kernel also reading its inputs from host memory), and the CPU; plus
//! the transfer bounds (DMA each way and both at once, a shader reading / writing host memory,
//! host copies into and out of mapped memory, device memory). Prints markdown with the device
//! named. Run: `scripts/bench_gpu.sh`.
//!
//! Throughput is GB/s of *output* (the bytes a reader gets); LoRA shapes are W = 4096×4096 and
//! 4096×11008 in f16, ranks 16 and 64.

use std::time::{Duration, Instant};

use half::f16;
use llmfs::codec::delta::{self, Transform};
use llmfs::codec::quant::{self, QuantBytesView, QuantConfig};
use llmfs::compute::gpu::{GpuContext, GpuOptions};
use llmfs::compute::merge::{self, LoraFactors};
use llmfs::demo::SplitMix64;
use llmfs::format::Dtype;
use rayon::prelude::*;

/// Best of `reps` runs (after one warm-up).
fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn gbs(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// The ways of moving bytes the benchmark compares (context options).
const MODES: [(&str, bool, bool); 3] =
    [("staged", false, false), ("direct out", false, true), ("direct in+out", true, true)];

struct Row {
    kernel: String,
    shape: String,
    out_bytes: usize,
    gpu_kernel: Duration,
    /// One per [`MODES`].
    e2e: Vec<Duration>,
    cpu: Duration,
}

fn main() {
    // BENCH_COPY_THREADS: host copy threads (default: as many as cores, at most 16).
    let copy_threads = std::env::var("BENCH_COPY_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let ctxs: Vec<GpuContext> = MODES
        .iter()
        .map(|&(_, i, o)| {
            match GpuContext::with_options(GpuOptions {
                direct_inputs: i,
                direct_output: o,
                copy_threads,
                ..Default::default()
            }) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("bench_gpu: {e}");
                    std::process::exit(1);
                }
            }
        })
        .collect();
    let ctx = &ctxs[0];
    let direct_ok = ctxs[2].direct() == (true, true);
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    let mut rng = SplitMix64(42);
    // Work the CPU does in parallel: pieces of 1 Mi elements (like the read path's chunks).
    const PIECE: usize = 1 << 20;
    // Each mode's end-to-end time, checked against the CPU's bytes.
    let e2e = |want: &[u8], out: &mut Vec<u8>, f: &dyn Fn(&GpuContext, &mut [u8])| -> Vec<Duration> {
        ctxs.iter()
            .map(|c| {
                out.fill(0);
                let t = best(reps, || f(c, out));
                assert!(out[..] == want[..], "GPU result differs from the CPU's");
                t
            })
            .collect()
    };

    // BENCH_SHAPES=64x300,.. for a quick check on a software adapter.
    let shapes: Vec<(usize, usize)> = match std::env::var("BENCH_SHAPES") {
        Ok(s) => s
            .split(',')
            .map(|p| p.split_once('x').map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap())).expect("RxC"))
            .collect(),
        Err(_) => vec![(4096, 4096), (4096, 11008)],
    };
    for (r, c) in shapes {
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
            let e = e2e(&want, &mut out, &|g, o| g.dequantize_range_bytes::<f16>(view, 0..n, o).unwrap());
            let (_, k) =
                ctx.measure_kernels(10, |g| g.dequantize_range_bytes::<f16>(view, 0..n, &mut out).unwrap());
            rows.push(Row {
                kernel: format!("dequant int{bits} → f16 (g256, sym)"),
                shape: format!("{r}×{c}"),
                out_bytes: 2 * n,
                gpu_kernel: k,
                e2e: e,
                cpu,
            });
        }
        // Lossless delta apply (Ulp transform, byte planes, bf16-sized elements, with base).
        {
            let planes: Vec<u8> = (0..2 * n)
                .map(|i| if i < n { rng.next_u64() as u8 } else { (rng.next_u64() % 3) as u8 })
                .collect();
            let mut out = vec![0u8; 2 * n];
            let cpu = best(reps, || {
                // The stored layout: planes per chunk of DELTA_CHUNK_ELEMS, chunks in parallel.
                let ce = delta::DELTA_CHUNK_ELEMS;
                out.par_chunks_mut(2 * ce)
                    .zip(planes.par_chunks(2 * ce))
                    .zip(wbytes.par_chunks(2 * ce))
                    .for_each(|((o, p), b)| {
                        delta::inverse_from_planes(Transform::Ulp, 2, p, Some(b), o);
                    });
            });
            // The GPU gets the planes of the whole tensor at once: same bytes out only when it
            // is one stored chunk, so compare with a CPU run over the same layout.
            delta::inverse_from_planes(Transform::Ulp, 2, &planes, Some(&wbytes), &mut out);
            let want = out.clone();
            let e = e2e(&want, &mut out, &|g, o| {
                g.inverse_from_planes(Transform::Ulp, 2, &planes, Some(&wbytes), o).unwrap()
            });
            let (_, k) = ctx.measure_kernels(10, |g| {
                g.inverse_from_planes(Transform::Ulp, 2, &planes, Some(&wbytes), &mut out).unwrap()
            });
            rows.push(Row {
                kernel: "delta apply (lossless, ulp, 2-byte)".into(),
                shape: format!("{r}×{c}"),
                out_bytes: 2 * n,
                gpu_kernel: k,
                e2e: e,
                cpu,
            });
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
                out.par_chunks_mut(2 * c * 16).zip(wbytes.par_chunks(2 * c * 16)).enumerate().for_each(
                    |(i, (o, w))| {
                        let a = i * c * 16;
                        merge::lora_rows(&f, Dtype::F16, c, a..a + o.len() / 2, w, o)
                            .expect("F16 has a merge");
                    },
                )
            });
            // The GPU sums in another order: within the bound tests/gpu.rs checks, not the same
            // bits, so e2e is checked against its own first result.
            let mut gpu_want = vec![0u8; 2 * n];
            ctx.lora_rows(&f, Dtype::F16, c, 0..n, &wbytes, &mut gpu_want).unwrap();
            let e =
                e2e(&gpu_want, &mut out, &|g, o| g.lora_rows(&f, Dtype::F16, c, 0..n, &wbytes, o).unwrap());
            let (_, k) =
                ctx.measure_kernels(10, |g| g.lora_rows(&f, Dtype::F16, c, 0..n, &wbytes, &mut out).unwrap());
            rows.push(Row {
                kernel: format!("LoRA merge r={rank} (f16 W)"),
                shape: format!("{r}×{c}"),
                out_bytes: 2 * n,
                gpu_kernel: k,
                e2e: e,
                cpu,
            });
        }
    }
    let tb = ctx
        .measure_transfers(
            std::env::var("BENCH_BOUND_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(64) << 20,
            10,
        )
        .unwrap();

    println!("## GPU kernels vs CPU ({threads} rayon threads)\n");
    println!("Device: **{}**  ", ctx.device_name());
    println!(
        "CPU: {threads} threads; GPU chunks of {} MiB, {} host copy threads; best of {reps} runs; GB/s of output.{}\n",
        ctx.chunk_bytes() >> 20,
        tb.copy_threads,
        if direct_ok { "" } else { " (direct modes unavailable on this adapter: they ran staged)" }
    );
    println!("| kernel | shape | GPU kernel | e2e staged | e2e direct out | e2e direct in+out | CPU | best e2e vs CPU |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let e: Vec<f64> = r.e2e.iter().map(|&t| gbs(r.out_bytes, t)).collect();
        let fastest = *r.e2e.iter().min().unwrap();
        let cpu = format!("{:.1}", gbs(r.out_bytes, r.cpu));
        let ratio = format!("{:.1}×", r.cpu.as_secs_f64() / fastest.as_secs_f64());
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            r.kernel,
            r.shape,
            gbs(r.out_bytes, r.gpu_kernel),
            e[0],
            e[1],
            e[2],
            cpu,
            ratio
        );
    }
    let opt = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    println!("\nTransfer bounds ({} MiB buffers, GB/s of bytes moved):\n", tb.bytes >> 20);
    println!("| path | host → device | device → host | both at once (sum) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| DMA copy (copy_buffer_to_buffer, one queue) | {:.1} | {:.1} | {:.1} |",
        tb.dma_up, tb.dma_down, tb.dma_both
    );
    println!(
        "| shader reading / writing host-visible memory | {} | {} | {} |",
        opt(tb.shader_read_host),
        opt(tb.shader_write_host),
        opt(tb.shader_both)
    );
    println!(
        "| host memcpy into / out of mapped memory, 1 thread | {:.1} | {:.1} | |",
        tb.host_in_1, tb.host_out_1
    );
    println!("| the same, {} threads | {:.1} | {:.1} | |", tb.copy_threads, tb.host_in_n, tb.host_out_n);
    println!("| `queue.write_buffer` (wgpu's staging) + submit | {:.1} | | |", tb.write_buffer);
    println!(
        "\nDevice memory copy (bytes copied; HBM traffic is twice this): **{:.1} GB/s**.",
        tb.device_copy
    );
}

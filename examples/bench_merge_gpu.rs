//! mergekit's apply on the GPU against the CPU on all cores: linear, TIES and DARE-TIES over
//! 3 to 8 parents of one bf16 tensor, as the read path runs them (a chunk of `CHUNK` elements
//! per call, calls from every core at once; the GPU's calls share its one queue). Per row: the
//! CPU's time (rayon, `TensorMerge::apply_cpu` per chunk), the GPU end to end (values packed to
//! bf16, uploaded, the kernel, f32 results read back) and the GPU kernel alone (inputs
//! resident), in GB/s of merged bf16 output; and a check that the two gave the same bits.
//! Whole-tensor statistics (TIES's cut-offs) run on the CPU in both cases and are timed apart.
//!
//! Run: `bench_merge_gpu [ELEMS] [REPS]` (default 2^26 elements, a 8192 x 8192 tensor: 128 MiB
//! of bf16 per input; 3 reps, the best kept). `BENCH_PARENTS=3,5,8`, `BENCH_METHODS=linear,ties,dare_ties`.

use std::time::{Duration, Instant};

use llmfs::compute::gpu::GpuContext;
use llmfs::compute::mergekit::{self, Gta, GtaParent, Kernel, Sparsify, Stats, TensorMerge};
use llmfs::demo::SplitMix64;
use llmfs::format::Dtype;
use rayon::prelude::*;

/// Elements per call, as a read of a few MiB asks.
const CHUNK: usize = 1 << 21;

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

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name).unwrap_or_else(|_| default.into()).split(',').map(str::to_owned).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1 << 26);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let ctx = match GpuContext::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("no GPU: {e}");
            std::process::exit(1);
        }
    };
    let cores = rayon::current_num_threads();
    println!(
        "mergekit apply, {n} bf16 elements, {cores} cores, GPU {} (direct transfers {:?}); GB/s of bf16 output\n",
        ctx.device_name(),
        ctx.direct()
    );
    println!("| method | parents | CPU stats (s) | CPU apply | GPU end to end | GPU kernel | GPU vs CPU | same bits |");
    println!("|---|---|---|---|---|---|---|---|");
    let d = Dtype::BF16;
    let max_parents =
        env_list("BENCH_PARENTS", "3,5,8").iter().filter_map(|s| s.parse::<usize>().ok()).max().unwrap_or(3);
    // A base and fine-tunes of it (small deltas of either sign), generated once.
    let gen = |seed: u64, base: Option<&[f32]>| -> Vec<f32> {
        let mut v = vec![0f32; n];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, out)| {
            let mut rng = SplitMix64(seed * 1_000_003 + c as u64);
            for (i, o) in out.iter_mut().enumerate() {
                let x = match base {
                    Some(b) => b[c * (1 << 16) + i] + rng.normal() * 0.002,
                    None => rng.normal() * 0.02,
                };
                *o = mergekit::round(d, x);
            }
        });
        v
    };
    let base = gen(1, None);
    let mut inputs = vec![base.clone()];
    for k in 0..max_parents {
        inputs.push(gen(k as u64 + 2, Some(&base)));
    }
    for method in env_list("BENCH_METHODS", "linear,ties,dare_ties") {
        for parents in env_list("BENCH_PARENTS", "3,5,8").iter().filter_map(|s| s.parse::<usize>().ok()) {
            let (kernel, refs): (Kernel, Vec<&[f32]>) = match method.as_str() {
                // mergekit's linear merges the fine-tunes (no base).
                "linear" => (
                    Kernel::Linear {
                        weights: (0..parents).map(|k| 1.0 / (k + 2) as f64).collect(),
                        normalize: true,
                    },
                    inputs[1..=parents].iter().map(Vec::as_slice).collect(),
                ),
                m => {
                    let sparsify = if m == "ties" { Sparsify::Magnitude } else { Sparsify::Random };
                    let p = (0..parents)
                        .map(|_| GtaParent {
                            weight: 1.0 / parents as f64,
                            density: 0.5,
                            gamma: 0.0,
                            epsilon: 0.0,
                        })
                        .collect();
                    (
                        Kernel::Gta(Gta {
                            consensus: true,
                            sparsify: Some(sparsify),
                            parents: p,
                            normalize: true,
                            rescale: m != "ties",
                            lambda: 1.0,
                        }),
                        inputs[..=parents].iter().map(Vec::as_slice).collect(),
                    )
                }
            };
            let base = if matches!(kernel, Kernel::Linear { .. }) { None } else { Some(0) };
            let m = TensorMerge {
                kernel,
                dtype: d,
                base,
                shape: vec![n],
                seed: 7,
                name_key: mergekit::name_key("bench"),
                threads: cores,
            };
            let t = Instant::now();
            let stats = if m.needs_stats() { m.stats(&refs).expect("stats") } else { Stats::None };
            let stats_secs = t.elapsed().as_secs_f64();
            let run = |gpu: bool, out: &mut [f32]| {
                out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                    let s = c * CHUNK;
                    let sl: Vec<&[f32]> = refs.iter().map(|p| &p[s..s + o.len()]).collect();
                    if gpu {
                        ctx.mergekit_apply(&m, &stats, &sl, s, o).expect("GPU merge");
                    } else {
                        m.apply_cpu(&stats, &sl, s, o).expect("CPU merge");
                    }
                })
            };
            let (mut cpu_out, mut gpu_out) = (vec![0f32; n], vec![0f32; n]);
            let cpu = best(reps, || run(false, &mut cpu_out));
            let gpu = best(reps, || run(true, &mut gpu_out));
            let (_, kernel) = ctx.measure_kernels(3, |c| {
                c.mergekit_apply(&m, &stats, &refs, 0, &mut gpu_out).expect("GPU merge");
            });
            let same = cpu_out.iter().zip(&gpu_out).all(|(a, b)| a.to_bits() == b.to_bits());
            let gbs = |t: Duration| (n * 2) as f64 / t.as_secs_f64() / 1e9;
            println!(
                "| {method} | {parents} | {stats_secs:.2} | {:.2} | {:.2} | {:.2} | {:.2}x | {} |",
                gbs(cpu),
                gbs(gpu),
                gbs(kernel),
                cpu.as_secs_f64() / gpu.as_secs_f64(),
                if same { "yes" } else { "NO" }
            );
        }
    }
}

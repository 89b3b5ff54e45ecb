//! Throughput of llmfs's ggml quantizers: GB/s of f32 input, one thread and all threads.
//!
//! cargo run --release --example bench_ggml_quant [ELEMENTS]   (default 16 Mi = a 4096x4096
//! tensor; inputs are normal with sd 0.02, rounded to bf16 as a checkpoint's weights are)

use llmfs::codec::ggml::{quantize_rows, GgmlType};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(16 << 20);
    let n_per_row = 4096;
    let n = n.div_ceil(n_per_row) * n_per_row;
    // xorshift + Box-Muller-free sum of uniforms: cheap, deterministic, bell-shaped.
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let src: Vec<f32> = (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            half::bf16::from_f32(acc * 0.02 * 1.73).to_f32()
        })
        .collect();
    let threads = rayon::current_num_threads();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    println!("{n} f32 elements, rows of {n_per_row}");
    println!("| type | GB/s f32 in, 1 thread | GB/s, {threads} threads |\n|---|---|---|");
    let types = [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    for ty in types {
        let mut dst = vec![0u8; n / n_per_row * ty.row_bytes(n_per_row).expect("whole blocks")];
        let mut rate = |reps: usize| -> anyhow::Result<f64> {
            let t = Instant::now();
            for _ in 0..reps {
                quantize_rows(ty, &src, n_per_row, &mut dst)?;
            }
            Ok((reps * n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9)
        };
        // Repetitions so a run lasts about a second at the expected speeds.
        let reps = if ty.block_elems() == 256 { 1 } else { 4 };
        let single = one.install(|| rate(reps))?;
        rate(1)?; // warm the pool
        let all = rate(reps * 2)?;
        println!("| {ty} | {single:.3} | {all:.3} |");
    }
    Ok(())
}

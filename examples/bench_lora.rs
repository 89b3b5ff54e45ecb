//! The CPU LoRA merge kernel alone on one thread (no I/O): `cargo run --release --example
//! bench_lora [ROWS COLS RANK]` (default 4096 4096 16, a bf16 weight in 2 MiB pieces as fills
//! cut it). Prints GB/s of output and fused multiply-adds per second for 5 rounds.
use llmfs::compute::merge::{lora_rows, LoraFactors};
use llmfs::format::Dtype;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (rows, cols, r) =
        (*args.first().unwrap_or(&4096), *args.get(1).unwrap_or(&4096), *args.get(2).unwrap_or(&16));
    let a: Vec<f32> = (0..r * cols).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    let b: Vec<f32> = (0..rows * r).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
    let f = LoraFactors { a, b, rank: r, scale: 2.0, transposed: false };
    let w: Vec<u8> =
        (0..rows * cols).flat_map(|i| half::bf16::from_f32((i % 777) as f32 * 1e-3).to_le_bytes()).collect();
    let mut out = vec![0u8; w.len()];
    let piece = 1 << 20; // elements of a 2 MiB bf16 piece
    for round in 0..5 {
        let t = Instant::now();
        let mut e = 0;
        while e < rows * cols {
            let end = (e + piece).min(rows * cols);
            lora_rows(&f, Dtype::BF16, cols, e..end, &w[2 * e..2 * end], &mut out[2 * e..2 * end]).unwrap();
            e = end;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "round {round}: {:.3} s, {:.2} GB/s of bf16 output, {:.1} GFMA/s",
            s,
            w.len() as f64 / s / 1e9,
            (rows * cols * r) as f64 / s / 1e9
        );
    }
}

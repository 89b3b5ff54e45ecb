//! Single-core dequantization throughput of `codec::quant`, as GB/s of output.
//!
//! `cargo run --release --example bench_dequant [ROWS COLS]` (default 4096 × 4096, FastChat's
//! group size 256). The read path dequantizes chunk by chunk on one core per request, so the
//! number that matters is one core's; the fast path is also compared with the scalar reference.

use std::hint::black_box;
use std::time::Instant;

use half::{bf16, f16};
use llmfs::codec::quant::{dequantize_range, dequantize_reference, quantize, QuantConfig, QuantFloat};

/// Output elements per call: the size of a typical FUSE read (1 MiB of f16).
const CHUNK_ELEMS: usize = 512 * 1024;

fn data<T: QuantFloat>(n: usize) -> Vec<T> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
        })
        .collect()
}

fn bench<T: QuantFloat>(rows: usize, cols: usize, cfg: QuantConfig, reference: bool) -> f64 {
    let input = data::<T>(rows * cols);
    let qt = quantize(&input, rows, cols, cfg);
    let n = rows * cols;
    let mut out = vec![T::default(); CHUNK_ELEMS.min(n)];
    let mut best = f64::MAX;
    for _ in 0..if reference { 1 } else { 3 } {
        let t = Instant::now();
        let mut start = 0;
        while start < n {
            let end = (start + out.len()).min(n);
            let o = &mut out[..end - start];
            if reference {
                dequantize_reference(qt.view(), start..end, o);
            } else {
                dequantize_range(qt.view(), start..end, o);
            }
            black_box(&o);
            start = end;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * T::SIZE) as f64 / best / 1e9
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (rows, cols) = (args.first().copied().unwrap_or(4096), args.get(1).copied().unwrap_or(4096));
    // Quantizing (the `llmfs quantize` write path) runs on all cores; shown for scale.
    for (bits, symmetric) in [(8u8, true), (4, false)] {
        let input = data::<f16>(rows * cols);
        let cfg = QuantConfig { bits, group_size: 256, symmetric };
        let t = Instant::now();
        black_box(quantize(&input, rows, cols, cfg));
        let s = t.elapsed().as_secs_f64();
        println!(
            "quantize f16 {rows}x{cols} {bits}-bit symmetric={symmetric}: {:.1} M elements/s (all cores)",
            (rows * cols) as f64 / s / 1e6
        );
    }
    println!("dequantize {rows}x{cols}, group 256, one core, GB/s of output (best of 3)");
    println!("{:<6} {:<6} {:<6} {:>10} {:>10}", "bits", "mode", "dtype", "fast", "reference");
    for bits in [8u8, 4] {
        for symmetric in [true, false] {
            let cfg = QuantConfig { bits, group_size: 256, symmetric };
            let mode = if symmetric { "sym" } else { "asym" };
            let rows_ref = (rows / 8).max(1); // the reference is slow: a slice of the tensor
            println!(
                "{bits:<6} {mode:<6} {:<6} {:>10.2} {:>10.2}",
                "f16",
                bench::<f16>(rows, cols, cfg, false),
                bench::<f16>(rows_ref, cols, cfg, true)
            );
            println!(
                "{bits:<6} {mode:<6} {:<6} {:>10.2} {:>10.2}",
                "bf16",
                bench::<bf16>(rows, cols, cfg, false),
                bench::<bf16>(rows_ref, cols, cfg, true)
            );
            println!(
                "{bits:<6} {mode:<6} {:<6} {:>10.2} {:>10.2}",
                "f32",
                bench::<f32>(rows, cols, cfg, false),
                bench::<f32>(rows_ref, cols, cfg, true)
            );
        }
    }
}

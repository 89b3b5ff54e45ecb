//! Cast kernel throughput on one core: GB/s of output for each pair of float dtypes.
//!
//! cargo run --release --example bench_cast [ELEMENTS]   (default 16 Mi; 1 Mi is one 2 MiB f16
//! read-path chunk, whose source stays in cache)

use llmfs::compute::cast::cast;
use llmfs::format::Dtype;
use std::time::Instant;

fn main() {
    let n = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(16 << 20); // elements
    let floats = [Dtype::BF16, Dtype::F16, Dtype::F32];
    println!("| from | to | GB/s out (1 core) |\n|---|---|---|");
    for from in floats {
        let src = llmfs::demo::random_tensor(1, n, from, false);
        for to in floats {
            if from == to {
                continue;
            }
            let mut dst = vec![0u8; n * to.size()];
            cast(from, to, &src, &mut dst).unwrap();
            let t = Instant::now();
            let reps = (80 << 20) / n + 5;
            for _ in 0..reps {
                cast(from, to, &src, &mut dst).unwrap();
            }
            let secs = t.elapsed().as_secs_f64();
            println!("| {from} | {to} | {:.2} |", (reps * dst.len()) as f64 / secs / 1e9);
        }
    }
}

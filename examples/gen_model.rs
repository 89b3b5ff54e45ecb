//! Write a generated LLaMA-shaped model of about SIZE bytes (bf16), for benchmarks.
//!
//! cargo run --release --example gen_model -- DIR [SIZE_MIB]

use llmfs::demo::{write_model, ModelSpec};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: gen_model DIR [SIZE_MIB]");
    let mib: usize = args.next().map_or(1024, |s| s.parse().expect("SIZE_MIB is a number"));
    // hidden 2048, intermediate 5504, vocab 32000: ~ 2 * (4*h*h + 3*h*i) bytes a layer (bf16).
    let (h, i, v) = (2048usize, 5504usize, 32000usize);
    let per_layer = 2 * (4 * h * h + 3 * h * i);
    let fixed = 2 * 2 * v * h;
    let layers = ((mib << 20).saturating_sub(fixed) / per_layer).max(1);
    let spec = ModelSpec {
        hidden: h,
        intermediate: i,
        layers,
        heads: 16,
        kv_heads: 16,
        vocab: v,
        shards: 2,
        ..ModelSpec::tiny()
    };
    write_model(std::path::Path::new(&dir), &spec)?;
    println!("wrote {dir}: {layers} layers");
    Ok(())
}

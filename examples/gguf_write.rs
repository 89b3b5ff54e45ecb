//! Write a whole GGUF file from a Hugging Face directory through llmfs's plan:
//!
//! ```sh
//! cargo run --release --example gguf_write -- DIR OUT.gguf F16|BF16|Q8_0|Q4_0|Q4_K_M [NAME]
//! ```
//!
//! F16/BF16 data are converted (Q/K permuted, cast as the converter casts); quantized types get
//! zero blocks until the ggml quantizers land (their headers and sizes are exact).
//! scripts/gguf_check.py compares the result with llama.cpp's convert_hf_to_gguf.py.

use std::io::BufWriter;
use std::path::Path;

use llmfs::format::gguf::{dir, GgufTarget};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 || args.len() > 5 {
        eprintln!("usage: gguf_write DIR OUT TYPE [NAME]   (TYPE: F16, BF16, Q8_0, Q4_0, Q4_K_M)");
        std::process::exit(2);
    }
    let Some(target) = GgufTarget::parse(&args[3]) else {
        eprintln!("gguf_write: unknown type {} (F16, BF16, Q8_0, Q4_0, Q4_K_M)", args[3]);
        std::process::exit(2);
    };
    let dir_path = Path::new(&args[1]);
    let name = match args.get(4) {
        Some(n) => n.clone(),
        None => dir_path.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_owned(),
    };
    let run = || -> Result<(), String> {
        let file = std::fs::File::create(&args[2]).map_err(|e| format!("{}: {e}", args[2]))?;
        let mut out = BufWriter::new(file);
        let plan = dir::write_from_dir(dir_path, target, &name, &mut out, &mut dir::zero_blocks)
            .map_err(|e| e.to_string())?;
        std::io::Write::flush(&mut out).map_err(|e| e.to_string())?;
        for w in &plan.warnings {
            eprintln!("warning: {w}");
        }
        println!("{}: {} tensors, {} bytes", args[2], plan.tensors.len(), plan.size);
        Ok(())
    };
    if let Err(e) = run() {
        let _ = std::fs::remove_file(&args[2]);
        eprintln!("gguf_write: {e}");
        std::process::exit(1);
    }
}

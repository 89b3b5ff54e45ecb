//! llmfs's ggml quantizers on raw files, for scripts/ggml_quant_check.py to compare with ggml.
//!
//! cargo run --release --example ggml_quant -- quantize TYPE N_PER_ROW IN.f32 OUT.bin
//! cargo run --release --example ggml_quant -- dequantize TYPE N_PER_ROW IN.bin OUT.f32
//!
//! TYPE is ggml's name (q4_0, q8_0, q4_K, q6_K, f16, ...); .f32 files are little-endian f32.

use anyhow::{bail, Context, Result};
use llmfs::codec::ggml::{dequantize_rows, quantize_rows, GgmlType};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [op, ty, n, input, output] = args.as_slice() else {
        bail!("usage: ggml_quant quantize|dequantize TYPE N_PER_ROW IN OUT");
    };
    let ty = GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == ty)
        .with_context(|| format!("unknown ggml type {ty}"))?;
    let n: usize = n.parse().context("N_PER_ROW")?;
    let bytes = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    let out = match op.as_str() {
        "quantize" => {
            if bytes.len() % 4 != 0 {
                bail!("{input} is not a whole number of f32");
            }
            let src: Vec<f32> =
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let per_row = ty.row_bytes(n).with_context(|| format!("{ty} rows of {n}"))?;
            let rows = src.len() / n.max(1);
            let mut dst = vec![0u8; rows * per_row];
            quantize_rows(ty, &src, n, &mut dst)?;
            dst
        }
        "dequantize" => {
            let per_row = ty.row_bytes(n).with_context(|| format!("{ty} rows of {n}"))?;
            if per_row == 0 || bytes.len() % per_row != 0 {
                bail!("{input} is not a whole number of {ty} rows of {n}");
            }
            let mut dst = vec![0f32; bytes.len() / per_row * n];
            dequantize_rows(ty, &bytes, n, &mut dst)?;
            dst.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        _ => bail!("unknown operation {op}: quantize or dequantize"),
    };
    std::fs::write(output, out).with_context(|| format!("writing {output}"))?;
    Ok(())
}

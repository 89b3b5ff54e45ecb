//! llmfs's GGUF files against llama.cpp's own converter: scripts/gguf_check.py makes tiny llama,
//! mistral, qwen2 and qwen3 models and converts them with the vendored convert_hf_to_gguf.py;
//! this test writes llmfs's files for the same directories through the library
//! (`format::gguf::dir`) and has the script compare them (every KV, every tensor info, F16/BF16
//! byte for byte, Q8_0 too (ggml's quantizer, codec::ggml) — and Q4_0/Q4_K_M with llama-quantize by header).
//!
//! Needs $LLMFS_LLAMA_CPP (llama-cpp-python 0.3.36's vendor/llama.cpp) and a Python
//! ($LLMFS_PYTHON, else python3) with torch, transformers, tokenizers, sentencepiece and gguf;
//! $LLMFS_LLAMA_QUANTIZE optionally. Says SKIPPED and passes without them.

use std::path::{Path, PathBuf};
use std::process::Command;

use llmfs::format::gguf::{dir, GgufTarget};

fn python() -> String {
    std::env::var("LLMFS_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn tools_missing() -> Option<String> {
    let Ok(llama_cpp) = std::env::var("LLMFS_LLAMA_CPP") else {
        return Some("LLMFS_LLAMA_CPP is not set".into());
    };
    if !Path::new(&llama_cpp).join("convert_hf_to_gguf.py").is_file() {
        return Some(format!("{llama_cpp} has no convert_hf_to_gguf.py"));
    }
    let ok = Command::new(python())
        .args(["-c", "import torch, transformers, tokenizers, sentencepiece, gguf"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| format!("{} lacks torch/transformers/tokenizers/sentencepiece/gguf", python()))
}

#[test]
fn gguf_files_match_convert_hf_to_gguf() {
    if let Some(why) = tools_missing() {
        println!("SKIPPED: {why}");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/gguf_check.py");
    let work = tempfile::tempdir().unwrap();
    let status = Command::new(python()).arg(&script).arg("make").arg(work.path()).status().unwrap();
    assert!(status.success(), "gguf_check.py make failed");
    let quantized = std::fs::read_dir(work.path())
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().ends_with("converter-Q4_K_M.gguf"));
    let mut models: Vec<PathBuf> =
        std::fs::read_dir(work.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    models.sort();
    assert!(models.len() >= 4, "models: {models:?}");
    for model in &models {
        let name = model.file_name().unwrap().to_str().unwrap();
        for target in GgufTarget::ALL {
            if target.via_quantize() && !quantized {
                continue;
            }
            let out = work.path().join(format!("{name}.llmfs-{}.gguf", target.name()));
            let mut file = std::io::BufWriter::new(std::fs::File::create(&out).unwrap());
            let mut quantize = |ty: llmfs::codec::ggml::GgmlType, values: &[f32], out: &mut Vec<u8>| {
                let at = out.len();
                out.resize(at + values.len() / ty.block_elems() * ty.block_bytes(), 0);
                // Whole rows of the tensor: one quantize_rows call per row group is the same bytes.
                llmfs::codec::ggml::quantize_rows(ty, values, values.len(), &mut out[at..])
                    .map_err(|e| e.to_string())
            };
            dir::write_from_dir(model, target, name, &mut file, &mut quantize)
                .unwrap_or_else(|e| panic!("{name} {target:?}: {e}"));
            std::io::Write::flush(&mut file).unwrap();
        }
    }
    let out = Command::new(python()).arg(&script).arg("compare").arg(work.path()).output().unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "llmfs's GGUF files differ from the converter's");
}

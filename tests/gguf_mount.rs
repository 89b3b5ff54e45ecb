//! GGUF views through a real mount, held against llama.cpp's own tools: scripts/gguf_check.py
//! makes tiny llama, mistral (two tokenizer layouts), qwen2 and qwen3 models with trained BPE and
//! SentencePiece tokenizers and converts them with the convert_hf_to_gguf.py vendored in
//! llama-cpp-python 0.3.36; this test adds the same directories to a store, mounts it, and has
//! the script read `MOUNT/<model>/gguf/<model>-TYPE.gguf` (gguf-py's GGUFReader maps them):
//! F16, BF16 and Q8_0 byte for byte equal to the converter's files; Q4_0 and Q4_K_M parse,
//! dequantize to the F16 values within 4-bit error and (Q4_0) equal gguf-py's quantization;
//! and, where llama-cpp-python is installed, llama.cpp loads the mounted F16, Q8_0 and Q4_K_M
//! files, tokenizes as the HF tokenizer does and gives transformers' logits.
//!
//! Needs $LLMFS_LLAMA_CPP (the sdist's vendor/llama.cpp) and a Python ($LLMFS_PYTHON, else
//! python3) with torch, transformers, tokenizers, sentencepiece and gguf; says SKIPPED without
//! them unless LLMFS_REQUIRE_GGUF=1 (CI), and skips the llama.cpp part without llama_cpp unless
//! LLMFS_REQUIRE_LLAMA_CPP=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run_command, MountGuard, TestStore};

const MODELS: [&str; 5] = ["tiny-llama", "tiny-mistral", "tiny-mistral-hf", "tiny-qwen2", "tiny-qwen3"];
const TYPES: [&str; 5] = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M"];

fn python() -> String {
    std::env::var("LLMFS_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn imports(modules: &str) -> bool {
    Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn tools_missing() -> Option<String> {
    let Ok(llama_cpp) = std::env::var("LLMFS_LLAMA_CPP") else {
        return Some("LLMFS_LLAMA_CPP is not set".into());
    };
    if !Path::new(&llama_cpp).join("convert_hf_to_gguf.py").is_file() {
        return Some(format!("{llama_cpp} has no convert_hf_to_gguf.py"));
    }
    (!imports("torch, transformers, tokenizers, sentencepiece, gguf"))
        .then(|| format!("{} lacks torch/transformers/tokenizers/sentencepiece/gguf", python()))
}

fn script(cmd: &str, work: &Path) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/gguf_check.py");
    let mut c = Command::new(python());
    c.arg(&path).arg(cmd).arg(work);
    let f = run_command(c, Duration::from_secs(900));
    println!("gguf_check.py {cmd}:\n{}{}", f.stdout, f.stderr);
    assert!(f.status.success(), "gguf_check.py {cmd} failed");
}

#[test]
fn mounted_gguf_files_are_llama_cpps() {
    if let Some(why) = tools_missing() {
        assert!(std::env::var("LLMFS_REQUIRE_GGUF").as_deref() != Ok("1"), "LLMFS_REQUIRE_GGUF=1: {why}");
        println!("SKIPPED: {why}");
        return;
    }
    let ts = TestStore::new();
    let work = ts.path("work");
    script("make", &work);
    for model in MODELS {
        ts.ok([std::ffi::OsStr::new("add"), model.as_ref(), work.join(model).as_os_str()]);
        let info = ts.ok(["info", model]);
        assert!(info.contains(&format!("gguf/{model}-Q4_K_M.gguf")), "info lists the GGUF files:\n{info}");
    }
    let m = MountGuard::new(&ts, &ts.path("mnt"), &[]);
    for model in MODELS {
        for t in TYPES {
            let mounted = m.path().join(model).join("gguf").join(format!("{model}-{t}.gguf"));
            let link = work.join(format!("{model}.llmfs-{t}.gguf"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&mounted, &link).unwrap();
        }
    }
    script("compare", &work);
    script("quantized", &work);
    if imports("llama_cpp") {
        script("llamacpp", &work);
    } else {
        assert!(
            std::env::var("LLMFS_REQUIRE_LLAMA_CPP").as_deref() != Ok("1"),
            "LLMFS_REQUIRE_LLAMA_CPP=1 and llama_cpp does not import"
        );
        println!("SKIPPED (llama.cpp part): llama_cpp does not import");
    }
}

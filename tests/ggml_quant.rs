//! llmfs's ggml quantizers against ggml's C code itself, byte for byte.
//!
//! With `LLMFS_GGML_LIB` set to the libggml-base.so that `scripts/build_libggml.sh DIR` builds
//! from llama-cpp-python 0.3.36's sdist, this runs `scripts/ggml_quant_check.py`: ggml's
//! `ggml_quantize_chunk` and llmfs's `quantize_rows` (through the `ggml_quant` example) on many
//! kinds of rows, every type, and gguf-py's numpy quantizer beside them. Without it the test
//! says SKIPPED (CI sets it: see scripts/build_libggml.sh).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `ggml_quant` example next to this test binary (target/release/examples/), built with
/// cargo if `cargo test` did not build the examples (as with `--test ggml_quant`).
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let bin = profile_dir.join("examples").join("ggml_quant");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args(["build", "--example", "ggml_quant"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build --example ggml_quant");
        assert!(status.success(), "cargo build --example ggml_quant failed");
    }
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

#[test]
fn quantizers_are_byte_identical_to_ggml() {
    let Ok(lib) = std::env::var("LLMFS_GGML_LIB") else {
        eprintln!("SKIPPED: LLMFS_GGML_LIB is not set (LLMFS_GGML_LIB=$(scripts/build_libggml.sh DIR))");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ggml_quant_check.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("--lib")
        .arg(&lib)
        .arg("--bin")
        .arg(example_binary())
        .output()
        .expect("running python3 scripts/ggml_quant_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "llmfs's ggml quantizers differ from ggml's");
    assert!(stdout.contains("all identical"));
}

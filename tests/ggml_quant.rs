//! llmfs's ggml quantizers against ggml's C code itself, byte for byte.
//!
//! With `LLMFS_GGML_LIB` set to the libggml-base.so that `scripts/build_libggml.sh DIR` builds
//! from llama-cpp-python 0.3.36's sdist, this runs `scripts/ggml_quant_check.py`: ggml's
//! `ggml_quantize_chunk` and llmfs's `quantize_rows` (through the `ggml_quant` example) on many
//! kinds of rows, every type, and gguf-py's numpy quantizer beside them. Without it the test
//! says SKIPPED (CI sets it: see scripts/build_libggml.sh).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `ggml_quant` example next to this test binary (target/<profile>/examples/): `cargo test`
/// builds the examples before running tests; `cargo test --test ggml_quant` alone does not
/// (build it first with `cargo build --release --example ggml_quant`). No nested cargo here:
/// the outer one may hold the target directory's lock.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let bin = profile_dir.join("examples").join("ggml_quant");
    assert!(bin.exists(), "{} is missing: cargo build --release --example ggml_quant", bin.display());
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

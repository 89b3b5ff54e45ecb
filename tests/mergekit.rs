//! Merges against mergekit 0.1.5 itself: scripts/mergekit_check.py makes a tiny llama base and
//! three fine-tunes (fp16 and bf16), registers them in a fresh store, and for every method (a
//! slerp with gradient and filter parameters, a passthrough frankenmerge, a TIES with per-model
//! densities, float16/bfloat16/float32 and out_dtype) runs `mergekit-yaml` and `llmfs merge` +
//! `llmfs export` on the same config and compares every tensor; three merges are also loaded
//! with transformers' from_pretrained straight from a mount against mergekit's output.
//!
//! Needs a Python with mergekit 0.1.5 ($LLMFS_MERGEKIT_PYTHON, a virtualenv's python: .ci/run
//! makes one); says SKIPPED without it unless LLMFS_REQUIRE_MERGEKIT=1 (CI).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

#[test]
fn llmfs_merges_are_mergekits() {
    let Some(python) = common::mergekit_python("llmfs_merges_are_mergekits") else { return };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/mergekit_check.py");
    let mut c = Command::new(python);
    c.arg(script).arg("--llmfs").arg(common::llmfs_bin());
    let f = common::run_command(c, Duration::from_secs(1500));
    println!("{}{}", f.stdout, f.stderr);
    assert!(f.status.success(), "mergekit_check.py --llmfs failed");
}

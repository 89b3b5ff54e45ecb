//! GGUF views through a real mount, held against llama.cpp's own tools: scripts/gguf_check.py
//! makes tiny llama, mistral (two tokenizer layouts), qwen2 and qwen3 models with trained BPE and
//! SentencePiece tokenizers and converts them with the convert_hf_to_gguf.py vendored in
//! llama-cpp-python 0.3.36; this test adds the same directories to a store, mounts it, and has
//! the script read `MOUNT/<model>/gguf/<model>-TYPE.gguf` (gguf-py's GGUFReader maps them):
//! F16, BF16 and Q8_0 byte for byte equal to the converter's files; Q4_0 and Q4_K_M parse,
//! dequantize to the F16 values within 4-bit error and (Q4_0) equal gguf-py's quantization;
//! transformers' `from_pretrained(DIR, gguf_file=…)` loads the F16, Q8_0 and Q4_K_M files with
//! the safetensors model's logits; and, where llama-cpp-python is installed, llama.cpp loads
//! the mounted F16, Q8_0 and Q4_K_M files, tokenizes as the HF tokenizer does and gives
//! transformers' logits, and its own quantizer (`llama_model_quantize`) makes of the mounted F16
//! file exactly the mounted Q4_0 and Q4_K_M files (tiny-llama-256's rows are 256 and 512 wide,
//! so Q4_K_M is real Q4_K/Q6_K there) and the Q8_0 file's tensors. A lossless delta and a
//! linear merge of tiny-llama-256 get the same checks tensor by tensor (gguf-py reads each of
//! their files; every tensor is what the converter makes of the entry's mounted safetensors).
//!
//! On an object store too (`LLMFS_TEST_S3=1`: the entries are uploaded, the mount fetches them).
//!
//! Needs $LLMFS_LLAMA_CPP (the sdist's vendor/llama.cpp) and a Python ($LLMFS_PYTHON, else
//! python3) with torch, transformers, tokenizers, sentencepiece and gguf; says SKIPPED without
//! them unless LLMFS_REQUIRE_GGUF=1 (CI), and skips the llama.cpp part without llama_cpp unless
//! LLMFS_REQUIRE_LLAMA_CPP=1.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run_command, MountGuard, TestStore};

const MODELS: [&str; 6] =
    ["tiny-llama", "tiny-mistral", "tiny-mistral-hf", "tiny-qwen2", "tiny-qwen3", "tiny-llama-256"];
/// A fine-tune of tiny-llama-256 stored as a lossless delta, and a linear merge of the two.
const DELTA: &str = "tiny-llama-256-ft";
const MERGE: &str = "tiny-llama-256-merge";
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

fn script(cmd: &str, work: &Path, models: &[&str]) {
    script_args(cmd, &[work.as_os_str()], models);
}

/// scripts/gguf_check.py CMD ARGS on `models` only.
fn script_args(cmd: &str, args: &[&OsStr], models: &[&str]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/gguf_check.py");
    let mut c = Command::new(python());
    c.arg(&path).arg(cmd).args(args).env("TQDM_DISABLE", "1").env("LLMFS_GGUF_MODELS", models.join(","));
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
    // On an object store, the model with real K-quants and its delta and merge: what the store
    // changes is where the mount reads the tensors from, not what the clients make of them.
    let models: &[&str] = if ts.is_s3() { &["tiny-llama-256"] } else { &MODELS };
    let work = ts.path("work");
    script("make", &work, models);
    for &model in models {
        ts.ok([OsStr::new("add"), model.as_ref(), work.join(model).as_os_str()]);
        let info = ts.ok(["info", model]);
        assert!(info.contains(&format!("gguf/{model}-Q4_K_M.gguf")), "info lists the GGUF files:\n{info}");
    }
    script_args("finetune", &[work.as_os_str(), "tiny-llama-256".as_ref(), DELTA.as_ref()], models);
    let target = work.join(DELTA);
    ts.ok([
        OsStr::new("delta"),
        "make".as_ref(),
        DELTA.as_ref(),
        "--base".as_ref(),
        "tiny-llama-256".as_ref(),
        "--target".as_ref(),
        target.as_os_str(),
    ]);
    let weights = format!("tiny-llama-256:0.5,{DELTA}:0.5");
    ts.ok(["merge", MERGE, "--method", "linear", "--models", &weights]);
    let m = MountGuard::new(&ts, &ts.path("mnt"), &[]);
    for &model in models {
        for t in TYPES {
            let mounted = m.path().join(model).join("gguf").join(format!("{model}-{t}.gguf"));
            let link = work.join(format!("{model}.llmfs-{t}.gguf"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&mounted, &link).unwrap();
        }
    }
    script("compare", &work, models);
    script("quantized", &work, models);
    script("transformers", &work, models);
    let entries = ["tiny-llama-256", DELTA, MERGE];
    let mut args = vec![work.as_os_str(), m.path().as_os_str()];
    args.extend(entries.iter().map(OsStr::new));
    script_args("entries", &args, models);
    if imports("llama_cpp") {
        script("llamacpp", &work, models);
        script("llamaquant", &work, models);
    } else {
        assert!(
            std::env::var("LLMFS_REQUIRE_LLAMA_CPP").as_deref() != Ok("1"),
            "LLMFS_REQUIRE_LLAMA_CPP=1 and llama_cpp does not import"
        );
        println!("SKIPPED (llama.cpp part): llama_cpp does not import");
    }
}

/// A tokenizer.json of `model_type` (BPE: one llmfs translates; byte-level, two merges).
fn bpe_tokenizer_json(model_type: &str) -> String {
    serde_json::json!({
        "added_tokens": [
            {"id": 7, "content": "<s>", "special": true, "normalized": false},
            {"id": 8, "content": "</s>", "special": true, "normalized": false}
        ],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": model_type, "ignore_merges": false, "byte_fallback": false,
                  "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġa": 4},
                  "merges": [["a", "b"], ["Ġ", "a"]]}
    })
    .to_string()
}

/// Bad input (issue 24): an entry llmfs makes no GGUF file of has no `gguf/` folder in the
/// mount, and `info` and the mount's log say why: an unsupported architecture, a tokenizer it
/// cannot translate (naming the part), a config.json without a hyperparameter the file needs.
/// A good control entry beside them has its five files. No Python needed.
#[test]
fn entries_without_gguf_files_say_why() {
    let ts = TestStore::new();
    let edit_config = |dir: &Path, f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let path = dir.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(c.as_object_mut().unwrap());
        std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
    };
    type Case<'a> = (&'a str, &'a str, &'a dyn Fn(&Path));
    let cases: [Case; 5] = [
        ("good", "", &|d| std::fs::write(d.join("tokenizer.json"), bpe_tokenizer_json("BPE")).unwrap()),
        ("gpt2", "unsupported architecture GPT2LMHeadModel", &|d| {
            std::fs::write(d.join("tokenizer.json"), bpe_tokenizer_json("BPE")).unwrap();
            edit_config(d, &|c| {
                c.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
            });
        }),
        ("wordpiece", "tokenizer cannot be translated: tokenizer.json model type \"WordPiece\"", &|d| {
            std::fs::write(d.join("tokenizer.json"), bpe_tokenizer_json("WordPiece")).unwrap()
        }),
        ("no-tokenizer", "tokenizer cannot be translated: no tokenizer.model or tokenizer.json", &|_| {}),
        ("no-heads", "config.json lacks the hyperparameter num_attention_heads", &|d| {
            std::fs::write(d.join("tokenizer.json"), bpe_tokenizer_json("BPE")).unwrap();
            edit_config(d, &|c| {
                c.remove("num_attention_heads");
            });
        }),
    ];
    for (name, _, edit) in &cases {
        let dir = ts.path(name);
        common::write_small_model(&dir);
        edit(&dir);
        ts.ok([OsStr::new("add"), name.as_ref(), dir.as_os_str()]);
    }
    for (name, why, _) in &cases {
        let info = ts.ok(["info", name]);
        if why.is_empty() {
            assert!(info.contains(&format!("gguf:          gguf/{name}-Q4_K_M.gguf")), "{info}");
        } else {
            assert!(info.contains(&format!("gguf:          none: {why}")), "info {name} says why:\n{info}");
        }
    }
    let m = MountGuard::new(&ts, &ts.path("mnt"), &[]);
    for (name, why, _) in &cases {
        let listed: Vec<String> = std::fs::read_dir(m.path().join(name))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(listed.contains(&"config.json".to_owned()), "{name}: {listed:?}");
        if why.is_empty() {
            let f16 = m.path().join(name).join("gguf").join(format!("{name}-F16.gguf"));
            let bytes = std::fs::read(&f16).unwrap();
            assert_eq!(&bytes[..4], b"GGUF");
            assert_eq!(bytes.len() as u64, std::fs::metadata(&f16).unwrap().len());
        } else {
            assert!(!listed.contains(&"gguf".to_owned()), "{name} has no gguf/ folder: {listed:?}");
            assert!(!m.path().join(name).join("gguf").exists());
            let line = m.wait_log_line(&["no GGUF files", why], Duration::from_secs(10));
            assert!(line.is_some(), "the log says why {name} has no GGUF files:\n{}", m.log_text());
        }
    }
}

/// Each GGUF view is a model of its own: opening one decodes that file only (not the other four
/// types), and a load of the entry's safetensors decodes no GGUF view.
#[test]
fn opening_one_gguf_view_decodes_no_other() {
    let ts = TestStore::new();
    let dir = ts.path("m");
    // Rows of 256 and 768, so every GGUF file is over the disk cache's 1 MiB minimum.
    let spec = llmfs::demo::ModelSpec { hidden: 256, intermediate: 768, layers: 4, ..common::small_spec() };
    common::write_model(&dir, &spec);
    std::fs::write(dir.join("tokenizer.json"), bpe_tokenizer_json("BPE")).unwrap();
    ts.ok([OsStr::new("add"), OsStr::new("m"), dir.as_os_str()]);
    ts.ok(["cast", "f16", "--base", "m", "--dtype", "f16"]);
    let m = MountGuard::new(&ts, &ts.path("mnt"), &[]);
    let decoded = |entry: &str| -> Vec<String> {
        let log = m.log_text();
        let mut files: Vec<String> = log
            .lines()
            .filter_map(|l| l.split("decoded ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .filter(|label| label.starts_with(&format!("{entry}/")))
            .map(str::to_owned)
            .collect();
        files.sort();
        files
    };
    // A GGUF view of the base, read whole.
    let q8 = m.path().join("m/gguf/m-Q8_0.gguf");
    assert_eq!(&std::fs::read(&q8).unwrap()[..4], b"GGUF");
    // The f16 cast's safetensors, read whole (its decode is a fill of the disk cache).
    let shard = m.path().join("f16/model.safetensors");
    assert!(std::fs::read(&shard).unwrap().len() > 1 << 20);
    // Fills run on threads of their own: give any stray one time to show in the log.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        decoded("m"),
        ["m/gguf/m-Q8_0.gguf"],
        "opening one GGUF view decoded others:\n{}",
        m.log_text()
    );
    assert_eq!(
        decoded("f16"),
        ["f16/model.safetensors"],
        "a safetensors load decoded GGUF views:\n{}",
        m.log_text()
    );
}

/// A pre-tokenizer llmfs does not recognise gets llama.cpp's default, and says so: a note in
/// `info` (text and JSON) and a line in the mount's log, never silently.
#[test]
fn an_unknown_pre_tokenizer_is_a_note_in_info_and_the_log() {
    let ts = TestStore::new();
    let dir = ts.path("m");
    common::write_small_model(&dir);
    let mut tok: serde_json::Value = serde_json::from_str(&bpe_tokenizer_json("BPE")).unwrap();
    tok["pre_tokenizer"] = serde_json::json!({
        "type": "Split", "pattern": {"Regex": "[0-9]+|[a-z]+"}, "behavior": "Isolated", "invert": false
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    ts.ok([OsStr::new("add"), OsStr::new("m"), dir.as_os_str()]);
    let info = ts.ok(["info", "m"]);
    assert!(info.contains("gguf:          gguf/m-Q8_0.gguf"), "{info}");
    assert!(
        info.lines()
            .any(|l| l.starts_with("gguf note:") && l.contains("pre-tokenizer is not one llmfs recognises")),
        "info notes the default pre-tokenizer:\n{info}"
    );
    let json: serde_json::Value = serde_json::from_str(&ts.ok(["info", "m", "--json"])).unwrap();
    assert!(json["gguf_notes"].to_string().contains("pre-tokenizer"), "{json}");
    let m = MountGuard::new(&ts, &ts.path("mnt"), &[]);
    assert!(m.path().join("m/gguf/m-F16.gguf").exists());
    let line =
        m.wait_log_line(&["GGUF:", "pre-tokenizer is not one llmfs recognises"], Duration::from_secs(10));
    assert!(line.is_some(), "the log notes it:\n{}", m.log_text());
}

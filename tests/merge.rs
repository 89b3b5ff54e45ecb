//! `llmfs merge` over parents of every kind, and bad input.
//!
//! - A TIES merge whose parents are a lossless delta, a q8 quantized entry (`llmfs quantize`) and
//!   a PEFT LoRA import, and a slerp over that merge (a merge of a merge): every file read through
//!   a mount is byte-identical to the same merge over plain `add`ed copies of the parents'
//!   exports (what a parent serves is what a merge of it reads), and the TIES merge's tensors
//!   equal what `mergekit-yaml` makes of those exports ($LLMFS_MERGEKIT_PYTHON, as
//!   tests/mergekit.rs, which holds every method to mergekit). With `LLMFS_TEST_S3=1` (.ci/run)
//!   the store is SeaweedFS.
//! - Bad input through the CLI: each one line on stderr and nothing registered; a parent changed
//!   in the store under a mounted merge answers EIO with a log line.

mod common;
#[path = "merge/stats.rs"]
mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{assert_one_line_error, assert_same_bytes, with_deadline, MountGuard, TestStore};
use llmfs::demo::{self, ModelSpec};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// How long one read from a mount may take before the test fails instead of hanging.
const OP: Duration = Duration::from_secs(120);

fn read_mounted(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_owned();
    with_deadline(&format!("reading {}", path.display()), OP, move || std::fs::read(p))
}

/// Every regular file under `dir`, by path relative to it.
fn files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() { n.clone() } else { format!("{rel}/{n}") };
            if dir.join(&n).is_dir() {
                walk(&dir.join(&n), &r, out);
            } else {
                out.push(r);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out
}

/// `llmfs export NAME` into a fresh directory of the test's.
fn export(ts: &TestStore, name: &str) -> PathBuf {
    let out = ts.path(format!("export-{name}"));
    ts.ok(["export", name, s(&out)]);
    out
}

/// A YAML config with `{NAME}` placeholders filled from `names`.
fn config(ts: &TestStore, file: &str, template: &str, names: &[(&str, &str)]) -> PathBuf {
    let mut text = template.to_owned();
    for (k, v) in names {
        text = text.replace(&format!("{{{k}}}"), v);
    }
    let path = ts.path(file);
    std::fs::write(&path, text).unwrap();
    path
}

const TIES: &str = "merge_method: ties
base_model: {base}
models:
  - model: {delta}
    parameters: {weight: 0.5, density: 0.7}
  - model: {quant}
    parameters: {weight: 0.3, density: 0.5}
  - model: {lora}
    parameters: {weight: 0.4, density: 0.6}
parameters:
  normalize: true
dtype: bfloat16
";

const SLERP: &str = "merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t:
    - filter: self_attn
      value: [0.1, 0.7]
    - value: 0.35
dtype: bfloat16
";

/// The same tensors (names, dtypes, shapes, offsets, every data byte) and metadata, but for the
/// `llmfs` metadata key, which names the entry ("merge NAME (METHOD)").
#[track_caller]
fn assert_same_safetensors(got: &[u8], want: &[u8], what: &str) {
    let header = |b: &[u8]| -> (serde_json::Value, usize) {
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
        if let Some(m) = h.get_mut("__metadata__").and_then(|m| m.as_object_mut()) {
            m.remove("llmfs");
        }
        (h, 8 + n)
    };
    let ((hg, dg), (hw, dw)) = (header(got), header(want));
    assert_eq!(hg, hw, "{what}: the headers differ");
    assert_same_bytes(&got[dg..], &want[dw..], &format!("{what} (data)"));
}

/// Each merged entry's files through a mount equal the reference entry's export, file by file.
fn assert_mount_equals(mount: &Path, pairs: &[(&str, &Path)]) {
    for (entry, want_dir) in pairs {
        let want = files(want_dir);
        assert!(want.iter().any(|f| f.ends_with(".safetensors")), "{entry}: no weights in {want:?}");
        let got = files(&mount.join(entry));
        assert_eq!(got, want, "{entry}: the mount's files differ from the reference's");
        for f in &want {
            let bytes = read_mounted(&mount.join(entry).join(f))
                .unwrap_or_else(|e| panic!("reading {entry}/{f} through the mount: {e}"));
            let want = std::fs::read(want_dir.join(f)).unwrap();
            if f.ends_with(".safetensors") {
                assert_same_safetensors(&bytes, &want, &format!("{entry}/{f}"));
            } else {
                assert_same_bytes(&bytes, &want, &format!("{entry}/{f}"));
            }
        }
    }
}

#[test]
fn merges_of_deltas_quantized_loras_and_merges_read_as_merges_of_their_exports() {
    let ts = TestStore::new();
    // The tiny LLaMA the LoRA adapter of tests/data/lora was trained on, and two fine-tunes.
    let base = data("fastchat_delta/base");
    let (ft1, ft2) = (ts.path("ft1"), ts.path("ft2"));
    demo::write_finetune(&base, &ft1, 1.0, 1).unwrap();
    demo::write_finetune(&base, &ft2, 1.5, 2).unwrap();
    ts.ok(["add", "base", s(&base)]);
    ts.ok(["delta", "make", "delta", "--base", "base", "--target", s(&ft1)]);
    ts.ok(["add", "ft2", s(&ft2)]);
    ts.ok(["quantize", "quant", "--base", "ft2", "--bits", "8", "--group-size", "64"]);
    ts.ok([
        "delta",
        "import",
        "lora",
        "--base",
        "base",
        "--from",
        s(&data("lora/adapter")),
        "--format",
        "lora",
    ]);
    let info = ts.ok(["info", "quant"]);
    assert!(info.to_lowercase().contains("quantiz"), "quant is not a quantized entry:\n{info}");

    let names = [("base", "base"), ("delta", "delta"), ("quant", "quant"), ("lora", "lora")];
    ts.ok(["merge", "ties", "--config", s(&config(&ts, "ties.yml", TIES, &names))]);
    ts.ok([
        "merge",
        "slerp",
        "--config",
        s(&config(&ts, "slerp.yml", SLERP, &[("a", "ties"), ("b", "delta")])),
    ]);
    let info = ts.ok(["info", "slerp"]);
    assert!(info.contains("slerp") && info.contains("ties") && info.contains("delta"), "{info}");

    // The references: the same merges over plain copies of what each parent exports.
    for p in ["base", "delta", "quant", "lora"] {
        let dir = export(&ts, p);
        ts.ok(["add", &format!("plain-{p}"), s(&dir)]);
    }
    let plain =
        [("base", "plain-base"), ("delta", "plain-delta"), ("quant", "plain-quant"), ("lora", "plain-lora")];
    ts.ok(["merge", "ref-ties", "--config", s(&config(&ts, "ref-ties.yml", TIES, &plain))]);
    let ties_dir = export(&ts, "ties");
    ts.ok(["add", "plain-ties", s(&ties_dir)]);
    let cfg = config(&ts, "ref-slerp.yml", SLERP, &[("a", "plain-ties"), ("b", "plain-delta")]);
    ts.ok(["merge", "ref-slerp", "--config", s(&cfg)]);
    let (ref_ties, ref_slerp) = (export(&ts, "ref-ties"), export(&ts, "ref-slerp"));
    // The quantized parent is not its source (else this test would not show it is dequantized).
    let q = std::fs::read(export(&ts, "quant").join("model.safetensors")).unwrap();
    assert!(q != std::fs::read(ft2.join("model.safetensors")).unwrap(), "q8 is lossless?");

    let mount = MountGuard::new(&ts, &ts.path("mnt"), &[]);
    assert_mount_equals(mount.path(), &[("ties", &ref_ties), ("slerp", &ref_slerp)]);
    // And mergekit 0.1.5 itself on the exported parents (TIES in bf16 is bit-exact: README).
    if let Some(python) = common::mergekit_python("the mergekit comparison") {
        let dirs: Vec<(&str, String)> = ["base", "delta", "quant", "lora"]
            .iter()
            .map(|p| (*p, s(&ts.path(format!("export-{p}"))).to_owned()))
            .collect();
        let names: Vec<(&str, &str)> = dirs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let cfg = config(&ts, "mergekit-ties.yml", TIES, &names);
        let out = ts.path("mergekit-ties");
        let mk = python.with_file_name("mergekit-yaml");
        let mut c = std::process::Command::new(mk);
        c.arg(&cfg).arg(&out).args(["--no-copy-tokenizer", "--quiet", "--random-seed", "0"]);
        // llmfs reproduces a one-thread torch (README).
        c.env("OMP_NUM_THREADS", "1");
        let f = common::run_command(c, Duration::from_secs(600));
        assert!(f.status.success(), "mergekit-yaml failed:\n{}{}", f.stdout, f.stderr);
        let got = read_mounted(&mount.path().join("ties/model.safetensors")).unwrap();
        let got = safetensors::SafeTensors::deserialize(&got).unwrap();
        let mut compared = 0;
        for file in files(&out).iter().filter(|f| f.ends_with(".safetensors")) {
            let bytes = std::fs::read(out.join(file)).unwrap();
            for (name, want) in safetensors::SafeTensors::deserialize(&bytes).unwrap().tensors() {
                let g = got.tensor(&name).unwrap_or_else(|e| panic!("{name}: not in the mount's ties ({e})"));
                assert_eq!((g.dtype(), g.shape()), (want.dtype(), want.shape()), "{name}");
                assert!(g.data() == want.data(), "{name}: the mount's ties differs from mergekit's");
                compared += 1;
            }
        }
        assert_eq!(compared, got.len(), "mergekit wrote {compared} tensors, the mount serves {}", got.len());
        eprintln!(
            "ties over a delta, a q8 entry and a LoRA: {compared} tensors bit-identical to mergekit-yaml's"
        );
    }
    ts.ok(["check", "ties"]);
    ts.ok(["check", "slerp"]);
}

// --- bad input ---

/// A store with `a`, `b` (a fine-tune of `a`) and whatever the test adds.
fn two_models() -> TestStore {
    let ts = TestStore::new();
    let a = ts.model("a");
    demo::write_finetune(&a, &ts.path("b"), 1.0, 7).unwrap();
    ts.ok(["add", "a", s(&a)]);
    ts.ok(["add", "b", s(&ts.path("b"))]);
    ts
}

/// `llmfs ARGS` fails with one line holding every needle, and the store is as it was.
#[track_caller]
fn refused(ts: &TestStore, args: &[&str], needles: &[&str]) {
    let before = ts.snapshot();
    let f = ts.run_full(args);
    assert_one_line_error(&f, needles);
    eprintln!("refused {args:?}: {}", f.stderr.trim_end());
    ts.assert_unchanged(&before, &format!("{args:?}"));
}

/// `llmfs merge m --config` of `yaml` is refused with one line holding every needle.
#[track_caller]
fn refused_yaml(ts: &TestStore, yaml: &str, needles: &[&str]) {
    let path = ts.path("bad.yml");
    std::fs::write(&path, yaml).unwrap();
    refused(ts, &["merge", "m", "--config", s(&path)], needles);
}

/// Adds `name`: the small model with `change` applied to its spec.
fn add_other(ts: &TestStore, name: &str, change: impl FnOnce(&mut ModelSpec)) {
    let mut spec = common::small_spec();
    change(&mut spec);
    let dir = ts.path(name);
    common::write_model(&dir, &spec);
    ts.ok(["add", name, s(&dir)]);
}

#[test]
fn parents_of_other_shapes_vocabularies_and_layouts_are_refused_naming_the_tensor() {
    let ts = two_models();
    add_other(&ts, "vocab", |s| s.vocab = 512);
    add_other(&ts, "wide", |s| s.intermediate = 256);
    add_other(&ts, "deep", |s| s.layers = 3);
    refused(
        &ts,
        &["merge", "m", "--method", "linear", "--models", "a:1,vocab:1"],
        &["model.embed_tokens.weight", "vocab"],
    );
    refused(
        &ts,
        &["merge", "m", "--method", "linear", "--models", "a:1,wide:1"],
        &["model.layers.0.mlp.down_proj.weight", "wide"],
    );
    refused(
        &ts,
        &["merge", "m", "--method", "ties", "--base", "a", "--models", "deep:1:0.5"],
        &["model.layers.2.", "deep"],
    );
    refused(&ts, &["merge", "m", "--method", "linear", "--models", "deep:1,a:1"], &["model.layers.2.", "a"]);
    // The same tensors under another architecture's name: refused as mergekit refuses it.
    let dir = ts.path("other-arch");
    common::write_model(&dir, &common::small_spec());
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), config.replace("LlamaForCausalLM", "MistralForCausalLM"))
        .unwrap();
    ts.ok(["add", "other-arch", s(&dir)]);
    refused(
        &ts,
        &["merge", "m", "--method", "linear", "--models", "a:1,other-arch:1"],
        &["different architectures", "LlamaForCausalLM", "MistralForCausalLM"],
    );
}

#[test]
fn a_tensor_missing_in_one_parent_is_refused_naming_it() {
    let ts = two_models();
    // `c`: the model without layer 1's up_proj (its safetensors rewritten without it).
    let dir = ts.path("c");
    demo::write_finetune(&ts.path("a"), &dir, 0.5, 3).unwrap();
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").collect();
    assert_eq!(kept.len(), common::tensor_count(&common::small_spec()) - 1);
    safetensors::serialize_to_file(kept, None, &file).unwrap();
    ts.ok(["add", "c", s(&dir)]);
    refused(
        &ts,
        &["merge", "m", "--method", "linear", "--models", "a:1,c:1"],
        &["model.layers.1.mlp.up_proj.weight", "missing", "c"],
    );
    // Also as the first model (the tensor is then another parent's extra one).
    refused(
        &ts,
        &["merge", "m", "--method", "linear", "--models", "c:1,a:1"],
        &["model.layers.1.mlp.up_proj.weight", "c"],
    );
}

#[test]
fn bad_parameters_are_refused_with_one_line() {
    let ts = two_models();
    fn merge<'a>(args: &[&'a str]) -> Vec<&'a str> {
        [&["merge", "m"][..], args].concat()
    }
    refused(
        &ts,
        &merge(&["--method", "linear", "--models", "a:1,b:-1"]),
        &["weights sum to zero", "normalize"],
    );
    refused(&ts, &merge(&["--method", "ties", "--base", "a", "--models", "b:1:0"]), &["density", "(0, 1]"]);
    refused(&ts, &merge(&["--method", "ties", "--base", "a", "--models", "b:1:1.5"]), &["density", "(0, 1]"]);
    refused(&ts, &merge(&["--method", "dare_linear", "--base", "a", "--models", "b:1:-0.2"]), &["density"]);
    refused(
        &ts,
        &merge(&["--method", "slerp", "--base", "a", "--models", "a,b", "--t", "1.5"]),
        &["t = 1.5", "[0, 1]"],
    );
    refused(&ts, &merge(&["--method", "slerp", "--base", "a", "--models", "a,b", "--t=-0.1"]), &["[0, 1]"]);
    refused_yaml(
        &ts,
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t: [0.0, 1.2]\n",
        &["outside [0, 1]"],
    );
    refused_yaml(
        &ts,
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 3]\n",
        &["layer_range [0, 3]", "outside", "2 layers"],
    );
    refused_yaml(
        &ts,
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [1, 0]\n",
        &["layer_range"],
    );
    refused(
        &ts,
        &merge(&["--method", "slerp", "--base", "a", "--models", "a", "--t", "0.5"]),
        &["slerp", "exactly 2 inputs"],
    );
    add_other(&ts, "c", |_| {});
    refused(
        &ts,
        &merge(&["--method", "slerp", "--base", "a", "--models", "a,b,c", "--t", "0.5"]),
        &["slerp", "exactly 2 inputs"],
    );
}

#[test]
fn configs_that_are_not_mergekits_schema_are_refused_naming_what() {
    let ts = two_models();
    let linear = |extra: &str| {
        format!("merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: 1}}\n  - model: b\n    parameters: {{weight: 1}}\n{extra}")
    };
    refused_yaml(&ts, "merge_method: [linear", &["not YAML"]);
    refused_yaml(&ts, "- just\n- a list\n", &["config"]);
    refused_yaml(&ts, "models:\n  - model: a\n", &["merge_method"]);
    refused_yaml(&ts, &linear("frobnicate: 3\n"), &["unknown key", "frobnicate"]);
    refused_yaml(&ts, &linear("modules: {}\n"), &["modules"]);
    refused_yaml(&ts, &linear("tokenizer_source: union\n"), &["union"]);
    refused_yaml(&ts, &linear("parameters: {wieght: 1}\n"), &["wieght"]);
    refused_yaml(&ts, &linear("dtype: float64\n"), &["float64"]);
    refused_yaml(&ts, &linear("").replace("linear", "frankenstein"), &["frankenstein"]);
    refused(&ts, &["merge", "m", "--method", "frankenstein", "--models", "a:1,b:1"], &["frankenstein"]);
    refused_yaml(&ts, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0.5}\n  - model: b\n", &["density"]);
}

#[test]
fn unknown_names_cycles_and_removing_a_parent_are_refused() {
    let ts = two_models();
    refused(
        &ts,
        &["merge", "m", "--method", "linear", "--models", "a:1,nope:1"],
        &["parent \"nope\"", "does not exist"],
    );
    refused(&ts, &["merge", "m", "--method", "linear", "--models", "nope:1,a:1"], &["nope"]);
    refused(&ts, &["merge", "m", "--method", "ties", "--base", "nope", "--models", "a:1:0.5"], &["nope"]);
    // A merge naming itself is a cycle (it does not exist yet either).
    refused(&ts, &["merge", "m", "--method", "linear", "--models", "a:1,m:1"], &["\"m\"", "cycle"]);
    refused(&ts, &["merge", "m", "--method", "linear", "--models", "m:1,a:1"], &["m"]);
    refused(&ts, &["merge", "a", "--method", "linear", "--models", "a:1,b:1"], &["a", "exists"]);
    ts.ok(["merge", "m", "--method", "linear", "--models", "a:1,b:1"]);
    ts.ok(["merge", "mm", "--method", "linear", "--models", "m:1,b:2"]);
    refused(&ts, &["rm", "a"], &["\"a\" is a parent of m"]);
    refused(&ts, &["rm", "b"], &["b"]);
    refused(&ts, &["rm", "m"], &["m", "mm"]);
    ts.ok(["rm", "mm"]);
    ts.ok(["rm", "m"]);
    ts.ok(["rm", "b"]);
}

/// Flips the last byte of `name`'s stored `model.safetensors` (the same size, other bytes): the
/// file under STORE/models/, or the object the registry names on S3.
fn rewrite_stored(ts: &TestStore, name: &str) {
    rewrite_stored_file(ts, name, "model.safetensors")
}

/// Flips the last byte of `name`'s stored `file` (see [`rewrite_stored`]).
fn rewrite_stored_file(ts: &TestStore, name: &str, file: &str) {
    let mut bytes = ts.stored_file(name, file);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    match &ts.s3 {
        None => {
            let stored = ts.store.join("models").join(name).join(file);
            // A later modification time than the one recorded, whatever the clock's resolution.
            std::thread::sleep(Duration::from_millis(20));
            std::fs::write(&stored, &bytes).unwrap();
        }
        Some(s3) => {
            let registry = ts.registry_json();
            let files = registry["entries"][name]["files"].as_array().unwrap();
            let f = files.iter().find(|f| f["name"] == file).unwrap();
            s3.objects().put(f["object"].as_str().unwrap(), bytes.into()).unwrap();
        }
    }
}

#[test]
fn a_parent_changed_after_merging_answers_eio_with_a_log_line() {
    let ts = two_models();
    // `b` copied into the store: the test rewrites the store's own file, not a referenced one.
    ts.ok(["add", "bc", s(&ts.path("b")), "--copy"]);
    ts.ok(["merge", "m", "--method", "linear", "--models", "a:1,bc:1"]);
    ts.ok(["merge", "mm", "--method", "slerp", "--base", "m", "--models", "m,a", "--t", "0.5"]);
    assert!(ts.stored_files("bc").contains_key("model.safetensors"), "{:?}", ts.stored_files("bc"));
    let mount = MountGuard::new(&ts, &ts.path("mnt"), &["--disk-cache", "0"]);
    // Locally the merge is read before the change, on S3 after (a mount keeps a local copy of
    // what it fetched, of the version it first saw).
    if !ts.is_s3() {
        read_mounted(&mount.path().join("m/model.safetensors")).expect("the merge reads before the change");
    }
    rewrite_stored(&ts, "bc");
    for merged in ["m", "mm"] {
        match read_mounted(&mount.path().join(merged).join("model.safetensors")) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{merged}: {e}"),
            Ok(_) => panic!("{merged} read after its parent bc changed"),
        }
    }
    let line = mount.wait_log_line(&["bc", "model.safetensors"], Duration::from_secs(10));
    assert!(line.is_some(), "no log line names the changed parent:\n{}", mount.log_text());
    eprintln!("log: {}", line.unwrap());
    // Files that do not read from it are still served.
    read_mounted(&mount.path().join("a/model.safetensors")).expect("a, which does not read bc");
    let f = ts.run_full(["check", "m"]);
    assert!(!f.status.success() && (f.stdout + &f.stderr).contains("bc"), "llmfs check m passed");
}

#[test]
fn tokenizer_source_over_differing_vocabularies_is_refused() {
    let ts = TestStore::new();
    let base = data("fastchat_delta/base");
    // `swapped`: a fine-tune whose tokenizer.json has two tokens' ids exchanged (same size).
    let dir = ts.path("swapped");
    demo::write_finetune(&base, &dir, 1.0, 5).unwrap();
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (x, y): (String, String) = {
        let mut by_id: Vec<(&String, u64)> = vocab.iter().map(|(k, v)| (k, v.as_u64().unwrap())).collect();
        by_id.sort_by_key(|e| e.1);
        (by_id[10].0.clone(), by_id[11].0.clone())
    };
    let (ix, iy) = (vocab[&x].clone(), vocab[&y].clone());
    vocab.insert(x, iy);
    vocab.insert(y, ix);
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    let ft = ts.path("ft");
    demo::write_finetune(&base, &ft, 1.0, 6).unwrap();
    ts.ok(["add", "base", s(&base)]);
    ts.ok(["add", "swapped", s(&dir)]);
    ts.ok(["add", "ft", s(&ft)]);
    let yaml = |models: &str, source: &str| {
        format!(
            "merge_method: task_arithmetic\nbase_model: base\nmodels:\n{}tokenizer_source: {source}\n",
            models
                .split(',')
                .map(|m| format!("  - model: {m}\n    parameters: {{weight: 0.5}}\n"))
                .collect::<String>()
        )
    };
    refused_yaml(&ts, &yaml("swapped", "swapped"), &["tokenizer_source swapped", "token id 10", "base"]);
    refused_yaml(&ts, &yaml("ft,swapped", "base"), &["tokenizer_source base", "token id 10", "swapped"]);
    refused_yaml(&ts, &yaml("ft", "nope"), &["tokenizer_source", "nope"]);
    // The same vocabulary everywhere: the source's tokenizer is served, as mergekit's would be.
    let path = ts.path("ok.yml");
    std::fs::write(&path, yaml("ft", "ft")).unwrap();
    ts.ok(["merge", "m", "--config", s(&path)]);
    let out = export(&ts, "m");
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(ft.join("tokenizer.json")).unwrap()
    );
    // Without tokenizer_source mergekit takes the base's tokenizer and permutes nothing: served.
    std::fs::write(&path, yaml("swapped", "base").replace("tokenizer_source: base\n", "")).unwrap();
    ts.ok(["merge", "m2", "--config", s(&path)]);
}

// --- the GPU backend ---

#[cfg(feature = "gpu")]
const GPU_MERGES: [(&str, &str); 5] = [
    (
        "linear",
        "merge_method: linear
models:
  - {model: b, parameters: {weight: 0.5}}
  - {model: c, parameters: {weight: 0.3}}
  - {model: d, parameters: {weight: 0.2}}
dtype: bfloat16
",
    ),
    (
        "ties",
        "merge_method: ties
base_model: a
models:
  - {model: b, parameters: {weight: 0.5, density: 0.7}}
  - {model: c, parameters: {weight: 0.3, density: 0.5}}
  - {model: d, parameters: {weight: 0.4, density: 0.6}}
parameters: {normalize: true}
dtype: float16
",
    ),
    (
        "dare",
        "merge_method: dare_ties
base_model: a
models:
  - {model: b, parameters: {weight: 0.5, density: 0.5}}
  - {model: c, parameters: {weight: 0.5, density: 0.6}}
  - {model: d, parameters: {weight: 0.3, density: 0.4}}
dtype: bfloat16
",
    ),
    (
        "crumbs",
        "merge_method: breadcrumbs_ties
base_model: a
models:
  - {model: b, parameters: {weight: 0.5, density: 0.8, gamma: 0.05}}
  - {model: c, parameters: {weight: 0.5, density: 0.7}}
  - {model: d, parameters: {weight: 0.3, density: 0.9}}
dtype: float32
",
    ),
    (
        "task",
        "merge_method: task_arithmetic
base_model: a
models:
  - {model: b, parameters: {weight: 1.0}}
  - {model: c, parameters: {weight: 0.5}}
  - {model: d, parameters: {weight: -0.3}}
parameters: {lambda: 0.8}
dtype: bfloat16
",
    ),
];

/// Linear, TIES, DARE-TIES, breadcrumbs-TIES and task arithmetic read through a mount with
/// `--backend gpu` (no disk cache: every chunk computed by the GPU kernel) give the bytes
/// `export` computes on the CPU. Without a GPU adapter (lavapipe in CI) the test is skipped,
/// unless `LLMFS_REQUIRE_GPU=1`.
#[cfg(feature = "gpu")]
#[test]
fn merges_read_through_the_gpu_backend_are_the_cpus_bytes() {
    if let Err(e) = llmfs::compute::gpu::GpuContext::new() {
        assert!(
            std::env::var("LLMFS_REQUIRE_GPU").as_deref() != Ok("1"),
            "LLMFS_REQUIRE_GPU=1 but no GPU: {e}"
        );
        eprintln!("note: skipping: no GPU: {e}");
        return;
    }
    let ts = two_models();
    let a = ts.path("a");
    for (name, seed) in [("c", 8), ("d", 9)] {
        demo::write_finetune(&a, &ts.path(name), 1.5, seed).unwrap();
        ts.ok(["add", name, s(&ts.path(name))]);
    }
    let mut want = Vec::new();
    for (name, yaml) in GPU_MERGES {
        ts.ok(["merge", name, "--config", s(&config(&ts, &format!("{name}.yml"), yaml, &[]))]);
        want.push((name, export(&ts, name)));
    }
    let mnt = ts.path("mnt");
    let m = MountGuard::new(&ts, &mnt, &["--backend", "gpu", "--disk-cache-size", "0"]);
    let pairs: Vec<(&str, &Path)> = want.iter().map(|(n, p)| (*n, p.as_path())).collect();
    assert_mount_equals(m.path(), &pairs);
    let log = m.log_text();
    assert!(
        log.contains("merge_gta: Gpu") && log.contains("merge_linear: Gpu"),
        "backend not chosen:\n{log}"
    );
    assert!(!log.contains("GPU kernel failed"), "a GPU call fell back to the CPU:\n{log}");
}

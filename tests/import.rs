//! `llmfs delta import`: FastChat deltas bit-identical to FastChat's apply_delta, PEFT LoRA
//! adapters within f32 rounding of a float64 merge, and bad input refused with one line.
//!
//! The reference files were written by fschat 0.2.36 and peft 0.21.2 (scripts/fastchat_delta_check.py,
//! scripts/lora_check.py; tests/data/*/README.md).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::TestStore;
use half::{bf16, f16};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

/// name → (dtype, shape, bytes) of every tensor of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn one_line_error(ts: &TestStore, args: &[&str], needle: &str) {
    let before = ts.snapshot();
    let (status, stdout, stderr) = ts.run(args);
    assert!(!status.success(), "{args:?} succeeded");
    assert!(stdout.is_empty(), "{args:?} printed {stdout}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr:?} lacks {needle:?}");
    ts.assert_unchanged(&before, &format!("{args:?}"));
}

#[test]
fn fastchat_delta_gives_fastchats_tensors_bit_for_bit() {
    let ts = TestStore::new();
    ts.ok(["add", "base", data("fastchat_delta/base").to_str().unwrap()]);
    ts.ok([
        "delta",
        "import",
        "vicuna-ish",
        "--base",
        "base",
        "--from",
        data("fastchat_delta/delta").to_str().unwrap(),
        "--format",
        "fastchat",
    ]);
    let out = ts.path("out");
    ts.ok(["export", "vicuna-ish", out.to_str().unwrap()]);
    let got = tensors(&out.join("model.safetensors"));
    let want = tensors(&data("fastchat_delta/applied/model.safetensors"));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (name, (dtype, shape, bytes)) in &want {
        let (g_dtype, g_shape, g_bytes) = &got[name];
        assert_eq!((g_dtype, g_shape), (dtype, shape), "{name}");
        assert!(g_bytes == bytes, "{name}: differs from FastChat's apply_delta");
    }
    // apply_delta saves the delta's tokenizer: the entry serves the delta's non-weight files.
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(data("fastchat_delta/delta/tokenizer.json")).unwrap()
    );
    ts.ok(["check", "vicuna-ish"]);
}

/// apply_delta writes f16 tensors and a config that says float16: a FastChat import's config.json
/// says so too, also when the delta's own config.json (which it serves in place of the base's)
/// names another dtype, as a delta saved from a bf16 model does.
#[test]
fn fastchat_import_config_names_f16_whatever_the_deltas_says() {
    let ts = TestStore::new();
    ts.ok(["add", "base", data("fastchat_delta/base").to_str().unwrap()]);
    let delta = ts.path("delta-bf16-config");
    std::fs::create_dir_all(&delta).unwrap();
    for f in std::fs::read_dir(data("fastchat_delta/delta")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, delta.join(f.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(delta.join("config.json")).unwrap()).unwrap();
    config["dtype"] = "bfloat16".into();
    config["torch_dtype"] = "bfloat16".into();
    std::fs::write(delta.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    ts.ok([
        "delta",
        "import",
        "fc",
        "--base",
        "base",
        "--from",
        delta.to_str().unwrap(),
        "--format",
        "fastchat",
    ]);
    let out = ts.path("out");
    ts.ok(["export", "fc", out.to_str().unwrap()]);
    let got: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((&got["dtype"], &got["torch_dtype"]), (&"float16".into(), &"float16".into()), "{got}");
    // Everything else is the delta's config.
    config["dtype"] = "float16".into();
    config["torch_dtype"] = "float16".into();
    assert_eq!(got, config);
}

#[test]
fn lora_merge_is_within_f32_rounding_of_a_float64_merge() {
    let ts = TestStore::new();
    ts.ok(["add", "base", data("fastchat_delta/base").to_str().unwrap()]);
    for (adapter, merged) in [("adapter", "merged"), ("adapter_rslora", "merged_rslora")] {
        let name = format!("lora-{adapter}");
        ts.ok([
            "delta",
            "import",
            &name,
            "--base",
            "base",
            "--from",
            data(&format!("lora/{adapter}")).to_str().unwrap(),
            "--format",
            "lora",
        ]);
        let out = ts.path(&name);
        ts.ok(["export", &name, out.to_str().unwrap()]);
        let got = tensors(&out.join("model.safetensors"));
        let base = tensors(&data("fastchat_delta/base/model.safetensors"));
        let f64_ref = tensors(&data(&format!("lora/{merged}_f64/model.safetensors")));
        let peft = tensors(&data(&format!("lora/{merged}/model.safetensors")));
        let mut differing_from_peft = 0;
        for (name, (dtype, shape, bytes)) in &base {
            let (g_dtype, g_shape, g_bytes) = &got[name];
            assert_eq!((g_dtype, g_shape), (dtype, shape), "{name}");
            match f64_ref.get(name) {
                // Untouched tensors are the base's, exactly.
                None => assert!(g_bytes == bytes, "{name} changed"),
                Some((_, _, want)) => {
                    for (i, (g, w)) in g_bytes.chunks(2).zip(want.chunks(8)).enumerate() {
                        let g = bf16::from_le_bytes([g[0], g[1]]).to_f64();
                        let w = f64::from_le_bytes(w.try_into().unwrap());
                        // Within one bf16 ulp of the exact merge (what any f32 merge achieves).
                        let ulp = (w.abs().max(1e-30)).log2().floor().exp2() / 128.0;
                        assert!((g - w).abs() <= ulp, "{name}[{i}]: {g} vs {w}");
                    }
                }
            }
            differing_from_peft +=
                g_bytes.chunks(2).zip(peft[name].2.chunks(2)).filter(|(a, b)| a != b).count();
        }
        // PEFT's BLAS sums in another order; only rare ties may round apart.
        assert!(differing_from_peft <= 4, "{adapter}: {differing_from_peft} elements differ from PEFT");
    }
}

#[test]
fn bad_imports_are_refused_with_one_line() {
    let ts = TestStore::new();
    ts.ok(["add", "base", data("fastchat_delta/base").to_str().unwrap()]);

    // A FastChat delta whose shapes do not match the base.
    let bad = ts.path("bad-delta");
    std::fs::create_dir_all(&bad).unwrap();
    let mut m = tensors(&data("fastchat_delta/delta/model.safetensors"));
    let (_, shape, bytes) = m.get_mut("model.norm.weight").unwrap();
    shape[0] -= 1;
    bytes.truncate(bytes.len() - 2);
    write_tensors(&bad.join("model.safetensors"), &m);
    one_line_error(
        &ts,
        &["delta", "import", "x", "--base", "base", "--from", bad.to_str().unwrap(), "--format", "fastchat"],
        "model.norm.weight",
    );

    // A FastChat delta missing a tensor.
    m.remove("model.norm.weight");
    write_tensors(&bad.join("model.safetensors"), &m);
    one_line_error(
        &ts,
        &["delta", "import", "x", "--base", "base", "--from", bad.to_str().unwrap(), "--format", "fastchat"],
        "model.norm.weight",
    );

    // A LoRA whose rank does not fit its config.
    let lora = ts.path("bad-lora");
    std::fs::create_dir_all(&lora).unwrap();
    let config = std::fs::read_to_string(data("lora/adapter/adapter_config.json")).unwrap();
    std::fs::write(lora.join("adapter_config.json"), config.replace("\"r\": 8", "\"r\": 4")).unwrap();
    std::fs::copy(data("lora/adapter/adapter_model.safetensors"), lora.join("adapter_model.safetensors"))
        .unwrap();
    one_line_error(
        &ts,
        &["delta", "import", "x", "--base", "base", "--from", lora.to_str().unwrap(), "--format", "lora"],
        "rank 4",
    );

    // A LoRA whose target modules are not in the base.
    std::fs::write(lora.join("adapter_config.json"), config).unwrap();
    let mut a = tensors(&data("lora/adapter/adapter_model.safetensors"));
    let renamed: BTreeMap<_, _> =
        a.iter_mut().map(|(k, v)| (k.replace("q_proj", "qkv_proj"), v.clone())).collect();
    write_tensors(&lora.join("adapter_model.safetensors"), &renamed);
    one_line_error(
        &ts,
        &["delta", "import", "x", "--base", "base", "--from", lora.to_str().unwrap(), "--format", "lora"],
        "match no base weight",
    );

    // Unknown format, missing base, taken name.
    one_line_error(
        &ts,
        &["delta", "import", "x", "--base", "base", "--from", lora.to_str().unwrap(), "--format", "gguf"],
        "gguf",
    );
    one_line_error(
        &ts,
        &["delta", "import", "x", "--base", "nope", "--from", lora.to_str().unwrap(), "--format", "lora"],
        "nope",
    );
    one_line_error(
        &ts,
        &["delta", "import", "base", "--base", "base", "--from", lora.to_str().unwrap(), "--format", "lora"],
        "already exists",
    );
}

fn write_tensors(path: &Path, m: &BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = m
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn f16_add_matches_the_float64_sum_rounded_once() {
    // The kernel FastChat imports rest on, checked on the checked-in delta's own values.
    let delta = tensors(&data("fastchat_delta/delta/model.safetensors"));
    let (_, _, bytes) = &delta["model.layers.0.mlp.up_proj.weight"];
    let mut out = vec![0u8; bytes.len()];
    llmfs::compute::merge::add_f16(bytes, bytes, &mut out);
    for (i, (x, o)) in bytes.chunks(2).zip(out.chunks(2)).enumerate() {
        let x = f16::from_le_bytes([x[0], x[1]]).to_f64();
        assert_eq!(o, &f16::from_f64(x + x).to_le_bytes()[..], "element {i}");
    }
}

/// A LoRA adapter whose base weight is not a float tensor (I8, U8, F64, I32) was accepted at
/// import, and the first read of the merged weight panicked the daemon (`compute::merge`,
/// `expect("a float dtype")`, from a FUSE read and from a prefetch task). It is refused at
/// import with one line naming the weight and its dtype, and the store is left as it was.
#[test]
fn lora_on_a_weight_that_is_not_a_float_is_refused_at_import() {
    use safetensors::Dtype as D;
    for (dtype, size) in [(D::I8, 1), (D::U8, 1), (D::F64, 8), (D::I32, 4)] {
        let ts = TestStore::new();
        let base = ts.path("base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(
            base.join("config.json"),
            br#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#,
        )
        .unwrap();
        let mut m = BTreeMap::new();
        m.insert("l.weight".to_owned(), (dtype, vec![4, 4], vec![1u8; 16 * size]));
        m.insert("norm.weight".to_owned(), (D::F32, vec![4], vec![0u8; 16]));
        write_tensors(&base.join("model.safetensors"), &m);
        ts.ok(["add", "base", base.to_str().unwrap()]);
        let adapter = ts.path("adapter");
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::write(adapter.join("adapter_config.json"), br#"{"r":2,"lora_alpha":2}"#).unwrap();
        let mut a = BTreeMap::new();
        a.insert("base_model.model.l.lora_A.weight".to_owned(), (D::F32, vec![2, 4], vec![0u8; 32]));
        a.insert("base_model.model.l.lora_B.weight".to_owned(), (D::F32, vec![4, 2], vec![0u8; 32]));
        write_tensors(&adapter.join("adapter_model.safetensors"), &a);
        let name = format!("{dtype:?}");
        one_line_error(
            &ts,
            &[
                "delta",
                "import",
                "x",
                "--base",
                "base",
                "--from",
                adapter.to_str().unwrap(),
                "--format",
                "lora",
            ],
            &format!("l.weight: the adapter targets a {name} weight"),
        );
    }
}

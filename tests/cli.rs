//! The command line's contract (DESIGN.md, "The user's contract"): every command exits non-zero
//! with one clear line on bad input and leaves the store as it was; the happy paths of `add`,
//! `ls`, `info`, `cast`, `rm` and `check`; and which store is used (`--store`, `$LLMFS_STORE`,
//! the default under `$HOME`).
//!
//! Every test has its own temporary store and a small generated model (a few hundred KB), and
//! every spawned `llmfs` runs under a deadline.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::{
    assert_one_line_error, llmfs_command, run_command, small_spec, tensor_count, write_model,
    write_raw_safetensors, Finished, TestStore,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs `args` on `ts`, which must fail with one line naming every needle and leave the store
/// unchanged.
#[track_caller]
fn refused(ts: &TestStore, args: &[&str], needles: &[&str]) -> Finished {
    let before = ts.snapshot();
    let f = ts.run_full(args);
    assert_one_line_error(&f, needles);
    ts.assert_unchanged(&before, &format!("after `llmfs {}`", args.join(" ")));
    f
}

/// A store with one entry `m` added in place from the small model at `TMP/model`.
fn store_with_model() -> (TestStore, std::path::PathBuf) {
    let ts = TestStore::new();
    let model = ts.model("model");
    ts.ok(["add", "m", model.to_str().unwrap()]);
    (ts, model)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A model directory with a config.json and one hand-made `model.safetensors`.
fn model_dir_with_weights(
    ts: &TestStore,
    rel: &str,
    header_json: &str,
    data_len: usize,
) -> std::path::PathBuf {
    let dir = ts.path(rel);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("config.json"), r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#)
        .unwrap();
    write_raw_safetensors(&dir.join("model.safetensors"), header_json, data_len);
    dir
}

/// Sets a file's mtime back to what it was (so only its content differs).
fn restore_mtime(path: &Path, meta: &fs::Metadata) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_times(
        fs::FileTimes::new().set_modified(meta.modified().unwrap()).set_accessed(meta.accessed().unwrap()),
    )
    .unwrap();
}

/// The problems `llmfs check` reported: its non-empty output lines (stdout and stderr).
fn check_lines(f: &Finished) -> Vec<String> {
    f.stdout.lines().chain(f.stderr.lines()).filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// `add`: bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn add_nonexistent_path_is_refused() {
    let ts = TestStore::new();
    let missing = ts.path("no-such-model");
    refused(&ts, &["add", "m", s(&missing)], &[s(&missing)]);
    // Also with --copy, and also when the store already has an entry.
    refused(&ts, &["add", "m", s(&missing), "--copy"], &[s(&missing)]);
    let model = ts.model("model");
    ts.ok(["add", "base", s(&model)]);
    refused(&ts, &["add", "m", s(&missing)], &[s(&missing)]);
}

#[test]
fn add_a_regular_file_is_refused() {
    let ts = TestStore::new();
    let model = ts.model("model");
    let file = model.join("model.safetensors");
    refused(&ts, &["add", "m", s(&file)], &["model.safetensors", "not a directory"]);
}

#[test]
fn add_directory_without_weights_is_refused() {
    let ts = TestStore::new();
    let dir = ts.path("readme-only");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("README.md"), "# not a model\n").unwrap();
    let f = refused(&ts, &["add", "m", s(&dir)], &["readme-only"]);
    assert!(f.stderr.contains("safetensors"), "should say what is missing: {}", f.stderr);
    // An empty directory, too.
    let empty = ts.path("empty");
    fs::create_dir_all(&empty).unwrap();
    refused(&ts, &["add", "m", s(&empty), "--copy"], &["empty", "safetensors"]);
}

#[test]
fn add_pytorch_only_directory_says_how_to_convert() {
    let ts = TestStore::new();
    let dir = ts.path("torch-model");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("config.json"), r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#)
        .unwrap();
    fs::write(dir.join("pytorch_model.bin"), vec![0x80u8; 4096]).unwrap();
    let f = refused(&ts, &["add", "m", s(&dir)], &["torch-model"]);
    let line = f.stderr.to_lowercase();
    assert!(line.contains("convert"), "should say how to convert: {}", f.stderr);
    assert!(line.contains("safetensors"), "should name the target format: {}", f.stderr);
    assert!(
        line.contains("save_pretrained") || line.contains("safe_serialization"),
        "should give the command: {}",
        f.stderr
    );
}

#[test]
fn add_duplicate_name_is_refused() {
    let (ts, model) = store_with_model();
    let other = ts.model("other");
    refused(&ts, &["add", "m", s(&other)], &["\"m\"", "exists"]);
    refused(&ts, &["add", "m", s(&model)], &["\"m\"", "exists"]);
    refused(&ts, &["add", "m", s(&other), "--copy"], &["\"m\"", "exists"]);
    // A cast's name is taken too.
    ts.ok(["cast", "m16", "--base", "m", "--dtype", "f16"]);
    refused(&ts, &["add", "m16", s(&other)], &["m16", "exists"]);
    refused(&ts, &["cast", "m16", "--base", "m", "--dtype", "f32"], &["m16", "exists"]);
}

#[test]
fn add_invalid_names_are_refused() {
    let ts = TestStore::new();
    let model = ts.model("model");
    for name in ["a/b", "../evil", "..", ".", ".hidden", "has space", "x\\y"] {
        refused(&ts, &["add", name, s(&model)], &[&format!("{name:?}"), "name"]);
        refused(&ts, &["add", name, s(&model), "--copy"], &[&format!("{name:?}"), "name"]);
    }
    // The empty name: the line must still say it is the name that is wrong.
    let f = refused(&ts, &["add", "", s(&model)], &["name"]);
    assert!(
        f.stderr.contains("\"\"") || f.stderr.contains("empty"),
        "should show the empty name: {}",
        f.stderr
    );
    assert!(!ts.path("evil").exists() && !ts.store.join("evil").exists());
    // The same rules for variants.
    ts.ok(["add", "m", s(&model)]);
    refused(&ts, &["cast", "a/b", "--base", "m", "--dtype", "f16"], &["\"a/b\"", "name"]);
    refused(&ts, &["cast", ".h", "--base", "m", "--dtype", "f16"], &["\".h\"", "name"]);
}

#[test]
fn add_truncated_safetensors_is_refused() {
    let ts = TestStore::new();
    let model = ts.model("model");
    let weights = model.join("model.safetensors");
    let len = fs::metadata(&weights).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&weights).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let f = refused(&ts, &["add", "m", s(&model)], &["model.safetensors"]);
    assert!(f.stderr.contains("truncated"), "should say the file is truncated: {}", f.stderr);
    refused(&ts, &["add", "m", s(&model), "--copy"], &["model.safetensors", "truncated"]);
    // Cut inside the 8-byte length, and inside the JSON.
    fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(5).unwrap();
    refused(&ts, &["add", "m", s(&model)], &["model.safetensors", "truncated"]);
    fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(40).unwrap();
    refused(&ts, &["add", "m", s(&model)], &["model.safetensors"]);
}

#[test]
fn add_header_with_invalid_json_is_refused() {
    let ts = TestStore::new();
    let dir = model_dir_with_weights(
        &ts,
        "bad-json",
        r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]"#,
        16,
    );
    refused(&ts, &["add", "m", s(&dir)], &["model.safetensors", "JSON"]);
    let dir = model_dir_with_weights(&ts, "not-object", r#"[1, 2, 3]"#, 0);
    refused(&ts, &["add", "m", s(&dir)], &["model.safetensors"]);
}

#[test]
fn add_header_with_overlapping_offsets_is_refused() {
    let ts = TestStore::new();
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let dir = model_dir_with_weights(&ts, "overlap", header, 24);
    let f = refused(&ts, &["add", "m", s(&dir)], &["model.safetensors"]);
    assert!(f.stderr.contains("overlap"), "should say the offsets overlap: {}", f.stderr);
    // Two tensors on the very same bytes.
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let dir = model_dir_with_weights(&ts, "same-bytes", header, 16);
    refused(&ts, &["add", "m", s(&dir)], &["model.safetensors", "overlap"]);
}

#[test]
fn add_header_with_offsets_past_the_end_is_refused() {
    let ts = TestStore::new();
    // The second tensor ends 8 bytes after the end of the file.
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}"#;
    let dir = model_dir_with_weights(&ts, "past-end", header, 24);
    let f = refused(&ts, &["add", "m", s(&dir)], &["model.safetensors"]);
    assert!(
        f.stderr.contains("32") && f.stderr.contains("24"),
        "should give the end and the real size: {}",
        f.stderr
    );
    // Offsets that do not agree with the shape.
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,64]}}"#;
    let dir = model_dir_with_weights(&ts, "shape-mismatch", header, 64);
    refused(&ts, &["add", "m", s(&dir)], &["model.safetensors", "\"a\""]);
}

/// A declared length of 10 GB must be refused from the 8-byte prefix alone: fast, and without
/// allocating or reading what the file claims.
#[test]
fn add_header_declaring_10_gb_fails_fast_without_allocating() {
    const TEN_GB: u64 = 10_000_000_000;
    let ts = TestStore::new();
    // (a) A small file whose 8-byte header length says 10 GB.
    let small = ts.path("ten-gb-header");
    fs::create_dir_all(&small).unwrap();
    let mut bytes = TEN_GB.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    fs::write(small.join("model.safetensors"), &bytes).unwrap();
    // (b) A sparse file really that large, so that the length fits in the file: only the
    //     header-size limit can refuse it.
    let sparse = ts.path("ten-gb-sparse");
    fs::create_dir_all(&sparse).unwrap();
    let f = fs::File::create(sparse.join("model.safetensors")).unwrap();
    f.write_all_at(&TEN_GB.to_le_bytes(), 0).unwrap();
    f.write_all_at(b"{", 8).unwrap();
    f.set_len(8 + TEN_GB).unwrap();
    drop(f);
    // (c) A valid small header whose one tensor declares 10 GB of data.
    let data = model_dir_with_weights(
        &ts,
        "ten-gb-tensor",
        &format!(r#"{{"a":{{"dtype":"U8","shape":[{TEN_GB}],"data_offsets":[0,{TEN_GB}]}}}}"#),
        16,
    );
    for dir in [&small, &sparse, &data] {
        let f = refused(&ts, &["add", "m", s(dir)], &["model.safetensors"]);
        eprintln!(
            "{}: {:?}, peak RSS {} KiB: {}",
            dir.display(),
            f.elapsed,
            f.max_rss_kib,
            f.stderr.trim_end()
        );
        assert!(f.elapsed < Duration::from_secs(1), "{}: took {:?}", dir.display(), f.elapsed);
        // A debug build of the CLI peaks at a few MB; reading 10 GB (or zeroing the buffer) would
        // show as hundreds of MB at least.
        assert!(f.max_rss_kib < 64 * 1024, "{}: peak RSS {} KiB", dir.display(), f.max_rss_kib);
        let f = refused(&ts, &["add", "m", s(dir), "--copy"], &["model.safetensors"]);
        assert!(f.elapsed < Duration::from_secs(1), "{} --copy: took {:?}", dir.display(), f.elapsed);
    }
}

#[test]
fn add_sharded_model_with_a_wrong_index_is_refused() {
    let ts = TestStore::new();
    let model = ts.path("sharded");
    write_model(&model, &common::sharded_spec(2));
    let index_path = model.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    assert_eq!(map["model.embed_tokens.weight"], "model-00001-of-00002.safetensors");
    map.insert("model.embed_tokens.weight".into(), json!("model-00002-of-00002.safetensors"));
    fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    refused(&ts, &["add", "m", s(&model)], &["model.safetensors.index.json", "model.embed_tokens.weight"]);
    refused(
        &ts,
        &["add", "m", s(&model), "--copy"],
        &["model.safetensors.index.json", "model.embed_tokens.weight"],
    );

    // An index that names a tensor no shard has.
    let map = index["weight_map"].as_object_mut().unwrap();
    map.insert("model.embed_tokens.weight".into(), json!("model-00001-of-00002.safetensors"));
    map.insert("model.ghost.weight".into(), json!("model-00001-of-00002.safetensors"));
    fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    refused(&ts, &["add", "m", s(&model)], &["model.safetensors.index.json", "model.ghost.weight"]);

    // A stale index left beside an unsharded save: the error says to remove it (as check does).
    let unsharded = ts.path("unsharded");
    write_model(&unsharded, &common::sharded_spec(1));
    assert!(unsharded.join("model.safetensors").exists());
    fs::write(unsharded.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index).unwrap())
        .unwrap();
    let stale = unsharded.join("model.safetensors.index.json");
    refused(&ts, &["add", "u", s(&unsharded)], &["stale index", &format!("remove {}", s(&stale))]);
    fs::remove_file(&stale).unwrap();
    ts.ok(["add", "u", s(&unsharded)]);

    // Put right, it is accepted.
    index["weight_map"].as_object_mut().unwrap().remove("model.ghost.weight");
    fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    ts.ok(["add", "m", s(&model)]);
    let info = ts.json(["info", "m", "--json"]);
    assert_eq!(info["tensors"], tensor_count(&common::sharded_spec(2)));
}

#[test]
fn corrupt_registry_is_a_clear_error_and_left_untouched() {
    let (ts, model) = store_with_model();
    ts.ok(["cast", "m16", "--base", "m", "--dtype", "f16"]);
    let registry = ts.registry_path();
    let full = fs::read(&registry).unwrap();
    fs::write(&registry, &full[..full.len() / 2]).unwrap();
    let other = ts.model("other");
    let out = ts.path("export-out");
    let commands: Vec<Vec<&str>> = vec![
        vec!["ls"],
        vec!["ls", "--json"],
        vec!["info", "m"],
        vec!["info", "m", "--json"],
        vec!["add", "n", s(&other)],
        vec!["add", "n", s(&other), "--copy"],
        vec!["add", "m", s(&model)],
        vec!["cast", "c", "--base", "m", "--dtype", "f32"],
        vec!["rm", "m16"],
        vec!["rm", "nope"],
        vec!["check"],
        vec!["check", "m"],
        vec!["export", "m", s(&out)],
    ];
    for args in &commands {
        refused(&ts, args, &["registry.json"]);
    }
    assert!(!out.exists(), "export wrote files from a corrupt registry");
    // Garbage that is valid JSON of the wrong shape, and an empty file.
    for bad in [&b"[]"[..], b"{\"version\": 1, \"entries\": {\"../x\": 3}}", b""] {
        fs::write(&registry, bad).unwrap();
        refused(&ts, &["ls"], &["registry.json"]);
        refused(&ts, &["add", "n", s(&other)], &["registry.json"]);
    }
}

/// The line says each thing once: an error whose message already includes its cause must not be
/// followed by that cause again (anyhow's `{:#}` appends every `source()` of the chain).
#[test]
fn error_lines_do_not_repeat_their_cause() {
    let ts = TestStore::new();
    let missing = ts.path("no-such-model");
    let model = ts.model("model");
    let weights = model.join("model.safetensors");
    let len = fs::metadata(&weights).unwrap().len();
    fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len / 2).unwrap();
    let bad_json = model_dir_with_weights(&ts, "bad-json", "{nope", 0);
    for args in [["add", "m", s(&missing)], ["add", "m", s(&model)], ["add", "m", s(&bad_json)]] {
        let f = refused(&ts, &args, &[]);
        let segments: Vec<&str> = f.stderr.trim_end().split(": ").filter(|p| p.len() >= 8).collect();
        for (i, seg) in segments.iter().enumerate() {
            assert!(!segments[i + 1..].contains(seg), "{seg:?} is said twice: {}", f.stderr);
        }
    }
}

#[test]
fn unknown_entries_are_one_line_errors() {
    let (ts, _model) = store_with_model();
    refused(&ts, &["info", "nope"], &["\"nope\""]);
    refused(&ts, &["info", "nope", "--json"], &["\"nope\""]);
    refused(&ts, &["rm", "nope"], &["\"nope\""]);
    refused(&ts, &["cast", "c", "--base", "nope", "--dtype", "f16"], &["\"nope\""]);
    refused(&ts, &["export", "nope", s(&ts.path("out"))], &["\"nope\""]);
    // On an empty store as well (no registry.json yet).
    let empty = TestStore::new();
    refused(&empty, &["info", "nope"], &["\"nope\""]);
    refused(&empty, &["rm", "nope"], &["\"nope\""]);
    assert!(!empty.registry_path().exists());
}

// ---------------------------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------------------------

#[test]
fn add_in_place_then_ls_and_info() {
    let ts = TestStore::new();
    let model = ts.model("model");
    let out = ts.ok(["add", "m", s(&model)]);
    assert!(out.contains("added m"), "{out}");
    assert!(ts.registry_path().is_file());
    // In place: nothing copied into the store.
    assert!(!ts.store.join("models/m").exists());
    assert_eq!(fs::read_dir(ts.store.join("tmp")).unwrap().count(), 0);

    let ls = ts.ok(["ls"]);
    assert!(ls.lines().any(|l| l.split_whitespace().next() == Some("m")), "{ls}");
    let list = ts.json(["ls", "--json"]);
    let list = list.as_array().expect("ls --json is a list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "m");
    assert_eq!(list[0]["kind"], "base");
    assert_eq!(list[0]["simple_name"], "m");

    let info = ts.json(["info", "m", "--json"]);
    assert_eq!(info["name"], "m");
    assert_eq!(info["kind"], "base");
    assert_eq!(info["recipe"]["copied"], false);
    assert_eq!(info["recipe"]["dir"], s(&model.canonicalize().unwrap()));
    // A plain Llama config under a name FastChat does not know: FastChat's base adapter.
    assert_eq!(info["family"], "unknown", "{info:#}");
    assert_eq!(info["template"], "one_shot", "{info:#}");
    assert!(out.contains("unknown") && out.contains("one_shot"), "{out}");
    assert_eq!(info["tensors"], tensor_count(&small_spec()));
    assert_eq!(info["dtypes"], json!({"BF16": tensor_count(&small_spec())}));
    assert_eq!(info["model_info"], json!({"simple_name": "m", "link": "", "description": ""}));
    let files = info["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    for want in ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let weights = files.iter().find(|f| f["name"] == "model.safetensors").unwrap();
    assert_eq!(weights["size"], fs::metadata(model.join("model.safetensors")).unwrap().len());
    let total: u64 = files.iter().map(|f| f["size"].as_u64().unwrap()).sum();
    assert_eq!(info["size"], total);
    assert_eq!(list[0]["size"], total);
    assert_eq!(list[0]["family"], info["family"]);

    let text = ts.ok(["info", "m"]);
    for want in [
        "m",
        "base",
        "unknown",
        "one_shot",
        "model.safetensors",
        "BF16",
        &tensor_count(&small_spec()).to_string(),
    ] {
        assert!(text.contains(want), "info lacks {want:?}:\n{text}");
    }
    // Plain lines: where a base is served from (not its JSON recipe), and, at add, what the
    // mounted tokenizer_config.json gets.
    let from =
        format!("kind:          base, served in place from {}", model.canonicalize().unwrap().display());
    assert!(text.contains(&from), "info lacks {from:?}:\n{text}");
    assert!(out.contains("; the model's own chat_template, or none"), "{out}");
    let out = ts.ok(["add", "vicuna-7b", s(&model)]);
    assert!(out.contains("; chat_template vicuna_v1.1 in the mounted tokenizer_config.json"), "{out}");
    let out = ts.ok(["add", "api", s(&model), "--chat-template", "chatgpt"]);
    assert!(out.contains("; no chat_template: chatgpt has no Jinja form"), "{out}");
}

#[test]
fn add_copy_owns_its_files() {
    let ts = TestStore::new();
    let model = ts.model("model");
    ts.ok(["add", "m", s(&model), "--copy"]);
    let owned = ts.store.join("models/m");
    for name in ["config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json"] {
        assert_eq!(fs::read(owned.join(name)).unwrap(), fs::read(model.join(name)).unwrap(), "{name}");
    }
    assert_eq!(fs::read_dir(ts.store.join("tmp")).unwrap().count(), 0, "staging left behind");
    let info = ts.json(["info", "m", "--json"]);
    assert_eq!(info["recipe"]["copied"], true);
    assert_eq!(info["recipe"]["dir"], s(&owned.canonicalize().unwrap()));
    // The original can go: the entry no longer needs it.
    fs::remove_dir_all(&model).unwrap();
    ts.ok(["check", "m"]);
    ts.ok(["info", "m"]);
}

#[test]
fn add_link_and_description_override_model_info() {
    let ts = TestStore::new();
    let model = ts.model("model");
    ts.ok([
        "add",
        "m",
        s(&model),
        "--link",
        "https://example.com/m",
        "--description",
        "A test model, with commas",
    ]);
    let info = ts.json(["info", "m", "--json"]);
    assert_eq!(
        info["model_info"],
        json!({"simple_name": "m", "link": "https://example.com/m", "description": "A test model, with commas"})
    );
    let text = ts.ok(["info", "m"]);
    assert!(text.contains("https://example.com/m") && text.contains("A test model, with commas"), "{text}");
}

#[test]
fn well_known_name_gets_fastchat_model_info() {
    let ts = TestStore::new();
    let model = ts.model("model");
    ts.ok(["add", "vicuna-7b-v1.5", s(&model)]);
    let info = ts.json(["info", "vicuna-7b-v1.5", "--json"]);
    assert_eq!(
        info["model_info"],
        json!({
            "simple_name": "Vicuna",
            "link": "https://lmsys.org/blog/2023-03-30-vicuna/",
            "description": "A chat assistant fine-tuned on user-shared conversations by LMSYS",
        })
    );
    assert_eq!(info["family"], "vicuna");
    assert_eq!(info["template"], "vicuna_v1.1");
    let list = ts.json(["ls", "--json"]);
    assert_eq!(list[0]["simple_name"], "Vicuna");
    // --link/--description override the table; the simple name stays.
    ts.ok(["add", "vicuna-13b-v1.5", s(&model), "--description", "mine"]);
    let info = ts.json(["info", "vicuna-13b-v1.5", "--json"]);
    assert_eq!(
        info["model_info"],
        json!({"simple_name": "Vicuna", "link": "https://lmsys.org/blog/2023-03-30-vicuna/", "description": "mine"})
    );
}

#[test]
fn ls_lists_every_entry() {
    let ts = TestStore::new();
    // An empty store lists nothing (and is valid JSON).
    assert_eq!(ts.json(["ls", "--json"]), json!([]));
    let header = ts.ok(["ls"]);
    assert!(header.lines().count() <= 1, "{header}");
    let model = ts.model("model");
    ts.ok(["add", "b", s(&model)]);
    ts.ok(["add", "a", s(&model), "--copy"]);
    ts.ok(["cast", "c", "--base", "a", "--dtype", "f32"]);
    let list = ts.json(["ls", "--json"]);
    let list = list.as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let c = &list[2];
    assert_eq!(c["kind"], "cast");
    assert_eq!(c["base"], "a");
    assert!(list[0]["base"].is_null());
    assert!(
        c["size"].as_u64().unwrap() > list[0]["size"].as_u64().unwrap(),
        "f32 is larger than bf16: {list:?}"
    );
    let text = ts.ok(["ls"]);
    for n in ["a", "b", "c"] {
        assert!(text.lines().any(|l| l.split_whitespace().next() == Some(n)), "{n} missing:\n{text}");
    }
}

/// `ls` shows, beside each entry's logical size, the bytes it keeps in the store: its copies,
/// containers and deltas under STORE/models/NAME/ (subdirectories too); nothing for a base
/// referenced in place or a cast.
#[test]
fn ls_shows_the_bytes_each_entry_stores_beside_its_size() {
    let ts = TestStore::new();
    let model = ts.model("model");
    fs::create_dir_all(model.join("1_Pooling")).unwrap();
    fs::write(model.join("1_Pooling/config.json"), vec![b' '; 1000]).unwrap();
    ts.ok(["add", "inplace", s(&model)]);
    ts.ok(["add", "copied", s(&model), "--copy"]);
    ts.ok(["cast", "cast", "--base", "copied", "--dtype", "f32"]);
    ts.ok(["quantize", "q", "--base", "copied", "--group-size", "64"]);
    fn du(dir: &Path) -> u64 {
        fs::read_dir(dir).map_or(0, |rd| {
            rd.map(|e| e.unwrap().path())
                .map(|p| if p.is_dir() { du(&p) } else { fs::metadata(&p).unwrap().len() })
                .sum()
        })
    }
    let list = ts.json(["ls", "--json"]);
    let by_name: std::collections::BTreeMap<&str, &Value> =
        list.as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e)).collect();
    let model_bytes = du(&model);
    for (name, want) in
        [("inplace", 0), ("copied", model_bytes), ("cast", 0), ("q", du(&ts.store.join("models/q")))]
    {
        let e = by_name[name];
        assert_eq!(e["stored_bytes"].as_u64(), Some(want), "{name}: {e}");
        assert!(e["size"].as_u64().unwrap() > 0, "{name}: {e}");
    }
    assert!(by_name["q"]["stored_bytes"].as_u64().unwrap() < by_name["q"]["size"].as_u64().unwrap());
    assert_eq!(by_name["copied"]["size"].as_u64(), Some(model_bytes), "the copy's logical size");
    let text = ts.ok(["ls"]);
    let header = text.lines().next().unwrap();
    assert!(header.contains("SIZE") && header.contains("STORED"), "{text}");
    let line = |n: &str| text.lines().find(|l| l.split_whitespace().next() == Some(n)).unwrap().to_owned();
    assert!(line("inplace").trim_end().ends_with("in place"), "{text}");
    assert!(line("cast").trim_end().ends_with("0 B"), "{text}");
}

#[test]
fn cast_creates_a_variant_of_the_new_dtype() {
    let (ts, model) = store_with_model();
    let out = ts.ok(["cast", "m16", "--base", "m", "--dtype", "f16"]);
    assert!(out.contains("m16"), "{out}");
    let n = tensor_count(&small_spec());
    let info = ts.json(["info", "m16", "--json"]);
    assert_eq!(info["kind"], "cast");
    assert_eq!(info["recipe"]["base"], "m");
    assert_eq!(info["recipe"]["dtype"], "F16");
    assert_eq!(info["dtypes"], json!({"F16": n}));
    assert_eq!(info["tensors"], n);
    // Same family and files as the base; BF16 → F16 keeps the size of the weights.
    let base = ts.json(["info", "m", "--json"]);
    assert_eq!(info["family"], base["family"]);
    assert_eq!(info["template"], base["template"]);
    assert_eq!(info["model_info"]["link"], base["model_info"]["link"]);
    let names = |v: &Value| {
        v["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&info), names(&base));
    let weights = |v: &Value| {
        v["files"].as_array().unwrap().iter().find(|f| f["name"] == "model.safetensors").unwrap()["size"]
            .as_u64()
            .unwrap()
    };
    let data_bytes = fs::metadata(model.join("model.safetensors")).unwrap().len();
    assert!(weights(&info).abs_diff(data_bytes) < 4096, "{} vs {data_bytes}", weights(&info));
    let text = ts.ok(["info", "m16"]);
    assert!(text.contains("F16") && text.contains("cast"), "{text}");

    ts.ok(["cast", "m32", "--base", "m16", "--dtype", "f32"]);
    let info = ts.json(["info", "m32", "--json"]);
    assert_eq!(info["dtypes"], json!({"F32": n}));
    assert!(weights(&info) > 2 * data_bytes - 8192, "{} vs {data_bytes}", weights(&info));
    // A cast writes nothing into the user's model directory.
    let mut files: Vec<String> = fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    );
}

#[test]
fn rm_is_refused_while_a_cast_depends_on_the_entry() {
    let (ts, model) = store_with_model();
    ts.ok(["cast", "m16", "--base", "m", "--dtype", "f16"]);
    refused(&ts, &["rm", "m"], &["\"m\"", "m16"]);
    ts.ok(["cast", "m32", "--base", "m", "--dtype", "f32"]);
    let f = refused(&ts, &["rm", "m"], &["\"m\"", "m16"]);
    assert!(f.stderr.contains("m32"), "should name every dependent: {}", f.stderr);
    let out = ts.ok(["rm", "m16"]);
    assert!(out.contains("m16"), "{out}");
    refused(&ts, &["rm", "m"], &["\"m\"", "m32"]);
    ts.ok(["rm", "m32"]);
    ts.ok(["rm", "m"]);
    assert_eq!(ts.json(["ls", "--json"]), json!([]));
    // An in-place entry's files are the user's: rm leaves them alone.
    for name in ["config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json"] {
        assert!(model.join(name).is_file(), "rm deleted the user's {name}");
    }
    // And the name is free again.
    ts.ok(["add", "m", s(&model)]);
}

#[test]
fn rm_of_a_copied_entry_removes_its_files() {
    let ts = TestStore::new();
    let model = ts.model("model");
    ts.ok(["add", "m", s(&model), "--copy"]);
    ts.ok(["add", "keep", s(&model), "--copy"]);
    assert!(ts.store.join("models/m/model.safetensors").is_file());
    ts.ok(["rm", "m"]);
    assert!(!ts.store.join("models/m").exists(), "STORE/models/m is left behind");
    assert!(ts.store.join("models/keep/model.safetensors").is_file(), "another entry's files were removed");
    assert!(model.join("model.safetensors").is_file());
    let list = ts.json(["ls", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "keep");
}

#[test]
fn check_passes_on_a_fresh_store() {
    let ts = TestStore::new();
    let out = ts.ok(["check"]);
    assert!(out.contains("ok"), "{out}");
    let model = ts.model("model");
    ts.ok(["add", "m", s(&model)]);
    ts.ok(["add", "c", s(&model), "--copy"]);
    ts.ok(["cast", "m16", "--base", "m", "--dtype", "f16"]);
    let out = ts.ok(["check"]);
    assert!(out.contains("3 entries ok"), "{out}");
    let out = ts.ok(["check", "m16"]);
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn check_fails_after_a_base_file_is_modified_in_place() {
    let (ts, model) = store_with_model();
    let weights = model.join("model.safetensors");
    let meta = fs::metadata(&weights).unwrap();
    let middle = meta.len() / 2;
    let f = fs::OpenOptions::new().write(true).read(true).open(&weights).unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, middle).unwrap();
    f.write_all_at(&[byte[0] ^ 0x5a], middle).unwrap();
    drop(f);
    // Same size and (restored) mtime: only the content says it changed.
    restore_mtime(&weights, &meta);
    assert_eq!(fs::metadata(&weights).unwrap().len(), meta.len());
    let before = ts.snapshot();
    for args in [&["check"][..], &["check", "m"]] {
        let f = ts.run_full(args);
        assert!(f.status.code().is_some_and(|c| c != 0), "check passed a modified file: {f:?}");
        let lines = check_lines(&f);
        assert_eq!(lines.len(), 1, "expected one problem line: {f:?}");
        assert!(lines[0].contains("model.safetensors") && lines[0].contains("changed"), "{lines:?}");
    }
    ts.assert_unchanged(&before, "check");
}

#[test]
fn check_fails_after_a_base_file_is_deleted() {
    let (ts, model) = store_with_model();
    ts.ok(["check"]);
    fs::remove_file(model.join("model.safetensors")).unwrap();
    let before = ts.snapshot();
    for args in [&["check"][..], &["check", "m"]] {
        let f = ts.run_full(args);
        assert!(f.status.code().is_some_and(|c| c != 0), "check passed a deleted file: {f:?}");
        let lines = check_lines(&f);
        assert_eq!(lines.len(), 1, "expected one problem line: {f:?}");
        assert!(lines[0].contains("model.safetensors"), "{lines:?}");
    }
    ts.assert_unchanged(&before, "check");
}

#[test]
fn check_of_a_variant_fails_when_its_base_changed() {
    let (ts, model) = store_with_model();
    ts.ok(["cast", "m16", "--base", "m", "--dtype", "f16"]);
    ts.ok(["check", "m16"]);
    let weights = model.join("model.safetensors");
    let meta = fs::metadata(&weights).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&weights).unwrap();
    f.write_all_at(&[0xff, 0xff], meta.len() / 2).unwrap();
    drop(f);
    restore_mtime(&weights, &meta);
    let f = ts.run_full(["check", "m16"]);
    assert!(f.status.code().is_some_and(|c| c != 0), "check passed a variant of a modified base: {f:?}");
    let lines = check_lines(&f);
    assert!(!lines.is_empty() && lines.iter().all(|l| l.contains("m16")), "{lines:?}");
}

/// A delta whose target's shard index names shards it lacks, or maps tensors to a shard that
/// does not hold them (what a copy interrupted midway leaves): `check` fails with one line per
/// shard, for the delta and for a variant of it, and passes once the index is whole again.
#[test]
fn check_fails_when_the_shard_index_names_missing_shards_or_tensors() {
    let ts = TestStore::new();
    let base = ts.path("base");
    // 2 layers + embeddings + head: 4 groups, 2 per shard, would make 2 shards; 4 layers make 3.
    write_model(&base, &llmfs::demo::ModelSpec { layers: 4, ..common::sharded_spec(3) });
    ts.ok(["add", "base", s(&base)]);
    let target = ts.path("target");
    llmfs::demo::write_finetune(&base, &target, 0.01, 7).unwrap();
    let (s2, s3) = ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors");
    for shard in [s2, s3] {
        fs::rename(target.join(shard), ts.path(shard)).unwrap();
    }
    ts.ok(["delta", "make", "half", "--base", "base", "--target", s(&target)]);
    ts.ok(["cast", "half-f32", "--base", "half", "--dtype", "f32"]);
    for name in ["half", "half-f32"] {
        let f = ts.run_full(["check", name]);
        assert!(f.status.code().is_some_and(|c| c != 0), "check passed a half model: {f:?}");
        let lines = check_lines(&f);
        assert_eq!(lines.len(), 2, "one line per missing shard: {lines:?}");
        for (line, shard) in lines.iter().zip([s2, s3]) {
            assert!(
                line.starts_with(&format!("{name}: "))
                    && line.contains(shard)
                    && line.contains("does not have"),
                "{line}"
            );
        }
    }
    // The shards back, but the index maps a tensor to the wrong one.
    for shard in [s2, s3] {
        fs::rename(ts.path(shard), target.join(shard)).unwrap();
    }
    let index_path = target.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let (moved, _) =
        map.iter().find(|(_, v)| v.as_str() == Some(s3)).map(|(k, v)| (k.clone(), v.clone())).unwrap();
    map.insert(moved.clone(), json!("model-00001-of-00003.safetensors"));
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    ts.ok(["delta", "make", "wrong", "--base", "base", "--target", s(&target)]);
    let f = ts.run_full(["check", "wrong"]);
    let lines = check_lines(&f);
    assert!(f.status.code().is_some_and(|c| c != 0), "{f:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("model-00001-of-00003.safetensors") && lines[0].contains(&moved), "{lines:?}");
    // Whole again: passes.
    fs::copy(base.join("model.safetensors.index.json"), &index_path).unwrap();
    ts.ok(["delta", "make", "whole", "--base", "base", "--target", s(&target)]);
    let out = ts.ok(["check", "whole"]);
    assert!(out.contains("1 entry ok"), "{out}");
}

/// `llmfs demo` prints commands that work as typed: each invocation of llmfs by the binary's real
/// path (nothing needs installing first), paths quoted (the demo directory here has a space).
/// Every printed command is run with bash, in order, and must succeed; one lists a delta's GGUF
/// views (the demo model has a tokenizer); the last unmounts.
#[test]
fn demo_prints_commands_that_work_as_typed() {
    let ts = TestStore::new();
    let dir = ts.path("demo dir");
    let guard = common::DaemonGuard::new(&dir.join("mnt"));
    let f = run_command(llmfs_command(["demo", s(&dir)]), Duration::from_secs(120));
    assert!(f.status.success(), "demo failed: {f:?}");
    let commands: Vec<&str> =
        f.stdout.lines().skip_while(|l| !l.starts_with("Try:")).skip(1).map(str::trim).collect();
    assert!(commands.len() >= 6, "{}", f.stdout);
    let exe = common::llmfs_bin();
    assert!(Path::new(exe).is_absolute());
    for c in &commands {
        for word in c.split_whitespace() {
            assert_ne!(word, "llmfs", "a bare `llmfs` needs installing first: {c}");
        }
    }
    assert!(commands.iter().filter(|c| c.starts_with(exe)).count() >= 3, "{commands:?}");
    assert!(commands.last().unwrap().contains(" umount "), "the last command ends the demo: {commands:?}");
    let python_ok = std::process::Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    for c in &commands {
        if c.starts_with("python3") && !python_ok && std::env::var_os("CI").is_none() {
            eprintln!("note: skipping (no python3 with safetensors and numpy): {c}");
            continue;
        }
        let mut cmd = std::process::Command::new("bash");
        cmd.args(["-c", c]).stdin(std::process::Stdio::null());
        let r = run_command(cmd, Duration::from_secs(120));
        assert!(r.status.success(), "`{c}` failed:\n{}\n{}", r.stdout, r.stderr);
        if c.contains("/gguf/") {
            // The demo model has a tokenizer, so its entries have GGUF views: a delta's too.
            for t in ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M"] {
                assert!(r.stdout.contains(&format!("tiny-vicuna-ft-{t}.gguf")), "`{c}`:\n{}", r.stdout);
            }
        }
    }
    assert!(commands.iter().any(|c| c.contains("/gguf/")), "no GGUF view shown: {commands:?}");
    assert!(!common::llmfs_mounted(&guard.path), "the printed umount left the mount");
}

// ---------------------------------------------------------------------------------------------
// Which store
// ---------------------------------------------------------------------------------------------

#[test]
fn store_flag_overrides_env_which_overrides_home() {
    let ts = TestStore::new();
    let model = ts.model("model");
    let (a, b, home) = (ts.path("store-a"), ts.path("store-b"), ts.path("home"));
    fs::create_dir_all(&home).unwrap();
    let run = |store_flag: Option<&Path>, env: Option<&Path>, args: &[&str]| {
        let mut cmd = match store_flag {
            Some(dir) => llmfs_command(["--store", s(dir)]),
            None => llmfs_command(std::iter::empty::<&str>()),
        };
        cmd.args(args).env("HOME", &home);
        if let Some(dir) = env {
            cmd.env("LLMFS_STORE", dir);
        }
        let f = run_command(cmd, common::DEFAULT_TIMEOUT);
        assert!(f.status.success(), "{args:?}: {f:?}");
        f.stdout
    };
    let names = |out: String| -> Vec<String> {
        let v: Value = serde_json::from_str(&out).unwrap();
        v.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_owned()).collect()
    };

    // --store wins over $LLMFS_STORE.
    run(Some(&b), Some(&a), &["add", "in-b", s(&model)]);
    assert!(b.join("registry.json").is_file());
    assert!(!a.join("registry.json").exists(), "--store was ignored");
    // The flag also works after the subcommand (it is global).
    let mut cmd = llmfs_command(["ls", "--json", "--store", s(&b)]);
    cmd.env("LLMFS_STORE", &a).env("HOME", &home);
    let f = run_command(cmd, common::DEFAULT_TIMEOUT);
    assert!(f.status.success(), "{f:?}");
    assert_eq!(names(f.stdout), ["in-b"]);

    // $LLMFS_STORE is used without --store.
    run(None, Some(&a), &["add", "in-a", s(&model)]);
    assert_eq!(names(run(None, Some(&a), &["ls", "--json"])), ["in-a"]);
    assert_eq!(names(run(Some(&b), Some(&a), &["ls", "--json"])), ["in-b"]);

    // Neither: ~/.local/share/llmfs.
    run(None, None, &["add", "in-home", s(&model)]);
    assert!(home.join(".local/share/llmfs/registry.json").is_file());
    assert_eq!(names(run(None, None, &["ls", "--json"])), ["in-home"]);
    assert_eq!(names(run(None, Some(&a), &["ls", "--json"])), ["in-a"]);
    assert_eq!(names(run(Some(&b), None, &["ls", "--json"])), ["in-b"]);
}

/// `llmfs info m | head -1`: output into a pipe whose reader has gone ends the command quietly
/// (SIGPIPE), as it does any Unix tool; it used to panic with "failed printing to stdout".
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::ExitStatusExt;
    let (ts, _) = store_with_model();
    for args in [&["info", "m"][..], &["ls"], &["check"], &["info", "m", "--json"]] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two descriptors; the read end is closed at once, so every
        // write into the other fails (EPIPE), whenever the child makes it.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        unsafe { libc::close(fds[0]) };
        // SAFETY: fds[1] is open and owned here; Stdio takes it over.
        let out = unsafe { std::process::Stdio::from_raw_fd(fds[1]) };
        let mut cmd = llmfs_command([&["--store", ts.store.to_str().unwrap()][..], args].concat());
        cmd.stdout(out).stderr(std::process::Stdio::piped());
        let what = format!("llmfs {args:?}");
        let o = common::with_deadline(&what, Duration::from_secs(60), move || cmd.output().unwrap());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{what}: {:?}, stderr: {stderr}", o.status);
        assert!(stderr.is_empty(), "{what} wrote to stderr: {stderr}");
    }
}

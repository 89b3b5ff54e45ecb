//! Every conversation template through the mount, rendered by transformers.
//!
//! One entry per template (`llmfs add tNN MODEL --chat-template NAME`), one mount, and one
//! Python process that reads each mounted `tokenizer_config.json`, hands its `chat_template`
//! to a transformers tokenizer and calls `apply_chat_template(..., tokenize=False)` on every
//! conversation of `tests/data/fastchat_prompts.json`: the text must be FastChat's
//! `get_prompt()` byte for byte (the empty conversation aside: transformers refuses those). The five templates FastChat has no text prompt for must reach
//! the mount with no `chat_template` at all, and `llmfs info` must say why. `info` and
//! `ls --json` show the adapter beside the template.
//! Skipped (saying so) when transformers is not importable; .ci/run installs it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_command, MountGuard, TestStore};
use llmfs::adapter::{chat_template_jinja, template_names};
use serde_json::Value;

const SCRIPT: &str = r#"
import json, sys
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

mount, entries_path, prompts_path = sys.argv[1:4]
entries = json.load(open(entries_path))
data = json.load(open(prompts_path))
failures, rendered = [], 0
for entry, name in entries:
    config = json.load(open(f"{mount}/{entry}/tokenizer_config.json"))
    want = data["prompts"][name]
    if want[0] is None:
        if config.get("chat_template") is not None:
            failures.append(f"{name}: FastChat has no prompt, the mount has a chat_template")
        continue
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tok.chat_template = config["chat_template"]
    for case, prompt in zip(data["conversations"], want):
        msgs = [] if case["system"] is None else [{"role": "system", "content": case["system"]}]
        msgs += [m for m in case["messages"] if m["content"] is not None]
        gen = any(m["content"] is None for m in case["messages"])
        if not msgs:
            continue  # transformers refuses an empty conversation
        got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        rendered += 1
        if got != prompt:
            failures.append(f"{name} ({case['case']}):\n  fastchat: {prompt!r}\n  transformers: {got!r}")
print(json.dumps({"rendered": rendered, "failures": failures}))
"#;

fn python_with_transformers() -> bool {
    Command::new("python3")
        .args(["-c", "import transformers, tokenizers"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn transformers_renders_every_mounted_template_like_fastchat() {
    if !python_with_transformers() {
        eprintln!("SKIPPED: python3 cannot import transformers (see .ci/run)");
        return;
    }
    let ts = TestStore::new();
    let model = ts.model("model");
    let names = template_names();
    let mut entries = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let entry = format!("t{i:02}");
        ts.ok(["add", &entry, model.to_str().unwrap(), "--chat-template", name]);
        entries.push((entry, name.to_string()));
    }
    // The templates without a Jinja form: info says so, in text and JSON.
    let mut without = 0;
    for (entry, name) in &entries {
        if chat_template_jinja(name).is_some() {
            continue;
        }
        without += 1;
        let info = ts.json(["info", entry, "--json"]);
        assert!(info["chat_template_unavailable"].is_string(), "{name}: {info:#}");
        let text = ts.ok(["info", entry]);
        assert!(text.contains(&format!("chat_template: none: template {name} has no Jinja form")), "{text}");
    }
    assert_eq!(without, 5, "chatgpt, pplxai, bard, gemini, steerlm");

    // A detected family: info shows the adapter beside the template; ls --json carries both.
    ts.ok(["add", "vicuna-7b-v1.5", model.to_str().unwrap()]);
    let info = ts.json(["info", "vicuna-7b-v1.5", "--json"]);
    assert_eq!(
        (&info["adapter"], &info["template"]),
        (&"VicunaAdapter".into(), &"vicuna_v1.1".into()),
        "{info:#}"
    );
    assert_eq!(info["chat_template"], "vicuna_v1.1");
    assert!(info["chat_template_unavailable"].is_null());
    let text = ts.ok(["info", "vicuna-7b-v1.5"]);
    assert!(text.contains("adapter:       VicunaAdapter (family vicuna, template vicuna_v1.1)"), "{text}");
    let list = ts.json(["ls", "--json"]);
    for e in list.as_array().unwrap() {
        assert!(e["adapter"].is_string() && e["template"].is_string(), "{e}");
    }
    let vicuna = list.as_array().unwrap().iter().find(|e| e["name"] == "vicuna-7b-v1.5").unwrap();
    assert_eq!(vicuna["adapter"], "VicunaAdapter");

    let mp = ts.path("mnt");
    let mount = MountGuard::new(&ts, &mp, &[]);
    let entries_file = ts.path("entries.json");
    std::fs::write(&entries_file, serde_json::to_vec(&entries).unwrap()).unwrap();
    let prompts = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/fastchat_prompts.json");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT, mount.path().to_str().unwrap(), entries_file.to_str().unwrap(), prompts]);
    let f = run_command(cmd, Duration::from_secs(120));
    assert!(f.status.success(), "python failed:\n{}\n{}", f.stdout, f.stderr);
    let result: Value = serde_json::from_str(f.stdout.trim()).expect("JSON from python");
    let failures: Vec<&str> =
        result["failures"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    // Every Jinja template, every conversation but the empty one (transformers refuses it).
    assert_eq!(result["rendered"], 80 * 6);
    drop(mount);
}

//! The conversation templates and model adapters against FastChat itself.
//!
//! `tests/data/fastchat_prompts.json` holds the prompts FastChat's own `get_prompt()` builds
//! (fschat 0.2.36; `llama-3` and `gemma` from FastChat's main-branch definitions) for every
//! template and a fixed set of conversations, and `tests/data/fastchat_model_names.json`
//! the adapter and template FastChat picks for every name of its `model_info` registry and a
//! list of Hugging Face repo ids; both are written by `scripts/gen_fastchat_tables.py`.
//! These tests check, for every template and conversation:
//! (a) `Conversation::get_prompt`, the port of FastChat's method;
//! (b) `chat_template_jinja` rendered with minijinja the way transformers'
//!     `apply_chat_template` renders a chat template (messages as {role, content}, the system
//!     message as a leading `system` message, `add_generation_prompt` when the last turn is
//!     the model's to write, `trim_blocks` and `lstrip_blocks` on);
//! and for every recorded name, that `detect` picks FastChat's adapter and template.
//! Equality is exact everywhere; nothing needed relaxing. `fastchat_itself_agrees` re-asks
//! an installed fschat (skipped, saying so, when there is none).

use std::collections::BTreeSet;
use std::process::Command;

use llmfs::adapter::{chat_template_jinja, detect, no_chat_template_reason, template, template_names};
use minijinja::{context, Environment, Value as JinjaValue};
use serde_json::Value;

const PROMPTS: &str = include_str!("data/fastchat_prompts.json");
const NAMES: &str = include_str!("data/fastchat_model_names.json");

struct Case {
    template: String,
    label: String,
    system: Option<String>,
    /// (role, content); content `None` is the open turn FastChat leaves for the model.
    messages: Vec<(String, Option<String>)>,
    /// `None`: FastChat has no text prompt for this template.
    prompt: Option<String>,
}

fn cases() -> Vec<Case> {
    let data: Value = serde_json::from_str(PROMPTS).expect("fastchat_prompts.json parses");
    let conversations = data["conversations"].as_array().expect("conversations");
    let mut out = Vec::new();
    for (name, prompts) in data["prompts"].as_object().expect("an object of templates") {
        let prompts = prompts.as_array().expect("one prompt per conversation");
        assert_eq!(prompts.len(), conversations.len(), "{name}");
        for (conv, prompt) in conversations.iter().zip(prompts) {
            out.push(Case {
                template: name.clone(),
                label: conv["case"].as_str().unwrap().to_string(),
                system: conv["system"].as_str().map(str::to_string),
                messages: conv["messages"]
                    .as_array()
                    .expect("messages")
                    .iter()
                    .map(|m| {
                        (m["role"].as_str().unwrap().to_string(), m["content"].as_str().map(str::to_string))
                    })
                    .collect(),
                prompt: prompt.as_str().map(str::to_string),
            });
        }
    }
    out
}

fn rust_prompt(case: &Case) -> Option<String> {
    let conv = template(&case.template).unwrap_or_else(|| panic!("{} is not carried", case.template));
    let messages: Vec<(usize, Option<&str>)> = case
        .messages
        .iter()
        .map(|(role, content)| (usize::from(role != "user"), content.as_deref()))
        .collect();
    conv.get_prompt(case.system.as_deref(), &messages)
}

/// minijinja set up like transformers' chat-template environment.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env
}

fn render(
    env: &Environment<'_>,
    source: &str,
    system: Option<&str>,
    messages: &[(String, Option<String>)],
) -> String {
    let mut msgs = Vec::new();
    if let Some(system) = system {
        msgs.push(context! { role => "system", content => system });
    }
    let mut add_generation_prompt = false;
    for (i, (role, content)) in messages.iter().enumerate() {
        match content {
            Some(content) => msgs.push(context! { role => role, content => content }),
            None => {
                // FastChat's trailing `None` is what add_generation_prompt asks for.
                assert_eq!(i, messages.len() - 1, "only the last turn may be open");
                assert_eq!(role, "assistant");
                add_generation_prompt = true;
            }
        }
    }
    env.render_str(source, context! { messages => JinjaValue::from_serialize(&msgs), add_generation_prompt })
        .unwrap_or_else(|e| panic!("render failed: {e:#}\n{source}"))
}

#[test]
fn every_template_has_fastchat_data() {
    let recorded: BTreeSet<String> = cases().into_iter().map(|c| c.template).collect();
    let carried: BTreeSet<String> = template_names().into_iter().map(str::to_string).collect();
    assert_eq!(recorded, carried);
    assert_eq!(carried.len(), 85, "fschat 0.2.36's 83 templates and FastChat main's llama-3, gemma");
}

#[test]
fn rust_get_prompt_equals_fastchat() {
    let mut failures = Vec::new();
    for case in cases() {
        let got = rust_prompt(&case);
        if got != case.prompt {
            failures.push(format!(
                "{} ({}):\n  fastchat: {:?}\n  rust:     {:?}",
                case.template, case.label, case.prompt, got
            ));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn chat_template_jinja_equals_fastchat() {
    let env = environment();
    let mut failures = Vec::new();
    let mut rendered = 0;
    for case in cases() {
        let Some(prompt) = &case.prompt else {
            // No text prompt in FastChat: no chat template, and a reason to show.
            assert!(chat_template_jinja(&case.template).is_none(), "{}", case.template);
            assert!(no_chat_template_reason(&case.template).is_some(), "{}", case.template);
            continue;
        };
        let source = chat_template_jinja(&case.template)
            .unwrap_or_else(|| panic!("no chat template for {}", case.template));
        let got = render(&env, &source, case.system.as_deref(), &case.messages);
        rendered += 1;
        if &got != prompt {
            failures.push(format!(
                "{} ({}):\n  fastchat: {:?}\n  jinja:    {:?}",
                case.template, case.label, prompt, got
            ));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    // 80 templates with a text prompt, every recorded conversation.
    assert_eq!(rendered, 80 * 7);
}

#[test]
fn jinja_without_generation_prompt_ends_after_last_message() {
    let env = environment();
    for name in template_names() {
        let conv = template(name).unwrap();
        let Some(source) = chat_template_jinja(name) else { continue };
        let messages = [
            ("user".to_string(), Some("Hi".to_string())),
            ("assistant".to_string(), Some("Hello".to_string())),
        ];
        let got = render(&env, &source, None, &messages);
        assert_eq!(Some(got), conv.get_prompt(None, &[(0, Some("Hi")), (1, Some("Hello"))]), "{name}");
    }
}

struct NameRecord {
    name: String,
    source: String,
    fastchat_adapter: String,
    fastchat_template: Option<String>,
    adapter: String,
    template: Option<String>,
}

fn names() -> Vec<NameRecord> {
    let data: Value = serde_json::from_str(NAMES).expect("fastchat_model_names.json parses");
    data["names"]
        .as_array()
        .expect("names")
        .iter()
        .map(|r| NameRecord {
            name: r["name"].as_str().unwrap().to_string(),
            source: r["source"].as_str().unwrap().to_string(),
            fastchat_adapter: r["fastchat_adapter"].as_str().unwrap().to_string(),
            fastchat_template: r["fastchat_template"].as_str().map(str::to_string),
            adapter: r["adapter"].as_str().unwrap().to_string(),
            template: r["template"].as_str().map(str::to_string),
        })
        .collect()
}

#[test]
fn every_recorded_name_picks_the_recorded_adapter_and_template() {
    let mut failures = Vec::new();
    for r in names() {
        let f = detect(&r.name, None);
        // PeftModelAdapter's template is its base model's; a bare name has none → one_shot.
        let want_template = r.template.as_deref().unwrap_or("one_shot");
        if (f.adapter, f.template) != (r.adapter.as_str(), want_template) {
            failures.push(format!(
                "{}: want {}/{want_template}, got {}/{}",
                r.name, r.adapter, f.adapter, f.template
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn model_registry_names_pick_fastchats_template() {
    let records = names();
    let registry: Vec<&NameRecord> = records.iter().filter(|r| r.source == "model_info").collect();
    assert!(registry.len() >= 150, "fschat 0.2.36's model_info has 157 names");
    let exceptions: Vec<String> = registry
        .iter()
        .filter(|r| r.fastchat_template.as_deref() != Some(detect(&r.name, None).template))
        .map(|r| r.name.clone())
        .collect();
    // README lists the exceptions (none with fschat 0.2.36).
    assert!(exceptions.is_empty(), "{exceptions:?}");
    // Where llmfs differs from 0.2.36 at all, it is FastChat main's two later adapters.
    for r in &records {
        if r.adapter != r.fastchat_adapter {
            assert!(["Llama3Adapter", "GemmaAdapter"].contains(&r.adapter.as_str()), "{}", r.name);
            assert_eq!(r.fastchat_adapter, "BaseModelAdapter", "{}", r.name);
        }
    }
    // Every adapter but the shadowed Lamma2ChineseAlpacaAdapter is some name's.
    let claimed: BTreeSet<&str> = records.iter().map(|r| r.adapter.as_str()).collect();
    for (adapter, _) in llmfs::adapter::adapter_names() {
        assert!(claimed.contains(adapter) || adapter == "Lamma2ChineseAlpacaAdapter", "{adapter}");
    }
}

/// A Python with fschat 0.2.36's `fastchat.conversation` importable: `LLMFS_FASTCHAT_PYTHON`,
/// else `python3`.
fn fastchat_python() -> Option<String> {
    let python = std::env::var("LLMFS_FASTCHAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import fastchat, fastchat.conversation; assert fastchat.__version__ == '0.2.36'"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

#[test]
fn fastchat_itself_agrees() {
    let Some(python) = fastchat_python() else {
        eprintln!("SKIPPED fastchat_itself_agrees: fschat==0.2.36 is not importable (see .ci/run)");
        return;
    };
    // Names and prompts, from the installed FastChat, now.
    let script = r#"
import json, sys
import fastchat.conversation as c
real_stdout, sys.stdout = sys.stdout, sys.stderr  # MPTAdapter prints a warning
out = {"names": None, "prompts": {}}
try:
    # Imports torch and transformers at module level.
    import fastchat.model.model_adapter as m
    from fastchat.model.model_registry import model_info
except ImportError as e:
    out["why"] = repr(e)
else:
    out["names"] = {}
    for r in json.load(open(sys.argv[1]))["names"]:
        try:
            t = m.get_conversation_template(r["name"]).name
        except ImportError:
            t = None  # PeftModelAdapter wants peft and the adapter's config
        out["names"][r["name"]] = [type(m.get_model_adapter(r["name"])).__name__, t]
    out["registry"] = sorted(model_info)
data = json.load(open(sys.argv[2]))
for name, conv in c.conv_templates.items():
    prompts = []
    for case in data["conversations"]:
        x = conv.copy()
        if case["system"] is not None:
            x.set_system_message(case["system"])
        for msg in case["messages"]:
            x.append_message(x.roles[0] if msg["role"] == "user" else x.roles[1], msg["content"])
        prompts.append(None if conv.sep_style is None else x.get_prompt())
    out["prompts"][name] = prompts
json.dump(out, real_stdout)
"#;
    let dir = env!("CARGO_MANIFEST_DIR");
    let o = Command::new(&python)
        .args([
            "-c",
            script,
            &format!("{dir}/tests/data/fastchat_model_names.json"),
            &format!("{dir}/tests/data/fastchat_prompts.json"),
        ])
        .output()
        .expect("python runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let live: Value = serde_json::from_slice(&o.stdout).expect("json from python");

    let mut checked = 0;
    for case in cases() {
        let Some(live_prompts) = live["prompts"].get(&case.template) else { continue };
        let i = case_index(&case);
        assert_eq!(
            live_prompts[i].as_str().map(str::to_string),
            rust_prompt(&case),
            "{} ({})",
            case.template,
            case.label
        );
        checked += 1;
    }
    assert_eq!(checked, 83 * 7, "every fschat 0.2.36 template, every conversation");

    if live["names"].is_null() {
        eprintln!("SKIPPED the adapter half: fastchat.model does not import ({})", live["why"]);
        return;
    }
    let records = names();
    let registry: BTreeSet<&str> =
        records.iter().filter(|r| r.source == "model_info").map(|r| r.name.as_str()).collect();
    let live_registry: BTreeSet<&str> =
        live["registry"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(registry, live_registry, "model_info changed: rerun scripts/gen_fastchat_tables.py");
    for r in &records {
        let [adapter, tmpl] = [&live["names"][&r.name][0], &live["names"][&r.name][1]];
        assert_eq!(adapter.as_str(), Some(r.fastchat_adapter.as_str()), "{}", r.name);
        assert_eq!(tmpl.as_str(), r.fastchat_template.as_deref(), "{}", r.name);
        if r.adapter == r.fastchat_adapter {
            let f = detect(&r.name, None);
            assert_eq!(f.adapter, adapter.as_str().unwrap(), "{}", r.name);
            if let Some(t) = tmpl.as_str() {
                assert_eq!(f.template, t, "{}", r.name);
            }
        }
    }
}

fn case_index(case: &Case) -> usize {
    let data: Value = serde_json::from_str(PROMPTS).unwrap();
    data["conversations"].as_array().unwrap().iter().position(|c| c["case"] == case.label.as_str()).unwrap()
}

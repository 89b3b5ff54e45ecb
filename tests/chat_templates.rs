//! The conversation templates against FastChat itself.
//!
//! `tests/data/fastchat_prompts.json` holds the prompts FastChat's own `get_prompt()` builds
//! (fschat 0.2.36; `llama-3` and `gemma` from FastChat's main-branch definitions), written by
//! `scripts/fastchat_templates.py`. For every template and every recorded case this test
//! checks both Rust renderings against it:
//! (a) `Conversation::get_prompt`, the port of FastChat's method;
//! (b) `chat_template_jinja` rendered with minijinja the way transformers'
//!     `apply_chat_template` renders a chat template (messages as {role, content}, the system
//!     message as a leading `system` message, `add_generation_prompt` when the last turn is
//!     the model's to write, `trim_blocks` and `lstrip_blocks` on).
//! Equality is exact for every template and case; nothing needed relaxing.

use std::collections::BTreeSet;

use llmfs::adapter::{chat_template_jinja, template, template_names};
use minijinja::{context, Environment, Value as JinjaValue};
use serde_json::Value;

const DATA: &str = include_str!("data/fastchat_prompts.json");

struct Case {
    template: String,
    system: Option<String>,
    /// (role, content); content `None` is the open turn FastChat leaves for the model.
    messages: Vec<(String, Option<String>)>,
    prompt: String,
}

fn cases() -> Vec<Case> {
    let data: Value = serde_json::from_str(DATA).expect("fastchat_prompts.json parses");
    let mut out = Vec::new();
    for (name, entry) in data.as_object().expect("an object of templates") {
        let mut recorded = vec![entry];
        recorded.extend(entry["cases"].as_array().into_iter().flatten());
        for c in recorded {
            out.push(Case {
                template: name.clone(),
                system: c["system"].as_str().map(str::to_string),
                messages: c["messages"]
                    .as_array()
                    .expect("messages")
                    .iter()
                    .map(|m| {
                        (m["role"].as_str().unwrap().to_string(), m["content"].as_str().map(str::to_string))
                    })
                    .collect(),
                prompt: c["prompt"].as_str().expect("prompt").to_string(),
            });
        }
    }
    out
}

fn rust_prompt(case: &Case) -> String {
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

fn jinja_prompt(env: &Environment<'_>, case: &Case) -> String {
    let source = chat_template_jinja(&case.template)
        .unwrap_or_else(|| panic!("no chat template for {}", case.template));
    let mut messages = Vec::new();
    if let Some(system) = &case.system {
        messages.push(context! { role => "system", content => system });
    }
    let mut add_generation_prompt = false;
    for (i, (role, content)) in case.messages.iter().enumerate() {
        match content {
            Some(content) => messages.push(context! { role => role, content => content }),
            None => {
                // FastChat's trailing `None` is what add_generation_prompt asks for.
                assert_eq!(i, case.messages.len() - 1, "{}: only the last turn may be open", case.template);
                assert_eq!(role, "assistant");
                add_generation_prompt = true;
            }
        }
    }
    env.render_str(
        &source,
        context! { messages => JinjaValue::from_serialize(&messages), add_generation_prompt },
    )
    .unwrap_or_else(|e| panic!("{}: render failed: {e:#}", case.template))
}

#[test]
fn every_carried_template_has_fastchat_data() {
    let recorded: BTreeSet<String> = cases().into_iter().map(|c| c.template).collect();
    let carried: BTreeSet<String> = template_names().into_iter().map(str::to_string).collect();
    assert_eq!(recorded, carried);
    for required in [
        "vicuna_v1.1",
        "llama-2",
        "mistral",
        "zephyr",
        "alpaca",
        "koala_v1",
        "dolly_v2",
        "qwen-7b-chat",
        "TinyLlama",
        "openchat_3.5",
        "deepseek-chat",
        "orca-2",
        "falcon",
        "one_shot",
        "llama-3",
        "gemma",
    ] {
        assert!(carried.contains(required), "{required}");
    }
}

#[test]
fn rust_get_prompt_equals_fastchat() {
    let mut failures = Vec::new();
    for case in cases() {
        let got = rust_prompt(&case);
        if got != case.prompt {
            failures.push(format!(
                "{} (system {:?}):\n  fastchat: {:?}\n  rust:     {:?}",
                case.template, case.system, case.prompt, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn chat_template_jinja_equals_fastchat() {
    let env = environment();
    let mut failures = Vec::new();
    for case in cases() {
        let got = jinja_prompt(&env, &case);
        if got != case.prompt {
            failures.push(format!(
                "{} (system {:?}):\n  fastchat: {:?}\n  jinja:    {:?}",
                case.template, case.system, case.prompt, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn jinja_without_generation_prompt_ends_after_last_message() {
    let env = environment();
    for name in template_names() {
        let conv = template(name).unwrap();
        let source = chat_template_jinja(name).unwrap();
        let messages = vec![
            context! { role => "user", content => "Hi" },
            context! { role => "assistant", content => "Hello" },
        ];
        let got = env
            .render_str(&source, context! { messages => JinjaValue::from_serialize(&messages), add_generation_prompt => false })
            .unwrap();
        assert_eq!(got, conv.get_prompt(None, &[(0, Some("Hi")), (1, Some("Hello"))]), "{name}");
    }
}

#[test]
fn jinja_with_no_messages_is_the_system_block() {
    let env = environment();
    for name in template_names() {
        let conv = template(name).unwrap();
        let source = chat_template_jinja(name).unwrap();
        let got = env
            .render_str(
                &source,
                context! { messages => Vec::<JinjaValue>::new(), add_generation_prompt => false },
            )
            .unwrap();
        assert_eq!(got, conv.get_prompt(None, &[]), "{name}");
    }
}

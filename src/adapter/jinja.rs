//! A conversation template as a Hugging Face `chat_template` (the Jinja string that
//! `tokenizer.apply_chat_template` renders).
//!
//! Why: loaders newer than FastChat (transformers, vLLM, TGI) read the prompt format from
//! `tokenizer_config.json`'s `chat_template`. Older checkpoints (Vicuna, Koala, Alpaca,
//! Dolly, ...) ship none, so llmfs writes one that renders exactly what FastChat's
//! `get_prompt()` would, and the same model prompts the same under either loader.
//!
//! The template is generated from the `Conversation` fields, one emitter per `SepStyle`,
//! mirroring `Conversation::message_part`. Design choices, each for portability:
//! - every string is a quoted Jinja literal inside `{{ }}` and nothing stands between tags,
//!   so `trim_blocks`/`lstrip_blocks` (which transformers turns on) change nothing;
//! - no `bos_token`/`eos_token` or other caller-supplied variables: FastChat writes its
//!   special tokens as text (`</s>`, `<|im_end|>`, `<bos>`), so the template does too;
//! - a leading `system` message replaces the default system message, as
//!   `set_system_message` does; without one the default is used;
//! - a message's role picks the role string (`user` → `roles[0]`, else `roles[1]`). FastChat
//!   picks by position; the two agree for the alternating user/assistant conversations
//!   chat templates are given;
//! - an empty content renders like FastChat's `None` (its `if message:`), and
//!   `add_generation_prompt` appends the open assistant turn.

use super::conversation::{Conversation, SepStyle, SYSTEM_PLACEHOLDER};
use super::templates::template;

/// The chat template for FastChat template `template_name`, or `None` if llmfs does not
/// carry that template.
pub fn chat_template_jinja(template_name: &str) -> Option<String> {
    template(template_name).map(render)
}

/// A Jinja string literal for `s`: single-quoted with backslash escapes, which both Jinja2
/// (Python) and minijinja decode back to `s`. Non-ASCII text is kept as is.
fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `{{ a + b + ... }}` over Jinja expressions, empty literals dropped.
fn out(parts: &[String]) -> String {
    let parts: Vec<&str> = parts.iter().map(String::as_str).filter(|p| *p != "''").collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{{ {} }}}}", parts.join(" + "))
    }
}

fn render(conv: &Conversation) -> String {
    let mut t = String::new();
    // The system message: the first message's content when its role is `system`.
    t.push_str("{% set has_system = messages | length > 0 and messages[0]['role'] == 'system' %}");
    t.push_str(&format!(
        "{{% set system_message = messages[0]['content'] if has_system else {} %}}",
        lit(conv.system_message)
    ));
    t.push_str("{% set loop_messages = messages[1:] if has_system else messages %}");
    t.push_str(&system_block(conv));

    // FastChat's few-shot examples are fixed text: render them here, once, in Rust.
    let examples: String = conv
        .examples
        .iter()
        .enumerate()
        .map(|(i, &(role, text))| conv.message_part(i, role, Some(text)))
        .collect();
    t.push_str(&out(&[lit(&examples)]));

    let offset = conv.examples.len();
    t.push_str("{% for message in loop_messages %}");
    t.push_str("{% if message['role'] == 'user' %}");
    t.push_str(&message_block(conv, 0, offset));
    t.push_str("{% else %}");
    t.push_str(&message_block(conv, 1, offset));
    t.push_str("{% endif %}{% endfor %}");
    t.push_str("{% if add_generation_prompt %}");
    t.push_str(&out(&open_turn(conv, 1)));
    t.push_str("{% endif %}");
    t
}

/// Jinja for `Conversation::system_part`, with `system_message` a template variable.
fn system_block(conv: &Conversation) -> String {
    let (prefix, suffix) =
        conv.system_template.split_once(SYSTEM_PLACEHOLDER).unwrap_or((conv.system_template, ""));
    let system_prompt = [lit(prefix), "system_message".to_string(), lit(suffix)];
    let with = |extra: &[String]| {
        let mut parts = system_prompt.to_vec();
        parts.extend_from_slice(extra);
        out(&parts)
    };
    let if_set = |body: String| format!("{{% if system_message %}}{body}{{% endif %}}");
    match conv.sep_style {
        SepStyle::AddColonSingle | SepStyle::AddColonTwo => with(&[lit(conv.sep)]),
        SepStyle::Llama2 => format!(
            "{{% if system_message %}}{}{{% else %}}{}{{% endif %}}",
            with(&[]),
            out(&[lit("[INST] ")])
        ),
        SepStyle::Llama3 => out(&[lit("<|begin_of_text|>")]) + &if_set(with(&[])),
        SepStyle::ChatMl => {
            let block = with(&[lit(conv.sep), lit("\n")]);
            // FastChat skips the block only when the *formatted* system prompt is empty.
            if prefix.is_empty() && suffix.is_empty() {
                if_set(block)
            } else {
                block
            }
        }
        SepStyle::Dolly | SepStyle::Rwkv | SepStyle::DeepseekChat => with(&[]),
        SepStyle::FalconChat => if_set(with(&[lit(conv.sep)])),
        SepStyle::Gemma => out(&[lit("<bos>")]),
    }
}

/// Jinja for one message of role index `k` (see `Conversation::message_part`): the full
/// turn when its content is non-empty, the open turn otherwise.
fn message_block(conv: &Conversation, k: usize, offset: usize) -> String {
    let content = "message['content']".to_string();
    let role = lit(conv.roles[k]);
    let sep_k = lit(if k == 0 { conv.sep } else { conv.sep2 });
    let full = match conv.sep_style {
        SepStyle::AddColonSingle | SepStyle::FalconChat => out(&[role, lit(": "), content, lit(conv.sep)]),
        SepStyle::AddColonTwo | SepStyle::DeepseekChat => out(&[role, lit(": "), content, sep_k]),
        SepStyle::Llama2 => {
            let later = out(&[role, lit(" "), content.clone(), sep_k]);
            if offset == 0 {
                // FastChat's `i == 0`: the first turn continues the `[INST]` block.
                format!("{{% if loop.first %}}{}{{% else %}}{later}{{% endif %}}", out(&[content, lit(" ")]))
            } else {
                later
            }
        }
        SepStyle::Llama3 => out(&[
            lit("<|start_header_id|>"),
            role,
            lit("<|end_header_id|>\n\n"),
            "message['content'] | trim".to_string(),
            lit("<|eot_id|>"),
        ]),
        SepStyle::ChatMl => out(&[role, lit("\n"), content, lit(conv.sep), lit("\n")]),
        SepStyle::Dolly => {
            let tail = if k == 1 { "\n\n" } else { "" };
            out(&[role, lit(":\n"), content, sep_k, lit(tail)])
        }
        SepStyle::Rwkv => out(&[
            role,
            lit(": "),
            "(message['content'] | replace('\\r\\n', '\\n') | replace('\\n\\n', '\\n'))".to_string(),
            lit("\n\n"),
        ]),
        SepStyle::Gemma => out(&[lit("<start_of_turn>"), role, lit("\n"), content, lit(conv.sep)]),
    };
    format!("{{% if message['content'] %}}{full}{{% else %}}{}{{% endif %}}", out(&open_turn(conv, k)))
}

/// The Jinja parts of an open turn of role index `k` (FastChat's `None` message).
fn open_turn(conv: &Conversation, k: usize) -> Vec<String> {
    let role = lit(conv.roles[k]);
    match conv.sep_style {
        SepStyle::AddColonSingle
        | SepStyle::AddColonTwo
        | SepStyle::FalconChat
        | SepStyle::DeepseekChat
        | SepStyle::Rwkv => vec![role, lit(":")],
        SepStyle::Llama2 => vec![role],
        SepStyle::Llama3 => vec![lit("<|start_header_id|>"), role, lit("<|end_header_id|>\n\n")],
        SepStyle::ChatMl => vec![role, lit("\n")],
        SepStyle::Dolly => vec![role, lit(":\n")],
        SepStyle::Gemma => vec![lit("<start_of_turn>"), role, lit("\n")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::template_names;

    #[test]
    fn literals_escape_what_jinja_would_misread() {
        assert_eq!(lit("a'b\\c\nd\re"), "'a\\'b\\\\c\\nd\\re'");
        assert_eq!(lit("<｜end▁of▁sentence｜>"), "'<｜end▁of▁sentence｜>'");
    }

    /// True when `t` is nothing but `{{ }}` and `{% %}` tags (quotes skipped).
    fn only_tags(t: &str) -> bool {
        let b = t.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let close = match b.get(i..i + 2) {
                Some(b"{{") => b"}}",
                Some(b"{%") => b"%}",
                _ => return false,
            };
            i += 2;
            let mut quote = None;
            loop {
                match (b.get(i), quote) {
                    (None, _) => return false,
                    (Some(b'\\'), Some(_)) => i += 1,
                    (Some(&c), Some(q)) if c == q => quote = None,
                    (Some(&c), None) if c == b'\'' || c == b'"' => quote = Some(c),
                    (Some(_), None) if b[i..].starts_with(close) => break,
                    _ => {}
                }
                i += 1;
            }
            i += 2;
        }
        true
    }

    #[test]
    fn every_template_is_tags_only_and_needs_no_special_tokens() {
        for name in template_names() {
            let t = chat_template_jinja(name).unwrap();
            // Text between tags would be at the mercy of trim_blocks/lstrip_blocks.
            assert!(only_tags(&t), "{name}: {t}");
            assert!(!t.contains("bos_token") && !t.contains("eos_token"), "{name}");
        }
        assert!(!only_tags("{{ 'a' }}\n"));
        assert!(chat_template_jinja("no-such-template").is_none());
    }
}

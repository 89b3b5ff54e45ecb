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
//! - a message's role picks the role string (`user` → `roles[0]`, else `roles[1]`), as
//!   FastChat's OpenAI-compatible server appends them; what FastChat decides by position
//!   (`seps[i % 2]`, LLAMA2's tags, ChatGLM's rounds, InternLM's `<s>`) is decided by the
//!   position here too, few-shot examples counted;
//! - an empty content renders like FastChat's `None` (its `if message:`), and
//!   `add_generation_prompt` appends the open assistant turn;
//! - the templates FastChat has no text prompt for (`SepStyle::NoPrompt`: the API models'
//!   chatgpt, pplxai, bard, gemini, steerlm) get no chat template at all: a loader then
//!   uses the model's own or fails loudly, never a made-up one.

use super::conversation::{Conversation, SepStyle, SYSTEM_PLACEHOLDER};
use super::templates::template;

/// The chat template for FastChat template `template_name`; `None` if llmfs does not carry
/// that template or FastChat has no text prompt for it (see `no_chat_template_reason`).
pub fn chat_template_jinja(template_name: &str) -> Option<String> {
    template(template_name).and_then(render)
}

/// Why `template_name` gets no chat template (`None` when it gets one).
pub fn no_chat_template_reason(template_name: &str) -> Option<&'static str> {
    match template(template_name) {
        None => Some("llmfs does not carry this template"),
        Some(c) if c.sep_style == SepStyle::NoPrompt => Some(
            "FastChat has no text prompt for it: sep_style None, an API model's template, sent as a message list",
        ),
        Some(_) => None,
    }
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

/// `a + b + ...` over Jinja expressions, empty literals dropped (`''` when nothing is left).
fn concat(parts: &[String]) -> String {
    let parts: Vec<&str> = parts.iter().map(String::as_str).filter(|p| *p != "''").collect();
    if parts.is_empty() {
        "''".to_string()
    } else {
        parts.join(" + ")
    }
}

/// `{{ a + b + ... }}`, or nothing when every part is an empty literal.
fn out(parts: &[String]) -> String {
    match concat(parts).as_str() {
        "''" => String::new(),
        expr => format!("{{{{ {expr} }}}}"),
    }
}

/// FastChat's `x[i % 2]`-style choice by position: `even` at even `idx`, else `odd`.
fn by_parity(idx: &str, even: String, odd: String) -> String {
    if even == odd {
        even
    } else {
        format!("({even} if {idx} % 2 == 0 else {odd})")
    }
}

/// The system prompt (`system_template.format(system_message=...)`) as Jinja parts, and
/// whether FastChat's `system_prompt == ""` can hold: `None` never, `Some(cond)` exactly
/// when the Jinja condition `cond` fails.
fn system_prompt_parts(conv: &Conversation) -> (Vec<String>, Option<&'static str>) {
    let pieces: Vec<&str> = conv.system_template.split(SYSTEM_PLACEHOLDER).collect();
    let mut parts = Vec::new();
    for (n, piece) in pieces.iter().enumerate() {
        if n > 0 {
            parts.push("system_message".to_string());
        }
        parts.push(lit(piece));
    }
    let fixed_text = pieces.iter().any(|p| !p.is_empty());
    let nonempty = if fixed_text {
        None
    } else if pieces.len() > 1 {
        Some("system_message")
    } else {
        Some("false")
    };
    (parts, nonempty)
}

fn render(conv: &Conversation) -> Option<String> {
    if conv.sep_style == SepStyle::NoPrompt {
        return None;
    }
    let mut t = String::new();
    // The system message: the first message's content when its role is `system`.
    t.push_str("{% set has_system = messages | length > 0 and messages[0]['role'] == 'system' %}");
    t.push_str(&format!(
        "{{% set system_message = messages[0]['content'] if has_system else {} %}}",
        lit(conv.system_message)
    ));
    t.push_str("{% set loop_messages = messages[1:] if has_system else messages %}");

    // FastChat's few-shot examples are fixed text: render them here, once, in Rust.
    let examples: String = conv
        .examples
        .iter()
        .enumerate()
        .map(|(i, &(role, text))| conv.message_part(i, role, Some(text)))
        .collect();
    let offset = conv.examples.len();
    let loop_idx = if offset == 0 { "loop.index0".to_string() } else { format!("(loop.index0 + {offset})") };
    let next_idx = format!("((loop_messages | length) + {offset})");

    if conv.sep_style == SepStyle::Yuan2 {
        t.push_str(&yuan2(conv, &examples));
        return Some(t);
    }
    t.push_str(&system_block(conv));
    t.push_str(&out(&[lit(&examples)]));
    t.push_str("{% for message in loop_messages %}");
    t.push_str("{% if message['role'] == 'user' %}");
    t.push_str(&message_block(conv, 0, &loop_idx, offset));
    t.push_str("{% else %}");
    t.push_str(&message_block(conv, 1, &loop_idx, offset));
    t.push_str("{% endif %}{% endfor %}");
    t.push_str("{% if add_generation_prompt %}");
    t.push_str(&out(&open_turn(conv, 1, &next_idx)));
    t.push_str("{% endif %}");
    Some(t)
}

/// YUAN2 ends with `ret.rstrip("<n>") + sep`: the prompt is built in a namespace first,
/// then stripped with `trim` (behind a `|` guard, as `trim` takes both ends) and sliced.
fn yuan2(conv: &Conversation, examples: &str) -> String {
    let (sp, _) = system_prompt_parts(conv);
    let mut t = format!("{{% set ns = namespace(s={}) %}}", lit(""));
    let mut system = sp;
    system.push(lit(conv.sep2));
    t.push_str(&format!("{{% if system_message %}}{{% set ns.s = {} %}}{{% endif %}}", concat(&system)));
    if !examples.is_empty() {
        t.push_str(&format!("{{% set ns.s = ns.s + {} %}}", lit(examples)));
    }
    t.push_str("{% for message in loop_messages %}{% if message['content'] %}");
    t.push_str("{% set ns.s = ns.s + message['content'] + '<n>' %}");
    t.push_str("{% endif %}{% endfor %}");
    t.push_str(&format!("{{{{ ((('|' + ns.s) | trim('<n>'))[1:]) + {} }}}}", lit(conv.sep)));
    t
}

/// Jinja for `Conversation::system_part`, with `system_message` a template variable.
fn system_block(conv: &Conversation) -> String {
    let (sp, nonempty) = system_prompt_parts(conv);
    let with = |extra: &[String]| {
        let mut parts = sp.clone();
        parts.extend_from_slice(extra);
        out(&parts)
    };
    let if_set = |body: String| format!("{{% if system_message %}}{body}{{% endif %}}");
    // FastChat's `"" if system_prompt == "" else ...`.
    let unless_empty = |body: String| match nonempty {
        None => body,
        Some(cond) => format!("{{% if {cond} %}}{body}{{% endif %}}"),
    };
    let sep = lit(conv.sep);
    match conv.sep_style {
        SepStyle::AddColonSingle
        | SepStyle::AddColonTwo
        | SepStyle::AddColonSpaceSingle
        | SepStyle::Robin => with(&[sep]),
        SepStyle::NoColonSingle
        | SepStyle::NoColonTwo
        | SepStyle::Rwkv
        | SepStyle::Chatintern
        | SepStyle::Dolly
        | SepStyle::Phoenix
        | SepStyle::DeepseekChat => with(&[]),
        SepStyle::AddNewLineSingle | SepStyle::Chatglm | SepStyle::Metamath => unless_empty(with(&[sep])),
        SepStyle::Chatml => unless_empty(with(&[sep, lit("\n")])),
        SepStyle::Llama2 => format!(
            "{{% if system_message %}}{}{{% else %}}{}{{% endif %}}",
            with(&[]),
            out(&[lit("[INST] ")])
        ),
        SepStyle::FalconChat => if_set(with(&[sep])),
        SepStyle::Chatglm3 => if_set(with(&[])),
        SepStyle::Llama3 => out(&[lit("<|begin_of_text|>")]) + &if_set(with(&[])),
        SepStyle::Gemma => out(&[lit("<bos>")]),
        SepStyle::Yuan2 | SepStyle::NoPrompt => unreachable!("rendered elsewhere"),
    }
}

/// Jinja for one message of role index `k` at position `idx` (a Jinja expression; see
/// `Conversation::message_part`): the full turn when its content is non-empty, the open
/// turn otherwise. `offset` is the number of examples before the first message.
fn message_block(conv: &Conversation, k: usize, idx: &str, offset: usize) -> String {
    let content = "message['content']".to_string();
    let role = lit(conv.roles[k]);
    let sep = lit(conv.sep);
    let sep_i = by_parity(idx, lit(conv.sep), lit(conv.sep2));
    let full = match conv.sep_style {
        SepStyle::AddColonSingle | SepStyle::AddColonSpaceSingle | SepStyle::FalconChat => {
            out(&[role, lit(": "), content, sep])
        }
        SepStyle::AddColonTwo | SepStyle::DeepseekChat => out(&[role, lit(": "), content, sep_i]),
        SepStyle::NoColonSingle => out(&[role, content, sep]),
        SepStyle::NoColonTwo => out(&[role, content, sep_i]),
        SepStyle::AddNewLineSingle => out(&[role, lit("\n"), content, sep]),
        SepStyle::Llama2 => {
            let tag = by_parity(idx, lit(conv.roles[0]), lit(conv.roles[1]));
            let later = out(&[tag, lit(" "), content.clone(), sep_i]);
            if offset == 0 {
                // FastChat's `i == 0`: the first turn continues the `[INST]` block.
                format!("{{% if loop.first %}}{}{{% else %}}{later}{{% endif %}}", out(&[content, lit(" ")]))
            } else {
                later
            }
        }
        SepStyle::Chatglm => {
            let mut parts = vec![chatglm_round(conv, idx)];
            parts.extend([role, lit("："), content, sep]);
            out(&parts)
        }
        SepStyle::Chatml => out(&[role, lit("\n"), content, sep, lit("\n")]),
        SepStyle::Chatintern => {
            out(&[by_parity(idx, lit("<s>"), lit("")), role, lit(":"), content, sep_i, lit("\n")])
        }
        SepStyle::Dolly => out(&[role, lit(":\n"), content, sep_i, by_parity(idx, lit(""), lit("\n\n"))]),
        SepStyle::Rwkv => out(&[
            role,
            lit(": "),
            "(message['content'] | replace('\\r\\n', '\\n') | replace('\\n\\n', '\\n'))".to_string(),
            lit("\n\n"),
        ]),
        SepStyle::Phoenix => out(&[role, lit(": <s>"), content, lit("</s>")]),
        SepStyle::Robin => out(&[role, lit(":\n"), content, sep]),
        SepStyle::Chatglm3 => out(&[role, lit("\n"), content]),
        SepStyle::Metamath => {
            let (start, end) = metamath_seps(conv, idx);
            out(&[role, start, content, end])
        }
        SepStyle::Llama3 => out(&[
            lit("<|start_header_id|>"),
            role,
            lit("<|end_header_id|>\n\n"),
            "(message['content'] | trim)".to_string(),
            lit("<|eot_id|>"),
        ]),
        SepStyle::Gemma => out(&[lit("<start_of_turn>"), role, lit("\n"), content, sep]),
        SepStyle::Yuan2 | SepStyle::NoPrompt => unreachable!("rendered elsewhere"),
    };
    format!("{{% if message['content'] %}}{full}{{% else %}}{}{{% endif %}}", out(&open_turn(conv, k, idx)))
}

/// CHATGLM's `[Round n]{sep}` before every even position.
fn chatglm_round(conv: &Conversation, idx: &str) -> String {
    let round =
        format!("('[Round ' ~ ({idx} // 2 + {}) ~ ']' + {})", conv.chatglm_round_offset(), lit(conv.sep));
    by_parity(idx, round, lit(""))
}

/// METAMATH's (starting, ending) separators by position.
fn metamath_seps(conv: &Conversation, idx: &str) -> (String, String) {
    (by_parity(idx, lit(":\n"), lit(&format!(": {}", conv.sep2))), by_parity(idx, lit(conv.sep), lit("")))
}

/// The Jinja parts of an open turn of role index `k` at position `idx` (FastChat's `None`
/// message).
fn open_turn(conv: &Conversation, k: usize, idx: &str) -> Vec<String> {
    let role = lit(conv.roles[k]);
    match conv.sep_style {
        SepStyle::AddColonSingle
        | SepStyle::AddColonTwo
        | SepStyle::FalconChat
        | SepStyle::DeepseekChat
        | SepStyle::Rwkv => vec![role, lit(":")],
        SepStyle::AddColonSpaceSingle => vec![role, lit(": ")],
        SepStyle::NoColonSingle | SepStyle::NoColonTwo | SepStyle::Chatglm3 => vec![role],
        SepStyle::AddNewLineSingle | SepStyle::Chatml => vec![role, lit("\n")],
        SepStyle::Llama2 => vec![by_parity(idx, lit(conv.roles[0]), lit(conv.roles[1]))],
        SepStyle::Chatglm => vec![chatglm_round(conv, idx), role, lit("：")],
        SepStyle::Chatintern => vec![by_parity(idx, lit("<s>"), lit("")), role, lit(":")],
        SepStyle::Dolly | SepStyle::Robin => vec![role, lit(":\n")],
        SepStyle::Phoenix => vec![role, lit(": <s>")],
        SepStyle::Metamath => vec![role, metamath_seps(conv, idx).0],
        SepStyle::Llama3 => vec![lit("<|start_header_id|>"), role, lit("<|end_header_id|>\n\n")],
        SepStyle::Gemma => vec![lit("<start_of_turn>"), role, lit("\n")],
        SepStyle::Yuan2 | SepStyle::NoPrompt => vec![],
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
            let Some(t) = chat_template_jinja(name) else {
                assert!(no_chat_template_reason(name).is_some(), "{name}");
                continue;
            };
            assert!(no_chat_template_reason(name).is_none(), "{name}");
            // Text between tags would be at the mercy of trim_blocks/lstrip_blocks.
            assert!(only_tags(&t), "{name}: {t}");
            assert!(!t.contains("bos_token") && !t.contains("eos_token"), "{name}");
        }
        assert!(!only_tags("{{ 'a' }}\n"));
        assert!(chat_template_jinja("no-such-template").is_none());
    }
}

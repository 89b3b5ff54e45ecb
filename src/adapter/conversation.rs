//! FastChat's `Conversation` (fastchat/conversation.py), the part llmfs needs: a template's
//! fixed strings and `get_prompt()`.
//!
//! Why a port and not a lookup table of prompts: `llmfs info` shows what a model is prompted
//! with, and `jinja.rs` turns the same fields into a `chat_template`. Both must agree with
//! FastChat byte for byte, so the rendering rules live here once, branch by branch after
//! FastChat's `get_prompt()` (fschat 0.2.36; `Llama3` and `Gemma` after FastChat's main
//! branch), and `tests/chat_templates.rs` holds them to FastChat's own output.

/// FastChat's `SeparatorStyle`, restricted to the styles of the templates llmfs carries.
/// Each variant names the FastChat value it mirrors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SepStyle {
    /// `ADD_COLON_SINGLE`: `role: message{sep}`.
    AddColonSingle,
    /// `ADD_COLON_TWO`: `role: message{sep|sep2}`, alternating.
    AddColonTwo,
    /// `LLAMA2`: `[INST] ... [/INST]` with the system block folded into the first turn.
    Llama2,
    /// `LLAMA3` (FastChat main): header-delimited turns, messages stripped.
    Llama3,
    /// `CHATML`: `role\nmessage{sep}\n`.
    ChatMl,
    /// `DOLLY`: `role:\nmessage{sep|sep2}`, a blank line after each answer.
    Dolly,
    /// `RWKV`: `role: message\n\n` with blank lines inside messages folded.
    Rwkv,
    /// `FALCON_CHAT`: like `ADD_COLON_SINGLE` but the system block only when set.
    FalconChat,
    /// `DEEPSEEK_CHAT`: `role: message{sep|sep2}` after the bare system prompt.
    DeepseekChat,
    /// `GEMMA` (FastChat main): `<start_of_turn>role\nmessage{sep}`, no system message.
    Gemma,
}

/// One conversation template: FastChat's `Conversation` without its message history.
///
/// `examples` is FastChat's few-shot `messages[:offset]` (only `one_shot` has them): they are
/// part of every prompt, between the system block and the caller's messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub name: &'static str,
    /// Contains `{system_message}` where the system message goes.
    pub system_template: &'static str,
    /// The default system message.
    pub system_message: &'static str,
    pub roles: [&'static str; 2],
    /// Built-in example turns as (role index, text).
    pub examples: &'static [(usize, &'static str)],
    pub sep_style: SepStyle,
    pub sep: &'static str,
    /// FastChat's `None` is `""`: only the two-separator styles read it.
    pub sep2: &'static str,
    pub stop_str: &'static [&'static str],
    pub stop_token_ids: &'static [u32],
}

/// The placeholder FastChat's `system_template.format(system_message=...)` fills.
pub(crate) const SYSTEM_PLACEHOLDER: &str = "{system_message}";

impl Conversation {
    /// FastChat's `get_prompt()` after `set_system_message(system)` (when `Some`) and one
    /// `append_message(roles[role], text)` per item. `None` (or `""`, as FastChat's
    /// `if message:` treats it) marks the turn the model is to write: pass
    /// `(1, None)` last for a generation prompt.
    pub fn get_prompt(&self, system: Option<&str>, messages: &[(usize, Option<&str>)]) -> String {
        let system_message = system.unwrap_or(self.system_message);
        let mut ret = self.system_part(system_message);
        let examples = self.examples.iter().map(|&(role, text)| (role, Some(text)));
        for (i, (role, message)) in examples.chain(messages.iter().copied()).enumerate() {
            ret.push_str(&self.message_part(i, role, message));
        }
        ret
    }

    /// `system_template` with the message filled in (FastChat's `system_prompt`).
    pub(crate) fn system_prompt(&self, system_message: &str) -> String {
        self.system_template.replacen(SYSTEM_PLACEHOLDER, system_message, 1)
    }

    /// What `get_prompt()` emits before the first message, branch by branch.
    pub(crate) fn system_part(&self, system_message: &str) -> String {
        let system_prompt = self.system_prompt(system_message);
        match self.sep_style {
            SepStyle::AddColonSingle | SepStyle::AddColonTwo => system_prompt + self.sep,
            SepStyle::Llama2 => {
                if system_message.is_empty() {
                    "[INST] ".to_string()
                } else {
                    system_prompt
                }
            }
            SepStyle::Llama3 => {
                let mut ret = "<|begin_of_text|>".to_string();
                if !system_message.is_empty() {
                    ret.push_str(&system_prompt);
                }
                ret
            }
            SepStyle::ChatMl => {
                if system_prompt.is_empty() {
                    String::new()
                } else {
                    system_prompt + self.sep + "\n"
                }
            }
            SepStyle::Dolly | SepStyle::Rwkv | SepStyle::DeepseekChat => system_prompt,
            SepStyle::FalconChat => {
                if system_message.is_empty() {
                    String::new()
                } else {
                    system_prompt + self.sep
                }
            }
            SepStyle::Gemma => "<bos>".to_string(),
        }
    }

    /// What `get_prompt()` emits for message number `i` (examples included) of role index
    /// `role`; `None`/empty is the open turn.
    pub(crate) fn message_part(&self, i: usize, role: usize, message: Option<&str>) -> String {
        let role_name = self.roles[role % 2];
        // FastChat's `seps[i % 2]`.
        let sep_i = [self.sep, self.sep2][i % 2];
        let message = message.filter(|m| !m.is_empty());
        match (self.sep_style, message) {
            (SepStyle::AddColonSingle, Some(m)) | (SepStyle::FalconChat, Some(m)) => {
                format!("{role_name}: {m}{}", self.sep)
            }
            (SepStyle::AddColonTwo, Some(m)) | (SepStyle::DeepseekChat, Some(m)) => {
                format!("{role_name}: {m}{sep_i}")
            }
            (
                SepStyle::AddColonSingle
                | SepStyle::AddColonTwo
                | SepStyle::FalconChat
                | SepStyle::DeepseekChat
                | SepStyle::Rwkv,
                None,
            ) => format!("{role_name}:"),
            // LLAMA2 ignores the message's role: the tag alternates with the position.
            (SepStyle::Llama2, Some(m)) if i == 0 => format!("{m} "),
            (SepStyle::Llama2, Some(m)) => format!("{} {m}{sep_i}", self.roles[i % 2]),
            (SepStyle::Llama2, None) => self.roles[i % 2].to_string(),
            (SepStyle::Llama3, Some(m)) => {
                format!("<|start_header_id|>{role_name}<|end_header_id|>\n\n{}<|eot_id|>", python_strip(m))
            }
            (SepStyle::Llama3, None) => {
                format!("<|start_header_id|>{role_name}<|end_header_id|>\n\n")
            }
            (SepStyle::ChatMl, Some(m)) => format!("{role_name}\n{m}{}\n", self.sep),
            (SepStyle::ChatMl, None) => format!("{role_name}\n"),
            (SepStyle::Dolly, Some(m)) => {
                let tail = if i % 2 == 1 { "\n\n" } else { "" };
                format!("{role_name}:\n{m}{sep_i}{tail}")
            }
            (SepStyle::Dolly, None) => format!("{role_name}:\n"),
            (SepStyle::Rwkv, Some(m)) => {
                format!("{role_name}: {}\n\n", m.replace("\r\n", "\n").replace("\n\n", "\n"))
            }
            (SepStyle::Gemma, Some(m)) => format!("<start_of_turn>{role_name}\n{m}{}", self.sep),
            (SepStyle::Gemma, None) => format!("<start_of_turn>{role_name}\n"),
        }
    }
}

/// Python's `str.strip()` with no argument: `str::trim` plus the four ASCII separators
/// (U+001C..U+001F) Python counts as whitespace and Rust does not.
pub(crate) fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

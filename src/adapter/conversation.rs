//! FastChat's `Conversation` (fastchat/conversation.py), the part llmfs needs: a template's
//! fixed strings and `get_prompt()`.
//!
//! Why a port and not a lookup table of prompts: `llmfs info` shows what a model is prompted
//! with, and `jinja.rs` turns the same fields into a `chat_template`. Both must agree with
//! FastChat byte for byte, so the rendering rules live here once, branch by branch after
//! FastChat's `get_prompt()` (fschat 0.2.36; `Llama3` and `Gemma` after FastChat's main
//! branch), and `tests/chat_templates.rs` holds them to FastChat's own output.

/// FastChat's `SeparatorStyle`: every style of fschat 0.2.36, FastChat main's `LLAMA3` and
/// `GEMMA`, and `NoPrompt` for FastChat's `sep_style=None` (the API models' templates:
/// chatgpt, claude's siblings, bard, gemini, steerlm, whose `get_prompt()` raises because
/// FastChat sends them message lists, never a text prompt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SepStyle {
    /// `role: message{sep}`, open turn `role:`.
    AddColonSingle,
    /// `role: message{seps[i%2]}`.
    AddColonTwo,
    /// `role: message{sep}`, open turn `role: ` (with the space).
    AddColonSpaceSingle,
    /// `role{message}{sep}` after the bare system prompt.
    NoColonSingle,
    /// `role{message}{seps[i%2]}`.
    NoColonTwo,
    /// `role\nmessage{sep}`, the system block only when its text is not empty.
    AddNewLineSingle,
    /// `[INST] ... [/INST]` with the system block folded into the first turn.
    Llama2,
    /// `[Round n]` before each user turn, full-width colons.
    Chatglm,
    /// `role\nmessage{sep}\n`.
    Chatml,
    /// `<s>` before each user turn, `role:message{seps[i%2]}\n`.
    Chatintern,
    /// `role:\nmessage{seps[i%2]}`, a blank line after each answer.
    Dolly,
    /// `role: message\n\n` with blank lines inside messages folded.
    Rwkv,
    /// `role: <s>message</s>`.
    Phoenix,
    /// `role:\nmessage{sep}`.
    Robin,
    /// Like `AddColonSingle` but the system block only when a system message is set.
    FalconChat,
    /// `role\nmessage`, no separators.
    Chatglm3,
    /// `role: message{seps[i%2]}` after the bare system prompt.
    DeepseekChat,
    /// `role:\nmessage{sep}` for the user, `role: {sep2}message` for the answer.
    Metamath,
    /// Messages joined by `<n>` without roles, then `rstrip("<n>")` and `sep`.
    Yuan2,
    /// `LLAMA3` (FastChat main): header-delimited turns, messages stripped.
    Llama3,
    /// `GEMMA` (FastChat main): `<start_of_turn>role\nmessage{sep}`, no system message.
    Gemma,
    /// FastChat's `None`: there is no text prompt.
    NoPrompt,
}

/// One conversation template: FastChat's `Conversation` without its message history.
///
/// `examples` is FastChat's few-shot `messages[:offset]` (one_shot, baize, rwkv): they are
/// part of every prompt, between the system block and the caller's messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub name: &'static str,
    /// "fschat 0.2.36" or "FastChat main".
    pub origin: &'static str,
    /// Contains `{system_message}` where the system message goes.
    pub system_template: &'static str,
    /// The default system message.
    pub system_message: &'static str,
    /// FastChat's `roles`: two, except llama2-chinese's three (the third is never used).
    pub roles: &'static [&'static str],
    /// Built-in example turns as (role index, text).
    pub examples: &'static [(usize, &'static str)],
    pub sep_style: SepStyle,
    /// FastChat's `None` is `""` here.
    pub sep: &'static str,
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
    /// `(1, None)` last for a generation prompt. `None` for `SepStyle::NoPrompt`.
    pub fn get_prompt(&self, system: Option<&str>, messages: &[(usize, Option<&str>)]) -> Option<String> {
        if self.sep_style == SepStyle::NoPrompt {
            return None;
        }
        let system_message = system.unwrap_or(self.system_message);
        let mut ret = self.system_part(system_message);
        let examples = self.examples.iter().map(|&(role, text)| (role, Some(text)));
        for (i, (role, message)) in examples.chain(messages.iter().copied()).enumerate() {
            ret.push_str(&self.message_part(i, role, message));
        }
        if self.sep_style == SepStyle::Yuan2 {
            // `ret.rstrip("<n>") + seps[0]`: strips a *set* of characters, so a last message
            // ending in "n" loses it too, as in FastChat.
            ret.truncate(ret.trim_end_matches(['<', 'n', '>']).len());
            ret.push_str(self.sep);
        }
        Some(ret)
    }

    /// `system_template` with the message filled in (FastChat's `system_prompt`).
    pub(crate) fn system_prompt(&self, system_message: &str) -> String {
        self.system_template.replace(SYSTEM_PLACEHOLDER, system_message)
    }

    /// What `get_prompt()` emits before the first message, branch by branch.
    pub(crate) fn system_part(&self, system_message: &str) -> String {
        let system_prompt = self.system_prompt(system_message);
        let unless_empty =
            |s: &str, tail: &str| if s.is_empty() { String::new() } else { format!("{s}{tail}") };
        match self.sep_style {
            SepStyle::AddColonSingle
            | SepStyle::AddColonTwo
            | SepStyle::AddColonSpaceSingle
            | SepStyle::Robin => system_prompt + self.sep,
            SepStyle::NoColonSingle
            | SepStyle::NoColonTwo
            | SepStyle::Rwkv
            | SepStyle::Chatintern
            | SepStyle::Dolly
            | SepStyle::Phoenix
            | SepStyle::DeepseekChat => system_prompt,
            SepStyle::AddNewLineSingle | SepStyle::Chatglm | SepStyle::Metamath => {
                unless_empty(&system_prompt, self.sep)
            }
            SepStyle::Chatml => unless_empty(&system_prompt, &format!("{}\n", self.sep)),
            SepStyle::Llama2 => {
                if system_message.is_empty() {
                    "[INST] ".to_string()
                } else {
                    system_prompt
                }
            }
            SepStyle::FalconChat => {
                if system_message.is_empty() {
                    String::new()
                } else {
                    system_prompt + self.sep
                }
            }
            SepStyle::Chatglm3 => {
                if system_message.is_empty() {
                    String::new()
                } else {
                    system_prompt
                }
            }
            SepStyle::Yuan2 => {
                if system_message.is_empty() {
                    String::new()
                } else {
                    system_prompt + self.sep2
                }
            }
            SepStyle::Llama3 => {
                let mut ret = "<|begin_of_text|>".to_string();
                if !system_message.is_empty() {
                    ret.push_str(&system_prompt);
                }
                ret
            }
            SepStyle::Gemma => "<bos>".to_string(),
            SepStyle::NoPrompt => String::new(),
        }
    }

    /// ChatGLM's round numbers start at 1 for chatglm2 only (FastChat checks the name).
    pub(crate) fn chatglm_round_offset(&self) -> usize {
        usize::from(self.name == "chatglm2")
    }

    /// What `get_prompt()` emits for message number `i` (examples included) of role index
    /// `role`; `None`/empty is the open turn.
    pub(crate) fn message_part(&self, i: usize, role: usize, message: Option<&str>) -> String {
        let r = self.roles[role.min(1)];
        // FastChat's `seps[i % 2]`.
        let sep_i = [self.sep, self.sep2][i % 2];
        let message = message.filter(|m| !m.is_empty());
        match (self.sep_style, message) {
            (SepStyle::AddColonSingle | SepStyle::FalconChat, Some(m)) => format!("{r}: {m}{}", self.sep),
            (SepStyle::AddColonSpaceSingle, Some(m)) => format!("{r}: {m}{}", self.sep),
            (SepStyle::AddColonTwo | SepStyle::DeepseekChat, Some(m)) => format!("{r}: {m}{sep_i}"),
            (
                SepStyle::AddColonSingle
                | SepStyle::AddColonTwo
                | SepStyle::FalconChat
                | SepStyle::DeepseekChat
                | SepStyle::Rwkv,
                None,
            ) => format!("{r}:"),
            (SepStyle::AddColonSpaceSingle, None) => format!("{r}: "),
            (SepStyle::NoColonSingle, Some(m)) => format!("{r}{m}{}", self.sep),
            (SepStyle::NoColonTwo, Some(m)) => format!("{r}{m}{sep_i}"),
            (SepStyle::NoColonSingle | SepStyle::NoColonTwo, None) => r.to_string(),
            (SepStyle::AddNewLineSingle, Some(m)) => format!("{r}\n{m}{}", self.sep),
            (SepStyle::AddNewLineSingle | SepStyle::Chatml, None) => format!("{r}\n"),
            // LLAMA2 ignores the message's role: the tag alternates with the position.
            (SepStyle::Llama2, Some(m)) if i == 0 => format!("{m} "),
            (SepStyle::Llama2, Some(m)) => format!("{} {m}{sep_i}", self.roles[i % 2]),
            (SepStyle::Llama2, None) => self.roles[i % 2].to_string(),
            (SepStyle::Chatglm, m) => {
                let round = if i % 2 == 0 {
                    format!("[Round {}]{}", i / 2 + self.chatglm_round_offset(), self.sep)
                } else {
                    String::new()
                };
                match m {
                    Some(m) => format!("{round}{r}：{m}{}", self.sep),
                    None => format!("{round}{r}："),
                }
            }
            (SepStyle::Chatml, Some(m)) => format!("{r}\n{m}{}\n", self.sep),
            (SepStyle::Chatintern, m) => {
                let s = if i % 2 == 0 { "<s>" } else { "" };
                match m {
                    Some(m) => format!("{s}{r}:{m}{sep_i}\n"),
                    None => format!("{s}{r}:"),
                }
            }
            (SepStyle::Dolly, Some(m)) => {
                let tail = if i % 2 == 1 { "\n\n" } else { "" };
                format!("{r}:\n{m}{sep_i}{tail}")
            }
            (SepStyle::Dolly | SepStyle::Robin, None) => format!("{r}:\n"),
            (SepStyle::Rwkv, Some(m)) => {
                format!("{r}: {}\n\n", m.replace("\r\n", "\n").replace("\n\n", "\n"))
            }
            (SepStyle::Phoenix, Some(m)) => format!("{r}: <s>{m}</s>"),
            (SepStyle::Phoenix, None) => format!("{r}: <s>"),
            (SepStyle::Robin, Some(m)) => format!("{r}:\n{m}{}", self.sep),
            (SepStyle::Chatglm3, Some(m)) => format!("{r}\n{m}"),
            (SepStyle::Chatglm3, None) => r.to_string(),
            (SepStyle::Metamath, m) => {
                let (start, end) =
                    if i % 2 == 0 { (":\n".to_string(), self.sep) } else { (format!(": {}", self.sep2), "") };
                match m {
                    Some(m) => format!("{r}{start}{m}{end}"),
                    None => format!("{r}{start}"),
                }
            }
            (SepStyle::Yuan2, Some(m)) => format!("{m}<n>"),
            (SepStyle::Yuan2, None) => String::new(),
            (SepStyle::Llama3, Some(m)) => {
                format!("<|start_header_id|>{r}<|end_header_id|>\n\n{}<|eot_id|>", python_strip(m))
            }
            (SepStyle::Llama3, None) => format!("<|start_header_id|>{r}<|end_header_id|>\n\n"),
            (SepStyle::Gemma, Some(m)) => format!("<start_of_turn>{r}\n{m}{}", self.sep),
            (SepStyle::Gemma, None) => format!("<start_of_turn>{r}\n"),
            (SepStyle::NoPrompt, _) => String::new(),
        }
    }
}

/// Python's `str.strip()` with no argument: `str::trim` plus the four ASCII separators
/// (U+001C..U+001F) Python counts as whitespace and Rust does not.
pub(crate) fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

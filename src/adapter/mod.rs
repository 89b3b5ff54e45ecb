//! What llmfs knows about model families: FastChat's model_adapter.py and conversation.py,
//! rethought for a filesystem that serves models to unmodified loaders.
//!
//! - `detect` (detect.rs): which family a model is, from its name (FastChat's ordered adapter
//!   matches) or, failing that, its config.json; the family names its conversation template.
//! - `template` (templates.rs, conversation.rs): the conversation templates, with FastChat's
//!   names and strings, and a port of `Conversation.get_prompt()` (`llmfs info` shows it).
//! - `chat_template_jinja` (jinja.rs) and `tokenizer_config_with_template`
//!   (tokenizer_config.rs): the same template as a Hugging Face `chat_template`, written into
//!   tokenizer_config.json for models that ship none, so transformers/vLLM prompt a model the
//!   way FastChat does.
//! - `validate` (validate.rs): file-level pre-load checks for `llmfs check`.
//!
//! Nothing here touches weights or FUSE; everything is plain data and functions.

mod conversation;
mod detect;
mod jinja;
mod templates;
mod tokenizer_config;
mod validate;

pub use conversation::{Conversation, SepStyle};
pub use detect::{detect, Family, UNKNOWN};
pub use jinja::chat_template_jinja;
pub use templates::{template, template_names};
pub use tokenizer_config::{tokenizer_config_with_template, TokenizerConfigError};
pub use validate::validate;

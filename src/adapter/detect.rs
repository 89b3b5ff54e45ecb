//! Family detection: which FastChat adapter a model belongs to, hence its template.
//!
//! FastChat picks a `BaseModelAdapter` by running each registered adapter's `match()` on the
//! lowercased model path, first on its basename, then on the whole path, in registration
//! order (earlier wins), and falls back to `BaseModelAdapter` (template `one_shot`). llmfs
//! keeps that: `name_rules` is the ordered list of FastChat adapters whose templates llmfs
//! carries, each with the adapter's own test. Adapters whose templates llmfs does not carry
//! (MPT, ChatGLM, Airoboros, OpenOrca, ...) are left out, so a name only they would claim
//! falls through to a later rule here (e.g. "mistral-7b-openorca" → mistral, where FastChat
//! says open-orca).
//!
//! Names in a store are often not the upstream names, so when the name says nothing, llmfs
//! also reads config.json (`config_rules`, llmfs's own addition): first the
//! `_name_or_path` transformers records, through the same name rules, then
//! `architectures`/`model_type` for the families whose architecture or vocabulary is their
//! own.

use serde_json::Value;

/// A model family and the FastChat template it is prompted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub template: &'static str,
}

/// What `detect` answers when nothing matches: FastChat's `BaseModelAdapter`.
pub const UNKNOWN: Family = Family { name: "unknown", template: "one_shot" };

const fn fam(name: &'static str, template: &'static str) -> Option<Family> {
    Some(Family { name, template })
}

/// The family of `model_name` (a name or a path), with `config` (config.json) as fallback.
pub fn detect(model_name: &str, config: Option<&Value>) -> Family {
    detect_name(model_name).or_else(|| config.and_then(config_rules)).unwrap_or(UNKNOWN)
}

/// FastChat's `get_model_adapter`: the basename first, then the full path.
fn detect_name(model_path: &str) -> Option<Family> {
    let trimmed = model_path.trim_end_matches('/');
    let basename = trimmed.rsplit('/').next().unwrap_or(trimmed);
    name_rules(basename).or_else(|| name_rules(trimmed))
}

/// FastChat's adapters in registration order (fschat 0.2.36 model_adapter.py; `Llama3Adapter`
/// and `GemmaAdapter` from FastChat's main branch), each as its `match()` reads.
/// `path` is as given: one adapter looks at case.
fn name_rules(path: &str) -> Option<Family> {
    let p = path.to_lowercase();
    let has = |s: &str| p.contains(s);
    if has("vicuna") {
        // VicunaAdapter: Vicuna v0 predates the v1.1 format.
        let basename = path.rsplit('/').next().unwrap_or(path);
        return if basename.contains("v0") {
            fam("vicuna", "one_shot")
        } else {
            fam("vicuna", "vicuna_v1.1")
        };
    }
    if has("longchat") {
        return fam("longchat", "vicuna_v1.1");
    }
    if has("koala") {
        return fam("koala", "koala_v1");
    }
    if has("alpaca") {
        return fam("alpaca", "alpaca");
    }
    if has("dolly-v2") {
        return fam("dolly", "dolly_v2");
    }
    if (has("openchat") && has("3.5")) || has("starling-lm") {
        return fam("openchat", "openchat_3.5");
    }
    if has("wizardlm") {
        // WizardLMAdapter: the 13B/30B/70B releases use Vicuna's format, the 7B one_shot.
        return if has("13b") || has("30b") || has("70b") {
            fam("wizardlm", "vicuna_v1.1")
        } else {
            fam("wizardlm", "one_shot")
        };
    }
    if has("camel") {
        return fam("camel", "vicuna_v1.1");
    }
    if has("falcon") && has("chat") {
        return fam("falcon-chat", "falcon-chat");
    }
    if has("falcon") {
        return fam("falcon", "falcon");
    }
    if has("llama-2") {
        return fam("llama-2", "llama-2");
    }
    if has("llama-3") {
        return fam("llama-3", "llama-3");
    }
    if has("mistral") || has("mixtral") {
        return fam("mistral", "mistral");
    }
    if has("qwen") {
        return fam("qwen", "qwen-7b-chat");
    }
    if has("codellama") {
        return fam("codellama", "llama-2");
    }
    if has("zephyr") {
        return fam("zephyr", "zephyr");
    }
    if has("notus") {
        return fam("notus", "zephyr");
    }
    if has("tinyllama") {
        return fam("tinyllama", "TinyLlama");
    }
    if has("xwin-lm") {
        return fam("xwin-lm", "vicuna_v1.1");
    }
    if has("orca-2") {
        return fam("orca-2", "orca-2");
    }
    if has("deepseek-llm") && has("chat") {
        return fam("deepseek-chat", "deepseek-chat");
    }
    if has("gemma") {
        return fam("gemma", "gemma");
    }
    None
}

/// The config.json fallback (not in FastChat, which only sees paths).
fn config_rules(config: &Value) -> Option<Family> {
    if let Some(family) = config.get("_name_or_path").and_then(Value::as_str).and_then(detect_name) {
        return Some(family);
    }
    let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("").to_lowercase();
    let architectures: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let arch = |names: &[&str]| architectures.iter().any(|a| names.contains(a));
    let vocab_size = config.get("vocab_size").and_then(Value::as_u64);

    if model_type == "mistral"
        || model_type == "mixtral"
        || arch(&["MistralForCausalLM", "MixtralForCausalLM"])
    {
        return fam("mistral", "mistral");
    }
    if model_type.starts_with("qwen") || arch(&["QWenLMHeadModel", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM"])
    {
        return fam("qwen", "qwen-7b-chat");
    }
    if model_type.starts_with("gemma") || arch(&["GemmaForCausalLM", "Gemma2ForCausalLM"]) {
        return fam("gemma", "gemma");
    }
    if model_type == "falcon"
        || model_type.starts_with("refinedweb")
        || arch(&["FalconForCausalLM", "RWForCausalLM"])
    {
        return fam("falcon", "falcon");
    }
    if model_type == "llama" || arch(&["LlamaForCausalLM"]) {
        // Plain Llama architecture is shared by most families; only a vocabulary is telling.
        match vocab_size {
            // Llama 3's tiktoken-based vocabulary (128256 tokens).
            Some(n) if n >= 128_000 => return fam("llama-3", "llama-3"),
            // DeepSeek LLM's 102400-token vocabulary.
            Some(102_400) => return fam("deepseek-chat", "deepseek-chat"),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::template;
    use serde_json::json;

    /// (model name as published, family, template)
    const BY_NAME: &[(&str, &str, &str)] = &[
        ("lmsys/vicuna-7b-v1.5", "vicuna", "vicuna_v1.1"),
        ("vicuna-13b-v0", "vicuna", "one_shot"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2", "llama-2"),
        ("codellama/CodeLlama-7b-Instruct-hf", "codellama", "llama-2"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3", "llama-3"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral", "mistral"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistral", "mistral"),
        ("HuggingFaceH4/zephyr-7b-beta", "zephyr", "zephyr"),
        ("chavinlo/alpaca-13b", "alpaca", "alpaca"),
        ("young-geng/koala", "koala", "koala_v1"),
        ("databricks/dolly-v2-12b", "dolly", "dolly_v2"),
        ("Qwen/Qwen-7B-Chat", "qwen", "qwen-7b-chat"),
        ("Qwen/Qwen1.5-7B-Chat", "qwen", "qwen-7b-chat"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tinyllama", "TinyLlama"),
        ("openchat/openchat_3.5", "openchat", "openchat_3.5"),
        ("berkeley-nest/Starling-LM-7B-alpha", "openchat", "openchat_3.5"),
        ("deepseek-ai/deepseek-llm-67b-chat", "deepseek-chat", "deepseek-chat"),
        ("microsoft/Orca-2-13b", "orca-2", "orca-2"),
        ("tiiuae/falcon-7b-instruct", "falcon", "falcon"),
        ("tiiuae/falcon-180B-chat", "falcon-chat", "falcon-chat"),
        ("google/gemma-7b-it", "gemma", "gemma"),
        ("gpt2", "unknown", "one_shot"),
    ];

    #[test]
    fn each_family_from_its_name() {
        for &(name, family, tmpl) in BY_NAME {
            assert_eq!(detect(name, None), Family { name: family, template: tmpl }, "{name}");
            assert!(template(tmpl).is_some(), "{tmpl} is carried");
        }
    }

    #[test]
    fn basename_first_then_full_path() {
        // FastChat tries the basename first: the directory's name beats its parents'.
        assert_eq!(detect("/models/vicuna-store/zephyr-7b-beta", None).name, "zephyr");
        // ...and only then the whole path.
        assert_eq!(detect("/models/Llama-2-7b-chat-hf/snapshot", None).name, "llama-2");
        assert_eq!(detect("/models/vicuna-7b-v1.5/", None).name, "vicuna");
    }

    #[test]
    fn order_follows_fastchat() {
        // VicunaAdapter is registered before Llama2Adapter.
        assert_eq!(detect("vicuna-llama-2-merge", None).name, "vicuna");
        // Llama2Adapter before MistralAdapter, MistralAdapter before ZephyrAdapter.
        assert_eq!(detect("llama-2-mistral-mix", None).name, "llama-2");
        assert_eq!(detect("zephyr-mistral-7b", None).name, "mistral");
        // "falcon" with "chat" is FalconChatAdapter's.
        assert_eq!(detect("falcon-40b-chat", None).template, "falcon-chat");
    }

    #[test]
    fn each_family_from_config_name_or_path() {
        for &(name, family, tmpl) in BY_NAME {
            let config = json!({ "_name_or_path": name, "architectures": ["LlamaForCausalLM"] });
            assert_eq!(detect("my-model", Some(&config)), Family { name: family, template: tmpl }, "{name}");
        }
    }

    #[test]
    fn families_with_their_own_architecture_from_config() {
        let cases = [
            (json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}), "mistral"),
            (json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}), "mistral"),
            (json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}), "qwen"),
            (json!({"architectures": ["QWenLMHeadModel"], "model_type": "qwen"}), "qwen"),
            (json!({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}), "gemma"),
            (json!({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}), "falcon"),
            (json!({"architectures": ["RWForCausalLM"], "model_type": "RefinedWebModel"}), "falcon"),
            (
                json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256}),
                "llama-3",
            ),
            (
                json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 102400}),
                "deepseek-chat",
            ),
            (
                json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000}),
                "unknown",
            ),
            (json!({"model_type": "gpt2"}), "unknown"),
        ];
        for (config, family) in cases {
            assert_eq!(detect("store-entry-7", Some(&config)).name, family, "{config}");
        }
    }

    #[test]
    fn name_beats_config() {
        let config = json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral"});
        assert_eq!(detect("HuggingFaceH4/zephyr-7b-beta", Some(&config)).name, "zephyr");
        assert_eq!(detect("openchat_3.5", Some(&config)).name, "openchat");
    }

    #[test]
    fn fallback_is_one_shot() {
        assert_eq!(detect("", None), UNKNOWN);
        assert_eq!(detect("x", Some(&json!([1, 2]))), UNKNOWN);
        assert_eq!(UNKNOWN, Family { name: "unknown", template: "one_shot" });
    }
}

//! Family detection: which FastChat adapter a model belongs to, hence its template.
//!
//! FastChat picks a model adapter by running each registered adapter's `match()` on the
//! model path, first on its basename, then on the whole path, in registration order (earlier
//! wins), and falls back to `BaseModelAdapter` (template `one_shot`); the adapter's
//! `get_default_conv_template(path)` then names the template. llmfs does the same over all
//! of fschat 0.2.36's adapters (`fastchat_tables::ADAPTERS`, generated from FastChat's
//! source; `rules.rs` evaluates them), with FastChat main's Llama3Adapter and GemmaAdapter
//! after them, so those two only claim names 0.2.36 leaves to BaseModelAdapter.
//!
//! Names in a store are often not the upstream names, so when no adapter claims the name,
//! llmfs also reads config.json (`config_rules`, llmfs's own addition): first the
//! `_name_or_path` transformers records, through the same adapters, then
//! `architectures`/`model_type` for the families whose architecture or vocabulary is their
//! own.

use serde_json::Value;

use super::fastchat_tables::ADAPTERS;
use super::rules::{model_adapter, Adapter};

/// A model family (FastChat adapter) and the FastChat template it is prompted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    /// llmfs's short name for the adapter (the registry's `family`): `vicuna`, `unknown`.
    pub name: &'static str,
    /// FastChat's adapter class: `VicunaAdapter`, `BaseModelAdapter`.
    pub adapter: &'static str,
    pub template: &'static str,
}

/// What `detect` answers when nothing matches: FastChat's `BaseModelAdapter`.
pub const UNKNOWN: Family = Family { name: "unknown", adapter: "BaseModelAdapter", template: "one_shot" };

/// Family names llmfs recorded before the adapters were generated, where they differ.
const OLDER_FAMILIES: &[(&str, &str)] = &[
    ("longchat", "LongChatAdapter"),
    ("dolly", "DollyV2Adapter"),
    ("openchat", "OpenChat35Adapter"),
    ("wizardlm", "WizardLMAdapter"),
    ("llama-2", "Llama2Adapter"),
    ("llama-3", "Llama3Adapter"),
    ("qwen", "QwenChatAdapter"),
    ("codellama", "CodeLlamaAdapter"),
    ("tinyllama", "TinyLlamaAdapter"),
    ("orca-2", "MicrosoftOrcaAdapter"),
];

/// The FastChat adapter class behind a registry `family` name, older llmfs's names
/// included (`None` for a name that is no adapter's).
pub fn adapter_of_family(family: &str) -> Option<&'static str> {
    ADAPTERS
        .iter()
        .find(|a| a.family == family)
        .map(|a| a.name)
        .or_else(|| OLDER_FAMILIES.iter().find(|(f, _)| *f == family).map(|&(_, a)| by_class(a).name))
}

/// Every adapter as (FastChat class, llmfs family), in FastChat's registration order.
pub fn adapter_names() -> Vec<(&'static str, &'static str)> {
    ADAPTERS.iter().map(|a| (a.name, a.family)).collect()
}

fn by_class(class: &str) -> &'static Adapter {
    ADAPTERS.iter().find(|a| a.name == class).expect("a generated adapter")
}

fn family(adapter: &'static Adapter, template: &'static str) -> Family {
    Family { name: adapter.family, adapter: adapter.name, template }
}

/// The family of `model_name` (a name or a path), with `config` (config.json) as fallback.
pub fn detect(model_name: &str, config: Option<&Value>) -> Family {
    detect_name(model_name, config).or_else(|| config.and_then(config_rules)).unwrap_or(UNKNOWN)
}

/// FastChat's `get_conversation_template`, `None` when only BaseModelAdapter matches.
fn detect_name(model_path: &str, config: Option<&Value>) -> Option<Family> {
    let adapter = model_adapter(ADAPTERS, model_path);
    if adapter.name == UNKNOWN.adapter {
        return None;
    }
    match adapter.template_for(model_path) {
        Some(template) => Some(family(adapter, template)),
        // PeftModelAdapter: FastChat takes the base model's template from
        // adapter_config.json; a name has none, so the config's answer (or one_shot).
        None => {
            let base = config.and_then(config_rules).map_or(UNKNOWN.template, |f| f.template);
            Some(family(adapter, base))
        }
    }
}

/// The config.json fallback (not in FastChat, which only sees paths).
fn config_rules(config: &Value) -> Option<Family> {
    if let Some(family) =
        config.get("_name_or_path").and_then(Value::as_str).and_then(|n| detect_name(n, None))
    {
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
    let fam = |class: &str, template: &'static str| Some(family(by_class(class), template));

    if model_type == "mistral"
        || model_type == "mixtral"
        || arch(&["MistralForCausalLM", "MixtralForCausalLM"])
    {
        return fam("MistralAdapter", "mistral");
    }
    if model_type.starts_with("qwen") || arch(&["QWenLMHeadModel", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM"])
    {
        return fam("QwenChatAdapter", "qwen-7b-chat");
    }
    if model_type.starts_with("gemma") || arch(&["GemmaForCausalLM", "Gemma2ForCausalLM"]) {
        return fam("GemmaAdapter", "gemma");
    }
    if model_type == "falcon"
        || model_type.starts_with("refinedweb")
        || arch(&["FalconForCausalLM", "RWForCausalLM"])
    {
        return fam("FalconAdapter", "falcon");
    }
    if model_type == "llama" || arch(&["LlamaForCausalLM"]) {
        // Plain Llama architecture is shared by most families; only a vocabulary is telling.
        match vocab_size {
            // Llama 3's tiktoken-based vocabulary (128256 tokens).
            Some(n) if n >= 128_000 => return fam("Llama3Adapter", "llama-3"),
            // DeepSeek LLM's 102400-token vocabulary.
            Some(102_400) => return fam("DeepseekChatAdapter", "deepseek-chat"),
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

    /// (model name as published, adapter, template)
    const BY_NAME: &[(&str, &str, &str)] = &[
        ("lmsys/vicuna-7b-v1.5", "VicunaAdapter", "vicuna_v1.1"),
        ("vicuna-13b-v0", "VicunaAdapter", "one_shot"),
        ("meta-llama/Llama-2-7b-chat-hf", "Llama2Adapter", "llama-2"),
        ("codellama/CodeLlama-7b-Instruct-hf", "CodeLlamaAdapter", "llama-2"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "Llama3Adapter", "llama-3"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "MistralAdapter", "mistral"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "MistralAdapter", "mistral"),
        ("HuggingFaceH4/zephyr-7b-beta", "ZephyrAdapter", "zephyr"),
        ("chavinlo/alpaca-13b", "AlpacaAdapter", "alpaca"),
        ("young-geng/koala", "KoalaAdapter", "koala_v1"),
        ("databricks/dolly-v2-12b", "DollyV2Adapter", "dolly_v2"),
        ("Qwen/Qwen-7B-Chat", "QwenChatAdapter", "qwen-7b-chat"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlamaAdapter", "TinyLlama"),
        ("openchat/openchat_3.5", "OpenChat35Adapter", "openchat_3.5"),
        ("deepseek-ai/deepseek-llm-67b-chat", "DeepseekChatAdapter", "deepseek-chat"),
        ("microsoft/Orca-2-13b", "MicrosoftOrcaAdapter", "orca-2"),
        ("tiiuae/falcon-7b-instruct", "FalconAdapter", "falcon"),
        ("tiiuae/falcon-180B-chat", "FalconChatAdapter", "falcon-chat"),
        ("google/gemma-7b-it", "GemmaAdapter", "gemma"),
        ("THUDM/chatglm2-6b", "ChatGLMAdapter", "chatglm2"),
        ("BAAI/AquilaChat2-34B", "AquilaChatAdapter", "aquila-legacy"),
        ("mosaicml/mpt-7b", "MPTAdapter", "zero_shot"),
        ("jondurbin/airoboros-l2-70b-2.2.1", "AiroborosAdapter", "airoboros_v2"),
        ("Open-Orca/Mistral-7B-OpenOrca", "OpenOrcaAdapter", "mistral-7b-openorca"),
        ("gpt-4", "ChatGPTAdapter", "chatgpt"),
        ("gpt2", "BaseModelAdapter", "one_shot"),
    ];

    #[test]
    fn each_family_from_its_name() {
        for &(name, adapter, tmpl) in BY_NAME {
            let f = detect(name, None);
            assert_eq!((f.adapter, f.template), (adapter, tmpl), "{name}");
            assert_eq!(adapter_of_family(f.name), Some(adapter), "{name}");
            assert!(template(tmpl).is_some(), "{tmpl} is carried");
        }
    }

    #[test]
    fn family_names_are_short_and_unique() {
        let names = adapter_names();
        assert_eq!(names.len(), 90, "fschat 0.2.36's 88 and FastChat main's Llama3, Gemma");
        for (i, (class, fam)) in names.iter().enumerate() {
            assert!(!names[..i].iter().any(|(_, f)| f == fam), "{fam} twice");
            assert!(!fam.contains("adapter"), "{class}");
        }
        assert_eq!(adapter_of_family("vicuna"), Some("VicunaAdapter"));
        assert_eq!(adapter_of_family("unknown"), Some("BaseModelAdapter"));
        assert_eq!(adapter_of_family("llama-2"), Some("Llama2Adapter"), "an older llmfs's name");
        assert_eq!(adapter_of_family("no-such-family"), None);
    }

    #[test]
    fn basename_first_then_full_path() {
        // FastChat tries the basename first: the directory's name beats its parents'.
        assert_eq!(detect("/models/vicuna-store/zephyr-7b-beta", None).adapter, "ZephyrAdapter");
        // ...and only then the whole path.
        assert_eq!(detect("/models/Llama-2-7b-chat-hf/snapshot", None).adapter, "Llama2Adapter");
        assert_eq!(detect("/models/vicuna-7b-v1.5/", None).adapter, "VicunaAdapter");
        // The template is asked with the whole path (WizardLM reads the size from it).
        assert_eq!(detect("/data/wizardlm-13b/weights", None).template, "vicuna_v1.1");
        assert_eq!(detect("/runs/13b/wizardlm-7b", None).template, "vicuna_v1.1");
        assert_eq!(detect("/runs/7b/wizardlm-7b", None).template, "one_shot");
    }

    #[test]
    fn order_follows_fastchat() {
        // VicunaAdapter is registered before Llama2Adapter.
        assert_eq!(detect("vicuna-llama-2-merge", None).adapter, "VicunaAdapter");
        // Llama2Adapter before MistralAdapter, MistralAdapter before ZephyrAdapter.
        assert_eq!(detect("llama-2-mistral-mix", None).adapter, "Llama2Adapter");
        assert_eq!(detect("zephyr-mistral-7b", None).adapter, "MistralAdapter");
        // "falcon" with "chat" is FalconChatAdapter's.
        assert_eq!(detect("falcon-40b-chat", None).template, "falcon-chat");
        // StableVicuna before Vicuna; AlpacaAdapter shadows the Chinese-Alpaca one.
        assert_eq!(detect("stable-vicuna-13b", None).template, "stable-vicuna");
        assert_eq!(detect("chinese-alpaca-2-7b", None).adapter, "AlpacaAdapter");
        // FastChat main's additions come after every 0.2.36 adapter.
        assert_eq!(detect("vicuna-llama-3-8b", None).adapter, "VicunaAdapter");
    }

    #[test]
    fn peft_takes_the_configs_template() {
        let f = detect("my-peft-lora", None);
        assert_eq!((f.adapter, f.template), ("PeftModelAdapter", "one_shot"));
        let config = json!({"_name_or_path": "lmsys/vicuna-7b-v1.5"});
        assert_eq!(detect("my-peft-lora", Some(&config)).template, "vicuna_v1.1");
        assert_eq!(detect("my-peft-lora", Some(&config)).adapter, "PeftModelAdapter");
    }

    #[test]
    fn each_family_from_config_name_or_path() {
        for &(name, adapter, tmpl) in BY_NAME {
            let config = json!({ "_name_or_path": name, "architectures": ["LlamaForCausalLM"] });
            let f = detect("my-model", Some(&config));
            assert_eq!((f.adapter, f.template), (adapter, tmpl), "{name}");
        }
    }

    #[test]
    fn families_with_their_own_architecture_from_config() {
        let cases = [
            (json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}), "mistral"),
            (json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}), "mistral"),
            (json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}), "qwen-chat"),
            (json!({"architectures": ["QWenLMHeadModel"], "model_type": "qwen"}), "qwen-chat"),
            (json!({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}), "gemma"),
            (json!({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}), "falcon"),
            (json!({"architectures": ["RWForCausalLM"], "model_type": "RefinedWebModel"}), "falcon"),
            (
                json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256}),
                "llama3",
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
        assert_eq!(detect("HuggingFaceH4/zephyr-7b-beta", Some(&config)).adapter, "ZephyrAdapter");
        assert_eq!(detect("openchat_3.5", Some(&config)).adapter, "OpenChat35Adapter");
    }

    #[test]
    fn fallback_is_one_shot() {
        assert_eq!(detect("", None), UNKNOWN);
        assert_eq!(detect("x", Some(&json!([1, 2]))), UNKNOWN);
        assert_eq!(UNKNOWN, Family { name: "unknown", adapter: "BaseModelAdapter", template: "one_shot" });
    }
}

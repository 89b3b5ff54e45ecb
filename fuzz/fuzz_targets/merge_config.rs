#![no_main]
//! Fuzz target `merge_config`: a mergekit YAML (`MergeConfig::from_yaml`) and the CLI's short
//! form (`MergeConfig::from_short`, the input split at NUL bytes into method, base, models and
//! t) must return `Ok` or one clear line, never panic; an accepted YAML config is then planned
//! over two small llama-like models, which must not panic either.

use std::collections::BTreeMap;

use llmfs::format::Dtype;
use llmfs::merge::{plan, MergeConfig, ModelTensors};

fn model() -> ModelTensors {
    let mut t = BTreeMap::new();
    t.insert("model.embed_tokens.weight".to_string(), (Dtype::BF16, vec![4, 2]));
    t.insert("model.norm.weight".to_string(), (Dtype::BF16, vec![2]));
    for l in 0..2 {
        t.insert(format!("model.layers.{l}.mlp.up_proj.weight"), (Dtype::BF16, vec![2, 2]));
    }
    ModelTensors { tensors: t, num_layers: 2, architecture: None }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = MergeConfig::from_yaml(text) {
        let models: BTreeMap<String, ModelTensors> = cfg.referenced_models().into_iter().map(|m| (m, model())).collect();
        let _ = plan(&cfg, &models, 0);
    } else if let Err(e) = MergeConfig::from_yaml(text) {
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }
    let parts: Vec<&str> = text.split('\0').collect();
    if parts.len() >= 3 {
        let t = parts.get(3).and_then(|t| t.parse().ok());
        let base = if parts[1].is_empty() { None } else { Some(parts[1]) };
        let _ = MergeConfig::from_short(parts[0], base, parts[2], t);
    }
});

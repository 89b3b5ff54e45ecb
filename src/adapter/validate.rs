//! Pre-load checks (`llmfs check`): the file-level mistakes that make FastChat-style loaders
//! (`AutoConfig`/`AutoTokenizer.from_pretrained` on a directory) fail, found before a GPU is
//! reserved and a long load starts.
//!
//! Why only files: weights are checked where they are parsed (`safetensors`, `registry`
//! fingerprints). Here each problem is one sentence naming the file, so a user can fix it
//! without reading a Python traceback.

use std::fs;
use std::path::Path;

use serde_json::Value;

/// Files any one of which gives `AutoTokenizer` something to load from.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",        // fast tokenizers
    "tokenizer.model",       // SentencePiece (Llama, Mistral, Gemma, ...)
    "vocab.json",            // byte-level BPE with merges.txt (GPT-2 style, Qwen2)
    "qwen.tiktoken",         // Qwen (v1)
    "tokenizer_config.json", // at least names the tokenizer class
];

/// Optional JSON files loaders parse when present; a broken one fails the load.
const OPTIONAL_JSON: &[&str] =
    &["tokenizer_config.json", "generation_config.json", "special_tokens_map.json"];

/// Problems FastChat-like loaders would trip on in model directory `dir`, one
/// human-readable line each; empty means none found.
pub fn validate(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    if !dir.is_dir() {
        problems.push(format!("{} is not a directory", dir.display()));
        return problems;
    }

    match read_json(&dir.join("config.json")) {
        Err(problem) => problems.push(format!("config.json {problem}")),
        Ok(config) => check_config(&config, &mut problems),
    }

    if !TOKENIZER_FILES.iter().any(|f| dir.join(f).is_file()) {
        problems.push(format!("no tokenizer files (none of {})", TOKENIZER_FILES.join(", ")));
    }
    if dir.join("vocab.json").is_file()
        && !dir.join("tokenizer.json").is_file()
        && !dir.join("merges.txt").is_file()
    {
        problems.push("vocab.json without merges.txt (a BPE tokenizer needs both)".to_string());
    }

    for name in OPTIONAL_JSON {
        let path = dir.join(name);
        if path.exists() {
            match read_json(&path) {
                Err(problem) => problems.push(format!("{name} {problem}")),
                Ok(v) if !v.is_object() => problems.push(format!("{name} is not a JSON object")),
                Ok(_) => {}
            }
        }
    }
    problems
}

fn check_config(config: &Value, problems: &mut Vec<String>) {
    let Some(config) = config.as_object() else {
        problems.push("config.json is not a JSON object".to_string());
        return;
    };
    // AutoConfig dispatches on model_type; AutoModelForCausalLM (and vLLM) on architectures.
    match config.get("model_type") {
        None => problems.push("config.json has no \"model_type\"".to_string()),
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(_) => problems.push("config.json \"model_type\" is not a non-empty string".to_string()),
    }
    match config.get("architectures") {
        None => problems.push("config.json has no \"architectures\"".to_string()),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {}
        Some(_) => {
            problems.push("config.json \"architectures\" is not a non-empty list of names".to_string())
        }
    }
}

/// The parsed file, or what is wrong with it, phrased to follow the file's name.
fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("is missing".to_string()),
        Err(e) => return Err(format!("cannot be read: {e}")),
    };
    serde_json::from_slice(&bytes).map_err(|e| format!("is not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn has(problems: &[String], needle: &str) -> bool {
        problems.iter().any(|p| p.contains(needle))
    }

    #[test]
    fn complete_directory_is_ok() {
        let dir =
            dir_with(&[("config.json", CONFIG), ("tokenizer.json", "{}"), ("tokenizer_config.json", "{}")]);
        assert_eq!(validate(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn missing_or_broken_config() {
        let p = validate(dir_with(&[("tokenizer.model", "x")]).path());
        assert_eq!(p, vec!["config.json is missing".to_string()]);
        let p = validate(dir_with(&[("config.json", "{nope"), ("tokenizer.model", "x")]).path());
        assert!(has(&p, "config.json is not valid JSON"), "{p:?}");
        let p = validate(dir_with(&[("config.json", "[1]"), ("tokenizer.model", "x")]).path());
        assert!(has(&p, "config.json is not a JSON object"), "{p:?}");
    }

    #[test]
    fn config_without_model_type_or_architectures() {
        let p = validate(dir_with(&[("config.json", "{}"), ("tokenizer.model", "x")]).path());
        assert!(has(&p, "no \"model_type\""), "{p:?}");
        assert!(has(&p, "no \"architectures\""), "{p:?}");
        assert_eq!(p.len(), 2);
        let p = validate(
            dir_with(&[
                ("config.json", r#"{"model_type": "", "architectures": []}"#),
                ("tokenizer.model", "x"),
            ])
            .path(),
        );
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn no_tokenizer_files() {
        let p = validate(dir_with(&[("config.json", CONFIG)]).path());
        assert_eq!(p.len(), 1);
        assert!(has(&p, "no tokenizer files"), "{p:?}");
        let p = validate(dir_with(&[("config.json", CONFIG), ("vocab.json", "{}")]).path());
        assert!(has(&p, "merges.txt"), "{p:?}");
    }

    #[test]
    fn broken_tokenizer_config() {
        let p = validate(dir_with(&[("config.json", CONFIG), ("tokenizer_config.json", "{\"a\": ")]).path());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(has(&p, "tokenizer_config.json is not valid JSON"), "{p:?}");
        let p = validate(
            dir_with(&[("config.json", CONFIG), ("tokenizer.json", "{}"), ("generation_config.json", "3")])
                .path(),
        );
        assert!(has(&p, "generation_config.json is not a JSON object"), "{p:?}");
    }

    #[test]
    fn not_a_directory() {
        let dir = dir_with(&[]);
        let p = validate(&dir.path().join("absent"));
        assert_eq!(p.len(), 1);
        assert!(p[0].ends_with("is not a directory"));
    }
}

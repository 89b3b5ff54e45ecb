//! Adding a `chat_template` to tokenizer_config.json.
//!
//! Why: a model served from llmfs should prompt the same under transformers/vLLM as under
//! FastChat. Checkpoints that predate chat templates get the FastChat template as Jinja
//! (`chat_template_jinja`); ones that already have a template keep theirs, byte for byte.
//!
//! The key is added by inserting text before the object's closing brace instead of
//! re-serializing: the rest of the file keeps its exact bytes, including numbers serde_json
//! would reformat (tokenizer configs carry `"model_max_length": 1000000000000000019884624838656`,
//! which does not fit an integer type).

use serde_json::Value;

/// Why a tokenizer_config.json could not be given a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerConfigError {
    #[error("tokenizer_config.json is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("tokenizer_config.json is not a JSON object")]
    NotObject,
}

/// `original` (tokenizer_config.json's bytes, `None` when there is none) with `chat_template`
/// set, when it has none. A file that already has a `chat_template` (a string, or a list of
/// named templates) is returned unchanged; `"chat_template": null` counts as none.
pub fn tokenizer_config_with_template(
    original: Option<&[u8]>,
    chat_template: &str,
) -> Result<Vec<u8>, TokenizerConfigError> {
    let template_json = Value::String(chat_template.to_string()).to_string();
    let Some(original) = original else {
        return Ok(format!("{{\n  \"chat_template\": {template_json}\n}}\n").into_bytes());
    };
    let value: Value = serde_json::from_slice(original).map_err(TokenizerConfigError::NotJson)?;
    let Value::Object(map) = value else {
        return Err(TokenizerConfigError::NotObject);
    };
    match map.get("chat_template") {
        Some(Value::Null) => {
            // Replacing a value in place would need a JSON tokenizer; re-serialize instead
            // (key order is kept: serde_json is built with preserve_order).
            let mut map = map;
            map.insert("chat_template".to_string(), Value::String(chat_template.to_string()));
            let mut bytes = serde_json::to_vec_pretty(&Value::Object(map)).expect("a Value serializes");
            bytes.push(b'\n');
            Ok(bytes)
        }
        Some(_) => Ok(original.to_vec()),
        None => {
            // The parse succeeded and the value is an object, so the last non-space byte is
            // its closing brace.
            let close = original.iter().rposition(|&b| b == b'}').ok_or(TokenizerConfigError::NotObject)?;
            let head = original[..close].trim_ascii_end();
            let mut out = Vec::with_capacity(original.len() + template_json.len() + 24);
            out.extend_from_slice(head);
            if !map.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(b"\n  \"chat_template\": ");
            out.extend_from_slice(template_json.as_bytes());
            out.extend_from_slice(b"\n");
            out.extend_from_slice(&original[close..]);
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "{{ 'USER: ' + messages[0]['content'] + \"\\n\" }}";

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn adds_template_keeping_keys_order_and_bytes() {
        let original = b"{\n  \"add_bos_token\": true,\n  \"model_max_length\": 1000000000000000019884624838656,\n  \"tokenizer_class\": \"LlamaTokenizer\"\n}\n";
        let out = tokenizer_config_with_template(Some(original), TEMPLATE).unwrap();
        let v = parse(&out);
        assert_eq!(v["chat_template"], TEMPLATE);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["add_bos_token", "model_max_length", "tokenizer_class", "chat_template"]);
        // Everything before the insertion is the original text, the huge integer included.
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("{\n  \"add_bos_token\": true,\n  \"model_max_length\": 1000000000000000019884624838656,\n  \"tokenizer_class\": \"LlamaTokenizer\",\n  \"chat_template\": "));
        assert!(text.ends_with("\n}\n"));
    }

    #[test]
    fn existing_template_is_left_alone() {
        let original = br#"{"chat_template": "{{ x }}", "b": 1}"#;
        assert_eq!(tokenizer_config_with_template(Some(original), TEMPLATE).unwrap(), original.to_vec());
        let named = br#"{"chat_template": [{"name": "default", "template": "{{ x }}"}]}"#;
        assert_eq!(tokenizer_config_with_template(Some(named), TEMPLATE).unwrap(), named.to_vec());
    }

    #[test]
    fn null_template_is_replaced_in_place() {
        let original = br#"{"a": 1, "chat_template": null, "z": 2}"#;
        let v = parse(&tokenizer_config_with_template(Some(original), TEMPLATE).unwrap());
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "chat_template", "z"]);
        assert_eq!(v["chat_template"], TEMPLATE);
    }

    #[test]
    fn empty_object_and_no_file() {
        let v = parse(&tokenizer_config_with_template(Some(b" { } "), TEMPLATE).unwrap());
        assert_eq!(v, serde_json::json!({ "chat_template": TEMPLATE }));
        let v = parse(&tokenizer_config_with_template(None, TEMPLATE).unwrap());
        assert_eq!(v, serde_json::json!({ "chat_template": TEMPLATE }));
    }

    #[test]
    fn rejects_what_is_not_a_json_object() {
        assert!(matches!(
            tokenizer_config_with_template(Some(b"{"), TEMPLATE),
            Err(TokenizerConfigError::NotJson(_))
        ));
        assert!(matches!(
            tokenizer_config_with_template(Some(b"[]"), TEMPLATE),
            Err(TokenizerConfigError::NotObject)
        ));
    }

    #[test]
    fn real_chat_templates_round_trip() {
        for name in crate::adapter::template_names() {
            // The API models' templates have no Jinja form (chat_template_jinja's tests).
            let Some(jinja) = crate::adapter::chat_template_jinja(name) else { continue };
            let out = tokenizer_config_with_template(Some(br#"{"eos_token": "</s>"}"#), &jinja).unwrap();
            assert_eq!(parse(&out)["chat_template"], jinja.as_str(), "{name}");
        }
    }
}

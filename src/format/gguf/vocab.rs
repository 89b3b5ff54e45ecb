//! The tokenizer as GGUF metadata: what convert_hf_to_gguf.py's `_set_vocab_gpt2`,
//! `_set_vocab_sentencepiece` and gguf-py's `SpecialVocab` write, translated from the
//! repository's files without running a tokenizer.
//!
//! - BPE (`tokenizer.ggml.model = "gpt2"`) from `tokenizer.json`: the model's vocab and its added
//!   tokens by id, padded to config's `vocab_size` with `[PADn]` (UNUSED); added tokens are CONTROL
//!   when special (or looking special: `<|…|>`, `<pad>`, …) else USER_DEFINED; merges (pairs joined
//!   with a space, spaces inside a part written as U+0120). `tokenizer.ggml.pre` is recognised
//!   from the pre-tokenizer's structure and regexes (the converter hashes a test string's token ids
//!   instead: the same names for the same pre-tokenizers); an unknown one is written as "default"
//!   with a warning.
//! - SentencePiece (`"llama"`) from `tokenizer.model`: pieces, scores, types (USER_DEFINED pieces
//!   count as NORMAL, as the converter's `IsUnknown/IsControl/IsUnused/IsByte` chain has it), then
//!   `added_tokens.json` and `tokenizer_config.json`'s `added_tokens_decoder` on top.
//! - Special token ids, `add_bos/eos/sep_token` (from the post-processor and tokenizer_config),
//!   the chat template (`chat_template` or `chat_template.jinja`), normalizer flags: `SpecialVocab`.

use serde_json::{Map, Value as Json};

use super::spm::{self, PieceType};
use super::value::{Value, ValueType};
use super::{GgufError, Kvs};

/// gguf-py's `TokenType`.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The tokenizer files convert_hf_to_gguf.py reads, parsed.
pub struct TokenizerFiles<'a> {
    pub config: &'a Map<String, Json>,
    pub tokenizer_json: Option<Map<String, Json>>,
    pub tokenizer_model: Option<&'a [u8]>,
    pub tokenizer_config: Option<Map<String, Json>>,
    pub added_tokens_json: Option<Map<String, Json>>,
    pub chat_template_jinja: Option<String>,
}

/// The pre-tokenizers llmfs recognises, by the regexes of their `Split` step (the names are
/// llama.cpp's `tokenizer.ggml.pre` values).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` for a tokenizer.json's `pre_tokenizer`, or None when not recognised.
pub fn detect_pre(tokenizer_json: &Map<String, Json>) -> Option<&'static str> {
    let pre = tokenizer_json.get("pre_tokenizer")?.as_object()?;
    let is_byte_level = |p: &Map<String, Json>, use_regex: bool| {
        p.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && p.get("add_prefix_space").and_then(Json::as_bool) == Some(false)
            && p.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == use_regex
    };
    match pre.get("type").and_then(Json::as_str)? {
        // GPT-2 itself: byte-level with its built-in regex.
        "ByteLevel" if is_byte_level(pre, true) => Some("gpt-2"),
        "Sequence" => {
            let steps = pre.get("pretokenizers")?.as_array()?;
            let [split, byte_level] = steps.as_slice() else { return None };
            let (split, byte_level) = (split.as_object()?, byte_level.as_object()?);
            if !is_byte_level(byte_level, false)
                || split.get("type").and_then(Json::as_str) != Some("Split")
                || split.get("behavior").and_then(Json::as_str) != Some("Isolated")
                || split.get("invert").and_then(Json::as_bool) != Some(false)
            {
                return None;
            }
            match split.get("pattern")?.get("Regex")?.as_str()? {
                LLAMA3_REGEX => Some("llama-bpe"),
                QWEN2_REGEX => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `TextModel.does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

fn unsupported(part: impl Into<String>) -> GgufError {
    GgufError::Tokenizer(part.into())
}

/// Which vocabulary path the converter takes for LlamaModel (`set_vocab`): SentencePiece when
/// tokenizer.model exists; else `LlamaHfVocab` for a byte-fallback BPE tokenizer.json (not
/// translated here); else GPT-2 BPE.
pub fn llama_vocab(
    f: &TokenizerFiles,
    vocab_size: u64,
    kvs: &mut Kvs,
    warnings: &mut Vec<String>,
) -> Result<(), GgufError> {
    if let Some(tc) = &f.tokenizer_config {
        if let Some(Json::Bool(b)) = tc.get("add_prefix_space") {
            kvs.set("tokenizer.ggml.add_space_prefix", Value::Bool(*b));
        }
        if tc.get("tokenizer_class").and_then(Json::as_str) == Some("HybridDNATokenizer") {
            return Err(unsupported("tokenizer_class HybridDNATokenizer"));
        }
    }
    if f.tokenizer_model.is_some() {
        sentencepiece_vocab(f, vocab_size, kvs)?;
    } else {
        let tj =
            f.tokenizer_json.as_ref().ok_or_else(|| unsupported("no tokenizer.model or tokenizer.json"))?;
        let model = tj.get("model").and_then(Json::as_object);
        let model_type = model.and_then(|m| m.get("type")).and_then(Json::as_str);
        let flag =
            |k: &str, default: bool| model.and_then(|m| m.get(k)).and_then(Json::as_bool).unwrap_or(default);
        let is_llama3 =
            model_type == Some("BPE") && flag("ignore_merges", false) && !flag("byte_fallback", true);
        let decoder_seq =
            tj.get("decoder").and_then(|d| d.get("type")).and_then(Json::as_str) == Some("Sequence");
        if !is_llama3 && model_type == Some("BPE") && flag("byte_fallback", false) && decoder_seq {
            return Err(unsupported(
                "tokenizer.json is a SentencePiece-style byte-fallback BPE without tokenizer.model (the converter's LlamaHfVocab path)",
            ));
        }
        gpt2_vocab(f, vocab_size, kvs, warnings)?;
    }
    if vocab_size == 32016 {
        // CodeLlama: the converter sets prefix/suffix/middle/eot; gguf-py has a handler only for eot.
        kvs.set("tokenizer.ggml.eot_token_id", Value::U32(32010));
    }
    if vocab_size == 49152 {
        kvs.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    }
    Ok(())
}

/// Qwen2Model.set_vocab: SentencePiece if tokenizer.model exists, else GPT-2 BPE.
pub fn qwen_vocab(
    f: &TokenizerFiles,
    vocab_size: u64,
    kvs: &mut Kvs,
    warnings: &mut Vec<String>,
) -> Result<(), GgufError> {
    if f.tokenizer_model.is_some() {
        sentencepiece_vocab(f, vocab_size, kvs)
    } else {
        gpt2_vocab(f, vocab_size, kvs, warnings)
    }
}

fn gpt2_vocab(
    f: &TokenizerFiles,
    vocab_size: u64,
    kvs: &mut Kvs,
    warnings: &mut Vec<String>,
) -> Result<(), GgufError> {
    let tj = f
        .tokenizer_json
        .as_ref()
        .ok_or_else(|| unsupported("no tokenizer.json (a BPE vocabulary needs it)"))?;
    let model = tj
        .get("model")
        .and_then(Json::as_object)
        .ok_or_else(|| unsupported("tokenizer.json has no model"))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(unsupported(format!(
            "tokenizer.json model type {} (only BPE is translated)",
            model.get("type").unwrap_or(&Json::Null)
        )));
    }
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| unsupported("tokenizer.json has no model.vocab"))?;
    let n = usize::try_from(vocab_size).map_err(|_| unsupported("vocab_size"))?;
    if n > 16 << 20 {
        return Err(unsupported(format!("vocab_size {vocab_size} is implausible")));
    }
    // Each id's text and, for an added token, whether it is special.
    let mut by_id: Vec<Option<(String, Option<bool>)>> = vec![None; n];
    let out_of_range = |id: u64| unsupported(format!("token id {id} is not below vocab_size {vocab_size}"));
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| unsupported(format!("tokenizer.json vocab id of {tok:?}")))?;
        *by_id.get_mut(id as usize).ok_or_else(|| out_of_range(id))? = Some((tok.clone(), None));
    }
    let added = added_tokens(tj)?;
    for a in &added {
        *by_id.get_mut(a.id as usize).ok_or_else(|| out_of_range(a.id))? =
            Some((a.content.clone(), Some(a.special)));
    }
    let added_contents: std::collections::HashSet<&str> = added.iter().map(|a| a.content.as_str()).collect();
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for (i, entry) in by_id.into_iter().enumerate() {
        match entry {
            None => {
                tokens.push(Value::Str(format!("[PAD{i}]")));
                types.push(Value::I32(UNUSED));
            }
            Some((tok, flags)) => {
                if added_contents.contains(tok.as_str()) {
                    let special = flags.unwrap_or(false);
                    if special || looks_special(&tok) {
                        types.push(Value::I32(CONTROL));
                        tokens.push(Value::Str(tok));
                    } else {
                        types.push(Value::I32(USER_DEFINED));
                        tokens.push(Value::Str(tok.replace('\u{2581}', " ")));
                    }
                } else {
                    types.push(Value::I32(NORMAL));
                    tokens.push(Value::Str(tok));
                }
            }
        }
    }
    let pre = match detect_pre(tj) {
        Some(p) => p,
        None => {
            warnings.push("tokenizer.json's pre-tokenizer is not one llmfs recognises: tokenizer.ggml.pre = \"default\" (llama.cpp may split text differently from the Hugging Face tokenizer)".into());
            "default"
        }
    };
    kvs.set("tokenizer.ggml.model", Value::str("gpt2"));
    kvs.set("tokenizer.ggml.pre", Value::str(pre));
    kvs.set_array("tokenizer.ggml.tokens", ValueType::Str, tokens);
    kvs.set_array("tokenizer.ggml.token_type", ValueType::I32, types);
    special_vocab(f, true, None, kvs)
}

fn sentencepiece_vocab(f: &TokenizerFiles, vocab_size: u64, kvs: &mut Kvs) -> Result<(), GgufError> {
    let pieces =
        spm::parse_model(f.tokenizer_model.unwrap_or_default()).map_err(|e| unsupported(e.to_string()))?;
    let n = if vocab_size == 0 { pieces.len() } else { vocab_size as usize };
    if n > 16 << 20 {
        return Err(unsupported(format!("vocab_size {vocab_size} is implausible")));
    }
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; n];
    let mut types = vec![UNUSED; n];
    for (id, p) in pieces.iter().enumerate().take(n) {
        tokens[id] = p.piece.clone();
        scores[id] = p.score;
        types[id] = match p.kind {
            PieceType::Unknown => UNKNOWN,
            PieceType::Control => CONTROL,
            PieceType::Unused => UNUSED,
            PieceType::Byte => BYTE,
            PieceType::Normal | PieceType::UserDefined => NORMAL,
        };
    }
    if let Some(at) = &f.added_tokens_json {
        for (key, id) in at {
            let id =
                id.as_u64().ok_or_else(|| unsupported(format!("added_tokens.json id of {key:?}")))? as usize;
            if id >= n {
                continue;
            }
            tokens[id] = key.clone();
            scores[id] = -1000.0;
            types[id] = USER_DEFINED;
        }
    }
    if let Some(tc) = &f.tokenizer_config {
        if let Some(dec) = tc.get("added_tokens_decoder").and_then(Json::as_object) {
            for (id, data) in dec {
                let id: usize =
                    id.parse().map_err(|_| unsupported(format!("added_tokens_decoder key {id:?}")))?;
                let mut token = data
                    .get("content")
                    .and_then(Json::as_str)
                    .ok_or_else(|| unsupported(format!("added_tokens_decoder[{id}] has no content")))?
                    .to_owned();
                if id >= n {
                    continue;
                }
                if truthy(data.get("special")) || looks_special(&token) {
                    types[id] = CONTROL;
                } else {
                    token = token.replace('\u{2581}', " ");
                    types[id] = USER_DEFINED;
                }
                scores[id] = -1000.0;
                tokens[id] = token;
            }
        }
    }
    kvs.set("tokenizer.ggml.model", Value::str("llama"));
    kvs.set("tokenizer.ggml.pre", Value::str("default"));
    kvs.set_array("tokenizer.ggml.tokens", ValueType::Str, tokens.into_iter().map(Value::Str).collect());
    kvs.set_array("tokenizer.ggml.scores", ValueType::F32, scores.into_iter().map(Value::F32).collect());
    kvs.set_array("tokenizer.ggml.token_type", ValueType::I32, types.into_iter().map(Value::I32).collect());
    special_vocab(f, false, Some(n as u64), kvs)
}

/// Python truthiness of an optional JSON value.
fn truthy(v: Option<&Json>) -> bool {
    match v {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(Json::Number(n)) => n.as_f64() != Some(0.0),
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
    }
}

struct Added {
    id: u64,
    content: String,
    special: bool,
}

fn added_tokens(tj: &Map<String, Json>) -> Result<Vec<Added>, GgufError> {
    let Some(list) = tj.get("added_tokens").and_then(Json::as_array) else { return Ok(Vec::new()) };
    list.iter()
        .map(|a| {
            let id = a.get("id").and_then(Json::as_u64);
            let content = a.get("content").and_then(Json::as_str);
            match (id, content) {
                (Some(id), Some(c)) => Ok(Added {
                    id,
                    content: c.to_owned(),
                    special: a.get("special").and_then(Json::as_bool).unwrap_or(false),
                }),
                _ => Err(unsupported(format!("tokenizer.json added token {a}"))),
            }
        })
        .collect()
}

/// gguf-py's `SpecialVocab(path, load_merges, n_vocab).add_to_gguf(...)`.
fn special_vocab(
    f: &TokenizerFiles,
    load_merges: bool,
    n_vocab: Option<u64>,
    kvs: &mut Kvs,
) -> Result<(), GgufError> {
    let mut types: Vec<&str> = vec!["bos", "eos", "unk", "sep", "pad", "cls", "mask"];
    let mut ids: Vec<(String, u64)> = Vec::new();
    let mut add: Vec<(String, bool)> = Vec::new();
    let mut merges: Vec<String> = Vec::new();
    let mut chat_template: Option<String> = None;
    let mut lowercase: Option<bool> = None;
    let mut strip_accents: Option<bool> = None;

    let set_id = |ids: &mut Vec<(String, u64)>, typ: &str, tid: Option<&Json>| -> Result<(), GgufError> {
        let Some(tid) = tid.and_then(|t| if t.is_i64() || t.is_u64() { t.as_i64() } else { None }) else {
            return Ok(());
        };
        if tid < 0 {
            return Err(unsupported(format!("invalid value for special token type {typ}: {tid}")));
        }
        if n_vocab.is_none_or(|n| (tid as u64) < n) && !ids.iter().any(|(t, _)| t == typ) {
            ids.push((typ.to_owned(), tid as u64));
        }
        Ok(())
    };
    let set_add = |add: &mut Vec<(String, bool)>, typ: &str, v: bool, overwrite: bool| match add
        .iter_mut()
        .find(|(t, _)| t == typ)
    {
        Some(e) if overwrite => e.1 = v,
        Some(_) => {}
        None => add.push((typ.to_owned(), v)),
    };

    let mut tc = f.tokenizer_config.clone();
    let added: Vec<Added> = match &f.tokenizer_json {
        Some(tj) => added_tokens(tj)?,
        None => Vec::new(),
    };
    if let Some(tj) = &f.tokenizer_json {
        if load_merges {
            if let Some(list) = tj.get("model").and_then(|m| m.get("merges")).and_then(Json::as_array) {
                merges = parse_merges(list)?;
            }
        }
        if let Some(norm) = tj.get("normalizer") {
            if truthy(Some(norm)) {
                parse_normalizer(norm, &mut lowercase, &mut strip_accents);
            }
        }
        let tc_str = |tc: &Option<Map<String, Json>>, k: &str| -> Option<String> {
            tc.as_ref().and_then(|m| m.get(k)).and_then(|v| {
                if truthy(Some(v)) {
                    special_content(v)
                } else {
                    None
                }
            })
        };
        let mut special_bos = tc_str(&tc, "bos_token");
        let mut special_cls = tc_str(&tc, "cls_token");
        let mut special_eos = tc_str(&tc, "eos_token");
        let special_sep = tc_str(&tc, "sep_token");
        let tc_nonempty = tc.as_ref().is_some_and(|m| !m.is_empty());
        if special_bos.is_none() && special_cls.is_some() && tc_nonempty {
            special_bos = special_cls.clone();
            tc.as_mut()
                .map(|m| m.insert("bos_token".into(), Json::String(special_bos.clone().unwrap_or_default())));
        }
        if special_eos.is_none() && special_sep.is_some() && tc_nonempty {
            special_eos = special_sep.clone();
            tc.as_mut()
                .map(|m| m.insert("eos_token".into(), Json::String(special_eos.clone().unwrap_or_default())));
        }
        if let Some(pp) = tj.get("post_processor").filter(|p| truthy(Some(p))) {
            let procs: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
                Some(list) => list.iter().collect(),
                None => vec![pp],
            };
            for p in procs {
                match p.get("type").and_then(Json::as_str) {
                    Some("ByteLevel") => {
                        set_add(&mut add, "bos", false, false);
                        set_add(&mut add, "eos", false, false);
                    }
                    Some("RobertaProcessing") => {
                        return Err(unsupported("tokenizer.json post-processor RobertaProcessing"));
                    }
                    Some("TemplateProcessing") => {
                        let empty = Vec::new();
                        let single = p.get("single").and_then(Json::as_array).unwrap_or(&empty);
                        let special_id = |e: &Json| -> Option<String> {
                            e.get("SpecialToken")
                                .and_then(|s| s.get("id"))
                                .and_then(Json::as_str)
                                .map(str::to_owned)
                        };
                        if single.len() > 1 {
                            if let Some(first) = special_id(&single[0]).filter(|s| !s.is_empty()) {
                                if !tc_nonempty {
                                    special_bos = Some(first.clone());
                                } else if Some(&first) != special_bos.as_ref()
                                    && Some(&first) != special_cls.as_ref()
                                {
                                    if special_bos.is_none() {
                                        special_bos = Some(first.clone());
                                    }
                                    if special_cls.is_none() {
                                        special_cls = Some(first.clone());
                                    }
                                }
                                let is = Some(&first) == special_bos.as_ref()
                                    || Some(&first) == special_cls.as_ref();
                                set_add(&mut add, "bos", is, true);
                                if let (Some(m), Some(b)) = (tc.as_mut(), &special_bos) {
                                    if tc_nonempty {
                                        m.insert("bos_token".into(), Json::String(b.clone()));
                                    }
                                }
                            }
                            if let Some(last) =
                                special_id(&single[single.len() - 1]).filter(|s| !s.is_empty())
                            {
                                if !tc_nonempty {
                                    special_eos = Some(last.clone());
                                } else if Some(&last) != special_eos.as_ref() {
                                    if !types.contains(&"eot") {
                                        types.push("eot");
                                        tc.as_mut()
                                            .map(|m| m.insert("eot_token".into(), opt_json(&special_eos)));
                                    } else if !types.contains(&"eom") {
                                        types.push("eom");
                                        tc.as_mut()
                                            .map(|m| m.insert("eom_token".into(), opt_json(&special_eos)));
                                    }
                                    tc.as_mut()
                                        .map(|m| m.insert("eos_token".into(), Json::String(last.clone())));
                                    special_eos = Some(last.clone());
                                }
                                set_add(&mut add, "eos", Some(&last) == special_eos.as_ref(), true);
                            }
                        }
                        let pair = p.get("pair").and_then(Json::as_array).unwrap_or(&empty);
                        if !pair.is_empty() {
                            let first = single.first().filter(|_| single.len() > 1).and_then(special_id);
                            let last = single.last().filter(|_| single.len() > 1).and_then(special_id);
                            let start =
                                usize::from(first.is_some() && pair.first().and_then(special_id) == first);
                            let stop = if last.is_some() && pair.last().and_then(special_id) == last {
                                pair.len() - 1
                            } else {
                                pair.len()
                            };
                            let mid = if start <= stop { &pair[start..stop] } else { &pair[0..0] };
                            if !mid.is_empty() {
                                let seq = |e: &Json| {
                                    e.get("Sequence")
                                        .and_then(|s| s.get("id"))
                                        .and_then(Json::as_str)
                                        .map(str::to_owned)
                                };
                                let (a, b) = (seq(&mid[0]), seq(&mid[mid.len() - 1]));
                                if a.as_deref() == Some("A") && b.as_deref() == Some("B") && mid.len() > 2 {
                                    let inner = &mid[1..mid.len() - 1];
                                    let mut add_sep = false;
                                    let is_sep = |s: &Option<String>| {
                                        s.is_some() && (s == &special_sep || s == &special_eos)
                                    };
                                    let e0 = special_id(&inner[0]);
                                    if is_sep(&e0) && last.is_none() {
                                        add_sep = true;
                                    }
                                    if inner.len() == 2 && is_sep(&special_id(&inner[1])) {
                                        add_sep = true;
                                    }
                                    set_add(&mut add, "sep", add_sep, true);
                                    if add_sep && special_sep.is_none() && tc_nonempty {
                                        tc.as_mut()
                                            .map(|m| m.insert("sep_token".into(), opt_json(&special_eos)));
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(tc) = tc.as_ref().filter(|m| !m.is_empty()) {
        let template = match tc.get("chat_template") {
            Some(v) => Some(v.clone()),
            None => f.chat_template_jinja.clone().map(Json::String),
        };
        match template {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => chat_template = Some(s),
            Some(Json::Array(_)) => return Err(unsupported("chat_template as a list of named templates")),
            Some(_) => {}
        }
        for typ in types.iter().copied() {
            if let Some(Json::Bool(b)) = tc.get(&format!("add_{typ}_token")) {
                set_add(&mut add, typ, *b, false);
            }
            let Some(content) = tc.get(&format!("{typ}_token")).and_then(special_content) else { continue };
            let id = added.iter().find(|a| a.content == content).map(|a| Json::from(a.id));
            set_id(&mut ids, typ, id.as_ref())?;
        }
    }
    for typ in types.iter().copied() {
        let mut tid = f.config.get(&format!("{typ}_token_id"));
        if tid.is_none_or(Json::is_null) {
            if let Some(text) = f.config.get("text_config") {
                tid = text.get(format!("{typ}_token_id"));
            }
        }
        set_id(&mut ids, typ, tid)?;
    }

    if !merges.is_empty() {
        kvs.set_array("tokenizer.ggml.merges", ValueType::Str, merges.into_iter().map(Value::Str).collect());
    }
    for (typ, id) in ids {
        let key = match typ.as_str() {
            "bos" => "tokenizer.ggml.bos_token_id",
            "eos" => "tokenizer.ggml.eos_token_id",
            "unk" => "tokenizer.ggml.unknown_token_id",
            "sep" => "tokenizer.ggml.seperator_token_id",
            "pad" => "tokenizer.ggml.padding_token_id",
            "mask" => "tokenizer.ggml.mask_token_id",
            "eot" => "tokenizer.ggml.eot_token_id",
            "eom" => "tokenizer.ggml.eom_token_id",
            _ => continue, // gguf-py has no handler (cls): skipped with a warning
        };
        let id = u32::try_from(id).map_err(|_| unsupported(format!("{typ} token id {id}")))?;
        kvs.set(key, Value::U32(id));
    }
    for (typ, v) in add {
        let key = match typ.as_str() {
            "bos" => "tokenizer.ggml.add_bos_token",
            "eos" => "tokenizer.ggml.add_eos_token",
            "sep" => "tokenizer.ggml.add_sep_token",
            _ => continue,
        };
        kvs.set(key, Value::Bool(v));
    }
    if let Some(t) = chat_template.filter(|t| !t.is_empty()) {
        kvs.set("tokenizer.chat_template", Value::Str(t));
    }
    if let Some(v) = lowercase {
        kvs.set("tokenizer.ggml.normalizer.lowercase", Value::Bool(v));
    }
    if let Some(v) = strip_accents {
        kvs.set("tokenizer.ggml.normalizer.strip_accents", Value::Bool(v));
    }
    Ok(())
}

fn opt_json(s: &Option<String>) -> Json {
    s.clone().map(Json::String).unwrap_or(Json::Null)
}

/// A tokenizer_config special token: a string, or an AddedToken dict's `content`.
fn special_content(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    }
}

fn parse_merges(list: &[Json]) -> Result<Vec<String>, GgufError> {
    match list.first() {
        None => Ok(Vec::new()),
        Some(Json::String(_)) => list
            .iter()
            .map(|m| {
                m.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| unsupported("tokenizer.json merges of mixed formats"))
            })
            .collect(),
        Some(Json::Array(_)) => list
            .iter()
            .map(|m| {
                let pair = m.as_array().filter(|p| p.len() == 2);
                let parts: Option<Vec<String>> = pair.map(|p| {
                    p.iter()
                        .filter_map(Json::as_str)
                        .map(|s| s.chars().map(|c| if c == ' ' { '\u{120}' } else { c }).collect())
                        .collect()
                });
                match parts {
                    Some(p) if p.len() == 2 => Ok(p.join(" ")),
                    _ => Err(unsupported(format!("tokenizer.json merge {m}"))),
                }
            })
            .collect(),
        Some(other) => Err(unsupported(format!("tokenizer.json merges format ({other})"))),
    }
}

fn parse_normalizer(n: &Json, lowercase: &mut Option<bool>, strip: &mut Option<bool>) {
    match n.get("type").and_then(Json::as_str) {
        Some("Lowercase") => *lowercase = Some(true),
        Some("StripAccents") => *strip = Some(true),
        Some("BertNormalizer") => {
            if let Some(v) = n.get("lowercase") {
                *lowercase = v.as_bool();
            }
            if let Some(v) = n.get("strip_accents") {
                *strip = v.as_bool();
            }
        }
        Some("Sequence") => {
            for m in n.get("normalizers").and_then(Json::as_array).into_iter().flatten() {
                parse_normalizer(m, lowercase, strip);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_llama3_qwen2_gpt2_pre_tokenizers() {
        let seq = |re: &str| {
            json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}})
        };
        let obj = |v: Json| v.as_object().unwrap().clone();
        assert_eq!(detect_pre(&obj(seq(LLAMA3_REGEX))), Some("llama-bpe"));
        assert_eq!(detect_pre(&obj(seq(QWEN2_REGEX))), Some("qwen2"));
        assert_eq!(detect_pre(&obj(seq("\\s+"))), None);
        let gpt2 = json!({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}});
        assert_eq!(detect_pre(&obj(gpt2)), Some("gpt-2"));
    }

    #[test]
    fn merges_in_both_formats() {
        let old = parse_merges(&[json!("a b"), json!("ab c")]).unwrap();
        assert_eq!(old, ["a b", "ab c"]);
        let new = parse_merges(&[json!(["a", "b c"])]).unwrap();
        assert_eq!(new, ["a b\u{120}c"]);
        assert!(parse_merges(&[json!(["a"])]).is_err());
    }
}

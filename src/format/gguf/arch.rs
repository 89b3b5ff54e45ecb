//! Architectures: config.json → `{arch}.*` hyperparameters, HF tensor names → GGUF names, the
//! LLaMA Q/K permute and Llama 3's `rope_freqs` (conversion/llama.py, conversion/qwen.py,
//! `TextModel.set_gguf_parameters` in conversion/base.py).
//!
//! The converter reads hyperparameters through transformers' `AutoConfig(...).to_dict()`, so a
//! key missing from config.json takes the config class's default (transformers 5): [`Hparams`]
//! applies the same defaults for the four supported model types, and `head_dim` is derived as
//! LlamaConfig/MistralConfig do (Qwen2Config has none; Qwen3Config's default is 128).

use serde_json::{Map, Value as Json};

use super::value::Value;
use super::{GgufError, Kvs};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    /// GGUF's architecture name (`general.architecture`, the `{arch}.` key prefix).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// The converter's class for `architectures[0]` (ModelBase.register).
    pub fn from_hf(hf_arch: &str) -> Option<Arch> {
        Some(match hf_arch {
            "LLaMAForCausalLM" | "LlamaForCausalLM" | "MistralForCausalLM" | "LlamaModel" => Arch::Llama,
            "Qwen2ForCausalLM" | "Qwen2Model" => Arch::Qwen2,
            "Qwen3ForCausalLM" | "Qwen3Model" => Arch::Qwen3,
            _ => return None,
        })
    }
}

/// config.json with transformers' defaults behind it. The sizes that define the tensors
/// (vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads) have no
/// default here: a config.json without them is refused rather than given transformers' 7B values.
pub struct Hparams<'a> {
    pub config: &'a Map<String, Json>,
    model_type: String,
}

impl<'a> Hparams<'a> {
    pub fn new(config: &'a Map<String, Json>, arch: Arch) -> Hparams<'a> {
        let model_type =
            config.get("model_type").and_then(Json::as_str).map(str::to_owned).unwrap_or_else(|| {
                match arch {
                    Arch::Llama => "llama",
                    Arch::Qwen2 => "qwen2",
                    Arch::Qwen3 => "qwen3",
                }
                .to_owned()
            });
        Hparams { config, model_type }
    }

    /// The config class default for a key (transformers 5's Llama/Mistral/Qwen2/Qwen3Config).
    fn default(&self, key: &str) -> Option<Json> {
        let mt = self.model_type.as_str();
        let v = match (key, mt) {
            ("num_key_value_heads", "mistral") => Json::from(8),
            ("num_key_value_heads", "qwen2" | "qwen3") => Json::from(32),
            ("num_key_value_heads", _) => return self.get("num_attention_heads"),
            ("max_position_embeddings", "llama") => Json::from(2048),
            ("max_position_embeddings", "mistral") => Json::from(4096 * 32),
            ("max_position_embeddings", _) => Json::from(32768),
            ("rms_norm_eps", _) => Json::from(1e-6),
            ("head_dim", "qwen3") => Json::from(128),
            ("head_dim", "llama" | "mistral") => {
                let h = self.get("hidden_size")?.as_u64()?;
                let n = self.get("num_attention_heads")?.as_u64()?;
                Json::from(h.checked_div(n)?)
            }
            _ => return None,
        };
        Some(v)
    }

    /// A hyperparameter: config.json's value (unless null), else the class default.
    pub fn get(&self, key: &str) -> Option<Json> {
        match self.config.get(key) {
            Some(Json::Null) if key == "num_key_value_heads" => self.get("num_attention_heads"),
            Some(Json::Null) if key == "head_dim" => {
                let h = self.get("hidden_size")?.as_u64()?;
                Some(Json::from(h.checked_div(self.get("num_attention_heads")?.as_u64()?)?))
            }
            Some(v) => Some(v.clone()),
            None => self.default(key),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::MissingHparam(key.to_owned()))?;
        v.as_u64().ok_or_else(|| GgufError::BadHparam { key: key.to_owned(), value: v.to_string() })
    }

    pub fn f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::MissingHparam(key.to_owned()))?;
        v.as_f64().ok_or_else(|| GgufError::BadHparam { key: key.to_owned(), value: v.to_string() })
    }

    /// `rope_parameters` (transformers 5) or `rope_scaling`, with `rope_theta`/`rope_type` mirrored
    /// into it as `TextModel.__init__` does.
    pub fn rope_parameters(&self) -> Map<String, Json> {
        let mut rp = match self.config.get("rope_parameters").or_else(|| self.config.get("rope_scaling")) {
            Some(Json::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        if !rp.contains_key("full_attention") && !rp.contains_key("sliding_attention") {
            if !rp.contains_key("rope_theta") {
                let theta = self.config.get("rope_theta").cloned().unwrap_or(Json::from(10000.0));
                rp.insert("rope_theta".into(), theta);
            }
            if !rp.contains_key("rope_type") {
                // transformers 5 standardizes a missing type to "default" (no key written for it).
                let t = rp.get("type").cloned().unwrap_or(Json::from("default"));
                rp.insert("rope_type".into(), t);
            }
            if !rp.contains_key("original_max_position_embeddings") {
                if let Some(v) = self.config.get("original_max_position_embeddings") {
                    rp.insert("original_max_position_embeddings".into(), v.clone());
                }
            }
        }
        rp
    }
}

/// `TextModel.set_gguf_parameters` (+ LlamaModel's vocab_size and rope.dimension_count) for the
/// keys these architectures have. `file_type` is the `general.file_type` written at its place.
pub fn hparam_kvs(arch: Arch, hp: &Hparams, file_type: u32, kvs: &mut Kvs) -> Result<(), GgufError> {
    let a = arch.name();
    let u32_of = |key: &str| -> Result<u32, GgufError> {
        let v = hp.u64(key)?;
        u32::try_from(v).map_err(|_| GgufError::BadHparam { key: key.to_owned(), value: v.to_string() })
    };
    kvs.set(&format!("{a}.block_count"), Value::U32(u32_of("num_hidden_layers")?));
    kvs.set(&format!("{a}.context_length"), Value::U32(u32_of("max_position_embeddings")?));
    kvs.set(&format!("{a}.embedding_length"), Value::U32(u32_of("hidden_size")?));
    kvs.set(&format!("{a}.feed_forward_length"), Value::U32(u32_of("intermediate_size")?));
    kvs.set(&format!("{a}.attention.head_count"), Value::U32(u32_of("num_attention_heads")?));
    kvs.set(&format!("{a}.attention.head_count_kv"), Value::U32(u32_of("num_key_value_heads")?));
    if hp.config.get("is_causal") == Some(&Json::Bool(false)) {
        kvs.set(&format!("{a}.attention.causal"), Value::Bool(false));
    }
    let rp = hp.rope_parameters();
    let rope_type = rp.get("rope_type").and_then(Json::as_str).unwrap_or("default");
    let factor = rp.get("factor").and_then(Json::as_f64);
    let f32_of = |k: &str| rp.get(k).and_then(Json::as_f64).map(|v| Value::F32(v as f32));
    match (rope_type, factor) {
        ("linear", Some(f)) => {
            kvs.set(&format!("{a}.rope.scaling.type"), Value::str("linear"));
            kvs.set(&format!("{a}.rope.scaling.factor"), Value::F32(f as f32));
        }
        ("yarn", Some(f)) => {
            kvs.set(&format!("{a}.rope.scaling.type"), Value::str("yarn"));
            kvs.set(&format!("{a}.rope.scaling.factor"), Value::F32(f as f32));
            let orig = rp
                .get("original_max_position_embeddings")
                .and_then(Json::as_u64)
                .ok_or_else(|| GgufError::MissingHparam("rope original_max_position_embeddings".into()))?;
            kvs.set(&format!("{a}.rope.scaling.original_context_length"), Value::U32(orig as u32));
            if let Some(v) = f32_of("extrapolation_factor") {
                kvs.set(&format!("{a}.rope.scaling.yarn_ext_factor"), v);
            }
            if let Some(v) = f32_of("attention_factor").or_else(|| f32_of("attn_factor")) {
                kvs.set(&format!("{a}.rope.scaling.yarn_attn_factor"), v);
            }
            if let Some(v) = f32_of("beta_fast") {
                kvs.set(&format!("{a}.rope.scaling.yarn_beta_fast"), v);
            }
            if let Some(v) = f32_of("beta_slow") {
                kvs.set(&format!("{a}.rope.scaling.yarn_beta_slow"), v);
            }
        }
        ("su" | "longrope", _) => kvs.set(&format!("{a}.rope.scaling.type"), Value::str("longrope")),
        ("linear" | "yarn" | "default" | "dynamic", _) => {}
        (t, _) if t.eq_ignore_ascii_case("llama3") => {}
        (t, _) => return Err(GgufError::Unsupported(format!("rope type {t:?}"))),
    }
    if let Some(theta) = rp.get("rope_theta").and_then(Json::as_f64) {
        kvs.set(&format!("{a}.rope.freq_base"), Value::F32(theta as f32));
    }
    kvs.set(&format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(hp.f64("rms_norm_eps")? as f32));
    if let Some(hd) = hp.get("head_dim").filter(|v| !v.is_null()) {
        let hd = hd
            .as_u64()
            .ok_or_else(|| GgufError::BadHparam { key: "head_dim".into(), value: hd.to_string() })?;
        kvs.set(&format!("{a}.attention.key_length"), Value::U32(hd as u32));
        kvs.set(&format!("{a}.attention.value_length"), Value::U32(hd as u32));
    }
    kvs.set("general.file_type", Value::U32(file_type));
    if arch == Arch::Llama {
        kvs.set(&format!("{a}.vocab_size"), Value::U32(u32_of("vocab_size")?));
        let rope_dim = match hp.get("head_dim").filter(|v| !v.is_null()) {
            Some(v) => v.as_u64().unwrap_or(0),
            None => hp.u64("hidden_size")? / hp.u64("num_attention_heads")?.max(1),
        };
        kvs.set(&format!("{a}.rope.dimension_count"), Value::U32(rope_dim as u32));
    }
    Ok(())
}

/// The GGUF name of an HF tensor (gguf-py's TensorNameMap for these architectures), or None.
pub fn map_tensor_name(arch: Arch, name: &str) -> Option<String> {
    let (base, suffix) = if let Some(b) = name.strip_suffix(".weight") {
        (b, ".weight")
    } else if let Some(b) = name.strip_suffix(".bias") {
        (b, ".bias")
    } else {
        return None;
    };
    let fixed = match base {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(format!("{f}{suffix}"));
    }
    let rest = base.strip_prefix("model.layers.")?;
    let (bid, part) = rest.split_once('.')?;
    let bid: u64 = bid.parse().ok()?;
    let gguf = match part {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "self_attn.q_norm" if arch == Arch::Qwen3 => "attn_q_norm",
        "self_attn.k_norm" if arch == Arch::Qwen3 => "attn_k_norm",
        _ => return None,
    };
    Some(format!("blk.{bid}.{gguf}{suffix}"))
}

/// LlamaModel's `rope_freqs` for `rope_type == "llama3"` (generate_extra_tensors), computed in f32
/// as torch does it: `1 / x` is `reciprocal(x) * 1`, scalars are rounded to f32 first.
pub fn llama3_rope_freqs(hp: &Hparams, rp: &Map<String, Json>) -> Result<Vec<f32>, GgufError> {
    let base = rp.get("rope_theta").and_then(Json::as_f64).unwrap_or(10000.0);
    let dim = match hp.get("head_dim").filter(|v| !v.is_null()) {
        Some(v) => v.as_u64().unwrap_or(0),
        None => hp.u64("hidden_size")? / hp.u64("num_attention_heads")?.max(1),
    };
    if dim == 0 || dim > 1 << 16 {
        return Err(GgufError::BadHparam { key: "head_dim".into(), value: dim.to_string() });
    }
    let get = |k: &str, d: f64| rp.get(k).and_then(Json::as_f64).unwrap_or(d);
    let factor = get("factor", 8.0);
    let low = get("low_freq_factor", 1.0);
    let high = get("high_freq_factor", 4.0);
    let old_ctx = get("original_max_position_embeddings", 8192.0);
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    let mut out = Vec::new();
    for i in (0..dim).step_by(2) {
        let exponent = i as f32 / dim as f32;
        let freq = 1.0f32 / (base as f32).powf(exponent);
        let wavelen = (1.0f32 / freq) * (2.0 * std::f64::consts::PI) as f32;
        let v = if wavelen < high_wavelen as f32 {
            1.0
        } else if wavelen > low_wavelen as f32 {
            factor as f32
        } else {
            let smooth = ((1.0f32 / wavelen) * old_ctx as f32 - low as f32) / (high - low) as f32;
            let denom = (1.0f32 - smooth) / factor as f32 + smooth;
            1.0f32 / denom
        };
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names() {
        let m = |n| map_tensor_name(Arch::Llama, n);
        assert_eq!(m("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(m("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(m("model.layers.12.self_attn.q_proj.weight").as_deref(), Some("blk.12.attn_q.weight"));
        assert_eq!(
            m("model.layers.3.post_attention_layernorm.weight").as_deref(),
            Some("blk.3.ffn_norm.weight")
        );
        assert_eq!(m("model.layers.3.self_attn.q_norm.weight"), None);
        assert_eq!(
            map_tensor_name(Arch::Qwen3, "model.layers.3.self_attn.k_norm.weight").as_deref(),
            Some("blk.3.attn_k_norm.weight")
        );
        assert_eq!(
            map_tensor_name(Arch::Qwen2, "model.layers.0.self_attn.v_proj.bias").as_deref(),
            Some("blk.0.attn_v.bias")
        );
        assert_eq!(m("model.layers.x.mlp.up_proj.weight"), None);
    }
}

//! Which ggml type each tensor gets.
//!
//! - F16, BF16, Q8_0: convert_hf_to_gguf.py's `prepare_tensors` with `--outtype`: 1-D tensors,
//!   `*_norm.weight` and anything not ending in `.weight` (biases) stay F32; every other weight
//!   takes the out type; Q8_0 falls back to F16 when a row is not a multiple of 32.
//! - Q4_0, Q4_K_M: llama-quantize (src/llama-quant.cpp, `llama_tensor_get_type`) run on the F16
//!   file with no importance matrix: tensors visited in the loader's order (non-layer tensors
//!   first, then by layer number, by name within a layer), the output (and the token embedding when
//!   tied) to Q6_K, Q4_K_M's attn_v and ffn_down "use_more_bits" layers to Q6_K, 70B-type models'
//!   attn_v to Q5_K, and `tensor_type_fallback` for rows that are not a whole number of blocks
//!   (Q4_K→Q5_0, Q6_K→Q8_0, a 32-block type or a fallback that still does not fit → F16).

use crate::codec::ggml::GgmlType;

use super::GgufTarget;

/// The type convert_hf_to_gguf.py gives a tensor (`new_name`: the GGUF name, `shape`: HF order).
pub fn converter_type(target: GgufTarget, new_name: &str, shape: &[usize]) -> GgmlType {
    if shape.len() <= 1 || new_name.ends_with("_norm.weight") || !new_name.ends_with(".weight") {
        return GgmlType::F32;
    }
    match target {
        GgufTarget::BF16 => GgmlType::BF16,
        GgufTarget::Q8_0 if shape.last().is_some_and(|n| n % 32 == 0) => GgmlType::Q8_0,
        _ => GgmlType::F16,
    }
}

/// llama-quantize's tensor order (`weight_name_comparer`): the layer number parsed from a
/// `blk.N.` prefix (-1 without one), then the name.
pub fn quantize_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn layer(n: &str) -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|d| {
                // sscanf("%d") reads leading digits.
                let digits: String = d.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .unwrap_or(-1)
    }
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

/// The model facts llama-quantize's type choice reads.
pub struct QuantModel {
    /// `hparams.n_layer` (block_count).
    pub n_layer: usize,
    /// `model.type == LLM_TYPE_70B`: llama with 80 layers and GQA, qwen2 with 80 layers.
    pub is_70b: bool,
}

/// One tensor as llama-quantize sees it in the F16 file.
pub struct QuantInput<'a> {
    pub name: &'a str,
    /// ggml order (ne0 first).
    pub dims: &'a [u64],
    pub ty: GgmlType,
}

/// The types llama-quantize writes, for tensors given in its visiting order ([`quantize_order`]).
pub fn quantize_types(target: GgufTarget, model: &QuantModel, tensors: &[QuantInput]) -> Vec<GgmlType> {
    let (default, q4_k_m) = match target {
        GgufTarget::Q4_0 => (GgmlType::Q4_0, false),
        GgufTarget::Q4_K_M => (GgmlType::Q4_K, true),
        _ => unreachable!("quantize_types is for llama-quantize's types"),
    };
    let is_attn_v = |n: &str| {
        n.contains("attn_v.weight") || n.contains("attn_qkv.weight") || n.contains("attn_kv_b.weight")
    };
    let n_attention_wv = tensors.iter().filter(|t| is_attn_v(t.name)).count() as i64;
    let has_tied = !tensors.iter().any(|t| t.name == "output.weight");
    let n_layer = model.n_layer as i64;
    let use_more_bits = |i: i64, n: i64| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
    let (mut i_attention_wv, mut i_ffn_down) = (0i64, 0i64);

    tensors
        .iter()
        .map(|t| {
            if !allows_quantization(t) {
                return t.ty;
            }
            let name = t.name;
            let ne0 = t.dims[0];
            let mut new_type = default;
            let is_output = name == "output.weight";
            let is_embd = name == "token_embd.weight" || name == "per_layer_token_embd.weight";
            if is_output || (has_tied && is_embd) {
                let qk = new_type.block_elems() as u64;
                if ne0 % qk != 0 {
                    new_type = GgmlType::Q8_0;
                } else if new_type != GgmlType::Q8_0 {
                    new_type = GgmlType::Q6_K;
                }
            } else if is_embd {
                // Only IQ/TQ file types change the token embedding.
            } else if is_attn_v(name) {
                if q4_k_m && use_more_bits(i_attention_wv, n_attention_wv) {
                    new_type = GgmlType::Q6_K;
                }
                if model.is_70b && new_type == GgmlType::Q4_K {
                    new_type = GgmlType::Q5_K;
                }
                i_attention_wv += 1;
            } else if name.contains("attn_k.weight")
                || name.contains("attn_q.weight")
                || name.contains("attn_output.weight")
            {
                // No change for Q4_0 / Q4_K_M without experts.
            } else if name.contains("ffn_up") || name.contains("ffn_gate") {
                // Counters only (no change for these file types).
            } else if name.contains("ffn_down") {
                if q4_k_m && use_more_bits(i_ffn_down, n_layer) {
                    new_type = GgmlType::Q6_K;
                }
                i_ffn_down += 1;
            }
            fallback(new_type, ne0)
        })
        .collect()
}

/// `tensor_allows_quantization` for the tensors of llama, mistral, qwen2 and qwen3.
fn allows_quantization(t: &QuantInput) -> bool {
    let n = t.name;
    t.dims.len() >= 2
        && n.ends_with("weight")
        && !n.contains("_norm.weight")
        && !n.contains("ffn_gate_inp.weight")
}

/// `tensor_type_fallback`.
fn fallback(target: GgmlType, ne0: u64) -> GgmlType {
    if ne0 % target.block_elems() as u64 == 0 {
        return target;
    }
    let ret = match target {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other, // a 32-block type: F16 below
    };
    if ne0 % ret.block_elems() as u64 != 0 {
        GgmlType::F16
    } else {
        ret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_order_is_layer_then_name() {
        let mut names = [
            "blk.10.attn_q.weight",
            "token_embd.weight",
            "blk.2.ffn_down.weight",
            "output.weight",
            "blk.2.attn_k.weight",
        ];
        names.sort_by(|a, b| quantize_order(a, b));
        assert_eq!(
            names,
            [
                "output.weight",
                "token_embd.weight",
                "blk.2.attn_k.weight",
                "blk.2.ffn_down.weight",
                "blk.10.attn_q.weight"
            ]
        );
    }

    #[test]
    fn q4_k_m_mixture_of_a_32_layer_model() {
        let n_layer = 32;
        let mut names = vec!["output.weight".to_string(), "token_embd.weight".to_string()];
        for l in 0..n_layer {
            for t in ["attn_norm.weight", "attn_q.weight", "attn_v.weight", "ffn_down.weight"] {
                names.push(format!("blk.{l}.{t}"));
            }
        }
        names.sort_by(|a, b| quantize_order(a, b));
        let dims2 = [4096u64, 4096];
        let dims1 = [4096u64];
        let inputs: Vec<QuantInput> = names
            .iter()
            .map(|n| {
                let one_d = n.contains("norm");
                QuantInput {
                    name: n,
                    dims: if one_d { &dims1 } else { &dims2 },
                    ty: if one_d { GgmlType::F32 } else { GgmlType::F16 },
                }
            })
            .collect();
        let types = quantize_types(GgufTarget::Q4_K_M, &QuantModel { n_layer, is_70b: false }, &inputs);
        let of = |n: &str| types[names.iter().position(|x| x == n).unwrap()];
        assert_eq!(of("output.weight"), GgmlType::Q6_K);
        assert_eq!(of("token_embd.weight"), GgmlType::Q4_K);
        assert_eq!(of("blk.0.attn_norm.weight"), GgmlType::F32);
        assert_eq!(of("blk.0.attn_q.weight"), GgmlType::Q4_K);
        // use_more_bits(i, 32): i < 4, i >= 28, (i - 4) % 3 == 2.
        let more: Vec<usize> =
            (0..32).filter(|&l| of(&format!("blk.{l}.attn_v.weight")) == GgmlType::Q6_K).collect();
        assert_eq!(more, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let more: Vec<usize> =
            (0..32).filter(|&l| of(&format!("blk.{l}.ffn_down.weight")) == GgmlType::Q6_K).collect();
        assert_eq!(more, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let q40 = quantize_types(GgufTarget::Q4_0, &QuantModel { n_layer, is_70b: false }, &inputs);
        assert_eq!(q40[0], GgmlType::Q6_K); // output.weight
        assert_eq!(q40[1], GgmlType::Q4_0);
    }

    #[test]
    fn fallbacks_for_rows_that_are_not_whole_blocks() {
        assert_eq!(fallback(GgmlType::Q4_K, 64), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6_K, 64), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q4_K, 48), GgmlType::F16);
        assert_eq!(fallback(GgmlType::Q4_0, 48), GgmlType::F16);
        assert_eq!(fallback(GgmlType::Q4_0, 64), GgmlType::Q4_0);
        assert_eq!(converter_type(GgufTarget::Q8_0, "blk.0.attn_q.weight", &[64, 48]), GgmlType::F16);
        assert_eq!(converter_type(GgufTarget::Q8_0, "blk.0.attn_q.bias", &[64]), GgmlType::F32);
        assert_eq!(converter_type(GgufTarget::BF16, "blk.0.attn_q_norm.weight", &[4, 4]), GgmlType::F32);
    }
}

//! Plan tests on small synthetic repositories. The byte-for-byte comparison with the real
//! converter is scripts/gguf_check.py (tests/gguf_converter.rs runs it when the tools exist).

use serde_json::json;

use super::*;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn llama_config(extra: serde_json::Value) -> Vec<u8> {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "bos_token_id": 7, "eos_token_id": 8
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn bpe_tokenizer() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "added_tokens": [
            {"id": 7, "content": "<|begin_of_text|>", "special": true, "normalized": false},
            {"id": 8, "content": "<|end_of_text|>", "special": true, "normalized": false},
            {"id": 9, "content": "hello world", "special": false, "normalized": true}
        ],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {}}]},
        "model": {"type": "BPE", "ignore_merges": true, "byte_fallback": false,
                  "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġa": 4},
                  "merges": [["a", "b"], ["Ġ", "a"]]}
    }))
    .unwrap()
}

fn tokenizer_config() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": "{{ messages }}", "tokenizer_class": "PreTrainedTokenizerFast"
    }))
    .unwrap()
}

fn llama_tensors(dtype: Dtype) -> Vec<HfTensor> {
    let t =
        |name: &str, shape: &[usize]| HfTensor { part: 0, name: name.into(), shape: shape.to_vec(), dtype };
    let mut v = vec![t("model.embed_tokens.weight", &[10, 64])];
    for l in 0..2 {
        let p = format!("model.layers.{l}.");
        v.push(t(&format!("{p}input_layernorm.weight"), &[64]));
        v.push(t(&format!("{p}self_attn.q_proj.weight"), &[64, 64]));
        v.push(t(&format!("{p}self_attn.k_proj.weight"), &[32, 64]));
        v.push(t(&format!("{p}self_attn.v_proj.weight"), &[32, 64]));
        v.push(t(&format!("{p}self_attn.o_proj.weight"), &[64, 64]));
        v.push(t(&format!("{p}post_attention_layernorm.weight"), &[64]));
        v.push(t(&format!("{p}mlp.gate_proj.weight"), &[96, 64]));
        v.push(t(&format!("{p}mlp.up_proj.weight"), &[96, 64]));
        v.push(t(&format!("{p}mlp.down_proj.weight"), &[64, 96]));
    }
    v.push(t("model.norm.weight", &[64]));
    v.push(t("lm_head.weight", &[10, 64]));
    v
}

fn llama_plan(target: GgufTarget) -> GgufPlan {
    let config = llama_config(json!({}));
    let tok = bpe_tokenizer();
    let tc = tokenizer_config();
    let files = ModelFiles {
        config: &config,
        tokenizer_json: Some(&tok),
        tokenizer_config: Some(&tc),
        ..Default::default()
    };
    plan(&files, &llama_tensors(Dtype::BF16), target, "tiny").unwrap()
}

#[test]
fn header_reads_back_and_layout_tiles_the_file() {
    for target in GgufTarget::ALL {
        let p = llama_plan(target);
        let f = parse_header(&p.header, p.size).unwrap();
        assert_eq!(f.kvs, p.kvs, "{target:?}");
        assert_eq!(f.data_offset, p.header.len() as u64);
        assert_eq!(f.tensors.len(), p.tensors.len());
        for (info, t) in f.tensors.iter().zip(&p.tensors) {
            assert_eq!((&info.name, &info.dims, info.ggml_type), (&t.name, &t.dims, t.ggml_type));
            assert_eq!(f.data_offset + info.offset, t.offset);
            assert_eq!(t.offset % 32, 0);
        }
        let mut at = 0;
        for s in p.segments() {
            let (o, l) = match s {
                Segment::Header { offset, len }
                | Segment::Padding { offset, len }
                | Segment::Tensor { offset, len, .. } => (offset, len),
            };
            assert_eq!(o, at);
            at += l;
        }
        assert_eq!(at, p.size);
        assert_eq!(p.size % 32, 0);
    }
}

#[test]
fn keys_in_the_converter_s_order() {
    let p = llama_plan(GgufTarget::F16);
    let keys: Vec<&str> = p.kvs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "general.type",
            "general.name",
            "general.size_label",
            "llama.block_count",
            "llama.context_length",
            "llama.embedding_length",
            "llama.feed_forward_length",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
            "llama.attention.key_length",
            "llama.attention.value_length",
            "general.file_type",
            "llama.vocab_size",
            "llama.rope.dimension_count",
            "general.quantization_version",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
            "tokenizer.ggml.add_sep_token",
            "tokenizer.chat_template",
        ]
    );
    assert_eq!(p.get("tokenizer.ggml.pre"), Some(&Value::str("llama-bpe")));
    assert_eq!(p.get("tokenizer.ggml.add_bos_token"), Some(&Value::Bool(true)));
    assert_eq!(p.get("tokenizer.ggml.add_sep_token"), Some(&Value::Bool(false)));
    assert_eq!(p.get("general.file_type"), Some(&Value::U32(1)));
    assert_eq!(p.get("llama.rope.freq_base"), Some(&Value::F32(500000.0)));
    let Some(Value::Array(ValueType::I32, types)) = p.get("tokenizer.ggml.token_type") else { panic!() };
    assert_eq!(&types[..], &[1, 1, 1, 1, 1, 5, 5, 3, 3, 4].map(Value::I32));
    let Some(Value::Array(_, tokens)) = p.get("tokenizer.ggml.tokens") else { panic!() };
    assert_eq!(tokens[5], Value::str("[PAD5]"));
    let Some(Value::Array(_, merges)) = p.get("tokenizer.ggml.merges") else { panic!() };
    assert_eq!(&merges[..], &[Value::str("a b"), Value::str("Ġ a")]);
    // Q4_K_M: the same keys, quantization_version and file_type moved to the end.
    let q = llama_plan(GgufTarget::Q4_K_M);
    let qkeys: Vec<&str> = q.kvs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(&qkeys[qkeys.len() - 2..], ["general.quantization_version", "general.file_type"]);
    assert_eq!(q.get("general.file_type"), Some(&Value::U32(15)));
    assert_eq!(qkeys.len(), keys.len());
}

#[test]
fn one_preparation_plans_all_five_files() {
    let config = llama_config(json!({}));
    let (tok, tc) = (bpe_tokenizer(), tokenizer_config());
    let files = ModelFiles {
        config: &config,
        tokenizer_json: Some(&tok),
        tokenizer_config: Some(&tc),
        ..Default::default()
    };
    let tensors = llama_tensors(Dtype::BF16);
    let prepared = prepare(&files, &tensors, "tiny").unwrap();
    let f16 = prepared.plan(GgufTarget::F16).unwrap();
    let key_order = |p: &GgufPlan| p.kvs.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    for target in GgufTarget::ALL {
        let shared = prepared.plan(target).unwrap();
        // The same file as planning it alone (the preparation is not changed by a plan).
        let alone = plan(&files, &tensors, target, "tiny").unwrap();
        assert_eq!(
            (&shared.header, shared.size, &shared.tensors),
            (&alone.header, alone.size, &alone.tensors)
        );
        assert_eq!(shared.get("general.file_type"), Some(&Value::U32(target.file_type())));
        if !target.via_quantize() {
            // The converter writes file_type where the F16 file has it, not appended.
            assert_eq!(key_order(&shared), key_order(&f16), "{target:?}");
        }
    }
    assert!(prepared.plan(GgufTarget::BF16).unwrap().tensors.iter().any(|t| t.ggml_type == GgmlType::BF16));
}

#[test]
fn tensor_names_types_and_order() {
    let p = llama_plan(GgufTarget::F16);
    // The converter's order: each shard's tensors sorted by HF name.
    let names: Vec<&str> = p.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        &names[..6],
        [
            "output.weight",
            "token_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.ffn_down.weight",
            "blk.0.ffn_gate.weight",
            "blk.0.ffn_up.weight"
        ]
    );
    assert_eq!(names.last(), Some(&"output_norm.weight"));
    let t = |n: &str| p.tensors.iter().find(|t| t.name == n).unwrap();
    assert_eq!(t("token_embd.weight").dims, [64, 10]);
    assert_eq!(t("blk.0.attn_norm.weight").ggml_type, GgmlType::F32);
    assert_eq!(t("blk.0.attn_q.weight").ggml_type, GgmlType::F16);
    assert!(matches!(
        t("blk.0.attn_q.weight").source,
        TensorSource::Hf { rows: RowMap::QkPermute { heads: 4 }, .. }
    ));
    assert!(matches!(
        t("blk.0.attn_k.weight").source,
        TensorSource::Hf { rows: RowMap::QkPermute { heads: 2 }, .. }
    ));
    assert!(matches!(t("blk.0.attn_v.weight").source, TensorSource::Hf { rows: RowMap::Identity, .. }));

    // Q4_K_M of a 64-wide model: every 256-block type falls back.
    let q = llama_plan(GgufTarget::Q4_K_M);
    let ty = |n: &str| q.tensors.iter().find(|t| t.name == n).unwrap().ggml_type;
    assert_eq!(q.tensors[0].name, "output.weight");
    assert_eq!(ty("output.weight"), GgmlType::Q8_0); // Q6_K → Q8_0
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q5_0); // Q4_K → Q5_0
                                                           // use_more_bits(i, 2) holds for layer 1 only: Q6_K → Q8_0 there, Q4_K → Q5_0 in layer 0.
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.1.ffn_down.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
    assert!(q.tensors.iter().any(|t| matches!(t.source, TensorSource::Hf { through_f16: true, .. })));
    let q4 = llama_plan(GgufTarget::Q4_0);
    assert_eq!(
        q4.tensors.iter().find(|t| t.name == "blk.1.ffn_down.weight").unwrap().ggml_type,
        GgmlType::Q4_0
    );
}

#[test]
fn permute_matches_the_converter_s_reshape() {
    // LlamaModel.permute: reshape(n, 2, rows/n/2, ...).swapaxes(1, 2).reshape(rows, ...).
    let (rows, heads) = (24, 3);
    let half = rows / heads / 2;
    let mut expect = Vec::new();
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                expect.push(h * 2 * half + j * half + i);
            }
        }
    }
    let got: Vec<usize> = (0..rows).map(|r| RowMap::QkPermute { heads }.src_row(r, rows)).collect();
    assert_eq!(got, expect);
}

#[test]
fn converts_rows_through_the_permute() {
    let p = llama_plan(GgufTarget::F16);
    let k = p.tensors.iter().find(|t| t.name == "blk.0.attn_k.weight").unwrap();
    // HF k_proj [32, 64] in bf16: row r holds the value r everywhere.
    let src: Vec<u8> = (0..32)
        .flat_map(|r| (0..64).flat_map(move |_| half::bf16::from_f32(r as f32).to_le_bytes()))
        .collect();
    let mut out = Vec::new();
    convert::convert_rows(k, &src, 0, 32, &mut out, &mut |_, _, _| Err("no".into())).unwrap();
    assert_eq!(out.len() as u64, k.len);
    let row = |r: usize| half::f16::from_le_bytes([out[r * 128], out[r * 128 + 1]]).to_f32() as usize;
    let want: Vec<usize> = (0..32).map(|r| RowMap::QkPermute { heads: 2 }.src_row(r, 32)).collect();
    assert_eq!((0..32).map(row).collect::<Vec<_>>(), want);
    // A sub-range gives the same bytes as the whole.
    let mut part = Vec::new();
    convert::convert_rows(k, &src, 5, 9, &mut part, &mut |_, _, _| Err("no".into())).unwrap();
    assert_eq!(part, out[5 * 128..9 * 128]);
}

#[test]
fn llama3_rope_freqs_tensor_comes_first() {
    let config =
        llama_config(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}));
    let tok = bpe_tokenizer();
    let files = ModelFiles { config: &config, tokenizer_json: Some(&tok), ..Default::default() };
    let p = plan(&files, &llama_tensors(Dtype::F32), GgufTarget::F16, "x").unwrap();
    assert_eq!(p.tensors[0].name, "rope_freqs.weight");
    assert_eq!(p.tensors[0].dims, [8]);
    let TensorSource::Computed(v) = &p.tensors[0].source else { panic!() };
    assert_eq!(v[0], 1.0);
    assert_eq!(v[7], 8.0);
}

#[test]
fn size_labels_are_gguf_py_s() {
    assert_eq!(size_label(1_234_567), "1.2M");
    assert_eq!(size_label(7_241_732_096), "7.2B");
    assert_eq!(size_label(494_032_768), "494M");
    assert_eq!(size_label(12_000), "12K");
    assert_eq!(size_label(400), "0.40K");
}

#[test]
fn bad_input_is_a_typed_error() {
    let tok = bpe_tokenizer();
    let with = |config: &[u8], tensors: &[HfTensor]| {
        let files = ModelFiles { config, tokenizer_json: Some(&tok), ..Default::default() };
        plan(&files, tensors, GgufTarget::F16, "x").unwrap_err()
    };
    let gpt2 = serde_json::to_vec(&json!({"architectures": ["GPT2LMHeadModel"]})).unwrap();
    assert!(
        matches!(with(&gpt2, &llama_tensors(Dtype::F16)), GgufError::UnsupportedArch(a) if a == "GPT2LMHeadModel")
    );
    let mut c: serde_json::Value = serde_json::from_slice(&llama_config(json!({}))).unwrap();
    c.as_object_mut().unwrap().remove("hidden_size");
    let e = with(&serde_json::to_vec(&c).unwrap(), &llama_tensors(Dtype::F16));
    assert_eq!(e, GgufError::MissingHparam("hidden_size".into()));
    let mut t = llama_tensors(Dtype::F16);
    t.push(HfTensor {
        part: 0,
        name: "model.layers.0.mystery.weight".into(),
        shape: vec![4],
        dtype: Dtype::F16,
    });
    assert!(matches!(with(&llama_config(json!({})), &t), GgufError::UnmappedTensor(_)));
    let t = vec![HfTensor {
        part: 0,
        name: "model.layers.5.input_layernorm.weight".into(),
        shape: vec![64],
        dtype: Dtype::F16,
    }];
    assert!(matches!(with(&llama_config(json!({})), &t), GgufError::BadTensor { .. }));
    let t = vec![HfTensor {
        part: 0,
        name: "model.embed_tokens.weight".into(),
        shape: vec![10, 64],
        dtype: Dtype::I32,
    }];
    assert!(matches!(with(&llama_config(json!({})), &t), GgufError::BadTensor { .. }));
    // A tokenizer the converter translates through transformers' LlamaHfVocab.
    let spm_bpe = serde_json::to_vec(
        &json!({"model": {"type": "BPE", "byte_fallback": true, "vocab": {}, "merges": []},
        "decoder": {"type": "Sequence", "decoders": []}}),
    )
    .unwrap();
    let config = llama_config(json!({}));
    let files = ModelFiles { config: &config, tokenizer_json: Some(&spm_bpe), ..Default::default() };
    assert!(matches!(
        plan(&files, &llama_tensors(Dtype::F16), GgufTarget::F16, "x"),
        Err(GgufError::Tokenizer(_))
    ));
    let files = ModelFiles { config: &config, ..Default::default() };
    assert!(matches!(
        plan(&files, &llama_tensors(Dtype::F16), GgufTarget::F16, "x"),
        Err(GgufError::Tokenizer(_))
    ));
    let files = ModelFiles { config: b"{", ..Default::default() };
    assert!(matches!(plan(&files, &[], GgufTarget::F16, "x"), Err(GgufError::BadJson { .. })));
}

#[test]
fn unknown_pre_tokenizer_is_default_with_a_warning() {
    let mut tj: serde_json::Value = serde_json::from_slice(&bpe_tokenizer()).unwrap();
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!("\\s+");
    let tok = serde_json::to_vec(&tj).unwrap();
    let config = llama_config(json!({}));
    let files = ModelFiles { config: &config, tokenizer_json: Some(&tok), ..Default::default() };
    let p = plan(&files, &llama_tensors(Dtype::F16), GgufTarget::F16, "x").unwrap();
    assert_eq!(p.get("tokenizer.ggml.pre"), Some(&Value::str("default")));
    assert_eq!(p.warnings.len(), 1);
}

#[test]
fn reader_refuses_every_truncation_and_corruption_without_panicking() {
    let p = llama_plan(GgufTarget::Q8_0);
    for cut in 0..p.header.len().min(4096) {
        let _ = parse_header(&p.header[..cut], p.size);
    }
    assert!(matches!(
        parse_header(&p.header[..100], p.size),
        Err(ReadError::Truncated(_) | ReadError::CountTooLarge { .. })
    ));
    assert!(matches!(parse_header(&p.header[..p.header.len() - 40], p.size), Err(ReadError::Truncated(_))));
    assert!(matches!(parse_header(&p.header, p.size - 1), Err(ReadError::BadRange { .. })));
    let mut bad = p.header.clone();
    bad[0] = b'X';
    assert!(matches!(parse_header(&bad, p.size), Err(ReadError::BadMagic(_))));
    // Flip every byte of the first 2 KiB once: errors or a header, never a panic.
    for i in 0..p.header.len().min(2048) {
        let mut b = p.header.clone();
        b[i] ^= 0xa5;
        let _ = parse_header(&b, p.size);
    }
    // Absurd counts are refused before any allocation.
    let mut huge = b"GGUF".to_vec();
    huge.extend_from_slice(&3u32.to_le_bytes());
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(parse(&huge), Err(ReadError::CountTooLarge { .. })));
}

#[test]
fn fuzz_seeds_parse_and_round_trip() {
    // The seeds of fuzz/corpus/{gguf,gguf_spm}: written by gguf-py's GGUFWriter and by hand.
    let seed = include_bytes!("../../../fuzz/corpus/gguf/tiny.gguf");
    let f = parse(seed).unwrap();
    assert_eq!(f.tensors.len(), 3);
    assert_eq!(f.get("general.name"), Some(&Value::str("seed")));
    assert_eq!(f.tensor("blk.0.attn_q.weight").unwrap().ggml_type, GgmlType::Q8_0);
    let header = value::encode_header(&f.kvs, &f.tensors, f.alignment);
    assert_eq!(&seed[..header.len()], &header[..], "gguf-py and llmfs encode headers alike");
    let pieces = spm::parse_model(include_bytes!("../../../fuzz/corpus/gguf_spm/small.model")).unwrap();
    assert_eq!(pieces.len(), 7);
    assert_eq!(pieces[5].kind, spm::PieceType::UserDefined);
}

mod props {
    use proptest::prelude::*;

    use super::*;

    fn valid_header() -> (Vec<u8>, u64) {
        let p = llama_plan(GgufTarget::Q4_K_M);
        (p.header, p.size)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// The fuzz target's property on mutated real headers: an error or a header that
        /// re-encodes to itself, never a panic.
        #[test]
        fn mutated_headers_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                       cut in any::<prop::sample::Index>()) {
            let (mut h, size) = valid_header();
            for (i, b) in edits {
                let i = i.index(h.len());
                h[i] = b;
            }
            let keep = cut.index(h.len() + 1);
            if let Ok(f) = parse_header(&h[..keep], size) {
                let again = value::encode_header(&f.kvs, &f.tensors, f.alignment);
                let re = parse_header(&again, size + again.len() as u64).unwrap();
                prop_assert_eq!((re.kvs, re.tensors), (f.kvs, f.tensors));
            }
        }

        #[test]
        fn random_protobuf_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = spm::parse_model(&data);
        }
    }
}

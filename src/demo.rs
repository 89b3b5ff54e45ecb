//! A generated LLaMA-shaped model: the demo's base, and the fixture of tests and benchmarks.
//!
//! Weights are seeded pseudo-random normals (std 0.02, norms near 1), so every run and every
//! machine gets the same bytes, and no download is needed. Files are written tensor by tensor, so
//! a multi-GB benchmark model never sits in memory whole.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::json;

use crate::format::{Dtype, HeaderBuilder};

/// The shape of a generated model.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub dtype: Dtype,
    /// Number of safetensors shards (1 = a single model.safetensors).
    pub shards: usize,
    pub seed: u64,
}

impl ModelSpec {
    /// A few MB: the demo and most tests.
    pub fn tiny() -> Self {
        ModelSpec {
            hidden: 256,
            intermediate: 688,
            layers: 4,
            heads: 4,
            kv_heads: 4,
            vocab: 2048,
            dtype: Dtype::BF16,
            shards: 2,
            seed: 7,
        }
    }

    /// Tensors in file order: (name, shape), grouped by layer so shards split between layers.
    pub fn tensors(&self) -> Vec<Vec<(String, Vec<usize>)>> {
        let (h, i, kv) = (self.hidden, self.intermediate, self.hidden / self.heads * self.kv_heads);
        let mut groups = vec![vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])]];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            groups.push(vec![
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            ]);
        }
        groups.push(vec![
            ("model.norm.weight".into(), vec![h]),
            ("lm_head.weight".into(), vec![self.vocab, h]),
        ]);
        groups
    }
}

/// Write config.json, tokenizer_config.json, generation_config.json and the weights into `dir`.
pub fn write_model(dir: &Path, spec: &ModelSpec) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let torch_dtype = match spec.dtype {
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
        _ => "bfloat16",
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": 2, "do_sample": true, "temperature": 0.7}),
    )?;

    let groups = spec.tensors();
    let shards = spec.shards.clamp(1, groups.len());
    let per_shard = groups.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut seed_index = 0u64;
    for (s, shard_groups) in groups.chunks(per_shard).enumerate() {
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
        };
        let tensors: Vec<&(String, Vec<usize>)> = shard_groups.iter().flatten().collect();
        let mut builder = HeaderBuilder::new().metadata("format", "pt");
        for (t, shape) in &tensors {
            builder.tensor(t, spec.dtype, shape);
            weight_map.insert(t.clone(), json!(name));
        }
        let (header, infos) = builder.build();
        let mut out = BufWriter::with_capacity(8 << 20, File::create(dir.join(&name))?);
        out.write_all(&header)?;
        for ((t, shape), info) in tensors.iter().zip(&infos) {
            let norm = t.ends_with("norm.weight");
            let bytes = random_tensor(
                spec.seed.wrapping_mul(1_000_003).wrapping_add(seed_index),
                shape.iter().product(),
                spec.dtype,
                norm,
            );
            debug_assert_eq!(bytes.len() as u64, info.len());
            out.write_all(&bytes)?;
            total += bytes.len() as u64;
            seed_index += 1;
        }
        out.flush()?;
    }
    if shards > 1 {
        write_json(
            &dir.join(crate::registry::INDEX_FILE),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    std::fs::write(path, bytes)
}

/// `n` values N(0, 0.02) (norm weights: 1 + N(0, 0.02)) as little-endian `dtype` bytes.
pub fn random_tensor(seed: u64, n: usize, dtype: Dtype, norm: bool) -> Vec<u8> {
    const BLOCK: usize = 1 << 16;
    let mut out = vec![0u8; n * dtype.size()];
    out.par_chunks_mut(BLOCK * dtype.size()).enumerate().for_each(|(b, chunk)| {
        let mut rng = SplitMix64(seed ^ (b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for e in chunk.chunks_mut(dtype.size()) {
            let v = rng.normal() * 0.02 + if norm { 1.0 } else { 0.0 };
            match dtype {
                Dtype::F32 => e.copy_from_slice(&v.to_le_bytes()),
                Dtype::F16 => e.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                _ => e.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
            }
        }
    });
    out
}

/// A tiny, good-enough PRNG (SplitMix64): deterministic across platforms, no dependency.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// `cp -r src dst`: the subdirectories of a model directory, copied as they are.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for item in std::fs::read_dir(src)? {
        let item = item?;
        let (from, to) = (item.path(), dst.join(item.file_name()));
        if from.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

/// Write a tokenizer.json into `dir`: byte-level BPE (GPT-2's pre-tokenizer and byte alphabet)
/// with `<unk>`, `<s>` and `</s>` at 0-2 (the ids [`write_model`]'s config names) and the 256 byte
/// symbols after them, no merges: every text tokenizes, one token a byte. Enough for tokenizers
/// and for a GGUF file's vocabulary (the demo's entries then show their `gguf/` views); the
/// model's vocabulary beyond these ids is padding.
pub fn write_byte_tokenizer(dir: &Path) -> io::Result<()> {
    let specials = ["<unk>", "<s>", "</s>"];
    let mut vocab = serde_json::Map::new();
    for (id, t) in specials.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
    }
    for (b, c) in byte_symbols().iter().enumerate() {
        vocab.insert(c.to_string(), json!(specials.len() + b));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(id, t)| json!({"id": id, "content": t, "special": true, "normalized": false, "single_word": false, "lstrip": false, "rstrip": false}))
        .collect();
    write_json(
        &dir.join("tokenizer.json"),
        &json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []}
        }),
    )
}

/// GPT-2's byte-level alphabet: the printable Latin-1 bytes stand for themselves, the others
/// for the characters from U+0100 on, in byte order (`bytes_to_unicode` in GPT-2's encoder.py).
fn byte_symbols() -> [char; 256] {
    let printable =
        |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 0x100;
    std::array::from_fn(|b| {
        let b = b as u32;
        if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        }
    })
}

/// Write a "fine-tune" of the model in `base_dir` into `out_dir`: every floating weight moved by
/// N(0, `scale` · 0.02) (about `scale` of the weights' std), rounded to its dtype; other files
/// (and subdirectories) copied. The header and tensor order are the base's.
pub fn write_finetune(base_dir: &Path, out_dir: &Path, scale: f32, seed: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(out_dir)?;
    let mut names: Vec<_> =
        std::fs::read_dir(base_dir)?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let (src, dst) = (base_dir.join(name), out_dir.join(name));
        if src.is_dir() {
            copy_tree(&src, &dst)?;
            continue;
        }
        if !name.to_string_lossy().ends_with(".safetensors") {
            std::fs::copy(&src, &dst)?;
            continue;
        }
        let file = File::open(&src)?;
        let header = crate::format::read_header(&file).map_err(io::Error::other)?;
        let mut out = BufWriter::with_capacity(8 << 20, File::create(&dst)?);
        let mut prefix = vec![0u8; header.data_start as usize];
        file.read_exact_at(&mut prefix, 0)?;
        out.write_all(&prefix)?;
        for (j, t) in header.tensors.iter().enumerate() {
            let mut bytes = vec![0u8; t.len() as usize];
            file.read_exact_at(&mut bytes, header.data_start + t.start)?;
            if t.dtype.is_float() {
                let noise = random_tensor(seed ^ ((i as u64) << 32 | j as u64), t.numel(), Dtype::F32, false);
                let esize = t.dtype.size();
                for (e, n) in bytes.chunks_mut(esize).zip(noise.chunks(4)) {
                    let d = f32::from_le_bytes(n.try_into().unwrap()) * scale;
                    match t.dtype {
                        Dtype::F32 => {
                            let x = f32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                            e.copy_from_slice(&(x + d).to_le_bytes())
                        }
                        Dtype::F16 => e.copy_from_slice(
                            &f16::from_f32(f16::from_le_bytes([e[0], e[1]]).to_f32() + d).to_le_bytes(),
                        ),
                        _ => e.copy_from_slice(
                            &bf16::from_f32(bf16::from_le_bytes([e[0], e[1]]).to_f32() + d).to_le_bytes(),
                        ),
                    }
                }
            }
            out.write_all(&bytes)?;
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_symbols_are_gpt2s() {
        let s = byte_symbols();
        // bytes_to_unicode()'s well-known images: NUL, newline, space, DEL, soft hyphen, ÿ.
        for (b, c) in
            [(0x00, 'Ā'), (0x0A, 'Ċ'), (0x20, 'Ġ'), (0x7F, 'ġ'), (0xAD, 'Ń'), (b'a', 'a'), (0xFF, 'ÿ')]
        {
            assert_eq!(s[b as usize], c, "byte {b:#04x}");
        }
        let distinct: std::collections::BTreeSet<char> = s.into_iter().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn generated_model_registers_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::tiny();
        write_model(&dir.path().join("a"), &spec).unwrap();
        write_model(&dir.path().join("b"), &spec).unwrap();
        let scanned = crate::registry::add::scan_model_dir(&dir.path().join("a")).unwrap();
        assert_eq!(scanned.tensor_count, 3 + 9 * spec.layers);
        let a = std::fs::read(dir.path().join("a/model-00001-of-00002.safetensors")).unwrap();
        let b = std::fs::read(dir.path().join("b/model-00001-of-00002.safetensors")).unwrap();
        assert_eq!(a, b);
    }
}

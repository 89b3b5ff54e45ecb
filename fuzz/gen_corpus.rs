//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/seed-*` from the tiny
//! model of harness.rs: real containers made by `quantize` and `delta make`, a real registry, a
//! real adapter. Run from `fuzz/`: `cargo run --bin gen_corpus` (then `cargo fuzz cmin`).

#[path = "harness.rs"]
mod harness;

use std::path::Path;

use llmfs::codec::delta as dcodec;
use llmfs::codec::quant::QuantConfig;
use llmfs::delta::DeltaCodec;
use llmfs::format::{self, Dtype};

fn seed(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn raw(json: &str, data: usize) -> Vec<u8> {
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.resize(v.len() + data, 0);
    v
}

fn main() {
    let fx = harness::fixture();
    let store = &fx.store;
    let weights = std::fs::read(fx.base_dir.join("model.safetensors")).unwrap();

    // safetensors_header
    seed("safetensors_header", "tiny-model", &weights);
    seed("safetensors_header", "empty", &raw("{}", 0));
    seed(
        "safetensors_header",
        "metadata",
        &raw(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F16","shape":[2,0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}  "#,
            3,
        ),
    );

    // quant_container: containers of a few configs, one seed per (config, tensor).
    let base_header = format::parse_header(&weights).unwrap();
    for (i, (bits, gs, sym)) in
        [(8u8, 8usize, true), (4, 5, false), (4, 16, true), (8, 12, false)].into_iter().enumerate()
    {
        let name = format!("q{i}");
        llmfs::quantize::quantize(
            store,
            &name,
            "base",
            QuantConfig { bits, group_size: gs, symmetric: sym },
            |_| {},
        )
        .unwrap();
        let container = std::fs::read(store.entry_dir(&name).join("model.safetensors")).unwrap();
        let flags = u8::from(bits == 4) | (u8::from(!sym) << 1) | (1 << 2); // BF16
        for t in ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"] {
            let shape = &base_header.tensor(t).unwrap().shape;
            let mut s = vec![flags];
            for v in [gs, shape[0], shape[1], 7, 300] {
                s.extend_from_slice(&(v as u16).to_le_bytes());
            }
            s.extend_from_slice(&container);
            seed("quant_container", &format!("{name}-{t}"), &s);
        }
    }

    // delta_chunk: real frames against the harness's base pattern.
    for (esize, elems, based) in [(2usize, 1000usize, true), (4, 333, false), (1, 4096, true), (8, 17, true)]
    {
        let base = harness::chunk_base(elems * esize, 1);
        let target: Vec<u8> =
            base.iter().enumerate().map(|(i, b)| if i % 7 == 0 { b ^ 1 } else { *b }).collect();
        let enc = dcodec::encode_lossless(&target, based.then_some(&base[..]), esize, 1);
        let mut s = vec![esize as u8, if based { 1 } else { 0 }];
        s.extend_from_slice(&(elems as u32).to_le_bytes()[..3]);
        s.extend_from_slice(enc.frame(0));
        seed("delta_chunk", &format!("e{esize}-n{elems}"), &s);
    }

    // delta_container: the containers `delta make` writes for a fine-tune, each codec.
    let ft = fx.root.join("finetune");
    llmfs::demo::write_finetune(&fx.base_dir, &ft, 0.1, 3).unwrap();
    for (ci, codec) in [DeltaCodec::Lossless, DeltaCodec::Q8, DeltaCodec::Bitdelta].into_iter().enumerate() {
        let name = format!("d{ci}");
        llmfs::delta::make::make_delta(store, &name, "base", &ft, codec, |_| {}).unwrap();
        for (fi, file) in ["model.safetensors", "config.json"].into_iter().enumerate() {
            let container = std::fs::read(store.entry_dir(&name).join(file)).unwrap();
            let t = base_header.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
            let flags = fi as u8 | ((ci as u8) << 1) | 0x80;
            let mut s = vec![flags];
            s.extend_from_slice(&(t.numel() as u32).to_le_bytes()[..3]);
            s.extend_from_slice(&(t.shape[0] as u16).to_le_bytes());
            s.extend_from_slice(&container);
            seed("delta_container", &format!("{}-{file}", codec.name()), &s);
        }
    }

    // registry: the fixture's catalogue with every kind of entry, and a hand-edited one.
    store
        .update(|r| {
            let base = r.get("base")?.clone();
            let kind = llmfs::registry::EntryKind::Cast { base: "base".into(), dtype: Dtype::F32 };
            r.entries.insert("f32".into(), llmfs::registry::Entry { kind, ..base });
            Ok(())
        })
        .unwrap();
    let reg = std::fs::read(store.registry_path()).unwrap();
    seed("registry", "store", &reg);
    seed("registry", "cycle", br#"{"version":1,"entries":{"a":{"kind":"cast","base":"b","dtype":"F16","info":{"simple_name":"","link":"","description":""},"family":"x","template":"t","created":0},"b":{"kind":"cast","base":"a","dtype":"F16","info":{"simple_name":"","link":"","description":""},"family":"x","template":"t","created":0}}}"#);

    // peft_config: a valid LoRA config with the default adapter, with its adapter spelled out,
    // and a FastChat delta.
    let cfg = harness::VALID_ADAPTER_CONFIG.as_bytes();
    let mut s = vec![0u8];
    s.extend_from_slice(&(cfg.len() as u16).to_le_bytes());
    s.extend_from_slice(cfg);
    seed("peft_config", "lora-default", &s);
    s.extend_from_slice(&harness::valid_adapter());
    seed("peft_config", "lora-adapter", &s);
    let mut s = vec![1u8, 2, 0];
    s.extend_from_slice(b"{}");
    seed("peft_config", "fastchat-default", &s);
}

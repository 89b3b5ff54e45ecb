//! Merge safetensors model directories with llmfs's mergekit code, no store and no mount:
//!
//! ```sh
//! cargo run --release --example merge_files -- CONFIG.yml OUT_DIR [--seed S] [--chunk N] [--torch-threads T]
//! ```
//!
//! `model:`/`base_model:` in the YAML are directories holding `config.json` and `*.safetensors`.
//! Writes `OUT_DIR/model.safetensors` (one file) and `OUT_DIR/config.json` (the base's, or the
//! first model's, with the merged `num_hidden_layers` and `torch_dtype`). `--chunk N` computes
//! every tensor in ranges of about N elements (the read path's shape) instead of whole;
//! scripts/mergekit_check.py compares the result with `mergekit-yaml`'s. `--torch-threads T`:
//! the intra-op thread count of the torch that ran mergekit (its sums over more than 32768
//! elements depend on it; `TensorMerge::threads`), 1 by default.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use llmfs::compute::mergekit::{encode, load_as, Stats};
use llmfs::format::Dtype;
use llmfs::merge::{plan_with_threads, MergeConfig, ModelTensors};

struct Model {
    /// tensor name → (dtype, shape, file bytes index, data range)
    tensors: BTreeMap<String, (Dtype, Vec<usize>, usize, std::ops::Range<usize>)>,
    files: Vec<Vec<u8>>,
}

fn st_dtype(d: safetensors::Dtype) -> Option<Dtype> {
    Some(match d {
        safetensors::Dtype::F16 => Dtype::F16,
        safetensors::Dtype::BF16 => Dtype::BF16,
        safetensors::Dtype::F32 => Dtype::F32,
        _ => return None,
    })
}

fn load_model(dir: &Path) -> Result<(Model, usize, serde_json::Value)> {
    let cfg_text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("{}/config.json", dir.display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&cfg_text)?;
    let layers = cfg["num_hidden_layers"].as_u64().context("config.json: num_hidden_layers")? as usize;
    let mut files = Vec::new();
    let mut tensors = BTreeMap::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    for p in paths {
        let bytes = std::fs::read(&p)?;
        let (n, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).with_context(|| p.display().to_string())?;
        let start = 8 + n;
        for (name, info) in meta.tensors() {
            let Some(dt) = st_dtype(info.dtype) else { continue };
            let (a, b) = info.data_offsets;
            tensors.insert(name.clone(), (dt, info.shape.clone(), files.len(), start + a..start + b));
        }
        files.push(bytes);
    }
    Ok((Model { tensors, files }, layers, cfg))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pos = Vec::new();
    let (mut seed, mut chunk, mut threads) = (0u64, 0usize, 1usize);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => seed = it.next().context("--seed S")?.parse()?,
            "--chunk" => chunk = it.next().context("--chunk N")?.parse()?,
            "--torch-threads" => threads = it.next().context("--torch-threads T")?.parse()?,
            _ => pos.push(a.clone()),
        }
    }
    let [config, out_dir] = pos.as_slice() else {
        bail!("usage: merge_files CONFIG.yml OUT_DIR [--seed S] [--chunk N]")
    };
    let cfg = MergeConfig::from_yaml(&std::fs::read_to_string(config)?)?;
    let mut models = BTreeMap::new();
    let mut infos = BTreeMap::new();
    let mut configs = BTreeMap::new();
    for m in cfg.referenced_models() {
        let (model, layers, c) = load_model(Path::new(&m))?;
        let tensors = model.tensors.iter().map(|(k, (d, s, _, _))| (k.clone(), (*d, s.clone()))).collect();
        let architecture = c["architectures"][0].as_str().map(str::to_owned);
        infos.insert(m.clone(), ModelTensors { tensors, num_layers: layers, architecture });
        models.insert(m.clone(), model);
        configs.insert(m, c);
    }
    let plan = plan_with_threads(&cfg, &infos, seed, threads)?;
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for r in &plan.tensors {
        let m = &r.merge;
        let parents: Vec<Vec<f32>> = r
            .inputs
            .iter()
            .map(|i| {
                let model = &models[&i.model];
                let (dt, _, f, range) = &model.tensors[&i.tensor];
                load_as(*dt, m.dtype, &model.files[*f][range.clone()])
            })
            .collect();
        let refs: Vec<&[f32]> = parents.iter().map(|p| p.as_slice()).collect();
        let stats = if m.needs_stats() { m.stats(&refs)? } else { Stats::None };
        let n = m.numel();
        let mut values = vec![0f32; n];
        let g = m.granularity();
        let step = if chunk == 0 { n.max(1) } else { chunk.div_ceil(g).max(1) * g };
        let mut start = 0;
        while start < n {
            let end = (start + step).min(n);
            let slices: Vec<&[f32]> = refs.iter().map(|p| &p[start..end]).collect();
            m.apply(&stats, &slices, start, &mut values[start..end])?;
            start = end;
        }
        out.push((r.name.clone(), r.out_dtype, m.shape.clone(), encode(r.out_dtype, &values)));
    }
    std::fs::create_dir_all(out_dir)?;
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(name, dt, shape, bytes)| {
            let d = match dt {
                Dtype::F16 => safetensors::Dtype::F16,
                Dtype::BF16 => safetensors::Dtype::BF16,
                _ => safetensors::Dtype::F32,
            };
            Ok((name.clone(), safetensors::tensor::TensorView::new(d, shape.clone(), bytes)?))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(meta), &Path::new(out_dir).join("model.safetensors"))?;
    let mut c = configs[&plan.config_source].clone();
    c["num_hidden_layers"] = plan.num_hidden_layers.into();
    if let Some(d) = plan.torch_dtype {
        c["torch_dtype"] = match d {
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            _ => "float32",
        }
        .into();
    }
    std::fs::write(Path::new(out_dir).join("config.json"), serde_json::to_string_pretty(&c)?)?;
    eprintln!("merge_files: {} tensors, {} layers -> {out_dir}", out.len(), plan.num_hidden_layers);
    Ok(())
}

//! `llmfs quantize`: store a base's linear weights group-wise quantized, FastChat's way.
//!
//! Reads each tensor of the base through its view (so the base may itself be a variant, e.g. a
//! cast), quantizes the linear weights on all cores, and writes one container per weight file into
//! a staging directory that is renamed into `STORE/models/NAME/` before the registry names it: a
//! crash leaves either no entry or a whole one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};

use half::{bf16, f16};

use crate::codec::quant::{self, QuantConfig, QuantFloat};
use crate::codec::quant_file;
use crate::format::{Dtype, HeaderBuilder};
use crate::registry::{self, io_err, Entry, EntryKind, Error, FileRecord, FileRole, Fingerprint, Store};
use crate::variant::{self, LogicalTensor};

/// Create quantized entry `name` from `base`. `progress` receives bytes of base tensors done.
pub fn quantize(
    store: &Store,
    name: &str,
    base: &str,
    config: QuantConfig,
    progress: impl Fn(u64) + Sync,
) -> Result<Entry, Error> {
    registry::validate_name(name)?;
    if !matches!(config.bits, 4 | 8) {
        return Err(Error::Invalid(format!("--bits {}: use 8 or 4", config.bits)));
    }
    if config.group_size == 0 {
        return Err(Error::Invalid("--group-size 0: a group needs at least one element".into()));
    }
    let registry = store.load()?;
    if registry.entries.contains_key(name) {
        return Err(Error::Exists(name.to_owned()));
    }
    let base_entry = registry.get(base)?.clone();
    // Re-quantizing dequantized values only adds error; quantize the original instead.
    for link in registry.ancestors(base)? {
        if let EntryKind::Quantized { .. } = registry.get(link)?.kind {
            return Err(Error::Invalid(format!(
                "{base} is already quantized (through {link}); quantize its base instead"
            )));
        }
    }
    let view = variant::build_view(&registry, base).map_err(|e| Error::Invalid(e.to_string()))?;
    for file in &view.files {
        crate::variant::check_sources(file)
            .map_err(|e| Error::Invalid(format!("{base}: {}: {e}", file.name)))?;
    }
    // A row shorter than the group, or not a multiple of it, is padded with zeros to whole groups,
    // as FastChat's compress does (compression.py:248-257; codec::quant): nothing to refuse.
    if !view.weights.values().flat_map(|w| &w.tensors).any(is_target) {
        return Err(Error::Invalid(format!("{base} has no linear weights to quantize")));
    }
    for t in view.weights.values().flat_map(|w| &w.tensors).filter(|t| is_target(t)) {
        config.check_shape(t.shape[0], t.shape[1]).map_err(|e| Error::Invalid(format!("{}: {e}", t.name)))?;
    }

    let staging = store.staging_dir(&format!("quantize-{name}"))?;
    let mut errors = BTreeMap::new();
    let mut records = vec![];
    for (file_name, weights) in &view.weights {
        let path = staging.path().join(file_name);
        write_container(&path, weights, config, &mut errors, &progress)?;
        let fingerprint = Fingerprint::of(&path).map_err(io_err(&path))?;
        records.push(FileRecord {
            name: file_name.clone(),
            role: FileRole::Weights,
            fingerprint,
            object: None,
        });
    }
    let entry = Entry {
        kind: EntryKind::Quantized { base: base.to_owned(), config, files: records, errors },
        info: registry::ModelInfo {
            simple_name: name.to_owned(),
            link: base_entry.info.link.clone(),
            description: format!(
                "{base} quantized to {} bits (group size {})",
                config.bits, config.group_size
            ),
        },
        family: base_entry.family,
        template: base_entry.template,
        chat_template: base_entry.chat_template,
        created: registry::now_secs(),
        generation: registry::new_generation(),
    };
    let entry = store.insert_staged(name, &entry, staging)?;
    Ok(entry)
}

fn is_target(t: &LogicalTensor) -> bool {
    quant_file::is_linear_weight(&t.name, &t.shape, t.source.dtype()) && t.shape.iter().all(|&d| d > 0)
}

fn write_container(
    path: &std::path::Path,
    weights: &variant::WeightFile,
    config: QuantConfig,
    errors: &mut BTreeMap<String, f64>,
    progress: &(impl Fn(u64) + Sync),
) -> Result<(), Error> {
    let mut builder = HeaderBuilder::new();
    for (k, v) in quant_file::metadata(&config) {
        builder = builder.metadata(k, &v);
    }
    let targets: Vec<&LogicalTensor> = weights.tensors.iter().filter(|t| is_target(t)).collect();
    for t in &targets {
        let (rows, cols, dtype) = (t.shape[0], t.shape[1], t.source.dtype());
        let groups = config.n_groups(rows, cols);
        builder.tensor(&format!("{}.q", t.name), Dtype::U8, &[config.q_len(rows, cols)]);
        builder.tensor(&format!("{}.scale", t.name), dtype, &[groups]);
        if !config.symmetric {
            builder.tensor(&format!("{}.min", t.name), dtype, &[groups]);
        }
    }
    let (header, _) = builder.build();
    let file = File::create(path).map_err(io_err(path))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    out.write_all(&header).map_err(io_err(path))?;
    for t in &targets {
        let numel = t.shape[0] * t.shape[1];
        let mut bytes = vec![0u8; numel * t.source.dtype().size()];
        t.source.read(0..numel, &mut bytes).map_err(|e| Error::Invalid(e.to_string()))?;
        let (parts, err) = match t.source.dtype() {
            Dtype::F16 => quantize_bytes::<f16>(&bytes, t.shape[0], t.shape[1], config),
            Dtype::BF16 => quantize_bytes::<bf16>(&bytes, t.shape[0], t.shape[1], config),
            _ => quantize_bytes::<f32>(&bytes, t.shape[0], t.shape[1], config),
        };
        for part in parts {
            out.write_all(&part).map_err(io_err(path))?;
        }
        errors.insert(t.name.clone(), err);
        progress(bytes.len() as u64);
    }
    let file = out.into_inner().map_err(|e| Error::Io { path: path.to_owned(), source: e.into_error() })?;
    file.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Quantize one tensor: its stored parts (q, scale, min) and its relative error ‖x'−x‖/‖x‖.
fn quantize_bytes<T: QuantFloat + bytemuck::Pod>(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    config: QuantConfig,
) -> (Vec<Vec<u8>>, f64) {
    let data: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
    let qt = quant::quantize(&data, rows, cols, config);
    let back = qt.dequantize();
    // Partial sums per piece on all cores, added in order: the same result on every run.
    use rayon::prelude::*;
    let partial: Vec<(f64, f64)> = data
        .par_chunks(1 << 16)
        .zip(back.par_chunks(1 << 16))
        .map(|(xs, ys)| {
            let (mut num, mut den) = (0f64, 0f64);
            for (x, y) in xs.iter().zip(ys) {
                let (x, y) = (x.to_f32() as f64, y.to_f32() as f64);
                num += (y - x) * (y - x);
                den += x * x;
            }
            (num, den)
        })
        .collect();
    let (num, den) = partial.iter().fold((0f64, 0f64), |(n, d), (pn, pd)| (n + pn, d + pd));
    let err = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    let mut parts = vec![qt.q, bytemuck::cast_slice(&qt.scale).to_vec()];
    if !config.symmetric {
        parts.push(bytemuck::cast_slice(&qt.min).to_vec());
    }
    (parts, err)
}

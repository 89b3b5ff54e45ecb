//! An entry's GGUF files (`gguf/<entry>-F16.gguf` …): the layout llama.cpp's converter writes
//! (`format::gguf::plan`), laid over the entry's own tensor sources, so a GGUF view of a delta,
//! a quantized copy or a merge is computed from what the mount serves for it.
//!
//! Each planned tensor is a [`GgmlSource`] over the entry's tensor of that name: a read of a
//! range of its ggml blocks converts the whole ggml rows holding them (the Q/K permute applied
//! to rows, each row cast, or quantized by ggml's reference quantizers in `codec::ggml`) and
//! keeps the blocks asked for. The header, the sizes and the offsets come from the plan, before
//! anything is converted, so `ls -l` shows every file's exact size for free.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::cache::with_scratch;
use crate::codec::ggml::{self, GgmlType};
use crate::format::gguf::dir::DirFiles;
use crate::format::gguf::{self, GgufTarget, HfTensor, PlannedTensor, RowMap};
use crate::format::{Dtype, StoredType};
use crate::source::ReadError;
use crate::variant::source::TensorSource;
use crate::variant::view::{read_whole, Content, EntryView, SynthFile, SynthTensor, VFile};

/// The folder the GGUF files are in, inside an entry.
pub const GGUF_DIR: &str = "gguf";

/// One tensor of a GGUF file: its plan and the entry's source of the tensor it comes from
/// (None for values the plan computed, such as Llama 3's `rope_freqs`).
#[derive(Debug)]
pub struct GgmlSource {
    pub planned: PlannedTensor,
    pub inner: Option<TensorSource>,
}

impl GgmlSource {
    pub fn ggml_type(&self) -> GgmlType {
        self.planned.ggml_type
    }

    pub fn stored_type(&self) -> StoredType {
        StoredType::Block(self.planned.ggml_type)
    }

    /// Blocks `blocks` (row-major over the tensor) into `out`.
    pub fn read(&self, blocks: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        if blocks.is_empty() {
            return Ok(());
        }
        let t = &self.planned;
        let ty = t.ggml_type;
        let row_blocks = (t.row_elems() as usize / ty.block_elems()).max(1);
        let (first, last) = (blocks.start / row_blocks, blocks.end.div_ceil(row_blocks));
        let bad = |reason: String| ReadError::Decode(format!("{}: {reason}", t.name));
        // The rows in output order, as the source's raw bytes, so the converter's own row cast
        // (or quantizer) runs on exactly what it would read. The bytes and the converted rows
        // live in per-thread buffers, reused from piece to piece: fresh ones cost a fill
        // zeroing and page faults of its whole size again (a sixth of a 2-core Q8_0 fill).
        match (&t.source, &self.inner) {
            (gguf::TensorSource::Hf { dtype, shape, rows, through_f16, .. }, Some(inner)) => {
                let n: usize = shape.iter().product();
                let hf_rows = shape.first().copied().unwrap_or(1).max(1);
                let unit = n / hf_rows;
                let row_elems = t.row_elems() as usize;
                let (a, b) = (first * row_elems, last * row_elems);
                let esize = dtype.size();
                with_scratch((b - a) * esize, |bytes| {
                    let mut e = a;
                    while e < b {
                        let (hf_row, within) = (e / unit, e % unit);
                        let take = (unit - within).min(b - e);
                        let at = rows.src_row(hf_row, hf_rows) * unit + within;
                        inner.read(at..at + take, &mut bytes[(e - a) * esize..(e - a + take) * esize])?;
                        e += take;
                    }
                    let mut sub = t.clone();
                    sub.dims =
                        std::iter::once(t.dims[0]).chain(std::iter::once((last - first) as u64)).collect();
                    sub.source = gguf::TensorSource::Hf {
                        name: t.name.clone(),
                        dtype: *dtype,
                        shape: vec![last - first, row_elems],
                        rows: RowMap::Identity,
                        through_f16: *through_f16,
                    };
                    convert_blocks(
                        &sub,
                        bytes,
                        (0, (last - first) as u64),
                        blocks.start - first * row_blocks,
                        out,
                    )
                })
            }
            (gguf::TensorSource::Computed(_), _) => {
                convert_blocks(t, &[], (first as u64, last as u64), blocks.start - first * row_blocks, out)
            }
            (gguf::TensorSource::Hf { .. }, None) => Err(bad("no source tensor".into())),
        }
    }
}

thread_local! {
    /// A thread's converted rows (see [`GgmlSource::read`]).
    static CONVERTED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows `rows` of `t` converted from `src`, and from them, `skip` blocks in, `out`'s bytes.
fn convert_blocks(
    t: &PlannedTensor,
    src: &[u8],
    (lo, hi): (u64, u64),
    skip: usize,
    out: &mut [u8],
) -> Result<(), ReadError> {
    let bad = |reason: String| ReadError::Decode(format!("{}: {reason}", t.name));
    let mut quantize = |ty: GgmlType, values: &[f32], out: &mut Vec<u8>| -> Result<(), String> {
        let n_per_row = t.row_elems() as usize;
        let at = out.len();
        out.resize(at + values.len() / ty.block_elems() * ty.block_bytes(), 0);
        ggml::quantize_rows(ty, values, n_per_row, &mut out[at..]).map_err(|e| e.to_string())
    };
    // Taken out while in use: a nested read on this thread (a rayon task run while waiting)
    // gets a fresh one rather than a borrow error.
    let mut converted = CONVERTED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    converted.clear();
    let result = gguf::convert::convert_rows(t, src, lo, hi, &mut converted, &mut quantize)
        .map_err(|e| bad(e.to_string()))
        .and_then(|()| {
            let from = skip * t.ggml_type.block_bytes();
            out.copy_from_slice(
                converted.get(from..from + out.len()).ok_or_else(|| bad("short conversion".into()))?,
            );
            Ok(())
        });
    CONVERTED.with(|c| *c.borrow_mut() = converted);
    result
}

/// The repository files the converter reads, from the view (as `DirFiles::read` takes them from
/// a directory).
fn model_files(view: &EntryView) -> Result<DirFiles, String> {
    let read = |name: &str| -> Result<Option<Vec<u8>>, String> {
        view.file(name).map(|f| read_whole(f).map_err(|e| format!("{name}: {e}"))).transpose()
    };
    DirFiles::with_config(read("config.json")?.ok_or("no config.json")?, read)
}

/// The GGUF files of entry `name` (view `view`), or why it has none (an architecture llama.cpp's
/// converter does not map the same way, a tokenizer that cannot be translated …).
pub fn files(name: &str, view: &EntryView) -> Result<Vec<VFile>, String> {
    files_with_notes(name, view).map(|(files, _)| files)
}

/// [`files`], and what their plans note, each once: the shared part's (an unknown pre-tokenizer,
/// served with the default) as they are, a file's own (a tensor kept in a fallback type) after
/// its type. `info` prints them and the mount logs them, so no such choice is made silently.
pub fn files_with_notes(name: &str, view: &EntryView) -> Result<(Vec<VFile>, Vec<String>), String> {
    let files = model_files(view)?;
    let model = files.model_files();
    // The shards in file-name order, as the converter reads them.
    let mut sources: HashMap<&str, &TensorSource> = HashMap::new();
    let mut tensors = vec![];
    for (part, (_, w)) in view.weights.iter().enumerate() {
        for t in &w.tensors {
            sources.insert(&t.name, &t.source);
            let dtype = t.source.dtype();
            if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(format!("tensor {} is {dtype}: GGUF views take float tensors", t.name));
            }
            tensors.push(HfTensor { part, name: t.name.clone(), shape: t.shape.clone(), dtype });
        }
    }
    // What the five files share (the tokenizer's translation above all) is planned once.
    let prepared = gguf::prepare(&model, &tensors, name).map_err(|e| e.to_string())?;
    let mut out = vec![];
    let mut notes = prepared.warnings.clone();
    for target in GgufTarget::ALL {
        let plan = prepared.plan(target).map_err(|e| e.to_string())?;
        notes.extend(
            plan.warnings
                .iter()
                .filter(|w| !prepared.warnings.contains(w))
                .map(|w| format!("{}: {w}", target.name())),
        );
        let mut synth = vec![];
        for planned in plan.tensors {
            let inner = match &planned.source {
                gguf::TensorSource::Hf { name: hf, .. } => {
                    Some((*sources.get(hf.as_str()).ok_or_else(|| format!("no tensor {hf}"))?).clone())
                }
                gguf::TensorSource::Computed(_) => None,
            };
            let (start, end) = (planned.offset, planned.offset + planned.len);
            synth.push(SynthTensor {
                name: planned.name.clone(),
                start,
                end,
                source: TensorSource::Ggml(Arc::new(GgmlSource { planned, inner })),
            });
        }
        let file = SynthFile::with_size(plan.header, synth, plan.size);
        out.push(VFile {
            name: format!("{GGUF_DIR}/{name}-{}.gguf", target.name()),
            size: plan.size,
            content: Content::Synth(Arc::new(file)),
        });
    }
    Ok((out, notes))
}

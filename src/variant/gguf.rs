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
        if let (gguf::TensorSource::Hf { dtype, shape, rows, through_f16, .. }, Some(inner)) =
            (&t.source, &self.inner)
        {
            if ty.block_elems() > 1 && matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                let from = Hf { dtype: *dtype, shape, rows: *rows, through_f16: *through_f16, inner };
                return self.quantize_blocks(from, blocks, out);
            }
        }
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

/// An HF source tensor as [`GgmlSource::quantize_blocks`] reads it.
struct Hf<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    rows: RowMap,
    through_f16: bool,
    inner: &'a TensorSource,
}

/// Elements read and quantized at a time by [`GgmlSource::quantize_blocks`]: a whole number of
/// blocks of every type (256 for the K-quants), few enough that the source's bytes and their
/// f32 values (64 KiB + 128 KiB for bf16) stay in the core's L2 cache from the read to the
/// quantizer, many enough that the reads' syscalls are a small part (one `pread` of 64 KiB).
const QUANTIZE_BATCH: usize = 32 * 1024;

/// Elements per `quantize_rows` call: what it quantizes on the calling thread without splitting
/// (its `TASK_ELEMS`), a whole number of blocks of every type.
const QUANTIZE_CALL: usize = 16 * 1024;

impl GgmlSource {
    /// Blocks `blocks` of a quantized tensor, quantized straight into `out`: each block of ggml's
    /// reference quantizers depends only on its own elements (no importance matrix), so only
    /// the blocks asked for are converted, not their whole rows, and in batches of
    /// [`QUANTIZE_BATCH`] elements read from the source, cast to f32 (through f16 where
    /// llama-quantize reads an F16 file) and quantized into their place in `out`, with no
    /// buffer of converted rows to zero, fill and copy out of (a third of a 2-core Q8_0 fill's
    /// user time went to those and the whole-row f32 values).
    fn quantize_blocks(&self, hf: Hf, blocks: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        let t = &self.planned;
        let ty = t.ggml_type;
        let bad = |reason: String| ReadError::Decode(format!("{}: {reason}", t.name));
        let (be, bb) = (ty.block_elems(), ty.block_bytes());
        if out.len() != blocks.len() * bb {
            return Err(bad(format!("{} bytes asked for {} blocks", out.len(), blocks.len())));
        }
        let n: usize = hf.shape.iter().product();
        let hf_rows = hf.shape.first().copied().unwrap_or(1).max(1);
        let unit = n / hf_rows;
        let (a, b) = (blocks.start * be, blocks.end * be);
        if b > n {
            return Err(bad(format!("blocks up to {} of a tensor of {n} elements", blocks.end)));
        }
        let esize = hf.dtype.size();
        // Taken out while in use, as CONVERTED is.
        let mut values = VALUES.with(|c| std::mem::take(&mut *c.borrow_mut()));
        let mut halves: Vec<half::f16> = vec![];
        let result = with_scratch(QUANTIZE_BATCH.min(b - a) * esize, |bytes| {
            let (mut e, mut o) = (a, 0);
            while e < b {
                let end = (e + QUANTIZE_BATCH).min(b);
                // The source's elements of output elements [e, end), in runs within one HF row.
                let mut f = e;
                while f < end {
                    let (hf_row, within) = (f / unit, f % unit);
                    let take = (unit - within).min(end - f);
                    let at = hf.rows.src_row(hf_row, hf_rows) * unit + within;
                    hf.inner.read(at..at + take, &mut bytes[(f - e) * esize..(f - e + take) * esize])?;
                    f += take;
                }
                let len = (end - e) / be * bb;
                let (src, dst) = (&bytes[..(end - e) * esize], &mut out[o..o + len]);
                if ty == GgmlType::Q8_0 && hf.dtype == Dtype::BF16 && !hf.through_f16 {
                    // A bf16 model's Q8_0 file, widened in registers (the common case).
                    ggml::quantize_q8_0_bf16(src, dst).map_err(|e| bad(e.to_string()))?;
                    (e, o) = (end, o + len);
                    continue;
                }
                values.clear();
                gguf::convert::extend_f32(&mut values, src, hf.dtype);
                if hf.through_f16 {
                    use half::slice::HalfFloatSliceExt;
                    halves.resize(values.len(), half::f16::ZERO);
                    halves.convert_from_f32_slice(&values);
                    halves.convert_to_f32_slice(&mut values);
                }
                // Blocks are independent: a "row" of one block only sets what is checked. In
                // calls of at most QUANTIZE_CALL elements, which quantize_rows runs on this
                // thread: a larger one it splits over the pool, a join per batch inside the
                // fill's own tasks (the pieces already keep every thread busy).
                for (v, d) in values.chunks(QUANTIZE_CALL).zip(dst.chunks_mut(QUANTIZE_CALL / be * bb)) {
                    ggml::quantize_rows(ty, v, be, d).map_err(|e| bad(e.to_string()))?;
                }
                (e, o) = (end, o + len);
            }
            Ok(())
        });
        VALUES.with(|c| *c.borrow_mut() = values);
        result
    }
}

thread_local! {
    /// A thread's f32 values of a batch (see [`GgmlSource::quantize_blocks`]).
    static VALUES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceFile;

    /// The direct path (only the blocks asked for, quantized in batches straight into the
    /// output) gives the bytes of the converter's whole-row conversion, for any block range:
    /// ranges starting and ending inside rows and batches, Q/K-permuted rows, the bf16 Q8_0
    /// kernel, f32 and f16 sources, and types that pass through f16.
    #[test]
    fn blocks_read_directly_are_the_whole_rows_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, cols) = (16usize, 4096usize);
        let n = rows * cols;
        let values: Vec<f32> =
            (0..n).map(|i| ((i * 7919 % 10007) as f32 - 5000.0) * 1e-3 * (1 + i % 5) as f32).collect();
        for (dtype, ty, through_f16) in [
            (Dtype::BF16, GgmlType::Q8_0, false),
            (Dtype::F16, GgmlType::Q8_0, false),
            (Dtype::F32, GgmlType::Q8_0, false),
            (Dtype::BF16, GgmlType::Q4_0, true),
            (Dtype::BF16, GgmlType::Q4_K, true),
            (Dtype::F32, GgmlType::Q6_K, true),
        ] {
            let bytes: Vec<u8> = match dtype {
                Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
                Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let path = dir.path().join(format!("{dtype}-{ty}"));
            std::fs::write(&path, &bytes).unwrap();
            let fingerprint = crate::registry::Fingerprint::of(&path).unwrap();
            let inner =
                TensorSource::Stored { file: Arc::new(SourceFile::new(path, fingerprint)), offset: 0, dtype };
            let planned = PlannedTensor {
                name: "blk.0.attn_q.weight".into(),
                dims: vec![cols as u64, rows as u64],
                ggml_type: ty,
                offset: 0,
                len: (rows * ty.row_bytes(cols).unwrap()) as u64,
                padding: 0,
                source: gguf::TensorSource::Hf {
                    name: "q".into(),
                    dtype,
                    shape: vec![rows, cols],
                    rows: RowMap::QkPermute { heads: 2 },
                    through_f16,
                },
            };
            let mut whole = vec![];
            let mut quantize = |ty: GgmlType, v: &[f32], out: &mut Vec<u8>| -> Result<(), String> {
                let at = out.len();
                out.resize(at + v.len() / ty.block_elems() * ty.block_bytes(), 0);
                ggml::quantize_rows(ty, v, cols, &mut out[at..]).map_err(|e| e.to_string())
            };
            gguf::convert::convert_rows(&planned, &bytes, 0, rows as u64, &mut whole, &mut quantize).unwrap();
            let source = GgmlSource { planned, inner: Some(inner) };
            let total = n / ty.block_elems();
            let bb = ty.block_bytes();
            for blocks in [
                0..total,
                3..total - 5,
                1..2,
                total / 3..total / 2 + 7,
                0..QUANTIZE_BATCH / ty.block_elems() + 1,
            ] {
                let mut out = vec![0u8; blocks.len() * bb];
                source.read(blocks.clone(), &mut out).unwrap();
                assert!(out == whole[blocks.start * bb..blocks.end * bb], "{dtype} {ty} blocks {blocks:?}");
            }
        }
    }
}

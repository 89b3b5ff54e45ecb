//! Quantized containers: how a quantized entry's codes and scales sit on disk, and how a range of
//! a tensor is read back from them.
//!
//! One container per base weight file, with the same file name, in `STORE/models/NAME/`. It is a
//! safetensors file (so standard tools open it) whose `__metadata__` names the codec and its
//! parameters, holding for each quantized tensor `T` of the base:
//!
//! ```text
//! T.q      U8            the codes (layout: codec::quant's module doc)
//! T.scale  <T's dtype>   one per group
//! T.min    <T's dtype>   one per group (asymmetric only)
//! ```
//!
//! Tensors that are not quantized (embeddings, norms, biases) are not stored: the variant reads
//! them from its base.

use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};

use super::quant::{QuantBytesView, QuantConfig, QuantFloat};
use crate::cache::with_scratch;
use crate::format::{Dtype, Header};
use crate::source::{ReadError, SourceFile};

pub const CODEC_NAME: &str = "fastchat-groupwise";

/// The codec's parameters as `__metadata__` entries.
pub fn metadata(cfg: &QuantConfig) -> Vec<(&'static str, String)> {
    vec![
        ("llmfs.codec", CODEC_NAME.to_owned()),
        ("llmfs.bits", cfg.bits.to_string()),
        ("llmfs.group_size", cfg.group_size.to_string()),
        ("llmfs.symmetric", cfg.symmetric.to_string()),
    ]
}

/// FastChat compresses the weights of `nn.Linear` modules (compression.py `get_compressed_list`).
/// Without the module tree, a Linear weight is a 2-D float tensor named `*.weight` that is not an
/// embedding; `lm_head` is a Linear and is quantized, as in FastChat.
pub fn is_linear_weight(name: &str, shape: &[usize], dtype: Dtype) -> bool {
    const EMBEDDINGS: [&str; 5] = ["embed", "wte", "wpe", "word_embeddings", "position_embeddings"];
    shape.len() == 2
        && dtype.is_float()
        && name.ends_with(".weight")
        && !EMBEDDINGS.iter().any(|e| name.contains(e))
        && !name.contains("norm")
}

/// A quantized tensor inside a container, read a range at a time.
#[derive(Debug)]
pub struct QuantSource {
    pub file: Arc<SourceFile>,
    pub q_offset: u64,
    pub scale_offset: u64,
    /// Absent when symmetric.
    pub min_offset: Option<u64>,
    pub rows: usize,
    pub cols: usize,
    pub config: QuantConfig,
    pub dtype: Dtype,
}

impl QuantSource {
    /// Locate tensor `name` (of base shape `shape`, dtype `dtype`) in a container's header, checking
    /// every stored length against what the shape and config imply. `Ok(None)`: not quantized.
    pub fn find(
        file: &Arc<SourceFile>,
        header: &Header,
        name: &str,
        shape: &[usize],
        dtype: Dtype,
        config: QuantConfig,
    ) -> Result<Option<QuantSource>, String> {
        let Some(q) = header.tensor(&format!("{name}.q")) else { return Ok(None) };
        let [rows, cols] = shape else { return Err(format!("{name}: quantized but not 2-D")) };
        let (rows, cols) = (*rows, *cols);
        let scale = header.tensor(&format!("{name}.scale")).ok_or_else(|| format!("{name}.scale missing"))?;
        let min = header.tensor(&format!("{name}.min"));
        // Before any arithmetic with the config: a hand-edited registry may hold group size 0.
        config.check_shape(rows, cols).map_err(|e| format!("{name}: {e}"))?;
        let groups = config.n_groups(rows, cols) as u64;
        let expect_min = if config.symmetric { None } else { Some(groups * dtype.size() as u64) };
        if q.len() != config.q_len(rows, cols) as u64
            || scale.len() != groups * dtype.size() as u64
            || scale.dtype != dtype
            || min.map(|m| m.len()) != expect_min
        {
            return Err(format!(
                "{name}: stored codes or scales do not match shape {shape:?} and {config:?}"
            ));
        }
        Ok(Some(QuantSource {
            file: file.clone(),
            q_offset: header.data_start + q.start,
            scale_offset: header.data_start + scale.start,
            min_offset: min.map(|m| header.data_start + m.start),
            rows,
            cols,
            config,
            dtype,
        }))
    }

    /// Dequantize elements `elems` (row-major) into `out` (little-endian `dtype` bytes), reading
    /// only the rows they touch.
    pub fn read(&self, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        if elems.is_empty() {
            return Ok(());
        }
        let cfg = self.config;
        let (pc, gpr) = (cfg.padded_cols(self.cols), cfg.groups_per_row(self.cols));
        let last_row = (elems.end - 1) / self.cols;
        let mut first_row = elems.start / self.cols;
        // 4-bit codes are two a byte: start at a row whose first code begins a byte.
        if cfg.bits == 4 && (first_row * pc) % 2 == 1 {
            first_row -= 1;
        }
        let rows = last_row + 1 - first_row;
        let code_start = first_row * pc;
        let (q_start, q_len) = match cfg.bits {
            4 => (code_start / 2, cfg.q_len(rows, self.cols)),
            _ => (code_start, cfg.q_len(rows, self.cols)),
        };
        let esize = self.dtype.size();
        let (g_start, g_len) = (first_row * gpr * esize, rows * gpr * esize);
        let min_len = if self.min_offset.is_some() { g_len } else { 0 };
        // Codes, scales and minimums in this thread's scratch: a fresh buffer per chunk cost
        // a memset of its megabyte.
        with_scratch(q_len + g_len + min_len, |buf| {
            let (q, rest) = buf.split_at_mut(q_len);
            let (scale, min) = rest.split_at_mut(g_len);
            self.file.read_exact_at(q, self.q_offset + q_start as u64)?;
            self.file.read_exact_at(scale, self.scale_offset + g_start as u64)?;
            if let Some(off) = self.min_offset {
                self.file.read_exact_at(min, off + g_start as u64)?;
            }
            let local = elems.start - first_row * self.cols..elems.end - first_row * self.cols;
            match self.dtype {
                Dtype::F16 => decode::<f16>(rows, self.cols, cfg, q, scale, min, local, out),
                Dtype::BF16 => decode::<bf16>(rows, self.cols, cfg, q, scale, min, local, out),
                Dtype::F32 => decode::<f32>(rows, self.cols, cfg, q, scale, min, local, out),
                other => Err(ReadError::Decode(format!("quantized tensor of dtype {other}"))),
            }
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn decode<T: QuantFloat>(
    rows: usize,
    cols: usize,
    cfg: QuantConfig,
    q: &[u8],
    scale: &[u8],
    min: &[u8],
    elems: Range<usize>,
    out: &mut [u8],
) -> Result<(), ReadError> {
    let view = QuantBytesView::new::<T>(rows, cols, cfg, q, scale, min)
        .map_err(|e| ReadError::Decode(e.to_string()))?;
    if !crate::compute::backend::dequantize_on_gpu::<T>(view, elems.clone(), out) {
        super::quant::dequantize_range_bytes::<T>(view, elems, out);
    }
    Ok(())
}

//! Where tensor bytes come from: stored bytes in a file, or a recipe over another source.

use std::ops::Range;
use std::sync::Arc;

use crate::cache::with_scratch;
use crate::codec::quant_file::QuantSource;
use crate::compute;
use crate::delta::import::LazyFactors;
use crate::delta::source::{LosslessSource, LossySource};
use crate::format::Dtype;
use crate::source::{ReadError, SourceFile};

/// How the bytes of one tensor are produced.
#[derive(Clone, Debug)]
pub enum TensorSource {
    /// Stored verbatim at `offset` in `file`.
    Stored { file: Arc<SourceFile>, offset: u64, dtype: Dtype },
    /// Another tensor converted to `to`.
    Cast { inner: Arc<TensorSource>, to: Dtype },
    /// Group-wise quantized codes and scales in a container, dequantized.
    Dequant(Arc<QuantSource>),
    /// A delta-coded tensor applied to its base (or stored whole).
    Delta(Arc<LosslessSource>),
    /// A lossy (q8 or bitdelta) delta applied to its base.
    LossyDelta(Arc<LossySource>),
    /// FastChat's apply_delta: `f16(base + delta)`, both f16.
    AddF16 { base: Arc<TensorSource>, delta: Arc<TensorSource> },
    /// A LoRA merge `W + s·B·A` of a 2-D weight with `cols` columns.
    Lora { base: Arc<TensorSource>, factors: Arc<LazyFactors>, cols: usize },
}

impl TensorSource {
    pub fn dtype(&self) -> Dtype {
        match self {
            TensorSource::Stored { dtype, .. } => *dtype,
            TensorSource::Cast { to, .. } => *to,
            TensorSource::Dequant(q) => q.dtype,
            TensorSource::Delta(d) => d.dtype,
            TensorSource::LossyDelta(d) => d.dtype,
            TensorSource::AddF16 { .. } => Dtype::F16,
            TensorSource::Lora { base, .. } => base.dtype(),
        }
    }

    /// Bytes stored verbatim can be read straight into the reply, without decoding or caching.
    pub fn as_stored(&self) -> Option<(&SourceFile, u64)> {
        match self {
            TensorSource::Stored { file, offset, .. } => Some((file, *offset)),
            _ => None,
        }
    }

    /// The files this tensor reads from (checked when a file that contains it is opened).
    pub fn files(&self, out: &mut Vec<Arc<SourceFile>>) {
        match self {
            TensorSource::Stored { file, .. } => out.push(file.clone()),
            TensorSource::Cast { inner, .. } => inner.files(out),
            TensorSource::Dequant(q) => out.push(q.file.clone()),
            TensorSource::Delta(d) => {
                out.push(d.file.clone());
                if let Some(base) = &d.base {
                    base.files(out);
                }
            }
            TensorSource::LossyDelta(d) => {
                out.push(d.file.clone());
                d.base.files(out);
            }
            TensorSource::AddF16 { base, delta } => {
                base.files(out);
                delta.files(out);
            }
            TensorSource::Lora { base, .. } => base.files(out),
        }
    }

    /// Produce elements `elems` (row-major element indices) into `out`
    /// (`out.len() == elems.len() * dtype().size()`).
    pub fn read(&self, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
        match self {
            TensorSource::Stored { file, offset, dtype } => {
                file.read_exact_at(out, offset + (elems.start * dtype.size()) as u64)
            }
            TensorSource::Cast { inner, to } => {
                let from = inner.dtype();
                with_scratch(elems.len() * from.size(), |tmp| {
                    inner.read(elems, tmp)?;
                    compute::backend::cast(from, *to, tmp, out).map_err(|e| ReadError::Decode(e.to_string()))
                })
            }
            TensorSource::Dequant(q) => q.read(elems, out),
            TensorSource::Delta(d) => d.read(elems, out),
            TensorSource::LossyDelta(d) => d.read(elems, out),
            TensorSource::AddF16 { base, delta } => with_scratch(out.len(), |b| {
                base.read(elems.clone(), b)?;
                out.copy_from_slice(b);
                let mut d = vec![0u8; out.len()];
                delta.read(elems, &mut d)?;
                compute::backend::add_f16(b, &d, out);
                Ok(())
            }),
            TensorSource::Lora { base, factors, cols } => {
                let f = factors.get()?;
                with_scratch(out.len(), |w| {
                    base.read(elems.clone(), w)?;
                    compute::backend::lora_rows(&f, base.dtype(), *cols, elems, w, out)
                        .map_err(|e| ReadError::Decode(format!("LoRA merge: {e}")))
                })
            }
        }
    }
}

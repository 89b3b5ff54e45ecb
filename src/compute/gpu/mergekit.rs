//! mergekit's elementwise apply on the GPU (`shaders/mergekit_apply.wgsl`): linear and the
//! generalized task arithmetic rows (task_arithmetic, TIES, DARE, breadcrumbs, with or without
//! sign consensus and rescale) over at most 9 inputs (8 parents and a base), bit-identical to
//! [`TensorMerge::apply_cpu`]. The whole-tensor statistics (cut-offs, ties, rescale factors)
//! come from the CPU ([`TensorMerge::stats`]) and travel as parameters; DELLA (ranks within a
//! row), SLERP, NuSLERP, model stock and passthrough are [`GpuError::Unsupported`]: the caller
//! runs the CPU kernel.

use half::f16;

use super::{pad4, pieces, Chunk, GpuContext, GpuError, Groups, Kernel, Upload, WG};
use crate::compute::mergekit::{
    plain_divisor, scalar, stream_key, work_dtype, Gta, Keep, Kernel as Method, ParentStats, Sparsify, Stats,
    TensorMerge,
};
use crate::format::Dtype;

/// Inputs one dispatch takes (the shader's per-parent parameter slots).
pub const MAX_INPUTS: usize = 9;

/// u32 words of the shader's `Params` (16 header words, 24 + 3 vec4s).
const PARAM_WORDS: usize = 16 + 4 * 24 + 4 * 3;

fn dtype_code(d: Dtype) -> Result<u32, GpuError> {
    match d {
        Dtype::F32 => Ok(0),
        Dtype::F16 => Ok(1),
        Dtype::BF16 => Ok(2),
        other => Err(GpuError::Unsupported(format!("merges in {other}"))),
    }
}

/// Whether the GPU kernel computes this merge (else [`GpuContext::mergekit_apply`] answers
/// [`GpuError::Unsupported`]): linear or generalized task arithmetic without DELLA, at most
/// [`MAX_INPUTS`] inputs, in f32, f16 or bf16.
pub fn supported(m: &TensorMerge, inputs: usize) -> bool {
    inputs <= MAX_INPUTS
        && dtype_code(m.dtype).is_ok()
        && match &m.kernel {
            Method::Linear { weights, .. } => weights.len() == inputs,
            Method::Gta(g) => m.base.is_some_and(|b| b < inputs) && g.sparsify != Some(Sparsify::Della),
            _ => false,
        }
}

/// One non-base parent's parameters as the shader reads them (three vec4s).
fn parent_words(
    m: &TensorMerge,
    g: &Gta,
    k: usize,
    ps: &ParentStats,
    ties: (u32, u32),
) -> Result<[u32; 12], GpuError> {
    let d = m.dtype;
    let work = match g.sparsify {
        Some(Sparsify::Random) | Some(Sparsify::Della) => work_dtype(d),
        _ => d,
    };
    let (kind, a, b) = match (&ps.keep, g.sparsify) {
        (_, None) | (Keep::All, _) => (0u32, 0u32, 0u32),
        (Keep::Nothing, _) => (1, 0, 0),
        (Keep::Top { mag, .. }, _) => (2, mag.to_bits(), 0),
        (Keep::Band { lo, hi, .. }, _) => (3, lo.to_bits(), hi.to_bits()),
        (Keep::Random { p }, _) => (4, p.to_bits(), 0),
        (Keep::Della { .. }, _) => return Err(GpuError::Unsupported("DELLA's row ranks".into())),
    };
    let stream = stream_key(m.seed, m.name_key, k);
    let weight = scalar(d, g.parents[k].weight).to_bits();
    Ok([
        kind,
        a,
        b,
        ps.factor.is_some() as u32,
        ps.factor.unwrap_or(1.0).to_bits(),
        ties.0,
        ties.1,
        weight,
        stream as u32,
        (stream >> 32) as u32,
        dtype_code(work)?,
        0,
    ])
}

/// The sorted tie list of a parent's cut-off (empty for the other masks).
fn tie_list(ps: &ParentStats) -> &[u32] {
    match &ps.keep {
        Keep::Top { ties, .. } | Keep::Band { ties, .. } => ties,
        _ => &[],
    }
}

impl GpuContext {
    /// [`TensorMerge::apply_cpu`] on the GPU, bit-identical: elements `[start, start +
    /// out.len())` of the merged tensor from the inputs' same range (`parents[i]`: input `i`'s
    /// values in the compute dtype), as values of the compute dtype. The range checks are the
    /// caller's ([`TensorMerge::apply`] makes them before it dispatches).
    pub fn mergekit_apply(
        &self,
        m: &TensorMerge,
        stats: &Stats,
        parents: &[&[f32]],
        start: usize,
        out: &mut [f32],
    ) -> Result<(), GpuError> {
        let len = out.len();
        let k = parents.len();
        if !supported(m, k) {
            return Err(GpuError::Unsupported(format!("this merge ({k} inputs, {})", m.dtype)));
        }
        if parents.iter().any(|p| p.len() != len) {
            return Err(GpuError::Input("merge: parents' ranges differ in length".into()));
        }
        if len == 0 {
            return Ok(());
        }
        let d = m.dtype;
        let dc = dtype_code(d)?;
        let mut header = [0u32; 16];
        header[4] = k as u32;
        header[6] = dc;
        header[7] = dc;
        let mut lin_w = [0u32; 12];
        let mut per: Vec<&ParentStats> = Vec::new();
        let all = ParentStats { keep: Keep::All, factor: None };
        let gta = match &m.kernel {
            Method::Linear { weights, normalize } => {
                let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
                let mut den = 0f32;
                for (o, &x) in lin_w.iter_mut().zip(&w) {
                    *o = x.to_bits();
                    den += x;
                }
                header[3] = 0;
                header[10] = *normalize as u32;
                header[14] = den.to_bits();
                None
            }
            Method::Gta(g) => {
                let b = m.base.expect("supported");
                for kk in 0..k - 1 {
                    per.push(match stats {
                        Stats::Gta(v) => v
                            .get(kk)
                            .ok_or_else(|| GpuError::Input("merge: statistics for fewer parents".into()))?,
                        _ if !m.needs_stats() => &all,
                        _ => return Err(GpuError::Input("merge: statistics of another method".into())),
                    });
                }
                let w: Vec<f32> = g.parents.iter().map(|p| scalar(d, p.weight)).collect();
                let plain_div = plain_divisor(d, &w);
                header[3] = 1;
                header[5] = b as u32;
                header[9] = g.consensus as u32;
                header[10] = g.normalize as u32;
                header[11] = (g.lambda != 1.0) as u32;
                header[12] = (g.lambda as f32).to_bits();
                header[13] = plain_div.to_bits();
                if g.parents.len() < k - 1 {
                    return Err(GpuError::Input("merge: parameters for fewer parents".into()));
                }
                Some(g)
            }
            _ => unreachable!("supported"),
        };
        // The inputs' values as the compute dtype's bytes (exact: they are values of it), so
        // 16-bit merges move half the bytes.
        let packed: Vec<u16>;
        let esize = d.size();
        let values: Vec<&[u8]> = match d {
            Dtype::F32 => parents.iter().map(|p| bytemuck::cast_slice(p)).collect(),
            _ => {
                let mut v = vec![0u16; k * len];
                for (dst, p) in v.chunks_exact_mut(len).zip(parents) {
                    if d == Dtype::BF16 {
                        for (o, x) in dst.iter_mut().zip(p.iter()) {
                            *o = (x.to_bits() >> 16) as u16;
                        }
                    } else {
                        for (o, &x) in dst.iter_mut().zip(p.iter()) {
                            *o = f16::from_f32(x).to_bits();
                        }
                    }
                }
                packed = v;
                packed.chunks_exact(len).map(bytemuck::cast_slice).collect()
            }
        };
        // Elements per dispatch: every input's values, the tie lists (4 bytes an element at
        // most) and the f32 output within the chunk limit.
        let step = self.chunk_elems(4 * k, 2);
        let ranges: Vec<_> = pieces(len, step).collect();
        // Each chunk's tie lists, concatenated, and each parent's (offset, count) in them.
        let mut tie_bufs: Vec<Vec<u32>> = Vec::with_capacity(ranges.len());
        let mut tie_spans: Vec<Vec<(u32, u32)>> = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let (a, e) = (start + r.start, start + r.end);
            let mut buf = Vec::new();
            let mut spans = Vec::new();
            for ps in &per {
                let t = tie_list(ps);
                let lo = t.partition_point(|&x| (x as usize) < a);
                let hi = t.partition_point(|&x| (x as usize) < e);
                spans.push((buf.len() as u32, (hi - lo) as u32));
                buf.extend_from_slice(&t[lo..hi]);
            }
            tie_bufs.push(buf);
            tie_spans.push(spans);
        }
        let mut chunks = Vec::with_capacity(ranges.len());
        for (ci, r) in ranges.iter().enumerate() {
            let n = r.len();
            let first = (start + r.start) as u64;
            let stride_bytes = pad4((n * esize) as u64);
            let mut params = vec![0u32; PARAM_WORDS];
            params[..16].copy_from_slice(&header);
            params[0] = n as u32;
            params[1] = first as u32;
            params[2] = (first >> 32) as u32;
            params[8] = (stride_bytes / 4) as u32;
            if let Some(g) = gta {
                for (kk, ps) in per.iter().enumerate() {
                    let words = parent_words(m, g, kk, ps, tie_spans[ci][kk])?;
                    params[16 + 12 * kk..16 + 12 * (kk + 1)].copy_from_slice(&words);
                }
            }
            params[16 + 96..].copy_from_slice(&lin_w);
            let vals = Upload {
                size: stride_bytes * k as u64,
                pieces: values
                    .iter()
                    .enumerate()
                    .map(|(j, v)| (j as u64 * stride_bytes, &v[r.start * esize..r.end * esize]))
                    .collect(),
            };
            let ties = if tie_bufs[ci].is_empty() {
                Upload::zeros()
            } else {
                Upload::bytes(bytemuck::cast_slice(&tie_bufs[ci]))
            };
            chunks.push(Chunk {
                params,
                inputs: vec![vals, ties],
                out_at: r.start * 4,
                out_len: n * 4,
                out_bytes: (n * 4) as u64,
                groups: Groups::Linear((n as u64).div_ceil(WG)),
                clear_out: false,
                staged: false,
            });
        }
        self.run(Kernel::MergekitApply, chunks, bytemuck::cast_slice_mut(out))
    }
}

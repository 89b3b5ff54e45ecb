//! The kernel methods of [`GpuContext`]: each checks its buffers like the CPU kernel it
//! mirrors, cuts the work into [`Chunk`]s and runs them. Same inputs and outputs as the CPU
//! kernels (little-endian bytes), but errors instead of panics.

use std::ops::Range;

use super::{pad4, pieces, Chunk, GpuContext, GpuError, Groups, Kernel, Upload, WG};
use crate::compute::delta_ops::{bitdelta_rows, bitdelta_sign_bytes, Transform};
use crate::compute::float::{QuantBytesView, QuantFloat};
use crate::compute::merge::LoraFactors;
use crate::format::Dtype;

/// The kernels' dtype codes (`float_bits.wgsl`: 0 = F32, 1 = F16, 2 = BF16).
fn dtype_code(d: Dtype) -> Result<u32, GpuError> {
    match d {
        Dtype::F32 => Ok(0),
        Dtype::F16 => Ok(1),
        Dtype::BF16 => Ok(2),
        other => Err(GpuError::Unsupported(format!("dtype {other}"))),
    }
}

fn input(ok: bool, what: impl FnOnce() -> String) -> Result<(), GpuError> {
    if ok {
        Ok(())
    } else {
        Err(GpuError::Input(what()))
    }
}

/// Workgroups for `words` one-word-per-invocation outputs.
fn linear(words: u64) -> Groups {
    Groups::Linear(words.div_ceil(WG))
}

impl GpuContext {
    /// `codec::quant::dequantize_range_bytes` on the GPU: elements `elems` of the
    /// quantized tensor as little-endian bytes of `T`, bit-identical.
    pub fn dequantize_range_bytes<T: QuantFloat>(
        &self,
        qt: QuantBytesView<'_>,
        elems: Range<usize>,
        out: &mut [u8],
    ) -> Result<(), GpuError> {
        let dtype = match T::DTYPE {
            "F32" => 0u32,
            "F16" => 1,
            _ => 2,
        };
        let cfg = qt.config;
        let (rows, cols) = (qt.rows, qt.cols);
        input(out.len() == elems.len() * T::SIZE, || {
            format!("output of {} bytes for {} elements", out.len(), elems.len())
        })?;
        input(elems.start <= elems.end && elems.end <= rows * cols, || {
            format!("range {elems:?} outside {rows}x{cols}")
        })?;
        input(cfg.check_shape(rows, cols).is_ok(), || format!("bad quantization config {cfg:?}"))?;
        input(
            qt.q.len() == cfg.q_len(rows, cols)
                && qt.scale.len() == cfg.n_groups(rows, cols) * T::SIZE
                && qt.min.len() == if cfg.symmetric { 0 } else { qt.scale.len() },
            || "quantized buffers do not match the shape".into(),
        )?;
        if elems.is_empty() {
            return Ok(());
        }
        let (bits, gs) = (cfg.bits as usize, cfg.group_size);
        let padded = cfg.padded_cols(cols);
        let gpr = cfg.groups_per_row(cols);
        // Codes a u32 holds; code and group windows start on word boundaries.
        let per_word = 32 / bits;
        let per_word_g = 4 / T::SIZE;
        // Bytes of q one chunk of `m` elements may touch: whole padded rows when the group
        // is wider than the row (FastChat allows it).
        let q_bytes = |m: usize| (m / cols + 2) * padded * bits / 8;
        let mut step = self.chunk_elems(T::SIZE.max(1), 2);
        while step > 2 && q_bytes(step) as u64 > self.chunk_bytes {
            step /= 2;
        }
        let mut chunks = Vec::new();
        for r in pieces(elems.len(), step) {
            let (a, b) = (elems.start + r.start, elems.start + r.end);
            let (r0, c0) = (a / cols, a % cols);
            let (r1, c1) = ((b - 1) / cols, (b - 1) % cols);
            let (k0, k1) = (r0 * padded + c0, r1 * padded + c1);
            let k_start = k0 / per_word * per_word;
            let q_bytes = &qt.q[k_start * bits / 8..((k1 + 1) * bits).div_ceil(8).min(qt.q.len())];
            let (g0, g1) = (r0 * gpr + c0 / gs, r1 * gpr + c1 / gs);
            let g_start = g0 / per_word_g * per_word_g;
            let sc = &qt.scale[g_start * T::SIZE..(g1 + 1) * T::SIZE];
            let mn = if cfg.symmetric {
                Upload::zeros()
            } else {
                Upload::bytes(&qt.min[g_start * T::SIZE..(g1 + 1) * T::SIZE])
            };
            let n = r.len();
            let out_bytes = pad4((n * T::SIZE) as u64);
            let params = vec![
                n as u32,
                cols as u32,
                padded as u32,
                gs as u32,
                gpr as u32,
                c0 as u32,
                (k0 - k_start) as u32,
                (g0 - g_start) as u32,
                bits as u32,
                cfg.symmetric as u32,
                dtype,
                (c0 / gs) as u32,
            ];
            chunks.push(Chunk {
                params,
                inputs: vec![Upload::bytes(q_bytes), Upload::bytes(sc), mn],
                out_at: r.start * T::SIZE,
                out_len: n * T::SIZE,
                out_bytes,
                groups: linear(out_bytes / 4),
                clear_out: false,
                staged: false,
            });
        }
        self.run(Kernel::Dequantize, chunks, out)
    }

    /// [`crate::compute::cast::cast`] on the GPU, bit-identical.
    pub fn cast(&self, from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<(), GpuError> {
        let (fc, tc) = (dtype_code(from)?, dtype_code(to)?);
        let n = src.len() / from.size();
        input(src.len() == n * from.size() && dst.len() == n * to.size(), || "cast: lengths".into())?;
        if from == to {
            dst.copy_from_slice(src);
            return Ok(());
        }
        let step = self.chunk_elems(4, 2);
        let chunks = pieces(n, step)
            .map(|r| {
                let out_bytes = pad4((r.len() * to.size()) as u64);
                Chunk {
                    params: vec![r.len() as u32, fc, tc],
                    inputs: vec![Upload::bytes(&src[r.start * from.size()..r.end * from.size()])],
                    out_at: r.start * to.size(),
                    out_len: r.len() * to.size(),
                    out_bytes,
                    groups: linear(out_bytes / 4),
                    clear_out: false,
                    staged: false,
                }
            })
            .collect();
        self.run(Kernel::Cast, chunks, dst)
    }

    /// [`crate::compute::merge::add_f16`] on the GPU (FastChat's fp16 delta add), bit-identical.
    pub fn add_f16(&self, a: &[u8], b: &[u8], out: &mut [u8]) -> Result<(), GpuError> {
        input(a.len() == b.len() && a.len() == out.len() && a.len() % 2 == 0, || "add_f16: lengths".into())?;
        let n = a.len() / 2;
        let step = self.chunk_elems(2, 2);
        let chunks = pieces(n, step)
            .map(|r| {
                let bytes = 2 * r.start..2 * r.end;
                Chunk {
                    params: vec![r.len() as u32],
                    inputs: vec![Upload::bytes(&a[bytes.clone()]), Upload::bytes(&b[bytes.clone()])],
                    out_at: bytes.start,
                    out_len: bytes.len(),
                    out_bytes: pad4(bytes.len() as u64),
                    groups: linear(r.len().div_ceil(2) as u64),
                    clear_out: false,
                    staged: false,
                }
            })
            .collect();
        self.run(Kernel::AddF16, chunks, out)
    }

    /// `codec::delta::decode_bitdelta_range` on the GPU, bit-identical; the same
    /// slicing contract for `signs`, `scales`, `base` and `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_bitdelta_range(
        &self,
        signs: &[u8],
        scales: &[f32],
        base: &[u8],
        dtype: Dtype,
        cols: usize,
        elems: Range<usize>,
        out: &mut [u8],
    ) -> Result<(), GpuError> {
        let dc = dtype_code(dtype)?;
        let e = dtype.size();
        input(cols > 0 || elems.is_empty(), || "bitdelta: zero columns".into())?;
        if elems.is_empty() {
            return Ok(());
        }
        input(signs.len() == bitdelta_sign_bytes(&elems).len(), || "bitdelta: signs".into())?;
        input(scales.len() == bitdelta_rows(cols, &elems).len(), || "bitdelta: scales".into())?;
        input(base.len() == elems.len() * e && out.len() == base.len(), || "bitdelta: base/out".into())?;
        let (byte0, row0) = (elems.start / 8, elems.start / cols);
        let scale_bytes: &[u8] = bytemuck::cast_slice(scales);
        let step = self.chunk_elems(4, 8);
        let chunks = pieces(elems.len(), step)
            .map(|r| {
                let (a, b) = (elems.start + r.start, elems.start + r.end);
                let sg = &signs[a / 8 - byte0..(b - 1) / 8 - byte0 + 1];
                let sc = &scale_bytes[4 * (a / cols - row0)..4 * ((b - 1) / cols - row0 + 1)];
                let out_bytes = pad4((r.len() * e) as u64);
                Chunk {
                    params: vec![r.len() as u32, cols as u32, (a % cols) as u32, (a % 8) as u32, dc],
                    inputs: vec![
                        Upload::bytes(sg),
                        Upload::bytes(sc),
                        Upload::bytes(&base[r.start * e..r.end * e]),
                    ],
                    out_at: r.start * e,
                    out_len: r.len() * e,
                    out_bytes,
                    groups: linear(out_bytes / 4),
                    clear_out: false,
                    staged: false,
                }
            })
            .collect();
        self.run(Kernel::Bitdelta, chunks, out)
    }

    /// `codec::delta::inverse_from_planes` on the GPU (the lossless delta's inverse
    /// transform, after the CPU has decompressed a chunk's planes), bit-identical. Element
    /// sizes 1, 2, 4 and 8 only (every float and integer dtype); others are
    /// [`GpuError::Unsupported`].
    pub fn inverse_from_planes(
        &self,
        tr: Transform,
        esize: usize,
        planes: &[u8],
        base: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<(), GpuError> {
        self.delta_apply(tr, esize, planes, base, out, true)
    }

    /// `codec::delta::delta_inverse` on the GPU (no planes), bit-identical.
    pub fn delta_inverse(
        &self,
        tr: Transform,
        esize: usize,
        delta: &[u8],
        base: &[u8],
        out: &mut [u8],
    ) -> Result<(), GpuError> {
        self.delta_apply(tr, esize, delta, Some(base), out, false)
    }

    fn delta_apply(
        &self,
        tr: Transform,
        esize: usize,
        delta: &[u8],
        base: Option<&[u8]>,
        out: &mut [u8],
        planes: bool,
    ) -> Result<(), GpuError> {
        if !matches!(esize, 1 | 2 | 4 | 8) {
            return Err(GpuError::Unsupported(format!("{esize}-byte elements in a delta")));
        }
        input(out.len() % esize == 0 && delta.len() == out.len(), || "delta: lengths".into())?;
        input(base.is_none_or(|b| b.len() == out.len()), || "delta: base length".into())?;
        let n = out.len() / esize;
        let trc = match tr {
            Transform::Xor => 0u32,
            Transform::Sub => 1,
            Transform::Ulp => 2,
        };
        let step = self.chunk_elems(esize, 4);
        let chunks = pieces(n, step)
            .map(|r| {
                let m = r.len();
                let stride = pad4(m as u64);
                let d = if planes {
                    Upload {
                        size: stride * esize as u64,
                        pieces: (0..esize)
                            .map(|k| (k as u64 * stride, &delta[k * n + r.start..k * n + r.end]))
                            .collect(),
                    }
                } else {
                    Upload::bytes(&delta[r.start * esize..r.end * esize])
                };
                let b = base.map_or(Upload::zeros(), |b| Upload::bytes(&b[r.start * esize..r.end * esize]));
                let out_bytes = pad4((m * esize) as u64);
                let words = if esize == 8 { m as u64 } else { out_bytes / 4 };
                Chunk {
                    params: vec![
                        m as u32,
                        esize as u32,
                        trc,
                        planes as u32,
                        stride as u32,
                        base.is_some() as u32,
                    ],
                    inputs: vec![d, b],
                    out_at: r.start * esize,
                    out_len: m * esize,
                    out_bytes,
                    groups: linear(words),
                    clear_out: false,
                    staged: false,
                }
            })
            .collect();
        self.run(Kernel::DeltaApply, chunks, out)
    }

    /// [`crate::compute::merge::lora_rows`] on the GPU: elements `elems` (row-major over W's
    /// `cols`) of `W + scale · B·A`, `w` holding the same elements of W in `dtype`. Within the
    /// f32-accumulation bound of the module doc.
    pub fn lora_rows(
        &self,
        f: &LoraFactors,
        dtype: Dtype,
        cols: usize,
        elems: Range<usize>,
        w: &[u8],
        out: &mut [u8],
    ) -> Result<(), GpuError> {
        let dc = dtype_code(dtype)?;
        let e = dtype.size();
        let r = f.rank;
        input(w.len() == elems.len() * e && out.len() == w.len(), || "lora: w/out lengths".into())?;
        if elems.is_empty() {
            return Ok(());
        }
        input(r > 0 && cols > 0 && f.a.len() % r == 0 && f.b.len() % r == 0, || {
            "lora: factor shapes".into()
        })?;
        let (a_cols, b_rows) = (f.a.len() / r, f.b.len() / r); // A is r × in, B is out × r
                                                               // L (rows × r) and R (r × cols) of W's stored orientation.
        let (lt, rt);
        let (left, right): (&[f32], &[f32]) = if f.transposed {
            input(cols == b_rows, || "lora: W's columns are not B's rows".into())?;
            lt = (0..a_cols)
                .flat_map(|i| (0..r).map(move |j| (i, j)))
                .map(|(i, j)| f.a[j * a_cols + i])
                .collect::<Vec<f32>>();
            rt = (0..r)
                .flat_map(|j| (0..b_rows).map(move |o| (j, o)))
                .map(|(j, o)| f.b[o * r + j])
                .collect::<Vec<f32>>();
            (&lt, &rt)
        } else {
            input(cols == a_cols, || "lora: W's columns are not A's columns".into())?;
            (&f.b, &f.a)
        };
        let rows_total = left.len() / r;
        input(elems.end <= rows_total * cols, || {
            format!("lora: range {elems:?} outside {rows_total}x{cols}")
        })?;
        let right_bytes: &[u8] = bytemuck::cast_slice(right);
        let left_bytes: &[u8] = bytemuck::cast_slice(left);
        let (first_row, last_row) = (elems.start / cols, (elems.end - 1) / cols);
        // Rows per chunk: W's and out's bytes within the chunk limit, tiles within the grid.
        let row_bytes = (cols * e.max(4)).max(r * 4) as u64;
        let rows_step =
            ((self.chunk_bytes / row_bytes).max(1) as usize).min(self.max_groups_per_dim() as usize * 64);
        input((self.max_groups_per_dim() as usize) * 64 >= cols, || {
            "lora: rows too long for one dispatch".into()
        })?;
        let mut chunks = Vec::new();
        for rr in pieces(last_row + 1 - first_row, rows_step) {
            let (ra, rb) = (first_row + rr.start, first_row + rr.end);
            let (ga, gb) = ((ra * cols).max(elems.start), (rb * cols).min(elems.end));
            let n = gb - ga;
            let e_off = ga - ra * cols;
            let out_bytes = pad4((n * e) as u64);
            chunks.push(Chunk {
                params: vec![
                    (rb - ra) as u32,
                    cols as u32,
                    r as u32,
                    dc,
                    e_off as u32,
                    n as u32,
                    (f.scale).to_bits(),
                    0,
                ],
                inputs: vec![
                    Upload::bytes(&left_bytes[ra * r * 4..rb * r * 4]),
                    Upload::bytes(right_bytes),
                    Upload::bytes(&w[(ga - elems.start) * e..(gb - elems.start) * e]),
                ],
                out_at: (ga - elems.start) * e,
                out_len: n * e,
                out_bytes,
                groups: Groups::Grid(cols.div_ceil(64) as u32, (rb - ra).div_ceil(64) as u32),
                clear_out: e == 2 && (cols % 2 == 1 || e_off % 2 == 1 || n % 2 == 1),
                // f32 elements are stored one word per access, two apart: strided over PCIe.
                staged: e == 4,
            });
        }
        self.run(Kernel::Lora, chunks, out)
    }
}

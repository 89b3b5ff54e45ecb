//! Whole tensors in and out of ggml blocks: what the GGUF writer calls.
//!
//! ggml quantizes a tensor as one long row (`ggml_quantize_chunk` hands `nrows * n_per_row`
//! elements to `quantize_row_*_ref`): every block depends only on its own elements, so the
//! blocks are split over rayon's threads in chunks, and the bytes are the same for any thread
//! count. `n_per_row` is only checked (a row must hold whole blocks, as llama.cpp requires).

use rayon::prelude::*;

use bytemuck::Pod;

use super::block::{BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0};
use super::float::{bf16_to_fp32, fp16_to_fp32, fp32_to_bf16, fp32_to_fp16};
use super::{kquants, legacy, GgmlError, GgmlType, QK_K};

/// Elements per rayon task: 64 KiB of f32, small enough to balance a K-quant's ~1 ms per task
/// over 16 cores on a 4096x4096 tensor, large enough that Q8_0's tasks stay cheap to schedule.
const TASK_ELEMS: usize = 16 * 1024;

/// Checks the shapes and returns the number of bytes the output has.
fn check(ty: GgmlType, elems: usize, n_per_row: usize) -> Result<usize, GgmlError> {
    if n_per_row == 0 || !ty.fits_row(n_per_row) {
        return Err(GgmlError::RowNotWholeBlocks { ty, n_per_row, block: ty.block_elems() });
    }
    if elems % n_per_row != 0 {
        return Err(GgmlError::PartialRow { elems, n_per_row });
    }
    Ok(elems / ty.block_elems() * ty.block_bytes())
}

/// Quantizes (or converts) `src`, rows of `n_per_row` f32 elements, into `dst` as ggml type
/// `ty`: the bytes `ggml_quantize_chunk(ty, src, dst, 0, nrows, n_per_row, NULL)` writes.
/// `dst` must be exactly `nrows * ty.row_bytes(n_per_row)` long.
pub fn quantize_rows(ty: GgmlType, src: &[f32], n_per_row: usize, dst: &mut [u8]) -> Result<(), GgmlError> {
    let want = check(ty, src.len(), n_per_row)?;
    if dst.len() != want {
        return Err(GgmlError::DstSize { ty, want, got: dst.len() });
    }
    match ty {
        GgmlType::F32 => {
            for (o, v) in dst.chunks_exact_mut(4).zip(src) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => convert(src, dst, fp32_to_fp16),
        GgmlType::BF16 => convert(src, dst, fp32_to_bf16),
        GgmlType::Q4_0 => blocks::<BlockQ4_0, 32>(src, dst, q4_0::run),
        GgmlType::Q4_1 => blocks::<BlockQ4_1, 32>(src, dst, q4_1::run),
        GgmlType::Q5_0 => blocks::<BlockQ5_0, 32>(src, dst, q5_0::run),
        GgmlType::Q5_1 => blocks::<BlockQ5_1, 32>(src, dst, q5_1::run),
        GgmlType::Q8_0 => blocks::<BlockQ8_0, 32>(src, dst, q8_0::run),
        GgmlType::Q4_K => blocks::<BlockQ4K, QK_K>(src, dst, q4_k::run),
        GgmlType::Q5_K => blocks::<BlockQ5K, QK_K>(src, dst, q5_k::run),
        GgmlType::Q6_K => blocks::<BlockQ6K, QK_K>(src, dst, q6_k::run),
    }
    Ok(())
}

/// [`quantize_rows`] to Q8_0 of bf16 values (`src`: their little-endian bytes, a whole number
/// of 32-value blocks), widened to f32 exactly (torch's `.to(float32)`): the same bytes as
/// widening them first, without the f32 values in memory. On the calling thread: a GGUF fill
/// calls it per batch, from its own tasks.
pub fn quantize_q8_0_bf16(src: &[u8], dst: &mut [u8]) -> Result<(), GgmlError> {
    let ty = GgmlType::Q8_0;
    if src.len() % 64 != 0 {
        return Err(GgmlError::PartialRow { elems: src.len() / 2, n_per_row: 32 });
    }
    let want = src.len() / 64 * ty.block_bytes();
    if dst.len() != want {
        return Err(GgmlError::DstSize { ty, want, got: dst.len() });
    }
    q8_0_bf16::run(src, bytemuck::cast_slice_mut(dst));
    Ok(())
}

/// [`quantize_q8_0_bf16`]'s loop, compiled for AVX2 where the CPU has it (as [`kernels!`]).
mod q8_0_bf16 {
    use super::*;

    #[inline(always)]
    fn baseline(xs: &[u8], ys: &mut [BlockQ8_0]) {
        for (x, y) in xs.chunks_exact(64).zip(ys.iter_mut()) {
            legacy::quantize_q8_0_bf16(x.try_into().expect("chunks_exact(64)"), y);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2(xs: &[u8], ys: &mut [BlockQ8_0]) {
        baseline(xs, ys)
    }

    pub(super) fn run(xs: &[u8], ys: &mut [BlockQ8_0]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2(xs, ys) };
        }
        baseline(xs, ys)
    }
}

/// Decodes `src` (rows of `n_per_row` elements of type `ty`) into f32, as ggml's
/// `dequantize_row_*` (and its fp16/bf16 conversions) do. `dst.len()` is the element count.
pub fn dequantize_rows(ty: GgmlType, src: &[u8], n_per_row: usize, dst: &mut [f32]) -> Result<(), GgmlError> {
    let want = check(ty, dst.len(), n_per_row)?;
    if src.len() != want {
        return Err(GgmlError::SrcSize { ty, want, got: src.len() });
    }
    match ty {
        GgmlType::F32 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => unconvert(src, dst, fp16_to_fp32),
        GgmlType::BF16 => unconvert(src, dst, bf16_to_fp32),
        GgmlType::Q4_0 => unblocks::<BlockQ4_0, 32>(src, dst, legacy::dequantize_q4_0),
        GgmlType::Q4_1 => unblocks::<BlockQ4_1, 32>(src, dst, legacy::dequantize_q4_1),
        GgmlType::Q5_0 => unblocks::<BlockQ5_0, 32>(src, dst, legacy::dequantize_q5_0),
        GgmlType::Q5_1 => unblocks::<BlockQ5_1, 32>(src, dst, legacy::dequantize_q5_1),
        GgmlType::Q8_0 => unblocks::<BlockQ8_0, 32>(src, dst, legacy::dequantize_q8_0),
        GgmlType::Q4_K => unblocks::<BlockQ4K, QK_K>(src, dst, kquants::dequantize_q4_k),
        GgmlType::Q5_K => unblocks::<BlockQ5K, QK_K>(src, dst, kquants::dequantize_q5_k),
        GgmlType::Q6_K => unblocks::<BlockQ6K, QK_K>(src, dst, kquants::dequantize_q6_k),
    }
    Ok(())
}

fn convert(src: &[f32], dst: &mut [u8], f: fn(f32) -> u16) {
    let run = |(s, d): (&[f32], &mut [u8])| {
        for (o, v) in d.chunks_exact_mut(2).zip(s) {
            o.copy_from_slice(&f(*v).to_le_bytes());
        }
    };
    if src.len() <= TASK_ELEMS {
        run((src, dst));
    } else {
        src.par_chunks(TASK_ELEMS).zip(dst.par_chunks_mut(2 * TASK_ELEMS)).for_each(run);
    }
}

fn unconvert(src: &[u8], dst: &mut [f32], f: fn(u16) -> f32) {
    let run = |(s, d): (&[u8], &mut [f32])| {
        for (o, b) in d.iter_mut().zip(s.chunks_exact(2)) {
            *o = f(u16::from_le_bytes([b[0], b[1]]));
        }
    };
    if dst.len() <= TASK_ELEMS {
        run((src, dst));
    } else {
        src.par_chunks(2 * TASK_ELEMS).zip(dst.par_chunks_mut(TASK_ELEMS)).for_each(run);
    }
}

/// Runs a block quantizer over `src` (a whole number of N-element blocks; `dst` their bytes,
/// both checked by the caller) on all threads. `run` is one of the [`kernels!`] functions.
fn blocks<B: Pod + Send, const N: usize>(src: &[f32], dst: &mut [u8], run: fn(&[f32], &mut [B])) {
    let ys: &mut [B] = bytemuck::cast_slice_mut(dst);
    let per_task = (TASK_ELEMS / N).max(1);
    if ys.len() <= per_task {
        run(src, ys);
    } else {
        src.par_chunks(per_task * N).zip(ys.par_chunks_mut(per_task)).for_each(|(xs, ys)| run(xs, ys));
    }
}

/// For each block quantizer, a module whose `run` applies it to each block of a run of blocks,
/// compiled for AVX2 where the CPU has it: the kernels are written in lanes of 8 or 16 f32
/// (`make_qkx2_quants_x8`, `quantize_q8_0_lanes`) that x86-64's baseline SSE2 runs as halves
/// and without SSE4.1's integer min/max. Only the vector width changes: AVX2 brings no fused
/// multiply-add (that is the separate `fma` feature, never enabled here), so each f32 operation
/// rounds as in ggml's own x86-64 build. The kernels are `#[inline(always)]` and called
/// directly (a generic `Fn` would be called through a shim compiled without AVX2), so they are
/// compiled into `avx2` with its features. `baseline` is the same loop without AVX2, for tests.
macro_rules! kernels {
    ($($module:ident: $block:ty, $n:expr, $kernel:path;)*) => {$(
        mod $module {
            use super::*;

            #[inline(always)]
            pub(super) fn baseline(xs: &[f32], ys: &mut [$block]) {
                for (x, y) in xs.chunks_exact($n).zip(ys.iter_mut()) {
                    $kernel(x.try_into().expect("chunks_exact(N)"), y);
                }
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2(xs: &[f32], ys: &mut [$block]) {
                baseline(xs, ys)
            }

            pub(super) fn run(xs: &[f32], ys: &mut [$block]) {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2(xs, ys) };
                }
                baseline(xs, ys)
            }
        }
    )*};
}

kernels! {
    q4_0: BlockQ4_0, 32, legacy::quantize_q4_0;
    q4_1: BlockQ4_1, 32, legacy::quantize_q4_1;
    q5_0: BlockQ5_0, 32, legacy::quantize_q5_0;
    q5_1: BlockQ5_1, 32, legacy::quantize_q5_1;
    q8_0: BlockQ8_0, 32, legacy::quantize_q8_0_lanes;
    q4_k: BlockQ4K, QK_K, kquants::quantize_q4_k;
    q5_k: BlockQ5K, QK_K, kquants::quantize_q5_k;
    q6_k: BlockQ6K, QK_K, kquants::quantize_q6_k;
}

/// [`quantize_rows`]'s kernels compiled for x86-64's baseline only (no AVX2; Q8_0: the scalar
/// port of `quantize_row_q8_0_ref` rather than its lanes), for the tests that check the fast
/// build gives the same bytes.
#[cfg(test)]
pub(crate) fn quantize_rows_baseline(ty: GgmlType, src: &[f32], n_per_row: usize, dst: &mut [u8]) {
    check(ty, src.len(), n_per_row).expect("shapes");
    let d = dst;
    match ty {
        GgmlType::Q4_0 => q4_0::baseline(src, bytemuck::cast_slice_mut(d)),
        GgmlType::Q4_1 => q4_1::baseline(src, bytemuck::cast_slice_mut(d)),
        GgmlType::Q5_0 => q5_0::baseline(src, bytemuck::cast_slice_mut(d)),
        GgmlType::Q5_1 => q5_1::baseline(src, bytemuck::cast_slice_mut(d)),
        GgmlType::Q8_0 => {
            let ys: &mut [BlockQ8_0] = bytemuck::cast_slice_mut(d);
            for (x, y) in src.chunks_exact(32).zip(ys) {
                legacy::quantize_q8_0(x.try_into().expect("chunks_exact(32)"), y);
            }
        }
        GgmlType::Q4_K => q4_k::baseline(src, bytemuck::cast_slice_mut(d)),
        GgmlType::Q5_K => q5_k::baseline(src, bytemuck::cast_slice_mut(d)),
        GgmlType::Q6_K => q6_k::baseline(src, bytemuck::cast_slice_mut(d)),
        _ => quantize_rows(ty, src, n_per_row, d).expect("shapes"),
    }
}

fn unblocks<B: Pod + Sync, const N: usize>(src: &[u8], dst: &mut [f32], f: fn(&B, &mut [f32; N])) {
    let xs: &[B] = bytemuck::cast_slice(src);
    let per_task = (TASK_ELEMS / N).max(1);
    let run = |(xs, ys): (&[B], &mut [f32])| {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(N)) {
            f(x, y.try_into().expect("chunks_exact_mut(N)"));
        }
    };
    if xs.len() <= per_task {
        run((xs, dst));
    } else {
        xs.par_chunks(per_task).zip(dst.par_chunks_mut(per_task * N)).for_each(run);
    }
}

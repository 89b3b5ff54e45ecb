//! ggml's tensor types: what llama.cpp's GGUF files store, and (next to this table) the
//! reference quantizers that produce their blocks bit for bit as ggml's `quantize_row_*_ref` do.
//!
//! A block type packs a fixed number of elements into a fixed number of bytes (Q8_0: an f16 scale
//! and 32 int8 codes, 34 bytes), so a tensor's size is known from its shape alone: what lets a
//! GGUF file's length be served by `stat` before anything is converted. The numbers are ggml's
//! `ggml_type` enum and `type_traits` table (ggml/src/ggml.c).
//!
//! The quantizers are ports of llama.cpp's ggml-quants.c as vendored by llama-cpp-python 0.3.36
//! (the `*_ref` functions `ggml_quantize_chunk` runs when no importance matrix is given), line
//! by line and in the same f32 operation order, so that their bytes are ggml's:
//! scripts/ggml_quant_check.py compares them with a libggml built by scripts/build_libggml.sh.
//! - `block`: the `#[repr(C)]` block structs, sizes asserted at compile time;
//! - `float`: ggml's fp16/bf16 conversions, `nearest_int`, C's float-to-int casts;
//! - `legacy`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32-element blocks);
//! - `kquants`: Q4_K, Q5_K, Q6_K (256-element super-blocks), with `make_qkx2_quants` and
//!   `make_qx_quants`;
//! - `rows`: `quantize_rows` / `dequantize_rows`, whole tensors on all threads;
//! - `avx2`: the hot loops of Q8_0 and of `make_qkx2_quants` in AVX2 intrinsics (x86-64),
//!   the same f32 operations in the same order as the portable code beside them.

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod block;
pub mod float;
pub mod kquants;
pub mod legacy;
#[cfg(test)]
mod quant_tests;
mod rows;

pub use rows::{dequantize_rows, quantize_q8_0_bf16, quantize_rows};

/// Why a tensor cannot be converted: every case is a shape the caller got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgmlError {
    /// llama.cpp needs whole blocks per row (it falls back to another type otherwise).
    #[error("a row of {n_per_row} elements is not a whole number of {ty} blocks of {block}")]
    RowNotWholeBlocks { ty: GgmlType, n_per_row: usize, block: usize },
    #[error("{elems} elements are not a whole number of rows of {n_per_row}")]
    PartialRow { elems: usize, n_per_row: usize },
    #[error("the output buffer holds {got} bytes, {ty} needs {want}")]
    DstSize { ty: GgmlType, want: usize, got: usize },
    #[error("the input holds {got} bytes, {ty} needs {want}")]
    SrcSize { ty: GgmlType, want: usize, got: usize },
}

/// A ggml tensor type llmfs writes. The discriminant is ggml's `ggml_type` number, which GGUF
/// stores in each tensor's info.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    BF16 = 30,
}

/// Elements per super-block of the K-quants (ggml's `QK_K`).
pub const QK_K: usize = 256;

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// ggml's type number (GGUF's tensor info field).
    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4_K => "q4_K",
            GgmlType::Q5_K => "q5_K",
            GgmlType::Q6_K => "q6_K",
            GgmlType::BF16 => "bf16",
        }
    }

    /// Elements per block (1 for the plain float types).
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4_K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q5_K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Whether a row of `n` elements can be stored in this type (whole blocks only).
    pub fn fits_row(self, n: usize) -> bool {
        n % self.block_elems() == 0
    }

    /// Bytes of a row of `n` elements; None if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        self.fits_row(n).then(|| n / self.block_elems() * self.block_bytes())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_ggml_s() {
        // ggml.c type_traits: blck_size and type_size.
        let expected = [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q5_K, 256, 176),
            (GgmlType::Q6_K, 256, 210),
        ];
        for (t, elems, bytes) in expected {
            assert_eq!((t.block_elems(), t.block_bytes()), (elems, bytes), "{t}");
        }
        assert_eq!(GgmlType::Q8_0.row_bytes(4096), Some(128 * 34));
        assert_eq!(GgmlType::Q4_K.row_bytes(300), None);
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
    }
}

//! File layouts: how an entry's tensors are laid out as the files a loader opens.
//!
//! `safetensors` parses untrusted headers strictly and synthesizes spec-exact ones (the layout of
//! every weight file the mount serves today); GGUF, llama.cpp's layout, goes beside it. Both are
//! fed by the same tensor sources (`variant`): a format only decides where each tensor's bytes go
//! and which header bytes come before them.

pub mod gguf;
pub mod safetensors;

pub use safetensors::*;

use crate::codec::ggml::GgmlType;

/// How one tensor's bytes are stored in a file a loader reads: a safetensors element type (a
/// block of one element) or one of ggml's block types (Q8_0: 32 elements in 34 bytes). Tensor
/// sources produce, and byte ranges map to, whole blocks; a tensor's size follows from its
/// element count alone, so a file's length is known before anything is converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoredType {
    Element(Dtype),
    Block(GgmlType),
}

impl StoredType {
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            StoredType::Element(_) => 1,
            StoredType::Block(t) => t.block_elems(),
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            StoredType::Element(d) => d.size(),
            StoredType::Block(t) => t.block_bytes(),
        }
    }

    /// Bytes of `n` elements; None unless `n` is a whole number of blocks.
    pub fn bytes_of(self, n: usize) -> Option<usize> {
        (n % self.block_elems() == 0).then(|| n / self.block_elems() * self.block_bytes())
    }
}

impl std::fmt::Display for StoredType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredType::Element(d) => d.fmt(f),
            StoredType::Block(t) => t.fmt(f),
        }
    }
}

//! Kernels: the arithmetic that turns stored bytes into tensor bytes.
//!
//! Everything here works on little-endian byte slices of whole elements, so callers (the variant
//! read path, `export`, the delta maker) never care how a kernel is implemented. The CPU kernels
//! are plain Rust that the compiler vectorizes (and `half`'s F16C paths for f16); the GPU kernels
//! (`gpu`, WGSL in shaders/, built with `--features gpu`) compute the same bits. `backend` picks
//! the device per kernel and is what call sites use.

pub mod backend;
pub mod cast;
pub mod delta_ops;
pub mod float;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod merge;
pub mod mergekit;

/// View `bytes` as `T`s when aligned; callers fall back to a copy when not.
pub(crate) fn typed<T: bytemuck::Pod>(bytes: &[u8]) -> Option<&[T]> {
    bytemuck::try_cast_slice(bytes).ok()
}

pub(crate) fn typed_mut<T: bytemuck::Pod>(bytes: &mut [u8]) -> Option<&mut [T]> {
    bytemuck::try_cast_slice_mut(bytes).ok()
}

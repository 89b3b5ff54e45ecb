//! llmfs: a FUSE filesystem for LLM weights.
//!
//! The read path flows one way: `vfs` (FUSE ops, byte ranges) → `cache` (decoded chunks) →
//! `variant` (what bytes each virtual file holds) → `codec` (how a stored tensor is decoded) →
//! `compute` (the kernels) → bytes. The store's catalogue is `registry`; `adapter` knows model
//! families and their conversation templates; `format` is the strict safetensors parser and
//! header writer. `check`, `export` and `demo` are the commands that are more than a few lines.

pub mod adapter;
pub mod cache;
pub mod check;
pub mod codec;
pub mod compute;
pub mod delta;
pub mod demo;
pub mod export;
pub mod format;
pub mod quantize;
pub mod registry;
pub mod source;
pub mod store;
pub mod variant;
pub mod vfs;

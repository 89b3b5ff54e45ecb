//! llmfs: a FUSE filesystem for LLM weights.
//!
//! Data flows one way; no module imports one above it. From the bottom: `registry` is the store's
//! catalogue, plain data (entries and their recipes' parameters, `registry::recipe`), over `store`
//! (where the bytes live), `format` (the strict safetensors parser and header writer) and `adapter`
//! (model families, conversation templates). `source` is a file read back under its fingerprint.
//! `codec` decodes stored tensors, with `compute`'s kernels. The recipes (cast, quantize, delta,
//! import) describe a variant's tensors as sources over its base's (`variant::source`) and build
//! views (`variant::view`, `variant::delta`); `variant::build_view` picks the recipe for each entry of a
//! chain. The delta makers (`delta::make`, `delta::stream`, `delta::import`) read their base through
//! its view. `vfs` (FUSE ops, byte ranges) serves views through `cache` (decoded chunks); nothing
//! below `vfs` imports it. `check`, `export`, `quantize` and `demo` are the commands that are more
//! than a few lines.

pub mod adapter;
pub mod cache;
pub mod check;
pub mod codec;
pub mod compute;
pub mod delta;
pub mod demo;
pub mod export;
pub mod format;
pub mod info;
pub mod make_merge;
pub mod merge;
pub mod quantize;
pub mod registry;
pub mod source;
pub mod store;
pub mod variant;
pub mod vfs;
pub mod warm;

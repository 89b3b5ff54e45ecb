//! File layouts: how an entry's tensors are laid out as the files a loader opens.
//!
//! `safetensors` parses untrusted headers strictly and synthesizes spec-exact ones (the layout of
//! every weight file the mount serves today); GGUF, llama.cpp's layout, goes beside it. Both are
//! fed by the same tensor sources (`variant`): a format only decides where each tensor's bytes go
//! and which header bytes come before them.

pub mod gguf;
pub mod safetensors;

pub use safetensors::*;

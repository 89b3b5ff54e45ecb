//! Codecs: how stored weights become tensors.
//!
//! `quant` is the arithmetic of group-wise quantization (FastChat-exact); `quant_file` is how a
//! quantized entry's codes and scales are laid out in its containers and read back by range.
//! `ggml` is llama.cpp's block types and their reference quantizers (GGUF views).

pub mod delta;
pub mod ggml;
pub mod quant;
pub mod quant_file;

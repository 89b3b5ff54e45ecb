//! Codecs: how stored weights become tensors.

pub mod quant;

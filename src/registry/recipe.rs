//! The parameters of the recipes an entry is made by (a quantization's configuration, a
//! delta's codec, an imported delta's format): plain data, stored in the registry as they are.
//! The code that carries a recipe out lives above (`codec`, `delta`) and imports these; the
//! registry imports none of it.

use serde::{Deserialize, Serialize};

/// FastChat's `CompressionConfig` (compression.py:23-31) for `group_dim=1`, `enabled=True`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantConfig {
    /// 8 or 4.
    pub bits: u8,
    /// Elements per group along dim 1; any value ≥ 1 (larger than the row: one padded group).
    pub group_size: usize,
    /// Symmetric (scale only) or asymmetric (scale and minimum).
    pub symmetric: bool,
}

impl Default for QuantConfig {
    /// FastChat's `default_compression_config` (compression.py:34-36).
    fn default() -> Self {
        QuantConfig { bits: 8, group_size: 256, symmetric: true }
    }
}

/// How tensors that have a base twin are coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaCodec {
    /// Exact: bit patterns combined with the base's, byte planes split, zstd in chunks.
    Lossless,
    /// target − base as group-wise int8 with an f32 scale per group.
    Q8,
    /// BitDelta: the sign of target − base and one scale per row.
    Bitdelta,
}

impl DeltaCodec {
    pub fn name(self) -> &'static str {
        match self {
            DeltaCodec::Lossless => "lossless",
            DeltaCodec::Q8 => "q8",
            DeltaCodec::Bitdelta => "bitdelta",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [DeltaCodec::Lossless, DeltaCodec::Q8, DeltaCodec::Bitdelta].into_iter().find(|c| c.name() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportFormat {
    Fastchat,
    Lora,
}

impl ImportFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fastchat" => Some(Self::Fastchat),
            "lora" => Some(Self::Lora),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Fastchat => "fastchat",
            Self::Lora => "lora",
        }
    }
}

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

/// Errors of a quantization's configuration, and of buffers that do not fit a shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// Only FastChat's useful widths are supported (its `num_bits <= 8`, packed as 8 or 4).
    #[error("unsupported bit width {0}: only 4 and 8 bits are supported")]
    UnsupportedBits(u8),
    /// A group of zero elements has no scale.
    #[error("group size must be at least 1")]
    ZeroGroupSize,
    /// `rows × padded_cols` does not fit in `usize`.
    #[error("tensor shape {rows}x{cols} with group size {group_size} overflows")]
    ShapeOverflow { rows: usize, cols: usize, group_size: usize },
    /// A buffer's length does not match the shape and configuration.
    #[error("{what} has {got} elements, expected {expected}")]
    LengthMismatch { what: &'static str, expected: usize, got: usize },
}

impl QuantConfig {
    /// Checks the configuration for rows of `cols` elements. Any group size ≥ 1 is valid; one
    /// larger than `cols` means one zero-padded group per row, as in FastChat. `cols == 0` is
    /// an empty tensor with no groups.
    pub fn validate(&self, cols: usize) -> Result<(), QuantError> {
        if self.bits != 8 && self.bits != 4 {
            return Err(QuantError::UnsupportedBits(self.bits));
        }
        if self.group_size == 0 {
            return Err(QuantError::ZeroGroupSize);
        }
        cols.checked_add(self.group_size).map(|_| ()).ok_or(QuantError::ShapeOverflow {
            rows: 1,
            cols,
            group_size: self.group_size,
        })
    }

    /// `ceil(cols / group_size)` (compression.py:240).
    pub fn groups_per_row(&self, cols: usize) -> usize {
        cols.div_ceil(self.group_size)
    }

    /// Row length after zero padding (compression.py:248).
    pub fn padded_cols(&self, cols: usize) -> usize {
        self.groups_per_row(cols) * self.group_size
    }

    /// Number of groups (= scales, = minimums when asymmetric) of a `rows × cols` tensor.
    pub fn n_groups(&self, rows: usize, cols: usize) -> usize {
        rows * self.groups_per_row(cols)
    }

    /// Number of codes (padding included) of a `rows × cols` tensor.
    pub fn n_codes(&self, rows: usize, cols: usize) -> usize {
        rows * self.padded_cols(cols)
    }

    /// Bytes of `q` for a `rows × cols` tensor.
    pub fn q_len(&self, rows: usize, cols: usize) -> usize {
        let n = self.n_codes(rows, cols);
        if self.bits == 4 {
            n.div_ceil(2)
        } else {
            n
        }
    }

    /// Validates and checks that every size of a `rows × cols` tensor fits in `usize`.
    pub fn check_shape(&self, rows: usize, cols: usize) -> Result<(), QuantError> {
        self.validate(cols)?;
        let overflow = QuantError::ShapeOverflow { rows, cols, group_size: self.group_size };
        self.groups_per_row(cols)
            .checked_mul(self.group_size)
            .and_then(|p| p.checked_mul(rows))
            .and_then(|n| n.checked_mul(4)) // room for f32 outputs of every code
            .map(|_| ())
            .ok_or(overflow)
    }

    /// FastChat's `B` (compression.py:261, 267).
    pub fn bound(&self) -> f32 {
        if self.symmetric {
            ((1u32 << (self.bits - 1)) - 1) as f32
        } else {
            ((1u32 << self.bits) - 1) as f32
        }
    }
}

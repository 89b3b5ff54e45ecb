//! The element transforms of the delta codecs and the ranges a bitdelta read needs: shared by
//! the CPU decoders (`codec::delta`) and the GPU kernels, so neither imports the other.

use std::ops::Range;

/// How the target's bit pattern is combined with the base's, per element, as an `esize`-byte
/// little-endian unsigned integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// `t ^ b`; inverse `d ^ b`.
    Xor,
    /// `t - b` (wrapping); inverse `d + b` (wrapping).
    Sub,
    /// Distance in representable values, zigzagged: `zigzag(ord(t) - ord(b))` where `ord` maps a
    /// sign-magnitude pattern to an order-preserving two's-complement integer (negative: flip
    /// the magnitude bits) and `zigzag(d) = (d << 1) ^ (d >> (bits - 1))` (arithmetic shift).
    /// A change of ±m ulps, across exponents and across zero, gives `2m` or `2m - 1`, so the
    /// high bytes are 0. Any bit pattern maps back exactly (both maps are bijections), so it is
    /// lossless for any data of 1, 2, 4 or 8-byte elements, merely pointless for integers.
    Ulp,
}

impl Transform {
    /// Whether the transform is defined for `esize`-byte elements (`Ulp`: 1, 2, 4, 8 only).
    pub fn supports(self, esize: usize) -> bool {
        match self {
            Transform::Xor | Transform::Sub => esize > 0,
            Transform::Ulp => matches!(esize, 1 | 2 | 4 | 8),
        }
    }
}

/// The `bitdelta` rows that hold elements `elems` of a tensor with rows of `cols` elements:
/// the `scales` a `codec::delta::decode_bitdelta_range` of `elems` needs are `scales[bitdelta_rows(..)]`.
pub fn bitdelta_rows(cols: usize, elems: &Range<usize>) -> Range<usize> {
    if elems.is_empty() || cols == 0 {
        return 0..0;
    }
    elems.start / cols..(elems.end - 1) / cols + 1
}

/// The sign bytes that hold elements `elems`: `signs_all[bitdelta_sign_bytes(&elems)]`.
pub fn bitdelta_sign_bytes(elems: &Range<usize>) -> Range<usize> {
    if elems.is_empty() {
        return 0..0;
    }
    elems.start / 8..elems.end.div_ceil(8)
}

//! The quantized tensor's types: [`QuantizedTensor`] (owning its buffers, what [`super::quantize`]
//! returns), [`QuantView`] and [`QuantBytesView`] (borrowed, the buffers straight from a file),
//! and the length checks that make a view built from untrusted buffers safe to decode. The
//! layout itself is defined in the parent module's doc.

use super::dequantize_range;
use super::{QuantBytesView, QuantConfig, QuantError, QuantFloat};

/// A quantized 2-D tensor, owning its buffers. Layout: see the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor<T> {
    pub rows: usize,
    pub cols: usize,
    pub config: QuantConfig,
    /// Codes of the padded tensor, packed per `config.bits`.
    pub q: Vec<u8>,
    /// One scale per group, row-major.
    pub scale: Vec<T>,
    /// One minimum per group (asymmetric); empty when symmetric.
    pub min: Vec<T>,
}

impl<T: QuantFloat> QuantizedTensor<T> {
    /// Borrows the buffers for [`dequantize_range`].
    pub fn view(&self) -> QuantView<'_, T> {
        QuantView {
            rows: self.rows,
            cols: self.cols,
            config: self.config,
            q: &self.q,
            scale: &self.scale,
            min: &self.min,
        }
    }

    /// The whole dequantized tensor, row-major `rows × cols`.
    pub fn dequantize(&self) -> Vec<T> {
        let n = self.rows * self.cols;
        let mut out = vec![T::default(); n];
        dequantize_range(self.view(), 0..n, &mut out);
        out
    }
}

/// Borrowed quantized tensor: the buffers may come straight from a file.
#[derive(Debug, Clone, Copy)]
pub struct QuantView<'a, T> {
    pub rows: usize,
    pub cols: usize,
    pub config: QuantConfig,
    pub q: &'a [u8],
    pub scale: &'a [T],
    pub min: &'a [T],
}

impl<'a, T: QuantFloat> QuantView<'a, T> {
    /// A view whose buffer lengths are checked against the shape; use it for data read from
    /// disk, so that [`dequantize_range`] cannot index out of bounds.
    pub fn new(
        rows: usize,
        cols: usize,
        config: QuantConfig,
        q: &'a [u8],
        scale: &'a [T],
        min: &'a [T],
    ) -> Result<Self, QuantError> {
        check_lengths(rows, cols, config, q.len(), scale.len(), min.len())?;
        Ok(QuantView { rows, cols, config, q, scale, min })
    }
}

impl<'a> QuantBytesView<'a> {
    /// A view whose buffer lengths are checked for element type `T`.
    pub fn new<T: QuantFloat>(
        rows: usize,
        cols: usize,
        config: QuantConfig,
        q: &'a [u8],
        scale: &'a [u8],
        min: &'a [u8],
    ) -> Result<Self, QuantError> {
        for (what, b) in [("scale bytes", scale), ("min bytes", min)] {
            if b.len() % T::SIZE != 0 {
                return Err(QuantError::LengthMismatch {
                    what,
                    expected: b.len() / T::SIZE * T::SIZE,
                    got: b.len(),
                });
            }
        }
        check_lengths(rows, cols, config, q.len(), scale.len() / T::SIZE, min.len() / T::SIZE)?;
        Ok(QuantBytesView { rows, cols, config, q, scale, min })
    }
}

fn check_lengths(
    rows: usize,
    cols: usize,
    config: QuantConfig,
    q: usize,
    scale: usize,
    min: usize,
) -> Result<(), QuantError> {
    config.check_shape(rows, cols)?;
    let groups = config.n_groups(rows, cols);
    let expect = [
        ("q", config.q_len(rows, cols), q),
        ("scale", groups, scale),
        ("min", if config.symmetric { 0 } else { groups }, min),
    ];
    for (what, expected, got) in expect {
        if expected != got {
            return Err(QuantError::LengthMismatch { what, expected, got });
        }
    }
    Ok(())
}

//! Group-wise quantization (8 and 4 bits, symmetric or asymmetric), bit-exact with FastChat.
//!
//! # Why this exists
//!
//! `llmfs quantize` stores a model's linear weights as small integer codes plus one scale (and,
//! asymmetric, one minimum) per group, and the read path turns them back into f16/bf16/f32 on
//! every read. The contract (DESIGN.md, "FastChat compatibility") is that the values read are
//! **bit-identical** to FastChat's `decompress(compress(t, config), config)` run by torch on the
//! CPU (fschat 0.2.36, `fastchat/model/compression.py`, lines 226-312). "Close" is not enough: a
//! user must be able to swap FastChat's `--load-8bit` for an llmfs mount and get the same logits.
//!
//! # The arithmetic, and why it is spelled out op by op
//!
//! FastChat's quantizer is a handful of eager torch ops. Torch rounds the result of *every* op
//! to the tensor's dtype; for f16/bf16 the CPU kernels compute each op in f32 (torch's
//! `opmath_t`) and round once to the dtype. So llmfs evaluates each op in f32 and rounds to `T`
//! after each one ([`QuantFloat::round`]), never fusing two ops:
//!
//! ```text
//! symmetric  (compression.py:261-264, 292-294), B = 2^(bits-1) - 1
//!   amax  = max |x| over the group (padding zeros included)
//!   scale = T(T(1 / amax) * B)            # `B / t` is `t.reciprocal() * B` in torch (_tensor.py __rdiv__)
//!   q     = int8(round_half_even(clamp(T(x * scale), -B, B)))
//!   x'    = T(q / scale)
//! asymmetric (compression.py:267-275, 296-298), B = 2^bits - 1
//!   mn, mx = min, max over the group (padding zeros included)
//!   scale = T(T(1 / T(mx - mn)) * B)
//!   q     = uint8(round_half_even(clamp(T(T(x - mn) * scale), 0, B)))
//!   x'    = T(T(q / scale) + mn)
//! ```
//!
//! `q / scale` is a true division; it is **not** replaced by a multiplication with a hoisted
//! reciprocal, which differs in the last bit (the checked-in FastChat cases catch it for f32).
//! Likewise `B / t` must be the two-rounding `T(T(1/t) * B)`: a single `T(B / t)` differs from
//! torch on f16 inputs.
//!
//! # Degenerate groups (measured on torch 2.15.0, x86-64 AVX2; `scripts/fastchat_quant_check.py --probe`)
//!
//! An all-zero group (symmetric) or a constant group (asymmetric, `mx == mn`) gives
//! `scale = B * (1/0) = +inf`, so `0 * inf = NaN` reaches the integer cast. Casting NaN to an
//! integer is undefined in C++; torch's CPU cast gives 0 for both int8 and uint8, for either
//! sign of NaN and in both its vectorized and scalar loops ([`SYM_NAN_CODE`],
//! [`ASYM_NAN_CODE`]). Decompression then computes `0 / inf = +0.0`. So:
//!
//! * symmetric, all-zero group: codes 0, scale `+inf`, every element decodes to **`+0.0`**
//!   (bit pattern 0), also where the input was `-0.0`;
//! * asymmetric, constant group `c`: codes 0, `min = c`, scale `+inf`, every element decodes to
//!   `+0.0 + c`, i.e. **exactly `c`** (and `+0.0` where `c` is `±0.0`);
//! * f16 groups so small that `1/amax` or `B * (1/amax)` overflows to `inf` (|x| ≲ 2e-3 for
//!   8 bits): nonzero elements get codes ±B, zeros get the NaN code, and everything decodes to
//!   a zero with the code's sign (symmetric: `-0.0` for negative inputs) or to `mn`
//!   (asymmetric).
//!
//! llmfs special-cases none of this: it stores the code torch stores and runs the same ops, so
//! every zero's sign comes out as torch's. Inputs holding NaN or ±inf are not FastChat
//! weights; they go through the same ops (NaN propagates through min/max as in torch) but are
//! not checked against torch.
//!
//! # On-disk layout of a [`QuantizedTensor`]
//!
//! A 2-D tensor `rows × cols` is cut along dim 1 (FastChat's `group_dim=1`) into
//! `groups_per_row = ceil(cols / group_size)` groups per row; the last group of each row is
//! padded with zeros to `group_size` (compression.py:248-257). A group size larger than the row
//! is allowed, as in FastChat: the row is one padded group.
//!
//! * `q`: the codes of the *padded* tensor, `rows × groups_per_row × group_size` of them,
//!   row-major (code index `r * padded_cols + c`), padding codes included (they are what torch
//!   holds, and keeping them keeps the code index arithmetic trivial).
//!   * 8 bits: one byte per code; symmetric codes are the `i8` bit pattern, asymmetric codes
//!     are the `u8`.
//!   * 4 bits: two codes per byte, **low nibble first** (code `i` is in byte `i / 2`, bits
//!     `4 * (i % 2) ..`); `ceil(n_codes / 2)` bytes, the unused high nibble of an odd last
//!     byte is 0. Symmetric codes are the 4-bit two's complement of the `i8` code (−7..=7, and
//!     −8 where torch's NaN cast gave a negative code: the decoded value is `code / ±inf` or
//!     `code / 0`, which depends on the code's sign only); asymmetric codes are 0..=15.
//!     Nibbles can straddle rows when `padded_cols` is odd.
//! * `scale`: one per group, `rows × groups_per_row`, row-major, in the tensor's dtype (what
//!   torch holds, including `inf`).
//! * `min`: asymmetric only, same shape as `scale`; empty when symmetric.
//!
//! # Files
//!
//! * `tensor.rs`: [`QuantizedTensor`] and the borrowed views, with the length checks that make
//!   buffers read from disk safe to decode;
//! * `encode.rs`: [`quantize`], FastChat's `compress`;
//! * `decode.rs`: [`dequantize_range`] and its kernels, FastChat's `decompress`, and
//!   [`dequantize_reference`];
//! * `tests.rs`: the fast paths against the reference, known values, and property tests of
//!   quantize + dequantize together.

mod decode;
mod encode;
mod tensor;

pub use crate::compute::float::{QuantBytesView, QuantFloat};
pub use crate::registry::recipe::{QuantConfig, QuantError};
pub use decode::{dequantize_range, dequantize_range_bytes, dequantize_reference};
pub use encode::{quantize, ASYM_NAN_CODE, SYM_NAN_CODE};
pub use tensor::{QuantView, QuantizedTensor};

#[cfg(test)]
mod tests;

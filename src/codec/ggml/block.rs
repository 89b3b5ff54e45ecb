//! ggml's block structs (ggml/src/ggml-common.h), byte for byte.
//!
//! Every field is a byte array (an f16 is its two little-endian bytes, `F16Bits`), so a block
//! has alignment 1 and any `&mut [u8]` of the right length is a slice of blocks: the GGUF
//! writer's buffers need no alignment. The sizes are asserted at compile time, as candle does.

use std::mem::size_of;

/// An IEEE binary16 as ggml stores it (`ggml_half`), little-endian, alignment 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16Bits(pub [u8; 2]);

impl F16Bits {
    pub fn from_bits(bits: u16) -> Self {
        F16Bits(bits.to_le_bytes())
    }
    pub fn bits(self) -> u16 {
        u16::from_le_bytes(self.0)
    }
}

/// `block_q4_0`: d, then 32 4-bit codes (element j in the low nibble of byte j, element j+16 in
/// its high nibble).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: F16Bits,
    pub qs: [u8; 16],
}

/// `block_q4_1`: d, m, 32 4-bit codes.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: F16Bits,
    pub m: F16Bits,
    pub qs: [u8; 16],
}

/// `block_q5_0`: d, the 5th bits of 32 codes, their low nibbles.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: F16Bits,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `block_q5_1`: d, m, the 5th bits, the low nibbles.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: F16Bits,
    pub m: F16Bits,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `block_q8_0`: d and 32 int8 codes.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: F16Bits,
    pub qs: [i8; 32],
}

/// `K_SCALE_SIZE`: 8 sub-block scales and 8 mins of 6 bits each, packed in 12 bytes.
pub const K_SCALE_SIZE: usize = 12;

/// `block_q4_K`: a super-block of 256 = 8 sub-blocks of 32; x = d*sc*q - dmin*m.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: F16Bits,
    pub dmin: F16Bits,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; 128],
}

/// `block_q5_K`: as Q4_K plus a 5th bit per weight.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: F16Bits,
    pub dmin: F16Bits,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

/// `block_q6_K`: 16 sub-blocks of 16, x = d*scale*q with q in -32..31; d comes last.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: F16Bits,
}

// ggml-common.h's static_asserts.
const _: () = assert!(size_of::<F16Bits>() == 2);
const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ5_0>() == 22);
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ4K>() == 144);
const _: () = assert!(size_of::<BlockQ5K>() == 176);
const _: () = assert!(size_of::<BlockQ6K>() == 210);

// SAFETY: each struct is #[repr(C)] (or transparent) over u8/i8 arrays only: alignment 1, no
// padding (the sizes above are the sums of the fields), and every bit pattern is valid.
unsafe impl bytemuck::Zeroable for F16Bits {}
unsafe impl bytemuck::Pod for F16Bits {}
macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: as above.
        unsafe impl bytemuck::Zeroable for $t {}
        // SAFETY: as above.
        unsafe impl bytemuck::Pod for $t {}
    )*};
}
pod!(BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ4K, BlockQ5K, BlockQ6K);

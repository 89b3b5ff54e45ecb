//! Dtype casts between f32, f16 and bf16: round to nearest even, NaN stays NaN, Inf stays Inf,
//! overflow becomes Inf — what torch's `.to(dtype)` does on the CPU.
//!
//! f16 and bf16 both widen to f32 exactly, so every cast goes through f32 with a single rounding
//! at the end, which is the correctly rounded result. Work is done in blocks of `BLOCK` elements
//! through a stack buffer so the f32 intermediate stays in L1 and `half`'s slice conversions
//! (F16C on x86-64) do many values per instruction.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{typed, typed_mut};
use crate::format::Dtype;

const BLOCK: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("cannot cast {from} to {to}: only F16, BF16 and F32 are converted")]
pub struct CastError {
    pub from: Dtype,
    pub to: Dtype,
}

/// Convert whole elements of `from` in `src` to `to` in `dst` (`dst.len() / to.size() ==
/// src.len() / from.size()`).
pub fn cast(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<(), CastError> {
    if !from.is_float() || !to.is_float() {
        return Err(CastError { from, to });
    }
    let n = src.len() / from.size();
    assert_eq!(src.len(), n * from.size(), "partial element in cast source");
    assert_eq!(dst.len(), n * to.size(), "cast destination has the wrong size");
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    // Aligned slices are converted in place; unaligned ones (rare: buffers come from the allocator)
    // go through aligned copies so the result is the same either way.
    match (aligned(from, src), aligned_mut(to, dst)) {
        (true, true) => convert_aligned(from, to, src, dst),
        _ => {
            let mut s = vec![0u32; src.len().div_ceil(4)];
            let mut d = vec![0u32; dst.len().div_ceil(4)];
            let sb = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut s)[..src.len()];
            sb.copy_from_slice(src);
            let db = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut d)[..dst.len()];
            convert_aligned(from, to, sb, db);
            dst.copy_from_slice(db);
        }
    }
    Ok(())
}

fn aligned(d: Dtype, b: &[u8]) -> bool {
    (b.as_ptr() as usize) % d.size() == 0
}
fn aligned_mut(d: Dtype, b: &mut [u8]) -> bool {
    (b.as_ptr() as usize) % d.size() == 0
}

fn convert_aligned(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) {
    let mut wide = [0f32; BLOCK];
    let n = src.len() / from.size();
    let mut i = 0;
    while i < n {
        let m = BLOCK.min(n - i);
        let w = &mut wide[..m];
        let s = &src[i * from.size()..(i + m) * from.size()];
        match from {
            Dtype::F32 => w.copy_from_slice(typed::<f32>(s).expect("aligned")),
            Dtype::F16 => typed::<f16>(s).expect("aligned").convert_to_f32_slice(w),
            // bf16 is the top half of an f32: a shift the compiler vectorizes (half's slice
            // conversion does one value at a time).
            Dtype::BF16 => {
                for (w, &b) in w.iter_mut().zip(typed::<u16>(s).expect("aligned")) {
                    *w = f32::from_bits((b as u32) << 16);
                }
            }
            _ => unreachable!("checked by cast"),
        }
        let d = &mut dst[i * to.size()..(i + m) * to.size()];
        match to {
            Dtype::F32 => typed_mut::<f32>(d).expect("aligned").copy_from_slice(w),
            Dtype::F16 => typed_mut::<f16>(d).expect("aligned").convert_from_f32_slice(w),
            Dtype::BF16 => typed_mut::<bf16>(d).expect("aligned").convert_from_f32_slice(w),
            _ => unreachable!("checked by cast"),
        }
        i += m;
    }
}

/// One element, the obvious way: the reference the fast path is tested against.
pub fn cast_one_reference(from: Dtype, to: Dtype, src: &[u8]) -> Vec<u8> {
    let x: f64 = match from {
        Dtype::F32 => f32::from_le_bytes(src.try_into().unwrap()) as f64,
        Dtype::F16 => f16::from_le_bytes(src.try_into().unwrap()).to_f64(),
        Dtype::BF16 => bf16::from_le_bytes(src.try_into().unwrap()).to_f64(),
        _ => panic!("not a float"),
    };
    match to {
        Dtype::F32 => (x as f32).to_le_bytes().to_vec(),
        Dtype::F16 => f16::from_f64(x).to_le_bytes().to_vec(),
        // Bit-level round to nearest even, independent of `half` (whose from_f64 rounds twice).
        Dtype::BF16 => {
            let b = (x as f32).to_bits(); // exact: every source dtype fits in f32
            let h = if (x as f32).is_nan() { (b >> 16) | 0x40 } else { (b + 0x7FFF + ((b >> 16) & 1)) >> 16 };
            (h as u16).to_le_bytes().to_vec()
        }
        _ => panic!("not a float"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FLOATS: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

    fn is_nan(d: Dtype, b: &[u8]) -> bool {
        match d {
            Dtype::F32 => f32::from_le_bytes(b.try_into().unwrap()).is_nan(),
            Dtype::F16 => f16::from_le_bytes(b.try_into().unwrap()).is_nan(),
            _ => bf16::from_le_bytes(b.try_into().unwrap()).is_nan(),
        }
    }

    fn check(from: Dtype, to: Dtype, src: &[u8]) {
        let mut dst = vec![0u8; src.len() / from.size() * to.size()];
        cast(from, to, src, &mut dst).unwrap();
        for (i, (s, d)) in src.chunks(from.size()).zip(dst.chunks(to.size())).enumerate() {
            let want = cast_one_reference(from, to, s);
            if is_nan(from, s) {
                assert!(is_nan(to, d), "{from}->{to} element {i}: NaN lost");
            } else {
                assert_eq!(d, &want[..], "{from}->{to} element {i} of {s:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn every_element_matches_the_reference(bytes in proptest::collection::vec(any::<u8>(), 0..20_000), offset in 0usize..4) {
            for from in FLOATS {
                for to in FLOATS {
                    // An odd offset exercises the unaligned path.
                    let src = &bytes[offset.min(bytes.len())..];
                    let n = src.len() / from.size();
                    check(from, to, &src[..n * from.size()]);
                }
            }
        }
    }

    #[test]
    fn specials_are_kept() {
        let vals = [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 65504.0, 65520.0, 1e-8, -3.0e38];
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        check(Dtype::F32, Dtype::F16, &src);
        check(Dtype::F32, Dtype::BF16, &src);
        let mut dst = vec![0u8; vals.len() * 2];
        cast(Dtype::F32, Dtype::F16, &src, &mut dst).unwrap();
        let h: Vec<f16> = dst.chunks(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
        assert!(h[4].is_nan() && h[2].is_infinite() && h[6].is_infinite() && h[1].is_sign_negative());
    }

    #[test]
    fn integers_are_refused() {
        assert!(cast(Dtype::I64, Dtype::F32, &[0; 8], &mut [0; 4]).is_err());
    }
}

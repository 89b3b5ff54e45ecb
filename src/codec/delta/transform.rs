//! The per-element transforms of the lossless codec ([`Transform`]: XOR, integer difference,
//! ulp distance) and the byte-plane split fused with them: the arithmetic a lossless chunk goes
//! through before zstd and after it, kept apart from the framing (`lossless.rs`) because it is
//! the hot loop and has element-by-element references of its own (the GPU kernels of
//! `compute::gpu` are held to the same functions).
//!
//! # The fast path
//!
//! The per-element transform fused with the plane split ([`forward_to_planes`]) and its inverse
//! ([`inverse_from_planes`]) work on blocks of [`BLOCK`] elements held as integers in a stack
//! array, one pass per plane, so each inner loop is a fixed-length loop over plain integers that
//! the compiler vectorizes. [`delta_forward`] / [`delta_inverse`] are the bare transform (no
//! planes), the shape a GPU kernel will take. Each has an element-by-element reference

use super::Transform;

/// Elements per block of the fused transform + plane (un)split: large enough for full vectors
/// of every width, small enough that the block's integers stay in registers / L1.
pub const BLOCK: usize = 64;

/// An element as an unsigned little-endian integer (1, 2, 4 or 8 bytes).
pub(super) trait Word:
    Copy + Default + std::ops::BitXor<Output = Self> + std::ops::BitOr<Output = Self>
{
    const N: usize;
    fn load(b: &[u8]) -> Self;
    fn store(self, b: &mut [u8]);
    fn byte(self, k: usize) -> u8;
    fn from_byte(v: u8, k: usize) -> Self;
    fn wsub(self, o: Self) -> Self;
    fn wadd(self, o: Self) -> Self;
    /// `Transform::Ulp` forward: `zigzag(ord(t) - ord(b))`.
    fn ulp_fwd(self, b: Self) -> Self;
    /// `Transform::Ulp` inverse: `ord⁻¹(unzigzag(d) + ord(b))`.
    fn ulp_inv(self, b: Self) -> Self;
}

macro_rules! word {
    ($t:ty, $s:ty) => {
        impl Word for $t {
            const N: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn load(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b[..Self::N].try_into().unwrap())
            }
            #[inline(always)]
            fn store(self, b: &mut [u8]) {
                b[..Self::N].copy_from_slice(&self.to_le_bytes())
            }
            #[inline(always)]
            fn byte(self, k: usize) -> u8 {
                (self >> (8 * k)) as u8
            }
            #[inline(always)]
            fn from_byte(v: u8, k: usize) -> Self {
                (v as $t) << (8 * k)
            }
            #[inline(always)]
            fn wsub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            #[inline(always)]
            fn wadd(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn ulp_fwd(self, b: Self) -> Self {
                const SH: u32 = <$t>::BITS - 1;
                // ord: negative (top bit set) flips the other bits; an involution.
                let ord = |v: $t| v ^ ((((v as $s) >> SH) as $t) >> 1);
                let d = ord(self).wrapping_sub(ord(b));
                (d << 1) ^ (((d as $s) >> SH) as $t)
            }
            #[inline(always)]
            fn ulp_inv(self, b: Self) -> Self {
                const SH: u32 = <$t>::BITS - 1;
                let ord = |v: $t| v ^ ((((v as $s) >> SH) as $t) >> 1);
                let d = (self >> 1) ^ (0 as $t).wrapping_sub(self & 1);
                ord(d.wrapping_add(ord(b)))
            }
        }
    };
}
word!(u8, i8);
word!(u16, i16);
word!(u32, i32);
word!(u64, i64);

/// Reference of `Transform::Ulp` for one element of `bits` ≤ 64 bits held in a u64, written
/// with explicit sign tests instead of shifts.
pub(super) fn ulp_reference(forward: bool, v: u64, b: u64, bits: u32) -> u64 {
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let top = 1u64 << (bits - 1);
    let ord = |x: u64| if x & top != 0 { x ^ (top - 1) } else { x };
    if forward {
        let d = ord(v).wrapping_sub(ord(b)) & mask;
        if d & top != 0 {
            (!d << 1 | 1) & mask
        } else {
            d << 1 & mask
        }
    } else {
        let d = if v & 1 == 1 { !(v >> 1) & mask } else { v >> 1 };
        ord(d.wrapping_add(ord(b)) & mask)
    }
}

fn ulp_elem_reference(forward: bool, a: &[u8], b: &[u8], out: &mut [u8]) {
    let n = a.len();
    assert!(Transform::Ulp.supports(n), "Ulp needs 1, 2, 4 or 8-byte elements, not {n}");
    let mut av = [0u8; 8];
    let mut bv = [0u8; 8];
    av[..n].copy_from_slice(a);
    bv[..n].copy_from_slice(b);
    let r = ulp_reference(forward, u64::from_le_bytes(av), u64::from_le_bytes(bv), 8 * n as u32);
    out.copy_from_slice(&r.to_le_bytes()[..n]);
}

/// Reference forward transform of one element of any width: byte loop with explicit borrow.
fn forward_elem_reference(tr: Transform, t: &[u8], b: &[u8], d: &mut [u8]) {
    match tr {
        Transform::Xor => {
            for k in 0..t.len() {
                d[k] = t[k] ^ b[k];
            }
        }
        Transform::Sub => {
            let mut borrow = 0u16;
            for k in 0..t.len() {
                let v = (t[k] as u16).wrapping_sub(b[k] as u16).wrapping_sub(borrow);
                d[k] = v as u8;
                borrow = (v >> 15) & 1;
            }
        }
        Transform::Ulp => ulp_elem_reference(true, t, b, d),
    }
}

/// Reference inverse transform of one element of any width: byte loop with explicit carry.
fn inverse_elem_reference(tr: Transform, d: &[u8], b: &[u8], t: &mut [u8]) {
    match tr {
        Transform::Xor => {
            for k in 0..d.len() {
                t[k] = d[k] ^ b[k];
            }
        }
        Transform::Sub => {
            let mut carry = 0u16;
            for k in 0..d.len() {
                let v = d[k] as u16 + b[k] as u16 + carry;
                t[k] = v as u8;
                carry = v >> 8;
            }
        }
        Transform::Ulp => ulp_elem_reference(false, d, b, t),
    }
}

/// Element by element definition of [`delta_forward`].
pub fn delta_forward_reference(tr: Transform, esize: usize, target: &[u8], base: &[u8], out: &mut [u8]) {
    assert!(esize > 0 && target.len() % esize == 0);
    assert!(base.len() == target.len() && out.len() == target.len());
    for ((t, b), d) in
        target.chunks_exact(esize).zip(base.chunks_exact(esize)).zip(out.chunks_exact_mut(esize))
    {
        forward_elem_reference(tr, t, b, d);
    }
}

/// Element by element definition of [`delta_inverse`].
pub fn delta_inverse_reference(tr: Transform, esize: usize, delta: &[u8], base: &[u8], out: &mut [u8]) {
    assert!(esize > 0 && delta.len() % esize == 0);
    assert!(base.len() == delta.len() && out.len() == delta.len());
    for ((d, b), t) in
        delta.chunks_exact(esize).zip(base.chunks_exact(esize)).zip(out.chunks_exact_mut(esize))
    {
        inverse_elem_reference(tr, d, b, t);
    }
}

#[inline(always)]
fn map_words<W: Word>(a: &[u8], b: &[u8], out: &mut [u8], f: impl Fn(W, W) -> W) {
    for ((a, b), o) in a.chunks_exact(W::N).zip(b.chunks_exact(W::N)).zip(out.chunks_exact_mut(W::N)) {
        f(W::load(a), W::load(b)).store(o);
    }
}

/// `out = transform(target, base)` per element (no planes). All three slices have the same
/// length, a multiple of `esize`.
///
/// # Panics
/// On mismatched lengths or `esize == 0`.
pub fn delta_forward(tr: Transform, esize: usize, target: &[u8], base: &[u8], out: &mut [u8]) {
    assert!(esize > 0 && target.len() % esize == 0);
    assert!(base.len() == target.len() && out.len() == target.len());
    match (tr, esize) {
        (Transform::Xor, _) => {
            for ((t, b), o) in target.iter().zip(base).zip(out.iter_mut()) {
                *o = t ^ b;
            }
        }
        (Transform::Sub, 1) => map_words::<u8>(target, base, out, W::wsub),
        (Transform::Ulp, 1) => map_words::<u8>(target, base, out, W::ulp_fwd),
        (Transform::Sub, 2) => map_words::<u16>(target, base, out, W::wsub),
        (Transform::Ulp, 2) => map_words::<u16>(target, base, out, W::ulp_fwd),
        (Transform::Sub, 4) => map_words::<u32>(target, base, out, W::wsub),
        (Transform::Ulp, 4) => map_words::<u32>(target, base, out, W::ulp_fwd),
        (Transform::Sub, 8) => map_words::<u64>(target, base, out, W::wsub),
        (Transform::Ulp, 8) => map_words::<u64>(target, base, out, W::ulp_fwd),
        _ => delta_forward_reference(tr, esize, target, base, out),
    }
}

/// `out = inverse(delta, base)` per element (no planes): the target's bytes.
///
/// # Panics
/// On mismatched lengths or `esize == 0`.
pub fn delta_inverse(tr: Transform, esize: usize, delta: &[u8], base: &[u8], out: &mut [u8]) {
    assert!(esize > 0 && delta.len() % esize == 0);
    assert!(base.len() == delta.len() && out.len() == delta.len());
    match (tr, esize) {
        (Transform::Xor, _) => {
            for ((d, b), o) in delta.iter().zip(base).zip(out.iter_mut()) {
                *o = d ^ b;
            }
        }
        (Transform::Sub, 1) => map_words::<u8>(delta, base, out, W::wadd),
        (Transform::Ulp, 1) => map_words::<u8>(delta, base, out, W::ulp_inv),
        (Transform::Sub, 2) => map_words::<u16>(delta, base, out, W::wadd),
        (Transform::Ulp, 2) => map_words::<u16>(delta, base, out, W::ulp_inv),
        (Transform::Sub, 4) => map_words::<u32>(delta, base, out, W::wadd),
        (Transform::Ulp, 4) => map_words::<u32>(delta, base, out, W::ulp_inv),
        (Transform::Sub, 8) => map_words::<u64>(delta, base, out, W::wadd),
        (Transform::Ulp, 8) => map_words::<u64>(delta, base, out, W::ulp_inv),
        _ => delta_inverse_reference(tr, esize, delta, base, out),
    }
}

/// Shorthand so `W::wsub` names the trait method in the dispatch tables above.
use self::Word as W;

/// Reference of [`forward_to_planes`]: transform each element, then write its byte `k` to
/// plane `k`.
pub fn forward_to_planes_reference(
    tr: Transform,
    esize: usize,
    target: &[u8],
    base: Option<&[u8]>,
    planes: &mut [u8],
) {
    assert!(esize > 0 && target.len() % esize == 0 && planes.len() == target.len());
    let n = target.len() / esize;
    let zero = vec![0u8; esize];
    let mut d = vec![0u8; esize];
    for i in 0..n {
        let t = &target[i * esize..][..esize];
        let b = base.map_or(&zero[..], |b| &b[i * esize..][..esize]);
        forward_elem_reference(tr, t, b, &mut d);
        for k in 0..esize {
            planes[k * n + i] = d[k];
        }
    }
}

/// Reference of [`inverse_from_planes`].
pub fn inverse_from_planes_reference(
    tr: Transform,
    esize: usize,
    planes: &[u8],
    base: Option<&[u8]>,
    out: &mut [u8],
) {
    assert!(esize > 0 && out.len() % esize == 0 && planes.len() == out.len());
    let n = out.len() / esize;
    let zero = vec![0u8; esize];
    let mut d = vec![0u8; esize];
    for i in 0..n {
        for k in 0..esize {
            d[k] = planes[k * n + i];
        }
        let b = base.map_or(&zero[..], |b| &b[i * esize..][..esize]);
        inverse_elem_reference(tr, &d, b, &mut out[i * esize..][..esize]);
    }
}

#[inline(always)]
fn forward_planes_w<W: Word>(target: &[u8], base: Option<&[u8]>, planes: &mut [u8], f: impl Fn(W, W) -> W) {
    let n = target.len() / W::N;
    let full = n - n % BLOCK;
    let mut tmp = [W::default(); BLOCK];
    for i0 in (0..full).step_by(BLOCK) {
        let t = &target[i0 * W::N..][..BLOCK * W::N];
        for (j, v) in tmp.iter_mut().enumerate() {
            *v = W::load(&t[j * W::N..]);
        }
        match base {
            Some(base) => {
                let b = &base[i0 * W::N..][..BLOCK * W::N];
                for (j, v) in tmp.iter_mut().enumerate() {
                    *v = f(*v, W::load(&b[j * W::N..]));
                }
            }
            None => {
                for v in tmp.iter_mut() {
                    *v = f(*v, W::default());
                }
            }
        }
        for k in 0..W::N {
            let p: &mut [u8; BLOCK] = (&mut planes[k * n + i0..][..BLOCK]).try_into().unwrap();
            for (o, v) in p.iter_mut().zip(tmp.iter()) {
                *o = v.byte(k);
            }
        }
    }
    for i in full..n {
        let mut v = W::load(&target[i * W::N..]);
        v = f(v, base.map_or(W::default(), |b| W::load(&b[i * W::N..])));
        for k in 0..W::N {
            planes[k * n + i] = v.byte(k);
        }
    }
}

#[inline(always)]
fn inverse_planes_w<W: Word>(planes: &[u8], base: Option<&[u8]>, out: &mut [u8], f: impl Fn(W, W) -> W) {
    let n = out.len() / W::N;
    let full = n - n % BLOCK;
    for i0 in (0..full).step_by(BLOCK) {
        let mut tmp = [W::default(); BLOCK];
        for k in 0..W::N {
            let p: &[u8; BLOCK] = (&planes[k * n + i0..][..BLOCK]).try_into().unwrap();
            for (v, &x) in tmp.iter_mut().zip(p.iter()) {
                *v = *v | W::from_byte(x, k);
            }
        }
        match base {
            Some(base) => {
                let b = &base[i0 * W::N..][..BLOCK * W::N];
                for (j, v) in tmp.iter_mut().enumerate() {
                    *v = f(*v, W::load(&b[j * W::N..]));
                }
            }
            None => {
                for v in tmp.iter_mut() {
                    *v = f(*v, W::default());
                }
            }
        }
        let o = &mut out[i0 * W::N..][..BLOCK * W::N];
        for (j, v) in tmp.iter().enumerate() {
            v.store(&mut o[j * W::N..]);
        }
    }
    for i in full..n {
        let mut v = W::default();
        for k in 0..W::N {
            v = v | W::from_byte(planes[k * n + i], k);
        }
        v = f(v, base.map_or(W::default(), |b| W::load(&b[i * W::N..])));
        v.store(&mut out[i * W::N..]);
    }
}

/// Transform `target` against `base` (None: zeros, i.e. no transform) and split the result into
/// byte planes: `planes[k * n + i]` is byte `k` of element `i`'s delta, `n = target.len() /
/// esize`. The fast path of [`forward_to_planes_reference`].
///
/// # Panics
/// On mismatched lengths or `esize == 0`.
pub fn forward_to_planes(tr: Transform, esize: usize, target: &[u8], base: Option<&[u8]>, planes: &mut [u8]) {
    assert!(esize > 0 && target.len() % esize == 0 && planes.len() == target.len());
    assert!(base.is_none_or(|b| b.len() == target.len()));
    macro_rules! go {
        ($w:ty) => {
            match tr {
                Transform::Xor => forward_planes_w::<$w>(target, base, planes, |a, b| a ^ b),
                Transform::Sub => forward_planes_w::<$w>(target, base, planes, W::wsub),
                Transform::Ulp => forward_planes_w::<$w>(target, base, planes, W::ulp_fwd),
            }
        };
    }
    match esize {
        1 => go!(u8),
        2 => go!(u16),
        4 => go!(u32),
        8 => go!(u64),
        _ => forward_to_planes_reference(tr, esize, target, base, planes),
    }
}

/// Join byte planes and undo the transform against `base` (None: zeros): the inverse of
/// [`forward_to_planes`]. The fast path of [`inverse_from_planes_reference`].
///
/// # Panics
/// On mismatched lengths or `esize == 0`.
pub fn inverse_from_planes(tr: Transform, esize: usize, planes: &[u8], base: Option<&[u8]>, out: &mut [u8]) {
    assert!(esize > 0 && out.len() % esize == 0 && planes.len() == out.len());
    assert!(base.is_none_or(|b| b.len() == out.len()));
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the function only requires AVX-512F and BW, just checked.
            return unsafe { inverse_from_planes_avx512(tr, esize, planes, base, out) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the function only requires AVX2, just checked.
            return unsafe { inverse_from_planes_avx2(tr, esize, planes, base, out) };
        }
    }
    inverse_from_planes_any(tr, esize, planes, base, out)
}

/// [`inverse_from_planes_any`] compiled for AVX2: integer operations with one result, the same
/// bits at any width. (Compiled for the x86-64 baseline, SSE2, the plane join and inverse
/// transform were a fifth of a lossless delta's fill thread on 2 cores.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn inverse_from_planes_avx2(
    tr: Transform,
    esize: usize,
    planes: &[u8],
    base: Option<&[u8]>,
    out: &mut [u8],
) {
    inverse_from_planes_any(tr, esize, planes, base, out)
}

/// [`inverse_from_planes_avx2`] for AVX-512 (BW: 16-bit lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn inverse_from_planes_avx512(
    tr: Transform,
    esize: usize,
    planes: &[u8],
    base: Option<&[u8]>,
    out: &mut [u8],
) {
    inverse_from_planes_any(tr, esize, planes, base, out)
}

#[inline(always)]
fn inverse_from_planes_any(tr: Transform, esize: usize, planes: &[u8], base: Option<&[u8]>, out: &mut [u8]) {
    macro_rules! go {
        ($w:ty) => {
            match tr {
                Transform::Xor => inverse_planes_w::<$w>(planes, base, out, |a, b| a ^ b),
                Transform::Sub => inverse_planes_w::<$w>(planes, base, out, W::wadd),
                Transform::Ulp => inverse_planes_w::<$w>(planes, base, out, W::ulp_inv),
            }
        };
    }
    match esize {
        1 => go!(u8),
        2 => go!(u16),
        4 => go!(u32),
        8 => go!(u64),
        _ => inverse_from_planes_reference(tr, esize, planes, base, out),
    }
}

//! Tensors in and out of the kernels: stored bytes decoded and cast to the merge's compute dtype
//! (mergekit's `LoadTensor` casts each input on load), merged values encoded to the output dtype.

use half::f16;

use super::round;
use super::torch::round_bf16;
use crate::format::Dtype;

/// Decode little-endian `src` of `from` and cast each value to `to` (mergekit's cast on load).
pub fn load_as(from: Dtype, to: Dtype, src: &[u8]) -> Vec<f32> {
    let n = if from.is_float() { src.len() / from.size() } else { 0 };
    let mut v = vec![0f32; n];
    load_into(from, to, src, &mut v);
    v
}

/// [`load_as`] into `dst` (`src.len() / from.size()` values; a non-float `from` writes nothing).
/// In 256-bit vectors where the CPU has AVX2 (the build's baseline is SSE2): the same bits.
pub fn load_into(from: Dtype, to: Dtype, src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2(from: Dtype, to: Dtype, src: &[u8], dst: &mut [f32]) {
            load_into_baseline(from, to, src, dst)
        }
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2(from, to, src, dst) };
    }
    load_into_baseline(from, to, src, dst)
}

#[inline(always)]
fn load_into_baseline(from: Dtype, to: Dtype, src: &[u8], dst: &mut [f32]) {
    match from {
        Dtype::F32 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = round(to, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Dtype::F16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = round(to, f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        Dtype::BF16 => {
            // A bf16 value is exact in f32 and stays itself when rounded to bf16 again (a NaN
            // already quiet), so only an f16 compute dtype rounds; the widening is half's
            // `to_f32` (the bits shifted up, a NaN made quiet) written out so it vectorizes.
            let widen = widen_bf16;
            if to == Dtype::F16 {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = round(to, widen(b));
                }
            } else {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = widen(b);
                }
            }
        }
        _ => {}
    }
}

/// One little-endian bf16 value as f32: half's `to_f32` (the bits shifted up, a NaN made
/// quiet), written out so the loops that call it vectorize.
#[inline(always)]
pub(super) fn widen_bf16(b: &[u8]) -> f32 {
    let h = u16::from_le_bytes([b[0], b[1]]);
    let h = if h & 0x7fff > 0x7f80 { h | 0x0040 } else { h };
    f32::from_bits((h as u32) << 16)
}

/// `n` zeroed values for a whole tensor's scratch (its values, its magnitudes), the pages
/// advised huge. Why: a TIES merge fills several such buffers per tensor, each fresh from the
/// allocator (calloc'd whole-tensor buffers are mapped, untouched, and unmapped when freed), and
/// faulting them in 4 KiB at a time was about a sixth of `llmfs merge`'s CPU on 2 cores; a fault
/// per 2 MiB leaves mostly the zeroing. Advice only: where the kernel has no huge pages to
/// give, the buffer is an ordinary one.
pub fn zeroed_tensor<T: bytemuck::Zeroable>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = bytemuck::allocation::zeroed_vec(n);
    const HUGE: usize = 2 << 20;
    let bytes = n * std::mem::size_of::<T>();
    if bytes >= 2 * HUGE {
        let (addr, page) = (v.as_mut_ptr() as usize, 4096);
        let start = addr.next_multiple_of(page);
        let end = (addr + bytes) / page * page;
        // SAFETY: advice on pages of this live allocation only (start..end lies inside it);
        // MADV_HUGEPAGE changes no contents, and a refusal changes nothing.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    v
}

/// Whole-tensor scratch buffers handed back for the next tensor to overwrite, while a
/// [`Recycling`] is alive (`llmfs merge`). Why: a fresh buffer's pages are zeroed by the kernel
/// as they are first touched, and the values and magnitudes of a 1 GB TIES merge were a tenth
/// of its CPU in that zeroing alone; a recycled buffer's pages are mapped already. Each buffer
/// is entirely overwritten by its next user, so its old contents are never read. Outside a
/// [`Recycling`] (the daemon) buffers are freed as before, so nothing is held between reads.
pub struct Pool<T> {
    bufs: std::sync::Mutex<Vec<Vec<T>>>,
}

/// Scratch of whole tensors' values (`MergedSource::whole_inputs`).
pub static VALUES: Pool<f32> = Pool::new();
/// Scratch of whole tensors' magnitudes (`sparsify`).
pub static MAGNITUDES: Pool<(f32, u32)> = Pool::new();

/// How many [`Recycling`] guards are alive.
static RECYCLING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// While one is alive, [`Pool::give`] keeps buffers; the last one dropped frees them all.
pub struct Recycling(());

impl Recycling {
    pub fn start() -> Recycling {
        RECYCLING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Recycling(())
    }
}

impl Drop for Recycling {
    fn drop(&mut self) {
        if RECYCLING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            VALUES.clear();
            MAGNITUDES.clear();
        }
    }
}

impl<T: bytemuck::Zeroable + Clone> Pool<T> {
    const fn new() -> Self {
        Pool { bufs: std::sync::Mutex::new(Vec::new()) }
    }

    /// `n` elements whose values are unspecified (old values of a recycled buffer, or zeros):
    /// for a caller that overwrites all of them. The smallest kept buffer that holds `n`, else
    /// a fresh [`zeroed_tensor`].
    pub fn take(&self, n: usize) -> Vec<T> {
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let fits = bufs.iter().enumerate().filter(|(_, b)| b.capacity() >= n);
        if let Some(i) = fits.min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i) {
            let mut b = bufs.swap_remove(i);
            drop(bufs);
            // Within the capacity: no new pages; only a grown tail is written (zeros).
            b.resize(n, T::zeroed());
            return b;
        }
        drop(bufs);
        zeroed_tensor(n)
    }

    /// Hand `v` back for a later [`take`](Self::take) while a [`Recycling`] is alive; else
    /// (and for small buffers, which the allocator reuses anyway) it is freed.
    pub fn give(&self, v: Vec<T>) {
        let big = v.capacity() * std::mem::size_of::<T>() >= 1 << 20;
        if big && RECYCLING.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            self.bufs.lock().unwrap_or_else(|e| e.into_inner()).push(v);
        }
    }

    fn clear(&self) {
        let freed = std::mem::take(&mut *self.bufs.lock().unwrap_or_else(|e| e.into_inner()));
        drop(freed);
    }
}

/// Encode f32 values as little-endian `to` (round to nearest even).
pub fn encode(to: Dtype, v: &[f32]) -> Vec<u8> {
    let size = if matches!(to, Dtype::BF16 | Dtype::F16) { 2 } else { 4 };
    let mut out = vec![0u8; v.len() * size];
    encode_into(to, v, &mut out);
    out
}

/// [`encode`] into `out` (`v.len()` values of `to`: 2 bytes for bf16/f16, else 4). In 256-bit
/// vectors where the CPU has AVX2, as [`load_into`].
pub fn encode_into(to: Dtype, v: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2(to: Dtype, v: &[f32], out: &mut [u8]) {
            encode_into_baseline(to, v, out)
        }
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2(to, v, out) };
    }
    encode_into_baseline(to, v, out)
}

#[inline(always)]
fn encode_into_baseline(to: Dtype, v: &[f32], out: &mut [u8]) {
    match to {
        Dtype::BF16 => {
            // `bf16::from_f32`'s bits: `round_bf16` is its rounding (tested bit for bit), inlined.
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&((round_bf16(x).to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        _ => {
            for (o, &x) in out.chunks_exact_mut(4).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The inlined bf16 paths against half's, on every bf16 pattern (NaNs, infinities,
    /// subnormals) and, for encode, f32 values around every rounding case.
    #[test]
    fn bf16_load_and_encode_are_halfs() {
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        for to in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let got = load_as(Dtype::BF16, to, &src);
            for (h, g) in (0..=u16::MAX).zip(&got) {
                let want = round(to, bf16::from_bits(h).to_f32());
                assert_eq!(g.to_bits(), want.to_bits(), "{h:#06x} to {to}");
            }
        }
        let xs: Vec<f32> = (0..=u32::MAX / 65519).map(|i| f32::from_bits(i * 65519)).collect();
        let want: Vec<u8> = xs.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
        assert_eq!(encode(Dtype::BF16, &xs), want);
    }
}

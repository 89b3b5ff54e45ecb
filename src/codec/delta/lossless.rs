//! The lossless delta codec (the default): a tensor's [`LosslessOptions`], its cut into chunks of
//! [`DELTA_CHUNK_ELEMS`] elements, the encoder (one checksummed zstd frame a chunk, in parallel,
//! with per-thread contexts) and the decoder of one stored chunk. The transform and the
//! byte-plane split it runs on each chunk are `transform.rs`'s; the measurements behind the
//! defaults and the stored layout ([`EncodedChunks`]) are in the parent module's doc.
//!
//! # Decoding untrusted frames
//!
//! [`decode_lossless_chunk`] takes a frame read from disk and must neither panic nor let the
//! frame choose how much memory is used. It checks the frame header itself (magic, checksum
//! flag set, no dictionary, declared content size equal to the chunk's size, exactly one frame)
//! and then runs zstd's one-shot decoder into a buffer of exactly the chunk's size: the one-shot
//! decoder uses the destination as its window and allocates nothing that depends on the frame,
//! so memory is the chunk (a per-thread scratch buffer reused across calls) plus a per-thread
//! zstd context of fixed size, whatever the frame declares.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::transform::{delta_forward, delta_inverse, forward_to_planes, inverse_from_planes};
use super::Transform;

/// Elements per lossless chunk: 256 Ki.
///
/// * Ratio: zstd's gain from a larger chunk has flattened out here (bf16 deltas, the example's
///   `chunk size` table: 64 Ki elements lose up to 2 % against 256 Ki, 1 Mi gains nothing)
///   while per-frame overhead (~20 bytes of header, block headers and checksum, 8 bytes of
///   offset) stays below 0.01 %.
/// * Reads: a power of two, so a chunk is 256 KiB / 512 KiB / 1 MiB / 2 MiB of output for 1 /
///   2 / 4 / 8-byte elements and divides the read path's 2 MiB cache chunk
///   (`vfs::read::CHUNK_SIZE`): one cache chunk of a bf16 tensor is 4 delta chunks, decoded in
///   parallel, and a read never decodes more than one chunk it does not need at each end.
/// * Memory: the decode scratch (one chunk of output) fits in L2, so the plane join and the
///   inverse transform run from cache.
pub const DELTA_CHUNK_ELEMS: usize = 1 << 18;

/// The zstd level llmfs encodes lossless deltas with: 1. On the measured deltas (module doc)
/// level 1 compresses as well as level 3 (within ±4 %, usually better) at a fraction of the
/// encode time; level 9 gains ≤ 9 % (only on near-identical tensors) for ~10× the encode time.
/// Decode speed hardly depends on the level.
pub const DEFAULT_LEVEL: i32 = 1;

/// The knobs of the lossless codec. Only [`LosslessOptions::DEFAULT`] is what llmfs writes;
/// the others exist so `examples/delta_ratio.rs` can measure the alternatives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LosslessOptions {
    pub transform: Transform,
    /// Split each chunk into byte planes before compressing (otherwise elements stay
    /// interleaved).
    pub planes: bool,
}

impl LosslessOptions {
    /// What llmfs stores for 1, 2, 4 and 8-byte elements; see the module doc for why.
    pub const DEFAULT: LosslessOptions = LosslessOptions { transform: Transform::Ulp, planes: true };

    /// What llmfs stores for `esize`-byte elements: [`Self::DEFAULT`], or XOR with planes for
    /// the widths `Ulp` does not cover.
    pub fn default_for(esize: usize) -> LosslessOptions {
        if Self::DEFAULT.transform.supports(esize) {
            Self::DEFAULT
        } else {
            LosslessOptions { transform: Transform::Xor, planes: true }
        }
    }
}

/// Errors of the lossless delta decoder: the caller's buffers do not fit, or a stored frame is
/// not what llmfs wrote.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// An element of zero bytes.
    #[error("element size must be at least 1 byte")]
    ZeroElementSize,
    /// The transform is not defined for this element size.
    #[error("transform {transform:?} does not support {esize}-byte elements")]
    Unsupported { transform: Transform, esize: usize },
    /// The output buffer is not a whole number of elements.
    #[error("output of {len} bytes is not a whole number of {esize}-byte elements")]
    PartialElement { len: usize, esize: usize },
    /// The chunk holds more elements than a lossless chunk can.
    #[error("output of {elems} elements is longer than a chunk ({max} elements)")]
    ChunkTooLong { elems: usize, max: usize },
    /// The base slice does not cover exactly the output's elements.
    #[error("base has {got} bytes, expected {expected} (the output's length)")]
    BaseLength { expected: usize, got: usize },
    /// The frame does not start with a zstd frame header.
    #[error("stored chunk is not a zstd frame ({0} bytes, bad magic or header)")]
    NotAFrame(usize),
    /// The frame was written without a content checksum, so corruption could not be detected.
    #[error("stored chunk has no content checksum")]
    NoChecksum,
    /// The frame needs a dictionary; llmfs never writes one.
    #[error("stored chunk needs a zstd dictionary")]
    Dictionary,
    /// The frame does not declare its decompressed size.
    #[error("stored chunk does not declare its size")]
    UnknownSize,
    /// The frame declares (or decodes to) a size other than the chunk's.
    #[error("stored chunk decodes to {got} bytes, expected {expected}")]
    SizeMismatch { expected: usize, got: u64 },
    /// The stored bytes are not exactly one frame (truncated, or bytes after it).
    #[error("stored chunk of {got} bytes is not exactly one zstd frame")]
    FrameLength { got: usize },
    /// zstd rejected the frame: corrupt data or a content checksum mismatch.
    #[error("stored chunk is corrupt: {0}")]
    Corrupt(String),
}

/// A tensor's lossless delta: independent zstd frames, one per chunk. See the module doc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedChunks {
    /// The frames back to back, in chunk order.
    pub frames: Vec<u8>,
    /// `n_chunks + 1` offsets into `frames`, starting at 0 and ending at `frames.len()`.
    pub offsets: Vec<u64>,
}

impl EncodedChunks {
    pub fn n_chunks(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The stored frame of chunk `c`.
    pub fn frame(&self, c: usize) -> &[u8] {
        &self.frames[self.offsets[c] as usize..self.offsets[c + 1] as usize]
    }
}

/// Number of lossless chunks of a tensor of `n_elems` elements (0 for an empty tensor).
pub fn chunk_count(n_elems: usize) -> usize {
    n_elems.div_ceil(DELTA_CHUNK_ELEMS)
}

/// The elements of chunk `chunk` of a tensor of `n_elems` elements (empty past the end).
pub fn chunk_elems(chunk: usize, n_elems: usize) -> Range<usize> {
    let start = chunk.saturating_mul(DELTA_CHUNK_ELEMS).min(n_elems);
    start..start.saturating_add(DELTA_CHUNK_ELEMS).min(n_elems)
}

/// The chunks that hold elements `elems` of a tensor.
pub fn chunks_covering(elems: &Range<usize>) -> Range<usize> {
    if elems.is_empty() {
        return 0..0;
    }
    elems.start / DELTA_CHUNK_ELEMS..(elems.end - 1) / DELTA_CHUNK_ELEMS + 1
}

/// Lay out one chunk as it is compressed: transformed, split into planes or not.
fn chunk_payload(opts: LosslessOptions, esize: usize, target: &[u8], base: Option<&[u8]>, out: &mut [u8]) {
    if opts.planes {
        forward_to_planes(opts.transform, esize, target, base, out);
    } else {
        match base {
            Some(b) => delta_forward(opts.transform, esize, target, b, out),
            None => delta_forward(opts.transform, esize, target, &vec![0u8; target.len()], out),
        }
    }
}

/// Encode a tensor's lossless delta with [`LosslessOptions::default_for`]`(esize)`: `target` against `base`
/// (same length; None for a new tensor), `esize`-byte elements, zstd `level` (see
/// [`DEFAULT_LEVEL`]). Chunks are encoded in parallel (rayon).
///
/// # Panics
/// If `esize == 0`, `target.len()` is not a multiple of `esize`, or `base` has another length.
/// (`encode_lossless_with` also panics for a transform that does not support `esize`.)
pub fn encode_lossless(target: &[u8], base: Option<&[u8]>, esize: usize, level: i32) -> EncodedChunks {
    encode_lossless_with(target, base, esize, level, LosslessOptions::default_for(esize))
}

/// [`encode_lossless`] with explicit options (for measuring the alternatives).
pub fn encode_lossless_with(
    target: &[u8],
    base: Option<&[u8]>,
    esize: usize,
    level: i32,
    opts: LosslessOptions,
) -> EncodedChunks {
    assert!(esize > 0, "element size must be at least 1");
    assert!(opts.transform.supports(esize), "{:?} does not support {esize}-byte elements", opts.transform);
    assert!(target.len() % esize == 0, "target is not a whole number of elements");
    assert!(base.is_none_or(|b| b.len() == target.len()), "base and target lengths differ");
    let n = target.len() / esize;
    let frames: Vec<Vec<u8>> = (0..chunk_count(n))
        .into_par_iter()
        .map(|c| {
            let r = chunk_elems(c, n);
            let bytes = r.start * esize..r.end * esize;
            encode_chunk_with(&target[bytes.clone()], base.map(|b| &b[bytes]), esize, level, opts)
        })
        .collect();
    let mut offsets = Vec::with_capacity(frames.len() + 1);
    offsets.push(0u64);
    let total: usize = frames.iter().map(Vec::len).sum();
    let mut all = Vec::with_capacity(total);
    for f in frames {
        all.extend_from_slice(&f);
        offsets.push(all.len() as u64);
    }
    EncodedChunks { frames: all, offsets }
}

/// A zstd compression context for one level, the payload scratch and the output scratch.
type EncoderState = (i32, zstd::bulk::Compressor<'static>, Vec<u8>, Vec<u8>);

thread_local! {
    /// Per thread: a zstd compression context for one level (with the content size and checksum
    /// flags set), the payload scratch (one chunk of planes) and the output scratch (zstd's bound
    /// for one chunk), reused across chunks so encoding allocates only each frame it returns.
    static ENCODER: RefCell<Option<EncoderState>> = const { RefCell::new(None) };
}

/// Encode ONE chunk of a tensor's lossless delta with [`LosslessOptions::default_for`]`(esize)`:
/// `target` is the chunk's elements ([`chunk_elems`]), `base` the base's same elements (None for
/// a tensor with no base). Returns the chunk's zstd frame, exactly the frame
/// [`encode_lossless`] stores for that chunk, so a tensor can be coded chunk by chunk as its bytes
/// arrive (the `deltas/` write path) and read back with [`decode_lossless_chunk`].
///
/// # Panics
/// Like [`encode_lossless`], and if `target` holds more than [`DELTA_CHUNK_ELEMS`] elements.
pub fn encode_lossless_chunk(target: &[u8], base: Option<&[u8]>, esize: usize, level: i32) -> Vec<u8> {
    let opts = LosslessOptions::default_for(esize);
    assert!(esize > 0 && target.len() % esize == 0, "target is not a whole number of elements");
    assert!(base.is_none_or(|b| b.len() == target.len()), "base and target lengths differ");
    assert!(target.len() / esize <= DELTA_CHUNK_ELEMS, "more than one chunk");
    encode_chunk_with(target, base, esize, level, opts)
}

fn encode_chunk_with(
    target: &[u8],
    base: Option<&[u8]>,
    esize: usize,
    level: i32,
    opts: LosslessOptions,
) -> Vec<u8> {
    ENCODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, ..)| *l != level) {
            let mut c = zstd::bulk::Compressor::new(level).expect("zstd compression context");
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).expect("zstd checksum flag");
            c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))
                .expect("zstd content size flag");
            *cell = Some((level, c, Vec::new(), Vec::new()));
        }
        let (_, comp, payload, out) = cell.as_mut().expect("just set");
        payload.resize(target.len(), 0);
        chunk_payload(opts, esize, target, base, payload);
        let bound = zstd::zstd_safe::compress_bound(target.len());
        if out.len() < bound {
            out.resize(bound, 0);
        }
        // The output holds zstd's bound, so compressing cannot fail but for allocation failure.
        let n = comp.compress_to_buffer(&payload[..], &mut out[..]).expect("zstd compress");
        out[..n].to_vec()
    })
}

/// zstd's frame magic number, little-endian (RFC 8878, 3.1.1).
pub(super) const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Check what the frame header says before zstd decodes a byte (RFC 8878, 3.1.1.1): one frame,
/// with a content checksum, no dictionary, declaring exactly `expected` bytes.
fn check_frame(frame: &[u8], expected: usize) -> Result<(), DeltaError> {
    if frame.len() < 6 || frame[..4] != ZSTD_MAGIC {
        return Err(DeltaError::NotAFrame(frame.len()));
    }
    let fhd = frame[4];
    if fhd & 0b100 == 0 {
        return Err(DeltaError::NoChecksum);
    }
    if fhd & 0b11 != 0 {
        return Err(DeltaError::Dictionary);
    }
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size == expected as u64 => {}
        Ok(Some(size)) => return Err(DeltaError::SizeMismatch { expected, got: size }),
        Ok(None) => return Err(DeltaError::UnknownSize),
        Err(_) => return Err(DeltaError::NotAFrame(frame.len())),
    }
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(len) if len == frame.len() => Ok(()),
        _ => Err(DeltaError::FrameLength { got: frame.len() }),
    }
}

thread_local! {
    /// Per thread: a zstd decoding context (fixed size) and the scratch the planes are
    /// decompressed into (grows to the largest chunk decoded on this thread: at most
    /// `DELTA_CHUNK_ELEMS × esize` bytes).
    static DECODER: RefCell<Option<(zstd::bulk::Decompressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Decode ONE whole chunk of a lossless delta with [`LosslessOptions::default_for`]`(esize)` into `out`.
///
/// `out.len()` is the chunk's element count ([`chunk_elems`]) × `esize`; `base`, when the
/// tensor has one, is the base's bytes of the same elements (same length as `out`). The frame
/// is untrusted: anything but the frame llmfs wrote for exactly these elements is an error
/// (never a panic, never wrong bytes short of a checksum collision), and memory stays at
/// `out.len()` plus a fixed-size zstd context whatever the frame declares.
pub fn decode_lossless_chunk(
    frame: &[u8],
    base: Option<&[u8]>,
    esize: usize,
    out: &mut [u8],
) -> Result<(), DeltaError> {
    decode_lossless_chunk_with(frame, base, esize, LosslessOptions::default_for(esize), out)
}

/// [`decode_lossless_chunk`] with explicit options.
pub fn decode_lossless_chunk_with(
    frame: &[u8],
    base: Option<&[u8]>,
    esize: usize,
    opts: LosslessOptions,
    out: &mut [u8],
) -> Result<(), DeltaError> {
    if esize == 0 {
        return Err(DeltaError::ZeroElementSize);
    }
    if !opts.transform.supports(esize) {
        return Err(DeltaError::Unsupported { transform: opts.transform, esize });
    }
    if out.len() % esize != 0 {
        return Err(DeltaError::PartialElement { len: out.len(), esize });
    }
    if out.len() / esize > DELTA_CHUNK_ELEMS {
        return Err(DeltaError::ChunkTooLong { elems: out.len() / esize, max: DELTA_CHUNK_ELEMS });
    }
    if let Some(b) = base {
        if b.len() != out.len() {
            return Err(DeltaError::BaseLength { expected: out.len(), got: b.len() });
        }
    }
    check_frame(frame, out.len())?;
    DECODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            let d = zstd::bulk::Decompressor::new().map_err(|e| DeltaError::Corrupt(e.to_string()))?;
            *cell = Some((d, Vec::new()));
        }
        let (dec, scratch) = cell.as_mut().expect("just set");
        // Without planes and without base, the XOR / Sub payload is the output itself.
        let direct = !opts.planes && base.is_none() && opts.transform != Transform::Ulp;
        let buf: &mut [u8] = if direct {
            &mut *out
        } else {
            if scratch.len() < out.len() {
                scratch.resize(out.len(), 0);
            }
            &mut scratch[..out.len()]
        };
        let got = dec.decompress_to_buffer(frame, buf).map_err(|e| DeltaError::Corrupt(e.to_string()))?;
        if got != out.len() {
            return Err(DeltaError::SizeMismatch { expected: out.len(), got: got as u64 });
        }
        if !direct {
            let payload = &scratch[..out.len()];
            if opts.planes {
                inverse_from_planes(opts.transform, esize, payload, base, out);
            } else {
                match base {
                    Some(b) => delta_inverse(opts.transform, esize, payload, b, out),
                    None => delta_inverse(opts.transform, esize, payload, &vec![0u8; out.len()], out),
                }
            }
        }
        Ok(())
    })
}

/// Decode a whole tensor (all chunks, in parallel): a convenience for tests and tools; the read
/// path decodes chunk by chunk.
pub fn decode_lossless_all(
    enc: &EncodedChunks,
    base: Option<&[u8]>,
    esize: usize,
    opts: LosslessOptions,
    out: &mut [u8],
) -> Result<(), DeltaError> {
    if esize == 0 {
        return Err(DeltaError::ZeroElementSize);
    }
    if out.len() % esize != 0 {
        return Err(DeltaError::PartialElement { len: out.len(), esize });
    }
    let n = out.len() / esize;
    if enc.offsets.len() != chunk_count(n) + 1 {
        return Err(DeltaError::FrameLength { got: enc.frames.len() });
    }
    out.par_chunks_mut(DELTA_CHUNK_ELEMS * esize).enumerate().try_for_each(|(c, o)| {
        let (a, b) = (enc.offsets[c] as usize, enc.offsets[c + 1] as usize);
        let frame = enc.frames.get(a..b).ok_or(DeltaError::FrameLength { got: enc.frames.len() })?;
        let r = chunk_elems(c, n);
        decode_lossless_chunk_with(frame, base.map(|b| &b[r.start * esize..r.end * esize]), esize, opts, o)
    })
}

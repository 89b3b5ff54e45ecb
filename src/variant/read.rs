//! Byte range → header bytes, stored bytes and decoded tensor chunks.
//!
//! A synthesized file is its header followed by tensors. A tensor stored verbatim is read straight
//! into the reply (no decode, no cache). Any other tensor is split into fixed chunks of
//! [`CHUNK_SIZE`] output bytes, counted from the tensor's start, and each chunk is decoded once
//! into the [`ChunkCache`]. The same function serves FUSE reads (`vfs`), `llmfs export` and
//! `llmfs check`, so they give the same bytes by construction.

use std::ops::Range;
use std::sync::Arc;

use super::{Content, ReadError, SynthFile, SynthTensor, VFile};
use crate::cache::{ChunkBuf, ChunkCache};

/// Output bytes per decoded chunk: large enough that per-chunk overhead (a cache lookup, a task)
/// is noise next to decoding 2 MiB, small enough that a 1 MiB FUSE read rarely waits for more
/// than one chunk and a 256 MiB cache holds 128 of them. A multiple of every element size.
pub const CHUNK_SIZE: u64 = 2 << 20;

/// (SynthFile id, tensor index in the file, chunk index: file offset / CHUNK_SIZE).
pub type ChunkKey = (u64, u32, u64);
pub type Cache = ChunkCache<ChunkKey, ReadError>;
/// A decoded chunk and the byte range of it a read wants.
pub type ChunkSlice = (Arc<ChunkBuf>, Range<usize>);

/// How many bytes a read of `size` at `offset` returns (fewer only at the end of the file).
pub fn read_len(file: &VFile, offset: u64, size: u64) -> usize {
    offset.saturating_add(size).min(file.size).saturating_sub(offset) as usize
}

/// Fill `out` with the bytes of `file` at `offset`; `out.len()` must be at most [`read_len`].
pub fn read_into(file: &VFile, offset: u64, out: &mut [u8], cache: &Cache) -> Result<(), ReadError> {
    if out.is_empty() {
        return Ok(());
    }
    let end = offset + out.len() as u64;
    match &file.content {
        Content::Passthrough(source) => source.read_exact_at(out, offset)?,
        Content::Generated(bytes) => out.copy_from_slice(&bytes[offset as usize..end as usize]),
        Content::Synth(synth) => read_synth(synth, offset, out, cache)?,
        Content::Broken(reason) => return Err(ReadError::Decode(reason.clone())),
    }
    Ok(())
}

/// [`read_into`] a new buffer.
pub fn read_range(file: &VFile, offset: u64, size: u64, cache: &Cache) -> Result<Vec<u8>, ReadError> {
    let mut out = vec![0u8; read_len(file, offset, size)];
    read_into(file, offset, &mut out, cache)?;
    Ok(out)
}

fn read_synth(synth: &SynthFile, offset: u64, out: &mut [u8], cache: &Cache) -> Result<(), ReadError> {
    let end = offset + out.len() as u64;
    let mut pos = offset;
    let header_len = synth.header.len() as u64;
    if pos < header_len {
        let n = end.min(header_len);
        out[..(n - pos) as usize].copy_from_slice(&synth.header[pos as usize..n as usize]);
        pos = n;
    }
    let mut index = synth.tensors.partition_point(|t| t.end <= pos);
    while pos < end {
        // Padding (a GGUF aligns each tensor) up to the next tensor, or to the end: zeros.
        let next = synth.tensors.get(index).map_or(synth.size, |t| t.start);
        if pos < next {
            let stop = end.min(next);
            out[(pos - offset) as usize..(stop - offset) as usize].fill(0);
            pos = stop;
            continue;
        }
        let Some(tensor) = synth.tensors.get(index) else { break };
        let stop = end.min(tensor.end);
        if let Some((file, stored_at)) = tensor.source.as_stored() {
            let dst = &mut out[(pos - offset) as usize..(stop - offset) as usize];
            file.read_exact_at(dst, stored_at + (pos - tensor.start))?;
            pos = stop;
        }
        while pos < stop {
            let chunk = chunk_of(tensor, pos);
            let range = chunk_range(tensor, chunk);
            let data = chunk_bytes(tensor, synth.id, index as u32, chunk, cache)?;
            let n = (range.end.min(stop) - pos) as usize;
            let from = (pos - range.start) as usize;
            out[(pos - offset) as usize..][..n].copy_from_slice(&data[from..from + n]);
            pos += n as u64;
        }
        index += 1;
    }
    Ok(())
}

/// When `[offset, offset + len)` lies inside one decoded chunk (the common case: chunks are
/// aligned to file offsets, so an aligned 1 MiB read never straddles two), that chunk and the
/// range within it: the reply can be sent straight from the cache, without a copy.
pub fn within_one_chunk(
    file: &VFile,
    offset: u64,
    len: usize,
    cache: &Cache,
) -> Option<Result<ChunkSlice, ReadError>> {
    let Content::Synth(synth) = &file.content else { return None };
    let end = offset + len as u64;
    let index = synth.tensors.partition_point(|t| t.end <= offset);
    let tensor = synth.tensors.get(index)?;
    if len == 0 || offset < tensor.start || end > tensor.end || tensor.source.as_stored().is_some() {
        return None;
    }
    let chunk = chunk_of(tensor, offset);
    let range = chunk_range(tensor, chunk);
    if end > range.end {
        return None;
    }
    let from = (offset - range.start) as usize;
    Some(chunk_bytes(tensor, synth.id, index as u32, chunk, cache).map(|data| (data, from..from + len)))
}

/// Chunk `k` of a tensor covers the file bytes from `boundary(k)` to `boundary(k + 1)`, where
/// `boundary(k)` is `k * CHUNK_SIZE` moved up to the tensor's next block boundary (an element,
/// or a ggml block) and clamped to the tensor. Aligning to file offsets rather than to the
/// tensor's start means an aligned read falls in one chunk; rounding to blocks keeps every
/// chunk whole blocks, whatever their size (34 bytes for Q8_0).
fn boundary(tensor: &SynthTensor, k: u64) -> u64 {
    let esize = tensor.source.stored_type().block_bytes() as u64;
    let b = (k * CHUNK_SIZE).clamp(tensor.start, tensor.end);
    (tensor.start + (b - tensor.start).div_ceil(esize) * esize).min(tensor.end)
}

/// The chunk holding file byte `pos` (which lies in `tensor`).
fn chunk_of(tensor: &SynthTensor, pos: u64) -> u64 {
    let k = pos / CHUNK_SIZE;
    if pos < boundary(tensor, k) {
        k - 1
    } else {
        k
    }
}

/// The file byte range of chunk `k` of `tensor`.
fn chunk_range(tensor: &SynthTensor, k: u64) -> Range<u64> {
    boundary(tensor, k)..boundary(tensor, k + 1)
}

fn chunk_bytes(
    tensor: &SynthTensor,
    file_id: u64,
    index: u32,
    chunk: u64,
    cache: &Cache,
) -> Result<Arc<ChunkBuf>, ReadError> {
    let range = chunk_range(tensor, chunk);
    cache.get_or_decode((file_id, index, chunk), range.end - range.start, |out| {
        decode_chunk(tensor, range, out)
    })
}

/// Decode one chunk. A panic while decoding (a bug in a codec or a merge) is this chunk's error,
/// for the request that wanted it and every reader waiting on it, never the end of the daemon
/// (a prefetch task on the rayon pool would otherwise abort the process).
fn decode_chunk(tensor: &SynthTensor, range: Range<u64>, out: &mut [u8]) -> Result<(), ReadError> {
    let esize = tensor.source.stored_type().block_bytes() as u64;
    let first = ((range.start - tensor.start) / esize) as usize;
    decode_elements(tensor, first..first + out.len() / esize as usize, out)
}

/// Decode elements `elems` of `tensor` into `out`, a panic in the decoder being an error: every
/// decode of the daemon (a FUSE read's chunk, a prefetch task, a whole-file decode into the
/// disk cache) goes through here.
pub fn decode_elements(tensor: &SynthTensor, elems: Range<usize>, out: &mut [u8]) -> Result<(), ReadError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        test_panic(&tensor.name);
        tensor.source.read(elems, out)
    }))
    .unwrap_or_else(|panic| {
        let reason = format!("decoding {}: {}", tensor.name, panic_message(&*panic));
        tracing::error!("{reason}");
        Err(ReadError::Decode(reason))
    })
}

/// Test-only hook (tests/writers.rs): with `LLMFS_TEST_PANIC_TENSOR=NAME` in the daemon's
/// environment, decoding tensor NAME panics (and so does a lookup of a file named NAME, a panic
/// in a FUSE handler itself), so a test can show a panic under a request is EIO and a log line.
/// Not a user setting; unset, it costs one cached lookup.
pub fn test_panic(tensor: &str) {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if NAME.get_or_init(|| std::env::var("LLMFS_TEST_PANIC_TENSOR").ok()).as_deref() == Some(tensor) {
        panic!("LLMFS_TEST_PANIC_TENSOR={tensor} (a test's deliberate panic)");
    }
}

/// The decoded chunks (tensor index, chunk index) of `synth` that overlap file bytes `from..to`
/// (tensors served from stored bytes have none).
fn chunks_overlapping(synth: &SynthFile, from: u64, to: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
    let first = synth.tensors.partition_point(|t| t.end <= from);
    synth.tensors.iter().enumerate().skip(first).take_while(move |(_, t)| t.start < to).flat_map(
        move |(index, tensor)| {
            let decoded = tensor.source.as_stored().is_none() && tensor.start < tensor.end;
            let chunks = if decoded {
                chunk_of(tensor, from.max(tensor.start))..chunk_of(tensor, to.min(tensor.end) - 1) + 1
            } else {
                0..0
            };
            chunks.map(move |chunk| (index, chunk))
        },
    )
}

/// Decode, in the background, the chunks that a sequential reader will want next: those covering
/// `[offset, offset + len)` that are neither cached nor being decoded. Errors are left for the
/// reader to meet (and report) when it gets there. `passed` is the offset the reader has dropped
/// its chunks behind ([`drop_behind`]): a task that runs late (a busy pool), after the reader
/// went by and dropped its chunk, neither decodes it nor leaves it cached (a CI run on 2 cores
/// found 46 MiB left after a sequential read that should leave under 40).
pub fn prefetch(
    file: &VFile,
    offset: u64,
    len: u64,
    cache: &Arc<Cache>,
    passed: Arc<std::sync::atomic::AtomicU64>,
) {
    let Content::Synth(synth) = &file.content else { return };
    for (index, chunk) in chunks_overlapping(synth, offset, offset.saturating_add(len).min(file.size)) {
        if cache.contains(&(synth.id, index as u32, chunk)) {
            continue;
        }
        let (synth, cache, passed) = (synth.clone(), cache.clone(), passed.clone());
        rayon::spawn(move || {
            let tensor = &synth.tensors[index];
            let behind =
                || chunk_range(tensor, chunk).end <= passed.load(std::sync::atomic::Ordering::Relaxed);
            if behind() {
                return;
            }
            // A panic escaping a rayon task aborts the process: keep it here (decode_chunk
            // already turns the decoder's own into an error).
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                chunk_bytes(tensor, synth.id, index as u32, chunk, &cache)
            }));
            if let Err(panic) = done {
                tracing::error!("prefetch: {}", panic_message(&*panic));
            }
            // Passed while this decoded: the reader's drop-behind may have run before it was cached.
            if behind() {
                cache.discard(&(synth.id, index as u32, chunk));
            }
        });
    }
}

/// Drop the cached chunks that end within `from..=to` (each chunk once, as a reader's `to` moves
/// on; the chunk it started in included): a sequential reader has gone past them and the kernel's
/// page cache holds their bytes (files are opened keep-cache), so keeping them would only push
/// other readers' chunks out and leave fresh memory (zeroed by the kernel) for every decode
/// instead of the mapping of a chunk just read.
pub fn drop_behind(file: &VFile, from: u64, to: u64, cache: &Cache) {
    let Content::Synth(synth) = &file.content else { return };
    let to = to.min(file.size);
    for (index, chunk) in chunks_overlapping(synth, from, to) {
        if chunk_range(&synth.tensors[index], chunk).end <= to {
            cache.discard(&(synth.id, index as u32, chunk));
        }
    }
}

/// The text of a caught panic, for the log line that replaces it.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned());
    format!("panic: {}", text.unwrap_or_else(|| "(no message)".into()))
}

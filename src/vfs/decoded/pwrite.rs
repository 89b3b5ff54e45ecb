//! A fill written by `pwrite` (the disk tier's, with few pool threads: see `write_decoded`), in
//! whole aligned spans of [`SPAN`] bytes where the host allows ([`aligned_spans`]).
//!
//! Why whole spans: ext4 (large folios, Linux 6.16 on) sizes the page-cache folio a write
//! creates by that write, within the alignment of its offset. A `pwrite` of an aligned 2 MiB
//! gets one 2 MiB folio, which a loader's mapping maps with one PMD entry; the same bytes written
//! as pieces of tensors (2 MiB each, but at the tensors' unaligned offsets) got folios of at most
//! 1 MiB, none PMD-mapped. On 2 cores here (`scripts/folio_check.py`, a 256 MiB file written
//! each way): touched through a mapping in 1.6 ms against 6.6, read at 29.8 GB/s against 20.9;
//! the decoded files of a 1100 MiB model, written by pieces, were 0 % PMD-mapped where the base
//! (read in by readahead) was 86 %, and a loader maps every decoded file it loads.
//!
//! So the pieces, decoded in parallel into buffers, are written a span at a time: a span as
//! soon as every piece overlapping it is decoded, with one `pwritev` of the pieces' bytes (and
//! zeros for the padding between tensors). Pieces are handed out in file order (one counter),
//! so a decoded piece rarely waits long for its neighbour: the buffers held are about two per
//! thread, recycled.
//!
//! Measured on 2 cores here (`scripts/bench_load_results/2core-session19-aligned.txt`, spans
//! and pieces alternating, four kinds, three loaders): loads after a remount at ≥ 0.9x of the
//! plain fine-tune in 19 of 24 cells against 10 of 24, first loads' medians unchanged. But
//! not where the host takes back free 2 MiB blocks, as this VM's does: there the fill itself
//! can be many times slower ([`aligned_spans`]), so there each piece is written as it comes,
//! as before. (An earlier try cut the pieces themselves at the file's 2 MiB boundaries, a
//! lossless chunk across a cut decoded twice: `scripts/bench_history.md`.)

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::{cache_io, pieces};
use crate::variant::{ReadError, SynthFile};

/// The unit written at once: the size of a PMD-mapped folio on x86-64 and arm64 (4 KiB pages).
const SPAN: u64 = 2 << 20;

/// Zeros for the padding between tensors (a GGUF's alignment: bytes, not megabytes).
static ZEROS: [u8; 4096] = [0; 4096];

/// A byte range of the file that one decode (or the header) writes.
struct Part {
    start: u64,
    end: u64,
    /// (tensor index, first element, end element); None for the header.
    piece: Option<(usize, u64, u64)>,
}

/// What the writers share, under one lock.
struct State {
    /// Per part: its bytes once decoded, until every span it overlaps is written.
    bytes: Vec<Option<Arc<Vec<u8>>>>,
    /// Per part: the spans it overlaps not yet written.
    spans_left: Vec<u32>,
    /// Per span: the parts overlapping it not yet decoded.
    missing: Vec<u32>,
}

/// Buffers of parts whose spans are all written, for the next decodes of this fill and of later
/// ones (as the per-thread scratch they replace was): a fresh 2 MiB buffer is page faults and
/// zeroing, and on this VM memory the host took back. At most [`SPARE_MAX`] are kept.
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// About two per thread of a small pool (fills by `pwrite` are those of fewer than 8 threads).
const SPARE_MAX: usize = 8;

fn spare() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    SPARE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Returns whether the disk cache's commit should re-fold the file: its pieces went unaligned,
/// so the page cache holds it in small folios (`LLMFS_REFOLD=0` leaves them, for comparisons).
pub(super) fn write_by_pwrite(synth: &SynthFile, out: &std::fs::File) -> Result<bool, ReadError> {
    let aligned = aligned_spans();
    write_pieces(synth, out, aligned).map(|()| !aligned && super::env_switch("LLMFS_REFOLD", || true))
}

/// Whether fills by `pwrite` gather their pieces into aligned spans: yes, unless the host takes
/// back free memory in 2 MiB blocks (a virtio balloon with free page reporting, Linux reporting
/// blocks of order 9 or more; `LLMFS_FILL_ALIGNED=1`/`0` decides for comparisons and tests).
///
/// There a 2 MiB folio is a block the host took back and must fault in again, 4 KiB at a time,
/// where the small folios of unaligned writes come from fragments it never took: on this
/// development VM (2 cores, reporting at order 9) a cast's 1 GB fill took 1.4 s instead of
/// 0.16 s right after another fill's memory was freed, and 0.19-0.20 s instead of 0.16-0.17
/// in the runs after; with reporting turned off (`page_reporting_order` 11) the two ways were
/// within the noise (0.18-0.22 s). The page cache is the host's to fill either way; only the
/// fill is on the first reader's path.
fn aligned_spans() -> bool {
    static ALIGNED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALIGNED.get_or_init(|| {
        let reclaims = host_reclaims_2mib_blocks();
        let aligned = super::env_switch("LLMFS_FILL_ALIGNED", || !reclaims);
        // Once per daemon: why its decoded files are (or are not) held in 2 MiB folios.
        tracing::info!(
            aligned,
            host_reclaims_2mib_blocks = reclaims,
            "fills by pwrite: {}",
            if aligned { "aligned 2 MiB spans" } else { "each piece as it is decoded" }
        );
        aligned
    })
}

/// A virtio balloon device offering free page reporting (feature bit 5, `features` being the
/// bits as '0'/'1' from bit 0), with Linux reporting free blocks of 2 MiB (order 9) or larger.
fn host_reclaims_2mib_blocks() -> bool {
    /// VIRTIO_BALLOON_F_REPORTING.
    const REPORTING: usize = 5;
    let order = std::fs::read_to_string("/sys/module/page_reporting/parameters/page_reporting_order")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if order.is_none_or(|o| o > 9) {
        return false;
    }
    let Ok(devices) = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon") else { return false };
    devices.flatten().any(|d| {
        std::fs::read_to_string(d.path().join("features"))
            .is_ok_and(|f| f.as_bytes().get(REPORTING) == Some(&b'1'))
    })
}

/// [`write_by_pwrite`] with the spans' gathering on or off (off: each piece written as soon as
/// it is decoded, at its own offset).
fn write_pieces(synth: &SynthFile, out: &std::fs::File, aligned: bool) -> Result<(), ReadError> {
    let mut parts = vec![];
    if !synth.header.is_empty() {
        parts.push(Part { start: 0, end: synth.header.len() as u64, piece: None });
    }
    for (i, from, to) in pieces(synth)? {
        let t = &synth.tensors[i];
        let esize = t.source.stored_type().block_bytes() as u64;
        parts.push(Part {
            start: t.start + from * esize,
            end: t.start + to * esize,
            piece: Some((i, from, to)),
        });
    }
    parts.retain(|p| p.end > p.start);
    // Tensors are in offset order after the header; pieces in order within a tensor.
    debug_assert!(parts.windows(2).all(|w| w[0].end <= w[1].start), "parts overlap or are out of order");
    let spans = synth.size.div_ceil(SPAN) as usize;
    let span_of = |at: u64| (at / SPAN) as usize;
    let mut missing = vec![0u32; spans];
    let mut spans_left = vec![0u32; parts.len()];
    for (i, p) in parts.iter().enumerate() {
        for m in &mut missing[span_of(p.start)..=span_of(p.end - 1)] {
            *m += 1;
            spans_left[i] += 1;
        }
    }
    let state = Mutex::new(State { bytes: vec![None; parts.len()], spans_left, missing });
    let w = Writer { synth, out, parts: &parts, state, one_writer: Mutex::new(()), aligned };
    if parts.first().is_some_and(|p| p.piece.is_none()) {
        w.done(0, synth.header.clone())?;
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    (0..rayon::current_num_threads()).into_par_iter().try_for_each(|_| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= parts.len() || failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some((t, from, to)) = parts[i].piece else { continue };
        let mut buf = spare().pop().unwrap_or_default();
        buf.resize((parts[i].end - parts[i].start) as usize, 0);
        let decoded =
            crate::variant::read::decode_elements(&synth.tensors[t], from as usize..to as usize, &mut buf)
                .and_then(|()| w.done(i, buf));
        if decoded.is_err() {
            failed.store(true, Ordering::Relaxed);
            return decoded;
        }
    })
}

struct Writer<'a> {
    synth: &'a SynthFile,
    out: &'a std::fs::File,
    parts: &'a [Part],
    state: Mutex<State>,
    /// One writer of the file at a time, the others asleep: buffered writes to one file
    /// serialize on its inode lock anyway, and a writer waiting for it in the kernel spins while
    /// the holder copies (the rwsem's optimistic spinning), a core burnt per waiter. On 2 cores
    /// `perf` of `llmfs warm q8` found 35 % of the fill threads' time in `rwsem_spin_on_owner`;
    /// with this lock `llmfs warm q8 f16` (four files at once) took 1.1-1.3 s and 1.2-1.3 CPU-s
    /// instead of 2.9-4.6 s and 4.0-7.4 CPU-s. The pieces still decode in parallel.
    one_writer: Mutex<()>,
    /// Spans gathered ([`aligned_spans`]), or each part written as it comes.
    aligned: bool,
}

impl Writer<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Part `i` is decoded into `bytes`: write every span that it completes.
    fn done(&self, i: usize, bytes: Vec<u8>) -> Result<(), ReadError> {
        let p = &self.parts[i];
        if !self.aligned {
            {
                let _writing = self.one_writer.lock().unwrap_or_else(|e| e.into_inner());
                self.out.write_all_at(&bytes, p.start).map_err(cache_io)?;
            }
            let mut spare = spare();
            if spare.len() < SPARE_MAX {
                spare.push(bytes);
            }
            return Ok(());
        }
        let mut ready = vec![];
        {
            let mut s = self.lock();
            s.bytes[i] = Some(Arc::new(bytes));
            for k in (p.start / SPAN) as usize..=((p.end - 1) / SPAN) as usize {
                s.missing[k] -= 1;
                if s.missing[k] == 0 {
                    ready.push(k);
                }
            }
        }
        ready.into_iter().try_for_each(|k| self.write_span(k))
    }

    /// Write span `k`, every part overlapping it decoded, then let go of the parts it finishes.
    fn write_span(&self, k: usize) -> Result<(), ReadError> {
        let (start, end) = (k as u64 * SPAN, ((k as u64 + 1) * SPAN).min(self.synth.size));
        let first = self.parts.partition_point(|p| p.end <= start);
        let last = self.parts.partition_point(|p| p.start < end);
        let held: Vec<Arc<Vec<u8>>> = {
            let s = self.lock();
            (first..last).map(|i| s.bytes[i].clone().expect("a ready span's parts are decoded")).collect()
        };
        let mut slices = vec![];
        let mut at = start;
        for (p, bytes) in self.parts[first..last].iter().zip(&held) {
            zeros(&mut slices, p.start.saturating_sub(at));
            let (from, to) = (p.start.max(start), p.end.min(end));
            slices.push(IoSlice::new(&bytes[(from - p.start) as usize..(to - p.start) as usize]));
            at = to;
        }
        zeros(&mut slices, end - at);
        {
            let _writing = self.one_writer.lock().unwrap_or_else(|e| e.into_inner());
            pwritev_all(self.out, &mut slices, start).map_err(cache_io)?;
        }
        drop(slices);
        drop(held);
        let mut s = self.lock();
        for i in first..last {
            s.spans_left[i] -= 1;
            if s.spans_left[i] == 0 {
                if let Some(buf) = s.bytes[i].take().and_then(|b| Arc::try_unwrap(b).ok()) {
                    let mut spare = spare();
                    if spare.len() < SPARE_MAX {
                        spare.push(buf);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Slices of [`ZEROS`] making `n` bytes.
fn zeros(slices: &mut Vec<IoSlice<'_>>, mut n: u64) {
    while n > 0 {
        let m = n.min(ZEROS.len() as u64);
        slices.push(IoSlice::new(&ZEROS[..m as usize]));
        n -= m;
    }
}

/// All of `slices` written at `at`, in as few `pwritev` calls as `IOV_MAX` allows.
fn pwritev_all(out: &std::fs::File, mut slices: &mut [IoSlice<'_>], mut at: u64) -> std::io::Result<()> {
    /// Linux's IOV_MAX.
    const IOV_MAX: usize = 1024;
    while !slices.is_empty() {
        let n = slices.len().min(IOV_MAX);
        // SAFETY: IoSlice is ABI-compatible with iovec on Unix (std's documented guarantee); the
        // n slices are live for the call.
        let r = unsafe {
            libc::pwritev(
                out.as_raw_fd(),
                slices.as_ptr().cast::<libc::iovec>(),
                n as libc::c_int,
                at as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        at += r as u64;
        IoSlice::advance_slices(&mut slices, r as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::SplitMix64;
    use crate::format::Dtype;
    use crate::registry::Fingerprint;
    use crate::variant::{SourceFile, SynthTensor, TensorSource};

    /// Tensors of every shape a span can meet: over a thousand tiny ones in one span (more
    /// slices than one `pwritev` takes), padding between them, tensors crossing one and several
    /// span boundaries, trailing padding. Every byte of the file is checked, with 1 and 3
    /// threads (a span's parts decoded by different threads, out of order).
    #[test]
    fn spans_hold_every_tensor_at_its_offset_and_zeros_between() {
        let dir = tempfile::tempdir().unwrap();
        let stored = dir.path().join("stored");
        let mut rng = SplitMix64(3);
        let data: Vec<u8> = (0..24 << 20).map(|_| rng.next_u64() as u8).collect();
        std::fs::write(&stored, &data).unwrap();
        let file = Arc::new(SourceFile::new(stored.clone(), Fingerprint::of(&stored).unwrap()));
        let header: Vec<u8> = (0..4000).map(|i| i as u8 | 1).collect();
        let mut tensors = vec![];
        let (mut at, mut from) = (header.len() as u64 + 24, 0u64);
        let mut sizes = vec![1000u64; 1500];
        sizes.extend([5 << 20, 3, 2 << 20, (2 << 20) + 17, 7 << 20]);
        for (i, len) in sizes.into_iter().enumerate() {
            let source = TensorSource::Stored { file: file.clone(), offset: from, dtype: Dtype::U8 };
            tensors.push(SynthTensor { name: format!("t{i}"), start: at, end: at + len, source });
            from += len;
            at += len + (i as u64 % 3) * 8;
        }
        let size = at + 5000;
        let synth = SynthFile::with_size(header.clone(), tensors, size);
        let mut want = vec![0u8; size as usize];
        want[..header.len()].copy_from_slice(&header);
        let mut from = 0;
        for t in &synth.tensors {
            let n = (t.end - t.start) as usize;
            want[t.start as usize..t.end as usize].copy_from_slice(&data[from..from + n]);
            from += n;
        }
        for threads in [1, 3] {
            let out = tempfile::tempfile_in(dir.path()).unwrap();
            out.set_len(size).unwrap();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for aligned in [true, false] {
                pool.install(|| write_pieces(&synth, &out, aligned)).unwrap();
                let mut got = vec![0u8; size as usize];
                out.read_exact_at(&mut got, 0).unwrap();
                let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                assert_eq!(bad, None, "{threads} threads, aligned {aligned}: first wrong byte");
                out.set_len(0).unwrap();
                out.set_len(size).unwrap();
            }
        }
    }

    /// A piece that fails to decode fails the fill (the caller discards the file), and the
    /// other threads stop taking pieces.
    #[test]
    fn a_failed_decode_fails_the_fill() {
        let dir = tempfile::tempdir().unwrap();
        let stored = dir.path().join("stored");
        std::fs::write(&stored, vec![7u8; 1 << 20]).unwrap();
        let file = Arc::new(SourceFile::new(stored.clone(), Fingerprint::of(&stored).unwrap()));
        // Reads past the end of the stored file: a short read, an error.
        let source = TensorSource::Stored { file, offset: 0, dtype: Dtype::U8 };
        let tensors = vec![SynthTensor { name: "t".into(), start: 8, end: 8 + (9 << 20), source }];
        let synth = SynthFile::new(vec![1; 8], tensors);
        let out = tempfile::tempfile_in(dir.path()).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for aligned in [true, false] {
            assert!(pool.install(|| write_pieces(&synth, &out, aligned)).is_err(), "aligned {aligned}");
        }
    }
}

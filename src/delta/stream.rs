//! Coding a safetensors file while it is being written (`cp` into `MOUNT/<base>/deltas/NEW/`).
//!
//! The write path stages every written byte on disk, and when the file is closed it must be
//! stored before close() returns. Coding it all at close would make the copy wait for the whole
//! encode; a [`Stream`] instead follows the writes: it knows the *contiguous prefix* of the file
//! written so far, parses the safetensors header as soon as the prefix holds it, and from then on
//! queues the lossless coding of each chunk ([`codec::DELTA_CHUNK_ELEMS`] elements) of each
//! tensor on the rayon pool the moment the prefix covers it. Coded chunks are appended, in order,
//! to the container ([`ContainerWriter`]), so at close only the last few chunks and the header
//! are left, and memory holds only the chunks being coded (a few MiB).
//!
//! Chunk bytes are read back from the staged file (the page cache), never kept from the writes.
//! The container is byte-identical to what [`super::make::store_file`] writes for the same file,
//! and is used only when that is certain; otherwise [`Stream::finish`] answers `None` and the
//! caller codes the staged file at close as before:
//! * a write below the prefix (bytes already queued may have been read before the rewrite), a
//!   truncation below it, or a header that does not parse: the stream gives up at once;
//! * writes beyond the prefix (out of order, several writers) are remembered as ranges and
//!   joined to the prefix when the gap is filled, so the stream goes on;
//! * at close the file must be exactly as long as its header says and wholly covered by writes
//!   (a hole left by `truncate` to a larger size, or bytes staged without a write, are not).
//!
//! An error while coding (reading the staged file or the base, a full disk writing the
//! container) also makes `finish` answer `None`: coding the staged file again reports the error
//! as it always did, so close() still returns ENOSPC or EIO.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::make::{encode_chunk_at, BaseTensors, ContainerWriter, Layout};
use super::DeltaCodec;
use crate::codec::delta as codec;
use crate::format::{self, Dtype};
use crate::registry::{io_err, Error, FileRecord, FileRole, Fingerprint};
use crate::variant::recipe::delta::keys;
use crate::variant::view::LogicalTensor;

/// One step of the container, in container order.
enum Job {
    /// The target's header bytes, `[0, len)`.
    Header { len: u64 },
    /// Chunk `chunk` of tensor `tensor`.
    Chunk { tensor: usize, chunk: usize },
    /// After a tensor's last chunk: its `frames` part ends and its `offsets` part follows.
    End { tensor: usize },
}

struct Tensor {
    name: String,
    dtype: Dtype,
    numel: usize,
    /// Where the tensor's bytes start in the file.
    at: u64,
    twin: Option<LogicalTensor>,
}

struct Plan {
    tensors: Vec<Tensor>,
    /// Jobs and the prefix length each needs, in container order (so `ready_at` never decreases).
    jobs: Vec<(u64, Job)>,
    /// The file's size as its header says.
    size: u64,
    role: FileRole,
}

/// Where the writes are.
struct Progress {
    /// `[0, hwm)` was written.
    hwm: u64,
    /// Written ranges past `hwm`, start → end (disjoint, not touching `hwm`).
    pending: BTreeMap<u64, u64>,
    /// Given up: `finish` answers None.
    broken: bool,
    /// The plan, once the header was read (None before; `broken` if it did not parse).
    plan: Option<Arc<Plan>>,
    /// Jobs handed out so far.
    queued: usize,
}

/// What was coded.
struct Output {
    writer: Option<ContainerWriter>,
    /// Coded jobs not yet appended (they finished before an earlier one).
    done: BTreeMap<usize, Vec<u8>>,
    /// Next job to append.
    next: usize,
    /// The current tensor's chunk offsets within its frames.
    offsets: Vec<u64>,
    failed: bool,
}

struct Inner {
    src: File,
    name: String,
    container: PathBuf,
    base: Arc<BaseTensors>,
    progress: Mutex<Progress>,
    output: Mutex<Output>,
    all_done: Condvar,
}

/// The coding of one staged file as it is written. See the module doc.
pub struct Stream {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stream {
    /// Follow the writes of staged file `staged` (named `name`, empty now), coding it against
    /// `base` into a new container at `container`. None when the file is not one a stream codes
    /// (only `*.safetensors` files are; anything else is small or not worth it).
    pub fn new(staged: &Path, name: &str, container: PathBuf, base: Arc<BaseTensors>) -> Option<Stream> {
        if !name.ends_with(".safetensors") {
            return None;
        }
        let src = File::open(staged).ok()?;
        Some(Stream {
            inner: Arc::new(Inner {
                src,
                name: name.to_owned(),
                container,
                base,
                progress: Mutex::new(Progress {
                    hwm: 0,
                    pending: BTreeMap::new(),
                    broken: false,
                    plan: None,
                    queued: 0,
                }),
                output: Mutex::new(Output {
                    writer: None,
                    done: BTreeMap::new(),
                    next: 0,
                    offsets: vec![0],
                    failed: false,
                }),
                all_done: Condvar::new(),
            }),
        })
    }

    /// Bytes `[offset, offset + len)` were written to the staged file (the write returned).
    pub fn written(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let inner = &self.inner;
        let mut p = lock(&inner.progress);
        if p.broken {
            return;
        }
        if offset < p.hwm {
            // Bytes that may already have been read for coding changed.
            p.broken = true;
            return;
        }
        // Merge [offset, end) with the pending ranges it touches, then into the prefix.
        let mut start = offset;
        let mut end = offset + len;
        let touching: Vec<(u64, u64)> =
            p.pending.range(..=end).filter(|&(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            p.pending.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        if start == p.hwm {
            p.hwm = end;
        } else {
            p.pending.insert(start, end);
        }
        if p.plan.is_none() && !self.read_header(&mut p) {
            return;
        }
        let ready = self.take_ready(&mut p);
        drop(p);
        self.run(ready);
    }

    /// The file was truncated (or extended) to `size`.
    pub fn resized(&self, size: u64) {
        let mut p = lock(&self.inner.progress);
        if size < p.hwm || p.pending.values().any(|&e| e > size) {
            p.broken = true;
        }
    }

    /// Give up: the container is dropped and `finish` answers None.
    pub fn abandon(&self) {
        lock(&self.inner.progress).broken = true;
        let mut out = lock(&self.inner.output);
        out.failed = true;
        if out.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.inner.container);
        }
    }

    /// Once the prefix holds the header: plan the jobs and create the container. False when the
    /// stream cannot go on (header not there yet, or it does not parse: then `broken`).
    fn read_header(&self, p: &mut Progress) -> bool {
        let inner = &self.inner;
        if p.hwm < 8 {
            return false;
        }
        let mut len = [0u8; 8];
        if inner.src.read_exact_at(&mut len, 0).is_err() {
            p.broken = true;
            return false;
        }
        let len = u64::from_le_bytes(len);
        if len > format::MAX_HEADER_SIZE {
            p.broken = true;
            return false;
        }
        if p.hwm < 8 + len {
            return false;
        }
        let mut prefix = vec![0u8; 8 + len as usize];
        if inner.src.read_exact_at(&mut prefix, 0).is_err() {
            p.broken = true;
            return false;
        }
        // The header says how long the file is: parse once against the shortest possible size
        // to learn it (the error names where the data ends), then check it against that size.
        let size = match format::parse_header_prefix(&prefix, 8 + len) {
            Ok(_) => 8 + len,
            Err(format::HeaderError::DataSizeMismatch { data_end, .. }) => 8 + len + data_end,
            Err(_) => {
                p.broken = true;
                return false;
            }
        };
        let Ok(h) = format::parse_header_prefix(&prefix, size) else {
            p.broken = true;
            return false;
        };
        let layout = Layout::safetensors(&inner.name, size, &h, &inner.base, DeltaCodec::Lossless);
        let writer = match ContainerWriter::create(&inner.container, &layout) {
            Ok(w) => w,
            Err(_) => {
                p.broken = true;
                return false;
            }
        };
        let mut tensors = vec![];
        let mut jobs = vec![(h.data_start, Job::Header { len: h.data_start })];
        for (i, t) in h.tensors.iter().enumerate() {
            let at = h.data_start + t.start;
            let numel = t.numel();
            for c in 0..codec::chunk_count(numel) {
                let end = codec::chunk_elems(c, numel).end as u64 * t.dtype.size() as u64;
                jobs.push((at + end, Job::Chunk { tensor: i, chunk: c }));
            }
            jobs.push((h.data_start + t.end, Job::End { tensor: i }));
            let twin = inner.base.twin(&t.name, &t.shape, t.dtype).cloned();
            tensors.push(Tensor { name: t.name.clone(), dtype: t.dtype, numel, at, twin });
        }
        p.plan = Some(Arc::new(Plan { tensors, jobs, size, role: layout.role }));
        lock(&inner.output).writer = Some(writer);
        true
    }

    /// The jobs the prefix now covers (indices), marked as handed out.
    fn take_ready(&self, p: &mut Progress) -> std::ops::Range<usize> {
        let Some(plan) = &p.plan else { return 0..0 };
        let first = p.queued;
        while p.queued < plan.jobs.len() && plan.jobs[p.queued].0 <= p.hwm {
            p.queued += 1;
        }
        first..p.queued
    }

    /// Code jobs `ready` on the rayon pool (the markers in between at once).
    fn run(&self, ready: std::ops::Range<usize>) {
        if ready.is_empty() {
            return;
        }
        let plan = lock(&self.inner.progress).plan.clone().expect("jobs come from a plan");
        for i in ready {
            let inner = self.inner.clone();
            let plan = plan.clone();
            match plan.jobs[i].1 {
                Job::End { .. } => inner.complete(&plan, i, Ok(vec![])),
                _ => rayon::spawn(move || {
                    let result = inner.code(&plan, i);
                    inner.complete(&plan, i, result);
                }),
            }
        }
    }

    /// Close of the staged file, whose size is now `size`: wait for the last chunks and finish the
    /// container. None when the stream cannot stand for the file (see the module doc): code the
    /// staged file instead. Some(Ok): the container's path (in the staging directory) and its
    /// record; Some(Err): it could not be made durable.
    pub fn finish(&self, size: u64) -> Option<Result<(PathBuf, FileRecord), Error>> {
        let inner = &self.inner;
        let (n_jobs, role) = {
            let mut p = lock(&inner.progress);
            let usable = !p.broken
                && p.hwm == size
                && p.pending.is_empty()
                && p.plan.as_ref().is_some_and(|plan| plan.size == size && p.queued == plan.jobs.len());
            let n = p.plan.as_ref().map_or((0, FileRole::Weights), |plan| (plan.jobs.len(), plan.role));
            // Nothing more is queued whatever comes.
            p.broken = true;
            if !usable {
                drop(p);
                self.abandon();
                return None;
            }
            n
        };
        let mut out = lock(&inner.output);
        while out.next < n_jobs && !out.failed {
            out = inner.all_done.wait(out).unwrap_or_else(|e| e.into_inner());
        }
        if out.failed {
            drop(out);
            self.abandon();
            return None;
        }
        let writer = out.writer.take()?;
        drop(out);
        let path = &inner.container;
        let done = writer.finish().and_then(|()| {
            let fingerprint = Fingerprint::of(path).map_err(io_err(path))?;
            Ok((path.clone(), FileRecord { name: inner.name.clone(), role, fingerprint, object: None }))
        });
        Some(done.inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        }))
    }
}

impl Inner {
    /// Code job `i`: the header's bytes, or a chunk's frame.
    fn code(&self, plan: &Plan, i: usize) -> Result<Vec<u8>, Error> {
        if lock(&self.output).failed {
            return Ok(vec![]);
        }
        match plan.jobs[i].1 {
            Job::Header { len } => {
                let mut bytes = vec![0u8; len as usize];
                self.src.read_exact_at(&mut bytes, 0).map_err(|e| Error::Invalid(e.to_string()))?;
                Ok(bytes)
            }
            Job::Chunk { tensor, chunk } => {
                let t = &plan.tensors[tensor];
                encode_chunk_at(&self.src, t.at, t.dtype, t.numel, chunk, t.twin.as_ref())
            }
            Job::End { .. } => Ok(vec![]),
        }
    }

    /// Job `i` is coded: append it and every following one already coded, in order.
    fn complete(&self, plan: &Plan, i: usize, result: Result<Vec<u8>, Error>) {
        let mut out = lock(&self.output);
        match result {
            Ok(bytes) => {
                out.done.insert(i, bytes);
            }
            Err(e) => {
                tracing::debug!("{}: coding while written failed, coding at close instead: {e}", self.name);
                out.failed = true;
            }
        }
        while !out.failed {
            let next = out.next;
            let Some(bytes) = out.done.remove(&next) else { break };
            if let Err(e) = self.append(&mut out, plan, next, &bytes) {
                tracing::debug!("{}: writing the container failed, coding at close instead: {e}", self.name);
                out.failed = true;
            }
            out.next += 1;
        }
        if out.failed {
            out.done.clear();
        }
        self.all_done.notify_all();
    }

    fn append(&self, out: &mut Output, plan: &Plan, i: usize, bytes: &[u8]) -> Result<(), Error> {
        let Output { writer, offsets, .. } = out;
        let Some(w) = writer.as_mut() else { return Ok(()) };
        match plan.jobs[i].1 {
            Job::Header { .. } => w.part(keys::HEADER, Dtype::U8, bytes),
            Job::Chunk { .. } => {
                w.write(bytes)?;
                offsets.push(w.part_len());
                Ok(())
            }
            Job::End { tensor } => {
                let name = &plan.tensors[tensor].name;
                w.end_part(&format!("{name}.frames"), Dtype::U8);
                let table: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
                *offsets = vec![0];
                w.part(&format!("{name}.offsets"), Dtype::U64, &table)
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A stream dropped without finish (the file was removed, truncated, or discarded).
        let mut out = lock(&self.inner.output);
        if out.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.inner.container);
        }
        out.failed = true;
        self.inner.all_done.notify_all();
    }
}

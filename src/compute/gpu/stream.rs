//! The streaming engine every kernel runs through: a call's work as [`Chunk`]s (uniform
//! parameters, inputs made of byte pieces, a 1-D or 2-D grid), [`SETS`] sets of pooled buffers
//! in rotation so uploads, dispatches and readbacks of neighbouring chunks overlap, and the
//! choice per chunk between host-visible buffers read and written by the kernel itself and DMA
//! copies through device memory (see *Streaming* in the parent module's doc).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use super::copy::Job;
use super::{GpuContext, GpuError, Kernel};

/// Buffer sets in rotation: chunk `i + 1` is filled while `i` and `i - 1` run on the GPU
/// and `i - 2` is copied out (the copies on the device and the kernels run in queue order).
pub(super) const SETS: usize = 3;

/// Where a chunk's kernel reads its inputs and writes its output: host-visible memory
/// directly (true) or device memory with DMA copies (false).
#[derive(Clone, Copy)]
struct Direct {
    /// Bit i: input i is read directly.
    inputs: u32,
    output: bool,
}

impl Direct {
    fn input(self, i: usize) -> bool {
        self.inputs & (1 << i) != 0
    }
}

/// One set of reusable buffers ([`SETS`] of them rotate).
#[derive(Default)]
pub(super) struct BufSet {
    params: Option<wgpu::Buffer>,
    /// Host-visible upload buffers, one per input (MAP_WRITE | COPY_SRC, and STORAGE when
    /// kernels read them directly), mapped whenever the set is idle.
    staging: Vec<Option<Staging>>,
    /// Device-local copies of the inputs (unused with direct inputs).
    inputs: Vec<Option<wgpu::Buffer>>,
    out: Option<wgpu::Buffer>,
    /// Host-visible (MAP_READ) output: copied into from `out`, or written by the kernel.
    readback: Option<wgpu::Buffer>,
}

struct Staging {
    buf: wgpu::Buffer,
    /// Set by the map callback once the buffer is mapped for writing again.
    mapped: Arc<AtomicBool>,
}

/// A submitted chunk whose output is still to be copied out.
struct Pending {
    idx: wgpu::SubmissionIndex,
    set: usize,
    out_at: usize,
    out_len: usize,
    mapped: mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
}

/// One input of a chunk: `size` bytes (a multiple of 4), made of `pieces` at byte offsets; the
/// rest is zero.
pub(crate) struct Upload<'a> {
    pub size: u64,
    pub pieces: Vec<(u64, &'a [u8])>,
}

impl<'a> Upload<'a> {
    pub fn bytes(b: &'a [u8]) -> Self {
        Upload { size: pad4(b.len() as u64), pieces: vec![(0, b)] }
    }
    pub fn zeros() -> Self {
        Upload { size: 4, pieces: Vec::new() }
    }
}

/// One dispatch: its uniform block, inputs (bindings 1..), and where its output goes.
pub(crate) struct Chunk<'a> {
    pub params: Vec<u32>,
    pub inputs: Vec<Upload<'a>>,
    /// Bytes of `out` this chunk fills, starting at `out_at`.
    pub out_at: usize,
    pub out_len: usize,
    /// Bytes the kernel's output buffer needs (≥ out_len, a multiple of 4).
    pub out_bytes: u64,
    /// Workgroups: `Linear(n)` for the 1-D kernels (laid out on a 2-D grid), or a grid.
    pub groups: Groups,
    /// Zero the output buffer first (kernels that OR partial words in); implies `staged`.
    pub clear_out: bool,
    /// Move this chunk through device memory with DMA copies even where kernels may read and
    /// write host memory directly: its accesses would be atomic or strided, slow over PCIe.
    pub staged: bool,
}

pub(crate) enum Groups {
    Linear(u64),
    Grid(u32, u32),
}

pub(super) fn pad4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

/// Buffer sizes grow in steps of 1 MiB so a run of similar calls reuses one allocation.
fn grow(n: u64) -> u64 {
    n.max(16).div_ceil(1 << 20) * (1 << 20)
}

impl GpuContext {
    /// Runs `chunks` of `kernel`, writing each chunk's output into `out`.
    pub(crate) fn run(&self, kernel: Kernel, chunks: Vec<Chunk<'_>>, out: &mut [u8]) -> Result<(), GpuError> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let iters = self.kernel_iters.load(Ordering::Relaxed);
        let r = self.run_locked(&mut pool, kernel, chunks, out, iters);
        // An error leaves buffers in unknown states (mapped, pending): start afresh next time.
        if r.is_err() {
            *pool = Default::default();
        }
        r
    }

    fn run_locked(
        &self,
        pool: &mut [BufSet; SETS],
        kernel: Kernel,
        chunks: Vec<Chunk<'_>>,
        out: &mut [u8],
        iters: u32,
    ) -> Result<(), GpuError> {
        let pipeline = &self.pipelines[kernel as usize];
        let layout = pipeline.get_bind_group_layout(0);
        // Submitted chunks, oldest first; chunk i uses set i % SETS, so when every set is in
        // flight the oldest is the one holding the set the next chunk needs.
        let mut pending: VecDeque<Pending> = VecDeque::new();
        for (ci, chunk) in chunks.into_iter().enumerate() {
            let s = ci % SETS;
            if pending.len() == SETS {
                let p = pending.pop_front().expect("SETS > 0");
                self.finish(&pool[p.set], p, out)?;
            }
            let staged = chunk.staged || chunk.clear_out;
            let inputs = (0..chunk.inputs.len())
                .filter(|&i| self.direct_inputs && !staged && kernel.direct_input_ok(i))
                .fold(0, |m, i| m | 1 << i);
            let direct = Direct { inputs, output: self.direct_output && !staged };
            let direct_out = direct.output;
            self.fill_inputs(&mut pool[s], &chunk, direct)?;
            let set = &pool[s];
            let bind = self.bind_group(set, &layout, &chunk, direct);
            let out_buf = if direct_out { set.readback.as_ref() } else { set.out.as_ref() }
                .expect("made by fill_inputs");
            let dispatch = |enc: &mut wgpu::CommandEncoder| {
                if chunk.clear_out {
                    enc.clear_buffer(out_buf, 0, None);
                }
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind, &[]);
                let (x, y) = self.grid(&chunk.groups);
                pass.dispatch_workgroups(x, y, 1);
            };
            let mut enc = self.device.create_command_encoder(&Default::default());
            self.encode_uploads(&mut enc, set, &chunk, direct);
            dispatch(&mut enc);
            let mut enc = if iters > 0 {
                // Benchmark: run once, then time `iters` dispatches on resident inputs.
                self.queue.submit([enc.finish()]);
                self.wait(None)?;
                let t0 = Instant::now();
                let mut enc = self.device.create_command_encoder(&Default::default());
                for _ in 0..iters {
                    dispatch(&mut enc);
                }
                self.queue.submit([enc.finish()]);
                self.wait(None)?;
                self.kernel_nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                self.device.create_command_encoder(&Default::default())
            } else {
                enc
            };
            let rb_len = pad4(chunk.out_len as u64).max(4);
            let readback = set.readback.as_ref().expect("made by fill_inputs");
            if !direct_out {
                enc.copy_buffer_to_buffer(out_buf, 0, readback, 0, rb_len);
            }
            let idx = self.queue.submit([enc.finish()]);
            // Ask for the host buffers back now: wgpu maps them once this chunk is done, and
            // the polls that wait for earlier chunks deliver the callbacks.
            for st in set.staging.iter().take(chunk.inputs.len()).flatten() {
                let flag = st.mapped.clone();
                st.buf
                    .slice(..)
                    .map_async(wgpu::MapMode::Write, move |r| flag.store(r.is_ok(), Ordering::Release));
            }
            let (tx, rx) = mpsc::channel();
            readback.slice(..rb_len).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            pending.push_back(Pending {
                idx,
                set: s,
                out_at: chunk.out_at,
                out_len: chunk.out_len,
                mapped: rx,
            });
        }
        while let Some(p) = pending.pop_front() {
            self.finish(&pool[p.set], p, out)?;
        }
        self.check()
    }

    pub(super) fn grid(&self, g: &Groups) -> (u32, u32) {
        match *g {
            Groups::Grid(x, y) => (x, y),
            Groups::Linear(n) => {
                let max = self.max_groups_per_dim() as u64;
                let n = n.max(1);
                let x = n.min(max);
                (x as u32, n.div_ceil(x) as u32)
            }
        }
    }

    fn make_buffer(&self, size: u64, usage: wgpu::BufferUsages, mapped: bool) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: grow(size).min(self.limits.max_buffer_size.max(size)),
            usage,
            mapped_at_creation: mapped,
        })
    }

    /// A buffer of at least `size` bytes in `slot`, kept when big enough.
    fn buffer(&self, slot: &mut Option<wgpu::Buffer>, size: u64, usage: wgpu::BufferUsages) {
        if slot.as_ref().is_none_or(|b| b.size() < size) {
            *slot = None; // free the old one before making the new one
            *slot = Some(self.make_buffer(size, usage, false));
        }
    }

    /// Waits until the set's upload buffers are mapped again, copies the chunk's inputs into
    /// them (all copy threads at once), grows the other buffers as needed and writes the
    /// parameters.
    fn fill_inputs(&self, set: &mut BufSet, chunk: &Chunk<'_>, direct: Direct) -> Result<(), GpuError> {
        use wgpu::BufferUsages as U;
        let n = chunk.inputs.len();
        if set.staging.len() < n {
            set.staging.resize_with(n, || None);
        }
        let usage = U::MAP_WRITE | U::COPY_SRC | if self.direct_inputs { U::STORAGE } else { U::empty() };
        for (slot, u) in set.staging.iter_mut().zip(&chunk.inputs) {
            if slot.as_ref().is_none_or(|s| s.buf.size() < u.size) {
                *slot = None; // free the old one before making the new one
                *slot = Some(Staging {
                    buf: self.make_buffer(u.size, usage, true),
                    mapped: Arc::new(AtomicBool::new(true)),
                });
            }
        }
        // The maps asked for when this set's last chunk was submitted: that chunk is finished
        // (its readback was copied out), so a non-blocking poll normally completes them;
        // waiting for the whole queue would wait for the chunks in flight and undo the overlap.
        let mut tries = 0;
        while !set.staging.iter().take(n).flatten().all(|s| s.mapped.load(Ordering::Acquire)) {
            if tries < 100 {
                self.device.poll(wgpu::PollType::Poll).map_err(|e| GpuError::Wgpu(e.to_string()))?;
            } else {
                self.wait(None)?;
            }
            tries += 1;
            self.check()?;
        }
        {
            let mut views: Vec<wgpu::BufferViewMut> = set
                .staging
                .iter()
                .zip(&chunk.inputs)
                .map(|(s, u)| s.as_ref().unwrap().buf.slice(..u.size).get_mapped_range_mut())
                .collect();
            let mut jobs = Vec::new();
            for (view, u) in views.iter_mut().zip(&chunk.inputs) {
                let mut rest: &mut [u8] = view;
                let mut filled = 0usize;
                for &(off, bytes) in &u.pieces {
                    let (gap, tail) = rest.split_at_mut(off as usize - filled);
                    let (dst, tail) = tail.split_at_mut(bytes.len());
                    if !gap.is_empty() {
                        jobs.push(Job { dst: gap, src: None });
                    }
                    jobs.push(Job { dst, src: Some(bytes) });
                    rest = tail;
                    filled = off as usize + bytes.len();
                }
                if !rest.is_empty() {
                    jobs.push(Job { dst: rest, src: None });
                }
            }
            self.copier.run(jobs, None);
        }
        for s in set.staging.iter().take(n).flatten() {
            s.buf.unmap();
            s.mapped.store(false, Ordering::Release);
        }
        if set.inputs.len() < n {
            set.inputs.resize_with(n, || None);
        }
        for (i, (slot, u)) in set.inputs.iter_mut().zip(&chunk.inputs).enumerate() {
            if !direct.input(i) {
                self.buffer(slot, u.size, U::STORAGE | U::COPY_DST);
            }
        }
        let rb_usage = U::MAP_READ | U::COPY_DST | if self.direct_output { U::STORAGE } else { U::empty() };
        if direct.output {
            self.buffer(&mut set.readback, chunk.out_bytes.max(pad4(chunk.out_len as u64)).max(4), rb_usage);
        } else {
            self.buffer(&mut set.out, chunk.out_bytes.max(4), U::STORAGE | U::COPY_SRC | U::COPY_DST);
            self.buffer(&mut set.readback, pad4(chunk.out_len as u64).max(4), rb_usage);
        }
        let mut params = chunk.params.clone();
        params.resize(params.len().div_ceil(4).max(1) * 4, 0);
        // Uniform bindings are small (64 KiB on many devices): this one is sized exactly.
        let psize = 4 * params.len() as u64;
        if set.params.as_ref().is_none_or(|b| b.size() != psize) {
            set.params = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: psize,
                usage: U::UNIFORM | U::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        self.queue.write_buffer(set.params.as_ref().unwrap(), 0, bytemuck::cast_slice(&params));
        Ok(())
    }

    /// DMA copies of the inputs the kernel does not read directly.
    fn encode_uploads(
        &self,
        enc: &mut wgpu::CommandEncoder,
        set: &BufSet,
        chunk: &Chunk<'_>,
        direct: Direct,
    ) {
        for (i, ((dev, st), u)) in set.inputs.iter().zip(&set.staging).zip(&chunk.inputs).enumerate() {
            if !direct.input(i) {
                enc.copy_buffer_to_buffer(&st.as_ref().unwrap().buf, 0, dev.as_ref().unwrap(), 0, u.size);
            }
        }
    }

    fn bind_group(
        &self,
        set: &BufSet,
        layout: &wgpu::BindGroupLayout,
        chunk: &Chunk<'_>,
        direct: Direct,
    ) -> wgpu::BindGroup {
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: set.params.as_ref().unwrap().as_entire_binding(),
        }];
        for i in 0..chunk.inputs.len() {
            let buf = if direct.input(i) {
                &set.staging[i].as_ref().unwrap().buf
            } else {
                set.inputs[i].as_ref().unwrap()
            };
            entries.push(wgpu::BindGroupEntry { binding: 1 + i as u32, resource: buf.as_entire_binding() });
        }
        let out = if direct.output { set.readback.as_ref() } else { set.out.as_ref() };
        entries.push(wgpu::BindGroupEntry {
            binding: 1 + chunk.inputs.len() as u32,
            resource: out.unwrap().as_entire_binding(),
        });
        self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout, entries: &entries })
    }

    /// Waits for chunk `p` and copies its output out of the set's readback buffer.
    fn finish(&self, set: &BufSet, p: Pending, out: &mut [u8]) -> Result<(), GpuError> {
        self.wait(Some(p.idx))?;
        let r = loop {
            match p.mapped.try_recv() {
                Ok(r) => break r,
                Err(mpsc::TryRecvError::Empty) => self.wait(None)?,
                Err(e) => return Err(GpuError::Wgpu(e.to_string())),
            }
        };
        r.map_err(|e| GpuError::Wgpu(e.to_string()))?;
        let rb = set.readback.as_ref().unwrap();
        let len = pad4(p.out_len as u64).max(4);
        {
            let view = rb.slice(..len).get_mapped_range();
            self.copier.run(
                vec![Job { dst: &mut out[p.out_at..p.out_at + p.out_len], src: Some(&view[..p.out_len]) }],
                None,
            );
        }
        rb.unmap();
        self.check()
    }
}

/// `0..n` cut into pieces of at most `step`.
pub(crate) fn pieces(n: usize, step: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(step.max(1)).map(move |a| a..(a + step).min(n))
}

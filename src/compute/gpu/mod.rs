//! The GPU backend: the compute kernels as wgpu compute shaders (`shaders/*.wgsl`).
//!
//! # Why this exists
//!
//! Dequantizing, applying a delta or merging an adapter is a pass over every byte of a tensor;
//! a GPU does it at memory speed. [`GpuContext`] holds what is made once per daemon (instance,
//! adapter, device, queue, one pipeline per kernel, a pool of reusable buffers) and offers the
//! CPU kernels' operations with the same inputs and outputs: little-endian byte slices in,
//! bytes out. wgpu types never leave this module.
//!
//! # Same bits as the CPU
//!
//! Dequantization, casts, the lossless delta inverse, FastChat's f16 add and BitDelta are
//! **bit-identical** to their CPU kernels on every device: WGSL lets a device flush f32
//! subnormals, gives division 2.5 ulp of error and leaves `pack2x16float`'s rounding open, so
//! the float operations these kernels need (one add, an integer divided by a float, the
//! roundings to f16/bf16, nearest even) are done on u32 bit patterns (`shaders/float_bits.wgsl`,
//! prepended to each kernel), as a soft-float library does. NaN results follow x86 SSE, the CPU
//! llmfs is checked against.
//!
//! The LoRA merge (`shaders/lora_merge.wgsl`) is a tiled f32 matrix product whose sums run in
//! another order than the CPU's (and the device may contract `w + acc * s` into an FMA or flush
//! subnormals), so it agrees with [`crate::compute::merge::lora_rows`] within f32 rounding of
//! the product. `tests/gpu.rs` holds it to this bound per element:
//! `|gpu - cpu| ≤ 2·(r + 2)·ε_f32·(|W| + |s|·Σ_j |B_oj·A_ji|)` before the rounding to the
//! dtype, so for f16/bf16 outputs the two differ by at most one ulp of the dtype (and only
//! next to a rounding tie), for f32 by that bound.
//!
//! # Streaming: chunks, double buffering, limits
//!
//! A call is cut into chunks whose every buffer fits `max_storage_buffer_binding_size` and
//! `max_buffer_size` (and [`GpuOptions::max_chunk_bytes`], 64 MiB by default); each chunk is one
//! dispatch on a 2-D grid, so it never exceeds `max_compute_workgroups_per_dimension` either.
//! Two buffer sets alternate: while the GPU runs chunk `i`, the CPU copies chunk `i - 1`'s
//! result out of its mapped readback buffer and chunk `i + 1`'s inputs into its mapped upload
//! buffer (reused, never reallocated: no page faults on fresh staging memory). What does *not*
//! overlap is the GPU side of the transfers: wgpu exposes one queue, so the DMA copies of a
//! chunk and the kernels run one after the other on the device. At PCIe speeds the copies
//! dominate end-to-end time anyway (see `scripts/bench_gpu_results.md`).

mod kernels;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors of the GPU backend. None of them is a panic: a daemon started with `--backend gpu`
/// reports them and exits; `auto` falls back to the CPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// wgpu found no adapter (no Vulkan/Metal/DX12 driver, or none that fits).
    #[error("no GPU adapter found: {0} (install a Vulkan driver, or use --backend cpu)")]
    NoAdapter(String),
    /// The adapter refused to open a device.
    #[error("cannot open the GPU device: {0}")]
    Device(String),
    /// A validation error, a lost device or a failed mapping while running a kernel.
    #[error("GPU operation failed: {0}")]
    Wgpu(String),
    /// An input this backend does not handle (the CPU kernel does).
    #[error("the GPU backend does not support {0}")]
    Unsupported(String),
    /// Buffers that do not match the shape (the CPU kernels panic on these).
    #[error("bad input to GPU kernel: {0}")]
    Input(String),
}

/// Knobs of [`GpuContext::with_options`].
#[derive(Clone, Copy, Debug)]
pub struct GpuOptions {
    /// Upper bound on any buffer of one chunk (also capped by the device's limits). Smaller
    /// chunks overlap sooner; the tests set it tiny to exercise multi-chunk paths.
    pub max_chunk_bytes: u64,
    /// Ask for a software adapter (lavapipe, WARP) even when a hardware one exists.
    pub force_fallback_adapter: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        // 64 MiB: big enough that per-dispatch overhead (tens of µs) is < 1 % at PCIe speed,
        // small enough that two sets of buffers stay well inside any device's memory.
        GpuOptions { max_chunk_bytes: 64 << 20, force_fallback_adapter: false }
    }
}

/// The kernels, one pipeline each, in the order of [`SHADERS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Dequantize = 0,
    Cast = 1,
    AddF16 = 2,
    Bitdelta = 3,
    DeltaApply = 4,
    Lora = 5,
}

/// Soft-float helpers prepended to every kernel (not a kernel itself).
const FLOAT_BITS: &str = include_str!("../../../shaders/float_bits.wgsl");

/// The shader sources, built into pipelines once by [`GpuContext::new`].
const SHADERS: [(&str, &str); 6] = [
    ("dequantize_groupwise", include_str!("../../../shaders/dequantize_groupwise.wgsl")),
    ("cast_float", include_str!("../../../shaders/cast_float.wgsl")),
    ("add_f16", include_str!("../../../shaders/add_f16.wgsl")),
    ("bitdelta_apply", include_str!("../../../shaders/bitdelta_apply.wgsl")),
    ("delta_apply_lossless", include_str!("../../../shaders/delta_apply_lossless.wgsl")),
    ("lora_merge", include_str!("../../../shaders/lora_merge.wgsl")),
];

/// Workgroup width of the 1-D kernels (their `@workgroup_size(256)`).
const WG: u64 = 256;

/// The device and everything built once. Kernel methods take `&self`; one call runs on the
/// GPU at a time (the buffer pool is behind a mutex).
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    pipelines: Vec<wgpu::ComputePipeline>,
    pool: Mutex<[BufSet; 2]>,
    chunk_bytes: u64,
    error: Arc<Mutex<Option<String>>>,
    /// Benchmark hook: when non-zero, each chunk's dispatch is repeated this many times with
    /// the inputs resident and the time is added to `kernel_nanos` (see [`Self::measure_kernels`]).
    kernel_iters: AtomicU32,
    kernel_nanos: AtomicU64,
}

/// One set of reusable buffers (two sets alternate: double buffering).
#[derive(Default)]
struct BufSet {
    params: Option<wgpu::Buffer>,
    /// Upload staging (MAP_WRITE | COPY_SRC), all inputs of a chunk back to back.
    upload: Option<wgpu::Buffer>,
    upload_mapped: Option<Arc<AtomicBool>>,
    inputs: Vec<Option<wgpu::Buffer>>,
    out: Option<wgpu::Buffer>,
    readback: Option<wgpu::Buffer>,
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
    /// Zero the output buffer first (kernels that OR partial words in).
    pub clear_out: bool,
}

pub(crate) enum Groups {
    Linear(u64),
    Grid(u32, u32),
}

fn pad4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

/// Buffer sizes grow in steps of 1 MiB so a run of similar calls reuses one allocation.
fn grow(n: u64) -> u64 {
    n.max(16).div_ceil(1 << 20) * (1 << 20)
}

impl GpuContext {
    /// Opens the default high-performance adapter. Fails with [`GpuError::NoAdapter`] (never
    /// a panic) when there is none.
    pub fn new() -> Result<Self, GpuError> {
        Self::with_options(GpuOptions::default())
    }

    pub fn with_options(opts: GpuOptions) -> Result<Self, GpuError> {
        let instance = wgpu::Instance::new(&wgpu::InstanceDescriptor {
            backends: wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY),
            ..Default::default()
        });
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: opts.force_fallback_adapter,
            compatible_surface: None,
        }))
        .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        // Everything the adapter offers: large storage bindings mean fewer, larger chunks.
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("llmfs"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::Device(e.to_string()))?;
        let error = Arc::new(Mutex::new(None::<String>));
        {
            let error = error.clone();
            device.on_uncaptured_error(Box::new(move |e| {
                let mut slot = error.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert_with(|| e.to_string());
            }));
        }
        let pipelines = SHADERS
            .iter()
            .map(|(name, src)| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl(format!("{FLOAT_BITS}\n{src}").into()),
                });
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(name),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                })
            })
            .collect();
        let chunk_bytes = opts
            .max_chunk_bytes
            .min(limits.max_storage_buffer_binding_size as u64)
            .min(limits.max_buffer_size)
            .min(1 << 30) // keeps element indices in the kernels' u32/i32 range
            / 256
            * 256;
        let ctx = GpuContext {
            device,
            queue,
            info,
            limits,
            pipelines,
            pool: Mutex::new(Default::default()),
            chunk_bytes: chunk_bytes.max(256),
            error,
            kernel_iters: AtomicU32::new(0),
            kernel_nanos: AtomicU64::new(0),
        };
        ctx.check()?; // shader compilation errors surface here
        Ok(ctx)
    }

    /// "NVIDIA H100 80GB HBM3 (Vulkan)", "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)", ...
    pub fn device_name(&self) -> String {
        format!("{} ({:?}, driver {} {})", self.info.name, self.info.backend, self.info.driver, self.info.driver_info)
    }

    /// Whether the adapter is a software rasterizer (lavapipe, WARP): `auto` should not pick it.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The largest buffer one chunk uses.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    pub(crate) fn max_groups_per_dim(&self) -> u32 {
        self.limits.max_compute_workgroups_per_dimension
    }

    fn check(&self) -> Result<(), GpuError> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(GpuError::Wgpu(e)),
            None => Ok(()),
        }
    }

    fn wait(&self, idx: Option<wgpu::SubmissionIndex>) -> Result<(), GpuError> {
        // A submission that failed validation has no index to wait for (wgpu panics on it).
        self.check()?;
        let poll = match idx {
            Some(i) => wgpu::PollType::WaitForSubmissionIndex(i),
            None => wgpu::PollType::Wait,
        };
        self.device.poll(poll).map(|_| ()).map_err(|e| GpuError::Wgpu(e.to_string()))
    }

    /// Benchmark hook: runs `f` with every chunk's dispatch repeated `iters` times on resident
    /// inputs (after one normal run of that chunk) and returns the mean GPU time of one pass
    /// over all chunks: the kernel alone, no upload or readback.
    pub fn measure_kernels<R>(&self, iters: u32, f: impl FnOnce(&Self) -> R) -> (R, Duration) {
        self.kernel_nanos.store(0, Ordering::Relaxed);
        self.kernel_iters.store(iters.max(1), Ordering::Relaxed);
        let r = f(self);
        self.kernel_iters.store(0, Ordering::Relaxed);
        let ns = self.kernel_nanos.load(Ordering::Relaxed) / iters.max(1) as u64;
        (r, Duration::from_nanos(ns))
    }

    /// Transfer bounds: (upload GB/s, readback GB/s, device-to-device copy GB/s counted as
    /// bytes copied, i.e. half the read + write traffic) for buffers of `bytes`.
    pub fn measure_transfers(&self, bytes: u64, iters: u32) -> Result<(f64, f64, f64), GpuError> {
        let bytes = pad4(bytes);
        let mk = |usage, mapped| {
            self.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: bytes, usage, mapped_at_creation: mapped })
        };
        use wgpu::BufferUsages as U;
        let up = mk(U::MAP_WRITE | U::COPY_SRC, false);
        let a = mk(U::STORAGE | U::COPY_DST | U::COPY_SRC, false);
        let b = mk(U::STORAGE | U::COPY_DST | U::COPY_SRC, false);
        let down = mk(U::MAP_READ | U::COPY_DST, false);
        let host = vec![7u8; bytes as usize];
        let mut sink = vec![0u8; bytes as usize];
        let map = |buf: &wgpu::Buffer, mode| -> Result<(), GpuError> {
            let (tx, rx) = std::sync::mpsc::channel();
            buf.slice(..).map_async(mode, move |r| {
                let _ = tx.send(r);
            });
            self.wait(None)?;
            rx.recv().map_err(|e| GpuError::Wgpu(e.to_string()))?.map_err(|e| GpuError::Wgpu(e.to_string()))
        };
        let (mut t_up, mut t_down, mut t_copy) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for it in 0..=iters {
            // Upload: host memory -> mapped staging -> device buffer.
            map(&up, wgpu::MapMode::Write)?;
            let t0 = Instant::now();
            up.slice(..).get_mapped_range_mut().copy_from_slice(&host);
            up.unmap();
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&up, 0, &a, 0, bytes);
            self.queue.submit([enc.finish()]);
            self.wait(None)?;
            let t1 = Instant::now();
            // Device copy (HBM): a -> b, 8 times in one submission.
            let mut enc = self.device.create_command_encoder(&Default::default());
            for _ in 0..8 {
                enc.copy_buffer_to_buffer(&a, 0, &b, 0, bytes);
            }
            self.queue.submit([enc.finish()]);
            self.wait(None)?;
            let t2 = Instant::now();
            // Readback: device buffer -> mapped staging -> host memory.
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&b, 0, &down, 0, bytes);
            self.queue.submit([enc.finish()]);
            map(&down, wgpu::MapMode::Read)?;
            sink.copy_from_slice(&down.slice(..).get_mapped_range());
            down.unmap();
            let t3 = Instant::now();
            if it > 0 {
                t_up += t1 - t0;
                t_copy += (t2 - t1) / 8;
                t_down += t3 - t2;
            }
        }
        self.check()?;
        let gbs = |t: Duration| bytes as f64 * iters as f64 / t.as_secs_f64() / 1e9;
        Ok((gbs(t_up), gbs(t_down), gbs(t_copy)))
    }

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
        pool: &mut [BufSet; 2],
        kernel: Kernel,
        chunks: Vec<Chunk<'_>>,
        out: &mut [u8],
        iters: u32,
    ) -> Result<(), GpuError> {
        let pipeline = &self.pipelines[kernel as usize];
        let layout = pipeline.get_bind_group_layout(0);
        // (submission, set, out_at, out_len) of the chunk in flight on the other set.
        let mut pending: Option<(wgpu::SubmissionIndex, usize, usize, usize)> = None;
        for (ci, chunk) in chunks.into_iter().enumerate() {
            let s = ci % 2;
            let set = &mut pool[s];
            self.fill_inputs(set, &chunk)?;
            let bind = self.bind_group(set, &layout, &chunk);
            let set = &pool[s];
            let dispatch = |enc: &mut wgpu::CommandEncoder| {
                if chunk.clear_out {
                    enc.clear_buffer(set.out.as_ref().unwrap(), 0, None);
                }
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind, &[]);
                let (x, y) = self.grid(&chunk.groups);
                pass.dispatch_workgroups(x, y, 1);
            };
            let mut enc = self.device.create_command_encoder(&Default::default());
            self.encode_uploads(&mut enc, set, &chunk);
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
            let rb = pad4(chunk.out_len as u64).max(4);
            enc.copy_buffer_to_buffer(set.out.as_ref().unwrap(), 0, set.readback.as_ref().unwrap(), 0, rb);
            let idx = self.queue.submit([enc.finish()]);
            // While this chunk runs: finish the previous one, and re-map its upload buffer.
            if let Some((pidx, ps, at, len)) = pending.take() {
                self.finish(&mut pool[ps], pidx, &mut out[at..at + len])?;
            }
            pending = Some((idx, s, chunk.out_at, chunk.out_len));
        }
        if let Some((pidx, ps, at, len)) = pending.take() {
            self.finish(&mut pool[ps], pidx, &mut out[at..at + len])?;
        }
        self.check()
    }

    fn grid(&self, g: &Groups) -> (u32, u32) {
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

    fn buffer(&self, slot: &mut Option<wgpu::Buffer>, size: u64, usage: wgpu::BufferUsages, mapped: bool) -> bool {
        if slot.as_ref().is_some_and(|b| b.size() >= size) {
            return false;
        }
        *slot = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: grow(size).min(self.limits.max_buffer_size.max(size)),
            usage,
            mapped_at_creation: mapped,
        }));
        true
    }

    /// Copies the chunk's inputs into the set's mapped upload buffer (growing buffers as
    /// needed) and its parameters into the uniform buffer.
    fn fill_inputs(&self, set: &mut BufSet, chunk: &Chunk<'_>) -> Result<(), GpuError> {
        use wgpu::BufferUsages as U;
        let total: u64 = chunk.inputs.iter().map(|u| u.size.div_ceil(256) * 256).sum();
        if self.buffer(&mut set.upload, total, U::MAP_WRITE | U::COPY_SRC, true) {
            set.upload_mapped = Some(Arc::new(AtomicBool::new(true)));
        }
        // Wait for the map requested when this set's last chunk finished.
        let flag = set.upload_mapped.clone().expect("upload buffer exists");
        // A non-blocking poll normally completes it (that chunk is done); waiting for the whole
        // queue would wait for the chunk in flight too and undo the overlap.
        let mut tries = 0;
        while !flag.load(Ordering::Acquire) {
            if tries < 100 {
                self.device.poll(wgpu::PollType::Poll).map_err(|e| GpuError::Wgpu(e.to_string()))?;
            } else {
                self.wait(None)?;
            }
            tries += 1;
            self.check()?;
        }
        let upload = set.upload.as_ref().unwrap();
        {
            let mut view = upload.slice(..total.max(4)).get_mapped_range_mut();
            let mut at = 0usize;
            for u in &chunk.inputs {
                let dst = &mut view[at..at + u.size as usize];
                let mut filled = 0usize;
                for &(off, bytes) in &u.pieces {
                    let off = off as usize;
                    dst[filled..off].fill(0);
                    dst[off..off + bytes.len()].copy_from_slice(bytes);
                    filled = off + bytes.len();
                }
                dst[filled..].fill(0);
                at += (u.size.div_ceil(256) * 256) as usize;
            }
        }
        upload.unmap();
        flag.store(false, Ordering::Release);
        if set.inputs.len() < chunk.inputs.len() {
            set.inputs.resize_with(chunk.inputs.len(), || None);
        }
        for (slot, u) in set.inputs.iter_mut().zip(&chunk.inputs) {
            self.buffer(slot, u.size, U::STORAGE | U::COPY_DST, false);
        }
        self.buffer(&mut set.out, chunk.out_bytes.max(4), U::STORAGE | U::COPY_SRC | U::COPY_DST, false);
        self.buffer(&mut set.readback, pad4(chunk.out_len as u64).max(4), U::MAP_READ | U::COPY_DST, false);
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

    fn encode_uploads(&self, enc: &mut wgpu::CommandEncoder, set: &BufSet, chunk: &Chunk<'_>) {
        let upload = set.upload.as_ref().unwrap();
        let mut at = 0u64;
        for (slot, u) in set.inputs.iter().zip(&chunk.inputs) {
            enc.copy_buffer_to_buffer(upload, at, slot.as_ref().unwrap(), 0, u.size);
            at += u.size.div_ceil(256) * 256;
        }
    }

    fn bind_group(&self, set: &BufSet, layout: &wgpu::BindGroupLayout, chunk: &Chunk<'_>) -> wgpu::BindGroup {
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: set.params.as_ref().unwrap().as_entire_binding(),
        }];
        for (i, slot) in set.inputs.iter().take(chunk.inputs.len()).enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: 1 + i as u32, resource: slot.as_ref().unwrap().as_entire_binding() });
        }
        entries.push(wgpu::BindGroupEntry {
            binding: 1 + chunk.inputs.len() as u32,
            resource: set.out.as_ref().unwrap().as_entire_binding(),
        });
        self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout, entries: &entries })
    }

    /// Waits for submission `idx`, copies its readback into `out`, and asks for the set's
    /// upload buffer to be mapped again (it is free now), to be ready for the set's next chunk.
    fn finish(&self, set: &mut BufSet, idx: wgpu::SubmissionIndex, out: &mut [u8]) -> Result<(), GpuError> {
        let rb = set.readback.as_ref().unwrap();
        let len = pad4(out.len() as u64).max(4);
        let (tx, rx) = std::sync::mpsc::channel();
        rb.slice(..len).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait(Some(idx))?;
        let r = loop {
            match rx.try_recv() {
                Ok(r) => break r,
                Err(std::sync::mpsc::TryRecvError::Empty) => self.wait(None)?,
                Err(e) => return Err(GpuError::Wgpu(e.to_string())),
            }
        };
        r.map_err(|e| GpuError::Wgpu(e.to_string()))?;
        {
            let view = rb.slice(..len).get_mapped_range();
            out.copy_from_slice(&view[..out.len()]);
        }
        rb.unmap();
        if let (Some(up), Some(flag)) = (set.upload.as_ref(), set.upload_mapped.clone()) {
            up.slice(..).map_async(wgpu::MapMode::Write, move |r| flag.store(r.is_ok(), Ordering::Release));
        }
        self.check()
    }

    /// Elements per chunk when each element needs at most `bytes_per_elem` bytes in any one
    /// buffer, rounded down to a multiple of `multiple`.
    pub(crate) fn chunk_elems(&self, bytes_per_elem: usize, multiple: usize) -> usize {
        let n = (self.chunk_bytes as usize / bytes_per_elem.max(1)).max(multiple);
        // Also keep within a 2-D grid of one-word-per-invocation dispatches.
        let grid = self.max_groups_per_dim() as usize * self.max_groups_per_dim() as usize * WG as usize;
        n.min(grid) / multiple * multiple
    }
}

/// `0..n` cut into pieces of at most `step`.
pub(crate) fn pieces(n: usize, step: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(step.max(1)).map(move |a| a..(a + step).min(n))
}

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
//! # Streaming: chunks, buffering in flight, limits
//!
//! A call is cut into chunks whose every buffer fits `max_storage_buffer_binding_size` and
//! `max_buffer_size` (and [`GpuOptions::max_chunk_bytes`], 16 MiB by default); each chunk is one
//! dispatch on a 2-D grid, so it never exceeds `max_compute_workgroups_per_dimension` either.
//! [`SETS`] sets of buffers rotate, made once and kept (pooled): while the GPU runs chunks `i`
//! and `i - 1`, the CPU copies chunk `i - 2`'s result out of its mapped readback buffer and
//! chunk `i + 1`'s inputs into its mapped upload buffers. Host staging buffers stay mapped
//! between uses (wgpu re-maps them; under 32 MiB wgpu's Vulkan allocator keeps their memory
//! mapped for good, so no page is faulted in twice), and both host copies are split across a
//! few threads ([`copy::Copier`]): one thread's memcpy out of host-visible memory is slower than
//! the PCIe link.
//!
//! wgpu exposes one queue, so on the device a chunk's DMA copies and its kernel run one after
//! the other. [`GpuOptions::direct_inputs`] / [`GpuOptions::direct_output`] avoid the copies:
//! the kernel reads its inputs from, or writes its output to, the host-visible buffer itself
//! (over PCIe, with the upload and readback directions overlapping each other and the
//! arithmetic). Which is faster depends on the link and the kernel: the benchmark
//! (`examples/bench_gpu.rs`) measures both and the default is what won on the H100.

mod copy;
mod kernels;

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use copy::{Copier, Job};

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
    /// Kernels read their inputs straight from the host-visible upload buffers (no DMA copy
    /// to device memory first). Needs wgpu's `MAPPABLE_PRIMARY_BUFFERS`; ignored without it.
    pub direct_inputs: bool,
    /// Kernels write their output straight into the host-visible readback buffer (no DMA
    /// copy back). Same condition. The LoRA merge's factors always go to device memory (see
    /// `Kernel::direct_input_ok`), as do chunks marked `staged`.
    pub direct_output: bool,
    /// Threads that copy into and out of staging memory, the caller included (0: as many as
    /// the machine has cores, at most 16).
    pub copy_threads: usize,
}

impl Default for GpuOptions {
    fn default() -> Self {
        // 16 MiB: per-chunk overhead (submit, map, wake-ups: tens of µs) stays a few % at PCIe
        // speed, several chunks of a tensor are in flight at once, and every staging buffer
        // stays under the 32 MiB above which wgpu's Vulkan allocator gives a buffer its own
        // memory, mapped anew (and faulted in page by page) at every map.
        // Direct transfers: on the H100 int8 dequantization end to end went from 12-17 GB/s
        // staged to 20-23 GB/s (scripts/bench_gpu_results.md).
        GpuOptions {
            max_chunk_bytes: 16 << 20,
            force_fallback_adapter: false,
            direct_inputs: true,
            direct_output: true,
            copy_threads: 0,
        }
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
    /// Benchmark only: `copy_words.wgsl`, for the transfer bounds.
    Copy = 6,
}

impl Kernel {
    /// Whether the kernel may read input `i` straight from host-visible memory: every input
    /// but the LoRA merge's factors (0 and 1), which each 64 × 64 tile reads again, so over
    /// PCIe they would move as many bytes as W; they are small and go to device memory.
    fn direct_input_ok(self, i: usize) -> bool {
        self != Kernel::Lora || i >= 2
    }
}

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

/// Soft-float helpers prepended to every kernel (not a kernel itself).
const FLOAT_BITS: &str = include_str!("../../../shaders/float_bits.wgsl");

/// The shader sources, built into pipelines once by [`GpuContext::new`].
const SHADERS: [(&str, &str); 7] = [
    ("dequantize_groupwise", include_str!("../../../shaders/dequantize_groupwise.wgsl")),
    ("cast_float", include_str!("../../../shaders/cast_float.wgsl")),
    ("add_f16", include_str!("../../../shaders/add_f16.wgsl")),
    ("bitdelta_apply", include_str!("../../../shaders/bitdelta_apply.wgsl")),
    ("delta_apply_lossless", include_str!("../../../shaders/delta_apply_lossless.wgsl")),
    ("lora_merge", include_str!("../../../shaders/lora_merge.wgsl")),
    ("copy_words", include_str!("../../../shaders/copy_words.wgsl")),
];

/// Buffer sets in rotation: chunk `i + 1` is filled while `i` and `i - 1` run on the GPU
/// and `i - 2` is copied out (the copies on the device and the kernels run in queue order).
const SETS: usize = 3;

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
    pool: Mutex<[BufSet; SETS]>,
    chunk_bytes: u64,
    direct_inputs: bool,
    direct_output: bool,
    /// Whether buffers may be both mappable and bound to shaders (`MAPPABLE_PRIMARY_BUFFERS`).
    mappable_storage: bool,
    copier: Copier,
    error: Arc<Mutex<Option<String>>>,
    /// Benchmark hook: when non-zero, each chunk's dispatch is repeated this many times with
    /// the inputs resident and the time is added to `kernel_nanos` (see [`Self::measure_kernels`]).
    kernel_iters: AtomicU32,
    kernel_nanos: AtomicU64,
}

/// One set of reusable buffers ([`SETS`] of them rotate).
#[derive(Default)]
struct BufSet {
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

/// What the transfers measured by [`GpuContext::measure_transfers`] reach, in GB/s of bytes
/// moved (for `*_both`, the two directions' bytes together). None: not measurable here.
#[derive(Clone, Debug, Default)]
pub struct TransferBounds {
    pub bytes: u64,
    /// DMA (copy_buffer_to_buffer) host-visible buffer -> device memory, no host memcpy.
    pub dma_up: f64,
    /// DMA device memory -> host-visible buffer.
    pub dma_down: f64,
    /// Both DMA copies in one submission (other buffers): what one queue gives at once.
    pub dma_both: f64,
    /// A shader reading host-visible memory (writing device memory).
    pub shader_read_host: Option<f64>,
    /// A shader writing host-visible memory (reading device memory).
    pub shader_write_host: Option<f64>,
    /// A shader reading one host-visible buffer and writing another: both directions at once.
    pub shader_both: Option<f64>,
    /// Device memory to device memory, by DMA copy (bytes copied; HBM traffic is twice this).
    pub device_copy: f64,
    /// Host memcpy into mapped upload memory: one thread, all copy threads.
    pub host_in_1: f64,
    pub host_in_n: f64,
    /// Host memcpy out of mapped readback memory: one thread, all copy threads.
    pub host_out_1: f64,
    pub host_out_n: f64,
    pub copy_threads: usize,
    /// `queue.write_buffer` (wgpu's own staging, one thread's memcpy) + submit + wait.
    pub write_buffer: f64,
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
        let mappable_storage = adapter.features().contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("llmfs"),
            required_features: if mappable_storage {
                wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
            } else {
                wgpu::Features::empty()
            },
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
        let copy_threads = match opts.copy_threads {
            // On the lent H100 host, 16 threads copied 67-73 GB/s, 8 threads 59-61 GB/s.
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()).min(16),
            n => n,
        };
        let ctx = GpuContext {
            device,
            queue,
            info,
            limits,
            pipelines,
            pool: Mutex::new(Default::default()),
            chunk_bytes: chunk_bytes.max(256),
            direct_inputs: opts.direct_inputs && mappable_storage,
            direct_output: opts.direct_output && mappable_storage,
            mappable_storage,
            copier: Copier::new(copy_threads - 1),
            error,
            kernel_iters: AtomicU32::new(0),
            kernel_nanos: AtomicU64::new(0),
        };
        ctx.check()?; // shader compilation errors surface here
        Ok(ctx)
    }

    /// "NVIDIA H100 80GB HBM3 (Vulkan)", "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)", ...
    pub fn device_name(&self) -> String {
        format!(
            "{} ({:?}, driver {} {})",
            self.info.name, self.info.backend, self.info.driver, self.info.driver_info
        )
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

    /// Whether kernels read inputs from / write outputs to host-visible memory directly.
    pub fn direct(&self) -> (bool, bool) {
        (self.direct_inputs, self.direct_output)
    }

    fn map_blocking(&self, buf: &wgpu::Buffer, mode: wgpu::MapMode) -> Result<(), GpuError> {
        let (tx, rx) = mpsc::channel();
        buf.slice(..).map_async(mode, move |r| {
            let _ = tx.send(r);
        });
        self.wait(None)?;
        rx.recv().map_err(|e| GpuError::Wgpu(e.to_string()))?.map_err(|e| GpuError::Wgpu(e.to_string()))
    }

    /// Submits what `record` encodes and waits for it, `iters` times after one warm-up;
    /// returns the mean time of one.
    fn time_gpu(&self, iters: u32, record: impl Fn(&mut wgpu::CommandEncoder)) -> Result<Duration, GpuError> {
        let mut total = Duration::ZERO;
        for it in 0..=iters {
            let mut enc = self.device.create_command_encoder(&Default::default());
            record(&mut enc);
            let t = Instant::now();
            let idx = self.queue.submit([enc.finish()]);
            self.wait(Some(idx))?;
            if it > 0 {
                total += t.elapsed();
            }
        }
        Ok(total / iters.max(1))
    }

    /// Transfer bounds for buffers of `bytes` (each measured alone, best kept apart from the
    /// kernels): see [`TransferBounds`].
    pub fn measure_transfers(&self, bytes: u64, iters: u32) -> Result<TransferBounds, GpuError> {
        use wgpu::BufferUsages as U;
        let bytes = bytes.div_ceil(256) * 256;
        let mk = |usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        let host_storage = if self.mappable_storage { U::STORAGE } else { U::empty() };
        let up = mk(U::MAP_WRITE | U::COPY_SRC | host_storage);
        let down = mk(U::MAP_READ | U::COPY_DST | host_storage);
        let up2 = mk(U::MAP_WRITE | U::COPY_SRC);
        let down2 = mk(U::MAP_READ | U::COPY_DST);
        let a = mk(U::STORAGE | U::COPY_DST | U::COPY_SRC);
        let b = mk(U::STORAGE | U::COPY_DST | U::COPY_SRC);
        let gbs = |n: u64, t: Duration| n as f64 / t.as_secs_f64() / 1e9;
        let mut tb = TransferBounds { bytes, copy_threads: self.copier.width(), ..Default::default() };

        // Host copies into and out of mapped memory (mapped once: the pages are warm).
        let host = vec![7u8; bytes as usize];
        let mut sink = vec![0u8; bytes as usize];
        sink.fill(1);
        self.map_blocking(&up, wgpu::MapMode::Write)?;
        self.map_blocking(&down, wgpu::MapMode::Read)?;
        {
            let mut w = up.slice(..).get_mapped_range_mut();
            let r = down.slice(..).get_mapped_range();
            let time = |f: &mut dyn FnMut()| {
                f();
                let t = Instant::now();
                for _ in 0..iters.max(1) {
                    f();
                }
                gbs(bytes * iters.max(1) as u64, t.elapsed())
            };
            tb.host_in_1 =
                time(&mut || self.copier.run(vec![Job { dst: &mut w, src: Some(&host) }], Some(1)));
            tb.host_in_n = time(&mut || self.copier.run(vec![Job { dst: &mut w, src: Some(&host) }], None));
            tb.host_out_1 =
                time(&mut || self.copier.run(vec![Job { dst: &mut sink, src: Some(&r) }], Some(1)));
            tb.host_out_n = time(&mut || self.copier.run(vec![Job { dst: &mut sink, src: Some(&r) }], None));
        }
        up.unmap();
        down.unmap();

        // DMA: each direction alone, then both in one submission.
        tb.dma_up = gbs(bytes, self.time_gpu(iters, |e| e.copy_buffer_to_buffer(&up, 0, &a, 0, bytes))?);
        tb.dma_down = gbs(bytes, self.time_gpu(iters, |e| e.copy_buffer_to_buffer(&b, 0, &down, 0, bytes))?);
        tb.dma_both = gbs(
            2 * bytes,
            self.time_gpu(iters, |e| {
                e.copy_buffer_to_buffer(&up2, 0, &a, 0, bytes);
                e.copy_buffer_to_buffer(&b, 0, &down2, 0, bytes);
            })?,
        );
        tb.device_copy = gbs(bytes, self.time_gpu(iters, |e| e.copy_buffer_to_buffer(&a, 0, &b, 0, bytes))?);

        // A shader moving the bytes (16 a invocation), reading or writing host memory itself.
        if self.mappable_storage {
            let params = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: U::UNIFORM | U::COPY_DST,
                mapped_at_creation: false,
            });
            let words = bytes / 16;
            self.queue.write_buffer(&params, 0, bytemuck::cast_slice(&[words as u32, 0, 0, 0]));
            let pipeline = &self.pipelines[Kernel::Copy as usize];
            let layout = pipeline.get_bind_group_layout(0);
            let (x, y) = self.grid(&Groups::Linear(words.div_ceil(WG)));
            let shader = |src: &wgpu::Buffer, dst: &wgpu::Buffer| -> Result<Duration, GpuError> {
                let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 1, resource: src.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 2, resource: dst.as_entire_binding() },
                    ],
                });
                self.time_gpu(iters, |e| {
                    let mut pass = e.begin_compute_pass(&Default::default());
                    pass.set_pipeline(pipeline);
                    pass.set_bind_group(0, &bind, &[]);
                    pass.dispatch_workgroups(x, y, 1);
                })
            };
            tb.shader_read_host = Some(gbs(bytes, shader(&up, &a)?));
            tb.shader_write_host = Some(gbs(bytes, shader(&a, &down)?));
            tb.shader_both = Some(gbs(2 * bytes, shader(&up, &down)?));
        }

        // queue.write_buffer in pieces of a chunk, as a kernel call would upload.
        let piece = self.chunk_bytes.min(bytes) as usize;
        let t = Instant::now();
        for _ in 0..iters.max(1) {
            for (k, p) in host.chunks(piece).enumerate() {
                self.queue.write_buffer(&a, (k * piece) as u64, p);
            }
            let idx = self.queue.submit([]);
            self.wait(Some(idx))?;
        }
        tb.write_buffer = gbs(bytes * iters.max(1) as u64, t.elapsed());
        self.check()?;
        Ok(tb)
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

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
//! Dequantization, casts, the lossless delta inverse, FastChat's f16 add, BitDelta and
//! mergekit's linear / task arithmetic apply are **bit-identical** to their CPU kernels on every
//! device: WGSL lets a device flush f32 subnormals, gives division 2.5 ulp of error, may
//! contract `a * b + c` (or compute `fma` unfused) and leaves `pack2x16float`'s rounding open,
//! so the float operations these kernels need (add, multiply, fused multiply-add, divide,
//! comparisons, the roundings to f16/bf16, nearest even) are done on u32 bit patterns
//! (`shaders/float_bits.wgsl`, prepended to each kernel), as a soft-float library does. NaN
//! results follow x86 SSE, the CPU llmfs is checked against (a NaN's payload may differ where
//! the compiler picks the operand order).
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
//!
//! # Files
//!
//! * this file: the public types ([`GpuContext`], [`GpuOptions`], [`GpuError`]);
//! * `device.rs`: opening the adapter and device, the shader table and its pipelines, the
//!   device's limits and the chunk sizes they allow;
//! * `stream.rs`: running a kernel over chunks with rotating buffer sets (the overlap above);
//! * `kernels.rs`: each kernel family's method: checks, chunking, parameters;
//! * `mergekit.rs`: mergekit's linear / task arithmetic apply (its parameters from a
//!   `TensorMerge` and its statistics);
//! * `copy.rs`: the multi-threaded host copies;
//! * `bench.rs`: the benchmark hooks (kernel timing, transfer bounds).

mod bench;
mod copy;
mod device;
mod kernels;
pub mod mergekit;
mod stream;

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};

pub use bench::TransferBounds;
use copy::Copier;
use device::{Kernel, WG};
use stream::{pad4, pieces, BufSet, Chunk, Groups, Upload, SETS};

/// Errors of the GPU backend. None of them is a panic: a daemon started with `--backend gpu`
/// reports them and exits; `auto` falls back to the CPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// wgpu found no adapter (no Vulkan/Metal/DX12 driver, or none that fits).
    #[error("no GPU adapter found: {0} (install a Vulkan driver, or use --backend cpu)")]
    NoAdapter(String),
    /// The adapter is a software renderer and [`GpuOptions::hardware_only`] refused it.
    #[error("the adapter is a software renderer: {0}")]
    Software(String),
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
    /// Refuse a software adapter before opening it: `--backend auto` would not use one, and
    /// opening it compiles every kernel with its JIT (lavapipe: 0.25 CPU-s, beside a mount's
    /// first loads).
    pub hardware_only: bool,
    /// Kernels read their inputs straight from the host-visible upload buffers (no DMA copy
    /// to device memory first). Needs wgpu's `MAPPABLE_PRIMARY_BUFFERS`; ignored without it.
    pub direct_inputs: bool,
    /// Kernels write their output straight into the host-visible readback buffer (no DMA
    /// copy back). Same condition. The LoRA merge's factors and mergekit's tie lists always go
    /// to device memory (see `Kernel::direct_input_ok`), as do chunks marked `staged`.
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
            hardware_only: false,
            direct_inputs: true,
            direct_output: true,
            copy_threads: 0,
        }
    }
}

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

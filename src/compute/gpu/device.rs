//! Opening the GPU: the adapter and device wgpu offers, every kernel's pipeline compiled once
//! from the shader table (each kernel with the soft-float helpers of `float_bits.wgsl` in
//! front), the device's error slot, and the limits that size each call's chunks. Kept apart
//! from the streaming engine (`stream.rs`), which only uses what is built here.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{mpsc, Arc, Mutex};

use super::copy::Copier;
use super::{GpuContext, GpuError, GpuOptions};

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
    /// mergekit's linear and task arithmetic apply (`mergekit_apply.wgsl`).
    MergekitApply = 7,
}

impl Kernel {
    /// Whether the kernel may read input `i` straight from host-visible memory: every input
    /// but the LoRA merge's factors (0 and 1), which each 64 × 64 tile reads again, so over
    /// PCIe they would move as many bytes as W, and the merge's tie lists (1), searched by
    /// every element at a cut-off magnitude (one PCIe round trip per step): both small, they
    /// go to device memory.
    pub(super) fn direct_input_ok(self, i: usize) -> bool {
        match self {
            Kernel::Lora => i >= 2,
            Kernel::MergekitApply => i != 1,
            _ => true,
        }
    }
}

/// Soft-float helpers prepended to every kernel (not a kernel itself).
const FLOAT_BITS: &str = include_str!("../../../shaders/float_bits.wgsl");

/// The shader sources, built into pipelines once by [`GpuContext::new`].
const SHADERS: [(&str, &str); 8] = [
    ("dequantize_groupwise", include_str!("../../../shaders/dequantize_groupwise.wgsl")),
    ("cast_float", include_str!("../../../shaders/cast_float.wgsl")),
    ("add_f16", include_str!("../../../shaders/add_f16.wgsl")),
    ("bitdelta_apply", include_str!("../../../shaders/bitdelta_apply.wgsl")),
    ("delta_apply_lossless", include_str!("../../../shaders/delta_apply_lossless.wgsl")),
    ("lora_merge", include_str!("../../../shaders/lora_merge.wgsl")),
    ("copy_words", include_str!("../../../shaders/copy_words.wgsl")),
    ("mergekit_apply", include_str!("../../../shaders/mergekit_apply.wgsl")),
];

/// Workgroup width of the 1-D kernels (their `@workgroup_size(256)`).
pub(super) const WG: u64 = 256;

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
        if opts.hardware_only && info.device_type == wgpu::DeviceType::Cpu {
            return Err(GpuError::Software(info.name));
        }
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

    pub(super) fn check(&self) -> Result<(), GpuError> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(GpuError::Wgpu(e)),
            None => Ok(()),
        }
    }

    pub(super) fn wait(&self, idx: Option<wgpu::SubmissionIndex>) -> Result<(), GpuError> {
        // A submission that failed validation has no index to wait for (wgpu panics on it).
        self.check()?;
        let poll = match idx {
            Some(i) => wgpu::PollType::WaitForSubmissionIndex(i),
            None => wgpu::PollType::Wait,
        };
        self.device.poll(poll).map(|_| ()).map_err(|e| GpuError::Wgpu(e.to_string()))
    }

    pub(super) fn map_blocking(&self, buf: &wgpu::Buffer, mode: wgpu::MapMode) -> Result<(), GpuError> {
        let (tx, rx) = mpsc::channel();
        buf.slice(..).map_async(mode, move |r| {
            let _ = tx.send(r);
        });
        self.wait(None)?;
        rx.recv().map_err(|e| GpuError::Wgpu(e.to_string()))?.map_err(|e| GpuError::Wgpu(e.to_string()))
    }

    /// Whether kernels read inputs from / write outputs to host-visible memory directly.
    pub fn direct(&self) -> (bool, bool) {
        (self.direct_inputs, self.direct_output)
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

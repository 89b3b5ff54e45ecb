//! Which device runs each kernel: chosen once per process (`llmfs mount --backend`), then every
//! call site goes through the functions here.
//!
//! - `cpu` never touches wgpu.
//! - `gpu` needs a build with `--features gpu` and an adapter; otherwise it is refused with one line.
//! - `auto` (the default) measures each kernel once on both devices, on a few MiB of synthetic
//!   input, and keeps the faster (logged); a software adapter (lavapipe) is not considered. A GPU call that fails at run time is done on the CPU
//!   instead (the results are the same bits), so a lost device degrades speed, not answers.
//!
//! Until `select` is called (export, tests), everything runs on the CPU.

use std::ops::Range;
use std::sync::OnceLock;

use super::float::{QuantBytesView, QuantFloat};
use super::merge::{self, LoraFactors};
use crate::format::Dtype;
#[cfg(feature = "gpu")]
use crate::registry::recipe::QuantConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Gpu,
}

/// The device of each kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub dequant: Device,
    pub cast: Device,
    pub add_f16: Device,
    pub lora: Device,
    /// mergekit's linear merge (`compute::mergekit`, apply by range).
    pub merge_linear: Device,
    /// mergekit's task arithmetic rows (task arithmetic, TIES, DARE, breadcrumbs).
    pub merge_gta: Device,
}

const ALL_CPU: Choice = Choice {
    dequant: Device::Cpu,
    cast: Device::Cpu,
    add_f16: Device::Cpu,
    lora: Device::Cpu,
    merge_linear: Device::Cpu,
    merge_gta: Device::Cpu,
};

static CHOICE: OnceLock<Choice> = OnceLock::new();
#[cfg(feature = "gpu")]
static GPU: OnceLock<super::gpu::GpuContext> = OnceLock::new();

fn choice() -> Choice {
    *CHOICE.get().unwrap_or(&ALL_CPU)
}

/// The CPU's dequantization of f16 codes (`codec::quant::dequantize_range_bytes::<f16>`),
/// which `auto` times against the GPU's. Handed in, since the codecs sit above the kernels.
pub type CpuDequant = fn(QuantBytesView<'_>, Range<usize>, &mut [u8]);

/// Why `--backend` cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend {0:?}: use auto, cpu or gpu")]
    Unknown(String),
    #[error(
        "--backend gpu: this build has no GPU backend (build with `cargo build --release --features gpu`)"
    )]
    NotBuilt,
    #[error("--backend gpu: {0}")]
    NoGpu(String),
}

/// Pick the backend (`cpu`, `gpu` or `auto`) for this process; returns a line for the log.
pub fn select(kind: &str, cpu_dequant: CpuDequant) -> Result<String, BackendError> {
    let chosen = match kind {
        "cpu" => ALL_CPU,
        "gpu" | "auto" => select_gpu(kind == "gpu", cpu_dequant)?,
        other => return Err(BackendError::Unknown(other.to_owned())),
    };
    let _ = CHOICE.set(chosen);
    Ok(format!("backend {kind}: {:?}", choice()))
}

#[cfg(not(feature = "gpu"))]
fn select_gpu(required: bool, _: CpuDequant) -> Result<Choice, BackendError> {
    if required {
        return Err(BackendError::NotBuilt);
    }
    Ok(ALL_CPU)
}

#[cfg(feature = "gpu")]
fn select_gpu(required: bool, cpu_dequant: CpuDequant) -> Result<Choice, BackendError> {
    // A software Vulkan device (lavapipe) runs the kernels on these same cores, slower than the
    // CPU kernels, and opening it costs its JIT's tens of MiB and a quarter CPU-second: auto
    // refuses it before opening it (gpu may ask for it).
    let opts = super::gpu::GpuOptions { hardware_only: !required, ..Default::default() };
    let ctx = match super::gpu::GpuContext::with_options(opts) {
        Ok(ctx) => ctx,
        Err(e) if required => return Err(BackendError::NoGpu(e.to_string())),
        Err(e) => {
            tracing::info!("no GPU ({e}); every kernel runs on the CPU");
            return Ok(ALL_CPU);
        }
    };
    tracing::info!(device = ctx.device_name(), software = ctx.is_software(), "GPU found");
    let chosen = if required {
        Choice {
            dequant: Device::Gpu,
            cast: Device::Gpu,
            add_f16: Device::Gpu,
            lora: Device::Gpu,
            merge_linear: Device::Gpu,
            merge_gta: Device::Gpu,
        }
    } else {
        calibrate(&ctx, cpu_dequant)
    };
    let _ = GPU.set(ctx);
    Ok(chosen)
}

/// Time each kernel once on both devices (after a warm-up) on inputs the size of a few chunks.
/// The read path runs CPU kernels on every core at once (one chunk a thread), while GPU calls
/// share one queue: so the GPU must beat one CPU call divided by the number of cores. (Measured
/// on an H100 host with 16 cores: int8 dequant 2.0 ms CPU vs 1.6 ms GPU per call, yet the mount
/// read 1.9 GB/s on the CPU and 1.0 GB/s on the GPU.)
#[cfg(feature = "gpu")]
fn calibrate(ctx: &super::gpu::GpuContext, cpu_dequant: CpuDequant) -> Choice {
    use std::time::Instant;
    let cores = rayon::current_num_threads().max(1) as f64;
    let faster = |name: &str, cpu: &dyn Fn(), gpu: &dyn Fn() -> bool| {
        cpu();
        let t = Instant::now();
        cpu();
        let c = t.elapsed().as_secs_f64();
        if !gpu() {
            return Device::Cpu;
        }
        let t = Instant::now();
        let ok = gpu();
        let g = t.elapsed().as_secs_f64();
        tracing::info!(
            "calibration {name}: cpu {:.2} ms a call ({cores} in parallel), gpu {:.2} ms",
            c * 1e3,
            g * 1e3
        );
        if ok && g < c / cores {
            Device::Gpu
        } else {
            Device::Cpu
        }
    };
    let (rows, cols) = (1024usize, 2048usize);
    let data: Vec<half::f16> =
        (0..rows * cols).map(|i| half::f16::from_f32(((i * 7919) % 1000) as f32 * 1e-3 - 0.5)).collect();
    // Codes and scales of the default configuration (8 bits, symmetric): their values do not
    // change the time.
    let config = QuantConfig::default();
    let n = rows * cols;
    let codes: Vec<u8> = (0..n).map(|i| (i * 31) as u8).collect();
    let groups = rows * cols.div_ceil(config.group_size);
    let scale: Vec<u8> =
        (0..groups).flat_map(|g| half::f16::from_f32(1.0 + g as f32 * 1e-3).to_le_bytes()).collect();
    let view = QuantBytesView { rows, cols, config, q: &codes, scale: &scale, min: &[] };
    let out = std::cell::RefCell::new(vec![0u8; n * 2]);
    let dequant = faster("dequant", &|| cpu_dequant(view, 0..n, &mut out.borrow_mut()), &|| {
        ctx.dequantize_range_bytes::<half::f16>(view, 0..n, &mut out.borrow_mut()).is_ok()
    });
    let src: Vec<u8> = bytemuck::cast_slice(&data).to_vec();
    let wide = std::cell::RefCell::new(vec![0u8; n * 4]);
    let cast = faster(
        "cast",
        &|| super::cast::cast(Dtype::F16, Dtype::F32, &src, &mut wide.borrow_mut()).expect("floats"),
        &|| ctx.cast(Dtype::F16, Dtype::F32, &src, &mut wide.borrow_mut()).is_ok(),
    );
    let add_f16 = faster("add_f16", &|| merge::add_f16(&src, &src, &mut out.borrow_mut()), &|| {
        ctx.add_f16(&src, &src, &mut out.borrow_mut()).is_ok()
    });
    let r = 16;
    let f = LoraFactors {
        a: vec![0.01; r * cols],
        b: vec![0.01; rows * r],
        rank: r,
        scale: 2.0,
        transposed: false,
    };
    let lora = faster(
        "lora",
        // F16 always has a merge: the Result is Ok.
        &|| drop(merge::lora_rows(&f, Dtype::F16, cols, 0..n, &src, &mut out.borrow_mut())),
        &|| ctx.lora_rows(&f, Dtype::F16, cols, 0..n, &src, &mut out.borrow_mut()).is_ok(),
    );
    let (merge_linear, merge_gta) = calibrate_merges(ctx, &faster);
    Choice { dequant, cast, add_f16, lora, merge_linear, merge_gta }
}

/// `calibrate`'s timer: a kernel's name, its CPU and GPU runs (the GPU's false when it failed).
#[cfg(feature = "gpu")]
type Faster<'a> = dyn Fn(&str, &dyn Fn(), &dyn Fn() -> bool) -> Device + 'a;

/// The merges' calibration: a 4-input linear merge and a base + 3 TIES (magnitude cut-off
/// with ties, sign consensus, normalize, rescale) over 2 Mi bf16 elements, the size of a read
/// chunk. The statistics are made up: only the time counts.
#[cfg(feature = "gpu")]
fn calibrate_merges(ctx: &super::gpu::GpuContext, faster: &Faster) -> (Device, Device) {
    use super::mergekit::{
        name_key, Gta, GtaParent, Keep, Kernel, ParentStats, Sparsify, Stats, TensorMerge,
    };
    let n = 1usize << 21;
    let inputs: Vec<Vec<f32>> = (0..4)
        .map(|j| {
            (0..n)
                .map(|i| {
                    super::mergekit::round(Dtype::BF16, ((i * 7919 + j * 104_729) % 1000) as f32 * 1e-3 - 0.5)
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let out = std::cell::RefCell::new(vec![0f32; n]);
    let merge = |kernel: Kernel, base: Option<usize>| TensorMerge {
        kernel,
        dtype: Dtype::BF16,
        base,
        shape: vec![n],
        seed: 0,
        name_key: name_key("calibration"),
        threads: 1,
    };
    let timed = |name: &str, m: &TensorMerge, stats: &Stats| {
        faster(name, &|| drop(m.apply_cpu(stats, &refs, 0, &mut out.borrow_mut())), &|| {
            ctx.mergekit_apply(m, stats, &refs, 0, &mut out.borrow_mut()).is_ok()
        })
    };
    let linear = merge(Kernel::Linear { weights: vec![0.4, 0.3, 0.2, 0.1], normalize: true }, None);
    let parents = (0..3).map(|_| GtaParent { weight: 0.5, density: 0.5, gamma: 0.0, epsilon: 0.0 }).collect();
    let ties = merge(
        Kernel::Gta(Gta {
            consensus: true,
            sparsify: Some(Sparsify::Magnitude),
            parents,
            normalize: true,
            rescale: true,
            lambda: 1.0,
        }),
        Some(0),
    );
    let stats = Stats::Gta(
        (0..3)
            .map(|k| ParentStats {
                keep: Keep::Top { mag: 0.25, ties: (0..n as u32).step_by(997 + k).collect() },
                factor: Some(1.5),
            })
            .collect(),
    );
    (timed("merge linear", &linear, &Stats::None), timed("merge ties", &ties, &stats))
}

/// Run a merge's apply on the GPU when it was chosen for its method: true if it did (the
/// CPU's bits), false when the caller runs [`TensorMerge::apply_cpu`](super::mergekit::TensorMerge::apply_cpu)
/// (not chosen, a method or size the GPU kernel does not take, or a failed GPU call).
pub fn merge_on_gpu(
    m: &super::mergekit::TensorMerge,
    stats: &super::mergekit::Stats,
    parents: &[&[f32]],
    start: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(feature = "gpu")]
    {
        use super::mergekit::Kernel;
        let device = match m.kernel {
            Kernel::Linear { .. } => choice().merge_linear,
            Kernel::Gta(_) => choice().merge_gta,
            _ => Device::Cpu,
        };
        if device == Device::Gpu && super::gpu::mergekit::supported(m, parents.len()) {
            if let Some(ctx) = GPU.get() {
                match ctx.mergekit_apply(m, stats, parents, start, out) {
                    Ok(()) => return true,
                    Err(e) => tracing::warn!("GPU kernel failed, using the CPU: {e}"),
                }
            }
        }
    }
    let _ = (m, stats, parents, start, out);
    false
}

/// Whether a linear merge's apply may go to the GPU ([`merge_on_gpu`] would try it): if not,
/// the CPU computes it, and a caller may take a CPU path of its own with the same bits.
pub fn merge_linear_may_use_gpu() -> bool {
    choice().merge_linear == Device::Gpu
}

/// Run on the GPU when chosen; on the CPU otherwise or when the GPU call fails.
macro_rules! dispatch {
    ($device:expr, |$ctx:ident| $gpu:expr, $cpu:expr) => {{
        #[cfg(feature = "gpu")]
        if $device == Device::Gpu {
            if let Some($ctx) = GPU.get() {
                match $gpu {
                    Ok(()) => return,
                    Err(e) => tracing::warn!("GPU kernel failed, using the CPU: {e}"),
                }
            }
        }
        $cpu
    }};
}

/// Dequantize on the GPU when it was chosen for it: true if it did (the results are the CPU's
/// bits), false when the caller runs the CPU kernel (`codec::quant`).
pub fn dequantize_on_gpu<T: QuantFloat>(qt: QuantBytesView<'_>, elems: Range<usize>, out: &mut [u8]) -> bool {
    #[cfg(feature = "gpu")]
    if choice().dequant == Device::Gpu {
        if let Some(ctx) = GPU.get() {
            match ctx.dequantize_range_bytes::<T>(qt, elems.clone(), out) {
                Ok(()) => return true,
                Err(e) => tracing::warn!("GPU kernel failed, using the CPU: {e}"),
            }
        }
    }
    let _ = (qt, elems, out);
    false
}

pub fn cast(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<(), super::cast::CastError> {
    #[cfg(feature = "gpu")]
    if choice().cast == Device::Gpu && from.is_float() && to.is_float() {
        if let Some(ctx) = GPU.get() {
            match ctx.cast(from, to, src, dst) {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!("GPU kernel failed, using the CPU: {e}"),
            }
        }
    }
    super::cast::cast(from, to, src, dst)
}

pub fn add_f16(a: &[u8], b: &[u8], out: &mut [u8]) {
    dispatch!(choice().add_f16, |ctx| ctx.add_f16(a, b, out), merge::add_f16(a, b, out))
}

/// [`merge::add_f16_of`] (FastChat's add over a base cast to f16): fused on the CPU, or the cast
/// and the add each on the device chosen for it when either is the GPU.
pub fn add_f16_of(
    from: Dtype,
    base: &[u8],
    delta: &[u8],
    out: &mut [u8],
) -> Result<(), super::cast::CastError> {
    #[cfg(feature = "gpu")]
    if (choice().cast == Device::Gpu || choice().add_f16 == Device::Gpu) && from != Dtype::F16 {
        let mut h = vec![0u8; out.len()];
        cast(from, Dtype::F16, base, &mut h)?;
        add_f16(&h, delta, out);
        return Ok(());
    }
    merge::add_f16_of(from, base, delta, out)
}

/// [`merge::lora_rows`] on the faster device; an error (a weight dtype with no merge) is the
/// caller's to turn into EIO.
pub fn lora_rows(
    f: &LoraFactors,
    dtype: Dtype,
    cols: usize,
    elems: Range<usize>,
    w: &[u8],
    out: &mut [u8],
) -> Result<(), super::cast::CastError> {
    #[cfg(feature = "gpu")]
    if choice().lora == Device::Gpu && dtype.is_float() {
        if let Some(ctx) = GPU.get() {
            match ctx.lora_rows(f, dtype, cols, elems.clone(), w, out) {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!("GPU kernel failed, using the CPU: {e}"),
            }
        }
    }
    merge::lora_rows(f, dtype, cols, elems, w, out)
}

#[cfg(all(test, feature = "gpu"))]
mod tests {
    /// `auto`'s calibration (which skips software adapters, so no other test runs it) times
    /// every kernel on the adapter there is, lavapipe included, and answers a choice: no call
    /// in it panics, and the merges' GPU calls succeed. Skipped without an adapter unless `LLMFS_REQUIRE_GPU=1`.
    #[test]
    fn calibration_runs_every_kernel() {
        let ctx = match super::super::gpu::GpuContext::new() {
            Ok(c) => c,
            Err(e) => {
                assert!(std::env::var("LLMFS_REQUIRE_GPU").as_deref() != Ok("1"), "no GPU: {e}");
                eprintln!("note: skipping: no GPU: {e}");
                return;
            }
        };
        // A stand-in for the codecs' CPU dequantization (they sit above the kernels): the
        // calibration only times it.
        fn cpu_dequant(_: super::QuantBytesView<'_>, _: std::ops::Range<usize>, out: &mut [u8]) {
            out.fill(0);
        }
        let choice = super::calibrate(&ctx, cpu_dequant);
        eprintln!("{choice:?}");
        // The merges' GPU runs succeed (calibrate would quietly pick the CPU if they failed).
        let must_run = |name: &str, cpu: &dyn Fn(), gpu: &dyn Fn() -> bool| {
            cpu();
            assert!(gpu(), "calibration {name}: the GPU call failed");
            super::Device::Gpu
        };
        assert_eq!(super::calibrate_merges(&ctx, &must_run), (super::Device::Gpu, super::Device::Gpu));
    }
}

//! Benchmark hooks of [`GpuContext`], for `examples/bench_gpu.rs` and the backend's
//! calibration: the GPU time of the kernels alone ([`GpuContext::measure_kernels`]) and what
//! each way of moving bytes reaches on this machine ([`TransferBounds`]). Nothing on the read
//! path calls them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::copy::Job;
use super::{GpuContext, GpuError, Groups, Kernel, WG};

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

impl GpuContext {
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
}

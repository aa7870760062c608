//! The GPU context: one wgpu device and queue, a summary of the adapter that a person can
//! read, and asynchronous readback that never blocks a browser thread.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use thiserror::Error;
use wgpu::util::DeviceExt;

/// Why no GPU context could be made, or a GPU operation failed.
#[derive(Debug, Error)]
pub enum GpuError {
    /// No adapter is available (no WebGPU in this browser, no Vulkan/Metal/DX12 driver).
    #[error("no GPU adapter available: {0}")]
    NoAdapter(String),
    /// The adapter refused to create a device.
    #[error("GPU device request failed: {0}")]
    Device(String),
    /// Mapping a buffer for readback failed.
    #[error("GPU readback failed: {0}")]
    Readback(String),
}

/// What a person needs to know about the adapter Shoal trains on.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AdapterSummary {
    /// A human-readable description ("NVIDIA GeForce RTX 4090", "llvmpipe", "swiftshader").
    pub description: String,
    /// The graphics API underneath ("vulkan", "webgpu", ...).
    pub backend: String,
    /// "discrete-gpu", "integrated-gpu", "virtual-gpu", "cpu" or "other".
    pub device_type: String,
    /// Whether the "GPU" is really a CPU emulation (SwiftShader, lavapipe): it works, but
    /// slowly, and the engine may prefer its CPU backend.
    pub software: bool,
}

impl AdapterSummary {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        let description = [
            info.name.as_str(),
            info.driver.as_str(),
            info.driver_info.as_str(),
        ]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or("unnamed adapter")
        .to_string();
        let device_type = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => "discrete-gpu",
            wgpu::DeviceType::IntegratedGpu => "integrated-gpu",
            wgpu::DeviceType::VirtualGpu => "virtual-gpu",
            wgpu::DeviceType::Cpu => "cpu",
            wgpu::DeviceType::Other => "other",
        };
        let lower = description.to_ascii_lowercase();
        let software = info.device_type == wgpu::DeviceType::Cpu
            || ["swiftshader", "llvmpipe", "lavapipe"]
                .iter()
                .any(|s| lower.contains(s));
        Self {
            description,
            backend: info.backend.to_str().to_string(),
            device_type: device_type.to_string(),
            software,
        }
    }
}

/// One device and queue on one adapter. Cloning shares them.
#[derive(Clone)]
pub struct Gpu {
    /// The device every buffer and pipeline is created on.
    pub device: wgpu::Device,
    /// The queue every command is submitted to.
    pub queue: wgpu::Queue,
    /// What the adapter is.
    pub adapter: AdapterSummary,
    /// The training kernels compiled on this device, passed from one backend to the next.
    pub(crate) kernels: Arc<Mutex<Option<crate::engine::gpu::Kernels>>>,
}

impl Gpu {
    /// Asks the platform for its preferred high-performance adapter and opens a device
    /// with the adapter's own limits (compute kernels want its storage-buffer sizes).
    /// Natively, `WGPU_BACKEND` (e.g. `vulkan`, `gl`) restricts the backends tried.
    pub async fn new() -> Result<Self, GpuError> {
        let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        let instance = wgpu::Instance::new(desc);
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        let summary = AdapterSummary::from_info(&adapter.get_info());
        let mut last_err = String::new();
        for limits in device_limits(adapter.limits()) {
            let desc = wgpu::DeviceDescriptor {
                label: Some("shoal"),
                required_features: wgpu::Features::empty(),
                required_limits: limits,
                ..Default::default()
            };
            match adapter.request_device(&desc).await {
                Ok((device, queue)) => {
                    return Ok(Self {
                        device,
                        queue,
                        adapter: summary,
                        kernels: Arc::default(),
                    });
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        Err(GpuError::Device(last_err))
    }

    /// Copies `len` f32 values of `src` (from its start) back to the CPU. Asynchronous on
    /// every platform: in a browser the map callback arrives from the event loop; natively
    /// the device is polled until the copy has finished.
    pub async fn read_f32(&self, src: &wgpu::Buffer, len: usize) -> Result<Vec<f32>, GpuError> {
        let size = (len * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("shoal-readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(src, 0, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            // The receiver only disappears if the caller's future was dropped.
            let _ = tx.send(r);
        });
        self.drive()?;
        rx.await
            .map_err(|_| GpuError::Readback("map callback dropped".into()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let out = bytemuck::cast_slice::<u8, f32>(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Makes pending callbacks fire. Browsers do this from their event loop; native
    /// backends need an explicit wait.
    #[cfg(not(target_arch = "wasm32"))]
    fn drive(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::Readback(e.to_string()))
    }

    #[cfg(target_arch = "wasm32")]
    #[allow(clippy::unnecessary_wraps)]
    fn drive(&self) -> Result<(), GpuError> {
        Ok(())
    }

    /// Computes `a * x + y` element-wise with a WGSL compute kernel: the smallest real
    /// round trip (upload, dispatch, readback) that proves a GPU path works end to end.
    pub async fn axpy(&self, a: f32, x: &[f32], y: &[f32]) -> Result<Vec<f32>, GpuError> {
        assert_eq!(x.len(), y.len(), "axpy operands must have equal length");
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("axpy"),
                source: wgpu::ShaderSource::Wgsl(AXPY_WGSL.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("axpy"),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let make = |label, data: &[f32]| {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytemuck::cast_slice(data),
                    usage,
                })
        };
        let xb = make("x", x);
        let yb = make("y", y);
        let ab = make("a", &[a]);
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("axpy"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ab.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: xb.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: yb.as_entire_binding(),
                },
            ],
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups((x.len() as u32).div_ceil(64), 1, 1);
        }
        self.queue.submit([encoder.finish()]);
        self.read_f32(&yb, y.len()).await
    }
}

const AXPY_WGSL: &str = r"
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i < arrayLength(&y)) {
        y[i] = a[0] * x[i] + y[i];
    }
}
";

/// The limits a device is asked for, in order: the adapter's own (large storage buffers),
/// then, where a driver refuses them, WebGPU's defaults, which every WebGPU device has:
/// 8 storage buffers a shader stage, as the kernels need (the optimizer binds 7). The
/// fallback was wgpu's downlevel defaults, of 4: a device opened with them failed every
/// kernel that binds more.
fn device_limits(adapter: wgpu::Limits) -> [wgpu::Limits; 2] {
    [adapter, wgpu::Limits::defaults()]
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::device_limits;

    /// Every limit a device may be opened with holds every kernel's storage buffers.
    #[test]
    fn every_device_asked_for_binds_the_kernels_storage_buffers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine/kernels");
        let most = std::fs::read_dir(&dir)
            .expect("the kernels")
            .map(|e| std::fs::read_to_string(e.expect("an entry").path()).expect("a kernel"))
            .map(|source| source.matches("var<storage").count())
            .max()
            .expect("kernels");
        assert!(most >= 7, "the optimizer binds 7: {most}");
        for limits in device_limits(wgpu::Limits::defaults()) {
            assert!(limits.max_storage_buffers_per_shader_stage as usize >= most);
        }
    }
}

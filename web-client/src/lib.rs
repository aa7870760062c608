//! The Shoal peer. The same logic runs in a browser's Web Worker (compiled to wasm, driven
//! through the bindings in `wasm.rs`) and natively; platform code sits behind that one
//! module boundary.

use serde::Serialize;
use shoal_shared::dataset::Dataset;
use shoal_shared::engine::train::{self, Samples, Trainer};
use shoal_shared::engine::{AnyBackend, ModelSpec};
use shoal_shared::gpu::{AdapterSummary, Gpu, GpuError};
use shoal_shared::idx::IdxLimits;

#[cfg(not(target_arch = "wasm32"))]
pub mod keeper;
pub mod learning;
pub mod links;
#[cfg(not(target_arch = "wasm32"))]
pub mod local_folder;
pub mod mesh;
#[cfg(not(target_arch = "wasm32"))]
pub mod native;
pub mod observe;
pub mod swarm;
#[cfg(target_arch = "wasm32")]
pub mod wasm;

/// Which engine backend this peer trains on, and why: shown to the person running it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum BackendChoice {
    /// Training runs in WebGPU / native GPU compute kernels on this adapter.
    Gpu {
        /// The adapter.
        adapter: AdapterSummary,
    },
    /// No usable adapter; training runs on the CPU reference backend.
    Cpu {
        /// Why the GPU is not used, in words.
        reason: String,
    },
}

impl BackendChoice {
    /// Picks the backend from the outcome of a GPU request.
    pub fn from_request(request: Result<&Gpu, &GpuError>) -> Self {
        match request {
            Ok(gpu) => Self::Gpu {
                adapter: gpu.adapter.clone(),
            },
            Err(e) => Self::Cpu {
                reason: e.to_string(),
            },
        }
    }
}

/// Requests a GPU and reports the backend choice.
pub async fn probe_backend() -> (BackendChoice, Option<Gpu>) {
    let gpu = Gpu::new().await;
    let choice = BackendChoice::from_request(gpu.as_ref());
    (choice, gpu.ok())
}

/// The demo models by name: `"mlp"` (784-128-64-10) or `"cnn"` (conv 8, pool, conv 16,
/// pool, dense 10).
pub fn demo_model(name: &str) -> Result<ModelSpec, String> {
    match name {
        "mlp" => Ok(ModelSpec::mlp_digits()),
        "cnn" => Ok(ModelSpec::cnn_digits()),
        other => Err(format!(
            "unknown demo model {other:?} (expected \"mlp\" or \"cnn\")"
        )),
    }
}

/// Builds a trainer for a demo model on IDX digits: on the GPU when `gpu` is given,
/// otherwise on the CPU, with Adam at `lr` and the model initialized from `seed`.
pub fn digits_trainer(
    model: &str,
    gpu: Option<&Gpu>,
    images: &[u8],
    labels: &[u8],
    batch: usize,
    lr: f32,
    seed: u64,
) -> Result<Trainer<AnyBackend>, String> {
    let data =
        Dataset::from_idx(images, labels, 10, &IdxLimits::default()).map_err(|e| e.to_string())?;
    train::trainer(
        demo_model(model)?,
        gpu,
        Samples::from_dataset(&data),
        batch,
        lr,
        seed,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_request_falls_back_to_the_cpu_and_says_why() {
        let err = GpuError::NoAdapter("navigator.gpu is undefined".into());
        let choice = BackendChoice::from_request(Err(&err));
        let json = serde_json::to_value(&choice).expect("serializable");
        assert_eq!(json["backend"], "cpu");
        assert!(
            json["reason"]
                .as_str()
                .is_some_and(|r| r.contains("navigator.gpu"))
        );
    }
}

//! The Shoal peer. The same logic runs in a browser's Web Worker (compiled to wasm, driven
//! through the bindings in `wasm.rs`) and natively; platform code sits behind that one
//! module boundary.

use serde::Serialize;
use shoal_shared::gpu::{AdapterSummary, Gpu, GpuError};

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

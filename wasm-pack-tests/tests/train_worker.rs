//! Training really learns in the browser, in a dedicated Web Worker: the CPU backend
//! (wasm with simd128) reaches the same held-out targets as natively, and the WebGPU
//! backend gets the MLP above 90% after one epoch. The demo digits are compiled in
//! (`cargo xtask test` prepares them before building).
#![cfg(target_arch = "wasm32")]

use shoal_shared::dataset::Dataset;
use shoal_shared::engine::ModelSpec;
use shoal_shared::engine::train::{Samples, cpu_accuracy, gpu_mlp_one_epoch_accuracy};
use shoal_shared::gpu::Gpu;
use shoal_shared::idx::IdxLimits;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_dedicated_worker);

fn split(images: &[u8], labels: &[u8]) -> Samples {
    let d = Dataset::from_idx(images, labels, 10, &IdxLimits::default()).expect("valid demo data");
    Samples::from_dataset(&d)
}

fn train() -> Samples {
    split(
        include_bytes!("../../data/digits/train-images.idx"),
        include_bytes!("../../data/digits/train-labels.idx"),
    )
}

fn test() -> Samples {
    split(
        include_bytes!("../../data/digits/test-images.idx"),
        include_bytes!("../../data/digits/test-labels.idx"),
    )
}

#[wasm_bindgen_test]
async fn cpu_mlp_reaches_95_percent_in_wasm() {
    let acc = cpu_accuracy(ModelSpec::mlp_digits(), 2e-3, 20, 2, &train(), &test())
        .await
        .expect("training does not diverge");
    assert!(acc >= 0.95, "MLP accuracy {acc}");
}

#[wasm_bindgen_test]
async fn cpu_cnn_reaches_97_5_percent_in_wasm() {
    let acc = cpu_accuracy(ModelSpec::cnn_digits(), 3e-3, 12, 1, &train(), &test())
        .await
        .expect("training does not diverge");
    assert!(acc >= 0.975, "CNN accuracy {acc}");
}

#[wasm_bindgen_test]
async fn webgpu_mlp_reaches_90_percent_after_one_epoch() {
    let gpu = Gpu::new().await.expect("WebGPU in the worker");
    let acc = gpu_mlp_one_epoch_accuracy(&gpu, &train(), &test())
        .await
        .expect("training does not diverge");
    assert!(acc >= 0.90, "WebGPU MLP accuracy after one epoch {acc}");
}

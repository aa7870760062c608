//! Training really learns in the browser, in a dedicated Web Worker: the CPU backend
//! (wasm with simd128) reaches the same held-out targets as natively, and the WebGPU
//! backend gets the MLP above 90% after one epoch. The demo digits are compiled in
//! (`cargo xtask test` prepares them before building).
#![cfg(target_arch = "wasm32")]

use shoal_shared::dataset::Dataset;
use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::gpu::GpuBackend;
use shoal_shared::engine::train::{FitConfig, Samples, cpu_accuracy, fit};
use shoal_shared::engine::{Backend, Model, ModelSpec, Optimizer};
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
    let (train, test) = (train(), test());
    let gpu = Gpu::new().await.expect("WebGPU in the worker");
    let model = Model::new(ModelSpec::mlp_digits()).expect("valid model");
    let params = model.init_params(42);
    let lr = 3e-3;
    let mut backend = GpuBackend::new(&gpu, model.clone(), Optimizer::adam(lr), &params, 64)
        .expect("gpu backend");
    let cfg = FitConfig {
        epochs: 1,
        batch: 64,
        lr,
        seed: 7,
        shift: 0,
    };
    fit(&mut backend, &train, cfg)
        .await
        .expect("training does not diverge");
    let trained = backend.params().await.expect("readback");
    let mut eval = CpuBackend::new(model, Optimizer::adam(lr), trained).expect("valid weights");
    let acc = eval
        .evaluate(&test.inputs, &test.labels, 500)
        .expect("evaluates")
        .1;
    assert!(acc >= 0.90, "WebGPU MLP accuracy after one epoch {acc}");
}

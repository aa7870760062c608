//! Training really learns: the demo models on the demo digits (8,000 train / 2,000
//! held-out test), CPU backend, natively. The data comes from `cargo xtask data`.

use shoal_shared::dataset::Dataset;
use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::train::{FitConfig, Samples, cpu_accuracy, fit};
use shoal_shared::engine::{Model, ModelSpec, Optimizer};
use shoal_shared::idx::IdxLimits;

fn load(split: &str) -> Samples {
    let dir = std::env::var("SHOAL_DATA")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../data").into());
    let read = |what: &str| {
        let path = format!("{dir}/digits/{split}-{what}.idx");
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{path}: {e} (run `cargo xtask data` first)"))
    };
    let d = Dataset::from_idx(&read("images"), &read("labels"), 10, &IdxLimits::default())
        .expect("valid demo data");
    Samples::from_dataset(&d)
}

fn train_and_test(spec: ModelSpec, lr: f32, epochs: usize, shift: usize) -> f32 {
    let (train, test) = (load("train"), load("test"));
    assert_eq!((train.len(), test.len()), (8000, 2000));
    pollster::block_on(cpu_accuracy(spec, lr, epochs, shift, &train, &test))
        .expect("training does not diverge")
}

#[test]
fn mlp_reaches_95_percent_on_held_out_digits() {
    let acc = train_and_test(ModelSpec::mlp_digits(), 2e-3, 20, 2);
    println!("MLP held-out accuracy: {:.2}%", acc * 100.0);
    assert!(acc >= 0.95, "MLP accuracy {acc}");
}

#[test]
fn cnn_reaches_97_5_percent_on_held_out_digits() {
    let acc = train_and_test(ModelSpec::cnn_digits(), 3e-3, 12, 1);
    println!("CNN held-out accuracy: {:.2}%", acc * 100.0);
    assert!(acc >= 0.975, "CNN accuracy {acc}");
}

#[test]
fn gpu_backend_mlp_reaches_90_percent_after_one_epoch() {
    use shoal_shared::engine::gpu::GpuBackend;
    let (train, test) = (load("train"), load("test"));
    let gpu =
        pollster::block_on(shoal_shared::gpu::Gpu::new()).expect("a wgpu adapter (lavapipe in CI)");
    let model = Model::new(ModelSpec::mlp_digits()).expect("valid model");
    let params = model.init_params(42);
    let lr = 3e-3;
    let mut backend = GpuBackend::new(&gpu, model.clone(), Optimizer::adam(lr), &params, 64)
        .expect("gpu backend");
    let t = std::time::Instant::now();
    let cfg = FitConfig {
        epochs: 1,
        batch: 64,
        lr,
        seed: 7,
        shift: 0,
    };
    pollster::block_on(fit(&mut backend, &train, cfg)).expect("training does not diverge");
    let trained =
        pollster::block_on(shoal_shared::engine::Backend::params(&mut backend)).expect("readback");
    let mut eval = CpuBackend::new(model, Optimizer::adam(lr), trained).expect("valid weights");
    let (_, acc) = eval
        .evaluate(&test.inputs, &test.labels, 500)
        .expect("evaluates");
    println!(
        "GPU ({}) MLP, one epoch: {:.2}% in {:?}",
        gpu.adapter.description,
        acc * 100.0,
        t.elapsed()
    );
    assert!(acc >= 0.90, "GPU MLP accuracy after one epoch {acc}");
}

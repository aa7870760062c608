//! Training really learns: the demo models on the demo digits (8,000 train / 2,000
//! held-out test), CPU backend, natively. The data comes from `cargo xtask data`.

use shoal_engine::engine::ModelSpec;
use shoal_engine::engine::train::{Samples, cpu_accuracy, gpu_mlp_one_epoch_accuracy};

fn load(split: &str) -> Samples {
    let dir: String = std::env::var("SHOAL_DATA")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../data").into());
    Samples::read_split(dir.as_ref(), "digits", split)
        .unwrap_or_else(|e| panic!("{e} (run `cargo xtask data` first)"))
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
    let (train, test) = (load("train"), load("test"));
    let gpu =
        pollster::block_on(shoal_engine::gpu::Gpu::new()).expect("a wgpu adapter (lavapipe in CI)");
    let t = std::time::Instant::now();
    let acc = pollster::block_on(gpu_mlp_one_epoch_accuracy(&gpu, &train, &test))
        .expect("training does not diverge");
    println!(
        "GPU ({}) MLP, one epoch: {:.2}% in {:?}",
        gpu.adapter.description,
        acc * 100.0,
        t.elapsed()
    );
    assert!(acc >= 0.90, "GPU MLP accuracy after one epoch {acc}");
}

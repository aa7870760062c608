//! The conformance suite: the same checks run natively (wgpu on Vulkan, lavapipe in CI)
//! and in headless Chromium's WebGPU (from `wasm-pack-tests`). Each function panics with
//! a message that names the op, the shape and the error when a check fails.
//!
//! Error bounds are relative to the largest magnitude of the reference result:
//! matmul 1e-4, loss and gradients 1e-3, parameters after several steps 1e-3. Shapes
//! stay small because emulated GPUs are slow.

use super::cpu::CpuBackend;
use super::gemm::{MatRef, gemm_reference};
use super::gpu::{GpuBackend, matmul_once};
use super::{Backend, EngineError, LayerSpec, Model, ModelSpec, Optimizer};
use crate::gpu::Gpu;
use crate::rng::SplitMix64;

/// Samples per batch in the suite.
pub const BATCH: usize = 4;

fn conv(filters: usize, kernel: usize, stride: usize, padding: usize) -> LayerSpec {
    LayerSpec::Conv2d {
        filters,
        kernel,
        stride,
        padding,
    }
}

/// Small models that, between them, exercise every op forward and backward: dense with
/// and without a fused rectifier, convolution with padding and with stride (first layer
/// and deeper, so col2im runs), max pooling, a standalone rectifier, the loss.
pub fn models() -> Vec<(&'static str, ModelSpec)> {
    use LayerSpec::{Dense, Flatten, MaxPool, Relu};
    vec![
        (
            "dense",
            ModelSpec {
                input: [1, 1, 12],
                layers: vec![Dense { units: 7 }],
            },
        ),
        (
            "dense+relu",
            ModelSpec {
                input: [1, 1, 13],
                layers: vec![Dense { units: 9 }, Relu, Dense { units: 5 }],
            },
        ),
        (
            "conv(pad)+relu",
            ModelSpec {
                input: [6, 6, 2],
                layers: vec![conv(3, 3, 1, 1), Relu, Flatten, Dense { units: 4 }],
            },
        ),
        (
            "conv(stride)",
            ModelSpec {
                input: [7, 7, 3],
                layers: vec![conv(4, 3, 2, 0), Flatten, Dense { units: 3 }],
            },
        ),
        (
            "conv+pool+conv+pool",
            ModelSpec {
                input: [8, 8, 1],
                layers: vec![
                    conv(4, 3, 1, 1),
                    Relu,
                    MaxPool { size: 2 },
                    conv(5, 3, 1, 1),
                    Relu,
                    MaxPool { size: 2 },
                    Flatten,
                    Dense { units: 3 },
                ],
            },
        ),
        (
            // Eight channels and more: the CPU's specialised patch rows (3 x 8 values) and
            // its pooling eight channels at a time, with two left over.
            "conv8+pool+conv10+pool",
            ModelSpec {
                input: [6, 6, 1],
                layers: vec![
                    conv(8, 3, 1, 1),
                    Relu,
                    MaxPool { size: 2 },
                    conv(10, 3, 1, 1),
                    Relu,
                    MaxPool { size: 2 },
                    Flatten,
                    Dense { units: 3 },
                ],
            },
        ),
        (
            "pool+relu",
            ModelSpec {
                input: [4, 4, 2],
                layers: vec![
                    conv(3, 1, 1, 0),
                    MaxPool { size: 2 },
                    Relu,
                    Flatten,
                    Dense { units: 3 },
                ],
            },
        ),
        (
            // The CPU's direct convolutions (`conv.rs`) deeper in a model: 4 channels
            // into 8 filters (direct weights, input gradient through col2im), then 8
            // channels into 16 filters (the input gradient a transposed convolution).
            "conv4+conv8+pool+conv16",
            ModelSpec {
                input: [6, 6, 1],
                layers: vec![
                    conv(4, 3, 1, 1),
                    Relu,
                    conv(8, 3, 1, 1),
                    Relu,
                    MaxPool { size: 2 },
                    conv(16, 3, 1, 1),
                    Flatten,
                    Dense { units: 3 },
                ],
            },
        ),
    ]
}

/// Small language models that exercise every transformer op forward and backward: one
/// and two blocks, one and several heads, an untied and a tied head (whose token table
/// gets gradient from both ends), a final layer norm.
pub fn lm_models() -> Vec<(&'static str, ModelSpec)> {
    use LayerSpec::{Embedding, LayerNorm, LmHead, TransformerBlock};
    vec![
        (
            "lm(1 block, 1 head, untied)",
            ModelSpec {
                input: [1, 5, 1],
                layers: vec![
                    Embedding { vocab: 11, dim: 8 },
                    TransformerBlock {
                        heads: 1,
                        mlp_ratio: 2,
                    },
                    LayerNorm,
                    LmHead { tied: false },
                ],
            },
        ),
        (
            "lm(2 blocks, 4 heads, tied)",
            ModelSpec {
                input: [1, 6, 1],
                layers: vec![
                    Embedding { vocab: 13, dim: 16 },
                    TransformerBlock {
                        heads: 4,
                        mlp_ratio: 4,
                    },
                    TransformerBlock {
                        heads: 4,
                        mlp_ratio: 4,
                    },
                    LayerNorm,
                    LmHead { tied: true },
                ],
            },
        ),
    ]
}

/// Adds normal noise of standard deviation `std` to every parameter of every tensor.
fn perturb(model: &Model, params: &mut [f32], std: f32, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for t in &model.tensors {
        params[t.range()]
            .iter_mut()
            .for_each(|v| *v += std * rng.normal_f32());
    }
}

fn random(len: usize, rng: &mut SplitMix64) -> Vec<f32> {
    (0..len).map(|_| rng.normal_f32()).collect()
}

/// A random batch: normal inputs (token ids for a language model) and labels.
pub fn batch_for(model: &Model, seed: u64) -> (Vec<f32>, Vec<u8>) {
    let mut rng = SplitMix64::new(seed);
    let x = match model.vocab() {
        Some(vocab) => (0..BATCH * model.input_len())
            .map(|_| rng.below(vocab) as f32)
            .collect(),
        None => random(BATCH * model.input_len(), &mut rng),
    };
    let y = (0..BATCH * model.positions())
        .map(|_| rng.below(model.classes()) as u8)
        .collect();
    (x, y)
}

/// Largest difference relative to the largest magnitude in `want`.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
        / scale
}

/// The matmul kernel against the f64 reference, every transpose and load variant, on
/// shapes that straddle tile edges.
pub async fn matmul_matches_reference(gpu: &Gpu) {
    let mut rng = SplitMix64::new(11);
    for &(m, k, n) in &[
        (1, 1, 1),
        (5, 7, 3),
        (64, 16, 64),
        (65, 33, 17),
        (8, 12, 20),
        (70, 130, 68),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = random(m * k, &mut rng);
            let b = random(k * n, &mut rng);
            let ar = if ta {
                MatRef::new(&a, k, m).t()
            } else {
                MatRef::new(&a, m, k)
            };
            let br = if tb {
                MatRef::new(&b, n, k).t()
            } else {
                MatRef::new(&b, k, n)
            };
            let want = gemm_reference(ar, br);
            let got = matmul_once(gpu, &a, &b, (m, k, n), (ta, tb))
                .await
                .expect("matmul runs");
            let err = rel_err(&got, &want);
            assert!(
                err < 1e-4,
                "matmul {m}x{k}x{n} ta={ta} tb={tb}: relative error {err}"
            );
        }
    }
}

/// Loss and every parameter gradient, GPU against CPU, for each model of [`models`] and
/// [`lm_models`].
pub async fn gradients_match_cpu(gpu: &Gpu) {
    for (name, spec) in models().into_iter().chain(lm_models()) {
        let model = Model::new(spec).expect("valid model");
        let mut params = model.init_params(5);
        if model.is_language_model() {
            // Also away from initialization, where attention is far from uniform.
            perturb(&model, &mut params, 0.3, 7);
        }
        let (x, y) = batch_for(&model, 6);
        let opt = Optimizer::adam(1e-3);
        let mut cpu = CpuBackend::new(model.clone(), opt, params.clone()).expect("cpu backend");
        let mut gpu_b = GpuBackend::new(gpu, model, opt, &params, BATCH).expect("gpu backend");
        let (cl, cg) = cpu.gradients(&x, &y).await.expect("cpu gradients");
        let (gl, gg) = gpu_b.gradients(&x, &y).await.expect("gpu gradients");
        let loss_err = (cl - gl).abs() / cl.abs().max(1e-6);
        assert!(loss_err < 1e-3, "{name}: loss cpu {cl} gpu {gl}");
        for t in &gpu_b.model().tensors {
            let err = rel_err(&gg[t.range()], &cg[t.range()]);
            assert!(
                err < 1e-3,
                "{name}: gradient of {} differs, relative error {err}",
                t.name
            );
        }
    }
}

/// A second backend on a device reuses the pipelines the first compiled (a browser
/// compiles each at its first use: seconds a backend in software), and trains as the
/// first does.
pub async fn backends_on_one_device_share_their_kernels(gpu: &Gpu) {
    let (_, spec) = models().into_iter().nth(4).expect("conv+pool model");
    let model = Model::new(spec).expect("valid model");
    let params = model.init_params(3);
    let held = || {
        let slot = gpu.kernels.lock().expect("kernels lock");
        let k = slot
            .as_ref()
            .expect("a backend hands its kernels to the device");
        let im2col = k.conv.as_ref().map(|c| c.im2col.clone());
        (im2col, k.optimizer.clone(), k.matmul.clone())
    };
    let opt = Optimizer::adam(1e-3);
    let mut first = GpuBackend::new(gpu, model.clone(), opt, &params, BATCH).expect("gpu backend");
    let compiled = held();
    assert!(
        !compiled.2.is_empty() && compiled.0.is_some(),
        "the model's matrix products and convolution kernels compiled"
    );
    let mut second = GpuBackend::new(gpu, model.clone(), opt, &params, BATCH).expect("gpu backend");
    assert!(
        held() == compiled,
        "the second backend compiled its kernels again"
    );
    let (x, y) = batch_for(&model, 4);
    let (l1, g1) = first.gradients(&x, &y).await.expect("gradients");
    let (l2, g2) = second.gradients(&x, &y).await.expect("gradients");
    assert_eq!((l1.to_bits(), g1), (l2.to_bits(), g2));
}

/// A backend compiles the kernels of the layers its model has: a multilayer perceptron's
/// none of the convolutions' and poolings' (a page training one waits for four kernels
/// fewer to compile), and a convolutional model's, when it comes, all of them.
pub async fn kernels_are_compiled_for_the_layers_a_model_has(gpu: &Gpu) {
    let slot = || {
        gpu.kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    // The convolution kernels earlier backends on this device compiled are set aside (the
    // rest stay: software WebGPU takes seconds to compile them again).
    drop(slot().as_mut().and_then(|k| k.conv.take()));
    let conv_compiled = || {
        slot()
            .as_ref()
            .expect("a backend hands its kernels to the device")
            .conv
            .is_some()
    };
    let opt = Optimizer::adam(1e-3);
    let (_, spec) = models().into_iter().nth(1).expect("dense+relu model");
    let mlp = Model::new(spec).expect("valid model");
    let mut backend =
        GpuBackend::new(gpu, mlp.clone(), opt, &mlp.init_params(3), BATCH).expect("gpu backend");
    assert!(
        !conv_compiled(),
        "a multilayer perceptron's backend compiled the convolution kernels"
    );
    let (x, y) = batch_for(&mlp, 4);
    backend.gradients(&x, &y).await.expect("gradients");
    let (_, spec) = models().into_iter().nth(4).expect("conv+pool model");
    let cnn = Model::new(spec).expect("valid model");
    let mut backend =
        GpuBackend::new(gpu, cnn.clone(), opt, &cnn.init_params(3), BATCH).expect("gpu backend");
    assert!(
        conv_compiled(),
        "a convolutional model's backend compiled its kernels"
    );
    let (x, y) = batch_for(&cnn, 4);
    backend.gradients(&x, &y).await.expect("gradients");
}

/// Several whole training steps, SGD-momentum and Adam on a convolutional model, AdamW
/// with weight decay and an active gradient clip on a language model: the GPU's
/// parameters stay with the CPU's.
pub async fn training_steps_match_cpu(gpu: &Gpu) {
    let (_, conv) = models().into_iter().nth(4).expect("conv+pool model");
    let (_, lm) = lm_models().into_iter().nth(1).expect("tied language model");
    for (spec, opt) in [
        (
            conv.clone(),
            Optimizer::Sgd {
                lr: 0.05,
                momentum: 0.9,
            },
        ),
        (conv, Optimizer::adam(1e-3)),
        // A clip of 0.05 is below this model's gradient norm: every step is clipped. An
        // epsilon of 1e-3: coordinates whose gradient is at the rounding level (Adam would
        // move them by a full step of either sign, on either backend) stay put.
        (
            lm,
            Optimizer::AdamW {
                lr: 3e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-3,
                weight_decay: 0.1,
                clip: 0.05,
            },
        ),
    ] {
        let model = Model::new(spec).expect("valid model");
        let mut params = model.init_params(8);
        if model.is_language_model() {
            // Away from initialization, where attention is nearly uniform and the query
            // and key gradients are so small that Adam's sign-like first steps would
            // follow rounding noise on either backend.
            perturb(&model, &mut params, 0.3, 9);
        }
        let mut cpu = CpuBackend::new(model.clone(), opt, params.clone()).expect("cpu backend");
        let mut gpu_b =
            GpuBackend::new(gpu, model.clone(), opt, &params, BATCH).expect("gpu backend");
        let cp = steps_agree(&mut cpu, &mut gpu_b, &model, 100..105, &format!("{opt:?}")).await;
        let moved = rel_err(&cp, &params);
        assert!(
            moved > 1e-3,
            "{opt:?}: training did not move the parameters"
        );
    }
}

/// Runs the batches `seeds` on both backends, checks that the last loss and the weights
/// agree (relative error below 1e-3), and returns the CPU's weights.
async fn steps_agree(
    cpu: &mut CpuBackend,
    gpu: &mut GpuBackend,
    model: &Model,
    seeds: std::ops::Range<u64>,
    what: &str,
) -> Vec<f32> {
    for s in seeds {
        let (x, y) = batch_for(model, s);
        cpu.step(&x, &y).expect("cpu step");
        gpu.step(&x, &y).expect("gpu step");
    }
    let (cl, gl) = (
        cpu.loss().await.expect("cpu loss"),
        gpu.loss().await.expect("gpu loss"),
    );
    assert!(
        (cl - gl).abs() / cl.abs().max(1e-6) < 1e-3,
        "{what}: last loss cpu {cl} gpu {gl}"
    );
    let (cp, gp) = (
        cpu.params().await.expect("cpu params"),
        gpu.params().await.expect("gpu params"),
    );
    let err = rel_err(&gp, &cp);
    assert!(err < 1e-3, "{what}: weights differ, relative error {err}");
    cp
}

/// What a swarm peer does to its backend round after round — load the round's weights,
/// set the round's learning rate, a few steps, read the loss and the weights — gives the
/// same weights on both backends, round after round (the optimizer's state carries on
/// across loads on both).
pub async fn peer_rounds_match_cpu(gpu: &Gpu) {
    let model = Model::new(ModelSpec::mlp_digits()).expect("valid model");
    let opt = Optimizer::adam(1e-3);
    let params = model.init_params(3);
    let mut cpu = CpuBackend::new(model.clone(), opt, params.clone()).expect("cpu backend");
    let mut gpu_b = GpuBackend::new(gpu, model.clone(), opt, &params, BATCH).expect("gpu backend");
    let mut weights = params;
    for round in 0..6u64 {
        // The round's weights: what the last round trained, moved a little (the outer
        // step), loaded on both.
        for (i, w) in weights.iter_mut().enumerate() {
            *w *= 1.0 - 0.01 * ((i as u64 + round) % 3) as f32;
        }
        cpu.load_weights(&weights).expect("cpu load");
        gpu_b.load_weights(&weights).expect("gpu load");
        let lr = 1e-3 * (1.0 - 0.1 * round as f32);
        cpu.set_learning_rate(lr).expect("cpu lr");
        gpu_b.set_learning_rate(lr).expect("gpu lr");
        let cp = steps_agree(
            &mut cpu,
            &mut gpu_b,
            &model,
            10 * round..10 * round + 3,
            &format!("round {round}"),
        )
        .await;
        weights = cp;
    }
}

/// A batch with NaN or infinity makes the step fail loudly and leaves the weights as
/// they were, on the given backend; NaN weights are refused outright.
pub async fn non_finite_never_passes<B: Backend>(backend: &mut B) {
    let model = backend.model().clone();
    let before = backend.params().await.expect("params");
    let mut bad = before.clone();
    bad[0] = f32::NAN;
    assert!(
        matches!(backend.set_params(&bad), Err(EngineError::BadParams(_))),
        "NaN weights accepted"
    );
    for poison in [f32::NAN, f32::INFINITY] {
        let (mut x, y) = batch_for(&model, 9);
        x[1] = poison;
        // The CPU refuses at once; the GPU skips the update on the device and reports it
        // when the loss is read.
        let stepped = backend.step(&x, &y);
        let loss = backend.loss().await;
        assert!(
            matches!(stepped, Err(EngineError::NonFinite(_)))
                || matches!(loss, Err(EngineError::NonFinite(_))),
            "{}: a {poison} input passed silently (step {stepped:?}, loss {loss:?})",
            backend.name()
        );
        let after = backend.params().await.expect("params");
        assert_eq!(
            before,
            after,
            "{}: a {poison} input changed the weights",
            backend.name()
        );
        // A bad step followed by a good one before the loss is read: still reported (the
        // GPU cleared its flag at each step, and only a bad last step was).
        let bad = backend.step(&x, &y);
        let (gx, gy) = batch_for(&model, 10);
        let good = backend.step(&gx, &gy);
        let loss = backend.loss().await;
        assert!(
            matches!(bad, Err(EngineError::NonFinite(_)))
                || matches!(loss, Err(EngineError::NonFinite(_))),
            "{}: a {poison} step followed by a good one passed silently (good {good:?}, loss \
             {loss:?})",
            backend.name()
        );
        // And once reported, it is over: the next run reads its own loss (nothing but the
        // readback lowered the GPU's flag here).
        backend.step(&gx, &gy).expect("a good step");
        assert!(
            backend.loss().await.is_ok_and(f32::is_finite),
            "{}: the flag outlived its readback",
            backend.name()
        );
        backend.set_params(&before).expect("finite weights");
    }
}

/// The GPU side of [`non_finite_never_passes`], for the first test model.
pub async fn gpu_non_finite_never_passes(gpu: &Gpu) {
    let (_, spec) = models().into_iter().nth(2).expect("conv model");
    let model = Model::new(spec).expect("valid model");
    let params = model.init_params(3);
    let mut b =
        GpuBackend::new(gpu, model, Optimizer::adam(1e-3), &params, BATCH).expect("gpu backend");
    non_finite_never_passes(&mut b).await;
}

/// A model whose grid is wider in one dimension than the device takes is not built on
/// it, and [`crate::engine::train::backend`] trains it on the CPU: a dense layer of one
/// unit more than the device's workgroups per dimension (its bias gradient has a
/// workgroup per unit). Where the device takes more than a layer may have units, there is
/// nothing to check.
pub async fn gpu_refuses_grids_past_its_limits(gpu: &Gpu) {
    let most = gpu.device.limits().max_compute_workgroups_per_dimension as usize;
    let units = most + 1;
    if units > super::MAX_ACTIVATION {
        eprintln!(
            "skipped: this device takes {most} workgroups per dimension, a model past that \
             is past the engine's own limits"
        );
        return;
    }
    let spec = ModelSpec {
        input: [1, 1, 1],
        layers: vec![LayerSpec::Dense { units }, LayerSpec::Dense { units: 1 }],
    };
    let model = Model::new(spec).expect("valid model");
    let params = model.init_params(5);
    let built = GpuBackend::new(gpu, model.clone(), Optimizer::adam(1e-3), &params, 1);
    assert!(
        matches!(built, Err(EngineError::Unsupported(_))),
        "a grid of {units} workgroups was built"
    );
    // The refused build handed the kernels it took (and compiled) back to the device (its
    // guard does, on this early return as on every other).
    let held = gpu
        .kernels
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .is_some_and(|k| !k.matmul.is_empty());
    assert!(held, "a refused build kept the device's kernels");
    let b = super::train::backend(model, Some(gpu), Optimizer::adam(1e-3), params, 1)
        .expect("a backend");
    assert_eq!(b.name(), "cpu", "it trains on the CPU instead");
}

/// Specs whose sizes multiply past 2^32 are refused in every build (the browser's is 32
/// bits: there they wrapped to small sizes that passed).
pub async fn specs_past_32_bits_are_refused() {
    use LayerSpec::{Conv2d, Embedding, LmHead, TransformerBlock};
    let mut layers = vec![Embedding {
        vocab: 256,
        dim: 4096,
    }];
    layers.extend((0..16).map(|_| TransformerBlock {
        heads: 1,
        mlp_ratio: 8,
    }));
    layers.push(LmHead { tied: true });
    let lm = ModelSpec {
        input: [1, 1, 1],
        layers,
    };
    let conv = ModelSpec {
        input: [2048, 2048, 1],
        layers: vec![
            Conv2d {
                filters: 1024,
                kernel: 1,
                stride: 1,
                padding: 0,
            },
            LayerSpec::Flatten,
            LayerSpec::Dense { units: 2 },
        ],
    };
    for spec in [lm, conv] {
        assert!(Model::new(spec.clone()).is_err(), "{spec:?} was taken");
    }
}

/// The CPU side of [`non_finite_never_passes`].
pub async fn cpu_non_finite_never_passes() {
    let (_, spec) = models().into_iter().nth(2).expect("conv model");
    let model = Model::new(spec).expect("valid model");
    let params = model.init_params(3);
    let mut b = CpuBackend::new(model, Optimizer::adam(1e-3), params).expect("cpu backend");
    non_finite_never_passes(&mut b).await;
}

/// The CPU reference's analytic gradients against central finite differences (in f64
/// over the f32 loss), on every model at 24 random coordinates each; language models
/// are checked tensor by tensor (see [`cpu_lm_gradients_match_finite_differences`]).
pub async fn cpu_gradients_match_finite_differences() {
    for (name, spec) in models() {
        let model = Model::new(spec).expect("valid model");
        let params = model.init_params(21);
        let (x, y) = batch_for(&model, 22);
        let mut cpu =
            CpuBackend::new(model.clone(), Optimizer::adam(1e-3), params.clone()).expect("cpu");
        let (_, grads) = cpu.gradients(&x, &y).await.expect("gradients");
        let gmax = grads.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let mut rng = SplitMix64::new(23);
        let real: Vec<usize> = model.tensors.iter().flat_map(|t| t.range()).collect();
        for _ in 0..24 {
            let i = real[rng.below(real.len())];
            let h = 1e-3f32;
            let mut loss_at = |v: f32| {
                let mut p = params.clone();
                p[i] = v;
                cpu.set_params(&p).expect("finite");
                pollster_free_loss(&mut cpu, &x, &y)
            };
            let fd = (f64::from(loss_at(params[i] + h)) - f64::from(loss_at(params[i] - h)))
                / (2.0 * f64::from(h));
            let err = (fd as f32 - grads[i]).abs();
            assert!(
                err <= 2e-3 * gmax.max(1e-3) + 1e-3 * grads[i].abs(),
                "{name}: parameter {i}: analytic {} vs finite difference {fd}",
                grads[i]
            );
        }
    }
}

/// Language models, tensor by tensor: at random parameters (the initialization plus
/// noise of 0.3, so that attention is far from uniform and every tensor's gradient is
/// well above the f32 loss's rounding), the derivative along a random direction within
/// each tensor against a central difference, within 2% of the tensor's gradient norm;
/// and three single coordinates per tensor within 3% of the tensor's largest gradient.
pub async fn cpu_lm_gradients_match_finite_differences() {
    for (name, spec) in lm_models() {
        let model = Model::new(spec).expect("valid model");
        let mut rng = SplitMix64::new(31);
        let mut params = model.init_params(30);
        perturb(&model, &mut params, 0.3, 33);
        let (x, y) = batch_for(&model, 32);
        let mut cpu =
            CpuBackend::new(model.clone(), Optimizer::adam(1e-3), params.clone()).expect("cpu");
        let (_, grads) = cpu.gradients(&x, &y).await.expect("gradients");
        let mut loss_along = |dir: &[(usize, f32)], h: f32| {
            let mut p = params.clone();
            for &(i, v) in dir {
                p[i] += h * v;
            }
            cpu.set_params(&p).expect("finite");
            f64::from(pollster_free_loss(&mut cpu, &x, &y))
        };
        for t in &model.tensors {
            let g = &grads[t.range()];
            let norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
            let gmax = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(norm > 1e-3, "{name}: {} has no gradient ({norm})", t.name);
            // A unit random direction within the tensor.
            let mut dir: Vec<(usize, f32)> = t.range().map(|i| (i, rng.normal_f32())).collect();
            let len = dir.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
            dir.iter_mut().for_each(|(_, v)| *v /= len);
            let h = 1e-2f32;
            let fd = (loss_along(&dir, h) - loss_along(&dir, -h)) / (2.0 * f64::from(h));
            let analytic: f32 = dir.iter().map(|&(i, v)| grads[i] * v).sum();
            assert!(
                (fd as f32 - analytic).abs() <= 0.02 * norm,
                "{name}: {} along a random direction: analytic {analytic} vs finite \
                 difference {fd} (gradient norm {norm})",
                t.name
            );
            for _ in 0..3 {
                let i = t.offset + rng.below(t.len());
                let fd = (loss_along(&[(i, 1.0)], h) - loss_along(&[(i, 1.0)], -h))
                    / (2.0 * f64::from(h));
                assert!(
                    (fd as f32 - grads[i]).abs() <= 0.03 * gmax,
                    "{name}: {} element {}: analytic {} vs finite difference {fd}",
                    t.name,
                    i - t.offset,
                    grads[i]
                );
            }
        }
    }
}

fn pollster_free_loss(cpu: &mut CpuBackend, x: &[f32], y: &[u8]) -> f32 {
    let n = y.len();
    let classes = cpu.model().classes();
    let logits = cpu.logits(x, n / cpu.model().positions()).to_vec();
    let mut total = 0.0f64;
    for (row, &label) in logits.chunks_exact(classes).zip(y) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        total += sum.ln() - f64::from(row[usize::from(label)] - max);
    }
    (total / n as f64) as f32
}

/// The same seed gives bit-identical parameters after a CPU training step; another seed
/// does not.
pub async fn cpu_step_is_deterministic() {
    let (_, spec) = models().into_iter().nth(4).expect("model");
    let model = Model::new(spec).expect("valid model");
    let run = |seed: u64| {
        let params = model.init_params(seed);
        let mut cpu = CpuBackend::new(model.clone(), Optimizer::adam(1e-2), params).expect("cpu");
        let (x, y) = batch_for(&model, seed);
        cpu.step(&x, &y).expect("step");
        cpu.params_slice().to_vec()
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a, b, "same seed, different result");
    assert_ne!(a, c, "different seeds, same result");
}

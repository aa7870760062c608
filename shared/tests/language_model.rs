//! The CPU backend trains a byte-level transformer: AdamW's decay and clipping do what
//! the docs say, a small model learns text, and batches that are not token ids are
//! refused.

use shoal_shared::dataset::Dataset;
use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::train::{Samples, Trainer};
use shoal_shared::engine::{Backend, EngineError, LayerSpec, Model, ModelSpec, Optimizer};

fn small_lm(context: usize) -> ModelSpec {
    ModelSpec {
        input: [1, context, 1],
        layers: vec![
            LayerSpec::Embedding {
                vocab: 256,
                dim: 32,
            },
            LayerSpec::TransformerBlock {
                heads: 2,
                mlp_ratio: 4,
            },
            LayerSpec::LayerNorm,
            LayerSpec::LmHead { tied: true },
        ],
    }
}

fn text_samples(text: &str, context: usize) -> Samples {
    Samples::from_dataset(&Dataset::from_text(text.as_bytes(), context).expect("text"))
}

#[test]
fn one_adamw_step_clips_the_global_norm_then_decays_only_matrices() {
    let model = Model::new(small_lm(8)).expect("valid");
    let params = model.init_params(3);
    let data = text_samples(&"shoal trains in browsers. ".repeat(8), 8);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    data.gather(&[0, 1], &mut x, &mut y);
    let mut probe =
        CpuBackend::new(model.clone(), Optimizer::adam(1e-3), params.clone()).expect("cpu");
    let (_, g) = pollster::block_on(probe.gradients(&x, &y)).expect("gradients");
    let norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
    // With eps = 1, the first Adam step is lr * g / (|g| + 1): it shows the clipped
    // gradient's size (with the usual tiny eps it would be lr * sign(g) either way).
    let (lr, wd, clip) = (0.01f32, 0.1f32, 0.25 * norm);
    let opt = Optimizer::AdamW {
        lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1.0,
        weight_decay: wd,
        clip,
    };
    let mut cpu = CpuBackend::new(model.clone(), opt, params.clone()).expect("cpu");
    cpu.step(&x, &y).expect("step");
    let got = cpu.params_slice();
    for t in &model.tensors {
        let decays = t.shape.len() >= 2;
        for i in t.range() {
            let gc = g[i] * 0.25;
            let mut want = params[i];
            if decays {
                want *= 1.0 - lr * wd;
            }
            want -= lr * gc / (gc.abs() + 1.0);
            assert!(
                (got[i] - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                "{} element {}: got {} want {want} (decays: {decays})",
                t.name,
                i - t.offset,
                got[i]
            );
        }
    }
}

#[test]
fn a_small_transformer_learns_text_on_the_cpu() {
    let text = "It was the best of times, it was the worst of times, it was the age of \
                wisdom, it was the age of foolishness. "
        .repeat(40);
    let context = 16;
    let data = text_samples(&text, context);
    let (train, test) = (data.take(data.len() - 8), {
        let all = Dataset::from_text(text.as_bytes(), context).expect("text");
        let (_, tail) = all.split_off_tail(8);
        Samples::from_dataset(&tail)
    });
    let model = Model::new(small_lm(context)).expect("valid");
    let init = model.init_params(7);
    let bits = |params: Vec<f32>| {
        let mut eval = CpuBackend::new(model.clone(), Optimizer::adam(1e-3), params).expect("cpu");
        let (nats, _) = eval
            .evaluate(&test.inputs, &test.labels, 4)
            .expect("evaluate");
        nats / std::f32::consts::LN_2
    };
    let before = bits(init.clone());
    assert!(
        before > 7.0,
        "an untrained model is near 8 bits per byte: {before}"
    );
    let cpu = CpuBackend::new(model.clone(), Optimizer::adamw(3e-3, 0.1, 1.0), init).expect("cpu");
    let mut trainer = Trainer::new(cpu, train, 8, 1).expect("trainer");
    trainer.run(300).expect("train");
    let after = bits(pollster::block_on(trainer.backend.params()).expect("params"));
    assert!(
        after < 1.0,
        "300 steps on a repeated sentence: {before:.2} -> {after:.2} bits per byte"
    );
}

#[test]
fn batches_that_are_not_token_ids_are_refused() {
    let model = Model::new(small_lm(4)).expect("valid");
    let mut cpu =
        CpuBackend::new(model.clone(), Optimizer::adam(1e-3), model.init_params(1)).expect("cpu");
    let labels = [1u8, 2, 3, 4];
    for bad in [3.5f32, 256.0, -1.0, f32::NAN] {
        let x = [65.0, bad, 66.0, 67.0];
        assert!(
            matches!(cpu.step(&x, &labels), Err(EngineError::BadBatch(_))),
            "input {bad} accepted"
        );
    }
    // One label per position: three labels for a context of four is refused.
    assert!(matches!(
        cpu.step(&[65.0, 66.0, 67.0, 68.0], &labels[..3]),
        Err(EngineError::BadBatch(_))
    ));
    cpu.step(&[65.0, 66.0, 67.0, 68.0], &labels)
        .expect("a good batch");
}

#[test]
fn a_trained_model_continues_its_text_and_sampling_is_seeded() {
    let sentence = "It was the best of times, it was the worst of times. ";
    let text = sentence.repeat(60);
    let context = 16;
    let data = text_samples(&text, context);
    let model = Model::new(small_lm(context)).expect("valid");
    let cpu = CpuBackend::new(
        model.clone(),
        Optimizer::adamw(3e-3, 0.1, 1.0),
        model.init_params(7),
    )
    .expect("cpu");
    let mut trainer = Trainer::new(cpu, data, 8, 1).expect("trainer");
    trainer.run(300).expect("train");
    let mut cpu = trainer.backend;
    // Greedy, from a prompt that fills the context: the continuation is the training
    // text's.
    let prompt = "best of times, it was the";
    let out = cpu
        .generate(prompt.as_bytes(), 16, 0.0, 1)
        .expect("generate");
    let whole = format!("{prompt}{}", String::from_utf8_lossy(&out));
    assert!(
        text.contains(&whole),
        "greedy continuation {whole:?} is not in the training text"
    );
    // Sampling: the same seed gives the same bytes; the prompt may be longer than the
    // context or empty.
    let long = sentence.repeat(2);
    let a = cpu.generate(long.as_bytes(), 30, 0.8, 5).expect("sample");
    assert_eq!(
        a,
        cpu.generate(long.as_bytes(), 30, 0.8, 5).expect("sample")
    );
    assert_eq!(a.len(), 30);
    assert_eq!(cpu.generate(b"", 5, 1.0, 9).expect("sample").len(), 5);
    // A classifier does not generate.
    let mlp = Model::new(ModelSpec::mlp_digits()).expect("mlp");
    let mut c =
        CpuBackend::new(mlp.clone(), Optimizer::adam(1e-3), mlp.init_params(1)).expect("cpu");
    assert!(c.generate(b"x", 3, 0.0, 1).is_err());
}

/// A simulated swarm of a language model: `[model]` given inline, a target in bits per
/// byte, the task's AdamW recipe.
fn lm_scenario(extra: &str) -> String {
    format!(
        r#"
name = "lm-test"
seed = 3
peers = 3
rounds = 12
target_bits_per_byte = 3.0
eval_every = 4
{extra}

[model]
input = [1, 16, 1]
layers = [
  {{ type = "embedding", vocab = 256, dim = 32 }},
  {{ type = "transformer_block", heads = 2, mlp_ratio = 4 }},
  {{ type = "layer_norm" }},
  {{ type = "lm_head", tied = true }},
]

[train]
batch = 8
optimizer = "adamw"
lr = 0.003
weight_decay = 0.1
clip = 1.0

[learn]
local_steps = 10
outer_lr = 1.0
outer_momentum = 0.0
neighbours = 2
aggregation = {{ type = "mean" }}
compression = {{ type = "int8", block = 256 }}
max_staleness = 2
max_norm_ratio = 3.0
round_deadline_ms = 2000

[network]
samples_per_s = [200, 400]
"#
    )
}

#[test]
fn a_simulated_swarm_trains_a_language_model_to_its_bits_per_byte_target() {
    use shoal_shared::learn::sim::{self, Scenario};
    let text = "It was the best of times, it was the worst of times, it was the age of \
                wisdom, it was the age of foolishness. "
        .repeat(40);
    let all = Dataset::from_text(text.as_bytes(), 16).expect("text");
    let (train, test) = all.split_off_tail(8);
    let (train, test) = (Samples::from_dataset(&train), Samples::from_dataset(&test));
    let sc = Scenario::from_toml(&lm_scenario("")).expect("valid");
    let r = sim::run(&sc, &train, &test).expect("runs");
    let bits: Vec<f32> = r
        .rows
        .iter()
        .map(|r| r.bits_per_byte.expect("text"))
        .collect();
    assert!(bits[0] > bits[bits.len() - 1], "the swarm learns: {bits:?}");
    assert!(
        r.samples_to_target.is_some(),
        "a repeated sentence falls below 3 bits per byte: {bits:?}"
    );
}

#[test]
fn text_scenarios_are_validated_with_the_field_named() {
    use shoal_shared::learn::sim::Scenario;
    let no_target = lm_scenario("").replace("target_bits_per_byte = 3.0", "");
    let e = Scenario::from_toml(&no_target).expect_err("an LM needs a bits target");
    assert!(e.contains("target_bits_per_byte"), "{e}");
    let e = Scenario::from_toml(&lm_scenario("").replace("= 3.0", "= 9.0")).expect_err("9 bits");
    assert!(e.contains("target_bits_per_byte"), "{e}");
    let skew = lm_scenario("\n[data]\ntype = \"label_skew\"\nclasses = 2\n");
    let e = Scenario::from_toml(&skew).expect_err("label skew of text");
    assert!(e.contains("label_skew"), "{e}");
    let e = Scenario::from_toml(
        &lm_scenario("").replace("weight_decay = 0.1", "weight_decay = 0.1\nmomentum = 0.5"),
    )
    .expect_err("momentum for adamw");
    assert!(e.contains("train.momentum"), "{e}");
}

#[test]
fn a_spread_subset_is_evenly_spaced_and_keeps_whole_windows() {
    // Forty different windows: window i is eight copies of the letter i (mod 26).
    let text: String = (0..320)
        .map(|i| char::from(b'a' + (i / 8 % 26) as u8))
        .collect();
    let data = text_samples(&text, 8);
    let n = data.len();
    let sub = data.spread(4);
    assert_eq!(sub.len(), 4);
    assert_eq!(sub.positions, 8);
    for (k, i) in [0, n / 4, n / 2, 3 * n / 4].into_iter().enumerate() {
        assert_eq!(
            sub.inputs[k * 8..(k + 1) * 8],
            data.inputs[i * 8..(i + 1) * 8]
        );
        assert_eq!(
            sub.labels[k * 8..(k + 1) * 8],
            data.labels[i * 8..(i + 1) * 8]
        );
    }
    assert_eq!(data.spread(10 * n).len(), n, "never more than the set");
}

//! The plain training loop shared by tests, benchmarks and peers: shuffled mini-batches
//! over a data set held in memory.

use super::cpu::CpuBackend;
use super::gpu::GpuBackend;
use super::{AnyBackend, Backend, EngineError, Model, ModelSpec, Optimizer};
use crate::dataset::Dataset;
use crate::gpu::Gpu;
use crate::rng::SplitMix64;

/// The swarm's inner learning-rate schedule: a half-cosine from `lr` down to 10% of it
/// over `decay_rounds` rounds of the model, then flat (0: constant). Every peer derives
/// it from the model version, so the swarm settles together.
pub fn swarm_lr(lr: f32, round: u64, decay_rounds: u64) -> f32 {
    if decay_rounds == 0 {
        return lr;
    }
    let x = (round as f32 / decay_rounds as f32).min(1.0);
    lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * x).cos()))
}

/// Held-out predictions a peer evaluates after each round (a text window holds one per
/// position: 256 windows of the demo LM; the digits' 2,000 test images all fit). The whole
/// split would cost a text peer more time than its round's training.
pub const ROUND_EVAL_PREDICTIONS: usize = 16_384;

/// A data set as the engine consumes it: normalized inputs (or token ids) and labels.
#[derive(Clone, Debug)]
pub struct Samples {
    /// `len() * dim` inputs.
    pub inputs: Vec<f32>,
    /// `positions` labels per sample.
    pub labels: Vec<u8>,
    /// Values per sample.
    pub dim: usize,
    /// Sample shape `[height, width, channels]` (its product is `dim`).
    pub shape: [usize; 3],
    /// Labels per sample: 1 for images, the context for text (the next byte at every
    /// position).
    pub positions: usize,
}

impl Samples {
    /// Pixels scaled to `[0, 1]`; text bytes as token ids.
    pub fn from_dataset(d: &Dataset) -> Self {
        let inputs = if d.text {
            d.pixels.iter().map(|&b| f32::from(b)).collect()
        } else {
            super::normalize_pixels(&d.pixels)
        };
        Self {
            inputs,
            labels: d.labels.clone(),
            dim: d.rows * d.cols,
            shape: [d.rows, d.cols, 1],
            positions: d.positions(),
        }
    }

    /// Reads one split of a task's IDX data: `DIR/TASK/SPLIT-images.idx` and
    /// `DIR/TASK/SPLIT-labels.idx` (the layout `cargo xtask data` writes), validated.
    pub fn read_split(dir: &std::path::Path, task: &str, split: &str) -> Result<Self, String> {
        let d = Dataset::read_idx_files(
            &dir.join(format!("{task}/{split}-images.idx")),
            &dir.join(format!("{task}/{split}-labels.idx")),
            10,
        )?;
        Ok(Self::from_dataset(&d))
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len() / self.positions.max(1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` samples.
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            inputs: self.inputs[..n * self.dim].to_vec(),
            labels: self.labels[..n * self.positions].to_vec(),
            ..*self
        }
    }

    /// Copies the samples at `idx` into `x` and `y` (cleared first).
    pub fn gather(&self, idx: &[usize], x: &mut Vec<f32>, y: &mut Vec<u8>) {
        x.clear();
        y.clear();
        let per = self.positions;
        for &i in idx {
            x.extend_from_slice(&self.inputs[i * self.dim..(i + 1) * self.dim]);
            y.extend_from_slice(&self.labels[i * per..(i + 1) * per]);
        }
    }

    /// The fixed held-out subset a peer evaluates after every round: at most
    /// [`ROUND_EVAL_PREDICTIONS`] predictions, evenly spaced (see [`spread`](Self::spread)).
    pub fn round_eval_subset(&self) -> Samples {
        self.spread(ROUND_EVAL_PREDICTIONS / self.positions.max(1))
    }

    /// At most `max` samples (at least one), evenly spaced over the set in order (all
    /// of them when there are no more): a fixed, representative subset, so that evaluations of successive
    /// models on it are comparable.
    pub fn spread(&self, max: usize) -> Samples {
        let n = self.len();
        let k = n.min(max.max(1));
        let idx: Vec<usize> = (0..k).map(|i| i * n / k).collect();
        let (mut inputs, mut labels) = (Vec::new(), Vec::new());
        self.gather(&idx, &mut inputs, &mut labels);
        Samples {
            inputs,
            labels,
            ..*self
        }
    }

    /// Like [`gather`](Self::gather), but each image is translated by a random offset of
    /// up to `max_shift` pixels in each direction (zero fill): the classic augmentation
    /// that keeps a small training set from being memorized.
    pub fn gather_shifted(
        &self,
        idx: &[usize],
        max_shift: usize,
        rng: &mut SplitMix64,
        x: &mut Vec<f32>,
        y: &mut Vec<u8>,
    ) {
        if self.positions != 1 {
            // Text: nothing to translate.
            self.gather(idx, x, y);
            return;
        }
        let [h, w, c] = self.shape;
        x.clear();
        x.resize(idx.len() * self.dim, 0.0);
        y.clear();
        let span = 2 * max_shift + 1;
        for (k, &i) in idx.iter().enumerate() {
            let dy = rng.below(span) as isize - max_shift as isize;
            let dx = rng.below(span) as isize - max_shift as isize;
            let src = &self.inputs[i * self.dim..(i + 1) * self.dim];
            let dst = &mut x[k * self.dim..(k + 1) * self.dim];
            for r in 0..h {
                let sr = r as isize - dy;
                if sr < 0 || sr >= h as isize {
                    continue;
                }
                for col in 0..w {
                    let sc = col as isize - dx;
                    if sc < 0 || sc >= w as isize {
                        continue;
                    }
                    let (d, s) = ((r * w + col) * c, (sr as usize * w + sc as usize) * c);
                    dst[d..d + c].copy_from_slice(&src[s..s + c]);
                }
            }
            y.push(self.labels[i]);
        }
    }
}

/// How a training run is shaped.
#[derive(Clone, Copy, Debug)]
pub struct FitConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Samples per step.
    pub batch: usize,
    /// Peak learning rate; it follows a half-cosine from here down to 2% of it over the
    /// run, which settles the weights at the end instead of leaving them noisy.
    pub lr: f32,
    /// Seed of the batch order and augmentation.
    pub seed: u64,
    /// Random translation of up to this many pixels (0: none).
    pub shift: usize,
}

/// Runs `cfg.epochs` passes over `data` in shuffled batches (the last partial batch of
/// each epoch is dropped, so every step has the same shape). Reads the loss back once
/// per epoch and returns the last one.
pub async fn fit<B: Backend>(
    backend: &mut B,
    data: &Samples,
    cfg: FitConfig,
) -> Result<f32, EngineError> {
    let mut rng = SplitMix64::new(cfg.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut loss = f32::NAN;
    let steps_per_epoch = data.len() / cfg.batch;
    let total = (cfg.epochs * steps_per_epoch).max(1) as f32;
    let mut step = 0usize;
    for _ in 0..cfg.epochs {
        rng.shuffle(&mut order);
        for idx in order.chunks_exact(cfg.batch) {
            let progress = step as f32 / total;
            let lr = cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()));
            backend.set_learning_rate(lr)?;
            if cfg.shift > 0 {
                data.gather_shifted(idx, cfg.shift, &mut rng, &mut x, &mut y);
            } else {
                data.gather(idx, &mut x, &mut y);
            }
            backend.step(&x, &y)?;
            step += 1;
        }
        loss = backend.loss().await?;
    }
    Ok(loss)
}

/// An endless stream of training steps over one data set: reshuffles at each epoch's end.
/// This is what a peer's training loop (and the throughput benchmark) drives.
pub struct Trainer<B: Backend> {
    /// The backend being trained.
    pub backend: B,
    data: Samples,
    batch: usize,
    rng: SplitMix64,
    order: Vec<usize>,
    cursor: usize,
    x: Vec<f32>,
    y: Vec<u8>,
    shift: usize,
    /// Steps taken so far.
    pub steps: u64,
}

impl<B: Backend> Trainer<B> {
    /// A trainer drawing batches of `batch` from `data` in an order seeded by `seed`.
    pub fn new(backend: B, data: Samples, batch: usize, seed: u64) -> Result<Self, EngineError> {
        if batch == 0 || batch > data.len() {
            return Err(EngineError::BadBatch(format!(
                "batch {batch} for {} samples",
                data.len()
            )));
        }
        let order = (0..data.len()).collect();
        Ok(Self {
            backend,
            data,
            batch,
            rng: SplitMix64::new(seed),
            order,
            cursor: usize::MAX,
            x: Vec::new(),
            y: Vec::new(),
            shift: 0,
            steps: 0,
        })
    }

    /// Translates every image by up to `pixels` in each direction (see
    /// [`Samples::gather_shifted`]); 0 turns augmentation off.
    pub fn with_shift(mut self, pixels: usize) -> Self {
        self.shift = pixels;
        self
    }

    /// Runs `n` steps (enqueued only, on a GPU backend).
    pub fn run(&mut self, n: usize) -> Result<(), EngineError> {
        for _ in 0..n {
            if self.cursor.saturating_add(self.batch) > self.order.len() {
                self.rng.shuffle(&mut self.order);
                self.cursor = 0;
            }
            let idx = &self.order[self.cursor..self.cursor + self.batch];
            self.cursor += self.batch;
            if self.shift > 0 {
                self.data
                    .gather_shifted(idx, self.shift, &mut self.rng, &mut self.x, &mut self.y);
            } else {
                self.data.gather(idx, &mut self.x, &mut self.y);
            }
            self.backend.step(&self.x, &self.y)?;
            self.steps += 1;
        }
        Ok(())
    }
}

/// A trainer for `spec` with Adam at `lr`, weights initialized from `seed`: on the GPU
/// when `gpu` is given, on the CPU otherwise.
pub fn trainer(
    spec: ModelSpec,
    gpu: Option<&Gpu>,
    data: Samples,
    batch: usize,
    lr: f32,
    seed: u64,
) -> Result<Trainer<AnyBackend>, EngineError> {
    let model = Model::new(spec)?;
    let params = model.init_params(seed);
    let backend = backend(model, gpu, Optimizer::adam(lr), params, batch)?;
    Trainer::new(backend, data, batch, seed)
}

/// A backend for `model` starting from `params`: on the GPU (recorded for steps of
/// `batch` samples) when `gpu` is given and the WGSL backend runs this model and
/// optimizer, on the CPU otherwise (its `name()` says which).
pub fn backend(
    model: Model,
    gpu: Option<&Gpu>,
    opt: Optimizer,
    params: Vec<f32>,
    batch: usize,
) -> Result<AnyBackend, EngineError> {
    if let Some(g) = gpu {
        match GpuBackend::new(g, model.clone(), opt, &params, batch) {
            Ok(b) => return Ok(AnyBackend::Gpu(Box::new(b))),
            Err(EngineError::Unsupported(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(AnyBackend::Cpu(Box::new(CpuBackend::new(
        model, opt, params,
    )?)))
}

/// Trains `backend` with `cfg` and returns the accuracy of its weights on `test`, judged
/// by the CPU reference so that every backend is measured the same way.
pub async fn fit_and_evaluate<B: Backend>(
    backend: &mut B,
    train: &Samples,
    test: &Samples,
    cfg: FitConfig,
) -> Result<f32, EngineError> {
    fit(backend, train, cfg).await?;
    let params = backend.params().await?;
    let mut eval = CpuBackend::new(backend.model().clone(), Optimizer::adam(cfg.lr), params)?;
    Ok(eval.evaluate(&test.inputs, &test.labels, 500)?.1)
}

/// Trains `spec` on the CPU from seed 42 with Adam at peak rate `lr` (batch 64, cosine
/// schedule, shift augmentation) and returns its accuracy on `test`: the recipe behind
/// the accuracy targets, shared by the native and the browser tests.
pub async fn cpu_accuracy(
    spec: ModelSpec,
    lr: f32,
    epochs: usize,
    shift: usize,
    train: &Samples,
    test: &Samples,
) -> Result<f32, EngineError> {
    let model = Model::new(spec)?;
    let params = model.init_params(42);
    let mut cpu = CpuBackend::new(model, Optimizer::adam(lr), params)?;
    let cfg = FitConfig {
        epochs,
        batch: 64,
        lr,
        seed: 7,
        shift,
    };
    fit_and_evaluate(&mut cpu, train, test, cfg).await
}

/// The GPU target's recipe: the demo MLP from seed 42, Adam at 3e-3, one epoch at batch
/// 64, no augmentation; returns its held-out accuracy.
pub async fn gpu_mlp_one_epoch_accuracy(
    gpu: &Gpu,
    train: &Samples,
    test: &Samples,
) -> Result<f32, EngineError> {
    let model = Model::new(ModelSpec::mlp_digits())?;
    let params = model.init_params(42);
    let lr = 3e-3;
    let mut backend = GpuBackend::new(gpu, model, Optimizer::adam(lr), &params, 64)?;
    let cfg = FitConfig {
        epochs: 1,
        batch: 64,
        lr,
        seed: 7,
        shift: 0,
    };
    fit_and_evaluate(&mut backend, train, test, cfg).await
}

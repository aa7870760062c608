//! The training engine: a sequential model described as data, its parameters in one flat
//! `f32` buffer with a named layout, and two backends that train it — a CPU reference
//! (`cpu`) and WGSL compute kernels on wgpu (`gpu`) — behind one [`Backend`] trait.
//!
//! Activations are laid out NHWC (sample, row, column, channel), so a convolution is an
//! im2col gather followed by one matrix product whose result is already NHWC, and
//! `flatten` is free. Dense weights are `[inputs, outputs]`, convolution weights
//! `[kernel_h, kernel_w, in_channels, filters]` (HWIO); both are row-major.

pub mod conformance;
mod conv;
pub mod cpu;
pub mod gemm;
pub mod gpu;
mod spec;
pub mod train;
pub mod transformer;

pub use spec::{
    BLOCK_TENSORS, EVALUATION_VALUES, LayerSpec, MAX_ACTIVATION, MAX_BLOCKS, MAX_CONTEXT,
    MAX_LAYERS, MAX_PARAMS, MAX_TRAINING_BYTES, MAX_VOCAB, MAX_WIDTH, Model, ModelSpec, Op,
    PARAM_ALIGN, ParamTensor, SpecError, WEBGPU_MAX_BINDING,
};

use std::future::Future;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The inner optimizer that one training step applies.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Optimizer {
    /// SGD with (heavy-ball) momentum: `v = m v + g; w -= lr v`.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum coefficient in `[0, 1)`.
        momentum: f32,
    },
    /// Adam with bias correction.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator epsilon.
        eps: f32,
    },
    /// Adam with decoupled weight decay (AdamW, Loshchilov and Hutter) and global-norm
    /// gradient clipping: if the gradient's L2 norm over all parameters exceeds `clip`
    /// (0: never), every gradient is scaled by `clip / norm` first; then the Adam update,
    /// and `w -= lr * weight_decay * w` for tensors of two or more dimensions (matrices
    /// and embeddings, not biases or layer-norm gains).
    AdamW {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator epsilon.
        eps: f32,
        /// Decoupled weight decay per unit of learning rate.
        weight_decay: f32,
        /// Largest global gradient norm (0: no clipping).
        clip: f32,
    },
}

impl Optimizer {
    /// AdamW with betas (0.9, 0.95), eps 1e-8: the usual recipe for transformers.
    pub fn adamw(lr: f32, weight_decay: f32, clip: f32) -> Self {
        Self::AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            clip,
        }
    }

    /// Adam with the usual defaults and learning rate `lr`.
    pub fn adam(lr: f32) -> Self {
        Self::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// Checks that every coefficient is finite and in range.
    pub fn validate(&self) -> Result<(), EngineError> {
        let ok = match *self {
            Self::Sgd { lr, momentum } => {
                lr > 0.0 && lr.is_finite() && (0.0..1.0).contains(&momentum)
            }
            Self::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => adam_ok(lr, beta1, beta2, eps),
            Self::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                clip,
            } => {
                adam_ok(lr, beta1, beta2, eps)
                    && (0.0..1.0).contains(&weight_decay)
                    && clip >= 0.0
                    && clip.is_finite()
            }
        };
        if ok {
            Ok(())
        } else {
            Err(EngineError::BadOptimizer(*self))
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Self::Sgd { lr, .. } | Self::Adam { lr, .. } | Self::AdamW { lr, .. } => lr,
        }
    }

    /// The same optimizer with learning rate `new_lr`, validated.
    pub fn with_lr(mut self, new_lr: f32) -> Result<Self, EngineError> {
        match &mut self {
            Self::Sgd { lr, .. } | Self::Adam { lr, .. } | Self::AdamW { lr, .. } => *lr = new_lr,
        }
        self.validate()?;
        Ok(self)
    }
}

fn adam_ok(lr: f32, beta1: f32, beta2: f32, eps: f32) -> bool {
    lr > 0.0
        && lr.is_finite()
        && (0.0..1.0).contains(&beta1)
        && (0.0..1.0).contains(&beta2)
        && eps > 0.0
        && eps.is_finite()
}

/// Why a training or evaluation call failed.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The model description is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Optimizer coefficients out of range.
    #[error("optimizer coefficients out of range: {0:?}")]
    BadOptimizer(Optimizer),
    /// A batch's inputs or labels do not fit the model.
    #[error("batch does not fit the model: {0}")]
    BadBatch(String),
    /// A parameter vector of the wrong length, or with non-finite values.
    #[error("parameters rejected: {0}")]
    BadParams(String),
    /// The loss or the parameters became NaN or infinite: the step is refused, and the
    /// caller should restore the last good weights or lower the learning rate.
    #[error("training diverged: {0} is not finite")]
    NonFinite(&'static str),
    /// A GPU call failed.
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    /// This backend cannot train this model or optimizer (the caller falls back to the
    /// CPU backend, which runs everything).
    #[error("not supported by this backend: {0}")]
    Unsupported(&'static str),
}

/// What every backend does: train steps, and move parameters in and out.
///
/// `step` only enqueues work on a GPU backend; results come back (asynchronously) only
/// when asked for with `loss` or `params`.
pub trait Backend {
    /// Short name shown to users ("cpu", "webgpu").
    fn name(&self) -> &'static str;

    /// The model this backend trains.
    fn model(&self) -> &Model;

    /// Runs one training step on a batch: `inputs` holds `labels.len()` samples of
    /// `model().input_len()` values each.
    fn step(&mut self, inputs: &[f32], labels: &[u8]) -> Result<(), EngineError>;

    /// Mean loss of the most recent step (a readback on a GPU backend); an error if it is
    /// not finite.
    fn loss(&mut self) -> impl Future<Output = Result<f32, EngineError>>;

    /// Copies the parameters out.
    fn params(&mut self) -> impl Future<Output = Result<Vec<f32>, EngineError>>;

    /// Changes the optimizer's learning rate from the next step on (for schedules).
    fn set_learning_rate(&mut self, lr: f32) -> Result<(), EngineError>;

    /// Replaces the parameters (and resets the optimizer state) after validating them.
    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError>;

    /// Replaces the parameters after validating them but keeps the optimizer state: a
    /// swarm peer moves to the new round's weights and its inner optimizer carries on.
    fn load_weights(&mut self, params: &[f32]) -> Result<(), EngineError>;

    /// Loss and parameter gradients for one batch, without updating anything (used by the
    /// conformance suite and by gradient checks).
    fn gradients(
        &mut self,
        inputs: &[f32],
        labels: &[u8],
    ) -> impl Future<Output = Result<(f32, Vec<f32>), EngineError>>;
}

/// Checks a batch against a model before any backend touches it: `labels` holds
/// [`Model::positions`] labels per sample (one for a classifier, the next token at every
/// position for a language model, whose inputs must be token ids).
pub(crate) fn check_batch(model: &Model, inputs: &[f32], labels: &[u8]) -> Result<(), EngineError> {
    let per = model.positions();
    if labels.is_empty() {
        return Err(EngineError::BadBatch("empty batch".into()));
    }
    if !labels.len().is_multiple_of(per) {
        return Err(EngineError::BadBatch(format!(
            "{} labels is not a whole number of samples of {per} positions",
            labels.len()
        )));
    }
    let n = labels.len() / per;
    if inputs.len() != n * model.input_len() {
        return Err(EngineError::BadBatch(format!(
            "{} input values for {n} samples of {}",
            inputs.len(),
            model.input_len()
        )));
    }
    if let Some(&l) = labels.iter().find(|&&l| usize::from(l) >= model.classes()) {
        return Err(EngineError::BadBatch(format!(
            "label {l} outside 0..{}",
            model.classes()
        )));
    }
    if let Some(vocab) = model.vocab()
        && let Some(&t) = inputs
            .iter()
            .find(|&&t| !(t >= 0.0 && t < vocab as f32 && t.fract() == 0.0))
    {
        return Err(EngineError::BadBatch(format!(
            "input {t} is not a token id in 0..{vocab}"
        )));
    }
    Ok(())
}

/// Checks a parameter vector before it replaces a model's weights.
pub(crate) fn check_params(model: &Model, params: &[f32]) -> Result<(), EngineError> {
    if params.len() != model.param_len() {
        return Err(EngineError::BadParams(format!(
            "{} values, model has {}",
            params.len(),
            model.param_len()
        )));
    }
    if let Some(i) = params.iter().position(|v| !v.is_finite()) {
        return Err(EngineError::BadParams(format!(
            "value {i} is {}",
            params[i]
        )));
    }
    Ok(())
}

/// Scales grey-scale bytes to `[0, 1]` floats, the input the demo models expect.
pub fn normalize_pixels(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| f32::from(b) / 255.0).collect()
}

/// Either backend, chosen at run time (GPU when an adapter exists, CPU otherwise).
pub enum AnyBackend {
    /// The CPU reference backend.
    Cpu(Box<cpu::CpuBackend>),
    /// The WGSL backend.
    Gpu(Box<gpu::GpuBackend>),
}

impl Backend for AnyBackend {
    fn name(&self) -> &'static str {
        match self {
            Self::Cpu(b) => b.name(),
            Self::Gpu(b) => b.name(),
        }
    }

    fn model(&self) -> &Model {
        match self {
            Self::Cpu(b) => b.model(),
            Self::Gpu(b) => b.model(),
        }
    }

    fn step(&mut self, inputs: &[f32], labels: &[u8]) -> Result<(), EngineError> {
        match self {
            Self::Cpu(b) => b.step(inputs, labels),
            Self::Gpu(b) => b.step(inputs, labels),
        }
    }

    async fn loss(&mut self) -> Result<f32, EngineError> {
        match self {
            Self::Cpu(b) => b.loss().await,
            Self::Gpu(b) => b.loss().await,
        }
    }

    async fn params(&mut self) -> Result<Vec<f32>, EngineError> {
        match self {
            Self::Cpu(b) => b.params().await,
            Self::Gpu(b) => b.params().await,
        }
    }

    fn set_learning_rate(&mut self, lr: f32) -> Result<(), EngineError> {
        match self {
            Self::Cpu(b) => b.set_learning_rate(lr),
            Self::Gpu(b) => b.set_learning_rate(lr),
        }
    }

    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError> {
        match self {
            Self::Cpu(b) => b.set_params(params),
            Self::Gpu(b) => b.set_params(params),
        }
    }

    fn load_weights(&mut self, params: &[f32]) -> Result<(), EngineError> {
        match self {
            Self::Cpu(b) => b.load_weights(params),
            Self::Gpu(b) => b.load_weights(params),
        }
    }

    async fn gradients(
        &mut self,
        inputs: &[f32],
        labels: &[u8],
    ) -> Result<(f32, Vec<f32>), EngineError> {
        match self {
            Self::Cpu(b) => b.gradients(inputs, labels).await,
            Self::Gpu(b) => b.gradients(inputs, labels).await,
        }
    }
}

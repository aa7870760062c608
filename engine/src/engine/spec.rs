//! Models described as data, compiled into a list of operations and a named layout of one
//! flat parameter buffer.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::rng::SplitMix64;

/// Parameter tensors start at multiples of this many floats (256 bytes), so a GPU can bind
/// each tensor as its own storage-buffer range.
pub const PARAM_ALIGN: usize = 64;

/// Largest model, in parameters, that a task may declare: 32 Mi floats, 128 MiB, the
/// largest storage buffer binding WebGPU guarantees (the GPU backend binds the parameter
/// buffer, its gradient and the optimizer's moments each whole).
pub const MAX_PARAMS: usize = 32 << 20;
/// Largest activation, in values per sample, that a layer may produce.
pub const MAX_ACTIVATION: usize = 1 << 22;

/// The values a sample that `op` makes in its buffers: its output, and a convolution's
/// unfolded input or a block's attention probabilities, MLP activations and queries,
/// keys and values.
fn op_buffers(op: &Op) -> [usize; 3] {
    match *op {
        Op::Block {
            ctx,
            dim,
            heads,
            hidden,
            ..
        } => [
            heads.saturating_mul(ctx).saturating_mul(ctx),
            ctx.saturating_mul(hidden),
            ctx.saturating_mul(dim).saturating_mul(3).max(op.out_len()),
        ],
        Op::Conv {
            input,
            output,
            kernel,
            ..
        } => [
            [output[0], output[1], kernel, kernel, input[2]]
                .into_iter()
                .fold(1usize, usize::saturating_mul),
            op.out_len(),
            0,
        ],
        _ => [op.out_len(), 0, 0],
    }
}

/// The values a sample works in for `op` in training, in the backend that holds more
/// (the CPU's, which keeps a block's attention probabilities): what it keeps from its
/// forward pass to its backward — its output and what its backward reads again: a
/// convolution's unfolded input, a pool's arg-max indices, a layer norm's two statistics a
/// row, a block's two layer norms with their statistics, queries, keys and values,
/// attention output and probabilities, residual and both MLP rows — and its backward's
/// scratch beyond that: a block's gradients of its queries, keys and values, attention
/// probabilities and MLP rows, or a convolution's gradient of its unfolded input (one
/// op's backward runs at a time, so only the largest scratch counts).
fn op_working(op: &Op) -> (usize, usize) {
    let out = op.out_len();
    let sum = |v: &[usize]| v.iter().copied().fold(0, usize::saturating_add);
    // A block's: its attention probabilities and one set of MLP rows; a convolution's:
    // its unfolded input.
    let [first, second, _] = op_buffers(op);
    match *op {
        Op::Block { ctx, .. } => (
            sum(&[
                first,
                second.saturating_mul(2),
                out.saturating_mul(8),
                ctx.saturating_mul(4),
            ]),
            sum(&[first, second, out.saturating_mul(5)]),
        ),
        Op::Conv { .. } => (first.saturating_add(out), first),
        Op::Pool { .. } => (out.saturating_mul(2), 0),
        Op::Norm { rows, .. } => (out.saturating_add(rows.saturating_mul(2)), 0),
        _ => (out, 0),
    }
}

/// The largest batch from 1 to `most` (1 at least) that `fits` (which holds for every
/// batch below one it holds for), found by bisection; 1 where none does.
pub(crate) fn largest_batch(most: usize, fits: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (1, most.max(1));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Most layers a model may have: a deep stack of cheap layers (a million rectifiers
/// passed every size check) costs every visitor a GPU buffer, a bind group and two
/// dispatches a layer each step, beyond any byte count.
pub const MAX_LAYERS: usize = 256;

/// One layer of a sequential model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// Fully connected layer with bias; needs a flat input.
    Dense {
        /// Output features.
        units: usize,
    },
    /// 2-D convolution with bias over NHWC activations.
    Conv2d {
        /// Output channels.
        filters: usize,
        /// Square kernel side.
        kernel: usize,
        /// Step between windows.
        #[serde(default = "one")]
        stride: usize,
        /// Zero padding on each side.
        #[serde(default)]
        padding: usize,
    },
    /// Non-overlapping max pooling (window side = stride = `size`).
    MaxPool {
        /// Window side and stride.
        size: usize,
    },
    /// Rectified linear unit.
    Relu,
    /// Makes a 3-D activation flat (free in NHWC).
    Flatten,
    /// Token and learned positional embeddings: the first layer of a language model, whose
    /// input `[1, context, 1]` holds token ids (bytes, so `vocab` is at most 256). Writes
    /// a sequence of `context` vectors of `dim` values.
    Embedding {
        /// Number of distinct tokens (256 for bytes).
        vocab: usize,
        /// Width of every vector of the sequence.
        dim: usize,
    },
    /// A pre-norm transformer block over a sequence: `x + attn(ln1(x))`, then
    /// `x + mlp(ln2(x))` with causal multi-head self-attention and a GELU MLP.
    TransformerBlock {
        /// Attention heads; must divide the width.
        heads: usize,
        /// Hidden width of the MLP as a multiple of the model width.
        #[serde(default = "four")]
        mlp_ratio: usize,
    },
    /// Layer normalization over each vector of a sequence, with gain and bias.
    LayerNorm,
    /// The language-model head: logits over the vocabulary at every position, from a
    /// `[dim, vocab]` matrix or (`tied`) from the token embedding itself. The loss is the
    /// cross-entropy of each position against the next token.
    LmHead {
        /// Reuse the token embedding as the output matrix.
        #[serde(default)]
        tied: bool,
    },
}

impl LayerSpec {
    /// The layer's `type` as written in a task file.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense { .. } => "dense",
            Self::Conv2d { .. } => "conv2d",
            Self::MaxPool { .. } => "max_pool",
            Self::Relu => "relu",
            Self::Flatten => "flatten",
            Self::Embedding { .. } => "embedding",
            Self::TransformerBlock { .. } => "transformer_block",
            Self::LayerNorm => "layer_norm",
            Self::LmHead { .. } => "lm_head",
        }
    }
}

fn one() -> usize {
    1
}

fn four() -> usize {
    4
}

/// Largest vocabulary of an [`LayerSpec::Embedding`]: tokens are bytes.
pub const MAX_VOCAB: usize = 256;
/// Largest context (positions per sample) of a language model.
pub const MAX_CONTEXT: usize = 2048;
/// Largest width of a language model's vectors.
pub const MAX_WIDTH: usize = 4096;
/// Largest storage buffer binding that WebGPU guarantees (`maxStorageBufferBindingSize`,
/// 128 MiB): no single parameter tensor or per-layer activation of a batch may exceed it.
pub const WEBGPU_MAX_BINDING: usize = 128 << 20;
/// The most memory, in bytes, that training a task's model at its batch may hold
/// ([`Model::training_bytes`]): 1 GiB, a quarter of what a wasm32 page can address and
/// what a laptop's GPU spares a tab. Each buffer within WebGPU's binding limit is not
/// enough: a few hundred layers of one 64 MiB activation each passed that check and
/// asked every visitor for 25 GiB.
pub const MAX_TRAINING_BYTES: usize = 1 << 30;
/// The working values an evaluation may always hold, whatever the training batch (16 MiB):
/// see [`Model::evaluation_batch`].
pub const EVALUATION_VALUES: usize = 4 << 20;
/// Largest number of transformer blocks.
pub const MAX_BLOCKS: usize = 64;

/// A sequential model: input shape, layers, and (implicitly) a softmax cross-entropy loss
/// over the last layer's outputs, which must come from a dense layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Input as `[height, width, channels]`; `[1, 1, n]` is a flat vector of `n`.
    pub input: [usize; 3],
    /// The layers, first to last.
    pub layers: Vec<LayerSpec>,
}

impl ModelSpec {
    /// The demo MLP: 784-128-64-10.
    pub fn mlp_digits() -> Self {
        Self {
            input: [28, 28, 1],
            layers: vec![
                LayerSpec::Flatten,
                LayerSpec::Dense { units: 128 },
                LayerSpec::Relu,
                LayerSpec::Dense { units: 64 },
                LayerSpec::Relu,
                LayerSpec::Dense { units: 10 },
            ],
        }
    }

    /// The demo CNN: conv 8 -> pool -> conv 16 -> pool -> dense 10.
    pub fn cnn_digits() -> Self {
        let conv = |filters| LayerSpec::Conv2d {
            filters,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        Self {
            input: [28, 28, 1],
            layers: vec![
                conv(8),
                LayerSpec::Relu,
                LayerSpec::MaxPool { size: 2 },
                conv(16),
                LayerSpec::Relu,
                LayerSpec::MaxPool { size: 2 },
                LayerSpec::Flatten,
                LayerSpec::Dense { units: 10 },
            ],
        }
    }
}

/// Why a model description was refused; names the layer and the problem.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    /// The model has no layers, or its last layer is not dense.
    #[error("the last layer must be dense (its units are the classes) or an lm_head; found {0}")]
    BadHead(String),
    /// A layer's arguments are zero or out of range.
    #[error("layer {layer} ({kind}): {problem}")]
    BadLayer {
        /// Index of the layer.
        layer: usize,
        /// Its type.
        kind: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The input shape has a zero dimension or is too large.
    #[error("input shape {0:?} is empty or too large")]
    BadInput([usize; 3]),
    /// More parameters than [`MAX_PARAMS`].
    #[error(
        "model has {0} parameters, more than the limit of {MAX_PARAMS} (128 MiB, WebGPU's \
         default maxStorageBufferBindingSize)"
    )]
    TooLarge(usize),
}

/// A named parameter tensor inside the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParamTensor {
    /// Name such as `layer1.weight`.
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// First element in the flat buffer (a multiple of [`PARAM_ALIGN`]).
    pub offset: usize,
}

impl ParamTensor {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements (never true for a valid model).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensor's elements as a range of the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// One compiled operation. Activation `i` is the input of op `i`; op `i` writes activation
/// `i + 1`. `relu` marks a rectifier fused into the op's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `y[n, out] = x[n, inp] · w[inp, out] + b`.
    Dense {
        /// Inputs per sample.
        inp: usize,
        /// Outputs per sample.
        out: usize,
        /// Index of the weight tensor in [`Model::tensors`]; the bias follows it.
        weight: usize,
        /// Fused rectifier.
        relu: bool,
    },
    /// NHWC convolution.
    Conv {
        /// Input `[h, w, c]`.
        input: [usize; 3],
        /// Output `[h, w, filters]`.
        output: [usize; 3],
        /// Kernel side.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding.
        padding: usize,
        /// Index of the weight tensor; the bias follows it.
        weight: usize,
        /// Fused rectifier.
        relu: bool,
    },
    /// Non-overlapping max pooling.
    Pool {
        /// Input `[h, w, c]`.
        input: [usize; 3],
        /// Output `[h, w, c]`.
        output: [usize; 3],
        /// Window side and stride.
        size: usize,
    },
    /// A rectifier that could not be fused (it follows a pool or another rectifier).
    Relu {
        /// Values per sample.
        len: usize,
    },
    /// Token plus positional embedding: `y[t] = tok[x[t]] + pos[t]`.
    Embed {
        /// Positions per sample.
        ctx: usize,
        /// Tokens.
        vocab: usize,
        /// Width.
        dim: usize,
        /// Index of the token table `[vocab, dim]`; the position table `[ctx, dim]`
        /// follows it.
        tok: usize,
        /// Whether the head reuses the token table (its gradient then adds to the head's).
        tied: bool,
    },
    /// A pre-norm transformer block (see [`LayerSpec::TransformerBlock`]).
    Block {
        /// Positions per sample.
        ctx: usize,
        /// Width.
        dim: usize,
        /// Attention heads.
        heads: usize,
        /// MLP hidden width.
        hidden: usize,
        /// Index of its first tensor; the twelve are, in order: `ln1.gain`, `ln1.bias`,
        /// `attn.qkv.weight` `[dim, 3 dim]`, `attn.qkv.bias`, `attn.out.weight`
        /// `[dim, dim]`, `attn.out.bias`, `ln2.gain`, `ln2.bias`, `mlp.up.weight`
        /// `[dim, hidden]`, `mlp.up.bias`, `mlp.down.weight` `[hidden, dim]`,
        /// `mlp.down.bias`.
        first: usize,
    },
    /// Layer normalization of each of `rows` vectors of `dim` per sample.
    Norm {
        /// Vectors per sample.
        rows: usize,
        /// Width.
        dim: usize,
        /// Index of the gain tensor; the bias follows it.
        gain: usize,
    },
    /// Logits at every position: `y[t] = x[t] · w` with `w` `[dim, vocab]`, or
    /// `x[t] · tokᵀ` when tied to the embedding.
    Head {
        /// Positions per sample.
        ctx: usize,
        /// Width.
        dim: usize,
        /// Tokens.
        vocab: usize,
        /// Index of the output matrix, or of the token table when `tied`.
        weight: usize,
        /// Whether `weight` is the embedding's token table `[vocab, dim]`.
        tied: bool,
    },
}

/// Tensors per transformer block.
pub const BLOCK_TENSORS: usize = 12;

impl Op {
    /// Values per sample this op writes.
    pub fn out_len(&self) -> usize {
        match *self {
            Op::Dense { out, .. } => out,
            Op::Conv { output, .. } | Op::Pool { output, .. } => output.iter().product(),
            Op::Relu { len } => len,
            Op::Embed { ctx, dim, .. } | Op::Block { ctx, dim, .. } => ctx * dim,
            Op::Norm { rows, dim, .. } => rows * dim,
            Op::Head { ctx, vocab, .. } => ctx * vocab,
        }
    }
}

/// A compiled model: its operations and the layout of its flat parameter buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// The description it was compiled from.
    pub spec: ModelSpec,
    /// Operations, first to last.
    pub ops: Vec<Op>,
    /// Named parameter tensors, in buffer order.
    pub tensors: Vec<ParamTensor>,
    param_len: usize,
}

impl Model {
    /// Validates a description and compiles it.
    pub fn new(spec: ModelSpec) -> Result<Self, SpecError> {
        let [h, w, c] = spec.input;
        if h == 0 || w == 0 || c == 0 || h.saturating_mul(w).saturating_mul(c) > MAX_ACTIVATION {
            return Err(SpecError::BadInput(spec.input));
        }
        match spec.layers.last() {
            Some(LayerSpec::Dense { .. } | LayerSpec::LmHead { .. }) => {}
            other => {
                return Err(SpecError::BadHead(match other {
                    Some(layer) => format!("a {} layer", layer.kind()),
                    None => "no layers".into(),
                }));
            }
        }
        if spec.layers.len() > MAX_LAYERS {
            return Err(SpecError::BadLayer {
                layer: MAX_LAYERS,
                kind: spec.layers[MAX_LAYERS].kind(),
                problem: format!("{} layers, more than {MAX_LAYERS}", spec.layers.len()),
            });
        }
        let blocks = spec
            .layers
            .iter()
            .filter(|l| matches!(l, LayerSpec::TransformerBlock { .. }))
            .count();
        if blocks > MAX_BLOCKS {
            return Err(SpecError::BadLayer {
                layer: 0,
                kind: "transformer_block",
                problem: format!("{blocks} blocks, more than {MAX_BLOCKS}"),
            });
        }
        let mut ops: Vec<Op> = Vec::new();
        let mut tensors: Vec<ParamTensor> = Vec::new();
        let mut offset = 0usize;
        let mut add = |name: String, shape: Vec<usize>, tensors: &mut Vec<ParamTensor>| {
            // Saturating: in a 32-bit build (the browser's) a product past 2^32 must not
            // wrap to a small size that passes the parameter limit.
            let len = shape.iter().copied().fold(1usize, usize::saturating_mul);
            tensors.push(ParamTensor {
                name,
                shape,
                offset,
            });
            offset = offset
                .saturating_add(len)
                .div_ceil(PARAM_ALIGN)
                .saturating_mul(PARAM_ALIGN);
            offset
        };
        // Current activation shape; `flat` once flattened (or after a dense layer).
        let mut shape = spec.input;
        let mut flat = h == 1 && w == 1;
        // A language model's sequence: (positions, width, vocabulary, token table).
        let mut seq: Option<(usize, usize, usize, usize)> = None;
        for (i, layer) in spec.layers.iter().enumerate() {
            let bad = |kind: &'static str, problem: String| SpecError::BadLayer {
                layer: i,
                kind,
                problem,
            };
            let sequence_layer = matches!(
                layer,
                LayerSpec::Embedding { .. }
                    | LayerSpec::TransformerBlock { .. }
                    | LayerSpec::LayerNorm
                    | LayerSpec::LmHead { .. }
            );
            if seq.is_some() && !sequence_layer {
                return Err(bad(
                    layer.kind(),
                    "a language model takes only transformer_block, layer_norm and lm_head \
                     after its embedding"
                        .into(),
                ));
            }
            if seq.is_none() && sequence_layer && !matches!(layer, LayerSpec::Embedding { .. }) {
                return Err(bad(
                    layer.kind(),
                    "needs a sequence: the model must start with an embedding layer".into(),
                ));
            }
            match *layer {
                LayerSpec::Embedding { vocab, dim } => {
                    let ctx = spec.input[1];
                    if i != 0 {
                        return Err(bad("embedding", "must be the first layer".into()));
                    }
                    if spec.input[0] != 1 || spec.input[2] != 1 || ctx > MAX_CONTEXT {
                        return Err(bad(
                            "embedding",
                            format!(
                                "input must be [1, context, 1] (token ids) with context at \
                                 most {MAX_CONTEXT}; got {:?}",
                                spec.input
                            ),
                        ));
                    }
                    if vocab == 0 || vocab > MAX_VOCAB || dim == 0 || dim > MAX_WIDTH {
                        return Err(bad(
                            "embedding",
                            format!("vocab must be in 1..={MAX_VOCAB}, dim in 1..={MAX_WIDTH}"),
                        ));
                    }
                    let tok = tensors.len();
                    add(format!("layer{i}.token"), vec![vocab, dim], &mut tensors);
                    add(format!("layer{i}.position"), vec![ctx, dim], &mut tensors);
                    ops.push(Op::Embed {
                        ctx,
                        vocab,
                        dim,
                        tok,
                        tied: false,
                    });
                    seq = Some((ctx, dim, vocab, tok));
                }
                LayerSpec::TransformerBlock { heads, mlp_ratio } => {
                    let Some((ctx, dim, _, _)) = seq else {
                        unreachable!("checked above")
                    };
                    if heads == 0 || dim % heads != 0 {
                        return Err(bad(
                            "transformer_block",
                            format!("heads ({heads}) must divide the width {dim}"),
                        ));
                    }
                    if mlp_ratio == 0 || mlp_ratio > 8 {
                        return Err(bad(
                            "transformer_block",
                            "mlp_ratio must be in 1..=8".into(),
                        ));
                    }
                    let hidden = dim * mlp_ratio;
                    let first = tensors.len();
                    for (name, shape) in [
                        ("ln1.gain", vec![dim]),
                        ("ln1.bias", vec![dim]),
                        ("attn.qkv.weight", vec![dim, 3 * dim]),
                        ("attn.qkv.bias", vec![3 * dim]),
                        ("attn.out.weight", vec![dim, dim]),
                        ("attn.out.bias", vec![dim]),
                        ("ln2.gain", vec![dim]),
                        ("ln2.bias", vec![dim]),
                        ("mlp.up.weight", vec![dim, hidden]),
                        ("mlp.up.bias", vec![hidden]),
                        ("mlp.down.weight", vec![hidden, dim]),
                        ("mlp.down.bias", vec![dim]),
                    ] {
                        add(format!("layer{i}.{name}"), shape, &mut tensors);
                    }
                    ops.push(Op::Block {
                        ctx,
                        dim,
                        heads,
                        hidden,
                        first,
                    });
                }
                LayerSpec::LayerNorm => {
                    let Some((ctx, dim, _, _)) = seq else {
                        unreachable!("checked above")
                    };
                    let gain = tensors.len();
                    add(format!("layer{i}.gain"), vec![dim], &mut tensors);
                    add(format!("layer{i}.bias"), vec![dim], &mut tensors);
                    ops.push(Op::Norm {
                        rows: ctx,
                        dim,
                        gain,
                    });
                }
                LayerSpec::LmHead { tied } => {
                    let Some((ctx, dim, vocab, tok)) = seq else {
                        unreachable!("checked above")
                    };
                    if i + 1 != spec.layers.len() {
                        return Err(bad("lm_head", "must be the last layer".into()));
                    }
                    let weight = if tied {
                        if let Some(Op::Embed { tied, .. }) = ops.first_mut() {
                            *tied = true;
                        }
                        tok
                    } else {
                        let weight = tensors.len();
                        add(format!("layer{i}.weight"), vec![dim, vocab], &mut tensors);
                        weight
                    };
                    ops.push(Op::Head {
                        ctx,
                        dim,
                        vocab,
                        weight,
                        tied,
                    });
                }
                LayerSpec::Dense { units } => {
                    if !flat {
                        return Err(bad(
                            "dense",
                            format!("needs a flat input, got {shape:?}; add a flatten layer"),
                        ));
                    }
                    if units == 0 || units > MAX_ACTIVATION {
                        return Err(bad(
                            "dense",
                            format!("units must be in 1..={MAX_ACTIVATION}"),
                        ));
                    }
                    let inp = shape.iter().copied().fold(1usize, usize::saturating_mul);
                    let weight = tensors.len();
                    add(format!("layer{i}.weight"), vec![inp, units], &mut tensors);
                    let end = add(format!("layer{i}.bias"), vec![units], &mut tensors);
                    if end > MAX_PARAMS {
                        return Err(SpecError::TooLarge(end));
                    }
                    ops.push(Op::Dense {
                        inp,
                        out: units,
                        weight,
                        relu: false,
                    });
                    shape = [1, 1, units];
                }
                LayerSpec::Conv2d {
                    filters,
                    kernel,
                    stride,
                    padding,
                } => {
                    if flat {
                        return Err(bad(
                            "conv2d",
                            "needs a [h, w, c] input, got a flat one".into(),
                        ));
                    }
                    if filters == 0
                        || kernel == 0
                        || stride == 0
                        || filters > 4096
                        || kernel > 31
                        || stride > 31
                        || padding >= kernel
                    {
                        return Err(bad(
                            "conv2d",
                            "filters 1..=4096, kernel 1..=31, stride 1..=31, padding < kernel"
                                .into(),
                        ));
                    }
                    let [ih, iw, ic] = shape;
                    if ih + 2 * padding < kernel || iw + 2 * padding < kernel {
                        return Err(bad(
                            "conv2d",
                            format!("kernel {kernel} larger than padded input {shape:?}"),
                        ));
                    }
                    let oh = (ih + 2 * padding - kernel) / stride + 1;
                    let ow = (iw + 2 * padding - kernel) / stride + 1;
                    // Saturating, as everywhere sizes multiply: in the browser's 32-bit
                    // build a product past 2^32 wrapped to a small one that passed.
                    if oh.saturating_mul(ow).saturating_mul(filters) > MAX_ACTIVATION {
                        return Err(bad("conv2d", "output too large".into()));
                    }
                    let weight = tensors.len();
                    add(
                        format!("layer{i}.weight"),
                        vec![kernel, kernel, ic, filters],
                        &mut tensors,
                    );
                    let end = add(format!("layer{i}.bias"), vec![filters], &mut tensors);
                    if end > MAX_PARAMS {
                        return Err(SpecError::TooLarge(end));
                    }
                    let output = [oh, ow, filters];
                    ops.push(Op::Conv {
                        input: shape,
                        output,
                        kernel,
                        stride,
                        padding,
                        weight,
                        relu: false,
                    });
                    shape = output;
                }
                LayerSpec::MaxPool { size } => {
                    let [ih, iw, ic] = shape;
                    if flat || size < 2 || size > ih || size > iw {
                        return Err(bad(
                            "max_pool",
                            format!("size {size} does not fit input {shape:?}"),
                        ));
                    }
                    let output = [ih / size, iw / size, ic];
                    ops.push(Op::Pool {
                        input: shape,
                        output,
                        size,
                    });
                    shape = output;
                }
                LayerSpec::Relu => match ops.last_mut() {
                    Some(Op::Dense { relu, .. } | Op::Conv { relu, .. }) if !*relu => *relu = true,
                    _ => ops.push(Op::Relu {
                        len: shape.iter().product(),
                    }),
                },
                LayerSpec::Flatten => {
                    shape = [1, 1, shape.iter().product()];
                    flat = true;
                }
            }
            if i + 1 < spec.layers.len() && matches!(layer, LayerSpec::Dense { .. }) {
                flat = true;
            }
        }
        // Saturating too: sixteen wide transformer blocks summed past 2^32 and wrapped to
        // 4,095 parameters in the browser, which then panicked drawing their weights.
        let param_len = tensors.last().map_or(0, |t| {
            let len = t.shape.iter().copied().fold(1usize, usize::saturating_mul);
            t.offset.saturating_add(len)
        });
        if param_len > MAX_PARAMS {
            return Err(SpecError::TooLarge(param_len));
        }
        Ok(Self {
            spec,
            ops,
            tensors,
            param_len,
        })
    }

    /// Values per input sample.
    pub fn input_len(&self) -> usize {
        self.spec.input.iter().product()
    }

    /// Number of classes (outputs of the last layer per position): the vocabulary of a
    /// language model.
    pub fn classes(&self) -> usize {
        self.ops.last().map_or(0, Op::out_len) / self.positions()
    }

    /// Predictions (and labels) per sample: the context of a language model, which
    /// predicts the next token at every position; 1 for a classifier.
    pub fn positions(&self) -> usize {
        match self.ops.first() {
            Some(&Op::Embed { ctx, .. }) => ctx,
            _ => 1,
        }
    }

    /// Whether this is a language model (its inputs are token ids).
    pub fn is_language_model(&self) -> bool {
        matches!(self.ops.first(), Some(Op::Embed { .. }))
    }

    /// The vocabulary when this is a language model.
    pub fn vocab(&self) -> Option<usize> {
        match self.ops.first() {
            Some(&Op::Embed { vocab, .. }) => Some(vocab),
            _ => None,
        }
    }

    /// The largest single buffer, in bytes, that training a batch of `batch` samples
    /// binds on a GPU (and the CPU backend allocates): the parameters, one activation, a
    /// convolution's unfolded input (im2col), or a block's attention probabilities, MLP
    /// activations or queries, keys and values. A task refuses a model and batch where
    /// this exceeds [`WEBGPU_MAX_BINDING`].
    pub fn largest_binding(&self, batch: usize) -> usize {
        let params = self.param_len;
        let mut largest = params.max(batch.saturating_mul(self.input_len()));
        for op in &self.ops {
            let per_sample = op_buffers(op).into_iter().max().unwrap_or(0);
            largest = largest.max(batch.saturating_mul(per_sample));
        }
        largest.saturating_mul(4)
    }

    /// The values one step at a batch of `batch` works in beyond the parameter-sized
    /// buffers: the input, what every layer keeps for the backward pass, the gradient
    /// flowing back and the buffer it swaps with (each as large as the largest
    /// activation), and the largest op's backward scratch (`op_working`).
    pub fn step_values(&self, batch: usize) -> usize {
        let widest = self
            .ops
            .iter()
            .map(Op::out_len)
            .fold(self.input_len(), usize::max);
        let scratch = self
            .ops
            .iter()
            .map(|op| op_working(op).1)
            .max()
            .unwrap_or(0);
        let per_sample = self
            .ops
            .iter()
            .map(|op| op_working(op).0)
            .fold(self.input_len(), usize::saturating_add)
            .saturating_add(widest.saturating_mul(2))
            .saturating_add(scratch);
        batch.saturating_mul(per_sample)
    }

    /// About the bytes that contributing at a batch of `batch` holds at once, on a GPU
    /// and in the page: six parameter-sized buffers (the parameters, their gradient, two
    /// optimizer moments, the GPU's weight-decay mask or a read-back copy, and the
    /// evaluation's copy of the parameters), one step's working values
    /// ([`Model::step_values`]) and as many again for evaluating the model, whose batch
    /// stays within them or [`EVALUATION_VALUES`] ([`Model::evaluation_batch`]). A task
    /// refuses a model and batch where this exceeds [`MAX_TRAINING_BYTES`].
    pub fn training_bytes(&self, batch: usize) -> usize {
        let step = self.step_values(batch);
        self.param_len
            .saturating_mul(24)
            .saturating_add(step.saturating_mul(4))
            .saturating_add(step.max(EVALUATION_VALUES).saturating_mul(4))
    }

    /// The largest evaluation batch, up to `asked` (1 at least), whose working values stay
    /// within those of a training step at `batch` (or 4 Mi values, 16 MiB, where those
    /// are fewer: a small model's evaluation need not go in the training batch's steps).
    pub fn evaluation_batch(&self, asked: usize, batch: usize) -> usize {
        let room = self.step_values(batch).max(EVALUATION_VALUES);
        largest_batch(asked, |b| self.step_values(b) <= room)
    }

    /// Length of the flat parameter buffer (including alignment padding, which stays 0).
    pub fn param_len(&self) -> usize {
        self.param_len
    }

    /// Values per sample of activation `i` (0 is the input).
    pub fn act_len(&self, i: usize) -> usize {
        if i == 0 {
            self.input_len()
        } else {
            self.ops[i - 1].out_len()
        }
    }

    /// Seeded initialization: He-normal weights for layers followed by a rectifier,
    /// Glorot-uniform for the others (the logits), zero biases and padding. Language
    /// models as GPT-2: every matrix and embedding normal with standard deviation 0.02,
    /// the two projections back into the residual stream 0.02 / sqrt(2 blocks),
    /// layer-norm gains 1.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let mut p = vec![0.0f32; self.param_len];
        let blocks = self
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Block { .. }))
            .count()
            .max(1);
        let residual = 0.02 / (2.0 * blocks as f32).sqrt();
        let mut normal = |p: &mut [f32], t: &ParamTensor, std: f32| {
            p[t.range()]
                .iter_mut()
                .for_each(|v| *v = std * rng.normal_f32());
        };
        for op in &self.ops {
            match *op {
                Op::Embed { tok, .. } => {
                    normal(&mut p, &self.tensors[tok], 0.02);
                    normal(&mut p, &self.tensors[tok + 1], 0.02);
                }
                Op::Block { first, .. } => {
                    let t = &self.tensors[first..first + BLOCK_TENSORS];
                    p[t[0].range()].fill(1.0);
                    p[t[6].range()].fill(1.0);
                    normal(&mut p, &t[2], 0.02);
                    normal(&mut p, &t[4], residual);
                    normal(&mut p, &t[8], 0.02);
                    normal(&mut p, &t[10], residual);
                }
                Op::Norm { gain, .. } => p[self.tensors[gain].range()].fill(1.0),
                Op::Head {
                    weight,
                    tied: false,
                    ..
                } => normal(&mut p, &self.tensors[weight], 0.02),
                _ => {}
            }
        }
        for op in &self.ops {
            let (weight, fan_in, fan_out, relu) = match *op {
                Op::Dense {
                    inp,
                    out,
                    weight,
                    relu,
                } => (weight, inp, out, relu),
                Op::Conv {
                    input,
                    output,
                    kernel,
                    weight,
                    relu,
                    ..
                } => (
                    weight,
                    kernel * kernel * input[2],
                    kernel * kernel * output[2],
                    relu,
                ),
                _ => continue,
            };
            let range = self.tensors[weight].range();
            if relu {
                let std = (2.0 / fan_in as f32).sqrt();
                p[range]
                    .iter_mut()
                    .for_each(|v| *v = std * rng.normal_f32());
            } else {
                let limit = (6.0 / (fan_in + fan_out) as f32).sqrt();
                p[range]
                    .iter_mut()
                    .for_each(|v| *v = limit * (2.0 * rng.unit_f32() - 1.0));
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_the_demo_cnn_with_fused_rectifiers_and_aligned_tensors() {
        let m = Model::new(ModelSpec::cnn_digits()).expect("valid");
        assert_eq!(m.ops.len(), 5, "{:?}", m.ops);
        assert!(matches!(
            m.ops[0],
            Op::Conv {
                output: [28, 28, 8],
                relu: true,
                ..
            }
        ));
        assert!(matches!(
            m.ops[1],
            Op::Pool {
                output: [14, 14, 8],
                ..
            }
        ));
        assert!(matches!(
            m.ops[3],
            Op::Pool {
                output: [7, 7, 16],
                ..
            }
        ));
        assert!(matches!(
            m.ops[4],
            Op::Dense {
                inp: 784,
                out: 10,
                relu: false,
                ..
            }
        ));
        assert_eq!(m.classes(), 10);
        let names: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layer0.weight",
                "layer0.bias",
                "layer3.weight",
                "layer3.bias",
                "layer7.weight",
                "layer7.bias"
            ]
        );
        assert!(m.tensors.iter().all(|t| t.offset % PARAM_ALIGN == 0));
        assert_eq!(m.tensors[2].shape, vec![3, 3, 8, 16]);
    }

    #[test]
    fn mlp_has_the_expected_parameter_count() {
        let m = Model::new(ModelSpec::mlp_digits()).expect("valid");
        let real: usize = m.tensors.iter().map(ParamTensor::len).sum();
        assert_eq!(real, 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10);
        assert!(m.param_len() >= real && m.param_len() < real + 6 * PARAM_ALIGN);
    }

    #[test]
    fn a_model_has_at_most_max_layers_layers() {
        // A million rectifiers passed every size check: each is a buffer, a bind group
        // and two dispatches a step on a visitor's GPU.
        let deep = |relus: usize| {
            let mut layers = vec![LayerSpec::Relu; relus];
            layers.push(LayerSpec::Dense { units: 2 });
            Model::new(ModelSpec {
                input: [1, 1, 1],
                layers,
            })
        };
        assert!(deep(MAX_LAYERS - 1).is_ok());
        let e = deep(MAX_LAYERS).expect_err("too deep");
        assert!(e.to_string().contains("257 layers, more than 256"), "{e}");
    }

    #[test]
    fn refuses_bad_descriptions_naming_the_layer() {
        let mut s = ModelSpec::mlp_digits();
        s.layers.remove(0);
        assert!(matches!(
            Model::new(s),
            Err(SpecError::BadLayer {
                layer: 0,
                kind: "dense",
                ..
            })
        ));
        let mut s = ModelSpec::mlp_digits();
        s.layers.push(LayerSpec::Relu);
        assert_eq!(
            Model::new(s).err().map(|e| e.to_string()).as_deref(),
            Some(
                "the last layer must be dense (its units are the classes) or an lm_head; \
                 found a relu layer"
            )
        );
        let s = ModelSpec {
            input: [28, 28, 1],
            layers: vec![
                LayerSpec::Conv2d {
                    filters: 4,
                    kernel: 3,
                    stride: 0,
                    padding: 0,
                },
                LayerSpec::Flatten,
                LayerSpec::Dense { units: 2 },
            ],
        };
        assert!(matches!(
            Model::new(s),
            Err(SpecError::BadLayer {
                layer: 0,
                kind: "conv2d",
                ..
            })
        ));
        let s = ModelSpec {
            input: [1, 1, 1 << 20],
            layers: vec![LayerSpec::Dense { units: 1 << 20 }],
        };
        assert!(matches!(Model::new(s), Err(SpecError::TooLarge(_))));
        assert!(matches!(
            Model::new(ModelSpec {
                input: [0, 1, 1],
                layers: vec![]
            }),
            Err(SpecError::BadInput(_))
        ));
        let json = r#"{"input":[4,4,1],"layers":[{"type":"dense","units":3,"bogus":1}]}"#;
        assert!(serde_json::from_str::<ModelSpec>(json).is_err());
    }

    #[test]
    fn initialization_is_seeded_and_scaled() {
        let m = Model::new(ModelSpec::mlp_digits()).expect("valid");
        let a = m.init_params(1);
        assert_eq!(a, m.init_params(1));
        assert_ne!(a, m.init_params(2));
        let w = &a[m.tensors[0].range()];
        let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        assert!(
            (var - 2.0 / 784.0).abs() < 0.2 * 2.0 / 784.0,
            "He variance {var}"
        );
        assert!(a[m.tensors[1].range()].iter().all(|&b| b == 0.0));
    }

    fn lm(layers: Vec<LayerSpec>) -> ModelSpec {
        ModelSpec {
            input: [1, 32, 1],
            layers,
        }
    }

    fn block(heads: usize) -> LayerSpec {
        LayerSpec::TransformerBlock {
            heads,
            mlp_ratio: 4,
        }
    }

    #[test]
    fn compiles_a_language_model_with_named_tensors_and_a_tied_head() {
        use LayerSpec::{Embedding, LayerNorm, LmHead};
        let layers = |tied| {
            vec![
                Embedding {
                    vocab: 256,
                    dim: 64,
                },
                block(4),
                block(4),
                LayerNorm,
                LmHead { tied },
            ]
        };
        let m = Model::new(lm(layers(false))).expect("valid");
        assert!(m.is_language_model());
        assert_eq!(
            (m.positions(), m.classes(), m.vocab()),
            (32, 256, Some(256))
        );
        assert_eq!(m.input_len(), 32);
        let real: usize = m.tensors.iter().map(ParamTensor::len).sum();
        let per_block =
            2 * 64 + 64 * 192 + 192 + 64 * 64 + 64 + 2 * 64 + 64 * 256 + 256 + 256 * 64 + 64;
        assert_eq!(real, 256 * 64 + 32 * 64 + 2 * per_block + 2 * 64 + 64 * 256);
        assert_eq!(m.tensors[2].name, "layer1.ln1.gain");
        assert_eq!(m.tensors[4].shape, vec![64, 192]);
        let tied = Model::new(lm(layers(true))).expect("valid");
        assert_eq!(
            tied.tensors.len(),
            m.tensors.len() - 1,
            "a tied head has no matrix"
        );
        assert!(matches!(tied.ops[0], Op::Embed { tied: true, .. }));
        assert!(matches!(
            tied.ops[4],
            Op::Head {
                weight: 0,
                tied: true,
                ..
            }
        ));
        let p = tied.init_params(1);
        assert!(
            p[tied.tensors[2].range()].iter().all(|&g| g == 1.0),
            "ln gain 1"
        );
        let std = |t: &ParamTensor| {
            (p[t.range()].iter().map(|v| v * v).sum::<f32>() / t.len() as f32).sqrt()
        };
        assert!((std(&tied.tensors[0]) - 0.02).abs() < 0.002);
        assert!(
            (std(&tied.tensors[6]) - 0.01).abs() < 0.002,
            "residual projection 0.02/sqrt(4)"
        );
    }

    #[test]
    fn refuses_bad_language_models_naming_the_layer() {
        use LayerSpec::{Dense, Embedding, LayerNorm, LmHead, Relu};
        let emb = Embedding {
            vocab: 256,
            dim: 48,
        };
        let refused =
            |layers: Vec<LayerSpec>, layer: usize, kind: &str| match Model::new(lm(layers.clone()))
            {
                Err(SpecError::BadLayer {
                    layer: l,
                    kind: k,
                    problem,
                }) => {
                    assert_eq!((l, k), (layer, kind), "{problem}");
                    problem
                }
                other => panic!("{layers:?}: {other:?}"),
            };
        let p = refused(
            vec![emb, block(5), LmHead { tied: false }],
            1,
            "transformer_block",
        );
        assert!(p.contains("divide"), "{p}");
        refused(vec![emb, Relu, LmHead { tied: false }], 1, "relu");
        refused(vec![emb, Dense { units: 3 }], 1, "dense");
        refused(
            vec![
                LayerSpec::Flatten,
                Dense { units: 3 },
                LayerNorm,
                Dense { units: 3 },
            ],
            2,
            "layer_norm",
        );
        refused(
            vec![emb, LmHead { tied: true }, LmHead { tied: true }],
            1,
            "lm_head",
        );
        refused(
            vec![Embedding { vocab: 300, dim: 8 }, LmHead { tied: false }],
            0,
            "embedding",
        );
        let s = ModelSpec {
            input: [2, 16, 1],
            layers: vec![emb, LmHead { tied: false }],
        };
        assert!(matches!(
            Model::new(s),
            Err(SpecError::BadLayer { layer: 0, .. })
        ));
        // Too large for one WebGPU storage binding: the error names the limit.
        let wide = lm(vec![
            Embedding {
                vocab: 256,
                dim: 4096,
            },
            block(32),
            block(32),
            LmHead { tied: false },
        ]);
        let e = Model::new(wide).expect_err("too large");
        assert!(matches!(e, SpecError::TooLarge(_)));
        assert!(e.to_string().contains("maxStorageBufferBindingSize"), "{e}");
    }
}

//! Models described as data, compiled into a list of operations and a named layout of one
//! flat parameter buffer.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::rng::SplitMix64;

/// Parameter tensors start at multiples of this many floats (256 bytes), so a GPU can bind
/// each tensor as its own storage-buffer range.
pub const PARAM_ALIGN: usize = 64;

/// Largest model, in parameters, that a task may declare (64 Mi floats, 256 MiB).
pub const MAX_PARAMS: usize = 64 << 20;
/// Largest activation, in values per sample, that a layer may produce.
pub const MAX_ACTIVATION: usize = 1 << 22;

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
}

fn one() -> usize {
    1
}

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
    #[error("the last layer must be dense (its units are the classes); found {0}")]
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
    #[error("model has {0} parameters, more than the limit of {MAX_PARAMS}")]
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
}

impl Op {
    /// Values per sample this op writes.
    pub fn out_len(&self) -> usize {
        match *self {
            Op::Dense { out, .. } => out,
            Op::Conv { output, .. } | Op::Pool { output, .. } => output.iter().product(),
            Op::Relu { len } => len,
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
            Some(LayerSpec::Dense { .. }) => {}
            other => return Err(SpecError::BadHead(format!("{other:?}"))),
        }
        let mut ops: Vec<Op> = Vec::new();
        let mut tensors: Vec<ParamTensor> = Vec::new();
        let mut offset = 0usize;
        let mut add = |name: String, shape: Vec<usize>, tensors: &mut Vec<ParamTensor>| {
            let len: usize = shape.iter().product();
            tensors.push(ParamTensor {
                name,
                shape,
                offset,
            });
            offset = (offset + len).div_ceil(PARAM_ALIGN) * PARAM_ALIGN;
            offset
        };
        // Current activation shape; `flat` once flattened (or after a dense layer).
        let mut shape = spec.input;
        let mut flat = h == 1 && w == 1;
        for (i, layer) in spec.layers.iter().enumerate() {
            let bad = |kind: &'static str, problem: String| SpecError::BadLayer {
                layer: i,
                kind,
                problem,
            };
            match *layer {
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
                    let inp: usize = shape.iter().product();
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
                    if oh * ow * filters > MAX_ACTIVATION {
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
        let param_len = tensors.last().map_or(0, |t| t.offset + t.len());
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

    /// Number of classes (outputs of the last layer).
    pub fn classes(&self) -> usize {
        self.ops.last().map_or(0, Op::out_len)
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
    /// Glorot-uniform for the others (the logits), zero biases and padding.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let mut p = vec![0.0f32; self.param_len];
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
        assert!(matches!(Model::new(s), Err(SpecError::BadHead(_))));
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
}

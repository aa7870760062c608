//! The GPU backend: the training step as WGSL compute kernels on wgpu.
//!
//! Weights, gradients, optimizer state, activations and scratch all live in GPU buffers
//! created once; a step uploads only the batch (inputs and labels) and a few optimizer
//! scalars, records every dispatch into one compute pass and submits it. Nothing is read
//! back unless asked for (`loss`, `params`, `gradients`), and every readback is
//! asynchronous. Bias and rectifier are fused into the matrix product's epilogue, softmax
//! into cross-entropy; the optimizer updates the whole flat parameter buffer in one
//! dispatch and skips a step whose loss was not finite.

use std::collections::HashMap;
use std::num::NonZeroU64;

use wgpu::util::DeviceExt;

use super::{Backend, EngineError, Model, Op, Optimizer, check_batch, check_params};
use crate::gpu::Gpu;

const MATMUL: &str = include_str!("kernels/matmul.wgsl");
const PRELUDE: &str = include_str!("kernels/ops.wgsl");

/// Which way each matrix-product operand is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulVariant {
    /// A is stored transposed (`[K, M]`).
    pub ta: bool,
    /// B is stored transposed (`[N, K]`).
    pub tb: bool,
    /// A is read with vec4 loads (its contiguous dimension is a multiple of 4).
    pub va: bool,
    /// B is read with vec4 loads.
    pub vb: bool,
}

impl MatmulVariant {
    /// The variant for an `m x k` by `k x n` product: vec4 loads wherever the contiguous
    /// dimension allows.
    pub fn for_shape(m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Self {
        let va = if ta {
            m.is_multiple_of(4)
        } else {
            k.is_multiple_of(4)
        };
        let vb = if tb {
            k.is_multiple_of(4)
        } else {
            n.is_multiple_of(4)
        };
        Self { ta, tb, va, vb }
    }

    /// The WGSL source of this variant.
    pub fn source(self) -> String {
        let elem = |v: bool| if v { "vec4<f32>" } else { "f32" };
        let scalar = |arr: &str, v: bool, idx: &str| {
            if v {
                format!("let idx = {idx}; return {arr}[idx / 4u][idx % 4u];")
            } else {
                format!("return {arr}[{idx}];")
            }
        };
        let a_scalar = scalar(
            "a",
            self.va,
            if self.ta {
                "col * dims.m + row"
            } else {
                "row * dims.k + col"
            },
        );
        let b_scalar = scalar(
            "b",
            self.vb,
            if self.tb {
                "col * dims.k + row"
            } else {
                "row * dims.n + col"
            },
        );
        // Each thread stages four values of each slab.
        let load_a = match (self.ta, self.va) {
            (false, false) => "{ let r = t / 4u; let kq = (t % 4u) * 4u;
            for (var i = 0u; i < 4u; i++) { sa[(kq + i) * 16u + r / 4u][r % 4u] = a_at(row0 + r, k0 + kq + i); } }",
            (false, true) => "{ let r = t / 4u; let kq = (t % 4u) * 4u; var v = vec4<f32>(0.0);
            if (row0 + r < dims.m && k0 + kq < dims.k) { v = a[((row0 + r) * dims.k + k0 + kq) / 4u]; }
            for (var i = 0u; i < 4u; i++) { sa[(kq + i) * 16u + r / 4u][r % 4u] = v[i]; } }",
            (true, false) => "{ let kk = t / 16u; let mq = (t % 16u) * 4u;
            sa[kk * 16u + t % 16u] = vec4<f32>(a_at(row0 + mq, k0 + kk), a_at(row0 + mq + 1u, k0 + kk),
                a_at(row0 + mq + 2u, k0 + kk), a_at(row0 + mq + 3u, k0 + kk)); }",
            (true, true) => "{ let kk = t / 16u; let mq = (t % 16u) * 4u; var v = vec4<f32>(0.0);
            if (k0 + kk < dims.k && row0 + mq < dims.m) { v = a[((k0 + kk) * dims.m + row0 + mq) / 4u]; }
            sa[kk * 16u + t % 16u] = v; }",
        };
        let load_b = match (self.tb, self.vb) {
            (false, false) => "{ let kk = t / 16u; let nq = (t % 16u) * 4u;
            sb[kk * 16u + t % 16u] = vec4<f32>(b_at(k0 + kk, col0 + nq), b_at(k0 + kk, col0 + nq + 1u),
                b_at(k0 + kk, col0 + nq + 2u), b_at(k0 + kk, col0 + nq + 3u)); }",
            (false, true) => "{ let kk = t / 16u; let nq = (t % 16u) * 4u; var v = vec4<f32>(0.0);
            if (k0 + kk < dims.k && col0 + nq < dims.n) { v = b[((k0 + kk) * dims.n + col0 + nq) / 4u]; }
            sb[kk * 16u + t % 16u] = v; }",
            (true, false) => "{ let nn = t / 4u; let kq = (t % 4u) * 4u;
            for (var i = 0u; i < 4u; i++) { sb[(kq + i) * 16u + nn / 4u][nn % 4u] = b_at(k0 + kq + i, col0 + nn); } }",
            (true, true) => "{ let nn = t / 4u; let kq = (t % 4u) * 4u; var v = vec4<f32>(0.0);
            if (col0 + nn < dims.n && k0 + kq < dims.k) { v = b[((col0 + nn) * dims.k + k0 + kq) / 4u]; }
            for (var i = 0u; i < 4u; i++) { sb[(kq + i) * 16u + nn / 4u][nn % 4u] = v[i]; } }",
        };
        MATMUL
            .replace("{{A_ELEM}}", elem(self.va))
            .replace("{{B_ELEM}}", elem(self.vb))
            .replace("{{A_SCALAR}}", &a_scalar)
            .replace("{{B_SCALAR}}", &b_scalar)
            .replace("{{LOAD_A}}", load_a)
            .replace("{{LOAD_B}}", load_b)
    }
}

/// Every compute pipeline the backend uses, compiled once per device.
struct Kernels {
    im2col: wgpu::ComputePipeline,
    col2im: wgpu::ComputePipeline,
    pool_fwd: wgpu::ComputePipeline,
    pool_bwd: wgpu::ComputePipeline,
    relu_fwd: wgpu::ComputePipeline,
    relu_mask: wgpu::ComputePipeline,
    colsum: wgpu::ComputePipeline,
    softmax_ce: wgpu::ComputePipeline,
    finite_check: wgpu::ComputePipeline,
    optimizer: wgpu::ComputePipeline,
    matmul: HashMap<MatmulVariant, wgpu::ComputePipeline>,
}

fn pipeline(device: &wgpu::Device, label: &str, source: &str) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    })
}

impl Kernels {
    fn new(device: &wgpu::Device) -> Self {
        let op = |label: &str, body: &str| pipeline(device, label, &format!("{PRELUDE}\n{body}"));
        Self {
            im2col: op("im2col", include_str!("kernels/im2col.wgsl")),
            col2im: op("col2im", include_str!("kernels/col2im.wgsl")),
            pool_fwd: op("pool_fwd", include_str!("kernels/pool_fwd.wgsl")),
            pool_bwd: op("pool_bwd", include_str!("kernels/pool_bwd.wgsl")),
            relu_fwd: op("relu_fwd", include_str!("kernels/relu_fwd.wgsl")),
            relu_mask: op("relu_mask", include_str!("kernels/relu_mask.wgsl")),
            colsum: op("colsum", include_str!("kernels/colsum.wgsl")),
            softmax_ce: op("softmax_ce", include_str!("kernels/softmax_ce.wgsl")),
            finite_check: op("finite_check", include_str!("kernels/finite_check.wgsl")),
            optimizer: pipeline(device, "optimizer", include_str!("kernels/optimizer.wgsl")),
            matmul: HashMap::new(),
        }
    }

    fn matmul(&mut self, device: &wgpu::Device, v: MatmulVariant) -> wgpu::ComputePipeline {
        self.matmul
            .entry(v)
            .or_insert_with(|| pipeline(device, "matmul", &v.source()))
            .clone()
    }
}

/// A range of a buffer, in f32 elements.
#[derive(Clone, Copy)]
struct View<'a> {
    buf: &'a wgpu::Buffer,
    offset: usize,
    len: usize,
}

impl<'a> View<'a> {
    fn all(buf: &'a wgpu::Buffer) -> Self {
        Self {
            buf,
            offset: 0,
            len: (buf.size() / 4) as usize,
        }
    }

    fn binding(self) -> wgpu::BindingResource<'a> {
        // Ranges are rounded up to whole vec4s; the allocator leaves room for that.
        let size = (self.len.div_ceil(4) * 16) as u64;
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buf,
            offset: (self.offset * 4) as u64,
            size: NonZeroU64::new(size),
        })
    }
}

/// One recorded dispatch: pipeline, bindings and grid.
struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bind: wgpu::BindGroup,
    groups: [u32; 3],
}

/// Workgroup grid for one thread per element at 256 threads per workgroup.
fn grid(elements: usize) -> [u32; 3] {
    let groups = elements.div_ceil(256).max(1) as u32;
    let x = groups.min(65_535);
    [x, groups.div_ceil(x), 1]
}

/// Builds dispatches against one device.
struct Recorder<'d> {
    device: &'d wgpu::Device,
    kernels: &'d mut Kernels,
    dummy: wgpu::Buffer,
}

impl Recorder<'_> {
    fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        let mut padded = words.to_vec();
        padded.resize(words.len().div_ceil(4).max(1) * 4, 0);
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("shoal-uniform"),
                contents: bytemuck::cast_slice(&padded),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    fn bind(
        &self,
        pipeline: &wgpu::ComputePipeline,
        uniform: &wgpu::Buffer,
        views: &[View<'_>],
    ) -> wgpu::BindGroup {
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        entries.extend(views.iter().enumerate().map(|(i, v)| wgpu::BindGroupEntry {
            binding: i as u32 + 1,
            resource: v.binding(),
        }));
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// An element-wise or gather kernel over `n` elements with up to 11 size parameters.
    fn op(
        &self,
        pipeline: &wgpu::ComputePipeline,
        n: usize,
        params: &[usize],
        views: &[View<'_>],
    ) -> Dispatch {
        let mut words = vec![n as u32];
        words.extend(params.iter().map(|&p| p as u32));
        words.resize(12, 0);
        let uniform = self.uniform(&words);
        Dispatch {
            pipeline: pipeline.clone(),
            bind: self.bind(pipeline, &uniform, views),
            groups: grid(n),
        }
    }

    /// `c[m x n] = a · b (+ bias) (relu)` with the operands stored as `ta`/`tb` say.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &mut self,
        a: View<'_>,
        b: View<'_>,
        c: View<'_>,
        bias: Option<View<'_>>,
        (m, k, n): (usize, usize, usize),
        (ta, tb): (bool, bool),
        relu: bool,
    ) -> Dispatch {
        let variant = MatmulVariant::for_shape(m, k, n, ta, tb);
        let pipeline = self.kernels.matmul(self.device, variant);
        let flags = u32::from(bias.is_some()) | (u32::from(relu) << 1);
        let uniform = self.uniform(&[m as u32, n as u32, k as u32, flags]);
        let bias = bias.unwrap_or(View::all(&self.dummy));
        let bind = self.bind(&pipeline, &uniform, &[a, b, c, bias]);
        Dispatch {
            pipeline,
            bind,
            groups: [n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1],
        }
    }
}

impl Recorder<'_> {
    /// Backward of `y = a · w + b` over `rows` rows, given `g = dL/dy`: the weight
    /// gradient `aᵀ · g`, the bias gradient (column sums of `g`) and, when `da` is given,
    /// `g · wᵀ` into it. `w` is (weights, weight gradient, bias gradient). Dense layers
    /// use it on their input, convolutions on their im2col patches.
    fn linear_backward(
        &mut self,
        a: View<'_>,
        g: View<'_>,
        (w, gw, gb): (View<'_>, View<'_>, View<'_>),
        (rows, inp, out): (usize, usize, usize),
        da: Option<View<'_>>,
    ) -> Vec<Dispatch> {
        let mut out_d = vec![self.matmul(a, g, gw, None, (inp, rows, out), (true, false), false)];
        let k = self.kernels.colsum.clone();
        let mut sums = self.op(&k, 1, &[rows, out], &[g, gb]);
        sums.groups = [out as u32, 1, 1];
        out_d.push(sums);
        if let Some(da) = da {
            out_d.push(self.matmul(g, w, da, None, (rows, out, inp), (false, true), false));
        }
        out_d
    }
}

fn storage(device: &wgpu::Device, label: &str, floats: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        // Room to round any bound range up to whole vec4s (and never zero-sized).
        size: (floats.div_ceil(64).max(1) * 64 * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// Trains a [`Model`] with WGSL kernels at a fixed batch size.
pub struct GpuBackend {
    gpu: Gpu,
    model: Model,
    opt: Optimizer,
    batch: usize,
    params: wgpu::Buffer,
    grads: wgpu::Buffer,
    m: wgpu::Buffer,
    v: wgpu::Buffer,
    input: wgpu::Buffer,
    labels: wgpu::Buffer,
    /// `[flag, loss of row 0, loss of row 1, ...]`.
    loss: wgpu::Buffer,
    opt_uniform: wgpu::Buffer,
    /// Forward, loss and backward dispatches of one step.
    pass: Vec<Dispatch>,
    opt_dispatch: Dispatch,
    t: u32,
    /// Activations and scratch: referenced by the bind groups, kept alive here.
    _scratch: Vec<wgpu::Buffer>,
}

impl GpuBackend {
    /// Allocates every buffer and records every dispatch for `batch` samples per step.
    pub fn new(
        gpu: &Gpu,
        model: Model,
        opt: Optimizer,
        params: &[f32],
        batch: usize,
    ) -> Result<Self, EngineError> {
        opt.validate()?;
        check_params(&model, params)?;
        if batch == 0 {
            return Err(EngineError::BadBatch("batch size 0".into()));
        }
        if model.is_language_model() {
            return Err(EngineError::Unsupported(
                "the WGSL backend has no transformer kernels yet; language models train on \
                 the CPU backend",
            ));
        }
        if matches!(opt, Optimizer::AdamW { .. }) {
            return Err(EngineError::Unsupported(
                "the WGSL backend has no AdamW yet; it trains on the CPU backend",
            ));
        }
        let device = &gpu.device;
        let plen = model.param_len();
        let p_buf = storage(device, "params", plen);
        gpu.queue
            .write_buffer(&p_buf, 0, bytemuck::cast_slice(params));
        let grads = storage(device, "grads", plen);
        let m_buf = storage(device, "opt-m", plen);
        let v_buf = storage(device, "opt-v", plen);
        let n_ops = model.ops.len();
        let acts: Vec<wgpu::Buffer> = (0..=n_ops)
            .map(|i| storage(device, "activation", batch * model.act_len(i)))
            .collect();
        let max_act = (0..=n_ops).map(|i| model.act_len(i)).max().unwrap_or(1);
        let g = [
            storage(device, "grad-a", batch * max_act),
            storage(device, "grad-b", batch * max_act),
        ];
        let labels = storage(device, "labels", batch);
        let loss = storage(device, "loss", batch + 1);
        let mut cols: Vec<Option<wgpu::Buffer>> = Vec::new();
        let mut argmax: Vec<Option<wgpu::Buffer>> = Vec::new();
        let mut dcols_len = 1;
        for (i, op) in model.ops.iter().enumerate() {
            match *op {
                Op::Conv {
                    input,
                    output,
                    kernel,
                    ..
                } => {
                    let len = batch * output[0] * output[1] * kernel * kernel * input[2];
                    cols.push(Some(storage(device, "im2col", len)));
                    if i > 0 {
                        dcols_len = dcols_len.max(len);
                    }
                    argmax.push(None);
                }
                Op::Pool { .. } => {
                    cols.push(None);
                    argmax.push(Some(storage(device, "argmax", batch * op.out_len())));
                }
                _ => {
                    cols.push(None);
                    argmax.push(None);
                }
            }
        }
        let dcols = storage(device, "dcols", dcols_len);

        let mut kernels = Kernels::new(device);
        let mut rec = Recorder {
            device,
            kernels: &mut kernels,
            dummy: storage(device, "dummy", 4),
        };
        let tensor = |idx: usize, buf| {
            let t = &model.tensors[idx];
            View {
                buf,
                offset: t.offset,
                len: t.len(),
            }
        };
        let mut pass = Vec::new();
        // Forward.
        for (i, op) in model.ops.iter().enumerate() {
            let (x, y) = (View::all(&acts[i]), View::all(&acts[i + 1]));
            match *op {
                Op::Dense {
                    inp,
                    out,
                    weight,
                    relu,
                } => pass.push(rec.matmul(
                    x,
                    tensor(weight, &p_buf),
                    y,
                    Some(tensor(weight + 1, &p_buf)),
                    (batch, inp, out),
                    (false, false),
                    relu,
                )),
                Op::Conv {
                    input,
                    output,
                    kernel,
                    stride,
                    padding,
                    weight,
                    relu,
                } => {
                    let c = View::all(cols[i].as_ref().expect("conv has cols"));
                    let rows = batch * output[0] * output[1];
                    let kkc = kernel * kernel * input[2];
                    let k = &rec.kernels.im2col.clone();
                    pass.push(rec.op(
                        k,
                        rows * kkc,
                        &[
                            input[0], input[1], input[2], output[0], output[1], kernel, stride,
                            padding,
                        ],
                        &[x, c],
                    ));
                    pass.push(rec.matmul(
                        c,
                        tensor(weight, &p_buf),
                        y,
                        Some(tensor(weight + 1, &p_buf)),
                        (rows, kkc, output[2]),
                        (false, false),
                        relu,
                    ));
                }
                Op::Pool {
                    input,
                    output,
                    size,
                } => {
                    let arg = View::all(argmax[i].as_ref().expect("pool has argmax"));
                    let k = &rec.kernels.pool_fwd.clone();
                    pass.push(rec.op(
                        k,
                        batch * op.out_len(),
                        &[input[0], input[1], input[2], output[0], output[1], size],
                        &[x, y, arg],
                    ));
                }
                Op::Relu { len } => {
                    let k = &rec.kernels.relu_fwd.clone();
                    pass.push(rec.op(k, batch * len, &[], &[x, y]));
                }
                Op::Embed { .. } | Op::Block { .. } | Op::Norm { .. } | Op::Head { .. } => {
                    return Err(EngineError::Unsupported("transformer ops"));
                }
            }
        }
        // Loss.
        let k = &rec.kernels.softmax_ce.clone();
        pass.push(rec.op(
            k,
            batch,
            &[model.classes()],
            &[
                View::all(&acts[n_ops]),
                View::all(&labels),
                View::all(&g[0]),
                View::all(&loss),
            ],
        ));
        // Backward, ping-ponging between the two gradient buffers.
        let mut cur = 0usize;
        for (i, op) in model.ops.iter().enumerate().rev() {
            let (x, y) = (View::all(&acts[i]), View::all(&acts[i + 1]));
            let (gc, go) = (View::all(&g[cur]), View::all(&g[1 - cur]));
            let mask = |rec: &mut Recorder<'_>, n: usize| {
                let k = rec.kernels.relu_mask.clone();
                rec.op(&k, n, &[], &[y, gc])
            };
            match *op {
                Op::Dense {
                    inp,
                    out,
                    weight,
                    relu,
                } => {
                    if relu {
                        pass.push(mask(&mut rec, batch * out));
                    }
                    let w = (
                        tensor(weight, &p_buf),
                        tensor(weight, &grads),
                        tensor(weight + 1, &grads),
                    );
                    let dx = (i > 0).then_some(go);
                    pass.extend(rec.linear_backward(x, gc, w, (batch, inp, out), dx));
                    if i > 0 {
                        cur = 1 - cur;
                    }
                }
                Op::Conv {
                    input,
                    output,
                    kernel,
                    stride,
                    padding,
                    weight,
                    relu,
                } => {
                    let rows = batch * output[0] * output[1];
                    let (kkc, f) = (kernel * kernel * input[2], output[2]);
                    if relu {
                        pass.push(mask(&mut rec, rows * f));
                    }
                    let c = View::all(cols[i].as_ref().expect("conv has cols"));
                    let w = (
                        tensor(weight, &p_buf),
                        tensor(weight, &grads),
                        tensor(weight + 1, &grads),
                    );
                    let dc = View::all(&dcols);
                    let dx = (i > 0).then_some(dc);
                    pass.extend(rec.linear_backward(c, gc, w, (rows, kkc, f), dx));
                    if i > 0 {
                        let k = rec.kernels.col2im.clone();
                        let n_in = batch * input.iter().product::<usize>();
                        pass.push(rec.op(
                            &k,
                            n_in,
                            &[
                                input[0], input[1], input[2], output[0], output[1], kernel, stride,
                                padding,
                            ],
                            &[dc, go],
                        ));
                        cur = 1 - cur;
                    }
                }
                Op::Pool {
                    input,
                    output,
                    size,
                } => {
                    if i > 0 {
                        let arg = View::all(argmax[i].as_ref().expect("pool has argmax"));
                        let k = rec.kernels.pool_bwd.clone();
                        pass.push(rec.op(
                            &k,
                            batch * input.iter().product::<usize>(),
                            &[input[0], input[1], input[2], output[0], output[1], size],
                            &[gc, arg, go],
                        ));
                        cur = 1 - cur;
                    }
                }
                Op::Relu { len } => {
                    if i > 0 {
                        pass.push(mask(&mut rec, batch * len));
                    }
                }
                Op::Embed { .. } | Op::Block { .. } | Op::Norm { .. } | Op::Head { .. } => {
                    return Err(EngineError::Unsupported("transformer ops"));
                }
            }
        }
        let k = rec.kernels.finite_check.clone();
        pass.push(rec.op(
            &k,
            plen,
            &[],
            &[
                View {
                    buf: &grads,
                    offset: 0,
                    len: plen,
                },
                View::all(&loss),
            ],
        ));
        let opt_uniform = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("optimizer"),
            size: 32,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let opt_pipeline = rec.kernels.optimizer.clone();
        let opt_bind = rec.bind(
            &opt_pipeline,
            &opt_uniform,
            &[
                View {
                    buf: &p_buf,
                    offset: 0,
                    len: plen,
                },
                View {
                    buf: &grads,
                    offset: 0,
                    len: plen,
                },
                View {
                    buf: &m_buf,
                    offset: 0,
                    len: plen,
                },
                View {
                    buf: &v_buf,
                    offset: 0,
                    len: plen,
                },
                View::all(&loss),
            ],
        );
        let opt_dispatch = Dispatch {
            pipeline: opt_pipeline,
            bind: opt_bind,
            groups: grid(plen),
        };
        let input = acts[0].clone();
        let mut scratch = acts;
        scratch.extend(g);
        scratch.extend(cols.into_iter().flatten());
        scratch.extend(argmax.into_iter().flatten());
        scratch.push(dcols);
        scratch.push(rec.dummy);
        Ok(Self {
            gpu: gpu.clone(),
            model,
            opt,
            batch,
            params: p_buf,
            grads,
            m: m_buf,
            v: v_buf,
            input,
            labels,
            loss,
            opt_uniform,
            pass,
            opt_dispatch,
            t: 0,
            _scratch: scratch,
        })
    }

    /// Samples per step.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Uploads a batch and records forward + backward (+ the optimizer) into one submit.
    fn encode(&mut self, inputs: &[f32], labels: &[u8], update: bool) -> Result<(), EngineError> {
        check_batch(&self.model, inputs, labels)?;
        if labels.len() != self.batch {
            return Err(EngineError::BadBatch(format!(
                "{} samples; this GPU backend was built for batches of {}",
                labels.len(),
                self.batch
            )));
        }
        let q = &self.gpu.queue;
        q.write_buffer(&self.input, 0, bytemuck::cast_slice(inputs));
        let labels32: Vec<u32> = labels.iter().map(|&l| u32::from(l)).collect();
        q.write_buffer(&self.labels, 0, bytemuck::cast_slice(&labels32));
        if update {
            self.t += 1;
            q.write_buffer(&self.opt_uniform, 0, &self.opt_words());
        }
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(&self.loss, 0, None);
        {
            let mut cpass = encoder.begin_compute_pass(&Default::default());
            let tail = if update {
                Some(&self.opt_dispatch)
            } else {
                None
            };
            for d in self.pass.iter().chain(tail) {
                cpass.set_pipeline(&d.pipeline);
                cpass.set_bind_group(0, &d.bind, &[]);
                cpass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
            }
        }
        q.submit([encoder.finish()]);
        Ok(())
    }

    fn opt_words(&self) -> [u8; 32] {
        let t = self.t as i32;
        let (kind, lr, b1, b2, eps, c1, c2) = match self.opt {
            Optimizer::Sgd { lr, momentum } => (0u32, lr, momentum, 0.0, 0.0, 1.0, 1.0),
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => (
                1u32,
                lr,
                beta1,
                beta2,
                eps,
                1.0 - beta1.powi(t),
                1.0 - beta2.powi(t),
            ),
            // Refused in `new`.
            Optimizer::AdamW { .. } => unreachable!("AdamW is refused when the backend is made"),
        };
        let mut out = [0u8; 32];
        let words: [u32; 8] = [
            self.model.param_len() as u32,
            kind,
            lr.to_bits(),
            b1.to_bits(),
            b2.to_bits(),
            eps.to_bits(),
            c1.to_bits(),
            c2.to_bits(),
        ];
        out.copy_from_slice(bytemuck::cast_slice(&words));
        out
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> &'static str {
        "webgpu"
    }

    fn model(&self) -> &Model {
        &self.model
    }

    fn step(&mut self, inputs: &[f32], labels: &[u8]) -> Result<(), EngineError> {
        self.encode(inputs, labels, true)
    }

    async fn loss(&mut self) -> Result<f32, EngineError> {
        let v = self.gpu.read_f32(&self.loss, self.batch + 1).await?;
        let mean = v[1..].iter().map(|&l| f64::from(l)).sum::<f64>() / self.batch as f64;
        if v[0] != 0.0 || !mean.is_finite() {
            return Err(EngineError::NonFinite("loss"));
        }
        Ok(mean as f32)
    }

    async fn params(&mut self) -> Result<Vec<f32>, EngineError> {
        Ok(self
            .gpu
            .read_f32(&self.params, self.model.param_len())
            .await?)
    }

    fn set_learning_rate(&mut self, lr: f32) -> Result<(), EngineError> {
        self.opt = self.opt.with_lr(lr)?;
        Ok(())
    }

    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError> {
        check_params(&self.model, params)?;
        self.gpu
            .queue
            .write_buffer(&self.params, 0, bytemuck::cast_slice(params));
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(&self.m, 0, None);
        encoder.clear_buffer(&self.v, 0, None);
        self.gpu.queue.submit([encoder.finish()]);
        self.t = 0;
        Ok(())
    }

    fn load_weights(&mut self, params: &[f32]) -> Result<(), EngineError> {
        check_params(&self.model, params)?;
        self.gpu
            .queue
            .write_buffer(&self.params, 0, bytemuck::cast_slice(params));
        Ok(())
    }

    async fn gradients(
        &mut self,
        inputs: &[f32],
        labels: &[u8],
    ) -> Result<(f32, Vec<f32>), EngineError> {
        self.encode(inputs, labels, false)?;
        let loss = self.loss().await?;
        let grads = self
            .gpu
            .read_f32(&self.grads, self.model.param_len())
            .await?;
        Ok((loss, grads))
    }
}

/// One matrix product set up on the GPU (buffers, pipeline, bindings), ready to be run
/// many times: the matmul kernel on its own, for the conformance suite and benchmarks.
pub struct MatmulRunner {
    gpu: Gpu,
    c: wgpu::Buffer,
    dispatch: Dispatch,
    len: usize,
    _inputs: [wgpu::Buffer; 3],
}

impl MatmulRunner {
    /// Uploads `a` (`m x k`, stored `k x m` if `ta`) and `b` (`k x n`, stored `n x k` if
    /// `tb`) and records `c = a · b`.
    pub fn new(
        gpu: &Gpu,
        a: &[f32],
        b: &[f32],
        (m, k, n): (usize, usize, usize),
        (ta, tb): (bool, bool),
    ) -> Self {
        let device = &gpu.device;
        let (ab, bb, cb) = (
            storage(device, "a", m * k),
            storage(device, "b", k * n),
            storage(device, "c", m * n),
        );
        gpu.queue.write_buffer(&ab, 0, bytemuck::cast_slice(a));
        gpu.queue.write_buffer(&bb, 0, bytemuck::cast_slice(b));
        let mut kernels = Kernels::new(device);
        let mut rec = Recorder {
            device,
            kernels: &mut kernels,
            dummy: storage(device, "dummy", 4),
        };
        let dispatch = rec.matmul(
            View::all(&ab),
            View::all(&bb),
            View::all(&cb),
            None,
            (m, k, n),
            (ta, tb),
            false,
        );
        Self {
            gpu: gpu.clone(),
            c: cb,
            dispatch,
            len: m * n,
            _inputs: [ab, bb, rec.dummy],
        }
    }

    /// Enqueues `reps` products (one submit).
    pub fn run(&self, reps: usize) {
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.dispatch.pipeline);
            pass.set_bind_group(0, &self.dispatch.bind, &[]);
            for _ in 0..reps {
                let [x, y, z] = self.dispatch.groups;
                pass.dispatch_workgroups(x, y, z);
            }
        }
        self.gpu.queue.submit([encoder.finish()]);
    }

    /// Waits for everything enqueued and returns the product.
    pub async fn result(&self) -> Result<Vec<f32>, EngineError> {
        Ok(self.gpu.read_f32(&self.c, self.len).await?)
    }
}

/// Runs one matrix product on the GPU and reads it back (see [`MatmulRunner::new`]).
pub async fn matmul_once(
    gpu: &Gpu,
    a: &[f32],
    b: &[f32],
    shape: (usize, usize, usize),
    trans: (bool, bool),
) -> Result<Vec<f32>, EngineError> {
    let runner = MatmulRunner::new(gpu, a, b, shape, trans);
    runner.run(1);
    runner.result().await
}

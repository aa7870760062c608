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

/// A WGSL kernel's text as `build.rs` leaves it (without comments and indentation).
macro_rules! kernel {
    ($($name:tt)*) => {
        include_str!(concat!(env!("OUT_DIR"), "/kernels/", $($name)*, ".wgsl"))
    };
}

const MATMUL: &str = kernel!("matmul");
const PRELUDE: &str = kernel!("ops");

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

/// Every compute pipeline the backend uses, compiled once per device: a backend takes
/// them from its [`Gpu`] and gives them back when it has recorded its passes, so the next
/// backend on the device reuses them (at most 16 matrix-product variants and three
/// attention kernels per head width). A browser compiles a pipeline when it first runs:
/// Chromium's SwiftShader took 3 to 13 s for each new backend's first step, every backend
/// compiling the same kernels again.
pub(crate) struct Kernels {
    relu_fwd: wgpu::ComputePipeline,
    relu_mask: wgpu::ComputePipeline,
    colsum: wgpu::ComputePipeline,
    softmax_ce: wgpu::ComputePipeline,
    finite_check: wgpu::ComputePipeline,
    pub(crate) optimizer: wgpu::ComputePipeline,
    /// The convolutions' and poolings' kernels, compiled only when a model has such a
    /// layer: a multilayer perceptron's backend compiles four kernels fewer.
    pub(crate) conv: Option<ConvKernels>,
    /// The language models' kernels (and the clip's norm), compiled only when a model or
    /// optimizer needs them.
    lm: Option<LmKernels>,
    pub(crate) matmul: HashMap<MatmulVariant, wgpu::ComputePipeline>,
    /// Attention kernels per (kind, head width): forward, dq, dk/dv.
    attention: HashMap<(Attention, usize), wgpu::ComputePipeline>,
}

/// The kernels of convolutions (as matrix products over im2col's columns) and pooling.
pub(crate) struct ConvKernels {
    pub(crate) im2col: wgpu::ComputePipeline,
    col2im: wgpu::ComputePipeline,
    pool_fwd: wgpu::ComputePipeline,
    pool_bwd: wgpu::ComputePipeline,
}

/// The element-wise and reduction kernels of language models and of AdamW's clip.
struct LmKernels {
    embed_fwd: wgpu::ComputePipeline,
    embed_bwd_pos: wgpu::ComputePipeline,
    embed_bwd_tok: wgpu::ComputePipeline,
    ln_fwd: wgpu::ComputePipeline,
    ln_bwd: wgpu::ComputePipeline,
    ln_dgain: wgpu::ComputePipeline,
    gelu_fwd: wgpu::ComputePipeline,
    gelu_bwd: wgpu::ComputePipeline,
    add: wgpu::ComputePipeline,
    attn_rowdot: wgpu::ComputePipeline,
    sumsq: wgpu::ComputePipeline,
}

/// The kernel `kernels/NAME.wgsl` after the shared prelude, labelled NAME.
macro_rules! prelude_kernel {
    ($device:expr, $name:ident) => {
        prelude_pipeline($device, stringify!($name), kernel!(stringify!($name)))
    };
}

impl ConvKernels {
    fn new(device: &wgpu::Device) -> Self {
        Self {
            im2col: prelude_kernel!(device, im2col),
            col2im: prelude_kernel!(device, col2im),
            pool_fwd: prelude_kernel!(device, pool_fwd),
            pool_bwd: prelude_kernel!(device, pool_bwd),
        }
    }
}

impl LmKernels {
    fn new(device: &wgpu::Device) -> Self {
        Self {
            embed_fwd: prelude_kernel!(device, embed_fwd),
            embed_bwd_pos: prelude_kernel!(device, embed_bwd_pos),
            embed_bwd_tok: prelude_kernel!(device, embed_bwd_tok),
            ln_fwd: prelude_kernel!(device, ln_fwd),
            ln_bwd: prelude_kernel!(device, ln_bwd),
            ln_dgain: prelude_kernel!(device, ln_dgain),
            gelu_fwd: prelude_kernel!(device, gelu_fwd),
            gelu_bwd: prelude_kernel!(device, gelu_bwd),
            add: prelude_kernel!(device, add),
            attn_rowdot: prelude_kernel!(device, attn_rowdot),
            sumsq: prelude_kernel!(device, sumsq),
        }
    }
}

/// The three attention kernels, specialized per head width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Attention {
    Forward,
    BackwardQ,
    BackwardKv,
}

/// Widest attention head the WGSL kernels take (each thread keeps up to four head-wide
/// rows in registers).
pub const MAX_HEAD_DIM: usize = 128;

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

/// A kernel from `body` after the shared prelude (`ops.wgsl`: the uniform block, helpers).
fn prelude_pipeline(device: &wgpu::Device, label: &str, body: &str) -> wgpu::ComputePipeline {
    pipeline(device, label, &format!("{PRELUDE}\n{body}"))
}

impl Kernels {
    fn new(device: &wgpu::Device) -> Self {
        Self {
            relu_fwd: prelude_kernel!(device, relu_fwd),
            relu_mask: prelude_kernel!(device, relu_mask),
            colsum: prelude_kernel!(device, colsum),
            softmax_ce: prelude_kernel!(device, softmax_ce),
            finite_check: prelude_kernel!(device, finite_check),
            optimizer: pipeline(device, "optimizer", kernel!("optimizer")),
            conv: None,
            lm: None,
            matmul: HashMap::new(),
            attention: HashMap::new(),
        }
    }

    /// The kernels an earlier backend on `gpu` compiled, or new ones, held until the
    /// returned guard drops.
    fn of(gpu: &Gpu) -> Held<'_> {
        let held = gpu
            .kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        Held {
            gpu,
            kernels: Some(held.unwrap_or_else(|| Self::new(&gpu.device))),
        }
    }

    /// Hands these kernels back to `gpu` for the next backend, merged with any another
    /// backend built meanwhile (natively, on another thread) handed back first.
    fn keep(mut self, gpu: &Gpu) {
        let mut slot = gpu
            .kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(other) = slot.take() {
            if self.conv.is_none() {
                self.conv = other.conv;
            }
            if self.lm.is_none() {
                self.lm = other.lm;
            }
            for (v, p) in other.matmul {
                self.matmul.entry(v).or_insert(p);
            }
            for (a, p) in other.attention {
                self.attention.entry(a).or_insert(p);
            }
        }
        *slot = Some(self);
    }

    fn lm(&mut self, device: &wgpu::Device) -> &LmKernels {
        self.lm.get_or_insert_with(|| LmKernels::new(device))
    }

    fn conv(&mut self, device: &wgpu::Device) -> &ConvKernels {
        self.conv.get_or_insert_with(|| ConvKernels::new(device))
    }

    fn attention(
        &mut self,
        device: &wgpu::Device,
        kind: Attention,
        head_dim: usize,
    ) -> wgpu::ComputePipeline {
        self.attention
            .entry((kind, head_dim))
            .or_insert_with(|| {
                const STAGE_KV: &str = kernel!("attn_stage_kv");
                let body = match kind {
                    Attention::Forward => {
                        format!("{}\n{STAGE_KV}", kernel!("attn_fwd"))
                    }
                    Attention::BackwardQ => {
                        format!("{}\n{STAGE_KV}", kernel!("attn_bwd_dq"))
                    }
                    Attention::BackwardKv => kernel!("attn_bwd_dkv").into(),
                };
                // Rows of keys (or queries) staged per tile: two tiles of KT x HD floats
                // stay within WebGPU's default 16 KiB of workgroup memory.
                let kt = (1024 / head_dim).clamp(1, 16);
                let src = body
                    .replace("{{HD}}", &head_dim.to_string())
                    .replace("{{KTHD}}", &(kt * head_dim).to_string())
                    .replace("{{KT}}", &kt.to_string());
                prelude_pipeline(device, "attention", &src)
            })
            .clone()
    }

    fn matmul(&mut self, device: &wgpu::Device, v: MatmulVariant) -> wgpu::ComputePipeline {
        self.matmul
            .entry(v)
            .or_insert_with(|| pipeline(device, "matmul", &v.source()))
            .clone()
    }
}

/// A backend's hold on its device's kernels while it records its passes. They go back to
/// the device when this drops, so a build that returns early with an error (or, natively,
/// panics part way) leaves them to the next backend instead of losing them.
struct Held<'g> {
    gpu: &'g Gpu,
    kernels: Option<Kernels>,
}

impl std::ops::Deref for Held<'_> {
    type Target = Kernels;
    fn deref(&self) -> &Kernels {
        self.kernels.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Kernels {
        self.kernels.as_mut().expect("held until dropped")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(kernels) = self.kernels.take() {
            kernels.keep(self.gpu);
        }
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
    fn lm(&mut self) -> &LmKernels {
        self.kernels.lm(self.device)
    }

    fn conv(&mut self) -> &ConvKernels {
        self.kernels.conv(self.device)
    }

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

impl Recorder<'_> {
    /// `c = a · b` without bias or rectifier.
    fn product(
        &mut self,
        a: View<'_>,
        b: View<'_>,
        c: View<'_>,
        shape: (usize, usize, usize),
        trans: (bool, bool),
    ) -> Dispatch {
        self.matmul(a, b, c, None, shape, trans, false)
    }

    /// `c = a · w + bias` for `(w, bias)`.
    fn linear(
        &mut self,
        a: View<'_>,
        (w, bias): (View<'_>, View<'_>),
        c: View<'_>,
        shape: (usize, usize, usize),
    ) -> Dispatch {
        self.matmul(a, w, c, Some(bias), shape, (false, false), false)
    }

    /// One of the attention kernels over `n` samples of `ctx` positions: a workgroup per
    /// 64 positions of one (sample, head).
    fn attention(
        &mut self,
        kind: Attention,
        head_dim: usize,
        (n, ctx, dim, heads): (usize, usize, usize, usize),
        views: &[View<'_>],
    ) -> Dispatch {
        let pipeline = self.kernels.attention(self.device, kind, head_dim);
        let mut words = [0u32; 12];
        words[1] = ctx as u32;
        words[2] = dim as u32;
        words[3] = heads as u32;
        let uniform = self.uniform(&words);
        let bind = self.bind(&pipeline, &uniform, views);
        Dispatch {
            pipeline,
            bind,
            groups: [ctx.div_ceil(64) as u32, heads as u32, n as u32],
        }
    }

    /// Backward of a layer norm over `rows` rows of `dim`: the input gradient into `dx`
    /// (plus `res`, a residual path's gradient, when given), and the gain and bias
    /// gradients. `t` is (gain, gain gradient, bias gradient).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &mut self,
        x: View<'_>,
        stats: View<'_>,
        (gain, dgain, dbias): (View<'_>, View<'_>, View<'_>),
        dy: View<'_>,
        dx: View<'_>,
        res: Option<View<'_>>,
        (rows, dim): (usize, usize),
    ) -> Vec<Dispatch> {
        let k = self.lm().ln_bwd.clone();
        let residual = res.unwrap_or(View::all(&self.dummy));
        let mut out = vec![self.op(
            &k,
            rows,
            &[dim, usize::from(res.is_some())],
            &[x, stats, gain, dy, dx, residual],
        )];
        let k = self.lm().ln_dgain.clone();
        let mut d = self.op(&k, 1, &[rows, dim], &[x, stats, dy, dgain]);
        d.groups = [dim as u32, 1, 1];
        out.push(d);
        let k = self.kernels.colsum.clone();
        let mut d = self.op(&k, 1, &[rows, dim], &[dy, dbias]);
        d.groups = [dim as u32, 1, 1];
        out.push(d);
        out
    }
}

/// A transformer block's saved buffers as views: ln1 output, ln1 statistics, packed
/// q/k/v, attention output, log-sum-exps, h1, ln2 output, ln2 statistics, MLP
/// pre-activation, MLP activation.
fn block_views(saved: &[wgpu::Buffer]) -> [View<'_>; 10] {
    std::array::from_fn(|k| View::all(&saved[k]))
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
    /// The update: the gradient's global norm (AdamW), then the optimizer.
    opt_dispatch: Vec<Dispatch>,
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
        if model
            .ops
            .iter()
            .any(|op| matches!(*op, Op::Block { dim, heads, .. } if dim / heads > MAX_HEAD_DIM))
        {
            return Err(EngineError::Unsupported(
                "attention heads wider than 128 (the WGSL kernels keep a head's rows in \
                 registers)",
            ));
        }
        let device = &gpu.device;
        let rows = batch * model.positions();
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
        let labels = storage(device, "labels", rows);
        let loss = storage(device, "loss", rows + 1);
        // What transformer blocks and layer norms keep for their backward pass, per op,
        // and the blocks' shared backward scratch.
        let mut saved: Vec<Vec<wgpu::Buffer>> = Vec::new();
        let mut block_scratch = [1usize; 4];
        for op in &model.ops {
            saved.push(match *op {
                Op::Block {
                    ctx,
                    dim,
                    heads,
                    hidden,
                    ..
                } => {
                    let r = batch * ctx;
                    let lse = batch * heads * ctx;
                    block_scratch = [
                        block_scratch[0].max(r * hidden),
                        block_scratch[1].max(r * dim),
                        block_scratch[2].max(3 * r * dim),
                        block_scratch[3].max(lse),
                    ];
                    [
                        ("ln1", r * dim),
                        ("ln1-stats", 2 * r),
                        ("qkv", 3 * r * dim),
                        ("attention", r * dim),
                        ("lse", lse),
                        ("h1", r * dim),
                        ("ln2", r * dim),
                        ("ln2-stats", 2 * r),
                        ("mlp-pre", r * hidden),
                        ("mlp-act", r * hidden),
                    ]
                    .iter()
                    .map(|&(label, len)| storage(device, label, len))
                    .collect()
                }
                Op::Norm { rows: per, .. } => vec![storage(device, "ln-stats", 2 * batch * per)],
                _ => Vec::new(),
            });
        }
        let [wide, narrow, dqkv, row_dots] = [
            ("d-mlp", block_scratch[0]),
            ("d-narrow", block_scratch[1]),
            ("d-qkv", block_scratch[2]),
            ("d-rowdot", block_scratch[3]),
        ]
        .map(|(label, len)| storage(device, label, len));
        let dh1 = storage(device, "d-h1", block_scratch[1]);
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

        let mut kernels = Kernels::of(gpu);
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
                    let k = &rec.conv().im2col.clone();
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
                    let k = &rec.conv().pool_fwd.clone();
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
                Op::Embed { ctx, dim, tok, .. } => {
                    let k = rec.lm().embed_fwd.clone();
                    pass.push(rec.op(
                        &k,
                        batch * ctx * dim,
                        &[dim, ctx],
                        &[x, tensor(tok, &p_buf), tensor(tok + 1, &p_buf), y],
                    ));
                }
                Op::Block {
                    ctx,
                    dim,
                    heads,
                    hidden,
                    first,
                } => {
                    let w = |k: usize| tensor(first + k, &p_buf);
                    let [a, st1, qkv, o, lse, h1, b, st2, u, act] = block_views(&saved[i]);
                    let r = batch * ctx;
                    let hd = dim / heads;
                    let k = rec.lm().ln_fwd.clone();
                    pass.push(rec.op(&k, r, &[dim], &[x, w(0), w(1), a, st1]));
                    pass.push(rec.linear(a, (w(2), w(3)), qkv, (r, dim, 3 * dim)));
                    pass.push(rec.attention(
                        Attention::Forward,
                        hd,
                        (batch, ctx, dim, heads),
                        &[qkv, o, lse],
                    ));
                    pass.push(rec.linear(o, (w(4), w(5)), h1, (r, dim, dim)));
                    let k = rec.lm().add.clone();
                    pass.push(rec.op(&k, r * dim, &[], &[x, h1]));
                    let k = rec.lm().ln_fwd.clone();
                    pass.push(rec.op(&k, r, &[dim], &[h1, w(6), w(7), b, st2]));
                    pass.push(rec.linear(b, (w(8), w(9)), u, (r, dim, hidden)));
                    let k = rec.lm().gelu_fwd.clone();
                    pass.push(rec.op(&k, r * hidden, &[], &[u, act]));
                    pass.push(rec.linear(act, (w(10), w(11)), y, (r, hidden, dim)));
                    let k = rec.lm().add.clone();
                    pass.push(rec.op(&k, r * dim, &[], &[h1, y]));
                }
                Op::Norm {
                    rows: per,
                    dim,
                    gain,
                } => {
                    let stats = View::all(&saved[i][0]);
                    let k = rec.lm().ln_fwd.clone();
                    pass.push(rec.op(
                        &k,
                        batch * per,
                        &[dim],
                        &[x, tensor(gain, &p_buf), tensor(gain + 1, &p_buf), y, stats],
                    ));
                }
                Op::Head {
                    ctx,
                    dim,
                    vocab,
                    weight,
                    tied,
                } => pass.push(rec.matmul(
                    x,
                    tensor(weight, &p_buf),
                    y,
                    None,
                    (batch * ctx, dim, vocab),
                    (false, tied),
                    false,
                )),
            }
        }
        // Loss.
        let k = &rec.kernels.softmax_ce.clone();
        pass.push(rec.op(
            k,
            rows,
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
                        let k = rec.conv().col2im.clone();
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
                        let k = rec.conv().pool_bwd.clone();
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
                Op::Embed {
                    ctx,
                    vocab,
                    dim,
                    tok,
                    tied,
                } => {
                    let k = rec.lm().embed_bwd_pos.clone();
                    pass.push(rec.op(
                        &k,
                        ctx * dim,
                        &[dim, ctx, batch],
                        &[gc, tensor(tok + 1, &grads)],
                    ));
                    let k = rec.lm().embed_bwd_tok.clone();
                    pass.push(rec.op(
                        &k,
                        vocab * dim,
                        &[dim, batch * ctx, usize::from(tied)],
                        &[x, gc, tensor(tok, &grads)],
                    ));
                }
                Op::Block {
                    ctx,
                    dim,
                    heads,
                    hidden,
                    first,
                } => {
                    let w = |k: usize| tensor(first + k, &p_buf);
                    let gw = |k: usize| tensor(first + k, &grads);
                    let [a, st1, qkv, o, lse, h1, b, st2, u, act] = block_views(&saved[i]);
                    let (wide, narrow, dqkv, dd, dh1) = (
                        View::all(&wide),
                        View::all(&narrow),
                        View::all(&dqkv),
                        View::all(&row_dots),
                        View::all(&dh1),
                    );
                    let r = batch * ctx;
                    let hd = dim / heads;
                    // MLP: y = h1 + act · W2 + b2, act = gelu(u), u = b · W1 + b1.
                    pass.extend(rec.linear_backward(
                        act,
                        gc,
                        (w(10), gw(10), gw(11)),
                        (r, hidden, dim),
                        Some(wide),
                    ));
                    let k = rec.lm().gelu_bwd.clone();
                    pass.push(rec.op(&k, r * hidden, &[], &[u, wide]));
                    pass.extend(rec.linear_backward(
                        b,
                        wide,
                        (w(8), gw(8), gw(9)),
                        (r, dim, hidden),
                        Some(narrow),
                    ));
                    // h1's gradient: the residual path plus ln2's backward.
                    pass.extend(rec.layer_norm_backward(
                        h1,
                        st2,
                        (w(6), gw(6), gw(7)),
                        narrow,
                        dh1,
                        Some(gc),
                        (r, dim),
                    ));
                    // Attention: h1 = x + o · Wo + bo.
                    pass.extend(rec.linear_backward(
                        o,
                        dh1,
                        (w(4), gw(4), gw(5)),
                        (r, dim, dim),
                        Some(narrow),
                    ));
                    let k = rec.lm().attn_rowdot.clone();
                    pass.push(rec.op(
                        &k,
                        batch * heads * ctx,
                        &[ctx, dim, heads, hd],
                        &[o, narrow, dd],
                    ));
                    let views = [qkv, narrow, lse, dd, dqkv];
                    pass.push(rec.attention(
                        Attention::BackwardQ,
                        hd,
                        (batch, ctx, dim, heads),
                        &views,
                    ));
                    pass.push(rec.attention(
                        Attention::BackwardKv,
                        hd,
                        (batch, ctx, dim, heads),
                        &views,
                    ));
                    pass.extend(rec.linear_backward(
                        a,
                        dqkv,
                        (w(2), gw(2), gw(3)),
                        (r, dim, 3 * dim),
                        Some(narrow),
                    ));
                    // x's gradient: the residual path plus ln1's backward.
                    pass.extend(rec.layer_norm_backward(
                        x,
                        st1,
                        (w(0), gw(0), gw(1)),
                        narrow,
                        go,
                        Some(dh1),
                        (r, dim),
                    ));
                    cur = 1 - cur;
                }
                Op::Norm {
                    rows: per,
                    dim,
                    gain,
                } => {
                    let stats = View::all(&saved[i][0]);
                    let t = (
                        tensor(gain, &p_buf),
                        tensor(gain, &grads),
                        tensor(gain + 1, &grads),
                    );
                    pass.extend(rec.layer_norm_backward(
                        x,
                        stats,
                        t,
                        gc,
                        go,
                        None,
                        (batch * per, dim),
                    ));
                    cur = 1 - cur;
                }
                Op::Head {
                    ctx,
                    dim,
                    vocab,
                    weight,
                    tied,
                } => {
                    let r = batch * ctx;
                    let (wv, gwv) = (tensor(weight, &p_buf), tensor(weight, &grads));
                    // Tied, the matrix is the token table [vocab, dim]: dtok = dlogitsᵀ · z
                    // (the embedding's own gradient adds to it later), dz = dlogits · tok.
                    // Untied: dW = zᵀ · dlogits, dz = dlogits · Wᵀ.
                    let (dw, dz) = if tied {
                        ((gc, x, (vocab, r, dim)), (false, false))
                    } else {
                        ((x, gc, (dim, r, vocab)), (false, true))
                    };
                    pass.push(rec.product(dw.0, dw.1, gwv, dw.2, (true, false)));
                    pass.push(rec.product(gc, wv, go, (r, vocab, dim), dz));
                    cur = 1 - cur;
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
        // AdamW: the squared global gradient norm (one partial per workgroup, then their
        // sum in gnorm[0]) and a mask of the parameters that decay.
        let adamw = matches!(opt, Optimizer::AdamW { .. });
        let norm_groups = plen.div_ceil(256).clamp(1, 1024);
        let partials = storage(device, "gnorm-partials", norm_groups);
        let gnorm = storage(device, "gnorm", 1);
        let decay = if adamw {
            let mut mask = vec![0.0f32; plen];
            for t in model.tensors.iter().filter(|t| t.shape.len() >= 2) {
                mask[t.range()].fill(1.0);
            }
            let b = storage(device, "decay-mask", plen);
            gpu.queue.write_buffer(&b, 0, bytemuck::cast_slice(&mask));
            b
        } else {
            storage(device, "decay-mask", 1)
        };
        let mut opt_dispatch = Vec::new();
        if adamw {
            let k = rec.lm().sumsq.clone();
            let all_grads = View {
                buf: &grads,
                offset: 0,
                len: plen,
            };
            let mut d = rec.op(&k, plen, &[norm_groups], &[all_grads, View::all(&partials)]);
            d.groups = [norm_groups as u32, 1, 1];
            opt_dispatch.push(d);
            let mut d = rec.op(
                &k,
                norm_groups,
                &[1],
                &[View::all(&partials), View::all(&gnorm)],
            );
            d.groups = [1, 1, 1];
            opt_dispatch.push(d);
        }
        let opt_uniform = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("optimizer"),
            size: 48,
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
                View::all(&gnorm),
                View::all(&decay),
            ],
        );
        opt_dispatch.push(Dispatch {
            pipeline: opt_pipeline,
            bind: opt_bind,
            groups: grid(plen),
        });
        // A grid wider in one dimension than the device takes (WebGPU's default and most
        // drivers': 65,535 workgroups) made the whole step invalid, natively a panic: the
        // bias gradient of a dense layer of 65,536 units, or the im2col product of a
        // convolution over more than 4 million rows. The caller trains on the CPU instead.
        let most = device.limits().max_compute_workgroups_per_dimension;
        if pass
            .iter()
            .chain(&opt_dispatch)
            .any(|d| d.groups.iter().any(|&g| g > most))
        {
            return Err(EngineError::Unsupported(
                "a grid past the device's workgroups per dimension",
            ));
        }
        let input = acts[0].clone();
        let mut scratch = acts;
        scratch.extend(g);
        scratch.extend(cols.into_iter().flatten());
        scratch.extend(argmax.into_iter().flatten());
        scratch.push(dcols);
        scratch.extend(saved.into_iter().flatten());
        scratch.extend([wide, narrow, dqkv, row_dots, dh1, partials, gnorm, decay]);
        scratch.push(rec.dummy);
        drop(kernels);
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
        let per = self.model.positions();
        if labels.len() != self.batch * per {
            return Err(EngineError::BadBatch(format!(
                "{} samples; this GPU backend was built for batches of {}",
                labels.len() / per,
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
        // The loss rows only: the flag (word 0) stays raised from a skipped step until the
        // loss is read (or weights are loaded), so every later step of the run is skipped
        // too and the readback reports it, as the CPU backend stops at the first. Cleared
        // each step, it was reported only when the last step before the readback was bad.
        encoder.clear_buffer(&self.loss, 4, None);
        {
            let mut cpass = encoder.begin_compute_pass(&Default::default());
            let tail: &[Dispatch] = if update { &self.opt_dispatch } else { &[] };
            for d in self.pass.iter().chain(tail) {
                cpass.set_pipeline(&d.pipeline);
                cpass.set_bind_group(0, &d.bind, &[]);
                cpass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
            }
        }
        q.submit([encoder.finish()]);
        Ok(())
    }

    /// Clears the skipped-step flag (word 0 of the loss buffer).
    fn lower_flag(&self) {
        self.gpu.queue.write_buffer(&self.loss, 0, &[0; 4]);
    }

    fn opt_words(&self) -> [u8; 48] {
        let t = self.t as i32;
        let (kind, lr, b1, b2, eps, wd, clip) = match self.opt {
            Optimizer::Sgd { lr, momentum } => (0u32, lr, momentum, 0.0, 0.0, 0.0, 0.0),
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => (1u32, lr, beta1, beta2, eps, 0.0, 0.0),
            Optimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                clip,
            } => (2u32, lr, beta1, beta2, eps, weight_decay, clip),
        };
        let (c1, c2) = if kind == 0 {
            (1.0f32, 1.0f32)
        } else {
            (1.0 - b1.powi(t), 1.0 - b2.powi(t))
        };
        let mut out = [0u8; 48];
        let words: [u32; 12] = [
            self.model.param_len() as u32,
            kind,
            lr.to_bits(),
            b1.to_bits(),
            b2.to_bits(),
            eps.to_bits(),
            c1.to_bits(),
            c2.to_bits(),
            wd.to_bits(),
            clip.to_bits(),
            0,
            0,
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
        let rows = self.batch * self.model.positions();
        let v = self.gpu.read_f32(&self.loss, rows + 1).await?;
        let mean = v[1..].iter().map(|&l| f64::from(l)).sum::<f64>() / rows as f64;
        if v[0] != 0.0 || !mean.is_finite() {
            self.lower_flag();
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
        self.lower_flag();
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
        self.lower_flag();
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
        let mut kernels = Kernels::of(gpu);
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
        let dummy = rec.dummy;
        drop(kernels);
        Self {
            gpu: gpu.clone(),
            c: cb,
            dispatch,
            len: m * n,
            _inputs: [ab, bb, dummy],
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

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::Kernels;
    use crate::gpu::Gpu;

    /// A build that panics while it holds the device's kernels (natively, a wgpu
    /// validation error panics) hands them back as it unwinds, with what it compiled.
    #[test]
    fn kernels_go_back_to_the_device_when_a_build_panics() {
        let gpu = pollster::block_on(Gpu::new()).expect("a wgpu adapter (lavapipe)");
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut held = Kernels::of(&gpu);
            held.conv(&gpu.device);
            panic!("a build that fails part way");
        }));
        assert!(unwound.is_err());
        let slot = gpu
            .kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert!(
            slot.as_ref().is_some_and(|k| k.conv.is_some()),
            "the device lost its kernels"
        );
    }
}

//! The CPU backend: a clear reference implementation of every op (forward and backward),
//! fast enough to be the fallback when there is no GPU. Matrix products go through the
//! blocked [`gemm`](super::gemm), most convolutions through [`conv`](super::conv) (the
//! others through im2col and the matrix product); everything else is a plain loop over
//! NHWC data.

use super::conv::{self, Conv};
use super::gemm::{MatRef, gemm};
use super::transformer::{
    BlockScratch, BlockShape, block_backward, block_forward, column_sums, embed, embed_backward,
    exp_approx, layer_norm, layer_norm_backward, split_ranges,
};
use super::{BLOCK_TENSORS, Backend, EngineError, Model, Op, Optimizer, check_batch, check_params};

/// Trains a [`Model`] on the CPU.
pub struct CpuBackend {
    model: Model,
    opt: Optimizer,
    params: Vec<f32>,
    grads: Vec<f32>,
    /// Optimizer state: momentum (SGD) or first moment (Adam).
    m: Vec<f32>,
    /// Second moment (Adam only).
    v: Vec<f32>,
    /// Steps taken since the optimizer state was reset.
    t: u32,
    ws: Workspace,
    last_loss: f32,
}

/// Per-batch scratch space, grown on demand and reused across steps.
#[derive(Default)]
struct Workspace {
    /// Activation `i` for the current batch (0 is the input).
    acts: Vec<Vec<f32>>,
    /// Per convolution, what its backward pass reads of its input: the zero-bordered
    /// input where [`conv`] computes it, else the im2col patches.
    cols: Vec<Vec<f32>>,
    /// Arg-max input index per pooled output (pools only).
    argmax: Vec<Vec<u32>>,
    /// Gradient flowing backwards, and a second buffer to swap with.
    grad: Vec<f32>,
    grad_next: Vec<f32>,
    /// Patch gradients of a convolution, before col2im (or its zero-bordered output
    /// gradient, where [`conv`] computes the input gradient).
    dcols: Vec<f32>,
    /// A convolution's kernel flipped, its input and output channels swapped.
    flipped: Vec<f32>,
    /// What a transformer block or layer norm keeps for its backward pass, per op.
    saved: Vec<Vec<f32>>,
    /// Scratch of the transformer blocks' backward pass.
    block: BlockScratch,
}

impl Workspace {
    /// An empty workspace for a model of `n_ops` operations.
    fn for_ops(n_ops: usize) -> Self {
        Self {
            acts: vec![Vec::new(); n_ops + 1],
            cols: vec![Vec::new(); n_ops],
            argmax: vec![Vec::new(); n_ops],
            saved: vec![Vec::new(); n_ops],
            ..Self::default()
        }
    }
}

impl CpuBackend {
    /// A backend for `model` with the given optimizer and initial parameters.
    pub fn new(model: Model, opt: Optimizer, params: Vec<f32>) -> Result<Self, EngineError> {
        opt.validate()?;
        let len = model.param_len();
        Self::with_state(model, opt, params, len)
    }

    /// A backend that only evaluates `params` (an observer's, or a contributor's test of
    /// the swarm's model beside training): no gradient or optimizer moments, so that it
    /// holds one parameter-sized buffer, not four. Its `step` fails.
    pub fn for_evaluation(model: Model, params: Vec<f32>) -> Result<Self, EngineError> {
        let none = Optimizer::Sgd {
            lr: 0.0,
            momentum: 0.0,
        };
        Self::with_state(model, none, params, 0)
    }

    /// A backend whose gradient and optimizer moments have `len` values each.
    fn with_state(
        model: Model,
        opt: Optimizer,
        params: Vec<f32>,
        len: usize,
    ) -> Result<Self, EngineError> {
        check_params(&model, &params)?;
        let n_ops = model.ops.len();
        Ok(Self {
            model,
            opt,
            params,
            grads: vec![0.0; len],
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: 0,
            ws: Workspace::for_ops(n_ops),
            last_loss: f32::NAN,
        })
    }

    /// The current parameters, without copying.
    pub fn params_slice(&self) -> &[f32] {
        &self.params
    }

    /// Logits for `n` samples (`n * positions` rows of `classes`), computed with the
    /// current parameters.
    pub fn logits(&mut self, inputs: &[f32], n: usize) -> &[f32] {
        self.forward(inputs, n);
        &self.ws.acts[self.model.ops.len()]
    }

    /// Mean loss (in nats per prediction) and accuracy over a data set, in batches of
    /// `batch` samples; a language model's predictions are its next tokens.
    pub fn evaluate(
        &mut self,
        inputs: &[f32],
        labels: &[u8],
        batch: usize,
    ) -> Result<(f32, f32), EngineError> {
        check_batch(&self.model, inputs, labels)?;
        let (d, c, per) = (
            self.model.input_len(),
            self.model.classes(),
            self.model.positions(),
        );
        let batch = evaluation_batch(&self.model, batch);
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for (xs, ys) in inputs.chunks(batch * d).zip(labels.chunks(batch * per)) {
            self.forward(xs, ys.len() / per);
            let logits = &self.ws.acts[self.model.ops.len()];
            for (row, &y) in logits.chunks_exact(c).zip(ys) {
                let (l, _) = softmax_ce_row(row, y, None);
                loss += f64::from(l);
                correct += usize::from(argmax(row) == usize::from(y));
            }
        }
        let n = labels.len() as f64;
        let loss = (loss / n) as f32;
        if !loss.is_finite() {
            return Err(EngineError::NonFinite("evaluation loss"));
        }
        Ok((loss, (correct as f64 / n) as f32))
    }

    /// The forward pass. On x86-64 with AVX2 and FMA it runs in a build with them, as
    /// the products and convolutions do: its own loops (bias, activations, pooling, the
    /// layer norms, GELU and softmax of the transformer's blocks) are then twice as
    /// wide as the baseline's SSE.
    fn forward(&mut self, inputs: &[f32], n: usize) {
        #[cfg(target_arch = "x86_64")]
        if super::gemm::avx2_fma() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only
            // requirement `forward_avx2` adds to the safe `forward_in`.
            unsafe {
                self.forward_avx2(inputs, n);
            }
            return;
        }
        self.forward_in(inputs, n);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn forward_avx2(&mut self, inputs: &[f32], n: usize) {
        self.forward_in(inputs, n);
    }

    #[cfg_attr(target_arch = "x86_64", inline(always))]
    fn forward_in(&mut self, inputs: &[f32], n: usize) {
        let Self {
            model, params, ws, ..
        } = self;
        ws.acts[0].clear();
        ws.acts[0].extend_from_slice(inputs);
        for (i, op) in model.ops.iter().enumerate() {
            let (before, after) = ws.acts.split_at_mut(i + 1);
            let x = &before[i];
            let y = &mut after[0];
            y.resize(n * op.out_len(), 0.0);
            match *op {
                Op::Dense {
                    inp,
                    out,
                    weight,
                    relu,
                } => {
                    let w = &params[model.tensors[weight].range()];
                    let b = &params[model.tensors[weight + 1].range()];
                    gemm(MatRef::new(x, n, inp), MatRef::new(w, inp, out), y, false);
                    bias_act(y, b, relu);
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
                    let w = &params[model.tensors[weight].range()];
                    let b = &params[model.tensors[weight + 1].range()];
                    if let Some(sh) = Conv::of_op(n, input, output, kernel, stride, padding) {
                        conv::border(x, n, input, padding, &mut ws.cols[i]);
                        conv::forward(&sh, &ws.cols[i], w, Some(b), relu, y);
                        continue;
                    }
                    let kkc = kernel * kernel * input[2];
                    let rows = n * output[0] * output[1];
                    let cols = &mut ws.cols[i];
                    cols.resize(rows * kkc, 0.0);
                    let gather = im2col_for(kernel * input[2]);
                    gather(x, n, input, output, kernel, stride, padding, cols);
                    gemm(
                        MatRef::new(cols, rows, kkc),
                        MatRef::new(w, kkc, output[2]),
                        y,
                        false,
                    );
                    bias_act(y, b, relu);
                }
                Op::Pool {
                    input,
                    output,
                    size,
                } => {
                    let idx = &mut ws.argmax[i];
                    idx.resize(y.len(), 0);
                    max_pool(x, n, input, output, size, y, idx);
                }
                Op::Relu { .. } => {
                    for (o, &v) in y.iter_mut().zip(x.iter()) {
                        *o = v.max(0.0);
                    }
                }
                Op::Embed { ctx, dim, tok, .. } => {
                    let table = &params[model.tensors[tok].range()];
                    let pos = &params[model.tensors[tok + 1].range()];
                    embed(x, ctx, dim, table, pos, y);
                }
                Op::Block { .. } => {
                    let (sh, p) = block_parts(model, params, op, n);
                    let saved = &mut ws.saved[i];
                    saved.resize(sh.saved_len(), 0.0);
                    block_forward(&sh, &p, x, saved, y, &mut ws.block);
                }
                Op::Norm { rows, dim, gain } => {
                    let stats = &mut ws.saved[i];
                    stats.resize(2 * n * rows, 0.0);
                    let g = &params[model.tensors[gain].range()];
                    let b = &params[model.tensors[gain + 1].range()];
                    layer_norm(x, dim, g, b, y, stats);
                }
                Op::Head {
                    ctx,
                    dim,
                    vocab,
                    weight,
                    tied,
                } => {
                    let w = &params[model.tensors[weight].range()];
                    let wm = if tied {
                        MatRef::new(w, vocab, dim).t()
                    } else {
                        MatRef::new(w, dim, vocab)
                    };
                    gemm(MatRef::new(x, n * ctx, dim), wm, y, false);
                }
            }
        }
    }

    /// Forward, loss, backward into `self.grads`; returns the mean loss over every
    /// prediction (every position of a language model). Dispatched as [`Self::forward`].
    fn forward_backward(&mut self, inputs: &[f32], labels: &[u8]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if super::gemm::avx2_fma() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only
            // requirement `forward_backward_avx2` adds to the safe `forward_backward_in`.
            return unsafe { self.forward_backward_avx2(inputs, labels) };
        }
        self.forward_backward_in(inputs, labels)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn forward_backward_avx2(&mut self, inputs: &[f32], labels: &[u8]) -> f32 {
        self.forward_backward_in(inputs, labels)
    }

    #[cfg_attr(target_arch = "x86_64", inline(always))]
    fn forward_backward_in(&mut self, inputs: &[f32], labels: &[u8]) -> f32 {
        let n = labels.len() / self.model.positions();
        self.forward(inputs, n);
        let Self {
            model,
            params,
            grads,
            ws,
            ..
        } = self;
        let c = model.classes();
        let n_ops = model.ops.len();
        let rows = labels.len();
        ws.grad.resize(rows * c, 0.0);
        let mut loss = 0.0f64;
        let scale = 1.0 / rows as f32;
        for ((row, g), &y) in ws.acts[n_ops]
            .chunks_exact(c)
            .zip(ws.grad.chunks_exact_mut(c))
            .zip(labels)
        {
            let (l, _) = softmax_ce_row(row, y, Some((g, scale)));
            loss += f64::from(l);
        }
        for (i, op) in model.ops.iter().enumerate().rev() {
            let x = &ws.acts[i];
            let y = &ws.acts[i + 1];
            let need_dx = i > 0;
            match *op {
                Op::Dense {
                    inp,
                    out,
                    weight,
                    relu,
                } => {
                    if relu {
                        mask_relu(&mut ws.grad, y);
                    }
                    let (w, gw, gb) = weight_views(model, weight, params, grads);
                    let dx = need_dx.then_some(&mut ws.grad_next);
                    linear_backward(x, &ws.grad, w, (n, inp, out), gw, gb, dx);
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
                    if relu {
                        mask_relu(&mut ws.grad, y);
                    }
                    let kkc = kernel * kernel * input[2];
                    let rows = n * output[0] * output[1];
                    let (w, gw, gb) = weight_views(model, weight, params, grads);
                    let direct = Conv::of_op(n, input, output, kernel, stride, padding);
                    if let Some(sh) = &direct {
                        conv::weight_grad(sh, &ws.cols[i], &ws.grad, gw);
                        column_sums(&ws.grad, output[2], gb);
                    } else {
                        let cols = &ws.cols[i];
                        linear_backward(cols, &ws.grad, w, (rows, kkc, output[2]), gw, gb, None);
                    }
                    if need_dx {
                        ws.grad_next
                            .resize(n * input.iter().product::<usize>(), 0.0);
                        if let Some(sh) = direct.filter(Conv::direct_input_grad) {
                            conv::input_grad(
                                &sh,
                                &ws.grad,
                                w,
                                &mut ws.dcols,
                                &mut ws.flipped,
                                &mut ws.grad_next,
                            );
                        } else {
                            input_product(&ws.grad, w, (rows, kkc, output[2]), &mut ws.dcols);
                            col2im(
                                &ws.dcols,
                                n,
                                input,
                                output,
                                kernel,
                                stride,
                                padding,
                                &mut ws.grad_next,
                            );
                        }
                    }
                }
                Op::Pool { input, .. } => {
                    ws.grad_next.clear();
                    ws.grad_next
                        .resize(n * input.iter().product::<usize>(), 0.0);
                    for (&src, &g) in ws.argmax[i].iter().zip(&ws.grad) {
                        ws.grad_next[src as usize] += g;
                    }
                }
                Op::Relu { .. } => {
                    mask_relu(&mut ws.grad, y);
                    ws.grad_next.clear();
                    ws.grad_next.extend_from_slice(&ws.grad);
                }
                Op::Embed {
                    ctx,
                    dim,
                    tok,
                    tied,
                    ..
                } => {
                    let t = &model.tensors;
                    let [dtok, dpos] = split_ranges(grads, [t[tok].range(), t[tok + 1].range()]);
                    embed_backward(x, ctx, dim, &ws.grad, dtok, dpos, tied);
                }
                Op::Block { first, .. } => {
                    let (sh, p) = block_parts(model, params, op, n);
                    let t = &model.tensors;
                    let gr = split_ranges(grads, std::array::from_fn(|k| t[first + k].range()));
                    block_backward(
                        &sh,
                        &p,
                        gr,
                        x,
                        &ws.saved[i],
                        &ws.grad,
                        &mut ws.grad_next,
                        &mut ws.block,
                    );
                }
                Op::Norm { dim, gain, .. } => {
                    let t = &model.tensors;
                    let [dg, db] = split_ranges(grads, [t[gain].range(), t[gain + 1].range()]);
                    ws.grad_next.clear();
                    ws.grad_next.resize(ws.grad.len(), 0.0);
                    let g = &params[t[gain].range()];
                    layer_norm_backward(
                        x,
                        &ws.saved[i],
                        g,
                        &ws.grad,
                        dim,
                        dg,
                        db,
                        &mut ws.grad_next,
                    );
                }
                Op::Head {
                    ctx,
                    dim,
                    vocab,
                    weight,
                    tied,
                } => {
                    let r = n * ctx;
                    let range = model.tensors[weight].range();
                    let (w, gw) = (&params[range.clone()], &mut grads[range]);
                    let dlogits = MatRef::new(&ws.grad, r, vocab);
                    ws.grad_next.resize(r * dim, 0.0);
                    if tied {
                        // The token table [vocab, dim]: its embedding gradient adds later.
                        gemm(dlogits.t(), MatRef::new(x, r, dim), gw, false);
                        gemm(
                            dlogits,
                            MatRef::new(w, vocab, dim),
                            &mut ws.grad_next,
                            false,
                        );
                    } else {
                        gemm(MatRef::new(x, r, dim).t(), dlogits, gw, false);
                        gemm(
                            dlogits,
                            MatRef::new(w, dim, vocab).t(),
                            &mut ws.grad_next,
                            false,
                        );
                    }
                }
            }
            std::mem::swap(&mut ws.grad, &mut ws.grad_next);
        }
        (loss / rows as f64) as f32
    }

    fn apply_optimizer(&mut self) {
        self.t += 1;
        match self.opt {
            Optimizer::Sgd { lr, momentum } => {
                for ((w, g), m) in self.params.iter_mut().zip(&self.grads).zip(&mut self.m) {
                    *m = momentum * *m + g;
                    *w -= lr * *m;
                }
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => self.adam(lr, beta1, beta2, eps, 1.0),
            Optimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                clip,
            } => {
                let norm = self
                    .grads
                    .iter()
                    .map(|&g| f64::from(g) * f64::from(g))
                    .sum::<f64>()
                    .sqrt() as f32;
                let gscale = if clip > 0.0 && norm > clip {
                    clip / norm
                } else {
                    1.0
                };
                if weight_decay > 0.0 {
                    let keep = 1.0 - lr * weight_decay;
                    for t in self.model.tensors.iter().filter(|t| t.shape.len() >= 2) {
                        self.params[t.range()].iter_mut().for_each(|w| *w *= keep);
                    }
                }
                self.adam(lr, beta1, beta2, eps, gscale);
            }
        }
    }

    /// The Adam update with bias correction, on the gradients scaled by `gscale`.
    fn adam(&mut self, lr: f32, beta1: f32, beta2: f32, eps: f32, gscale: f32) {
        let c1 = 1.0 - beta1.powi(self.t as i32);
        let c2 = 1.0 - beta2.powi(self.t as i32);
        let step = AdamStep {
            lr_c1: lr / c1,
            inv_root_c2: 1.0 / c2.sqrt(),
            beta1,
            beta2,
            eps,
            gscale,
        };
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx") {
                #[allow(unsafe_code)]
                // SAFETY: the CPU supports AVX (checked just above), the only requirement
                // `adam_avx` adds to the safe `adam_update`.
                unsafe {
                    adam_avx(
                        &step,
                        &mut self.params,
                        &self.grads,
                        &mut self.m,
                        &mut self.v,
                    );
                }
                return;
            }
        }
        adam_update(
            &step,
            &mut self.params,
            &self.grads,
            &mut self.m,
            &mut self.v,
        );
    }
}

/// One Adam step's constants, with the bias corrections folded in once per step.
struct AdamStep {
    lr_c1: f32,
    inv_root_c2: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    gscale: f32,
}

/// Adam on every parameter, in PyTorch's form: `w -= lr/c1 * m / (sqrt(v)/sqrt(c2) + eps)`,
/// one square root and one division per parameter (the form with `m/c1` and `v/c2`
/// took three, and the optimizer outweighed the matrix products of a small batch).
#[inline(always)]
fn adam_update(s: &AdamStep, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = w.len().min(g.len()).min(m.len()).min(v.len());
    let (w, g, m, v) = (&mut w[..n], &g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = g[i] * s.gscale;
        let mi = s.beta1 * m[i] + (1.0 - s.beta1) * gi;
        let vi = s.beta2 * v[i] + (1.0 - s.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] -= s.lr_c1 * mi / (vi.sqrt() * s.inv_root_c2 + s.eps);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn adam_avx(s: &AdamStep, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    adam_update(s, w, g, m, v);
}

/// Whether every value is finite. Eight running sums of `x * 0` stay zero unless some
/// `x` is infinite or NaN; with no branch per value the loop vectorizes (an early-exit
/// `any` ran a compare and a branch per gradient, every step).
fn all_finite(xs: &[f32]) -> bool {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x * 0.0;
        }
    }
    acc.iter().chain(rest).all(|x| x.is_finite())
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn model(&self) -> &Model {
        &self.model
    }

    fn step(&mut self, inputs: &[f32], labels: &[u8]) -> Result<(), EngineError> {
        if self.grads.len() != self.params.len() {
            return Err(EngineError::Unsupported(
                "training a backend made for evaluation",
            ));
        }
        check_batch(&self.model, inputs, labels)?;
        let loss = self.forward_backward(inputs, labels);
        self.last_loss = loss;
        if !loss.is_finite() {
            return Err(EngineError::NonFinite("loss"));
        }
        if !all_finite(&self.grads) {
            self.last_loss = f32::NAN;
            return Err(EngineError::NonFinite("gradient"));
        }
        self.apply_optimizer();
        Ok(())
    }

    async fn loss(&mut self) -> Result<f32, EngineError> {
        if self.last_loss.is_finite() {
            Ok(self.last_loss)
        } else {
            Err(EngineError::NonFinite("loss"))
        }
    }

    async fn params(&mut self) -> Result<Vec<f32>, EngineError> {
        Ok(self.params.clone())
    }

    fn set_learning_rate(&mut self, lr: f32) -> Result<(), EngineError> {
        self.opt = self.opt.with_lr(lr)?;
        Ok(())
    }

    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError> {
        check_params(&self.model, params)?;
        self.params.copy_from_slice(params);
        self.m.fill(0.0);
        self.v.fill(0.0);
        self.t = 0;
        Ok(())
    }

    fn load_weights(&mut self, params: &[f32]) -> Result<(), EngineError> {
        check_params(&self.model, params)?;
        self.params.copy_from_slice(params);
        Ok(())
    }

    async fn gradients(
        &mut self,
        inputs: &[f32],
        labels: &[u8],
    ) -> Result<(f32, Vec<f32>), EngineError> {
        check_batch(&self.model, inputs, labels)?;
        let loss = self.forward_backward(inputs, labels);
        if !loss.is_finite() {
            return Err(EngineError::NonFinite("loss"));
        }
        Ok((loss, self.grads.clone()))
    }
}

/// A transformer block's shape for `n` samples and its twelve parameter tensors.
fn block_parts<'a>(
    model: &Model,
    params: &'a [f32],
    op: &Op,
    n: usize,
) -> (BlockShape, [&'a [f32]; BLOCK_TENSORS]) {
    let Op::Block {
        ctx,
        dim,
        heads,
        hidden,
        first,
    } = *op
    else {
        unreachable!("block_parts is only called on a block")
    };
    let shape = BlockShape {
        n,
        ctx,
        dim,
        heads,
        hidden,
    };
    let p = std::array::from_fn(|k| &params[model.tensors[first + k].range()]);
    (shape, p)
}

/// The weights of the layer whose weight tensor is `weight` (its bias follows it), and
/// its weight and bias gradients.
fn weight_views<'a>(
    model: &Model,
    weight: usize,
    params: &'a [f32],
    grads: &'a mut [f32],
) -> (&'a [f32], &'a mut [f32], &'a mut [f32]) {
    let (wr, br) = (
        model.tensors[weight].range(),
        model.tensors[weight + 1].range(),
    );
    let (head, tail) = grads.split_at_mut(br.start);
    (&params[wr.clone()], &mut head[wr], &mut tail[..br.len()])
}

/// Backward of `y = a · w + b` over `rows` rows of `inp` inputs and `out` outputs, given
/// `g = dL/dy`: the weight and bias gradients, and `da = g · wᵀ` when asked for. Dense
/// layers use it on their input, convolutions outside [`conv`] on their im2col patches
/// (for the weights only).
fn linear_backward(
    a: &[f32],
    g: &[f32],
    w: &[f32],
    (rows, inp, out): (usize, usize, usize),
    gw: &mut [f32],
    gb: &mut [f32],
    da: Option<&mut Vec<f32>>,
) {
    gemm(
        MatRef::new(a, rows, inp).t(),
        MatRef::new(g, rows, out),
        gw,
        false,
    );
    column_sums(g, out, gb);
    if let Some(da) = da {
        input_product(g, w, (rows, inp, out), da);
    }
}

/// `da = g · wᵀ` over `rows` rows: the gradient of `y = a · w + b` by its input `a`
/// (`inp` wide), given `g = dL/dy` (`out` wide).
fn input_product(g: &[f32], w: &[f32], (rows, inp, out): (usize, usize, usize), da: &mut Vec<f32>) {
    da.resize(rows * inp, 0.0);
    gemm(
        MatRef::new(g, rows, out),
        MatRef::new(w, inp, out).t(),
        da,
        false,
    );
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

/// Softmax cross-entropy of one row of logits against `label`; when `grad` is given,
/// writes `scale * (softmax - onehot)` into it. Exponentials in two passes (exponentiate,
/// then sum) with the vectorizable [`exp_approx`].
#[cfg_attr(target_arch = "x86_64", inline(always))]
fn softmax_ce_row(row: &[f32], label: u8, grad: Option<(&mut [f32], f32)>) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let y = usize::from(label);
    let sum: f32 = match grad {
        Some((g, scale)) => {
            for (gj, &v) in g.iter_mut().zip(row) {
                *gj = exp_approx(v - max);
            }
            let sum: f32 = g.iter().sum();
            let inv = scale / sum;
            g.iter_mut().for_each(|gj| *gj *= inv);
            g[y] -= scale;
            sum
        }
        None => row.iter().map(|&v| exp_approx(v - max)).sum(),
    };
    (sum.ln() - (row[y] - max), sum)
}

#[cfg_attr(target_arch = "x86_64", inline(always))]
fn bias_act(y: &mut [f32], b: &[f32], relu: bool) {
    for row in y.chunks_exact_mut(b.len()) {
        for (v, &bb) in row.iter_mut().zip(b) {
            let s = *v + bb;
            *v = if relu { s.max(0.0) } else { s };
        }
    }
}

#[cfg_attr(target_arch = "x86_64", inline(always))]
fn mask_relu(grad: &mut [f32], y: &[f32]) {
    // A select, not a conditional store: it vectorizes.
    for (g, &v) in grad.iter_mut().zip(y) {
        *g = if v > 0.0 { *g } else { 0.0 };
    }
}

/// Copies `src[..dst.len()]` into `dst` without a call to memcpy: the runs here (a few
/// channels, one kernel row) are so short that the call costs more than the copy, and
/// LLVM turns a copy loop into that call.
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    let src = &src[..n];
    let mut i = 0;
    // Constant lengths: LLVM copies them with a few moves, no call.
    while i + 8 <= n {
        dst[i..i + 8].copy_from_slice(&src[i..i + 8]);
        i += 8;
    }
    macro_rules! tail {
        ($($len:literal)*) => {
            match n - i {
                $($len => dst[i..i + $len].copy_from_slice(&src[i..i + $len]),)*
                _ => {}
            }
        };
    }
    tail!(1 2 3 4 5 6 7);
}

/// An [`im2col`]: input, batch, input and output shapes, kernel, stride, padding, out.
type Gather = fn(&[f32], usize, [usize; 3], [usize; 3], usize, usize, usize, &mut [f32]);

/// The [`im2col`] for kernel rows of `row` (`k * c_in`) values: constant-length copies
/// for the usual 3x3 kernels on 1 or 8 channels, the general one otherwise.
fn im2col_for(row: usize) -> Gather {
    match row {
        3 => im2col::<3>,
        24 => im2col::<24>,
        _ => im2col::<0>,
    }
}

/// Gathers convolution patches: row `(s, oy, ox)` holds `x[s, oy*stride+ky-pad,
/// ox*stride+kx-pad, c]` at column `(ky*k + kx)*c_in + c`, zero outside the image.
/// `KC` is a kernel row's length (`k * c_in`) when known at compile time, else 0: the
/// usual 3x3 kernels on 1 or 8 channels then copy an inner patch row in a few moves.
#[allow(clippy::too_many_arguments)]
pub(crate) fn im2col<const KC: usize>(
    x: &[f32],
    n: usize,
    input: [usize; 3],
    output: [usize; 3],
    k: usize,
    stride: usize,
    pad: usize,
    cols: &mut [f32],
) {
    let [ih, iw, ic] = input;
    let [oh, ow, _] = output;
    debug_assert!(
        KC == 0 || KC == k * ic,
        "a kernel row is k x channels values"
    );
    debug_assert!(pad < k, "the model's checks keep padding below the kernel");
    let kc = if KC > 0 { KC } else { k * ic };
    let kkc = k * kc;
    for s in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let row = &mut cols[((s * oh + oy) * ow + ox) * kkc..][..kkc];
                // The kernel's columns that fall inside the image: `kx` in `lo..hi`.
                let x0 = (ox * stride) as isize - pad as isize;
                let lo = (-x0).clamp(0, k as isize) as usize;
                let hi = (iw as isize - x0).clamp(lo as isize, k as isize) as usize;
                for (ky, dst) in row.chunks_exact_mut(kc).enumerate() {
                    let iy = (oy * stride + ky) as isize - pad as isize;
                    if iy < 0 || iy as usize >= ih {
                        dst.fill(0.0);
                        continue;
                    }
                    // One kernel row is `k * ic` consecutive values in the input row.
                    let src = ((s * ih + iy as usize) * iw) as isize + x0 + lo as isize;
                    let src = src as usize * ic;
                    if KC > 0 && lo == 0 && hi == k {
                        dst.copy_from_slice(&x[src..src + KC]);
                        continue;
                    }
                    dst[..lo * ic].fill(0.0);
                    dst[hi * ic..].fill(0.0);
                    copy_short(&mut dst[lo * ic..hi * ic], &x[src..]);
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: scatters patch gradients back onto the input.
#[allow(clippy::too_many_arguments)]
fn col2im(
    cols: &[f32],
    n: usize,
    input: [usize; 3],
    output: [usize; 3],
    k: usize,
    stride: usize,
    pad: usize,
    dx: &mut [f32],
) {
    let [ih, iw, ic] = input;
    let [oh, ow, _] = output;
    let kkc = k * k * ic;
    dx.fill(0.0);
    for s in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let row = &cols[((s * oh + oy) * ow + ox) * kkc..][..kkc];
                for ky in 0..k {
                    let iy = (oy * stride + ky) as isize - pad as isize;
                    for kx in 0..k {
                        let ix = (ox * stride + kx) as isize - pad as isize;
                        if iy < 0 || ix < 0 || iy as usize >= ih || ix as usize >= iw {
                            continue;
                        }
                        let dst = ((s * ih + iy as usize) * iw + ix as usize) * ic;
                        for (d, &g) in dx[dst..dst + ic]
                            .iter_mut()
                            .zip(&row[(ky * k + kx) * ic..][..ic])
                        {
                            *d += g;
                        }
                    }
                }
            }
        }
    }
}

#[cfg_attr(target_arch = "x86_64", inline(always))]
fn max_pool(
    x: &[f32],
    n: usize,
    input: [usize; 3],
    output: [usize; 3],
    size: usize,
    y: &mut [f32],
    idx: &mut [u32],
) {
    let [ih, iw, c] = input;
    let [oh, ow, _] = output;
    // Channels are contiguous in NHWC: compare whole channel vectors, window position by
    // window position; the first maximum wins, as on the GPU. Eight channels at a time
    // are kept in locals (registers), so that the maximum and its index are selects that
    // vectorize rather than conditional stores.
    const L: usize = 8;
    let window = |s: usize, oy: usize, ox: usize, w: usize| {
        ((s * ih + oy * size + w / size) * iw + ox * size + w % size) * c
    };
    for s in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let o = ((s * oh + oy) * ow + ox) * c;
                let mut ch = 0;
                while ch + L <= c {
                    let first = window(s, oy, ox, 0) + ch;
                    let mut best: [f32; L] = std::array::from_fn(|j| x[first + j]);
                    let mut at: [u32; L] = std::array::from_fn(|j| (first + j) as u32);
                    for w in 1..size * size {
                        let i = window(s, oy, ox, w) + ch;
                        let xs = &x[i..i + L];
                        for j in 0..L {
                            let more = xs[j] > best[j];
                            best[j] = if more { xs[j] } else { best[j] };
                            at[j] = if more { (i + j) as u32 } else { at[j] };
                        }
                    }
                    y[o + ch..o + ch + L].copy_from_slice(&best);
                    idx[o + ch..o + ch + L].copy_from_slice(&at);
                    ch += L;
                }
                for ch in ch..c {
                    let mut at = window(s, oy, ox, 0) + ch;
                    for w in 1..size * size {
                        let i = window(s, oy, ox, w) + ch;
                        if x[i] > x[at] {
                            at = i;
                        }
                    }
                    y[o + ch] = x[at];
                    idx[o + ch] = at as u32;
                }
            }
        }
    }
}

impl CpuBackend {
    /// Continues `prompt` by `n` bytes with this language model, sampling each next byte
    /// from the softmax of its logits divided by `temperature` (0: the most likely byte)
    /// with a generator seeded by `seed`. The model sees the last `context` bytes; a
    /// shorter text is padded after its end, which causal attention never looks at.
    /// Returns the new bytes only (they need not be valid UTF-8). An error if this is
    /// not a language model.
    pub fn generate(
        &mut self,
        prompt: &[u8],
        n: usize,
        temperature: f32,
        seed: u64,
    ) -> Result<Vec<u8>, EngineError> {
        let Some(vocab) = self.model.vocab() else {
            return Err(EngineError::BadBatch(
                "only a language model generates text".into(),
            ));
        };
        let n = generation_bytes(&self.model, n)?;
        let ctx = self.model.positions();
        let mut rng = crate::rng::SplitMix64::new(seed);
        let mut text: Vec<u8> = prompt.to_vec();
        if text.is_empty() {
            text.push(b'\n');
        }
        let start = text.len();
        let mut window = vec![0.0f32; ctx];
        let mut probs = vec![0.0f32; vocab];
        for _ in 0..n {
            let seen = &text[text.len().saturating_sub(ctx)..];
            for (w, i) in window.iter_mut().zip(0..) {
                *w = f32::from(seen.get(i).copied().unwrap_or(b' ').min((vocab - 1) as u8));
            }
            let at = seen.len() - 1;
            let row = &self.logits(&window, 1)[at * vocab..(at + 1) * vocab];
            let next = if temperature <= 0.0 {
                argmax(row)
            } else {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (p, &l) in probs.iter_mut().zip(row) {
                    *p = exp_approx((l - max) / temperature);
                }
                let total: f32 = probs.iter().sum();
                let mut pick = rng.unit_f32() * total;
                let mut chosen = vocab - 1;
                for (b, &p) in probs.iter().enumerate() {
                    if pick < p {
                        chosen = b;
                        break;
                    }
                    pick -= p;
                }
                chosen
            };
            if !row.iter().all(|v| v.is_finite()) {
                return Err(EngineError::NonFinite("logits"));
            }
            text.push(next as u8);
        }
        Ok(text.split_off(start))
    }
}

/// Multiply-adds a generation may take in all: a few seconds of a browser's CPU. Each
/// byte is a whole forward pass over the context (no cache of earlier positions), and a
/// large valid model's 240 bytes held the page's worker (and its training, and the
/// swarm's rounds) for minutes.
pub const GENERATE_MACS: u64 = 20_000_000_000;

/// How many of `n` bytes a generation with `model` makes within [`GENERATE_MACS`], or why
/// none: the multiply-adds of one forward pass of a language model, about (its blocks'
/// and head's matrix products, its attention, and its softmax over `heads x ctx^2`
/// scores at about 8 each, an exponential and the sums: with as many heads as width it
/// is several times the attention's products, and was not counted; the rest is small
/// beside them).
fn generation_bytes(model: &Model, n: usize) -> Result<usize, EngineError> {
    let per_byte = model
        .ops
        .iter()
        .map(|op| match *op {
            Op::Block {
                ctx,
                dim,
                hidden,
                heads,
                ..
            } => [
                ctx.saturating_mul(4 * dim * dim + 2 * dim * hidden),
                ctx.saturating_mul(ctx).saturating_mul(2 * dim),
                ctx.saturating_mul(ctx)
                    .saturating_mul(heads.saturating_mul(8)),
            ]
            .into_iter()
            .fold(0usize, usize::saturating_add),
            Op::Head {
                ctx, dim, vocab, ..
            } => ctx.saturating_mul(dim).saturating_mul(vocab),
            _ => 0,
        })
        .fold(0u64, |s, m| s.saturating_add(m as u64))
        .max(1);
    match usize::try_from(GENERATE_MACS / per_byte).unwrap_or(usize::MAX) {
        0 => Err(EngineError::Unsupported(
            "text from a model this large: over 20 billion multiply-adds a byte",
        )),
        most => Ok(n.min(most)),
    }
}

/// The largest batch, up to `batch` (1 at least), whose buffers stay within what a task
/// lets training bind ([`WEBGPU_MAX_BINDING`](super::WEBGPU_MAX_BINDING) for its largest
/// buffer): an evaluation in batches of 500 (the dashboard's) of a language model whose
/// attention probabilities a task admits at its training batch of 4 asked for gigabytes
/// in one buffer, past what a wasm32 page can hold, and the module aborted. Nor more
/// than a task lets training hold in all ([`MAX_TRAINING_BYTES`](super::MAX_TRAINING_BYTES)).
fn evaluation_batch(model: &Model, batch: usize) -> usize {
    super::spec::largest_batch(batch, |b| {
        model.largest_binding(b) <= super::WEBGPU_MAX_BINDING
            && model.training_bytes(b) <= super::MAX_TRAINING_BYTES
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_non_finite_value_anywhere_fails_the_finite_check() {
        for len in [0, 5, 8, 37] {
            let clean: Vec<f32> = (0..len).map(|i| i as f32 - 17.5).collect();
            assert!(all_finite(&clean), "{len} finite values");
            for at in 0..len {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut xs = clean.clone();
                    xs[at] = bad;
                    assert!(!all_finite(&xs), "{bad} at {at} of {len}");
                }
            }
        }
        assert!(all_finite(&[
            f32::MAX,
            f32::MIN,
            -0.0,
            f32::MIN_POSITIVE / 2.0
        ]));
    }

    #[test]
    fn the_adam_step_matches_its_textbook_form() {
        let n = 37;
        let mut w: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos() * 0.1).collect();
        let (mut m, mut v) = (vec![0.01f32; n], vec![0.002f32; n]);
        let (lr, b1, b2, eps, t) = (0.01f32, 0.9f32, 0.999f32, 1e-8f32, 3);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let expect: Vec<f32> = (0..n)
            .map(|i| {
                let mi = b1 * m[i] + (1.0 - b1) * g[i];
                let vi = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                w[i] - lr * (mi / c1) / ((vi / c2).sqrt() + eps)
            })
            .collect();
        let step = AdamStep {
            lr_c1: lr / c1,
            inv_root_c2: 1.0 / c2.sqrt(),
            beta1: b1,
            beta2: b2,
            eps,
            gscale: 1.0,
        };
        #[cfg(target_arch = "x86_64")]
        let (w0, m0, v0) = (w.clone(), m.clone(), v.clone());
        adam_update(&step, &mut w, &g, &mut m, &mut v);
        for (i, (a, b)) in w.iter().zip(&expect).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{i}: {a} vs {b}");
        }
        // The AVX copy the CPU runs natively gives the same bits, with clipping's scale.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            let clipped = AdamStep {
                gscale: 0.3,
                ..step
            };
            let (mut w1, mut m1, mut v1) = (w0.clone(), m0.clone(), v0.clone());
            adam_update(&clipped, &mut w1, &g, &mut m1, &mut v1);
            let (mut w2, mut m2, mut v2) = (w0, m0, v0);
            #[allow(unsafe_code)]
            // SAFETY: AVX was detected just above.
            unsafe {
                adam_avx(&clipped, &mut w2, &g, &mut m2, &mut v2);
            }
            let bits = |xs: &[Vec<f32>]| -> Vec<u32> {
                xs.iter().flatten().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&[w1, m1, v1]), bits(&[w2, m2, v2]));
        }
    }

    /// The bytes `b` holds: its parameter-sized buffers and every buffer of its workspace,
    /// as allocated (a buffer shrunk for a last, smaller batch keeps its allocation).
    fn held_bytes(b: &CpuBackend) -> usize {
        let ws = &b.ws;
        let lists = ws.acts.iter().chain(&ws.cols).chain(&ws.saved);
        4 * (b.params.capacity()
            + b.grads.capacity()
            + b.m.capacity()
            + b.v.capacity()
            + lists.map(Vec::capacity).sum::<usize>()
            + ws.argmax.iter().map(Vec::capacity).sum::<usize>()
            + ws.grad.capacity()
            + ws.grad_next.capacity()
            + ws.dcols.capacity()
            + ws.flipped.capacity()
            + ws.block.held())
    }

    /// The AVX2 build of the forward and backward pass (what x86-64 machines run) and
    /// the baseline one (what the others run) give the same bits: every sum keeps its
    /// order, and the products and convolutions dispatch alike inside both.
    #[test]
    fn the_avx2_pass_and_the_baseline_pass_agree_to_the_bit() {
        use super::super::{LayerSpec, ModelSpec};
        let mut lm = vec![LayerSpec::Embedding {
            vocab: 256,
            dim: 32,
        }];
        lm.extend([
            LayerSpec::TransformerBlock {
                heads: 4,
                mlp_ratio: 4,
            },
            LayerSpec::LayerNorm,
            LayerSpec::LmHead { tied: true },
        ]);
        for spec in [
            ModelSpec {
                input: [1, 16, 1],
                layers: lm,
            },
            ModelSpec::cnn_digits(),
            ModelSpec::mlp_digits(),
        ] {
            let model = Model::new(spec).expect("valid");
            let (d, per, classes) = (model.input_len(), model.positions(), model.classes());
            let n = 6;
            let xs: Vec<f32> = (0..n * d).map(|i| ((i * 37) % 200) as f32 / 7.0).collect();
            let ys: Vec<u8> = (0..n * per).map(|i| ((i * 5) % classes) as u8).collect();
            let backend = || {
                CpuBackend::new(model.clone(), Optimizer::adam(1e-3), model.init_params(3))
                    .expect("cpu")
            };
            let (mut dispatched, mut baseline) = (backend(), backend());
            let loss = dispatched.forward_backward(&xs, &ys);
            let base_loss = baseline.forward_backward_in(&xs, &ys);
            assert!(loss.is_finite());
            assert_eq!(loss.to_bits(), base_loss.to_bits(), "loss");
            let bits = |g: &[f32]| -> Vec<u32> { g.iter().map(|x| x.to_bits()).collect() };
            assert!(
                dispatched.grads.iter().any(|&g| g != 0.0),
                "gradients flowed"
            );
            assert_eq!(bits(&dispatched.grads), bits(&baseline.grads), "gradients");
        }
    }

    /// What a task's budget counts ([`Model::training_bytes`]) bounds what a contributor
    /// holds: a training step at the task's batch and an evaluation beside it. A stack of
    /// narrow blocks of one head held about 1.4 times the count (a block's two layer
    /// norms, attention output and residual went uncounted), and the evaluation's backend
    /// four more parameter-sized buffers and a batch of 64 the count did not know of.
    #[test]
    fn a_step_and_an_evaluation_beside_it_hold_at_most_the_counted_bytes() {
        use super::super::{LayerSpec, ModelSpec};
        let text = |blocks: usize, dim: usize, heads: usize| {
            let mut layers = vec![LayerSpec::Embedding { vocab: 256, dim }];
            layers.extend((0..blocks).map(|_| LayerSpec::TransformerBlock {
                heads,
                mlp_ratio: 1,
            }));
            layers.extend([LayerSpec::LayerNorm, LayerSpec::LmHead { tied: true }]);
            layers
        };
        let image = vec![
            LayerSpec::Conv2d {
                filters: 8,
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            LayerSpec::Relu,
            LayerSpec::MaxPool { size: 2 },
            LayerSpec::Flatten,
            LayerSpec::Dense { units: 10 },
        ];
        for (input, layers, batch) in [
            ([1, 8, 1], text(8, 128, 1), 16),
            ([1, 32, 1], text(2, 64, 4), 4),
            ([28, 28, 1], image, 32),
        ] {
            let model = Model::new(ModelSpec { input, layers }).expect("valid");
            let params = model.init_params(1);
            let (d, per) = (model.input_len(), model.positions());
            let classes = model.classes();
            let xs = |n: usize| -> Vec<f32> { (0..n * d).map(|i| (i % 200) as f32).collect() };
            let ys = |n: usize| -> Vec<u8> { (0..n * per).map(|i| (i % classes) as u8).collect() };
            let mut train =
                CpuBackend::new(model.clone(), Optimizer::adam(1e-3), params.clone()).expect("cpu");
            train.step(&xs(batch), &ys(batch)).expect("a step");
            let mut eval = CpuBackend::for_evaluation(model.clone(), params).expect("cpu");
            // Whole evaluation batches: each buffer at its largest.
            let e = model.evaluation_batch(64, batch);
            let test = 3 * e;
            eval.evaluate(&xs(test), &ys(test), e).expect("evaluated");
            let held = held_bytes(&train) + held_bytes(&eval);
            let counted = model.training_bytes(batch);
            assert!(
                held <= counted,
                "{input:?}: {held} bytes held, {counted} counted"
            );
            assert!(
                eval.step(&xs(1), &ys(1)).is_err(),
                "an evaluation backend does not train"
            );
        }
    }

    /// A generation stays within its budget of multiply-adds: the demo-sized model makes
    /// all its bytes, a context of 1,024 fewer, one far larger none (with a reason).
    #[test]
    fn generation_takes_what_its_budget_allows() {
        use super::super::{LayerSpec, ModelSpec};
        let lm_heads = |ctx: usize, dim: usize, blocks: usize, heads: usize| {
            let mut layers = vec![LayerSpec::Embedding { vocab: 256, dim }];
            layers.extend((0..blocks).map(|_| LayerSpec::TransformerBlock {
                heads,
                mlp_ratio: 4,
            }));
            layers.extend([LayerSpec::LayerNorm, LayerSpec::LmHead { tied: true }]);
            Model::new(ModelSpec {
                input: [1, ctx, 1],
                layers,
            })
            .expect("valid")
        };
        let lm = |ctx, dim, blocks| lm_heads(ctx, dim, blocks, 4);
        assert_eq!(generation_bytes(&lm(64, 64, 2), 240).expect("small"), 240);
        // The softmax over every head's scores counts: as many heads as width is several
        // times the work of four heads of the same shape, and makes fewer bytes.
        let narrow = generation_bytes(&lm(1024, 32, 7), 240).expect("four heads");
        let wide = generation_bytes(&lm_heads(1024, 32, 7, 32), 240).expect("32 heads");
        assert!(
            3 * wide <= narrow,
            "{wide} bytes with 32 heads, {narrow} with 4"
        );
        let some = generation_bytes(&lm(1024, 256, 4), 240).expect("some");
        assert!((1..240).contains(&some), "{some}");
        let e = generation_bytes(&lm(2048, 1024, 2), 240).expect_err("too large");
        assert!(e.to_string().contains("multiply-adds a byte"), "{e}");
    }

    /// Evaluating in batches of 500 holds no more than training may: a language model of
    /// context 1024 holds 16 MiB of attention probabilities per window, so batches of 8
    /// at most (its task could train at 8 and no more). In one batch of its 24 windows
    /// evaluation held over 400 MiB (the dashboard's 500 windows, 8 GiB: past what a
    /// wasm32 page can hold).
    #[test]
    fn evaluation_holds_no_more_than_training_may() {
        use super::super::{LayerSpec, ModelSpec};
        let spec = ModelSpec {
            input: [1, 1024, 1],
            layers: vec![
                LayerSpec::Embedding { vocab: 32, dim: 16 },
                LayerSpec::TransformerBlock {
                    heads: 4,
                    mlp_ratio: 2,
                },
                LayerSpec::LayerNorm,
                LayerSpec::LmHead { tied: true },
            ],
        };
        let model = Model::new(spec).expect("valid");
        assert_eq!(evaluation_batch(&model, 500), 8);
        assert_eq!(evaluation_batch(&model, 7), 7);
        let params = model.init_params(1);
        let sgd = Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.0,
        };
        let mut cpu = CpuBackend::new(model, sgd, params).expect("valid");
        let windows = 24;
        let inputs: Vec<f32> = (0..windows * 1024).map(|i| (i % 31) as f32).collect();
        let labels: Vec<u8> = (0..windows * 1024).map(|i| ((i + 1) % 31) as u8).collect();
        let (loss, _) = cpu.evaluate(&inputs, &labels, 500).expect("finite");
        assert!(loss.is_finite() && loss > 0.0);
        let ws = &cpu.ws;
        let held: usize = ws
            .acts
            .iter()
            .chain(&ws.saved)
            .chain(&ws.cols)
            .map(|b| b.capacity() * 4)
            .sum();
        assert!(
            held <= 2 * super::super::WEBGPU_MAX_BINDING,
            "{} MiB",
            held >> 20
        );
    }

    /// The patch matrix by its definition, one value at a time.
    fn patches(
        x: &[f32],
        n: usize,
        input: [usize; 3],
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Vec<f32> {
        let [ih, iw, ic] = input;
        let (oh, ow) = (
            (ih + 2 * pad - k) / stride + 1,
            (iw + 2 * pad - k) / stride + 1,
        );
        let mut out = Vec::new();
        for s in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ky in 0..k {
                        for kx in 0..k {
                            for c in 0..ic {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                let inside =
                                    iy >= 0 && ix >= 0 && (iy as usize) < ih && (ix as usize) < iw;
                                out.push(if inside {
                                    x[((s * ih + iy as usize) * iw + ix as usize) * ic + c]
                                } else {
                                    0.0
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn im2col_matches_its_definition_for_every_kernel_row_length() {
        // Kernel rows of 3 and 24 values take the constant-length copies (3x3 on one
        // channel, 3x3 on 8, and other shapes that make the same lengths); the rest the
        // general path. Strides 1 to 3, every padding below the kernel, kernels larger
        // than the image.
        let mut checked = 0;
        for (k, ic) in [
            (3, 1),
            (3, 8),
            (1, 3),
            (2, 12),
            (1, 24),
            (5, 1),
            (4, 2),
            (3, 3),
        ] {
            for stride in 1..=3 {
                for pad in 0..k {
                    for (ih, iw) in [(5, 6), (2, 3), (7, 7)] {
                        if ih + 2 * pad < k || iw + 2 * pad < k {
                            continue;
                        }
                        let oh = (ih + 2 * pad - k) / stride + 1;
                        let ow = (iw + 2 * pad - k) / stride + 1;
                        let n = 2;
                        let x: Vec<f32> = (0..n * ih * iw * ic).map(|i| i as f32 + 1.0).collect();
                        let want = patches(&x, n, [ih, iw, ic], k, stride, pad);
                        let gathered = |gather: Gather| {
                            let mut out = vec![f32::NAN; want.len()];
                            gather(&x, n, [ih, iw, ic], [oh, ow, 1], k, stride, pad, &mut out);
                            out
                        };
                        let shape =
                            format!("k {k}, ic {ic}, stride {stride}, pad {pad}, {ih}x{iw}");
                        assert_eq!(gathered(im2col_for(k * ic)), want, "{shape}");
                        // The general path agrees on the same shapes.
                        assert_eq!(gathered(im2col::<0>), want, "{shape}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100, "{checked} shapes");
    }
}

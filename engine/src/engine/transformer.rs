//! The CPU reference of the language-model ops: token and position embedding, layer
//! normalization, a pre-norm transformer block (causal multi-head self-attention and a
//! GELU MLP, each around a residual connection), forward and backward.
//!
//! The exact math, which the README restates for anyone re-implementing the forward pass
//! from an export:
//! - layer norm: `y = gain * (x - mean) / sqrt(var + 1e-5) + bias`, with the biased
//!   variance over the vector's `dim` values;
//! - GELU, tanh form: `0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))`;
//! - attention: `q, k, v` are the three `dim`-wide thirds of `ln1(x) · qkv.weight +
//!   qkv.bias`; head `h` takes columns `h*hd .. (h+1)*hd` of each (`hd = dim / heads`);
//!   scores `q kᵀ / sqrt(hd)`, masked so position `i` sees positions `0..=i`, softmax
//!   per row; the heads' outputs side by side, times `out.weight`, plus `out.bias`.
//!
//! Matrix products go through the blocked [`gemm`]; per-head products use strided views
//! of the packed query-key-value rows, so nothing is transposed or copied in.

use std::ops::Range;

use super::gemm::{MatRef, gemm};

/// Layer-norm epsilon.
pub const LN_EPS: f32 = 1e-5;
/// `sqrt(2 / pi)`, of the tanh form of GELU.
const GELU_C: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh form of GELU.
const GELU_A: f32 = 0.044_715;

/// The shape of one transformer block applied to a batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockShape {
    /// Samples.
    pub n: usize,
    /// Positions per sample.
    pub ctx: usize,
    /// Width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub hidden: usize,
}

/// What the forward pass keeps for the backward, in this order.
const A: usize = 0; // ln1(x)            rows x dim
const ST1: usize = 1; // ln1's (mean, rstd) per row
const QKV: usize = 2; // rows x 3 dim
const PROBS: usize = 3; // n x heads x ctx x ctx attention probabilities
const O: usize = 4; // attention output before its projection, rows x dim
const H1: usize = 5; // x + attention, rows x dim
const B: usize = 6; // ln2(h1)
const ST2: usize = 7;
const U: usize = 8; // MLP pre-activation, rows x hidden
const G: usize = 9; // GELU(u)

impl BlockShape {
    fn rows(&self) -> usize {
        self.n * self.ctx
    }

    fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    fn segments(&self) -> [Range<usize>; 10] {
        let (r, d, f) = (self.rows(), self.dim, self.hidden);
        let lens = [
            r * d,
            2 * r,
            3 * r * d,
            self.n * self.heads * self.ctx * self.ctx,
            r * d,
            r * d,
            r * d,
            2 * r,
            r * f,
            r * f,
        ];
        let mut start = 0;
        lens.map(|len| {
            start += len;
            start - len..start
        })
    }

    /// Values the forward pass saves for the backward.
    pub(crate) fn saved_len(&self) -> usize {
        self.segments()[G].end
    }
}

/// Splits `buf` into the consecutive tensors `ranges` (sorted, disjoint) as mutable
/// slices.
pub(crate) fn split_ranges<const N: usize>(
    buf: &mut [f32],
    ranges: [Range<usize>; N],
) -> [&mut [f32]; N] {
    let mut rest = buf;
    let mut at = 0;
    ranges.map(|r| {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
        let (this, tail) = tail.split_at_mut(r.len());
        rest = tail;
        at = r.end;
        this
    })
}

/// Scratch space of the block's backward pass, reused across steps.
#[derive(Default)]
pub(crate) struct BlockScratch {
    wide: Vec<f32>,
    narrow: Vec<f32>,
    dh1: Vec<f32>,
    dqkv: Vec<f32>,
    dp: Vec<f32>,
    head: Vec<f32>,
}

#[cfg(test)]
impl BlockScratch {
    /// The values it holds.
    pub(crate) fn held(&self) -> usize {
        [
            &self.wide,
            &self.narrow,
            &self.dh1,
            &self.dqkv,
            &self.dp,
            &self.head,
        ]
        .iter()
        .map(|v| v.capacity())
        .sum()
    }
}

/// Layer norm of each `dim`-wide row of `x` into `y`, keeping `(mean, rstd)` per row.
#[cfg_attr(target_arch = "x86_64", inline(always))]
pub(crate) fn layer_norm(
    x: &[f32],
    dim: usize,
    gain: &[f32],
    bias: &[f32],
    y: &mut [f32],
    stats: &mut [f32],
) {
    for ((xr, yr), st) in x
        .chunks_exact(dim)
        .zip(y.chunks_exact_mut(dim))
        .zip(stats.chunks_exact_mut(2))
    {
        let mean = xr.iter().sum::<f32>() / dim as f32;
        let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let rstd = 1.0 / (var + LN_EPS).sqrt();
        for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(gain).zip(bias) {
            *o = (v - mean) * rstd * g + b;
        }
        st[0] = mean;
        st[1] = rstd;
    }
}

/// Backward of [`layer_norm`]: writes the gain and bias gradients, and adds the input
/// gradient into `dx`.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", inline(always))]
pub(crate) fn layer_norm_backward(
    x: &[f32],
    stats: &[f32],
    gain: &[f32],
    dy: &[f32],
    dim: usize,
    dgain: &mut [f32],
    dbias: &mut [f32],
    dx: &mut [f32],
) {
    dgain.fill(0.0);
    dbias.fill(0.0);
    for (((xr, st), dyr), dxr) in x
        .chunks_exact(dim)
        .zip(stats.chunks_exact(2))
        .zip(dy.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
    {
        let (mean, rstd) = (st[0], st[1]);
        let (mut m1, mut m2) = (0.0f32, 0.0f32);
        for j in 0..dim {
            let xhat = (xr[j] - mean) * rstd;
            let dxhat = dyr[j] * gain[j];
            dgain[j] += dyr[j] * xhat;
            dbias[j] += dyr[j];
            m1 += dxhat;
            m2 += dxhat * xhat;
        }
        m1 /= dim as f32;
        m2 /= dim as f32;
        for j in 0..dim {
            let xhat = (xr[j] - mean) * rstd;
            dxr[j] += rstd * (dyr[j] * gain[j] - m1 - xhat * m2);
        }
    }
}

/// `exp(x)` for `x` in about `[-87, 87]`, in plain arithmetic that the compiler
/// vectorizes (a libm call per element cost a third of a language model's CPU step):
/// `x = k ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by its Taylor series to `r^7` (relative
/// error below 2e-7), and `2^k` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in float
    // arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 87.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    // ln 2 split in two so that k * LN2_HI is exact.
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `shifted` lies in [2^23, 2^24), where a float's step is 1: its bits are those of
    // 1.5 * 2^23 (0x4B40_0000) plus k, and k + 127 (1 to 253 here) is 2^k's exponent.
    // Integer arithmetic on the bits, where `k as i32` (a saturating conversion, with
    // its NaN check) kept the loops that call this scalar: a third of the transformer's
    // own time outside the matrix products.
    let two_k = (shifted
        .to_bits()
        .wrapping_sub(0x4B40_0000)
        .wrapping_add(127))
        << 23;
    p * f32::from_bits(two_k)
}

/// `tanh(z)` as `1 - 2 / (e^{2z} + 1)` with [`exp_approx`] (absolute error about 1e-7).
#[inline(always)]
fn tanh_approx(z: f32) -> f32 {
    1.0 - 2.0 / (exp_approx(2.0 * z) + 1.0)
}

/// GELU, tanh form.
#[cfg_attr(target_arch = "x86_64", inline(always))]
pub fn gelu(u: f32) -> f32 {
    0.5 * u * (1.0 + tanh_approx(GELU_C * (u + GELU_A * u * u * u)))
}

#[cfg_attr(target_arch = "x86_64", inline(always))]
fn gelu_grad(u: f32) -> f32 {
    let t = tanh_approx(GELU_C * (u + GELU_A * u * u * u));
    0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * u * u)
}

#[cfg_attr(target_arch = "x86_64", inline(always))]
fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (v, &bb) in row.iter_mut().zip(b) {
            *v += bb;
        }
    }
}

#[cfg_attr(target_arch = "x86_64", inline(always))]
fn add_into(y: &mut [f32], x: &[f32]) {
    for (v, &a) in y.iter_mut().zip(x) {
        *v += a;
    }
}

#[cfg_attr(target_arch = "x86_64", inline(always))]
pub(crate) fn column_sums(m: &[f32], cols: usize, out: &mut [f32]) {
    out.fill(0.0);
    for row in m.chunks_exact(cols) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// Softmax of the scaled scores `row[..=i]` (the positions `i` may attend to); the rest
/// of the row becomes 0.
#[cfg_attr(target_arch = "x86_64", inline(always))]
fn causal_softmax(row: &mut [f32], i: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(i + 1);
    let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
    for v in live.iter_mut() {
        *v = exp_approx(*v * scale - max);
    }
    let sum: f32 = live.iter().sum();
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|v| *v *= inv);
    masked.fill(0.0);
}

/// Token plus position embedding of the token ids `x` (`n * ctx` of them).
pub(crate) fn embed(x: &[f32], ctx: usize, dim: usize, tok: &[f32], pos: &[f32], y: &mut [f32]) {
    for (r, (&id, yr)) in x.iter().zip(y.chunks_exact_mut(dim)).enumerate() {
        let t = r % ctx;
        let e = &tok[id as usize * dim..][..dim];
        let p = &pos[t * dim..][..dim];
        for ((o, &a), &b) in yr.iter_mut().zip(e).zip(p) {
            *o = a + b;
        }
    }
}

/// Backward of [`embed`]: the position table's gradient is written; the token table's is
/// added to (`accumulate`, when the head is tied and wrote it first) or written.
pub(crate) fn embed_backward(
    x: &[f32],
    ctx: usize,
    dim: usize,
    dy: &[f32],
    dtok: &mut [f32],
    dpos: &mut [f32],
    accumulate: bool,
) {
    if !accumulate {
        dtok.fill(0.0);
    }
    dpos.fill(0.0);
    for (r, (&id, g)) in x.iter().zip(dy.chunks_exact(dim)).enumerate() {
        let t = r % ctx;
        add_into(&mut dtok[id as usize * dim..][..dim], g);
        add_into(&mut dpos[t * dim..][..dim], g);
    }
}

/// One block forward: `y = h1 + mlp(ln2(h1))` with `h1 = x + attn(ln1(x))`. `p` holds the
/// block's twelve tensors in [`Op::Block`](super::Op::Block) order.
#[cfg_attr(target_arch = "x86_64", inline(always))]
pub(crate) fn block_forward(
    sh: &BlockShape,
    p: &[&[f32]; 12],
    x: &[f32],
    saved: &mut [f32],
    y: &mut [f32],
    scratch: &mut BlockScratch,
) {
    let (r, d, f) = (sh.rows(), sh.dim, sh.hidden);
    let [a, st1, qkv, probs, o, h1, b, st2, u, g] = split_ranges(saved, sh.segments());
    layer_norm(x, d, p[0], p[1], a, st1);
    gemm(
        MatRef::new(a, r, d),
        MatRef::new(p[2], d, 3 * d),
        qkv,
        false,
    );
    add_bias(qkv, p[3]);
    attention_forward(sh, qkv, probs, o, &mut scratch.head);
    gemm(MatRef::new(o, r, d), MatRef::new(p[4], d, d), h1, false);
    add_bias(h1, p[5]);
    add_into(h1, x);
    layer_norm(h1, d, p[6], p[7], b, st2);
    gemm(MatRef::new(b, r, d), MatRef::new(p[8], d, f), u, false);
    add_bias(u, p[9]);
    for (gv, &uv) in g.iter_mut().zip(u.iter()) {
        *gv = gelu(uv);
    }
    gemm(MatRef::new(g, r, f), MatRef::new(p[10], f, d), y, false);
    add_bias(y, p[11]);
    add_into(y, h1);
}

/// The query, key and value of head `h` of sample `s` as strided views of `qkv`.
fn qkv_views<'a>(sh: &BlockShape, qkv: &'a [f32], s: usize, h: usize) -> [MatRef<'a>; 3] {
    let (t, d, hd) = (sh.ctx, sh.dim, sh.head_dim());
    let base = s * t * 3 * d + h * hd;
    [0, 1, 2].map(|k| MatRef::strided(&qkv[base + k * d..], t, hd, 3 * d))
}

#[cfg_attr(target_arch = "x86_64", inline(always))]
fn attention_forward(
    sh: &BlockShape,
    qkv: &[f32],
    probs: &mut [f32],
    o: &mut [f32],
    head: &mut Vec<f32>,
) {
    let (t, d, hd) = (sh.ctx, sh.dim, sh.head_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    head.resize(t * hd, 0.0);
    for s in 0..sh.n {
        for h in 0..sh.heads {
            let [q, k, v] = qkv_views(sh, qkv, s, h);
            let pm = &mut probs[(s * sh.heads + h) * t * t..][..t * t];
            gemm(q, k.t(), pm, false);
            for (i, row) in pm.chunks_exact_mut(t).enumerate() {
                causal_softmax(row, i, scale);
            }
            gemm(MatRef::new(pm, t, t), v, head, false);
            for (i, src) in head.chunks_exact(hd).enumerate() {
                o[(s * t + i) * d + h * hd..][..hd].copy_from_slice(src);
            }
        }
    }
}

/// Gradients of the attention's packed `qkv` from the gradient of its output `d_o`.
#[cfg_attr(target_arch = "x86_64", inline(always))]
fn attention_backward(
    sh: &BlockShape,
    qkv: &[f32],
    probs: &[f32],
    d_o: &[f32],
    dqkv: &mut [f32],
    scratch: &mut BlockScratch,
) {
    let (t, d, hd) = (sh.ctx, sh.dim, sh.head_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    scratch.dp.resize(t * t, 0.0);
    scratch.head.resize(t * hd, 0.0);
    let (dp, head) = (&mut scratch.dp, &mut scratch.head);
    for s in 0..sh.n {
        for h in 0..sh.heads {
            let [q, k, v] = qkv_views(sh, qkv, s, h);
            let pm = &probs[(s * sh.heads + h) * t * t..][..t * t];
            let pr = MatRef::new(pm, t, t);
            let dout = MatRef::strided(&d_o[s * t * d + h * hd..], t, hd, d);
            let base = s * t * 3 * d + h * hd;
            let mut scatter = |which: usize, src: &[f32]| {
                for (i, row) in src.chunks_exact(hd).enumerate() {
                    dqkv[base + which * d + i * 3 * d..][..hd].copy_from_slice(row);
                }
            };
            // dV = Pᵀ dO
            gemm(pr.t(), dout, head, false);
            scatter(2, head);
            // dP = dO Vᵀ, then the softmax's backward: dS = P (dP - rowsum(P dP)).
            gemm(dout, v.t(), dp, false);
            for (prow, drow) in pm.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
                let dot: f32 = prow.iter().zip(drow.iter()).map(|(a, b)| a * b).sum();
                for (dv, &pv) in drow.iter_mut().zip(prow) {
                    *dv = pv * (*dv - dot) * scale;
                }
            }
            let ds = MatRef::new(dp, t, t);
            // dQ = dS K, dK = dSᵀ Q
            gemm(ds, k, head, false);
            scatter(0, head);
            gemm(ds.t(), q, head, false);
            scatter(1, head);
        }
    }
}

/// One block backward: from `dy`, writes the block's twelve gradients `gr` and the input
/// gradient `dx`.
#[cfg_attr(target_arch = "x86_64", inline(always))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_backward(
    sh: &BlockShape,
    p: &[&[f32]; 12],
    gr: [&mut [f32]; 12],
    x: &[f32],
    saved: &[f32],
    dy: &[f32],
    dx: &mut Vec<f32>,
    scratch: &mut BlockScratch,
) {
    let (r, d, f) = (sh.rows(), sh.dim, sh.hidden);
    let seg = sh.segments().map(|range| &saved[range]);
    let [
        g_ln1,
        g_ln1b,
        g_qkv,
        g_qkvb,
        g_out,
        g_outb,
        g_ln2,
        g_ln2b,
        g_up,
        g_upb,
        g_down,
        g_downb,
    ] = gr;
    // MLP: y = h1 + g W2 + b2, g = gelu(u), u = b W1 + b1.
    gemm(
        MatRef::new(seg[G], r, f).t(),
        MatRef::new(dy, r, d),
        g_down,
        false,
    );
    column_sums(dy, d, g_downb);
    scratch.wide.resize(r * f, 0.0);
    let du = &mut scratch.wide;
    gemm(
        MatRef::new(dy, r, d),
        MatRef::new(p[10], f, d).t(),
        du,
        false,
    );
    for (dv, &uv) in du.iter_mut().zip(seg[U]) {
        *dv *= gelu_grad(uv);
    }
    gemm(
        MatRef::new(seg[B], r, d).t(),
        MatRef::new(du, r, f),
        g_up,
        false,
    );
    column_sums(du, f, g_upb);
    scratch.narrow.resize(r * d, 0.0);
    gemm(
        MatRef::new(du, r, f),
        MatRef::new(p[8], d, f).t(),
        &mut scratch.narrow,
        false,
    );
    // h1's gradient: the residual path plus ln2's backward.
    scratch.dh1.clear();
    scratch.dh1.extend_from_slice(dy);
    layer_norm_backward(
        seg[H1],
        seg[ST2],
        p[6],
        &scratch.narrow,
        d,
        g_ln2,
        g_ln2b,
        &mut scratch.dh1,
    );
    let dh1 = &scratch.dh1;
    // Attention projection: h1 = x + o Wo + bo.
    gemm(
        MatRef::new(seg[O], r, d).t(),
        MatRef::new(dh1, r, d),
        g_out,
        false,
    );
    column_sums(dh1, d, g_outb);
    gemm(
        MatRef::new(dh1, r, d),
        MatRef::new(p[4], d, d).t(),
        &mut scratch.narrow,
        false,
    );
    scratch.dqkv.resize(3 * r * d, 0.0);
    let mut dqkv = std::mem::take(&mut scratch.dqkv);
    let d_o = std::mem::take(&mut scratch.narrow);
    attention_backward(sh, seg[QKV], seg[PROBS], &d_o, &mut dqkv, scratch);
    scratch.narrow = d_o;
    gemm(
        MatRef::new(seg[A], r, d).t(),
        MatRef::new(&dqkv, r, 3 * d),
        g_qkv,
        false,
    );
    column_sums(&dqkv, 3 * d, g_qkvb);
    gemm(
        MatRef::new(&dqkv, r, 3 * d),
        MatRef::new(p[2], d, 3 * d).t(),
        &mut scratch.narrow,
        false,
    );
    scratch.dqkv = dqkv;
    // x's gradient: the residual path plus ln1's backward.
    dx.clear();
    dx.extend_from_slice(&scratch.dh1);
    layer_norm_backward(x, seg[ST1], p[0], &scratch.narrow, d, g_ln1, g_ln1b, dx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_softmax_sees_only_the_past_and_sums_to_one() {
        let mut row = vec![1.0, 2.0, 3.0, 100.0];
        causal_softmax(&mut row, 1, 1.0);
        assert_eq!(row[2], 0.0);
        assert_eq!(row[3], 0.0);
        assert!((row[0] + row[1] - 1.0).abs() < 1e-6);
        assert!((row[1] / row[0] - 1f32.exp()).abs() < 1e-4);
    }

    #[test]
    fn gelu_matches_its_derivative() {
        for u in [-3.0f32, -0.5, 0.0, 0.3, 2.0] {
            let h = 1e-3;
            let fd = (gelu(u + h) - gelu(u - h)) / (2.0 * h);
            assert!(
                (fd - gelu_grad(u)).abs() < 1e-3,
                "u {u}: {fd} vs {}",
                gelu_grad(u)
            );
        }
        assert!((gelu(1.0) - 0.841_192).abs() < 1e-5);
    }

    #[test]
    fn the_vectorizable_exp_and_tanh_match_libm() {
        let mut worst = (0.0f32, 0.0f32);
        for i in -4000..=4000 {
            let x = i as f32 * 0.02;
            let rel = (exp_approx(x) - x.exp()).abs() / x.exp();
            worst.0 = worst.0.max(rel);
            worst.1 = worst.1.max((tanh_approx(x) - x.tanh()).abs());
        }
        // To the ends of the clamp, where 2^k is 2^-126 and 2^126; beyond them, the ends.
        for i in -8700..=8700 {
            let x = i as f32 * 0.01;
            let rel = (exp_approx(x) - x.exp()).abs() / x.exp();
            worst.0 = worst.0.max(rel);
        }
        assert!(worst.0 < 1e-6, "exp relative error {}", worst.0);
        assert!(worst.1 < 1e-6, "tanh absolute error {}", worst.1);
        assert_eq!(exp_approx(-1e4), exp_approx(-87.0));
        assert_eq!(exp_approx(1e4), exp_approx(87.0));
        assert!(exp_approx(-87.0) > 0.0 && exp_approx(87.0).is_finite());
        assert!(exp_approx(f32::NAN).is_nan());
        assert_eq!(tanh_approx(50.0), 1.0);
        assert_eq!(tanh_approx(-50.0), -1.0);
    }

    #[test]
    fn split_ranges_skips_padding() {
        let mut buf: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let [a, b] = split_ranges(&mut buf, [1..3, 5..9]);
        assert_eq!(a, &[1.0, 2.0]);
        assert_eq!(b, &[5.0, 6.0, 7.0, 8.0]);
    }
}

//! Stride-1 convolutions on the CPU computed straight from a zero-bordered copy of their
//! input (an "implicit GEMM"): no patch matrix is written and nothing is packed.
//!
//! Through a patch matrix (im2col) a 3x3 convolution of 8 or 16 filters first copies its
//! input nine times over, then packs those copies again for the matrix product, whose
//! depth (9 or 72) is too short to pay for either; scattering the patch gradients back
//! (col2im) cost as much again. Here a register block of output pixels by filters reads
//! each kernel row of the bordered input where it lies: a kernel row of `k x c` values
//! is contiguous in NHWC, and the weights (`[k, k, c, filters]`) are already laid out as
//! the micro-kernel reads them. The three products of a training step:
//! - forward: `y[q, f] = sum over taps of xp[base(q) + off(tap)] * w[tap, f]`;
//! - weights: `dw[tap, f] = sum over pixels q of xp[base(q) + off(tap)] * g[q, f]`;
//! - input: the transposed convolution, the same forward kernel over `g` bordered by
//!   `k - 1 - pad`, with the kernel flipped and its input and output channels swapped.
//!
//! The blocks are a multiple of 8 filters (one AVX register, two wasm SIMD registers):
//! [`Conv::direct`] says which convolutions this module computes, and
//! [`Conv::direct_input_grad`] which of those have their input gradient computed here;
//! the CPU backend keeps the patch matrix for the others (strided ones, filter counts
//! such as 10, wide layers, input gradients of fewer than 8 channels).
//! As the [`gemm`](super::gemm), the kernels are compiled a second time with AVX2 and
//! FMA on x86-64 and chosen at run time.

/// A stride-1 convolution of a batch: `n` samples of `input` `[h, w, c]` into `output`
/// `[oh, ow, filters]`, a `k x k` kernel, `pad` zeros on every side.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Conv {
    pub(crate) n: usize,
    pub(crate) input: [usize; 3],
    pub(crate) output: [usize; 3],
    pub(crate) k: usize,
    pub(crate) pad: usize,
}

/// Output pixels per register block of the forward kernel, and taps per block of the
/// weight gradient's, for blocks of 8 and of 16 filters. Sixteen 256-bit registers on
/// x86-64 hold the accumulators, a row of weights or gradients and a broadcast (the
/// weight gradient's blocks are smaller: 12 accumulators spilled there, beside the taps'
/// offsets); wasm SIMD's 128-bit vectors hold half as much each.
#[cfg(not(target_arch = "wasm32"))]
const PIXELS: (usize, usize) = (12, 6);
#[cfg(not(target_arch = "wasm32"))]
const TAPS: (usize, usize) = (8, 4);
#[cfg(target_arch = "wasm32")]
const PIXELS: (usize, usize) = (6, 3);
#[cfg(target_arch = "wasm32")]
const TAPS: (usize, usize) = (4, 2);

/// The most weights (`k x k x c x filters`) a convolution computed here has: its weight
/// gradient passes over each sample's input and output gradient once per block of taps
/// and filters, cheap while those stay in cache, and its forward kernel reads every
/// weight per block of pixels; a wider layer goes through the packed matrix product.
const MAX_WEIGHTS: usize = 8192;

impl Conv {
    /// Whether these kernels compute a convolution of `stride`, a `kernel` side, `channels`
    /// in and `filters` out: filters in blocks of 8, stride 1 (a strided one would read a
    /// bordered input larger than its patch matrix), at most [`MAX_WEIGHTS`] weights.
    pub(crate) fn direct(stride: usize, kernel: usize, channels: usize, filters: usize) -> bool {
        stride == 1
            && filters.is_multiple_of(8)
            && kernel
                .saturating_mul(kernel)
                .saturating_mul(channels)
                .saturating_mul(filters)
                <= MAX_WEIGHTS
    }

    /// The convolution of a model's op over `n` samples, where these kernels compute it
    /// ([`Conv::direct`]).
    pub(crate) fn of_op(
        n: usize,
        input: [usize; 3],
        output: [usize; 3],
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        Self::direct(stride, kernel, input[2], output[2]).then_some(Self {
            n,
            input,
            output,
            k: kernel,
            pad,
        })
    }

    /// Whether the input gradient is computed here too: the transposed convolution's
    /// filters are this one's input channels, and its bordered gradient must not be
    /// larger than the patch gradients the general path would write.
    pub(crate) fn direct_input_grad(&self) -> bool {
        let [oh, ow, f] = self.output;
        let q = self.k - 1 - self.pad;
        let bordered = (oh + 2 * q) * (ow + 2 * q) * f;
        self.input[2].is_multiple_of(8) && bordered <= oh * ow * self.k * self.k * self.input[2]
    }

    /// The transposed convolution that maps this one's output gradient to its input
    /// gradient.
    fn transposed(&self) -> Self {
        Self {
            n: self.n,
            input: self.output,
            output: self.input,
            k: self.k,
            pad: self.k - 1 - self.pad,
        }
    }

    /// Height and width of the bordered input.
    fn bordered(&self) -> (usize, usize) {
        (self.input[0] + 2 * self.pad, self.input[1] + 2 * self.pad)
    }
}

/// Copies `x` (`n` samples of `[h, w, c]`) into `out` with `pad` zeros on every side.
pub(crate) fn border(x: &[f32], n: usize, [h, w, c]: [usize; 3], pad: usize, out: &mut Vec<f32>) {
    let (ph, pw) = (h + 2 * pad, w + 2 * pad);
    out.clear();
    out.resize(n * ph * pw * c, 0.0);
    if h == 0 || w == 0 || c == 0 {
        return;
    }
    for (s, sample) in x.chunks_exact(h * w * c).take(n).enumerate() {
        for (y, row) in sample.chunks_exact(w * c).enumerate() {
            let at = ((s * ph + y + pad) * pw + pad) * c;
            out[at..at + w * c].copy_from_slice(row);
        }
    }
}

/// `y = conv(xp, w) (+ bias, rectified)`, `xp` the input bordered by [`border`], `w`
/// `[k, k, c, filters]`.
pub(crate) fn forward(
    sh: &Conv,
    xp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::gemm::avx2_fma() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only
        // requirement `forward_fma` adds to the safe `forward_in`.
        unsafe {
            forward_fma(sh, xp, w, bias, relu, y);
        }
        return;
    }
    forward_in::<false>(sh, xp, w, bias, relu, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_fma(sh: &Conv, xp: &[f32], w: &[f32], bias: Option<&[f32]>, relu: bool, y: &mut [f32]) {
    forward_in::<true>(sh, xp, w, bias, relu, y);
}

/// Blocks of 16 filters where the filters come in sixteens, natively; in the browser
/// always blocks of 8 (each block width is a copy of the kernels, and the bundle's size
/// counts there).
#[inline(always)]
fn wide_blocks(filters: usize) -> bool {
    cfg!(not(target_arch = "wasm32")) && filters.is_multiple_of(16)
}

#[inline(always)]
fn forward_in<const FMA: bool>(
    sh: &Conv,
    xp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    if wide_blocks(sh.output[2]) {
        forward_blocks::<FMA, 16, { PIXELS.1 }>(sh, xp, w, bias, relu, y);
    } else {
        forward_blocks::<FMA, 8, { PIXELS.0 }>(sh, xp, w, bias, relu, y);
    }
}

/// The offsets of output pixels' windows in the bordered input, in order: `(s, oy, ox)`
/// to `((s * ph + oy) * pw + ox) * c`.
struct Windows {
    ow: usize,
    oh: usize,
    c: usize,
    /// Values per bordered row and per bordered sample.
    row: usize,
    sample: usize,
    ox: usize,
    oy: usize,
    row_start: usize,
    sample_start: usize,
}

impl Windows {
    fn new(sh: &Conv) -> Self {
        let (ph, pw) = sh.bordered();
        let c = sh.input[2];
        Self {
            ow: sh.output[1],
            oh: sh.output[0],
            c,
            row: pw * c,
            sample: ph * pw * c,
            ox: 0,
            oy: 0,
            row_start: 0,
            sample_start: 0,
        }
    }

    #[inline(always)]
    fn next(&mut self) -> usize {
        let at = self.row_start + self.ox * self.c;
        self.ox += 1;
        if self.ox == self.ow {
            self.ox = 0;
            self.oy += 1;
            self.row_start += self.row;
            if self.oy == self.oh {
                self.oy = 0;
                self.sample_start += self.sample;
                self.row_start = self.sample_start;
            }
        }
        at
    }
}

#[inline(always)]
fn forward_blocks<const FMA: bool, const NB: usize, const P: usize>(
    sh: &Conv,
    xp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let [oh, ow, f] = sh.output;
    let kc = sh.k * sh.input[2];
    let total = sh.n * oh * ow;
    let mut windows = Windows::new(sh);
    let row = windows.row;
    let zeros = [0.0f32; NB];
    for q0 in (0..total).step_by(P) {
        let m = P.min(total - q0);
        let mut at = [0usize; P];
        for a in at.iter_mut().take(m) {
            *a = windows.next();
        }
        // A last, partial block repeats its last pixel (computed, not stored).
        for i in m..P {
            at[i] = at[m - 1];
        }
        for j0 in (0..f).step_by(NB) {
            let acc = forward_micro::<FMA, NB, P>(xp, &at, sh.k, kc, row, w, f, j0);
            let b: &[f32; NB] = match bias {
                Some(b) => b[j0..j0 + NB].try_into().expect("NB values"),
                None => &zeros,
            };
            for (p, a) in acc.iter().enumerate().take(m) {
                let out = &mut y[(q0 + p) * f + j0..][..NB];
                for ((o, &v), &bb) in out.iter_mut().zip(a).zip(b) {
                    let s = v + bb;
                    *o = if relu { s.max(0.0) } else { s };
                }
            }
        }
    }
}

/// One block: `P` pixels (their windows at `at`) by filters `j0..j0 + NB`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_micro<const FMA: bool, const NB: usize, const P: usize>(
    xp: &[f32],
    at: &[usize; P],
    k: usize,
    kc: usize,
    row: usize,
    w: &[f32],
    f: usize,
    j0: usize,
) -> [[f32; NB]; P] {
    let mut acc = [[0.0f32; NB]; P];
    for ky in 0..k {
        // Each pixel's kernel row `ky`: `k x c` values in a row of the bordered input.
        let xs: [&[f32]; P] = std::array::from_fn(|p| &xp[at[p] + ky * row..][..kc]);
        let ws = &w[ky * kc * f..(ky + 1) * kc * f];
        for t in 0..kc {
            let wr: &[f32; NB] = ws[t * f + j0..t * f + j0 + NB]
                .try_into()
                .expect("NB values");
            for p in 0..P {
                let a = xs[p][t];
                for j in 0..NB {
                    acc[p][j] = madd::<FMA>(a, wr[j], acc[p][j]);
                }
            }
        }
    }
    acc
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// The weight gradient: `gw[tap, f] = sum over output pixels q of xp[window(q) + tap] *
/// g[q, f]` (overwritten), `xp` the bordered input the forward pass read.
pub(crate) fn weight_grad(sh: &Conv, xp: &[f32], g: &[f32], gw: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::gemm::avx2_fma() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only
        // requirement `weight_grad_fma` adds to the safe `weight_grad_in`.
        unsafe {
            weight_grad_fma(sh, xp, g, gw);
        }
        return;
    }
    weight_grad_in::<false>(sh, xp, g, gw);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weight_grad_fma(sh: &Conv, xp: &[f32], g: &[f32], gw: &mut [f32]) {
    weight_grad_in::<true>(sh, xp, g, gw);
}

#[inline(always)]
fn weight_grad_in<const FMA: bool>(sh: &Conv, xp: &[f32], g: &[f32], gw: &mut [f32]) {
    if wide_blocks(sh.output[2]) {
        weight_grad_blocks::<FMA, 16, { TAPS.1 }>(sh, xp, g, gw);
    } else {
        weight_grad_blocks::<FMA, 8, { TAPS.0 }>(sh, xp, g, gw);
    }
}

/// Blocks of `T` taps by `NB` filters, summed over one sample's pixels at a time (its
/// gradient rows and bordered input stay in cache across the blocks).
#[inline(always)]
fn weight_grad_blocks<const FMA: bool, const NB: usize, const T: usize>(
    sh: &Conv,
    xp: &[f32],
    g: &[f32],
    gw: &mut [f32],
) {
    let [oh, ow, f] = sh.output;
    let c = sh.input[2];
    let kc = sh.k * c;
    let taps = sh.k * kc;
    let (ph, pw) = sh.bordered();
    let row = pw * c;
    gw[..taps * f].fill(0.0);
    for s in 0..sh.n {
        let xs = &xp[s * ph * row..(s + 1) * ph * row];
        let gs = &g[s * oh * ow * f..(s + 1) * oh * ow * f];
        for t0 in (0..taps).step_by(T) {
            let m = T.min(taps - t0);
            // Each tap's offset in a window; a partial block repeats its last tap.
            let off: [usize; T] = std::array::from_fn(|i| {
                let tap = t0 + i.min(m - 1);
                (tap / kc) * row + tap % kc
            });
            for j0 in (0..f).step_by(NB) {
                let mut acc = [[0.0f32; NB]; T];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let window = &xs[oy * row + ox * c..];
                        let q = oy * ow + ox;
                        let gr: &[f32; NB] = gs[q * f + j0..q * f + j0 + NB]
                            .try_into()
                            .expect("NB values");
                        for i in 0..T {
                            let a = window[off[i]];
                            for j in 0..NB {
                                acc[i][j] = madd::<FMA>(a, gr[j], acc[i][j]);
                            }
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate().take(m) {
                    let out = &mut gw[(t0 + i) * f + j0..][..NB];
                    for (o, &v) in out.iter_mut().zip(a) {
                        *o += v;
                    }
                }
            }
        }
    }
}

/// The input gradient `dx` of a convolution with weights `w`, given its output gradient
/// `g`, when [`Conv::direct_input_grad`]: `g` is bordered into `gp` and the flipped,
/// transposed kernel written to `wt` (both scratch, reused across steps).
pub(crate) fn input_grad(
    sh: &Conv,
    g: &[f32],
    w: &[f32],
    gp: &mut Vec<f32>,
    wt: &mut Vec<f32>,
    dx: &mut [f32],
) {
    let t = sh.transposed();
    border(g, sh.n, t.input, t.pad, gp);
    let (k, ci, f) = (sh.k, sh.input[2], sh.output[2]);
    wt.clear();
    wt.resize(k * k * f * ci, 0.0);
    for ky in 0..k {
        for kx in 0..k {
            let from = ((k - 1 - ky) * k + (k - 1 - kx)) * ci;
            let to = (ky * k + kx) * f;
            for c in 0..ci {
                for j in 0..f {
                    wt[(to + j) * ci + c] = w[(from + c) * f + j];
                }
            }
        }
    }
    forward(&t, gp, wt, None, false, dx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Every term of the convolution by its definition: `visit(xi, wi, yi)` for each
    /// product `x[s, oy + ky - pad, ox + kx - pad, c] * w[ky, kx, c, j]` (taps inside the
    /// image) that adds to `y[s, oy, ox, j]`, by their indices.
    fn terms(sh: &Conv, mut visit: impl FnMut(usize, usize, usize)) {
        let ([ih, iw, ic], [oh, ow, f], k) = (sh.input, sh.output, sh.k);
        for s in 0..sh.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy + ky) as isize - sh.pad as isize;
                            let ix = (ox + kx) as isize - sh.pad as isize;
                            if iy < 0 || ix < 0 || iy as usize >= ih || ix as usize >= iw {
                                continue;
                            }
                            for c in 0..ic {
                                let xi = ((s * ih + iy as usize) * iw + ix as usize) * ic + c;
                                for j in 0..f {
                                    let wi = ((ky * k + kx) * ic + c) * f + j;
                                    visit(xi, wi, ((s * oh + oy) * ow + ox) * f + j);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The convolution by its definition, in f64.
    fn reference(x: &[f32], w: &[f32], sh: &Conv) -> Vec<f32> {
        let [oh, ow, f] = sh.output;
        let mut y = vec![0.0f64; sh.n * oh * ow * f];
        terms(sh, |xi, wi, yi| {
            y[yi] += f64::from(x[xi]) * f64::from(w[wi])
        });
        y.into_iter().map(|v| v as f32).collect()
    }

    /// The derivatives of `sum(y * g)` by the weights and by the input, term by term of
    /// the definition: each term adds `x * g` to its weight's and `w * g` to its input's,
    /// `g` at the output it feeds.
    fn gradients(x: &[f32], w: &[f32], g: &[f32], sh: &Conv) -> (Vec<f32>, Vec<f32>) {
        let (mut dw, mut dx) = (vec![0.0f64; w.len()], vec![0.0f64; x.len()]);
        terms(sh, |xi, wi, yi| {
            let gv = f64::from(g[yi]);
            dw[wi] += f64::from(x[xi]) * gv;
            dx[xi] += f64::from(w[wi]) * gv;
        });
        let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
        (f32s(dw), f32s(dx))
    }

    fn random(len: usize, rng: &mut SplitMix64) -> Vec<f32> {
        (0..len).map(|_| rng.normal_f32()).collect()
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * scale * 8.0,
                "{what}: value {i}: {g} against {w}"
            );
        }
    }

    /// Every product of a training step against the definition: the forward pass (with
    /// bias and rectifier) and the derivatives of `sum(y * g)` by the weights and by the
    /// input. Shapes cross every block boundary: 8, 16,
    /// 24 and 32 filters, 1 to 16 channels, kernels 1 to 5, every padding, pixel counts
    /// that leave partial blocks, tap counts that leave partial tap blocks.
    #[test]
    fn every_product_matches_the_definition() {
        let mut rng = SplitMix64::new(7);
        let mut checked = 0;
        for (k, ic, f) in [
            (3, 1, 8),
            (3, 8, 16),
            (3, 8, 8),
            (1, 16, 8),
            (5, 2, 24),
            (2, 3, 32),
            (3, 16, 16),
            (4, 8, 8),
            // Partial blocks of taps with 16-wide blocks of filters.
            (3, 1, 16),
            (1, 3, 16),
        ] {
            for pad in 0..k {
                for (n, ih, iw) in [(2, 5, 7), (1, 3, 3), (3, 6, 4)] {
                    if ih + 2 * pad < k || iw + 2 * pad < k {
                        continue;
                    }
                    let (oh, ow) = (ih + 2 * pad - k + 1, iw + 2 * pad - k + 1);
                    let sh = Conv {
                        n,
                        input: [ih, iw, ic],
                        output: [oh, ow, f],
                        k,
                        pad,
                    };
                    let what = format!("{sh:?}");
                    let x = random(n * ih * iw * ic, &mut rng);
                    let w = random(k * k * ic * f, &mut rng);
                    let b = random(f, &mut rng);
                    let g = random(n * oh * ow * f, &mut rng);
                    let mut xp = Vec::new();
                    border(&x, n, sh.input, pad, &mut xp);

                    let mut y = vec![f32::NAN; n * oh * ow * f];
                    forward(&sh, &xp, &w, Some(&b), true, &mut y);
                    let want: Vec<f32> = reference(&x, &w, &sh)
                        .chunks_exact(f)
                        .flat_map(|r| r.iter().zip(&b).map(|(v, bb)| (v + bb).max(0.0)))
                        .collect();
                    close(&y, &want, &format!("forward {what}"));

                    let (dw, dx) = gradients(&x, &w, &g, &sh);
                    let mut gw = vec![f32::NAN; w.len()];
                    weight_grad(&sh, &xp, &g, &mut gw);
                    close(&gw, &dw, &format!("weights {what}"));

                    if sh.direct_input_grad() {
                        let (mut gp, mut wt) = (Vec::new(), Vec::new());
                        let mut got = vec![f32::NAN; x.len()];
                        input_grad(&sh, &g, &w, &mut gp, &mut wt, &mut got);
                        close(&got, &dx, &format!("input {what}"));
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 30, "{checked} input gradients checked");
    }

    #[test]
    fn only_stride_one_and_whole_blocks_of_filters_are_direct() {
        assert!(Conv::direct(1, 3, 1, 8) && Conv::direct(1, 3, 8, 16) && Conv::direct(1, 1, 3, 40));
        assert!(!Conv::direct(2, 3, 1, 8), "strided");
        assert!(
            !Conv::direct(1, 3, 1, 10) && !Conv::direct(1, 3, 1, 4),
            "not blocks of 8"
        );
        assert!(
            !Conv::direct(1, 3, 64, 64),
            "36,864 weights: the packed product"
        );
        let sh = |ic, f, k, pad| Conv {
            n: 1,
            input: [8, 8, ic],
            output: [8 + 2 * pad - k + 1, 8 + 2 * pad - k + 1, f],
            k,
            pad,
        };
        assert!(sh(8, 16, 3, 1).direct_input_grad());
        assert!(!sh(3, 16, 3, 1).direct_input_grad(), "3 channels");
        // A 1x1 kernel from 8 channels to 64 filters: the bordered gradient (64 values a
        // pixel) is larger than the patch gradients (8).
        assert!(!sh(8, 64, 1, 0).direct_input_grad());
    }
}

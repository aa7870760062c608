//! Single-precision matrix multiplication for the CPU backend: `C = A·B` (or `C += A·B`)
//! with either operand optionally transposed, cache-blocked in the manner of BLIS.
//!
//! Panels of A (`MR` rows) and B (`NR` columns) are packed into contiguous, zero-padded
//! buffers — which makes transposition free — and a register-blocked `MR x NR`
//! micro-kernel runs over them. The micro-kernel is written so that LLVM vectorizes it:
//! on x86-64 it is compiled a second time with AVX2 and FMA and chosen at run time; on
//! wasm32 the workspace builds with `simd128`.

/// Rows of C per micro-kernel call.
const MR: usize = 6;
/// Columns of C per micro-kernel call (two 8-wide AVX registers); products with at most
/// [`NR_NARROW`] columns (a convolution with 8 filters) use that many instead, so that
/// half of every register is not spent on zero padding.
const NR: usize = 16;
/// The micro-kernel's width for narrow products.
const NR_NARROW: usize = 8;
/// Depth of one packed panel (keeps an `NR x KC` B sliver in L1).
const KC: usize = 256;
/// Rows of A packed at once (an `MC x KC` block lives in L2).
const MC: usize = 96;
/// Columns of B packed at once.
const NC: usize = 2048;

/// A row-major matrix view, possibly transposed: element `(i, j)` is
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A `rows x cols` row-major matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix data too short");
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// A `rows x cols` matrix whose rows start `row_stride` values apart (a column block
    /// of a wider row-major matrix, such as one attention head's slice of the packed
    /// query-key-value rows).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            rows == 0 || data.len() >= (rows - 1) * row_stride + cols,
            "matrix data too short"
        );
        Self {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// `c[m x n] (+)= a[m x k] · b[k x n]`, with `c` row-major. Overwrites `c` unless
/// `accumulate`.
///
/// # Panics
/// If the inner dimensions disagree or `c` is too short.
pub fn gemm(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows, "inner dimensions disagree");
    let (m, n) = (a.rows, b.cols);
    assert!(c.len() >= m * n, "output too short");
    if m == 0 || n == 0 || a.cols == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is the only
            // requirement `gemm_avx2_fma` adds to the safe `gemm_blocked`.
            unsafe {
                if n <= NR_NARROW {
                    gemm_avx2_fma::<NR_NARROW>(a, b, c, accumulate);
                } else {
                    gemm_avx2_fma::<NR>(a, b, c, accumulate);
                }
            }
            return;
        }
    }
    if n <= NR_NARROW {
        gemm_blocked::<false, NR_NARROW>(a, b, c, accumulate);
    } else {
        gemm_blocked::<false, NR>(a, b, c, accumulate);
    }
}

/// Whether this CPU has AVX2 and FMA, for the kernels compiled a second time with them.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gemm_avx2_fma<const NR: usize>(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
    gemm_blocked::<true, NR>(a, b, c, accumulate);
}

/// The blocked loop nest; `FMA` selects fused multiply-add in the micro-kernel (only
/// worth it where the target has a hardware FMA instruction). Unless `accumulate`, the
/// first depth block stores into `c` instead of adding (no separate zeroing pass).
#[inline(always)]
fn gemm_blocked<const FMA: bool, const NR: usize>(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Packing buffers sized to this product, not to the largest block: zeroing a full
    // `NC x KC` panel (2 MiB) per call cost more than the arithmetic of a small batch.
    let kcap = KC.min(k);
    let mut pa = vec![0.0f32; MC.min(m).div_ceil(MR) * MR * kcap];
    let mut pb = vec![0.0f32; NC.min(n).div_ceil(NR) * NR * kcap];
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack_b::<NR>(b, pc, kc, jc, nc, &mut pb);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                pack_a(a, ic, mc, pc, kc, &mut pa);
                for jr in (0..nc).step_by(NR) {
                    let nr = NR.min(nc - jr);
                    let bp = &pb[jr * kc..(jr + NR) * kc];
                    for ir in (0..mc).step_by(MR) {
                        let mr = MR.min(mc - ir);
                        let ap = &pa[ir * kc..(ir + MR) * kc];
                        let acc = micro::<FMA, NR>(ap, bp, kc);
                        let store = pc == 0 && !accumulate;
                        for (i, row) in acc.iter().enumerate().take(mr) {
                            let off = (ic + ir + i) * n + jc + jr;
                            let dst = &mut c[off..off + nr];
                            if store {
                                dst.copy_from_slice(&row[..nr]);
                            } else {
                                for (d, &v) in dst.iter_mut().zip(row) {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The `MR x NR` register block over one packed panel pair.
#[inline(always)]
fn micro<const FMA: bool, const NR: usize>(ap: &[f32], bp: &[f32], kc: usize) -> [[f32; NR]; MR] {
    let mut acc = [[0.0f32; NR]; MR];
    for (a, b) in ap.chunks_exact(MR).zip(bp.chunks_exact(NR)).take(kc) {
        let b: &[f32; NR] = b.try_into().expect("chunk of NR");
        for i in 0..MR {
            let ai = a[i];
            for j in 0..NR {
                acc[i][j] = if FMA {
                    ai.mul_add(b[j], acc[i][j])
                } else {
                    ai * b[j] + acc[i][j]
                };
            }
        }
    }
    acc
}

/// Packs rows `ic..ic+mc`, depth `pc..pc+kc` of A as `MR`-row slivers, depth-major, zero
/// padded to a multiple of `MR` rows.
#[inline(always)]
fn pack_a(a: MatRef<'_>, ic: usize, mc: usize, pc: usize, kc: usize, out: &mut [f32]) {
    for (s, ir) in (0..mc).step_by(MR).enumerate() {
        let sliver = &mut out[s * MR * kc..(s + 1) * MR * kc];
        let rows = MR.min(mc - ir);
        if a.cs == 1 {
            // Rows of A are contiguous: read each along its length (the strided side is
            // the write into the small sliver, which stays in L1).
            for i in 0..MR {
                if i < rows {
                    let start = (ic + ir + i) * a.rs + pc;
                    for (p, &v) in a.data[start..start + kc].iter().enumerate() {
                        sliver[p * MR + i] = v;
                    }
                } else {
                    for p in 0..kc {
                        sliver[p * MR + i] = 0.0;
                    }
                }
            }
            continue;
        }
        if a.rs == 1 && rows == MR {
            // A transposed (columns contiguous): the sliver's `MR` values at each depth
            // are consecutive in memory.
            for p in 0..kc {
                let start = (pc + p) * a.cs + ic + ir;
                sliver[p * MR..(p + 1) * MR].copy_from_slice(&a.data[start..start + MR]);
            }
            continue;
        }
        for p in 0..kc {
            for i in 0..MR {
                sliver[p * MR + i] = if i < rows {
                    a.at(ic + ir + i, pc + p)
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs depth `pc..pc+kc`, columns `jc..jc+nc` of B as `NR`-column slivers, depth-major,
/// zero padded to a multiple of `NR` columns.
#[inline(always)]
fn pack_b<const NR: usize>(
    b: MatRef<'_>,
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
    out: &mut [f32],
) {
    for (s, jr) in (0..nc).step_by(NR).enumerate() {
        let sliver = &mut out[s * NR * kc..(s + 1) * NR * kc];
        let cols = NR.min(nc - jr);
        for p in 0..kc {
            let dst = &mut sliver[p * NR..(p + 1) * NR];
            if cols == NR && b.cs == 1 {
                let start = (pc + p) * b.rs + jc + jr;
                dst.copy_from_slice(&b.data[start..start + NR]);
            } else {
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = if j < cols {
                        b.at(pc + p, jc + jr + j)
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// The obvious triple loop, in f64: the reference the blocked kernel is tested against.
pub fn gemm_reference(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|p| f64::from(a.at(i, p)) * f64::from(b.at(p, j)))
                .sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..len).map(|_| r.normal_f32()).collect()
    }

    fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(0.0, f32::max)
    }

    #[test]
    fn matches_the_reference_for_awkward_shapes_and_transposes() {
        // Shapes straddle every blocking boundary: MR, NR, KC, MC.
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 17),
            (13, 300, 33),
            (97, 257, 18),
            (6, 16, 16),
            (200, 40, 3),
            // The narrow kernel (at most 8 columns) across MC and KC blocks.
            (130, 9, 8),
            (13, 300, 8),
            (97, 257, 5),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a_data = random(m * k, 1);
                let b_data = random(k * n, 2);
                let a = if ta {
                    MatRef::new(&a_data, k, m).t()
                } else {
                    MatRef::new(&a_data, m, k)
                };
                let b = if tb {
                    MatRef::new(&b_data, n, k).t()
                } else {
                    MatRef::new(&b_data, k, n)
                };
                let mut c = vec![f32::NAN; m * n];
                gemm(a, b, &mut c, false);
                let err = max_rel_err(&c, &gemm_reference(a, b));
                assert!(
                    err < 1e-5,
                    "{m}x{k}x{n} ta={ta} tb={tb}: relative error {err}"
                );
            }
        }
    }

    #[test]
    fn accumulates_when_asked() {
        let a = random(12, 3);
        let b = random(12, 4);
        let mut c = vec![1.0f32; 9];
        gemm(MatRef::new(&a, 3, 4), MatRef::new(&b, 4, 3), &mut c, true);
        let want: Vec<f32> = gemm_reference(MatRef::new(&a, 3, 4), MatRef::new(&b, 4, 3))
            .iter()
            .map(|v| v + 1.0)
            .collect();
        assert!(max_rel_err(&c, &want) < 1e-5);
    }
}

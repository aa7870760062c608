//! Differential privacy: the accountant that turns a task's noise into an epsilon, and
//! the clip-and-noise step every peer applies to its own update before it leaves.
//!
//! The mechanism (docs/protocol.md, "Differential privacy"): each round a peer clips its
//! update (the round's pseudo-gradient) to L2 norm `clip` and adds Gaussian noise of
//! standard deviation `noise_multiplier * clip` to every coordinate, before compression.
//! What is protected is a visitor's whole contribution to a round (user-level DP): the
//! update a peer sends with the visitor's data, against the update it would send with no
//! data at all (the zero update plus the same noise), for anyone who receives it. Over
//! rounds this is the composition of Gaussian mechanisms, which the accountant adds up
//! in Rényi DP (RDP) and converts to `(epsilon, delta)`.
//!
//! The accountant follows the analysis of the sampled Gaussian mechanism (Mironov, Talwar
//! and Zhang 2019) with the RDP-to-DP conversion of Canonne, Kamath and Steinke (2020),
//! over the same orders as Google's `dp-accounting`, which `cargo xtask test` checks it
//! against. A sampling rate below 1 is supported for planning (a round that includes a
//! visitor's data only with that probability, decided in secret); Shoal's peers use
//! every round they send, so their rate is 1.

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// A task's `[privacy]` table. Empty: no differential privacy (updates are sent as
/// trained). With `clip`, every peer clips and noises its updates; give either the
/// noise (`noise_multiplier`) or the target (`epsilon`), plus `delta` and the budget in
/// `rounds`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// L2 norm a round's update (its pseudo-gradient) is clipped to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f32>,
    /// Noise standard deviation per coordinate, in units of `clip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// Target epsilon after `rounds` rounds: the noise multiplier is the smallest that
    /// meets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// The delta of the guarantee.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// The budget: most rounds one peer sends updates in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u64>,
    /// What a peer does when its budget is spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_budget: Option<OnBudget>,
}

/// What a peer does when its privacy budget is spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBudget {
    /// It stops sending updates (it keeps following the swarm's model).
    #[default]
    Stop,
    /// It keeps training and says that its epsilon has passed the budget.
    Warn,
}

/// Differential privacy as a peer applies it: the spec resolved to numbers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Dp {
    /// Clipping norm.
    pub clip: f32,
    /// Noise multiplier (given, or solved from the target epsilon).
    pub noise_multiplier: f64,
    /// Delta.
    pub delta: f64,
    /// Rounds one peer may send.
    pub rounds: u64,
    /// Epsilon after `rounds` rounds.
    pub epsilon: f64,
    /// What happens when the budget is spent.
    pub on_budget: OnBudget,
}

impl PrivacySpec {
    /// Checks the table, naming the field (`privacy.clip`, ...) and the problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.resolve().map(|_| ())
    }

    /// Whether the task asks for differential privacy.
    pub fn is_on(&self) -> bool {
        *self != Self::default()
    }

    /// The numbers peers use, or `None` without differential privacy.
    pub fn resolve(&self) -> Result<Option<Dp>, (String, String)> {
        if !self.is_on() {
            return Ok(None);
        }
        let bad = |field: &str, why: String| Err((format!("privacy.{field}"), why));
        let Some(clip) = self.clip else {
            return bad(
                "clip",
                "missing: the L2 norm each update is clipped to".into(),
            );
        };
        if !(clip > 0.0 && clip <= 1e6) {
            return bad("clip", format!("{clip} outside (0, 1000000]"));
        }
        let Some(delta) = self.delta else {
            return bad("delta", "missing (e.g. 1e-5)".into());
        };
        if !(delta > 0.0 && delta <= 0.01) {
            return bad(
                "delta",
                format!("{delta} outside (0, 0.01]: a larger delta promises nothing"),
            );
        }
        let Some(rounds) = self.rounds else {
            return bad("rounds", "missing: the most rounds one peer sends".into());
        };
        if !(1..=1_000_000).contains(&rounds) {
            return bad("rounds", format!("{rounds} outside 1..=1000000"));
        }
        let z = match (self.noise_multiplier, self.epsilon) {
            (Some(_), Some(_)) => {
                return bad(
                    "epsilon",
                    "give noise_multiplier or epsilon, not both".into(),
                );
            }
            (None, None) => {
                return bad(
                    "noise_multiplier",
                    "missing: give noise_multiplier or a target epsilon".into(),
                );
            }
            (Some(z), None) => {
                if !(MIN_NOISE_MULTIPLIER..=10_000.0).contains(&z) {
                    return bad(
                        "noise_multiplier",
                        format!("{z} outside [{MIN_NOISE_MULTIPLIER}, 10000]"),
                    );
                }
                z
            }
            (None, Some(e)) => {
                if !(e > 0.0 && e <= 10_000.0) {
                    return bad("epsilon", format!("{e} outside (0, 10000]"));
                }
                match noise_for_epsilon(e, 1.0, rounds, delta) {
                    Some(z) => z,
                    None => {
                        return bad(
                            "epsilon",
                            format!(
                                "{e} cannot be met over {rounds} rounds with any noise \
                                 multiplier up to 10000"
                            ),
                        );
                    }
                }
            }
        };
        let eps = epsilon(z, 1.0, rounds, delta);
        if !eps.is_finite() {
            return bad(
                "noise_multiplier",
                format!("{z} over {rounds} rounds gives no finite epsilon"),
            );
        }
        Ok(Some(Dp {
            clip,
            noise_multiplier: z,
            delta,
            rounds,
            epsilon: eps,
            on_budget: self.on_budget.unwrap_or_default(),
        }))
    }
}

impl Dp {
    /// Epsilon after a peer sent `rounds` updates.
    pub fn epsilon_after(&self, rounds: u64) -> f64 {
        epsilon(self.noise_multiplier, 1.0, rounds, self.delta)
    }
}

/// The Rényi orders epsilon is minimised over (those of `dp-accounting`'s RDP accountant).
pub fn orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    v.extend((11..64).map(f64::from));
    v.extend([128.0, 256.0, 512.0, 1024.0]);
    v
}

/// Adds two numbers held as logarithms.
fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln(erfc(x))`, accurate (relative error of erfc below 1.2e-7) for every `x`, without
/// underflow for large `x`: the Chebyshev-fitted form `erfc(x) = t exp(-x^2 + P(t))`,
/// `t = 1 / (1 + x/2)`, whose logarithm is taken term by term.
fn ln_erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let coefficients = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let poly = coefficients.iter().rev().fold(0.0, |acc, c| acc * t + c);
    let ln_tail = t.ln() - z * z + poly;
    if x >= 0.0 {
        ln_tail
    } else {
        (2.0 - ln_tail.exp()).ln()
    }
}

/// `ln |binomial(alpha, i)|` for real `alpha` and whole `i`, as a running product.
fn ln_binomials(alpha: f64, count: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(count);
    let mut ln_c = 0.0;
    for i in 0..count {
        out.push(ln_c);
        let k = i as f64;
        ln_c += (alpha - k).abs().ln() - (k + 1.0).ln();
    }
    out
}

/// `ln A_alpha` of the sampled Gaussian mechanism for a whole order (`0 < q < 1`).
fn ln_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let ln_binom = ln_binomials(f64::from(alpha), alpha as usize + 1);
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let mut acc = f64::NEG_INFINITY;
    for (i, lb) in ln_binom.iter().enumerate() {
        let i = i as f64;
        let term =
            lb + i * ln_q + (f64::from(alpha) - i) * ln_1mq + (i * i - i) / (2.0 * sigma * sigma);
        acc = log_add(acc, term);
    }
    acc
}

/// Most terms summed for a fractional order before giving up.
const MAX_FRACTIONAL_TERMS: usize = 1000;

/// `ln A_alpha` for a fractional order (`0 < q < 1`): the two halves of the integral, split
/// where the two Gaussians' densities cross, each a series summed until its terms fall
/// 30 nats below the total while shrinking
/// (infinite, so that the order is left out, when they have not after
/// [`MAX_FRACTIONAL_TERMS`]).
fn ln_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let ln_binom = ln_binomials(alpha, MAX_FRACTIONAL_TERMS);
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let s2 = std::f64::consts::SQRT_2 * sigma;
    let ln_half = 0.5f64.ln();
    for (i, lb) in ln_binom.iter().enumerate() {
        let i = i as f64;
        let j = alpha - i;
        let s0 = lb
            + i * ln_q
            + j * ln_1mq
            + (i * i - i) / (2.0 * sigma * sigma)
            + ln_half
            + ln_erfc((i - z0) / s2);
        let s1 = lb
            + j * ln_q
            + i * ln_1mq
            + (j * j - j) / (2.0 * sigma * sigma)
            + ln_half
            + ln_erfc((z0 - j) / s2);
        a0 = log_add(a0, s0);
        a1 = log_add(a1, s1);
        let total = log_add(a0, a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        (last0, last1) = (s0, s1);
    }
    // Not converged: this order is left out (an infinite divergence never wins).
    f64::INFINITY
}

/// RDP of one sampled Gaussian mechanism at order `alpha`: each round includes the data
/// with probability `q`, and the noise's standard deviation is `z` times the sensitivity.
pub fn rdp(q: f64, z: f64, alpha: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if z <= 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * z * z);
    }
    let ln_a = if alpha.fract() == 0.0 && alpha <= f64::from(u32::MAX) {
        ln_a_int(q, z, alpha as u32)
    } else {
        ln_a_frac(q, z, alpha)
    };
    ln_a / (alpha - 1.0)
}

/// The smallest epsilon the RDP curve `(orders, rdp)` gives for `delta`.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> f64 {
    if delta <= 0.0 {
        return if rdp.iter().all(|r| *r == 0.0) {
            0.0
        } else {
            f64::INFINITY
        };
    }
    let mut best = f64::INFINITY;
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        best = best.min(eps);
    }
    best.max(0.0)
}

/// Epsilon after `rounds` sampled Gaussian mechanisms of rate `q` and noise multiplier
/// `z`, for `delta`.
pub fn epsilon(z: f64, q: f64, rounds: u64, delta: f64) -> f64 {
    if rounds == 0 {
        return 0.0;
    }
    let orders = orders();
    let curve: Vec<f64> = orders
        .iter()
        .map(|&a| rounds as f64 * rdp(q, z, a))
        .collect();
    epsilon_from_rdp(&orders, &curve, delta)
}

/// The smallest noise multiplier a task may use (below it the noise is no protection
/// worth stating, and epsilon runs to infinity in floating point). At 0.05 an update's
/// coordinate moves at most 20 noise deviations, far inside the reach of the noise
/// ([`NoiseSource::normal`], about 37): what the sampler cannot draw does not tell an
/// update's data apart (at 0.01, with noise bounded near 8.65 deviations, the outputs
/// with and without a sample could not overlap at all).
pub const MIN_NOISE_MULTIPLIER: f64 = 0.05;

/// The smallest noise multiplier (to 0.1%, at least [`MIN_NOISE_MULTIPLIER`]) whose
/// epsilon after `rounds` rounds at rate `q` is at most `target`; `None` when even a
/// multiplier of 10,000 is not enough.
pub fn noise_for_epsilon(target: f64, q: f64, rounds: u64, delta: f64) -> Option<f64> {
    let (mut lo, mut hi) = (MIN_NOISE_MULTIPLIER, 1e4);
    if epsilon(hi, q, rounds, delta) > target {
        return None;
    }
    if epsilon(lo, q, rounds, delta) <= target {
        return Some(lo);
    }
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        if epsilon(mid, q, rounds, delta) <= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// The rounds a peer may send before its epsilon would pass `budget`.
pub fn rounds_within(z: f64, q: f64, budget: f64, delta: f64) -> u64 {
    let (mut lo, mut hi) = (0u64, 1u64);
    while hi < 1 << 40 && epsilon(z, q, hi, delta) <= budget {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if epsilon(z, q, mid, delta) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// A peer's noise: a SHA-256 counter stream keyed by 32 secret random bytes the driver
/// draws from the platform's secure generator (never from a task seed), so neighbours
/// cannot predict and subtract it. Each draw uses fresh counter values.
pub struct NoiseSource {
    key: [u8; 32],
    counter: u64,
    buf: Vec<u64>,
}

impl NoiseSource {
    /// A source keyed by `key` (32 secret random bytes).
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            key,
            counter: 0,
            buf: Vec::new(),
        }
    }

    fn next_u64(&mut self) -> u64 {
        use sha2::{Digest, Sha256};
        if self.buf.is_empty() {
            let mut h = Sha256::new();
            h.update(b"shoal dp noise\0");
            h.update(self.key);
            h.update(self.counter.to_le_bytes());
            self.counter += 1;
            let block = h.finalize();
            self.buf = block
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
        }
        self.buf.pop().expect("refilled")
    }

    /// A standard normal sample (Box-Muller on 53-bit uniforms; see [`gaussian`]).
    pub fn normal(&mut self) -> f64 {
        gaussian(|| self.next_u64())
    }
}

/// A standard normal sample by Box-Muller from `next`'s 64-bit words. The radius's
/// uniform `u1` takes 53 bits a word, and each word whose 53 bits are all zero
/// (one in 2^53) scales the next 2^53 times down, to the end of `f64`'s range: the
/// sample reaches about 37.6 deviations instead of stopping at 8.65 (one word, `u1` at
/// least 2^-54). Bounded at 8.65, noise of a small multiplier `z` never reached what
/// an update moved by `1 / z` deviations reaches: at `z` 0.19, one round in 3,000 told
/// the two apart, 35 times the `delta` claimed.
fn gaussian(mut next: impl FnMut() -> u64) -> f64 {
    const WORD: f64 = (1u64 << 53) as f64;
    let mut scale = 1.0 / WORD;
    let u1 = loop {
        let k = next() >> 11;
        if k != 0 {
            break (k as f64 + 0.5) * scale;
        }
        scale /= WORD;
        if scale < f64::MIN_POSITIVE * WORD {
            break f64::MIN_POSITIVE;
        }
    };
    let u2 = (next() >> 11) as f64 / WORD;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Clips `update` to L2 norm `clip` and adds Gaussian noise of standard deviation
/// `z * clip` to every coordinate. Returns the norm before clipping.
pub fn clip_and_noise(update: &mut [f32], clip: f32, z: f32, noise: &mut NoiseSource) -> f32 {
    let norm = crate::learn::aggregate::clip_norm(update, clip);
    let sd = f64::from(z) * f64::from(clip);
    for x in update.iter_mut() {
        *x = (f64::from(*x) + sd * noise.normal()) as f32;
    }
    norm
}

/// A reproducible noise key for the simulator, from its seed and the peer's index.
pub fn simulated_noise_key(seed: u64, peer: usize) -> [u8; 32] {
    let mut rng = SplitMix64::new(seed ^ 0xD1FF_E7E7 ^ (peer as u64).wrapping_mul(0x9E37));
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The noise's tail reaches far past 8.65 deviations: bounded there, the outputs of
    /// an update with and without a sample could not overlap at a small multiplier.
    #[test]
    fn the_noise_reaches_past_where_one_word_of_bits_ends() {
        // Two words of zero bits, then the smallest non-zero one: u1 = 1.5 x 2^-159.
        let mut words = [0u64, 0, 1 << 11, 0].into_iter();
        let far = gaussian(|| words.next().unwrap_or(0));
        assert!(far > 14.0, "{far}");
        // All zeros to the end of the range: bounded, finite.
        let end = gaussian(|| 0);
        assert!(end.is_finite() && end > 37.0 && end < 38.0, "{end}");
        // The usual draw is as before: 53 bits, the radius's uniform at their middle.
        let mut words = [u64::MAX, 0].into_iter();
        let near = gaussian(|| words.next().unwrap_or(0));
        let u1 = (((1u64 << 53) - 1) as f64 + 0.5) / (1u64 << 53) as f64;
        assert_eq!(near, (-2.0 * u1.ln()).sqrt());
    }

    #[test]
    fn ln_erfc_matches_known_values_and_never_underflows() {
        // erfc(0) = 1, erfc(1) = 0.157299207050285, erfc(-1) = 1.842700792949715,
        // erfc(5) = 1.5374597944280349e-12; ln erfc(30) ~ -900 - ln(30 sqrt(pi)).
        for (x, want) in [
            (0.0, 1.0f64),
            (1.0, 0.157_299_207_050_285),
            (-1.0, 1.842_700_792_949_715),
            (5.0, 1.537_459_794_428_035e-12),
        ] {
            let got = ln_erfc(x).exp();
            assert!(
                (got / want - 1.0).abs() < 2e-7,
                "erfc({x}) = {got}, want {want}"
            );
        }
        let far = ln_erfc(30.0);
        let asymptote = -900.0 - (30.0 * std::f64::consts::PI.sqrt()).ln();
        assert!((far - asymptote).abs() < 1e-3, "{far} vs {asymptote}");
    }

    #[test]
    fn full_participation_is_the_gaussian_mechanism() {
        // With q = 1 every order's RDP is T alpha / (2 z^2); epsilon is then the minimum of
        // the conversion over the orders, which this recomputes by hand.
        let (z, t, delta) = (1.5, 50u64, 1e-5);
        let by_hand = orders()
            .into_iter()
            .filter(|a| *a > 1.01)
            .map(|a| {
                let r = t as f64 * a / (2.0 * z * z);
                r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            })
            .fold(f64::INFINITY, f64::min);
        let eps = epsilon(z, 1.0, t, delta);
        assert!((eps - by_hand).abs() < 1e-12, "{eps} vs {by_hand}");
        assert!(eps > 10.0 && eps < 40.0, "{eps}");
    }

    #[test]
    fn epsilon_grows_with_rounds_and_rate_and_shrinks_with_noise() {
        let e = |z, q, t| epsilon(z, q, t, 1e-5);
        assert!(e(1.0, 0.01, 100) < e(1.0, 0.01, 1000));
        assert!(e(1.0, 0.01, 100) < e(1.0, 0.1, 100));
        assert!(e(2.0, 0.01, 100) < e(1.0, 0.01, 100));
        assert_eq!(e(1.0, 0.01, 0), 0.0);
        assert_eq!(e(0.0, 0.01, 10), f64::INFINITY);
        // A small rate amplifies: far below the unsampled mechanism.
        assert!(e(1.0, 0.01, 100) < 0.2 * e(1.0, 1.0, 100));
    }

    #[test]
    fn solving_for_noise_meets_the_target_and_the_round_budget_is_tight() {
        let (target, delta) = (4.0, 1e-5);
        let z = noise_for_epsilon(target, 1.0, 200, delta).expect("reachable");
        assert!(epsilon(z, 1.0, 200, delta) <= target);
        assert!(
            epsilon(z * 0.99, 1.0, 200, delta) > target,
            "not the smallest: {z}"
        );
        let t = rounds_within(z, 1.0, target, delta);
        assert!(t >= 200 && epsilon(z, 1.0, t + 1, delta) > target, "{t}");
        assert_eq!(noise_for_epsilon(1e-9, 1.0, 1_000_000, delta), None);
    }

    #[test]
    fn clipping_bounds_the_norm_and_noise_has_the_stated_spread() {
        let mut noise = NoiseSource::new([9; 32]);
        let mut v = vec![3.0f32, 4.0];
        let before = clip_and_noise(&mut v, 1.0, 0.0, &mut noise);
        assert_eq!(before, 5.0);
        assert!(
            (v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6,
            "{v:?}"
        );
        let mut zeros = vec![0.0f32; 200_000];
        clip_and_noise(&mut zeros, 0.5, 2.0, &mut noise);
        let mean = zeros.iter().map(|x| f64::from(*x)).sum::<f64>() / zeros.len() as f64;
        let var = zeros
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / zeros.len() as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var.sqrt() - 1.0).abs() < 0.01, "sd {}", var.sqrt());
        // Two sources with different keys draw different noise; the same key repeats.
        let (mut a, mut b, mut c) = (
            NoiseSource::new([1; 32]),
            NoiseSource::new([2; 32]),
            NoiseSource::new([1; 32]),
        );
        let (x, y, w) = (a.normal(), b.normal(), c.normal());
        assert_ne!(x, y);
        assert_eq!(x, w);
    }
}

//! Robust aggregation of the pseudo-gradients a peer holds at the end of a round: its own
//! and its neighbours', each with a weight (1 for fresh ones, less for late ones).

use serde::{Deserialize, Serialize};

/// How a task combines updates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregation {
    /// Weighted mean: fast, and defenceless against a single liar.
    Mean,
    /// Per coordinate, drops the `trim` share of the lowest and of the highest values
    /// (at least one each when there are three or more updates) and takes the weighted
    /// mean of the rest.
    TrimmedMean {
        /// Share trimmed from each side, in `[0, 0.5)`.
        trim: f32,
    },
    /// Per-coordinate median.
    Median,
    /// Centered clipping (Karimireddy et al., 2021): start at the coordinate-wise median
    /// and move `iters` times by the weighted mean of the differences, each clipped to
    /// `tau` times the median distance of the updates to the centre.
    CenteredClip {
        /// Clipping radius as a multiple of the median distance, `> 0`.
        tau: f32,
        /// Iterations, 1 to 10.
        iters: u32,
    },
}

impl Aggregation {
    /// Checks the parameters, naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Self::Mean | Self::Median => Ok(()),
            Self::TrimmedMean { trim } if (0.0..0.5).contains(&trim) => Ok(()),
            Self::TrimmedMean { trim } => Err(format!("trim {trim} outside [0, 0.5)")),
            Self::CenteredClip { tau, iters } => {
                if !(tau > 0.0 && tau.is_finite()) {
                    Err(format!("tau {tau} must be positive"))
                } else if !(1..=10).contains(&iters) {
                    Err(format!("iters {iters} outside 1..=10"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The robust rules first drop every update farther than this many times the median
/// distance from the updates' coordinate-wise median (at least half are always kept).
/// Honest updates of a round lie at nearly equal distances from the median (in many
/// dimensions their noise concentrates); a lie pointing against the others, or much
/// larger, is farther. Per-coordinate rules alone let such lies shift every coordinate
/// a little, and the shifts add up over rounds. Measured on `attack-25` (150 rounds,
/// trimmed mean, clean 96.2%): without the screen, liars that keep honest models cost
/// 3.8 points; at 3, 2.5, 2 and 1.5 times 3.0, 1.7, 1.3 and 0.4 points. It has a price:
/// liars that apply their lies to themselves cost nothing without it and 0.8 points at
/// 1.5, and the clean run with trimmed mean ends 0.4 points lower (it drops the odd
/// honest straggler).
pub const SCREEN_RADIUS: f32 = 1.5;

/// Combines `updates` (vectors of equal length, each with a positive weight) into `out`
/// and returns the indices of the updates screened out (see [`SCREEN_RADIUS`]; only the
/// robust rules screen). With no updates, `out` is zeroed.
pub fn aggregate(rule: Aggregation, updates: &[(&[f32], f32)], out: &mut [f32]) -> Vec<usize> {
    let screened = screen(rule, updates, &vec![1.0; updates.len()], out);
    combine(rule, updates, &screened, out);
    screened
}

/// Updates the screen needs to judge any (with fewer, it drops none).
pub const SCREEN_MIN: usize = 3;

/// The indices of the updates farther than [`SCREEN_RADIUS`] times the median distance
/// from the coordinate-wise median, under the robust rules (`scratch` is overwritten).
///
/// `noise[i]` is how much noisier update `i` is expected to be than a typical one, and
/// its distance is divided by it (all 1 where every update stands for the same work).
/// With rounds in time and deltas exchanged, an update of `c` samples is scaled to the
/// round's median claim `rho` before it is judged; its sampling noise grows like `sqrt(rho / c)` while its
/// signal does not, so a slow, honest peer's scaled-up update lies farther from the
/// median and would be screened out every round for being slow (in `hetero-8`, the
/// slowest two of eight got no receipt in 15 rounds). The learner passes
/// `sqrt(rho / c)` with `c` the bounded claim (so at most 2, at least `1/sqrt(2)`);
/// exchanging weights nothing is scaled, and it passes 1.
pub fn screen(
    rule: Aggregation,
    updates: &[(&[f32], f32)],
    noise: &[f32],
    scratch: &mut [f32],
) -> Vec<usize> {
    let m = updates.len();
    if rule == Aggregation::Mean || m < SCREEN_MIN {
        return Vec::new();
    }
    debug_assert!(updates.iter().all(|(u, _)| u.len() == scratch.len()));
    debug_assert_eq!(noise.len(), m);
    per_coordinate(updates, scratch, median_of_sorted);
    let dist: Vec<f32> = updates
        .iter()
        .zip(noise)
        .map(|((u, _), &n)| distance(u, scratch) / n.max(f32::MIN_POSITIVE))
        .collect();
    let limit = SCREEN_RADIUS * super::lower_median(&dist);
    dist.iter()
        .enumerate()
        .filter(|&(_, &d)| d > limit)
        .map(|(i, _)| i)
        .collect()
}

/// Applies `rule` to `updates` but those at the indices in `dropped` (what the screen
/// and the peer's records dropped) into `out`; zero when none is left.
pub fn combine(rule: Aggregation, updates: &[(&[f32], f32)], dropped: &[usize], out: &mut [f32]) {
    let kept: Vec<(&[f32], f32)> = updates
        .iter()
        .enumerate()
        .filter(|(i, _)| !dropped.contains(i))
        .map(|(_, u)| *u)
        .collect();
    combine_all(rule, &kept, out);
}

fn combine_all(rule: Aggregation, updates: &[(&[f32], f32)], out: &mut [f32]) {
    out.fill(0.0);
    let m = updates.len();
    if m == 0 {
        return;
    }
    match rule {
        Aggregation::Mean => mean(updates, out),
        Aggregation::TrimmedMean { trim } => {
            let mut cut = (trim * m as f32).floor() as usize;
            if trim > 0.0 && m >= 3 {
                cut = cut.max(1);
            }
            let cut = cut.min((m - 1) / 2);
            per_coordinate(updates, out, |vals| {
                let kept = &vals[cut..m - cut];
                let w: f32 = kept.iter().map(|p| p.1).sum();
                kept.iter().map(|p| p.0 * p.1).sum::<f32>() / w
            });
        }
        Aggregation::Median => per_coordinate(updates, out, median_of_sorted),
        Aggregation::CenteredClip { tau, iters } => {
            per_coordinate(updates, out, median_of_sorted);
            let total: f32 = updates.iter().map(|p| p.1).sum();
            let mut step = vec![0.0; out.len()];
            for _ in 0..iters {
                let dist: Vec<f32> = updates.iter().map(|(u, _)| distance(u, out)).collect();
                let mut sorted = dist.clone();
                sorted.sort_unstable_by(f32::total_cmp);
                let radius = tau * sorted[m / 2];
                if radius <= 0.0 {
                    break;
                }
                step.fill(0.0);
                for ((u, w), d) in updates.iter().zip(&dist) {
                    let scale = w * (radius / d).min(1.0) / total;
                    for ((s, x), c) in step.iter_mut().zip(*u).zip(out.iter()) {
                        *s += scale * (x - c);
                    }
                }
                for (c, s) in out.iter_mut().zip(&step) {
                    *c += s;
                }
            }
        }
    }
}

fn mean(updates: &[(&[f32], f32)], out: &mut [f32]) {
    let total: f32 = updates.iter().map(|p| p.1).sum();
    for (u, w) in updates {
        let s = w / total;
        for (o, x) in out.iter_mut().zip(*u) {
            *o += s * x;
        }
    }
}

/// Coordinates that [`per_coordinate`] sorts together.
const BLOCK: usize = 64;

/// Applies `f` to each coordinate's (value, weight) pairs, sorted by value in
/// [`f32::total_cmp`]'s order.
///
/// The coordinates go through one sorting network for the number of updates, a block at
/// a time: each comparator is one branch-free loop over the block's coordinates, which
/// compiles to vector min, max and selects. Sorting each coordinate's few values on its
/// own mispredicted most of its comparisons: that sort was a fifth of the time of the
/// `attack-stealthy` simulation, and runs twice a round in every peer with a robust rule.
fn per_coordinate(updates: &[(&[f32], f32)], out: &mut [f32], f: impl Fn(&[(f32, f32)]) -> f32) {
    let m = updates.len();
    let network = sorting_network(m);
    let mut keys = vec![[0i32; BLOCK]; m];
    let mut weights = vec![[0f32; BLOCK]; m];
    let mut vals = vec![(0.0, 0.0); m];
    for (b, chunk) in out.chunks_mut(BLOCK).enumerate() {
        let at = b * BLOCK;
        for ((k, w), (u, uw)) in keys.iter_mut().zip(&mut weights).zip(updates) {
            for (k, x) in k.iter_mut().zip(&u[at..at + chunk.len()]) {
                *k = order_key(*x);
            }
            w.fill(*uw);
        }
        for &(i, j) in &network {
            compare_exchange(&mut keys, &mut weights, i, j);
        }
        for (l, o) in chunk.iter_mut().enumerate() {
            for (v, (k, w)) in vals.iter_mut().zip(keys.iter().zip(&weights)) {
                *v = (from_order_key(k[l]), w[l]);
            }
            *o = f(&vals);
        }
    }
}

/// An integer whose order is [`f32::total_cmp`]'s order of `x`.
fn order_key(x: f32) -> i32 {
    flip_negative(x.to_bits() as i32)
}

/// The float whose [`order_key`] is `k`.
fn from_order_key(k: i32) -> f32 {
    f32::from_bits(flip_negative(k) as u32)
}

/// Flips every bit but the sign of a negative `b`: its own inverse, since the sign stays.
fn flip_negative(b: i32) -> i32 {
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// Sorts row `i` and row `j > i` of every column: the smaller key (with its weight) ends
/// in row `i`; equal keys stay where they are.
fn compare_exchange(keys: &mut [[i32; BLOCK]], weights: &mut [[f32; BLOCK]], i: usize, j: usize) {
    let (low, high) = keys.split_at_mut(j);
    let (ka, kb) = (&mut low[i], &mut high[0]);
    let (low, high) = weights.split_at_mut(j);
    let (wa, wb) = (&mut low[i], &mut high[0]);
    // Arithmetic, not `if`: written with selects, the loop compiled to a branch per
    // coordinate.
    for l in 0..BLOCK {
        let (a, b) = (ka[l], kb[l]);
        ka[l] = a.min(b);
        kb[l] = a.max(b);
        let swap = -i32::from(b < a);
        let (x, y) = (wa[l].to_bits() as i32, wb[l].to_bits() as i32);
        let d = (x ^ y) & swap;
        wa[l] = f32::from_bits((x ^ d) as u32);
        wb[l] = f32::from_bits((y ^ d) as u32);
    }
}

/// The comparators `(i, j)`, `i < j`, of Batcher's odd-even merge sort for `n` rows, in
/// order. Built for the next power of two with the rows past `n` taken as larger than
/// any: a comparator that reaches one of them never exchanges, so it is left out.
fn sorting_network(n: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // Merges runs of length `p` into runs of `2p`; `k` is the distance compared.
    let mut p = 1;
    while p < n {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < n {
                for i in 0..k.min(n - j - k) {
                    // Only rows of the same run of 2p are compared.
                    if (i + j) / (2 * p) == (i + j + k) / (2 * p) {
                        out.push((i + j, i + j + k));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    out
}

fn median_of_sorted(vals: &[(f32, f32)]) -> f32 {
    let m = vals.len();
    if m % 2 == 1 {
        vals[m / 2].0
    } else {
        0.5 * (vals[m / 2 - 1].0 + vals[m / 2].0)
    }
}

/// Euclidean distance.
pub(crate) fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt() as f32
}

/// Euclidean norm.
pub fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt() as f32
}

/// Scales `v` down to Euclidean norm `cap` when it is longer (a hair under, so that
/// rounding never leaves it above `cap`; a negative or NaN cap zeroes it). Returns the
/// norm before.
pub fn clip_norm(v: &mut [f32], cap: f32) -> f32 {
    let n = norm(v);
    if n > cap || n.is_nan() || cap.is_nan() {
        let f = if n > 0.0 && cap > 0.0 {
            cap / n * (1.0 - 1e-6)
        } else {
            0.0
        };
        v.iter_mut().for_each(|x| *x *= f);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_the_direction() {
        let mut v = vec![3.0, 4.0];
        assert_eq!(clip_norm(&mut v, 1.0), 5.0);
        assert!(norm(&v) <= 1.0 && norm(&v) > 0.999, "{v:?}");
        assert!((v[0] / v[1] - 0.75).abs() < 1e-6);
        let mut short = vec![0.3, 0.4];
        clip_norm(&mut short, 1.0);
        assert_eq!(short, [0.3, 0.4]);
        let mut any = vec![1.0, 1.0];
        clip_norm(&mut any, 0.0);
        assert_eq!(any, [0.0, 0.0]);
    }

    fn run(rule: Aggregation, ups: &[Vec<f32>]) -> Vec<f32> {
        let pairs: Vec<(&[f32], f32)> = ups.iter().map(|u| (&u[..], 1.0)).collect();
        let mut out = vec![0.0; ups[0].len()];
        aggregate(rule, &pairs, &mut out);
        out
    }

    /// Six honest updates near (1, -1) and two liars far away.
    fn poisoned() -> Vec<Vec<f32>> {
        let mut ups: Vec<Vec<f32>> = (0..6)
            .map(|i| vec![1.0 + 0.01 * i as f32, -1.0 - 0.01 * i as f32])
            .collect();
        ups.push(vec![-50.0, 50.0]);
        ups.push(vec![-40.0, 60.0]);
        ups
    }

    #[test]
    fn mean_is_weighted_and_follows_liars() {
        let a = [1.0, 2.0];
        let b = [3.0, 6.0];
        let mut out = [0.0; 2];
        aggregate(Aggregation::Mean, &[(&a, 1.0), (&b, 0.5)], &mut out);
        assert!((out[0] - 5.0 / 3.0).abs() < 1e-6 && (out[1] - 10.0 / 3.0).abs() < 1e-6);
        let m = run(Aggregation::Mean, &poisoned());
        assert!(m[0] < -5.0, "the mean is dragged away: {m:?}");
    }

    #[test]
    fn robust_rules_ignore_a_quarter_of_liars() {
        for rule in [
            Aggregation::TrimmedMean { trim: 0.25 },
            Aggregation::Median,
            Aggregation::CenteredClip { tau: 1.0, iters: 3 },
        ] {
            let out = run(rule, &poisoned());
            assert!(
                (out[0] - 1.03).abs() < 0.3 && (out[1] + 1.03).abs() < 0.3,
                "{rule:?}: {out:?}"
            );
        }
    }

    /// Honest updates: one direction plus as much noise again, in many dimensions (as a
    /// round's pseudo-gradients are); `liars` of them negated at 2.5 times their size.
    fn noisy_round(honest: usize, liars: usize) -> Vec<Vec<f32>> {
        let mut rng = crate::rng::SplitMix64::new(7);
        let dim = 2000;
        let signal: Vec<f32> = (0..dim).map(|_| rng.normal_f32()).collect();
        (0..honest + liars)
            .map(|i| {
                let u: Vec<f32> = signal.iter().map(|s| s + rng.normal_f32()).collect();
                if i < honest {
                    u
                } else {
                    u.iter().map(|x| -2.5 * x).collect()
                }
            })
            .collect()
    }

    #[test]
    fn the_screen_drops_lies_and_keeps_every_honest_update() {
        for (honest, liars) in [(8, 0), (6, 2), (5, 3), (3, 0)] {
            let ups = noisy_round(honest, liars);
            let refs: Vec<(&[f32], f32)> = ups.iter().map(|u| (&u[..], 1.0)).collect();
            let mut out = vec![0.0; ups[0].len()];
            let screened = aggregate(Aggregation::TrimmedMean { trim: 0.25 }, &refs, &mut out);
            assert_eq!(
                screened,
                (honest..honest + liars).collect::<Vec<_>>(),
                "{honest} honest, {liars} liars"
            );
            // What is left is the honest updates' trimmed mean: close to their mean.
            let mut honest_mean = vec![0.0; out.len()];
            aggregate(Aggregation::Mean, &refs[..honest], &mut honest_mean);
            let off = distance(&out, &honest_mean) / norm(&honest_mean);
            assert!(off < 0.35, "{honest} honest, {liars} liars: {off}");
        }
        // The plain mean never screens.
        let ups = noisy_round(6, 2);
        let refs: Vec<(&[f32], f32)> = ups.iter().map(|u| (&u[..], 1.0)).collect();
        let mut out = vec![0.0; ups[0].len()];
        assert!(aggregate(Aggregation::Mean, &refs, &mut out).is_empty());
    }

    /// Rounds in time: a slow, honest peer's update (a quarter of the samples, scaled up
    /// to a median run) carries twice the noise; with its noise stated it is kept, while
    /// a lie is still dropped, even one that claims few samples to be judged leniently.
    #[test]
    fn the_screen_keeps_a_slow_peers_noisier_update_when_told_its_noise() {
        let mut rng = crate::rng::SplitMix64::new(11);
        let dim = 2000;
        let signal: Vec<f32> = (0..dim).map(|_| rng.normal_f32()).collect();
        // Six median runs, one run of a quarter of the samples (noise x2 once scaled up),
        // one liar pointing against the swarm while claiming a quarter too.
        let mut ups: Vec<Vec<f32>> = (0..7)
            .map(|i| {
                let spread = if i == 6 { 2.0 } else { 1.0 };
                signal
                    .iter()
                    .map(|s| s + spread * rng.normal_f32())
                    .collect()
            })
            .collect();
        ups.push(signal.iter().map(|s| -2.5 * s).collect());
        let noise = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0];
        let weights = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25, 0.25];
        let refs: Vec<(&[f32], f32)> = ups.iter().zip(weights).map(|(u, w)| (&u[..], w)).collect();
        let rule = Aggregation::TrimmedMean { trim: 0.2 };
        let mut scratch = vec![0.0; dim];
        assert_eq!(screen(rule, &refs, &noise, &mut scratch), vec![7]);
        // Judged as if every update stood for the same work, the slow peer is dropped too.
        assert_eq!(screen(rule, &refs, &[1.0; 8], &mut scratch), vec![6, 7]);
    }

    #[test]
    fn trimmed_mean_and_median_agree_with_hand_computation() {
        let ups = vec![vec![1.0], vec![2.0], vec![3.0], vec![4.0], vec![5.0]];
        assert_eq!(run(Aggregation::TrimmedMean { trim: 0.2 }, &ups), vec![3.0]);
        assert_eq!(run(Aggregation::Median, &ups), vec![3.0]);
        assert_eq!(run(Aggregation::Median, &ups[..4]), vec![2.5]);
        // 100 is 97 from the median 3 (the median distance is 1): screened out, as is 1
        // (2 away); the trimmed mean of 2, 3, 4 is 3. The plain mean screens nothing.
        let mut far = ups.clone();
        far[4] = vec![100.0];
        assert_eq!(run(Aggregation::TrimmedMean { trim: 0.2 }, &far), vec![3.0]);
        assert_eq!(run(Aggregation::Mean, &far), vec![22.0]);
        // Too few updates to trim leaves the mean.
        assert_eq!(
            run(Aggregation::TrimmedMean { trim: 0.25 }, &ups[..2]),
            vec![1.5]
        );
    }

    /// The network sorts every sequence of zeros and ones for up to 16 rows, so any
    /// sequence (the zero-one principle); and a few sizes past that on random keys.
    #[test]
    fn the_sorting_network_sorts_any_input() {
        for n in 0..=16usize {
            let net = sorting_network(n);
            assert!(net.iter().all(|&(i, j)| i < j && j < n), "{n}: {net:?}");
            for bits in 0u32..1 << n {
                let mut v: Vec<u32> = (0..n).map(|i| bits >> i & 1).collect();
                for &(i, j) in &net {
                    if v[j] < v[i] {
                        v.swap(i, j);
                    }
                }
                assert!(
                    v.windows(2).all(|w| w[0] <= w[1]),
                    "{n} rows, input {bits:b}"
                );
            }
        }
        // Past 16 rows: random zeros and ones of every density, and random keys.
        let mut rng = crate::rng::SplitMix64::new(3);
        for n in 17..=128usize {
            let net = sorting_network(n);
            for trial in 0..200u64 {
                let mut v: Vec<u64> = if trial % 2 == 0 {
                    let ones = rng.next_u64() % (n as u64 + 1);
                    (0..n)
                        .map(|_| u64::from(rng.next_u64() % (n as u64) < ones))
                        .collect()
                } else {
                    (0..n).map(|_| rng.next_u64() % 20).collect()
                };
                for &(i, j) in &net {
                    if v[j] < v[i] {
                        v.swap(i, j);
                    }
                }
                assert!(v.windows(2).all(|w| w[0] <= w[1]), "{n} rows: {v:?}");
            }
        }
    }

    /// Each coordinate gets its values and weights sorted as a sort of that coordinate
    /// alone gives them: ties, signed zeros, infinities and lengths that do not fill the
    /// last block included.
    #[test]
    fn per_coordinate_sorts_each_coordinate_as_a_plain_sort_does() {
        let mut rng = crate::rng::SplitMix64::new(5);
        let pick = [
            0.0,
            -0.0,
            1.5,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
            f32::MIN_POSITIVE,
            f32::NAN,
            -f32::NAN,
            -2.0,
        ];
        for (m, len) in [
            (1, 3),
            (2, 64),
            (3, 65),
            (7, 200),
            (8, 129),
            (13, 64),
            (40, 70),
            (64, 70),
            (100, 65),
        ] {
            let ups: Vec<Vec<f32>> = (0..m)
                .map(|_| {
                    (0..len)
                        .map(|_| match rng.next_u64() % 3 {
                            0 => pick[rng.next_u64() as usize % pick.len()],
                            _ => rng.normal_f32(),
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<(&[f32], f32)> = ups
                .iter()
                .enumerate()
                .map(|(i, u)| (&u[..], 1.0 + i as f32))
                .collect();
            let seen = std::cell::RefCell::new(Vec::new());
            let mut out = vec![0.0; len];
            per_coordinate(&refs, &mut out, |vals| {
                seen.borrow_mut().push(vals.to_vec());
                vals.len() as f32
            });
            assert_eq!(out, vec![m as f32; len]);
            for (c, got) in seen.into_inner().iter().enumerate() {
                let mut want: Vec<(f32, f32)> = refs.iter().map(|(u, w)| (u[c], *w)).collect();
                want.sort_by(|a, b| a.0.total_cmp(&b.0));
                let bits =
                    |v: &[(f32, f32)]| -> Vec<u32> { v.iter().map(|p| p.0.to_bits()).collect() };
                assert_eq!(bits(got), bits(&want), "{m} updates, coordinate {c}");
                // Equal values may carry their weights in either order.
                for i in 0..m {
                    let same: Vec<usize> = (0..m)
                        .filter(|&k| want[k].0.to_bits() == want[i].0.to_bits())
                        .collect();
                    let mut a: Vec<u32> = same.iter().map(|&k| got[k].1.to_bits()).collect();
                    let mut b: Vec<u32> = same.iter().map(|&k| want[k].1.to_bits()).collect();
                    a.sort_unstable();
                    b.sort_unstable();
                    assert_eq!(a, b, "{m} updates, coordinate {c}");
                }
            }
        }
    }

    #[test]
    fn no_updates_aggregate_to_zero_and_settings_are_checked() {
        let mut out = [7.0; 3];
        aggregate(Aggregation::Median, &[], &mut out);
        assert_eq!(out, [0.0; 3]);
        assert!(Aggregation::TrimmedMean { trim: 0.5 }.validate().is_err());
        assert!(
            Aggregation::CenteredClip { tau: 0.0, iters: 3 }
                .validate()
                .is_err()
        );
        assert!(
            Aggregation::CenteredClip { tau: 1.0, iters: 0 }
                .validate()
                .is_err()
        );
        assert!(Aggregation::Median.validate().is_ok());
    }
}

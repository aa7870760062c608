//! Decentralized training, DiLoCo-style, with no peer in charge.
//!
//! Each round a peer runs `local_steps` steps of its inner optimizer from the round-start
//! weights, forms the pseudo-gradient (start weights minus local weights), compresses and
//! signs it, and sends it to its neighbours. When it has heard from every neighbour for
//! this round, or its deadline passes, it aggregates what it holds (robustly) and applies
//! an outer Nesterov-momentum step. The round number is the model version.
//!
//! Asynchrony, by rule:
//! - No barrier: a peer closes its round on its own deadline and never waits for a
//!   neighbour that left.
//! - A late update (sender's round `r` below the receiver's round `R`) counts with weight
//!   `1 / (1 + R - r)` while `R - r <= max_staleness`, and is dropped (counted `stale`)
//!   beyond that. An update from a peer that is ahead counts with weight 1.
//! - Each signer contributes at most one update per round, and never one older than or
//!   equal to a round already accepted from it (`replay`).
//! - A peer that receives an update more than `max_staleness` rounds ahead of its own
//!   round is lagging: it downloads the sender's model ([`Learner::adopt`]).
//! - With `exchange = "weights"` an update carries the sender's local weights, and counts
//!   only in the round it was sent for: a later round's waits in the inbox (at most one
//!   per signer besides the current round's), an earlier round's is dropped as stale.
//! - Gossip averaging keeps peers' models together where they do not all see the same
//!   updates (a partial mesh, a late neighbour): every `sync_every` rounds a peer sends
//!   its round-start weights (int8, or fp32 for an fp32 task) to one neighbour, which
//!   averages them half and half with its own before its next outer step, if they are
//!   within `max_staleness` rounds and closer than a quarter of its own weights' norm.
//! - Before aggregation every update must have the model's shape, finite values, and a
//!   norm at most `max_norm_ratio` times the larger of the receiver's own update's norm
//!   and the lower median of the held updates' norms (so that a peer whose own update
//!   is small, as under label skew, does not refuse its neighbours' honest ones).

pub mod aggregate;
pub(crate) mod bytes;
pub mod compress;
pub mod identity;
pub mod peer;
pub mod sim;
pub mod wire;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::trust::receipt::{FLAG_CLAIM_BOUNDED, FLAG_ROBUST, Receipt};

pub use aggregate::Aggregation;
pub use compress::{CodecError, Compression, Compressor};
pub use identity::{Identity, PublicKey};
pub use peer::{Event, Output, Peer, PeerRole, Progress};
pub use wire::{Observed, PeerMessage, Snapshot, Update, WireError, weights_hash};

/// The swarm-learning settings of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnConfig {
    /// Inner steps per round (H).
    pub local_steps: u32,
    /// Outer learning rate.
    pub outer_lr: f32,
    /// Outer Nesterov momentum, in `[0, 1)`.
    pub outer_momentum: f32,
    /// WebRTC neighbours per peer: the signaling server's k for this task (unless its
    /// `--neighbours` sets every task's).
    pub neighbours: usize,
    /// How updates are combined.
    pub aggregation: Aggregation,
    /// How updates are compressed.
    pub compression: Compression,
    /// Rounds an update may be late and still count.
    pub max_staleness: u32,
    /// Largest accepted update norm, relative to the receiver's own.
    pub max_norm_ratio: f32,
    /// Longest a peer waits for its neighbours after sending its update, in milliseconds.
    pub round_deadline_ms: u32,
    /// Rounds between gossip-averaging messages (0: never).
    #[serde(default = "default_sync_every")]
    pub sync_every: u32,
    /// What an update carries: the pseudo-gradient, or the weights local training ended
    /// with (for partial meshes, see [`Exchange`]).
    #[serde(default)]
    pub exchange: Exchange,
    /// Rounds sized in time (0: in steps). With a duration, a peer trains without pause
    /// in chunks of about [`peer::CHUNK_MS`], sends its update once this many
    /// milliseconds (wall-clock) have passed since the previous one (and its previous
    /// round has closed), keeps training while its round is open, and carries that work
    /// into the next round; aggregation weights updates by their (bounded) sample counts.
    /// See `docs/protocol.md`, "Rounds in time".
    #[serde(default)]
    pub round_ms: u32,
    /// The most a peer's updates may send in an hour, in megabytes (10^6 bytes; 0: no
    /// bound; needs `round_ms`). A peer sends its next update no earlier than its updates
    /// so far allow at this rate (every copy counts: one per neighbour it goes to), and
    /// trains on meanwhile: its rounds last longer instead. See `docs/protocol.md`,
    /// "Upload budget".
    #[serde(default)]
    pub upload_mb_per_hour: u32,
}

/// What peers put in their updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exchange {
    /// The pseudo-gradient (round-start weights minus local weights), with the codec's
    /// error feedback. Right where every peer hears every other (a full mesh): all apply
    /// the same aggregate and stay one model.
    #[default]
    Delta,
    /// The local weights themselves (with the codec's error feedback, so that what
    /// neighbours decode tracks the weights over rounds). A receiver turns each into
    /// `own round-start weights - theirs`, which is the sender's pseudo-gradient plus the
    /// distance between the two models, so the outer step also pulls neighbours' models
    /// together. Needed in a partial mesh, where neighbourhoods differ and models drift
    /// apart without it. With a top-k codec (`top_k`, `top_k_2bit`) an update carries
    /// the top-k change of the sender's **public copy** — the weights its neighbours hold
    /// of it — toward its local weights, and every 30th round (a round number that is a
    /// multiple of [`KEYFRAME_EVERY`], and the first update after a start or a download)
    /// the whole weights in int8, which set the copy: see `docs/protocol.md`, "Weights
    /// changes".
    Weights,
}

fn default_sync_every() -> u32 {
    5
}

impl Default for LearnConfig {
    /// The settings the simulator validated on the demo digits (`scenarios/iid-8.toml`),
    /// with int8 updates, trimmed-mean aggregation and weights exchanged: a public swarm
    /// outgrows `neighbours` as soon as an eighth visitor arrives, and only exchanging
    /// weights keeps a partial mesh one model (`scenarios/mesh-50.toml`). In a full mesh
    /// it costs little: `iid-8` with int8 and trimmed mean reaches 95% after 57,440
    /// samples (pseudo-gradients: 53,600) and ends at 95.7% (95.2%).
    fn default() -> Self {
        Self {
            local_steps: 20,
            outer_lr: 0.8,
            outer_momentum: 0.9,
            neighbours: 6,
            aggregation: Aggregation::TrimmedMean { trim: 0.2 },
            compression: Compression::Int8 { block: 256 },
            max_staleness: 2,
            max_norm_ratio: 3.0,
            round_deadline_ms: 5_000,
            sync_every: default_sync_every(),
            exchange: Exchange::Weights,
            round_ms: 0,
            upload_mb_per_hour: 0,
        }
    }
}

impl LearnConfig {
    /// Checks every field, naming the field and the problem.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, field: &str, why: String| {
            if ok {
                Ok(())
            } else {
                Err(format!("{field}: {why}"))
            }
        };
        check(
            (1..=100_000).contains(&self.local_steps),
            "local_steps",
            format!("{} outside 1..=100000", self.local_steps),
        )?;
        check(
            self.outer_lr > 0.0 && self.outer_lr <= 10.0,
            "outer_lr",
            format!("{} outside (0, 10]", self.outer_lr),
        )?;
        check(
            (0.0..1.0).contains(&self.outer_momentum),
            "outer_momentum",
            format!("{} outside [0, 1)", self.outer_momentum),
        )?;
        check(
            self.neighbours <= 64,
            "neighbours",
            format!("{} above 64", self.neighbours),
        )?;
        self.aggregation
            .validate()
            .map_err(|e| format!("aggregation: {e}"))?;
        self.compression
            .validate()
            .map_err(|e| format!("compression: {e}"))?;
        check(
            self.max_staleness <= 100,
            "max_staleness",
            format!("{} above 100", self.max_staleness),
        )?;
        check(
            self.max_norm_ratio >= 1.0 && self.max_norm_ratio.is_finite(),
            "max_norm_ratio",
            format!("{} below 1", self.max_norm_ratio),
        )?;
        check(
            (100..=3_600_000).contains(&self.round_deadline_ms),
            "round_deadline_ms",
            format!("{} outside 100..=3600000", self.round_deadline_ms),
        )?;
        check(
            self.round_ms == 0 || (100..=3_600_000).contains(&self.round_ms),
            "round_ms",
            format!("{} is neither 0 nor within 100..=3600000", self.round_ms),
        )?;
        check(
            self.upload_mb_per_hour <= 1_000_000,
            "upload_mb_per_hour",
            format!("{} above 1000000", self.upload_mb_per_hour),
        )?;
        check(
            self.upload_mb_per_hour == 0 || self.timed(),
            "upload_mb_per_hour",
            "needs rounds sized in time (round_ms > 0)".into(),
        )
    }

    /// Whether updates carry changes of public copies: weights exchanged with a top-k
    /// codec (see [`Exchange::Weights`]).
    pub fn weights_changes(&self) -> bool {
        self.exchange == Exchange::Weights
            && matches!(
                self.compression,
                Compression::TopK { .. } | Compression::TopK2Bit { .. }
            )
    }

    /// The upload budget in bytes per millisecond (`None`: no bound).
    pub fn upload_bytes_per_ms(&self) -> Option<f64> {
        (self.upload_mb_per_hour > 0).then(|| f64::from(self.upload_mb_per_hour) * 1e6 / 3.6e6)
    }

    /// Whether rounds are sized in time (`round_ms` > 0).
    pub fn timed(&self) -> bool {
        self.round_ms > 0
    }
}

/// Why an incoming message was not used. Each is counted in [`LearnStats::rejected`].
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// Undecodable: bad framing, kind, lengths or checksum.
    #[error("malformed")]
    Malformed,
    /// The signature does not verify for this task.
    #[error("bad_signature")]
    BadSignature,
    /// A round already accepted from this signer (or an older one).
    #[error("replay")]
    Replay,
    /// More than `max_staleness` rounds behind.
    #[error("stale")]
    Stale,
    /// A payload for another model size, or malformed.
    #[error("shape")]
    Shape,
    /// NaN or infinite values.
    #[error("non_finite")]
    NonFinite,
    /// A norm above the bound.
    #[error("norm")]
    Norm,
    /// Our own update, echoed back.
    #[error("own")]
    Own,
    /// A model nobody asked this neighbour for.
    #[error("unasked")]
    Unasked,
    /// An update signed by another key than the one this connection announced first.
    #[error("key_changed")]
    KeyChanged,
    /// A round number no swarm can have reached (at or above [`wire::MAX_ROUND`]).
    #[error("implausible_round")]
    ImplausibleRound,
    /// A model answer whose round is far from the other answers' median.
    #[error("round_outlier")]
    RoundOutlier,
    /// Too few usable model answers to choose one.
    #[error("no_quorum")]
    NoQuorum,
    /// A model request sooner than the neighbour may ask again.
    #[error("request_rate")]
    RequestRate,
    /// A second gossip mix from the same sender in one round.
    #[error("mix_repeat")]
    MixRepeat,
    /// An update far from the coordinate-wise median of the round's updates (see
    /// [`aggregate::SCREEN_RADIUS`]).
    #[error("outlier")]
    Outlier,
    /// A gossip mix for a round that is not a multiple of `sync_every`.
    #[error("off_schedule")]
    OffSchedule,
    /// A gossip mix beyond the [`MAX_MIXES`] a peer holds at once.
    #[error("mix_overflow")]
    MixOverflow,
    /// Anything from a connection that broke the protocol in a way no honest peer does
    /// (see [`peer`]): it is ignored for the rest of the connection. Also anything a
    /// driver delivers from a connection not up (after its end or before its start).
    #[error("shunned")]
    Shunned,
    /// An update that claims to have trained on no sample (every run has at least one
    /// step).
    #[error("samples")]
    Samples,
    /// Observed weights, or a neighbour's weights update (see [`Exchange::Weights`] with
    /// top-k), sent as a change from weights we do not hold from that sender.
    #[error("base")]
    Base,
    /// An update beyond the one each neighbour counts for in a round (see
    /// `one_vote_each`).
    #[error("extra_vote")]
    ExtraVote,
}

impl From<&WireError> for Rejection {
    /// The reason a message that does not decode is counted under.
    fn from(e: &WireError) -> Self {
        match e {
            WireError::NonFinite => Self::NonFinite,
            WireError::WrongSize { .. } => Self::Shape,
            WireError::Round(_) => Self::ImplausibleRound,
            _ => Self::Malformed,
        }
    }
}

impl Rejection {
    /// Every reason.
    pub const ALL: [Self; 22] = [
        Self::Malformed,
        Self::BadSignature,
        Self::Replay,
        Self::Stale,
        Self::Shape,
        Self::NonFinite,
        Self::Norm,
        Self::Own,
        Self::Unasked,
        Self::KeyChanged,
        Self::ImplausibleRound,
        Self::RoundOutlier,
        Self::NoQuorum,
        Self::RequestRate,
        Self::MixRepeat,
        Self::Outlier,
        Self::OffSchedule,
        Self::MixOverflow,
        Self::Shunned,
        Self::Samples,
        Self::Base,
        Self::ExtraVote,
    ];

    /// The reason named `name` ([`Rejection::as_str`]), if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The reason's name in metrics and on the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Replay => "replay",
            Self::Stale => "stale",
            Self::Shape => "shape",
            Self::NonFinite => "non_finite",
            Self::Norm => "norm",
            Self::Own => "own",
            Self::Unasked => "unasked",
            Self::KeyChanged => "key_changed",
            Self::ImplausibleRound => "implausible_round",
            Self::RoundOutlier => "round_outlier",
            Self::NoQuorum => "no_quorum",
            Self::RequestRate => "request_rate",
            Self::MixRepeat => "mix_repeat",
            Self::Outlier => "outlier",
            Self::OffSchedule => "off_schedule",
            Self::MixOverflow => "mix_overflow",
            Self::Shunned => "shunned",
            Self::Samples => "samples",
            Self::Base => "base",
            Self::ExtraVote => "extra_vote",
        }
    }
}

/// What an accepted message asks of the caller.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    /// An update for `round`, held for aggregation. When `round` is more than
    /// `max_staleness` ahead of ours, the caller should download the sender's model.
    Update {
        /// The signer.
        key: PublicKey,
        /// The sender's round.
        round: u64,
        /// Whether we are so far behind that we should resynchronize.
        lagging: bool,
    },
    /// The sender wants our model: reply with [`Learner::snapshot`].
    ModelRequest,
    /// A model: a joining or lagging peer passes it to [`Learner::adopt`].
    Model(Snapshot),
    /// A neighbour's weights, held for averaging at the end of this round.
    Mix,
    /// An observer wants our weights, as a change from the ones it holds from us (their
    /// [`weights_hash`]; `None`: it holds none): reply with [`Learner::observed`].
    Observe {
        /// The hash of the weights it holds from us.
        base: Option<[u8; 32]>,
    },
    /// Weights an observer asked for: it passes them to [`Learner::take_observed`] with
    /// the weights it holds from the sender.
    Observed(Observed),
    /// Whether the sender will send updates (observers and paused peers will not).
    Status {
        /// It contributes.
        contributing: bool,
    },
    /// A valid receipt for one of our updates (counted in [`LearnStats::receipts`]),
    /// signed by `signer`.
    Receipt {
        /// The key of the neighbour that used our update.
        signer: PublicKey,
        /// The round of our update it names.
        round: u64,
    },
    /// A ledger head (kept by [`Learner::witness`] when it is new to this peer): the
    /// sender holds the head `id` (`None` for another server's).
    Head {
        /// What the head says.
        id: Option<crate::trust::head::HeadId>,
    },
}

/// Counters a peer keeps about its swarm traffic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LearnStats {
    /// Updates accepted and used.
    pub used: u64,
    /// Rejected messages by reason.
    pub rejected: BTreeMap<Rejection, u64>,
    /// Rounds completed by this peer.
    pub rounds: u64,
    /// Valid receipts neighbours signed for our updates.
    pub receipts: u64,
}

impl LearnStats {
    fn reject(&mut self, why: Rejection) -> Rejection {
        *self.rejected.entry(why).or_default() += 1;
        why
    }
}

/// Why a local operation failed.
#[derive(Debug, Error, PartialEq)]
pub enum LearnError {
    /// The settings are invalid.
    #[error("invalid learning settings: {0}")]
    Config(String),
    /// Local weights of the wrong length or not finite: the round is abandoned and the
    /// model is left as it was.
    #[error("local weights rejected: {0}")]
    BadLocal(String),
    /// The task's privacy budget is spent (`on_budget = "stop"`): no more updates leave.
    #[error("privacy budget spent: {0} rounds sent")]
    BudgetSpent(u64),
}

/// Differential privacy applied to our own updates (see [`crate::privacy`]).
struct DpState {
    dp: crate::privacy::Dp,
    noise: crate::privacy::NoiseSource,
    /// Updates sent under it, this visit and earlier ones.
    sent: u64,
}

/// Where a peer stands with its privacy budget.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PrivacyProgress {
    /// Epsilon spent so far (for `delta`).
    pub epsilon: f64,
    /// The guarantee's delta.
    pub delta: f64,
    /// Updates sent under differential privacy.
    pub rounds: u64,
    /// The budget in rounds.
    pub budget_rounds: u64,
    /// Epsilon once the budget is spent.
    pub budget_epsilon: f64,
    /// Clipping norm and noise multiplier.
    pub clip: f32,
    /// Noise standard deviation per coordinate, in units of `clip`.
    pub noise_multiplier: f64,
    /// The budget is spent.
    pub spent: bool,
    /// And no more updates leave (`on_budget = "stop"`).
    pub stopped: bool,
}

/// Gossip mixes held at once.
const MAX_MIXES: usize = 16;
/// Gossip mixes held at once from one connection (an honest one sends one per
/// `sync_every` rounds; a peer a little ahead may have sent the next one too).
const MIXES_PER_SENDER: usize = 2;

/// With `exchange = "weights"` and a top-k codec, updates for rounds that are multiples
/// of this carry whole weights (int8): a keyframe, which sets the sender's public copy
/// for every neighbour (one that joined or missed a change since uses the sender's
/// updates again from there).
pub const KEYFRAME_EVERY: u64 = 30;

/// The codec of whole weights in updates with weights changes (keyframes, and the whole
/// copies a neighbour that lacks our copy gets instead of a change) and of the weights
/// and momentum in a model answer (data channel kind 10).
pub const KEYFRAME_CODEC: Compression = Compression::Int8 { block: 256 };

/// With weights changes, an update is a keyframe too when our public copy lags our
/// local weights by more than this many times the run itself (`|local - copy| >
/// CATCH_UP * |local - round-start|`). After a large move of the model (a peer that
/// joined three native peers' swarm caught up with it, its model moving about five runs'
/// length in a round) a top-k change carries only part of the gap each round; for the 16
/// rounds its copy took to follow, both neighbours saw it 2-3 times farther off than each
/// other and screened it out, every round. In `hetero-8` the ratio's median is 1.9, its
/// 99th percentile 4.0 (at 3, a tenth of the updates became keyframes for nothing).
pub const CATCH_UP: f32 = 4.0;

/// The neighbours' public copies a peer keeps at most (least recently updated go first).
pub const MAX_COPIES: usize = 32;

/// The payload tag of a change of the sender's public copy: the tag, the round of the
/// update the change applies to (u64 LE), then the task's top-k payload.
pub const CHANGE_TAG: u8 = 0x10;

/// What a peer holds of a neighbour's weights with `exchange = "weights"` and top-k (or
/// of its own, as its neighbours hold them).
#[derive(Clone, Debug)]
struct PublicCopy {
    /// The round of the update that last set or changed it.
    round: u64,
    /// When we last set or changed it, on our own count of copies taken (which one goes
    /// first when [`MAX_COPIES`] are held: never a claim of the sender's).
    touched: u64,
    weights: Vec<f32>,
    /// Whether that update was a change (else it set the copy).
    change: bool,
}

/// A neighbour's round-start weights, held until our own round reaches theirs.
struct Mix {
    sender: u64,
    round: u64,
    weights: Vec<f32>,
}

/// Signers remembered for replay protection; the oldest are forgotten beyond this (their
/// old rounds are then refused as stale instead).
const MAX_REMEMBERED: usize = 65_536;

/// What a peer remembers of a signer.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// The last round taken from it (replay protection).
    round: u64,
    /// That round's update was a change we could not apply (`base`): one of the same
    /// round that applies (the signer's keyframe or whole copy) may still come and
    /// count. Else a neighbour relaying a signer's changes to us while we lack its copy
    /// used up each round, and the signer's own whole copy was refused as a replay.
    base_only: bool,
    /// One bit per update of its that went through the screen, newest lowest: set when
    /// the screen dropped it.
    screened: u8,
    /// How many of its updates went through the screen, up to [`SCREEN_HISTORY`].
    judged: u8,
    /// Our round when the screen last dropped one of its updates.
    screened_at: u64,
}

impl Seen {
    /// Screened out in at least half of its recorded updates, the last time no more
    /// than [`SCREEN_HISTORY`] rounds ago: a signer whose updates stop reaching the
    /// screen (they come after we close the round) is not distrusted for ever.
    fn distrusted(&self, round: u64) -> bool {
        self.screened != 0
            && 2 * self.screened.count_ones() >= u32::from(self.judged)
            && round <= self.screened_at + u64::from(SCREEN_HISTORY)
    }
}

/// Updates per signer the screening record covers.
const SCREEN_HISTORY: u32 = 4;

/// Updates a screen needs to go on the signers' records (one of three still drops an
/// update for its round). Not three: the median of three distances is one of them, so
/// of three honest updates the one whose model drifted furthest is "the outlier"
/// whenever it lies 1.5 times as far as the middle one; in a three-peer swarm that
/// record made an honest peer distrusted, no longer waited for, its updates then late
/// and stale and never judged again: no credit in 20 rounds (a CI run of the native
/// three-peer test).
const RECORD_MIN: usize = 4;

#[derive(Clone, Debug)]
struct Pending {
    key: PublicKey,
    round: u64,
    /// The samples the signer claims (weighs the update in rounds sized in time).
    samples: u32,
    /// SHA-256 of the update message as it arrived (what a receipt names), computed from
    /// the decoded update ([`Update::verified_hash`](wire::Update::verified_hash)): the
    /// same bytes, since an update decodes only from its one encoding (no trailing
    /// bytes). `held_copy` hashes a copy's raw bytes against it; were decoding ever to
    /// take other bytes, honest copies would count as forgeries there.
    hash: [u8; 32],
    /// Its signature (a replay is hashed only when it carries this one).
    signature: [u8; 64],
    /// The neighbours (the transport's peer ids, the same across a neighbour's
    /// connections) that delivered it: the first, and any that then sent a byte-for-byte
    /// copy (its signer's own, when a relay came first); at most [`WITNESSES`].
    /// [`NO_SENDER`] is no neighbour in particular (see [`Learner::receive`]).
    from: Vec<u64>,
    delta: Vec<f32>,
}

/// The neighbours recorded as having delivered one held update (a peer holds at most 2k
/// = 32 neighbours at once; more are recorded in case some came and went).
const WITNESSES: usize = 64;

/// The sender of a message that came from no neighbour in particular
/// ([`Learner::receive`]): each of its updates stands alone in [`one_vote_each`].
pub const NO_SENDER: u64 = u64::MAX;

/// One vote per neighbour and round: keeps the most held updates that can each be
/// matched to a distinct neighbour among those that delivered it (a maximum matching,
/// found by augmenting paths in the order the updates came; a matched update stays
/// matched), and returns the rest. An update that a neighbour delivering no other held
/// update delivered always keeps its place (its signer's own copy, once recorded), so a
/// neighbour that hands keys between its connections, or delivers another's update as
/// well as its own, gains no vote. An update of [`NO_SENDER`] stands alone.
fn one_vote_each(held: Vec<Pending>) -> (Vec<Pending>, Vec<Pending>) {
    fn augment(
        i: usize,
        held: &[Pending],
        owner: &mut HashMap<u64, usize>,
        tried: &mut Vec<u64>,
    ) -> bool {
        for &c in &held[i].from {
            if c == NO_SENDER || tried.contains(&c) {
                continue;
            }
            tried.push(c);
            let free = match owner.get(&c) {
                None => true,
                Some(&j) => augment(j, held, owner, tried),
            };
            if free {
                owner.insert(c, i);
                return true;
            }
        }
        false
    }
    let mut owner: HashMap<u64, usize> = HashMap::new();
    let mut keep = vec![false; held.len()];
    for i in 0..held.len() {
        keep[i] =
            held[i].from.contains(&NO_SENDER) || augment(i, &held, &mut owner, &mut Vec::new());
    }
    let mut kept = Vec::with_capacity(held.len());
    let mut extra = Vec::new();
    for (p, k) in held.into_iter().zip(keep) {
        if k { kept.push(p) } else { extra.push(p) }
    }
    (kept, extra)
}

/// In rounds sized in time, how far below the round's lower median claim `rho` a sample
/// claim counts: down to `rho / SAMPLE_SPREAD_DOWN` (a claim below weighs no less and,
/// exchanging deltas, makes the update no longer: it is scaled up at most this much
/// before the norm bound and the screen).
pub const SAMPLE_SPREAD_DOWN: f32 = 4.0;
/// And how far above: up to `rho * SAMPLE_SPREAD_UP`, so that no update weighs more than
/// twice a median one, whatever it claims. A liar that claims this much (exchanging
/// deltas, may send an update up to this many times the norm bound, scaled down before
/// it is judged) has a part in the weighted sum of at most `SAMPLE_SPREAD_UP` times the
/// bound, over a total weight that its claim also raises.
pub const SAMPLE_SPREAD_UP: f32 = 2.0;

/// The receipts a peer remembers having counted: 2k neighbours' receipts for the last
/// [`RECEIPT_ROUNDS`] rounds of its updates, and then some.
const MAX_RECEIPTS_SEEN: usize = 2048;

/// How many of our updates before the last a receipt may still name and count (a
/// neighbour behind us closes its rounds later; one far behind used an update too old to
/// matter).
pub const RECEIPT_ROUNDS: u64 = 32;

/// One peer's state of the swarm's model and its learning protocol. Platform-neutral:
/// the simulator, the native peer and the browser worker all drive this.
pub struct Learner {
    cfg: LearnConfig,
    task: String,
    id: Identity,
    round: u64,
    weights: Vec<f32>,
    momentum: Vec<f32>,
    compressor: Compressor,
    own: Option<Vec<f32>>,
    /// The samples our own update claims, and the loss it carries.
    own_samples: u32,
    own_loss: f32,
    inbox: Vec<Pending>,
    /// Per signer: the last round taken from it, and its recent screening record.
    seen: HashMap<PublicKey, Seen>,
    /// Whether this model has been trained or adopted (a blank joiner takes any model).
    started: bool,
    /// Neighbours' weights to average with ours when the round closes: at most one per
    /// sender (the transport's connection) and round, at most [`MAX_MIXES`] in all.
    mixes: Vec<Mix>,
    /// The ledger heads held: checked against the server, or gossiped by neighbours.
    witness: crate::trust::head::Witness,
    /// The receipts counted lately, by round and signer ([`MAX_RECEIPTS_SEEN`]): a
    /// neighbour resending one, or passing on others', counts it once.
    receipts_seen: std::collections::BTreeSet<(u64, PublicKey)>,
    /// The rounds of our last updates, at most [`RECEIPT_ROUNDS`] + 1: receipts count
    /// for these only.
    sent_rounds: std::collections::VecDeque<u64>,
    /// Differential privacy, when the task asks for it.
    dp: Option<DpState>,
    /// Our training loss stays with us (it describes data that is the visitor's own, or
    /// protected): updates carry 0.
    loss_kept: bool,
    /// Weights changes (top-k with `exchange = "weights"`): our public copy, and our
    /// neighbours', by signer.
    public: Option<PublicCopy>,
    copies: HashMap<PublicKey, PublicCopy>,
    /// Our next update is a keyframe (the peer asks when many neighbours lack the copy).
    keyframe_next: bool,
    /// Weights changes: when our update this round is a change of our public copy, the
    /// run itself (`round-start - local`), which the update stands for plus the copy's
    /// lag.
    own_run: Option<Vec<f32>>,
    /// Our run uncompressed (`round-start - local`; none with differential privacy): our
    /// part in a round's aggregate where no neighbour's update is in it. Alone, the
    /// compressed part (a top-k change of our copy, or a keyframe's int8 rounding of the
    /// whole weights) is noise that the outer momentum carries on: a lone peer of 100
    /// samples/s in the simulator sat at 80% instead of 90%.
    own_exact: Option<Vec<f32>>,
    /// Weights changes: our last round's screen dropped our own update (what neighbours
    /// compute from our copy) and would have kept our run: the copy's lag made it an
    /// outlier ([`copy_screened_out`](Self::copy_screened_out)).
    copy_screened: bool,
    /// Copies taken so far (the clock of [`PublicCopy::touched`]).
    copies_taken: u64,
    /// The last message [`receive_from`](Self::receive_from) refused was an update whose
    /// signature verified and whose payload did not decode ([`signed_junk`](Self::signed_junk)).
    signed_junk: bool,
    /// The neighbours the round waits for, each by the keys it delivers
    /// ([`set_awaited`](Self::set_awaited)).
    awaited: Vec<Vec<PublicKey>>,
    /// Traffic and rejection counters.
    pub stats: LearnStats,
}

impl Learner {
    /// A peer that starts (or restarts) the swarm from `weights` at round 0.
    pub fn new(
        cfg: LearnConfig,
        task: &str,
        id: Identity,
        weights: Vec<f32>,
    ) -> Result<Self, LearnError> {
        cfg.validate().map_err(LearnError::Config)?;
        check_finite(&weights).map_err(LearnError::BadLocal)?;
        let n = weights.len();
        Ok(Self {
            compressor: Compressor::new(cfg.compression, n),
            cfg,
            task: task.to_string(),
            id,
            round: 0,
            momentum: vec![0.0; n],
            weights,
            own: None,
            own_samples: 0,
            own_loss: 0.0,
            inbox: Vec::new(),
            seen: HashMap::new(),
            started: false,
            mixes: Vec::new(),
            witness: crate::trust::head::Witness::new(task, None),
            receipts_seen: Default::default(),
            sent_rounds: Default::default(),
            dp: None,
            loss_kept: false,
            public: None,
            copies: HashMap::new(),
            keyframe_next: false,
            own_run: None,
            own_exact: None,
            copy_screened: false,
            copies_taken: 0,
            signed_junk: false,
            awaited: Vec::new(),
            stats: LearnStats::default(),
        })
    }

    /// The neighbours the round about to close waited for, each by the keys its updates
    /// come under (the peer sets it before [`finish_round`](Self::finish_round), which
    /// forgets it): each of them none of whose keys has an update among those the round
    /// uses counts in the norm bound's median as our own run's norm ([`norm_reference`]),
    /// and a held update above that bound is scaled down to it. Without that, two
    /// colluders whose updates were the only ones held (the honest ones late, or pushed
    /// out by their next round's; the colluders still connected or not) were the median
    /// themselves, and their update of any size was taken.
    pub fn set_awaited(&mut self, neighbours: Vec<Vec<PublicKey>>) {
        self.awaited = neighbours;
    }

    /// Clips and noises every update we send from now on (the task's `[privacy]`):
    /// `noise_key` is 32 secret random bytes from the platform's secure generator, and
    /// `sent` the updates this visitor already sent under it (kept across visits).
    pub fn enable_privacy(&mut self, dp: crate::privacy::Dp, noise_key: [u8; 32], sent: u64) {
        self.loss_kept = true;
        self.dp = Some(DpState {
            dp,
            noise: crate::privacy::NoiseSource::new(noise_key),
            sent,
        });
    }

    /// Counts `rounds` updates already sent under the budget (on earlier visits) with
    /// noise multiplier `noise_multiplier`: priced at today's noise (with every update
    /// using the data, a round at `z'` spends what `(z / z')^2` rounds at `z` do), rounded
    /// up. The count only ever rises.
    pub fn note_privacy_sent(&mut self, rounds: u64, noise_multiplier: f64) {
        if let Some(s) = self.dp.as_mut() {
            let then = if noise_multiplier.is_finite() && noise_multiplier > 0.0 {
                noise_multiplier
            } else {
                s.dp.noise_multiplier.min(f64::MIN_POSITIVE)
            };
            let ratio = (s.dp.noise_multiplier / then).powi(2);
            let now = (rounds as f64 * ratio).ceil();
            let now = if now.is_finite() && now < 1e15 {
                now as u64
            } else {
                u64::MAX / 2
            };
            s.sent = s.sent.max(now);
        }
    }

    /// Keeps our training loss to ourselves: updates carry 0 (a task on the visitor's own
    /// files, or under differential privacy).
    pub fn keep_loss_local(&mut self) {
        self.loss_kept = true;
    }

    /// Whether our training loss stays with us.
    pub fn loss_kept(&self) -> bool {
        self.loss_kept
    }

    /// Where we stand with the privacy budget (`None` without differential privacy).
    pub fn privacy(&self) -> Option<PrivacyProgress> {
        let s = self.dp.as_ref()?;
        let spent = s.sent >= s.dp.rounds;
        Some(PrivacyProgress {
            epsilon: s.dp.epsilon_after(s.sent),
            delta: s.dp.delta,
            rounds: s.sent,
            budget_rounds: s.dp.rounds,
            budget_epsilon: s.dp.epsilon,
            clip: s.dp.clip,
            noise_multiplier: s.dp.noise_multiplier,
            spent,
            stopped: spent && s.dp.on_budget == crate::privacy::OnBudget::Stop,
        })
    }

    /// Whether we may send updates (false once a budget with `on_budget = "stop"` is
    /// spent).
    pub fn may_send(&self) -> bool {
        !self.privacy().is_some_and(|p| p.stopped)
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.id.public()
    }

    /// Rounds completed: the version of [`weights`](Self::weights).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The current round-start weights: what local training starts from.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Makes this round's update from the weights local training ended with, and returns
    /// the signed message to send to every neighbour.
    pub fn local_update(
        &mut self,
        local: &[f32],
        samples: u32,
        loss: f32,
    ) -> Result<Vec<u8>, LearnError> {
        if local.len() != self.weights.len() {
            return Err(LearnError::BadLocal(format!(
                "{} values, model has {}",
                local.len(),
                self.weights.len()
            )));
        }
        check_finite(local).map_err(LearnError::BadLocal)?;
        let loss = if self.loss_kept { 0.0 } else { loss };
        if let Some(state) = self.dp.as_mut() {
            if state.sent >= state.dp.rounds && state.dp.on_budget == crate::privacy::OnBudget::Stop
            {
                return Err(LearnError::BudgetSpent(state.sent));
            }
            // The round's pseudo-gradient, clipped and noised before anything of it
            // leaves; the loss describes the data, so none is sent.
            let mut delta: Vec<f32> = self.weights.iter().zip(local).map(|(w, l)| w - l).collect();
            crate::privacy::clip_and_noise(
                &mut delta,
                state.dp.clip,
                state.dp.noise_multiplier as f32,
                &mut state.noise,
            );
            state.sent += 1;
            // What a neighbour downloads of our model must be made of noised updates only.
            self.own_exact = None;
            return Ok(self.update_from_delta(&delta, samples, 0.0));
        }
        // Only where no codec keeps a remainder of the run for later rounds (weights
        // changes keep theirs in the public copy): with one, the remainder would be
        // applied now and again when it is sent.
        self.own_exact = (self.changes() || self.cfg.compression == Compression::None)
            .then(|| self.weights.iter().zip(local).map(|(w, l)| w - l).collect());
        Ok(match self.cfg.exchange {
            Exchange::Delta => {
                let delta: Vec<f32> = self.weights.iter().zip(local).map(|(w, l)| w - l).collect();
                self.update_from_delta(&delta, samples, loss)
            }
            Exchange::Weights => self.update_from_local(local, samples, loss),
        })
    }

    /// Compresses and signs a pseudo-gradient (as local weights, `start - delta`, when the
    /// task exchanges weights). The simulator's attackers call this with a forged delta: a
    /// lie is still a validly signed message.
    pub fn update_from_delta(&mut self, delta: &[f32], samples: u32, loss: f32) -> Vec<u8> {
        match self.cfg.exchange {
            Exchange::Delta => {
                let (payload, decoded) = self.compressor.encode(delta);
                self.own = Some(decoded);
                self.sign(payload, samples, loss)
            }
            Exchange::Weights => {
                let local: Vec<f32> = self.weights.iter().zip(delta).map(|(w, d)| w - d).collect();
                self.update_from_local(&local, samples, loss)
            }
        }
    }

    /// Whether updates carry changes of public copies (weights with a top-k codec).
    fn changes(&self) -> bool {
        self.cfg.weights_changes()
    }

    /// Compresses and signs local weights (`exchange = "weights"`); our own part in the
    /// aggregate is what neighbours will compute from them.
    fn update_from_local(&mut self, local: &[f32], samples: u32, loss: f32) -> Vec<u8> {
        let (payload, decoded) = if self.changes() {
            self.public_update(local)
        } else {
            self.compressor.encode(local)
        };
        self.own_run = self
            .public
            .as_ref()
            .is_some_and(|c| c.change)
            .then(|| self.weights.iter().zip(local).map(|(w, l)| w - l).collect());
        self.own = Some(
            self.weights
                .iter()
                .zip(&decoded)
                .map(|(w, l)| w - l)
                .collect(),
        );
        self.sign(payload, samples, loss)
    }

    /// Weights changes: the payload that moves our public copy toward `local` — a
    /// keyframe (whole weights in int8) when [`next_is_keyframe`](Self::next_is_keyframe)
    /// says so (the round calls for one, no copy is out, or the copy lags), else the top-k
    /// change from the copy (whatever top-k leaves out stays in the next
    /// change: the copy's distance to our weights is the error feedback) — and the copy
    /// it leaves our neighbours holding.
    fn public_update(&mut self, local: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let keyframe = self.next_is_keyframe(local);
        self.keyframe_next = false;
        self.copy_screened = false;
        let mut change = false;
        let (payload, weights) = match self.public.take() {
            // `next_is_keyframe` says keyframe where the copy is this round's.
            Some(copy) if !keyframe => {
                change = true;
                let change: Vec<f32> = local
                    .iter()
                    .zip(&copy.weights)
                    .map(|(l, c)| l - c)
                    .collect();
                let (inner, decoded) = Compressor::new(self.cfg.compression, 0).encode(&change);
                let weights: Vec<f32> = copy
                    .weights
                    .iter()
                    .zip(&decoded)
                    .map(|(c, d)| c + d)
                    .collect();
                let mut payload = Vec::with_capacity(9 + inner.len());
                payload.push(CHANGE_TAG);
                payload.extend_from_slice(&copy.round.to_le_bytes());
                payload.extend_from_slice(&inner);
                (payload, weights)
            }
            _ => Compressor::new(KEYFRAME_CODEC, 0).encode(local),
        };
        self.public = Some(PublicCopy {
            round: self.round,
            touched: 0,
            weights: weights.clone(),
            change,
        });
        (payload, weights)
    }

    /// Drops the copy we hold of `key`'s weights (its connection closed), and, exchanging
    /// weights, its weights held for a later round than ours (they would wait for that
    /// round; a delta counts in ours).
    pub fn forget_copy(&mut self, key: &PublicKey) {
        self.copies.remove(key);
        // With weights changes its next connection starts from the whole copy of its
        // current round, which must not be refused as a replay of that round's change
        // (taken once: the inbox keeps one update per key and round). Not otherwise: a
        // pseudo-gradient of a round already taken would be used again.
        if self.changes()
            && let Some(s) = self.seen.get_mut(key)
        {
            s.base_only = true;
        }
        if self.cfg.exchange == Exchange::Weights {
            let round = self.round;
            self.inbox.retain(|p| p.key != *key || p.round <= round);
        }
    }

    /// Whether our next update, of our `local` weights, will be a keyframe (with weights
    /// changes): the round calls for one, the peer asked for one, no copy of ours is
    /// out, or the copy lags `local` by more than [`CATCH_UP`] times the run.
    pub fn next_is_keyframe(&self, local: &[f32]) -> bool {
        self.changes()
            && (self.round.is_multiple_of(KEYFRAME_EVERY)
                || self.keyframe_next
                || self.public.as_ref().is_none_or(|c| {
                    c.round >= self.round
                        || aggregate::distance(local, &c.weights)
                            > CATCH_UP * aggregate::distance(local, &self.weights)
                }))
    }

    /// Weights changes: whether the screen of the last round closed with our change in
    /// it dropped our own update — our round-start weights minus the public copy the
    /// change left, about what each neighbour whose model is ours computes from it —
    /// where our run itself (round-start minus our local weights) would have passed
    /// (only a robust rule with two neighbours' updates held screens at all): our copy
    /// lags our weights (a peer whose model moved far, such as a joiner catching up,
    /// follows with top-k changes over many rounds), and neighbours likely screen us out
    /// for it. The peer then makes the next update a keyframe where the budget allows
    /// ([`crate::learn::Peer`]). A keyframe round has no run to compare, so this fires
    /// on at most every other update, whoever lies: neighbours (a majority, or even one
    /// that sits at the median and tightens the screen) could make it fire that often,
    /// which costs upload (a keyframe is 8 times the demo's change; bounded by the
    /// budget where there is one, and then our updates slow down) but never stalls us.
    pub fn copy_screened_out(&self) -> bool {
        self.copy_screened
    }

    /// Makes our next update a keyframe (with weights changes): cheaper than whole copies
    /// when many of the neighbours it goes to do not hold ours.
    pub fn keyframe_next(&mut self) {
        self.keyframe_next = true;
    }

    /// Whether our latest update is a change of our public copy (a neighbour that does
    /// not hold the copy needs [`whole_public`](Self::whole_public) instead).
    pub fn sent_change(&self) -> bool {
        self.changes()
            && self
                .public
                .as_ref()
                .is_some_and(|c| c.change && c.round == self.round)
    }

    /// Our latest update as the whole public copy it leaves, signed for the same round,
    /// samples and loss: for a neighbour that does not hold the copy it changes. In the
    /// keyframe's codec (int8), a quarter of fp32: the receiver's copy then differs from
    /// ours by int8's rounding until our next keyframe (our changes move both alike). In
    /// fp32, a churning swarm's whole copies to newcomers spent most of the upload budget
    /// (`churn-budget`: 69 s to the target against 37 s in int8, honest credit per sample
    /// 0.27 against 0.47).
    pub fn whole_public(&self) -> Option<Vec<u8>> {
        let copy = self.public.as_ref().filter(|c| c.round == self.round)?;
        let payload = compress::encode_once(KEYFRAME_CODEC, &copy.weights);
        Some(
            PeerMessage::Update(Update::signed(
                &self.id,
                &self.task,
                copy.round,
                self.own_samples,
                self.own_loss,
                payload,
            ))
            .encode(),
        )
    }

    /// Weights changes: a neighbour's update applied to our copy of its weights, which
    /// it replaces; returns the weights. A keyframe sets the copy; a change applies only
    /// to the copy of the round it names (else `base`: we missed one, and wait for the
    /// next keyframe).
    fn apply_change(
        &mut self,
        key: PublicKey,
        round: u64,
        payload: &[u8],
    ) -> Result<Vec<f32>, Rejection> {
        let weights = if payload.first() == Some(&CHANGE_TAG) {
            let Some(base) = payload.get(1..9).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                return Err(self.stats.reject(Rejection::Malformed));
            };
            let base = u64::from_le_bytes(base);
            if self.copies.get(&key).is_none_or(|c| c.round != base) {
                return Err(self.stats.reject(Rejection::Base));
            }
            let mut w = self.decode_payload(&payload[9..], self.cfg.compression)?;
            // The copy plus the change: the sender's f32 add (commutative, so bit-exact).
            for (d, c) in w.iter_mut().zip(&self.copies[&key].weights) {
                *d += c;
            }
            if !w.iter().all(|x| x.is_finite()) {
                return Err(self.stats.reject(Rejection::NonFinite));
            }
            w
        } else if payload.first() == Some(&Compression::None.tag()) {
            self.decode_payload(payload, Compression::None)?
        } else {
            self.decode_payload(payload, KEYFRAME_CODEC)?
        };
        make_room(&mut self.copies, &key, MAX_COPIES, |c| c.touched);
        self.copies_taken += 1;
        self.copies.insert(
            key,
            PublicCopy {
                round,
                touched: self.copies_taken,
                weights: weights.clone(),
                change: false,
            },
        );
        Ok(weights)
    }

    fn sign(&mut self, payload: Vec<u8>, samples: u32, loss: f32) -> Vec<u8> {
        self.own_samples = samples;
        self.own_loss = loss;
        if self.sent_rounds.back() != Some(&self.round) {
            self.sent_rounds.push_back(self.round);
            while self.sent_rounds.len() > RECEIPT_ROUNDS as usize + 1 {
                self.sent_rounds.pop_front();
            }
        }
        PeerMessage::Update(Update::signed(
            &self.id, &self.task, self.round, samples, loss, payload,
        ))
        .encode()
    }

    /// Whether an update from `key` for this round or later is held (exchanging weights,
    /// or heard: weights far ahead are not held, nor changes we could not apply).
    pub fn has_fresh_from(&self, key: &PublicKey) -> bool {
        self.inbox
            .iter()
            .any(|p| &p.key == key && p.round >= self.round)
            || self.cfg.exchange == Exchange::Weights
                && self.seen.get(key).is_some_and(|s| s.round >= self.round)
    }

    /// Whether the update message `bytes`, signed by `key` for `round`, that the
    /// connection `sender` delivered is a copy of one held for a round's close: `None`
    /// when none held carries its signature (its last 64 bytes), else whether it is that
    /// update byte for byte (`false`: the signature of one over other bytes, a forgery).
    /// Hashed only when the signature matches. A copy records `sender` among the
    /// connections that delivered the update (one vote each per round: `one_vote_each`).
    pub fn held_copy(
        &mut self,
        sender: u64,
        key: &PublicKey,
        round: u64,
        bytes: &[u8],
    ) -> Option<bool> {
        let sig = bytes.get(bytes.len().checked_sub(64)?..)?;
        let held = |p: &Pending| &p.key == key && p.round == round && p.signature[..] == *sig;
        if !self.inbox.iter().any(held) {
            return None;
        }
        let hash = crate::trust::receipt::sha256(bytes);
        let copy = self.inbox.iter_mut().find(|p| held(p) && p.hash == hash);
        let found = copy.is_some();
        if let Some(p) = copy
            && !p.from.contains(&sender)
            && p.from.len() < WITNESSES
        {
            p.from.push(sender);
        }
        Some(found)
    }

    /// Whether an update signed by `key` for our current round is held, decoded, for the
    /// round's close (a change whose base we lack, a stale or refused one is not).
    pub fn holds_current_from(&self, key: &PublicKey) -> bool {
        self.inbox
            .iter()
            .any(|p| &p.key == key && p.round == self.round)
    }

    /// The latest round of an authentic update heard from `key` (used or not).
    pub fn heard_round(&self, key: &PublicKey) -> Option<u64> {
        self.seen.get(key).map(|s| s.round)
    }

    /// Whether updates signed by `key` are distrusted: the screen dropped at least half
    /// of its recent ones (see [`Learner::screened`]).
    pub fn distrusts(&self, key: &PublicKey) -> bool {
        self.seen.get(key).is_some_and(|s| s.distrusted(self.round))
    }

    /// Validates and takes in one message from a neighbour (as [`NO_SENDER`]: see
    /// [`receive_from`](Self::receive_from); its updates each count alone in the one vote
    /// per neighbour and round).
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Received, Rejection> {
        self.receive_from(NO_SENDER, bytes)
    }

    /// Validates and takes in one message from the neighbour the transport knows as
    /// `sender` (its connection: gossip mixes are unsigned, and each sender gets one per
    /// round).
    pub fn receive_from(&mut self, sender: u64, bytes: &[u8]) -> Result<Received, Rejection> {
        self.signed_junk = false;
        let n = self.weights.len();
        let msg = PeerMessage::decode(bytes, n).map_err(|e| self.stats.reject((&e).into()))?;
        let u = match msg {
            PeerMessage::ModelRequest => return Ok(Received::ModelRequest),
            PeerMessage::Model(s) | PeerMessage::ModelInt8(s) => return Ok(Received::Model(s)),
            PeerMessage::Observe { base } => {
                return Ok(Received::Observe {
                    base: (base != [0; 32]).then_some(base),
                });
            }
            PeerMessage::Observed(o) => return Ok(Received::Observed(o)),
            PeerMessage::Mix { round, payload } => return self.take_mix(sender, round, &payload),
            PeerMessage::Status { contributing } => return Ok(Received::Status { contributing }),
            PeerMessage::Receipt(r) => return self.take_receipt(&r),
            PeerMessage::Head(h) => return self.take_head(sender, &h),
            PeerMessage::Update(u) => u,
        };
        if u.key == self.id.public() {
            return Err(self.stats.reject(Rejection::Own));
        }
        // The checks that read claims and change nothing come before the signature's
        // (an ed25519 verification and a hash of the whole update): a neighbour that
        // resends one valid update again and again costs a lookup each time.
        if u.samples == 0 {
            return Err(self.stats.reject(Rejection::Samples));
        }
        // A round taken only as `base` stays open to that round's keyframe or whole copy
        // (not to another change: it could not apply either).
        let whole = u.payload.first() != Some(&CHANGE_TAG);
        if self
            .seen
            .get(&u.key)
            .is_some_and(|s| u.round < s.round || (u.round == s.round && !(s.base_only && whole)))
        {
            return Err(self.stats.reject(Rejection::Replay));
        }
        let Some(hash) = u.verified_hash(&self.task) else {
            return Err(self.stats.reject(Rejection::BadSignature));
        };
        let stale = u.round + u64::from(self.cfg.max_staleness) < self.round;
        let delta = if self.changes() {
            // A change applies to our copy whether or not the update still counts, so
            // that the sender's next one applies too; one we cannot apply was still
            // heard (a round does not wait for its sender). A stale one from a key we
            // hold no copy of makes none: copies of throwaway keys would push our honest
            // neighbours' copies out (`MAX_COPIES`), and their changes then apply to
            // nothing.
            if stale && !self.copies.contains_key(&u.key) {
                return Err(self.stats.reject(Rejection::Stale));
            }
            let applied = self.apply_change(u.key, u.round, &u.payload);
            if matches!(applied, Ok(_) | Err(Rejection::Base)) {
                self.remember(u.key, u.round, applied.is_err());
            } else {
                self.signed_junk = true;
            }
            let w = applied?;
            if stale {
                return Err(self.stats.reject(Rejection::Stale));
            }
            w
        } else {
            if stale {
                return Err(self.stats.reject(Rejection::Stale));
            }
            let delta = self
                .decode_payload(&u.payload, self.cfg.compression)
                .inspect_err(|_| self.signed_junk = true)?;
            self.remember(u.key, u.round, false);
            delta
        };
        let lagging = u.round > self.round + u64::from(self.cfg.max_staleness);
        if lagging && self.cfg.exchange == Exchange::Weights {
            // Weights for a round this far ahead would wait for it, a whole model each
            // (one per key: many keys, many models); we are behind, and catch up by a
            // download instead.
            return Ok(Received::Update {
                key: u.key,
                round: u.round,
                lagging,
            });
        }
        match self.cfg.exchange {
            Exchange::Delta => self.inbox.retain(|p| p.key != u.key),
            // Weights are used in the round they belong to: a neighbour that is ahead
            // may have sent its next round's before we used its current one. At most two
            // per signer: this round's and the newest later one.
            Exchange::Weights => self
                .inbox
                .retain(|p| p.key != u.key || (p.round == self.round && p.round != u.round)),
        }
        self.inbox.push(Pending {
            key: u.key,
            round: u.round,
            samples: u.samples,
            hash,
            signature: u.signature,
            from: vec![sender],
            delta,
        });
        Ok(Received::Update {
            key: u.key,
            round: u.round,
            lagging,
        })
    }

    /// A neighbour's receipt for one of our updates: counted when it names us as the
    /// sender, this task, and its signature verifies, once per round and signer. The
    /// signature is checked last, and only for a receipt that would count (for a round we
    /// sent an update for, not counted from its signer yet): one valid receipt sent again
    /// and again was a signature check each time. One that would not count is taken
    /// unchecked: it counts for nothing, and what the peer does with it (the neighbour
    /// that signs with its key holds our copy) that neighbour could sign itself.
    fn take_receipt(&mut self, bytes: &[u8]) -> Result<Received, Rejection> {
        use crate::trust::receipt::Receipt;
        let Ok(r) = Receipt::decode_unverified(bytes) else {
            return Err(self.stats.reject(Rejection::Malformed));
        };
        if r.sender != self.id.public() || r.task != self.task {
            return Err(self.stats.reject(Rejection::Malformed));
        }
        let counts = self.sent_rounds.contains(&r.round)
            && !self.receipts_seen.contains(&(r.round, r.receiver));
        if counts && !r.verifies() {
            return Err(self.stats.reject(Rejection::BadSignature));
        }
        Ok(Received::Receipt {
            signer: r.receiver,
            round: r.round,
        })
    }

    /// Counts a receipt for our update for `round` signed by `signer`, which the caller
    /// checked came from the neighbour that signs with that key; once per signer and
    /// round, and only for one of the last [`RECEIPT_ROUNDS`] + 1 rounds we sent an
    /// update for (a window on our round counted rounds we never sent, such as those a
    /// model download skipped). Returns whether it counted.
    pub fn count_receipt(&mut self, round: u64, signer: PublicKey) -> bool {
        if !self.sent_rounds.contains(&round) {
            return false;
        }
        let sent = &self.sent_rounds;
        self.receipts_seen.retain(|(r, _)| sent.contains(r));
        if !self.receipts_seen.insert((round, signer)) {
            return false;
        }
        // Full (keys of many connections over 33 rounds), the oldest goes.
        while self.receipts_seen.len() > MAX_RECEIPTS_SEEN {
            self.receipts_seen.pop_first();
        }
        self.stats.receipts += 1;
        true
    }

    /// A neighbour's ledger head: kept for the next check when it is signed by the
    /// server this peer knows and not one it holds (see [`crate::trust::head::Witness`]).
    /// A head of another server, or one that comes before this peer knows its server's
    /// key, is no evidence about this ledger and is passed over; a malformed or badly
    /// signed one is refused.
    fn take_head(&mut self, sender: u64, bytes: &[u8]) -> Result<Received, Rejection> {
        use crate::trust::head::HeadError;
        match self.witness.heard(sender, bytes) {
            Ok(h) => Ok(Received::Head { id: Some(h.id) }),
            Err(HeadError::OtherServer) => Ok(Received::Head { id: None }),
            Err(HeadError::BadSignature) => Err(self.stats.reject(Rejection::BadSignature)),
            Err(HeadError::Malformed(_) | HeadError::OtherTask) => {
                Err(self.stats.reject(Rejection::Malformed))
            }
        }
    }

    /// The heads of the task's ledger this peer holds (see [`crate::trust::head`]).
    pub fn witness(&self) -> &crate::trust::head::Witness {
        &self.witness
    }

    /// The witness, for the driver to hand it the server's heads.
    pub fn witness_mut(&mut self) -> &mut crate::trust::head::Witness {
        &mut self.witness
    }

    fn take_mix(&mut self, sender: u64, round: u64, payload: &[u8]) -> Result<Received, Rejection> {
        // Honest peers send none when exchanging weights, whatever the round.
        let every = self.sync_every();
        if every == 0 {
            return Err(self.stats.reject(Rejection::OffSchedule));
        }
        let window = u64::from(self.cfg.max_staleness);
        if round < self.round || round > self.round + window {
            return Err(self.stats.reject(Rejection::Stale));
        }
        // Only for rounds that are multiples of `sync_every`.
        if !round.is_multiple_of(every) {
            return Err(self.stats.reject(Rejection::OffSchedule));
        }
        let from_sender = self.mixes.iter().filter(|m| m.sender == sender);
        if from_sender.clone().any(|m| m.round == round) {
            return Err(self.stats.reject(Rejection::MixRepeat));
        }
        // A few per connection: one connection must not take every slot (with
        // `max_staleness` at 16 `sync_every` or more it could send a mix for each round
        // ahead, and honest mixes would find no room).
        if from_sender.count() >= MIXES_PER_SENDER || self.mixes.len() >= MAX_MIXES {
            return Err(self.stats.reject(Rejection::MixOverflow));
        }
        let w = self.decode_payload(payload, self.mix_codec())?;
        if aggregate::distance(&w, &self.weights) > 0.25 * aggregate::norm(&self.weights) {
            return Err(self.stats.reject(Rejection::Norm));
        }
        self.mixes.push(Mix {
            sender,
            round,
            weights: w,
        });
        Ok(Received::Mix)
    }

    /// Rounds between gossip mixes; 0 (none) when exchanging weights, where every update
    /// already pulls the two models together and a mix would only add a way to push.
    fn sync_every(&self) -> u64 {
        match self.cfg.exchange {
            Exchange::Weights => 0,
            Exchange::Delta => u64::from(self.cfg.sync_every),
        }
    }

    /// Drops every gossip mix from the connection `sender` not yet used (it was caught
    /// breaking the protocol; its updates are judged by key: see `forget_deliverer` and
    /// `drop_updates_of_except`).
    pub fn discard_mixes_of(&mut self, sender: u64) {
        self.mixes.retain(|m| m.sender != sender);
    }

    /// The neighbour `sender` (shunned) no longer counts as a deliverer of any update
    /// held: one it alone delivered counts on no neighbour's vote ([`one_vote_each`])
    /// until another delivers it (its signer's own copy, which the round waits for:
    /// [`delivered_fresh`](Self::delivered_fresh)).
    pub fn forget_deliverer(&mut self, sender: u64) {
        for p in &mut self.inbox {
            p.from.retain(|&c| c != sender);
        }
    }

    /// Whether the neighbour `sender` delivered an update signed by `key` for our round
    /// or later: the update itself, or a copy of it byte for byte.
    pub fn delivered_fresh(&self, key: &PublicKey, sender: u64) -> bool {
        self.inbox
            .iter()
            .any(|p| &p.key == key && p.round >= self.round && p.from.contains(&sender))
    }

    /// Drops the updates signed by `key` held for a round's close.
    pub fn drop_updates_of(&mut self, key: &PublicKey) {
        self.drop_updates_of_except(key, |_| false);
    }

    /// Drops the updates signed by `key` held for a round's close, except those that a
    /// neighbour for which `spare` holds delivered too.
    pub fn drop_updates_of_except(&mut self, key: &PublicKey, spare: impl Fn(u64) -> bool) {
        self.inbox
            .retain(|p| &p.key != key || p.from.iter().any(|&c| spare(c)));
    }

    /// Whether the last message [`receive_from`](Self::receive_from) refused was an update
    /// signed by its key (the signature verified) whose payload does not decode in the
    /// task's codec and model size, or to finite values (`malformed`, `shape`,
    /// `non_finite`): no honest peer signs one, so the connection that delivered it is a
    /// liar or relays one (the peer shuns it; else each resend cost a verification).
    pub fn signed_junk(&self) -> bool {
        self.signed_junk
    }

    /// Counts a message the caller refused for `why` (the peer's own rules: unasked
    /// models, key changes, request rates).
    pub fn reject(&mut self, why: Rejection) -> Rejection {
        self.stats.reject(why)
    }

    /// Whether this model was trained, adopted or started from the seed (a joiner's is
    /// not until then).
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Starts the swarm from the current (seed) weights: the first peer of a task.
    pub fn start(&mut self) {
        self.started = true;
    }

    /// Replaces our part in this round's aggregate. For the simulator's attackers, which
    /// apply their own lies to themselves unless they are stealthy.
    pub fn replace_own(&mut self, delta: Vec<f32>) {
        if delta.len() == self.weights.len() {
            self.own = Some(delta);
            // No longer what the run stands for: its screen says nothing of our copy.
            self.own_run = None;
            self.own_exact = None;
        }
    }

    /// Decodes a payload that must use `codec` (another codec is refused, so that bytes
    /// on the wire stay what the task promises) into a vector of the model's size.
    fn decode_payload(
        &mut self,
        payload: &[u8],
        codec: Compression,
    ) -> Result<Vec<f32>, Rejection> {
        if payload.first() != Some(&codec.tag()) {
            return Err(self.stats.reject(Rejection::Shape));
        }
        compress::decode(payload, self.weights.len()).map_err(|e| {
            self.stats.reject(match e {
                CodecError::NonFinite => Rejection::NonFinite,
                _ => Rejection::Shape,
            })
        })
    }

    /// Weights for gossip averaging go out in fp32 when the task sends fp32 updates and
    /// in int8 otherwise (top-k cannot carry a whole model).
    fn mix_codec(&self) -> Compression {
        match self.cfg.compression {
            Compression::None => Compression::None,
            _ => Compression::Int8 { block: 256 },
        }
    }

    /// The gossip-averaging message for this round: our round-start weights.
    pub fn mix_message(&self) -> Vec<u8> {
        let payload = compress::encode_once(self.mix_codec(), &self.weights);
        PeerMessage::Mix {
            round: self.round,
            payload,
        }
        .encode()
    }

    fn remember(&mut self, key: PublicKey, round: u64, base_only: bool) {
        make_room(&mut self.seen, &key, MAX_REMEMBERED, |s| s.round);
        let s = self.seen.entry(key).or_default();
        s.round = round;
        s.base_only = base_only;
    }

    /// Records whether the screen dropped `key`'s update this round and says whether
    /// the signer is distrusted: screened in at least half of its last (up to
    /// [`SCREEN_HISTORY`]) updates that went through the screen. A distrusted signer's
    /// updates are dropped as outliers even when the screen lets one through. A liar
    /// that keeps lying is screened most rounds but not all (a round with few honest
    /// updates, or where honest models have drifted apart, widens the screen); its
    /// record closes that gap from the first time it is caught. An honest peer is
    /// screened rarely (9 of 4,232 updates in a clean `byzantine-25` run): once in its
    /// last four, it is trusted again after its next clean update (a newcomer screened
    /// on its first update, after two), and in any case four rounds after the last time
    /// it was screened out.
    fn screened(&mut self, key: &PublicKey, dropped: bool) -> bool {
        let round = self.round;
        let Some(s) = self.seen.get_mut(key) else {
            return false;
        };
        s.screened = (s.screened << 1 | u8::from(dropped)) & ((1 << SCREEN_HISTORY) - 1);
        s.judged = (s.judged + 1).min(SCREEN_HISTORY as u8);
        if dropped {
            s.screened_at = round;
        }
        s.distrusted(round)
    }

    /// Closes the round: validates norms, aggregates our update and the held ones with
    /// their staleness weights, applies the outer Nesterov step and advances the round.
    pub fn finish_round(&mut self) -> RoundSummary {
        let mut own = self.own.take();
        let own_run = self.own_run.take();
        let own_exact = self.own_exact.take();
        let mut held = std::mem::take(&mut self.inbox);
        if self.cfg.exchange == Exchange::Weights {
            // A neighbour's weights for a later round wait for that round: they already
            // hold an outer step we have not taken, and pulling toward them now would take
            // it twice (through the momentum, which diverges).
            let later;
            (later, held) = held.into_iter().partition(|p| p.round > self.round);
            self.inbox = later;
            // Held values are neighbours' local weights: from here on, pseudo-gradients
            // relative to our own round-start weights.
            for p in &mut held {
                for (d, w) in p.delta.iter_mut().zip(&self.weights) {
                    *d = w - *d;
                }
            }
        }
        let mut summary = RoundSummary {
            round: self.round,
            ..RoundSummary::default()
        };
        // Each held update is used once: a peer contributes once per round of its own.
        // Weights from a round behind ours are an older model (pulling toward it through
        // the outer momentum is a delayed feedback), so in weights mode only this round's
        // count.
        let window = match self.cfg.exchange {
            Exchange::Delta => u64::from(self.cfg.max_staleness),
            Exchange::Weights => 0,
        };
        held.retain(|p| {
            let fresh = p.round + window >= self.round;
            if !fresh {
                self.stats.reject(Rejection::Stale);
            }
            fresh
        });
        // An update that repeats our own (an echo: what we sent, signed again by another
        // key) is refused: it is no one's work, would earn its signer a receipt, and
        // would add a vote where ours already is (two echoes among three neighbours put
        // our own update at the screen's median and screened the honest ones out).
        // Honest runs from one start are never this close to ours.
        if let Some(d) = own.as_deref() {
            let reference = ECHO_RATIO * aggregate::norm(d);
            held.retain(|p| {
                let echo = aggregate::distance(&p.delta, d) <= reference;
                if echo {
                    self.stats.reject(Rejection::Own);
                    summary.rejected += 1;
                }
                !echo
            });
        }
        // One vote per neighbour: one that hands keys between its connections (each
        // reconnect under a fresh key) gains no update for the round.
        let extra;
        (held, extra) = one_vote_each(held);
        for _ in &extra {
            self.stats.reject(Rejection::ExtraVote);
            summary.rejected += 1;
        }
        let claims: Vec<u32> = own
            .as_ref()
            .map(|_| self.own_samples)
            .into_iter()
            .chain(held.iter().map(|p| p.samples))
            .collect();
        // A receipt vouches for a claim as it counted, in either mode: at most
        // `SAMPLE_SPREAD_UP` times the lower median of the claims (a sender that claimed
        // billions was credited billions where its group was a round's only one counted).
        let vouch_cap = claim_cap(&claims);
        // Rounds in time: each update weighed by its claim (bounded) and, exchanging
        // deltas, scaled to the round's median claim; in steps every weight is 1.
        // Each update's weight is its bounded claim in units of the median claim; scaled,
        // its expected noise relative to a median run, for the screen, `1 / sqrt(weight)`.
        let (own_weight, weights) = if self.cfg.timed() {
            let weigh = sample_weigher(&claims);
            // Only a pseudo-gradient is scaled to a median run. Exchanging weights, a held
            // update is our start minus the sender's weights: its run plus the distance
            // between the two models, which no claim makes longer or shorter (scaled,
            // a slow peer's small drift grew up to four times past the norm bound).
            let scaled = self.cfg.exchange == Exchange::Delta;
            let scale = |d: &mut [f32], samples: u32| {
                let (s, w) = weigh(samples);
                if scaled {
                    d.iter_mut().for_each(|x| *x *= s);
                }
                w
            };
            let own_weight = match own.as_mut() {
                Some(d) => scale(d, self.own_samples),
                None => 1.0,
            };
            let weights: Vec<f32> = held
                .iter_mut()
                .map(|p| scale(&mut p.delta, p.samples))
                .collect();
            (own_weight, weights)
        } else {
            (1.0, vec![1.0; held.len()])
        };
        // One held update alone is no median of held norms (it would bound itself, and a
        // liar heard alone could take the model anywhere): it is clipped to
        // `max_norm_ratio` times our own run's norm. Not refused: our own alone is too
        // strict a reference for an honest neighbour's (see `norm_reference`).
        if let (Some(d), [p]) = (own.as_deref(), held.as_mut_slice())
            && aggregate::norm(&p.delta).is_finite()
        {
            aggregate::clip_norm(&mut p.delta, aggregate::norm(d) * self.cfg.max_norm_ratio);
        }
        let norms: Vec<f32> = held.iter().map(|p| aggregate::norm(&p.delta)).collect();
        // A norm past f32's range (values near f32::MAX, or scaled up to a median run
        // until they overflowed) is refused below and bounds nothing: where such updates
        // were most of those held (a neighbourhood of liars in a partial mesh), their
        // lower median was infinite and no bound held.
        let finite: Vec<f32> = norms.iter().copied().filter(|n| n.is_finite()).collect();
        let ratio = self.cfg.max_norm_ratio;
        let refused_above = norm_reference(own.as_deref(), &finite, 0) * ratio;
        // Each awaited neighbour whose update is not held counts as our own norm: a held
        // update above that bound but within the one of the held alone is scaled down to
        // it, not refused (an honest neighbour's larger update still counts, a round that
        // held few updates no longer lets the few set the bound).
        let missing = std::mem::take(&mut self.awaited)
            .iter()
            .filter(|keys| !held.iter().any(|p| keys.contains(&p.key)))
            .count();
        let bound = norm_reference(own.as_deref(), &finite, missing) * ratio;
        for (p, &norm) in held.iter_mut().zip(&norms) {
            if norm > bound && norm <= refused_above {
                aggregate::clip_norm(&mut p.delta, bound);
            }
        }
        let mut updates: Vec<(&[f32], f32)> = Vec::with_capacity(held.len() + 1);
        let mut noise: Vec<f32> = Vec::with_capacity(held.len() + 1);
        // The median ignores weights: a liar that claims few samples would keep a full
        // vote while its distance is forgiven, so under it every update is judged alike.
        // Unscaled (weights), a shorter run is no noisier than a median one.
        let even =
            self.cfg.aggregation == Aggregation::Median || self.cfg.exchange == Exchange::Weights;
        let noise_of = |w: f32| if even { 1.0 } else { w.sqrt().recip() };
        // The signer of each update; none for our own.
        let mut signers: Vec<Option<PublicKey>> = Vec::with_capacity(held.len() + 1);
        // Which held update each is (none for our own).
        let mut sources: Vec<Option<usize>> = Vec::with_capacity(held.len() + 1);
        if let Some(d) = &own {
            updates.push((d, own_weight));
            noise.push(noise_of(own_weight));
            signers.push(None);
            sources.push(None);
        }
        for (i, ((p, &norm), &weight)) in held.iter().zip(&norms).zip(&weights).enumerate() {
            if !norm.is_finite() || norm > refused_above {
                self.stats.reject(Rejection::Norm);
                summary.rejected += 1;
                continue;
            }
            let late = self.round.saturating_sub(p.round);
            updates.push((&p.delta, weight / (1.0 + late as f32)));
            noise.push(noise_of(weight));
            signers.push(Some(p.key));
            sources.push(Some(i));
            summary.used += 1;
        }
        // Alone in the aggregate (no neighbour's update used this round): our run as it
        // was, not as compressed for neighbours.
        if let ([only], Some(exact), Some(_)) = (updates.as_mut_slice(), &own_exact, &own) {
            only.0 = exact;
        }
        if !updates.is_empty() {
            let mut g = vec![0.0; self.weights.len()];
            let mut dropped = aggregate::screen(self.cfg.aggregation, &updates, &noise, &mut g);
            // Our own update out, where our run would have passed: our copy lags.
            if let Some(run) = own_run
                .as_deref()
                .filter(|_| own.is_some() && dropped.contains(&0))
            {
                let mut instead = updates.clone();
                instead[0].0 = run;
                let mut scratch = vec![0.0; g.len()];
                let again = aggregate::screen(self.cfg.aggregation, &instead, &noise, &mut scratch);
                self.copy_screened = !again.contains(&0);
            }
            let robust = self.cfg.aggregation != Aggregation::Mean;
            let ran = robust && updates.len() >= aggregate::SCREEN_MIN;
            let on_record = ran && updates.len() >= RECORD_MIN;
            for (i, signer) in signers.iter().enumerate() {
                let Some(key) = signer else { continue };
                let out = dropped.contains(&i);
                // Only a screen of `RECORD_MIN` or more updates is on the record; a
                // distrusted signer is dropped either way (with own and one update
                // held, the robust rules would average a lie in).
                let distrusted = if on_record {
                    self.screened(key, out)
                } else {
                    robust && self.distrusts(key)
                };
                if distrusted && !out {
                    dropped.push(i);
                }
            }
            for &i in &dropped {
                // Our own update can be the outlier too; it is not a neighbour's to count.
                if signers[i].is_some() {
                    self.stats.reject(Rejection::Outlier);
                    summary.rejected += 1;
                    summary.used -= 1;
                }
            }
            // A receipt for each neighbour's update that went into the aggregate.
            let flags = if ran { FLAG_ROBUST } else { 0 };
            for (i, source) in sources.iter().enumerate() {
                let Some(h) = *source else { continue };
                if dropped.contains(&i) {
                    continue;
                }
                let p = &held[h];
                let bounded = if p.samples > vouch_cap {
                    FLAG_CLAIM_BOUNDED
                } else {
                    0
                };
                summary.receipts.push(Receipt::sign(
                    &self.id,
                    &self.task,
                    p.round,
                    p.key,
                    p.samples.min(vouch_cap),
                    p.hash,
                    flags | bounded,
                ));
            }
            aggregate::combine(self.cfg.aggregation, &updates, &dropped, &mut g);
            let (lr, mu) = (self.cfg.outer_lr, self.cfg.outer_momentum);
            for ((w, m), g) in self.weights.iter_mut().zip(&mut self.momentum).zip(&g) {
                *m = mu * *m + g;
                *w -= lr * (g + mu * *m);
            }
            summary.step_norm = lr * aggregate::norm(&g);
        }
        self.stats.used += summary.used as u64;
        self.round += 1;
        // Neighbours' round-start weights for the round we now start: of those held, the
        // one nearest our own weights (an honest neighbour's model is a few percent away;
        // a poisoned one has to be farther to do harm, so it loses to any honest one),
        // half of the way, the move clipped to an honest update's norm (a quarter of our
        // weights' norm while there is none to compare with). A liar moves us at most
        // that far, once per `sync_every` rounds. Later rounds' wait; earlier ones are
        // dropped.
        let (now, rest): (Vec<Mix>, Vec<Mix>) = std::mem::take(&mut self.mixes)
            .into_iter()
            .filter(|m| m.round >= self.round)
            .partition(|m| m.round == self.round);
        self.mixes = rest;
        let nearest = now
            .iter()
            .map(|m| (aggregate::distance(&m.weights, &self.weights), m))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((n, m)) = nearest {
            // The pull is at most one honest update's norm (the reference the norm bound
            // is a multiple of), not the bound itself: a poisoned mix may be the only one
            // held, and then it pulls that far.
            let quarter = 0.25 * aggregate::norm(&self.weights);
            let reference = bound / self.cfg.max_norm_ratio;
            let radius = if reference > 0.0 {
                reference.min(quarter)
            } else {
                quarter
            };
            // Half of the way, at most `radius` far.
            let share = if n > 0.0 {
                (0.5 * n).min(radius) / n
            } else {
                0.0
            };
            for (w, t) in self.weights.iter_mut().zip(&m.weights) {
                *w += share * (t - *w);
            }
            summary.mixed = true;
        }
        self.started = true;
        self.stats.rounds += 1;
        let every = self.sync_every();
        summary.sync = (every > 0 && self.round.is_multiple_of(every)).then(|| self.mix_message());
        summary
    }

    /// The current model exactly (kind 3, fp32): what a keeper saves to disk.
    pub fn snapshot(&self) -> Vec<u8> {
        PeerMessage::Model(self.current()).encode()
    }

    /// The current model as a joining or lagging neighbour gets it (kind 10: weights and
    /// momentum in int8, a quarter of [`snapshot`](Self::snapshot)'s bytes). The
    /// receiver starts from weights within int8's rounding of ours (half a block's
    /// largest magnitude / 127); it trains from them, and its copies of our weights
    /// come from our weights changes, so nothing else depends on the rounding.
    pub fn answer_snapshot(&self) -> Vec<u8> {
        PeerMessage::ModelInt8(self.current()).encode()
    }

    fn current(&self) -> Snapshot {
        Snapshot {
            round: self.round,
            weights: self.weights.clone(),
            momentum: self.momentum.clone(),
        }
    }

    /// The answer to an observer: our weights (no momentum: an observer never trains),
    /// whole in fp32 when it holds none of ours (`base` is `None`), else as their change
    /// from `base` — the weights it holds from us, with their [`weights_hash`] — in
    /// block-wise int8. Returns the message
    /// and the weights the observer holds once it has applied it, with their hash: what
    /// the next answer to it is a change from (so what int8 left out this time goes out
    /// the next).
    pub fn observed(&self, base: Option<(&[f32], [u8; 32])>) -> (Vec<u8>, Vec<f32>, [u8; 32]) {
        let n = self.weights.len();
        let (base_hash, payload, result) = match base.filter(|(b, _)| b.len() == n) {
            None => {
                let payload = compress::encode_once(Compression::None, &self.weights);
                ([0; 32], payload, self.weights.clone())
            }
            Some((b, hash)) => {
                let change: Vec<f32> = self.weights.iter().zip(b).map(|(w, b)| w - b).collect();
                let codec = Compression::Int8 { block: 256 };
                let (payload, decoded) = Compressor::new(codec, 0).encode(&change);
                let result: Vec<f32> = b.iter().zip(&decoded).map(|(b, d)| b + d).collect();
                (hash, payload, result)
            }
        };
        let hash = weights_hash(&result);
        let msg = PeerMessage::Observed(Observed {
            round: self.round,
            base: base_hash,
            payload,
            result: hash,
        });
        (msg.encode(), result, hash)
    }

    /// Rebuilds the weights of an [`Observed`] answer from `base`, the weights we hold
    /// from its sender (with their [`weights_hash`]), checking every field: a change from
    /// weights we do not hold is `base`, a payload of the wrong length `shape`, non-finite
    /// values `non_finite`, a result whose hash is not the one announced `malformed`.
    /// The model has no momentum (zeros): an observer never trains.
    pub fn take_observed(
        &mut self,
        o: &Observed,
        base: Option<(&[f32], [u8; 32])>,
    ) -> Result<Snapshot, Rejection> {
        let n = self.weights.len();
        let weights = if o.base == [0; 32] {
            self.decode_payload(&o.payload, Compression::None)?
        } else {
            let Some((b, _)) = base.filter(|(b, h)| *h == o.base && b.len() == n) else {
                return Err(self.stats.reject(Rejection::Base));
            };
            let change = self.decode_payload(&o.payload, Compression::Int8 { block: 256 })?;
            let w: Vec<f32> = b.iter().zip(&change).map(|(b, d)| b + d).collect();
            if !w.iter().all(|x| x.is_finite()) {
                return Err(self.stats.reject(Rejection::NonFinite));
            }
            w
        };
        if weights_hash(&weights) != o.result {
            return Err(self.stats.reject(Rejection::Malformed));
        }
        Ok(Snapshot {
            round: o.round,
            weights,
            momentum: vec![0.0; n],
        })
    }

    /// Replaces our model with a downloaded one whatever its round (an observer's step
    /// back to the swarm's model, see `Peer::step_back`); returns whether it was adopted.
    pub fn adopt_older(&mut self, s: Snapshot) -> bool {
        if s.weights.len() != self.weights.len() {
            return false;
        }
        self.started = false;
        self.adopt(s)
    }

    /// Replaces our model with a downloaded one (already validated by decoding) when it
    /// is newer than ours; returns whether it was adopted. Held updates older than the
    /// new round's window are dropped; the compressor's residual is cleared.
    pub fn adopt(&mut self, s: Snapshot) -> bool {
        if (self.started && s.round <= self.round) || s.weights.len() != self.weights.len() {
            return false;
        }
        self.started = true;
        self.mixes.clear();
        self.round = s.round;
        self.weights = s.weights;
        self.momentum = s.momentum;
        self.own = None;
        self.own_run = None;
        self.own_exact = None;
        self.copy_screened = false;
        self.public = None;
        self.compressor = Compressor::new(self.cfg.compression, self.weights.len());
        let window = u64::from(self.cfg.max_staleness);
        self.inbox.retain(|p| p.round + window >= s.round);
        true
    }
}

/// What one round's aggregation did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundSummary {
    /// The round that closed.
    pub round: u64,
    /// Neighbours' updates used.
    pub used: usize,
    /// Updates refused at aggregation (norm bound).
    pub rejected: usize,
    /// Norm of the outer step.
    pub step_norm: f32,
    /// Whether a neighbour's weights were averaged in.
    pub mixed: bool,
    /// A gossip-averaging message to send to one neighbour (every `sync_every` rounds).
    pub sync: Option<Vec<u8>>,
    /// Receipts this peer signed for the neighbours' updates it used.
    pub receipts: Vec<Receipt>,
}

/// For the sample claims of one round (own and held), a function from a claim to the
/// factor its update is scaled by and its weight: with `rho` the lower median claim and
/// `c` the claim clamped to `[rho / SAMPLE_SPREAD_DOWN, rho * SAMPLE_SPREAD_UP]`, the
/// update is scaled by `rho / c` (to the progress of a median run; the caller applies it
/// only to deltas) and weighs `c / rho`, so that the weighted mean is the sum of the
/// runs' progress over their (bounded) sample counts.
fn sample_weigher(claims: &[u32]) -> impl Fn(u32) -> (f32, f32) {
    let rho = median_claim(claims) as f32;
    move |c: u32| {
        let c = (c.max(1) as f32).clamp(rho / SAMPLE_SPREAD_DOWN, rho * SAMPLE_SPREAD_UP);
        (rho / c, c / rho)
    }
}

/// The lower median of `claims` (1 for none; at least 1).
fn median_claim(claims: &[u32]) -> u32 {
    lower_median_by(&mut claims.to_vec(), u32::cmp)
        .unwrap_or(1)
        .max(1)
}

/// The most samples a receipt vouches for in a round whose claims (our own included)
/// are `claims`: `SAMPLE_SPREAD_UP` times their lower median (at least 1 each).
fn claim_cap(claims: &[u32]) -> u32 {
    (f64::from(median_claim(claims)) * f64::from(SAMPLE_SPREAD_UP)).min(f64::from(u32::MAX)) as u32
}

/// How near a held update may be to our own, relative to our own's norm, before it
/// counts as an echo of it ([`Learner::finish_round`]).
const ECHO_RATIO: f32 = 1e-3;

/// The norm updates are bounded relative to: the larger of our own update's norm and
/// the lower median of the held updates' norms, with our own norm (0 when we have no
/// update this round) in the place of each of the `missing` awaited neighbours' updates
/// not held (with them, a held update above the bound is scaled down to it rather than
/// refused). Our own alone fails where peers'
/// data differ: a peer whose classes the model already fits moves little (plain SGD
/// scales its step with its gradient) and would refuse its neighbours' honest, larger
/// updates, dropping whole classes. The median of the held ones alone could be raised by
/// attackers among few neighbours; while they are fewer than half of the neighbours
/// awaited it stays an honest norm (counting only those held, two liars were the median
/// of a round that held nothing else). One held update alone is no median (it would
/// bound itself): it is clipped before (see [`Learner::finish_round`]).
fn norm_reference(own: Option<&[f32]>, held: &[f32], missing: usize) -> f32 {
    let own = own.map_or(0.0, aggregate::norm);
    let mut norms = held.to_vec();
    norms.extend(std::iter::repeat_n(own, missing));
    own.max(lower_median(&norms))
}

/// The lower median of `values` (of an even count the smaller middle one; 0 for none).
pub(crate) fn lower_median(values: &[f32]) -> f32 {
    lower_median_by(&mut values.to_vec(), f32::total_cmp).unwrap_or(0.0)
}

/// The lower median of `values` in the order `cmp` (of an even count the smaller middle
/// one; none of none), which sorts them in place.
pub(crate) fn lower_median_by<T: Copy>(
    values: &mut [T],
    cmp: impl FnMut(&T, &T) -> std::cmp::Ordering,
) -> Option<T> {
    values.sort_unstable_by(cmp);
    values.get(values.len().saturating_sub(1) / 2).copied()
}

/// Before `key` goes into `map`, which holds at most `cap` entries: drops the entry with
/// the lowest `order` when `key` is new and the map is full.
fn make_room<V>(
    map: &mut HashMap<PublicKey, V>,
    key: &PublicKey,
    cap: usize,
    order: impl Fn(&V) -> u64,
) {
    if map.len() >= cap && !map.contains_key(key) {
        let oldest = map.iter().min_by_key(|(_, v)| order(v)).map(|(k, _)| *k);
        if let Some(k) = oldest {
            map.remove(&k);
        }
    }
}

fn check_finite(v: &[f32]) -> Result<(), String> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(format!("value {i} is {}", v[i])),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;

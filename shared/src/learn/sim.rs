//! An in-process swarm: every peer is the shipped [`Peer`] state machine (the code the
//! native peer and the browser worker drive), over simulated links (latency, jitter,
//! loss, uplink bandwidth) instead of WebRTC, deterministic from a seed. Peers train for
//! real (CPU backend) on their shard of the data when their `Peer` asks for it; time is
//! virtual: local training takes `samples / speed` seconds and a message arrives after
//! its serialization on the sender's uplink (one queue per peer, in order; a peer that
//! leaves takes what it had not yet sent with it) plus latency. Attackers run the same `Peer`
//! and lie in what they send (every message kind: updates, model answers, unasked models,
//! round claims, gossip mixes), optionally together and under fresh identities.
//!
//! A scenario (TOML, see `scenarios/` at the repository root) scripts the swarm: peers,
//! rounds, data split, learning settings, network, churn and attackers.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::future::Future;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use serde::{Deserialize, Serialize};

use super::peer::{Event, Output, Peer, PeerRole};
use super::{
    Compressor, Exchange, Identity, LearnConfig, PeerMessage, PublicKey, Rejection, Snapshot,
    Update,
};
use crate::engine::cpu::CpuBackend;
use crate::engine::train::Samples;
use crate::engine::{Backend, Model, ModelSpec, Optimizer};
use crate::protocol::PeerId;
use crate::rng::SplitMix64;
use crate::task::InnerOptimizer;

/// A scripted swarm.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in reports.
    pub name: String,
    /// Seed of everything random: data split, initial weights, speeds, links, churn.
    pub seed: u64,
    /// Peers online at any time (1 to 500).
    pub peers: usize,
    /// The run ends when the swarm's mean round reaches this.
    pub rounds: u64,
    /// Held-out accuracy the report measures samples and bytes to (image tasks:
    /// required there, in (0, 1]).
    #[serde(default)]
    pub target: f32,
    /// Held-out loss in bits per byte the report measures samples and bytes to (text
    /// tasks: a model whose last layer is an `lm_head`).
    #[serde(default)]
    pub target_bits_per_byte: Option<f32>,
    /// A task of the repository's `tasks/` folder whose data (and model, unless `model`
    /// is given) the scenario trains on, instead of the demo digits. The driver (`cargo
    /// xtask sim`) loads it; the scenario's own `train` and `learn` settings apply.
    #[serde(default)]
    pub task: Option<String>,
    /// The model, in a task file's `[model]` syntax; replaces `train.model` and the
    /// task's model.
    #[serde(default)]
    pub model: Option<ModelSpec>,
    /// Evaluate every this many swarm rounds (1: every round).
    #[serde(default = "one")]
    pub eval_every: u64,
    /// How the training data is spread over peers.
    #[serde(default)]
    pub data: DataSplit,
    /// The task's learning settings.
    pub learn: LearnConfig,
    /// Local training.
    pub train: TrainSettings,
    /// Links and compute.
    #[serde(default)]
    pub network: NetworkSettings,
    /// Peers replaced per round.
    #[serde(default)]
    pub churn: ChurnSettings,
    /// Malicious peers.
    #[serde(default)]
    pub attack: AttackSettings,
    /// Differential privacy, as a task's `[privacy]` table: every honest peer clips and
    /// noises its updates (attackers do not).
    #[serde(default)]
    pub privacy: crate::privacy::PrivacySpec,
}

/// How the training data is spread over peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSplit {
    /// A random equal share each.
    #[default]
    Iid,
    /// Every peer samples the whole set (as the demo task's real peers do: each
    /// downloads all 8,000 digits).
    Full,
    /// Each peer sees only `classes` of the labels (consecutive, wrapping).
    LabelSkew {
        /// Classes per peer.
        classes: usize,
    },
}

/// Local training settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Samples per inner step.
    pub batch: usize,
    /// Inner Adam learning rate.
    pub lr: f32,
    /// Random shift augmentation in pixels.
    #[serde(default)]
    pub shift: usize,
    /// Rounds of the inner learning rate's half-cosine decay (0: constant), as in a
    /// task's `train.lr_decay_rounds`.
    #[serde(default)]
    pub lr_decay_rounds: u64,
    /// `"mlp"` or `"cnn"` (the demo models).
    #[serde(default = "default_model")]
    pub model: String,
    /// The inner optimizer, as in a task's `train.optimizer` (default Adam).
    #[serde(default)]
    pub optimizer: InnerOptimizer,
    /// SGD's momentum, as in a task's `train.momentum`.
    #[serde(default)]
    pub momentum: f32,
    /// AdamW's decoupled weight decay, as in a task's `train.weight_decay`.
    #[serde(default)]
    pub weight_decay: Option<f32>,
    /// AdamW's global-norm gradient clipping, as in a task's `train.clip`.
    #[serde(default)]
    pub clip: Option<f32>,
}

impl TrainSettings {
    /// The inner optimizer at the base learning rate, or the field that is wrong.
    fn optimizer(&self) -> Result<Optimizer, String> {
        self.optimizer
            .build_with(self.lr, self.momentum, self.weight_decay, self.clip)
            .map_err(|(field, problem)| format!("{field}: {problem}"))
    }
}

fn one() -> u64 {
    1
}

fn default_model() -> String {
    "mlp".into()
}

/// Simulated links and compute.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSettings {
    /// One-way latency in milliseconds.
    pub latency_ms: f64,
    /// Uniform extra latency up to this, per message.
    pub jitter_ms: f64,
    /// Each peer's uplink in megabits per second.
    pub uplink_mbps: f64,
    /// Instead, a range: each peer draws its uplink log-uniformly from it (home links
    /// span 1 to 20 Mbit/s and more).
    pub uplinks_mbps: Option<[f64; 2]>,
    /// Probability that a message needs a retransmission (the channels are reliable:
    /// loss costs time, not data).
    pub loss: f64,
    /// Training speed range in samples per second; each peer draws one.
    pub samples_per_s: [f64; 2],
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            latency_ms: 40.0,
            jitter_ms: 20.0,
            uplink_mbps: 20.0,
            uplinks_mbps: None,
            loss: 0.01,
            samples_per_s: [2_000.0, 8_000.0],
        }
    }
}

/// Churn.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChurnSettings {
    /// Share of peers that leave (and as many new ones that join) each swarm round.
    pub per_round: f32,
    /// A leaver's neighbours learn that it is gone only this long after it went (0: at
    /// once, as when its page closes). A browser that loses its network ends its
    /// connections without a word; the other side notices when ICE's consent checks
    /// fail, about 30 s later in Chromium.
    pub silent_ms: f64,
}

/// Attackers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttackSettings {
    /// Share of peer slots held by attackers.
    pub fraction: f32,
    /// What they send.
    pub kind: AttackKind,
    /// Strength: multiple of an honest update's norm.
    pub scale: f32,
    /// The attackers lie to their neighbours only and keep their own models as honest
    /// peers would (their part in their own aggregate is their honest update): they stay
    /// in step with the swarm and every lie stays `scale` times an honest update. Without
    /// this an attacker applies its lie to itself too; its model drifts away and its
    /// later lies grow until the norm bound refuses them, which flatters the defence.
    pub stealthy: bool,
    /// Lies in the other message kinds, on top of the update lie (`kind`).
    pub also: Vec<MessageAttack>,
    /// The attackers' poisoned models are one and the same (they agree with each other,
    /// as colluders would), instead of each its own.
    pub collude: bool,
    /// Every this many swarm rounds each attacker leaves and comes back under a fresh
    /// key, as a newcomer (0: never). Sybils hope to be asked for the model first.
    pub sybil_every: u64,
}

/// A lie in a message other than the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageAttack {
    /// Answer every model request with a poisoned model of the attacker's round.
    PoisonAnswers,
    /// After every round, send each neighbour a poisoned model with a round a million
    /// ahead, unasked.
    UnaskedModels,
    /// Half of the attackers (every second one) sign their updates for a round a million
    /// ahead of theirs, to make neighbours think they lag.
    FarAhead,
    /// Every round, send each neighbour a gossip mix of poisoned weights, just inside
    /// the distance a receiver accepts.
    PoisonMix,
    /// Every round, sign a receipt for each fellow attacker among its neighbours,
    /// claiming ten times a round's samples, whether or not it used anything (sybils
    /// vouching for each other in the ledger).
    Vouch,
    /// Claim ten times the samples trained in every update (signed as such).
    Inflate,
    /// Every round, submit again every receipt a neighbour ever sent it (the ledger
    /// refuses a second receipt for the same round of the same pair).
    ReplayReceipts,
}

/// What an attacker sends instead of its honest update (always validly signed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// The honest update negated and scaled.
    #[default]
    SignFlip,
    /// The honest update scaled up.
    Scaled,
    /// Gaussian noise of `scale` times the honest norm.
    Noise,
    /// A payload holding NaN.
    Nan,
    /// Its first update, sent again every round.
    Replay,
}

impl Scenario {
    /// Parses a scenario file and checks it.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let s: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every field, naming the field and the problem.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=500).contains(&self.peers) {
            return Err(format!("peers: {} outside 1..=500", self.peers));
        }
        if !(1..=100_000).contains(&self.rounds) {
            return Err(format!("rounds: {} outside 1..=100000", self.rounds));
        }
        self.learn.validate().map_err(|e| format!("learn.{e}"))?;
        self.privacy
            .validate()
            .map_err(|(f, e)| format!("{f}: {e}"))?;
        if self.train.batch == 0 || self.train.batch > 4096 {
            return Err(format!(
                "train.batch: {} outside 1..=4096",
                self.train.batch
            ));
        }
        self.train
            .optimizer()?
            .validate()
            .map_err(|_| format!("train.lr: {} is not a learning rate", self.train.lr))?;
        if let DataSplit::LabelSkew { classes } = self.data
            && !(1..=10).contains(&classes)
        {
            return Err(format!("data.classes: {classes} outside 1..=10"));
        }
        let n = &self.network;
        let [lo, hi] = n.samples_per_s;
        if !(n.latency_ms >= 0.0
            && n.jitter_ms >= 0.0
            && n.uplink_mbps > 0.0
            && n.uplinks_mbps.is_none_or(|[a, b]| a > 0.0 && b >= a)
            && (0.0..1.0).contains(&n.loss)
            && lo > 0.0
            && hi >= lo)
        {
            return Err("network: latency/jitter >= 0, uplink > 0, loss in [0, 1), 0 < samples_per_s[0] <= [1]".into());
        }
        if !(0.0..=0.9).contains(&self.churn.per_round) {
            return Err(format!(
                "churn.per_round: {} outside [0, 0.9]",
                self.churn.per_round
            ));
        }
        if !(0.0..=600_000.0).contains(&self.churn.silent_ms) {
            return Err(format!(
                "churn.silent_ms: {} outside [0, 600000]",
                self.churn.silent_ms
            ));
        }
        if self.attack.sybil_every > 100_000 {
            return Err(format!(
                "attack.sybil_every: {} above 100000",
                self.attack.sybil_every
            ));
        }
        if !(0.0..0.5).contains(&self.attack.fraction) {
            return Err(format!(
                "attack.fraction: {} outside [0, 0.5)",
                self.attack.fraction
            ));
        }
        // A task's model is checked once the driver has loaded it.
        if self.task.is_none() || self.model.is_some() {
            self.validate_model()?;
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), String> {
        let model = Model::new(self.model_spec()?).map_err(|e| format!("model: {e}"))?;
        match (model.is_language_model(), self.target_bits_per_byte) {
            (true, Some(t)) if t > 0.0 && t < 8.0 => {}
            (true, Some(t)) => return Err(format!("target_bits_per_byte: {t} outside (0, 8)")),
            (true, None) => {
                return Err("a language model's target is target_bits_per_byte".into());
            }
            (false, Some(_)) => {
                return Err("target_bits_per_byte: only for a language model".into());
            }
            (false, None) if self.target > 0.0 && self.target <= 1.0 => {}
            (false, None) => {
                return Err(format!(
                    "target: {} outside (0, 1] (an image model's target accuracy)",
                    self.target
                ));
            }
        }
        if model.is_language_model() && self.train.shift > 0 {
            return Err("train.shift: shifts images, not text".into());
        }
        if let DataSplit::LabelSkew { .. } = self.data
            && model.is_language_model()
        {
            return Err("data: label_skew splits images by class, not text".into());
        }
        Ok(())
    }

    /// The model the peers train.
    pub fn model_spec(&self) -> Result<ModelSpec, String> {
        if let Some(m) = &self.model {
            return Ok(m.clone());
        }
        match self.train.model.as_str() {
            "mlp" => Ok(ModelSpec::mlp_digits()),
            "cnn" => Ok(ModelSpec::cnn_digits()),
            other => Err(format!("train.model: unknown model {other:?} (mlp, cnn)")),
        }
    }
}

/// The swarm's state after one swarm round (as many rounds closed as the swarm has peers).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Swarm round.
    pub round: u64,
    /// Virtual time in seconds.
    pub time_s: f64,
    /// Samples trained on by honest peers so far.
    pub samples: u64,
    /// Mean held-out accuracy of a few honest peers' current models (per next byte for
    /// a language model).
    pub accuracy: f32,
    /// A language model's mean held-out loss in bits per byte over the same models.
    pub bits_per_byte: Option<f32>,
    /// Mean local training loss of the round's updates.
    pub loss: f32,
    /// Bytes sent per peer slot so far (mean).
    pub bytes_per_peer: f64,
    /// Peers online and holding a model.
    pub live: usize,
    /// How far apart honest peers' models are: the root-mean-square distance of their
    /// weights from the mean of their weights, relative to that mean's norm.
    pub disagreement: f32,
    /// Utilization so far: the honest peers' time training over their time online (all
    /// their lives, departed ones included).
    pub utilization: f64,
}

/// What a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub name: String,
    /// One row per swarm round.
    pub rows: Vec<Row>,
    /// Honest samples when the target accuracy was first reached (as a mean of three
    /// consecutive rounds).
    pub samples_to_target: Option<u64>,
    /// Bytes per peer when the target was first reached.
    pub bytes_to_target: Option<f64>,
    /// Rejected messages by reason, over all peers.
    pub rejected: BTreeMap<String, u64>,
    /// Spread of model versions among live peers at the end (max - min round).
    pub version_spread: u64,
    /// Models honest peers adopted from downloads (joining, lagging).
    pub adopted: u64,
    /// Of those, models far from every other honest peer's (farther from their mean
    /// than half its norm): a poisoned model got through.
    pub poisoned_adoptions: u64,
    /// Virtual seconds until the target was first reached.
    pub time_to_target_s: Option<f64>,
    /// Utilization over the whole run (time training / time online, honest peers).
    pub utilization: f64,
    /// Each honest peer online at the end that has been online for a tenth of the run or
    /// more (one that joined a moment ago has trained for none of its time yet): its
    /// speed (samples/s) and utilization.
    pub utilization_by_peer: Vec<(f64, f64)>,
    /// Every receipt a peer signed, in order, with the virtual time (ms) it was signed at
    /// and how many neighbours its sender had: what a server would append to the task's
    /// ledger ([`Report::ledger`]; `cargo xtask sim` writes it).
    #[serde(skip)]
    pub receipts: Vec<(u64, u8, Vec<u8>)>,
    /// How many of those the attackers submitted again (`replay_receipts`).
    pub replayed: usize,
    /// Every key that trained: the samples it trained on and whether it attacked.
    #[serde(skip)]
    pub trained: BTreeMap<PublicKey, (u64, bool)>,
}

/// How the credits of a run's ledger compare with what the peers really trained.
#[derive(Clone, Debug, Serialize)]
pub struct CreditStudy {
    /// Receipts in the ledger.
    pub receipts: usize,
    /// Honest keys' credits over the samples they trained on.
    pub honest_ratio: f64,
    /// The lowest and highest of that ratio over honest keys that trained for at least a
    /// tenth of the run's mean.
    pub honest_range: (f64, f64),
    /// Attackers' share of all credit.
    pub attacker_share: f64,
    /// Attackers' credits over the samples they trained on.
    pub attacker_ratio: f64,
}

impl Report {
    /// Writes the run's receipts to `dir/{name}.ledger` with the server's code (a fresh
    /// file; any old one is replaced) and returns its entries.
    pub fn ledger(
        &self,
        dir: &std::path::Path,
    ) -> std::io::Result<Vec<crate::trust::ledger::Entry>> {
        let path = dir.join(format!("{}.ledger", self.name));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let (mut ledger, _) = crate::trust::ledger::LedgerFile::open(dir, &self.name, 0)?;
        for (ms, links, bytes) in &self.receipts {
            match ledger.append(*ms, *links, "", bytes) {
                // A receipt the server would refuse (a replay) is refused here too.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                other => {
                    other?;
                }
            }
        }
        Ok(ledger.entries().to_vec())
    }

    /// The credits of `entries` (this run's ledger) against what each key trained.
    pub fn credit_study(&self, entries: &[crate::trust::ledger::Entry]) -> CreditStudy {
        let credits = crate::trust::credits::compute(entries);
        let credit_of = |k: &PublicKey| {
            credits
                .by_key
                .iter()
                .find(|c| &c.key == k)
                .map_or(0, |c| c.credit)
        };
        let total: u64 = credits.by_key.iter().map(|c| c.credit).sum();
        let (mut hc, mut hs, mut ac, mut asamples) = (0u64, 0u64, 0u64, 0u64);
        let mean = self.trained.values().map(|t| t.0).sum::<u64>() as f64
            / self.trained.len().max(1) as f64;
        let mut range = (f64::INFINITY, 0.0f64);
        for (k, &(samples, attacker)) in &self.trained {
            let c = credit_of(k);
            if attacker {
                ac += c;
                asamples += samples;
            } else {
                hc += c;
                hs += samples;
                if samples as f64 >= 0.1 * mean {
                    let r = c as f64 / samples as f64;
                    range = (range.0.min(r), range.1.max(r));
                }
            }
        }
        let ratio = |c: u64, s: u64| if s == 0 { 0.0 } else { c as f64 / s as f64 };
        CreditStudy {
            receipts: entries.len(),
            honest_ratio: ratio(hc, hs),
            honest_range: if range.0.is_finite() {
                range
            } else {
                (0.0, 0.0)
            },
            attacker_share: ratio(ac, total),
            attacker_ratio: ratio(ac, asamples),
        }
    }
}

/// Accuracy at one privacy level ([`privacy_sweep`]).
#[derive(Clone, Debug, Serialize)]
pub struct PrivacyPoint {
    /// Target epsilon (`None`: no differential privacy).
    pub epsilon: Option<f64>,
    /// The noise multiplier that meets it over the scenario's rounds.
    pub noise_multiplier: Option<f64>,
    /// Held-out accuracy at the end.
    pub final_accuracy: f32,
    /// Best held-out accuracy of any evaluated round.
    pub best_accuracy: f32,
}

/// Runs `sc` with differential privacy at each target epsilon (the scenario's `clip`
/// and `delta`, a budget of its `rounds`), then without: accuracy against epsilon.
pub fn privacy_sweep(
    sc: &Scenario,
    train: &Samples,
    test: &Samples,
    epsilons: &[f64],
) -> Result<Vec<PrivacyPoint>, String> {
    let mut out = Vec::new();
    for eps in epsilons.iter().map(|e| Some(*e)).chain([None]) {
        let mut s = sc.clone();
        s.privacy = match eps {
            Some(e) => crate::privacy::PrivacySpec {
                epsilon: Some(e),
                noise_multiplier: None,
                rounds: Some(sc.rounds),
                ..sc.privacy.clone()
            },
            None => crate::privacy::PrivacySpec::default(),
        };
        let dp = s.privacy.resolve().map_err(|(f, e)| format!("{f}: {e}"))?;
        let report = run(&s, train, test)?;
        out.push(PrivacyPoint {
            epsilon: eps,
            noise_multiplier: dp.map(|d| d.noise_multiplier),
            final_accuracy: report.final_accuracy(),
            best_accuracy: report.rows.iter().map(|r| r.accuracy).fold(0.0, f32::max),
        });
    }
    Ok(out)
}

impl Report {
    /// Accuracy of the last row.
    pub fn final_accuracy(&self) -> f32 {
        self.rows.last().map_or(0.0, |r| r.accuracy)
    }

    /// Bytes per peer at the end.
    pub fn final_bytes_per_peer(&self) -> f64 {
        self.rows.last().map_or(0.0, |r| r.bytes_per_peer)
    }

    /// Rejections counted for `why`.
    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected.get(why.as_str()).copied().unwrap_or(0)
    }
}

impl Scenario {
    /// The same scenario with its attackers honest (the baseline an attack is measured
    /// against).
    pub fn clean(&self) -> Self {
        let mut c = self.clone();
        c.attack = AttackSettings::default();
        c
    }
}

/// The round offset of the attackers' far-ahead claims and unasked models.
const FAR: u64 = 1_000_000;

struct SimPeer {
    epoch: u64,
    id: Identity,
    peer: Peer,
    backend: CpuBackend,
    rng: SplitMix64,
    order: Vec<usize>,
    cursor: usize,
    speed: f64,
    attacker: bool,
    /// The index among the attackers (every second one claims far-ahead rounds).
    attacker_index: usize,
    /// The forged update for the round being sent (attackers).
    lie: Option<Vec<u8>>,
    /// A non-stealthy attacker's lie as its own part in its aggregate.
    own_lie: Option<Vec<f32>>,
    /// The first update an attacker sent (the replay attack).
    first_update: Option<Vec<u8>>,
    /// The receipts its neighbours sent it (an attacker's, for the receipt replay).
    got_receipts: Vec<Vec<u8>>,
    /// The time a wake-up is scheduled for, if any.
    wake_at: Option<u64>,
    /// When this life of the slot began (virtual microseconds).
    born: u64,
    /// Virtual time spent training, including the training under way.
    busy: u64,
    /// When the training under way ends.
    busy_until: u64,
}

impl SimPeer {
    /// Time spent training up to `t` (what is under way counts up to `t`).
    fn busy_at(&self, t: u64) -> u64 {
        self.busy - self.busy_until.saturating_sub(t)
    }
}

enum Ev {
    Wake(usize, u64),
    TrainDone {
        slot: usize,
        epoch: u64,
        round: u64,
        local: Vec<f32>,
        loss: f32,
        samples: u32,
    },
    Deliver {
        to: usize,
        epoch: u64,
        from: usize,
        from_epoch: u64,
        bytes: Rc<Vec<u8>>,
    },
    /// `to` notices that the connection to `gone` ended.
    Down {
        to: usize,
        epoch: u64,
        gone: PeerId,
    },
}

struct Scheduled {
    t: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.t, o.seq).cmp(&(self.t, self.seq))
    }
}

/// Runs the CPU backend's futures, which are ready at once.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("CPU backend futures complete immediately"),
    }
}

struct Sim<'a> {
    sc: &'a Scenario,
    train: &'a Samples,
    model: Model,
    init: Vec<f32>,
    rng: SplitMix64,
    peers: Vec<Option<SimPeer>>,
    links: Vec<BTreeSet<usize>>,
    shards: Vec<Vec<usize>>,
    uplink_free: Vec<u64>,
    /// Each slot's uplink in megabits per second.
    uplink_mbps: Vec<f64>,
    sent: Vec<u64>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    t: u64,
    samples: u64,
    rounds_done: u64,
    swarm_round: u64,
    round_losses: Vec<f32>,
    /// Counters of peers that have left.
    rejected: BTreeMap<String, u64>,
    adopted: u64,
    poisoned: u64,
    receipts: Vec<(u64, u8, Vec<u8>)>,
    /// Receipts the attackers submitted again (`replay_receipts`).
    replayed: usize,
    trained: BTreeMap<PublicKey, (u64, bool)>,
    eval: CpuBackend,
    /// The held-out samples evaluated (a language model's: a spread subset of windows).
    held_out: Samples,
    rows: Vec<Row>,
    /// Training time and time online of honest peers that have left.
    departed: (u64, u64),
}

const US: f64 = 1e6;

/// Runs a scenario on `train`, measuring held-out accuracy on `test`.
pub fn run(sc: &Scenario, train: &Samples, test: &Samples) -> Result<Report, String> {
    sc.validate()?;
    let model = Model::new(sc.model_spec()?).map_err(|e| e.to_string())?;
    let init = model.init_params(sc.seed);
    let eval = CpuBackend::new(model.clone(), Optimizer::adam(1e-3), init.clone())
        .map_err(|e| e.to_string())?;
    let mut sim = Sim {
        sc,
        train,
        model,
        init,
        rng: SplitMix64::new(sc.seed ^ 0x5eed),
        peers: (0..sc.peers).map(|_| None).collect(),
        links: vec![BTreeSet::new(); sc.peers],
        shards: split(train, sc),
        uplink_free: vec![0; sc.peers],
        uplink_mbps: {
            let mut rng = SplitMix64::new(sc.seed ^ 0x00f1_ce5e);
            (0..sc.peers)
                .map(|_| match sc.network.uplinks_mbps {
                    Some([lo, hi]) => lo * (hi / lo).powf(f64::from(rng.unit_f32())),
                    None => sc.network.uplink_mbps,
                })
                .collect()
        },
        sent: vec![0; sc.peers],
        queue: BinaryHeap::new(),
        seq: 0,
        t: 0,
        samples: 0,
        rounds_done: 0,
        swarm_round: 0,
        round_losses: Vec::new(),
        rejected: BTreeMap::new(),
        adopted: 0,
        receipts: Vec::new(),
        replayed: 0,
        trained: BTreeMap::new(),
        poisoned: 0,
        eval,
        // The subset real peers evaluate after each round.
        held_out: test.round_eval_subset(),
        rows: Vec::new(),
        departed: (0, 0),
    };
    sim.start()?;
    while let Some(s) = sim.queue.pop() {
        sim.t = s.t;
        sim.handle(s.ev)?;
        if sim.swarm_round >= sc.rounds {
            break;
        }
    }
    Ok(sim.report())
}

/// Each slot's training indices.
fn split(train: &Samples, sc: &Scenario) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(sc.seed ^ 0xda7a);
    let mut idx: Vec<usize> = (0..train.len()).collect();
    rng.shuffle(&mut idx);
    let n = sc.peers;
    match sc.data {
        DataSplit::Iid => (0..n)
            .map(|s| idx[s * idx.len() / n..(s + 1) * idx.len() / n].to_vec())
            .collect(),
        DataSplit::Full => vec![idx; n],
        DataSplit::LabelSkew { classes } => {
            // Slot s holds classes s*c .. s*c+c (mod 10); each class's samples are dealt
            // round-robin to the slots that hold it.
            let holders: Vec<Vec<usize>> = (0..10)
                .map(|c| {
                    (0..n)
                        .filter(|s| (0..classes).any(|j| (s * classes + j) % 10 == c))
                        .collect()
                })
                .collect();
            let mut shards = vec![Vec::new(); n];
            let mut next = [0usize; 10];
            for i in idx {
                let c = usize::from(train.labels[i]);
                let h = &holders[c];
                if h.is_empty() {
                    continue;
                }
                shards[h[next[c] % h.len()]].push(i);
                next[c] += 1;
            }
            shards
        }
    }
}

/// The transport's name for a slot's peer in one of its lives.
fn peer_id(slot: usize, epoch: u64) -> PeerId {
    PeerId(((slot as u64) << 32) | (epoch & 0xffff_ffff))
}

fn slot_of(p: PeerId) -> usize {
    (p.0 >> 32) as usize
}

impl Sim<'_> {
    fn at(&mut self, delay_s: f64, ev: Ev) {
        self.at_us(self.t + (delay_s * US).round() as u64, ev);
    }

    fn at_us(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            t,
            seq: self.seq,
            ev,
        });
    }

    fn now_ms(&self) -> f64 {
        self.t as f64 / 1e3
    }

    fn attackers(&self) -> usize {
        (self.sc.attack.fraction * self.sc.peers as f32).round() as usize
    }

    fn is_attacker(&self, slot: usize) -> bool {
        // The last slots are the attackers' (the split gives them ordinary shards).
        slot >= self.sc.peers - self.attackers()
    }

    fn new_peer(&mut self, slot: usize, epoch: u64) -> Result<SimPeer, String> {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.sc.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&(slot as u64).to_le_bytes());
        seed[16..24].copy_from_slice(&epoch.to_le_bytes());
        let id = Identity::from_seed(seed);
        let mut peer = Peer::new(
            self.sc.learn.clone(),
            &self.sc.name,
            id.clone(),
            self.init.clone(),
            PeerRole::Trainer,
            self.now_ms(),
        )
        .map_err(|e| e.to_string())?;
        if let Some(dp) = self
            .sc
            .privacy
            .resolve()
            .map_err(|(f, e)| format!("{f}: {e}"))?
            && !self.is_attacker(slot)
        {
            let key = crate::privacy::simulated_noise_key(self.sc.seed ^ epoch, slot);
            peer.learner_mut().enable_privacy(dp, key, 0);
        }
        let backend = CpuBackend::new(
            self.model.clone(),
            self.sc.train.optimizer()?,
            self.init.clone(),
        )
        .map_err(|e| e.to_string())?;
        let [lo, hi] = self.sc.network.samples_per_s;
        let speed = lo + (hi - lo) * f64::from(self.rng.unit_f32());
        let attacker = self.is_attacker(slot);
        Ok(SimPeer {
            epoch,
            id,
            peer,
            backend,
            rng: SplitMix64::new(self.sc.seed ^ (slot as u64) << 20 ^ epoch),
            order: self.shards[slot].clone(),
            cursor: usize::MAX,
            speed,
            attacker,
            attacker_index: slot.saturating_sub(self.sc.peers - self.attackers()),
            lie: None,
            own_lie: None,
            first_update: None,
            got_receipts: Vec::new(),
            wake_at: None,
            born: self.t,
            busy: 0,
            busy_until: 0,
        })
    }

    /// Every peer starts from the task's seed at round 0, linked at random.
    fn start(&mut self) -> Result<(), String> {
        for slot in 0..self.sc.peers {
            let mut p = self.new_peer(slot, 0)?;
            p.peer.resume(Snapshot {
                round: 0,
                weights: self.init.clone(),
                momentum: vec![0.0; self.init.len()],
            });
            self.peers[slot] = Some(p);
        }
        for slot in 0..self.sc.peers {
            self.link(slot);
        }
        for slot in 0..self.sc.peers {
            self.drive(slot)?;
        }
        Ok(())
    }

    /// Links `slot` to random live peers until it has k neighbours, never giving any
    /// peer more than 2k (the signaling server's rule); both sides see the channel open.
    fn link(&mut self, slot: usize) {
        let k = self.sc.learn.neighbours.min(self.sc.peers - 1);
        let mut candidates: Vec<usize> = (0..self.sc.peers)
            .filter(|&o| {
                o != slot
                    && self.peers[o].is_some()
                    && !self.links[slot].contains(&o)
                    && self.links[o].len() < 2 * k
            })
            .collect();
        self.rng.shuffle(&mut candidates);
        let now = self.now_ms();
        for o in candidates {
            if self.links[slot].len() >= k {
                break;
            }
            self.links[slot].insert(o);
            self.links[o].insert(slot);
            let (a, b) = (self.id_of(slot), self.id_of(o));
            if let (Some(a), Some(b)) = (a, b) {
                self.peer_mut(slot).handle(Event::Up(b), now);
                self.peer_mut(o).handle(Event::Up(a), now);
            }
        }
    }

    fn id_of(&self, slot: usize) -> Option<PeerId> {
        self.peers[slot].as_ref().map(|p| peer_id(slot, p.epoch))
    }

    fn peer_ref(&self, slot: usize) -> &Peer {
        &self.peers[slot].as_ref().expect("alive").peer
    }

    fn peer_mut(&mut self, slot: usize) -> &mut Peer {
        &mut self.peers[slot].as_mut().expect("alive").peer
    }

    fn alive(&self, slot: usize, epoch: u64) -> bool {
        self.peers[slot].as_ref().is_some_and(|p| p.epoch == epoch)
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Wake(slot, epoch) if self.alive(slot, epoch) => {
                let p = self.peers[slot].as_mut().expect("alive");
                if p.wake_at == Some(self.t) {
                    p.wake_at = None;
                }
                self.drive(slot)
            }
            Ev::TrainDone {
                slot,
                epoch,
                round,
                local,
                loss,
                samples,
            } if self.alive(slot, epoch) => {
                let now = self.now_ms();
                let key = self.peers[slot].as_ref().expect("alive").id.public();
                let attacker = self.is_attacker(slot);
                self.trained.entry(key).or_insert((0, attacker)).0 += u64::from(samples);
                if attacker {
                    self.forge(slot, &local, samples);
                } else {
                    self.samples += u64::from(samples);
                    self.round_losses.push(loss);
                }
                let p = self.peers[slot].as_mut().expect("alive");
                p.peer
                    .trained(round, &local, loss, samples, now)
                    .map_err(|e| e.to_string())?;
                if let Some(own) = p.own_lie.take() {
                    // A non-stealthy attacker's part in its own aggregate is its lie.
                    p.peer.learner_mut().replace_own(own);
                }
                self.drive(slot)
            }
            Ev::Deliver {
                to,
                epoch,
                from,
                from_epoch,
                bytes,
            } if self.alive(to, epoch)
                && self.alive(from, from_epoch)
                && self.links[to].contains(&from) =>
            {
                let now = self.now_ms();
                let data = bytes.as_ref().clone();
                if self.is_attacker(to)
                    && self.sc.attack.also.contains(&MessageAttack::ReplayReceipts)
                    && let Ok(PeerMessage::Receipt(r)) = PeerMessage::decode(&data, self.init.len())
                {
                    self.peers[to].as_mut().expect("alive").got_receipts.push(r);
                }
                self.peer_mut(to).handle(
                    Event::Message {
                        from: peer_id(from, from_epoch),
                        data,
                    },
                    now,
                );
                self.drive(to)
            }
            Ev::Down { to, epoch, gone } if self.alive(to, epoch) => {
                let now = self.now_ms();
                self.peer_mut(to).handle(Event::Down(gone), now);
                self.drive(to)
            }
            _ => Ok(()), // for a peer (or a channel) that is gone
        }
    }

    /// Carries out what a peer asks for until it asks nothing more, then schedules its
    /// next wake-up.
    fn drive(&mut self, slot: usize) -> Result<(), String> {
        let now = self.now_ms();
        loop {
            let mut outs = Vec::new();
            {
                let p = self.peer_mut(slot);
                while let Some(o) = p.poll_output() {
                    outs.push(o);
                }
                if outs.is_empty() {
                    p.tick(now);
                    while let Some(o) = p.poll_output() {
                        outs.push(o);
                    }
                }
            }
            if outs.is_empty() {
                break;
            }
            for o in outs {
                self.act(slot, o)?;
                if self.peers[slot].is_none() {
                    return Ok(()); // replaced by churn while acting
                }
            }
        }
        let p = self.peers[slot].as_mut().expect("alive");
        if let Some(t) = p.peer.next_wake() {
            let t = ((t * 1e3).ceil() as u64).max(self.t + 1);
            if p.wake_at.is_none_or(|w| t < w || w < self.t) {
                p.wake_at = Some(t);
                let epoch = p.epoch;
                self.at_us(t, Ev::Wake(slot, epoch));
            }
        }
        Ok(())
    }

    fn act(&mut self, slot: usize, o: Output) -> Result<(), String> {
        match o {
            // The simulator's graph is drawn once: a shunned link stays (ignored by the
            // peer, as before real transports closed it).
            Output::Drop(_) => {}
            Output::Send { to, data } if !self.is_current(to) => {
                // To a peer that left silently (its slot may hold a newcomer by now): the
                // uplink carries it into the dead connection, nobody gets it.
                self.uplink(slot, data.len());
            }
            Output::Send { to, data } => {
                let data = if self.is_attacker(slot) {
                    self.tamper(slot, data)
                } else {
                    data
                };
                self.send(slot, slot_of(to), Rc::new(data));
            }
            Output::Train {
                round,
                steps,
                resume,
            } => self.train_round(slot, round, steps, resume)?,
            Output::Receipt(bytes) => {
                let links = self.links_of_sender(&bytes);
                self.receipts.push((self.t / 1000, links, bytes));
            }
            Output::RoundClosed(summary) => {
                if self.is_attacker(slot) && self.sc.attack.also.contains(&MessageAttack::Vouch) {
                    self.vouch(slot, summary.round);
                }
                if self.is_attacker(slot)
                    && self.sc.attack.also.contains(&MessageAttack::ReplayReceipts)
                {
                    let p = self.peers[slot].as_ref().expect("alive");
                    let again: Vec<Vec<u8>> = p.got_receipts.clone();
                    for r in again {
                        let links = self.links_of_sender(&r);
                        self.receipts.push((self.t / 1000, links, r));
                        self.replayed += 1;
                    }
                }
                if self.is_attacker(slot)
                    && self.sc.attack.also.contains(&MessageAttack::UnaskedModels)
                {
                    let p = self.peers[slot].as_ref().expect("alive");
                    let msg = Rc::new(
                        PeerMessage::Model(self.poison(slot, p.peer.learner().round() + FAR))
                            .encode(),
                    );
                    for to in self.links[slot].clone() {
                        self.send(slot, to, Rc::clone(&msg));
                    }
                }
                self.round_closed()?;
            }
            Output::Adopted { .. } => {
                if !self.is_attacker(slot) {
                    self.adopted += 1;
                    // Poisoned: farther from the other honest peers' mean model than half
                    // that model's norm (honest models differ by a few percent).
                    let others: Vec<&[f32]> = self
                        .honest_models()
                        .filter(|p| !std::ptr::eq(&p.peer, self.peer_ref(slot)))
                        .map(|p| p.peer.weights())
                        .collect();
                    if let Some(first) = others.first() {
                        let mut mean = vec![0.0f32; first.len()];
                        for w in &others {
                            for (m, x) in mean.iter_mut().zip(*w) {
                                *m += x / others.len() as f32;
                            }
                        }
                        let d = super::aggregate::distance(self.peer_ref(slot).weights(), &mean);
                        if d > 0.5 * super::aggregate::norm(&mean) {
                            self.poisoned += 1;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Local training from what the peer says (or on from the last chunk, `resume`); the
    /// result arrives after the time the peer's speed needs for it.
    fn train_round(
        &mut self,
        slot: usize,
        round: u64,
        steps: u32,
        resume: bool,
    ) -> Result<(), String> {
        let (batch, shift) = (self.sc.train.batch, self.sc.train.shift);
        let train = self.train;
        let (lr, decay) = (self.sc.train.lr, self.sc.train.lr_decay_rounds);
        let p = self.peers[slot].as_mut().expect("alive");
        if !resume {
            p.backend
                .load_weights(p.peer.train_from())
                .map_err(|e| e.to_string())?;
        }
        p.backend
            .set_learning_rate(crate::engine::train::swarm_lr(lr, round, decay))
            .map_err(|e| e.to_string())?;
        let (mut x, mut y, mut idx) = (Vec::new(), Vec::new(), Vec::with_capacity(batch));
        let mut loss = 0.0;
        for _ in 0..steps {
            idx.clear();
            while idx.len() < batch {
                if p.cursor >= p.order.len() {
                    p.rng.shuffle(&mut p.order);
                    p.cursor = 0;
                }
                idx.push(p.order[p.cursor]);
                p.cursor += 1;
            }
            if shift > 0 {
                train.gather_shifted(&idx, shift, &mut p.rng, &mut x, &mut y);
            } else {
                train.gather(&idx, &mut x, &mut y);
            }
            p.backend.step(&x, &y).map_err(|e| e.to_string())?;
            loss += now(p.backend.loss()).map_err(|e| e.to_string())?;
        }
        loss /= steps.max(1) as f32;
        let samples = (steps as usize * batch) as u32;
        let local = p.backend.params_slice().to_vec();
        let epoch = p.epoch;
        let secs = f64::from(samples) / p.speed;
        let us = (secs * US).round() as u64;
        p.busy += us;
        p.busy_until = self.t + us;
        self.at(
            secs,
            Ev::TrainDone {
                slot,
                epoch,
                round,
                local,
                loss,
                samples,
            },
        );
        Ok(())
    }

    /// Whether `p` is the peer now in its slot (not one that left).
    fn is_current(&self, p: PeerId) -> bool {
        self.peers[slot_of(p)]
            .as_ref()
            .is_some_and(|q| peer_id(slot_of(p), q.epoch) == p)
    }

    /// Puts `len` bytes on `from`'s uplink after what it is already sending; returns when
    /// the last byte is out.
    fn uplink(&mut self, from: usize, len: usize) -> u64 {
        let wire = len as f64 * 8.0 / (self.uplink_mbps[from] * 1e6);
        let start = self.uplink_free[from].max(self.t);
        let done = start + (wire * US) as u64;
        self.uplink_free[from] = done;
        self.sent[from] += len as u64;
        done
    }

    /// Sends `bytes` over the sender's uplink, after what it is already sending.
    fn send(&mut self, from: usize, to: usize, bytes: Rc<Vec<u8>>) {
        let (Some(epoch), Some(from_epoch)) = (
            self.peers[to].as_ref().map(|p| p.epoch),
            self.peers[from].as_ref().map(|p| p.epoch),
        ) else {
            return;
        };
        let net = self.sc.network;
        let done = self.uplink(from, bytes.len());
        let mut latency = net.latency_ms + net.jitter_ms * f64::from(self.rng.unit_f32());
        if f64::from(self.rng.unit_f32()) < net.loss {
            latency += 3.0 * net.latency_ms; // a retransmission
        }
        let delay = (done - self.t) as f64 / US + latency / 1e3;
        self.at(
            delay,
            Ev::Deliver {
                to,
                epoch,
                from,
                from_epoch,
                bytes,
            },
        );
    }

    /// One peer closed a round; every `live` closes make a swarm round.
    /// A swarm round is as many closed rounds as the swarm has peers: one round's work of
    /// the whole swarm. (Counting only the peers holding a model made rounds, and with
    /// them churn, come faster the fewer peers were left: slow joins then fed on
    /// themselves until one peer was left.)
    fn round_closed(&mut self) -> Result<(), String> {
        self.rounds_done += 1;
        if self.rounds_done >= self.sc.peers as u64 {
            self.rounds_done = 0;
            self.swarm_round += 1;
            if self.swarm_round.is_multiple_of(self.sc.eval_every.max(1)) {
                self.record();
            }
            self.churn()?;
        }
        Ok(())
    }

    fn honest_models(&self) -> impl Iterator<Item = &SimPeer> {
        self.peers
            .iter()
            .flatten()
            .filter(|p| p.peer.has_model() && !p.attacker)
    }

    fn record(&mut self) {
        let honest: Vec<Vec<f32>> = self
            .honest_models()
            .take(3)
            .map(|p| p.peer.weights().to_vec())
            .collect();
        let (mut acc, mut bits) = (0.0, 0.0);
        let text = self.model.is_language_model();
        let batch = if text { 64 } else { 500 };
        for w in &honest {
            let held = &self.held_out;
            match self
                .eval
                .set_params(w)
                .and_then(|_| self.eval.evaluate(&held.inputs, &held.labels, batch))
            {
                Ok((l, a)) => {
                    acc += a;
                    bits += l / std::f32::consts::LN_2;
                }
                // A diverged model counts as wrong everywhere, and as knowing nothing.
                Err(_) => bits += 8.0,
            }
        }
        let n = honest.len().max(1) as f32;
        let disagreement = self.disagreement();
        let losses = std::mem::take(&mut self.round_losses);
        self.rows.push(Row {
            round: self.swarm_round,
            time_s: self.t as f64 / US,
            samples: self.samples,
            accuracy: acc / n,
            bits_per_byte: text.then_some(bits / n),
            loss: losses.iter().sum::<f32>() / losses.len().max(1) as f32,
            bytes_per_peer: self.sent.iter().sum::<u64>() as f64 / self.sc.peers as f64,
            live: self
                .peers
                .iter()
                .flatten()
                .filter(|p| p.peer.has_model())
                .count(),
            disagreement,
            utilization: self.utilization(),
        });
    }

    fn disagreement(&self) -> f32 {
        let models: Vec<&[f32]> = self.honest_models().map(|p| p.peer.weights()).collect();
        let Some(first) = models.first() else {
            return 0.0;
        };
        let mut mean = vec![0.0f64; first.len()];
        for w in &models {
            for (m, x) in mean.iter_mut().zip(*w) {
                *m += f64::from(*x) / models.len() as f64;
            }
        }
        let spread: f64 = models
            .iter()
            .map(|w| {
                w.iter()
                    .zip(&mean)
                    .map(|(x, m)| (f64::from(*x) - m).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / models.len() as f64;
        let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12);
        (spread.sqrt() / norm) as f32
    }

    /// Replaces `churn.per_round` of the peers with newcomers (and, every `sybil_every`
    /// rounds, every attacker with a fresh one), who download the model from their
    /// neighbours through the peer protocol before they train.
    fn churn(&mut self) -> Result<(), String> {
        // The share of the peers, rounded; a share below one peer a round makes one
        // leave with that probability. (To a thousandth first: 1/7 of 7 peers is one.)
        let expected = (self.sc.churn.per_round * self.sc.peers as f32 * 1e3).round() / 1e3;
        let n = if expected >= 1.0 {
            expected.round() as usize
        } else {
            usize::from(expected > 0.0 && self.rng.unit_f32() < expected)
        };
        let mut leaving: Vec<usize> = (0..self.sc.peers).collect();
        self.rng.shuffle(&mut leaving);
        leaving.truncate(if self.sc.peers < 2 { 0 } else { n });
        let every = self.sc.attack.sybil_every;
        if every > 0 && self.swarm_round.is_multiple_of(every) {
            for slot in (0..self.sc.peers).filter(|&s| self.is_attacker(s)) {
                if !leaving.contains(&slot) {
                    leaving.push(slot);
                }
            }
        }
        if leaving.is_empty() {
            return Ok(());
        }
        let now = self.now_ms();
        for &slot in &leaving {
            let Some(old) = self.peers[slot].take() else {
                continue;
            };
            if !old.attacker {
                self.departed.0 += old.busy_at(self.t);
                self.departed.1 += self.t - old.born;
            }
            for (why, n) in &old.peer.learner().stats.rejected {
                *self.rejected.entry(why.as_str().to_string()).or_default() += n;
            }
            let gone = peer_id(slot, old.epoch);
            let silent = self.sc.churn.silent_ms;
            for o in std::mem::take(&mut self.links[slot]) {
                self.links[o].remove(&slot);
                if silent > 0.0 {
                    if let Some(p) = &self.peers[o] {
                        let epoch = p.epoch;
                        self.at(silent / 1e3, Ev::Down { to: o, epoch, gone });
                    }
                } else if self.peers[o].is_some() {
                    self.peer_mut(o).handle(Event::Down(gone), now);
                }
            }
            let fresh = self.new_peer(slot, old.epoch + 1)?;
            self.peers[slot] = Some(fresh);
            // What the leaver had not yet sent went with its connections: the newcomer
            // starts with an idle uplink.
            self.uplink_free[slot] = self.t;
        }
        // Repair: the newcomers link first, then anyone left short.
        for &slot in &leaving {
            self.link(slot);
        }
        for slot in 0..self.sc.peers {
            if self.links[slot].len() < self.sc.learn.neighbours.min(self.sc.peers - 1) {
                self.link(slot);
            }
        }
        for slot in 0..self.sc.peers {
            if self.peers[slot].is_some() {
                self.drive(slot)?;
            }
        }
        Ok(())
    }

    /// An attacker's poisoned model: the task's seed weights negated and tripled (the
    /// same for every attacker when they collude), or its own weights plus noise of
    /// their norm.
    fn poison(&mut self, slot: usize, round: u64) -> Snapshot {
        let weights: Vec<f32> = if self.sc.attack.collude {
            self.init.iter().map(|w| -3.0 * w).collect()
        } else {
            let p = self.peers[slot].as_mut().expect("alive");
            let w = p.peer.weights().to_vec();
            let sigma = super::aggregate::norm(&w) / (w.len() as f32).sqrt();
            w.iter().map(|x| x + sigma * p.rng.normal_f32()).collect()
        };
        let n = weights.len();
        Snapshot {
            round,
            weights,
            momentum: vec![0.0; n],
        }
    }

    /// What an attacker sends instead of an honest message.
    fn tamper(&mut self, slot: usize, data: Vec<u8>) -> Vec<u8> {
        let also = self.sc.attack.also.clone();
        let n = self.init.len();
        match PeerMessage::decode(&data, n) {
            Ok(PeerMessage::Update(_)) => {
                let p = self.peers[slot].as_ref().expect("alive");
                p.lie.clone().unwrap_or(data)
            }
            Ok(PeerMessage::Model(s) | PeerMessage::ModelInt8(s))
                if also.contains(&MessageAttack::PoisonAnswers) =>
            {
                // fp32, which every peer accepts too: the liar is not held to int8's
                // rounding.
                PeerMessage::Model(self.poison(slot, s.round)).encode()
            }
            Ok(PeerMessage::Mix { round, .. }) if also.contains(&MessageAttack::PoisonMix) => {
                let p = self.peers[slot].as_ref().expect("alive");
                // Toward zero, just inside a quarter of the weights' norm.
                let w: Vec<f32> = p.peer.weights().iter().map(|x| 0.76 * x).collect();
                let payload =
                    super::compress::encode_once(super::Compression::Int8 { block: 256 }, &w);
                PeerMessage::Mix { round, payload }.encode()
            }
            _ => data,
        }
    }

    /// How many neighbours the sender of a receipt (its bytes) has now (0 once it left).
    fn links_of_sender(&self, receipt: &[u8]) -> u8 {
        let Some(&len) = receipt.get(8) else { return 0 };
        let at = 9 + usize::from(len) + 8;
        let Some(sender) = receipt.get(at..at + 32) else {
            return 0;
        };
        self.peers
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.id.public()[..] == *sender))
            .map_or(0, |s| u8::try_from(self.links[s].len()).unwrap_or(u8::MAX))
    }

    /// A sybil's receipts for its fellow attackers among its neighbours: never used,
    /// claiming ten times a round's samples.
    fn vouch(&mut self, slot: usize, round: u64) {
        let claim = (10 * self.sc.learn.local_steps.max(1) as usize * self.sc.train.batch.max(1))
            .min(u32::MAX as usize) as u32;
        let Some(me) = self.peers[slot].as_ref().map(|p| p.id.clone()) else {
            return;
        };
        let fellows: Vec<usize> = self.links[slot]
            .iter()
            .copied()
            .filter(|&s| self.is_attacker(s))
            .collect();
        for s in fellows {
            let Some(key) = self.peers[s].as_ref().map(|p| p.id.public()) else {
                continue;
            };
            let r = crate::trust::receipt::Receipt::sign(
                &me,
                &self.sc.name,
                round,
                key,
                claim,
                [0; 32],
                0,
            );
            let links = u8::try_from(self.links[s].len()).unwrap_or(u8::MAX);
            self.receipts.push((self.t / 1000, links, r.encode()));
        }
    }

    /// Forges the attacker's update for the round it just trained (sent in place of the
    /// honest one), and sends poisoned mixes; a non-stealthy attacker applies its lie to
    /// itself too.
    fn forge(&mut self, slot: usize, local: &[f32], samples: u32) {
        let attack = self.sc.attack.clone();
        let (task, cfg) = (self.sc.name.clone(), self.sc.learn.clone());
        let p = self.peers[slot].as_mut().expect("alive");
        let start = p.peer.weights().to_vec();
        let round = p.peer.learner().round();
        let delta: Vec<f32> = start.iter().zip(local).map(|(w, l)| w - l).collect();
        let far = attack.also.contains(&MessageAttack::FarAhead) && p.attacker_index % 2 == 1;
        let claimed = if far { round + FAR } else { round };
        let samples = if attack.also.contains(&MessageAttack::Inflate) {
            samples.saturating_mul(10)
        } else {
            samples
        };
        let lie = lie_delta(p, &attack, &delta);
        let values: Vec<f32> = match cfg.exchange {
            Exchange::Delta => lie.clone(),
            Exchange::Weights => start.iter().zip(&lie).map(|(w, d)| w - d).collect(),
        };
        let (mut payload, decoded) = Compressor::new(cfg.compression, values.len()).encode(&values);
        if attack.kind == AttackKind::Nan {
            // Poison the first float of the payload (a value for fp32, the first block
            // scale for int8 and top-k).
            let at = match payload.first() {
                Some(0) => 5,
                Some(1) => 9,
                _ => 13,
            };
            if payload.len() >= at + 4 {
                payload[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
        let msg = PeerMessage::Update(Update::signed(&p.id, &task, claimed, samples, 0.0, payload))
            .encode();
        let msg = if attack.kind == AttackKind::Replay {
            p.first_update.get_or_insert(msg).clone()
        } else {
            msg
        };
        p.lie = Some(msg);
        if !attack.stealthy {
            // Our part in our own aggregate is the lie, as receivers decode it.
            let own: Vec<f32> = match cfg.exchange {
                Exchange::Delta => decoded,
                Exchange::Weights => start.iter().zip(&decoded).map(|(w, l)| w - l).collect(),
            };
            p.own_lie = Some(own);
        }
        if attack.also.contains(&MessageAttack::PoisonMix) {
            let mix = p.peer.learner().mix_message();
            for to in self.links[slot].clone() {
                self.send(slot, to, Rc::new(mix.clone()));
            }
        }
    }

    /// Honest peers' time training over their time online, so far.
    fn utilization(&self) -> f64 {
        let (mut busy, mut online) = self.departed;
        for p in self.peers.iter().flatten().filter(|p| !p.attacker) {
            busy += p.busy_at(self.t);
            online += self.t - p.born;
        }
        busy as f64 / online.max(1) as f64
    }

    fn report(&self) -> Report {
        // The target counts as reached when the mean of three consecutive evaluations
        // reaches it, so that one lucky evaluation does not decide.
        let reached = |w: &[Row]| match self.sc.target_bits_per_byte {
            Some(t) => {
                w.iter()
                    .map(|r| r.bits_per_byte.unwrap_or(8.0))
                    .sum::<f32>()
                    / 3.0
                    <= t
            }
            None => w.iter().map(|r| r.accuracy).sum::<f32>() / 3.0 >= self.sc.target,
        };
        let hit = self.rows.windows(3).find(|w| reached(w)).map(|w| &w[2]);
        let rounds: Vec<u64> = self
            .honest_models()
            .map(|p| p.peer.learner().round())
            .collect();
        let mut rejected = self.rejected.clone();
        for p in self.peers.iter().flatten().filter(|p| !p.attacker) {
            for (why, n) in &p.peer.learner().stats.rejected {
                *rejected.entry(why.as_str().to_string()).or_default() += n;
            }
        }
        Report {
            name: self.sc.name.clone(),
            rows: self.rows.clone(),
            samples_to_target: hit.map(|r| r.samples),
            bytes_to_target: hit.map(|r| r.bytes_per_peer),
            rejected,
            version_spread: rounds.iter().max().unwrap_or(&0) - rounds.iter().min().unwrap_or(&0),
            adopted: self.adopted,
            poisoned_adoptions: self.poisoned,
            receipts: self.receipts.clone(),
            replayed: self.replayed,
            trained: self.trained.clone(),
            time_to_target_s: hit.map(|r| r.time_s),
            utilization: self.utilization(),
            utilization_by_peer: self
                .peers
                .iter()
                .flatten()
                .filter(|p| !p.attacker && 10 * (self.t - p.born) >= self.t)
                .map(|p| {
                    let online = (self.t - p.born).max(1) as f64;
                    (p.speed, p.busy_at(self.t) as f64 / online)
                })
                .collect(),
        }
    }
}

/// The pseudo-gradient an attacker claims instead of its honest `delta`.
fn lie_delta(p: &mut SimPeer, attack: &AttackSettings, delta: &[f32]) -> Vec<f32> {
    let norm = super::aggregate::norm(delta).max(1e-12);
    let s = attack.scale;
    match attack.kind {
        AttackKind::SignFlip => delta.iter().map(|d| -s * d).collect(),
        AttackKind::Scaled => delta.iter().map(|d| s * d).collect(),
        AttackKind::Noise => {
            let sigma = s * norm / (delta.len() as f32).sqrt();
            delta.iter().map(|_| sigma * p.rng.normal_f32()).collect()
        }
        AttackKind::Nan | AttackKind::Replay => delta.to_vec(),
    }
}

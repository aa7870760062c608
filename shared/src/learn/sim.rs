//! An in-process swarm: the same [`Learner`] code as real peers, over simulated links
//! (latency, jitter, loss, uplink bandwidth) instead of WebRTC, deterministic from a
//! seed. Peers train for real (CPU backend) on their shard of the data; time is virtual:
//! a peer's local round takes `samples / speed` seconds and a message arrives after its
//! serialization on the sender's uplink plus latency.
//!
//! A scenario (TOML, see `scenarios/` at the repository root) scripts the swarm: peers,
//! rounds, data split, learning settings, network, churn and attackers.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::future::Future;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use serde::{Deserialize, Serialize};

use super::{Identity, LearnConfig, Learner, PeerMessage, Received, Rejection, Update};
use crate::engine::cpu::CpuBackend;
use crate::engine::train::Samples;
use crate::engine::{Backend, Model, ModelSpec, Optimizer};
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
    /// Held-out accuracy the report measures samples and bytes to.
    pub target: f32,
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
}

/// Attackers.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
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
        if self.train.batch == 0 || self.train.batch > 4096 {
            return Err(format!(
                "train.batch: {} outside 1..=4096",
                self.train.batch
            ));
        }
        self.train
            .optimizer
            .build(self.train.lr, self.train.momentum)
            .map_err(|e| format!("train.momentum: {e}"))?
            .validate()
            .map_err(|_| format!("train.lr: {} is not a learning rate", self.train.lr))?;
        self.model_spec()?;
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
        if !(0.0..0.5).contains(&self.attack.fraction) {
            return Err(format!(
                "attack.fraction: {} outside [0, 0.5)",
                self.attack.fraction
            ));
        }
        Ok(())
    }

    fn model_spec(&self) -> Result<ModelSpec, String> {
        match self.train.model.as_str() {
            "mlp" => Ok(ModelSpec::mlp_digits()),
            "cnn" => Ok(ModelSpec::cnn_digits()),
            other => Err(format!("train.model: unknown model {other:?} (mlp, cnn)")),
        }
    }
}

/// The swarm's state after one swarm round (the mean round advanced by one).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Swarm round.
    pub round: u64,
    /// Virtual time in seconds.
    pub time_s: f64,
    /// Samples trained on by honest peers so far.
    pub samples: u64,
    /// Mean held-out accuracy of a few honest peers' current models.
    pub accuracy: f32,
    /// Mean local training loss of the round's updates.
    pub loss: f32,
    /// Bytes sent per peer slot so far (mean).
    pub bytes_per_peer: f64,
    /// Peers online and holding a model.
    pub live: usize,
    /// How far apart honest peers' models are: the root-mean-square distance of their
    /// weights from the mean of their weights, relative to that mean's norm.
    pub disagreement: f32,
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

struct SimPeer {
    epoch: u64,
    id: Identity,
    learner: Learner,
    backend: CpuBackend,
    rng: SplitMix64,
    order: Vec<usize>,
    cursor: usize,
    speed: f64,
    attacker: bool,
    first_update: Option<Vec<u8>>,
    joined: bool,
    training: bool,
    waiting: Option<u64>,
}

enum Ev {
    Start(usize, u64),
    LocalDone(usize, u64, Rc<Vec<u8>>),
    Deliver {
        to: usize,
        epoch: u64,
        from: usize,
        bytes: Rc<Vec<u8>>,
    },
    Deadline(usize, u64, u64),
    Check(usize, u64),
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
    test: &'a Samples,
    model: Model,
    rng: SplitMix64,
    peers: Vec<Option<SimPeer>>,
    links: Vec<BTreeSet<usize>>,
    shards: Vec<Vec<usize>>,
    uplink_free: Vec<u64>,
    sent: Vec<u64>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    t: u64,
    samples: u64,
    rounds_done: u64,
    swarm_round: u64,
    round_losses: Vec<f32>,
    rejected: BTreeMap<String, u64>,
    eval: CpuBackend,
    rows: Vec<Row>,
}

const US: f64 = 1e6;

/// Runs a scenario on `train`, measuring held-out accuracy on `test`.
pub fn run(sc: &Scenario, train: &Samples, test: &Samples) -> Result<Report, String> {
    sc.validate()?;
    let model = Model::new(sc.model_spec()?).map_err(|e| e.to_string())?;
    let init = model.init_params(sc.seed);
    let eval =
        CpuBackend::new(model.clone(), Optimizer::adam(1e-3), init).map_err(|e| e.to_string())?;
    let mut sim = Sim {
        sc,
        train,
        test,
        model,
        rng: SplitMix64::new(sc.seed ^ 0x5eed),
        peers: (0..sc.peers).map(|_| None).collect(),
        links: vec![BTreeSet::new(); sc.peers],
        shards: split(train, sc),
        uplink_free: vec![0; sc.peers],
        sent: vec![0; sc.peers],
        queue: BinaryHeap::new(),
        seq: 0,
        t: 0,
        samples: 0,
        rounds_done: 0,
        swarm_round: 0,
        round_losses: Vec::new(),
        rejected: BTreeMap::new(),
        eval,
        rows: Vec::new(),
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

impl Sim<'_> {
    fn at(&mut self, delay_s: f64, ev: Ev) {
        self.seq += 1;
        let t = self.t + (delay_s * US).round() as u64;
        self.queue.push(Scheduled {
            t,
            seq: self.seq,
            ev,
        });
    }

    fn is_attacker(&self, slot: usize) -> bool {
        // The last slots are the attackers' (the split gives them ordinary shards).
        let bad = (self.sc.attack.fraction * self.sc.peers as f32).round() as usize;
        slot >= self.sc.peers - bad
    }

    fn new_peer(&mut self, slot: usize, epoch: u64, weights: Vec<f32>) -> Result<SimPeer, String> {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.sc.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&(slot as u64).to_le_bytes());
        seed[16..24].copy_from_slice(&epoch.to_le_bytes());
        let id = Identity::from_seed(seed);
        let learner = Learner::new(
            self.sc.learn.clone(),
            &self.sc.name,
            id.clone(),
            weights.clone(),
        )
        .map_err(|e| e.to_string())?;
        let backend = CpuBackend::new(
            self.model.clone(),
            self.sc
                .train
                .optimizer
                .build(self.sc.train.lr, self.sc.train.momentum)?,
            weights,
        )
        .map_err(|e| e.to_string())?;
        let [lo, hi] = self.sc.network.samples_per_s;
        let speed = lo + (hi - lo) * f64::from(self.rng.unit_f32());
        Ok(SimPeer {
            epoch,
            id,
            learner,
            backend,
            rng: SplitMix64::new(self.sc.seed ^ (slot as u64) << 20 ^ epoch),
            order: self.shards[slot].clone(),
            cursor: usize::MAX,
            speed,
            attacker: self.is_attacker(slot),
            first_update: None,
            joined: false,
            training: false,
            waiting: None,
        })
    }

    fn start(&mut self) -> Result<(), String> {
        let init = self.model.init_params(self.sc.seed);
        for slot in 0..self.sc.peers {
            let mut p = self.new_peer(slot, 0, init.clone())?;
            p.joined = true;
            self.peers[slot] = Some(p);
        }
        for slot in 0..self.sc.peers {
            self.link(slot);
        }
        for slot in 0..self.sc.peers {
            self.at(0.0, Ev::Start(slot, 0));
        }
        Ok(())
    }

    /// Links `slot` to random live peers until it has k neighbours, never giving any
    /// peer more than 2k (the signaling server's rule).
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
        for o in candidates {
            if self.links[slot].len() >= k {
                break;
            }
            self.links[slot].insert(o);
            self.links[o].insert(slot);
        }
    }

    fn alive(&self, slot: usize, epoch: u64) -> bool {
        self.peers[slot].as_ref().is_some_and(|p| p.epoch == epoch)
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Start(slot, epoch) if self.alive(slot, epoch) => self.train_round(slot),
            Ev::LocalDone(slot, epoch, msg) if self.alive(slot, epoch) => {
                self.broadcast(slot, &msg);
                let p = self.peers[slot].as_mut().expect("alive");
                p.training = false;
                let round = p.learner.round();
                p.waiting = Some(round);
                let deadline = f64::from(self.sc.learn.round_deadline_ms) / 1e3;
                self.at(deadline, Ev::Deadline(slot, epoch, round));
                self.maybe_finish(slot);
                Ok(())
            }
            Ev::Deliver {
                to,
                epoch,
                from,
                bytes,
            } if self.alive(to, epoch) => self.deliver(to, from, &bytes),
            Ev::Deadline(slot, epoch, round) if self.alive(slot, epoch) => {
                if self.peers[slot].as_ref().and_then(|p| p.waiting) == Some(round) {
                    self.finish(slot);
                }
                Ok(())
            }
            Ev::Check(slot, epoch) if self.alive(slot, epoch) => {
                self.maybe_finish(slot);
                Ok(())
            }
            _ => Ok(()), // for a peer that has left since
        }
    }

    /// Local training from the round-start weights, then the (honest or forged) update.
    fn train_round(&mut self, slot: usize) -> Result<(), String> {
        let (h, batch, shift) = (
            self.sc.learn.local_steps as usize,
            self.sc.train.batch,
            self.sc.train.shift,
        );
        let train = self.train;
        let (lr, decay) = (self.sc.train.lr, self.sc.train.lr_decay_rounds);
        let p = self.peers[slot].as_mut().expect("alive");
        p.training = true;
        p.backend
            .load_weights(p.learner.weights())
            .map_err(|e| e.to_string())?;
        p.backend
            .set_learning_rate(crate::engine::train::swarm_lr(lr, p.learner.round(), decay))
            .map_err(|e| e.to_string())?;
        let (mut x, mut y, mut idx) = (Vec::new(), Vec::new(), Vec::with_capacity(batch));
        let mut loss = 0.0;
        for _ in 0..h {
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
        loss /= h as f32;
        let samples = (h * batch) as u32;
        let local = p.backend.params_slice();
        let msg = if p.attacker {
            let delta: Vec<f32> = p
                .learner
                .weights()
                .iter()
                .zip(local)
                .map(|(w, l)| w - l)
                .collect();
            forge(p, &self.sc.attack, &self.sc.name, delta, samples)
        } else {
            self.samples += u64::from(samples);
            self.round_losses.push(loss);
            p.learner
                .local_update(local, samples, loss)
                .map_err(|e| e.to_string())?
        };
        let epoch = p.epoch;
        let secs = f64::from(samples) / p.speed;
        self.at(secs, Ev::LocalDone(slot, epoch, Rc::new(msg)));
        Ok(())
    }

    /// Sends `msg` to every neighbour over the sender's uplink, one copy after another.
    fn broadcast(&mut self, slot: usize, msg: &Rc<Vec<u8>>) {
        let neighbours: Vec<usize> = self.links[slot].iter().copied().collect();
        for to in neighbours {
            self.send(slot, to, Rc::clone(msg));
        }
    }

    fn send(&mut self, from: usize, to: usize, bytes: Rc<Vec<u8>>) {
        let Some(epoch) = self.peers[to].as_ref().map(|p| p.epoch) else {
            return;
        };
        let net = self.sc.network;
        let wire = bytes.len() as f64 * 8.0 / (net.uplink_mbps * 1e6);
        let start = self.uplink_free[from].max(self.t);
        let done = start + (wire * US) as u64;
        self.uplink_free[from] = done;
        self.sent[from] += bytes.len() as u64;
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
                bytes,
            },
        );
    }

    fn deliver(&mut self, to: usize, from: usize, bytes: &[u8]) -> Result<(), String> {
        let p = self.peers[to].as_mut().expect("alive");
        match p.learner.receive(bytes) {
            Ok(Received::Update { lagging: true, .. }) => self.request_model(to, from),
            Ok(
                Received::Update { .. }
                | Received::ModelRequest
                | Received::Mix
                | Received::Status { .. },
            ) => {}
            Ok(Received::Model(s)) => {
                let p = self.peers[to].as_mut().expect("alive");
                if p.learner.adopt(s) && !p.training {
                    p.joined = true;
                    p.waiting = None;
                    let epoch = p.epoch;
                    self.at(0.0, Ev::Start(to, epoch));
                }
            }
            Err(why) => *self.rejected.entry(why.as_str().to_string()).or_default() += 1,
        }
        self.maybe_finish(to);
        Ok(())
    }

    /// The neighbour sends its model (the request itself is a few bytes; its latency is
    /// counted in the reply's).
    fn request_model(&mut self, to: usize, from: usize) {
        if let Some(src) = self.peers[from].as_ref().filter(|p| !p.attacker) {
            let snap = Rc::new(src.learner.snapshot());
            self.send(from, to, snap);
        }
    }

    fn maybe_finish(&mut self, slot: usize) {
        let p = self.peers[slot].as_ref().expect("alive");
        if p.waiting.is_none() {
            return;
        }
        let all = self.links[slot].iter().all(|&o| match &self.peers[o] {
            Some(q) if q.joined => p.learner.has_fresh_from(&q.id.public()),
            _ => true,
        });
        if all {
            self.finish(slot);
        }
    }

    fn finish(&mut self, slot: usize) {
        let p = self.peers[slot].as_mut().expect("alive");
        p.waiting = None;
        let sync = p.learner.finish_round().sync;
        let epoch = p.epoch;
        if let Some(msg) = sync {
            let n = self.links[slot].len();
            if n > 0 {
                let to = *self.links[slot]
                    .iter()
                    .nth(self.rng.below(n))
                    .expect("in range");
                self.send(slot, to, Rc::new(msg));
            }
        }
        self.at(0.0, Ev::Start(slot, epoch));
        self.rounds_done += 1;
        let live = self
            .peers
            .iter()
            .flatten()
            .filter(|p| p.joined)
            .count()
            .max(1) as u64;
        if self.rounds_done >= live {
            self.rounds_done = 0;
            self.swarm_round += 1;
            if self.swarm_round.is_multiple_of(self.sc.eval_every.max(1)) {
                self.record();
            }
            self.churn();
        }
    }

    fn record(&mut self) {
        let honest: Vec<usize> = (0..self.sc.peers)
            .filter(|&s| {
                self.peers[s]
                    .as_ref()
                    .is_some_and(|p| p.joined && !p.attacker)
            })
            .take(3)
            .collect();
        let mut acc = 0.0;
        for &s in &honest {
            let w = self.peers[s].as_ref().expect("live").learner.weights();
            acc += match self.eval.set_params(w).and_then(|_| {
                self.eval
                    .evaluate(&self.test.inputs, &self.test.labels, 500)
            }) {
                Ok((_, a)) => a,
                Err(_) => 0.0, // a diverged model counts as wrong everywhere
            };
        }
        let disagreement = self.disagreement();
        let losses = std::mem::take(&mut self.round_losses);
        self.rows.push(Row {
            round: self.swarm_round,
            time_s: self.t as f64 / US,
            samples: self.samples,
            accuracy: acc / honest.len().max(1) as f32,
            loss: losses.iter().sum::<f32>() / losses.len().max(1) as f32,
            bytes_per_peer: self.sent.iter().sum::<u64>() as f64 / self.sc.peers as f64,
            live: self.peers.iter().flatten().filter(|p| p.joined).count(),
            disagreement,
        });
    }

    fn disagreement(&self) -> f32 {
        let models: Vec<&[f32]> = self
            .peers
            .iter()
            .flatten()
            .filter(|p| p.joined && !p.attacker)
            .map(|p| p.learner.weights())
            .collect();
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

    /// Replaces `churn.per_round` of the peers with newcomers, who download the model
    /// from a neighbour before they train.
    fn churn(&mut self) {
        let n = (self.sc.churn.per_round * self.sc.peers as f32).round() as usize;
        if n == 0 || self.sc.peers < 2 {
            return;
        }
        let mut slots: Vec<usize> = (0..self.sc.peers).collect();
        self.rng.shuffle(&mut slots);
        for &slot in &slots[..n] {
            let Some(old) = self.peers[slot].take() else {
                continue;
            };
            for o in std::mem::take(&mut self.links[slot]) {
                self.links[o].remove(&slot);
            }
            let init = self.model.init_params(self.sc.seed);
            let Ok(fresh) = self.new_peer(slot, old.epoch + 1, init) else {
                continue;
            };
            self.peers[slot] = Some(fresh);
        }
        // Repair: the newcomers link first, then anyone left short.
        for &slot in &slots[..n] {
            self.link(slot);
        }
        for slot in 0..self.sc.peers {
            if self.links[slot].len() < self.sc.learn.neighbours.min(self.sc.peers - 1) {
                self.link(slot);
            }
        }
        let source = |sim: &Self, o: usize| {
            sim.peers[o]
                .as_ref()
                .is_some_and(|p| p.joined && !p.attacker)
        };
        for &slot in &slots[..n] {
            // A neighbour if one holds the model, else anyone who does.
            let src = self.links[slot].iter().copied().find(|&o| source(self, o));
            if let Some(src) =
                src.or_else(|| (0..self.sc.peers).find(|&o| o != slot && source(self, o)))
            {
                self.request_model(slot, src);
            }
        }
        // Anyone now waiting on a peer that left stops waiting for it.
        for slot in 0..self.sc.peers {
            if let Some(epoch) = self.peers[slot].as_ref().map(|p| p.epoch) {
                self.at(0.0, Ev::Check(slot, epoch));
            }
        }
    }

    fn report(&self) -> Report {
        // The target counts as reached when the mean of three consecutive evaluations
        // reaches it, so that one lucky evaluation does not decide.
        let hit = self
            .rows
            .windows(3)
            .find(|w| w.iter().map(|r| r.accuracy).sum::<f32>() / 3.0 >= self.sc.target)
            .map(|w| &w[2]);
        let rounds: Vec<u64> = self
            .peers
            .iter()
            .flatten()
            .filter(|p| p.joined)
            .map(|p| p.learner.round())
            .collect();
        let mut rejected = self.rejected.clone();
        for p in self.peers.iter().flatten() {
            for (why, n) in &p.learner.stats.rejected {
                if *why == Rejection::Norm || *why == Rejection::Stale {
                    *rejected.entry(why.as_str().to_string()).or_default() += n;
                }
            }
        }
        Report {
            name: self.sc.name.clone(),
            rows: self.rows.clone(),
            samples_to_target: hit.map(|r| r.samples),
            bytes_to_target: hit.map(|r| r.bytes_per_peer),
            rejected,
            version_spread: rounds.iter().max().unwrap_or(&0) - rounds.iter().min().unwrap_or(&0),
        }
    }
}

/// An attacker's message for this round (a stealthy attacker then takes its honest
/// update back as its own part in its aggregate).
fn forge(
    p: &mut SimPeer,
    attack: &AttackSettings,
    task: &str,
    delta: Vec<f32>,
    samples: u32,
) -> Vec<u8> {
    let msg = forge_message(p, attack, task, &delta, samples);
    if attack.stealthy {
        p.learner.own = Some(delta);
    }
    msg
}

fn forge_message(
    p: &mut SimPeer,
    attack: &AttackSettings,
    task: &str,
    delta: &[f32],
    samples: u32,
) -> Vec<u8> {
    let norm = super::aggregate::norm(delta).max(1e-12);
    let s = attack.scale;
    match attack.kind {
        AttackKind::SignFlip => p.learner.update_from_delta(
            &delta.iter().map(|d| -s * d).collect::<Vec<_>>(),
            samples,
            0.0,
        ),
        AttackKind::Scaled => p.learner.update_from_delta(
            &delta.iter().map(|d| s * d).collect::<Vec<_>>(),
            samples,
            0.0,
        ),
        AttackKind::Noise => {
            let sigma = s * norm / (delta.len() as f32).sqrt();
            let noise: Vec<f32> = delta.iter().map(|_| sigma * p.rng.normal_f32()).collect();
            p.learner.update_from_delta(&noise, samples, 0.0)
        }
        AttackKind::Nan => {
            // Encode honestly, then poison the first float of the payload (a value for
            // fp32, the first block scale for int8 and top-k) and sign the result.
            let msg = p.learner.update_from_delta(delta, samples, 0.0);
            let Ok(PeerMessage::Update(u)) = PeerMessage::decode(&msg, delta.len()) else {
                return msg;
            };
            let mut payload = u.payload;
            let at = match payload.first() {
                Some(0) => 5,
                Some(1) => 9,
                _ => 13,
            };
            if payload.len() >= at + 4 {
                payload[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            PeerMessage::Update(Update::signed(&p.id, task, u.round, samples, 0.0, payload))
                .encode()
        }
        AttackKind::Replay => {
            let first = p
                .first_update
                .get_or_insert_with(|| p.learner.update_from_delta(delta, samples, 0.0));
            first.clone()
        }
    }
}

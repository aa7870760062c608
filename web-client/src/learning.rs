//! A swarm peer's training loop, platform-neutral: the native binary and the browser
//! worker drive it with the same calls. It owns the [`Learner`] (the protocol), the local
//! [`Trainer`] (the engine) and what a person watching wants to see ([`Progress`]).
//!
//! The platform feeds it transport events ([`SwarmTrainer::handle`]) and calls
//! [`SwarmTrainer::tick`] whenever it can spare the time; `now_ms` is the platform's
//! monotonic clock. A tick either trains a whole round and sends the update, or closes
//! the round once every neighbour has answered or the deadline has passed, or does
//! nothing while the peer waits.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::train::{self, Samples, Trainer};
use shoal_shared::engine::{AnyBackend, Backend, EngineError, Model, Optimizer};
use shoal_shared::gpu::Gpu;
use shoal_shared::learn::{
    Identity, Learner, PeerMessage, PublicKey, Received, RoundSummary, Snapshot,
};
use shoal_shared::protocol::{PeerId, PeerReport, Role};
use shoal_shared::rng::SplitMix64;
use shoal_shared::task::TaskSpec;

use crate::swarm::Transport;

/// What the person running a peer sees.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Progress {
    /// The model version (rounds completed).
    pub round: u64,
    /// Inner steps trained by this peer.
    pub local_steps: u64,
    /// Samples trained on by this peer.
    pub samples: u64,
    /// Mean local loss of the last round.
    pub loss: f32,
    /// Held-out accuracy of the current model, when evaluated.
    pub accuracy: Option<f32>,
    /// Neighbours with an open channel.
    pub peers: usize,
    /// Bytes sent and received over data channels.
    pub bytes_up: u64,
    /// Bytes received.
    pub bytes_down: u64,
    /// Neighbours' updates used so far.
    pub used: u64,
    /// Rejected messages by reason (as of the last closed round).
    pub rejected: BTreeMap<String, u64>,
    /// `"joining"`, `"training"`, `"waiting"` or `"paused"`.
    pub phase: &'static str,
    /// Training throughput over the last rounds (samples per second of wall time).
    pub samples_per_s: f32,
    /// Paused by the visitor.
    pub paused: bool,
    /// Paused by the researcher (the whole task).
    pub task_paused: bool,
}

enum Phase {
    /// Waiting for a neighbour's model (since, and whom we asked when).
    Joining {
        since: f64,
        asked: Option<(PeerId, f64)>,
    },
    /// Ready to train the next round.
    Ready,
    /// Update sent at `since`; waiting for the neighbours' updates.
    Waiting { since: f64 },
}

/// How long a joiner waits for any neighbour before it starts the swarm itself, and how
/// long for a model it asked for before it asks someone else.
const JOIN_GRACE_MS: f64 = 3_000.0;
const MODEL_WAIT_MS: f64 = 10_000.0;

/// One swarm peer's training loop.
pub struct SwarmTrainer {
    task: TaskSpec,
    learner: Learner,
    trainer: Trainer<AnyBackend>,
    eval: Option<(CpuBackend, Samples)>,
    /// Each neighbour's signing key, learned from its first update.
    keys: HashMap<PeerId, PublicKey>,
    phase: Phase,
    progress: Progress,
    rng: SplitMix64,
    /// Neighbours that said they send no updates (observers, paused peers): nobody
    /// waits for them or asks them for the model.
    idle: HashSet<PeerId>,
    /// When the last round's training started (for the throughput).
    last_train_at: Option<f64>,
    /// What it trains on, for the dashboard.
    backend: String,
}

impl SwarmTrainer {
    /// A peer that will join the swarm: it asks a neighbour for the current model and
    /// starts from the task's initial weights if it finds itself alone. It trains on
    /// `train` (on the GPU when `gpu` is given), in an order of its own drawn from its
    /// key; `test`, when given, is evaluated after every round (CPU).
    pub fn new(
        task: TaskSpec,
        id: Identity,
        gpu: Option<&Gpu>,
        train: Samples,
        test: Option<Samples>,
        now_ms: f64,
    ) -> Result<Self, String> {
        let model = Model::new(task.model.clone()).map_err(|e| e.to_string())?;
        let init = model.init_params(task.train.seed);
        let own_seed = u64::from_le_bytes(id.public()[..8].try_into().unwrap_or([7; 8]));
        let rng = SplitMix64::new(own_seed);
        let backend = train::backend(
            model.clone(),
            gpu,
            task.optimizer_at(0)?,
            init.clone(),
            task.train.batch,
        )
        .map_err(|e| e.to_string())?;
        let trainer = Trainer::new(backend, train, task.train.batch, own_seed)
            .map_err(|e| e.to_string())?
            .with_shift(task.train.shift);
        let learner = Learner::new(task.learn.clone(), &task.name, id, init.clone())
            .map_err(|e| e.to_string())?;
        let eval = match test {
            Some(t) => Some((
                CpuBackend::new(model, Optimizer::adam(task.train.lr), init)
                    .map_err(|e| e.to_string())?,
                t,
            )),
            None => None,
        };
        Ok(Self {
            task,
            learner,
            trainer,
            eval,
            keys: HashMap::new(),
            phase: Phase::Joining {
                since: now_ms,
                asked: None,
            },
            progress: Progress {
                phase: "joining",
                ..Progress::default()
            },
            rng,
            idle: HashSet::new(),
            last_train_at: None,
            backend: gpu.map_or("cpu".to_string(), |g| g.adapter.description.clone()),
        })
    }

    /// Starts from a saved model (a keeper's checkpoint) instead of joining.
    pub fn resume(&mut self, snapshot: Snapshot) -> bool {
        let ok = self.learner.adopt(snapshot);
        if ok {
            self.phase = Phase::Ready;
            self.progress.round = self.learner.round();
        }
        ok
    }

    /// The protocol state (model, round, counters).
    pub fn learner(&self) -> &Learner {
        &self.learner
    }

    /// The task.
    pub fn task(&self) -> &TaskSpec {
        &self.task
    }

    /// What to show.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Whether training is paused (by the visitor or the researcher).
    pub fn is_paused(&self) -> bool {
        self.progress.paused || self.progress.task_paused
    }

    /// Pauses or resumes this peer (the visitor's choice: a button, a hidden tab, a
    /// battery). A paused peer finishes nothing new, keeps its connections, answers model
    /// requests, and tells its neighbours not to wait for its updates.
    pub fn set_paused(&mut self, net: &impl Transport, paused: bool) {
        let was = self.is_paused();
        self.progress.paused = paused;
        self.announce(net, was);
    }

    fn announce(&mut self, net: &impl Transport, was_paused: bool) {
        let now = self.is_paused();
        if now != was_paused {
            let msg = PeerMessage::Status { contributing: !now }.encode();
            for p in net.peers() {
                self.send(net, p, msg.clone());
            }
            self.last_train_at = None;
            if now {
                self.progress.samples_per_s = 0.0;
            }
        }
    }

    /// The numbers the dashboard shows for this peer.
    pub fn report(&self) -> PeerReport {
        let p = &self.progress;
        PeerReport {
            role: Role::Trainer,
            version: p.round,
            samples: p.samples,
            samples_per_s: p.samples_per_s,
            loss: if p.loss.is_finite() {
                p.loss.max(0.0)
            } else {
                0.0
            },
            accuracy: p.accuracy,
            bytes_up: p.bytes_up,
            bytes_down: p.bytes_down,
            used: p.used,
            rejected: p.rejected.clone(),
            paused: self.is_paused(),
            backend: self.backend.chars().take(64).collect(),
        }
    }

    /// Neighbours that send updates.
    fn contributors(&self, net: &impl Transport) -> Vec<PeerId> {
        let mut v = net.peers();
        v.retain(|p| !self.idle.contains(p));
        v
    }

    fn send(&mut self, net: &impl Transport, to: PeerId, msg: Vec<u8>) {
        let n = msg.len() as u64;
        if net.send(to, msg).is_ok() {
            self.progress.bytes_up += n;
        }
    }

    /// Takes in one transport event.
    pub fn handle(&mut self, ev: crate::swarm::SwarmEvent, net: &impl Transport, now_ms: f64) {
        use crate::swarm::SwarmEvent as E;
        match ev {
            E::Signaling { .. } => {}
            E::TaskState { paused } => {
                let was = self.is_paused();
                self.progress.task_paused = paused;
                self.announce(net, was);
            }
            E::PeerUp(p) => {
                if self.is_paused() {
                    self.send(
                        net,
                        p,
                        PeerMessage::Status {
                            contributing: false,
                        }
                        .encode(),
                    );
                }
                if let Phase::Joining {
                    asked: asked @ None,
                    ..
                } = &mut self.phase
                {
                    *asked = Some((p, now_ms));
                    self.send(net, p, PeerMessage::ModelRequest.encode());
                }
            }
            E::PeerDown(p) => {
                self.keys.remove(&p);
                self.idle.remove(&p);
            }
            E::Message { from, data } => {
                self.progress.bytes_down += data.len() as u64;
                match self.learner.receive(&data) {
                    Ok(Received::Update { key, lagging, .. }) => {
                        self.keys.insert(from, key);
                        if lagging {
                            self.send(net, from, PeerMessage::ModelRequest.encode());
                        }
                    }
                    Ok(Received::ModelRequest) => {
                        let snap = self.learner.snapshot();
                        self.send(net, from, snap);
                    }
                    Ok(Received::Model(s)) => {
                        if self.learner.adopt(s) {
                            self.phase = Phase::Ready;
                        }
                    }
                    Ok(Received::Status { contributing }) => {
                        if contributing {
                            self.idle.remove(&from);
                        } else {
                            self.idle.insert(from);
                        }
                    }
                    Ok(Received::Mix) | Err(_) => {} // held / counted by the learner
                }
            }
        }
        self.progress.peers = net.peers().len();
        self.progress.round = self.learner.round();
    }

    /// Advances the loop by one step; returns the round's summary when a round closed.
    pub async fn tick(
        &mut self,
        net: &impl Transport,
        now_ms: f64,
    ) -> Result<Option<RoundSummary>, EngineError> {
        self.progress.peers = net.peers().len();
        match self.phase {
            Phase::Joining { since, asked } => {
                let peers = self.contributors(net);
                let alone = peers.is_empty() && now_ms - since >= JOIN_GRACE_MS;
                let unanswered = asked.is_some_and(|(_, at)| now_ms - at >= MODEL_WAIT_MS);
                if alone || (unanswered && peers.len() <= 1) {
                    self.phase = Phase::Ready; // first in the swarm: start from the seed
                } else if unanswered || (asked.is_none() && !peers.is_empty()) {
                    let prev = asked.map(|(p, _)| p);
                    if let Some(&p) = peers.iter().find(|&&p| Some(p) != prev).or(peers.first()) {
                        self.phase = Phase::Joining {
                            since,
                            asked: Some((p, now_ms)),
                        };
                        self.send(net, p, PeerMessage::ModelRequest.encode());
                    }
                }
                self.progress.phase = "joining";
                Ok(None)
            }
            Phase::Ready if self.is_paused() => {
                self.progress.phase = "paused";
                Ok(None)
            }
            Phase::Ready => {
                self.progress.phase = "training";
                let before = self.progress.samples;
                self.train_round(net).await?;
                if let Some(t) = self.last_train_at
                    && now_ms > t
                {
                    let rate = (self.progress.samples - before) as f64 / ((now_ms - t) / 1e3);
                    let s = &mut self.progress.samples_per_s;
                    *s = if *s == 0.0 {
                        rate as f32
                    } else {
                        0.7 * *s + 0.3 * rate as f32
                    };
                }
                self.last_train_at = Some(now_ms);
                self.phase = Phase::Waiting { since: now_ms };
                self.progress.phase = "waiting";
                Ok(None)
            }
            Phase::Waiting { since } => {
                // Done when every neighbour's update for this round (or a later one) is
                // held and not yet used; a neighbour that never sent one is waited for
                // until the deadline.
                let all = self.contributors(net).iter().all(|p| {
                    self.keys
                        .get(p)
                        .is_some_and(|k| self.learner.has_fresh_from(k))
                });
                let deadline = f64::from(self.task.learn.round_deadline_ms);
                if !all && now_ms - since < deadline {
                    return Ok(None);
                }
                let summary = self.learner.finish_round();
                if let Some(msg) = &summary.sync {
                    let peers = self.contributors(net);
                    if !peers.is_empty() {
                        let to = peers[self.rng.below(peers.len())];
                        self.send(net, to, msg.clone());
                    }
                }
                self.progress.round = self.learner.round();
                self.progress.used = self.learner.stats.used;
                self.progress.rejected = self
                    .learner
                    .stats
                    .rejected
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), *v))
                    .collect();
                if let Some((cpu, test)) = &mut self.eval
                    && cpu.set_params(self.learner.weights()).is_ok()
                {
                    self.progress.accuracy = cpu
                        .evaluate(&test.inputs, &test.labels, 500)
                        .ok()
                        .map(|r| r.1);
                }
                self.phase = Phase::Ready;
                net.report(&self.report());
                Ok(Some(summary))
            }
        }
    }

    /// Trains `local_steps` from the round-start weights and sends the update.
    async fn train_round(&mut self, net: &impl Transport) -> Result<(), EngineError> {
        let h = self.task.learn.local_steps as usize;
        self.trainer.backend.load_weights(self.learner.weights())?;
        self.trainer
            .backend
            .set_learning_rate(self.task.lr_at(self.learner.round()))?;
        self.trainer.run(h)?;
        let loss = self.trainer.backend.loss().await?;
        let local = self.trainer.backend.params().await?;
        let samples = (h * self.task.train.batch) as u32;
        let msg = self
            .learner
            .local_update(&local, samples, loss)
            .map_err(|e| EngineError::BadParams(e.to_string()))?;
        self.progress.loss = loss;
        self.progress.local_steps += h as u64;
        self.progress.samples += u64::from(samples);
        for p in self.contributors(net) {
            self.send(net, p, msg.clone());
        }
        Ok(())
    }
}

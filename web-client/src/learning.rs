//! A swarm peer's training loop, platform-neutral: the native binary and the browser
//! worker drive it with the same calls. It owns the [`Learner`] (the protocol), the local
//! [`Trainer`] (the engine) and what a person watching wants to see ([`Progress`]).
//!
//! The platform feeds it transport events ([`SwarmTrainer::handle`]) and calls
//! [`SwarmTrainer::tick`] whenever it can spare the time; `now_ms` is the platform's
//! monotonic clock. A tick either trains a whole round and sends the update, or closes
//! the round once every neighbour has answered or the deadline has passed, or does
//! nothing while the peer waits.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::train::{self, Samples, Trainer};
use shoal_shared::engine::{AnyBackend, Backend, EngineError, Model, ModelSpec, Optimizer};
use shoal_shared::gpu::Gpu;
use shoal_shared::learn::{
    Identity, LearnConfig, Learner, PeerMessage, PublicKey, Received, RoundSummary, Snapshot,
};
use shoal_shared::protocol::PeerId;
use shoal_shared::rng::SplitMix64;

use crate::swarm::Transport;

/// What a peer needs to know about the task it trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTask {
    /// The task's name (updates are signed for it).
    pub name: String,
    /// `"mlp"` or `"cnn"`.
    pub model: String,
    /// Seed of the initial weights: every peer starts from the same model.
    pub seed: u64,
    /// Samples per inner step.
    pub batch: usize,
    /// Inner Adam learning rate.
    pub lr: f32,
    /// Random shift augmentation in pixels.
    pub shift: usize,
    /// The inner learning rate follows a half-cosine from `lr` down to 10% of it over
    /// this many rounds of the model, then stays there (0: constant). Every peer derives
    /// it from the model version, so the swarm settles together.
    pub lr_decay_rounds: u64,
    /// Swarm settings.
    pub learn: LearnConfig,
}

impl PeerTask {
    /// The demo digits task: the MLP, batch 8, Adam 1e-3, and the default swarm settings
    /// (validated in the simulator: `scenarios/iid-8.toml`).
    pub fn digits() -> Self {
        Self {
            name: "digits".into(),
            model: "mlp".into(),
            seed: 42,
            batch: 8,
            lr: 1e-3,
            shift: 2,
            lr_decay_rounds: 150,
            learn: LearnConfig::default(),
        }
    }

    /// The inner learning rate for a round of the model.
    pub fn lr_at(&self, round: u64) -> f32 {
        if self.lr_decay_rounds == 0 {
            return self.lr;
        }
        let t = (round as f32 / self.lr_decay_rounds as f32).min(1.0);
        self.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * t).cos()))
    }

    /// The model's description.
    pub fn spec(&self) -> Result<ModelSpec, String> {
        crate::demo_model(&self.model)
    }
}

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
    /// `"joining"`, `"training"` or `"waiting"`.
    pub phase: &'static str,
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
    task: PeerTask,
    learner: Learner,
    trainer: Trainer<AnyBackend>,
    eval: Option<(CpuBackend, Samples)>,
    /// Each neighbour's signing key, learned from its first update.
    keys: HashMap<PeerId, PublicKey>,
    phase: Phase,
    progress: Progress,
    rng: SplitMix64,
}

impl SwarmTrainer {
    /// A peer that will join the swarm: it asks a neighbour for the current model and
    /// starts from the task's initial weights if it finds itself alone. It trains on
    /// `train` (on the GPU when `gpu` is given), in an order of its own drawn from its
    /// key; `test`, when given, is evaluated after every round (CPU).
    pub fn new(
        task: PeerTask,
        id: Identity,
        gpu: Option<&Gpu>,
        train: Samples,
        test: Option<Samples>,
        now_ms: f64,
    ) -> Result<Self, String> {
        let model = Model::new(task.spec()?).map_err(|e| e.to_string())?;
        let init = model.init_params(task.seed);
        let own_seed = u64::from_le_bytes(id.public()[..8].try_into().unwrap_or([7; 8]));
        let rng = SplitMix64::new(own_seed);
        let backend = train::backend(
            model.clone(),
            gpu,
            Optimizer::adam(task.lr),
            init.clone(),
            task.batch,
        )
        .map_err(|e| e.to_string())?;
        let trainer = Trainer::new(backend, train, task.batch, own_seed)
            .map_err(|e| e.to_string())?
            .with_shift(task.shift);
        let learner = Learner::new(task.learn.clone(), &task.name, id, init.clone())
            .map_err(|e| e.to_string())?;
        let eval = match test {
            Some(t) => Some((
                CpuBackend::new(model, Optimizer::adam(task.lr), init)
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
    pub fn task(&self) -> &PeerTask {
        &self.task
    }

    /// What to show.
    pub fn progress(&self) -> &Progress {
        &self.progress
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
            E::PeerUp(p) => {
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
                let peers = net.peers();
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
            Phase::Ready => {
                self.progress.phase = "training";
                self.train_round(net).await?;
                self.phase = Phase::Waiting { since: now_ms };
                self.progress.phase = "waiting";
                Ok(None)
            }
            Phase::Waiting { since } => {
                // Done when every neighbour's update for this round (or a later one) is
                // held and not yet used; a neighbour that never sent one is waited for
                // until the deadline.
                let all = net.peers().iter().all(|p| {
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
                    let peers = net.peers();
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
        let samples = (h * self.task.batch) as u32;
        let msg = self
            .learner
            .local_update(&local, samples, loss)
            .map_err(|e| EngineError::BadParams(e.to_string()))?;
        self.progress.loss = loss;
        self.progress.local_steps += h as u64;
        self.progress.samples += u64::from(samples);
        for p in net.peers() {
            self.send(net, p, msg.clone());
        }
        Ok(())
    }
}

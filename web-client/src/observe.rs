//! The dashboard's peer: it joins the swarm as an observer, says so to its neighbours
//! (so nobody waits for its updates), downloads the current model from one of them every
//! few seconds, and evaluates it on the task's held-out split. It never trains and never
//! sends an update; the model it holds is what the dashboard exports.
//!
//! Platform-neutral like the training loop: the browser worker drives it through
//! `wasm/observer.rs`, and a native test can drive it over the native transport.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::train::Samples;
use shoal_shared::engine::{Backend, Model, Optimizer};
use shoal_shared::learn::{PeerMessage, Rejection, Snapshot};
use shoal_shared::protocol::{PeerId, PeerReport, Role};
use shoal_shared::task::TaskSpec;

use crate::swarm::{SwarmEvent, Transport};

/// One evaluation of the swarm's model.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalPoint {
    /// The model version evaluated.
    pub version: u64,
    /// Held-out accuracy.
    pub accuracy: f32,
    /// Held-out mean cross-entropy.
    pub loss: f32,
    /// When (the platform's clock, milliseconds).
    pub at_ms: f64,
}

/// The dashboard's view of the model.
pub struct Observer {
    task: TaskSpec,
    model: Model,
    eval: CpuBackend,
    test: Samples,
    /// Neighbours that said they send no updates (other observers, paused peers).
    idle: HashSet<PeerId>,
    every_ms: f64,
    last_ask: f64,
    next: usize,
    latest: Option<Snapshot>,
    latest_accuracy: Option<f32>,
    bytes_down: u64,
    bytes_up: u64,
    refused: BTreeMap<String, u64>,
}

impl Observer {
    /// An observer of `task` that asks for the model every `every_ms`.
    pub fn new(task: TaskSpec, test: Samples, every_ms: f64) -> Result<Self, String> {
        let model = Model::new(task.model.clone()).map_err(|e| e.to_string())?;
        let init = model.init_params(task.train.seed);
        let eval = CpuBackend::new(model.clone(), Optimizer::adam(task.train.lr), init)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            task,
            model,
            eval,
            test,
            idle: HashSet::new(),
            every_ms,
            last_ask: f64::NEG_INFINITY,
            next: 0,
            latest: None,
            latest_accuracy: None,
            bytes_down: 0,
            bytes_up: 0,
            refused: BTreeMap::new(),
        })
    }

    fn send(&mut self, net: &impl Transport, to: PeerId, msg: Vec<u8>) {
        let n = msg.len() as u64;
        if net.send(to, msg).is_ok() {
            self.bytes_up += n;
        }
    }

    /// Takes in one transport event; returns a new evaluation when a newer model came.
    pub fn handle(
        &mut self,
        ev: SwarmEvent,
        net: &impl Transport,
        now_ms: f64,
    ) -> Option<EvalPoint> {
        match ev {
            SwarmEvent::PeerUp(p) => {
                let msg = PeerMessage::Status {
                    contributing: false,
                }
                .encode();
                self.send(net, p, msg);
                None
            }
            SwarmEvent::PeerDown(p) => {
                self.idle.remove(&p);
                None
            }
            SwarmEvent::Message { from, data } => {
                self.bytes_down += data.len() as u64;
                match PeerMessage::decode(&data, self.model.param_len()) {
                    Ok(PeerMessage::Model(s)) => self.take_model(s, now_ms),
                    Ok(PeerMessage::Status { contributing }) => {
                        if contributing {
                            self.idle.remove(&from);
                        } else {
                            self.idle.insert(from);
                        }
                        None
                    }
                    // Updates and mixes are not for observers; requests it cannot answer.
                    Ok(_) => None,
                    Err(e) => {
                        let reason = Rejection::from(&e).as_str();
                        *self.refused.entry(reason.to_string()).or_default() += 1;
                        None
                    }
                }
            }
            SwarmEvent::Signaling { .. } | SwarmEvent::TaskState { .. } => None,
        }
    }

    fn take_model(&mut self, s: Snapshot, now_ms: f64) -> Option<EvalPoint> {
        if self.latest.as_ref().is_some_and(|l| l.round >= s.round) {
            return None;
        }
        self.eval.set_params(&s.weights).ok()?;
        let (loss, accuracy) = self
            .eval
            .evaluate(&self.test.inputs, &self.test.labels, 500)
            .ok()?;
        let point = EvalPoint {
            version: s.round,
            accuracy,
            loss,
            at_ms: now_ms,
        };
        self.latest_accuracy = Some(accuracy);
        self.latest = Some(s);
        Some(point)
    }

    /// Asks the next contributing neighbour for the model when it is time.
    pub fn tick(&mut self, net: &impl Transport, now_ms: f64) {
        if now_ms - self.last_ask < self.every_ms {
            return;
        }
        let peers: Vec<PeerId> = net
            .peers()
            .into_iter()
            .filter(|p| !self.idle.contains(p))
            .collect();
        if peers.is_empty() {
            return;
        }
        let to = peers[self.next % peers.len()];
        self.next = self.next.wrapping_add(1);
        self.last_ask = now_ms;
        self.send(net, to, PeerMessage::ModelRequest.encode());
    }

    /// The newest model version held.
    pub fn version(&self) -> Option<u64> {
        self.latest.as_ref().map(|s| s.round)
    }

    /// The observer's numbers for the server (role: observer, so the dashboard does not
    /// count it as a contributor).
    pub fn report(&self) -> PeerReport {
        PeerReport {
            role: Role::Observer,
            version: self.version().unwrap_or(0),
            accuracy: self.latest_accuracy,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            rejected: self.refused.clone(),
            backend: "observer".into(),
            ..PeerReport::default()
        }
    }

    /// The newest model as safetensors, with the held-out accuracy measured here.
    pub fn export(&self) -> Result<Vec<u8>, String> {
        let s = self.latest.as_ref().ok_or("no model downloaded yet")?;
        shoal_shared::export::task_model(&self.task, &s.weights, s.round, self.latest_accuracy)
    }
}

//! The dashboard's peer: it joins the swarm as an observer, says so to its neighbours
//! (so nobody waits for its updates), downloads the current model every few seconds, and
//! evaluates it on the task's held-out split. It never trains and never sends an update;
//! the model it holds is what the dashboard exports.
//!
//! The protocol is the sans-IO [`Peer`] in its observer role: it downloads from several
//! neighbours at once and keeps the answer they agree on (the same adoption rule as a
//! joining peer), so one lying neighbour cannot put its model on the researcher's
//! dashboard or into the export. Platform-neutral like the training loop: the browser
//! worker drives it through `wasm/observer.rs`, and a native test can drive it over the
//! native transport.

use serde::Serialize;
use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::train::Samples;
use shoal_shared::engine::{Backend, Model, Optimizer};
use shoal_shared::learn::{Identity, Output, Peer, PeerRole};
use shoal_shared::protocol::{PeerReport, Role};
use shoal_shared::task::TaskSpec;

use crate::learning::peer_event;
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
    /// A language model's held-out loss in bits per byte (`loss / ln 2`).
    pub bits_per_byte: Option<f32>,
    /// A language model's continuation of the start of the held-out text: its first
    /// [`SAMPLE_PROMPT`] bytes, then [`SAMPLE_BYTES`] sampled at temperature 0.8 with the
    /// version as the seed (lossy UTF-8).
    pub sample: Option<SampleText>,
    /// When (the platform's clock, milliseconds).
    pub at_ms: f64,
}

/// A prompt and the model's continuation of it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SampleText {
    /// The prompt.
    pub prompt: String,
    /// What the model wrote after it.
    pub text: String,
}

/// Bytes of the held-out text a dashboard sample starts from.
pub const SAMPLE_PROMPT: usize = 48;
/// Bytes a dashboard sample generates.
pub const SAMPLE_BYTES: usize = 160;

/// The dashboard's view of the model.
pub struct Observer {
    task: TaskSpec,
    peer: Peer,
    eval: CpuBackend,
    test: Samples,
    /// The newest model's held-out `(loss, accuracy)`.
    latest: Option<(f32, f32)>,
    /// Whether the starting point (the seed model every peer starts from, version 0) is
    /// still to be evaluated: the chart then shows where training began even when the
    /// swarm is far along before the first download.
    baseline_due: bool,
}

impl Observer {
    /// An observer of `task` that downloads the model every `every_ms`.
    pub fn new(task: TaskSpec, test: Samples, every_ms: f64) -> Result<Self, String> {
        let model = Model::new(task.model.clone()).map_err(|e| e.to_string())?;
        let init = model.init_params(task.train.seed);
        let eval = CpuBackend::new(model, Optimizer::adam(task.train.lr), init.clone())
            .map_err(|e| e.to_string())?;
        // An observer signs nothing; its key only tells its own messages apart.
        let id = Identity::from_seed(*b"shoal observer: never signs.....");
        let peer = Peer::new(
            task.learn.clone(),
            &task.name,
            id,
            init,
            PeerRole::Observer { every_ms },
            0.0,
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            task,
            peer,
            eval,
            test,
            latest: None,
            baseline_due: true,
        })
    }

    /// Sends what the peer queued and evaluates a model it adopted.
    fn flush(&mut self, net: &impl Transport, now_ms: f64) -> Option<EvalPoint> {
        let mut point = None;
        while let Some(o) = self.peer.poll_output() {
            match o {
                Output::Send { to, data } => {
                    let _ = net.send(to, data);
                }
                Output::Drop(peer) => net.drop_neighbour(peer),
                Output::Adopted { round } => point = self.evaluate(round, now_ms),
                // Never for an observer.
                Output::Train { .. } | Output::RoundClosed(_) | Output::Receipt(_) => {}
            }
        }
        point
    }

    fn evaluate(&mut self, version: u64, now_ms: f64) -> Option<EvalPoint> {
        let point = self.evaluate_weights(self.peer.weights().to_vec(), version, now_ms)?;
        self.latest = Some((point.loss, point.accuracy));
        Some(point)
    }

    /// Held-out loss and accuracy of `weights` (and a text sample for a text task).
    fn evaluate_weights(
        &mut self,
        weights: Vec<f32>,
        version: u64,
        now_ms: f64,
    ) -> Option<EvalPoint> {
        self.eval.set_params(&weights).ok()?;
        let (loss, accuracy) = self
            .eval
            .evaluate(&self.test.inputs, &self.test.labels, 500)
            .ok()?;
        let text = self.task.is_text();
        let sample = if text {
            // The held-out windows are consecutive bytes of the text.
            let prompt: Vec<u8> = self
                .test
                .inputs
                .iter()
                .take(SAMPLE_PROMPT)
                .map(|&t| t as u8)
                .collect();
            self.eval
                .generate(&prompt, SAMPLE_BYTES, 0.8, version)
                .ok()
                .map(|out| SampleText {
                    prompt: String::from_utf8_lossy(&prompt).into_owned(),
                    text: String::from_utf8_lossy(&out).into_owned(),
                })
        } else {
            None
        };
        Some(EvalPoint {
            version,
            accuracy,
            loss,
            bits_per_byte: text.then_some(loss / std::f32::consts::LN_2),
            sample,
            at_ms: now_ms,
        })
    }

    /// Takes in one transport event; returns a new evaluation when a newer model came.
    pub fn handle(
        &mut self,
        ev: SwarmEvent,
        net: &impl Transport,
        now_ms: f64,
    ) -> Option<EvalPoint> {
        if let Some(ev) = peer_event(ev) {
            self.peer.handle(ev, now_ms);
        }
        self.flush(net, now_ms)
    }

    /// Starts a download when it is time, ends one whose wait is over; returns a new
    /// evaluation when that adopted a newer model.
    pub fn tick(&mut self, net: &impl Transport, now_ms: f64) -> Option<EvalPoint> {
        self.peer.tick(now_ms);
        let adopted = self.flush(net, now_ms);
        if adopted.is_none() && self.baseline_due {
            self.baseline_due = false;
            let seed = Model::new(self.task.model.clone())
                .ok()?
                .init_params(self.task.train.seed);
            return self.evaluate_weights(seed, 0, now_ms);
        }
        adopted
    }

    /// The newest model version held.
    pub fn version(&self) -> Option<u64> {
        self.peer.has_model().then(|| self.peer.learner().round())
    }

    /// The observer's numbers for the server (role: observer, so the dashboard does not
    /// count it as a contributor).
    pub fn report(&self) -> PeerReport {
        let p = self.peer.progress();
        PeerReport {
            role: Role::Observer,
            version: self.version().unwrap_or(0),
            accuracy: self.latest.map(|e| e.1),
            bytes_up: p.bytes_up,
            bytes_down: p.bytes_down,
            rejected: p.rejected.clone(),
            backend: "observer".into(),
            ..PeerReport::default()
        }
    }

    /// The newest model as safetensors, with the held-out loss and accuracy measured here.
    /// `ledger_head` (the task's ledger head when exported, 64 hex digits) goes into the
    /// metadata as `ledger_head`: which receipted contributions built the model.
    pub fn export(&self, ledger_head: Option<&str>) -> Result<Vec<u8>, String> {
        let round = self.version().ok_or("no model downloaded yet")?;
        shoal_shared::export::task_model(
            &self.task,
            self.peer.weights(),
            round,
            self.latest,
            ledger_head,
        )
    }
}

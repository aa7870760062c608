//! The dashboard's peer: it joins the swarm as an observer, says so to its neighbours
//! (so nobody waits for its updates), downloads the current model every few seconds, and
//! evaluates it on the task's held-out split. It never trains and never sends an update;
//! the model it holds is what the dashboard exports.
//!
//! The protocol is the sans-IO [`Peer`] in its observer role: it downloads from three
//! neighbours at once and keeps the answer they agree on (the same adoption rule as a
//! joining peer), so one lying neighbour among three that answer cannot put its model on
//! the researcher's dashboard or into the export. Platform-neutral like the training loop: the browser
//! worker drives it through `wasm/observer.rs`, and a native test can drive it over the
//! native transport.

use serde::Serialize;
use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::train::Samples;
use shoal_shared::engine::{Backend, Model};
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
    /// The model is older than the one evaluated before it (the observer stepped back to
    /// what its neighbours agree on): evaluations of later versions no longer stand.
    pub back: bool,
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
    /// The held-out `(loss, accuracy)` of the model held, and its version; `None` when
    /// it could not be evaluated (an export then carries no numbers, not an older
    /// model's).
    latest: Option<(u64, f32, f32)>,
    /// The version of the last evaluation sent.
    shown: Option<u64>,
    /// Whether the starting point (the seed model every peer starts from, version 0) is
    /// still to be evaluated: the chart then shows where training began even when the
    /// swarm is far along before the first download.
    baseline_due: bool,
}

impl Observer {
    /// An observer of `task` that downloads the model every `every_ms`; `seed` (from the
    /// platform's secure generator) keys its draws of whom to ask.
    pub fn new(
        task: TaskSpec,
        test: Samples,
        every_ms: f64,
        seed: [u8; 32],
    ) -> Result<Self, String> {
        let model = Model::new(task.model.clone()).map_err(|e| e.to_string())?;
        let init = model.init_params(task.train.seed);
        let eval = CpuBackend::for_evaluation(model, init.clone()).map_err(|e| e.to_string())?;
        // An observer signs nothing; its key tells its own messages apart and seeds its
        // draws of whom to ask, which must not be foreseeable (a fixed key made every
        // dashboard ask the neighbours an attacker could compute).
        let id = Identity::from_seed(seed);
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
            shown: None,
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
        let point = self.evaluate_weights(self.peer.weights().to_vec(), version, now_ms);
        self.latest = point.as_ref().map(|p| (version, p.loss, p.accuracy));
        let mut point = point?;
        // Against the last point sent: a step back whose model could not be evaluated
        // is still one for the next that can.
        point.back = self.shown.is_some_and(|v| version < v);
        self.shown = Some(version);
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
            back: false,
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
            accuracy: self.latest.map(|e| e.2),
            bytes_up: p.bytes_up,
            bytes_down: p.bytes_down,
            rejected: p.rejected.clone(),
            backend: "observer".into(),
            ..PeerReport::default()
        }
    }

    /// The newest model as safetensors, with the held-out loss and accuracy measured here.
    /// `ledger_head` (the task's ledger head when exported, 64 hex digits) goes into the
    /// metadata as `ledger_head`: the ledger as it stood at the export, which covers the
    /// receipts that can have built the model (and later ones: README, "Where people see
    /// it").
    pub fn export(&self, ledger_head: Option<&str>) -> Result<Vec<u8>, String> {
        let round = self.version().ok_or("no model downloaded yet")?;
        shoal_shared::export::task_model(
            &self.task,
            self.peer.weights(),
            round,
            self.latest
                .filter(|&(v, ..)| v == round)
                .map(|(_, loss, accuracy)| (loss, accuracy)),
            ledger_head,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_shared::learn::Snapshot;

    /// An export carries the held-out numbers of exactly the weights it holds, or none: a
    /// model whose evaluation failed (its loss not finite) went out with the accuracy of
    /// the model before it.
    #[test]
    fn an_export_carries_the_numbers_of_its_own_weights_or_none() {
        let task = TaskSpec::digits();
        let test = Samples {
            inputs: vec![0.5; 8 * 784],
            labels: vec![3; 8],
            dim: 784,
            shape: [28, 28, 1],
            positions: 1,
        };
        let mut o = Observer::new(task, test, 10_000.0, [7; 32]).expect("an observer");
        let n = o.peer.weights().len();
        let adopt = |o: &mut Observer, round: u64, w: Vec<f32>| {
            let s = Snapshot {
                round,
                weights: w,
                momentum: vec![0.0; n],
            };
            assert!(o.peer.learner_mut().adopt(s));
            o.evaluate(round, 0.0)
        };
        let good = o.peer.weights().to_vec();
        let first = adopt(&mut o, 5, good.clone()).expect("evaluated");
        assert!(!first.back);
        let meta = |bytes: &[u8]| {
            let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
            let header: serde_json::Value =
                serde_json::from_slice(&bytes[8..8 + len]).expect("a header");
            header["__metadata__"].clone()
        };
        let exported = meta(&o.export(None).expect("an export"));
        assert!(exported.get("test_accuracy").is_some(), "{exported}");
        // Weights whose logits overflow: not evaluated, and exported without numbers.
        let huge: Vec<f32> = good.iter().map(|_| 3e38).collect();
        assert!(adopt(&mut o, 6, huge).is_none());
        let exported = meta(&o.export(None).expect("an export"));
        assert_eq!(exported["version"], "6");
        assert!(exported.get("test_accuracy").is_none(), "{exported}");
        assert!(o.report().accuracy.is_none(), "nor reported");
        // A model older than the one held (a step back) is marked as such.
        assert!(o.peer.learner_mut().adopt_older(Snapshot {
            round: 2,
            weights: good,
            momentum: vec![0.0; n],
        }));
        assert!(o.evaluate(2, 0.0).expect("evaluated").back);
    }
}

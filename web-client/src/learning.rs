//! A swarm peer's training driver, platform-neutral: the native binary and the browser
//! worker drive it with the same calls. The protocol is the sans-IO [`Peer`] of
//! `shoal-shared` (the state machine the simulator runs too); this driver only carries out
//! what it asks for — sending its messages through a [`Transport`], running local training
//! on the engine ([`Trainer`], GPU or CPU) — and measures held-out accuracy after each
//! round.

use shoal_shared::engine::cpu::CpuBackend;
use shoal_shared::engine::train::{self, Samples, Trainer};
use shoal_shared::engine::{AnyBackend, Backend, EngineError, Model};
use shoal_shared::gpu::Gpu;
use shoal_shared::learn::{
    Event, Identity, LearnError, Learner, Output, Peer, PeerRole, RoundSummary, Snapshot,
};
use shoal_shared::protocol::{PeerReport, Role};
use shoal_shared::task::TaskSpec;

pub use shoal_shared::learn::Progress;

use crate::swarm::{SwarmEvent, Transport};

/// The transport's events as the peer state machine's.
pub(crate) fn peer_event(ev: SwarmEvent) -> Option<Event> {
    match ev {
        SwarmEvent::Signaling { .. } => None,
        SwarmEvent::PeerUp(p) => Some(Event::Up(p)),
        SwarmEvent::PeerDown(p) => Some(Event::Down(p)),
        SwarmEvent::Message { from, data } => Some(Event::Message { from, data }),
        SwarmEvent::TaskState { paused } => Some(Event::TaskPaused(paused)),
        SwarmEvent::TaskChanged => None,
    }
}

/// The softmax of a classifier's outputs; an error unless every output is finite (not
/// only the largest: `f32::max` passes over a NaN, and one NaN made every probability
/// NaN, shown to the visitor as 0%).
fn class_probabilities(logits: &[f32]) -> Result<Vec<f32>, String> {
    if !logits.iter().all(|l| l.is_finite()) {
        return Err("the model's outputs are not finite".into());
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    Ok(exp.iter().map(|e| e / total).collect())
}

/// One swarm peer's training loop.
pub struct SwarmTrainer {
    task: TaskSpec,
    peer: Peer,
    trainer: Trainer<AnyBackend>,
    eval: Option<Eval>,
    /// What it trains on, for the dashboard.
    backend: String,
    /// What the peer asked for during `handle`, carried out by the next `tick`.
    pending: Vec<Output>,
    /// When the last report went to the server.
    reported_ms: f64,
    /// Where the count of updates sent under the privacy budget is kept (natively, a
    /// file beside the key), told before any message leaves once the count rose.
    privacy_sink: Option<PrivacySink>,
    /// The count the sink last kept.
    privacy_kept: u64,
    /// Why the sink failed, once it did: from then on nothing is sent (an update out
    /// before its round is counted would let a restart spend the budget again).
    privacy_failed: Option<String>,
    /// The server runs another revision of the task ([`SwarmEvent::TaskChanged`]).
    task_changed: bool,
    /// Local runs that broke (a non-finite loss or gradient), and why the last one did.
    broken: (u64, Option<String>),
}

/// Keeps the count of updates sent under the privacy budget (and the noise multiplier
/// they were sent with), or says why it could not.
pub type PrivacySink = Box<dyn FnMut(u64, f64) -> Result<(), String>>;

/// The held-out evaluation: the whole split, and the fixed subset a peer measures after
/// every round.
struct Eval {
    cpu: CpuBackend,
    /// Its batch: at most 64, within a training step's working memory (what the task's
    /// memory budget counts, `Model::evaluation_batch`).
    batch: usize,
    full: Samples,
    each_round: Samples,
}

/// The longest prompt a visitor's try uses (its end).
pub const TRY_PROMPT_BYTES: usize = 1024;
/// Bytes a visitor's try writes.
pub const TRY_BYTES: usize = 240;

/// Reports go to the server at most this often: a peer alone closes many rounds a
/// second, and one report each would run into the server's rate limit (50 messages a
/// second) and get it disconnected.
pub const REPORT_EVERY_MS: f64 = 1000.0;

impl SwarmTrainer {
    /// A peer that will join the swarm: it downloads the current model from its
    /// neighbours and starts from the task's initial weights if it finds itself alone.
    /// It trains on `train` (on the GPU when `gpu` is given), in an order of its own drawn
    /// from its key; `test`, when given, is evaluated after every round (CPU). Where the
    /// task asks for differential privacy, every update is clipped and noised with noise
    /// drawn from `noise_key`: 32 secret bytes from the platform's secure generator.
    pub fn new(
        task: TaskSpec,
        id: Identity,
        gpu: Option<&Gpu>,
        train: Samples,
        test: Option<Samples>,
        noise_key: [u8; 32],
        now_ms: f64,
    ) -> Result<Self, String> {
        let model = Model::new(task.model.clone()).map_err(|e| e.to_string())?;
        let init = model.init_params(task.train.seed);
        let own_seed = u64::from_le_bytes(id.public()[..8].try_into().unwrap_or([7; 8]));
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
        let mut peer = Peer::new(
            task.learn.clone(),
            &task.name,
            id,
            init.clone(),
            PeerRole::Trainer,
            now_ms,
        )
        .map_err(|e| e.to_string())?;
        if let Some(dp) = task
            .privacy
            .resolve()
            .map_err(|(f, e)| format!("{f}: {e}"))?
        {
            peer.learner_mut().enable_privacy(dp, noise_key, 0);
        }
        if task.is_local() {
            peer.learner_mut().keep_loss_local();
        }
        let eval = match test {
            Some(full) => Some(Eval {
                batch: model.evaluation_batch(64, task.train.batch),
                cpu: CpuBackend::for_evaluation(model, init).map_err(|e| e.to_string())?,
                each_round: full.round_eval_subset(),
                full,
            }),
            None => None,
        };
        Ok(Self {
            task,
            peer,
            trainer,
            eval,
            backend: gpu.map_or("cpu".to_string(), |g| g.adapter.description.clone()),
            pending: Vec::new(),
            reported_ms: f64::NEG_INFINITY,
            privacy_sink: None,
            privacy_failed: None,
            task_changed: false,
            privacy_kept: 0,
            broken: (0, None),
        })
    }

    /// Local runs that broke so far (a non-finite loss or gradient: nothing of them was
    /// sent, and the peer trained again from its model), and why the last one did.
    pub fn broken_runs(&self) -> (u64, Option<&str>) {
        (self.broken.0, self.broken.1.as_deref())
    }

    /// Starts from a saved model (a keeper's checkpoint) instead of joining.
    pub fn resume(&mut self, snapshot: Snapshot) -> bool {
        self.peer.resume(snapshot)
    }

    /// The protocol state (model, round, counters).
    pub fn learner(&self) -> &Learner {
        self.peer.learner()
    }

    /// The ledger heads this peer holds (see `shoal_shared::trust::head`).
    pub fn witness_mut(&mut self) -> &mut shoal_shared::trust::head::Witness {
        self.peer.learner_mut().witness_mut()
    }

    /// Counts updates this visitor sent under the task's privacy budget on earlier visits
    /// (kept by the page or beside the native peer's key), sent with noise multiplier
    /// `noise_multiplier`; it can only raise the count.
    pub fn note_privacy_sent(&mut self, rounds: u64, noise_multiplier: f64) {
        self.peer
            .learner_mut()
            .note_privacy_sent(rounds, noise_multiplier);
    }

    /// The task.
    pub fn task(&self) -> &TaskSpec {
        &self.task
    }

    /// What to show.
    pub fn progress(&self) -> &Progress {
        self.peer.progress()
    }

    /// Whether training is paused (by the visitor or the researcher).
    pub fn is_paused(&self) -> bool {
        self.peer.is_paused()
    }

    /// Pauses or resumes this peer (the visitor's choice: a button, a hidden tab, a
    /// battery). A paused peer finishes nothing new, keeps its connections, tells its
    /// neighbours not to wait for its updates, and answers no model request.
    pub fn set_paused(&mut self, net: &impl Transport, paused: bool) {
        self.peer.handle(Event::Paused(paused), 0.0);
        let pending = self.flush(net, 0.0);
        self.pending.extend(pending);
    }

    /// The numbers the dashboard shows for this peer.
    pub fn report(&self) -> PeerReport {
        let p = self.peer.progress();
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

    /// Keeps the privacy count with `sink` from now on: it is called with the count and
    /// the noise multiplier before a message leaves whenever the count rose, so that an
    /// update is never out before its round is counted.
    pub fn keep_privacy_count(&mut self, sink: PrivacySink) {
        self.privacy_kept = self.peer.learner().privacy().map_or(0, |p| p.rounds);
        self.privacy_sink = Some(sink);
    }

    /// Sends our report to the server unless one went out within [`REPORT_EVERY_MS`].
    fn report_if_due(&mut self, net: &impl Transport, now_ms: f64) {
        if now_ms - self.reported_ms >= REPORT_EVERY_MS {
            net.report(&self.report());
            self.reported_ms = now_ms;
        }
    }

    /// Sends what the peer queued; anything else it asked for waits for `tick`.
    fn flush(&mut self, net: &impl Transport, now_ms: f64) -> Vec<Output> {
        if let (Some(sink), Some(p)) = (self.privacy_sink.as_mut(), self.peer.learner().privacy())
            && p.rounds > self.privacy_kept
            && self.privacy_failed.is_none()
        {
            match sink(p.rounds, p.noise_multiplier) {
                Ok(()) => self.privacy_kept = p.rounds,
                Err(e) => self.privacy_failed = Some(e),
            }
        }
        let mut rest = Vec::new();
        while let Some(o) = self.peer.poll_output() {
            match o {
                // Fail closed: the count could not be kept, or the task is no longer the
                // server's.
                Output::Send { .. } | Output::Receipt(_)
                    if self.privacy_failed.is_some() || self.task_changed => {}
                Output::Send { to, data } => {
                    // A full queue or a closed channel loses this message: the protocol
                    // copes (deadlines, the next round's update), as with a lost link.
                    let _ = net.send(to, data);
                }
                Output::Drop(peer) => net.drop_neighbour(peer),
                Output::Receipt(r) => {
                    // The server judges a receipt's round against the swarm's recent
                    // reports: a report that is due goes first (our very first, and one
                    // after a pause long enough for our last to age out).
                    self.report_if_due(net, now_ms);
                    net.receipt(&r);
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// Why the privacy count could not be kept, if it could not: the trainer sends
    /// nothing since, and its driver should stop.
    pub fn privacy_failed(&self) -> Option<&str> {
        self.privacy_failed.as_deref()
    }

    /// Whether the server said it runs another revision of the task than this peer
    /// loaded: the trainer sends nothing since, and its driver should stop.
    pub fn task_changed(&self) -> bool {
        self.task_changed
    }

    /// Takes in one transport event.
    pub fn handle(&mut self, ev: SwarmEvent, net: &impl Transport, now_ms: f64) {
        if matches!(ev, SwarmEvent::TaskChanged) {
            self.task_changed = true;
        }
        if let Some(ev) = peer_event(ev) {
            self.peer.handle(ev, now_ms);
        }
        let pending = self.flush(net, now_ms);
        self.pending.extend(pending);
    }

    /// Advances the peer: runs the local training it asks for and closes rounds; returns
    /// the round's summary when a round closed. `clock` gives the time in milliseconds
    /// (read again after training, which takes a while).
    pub async fn tick(
        &mut self,
        net: &impl Transport,
        clock: impl Fn() -> f64,
    ) -> Result<Option<RoundSummary>, EngineError> {
        let now_ms = clock();
        self.peer.tick(now_ms);
        let mut todo: Vec<Output> = std::mem::take(&mut self.pending);
        todo.extend(self.flush(net, now_ms));
        let mut closed = None;
        while !todo.is_empty() {
            for o in std::mem::take(&mut todo) {
                match o {
                    Output::Train {
                        round,
                        steps,
                        resume,
                    } => {
                        // A run that breaks (a non-finite loss or gradient: a batch of
                        // the visitor's data, or a model the swarm or a download led to)
                        // is the peer's to drop: it sends nothing of it and trains again
                        // from its model. Before, the error ended the page's training
                        // (and the native peer) for good.
                        let trained = match self.train(round, steps, resume).await {
                            Ok((local, loss, samples)) => {
                                self.peer.trained(round, &local, loss, samples, clock())
                            }
                            // Told as a run of no values, which the peer drops as broken (its
                            // own error says only that).
                            Err(EngineError::NonFinite(what)) => {
                                let _ = self.peer.trained(round, &[], f32::NAN, 0, clock());
                                Err(LearnError::BadLocal(format!("non-finite {what}")))
                            }
                            Err(e) => return Err(e),
                        };
                        if let Err(e) = trained {
                            self.broken.0 += 1;
                            self.broken.1 = Some(e.to_string());
                        }
                    }
                    Output::RoundClosed(summary) => {
                        self.evaluate();
                        self.report_if_due(net, now_ms);
                        closed = Some(summary);
                    }
                    Output::Adopted { .. } => self.evaluate(),
                    // Carried out by `flush`.
                    Output::Send { .. } | Output::Receipt(_) | Output::Drop(_) => {}
                }
            }
            todo = self.flush(net, clock());
        }
        Ok(closed)
    }

    /// `steps` inner steps at the round's learning rate, from what the peer says (or on
    /// from where the last ones ended, `resume`).
    async fn train(
        &mut self,
        round: u64,
        steps: u32,
        resume: bool,
    ) -> Result<(Vec<f32>, f32, u32), EngineError> {
        if !resume {
            self.trainer.backend.load_weights(self.peer.train_from())?;
        }
        self.trainer
            .backend
            .set_learning_rate(self.task.lr_at(round))?;
        self.trainer.run(steps as usize)?;
        let loss = self.trainer.backend.loss().await?;
        let local = self.trainer.backend.params().await?;
        let samples = (steps as usize * self.task.train.batch) as u32;
        Ok((local, loss, samples))
    }

    /// Measures the current model on the fixed held-out subset.
    fn evaluate(&mut self) {
        if let Some(e) = &mut self.eval
            && e.cpu.set_params(self.peer.weights()).is_ok()
        {
            let t = &e.each_round;
            let eval = e.cpu.evaluate(&t.inputs, &t.labels, e.batch).ok();
            self.peer.set_evaluation(eval);
        }
    }

    /// The current model continues a visitor's `prompt` (at most [`TRY_PROMPT_BYTES`]; a
    /// longer one keeps its end) by [`TRY_BYTES`] bytes, sampled at temperature 0.8 with
    /// `seed`. An error for an image task, or before the peer holds a model.
    pub fn try_text(&mut self, prompt: &[u8], seed: u64) -> Result<Vec<u8>, String> {
        let cpu = self.try_backend()?;
        let prompt = &prompt[prompt.len().saturating_sub(TRY_PROMPT_BYTES)..];
        cpu.generate(prompt, TRY_BYTES, 0.8, seed)
            .map_err(|e| e.to_string())
    }

    /// The current model's class probabilities for one image given as bytes (0 black
    /// .. 255 white, row-major, the task's input shape). An error for a language model,
    /// an image of the wrong size, or before the peer holds a model.
    pub fn classify(&mut self, pixels: &[u8]) -> Result<Vec<f32>, String> {
        let cpu = self.try_backend()?;
        let model = cpu.model().clone();
        if model.is_language_model() {
            return Err("a language model continues text; it does not classify images".into());
        }
        if pixels.len() != model.input_len() {
            return Err(format!(
                "an image of {} values, where the model takes {}",
                pixels.len(),
                model.input_len()
            ));
        }
        let x = shoal_shared::engine::normalize_pixels(pixels);
        class_probabilities(cpu.logits(&x, 1))
    }

    /// The CPU backend loaded with the current model.
    fn try_backend(&mut self) -> Result<&mut CpuBackend, String> {
        if !self.peer.has_model() {
            return Err("the peer holds no model yet: it is still joining the swarm".into());
        }
        let e = self
            .eval
            .as_mut()
            .ok_or("this peer was started without the task's held-out data")?;
        e.cpu
            .set_params(self.peer.weights())
            .map_err(|e| e.to_string())?;
        Ok(&mut e.cpu)
    }

    /// The current model's held-out loss and accuracy over the whole held-out split (what
    /// an export states), when this peer has one.
    pub fn evaluate_all(&mut self) -> Option<(f32, f32)> {
        let e = self.eval.as_mut()?;
        e.cpu.set_params(self.peer.weights()).ok()?;
        e.cpu.evaluate(&e.full.inputs, &e.full.labels, e.batch).ok()
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::future::Future;

    use shoal_shared::protocol::PeerId;

    use super::*;
    use crate::swarm::SendError;

    /// A transport that keeps what a driver hands it: the messages, to deliver by hand,
    /// and the order of its reports and receipts for the server.
    struct Recorder {
        me: PeerId,
        other: PeerId,
        sent: RefCell<Vec<Vec<u8>>>,
        server: RefCell<Vec<&'static str>>,
    }

    impl Transport for Recorder {
        fn id(&self) -> Option<PeerId> {
            Some(self.me)
        }
        fn peers(&self) -> Vec<PeerId> {
            vec![self.other]
        }
        fn send(&self, _: PeerId, data: Vec<u8>) -> Result<(), SendError> {
            self.sent.borrow_mut().push(data);
            Ok(())
        }
        fn next_event(&mut self) -> impl Future<Output = Option<SwarmEvent>> {
            std::future::ready(None)
        }
        fn report(&self, _: &PeerReport) {
            self.server.borrow_mut().push("report");
        }
        fn receipt(&self, _: &[u8]) {
            self.server.borrow_mut().push("receipt");
        }
        fn drop_neighbour(&self, _: PeerId) {
            self.server.borrow_mut().push("drop");
        }
    }

    /// 64 made-up 28x28 images, enough for the demo task's model to train on.
    fn samples() -> Samples {
        let n = 64;
        Samples {
            inputs: (0..n * 784)
                .map(|i| ((i * 7919) % 255) as f32 / 255.0)
                .collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            dim: 784,
            shape: [28, 28, 1],
            positions: 1,
        }
    }

    /// The demo task in rounds of steps (a round's training does not depend on how fast
    /// a test's clock says it went) and without an upload budget.
    fn demo_in_rounds_of_steps() -> TaskSpec {
        let mut task =
            TaskSpec::from_toml(include_str!("../../tasks/digits.toml")).expect("the demo task");
        task.learn.round_ms = 0;
        task.learn.upload_mb_per_hour = 0;
        task
    }

    /// Two peers 1 and 2 of `task`, each told the other is up, and their transports
    /// (messages carried by hand).
    fn two_peers(task: &TaskSpec) -> ([PeerId; 2], Vec<Recorder>, Vec<SwarmTrainer>) {
        two_peers_on(task, [samples(), samples()])
    }

    /// [`two_peers`], training on `data`.
    fn two_peers_on(
        task: &TaskSpec,
        data: [Samples; 2],
    ) -> ([PeerId; 2], Vec<Recorder>, Vec<SwarmTrainer>) {
        let ids = [PeerId(1), PeerId(2)];
        let nets: Vec<Recorder> = (0..2)
            .map(|i| Recorder {
                me: ids[i],
                other: ids[1 - i],
                sent: RefCell::default(),
                server: RefCell::default(),
            })
            .collect();
        let mut peers: Vec<SwarmTrainer> = data
            .into_iter()
            .zip(1u8..)
            .map(|(data, i)| {
                let id = Identity::from_seed([i; 32]);
                SwarmTrainer::new(task.clone(), id, None, data, None, [9; 32], 0.0)
                    .expect("a peer of the task")
            })
            .collect();
        for (i, peer) in peers.iter_mut().enumerate() {
            peer.handle(SwarmEvent::PeerUp(ids[1 - i]), &nets[i], 0.0);
        }
        (ids, nets, peers)
    }

    /// Ticks the two peers in turn every 20 ms of a clock that each read moves on
    /// `per_read` ms, carrying what each sends to the other, until the second has sent two
    /// updates (or a minute has passed); returns how many updates each sent.
    fn until_two_updates(
        ids: &[PeerId; 2],
        nets: &[Recorder],
        peers: &mut [SwarmTrainer],
        per_read: f64,
    ) -> [u32; 2] {
        let now = Cell::new(0.0);
        let clock = || {
            now.set(now.get() + per_read);
            now.get()
        };
        let n = peers[0].peer.weights().len();
        let mut updates = [0; 2];
        while now.get() < 60_000.0 && updates[1] < 2 {
            now.set(now.get() + 20.0);
            for i in 0..2 {
                pollster::block_on(peers[i].tick(&nets[i], clock)).expect("a tick");
                let sent = std::mem::take(&mut *nets[i].sent.borrow_mut());
                for data in sent {
                    if matches!(
                        shoal_shared::learn::wire::PeerMessage::decode(&data, n),
                        Ok(shoal_shared::learn::wire::PeerMessage::Update(_))
                    ) {
                        updates[i] += 1;
                    }
                    let ev = SwarmEvent::Message { from: ids[i], data };
                    peers[1 - i].handle(ev, &nets[1 - i], now.get());
                }
            }
        }
        updates
    }

    /// A neighbour that breaks the protocol as no honest peer does (here a gossip mix,
    /// in a task that exchanges weights) is handed to the transport to close and report
    /// `unreachable`, once: it must not keep one of the peer's few neighbour slots.
    #[test]
    fn a_neighbour_that_breaks_the_protocol_is_dropped_through_the_transport() {
        let task =
            TaskSpec::from_toml(include_str!("../../tasks/digits.toml")).expect("the demo task");
        let net = Recorder {
            me: PeerId(1),
            other: PeerId(2),
            sent: RefCell::default(),
            server: RefCell::default(),
        };
        let id = Identity::from_seed([1; 32]);
        let mut peer = SwarmTrainer::new(task, id, None, samples(), None, [9; 32], 0.0)
            .expect("a peer of the demo task");
        peer.handle(SwarmEvent::PeerUp(PeerId(2)), &net, 0.0);
        let n = peer.peer.weights().len();
        let payload = shoal_shared::learn::compress::encode_once(
            shoal_shared::learn::Compression::Int8 { block: 256 },
            &vec![0.0; n],
        );
        let mix = shoal_shared::learn::wire::PeerMessage::Mix { round: 0, payload }.encode();
        for t in [10.0, 20.0] {
            let ev = SwarmEvent::Message {
                from: PeerId(2),
                data: mix.clone(),
            };
            peer.handle(ev, &net, t);
        }
        assert_eq!(*net.server.borrow(), ["drop"]);
    }

    /// The server judges a receipt's round against the task's reports: a peer's first
    /// receipt must not reach it before the peer's first report (it was refused
    /// `implausible_round` while no peer of the task had reported). Two peers of the
    /// demo task train together here, their messages carried by hand, until both have
    /// sent receipts.
    #[test]
    fn a_peer_sends_its_first_report_before_its_first_receipt() {
        let (ids, nets, mut peers) = two_peers(&demo_in_rounds_of_steps());
        // Each read of the clock moves it on 5 ms.
        let now = Cell::new(0.0);
        let clock = || {
            now.set(now.get() + 5.0);
            now.get()
        };
        let both_sent_receipts = || nets.iter().all(|n| n.server.borrow().contains(&"receipt"));
        while !both_sent_receipts() && now.get() < 120_000.0 {
            now.set(now.get() + 20.0);
            for i in 0..2 {
                pollster::block_on(peers[i].tick(&nets[i], clock)).expect("a tick");
                let sent = std::mem::take(&mut *nets[i].sent.borrow_mut());
                for data in sent {
                    let ev = SwarmEvent::Message { from: ids[i], data };
                    peers[1 - i].handle(ev, &nets[1 - i], now.get());
                }
            }
        }
        for n in &nets {
            // The first receipt came before any round of ours closed (a round's close
            // sends a due report too, which would hide a receipt sent without one).
            let calls = n.server.borrow();
            assert!(
                calls.starts_with(&["report", "receipt"]),
                "peer {}: the server got {calls:?}",
                n.me
            );
        }
    }

    /// A local run that breaks (here every batch holds a non-finite value) sends nothing
    /// and the peer trains again from its model, in both kinds of round; the page's
    /// training (and the native peer) used to end for good at the first.
    #[test]
    fn a_run_that_breaks_sends_nothing_and_the_peer_trains_on() {
        for round_ms in [0, 1000] {
            let mut task = TaskSpec::from_toml(include_str!("../../tasks/digits.toml"))
                .expect("the demo task");
            task.learn.round_ms = round_ms;
            task.learn.upload_mb_per_hour = 0;
            let mut bad = samples();
            for x in bad.inputs.iter_mut().step_by(784) {
                *x = f32::NAN;
            }
            let (ids, nets, mut peers) = two_peers_on(&task, [bad, samples()]);
            // Rounds in time size their runs by the speed the clock shows: each read of it
            // moves it on as a real run of a few steps would.
            let per_read = if round_ms == 0 { 5.0 } else { 200.0 };
            let updates = until_two_updates(&ids, &nets, &mut peers, per_read);
            assert_eq!(updates, [0, 2], "round_ms {round_ms}");
            let (broken, why) = peers[0].broken_runs();
            assert!(
                broken >= 2,
                "round_ms {round_ms}: it trained again ({broken})"
            );
            assert!(why.is_some_and(|w| w.contains("non-finite")), "{why:?}");
            assert_eq!(peers[1].broken_runs().0, 0);
        }
    }

    /// A peer whose privacy count cannot be kept (a read-only folder, a full disk) sends
    /// no update: before, the failure was only logged and the update went out, so a
    /// restart (which reads no count) spent the budget again.
    #[test]
    fn a_peer_whose_privacy_count_cannot_be_kept_sends_no_update() {
        let private = include_str!("../../tasks/digits.toml").replace(
            "[privacy]",
            "[privacy]\nclip = 1.0\nepsilon = 8.0\ndelta = 1e-5\nrounds = 50\non_budget = \"stop\"",
        );
        let mut task = TaskSpec::from_toml(&private).expect("a private task");
        task.learn.round_ms = 0;
        task.learn.upload_mb_per_hour = 0;
        let (ids, nets, mut peers) = two_peers(&task);
        let tried = std::rc::Rc::new(Cell::new(0u64));
        let seen = std::rc::Rc::clone(&tried);
        peers[0].keep_privacy_count(Box::new(move |rounds, _| {
            seen.set(rounds);
            Err("read-only file system".into())
        }));
        peers[1].keep_privacy_count(Box::new(|_, _| Ok(())));
        let updates = until_two_updates(&ids, &nets, &mut peers, 5.0);
        assert_eq!(updates[1], 2, "the other peer trains and sends");
        assert!(tried.get() >= 1, "the count was to be kept");
        assert_eq!(updates[0], 0, "no update left uncounted");
        assert_eq!(peers[0].privacy_failed(), Some("read-only file system"));
        assert!(peers[1].privacy_failed().is_none());
    }

    /// A peer told that the server runs another revision of the task (`task_changed`:
    /// it restarted with the task or its data changed) sends nothing since: before, a
    /// tab loaded before the change trained on among the new task's peers (under other
    /// privacy settings, unnoised updates in a swarm said to be noised).
    #[test]
    fn a_peer_told_the_task_changed_sends_nothing_more() {
        let (ids, nets, mut peers) = two_peers(&demo_in_rounds_of_steps());
        peers[0].handle(SwarmEvent::TaskChanged, &nets[0], 0.0);
        let updates = until_two_updates(&ids, &nets, &mut peers, 5.0);
        assert_eq!(updates, [0, 2], "only the other peer sends");
        assert!(peers[0].task_changed() && !peers[1].task_changed());
    }

    /// An image's class probabilities need every output finite: one NaN beside finite
    /// ones passed (only the largest was checked) and every class read 0%.
    #[test]
    fn class_probabilities_refuse_any_output_that_is_not_finite() {
        assert!(class_probabilities(&[f32::NAN, 2.0]).is_err());
        assert!(class_probabilities(&[1.0, f32::NEG_INFINITY]).is_err());
        let p = class_probabilities(&[0.0, 0.0, 2.0f32.ln()]).expect("finite");
        assert!(
            (p[2] - 0.5).abs() < 1e-6 && (p[0] - 0.25).abs() < 1e-6,
            "{p:?}"
        );
    }
}

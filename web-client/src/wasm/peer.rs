//! The browser's swarm peer, split across the page's two threads. Browsers offer
//! `RTCPeerConnection` only on the main thread, so the page runs the transport (`Swarm`)
//! there and the Web Worker runs this training loop; the two pass events and outgoing
//! messages with `postMessage`. [`Relay`] is the worker's view of the transport: the
//! [`Transport`] the training loop sees, fed by `event()` and drained by `outgoing()`.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;

use js_sys::{Array, Uint8Array};
use shoal_shared::engine::train::Samples;
use shoal_shared::gpu::Gpu;
use shoal_shared::learn::Identity;
use shoal_shared::learn::identity::{hex, parse_seed};
use shoal_shared::protocol::{PeerId, PeerReport, from_hex};
use wasm_bindgen::prelude::*;

use super::now_ms;
use super::transport::parse_peer;
use crate::learning::SwarmTrainer;
use crate::swarm::{Inbox, MAX_MESSAGE, MAX_QUEUED, SendError, SwarmEvent, Transport};
use shoal_shared::task::TaskSpec;

/// The worker's side of the transport (the training peer's and the dashboard observer's).
#[derive(Default)]
pub struct Relay {
    pub(super) peers: RefCell<BTreeSet<PeerId>>,
    /// Events from the page not yet handled, bounded per neighbour.
    inbox: RefCell<Inbox>,
    pub(super) outbox: RefCell<VecDeque<(PeerId, Vec<u8>)>>,
    /// A visitor's pause that arrived while a tick held the peer.
    pending_pause: std::cell::Cell<Option<bool>>,
    /// The latest report for the server, until the page takes it.
    pub(super) report: RefCell<Option<PeerReport>>,
    /// Receipts for the server, until the page takes them.
    pub(super) receipts: RefCell<Vec<Vec<u8>>>,
    /// Neighbours the page is to close and report `unreachable` (they broke the
    /// protocol), until it takes them.
    drops: RefCell<Vec<PeerId>>,
}

impl Relay {
    /// A relay for `task`'s peer or observer: it takes no message longer than the task's
    /// largest (see [`max_message_for_task`](crate::swarm::max_message_for_task)).
    pub fn for_task(task: &TaskSpec) -> Self {
        Self {
            inbox: RefCell::new(Inbox::new(crate::swarm::max_message_for_task(task))),
            ..Self::default()
        }
    }

    fn queued(&self) -> usize {
        self.outbox.borrow().iter().map(|(_, d)| d.len()).sum()
    }

    /// Queues a transport event from the page: `kind` is "peer_up", "peer_down" or
    /// "message" (with `data`). Unknown kinds and bad peer ids are refused.
    pub fn event(&self, kind: &str, peer: &str, data: Option<Vec<u8>>) -> Result<(), JsError> {
        let p = parse_peer(peer)?;
        let ev = match (kind, data) {
            ("peer_up", _) => {
                self.peers.borrow_mut().insert(p);
                SwarmEvent::PeerUp(p)
            }
            ("peer_down", _) => {
                self.peers.borrow_mut().remove(&p);
                self.outbox.borrow_mut().retain(|(to, _)| *to != p);
                SwarmEvent::PeerDown(p)
            }
            ("message", Some(data)) => SwarmEvent::Message { from: p, data },
            _ => return Err(JsError::new(&format!("unknown event {kind:?}"))),
        };
        // A message past its sender's share of the inbox is dropped (and counted): the
        // swarm's deadlines make sure nobody waits for it.
        self.inbox.borrow_mut().push(ev);
        Ok(())
    }

    /// The oldest event not yet taken.
    pub fn pop_event(&self) -> Option<SwarmEvent> {
        self.inbox.borrow_mut().pop()
    }

    /// Queues an event made on this side (a pause of the task), through the same inbox.
    fn push_event(&self, ev: SwarmEvent) {
        self.inbox.borrow_mut().push(ev);
    }

    /// Messages from neighbours dropped so far because their sender was past its share
    /// of the inbox.
    pub fn dropped(&self) -> u64 {
        self.inbox.borrow().dropped()
    }

    /// Takes over what arrived before this relay's peer or observer existed: the
    /// neighbours that are up, the events in order, and the count of drops.
    pub fn adopt(&self, early: &EarlyEvents) {
        self.peers
            .borrow_mut()
            .extend(early.relay.peers.borrow_mut().iter().copied());
        self.inbox
            .borrow_mut()
            .adopt(&mut early.relay.inbox.borrow_mut());
    }

    /// The latest report for the server, if a new one was made since the last call.
    pub fn take_report(&self) -> Option<PeerReport> {
        self.report.borrow_mut().take()
    }

    /// The messages to send, as `[peer, Uint8Array]` pairs, oldest first.
    pub fn drain(&self) -> Array {
        self.outbox
            .borrow_mut()
            .drain(..)
            .map(|(p, d)| Array::of2(&p.to_string().into(), &Uint8Array::from(&d[..])))
            .collect()
    }

    /// The neighbours to close and report `unreachable`, since the last call.
    pub fn take_drops(&self) -> Vec<String> {
        self.drops
            .borrow_mut()
            .drain(..)
            .map(|p| p.to_string())
            .collect()
    }
}

impl Transport for Relay {
    fn id(&self) -> Option<PeerId> {
        None
    }

    fn peers(&self) -> Vec<PeerId> {
        self.peers.borrow().iter().copied().collect()
    }

    fn send(&self, peer: PeerId, data: Vec<u8>) -> Result<(), SendError> {
        if data.len() > MAX_MESSAGE {
            return Err(SendError::TooLarge);
        }
        if !self.peers.borrow().contains(&peer) {
            return Err(SendError::NoSuchPeer(peer));
        }
        if self.queued() + data.len() > MAX_QUEUED {
            return Err(SendError::Full(peer));
        }
        self.outbox.borrow_mut().push_back((peer, data));
        Ok(())
    }

    fn report(&self, report: &PeerReport) {
        *self.report.borrow_mut() = Some(report.clone());
    }

    fn receipt(&self, receipt: &[u8]) {
        let mut r = self.receipts.borrow_mut();
        // The page takes them every tick; a page that stopped taking them loses the
        // oldest, not the worker's memory.
        if r.len() >= 256 {
            r.remove(0);
        }
        r.push(receipt.to_vec());
    }

    async fn next_event(&mut self) -> Option<SwarmEvent> {
        self.pop_event()
    }

    fn drop_neighbour(&self, peer: PeerId) {
        // Nothing more goes to it; the page closes the connection.
        self.outbox.borrow_mut().retain(|(to, _)| *to != peer);
        let mut drops = self.drops.borrow_mut();
        if !drops.contains(&peer) {
            drops.push(peer);
        }
    }
}

/// Transport events that arrive from the page before the worker's peer (or observer)
/// exists, while the task's data downloads: queued with the same bounds as the peer's own
/// inbox (see [`Inbox`]) and handed over by `adopt`.
#[wasm_bindgen]
#[derive(Default)]
pub struct EarlyEvents {
    relay: Relay,
}

#[wasm_bindgen]
impl EarlyEvents {
    /// An empty queue.
    #[wasm_bindgen(constructor)]
    pub fn new() -> EarlyEvents {
        Self::default()
    }

    /// A transport event from the page (as for `SwarmPeer.event`).
    pub fn event(&self, kind: &str, peer: &str, data: Option<Vec<u8>>) -> Result<(), JsError> {
        self.relay.event(kind, peer, data)
    }

    /// Messages dropped so far (their sender was past its share).
    pub fn dropped(&self) -> f64 {
        self.relay.dropped() as f64
    }

    /// Bounds what it takes by the task's largest message once the task's parameter
    /// count is known (its description's `cost.parameters`), while the data downloads;
    /// until then by the largest of any task.
    #[wasm_bindgen(js_name = setParameters)]
    pub fn set_parameters(&self, parameters: f64) {
        if let Some(limit) = crate::swarm::max_message_for_count(parameters) {
            self.relay.inbox.borrow_mut().set_limit(limit);
        }
    }
}

/// A swarm member that trains: downloads the current model from a neighbour, then trains
/// and exchanges updates round after round.
#[wasm_bindgen]
pub struct SwarmPeer {
    relay: Rc<Relay>,
    /// `None` while a `tick()` has it (across its awaits).
    inner: Rc<RefCell<Option<SwarmTrainer>>>,
    key: String,
}

#[wasm_bindgen]
impl SwarmPeer {
    /// A peer for a task. `task` is the task's JSON from `/api/tasks/{name}`; `files`
    /// the bytes of its data files in the order the description lists them (`files.train`
    /// then `files.test`). `secret` is this visitor's identity: 64 hex digits kept in
    /// browser storage (the page makes them with `crypto.getRandomValues` on the first
    /// visit). `backend` is "webgpu" or "cpu". A task on visitors' own files trains on
    /// `local` (checked by [`LocalFiles`](super::LocalFiles)); `files` are then its test
    /// files only.
    pub async fn create(
        backend: String,
        secret: String,
        task: String,
        files: Vec<Uint8Array>,
        local: Option<super::LocalFiles>,
    ) -> Result<SwarmPeer, JsError> {
        let task = TaskSpec::from_json(&task).map_err(|e| JsError::new(&e.to_string()))?;
        let id =
            Identity::from_seed(parse_seed(&secret).map_err(|e| JsError::new(&e.to_string()))?);
        let gpu = match backend.as_str() {
            "webgpu" => Some(Gpu::new().await.map_err(|e| JsError::new(&e.to_string()))?),
            "cpu" => None,
            other => return Err(JsError::new(&format!("unknown backend {other:?}"))),
        };
        let bytes: Vec<Vec<u8>> = files.iter().map(Uint8Array::to_vec).collect();
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let (train, test) = match (task.is_local(), local) {
            (false, _) => task
                .datasets(&refs)
                .map_err(|e| JsError::new(&e.to_string()))?,
            (true, Some(local)) => (
                local.inner.into_dataset().map_err(|e| JsError::new(&e))?,
                task.test_dataset(&refs)
                    .map_err(|e| JsError::new(&e.to_string()))?,
            ),
            (true, None) => {
                return Err(JsError::new(
                    "this task trains on your own files: choose them first",
                ));
            }
        };
        let (train, test) = (Samples::from_dataset(&train), Samples::from_dataset(&test));
        let key = hex(&id.public());
        let relay = Rc::new(Relay::for_task(&task));
        let peer = SwarmTrainer::new(
            task,
            id,
            gpu.as_ref(),
            train,
            Some(test),
            secure_random()?,
            now_ms(),
        )
        .map_err(|e| JsError::new(&e))?;
        Ok(Self {
            relay,
            inner: Rc::new(RefCell::new(Some(peer))),
            key,
        })
    }

    /// Counts the updates this visitor sent under the task's privacy budget on earlier
    /// visits, with the noise multiplier they were sent with (the page keeps both); it
    /// can only raise the count.
    #[wasm_bindgen(js_name = notePrivacySent)]
    pub fn note_privacy_sent(&self, rounds: f64, noise_multiplier: f64) -> Result<(), JsError> {
        if !(rounds >= 0.0 && rounds.is_finite()) {
            return Err(JsError::new(&format!("rounds {rounds} is not a count")));
        }
        match self.inner.borrow_mut().as_mut() {
            Some(peer) => {
                peer.note_privacy_sent(rounds as u64, noise_multiplier);
                Ok(())
            }
            None => Err(JsError::new("the peer is busy: call before the first tick")),
        }
    }

    /// This peer's public key (hex).
    #[wasm_bindgen(js_name = publicKey)]
    pub fn public_key(&self) -> String {
        self.key.clone()
    }

    /// A transport event from the page: `kind` is "peer_up", "peer_down" or "message"
    /// (with `data`). Unknown kinds and bad peer ids are refused; a message past its
    /// sender's share of the inbox is dropped (`inbox_dropped` in the progress counts them).
    pub fn event(&self, kind: &str, peer: &str, data: Option<Vec<u8>>) -> Result<(), JsError> {
        self.relay.event(kind, peer, data)
    }

    /// Takes over the events that arrived before this peer existed (call it right after
    /// `create` resolves, before the next event).
    pub fn adopt(&self, early: &EarlyEvents) {
        self.relay.adopt(early);
    }

    /// Pauses or resumes training: `by` is "visitor" (a button, a hidden tab, a battery)
    /// or "task" (the researcher, relayed from the server's `task_state`).
    #[wasm_bindgen(js_name = setPaused)]
    pub fn set_paused(&self, by: &str, paused: bool) -> Result<(), JsError> {
        let ev = match by {
            "visitor" => None,
            "task" => Some(SwarmEvent::TaskState { paused }),
            other => return Err(JsError::new(&format!("unknown pause source {other:?}"))),
        };
        match ev {
            // Through the event queue, so that a tick in progress sees it next.
            Some(ev) => self.relay.push_event(ev),
            None => {
                let mut inner = self.inner.borrow_mut();
                match inner.as_mut() {
                    Some(peer) => peer.set_paused(&*self.relay, paused),
                    None => self.relay.pending_pause.set(Some(paused)),
                }
            }
        }
        Ok(())
    }

    /// A ledger head this browser checked on an earlier visit (hex, as the page kept
    /// it): checked again, and gossiped to neighbours. Call between ticks.
    #[wasm_bindgen(js_name = rememberHead)]
    pub fn remember_head(&self, head: &str) -> Result<(), JsError> {
        let bytes = from_hex(head).ok_or_else(|| JsError::new("the head is not hex"))?;
        self.with_witness(|w| w.remember(&bytes).map_err(|e| JsError::new(&e.to_string())))
    }

    /// The ledger entries a check needs the hashes of (indexes; at most two).
    #[wasm_bindgen(js_name = ledgerLookups)]
    pub fn ledger_lookups(&self) -> Result<Vec<f64>, JsError> {
        self.with_witness(|w| Ok(w.lookups().into_iter().map(|i| i as f64).collect()))
    }

    /// Checks the heads held against the server's: `now` its current signed head (hex,
    /// `signed_head` of a ledger page; null when it shows none), `indexes` the entries
    /// looked up ([`ledgerLookups`](Self::ledger_lookups)) and `hashes` the hash the
    /// server shows at each (hex; "" where it has no entry there). A head that is not hex
    /// counts as one that does not check out, and a hash that is not 64 hex digits as no
    /// entry: a server that cut its ledger must not escape by answering garbage (the
    /// error of a failed check left the page's last verdict standing). JSON `null` when there
    /// is nothing to judge, `{"ok": true, "count", "head"}` (`head`: the signed head to
    /// keep for the next visit) or `{"ok": false, "count", "reason", "evidence"}`
    /// (`evidence`: the head the server signed and no longer holds). Call between ticks.
    #[wasm_bindgen(js_name = checkLedger)]
    pub fn check_ledger(
        &self,
        now: Option<String>,
        indexes: Vec<f64>,
        hashes: Vec<String>,
    ) -> Result<String, JsError> {
        use shoal_shared::trust::head::Verdict;
        let now = now.map(|h| from_hex(&h).unwrap_or_default());
        let entries: Vec<(u64, Option<[u8; 32]>)> = indexes
            .iter()
            .zip(&hashes)
            .map(|(i, h)| {
                (
                    *i as u64,
                    from_hex(h).and_then(|b| <[u8; 32]>::try_from(b).ok()),
                )
            })
            .collect();
        self.with_witness(|w| {
            let v = w
                .check(now.as_deref(), &entries)
                .map_err(|e| JsError::new(&e.to_string()))?;
            let json = match v {
                None => serde_json::Value::Null,
                Some(Verdict::Intact { count }) => serde_json::json!({
                    "ok": true,
                    "count": count,
                    "head": w.checked().map(|h| hex(&h.encode())),
                }),
                Some(Verdict::Rewritten { head, found }) => serde_json::json!({
                    "ok": false,
                    "count": head.count,
                    "reason": format!("the server signed {} receipts ending in {}…, and {found}", head.count, &hex(&head.hash)[..16]),
                    "evidence": hex(&head.encode()),
                }),
            };
            Ok(json.to_string())
        })
    }

    fn with_witness<T>(
        &self,
        f: impl FnOnce(&mut shoal_shared::trust::head::Witness) -> Result<T, JsError>,
    ) -> Result<T, JsError> {
        let mut inner = self.inner.borrow_mut();
        let peer = inner
            .as_mut()
            .ok_or_else(|| JsError::new("the peer is busy with a tick"))?;
        f(peer.witness_mut())
    }

    /// The messages to send, as `[peer, Uint8Array]` pairs, oldest first.
    pub fn outgoing(&self) -> Array {
        self.relay.drain()
    }

    /// Neighbours that broke the protocol, for the page to close and report
    /// `unreachable` (`Swarm.dropNeighbour`), since the last call.
    #[wasm_bindgen(js_name = takeDrops)]
    pub fn take_drops(&self) -> Vec<String> {
        self.relay.take_drops()
    }

    /// Tries the current model on a visitor's input, here in the worker (call it between
    /// ticks). `kind` "text": `input` is the prompt's UTF-8 bytes; resolves to JSON
    /// `{"version", "text"}`, the model's continuation. `kind` "image": `input` is the
    /// picture's grey levels (0 black .. 255 white, row-major, the task's input shape);
    /// JSON `{"version", "probabilities"}`, one per class. Nothing leaves the worker.
    #[wasm_bindgen(js_name = tryModel)]
    pub fn try_model(&self, kind: &str, input: Vec<u8>, seed: f64) -> Result<String, JsError> {
        let mut inner = self.inner.borrow_mut();
        let peer = inner
            .as_mut()
            .ok_or_else(|| JsError::new("the peer is busy with a round; try again"))?;
        let version = peer.progress().round;
        let out = match kind {
            "text" => {
                let text = peer
                    .try_text(&input, seed as u64)
                    .map_err(|e| JsError::new(&e))?;
                serde_json::json!({ "version": version, "text": String::from_utf8_lossy(&text) })
            }
            "image" => {
                let p = peer.classify(&input).map_err(|e| JsError::new(&e))?;
                serde_json::json!({ "version": version, "probabilities": p })
            }
            other => {
                return Err(JsError::new(&format!(
                    "unknown kind {other:?} (text, image)"
                )));
            }
        };
        Ok(out.to_string())
    }

    /// Takes in the events received so far, then advances training by one step (a whole
    /// round's local steps, or in rounds sized in time one chunk of about 200 ms; or
    /// closing the round; or nothing while waiting). Resolves to the progress as JSON,
    /// with `"closed": true` when a round closed and `"trained": true` when it trained.
    pub fn tick(&self) -> js_sys::Promise {
        let inner = Rc::clone(&self.inner);
        let relay = Rc::clone(&self.relay);
        wasm_bindgen_futures::future_to_promise(async move {
            let taken = inner.borrow_mut().take();
            let mut peer = taken.ok_or_else(|| JsError::new("tick() is already running"))?;
            if let Some(p) = relay.pending_pause.take() {
                peer.set_paused(&*relay, p);
            }
            loop {
                let ev = relay.pop_event();
                let Some(ev) = ev else { break };
                peer.handle(ev, &*relay, now_ms());
            }
            let steps = peer.progress().local_steps;
            let broken = peer.broken_runs().0;
            let closed = peer.tick(&*relay, now_ms).await;
            let mut progress = serde_json::to_value(peer.progress()).unwrap_or_default();
            // Whether this tick trained (the worker's throttle rests after training): a run
            // that broke took its time as well (without it, runs that kept breaking ran
            // back to back whatever the visitor's throttle).
            let trained = peer.progress().local_steps > steps || peer.broken_runs().0 > broken;
            progress["trained"] = trained.into();
            progress["wasm_memory_bytes"] = super::wasm_memory_bytes().into();
            progress["inbox_dropped"] = relay.dropped().into();
            // Local runs that broke (non-finite): dropped, and training went on.
            progress["broken_runs"] = peer.broken_runs().0.into();
            let receipts: Vec<String> = relay
                .receipts
                .borrow_mut()
                .drain(..)
                .map(|r| shoal_shared::learn::identity::hex(&r))
                .collect();
            if !receipts.is_empty() {
                progress["signed_receipts"] = serde_json::to_value(receipts).unwrap_or_default();
            }
            if let Some(r) = relay.take_report() {
                progress["report"] = serde_json::to_value(r).unwrap_or_default();
            }
            *inner.borrow_mut() = Some(peer);
            let closed = closed.map_err(|e| JsError::new(&e.to_string()))?;
            progress["closed"] = closed.is_some().into();
            Ok(JsValue::from_str(&progress.to_string()))
        })
    }
}

/// 32 bytes from the platform's secure generator (`crypto.getRandomValues`, in a page
/// or a worker): the key of a peer's privacy noise, an observer's draws.
pub fn secure_random() -> Result<[u8; 32], JsError> {
    use wasm_bindgen::JsCast;
    let missing = |_| JsError::new("crypto.getRandomValues is not available");
    let crypto = js_sys::Reflect::get(&js_sys::global(), &"crypto".into()).map_err(missing)?;
    let fill = js_sys::Reflect::get(&crypto, &"getRandomValues".into())
        .map_err(missing)?
        .dyn_into::<js_sys::Function>()
        .map_err(missing)?;
    let bytes = Uint8Array::new_with_length(32);
    fill.call1(&crypto, &bytes).map_err(missing)?;
    let mut out = [0u8; 32];
    bytes.copy_to(&mut out);
    Ok(out)
}

//! The browser's swarm peer, split across the page's two threads. Browsers offer
//! `RTCPeerConnection` only on the main thread, so the page runs the transport (`Swarm`)
//! there and the Web Worker runs this training loop; the two pass events and outgoing
//! messages with `postMessage`. [`Relay`] is the worker's view of the transport: the
//! [`Transport`] the training loop sees, fed by `event()` and drained by `outgoing()`.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;

use js_sys::{Array, Uint8Array};
use shoal_shared::dataset::Dataset;
use shoal_shared::engine::train::Samples;
use shoal_shared::gpu::Gpu;
use shoal_shared::idx::IdxLimits;
use shoal_shared::learn::Identity;
use shoal_shared::learn::identity::{hex, parse_seed};
use shoal_shared::protocol::PeerId;
use wasm_bindgen::prelude::*;

use super::transport::parse_peer;
use crate::learning::{PeerTask, SwarmTrainer};
use crate::swarm::{MAX_MESSAGE, MAX_QUEUED, SendError, SwarmEvent, Transport};

/// The worker's side of the transport.
#[derive(Default)]
struct Relay {
    peers: RefCell<BTreeSet<PeerId>>,
    events: RefCell<VecDeque<SwarmEvent>>,
    outbox: RefCell<VecDeque<(PeerId, Vec<u8>)>>,
}

impl Relay {
    fn queued(&self) -> usize {
        self.outbox.borrow().iter().map(|(_, d)| d.len()).sum()
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

    async fn next_event(&mut self) -> Option<SwarmEvent> {
        self.events.borrow_mut().pop_front()
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

fn samples(images: &[u8], labels: &[u8]) -> Result<Samples, JsError> {
    let d = Dataset::from_idx(images, labels, 10, &IdxLimits::default())
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(Samples::from_dataset(&d))
}

fn now_ms() -> f64 {
    js_sys::Date::now()
}

#[wasm_bindgen]
impl SwarmPeer {
    /// A peer for the demo digits task. `secret` is this visitor's identity: 64 hex digits
    /// kept in browser storage (the page makes them with `crypto.getRandomValues` on the
    /// first visit). `backend` is "webgpu" or "cpu"; the byte arrays are the task's IDX
    /// files.
    pub async fn create(
        backend: String,
        secret: String,
        train_images: Vec<u8>,
        train_labels: Vec<u8>,
        test_images: Vec<u8>,
        test_labels: Vec<u8>,
    ) -> Result<SwarmPeer, JsError> {
        let id =
            Identity::from_seed(parse_seed(&secret).map_err(|e| JsError::new(&e.to_string()))?);
        let gpu = match backend.as_str() {
            "webgpu" => Some(Gpu::new().await.map_err(|e| JsError::new(&e.to_string()))?),
            "cpu" => None,
            other => return Err(JsError::new(&format!("unknown backend {other:?}"))),
        };
        let train = samples(&train_images, &train_labels)?;
        let test = samples(&test_images, &test_labels)?;
        let key = hex(&id.public());
        let peer = SwarmTrainer::new(
            PeerTask::digits(),
            id,
            gpu.as_ref(),
            train,
            Some(test),
            now_ms(),
        )
        .map_err(|e| JsError::new(&e))?;
        Ok(Self {
            relay: Rc::new(Relay::default()),
            inner: Rc::new(RefCell::new(Some(peer))),
            key,
        })
    }

    /// This peer's public key (hex).
    #[wasm_bindgen(js_name = publicKey)]
    pub fn public_key(&self) -> String {
        self.key.clone()
    }

    /// A transport event from the page: `kind` is "peer_up", "peer_down" or "message"
    /// (with `data`). Unknown kinds and bad peer ids are refused.
    pub fn event(&self, kind: &str, peer: &str, data: Option<Vec<u8>>) -> Result<(), JsError> {
        let p = parse_peer(peer)?;
        let ev = match (kind, data) {
            ("peer_up", _) => {
                self.relay.peers.borrow_mut().insert(p);
                SwarmEvent::PeerUp(p)
            }
            ("peer_down", _) => {
                self.relay.peers.borrow_mut().remove(&p);
                self.relay.outbox.borrow_mut().retain(|(to, _)| *to != p);
                SwarmEvent::PeerDown(p)
            }
            ("message", Some(data)) => SwarmEvent::Message { from: p, data },
            _ => return Err(JsError::new(&format!("unknown event {kind:?}"))),
        };
        self.relay.events.borrow_mut().push_back(ev);
        Ok(())
    }

    /// The messages to send, as `[peer, Uint8Array]` pairs, oldest first.
    pub fn outgoing(&self) -> Array {
        self.relay
            .outbox
            .borrow_mut()
            .drain(..)
            .map(|(p, d)| Array::of2(&p.to_string().into(), &Uint8Array::from(&d[..])))
            .collect()
    }

    /// Takes in the events received so far, then advances training by one step (a whole
    /// round's local steps, or closing the round, or nothing while waiting). Resolves to
    /// the progress as JSON, with `"closed": true` when a round closed.
    pub fn tick(&self) -> js_sys::Promise {
        let inner = Rc::clone(&self.inner);
        let relay = Rc::clone(&self.relay);
        wasm_bindgen_futures::future_to_promise(async move {
            let taken = inner.borrow_mut().take();
            let mut peer = taken.ok_or_else(|| JsError::new("tick() is already running"))?;
            loop {
                let ev = relay.events.borrow_mut().pop_front();
                let Some(ev) = ev else { break };
                peer.handle(ev, &*relay, now_ms());
            }
            let closed = peer.tick(&*relay, now_ms()).await;
            let mut progress = serde_json::to_value(peer.progress()).unwrap_or_default();
            *inner.borrow_mut() = Some(peer);
            let closed = closed.map_err(|e| JsError::new(&e.to_string()))?;
            progress["closed"] = closed.is_some().into();
            Ok(JsValue::from_str(&progress.to_string()))
        })
    }
}

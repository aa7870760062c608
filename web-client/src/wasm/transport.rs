//! The browser transport: a websocket to the signaling server and one WebRTC peer
//! connection per neighbour, each with one pre-negotiated, reliable, ordered data channel
//! carrying framed messages (`shoal_shared::framing`). Every decision is [`Mesh`]'s (the
//! connection state machine both transports share): this adapter feeds it the socket's
//! messages, the browser's WebRTC events and the time, and carries out its actions.
//!
//! Everything runs on the worker's (or page's) single thread, so the state is an
//! `Rc<RefCell<_>>` that callbacks borrow briefly and never across an await; actions run
//! after the borrow that produced them ends. Every `Closure` is owned by the connection
//! it serves and detached from its JS object before it is dropped; none is leaked.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use js_sys::{Array, Function, Object, Reflect, Uint8Array};
use shoal_shared::framing::LOW_WATER;
use shoal_shared::protocol::{PeerId, PeerReport, ServerMessage, Signal};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{
    MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelInit, RtcDataChannelState,
    RtcDataChannelType, RtcIceCandidateInit, RtcPeerConnection, RtcPeerConnectionIceEvent,
    RtcPeerConnectionState, RtcSdpType, RtcSessionDescriptionInit, WebSocket,
};

use crate::mesh::{Action, Mesh};
use crate::swarm::{
    Inbox, MAX_MESSAGE, SendError, SwarmEvent, Transport, link_bytes_for, max_message_for_count,
};

type Shared = Rc<RefCell<Inner>>;

/// One connection's browser objects.
struct Conn {
    pc: RtcPeerConnection,
    dc: RtcDataChannel,
    /// A zero-delay timer will pump this channel again (the last task's slice ran out).
    pump_scheduled: bool,
    /// Which of this peer's connections it is: a callback or a continuation of an
    /// earlier one (closed, then the peer connected again) must not act on this one.
    generation: u64,
    /// Handlers attached to `pc` and `dc`; detached in `Drop`.
    _handlers: Vec<Closure<dyn FnMut(JsValue)>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.pc.set_onicecandidate(None);
        self.pc.set_onconnectionstatechange(None);
        self.pc.set_ondatachannel(None);
        self.dc.set_onopen(None);
        self.dc.set_onclose(None);
        self.dc.set_onmessage(None);
        self.dc.set_onbufferedamountlow(None);
        self.dc.close();
        self.pc.close();
    }
}

struct Inner {
    url: String,
    mesh: Mesh,
    ws: Option<WebSocket>,
    ws_handlers: Vec<Closure<dyn FnMut(JsValue)>>,
    conns: HashMap<PeerId, Conn>,
    /// The generation the next connection gets.
    next_generation: u64,
    /// What `next()` has not taken yet: bounded per neighbour, as a peer's own inbox, so
    /// that a page whose worker is busy (the relay waits for it) holds at most the
    /// inbox's bounds of a flooding neighbour's messages.
    events: Inbox,
    /// The pending `next()`, woken by the next event (or when the swarm is dropped).
    waiting: Option<Waker>,
    /// A `next()` is pending (one at a time).
    next_pending: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(w) = self.waiting.take() {
            w.wake();
        }
    }
}

/// The next event for the pending `next()`: `None` once the swarm is gone.
fn poll_event(shared: &Weak<RefCell<Inner>>, cx: &mut Context<'_>) -> Poll<Option<SwarmEvent>> {
    let Some(shared) = shared.upgrade() else {
        return Poll::Ready(None);
    };
    let mut inner = shared.borrow_mut();
    match inner.events.pop() {
        Some(ev) => Poll::Ready(Some(ev)),
        None => {
            inner.waiting = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A received message's bytes, for the reassembler, and its length as sent (`None`: text,
/// which the protocol never sends), without ever copying more than a frame can be: a
/// binary message longer than a frame yields nothing, and drops its neighbour (as text
/// does). (`new Uint8Array(data)` on a text message of "2e9" would allocate two
/// gigabytes: a string converts to a length.)
fn frame_bytes(data: &JsValue) -> (Vec<u8>, Option<usize>) {
    let Some(buffer) = data.dyn_ref::<js_sys::ArrayBuffer>() else {
        return (Vec::new(), None);
    };
    let len = buffer.byte_length() as usize;
    if len > crate::links::MAX_FRAME {
        return (Vec::new(), Some(len));
    }
    (Uint8Array::new(buffer).to_vec(), Some(len))
}

/// Whether `peer`'s connection is still the one of `generation`.
fn current(shared: &Shared, peer: PeerId, generation: u64) -> bool {
    shared
        .borrow()
        .conns
        .get(&peer)
        .is_some_and(|c| c.generation == generation)
}

/// The connection to `peer`: its `RtcPeerConnection` and generation.
fn conn_of(shared: &Shared, peer: PeerId) -> Option<(RtcPeerConnection, u64)> {
    shared
        .borrow()
        .conns
        .get(&peer)
        .map(|c| (c.pc.clone(), c.generation))
}

fn now_ms() -> u64 {
    super::now_ms() as u64
}

/// Feeds the mesh, then carries out what it asks, each action after the borrow that
/// produced it has ended (an action may feed the mesh again).
fn with_mesh<R>(shared: &Shared, f: impl FnOnce(&mut Mesh, u64) -> R) -> R {
    let r = f(&mut shared.borrow_mut().mesh, now_ms());
    run_actions(shared);
    r
}

fn run_actions(shared: &Shared) {
    loop {
        let Some(action) = shared.borrow_mut().mesh.poll_action() else {
            return;
        };
        act(shared, action);
    }
}

fn act(shared: &Shared, action: Action) {
    match action {
        Action::Signal(m) => {
            let inner = shared.borrow();
            if let Some(ws) = &inner.ws
                && ws.ready_state() == WebSocket::OPEN
            {
                let text = serde_json::to_string(&m).unwrap_or_default();
                let _ = ws.send_with_str(&text);
            }
        }
        Action::Emit(e) => {
            let waiting = {
                let mut inner = shared.borrow_mut();
                inner.events.push(e);
                inner.waiting.take()
            };
            if let Some(w) = waiting {
                w.wake();
            }
        }
        Action::Connect { peer, offer } => connect(shared, peer, offer),
        Action::Answer { peer, sdp } => {
            let Some((pc, generation)) = conn_of(shared, peer) else {
                return;
            };
            let weak = Rc::downgrade(shared);
            spawn_local(async move {
                let answered = match set_remote(&pc, RtcSdpType::Offer, &sdp).await {
                    Ok(()) => describe(&pc, RtcSdpType::Answer).await,
                    Err(e) => Err(e),
                };
                if let Some(shared) = weak.upgrade()
                    && current(&shared, peer, generation)
                {
                    with_mesh(&shared, |mesh, _| match answered {
                        Ok(sdp) => mesh.described(peer, Signal::Answer { sdp }),
                        Err(_) => mesh.failed(peer),
                    });
                }
            });
        }
        Action::Accept { peer, sdp } => {
            let Some((pc, generation)) = conn_of(shared, peer) else {
                return;
            };
            let weak = Rc::downgrade(shared);
            spawn_local(async move {
                if set_remote(&pc, RtcSdpType::Answer, &sdp).await.is_err()
                    && let Some(shared) = weak.upgrade()
                    && current(&shared, peer, generation)
                {
                    with_mesh(&shared, |mesh, _| mesh.failed(peer));
                }
            });
        }
        Action::AddCandidate { peer, candidate } => {
            let Some((pc, _)) = conn_of(shared, peer) else {
                return;
            };
            let Signal::Candidate {
                candidate,
                sdp_mid,
                sdp_m_line_index,
            } = candidate
            else {
                return;
            };
            let init = RtcIceCandidateInit::new(&candidate);
            init.set_sdp_mid(sdp_mid.as_deref());
            init.set_sdp_m_line_index(sdp_m_line_index);
            spawn_local(async move {
                // A candidate that does not apply (stale, or for a closed session) is
                // harmless to ignore.
                let _ = JsFuture::from(
                    pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&init)),
                )
                .await;
            });
        }
        Action::Pump(peer) => pump(shared, peer),
        Action::Close(peer) => {
            // Dropping the connection detaches its handlers and closes it; deferred to a
            // microtask, since the handler that caused this may be one of them.
            let conn = shared.borrow_mut().conns.remove(&peer);
            spawn_local(async move { drop(conn) });
        }
        Action::WakeIn(ms) => {
            let weak = Rc::downgrade(shared);
            let wake = Closure::once_into_js(move || {
                if let Some(shared) = weak.upgrade() {
                    with_mesh(&shared, |mesh, now| mesh.tick(now));
                }
            });
            set_timeout(wake.unchecked_ref(), u32::try_from(ms).unwrap_or(u32::MAX));
        }
        Action::Warn(w) => web_sys::console::warn_1(&format!("shoal: {w}").into()),
    }
}

fn event(kind: &str, fields: &[(&str, JsValue)]) -> JsValue {
    let o = Object::new();
    let _ = Reflect::set(&o, &"type".into(), &kind.into());
    for (k, v) in fields {
        let _ = Reflect::set(&o, &(*k).into(), v);
    }
    o.into()
}

/// The JavaScript form of an event.
fn to_js(ev: SwarmEvent) -> JsValue {
    match ev {
        SwarmEvent::Signaling { me: Some(me) } => event(
            "signaling",
            &[("state", "up".into()), ("peer", me.to_string().into())],
        ),
        SwarmEvent::Signaling { me: None } => event("signaling", &[("state", "down".into())]),
        SwarmEvent::PeerUp(p) => event("peer_up", &[("peer", p.to_string().into())]),
        SwarmEvent::PeerDown(p) => event("peer_down", &[("peer", p.to_string().into())]),
        SwarmEvent::TaskState { paused } => event("task_state", &[("paused", paused.into())]),
        SwarmEvent::TaskChanged => event("task_changed", &[]),
        SwarmEvent::Message { from, data } => event(
            "message",
            &[
                ("from", from.to_string().into()),
                ("data", Uint8Array::from(&data[..]).into()),
            ],
        ),
    }
}

fn set_timeout(f: &Function, ms: u32) {
    let global = js_sys::global();
    if let Ok(st) = Reflect::get(&global, &"setTimeout".into())
        && let Ok(st) = st.dyn_into::<Function>()
    {
        let _ = st.call2(&global, f, &JsValue::from(ms));
    }
}

/// A member of a swarm, as seen from JavaScript.
#[wasm_bindgen]
pub struct Swarm {
    inner: Shared,
}

#[wasm_bindgen]
impl Swarm {
    /// Connects to `url` (`ws://host/ws/TASK?v=2`). Events arrive through `next()`:
    /// `{type:"signaling", state:"up"|"down", peer?}`, `{type:"peer_up", peer}`,
    /// `{type:"peer_down", peer}`, `{type:"message", from, data: Uint8Array}`,
    /// `{type:"task_state", paused}`. `parameters`: the task's parameter count (its
    /// description's `cost.parameters`), which bounds the messages taken from neighbours
    /// (`8 parameters + 65,536` bytes, docs/protocol.md); without it, any up to 64 MiB.
    /// `upload_mb_per_hour`: the task's upload budget, which with `parameters` bounds the
    /// bytes each neighbour may send (docs/protocol.md, "Framing"); without it, none.
    pub fn connect(url: String, parameters: Option<f64>, upload_mb_per_hour: Option<f64>) -> Swarm {
        let seed = (js_sys::Math::random() * 2f64.powi(53)) as u64;
        let limit = parameters
            .and_then(max_message_for_count)
            .unwrap_or(MAX_MESSAGE);
        let mut mesh = Mesh::new(seed);
        mesh.set_max_message(limit);
        let budget = upload_mb_per_hour.filter(|b| b.is_finite() && *b >= 1.0 && *b <= 1e6);
        if let (Some(p), Some(b)) = (parameters.filter(|p| p.is_finite() && *p >= 0.0), budget) {
            mesh.set_link_bytes(link_bytes_for(p as usize, b as u32));
        }
        let inner = Rc::new(RefCell::new(Inner {
            url,
            mesh,
            ws: None,
            ws_handlers: Vec::new(),
            conns: HashMap::new(),
            next_generation: 0,
            events: Inbox::new(limit),
            waiting: None,
            next_pending: false,
        }));
        open_signaling(&inner);
        Swarm { inner }
    }

    /// This peer's id in the current signaling session, if connected.
    pub fn id(&self) -> Option<String> {
        Transport::id(self).map(|p| p.to_string())
    }

    /// Peers with an open data channel.
    pub fn peers(&self) -> Vec<String> {
        Transport::peers(self)
            .iter()
            .map(PeerId::to_string)
            .collect()
    }

    /// Messages dropped as corrupt, truncated, oversized or unfinished.
    #[wasm_bindgen(js_name = frameErrors)]
    pub fn frame_errors(&self) -> f64 {
        self.inner.borrow().mesh.frame_errors() as f64
    }

    /// Queues a message for a connected peer; throws if the peer is unknown, the message
    /// too large, or the queue full (retry after some `message` events or a delay).
    pub fn send(&self, peer: String, data: &[u8]) -> Result<(), JsError> {
        let id = parse_peer(&peer)?;
        with_mesh(&self.inner, |mesh, _| mesh.send(id, data))
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Sends this peer's numbers (a `PeerReport` as JSON) to the server for the
    /// dashboard; throws on a report that does not validate.
    pub fn report(&self, json: &str) -> Result<(), JsError> {
        let r: PeerReport = serde_json::from_str(json).map_err(|e| JsError::new(&e.to_string()))?;
        r.validate().map_err(|e| JsError::new(&e))?;
        Transport::report(self, &r);
        Ok(())
    }

    /// Sends a receipt the worker's peer signed (hex of its bytes) to the server for
    /// the task's ledger; throws on anything but hex of at most a receipt's length.
    pub fn receipt(&self, hex: &str) -> Result<(), JsError> {
        let bytes = shoal_shared::protocol::from_hex(hex)
            .filter(|b| b.len() <= shoal_shared::trust::receipt::MAX_RECEIPT_BYTES)
            .ok_or_else(|| JsError::new("a receipt is hex of at most its length"))?;
        Transport::receipt(self, &bytes);
        Ok(())
    }

    /// Proves the key the worker's peer signs with (its 32-byte secret seed) to the
    /// server on every (re)connection, so that its receipts count.
    #[wasm_bindgen(js_name = setIdentity)]
    pub fn set_identity(&self, secret: &[u8]) -> Result<(), JsError> {
        let seed: [u8; 32] = secret
            .try_into()
            .map_err(|_| JsError::new("the secret is 32 bytes"))?;
        let id = shoal_shared::learn::Identity::from_seed(seed);
        with_mesh(&self.inner, |mesh, _| mesh.set_identity(id));
        Ok(())
    }

    /// Resolves to the next event. Messages wait for it within the bounds of a peer's
    /// inbox (docs/protocol.md); past them a neighbour's messages are dropped and counted
    /// (`inboxDropped()`).
    pub fn next(&self) -> js_sys::Promise {
        let weak = Rc::downgrade(&self.inner);
        wasm_bindgen_futures::future_to_promise(async move {
            if let Some(shared) = weak.upgrade() {
                let mut inner = shared.borrow_mut();
                if inner.next_pending {
                    return Err(JsError::new("next() is already pending").into());
                }
                inner.next_pending = true;
            }
            let ev = std::future::poll_fn(|cx| poll_event(&weak, cx)).await;
            if let Some(shared) = weak.upgrade() {
                shared.borrow_mut().next_pending = false;
            }
            ev.map(to_js)
                .ok_or_else(|| JsError::new("swarm closed").into())
        })
    }

    /// Closes the connection to a neighbour that broke the protocol (the worker's peer
    /// says which: `takeDrops()`) and reports it `unreachable`, so that the server links
    /// each side to another peer.
    #[wasm_bindgen(js_name = dropNeighbour)]
    pub fn drop_neighbour_js(&self, peer: String) -> Result<(), JsError> {
        Transport::drop_neighbour(self, parse_peer(&peer)?);
        Ok(())
    }

    /// Neighbours' messages dropped because `next()` did not take them in time (past a
    /// neighbour's share of the inbox).
    #[wasm_bindgen(js_name = inboxDropped)]
    pub fn inbox_dropped(&self) -> f64 {
        self.inner.borrow().events.dropped() as f64
    }

    /// Leaves the swarm: closes every connection and the websocket.
    pub fn close(&self) {
        {
            let mut inner = self.inner.borrow_mut();
            inner.mesh.close();
            while inner.mesh.poll_action().is_some() {}
            inner.conns.clear();
            if let Some(ws) = inner.ws.take() {
                ws.set_onmessage(None);
                ws.set_onclose(None);
                let _ = ws.close();
            }
            inner.ws_handlers.clear();
        }
    }
}

impl Transport for Swarm {
    fn id(&self) -> Option<PeerId> {
        self.inner.borrow().mesh.id()
    }

    fn peers(&self) -> Vec<PeerId> {
        self.inner.borrow().mesh.peers()
    }

    fn send(&self, peer: PeerId, data: Vec<u8>) -> Result<(), SendError> {
        with_mesh(&self.inner, |mesh, _| mesh.send(peer, &data))
    }

    fn report(&self, report: &PeerReport) {
        with_mesh(&self.inner, |mesh, _| mesh.report(report));
    }

    fn receipt(&self, receipt: &[u8]) {
        with_mesh(&self.inner, |mesh, _| mesh.receipt(receipt));
    }

    fn drop_neighbour(&self, peer: PeerId) {
        with_mesh(&self.inner, |mesh, _| {
            mesh.drop_for_cause(peer, "it broke the protocol");
        });
    }

    async fn next_event(&mut self) -> Option<SwarmEvent> {
        let weak = Rc::downgrade(&self.inner);
        std::future::poll_fn(|cx| poll_event(&weak, cx)).await
    }
}

pub(crate) fn parse_peer(s: &str) -> Result<PeerId, JsError> {
    s.parse().map_err(JsError::new)
}

fn open_signaling(shared: &Shared) {
    let url = shared.borrow().url.clone();
    let ws = match WebSocket::new(&url) {
        Ok(ws) => ws,
        Err(_) => return schedule_reconnect(shared),
    };
    let weak = Rc::downgrade(shared);
    let on_message = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        let Some(shared) = weak.upgrade() else { return };
        let Some(text) = e
            .dyn_into::<MessageEvent>()
            .ok()
            .and_then(|m| m.data().as_string())
        else {
            return;
        };
        match serde_json::from_str::<ServerMessage>(&text) {
            Ok(m) => with_mesh(&shared, |mesh, now| mesh.on_server(m, now)),
            Err(e) => {
                web_sys::console::warn_1(&format!("shoal: bad signaling message: {e}").into())
            }
        }
    });
    let weak = Rc::downgrade(shared);
    let on_close = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        let Some(shared) = weak.upgrade() else { return };
        shared.borrow_mut().ws = None;
        with_mesh(&shared, |mesh, _| mesh.signaling_down());
        if !shared.borrow().mesh.is_closed() {
            schedule_reconnect(&shared);
        }
    });
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    let mut inner = shared.borrow_mut();
    // Drop the previous socket's handlers only after detaching them from it.
    inner.ws_handlers = vec![on_message, on_close];
    inner.ws = Some(ws);
}

fn schedule_reconnect(shared: &Shared) {
    let delay = shared.borrow_mut().mesh.reconnect_delay_ms();
    let weak: Weak<RefCell<Inner>> = Rc::downgrade(shared);
    let cb = Closure::once_into_js(move || {
        if let Some(shared) = weak.upgrade()
            && !shared.borrow().mesh.is_closed()
        {
            open_signaling(&shared);
        }
    });
    set_timeout(cb.unchecked_ref(), delay);
}

fn serde_wasm_ice(list: &[shoal_shared::protocol::IceServer]) -> JsValue {
    let arr = Array::new();
    for s in list {
        let o = Object::new();
        let urls = Array::new();
        for u in &s.urls {
            urls.push(&u.into());
        }
        let _ = Reflect::set(&o, &"urls".into(), &urls);
        if let Some(u) = &s.username {
            let _ = Reflect::set(&o, &"username".into(), &u.into());
        }
        if let Some(c) = &s.credential {
            let _ = Reflect::set(&o, &"credential".into(), &c.into());
        }
        arr.push(&o);
    }
    arr.into()
}

/// An event of `peer`'s connection of `generation`, from one of its own handlers:
/// deferred to a microtask, so that the handler is not dropped (by a `Close` it causes)
/// while it runs; dropped if that connection is gone by then.
fn later(
    weak: &Weak<RefCell<Inner>>,
    peer: PeerId,
    generation: u64,
    f: impl FnOnce(&mut Mesh, u64) + 'static,
) {
    let weak = weak.clone();
    spawn_local(async move {
        if let Some(shared) = weak.upgrade()
            && current(&shared, peer, generation)
        {
            with_mesh(&shared, f);
        }
    });
}

/// Creates the connection to `peer` with its channel; as the offerer, also its offer.
fn connect(shared: &Shared, peer: PeerId, offer: bool) {
    let fail = |shared: &Shared| {
        with_mesh(shared, |mesh, _| mesh.failed(peer));
    };
    let config = RtcConfiguration::new();
    config.set_ice_servers(&serde_wasm_ice(shared.borrow().mesh.ice_servers()));
    let Ok(pc) = RtcPeerConnection::new_with_configuration(&config) else {
        return fail(shared);
    };
    // One pre-negotiated, reliable, ordered channel (id 0) on both sides: no
    // ondatachannel round trip, and either side may start sending once it opens.
    let init = RtcDataChannelInit::new();
    init.set_negotiated(true);
    init.set_id(0);
    init.set_ordered(true);
    let dc = pc.create_data_channel_with_data_channel_dict("shoal", &init);
    dc.set_binary_type(RtcDataChannelType::Arraybuffer);
    dc.set_buffered_amount_low_threshold(LOW_WATER as u32);

    let generation = {
        let mut inner = shared.borrow_mut();
        inner.next_generation += 1;
        inner.next_generation
    };
    let mut handlers: Vec<Closure<dyn FnMut(JsValue)>> = Vec::new();
    let weak = Rc::downgrade(shared);
    let on_ice = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        let Some(shared) = weak.upgrade() else { return };
        if !current(&shared, peer, generation) {
            return;
        }
        let Ok(e) = e.dyn_into::<RtcPeerConnectionIceEvent>() else {
            return;
        };
        if let Some(c) = e.candidate() {
            let signal = Signal::Candidate {
                candidate: c.candidate(),
                sdp_mid: c.sdp_mid(),
                sdp_m_line_index: c.sdp_m_line_index(),
            };
            with_mesh(&shared, |mesh, _| mesh.local_candidate(peer, signal));
        }
    });
    pc.set_onicecandidate(Some(on_ice.as_ref().unchecked_ref()));
    handlers.push(on_ice);

    let weak = Rc::downgrade(shared);
    let pc2 = pc.clone();
    let on_state = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        if matches!(
            pc2.connection_state(),
            RtcPeerConnectionState::Failed | RtcPeerConnectionState::Closed
        ) {
            later(&weak, peer, generation, move |mesh, _| mesh.failed(peer));
        }
    });
    pc.set_onconnectionstatechange(Some(on_state.as_ref().unchecked_ref()));
    handlers.push(on_state);

    // Shoal's one channel is negotiated and never announced: a channel that is, the
    // neighbour opened itself (docs/protocol.md, "The channel").
    let weak = Rc::downgrade(shared);
    let on_channel = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        later(&weak, peer, generation, move |mesh, _| {
            mesh.drop_for_cause(peer, "it opened a data channel of its own");
        });
    });
    pc.set_ondatachannel(Some(on_channel.as_ref().unchecked_ref()));
    handlers.push(on_channel);

    let weak = Rc::downgrade(shared);
    let on_open = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        if let Some(shared) = weak.upgrade()
            && current(&shared, peer, generation)
        {
            with_mesh(&shared, |mesh, now| mesh.channel_open(peer, now));
        }
    });
    dc.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    handlers.push(on_open);

    let weak = Rc::downgrade(shared);
    let on_close = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        later(&weak, peer, generation, move |mesh, _| mesh.failed(peer));
    });
    dc.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    handlers.push(on_close);

    let weak = Rc::downgrade(shared);
    let on_low = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        if let Some(shared) = weak.upgrade()
            && current(&shared, peer, generation)
        {
            pump(&shared, peer);
        }
    });
    dc.set_onbufferedamountlow(Some(on_low.as_ref().unchecked_ref()));
    handlers.push(on_low);

    let weak = Rc::downgrade(shared);
    let on_msg = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        let Ok(e) = e.dyn_into::<MessageEvent>() else {
            return;
        };
        let (frame, sent) = frame_bytes(&e.data());
        if let Some(shared) = weak.upgrade()
            && current(&shared, peer, generation)
        {
            with_mesh(&shared, |mesh, now| mesh.message(peer, &frame, sent, now));
        }
    });
    dc.set_onmessage(Some(on_msg.as_ref().unchecked_ref()));
    handlers.push(on_msg);

    shared.borrow_mut().conns.insert(
        peer,
        Conn {
            pc: pc.clone(),
            dc,
            pump_scheduled: false,
            generation,
            _handlers: handlers,
        },
    );
    if offer {
        let weak = Rc::downgrade(shared);
        spawn_local(async move {
            let described = describe(&pc, RtcSdpType::Offer).await;
            if let Some(shared) = weak.upgrade()
                && current(&shared, peer, generation)
            {
                with_mesh(&shared, |mesh, _| match described {
                    Ok(sdp) => mesh.described(peer, Signal::Offer { sdp }),
                    Err(_) => mesh.failed(peer),
                });
            }
        });
    }
}

/// Creates this side's offer or answer, sets it as the local description and returns
/// its SDP.
async fn describe(pc: &RtcPeerConnection, kind: RtcSdpType) -> Result<String, JsValue> {
    let created = match kind {
        RtcSdpType::Offer => JsFuture::from(pc.create_offer()).await?,
        _ => JsFuture::from(pc.create_answer()).await?,
    };
    let sdp = Reflect::get(&created, &"sdp".into())?
        .as_string()
        .unwrap_or_default();
    let local = RtcSessionDescriptionInit::new(kind);
    local.set_sdp(&sdp);
    JsFuture::from(pc.set_local_description(&local)).await?;
    Ok(sdp)
}

/// Applies the other side's offer or answer.
async fn set_remote(pc: &RtcPeerConnection, kind: RtcSdpType, sdp: &str) -> Result<(), JsValue> {
    let desc = RtcSessionDescriptionInit::new(kind);
    desc.set_sdp(sdp);
    JsFuture::from(pc.set_remote_description(&desc))
        .await
        .map(|_| ())
}

/// Bytes one task hands to a channel before it yields: the page's main thread runs this,
/// so an 875 KB model goes out over several short tasks instead of one long one (which
/// the visitor would feel as a stutter).
const PUMP_SLICE: usize = 192 << 10;

/// Sends queued frames while the channel has room, at most `PUMP_SLICE` bytes per task;
/// the buffered-amount-low event, or a zero-delay timer when the slice ran out first,
/// calls it again.
fn pump(shared: &Shared, peer: PeerId) {
    let mut guard = shared.borrow_mut();
    let Inner { mesh, conns, .. } = &mut *guard;
    let Some(c) = conns.get_mut(&peer) else {
        return;
    };
    if c.dc.ready_state() != RtcDataChannelState::Open || c.pump_scheduled {
        return;
    }
    let mut sent = 0;
    while sent < PUMP_SLICE {
        let Some(frame) = mesh.next_frame(peer, c.dc.buffered_amount() as usize) else {
            return;
        };
        if c.dc.send_with_u8_array(&frame).is_err() {
            return;
        }
        sent += frame.len();
    }
    if !mesh.has_queued(peer) {
        return;
    }
    c.pump_scheduled = true;
    let generation = c.generation;
    let weak = Rc::downgrade(shared);
    let again = Closure::once_into_js(move || {
        if let Some(shared) = weak.upgrade()
            && current(&shared, peer, generation)
        {
            if let Some(c) = shared.borrow_mut().conns.get_mut(&peer) {
                c.pump_scheduled = false;
            }
            pump(&shared, peer);
        }
    });
    set_timeout(again.unchecked_ref(), 0);
}

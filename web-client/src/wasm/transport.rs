//! The browser transport: a websocket to the signaling server and one WebRTC peer
//! connection per neighbour, each with one reliable, ordered data channel carrying framed
//! messages (`shoal_shared::framing`). What a channel receives goes through
//! [`InboundLink`]: messages that arrive before the channel's open event are delivered
//! right after `peer_up`, never before it, and a neighbour whose messages keep being
//! dropped is disconnected.
//!
//! Everything runs on the worker's (or page's) single thread, so the state is an
//! `Rc<RefCell<_>>` that callbacks borrow briefly and never across an await.
//! Every `Closure` is owned by the connection it serves and detached from its JS object
//! before it is dropped; none is leaked.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::{Rc, Weak};

use futures_channel::mpsc;
use futures_core::Stream;
use js_sys::{Array, Function, Object, Reflect, Uint8Array};
use shoal_shared::framing::{DEFAULT_CHUNK, LOW_WATER, QueueError, SendQueue};
use shoal_shared::protocol::{ClientMessage, PeerId, PeerReport, ServerMessage, Signal};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{
    MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelInit, RtcDataChannelState,
    RtcDataChannelType, RtcIceCandidateInit, RtcPeerConnection, RtcPeerConnectionIceEvent,
    RtcPeerConnectionState, RtcSdpType, RtcSessionDescriptionInit, WebSocket,
};

use crate::links::InboundLink;
use crate::swarm::{
    Backoff, CONNECT_DEADLINE_SECS, MAX_HELD_CANDIDATES, MAX_IN_FLIGHT, MAX_MESSAGE, MAX_QUEUED,
    SendError, SwarmEvent, Transport, should_offer,
};

type Shared = Rc<RefCell<Inner>>;

struct Conn {
    pc: RtcPeerConnection,
    dc: RtcDataChannel,
    queue: SendQueue,
    link: InboundLink,
    open: bool,
    /// A zero-delay timer will pump this channel again (the last task's slice ran out).
    pump_scheduled: bool,
    /// Local candidates gathered before this side's offer or answer was sent (`None`
    /// once it was): they must not reach the other side before the description does.
    held: Option<Vec<Signal>>,
    /// Handlers attached to `pc` and `dc`; detached in `Drop`.
    _handlers: Vec<Closure<dyn FnMut(JsValue)>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.pc.set_onicecandidate(None);
        self.pc.set_onconnectionstatechange(None);
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
    me: Option<PeerId>,
    ws: Option<WebSocket>,
    ws_handlers: Vec<Closure<dyn FnMut(JsValue)>>,
    ice_servers: JsValue,
    peers: HashMap<PeerId, Conn>,
    neighbours: BTreeSet<PeerId>,
    events: mpsc::UnboundedSender<SwarmEvent>,
    backoff: Backoff,
    closed: bool,
    /// Messages dropped by the reassemblers (corrupt, truncated, oversized, unfinished).
    frame_errors: u64,
}

fn event(kind: &str, fields: &[(&str, JsValue)]) -> JsValue {
    let o = Object::new();
    let _ = Reflect::set(&o, &"type".into(), &kind.into());
    for (k, v) in fields {
        let _ = Reflect::set(&o, &(*k).into(), v);
    }
    o.into()
}

fn emit(inner: &Inner, ev: SwarmEvent) {
    let _ = inner.events.unbounded_send(ev);
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
    events: Rc<RefCell<Option<mpsc::UnboundedReceiver<SwarmEvent>>>>,
}

#[wasm_bindgen]
impl Swarm {
    /// Connects to `url` (`ws://host/ws/TASK?v=1`). Events arrive through `next()`:
    /// `{type:"signaling", state:"up"|"down", peer?}`, `{type:"peer_up", peer}`,
    /// `{type:"peer_down", peer}`, `{type:"message", from, data: Uint8Array}`,
    /// `{type:"task_state", paused}`.
    pub fn connect(url: String) -> Swarm {
        let (tx, rx) = mpsc::unbounded();
        let seed = (js_sys::Math::random() * 2f64.powi(53)) as u64;
        let inner = Rc::new(RefCell::new(Inner {
            url,
            me: None,
            ws: None,
            ws_handlers: Vec::new(),
            ice_servers: Array::new().into(),
            peers: HashMap::new(),
            neighbours: BTreeSet::new(),
            events: tx,
            backoff: Backoff::new(250, 10_000, seed),
            closed: false,
            frame_errors: 0,
        }));
        open_signaling(&inner);
        Swarm {
            inner,
            events: Rc::new(RefCell::new(Some(rx))),
        }
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
        self.inner.borrow().frame_errors as f64
    }

    /// Queues a message for a connected peer; throws if the peer is unknown, the message
    /// too large, or the queue full (retry after some `message` events or a delay).
    pub fn send(&self, peer: String, data: &[u8]) -> Result<(), JsError> {
        let id = parse_peer(&peer)?;
        // Straight from the caller's bytes into the frames: no intermediate copy.
        self.queue(id, data)
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

    /// Resolves to the next event.
    pub fn next(&self) -> js_sys::Promise {
        let slot = Rc::clone(&self.events);
        wasm_bindgen_futures::future_to_promise(async move {
            let taken = slot.borrow_mut().take();
            let mut rx = taken.ok_or_else(|| JsError::new("next() is already pending"))?;
            let ev = std::future::poll_fn(|cx| std::pin::Pin::new(&mut rx).poll_next(cx)).await;
            *slot.borrow_mut() = Some(rx);
            ev.map(to_js)
                .ok_or_else(|| JsError::new("swarm closed").into())
        })
    }

    /// Leaves the swarm: closes every connection and the websocket.
    pub fn close(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.closed = true;
        inner.peers.clear();
        if let Some(ws) = inner.ws.take() {
            ws.set_onmessage(None);
            ws.set_onclose(None);
            let _ = ws.close();
        }
        inner.ws_handlers.clear();
    }
}

impl Swarm {
    /// Splits a message into frames on the peer's send queue and starts pumping.
    fn queue(&self, peer: PeerId, data: &[u8]) -> Result<(), SendError> {
        {
            let mut inner = self.inner.borrow_mut();
            let conn = inner
                .peers
                .get_mut(&peer)
                .filter(|c| c.open)
                .ok_or(SendError::NoSuchPeer(peer))?;
            conn.queue.push(data).map_err(|e| match e {
                QueueError::Full => SendError::Full(peer),
                QueueError::TooLarge => SendError::TooLarge,
            })?;
        }
        pump(&self.inner, peer);
        Ok(())
    }
}

impl Transport for Swarm {
    fn id(&self) -> Option<PeerId> {
        self.inner.borrow().me
    }

    fn peers(&self) -> Vec<PeerId> {
        let inner = self.inner.borrow();
        inner
            .peers
            .iter()
            .filter(|(_, c)| c.open)
            .map(|(p, _)| *p)
            .collect()
    }

    fn send(&self, peer: PeerId, data: Vec<u8>) -> Result<(), SendError> {
        self.queue(peer, &data)
    }

    fn report(&self, report: &PeerReport) {
        let inner = self.inner.borrow();
        if let Some(ws) = &inner.ws
            && ws.ready_state() == WebSocket::OPEN
        {
            let text = serde_json::to_string(&ClientMessage::Report {
                report: report.clone(),
            })
            .unwrap_or_default();
            let _ = ws.send_with_str(&text);
        }
    }

    async fn next_event(&mut self) -> Option<SwarmEvent> {
        let mut rx = self.events.borrow_mut().take()?;
        let ev = std::future::poll_fn(|cx| std::pin::Pin::new(&mut rx).poll_next(cx)).await;
        *self.events.borrow_mut() = Some(rx);
        ev
    }
}

pub(crate) fn parse_peer(s: &str) -> Result<PeerId, JsError> {
    s.parse().map_err(JsError::new)
}

fn send_signal(inner: &Inner, to: PeerId, signal: Signal) {
    if let Some(ws) = &inner.ws
        && ws.ready_state() == WebSocket::OPEN
    {
        let text = serde_json::to_string(&ClientMessage::Signal { to, signal }).unwrap_or_default();
        let _ = ws.send_with_str(&text);
    }
}

/// Sends this side's offer or answer, then the candidates gathered meanwhile; from then on
/// candidates go out as they come.
fn send_description(shared: &Shared, to: PeerId, description: Signal) {
    let mut inner = shared.borrow_mut();
    send_signal(&inner, to, description);
    let held = inner
        .peers
        .get_mut(&to)
        .and_then(|c| c.held.take())
        .unwrap_or_default();
    for c in held {
        send_signal(&inner, to, c);
    }
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
            Ok(m) => on_server_message(&shared, m),
            Err(e) => {
                web_sys::console::warn_1(&format!("shoal: bad signaling message: {e}").into())
            }
        }
    });
    let weak = Rc::downgrade(shared);
    let on_close = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        let Some(shared) = weak.upgrade() else { return };
        {
            let mut inner = shared.borrow_mut();
            inner.ws = None;
            inner.me = None;
            emit(&inner, SwarmEvent::Signaling { me: None });
            if inner.closed {
                return;
            }
        }
        schedule_reconnect(&shared);
    });
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    let mut inner = shared.borrow_mut();
    // Drop the previous socket's handlers only after detaching them from it.
    inner.ws_handlers = vec![on_message, on_close];
    inner.ws = Some(ws);
}

fn schedule_reconnect(shared: &Shared) {
    let delay = shared.borrow_mut().backoff.next_delay_ms();
    let weak: Weak<RefCell<Inner>> = Rc::downgrade(shared);
    let cb = Closure::once_into_js(move || {
        if let Some(shared) = weak.upgrade()
            && !shared.borrow().closed
        {
            open_signaling(&shared);
        }
    });
    set_timeout(cb.unchecked_ref(), delay);
}

fn on_server_message(shared: &Shared, m: ServerMessage) {
    match m {
        ServerMessage::Welcome {
            peer, ice_servers, ..
        } => {
            let mut inner = shared.borrow_mut();
            inner.me = Some(peer);
            inner.backoff.reset();
            inner.ice_servers = serde_wasm_ice(&ice_servers);
            emit(&inner, SwarmEvent::Signaling { me: Some(peer) });
        }
        ServerMessage::Neighbours { peers } => {
            let me = shared.borrow().me;
            let Some(me) = me else { return };
            let set: BTreeSet<PeerId> = peers.into_iter().collect();
            let (to_open, to_drop): (Vec<PeerId>, Vec<PeerId>) = {
                let mut inner = shared.borrow_mut();
                inner.neighbours = set.clone();
                let open = set
                    .iter()
                    .copied()
                    .filter(|p| !inner.peers.contains_key(p))
                    .collect();
                // Connections that are up stay up (they may predate a signaling
                // reconnect); pending ones to former neighbours are abandoned.
                let drop = inner
                    .peers
                    .iter()
                    .filter(|(p, c)| !set.contains(p) && !c.open)
                    .map(|(p, _)| *p)
                    .collect();
                (open, drop)
            };
            for p in to_drop {
                shared.borrow_mut().peers.remove(&p);
            }
            for p in to_open {
                if should_offer(me, p) {
                    start_connection(shared, p, true);
                }
            }
        }
        ServerMessage::Left { peer } => {
            // The peer's websocket is gone; its data channel may not be (the server may
            // be restarting). An open channel stays until it closes by itself.
            let mut inner = shared.borrow_mut();
            inner.neighbours.remove(&peer);
            if inner.peers.get(&peer).is_some_and(|c| !c.open) {
                inner.peers.remove(&peer);
            }
        }
        ServerMessage::Joined { .. } => {}
        ServerMessage::Signal { from, signal } => on_signal(shared, from, signal),
        ServerMessage::TaskState { paused } => {
            emit(&shared.borrow(), SwarmEvent::TaskState { paused });
        }
        ServerMessage::Error { code, message } => {
            web_sys::console::warn_1(
                &format!("shoal: signaling error {}: {message}", code.as_str()).into(),
            );
        }
    }
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

fn on_signal(shared: &Shared, from: PeerId, signal: Signal) {
    match signal {
        Signal::Offer { sdp } => {
            if !shared.borrow().peers.contains_key(&from) {
                start_connection(shared, from, false);
            }
            let Some(pc) = shared.borrow().peers.get(&from).map(|c| c.pc.clone()) else {
                return;
            };
            let weak = Rc::downgrade(shared);
            spawn_local(async move {
                let answered = match set_remote(&pc, RtcSdpType::Offer, &sdp).await {
                    Ok(()) => describe(&pc, RtcSdpType::Answer).await,
                    Err(e) => Err(e),
                };
                match (answered, weak.upgrade()) {
                    (Ok(sdp), Some(shared)) => {
                        send_description(&shared, from, Signal::Answer { sdp })
                    }
                    (Err(_), _) => fail_peer(&weak, from),
                    (Ok(_), None) => {}
                }
            });
        }
        Signal::Answer { sdp } => {
            let Some(pc) = shared.borrow().peers.get(&from).map(|c| c.pc.clone()) else {
                return;
            };
            let weak = Rc::downgrade(shared);
            spawn_local(async move {
                if set_remote(&pc, RtcSdpType::Answer, &sdp).await.is_err() {
                    fail_peer(&weak, from);
                }
            });
        }
        Signal::Candidate {
            candidate,
            sdp_mid,
            sdp_m_line_index,
        } => {
            let Some(pc) = shared.borrow().peers.get(&from).map(|c| c.pc.clone()) else {
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
    }
}

/// [`fail_peer`] from inside one of the connection's own handlers: deferred to a
/// microtask, so that the handler is not dropped while it runs.
fn fail_peer_later(weak: &Weak<RefCell<Inner>>, peer: PeerId) {
    let weak = weak.clone();
    spawn_local(async move { fail_peer(&weak, peer) });
}

/// Drops a connection; if its channel never opened, asks the server for another
/// neighbour instead of retrying.
fn fail_peer(weak: &Weak<RefCell<Inner>>, peer: PeerId) {
    let Some(shared) = weak.upgrade() else { return };
    let pending = shared.borrow().peers.get(&peer).is_some_and(|c| !c.open);
    drop_peer(weak, peer);
    let inner = shared.borrow();
    if pending
        && let Some(ws) = &inner.ws
        && ws.ready_state() == WebSocket::OPEN
    {
        let text = serde_json::to_string(&ClientMessage::Unreachable { peer }).unwrap_or_default();
        let _ = ws.send_with_str(&text);
    }
}

fn drop_peer(weak: &Weak<RefCell<Inner>>, peer: PeerId) {
    if let Some(shared) = weak.upgrade() {
        let mut inner = shared.borrow_mut();
        if let Some(c) = inner.peers.remove(&peer)
            && c.open
        {
            emit(&inner, SwarmEvent::PeerDown(peer));
        }
    }
}

fn start_connection(shared: &Shared, peer: PeerId, offer: bool) {
    let config = RtcConfiguration::new();
    config.set_ice_servers(&shared.borrow().ice_servers);
    let Ok(pc) = RtcPeerConnection::new_with_configuration(&config) else {
        return;
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

    let mut handlers: Vec<Closure<dyn FnMut(JsValue)>> = Vec::new();
    let weak = Rc::downgrade(shared);
    let on_ice = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        let Some(shared) = weak.upgrade() else { return };
        let Ok(e) = e.dyn_into::<RtcPeerConnectionIceEvent>() else {
            return;
        };
        if let Some(c) = e.candidate() {
            let signal = Signal::Candidate {
                candidate: c.candidate(),
                sdp_mid: c.sdp_mid(),
                sdp_m_line_index: c.sdp_m_line_index(),
            };
            let mut inner = shared.borrow_mut();
            if let Some(held) = inner.peers.get_mut(&peer).and_then(|c| c.held.as_mut()) {
                if held.len() < MAX_HELD_CANDIDATES {
                    held.push(signal);
                }
                return;
            }
            send_signal(&inner, peer, signal);
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
            // Dropped, not retried: the neighbour set will bring another peer.
            fail_peer_later(&weak, peer);
        }
    });
    pc.set_onconnectionstatechange(Some(on_state.as_ref().unchecked_ref()));
    handlers.push(on_state);

    let weak = Rc::downgrade(shared);
    let on_open = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        let Some(shared) = weak.upgrade() else { return };
        {
            let mut inner = shared.borrow_mut();
            let Some(c) = inner.peers.get_mut(&peer) else {
                return;
            };
            if c.open {
                return;
            }
            c.open = true;
            let early = c.link.on_open();
            // Whatever arrived before the open event goes out right behind `peer_up`.
            emit(&inner, SwarmEvent::PeerUp(peer));
            for data in early {
                emit(&inner, SwarmEvent::Message { from: peer, data });
            }
        }
        pump(&shared, peer);
    });
    dc.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    handlers.push(on_open);

    let weak = Rc::downgrade(shared);
    let on_close =
        Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| fail_peer_later(&weak, peer));
    dc.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    handlers.push(on_close);

    let weak = Rc::downgrade(shared);
    let on_low = Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| {
        if let Some(shared) = weak.upgrade() {
            pump(&shared, peer);
        }
    });
    dc.set_onbufferedamountlow(Some(on_low.as_ref().unchecked_ref()));
    handlers.push(on_low);

    let weak = Rc::downgrade(shared);
    let on_msg = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        let Some(shared) = weak.upgrade() else { return };
        let Ok(e) = e.dyn_into::<MessageEvent>() else {
            return;
        };
        let frame = Uint8Array::new(&e.data()).to_vec();
        let mut inner = shared.borrow_mut();
        let Some(c) = inner.peers.get_mut(&peer) else {
            return;
        };
        let before = c.link.dropped();
        let outcome = c.link.on_frame(&frame, js_sys::Date::now() as u64);
        let dropped = c.link.dropped() - before;
        inner.frame_errors += dropped;
        match outcome {
            Ok(Some(data)) => emit(&inner, SwarmEvent::Message { from: peer, data }),
            // A bad frame drops its message (counted), not the peer...
            Ok(None) => {}
            // ...unless that keeps happening.
            Err(e) => {
                web_sys::console::warn_1(&format!("shoal: dropping neighbour {peer}: {e}").into());
                drop(inner);
                fail_peer_later(&weak, peer);
            }
        }
    });
    dc.set_onmessage(Some(on_msg.as_ref().unchecked_ref()));
    handlers.push(on_msg);

    let conn = Conn {
        pc: pc.clone(),
        dc,
        queue: SendQueue::new(DEFAULT_CHUNK, MAX_MESSAGE, MAX_QUEUED),
        link: InboundLink::new(MAX_MESSAGE, MAX_IN_FLIGHT),
        open: false,
        pump_scheduled: false,
        held: Some(Vec::new()),
        _handlers: handlers,
    };
    shared.borrow_mut().peers.insert(peer, conn);
    // A connection that has not opened by the deadline is dropped, never retried; the
    // neighbour set brings others.
    let weak = Rc::downgrade(shared);
    let watchdog = Closure::once_into_js(move || {
        let pending = weak
            .upgrade()
            .is_some_and(|s| s.borrow().peers.get(&peer).is_some_and(|c| !c.open));
        if pending {
            fail_peer(&weak, peer);
        }
    });
    set_timeout(watchdog.unchecked_ref(), CONNECT_DEADLINE_SECS * 1000);

    if offer {
        let weak = Rc::downgrade(shared);
        spawn_local(async move {
            match (describe(&pc, RtcSdpType::Offer).await, weak.upgrade()) {
                (Ok(sdp), Some(shared)) => send_description(&shared, peer, Signal::Offer { sdp }),
                (Err(_), _) => fail_peer(&weak, peer),
                (Ok(_), None) => {}
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
    let mut inner = shared.borrow_mut();
    let Some(c) = inner.peers.get_mut(&peer) else {
        return;
    };
    if !c.open || c.dc.ready_state() != RtcDataChannelState::Open || c.pump_scheduled {
        return;
    }
    let mut sent = 0;
    while sent < PUMP_SLICE {
        let Some(frame) = c.queue.next_frame(c.dc.buffered_amount() as usize) else {
            return;
        };
        if c.dc.send_with_u8_array(&frame).is_err() {
            return;
        }
        sent += frame.len();
    }
    if c.queue.is_empty() {
        return;
    }
    c.pump_scheduled = true;
    let weak = Rc::downgrade(shared);
    let again = Closure::once_into_js(move || {
        if let Some(shared) = weak.upgrade() {
            if let Some(c) = shared.borrow_mut().peers.get_mut(&peer) {
                c.pump_scheduled = false;
            }
            pump(&shared, peer);
        }
    });
    set_timeout(again.unchecked_ref(), 0);
}

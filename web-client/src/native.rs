//! The native transport: the same swarm protocol as the browser's, on tokio with
//! `tokio-tungstenite` for signaling and the `webrtc` crate for peer connections. Each
//! neighbour gets one pre-negotiated, reliable, ordered data channel carrying framed
//! messages; the channel's send-buffer limit makes `send` wait when the peer is slow.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rtc::ice::mdns::MulticastDnsMode;
use shoal_shared::framing::{DEFAULT_CHUNK, HIGH_WATER, Reassembler, split};
use shoal_shared::protocol::{ClientMessage, IceServer, PeerId, PeerReport, ServerMessage, Signal};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceServer, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription, SettingEngineBuilder,
};

use crate::swarm::{
    Backoff, CONNECT_DEADLINE_SECS, MAX_IN_FLIGHT, MAX_MESSAGE, SendError, SwarmEvent, Transport,
    should_offer,
};

/// How a native peer connects.
#[derive(Clone, Debug)]
pub struct NativeOptions {
    /// Signaling URL, `ws://host:port/ws/TASK?v=1`.
    pub url: String,
    /// Local UDP addresses for ICE (`0.0.0.0:0` binds every interface; tests on a
    /// loopback-only network use `127.0.0.1:0`).
    pub udp_addrs: Vec<String>,
    /// Multicast DNS for host candidates (off in tests and on servers).
    pub mdns: bool,
}

struct Conn {
    pc: Arc<dyn PeerConnection>,
    out: mpsc::Sender<Vec<u8>>,
    open: bool,
}

struct State {
    me: Option<PeerId>,
    ws: Option<mpsc::UnboundedSender<String>>,
    ice: Vec<IceServer>,
    neighbours: BTreeSet<PeerId>,
    peers: HashMap<PeerId, Conn>,
    /// Candidates gathered before this side's offer or answer was sent, per peer: they
    /// must not reach the other side before the session description does.
    outbox: HashMap<PeerId, Vec<Signal>>,
    closed: bool,
}

struct Shared {
    opts: NativeOptions,
    state: Mutex<State>,
    events: mpsc::UnboundedSender<SwarmEvent>,
    /// Relayed signals, handled one at a time in arrival order (a candidate must not be
    /// applied before the description it belongs to).
    signals: mpsc::UnboundedSender<(PeerId, Signal)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, e: SwarmEvent) {
        let _ = self.events.send(e);
    }

    fn signal(&self, to: PeerId, signal: Signal) {
        let text = serde_json::to_string(&ClientMessage::Signal { to, signal }).unwrap_or_default();
        if let Some(ws) = &self.lock().ws {
            let _ = ws.send(text);
        }
    }

    /// Sends this side's offer or answer, then the candidates gathered meanwhile; from
    /// then on candidates go out as they come.
    fn send_description(&self, to: PeerId, description: Signal) {
        self.signal(to, description);
        let held = self.lock().outbox.remove(&to).unwrap_or_default();
        for c in held {
            self.signal(to, c);
        }
    }

    /// Sends a local candidate, or holds it until the description has gone out.
    fn send_candidate(&self, to: PeerId, candidate: Signal) {
        let mut st = self.lock();
        if let Some(held) = st.outbox.get_mut(&to) {
            if held.len() < 64 {
                held.push(candidate);
            }
            return;
        }
        drop(st);
        self.signal(to, candidate);
    }

    /// Drops a connection that failed before its channel opened and asks the server for
    /// another neighbour instead of retrying.
    fn fail_peer(&self, peer: PeerId) {
        let pending = self.lock().peers.get(&peer).is_some_and(|c| !c.open);
        self.drop_peer(peer);
        if pending {
            let text =
                serde_json::to_string(&ClientMessage::Unreachable { peer }).unwrap_or_default();
            if let Some(ws) = &self.lock().ws {
                let _ = ws.send(text);
            }
        }
    }

    fn drop_peer(&self, peer: PeerId) {
        let conn = {
            let mut st = self.lock();
            st.outbox.remove(&peer);
            st.peers.remove(&peer)
        };
        if let Some(c) = conn {
            if c.open {
                self.emit(SwarmEvent::PeerDown(peer));
            }
            tokio::spawn(async move {
                let _ = c.pc.close().await;
            });
        }
    }
}

/// A native member of a swarm.
pub struct NativeSwarm {
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<SwarmEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl NativeSwarm {
    /// Starts connecting (and reconnecting, with backoff) to the signaling server.
    /// Must be called inside a tokio runtime.
    pub fn connect(opts: NativeOptions) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (signals, mut signals_rx) = mpsc::unbounded_channel::<(PeerId, Signal)>();
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(State {
                me: None,
                ws: None,
                ice: Vec::new(),
                neighbours: BTreeSet::new(),
                peers: HashMap::new(),
                outbox: HashMap::new(),
                closed: false,
            }),
            events: tx,
            signals,
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some((from, signal)) = signals_rx.recv().await {
                let Some(shared) = weak.upgrade() else { return };
                on_signal(shared, from, signal).await;
            }
        });
        let task = tokio::spawn(signaling_loop(Arc::clone(&shared)));
        Self {
            shared,
            events: rx,
            task,
        }
    }

    /// Leaves the swarm.
    pub async fn close(self) {
        let peers: Vec<Conn> = {
            let mut st = self.shared.lock();
            st.closed = true;
            st.ws = None;
            st.peers.drain().map(|(_, c)| c).collect()
        };
        self.task.abort();
        for c in peers {
            let _ = c.pc.close().await;
        }
    }
}

impl Transport for NativeSwarm {
    /// This peer's id in the current signaling session.
    fn id(&self) -> Option<PeerId> {
        self.shared.lock().me
    }

    /// Neighbours with an open channel.
    fn peers(&self) -> Vec<PeerId> {
        self.shared
            .lock()
            .peers
            .iter()
            .filter(|(_, c)| c.open)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Queues a whole message for a neighbour.
    fn send(&self, peer: PeerId, data: Vec<u8>) -> Result<(), SendError> {
        if data.len() > MAX_MESSAGE {
            return Err(SendError::TooLarge);
        }
        let st = self.shared.lock();
        let c = st
            .peers
            .get(&peer)
            .filter(|c| c.open)
            .ok_or(SendError::NoSuchPeer(peer))?;
        c.out.try_send(data).map_err(|_| SendError::Full(peer))
    }

    /// The next event, or `None` once the swarm is closed.
    async fn next_event(&mut self) -> Option<SwarmEvent> {
        self.events.recv().await
    }

    fn report(&self, report: &PeerReport) {
        let text = serde_json::to_string(&ClientMessage::Report {
            report: report.clone(),
        })
        .unwrap_or_default();
        if let Some(ws) = &self.shared.lock().ws {
            let _ = ws.send(text);
        }
    }
}

async fn signaling_loop(shared: Arc<Shared>) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut backoff = Backoff::new(250, 10_000, seed);
    loop {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&shared.opts.url).await {
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            shared.lock().ws = Some(tx);
            let writer = tokio::spawn(async move {
                while let Some(text) = rx.recv().await {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(text) = msg {
                    match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(m) => {
                            if matches!(m, ServerMessage::Welcome { .. }) {
                                backoff.reset();
                            }
                            on_server_message(&shared, m);
                        }
                        Err(e) => eprintln!("shoal: bad signaling message: {e}"),
                    }
                }
            }
            writer.abort();
            {
                let mut st = shared.lock();
                st.ws = None;
                st.me = None;
            }
            shared.emit(SwarmEvent::Signaling { me: None });
        }
        if shared.lock().closed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(u64::from(backoff.next_delay_ms()))).await;
    }
}

fn on_server_message(shared: &Arc<Shared>, m: ServerMessage) {
    match m {
        ServerMessage::Welcome {
            peer, ice_servers, ..
        } => {
            {
                let mut st = shared.lock();
                st.me = Some(peer);
                st.ice = ice_servers;
            }
            shared.emit(SwarmEvent::Signaling { me: Some(peer) });
        }
        ServerMessage::Neighbours { peers } => {
            let (me, to_open, to_drop) = {
                let mut st = shared.lock();
                let Some(me) = st.me else { return };
                st.neighbours = peers.iter().copied().collect();
                let open: Vec<PeerId> = peers
                    .iter()
                    .copied()
                    .filter(|p| !st.peers.contains_key(p))
                    .collect();
                // Open connections stay (they may predate a signaling reconnect).
                let drop: Vec<PeerId> = st
                    .peers
                    .iter()
                    .filter(|(p, c)| !st.neighbours.contains(p) && !c.open)
                    .map(|(p, _)| *p)
                    .collect();
                (me, open, drop)
            };
            for p in to_drop {
                shared.drop_peer(p);
            }
            for p in to_open.into_iter().filter(|&p| should_offer(me, p)) {
                tokio::spawn(connect_peer(Arc::clone(shared), p, None));
            }
        }
        ServerMessage::Left { peer } => {
            // The peer's websocket is gone; its data channel may not be (the server may
            // be restarting). An open channel stays until it closes by itself.
            let pending = {
                let mut st = shared.lock();
                st.neighbours.remove(&peer);
                st.peers.get(&peer).is_some_and(|c| !c.open)
            };
            if pending {
                shared.drop_peer(peer);
            }
        }
        ServerMessage::Joined { .. } => {}
        ServerMessage::Signal { from, signal } => {
            let _ = shared.signals.send((from, signal));
        }
        ServerMessage::TaskState { paused } => shared.emit(SwarmEvent::TaskState { paused }),
        ServerMessage::Error { code, message } => {
            eprintln!("shoal: signaling error {}: {message}", code.as_str());
        }
    }
}

async fn on_signal(shared: Arc<Shared>, from: PeerId, signal: Signal) {
    let pc = shared.lock().peers.get(&from).map(|c| Arc::clone(&c.pc));
    match (signal, pc) {
        (Signal::Offer { sdp }, None) => connect_peer(shared, from, Some(sdp)).await,
        (Signal::Offer { .. }, Some(_)) => {}
        (Signal::Answer { sdp }, Some(pc)) => {
            let ok = match RTCSessionDescription::answer(sdp) {
                Ok(d) => pc.set_remote_description(d).await.is_ok(),
                Err(_) => false,
            };
            if !ok {
                shared.drop_peer(from);
            }
        }
        (
            Signal::Candidate {
                candidate,
                sdp_mid,
                sdp_m_line_index,
            },
            Some(pc),
        ) => {
            let init = RTCIceCandidateInit {
                candidate,
                sdp_mid,
                sdp_mline_index: sdp_m_line_index,
                ..Default::default()
            };
            // A candidate that does not apply is harmless to ignore.
            let _ = pc.add_ice_candidate(init).await;
        }
        (_, None) => {}
    }
}

struct Handler {
    shared: Arc<Shared>,
    peer: PeerId,
}

#[async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let signal = Signal::Candidate {
                candidate: init.candidate,
                sdp_mid: init.sdp_mid,
                sdp_m_line_index: init.sdp_mline_index,
            };
            self.shared.send_candidate(self.peer, signal);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if matches!(
            state,
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
        ) {
            // Dropped, not retried: the neighbour set brings another peer.
            self.shared.drop_peer(self.peer);
        }
    }
}

/// Opens a connection to `peer`: as the offerer when `offer` is `None`, otherwise as the
/// answerer of that offer.
async fn connect_peer(shared: Arc<Shared>, peer: PeerId, offer: Option<String>) {
    if let Err(e) = try_connect_peer(&shared, peer, offer).await {
        eprintln!("shoal: connection to {peer} failed: {e}");
        shared.fail_peer(peer);
    }
}

async fn try_connect_peer(
    shared: &Arc<Shared>,
    peer: PeerId,
    offer: Option<String>,
) -> anyhow::Result<()> {
    let ice: Vec<RTCIceServer> = shared
        .lock()
        .ice
        .iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone().unwrap_or_default(),
            credential: s.credential.clone().unwrap_or_default(),
        })
        .collect();
    let mdns = if shared.opts.mdns {
        MulticastDnsMode::QueryOnly
    } else {
        MulticastDnsMode::Disabled
    };
    let runtime =
        webrtc::runtime::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime"))?;
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().with_ice_servers(ice).build())
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_multicast_dns_mode(mdns)
                .build(),
        )
        .with_handler(Arc::new(Handler {
            shared: Arc::clone(shared),
            peer,
        }))
        .with_runtime(runtime)
        .with_udp_addrs(shared.opts.udp_addrs.clone())
        .with_data_channel_send_buffer_limit(HIGH_WATER)
        .build()
        .await?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    let init = RTCDataChannelInit {
        negotiated: Some(0),
        ..Default::default()
    };
    let dc = pc.create_data_channel("shoal", Some(init)).await?;
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(4);
    let inserted = {
        let mut st = shared.lock();
        let fresh = !st.closed && !st.peers.contains_key(&peer);
        if fresh {
            st.peers.insert(
                peer,
                Conn {
                    pc: Arc::clone(&pc),
                    out: out_tx,
                    open: false,
                },
            );
            st.outbox.insert(peer, Vec::new());
        }
        fresh
    };
    if !inserted {
        let _ = pc.close().await;
        return Ok(());
    }
    let (open_tx, open_rx) = watch::channel(false);
    // A connection that has not opened by the deadline is dropped, never retried; the
    // neighbour set brings others.
    let (watchdog, mut opened) = (Arc::clone(shared), open_rx.clone());
    tokio::spawn(async move {
        let deadline = Duration::from_secs(u64::from(CONNECT_DEADLINE_SECS));
        if tokio::time::timeout(deadline, opened.wait_for(|&o| o))
            .await
            .is_err()
        {
            watchdog.drop_peer(peer);
        }
    });
    tokio::spawn(read_channel(
        Arc::clone(shared),
        peer,
        Arc::clone(&dc),
        open_tx,
    ));
    tokio::spawn(write_channel(dc, out_rx, open_rx));
    match offer {
        None => {
            let offer = pc.create_offer(None).await?;
            pc.set_local_description(offer.clone()).await?;
            shared.send_description(peer, Signal::Offer { sdp: offer.sdp });
        }
        Some(sdp) => {
            pc.set_remote_description(RTCSessionDescription::offer(sdp)?)
                .await?;
            let answer = pc.create_answer(None).await?;
            pc.set_local_description(answer.clone()).await?;
            shared.send_description(peer, Signal::Answer { sdp: answer.sdp });
        }
    }
    Ok(())
}

async fn read_channel(
    shared: Arc<Shared>,
    peer: PeerId,
    dc: Arc<dyn DataChannel>,
    open: watch::Sender<bool>,
) {
    let mut rx = Reassembler::new(MAX_MESSAGE, MAX_IN_FLIGHT);
    let clock = std::time::Instant::now();
    while let Some(ev) = dc.poll().await {
        match ev {
            DataChannelEvent::OnOpen => {
                if let Some(c) = shared.lock().peers.get_mut(&peer) {
                    c.open = true;
                }
                let _ = open.send(true);
                shared.emit(SwarmEvent::PeerUp(peer));
            }
            DataChannelEvent::OnMessage(msg) => {
                // A bad frame drops its message (counted by the reassembler), never the peer.
                if let Ok(Some(data)) = rx.push(&msg.data, clock.elapsed().as_millis() as u64) {
                    shared.emit(SwarmEvent::Message { from: peer, data });
                }
            }
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
    shared.drop_peer(peer);
}

async fn write_channel(
    dc: Arc<dyn DataChannel>,
    mut out: mpsc::Receiver<Vec<u8>>,
    mut open: watch::Receiver<bool>,
) {
    if open.wait_for(|&o| o).await.is_err() {
        return;
    }
    let mut id = 0u32;
    while let Some(msg) = out.recv().await {
        for frame in split(id, &msg, DEFAULT_CHUNK) {
            if dc.send(BytesMut::from(&frame[..])).await.is_err() {
                return;
            }
        }
        id = id.wrapping_add(1);
    }
}

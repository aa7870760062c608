//! The native transport: the same swarm protocol as the browser's, on tokio with
//! `tokio-tungstenite` for signaling and the `webrtc` crate for peer connections. Each
//! neighbour gets one pre-negotiated, reliable, ordered data channel carrying framed
//! messages. Outgoing messages wait in the same bounded `SendQueue` as the browser's, and
//! the channel's send-buffer limit ([`HIGH_WATER`]) paces the writer when the peer is slow.
//! What a channel receives goes through [`InboundLink`]: messages that arrive before the
//! channel's open event are delivered right after `PeerUp`, never before it, and a
//! neighbour whose messages keep being dropped is disconnected.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::peer_connection::transport::RTCDtlsRole;
use shoal_shared::framing::{DEFAULT_CHUNK, HIGH_WATER, QueueError, SendQueue};
use shoal_shared::protocol::{ClientMessage, IceServer, PeerId, PeerReport, ServerMessage, Signal};
use tokio::sync::{Notify, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceServer, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription, SettingEngineBuilder,
};

use crate::links::InboundLink;
use crate::swarm::{
    Backoff, CONNECT_DEADLINE_SECS, MAX_HELD_CANDIDATES, MAX_IN_FLIGHT, MAX_MESSAGE, MAX_QUEUED,
    SendError, SwarmEvent, Transport, should_offer,
};

/// How long the writer waits after its channel opens before the first frame goes out.
///
/// The `webrtc` crate (0.21) loses a message that reaches the side completing the SCTP
/// handshake (the DTLS client) in the same read as the handshake's last packet: its data
/// channel is not wired until the handshake event that follows, and the message is
/// discarded. A peer that sends the moment its channel opens can hit that window; this
/// short pause keeps a native sender out of it. (On the receiving side, native peers
/// answer as the DTLS server, which never completes the handshake that way.)
const OPEN_SETTLE: Duration = Duration::from_millis(100);

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
    /// Frames waiting for the channel, bounded in bytes.
    queue: SendQueue,
    /// Wakes the channel's writer when frames are queued.
    queued: Arc<Notify>,
    open: bool,
    /// Which connection to this peer this is: callbacks of an older connection to the
    /// same peer must not tear down a newer one.
    serial: u64,
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
    /// The last connection serial handed out.
    serial: u64,
}

struct Shared {
    opts: NativeOptions,
    /// The origin of the milliseconds the reassemblers see.
    epoch: Instant,
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

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn next_serial(&self) -> u64 {
        let mut st = self.lock();
        st.serial += 1;
        st.serial
    }

    /// Marks connection `serial` to `peer` open; false if it is gone (or replaced).
    fn mark_open(&self, peer: PeerId, serial: u64) -> bool {
        match self.lock().peers.get_mut(&peer) {
            Some(c) if c.serial == serial => {
                c.open = true;
                true
            }
            _ => false,
        }
    }

    /// [`fail_peer`](Self::fail_peer), if connection `serial` is still the one to `peer`.
    fn fail_conn(&self, peer: PeerId, serial: u64) {
        let current = self
            .lock()
            .peers
            .get(&peer)
            .is_some_and(|c| c.serial == serial);
        if current {
            self.fail_peer(peer);
        }
    }

    /// [`drop_peer`](Self::drop_peer), if connection `serial` is still the one to `peer`.
    fn drop_conn(&self, peer: PeerId, serial: u64) {
        let current = self
            .lock()
            .peers
            .get(&peer)
            .is_some_and(|c| c.serial == serial);
        if current {
            self.drop_peer(peer);
        }
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
            if held.len() < MAX_HELD_CANDIDATES {
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
            c.queued.notify_one();
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
                serial: 0,
            }),
            epoch: Instant::now(),
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
            c.queued.notify_one();
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
        let mut st = self.shared.lock();
        let c = st
            .peers
            .get_mut(&peer)
            .filter(|c| c.open)
            .ok_or(SendError::NoSuchPeer(peer))?;
        c.queue.push(&data).map_err(|e| match e {
            QueueError::Full => SendError::Full(peer),
            QueueError::TooLarge => SendError::TooLarge,
        })?;
        c.queued.notify_one();
        Ok(())
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
                shared.fail_peer(from);
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
    serial: u64,
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
            // Dropped, not retried: the neighbour set brings another peer (and, if the
            // channel never opened, the server is told so that it does).
            self.shared.fail_conn(self.peer, self.serial);
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
    let serial = shared.next_serial();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().with_ice_servers(ice).build())
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_multicast_dns_mode(mdns)
                // As the DTLS server this side is not the one that completes the SCTP
                // handshake, so a message sent the instant the other side opens is not lost
                // (see `OPEN_SETTLE`).
                .with_answering_dtls_role(RTCDtlsRole::Server)
                .build(),
        )
        .with_handler(Arc::new(Handler {
            shared: Arc::clone(shared),
            peer,
            serial,
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
    let queued = Arc::new(Notify::new());
    let inserted = {
        let mut st = shared.lock();
        let fresh = !st.closed && !st.peers.contains_key(&peer);
        if fresh {
            st.peers.insert(
                peer,
                Conn {
                    pc: Arc::clone(&pc),
                    queue: SendQueue::new(DEFAULT_CHUNK, MAX_MESSAGE, MAX_QUEUED),
                    queued: Arc::clone(&queued),
                    open: false,
                    serial,
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
    // A connection that has not opened by the deadline is dropped and reported
    // unreachable, never retried; the server draws another neighbour.
    let (watchdog, mut opened) = (Arc::clone(shared), open_rx.clone());
    tokio::spawn(async move {
        let deadline = Duration::from_secs(u64::from(CONNECT_DEADLINE_SECS));
        if tokio::time::timeout(deadline, opened.wait_for(|&o| o))
            .await
            .is_err()
        {
            watchdog.fail_conn(peer, serial);
        }
    });
    tokio::spawn(read_channel(
        Arc::clone(shared),
        peer,
        serial,
        Arc::clone(&dc),
        open_tx,
    ));
    tokio::spawn(write_channel(
        Arc::clone(shared),
        peer,
        serial,
        dc,
        queued,
        open_rx,
    ));
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

/// Reads connection `serial`'s channel until it closes: reports the neighbour up when
/// the channel opens, then the messages that came before the open event, then each
/// message as it completes; drops the neighbour when its traffic keeps breaking.
async fn read_channel(
    shared: Arc<Shared>,
    peer: PeerId,
    serial: u64,
    dc: Arc<dyn DataChannel>,
    open: watch::Sender<bool>,
) {
    let mut link = InboundLink::new(MAX_MESSAGE, MAX_IN_FLIGHT);
    while let Some(ev) = dc.poll().await {
        match ev {
            DataChannelEvent::OnOpen => {
                if link.is_open() {
                    continue;
                }
                let early = link.on_open();
                if !shared.mark_open(peer, serial) {
                    break;
                }
                let _ = open.send(true);
                // One task emits all of this channel's events, so nothing it received
                // before the open overtakes `PeerUp`, and nothing after overtakes those.
                shared.emit(SwarmEvent::PeerUp(peer));
                for data in early {
                    shared.emit(SwarmEvent::Message { from: peer, data });
                }
            }
            DataChannelEvent::OnMessage(msg) => match link.on_frame(&msg.data, shared.now_ms()) {
                Ok(Some(data)) => shared.emit(SwarmEvent::Message { from: peer, data }),
                // A bad frame drops its message (counted), not the peer...
                Ok(None) => {}
                // ...unless that keeps happening.
                Err(e) => {
                    eprintln!("shoal: dropping neighbour {peer}: {e}");
                    break;
                }
            },
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
    shared.drop_conn(peer, serial);
}

/// Writes connection `serial`'s queued frames once its channel is open, until the
/// connection goes. `send` on the channel waits while more than [`HIGH_WATER`] bytes are
/// outstanding (the limit it was built with): the native form of waiting for the
/// browser's buffered-amount-low event.
async fn write_channel(
    shared: Arc<Shared>,
    peer: PeerId,
    serial: u64,
    dc: Arc<dyn DataChannel>,
    queued: Arc<Notify>,
    mut open: watch::Receiver<bool>,
) {
    if open.wait_for(|&o| o).await.is_err() {
        return;
    }
    tokio::time::sleep(OPEN_SETTLE).await;
    loop {
        let next = match shared.lock().peers.get_mut(&peer) {
            Some(c) if c.serial == serial => c.queue.next_frame(0),
            _ => return,
        };
        match next {
            Some(frame) => {
                if dc.send(BytesMut::from(&frame[..])).await.is_err() {
                    return;
                }
            }
            // Woken by `send`, or by the connection's end (then the lookup above fails).
            None => queued.notified().await,
        }
    }
}

//! The native transport: the same swarm protocol as the browser's, on tokio with
//! `tokio-tungstenite` for signaling and the `webrtc` crate for peer connections. Every
//! decision is [`Mesh`]'s (the connection state machine both transports share); this
//! adapter feeds it the websocket's messages, the WebRTC stack's events and the time,
//! and carries out its actions in order on one task. Each neighbour gets one
//! pre-negotiated, reliable, ordered data channel; the channel's send-buffer limit makes
//! its writer wait when the peer is slow, and the mesh's send queue bounds the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rtc::ice::mdns::MulticastDnsMode;
use shoal_shared::framing::HIGH_WATER;
use shoal_shared::protocol::{PeerId, PeerReport, ServerMessage, Signal};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceServer, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription, SettingEngineBuilder,
};

use crate::mesh::{Action, Mesh};
use crate::swarm::{Inbox, SendError, SwarmEvent, Transport};

/// How a native peer connects.
#[derive(Clone, Debug)]
pub struct NativeOptions {
    /// Signaling URL, `ws://host:port/ws/TASK?v=2`.
    pub url: String,
    /// Local UDP addresses for ICE (`0.0.0.0:0` binds every interface; tests on a
    /// loopback-only network use `127.0.0.1:0`).
    pub udp_addrs: Vec<String>,
    /// Multicast DNS for host candidates (off in tests and on servers).
    pub mdns: bool,
    /// The key the peer signs updates with, proven to the server on every connection
    /// (`identify`) so that its receipts count; `None` for a peer that signs nothing.
    pub identity: Option<shoal_shared::learn::Identity>,
    /// The largest message taken from a neighbour: the task's
    /// ([`max_message_for`](crate::swarm::max_message_for) of its parameter count), or
    /// [`MAX_MESSAGE`](crate::swarm::MAX_MESSAGE) for a transport that carries any task.
    pub max_message: usize,
    /// What a link takes from its neighbour in bytes: a rate a millisecond and a burst,
    /// the task's ([`link_bytes_for_task`](crate::swarm::link_bytes_for_task)), or `None`
    /// for no bound in bytes.
    pub link_bytes: Option<(f64, f64)>,
    /// The longest wait for the signaling server's handshake, or for its next message
    /// once connected (the peer pings it every third of this, and it answers): past it
    /// the connection counts as dead and the peer reconnects. [`SIGNALING_TIMEOUT`] for peers; without it a
    /// server that hung, or a path that died without a word (a NAT that forgot the
    /// connection), held the peer out of its swarm for good.
    pub signaling_timeout: Duration,
}

/// The most characters of one logged line that come from others.
const LOGGED_CHARS: usize = 500;

/// `what` (text a neighbour's SDP or the server's messages can put words in) as one line
/// safe for an operator's terminal: control characters escaped (an escape sequence
/// could rewrite the screen or forge lines), at most [`LOGGED_CHARS`] characters.
fn printable(what: &impl std::fmt::Display) -> String {
    let text = what.to_string();
    let mut out: String = text
        .chars()
        .take(LOGGED_CHARS)
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_unicode().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if text.chars().nth(LOGGED_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// [`NativeOptions::signaling_timeout`] for peers.
pub const SIGNALING_TIMEOUT: Duration = Duration::from_secs(60);
/// Signaling messages queued for the server at most (a server that stops reading leaves
/// them unsent; past this they are dropped).
const MAX_SIGNALING_QUEUED: usize = 1024;

/// One live connection's platform objects.
struct Conn {
    /// Tells callbacks of an older connection to the same peer apart.
    generation: u64,
    pc: Arc<dyn PeerConnection>,
    /// Wakes the channel's writer: frames are queued.
    wake: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct State {
    mesh: Mesh,
    ws: Option<mpsc::Sender<String>>,
    /// Messages for the server dropped on this connection (its queue was full).
    ws_dropped: u64,
    conns: HashMap<PeerId, Conn>,
    next_generation: u64,
}

struct Shared {
    opts: NativeOptions,
    state: Mutex<State>,
    clock: Instant,
    /// Events for the peer, bounded per neighbour (see [`Inbox`]): the peer takes them
    /// between training chunks.
    inbox: Mutex<Inbox>,
    /// Woken when an event goes into the inbox.
    arrived: Notify,
    /// The mesh's actions, carried out one at a time in order by one task (a candidate
    /// must not be applied before the description it belongs to).
    actions: mpsc::UnboundedSender<Action>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Feeds the mesh (under the lock) and hands its actions to the executor.
    fn with_mesh<R>(&self, f: impl FnOnce(&mut Mesh, u64) -> R) -> R {
        self.feed(None, f).expect("no generation to check")
    }

    /// The connection to `peer`: its peer connection and generation.
    fn conn(&self, peer: PeerId) -> Option<(Arc<dyn PeerConnection>, u64)> {
        self.lock()
            .conns
            .get(&peer)
            .map(|c| (Arc::clone(&c.pc), c.generation))
    }

    /// Like [`with_mesh`](Self::with_mesh), for an event of the connection of this
    /// `generation`: ignored once that connection was replaced or closed.
    fn with_conn(&self, peer: PeerId, generation: u64, f: impl FnOnce(&mut Mesh, u64)) {
        self.feed(Some((peer, generation)), f);
    }

    fn feed<R>(
        &self,
        conn: Option<(PeerId, u64)>,
        f: impl FnOnce(&mut Mesh, u64) -> R,
    ) -> Option<R> {
        let now = self.now_ms();
        let mut st = self.lock();
        if let Some((peer, generation)) = conn
            && st.conns.get(&peer).map(|c| c.generation) != Some(generation)
        {
            return None;
        }
        let r = f(&mut st.mesh, now);
        while let Some(a) = st.mesh.poll_action() {
            match a {
                // Straight into the bounded inbox, not behind the executor's queue (which
                // can wait seconds on a connection step while messages keep coming).
                Action::Emit(e) => {
                    self.inbox().push(e);
                    self.arrived.notify_one();
                }
                a => {
                    let _ = self.actions.send(a);
                }
            }
        }
        Some(r)
    }
}

/// A native member of a swarm.
pub struct NativeSwarm {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NativeSwarm {
    /// Starts connecting (and reconnecting, with backoff) to the signaling server.
    /// Must be called inside a tokio runtime.
    pub fn connect(opts: NativeOptions) -> Self {
        let (actions, actions_rx) = mpsc::unbounded_channel();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut mesh = Mesh::new(seed);
        mesh.set_max_message(opts.max_message);
        mesh.set_link_bytes(opts.link_bytes);
        let inbox = Inbox::new(opts.max_message);
        if let Some(id) = opts.identity.clone() {
            mesh.set_identity(id);
        }
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(State {
                mesh,
                ws: None,
                ws_dropped: 0,
                conns: HashMap::new(),
                next_generation: 0,
            }),
            clock: Instant::now(),
            inbox: Mutex::new(inbox),
            arrived: Notify::new(),
            actions,
        });
        let tasks = vec![
            tokio::spawn(execute(Arc::downgrade(&shared), actions_rx)),
            tokio::spawn(signaling_loop(Arc::clone(&shared))),
        ];
        Self { shared, tasks }
    }

    /// The next event if one waits, without waiting.
    pub fn try_next_event(&self) -> Option<SwarmEvent> {
        self.shared.inbox().pop()
    }

    /// Events waiting.
    pub fn waiting(&self) -> usize {
        self.shared.inbox().len()
    }

    /// Messages from neighbours dropped so far because their sender was past its share
    /// of the inbox.
    pub fn dropped(&self) -> u64 {
        self.shared.inbox().dropped()
    }

    /// Leaves the swarm.
    pub async fn close(self) {
        let conns: Vec<Conn> = {
            let mut st = self.shared.lock();
            st.mesh.close();
            while st.mesh.poll_action().is_some() {}
            st.ws = None;
            st.conns.drain().map(|(_, c)| c).collect()
        };
        for t in &self.tasks {
            t.abort();
        }
        for c in conns {
            for t in &c.tasks {
                t.abort();
            }
            let _ = c.pc.close().await;
        }
    }
}

impl Transport for NativeSwarm {
    /// This peer's id in the current signaling session.
    fn id(&self) -> Option<PeerId> {
        self.shared.lock().mesh.id()
    }

    /// Neighbours with an open channel.
    fn peers(&self) -> Vec<PeerId> {
        self.shared.lock().mesh.peers()
    }

    /// Queues a whole message for a neighbour.
    fn send(&self, peer: PeerId, data: Vec<u8>) -> Result<(), SendError> {
        self.shared.with_mesh(|mesh, _| mesh.send(peer, &data))
    }

    /// The next event, when one comes (the swarm is open until `close`, which takes it).
    async fn next_event(&mut self) -> Option<SwarmEvent> {
        loop {
            if let Some(ev) = self.try_next_event() {
                return Some(ev);
            }
            // A permit stored by an event that came after the check wakes this at once.
            self.shared.arrived.notified().await;
        }
    }

    fn report(&self, report: &PeerReport) {
        self.shared.with_mesh(|mesh, _| mesh.report(report));
    }

    fn receipt(&self, receipt: &[u8]) {
        self.shared.with_mesh(|mesh, _| mesh.receipt(receipt));
    }

    fn drop_neighbour(&self, peer: PeerId) {
        self.shared
            .with_mesh(|mesh, _| mesh.drop_for_cause(peer, "it broke the protocol"));
    }
}

async fn signaling_loop(shared: Arc<Shared>) {
    let wait = shared.opts.signaling_timeout;
    // Failed tries in a row: the first of a streak is said, then every tenth (a server
    // down for days, a wrong port, or its 403 or 429 went unsaid, retried in silence).
    let mut failures = 0u32;
    loop {
        let connecting = tokio_tungstenite::connect_async(&shared.opts.url);
        let connected = match tokio::time::timeout(wait, connecting).await {
            Ok(Ok((ws, _))) => Some(ws),
            Ok(Err(e)) => {
                said_failure(&mut failures, &e);
                None
            }
            Err(_) => {
                said_failure(&mut failures, &format!("no answer in {wait:?}"));
                None
            }
        };
        if let Some(ws) = connected {
            failures = 0;
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::channel::<String>(MAX_SIGNALING_QUEUED);
            {
                let mut st = shared.lock();
                st.ws = Some(tx);
                st.ws_dropped = 0;
            }
            // Pinged by us too, the server answers within a third of the wait whatever
            // its own ping interval (`--idle-timeout`).
            let mut ping = tokio::time::interval((wait / 3).max(Duration::from_millis(1)));
            let writer = tokio::spawn(async move {
                ping.tick().await;
                loop {
                    let msg = tokio::select! {
                        text = rx.recv() => match text {
                            Some(text) => Message::Text(text.into()),
                            None => break,
                        },
                        _ = ping.tick() => Message::Ping(Vec::new().into()),
                    };
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            while let Ok(Some(Ok(msg))) = tokio::time::timeout(wait, stream.next()).await {
                if let Message::Text(text) = msg {
                    match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(m) => shared.with_mesh(|mesh, now| mesh.on_server(m, now)),
                        Err(e) => eprintln!("shoal: bad signaling message: {}", printable(&e)),
                    }
                }
            }
            writer.abort();
            shared.lock().ws = None;
            shared.with_mesh(|mesh, _| mesh.signaling_down());
        }
        let delay = {
            let mut st = shared.lock();
            if st.mesh.is_closed() {
                return;
            }
            st.mesh.reconnect_delay_ms()
        };
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
    }
}

/// Counts a failed try to reach the signaling server, and says it (on standard error) when
/// it is the first of a streak or every tenth after.
fn said_failure(failures: &mut u32, why: &dyn std::fmt::Display) {
    if failures.is_multiple_of(10) {
        eprintln!(
            "shoal: the signaling server cannot be reached ({} tries so far): {}",
            *failures + 1,
            printable(&why)
        );
    }
    *failures = failures.saturating_add(1);
}

/// The longest one WebRTC step (building a connection with its offer, answering,
/// applying an answer, adding a candidate) may take. The actions run one after another,
/// so a step that never completes would hold every other neighbour's; past this it
/// counts as the connection failing.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// `step`, failed with `what` named once [`STEP_TIMEOUT`] has passed.
async fn bounded<T>(
    what: &str,
    step: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("{what} took over {STEP_TIMEOUT:?}")))
}

/// Carries out the mesh's actions, in order.
async fn execute(shared: std::sync::Weak<Shared>, mut actions: mpsc::UnboundedReceiver<Action>) {
    while let Some(action) = actions.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match action {
            Action::Signal(m) => {
                let text = serde_json::to_string(&m).unwrap_or_default();
                let mut st = shared.lock();
                if let Some(ws) = &st.ws
                    && ws.try_send(text).is_err()
                {
                    // Said once per connection: the server reads nothing (the idle timeout
                    // ends it).
                    st.ws_dropped += 1;
                    if st.ws_dropped == 1 {
                        eprintln!(
                            "shoal: {MAX_SIGNALING_QUEUED} messages wait for the signaling \
                             server; dropping the newest"
                        );
                    }
                }
            }
            // `feed` puts them in the inbox itself.
            Action::Emit(_) => {}
            Action::Connect { peer, offer } => {
                if let Err(e) = bounded("connecting", connect(&shared, peer, offer)).await {
                    eprintln!("shoal: connection to {peer} failed: {}", printable(&e));
                    shared.with_mesh(|mesh, _| mesh.failed(peer));
                }
            }
            Action::Answer { peer, sdp } => {
                let Some((pc, generation)) = shared.conn(peer) else {
                    continue;
                };
                // Applied only to the connection it was made for.
                match bounded("answering", answer(&*pc, sdp)).await {
                    Ok(sdp) => shared.with_conn(peer, generation, |mesh, _| {
                        mesh.described(peer, Signal::Answer { sdp })
                    }),
                    Err(e) => {
                        eprintln!("shoal: answering {peer} failed: {}", printable(&e));
                        shared.with_conn(peer, generation, |mesh, _| mesh.failed(peer));
                    }
                }
            }
            Action::Accept { peer, sdp } => {
                let Some((pc, generation)) = shared.conn(peer) else {
                    continue;
                };
                let ok = match RTCSessionDescription::answer(sdp) {
                    Ok(d) => bounded("applying the answer", async {
                        Ok(pc.set_remote_description(d).await?)
                    })
                    .await
                    .is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    shared.with_conn(peer, generation, |mesh, _| mesh.failed(peer));
                }
            }
            Action::AddCandidate { peer, candidate } => {
                let pc = shared.conn(peer).map(|(pc, _)| pc);
                if let (
                    Some(pc),
                    Signal::Candidate {
                        candidate,
                        sdp_mid,
                        sdp_m_line_index,
                    },
                ) = (pc, candidate)
                {
                    let init = RTCIceCandidateInit {
                        candidate,
                        sdp_mid,
                        sdp_mline_index: sdp_m_line_index,
                        ..Default::default()
                    };
                    // A candidate that does not apply is harmless to ignore.
                    let _ = tokio::time::timeout(STEP_TIMEOUT, pc.add_ice_candidate(init)).await;
                }
            }
            Action::Pump(peer) => {
                if let Some(c) = shared.lock().conns.get(&peer) {
                    c.wake.notify_one();
                }
            }
            Action::Close(peer) => {
                let conn = shared.lock().conns.remove(&peer);
                if let Some(c) = conn {
                    for t in &c.tasks {
                        t.abort();
                    }
                    tokio::spawn(async move {
                        let _ = c.pc.close().await;
                    });
                }
            }
            Action::WakeIn(ms) => {
                let shared = Arc::downgrade(&shared);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    if let Some(shared) = shared.upgrade() {
                        shared.with_mesh(|mesh, now| mesh.tick(now));
                    }
                });
            }
            Action::Warn(w) => eprintln!("shoal: {}", printable(&w)),
        }
    }
}

async fn answer(pc: &dyn PeerConnection, offer: String) -> anyhow::Result<String> {
    pc.set_remote_description(RTCSessionDescription::offer(offer)?)
        .await?;
    let answer = pc.create_answer(None).await?;
    pc.set_local_description(answer.clone()).await?;
    Ok(answer.sdp)
}

struct Handler {
    shared: std::sync::Weak<Shared>,
    peer: PeerId,
    generation: u64,
}

#[async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if let Ok(init) = event.candidate.to_json() {
            let signal = Signal::Candidate {
                candidate: init.candidate,
                // The `webrtc` crate names no media section as "" (not a mid any SDP
                // has): left out, as the protocol allows; the line index says it.
                sdp_mid: init.sdp_mid.filter(|mid| !mid.is_empty()),
                sdp_m_line_index: init.sdp_mline_index,
            };
            shared.with_conn(self.peer, self.generation, |mesh, _| {
                mesh.local_candidate(self.peer, signal);
            });
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if matches!(
            state,
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
        ) && let Some(shared) = self.shared.upgrade()
        {
            shared.with_conn(self.peer, self.generation, |mesh, _| mesh.failed(self.peer));
        }
    }

    async fn on_data_channel(&self, _channel: Arc<dyn DataChannel>) {
        // Shoal's one channel is negotiated (id 0) and never announced here: a channel
        // that is, the neighbour opened itself. The stack holds up to 256 messages of each
        // such channel that nobody reads, for the connection's life, past every limit of
        // ours: the neighbour is dropped (docs/protocol.md, "The channel").
        if let Some(shared) = self.shared.upgrade() {
            shared.with_conn(self.peer, self.generation, |mesh, _| {
                mesh.drop_for_cause(self.peer, "it opened a data channel of its own");
            });
        }
    }
}

/// A peer connection closed (on the runtime, in a task of its own) when this is dropped
/// holding it.
struct CloseOnDrop(Option<Arc<dyn PeerConnection>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let (Some(pc), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

/// Creates the connection to `peer` with its channel; as the offerer, also its offer.
async fn connect(shared: &Arc<Shared>, peer: PeerId, offer: bool) -> anyhow::Result<()> {
    let (ice, generation) = {
        let mut st = shared.lock();
        if !st.mesh.has(peer) {
            // Forgotten while this action waited.
            return Ok(());
        }
        st.next_generation += 1;
        let ice: Vec<RTCIceServer> = st
            .mesh
            .ice_servers()
            .iter()
            .map(|s| RTCIceServer {
                urls: s.urls.clone(),
                username: s.username.clone().unwrap_or_default(),
                credential: s.credential.clone().unwrap_or_default(),
            })
            .collect();
        (ice, st.next_generation)
    };
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
            shared: Arc::downgrade(shared),
            peer,
            generation,
        }))
        .with_runtime(runtime)
        .with_udp_addrs(shared.opts.udp_addrs.clone())
        .with_data_channel_send_buffer_limit(HIGH_WATER)
        .build()
        .await?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    // Closed if this ends before the connection is registered (an error, or the step's
    // time limit dropping this future): dropped unclosed, its driver task and UDP socket
    // lived as long as the process.
    let mut unregistered = CloseOnDrop(Some(Arc::clone(&pc)));
    // One pre-negotiated, reliable, ordered channel (id 0) on both sides.
    let init = RTCDataChannelInit {
        negotiated: Some(0),
        ..Default::default()
    };
    let dc = pc.create_data_channel("shoal", Some(init)).await?;
    let wake = Arc::new(Notify::new());
    let tasks = vec![
        tokio::spawn(read_channel(
            Arc::downgrade(shared),
            peer,
            generation,
            Arc::clone(&dc),
        )),
        tokio::spawn(write_channel(
            Arc::downgrade(shared),
            peer,
            dc,
            Arc::clone(&wake),
        )),
    ];
    let gone = {
        let mut st = shared.lock();
        let gone = st.mesh.is_closed() || !st.mesh.has(peer);
        unregistered.0 = None;
        if !gone {
            st.conns.insert(
                peer,
                Conn {
                    generation,
                    pc: Arc::clone(&pc),
                    wake,
                    tasks: Vec::new(),
                },
            );
        }
        gone
    };
    if gone {
        for t in &tasks {
            t.abort();
        }
        let _ = pc.close().await;
        return Ok(());
    }
    if let Some(c) = shared.lock().conns.get_mut(&peer) {
        c.tasks = tasks;
    }
    if offer {
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer.clone()).await?;
        shared.with_mesh(|mesh, _| mesh.described(peer, Signal::Offer { sdp: offer.sdp }));
    }
    Ok(())
}

async fn read_channel(
    shared: std::sync::Weak<Shared>,
    peer: PeerId,
    generation: u64,
    dc: Arc<dyn DataChannel>,
) {
    while let Some(ev) = dc.poll().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match ev {
            DataChannelEvent::OnOpen => {
                shared.with_conn(peer, generation, |mesh, now| mesh.channel_open(peer, now));
            }
            DataChannelEvent::OnMessage(msg) => {
                shared.with_conn(peer, generation, |mesh, now| {
                    let (frame, sent) = frame_bytes(&msg);
                    mesh.message(peer, frame, sent, now);
                });
            }
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
    if let Some(shared) = shared.upgrade() {
        shared.with_conn(peer, generation, |mesh, _| mesh.failed(peer));
    }
}

/// A received message's bytes as a frame, and its length as sent (`None`: text): a text
/// message is no frame (docs/protocol.md, "Framing") and drops its neighbour, as browser
/// peers drop it (else a peer sending its frames as text got on with native peers and was
/// dropped by browsers).
fn frame_bytes(msg: &webrtc::data_channel::RTCDataChannelMessage) -> (&[u8], Option<usize>) {
    if msg.is_string {
        (&[], None)
    } else {
        (&msg.data, Some(msg.data.len()))
    }
}

/// Sends the mesh's queued frames for `peer` whenever woken; the channel's send-buffer
/// limit makes `send` wait while the other side is slow.
async fn write_channel(
    shared: std::sync::Weak<Shared>,
    peer: PeerId,
    dc: Arc<dyn DataChannel>,
    wake: Arc<Notify>,
) {
    loop {
        wake.notified().await;
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let frame = shared.lock().mesh.next_frame(peer, 0);
            drop(shared);
            let Some(frame) = frame else { break };
            if dc.send(BytesMut::from(&frame[..])).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LOGGED_CHARS, frame_bytes, printable};
    use crate::links::{InboundLink, LinkError};
    use shoal_shared::framing::SendQueue;
    use webrtc::data_channel::RTCDataChannelMessage;

    #[test]
    fn a_frame_sent_as_text_drops_its_neighbour() {
        let mut q = SendQueue::new(1024, 1 << 20, 1 << 20);
        q.push(b"hello").expect("queued");
        let frame = q.next_frame(0).expect("one frame");
        let message = |is_string| RTCDataChannelMessage {
            is_string,
            data: frame.as_slice().into(),
        };
        let mut link = InboundLink::new(1 << 20, 4);
        let _ = link.on_open();
        let (binary, text) = (message(false), message(true));
        let (bytes, sent) = frame_bytes(&binary);
        assert_eq!(
            link.on_message(bytes, sent, 0).expect("a frame"),
            Some(b"hello".to_vec())
        );
        let (bytes, sent) = frame_bytes(&text);
        assert!(matches!(
            link.on_message(bytes, sent, 1),
            Err(LinkError::NotAFrame(None))
        ));
    }

    #[test]
    fn what_others_wrote_is_logged_as_one_harmless_line() {
        // An error of the SDP parser quotes the neighbour's field as it came.
        let quoted = "SdpInvalidValue(\"\u{1b}]0;owned\u{7}\nshoal: all is fine\")";
        let line = printable(&quoted);
        assert!(!line.chars().any(char::is_control), "{line}");
        assert!(
            line.contains("\\u{1b}") && line.contains("\\u{a}"),
            "{line}"
        );
        assert_eq!(
            printable(&"x".repeat(10_000)).chars().count(),
            LOGGED_CHARS + 1
        );
        assert_eq!(printable(&"neighbour 3 left"), "neighbour 3 left");
    }
}

//! The one connection state machine of a swarm member, platform-neutral and sans-IO. The
//! browser transport (`wasm/transport.rs`) and the native one (`native.rs`) feed it what
//! the signaling server says, what their WebRTC stacks report and the time, and carry out
//! the [`Action`]s it returns: they create connections and move bytes, and decide
//! nothing.
//!
//! What it decides:
//! - **Neighbour set reconciliation.** Each `neighbours` message replaces the set: a
//!   connection is started to every new neighbour this side offers to ([`should_offer`]);
//!   connections to peers no longer listed, or that `left`, are closed, open or not (a
//!   hostile peer rejoining under new ids would otherwise pile up channels the server
//!   knows nothing of). Open channels made before a signaling reconnect (under our
//!   previous id) stay for [`SESSION_GRACE_MS`] after the new `welcome`, or for good
//!   while the server is unreachable; one to a peer the new session lists again is
//!   replaced by a new connection. At most [`MAX_LINKS`] connections.
//! - **Who offers:** the smaller id. An offer from a peer this side should offer to is
//!   still answered when no connection to it exists yet (the two sides may disagree
//!   about the neighbour set for a moment); a second offer on a live connection is
//!   ignored.
//! - **Candidate holding:** local ICE candidates gathered before this side's offer or
//!   answer went out are held (at most [`MAX_HELD_CANDIDATES`]) and sent right behind
//!   it: a candidate must not reach the other side before its description.
//! - **Connect deadline:** a connection whose channel has not opened
//!   [`CONNECT_DEADLINE_SECS`] after it started is dropped and the neighbour reported
//!   `unreachable` (the server then gives both sides others); so is one whose setup fails
//!   before it opened. Nothing is retried: the neighbour set brings another peer.
//! - **Reconnect:** signaling reconnects with [`Backoff`]; open channels survive it for
//!   [`SESSION_GRACE_MS`] (above).
//! - **When a channel is up:** `peer_up` (and with it the right to send) comes
//!   [`SETTLE_MS`] after this side's channel opened, or as soon as the other side's first
//!   frame arrives, whichever is first. A WebRTC stack can drop a message that arrives
//!   with the last packet of the SCTP handshake (the `webrtc` crate 0.21 does: its side of
//!   a pre-negotiated channel is not attached until it has processed that packet); a
//!   frame from the other side proves its side is attached, and nothing is sent before.
//! - **Inbound:** every channel's frames go through an [`InboundLink`]: whole messages
//!   only, nothing before `peer_up` (what arrives earlier is delivered right behind it),
//!   and a neighbour that keeps sending broken traffic is dropped.
//! - **Outbound backpressure:** each channel has one [`SendQueue`]; the transport takes
//!   frames from it with [`Mesh::next_frame`] while its channel has room.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use shoal_shared::framing::{DEFAULT_CHUNK, QueueError, SendQueue};
use shoal_shared::learn::identity::{Identity, hex};
use shoal_shared::protocol::{
    ClientMessage, ErrorCode, IceServer, MAX_ICE_FIELD, MAX_ICE_URLS, PeerId, PeerReport,
    ServerMessage, Signal, from_hex, identify_message, usable_ice_url,
};

use crate::links::{InboundLink, LinkError};
use crate::swarm::{
    Backoff, CONNECT_DEADLINE_SECS, MAX_HELD_CANDIDATES, MAX_IN_FLIGHT, MAX_MESSAGE, SendError,
    SwarmEvent, max_queued_for, should_offer,
};

/// How long after its channel opened a neighbour is announced (`peer_up`) if it has sent
/// nothing meanwhile.
pub const SETTLE_MS: u64 = 500;
/// The most connections a peer keeps: twice the largest `k` a server gives (16), the
/// most neighbours it may link to one peer.
pub const MAX_LINKS: usize = 32;
/// How long open channels of a previous signaling session stay once a new one began
/// (a server restart: training goes on over them while the new neighbours connect).
pub const SESSION_GRACE_MS: u64 = 60_000;
/// [`CONNECT_DEADLINE_SECS`] in the mesh's unit of time.
const CONNECT_DEADLINE_MS: u64 = CONNECT_DEADLINE_SECS as u64 * 1000;

/// What the transport must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send this on the signaling websocket (dropped if it is not open).
    Signal(ClientMessage),
    /// Hand this to the peer logic.
    Emit(SwarmEvent),
    /// Create a peer connection to `peer` with the ICE servers of the session and its one
    /// pre-negotiated data channel (`negotiated`, id 0, ordered, reliable). With `offer`,
    /// then create an offer, set it as the local description and report its SDP with
    /// [`Mesh::described`].
    Connect {
        /// The neighbour.
        peer: PeerId,
        /// This side offers.
        offer: bool,
    },
    /// Apply this offer as the remote description, create an answer, set it as the local
    /// description and report its SDP with [`Mesh::described`].
    Answer {
        /// The neighbour.
        peer: PeerId,
        /// The offer's SDP.
        sdp: String,
    },
    /// Apply this answer as the remote description.
    Accept {
        /// The neighbour.
        peer: PeerId,
        /// The answer's SDP.
        sdp: String,
    },
    /// Add this remote ICE candidate (one that does not apply is ignored).
    AddCandidate {
        /// The neighbour.
        peer: PeerId,
        /// A [`Signal::Candidate`].
        candidate: Signal,
    },
    /// Frames are queued for `peer`: send them while its channel has room.
    Pump(PeerId),
    /// Close the connection to `peer` and forget it (its events no longer matter).
    Close(PeerId),
    /// Call [`Mesh::tick`] this many milliseconds from now (deadlines and settling are
    /// kept by `tick`; nothing else calls it reliably).
    WakeIn(u64),
    /// Worth a line in the log.
    Warn(String),
}

struct Link {
    /// When the connection was started (the connect deadline counts from here).
    started_ms: u64,
    /// When this side's channel opened.
    opened_ms: Option<u64>,
    /// A frame came from the other side (its end of the channel is attached).
    heard: bool,
    inbound: InboundLink,
    queue: SendQueue,
    /// Local candidates gathered before this side's description was sent (`None` once
    /// it was).
    held: Option<Vec<Signal>>,
    /// The other side's candidates taken (at most [`MAX_HELD_CANDIDATES`]).
    remote_candidates: usize,
    /// Our id in the signaling session it was made in.
    session: Option<PeerId>,
}

impl Link {
    /// A link for messages up to `max_message` bytes each way, taking `bytes` (a rate a
    /// millisecond and a burst) if given.
    fn new(now_ms: u64, max_message: usize, bytes: Option<(f64, f64)>) -> Self {
        let mut inbound = InboundLink::new(max_message, MAX_IN_FLIGHT);
        if let Some((rate, burst)) = bytes {
            inbound.limit_bytes(rate, burst);
        }
        Self {
            started_ms: now_ms,
            opened_ms: None,
            heard: false,
            inbound,
            queue: SendQueue::new(DEFAULT_CHUNK, max_message, max_queued_for(max_message)),
            held: Some(Vec::new()),
            remote_candidates: 0,
            session: None,
        }
    }

    /// Announced with `peer_up`: messages flow both ways.
    fn is_up(&self) -> bool {
        self.inbound.is_open()
    }

    /// The channel has not opened yet.
    fn is_pending(&self) -> bool {
        self.opened_ms.is_none()
    }
}

/// Every connection of one swarm member. Time is any monotonic count of milliseconds.
pub struct Mesh {
    me: Option<PeerId>,
    ice_servers: Vec<IceServer>,
    links: BTreeMap<PeerId, Link>,
    actions: VecDeque<Action>,
    backoff: Backoff,
    frame_errors: u64,
    closed: bool,
    /// The key this member signs updates with: proven to the server on each `welcome`
    /// (`identify`), so that its receipts count. `None`: an observer, or receipts off.
    identity: Option<Identity>,
    /// The largest message a link carries either way (the task's, see
    /// [`max_message_for`](crate::swarm::max_message_for)).
    max_message: usize,
    /// What a link takes from its neighbour in bytes (see [`Mesh::set_link_bytes`]).
    link_bytes: Option<(f64, f64)>,
    /// When open channels of a previous signaling session go ([`SESSION_GRACE_MS`]
    /// after the latest `welcome`).
    grace_until: u64,
    /// The last report sent, and when (by the latest time this member was given): sent
    /// again right after each `welcome`'s `identify`, ahead of any receipt, while under
    /// [`REPORT_RESEND_MS`] old (the server takes receipts only from a connection that
    /// reported training in the last 30 s, and a new session has reported nothing yet;
    /// an older report would claim training this peer no longer does).
    last_report: Option<(PeerReport, u64)>,
    /// The latest time this member was given (`on_server`, `tick`).
    clock_ms: u64,
    /// When a wake-up asked for to expire partial messages is due (`None`: none asked).
    expiry_wake: Option<u64>,
    /// When a wake-up asked for a connection deadline is due (`None`: none asked).
    deadline_wake: Option<u64>,
    /// Listed neighbours that offer to us (the smaller id offers) and have not yet, and
    /// since when: past [`CONNECT_DEADLINE_MS`] without an offer they are reported
    /// `unreachable`, as a connection of ours that did not open is (else a peer that
    /// never offers holds its place among our neighbours for good).
    awaiting: Vec<(PeerId, u64)>,
    /// The server's last neighbours list of this session: a listed neighbour whose open
    /// connection closed is connected again (or awaited, or reported), not left without a
    /// connection until the list next changes.
    listed: BTreeSet<PeerId>,
    /// Neighbours dropped for breaking the protocol within the last minute, and when:
    /// their offers are ignored meanwhile (each connection starts its limits afresh: one
    /// oversized message per connection, connection after connection).
    dropped: Vec<(PeerId, u64)>,
    /// When each neighbour's recent connections that opened were closed (the last
    /// minute's): one that closes its channel and offers again and again is refused
    /// past [`MAX_RECONNECTS`] (each connection starts its limits afresh, and costs
    /// sockets and a handshake).
    reconnects: Vec<(PeerId, u64)>,
}

/// Whether `sdp` describes no media but Shoal's data channel: at most one media section,
/// `m=application` over SCTP (`… UDP/DTLS/SCTP webrtc-datachannel`, or the older
/// `… DTLS/SCTP 5000` some stacks still offer), read as attributes are, leading spaces
/// trimmed.
/// An offer with audio or video sections had a browser answer them and receive the
/// neighbour's media streams, which no limit of the link's sees (docs/protocol.md,
/// "Connections": a connection carries nothing else).
fn data_only(sdp: &str) -> bool {
    let mut sections = sdp
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("m="));
    match (sections.next(), sections.next()) {
        (None, _) => true,
        (Some(m), None) => {
            let mut words = m.split_whitespace();
            words.next() == Some("application")
                && words
                    .nth(1)
                    .is_some_and(|proto| proto.ends_with("DTLS/SCTP"))
        }
        (Some(_), Some(_)) => false,
    }
}

/// Whether the ICE candidate line `c` is for UDP (its third field, after the foundation
/// and the component; `c` with its `candidate:` or without), or says nothing of it (the
/// empty end-of-candidates line).
fn udp_candidate(c: &str) -> bool {
    c.split_whitespace()
        .nth(2)
        .is_none_or(|t| t.eq_ignore_ascii_case("udp"))
}

/// How long a neighbour's closed connections count toward [`MAX_RECONNECTS`], and a drop
/// for cause keeps its offers refused: a minute.
const RECENT_MS: u64 = 60_000;

/// The most connections one neighbour may open and close within a minute before its
/// offers are refused and it is reported `unreachable`.
pub const MAX_RECONNECTS: usize = 4;

/// How old the last report may be to be sent again on a new session.
pub const REPORT_RESEND_MS: u64 = 25_000;

impl Mesh {
    /// A member not yet connected; `seed` jitters its reconnect backoff.
    pub fn new(seed: u64) -> Self {
        Self {
            me: None,
            ice_servers: Vec::new(),
            links: BTreeMap::new(),
            actions: VecDeque::new(),
            backoff: Backoff::new(250, 10_000, seed),
            frame_errors: 0,
            closed: false,
            identity: None,
            max_message: MAX_MESSAGE,
            link_bytes: None,
            grace_until: 0,
            last_report: None,
            awaiting: Vec::new(),
            listed: BTreeSet::new(),
            dropped: Vec::new(),
            reconnects: Vec::new(),
            clock_ms: 0,
            expiry_wake: None,
            deadline_wake: None,
        }
    }

    /// Carries messages up to `bytes` (at most [`MAX_MESSAGE`]) on links made from now
    /// on: a neighbour's longer message is dropped as too large before it is reassembled.
    /// Drivers set the task's ([`max_message_for`](crate::swarm::max_message_for)) before
    /// connecting.
    pub fn set_max_message(&mut self, bytes: usize) {
        self.max_message = bytes.min(MAX_MESSAGE);
    }

    /// Takes from each neighbour at most `bytes` (a rate a millisecond and a burst, the
    /// task's [`link_bytes_for`](crate::swarm::link_bytes_for)) on links made from now
    /// on; `None`: no bound in bytes.
    pub fn set_link_bytes(&mut self, bytes: Option<(f64, f64)>) {
        self.link_bytes = bytes;
    }

    /// Proves `identity` to the server on every (re)connection, so that the receipts
    /// this member signs and gets count in the task's ledger.
    pub fn set_identity(&mut self, identity: Identity) {
        self.identity = Some(identity);
    }

    /// Sends a receipt this member signed to the server (dropped while the server is
    /// unreachable).
    pub fn receipt(&mut self, receipt: &[u8]) {
        if self.me.is_some() {
            self.actions
                .push_back(Action::Signal(ClientMessage::Receipt {
                    receipt: hex(receipt),
                }));
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// This peer's id in the current signaling session.
    pub fn id(&self) -> Option<PeerId> {
        self.me
    }

    /// The ICE servers of the current session.
    pub fn ice_servers(&self) -> &[IceServer] {
        &self.ice_servers
    }

    /// Neighbours announced with `peer_up` and not down since.
    pub fn peers(&self) -> Vec<PeerId> {
        self.links
            .iter()
            .filter(|(_, l)| l.is_up())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Whether a connection to `peer` exists (pending or open).
    pub fn has(&self, peer: PeerId) -> bool {
        self.links.contains_key(&peer)
    }

    /// Messages dropped as corrupt, truncated, oversized or unfinished, over all channels.
    pub fn frame_errors(&self) -> u64 {
        self.frame_errors
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The delay before the next signaling attempt.
    pub fn reconnect_delay_ms(&mut self) -> u32 {
        self.backoff.next_delay_ms()
    }

    /// A message from the signaling server.
    pub fn on_server(&mut self, m: ServerMessage, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        match m {
            ServerMessage::Welcome {
                peer,
                ice_servers,
                task,
                nonce,
                ..
            } => {
                self.me = Some(peer);
                self.awaiting.clear();
                self.listed.clear();
                self.grace_until = now_ms + SESSION_GRACE_MS;
                self.ice_servers = usable_ice_servers(ice_servers);
                self.backoff.reset();
                let nonce = from_hex(&nonce).and_then(|n| <[u8; 32]>::try_from(n).ok());
                if let (Some(id), Some(nonce)) = (&self.identity, nonce) {
                    let sig = id.sign(&identify_message(&task, peer, &nonce));
                    self.actions
                        .push_back(Action::Signal(ClientMessage::Identify {
                            key: hex(&id.public()),
                            signature: hex(&sig),
                        }));
                    if let Some((report, at)) = self.last_report.clone()
                        && now_ms.saturating_sub(at) < REPORT_RESEND_MS
                    {
                        self.actions
                            .push_back(Action::Signal(ClientMessage::Report { report }));
                    }
                }
                self.emit(SwarmEvent::Signaling { me: Some(peer) });
            }
            ServerMessage::Neighbours { peers } => self.on_neighbours(peers, now_ms),
            // Its websocket is gone while ours is up: the server no longer links us, and
            // its channel goes too, open or not. (Kept, a neighbour could rejoin under a
            // new id again and again and pile up channels the server knows nothing of:
            // "ghost" neighbours that outnumber the drawn ones.) Channels outlive only
            // our own signaling connection's loss, until its next `neighbours`.
            ServerMessage::Left { peer } => self.forget(peer),
            ServerMessage::Joined { .. } => {}
            ServerMessage::Signal { from, signal } => self.on_signal(from, signal, now_ms),
            ServerMessage::TaskState { paused } => self.emit(SwarmEvent::TaskState { paused }),
            ServerMessage::Error { code, message } => {
                // Either way this client's code or task is not the server's: reconnecting
                // would be refused again and again. Its driver stops.
                if matches!(code, ErrorCode::TaskChanged | ErrorCode::BadVersion) {
                    self.emit(SwarmEvent::TaskChanged);
                }
                self.actions.push_back(Action::Warn(format!(
                    "signaling error {}: {message}",
                    code.as_str()
                )));
            }
        }
    }

    /// The signaling websocket closed (open channels stay).
    pub fn signaling_down(&mut self) {
        self.me = None;
        self.emit(SwarmEvent::Signaling { me: None });
    }

    fn on_neighbours(&mut self, peers: Vec<PeerId>, now_ms: u64) {
        let Some(me) = self.me else { return };
        let neighbours: BTreeSet<PeerId> = peers
            .into_iter()
            .filter(|&p| p != me)
            .take(MAX_LINKS)
            .collect();
        // The list is the server's whole view of our neighbours: a link of this session
        // to anyone else goes, open or not. One of a previous session goes if it is
        // listed (the other side knows us by our new id: it is made again) or not yet
        // open; else it stays until the grace ends (`tick`).
        let stale: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(p, l)| {
                let listed = neighbours.contains(p);
                if l.session == Some(me) {
                    !listed
                } else {
                    listed || l.is_pending()
                }
            })
            .map(|(p, _)| *p)
            .collect();
        for p in stale {
            self.forget(p);
        }
        self.awaiting.retain(|(p, _)| neighbours.contains(p));
        self.listed = neighbours;
        self.connect_listed(now_ms);
    }

    /// Connects to the listed neighbours without a connection: offers to those we offer
    /// to (while there is room), and awaits the others' offers (see `awaiting`).
    fn connect_listed(&mut self, now_ms: u64) {
        let Some(me) = self.me else { return };
        let new: Vec<PeerId> = self
            .listed
            .iter()
            .copied()
            .filter(|p| !self.links.contains_key(p) && should_offer(me, *p))
            .collect();
        for p in new {
            if self.links.len() >= MAX_LINKS {
                break;
            }
            self.start(p, now_ms, true);
        }
        let offering: Vec<PeerId> = self
            .listed
            .iter()
            .copied()
            .filter(|p| !self.links.contains_key(p) && !should_offer(me, *p))
            .filter(|p| !self.awaiting.iter().any(|(q, _)| q == p))
            .collect();
        for p in offering {
            self.awaiting.push((p, now_ms));
        }
        self.wake_for_deadline(now_ms);
    }

    /// `from`'s offer or answer with the candidates in its SDP held to the rule of
    /// trickled ones (below): UDP ones only, counted against the connection's
    /// `MAX_HELD_CANDIDATES` (WebRTC stacks probe every `a=candidate` line of a remote
    /// description as they do a trickled candidate: a 16 KiB offer holds about 350).
    fn hold_candidates(&mut self, from: PeerId, sdp: &str) -> String {
        let Some(link) = self.links.get_mut(&from) else {
            return sdp.to_owned();
        };
        let mut kept = String::with_capacity(sdp.len());
        for line in sdp.split_inclusive('\n') {
            // As the `webrtc` crate's SDP parser reads an attribute: its name is what comes
            // before the first `:`, both trimmed (`a= candidate:` is a candidate to it).
            if let Some((name, value)) = line
                .trim_start()
                .strip_prefix("a=")
                .and_then(|a| a.split_once(':'))
                && name.trim() == "candidate"
            {
                if !udp_candidate(value) || link.remote_candidates >= MAX_HELD_CANDIDATES {
                    continue;
                }
                link.remote_candidates += 1;
            }
            kept.push_str(line);
        }
        kept
    }

    fn on_signal(&mut self, from: PeerId, signal: Signal, now_ms: u64) {
        let Some(me) = self.me else { return };
        if from == me {
            return;
        }
        match signal {
            Signal::Offer { sdp } => {
                if self.links.get(&from).is_some_and(|l| l.session != Some(me)) {
                    // A connection of our previous session: the other side makes a new
                    // one, to our new id.
                    self.forget(from);
                }
                // One we dropped for breaking the protocol, within the last minute: not
                // taken again (each connection starts its limits afresh).
                if self
                    .dropped
                    .iter()
                    .any(|(p, t)| *p == from && now_ms.saturating_sub(*t) < RECENT_MS)
                {
                    return;
                }
                // The neighbour that offers to us offers again over a connection that was
                // open: its side saw the connection close first. The new one replaces it,
                // counted as a close (see `failed`).
                if should_offer(from, me)
                    && self
                        .links
                        .get(&from)
                        .is_some_and(|l| l.session == Some(me) && l.opened_ms.is_some())
                {
                    let was_listed = self.listed.contains(&from);
                    self.failed(from);
                    if was_listed && !self.listed.contains(&from) {
                        return;
                    }
                }
                if self.links.contains_key(&from) {
                    // Glare or a repeat: the live connection stands.
                    return;
                }
                if self.links.len() >= MAX_LINKS {
                    self.actions.push_back(Action::Warn(format!(
                        "an offer from {from} past {MAX_LINKS} connections: ignored"
                    )));
                    return;
                }
                let closes = self.recent_closes(from, now_ms);
                if closes >= MAX_RECONNECTS {
                    // Told once: its later offers are dropped quietly until the minute
                    // has passed (the server links us to another peer).
                    if closes == MAX_RECONNECTS {
                        self.reconnects.push((from, now_ms));
                        self.actions.push_back(Action::Warn(format!(
                            "{from} opened and closed {MAX_RECONNECTS} connections within a minute: its offers are refused"
                        )));
                        self.report_unreachable(from);
                    }
                    return;
                }
                if !data_only(&sdp) {
                    self.actions.push_back(Action::Warn(format!(
                        "{from} offered a connection with media besides Shoal's data channel: refused"
                    )));
                    self.report_unreachable(from);
                    return;
                }
                self.start(from, now_ms, false);
                let sdp = self.hold_candidates(from, &sdp);
                self.actions.push_back(Action::Answer { peer: from, sdp });
            }
            Signal::Answer { sdp } => {
                if self.links.contains_key(&from) {
                    if !data_only(&sdp) {
                        self.drop_for_cause(
                            from,
                            "its answer has media besides Shoal's data channel",
                        );
                        return;
                    }
                    let sdp = self.hold_candidates(from, &sdp);
                    self.actions.push_back(Action::Accept { peer: from, sdp });
                }
            }
            candidate @ Signal::Candidate { .. } => {
                // At most `MAX_HELD_CANDIDATES` from one neighbour per connection: each
                // is paired with every local one and probed (at addresses it names).
                // Only UDP ones: Shoal gathers no other, and a TCP candidate makes the
                // native stack open a TCP connection to any address it names, with no
                // timeout (a neighbour's 64 of them, connection after connection, ran a
                // peer out of file descriptors).
                if let Signal::Candidate { candidate: c, .. } = &candidate
                    && !udp_candidate(c)
                {
                    return;
                }
                if let Some(link) = self.links.get_mut(&from)
                    && link.remote_candidates < MAX_HELD_CANDIDATES
                {
                    link.remote_candidates += 1;
                    self.actions.push_back(Action::AddCandidate {
                        peer: from,
                        candidate,
                    });
                }
            }
        }
    }

    /// This side's offer or answer for `peer` is set as its local description: send it,
    /// then the candidates held meanwhile.
    pub fn described(&mut self, peer: PeerId, description: Signal) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let held = link.held.take().unwrap_or_default();
        self.send_signal(peer, description);
        for c in held {
            self.send_signal(peer, c);
        }
    }

    /// The local ICE agent gathered a candidate for `peer`.
    pub fn local_candidate(&mut self, peer: PeerId, candidate: Signal) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        match &mut link.held {
            Some(held) => {
                if held.len() < MAX_HELD_CANDIDATES {
                    held.push(candidate);
                }
            }
            None => self.send_signal(peer, candidate),
        }
    }

    /// This side's channel to `peer` opened: `peer_up` follows once the other side is
    /// heard from or after [`SETTLE_MS`].
    pub fn channel_open(&mut self, peer: PeerId, now_ms: u64) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if !link.is_pending() {
            return;
        }
        link.opened_ms = Some(now_ms);
        if link.heard {
            self.up(peer);
        } else {
            self.actions.push_back(Action::WakeIn(SETTLE_MS));
        }
    }

    /// Announces `peer`: `peer_up`, then whatever arrived before, then what was queued
    /// meanwhile goes out.
    fn up(&mut self, peer: PeerId) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if link.is_up() {
            return;
        }
        let early = link.inbound.on_open();
        self.emit(SwarmEvent::PeerUp(peer));
        for data in early {
            self.emit(SwarmEvent::Message { from: peer, data });
        }
        self.actions.push_back(Action::Pump(peer));
    }

    /// One frame from `peer`'s channel.
    pub fn frame(&mut self, peer: PeerId, frame: &[u8], now_ms: u64) {
        self.message(peer, frame, Some(frame.len()), now_ms);
    }

    /// [`frame`](Self::frame) for a data-channel message of `sent` bytes (`None`: text)
    /// of which the transport read `frame` (see [`InboundLink::on_message`]).
    pub fn message(&mut self, peer: PeerId, frame: &[u8], sent: Option<usize>, now_ms: u64) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.heard = true;
        if !link.is_pending() && !link.is_up() {
            self.up(peer);
        }
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let before = link.inbound.dropped();
        let outcome = link.inbound.on_message(frame, sent, now_ms);
        self.frame_errors += link.inbound.dropped() - before;
        if matches!(outcome, Err(LinkError::NotAFrame(_))) {
            self.frame_errors += 1;
        }
        match outcome {
            Ok(Some(data)) => self.emit(SwarmEvent::Message { from: peer, data }),
            // A bad frame drops its message (counted), not the neighbour...
            Ok(None) => {}
            // ...unless that keeps happening.
            Err(e) => self.drop_for_cause(peer, &e.to_string()),
        }
        // Expiries already due are handled now (a wake-up can wait behind a slow
        // connection step), and the next one asked for.
        self.expire_partials(now_ms);
    }

    /// Partial messages that got no frame for `PARTIAL_EXPIRY_MS` are dropped, each a
    /// strike, also when their sender sends nothing more.
    fn expire_partials(&mut self, now_ms: u64) {
        if self.expiry_wake.is_some_and(|at| at <= now_ms) {
            self.expiry_wake = None;
        }
        let mut broke = Vec::new();
        for (p, link) in &mut self.links {
            if link.inbound.next_expiry().is_some_and(|at| at <= now_ms) {
                let before = link.inbound.dropped();
                let verdict = link.inbound.tick(now_ms);
                self.frame_errors += link.inbound.dropped() - before;
                if let Err(e) = verdict {
                    broke.push((*p, e));
                }
            }
        }
        for (p, e) in broke {
            self.drop_for_cause(p, &e.to_string());
        }
        self.wake_for_expiry(now_ms);
    }

    /// Asks for a wake-up when the next partial message expires, unless one as early is
    /// asked for already (and not overdue: a timer a millisecond early leaves none).
    fn wake_for_expiry(&mut self, now_ms: u64) {
        let at = self
            .links
            .values()
            .filter_map(|l| l.inbound.next_expiry())
            .min();
        ask_wake(&mut self.expiry_wake, &mut self.actions, at, now_ms);
    }

    /// Closes the connection to `peer`, which broke the protocol (`why`), and reports it
    /// `unreachable`: the server still links the pair, and told, it gives each side
    /// another neighbour (else both would be a neighbour short for good).
    pub fn drop_for_cause(&mut self, peer: PeerId, why: &str) {
        if !self.links.contains_key(&peer) {
            return;
        }
        self.actions
            .push_back(Action::Warn(format!("dropping neighbour {peer}: {why}")));
        let clock = self.clock_ms;
        self.dropped
            .retain(|(p, t)| *p != peer && clock.saturating_sub(*t) < RECENT_MS);
        if self.dropped.len() < 64 * MAX_LINKS {
            self.dropped.push((peer, clock));
        }
        self.forget(peer);
        if self.me.is_some() {
            self.report_unreachable(peer);
        }
    }

    /// The connection to `peer` failed, closed, or could not be set up. One that never
    /// opened is reported `unreachable`; one that was open is reported down, and, while
    /// the server lists it, connected again: we offer again, or await its offer (reported
    /// `unreachable` if none comes in time), up to [`MAX_RECONNECTS`] closes a minute, and
    /// then report it. Before, it stayed without a connection until the list changed: a
    /// neighbour that let the channel open and closed it held the place for good, and one
    /// lost connection left both sides a neighbour short.
    pub fn failed(&mut self, peer: PeerId) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        let pending = link.is_pending();
        let clock = self.clock_ms;
        // A connection of this session that opened and then closed from the other side
        // (or its transport): counted toward `MAX_RECONNECTS` (closes this side decides,
        // a neighbours list, a new session, count for nothing).
        let closed = link.opened_ms.is_some() && link.session == self.me;
        let closes = if closed {
            let closes = self.recent_closes(peer, clock);
            // At most a minute's worth per neighbour, and a bounded list.
            if closes <= MAX_RECONNECTS && self.reconnects.len() < 64 * MAX_LINKS {
                self.reconnects.push((peer, clock));
            }
            closes + 1
        } else {
            0
        };
        self.forget(peer);
        if self.me.is_none() {
            return;
        }
        if pending {
            self.report_unreachable(peer);
        } else if closed && self.listed.contains(&peer) {
            if closes >= MAX_RECONNECTS {
                self.actions.push_back(Action::Warn(format!(
                    "{peer}'s connections closed {closes} times within a minute: reported unreachable"
                )));
                self.report_unreachable(peer);
            } else {
                self.connect_listed(clock);
            }
        }
    }

    /// Drops every pending connection past its deadline and announces every open one
    /// that has settled.
    pub fn tick(&mut self, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        if self.deadline_wake.is_some_and(|at| at <= now_ms) {
            self.deadline_wake = None;
        }
        let late: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.is_pending() && now_ms.saturating_sub(l.started_ms) >= CONNECT_DEADLINE_MS
            })
            .map(|(p, _)| *p)
            .collect();
        for p in late {
            self.failed(p);
        }
        // Neighbours that were to offer and did not.
        let silent: Vec<PeerId> = self
            .awaiting
            .iter()
            .filter(|(_, t)| now_ms.saturating_sub(*t) >= CONNECT_DEADLINE_MS)
            .map(|(p, _)| *p)
            .collect();
        for p in silent {
            self.awaiting.retain(|(q, _)| *q != p);
            if !self.links.contains_key(&p) && self.me.is_some() {
                self.actions.push_back(Action::Warn(format!(
                    "neighbour {p} sent no offer in {CONNECT_DEADLINE_SECS} s"
                )));
                self.report_unreachable(p);
            }
        }
        let settled: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                !l.is_up()
                    && l.opened_ms
                        .is_some_and(|t| now_ms.saturating_sub(t) >= SETTLE_MS)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in settled {
            self.up(p);
        }
        self.wake_for_deadline(now_ms);
        self.expire_partials(now_ms);
        // Channels of a previous session, once the grace is over (kept while the server
        // is unreachable).
        if let Some(me) = self.me
            && now_ms >= self.grace_until
        {
            let old: Vec<PeerId> = self
                .links
                .iter()
                .filter(|(_, l)| l.session != Some(me))
                .map(|(p, _)| *p)
                .collect();
            if !old.is_empty() {
                for p in old {
                    self.forget(p);
                }
                // Their room goes to listed neighbours it kept out.
                self.connect_listed(now_ms);
            }
        }
    }

    /// Queues a whole message for an open neighbour.
    pub fn send(&mut self, peer: PeerId, data: &[u8]) -> Result<(), SendError> {
        let link = self
            .links
            .get_mut(&peer)
            .filter(|l| l.is_up())
            .ok_or(SendError::NoSuchPeer(peer))?;
        link.queue.push(data).map_err(|e| match e {
            QueueError::Full => SendError::Full(peer),
            QueueError::TooLarge => SendError::TooLarge,
        })?;
        self.actions.push_back(Action::Pump(peer));
        Ok(())
    }

    /// The next frame for `peer`'s channel, which holds `buffered` bytes not yet sent;
    /// `None`: wait for its buffered-amount-low event (or for more data).
    pub fn next_frame(&mut self, peer: PeerId, buffered: usize) -> Option<Vec<u8>> {
        let link = self.links.get_mut(&peer).filter(|l| l.is_up())?;
        link.queue.next_frame(buffered)
    }

    /// Whether frames wait for `peer`'s channel.
    pub fn has_queued(&self, peer: PeerId) -> bool {
        self.links.get(&peer).is_some_and(|l| !l.queue.is_empty())
    }

    /// Sends this peer's numbers to the server (a report that does not validate is
    /// dropped with a warning).
    pub fn report(&mut self, report: &PeerReport) {
        match report.validate() {
            Ok(()) => {
                self.last_report = Some((report.clone(), self.clock_ms));
                self.actions
                    .push_back(Action::Signal(ClientMessage::Report {
                        report: report.clone(),
                    }));
            }
            Err(e) => self
                .actions
                .push_back(Action::Warn(format!("report not sent: {e}"))),
        }
    }

    /// Leaves the swarm: every connection is closed.
    pub fn close(&mut self) {
        self.closed = true;
        let all: Vec<PeerId> = self.links.keys().copied().collect();
        for p in all {
            self.forget(p);
        }
    }

    /// A connection to `peer` begins (the deadline counts from now).
    fn start(&mut self, peer: PeerId, now_ms: u64, offer: bool) {
        self.awaiting.retain(|(q, _)| *q != peer);
        let mut link = Link::new(now_ms, self.max_message, self.link_bytes);
        link.session = self.me;
        self.links.insert(peer, link);
        self.actions.push_back(Action::Connect { peer, offer });
        self.wake_for_deadline(now_ms);
    }

    /// Asks for a wake-up at the next connection deadline (of a connection not open yet,
    /// or of a neighbour that was to offer), unless one as early is asked for already
    /// and not overdue: a server that listed other neighbours again and again had a
    /// timer started for each list (20 s each, millions at its message rate).
    fn wake_for_deadline(&mut self, now_ms: u64) {
        let at = self
            .links
            .values()
            .filter(|l| l.is_pending())
            .map(|l| l.started_ms)
            .chain(self.awaiting.iter().map(|(_, t)| *t))
            .min()
            .map(|t| t + CONNECT_DEADLINE_MS);
        ask_wake(&mut self.deadline_wake, &mut self.actions, at, now_ms);
    }

    /// Asks the server to link us to another peer in `peer`'s place (not connected again
    /// until a list names it again).
    fn report_unreachable(&mut self, peer: PeerId) {
        self.listed.remove(&peer);
        self.awaiting.retain(|(q, _)| *q != peer);
        self.actions
            .push_back(Action::Signal(ClientMessage::Unreachable { peer }));
    }

    /// How many of `peer`'s connections closed (or its offers were refused) within the
    /// last minute by `now_ms`, once older entries are dropped.
    fn recent_closes(&mut self, peer: PeerId, now_ms: u64) -> usize {
        self.reconnects
            .retain(|(_, t)| now_ms.saturating_sub(*t) < RECENT_MS);
        self.reconnects.iter().filter(|(p, _)| *p == peer).count()
    }

    fn forget(&mut self, peer: PeerId) {
        if let Some(link) = self.links.remove(&peer) {
            if link.is_up() {
                self.emit(SwarmEvent::PeerDown(peer));
            }
            self.actions.push_back(Action::Close(peer));
        }
    }

    fn send_signal(&mut self, to: PeerId, signal: Signal) {
        self.actions
            .push_back(Action::Signal(ClientMessage::Signal { to, signal }));
    }

    fn emit(&mut self, e: SwarmEvent) {
        self.actions.push_back(Action::Emit(e));
    }
}

/// Asks for a wake-up at `at` (if any), recorded in `asked`, unless one as early is asked
/// for already and not overdue (a timer a millisecond early leaves none).
fn ask_wake(asked: &mut Option<u64>, actions: &mut VecDeque<Action>, at: Option<u64>, now_ms: u64) {
    let Some(at) = at else { return };
    if asked.is_none_or(|w| at < w || w < now_ms) {
        *asked = Some(at);
        // A millisecond late, for clocks read in whole milliseconds.
        actions.push_back(Action::WakeIn(at.saturating_sub(now_ms) + 1));
    }
}

/// What of the server's `ice_servers` a peer uses: the first [`MAX_ICE_URLS`] URLs whose
/// scheme is `stun:`, `turn:` or `turns:` (of at most [`MAX_ICE_FIELD`] bytes, as are a
/// user name and credential; an entry with a longer one is dropped whole), in order.
/// The list goes into every connection the peer makes: a server that sent thousands of
/// URLs had each native peer send STUN and TURN requests to every host they named, for
/// every neighbour, and a browser refuses a configuration with a URL of another scheme,
/// so no connection could be made at all.
fn usable_ice_servers(list: Vec<IceServer>) -> Vec<IceServer> {
    let mut left = MAX_ICE_URLS;
    let mut kept = Vec::new();
    for mut s in list {
        let short = |f: &Option<String>| f.as_ref().is_none_or(|f| f.len() <= MAX_ICE_FIELD);
        if left == 0 || !short(&s.username) || !short(&s.credential) {
            continue;
        }
        s.urls.retain(|u| usable_ice_url(u));
        s.urls.truncate(left);
        left -= s.urls.len();
        if !s.urls.is_empty() {
            kept.push(s);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use shoal_shared::framing::split;

    use super::*;

    fn welcome(peer: u64) -> ServerMessage {
        welcome_with(peer, String::new())
    }

    /// [`welcome`] with a nonce to sign (hex; empty: none).
    fn welcome_with(peer: u64, nonce: String) -> ServerMessage {
        ServerMessage::Welcome {
            version: 2,
            peer: PeerId(peer),
            task: "t".into(),
            ice_servers: Vec::new(),
            max_message_bytes: 1 << 16,
            nonce,
        }
    }

    /// The server's `task_changed` refusal reaches the driver as an event (it stops);
    /// other errors only warn.
    #[test]
    fn task_changed_and_bad_version_refusals_stop_the_driver_and_other_errors_do_not() {
        let mut m = member(9, &[]);
        drain(&mut m);
        let error = |code| ServerMessage::Error {
            code,
            message: "x".into(),
        };
        m.on_server(error(ErrorCode::RateLimited), 0);
        let emitted = |acts: Vec<Action>| {
            acts.into_iter()
                .filter(|a| matches!(a, Action::Emit(SwarmEvent::TaskChanged)))
                .count()
        };
        assert_eq!(emitted(drain(&mut m)), 0);
        m.on_server(error(ErrorCode::TaskChanged), 0);
        assert_eq!(emitted(drain(&mut m)), 1);
        // A server of another protocol version refuses this client as surely.
        m.on_server(error(ErrorCode::BadVersion), 0);
        assert_eq!(emitted(drain(&mut m)), 1);
    }

    #[test]
    fn neighbour_lists_from_the_server_ask_for_one_deadline_wake_up_at_a_time() {
        // A hostile server alternates two lists of one neighbour that is to offer: each
        // list forgets the other's, and each asked for a 20 s timer of its own.
        let mut m = member(9, &[]);
        drain(&mut m);
        for i in 0..10_000u64 {
            m.on_server(
                ServerMessage::Neighbours {
                    peers: vec![PeerId(1 + i % 2)],
                },
                i / 100,
            );
        }
        let wakes = drain(&mut m)
            .into_iter()
            .filter(|a| matches!(a, Action::WakeIn(_)))
            .count();
        assert_eq!(wakes, 1);
        // Due, it asks for the next deadline's: the last listed neighbour's, which is
        // then reported unreachable.
        m.tick(CONNECT_DEADLINE_MS + 98);
        let acts = drain(&mut m);
        assert!(unreachable(&acts).is_empty(), "{acts:?}");
        assert!(acts.contains(&Action::WakeIn(2)), "{acts:?}");
        m.tick(CONNECT_DEADLINE_MS + 99);
        assert_eq!(unreachable(&drain(&mut m)), [2]);
    }

    #[test]
    fn a_member_takes_at_most_eight_stun_or_turn_urls_from_the_server() {
        let many = |n: usize, scheme: &str| IceServer {
            urls: (0..n)
                .map(|i| format!("{scheme}:10.0.0.{i}:3478"))
                .collect(),
            username: None,
            credential: None,
        };
        let mut m = Mesh::new(1);
        let list = vec![
            many(3, "http"),
            IceServer {
                // A bare scheme is no URL (a browser refuses the whole list).
                urls: vec!["turn".into(), "stun".into()],
                username: None,
                credential: None,
            },
            IceServer {
                username: Some("u".repeat(MAX_ICE_FIELD + 1)),
                ..many(2, "turn")
            },
            many(2, "STUN"),
            many(1000, "turn"),
            many(5, "stun"),
        ];
        m.on_server(
            ServerMessage::Welcome {
                version: 2,
                peer: PeerId(5),
                task: "t".into(),
                ice_servers: list,
                max_message_bytes: 1 << 16,
                nonce: String::new(),
            },
            0,
        );
        let urls: Vec<&str> = m
            .ice_servers()
            .iter()
            .flat_map(|s| s.urls.iter().map(String::as_str))
            .collect();
        assert_eq!(urls.len(), MAX_ICE_URLS, "{urls:?}");
        assert_eq!(
            &urls[..3],
            [
                "STUN:10.0.0.0:3478",
                "STUN:10.0.0.1:3478",
                "turn:10.0.0.0:3478"
            ]
        );
        assert!(urls[2..].iter().all(|u| u.starts_with("turn:")));
    }

    #[test]
    fn a_member_with_a_key_proves_it_on_every_welcome_and_sends_its_receipts() {
        use shoal_shared::learn::identity::verify;
        let id = Identity::from_seed([7; 32]);
        let mut m = Mesh::new(1);
        m.set_identity(id.clone());
        let report = PeerReport {
            version: 12,
            ..PeerReport::default()
        };
        m.report(&report);
        drain(&mut m);
        // No nonce (a server without receipts): nothing to prove.
        m.on_server(welcome(5), 0);
        assert!(
            !drain(&mut m)
                .iter()
                .any(|a| matches!(a, Action::Signal(ClientMessage::Identify { .. })))
        );
        for (peer, nonce) in [(5u64, [1u8; 32]), (9, [2; 32])] {
            m.on_server(welcome_with(peer, hex(&nonce)), 0);
            let actions = drain(&mut m);
            let proof = actions.iter().find_map(|a| match a {
                Action::Signal(ClientMessage::Identify { key, signature }) => {
                    Some((key.clone(), signature.clone()))
                }
                _ => None,
            });
            // Right behind the proof, the last report again: the new session's receipts
            // come from a connection that has reported training.
            let at = actions
                .iter()
                .position(|a| matches!(a, Action::Signal(ClientMessage::Identify { .. })));
            assert_eq!(
                at.and_then(|i| actions.get(i + 1)),
                Some(&Action::Signal(ClientMessage::Report {
                    report: report.clone()
                }))
            );
            let (key, sig) = proof.expect("identify sent");
            assert_eq!(key, hex(&id.public()));
            let sig: [u8; 64] = from_hex(&sig).expect("hex").try_into().expect("64 bytes");
            assert!(verify(
                &id.public(),
                &identify_message("t", PeerId(peer), &nonce),
                &sig
            ));
            assert!(
                !verify(
                    &id.public(),
                    &identify_message("t", PeerId(peer + 1), &nonce),
                    &sig
                ),
                "bound to the session's id"
            );
        }
        // A report older than `REPORT_RESEND_MS` is not sent again: it would claim
        // training this peer may no longer do.
        m.on_server(welcome_with(11, hex(&[3; 32])), REPORT_RESEND_MS);
        let actions = drain(&mut m);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Signal(ClientMessage::Identify { .. })))
        );
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::Signal(ClientMessage::Report { .. }))),
            "{actions:?}"
        );
        m.receipt(&[1, 2, 3]);
        assert_eq!(
            drain(&mut m),
            vec![Action::Signal(ClientMessage::Receipt {
                receipt: "010203".into()
            })]
        );
    }

    fn drain(m: &mut Mesh) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// The actions but wake-ups (a partial message asks for one, to expire it).
    fn drain_but_wakes(m: &mut Mesh) -> Vec<Action> {
        let mut acts = drain(m);
        acts.retain(|a| !matches!(a, Action::WakeIn(_)));
        acts
    }

    fn candidate(n: u32) -> Signal {
        Signal::Candidate {
            candidate: format!("candidate:{n} 1 udp 1 127.0.0.1 {n} typ host"),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
        }
    }

    fn signal(to: u64, signal: Signal) -> Action {
        Action::Signal(ClientMessage::Signal {
            to: PeerId(to),
            signal,
        })
    }

    /// Opens the channel to `peer` at 0 and lets it settle.
    fn up(m: &mut Mesh, peer: u64) {
        m.channel_open(PeerId(peer), 0);
        m.tick(SETTLE_MS);
    }

    fn member(me: u64, neighbours: &[u64]) -> Mesh {
        let mut m = Mesh::new(1);
        m.on_server(welcome(me), 0);
        m.on_server(
            ServerMessage::Neighbours {
                peers: neighbours.iter().map(|&p| PeerId(p)).collect(),
            },
            0,
        );
        m
    }

    /// The unreachable reports among `acts`.
    fn unreachable(acts: &[Action]) -> Vec<u64> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Signal(ClientMessage::Unreachable { peer }) => Some(peer.0),
                _ => None,
            })
            .collect()
    }

    fn offer_from(m: &mut Mesh, from: u64, now_ms: u64) {
        m.on_server(
            ServerMessage::Signal {
                from: PeerId(from),
                signal: Signal::Offer { sdp: "o".into() },
            },
            now_ms,
        );
    }

    #[test]
    fn a_neighbour_that_never_offers_is_reported_unreachable() {
        // 5 answers 3 and 4 (the smaller id offers). 3 offers in time; 4 never does: it
        // held one of 5's neighbour places for good, since only its own connection
        // attempts had a deadline.
        let mut m = member(5, &[3, 4, 7]);
        up(&mut m, 7);
        drain(&mut m);
        offer_from(&mut m, 3, 1_000);
        m.channel_open(PeerId(3), 1_100);
        m.tick(CONNECT_DEADLINE_MS - 1);
        assert!(unreachable(&drain(&mut m)).is_empty());
        m.tick(CONNECT_DEADLINE_MS);
        assert_eq!(unreachable(&drain(&mut m)), [4]);
        m.tick(2 * CONNECT_DEADLINE_MS);
        assert!(unreachable(&drain(&mut m)).is_empty(), "reported once");
    }

    #[test]
    fn only_udp_candidates_reach_the_connection() {
        let mut m = member(9, &[3]);
        offer_from(&mut m, 3, 0);
        drain(&mut m);
        let tcp = Signal::Candidate {
            candidate: "candidate:1 1 TCP 1 10.0.0.1 9 typ host tcptype passive".into(),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
        };
        for c in [tcp, candidate(2)] {
            m.on_server(
                ServerMessage::Signal {
                    from: PeerId(3),
                    signal: c,
                },
                10,
            );
        }
        assert_eq!(
            drain(&mut m),
            [Action::AddCandidate {
                peer: PeerId(3),
                candidate: candidate(2)
            }]
        );
    }

    #[test]
    fn a_neighbour_that_reconnects_again_and_again_is_refused() {
        // Closes this side decides (the server's list drops 3, then lists it again) do
        // not count: 3 is not refused for them.
        let mut m = member(9, &[3]);
        drain(&mut m);
        for i in 0..2 * MAX_RECONNECTS as u64 {
            let t = i * 1_000;
            offer_from(&mut m, 3, t);
            assert!(m.links.contains_key(&PeerId(3)), "offer {i}");
            m.channel_open(PeerId(3), t + 10);
            for peers in [vec![], vec![PeerId(3)]] {
                m.on_server(ServerMessage::Neighbours { peers }, t + 20);
            }
            drain(&mut m);
        }
        // Each connection starts its limits (strikes, rates, candidates) afresh: 3
        // closes its channel and offers again, every second.
        let mut m = member(9, &[3]);
        drain(&mut m);
        for i in 0..MAX_RECONNECTS as u64 {
            let t = i * 1_000;
            offer_from(&mut m, 3, t);
            m.channel_open(PeerId(3), t + 10);
            m.failed(PeerId(3));
            drain(&mut m);
        }
        offer_from(&mut m, 3, 5_000);
        let acts = drain(&mut m);
        assert!(!m.links.contains_key(&PeerId(3)), "{acts:?}");
        assert_eq!(unreachable(&acts), [3]);
        offer_from(&mut m, 3, 6_000);
        assert!(drain(&mut m).is_empty(), "later offers are dropped quietly");
        // A minute after, it may connect again.
        offer_from(&mut m, 3, 70_000);
        assert!(m.links.contains_key(&PeerId(3)));
    }

    #[test]
    fn the_smaller_id_offers_and_the_set_is_reconciled() {
        let mut m = member(5, &[3, 7, 9]);
        let acts = drain(&mut m);
        let deadline = Action::WakeIn(u64::from(CONNECT_DEADLINE_SECS) * 1000 + 1);
        assert_eq!(
            acts[1..],
            [
                Action::Connect {
                    peer: PeerId(7),
                    offer: true
                },
                deadline.clone(),
                // 9's deadline and 3's offer (awaited until then) are due with 7's: one
                // wake-up.
                Action::Connect {
                    peer: PeerId(9),
                    offer: true
                },
            ]
        );
        // 9 leaves the set before its channel opened, 7 after: both are closed; 11 is
        // new.
        up(&mut m, 7);
        drain(&mut m);
        m.on_server(
            ServerMessage::Neighbours {
                peers: vec![PeerId(3), PeerId(11)],
            },
            10,
        );
        assert_eq!(
            drain(&mut m),
            [
                Action::Emit(SwarmEvent::PeerDown(PeerId(7))),
                Action::Close(PeerId(7)),
                Action::Close(PeerId(9)),
                Action::Connect {
                    peer: PeerId(11),
                    offer: true
                },
                // 3's offer is due before 11's connection: the wake-up asked for it
                // serves, and asks for the next.
            ]
        );
        assert!(m.peers().is_empty());
        m.tick(CONNECT_DEADLINE_MS);
        assert!(drain(&mut m).contains(&Action::WakeIn(11)));
    }

    #[test]
    fn candidates_wait_for_the_description_then_flow() {
        let mut m = member(1, &[2]);
        drain(&mut m);
        m.local_candidate(PeerId(2), candidate(1));
        m.local_candidate(PeerId(2), candidate(2));
        assert!(drain(&mut m).is_empty(), "held before the offer is out");
        let offer = Signal::Offer { sdp: "o".into() };
        m.described(PeerId(2), offer.clone());
        m.local_candidate(PeerId(2), candidate(3));
        assert_eq!(
            drain(&mut m),
            [
                signal(2, offer),
                signal(2, candidate(1)),
                signal(2, candidate(2)),
                signal(2, candidate(3)),
            ]
        );
        // Bounded while held.
        let mut m = member(1, &[2]);
        for n in 0..1000 {
            m.local_candidate(PeerId(2), candidate(n));
        }
        m.described(PeerId(2), Signal::Offer { sdp: "o".into() });
        let sent = drain(&mut m).len();
        assert_eq!(
            sent,
            2 + 1 + 1 + MAX_HELD_CANDIDATES,
            "welcome, connect, its deadline, offer, held"
        );
    }

    /// A neighbour that left, or is no longer listed, loses its channel, open or not: a
    /// hostile peer rejoining under new ids again and again piled up open channels the
    /// server knew nothing of (ghosts that outnumbered the drawn neighbours).
    #[test]
    fn channels_go_with_the_neighbours_the_server_lists_and_ghosts_do_not_pile_up() {
        let mut m = member(1, &[2]);
        up(&mut m, 2);
        drain(&mut m);
        m.on_server(ServerMessage::Left { peer: PeerId(2) }, 10);
        assert!(drain(&mut m).contains(&Action::Close(PeerId(2))));
        assert!(m.peers().is_empty());
        for i in 3..103 {
            m.on_server(
                ServerMessage::Neighbours {
                    peers: vec![PeerId(i)],
                },
                10,
            );
            up(&mut m, i);
            m.on_server(ServerMessage::Left { peer: PeerId(i) }, 10);
            m.on_server(
                ServerMessage::Neighbours {
                    peers: vec![PeerId(1000 + i)],
                },
                10,
            );
        }
        assert!(m.peers().is_empty(), "{:?}", m.peers());
        assert_eq!(m.links.len(), 1, "the one listed");
        // However long a list the server sends, at most `MAX_LINKS` connections.
        m.on_server(
            ServerMessage::Neighbours {
                peers: (2000..2100).map(PeerId).collect(),
            },
            20,
        );
        assert_eq!(m.links.len(), MAX_LINKS);
        // And an offer past them is ignored.
        m.on_server(
            ServerMessage::Signal {
                from: PeerId(5),
                signal: Signal::Offer { sdp: "o".into() },
            },
            20,
        );
        assert!(!m.links.contains_key(&PeerId(5)));
    }

    /// After our own signaling reconnects (a new id), a channel to a peer the new session
    /// lists again is made anew (the other side knows us by our new id and offers to it),
    /// and one to a peer it does not list stays for the grace, then goes.
    #[test]
    fn channels_of_a_previous_session_are_replaced_or_kept_for_the_grace() {
        let mut m = member(3, &[2, 4]);
        m.on_server(
            ServerMessage::Signal {
                from: PeerId(2),
                signal: Signal::Offer { sdp: "o".into() },
            },
            0,
        );
        up(&mut m, 2);
        up(&mut m, 4);
        m.signaling_down();
        drain(&mut m);
        m.tick(100_000);
        assert_eq!(
            m.peers(),
            [PeerId(2), PeerId(4)],
            "kept while the server is gone"
        );
        m.on_server(welcome(5), 100_000);
        m.on_server(
            ServerMessage::Neighbours {
                peers: vec![PeerId(2)],
            },
            100_000,
        );
        let acts = drain(&mut m);
        assert!(acts.contains(&Action::Close(PeerId(2))), "{acts:?}");
        assert_eq!(m.peers(), [PeerId(4)], "4 stays for the grace");
        // 2 offers to our new id: answered.
        m.on_server(
            ServerMessage::Signal {
                from: PeerId(2),
                signal: Signal::Offer { sdp: "o2".into() },
            },
            100_010,
        );
        assert!(drain(&mut m).contains(&Action::Answer {
            peer: PeerId(2),
            sdp: "o2".into()
        }));
        m.channel_open(PeerId(2), 100_020);
        m.tick(100_000 + SESSION_GRACE_MS - 1);
        assert!(m.peers().contains(&PeerId(4)));
        m.tick(100_000 + SESSION_GRACE_MS);
        assert!(drain(&mut m).contains(&Action::Close(PeerId(4))));
        assert!(
            m.links.contains_key(&PeerId(2)),
            "this session's link stays"
        );
    }

    /// A neighbour's candidates are taken up to `MAX_HELD_CANDIDATES` per connection:
    /// each is probed at the address it names.
    #[test]
    fn a_neighbours_candidates_are_bounded() {
        let mut m = member(9, &[3]);
        m.on_server(
            ServerMessage::Signal {
                from: PeerId(3),
                signal: Signal::Offer { sdp: "o".into() },
            },
            0,
        );
        drain(&mut m);
        for n in 0..1000 {
            m.on_server(
                ServerMessage::Signal {
                    from: PeerId(3),
                    signal: candidate(n),
                },
                0,
            );
        }
        let added = drain(&mut m)
            .iter()
            .filter(|a| matches!(a, Action::AddCandidate { .. }))
            .count();
        assert_eq!(added, MAX_HELD_CANDIDATES);
    }

    /// An offer or answer with media besides the data channel (audio, video, a second
    /// section) is refused: a browser answered such an offer's sections and received the
    /// neighbour's media streams, which no limit of the link's sees. The offer's sender is
    /// reported unreachable; a neighbour that answers so is dropped.
    #[test]
    fn a_description_with_media_besides_the_data_channel_is_refused() {
        let data = "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n";
        let video = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=recvonly\r\n";
        let offer = |m: &mut Mesh, sdp: String| {
            m.on_server(
                ServerMessage::Signal {
                    from: PeerId(3),
                    signal: Signal::Offer { sdp },
                },
                0,
            );
            drain(m)
        };
        for sdp in [
            format!("v=0\r\n{data}{video}"),
            format!("v=0\r\n{video}"),
            format!("v=0\r\n{data} m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"),
        ] {
            let mut m = member(9, &[3]);
            let acts = offer(&mut m, sdp.clone());
            assert!(
                !acts.iter().any(|a| matches!(a, Action::Answer { .. })),
                "{sdp}: {acts:?}"
            );
            assert_eq!(unreachable(&acts), [3], "{sdp}");
        }
        // Data only, as browsers and the `webrtc` crate offer it, or in the older form some
        // stacks still use: answered.
        for data in [
            data,
            "m=application 9 DTLS/SCTP 5000\r\na=sctpmap:5000 webrtc-datachannel 1024\r\n",
        ] {
            let mut m = member(9, &[3]);
            let acts = offer(&mut m, format!("v=0\r\n{data}"));
            assert!(
                acts.iter().any(|a| matches!(a, Action::Answer { .. })),
                "{data}"
            );
        }
        // 2 answers our offer with a video section: dropped.
        let mut m = member(1, &[2]);
        drain(&mut m);
        m.on_server(
            ServerMessage::Signal {
                from: PeerId(2),
                signal: Signal::Answer {
                    sdp: format!("v=0\r\n{data}{video}"),
                },
            },
            10,
        );
        let acts = drain(&mut m);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::Accept { .. })),
            "{acts:?}"
        );
        assert!(acts.contains(&Action::Close(PeerId(2))), "{acts:?}");
    }

    /// Candidates inside an offer's or answer's SDP obey the rule of trickled ones: only
    /// UDP ones, and they count against the connection's `MAX_HELD_CANDIDATES`.
    #[test]
    fn candidates_in_a_description_are_held_to_the_trickled_rule() {
        let lines = |n: u32, transport: &str| -> String {
            (0..n)
                .map(|i| format!("a=candidate:{i} 1 {transport} 1 10.0.0.1 {i} typ host\r\n"))
                .collect()
        };
        let sdp = format!(
            "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n{}{}a=mid:0\r\n",
            lines(1, "tcp"),
            lines(100, "udp")
        );
        let described = |actions: &[Action]| -> String {
            actions
                .iter()
                .find_map(|a| match a {
                    Action::Answer { sdp, .. } | Action::Accept { sdp, .. } => Some(sdp.clone()),
                    _ => None,
                })
                .expect("a description")
        };
        let count = |sdp: &str| sdp.matches("a=candidate:").count();
        // An offer: 64 UDP lines stay, the TCP one and the rest go, the other lines stay.
        let mut m = member(9, &[3]);
        m.on_server(
            ServerMessage::Signal {
                from: PeerId(3),
                signal: Signal::Offer { sdp: sdp.clone() },
            },
            0,
        );
        let answered = described(&drain(&mut m));
        assert_eq!(count(&answered), MAX_HELD_CANDIDATES);
        assert!(!answered.contains(" tcp "), "{answered}");
        assert!(answered.starts_with("v=0\r\nm=application") && answered.ends_with("a=mid:0\r\n"));
        // ...and no trickled one is added after them.
        m.on_server(
            ServerMessage::Signal {
                from: PeerId(3),
                signal: candidate(1),
            },
            0,
        );
        assert!(drain(&mut m).is_empty());
        // An answer (we offered to 11) likewise, and it passes whole when it fits.
        let mut m = member(1, &[11]);
        drain(&mut m);
        let answer = |sdp: String| ServerMessage::Signal {
            from: PeerId(11),
            signal: Signal::Answer { sdp },
        };
        m.on_server(answer(sdp.clone()), 0);
        assert_eq!(count(&described(&drain(&mut m))), MAX_HELD_CANDIDATES);
        let mut m = member(1, &[11]);
        drain(&mut m);
        m.on_server(answer(lines(3, "udp")), 0);
        assert_eq!(described(&drain(&mut m)), lines(3, "udp"));
        // As the native stack's SDP parser reads them: `a= candidate:` and
        // `a=\tcandidate :` are candidates too.
        let mut m = member(1, &[11]);
        drain(&mut m);
        let odd: String = (0..100)
            .map(|i| {
                let t = if i % 2 == 0 { "tcp" } else { "udp" };
                let sp = if i % 3 == 0 {
                    "a= candidate:"
                } else {
                    "a=\tcandidate :"
                };
                format!("{sp}{i} 1 {t} 1 10.0.0.1 {i} typ host\r\n")
            })
            .collect();
        m.on_server(answer(odd), 0);
        let kept = described(&drain(&mut m));
        assert_eq!(kept.lines().count(), 50, "the UDP ones, 50 of 64: {kept}");
        assert!(!kept.contains(" tcp "));
    }

    #[test]
    fn an_offer_is_answered_once_and_remote_signals_need_a_connection() {
        let mut m = member(9, &[]);
        drain(&mut m);
        // No connection: an answer or a candidate is ignored.
        for s in [Signal::Answer { sdp: "a".into() }, candidate(1)] {
            m.on_server(
                ServerMessage::Signal {
                    from: PeerId(3),
                    signal: s,
                },
                0,
            );
        }
        assert!(drain(&mut m).is_empty());
        let offer = |m: &mut Mesh| {
            m.on_server(
                ServerMessage::Signal {
                    from: PeerId(3),
                    signal: Signal::Offer { sdp: "o".into() },
                },
                0,
            );
        };
        offer(&mut m);
        offer(&mut m);
        assert_eq!(
            drain(&mut m),
            [
                Action::Connect {
                    peer: PeerId(3),
                    offer: false
                },
                Action::WakeIn(u64::from(CONNECT_DEADLINE_SECS) * 1000 + 1),
                Action::Answer {
                    peer: PeerId(3),
                    sdp: "o".into()
                }
            ],
            "the repeated offer is ignored"
        );
    }

    #[test]
    fn a_connection_that_misses_its_deadline_is_dropped_and_reported_unreachable() {
        let mut m = member(1, &[2, 3]);
        drain(&mut m);
        let deadline = u64::from(CONNECT_DEADLINE_SECS) * 1000;
        up(&mut m, 3);
        drain(&mut m);
        m.tick(deadline - 1);
        assert!(drain(&mut m).is_empty());
        m.tick(deadline);
        assert_eq!(
            drain(&mut m),
            [
                Action::Close(PeerId(2)),
                Action::Signal(ClientMessage::Unreachable { peer: PeerId(2) })
            ]
        );
        // An open channel that fails is reported down, not unreachable, and (the server
        // still lists it) connected again.
        m.failed(PeerId(3));
        assert_eq!(
            drain(&mut m),
            [
                Action::Emit(SwarmEvent::PeerDown(PeerId(3))),
                Action::Close(PeerId(3)),
                Action::Connect {
                    peer: PeerId(3),
                    offer: true
                },
                Action::WakeIn(deadline + 1),
            ]
        );
    }

    #[test]
    fn messages_before_the_open_event_are_delivered_right_behind_peer_up() {
        let mut m = member(1, &[2]);
        drain(&mut m);
        let msg = b"status sent at open".to_vec();
        for f in split(0, &msg, 8) {
            m.frame(PeerId(2), &f, 5);
        }
        assert!(drain_but_wakes(&mut m).is_empty(), "nothing before peer_up");
        assert_eq!(
            m.send(PeerId(2), b"x"),
            Err(SendError::NoSuchPeer(PeerId(2)))
        );
        // Those frames prove the other side's end is attached: up at once.
        m.channel_open(PeerId(2), 6);
        assert_eq!(
            drain_but_wakes(&mut m),
            [
                Action::Emit(SwarmEvent::PeerUp(PeerId(2))),
                Action::Emit(SwarmEvent::Message {
                    from: PeerId(2),
                    data: msg
                }),
                Action::Pump(PeerId(2)),
            ]
        );
    }

    #[test]
    fn peer_up_waits_for_the_other_sides_first_frame_or_the_settle_time() {
        // Silent other side: up SETTLE_MS after the open, not before.
        let mut m = member(1, &[2, 3]);
        drain(&mut m);
        m.channel_open(PeerId(2), 100);
        assert_eq!(drain(&mut m), [Action::WakeIn(SETTLE_MS)]);
        assert_eq!(
            m.send(PeerId(2), b"x"),
            Err(SendError::NoSuchPeer(PeerId(2))),
            "nothing is written before the other side can take it"
        );
        m.tick(100 + SETTLE_MS - 1);
        assert!(drain(&mut m).is_empty());
        assert!(m.peers().is_empty());
        m.tick(100 + SETTLE_MS);
        assert_eq!(
            drain(&mut m),
            [
                Action::Emit(SwarmEvent::PeerUp(PeerId(2))),
                Action::Pump(PeerId(2))
            ]
        );
        assert_eq!(m.send(PeerId(2), b"x"), Ok(()));
        // The other side writes first: up at its first frame, which follows peer_up.
        m.channel_open(PeerId(3), 1000);
        drain(&mut m);
        for f in split(0, b"hello", 8) {
            m.frame(PeerId(3), &f, 1010);
        }
        assert_eq!(
            drain(&mut m),
            [
                Action::Emit(SwarmEvent::PeerUp(PeerId(3))),
                Action::Pump(PeerId(3)),
                Action::Emit(SwarmEvent::Message {
                    from: PeerId(3),
                    data: b"hello".to_vec()
                }),
            ]
        );
        m.tick(1000 + SETTLE_MS);
        assert!(drain(&mut m).is_empty(), "announced once");
        // A channel that opened is not unreachable, and one never announced never goes
        // down.
        let mut m = member(1, &[2]);
        m.channel_open(PeerId(2), 0);
        drain(&mut m);
        m.failed(PeerId(2));
        assert_eq!(
            drain(&mut m),
            [
                Action::Close(PeerId(2)),
                Action::Connect {
                    peer: PeerId(2),
                    offer: true
                },
            ]
        );
    }

    /// A listed neighbour whose open connection closes is connected again: the smaller id
    /// offers again, the larger awaits its offer and reports it if none comes; after
    /// `MAX_RECONNECTS` closes within a minute it is reported. Before, it stayed without a
    /// connection until the list changed: a neighbour that let the channel open and
    /// closed it held its place for good, and one lost connection left both sides a
    /// neighbour short.
    #[test]
    fn a_listed_neighbour_whose_connection_closed_is_connected_again_or_reported() {
        // 5 awaits 3's offers (the smaller id offers).
        let mut m = member(5, &[3]);
        offer_from(&mut m, 3, 0);
        m.channel_open(PeerId(3), 100);
        m.tick(100 + SETTLE_MS);
        drain(&mut m);
        m.failed(PeerId(3));
        assert!(unreachable(&drain(&mut m)).is_empty());
        m.tick(100 + SETTLE_MS + CONNECT_DEADLINE_MS - 1);
        assert!(unreachable(&drain(&mut m)).is_empty());
        m.tick(100 + SETTLE_MS + CONNECT_DEADLINE_MS);
        assert_eq!(unreachable(&drain(&mut m)), [3], "3 did not offer again");
        // 3 sees the close first and offers again while 5 still holds the connection
        // open: the new one replaces it (before, the offer was taken for a repeat and
        // dropped, and both sides reported the other 20 s later).
        let mut m = member(5, &[3]);
        offer_from(&mut m, 3, 0);
        m.channel_open(PeerId(3), 100);
        m.tick(100 + SETTLE_MS);
        drain(&mut m);
        offer_from(&mut m, 3, 5_000);
        let acts = drain(&mut m);
        assert!(
            acts.contains(&Action::Emit(SwarmEvent::PeerDown(PeerId(3)))),
            "{acts:?}"
        );
        assert!(
            acts.iter().any(|a| matches!(
                a,
                Action::Answer {
                    peer: PeerId(3),
                    ..
                }
            )),
            "{acts:?}"
        );
        assert!(unreachable(&acts).is_empty(), "{acts:?}");
        // A neighbour dropped for breaking the protocol is not taken again within the
        // minute, however often it offers.
        m.drop_for_cause(PeerId(3), "a test");
        drain(&mut m);
        offer_from(&mut m, 3, 6_000);
        assert!(
            !drain(&mut m)
                .iter()
                .any(|a| matches!(a, Action::Answer { .. }))
        );
        offer_from(&mut m, 3, 66_000);
        assert!(
            drain(&mut m)
                .iter()
                .any(|a| matches!(a, Action::Answer { .. })),
            "a minute later"
        );
        // 1 offers to 2 again after each close, up to the limit.
        let mut m = member(1, &[2]);
        drain(&mut m);
        for close in 1..=MAX_RECONNECTS as u64 {
            let t = close * 1_000;
            m.channel_open(PeerId(2), t);
            m.tick(t + SETTLE_MS);
            drain(&mut m);
            m.failed(PeerId(2));
            let acts = drain(&mut m);
            let again = acts.contains(&Action::Connect {
                peer: PeerId(2),
                offer: true,
            });
            if close < MAX_RECONNECTS as u64 {
                assert!(again && unreachable(&acts).is_empty(), "{close}: {acts:?}");
            } else {
                assert!(!again && unreachable(&acts) == [2], "{close}: {acts:?}");
            }
        }
    }

    /// Peer 1 of the demo MLP's task (largest message `limit`), linked to peer 2.
    fn demo_member() -> (Mesh, usize) {
        demo_member_taking(None)
    }

    /// [`demo_member`] whose links take `bytes` (see [`Mesh::set_link_bytes`]).
    fn demo_member_taking(bytes: Option<(f64, f64)>) -> (Mesh, usize) {
        let limit = crate::swarm::max_message_for(109_386);
        let mut m = Mesh::new(1);
        m.set_max_message(limit);
        m.set_link_bytes(bytes);
        m.on_server(welcome(1), 0);
        m.on_server(
            ServerMessage::Neighbours {
                peers: vec![PeerId(2)],
            },
            0,
        );
        up(&mut m, 2);
        drain(&mut m);
        (m, limit)
    }

    #[test]
    fn a_neighbour_that_stops_reading_holds_two_of_the_tasks_largest_messages() {
        let (mut m, limit) = demo_member();
        let largest = vec![5u8; limit];
        assert_eq!(m.send(PeerId(2), &largest), Ok(()));
        assert_eq!(m.send(PeerId(2), &largest), Ok(()));
        // The channel took nothing: a third waits for nothing, it is refused, and so is
        // the smallest message.
        assert_eq!(m.send(PeerId(2), &largest), Err(SendError::Full(PeerId(2))));
        assert_eq!(m.send(PeerId(2), b"x"), Err(SendError::Full(PeerId(2))));
        let held = m.links[&PeerId(2)].queue.queued();
        assert!(held <= 2 * limit + 4096, "{held} bytes held");
        // Once the channel takes one message's frames, there is room for one again.
        let frames = limit.div_ceil(DEFAULT_CHUNK);
        for _ in 0..frames {
            assert!(m.next_frame(PeerId(2), 0).is_some());
        }
        assert_eq!(m.send(PeerId(2), &largest), Ok(()));
    }

    /// The task's bound in bytes reaches every link the mesh makes: a neighbour that
    /// floods it with messages of the task's largest size is closed.
    #[test]
    fn a_neighbour_past_its_links_bytes_is_closed() {
        let (mut m, limit) = demo_member_taking(crate::swarm::link_bytes_for(109_386, 80));
        let largest = vec![3u8; limit];
        let mut delivered = 0;
        for i in 0..20u64 {
            for f in split(i as u32 + 1, &largest, 16 << 10) {
                m.frame(PeerId(2), &f, SETTLE_MS + i);
            }
            let acts = drain_but_wakes(&mut m);
            delivered += acts
                .iter()
                .filter(|a| matches!(a, Action::Emit(SwarmEvent::Message { .. })))
                .count();
            if acts.contains(&Action::Close(PeerId(2))) {
                break;
            }
        }
        assert!(!m.links.contains_key(&PeerId(2)), "closed");
        // Four of the task's largest and 30 s of its rate (5.9 MB): six messages.
        assert_eq!(delivered, 6);
    }

    #[test]
    fn a_message_longer_than_the_tasks_largest_is_dropped_before_it_is_reassembled() {
        let (mut m, limit) = demo_member();
        // The largest message of the task goes through...
        let largest = vec![3u8; limit];
        for f in split(1, &largest, 16 << 10) {
            m.frame(PeerId(2), &f, SETTLE_MS);
        }
        assert_eq!(
            drain_but_wakes(&mut m),
            [Action::Emit(SwarmEvent::Message {
                from: PeerId(2),
                data: largest
            })]
        );
        assert_eq!(m.frame_errors(), 0);
        // ...one byte more is refused at its first frame, and nothing of it is held.
        let longer = vec![3u8; limit + 1];
        let first = split(2, &longer, 16 << 10).next().expect("a frame");
        m.frame(PeerId(2), &first, SETTLE_MS);
        assert_eq!(m.frame_errors(), 1);
        assert_eq!(m.links[&PeerId(2)].inbound.buffered(), 0);
        assert!(drain(&mut m).is_empty(), "nothing delivered");
        // A sender of the same task cannot queue it either.
        assert_eq!(
            m.send(PeerId(2), &vec![0u8; limit + 1]),
            Err(SendError::TooLarge)
        );
    }

    /// A neighbour that sends all of a message but its last frame and then nothing more
    /// has it dropped (a strike) `PARTIAL_EXPIRY_MS` after its last frame: the mesh asks
    /// its driver for the wake-up.
    #[test]
    fn a_message_left_unfinished_is_dropped_when_its_sender_goes_quiet() {
        let mut m = member(1, &[2]);
        up(&mut m, 2);
        drain(&mut m);
        let msg = vec![5u8; 3 * DEFAULT_CHUNK];
        let frames: Vec<_> = split(1, &msg, DEFAULT_CHUNK).collect();
        m.frame(PeerId(2), &frames[0], 1_000);
        m.frame(PeerId(2), &frames[1], 2_000);
        let expiry = shoal_shared::framing::PARTIAL_EXPIRY_MS;
        assert_eq!(drain(&mut m), [Action::WakeIn(expiry + 1)], "one wake-up");
        // Due at the first frame's expiry, the wake-up finds the message still moving and
        // asks for its own.
        m.tick(1_000 + expiry + 1);
        assert!(m.links[&PeerId(2)].inbound.buffered() > 0);
        assert_eq!(drain(&mut m), [Action::WakeIn(1_000)]);
        m.tick(2_000 + expiry + 1);
        assert_eq!(m.links[&PeerId(2)].inbound.buffered(), 0);
        assert_eq!(m.frame_errors(), 1);
        assert!(drain(&mut m).is_empty(), "nothing left to wake for");
        // A wake-up that comes late (a driver busy with a slow connection step): a frame
        // from another link, past the due time, expires the message at once and asks for
        // no other wake-up.
        let mut m = member(1, &[2, 3]);
        up(&mut m, 2);
        up(&mut m, 3);
        drain(&mut m);
        m.frame(PeerId(2), &frames[0], 1_000);
        assert_eq!(drain(&mut m), [Action::WakeIn(expiry + 1)]);
        for t in 0..100 {
            m.frame(
                PeerId(3),
                &split(t as u32, b"x", 8).next().expect("a frame"),
                1_000 + expiry + t,
            );
        }
        assert_eq!(m.frame_errors(), 1);
        assert_eq!(m.links[&PeerId(2)].inbound.buffered(), 0);
        let wakes = drain(&mut m)
            .iter()
            .filter(|a| matches!(a, Action::WakeIn(_)))
            .count();
        assert_eq!(wakes, 0);
    }

    #[test]
    fn sends_are_queued_in_frames_and_bounded() {
        let mut m = member(1, &[2]);
        up(&mut m, 2);
        drain(&mut m);
        let msg = vec![7u8; 3 * DEFAULT_CHUNK];
        m.send(PeerId(2), &msg).expect("queued");
        assert_eq!(drain(&mut m), [Action::Pump(PeerId(2))]);
        let mut frames = Vec::new();
        while let Some(f) = m.next_frame(PeerId(2), 0) {
            frames.push(f);
        }
        assert_eq!(frames.len(), 3);
        // The other side reassembles exactly what was sent.
        let mut other = member(2, &[]);
        other.on_server(
            ServerMessage::Signal {
                from: PeerId(1),
                signal: Signal::Offer { sdp: "o".into() },
            },
            0,
        );
        up(&mut other, 1);
        drain(&mut other);
        for f in &frames {
            other.frame(PeerId(1), f, 0);
        }
        assert_eq!(
            drain_but_wakes(&mut other),
            [Action::Emit(SwarmEvent::Message {
                from: PeerId(1),
                data: msg
            })]
        );
        // A full channel holds frames back; a full queue refuses whole messages.
        m.send(PeerId(2), b"x").expect("queued");
        assert_eq!(m.next_frame(PeerId(2), usize::MAX), None);
        assert!(m.has_queued(PeerId(2)));
        let big = vec![0u8; MAX_MESSAGE];
        assert_eq!(m.send(PeerId(2), &big), Ok(()));
        // Two whole messages' frames (headers included) do not fit behind the first.
        assert_eq!(m.send(PeerId(2), &big), Err(SendError::Full(PeerId(2))));
        assert_eq!(
            m.send(PeerId(2), &vec![0u8; MAX_MESSAGE + 1]),
            Err(SendError::TooLarge)
        );
    }

    #[test]
    fn a_neighbour_sending_broken_frames_is_dropped() {
        let mut m = member(1, &[2]);
        up(&mut m, 2);
        drain(&mut m);
        let mut broken: Vec<u8> = split(0, &[1u8; 50], 100).next().expect("a frame");
        broken[30] ^= 1;
        for i in 0..crate::links::STRIKE_LIMIT {
            m.frame(PeerId(2), &broken, i as u64);
        }
        assert_dropped_for_cause(&mut m, 2);
        assert_eq!(m.frame_errors(), crate::links::STRIKE_LIMIT as u64);
        assert!(!m.has(PeerId(2)));
    }

    /// What dropping neighbour `p` for cause does: a warning, the neighbour down, its
    /// connection closed, and `unreachable` so that the server unlinks the pair and draws
    /// each side a replacement.
    fn assert_dropped_for_cause(m: &mut Mesh, p: u64) {
        let acts = drain(m);
        assert!(matches!(acts[0], Action::Warn(_)), "{acts:?}");
        assert_eq!(
            acts[1..],
            [
                Action::Emit(SwarmEvent::PeerDown(PeerId(p))),
                Action::Close(PeerId(p)),
                Action::Signal(ClientMessage::Unreachable { peer: PeerId(p) }),
            ]
        );
    }

    #[test]
    fn a_neighbour_the_peer_shuns_is_closed_and_reported_unreachable() {
        let mut m = member(1, &[2, 3]);
        up(&mut m, 2);
        drain(&mut m);
        m.drop_for_cause(PeerId(2), "it broke the protocol");
        assert_dropped_for_cause(&mut m, 2);
        // A neighbour already gone is not reported again.
        m.drop_for_cause(PeerId(2), "again");
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn signaling_down_keeps_open_channels_until_the_server_says_otherwise() {
        let mut m = member(1, &[2, 3]);
        up(&mut m, 2);
        drain(&mut m);
        m.signaling_down();
        assert_eq!(m.peers(), [PeerId(2)]);
        m.on_server(welcome(1), 0);
        assert_eq!(
            m.peers(),
            [PeerId(2)],
            "kept until the server lists or drops it"
        );
        m.on_server(ServerMessage::Left { peer: PeerId(3) }, 0);
        m.on_server(ServerMessage::Left { peer: PeerId(2) }, 0);
        let acts = drain(&mut m);
        assert!(acts.contains(&Action::Close(PeerId(3))));
        assert!(acts.contains(&Action::Close(PeerId(2))));
        assert!(m.peers().is_empty());
        // No unreachable while signaling is down.
        let mut m = member(1, &[2]);
        drain(&mut m);
        m.signaling_down();
        drain(&mut m);
        m.failed(PeerId(2));
        assert_eq!(drain(&mut m), [Action::Close(PeerId(2))]);
    }
}

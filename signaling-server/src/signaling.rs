//! The websocket side of the server: admission, the per-task neighbour graph, relaying
//! signals between neighbours, and every limit.
//!
//! Each connection is one task that owns its socket and a small bounded queue of
//! outgoing messages; all shared state sits behind one mutex that is held only for
//! bookkeeping (never across an await).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use shoal_shared::learn::identity::{PublicKey, verify};
use shoal_shared::protocol::{
    ClientMessage, ErrorCode, PeerId, PeerReport, ServerMessage, VERSION, decode_client,
    decode_signal,
};
use shoal_shared::trust::ledger::LedgerFile;
use shoal_shared::trust::receipt::sha256;
use shoal_shared::trust::receipt::{MAX_RECEIPT_BYTES, Receipt, ReceiptError};
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;

use crate::ice::IceConfig;
use crate::metrics::{Disconnect, Metrics};
use crate::upgrade::{self, Socket};

/// Every bound the server enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest text message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most peers in one task.
    pub max_peers_per_task: usize,
    /// Most open websocket connections.
    pub max_connections: usize,
    /// Sustained messages per second per connection.
    pub rate_per_sec: f64,
    /// Burst allowance of the rate limit.
    pub burst: f64,
    /// Rate-limit violations after which the connection is closed.
    pub strikes: u32,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    pub idle_timeout: Duration,
    /// A write (with its flush) to a peer that does not complete within this long drops
    /// the peer: it stopped reading, and must not hold its task or its buffers.
    pub write_timeout: Duration,
    /// How often the server pings.
    pub ping_interval: Duration,
    /// tungstenite's read buffer per connection, in bytes: every connection holds one,
    /// idle or not. The socket itself is read 8 KiB at a time through a buffer that only
    /// busy connections hold (`upgrade::Buffered`), so this can stay small: with 256 B an
    /// idle connection costs about 3.9 KB in all (`cargo xtask bench signaling`).
    pub read_buffer: usize,
    /// Outgoing messages queued per connection before new ones are dropped.
    pub queue: usize,
    /// Most peers in one task from one network address (an IPv4 address or an IPv6
    /// /64); 0 for no cap (a server behind a proxy sees one address for everyone).
    pub max_peers_per_address: usize,
    /// Websocket connections one network address may open per second, sustained (0: no
    /// limit); past it (and [`join_burst`](Self::join_burst)) the upgrade is answered
    /// `429`. Every join draws neighbours and tells them, every leave relinks them: an
    /// address that reconnects in a loop would flood honest peers' queues with `joined`
    /// and `left` and crowd out their signals.
    pub joins_per_address_per_sec: f64,
    /// Connections an address may open at once before that rate applies.
    pub join_burst: f64,
    /// A peer that has sent nothing this long after joining (no signal, no report) is
    /// not given to newcomers as a neighbour: it is dead or pretending.
    pub quiet_after: Duration,
    /// Bytes of signals (as the sender wrote them) one connection may send to one
    /// neighbour at once, and again every [`LINK_REFILL`] (a token bucket per link): an
    /// honest negotiation is an offer or answer of a few KiB and its candidates (at most
    /// 64 of a few hundred bytes); without it one neighbour could have the server push
    /// about 0.8 MB/s of signals into a volunteer, at the connection's message rate.
    pub link_signal_bytes: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: shoal_shared::protocol::DEFAULT_MAX_MESSAGE_BYTES,
            max_peers_per_task: 10_000,
            max_connections: 19_000,
            rate_per_sec: 50.0,
            burst: 200.0,
            strikes: 20,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            read_buffer: 256,
            queue: 64,
            max_peers_per_address: 32,
            joins_per_address_per_sec: 1.0,
            join_burst: 32.0,
            quiet_after: Duration::from_secs(10),
            link_signal_bytes: 96.0 * 1024.0,
        }
    }
}

/// Configuration of the signaling side.
#[derive(Clone, Debug)]
pub struct SignalingConfig {
    /// Bounds.
    pub limits: Limits,
    /// Neighbours per peer (k) of a task not in `task_neighbours`; a peer may
    /// temporarily hold up to 2k.
    pub neighbours: usize,
    /// Each task's k (its `learn.neighbours`, unless the server overrides it).
    pub task_neighbours: HashMap<String, usize>,
    /// Origins whose pages may connect. Empty: same origin only. `*`: any.
    pub allowed_origins: Vec<String>,
    /// ICE servers handed to peers.
    pub ice: IceConfig,
    /// Where each task's ledger of receipts is kept (`{dir}/{task}.ledger`); `None`
    /// keeps none, and receipts are refused.
    pub ledger_dir: Option<std::path::PathBuf>,
    /// The size at which a ledger's live segment is sealed and the next begun.
    pub ledger_segment_bytes: u64,
    /// Entries a task's ledger takes in all; receipts beyond are refused (`full`). The
    /// server holds every entry in memory (about 700 bytes each) and on disk (about 250).
    pub ledger_max_entries: u64,
    /// Ledger file downloads one address (an IPv4 address, an IPv6 /48) may run at once;
    /// 0 for no share.
    pub ledger_downloads_per_address: usize,
    /// Ledger pages and credits one address (an IPv4 address, an IPv6 /48) may have
    /// computed at once, of the server's [`crate::ledger::LEDGER_READS`]; 0 for no share.
    pub ledger_reads_per_address: usize,
}

impl SignalingConfig {
    /// The k of `task`: its own, else [`neighbours`](Self::neighbours).
    pub fn neighbours_for(&self, task: &str) -> usize {
        self.task_neighbours
            .get(task)
            .copied()
            .unwrap_or(self.neighbours)
    }
}

/// [`SignalingConfig::ledger_max_entries`] by default: about 700 MB of memory and 250 MB
/// of disk per task.
pub const DEFAULT_LEDGER_MAX_ENTRIES: u64 = 1_000_000;

impl Default for SignalingConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            neighbours: 6,
            task_neighbours: HashMap::new(),
            allowed_origins: Vec::new(),
            ice: IceConfig {
                turn_ttl_secs: 3600,
                ..IceConfig::default()
            },
            ledger_dir: None,
            ledger_segment_bytes: shoal_shared::trust::ledger::DEFAULT_SEGMENT_BYTES,
            ledger_max_entries: DEFAULT_LEDGER_MAX_ENTRIES,
            ledger_downloads_per_address: 1,
            ledger_reads_per_address: crate::ledger::LEDGER_READS_PER_ADDRESS,
        }
    }
}

/// Signals from one neighbour that may wait in a peer's queue at once, and their bytes
/// (an honest negotiation is an offer or answer and its candidates, sent as they come):
/// a neighbour sending large signals faster than the peer reads them took its whole
/// queue, and the peer got no other neighbour's offers nor the server's own messages. A
/// neighbour with none waiting always gets its next signal in while the queue has room.
pub const SIGNALS_PER_SENDER: usize = 12;
/// See [`SIGNALS_PER_SENDER`].
pub const SIGNAL_BYTES_PER_SENDER: usize = 64 * 1024;
/// Bytes of relayed signals one peer's queue holds, from all its neighbours (besides
/// the first waiting of each).
pub const SIGNAL_BYTES_QUEUED: usize = 256 * 1024;

/// How long a link's signal budget ([`Limits::link_signal_bytes`]) takes to come back.
pub const LINK_REFILL: Duration = Duration::from_secs(30);

/// The signal budget of one connection's links ([`Limits::link_signal_bytes`]), by
/// neighbour: bytes left and when they were counted.
struct LinkBudgets {
    full: f64,
    links: HashMap<PeerId, (f64, Instant)>,
}

impl LinkBudgets {
    /// Takes `bytes` from the link to `to` if it has them left.
    fn take(&mut self, to: PeerId, bytes: usize, now: Instant) -> bool {
        let full = self.full;
        let refill = |(left, at): (f64, Instant)| {
            let since = now.saturating_duration_since(at).as_secs_f64();
            (left + since / LINK_REFILL.as_secs_f64() * full).min(full)
        };
        // Links whose budget came back whole are forgotten (a peer holds at most 2k
        // neighbours, but may name others).
        if self.links.len() >= 64 {
            self.links.retain(|_, b| refill(*b) < full);
        }
        let left = self.links.get(&to).copied().map_or(full, refill);
        let ok = left >= bytes as f64;
        self.links
            .insert(to, (if ok { left - bytes as f64 } else { left }, now));
        ok
    }
}

/// A connection's queue of outgoing messages. Lighter than a channel for the common case
/// of an idle peer: the queue allocates nothing until a message is waiting, and the
/// connection's task sleeps on the `Notify`.
pub(crate) struct Outbox {
    /// Each message, with the neighbour that sent it if it is a relayed signal.
    queue: Mutex<VecDeque<(String, Option<PeerId>)>>,
    ready: Notify,
    cap: usize,
}

impl Outbox {
    fn new(cap: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<(String, Option<PeerId>)>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a message of the server's, or refuses it when `cap` are already waiting.
    fn push(&self, text: String) -> Result<(), String> {
        self.push_from(text, None)
    }

    /// Queues a message, relayed from neighbour `from` if it is a signal; refuses it when
    /// `cap` are already waiting or, for a signal of a sender that has one waiting, when
    /// it would pass the sender's share ([`SIGNALS_PER_SENDER`],
    /// [`SIGNAL_BYTES_PER_SENDER`]), [`SIGNAL_BYTES_QUEUED`], or three quarters of `cap`
    /// (the rest is kept for the server's messages).
    fn push_from(&self, text: String, from: Option<PeerId>) -> Result<(), String> {
        {
            let mut q = self.lock();
            if q.len() >= self.cap {
                return Err(text);
            }
            if let Some(f) = from {
                let (mut theirs, mut their_bytes) = (0, text.len());
                let (mut relayed, mut relayed_bytes) = (1, text.len());
                for (m, by) in q.iter() {
                    if let Some(by) = by {
                        relayed += 1;
                        relayed_bytes += m.len();
                        if *by == f {
                            theirs += 1;
                            their_bytes += m.len();
                        }
                    }
                }
                if theirs > 0
                    && (theirs >= SIGNALS_PER_SENDER
                        || their_bytes > SIGNAL_BYTES_PER_SENDER
                        || relayed_bytes > SIGNAL_BYTES_QUEUED
                        || relayed > self.cap - self.cap / 4)
                {
                    return Err(text);
                }
            }
            q.push_back((text, from));
        }
        self.ready.notify_one();
        Ok(())
    }

    /// The oldest waiting message.
    fn pop(&self) -> Option<String> {
        let mut q = self.lock();
        let m = q.pop_front().map(|(m, _)| m);
        if q.is_empty() && q.capacity() > 8 {
            // A burst is over: give its memory back.
            *q = VecDeque::new();
        }
        m
    }
}

struct Peer {
    tx: Arc<Outbox>,
    neighbours: BTreeSet<PeerId>,
    /// The swarm's round when each neighbour was linked (`None`: none was known):
    /// receipts between the two count only from a few rounds before it
    /// ([`link_span_holds`]).
    since: HashMap<PeerId, Option<u64>>,
    /// When it last reported training, not paused ([`training_recently`]).
    trained_at: Option<Instant>,
    /// Index in `Task::ids`.
    slot: usize,
    /// The peer's latest numbers for the dashboard (boxed: most idle connections never
    /// send one, and the slot costs them a pointer).
    report: Option<Box<(Instant, PeerReport)>>,
    /// The network it connects from ([`address_group`]).
    group: u128,
    /// When it joined, and the swarm's round then (as links are stamped).
    joined: Instant,
    joined_round: Option<u64>,
    /// Whether it has sent anything since (a live peer signals its neighbours at once).
    spoke: bool,
    /// The key it proved with `identify`, if it did and no newer connection took it over.
    key: Option<PublicKey>,
    /// Whether it ever identified: a connection signs with one key for its life, so one
    /// whose key was taken over may not identify again.
    identified: bool,
    /// The site it said it contributes from (`site` in the websocket URL; empty: none).
    site: Arc<str>,
    /// The welcome's nonce, for `identify` to sign.
    nonce: [u8; 32],
    /// Identified neighbours that left, with when and their site, for
    /// [`LINK_MEMORY`]: receipts for their last updates still count.
    former: VecDeque<Former>,
    /// `identify` messages that failed (after [`MAX_IDENTIFY_FAILURES`] no more are
    /// checked).
    identify_failures: u8,
    /// `unreachable` reports taken that redrew a neighbour (at most `2k` per
    /// connection; later ones unlink without a redraw).
    unreachable: usize,
    /// Its lost links: the neighbours its own `unreachable` reports unlinked from it
    /// (`shed`), and those whose reports unlinked it (`shed_by`), at most [`MAX_SHED`]
    /// each still connected and reached by most networks. While connected they still
    /// count among its identified links ([`identified_links`], up to k in all), so
    /// neither shedding its honest neighbours nor refusing to connect to them lowers
    /// the quorum its receipts need. Kept apart so that others' reports never use up
    /// the places its own need: sybils that reported it fast enough kept it from
    /// dropping its dead neighbours.
    shed: Vec<PeerId>,
    shed_by: Vec<PeerId>,
    /// The networks ([`network`]) of the peers it has been linked to, and of those
    /// that reported it `unreachable`, each with when it last was (each at most
    /// [`MAX_GROUPS_KEPT`]; only those of the last [`VOTE_WINDOW`] count): see
    /// [`Peer::drawable`].
    linked_groups: BTreeMap<u128, Instant>,
    unreachable_from: BTreeMap<u128, Instant>,
    /// Receipts this connection may still send now (a token bucket), and when it was
    /// last refilled.
    receipt_tokens: f64,
    receipt_refilled: Instant,
}

/// Networks that must have reported a peer `unreachable`, and more than half of those it
/// was linked to, before it is no longer drawn as anyone's neighbour.
pub const UNREACHABLE_NETWORKS: usize = 3;
/// Networks kept per peer for that count (two sets of at most 64: a few KB per peer at
/// most, in a large swarm's long-lived peers).
const MAX_GROUPS_KEPT: usize = 64;
/// How long a link and an `unreachable` report count toward [`Peer::drawable`]: votes
/// never expired, so a network's reports piled up on every peer it was ever drawn.
pub const VOTE_WINDOW: Duration = Duration::from_secs(600);
/// Networks whose peers one network's connections together may count `unreachable`
/// reports against per [`VOTE_WINDOW`] (any number of peers of each). Beyond, a report
/// still unlinks (and redraws within the reporter's budget) but counts against no one: a
/// dozen networks, each joining again and again and reporting every honest peer it was
/// drawn, made every honest peer of a swarm undrawable in turn, so that newcomers were
/// handed only them. Peers that never connect come from few networks (a flood of them
/// from three addresses is three), and their honest neighbours' reports all count.
pub const VOTED_NETWORKS: usize = 4;
/// Networks whose recent reports a task tracks (a few dozen bytes each); past it, a
/// report from a network not tracked counts against no one.
const MAX_VOTERS: usize = 65_536;
/// Lost links a connection keeps of peers still connected (and reached by most
/// networks), of its own reports and of others' each ([`Peer::shed`]): past that its
/// `unreachable` reports beyond its redraw budget are refused `rate_limited`, and links
/// others' reports unlink are not kept.
const MAX_SHED: usize = 64;

impl Peer {
    /// The swarm's round when neighbour `n` was linked to it, if one was known.
    fn linked_round(&self, n: PeerId) -> Option<u64> {
        self.since.get(&n).copied().flatten()
    }

    /// Whether the peer may be drawn as a new neighbour: it is live (it spoke, or it
    /// joined less than `quiet_after` ago), and it is not unreachable for most of the
    /// networks it was linked to — at least [`UNREACHABLE_NETWORKS`] of them reported it
    /// (a peer that never opens a WebRTC connection: honest neighbours report it, and
    /// without this it would be handed to every newcomer in their place). Colluders can
    /// report an honest peer only from the networks they hold among its links; while
    /// those are at most half, it is drawn as before.
    fn drawable(&self, quiet_after: Duration) -> bool {
        let live = self.spoke || self.joined.elapsed() < quiet_after;
        live && !self.unreachable_for_most()
    }

    /// Whether at least [`UNREACHABLE_NETWORKS`] networks, and most of those it was
    /// linked to, reported it `unreachable` within the last [`VOTE_WINDOW`] (links and
    /// reports age out alike: a peer that nobody could reach is tried again a window
    /// later).
    fn unreachable_for_most(&self) -> bool {
        let recent = |m: &BTreeMap<u128, Instant>| {
            m.values().filter(|at| at.elapsed() < VOTE_WINDOW).count()
        };
        let n = recent(&self.unreachable_from);
        n >= UNREACHABLE_NETWORKS && 2 * n > recent(&self.linked_groups)
    }
}

/// Each address's allowance of new connections and when it was last refilled.
type JoinBuckets = HashMap<u128, (f64, Instant)>;

/// Addresses whose allowance of new connections is tracked at once: beyond, only those
/// still short of a whole burst are kept (each entry is a few dozen bytes).
const MAX_JOIN_BUCKETS: usize = 100_000;

/// Failed `identify` messages a connection may send; later ones are refused unchecked.
const MAX_IDENTIFY_FAILURES: u8 = 3;
/// How far behind the swarm's round (the median reported version) a receipt's round may
/// be: a receiver uses updates at most a few rounds old, and reports lag a round.
pub const RECEIPT_ROUNDS_BEHIND: u64 = 32;
/// And how far ahead.
pub const RECEIPT_ROUNDS_AHEAD: u64 = 4;

/// A former neighbour: when it was unlinked, its key, site and identified links, and the
/// swarm's rounds when the pair was linked and unlinked.
type Former = (Instant, PublicKey, Arc<str>, u8, Span);

/// The swarm's rounds when a pair was linked and unlinked (`None`: not known then, no
/// bound that side).
type Span = (Option<u64>, Option<u64>);

/// Whether a receipt of `round` falls in the rounds `(linked, unlinked)` of a pair, give
/// or take [`RECEIPT_ROUNDS_AHEAD`] (a peer's own round runs a little ahead of or behind
/// the swarm's median): a pair linked at round 1,000 cannot receipt round 970, nor a
/// former neighbour rounds long after it left. Before, any pair could receipt the 32
/// rounds behind the swarm's however new it was, and any neighbour of the last 10
/// minutes every round since, so colluders that had passed through an honest peer's
/// neighbours signed its rounds by the dozen (with claims of their own).
fn link_span_holds(round: u64, (linked, unlinked): Span) -> bool {
    linked.is_none_or(|l| round.saturating_add(RECEIPT_ROUNDS_AHEAD) >= l)
        && unlinked.is_none_or(|u| round <= u.saturating_add(RECEIPT_ROUNDS_AHEAD))
}

/// The swarm's round as links are stamped with it: as last counted (receipts, which
/// come every round while a swarm trains, and task descriptions count it at most every
/// second; stamping a link does not recount it); `None` while none is known.
fn link_round(t: &Task) -> Option<u64> {
    t.summary.and_then(|(_, s)| s.round)
}

/// How long after a neighbour left a receipt for its update still counts as linked.
pub const LINK_MEMORY: Duration = Duration::from_secs(600);

/// A connection a key was proved on that ended (it left, or a newer proof took its key
/// over): when, the swarm's rounds when it joined and ended, and its identified links
/// then ([`sender_links`]).
type KeySpan = (Instant, Span, u8);
/// Ended connections remembered per key: past that the two oldest are merged into one
/// that spans both and counts the links of both (dropped, a key that hopped 32 more times
/// had its earlier connections forgotten, and their colluders made a quorum again).
const MAX_KEY_SPANS: usize = 32;
/// Keys whose ended connections a task remembers: when full, those with none in the
/// last [`LINK_MEMORY`] are forgotten, and then, if still full, any, down to nine tenths
/// (so that one pass serves many new keys). About 300 bytes each: 80 MB at most per
/// task, and filling it takes as many `identify`s within 10 minutes.
const MAX_KEYS_SPANNED: usize = 262_144;

/// The identified neighbours of every connection `key` was proved on whose rounds (from
/// its joining to its end, give or take [`RECEIPT_ROUNDS_AHEAD`]) hold `round`: the one
/// that holds it now and those that ended in the last [`LINK_MEMORY`]. A key that moved
/// from connection to connection within a round or two gathered receivers from all of
/// them, while each receipt's `links` named one connection's: colluders drawn to any of
/// them made up the quorum together. Rounds past the swarm's (`swarm`) count as it.
fn sender_links(
    t: &Task,
    key: &PublicKey,
    round: u64,
    k: usize,
    swarm: u64,
    now: Instant,
) -> usize {
    let holds =
        |(joined, ended): Span| link_span_holds(round, (joined.map(|j| j.min(swarm)), ended));
    let live = t
        .key_owner
        .get(key)
        .and_then(|id| t.peers.get(id))
        .filter(|q| q.key == Some(*key) && holds((q.joined_round, None)))
        .map_or(0, |q| usize::from(identified_links(t, q, k)));
    let ended: usize = t.key_spans.get(key).map_or(0, |spans| {
        spans
            .iter()
            .filter(|(at, span, _)| now.duration_since(*at) < LINK_MEMORY && holds(*span))
            .map(|&(_, _, links)| usize::from(links))
            .sum()
    });
    live + ended
}

/// Records that a connection which held `key` ended, with its rounds (joined, ended) and
/// its identified links then. Ended while the server knew no round (`ended` is `None`), a connection counts as
/// ended at the round it joined: unbounded, an honest peer that reconnected in a quiet
/// spell had both connections' links counted for every round for 10 minutes.
fn key_ended(t: &mut Task, key: PublicKey, (joined, ended): Span, links: u8) {
    let now = Instant::now();
    let fresh = |s: &VecDeque<KeySpan>| {
        s.back()
            .is_some_and(|(at, ..)| now.duration_since(*at) < LINK_MEMORY)
    };
    if t.key_spans.len() >= MAX_KEYS_SPANNED && !t.key_spans.contains_key(&key) {
        t.key_spans.retain(|_, s| fresh(s));
        let over = t.key_spans.len().saturating_sub(MAX_KEYS_SPANNED * 9 / 10);
        let gone: Vec<PublicKey> = t.key_spans.keys().take(over).copied().collect();
        for k in gone {
            t.key_spans.remove(&k);
        }
    }
    let spans = t.key_spans.entry(key).or_default();
    while spans
        .front()
        .is_some_and(|(at, ..)| now.duration_since(*at) >= LINK_MEMORY)
    {
        spans.pop_front();
    }
    if spans.len() >= MAX_KEY_SPANS
        && let (Some(a), Some(b)) = (spans.pop_front(), spans.pop_front())
    {
        let both =
            |x: Option<u64>, y: Option<u64>, f: fn(u64, u64) -> u64| x.zip(y).map(|(x, y)| f(x, y));
        let span = (both(a.1.0, b.1.0, u64::min), both(a.1.1, b.1.1, u64::max));
        spans.push_front((b.0, span, a.2.saturating_add(b.2)));
    }
    spans.push_back((now, (joined, ended.or(joined)), links));
}

/// Former neighbours remembered per peer (the oldest are forgotten first).
const MAX_FORMER: usize = 64;

#[derive(Default)]
struct Task {
    peers: HashMap<PeerId, Peer>,
    /// Every peer id, for O(1) random draws.
    ids: Vec<PeerId>,
    /// Peers per network address, and per IPv6 /48 under [`wide_group`] keys.
    per_group: HashMap<u128, usize>,
    /// Paused by the researcher.
    paused: bool,
    /// The swarm's numbers from its peers' reports, and when they were counted.
    summary: Option<(Instant, Summary)>,
    /// A report came since.
    reported: bool,
    /// Per key, its ended connections ([`key_ended`], [`sender_links`]).
    key_spans: HashMap<PublicKey, VecDeque<KeySpan>>,
    /// The connection that proved each key last (it holds the key while its `key` says so).
    key_owner: HashMap<PublicKey, PeerId>,
    /// Per network, the networks its counted `unreachable` reports of the last
    /// [`VOTE_WINDOW`] were against, each with when it was first (at most
    /// [`MAX_VOTERS`] networks).
    votes: HashMap<u128, VecDeque<(Instant, u128)>>,
}

/// What a task's recent reports say, counted in one pass over its peers: anew once a
/// report came (but not within [`SUMMARY_MIN`] of the last count), else once per
/// [`SUMMARY_EVERY`] (reports age out). While it knows no round, a trainer's report
/// gives it its own (the median of the one trainer report) at once, without a count: a
/// peer's first receipts come right behind its first report. Receipts and task
/// descriptions ask for it on every request, and a pass costs time linear in the task's
/// peers under the lock every task shares.
#[derive(Clone, Copy, Debug, Default)]
struct Summary {
    /// [`median_version`].
    round: Option<u64>,
    /// See [`Hub::pace`].
    pace: Option<f64>,
    /// See [`Hub::roles`].
    roles: (usize, usize),
}

/// How long a task's [`Summary`] stands when no report came.
const SUMMARY_EVERY: Duration = Duration::from_secs(1);
/// How long it stands however many reports come.
const SUMMARY_MIN: Duration = Duration::from_millis(20);

impl Task {
    /// The task's [`Summary`], counted anew when it no longer stands.
    fn summary(&mut self) -> Summary {
        let now = Instant::now();
        if let Some((at, s)) = self.summary {
            let age = now.duration_since(at);
            if age < SUMMARY_MIN || (age < SUMMARY_EVERY && !self.reported) {
                return s;
            }
        }
        self.reported = false;
        let s = Summary {
            round: median_version(self),
            pace: pace(self),
            roles: roles(self),
        };
        self.summary = Some((now, s));
        s
    }
}

/// One peer as the dashboard sees it.
#[derive(Debug, Serialize)]
pub struct PeerView {
    /// The peer's id.
    pub id: PeerId,
    /// Its neighbours (the graph's edges).
    pub neighbours: Vec<PeerId>,
    /// Its latest report, if it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<PeerReport>,
    /// Seconds since that report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_age_s: Option<f64>,
}

/// A task's swarm as the dashboard sees it: who is online, the neighbour graph, and
/// each peer's latest numbers. Never weights.
#[derive(Debug, Serialize)]
pub struct SwarmView {
    /// The task.
    pub task: String,
    /// Paused by the researcher.
    pub paused: bool,
    /// Peers online.
    pub total: usize,
    /// The swarm's round as the server counts it (the median by network of trainers'
    /// recent reports, as receipts are checked against), if known: one peer's claim, or
    /// many from one network, does not set it, nor do stale reports.
    pub round: Option<u64>,
    /// Trainers that reported in the last 30 s and are not paused, of all peers (not
    /// only those listed).
    pub trainers: usize,
    /// The totals of all trainers' reports (not only those listed).
    pub totals: SwarmTotals,
    /// Up to the view's limit of them: those with the smallest ids (ids are drawn at
    /// random, so a random sample that stays put while its peers stay).
    pub peers: Vec<PeerView>,
}

/// How many times the lower-median trainer a trainer's claim counts at most in the
/// swarm's totals.
pub const OUTLIER_TIMES: f64 = 10.0;

/// A task's totals over every trainer that reported, each trainer's claim counted at
/// most [`OUTLIER_TIMES`] the lower median by network (see [`network_median`]; of
/// samples/s: of those training), or 1, and each network's trainers together at most
/// [`NETWORK_WEIGHT`] times that: liars fewer than half of the networks' weight set no
/// cap, and one address's many sockets weigh as four peers (one address with 32 sockets
/// reporting 0.5 samples/s capped every honest trainer of a twelve-peer swarm at 5 and
/// flagged them all as outliers; reporting the most, it raised the totals 27-fold).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SwarmTotals {
    /// Trainers whose reports are counted.
    pub reporting: usize,
    /// Samples a second: of reports of the last 30 s from unpaused trainers.
    pub samples_per_s: f64,
    /// Bytes sent and received.
    pub bytes: f64,
    /// Samples trained.
    pub samples: f64,
    /// Updates rejected, by reason: each trainer's counts scaled down together to at most
    /// [`OUTLIER_TIMES`] the lower-median trainer's updates handled (used and rejected).
    pub rejected: std::collections::BTreeMap<String, f64>,
    /// Trainers that claim more samples/s, bytes or samples than the caps.
    pub outliers: usize,
}

/// [`SwarmTotals`] of the latest reports (each with its age), of trainers only.
/// `reports` are each peer's latest report, with its age and the peer's [`network`].
fn swarm_totals<'a>(
    reports: impl Iterator<Item = (&'a PeerReport, Duration, u128)>,
) -> SwarmTotals {
    type Report<'a> = (&'a PeerReport, Duration, u128);
    let mut trainers: Vec<Report<'a>> = reports
        .filter(|(r, _, _)| r.role == shoal_shared::protocol::Role::Trainer)
        .collect();
    // By network, so that each network's trainers are together.
    trainers.sort_by_key(|t| t.2);
    let rate = |(r, age, _): &Report<'_>| {
        if *age < Duration::from_secs(30) && !r.paused {
            f64::from(r.samples_per_s)
        } else {
            0.0
        }
    };
    let bytes = |(r, _, _): &Report<'_>| r.bytes_up as f64 + r.bytes_down as f64;
    let samples = |(r, _, _): &Report<'_>| r.samples as f64;
    let rejected = |(r, _, _): &Report<'_>| r.rejected.values().sum::<u64>() as f64;
    let handled = |t: &Report<'_>| rejected(t) + t.0.used as f64;
    let cap = |value: &dyn Fn(&Report<'_>) -> f64, training_only: bool| {
        let by_network = trainers
            .iter()
            .map(|t| (t.2, value(t)))
            .filter(|&(_, v)| !training_only || v > 0.0)
            .collect();
        OUTLIER_TIMES
            * network_median(by_network, f64::total_cmp)
                .unwrap_or(0.0)
                .max(1.0)
    };
    let caps = (
        cap(&rate, true),
        cap(&bytes, false),
        cap(&samples, false),
        cap(&handled, false),
    );
    let mut totals = SwarmTotals {
        reporting: trainers.len(),
        ..SwarmTotals::default()
    };
    let most = NETWORK_WEIGHT as f64;
    for network in trainers.chunk_by(|a, b| a.2 == b.2) {
        let sum = |value: &dyn Fn(&Report<'_>) -> f64, cap: f64| {
            let all: f64 = network.iter().map(|t| value(t).min(cap)).sum();
            all.min(most * cap)
        };
        totals.samples_per_s += sum(&rate, caps.0);
        totals.bytes += sum(&bytes, caps.1);
        totals.samples += sum(&samples, caps.2);
        for t in network {
            if rate(t) > caps.0 || bytes(t) > caps.1 || samples(t) > caps.2 {
                totals.outliers += 1;
            }
        }
        // Each trainer's rejections scaled to the cap of updates handled, and the
        // network's together to its weight's.
        let scales: Vec<f64> = network
            .iter()
            .map(|t| {
                let all = rejected(t);
                if all > caps.3 { caps.3 / all } else { 1.0 }
            })
            .collect();
        let counted: f64 = network
            .iter()
            .zip(&scales)
            .map(|(t, s)| rejected(t) * s)
            .sum();
        let whole = if counted > most * caps.3 {
            most * caps.3 / counted
        } else {
            1.0
        };
        for (t, s) in network.iter().zip(&scales) {
            for (reason, n) in &t.0.rejected {
                *totals.rejected.entry(reason.clone()).or_default() += *n as f64 * s * whole;
            }
        }
    }
    totals
}

impl Task {
    /// Removes a peer, keeping `ids` dense (the last id moves into the freed slot).
    fn remove(&mut self, id: PeerId) -> Option<Peer> {
        let gone = self.peers.remove(&id)?;
        for g in counted_groups(gone.group) {
            if let Some(n) = self.per_group.get_mut(&g) {
                *n -= 1;
                if *n == 0 {
                    self.per_group.remove(&g);
                }
            }
        }
        self.ids.swap_remove(gone.slot);
        if let Some(&moved) = self.ids.get(gone.slot)
            && let Some(p) = self.peers.get_mut(&moved)
        {
            p.slot = gone.slot;
        }
        Some(gone)
    }
}

struct HubState {
    tasks: HashMap<String, Task>,
    rng: Draws,
}

/// Unpredictable draws for peer ids, nonces and neighbours: SHA-256 of a secret seed from
/// the operating system and a counter. (A plain generator's outputs — the ids it hands
/// out — would let a client work out its state and predict whom later peers are linked
/// with; credits rest on neighbours that nobody can choose.)
struct Draws {
    seed: [u8; 32],
    counter: u64,
}

impl Draws {
    /// Seeded from `/dev/urandom`; elsewhere (or if it cannot be read) from the clock,
    /// with a warning.
    fn from_os() -> Self {
        use std::io::Read;
        let mut seed = [0u8; 32];
        let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
        if read.is_err() {
            tracing::warn!(
                "no /dev/urandom: peer ids and neighbour draws are seeded from the clock"
            );
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            seed = sha256(&nanos.to_le_bytes());
        }
        Self { seed, counter: 0 }
    }

    fn next_u64(&mut self) -> u64 {
        let mut input = [0u8; 40];
        input[..32].copy_from_slice(&self.seed);
        input[32..].copy_from_slice(&self.counter.to_le_bytes());
        self.counter += 1;
        let h = sha256(&input);
        u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
    }

    /// Uniform in `0..n` (the modulo bias is below 2^-40 for any `n` a server holds).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The shared state of the signaling server.
pub struct Hub {
    pub(crate) config: SignalingConfig,
    state: Mutex<HubState>,
    connections: AtomicUsize,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    shutdown: watch::Sender<bool>,
    /// Where the paused tasks are saved, if anywhere.
    state_file: Option<std::path::PathBuf>,
    /// Held while a state change is saved.
    saving: Mutex<()>,
    /// Each network address's allowance of new connections (a token bucket) and when it
    /// was last refilled; and when the full ones were last dropped.
    joins: Mutex<(JoinBuckets, Option<Instant>)>,
    /// Each task's ledger of receipts (tasks whose ledger could not be opened have none).
    pub(crate) ledgers: HashMap<String, Arc<Mutex<LedgerFile>>>,
    /// The key the server signs its ledgers' heads with (`{ledger_dir}/server.key`).
    pub(crate) head_key: Option<shoal_shared::learn::identity::Identity>,
    /// Receipts being appended at once, from all connections ([`RECEIPTS_AT_ONCE`]).
    receipt_slots: Arc<tokio::sync::Semaphore>,
    /// Each task's revision, set once by [`crate::app`] (see [`Hub::set_revisions`]).
    revisions: std::sync::OnceLock<HashMap<String, String>>,
}

/// Receipts one connection may have waiting to be appended; past them a receipt is
/// refused (`bad_receipt`, `unavailable`). A connection's receipts are appended in the
/// order they came, off its loop: the ledger's lock may wait for a disk sync, or for
/// credits or a ledger file built for an anonymous request, and a receipt waited for
/// inline held its connection's pings, signals and queue meanwhile.
pub const RECEIPTS_WAITING: usize = 32;
/// Receipts appended at once, from all connections: each takes a blocking thread while
/// it waits for the ledger's lock, and the server's file downloads need them too.
pub const RECEIPTS_AT_ONCE: usize = 64;

/// Why a receipt was refused, or `Appended`: the `reason` label of
/// `shoal_receipts_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiptOutcome {
    /// In the ledger.
    Appended,
    /// Not hex, not a receipt, or for another task.
    Malformed,
    /// Sent before `identify`, or its receiver is not the connection's key.
    NotYours,
    /// The receiver's signature fails.
    BadSignature,
    /// Its receiver's connection has not said in the last 30 s that it trains (no
    /// `report` of a trainer that is not paused): observers, joiners and paused peers
    /// sign no receipts, and do not count in a sender's `links` either.
    NotContributing,
    /// Its sender's key was not on a connection linked to this one (now or within
    /// [`LINK_MEMORY`]).
    NotLinked,
    /// Not above the last receipted round of the same sender and receiver.
    Replay,
    /// Its round is far from the swarm's (or no peer has reported a round yet).
    Implausible,
    /// The connection sent receipts faster than its budget.
    TooMany,
    /// The server keeps no ledger for the task, or could not write it.
    Unavailable,
    /// The task's ledger holds [`SignalingConfig::ledger_max_entries`] entries.
    Full,
}

impl ReceiptOutcome {
    /// Every outcome, in `/metrics` order.
    pub const ALL: [Self; 11] = [
        Self::Appended,
        Self::Malformed,
        Self::NotYours,
        Self::BadSignature,
        Self::NotContributing,
        Self::NotLinked,
        Self::Replay,
        Self::Implausible,
        Self::TooMany,
        Self::Unavailable,
        Self::Full,
    ];

    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Appended => "appended",
            Self::Malformed => "malformed",
            Self::NotYours => "not_yours",
            Self::NotContributing => "not_contributing",
            Self::BadSignature => "bad_signature",
            Self::NotLinked => "not_linked",
            Self::Replay => "replay",
            Self::Implausible => "implausible_round",
            Self::TooMany => "too_many",
            Self::Unavailable => "unavailable",
            Self::Full => "full",
        }
    }
}

/// A receipt that passed the checks: its bytes, decoded, its sender's site and how many
/// identified neighbours the sender has (or had when it left).
type CheckedReceipt = (Vec<u8>, Receipt, Arc<str>, u8);

/// The swarm's round: the median model version that training peers reported in the last
/// 30 s (reports are claims), by network (see [`median_over_networks`]).
fn median_version(t: &Task) -> Option<u64> {
    median_over_networks(t, |r| Some(r.version), u64::cmp)
}

/// The most peers' worth one network weighs in [`median_over_networks`].
const NETWORK_WEIGHT: usize = 4;

/// The lower weighted median over networks of what `value` reads from the training peers'
/// reports of the last 30 s: the peers of one network (IPv4 address or IPv6 /48, see
/// [`network`]) count as one value, their own lower median, weighing as many peers
/// as they are up to [`NETWORK_WEIGHT`]. One address's many peers (up to
/// `max_peers_per_address`) then weigh no more than four lone peers, so it cannot set the
/// swarm's round (which bounds the rounds receipts may name, and so how fast colluding
/// keys can fill the ledger) or its pace in any swarm of more than a few networks; and
/// peers behind one NAT still outweigh a lone outsider, as in a plain median. Where no
/// network has more than four peers (or behind an untrusted reverse proxy, one network) it is close
/// to the plain lower median.
fn median_over_networks<T: Copy>(
    t: &Task,
    value: impl Fn(&PeerReport) -> Option<T>,
    cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Option<T> {
    let by_network: Vec<(u128, T)> = t
        .peers
        .values()
        .filter_map(|p| Some((network(p.group), value(recent_trainer_report(p)?)?)))
        .collect();
    network_median(by_network, cmp)
}

/// The lower weighted median of values each of a [`network`]: each network one value,
/// its own lower median, weighing as many peers as it has up to [`NETWORK_WEIGHT`].
fn network_median<T: Copy>(
    mut by_network: Vec<(u128, T)>,
    cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Option<T> {
    by_network.sort_by(|a, b| a.0.cmp(&b.0).then(cmp(&a.1, &b.1)));
    let mut votes: Vec<(T, usize)> = by_network
        .chunk_by(|a, b| a.0 == b.0)
        .map(|g| (g[(g.len() - 1) / 2].1, g.len().min(NETWORK_WEIGHT)))
        .collect();
    votes.sort_by(|a, b| cmp(&a.0, &b.0));
    let total: usize = votes.iter().map(|v| v.1).sum();
    let mut below = 0;
    votes.into_iter().find_map(|(v, w)| {
        below += w;
        (2 * below >= total).then_some(v)
    })
}

/// See [`Hub::roles`].
fn roles(t: &Task) -> (usize, usize) {
    let recent = t
        .peers
        .values()
        .filter_map(|p| p.report.as_deref())
        .filter(|(at, _)| at.elapsed() < Duration::from_secs(30));
    recent.fold((0, 0), |(tr, ob), (_, r)| match r.role {
        shoal_shared::protocol::Role::Trainer if !r.paused => (tr + 1, ob),
        shoal_shared::protocol::Role::Observer => (tr, ob + 1),
        shoal_shared::protocol::Role::Trainer => (tr, ob),
    })
}

/// See [`Hub::pace`].
fn pace(t: &Task) -> Option<f64> {
    median_over_networks(
        t,
        |r| (!r.paused && r.samples_per_s > 0.0).then_some(f64::from(r.samples_per_s)),
        f64::total_cmp,
    )
}

/// Whether `p` reported training, not paused, in the last 30 s (its latest report may
/// say paused: a peer that pauses still closes the round it was in, and signs its
/// receipts). The one rule for who signs receipts and who counts in `links`.
fn training_recently(p: &Peer) -> bool {
    p.trained_at
        .is_some_and(|at| at.elapsed() < Duration::from_secs(30))
}

/// `p`'s report if it came in the last 30 s and says it trains.
fn recent_trainer_report(p: &Peer) -> Option<&PeerReport> {
    let (at, r) = p.report.as_deref()?;
    (at.elapsed() < Duration::from_secs(30) && r.role == shoal_shared::protocol::Role::Trainer)
        .then_some(r)
}

/// How many of `p`'s neighbours proved a key and contribute (their report in the last
/// 30 s says training, not paused): the `links` of a ledger entry. Joiners, observers and
/// paused visitors sign no receipts and do not raise the quorum. Its lost links
/// ([`Peer::shed`]) count as if still linked, unless most networks cannot reach them
/// either, up to `k` with the linked ones (more would deny an honest peer that dropped
/// many dead ones, or that many could not reach, its credit).
fn identified_links(t: &Task, p: &Peer, k: usize) -> u8 {
    let contributing = |q: &Peer| q.key.is_some() && training_recently(q);
    let linked = p
        .neighbours
        .iter()
        .filter(|q| t.peers.get(q).is_some_and(contributing))
        .count();
    let mut lost: Vec<&PeerId> = p.shed.iter().chain(&p.shed_by).collect();
    lost.sort_unstable();
    lost.dedup();
    let shed = lost
        .into_iter()
        .filter(|q| !p.neighbours.contains(q))
        .filter(|q| {
            t.peers
                .get(q)
                .is_some_and(|q| contributing(q) && !q.unreachable_for_most())
        })
        .count();
    let n = linked.max((linked + shed).min(k));
    u8::try_from(n).unwrap_or(u8::MAX)
}

/// The current Unix time in milliseconds.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn encode(m: &ServerMessage) -> String {
    // Serializing these plain types cannot fail.
    serde_json::to_string(m).unwrap_or_default()
}

impl Hub {
    /// Sets each task's revision (what `/api/tasks/{task}` says; a websocket that names
    /// another is refused with `task_changed`). Only the first call counts.
    pub fn set_revisions(&self, revisions: HashMap<String, String>) {
        let _ = self.revisions.set(revisions);
    }

    /// The revision of `task` the server runs, once set.
    pub fn revision_of(&self, task: &str) -> Option<&str> {
        self.revisions.get()?.get(task).map(String::as_str)
    }

    /// A hub for `config`, where peers may join the tasks named `tasks`; those named in
    /// `paused` start paused, and changes are saved to `state_file` when there is one.
    pub fn new(
        config: SignalingConfig,
        tasks: &[String],
        paused: &[String],
        state_file: Option<std::path::PathBuf>,
    ) -> Arc<Self> {
        let mut ledgers = HashMap::new();
        let mut head_key = None;
        if let Some(dir) = &config.ledger_dir {
            // The server's own key: peers remember the heads it signs, so it must
            // outlive restarts; without OS randomness no key is made and no head signed.
            let seed = || {
                let mut seed = [0u8; 32];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))?;
                Ok(seed)
            };
            let key = std::fs::create_dir_all(dir).and_then(|()| {
                shoal_shared::learn::identity::load_or_create(&dir.join("server.key"), seed)
            });
            match key {
                Ok((key, created)) => {
                    tracing::info!(
                        "ledger heads signed by {}{}",
                        shoal_shared::learn::identity::hex(&key.public()),
                        if created { " (a new key)" } else { "" }
                    );
                    head_key = Some(key);
                }
                Err(e) => tracing::error!(
                    "the server's key in {}: {e}; heads go unsigned",
                    dir.display()
                ),
            }
            for t in tasks {
                match LedgerFile::open(dir, t, unix_ms()) {
                    Ok((mut ledger, note)) => {
                        ledger.set_segment_limit(config.ledger_segment_bytes);
                        if let Some(note) = note {
                            tracing::error!("the ledger of {t:?}: {note}");
                        }
                        if ledger.count() >= config.ledger_max_entries {
                            tracing::warn!(
                                "the ledger of {t:?} is full ({} entries, \
                                 --ledger-max-entries {}): receipts are refused",
                                ledger.count(),
                                config.ledger_max_entries
                            );
                        }
                        tracing::info!(
                            "ledger {}: {} entries",
                            ledger.path().display(),
                            ledger.count()
                        );
                        ledgers.insert(t.clone(), Arc::new(Mutex::new(ledger)));
                    }
                    Err(e) => tracing::error!(
                        "the ledger of {t:?} in {}: {e}; its receipts are refused",
                        dir.display()
                    ),
                }
            }
        }
        let tasks = tasks
            .iter()
            .map(|t| {
                let task = Task {
                    paused: paused.contains(t),
                    ..Task::default()
                };
                (t.clone(), task)
            })
            .collect();
        Arc::new(Self {
            ledgers,
            head_key,
            receipt_slots: Arc::new(tokio::sync::Semaphore::new(RECEIPTS_AT_ONCE)),
            revisions: std::sync::OnceLock::new(),
            config,
            state: Mutex::new(HubState {
                tasks,
                rng: Draws::from_os(),
            }),
            connections: AtomicUsize::new(0),
            metrics: Metrics::default(),
            shutdown: watch::channel(false).0,
            state_file,
            saving: Mutex::new(()),
            joins: Mutex::default(),
        })
    }

    /// Takes one of `group`'s new connections, if its allowance has one
    /// ([`Limits::joins_per_address_per_sec`]) and, for IPv6, its /48's too ([`WIDE_SHARES`]
    /// times the rate and burst: else a /48's 65,536 /64s would each reconnect at an
    /// address's rate, and churn floods honest peers with `joined` and `left`).
    fn may_connect(&self, group: u128) -> bool {
        let Limits {
            joins_per_address_per_sec: rate,
            join_burst: burst,
            ..
        } = self.config.limits;
        if rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut guard = self.joins.lock().unwrap_or_else(PoisonError::into_inner);
        let (joins, pruned) = &mut *guard;
        if joins.len() >= MAX_JOIN_BUCKETS
            && pruned.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            // Addresses whose allowance is whole again need no entry (looked for at most
            // once a second: under a flood from many addresses a pass per connection
            // would cost more than the flood).
            joins.retain(|&key, (tokens, at)| {
                let scale = join_scale(key);
                *tokens + now.duration_since(*at).as_secs_f64() * rate * scale < burst * scale
            });
            *pruned = Some(now);
        }
        let keys: Vec<u128> = counted_groups(group).collect();
        if joins.len() + keys.len() > MAX_JOIN_BUCKETS
            && keys.iter().any(|k| !joins.contains_key(k))
        {
            // Every one of them connected within the last burst's worth of seconds: the
            // server is under attack from many addresses, and the newest wait.
            return false;
        }
        // Both allowances refilled, the /48's first; a connection takes from both or
        // neither. A /64 whose /48 has none left gets no entry: the /48's refused
        // connections from ever new /64s filled the table, and every address was refused.
        let mut allowed = true;
        for &key in keys.iter().rev() {
            let scale = join_scale(key);
            let (tokens, at) = joins.entry(key).or_insert((burst * scale, now));
            *tokens =
                (*tokens + now.duration_since(*at).as_secs_f64() * rate * scale).min(burst * scale);
            *at = now;
            if *tokens < 1.0 {
                allowed = false;
                break;
            }
        }
        if allowed {
            for key in &keys {
                if let Some((tokens, _)) = joins.get_mut(key) {
                    *tokens -= 1.0;
                }
            }
        }
        allowed
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock would be a bug; keep serving with the state as is.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells every connection to close (graceful shutdown).
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// (task, peers online) for every task.
    pub fn peers_online(&self) -> Vec<(String, usize)> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .tasks
            .iter()
            .map(|(k, t)| (k.clone(), t.peers.len()))
            .collect();
        v.sort();
        v
    }

    /// The swarm of `task` for the dashboard, or `None` for an unknown task. Peers are
    /// listed at most `limit` (those with the smallest ids; the totals count them all).
    pub fn swarm_view(&self, task: &str, limit: usize) -> Option<SwarmView> {
        let mut st = self.lock();
        let t = st.tasks.get_mut(task)?;
        let summary = t.summary();
        let totals = swarm_totals(t.peers.values().filter_map(|p| {
            p.report
                .as_ref()
                .map(|r| (&r.1, r.0.elapsed(), network(p.group)))
        }));
        // The peers with the smallest ids: by join order, peers that joined first (and
        // stayed) were the only ones listed.
        let mut listed: Vec<PeerId> = t.ids.clone();
        if listed.len() > limit {
            listed.select_nth_unstable(limit);
            listed.truncate(limit);
        }
        let mut peers: Vec<PeerView> = listed
            .iter()
            .filter_map(|id| {
                let p = t.peers.get(id)?;
                Some(PeerView {
                    id: *id,
                    neighbours: p.neighbours.iter().copied().collect(),
                    report: p.report.as_ref().map(|r| r.1.clone()),
                    report_age_s: p.report.as_ref().map(|r| r.0.elapsed().as_secs_f64()),
                })
            })
            .collect();
        peers.sort_by_key(|p| p.id);
        Some(SwarmView {
            task: task.to_string(),
            paused: t.paused,
            total: t.ids.len(),
            round: summary.round,
            trainers: summary.roles.0,
            totals,
            peers,
        })
    }

    /// Pauses or resumes a task and tells every peer. `Ok(false)` for an unknown task;
    /// with a state file, the new state is saved before this returns (an error if it
    /// could not be: the change holds until the server stops, not across a restart).
    pub fn set_paused(&self, task: &str, paused: bool) -> std::io::Result<bool> {
        // One change at a time is saved, so the file ends with the last one.
        let _saving = self
            .saving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let all_paused = {
            let mut st = self.lock();
            let Some(t) = st.tasks.get_mut(task) else {
                return Ok(false);
            };
            if t.paused != paused {
                t.paused = paused;
                let m = ServerMessage::TaskState { paused };
                for &id in &t.ids {
                    notify(t, id, &m, &self.metrics);
                }
            }
            let mut names: Vec<String> = st
                .tasks
                .iter()
                .filter(|(_, t)| t.paused)
                .map(|(n, _)| n.clone())
                .collect();
            names.sort();
            names
        };
        if let Some(path) = &self.state_file {
            crate::state::save_paused(path, &all_paused)?;
        }
        Ok(true)
    }

    fn store_report(&self, task: &str, id: PeerId, report: PeerReport) -> Result<(), String> {
        report.validate()?;
        let mut st = self.lock();
        if let Some(t) = st.tasks.get_mut(task)
            && let Some(p) = t.peers.get_mut(&id)
        {
            if report.role == shoal_shared::protocol::Role::Trainer
                && let Some((_, s)) = t.summary.as_mut()
                && s.round.is_none()
            {
                s.round = Some(report.version);
            }
            if report.role == shoal_shared::protocol::Role::Trainer && !report.paused {
                p.trained_at = Some(Instant::now());
            }
            p.report = Some(Box::new((Instant::now(), report)));
            t.reported = true;
        }
        Ok(())
    }

    /// Notes that a peer has sent something: it is live, and may be given to newcomers
    /// as a neighbour after `quiet_after`.
    fn spoke(&self, task: &str, id: PeerId) {
        let mut st = self.lock();
        if let Some(p) = st.tasks.get_mut(task).and_then(|t| t.peers.get_mut(&id)) {
            p.spoke = true;
        }
    }

    /// The current neighbours of `peer` in `task` (for tests and diagnostics).
    pub fn neighbours_of(&self, task: &str, peer: PeerId) -> Option<Vec<PeerId>> {
        let st = self.lock();
        st.tasks
            .get(task)?
            .peers
            .get(&peer)
            .map(|p| p.neighbours.iter().copied().collect())
    }

    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            // Native peers send no Origin; browsers always do.
            return true;
        };
        let Some(origin) = origin.to_str().ok().and_then(Origin::parse) else {
            return false;
        };
        let list = &self.config.allowed_origins;
        if !list.is_empty() {
            return list
                .iter()
                .any(|o| o == "*" || Origin::parse(o).is_some_and(|o| o == origin));
        }
        // No allowlist: pages this server served, recognized by an Origin that names the
        // host and port the request was sent to. The Host header is the page's own claim,
        // so only hosts that no page can rebind to another address count: IP literals and
        // `localhost` (a page on evil.example that resolves to this server sends Host and
        // Origin evil.example, and is refused). A server reached by a domain name lists
        // its origin with --allowed-origin.
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let scheme = origin.scheme.clone();
        Origin::parse(&format!("{scheme}://{host}")).is_some_and(|h| h == origin)
            && origin.host_cannot_rebind()
    }

    /// Adds a peer from network `group` to a task and links it to up to k random peers
    /// (see [`choose_neighbours`]).
    fn join(
        &self,
        task: &str,
        tx: Arc<Outbox>,
        group: u128,
        site: &str,
    ) -> Result<(PeerId, [u8; 32]), ErrorCode> {
        let k = self.config.neighbours_for(task);
        let limits = &self.config.limits;
        let mut guard = self.lock();
        let st = &mut *guard;
        let t = st.tasks.get_mut(task).ok_or(ErrorCode::UnknownTask)?;
        if t.peers.len() >= limits.max_peers_per_task {
            return Err(ErrorCode::TaskFull);
        }
        let from_group = t.per_group.get(&group).copied().unwrap_or(0);
        let from_wide = wide_group(group).map_or(0, |w| t.per_group.get(&w).copied().unwrap_or(0));
        let cap = limits.max_peers_per_address;
        if cap > 0 && (from_group >= cap || from_wide >= cap.saturating_mul(WIDE_SHARES)) {
            return Err(ErrorCode::AddressFull);
        }
        let id = loop {
            let id = PeerId(st.rng.next_u64());
            if !t.peers.contains_key(&id) {
                break id;
            }
        };
        let chosen = choose_neighbours(t, &mut st.rng, k, limits.quiet_after, network(group));
        let mut nonce = [0u8; 32];
        for c in nonce.chunks_mut(8) {
            c.copy_from_slice(&st.rng.next_u64().to_le_bytes());
        }
        t.ids.push(id);
        t.peers.insert(
            id,
            Peer {
                tx,
                neighbours: BTreeSet::new(),
                since: HashMap::new(),
                trained_at: None,
                slot: t.ids.len() - 1,
                report: None,
                group,
                joined: Instant::now(),
                joined_round: link_round(t),
                spoke: false,
                key: None,
                identified: false,
                site: site.into(),
                nonce,
                former: VecDeque::new(),
                identify_failures: 0,
                unreachable: 0,
                shed: Vec::new(),
                shed_by: Vec::new(),
                linked_groups: BTreeMap::new(),
                unreachable_from: BTreeMap::new(),
                receipt_tokens: 4.0 * k as f64,
                receipt_refilled: Instant::now(),
            },
        );
        for g in counted_groups(group) {
            *t.per_group.entry(g).or_default() += 1;
        }
        // Every newcomer hears the task's state, running or paused: a peer that was
        // paused before a server restart learns that it may train again.
        let paused = t.paused;
        notify(t, id, &ServerMessage::TaskState { paused }, &self.metrics);
        for &c in &chosen {
            link(t, id, c);
            notify(t, c, &ServerMessage::Joined { peer: id }, &self.metrics);
            send_neighbours(t, c, &self.metrics);
        }
        send_neighbours(t, id, &self.metrics);
        Ok((id, nonce))
    }

    /// `identify`: binds the key `key` proves to the connection `id`.
    fn identify(&self, task: &str, id: PeerId, key: &str, signature: &str) -> Result<(), String> {
        let parsed = shoal_shared::protocol::from_hex(key)
            .and_then(|k| PublicKey::try_from(k).ok())
            .ok_or("key: 64 hex digits")
            .and_then(|key| {
                shoal_shared::protocol::from_hex(signature)
                    .and_then(|s| <[u8; 64]>::try_from(s).ok())
                    .map(|sig| (key, sig))
                    .ok_or("signature: 128 hex digits")
            });
        let (nonce, key, sig) = {
            let mut st = self.lock();
            let p = st
                .tasks
                .get_mut(task)
                .and_then(|t| t.peers.get_mut(&id))
                .ok_or("not joined")?;
            if p.key.is_some() || p.identified {
                return Err("this connection identified already".into());
            }
            if p.identify_failures >= MAX_IDENTIFY_FAILURES {
                return Err(format!(
                    "{MAX_IDENTIFY_FAILURES} failed already; no more are checked on this connection"
                ));
            }
            // A malformed proof is a failed one.
            let (key, sig) = parsed.inspect_err(|_| p.identify_failures += 1)?;
            (p.nonce, key, sig)
        };
        // The signature is checked without holding the hub's lock.
        let msg = shoal_shared::protocol::identify_message(task, id, &nonce);
        let proven = verify(&key, &msg, &sig);
        let mut st = self.lock();
        let t = st.tasks.get_mut(task).ok_or("no such task")?;
        if !proven {
            if let Some(p) = t.peers.get_mut(&id) {
                p.identify_failures += 1;
            }
            return Err("the signature does not prove the key".into());
        }
        // A fresh proof takes the key over from an older connection (a peer that
        // reconnected while its old connection has not timed out yet): only the key's
        // holder can make one. The old connection's neighbours' receipts for the updates
        // it sent them still count.
        let held: Vec<PeerId> = t
            .peers
            .iter()
            .filter(|(_, q)| q.key == Some(key))
            .map(|(&q, _)| q)
            .collect();
        let now = Instant::now();
        let k = self.config.neighbours_for(task);
        let round = link_round(t);
        for old in held {
            let Some(q) = t.peers.get(&old) else { continue };
            let (links, site) = (identified_links(t, q, k), q.site.clone());
            let joined_round = q.joined_round;
            key_ended(t, key, (joined_round, round), links);
            let Some(q) = t.peers.get(&old) else { continue };
            let spans: Vec<(PeerId, Span)> = q
                .neighbours
                .iter()
                .map(|&n| (n, (q.linked_round(n), round)))
                .collect();
            for (n, span) in spans {
                remember(t, n, (now, key, site.clone(), links, span));
            }
            if let Some(q) = t.peers.get_mut(&old) {
                q.key = None;
            }
        }
        if let Some(p) = t.peers.get_mut(&id) {
            p.key = Some(key);
            p.identified = true;
        }
        t.key_owner.insert(key, id);
        Ok(())
    }

    /// Checks a `receipt` from the connection `id`: decoded, signed by the connection's
    /// key, for an update by a key on a linked connection. Returns it with the sender's
    /// site, for [`append_receipt`](Self::append_receipt).
    fn check_receipt(
        &self,
        task: &str,
        id: PeerId,
        hex: &str,
    ) -> Result<CheckedReceipt, (ReceiptOutcome, String)> {
        use ReceiptOutcome as O;
        // At most 2k receipts a second per connection, in bursts of 4k (an honest peer
        // signs one per neighbour per round): every one costs the server an fsync.
        {
            let k = self.config.neighbours_for(task) as f64;
            let mut st = self.lock();
            let p = st
                .tasks
                .get_mut(task)
                .and_then(|t| t.peers.get_mut(&id))
                .ok_or((O::NotYours, "not joined".into()))?;
            let now = Instant::now();
            let refill = now.duration_since(p.receipt_refilled).as_secs_f64() * 2.0 * k;
            p.receipt_tokens = (p.receipt_tokens + refill).min(4.0 * k);
            p.receipt_refilled = now;
            if p.receipt_tokens < 1.0 {
                return Err((
                    O::TooMany,
                    format!("more than {} receipts a second", 2.0 * k),
                ));
            }
            p.receipt_tokens -= 1.0;
        }
        let bytes = (hex.len() <= 2 * MAX_RECEIPT_BYTES)
            .then(|| shoal_shared::protocol::from_hex(hex))
            .flatten()
            .ok_or((O::Malformed, "not hex of a receipt's length".into()))?;
        // Its signature last: checked first, every connection joined could make the
        // server verify 2k signatures a second (receipts from keys it never identified
        // with, or while it trains nothing), each on the threads that relay signals.
        let r = Receipt::decode_unverified(&bytes).map_err(|e| match e {
            ReceiptError::Malformed(why) => (O::Malformed, why.to_string()),
            ReceiptError::BadSignature => (O::BadSignature, e.to_string()),
        })?;
        if r.task != task {
            return Err((O::Malformed, format!("a receipt for task {:?}", r.task)));
        }
        let mut st = self.lock();
        let t = st
            .tasks
            .get_mut(task)
            .ok_or((O::Malformed, "no such task".into()))?;
        // Only rounds near the swarm's: a round nobody else is in would let colluders set
        // the round's median claim (the credit cap) themselves. (The swarm's round is not
        // counted per receipt, see `Summary`: receipts come at up to 2k a second per
        // connection, and counting costs a pass over the task's peers.)
        let swarm = t.summary().round;
        let p = t.peers.get(&id).ok_or((O::NotYours, "not joined".into()))?;
        if p.key != Some(r.receiver) {
            return Err((
                O::NotYours,
                "its receiver is not the key this connection identified with".into(),
            ));
        }
        let swarm = swarm.ok_or((
            O::Implausible,
            "no peer of the task has reported its round yet".into(),
        ))?;
        if r.round + RECEIPT_ROUNDS_BEHIND < swarm || r.round > swarm + RECEIPT_ROUNDS_AHEAD {
            return Err((
                O::Implausible,
                format!("round {} is far from the swarm's ({swarm})", r.round),
            ));
        }
        // A receiver the sender's `links` would not count (it sent no report, or says it
        // observes or is paused) signs nothing: else colluders that never report lower a
        // sender's quorum and still make it.
        if !training_recently(p) {
            return Err((
                O::NotContributing,
                "this connection has not reported training (not paused) in the last 30 s".into(),
            ));
        }
        let now = Instant::now();
        let k = self.config.neighbours_for(task);
        // The sender now linked, and as a former neighbour (a pair linked again: a late
        // receipt for the earlier link's rounds still counts).
        let current = p
            .neighbours
            .iter()
            .filter_map(|n| Some((n, t.peers.get(n)?)))
            .find(|(_, q)| q.key == Some(r.sender))
            .map(|(n, q)| {
                let span = (p.linked_round(*n), None);
                (q.site.clone(), identified_links(t, q, k), span)
            });
        let former = p
            .former
            .iter()
            .find(|(at, k, ..)| *k == r.sender && now.duration_since(*at) < LINK_MEMORY)
            .map(|(_, _, site, links, span)| (site.clone(), *links, *span));
        if current.is_none() && former.is_none() {
            return Err((
                O::NotLinked,
                "its sender's key is on no connection linked to this one".into(),
            ));
        }
        // A link's stamp is the swarm's round as last counted; a stamp past the swarm's
        // round now (one trainer's report set it before any count) would have refused
        // every receipt on that link for its life.
        let (site, links, _) = current
            .into_iter()
            .chain(former)
            .find(|(_, _, (linked, unlinked))| {
                link_span_holds(r.round, (linked.map(|l| l.min(swarm)), *unlinked))
            })
            .ok_or_else(|| {
                (
                    O::NotLinked,
                    format!(
                        "round {} is not one its sender was linked to this connection in \
                         (from {RECEIPT_ROUNDS_AHEAD} rounds before the swarm's round when \
                         they were linked to {RECEIPT_ROUNDS_AHEAD} after it when unlinked)",
                        r.round
                    ),
                )
            })?;
        // The quorum counts the neighbours of every connection its sender held then.
        let all = sender_links(t, &r.sender, r.round, k, swarm, now);
        let links = links.max(u8::try_from(all).unwrap_or(u8::MAX));
        drop(st);
        if !r.verifies() {
            return Err((O::BadSignature, ReceiptError::BadSignature.to_string()));
        }
        Ok((bytes, r, site, links))
    }

    /// Appends a checked receipt to the task's ledger (a write and an `fsync`: call it
    /// off the async threads).
    fn append_receipt(
        &self,
        task: &str,
        bytes: &[u8],
        r: &Receipt,
        site: &str,
        links: u8,
    ) -> Result<(), (ReceiptOutcome, String)> {
        use ReceiptOutcome as O;
        let ledger = self.ledgers.get(task).ok_or((
            O::Unavailable,
            "this server keeps no ledger for the task".into(),
        ))?;
        let mut ledger = ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let max = self.config.ledger_max_entries;
        if ledger.count() >= max {
            return Err((
                O::Full,
                format!("the task's ledger is full ({max} entries); receipts are not recorded"),
            ));
        }
        if ledger
            .last_round(&r.sender, &r.receiver)
            .is_some_and(|last| r.round <= last)
        {
            return Err((
                O::Replay,
                format!("round {} is not above the last receipted one", r.round),
            ));
        }
        ledger.append(unix_ms(), links, site, bytes).map_err(|e| {
            tracing::error!("the ledger of {task:?}: {e}");
            (O::Unavailable, "the ledger could not be written".into())
        })?;
        if ledger.count() == max {
            tracing::warn!(
                "the ledger of {task:?} is full ({max} entries, --ledger-max-entries): \
                 further receipts are refused"
            );
        }
        Ok(())
    }

    /// The configuration the hub runs with.
    pub fn config(&self) -> &SignalingConfig {
        &self.config
    }

    /// Peers of `task` that reported in the last 30 s as training (not paused) and as
    /// observing: `(trainers, observers)` (see [`Summary`] for when it is counted).
    pub fn roles(&self, task: &str) -> (usize, usize) {
        let mut st = self.lock();
        st.tasks.get_mut(task).map_or((0, 0), |t| t.summary().roles)
    }

    /// The current pace of `task`: the median training throughput (samples per second)
    /// of the peers that reported as training in the last 30 s, one vote per network
    /// (see `median_over_networks`); `None` without any (see [`Summary`] for when it is
    /// counted).
    pub fn pace(&self, task: &str) -> Option<f64> {
        let mut st = self.lock();
        st.tasks.get_mut(task)?.summary().pace
    }

    /// Removes a peer, tells its neighbours, and gives each neighbour left with fewer
    /// than k a replacement. During shutdown nobody is told: the peers have not left,
    /// the server has, and their WebRTC connections carry on without it.
    fn leave(&self, task: &str, id: PeerId) {
        let k = self.config.neighbours_for(task);
        let quiet = *self.shutdown.borrow();
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(t) = st.tasks.get_mut(task) else {
            return;
        };
        let Some(gone) = t.remove(id) else { return };
        if quiet {
            return;
        }
        let now = Instant::now();
        let links = identified_links(t, &gone, k);
        let round = link_round(t);
        if let Some(key) = gone.key {
            if t.key_owner.get(&key) == Some(&id) {
                t.key_owner.remove(&key);
            }
            key_ended(t, key, (gone.joined_round, round), links);
        }
        for q in gone.neighbours.clone() {
            let Some(qp) = t.peers.get_mut(&q) else {
                continue;
            };
            qp.neighbours.remove(&id);
            qp.since.remove(&id);
            if let Some(key) = gone.key {
                let span = (gone.linked_round(q), round);
                remember(t, q, (now, key, gone.site.clone(), links, span));
            }
            notify(t, q, &ServerMessage::Left { peer: id }, &self.metrics);
            if t.peers[&q].neighbours.len() < k {
                relink(
                    t,
                    &mut st.rng,
                    q,
                    id,
                    k,
                    self.config.limits.quiet_after,
                    &self.metrics,
                );
            }
            send_neighbours(t, q, &self.metrics);
        }
    }

    /// Unlinks a pair that could not connect and gives each side a replacement (never
    /// each other).
    fn unreachable(&self, task: &str, from: PeerId, to: PeerId) -> Result<(), ErrorCode> {
        let k = self.config.neighbours_for(task);
        let mut guard = self.lock();
        let st = &mut *guard;
        let t = st.tasks.get_mut(task).ok_or(ErrorCode::UnknownTask)?;
        if !t
            .peers
            .get(&from)
            .is_some_and(|p| p.neighbours.contains(&to))
        {
            return Err(ErrorCode::NotNeighbour);
        }
        // A connection's first 2k reports unlink the pair and redraw a neighbour for it:
        // with more it could redraw until colluders are most of its neighbours. Later
        // ones only unlink (a peer must not stay full of dead links, which keeps
        // newcomers from its room), and what they unlink still counts among its
        // identified links (up to k): shedding honest neighbours until colluders are most
        // of those left does not lower its receipts' quorum.
        let quiet_after = self.config.limits.quiet_after;
        let Some(p) = t.peers.get(&from) else {
            return Err(ErrorCode::NotNeighbour);
        };
        let redraw = p.unreachable < 2 * k;
        // Each side keeps the other among its lost links (`Peer::shed`): a sender that
        // refuses WebRTC to its honest neighbours, until only colluders are left, keeps
        // its quorum too. Those that left count no more, nor those most networks cannot
        // reach, and are forgotten.
        let kept = |list: &[PeerId]| -> Vec<PeerId> {
            list.iter()
                .copied()
                .filter(|q| t.peers.get(q).is_some_and(|q| !q.unreachable_for_most()))
                .collect()
        };
        let mut from_shed = kept(&p.shed);
        if !redraw && from_shed.len() >= MAX_SHED && !from_shed.contains(&to) {
            return Err(ErrorCode::RateLimited);
        }
        let mut to_shed = t
            .peers
            .get(&to)
            .map(|q| kept(&q.shed_by))
            .unwrap_or_default();
        let record = |list: &mut Vec<PeerId>, id: PeerId| {
            if !list.contains(&id) && list.len() < MAX_SHED {
                list.push(id);
            }
        };
        record(&mut from_shed, to);
        record(&mut to_shed, from);
        if let Some(q) = t.peers.get_mut(&to) {
            q.shed_by = to_shed;
        }
        let Some(p) = t.peers.get_mut(&from) else {
            return Err(ErrorCode::NotNeighbour);
        };
        if redraw {
            p.unreachable += 1;
        }
        p.shed = from_shed;
        let from_group = network(p.group);
        let to_group = t.peers.get(&to).map_or(0, |q| network(q.group));
        // Each side's receipts for the other's last updates still count (`former`).
        let now = Instant::now();
        let round = link_round(t);
        // Each side as it was while linked (its key, site and identified links, and the
        // rounds of the link), before the pair is unlinked.
        let formers: Vec<(PeerId, Former)> = [(from, to), (to, from)]
            .into_iter()
            .filter_map(|(a, b)| {
                let bp = t.peers.get(&b)?;
                let span = (bp.linked_round(a), round);
                Some((
                    a,
                    (
                        now,
                        bp.key?,
                        bp.site.clone(),
                        identified_links(t, bp, k),
                        span,
                    ),
                ))
            })
            .collect();
        for (a, b) in [(from, to), (to, from)] {
            if let Some(p) = t.peers.get_mut(&a) {
                p.neighbours.remove(&b);
                p.since.remove(&b);
            }
        }
        for (a, former) in formers {
            remember(t, a, former);
        }
        // Only networks it is known to have been linked to count against it (the reports
        // can never outnumber them), and each network's reports only up to its allowance.
        if t.peers
            .get(&to)
            .is_some_and(|p| p.linked_groups.contains_key(&from_group))
            && take_vote(&mut t.votes, from_group, to_group)
        {
            // Its links still open count as made now, and so does the reporter's: a link
            // counts for VOTE_WINDOW from when it was last made, and a peer's long-open
            // links aged out while reports against it were new.
            let current: Vec<u128> = t.peers.get(&to).map_or_else(Vec::new, |p| {
                p.neighbours
                    .iter()
                    .filter_map(|q| t.peers.get(q).map(|q| network(q.group)))
                    .collect()
            });
            if let Some(p) = t.peers.get_mut(&to) {
                for g in current.into_iter().chain([from_group]) {
                    keep_recent(&mut p.linked_groups, g);
                }
                keep_recent(&mut p.unreachable_from, from_group);
            }
        }
        for (q, avoid) in [(from, to), (to, from)] {
            // The reported side is given a replacement only while most networks reach
            // it; the reporter, for its first 2k reports.
            let wanted = |p: &Peer| {
                p.neighbours.len() < k
                    && if q == from {
                        redraw
                    } else {
                        p.drawable(quiet_after)
                    }
            };
            if t.peers.get(&q).is_some_and(wanted) {
                relink(
                    t,
                    &mut st.rng,
                    q,
                    avoid,
                    k,
                    self.config.limits.quiet_after,
                    &self.metrics,
                );
            }
            send_neighbours(t, q, &self.metrics);
        }
        Ok(())
    }

    /// Relays a signal between neighbours.
    fn relay(&self, task: &str, from: PeerId, to: PeerId, signal: &str) -> Result<(), ErrorCode> {
        // `signal` is validated JSON (`decode_signal`), forwarded as the sender wrote it.
        use std::fmt::Write;
        let mut text = String::with_capacity(signal.len() + 64);
        let _ = write!(
            text,
            r#"{{"type":"signal","from":"{from}","signal":{signal}}}"#
        );
        let st = self.lock();
        let t = st.tasks.get(task).ok_or(ErrorCode::UnknownTask)?;
        let introduced = t
            .peers
            .get(&from)
            .is_some_and(|p| p.neighbours.contains(&to));
        if !introduced {
            return Err(ErrorCode::NotNeighbour);
        }
        let target = t.peers.get(&to).ok_or(ErrorCode::NotNeighbour)?;
        match target.tx.push_from(text, Some(from)) {
            Ok(()) => {
                self.metrics.relayed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// A web origin (RFC 6454): scheme, host and port, compared after lowercasing and
/// filling in the scheme's default port.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses `scheme://host[:port]` (an `Origin` header or an allowlist entry); `None`
    /// for anything else, `null` included.
    fn parse(text: &str) -> Option<Self> {
        let (scheme, rest) = text.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6.split_once(']')?;
            let port = match after {
                "" => default,
                p => p.strip_prefix(':')?.parse().ok()?,
            };
            (format!("[{addr}]"), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (rest.to_string(), default),
            }
        };
        let ok = !host.is_empty()
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
            });
        ok.then(|| Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether no DNS answer can make this host name another address: an IP literal,
    /// or `localhost` (which browsers resolve to loopback themselves).
    fn host_cannot_rebind(&self) -> bool {
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok() || self.host == "localhost"
    }
}

/// Up to `k` random neighbours for a newcomer to `t`: peers with room (fewer than 2k
/// neighbours) that are live (they have sent something, or joined less than
/// `quiet_after` ago). First at most a third of `k` from any one [`network`], so
/// that one client with many peers cannot surround a newcomer; then, if slots are left
/// (few addresses in the task), from any.
fn choose_neighbours(
    t: &Task,
    rng: &mut Draws,
    k: usize,
    quiet_after: Duration,
    own: u128,
) -> BTreeSet<PeerId> {
    let mut chosen = BTreeSet::new();
    if t.ids.is_empty() {
        return chosen;
    }
    let per_group_cap = per_network_cap(k);
    let mut per_group: HashMap<u128, usize> = HashMap::new();
    // First one peer per network, each network as likely as any other however many
    // peers it has (a draw is kept with odds one in its peer count); then up to a third
    // of k per network; then, filling ([`full_of`]), any. Many peers from a few
    // addresses then take about their networks' share of a newcomer's neighbours, not
    // their peers' share, and colluders need k networks, not three, to fill them while
    // others have room. Capped draws are many (a few peers of other addresses among a
    // crowd must not be missed by chance); the fill draws are the usual few. (Filled by
    // network first, one honest network among three of peers that never connect was
    // drawn for a quarter of the fill draws, and its peers ran out of reports.)
    let k1 = k.max(1);
    for (pass, draws) in [(0, 64 * k1), (1, 32 * k1), (2, 8 * k1)] {
        let cap = [Some(1), Some(per_group_cap), None][pass];
        for _ in 0..draws {
            if chosen.len() >= k {
                return chosen;
            }
            let cand = t.ids[rng.below(t.ids.len())];
            let p = &t.peers[&cand];
            let room = p.neighbours.len() < 2 * k;
            let net = network(p.group);
            let crowded = cap.is_some_and(|c| per_group.get(&net).is_some_and(|&n| n >= c));
            let kept = pass > 0 || network_draw(t, rng, net);
            if kept
                && p.drawable(quiet_after)
                && room
                && !crowded
                && !full_of(t, p, own, per_group_cap, pass >= 2)
                && chosen.insert(cand)
            {
                *per_group.entry(net).or_default() += 1;
            }
        }
    }
    chosen
}

/// The most neighbours of one network a newcomer is given while others have room, and a
/// peer takes while it has others ([`full_of`]): a third of `k`, at least one.
fn per_network_cap(k: usize) -> usize {
    (k / 3).max(1)
}

/// Whether `p` already holds `cap` neighbours of network `own` and some of another: it
/// takes no more of `own`. One address joining again and again, keeping the peers
/// linked to a peer and leaving with the rest, filled half of a dashboard's 2k places
/// (its draws of three to ask then held two colluders half the time, and it showed and
/// exported their model) and could fill a trainer's up to its aggregation's breaking
/// point. A training peer (any but a dashboard, by its last report) is not held to it in
/// the draws that fill what the others left (`filling`): held to it in every draw, one
/// address that took every other network's peers' share of its own left that
/// network's honest newcomers (a carrier's NAT, an IPv6 /48 they share with it) nothing
/// but its peers and their own network's, and lone peers among a few crowded networks
/// stayed short of neighbours. A dashboard is held to it in every draw. Neither is when
/// every neighbour it has is of `own` (a swarm behind one address).
fn full_of(t: &Task, p: &Peer, own: u128, cap: usize, filling: bool) -> bool {
    let observer = p
        .report
        .as_deref()
        .is_some_and(|(_, r)| r.role == shoal_shared::protocol::Role::Observer);
    if !observer && filling {
        return false;
    }
    let nets = p
        .neighbours
        .iter()
        .filter_map(|n| t.peers.get(n))
        .map(|q| network(q.group));
    let (same, other) = nets.fold(
        (0, 0),
        |(s, o), n| if n == own { (s + 1, o) } else { (s, o + 1) },
    );
    same >= cap && other > 0
}

/// The address group a peer connects from, for the per-address caps: its IPv4 address,
/// or the /64 prefix of its IPv6 address (one subscriber's network). Where many peers
/// weigh as one (the swarm's round, neighbour draws), a /48: [`network`].
pub(crate) fn address_group(ip: std::net::IpAddr) -> u128 {
    match ip {
        std::net::IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(a) & !((1u128 << 64) - 1),
        },
    }
}

/// How many times an address's share (peers in a task, TCP connections) one IPv6 /48 may
/// hold in all: a /48 is 65,536 /64s, each of which counts as an address, and tunnel
/// brokers hand them out free (a /55 filled a task of 10,000 peers at 32 per /64).
pub const WIDE_SHARES: usize = 4;

/// The IPv6 /48 that the [`address_group`] `group` is in, as a key of its own (its lowest
/// bit set, which no /64 group has); `None` for IPv4 (an address is already scarce; its
/// group's low 64 bits are the mapped address) and for the one group of a router served
/// without addresses (0).
pub(crate) fn wide_group(group: u128) -> Option<u128> {
    let v6 = group != 0 && group & ((1u128 << 64) - 1) == 0;
    v6.then_some((group & !((1u128 << 80) - 1)) | 1)
}

/// How many addresses' join allowance the key `key` of the join buckets has: an IPv6
/// /48's ([`wide_group`]: its low 80 bits are 1, which no /64 and no IPv4-mapped address
/// has) [`WIDE_SHARES`], an address's 1.
fn join_scale(key: u128) -> f64 {
    if key & ((1u128 << 80) - 1) == 1 {
        WIDE_SHARES as f64
    } else {
        1.0
    }
}

/// The keys a peer of `group` counts under in a task's `per_group`: its own, and its
/// IPv6 /48's (`wide_group`).
fn counted_groups(group: u128) -> impl Iterator<Item = u128> {
    std::iter::once(group).chain(wide_group(group))
}

/// Takes `group`'s place among at most `share` (0: no share) and, for IPv6, its /48's
/// among at most [`WIDE_SHARES`] times that; `None` if either is full.
pub(crate) fn take_shares(
    counts: &AddressCounts,
    group: u128,
    share: usize,
) -> Option<(AddressShare, Option<AddressShare>)> {
    take_shares_of(counts, group, share, share.saturating_mul(WIDE_SHARES))
}

/// Takes `group`'s place among at most `share` and, for IPv6, its /48's among at most
/// `wide` (0: no share); `None` if either is full.
pub(crate) fn take_shares_of(
    counts: &AddressCounts,
    group: u128,
    share: usize,
    wide: usize,
) -> Option<(AddressShare, Option<AddressShare>)> {
    let own = AddressShare::take(counts, group, share)?;
    let wide = match wide_group(group) {
        Some(w) => Some(AddressShare::take(counts, w, wide)?),
        None => None,
    };
    Some((own, wide))
}

/// Something held per [`address_group`] (connections, downloads): how many each group
/// holds now (groups at zero are removed).
pub(crate) type AddressCounts = Arc<Mutex<HashMap<u128, usize>>>;

/// One group's place in an [`AddressCounts`], given back when dropped.
pub(crate) struct AddressShare {
    counts: AddressCounts,
    group: u128,
}

impl AddressShare {
    /// Takes one of `group`'s `share` places, if one is free (0: no share, always).
    pub(crate) fn take(counts: &AddressCounts, group: u128, share: usize) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = c.entry(group).or_insert(0);
        if share > 0 && *n >= share {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: Arc::clone(counts),
            group,
        })
    }
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = c.get_mut(&self.group) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.group);
            }
        }
    }
}

/// The [`address_group`] a request came from. Without the address (a router served by
/// something other than `serve`), every request is in one group.
pub(crate) fn request_group(extensions: &axum::http::Extensions) -> u128 {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(0, |c| address_group(c.0.ip()))
}

/// The network of a peer of [`address_group`] `group`, where many peers weigh as one (the
/// swarm's round and pace, neighbour draws, `unreachable` reports): its IPv4 address, or
/// its IPv6 /48 (under its [`wide_group`] key). A /48's 65,536 /64s are each an address
/// for the caps on peers and connections (which its /48 shares then bound), but counted
/// as networks they were 128 votes for the price of one free tunnel-broker prefix.
fn network(group: u128) -> u128 {
    wide_group(group).unwrap_or(group)
}

/// Whether a peer of `net` (a [`network`]), drawn uniformly among all peers, is kept:
/// with odds one in its network's peer count, so that each network is as likely as any
/// other however many peers it has.
fn network_draw(t: &Task, rng: &mut Draws, net: u128) -> bool {
    let peers_of_group = t.per_group.get(&net).copied().unwrap_or(1).max(1);
    rng.below(peers_of_group) == 0
}

/// Links `q` to one random peer other than itself and `avoid` that is not yet its
/// neighbour and has room (fewer than 2k), if one is found in a few draws: first each
/// network as likely as any other, however many peers it has (as a newcomer's first
/// neighbours, [`choose_neighbours`]), then any peer. Drawn by peer, one address's 32
/// peers among 40 lone honest ones were nearly half of every redraw: a sender that
/// spent its redraws surrounded itself with its colluders, who then made its receipts'
/// quorum.
fn relink(
    t: &mut Task,
    rng: &mut Draws,
    q: PeerId,
    avoid: PeerId,
    k: usize,
    quiet_after: Duration,
    metrics: &Metrics,
) {
    let k1 = k.max(1);
    let Some(qp) = t.peers.get(&q) else {
        return;
    };
    let q_net = network(qp.group);
    for (by_network, draws) in [(true, 32 * k1), (false, 8 * k1)] {
        for _ in 0..draws {
            let r = t.ids[rng.below(t.ids.len())];
            let rp = &t.peers[&r];
            if by_network && !network_draw(t, rng, network(rp.group)) {
                continue;
            }
            if r != q
                && r != avoid
                && rp.drawable(quiet_after)
                && !rp.neighbours.contains(&q)
                && rp.neighbours.len() < 2 * k
                // (Held to it, trainers' replacement draws drew more of the peers
                // that never connect, whose reports then ran out.)
                && !full_of(t, rp, q_net, per_network_cap(k), true)
                // A dashboard redrawn is held to it too: each neighbour it lost was
                // replaced by a network-uniform draw, so one address's peers that stayed
                // while honest ones came and went filled it up to k.
                && !full_of(t, qp, network(rp.group), per_network_cap(k), true)
            {
                link(t, q, r);
                notify(t, r, &ServerMessage::Joined { peer: q }, metrics);
                send_neighbours(t, r, metrics);
                return;
            }
        }
    }
}

fn link(t: &mut Task, a: PeerId, b: PeerId) {
    let round = link_round(t);
    let group = |id| t.peers.get(&id).map(|p: &Peer| network(p.group));
    let (ga, gb) = (group(a), group(b));
    for (p, q, gq) in [(a, b, gb), (b, a, ga)] {
        if let Some(p) = t.peers.get_mut(&p) {
            p.neighbours.insert(q);
            p.since.insert(q, round);
            if let Some(g) = gq {
                keep_recent(&mut p.linked_groups, g);
            }
        }
    }
}

/// Notes `network` in `kept` as of now, unless it is full ([`MAX_GROUPS_KEPT`]) of
/// networks noted within [`VOTE_WINDOW`] (older ones make room).
fn keep_recent(kept: &mut BTreeMap<u128, Instant>, network: u128) {
    if kept.len() >= MAX_GROUPS_KEPT && !kept.contains_key(&network) {
        kept.retain(|_, at| at.elapsed() < VOTE_WINDOW);
        if kept.len() >= MAX_GROUPS_KEPT {
            return;
        }
    }
    kept.insert(network, Instant::now());
}

/// Whether a report of network `voter` against a peer of network `target` counts: it
/// does while `voter` counted reports against at most [`VOTED_NETWORKS`] networks in the
/// last [`VOTE_WINDOW`], `target` among them (or [`MAX_VOTERS`] other networks are
/// tracked).
fn take_vote(
    votes: &mut HashMap<u128, VecDeque<(Instant, u128)>>,
    voter: u128,
    target: u128,
) -> bool {
    let fresh = |q: &mut VecDeque<(Instant, u128)>| {
        while q.front().is_some_and(|(at, _)| at.elapsed() >= VOTE_WINDOW) {
            q.pop_front();
        }
    };
    if votes.len() >= MAX_VOTERS && !votes.contains_key(&voter) {
        votes.retain(|_, q| {
            fresh(q);
            !q.is_empty()
        });
        if votes.len() >= MAX_VOTERS {
            return false;
        }
    }
    let q = votes.entry(voter).or_default();
    fresh(q);
    if q.iter().any(|&(_, g)| g == target) {
        return true;
    }
    if q.len() >= VOTED_NETWORKS {
        return false;
    }
    q.push_back((Instant::now(), target));
    true
}

/// Keeps a former neighbour of `holder` (its key, site and identified links) for
/// [`LINK_MEMORY`]: receipts for its last updates still count.
fn remember(t: &mut Task, holder: PeerId, former: Former) {
    if let Some(p) = t.peers.get_mut(&holder) {
        let now = former.0;
        // One entry per key (the newest): a key moved between connections again and
        // again must not push other former neighbours out.
        p.former
            .retain(|(at, key, ..)| now.duration_since(*at) < LINK_MEMORY && *key != former.1);
        if p.former.len() >= MAX_FORMER {
            p.former.pop_front();
        }
        p.former.push_back(former);
    }
}

fn notify(t: &Task, to: PeerId, m: &ServerMessage, metrics: &Metrics) {
    if let Some(p) = t.peers.get(&to)
        && p.tx.push(encode(m)).is_err()
    {
        metrics.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

fn send_neighbours(t: &Task, to: PeerId, metrics: &Metrics) {
    if let Some(p) = t.peers.get(&to) {
        let m = ServerMessage::Neighbours {
            peers: p.neighbours.iter().copied().collect(),
        };
        notify(t, to, &m, metrics);
    }
}

/// The websocket endpoint's query string, as pairs: `v` (the protocol version the client
/// speaks; one that is not a number is no version the server speaks) and `site` (the site
/// the peer contributes from; one that is not a lowercase host name is recorded as none).
/// The first of a repeated name counts; other names are ignored.
type WsQuery = Vec<(String, String)>;

/// `GET /ws/{task}?v=2`: checks the origin, then upgrades with small buffers.
pub async fn ws_handler(
    State(hub): State<Arc<Hub>>,
    Path(task): Path<String>,
    Query(q): Query<WsQuery>,
    request: Request,
) -> Response {
    let (mut parts, _) = request.into_parts();
    let group = request_group(&parts.extensions);
    if !hub.origin_allowed(&parts.headers) {
        hub.metrics.reject(ErrorCode::ForbiddenOrigin);
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let limits = &hub.config.limits;
    // Frames past this hard cap fail in the codec without being buffered; between the
    // soft limit and the cap the peer gets a typed `too_large` error first.
    let hard_cap = hard_cap(limits);
    // tungstenite writes each frame at once; `upgrade::Buffered` collects them until the
    // flush that ends a burst (`send_queued`), so a burst leaves in few system calls.
    let config = WebSocketConfig::default()
        .read_buffer_size(limits.read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(hard_cap))
        .max_frame_size(Some(hard_cap));
    let (response, pending) = match upgrade::accept(&mut parts) {
        Ok(accepted) => accepted,
        Err(refusal) => {
            hub.metrics.reject(ErrorCode::Malformed);
            return refusal.into_response();
        }
    };
    // Only a request that would become a websocket takes one of its address's joins.
    if !hub.may_connect(group) {
        hub.metrics.reject(ErrorCode::RateLimited);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "5")],
            "too many new connections from your address\n",
        )
            .into_response();
    }
    let hub2 = Arc::clone(&hub);
    // The upgrade is boxed and awaited inside the connection's task, so that the socket
    // lives in that task's state once (not also as a value handed between two futures).
    let upgrading: Cold<'static, Option<Socket>> =
        Box::pin(upgrade::socket(pending, config, read_cap(limits)));
    let first = |name: &str| q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let version = first("v").map(|v| v.parse::<u32>().unwrap_or(0));
    let site = first("site")
        .filter(|s| shoal_shared::trust::ledger::valid_site(s))
        .unwrap_or_default()
        .to_string();
    let revision = first("revision").map(str::to_string);
    let join = Join {
        task,
        version,
        revision,
        group,
        site,
    };
    tokio::spawn(connection(hub2, upgrading, join));
    response
}

/// Decrements the connection count when the connection ends, however it ends.
struct ConnectionSlot<'a>(&'a AtomicUsize);

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn send(socket: &mut Socket, hub: &Hub, text: String) -> bool {
    hub.metrics
        .bytes_out
        .fetch_add(text.len() as u64, Ordering::Relaxed);
    write(
        socket,
        hub.config.limits.write_timeout,
        Message::Text(text.into()),
    )
    .await
}

/// Writes and flushes `message`, giving up after `within`: a peer that stops reading
/// must not hold its connection, and the task serving it, forever.
async fn write(socket: &mut Socket, within: Duration, message: Message) -> bool {
    tokio::time::timeout(within, socket.send(message))
        .await
        .is_ok_and(|sent| sent.is_ok())
}

/// Bytes one batch of queued messages carries before its flush.
const BATCH_BYTES: usize = 128 << 10;
/// The most bytes tungstenite may hold for one connection waiting to be written: a batch,
/// its last message, and the one pong it keeps (a peer that pings without reading gets
/// its pongs replaced, not queued).
const MAX_WRITE_BUFFER: usize = 256 << 10;

/// Writes `first` and whatever else is already queued for this peer, then flushes once:
/// under load one write system call carries many messages.
async fn send_queued(socket: &mut Socket, hub: &Hub, first: String, outbox: &Outbox) -> bool {
    // Bounded like `write`: a peer that stops reading is dropped after the write timeout.
    tokio::time::timeout(
        hub.config.limits.write_timeout,
        write_queued(socket, hub, first, outbox),
    )
    .await
    .unwrap_or(false)
}

async fn write_queued(socket: &mut Socket, hub: &Hub, first: String, outbox: &Outbox) -> bool {
    let mut bytes = 0;
    let mut next = Some(first);
    for _ in 0..64 {
        if bytes >= BATCH_BYTES {
            break;
        }
        let Some(text) = next.take().or_else(|| outbox.pop()) else {
            break;
        };
        bytes += text.len();
        if socket.feed(Message::Text(text.into())).await.is_err() {
            return false;
        }
    }
    hub.metrics
        .bytes_out
        .fetch_add(bytes as u64, Ordering::Relaxed);
    if !outbox.lock().is_empty() {
        // More came than one batch takes: come back for it after this flush.
        outbox.ready.notify_one();
    }
    socket.flush().await.is_ok()
}

/// A future on the heap. The paths that use it are cold (errors, the greeting, the
/// goodbye); boxing them keeps their state out of every idle connection's task.
type Cold<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

fn refuse<'a>(
    socket: &'a mut Socket,
    hub: &'a Hub,
    code: ErrorCode,
    message: String,
) -> Cold<'a, bool> {
    Box::pin(async move {
        hub.metrics.reject(code);
        send(socket, hub, encode(&ServerMessage::Error { code, message })).await
    })
}

fn close(
    mut socket: Socket,
    within: Duration,
    code: u16,
    reason: &'static str,
) -> Cold<'static, ()> {
    Box::pin(async move {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        if !write(&mut socket, within, Message::Close(Some(frame))).await {
            return;
        }
        // Reads on (and discards) until the peer's close answers ours, for at most
        // `LINGER`: a socket closed with bytes unread — a flooder's — is reset by the
        // kernel, and the peer would lose what was just sent, the close frame included.
        let _ = tokio::time::timeout(LINGER.min(within), async {
            while let Some(Ok(m)) = socket.next().await {
                if let Message::Close(_) = m {
                    return;
                }
            }
        })
        .await;
    })
}

/// How long a closing connection reads on for the peer's close.
const LINGER: Duration = Duration::from_secs(2);

/// What a websocket request asked to join with: the task, the protocol version, the
/// task's revision the client loaded (`revision`, if it named one), its address group
/// and the site it contributes from.
struct Join {
    task: String,
    version: Option<u32>,
    revision: Option<String>,
    group: u128,
    site: String,
}

async fn connection(hub: Arc<Hub>, upgrading: Cold<'static, Option<Socket>>, join: Join) {
    let Join {
        task,
        version,
        revision,
        group,
        site,
    } = join;
    let Some(mut socket) = upgrading.await else {
        return;
    };
    hub.metrics
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let open = hub.connections.fetch_add(1, Ordering::Relaxed) + 1;
    // Held while the peer is served; given back before the closing handshake, which may
    // read on for a while (`LINGER`) after the peer is gone from the swarm.
    let slot = ConnectionSlot(&hub.connections);
    let limits = &hub.config.limits;
    if open > limits.max_connections {
        refuse(
            &mut socket,
            &hub,
            ErrorCode::ServerFull,
            "server is at its connection limit".into(),
        )
        .await;
        drop(slot);
        return close(socket, limits.write_timeout, 1013, "server full").await;
    }
    if version != Some(VERSION) {
        let msg =
            format!("this server speaks protocol version {VERSION}; connect with ?v={VERSION}");
        refuse(&mut socket, &hub, ErrorCode::BadVersion, msg).await;
        drop(slot);
        return close(socket, limits.write_timeout, 1002, "bad version").await;
    }
    // A client that loaded the task before it (or its data) changed must not train on
    // with the old one among peers of the new: under other privacy settings its updates
    // would enter a swarm whose model says every update was noised.
    if let (Some(asked), Some(runs)) = (&revision, hub.revision_of(&task))
        && asked != runs
    {
        let msg = format!(
            "task {task:?} changed since this client loaded it (revision {asked}, now {runs}): \
             load it again"
        );
        refuse(&mut socket, &hub, ErrorCode::TaskChanged, msg).await;
        drop(slot);
        return close(socket, limits.write_timeout, 1008, "task changed").await;
    }
    let outbox = Arc::new(Outbox::new(limits.queue));
    let (id, nonce) = match hub.join(&task, Arc::clone(&outbox), group, &site) {
        Ok(joined) => joined,
        Err(code) => {
            refuse(
                &mut socket,
                &hub,
                code,
                format!("cannot join task {task:?}"),
            )
            .await;
            drop(slot);
            return close(socket, limits.write_timeout, 1008, "refused").await;
        }
    };
    let welcome = encode(&ServerMessage::Welcome {
        version: VERSION,
        peer: id,
        task: task.clone(),
        ice_servers: hub.config.ice.servers_for(
            network(group),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        max_message_bytes: limits.max_message_bytes,
        nonce: shoal_shared::learn::identity::hex(&nonce),
    });
    let mut shutdown = hub.shutdown.subscribe();
    let ok = Box::pin(send(&mut socket, &hub, welcome)).await;
    let mut tokens = limits.burst;
    let mut refilled = Instant::now();
    let mut strikes = 0u32;
    let mut last_seen = Instant::now();
    // Bytes of frames read since the last data message, and what the messages since
    // allow (see `frame_bytes`).
    let (mut owed, mut allowed) = (0usize, 0usize);
    let partial_most = read_cap(limits);
    let mut spoke = false;
    // This connection's checked receipts, appended in order by a task of their own
    // (started with the first).
    let mut receipts: Option<tokio::sync::mpsc::Sender<CheckedReceipt>> = None;
    let mut links = LinkBudgets {
        // Two of the largest messages fit, whatever the operator set.
        full: limits
            .link_signal_bytes
            .max(2.0 * limits.max_message_bytes as f64),
        links: HashMap::new(),
    };
    let mut ping = tokio::time::interval(limits.ping_interval);
    ping.tick().await;
    // Waiting for shutdown and for queued messages are kept across iterations: only the
    // one that fired is renewed, so a busy connection does not re-register every waiter
    // on every message.
    let stopping = shutdown.changed();
    tokio::pin!(stopping);
    let queued = outbox.ready.notified();
    tokio::pin!(queued);
    let reason = if !ok {
        Disconnect::SendFailed
    } else {
        loop {
            tokio::select! {
                _ = &mut stopping => break Disconnect::Shutdown,
                () = &mut queued => {
                    queued.set(outbox.ready.notified());
                    let first = outbox.pop();
                    if let Some(text) = first
                        && !Box::pin(send_queued(&mut socket, &hub, text, &outbox)).await
                    {
                        break Disconnect::SendFailed;
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > limits.idle_timeout {
                        break Disconnect::IdleTimeout;
                    }
                    if !Box::pin(write(&mut socket, limits.write_timeout, Message::Ping(Vec::new().into()))).await {
                        break Disconnect::SendFailed;
                    }
                }
                msg = socket.next() => {
                    let now = Instant::now();
                    last_seen = now;
                    let msg = match msg {
                        Some(Ok(Message::Close(_))) => break Disconnect::Bye,
                        Some(Ok(m)) => m,
                        Some(Err(e)) => break broken(&hub, &e),
                        None => break Disconnect::Gone,
                    };
                    // A message's frames take its bytes and little more: empty
                    // continuation frames, joined into one message without a word, cost
                    // no token, and a pong now and then kept the read cap from ending
                    // them (a core kept busy at the sender's line rate). A ping or pong
                    // may come between the fragments of a message (RFC 6455, 5.4): it
                    // allows its own bytes, and the fragments before it may be up to a
                    // whole message's.
                    owed = owed.saturating_add(socket.get_mut().take_read());
                    let data = matches!(msg, Message::Text(_) | Message::Binary(_));
                    let own = if data {
                        frame_bytes(msg.len(), limits.read_buffer)
                    } else {
                        msg.len() + MAX_FRAME_HEAD
                    };
                    allowed = allowed.saturating_add(own);
                    if owed > allowed.saturating_add(if data { 0 } else { partial_most }) {
                        hub.metrics.reject(ErrorCode::RateLimited);
                        break Disconnect::RateLimit;
                    }
                    if data {
                        (owed, allowed) = (0, 0);
                    }
                    // Every frame costs a token, pings and pongs too: a peer that pings
                    // without reading would otherwise pile up pongs at no cost to itself.
                    tokens = (tokens + now.duration_since(refilled).as_secs_f64() * limits.rate_per_sec).min(limits.burst);
                    refilled = now;
                    if tokens < 1.0 {
                        strikes += 1;
                        if strikes >= limits.strikes {
                            hub.metrics.reject(ErrorCode::RateLimited);
                            break Disconnect::RateLimit;
                        }
                        if !refuse(&mut socket, &hub, ErrorCode::RateLimited, format!("more than {} messages per second", limits.rate_per_sec)).await {
                            break Disconnect::SendFailed;
                        }
                        continue;
                    }
                    tokens -= 1.0;
                    // Any message over the limit, text or binary, closes the connection.
                    let size = match &msg {
                        Message::Text(t) => t.len(),
                        Message::Binary(b) => b.len(),
                        _ => 0,
                    };
                    if size > limits.max_message_bytes {
                        if matches!(msg, Message::Text(_)) {
                            hub.metrics.bytes_in.fetch_add(size as u64, Ordering::Relaxed);
                        }
                        let msg = format!("{size} bytes; the limit is {}", limits.max_message_bytes);
                        refuse(&mut socket, &hub, ErrorCode::TooLarge, msg).await;
                        break Disconnect::TooLarge;
                    }
                    let text = match msg {
                        Message::Text(t) => t,
                        Message::Binary(_) => {
                            refuse(&mut socket, &hub, ErrorCode::Binary, "binary frames are not part of the protocol".into()).await;
                            continue;
                        }
                        // Pings (answered by the codec) and pongs.
                        _ => continue,
                    };
                    hub.metrics.bytes_in.fetch_add(text.len() as u64, Ordering::Relaxed);
                    let not_neighbour = |to: PeerId| move |c| (c, format!("{to} is not your neighbour"));
                    // A signal to `to` (`signal` as relayed), within its link's budget.
                    let mut relay = |to: PeerId, signal: &str| {
                        if links.take(to, text.len(), now) {
                            hub.relay(&task, id, to, signal).map_err(not_neighbour(to))
                        } else {
                            Err((ErrorCode::RateLimited, format!(
                                "signals to {to}: more than {} bytes in {} s", links.full, LINK_REFILL.as_secs())))
                        }
                    };
                    if let Some(s) = decode_signal(&text) {
                        match relay(s.to, s.signal) {
                            Err(e) => {
                                refuse(&mut socket, &hub, e.0, e.1).await;
                            }
                            Ok(()) if !spoke => {
                                spoke = true;
                                hub.spoke(&task, id);
                            }
                            Ok(()) => {}
                        }
                        continue;
                    }
                    let outcome = match decode_client(&text) {
                        Ok(ClientMessage::Signal { to, signal }) => {
                            // decode_signal takes every valid signal (a test checks);
                            // should one slip past it, relay the re-encoded form.
                            let raw = serde_json::to_string(&signal).unwrap_or_default();
                            relay(to, &raw)
                        }
                        Ok(ClientMessage::Unreachable { peer }) => {
                            hub.unreachable(&task, id, peer).map_err(|c| match c {
                                ErrorCode::RateLimited => (c, format!(
                                    "{} unreachable reports per connection redraw a neighbour; past them a \
                                     report unlinks only while fewer than {MAX_SHED} links its own reports lost \
                                     are still connected",
                                    2 * hub.config.neighbours_for(&task)
                                )),
                                c => not_neighbour(peer)(c),
                            })
                        }
                        Ok(ClientMessage::Report { report }) => hub
                            .store_report(&task, id, report)
                            .map_err(|e| (ErrorCode::Malformed, format!("report: {e}"))),
                        Ok(ClientMessage::Identify { key, signature }) => hub
                            .identify(&task, id, &key, &signature)
                            .map_err(|e| (ErrorCode::BadIdentity, format!("identify: {e}"))),
                        Ok(ClientMessage::Receipt { receipt }) => {
                            // Checked here, in order with the connection's other
                            // messages; appended by the connection's receipt task.
                            let checked = hub.check_receipt(&task, id, &receipt).and_then(|c| {
                                let queue = receipts.get_or_insert_with(|| {
                                    let (tx, rx) = tokio::sync::mpsc::channel(RECEIPTS_WAITING);
                                    tokio::spawn(append_receipts(Arc::clone(&hub), task.clone(), rx, Arc::clone(&outbox)));
                                    tx
                                });
                                queue.try_send(c).map_err(|_| (ReceiptOutcome::Unavailable, format!(
                                    "{RECEIPTS_WAITING} receipts of this connection wait for the ledger already; this one was not recorded")))
                            });
                            checked.map_err(|(why, detail)| refused_receipt(&hub, why, &detail))
                        }
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Err((code, message)) => {
                            refuse(&mut socket, &hub, code, message).await;
                        }
                        Ok(()) if !spoke => {
                            spoke = true;
                            hub.spoke(&task, id);
                        }
                        Ok(()) => {}
                    }
                }
            }
        }
    };
    hub.leave(&task, id);
    hub.metrics.disconnected(reason);
    tracing::debug!(task, peer = %id, reason = reason.label(), "peer disconnected");
    drop(slot);
    if reason == Disconnect::Bye {
        // The peer closed first: its close is answered (tungstenite queued the reply, the
        // peer's code echoed, when it read it; RFC 6455, section 5.5.1). tungstenite hands
        // a server's last frame to the stream without flushing it, so the write buffer
        // is flushed here, or the reply would be dropped with it.
        let _ = tokio::time::timeout(limits.write_timeout, async {
            let _ = SinkExt::close(&mut socket).await;
            tokio::io::AsyncWriteExt::flush(socket.get_mut()).await
        })
        .await;
    } else if let Some((code, text)) = reason.close_frame() {
        close(socket, limits.write_timeout, code, text).await;
    }
}

/// A refused receipt, counted under `why`: the error its sender gets.
fn refused_receipt(hub: &Hub, why: ReceiptOutcome, detail: &str) -> (ErrorCode, String) {
    hub.metrics.receipt(why);
    (ErrorCode::BadReceipt, format!("{}: {detail}", why.label()))
}

/// Appends a connection's checked receipts (`queue`) in order, each once one of the
/// server's [`RECEIPTS_AT_ONCE`] slots is free (the write and its `fsync` on a blocking
/// thread), and counts the outcome; a refusal goes to the connection's `outbox`. A
/// receipt checked before its connection closed is still appended.
async fn append_receipts(
    hub: Arc<Hub>,
    task: String,
    mut queue: tokio::sync::mpsc::Receiver<CheckedReceipt>,
    outbox: Arc<Outbox>,
) {
    while let Some((bytes, r, site, links)) = queue.recv().await {
        let Ok(_slot) = Arc::clone(&hub.receipt_slots).acquire_owned().await else {
            return;
        };
        let (hub2, task2) = (Arc::clone(&hub), task.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            hub2.append_receipt(&task2, &bytes, &r, &site, links)
        })
        .await
        .unwrap_or_else(|_| {
            Err((
                ReceiptOutcome::Unavailable,
                "the ledger write failed".into(),
            ))
        });
        match outcome {
            Ok(()) => hub.metrics.receipt(ReceiptOutcome::Appended),
            Err((why, detail)) => {
                let (code, message) = refused_receipt(&hub, why, &detail);
                hub.metrics.reject(code);
                let _ = outbox.push_from(encode(&ServerMessage::Error { code, message }), None);
            }
        }
    }
}

/// Holds `task`'s ledger lock for `hold` on a thread of its own, as a slow disk's sync
/// or a long credits computation would (for tests); returns once it is held.
#[doc(hidden)]
pub fn hold_ledger(hub: &Hub, task: &str, hold: Duration) -> Option<std::thread::JoinHandle<()>> {
    let ledger = Arc::clone(hub.ledgers.get(task)?);
    let (held, taken) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _guard = ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = held.send(());
        std::thread::sleep(hold);
    });
    taken.recv().ok()?;
    Some(thread)
}

/// The most bytes of frames a message of `payload` bytes may take, with what the reader
/// may have read ahead of the next (`read_buffer` each way): its bytes, an eighth more
/// for frame headers, twice `read_buffer` and 1 KiB.
fn frame_bytes(payload: usize, read_buffer: usize) -> usize {
    payload + payload / 8 + 2 * read_buffer + 1024
}

/// A websocket frame's head at most: 2 bytes, 8 of length, 4 of mask.
const MAX_FRAME_HEAD: usize = 14;

/// Past this a message fails in the codec, without being buffered; between the soft
/// limit and it the peer gets a typed `too_large` error first.
fn hard_cap(limits: &Limits) -> usize {
    limits.max_message_bytes * 2 + 1024
}

/// The most bytes of frames a connection may send between two messages: those of a
/// message at the hard cap (`upgrade::Buffered` fails its reads past it, and a ping or
/// pong may come after that many bytes of a message's fragments).
fn read_cap(limits: &Limits) -> usize {
    frame_bytes(hard_cap(limits), limits.read_buffer)
}

/// Why a read failed, as a disconnect reason.
fn broken(hub: &Hub, e: &tokio_tungstenite::tungstenite::Error) -> Disconnect {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        Error::Io(io) if io.get_ref().is_some_and(|e| e.is::<upgrade::FrameFlood>()) => {
            hub.metrics.reject(ErrorCode::RateLimited);
            Disconnect::RateLimit
        }
        Error::Capacity(_) => {
            // Past the hard size cap: the codec refused it without buffering it.
            hub.metrics.reject(ErrorCode::TooLarge);
            Disconnect::TooLarge
        }
        Error::Utf8(_) => Disconnect::InvalidText,
        Error::Io(_)
        | Error::ConnectionClosed
        | Error::AlreadyClosed
        | Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Disconnect::Gone,
        Error::WriteBufferFull(_) => Disconnect::SendFailed,
        _ => Disconnect::FrameError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The swarm's round of `digits` as receipts are judged against it.
    fn swarm_round(hub: &Hub) -> Option<u64> {
        hub.lock()
            .tasks
            .get_mut("digits")
            .expect("task")
            .summary()
            .round
    }

    /// Unlinks every peer of `digits` (their links' other records stay): all have room.
    fn give_everyone_room(hub: &Hub) {
        let mut st = hub.lock();
        for p in st.tasks.get_mut("digits").expect("task").peers.values_mut() {
            p.neighbours.clear();
        }
    }

    /// A hub with the task `digits` and no ledger.
    fn digits_hub() -> Arc<Hub> {
        let config = SignalingConfig {
            ledger_dir: None,
            ..SignalingConfig::default()
        };
        Hub::new(config, &["digits".into()], &[], None)
    }

    /// A task's `learn.neighbours` is its k: a researcher's task of 2 neighbours is not
    /// given the server's 6.
    #[test]
    fn each_task_links_its_peers_to_its_own_number_of_neighbours() {
        let config = SignalingConfig {
            ledger_dir: None,
            task_neighbours: HashMap::from([("small".to_string(), 2)]),
            ..SignalingConfig::default()
        };
        let hub = Hub::new(config, &["digits".into(), "small".into()], &[], None);
        for (task, k) in [("digits", 6), ("small", 2)] {
            let mut ids = Vec::new();
            for group in 1..=10u128 {
                let (id, _) = hub
                    .join(task, Arc::new(Outbox::new(256)), group, "")
                    .expect("join");
                hub.store_report(task, id, PeerReport::default())
                    .expect("report");
                ids.push(id);
            }
            let held = |id: &PeerId| hub.neighbours_of(task, *id).expect("a peer").len();
            assert_eq!(held(&ids[9]), k, "{task}: the newcomer gets k");
            assert!(ids.iter().all(|id| held(id) <= 2 * k), "{task}: at most 2k");
        }
    }

    /// A peer of `digits` from the network `group` that has sent a report.
    fn reporting_peer(hub: &Hub, group: u128) -> PeerId {
        joined_as(hub, group, &PeerReport::default())
    }

    /// The report of a dashboard's observer.
    fn observer_report() -> PeerReport {
        PeerReport {
            role: shoal_shared::protocol::Role::Observer,
            ..PeerReport::default()
        }
    }

    /// A peer of `digits` from `group` that sent `report`.
    fn joined_as(hub: &Hub, group: u128, report: &PeerReport) -> PeerId {
        let (id, _) = hub
            .join("digits", Arc::new(Outbox::new(4096)), group, "")
            .expect("join");
        hub.store_report("digits", id, report.clone())
            .expect("report");
        id
    }

    /// A peer of `digits` from `group` that reported training at round `version`.
    fn trainer_at(hub: &Hub, group: u128, version: u64) -> PeerId {
        let report = PeerReport {
            version,
            ..PeerReport::default()
        };
        joined_as(hub, group, &report)
    }

    /// The dashboard's totals count every trainer, not only the 256 listed (those with
    /// the smallest ids, not the first to join): 300 trainers of 100 samples/s each made
    /// 25,600 when the dashboard added up the listed ones, and 256 peers that joined
    /// first (and stayed) were all it saw. A liar's claim counts at the cap.
    #[test]
    fn the_swarms_totals_count_every_trainer_and_the_listed_ones_are_a_sample() {
        let hub = digits_hub();
        let mut ids = Vec::new();
        for i in 0..300u128 {
            let (id, _) = hub
                .join("digits", Arc::new(Outbox::new(64)), 1000 + i, "")
                .expect("join");
            let report = PeerReport {
                samples_per_s: if i == 0 { 1e7 } else { 100.0 },
                samples: 5_000,
                ..PeerReport::default()
            };
            hub.store_report("digits", id, report).expect("report");
            ids.push(id);
        }
        let view = hub.swarm_view("digits", 256).expect("the task");
        assert_eq!(view.totals.reporting, 300);
        assert_eq!(view.totals.samples_per_s, 299.0 * 100.0 + 1000.0);
        assert_eq!(view.totals.samples, 300.0 * 5_000.0);
        assert_eq!(view.totals.outliers, 1);
        assert_eq!(view.peers.len(), 256);
        let mut smallest = ids.clone();
        smallest.sort_unstable();
        let listed: Vec<PeerId> = view.peers.iter().map(|p| p.id).collect();
        assert_eq!(listed, smallest[..256], "the smallest ids, in order");
        assert_ne!(listed, {
            let mut first = ids[..256].to_vec();
            first.sort_unstable();
            first
        });
    }

    /// One address's many sockets weigh as four peers in the totals' caps and sums: 32
    /// sockets of one address reporting 0.5 samples/s (and nothing else) set every cap
    /// to its floor and flagged all twelve honest trainers as outliers (the totals read
    /// 136 samples/s for 7,200), and reporting the most they multiplied the totals.
    #[test]
    fn one_addresss_many_trainers_neither_cap_the_honest_nor_swell_the_totals() {
        for liar_rate in [0.5, 1e7] {
            let hub = digits_hub();
            let report = |samples_per_s: f32, samples: u64| PeerReport {
                samples_per_s,
                samples,
                bytes_up: samples,
                used: samples / 100,
                rejected: [("stale".to_string(), samples / 100)].into(),
                ..PeerReport::default()
            };
            for g in 1..=12u128 {
                let (id, _) = hub
                    .join("digits", Arc::new(Outbox::new(64)), g, "")
                    .expect("join");
                hub.store_report("digits", id, report(600.0, 6_000))
                    .expect("report");
            }
            let liar = if liar_rate < 1.0 { 0 } else { 1 << 40 };
            for _ in 0..32 {
                let (id, _) = hub
                    .join("digits", Arc::new(Outbox::new(64)), 99, "")
                    .expect("join");
                hub.store_report("digits", id, report(liar_rate, liar))
                    .expect("report");
            }
            let t = hub.swarm_view("digits", 256).expect("the task").totals;
            assert_eq!(t.reporting, 44, "{liar_rate}");
            assert_eq!(t.outliers, if liar < 1 { 0 } else { 32 }, "{liar_rate}");
            // The honest twelve in full; one address at most four peers at the cap.
            let honest = 12.0 * 600.0;
            assert!(t.samples_per_s >= honest, "{liar_rate}: {t:?}");
            assert!(
                t.samples_per_s <= honest + 4.0 * OUTLIER_TIMES * 600.0,
                "{liar_rate}: {t:?}"
            );
            assert!(
                t.samples <= 12.0 * 6_000.0 + 4.0 * OUTLIER_TIMES * 6_000.0,
                "{t:?}"
            );
            assert!(
                t.bytes <= 12.0 * 6_000.0 + 4.0 * OUTLIER_TIMES * 6_000.0,
                "{t:?}"
            );
            let stale = t.rejected.get("stale").copied().unwrap_or(0.0);
            assert!(
                (12.0 * 60.0..=12.0 * 60.0 + 4.0 * OUTLIER_TIMES * 120.0).contains(&stale),
                "{t:?}"
            );
        }
    }

    /// Records `key` as the one `id` proved (as `identify` does).
    fn give_key(hub: &Hub, id: PeerId, key: shoal_shared::learn::identity::PublicKey) {
        let mut st = hub.lock();
        let t = st.tasks.get_mut("digits").expect("task");
        t.peers.get_mut(&id).expect("peer").key = Some(key);
    }

    /// Sixteen networks that join again and again and report every honest peer they are
    /// drawn as `unreachable` make few of forty honest peers undrawable: each network's
    /// reports count against at most `VOTED_NETWORKS` networks a window. Before, every
    /// honest peer was reported by more of them than it had honest links, and a newcomer
    /// was handed only their peers.
    #[test]
    fn networks_reporting_every_honest_peer_unreachable_cannot_hide_them() {
        let hub = digits_hub();
        // Draws from a fixed seed: the same ids and neighbours every run.
        hub.lock().rng = Draws {
            seed: [7; 32],
            counter: 0,
        };
        let honest: Vec<PeerId> = (1..=40u128).map(|g| reporting_peer(&hub, g)).collect();
        let quiet = hub.config.limits.quiet_after;
        for cycle in 0..20 {
            for g in 1000..1016u128 {
                let liar = reporting_peer(&hub, g);
                // Its neighbours, and the one each report draws in its place.
                while let Some(h) = hub
                    .neighbours_of("digits", liar)
                    .expect("a peer")
                    .into_iter()
                    .find(|n| honest.contains(n))
                {
                    if hub.unreachable("digits", liar, h).is_err() {
                        break;
                    }
                }
                if cycle < 19 {
                    hub.leave("digits", liar);
                }
            }
        }
        let st = hub.lock();
        let t = &st.tasks["digits"];
        let drawable = honest.iter().filter(|h| t.peers[h].drawable(quiet)).count();
        drop(st);
        assert!(drawable >= 32, "{drawable} of 40 honest peers still drawn");
    }

    /// A peer's links still open count against reports as new ones do: its long-open
    /// links aged out of the window while three new networks' reports were fresh, and
    /// three reports made a peer with six honest neighbours undrawable.
    #[test]
    fn long_open_links_still_count_against_new_reports() {
        let hub = digits_hub();
        let p = reporting_peer(&hub, 1);
        for g in 2..=7u128 {
            reporting_peer(&hub, g);
        }
        let old = Instant::now()
            .checked_sub(VOTE_WINDOW + Duration::from_secs(60))
            .expect("an old instant");
        let reporters: Vec<PeerId> = (100..103u128).map(|g| reporting_peer(&hub, g)).collect();
        {
            let mut st = hub.lock();
            let t = st.tasks.get_mut("digits").expect("the task");
            for &r in &reporters {
                if !t.peers[&r].neighbours.contains(&p) {
                    link(t, r, p);
                }
            }
            // Every link but the reporters' was made long ago.
            let p = t.peers.get_mut(&p).expect("p");
            for (g, at) in p.linked_groups.iter_mut() {
                if *g < 100 {
                    *at = old;
                }
            }
        }
        assert!(hub.neighbours_of("digits", p).expect("p").len() >= 6 + 3);
        for r in reporters {
            hub.unreachable("digits", r, p).expect("a neighbour");
        }
        let st = hub.lock();
        let quiet = hub.config.limits.quiet_after;
        assert!(
            st.tasks["digits"].peers[&p].drawable(quiet),
            "three of nine networks"
        );
    }

    /// Each honest peer reports its dead neighbours, as its 20 s attempts fail, until
    /// none is left or no report is taken (at most 50 passes); returns the dead links
    /// the honest peers keep.
    fn report_dead(hub: &Hub, honest: &[PeerId], dead: &BTreeSet<PeerId>) -> usize {
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        for _ in 0..50 {
            let mut reported = false;
            for &h in honest {
                for n in of(h) {
                    if dead.contains(&n) && hub.unreachable("digits", h, n).is_ok() {
                        reported = true;
                    }
                }
            }
            if !reported {
                break;
            }
        }
        honest
            .iter()
            .map(|&h| of(h).iter().filter(|n| dead.contains(n)).count())
            .sum()
    }

    /// One address that joins again and again, keeping the peers the server links to a
    /// dashboard or a trainer of another address and leaving with the rest, holds at most
    /// a third of k of its places (it held up to k, half of them, and a trainer's as
    /// many as it liked).
    #[test]
    fn one_address_cannot_fill_a_peers_neighbours_by_joining_until_drawn() {
        let k = 6;
        let observing = observer_report();
        for (role, report) in [
            ("dashboard", &observing),
            ("trainer", &PeerReport::default()),
        ] {
            let hub = digits_hub();
            // (Enough networks with room that the first draws fill a newcomer's slots: a
            // trainer is held to it only then.)
            let honest: Vec<PeerId> = (2..=15u128).map(|g| reporting_peer(&hub, g)).collect();
            let target = joined_as(&hub, 1, report);
            let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
            assert!(of(target).iter().all(|n| honest.contains(n)));
            let mut kept = BTreeSet::new();
            for _ in 0..400 {
                if kept.len() >= 30 {
                    break;
                }
                let id = reporting_peer(&hub, 99);
                if of(target).contains(&id) {
                    kept.insert(id);
                } else {
                    hub.leave("digits", id);
                }
            }
            let held = of(target).iter().filter(|n| kept.contains(n)).count();
            assert!(
                held <= k / 3,
                "{held} of the {role}'s neighbours from one address"
            );
        }
        // Behind one address with everyone (a swarm on loopback), neither is held to it.
        for report in [&observing, &PeerReport::default()] {
            let hub = digits_hub();
            let target = joined_as(&hub, 1, report);
            for _ in 0..6 {
                reporting_peer(&hub, 1);
            }
            let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
            assert_eq!(
                of(target).len(),
                6,
                "every newcomer of its one network links to it"
            );
        }
    }

    /// A dashboard's replacement draws hold it to the third-of-k rule as its first draws
    /// do: one address whose peers stay while honest neighbours come and go (each loss
    /// redrawn with every network as likely as any other) filled the dashboard's places
    /// up to k, one redraw at a time.
    #[test]
    fn one_address_whose_peers_stay_cannot_fill_a_dashboard_through_its_redraws() {
        let k = 6;
        let observing = observer_report();
        let hub = digits_hub();
        for g in 2..=15u128 {
            reporting_peer(&hub, g);
        }
        let target = joined_as(&hub, 1, &observing);
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        let attacker: BTreeSet<PeerId> = (0..30).map(|_| reporting_peer(&hub, 99)).collect();
        let held = || of(target).iter().filter(|n| attacker.contains(n)).count();
        assert!(held() <= k / 3, "{} from one address as it joined", held());
        let mut most = 0;
        for i in 0..300u128 {
            let Some(gone) = of(target).into_iter().find(|n| !attacker.contains(n)) else {
                break;
            };
            hub.leave("digits", gone);
            reporting_peer(&hub, 2 + i % 14);
            most = most.max(held());
        }
        assert!(
            most <= k / 3,
            "{most} of the dashboard's neighbours from one address"
        );
        assert!(of(target).len() >= k, "the dashboard keeps its neighbours");
    }

    /// The third-of-k rule costs honest peers of a crowded network no neighbours: where
    /// one address took every other network's peers' share of its network (a carrier's
    /// NAT, an IPv6 /48 that honest peers share), that network's honest newcomers still
    /// get other networks' peers (held to it in every draw, they got none: all of their
    /// neighbours were the address's or their own network's); a lone peer among a
    /// classroom gets its k neighbours (it had 4), and a peer that loses one of them is
    /// given another (it stayed a neighbour short).
    #[test]
    fn the_per_network_rule_leaves_no_peer_short_of_neighbours() {
        let k = 6;
        let hub = digits_hub();
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        let honest: Vec<PeerId> = (2..=11u128).map(|g| reporting_peer(&hub, g)).collect();
        let mut kept = BTreeSet::new();
        let held =
            |kept: &BTreeSet<PeerId>, h: PeerId| of(h).iter().filter(|n| kept.contains(n)).count();
        for _ in 0..400 {
            if honest.iter().all(|&h| held(&kept, h) >= k / 3) {
                break;
            }
            let id = reporting_peer(&hub, 1);
            if honest.iter().any(|&h| of(h).contains(&id)) {
                kept.insert(id);
            } else {
                hub.leave("digits", id);
            }
        }
        assert!(honest.iter().all(|&h| held(&kept, h) >= k / 3));
        let elsewhere: usize = (0..3)
            .map(|_| {
                let newcomer = reporting_peer(&hub, 1);
                of(newcomer).iter().filter(|n| honest.contains(n)).count()
            })
            .sum();
        assert!(
            elsewhere >= 4,
            "three newcomers got {elsewhere} neighbours of other networks"
        );

        let hub = digits_hub();
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        let lone = reporting_peer(&hub, 2);
        reporting_peer(&hub, 3);
        for _ in 0..10 {
            reporting_peer(&hub, 1);
        }
        assert!(of(lone).len() >= k, "a lone peer holds {}", of(lone).len());
        let late = reporting_peer(&hub, 4);
        let classmate = of(late)
            .into_iter()
            .find(|n| hub.lock().tasks["digits"].peers[n].group == 1)
            .expect("a neighbour of the classroom");
        hub.leave("digits", classmate);
        assert!(
            of(late).len() >= k,
            "{} neighbours after one left",
            of(late).len()
        );
    }

    /// Peers that never open a WebRTC connection, 96 of them from three addresses, do not
    /// take a newcomer's neighbours from the eight honest peers, which report every such
    /// neighbour `unreachable`: a peer most of its networks cannot reach is no longer
    /// drawn, reports past the budget still unlink (honest peers keep room for
    /// newcomers, also all behind one address), and a newcomer takes one peer per
    /// network first. What a sender unlinks past its budget still counts for its
    /// receipts' quorum.
    #[test]
    fn peers_nobody_reaches_do_not_crowd_out_a_newcomers_honest_neighbours() {
        let hub = digits_hub();
        let k = 6;
        let join = |group| reporting_peer(&hub, group);
        let honest: Vec<PeerId> = (1..=8u128).map(join).collect();
        let sybils: BTreeSet<PeerId> = (0..96u128).map(|i| join(100 + i % 3)).collect();
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        let dead = report_dead(&hub, &honest, &sybils);
        assert_eq!(dead, 0, "the honest peers keep {dead} dead links");
        // Twenty newcomers, each on its own network: each gets k neighbours, and about
        // the three sybil networks' share of the networks (three of 11 to 30), not 92%.
        let (mut held, mut dead) = (0, 0);
        for group in 50..70u128 {
            let got = of(join(group));
            assert_eq!(got.len(), k, "a newcomer gets k neighbours");
            held += got.len();
            dead += got.iter().filter(|n| sybils.contains(n)).count();
        }
        assert!(
            dead * 10 < held * 3,
            "{dead} of the newcomers' {held} neighbours never connect"
        );

        // The same with every honest peer behind one address (one network, as on
        // loopback): nobody's reports make the sybils undrawn, yet the honest peers shed
        // every dead link past their budget and keep room for newcomers. The newcomers
        // then get about the three sybil networks' share of the 4 to 23 networks there
        // are as each comes (34 to 45 of 120 in runs; each honest peer holds at most a
        // third of k of each sybil network in most draws, so the sybils have room), not
        // their peers' share (92%).
        let hub = digits_hub();
        let join = |group| reporting_peer(&hub, group);
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        let honest: Vec<PeerId> = (0..8).map(|_| join(1)).collect();
        let mut sybils = BTreeSet::new();
        // They come eight at a time, each batch reported (its connections failed) before
        // the next.
        for batch in 0..12u128 {
            sybils.extend((0..8u128).map(|i| join(100 + (batch * 8 + i) % 3)));
            report_dead(&hub, &honest, &sybils);
        }
        let dead = report_dead(&hub, &honest, &sybils);
        let (mut held, mut dead_new) = (0, 0);
        for group in 50..70u128 {
            let got = of(join(group));
            held += got.len();
            dead_new += got.iter().filter(|n| sybils.contains(n)).count();
        }
        assert_eq!(dead, 0, "the honest peers keep {dead} dead links");
        assert!(
            dead_new * 2 < held,
            "{dead_new} of the newcomers' {held} neighbours never connect"
        );

        // A lone peer nobody reaches (it spoke, and never opens a connection): once most
        // of the networks it was linked to reported it, it is not drawn again.
        let hub = digits_hub();
        let join = |group| reporting_peer(&hub, group);
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        let honest: Vec<PeerId> = (1..=8u128).map(join).collect();
        let dead = join(200);
        for _ in 0..10 {
            for &h in &honest {
                if of(h).contains(&dead) {
                    hub.unreachable("digits", h, dead).expect("a neighbour");
                }
            }
        }
        for group in 300..310u128 {
            assert!(
                !of(join(group)).contains(&dead),
                "a newcomer got the dead peer"
            );
        }

        // A peer's first 2k reports each redraw a neighbour for it; later ones unlink
        // without a redraw, any neighbour, and what they unlink still counts among its
        // identified links (up to k) while it is connected: a sender that sheds its
        // honest neighbours until only colluders are left keeps its receipts' quorum.
        let hub = digits_hub();
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        let peers: Vec<PeerId> = (1..=30u128).map(|g| reporting_peer(&hub, g)).collect();
        let with = |id: PeerId, f: &dyn Fn(&mut Peer)| {
            let mut st = hub.lock();
            f(st.tasks
                .get_mut("digits")
                .expect("task")
                .peers
                .get_mut(&id)
                .expect("peer"));
        };
        for (i, &id) in peers.iter().enumerate() {
            with(id, &|p| p.key = Some([i as u8 + 1; 32]));
        }
        let links = |id: PeerId| {
            let st = hub.lock();
            let t = &st.tasks["digits"];
            identified_links(t, &t.peers[&id], k)
        };
        // Its lost links: those its own reports shed, and those whose reports shed it.
        let shed = |id: PeerId| {
            let st = hub.lock();
            let p = &st.tasks["digits"].peers[&id];
            (p.shed.clone(), p.shed_by.clone())
        };
        let a = peers[0];
        with(a, &|p| {
            p.unreachable = 2 * k;
            p.shed.clear();
        });
        let before = of(a);
        let quorum_before = links(a);
        assert!(quorum_before >= 6, "{quorum_before} identified links");
        for &n in &before[1..] {
            hub.unreachable("digits", a, n)
                .expect("a neighbour is unlinked past the budget");
        }
        assert_eq!(of(a), before[..1], "unlinked, and no neighbour is redrawn");
        assert_eq!(
            usize::from(links(a)),
            usize::from(quorum_before).min(k),
            "the neighbours it shed still count for its receipts' quorum, up to k"
        );
        // Those that leave count no more, nor those most networks cannot reach. (A
        // leave relinks the leaver's neighbours, and one may be drawn for `a`, which has
        // room: that one counts too.)
        let three = before[1..4].to_vec();
        with(a, &|p| p.shed = three.clone());
        assert_eq!(links(a), 4);
        hub.leave("digits", three[0]);
        let gained = of(a).len() - 1;
        assert_eq!(usize::from(links(a)), (3 + gained).min(k));
        with(three[1], &|d| {
            d.linked_groups = (1..=4).map(|g| (g, Instant::now())).collect();
            d.unreachable_from = (1..=3).map(|g| (g, Instant::now())).collect();
        });
        assert_eq!(usize::from(links(a)), (2 + gained).min(k));
        // At most `MAX_SHED` lost links are kept (of peers still here that most networks
        // reach); past them reports past the budget are refused.
        let live: Vec<PeerId> = peers[1..]
            .iter()
            .copied()
            .filter(|&q| q != three[0] && q != three[1] && q != before[0])
            .cycle()
            .take(MAX_SHED)
            .collect();
        with(a, &|p| p.shed = live.clone());
        let held = of(a);
        assert!(held.contains(&before[0]));
        assert_eq!(
            hub.unreachable("digits", a, before[0]),
            Err(ErrorCode::RateLimited)
        );
        assert_eq!(of(a), held, "and stays linked");

        // The reported side keeps its reporter among its lost links too (a sender that
        // will not connect to its honest neighbours keeps its quorum), once each.
        // A peer still here and untouched above (one of `three` left or was changed).
        let b = peers[1..]
            .iter()
            .copied()
            .find(|q| !three.contains(q))
            .expect("a peer not among the three");
        let c = of(b)[0];
        let forget = |p: &mut Peer| {
            p.shed.clear();
            p.shed_by.clear();
        };
        with(b, &forget);
        with(c, &forget);
        hub.unreachable("digits", c, b).expect("a neighbour");
        assert_eq!((shed(b), shed(c)), ((vec![], vec![c]), (vec![b], vec![])));
        {
            let mut st = hub.lock();
            link(st.tasks.get_mut("digits").expect("task"), b, c);
        }
        hub.unreachable("digits", b, c).expect("a neighbour");
        assert_eq!(
            (shed(b), shed(c)),
            ((vec![c], vec![c]), (vec![b], vec![b])),
            "kept once in each list"
        );

        // Others' reports never use up the places a peer's own reports need: sybils
        // that reported `d` as fast as they were drawn to it (64 of them) kept it from
        // dropping its dead neighbours once its redraws were spent.
        let d = peers[1..]
            .iter()
            .copied()
            .find(|q| !three.contains(q) && *q != b && *q != c)
            .expect("a fourth peer");
        with(d, &forget);
        let sybils: Vec<PeerId> = (0..MAX_SHED as u128)
            .map(|i| reporting_peer(&hub, 1_000 + i))
            .collect();
        for &s in &sybils {
            {
                let mut st = hub.lock();
                link(st.tasks.get_mut("digits").expect("task"), s, d);
            }
            hub.unreachable("digits", s, d).expect("a neighbour");
        }
        assert_eq!(shed(d).1.len(), MAX_SHED);
        with(d, &|p| p.unreachable = 2 * k);
        let dead = reporting_peer(&hub, 2_000);
        {
            let mut st = hub.lock();
            link(st.tasks.get_mut("digits").expect("task"), d, dead);
        }
        assert_eq!(hub.unreachable("digits", d, dead), Ok(()));
        assert!(!of(d).contains(&dead), "the dead neighbour is unlinked");
    }

    /// A receipt's signature is checked last: a connection that may sign no receipt (one
    /// that never identified, or is not its receiver) is refused before it, so that
    /// every connection joined no longer makes the server verify 2k signatures a second.
    /// A receipt that passes every other check and is badly signed is still refused.
    #[test]
    fn a_receipts_signature_is_checked_only_after_the_cheaper_checks() {
        use shoal_shared::learn::Identity;
        use shoal_shared::trust::receipt::{Receipt, sha256};
        let hub = digits_hub();
        let at = |group, version| trainer_at(&hub, group, version);
        let (a, b) = (at(2, 100), at(3, 100));
        std::thread::sleep(Duration::from_millis(30));
        let (ia, ib) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        let receipt = |broken: bool| {
            let mut r =
                Receipt::sign(&ia, "digits", 100, ib.public(), 640, sha256(&[1]), 0).encode();
            let n = r.len();
            r[n - 2] ^= u8::from(broken);
            shoal_shared::learn::identity::hex(&r)
        };
        let outcome = |broken| {
            hub.check_receipt("digits", a, &receipt(broken))
                .map(|_| ())
                .map_err(|e| e.0)
        };
        assert_eq!(outcome(true), Err(ReceiptOutcome::NotYours));
        for (id, key) in [(a, ia.public()), (b, ib.public())] {
            give_key(&hub, id, key);
        }
        assert_eq!(outcome(true), Err(ReceiptOutcome::BadSignature));
        assert_eq!(outcome(false), Ok(()));
    }

    /// Receipts count only for the rounds a pair was linked in, give or take four: a
    /// pair linked at round 100 cannot receipt round 90, nor a neighbour that left at
    /// round 100 round 110.
    #[test]
    fn receipts_count_only_for_rounds_the_pair_was_linked_in() {
        use shoal_shared::learn::Identity;
        use shoal_shared::trust::receipt::{Receipt, sha256};
        let hub = digits_hub();
        let at = |group, version| trainer_at(&hub, group, version);
        let x = at(1, 100);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(swarm_round(&hub), Some(100));
        let (a, b) = (at(2, 100), at(3, 100));
        assert!(hub.neighbours_of("digits", a).expect("a").contains(&b));
        let (ia, ib) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        for (id, key) in [(a, ia.public()), (b, ib.public())] {
            give_key(&hub, id, key);
        }
        let receipt = |round: u64| {
            let r = Receipt::sign(&ia, "digits", round, ib.public(), 640, sha256(&[1]), 0);
            shoal_shared::learn::identity::hex(&r.encode())
        };
        let outcome = |round| {
            hub.check_receipt("digits", a, &receipt(round))
                .map(|_| ())
                .map_err(|e| e.0)
        };
        assert_eq!(
            outcome(90),
            Err(ReceiptOutcome::NotLinked),
            "before the link"
        );
        assert_eq!(outcome(97), Ok(()));
        assert_eq!(outcome(101), Ok(()));
        // Paused now: the round it was in still closes, and its receipts count (it
        // reported training within 30 s).
        hub.store_report(
            "digits",
            a,
            PeerReport {
                version: 101,
                paused: true,
                ..PeerReport::default()
            },
        )
        .expect("report");
        assert_eq!(outcome(101), Ok(()));
        // Unlinked at round 100; the swarm goes on to round 120.
        hub.unreachable("digits", a, b).expect("a neighbour");
        for id in [x, a, b] {
            hub.store_report(
                "digits",
                id,
                PeerReport {
                    version: 120,
                    ..PeerReport::default()
                },
            )
            .expect("report");
        }
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(swarm_round(&hub), Some(120));
        assert_eq!(outcome(103), Ok(()), "its last updates still count");
        assert_eq!(
            outcome(110),
            Err(ReceiptOutcome::NotLinked),
            "after it left"
        );
    }

    /// A key that moves from connection to connection (each `identify` takes it over)
    /// gathers receivers from all of them: its receipts' `links` count the neighbours of
    /// every connection it held in their round, so one colluder drawn to each of three
    /// connections is no quorum (with each connection's links alone, three were).
    #[test]
    fn a_key_that_hops_connections_needs_half_of_all_their_neighbours() {
        use shoal_shared::learn::Identity;
        use shoal_shared::trust::ledger::Entry;
        use shoal_shared::trust::receipt::{Receipt, sha256};
        let hub = digits_hub();
        let k = hub.config.neighbours_for("digits");
        let ids: Vec<Identity> = (0..30u8)
            .map(|i| Identity::from_seed([i + 10; 32]))
            .collect();
        let peers: Vec<PeerId> = (0..30u128).map(|g| trainer_at(&hub, g + 1, 10)).collect();
        for (p, id) in peers.iter().zip(&ids) {
            give_key(&hub, *p, id.public());
        }
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(swarm_round(&hub), Some(10));
        let sender = Identity::from_seed([99; 32]);
        let prove = |conn: PeerId| {
            let nonce = hub.lock().tasks["digits"].peers[&conn].nonce;
            let sig = sender.sign(&shoal_shared::protocol::identify_message(
                "digits", conn, &nonce,
            ));
            let hex = shoal_shared::learn::identity::hex;
            hub.identify("digits", conn, &hex(&sender.public()), &hex(&sig))
                .expect("a proof");
        };
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        // One colluder among each connection's neighbours.
        let mut colluders = Vec::new();
        for _ in 0..3 {
            let conn = trainer_at(&hub, 500, 10);
            prove(conn);
            let mine = of(conn);
            assert!(mine.len() >= k - 1, "{} neighbours", mine.len());
            // A trainer (the key's earlier connections may be among them too).
            let c = *mine
                .iter()
                .find(|n| peers.contains(*n) && !colluders.contains(*n))
                .expect("a new neighbour");
            colluders.push(c);
        }
        let entries: Vec<Entry> = colluders
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let at = peers.iter().position(|p| p == c).expect("a trainer");
                let r = Receipt::sign(
                    &ids[at],
                    "digits",
                    10,
                    sender.public(),
                    640,
                    sha256(&[1]),
                    0,
                );
                let hex = shoal_shared::learn::identity::hex(&r.encode());
                let (bytes, receipt, site, links) = hub
                    .check_receipt("digits", *c, &hex)
                    .expect("a colluder's receipt");
                Entry {
                    index: i as u64,
                    time_ms: 0,
                    links,
                    site: site.to_string(),
                    receipt,
                    receipt_bytes: bytes,
                    hash: [0; 32],
                }
            })
            .collect();
        for e in &entries {
            assert!(usize::from(e.links) >= 2 * k, "{} links", e.links);
        }
        let credits = shoal_shared::trust::credits::compute(&entries);
        assert_eq!(credits.rank_of(&sender.public()), None, "{credits:?}");
        // Hopping 40 times more, rounds later, does not push those connections out of
        // the key's record: receipts for round 10 still need half of all their links.
        for p in &peers {
            let report = PeerReport {
                version: 20,
                ..PeerReport::default()
            };
            hub.store_report("digits", *p, report).expect("report");
        }
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(swarm_round(&hub), Some(20));
        for g in 0..40u128 {
            prove(trainer_at(&hub, 600 + g, 20));
        }
        let st = hub.lock();
        let round_10 = sender_links(
            &st.tasks["digits"],
            &sender.public(),
            10,
            k,
            20,
            Instant::now(),
        );
        assert!(round_10 >= 2 * k, "{round_10} links");
    }

    /// A connection that ended while no round was known counts for the round it joined
    /// only, not for every round of the next 10 minutes.
    #[test]
    fn a_connection_that_ended_in_a_quiet_spell_counts_for_its_round_only() {
        let mut t = Task::default();
        let key = [7; 32];
        key_ended(&mut t, key, (Some(50), None), 6);
        let links = |round| sender_links(&t, &key, round, 6, 200, Instant::now());
        assert_eq!((links(50), links(54), links(55), links(150)), (6, 6, 0, 0));
    }

    /// A trainer that reports a round far ahead before the server has counted one (just
    /// after a restart, or in a task quiet for 30 s) sets the stamp of the links made
    /// until the next count; their receipts still count once the swarm's round is known.
    #[test]
    fn a_link_stamped_with_a_made_up_round_still_counts_its_receipts() {
        use shoal_shared::learn::Identity;
        use shoal_shared::trust::receipt::{Receipt, sha256};
        let hub = digits_hub();
        assert_eq!(swarm_round(&hub), None);
        let at = |group, version| trainer_at(&hub, group, version);
        at(9, shoal_shared::learn::wire::MAX_ROUND - 1);
        let (a, b) = (at(1, 10), at(2, 10));
        assert!(hub.neighbours_of("digits", a).expect("a").contains(&b));
        let (ia, ib) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        for (id, key) in [(a, ia.public()), (b, ib.public())] {
            give_key(&hub, id, key);
        }
        at(3, 10);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(swarm_round(&hub), Some(10));
        let r = Receipt::sign(&ia, "digits", 10, ib.public(), 640, sha256(&[1]), 0);
        let hex = shoal_shared::learn::identity::hex(&r.encode());
        assert_eq!(
            hub.check_receipt("digits", a, &hex)
                .map(|_| ())
                .map_err(|e| e.0),
            Ok(())
        );
    }

    /// One IPv6 /48 (65,536 /64s, each an address of its own) holds at most four
    /// addresses' shares, of a task's peers and of the server's connections; IPv4
    /// addresses and other /48s are not held back by it.
    #[test]
    fn an_ipv6_48_holds_four_addresses_shares() {
        let hub = digits_hub();
        let v6 = |net48: u128, net64: u128| (net48 << 80) | (net64 << 64);
        let join = |group| {
            hub.join("digits", Arc::new(Outbox::new(64)), group, "")
                .map(|(id, _)| id)
        };
        // 32 per /64 as before; 128 across the /48's /64s.
        let mut held = Vec::new();
        for i in 0..128u128 {
            held.push(join(v6(0x2001_0db8_0001, i)).expect("within the /48's share"));
        }
        assert_eq!(
            join(v6(0x2001_0db8_0001, 500)),
            Err(ErrorCode::AddressFull),
            "a 129th /64 of the same /48"
        );
        assert!(join(v6(0x2001_0db8_0002, 0)).is_ok(), "another /48");
        let v4 = u128::from(std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(join(v4).is_ok(), "an IPv4 address");
        // One leaves: one more may join.
        hub.leave("digits", held[0]);
        assert!(join(v6(0x2001_0db8_0001, 500)).is_ok());
        // Connections: the same four shares per /48.
        let counts = AddressCounts::default();
        let taken: Vec<_> = (0..4u128)
            .map(|i| take_shares(&counts, v6(0x2001_0db8_0003, i), 1).expect("a place"))
            .collect();
        assert!(
            take_shares(&counts, v6(0x2001_0db8_0003, 4), 1).is_none(),
            "a fifth /64 of the /48"
        );
        assert!(
            take_shares(&counts, v6(0x2001_0db8_0004, 0), 1).is_some(),
            "another /48"
        );
        assert!(take_shares(&counts, v4, 1).is_some(), "an IPv4 address");
        drop(taken);
        assert!(
            take_shares(&counts, v6(0x2001_0db8_0003, 4), 1).is_some(),
            "places given back"
        );
        assert!(counts.lock().expect("counts").is_empty(), "nothing held");
    }

    /// New connections: a /48's /64s reconnect at four addresses' rate in all (each its
    /// own burst of 32 made 2 million at once and 65,536 a second), IPv4 addresses and
    /// other /48s unaffected.
    #[test]
    fn an_ipv6_48_reconnects_at_four_addresses_rate() {
        let hub = digits_hub();
        let v6 = |net48: u128, net64: u128| (net48 << 80) | (net64 << 64);
        let burst = hub.config.limits.join_burst as usize;
        let allowed = (0..20 * burst as u128)
            .filter(|&i| hub.may_connect(v6(0x2001_0db8_0001, i % 16)))
            .count();
        assert!(
            (4 * burst..4 * burst + 4).contains(&allowed),
            "{allowed} connections from 16 /64s of one /48"
        );
        assert!(
            !hub.may_connect(v6(0x2001_0db8_0001, 99)),
            "a fresh /64 of the same /48"
        );
        assert!(hub.may_connect(v6(0x2001_0db8_0002, 0)), "another /48");
        let v4 = u128::from(std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        let from_v4 = (0..2 * burst).filter(|_| hub.may_connect(v4)).count();
        assert!(
            (burst..burst + 2).contains(&from_v4),
            "{from_v4} from one IPv4 address"
        );
        // An address whose last byte is 1 is an address, not a /48.
        assert_eq!(join_scale(v4), 1.0);
        assert_eq!(join_scale(wide_group(v6(7, 3)).expect("a /48")), 4.0);
    }

    /// A peer's redraws take each network as likely as any other: one address's 32
    /// peers among 40 lone ones are not nearly half of what a sender that spends its
    /// redraws gets (its colluders would make its receipts' quorum).
    #[test]
    fn redraws_take_networks_not_peers() {
        let hub = digits_hub();
        let k = 6;
        let lone: Vec<PeerId> = (1..=40u128).map(|g| reporting_peer(&hub, g)).collect();
        let crowd: BTreeSet<PeerId> = (0..32).map(|_| reporting_peer(&hub, 100)).collect();
        let of = |id: PeerId| hub.neighbours_of("digits", id).expect("a peer");
        // Everyone with room (else whoever joined last, here the crowd, is what has it).
        give_everyone_room(&hub);
        let (mut drawn, mut of_crowd) = (0, 0);
        for sender in 0..8u128 {
            let s = reporting_peer(&hub, 200 + sender);
            // It reports every neighbour it gets, within its budget of 2k redraws.
            for _ in 0..2 * k {
                let before = of(s);
                let Some(&n) = before.first() else { break };
                hub.unreachable("digits", s, n).expect("a neighbour");
                for p in of(s).iter().filter(|p| !before.contains(p)) {
                    drawn += 1;
                    of_crowd += usize::from(crowd.contains(p));
                }
            }
        }
        assert!(lone.len() == 40 && drawn > 80, "{drawn} drawn");
        // One network of 41: a few percent by chance; by peer it was about 44%.
        assert!(
            of_crowd * 5 < drawn,
            "{of_crowd} of {drawn} redrawn neighbours are the crowd's"
        );
    }

    /// Receipts and task descriptions read the swarm's round, pace and roles from a
    /// summary counted once per report burst, not from a pass over every peer each.
    #[test]
    fn a_tasks_summary_is_counted_again_only_after_a_report() {
        let hub = digits_hub();
        let report = |samples_per_s| PeerReport {
            version: 5,
            samples_per_s,
            ..PeerReport::default()
        };
        let mut ids = Vec::new();
        for rate in [100.0, 100.0, 300.0] {
            let (id, _) = hub
                .join("digits", Arc::new(Outbox::new(8)), 1, "")
                .expect("join");
            hub.store_report("digits", id, report(rate))
                .expect("report");
            ids.push(id);
        }
        assert_eq!(hub.pace("digits"), Some(100.0));
        assert_eq!(hub.roles("digits"), (3, 0));
        // A report that bypasses `store_report` (which marks the task) is not seen: the
        // summary stands, no pass over the peers is made.
        {
            let mut st = hub.lock();
            let t = st.tasks.get_mut("digits").expect("task");
            for id in &ids[..2] {
                t.peers.get_mut(id).expect("peer").report =
                    Some(Box::new((Instant::now(), report(500.0))));
            }
        }
        assert_eq!(hub.pace("digits"), Some(100.0), "the summary stands");
        // A report counts it again (once it is `SUMMARY_MIN` old).
        std::thread::sleep(SUMMARY_MIN + Duration::from_millis(5));
        hub.store_report("digits", ids[2], report(300.0))
            .expect("report");
        assert_eq!(hub.pace("digits"), Some(500.0), "counted again");
    }

    /// One address with many peers (sybils, up to `max_peers_per_address`) weighs at most
    /// four peers in the swarm's round and pace: it cannot set the round (and with it the
    /// rounds that receipts may name) or the pace by joining more peers than the honest
    /// networks have; and many honest peers behind one address still outweigh a lone
    /// outsider.
    #[test]
    fn one_network_weighs_at_most_four_peers_in_the_swarms_round_and_pace() {
        let hub = digits_hub();
        let report = |version, samples_per_s| PeerReport {
            version,
            samples_per_s,
            ..PeerReport::default()
        };
        let join = |group| {
            hub.join("digits", Arc::new(Outbox::new(8)), group, "")
                .expect("join")
                .0
        };
        let round = || swarm_round(&hub);
        for (group, version) in [(1, 10), (2, 11), (3, 12), (4, 12), (5, 13)] {
            let id = join(group);
            hub.store_report("digits", id, report(version, 100.0))
                .expect("report");
        }
        // Twenty peers from one address claim a far round and a huge pace.
        for _ in 0..20 {
            let id = join(9);
            hub.store_report("digits", id, report(1_000_000, 1e7))
                .expect("report");
        }
        assert_eq!(round(), Some(13), "an honest network's round, not theirs");
        assert_eq!(hub.pace("digits"), Some(100.0));
        assert_eq!(
            hub.roles("digits"),
            (25, 0),
            "every peer still counts as a trainer"
        );

        // A classroom of twelve behind one address and one outsider claiming round 0: the
        // classroom's round (a vote per network alone would make it a tie, and the lower
        // median the outsider's).
        let hub = digits_hub();
        let join = |group| {
            hub.join("digits", Arc::new(Outbox::new(8)), group, "")
                .expect("join")
                .0
        };
        for _ in 0..12 {
            let id = join(7);
            hub.store_report("digits", id, report(40, 100.0))
                .expect("report");
        }
        let id = join(8);
        hub.store_report("digits", id, report(0, 1.0))
            .expect("report");
        assert_eq!(swarm_round(&hub), Some(40));
        assert_eq!(hub.pace("digits"), Some(100.0));
    }

    /// Connections refused because their /48 has no allowance left leave no entry for
    /// their /64s: ever new /64s of a few /48s cannot fill the table of allowances, after
    /// which every new address is refused.
    #[test]
    fn refused_64s_do_not_fill_the_join_allowances() {
        let mut config = SignalingConfig::default();
        config.limits.joins_per_address_per_sec = 0.001;
        config.limits.join_burst = 1.0;
        let hub = Hub::new(config, &["digits".into()], &[], None);
        let v6 = |net48: u128, net64: u128| (net48 << 80) | (net64 << 64);
        // Eight /48s, each 37,500 of its /64s (in all three times the table's bound), in
        // two waves, each followed by new IPv4 addresses (the first full table is pruned
        // of the allowances that are whole again, a second within the second is not).
        let per_48 = 3 * MAX_JOIN_BUCKETS as u128 / 8;
        let mut allowed = 0;
        for wave in 0..2u8 {
            let half = per_48 * 8 / 2;
            let first = u128::from(wave) * half;
            allowed += (first..first + half)
                .filter(|&i| hub.may_connect(v6(0x2001_0db8_0000 + i % 8, i / 8)))
                .count();
            for last in 1..=3 {
                let v4 = std::net::Ipv4Addr::new(192, 0, 2, 10 * wave + last).to_ipv6_mapped();
                assert!(
                    hub.may_connect(u128::from(v4)),
                    "a new address, wave {wave}"
                );
            }
        }
        assert_eq!(allowed, 8 * WIDE_SHARES, "each /48's burst");
        let entries = hub.joins.lock().expect("joins").0.len();
        assert!(
            entries <= 8 + 8 * WIDE_SHARES + 6,
            "{entries} allowances kept: only the /48s, the /64s that joined and the IPv4s"
        );
    }

    /// A hub of `digits` with a peer (its queue of 64 returned, emptied) and `n`
    /// neighbours of it, each from a network of its own.
    fn victim_and_neighbours(n: u128) -> (Arc<Hub>, Arc<Outbox>, PeerId, Vec<PeerId>) {
        let hub = digits_hub();
        let inbox = Arc::new(Outbox::new(64));
        let join = |group, tx| hub.join("digits", tx, group, "").expect("join").0;
        let victim = join(1, Arc::clone(&inbox));
        let others: Vec<PeerId> = (2..2 + n)
            .map(|g| join(g, Arc::new(Outbox::new(64))))
            .collect();
        let of = hub.neighbours_of("digits", victim).expect("a peer");
        assert!(others.iter().all(|p| of.contains(p)));
        while inbox.pop().is_some() {}
        (hub, inbox, victim, others)
    }

    /// Neighbours that send large signals faster than a peer reads them fill only their
    /// share of the peer's queue: another neighbour's offer and the server's own messages
    /// still get in, and the queue holds about 256 KiB of signals at most.
    #[test]
    fn one_neighbours_signals_take_only_their_share_of_a_peers_queue() {
        let (hub, inbox, victim, mut flooders) = victim_and_neighbours(5);
        let honest = flooders.pop().expect("five");
        // Four neighbours flood: large signals, then small ones.
        let big = format!(r#"{{"sdp":"{}"}}"#, "x".repeat(15_000));
        for signal in [big.as_str(), r#"{"candidate":"c"}"#] {
            for _ in 0..100 {
                for &f in &flooders {
                    hub.relay("digits", f, victim, signal).expect("linked");
                }
            }
        }
        hub.relay("digits", honest, victim, r#"{"sdp":"offer"}"#)
            .expect("linked");
        // The server's own messages still find room (the last 16 places, less the one the
        // other neighbour's first signal took).
        for _ in 0..15 {
            assert!(inbox.push("{}".into()).is_ok(), "a place for the server");
        }
        let (mut queued, mut from_honest, mut signals) = (0, 0, 0);
        while let Some(m) = inbox.pop() {
            queued += m.len();
            from_honest += usize::from(m.contains(&format!(r#""from":"{honest}""#)));
            signals += usize::from(m.contains(r#""type":"signal""#));
        }
        assert_eq!(from_honest, 1, "the other neighbour's offer got in");
        assert!(signals <= 49, "{signals} signals");
        assert!(
            queued <= SIGNAL_BYTES_QUEUED + 64 * 1024,
            "{queued} bytes queued"
        );
    }

    /// A neighbour's signals take at most its share of places, and signals at most their
    /// share of bytes, however many neighbours send.
    #[test]
    fn a_neighbours_places_and_all_signals_bytes_are_bounded() {
        let (hub, inbox, victim, senders) = victim_and_neighbours(6);
        let drain = || {
            let (mut n, mut bytes) = (0, 0);
            while let Some(m) = inbox.pop() {
                n += 1;
                bytes += m.len();
            }
            (n, bytes)
        };
        // One neighbour's small signals: its places.
        for _ in 0..100 {
            hub.relay("digits", senders[0], victim, r#"{"candidate":"c"}"#)
                .expect("linked");
        }
        assert_eq!(drain().0, SIGNALS_PER_SENDER);
        // Six neighbours' large ones: the bytes of all signals, besides each one's first.
        let big = format!(r#"{{"sdp":"{}"}}"#, "x".repeat(15_000));
        for _ in 0..20 {
            for &f in &senders {
                hub.relay("digits", f, victim, &big).expect("linked");
            }
        }
        let (n, bytes) = drain();
        assert!(
            bytes <= SIGNAL_BYTES_QUEUED + big.len() + 64 && n >= 16,
            "{n} signals, {bytes} bytes"
        );
    }

    /// One IPv6 /48 is one network, whatever /64s its peers connect from (tunnel brokers
    /// hand out /48s free, each 65,536 /64s): its 128 peers (its share of a task) weigh
    /// four peers in the swarm's round, take a network's share of a newcomer's
    /// neighbours, and report a peer `unreachable` as one network.
    #[test]
    fn an_ipv6_48_is_one_network_for_the_round_the_draws_and_reports() {
        let hub = digits_hub();
        let k = 6;
        let report = |version| PeerReport {
            version,
            ..PeerReport::default()
        };
        let join = |group| {
            hub.join("digits", Arc::new(Outbox::new(4096)), group, "")
                .expect("join")
                .0
        };
        let victim = join(1);
        // 128 peers, each on a /64 of its own in one /48, claim a far round. They come
        // while the victim has no other neighbours, so that many of them link to it (it
        // would take at most a third of k of them beside others).
        let v6 = |net64: u128| (0x2001_0db8_0001u128 << 80) | (net64 << 64);
        let sybils: BTreeSet<PeerId> = (0..128).map(|i| join(v6(i))).collect();
        for (group, version) in [(1, 10), (2, 11), (3, 12), (4, 12), (5, 13)] {
            let id = if group == 1 { victim } else { join(group) };
            hub.store_report("digits", id, report(version))
                .expect("report");
        }
        for &id in &sybils {
            hub.store_report("digits", id, report(1_000_000))
                .expect("report");
        }
        assert_eq!(
            swarm_round(&hub),
            Some(13),
            "an honest round (the /48 weighs four)"
        );

        // Those linked to the victim report it unreachable: one network, not three.
        let mut reported = 0;
        for &s in &sybils {
            if hub
                .neighbours_of("digits", s)
                .is_some_and(|n| n.contains(&victim))
            {
                hub.unreachable("digits", s, victim).expect("a neighbour");
                reported += 1;
            }
        }
        assert!(reported >= 3, "{reported} of the /48 were linked to it");
        {
            let st = hub.lock();
            let v = &st.tasks["digits"].peers[&victim];
            assert_eq!(v.unreachable_from.len(), 1, "one network reported it");
            assert!(v.drawable(Duration::from_secs(60)), "still drawn");
        }

        // Newcomers from other networks take at most a third of k from the /48 (everyone
        // with room, as in a swarm that has it).
        give_everyone_room(&hub);
        for g in 0..10u128 {
            let newcomer = join(100 + g);
            let n = hub.neighbours_of("digits", newcomer).expect("a peer");
            let of_48 = n.iter().filter(|p| sybils.contains(p)).count();
            assert!(
                n.len() == k && of_48 <= k / 3,
                "{of_48} of {} from the /48",
                n.len()
            );
        }
    }

    /// A peer's first receipts come right behind its first report: while the summary
    /// knows no round, a trainer's report gives it its round at once (within
    /// `SUMMARY_MIN` too).
    #[test]
    fn the_first_trainers_report_gives_the_task_its_round_at_once() {
        let hub = digits_hub();
        let round = || swarm_round(&hub);
        let (id, _) = hub
            .join("digits", Arc::new(Outbox::new(8)), 1, "")
            .expect("join");
        let observer = PeerReport {
            role: shoal_shared::protocol::Role::Observer,
            version: 3,
            ..PeerReport::default()
        };
        assert_eq!(round(), None, "no report yet");
        hub.store_report("digits", id, observer).expect("report");
        assert_eq!(round(), None, "an observer's report gives no round");
        let trainer = PeerReport {
            version: 7,
            ..PeerReport::default()
        };
        hub.store_report("digits", id, trainer).expect("report");
        assert_eq!(round(), Some(7), "known at once, without a count");
    }
}

//! One swarm peer as a sans-IO state machine: the training peer and the dashboard's
//! observer. It owns the [`Learner`] (the model and the update rules) and every rule of
//! the peer protocol that is not inside an update: who is waited for, when a round
//! closes, when and from whom a model is downloaded, which key a connection signs with,
//! how often a neighbour may ask for the model.
//!
//! Nothing here does I/O or reads a clock. A driver feeds it [`Event`]s with the time
//! (`handle(event, now_ms)`), calls [`Peer::tick`] when the time given by
//! [`Peer::next_wake`] has come (or simply often), and carries out what
//! [`Peer::poll_output`] returns: messages to send, and local training to run, whose
//! result comes back through [`Peer::trained`]. The simulator (virtual time, CPU
//! backend), the native peer (tokio) and the browser worker (`postMessage`) all drive
//! this same code.
//!
//! Model adoption, the rule no minority may abuse (docs/protocol.md states it
//! normatively):
//! - A peer downloads a model only while it is joining, lagging or observing, and only
//!   from neighbours it asked: it asks up to [`FETCH_ASK`] contributing neighbours at
//!   once, drawn at random (so that arriving first buys nothing). Its first download
//!   (a joiner's, or an observer's before it holds a model) waits until every
//!   neighbour whose channel is up has settled, and at least [`FETCH_ASK`] have or
//!   [`JOIN_GRACE_MS`] passed since its first neighbour came up (at most
//!   [`JOIN_CAP_MS`]): a neighbour that writes the instant its channel opens settles
//!   first, and asked alone it would be the whole quorum. A model nobody asked for is dropped and counted `unasked`.
//! - A connection that breaks the protocol in a way no honest peer does is shunned for
//!   the rest of its life: a model it was neither asked for nor owed as a late answer,
//!   an update whose signature does not verify (or a replay with a held update's
//!   signature over other bytes) or whose signature verifies over a payload that does
//!   not decode, a gossip mix off the schedule (any mix
//!   when the task exchanges weights) or a second one for a round. Everything it sends
//!   afterwards is dropped unread (counted `shunned`), its updates and mixes not yet
//!   used are discarded (an update another open connection not shunned delivered too
//!   stays, on that one's vote; all of a key that signed junk go), its answer to a download in progress no longer counts (it is
//!   counted as silent), and it is never again waited for, asked for the model or
//!   answered.
//! - Lagging needs several witnesses: at least two contributing neighbours, and more
//!   than half of those whose round we know, must have sent a validly signed update for a
//!   round more than `max_staleness` ahead of ours.
//! - From the answers it keeps those whose round is within `max_staleness` of the
//!   answers' (lower) median round (a lagging peer: the median of those more than
//!   `max_staleness` ahead of its own round and at most that past the lower median of
//!   its voters' rounds; the others of its own answers vote, and are never taken).
//!   Two answers agree when their weights are within [`AGREE_RATIO`] of the smaller
//!   norm. It takes only an answer that more than half of the neighbours it asked (a
//!   silent one counts against; one answer after failed tries to join), and more than
//!   half of all the answers (those dropped for their round count against: colluders
//!   that set the median round must not drop the honest answers and then be the
//!   majority of the rest), agree with (itself included): of those, the one nearest
//!   the coordinate-wise median of all kept answers' weights (ties: nearest its own
//!   weights), with the coordinate-wise median of the momenta of the answers that agree
//!   with it.
//! - Round numbers at or above [`MAX_ROUND`](super::wire::MAX_ROUND) are refused on
//!   decode; every other round is only ever a claim that moves nothing on its own. A
//!   round closes early (it still advances by one) only on more than half of the
//!   awaited neighbours' claims, three at least, whose updates for it are held:
//!   catching up, [`Peer::behind`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use super::wire::{Observed, PeerMessage, Snapshot};
use super::{
    Identity, LearnConfig, LearnError, Learner, PublicKey, Received, Rejection, RoundSummary,
};
use crate::protocol::PeerId;
use crate::rate::Allowance;
use crate::rng::SplitMix64;

/// How long a joiner waits for any contributing neighbour before it starts the swarm
/// from the task's seed.
pub const JOIN_GRACE_MS: f64 = 3_000.0;
/// The longest a first download waits past the first neighbour's coming up for those up
/// to settle ([`JOIN_GRACE_MS`]).
pub const JOIN_CAP_MS: f64 = 6_000.0;
/// How long a model download waits for the neighbours it asked.
pub const MODEL_WAIT_MS: f64 = 10_000.0;
/// How long what a closed connection was sent is remembered by peer id ([`Former`]).
pub const FORMER_KEPT_MS: f64 = 600_000.0;
/// The most closed connections remembered at once (the oldest are forgotten first).
pub const MAX_FORMERS: usize = 256;
/// Once a majority of those asked agree, the rest get as long again as that took, at
/// least this long (and never past [`MODEL_WAIT_MS`]).
pub const AGREED_GRACE_MS: f64 = 500.0;
/// Neighbours asked for the model at once: with a task's usual 6 to 8 neighbours, a
/// majority of those asked is honest whenever fewer than a third of the neighbours lie.
pub const FETCH_ASK: usize = 5;
/// Neighbours an observer asks each time. Three, not two: of two answers that agree the
/// one nearer the weights the observer holds wins (their median is their midpoint), so
/// one liar of two that answered with those weights plus a little of its own, download
/// after download, walked the dashboard (and its export) to a model of its own within
/// [`AGREE_RATIO`] of the swarm's. Of three, the coordinate-wise median lies among the
/// two honest answers. Every answer is an upload from a volunteer: three, not five.
pub const OBSERVE_ASK: usize = 3;
/// The most rounds an observer's lone answer (from its one contributing neighbour) may
/// be ahead of the model it holds: the swarm trains on while the observer waits its 10 s
/// between downloads, or while its one neighbour was relinked (about 17 minutes at a
/// round a second), but a round near the largest, on one neighbour's word, is a lie.
pub const OBSERVE_LONE_AHEAD: u64 = 1_000;
/// How often Shoal's dashboard asks for the model. An observer asks for weights only, and
/// asks the neighbours it asked before (whose weights it holds) first: each answers with
/// the change from the weights the observer holds from it, in block-wise int8 (about a
/// quarter of the fp32 weights, an eighth of a trainer's model answer). Any neighbour
/// may ask more often; a peer answers one neighbour at most once per
/// [`ANSWER_INTERVAL_MS`].
pub const OBSERVE_EVERY_MS: f64 = 10_000.0;
/// Every this many downloads an observer draws one of the neighbours it asks at random
/// among those it holds no weights from, instead of one it does (and all after a
/// download in which an asked neighbour stayed silent, or that adopted nothing although
/// an answer was newer than its model). The price of asking the same three: two
/// colluders drawn among them, agreeing on a model of their own, are what an observer
/// shows until then (it only shows and exports; it never trains on it).
pub const OBSERVE_REDRAW: u64 = 30;
/// How far behind the model it holds an observer takes one that most of those asked
/// agree on (see `Peer::step_back`): further than any honest neighbour lags (one more than
/// `max_staleness` behind downloads the model), not merely a slow neighbour.
pub const OBSERVE_BACK_ROUNDS: u64 = 30;
/// Downloads in a row that must agree on such a model before an observer takes it.
pub const OBSERVE_BEHIND: u8 = 2;
/// Observers a peer keeps the weights of (what it last sent each, so that the next
/// answer is a change from them); a further observer gets whole weights each time.
pub const MAX_OBSERVED: usize = 4;
/// An observer that has not asked for this long no longer holds a place among the
/// [`MAX_OBSERVED`] (three of Shoal's dashboard's intervals).
pub const OBSERVED_IDLE_MS: f64 = 3.0 * OBSERVE_EVERY_MS;
/// Pause after a model download that found nothing to adopt.
pub const FETCH_RETRY_MS: f64 = 5_000.0;
/// Failed downloads after which a joiner starts from the seed instead.
pub const JOIN_ATTEMPTS: u32 = 3;
/// With weights changes, when more than half of the neighbours our updates go to (two at
/// least) hold our copy and sent no receipt of their own for this many of our updates for
/// rounds they closed (they used none of them; since the last receipt, keyframe or whole
/// copy), and none of them is a round ahead of ours (which makes ours stale there), our
/// next update is a keyframe, where the upload budget's allowance has room for it: the
/// copy they hold may be off, and each change of ours then lands there as an outlier.
/// Three native peers, one a joiner: both neighbours screened its updates out for up to
/// 13 rounds in a row (its model scored as theirs from the sixth) and credited it for
/// 6-8 of 20 rounds, in 2 of 16 runs; with this rule 1 of 28 (9 of 20); what was left
/// is the joiner's own copy lagging, which its own screen sees at once
/// (`Learner::copy_screened_out`). Twice as many updates each
/// time in a row this is so (up to [`KEYFRAME_EVERY`](crate::learn::KEYFRAME_EVERY)): a
/// peer whose updates arrive stale, or neighbours that withhold receipts, cost a
/// keyframe now and then, not every few rounds (a majority that alternates one receipt
/// with silence gets a keyframe every third update: bounded by the upload budget where
/// there is one); one neighbour's receipts count only for itself. A minority is passed
/// over: counted one by one (each silent neighbour then treated as lacking our copy, and
/// sent it whole where a keyframe did not fit the budget), `hetero-12-budget` took twice
/// the time for its 20 rounds.
pub const UNHEARD_UPDATES: u32 = 2;
/// The rounds of unreceipted updates a peer keeps per neighbour (the most
/// [`UNHEARD_UPDATES`] can ask for).
const UNHEARD_KEPT: usize = crate::learn::KEYFRAME_EVERY as usize;
/// Two model answers agree when their weights are within this share of the smaller of
/// their norms (honest models of one swarm differ by a few percent; a model that far
/// from the others is another model).
pub const AGREE_RATIO: f32 = 0.5;
/// How long after a channel opens a peer first writes to it. The `webrtc` crate (0.21)
/// can lose a message that arrives in the same read as the last packet of the handshake,
/// and a lost message wedges a reliable ordered channel for good.
pub const GREET_AFTER_MS: f64 = 500.0;
/// The shortest interval between two model answers to the same neighbour (a request
/// is a few bytes, the answer the whole model).
pub const ANSWER_INTERVAL_MS: f64 = 2_000.0;
/// Under an upload budget, model answers (to joiners, lagging peers and observers) may
/// send at most this share of the budget's rate besides it, in bursts of 10 s of that
/// rate or one model whole (fp32) if that is more: a neighbour asking every 2 s for our
/// whole weights would take a visitor 10 times the demo's budget. A model request on a
/// connection not yet answered may use twice that burst (joiners come in bursts). A
/// quarter starved the demo's dashboard (a first answer of whole weights, then a change
/// every 20 s or so from each contributor).
pub const ANSWER_SHARE: f64 = 0.5;
/// Without an upload budget, model answers (to all neighbours together) send at most the
/// bytes of one whole fp32 model (8 per parameter) and [`ANSWER_LEAST_BYTES`] every this
/// many milliseconds, in bursts of up to that much (twice for a first request), as under a
/// budget: about four model answers (kind 10, 2 bytes a parameter) at once and one every
/// 5 s after. Without it six neighbours asking every 2 s took a volunteer 6 kind 10
/// models every 2 s (the text task's: 0.7 MB/s, twelve times what its own updates send).
pub const ANSWER_MODEL_MS: f64 = 20_000.0;
/// What [`ANSWER_MODEL_MS`] adds to a model's bytes: a small model's answers are mostly
/// their headers.
pub const ANSWER_LEAST_BYTES: f64 = 65_536.0;
/// While more than half of the answers' allowance is spent, a neighbour is answered only
/// while the answers it was sent in the last this many milliseconds total less than an
/// equal share of that time's rate among the neighbours that asked in it: one neighbour
/// asking every 2 s for whole models kept the allowance spent, and a dashboard's or a
/// lagging peer's request found it so about four times in five.
pub const ANSWER_FAIR_MS: f64 = 30_000.0;
/// Requests (and answers) remembered for [`ANSWER_FAIR_MS`], at most: one per neighbour
/// per [`ANSWER_INTERVAL_MS`] is recorded, so 32 neighbours fit.
const ANSWER_ASKS_KEPT: usize = 1024;

/// The bytes per millisecond a peer's model answers (to all neighbours together) may send
/// for a model of `params` parameters: [`ANSWER_SHARE`] of an upload budget of `budget`
/// bytes per millisecond, else [`ANSWER_MODEL_MS`]'s rate.
pub fn answer_bytes_per_ms(params: usize, budget: Option<f64>) -> f64 {
    budget.map_or(
        ((8 * params) as f64 + ANSWER_LEAST_BYTES) / ANSWER_MODEL_MS,
        |b| b * ANSWER_SHARE,
    )
}

/// How many times `round_deadline_ms` a round waits while most of the neighbours it
/// waits for have not sent their update for it (see [`Peer::round_wait`]).
pub const HOLD_FACTOR: f64 = 3.0;

/// Once most awaited neighbours have sent, a round waits for the rest this many times
/// the largest measured lateness among them (see [`Peer::round_wait`]).
pub const LATE_FACTOR: f32 = 2.0;
/// ... but never less than this share of `round_deadline_ms`.
pub const LATE_FLOOR: f32 = 0.25;
/// Rounds a neighbour that says it contributes is waited for before its first update
/// arrives: after that many closed without one, rounds no longer wait for it until one
/// comes (see [`Peer::awaited`]).
pub const SILENT_ROUNDS: u32 = 3;
/// How fast a neighbour's lateness comes down: a measurement below it moves it this share
/// of the way (one above it takes its place at once).
const LATE_DECAY: f32 = 0.25;

/// In rounds sized in time (`round_ms` > 0), how long one chunk of local training lasts
/// at the peer's measured step rate: the granularity at which it notices that its round
/// closed or its run is done, and at which a driver may rest between chunks.
pub const CHUNK_MS: f64 = 200.0;

/// The upload budget's least allowance for bursts: an update goes out once it fits in
/// this much budget ahead of the budget's rate — all of it: the keyframe or the whole
/// copies that neighbours who lack our copy need with it (or further where one keyframe
/// to every neighbour it goes to takes longer to pay for, see `Peer::upload_burst_ms`).
/// Once what was sent before is paid, an update goes out in any case. Over any hour
/// updates send at most the budget and that allowance more, plus one round's copies.
pub const UPLOAD_BURST_MS: f64 = 10_000.0;

/// What a peer is for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PeerRole {
    /// Trains and exchanges updates.
    Trainer,
    /// Downloads the model every `every_ms` and never sends an update (the dashboard).
    Observer {
        /// Milliseconds between downloads.
        every_ms: f64,
    },
}

/// What the transport reports, and what the person running the peer decides.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A data channel to this neighbour opened.
    Up(PeerId),
    /// The connection to this neighbour closed.
    Down(PeerId),
    /// A whole message from a neighbour.
    Message {
        /// The neighbour (its connection).
        from: PeerId,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The researcher paused or resumed the task.
    TaskPaused(bool),
    /// The visitor paused or resumed this peer.
    Paused(bool),
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send these bytes to a neighbour.
    Send {
        /// The neighbour.
        to: PeerId,
        /// The message.
        data: Vec<u8>,
    },
    /// Train `steps` inner steps at the learning rate for `round` (the task's schedule),
    /// from [`Peer::train_from`] (or, with `resume`, on from the weights the previous
    /// chunk ended with), then call [`Peer::trained`] with `round` and the time then.
    Train {
        /// The round the training is for (the update it makes).
        round: u64,
        /// Inner steps.
        steps: u32,
        /// Continue from the trainer's own current weights instead of loading.
        resume: bool,
    },
    /// A round closed.
    RoundClosed(RoundSummary),
    /// A receipt this peer signed for a neighbour's update it used: send it to the
    /// server (`receipt`, hex). The neighbour gets it over its data channel already.
    Receipt(Vec<u8>),
    /// A downloaded model replaced ours.
    Adopted {
        /// Its round.
        round: u64,
    },
    /// Close the connection to this neighbour and report it `unreachable` to the
    /// server (which then links each side to another peer): it broke the protocol in a
    /// way no honest peer does, and the connection is shunned (the peer ignores it from
    /// now on either way).
    Drop(PeerId),
}

/// What the person running a peer sees.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Progress {
    /// The model version (rounds completed).
    pub round: u64,
    /// Inner steps trained by this peer.
    pub local_steps: u64,
    /// Samples trained on by this peer.
    pub samples: u64,
    /// Mean local loss of the last round.
    pub loss: f32,
    /// Held-out accuracy of the current model, when evaluated (per next byte for a
    /// language model).
    pub accuracy: Option<f32>,
    /// Held-out loss of the current model (mean nats per prediction), when evaluated.
    pub test_loss: Option<f32>,
    /// Neighbours with an open channel that contribute updates.
    pub peers: usize,
    /// Neighbours with an open channel, contributing or not (joining, paused, observing).
    pub connected: usize,
    /// Bytes sent over data channels.
    pub bytes_up: u64,
    /// Bytes received.
    pub bytes_down: u64,
    /// Neighbours' updates used so far.
    pub used: u64,
    /// Receipts neighbours signed for our updates (each says one of them used one).
    pub receipts: u64,
    /// Rejected messages by reason.
    pub rejected: BTreeMap<String, u64>,
    /// `"joining"`, `"training"`, `"waiting"`, `"paused"` or `"observing"`.
    pub phase: &'static str,
    /// Training throughput over the last rounds (samples per second of wall time).
    pub samples_per_s: f32,
    /// Paused by the visitor.
    pub paused: bool,
    /// Paused by the researcher (the whole task).
    pub task_paused: bool,
    /// Differential privacy: epsilon spent and the budget (`None` without it).
    pub privacy: Option<super::PrivacyProgress>,
}

impl Progress {
    /// Takes in one measurement of the training throughput (samples per second) into
    /// `samples_per_s`, a moving average.
    fn note_rate(&mut self, per_s: f64) {
        let (s, r) = (&mut self.samples_per_s, per_s as f32);
        *s = if *s == 0.0 { r } else { 0.7 * *s + 0.3 * r };
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// No model yet (since when).
    Joining { since: f64 },
    /// Ready to train the next round.
    Ready,
    /// Local training of `round` (`steps` steps) asked for at `since`.
    Training { round: u64, since: f64, steps: u32 },
    /// Update sent at `since`; waiting for the neighbours' updates.
    Waiting { since: f64 },
    /// An observer: never trains.
    Observing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Join,
    Lag,
    Observe,
}

struct Fetch {
    purpose: Purpose,
    started: f64,
    /// Asked and still expected to answer.
    asked: BTreeSet<PeerId>,
    /// How many were asked: the count a majority is taken of. One that said it holds no
    /// model or was shunned still counts (or a download that lost its honest answers
    /// would need fewer agreeing ones); one whose channel closed does not (it is gone,
    /// see `stop_waiting_for`).
    n_asked: usize,
    answers: BTreeMap<PeerId, Snapshot>,
    /// When the answers first gave a verdict with a majority of those asked agreeing.
    agreed_at: Option<f64>,
}

impl Fetch {
    /// When the download ends without every answer: [`MODEL_WAIT_MS`] after it started,
    /// or sooner once a majority agreed ([`AGREED_GRACE_MS`]).
    fn due(&self) -> f64 {
        let limit = self.started + MODEL_WAIT_MS;
        self.agreed_at.map_or(limit, |at| {
            (at + (at - self.started).max(AGREED_GRACE_MS)).min(limit)
        })
    }
}

/// What a neighbour's closed connection had been sent, kept by peer id for
/// [`FORMER_KEPT_MS`]: a neighbour that closes its channel and opens another again and
/// again (no server needed) must not be sent each time what it just got — our update
/// for the round (the greeting re-sends it), a whole copy (one per [`KEYFRAME_EVERY`]
/// rounds), the model answers' first-request allowance — each reconnect would spend our
/// upload budget. Its first reconnect in that time starts afresh but for the answers'
/// allowance (a network blip must not leave an honest neighbour without our copy for 30
/// rounds); later ones take up where the last left off.
#[derive(Clone, Copy)]
struct Former {
    sent_round: Option<u64>,
    whole_round: Option<u64>,
    keyframe_round: Option<u64>,
    had_copy: bool,
    /// Its [`Neighbour::silent_rounds`] if it never sent an update, else 0: a neighbour
    /// that never sends does not get its first rounds' wait again by reconnecting.
    silent_rounds: u32,
    answered_at: Option<f64>,
    closed_at: f64,
    /// Connections it reopened within [`FORMER_KEPT_MS`] of the one before.
    reconnects: u32,
    /// The key it signed with (not one that moved in from another connection).
    key: Option<PublicKey>,
}

#[derive(Default)]
struct Neighbour {
    /// The key this connection signs updates with, fixed by its first valid update.
    key: Option<PublicKey>,
    /// Said it sends no updates (observer, paused, joining).
    idle: bool,
    /// The highest round of a valid update it sent: a claim, used only as one witness.
    claim: Option<u64>,
    /// When we last sent it our model.
    answered_at: Option<f64>,
    /// When its channel opened.
    up_at: f64,
    /// Whether we told it our status yet.
    greeted: bool,
    /// Whether its own status has had time to arrive (`2 * GREET_AFTER_MS` after the
    /// channel opened): a joiner asks only such neighbours.
    settled: bool,
    /// Model requests of ours it has not answered yet: that many models from it are
    /// answers (late ones too, after their download ended); one more is a push.
    owed: u32,
    /// It broke the protocol as no honest peer does (see the module's rules): nothing it
    /// sends counts any more.
    shunned: bool,
    /// The ledger head it holds as far as we know: the last we sent it or it sent us.
    head_sent: Option<crate::trust::head::HeadId>,
    /// It observes: the weights it holds from us (as our last answer left them) and their
    /// hash.
    gave: Option<(Vec<f32>, [u8; 32])>,
    /// We observe: the weights we hold from it and their hash.
    held: Option<(Vec<f32>, [u8; 32])>,
    /// Weights changes: it holds our public copy as our last update left it (it got
    /// every update of ours since one that set the copy).
    keyed: bool,
    /// The round of the last update of ours it was sent (each goes to it once).
    sent_round: Option<u64>,
    /// Weights changes: the round of the last whole copy it was sent (at most one per
    /// [`KEYFRAME_EVERY`] rounds; otherwise it waits for the next keyframe).
    whole_round: Option<u64>,
    /// Weights changes: it has held our copy (a keyframe or a whole copy reached it).
    had_copy: bool,
    /// Weights changes: the round of the last keyframe to all that its lacking our copy,
    /// after it had held it, helped call for (see [`Peer::lacking_for_keyframe`]).
    keyframe_round: Option<u64>,
    /// Weights changes: the rounds of our updates sent to it since its last receipt
    /// (at most [`UNHEARD_KEPT`], since it last got a keyframe or our copy whole), and
    /// how many times in a row they made our next update a keyframe
    /// ([`UNHEARD_UPDATES`]).
    unheard: VecDeque<u64>,
    unheard_times: u32,
    /// Its key moved here from another connection (a reconnected neighbour, or one that
    /// relays another's updates): closing or shunning it then leaves that key's held
    /// updates and copy alone (its owner may be on another connection).
    key_moved_in: bool,
    /// The key of an update it delivered byte for byte after another connection had
    /// (the signer's own copy, when a relay won the race): it is heard for that key's
    /// updates and gets their receipts, though the key stays bound where it went.
    copy_of: Option<PublicKey>,
    /// The keys and rounds of the replays checked against the updates held
    /// ([`Neighbour::copy_of`]), at most [`COPIES_CHECKED`]: each is hashed once.
    copy_checked: Vec<(PublicKey, u64)>,
    /// The key its previous connection signed with ([`Former::key`]): should this one
    /// sign with another, the updates of that key still held are dropped (one neighbour,
    /// one vote: else it reconnected under a fresh key, again and again, each update of
    /// the round held counting).
    former_key: Option<PublicKey>,
    /// Connections this neighbour reopened in a row, each within [`FORMER_KEPT_MS`] of
    /// the last ([`Former`]).
    reconnects: u32,
    /// How long after our round opened its update for that round arrives, in
    /// milliseconds (0 when it came before), late ones included: the latest
    /// measurement when it is the largest yet, else coming down toward the new ones by
    /// [`LATE_DECAY`] each. `None` until measured.
    lateness: Option<f32>,
    /// The round of its latest update and when that arrived.
    arrived: Option<(u64, f64)>,
    /// Rounds closed since its latest update (or its own copy of one) arrived, whatever
    /// round it names (see `awaited`).
    quiet_rounds: u32,
    /// Rounds closed while it had sent no update yet and said it contributes (at any
    /// time in the round: see [`SILENT_ROUNDS`]).
    silent_rounds: u32,
    /// Whether it said it contributes since the last round closed (a neighbour that says
    /// so after a round opens and takes it back before the deadline was waited for).
    said_contributing: bool,
    /// Updates it may still send now (see [`UPDATE_RATE`]; `None` until its first).
    update_allowance: Option<Allowance>,
}

/// Updates one connection may send a second, sustained, beyond a burst of
/// [`UPDATE_BURST`]; past that they are dropped unread (`request_rate`). An honest
/// neighbour sends one a round (rounds of steps of a small model on a fast machine: a
/// few a second). One neighbour's tiny changes, each for a later round than the last (a
/// valid signature each, and a pass over the whole model to take in), 200 a second, took
/// most of a browser worker's time.
pub const UPDATE_RATE: f64 = 50.0;
/// See [`UPDATE_RATE`].
pub const UPDATE_BURST: f64 = 100.0;

impl Neighbour {
    /// Whether it is one to ask for the model: greeted, says it contributes, not shunned.
    fn contributes(&self) -> bool {
        !self.idle && self.greeted && !self.shunned
    }

    /// Whether it delivered an update signed by `key`: the key is bound to it, or it sent
    /// that key's update byte for byte after a relay did ([`Neighbour::copy_of`]).
    fn delivers(&self, key: &PublicKey) -> bool {
        self.key.as_ref() == Some(key) || self.copy_of.as_ref() == Some(key)
    }

    /// The keys it delivers updates of (see [`delivers`](Self::delivers)).
    fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.key.iter().chain(&self.copy_of)
    }

    /// Whether `fresh` holds for a key it delivers updates of.
    fn delivers_any(&self, fresh: impl Fn(&PublicKey) -> bool) -> bool {
        self.keys().any(fresh)
    }

    /// Notes that its update for `round` arrived at `now_ms`, unless one for our
    /// `current` round (or later) is already noted: what `round_wait` reads is when its
    /// update for our open round came.
    fn note_arrival(&mut self, round: u64, current: u64, now_ms: f64) {
        // Whatever round it names: an honest neighbour ahead of us (churn: ours lags until
        // a download) is still waited for (counting only updates within a few rounds of
        // ours, `churn-30` fell from the target to 66% after reaching it). A liar that
        // sends an update every few rounds is waited for as any neighbour that sends.
        self.quiet_rounds = 0;
        if self.arrived.is_none_or(|(r, _)| round > r && r < current) {
            self.arrived = Some((round, now_ms));
        }
    }

    /// Weights changes: whether it used none of our last updates (no receipt from it
    /// for [`UNHEARD_UPDATES`] of them for rounds it has closed — it sent an update for a
    /// later one —, twice as many for each time in a row this was so, at most
    /// [`KEYFRAME_EVERY`](crate::learn::KEYFRAME_EVERY)).
    fn unheard(&self) -> bool {
        let limit = UNHEARD_UPDATES
            .saturating_mul(1 << self.unheard_times.min(8))
            .min(crate::learn::KEYFRAME_EVERY as u32);
        let closed = self
            .unheard
            .iter()
            .filter(|r| self.claim.is_some_and(|c| c > **r))
            .count();
        closed >= limit as usize
    }

    /// Whether it may get a whole copy of ours with our update for `round`: at most one
    /// per [`KEYFRAME_EVERY`](crate::learn::KEYFRAME_EVERY) rounds.
    fn may_get_whole(&self, round: u64) -> bool {
        self.whole_round
            .is_none_or(|w| round >= w + crate::learn::KEYFRAME_EVERY)
    }
}

/// Whether a round may wait for `n`: it says it contributes (not idle, not shunned), and
/// the screen does not distrust its updates (a liar must not set the pace).
fn contributes_to_rounds(learner: &Learner, n: &Neighbour) -> bool {
    !n.idle && !n.key.is_some_and(|k| learner.distrusts(&k))
}

/// Moves the peers for which `first` holds to the front, both groups in their order (a
/// stable sort on a yes/no key, without instantiating the standard library's sort for
/// each key: the browser's bundle carries every such copy).
fn front_first(v: &mut Vec<PeerId>, first: &dyn Fn(&PeerId) -> bool) {
    let (mut front, back): (Vec<PeerId>, Vec<PeerId>) = v.drain(..).partition(|p| first(p));
    front.extend(back);
    *v = front;
}

/// Whether a keyframe to all `to` recipients is the way to give our copy to the
/// `lacking` of them that do not hold it: half or more. A whole copy is a keyframe's
/// size, so the keyframe costs at most twice their whole copies (plus the changes it
/// replaces) and leaves every neighbour our copy exactly, without the whole copies'
/// rounding. (With fp32 whole copies, four times a keyframe, a quarter was the line.)
fn keyframe_for_lacking(lacking: usize, to: usize) -> bool {
    lacking > 0 && 2 * lacking >= to
}

/// Rounds in time: the training toward our next update.
struct Run {
    /// The round its update is for.
    round: u64,
    /// When it started (our previous update went out, or training began).
    started: f64,
    samples: u64,
    steps: u64,
    /// Sum of the chunks' mean losses times their steps.
    loss: f64,
    /// Where training continues from: the weights the last chunk ended with (after a
    /// rebase, the rebased ones).
    work: Vec<f32>,
    /// Set while the previous round is open: the weights the run started from. Once that
    /// round closes, the run's work so far (`work - from`) moves onto the new model.
    carry_from: Option<Vec<f32>>,
    /// The trainer must load `work` before the next chunk.
    reload: bool,
    /// It skipped a round to catch up with the neighbours (at most once per run).
    skipped: bool,
}

impl Run {
    /// A run toward the update for `round`, from `work` (which the trainer must load
    /// unless `reload` is false), carrying its work from `carry_from` onto the model that
    /// the open round ends with, if one is open.
    fn new(
        round: u64,
        started: f64,
        work: Vec<f32>,
        carry_from: Option<Vec<f32>>,
        reload: bool,
    ) -> Self {
        Self {
            round,
            started,
            samples: 0,
            steps: 0,
            loss: 0.0,
            work,
            carry_from,
            reload,
            skipped: false,
        }
    }
}

/// One peer of the swarm, sans-IO.
pub struct Peer {
    role: PeerRole,
    learner: Learner,
    cfg: LearnConfig,
    phase: Phase,
    nbrs: BTreeMap<PeerId, Neighbour>,
    fetch: Option<Fetch>,
    /// No new download before this time.
    next_fetch_at: f64,
    join_attempts: u32,
    /// An observer's downloads so far (every [`OBSERVE_REDRAW`]th draws a neighbour at
    /// random).
    observed: u64,
    /// The next observer download asks neighbours drawn at random only.
    observe_redraw: bool,
    /// An observer's downloads in a row whose answers agreed on a model far behind the
    /// one it holds ([`OBSERVE_BACK_ROUNDS`]).
    observed_behind: u8,
    rng: SplitMix64,
    out: VecDeque<Output>,
    progress: Progress,
    last_train_at: Option<f64>,
    /// Whether neighbours were last told that we contribute.
    announced: Option<bool>,
    /// Our update for the round in progress, for neighbours that start contributing
    /// after we sent it.
    sent_update: Option<(u64, Vec<u8>)>,
    /// Rounds in time: the run in progress.
    run: Option<Run>,
    /// Rounds in time: when our update for the open round went out (`None`: no round
    /// open). In steps, `Phase::Waiting` holds this.
    open_since: Option<f64>,
    /// Our last rounds opened (our update sent), oldest first, and when, kept after
    /// they close (at most `max_staleness + 1`, 8 at most): what neighbours' lateness
    /// is measured against, a late update's against its own round.
    opened: VecDeque<(u64, f64)>,
    /// Rounds in time: measured inner steps per millisecond.
    step_rate: Option<f64>,
    /// The upload budget (`upload_mb_per_hour`): when the bytes our updates sent so far
    /// are paid at the budget's rate. The next update goes out once it, with the keyframe
    /// or whole copies it must carry to neighbours who lack our copy, fits in the burst
    /// allowance ([`UPLOAD_BURST_MS`] or more) ahead of that, or once they are paid.
    upload_free_at: f64,
    /// The same for model answers, at [`ANSWER_SHARE`] of the budget's rate (or
    /// [`ANSWER_MODEL_MS`]'s without one).
    answers_free_at: f64,
    /// Model answers sent in the last [`ANSWER_INTERVAL_MS`], and to whom (kept when a
    /// neighbour's connection closes; at most one per neighbour in that time).
    answered: VecDeque<(PeerId, f64)>,
    /// Requests of the last [`ANSWER_FAIR_MS`] (bytes 0) and answers sent (their bytes),
    /// by neighbour: the equal shares of a spent allowance.
    asks: VecDeque<(PeerId, f64, usize)>,
    /// Closed connections' [`Former`] records, by peer id.
    formers: Vec<(PeerId, Former)>,
}

impl Peer {
    /// A peer that joins the swarm: it downloads the model from its neighbours, or
    /// starts from `seed_weights` (the task's) when it finds itself alone.
    pub fn new(
        cfg: LearnConfig,
        task: &str,
        id: Identity,
        seed_weights: Vec<f32>,
        role: PeerRole,
        now_ms: f64,
    ) -> Result<Self, LearnError> {
        let seed = u64::from_le_bytes(id.public()[..8].try_into().unwrap_or([7; 8]));
        let learner = Learner::new(cfg.clone(), task, id, seed_weights)?;
        let phase = match role {
            PeerRole::Trainer => Phase::Joining { since: now_ms },
            PeerRole::Observer { .. } => Phase::Observing,
        };
        Ok(Self {
            role,
            learner,
            cfg,
            phase,
            nbrs: BTreeMap::new(),
            fetch: None,
            next_fetch_at: f64::NEG_INFINITY,
            join_attempts: 0,
            observed: 0,
            observe_redraw: false,
            observed_behind: 0,
            rng: SplitMix64::new(seed ^ 0x9e37_79b9),
            out: VecDeque::new(),
            progress: Progress {
                phase: if phase == Phase::Observing {
                    "observing"
                } else {
                    "joining"
                },
                ..Progress::default()
            },
            last_train_at: None,
            announced: None,
            sent_update: None,
            run: None,
            open_since: None,
            opened: VecDeque::new(),
            step_rate: None,
            upload_free_at: f64::NEG_INFINITY,
            answers_free_at: f64::NEG_INFINITY,
            answered: VecDeque::new(),
            asks: VecDeque::new(),
            formers: Vec::new(),
        })
    }

    /// Starts from a model of our own (a keeper's checkpoint, or the simulator's common
    /// start) instead of downloading one; returns whether it was taken.
    pub fn resume(&mut self, snapshot: Snapshot) -> bool {
        if self.role != PeerRole::Trainer || !self.learner.adopt(snapshot) {
            return false;
        }
        self.phase = Phase::Ready;
        self.run = None;
        self.open_since = None;
        self.progress.round = self.learner.round();
        true
    }

    /// The protocol state (model, round, counters).
    pub fn learner(&self) -> &Learner {
        &self.learner
    }

    /// The protocol state, mutable: for the simulator's attackers only.
    pub fn learner_mut(&mut self) -> &mut Learner {
        &mut self.learner
    }

    /// The current model (the round-start weights).
    pub fn weights(&self) -> &[f32] {
        self.learner.weights()
    }

    /// What the trainer loads for an [`Output::Train`] without `resume`: the round-start
    /// weights, or in rounds sized in time the run's (rebased) weights.
    pub fn train_from(&self) -> &[f32] {
        match &self.run {
            Some(r) if self.cfg.timed() => &r.work,
            _ => self.learner.weights(),
        }
    }

    /// What to show.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Sets the held-out `(loss, accuracy)` the driver measured for the current model.
    pub fn set_evaluation(&mut self, evaluation: Option<(f32, f32)>) {
        self.progress.test_loss = evaluation.map(|e| e.0);
        self.progress.accuracy = evaluation.map(|e| e.1);
    }

    /// Whether training is paused (by the visitor or the researcher, or because the
    /// privacy budget is spent and the task says stop).
    pub fn is_paused(&self) -> bool {
        self.progress.paused || self.progress.task_paused || !self.learner.may_send()
    }

    /// Whether the peer holds a model (trained, adopted or started from the seed).
    pub fn has_model(&self) -> bool {
        self.learner.is_started()
    }

    /// The next thing the driver must do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`tick`](Self::tick) next has something to do (a deadline, a download's
    /// end, a join grace), or `None` when only an event can move the peer.
    pub fn next_wake(&self) -> Option<f64> {
        let mut t: Option<f64> = None;
        let mut at = |x: f64| t = Some(t.map_or(x, |y: f64| y.min(x)));
        if let Some(f) = &self.fetch {
            at(f.due());
        }
        for n in self.nbrs.values().filter(|n| !n.greeted) {
            at(n.up_at + GREET_AFTER_MS);
        }
        match self.phase {
            Phase::Joining { since } => {
                if self.fetch.is_none() {
                    let first = self
                        .first_download_wake()
                        .filter(|_| self.join_attempts == 0);
                    at(first
                        .unwrap_or(since + JOIN_GRACE_MS)
                        .max(self.next_fetch_at));
                }
            }
            Phase::Waiting { since } => at(since + self.round_wait().1),
            _ if self.open_since.is_some() => {
                at(self.open_since.unwrap_or_default() + self.round_wait().1)
            }
            Phase::Observing => {
                // With no neighbour to ask, nothing is due until one comes up or says it
                // contributes (events): a wake-up now would be one in the past.
                if let PeerRole::Observer { .. } = self.role
                    && self.nbrs.values().any(Neighbour::contributes)
                {
                    let first = self
                        .first_download_wake()
                        .filter(|_| !self.learner.is_started());
                    at(first.map_or(self.next_fetch_at, |w| w.max(self.next_fetch_at)));
                }
            }
            Phase::Ready | Phase::Training { .. } => {}
        }
        t
    }

    /// The neighbours a round waits for: contributing ones, except one whose updates the
    /// screen distrusts (a liar must not set the pace), a shunned one (it counts as
    /// idle), one that has sent no update in the [`SILENT_ROUNDS`] rounds it was waited
    /// for (until its first comes: with no lateness measured it was waited for the whole
    /// `round_deadline_ms` every round, so a neighbour that said it contributes and never
    /// sent held each of its neighbours' rounds that long for as long as it stayed), and
    /// one whose latest update is for a round more than [`SILENT_ROUNDS`] before ours
    /// or arrived more than [`SILENT_ROUNDS`] closed rounds ago (one that sent once and
    /// then no more held every round twice its last lateness; with delta exchange, where
    /// an update for any later round is taken, one update claiming a round far ahead
    /// held every round after it for as long as its connection stayed).
    fn awaited(&self) -> Vec<(PeerId, &Neighbour)> {
        let round = self.learner.round();
        self.nbrs
            .iter()
            .map(|(p, n)| (*p, n))
            .filter(|(_, n)| contributes_to_rounds(&self.learner, n))
            .filter(|(_, n)| match (n.arrived, n.claim) {
                (None, _) => n.silent_rounds < SILENT_ROUNDS,
                // The highest round it sent for (a relayed copy's arrival where it sent
                // none itself): `arrived` stays at the first update for our round or
                // later, so after a model download every neighbour's was old.
                (Some((r, _)), claim) => {
                    claim.unwrap_or(r).saturating_add(u64::from(SILENT_ROUNDS)) >= round
                        && n.quiet_rounds <= SILENT_ROUNDS
                }
            })
            .collect()
    }

    /// How long the open round waits for the neighbours' updates: `round_deadline_ms`
    /// once at least half of the awaited neighbours have sent their update for it (the
    /// rest are stragglers: the round does not wait for a minority), else up to
    /// [`HOLD_FACTOR`] times that. A neighbour that says it contributes and sends
    /// nothing counts as missing: a minority of such neighbours holds nothing past the
    /// deadline, a majority holds every round up to the limit. (Counting only neighbours
    /// that sent recently ended byzantine-25 up to 1.5 points below its clean run, this
    /// rule 0.5 to 0.9.) A peer that moved on at the deadline without most of its
    /// neighbours would get their updates for rounds it has left (stale, with weights),
    /// train alone and drift away from the swarm.
    ///
    /// Once most are in, the deadline adapts to each straggler's measured lateness: the
    /// round waits [`LATE_FACTOR`] times the usual lateness of the latest of the missing
    /// neighbours (one not measured yet counts as `round_deadline_ms`), and at least
    /// [`LATE_FLOOR`] of `round_deadline_ms` past the arrival that made most of them in
    /// (a round whose updates all come late gives the rest as long), at most
    /// `round_deadline_ms` (from the round's opening, as every limit). A neighbour slow but
    /// steady (a thin uplink) is still waited for, so its work counts; one that stalls
    /// (a throttled tab, a peer gone without a word) costs each round twice its usual
    /// wait, not the whole deadline. A liar's lateness buys it no longer a wait than the
    /// fixed deadline did.
    ///
    /// Returns whether every awaited neighbour's update is in (none awaited counts as
    /// not: a round with neighbours none of which contributes yet waits its limit), or
    /// there are no neighbours at all, and that limit.
    fn round_wait(&self) -> (bool, f64) {
        let deadline = self.cfg.round_deadline_ms as f32;
        let awaited = self.awaited();
        let (ins, missing): (Vec<&(PeerId, &Neighbour)>, Vec<_>) = awaited
            .iter()
            .partition(|&&(p, n)| self.heard_for_round(p, n));
        let ins: Vec<&Neighbour> = ins.into_iter().map(|&(_, n)| n).collect();
        let missing: Vec<&Neighbour> = missing.into_iter().map(|&(_, n)| n).collect();
        let all_in = !awaited.is_empty() && missing.is_empty() || self.nbrs.is_empty();
        let limit = if awaited.is_empty() {
            deadline
        } else if 2 * missing.len() > awaited.len() {
            HOLD_FACTOR as f32 * deadline
        } else {
            // When most were in: the arrival (after the round opened) that made them most.
            let open = self.open_at();
            let round = self.learner.round();
            let mut arrivals: Vec<f32> = ins
                .iter()
                .map(|n| match (n.arrived, open) {
                    (Some((r, t)), Some(o)) if r >= round => (t - o).max(0.0) as f32,
                    _ => 0.0,
                })
                .collect();
            arrivals.sort_unstable_by(f32::total_cmp);
            let most = arrivals
                .get((awaited.len() - awaited.len() / 2).saturating_sub(1))
                .copied()
                .unwrap_or(0.0);
            missing
                .iter()
                .map(|n| n.lateness.map_or(deadline, |l| LATE_FACTOR * l))
                .fold(most + LATE_FLOOR * deadline, f32::max)
                .min(deadline)
        };
        (all_in, f64::from(limit))
    }

    /// Whether neighbour `p` delivered an update for our round: one of the key bound to
    /// it, or its own copy of an update of the key it delivers copies of. A copy recorded
    /// in an earlier round does not count for this one: the round waits for this
    /// round's (a relay that delivered it first and was then shunned counts for no vote,
    /// and the signer's copy arriving after the close found nothing to count on).
    fn heard_for_round(&self, p: PeerId, n: &Neighbour) -> bool {
        n.key
            .as_ref()
            .is_some_and(|k| self.learner.has_fresh_from(k))
            || n.copy_of
                .as_ref()
                .is_some_and(|k| self.learner.delivered_fresh(k, p.0))
    }

    /// How late an update for `round` arriving now is: from when we opened that round,
    /// if it is one of our last ones (`opened`); 0 when it is for a later round than
    /// ours, or for ours before we opened it (it came first); else `None` (nothing to
    /// measure it against).
    fn lateness_of(&self, round: u64, now_ms: f64) -> Option<f32> {
        if let Some((_, at)) = self.opened.iter().rev().find(|(r, _)| *r == round) {
            return Some((now_ms - at).max(0.0) as f32);
        }
        let current = self.learner.round();
        (round > current || round == current && !self.round_open()).then_some(0.0)
    }

    /// Notes that we opened `round` at `now_ms` (see `opened`).
    fn note_opened(&mut self, round: u64, now_ms: f64) {
        let keep = (self.cfg.max_staleness as usize + 1).min(8);
        while self.opened.len() >= keep {
            self.opened.pop_front();
        }
        self.opened.push_back((round, now_ms));
    }

    /// Keeps what the closed connection to `p` was sent ([`Former`]), within
    /// [`MAX_FORMERS`].
    fn remember_former(&mut self, p: PeerId, n: &Neighbour, now_ms: f64) {
        self.formers
            .retain(|(q, f)| *q != p && now_ms - f.closed_at < FORMER_KEPT_MS);
        if self.formers.len() >= MAX_FORMERS
            && let Some(oldest) = (0..self.formers.len()).min_by(|&a, &b| {
                self.formers[a]
                    .1
                    .closed_at
                    .total_cmp(&self.formers[b].1.closed_at)
            })
        {
            self.formers.swap_remove(oldest);
        }
        self.formers.push((
            p,
            Former {
                sent_round: n.sent_round,
                whole_round: n.whole_round,
                keyframe_round: n.keyframe_round,
                had_copy: n.had_copy,
                silent_rounds: if n.arrived.is_some() {
                    0
                } else {
                    n.silent_rounds
                },
                answered_at: n.answered_at,
                closed_at: now_ms,
                reconnects: n.reconnects,
                key: n.key.filter(|_| !n.key_moved_in).or(n.former_key),
            },
        ));
    }

    /// When [`first_download_due`](Self::first_download_due) may next turn true: the
    /// next neighbour to settle, or [`JOIN_GRACE_MS`] after the first came up; `None`
    /// without neighbours.
    fn first_download_wake(&self) -> Option<f64> {
        let live = || self.nbrs.values().filter(|n| !n.shunned);
        let first_up = self.first_up()?;
        let settles = live()
            .filter(|n| !n.settled)
            .map(|n| n.up_at + 2.0 * GREET_AFTER_MS)
            .reduce(f64::min);
        // With no contributing neighbour settled, nothing can start before the next
        // settles (the cap alone, once past, would be a wake-up in the past). While one
        // that is up has not settled, only the cap starts a download sooner.
        let any = live().any(|n| n.settled && !n.idle);
        Some(match settles {
            Some(t) if !any => t,
            Some(t) => t.min(first_up + JOIN_CAP_MS),
            None => first_up + JOIN_GRACE_MS,
        })
    }

    /// When the earliest of the neighbours still connected (and not shunned) came up.
    fn first_up(&self) -> Option<f64> {
        self.nbrs
            .values()
            .filter(|n| !n.shunned)
            .map(|n| n.up_at)
            .reduce(f64::min)
    }

    /// Whether the first model download may start (see the module's rule): every
    /// neighbour whose channel is up has settled, and [`FETCH_ASK`] have or
    /// [`JOIN_GRACE_MS`] passed since the first came up; or [`JOIN_CAP_MS`] passed; and
    /// one has settled.
    fn first_download_due(&mut self, now_ms: f64) -> bool {
        for n in self.nbrs.values_mut() {
            n.settled |= now_ms - n.up_at >= 2.0 * GREET_AFTER_MS;
        }
        let live = || self.nbrs.values().filter(|n| !n.shunned);
        let settled = live().filter(|n| n.settled && !n.idle).count();
        let waiting = live().any(|n| !n.settled);
        let since = self.first_up().map_or(0.0, |t| now_ms - t);
        // Liars that wrote at once settle first: asked alone they are the whole quorum.
        // Past the grace the download still waits for every neighbour that is up to
        // settle (each does within a second), up to the cap (new ones could keep coming).
        settled > 0
            && (!waiting && (settled >= FETCH_ASK || since >= JOIN_GRACE_MS)
                || since >= JOIN_CAP_MS)
    }

    /// Neighbours with a settled channel that send updates.
    fn contributors(&self) -> Vec<PeerId> {
        self.nbrs
            .iter()
            .filter(|(_, n)| n.contributes())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Tells neighbours whose channel has settled what we do.
    fn greet(&mut self, now_ms: f64) {
        let due: Vec<PeerId> = self
            .nbrs
            .iter()
            .filter(|(_, n)| !n.greeted && !n.shunned && now_ms - n.up_at >= GREET_AFTER_MS)
            .map(|(p, _)| *p)
            .collect();
        let msg = PeerMessage::Status {
            contributing: self.contributing(),
        }
        .encode();
        let update = match &self.sent_update {
            Some((round, u)) if self.round_open() && *round == self.learner.round() => {
                Some(u.clone())
            }
            _ => None,
        };
        for p in due {
            let idle = self.nbrs.get_mut(&p).is_some_and(|n| {
                n.greeted = true;
                n.idle
            });
            self.send(p, msg.clone());
            // Our update for the round in progress, if it went out before this channel
            // settled.
            if let Some(u) = update.as_ref().filter(|_| !idle) {
                self.send_update(&[p], u, false, now_ms);
            }
        }
        self.gossip_head();
    }

    /// Sends the ledger head we gossip (the newest checked, or the evidence once the
    /// server was caught) to each greeted neighbour that does not hold it as far as we
    /// know: a few hundred bytes per neighbour each time it changes (a check every 15 s).
    fn gossip_head(&mut self) {
        let Some(head) = self.learner.witness().gossip() else {
            return;
        };
        let id = head.id();
        let due: Vec<PeerId> = self
            .nbrs
            .iter()
            .filter(|(_, n)| n.greeted && !n.shunned && n.head_sent != Some(id))
            .map(|(p, _)| *p)
            .collect();
        if due.is_empty() {
            return;
        }
        let msg = PeerMessage::Head(head.encode()).encode();
        for p in due {
            if let Some(n) = self.nbrs.get_mut(&p) {
                n.head_sent = Some(id);
            }
            self.send(p, msg.clone());
        }
    }

    /// Whether our update for the current round went out and the round is still open.
    fn round_open(&self) -> bool {
        self.open_at().is_some()
    }

    /// When our open round opened (our update for it went out), if one is open: in
    /// steps `Phase::Waiting` holds it, in time `open_since`.
    fn open_at(&self) -> Option<f64> {
        match self.phase {
            Phase::Waiting { since } => Some(since),
            _ => self.open_since,
        }
    }

    fn send(&mut self, to: PeerId, data: Vec<u8>) {
        self.progress.bytes_up += data.len() as u64;
        self.out.push_back(Output::Send { to, data });
    }

    /// Whether we send updates now.
    fn contributing(&self) -> bool {
        self.role == PeerRole::Trainer && self.learner.is_started() && !self.is_paused()
    }

    /// Tells every neighbour whether we contribute, when that changed.
    fn announce(&mut self) {
        let now = self.contributing();
        if self.announced == Some(now) {
            return;
        }
        self.announced = Some(now);
        let msg = PeerMessage::Status { contributing: now }.encode();
        let greeted: Vec<PeerId> = self
            .nbrs
            .iter()
            .filter(|(_, n)| n.greeted && !n.shunned)
            .map(|(p, _)| *p)
            .collect();
        for p in greeted {
            self.send(p, msg.clone());
        }
        self.last_train_at = None;
        if !now {
            self.progress.samples_per_s = 0.0;
        }
    }

    /// Takes in one event.
    pub fn handle(&mut self, ev: Event, now_ms: f64) {
        match ev {
            Event::Up(p) => {
                // Until it says otherwise, a neighbour is expected to contribute; we say
                // what we do (a joiner, an observer or a paused peer does not) once the
                // channel has settled (see `GREET_AFTER_MS`).
                let fresh = !self.nbrs.contains_key(&p);
                let former = self
                    .formers
                    .iter()
                    .position(|(q, _)| *q == p)
                    .map(|at| self.formers.swap_remove(at).1)
                    .filter(|f| fresh && now_ms - f.closed_at < FORMER_KEPT_MS);
                let n = self.nbrs.entry(p).or_default();
                n.up_at = now_ms;
                n.greeted = false;
                n.settled = false;
                if let Some(f) = former {
                    n.reconnects = f.reconnects + 1;
                    n.answered_at = f.answered_at;
                    n.former_key = f.key;
                    n.silent_rounds = f.silent_rounds;
                    if f.reconnects >= 1 {
                        n.sent_round = f.sent_round;
                        n.whole_round = f.whole_round;
                        n.keyframe_round = f.keyframe_round;
                        n.had_copy = f.had_copy;
                    }
                }
                if self.announced.is_none() {
                    self.announced = Some(self.contributing());
                }
            }
            Event::Down(p) => {
                let gone = self.nbrs.remove(&p);
                if let Some(n) = &gone {
                    self.remember_former(p, n, now_ms);
                }
                if let Some(key) = gone.and_then(|n| n.key.filter(|_| !n.key_moved_in))
                    && !self.nbrs.values().any(|o| !o.shunned && o.delivers(&key))
                {
                    // Its next connection starts from a keyframe or a whole copy: a copy
                    // kept across connections could take a change meant for another. Not
                    // where another open connection delivered that key's update too (the
                    // signer's own, after this one relayed it first): the copy is the
                    // signer's, and its next change applies to it.
                    self.learner.forget_copy(&key);
                }
                self.stop_waiting_for(p, true, now_ms);
            }
            Event::TaskPaused(paused) => {
                self.progress.task_paused = paused;
                self.announce();
            }
            Event::Paused(paused) => {
                self.progress.paused = paused;
                self.announce();
            }
            Event::Message { from, data } => self.message(from, &data, now_ms),
        }
        self.refresh();
    }

    fn message(&mut self, from: PeerId, data: &[u8], now_ms: f64) {
        self.progress.bytes_down += data.len() as u64;
        // Only a connection that is up speaks: a message a driver delivers after the
        // connection's end (or before its start) would otherwise bring back a
        // neighbour with a fresh state, greeted later and waited for as a contributor,
        // and never ended.
        let Some(n) = self.nbrs.get(&from) else {
            self.learner.reject(Rejection::Shunned);
            return;
        };
        if n.shunned {
            self.learner.reject(Rejection::Shunned);
            return;
        }
        // Updates past the connection's rate are dropped unread (each is a signature
        // check and a pass over the model to take in; an honest neighbour sends one a
        // round).
        if update_key(data).is_some()
            && let Some(n) = self.nbrs.get_mut(&from)
            && !n
                .update_allowance
                .get_or_insert_with(|| Allowance::new(UPDATE_RATE / 1000.0, UPDATE_BURST))
                .take(1.0, now_ms)
        {
            self.learner.reject(Rejection::RequestRate);
            return;
        }
        // A receipt counts only from the neighbour that signs with its key: one naming
        // another signer is dropped before its signature is checked, as it was after
        // (receipts minted under throwaway keys, 200 a second, were a signature check
        // each). An honest one can come before its sender's first update bound its key.
        if let Some(signer) = receipt_signer(data)
            && !self.nbrs.get(&from).is_some_and(|n| n.delivers(&signer))
        {
            return;
        }
        if let Some(key) = update_key(data)
            && let Err(why) = self.bind_key(from, key)
        {
            self.learner.reject(why);
            return;
        }
        match self.learner.receive_from(from.0, data) {
            Ok(Received::Update { key, round, .. }) => {
                self.take_key(from, key);
                let late = self.lateness_of(round, now_ms);
                let current = self.learner.round();
                let n = self.nbrs.entry(from).or_default();
                n.note_arrival(round, current, now_ms);
                if let Some(x) = late {
                    n.lateness = Some(match n.lateness {
                        Some(l) if x < l => l + LATE_DECAY * (x - l),
                        _ => x,
                    });
                }
                n.claim = Some(n.claim.map_or(round, |c| c.max(round)));
                n.idle = false;
            }
            Ok(Received::ModelRequest) => self.answer(from, now_ms),
            Ok(Received::Model(s)) => self.model_answer(from, s, now_ms),
            Ok(Received::Observe { base }) => self.answer_observer(from, base, now_ms),
            Ok(Received::Observed(o)) => self.observed_answer(from, &o, now_ms),
            Ok(Received::Status { contributing }) => {
                let was_idle = self.nbrs.get(&from).is_some_and(|n| n.idle);
                if let Some(n) = self.nbrs.get_mut(&from) {
                    n.idle = !contributing;
                    n.said_contributing |= contributing;
                }
                if !contributing {
                    self.stop_waiting_for(from, false, now_ms);
                } else if was_idle
                    && self.round_open()
                    && let Some((round, msg)) = &self.sent_update
                    && *round == self.learner.round()
                {
                    // It starts contributing in a round we already sent our update for:
                    // it gets it too, or it would wait for it until its deadline and the
                    // two of us would stay a round apart.
                    let msg = msg.clone();
                    self.send_update(&[from], &msg, false, now_ms);
                }
            }
            // A weights change from a copy we do not hold (we joined or missed one since
            // its last keyframe): authentic, and its round is heard, so the round does
            // not wait for it; its weights count again from its next keyframe.
            Err(Rejection::Base) => {
                if let Some(key) = update_key(data) {
                    let round = self.learner.heard_round(&key);
                    self.take_key(from, key);
                    let current = self.learner.round();
                    let n = self.nbrs.entry(from).or_default();
                    if let Some(round) = round {
                        n.claim = Some(n.claim.map_or(round, |c| c.max(round)));
                        n.note_arrival(round, current, now_ms);
                    }
                    n.idle = false;
                }
            }
            Err(Rejection::BadSignature | Rejection::OffSchedule | Rejection::MixRepeat) => {
                self.shun(from, now_ms);
            }
            Err(Rejection::Malformed | Rejection::Shape | Rejection::NonFinite)
                if self.learner.signed_junk() =>
            {
                self.shun(from, now_ms);
                // Its key signed the junk (no one else can): none of its updates held
                // counts, whoever delivered them.
                if let Some(key) = update_key(data) {
                    self.learner.drop_updates_of(&key);
                }
            }
            // A relay delivered this update first: this copy, byte for byte the one held,
            // is most likely its signer's own. Its connection is heard for the round (a
            // relay that wins every race made the signer's connection a straggler the
            // round waited for, and took its receipts).
            Err(Rejection::Replay) => {
                if let (Some(key), Some(round)) = (update_key(data), update_round(data))
                    && let Some(n) = self.nbrs.get_mut(&from)
                    && n.key != Some(key)
                    && !n.copy_checked.contains(&(key, round))
                {
                    if n.copy_checked.len() >= COPIES_CHECKED {
                        n.copy_checked.remove(0);
                    }
                    n.copy_checked.push((key, round));
                    match self.learner.held_copy(from.0, &key, round, data) {
                        Some(true) => {
                            let current = self.learner.round();
                            n.copy_of = Some(key);
                            n.note_arrival(round, current, now_ms);
                        }
                        // The held update's signature over other bytes: a forgery.
                        Some(false) => {
                            self.learner.reject(Rejection::BadSignature);
                            self.shun(from, now_ms);
                        }
                        None => {}
                    }
                }
            }
            // It holds that head: no need to send it ours unless ours is newer.
            Ok(Received::Head { id: Some(id) }) => {
                if let Some(n) = self.nbrs.get_mut(&from) {
                    n.head_sent = Some(id);
                }
            }
            // It used an update of ours: it holds our copy as we think. Only its own
            // receipt says so (a receipt relayed from another key does not).
            // Counted only from the neighbour that signs with the receipt's key: receipts
            // minted under throwaway keys by one neighbour raised the count its visitor
            // sees, and pushed real ones out of those remembered (counted again then).
            Ok(Received::Receipt { signer, round }) => {
                if let Some(n) = self.nbrs.get_mut(&from)
                    && n.delivers(&signer)
                {
                    n.unheard.clear();
                    n.unheard_times = 0;
                    self.learner.count_receipt(round, signer);
                }
            }
            Ok(Received::Mix | Received::Head { id: None }) | Err(_) => {} // held or counted by the learner
        }
    }

    /// Ignores a connection that broke the protocol for the rest of its life (see the
    /// module's rules).
    fn shun(&mut self, p: PeerId, now_ms: f64) {
        let Some(n) = self.nbrs.get_mut(&p) else {
            return;
        };
        if !n.shunned {
            // A slot of this peer's few neighbours is not left to a liar.
            self.out.push_back(Output::Drop(p));
        }
        n.shunned = true;
        n.idle = true;
        n.claim = None;
        n.gave = None;
        n.held = None;
        // Never to be greeted: no greeting is due to it (nor a wake-up for one).
        n.greeted = true;
        // A key that moved here may be its owner's on another connection: its updates
        // held stay (this connection's mixes go). So does an update another open
        // neighbour delivered too: the signer's own copy, after this one relayed the
        // signer's first update before it (the key bound here, not moved in). What stays
        // no longer counts on this connection's vote: only on another deliverer's (else
        // a colluder that replayed a liar's update kept it held on the shunned one's vote
        // beside its own).
        let key = n.key.filter(|_| !n.key_moved_in);
        self.learner.discard_mixes_of(p.0);
        self.learner.forget_deliverer(p.0);
        if let Some(key) = key {
            let others = self.other_deliverers(p);
            self.learner
                .drop_updates_of_except(&key, |c| others.contains(&c));
        }
        if let Some(f) = &mut self.fetch
            && f.answers.remove(&p).is_some()
        {
            // Its answer no longer counts; it still counts among those asked, as silent.
            // Any agreement it was part of is judged anew.
            f.asked.remove(&p);
            f.agreed_at = None;
            if f.answers.len() == f.asked.len() {
                self.conclude(now_ms);
            }
            return;
        }
        self.stop_waiting_for(p, false, now_ms);
    }

    /// A download stops waiting for a neighbour that left or said it has no model.
    /// One whose channel closed no longer counts among those asked (it is gone; under
    /// churn, counting it would keep joiners out); one that said it holds no model still
    /// does (a neighbour that was a contributor when asked and says that is not one to
    /// discount).
    fn stop_waiting_for(&mut self, p: PeerId, gone: bool, now_ms: f64) {
        if let Some(f) = &mut self.fetch
            && !f.answers.contains_key(&p)
            && f.asked.remove(&p)
        {
            if gone {
                f.n_asked -= 1;
            }
            if f.answers.len() == f.asked.len() {
                self.conclude(now_ms);
            }
        }
    }

    /// Binds `key` to the connection `from`, whose update signed by it was just taken. A
    /// key is bound to one connection at a time: the one its newest update came on.
    /// Another that held it loses it (and may bind a key of its own): a neighbour
    /// reconnected and its old channel has not closed yet, or the other relayed this
    /// signer's updates to take its place — refusing the key on the second connection let
    /// a relay that delivered a peer's first update before the peer did keep every later
    /// one out. A relay that wins a round's race holds the key until the owner's next
    /// update comes first, and its shunning or closing then costs the owner nothing
    /// ([`Neighbour::key_moved_in`]).
    fn take_key(&mut self, from: PeerId, key: PublicKey) {
        let mut moved = false;
        for (p, n) in self.nbrs.iter_mut() {
            if *p != from && n.key == Some(key) {
                n.key = None;
                n.key_moved_in = false;
                moved = true;
            }
            // Another connection delivers that key's own copies: its owner is there, and
            // this one relays (its closing or shunning must not cost the owner its
            // updates held, nor a key of its own later drop them).
            moved |= *p != from && n.copy_of == Some(key);
        }
        let n = self.nbrs.entry(from).or_default();
        if n.key != Some(key) {
            n.key_moved_in = moved;
        }
        n.key = Some(key);
        n.copy_of = None;
        // One neighbour, one vote: its previous connection's key loses its updates held,
        // unless another open connection holds that key now (its owner, whose updates a
        // relay once delivered first).
        if let Some(old) = n.former_key.take()
            && old != key
            && !self.nbrs.values().any(|o| o.key == Some(old))
        {
            // Spared: an update another open neighbour delivered too (its signer's own
            // copy, after this one relayed it first): one vote each still holds.
            let others = self.other_deliverers(from);
            self.learner
                .drop_updates_of_except(&old, |c| others.contains(&c));
        }
    }

    /// The open neighbours other than `p` not shunned, whose deliveries of an update
    /// keep it held when `p`'s key loses its updates.
    fn other_deliverers(&self, p: PeerId) -> Vec<u64> {
        self.nbrs
            .iter()
            .filter(|(q, o)| **q != p && !o.shunned)
            .map(|(q, _)| q.0)
            .collect()
    }

    /// A connection signs with one key for its life (it may take over a key another
    /// connection held: [`take_key`](Self::take_key)).
    fn bind_key(&self, from: PeerId, key: PublicKey) -> Result<(), Rejection> {
        match self.nbrs.get(&from).and_then(|n| n.key) {
            Some(k) if k != key => Err(Rejection::KeyChanged),
            _ => Ok(()),
        }
    }

    /// Whether we answer `from`'s request for our model now: we hold one to give and our
    /// visitor has not paused us (else we tell it we give nothing), and it did not ask too
    /// soon.
    fn may_answer(&mut self, from: PeerId, observe: bool, now_ms: f64) -> bool {
        // A visitor who paused (a button, a hidden tab, a battery) gives no upload either:
        // honest neighbours know we are idle and do not ask.
        if self.role != PeerRole::Trainer || !self.learner.is_started() || self.progress.paused {
            // Nothing to give: say so, so that the asker stops waiting for us.
            let msg = PeerMessage::Status {
                contributing: false,
            }
            .encode();
            self.send(from, msg);
            return false;
        }
        // A model request on a connection not yet answered may take twice the burst
        // (joiners come in bursts, and dashboards may have used the rest; sustained,
        // answers still send at most the share's rate).
        let first = self.nbrs.get(&from).is_none_or(|n| n.answered_at.is_none());
        let share = if first && !observe { 2.0 } else { 1.0 };
        let (rate, burst_ms) = self.answer_rate();
        let spent = self.answers_free_at - now_ms;
        let over_budget = spent > share * burst_ms;
        // Past half the allowance, each neighbour that asked lately gets an equal share.
        self.asks
            .retain(|(_, t, _)| now_ms - t < ANSWER_FAIR_MS && *t <= now_ms);
        // One record per neighbour per `ANSWER_INTERVAL_MS`: requests sent faster (they
        // get no answer) must not push the others', nor its own bytes, out.
        let recorded = self
            .asks
            .iter()
            .any(|(p, t, _)| *p == from && now_ms - t < ANSWER_INTERVAL_MS);
        if !recorded {
            if self.asks.len() >= ANSWER_ASKS_KEPT {
                self.asks.pop_front();
            }
            self.asks.push_back((from, now_ms, 0));
        }
        let over_share = spent > 0.5 * burst_ms && {
            let mut askers: Vec<PeerId> = self.asks.iter().map(|(p, _, _)| *p).collect();
            askers.sort_unstable_by_key(|p| p.0);
            askers.dedup();
            let got: usize = self
                .asks
                .iter()
                .filter(|(p, _, _)| *p == from)
                .map(|(_, _, b)| b)
                .sum();
            got as f64 >= rate * ANSWER_FAIR_MS / askers.len() as f64
        };
        // Answers of the last `ANSWER_INTERVAL_MS` by neighbour, kept across reconnects:
        // a neighbour that closes its channel and opens another must not be answered
        // again sooner.
        self.answered
            .retain(|(_, t)| now_ms - t < ANSWER_INTERVAL_MS && *t <= now_ms);
        let too_soon = self.answered.iter().any(|(p, _)| *p == from);
        if over_budget || over_share || too_soon {
            self.learner.reject(Rejection::RequestRate);
            return false;
        }
        self.nbrs.entry(from).or_default().answered_at = Some(now_ms);
        self.answered.push_back((from, now_ms));
        true
    }

    /// The bytes per millisecond model answers may send, and how far ahead of that they
    /// may go: [`ANSWER_SHARE`] of the upload budget, else [`ANSWER_MODEL_MS`].
    fn answer_rate(&self) -> (f64, f64) {
        let n = self.learner.weights().len();
        let rate = answer_bytes_per_ms(n, self.cfg.upload_bytes_per_ms());
        (rate, UPLOAD_BURST_MS.max((8 * n) as f64 / rate))
    }

    /// Sends a model answer, counted against the answers' share of the upload budget.
    fn send_answer(&mut self, to: PeerId, data: Vec<u8>, now_ms: f64) {
        let (rate, _) = self.answer_rate();
        self.answers_free_at = self.answers_free_at.max(now_ms) + data.len() as f64 / rate;
        if let Some(a) = self.asks.iter_mut().rev().find(|(p, _, _)| *p == to) {
            a.2 += data.len();
        }
        self.send(to, data);
    }

    fn answer(&mut self, from: PeerId, now_ms: f64) {
        if self.may_answer(from, false, now_ms) {
            let snap = self.learner.answer_snapshot();
            self.send_answer(from, snap, now_ms);
        }
    }

    /// Answers an observer: our weights as a change from those it holds from us when it
    /// names them (`base`, their hash), else whole; remembers what it then holds.
    fn answer_observer(&mut self, from: PeerId, base: Option<[u8; 32]>, now_ms: f64) {
        if !self.may_answer(from, true, now_ms) {
            return;
        }
        let gave = self
            .nbrs
            .get(&from)
            .and_then(|n| n.gave.as_ref())
            .filter(|(_, h)| Some(*h) == base)
            .map(|(w, h)| (w.as_slice(), *h));
        let (msg, result, hash) = self.learner.observed(gave);
        // At most `MAX_OBSERVED` observers' weights kept: one that has not asked for
        // `OBSERVED_IDLE_MS` (it asks others now) gives its place up to a new one; while
        // all of them still ask, a further observer gets whole weights each time.
        for n in self.nbrs.values_mut() {
            if n.answered_at.is_none_or(|t| now_ms - t >= OBSERVED_IDLE_MS) {
                n.gave = None;
            }
        }
        let kept = self
            .nbrs
            .iter()
            .filter(|(p, n)| **p != from && n.gave.is_some())
            .count();
        if let Some(n) = self.nbrs.get_mut(&from) {
            n.gave = (kept < MAX_OBSERVED).then_some((result, hash));
        }
        self.send_answer(from, msg, now_ms);
    }

    /// Whether `from` owes an answer to the download in progress.
    fn is_asked(&self, from: PeerId) -> bool {
        self.fetch
            .as_ref()
            .is_some_and(|f| f.asked.contains(&from) && !f.answers.contains_key(&from))
    }

    /// A model nobody asked `from` for: a late answer to an earlier request of ours
    /// (counted), or a push (the connection is shunned).
    fn unasked(&mut self, from: PeerId, now_ms: f64) {
        self.learner.reject(Rejection::Unasked);
        match self.nbrs.get_mut(&from) {
            Some(n) if n.owed > 0 => n.owed -= 1,
            _ => self.shun(from, now_ms),
        }
    }

    /// Weights an observer asked for: rebuilt from the ones we hold from `from`, then
    /// judged as a model answer. An answer that cannot be used counts as no answer.
    fn observed_answer(&mut self, from: PeerId, o: &Observed, now_ms: f64) {
        // Only an observer's download asks with `observe`.
        let observing = self
            .fetch
            .as_ref()
            .is_some_and(|f| f.purpose == Purpose::Observe);
        if !observing || !self.is_asked(from) {
            self.unasked(from, now_ms);
            return;
        }
        let held = self
            .nbrs
            .get(&from)
            .and_then(|n| n.held.as_ref())
            .map(|(w, h)| (w.as_slice(), *h));
        match self.learner.take_observed(o, held) {
            Ok(s) => {
                if let Some(n) = self.nbrs.get_mut(&from) {
                    n.held = Some((s.weights.clone(), o.result));
                }
                self.model_answer(from, s, now_ms);
            }
            Err(_) => {
                if let Some(n) = self.nbrs.get_mut(&from) {
                    n.held = None;
                    n.owed = n.owed.saturating_sub(1);
                }
                self.stop_waiting_for(from, false, now_ms);
            }
        }
    }

    fn model_answer(&mut self, from: PeerId, s: Snapshot, now_ms: f64) {
        if !self.is_asked(from) {
            self.unasked(from, now_ms);
            return;
        }
        let Some(f) = self.fetch.as_mut() else {
            return;
        };
        if let Some(n) = self.nbrs.get_mut(&from) {
            n.owed = n.owed.saturating_sub(1);
        }
        f.answers.insert(from, s);
        if f.answers.len() == f.asked.len() {
            self.conclude(now_ms);
            return;
        }
        // Not concluded on the first answers that agree: colluders answer first, and on
        // a part of the answers they can be the majority that picks the model (two
        // identical answers and one honest one they stay within `AGREE_RATIO` of have
        // their model as the median, and their momentum as the agreeing answers'). Once
        // a majority of those asked agree, the others get as long again as that took
        // (honest answers come at about one pace), and a silent neighbour no longer holds
        // the download to `MODEL_WAIT_MS`.
        let agreed = f.agreed_at.is_some();
        if !agreed
            && self.adoption_rule().0 > 1
            && self.judge().is_ok()
            && let Some(f) = self.fetch.as_mut()
        {
            f.agreed_at = Some(now_ms);
        }
    }

    /// What the current download's answers so far would adopt (see [`choose`]).
    fn judge(&self) -> Result<(Snapshot, usize), (Rejection, usize)> {
        let Some(f) = &self.fetch else {
            return Err((Rejection::NoQuorum, 0));
        };
        let (quorum, min_round) = self.adoption_rule();
        let answers: Vec<&Snapshot> = f.answers.values().collect();
        let window = u64::from(self.cfg.max_staleness);
        let own = self.learner.weights();
        let lag = matches!(f.purpose, Purpose::Lag).then(|| self.plausible_round());
        let chosen = choose(&answers, quorum, min_round, window, own, lag);
        // An observer's lone answer continues the model it holds or is not taken: as
        // near it as two answers must be to each other, at most `OBSERVE_LONE_AHEAD`
        // rounds on.
        if let Ok((s, _)) = &chosen
            && matches!(f.purpose, Purpose::Observe)
            && quorum == 1
        {
            let near = super::aggregate::distance(&s.weights, own)
                <= AGREE_RATIO * super::aggregate::norm(own);
            if !near || s.round > self.learner.round().saturating_add(OBSERVE_LONE_AHEAD) {
                return Err((Rejection::NoQuorum, 0));
            }
        }
        chosen
    }

    /// How many answers of the current download must agree, and the lowest round one
    /// may have.
    fn adoption_rule(&self) -> (usize, Option<u64>) {
        let Some(f) = &self.fetch else {
            return (1, None);
        };
        // Answers that must agree on the model: more than half of the neighbours asked
        // (a silent one counts against adoption), so colluders win only where they are
        // the majority of those asked.
        let majority = f.n_asked / 2 + 1;
        let ahead = Some(self.learner.round() + 1);
        match f.purpose {
            // After failed tries a joiner takes a lone answer (neighbours that stay silent
            // must not keep it out of the swarm forever).
            Purpose::Join if self.join_attempts + 1 >= JOIN_ATTEMPTS => (1, None),
            Purpose::Join => (majority, None),
            // Ahead as the lag rule counts it: answers up to `max_staleness` on vote.
            Purpose::Lag => (
                majority,
                Some(self.learner.round() + u64::from(self.cfg.max_staleness) + 1),
            ),
            // With one contributor among its neighbours (the others paused or joining, or
            // the swarm shrank to one volunteer), an observer that holds a model takes
            // its answer only as a continuation of that model (see `judge`); one that
            // holds none needs two alike. A lone answer was taken on its word, and the
            // dashboard showed and exported any model at any round a liar sent.
            Purpose::Observe if f.n_asked <= 1 && self.learner.is_started() => (1, ahead),
            Purpose::Observe => (majority.max(2), ahead.filter(|_| self.learner.is_started())),
        }
    }

    /// Starts a download from up to [`FETCH_ASK`] of `from` ([`OBSERVE_ASK`] for an
    /// observer), drawn at random.
    fn start_fetch(&mut self, purpose: Purpose, mut from: Vec<PeerId>, now_ms: f64) {
        self.rng.shuffle(&mut from);
        if purpose == Purpose::Observe {
            // Neighbours whose weights we hold first (they send a change from them), but
            // one drawn at random every `OBSERVE_REDRAW` downloads, and all after a
            // download that failed.
            let fresh = if self.observe_redraw {
                OBSERVE_ASK
            } else {
                usize::from(self.observed.is_multiple_of(OBSERVE_REDRAW))
            };
            let held = |p: &PeerId| self.nbrs.get(p).is_some_and(|n| n.held.is_some());
            front_first(&mut from, &held);
            let keep = OBSERVE_ASK
                .saturating_sub(fresh)
                .min(from.iter().filter(|p| held(p)).count());
            let mut rest = from.split_off(keep);
            // Those drawn anew are neighbours it holds no weights from, where there are
            // enough (the one set aside must not simply be drawn again).
            self.rng.shuffle(&mut rest);
            front_first(&mut rest, &|p| !held(p));
            from.extend(rest);
            from.truncate(OBSERVE_ASK);
            self.observed += 1;
            self.observe_redraw = false;
            for (p, n) in self.nbrs.iter_mut() {
                if !from.contains(p) {
                    n.held = None;
                }
            }
        } else {
            from.truncate(FETCH_ASK);
        }
        for &p in &from {
            let req = match purpose {
                Purpose::Observe => PeerMessage::Observe {
                    base: self
                        .nbrs
                        .get(&p)
                        .and_then(|n| n.held.as_ref())
                        .map_or([0; 32], |(_, h)| *h),
                },
                Purpose::Join | Purpose::Lag => PeerMessage::ModelRequest,
            };
            self.send(p, req.encode());
            if let Some(n) = self.nbrs.get_mut(&p) {
                n.owed = n.owed.saturating_add(1);
            }
        }
        self.fetch = Some(Fetch {
            purpose,
            started: now_ms,
            n_asked: from.len(),
            asked: from.into_iter().collect(),
            answers: BTreeMap::new(),
            agreed_at: None,
        });
    }

    /// Ends a download: adopts the model the answers agree on ([`judge`](Self::judge)),
    /// if any.
    fn conclude(&mut self, now_ms: f64) {
        let verdict = self.judge();
        let Some(f) = self.fetch.take() else {
            return;
        };
        let answered = !f.answers.is_empty();
        match verdict {
            Ok((s, outliers)) => {
                for _ in 0..outliers {
                    self.learner.reject(Rejection::RoundOutlier);
                }
                let round = s.round;
                if self.learner.adopt(s) {
                    self.observed_behind = 0;
                    self.out.push_back(Output::Adopted { round });
                    if let Phase::Joining { .. } | Phase::Waiting { .. } = self.phase {
                        self.phase = Phase::Ready;
                    }
                    // A run toward an update of the old model is dropped, its round no
                    // longer open.
                    self.run = None;
                    self.open_since = None;
                    // Training in progress started from the old model: its result is
                    // dropped when it comes back (its round no longer matches).
                    self.progress.round = round;
                    self.announce();
                }
                self.next_fetch_at = now_ms;
            }
            Err((why, outliers)) => {
                for _ in 0..outliers {
                    self.learner.reject(Rejection::RoundOutlier);
                }
                // An observer already holding the newest model has nothing to adopt:
                // that is no failure.
                let nothing_newer = f.answers.values().all(|s| s.round <= self.learner.round())
                    && self.learner.is_started();
                if !(f.purpose == Purpose::Observe && answered && why == Rejection::NoQuorum) {
                    self.learner.reject(why);
                }
                let silent = f.asked.iter().any(|p| !f.answers.contains_key(p));
                if f.purpose == Purpose::Observe && (silent || !nothing_newer) {
                    self.observe_redraw = true;
                }
                if f.purpose == Purpose::Observe {
                    self.step_back(&f, nothing_newer);
                }
                self.next_fetch_at = now_ms + FETCH_RETRY_MS;
                if f.purpose == Purpose::Join {
                    self.join_attempts += 1;
                    if !answered && self.join_attempts >= JOIN_ATTEMPTS {
                        self.start_from_seed();
                    }
                }
            }
        }
        if let PeerRole::Observer { every_ms } = self.role {
            self.next_fetch_at = self.next_fetch_at.max(f.started + every_ms);
        }
    }

    /// An observer whose download found nothing newer than the model it holds, where
    /// the answers agree on one more than [`OBSERVE_BACK_ROUNDS`] behind it: after
    /// [`OBSERVE_BEHIND`] such downloads in a row (the next one drawn anew), it takes that
    /// model. A round it holds that is far ahead of the swarm's (two colluders agreeing on
    /// a made-up round near 2^40, or a swarm started again from an older checkpoint) held
    /// it for good: only newer answers were taken, and none would come.
    fn step_back(&mut self, f: &Fetch, nothing_newer: bool) {
        let window = u64::from(self.cfg.max_staleness);
        let answers: Vec<&Snapshot> = f.answers.values().collect();
        let quorum = (f.n_asked / 2 + 1).max(2);
        // Answers that agree on nothing (or a silent download) tell nothing either way.
        let Some((s, _)) = nothing_newer
            .then(|| choose(&answers, quorum, None, window, self.learner.weights(), None).ok())
            .flatten()
        else {
            return;
        };
        if s.round.saturating_add(OBSERVE_BACK_ROUNDS) >= self.learner.round() {
            self.observed_behind = 0;
            return;
        }
        self.observed_behind += 1;
        self.observe_redraw = true;
        if self.observed_behind >= OBSERVE_BEHIND {
            self.observed_behind = 0;
            let round = s.round;
            if self.learner.adopt_older(s) {
                self.out.push_back(Output::Adopted { round });
            }
        }
    }

    fn start_from_seed(&mut self) {
        self.learner.start();
        self.phase = Phase::Ready;
        self.announce();
    }

    /// Whether enough contributing neighbours witness that the swarm is far ahead: two
    /// at least, and most of the contributing neighbours, those that have claimed no
    /// round yet included (a joiner's honest neighbours send it no update before it
    /// holds the model, and two liars' claims alone must not make it download theirs).
    ///
    /// Returns the neighbours to ask: all of those that vote, not only those ahead.
    /// Asked only among those ahead, colluders that claimed to be ahead were most of
    /// those asked wherever they outnumbered the honest neighbours truly ahead (two
    /// liars, one honest neighbour ahead and two level), and chose the model and its
    /// round; the answers of those not ahead now vote ([`choose`], `lag`).
    fn lagging(&self) -> Option<Vec<PeerId>> {
        let ahead_of = self.learner.round() + u64::from(self.cfg.max_staleness);
        let voters = self.voters();
        let ahead = voters
            .iter()
            .filter(|(_, c)| c.is_some_and(|c| c > ahead_of))
            .count();
        (ahead >= 2 && 2 * ahead > voters.len())
            .then(|| voters.into_iter().map(|(p, _)| p).collect())
    }

    /// The contributing neighbours that count in [`lagging`](Self::lagging), with the
    /// highest round each sent an update for (`None`: none yet).
    fn voters(&self) -> Vec<(PeerId, Option<u64>)> {
        self.nbrs
            .iter()
            .filter(|(_, n)| !n.idle && !n.shunned && (n.claim.is_some() || n.greeted))
            .map(|(p, n)| (*p, n.claim))
            .collect()
    }

    /// The latest round a lag download may adopt: `max_staleness` past the lower median
    /// of the voters' rounds (one that sent no update counts at ours). Colluders that
    /// answered at a made-up round far ahead were the median of the answers ahead, and
    /// level voters that agreed with their weights let them set the round for good.
    fn plausible_round(&self) -> u64 {
        let own = self.learner.round();
        let mut rounds: Vec<u64> = self
            .voters()
            .iter()
            .map(|(_, c)| c.unwrap_or(own))
            .collect();
        let median = super::lower_median_by(&mut rounds, u64::cmp).unwrap_or(own);
        median.saturating_add(u64::from(self.cfg.max_staleness))
    }

    /// Advances time: starts or ends downloads, asks for training, closes rounds.
    pub fn tick(&mut self, now_ms: f64) {
        self.greet(now_ms);
        if self.fetch.as_ref().is_some_and(|f| now_ms >= f.due()) {
            self.conclude(now_ms);
        }
        if self.phase == Phase::Observing
            && self.fetch.is_none()
            && now_ms >= self.next_fetch_at
            && (self.learner.is_started() || self.first_download_due(now_ms))
        {
            let peers = self.contributors();
            if !peers.is_empty() {
                self.start_fetch(Purpose::Observe, peers, now_ms);
            }
        }
        if let Phase::Joining { since } = self.phase
            && self.fetch.is_none()
        {
            let due = self.first_download_due(now_ms) || self.join_attempts > 0;
            let peers = self.contributors();
            // Asked only once their own status had time to arrive (they greet
            // `GREET_AFTER_MS` after the channel opens, as we do): a joiner among them
            // would otherwise be asked, say it holds no model, and leave the answers to
            // whoever was quickest.
            let settled: Vec<PeerId> = peers
                .iter()
                .copied()
                .filter(|p| self.nbrs.get(p).is_some_and(|n| n.settled))
                .collect();
            if peers.is_empty() {
                if now_ms - since >= JOIN_GRACE_MS {
                    self.start_from_seed(); // first in the swarm
                }
            } else if now_ms >= self.next_fetch_at && !settled.is_empty() && due {
                self.start_fetch(Purpose::Join, settled, now_ms);
            }
        }
        // A tick that closes a round does not also train the next one: a driver paces its
        // volunteer's CPU between ticks (the browser worker's duty cycle), and a tick that
        // did both would never let it rest.
        let mut closed = false;
        if let Some(since) = self.open_at() {
            // Done when every awaited neighbour's update for this round (or a later one)
            // is held, else at the limit (see `round_wait`). With neighbours but none
            // contributing yet (they are joining), it waits the deadline rather than
            // racing ahead alone.
            let (all, limit) = self.round_wait();
            if all || now_ms - since >= limit {
                self.close_round(now_ms);
                closed = true;
            }
        }
        if self.phase == Phase::Ready && !closed {
            if self.is_paused() {
                self.progress.phase = "paused";
            } else if self.cfg.timed() {
                self.train_chunk(now_ms);
            } else {
                self.phase = Phase::Training {
                    round: self.learner.round(),
                    since: now_ms,
                    steps: self.cfg.local_steps,
                };
                self.out.push_back(Output::Train {
                    round: self.learner.round(),
                    steps: self.cfg.local_steps,
                    resume: false,
                });
            }
        }
        if self.fetch.is_none()
            && now_ms >= self.next_fetch_at
            && matches!(
                self.phase,
                Phase::Ready | Phase::Training { .. } | Phase::Waiting { .. }
            )
            && let Some(voters) = self.lagging()
        {
            self.start_fetch(Purpose::Lag, voters, now_ms);
        }
        self.refresh();
    }

    fn close_round(&mut self, now_ms: f64) {
        // Every round we say again that we contribute, to neighbours that think we do
        // not: a status lost at a channel's opening must not leave two peers each
        // waiting for the other to speak first.
        if self.contributing() {
            let msg = PeerMessage::Status { contributing: true }.encode();
            let quiet: Vec<PeerId> = self
                .nbrs
                .iter()
                .filter(|(_, n)| n.greeted && n.key.is_none() && !n.shunned)
                .map(|(p, _)| *p)
                .collect();
            for p in quiet {
                self.send(p, msg.clone());
            }
        }
        let awaited = self
            .awaited()
            .iter()
            .map(|(_, n)| n.keys().copied().collect())
            .collect();
        self.learner.set_awaited(awaited);
        let learner = &self.learner;
        for n in self.nbrs.values_mut() {
            if n.arrived.is_none() && (contributes_to_rounds(learner, n) || n.said_contributing) {
                n.silent_rounds = n.silent_rounds.saturating_add(1);
            }
            if n.arrived.is_some() {
                n.quiet_rounds = n.quiet_rounds.saturating_add(1);
            }
            n.said_contributing = false;
        }
        let summary = self.learner.finish_round();
        if let Some(msg) = &summary.sync {
            let peers = self.contributors();
            if !peers.is_empty() {
                let to = peers[self.rng.below(peers.len())];
                self.send(to, msg.clone());
                // A mix is an upload like an update: counted against the budget (a
                // neighbour's link takes no more than the budget justifies).
                self.spend_upload(msg.len(), now_ms);
            }
        }
        self.gossip_head();
        for r in &summary.receipts {
            let bytes = r.encode();
            // To the connection its key is bound to, and to one that delivered the
            // signer's own copy after a relay (which might keep the receipt back).
            let to: Vec<PeerId> = self
                .nbrs
                .iter()
                .filter(|(_, n)| n.delivers(&r.sender))
                .map(|(p, _)| *p)
                .collect();
            for to in to {
                self.send(to, PeerMessage::Receipt(bytes.clone()).encode());
            }
            self.out.push_back(Output::Receipt(bytes));
        }
        if self.cfg.timed() {
            // Training goes on: the run in progress moves onto the new model at its next
            // chunk boundary.
            self.open_since = None;
        } else {
            self.phase = Phase::Ready;
        }
        self.out.push_back(Output::RoundClosed(summary));
    }

    /// Local training of `round` ended with `local` weights: signs the update and sends
    /// it to every contributing neighbour. A result for a round the peer has left (it
    /// adopted a model meanwhile) is dropped.
    pub fn trained(
        &mut self,
        round: u64,
        local: &[f32],
        loss: f32,
        samples: u32,
        now_ms: f64,
    ) -> Result<(), LearnError> {
        let Phase::Training {
            round: r,
            since,
            steps,
        } = self.phase
        else {
            return Ok(());
        };
        if r != round {
            return Ok(()); // not the training in progress
        }
        if self.cfg.timed() {
            self.phase = Phase::Ready;
            let result = self.trained_chunk(round, local, loss, samples, steps, since, now_ms);
            self.refresh();
            return result;
        }
        if round != self.learner.round() {
            self.phase = Phase::Ready; // adopted a model meanwhile: train from it
            return Ok(());
        }
        self.plan_keyframe(now_ms);
        let msg = match self.learner.local_update(local, samples, loss) {
            Ok(m) => m,
            Err(e) => {
                self.phase = Phase::Ready;
                return Err(e);
            }
        };
        let to = self.contributors();
        self.send_update(&to, &msg, true, now_ms);
        self.sent_update = Some((round, msg));
        self.budget_check();
        self.progress.loss = loss;
        self.progress.local_steps += u64::from(steps);
        self.progress.samples += u64::from(samples);
        if let Some(t) = self.last_train_at
            && now_ms > t
        {
            self.progress
                .note_rate(f64::from(samples) / ((now_ms - t) / 1e3));
        }
        self.last_train_at = Some(since);
        self.phase = Phase::Waiting { since: now_ms };
        self.note_opened(round, now_ms);
        self.refresh();
        Ok(())
    }

    /// Rounds in time: asks for the next chunk of the run (starting one from the current
    /// model when there is none: at the start, after an adoption, after a broken chunk).
    fn train_chunk(&mut self, now_ms: f64) {
        let round = self.learner.round();
        if self.run.as_ref().is_none_or(|r| r.round < round) {
            // While our update for this round is out, the new run is for the next round,
            // its work carried onto the model that round ends with.
            let open = self.open_since.is_some();
            let start = self.learner.weights().to_vec();
            let carry = open.then(|| start.clone());
            self.run = Some(Run::new(
                round + u64::from(open),
                now_ms,
                start,
                carry,
                true,
            ));
        }
        self.rebase();
        let steps = match self.step_rate {
            Some(rate) => (CHUNK_MS * rate).round().clamp(1.0, 100_000.0) as u32,
            None => self.cfg.local_steps,
        };
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let resume = !std::mem::take(&mut run.reload);
        self.phase = Phase::Training {
            round: run.round,
            since: now_ms,
            steps,
        };
        self.out.push_back(Output::Train {
            round: run.round,
            steps,
            resume,
        });
    }

    /// Rounds in time: once the round that was open when the run started has closed,
    /// moves the run's work so far onto the new model (`new + work - from`).
    fn rebase(&mut self) {
        let round = self.learner.round();
        if self.open_since.is_some() {
            return;
        }
        let Some(run) = self.run.as_mut() else {
            return;
        };
        if run.round != round {
            return;
        }
        if let Some(from) = run.carry_from.take() {
            for ((x, w), f) in run.work.iter_mut().zip(self.learner.weights()).zip(&from) {
                *x = w + (*x - f);
            }
            run.reload = true;
        }
    }

    /// Rounds in time: one chunk of the run came back. Sends the run's update when its
    /// time is up and the previous round has closed, and starts the next run from where
    /// this one ended.
    #[allow(clippy::too_many_arguments)]
    fn trained_chunk(
        &mut self,
        round: u64,
        local: &[f32],
        loss: f32,
        samples: u32,
        steps: u32,
        since: f64,
        now_ms: f64,
    ) -> Result<(), LearnError> {
        let n = self.learner.weights().len();
        let Some(run) = self.run.as_mut().filter(|r| r.round == round) else {
            return Ok(()); // a run dropped by an adoption
        };
        let broken = if local.len() != n {
            Some(format!("{} values, model has {n}", local.len()))
        } else if !loss.is_finite() {
            Some(format!("loss {loss}"))
        } else {
            super::check_finite(local).err()
        };
        if let Some(why) = broken {
            // Nothing of a broken run is sent: it starts again from the current model.
            self.run = None;
            return Err(LearnError::BadLocal(why));
        }
        run.work.copy_from_slice(local);
        run.samples += u64::from(samples);
        run.steps += u64::from(steps);
        run.loss += f64::from(loss) * f64::from(steps);
        self.progress.local_steps += u64::from(steps);
        self.progress.samples += u64::from(samples);
        self.progress.loss = loss;
        let dt = now_ms - since;
        if dt > 0.0 {
            let rate = f64::from(steps) / dt;
            self.step_rate = Some(self.step_rate.map_or(rate, |r| 0.5 * r + 0.5 * rate));
            self.progress.note_rate(f64::from(samples) / (dt / 1e3));
        }
        self.rebase();
        if self.open_since.is_none()
            && self.run.as_ref().is_some_and(|r| {
                r.carry_from.is_none() && r.round == self.learner.round() && !r.skipped
            })
            && self.behind()
        {
            self.skip_round(now_ms);
        }
        let Some(run) = self.run.as_ref() else {
            return Ok(());
        };
        let round = run.round;
        let due = self.open_since.is_none()
            && run.carry_from.is_none()
            && run.round == self.learner.round()
            && now_ms - run.started >= f64::from(self.cfg.round_ms)
            && (now_ms >= self.upload_free_at
                || self.affordable(
                    self.next_update_bytes(&self.contributors(), &run.work),
                    now_ms,
                ))
            && run.samples > 0;
        if !due {
            return Ok(());
        }
        let claim = u32::try_from(run.samples).unwrap_or(u32::MAX);
        let mean_loss = (run.loss / run.steps.max(1) as f64) as f32;
        let (work, reload) = (run.work.clone(), run.reload);
        self.plan_keyframe(now_ms);
        let msg = self.learner.local_update(&work, claim, mean_loss)?;
        let to = self.contributors();
        self.send_update(&to, &msg, true, now_ms);
        self.sent_update = Some((round, msg));
        self.budget_check();
        self.open_since = Some(now_ms);
        self.note_opened(round, now_ms);
        // After a rebase in this chunk the trainer does not hold `work` yet (`reload`).
        let carry = Some(work.clone());
        self.run = Some(Run::new(round + 1, now_ms, work, carry, reload));
        Ok(())
    }

    /// Rounds in time: whether more than half of the neighbours our round waits for, and
    /// at least [`SCREEN_MIN`](super::aggregate::SCREEN_MIN), have sent updates for a
    /// later round than ours and their updates for ours are held. They closed our
    /// round (no update for `r + 1` is signed before round `r` closed), so our update
    /// for it would reach them stale: with `weights` unused, with `delta` at half weight.
    /// A peer one round behind its neighbours stays there, each of its updates wasted
    /// (with the demo's upload budget, 12 peers: one peer credited for 1% of what it
    /// trained, its every update stale at all six neighbours).
    ///
    /// Their updates for our round must be held: the round closes on those, so our model
    /// stays theirs. Closed on fewer (a joiner that lacks their copies holds none, its
    /// changes refused for their base) it would take an outer step of its own that no
    /// neighbour took, and its later updates would be screened out as outliers. At least
    /// `SCREEN_MIN` of them, so that the close without our own update still screens them
    /// (one liar that claims a later round and one honest neighbour ahead do not make us
    /// average two updates unscreened).
    ///
    /// Never while a model download is under way or due (further behind than
    /// `max_staleness`, [`lagging`](Self::lagging)): rounds closed to catch up would
    /// lift our round past the answers the download adopts from, on a model without
    /// the rounds' aggregates.
    fn behind(&self) -> bool {
        if self.fetch.is_some() || self.lagging().is_some() {
            return false;
        }
        let round = self.learner.round();
        let awaited = self.awaited();
        let both = awaited
            .iter()
            .filter(|(_, n)| n.claim.is_some_and(|c| c > round))
            .filter(|(_, n)| n.delivers_any(|k| self.learner.holds_current_from(k)))
            .count();
        both >= super::aggregate::SCREEN_MIN && 2 * both > awaited.len()
    }

    /// Rounds in time, [`behind`](Self::behind): closes our round without an update of
    /// ours (with the neighbours' updates for it that we hold) and carries the run onto
    /// the new model, so that its work goes out as the update for the next round, in
    /// step with the neighbours, instead of stale.
    fn skip_round(&mut self, now_ms: f64) {
        let from = self.learner.weights().to_vec();
        self.close_round(now_ms);
        let round = self.learner.round();
        if let Some(run) = self.run.as_mut() {
            run.round = round;
            run.carry_from = Some(from);
            run.skipped = true;
        }
        self.rebase();
    }

    /// With weights changes: when neighbours our update goes to do not hold our public
    /// copy, it is a keyframe for all where at least half of them lack it
    /// ([`keyframe_for_lacking`]; 110 KB each for the demo, as a whole copy is), and only
    /// where the keyframe fits the upload budget's allowance: otherwise whole copies go
    /// where they fit (`send_update`), and the rest get the change and wait for our next
    /// update.
    /// Also a keyframe, where it fits, when our copy's lag made our last update an
    /// outlier in our own screen ([`Learner::copy_screened_out`]), or when most
    /// neighbours have stopped using our updates ([`UNHEARD_UPDATES`]).
    fn plan_keyframe(&mut self, now_ms: f64) {
        if !self.cfg.weights_changes() {
            return;
        }
        let to = self.contributors();
        // Every reason below asks for a keyframe only where it fits the allowance.
        if !self.affordable(self.keyframe_bytes() * to.len(), now_ms) {
            return;
        }
        // Our copy's lag made our last update an outlier (`Learner::copy_screened_out`).
        if self.learner.copy_screened_out() {
            self.learner.keyframe_next();
            return;
        }
        // A neighbour a round ahead of ours is silent for another reason: our updates
        // reach it stale.
        let round = self.learner.round();
        let counted = |n: &Neighbour| n.keyed && n.unheard() && n.claim.is_none_or(|c| c <= round);
        let unheard = to
            .iter()
            .filter_map(|p| self.nbrs.get(p))
            .filter(|n| counted(n))
            .count();
        if unheard >= 2 && 2 * unheard > to.len() {
            for (_, n) in self.nbrs.iter_mut().filter(|(p, _)| to.contains(p)) {
                if counted(n) {
                    n.unheard_times += 1;
                }
            }
            self.learner.keyframe_next();
            return;
        }
        let lacking = self.lacking_for_keyframe(&to);
        if lacking == 0 {
            return;
        }
        if keyframe_for_lacking(lacking, to.len()) {
            let round = self.learner.round();
            for (_, n) in self.nbrs.iter_mut().filter(|(p, _)| to.contains(p)) {
                if !n.keyed && n.had_copy {
                    n.keyframe_round = Some(round);
                }
            }
            self.learner.keyframe_next();
        }
    }

    /// How many of `to` lack our public copy and count toward a keyframe to all: one that
    /// lost it after holding it (it paused, and was left out of an update) counts once per
    /// [`KEYFRAME_EVERY`] rounds. Otherwise a neighbour pausing through every other update
    /// of ours, where it is half of those they go to, made every other one a keyframe to
    /// all (eight times a change): under an upload budget the updates went out about four
    /// times less often. Past that it gets a whole copy where it may, else waits for our
    /// next keyframe, as it would among more neighbours.
    fn lacking_for_keyframe(&self, to: &[PeerId]) -> usize {
        let round = self.learner.round();
        let counts = |n: &Neighbour| {
            !n.keyed
                && (!n.had_copy
                    || n.keyframe_round
                        .is_none_or(|r| round >= r + crate::learn::KEYFRAME_EVERY))
        };
        to.iter()
            .filter(|p| self.nbrs.get(p).is_some_and(counts))
            .count()
    }

    /// About what our next update costs to send to `to`: with weights changes, the
    /// keyframe, whole copies and changes that `plan_keyframe` and `send_update` will
    /// choose (whole copies to the neighbours that lack our copy and may have one, where
    /// that is cheaper than a keyframe to all).
    fn next_update_bytes(&self, to: &[PeerId], local: &[f32]) -> usize {
        let change = self.change_bytes();
        if !self.cfg.weights_changes() {
            return change * to.len();
        }
        let keyframes = self.keyframe_bytes() * to.len();
        // Under differential privacy the size is not judged from our run, which is not
        // noised yet (how far it moved from our copy would show in when the update
        // leaves, where the upload budget makes it wait): a keyframe's, the most it is.
        // A copy's lag that screened us out (`plan_keyframe`): the update waits for the
        // keyframe to fit rather than go out as a change every neighbour would drop.
        if self.learner.privacy().is_some()
            || self.learner.next_is_keyframe(local)
            || self.learner.copy_screened_out()
        {
            return keyframes;
        }
        let round = self.learner.round();
        let wholes = to
            .iter()
            .filter_map(|p| self.nbrs.get(p))
            .filter(|n| !n.keyed && n.may_get_whole(round))
            .count();
        if keyframe_for_lacking(self.lacking_for_keyframe(to), to.len()) {
            return keyframes;
        }
        (self.keyframe_bytes() * wholes + change * (to.len() - wholes)).min(keyframes)
    }

    /// Whether sending `bytes` more of updates now keeps us within the upload budget's
    /// burst allowance (always, without a budget).
    fn affordable(&self, bytes: usize, now_ms: f64) -> bool {
        // Ahead of the budget now, plus the new bytes (in this order: `f - now` is exactly
        // 0 when the budget is paid up, so a keyframe sized to the allowance fits).
        self.cfg.upload_bytes_per_ms().is_none_or(|rate| {
            (self.upload_free_at - now_ms).max(0.0) + bytes as f64 / rate <= self.upload_burst_ms()
        })
    }

    /// Sends our update `msg` to `to` (every contributor when `all`; neighbours left out
    /// then miss it), each at most once. With weights changes, a neighbour that does not
    /// hold our public copy gets the copy after this update whole instead (int8, the same
    /// round: it stands for the update) and holds it from then on — at most once per
    /// [`KEYFRAME_EVERY`] rounds; beyond that it gets the change (which it cannot use) and
    /// waits for our next keyframe. Counts it all against the upload budget.
    fn send_update(&mut self, to: &[PeerId], msg: &[u8], all: bool, now_ms: f64) {
        let round = self.learner.round();
        let change = self.learner.sent_change();
        let mut whole = None;
        let mut bytes = 0;
        // Those that lack our copy first, so that their whole copies are weighed against
        // the allowance before the changes to the others spend it.
        let keyed = |p: &PeerId| self.nbrs.get(p).is_some_and(|n| n.keyed);
        let mut to = to.to_vec();
        front_first(&mut to, &|p| !keyed(p));
        for p in &to {
            let Some(n) = self.nbrs.get(p) else { continue };
            if n.sent_round == Some(round) {
                continue;
            }
            let may_whole = n.may_get_whole(round);
            let whole_now = change
                && !n.keyed
                && may_whole
                && self.affordable(bytes + self.keyframe_bytes(), now_ms);
            let data = if whole_now {
                whole
                    .get_or_insert_with(|| self.learner.whole_public())
                    .clone()
            } else {
                Some(msg.to_vec())
            };
            let Some(data) = data else { continue };
            if let Some(n) = self.nbrs.get_mut(p) {
                n.sent_round = Some(round);
                // A keyframe or a whole copy gives it the copy (what it did not use
                // before no longer tells); a change keeps it only where it had it.
                let sets_copy = !change || whole_now;
                n.keyed |= sets_copy;
                n.had_copy |= sets_copy;
                if sets_copy {
                    n.unheard.clear();
                }
                if whole_now {
                    n.whole_round = Some(round);
                }
                if n.unheard.len() >= UNHEARD_KEPT {
                    n.unheard.pop_front();
                }
                n.unheard.push_back(round);
            }
            bytes += data.len();
            self.send(*p, data);
        }
        if all {
            for (p, n) in &mut self.nbrs {
                if !to.contains(p) {
                    n.keyed = false;
                }
            }
        }
        self.spend_upload(bytes, now_ms);
    }

    /// How far ahead of its budget an update may take a peer: 10 s of it, or what a
    /// keyframe to every neighbour our updates go to takes to pay for, whichever is
    /// longer (so that, paid up, there is always room for a keyframe to all).
    fn upload_burst_ms(&self) -> f64 {
        let Some(rate) = self.cfg.upload_bytes_per_ms() else {
            return f64::INFINITY;
        };
        UPLOAD_BURST_MS.max((self.keyframe_bytes() * self.contributors().len()) as f64 / rate)
    }

    /// About the bytes of a keyframe of our weights, or of a whole copy (int8 in blocks
    /// of 256).
    fn keyframe_bytes(&self) -> usize {
        crate::learn::KEYFRAME_CODEC.approx_bytes(self.learner.weights().len())
    }

    /// About the bytes of an update in the task's codec (a change, with weights changes).
    fn change_bytes(&self) -> usize {
        self.cfg
            .compression
            .approx_bytes(self.learner.weights().len())
    }

    /// Counts `bytes` of updates sent now against the upload budget: the next update
    /// waits until they are paid at the budget's rate (from now, or from when the
    /// previous ones are paid, whichever is later).
    fn spend_upload(&mut self, bytes: usize, now_ms: f64) {
        if let Some(rate) = self.cfg.upload_bytes_per_ms() {
            self.upload_free_at = self.upload_free_at.max(now_ms) + bytes as f64 / rate;
        }
    }

    /// Once the privacy budget stops our updates, neighbours are told we no longer
    /// contribute (so they stop waiting for us).
    fn budget_check(&mut self) {
        if !self.learner.may_send() {
            self.announce();
        }
    }

    /// The learner's counters into what people see.
    fn refresh(&mut self) {
        let p = &mut self.progress;
        p.round = self.learner.round();
        p.peers = self.nbrs.values().filter(|n| !n.idle).count();
        p.connected = self.nbrs.len();
        p.used = self.learner.stats.used;
        p.receipts = self.learner.stats.receipts;
        p.rejected = self
            .learner
            .stats
            .rejected
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), *v))
            .collect();
        let paused = p.paused || p.task_paused;
        p.privacy = self.learner.privacy();
        if self.learner.loss_kept() {
            p.loss = 0.0; // it describes the visitor's data: neither shown nor reported
        }
        let spent = p.privacy.is_some_and(|d| d.stopped);
        p.phase = match self.phase {
            Phase::Joining { .. } => "joining",
            Phase::Ready if paused => "paused",
            Phase::Ready if spent => "budget spent",
            Phase::Ready | Phase::Training { .. } => "training",
            Phase::Waiting { .. } => "waiting",
            Phase::Observing => "observing",
        };
    }
}

/// The signer of an update, read without decoding the rest.
fn update_key(data: &[u8]) -> Option<PublicKey> {
    super::wire::body_of(data, 1)?.get(..32)?.try_into().ok()
}

/// The signer of a receipt message, read without checking its signature (see
/// `Learner::take_receipt` for the checks).
fn receipt_signer(data: &[u8]) -> Option<PublicKey> {
    let body = super::wire::body_of(data, 6)?;
    crate::trust::receipt::Receipt::decode_unverified(body)
        .ok()
        .map(|r| r.receiver)
}

/// How many replays of updates held one connection has checked at most (a relay's copies
/// of its neighbours' updates for a round or two).
const COPIES_CHECKED: usize = 32;

/// The round field of an update message, read as [`update_key`] reads its key.
fn update_round(data: &[u8]) -> Option<u64> {
    update_key(data)?;
    Some(u64::from_le_bytes(data.get(37..45)?.try_into().ok()?))
}

/// Picks the model to adopt from the answers of one download (see the module's rule).
/// Returns it with the number of answers dropped as round outliers, or why none.
fn choose(
    answers: &[&Snapshot],
    quorum: usize,
    min_round: Option<u64>,
    window: u64,
    own: &[f32],
    lag: Option<u64>,
) -> Result<(Snapshot, usize), (Rejection, usize)> {
    let quorum = quorum.max(1);
    if answers.len() < quorum {
        return Err((Rejection::NoQuorum, 0));
    }
    let ahead = |s: &Snapshot| min_round.is_none_or(|m| s.round >= m);
    // A lagging peer's download (`lag`: the latest round it may adopt, see
    // `Peer::plausible_round`) asks its neighbours behind too: the answers not ahead are
    // voters, kept whatever their round, counted, their agreement counting for an answer
    // ahead, and none of them taken; the answers past the plausible round are outliers,
    // and the round window is about the median of the other answers ahead.
    let behind_vote = lag.is_some();
    let too_far = |s: &Snapshot| lag.is_some_and(|most| s.round > most);
    let mut rounds: Vec<u64> = answers
        .iter()
        .filter(|s| !behind_vote || ahead(s) && !too_far(s))
        .map(|s| s.round)
        .collect();
    if rounds.is_empty() {
        let outliers = answers.iter().filter(|s| too_far(s)).count();
        return Err((Rejection::NoQuorum, outliers));
    }
    let median = super::lower_median_by(&mut rounds, u64::cmp).expect("rounds not empty");
    let total = answers.len();
    let mut kept: Vec<&Snapshot> = answers
        .iter()
        .copied()
        .filter(|s| !too_far(s) && (s.round.abs_diff(median) <= window || behind_vote && !ahead(s)))
        .collect();
    let outliers = total - kept.len();
    if !behind_vote {
        kept.retain(|s| ahead(s));
    }
    // The answers counted: all but those not ahead (which count neither way, unless
    // they vote).
    let counted = outliers + kept.len();
    if kept.len() < quorum {
        return Err((Rejection::NoQuorum, outliers));
    }
    // Which answers agree with which: a model is only taken when `quorum` answers and
    // more than half of those kept agree with it.
    let norms: Vec<f32> = kept
        .iter()
        .map(|s| super::aggregate::norm(&s.weights))
        .collect();
    let agree = |i: usize, j: usize| {
        super::aggregate::distance(&kept[i].weights, &kept[j].weights)
            <= AGREE_RATIO * norms[i].min(norms[j])
    };
    let support: Vec<usize> = (0..kept.len())
        .map(|i| (0..kept.len()).filter(|&j| agree(i, j)).count())
        .collect();
    // More than half of the answers counted, round outliers too.
    let eligible: Vec<usize> = (0..kept.len())
        .filter(|&i| ahead(kept[i]) && 2 * support[i] > counted && support[i] >= quorum)
        .collect();
    if eligible.is_empty() {
        return Err((Rejection::NoQuorum, outliers));
    }
    let center = coordinate_median(kept.iter().map(|s| s.weights.as_slice()));
    let score = |i: usize| {
        (
            super::aggregate::distance(&kept[i].weights, &center),
            super::aggregate::distance(&kept[i].weights, own),
        )
    };
    let mut best = eligible[0];
    for &i in &eligible[1..] {
        let (a, b) = (score(i), score(best));
        // Equal distances to the center (two answers): the one nearer our own weights.
        let tie = (a.0 - b.0).abs() <= 1e-6 * a.0.max(b.0).max(1e-12);
        if (tie && a.1 < b.1) || (!tie && a.0 < b.0) {
            best = i;
        }
    }
    let agreeing: Vec<&Snapshot> = (0..kept.len())
        .filter(|&j| agree(best, j))
        .map(|j| kept[j])
        .collect();
    let momentum = momentum_median(
        &agreeing
            .iter()
            .map(|s| s.momentum.as_slice())
            .collect::<Vec<_>>(),
    );
    // Never below the lower median round of the answers that agree with it: two
    // colluders of five that sent one model between the honest ones were the
    // coordinate-wise median, and chose the round it came at (anywhere in the window:
    // two rounds behind the swarm, say, where the swarm's updates for it are gone). Not
    // that median always: a later answer nearest the median is a newer model (and in
    // `byzantine-25` the joiners' accuracy moved with the rule by a point either way).
    let mut rounds: Vec<u64> = agreeing.iter().map(|s| s.round).collect();
    let agreed = super::lower_median_by(&mut rounds, u64::cmp)
        .expect("the best answer agrees with at least a quorum");
    let s = Snapshot {
        round: agreed.max(kept[best].round),
        weights: kept[best].weights.clone(),
        momentum,
    };
    Ok((s, outliers))
}

/// The momentum a downloaded model starts with, from the momenta of the answers that
/// agree with it (agreeing on weights says nothing of momentum): coordinate-wise their
/// median, for an even count the middle value nearer zero (the mean of the middle two
/// would let two liars of four set half of it), then clipped to the lower median of
/// their norms. Liars fewer than half of them move it no further than an honest
/// answer's.
fn momentum_median(vs: &[&[f32]]) -> Vec<f32> {
    let mut m = columns(vs, |col| {
        let k = col.len();
        let (a, b) = (col[(k - 1) / 2], col[k / 2]);
        if a.abs() <= b.abs() { a } else { b }
    });
    let norms: Vec<f32> = vs.iter().map(|v| super::aggregate::norm(v)).collect();
    super::aggregate::clip_norm(&mut m, super::lower_median(&norms));
    m
}

/// The coordinate-wise median of equally long vectors (the mean of the middle two for an
/// even count).
fn coordinate_median<'a>(vs: impl Iterator<Item = &'a [f32]>) -> Vec<f32> {
    let vs: Vec<&[f32]> = vs.collect();
    columns(&vs, |col| {
        let m = col.len();
        if m % 2 == 1 {
            col[m / 2]
        } else {
            0.5 * (col[m / 2 - 1] + col[m / 2])
        }
    })
}

/// `pick` of each coordinate's values across equally long vectors, sorted (never empty:
/// no vectors give an empty result).
fn columns(vs: &[&[f32]], pick: impl Fn(&[f32]) -> f32) -> Vec<f32> {
    let n = vs.first().map_or(0, |v| v.len());
    let mut col = Vec::with_capacity(vs.len());
    (0..n)
        .map(|i| {
            col.clear();
            col.extend(vs.iter().map(|v| v[i]));
            col.sort_unstable_by(f32::total_cmp);
            pick(&col)
        })
        .collect()
}

#[cfg(test)]
mod tests;

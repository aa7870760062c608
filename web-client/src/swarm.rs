//! Platform-neutral rules of the swarm transport, used by the browser and the native
//! implementations alike: who makes the WebRTC offer, how reconnection backs off, and the
//! sizes that bound every queue.

use std::collections::VecDeque;
use std::future::Future;

use shoal_shared::protocol::{PeerId, PeerReport};
use shoal_shared::rng::SplitMix64;

pub use shoal_shared::framing::{MAX_MESSAGE, MESSAGE_SLACK, max_message_for};

/// [`max_message_for`] a parameter count given by a page (a task description's
/// `cost.parameters`); `None` for one that is not a count.
pub fn max_message_for_count(parameters: f64) -> Option<usize> {
    (parameters.is_finite() && parameters >= 0.0).then(|| max_message_for(parameters as usize))
}

/// [`max_message_for`] the model of `task` ([`MAX_MESSAGE`] if it has none: a task is
/// validated before any peer runs it).
pub fn max_message_for_task(task: &shoal_shared::task::TaskSpec) -> usize {
    shoal_shared::engine::Model::new(task.model.clone())
        .map_or(MAX_MESSAGE, |m| max_message_for(m.param_len()))
}
/// How many times what an honest neighbour may send us in bytes a link takes from it
/// (see [`link_bytes_for`]): room for clocks that disagree and for the allowances'
/// own bursts.
pub const LINK_BYTES_SLACK: f64 = 2.0;
/// What a link takes besides updates and model answers, in bytes a millisecond (4 KB/s):
/// statuses, receipts, ledger heads, requests.
pub const LINK_SMALL_BYTES_PER_MS: f64 = 4.0;
/// A link's burst of bytes: this many of the task's largest messages (a keyframe, a model
/// answer, a catch-up's model) plus [`LINK_BURST_MS`] of its rate.
pub const LINK_BURST_MESSAGES: usize = 4;
/// See [`LINK_BURST_MESSAGES`].
pub const LINK_BURST_MS: f64 = 30_000.0;

/// The bytes one neighbour's link takes from it, for a task of `params` parameters with
/// an upload budget of `upload_mb_per_hour` (0: none): `(bytes a millisecond, burst)`,
/// or `None` without a budget. An honest neighbour sends us at most its budget's rate of
/// updates and [`ANSWER_SHARE`](shoal_shared::learn::peer::ANSWER_SHARE) of it of model
/// answers ([`Peer`](shoal_shared::learn::peer::Peer) keeps both); a link takes
/// [`LINK_BYTES_SLACK`] times that plus [`LINK_SMALL_BYTES_PER_MS`], and a neighbour
/// that sends more is dropped. Without it, a neighbour could make a visitor download as
/// fast as the channel goes, paused or not (a message rate bounds only the count: 200
/// junk messages of 900 KB a second passed), and what a page's inbox then dropped
/// counted nowhere. For the demo task: 71 KB/s (254 MB an hour) and a burst of 5.9 MB,
/// against a budget of 22 KB/s.
pub fn link_bytes_for(params: usize, upload_mb_per_hour: u32) -> Option<(f64, f64)> {
    (upload_mb_per_hour > 0).then(|| {
        let budget = f64::from(upload_mb_per_hour) * 1e6 / 3.6e6;
        let answers = shoal_shared::learn::peer::answer_bytes_per_ms(params, Some(budget));
        let rate = LINK_BYTES_SLACK * (budget + answers) + LINK_SMALL_BYTES_PER_MS;
        let burst = (LINK_BURST_MESSAGES * max_message_for(params)) as f64 + LINK_BURST_MS * rate;
        (rate, burst)
    })
}

/// [`link_bytes_for`] the model and budget of `task`.
pub fn link_bytes_for_task(task: &shoal_shared::task::TaskSpec) -> Option<(f64, f64)> {
    let params = shoal_shared::engine::Model::new(task.model.clone())
        .ok()?
        .param_len();
    link_bytes_for(params, task.learn.upload_mb_per_hour)
}

/// Messages a receiver reassembles at once per channel.
pub const MAX_IN_FLIGHT: usize = 4;
/// Bytes a browser worker's messages to all its neighbours may take while the page has
/// not taken them.
pub const MAX_QUEUED: usize = 2 * MAX_MESSAGE;

/// Bytes one channel's send queue may hold for a task whose largest message is
/// `max_message` bytes: two such messages, framed (an update and a model answer waiting
/// behind it). A neighbour that stops reading holds no more of a peer's memory than
/// that (1.9 MB for the demo MLP); before, every channel could hold 128 MiB.
pub fn max_queued_for(max_message: usize) -> usize {
    shoal_shared::framing::framed_len(max_message, shoal_shared::framing::DEFAULT_CHUNK)
        .saturating_mul(2)
}
/// Seconds a new peer connection has to open its channel before it is dropped (and the
/// neighbour reported `unreachable`).
pub const CONNECT_DEADLINE_SECS: u32 = 20;
/// Local ICE candidates held per connection until its offer or answer has been sent
/// (a candidate must not reach the other side before the description it belongs to).
pub const MAX_HELD_CANDIDATES: usize = 64;

/// Messages from one neighbour that may wait in a peer's [`Inbox`], received and not yet
/// handled.
pub const MAX_INBOX_MESSAGES_PER_PEER: usize = 1024;
/// Bytes of messages from all neighbours together that may wait in an [`Inbox`], beyond
/// each neighbour's [`INBOX_FLOOR`].
pub const MAX_INBOX: usize = 2 * MAX_MESSAGE;
/// Bytes a neighbour may always have waiting, however full the inbox is with others'
/// messages: room for its updates and greetings when others flood.
pub const INBOX_FLOOR: usize = 4 << 20;

/// Events received and not yet handled, bounded per neighbour: a peer takes its events in
/// between chunks of training (the browser worker also before its peer exists, while the
/// task's data downloads), so what a neighbour sends waits here meanwhile. With `limit`
/// the largest message (the task's, [`max_message_for`]) and `share` the larger of
/// `limit` and [`INBOX_FLOOR`], a message goes in if it is at most `limit` bytes, its
/// sender has at most `share` bytes (with it) and [`MAX_INBOX_MESSAGES_PER_PEER`]
/// messages waiting, and either all senders together at most [`MAX_INBOX`] bytes or its
/// sender at most [`INBOX_FLOOR`]; otherwise it is dropped and counted. So flooding
/// neighbours lose their own messages, another's updates still go in, and the inbox holds
/// at most a share per neighbour (and [`MAX_INBOX`] plus a floor per neighbour: a task
/// of a large model with uncompressed updates still gets each neighbour's update in). Events of the local transport
/// (neighbours up and down) always go in, at the pace of connections; the signaling
/// connection's state and the task's come at the server's pace, so only the latest of
/// each waits, taken before the rest.
#[derive(Debug)]
pub struct Inbox {
    events: VecDeque<SwarmEvent>,
    /// The latest signaling event, task state and `task_changed` not yet taken, outside
    /// the queue: each replaces the one before it, and they are taken first. They come
    /// at the server's pace (a server that alternated `welcome` and `task_state` queued
    /// each one).
    latest: [Option<SwarmEvent>; 3],
    /// Bytes and messages waiting per sender (a few neighbours: a list).
    waiting: Vec<(PeerId, usize, usize)>,
    bytes: usize,
    dropped: u64,
    /// The largest message, from which the bounds follow.
    limit: usize,
}

impl Default for Inbox {
    /// An inbox for messages up to [`MAX_MESSAGE`] (before the task is known).
    fn default() -> Self {
        Self::new(MAX_MESSAGE)
    }
}

impl Inbox {
    /// An inbox for messages up to `limit` bytes (see [`max_message_for`]).
    pub fn new(limit: usize) -> Self {
        Self {
            events: VecDeque::new(),
            latest: [None, None, None],
            waiting: Vec::new(),
            bytes: 0,
            dropped: 0,
            limit: limit.min(MAX_MESSAGE),
        }
    }

    /// The largest message it takes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes messages up to `limit` bytes from now on (see [`Inbox::new`]); what waits
    /// stays.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_MESSAGE);
    }

    /// Queues `ev`; false when it was a message past its sender's share (dropped).
    pub fn push(&mut self, ev: SwarmEvent) -> bool {
        match ev {
            SwarmEvent::Signaling { .. } => {
                self.latest[0] = Some(ev);
                return true;
            }
            SwarmEvent::TaskState { .. } => {
                self.latest[1] = Some(ev);
                return true;
            }
            SwarmEvent::TaskChanged => {
                self.latest[2] = Some(ev);
                return true;
            }
            _ => {}
        }
        if let SwarmEvent::Message { from, data } = &ev {
            let i = match self.waiting.iter().position(|w| w.0 == *from) {
                Some(i) => i,
                None => {
                    self.waiting.push((*from, 0, 0));
                    self.waiting.len() - 1
                }
            };
            let (_, bytes, count) = &mut self.waiting[i];
            let after = *bytes + data.len();
            let share = self.limit.max(INBOX_FLOOR);
            if data.len() > self.limit
                || after > share
                || *count + 1 > MAX_INBOX_MESSAGES_PER_PEER
                || (self.bytes + data.len() > MAX_INBOX && after > INBOX_FLOOR)
            {
                if *count == 0 {
                    self.waiting.swap_remove(i);
                }
                self.dropped += 1;
                return false;
            }
            *bytes += data.len();
            *count += 1;
            self.bytes += data.len();
        }
        self.events.push_back(ev);
        true
    }

    /// The oldest waiting event.
    pub fn pop(&mut self) -> Option<SwarmEvent> {
        if let Some(ev) = self.latest.iter_mut().find_map(Option::take) {
            return Some(ev);
        }
        let ev = self.events.pop_front()?;
        if let SwarmEvent::Message { from, data } = &ev {
            self.bytes -= data.len();
            if let Some(i) = self.waiting.iter().position(|w| w.0 == *from) {
                let w = &mut self.waiting[i];
                w.1 -= data.len();
                w.2 -= 1;
                if w.2 == 0 {
                    self.waiting.swap_remove(i);
                }
            }
        }
        Some(ev)
    }

    /// Messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Takes over `earlier`'s events, in order and within this inbox's bounds, and its
    /// count of drops.
    pub fn adopt(&mut self, earlier: &mut Inbox) {
        self.dropped += earlier.dropped;
        earlier.dropped = 0;
        while let Some(ev) = earlier.pop() {
            self.push(ev);
        }
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.events.len() + self.latest.iter().flatten().count()
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.latest.iter().all(Option::is_none)
    }
}

/// What a swarm transport reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwarmEvent {
    /// The signaling connection came up (with this peer's id) or went down.
    Signaling {
        /// This peer's id in the new session; `None` when the connection went down.
        me: Option<PeerId>,
    },
    /// A data channel to this neighbour opened.
    PeerUp(PeerId),
    /// The connection to this neighbour closed or failed.
    PeerDown(PeerId),
    /// A whole, checksummed message from a neighbour.
    Message {
        /// Who sent it.
        from: PeerId,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// The researcher paused or resumed the task.
    TaskState {
        /// Paused.
        paused: bool,
    },
    /// The server refused the connection with `task_changed` (it runs another revision
    /// of the task than the one this client loaded and named) or `bad_version` (it
    /// speaks another protocol version than this client's code). Its driver stops.
    TaskChanged,
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// No open channel to that peer.
    #[error("no open channel to {0}")]
    NoSuchPeer(PeerId),
    /// Larger than the swarm's message limit.
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// The channel's queue is full; try again later.
    #[error("send queue to {0} is full")]
    Full(PeerId),
}

/// The one seam between the swarm logic and the platform: the browser's web-sys
/// transport (`wasm/transport.rs`) and the native `webrtc`-crate transport (`native.rs`)
/// both implement it.
pub trait Transport {
    /// This peer's id in the current signaling session.
    fn id(&self) -> Option<PeerId>;
    /// Neighbours with an open data channel.
    fn peers(&self) -> Vec<PeerId>;
    /// Queues a whole message for a neighbour (framed, checksummed, backpressured).
    fn send(&self, peer: PeerId, data: Vec<u8>) -> Result<(), SendError>;
    /// The next event, or `None` once the transport is closed.
    fn next_event(&mut self) -> impl Future<Output = Option<SwarmEvent>>;
    /// Sends this peer's numbers to the server for the dashboard (dropped while the
    /// server is unreachable: the next report replaces it).
    fn report(&self, report: &PeerReport);
    /// Sends a receipt this peer signed (see `trust::receipt`) to the server for the
    /// task's ledger (dropped while the server is unreachable).
    fn receipt(&self, receipt: &[u8]);
    /// Closes the connection to a neighbour that broke the protocol and reports it
    /// `unreachable`, so that the server links each side to another peer.
    fn drop_neighbour(&self, peer: PeerId);
}

/// For each pair of neighbours, the one with the smaller id offers.
pub fn should_offer(me: PeerId, other: PeerId) -> bool {
    me < other
}

/// Capped exponential backoff with jitter for reconnecting to the signaling server.
#[derive(Clone, Debug)]
pub struct Backoff {
    attempt: u32,
    base_ms: u32,
    max_ms: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// Starts at `base_ms`, doubles per attempt, never exceeds `max_ms`.
    pub fn new(base_ms: u32, max_ms: u32, seed: u64) -> Self {
        Self {
            attempt: 0,
            base_ms,
            max_ms,
            rng: SplitMix64::new(seed),
        }
    }

    /// The delay before the next attempt: a uniform draw from the upper half of the
    /// capped exponential, so that peers that lost the server together do not return
    /// together.
    pub fn next_delay_ms(&mut self) -> u32 {
        let exp = u64::from(self.base_ms) << self.attempt.min(20);
        let cap = exp.min(u64::from(self.max_ms)) as f32;
        self.attempt = self.attempt.saturating_add(1);
        (cap * (0.5 + 0.5 * self.rng.unit_f32())) as u32
    }

    /// After a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(from: u64, len: usize) -> SwarmEvent {
        SwarmEvent::Message {
            from: PeerId(from),
            data: vec![0; len],
        }
    }

    #[test]
    fn a_flooding_neighbour_fills_only_its_own_share_of_the_inbox() {
        let mut inbox = Inbox::default();
        // Neighbour 1 sends as fast as it can while the worker trains: 1 MiB messages.
        let mut admitted = 0;
        for _ in 0..200 {
            admitted += usize::from(inbox.push(message(1, 1 << 20)));
        }
        assert_eq!(admitted, MAX_MESSAGE >> 20, "at most its share waits");
        assert_eq!(inbox.dropped(), 200 - admitted as u64);
        // An honest neighbour's update and the transport's own events still go in.
        assert!(inbox.push(message(2, 40_000)));
        assert!(inbox.push(SwarmEvent::PeerDown(PeerId(3))));
        // Tiny messages are bounded by count.
        let tiny = (0..5000).filter(|_| inbox.push(message(4, 1))).count();
        assert_eq!(tiny, MAX_INBOX_MESSAGES_PER_PEER);
        // Handling frees the share: the flooder gets room again, in order.
        let first = inbox.pop().expect("an event waits");
        assert_eq!(first, message(1, 1 << 20));
        assert!(inbox.push(message(1, 1 << 20)));
        assert!(!inbox.push(message(1, 1)));
        let mut left = 0;
        while inbox.pop().is_some() {
            left += 1;
        }
        assert_eq!(left, admitted + 2 + tiny);
        assert!(inbox.is_empty());
        assert!(
            inbox.push(message(1, MAX_MESSAGE)),
            "one largest message always fits"
        );
    }

    #[test]
    fn only_the_latest_signaling_and_task_state_wait() {
        // A server that alternates `welcome` and `task_state` while the peer trains.
        let mut inbox = Inbox::default();
        assert!(inbox.push(message(1, 10)));
        for i in 0..100_000u64 {
            assert!(inbox.push(SwarmEvent::Signaling {
                me: Some(PeerId(i))
            }));
            assert!(inbox.push(SwarmEvent::TaskState { paused: i % 2 == 0 }));
        }
        assert!(inbox.push(message(1, 10)));
        assert_eq!(inbox.len(), 4);
        let all: Vec<SwarmEvent> = std::iter::from_fn(|| inbox.pop()).collect();
        assert_eq!(
            all,
            [
                SwarmEvent::Signaling {
                    me: Some(PeerId(99_999))
                },
                SwarmEvent::TaskState { paused: false },
                message(1, 10),
                message(1, 10)
            ]
        );
        assert!(inbox.is_empty());
    }

    #[test]
    fn two_flooders_fill_the_inbox_and_another_neighbour_still_gets_its_floor() {
        let mut inbox = Inbox::default();
        let big = MAX_MESSAGE;
        assert!(inbox.push(message(1, big)));
        assert!(inbox.push(message(2, big)));
        // Within the floor: an honest update goes in past the total.
        assert!(inbox.push(message(3, 1 << 20)));
        assert!(inbox.push(message(3, INBOX_FLOOR - (1 << 20))));
        assert!(!inbox.push(message(3, 1)), "past the total and its floor");
        assert!(
            !inbox.push(message(4, INBOX_FLOOR + 1)),
            "larger than a floor"
        );
        assert!(!inbox.push(message(1, 1)), "a flooder has no floor left");
        assert_eq!(inbox.dropped(), 3);
        // Handling a flooder's message makes room in the total again.
        assert_eq!(inbox.pop(), Some(message(1, big)));
        assert!(inbox.push(message(4, INBOX_FLOOR + 1)));
    }

    #[test]
    fn a_task_of_a_small_model_bounds_each_neighbour_by_its_largest_message() {
        // The demo MLP: 109,386 parameters, so at most 940,624 bytes a message.
        let limit = max_message_for(109_386);
        assert_eq!(limit, 8 * 109_386 + 65_536);
        assert_eq!(max_message_for(20_000_000), MAX_MESSAGE, "capped");
        let mut inbox = Inbox::new(limit);
        // A model in fp32 with its momentum, the largest message such a peer sends, fits;
        // a longer one does not.
        assert!(inbox.push(message(1, 8 * 109_386 + 49)));
        assert!(
            !inbox.push(message(2, limit + 1)),
            "longer than any message"
        );
        inbox.pop();
        // A flooder holds at most a floor's bytes (4 MiB), not 64 MiB.
        let admitted = (0..200).filter(|_| inbox.push(message(1, 100_000))).count();
        assert_eq!(admitted, INBOX_FLOOR / 100_000);
        // Two more flooders: each holds as much.
        for flooder in [2, 3] {
            let n = (0..200)
                .filter(|_| inbox.push(message(flooder, 100_000)))
                .count();
            assert_eq!(n, admitted);
        }
        // An honest neighbour's update still goes in.
        assert!(inbox.push(message(4, 15_000)));
        let waiting: usize = std::iter::from_fn(|| inbox.pop())
            .map(|e| match e {
                SwarmEvent::Message { data, .. } => data.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(waiting, 3 * admitted * 100_000 + 15_000);
    }

    #[test]
    fn adopting_keeps_the_order_and_the_count_of_drops() {
        let mut early = Inbox::default();
        early.push(SwarmEvent::PeerUp(PeerId(1)));
        early.push(message(1, MAX_MESSAGE));
        early.push(message(1, 1));
        early.push(message(2, 7));
        let mut inbox = Inbox::default();
        inbox.push(message(3, 1));
        inbox.adopt(&mut early);
        assert!(early.is_empty());
        assert_eq!(inbox.dropped(), 1);
        let order: Vec<SwarmEvent> = std::iter::from_fn(|| inbox.pop()).collect();
        assert_eq!(
            order,
            vec![
                message(3, 1),
                SwarmEvent::PeerUp(PeerId(1)),
                message(1, MAX_MESSAGE),
                message(2, 7)
            ]
        );
    }

    #[test]
    fn exactly_one_side_of_each_pair_offers() {
        let (a, b) = (PeerId(3), PeerId(9));
        assert!(should_offer(a, b));
        assert!(!should_offer(b, a));
    }

    #[test]
    fn backoff_grows_is_capped_jittered_and_resets() {
        let mut b = Backoff::new(250, 10_000, 1);
        let delays: Vec<u32> = (0..10).map(|_| b.next_delay_ms()).collect();
        assert!((125..=250).contains(&delays[0]), "{delays:?}");
        assert!((250..=500).contains(&delays[1]), "{delays:?}");
        assert!(delays.iter().all(|&d| d <= 10_000), "{delays:?}");
        assert!(delays[9] >= 5_000, "capped, not stuck low: {delays:?}");
        let mut other = Backoff::new(250, 10_000, 2);
        let theirs: Vec<u32> = (0..10).map(|_| other.next_delay_ms()).collect();
        assert_ne!(delays, theirs, "jitter differs between peers");
        b.reset();
        assert!(b.next_delay_ms() <= 250);
    }
}

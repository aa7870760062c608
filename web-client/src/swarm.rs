//! Platform-neutral rules of the swarm transport, used by the browser and the native
//! implementations alike: who makes the WebRTC offer, how reconnection backs off, and the
//! sizes that bound every queue.

use std::future::Future;

use shoal_shared::protocol::{PeerId, PeerReport};
use shoal_shared::rng::SplitMix64;

/// Largest message a peer sends or accepts over a data channel (a model of a few million
/// parameters in fp32, with room to spare).
pub const MAX_MESSAGE: usize = 64 << 20;
/// Messages a receiver reassembles at once per channel.
pub const MAX_IN_FLIGHT: usize = 4;
/// Bytes one channel's send queue may hold.
pub const MAX_QUEUED: usize = 2 * MAX_MESSAGE;
/// Seconds a new peer connection has to open its channel before it is dropped (and the
/// neighbour reported `unreachable`).
pub const CONNECT_DEADLINE_SECS: u32 = 20;
/// Local ICE candidates held per connection until its offer or answer has been sent
/// (a candidate must not reach the other side before the description it belongs to).
pub const MAX_HELD_CANDIDATES: usize = 64;

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

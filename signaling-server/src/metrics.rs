//! Counters for `/metrics`, in the Prometheus text exposition format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use shoal_shared::protocol::ErrorCode;

use crate::signaling::ReceiptOutcome;

/// Process-wide counters; gauges (peers per task, connections) are read from the live
/// state when scraped.
#[derive(Default)]
pub struct Metrics {
    /// Signals relayed from one peer to another.
    pub relayed: AtomicU64,
    /// Signals dropped because the addressee's queue was full.
    pub dropped: AtomicU64,
    /// Bytes received in text frames.
    pub bytes_in: AtomicU64,
    /// Bytes sent in text frames.
    pub bytes_out: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// TCP connections refused at the connection cap.
    pub refused_connections: AtomicU64,
    /// TCP connections refused at their address's share.
    pub refused_connections_per_address: AtomicU64,
    rejected: [AtomicU64; ErrorCode::ALL.len()],
    disconnects: [AtomicU64; Disconnect::ALL.len()],
    receipts: [AtomicU64; ReceiptOutcome::ALL.len()],
}

/// Why the server ended a peer's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disconnect {
    /// The peer closed it.
    Bye,
    /// The connection broke without a close frame (reset, end of stream).
    Gone,
    /// Nothing (not even a pong) came for the idle timeout.
    IdleTimeout,
    /// A write failed, or did not complete within the idle timeout (the peer stopped
    /// reading).
    SendFailed,
    /// A websocket protocol violation (bad framing, masking, opcodes).
    FrameError,
    /// A text frame that is not UTF-8.
    InvalidText,
    /// A message over the size limit.
    TooLarge,
    /// Too many rate-limit strikes.
    RateLimit,
    /// The server is shutting down.
    Shutdown,
}

impl Disconnect {
    /// Every reason, in `/metrics` order.
    pub const ALL: [Self; 9] = [
        Self::Bye,
        Self::Gone,
        Self::IdleTimeout,
        Self::SendFailed,
        Self::FrameError,
        Self::InvalidText,
        Self::TooLarge,
        Self::RateLimit,
        Self::Shutdown,
    ];

    /// The `reason` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Bye => "bye",
            Self::Gone => "gone",
            Self::IdleTimeout => "idle_timeout",
            Self::SendFailed => "send_failed",
            Self::FrameError => "frame_error",
            Self::InvalidText => "invalid_text",
            Self::TooLarge => "too_large",
            Self::RateLimit => "rate_limit",
            Self::Shutdown => "shutdown",
        }
    }

    /// The websocket close code (RFC 6455 section 7.4.1) and reason the peer is sent;
    /// `None` when there is nobody left to send it to.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        Some(match self {
            Self::Gone => return None,
            Self::Bye => (1000, "bye"),
            Self::IdleTimeout => (1001, "idle timeout"),
            Self::SendFailed => (1011, "send failed"),
            Self::FrameError => (1002, "protocol error"),
            Self::InvalidText => (1007, "text is not UTF-8"),
            Self::TooLarge => (1009, "message too large"),
            Self::RateLimit => (1008, "rate limit"),
            Self::Shutdown => (1001, "server shutting down"),
        })
    }
}

impl Metrics {
    /// Counts one refused message or connection.
    pub fn reject(&self, code: ErrorCode) {
        let i = ErrorCode::ALL.iter().position(|&c| c == code).unwrap_or(0);
        self.rejected[i].fetch_add(1, Relaxed);
    }

    /// Counts one joined peer's connection that ended, by why.
    pub fn disconnected(&self, why: Disconnect) {
        let i = Disconnect::ALL.iter().position(|&d| d == why).unwrap_or(0);
        self.disconnects[i].fetch_add(1, Relaxed);
    }

    /// Counts one receipt, appended or refused.
    pub fn receipt(&self, outcome: ReceiptOutcome) {
        let i = ReceiptOutcome::ALL
            .iter()
            .position(|&o| o == outcome)
            .unwrap_or(0);
        self.receipts[i].fetch_add(1, Relaxed);
    }

    /// Receipts counted with `outcome`.
    pub fn receipts(&self, outcome: ReceiptOutcome) -> u64 {
        ReceiptOutcome::ALL
            .iter()
            .position(|&o| o == outcome)
            .map_or(0, |i| self.receipts[i].load(Relaxed))
    }

    /// How many were refused for `code`.
    pub fn rejected(&self, code: ErrorCode) -> u64 {
        ErrorCode::ALL
            .iter()
            .position(|&c| c == code)
            .map_or(0, |i| self.rejected[i].load(Relaxed))
    }

    /// Renders every metric; `peers` is (task, peers online), `connections` the open ones.
    pub fn render(&self, peers: &[(String, usize)], connections: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# HELP shoal_peers_online Peers connected, per task.");
        let _ = writeln!(s, "# TYPE shoal_peers_online gauge");
        for (task, n) in peers {
            let _ = writeln!(s, "shoal_peers_online{{task=\"{}\"}} {n}", escape(task));
        }
        let simple: [(&str, &str, &str, u64); 8] = [
            (
                "shoal_connections",
                "gauge",
                "Open websocket connections.",
                connections as u64,
            ),
            (
                "shoal_connections_total",
                "counter",
                "Websocket connections accepted.",
                self.connections_total.load(Relaxed),
            ),
            (
                "shoal_connections_refused_total",
                "counter",
                "TCP connections refused at the connection cap.",
                self.refused_connections.load(Relaxed),
            ),
            (
                "shoal_connections_refused_per_address_total",
                "counter",
                "TCP connections refused at their address's share (--max-connections-per-address).",
                self.refused_connections_per_address.load(Relaxed),
            ),
            (
                "shoal_messages_relayed_total",
                "counter",
                "Signals relayed between neighbours.",
                self.relayed.load(Relaxed),
            ),
            (
                "shoal_messages_dropped_total",
                "counter",
                "Signals dropped because the addressee's queue was full.",
                self.dropped.load(Relaxed),
            ),
            (
                "shoal_bytes_received_total",
                "counter",
                "Bytes of text frames received.",
                self.bytes_in.load(Relaxed),
            ),
            (
                "shoal_bytes_sent_total",
                "counter",
                "Bytes of text frames sent.",
                self.bytes_out.load(Relaxed),
            ),
        ];
        for (name, kind, help, v) in simple {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        by_reason(
            &mut s,
            "shoal_messages_rejected_total",
            "Messages or connections refused, by reason.",
            ErrorCode::ALL
                .iter()
                .map(|c| c.as_str())
                .zip(&self.rejected),
        );
        by_reason(
            &mut s,
            "shoal_receipts_total",
            "Receipts appended to a ledger (appended) or refused, by reason.",
            ReceiptOutcome::ALL
                .iter()
                .map(|o| o.label())
                .zip(&self.receipts),
        );
        by_reason(
            &mut s,
            "shoal_disconnects_total",
            "Peer connections ended, by reason.",
            Disconnect::ALL
                .iter()
                .map(|d| d.label())
                .zip(&self.disconnects),
        );
        s
    }
}

/// A counter with one series per `reason` label.
fn by_reason<'a>(
    s: &mut String,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (&'static str, &'a AtomicU64)>,
) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, n) in rows {
        let _ = writeln!(s, "{name}{{reason=\"{reason}\"}} {}", n.load(Relaxed));
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

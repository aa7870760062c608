//! The signaling protocol between peers and the signaling server, version 2: JSON text
//! frames over one websocket per peer. `docs/protocol.md` is the normative description;
//! these types are its single implementation, shared by the server and every peer.
//!
//! The server only introduces peers: it assigns ids, hands out neighbour sets and relays
//! WebRTC session descriptions and ICE candidates between neighbours. Model data never
//! passes through it.

use serde::{Deserialize, Serialize};

/// The protocol version this code speaks; a client asks for it with `?v=2`. Version 2
/// signs peers' updates over their SHA-256 (`learn::wire`): a version 1 peer's
/// signatures do not verify in it, nor its in one.
pub const VERSION: u32 = 2;

/// Largest signaling message, in bytes, the server accepts (a session description with
/// many candidates stays far below this).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// A peer's id within one task, assigned by the server: 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerId(#[serde(with = "hex_u64")] pub u64);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for PeerId {
    type Err = &'static str;

    /// Parses the wire form: exactly 16 lowercase hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if s.len() != 16 || !s.bytes().all(hex) {
            return Err("peer id must be 16 lowercase hex digits");
        }
        u64::from_str_radix(s, 16)
            .map(PeerId)
            .map_err(|_| "peer id must be 16 lowercase hex digits")
    }
}

mod hex_u64 {
    use serde::{Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{v:016x}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        // Parsed from the borrowed text where the input allows: no allocation per id.
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a peer id (16 lowercase hex digits)")
            }
            fn visit_str<E: Error>(self, s: &str) -> Result<u64, E> {
                s.parse::<super::PeerId>().map(|p| p.0).map_err(E::custom)
            }
        }
        d.deserialize_str(Hex)
    }
}

/// One entry of the ICE server list, in the shape of the browser's `RTCIceServer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:` or `turn:` URLs.
    pub urls: Vec<String>,
    /// TURN user name (`expiry:peer` for time-limited credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN password (base64 HMAC-SHA1 for time-limited credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The most STUN and TURN URLs a peer takes from `welcome`'s `ice_servers`, in all (the
/// server refuses to start with more).
pub const MAX_ICE_URLS: usize = 8;
/// The longest ICE URL, user name or credential a peer takes.
pub const MAX_ICE_FIELD: usize = 256;

/// Whether a peer takes `url` among its ICE servers: a `stun:`, `turn:` or `turns:` URL
/// (the scheme in any case, the colon required) of at most [`MAX_ICE_FIELD`] bytes.
pub fn usable_ice_url(url: &str) -> bool {
    url.len() <= MAX_ICE_FIELD
        && url.split_once(':').is_some_and(|(scheme, _)| {
            matches!(
                scheme.to_ascii_lowercase().as_str(),
                "stun" | "turn" | "turns"
            )
        })
}

/// What one WebRTC peer tells another through the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Signal {
    /// An SDP offer.
    Offer {
        /// The session description.
        sdp: String,
    },
    /// An SDP answer.
    Answer {
        /// The session description.
        sdp: String,
    },
    /// A trickled ICE candidate.
    Candidate {
        /// The candidate line (`candidate:...`).
        candidate: String,
        /// Media stream id the candidate belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sdp_mid: Option<String>,
        /// Index of the media description.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sdp_m_line_index: Option<u16>,
    },
}

/// What a peer is in the swarm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Trains and sends updates.
    #[default]
    Trainer,
    /// Watches (a dashboard): downloads the model, never sends updates.
    Observer,
}

/// A peer's numbers for the dashboard, sent about once per round. Counters only: never
/// weights, gradients or data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerReport {
    /// Trainer or observer.
    pub role: Role,
    /// The model version (rounds completed) the peer holds.
    pub version: u64,
    /// Samples trained on since the peer joined.
    pub samples: u64,
    /// Recent training throughput.
    pub samples_per_s: f32,
    /// Last round's local training loss (0 before the first).
    pub loss: f32,
    /// Held-out accuracy of its model, when the peer evaluates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f32>,
    /// Bytes sent to neighbours.
    pub bytes_up: u64,
    /// Bytes received from neighbours.
    pub bytes_down: u64,
    /// Neighbours' updates it aggregated.
    pub used: u64,
    /// Updates it rejected, by reason.
    #[serde(default)]
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Whether its visitor (or the task) paused it.
    pub paused: bool,
    /// What it trains on (`webgpu`, `cpu`, an adapter name).
    pub backend: String,
}

/// The largest count a report may carry (samples, bytes, updates): about 10^15, more
/// than any peer reaches, and exact in a JavaScript number.
pub const MAX_REPORT_COUNT: u64 = 1 << 50;
/// The highest training throughput a report may claim, in samples per second.
pub const MAX_REPORT_RATE: f32 = 1e7;

impl PeerReport {
    /// Checks every field against what a real peer can report; the error names the
    /// field. Reports are claims: these bounds keep one liar's numbers finite and its
    /// reason names among the known ones, and the dashboard's medians do the rest.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |x: f32| x.is_finite() && x >= 0.0;
        if !finite(self.samples_per_s) || self.samples_per_s > MAX_REPORT_RATE {
            return Err(format!(
                "samples_per_s: must be finite, 0..={MAX_REPORT_RATE}"
            ));
        }
        if !finite(self.loss) || self.loss >= 1e6 {
            return Err("loss: must be finite, at least 0 and below 1e6".into());
        }
        if self.accuracy.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
            return Err("accuracy: must be within 0..=1".into());
        }
        if self.version >= crate::learn::wire::MAX_ROUND {
            return Err(format!(
                "version: must be below {}",
                crate::learn::wire::MAX_ROUND
            ));
        }
        for (name, v) in [
            ("samples", self.samples),
            ("bytes_up", self.bytes_up),
            ("bytes_down", self.bytes_down),
            ("used", self.used),
        ] {
            if v > MAX_REPORT_COUNT {
                return Err(format!("{name}: at most {MAX_REPORT_COUNT}"));
            }
        }
        if let Some((k, _)) = self.rejected.iter().find(|(k, v)| {
            crate::learn::Rejection::from_name(k).is_none() || **v > MAX_REPORT_COUNT
        }) {
            let known: Vec<&str> = crate::learn::Rejection::ALL
                .iter()
                .map(|r| r.as_str())
                .collect();
            return Err(format!(
                "rejected: {k:.32?} is not a reason name ({}) or its count is above {MAX_REPORT_COUNT}",
                known.join(", ")
            ));
        }
        if self.backend.len() > 64 || self.backend.chars().any(char::is_control) {
            return Err("backend: at most 64 printable characters".into());
        }
        Ok(())
    }
}

/// Messages a peer sends to the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Relay `signal` to neighbour `to`.
    Signal {
        /// The neighbour.
        to: PeerId,
        /// What to tell it.
        signal: Signal,
    },
    /// A WebRTC connection to this neighbour could not be opened: unlink the pair and
    /// give both sides other neighbours.
    Unreachable {
        /// The neighbour.
        peer: PeerId,
    },
    /// The peer's numbers for the dashboard (replaces its previous report).
    Report {
        /// The numbers.
        report: PeerReport,
    },
    /// Proves the key this connection signs with (see [`identify_message`]).
    Identify {
        /// The ed25519 public key, 64 hex digits.
        key: String,
        /// Its signature of [`identify_message`], 128 hex digits.
        signature: String,
    },
    /// A receipt this peer signed for a neighbour's update it used (hex of its bytes,
    /// see [`crate::trust::receipt`]).
    Receipt {
        /// The receipt.
        receipt: String,
    },
}

/// What `identify` signs: `"shoal-identify-v1"`, the task name's length (`u32`), the
/// task name, the peer id (`u64`) and the welcome's 32 nonce bytes; integers
/// little-endian.
pub fn identify_message(task: &str, peer: PeerId, nonce: &[u8; 32]) -> Vec<u8> {
    let mut m = b"shoal-identify-v1".to_vec();
    m.extend_from_slice(&(task.len() as u32).to_le_bytes());
    m.extend_from_slice(task.as_bytes());
    m.extend_from_slice(&peer.0.to_le_bytes());
    m.extend_from_slice(nonce);
    m
}

/// Bytes from lower-case (or upper-case) hex; `None` for anything else.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    // Digits only: `from_str_radix` alone would take a sign (`"+f"`).
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// Messages the server sends to a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMessage {
    /// First message on every connection.
    Welcome {
        /// Protocol version.
        version: u32,
        /// This peer's id.
        peer: PeerId,
        /// The task joined.
        task: String,
        /// ICE servers to configure `RTCPeerConnection` with.
        ice_servers: Vec<IceServer>,
        /// Largest message the server accepts, in bytes.
        max_message_bytes: usize,
        /// 32 random bytes (64 hex digits) for `identify` to sign; empty from a server
        /// without receipts.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        nonce: String,
    },
    /// The peer's current neighbour set (replaces the previous one). The peer with the
    /// smaller id makes the WebRTC offer.
    Neighbours {
        /// Current neighbours.
        peers: Vec<PeerId>,
    },
    /// A peer joined the task (sent to its new neighbours).
    Joined {
        /// Who.
        peer: PeerId,
    },
    /// A neighbour left the task.
    Left {
        /// Who.
        peer: PeerId,
    },
    /// A relayed signal from a neighbour.
    Signal {
        /// The sender.
        from: PeerId,
        /// What it said.
        signal: Signal,
    },
    /// Whether the researcher paused the task (sent after `welcome` while the task is
    /// paused, and to every peer on each change):
    /// a paused task's peers stop training and keep their connections.
    TaskState {
        /// Paused or running.
        paused: bool,
    },
    /// The last message was refused (and, for some codes, the connection will close).
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Why the server refused a message or a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON, or not a valid message.
    Malformed,
    /// A `type` this server does not know.
    UnknownType,
    /// The addressee is not (or no longer) a neighbour of the sender.
    NotNeighbour,
    /// Larger than `max_message_bytes`; the connection closes.
    TooLarge,
    /// Sending faster than the rate limit; repeated, the connection closes.
    RateLimited,
    /// The task has its maximum number of peers.
    TaskFull,
    /// The server has its maximum number of connections.
    ServerFull,
    /// The task has its maximum number of peers from the sender's network address.
    AddressFull,
    /// No such task.
    UnknownTask,
    /// The client asked for a protocol version the server does not speak.
    BadVersion,
    /// Binary frames are not part of the protocol.
    Binary,
    /// The page's origin is not on the server's allowlist (answered with HTTP 403 before
    /// the websocket opens; listed here for the metrics).
    ForbiddenOrigin,
    /// An `identify` that does not prove its key, repeats, or names a key another
    /// connection of the task holds.
    BadIdentity,
    /// A `receipt` the server refused (the message names the reason).
    BadReceipt,
    /// The connection named a `revision` of the task other than the one the server runs
    /// (the task or its data changed since the client loaded it); the connection closes.
    TaskChanged,
}

impl ErrorCode {
    /// The code as it appears on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownType => "unknown_type",
            Self::NotNeighbour => "not_neighbour",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::TaskFull => "task_full",
            Self::ServerFull => "server_full",
            Self::AddressFull => "address_full",
            Self::UnknownTask => "unknown_task",
            Self::BadVersion => "bad_version",
            Self::Binary => "binary",
            Self::ForbiddenOrigin => "forbidden_origin",
            Self::BadIdentity => "bad_identity",
            Self::BadReceipt => "bad_receipt",
            Self::TaskChanged => "task_changed",
        }
    }

    /// Every code, for metrics.
    pub const ALL: [ErrorCode; 15] = [
        Self::Malformed,
        Self::UnknownType,
        Self::NotNeighbour,
        Self::TooLarge,
        Self::RateLimited,
        Self::TaskFull,
        Self::ServerFull,
        Self::AddressFull,
        Self::UnknownTask,
        Self::BadVersion,
        Self::Binary,
        Self::ForbiddenOrigin,
        Self::BadIdentity,
        Self::BadReceipt,
        Self::TaskChanged,
    ];
}

/// A `signal` message read without building it: the addressee, and the signal's JSON
/// text exactly as the sender wrote it, already checked to be a valid [`Signal`]. The
/// server forwards that text unchanged, so it never copies or re-escapes a description.
#[derive(Debug, PartialEq, Eq)]
pub struct SignalRef<'a> {
    /// The addressee.
    pub to: PeerId,
    /// The signal, as JSON text.
    pub signal: &'a str,
}

/// The fast path for the message the server relays most: `Some` only for a `signal`
/// message that [`decode_client`] would accept (anything else, valid or not, is `None`
/// and goes through `decode_client`, which names the problem).
pub fn decode_signal(text: &str) -> Option<SignalRef<'_>> {
    use serde_json::value::RawValue;
    use std::borrow::Cow;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Envelope<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        to: PeerId,
        #[serde(borrow)]
        signal: &'a RawValue,
    }
    // Each field is checked as it is parsed (the payload is scanned once here, after the
    // envelope's scan); a present field is `Some`, `null` included, so that "absent"
    // and "null" stay apart as they do for `Signal`.
    fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: serde::Deserializer<'de>,
        T: Deserialize<'de>,
    {
        T::deserialize(d).map(Some)
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Fields<'a> {
        #[serde(borrow)]
        kind: Cow<'a, str>,
        // `sdp` and `candidate` must be strings when present: `null` fails the parse.
        #[serde(borrow, default, deserialize_with = "present")]
        sdp: Option<Cow<'a, str>>,
        #[serde(borrow, default, deserialize_with = "present")]
        candidate: Option<Cow<'a, str>>,
        #[serde(borrow, default, deserialize_with = "present")]
        sdp_mid: Option<Option<Cow<'a, str>>>,
        #[serde(default, deserialize_with = "present")]
        sdp_m_line_index: Option<Option<u16>>,
    }
    if has_array(text) {
        return None;
    }
    let e: Envelope<'_> = serde_json::from_str(text).ok()?;
    if e.kind != "signal" {
        return None;
    }
    let f: Fields<'_> = serde_json::from_str(e.signal.get()).ok()?;
    let ok = match &*f.kind {
        "offer" | "answer" => {
            f.sdp.is_some()
                && f.candidate.is_none()
                && f.sdp_mid.is_none()
                && f.sdp_m_line_index.is_none()
        }
        "candidate" => f.candidate.is_some() && f.sdp.is_none(),
        _ => false,
    };
    ok.then_some(SignalRef {
        to: e.to,
        signal: e.signal.get(),
    })
}

/// Whether the JSON `text` holds an array anywhere (outside strings). No client message
/// has one, and serde's derived structs would take an array of their fields in order
/// where the protocol says object.
fn has_array(text: &str) -> bool {
    let (mut in_string, mut escaped) = (false, false);
    for b in text.bytes() {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (false, _, b'"') => in_string = true,
            (false, _, b'[') => return true,
            _ => {}
        }
    }
    false
}

/// Decodes a client message, telling an unknown `type` apart from other malformations.
pub fn decode_client(text: &str) -> Result<ClientMessage, (ErrorCode, String)> {
    if has_array(text) {
        return Err((
            ErrorCode::Malformed,
            "an array where the protocol has objects and strings only".into(),
        ));
    }
    match serde_json::from_str::<ClientMessage>(text) {
        Ok(m) => Ok(m),
        Err(e) => {
            let known = ["signal", "unreachable", "report", "identify", "receipt"];
            let kind = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
            match kind {
                Some(t) if !known.contains(&t.as_str()) => Err((
                    ErrorCode::UnknownType,
                    format!("unknown message type {t:?}"),
                )),
                _ => Err((ErrorCode::Malformed, e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages are JSON objects: the fields of a report, a signal or a whole message
    /// given as an array, in order (which serde's derived structs take), are refused.
    #[test]
    fn arrays_in_place_of_objects_are_refused() {
        let report =
            r#"{"type":"report","report":["trainer",7,100,10.0,1.0,null,0,0,0,{},false,"cpu"]}"#;
        assert_eq!(
            decode_client(report).map_err(|e| e.0),
            Err(ErrorCode::Malformed)
        );
        let whole = r#"["unreachable","0000000000000001"]"#;
        assert_eq!(
            decode_client(whole).map_err(|e| e.0),
            Err(ErrorCode::Malformed)
        );
        let signal = r#"{"type":"signal","to":"0000000000000001","signal":["offer","v=0"]}"#;
        assert!(decode_signal(signal).is_none());
        assert_eq!(
            decode_client(signal).map_err(|e| e.0),
            Err(ErrorCode::Malformed)
        );
        // A bracket inside a string is text, as in an SDP or a backend's name.
        let fine = r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":"a=[x] \"[\" ["}}"#;
        assert!(decode_signal(fine).is_some());
        assert!(decode_client(fine).is_ok());
    }

    #[test]
    fn messages_have_the_documented_wire_form() {
        let m = ClientMessage::Signal {
            to: PeerId(0xab),
            signal: Signal::Offer { sdp: "v=0".into() },
        };
        assert_eq!(
            serde_json::to_string(&m).expect("serializes"),
            r#"{"type":"signal","to":"00000000000000ab","signal":{"kind":"offer","sdp":"v=0"}}"#
        );
        let w = ServerMessage::Neighbours {
            peers: vec![PeerId(1)],
        };
        assert_eq!(
            serde_json::to_string(&w).expect("serializes"),
            r#"{"type":"neighbours","peers":["0000000000000001"]}"#
        );
        let e = ServerMessage::Error {
            code: ErrorCode::NotNeighbour,
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).expect("serializes"),
            r#"{"type":"error","code":"not_neighbour","message":"x"}"#
        );
    }

    #[test]
    fn decoding_tells_unknown_types_from_garbage() {
        assert!(matches!(
            decode_client("{nope"),
            Err((ErrorCode::Malformed, _))
        ));
        assert!(matches!(
            decode_client(r#"{"type":"dance"}"#),
            Err((ErrorCode::UnknownType, _))
        ));
        // Every type the server knows, with a field missing, is malformed.
        for t in ["signal", "unreachable", "report", "identify", "receipt"] {
            assert!(
                matches!(
                    decode_client(&format!(r#"{{"type":"{t}"}}"#)),
                    Err((ErrorCode::Malformed, _))
                ),
                "{t}"
            );
        }
        assert!(matches!(
            decode_client(r#"{"type":"signal","to":"XYZ","signal":{"kind":"offer","sdp":""}}"#),
            Err((ErrorCode::Malformed, _))
        ));
        assert!(matches!(
            decode_client(
                r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":"s"},"extra":1}"#
            ),
            Err((ErrorCode::Malformed, _))
        ));
        assert!(matches!(
            decode_client(r#"{"type":"unreachable","peer":"00000000000000ff"}"#),
            Ok(ClientMessage::Unreachable { peer: PeerId(255) })
        ));
        let ok = decode_client(
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c","sdp_mid":"0","sdp_m_line_index":0}}"#,
        );
        assert!(matches!(
            ok,
            Ok(ClientMessage::Signal { to: PeerId(1), .. })
        ));
    }

    #[test]
    fn the_signal_fast_path_accepts_exactly_what_the_full_decoder_accepts() {
        let cases = [
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":"v=0\r\no=- 1"}}"#,
            r#"{"signal":{"sdp":"a","kind":"answer"},"to":"0000000000000002","type":"signal"}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c","sdp_mid":"0","sdp_m_line_index":0}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c","sdp_mid":null}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c"}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":"s","sdp_mid":null}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":null}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":null}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c","sdp_mid":5}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c","sdp_m_line_index":null}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c","sdp_m_line_index":-1}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":"bad \u12 escape"}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"answer","sdp":"s","sdp_m_line_index":null}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer"}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c","sdp_m_line_index":70000}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"candidate","candidate":"c","sdp":"x"}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"dance","sdp":"x"}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":"x","extra":1}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":"x"},"extra":1}"#,
            r#"{"type":"signal","to":"XYZ","signal":{"kind":"offer","sdp":"x"}}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":"offer"}"#,
            r#"{"type":"unreachable","peer":"0000000000000001"}"#,
            r#"{"type":"signal","to":"0000000000000001","signal":{"kind":"offer","sdp":"x"}"#,
        ];
        let mut fast = 0;
        for text in cases {
            match (decode_signal(text), decode_client(text)) {
                (Some(r), Ok(ClientMessage::Signal { to, signal })) => {
                    fast += 1;
                    assert_eq!(r.to, to, "{text}");
                    let again: Signal = serde_json::from_str(r.signal).expect("valid signal");
                    assert_eq!(again, signal, "{text}");
                }
                (Some(_), other) => panic!("fast path took {text}, the decoder says {other:?}"),
                (None, Ok(ClientMessage::Signal { .. })) => {
                    panic!("the fast path refused a valid signal: {text}")
                }
                (None, _) => {}
            }
        }
        assert_eq!(fast, 6, "the valid signals above");
    }

    #[test]
    fn reports_are_validated_field_by_field() {
        let ok = r#"{"type":"report","report":{"role":"trainer","version":3,"samples":480,"samples_per_s":120.5,"loss":0.4,"accuracy":0.91,"bytes_up":10,"bytes_down":20,"used":4,"rejected":{"norm":1},"paused":false,"backend":"webgpu"}}"#;
        let Ok(ClientMessage::Report { report }) = decode_client(ok) else {
            panic!("a valid report decodes");
        };
        assert_eq!(report.validate(), Ok(()));
        for (field, bad) in [
            (
                "accuracy",
                PeerReport {
                    accuracy: Some(1.5),
                    ..report.clone()
                },
            ),
            (
                "loss",
                PeerReport {
                    loss: f32::NAN,
                    ..report.clone()
                },
            ),
            // The bound is exclusive, as the docs say ("below 10^6").
            (
                "loss",
                PeerReport {
                    loss: 1e6,
                    ..report.clone()
                },
            ),
            (
                "samples_per_s",
                PeerReport {
                    samples_per_s: -1.0,
                    ..report.clone()
                },
            ),
            (
                "backend",
                PeerReport {
                    backend: "x".repeat(65),
                    ..report.clone()
                },
            ),
            (
                "rejected",
                PeerReport {
                    rejected: [("Bad Key!".to_string(), 1)].into(),
                    ..report.clone()
                },
            ),
            // A name the dashboard would look up on an object's prototype.
            (
                "rejected",
                PeerReport {
                    rejected: [("constructor".to_string(), 5)].into(),
                    ..report.clone()
                },
            ),
            (
                "rejected",
                PeerReport {
                    rejected: [("norm".to_string(), u64::MAX)].into(),
                    ..report.clone()
                },
            ),
            // The round that moved the dashboard's median to 1.8e19.
            (
                "version",
                PeerReport {
                    version: u64::MAX,
                    ..report.clone()
                },
            ),
            (
                "samples_per_s",
                PeerReport {
                    samples_per_s: 6e9,
                    ..report.clone()
                },
            ),
            (
                "samples",
                PeerReport {
                    samples: u64::MAX,
                    ..report.clone()
                },
            ),
            (
                "bytes_down",
                PeerReport {
                    bytes_down: 1 << 60,
                    ..report.clone()
                },
            ),
        ] {
            let e = bad.validate().expect_err(field);
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn error_codes_round_trip_through_their_wire_names() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).expect("serializes");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}

//! The messages peers send each other over a data channel (after framing), in a small
//! versioned binary layout. Every field is checked on decode; the signature check and
//! everything that needs the receiver's state happen in [`Learner`](super::Learner).
//!
//! ```text
//! message  = "SHL" version:u8(1) kind:u8 body
//! kind 1   update:   key[32] round:u64 samples:u32 loss:f32 len:u32 payload[len] sig[64]
//! kind 2   request:  (empty)                    — "send me the current model"
//! kind 3   model:    round:u64 n:u32 weights:f32[n] momentum:f32[n] sha256[32]
//! kind 4   mix:      round:u64 payload          — int8 weights for gossip averaging
//! kind 5   status:   flags:u8 (bit 0: contributing; other bits 0)
//! kind 6   receipt:  receipt (see `trust::receipt`) — for an update of the recipient's
//! kind 7   head:     signed ledger head (see `trust::head`) — the newest the sender holds
//! kind 8   observe:  base[32]                   — "send me your weights, as a change
//!                                                 from these" (zero: I hold none of yours)
//! kind 9   observed: round:u64 base[32] payload result[32]
//!                    — weights: `payload` (fp32) when `base` is zero, else the base the
//!                      asker holds plus `payload` (int8); `result` is their SHA-256
//! kind 10  model (int8): round:u64 n:u32 len:u32 weights[len] momentum sha256[32]
//!                    — kind 3 with both vectors in block-wise int8 (`KEYFRAME_CODEC`):
//!                      how peers answer a model request
//! ```
//! The update's signature covers `"shoal-update-v2" task_len:u32 task` followed by the
//! SHA-256 of the message up to the signature, so an update cannot be replayed into
//! another task.

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::KEYFRAME_CODEC;
use super::bytes::Cursor;
use super::compress::{self, CodecError};
use super::identity::{Identity, PublicKey};

const MAGIC: [u8; 3] = *b"SHL";

/// Rounds at or above this (2^40: a round a second for 35,000 years) are implausible
/// claims: a message carrying one is refused once it has decoded (one with another
/// defect is refused for that).
pub const MAX_ROUND: u64 = 1 << 40;
const VERSION: u8 = 1;

/// Why a peer message could not be decoded.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum WireError {
    /// Not a Shoal peer message, or another version.
    #[error("not a Shoal v1 peer message")]
    Magic,
    /// A kind this version does not know.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Shorter or longer than its fields say.
    #[error("message is {0}")]
    Malformed(&'static str),
    /// A model for another number of parameters.
    #[error("a model of {got} parameters, this task's has {want}")]
    WrongSize {
        /// Declared parameter count.
        got: usize,
        /// The receiver's model size.
        want: usize,
    },
    /// The model's checksum does not match its contents.
    #[error("model checksum mismatch")]
    Checksum,
    /// The model holds a NaN or an infinity.
    #[error("model holds a non-finite value")]
    NonFinite,
    /// A round number at or above [`MAX_ROUND`].
    #[error("round {0} is implausible")]
    Round(u64),
}

/// A signed pseudo-gradient for one round.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// The signer.
    pub key: PublicKey,
    /// The sender's round (model version) this update belongs to.
    pub round: u64,
    /// Samples the sender trained on this round.
    pub samples: u32,
    /// The sender's mean local training loss this round.
    pub loss: f32,
    /// The compressed pseudo-gradient (see `compress`).
    pub payload: Vec<u8>,
    /// ed25519 signature.
    pub signature: [u8; 64],
}

/// A model, as a joining or lagging peer downloads it from a neighbour.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Rounds completed: the model version.
    pub round: u64,
    /// The weights at the start of that round.
    pub weights: Vec<f32>,
    /// The outer optimizer's momentum.
    pub momentum: Vec<f32>,
}

/// One message between peers.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerMessage {
    /// A round's update.
    Update(Update),
    /// A request for the current model.
    ModelRequest,
    /// The current model, exactly (fp32): what a keeper saves.
    Model(Snapshot),
    /// The current model, weights and momentum in [`KEYFRAME_CODEC`] (int8, a quarter of
    /// fp32's bytes): how a peer answers a model request. Decoded,
    /// it holds the values the int8 payloads stand for.
    ModelInt8(Snapshot),
    /// The sender's round-start weights for `round`, int8-compressed (see `compress`),
    /// offered for gossip averaging.
    Mix {
        /// The sender's round.
        round: u64,
        /// An int8 payload of the weights.
        payload: Vec<u8>,
    },
    /// Whether the sender contributes updates: an observer (a dashboard) or a paused
    /// peer says `false`, so its neighbours do not wait for its updates; `true` again on
    /// resume.
    Status {
        /// Sends updates.
        contributing: bool,
    },
    /// A receipt a neighbour signed for one of our updates it used (its bytes; the
    /// receiver of this message decodes and verifies them).
    Receipt(Vec<u8>),
    /// The newest ledger head the sender holds, as the server signed it (its bytes; the
    /// receiver decodes and verifies them).
    Head(Vec<u8>),
    /// An observer's request for the current weights (no momentum), as a change from the
    /// weights it holds from the recipient, named by their SHA-256 ([`weights_hash`]);
    /// all zeros when it holds none.
    Observe {
        /// The hash of the weights the asker holds from the recipient, or zeros.
        base: [u8; 32],
    },
    /// The answer to [`Observe`](Self::Observe).
    Observed(Observed),
}

/// The weights an observer asked for: whole, or as a change from weights it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// The sender's model version.
    pub round: u64,
    /// [`weights_hash`] of the weights the change applies to; zeros for whole weights.
    pub base: [u8; 32],
    /// Whole weights in fp32 (codec 0) when `base` is zeros, else the change from the
    /// base in block-wise int8 (codec 1); see `compress`.
    pub payload: Vec<u8>,
    /// [`weights_hash`] of the weights the receiver ends up with.
    pub result: [u8; 32],
}

/// SHA-256 of weights as their little-endian f32 bytes: how an observer and the peer it
/// asks name one set of weights.
pub fn weights_hash(w: &[f32]) -> [u8; 32] {
    let mut h = Sha256::new();
    for x in w {
        h.update(x.to_le_bytes());
    }
    h.finalize().into()
}

/// The body of `bytes` (past its 5-byte header) when it is a message of kind `kind`,
/// nothing else checked: for a field read before the message is decoded.
pub(crate) fn body_of(bytes: &[u8], kind: u8) -> Option<&[u8]> {
    let ours = bytes.len() >= 5 && bytes[..3] == MAGIC && bytes[3] == VERSION;
    (ours && bytes[4] == kind).then(|| &bytes[5..])
}

fn header(kind: u8) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.push(VERSION);
    v.push(kind);
    v
}

/// The bytes an update's signature covers: the context and the task, then the SHA-256
/// of the message up to the signature ([`Update::digest`]). One hash of an update's
/// bytes, by SHA-256, for its signer and for each receiver: ed25519 over the whole
/// message hashed it with SHA-512, twice to sign and once to verify (in the simulator
/// those passes took a third of a swarm's time where updates are whole fp32 weights).
fn signed_bytes(task: &str, digest: &[u8; 32]) -> Vec<u8> {
    let mut m = b"shoal-update-v2".to_vec();
    m.extend_from_slice(&(task.len() as u32).to_le_bytes());
    m.extend_from_slice(task.as_bytes());
    m.extend_from_slice(digest);
    m
}

impl Update {
    /// Builds and signs an update for `task`.
    pub fn signed(
        id: &Identity,
        task: &str,
        round: u64,
        samples: u32,
        loss: f32,
        payload: Vec<u8>,
    ) -> Self {
        let mut u = Self {
            key: id.public(),
            round,
            samples,
            loss,
            payload,
            signature: [0; 64],
        };
        u.signature = id.sign(&signed_bytes(task, &u.digest()));
        u
    }

    /// The SHA-256 of the message from `"SHL"` up to the signature, hashed in place
    /// (the payload is not copied).
    fn digest(&self) -> [u8; 32] {
        self.hasher().finalize().into()
    }

    /// A SHA-256 that has taken the message from `"SHL"` up to the signature.
    fn hasher(&self) -> Sha256 {
        let mut h = Sha256::new();
        h.update(header(1));
        h.update(self.key);
        h.update(self.round.to_le_bytes());
        h.update(self.samples.to_le_bytes());
        h.update(self.loss.to_le_bytes());
        h.update((self.payload.len() as u32).to_le_bytes());
        h.update(&self.payload);
        h
    }

    fn unsigned_bytes(&self) -> Vec<u8> {
        let mut v = header(1);
        v.extend_from_slice(&self.key);
        v.extend_from_slice(&self.round.to_le_bytes());
        v.extend_from_slice(&self.samples.to_le_bytes());
        v.extend_from_slice(&self.loss.to_le_bytes());
        v.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.payload);
        v
    }

    /// Whether the signature is the key's, for this task.
    pub fn verify(&self, task: &str) -> bool {
        self.verified_hash(task).is_some()
    }

    /// The SHA-256 of the whole message, signature included (what a receipt names), if
    /// the signature is the key's for this task. One pass over the payload serves both:
    /// the signed digest is of the same bytes up to the signature (a receiver hashed
    /// each update twice, a sixth of the simulator's time with whole fp32 updates).
    pub fn verified_hash(&self, task: &str) -> Option<[u8; 32]> {
        let mut h = self.hasher();
        let digest: [u8; 32] = h.clone().finalize().into();
        if !super::identity::verify(&self.key, &signed_bytes(task, &digest), &self.signature) {
            return None;
        }
        h.update(self.signature);
        Some(h.finalize().into())
    }
}

impl PeerMessage {
    /// The wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Update(u) => {
                let mut v = u.unsigned_bytes();
                v.extend_from_slice(&u.signature);
                v
            }
            Self::ModelRequest => header(2),
            Self::Model(s) => {
                let mut v = header(3);
                v.extend_from_slice(&s.round.to_le_bytes());
                v.extend_from_slice(&(s.weights.len() as u32).to_le_bytes());
                for x in s.weights.iter().chain(&s.momentum) {
                    v.extend_from_slice(&x.to_le_bytes());
                }
                let digest = Sha256::digest(&v[5..]);
                v.extend_from_slice(&digest);
                v
            }
            Self::ModelInt8(s) => {
                let mut v = header(10);
                v.extend_from_slice(&s.round.to_le_bytes());
                v.extend_from_slice(&(s.weights.len() as u32).to_le_bytes());
                let weights = compress::encode_once(KEYFRAME_CODEC, &s.weights);
                let momentum = compress::encode_once(KEYFRAME_CODEC, &s.momentum);
                v.extend_from_slice(&(weights.len() as u32).to_le_bytes());
                v.extend_from_slice(&weights);
                v.extend_from_slice(&momentum);
                let digest = Sha256::digest(&v[5..]);
                v.extend_from_slice(&digest);
                v
            }
            Self::Mix { round, payload } => {
                let mut v = header(4);
                v.extend_from_slice(&round.to_le_bytes());
                v.extend_from_slice(payload);
                v
            }
            Self::Status { contributing } => {
                let mut v = header(5);
                v.push(u8::from(*contributing));
                v
            }
            Self::Receipt(r) => {
                let mut v = header(6);
                v.extend_from_slice(r);
                v
            }
            Self::Head(h) => {
                let mut v = header(7);
                v.extend_from_slice(h);
                v
            }
            Self::Observe { base } => {
                let mut v = header(8);
                v.extend_from_slice(base);
                v
            }
            Self::Observed(o) => {
                let mut v = header(9);
                v.extend_from_slice(&o.round.to_le_bytes());
                v.extend_from_slice(&o.base);
                v.extend_from_slice(&o.payload);
                v.extend_from_slice(&o.result);
                v
            }
        }
    }

    /// Decodes a message for a model of `params` parameters.
    pub fn decode(bytes: &[u8], params: usize) -> Result<Self, WireError> {
        if bytes.len() < 5 || bytes[..3] != MAGIC || bytes[3] != VERSION {
            return Err(WireError::Magic);
        }
        let mut r = Cursor::new(&bytes[5..], WireError::Malformed("truncated"));
        let msg = match bytes[4] {
            1 => {
                let key: PublicKey = r.array()?;
                let round = r.u64()?;
                let samples = r.u32()?;
                let loss = f32::from_le_bytes(r.array()?);
                let len = r.u32()? as usize;
                let payload = r.take(len)?.to_vec();
                let signature: [u8; 64] = r.array()?;
                Self::Update(Update {
                    key,
                    round,
                    samples,
                    loss,
                    payload,
                    signature,
                })
            }
            2 => Self::ModelRequest,
            3 => {
                let (round, n) = model_head(&mut r, bytes, params)?;
                let floats = |r: &mut Cursor<'_, WireError>| -> Result<Vec<f32>, WireError> {
                    let v = r.f32s(n)?;
                    if v.iter().all(|x| x.is_finite()) {
                        Ok(v)
                    } else {
                        Err(WireError::NonFinite)
                    }
                };
                let weights = floats(&mut r)?;
                let momentum = floats(&mut r)?;
                r.take(32)?;
                Self::Model(Snapshot {
                    round,
                    weights,
                    momentum,
                })
            }
            10 => {
                let (round, n) = model_head(&mut r, bytes, params)?;
                let len = r.u32()? as usize;
                let weights = int8_vector(r.take(len)?, n)?;
                let rest = r.rest();
                let momentum = int8_vector(&rest[..rest.len().saturating_sub(32)], n)?;
                Self::ModelInt8(Snapshot {
                    round,
                    weights,
                    momentum,
                })
            }
            4 => {
                let round = r.u64()?;
                let payload = r.rest().to_vec();
                Self::Mix { round, payload }
            }
            5 => match r.array::<1>()?[0] {
                f @ (0 | 1) => Self::Status {
                    contributing: f == 1,
                },
                _ => return Err(WireError::Malformed("status flags unknown")),
            },
            6 => {
                let r = r.rest();
                if r.len() > crate::trust::receipt::MAX_RECEIPT_BYTES {
                    return Err(WireError::Malformed("a receipt longer than any"));
                }
                Self::Receipt(r.to_vec())
            }
            7 => {
                let h = r.rest();
                if h.len() > crate::trust::head::MAX_HEAD_BYTES {
                    return Err(WireError::Malformed("a ledger head longer than any"));
                }
                Self::Head(h.to_vec())
            }
            8 => Self::Observe { base: r.array()? },
            9 => {
                let round = r.u64()?;
                let base: [u8; 32] = r.array()?;
                let rest = r.rest();
                let Some(cut) = rest.len().checked_sub(32) else {
                    return Err(WireError::Malformed("truncated"));
                };
                let (payload, result) = rest.split_at(cut);
                // Whole weights in fp32, a change in int8: nothing else is accepted.
                let tag = if base == [0; 32] { 0 } else { 1 };
                if payload.first() != Some(&tag) {
                    return Err(WireError::Malformed("observed model in another codec"));
                }
                Self::Observed(Observed {
                    round,
                    base,
                    payload: payload.to_vec(),
                    result: result
                        .try_into()
                        .map_err(|_| WireError::Malformed("truncated"))?,
                })
            }
            k => return Err(WireError::Kind(k)),
        };
        if !r.is_empty() {
            return Err(WireError::Malformed("longer than its fields"));
        }
        let round = match &msg {
            Self::Update(u) => u.round,
            Self::Model(s) | Self::ModelInt8(s) => s.round,
            Self::Mix { round, .. } => *round,
            Self::Observed(o) => o.round,
            Self::ModelRequest
            | Self::Status { .. }
            | Self::Receipt(_)
            | Self::Head(_)
            | Self::Observe { .. } => 0,
        };
        if round >= MAX_ROUND {
            return Err(WireError::Round(round));
        }
        Ok(msg)
    }
}

/// A model's (kind 3 or 10) round and parameter count, read from `r`, once the count is
/// this task's and the digest at the end of `bytes` matches.
fn model_head(
    r: &mut Cursor<'_, WireError>,
    bytes: &[u8],
    params: usize,
) -> Result<(u64, usize), WireError> {
    let round = r.u64()?;
    let n = r.u32()? as usize;
    if n != params {
        return Err(WireError::WrongSize {
            got: n,
            want: params,
        });
    }
    let body_end = bytes
        .len()
        .checked_sub(32)
        .ok_or(WireError::Malformed("truncated"))?;
    if body_end < 5 || Sha256::digest(&bytes[5..body_end])[..] != bytes[body_end..] {
        return Err(WireError::Checksum);
    }
    Ok((round, n))
}

/// One vector of a kind 10 model: a payload in [`KEYFRAME_CODEC`]'s codec (int8) only.
fn int8_vector(payload: &[u8], n: usize) -> Result<Vec<f32>, WireError> {
    if payload.first() != Some(&KEYFRAME_CODEC.tag()) {
        return Err(WireError::Malformed("model in another codec"));
    }
    compress::decode(payload, n).map_err(|e| match e {
        CodecError::NonFinite => WireError::NonFinite,
        CodecError::WrongLength { got, want } => WireError::WrongSize { got, want },
        CodecError::UnknownCodec(_) | CodecError::Malformed(_) => {
            WireError::Malformed("model payload malformed")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_updates_signature_covers_the_task_and_the_sha256_of_the_message_as_documented() {
        // Rebuilt from docs/protocol.md ("Updates"), from the wire bytes alone.
        let id = Identity::from_seed([5; 32]);
        let wire =
            PeerMessage::Update(Update::signed(&id, "digits", 7, 64, 0.5, vec![0, 9, 9])).encode();
        let (body, sig) = wire.split_at(wire.len() - 64);
        let mut covered = b"shoal-update-v2".to_vec();
        covered.extend_from_slice(&6u32.to_le_bytes());
        covered.extend_from_slice(b"digits");
        covered.extend_from_slice(&Sha256::digest(body));
        let sig: [u8; 64] = sig.try_into().expect("64 bytes");
        assert!(super::super::identity::verify(&id.public(), &covered, &sig));
        // The whole message in place of its digest (the first version's rule) fails.
        let mut whole = covered[..covered.len() - 32].to_vec();
        whole.extend_from_slice(body);
        assert!(!super::super::identity::verify(&id.public(), &whole, &sig));
    }

    #[test]
    fn messages_round_trip_and_updates_are_bound_to_their_task() {
        let id = Identity::from_seed([3; 32]);
        let u = Update::signed(&id, "digits", 12, 640, 0.25, vec![1, 2, 3]);
        assert!(u.verify("digits"));
        assert!(
            !u.verify("cifar"),
            "a signature does not carry over to another task"
        );
        let msg = PeerMessage::Update(u.clone());
        let wire = msg.encode();
        assert_eq!(PeerMessage::decode(&wire, 4), Ok(msg));
        // What a receipt names: the SHA-256 of the wire bytes, signature included.
        assert_eq!(
            u.verified_hash("digits"),
            Some(Sha256::digest(&wire).into())
        );
        assert_eq!(u.verified_hash("cifar"), None);
        let mut tampered = u;
        tampered.round = 13;
        assert!(!tampered.verify("digits"));
        assert_eq!(tampered.verified_hash("digits"), None);
        let snap = PeerMessage::Model(Snapshot {
            round: 5,
            weights: vec![0.5, -1.0],
            momentum: vec![0.0, 0.1],
        });
        assert_eq!(PeerMessage::decode(&snap.encode(), 2), Ok(snap.clone()));
        assert_eq!(
            PeerMessage::decode(&PeerMessage::ModelRequest.encode(), 2),
            Ok(PeerMessage::ModelRequest)
        );
        for contributing in [false, true] {
            let m = PeerMessage::Status { contributing };
            assert_eq!(PeerMessage::decode(&m.encode(), 2), Ok(m));
        }
        let mut bad = PeerMessage::Status { contributing: true }.encode();
        bad[5] = 2;
        assert!(
            PeerMessage::decode(&bad, 2).is_err(),
            "unknown flags refused"
        );
    }

    #[test]
    fn implausible_rounds_are_refused_on_every_message_kind() {
        let id = Identity::from_seed([3; 32]);
        let snap = |round| {
            PeerMessage::Model(Snapshot {
                round,
                weights: vec![1.0; 2],
                momentum: vec![0.0; 2],
            })
        };
        let mix = |round| PeerMessage::Mix {
            round,
            payload: vec![0],
        };
        let update = |round| PeerMessage::Update(Update::signed(&id, "t", round, 1, 0.0, vec![0]));
        let int8 = |round| {
            PeerMessage::ModelInt8(Snapshot {
                round,
                weights: vec![1.0; 2],
                momentum: vec![0.0; 2],
            })
        };
        for make in [&snap as &dyn Fn(u64) -> PeerMessage, &int8, &mix, &update] {
            assert!(PeerMessage::decode(&make(MAX_ROUND - 1).encode(), 2).is_ok());
            assert_eq!(
                PeerMessage::decode(&make(MAX_ROUND).encode(), 2),
                Err(WireError::Round(MAX_ROUND))
            );
            assert_eq!(
                PeerMessage::decode(&make(u64::MAX).encode(), 2),
                Err(WireError::Round(u64::MAX))
            );
        }
    }

    #[test]
    fn damaged_messages_are_refused() {
        let id = Identity::from_seed([3; 32]);
        let bytes = PeerMessage::Update(Update::signed(&id, "t", 1, 1, 0.0, vec![7; 10])).encode();
        for cut in [0, 4, 5, 40, bytes.len() - 1] {
            assert!(
                PeerMessage::decode(&bytes[..cut], 2).is_err(),
                "cut at {cut}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(PeerMessage::decode(&long, 2).is_err());
        let mut kind = bytes.clone();
        kind[4] = 11;
        assert_eq!(PeerMessage::decode(&kind, 2), Err(WireError::Kind(11)));
        assert_eq!(
            PeerMessage::decode(b"GET / HTTP/1.1", 2),
            Err(WireError::Magic)
        );
        // A payload length that points past the end.
        let mut huge = bytes.clone();
        huge[5 + 32 + 16..5 + 32 + 20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(PeerMessage::decode(&huge, 2).is_err());

        let snap = PeerMessage::Model(Snapshot {
            round: 1,
            weights: vec![1.0; 3],
            momentum: vec![0.0; 3],
        })
        .encode();
        let mut flipped = snap.clone();
        flipped[20] ^= 1;
        assert_eq!(PeerMessage::decode(&flipped, 3), Err(WireError::Checksum));
        assert_eq!(
            PeerMessage::decode(&snap, 4),
            Err(WireError::WrongSize { got: 3, want: 4 })
        );
        let nan = PeerMessage::Model(Snapshot {
            round: 1,
            weights: vec![f32::NAN; 3],
            momentum: vec![0.0; 3],
        })
        .encode();
        assert_eq!(PeerMessage::decode(&nan, 3), Err(WireError::NonFinite));
    }

    #[test]
    fn observer_messages_round_trip_and_carry_only_their_codecs() {
        let ask = PeerMessage::Observe { base: [4; 32] };
        assert_eq!(PeerMessage::decode(&ask.encode(), 2), Ok(ask));
        let whole = |base: [u8; 32], tag: u8, round: u64| {
            PeerMessage::Observed(Observed {
                round,
                base,
                payload: vec![tag, 2, 0, 0, 0],
                result: [9; 32],
            })
        };
        for m in [whole([0; 32], 0, 3), whole([1; 32], 1, 3)] {
            assert_eq!(PeerMessage::decode(&m.encode(), 2), Ok(m));
        }
        // Whole weights in int8 or a change in fp32: refused.
        for m in [
            whole([0; 32], 1, 3),
            whole([1; 32], 0, 3),
            whole([1; 32], 2, 3),
        ] {
            assert!(PeerMessage::decode(&m.encode(), 2).is_err(), "{m:?}");
        }
        assert_eq!(
            PeerMessage::decode(&whole([0; 32], 0, MAX_ROUND).encode(), 2),
            Err(WireError::Round(MAX_ROUND))
        );
        let short = &whole([0; 32], 0, 3).encode()[..5 + 8 + 32 + 20];
        assert!(PeerMessage::decode(short, 2).is_err());
        let mut ask = PeerMessage::Observe { base: [4; 32] }.encode();
        ask.push(0);
        assert!(
            PeerMessage::decode(&ask, 2).is_err(),
            "longer than its fields"
        );
    }

    /// A kind 10 model of `n` parameters with the given payloads and a valid checksum.
    fn int8_model(n: u32, weights: &[u8], momentum: &[u8]) -> Vec<u8> {
        let mut v = header(10);
        v.extend_from_slice(&7u64.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&(weights.len() as u32).to_le_bytes());
        v.extend_from_slice(weights);
        v.extend_from_slice(momentum);
        let digest = Sha256::digest(&v[5..]);
        v.extend_from_slice(&digest);
        v
    }

    /// An int8 payload (codec 1) of `n` values: one block of `n`, scale `scale`, every
    /// value `q`.
    fn int8_payload(n: u32, scale: f32, q: i8) -> Vec<u8> {
        let mut p = vec![1];
        p.extend_from_slice(&n.to_le_bytes());
        p.extend_from_slice(&n.to_le_bytes());
        p.extend_from_slice(&scale.to_le_bytes());
        p.extend(std::iter::repeat_n(q as u8, n as usize));
        p
    }

    #[test]
    fn int8_model_answers_round_trip_within_rounding_at_a_quarter_of_the_bytes() {
        let n = 1000;
        let weights: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let momentum: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) / 1e3).collect();
        let snap = Snapshot {
            round: 42,
            weights: weights.clone(),
            momentum: momentum.clone(),
        };
        let fp32 = PeerMessage::Model(snap.clone()).encode();
        let bytes = PeerMessage::ModelInt8(snap).encode();
        assert_eq!(bytes[4], 10);
        assert!(
            (bytes.len() as f64) < 0.26 * fp32.len() as f64 + 100.0,
            "{} bytes against fp32's {}",
            bytes.len(),
            fp32.len()
        );
        let Ok(PeerMessage::ModelInt8(got)) = PeerMessage::decode(&bytes, n) else {
            panic!("an int8 model decodes");
        };
        assert_eq!(got.round, 42);
        for (sent, got) in [(&weights, &got.weights), (&momentum, &got.momentum)] {
            let max = sent.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (a, b) in sent.iter().zip(got) {
                assert!((a - b).abs() <= max / 254.0 + 1e-6, "{a} came as {b}");
            }
        }
    }

    #[test]
    fn damaged_int8_models_are_refused() {
        let good = int8_model(8, &int8_payload(8, 0.5, 3), &int8_payload(8, 0.1, -2));
        assert!(matches!(
            PeerMessage::decode(&good, 8),
            Ok(PeerMessage::ModelInt8(_))
        ));
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        assert_eq!(PeerMessage::decode(&flipped, 8), Err(WireError::Checksum));
        assert_eq!(
            PeerMessage::decode(&good, 9),
            Err(WireError::WrongSize { got: 8, want: 9 })
        );
        // Payloads whose count disagrees with the model's.
        let short = int8_model(8, &int8_payload(16, 0.5, 3), &int8_payload(8, 0.1, -2));
        assert!(PeerMessage::decode(&short, 8).is_err());
        // fp32 inside a kind 10: refused, even though it would decode.
        let mut fp32 = vec![0];
        fp32.extend_from_slice(&8u32.to_le_bytes());
        fp32.extend_from_slice(&[0; 32]);
        assert_eq!(
            PeerMessage::decode(&int8_model(8, &fp32, &int8_payload(8, 0.1, 1)), 8),
            Err(WireError::Malformed("model in another codec"))
        );
        // A finite scale times -128 (which no encoder writes) overflows.
        let inf = int8_model(
            8,
            &int8_payload(8, f32::MAX, -128),
            &int8_payload(8, 0.1, 1),
        );
        assert_eq!(PeerMessage::decode(&inf, 8), Err(WireError::NonFinite));
        let nan = int8_model(8, &int8_payload(8, 0.5, 1), &int8_payload(8, f32::NAN, 1));
        assert_eq!(PeerMessage::decode(&nan, 8), Err(WireError::NonFinite));
        // A byte more after the momentum, or a weights length past the end.
        let mut long = int8_payload(8, 0.1, 1);
        long.push(0);
        assert!(PeerMessage::decode(&int8_model(8, &int8_payload(8, 0.5, 1), &long), 8).is_err());
        let mut past = good.clone();
        past[17..21].copy_from_slice(&u32::MAX.to_le_bytes());
        let end = past.len() - 32;
        let digest = Sha256::digest(&past[5..end]);
        past[end..].copy_from_slice(&digest);
        assert!(PeerMessage::decode(&past, 8).is_err());
        for cut in [5, 20, good.len() - 33, good.len() - 1] {
            assert!(
                PeerMessage::decode(&good[..cut], 8).is_err(),
                "cut at {cut}"
            );
        }
    }
}

//! Signed ledger heads and the witness that catches a server rewriting history (see
//! "Signed heads and gossip" in docs/protocol.md). Binary, integers little-endian:
//!
//! ```text
//! head = "SHOALHD1" task_len:u8 task[task_len] count:u64 hash[32] time_ms:u64
//!        server[32] signature[64]
//! ```
//!
//! The server signs, with its own key, that its ledger of `task` held `count` entries, the
//! last with `hash`, at `time_ms`. Peers gossip the newest head they hold; a peer that
//! holds a head checks it against what the server shows now: the entry at `count - 1`
//! must still have that hash. A head is signed, so a lying neighbour cannot forge one to
//! make the server look guilty; a server that rewrote or cut its ledger after signing a
//! head cannot deny it, since the head carries its signature.

use thiserror::Error;

use super::receipt::MAX_TASK_BYTES;
use crate::learn::bytes::Cursor;
use crate::learn::identity::{Identity, PublicKey, hex, verify};

const MAGIC: [u8; 8] = *b"SHOALHD1";
/// Bytes of a head besides its task name.
pub const FIXED_BYTES: usize = 8 + 1 + 8 + 32 + 8 + 32 + 64;
/// The longest head.
pub const MAX_HEAD_BYTES: usize = FIXED_BYTES + MAX_TASK_BYTES;

/// Why head bytes were refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Not a head, or a field out of range.
    #[error("malformed ledger head: {0}")]
    Malformed(&'static str),
    /// The server's signature does not verify.
    #[error("the ledger head's signature does not verify")]
    BadSignature,
    /// Signed for another task.
    #[error("a ledger head of another task")]
    OtherTask,
    /// Signed by another key than the server's this peer knows.
    #[error("a ledger head signed by another server")]
    OtherServer,
}

/// One signed head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHead {
    /// The task's name.
    pub task: String,
    /// Entries in the ledger (at least 1).
    pub count: u64,
    /// The hash of its last entry.
    pub hash: [u8; 32],
    /// When the server signed it (ms since the Unix epoch).
    pub time_ms: u64,
    /// The server's key.
    pub server: PublicKey,
    /// The server's signature of everything before it.
    pub signature: [u8; 64],
}

impl SignedHead {
    /// The head `server` signs for a ledger of `task` of `count` entries ending in `hash`.
    pub fn sign(server: &Identity, task: &str, count: u64, hash: [u8; 32], time_ms: u64) -> Self {
        let mut h = Self {
            task: task.to_string(),
            count,
            hash,
            time_ms,
            server: server.public(),
            signature: [0; 64],
        };
        h.signature = server.sign(&h.signed_bytes());
        h
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_HEAD_BYTES);
        b.extend_from_slice(&MAGIC);
        b.push(self.task.len() as u8);
        b.extend_from_slice(self.task.as_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(&self.hash);
        b.extend_from_slice(&self.time_ms.to_le_bytes());
        b.extend_from_slice(&self.server);
        b
    }

    /// The head's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.signed_bytes();
        b.extend_from_slice(&self.signature);
        b
    }

    /// Decodes and checks every field and the signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeadError> {
        let mut c = Cursor::new(bytes, HeadError::Malformed("truncated"));
        if c.array::<8>()? != MAGIC {
            return Err(HeadError::Malformed("not a Shoal v1 ledger head"));
        }
        let len = usize::from(c.array::<1>()?[0]);
        if len == 0 || len > MAX_TASK_BYTES {
            return Err(HeadError::Malformed("task name of 0 or more than 64 bytes"));
        }
        let task = std::str::from_utf8(c.take(len)?)
            .map_err(|_| HeadError::Malformed("task name is not UTF-8"))?
            .to_string();
        let count = c.u64()?;
        if count == 0 {
            return Err(HeadError::Malformed("a head of an empty ledger"));
        }
        let hash = c.array::<32>()?;
        let time_ms = c.u64()?;
        let server = c.array::<32>()?;
        let signature = c.array::<64>()?;
        if !c.is_empty() {
            return Err(HeadError::Malformed("trailing bytes"));
        }
        let h = Self {
            task,
            count,
            hash,
            time_ms,
            server,
            signature,
        };
        if !verify(&h.server, &h.signed_bytes(), &h.signature) {
            return Err(HeadError::BadSignature);
        }
        Ok(h)
    }
}

/// What a check of the heads a peer holds against the server's ledger found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every head held is in the server's ledger as signed; the newest is now `count`.
    Intact {
        /// Entries in the newest head held.
        count: u64,
    },
    /// The server signed `head`, and its ledger no longer holds it.
    Rewritten {
        /// The head the server signed (its bytes are the evidence).
        head: SignedHead,
        /// What the server shows instead, in words.
        found: String,
    },
}

/// A valid head of this peer's server, as a neighbour sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heard {
    /// Its entry count.
    pub count: u64,
    /// Whether it was newer than every head held, and kept.
    pub kept: bool,
}

/// The heads one peer holds for one task: the newest it checked against the server, and
/// the newest a neighbour gossiped that it has not checked yet. Sans-IO: the driver asks
/// [`Witness::lookups`], fetches those entries and the server's current head, and hands
/// them to [`Witness::check`].
#[derive(Clone, Debug, Default)]
pub struct Witness {
    task: String,
    /// The server's key, once known (the first head the server itself gave).
    server: Option<PublicKey>,
    checked: Option<SignedHead>,
    heard: Option<SignedHead>,
    /// Set once the server was caught: later heads from it prove nothing more.
    caught: Option<(SignedHead, String)>,
}

impl Witness {
    /// A witness for `task`, with the head it checked on an earlier visit if any.
    pub fn new(task: &str, remembered: Option<SignedHead>) -> Self {
        let mut w = Self {
            task: task.to_string(),
            ..Self::default()
        };
        if let Some(h) = remembered.filter(|h| h.task == task) {
            w.server = Some(h.server);
            w.heard = Some(h);
        }
        w
    }

    /// Decodes a head of this task, signed by the server whose key this peer knows (or,
    /// when it knows none yet, learns it from this head).
    fn of_our_server(&mut self, bytes: &[u8]) -> Result<SignedHead, HeadError> {
        let h = SignedHead::decode(bytes)?;
        if h.task != self.task {
            return Err(HeadError::OtherTask);
        }
        match self.server {
            None => self.server = Some(h.server),
            Some(k) if k != h.server => return Err(HeadError::OtherServer),
            Some(_) => {}
        }
        Ok(h)
    }

    /// Takes a head this peer checked on an earlier visit (its bytes, as the page kept
    /// them): it names the server's key if none is known yet, and is checked again at
    /// the next [`Witness::check`] like a gossiped one.
    pub fn remember(&mut self, bytes: &[u8]) -> Result<(), HeadError> {
        let h = self.of_our_server(bytes)?;
        if self.newest().is_none_or(|n| n.count < h.count) {
            self.heard = Some(h);
        }
        Ok(())
    }

    /// The newest head held, checked or not (what a peer gossips).
    pub fn newest(&self) -> Option<&SignedHead> {
        match (&self.checked, &self.heard) {
            (Some(c), Some(h)) if h.count > c.count => Some(h),
            (Some(c), _) => Some(c),
            (None, h) => h.as_ref(),
        }
    }

    /// The server was caught rewriting history: the head it signed and what it shows.
    pub fn caught(&self) -> Option<&(SignedHead, String)> {
        self.caught.as_ref()
    }

    /// Takes a head a neighbour sent (its bytes): kept when it is the task's, signed by
    /// the server this peer knows, and newer than every head held. Returns the head and
    /// whether it was kept; a head before the server's key is known is refused (nothing
    /// to check its signer against).
    pub fn heard(&mut self, bytes: &[u8]) -> Result<Heard, HeadError> {
        let h = SignedHead::decode(bytes)?;
        if h.task != self.task {
            return Err(HeadError::OtherTask);
        }
        if self.server != Some(h.server) {
            return Err(HeadError::OtherServer);
        }
        let count = h.count;
        if self.newest().is_some_and(|n| n.count >= count) {
            return Ok(Heard { count, kept: false });
        }
        self.heard = Some(h);
        Ok(Heard { count, kept: true })
    }

    /// The entry indexes whose hashes a check needs (at most two).
    pub fn lookups(&self) -> Vec<u64> {
        let mut at: Vec<u64> = [&self.checked, &self.heard]
            .into_iter()
            .flatten()
            .map(|h| h.count - 1)
            .collect();
        at.dedup();
        at
    }

    /// Checks the heads held against the server's current signed head (`now`, its bytes)
    /// and the hashes it shows at [`Witness::lookups`] (`entries`: index and hash; an
    /// index missing means the server has no such entry).
    pub fn check(&mut self, now: &[u8], entries: &[(u64, [u8; 32])]) -> Result<Verdict, HeadError> {
        let now = self.of_our_server(now)?;
        if let Some((head, found)) = &self.caught {
            return Ok(Verdict::Rewritten {
                head: head.clone(),
                found: found.clone(),
            });
        }
        for held in [&self.checked, &self.heard].into_iter().flatten() {
            let at = held.count - 1;
            let found = if now.count < held.count {
                Some(format!(
                    "its ledger now has {} entries, after it signed {}",
                    now.count, held.count
                ))
            } else if now.count == held.count && now.hash != held.hash {
                Some(format!(
                    "its head at {} entries is now {}",
                    held.count,
                    hex(&now.hash)
                ))
            } else {
                match entries.iter().find(|(i, _)| *i == at) {
                    Some((_, hash)) if *hash == held.hash => None,
                    Some((_, hash)) => Some(format!("entry {at} is now {}", hex(hash))),
                    None => Some(format!("entry {at} is missing")),
                }
            };
            if let Some(found) = found {
                self.caught = Some((held.clone(), found.clone()));
                return Ok(Verdict::Rewritten {
                    head: held.clone(),
                    found,
                });
            }
        }
        let count = now.count;
        self.checked = Some(now);
        self.heard = None;
        Ok(Verdict::Intact { count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Identity {
        Identity::from_seed([9; 32])
    }

    fn head(count: u64, hash: u8) -> SignedHead {
        SignedHead::sign(&server(), "digits", count, [hash; 32], 1_000 + count)
    }

    #[test]
    fn heads_round_trip_and_every_byte_is_covered_by_the_signature() {
        let h = head(12, 7);
        let bytes = h.encode();
        assert_eq!(bytes.len(), FIXED_BYTES + 6);
        assert_eq!(SignedHead::decode(&bytes), Ok(h));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(SignedHead::decode(&bad).is_err(), "byte {i} flipped");
        }
        assert!(SignedHead::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(SignedHead::decode(&long).is_err());
    }

    #[test]
    fn a_witness_keeps_newer_heads_of_its_server_only() {
        let mut w = Witness::new("digits", None);
        // Before the server's key is known, a neighbour's head proves nothing.
        assert_eq!(w.heard(&head(5, 1).encode()), Err(HeadError::OtherServer));
        assert_eq!(
            w.check(&head(5, 1).encode(), &[]),
            Ok(Verdict::Intact { count: 5 })
        );
        assert_eq!(w.heard(&head(9, 2).encode()).map(|h| h.kept), Ok(true));
        assert_eq!(
            w.heard(&head(8, 3).encode()),
            Ok(Heard {
                count: 8,
                kept: false
            }),
            "older than the newest"
        );
        assert_eq!(w.newest().map(|h| h.count), Some(9));
        let other = SignedHead::sign(&Identity::from_seed([1; 32]), "digits", 20, [0; 32], 0);
        assert_eq!(w.heard(&other.encode()), Err(HeadError::OtherServer));
        let task = SignedHead::sign(&server(), "fortunes", 20, [0; 32], 0);
        assert_eq!(w.heard(&task.encode()), Err(HeadError::OtherTask));
        let mut forged = head(30, 4).encode();
        forged[20] ^= 1;
        assert!(w.heard(&forged).is_err());
        assert_eq!(w.lookups(), vec![4, 8]);
    }

    #[test]
    fn a_server_that_rewrote_or_cut_its_ledger_is_caught_by_a_head_it_signed() {
        // Consistent: the entries at the heads held still have their hashes.
        let mut w = Witness::new("digits", Some(head(5, 1)));
        w.heard(&head(9, 2).encode()).expect("kept");
        assert_eq!(
            w.check(&head(12, 3).encode(), &[(4, [1; 32]), (8, [2; 32])]),
            Ok(Verdict::Intact { count: 12 })
        );
        assert_eq!(w.lookups(), vec![11]);
        // Entry 8 changed under a head a neighbour gossiped.
        let mut w = Witness::new("digits", Some(head(5, 1)));
        w.heard(&head(9, 2).encode()).expect("kept");
        let v = w.check(&head(12, 3).encode(), &[(4, [1; 32]), (8, [6; 32])]);
        assert!(
            matches!(&v, Ok(Verdict::Rewritten { head, found }) if head.count == 9 && found.contains("entry 8")),
            "{v:?}"
        );
        // Once caught, always caught (a later consistent answer does not clear it).
        assert!(matches!(
            w.check(&head(13, 3).encode(), &[(8, [2; 32])]),
            Ok(Verdict::Rewritten { .. })
        ));
        // Cut back below a head it signed, or the same count with another hash.
        let mut w = Witness::new("digits", Some(head(9, 2)));
        assert!(matches!(
            w.check(&head(7, 3).encode(), &[]),
            Ok(Verdict::Rewritten { .. })
        ));
        let mut w = Witness::new("digits", Some(head(9, 2)));
        assert!(matches!(
            w.check(&head(9, 3).encode(), &[]),
            Ok(Verdict::Rewritten { .. })
        ));
        // A server answering with another key is not this ledger's server.
        let mut w = Witness::new("digits", Some(head(9, 2)));
        let other = SignedHead::sign(&Identity::from_seed([1; 32]), "digits", 20, [0; 32], 0);
        assert_eq!(w.check(&other.encode(), &[]), Err(HeadError::OtherServer));
    }
}

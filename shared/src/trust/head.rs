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
/// The largest count a head may give: 2^53, what JavaScript's numbers hold exactly (the
/// browser's witness passes entry numbers through them).
pub const MAX_HEAD_COUNT: u64 = 1 << 53;

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

    /// Decodes every field, without the signature (cheap checks come first).
    fn parse(bytes: &[u8]) -> Result<Self, HeadError> {
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
        // Entry numbers pass through JavaScript's numbers in the browser's witness: past
        // 2^53 an entry's number rounds to another, its lookup never matches, and the
        // head stayed unchecked (and held a lookup slot) for good.
        if count > MAX_HEAD_COUNT {
            return Err(HeadError::Malformed("a count past 2^53 entries"));
        }
        let hash = c.array::<32>()?;
        let time_ms = c.u64()?;
        let server = c.array::<32>()?;
        let signature = c.array::<64>()?;
        if !c.is_empty() {
            return Err(HeadError::Malformed("trailing bytes"));
        }
        Ok(Self {
            task,
            count,
            hash,
            time_ms,
            server,
            signature,
        })
    }

    /// Decodes and checks every field and the signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeadError> {
        let h = Self::parse(bytes)?;
        h.verify()?;
        Ok(h)
    }

    /// Checks the signature (after [`SignedHead::parse`]).
    fn verify(&self) -> Result<(), HeadError> {
        if verify(&self.server, &self.signed_bytes(), &self.signature) {
            Ok(())
        } else {
            Err(HeadError::BadSignature)
        }
    }

    /// What the head says: its entry count and last hash.
    pub fn id(&self) -> HeadId {
        (self.count, self.hash)
    }
}

/// A head's entry count and last hash.
pub type HeadId = (u64, [u8; 32]);

/// What a check of the heads a peer holds against the server's ledger found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every head judged is in the server's ledger as signed; the server's head now has
    /// `count` entries.
    Intact {
        /// Entries in the server's current head.
        count: u64,
    },
    /// The server signed `head`, and its ledger no longer holds it (or the server no
    /// longer signs, or signs with another key).
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
    /// What it says.
    pub id: HeadId,
    /// Whether it was new to this peer, and kept for the next check.
    pub kept: bool,
}

/// Senders whose unchecked heads are held at once (one each: the last it sent).
pub const MAX_PENDING: usize = 16;
/// Entries one check looks up at most (the other heads wait for the next check).
pub const MAX_LOOKUPS: usize = 8;
/// The sender of the head kept from an earlier visit.
const REMEMBERED: u64 = u64::MAX;

/// The heads one peer holds for one task: the newest it checked against the server,
/// the heads neighbours sent that it has not checked yet (any count: a head from before
/// a cut is evidence even after the ledger has grown past it), and the evidence once the
/// server is caught. Sans-IO: the driver asks [`Witness::lookups`], fetches those entries
/// and the server's current head, and hands them to [`Witness::check`].
#[derive(Clone, Debug, Default)]
pub struct Witness {
    task: String,
    /// The server's key, once known (the first head the server itself gave, or the head
    /// kept from an earlier visit).
    server: Option<PublicKey>,
    checked: Option<SignedHead>,
    /// Unchecked heads by sender, oldest first.
    pending: Vec<(u64, SignedHead)>,
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
        if let Some(h) = remembered.filter(|h| h.task == task && h.count > 0) {
            w.server = Some(h.server);
            w.pending.push((REMEMBERED, h));
        }
        w
    }

    /// Takes a head this peer checked on an earlier visit (its bytes, as the page kept
    /// them): it names the server's key if none is known yet, and is checked at the next
    /// [`Witness::check`] like a gossiped one.
    pub fn remember(&mut self, bytes: &[u8]) -> Result<(), HeadError> {
        let h = SignedHead::decode(bytes)?;
        if h.task != self.task {
            return Err(HeadError::OtherTask);
        }
        match self.server {
            None => self.server = Some(h.server),
            Some(k) if k != h.server => return Err(HeadError::OtherServer),
            Some(_) => {}
        }
        self.hold(REMEMBERED, h);
        Ok(())
    }

    /// The head to send neighbours: the evidence once the server is caught, otherwise
    /// the newest checked one (or, before any check, the one kept from an earlier visit).
    pub fn gossip(&self) -> Option<&SignedHead> {
        match (&self.caught, &self.checked) {
            (Some((h, _)), _) | (None, Some(h)) => Some(h),
            (None, None) => self
                .pending
                .iter()
                .find(|(s, _)| *s == REMEMBERED)
                .map(|(_, h)| h),
        }
    }

    /// The newest head checked against the server.
    pub fn checked(&self) -> Option<&SignedHead> {
        self.checked.as_ref()
    }

    /// The server was caught rewriting history: the head it signed and what it shows.
    pub fn caught(&self) -> Option<&(SignedHead, String)> {
        self.caught.as_ref()
    }

    /// Takes a head the neighbour `sender` sent (its bytes): kept for the next check when
    /// it is the task's, signed by the server this peer knows, and not one this peer
    /// holds already (whatever its count). The cheap checks come before the signature's.
    /// A head of another server, or one that comes before this peer knows its server's
    /// key, says nothing about this ledger (`OtherServer`). One head per sender is held
    /// (its latest), from at most [`MAX_PENDING`] senders.
    pub fn heard(&mut self, sender: u64, bytes: &[u8]) -> Result<Heard, HeadError> {
        let h = SignedHead::parse(bytes)?;
        if h.task != self.task {
            return Err(HeadError::OtherTask);
        }
        if self.server != Some(h.server) {
            return Err(HeadError::OtherServer);
        }
        let id = h.id();
        let held = self.checked.iter().map(SignedHead::id).any(|c| c == id)
            || self.pending.iter().any(|(_, p)| p.id() == id)
            || self.caught.as_ref().is_some_and(|(c, _)| c.id() == id);
        if held || self.caught.is_some() {
            return Ok(Heard { id, kept: false });
        }
        if self.pending.len() >= MAX_PENDING && !self.pending.iter().any(|(s, _)| *s == sender) {
            return Ok(Heard { id, kept: false });
        }
        h.verify()?;
        self.hold(sender, h);
        Ok(Heard { id, kept: true })
    }

    fn hold(&mut self, sender: u64, h: SignedHead) {
        self.pending.retain(|(s, _)| *s != sender);
        self.pending.push((sender, h));
    }

    /// The entry indexes whose hashes the next check needs: the checked head's and
    /// those of the oldest unchecked heads, at most [`MAX_LOOKUPS`], each once.
    pub fn lookups(&self) -> Vec<u64> {
        let mut at: Vec<u64> = Vec::new();
        for h in self
            .checked
            .iter()
            .chain(self.pending.iter().map(|(_, h)| h))
        {
            let i = h.count - 1;
            if !at.contains(&i) {
                if at.len() == MAX_LOOKUPS {
                    break;
                }
                at.push(i);
            }
        }
        at
    }

    /// Checks the heads held against what the server shows: `now`, its current signed
    /// head (its bytes; `None` when it shows none, as with an empty ledger; one that does
    /// not decode, verify or name the task counts as none where a head is held, else is
    /// the error), and
    /// `entries`, the hash it shows at each index looked up ([`Witness::lookups`]; `None`
    /// where it has no entry there). Heads whose index was not looked up wait for the
    /// next check. `None` when there is nothing to judge (nothing held, nothing shown).
    pub fn check(
        &mut self,
        now: Option<&[u8]>,
        entries: &[(u64, Option<[u8; 32]>)],
    ) -> Result<Option<Verdict>, HeadError> {
        if let Some((head, found)) = &self.caught {
            return Ok(Some(Verdict::Rewritten {
                head: head.clone(),
                found: found.clone(),
            }));
        }
        // The newest head held: what a server that stopped signing, or changed its key,
        // is caught by.
        let newest = self
            .checked
            .iter()
            .chain(self.pending.iter().map(|(_, h)| h))
            .max_by_key(|h| h.count)
            .cloned();
        // A head that does not check out (not a head, its signature broken, another
        // task's) shows no more than none: with a head held the server is caught, as one
        // that shows none is (answering garbage instead of nothing escaped the check).
        let now = match now.map(SignedHead::decode) {
            None => None,
            Some(Ok(n)) if n.task == self.task => Some(n),
            Some(shown) => {
                let why = shown.err().unwrap_or(HeadError::OtherTask);
                return match newest {
                    Some(held) => {
                        let found =
                            format!("it shows a signed head that does not check out ({why})");
                        Ok(Some(self.catch(held, found)))
                    }
                    None => Err(why),
                };
            }
        };
        let now = match (now, newest) {
            (None, None) => return Ok(None),
            (None, Some(held)) => {
                return Ok(Some(
                    self.catch(held, "it shows no signed head any more".into()),
                ));
            }
            (Some(n), held) => match (self.server, held) {
                (Some(k), Some(held)) if k != n.server => {
                    let found = format!("it now signs with another key, {}", hex(&n.server));
                    return Ok(Some(self.catch(held, found)));
                }
                _ => {
                    self.server = Some(n.server);
                    n
                }
            },
        };
        let judged = |h: &SignedHead| entries.iter().find(|(i, _)| *i == h.count - 1);
        let mut cleared = Vec::new();
        for held in self
            .checked
            .iter()
            .chain(self.pending.iter().map(|(_, h)| h))
        {
            let Some((at, shown)) = judged(held) else {
                continue;
            };
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
                match shown {
                    Some(hash) if *hash == held.hash => None,
                    Some(hash) => Some(format!("entry {at} is now {}", hex(hash))),
                    None => Some(format!("entry {at} is missing")),
                }
            };
            if let Some(found) = found {
                let held = held.clone();
                return Ok(Some(self.catch(held, found)));
            }
            cleared.push(held.id());
        }
        self.pending.retain(|(_, h)| !cleared.contains(&h.id()));
        let count = now.count;
        self.checked = Some(now);
        Ok(Some(Verdict::Intact { count }))
    }

    fn catch(&mut self, head: SignedHead, found: String) -> Verdict {
        self.caught = Some((head.clone(), found.clone()));
        Verdict::Rewritten { head, found }
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

    /// A count past 2^53 is refused: the browser's witness passes entry numbers through
    /// JavaScript's numbers, where such an entry's number rounds to another, its lookup
    /// never matched, and the head stayed unchecked while every check said intact.
    #[test]
    fn a_head_counting_past_what_a_browser_holds_exactly_is_refused() {
        let at = |count: u64| SignedHead::sign(&server(), "digits", count, [1; 32], 0).encode();
        assert!(SignedHead::decode(&at(MAX_HEAD_COUNT)).is_ok());
        assert!(SignedHead::decode(&at(MAX_HEAD_COUNT + 2)).is_err());
        assert!(SignedHead::decode(&at(u64::MAX)).is_err());
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

    /// The hashes a server shows at `at`: `(index, hash)` for those it has.
    fn shown(at: &[u64], has: &[(u64, u8)]) -> Vec<(u64, Option<[u8; 32]>)> {
        at.iter()
            .map(|i| (*i, has.iter().find(|(j, _)| j == i).map(|(_, h)| [*h; 32])))
            .collect()
    }

    #[test]
    fn a_witness_keeps_any_unheld_head_of_its_server_one_per_sender() {
        let mut w = Witness::new("digits", None);
        // Before the server's key is known, a neighbour's head proves nothing.
        assert_eq!(
            w.heard(1, &head(5, 1).encode()),
            Err(HeadError::OtherServer)
        );
        assert_eq!(w.check(None, &[]), Ok(None), "nothing held, nothing shown");
        assert_eq!(
            w.check(Some(&head(5, 1).encode()), &[]),
            Ok(Some(Verdict::Intact { count: 5 }))
        );
        assert_eq!(w.heard(1, &head(9, 2).encode()).map(|h| h.kept), Ok(true));
        // Older heads are kept too (evidence from before a cut), but not one held.
        assert_eq!(w.heard(2, &head(3, 3).encode()).map(|h| h.kept), Ok(true));
        assert_eq!(w.heard(3, &head(5, 1).encode()).map(|h| h.kept), Ok(false));
        // One per sender: its latest replaces its earlier one.
        assert_eq!(w.heard(2, &head(4, 3).encode()).map(|h| h.kept), Ok(true));
        assert_eq!(w.lookups(), vec![4, 8, 3]);
        let other = SignedHead::sign(&Identity::from_seed([1; 32]), "digits", 20, [0; 32], 0);
        assert_eq!(w.heard(4, &other.encode()), Err(HeadError::OtherServer));
        let task = SignedHead::sign(&server(), "fortunes", 20, [0; 32], 0);
        assert_eq!(w.heard(4, &task.encode()), Err(HeadError::OtherTask));
        let mut forged = head(30, 4).encode();
        forged[20] ^= 1;
        assert_eq!(w.heard(4, &forged), Err(HeadError::BadSignature));
        // At most MAX_PENDING senders; the evidence of the first ones stays.
        for s in 10..10 + MAX_PENDING as u64 {
            let _ = w.heard(s, &head(100 + s, 5).encode());
        }
        assert!(w.pending.iter().any(|(s, h)| *s == 2 && h.count == 4));
        assert_eq!(w.pending.len(), MAX_PENDING);
        assert_eq!(w.lookups().len(), MAX_LOOKUPS);
    }

    #[test]
    fn a_server_that_rewrote_or_cut_its_ledger_is_caught_by_a_head_it_signed() {
        // Consistent: the entries at the heads held still have their hashes.
        let mut w = Witness::new("digits", Some(head(5, 1)));
        w.check(Some(&head(5, 1).encode()), &shown(&[4], &[(4, 1)]))
            .expect("checked");
        w.heard(7, &head(9, 2).encode()).expect("kept");
        assert_eq!(w.lookups(), vec![4, 8]);
        assert_eq!(
            w.check(
                Some(&head(12, 3).encode()),
                &shown(&[4, 8], &[(4, 1), (8, 2)])
            ),
            Ok(Some(Verdict::Intact { count: 12 }))
        );
        assert_eq!(w.lookups(), vec![11]);
        assert_eq!(w.gossip().map(|h| h.count), Some(12));
        // Entry 8 changed under a head a neighbour gossiped.
        let mut w = Witness::new("digits", Some(head(5, 1)));
        w.check(Some(&head(5, 1).encode()), &shown(&[4], &[(4, 1)]))
            .expect("checked");
        w.heard(7, &head(9, 2).encode()).expect("kept");
        let v = w.check(
            Some(&head(12, 3).encode()),
            &shown(&[4, 8], &[(4, 1), (8, 6)]),
        );
        assert!(
            matches!(&v, Ok(Some(Verdict::Rewritten { head, found })) if head.count == 9 && found.contains("entry 8")),
            "{v:?}"
        );
        // The evidence is what it gossips now, and it stays caught.
        assert_eq!(w.gossip().map(|h| h.count), Some(9));
        assert!(matches!(
            w.check(Some(&head(13, 3).encode()), &shown(&[12], &[(12, 3)])),
            Ok(Some(Verdict::Rewritten { .. }))
        ));
        // A head from before a cut still catches it after the ledger grew past it.
        let mut w = Witness::new("digits", None);
        w.check(Some(&head(20, 9).encode()), &[]).expect("first");
        w.heard(7, &head(9, 2).encode())
            .expect("kept although older");
        let v = w.check(
            Some(&head(25, 9).encode()),
            &shown(&[19, 8], &[(19, 9), (8, 5)]),
        );
        assert!(matches!(v, Ok(Some(Verdict::Rewritten { head, .. })) if head.count == 9));
        // A head whose entry was not looked up waits for the next check.
        let mut w = Witness::new("digits", Some(head(9, 2)));
        assert_eq!(
            w.check(Some(&head(12, 3).encode()), &[]),
            Ok(Some(Verdict::Intact { count: 12 }))
        );
        assert_eq!(w.lookups(), vec![11, 8]);
        // Cut back below a head it signed, or the same count with another hash.
        let mut w = Witness::new("digits", Some(head(9, 2)));
        let v = w.check(Some(&head(7, 3).encode()), &shown(&[8], &[]));
        assert!(matches!(v, Ok(Some(Verdict::Rewritten { .. }))));
        let mut w = Witness::new("digits", Some(head(9, 2)));
        let v = w.check(Some(&head(9, 3).encode()), &shown(&[8], &[(8, 3)]));
        assert!(matches!(v, Ok(Some(Verdict::Rewritten { .. }))));
        // A server that shows no signed head any more, or signs with another key.
        let mut w = Witness::new("digits", Some(head(9, 2)));
        assert!(
            matches!(w.check(None, &[]), Ok(Some(Verdict::Rewritten { found, .. })) if found.contains("no signed head"))
        );
        let mut w = Witness::new("digits", Some(head(9, 2)));
        let other = SignedHead::sign(&Identity::from_seed([1; 32]), "digits", 20, [0; 32], 0);
        assert!(
            matches!(w.check(Some(&other.encode()), &[]), Ok(Some(Verdict::Rewritten { found, .. })) if found.contains("another key"))
        );
    }

    /// A server that cut its ledger and, asked for its head, answered with bytes that are
    /// not a head of the task it signs (garbage, a broken signature, another task's) was
    /// never caught: the check failed, and the page kept saying "intact". It is caught as
    /// one that shows no head is; with nothing held, such an answer is only an error.
    #[test]
    fn a_server_that_shows_a_head_that_does_not_check_out_is_caught() {
        let mut broken = head(12, 3).encode();
        broken[20] ^= 1;
        let other_task = SignedHead::sign(&server(), "text", 12, [3; 32], 0).encode();
        for bytes in [vec![0], Vec::new(), broken, other_task] {
            let mut w = Witness::new("digits", Some(head(9, 2)));
            let v = w.check(Some(&bytes), &[]);
            assert!(
                matches!(&v, Ok(Some(Verdict::Rewritten { head, found })) if head.count == 9 && found.contains("does not check out")),
                "{v:?}"
            );
            // Caught for good: a good head later does not clear it.
            assert!(matches!(
                w.check(Some(&head(12, 3).encode()), &[]),
                Ok(Some(Verdict::Rewritten { .. }))
            ));
            let mut w = Witness::new("digits", None);
            assert!(w.check(Some(&bytes), &[]).is_err());
            assert_eq!(w.check(None, &[]), Ok(None));
        }
    }
}

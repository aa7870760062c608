//! Receipts: the receiver of an update it used signs what it used (see "Receipts" in
//! docs/protocol.md). Binary, integers little-endian:
//!
//! ```text
//! receipt = "SHOALRC1" task_len:u8 task[task_len] round:u64 sender[32] receiver[32]
//!           samples:u32 update_sha256[32] flags:u8 signature[64]
//! ```

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::learn::bytes::Cursor;
use crate::learn::identity::{Identity, PublicKey, verify};
use crate::learn::wire::MAX_ROUND;

const MAGIC: [u8; 8] = *b"SHOALRC1";
/// The longest task name a receipt carries.
pub const MAX_TASK_BYTES: usize = 64;
/// Bytes of a receipt besides its task name.
pub const FIXED_BYTES: usize = 8 + 1 + 8 + 32 + 32 + 4 + 32 + 1 + 64;
/// The longest receipt.
pub const MAX_RECEIPT_BYTES: usize = FIXED_BYTES + MAX_TASK_BYTES;

/// Flag bit 0: the sample claim counted for less than it said.
pub const FLAG_CLAIM_BOUNDED: u8 = 1;
/// Flag bit 1: a robust rule (not `mean`) combined the round.
pub const FLAG_ROBUST: u8 = 2;
const FLAGS_KNOWN: u8 = FLAG_CLAIM_BOUNDED | FLAG_ROBUST;

/// Why receipt bytes were refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReceiptError {
    /// Not a receipt, or a field out of range.
    #[error("malformed receipt: {0}")]
    Malformed(&'static str),
    /// The receiver's signature does not verify.
    #[error("the receipt's signature does not verify")]
    BadSignature,
}

/// One signed receipt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The task's name.
    pub task: String,
    /// The update's round.
    pub round: u64,
    /// The key that signed the update.
    pub sender: PublicKey,
    /// The key that used it and signs this receipt.
    pub receiver: PublicKey,
    /// The update's sample claim as the receiver vouches for it: at most twice the lower
    /// median claim of the round's updates it aggregated ([`FLAG_CLAIM_BOUNDED`] when
    /// that is less than the update said).
    pub samples: u32,
    /// SHA-256 of the update message as it arrived.
    pub update_sha256: [u8; 32],
    /// [`FLAG_CLAIM_BOUNDED`], [`FLAG_ROBUST`].
    pub flags: u8,
    /// The receiver's signature of everything before it.
    pub signature: [u8; 64],
}

/// SHA-256 of `bytes` (an update message, a ledger entry).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Receipt {
    /// A receipt signed by `receiver` for the update `update` (its whole message) that
    /// `sender` signed for `round`, claiming `samples`.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        receiver: &Identity,
        task: &str,
        round: u64,
        sender: PublicKey,
        samples: u32,
        update_sha256: [u8; 32],
        flags: u8,
    ) -> Self {
        let mut r = Self {
            task: task.to_string(),
            round,
            sender,
            receiver: receiver.public(),
            samples,
            update_sha256,
            flags,
            signature: [0; 64],
        };
        r.signature = receiver.sign(&r.signed_bytes());
        r
    }

    /// The bytes the signature covers.
    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_RECEIPT_BYTES);
        b.extend_from_slice(&MAGIC);
        b.push(self.task.len() as u8);
        b.extend_from_slice(self.task.as_bytes());
        b.extend_from_slice(&self.round.to_le_bytes());
        b.extend_from_slice(&self.sender);
        b.extend_from_slice(&self.receiver);
        b.extend_from_slice(&self.samples.to_le_bytes());
        b.extend_from_slice(&self.update_sha256);
        b.push(self.flags);
        b
    }

    /// The receipt's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.signed_bytes();
        b.extend_from_slice(&self.signature);
        b
    }

    /// Decodes and checks every field and the signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReceiptError> {
        let r = Self::decode_unverified(bytes)?;
        if !r.verifies() {
            return Err(ReceiptError::BadSignature);
        }
        Ok(r)
    }

    /// Whether the receiver's signature verifies (strictly).
    pub fn verifies(&self) -> bool {
        verify(&self.receiver, &self.signed_bytes(), &self.signature)
    }

    /// Reads a receipt without checking its signature: for checks cheaper than the
    /// signature, made first (a server verifies only receipts that pass them, so that
    /// receipts from connections that may sign none cost it no signature check). Call
    /// [`Receipt::verifies`] before trusting it.
    pub fn decode_unverified(bytes: &[u8]) -> Result<Self, ReceiptError> {
        let mut c = Cursor::new(bytes, ReceiptError::Malformed("truncated"));
        if c.array::<8>()? != MAGIC {
            return Err(ReceiptError::Malformed("not a Shoal v1 receipt"));
        }
        let len = usize::from(c.array::<1>()?[0]);
        if len == 0 || len > MAX_TASK_BYTES {
            return Err(ReceiptError::Malformed(
                "task name of 0 or more than 64 bytes",
            ));
        }
        let task = std::str::from_utf8(c.take(len)?)
            .map_err(|_| ReceiptError::Malformed("task name is not UTF-8"))?
            .to_string();
        let round = c.u64()?;
        if round >= MAX_ROUND {
            return Err(ReceiptError::Malformed("implausible round"));
        }
        let sender = c.array::<32>()?;
        let receiver = c.array::<32>()?;
        if sender == receiver {
            return Err(ReceiptError::Malformed("sender and receiver are one key"));
        }
        let samples = c.u32()?;
        if samples == 0 {
            return Err(ReceiptError::Malformed("a claim of 0 samples"));
        }
        let update_sha256 = c.array::<32>()?;
        let flags = c.array::<1>()?[0];
        if flags & !FLAGS_KNOWN != 0 {
            return Err(ReceiptError::Malformed("unknown flag bits"));
        }
        let signature = c.array::<64>()?;
        if !c.is_empty() {
            return Err(ReceiptError::Malformed("trailing bytes"));
        }
        Ok(Self {
            task,
            round,
            sender,
            receiver,
            samples,
            update_sha256,
            flags,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Receipt {
        let rx = Identity::from_seed([3; 32]);
        let tx = Identity::from_seed([4; 32]);
        Receipt::sign(
            &rx,
            "digits",
            17,
            tx.public(),
            640,
            sha256(b"update"),
            FLAG_ROBUST,
        )
    }

    #[test]
    fn receipts_round_trip_and_every_byte_is_covered_by_the_signature() {
        let r = sample();
        let bytes = r.encode();
        assert_eq!(bytes.len(), FIXED_BYTES + 6);
        assert_eq!(Receipt::decode(&bytes), Ok(r));
        // Flipping any bit anywhere makes it refused: as malformed or as a bad signature.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                Receipt::decode(&bad).is_err(),
                "byte {i} flipped was accepted"
            );
        }
    }

    #[test]
    fn malformed_receipts_name_what_is_wrong() {
        let bytes = sample().encode();
        let e = |b: &[u8]| Receipt::decode(b).expect_err("refused").to_string();
        assert!(e(&bytes[..bytes.len() - 1]).contains("truncated"));
        assert!(e(&[bytes.clone(), vec![0]].concat()).contains("trailing"));
        assert!(e(b"SHOALRC2").contains("not a Shoal"));
        let rx = Identity::from_seed([3; 32]);
        let own = Receipt::sign(&rx, "digits", 1, rx.public(), 1, [0; 32], 0).encode();
        assert!(e(&own).contains("one key"));
        let zero = Receipt::sign(&rx, "digits", 1, [9; 32], 0, [0; 32], 0).encode();
        assert!(e(&zero).contains("0 samples"));
        let flags = Receipt::sign(&rx, "digits", 1, [9; 32], 1, [0; 32], 4).encode();
        assert!(e(&flags).contains("flag"));
        let far = Receipt::sign(&rx, "digits", MAX_ROUND, [9; 32], 1, [0; 32], 0).encode();
        assert!(e(&far).contains("round"));
    }
}

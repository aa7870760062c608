//! Framing for WebRTC data channels: messages of any size travel as chunks that fit the
//! channel's message limit, are reassembled in order and checked with a CRC-32 of the
//! whole message. A corrupted, truncated, inconsistent or oversized frame drops that one
//! message and is counted; it never takes the peer down. The reassembler is sans-IO: the
//! caller passes the time with every frame, and a message that stops making progress
//! expires (or is evicted by a newer one when every slot is taken), so a sender that
//! starts messages and never finishes them cannot wedge the channel.
//!
//! Also here: the sending side's bounded queue and its backpressure policy, shared by the
//! browser and native transports (each waits for its channel's buffered-amount-low event
//! when [`SendQueue::next_frame`] says the channel is full).
//!
//! Frame layout (little-endian), 24 bytes of header then the chunk's payload:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..2 | magic `S` `H` |
//! | 2 | version (1) |
//! | 3 | flags (0) |
//! | 4..8 | message id |
//! | 8..12 | chunk index |
//! | 12..16 | chunk count |
//! | 16..20 | message length in bytes |
//! | 20..24 | CRC-32 (IEEE) of the whole message |

use std::collections::{HashMap, VecDeque};

use thiserror::Error;

/// Header bytes in front of every chunk.
pub const HEADER: usize = 24;
/// Default chunk payload: with its header a frame is exactly 16 KiB, the message size
/// every browser's data channel sends and receives without trouble.
pub const DEFAULT_CHUNK: usize = 16 * 1024 - HEADER;
/// Bytes a message of `len` bytes takes on the wire in `chunk`-byte chunks, headers
/// included (an empty message is one frame).
pub fn framed_len(len: usize, chunk: usize) -> usize {
    len.saturating_add(HEADER.saturating_mul(len.div_ceil(chunk.max(1)).max(1)))
}

/// Largest chunk payload a sender may configure.
pub const MAX_CHUNK: usize = 256 * 1024;
/// Largest message a peer sends or accepts over a data channel, whatever the task (a model
/// of about 8 million parameters in fp32 with its momentum).
pub const MAX_MESSAGE: usize = 64 << 20;
/// Bytes beyond eight per parameter that a task's largest message may take (headers,
/// signatures, receipts, ledger heads).
pub const MESSAGE_SLACK: usize = 64 << 10;

/// The largest message a peer of a task whose model has `params` parameters accepts:
/// `8 params + 65,536` bytes, at most [`MAX_MESSAGE`]. The largest message such a peer
/// has reason to send is a model in fp32 with its momentum (kind 3: `8 params + 49`);
/// every other kind is smaller (docs/protocol.md, "Framing"). Transports reassemble and
/// queue no more from one neighbour, so a hostile neighbour's memory on a peer of a
/// small model is that model's size, not [`MAX_MESSAGE`]. A task whose model would need
/// more than [`MAX_MESSAGE`] is refused (`TaskSpec::validate`).
pub fn max_message_for(params: usize) -> usize {
    params
        .saturating_mul(8)
        .saturating_add(MESSAGE_SLACK)
        .min(MAX_MESSAGE)
}

/// A partially received message that got no new chunk for this long is dropped
/// ([`FrameError::Expired`]). Frames of one message arrive back to back on an ordered,
/// reliable channel, so a pause this long means its sender gave up on it (or never meant
/// to finish it).
pub const PARTIAL_EXPIRY_MS: u64 = 30_000;
const MAGIC: [u8; 2] = *b"SH";
const VERSION: u8 = 1;

/// Why a frame (and with it, its message) was dropped.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Hash)]
pub enum FrameError {
    /// Shorter than a header.
    #[error("frame shorter than its header")]
    Truncated,
    /// Not a Shoal frame, another version, or reserved flags set.
    #[error("bad magic, version or flags")]
    BadMagic,
    /// The message would exceed the receiver's size limit.
    #[error("message larger than the limit")]
    TooLarge,
    /// Chunk fields disagree (index out of range or order, length or count mismatch).
    #[error("inconsistent chunk")]
    Inconsistent,
    /// The reassembled message does not match its checksum.
    #[error("checksum mismatch")]
    Checksum,
    /// A partial message made no progress for [`PARTIAL_EXPIRY_MS`].
    #[error("message not completed in time")]
    Expired,
    /// Every in-flight slot was taken when a new message began: the partial message that
    /// progressed least recently was dropped to make room.
    #[error("message evicted by a newer one")]
    Evicted,
}

impl FrameError {
    /// Every reason, for counters.
    pub const ALL: [FrameError; 7] = [
        Self::Truncated,
        Self::BadMagic,
        Self::TooLarge,
        Self::Inconsistent,
        Self::Checksum,
        Self::Expired,
        Self::Evicted,
    ];
}

/// Slicing-by-8 tables: `T[0]` is the byte-wise table; `T[k][i]` is the CRC of byte `i`
/// followed by `k` zero bytes, so eight bytes fold in with eight lookups.
const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// Incremental CRC-32 (IEEE 802.3, as in zip and PNG).
#[derive(Clone, Copy, Debug)]
pub struct Crc32(u32);

impl Default for Crc32 {
    fn default() -> Self {
        Self(0xFFFF_FFFF)
    }
}

impl Crc32 {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let t = &CRC_TABLES;
        let mut c = self.0;
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let one = c ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let two = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
            c = t[7][(one & 0xFF) as usize]
                ^ t[6][((one >> 8) & 0xFF) as usize]
                ^ t[5][((one >> 16) & 0xFF) as usize]
                ^ t[4][(one >> 24) as usize]
                ^ t[3][(two & 0xFF) as usize]
                ^ t[2][((two >> 8) & 0xFF) as usize]
                ^ t[1][((two >> 16) & 0xFF) as usize]
                ^ t[0][(two >> 24) as usize];
        }
        for &b in words.remainder() {
            c = t[0][((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    /// The checksum of everything fed.
    pub fn finish(self) -> u32 {
        self.0 ^ 0xFFFF_FFFF
    }

    /// Checksum of one buffer.
    pub fn of(bytes: &[u8]) -> u32 {
        let mut c = Self::default();
        c.update(bytes);
        c.finish()
    }
}

/// Splits a message into frames of at most `chunk` payload bytes.
///
/// # Panics
/// If `chunk` is 0 or above [`MAX_CHUNK`], or the message is 4 GiB or more.
pub fn split(id: u32, msg: &[u8], chunk: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    assert!((1..=MAX_CHUNK).contains(&chunk), "chunk size out of range");
    let total = u32::try_from(msg.len()).expect("messages are below 4 GiB");
    let count = msg.len().div_ceil(chunk).max(1) as u32;
    let crc = Crc32::of(msg);
    (0..count).map(move |i| {
        let start = i as usize * chunk;
        let body = &msg[start.min(msg.len())..(start + chunk).min(msg.len())];
        let mut f = Vec::with_capacity(HEADER + body.len());
        f.extend_from_slice(&MAGIC);
        f.push(VERSION);
        f.push(0);
        for v in [id, i, count, total, crc] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(body);
        f
    })
}

struct Header {
    id: u32,
    index: u32,
    count: u32,
    total: u32,
    crc: u32,
}

fn parse(frame: &[u8]) -> Result<(Header, &[u8]), FrameError> {
    if frame.len() < HEADER {
        return Err(FrameError::Truncated);
    }
    if frame[0..2] != MAGIC || frame[2] != VERSION || frame[3] != 0 {
        return Err(FrameError::BadMagic);
    }
    let word = |i: usize| u32::from_le_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
    let h = Header {
        id: word(4),
        index: word(8),
        count: word(12),
        total: word(16),
        crc: word(20),
    };
    if h.count == 0 || h.index >= h.count || h.count > h.total.max(1) {
        return Err(FrameError::Inconsistent);
    }
    Ok((h, &frame[HEADER..]))
}

struct Partial {
    next: u32,
    count: u32,
    total: u32,
    crc: u32,
    data: Vec<u8>,
    /// When its last chunk arrived, in the caller's milliseconds.
    touched_ms: u64,
    /// Order of its last progress among all partial messages (larger is more recent).
    touched_seq: u64,
}

/// Reassembles messages from frames, with limits and error counters.
///
/// Time is injected: every [`push`](Self::push) carries the caller's clock in
/// milliseconds (any monotonic origin), so the rules are testable without waiting.
pub struct Reassembler {
    max_message: usize,
    max_in_flight: usize,
    partial: HashMap<u32, Partial>,
    seq: u64,
    /// Messages completed.
    pub delivered: u64,
    dropped: HashMap<FrameError, u64>,
}

impl Reassembler {
    /// Accepts messages up to `max_message` bytes, at most `max_in_flight` (at least one)
    /// partially received at a time.
    pub fn new(max_message: usize, max_in_flight: usize) -> Self {
        Self {
            max_message,
            max_in_flight: max_in_flight.max(1),
            partial: HashMap::new(),
            seq: 0,
            delivered: 0,
            dropped: HashMap::new(),
        }
    }

    /// Messages dropped for `reason` so far.
    pub fn dropped(&self, reason: FrameError) -> u64 {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    /// Messages dropped for any reason so far (a transport watches it grow to tell a
    /// misbehaving neighbour from a transient fault).
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// Messages partially received right now.
    pub fn in_flight(&self) -> usize {
        self.partial.len()
    }

    /// When the partial message that progressed least recently expires, if one is held:
    /// the time to call [`expire`](Self::expire) from a timer.
    pub fn next_expiry(&self) -> Option<u64> {
        self.partial
            .values()
            .map(|p| p.touched_ms.saturating_add(PARTIAL_EXPIRY_MS))
            .min()
    }

    fn count(&mut self, reason: FrameError, n: u64) {
        if n > 0 {
            *self.dropped.entry(reason).or_default() += n;
        }
    }

    /// Drops (and counts as [`FrameError::Expired`]) every partial message that made no
    /// progress for [`PARTIAL_EXPIRY_MS`] before `now_ms`; returns how many. [`push`]
    /// does this itself; call it from a timer to free a silent sender's memory sooner.
    ///
    /// [`push`]: Self::push
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.partial.len();
        self.partial
            .retain(|_, p| now_ms.saturating_sub(p.touched_ms) < PARTIAL_EXPIRY_MS);
        let gone = before - self.partial.len();
        self.count(FrameError::Expired, gone as u64);
        gone
    }

    /// Makes room for a new message of `total` bytes when every slot is taken, or when
    /// the partial messages' lengths and its own would exceed the largest message: the
    /// partial message that progressed least recently goes (counted as
    /// [`FrameError::Evicted`]). So a channel holds at most one largest message's bytes
    /// however its sender interleaves (Shoal's peers send one message after another; a
    /// sender that opened four largest messages and trickled a chunk into each now and
    /// then held four times that).
    fn evict_for_new(&mut self, total: usize) {
        let held = |r: &Self| r.partial.values().map(|p| p.total as usize).sum::<usize>();
        while self.partial.len() >= self.max_in_flight
            || (!self.partial.is_empty() && held(self) + total > self.max_message)
        {
            let oldest = self
                .partial
                .iter()
                .min_by_key(|(_, p)| p.touched_seq)
                .map(|(&id, _)| id);
            let Some(id) = oldest else { return };
            self.partial.remove(&id);
            self.count(FrameError::Evicted, 1);
        }
    }

    /// Bytes held in partially received messages.
    pub fn buffered(&self) -> usize {
        self.partial.values().map(|p| p.data.len()).sum()
    }

    /// Takes one frame that arrived at `now_ms`; returns a message when its last chunk
    /// arrives. On error the message the frame belongs to is discarded and the error
    /// counted. Partial messages that expired by `now_ms` are dropped first, and a new
    /// message that finds every slot taken evicts the least recently progressed one:
    /// both are counted (see [`dropped`](Self::dropped)), not returned.
    pub fn push(&mut self, frame: &[u8], now_ms: u64) -> Result<Option<Vec<u8>>, FrameError> {
        self.expire(now_ms);
        let r = self.accept(frame, now_ms);
        if let Err(e) = r {
            self.count(e, 1);
        }
        r
    }

    fn accept(&mut self, frame: &[u8], now_ms: u64) -> Result<Option<Vec<u8>>, FrameError> {
        let (h, body) = parse(frame)?;
        // A chunk is at most `MAX_CHUNK` bytes: the message rate a link allows then bounds
        // its bytes too (one frame of a whole 64 MiB message was one message of the rate).
        if h.total as usize > self.max_message || body.len() > MAX_CHUNK {
            self.partial.remove(&h.id);
            return Err(FrameError::TooLarge);
        }
        if h.index == 0 {
            if self.partial.remove(&h.id).is_some() {
                // A restarted id abandons the older partial message.
                self.count(FrameError::Inconsistent, 1);
            }
            self.evict_for_new(h.total as usize);
            let p = Partial {
                next: 0,
                count: h.count,
                total: h.total,
                crc: h.crc,
                // Grown as chunks come, never past the declared size (`push` below).
                data: Vec::new(),
                touched_ms: now_ms,
                touched_seq: 0,
            };
            self.partial.insert(h.id, p);
        }
        self.seq += 1;
        let seq = self.seq;
        let Some(p) = self.partial.get_mut(&h.id) else {
            return Err(FrameError::Inconsistent);
        };
        let fits = p.data.len() + body.len() <= p.total as usize;
        if h.index != p.next || h.count != p.count || h.total != p.total || h.crc != p.crc || !fits
        {
            self.partial.remove(&h.id);
            return Err(FrameError::Inconsistent);
        }
        // Doubling, but never past the declared size (already counted against what
        // partial messages may hold, `evict_for_new`): left to itself the buffer would
        // double past it, up to twice the bytes counted; reserved whole at the first
        // chunk, one small frame would take the whole size.
        let need = p.data.len() + body.len();
        if need > p.data.capacity() {
            let target = (p.data.capacity() * 2).max(need).min(p.total as usize);
            p.data.reserve_exact(target - p.data.len());
        }
        p.data.extend_from_slice(body);
        p.next += 1;
        p.touched_ms = now_ms;
        p.touched_seq = seq;
        if p.next < p.count {
            return Ok(None);
        }
        let Some(p) = self.partial.remove(&h.id) else {
            return Err(FrameError::Inconsistent);
        };
        if p.data.len() != p.total as usize {
            return Err(FrameError::Inconsistent);
        }
        if Crc32::of(&p.data) != p.crc {
            return Err(FrameError::Checksum);
        }
        self.delivered += 1;
        Ok(Some(p.data))
    }
}

/// Above this many bytes buffered in the channel, stop sending until it drains.
/// (Chromium closes a data channel whose send buffer passes 16 MiB.)
pub const HIGH_WATER: usize = 1 << 20;
/// The buffered-amount-low threshold to set on the channel: resume below this.
pub const LOW_WATER: usize = 256 << 10;

/// Why a message could not be queued.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum QueueError {
    /// Queuing it would exceed the queue's byte bound; try again after it drains.
    #[error("send queue full")]
    Full,
    /// Larger than the channel's peer accepts.
    #[error("message larger than the limit")]
    TooLarge,
}

/// A bounded queue of outgoing frames for one channel.
pub struct SendQueue {
    frames: VecDeque<Vec<u8>>,
    queued: usize,
    max_queued: usize,
    max_message: usize,
    chunk: usize,
    next_id: u32,
}

impl SendQueue {
    /// A queue holding at most `max_queued` bytes, splitting messages of at most
    /// `max_message` bytes into `chunk`-byte chunks.
    pub fn new(chunk: usize, max_message: usize, max_queued: usize) -> Self {
        assert!((1..=MAX_CHUNK).contains(&chunk), "chunk size out of range");
        Self {
            frames: VecDeque::new(),
            queued: 0,
            max_queued,
            max_message,
            chunk,
            next_id: 0,
        }
    }

    /// Splits and queues a message, or refuses it whole.
    pub fn push(&mut self, msg: &[u8]) -> Result<(), QueueError> {
        if msg.len() > self.max_message {
            return Err(QueueError::TooLarge);
        }
        let framed = framed_len(msg.len(), self.chunk);
        if self.queued + framed > self.max_queued {
            return Err(QueueError::Full);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.frames.extend(split(id, msg, self.chunk));
        self.queued += framed;
        Ok(())
    }

    /// The next frame to send, if the channel has room (`buffered` is its
    /// `bufferedAmount`); `None` means: wait for buffered-amount-low (or for more data).
    pub fn next_frame(&mut self, buffered: usize) -> Option<Vec<u8>> {
        if buffered >= HIGH_WATER {
            return None;
        }
        let f = self.frames.pop_front()?;
        self.queued -= f.len();
        Some(f)
    }

    /// Bytes waiting.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn message(len: usize, seed: u64) -> Vec<u8> {
        let mut r = SplitMix64::new(seed);
        (0..len).map(|_| r.next_u64() as u8).collect()
    }

    fn deliver(r: &mut Reassembler, frames: impl IntoIterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
        frames
            .into_iter()
            .filter_map(|f| r.push(&f, 0).ok().flatten())
            .collect()
    }

    /// A reassembled message holds about its own size, not twice it: its buffer is
    /// its declared size from the first chunk (what the limits count), not grown.
    #[test]
    fn a_reassembled_message_holds_no_more_than_its_size() {
        let m = message(DEFAULT_CHUNK * 64 + 1, 3);
        let mut r = Reassembler::new(2 << 20, 4);
        let got = deliver(&mut r, split(1, &m, DEFAULT_CHUNK));
        assert_eq!(got, std::slice::from_ref(&m));
        assert!(
            got[0].capacity() <= m.len() + MAX_CHUNK,
            "{}",
            got[0].capacity()
        );
        // Nor does its first small frame take its whole declared size.
        let mut frames = split(2, &m, DEFAULT_CHUNK);
        let first = frames.next().expect("a frame");
        assert_eq!(r.push(&first, 0), Ok(None));
        let held = r.partial.values().map(|p| p.data.capacity()).sum::<usize>();
        assert!(held <= 2 * DEFAULT_CHUNK, "{held}");
    }

    #[test]
    fn a_chunk_longer_than_max_chunk_is_refused() {
        let mut r = Reassembler::new(4 * MAX_CHUNK, 4);
        let m = message(MAX_CHUNK + 1, 5);
        // One frame for the whole message (`split` refuses to make it).
        let mut f = b"SH\x01\x00".to_vec();
        for v in [1, 0, 1, m.len() as u32, Crc32::of(&m)] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&m);
        assert_eq!(r.push(&f, 0), Err(FrameError::TooLarge));
        assert_eq!(r.dropped(FrameError::TooLarge), 1);
        // The same message in chunks of the limit passes.
        assert_eq!(deliver(&mut r, split(2, &m, MAX_CHUNK)), vec![m]);
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(Crc32::of(b"123456789"), 0xCBF4_3926);
        // The eight-bytes-at-a-time path agrees with a bit-by-bit CRC at every length and
        // however the input is cut into updates.
        let bitwise = |bytes: &[u8]| {
            let mut c = 0xFFFF_FFFFu32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            c ^ 0xFFFF_FFFF
        };
        let m = message(300, 9);
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 299, 300] {
            assert_eq!(Crc32::of(&m[..len]), bitwise(&m[..len]), "length {len}");
            for cut in [0, 1, 3, 8, len / 2] {
                let cut = cut.min(len);
                let mut c = Crc32::default();
                c.update(&m[..cut]);
                c.update(&m[cut..len]);
                assert_eq!(c.finish(), bitwise(&m[..len]), "length {len} cut {cut}");
            }
        }
    }

    #[test]
    fn round_trips_messages_of_every_awkward_size() {
        for len in [
            0,
            1,
            100,
            DEFAULT_CHUNK - 1,
            DEFAULT_CHUNK,
            DEFAULT_CHUNK + 1,
            3 * DEFAULT_CHUNK,
            1 << 20,
        ] {
            let msg = message(len, len as u64);
            let mut r = Reassembler::new(2 << 20, 4);
            let got = deliver(&mut r, split(7, &msg, DEFAULT_CHUNK));
            assert_eq!(got, vec![msg], "length {len}");
        }
    }

    #[test]
    fn interleaved_messages_reassemble_independently() {
        let (a, b) = (message(50_000, 1), message(40_000, 2));
        let fa: Vec<_> = split(1, &a, 4096).collect();
        let fb: Vec<_> = split(2, &b, 4096).collect();
        let mut mixed = Vec::new();
        for i in 0..fa.len().max(fb.len()) {
            mixed.extend(fa.get(i).cloned());
            mixed.extend(fb.get(i).cloned());
        }
        let mut r = Reassembler::new(1 << 20, 4);
        // b has fewer chunks, so it completes first.
        assert_eq!(deliver(&mut r, mixed), vec![b, a]);
    }

    #[test]
    fn a_corrupted_chunk_drops_that_message_only() {
        let (a, b) = (message(70_000, 3), message(9_000, 4));
        let mut frames: Vec<_> = split(1, &a, DEFAULT_CHUNK).collect();
        frames[2][HEADER + 5] ^= 0x40;
        frames.extend(split(2, &b, DEFAULT_CHUNK));
        let mut r = Reassembler::new(1 << 20, 4);
        assert_eq!(deliver(&mut r, frames), vec![b]);
        assert_eq!(r.dropped(FrameError::Checksum), 1);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn truncated_missing_or_reordered_chunks_are_counted_not_fatal() {
        let a = message(40_000, 5);
        let mut r = Reassembler::new(1 << 20, 4);
        assert_eq!(r.push(&[1, 2, 3], 0), Err(FrameError::Truncated));
        assert_eq!(r.push(&[0u8; 30], 0), Err(FrameError::BadMagic));
        let frames: Vec<_> = split(9, &a, DEFAULT_CHUNK).collect();
        r.push(&frames[0], 0).expect("first chunk");
        assert_eq!(
            r.push(&frames[2], 0),
            Err(FrameError::Inconsistent),
            "chunk 1 skipped"
        );
        assert_eq!(
            r.push(&frames[1], 0),
            Err(FrameError::Inconsistent),
            "message already dropped"
        );
        let mut short = frames[2].clone();
        short.truncate(HEADER + 10);
        let again: Vec<_> = split(10, &a, DEFAULT_CHUNK).collect();
        let mut tail_cut = again.clone();
        tail_cut[2].truncate(HEADER + 10);
        assert_eq!(deliver(&mut r, tail_cut), Vec::<Vec<u8>>::new());
        assert_eq!(deliver(&mut r, again), vec![a]);
        assert!(r.dropped(FrameError::Inconsistent) >= 3);
    }

    #[test]
    fn oversized_messages_are_refused_up_front() {
        let mut r = Reassembler::new(1000, 2);
        let big = message(5000, 6);
        let first = split(1, &big, 512).next().expect("a frame");
        assert_eq!(r.push(&first, 0), Err(FrameError::TooLarge));
        assert_eq!(r.buffered(), 0);
        assert_eq!(r.in_flight(), 0);
    }

    /// The first chunk of a message, which opens a slot and never completes it.
    fn opening(id: u32, len: usize) -> Vec<u8> {
        split(id, &message(len, u64::from(id)), 100)
            .next()
            .expect("a frame")
    }

    #[test]
    fn a_sender_that_never_finishes_its_messages_cannot_wedge_the_channel() {
        let mut r = Reassembler::new(1 << 20, 4);
        for id in 0..4 {
            assert_eq!(r.push(&opening(id, 900), 0), Ok(None));
        }
        assert_eq!(r.in_flight(), 4, "every slot taken");
        // Later messages still get through, in the same instant and without any timer.
        for id in 10..20 {
            let m = message(2000, u64::from(id));
            assert_eq!(deliver(&mut r, split(id, &m, 300)), vec![m], "message {id}");
        }
        // One stuck message made room; the other three wait out their time.
        assert_eq!(r.dropped(FrameError::Evicted), 1);
        assert_eq!(r.in_flight(), 3);
        assert_eq!(r.expire(PARTIAL_EXPIRY_MS), 3);
        assert_eq!(r.dropped(FrameError::Expired), 3);
        assert_eq!(r.in_flight(), 0);
        assert_eq!(r.dropped_total(), 4, "every unfinished message is counted");
    }

    #[test]
    fn a_partial_message_that_stops_progressing_expires_and_is_counted() {
        let mut r = Reassembler::new(1 << 20, 4);
        let stuck: Vec<_> = split(1, &message(900, 1), 100).collect();
        r.push(&stuck[0], 1_000).expect("first chunk");
        r.push(&stuck[1], 2_000).expect("second chunk");
        // Not yet: the clock counts from its last progress.
        assert_eq!(r.expire(2_000 + PARTIAL_EXPIRY_MS - 1), 0);
        assert_eq!(r.in_flight(), 1);
        // Any frame (here another whole message) at the expiry drops it.
        let other = message(10, 2);
        let at = 2_000 + PARTIAL_EXPIRY_MS;
        let frame = split(2, &other, 100).next().expect("frame");
        assert_eq!(r.push(&frame, at), Ok(Some(other)));
        assert_eq!(r.in_flight(), 0);
        assert_eq!(r.buffered(), 0);
        assert_eq!(r.dropped(FrameError::Expired), 1);
        // Its late chunks belong to nothing now.
        assert_eq!(r.push(&stuck[2], at + 1), Err(FrameError::Inconsistent));
        // A slow message that keeps making progress never expires.
        let slow = message(500, 3);
        let mut got = None;
        for (i, f) in split(3, &slow, 100).enumerate() {
            let now = at + (i as u64 + 1) * (PARTIAL_EXPIRY_MS - 1);
            got = r.push(&f, now).expect("in time").or(got);
        }
        assert_eq!(got, Some(slow));
        assert_eq!(r.dropped(FrameError::Expired), 1);
    }

    #[test]
    fn a_new_message_evicts_the_partial_that_progressed_least_recently() {
        let mut r = Reassembler::new(1 << 20, 2);
        let (a, b, c) = (message(300, 1), message(300, 2), message(300, 3));
        let fa: Vec<_> = split(1, &a, 100).collect();
        let fb: Vec<_> = split(2, &b, 100).collect();
        let fc: Vec<_> = split(3, &c, 100).collect();
        r.push(&fa[0], 0).expect("a starts");
        r.push(&fb[0], 0).expect("b starts");
        r.push(&fa[1], 0)
            .expect("a progresses, so b is now the older");
        assert_eq!(r.push(&fc[0], 0), Ok(None), "c is taken, not refused");
        assert_eq!(r.dropped(FrameError::Evicted), 1);
        assert_eq!(
            r.push(&fb[1], 0),
            Err(FrameError::Inconsistent),
            "b was evicted"
        );
        assert_eq!(deliver(&mut r, [fa[2].clone()]), vec![a]);
        assert_eq!(deliver(&mut r, fc[1..].iter().cloned()), vec![c]);
        assert_eq!(FrameError::ALL.len(), 7);
        assert!(FrameError::ALL.contains(&FrameError::Evicted));
        assert!(FrameError::ALL.contains(&FrameError::Expired));
    }

    #[test]
    fn random_garbage_never_panics_and_never_delivers() {
        let mut rng = SplitMix64::new(11);
        let mut r = Reassembler::new(1 << 16, 4);
        let valid: Vec<_> = split(3, &message(30_000, 8), 1000).collect();
        for round in 0..5000 {
            let mut f = valid[rng.below(valid.len())].clone();
            let flips = 1 + rng.below(4);
            for _ in 0..flips {
                let i = rng.below(f.len());
                f[i] ^= 1 << rng.below(8);
            }
            if round % 7 == 0 {
                f.truncate(rng.below(f.len() + 1));
            }
            if let Ok(Some(m)) = r.push(&f, 0) {
                panic!("delivered a corrupted message of {} bytes", m.len());
            }
        }
        assert!(r.buffered() <= 1 << 16);
    }

    #[test]
    fn partial_messages_together_hold_at_most_the_largest_message() {
        // Three 400-byte messages fit four slots but not a 1,000-byte limit together:
        // the third evicts the one that progressed least recently.
        let mut r = Reassembler::new(1000, 4);
        let (a, b, c) = (message(400, 1), message(400, 2), message(400, 3));
        let fa: Vec<_> = split(1, &a, 100).collect();
        let fb: Vec<_> = split(2, &b, 100).collect();
        let fc: Vec<_> = split(3, &c, 100).collect();
        r.push(&fa[0], 0).expect("a starts");
        r.push(&fb[0], 0).expect("b starts");
        assert_eq!(r.dropped(FrameError::Evicted), 0, "800 bytes fit");
        r.push(&fc[0], 0).expect("c starts");
        assert_eq!(r.dropped(FrameError::Evicted), 1);
        assert_eq!(r.push(&fa[1], 0), Err(FrameError::Inconsistent), "a went");
        assert_eq!(deliver(&mut r, fb[1..].iter().cloned()), vec![b]);
        assert_eq!(deliver(&mut r, fc[1..].iter().cloned()), vec![c]);
    }

    #[test]
    fn send_queue_is_bounded_and_respects_the_high_water_mark() {
        let mut q = SendQueue::new(1000, 1 << 20, 10_000);
        q.push(&message(5000, 1)).expect("fits");
        assert_eq!(q.push(&message(5000, 2)), Err(QueueError::Full));
        assert_eq!(q.push(&message(2 << 20, 3)), Err(QueueError::TooLarge));
        assert!(q.next_frame(HIGH_WATER).is_none(), "channel full: wait");
        let mut r = Reassembler::new(1 << 20, 1);
        let mut got = None;
        while let Some(f) = q.next_frame(0) {
            got = r.push(&f, 0).expect("valid").or(got);
        }
        assert_eq!(got, Some(message(5000, 1)));
        assert_eq!(q.queued(), 0);
        q.push(&message(5000, 2)).expect("room again");
    }
}

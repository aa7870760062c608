//! The receiving half of one neighbour's data channel, platform-neutral and sans-IO: both
//! transports feed it frames (with the time) and the channel's open event, and it decides
//! what to deliver, what to hold until the channel is announced, and when the neighbour
//! has sent so much broken traffic that it must be dropped.

use std::collections::VecDeque;

use shoal_shared::framing::{FrameError, Reassembler};
use shoal_shared::rate::Allowance;
use thiserror::Error;

/// A neighbour whose channel drops this many messages (corrupt, inconsistent, oversized,
/// never finished) within [`STRIKE_WINDOW_MS`] is disconnected.
pub const STRIKE_LIMIT: usize = 8;
/// The window over which [`STRIKE_LIMIT`] is counted.
pub const STRIKE_WINDOW_MS: u64 = 60_000;
/// Whole messages held while a channel is not yet announced as open; a neighbour that
/// sends more before its channel opens is dropped.
pub const MAX_EARLY_MESSAGES: usize = 64;
/// Messages a neighbour may send a second, sustained (an honest peer sends a few per
/// round: its update, a status, receipts, a ledger head, now and then a mix or a model).
pub const MESSAGE_RATE: u64 = 200;
/// Messages it may send at once beyond [`MESSAGE_RATE`]; one more is a flood, and the
/// neighbour is dropped.
pub const MESSAGE_BURST: u64 = 2_000;
/// What a frame that does not end a message costs of that allowance, in thousandths of
/// a message: a message cut into frames of a byte each must not cost its receiver a
/// frame's work per byte for one message's allowance (an honest 64 MiB message, 4,096
/// frames, costs 66 messages' worth).
pub const FRAME_COST: u64 = 16;

/// Why a neighbour's channel is given up.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    /// Too many of its messages were dropped within the window.
    #[error(
        "{dropped} messages dropped within {window_s} s (the last: {last})",
        window_s = STRIKE_WINDOW_MS / 1000
    )]
    Misbehaving {
        /// Messages dropped within the window.
        dropped: usize,
        /// Why the last of them was dropped.
        last: FrameError,
    },
    /// It sent messages faster than [`MESSAGE_RATE`] a second beyond a burst of
    /// [`MESSAGE_BURST`] (each costs its receiver work however small it is).
    #[error("more than {MESSAGE_BURST} messages beyond {MESSAGE_RATE} a second")]
    Flooding,
    /// It sent more bytes than its link takes (see
    /// [`link_bytes_for`](crate::swarm::link_bytes_for)).
    #[error("more than {per_s} bytes a second beyond a burst of {burst}")]
    TooManyBytes {
        /// The sustained rate.
        per_s: u64,
        /// The burst beyond it.
        burst: u64,
    },
    /// It sent more than can be held before its channel was announced.
    #[error(
        "more than {MAX_EARLY_MESSAGES} messages or {max_bytes} bytes before the channel opened"
    )]
    TooMuchTooEarly {
        /// The byte bound that was passed (or would have been).
        max_bytes: usize,
    },
    /// It sent a message that is no frame of Shoal's: text, or binary longer than a frame
    /// can be. No honest peer does; each such message was one strike of eight a minute,
    /// and a browser that accepts messages of up to a gigabyte (Firefox) downloaded and
    /// held seven such a minute, charged only the bytes it read of them.
    #[error("a message that is no frame: {}", match .0 {
        Some(len) => format!("{len} bytes, more than a frame"),
        None => "text".to_string(),
    })]
    NotAFrame(Option<usize>),
}

/// The longest data-channel message a frame can be: its header and one chunk.
pub const MAX_FRAME: usize = shoal_shared::framing::HEADER + shoal_shared::framing::MAX_CHUNK;

/// One channel's receiving side: reassembly, the strike count, and the messages that
/// arrived before the channel's open event.
///
/// A message never overtakes the announcement of its channel: what arrives before
/// [`on_open`](Self::on_open) is held and handed back by it, in order, for the transport
/// to deliver right after it reports the neighbour up.
pub struct InboundLink {
    rx: Reassembler,
    /// When each recent dropped message was noticed (at most [`STRIKE_LIMIT`], oldest
    /// first).
    strikes: VecDeque<u64>,
    /// Per-reason drop counts already turned into strikes, in [`FrameError::ALL`] order.
    counted: [u64; FrameError::ALL.len()],
    open: bool,
    early: Vec<Vec<u8>>,
    early_bytes: usize,
    max_early_bytes: usize,
    /// Set once an error was returned: the neighbour is being dropped, and what it still
    /// sends is ignored.
    failed: bool,
    /// Messages it may still send now, in thousandths ([`MESSAGE_RATE`] a second
    /// refilled, up to [`MESSAGE_BURST`]), and when they were counted.
    allowance: (u64, u64),
    /// Bytes it may still send now, refilled at the rate up to the burst, when they were
    /// counted, the rate (a millisecond) and the burst; `None`: not bounded in bytes.
    bytes: Option<Allowance>,
}

impl InboundLink {
    /// Accepts messages of up to `max_message` bytes, `max_in_flight` partially received
    /// at a time; holds at most `max_message` bytes before the channel opens.
    pub fn new(max_message: usize, max_in_flight: usize) -> Self {
        Self {
            rx: Reassembler::new(max_message, max_in_flight),
            strikes: VecDeque::with_capacity(STRIKE_LIMIT),
            counted: [0; FrameError::ALL.len()],
            open: false,
            early: Vec::new(),
            early_bytes: 0,
            max_early_bytes: max_message,
            failed: false,
            allowance: (MESSAGE_BURST * 1000, 0),
            bytes: None,
        }
    }

    /// Takes at most `rate` bytes a millisecond, sustained, beyond a `burst` (see
    /// [`link_bytes_for`](crate::swarm::link_bytes_for)); frames past that drop the
    /// neighbour, whatever they carry.
    pub fn limit_bytes(&mut self, rate: f64, burst: f64) {
        self.bytes = Some(Allowance::new(rate, burst));
    }

    /// Whether [`on_open`](Self::on_open) has run.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Bytes held in partially received messages.
    pub fn buffered(&self) -> usize {
        self.rx.buffered()
    }

    /// Messages dropped so far, for any reason.
    pub fn dropped(&self) -> u64 {
        self.rx.dropped_total()
    }

    /// The channel opened: returns the messages that arrived before, in order, to be
    /// delivered right after the neighbour is reported up (empty on a repeated call).
    pub fn on_open(&mut self) -> Vec<Vec<u8>> {
        self.open = true;
        self.early_bytes = 0;
        std::mem::take(&mut self.early)
    }

    /// Takes one frame received at `now_ms` (any monotonic milliseconds). Returns a whole
    /// message to deliver now, `None` when there is none yet (or it is held until the
    /// channel opens), or the reason to drop this neighbour (once: after that, frames are
    /// ignored while the transport tears the connection down).
    pub fn on_frame(&mut self, frame: &[u8], now_ms: u64) -> Result<Option<Vec<u8>>, LinkError> {
        self.on_message(frame, Some(frame.len()), now_ms)
    }

    /// [`on_frame`](Self::on_frame) for a data-channel message of `sent` bytes (`None`:
    /// text) of which the transport read `frame`: a browser hands on no more than a
    /// frame's bytes of a longer message. A message longer than [`MAX_FRAME`], or text,
    /// drops the neighbour at once; the bytes charged are those sent.
    pub fn on_message(
        &mut self,
        frame: &[u8],
        sent: Option<usize>,
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, LinkError> {
        if self.failed {
            return Ok(None);
        }
        let len = match sent {
            Some(len) if len <= MAX_FRAME => len.max(frame.len()),
            _ => {
                self.failed = true;
                return Err(LinkError::NotAFrame(sent));
            }
        };
        if let Err(e) = self.charge_bytes(len, now_ms) {
            self.failed = true;
            return Err(e);
        }
        let result = self.rx.push(frame, now_ms);
        let verdict = self.judge(result, now_ms);
        self.failed = verdict.is_err();
        verdict
    }

    fn judge(
        &mut self,
        result: Result<Option<Vec<u8>>, FrameError>,
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, LinkError> {
        self.count_strikes(now_ms)?;
        let (left, at) = self.allowance;
        let left = (left + now_ms.saturating_sub(at) * MESSAGE_RATE).min(MESSAGE_BURST * 1000);
        // A whole message costs 1000; a frame that does not end one, `FRAME_COST`.
        let cost = if matches!(result, Ok(Some(_))) {
            1000
        } else {
            FRAME_COST
        };
        if left < cost {
            return Err(LinkError::Flooding);
        }
        self.allowance = (left - cost, now_ms.max(at));
        let Ok(Some(message)) = result else {
            return Ok(None);
        };
        if self.open {
            return Ok(Some(message));
        }
        self.early_bytes += message.len();
        if self.early.len() >= MAX_EARLY_MESSAGES || self.early_bytes > self.max_early_bytes {
            return Err(LinkError::TooMuchTooEarly {
                max_bytes: self.max_early_bytes,
            });
        }
        self.early.push(message);
        Ok(None)
    }

    fn charge_bytes(&mut self, len: usize, now_ms: u64) -> Result<(), LinkError> {
        let Some(b) = &mut self.bytes else {
            return Ok(());
        };
        if b.take(len as f64, now_ms as f64) {
            return Ok(());
        }
        Err(LinkError::TooManyBytes {
            per_s: (b.rate() * 1000.0) as u64,
            burst: b.burst() as u64,
        })
    }

    /// From a timer: drops the partial messages that got no frame for
    /// [`PARTIAL_EXPIRY_MS`](shoal_shared::framing::PARTIAL_EXPIRY_MS) (a neighbour that
    /// sends all of a message but its last frame and then nothing else is otherwise never
    /// judged), each a strike. Returns the reason to drop the neighbour, once, as
    /// [`on_frame`](Self::on_frame) does.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), LinkError> {
        if self.failed {
            return Ok(());
        }
        self.rx.expire(now_ms);
        let verdict = self.count_strikes(now_ms);
        self.failed = verdict.is_err();
        verdict
    }

    /// When [`tick`](Self::tick) next has a partial message to expire.
    pub fn next_expiry(&self) -> Option<u64> {
        self.rx.next_expiry().filter(|_| !self.failed)
    }

    /// Turns messages the reassembler dropped since the last call into strikes.
    fn count_strikes(&mut self, now_ms: u64) -> Result<(), LinkError> {
        let mut last = None;
        for (i, reason) in FrameError::ALL.into_iter().enumerate() {
            let total = self.rx.dropped(reason);
            for _ in self.counted[i]..total {
                if self.strikes.len() == STRIKE_LIMIT {
                    self.strikes.pop_front();
                }
                self.strikes.push_back(now_ms);
                last = Some(reason);
            }
            self.counted[i] = total;
        }
        while self
            .strikes
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) >= STRIKE_WINDOW_MS)
        {
            self.strikes.pop_front();
        }
        match last {
            Some(last) if self.strikes.len() >= STRIKE_LIMIT => Err(LinkError::Misbehaving {
                dropped: self.strikes.len(),
                last,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use shoal_shared::framing::{PARTIAL_EXPIRY_MS, split};

    /// A message that is no frame (text, or binary longer than a frame can be) drops its
    /// neighbour at once: each was one strike of eight a minute, and a browser (Firefox
    /// takes messages of up to a gigabyte) downloaded seven such a minute, charged only
    /// the bytes it read of them.
    #[test]
    fn a_message_that_is_no_frame_drops_its_neighbour_at_once() {
        for sent in [None, Some(MAX_FRAME + 1), Some(1 << 30)] {
            let mut link = InboundLink::new(1 << 20, 4);
            let _ = link.on_open();
            assert!(
                matches!(link.on_message(&[], sent, 0), Err(LinkError::NotAFrame(s)) if s == sent),
                "{sent:?}"
            );
            // Then it is ignored while the transport tears the connection down.
            assert_eq!(link.on_message(&[], sent, 1).ok(), Some(None));
        }
    }

    use super::*;

    fn frames(id: u32, len: usize) -> Vec<Vec<u8>> {
        let msg: Vec<u8> = (0..len).map(|i| (i * 7 + id as usize) as u8).collect();
        split(id, &msg, 100).collect()
    }

    fn opened() -> InboundLink {
        let mut link = InboundLink::new(1 << 20, 4);
        assert!(link.on_open().is_empty());
        link
    }

    #[test]
    fn a_neighbour_flooding_small_messages_is_dropped_past_its_burst() {
        let mut link = opened();
        let one = frames(1, 5);
        // An honest pace (here 150 a second for a minute) goes through.
        for i in 0..9_000u64 {
            assert!(matches!(
                link.on_frame(&one[0], i * 1000 / 150),
                Ok(Some(_))
            ));
        }
        // A burst of 2,000 at once too, then one more is a flood.
        let now = 61_000;
        for _ in 0..MESSAGE_BURST {
            assert!(matches!(link.on_frame(&one[0], now), Ok(Some(_))));
        }
        assert_eq!(link.on_frame(&one[0], now), Err(LinkError::Flooding));
        assert_eq!(
            link.on_frame(&one[0], now + 60_000),
            Ok(None),
            "ignored since"
        );
        // A link that waited gets its allowance back at 200 a second.
        let mut link = opened();
        for _ in 0..MESSAGE_BURST {
            assert!(matches!(link.on_frame(&one[0], 0), Ok(Some(_))));
        }
        for _ in 0..200 {
            assert!(matches!(link.on_frame(&one[0], 1000), Ok(Some(_))));
        }
        assert_eq!(link.on_frame(&one[0], 1000), Err(LinkError::Flooding));
    }

    /// A message cut into frames of a byte each costs its frames: sent at once, it is a
    /// flood (each frame is a receiver's work, however few messages it makes).
    #[test]
    fn a_message_cut_into_tiny_frames_is_a_flood() {
        let mut link = InboundLink::new(1 << 20, 4);
        assert!(link.on_open().is_empty());
        let msg = vec![7u8; 200_000];
        let mut verdict = Ok(None);
        for f in split(0, &msg, 1) {
            verdict = link.on_frame(&f, 0);
            if verdict.is_err() {
                break;
            }
        }
        assert_eq!(verdict, Err(LinkError::Flooding));
        // Honest frames of 16 KiB: a 1 MiB message is one message's allowance and a
        // little more.
        let mut link = opened();
        let big = vec![7u8; 1 << 20];
        let got: Vec<_> = split(0, &big, shoal_shared::framing::DEFAULT_CHUNK)
            .filter_map(|f| link.on_frame(&f, 0).expect("no flood"))
            .collect();
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn messages_before_the_open_event_are_held_then_handed_back_in_order() {
        let mut link = InboundLink::new(1 << 20, 4);
        let (a, b) = (frames(1, 250), frames(2, 30));
        for f in a.iter().chain(&b) {
            assert_eq!(link.on_frame(f, 0), Ok(None), "nothing before the open");
        }
        let held = link.on_open();
        assert_eq!(held.len(), 2);
        assert_eq!(
            (held[0].len(), held[1].len()),
            (250, 30),
            "in arrival order"
        );
        assert!(link.on_open().is_empty(), "handed back once");
        let c = frames(3, 10);
        assert_eq!(
            link.on_frame(&c[0], 0).map(|m| m.map(|m| m.len())),
            Ok(Some(10))
        );
    }

    #[test]
    fn a_flood_before_the_open_event_drops_the_neighbour() {
        let mut link = InboundLink::new(1 << 20, 4);
        for id in 0..MAX_EARLY_MESSAGES as u32 {
            assert_eq!(link.on_frame(&frames(id, 5)[0], 0), Ok(None));
        }
        assert!(matches!(
            link.on_frame(&frames(99, 5)[0], 0),
            Err(LinkError::TooMuchTooEarly { .. })
        ));
    }

    #[test]
    fn a_neighbour_that_keeps_sending_broken_messages_is_dropped() {
        let mut link = opened();
        let mut broken = frames(1, 50)[0].clone();
        broken[30] ^= 1;
        for i in 0..STRIKE_LIMIT - 1 {
            assert_eq!(link.on_frame(&broken, i as u64), Ok(None), "strike {i}");
        }
        // Good messages in between neither heal nor hurt.
        assert!(
            link.on_frame(&frames(2, 50)[0], 10)
                .expect("fine")
                .is_some()
        );
        assert_eq!(
            link.on_frame(&broken, 20),
            Err(LinkError::Misbehaving {
                dropped: STRIKE_LIMIT,
                last: FrameError::Checksum
            })
        );
        // Reported once; what it sends while it is being dropped is ignored.
        assert_eq!(link.on_frame(&broken, 21), Ok(None));
        assert_eq!(link.on_frame(&frames(3, 50)[0], 22), Ok(None));
    }

    #[test]
    fn strikes_older_than_the_window_are_forgotten() {
        let mut link = opened();
        let mut broken = frames(1, 50)[0].clone();
        broken[30] ^= 1;
        for round in 0..5u64 {
            for i in 0..STRIKE_LIMIT as u64 - 1 {
                let now = round * STRIKE_WINDOW_MS + i;
                assert_eq!(link.on_frame(&broken, now), Ok(None), "round {round}");
            }
        }
        assert_eq!(link.dropped(), 5 * (STRIKE_LIMIT as u64 - 1));
    }

    #[test]
    fn messages_that_are_started_and_never_finished_count_as_strikes() {
        let mut link = opened();
        // Each new message evicts an unfinished one once the four slots are taken, and
        // whatever is left expires: a neighbour that only ever starts messages is dropped.
        let mut outcome = Ok(None);
        for id in 0..(4 + STRIKE_LIMIT) as u32 {
            outcome = link.on_frame(&frames(id, 500)[0], 0);
            if outcome.is_err() {
                break;
            }
        }
        assert_eq!(
            outcome,
            Err(LinkError::Misbehaving {
                dropped: STRIKE_LIMIT,
                last: FrameError::Evicted
            })
        );
        let mut slow = opened();
        for id in 0..4 {
            assert_eq!(slow.on_frame(&frames(id, 500)[0], 0), Ok(None));
        }
        let late = slow.on_frame(&frames(9, 5)[0], PARTIAL_EXPIRY_MS);
        assert_eq!(late.map(|m| m.map(|m| m.len())), Ok(Some(5)));
        assert_eq!(slow.dropped(), 4, "the four expired, below the limit");
    }

    /// A neighbour that sends more bytes than its link takes is dropped, whatever the
    /// bytes are: junk messages just within the demo task's largest, as fast as the
    /// channel goes, passed the message rate (200 of 900 KB a second) for as long as the
    /// neighbour stayed. An honest neighbour's pace, its budget's updates and answers
    /// after a burst of models, is never cut.
    #[test]
    fn a_neighbour_sending_more_bytes_than_its_budget_allows_is_dropped() {
        let params = 109_386;
        let max = crate::swarm::max_message_for(params);
        let (rate, burst) = crate::swarm::link_bytes_for(params, 80).expect("a budget");
        let budget = 80e6 / 3.6e6;
        let answers = shoal_shared::learn::peer::answer_bytes_per_ms(params, Some(budget));
        let chunked = |id: u32, len: usize| -> Vec<Vec<u8>> {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + id as usize) as u8).collect();
            split(id, &msg, shoal_shared::framing::DEFAULT_CHUNK).collect()
        };
        let limited = || {
            let mut link = InboundLink::new(max, 4);
            link.limit_bytes(rate, burst);
            assert!(link.on_open().is_empty());
            link
        };
        // Honest: three whole models at once, then its budget's rate of updates and
        // answers for ten minutes, in messages of 20 KB.
        let mut honest = limited();
        let mut id = 0;
        for _ in 0..3 {
            id += 1;
            for f in chunked(id, max) {
                assert!(honest.on_frame(&f, 0).is_ok(), "a burst of models");
            }
        }
        let every = (20_000.0 / (budget + answers)) as u64;
        for t in (every..600_000).step_by(every as usize) {
            id += 1;
            for f in chunked(id, 20_000) {
                assert!(honest.on_frame(&f, t).is_ok(), "at {t} ms");
            }
        }
        // A flood of 900 KB junk messages, 200 a second: dropped within its burst and
        // the first second's rate.
        let mut flood = limited();
        let junk = chunked(1, 900_000);
        let mut taken = 0usize;
        let mut verdict = Ok(None);
        'sent: for i in 0..2_000u64 {
            for f in &junk {
                verdict = flood.on_frame(f, i * 5);
                if verdict.is_err() {
                    break 'sent;
                }
                taken += f.len();
            }
        }
        assert!(
            matches!(verdict, Err(LinkError::TooManyBytes { .. })),
            "{verdict:?}"
        );
        assert!(taken as f64 <= burst + 1000.0 * rate, "took {taken} bytes");
        assert_eq!(flood.on_frame(&junk[0], 10_000), Ok(None), "ignored since");
        // Without a bound in bytes (a task without an upload budget), the same flood
        // passes, as before.
        let mut open = InboundLink::new(max, 4);
        assert!(open.on_open().is_empty());
        for i in 0..100u64 {
            for f in &junk {
                assert!(open.on_frame(f, i * 5).is_ok());
            }
        }
    }
}

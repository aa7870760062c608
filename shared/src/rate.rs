//! A token bucket on a caller's clock of milliseconds: what a sender may still send (a
//! count, or bytes), refilled at a rate up to a burst. The peer bounds each connection's
//! updates with it, and the transport each link's bytes.

/// A token bucket: starts full, refills at `rate` a millisecond up to `burst`.
#[derive(Clone, Copy, Debug)]
pub struct Allowance {
    left: f64,
    at: Option<f64>,
    rate: f64,
    burst: f64,
}

impl Allowance {
    /// A full bucket of `burst`, refilled at `rate` a millisecond.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            left: burst,
            at: None,
            rate,
            burst,
        }
    }

    /// Takes `amount` at `now_ms` if that much is left (a time before the last one
    /// counts as the last one); `false`, taking nothing, if not.
    pub fn take(&mut self, amount: f64, now_ms: f64) -> bool {
        if let Some(at) = self.at {
            self.left = (self.left + (now_ms - at).max(0.0) * self.rate).min(self.burst);
        }
        self.at = Some(self.at.map_or(now_ms, |at| at.max(now_ms)));
        if self.left < amount {
            return false;
        }
        self.left -= amount;
        true
    }

    /// The rate, a millisecond.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The burst.
    pub fn burst(&self) -> f64 {
        self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::Allowance;

    #[test]
    fn starts_full_refills_at_its_rate_and_never_past_its_burst() {
        let mut a = Allowance::new(0.01, 5.0);
        assert!(a.take(5.0, 0.0), "a full burst at once");
        assert!(!a.take(1.0, 0.0), "then nothing left");
        assert!(!a.take(1.0, 99.0), "0.99 refilled, short of 1");
        assert!(a.take(1.0, 100.0), "one a hundred milliseconds");
        // An hour idle refills the burst, no more.
        assert!(a.take(5.0, 3_600_100.0));
        assert!(!a.take(0.5, 3_600_100.0));
    }

    #[test]
    fn a_refused_take_takes_nothing_and_a_clock_going_back_refills_nothing() {
        let mut a = Allowance::new(0.01, 10.0);
        assert!(a.take(8.0, 1_000.0));
        assert!(!a.take(3.0, 1_000.0), "2 left");
        assert!(a.take(2.0, 1_000.0), "the refusal took nothing");
        // A time before the last counts as the last: going back and forth across the
        // same 100 ms refills it once.
        assert!(a.take(1.0, 1_100.0));
        assert!(!a.take(1.0, 900.0));
        assert!(!a.take(1.0, 1_100.0));
        assert!(a.take(1.0, 1_200.0));
    }
}

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

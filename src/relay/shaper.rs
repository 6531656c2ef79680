//! Rate shaping: a token bucket per client and direction. Shaping, not policing: when a
//! bucket is empty the pipe stops reading (the client's socket, or its TAP) until it refills,
//! so TCP slows down through backpressure or the kernel queue instead of collapsing under
//! drops. Time is passed in.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Bucket {
    /// Bytes per second.
    rate: u64,
    /// Most tokens saved up (bytes).
    burst: i64,
    /// May go negative: a frame is sent whole when the bucket is not empty, and the debt is
    /// paid before the next one.
    tokens: i64,
    last: Instant,
}

impl Bucket {
    /// Burst: 20 ms at the rate, at least two full-size Ethernet frames.
    pub fn new(rate: u64, now: Instant) -> Bucket {
        let burst = (rate / 50).max(2 * 1514) as i64;
        Bucket { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last);
        let add = (dt.as_nanos() * u128::from(self.rate) / 1_000_000_000) as i64;
        if add > 0 {
            self.tokens = (self.tokens + add).min(self.burst);
            // Advance by the time the added tokens stand for, so no fraction is lost.
            self.last += Duration::from_nanos((add as u128 * 1_000_000_000 / u128::from(self.rate)) as u64);
            if self.tokens == self.burst {
                self.last = now;
            }
        }
    }

    /// May a frame go now? If not, when to look again.
    pub fn check(&mut self, now: Instant) -> Result<(), Instant> {
        self.refill(now);
        if self.tokens > 0 {
            return Ok(());
        }
        let missing = (1 - self.tokens) as u128;
        Err(now + Duration::from_nanos((missing * 1_000_000_000 / u128::from(self.rate)) as u64 + 1))
    }

    pub fn take(&mut self, bytes: usize) {
        self.tokens -= bytes as i64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_run_rate_is_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1_250_000, t0); // 10 Mbit/s
        let (mut now, mut sent) = (t0, 0usize);
        while now < t0 + Duration::from_secs(10) {
            match b.check(now) {
                Ok(()) => {
                    b.take(1514);
                    sent += 1514;
                }
                Err(at) => now = at,
            }
        }
        let rate = sent as f64 / 10.0;
        assert!((rate - 1_250_000.0).abs() / 1_250_000.0 < 0.01, "{rate}");
    }

    #[test]
    fn wakes_when_refilled() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000, t0);
        b.take(b.burst as usize + 999);
        let at = b.check(t0).unwrap_err();
        assert!(b.check(at - Duration::from_millis(1)).is_err());
        assert!(b.check(at).is_ok());
    }
}

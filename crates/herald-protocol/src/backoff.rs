//! How every Herald client and server component waits before trying a connection
//! again: exponential bounds with **full jitter** (a uniformly random wait between 0 and
//! the bound), so that many parties that lost the same peer at the same moment (every
//! browser after a deploy, every node after a Redis restart) do not come back in
//! lockstep. The JS client follows the same rule (PROTOCOL.md, "Reconnecting").

use std::time::Duration;

/// The waits of one party's attempts, growing from `min` to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The bound of the first wait.
    min: Duration,
    /// The bound never grows past this.
    max: Duration,
    /// Failed attempts since the last success.
    attempt: u32,
}

impl Backoff {
    /// Bounds doubling from `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The bound for the next wait: `min(max, min * 2^attempts)`.
    pub fn bound(&self) -> Duration {
        self.max.min(
            self.min
                .saturating_mul(2u32.saturating_pow(self.attempt.min(30))),
        )
    }

    /// The next wait (uniform in `0..=bound`), and the bound grows.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.bound().mul_f64(fastrand::f64());
        self.attempt = self.attempt.saturating_add(1);
        wait
    }

    /// A success: the next wait is bounded by `min` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_jittered_below_a_doubling_bound() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let mut bounds = Vec::new();
        let mut waits = Vec::new();
        for _ in 0..8 {
            bounds.push(b.bound());
            waits.push(b.next_wait());
        }
        let ms: Vec<u128> = bounds.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert!(waits.iter().zip(&bounds).all(|(w, b)| w <= b));
        // Jittered: not every wait sits at its bound.
        assert!(waits.iter().zip(&bounds).any(|(w, b)| w < b));
        b.reset();
        assert_eq!(b.bound(), min);
    }
}

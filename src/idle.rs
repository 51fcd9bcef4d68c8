//! When a connection went idle, on `CLOCK_MONOTONIC_COARSE`: the kernel's last tick, read from
//! the vDSO page without reading the TSC.
//!
//! Idle stamps are taken on every request (a client connection answered, an upstream connection
//! given back to the pool, one taken from it) and only ever compared with timeouts of seconds,
//! so the coarse clock's resolution of a few milliseconds changes nothing, and each stamp is
//! cheaper than a read of the precise clock (eight of those per request were 1.3% of the hot
//! path's CPU in `bench/profile.sh`).

use std::time::Duration;

use rustix::time::ClockId;

/// A point on the coarse monotonic clock. Only differences between two of them mean anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdleSince(Duration);

impl IdleSince {
    pub fn now() -> Self {
        Self(crate::cluster::clock::read(ClockId::MonotonicCoarse))
    }

    /// How long from `self` to `later`; zero if `later` is earlier.
    pub fn until(self, later: IdleSince) -> Duration {
        later.0.saturating_sub(self.0)
    }

    /// How long it has been idle.
    pub fn elapsed(self) -> Duration {
        self.until(Self::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_moves_forward_with_the_precise_one() {
        let start = IdleSince::now();
        let precise = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        let idle = start.elapsed();
        // A tick or two of resolution either way (the kernel ticks every 1 to 10 ms).
        assert!(idle >= Duration::from_millis(30), "{idle:?}");
        assert!(
            idle <= precise.elapsed() + Duration::from_millis(20),
            "{idle:?}"
        );
        assert_eq!(IdleSince::now().until(start), Duration::ZERO);
    }
}

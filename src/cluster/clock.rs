//! The clock lease deadlines are kept on: `CLOCK_BOOTTIME`, which, unlike the monotonic clock
//! tokio's timers use, keeps counting while the machine is suspended. A replica that wakes from a
//! suspend or a SIGSTOP therefore sees at once that its leases have run out, before it forwards
//! anything.

use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};

/// `clock`'s time since its start, as a `Duration` (a vDSO call, no system call). Shared with
/// the idle stamps' coarse clock (`crate::idle`).
pub(crate) fn read(clock: ClockId) -> Duration {
    let now = clock_gettime(clock);
    // The kernel keeps tv_nsec in 0..1e9, and neither the boot-time nor the monotonic clock is
    // ever negative.
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// A point on the boot-time clock. Only differences between two of them mean anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// Now, on `CLOCK_BOOTTIME` (a vDSO call, no system call).
    pub fn now() -> Self {
        Self(read(ClockId::Boottime))
    }

    /// Nanoseconds since boot, for keeping an instant in an atomic.
    pub fn as_nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn checked_sub(self, duration: Duration) -> Option<Self> {
        self.0.checked_sub(duration).map(Self)
    }

    /// How long from `earlier` to `self`; zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = BootInstant;

    fn add(self, duration: Duration) -> BootInstant {
        BootInstant(self.0 + duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_moves_forward_with_the_monotonic_clock() {
        let before = BootInstant::now();
        let monotonic = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let elapsed = BootInstant::now().saturating_duration_since(before);
        assert!(elapsed >= Duration::from_millis(20), "{elapsed:?}");
        assert!(elapsed <= monotonic.elapsed() + Duration::from_millis(5));
        assert!(before + Duration::from_secs(1) > before);
        assert_eq!(
            before.saturating_duration_since(before + elapsed),
            Duration::ZERO
        );
    }
}

//! The metrics every forwarded request records, one shard per data-plane thread, summed when
//! the admin plane is scraped.
//!
//! Shared counters are cheap on one core and slow on several: each increment takes the counter's
//! cache line from the core that last wrote it, and prometheus-client's histogram takes a lock
//! on every observation. A thread here writes only its own shard (a cache line apart from the
//! others), so the hot path never contends; the scrape, which is rare, adds the shards up.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Shards: one for every thread that is not a data-plane thread, and one per data-plane thread
/// up to 63 (more threads share, which is still correct, only slower).
const SHARDS: usize = 64;

/// The upper bounds of the upstream latency buckets, in seconds: 0.5 ms doubling up to about
/// 16 s (upstream answers, from a local cache to a slow disk); a last bucket takes the rest.
const BOUNDS: [f64; 16] = {
    let mut bounds = [0.0005; 16];
    let mut i = 1;
    while i < bounds.len() {
        bounds[i] = bounds[i - 1] * 2.0;
        i += 1;
    }
    bounds
};

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread record into shard `index` (a data-plane thread's index plus one).
pub fn use_shard(index: usize) {
    SHARD.set(index % SHARDS);
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    /// Requests forwarded, unfenced and fenced.
    forwarded: [AtomicU64; 2],
    /// Upstream calls begun minus those ended here (a call may end on another shard; the sum is
    /// right).
    in_flight: AtomicI64,
    latency_buckets: [AtomicU64; BOUNDS.len() + 1],
    latency_nanos: AtomicU64,
}

/// The hot path's metrics.
#[derive(Debug)]
pub(super) struct Shards {
    shards: Box<[Shard]>,
}

impl Shards {
    pub(super) fn new() -> Self {
        Shards {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }

    fn mine(&self) -> &Shard {
        &self.shards[SHARD.get()]
    }

    pub(super) fn forwarded(&self, fenced: bool) {
        self.mine().forwarded[usize::from(fenced)].fetch_add(1, Relaxed);
    }

    pub(super) fn call_started(&self) {
        self.mine().in_flight.fetch_add(1, Relaxed);
    }

    pub(super) fn call_ended(&self, elapsed: Duration) {
        let shard = self.mine();
        shard.in_flight.fetch_sub(1, Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BOUNDS.len());
        shard.latency_buckets[bucket].fetch_add(1, Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        shard.latency_nanos.fetch_add(nanos, Relaxed);
    }

    fn sum(&self, field: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(field).fold(0, u64::wrapping_add)
    }

    pub(super) fn forwarded_total(&self, fenced: bool) -> u64 {
        self.sum(|shard| shard.forwarded[usize::from(fenced)].load(Relaxed))
    }

    pub(super) fn in_flight(&self) -> i64 {
        self.shards
            .iter()
            .map(|shard| shard.in_flight.load(Relaxed))
            .sum()
    }

    /// The latency histogram: sum in seconds, count, and the count of each bucket.
    fn latency(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = BOUNDS
            .iter()
            .chain([f64::INFINITY].iter())
            .map(|&bound| (bound, 0))
            .collect();
        for shard in self.shards.iter() {
            for (bucket, count) in buckets.iter_mut().zip(&shard.latency_buckets) {
                bucket.1 += count.load(Relaxed);
            }
        }
        let count = buckets.iter().map(|(_, count)| count).sum();
        let nanos = self.sum(|shard| shard.latency_nanos.load(Relaxed));
        (Duration::from_nanos(nanos).as_secs_f64(), count, buckets)
    }
}

/// `fencegate_requests_forwarded_total{fenced}`.
#[derive(Debug)]
pub(super) struct Forwarded(pub(super) std::sync::Arc<Shards>);

impl EncodeMetric for Forwarded {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (fenced, label) in [(true, "true"), (false, "false")] {
            let labels = [("fenced", label)];
            encoder
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&self.0.forwarded_total(fenced), None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// `fencegate_upstream_in_flight`.
#[derive(Debug)]
pub(super) struct InFlight(pub(super) std::sync::Arc<Shards>);

impl EncodeMetric for InFlight {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.in_flight())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// `fencegate_upstream_response_seconds`.
#[derive(Debug)]
pub(super) struct Latency(pub(super) std::sync::Arc<Shards>);

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.0.latency();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_writes_its_own_shard_and_the_scrape_adds_them_up() {
        let shards = std::sync::Arc::new(Shards::new());
        let threads: Vec<_> = (0..3)
            .map(|index| {
                let shards = std::sync::Arc::clone(&shards);
                std::thread::spawn(move || {
                    use_shard(index + 1);
                    for _ in 0..1000 {
                        shards.forwarded(true);
                        shards.call_started();
                        shards.call_ended(Duration::from_millis(3));
                    }
                    shards.forwarded(false);
                    shards.call_started();
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(shards.forwarded_total(true), 3000);
        assert_eq!(shards.forwarded_total(false), 3);
        assert_eq!(shards.in_flight(), 3);
        let written = shards
            .shards
            .iter()
            .filter(|s| s.forwarded[1].load(Relaxed) > 0);
        assert_eq!(written.count(), 3, "one shard per thread");
        let (sum, count, buckets) = shards.latency();
        assert_eq!(count, 3000);
        assert!((sum - 9.0).abs() < 1e-6, "{sum}");
        // 3 ms is above 2 ms and at most 4 ms: the fourth bucket.
        assert_eq!(buckets[3], (0.004, 3000));
        assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
    }

    #[test]
    fn a_call_that_ends_on_another_thread_still_sums_to_zero() {
        let shards = std::sync::Arc::new(Shards::new());
        use_shard(5);
        shards.call_started();
        let other = std::sync::Arc::clone(&shards);
        std::thread::spawn(move || {
            use_shard(6);
            other.call_ended(Duration::from_secs(100));
        })
        .join()
        .unwrap();
        assert_eq!(shards.in_flight(), 0);
        let (_, count, buckets) = shards.latency();
        assert_eq!(count, 1);
        assert_eq!(
            buckets.last().unwrap().1,
            1,
            "beyond every bound: the last bucket"
        );
    }
}

//! Latency of every operation, in an HDR histogram per operation and size class, readable by
//! benchmarks and by the engine's metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latency summary of one operation and size class.
#[derive(Clone, Debug, PartialEq)]
pub struct OpLatency {
    /// The operation: "all_reduce", "broadcast", ...
    pub op: &'static str,
    /// Size class: the smallest power of two ≥ the operation's bytes (per rank).
    pub size_class: u64,
    /// Operations recorded.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Slowest, µs.
    pub max_us: f64,
}

/// Histograms per (operation, size class).
#[derive(Debug, Default)]
pub struct Stats {
    hist: BTreeMap<(&'static str, u64), Histogram<u64>>,
}

impl Stats {
    /// Records one operation of `bytes` that took `took`.
    pub fn record(&mut self, op: &'static str, bytes: usize, took: Duration) {
        let class = (bytes as u64).max(1).next_power_of_two();
        let hist = self.hist.entry((op, class)).or_insert_with(|| {
            Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
        });
        let ns = took.as_nanos().clamp(1, 3_600_000_000_000) as u64;
        // Within bounds by the clamp above, so recording cannot fail.
        let _ = hist.record(ns);
    }

    /// A summary per (operation, size class), sorted.
    pub fn summary(&self) -> Vec<OpLatency> {
        self.hist
            .iter()
            .map(|(&(op, size_class), h)| OpLatency {
                op,
                size_class,
                count: h.len(),
                p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
                max_us: h.max() as f64 / 1000.0,
            })
            .collect()
    }

    /// The raw histogram (nanoseconds) of one operation and size class.
    pub fn histogram(&self, op: &str, size_class: u64) -> Option<&Histogram<u64>> {
        self.hist
            .iter()
            .find(|((o, c), _)| *o == op && *c == size_class)
            .map(|(_, h)| h)
    }

    /// Forgets everything recorded (e.g. after a benchmark's warm-up).
    pub fn clear(&mut self) {
        self.hist.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_operation_and_power_of_two_class() {
        let mut s = Stats::default();
        s.record("all_reduce", 1000, Duration::from_micros(10));
        s.record("all_reduce", 1024, Duration::from_micros(30));
        s.record("broadcast", 0, Duration::from_micros(5));
        let sum = s.summary();
        assert_eq!(sum.len(), 2);
        assert_eq!(
            (sum[0].op, sum[0].size_class, sum[0].count),
            ("all_reduce", 1024, 2)
        );
        assert!(sum[0].max_us >= 29.9 && sum[0].p50_us <= sum[0].p99_us);
        assert_eq!((sum[1].op, sum[1].size_class), ("broadcast", 1));
    }
}

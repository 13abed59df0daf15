//! Measurement primitives: the bench clock, a lock-free latency histogram, percentiles.
//!
//! Every time stamp in the bench is nanoseconds since one epoch on the system's monotonic clock
//! (the bench's clock), so a commit time taken by a writer thread and a receipt time taken by a
//! client task can be subtracted directly. Client worker processes (see `worker.rs`) are given
//! the parent's epoch, so their time stamps are on the same clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde::Serialize;

/// The environment variable that hands the bench clock's epoch to a worker process.
pub const EPOCH_ENV: &str = "FLEETGATE_BENCH_EPOCH_NS";

static EPOCH: OnceLock<u64> = OnceLock::new();

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the machine.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct we pass; CLOCK_MONOTONIC always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Starts the bench clock (idempotent); call once at start-up. A worker process takes its
/// parent's epoch from [`EPOCH_ENV`].
pub fn init_clock() {
    EPOCH.get_or_init(|| {
        std::env::var(EPOCH_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(monotonic_ns)
    });
}

/// The bench clock's epoch, on `CLOCK_MONOTONIC` (for [`EPOCH_ENV`]).
pub fn epoch_ns() -> u64 {
    *EPOCH.get_or_init(monotonic_ns)
}

/// Nanoseconds since the bench clock started.
pub fn now_ns() -> u64 {
    monotonic_ns().saturating_sub(epoch_ns())
}

/// Values below this (in µs) get one bucket each; above, 128 buckets per power of two (< 0.8%
/// relative error).
const LINEAR: u64 = 2048;
const SUB_BITS: u32 = 7;
const OCTAVES: usize = 30; // up to 2^41 µs, far beyond any run
const BUCKETS: usize = LINEAR as usize + OCTAVES * (1 << SUB_BITS);

/// A histogram of durations in microseconds. Recording is two relaxed atomic adds, so client
/// tasks on every thread share one without locks.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    total: AtomicU64,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let e = 63 - us.leading_zeros(); // >= 11
    let sub = (us >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    let i = LINEAR as usize + (e as usize - 11) * (1 << SUB_BITS) + sub as usize;
    i.min(BUCKETS - 1)
}

/// The smallest value of a bucket, in µs.
fn bucket_floor(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    let j = i - LINEAR as usize;
    let e = (j >> SUB_BITS) as u32 + 11;
    let sub = (j & ((1 << SUB_BITS) - 1)) as u64;
    (1u64 << e) + (sub << (e - SUB_BITS))
}

impl Histogram {
    pub fn record_ns(&self, ns: u64) {
        let us = ns / 1000;
        self.counts[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Percentiles and maximum, in milliseconds.
    pub fn summary(&self) -> Latency {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let max_ms = self.max_us.load(Ordering::Relaxed) as f64 / 1000.0;
        if total == 0 {
            return Latency::default();
        }
        let at = |q: f64| {
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0u64;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return (bucket_floor(i) as f64 / 1000.0).min(max_ms);
                }
            }
            max_ms
        };
        Latency {
            samples: total,
            p50_ms: Some(at(0.50)),
            p95_ms: Some(at(0.95)),
            p99_ms: Some(at(0.99)),
            max_ms: Some(max_ms),
        }
    }
}

/// A latency distribution, in milliseconds; `None` when nothing was measured.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Latency {
    /// From a list of durations in nanoseconds (small lists: subscribe times).
    pub fn of_ns(values: &[u64]) -> Latency {
        let h = Histogram::default();
        for &v in values {
            h.record_ns(v);
        }
        h.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for us in [
            0u64, 1, 2047, 2048, 2049, 4095, 4096, 10_000, 1_000_000, 60_000_000,
        ] {
            let b = bucket_of(us);
            assert!(b >= last);
            last = b;
            let floor = bucket_floor(b);
            assert!(floor <= us, "{us}: floor {floor}");
            assert!(us - floor <= us / 100 + 1, "{us}: floor {floor}");
        }
    }

    #[test]
    fn percentiles() {
        let h = Histogram::default();
        for ms in 1..=100u64 {
            h.record_ns(ms * 1_000_000);
        }
        let s = h.summary();
        assert_eq!(s.samples, 100);
        let p50 = s.p50_ms.unwrap_or(0.0);
        assert!((49.0..=50.5).contains(&p50), "{p50}");
        assert_eq!(s.max_ms, Some(100.0));
    }
}

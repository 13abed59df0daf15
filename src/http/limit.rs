//! Rate limits of the HTTP API, shared by every worker: token buckets keyed by a string, taken
//! before the work they guard, refused with code 15 (and `Retry-After`) when empty; idle ones
//! are dropped now and then.
//!
//! - [`LoginLimiter`]: one bucket per login and one per client address. Each `user/auth` attempt
//!   takes a token from both (before the password is checked, so the limit also bounds the
//!   hashing work); buckets refill evenly over `api.login_window_secs`.
//! - [`SessionLimiter`]: one bucket per session hash for the calls made with one
//!   (`api.requests_per_second`, with a burst of `api.requests_burst`), taken before the
//!   session is looked up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::ApiSettings;

/// Above this many buckets, idle ones are pruned (at most once a second).
const PRUNE_ABOVE: usize = 4096;

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Buckets {
    map: DashMap<String, Bucket>,
    capacity: f64,
    per_sec: f64,
}

impl Buckets {
    /// `capacity` tokens, refilled evenly over `window`.
    fn new(capacity: u32, window: Duration) -> Buckets {
        let capacity = f64::from(capacity.max(1));
        Buckets::with_rate(capacity, capacity / window.as_secs_f64().max(0.001))
    }

    fn with_rate(capacity: f64, per_sec: f64) -> Buckets {
        Buckets {
            map: DashMap::new(),
            capacity: capacity.max(1.0),
            per_sec: per_sec.max(0.001),
        }
    }

    /// Takes one token for `key`; when none is left, the seconds until one is.
    fn take(&self, key: &str, now: Instant) -> Result<(), u64> {
        let mut b = self.map.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.capacity,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.per_sec).ceil() as u64)
        }
    }

    /// Drops buckets that have refilled completely (they are as good as new).
    fn prune(&self, now: Instant) {
        let full_after = self.capacity / self.per_sec;
        self.map
            .retain(|_, b| now.saturating_duration_since(b.at).as_secs_f64() < full_after);
    }
}

/// Drops idle buckets when there are many: at most once a second, one pruner at a time.
struct Pruner {
    started: Instant,
    last_prune_ms: AtomicU64,
    lock: Mutex<()>,
}

impl Pruner {
    fn new() -> Pruner {
        Pruner {
            started: Instant::now(),
            last_prune_ms: AtomicU64::new(0),
            lock: Mutex::new(()),
        }
    }

    fn maybe_prune(&self, now: Instant, all: &[&Buckets]) {
        if all.iter().map(|b| b.map.len()).sum::<usize>() <= PRUNE_ABOVE {
            return;
        }
        let ms = now.saturating_duration_since(self.started).as_millis() as u64;
        let last = self.last_prune_ms.load(Ordering::Relaxed);
        if ms < last + 1000 {
            return;
        }
        // One pruner at a time; the others carry on.
        if let Ok(_guard) = self.lock.try_lock() {
            self.last_prune_ms.store(ms, Ordering::Relaxed);
            for b in all {
                b.prune(now);
            }
        }
    }
}

pub struct LoginLimiter {
    /// Refusals are logged once a second at most: a client retrying in a loop would flood
    /// the log.
    pub log_gate: crate::telemetry::LogGate,
    by_login: Buckets,
    by_address: Buckets,
    pruner: Pruner,
}

impl LoginLimiter {
    pub fn new(settings: &ApiSettings) -> LoginLimiter {
        let window = Duration::from_secs(settings.login_window_secs.max(1));
        LoginLimiter {
            log_gate: Default::default(),
            by_login: Buckets::new(settings.login_attempts_per_login, window),
            by_address: Buckets::new(settings.login_attempts_per_address, window),
            pruner: Pruner::new(),
        }
    }

    /// Counts one attempt for `login` from `address`; `Err(seconds)` when either is over its limit.
    pub fn attempt(&self, login: &str, address: &str) -> Result<(), u64> {
        let now = Instant::now();
        self.pruner
            .maybe_prune(now, &[&self.by_login, &self.by_address]);
        let by_login = self.by_login.take(login, now);
        let by_address = self.by_address.take(address, now);
        match (by_login, by_address) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(a), Err(b)) => Err(a.max(b)),
            (Err(s), _) | (_, Err(s)) => Err(s),
        }
    }
}

/// Calls made with a session hash: one bucket per hash.
pub struct SessionLimiter {
    /// Refusals are logged once a second at most.
    pub log_gate: crate::telemetry::LogGate,
    by_session: Buckets,
    pruner: Pruner,
}

impl SessionLimiter {
    pub fn new(settings: &ApiSettings) -> SessionLimiter {
        SessionLimiter {
            log_gate: Default::default(),
            by_session: Buckets::with_rate(
                f64::from(settings.requests_burst),
                f64::from(settings.requests_per_second),
            ),
            pruner: Pruner::new(),
        }
    }

    /// Counts one call made with `hash`; `Err(seconds)` when it is over its limit.
    pub fn request(&self, hash: &str) -> Result<(), u64> {
        let now = Instant::now();
        self.pruner.maybe_prune(now, &[&self.by_session]);
        self.by_session.take(hash, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_login: u32, per_address: u32) -> LoginLimiter {
        LoginLimiter::new(&ApiSettings {
            login_attempts_per_login: per_login,
            login_attempts_per_address: per_address,
            login_window_secs: 60,
            ..ApiSettings::default()
        })
    }

    #[test]
    fn each_login_and_each_address_has_its_own_allowance() {
        let l = limiter(2, 3);
        assert!(l.attempt("a", "1.1.1.1").is_ok());
        assert!(l.attempt("a", "1.1.1.1").is_ok());
        let wait = l.attempt("a", "2.2.2.2").unwrap_err();
        assert!((1..=30).contains(&wait), "{wait}");
        // The first address has one attempt left: another login may use it, then it is spent.
        assert!(l.attempt("b", "1.1.1.1").is_ok());
        assert!(l.attempt("c", "1.1.1.1").is_err());
        assert!(l.attempt("c", "3.3.3.3").is_ok());
    }

    #[test]
    fn buckets_refill_over_the_window() {
        let b = Buckets::new(2, Duration::from_secs(2));
        let t0 = Instant::now();
        assert!(b.take("k", t0).is_ok());
        assert!(b.take("k", t0).is_ok());
        assert!(b.take("k", t0).is_err());
        assert!(b.take("k", t0 + Duration::from_millis(1100)).is_ok());
        b.prune(t0 + Duration::from_secs(10));
        assert!(b.map.is_empty());
    }

    #[test]
    fn each_session_has_its_own_allowance_refilled_every_second() {
        let l = SessionLimiter::new(&ApiSettings {
            requests_per_second: 10,
            requests_burst: 2,
            ..ApiSettings::default()
        });
        let now = Instant::now();
        assert!(l.by_session.take("a", now).is_ok());
        assert!(l.by_session.take("a", now).is_ok());
        assert_eq!(l.by_session.take("a", now), Err(1));
        assert!(l.by_session.take("b", now).is_ok());
        // A tenth of a second brings one call back.
        let later = now + Duration::from_millis(100);
        assert!(l.by_session.take("a", later).is_ok());
        assert!(l.by_session.take("a", later).is_err());
        assert!(l.request("c").is_ok());
    }
}

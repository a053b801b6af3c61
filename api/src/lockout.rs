//! Brute-force protection: the account lockout policy (pure) and a per-source rate limiter.
//!
//! After [`FAILURES_BEFORE_LOCK`] consecutive failures the account is locked for one minute;
//! each further lock doubles, up to fifteen minutes. A success resets both counters. Logins
//! with an email that has no account keep the same counters per (hashed) email, so the
//! lockout answers alike whether an account exists or not; those are forgotten after
//! [`UNKNOWN_EMAIL_MEMORY`] without a failure.
//!
//! The rate limiter is a token bucket of our own rather than `governor`'s keyed limiter:
//! it reads the API's clock (so tests move time instead of sleeping), it bounds its own
//! memory, and it is a few dozen lines, where `governor` would add eight crates and a
//! clock of its own for a limiter that guards only the credential-checking rpcs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Consecutive failures that lock an account.
pub const FAILURES_BEFORE_LOCK: i64 = 5;
/// The first lock.
pub const FIRST_LOCK: Duration = Duration::from_secs(60);
/// The longest lock.
pub const MAX_LOCK: Duration = Duration::from_secs(15 * 60);
/// How long the failure counters of an unknown email are kept after its last failure
/// (when no lock is in force), so guessed emails cannot grow the table without bound.
pub const UNKNOWN_EMAIL_MEMORY: Duration = Duration::from_secs(24 * 60 * 60);

/// Failure counters of one account for one factor (password or MFA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockState {
    /// Consecutive failures since the last lock or success.
    pub failures: i64,
    /// Locks so far since the last success.
    pub lockouts: i64,
    /// Locked until this Unix millisecond (0 when never locked).
    pub locked_until_ms: i64,
}

impl LockState {
    /// How long the caller must still wait, if the account is locked at `now_ms`.
    pub fn locked_for(&self, now_ms: i64) -> Option<Duration> {
        (self.locked_until_ms > now_ms).then(|| {
            Duration::from_millis(u64::try_from(self.locked_until_ms - now_ms).unwrap_or(0))
        })
    }

    /// The state after one more failure at `now_ms`, and whether this failure locked it.
    pub fn after_failure(self, now_ms: i64) -> (LockState, bool) {
        let failures = self.failures + 1;
        if failures < FAILURES_BEFORE_LOCK {
            return (LockState { failures, ..self }, false);
        }
        let lockouts = self.lockouts + 1;
        let lock = lock_duration(lockouts);
        let lock_ms = i64::try_from(lock.as_millis()).unwrap_or(i64::MAX);
        (
            LockState {
                failures: 0,
                lockouts,
                locked_until_ms: now_ms.saturating_add(lock_ms),
            },
            true,
        )
    }
}

/// The length of the `n`-th lock (n ≥ 1): 1, 2, 4, 8, then 15 minutes.
pub fn lock_duration(n: i64) -> Duration {
    let doublings = u32::try_from((n - 1).clamp(0, 10)).unwrap_or(10);
    FIRST_LOCK
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(MAX_LOCK)
}

/// A token bucket per source address for the unauthenticated and credential-checking
/// rpcs. `per_second` tokens refill continuously up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, i64)>>,
}

impl RateLimiter {
    /// A limiter; `per_second <= 0` disables it.
    pub fn new(per_second: f64, burst: u32) -> Self {
        RateLimiter {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `source` at `now_ms`; `Err(wait)` when none is left.
    pub fn check(&self, source: Option<IpAddr>, now_ms: i64) -> Result<(), Duration> {
        let Some(source) = source else { return Ok(()) };
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = match self.buckets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Keep memory bounded: forget full buckets once the table grows large.
        if buckets.len() > 100_000 {
            let (per_second, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + (now_ms - *at) as f64 / 1000.0 * per_second < burst
            });
        }
        let (tokens, at) = buckets.entry(source).or_insert((self.burst, now_ms));
        let refilled =
            (*tokens + (now_ms - *at).max(0) as f64 / 1000.0 * self.per_second).min(self.burst);
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            *at = now_ms;
            Ok(())
        } else {
            *tokens = refilled;
            *at = now_ms;
            let wait = (1.0 - refilled) / self.per_second;
            Err(Duration::from_secs_f64(wait))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_lock_for_a_minute() {
        let mut s = LockState::default();
        for i in 1..5 {
            let (next, locked) = s.after_failure(1_000);
            assert!(!locked, "failure {i} must not lock");
            s = next;
        }
        let (s, locked) = s.after_failure(1_000);
        assert!(locked);
        assert_eq!(s.locked_for(1_000), Some(Duration::from_secs(60)));
        assert_eq!(s.locked_for(61_000), None);
    }

    #[test]
    fn locks_double_up_to_fifteen_minutes() {
        let minutes: Vec<u64> = (1..=7).map(|n| lock_duration(n).as_secs() / 60).collect();
        assert_eq!(minutes, vec![1, 2, 4, 8, 15, 15, 15]);
    }

    #[test]
    fn rate_limiter_refills_over_time() {
        let rl = RateLimiter::new(1.0, 2);
        let ip = Some("127.0.0.1".parse().unwrap());
        assert!(rl.check(ip, 0).is_ok());
        assert!(rl.check(ip, 0).is_ok());
        let wait = rl.check(ip, 0).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        assert!(rl.check(ip, 1_000).is_ok());
        // Another source has its own bucket; unknown sources and a disabled limiter pass.
        assert!(rl.check(Some("10.0.0.1".parse().unwrap()), 0).is_ok());
        assert!(rl.check(None, 0).is_ok());
        assert!(RateLimiter::new(0.0, 1).check(ip, 0).is_ok());
    }
}

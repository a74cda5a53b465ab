//! Bounded per-source tracking: sliding-window counters and governor limiters in LRU caches, so
//! a flood from millions of addresses costs a fixed amount of memory.

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use lru::LruCache;

use crate::clock::Millis;

/// The engine's notion of now, shared with its governor limiters. The engine sets it at every
/// entry point, so limiters run on the caller's time (sans-I/O, testable).
#[derive(Debug, Clone, Default)]
pub struct EngineClock(Arc<AtomicU64>);

impl EngineClock {
    pub fn set(&self, now: Millis) {
        // Monotonic: a wall-clock step back never rewinds the limiters.
        self.0
            .fetch_max(now.saturating_mul(1_000_000), Ordering::Relaxed);
    }
}

impl Clock for EngineClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.0.load(Ordering::Relaxed))
    }
}

pub type Limiter = RateLimiter<NotKeyed, InMemoryState, EngineClock, NoOpMiddleware<Nanos>>;

/// A GCRA limiter per key, at most `cap` keys; the least recently seen key is forgotten first
/// (governor's keyed limiter has no cap of its own).
pub struct Limiters<K: Hash + Eq> {
    map: LruCache<K, Limiter>,
    quota: Quota,
    clock: EngineClock,
}

impl<K: Hash + Eq> Limiters<K> {
    pub fn new(cap: usize, quota: Quota, clock: EngineClock) -> Self {
        Self {
            map: LruCache::new(nonzero(cap)),
            quota,
            clock,
        }
    }

    /// One cell for `key`: true when within the rate.
    pub fn check(&mut self, key: K) -> bool {
        let (quota, clock) = (self.quota, &self.clock);
        self.map
            .get_or_insert_mut(key, || Limiter::direct_with_clock(quota, clock.clone()))
            .check()
            .is_ok()
    }

    pub fn reconfigure(&mut self, cap: usize, quota: Quota) {
        if quota != self.quota {
            self.map.clear();
            self.quota = quota;
        }
        self.map.resize(nonzero(cap));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

pub fn nonzero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

/// Events within a sliding window, estimated from the current and the previous fixed window
/// (the approach of nginx and Cloudflare's rate counters): O(1) memory per key.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    start: Millis,
    cur: u32,
    prev: u32,
}

impl Window {
    /// Add `n` events at `now` and return the estimated count over the last `period` ms.
    pub fn add(&mut self, now: Millis, period: Millis, n: u32) -> u32 {
        self.roll(now, period);
        self.cur = self.cur.saturating_add(n);
        self.estimate(now, period)
    }

    pub fn estimate(&self, now: Millis, period: Millis) -> u32 {
        let period = period.max(1);
        let elapsed = now.saturating_sub(self.start);
        if elapsed >= 2 * period {
            return 0;
        }
        if elapsed >= period {
            // The current window has become the previous one.
            let into = elapsed - period;
            let weight = (period - into) as f64 / period as f64;
            return (self.cur as f64 * weight).round() as u32;
        }
        let weight = (period - elapsed) as f64 / period as f64;
        self.cur + (self.prev as f64 * weight).round() as u32
    }

    fn roll(&mut self, now: Millis, period: Millis) {
        let period = period.max(1);
        let elapsed = now.saturating_sub(self.start);
        if elapsed >= 2 * period {
            *self = Window {
                start: now - now % period,
                cur: 0,
                prev: 0,
            };
        } else if elapsed >= period {
            self.prev = self.cur;
            self.cur = 0;
            self.start += period;
        }
    }
}

/// A small set of distinct 32-bit fingerprints (users, file names) seen in a window, capped at
/// `N` entries: enough to count "more than N distinct" without growing.
#[derive(Debug, Clone)]
pub struct Distinct<const N: usize> {
    start: Millis,
    seen: [u32; N],
    len: u8,
}

impl<const N: usize> Default for Distinct<N> {
    fn default() -> Self {
        Self {
            start: 0,
            seen: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Distinct<N> {
    /// Record `fp` and return how many distinct fingerprints the window holds (at most N).
    pub fn add(&mut self, now: Millis, period: Millis, fp: u32) -> usize {
        if now.saturating_sub(self.start) >= period {
            self.start = now;
            self.len = 0;
        }
        let len = self.len as usize;
        if !self.seen.get(..len).unwrap_or(&[]).contains(&fp) {
            // Full at N: further fingerprints are not recorded.
            if let Some(slot) = self.seen.get_mut(len) {
                *slot = fp;
                self.len += 1;
            }
        }
        self.len as usize
    }

    pub fn count(&self, now: Millis, period: Millis) -> usize {
        if now.saturating_sub(self.start) >= period {
            0
        } else {
            self.len as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn sliding_window_counts_and_decays() {
        let mut w = Window::default();
        for i in 0..5 {
            assert_eq!(w.add(1000 + i, 60_000, 1), i as u32 + 1);
        }
        assert!(w.estimate(70_000, 60_000) <= 5);
        assert_eq!(w.estimate(200_000, 60_000), 0);
        assert_eq!(w.add(200_000, 60_000, 1), 1);
    }

    #[test]
    fn limiter_uses_engine_time_and_is_capped() {
        let clock = EngineClock::default();
        clock.set(1_000);
        let q = Quota::per_second(NonZeroU32::new(2).unwrap());
        let mut l = Limiters::new(3, q, clock.clone());
        assert!(l.check(1u32));
        assert!(l.check(1u32));
        assert!(!l.check(1u32), "third cell in the same instant exceeds 2/s");
        clock.set(2_000);
        assert!(l.check(1u32), "a second later there is room again");
        for k in 0..100u32 {
            l.check(k);
        }
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn distinct_is_bounded() {
        let mut d = Distinct::<4>::default();
        for fp in [1, 2, 2, 3, 4, 5, 6] {
            d.add(10, 1000, fp);
        }
        assert_eq!(d.count(10, 1000), 4);
        assert_eq!(d.count(2000, 1000), 0);
    }
}

//! Upstream protection: a bound on concurrent fetches and on fetches per second, with a
//! short queue in front of both.
//!
//! Only a request that really goes upstream takes a permit (for a cached route: the one
//! fetch a single flight runs, not its waiters), and holds it until the fetch is over.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;

use super::ceil_secs;
use crate::config::UpstreamGuardSettings;

/// Longest pacing interval used, whatever the settings say (one fetch per day).
const LONGEST_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Longest queueing used, whatever the settings say.
const LONGEST_QUEUE: Duration = Duration::from_secs(24 * 3600);

/// The upstream is at its limits and the request waited `queue_timeout` in vain: answer
/// 503 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the upstream is at its limit of concurrent or per-second requests; retry after {retry_after_secs} s")]
pub struct Overloaded {
    /// Seconds to suggest in `Retry-After` (at least 1).
    pub retry_after_secs: u64,
}

/// Bounds the fetches sent to one upstream. Share it (e.g. in an `Arc`) between all routes
/// of the upstream.
pub struct UpstreamGuard {
    settings: UpstreamGuardSettings,
    /// One permit per allowed concurrent fetch; `None`: unbounded.
    slots: Option<Arc<Semaphore>>,
    /// Paces fetch starts evenly at `max_requests_per_second` (burst 1); `None`: unpaced.
    pace: Option<DefaultDirectRateLimiter>,
    in_flight: Arc<AtomicUsize>,
}

/// One upstream fetch in flight; dropping it frees the slot. It is `'static` and `Send`, so
/// it can move into a detached fetch task.
#[derive(Debug)]
pub struct UpstreamPermit {
    _slot: Option<OwnedSemaphorePermit>,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for UpstreamPermit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UpstreamGuard {
    /// A guard for `settings`. Values outside the validated ranges do not panic: a rate
    /// that is not a positive number is paced at one fetch per day at most.
    pub fn new(settings: UpstreamGuardSettings) -> Self {
        let slots = settings.max_in_flight.map(|n| {
            Arc::new(Semaphore::new(
                (n as usize).clamp(1, Semaphore::MAX_PERMITS),
            ))
        });
        let pace = settings.max_requests_per_second.map(|rate| {
            let interval = Duration::try_from_secs_f64(1.0 / rate)
                .unwrap_or(LONGEST_INTERVAL)
                .clamp(Duration::from_nanos(1), LONGEST_INTERVAL);
            let quota = Quota::with_period(interval)
                .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MIN));
            governor::RateLimiter::direct(quota)
        });
        UpstreamGuard {
            settings,
            slots,
            pace,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The settings this guard enforces.
    pub fn settings(&self) -> &UpstreamGuardSettings {
        &self.settings
    }

    /// Waits (asynchronously) for a slot and a turn, at most `queue_timeout` in all.
    ///
    /// Waiters for a slot are served first come, first served. A wait for the per-second
    /// pace that could not end before the deadline fails at once. `Retry-After` is the pace's
    /// real wait when pacing was the obstacle, else `queue_timeout` rounded up (at least 1 s).
    /// Dropping the future gives everything back.
    pub async fn acquire(&self) -> Result<UpstreamPermit, Overloaded> {
        let deadline = Instant::now() + self.settings.queue_timeout.min(LONGEST_QUEUE);
        let busy = Overloaded {
            retry_after_secs: ceil_secs(self.settings.queue_timeout).max(1),
        };
        let slot = match &self.slots {
            None => None,
            Some(sem) => match Arc::clone(sem).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(TryAcquireError::NoPermits) => {
                    match tokio::time::timeout_at(deadline, Arc::clone(sem).acquire_owned()).await {
                        Ok(Ok(p)) => Some(p),
                        // Err(_) inside: the semaphore is never closed.
                        Ok(Err(_)) | Err(_) => return Err(busy),
                    }
                }
                Err(TryAcquireError::Closed) => return Err(busy),
            },
        };
        if let Some(pace) = &self.pace {
            while let Err(not_until) = pace.check() {
                let wait = not_until.wait_time_from(pace.clock().now());
                let now = Instant::now();
                let wake = now.checked_add(wait).filter(|w| *w <= deadline);
                let Some(wake) = wake else {
                    return Err(Overloaded {
                        retry_after_secs: ceil_secs(wait).max(1),
                    });
                };
                // A little jitter keeps waiters that woke together from retrying in step.
                let jitter = Duration::from_micros(fastrand::u64(0..500));
                tokio::time::sleep_until((wake + jitter).min(deadline)).await;
            }
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(UpstreamPermit {
            _slot: slot,
            in_flight: Arc::clone(&self.in_flight),
        })
    }

    /// Upstream fetches holding a permit right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn guard(max_in_flight: Option<u32>, rps: Option<f64>, queue_ms: u64) -> Arc<UpstreamGuard> {
        Arc::new(UpstreamGuard::new(UpstreamGuardSettings {
            max_in_flight,
            max_requests_per_second: rps,
            queue_timeout: Duration::from_millis(queue_ms),
        }))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_max_in_flight() {
        let g = guard(Some(2), None, 5_000);
        let peak = Arc::new(AtomicUsize::new(0));
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let (g, peak) = (Arc::clone(&g), Arc::clone(&peak));
                tokio::spawn(async move {
                    let permit = g.acquire().await.expect("queue long enough");
                    peak.fetch_max(g.in_flight(), Ordering::SeqCst);
                    assert!(g.in_flight() <= 2);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    drop(permit);
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert_eq!(g.in_flight(), 0);
        // Three waves of 300 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(850),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn waiting_past_queue_timeout_is_overloaded() {
        let g = guard(Some(1), None, 100);
        let held = g.acquire().await.expect("first is free");
        assert_eq!(g.in_flight(), 1);
        let t = std::time::Instant::now();
        let err = g.acquire().await.expect_err("no slot within 100 ms");
        let waited = t.elapsed();
        assert!(err.retry_after_secs >= 1);
        assert!(waited >= Duration::from_millis(95), "{waited:?}");
        assert!(waited < Duration::from_secs(1), "{waited:?}");
        assert_eq!(g.in_flight(), 1);
        drop(held);
        assert_eq!(g.in_flight(), 0);
        let _again = g.acquire().await.expect("free again");

        // A queue_timeout of zero does not queue at all.
        let g = guard(Some(1), None, 0);
        let _held = g.acquire().await.expect("first is free");
        assert_eq!(g.acquire().await.unwrap_err().retry_after_secs, 1);
    }

    #[tokio::test]
    async fn a_queued_slot_is_handed_over_when_freed() {
        let g = guard(Some(1), None, 1_000);
        let held = g.acquire().await.expect("first is free");
        let g2 = Arc::clone(&g);
        let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        assert_eq!(waiter.await.expect("task"), Ok(()));
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_everything_back() {
        let g = guard(Some(1), None, 5_000);
        let held = g.acquire().await.expect("first is free");
        let cancelled = tokio::time::timeout(Duration::from_millis(20), g.acquire()).await;
        assert!(cancelled.is_err());
        drop(held);
        assert_eq!(g.in_flight(), 0);
        let _p = tokio::time::timeout(Duration::from_millis(100), g.acquire())
            .await
            .expect("not stuck")
            .expect("slot free");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_requests_per_second_is_honoured() {
        // 20 per second: one start every 50 ms.
        let g = guard(None, Some(20.0), 5_000);
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let g = Arc::clone(&g);
                tokio::spawn(async move {
                    let _p = g.acquire().await.expect("queue long enough");
                    started.elapsed()
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.expect("task"));
        }
        times.sort();
        // The k-th start is no earlier than k intervals after the first (less timer slack).
        for (k, t) in times.iter().enumerate() {
            let floor =
                Duration::from_millis(50 * k as u64).saturating_sub(Duration::from_millis(5));
            assert!(*t >= floor, "start {k} at {t:?}: {times:?}");
        }
        assert!(times[9] < Duration::from_secs(3), "{times:?}");
    }

    #[tokio::test]
    async fn a_pace_wait_beyond_the_deadline_fails_at_once() {
        let g = guard(Some(4), Some(1.0), 100);
        let _first = g.acquire().await.expect("first is free");
        let t = std::time::Instant::now();
        let err = g.acquire().await.expect_err("next turn is a second away");
        assert!(t.elapsed() < Duration::from_millis(50));
        assert_eq!(err.retry_after_secs, 1);
        assert_eq!(
            g.in_flight(),
            1,
            "the slot taken for the failed wait was freed"
        );
    }

    #[tokio::test]
    async fn no_limits_never_wait() {
        let g = guard(None, None, 0);
        let permits: Vec<_> = acquire_n(&g, 1000).await;
        assert_eq!(permits.len(), 1000);
        assert_eq!(g.in_flight(), 1000);
        drop(permits);
        assert_eq!(g.in_flight(), 0);
    }

    async fn acquire_n(g: &UpstreamGuard, n: usize) -> Vec<UpstreamPermit> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(g.acquire().await.expect("unbounded"));
        }
        out
    }

    #[tokio::test]
    async fn odd_settings_do_not_panic() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 1e-300] {
            let g = UpstreamGuard::new(UpstreamGuardSettings {
                max_in_flight: Some(0),
                max_requests_per_second: Some(rate),
                queue_timeout: Duration::MAX,
            });
            let p = g.acquire().await.expect("the first turn is free");
            assert_eq!(g.in_flight(), 1);
            drop(p);
        }
    }
}

//! Process lifecycle shared by the proxy, the admin listener and the shutdown watcher:
//! readiness, draining and the count of requests in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Lifecycle {
    listening: AtomicBool,
    warmed: AtomicBool,
    draining: AtomicBool,
    in_flight: AtomicU64,
}

impl Lifecycle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Ready to serve: listeners are up, the cache warm-up is done (or gave up), and the
    /// process is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.is_listening() && self.warmed.load(Ordering::Acquire) && !self.is_draining()
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    pub fn mark_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    pub fn mark_warmed(&self) {
        self.warmed.store(true, Ordering::Release);
    }

    /// Why the process is not ready, for `/readyz`.
    pub fn not_ready_reason(&self) -> &'static str {
        if self.is_draining() {
            "shutting down"
        } else if !self.is_listening() {
            "starting"
        } else {
            "warming the cache"
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Waits until no request is in flight, or `timeout` passes. Returns whether it drained.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.in_flight() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// A request in flight; dropping it (however the request ends) stops counting it.
#[derive(Debug)]
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guards_count_requests_and_drain_waits_for_them() {
        let l = Lifecycle::new();
        let g1 = l.track();
        let g2 = l.track();
        assert_eq!(l.in_flight(), 2);
        drop(g1);
        assert!(!l.drained(Duration::from_millis(30)).await);
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.drained(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(g2);
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn draining_is_not_ready() {
        let l = Lifecycle::new();
        assert!(!l.is_ready());
        l.mark_listening();
        assert!(!l.is_ready(), "not before the warm-up");
        l.mark_warmed();
        assert!(l.is_ready());
        l.begin_drain();
        assert!(!l.is_ready());
    }
}

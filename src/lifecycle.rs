//! Process lifecycle shared by the proxy, the admin listener and the shutdown watcher:
//! readiness, the stages of a graceful stop, and the counts of requests in flight and of
//! open client connections.
//!
//! A graceful stop runs: [`Lifecycle::stop_accepting`] (readiness withdrawn, the proxy's
//! workers stop accepting), then [`Lifecycle::begin_drain`] (every answer closes its
//! connection), then [`Lifecycle::mark_proxy_closed`] (idle connections closed).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug)]
pub struct Lifecycle {
    listening: AtomicBool,
    warmed: AtomicBool,
    stopping: AtomicBool,
    draining: AtomicBool,
    /// Proxy workers whose drain is not over yet.
    proxy_open: AtomicUsize,
    in_flight: AtomicU64,
    connections: AtomicUsize,
    /// `true` once the proxy must stop accepting connections.
    stop: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            listening: AtomicBool::new(false),
            warmed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            proxy_open: AtomicUsize::new(1),
            in_flight: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            stop: watch::channel(false).0,
        }
    }
}

impl Lifecycle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Ready to serve: listeners are up, the cache warm-up is done (or gave up), and the
    /// process is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.is_listening() && self.warmed.load(Ordering::Acquire) && !self.is_stopping()
    }

    /// The process is shutting down (from the signal on).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Withdraws readiness and tells the proxy's workers to stop accepting connections.
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.send_replace(true);
    }

    /// Turns `true` when the proxy must stop accepting connections.
    pub fn stop_watch(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// How many proxy workers serve clients; each marks itself closed.
    pub fn set_proxy_workers(&self, n: usize) {
        self.proxy_open.store(n.max(1), Ordering::Release);
    }

    /// One proxy worker's drain is over and its idle connections are being closed.
    pub fn mark_proxy_closed(&self) {
        let _ = self
            .proxy_open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Every proxy worker is closed.
    pub fn is_proxy_closed(&self) -> bool {
        self.proxy_open.load(Ordering::Acquire) == 0
    }

    /// Counts an open client connection until the returned guard is dropped; `None` (and
    /// nothing counted) when `max` are open already.
    pub fn open_connection(self: &Arc<Self>, max: usize) -> Option<OpenConnection> {
        let guard = OpenConnection(self.clone());
        let before = self.connections.fetch_add(1, Ordering::AcqRel);
        (before < max).then_some(guard)
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
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
        if self.is_stopping() {
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

    /// From here on every answer closes its connection.
    pub fn begin_drain(&self) {
        self.stopping.store(true, Ordering::Release);
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

/// An open client connection; dropping it stops counting it.
#[derive(Debug)]
pub struct OpenConnection(Arc<Lifecycle>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
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
        l.stop_accepting();
        assert!(!l.is_ready());
        assert!(
            !l.is_draining(),
            "answers keep the connection until the drain"
        );
        assert!(*l.stop_watch().borrow());
    }

    #[test]
    fn connections_are_counted_and_capped() {
        let l = Lifecycle::new();
        let a = l.open_connection(2).unwrap();
        let _b = l.open_connection(2).unwrap();
        assert!(l.open_connection(2).is_none());
        assert_eq!(
            l.open_connections(),
            2,
            "a refused connection is not counted"
        );
        drop(a);
        assert!(l.open_connection(2).is_some());
        assert_eq!(l.open_connections(), 1);
    }
}

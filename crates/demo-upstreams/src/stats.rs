//! Request counters: cheap, exact under concurrency (atomics and a sharded map, no global lock).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

/// Route key used for requests that matched no route of the API (e.g. `"GET <unmatched>"`).
pub const UNMATCHED_ROUTE: &str = "<unmatched>";

/// Key under which requests are counted once a map already holds [`MAX_DISTINCT_KEYS`] keys
/// (e.g. `"GET <other>"`), so that a long run over endless distinct paths cannot exhaust memory.
pub const OTHER_KEY: &str = "<other>";

/// Most distinct keys kept in `routes` and in `paths` each.
pub const MAX_DISTINCT_KEYS: usize = 10_000;

/// A snapshot of a demo server's counters since it started or was last reset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests counted (every non-control request, counted on arrival).
    pub total: u64,
    /// Requests per route template, e.g. `"GET /api/restaurant/{id}"`.
    pub routes: BTreeMap<String, u64>,
    /// Requests per exact path (no query string), e.g. `"GET /api/restaurant/dufva"`.
    pub paths: BTreeMap<String, u64>,
    /// Requests currently being handled.
    pub in_flight: u64,
    /// The most requests handled at once since the start or the last reset.
    pub max_in_flight: u64,
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct StatsRecorder {
    total: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    routes: CounterMap,
    paths: CounterMap,
}

impl StatsRecorder {
    /// Counts one arriving request; it stays "in flight" until the returned guard is dropped.
    pub(crate) fn record(self: &Arc<Self>, method: &str, route: &str, path: &str) -> InFlight {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.routes.increment(method, route);
        self.paths.increment(method, path);
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.max_in_flight.fetch_max(now, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            total: self.total.load(Ordering::Relaxed),
            routes: self.routes.snapshot(),
            paths: self.paths.snapshot(),
            in_flight: self.in_flight.load(Ordering::Acquire),
            max_in_flight: self.max_in_flight.load(Ordering::Acquire),
        }
    }

    /// Zeroes the counters. Requests still in flight stay counted in `in_flight`, which also
    /// becomes the new `max_in_flight`.
    pub(crate) fn reset(&self) {
        self.total.store(0, Ordering::Relaxed);
        self.routes.clear();
        self.paths.clear();
        self.max_in_flight
            .store(self.in_flight.load(Ordering::Acquire), Ordering::Release);
    }
}

/// Marks one request as in flight while alive.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<StatsRecorder>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counters keyed by `"METHOD key"`, bounded to [`MAX_DISTINCT_KEYS`] keys.
#[derive(Debug, Default)]
struct CounterMap(DashMap<String, AtomicU64>);

impl CounterMap {
    fn increment(&self, method: &str, key: &str) {
        let full = format!("{method} {key}");
        if let Some(counter) = self.0.get(full.as_str()) {
            counter.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let full = if self.0.len() >= MAX_DISTINCT_KEYS {
            format!("{method} {OTHER_KEY}")
        } else {
            full
        };
        self.0
            .entry(full)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().load(Ordering::Relaxed)))
            .collect()
    }

    fn clear(&self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_in_flight() {
        let stats = Arc::new(StatsRecorder::default());
        let a = stats.record("GET", "/x/{id}", "/x/1");
        let b = stats.record("GET", "/x/{id}", "/x/2");
        let snap = stats.snapshot();
        assert_eq!(snap.total, 2);
        assert_eq!(snap.routes["GET /x/{id}"], 2);
        assert_eq!(snap.paths["GET /x/1"], 1);
        assert_eq!((snap.in_flight, snap.max_in_flight), (2, 2));
        drop(a);
        stats.reset();
        let snap = stats.snapshot();
        assert_eq!((snap.total, snap.in_flight, snap.max_in_flight), (0, 1, 1));
        assert!(snap.routes.is_empty());
        drop(b);
        assert_eq!(stats.snapshot().in_flight, 0);
    }

    #[test]
    fn distinct_keys_are_bounded() {
        let map = CounterMap::default();
        for i in 0..MAX_DISTINCT_KEYS + 5 {
            map.increment("GET", &format!("/p/{i}"));
        }
        let snap = map.snapshot();
        assert_eq!(snap.len(), MAX_DISTINCT_KEYS + 1);
        assert_eq!(snap["GET <other>"], 5);
    }
}

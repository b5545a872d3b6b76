//! Single flight: at most one upstream fetch per key at any moment. Waiters are woken by
//! the fetch itself through a watch channel (no polling), all with the same result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use opentelemetry::trace::SpanContext;
use opentelemetry::Context;
use tokio::sync::watch;

use super::key::CacheKey;
use super::origin::Streaming;
use super::purge::{PurgeWhat, Reach};
use super::store::Entry;
use crate::error::StoaError;

/// What a fetch produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// An answer every waiter may have (it may or may not have been stored).
    Shared(Arc<Entry>),
    /// An entry another node stored in the shared tier, promoted into this node's store.
    FromTier(Arc<Entry>),
    /// An entry read from this node's disk tier, promoted into its store (when it fits).
    FromDisk(Arc<Entry>),
    /// An answer for the request that led the fetch only (`Set-Cookie`, `private`, ...):
    /// the other waiters must ask the upstream themselves.
    Private(Arc<Entry>),
    /// An answer larger than the route's `max_entry_bytes`, not stored. The first request
    /// to take the stream writes it to its client (the leader; any waiter when `shared`,
    /// should the leader be gone); every other one asks the upstream itself.
    TooLarge {
        stream: Handoff,
        shared: bool,
        /// The upstream answered a 5xx: a stale copy may serve instead.
        server_error: bool,
    },
    /// The upstream's own 5xx answer, not stored: every waiter without a stale copy to
    /// serve instead gets it as it is.
    ServerError(Arc<Entry>),
    /// The fetch failed.
    Failed(StoaError),
}

impl Outcome {
    /// What the fetch produced, as a trace records it.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Shared(_) => "shared",
            Outcome::FromTier(_) => "from_tier",
            Outcome::FromDisk(_) => "from_disk",
            Outcome::Private(_) => "private",
            Outcome::TooLarge { .. } => "too_large",
            Outcome::ServerError(_) => "server_error",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// A stream that one request may take.
pub type Handoff = Arc<Mutex<Option<Box<Streaming>>>>;

pub fn handoff(stream: Option<Box<Streaming>>) -> Handoff {
    Arc::new(Mutex::new(stream))
}

/// Takes the stream of a [`Handoff`], if nobody took it yet.
pub fn take(handoff: &Handoff) -> Option<Box<Streaming>> {
    handoff.lock().unwrap_or_else(|p| p.into_inner()).take()
}

type Slot = watch::Receiver<Option<Outcome>>;

/// What invalidations did to a fill while it was in flight.
#[derive(Debug, Default)]
struct Fate {
    /// An invalidation named its key: its answer goes to the requests that joined before,
    /// and is never stored.
    doomed: bool,
    /// Tags purged while it was in flight, before its answer's tags were known: checked
    /// against them when it is about to be stored.
    purged_tags: Vec<String>,
}

type FateCell = Arc<Mutex<Fate>>;

struct Flight {
    slot: Slot,
    fate: FateCell,
    /// The fill's span, which its waiters link to (traces on only).
    span: Option<SpanContext>,
}

#[derive(Default)]
struct Inner {
    /// The flight a request for the key joins.
    current: HashMap<Arc<CacheKey>, Flight>,
    /// Flights an invalidation detached (requests after it lead a new one) that are still
    /// running: a later invalidation must reach them too.
    detached: Vec<(Arc<CacheKey>, Weak<Mutex<Fate>>)>,
}

type Map = Arc<Mutex<Inner>>;

/// Fetches in flight, by cache key.
#[derive(Default)]
pub struct Flights {
    map: Map,
}

/// The right and duty to run a fetch and publish its outcome. Dropped without publishing
/// (say, the fetch task panicked), it still leaves the map, so the key is never stuck.
pub struct Lead {
    key: Arc<CacheKey>,
    tx: watch::Sender<Option<Outcome>>,
    fate: FateCell,
    map: Map,
    /// The fill's span (traces on only), for the task that runs it.
    span: Option<Context>,
}

fn lock(map: &Map) -> std::sync::MutexGuard<'_, Inner> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

fn fate(cell: &Mutex<Fate>) -> std::sync::MutexGuard<'_, Fate> {
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

/// Either the caller leads a new fetch, or joins the one in flight.
pub enum Joined {
    Lead(Lead, Slot),
    /// With the span of the fill waited on, when traces are on.
    Wait(Slot, Option<SpanContext>),
}

impl Flights {
    /// Joins the fetch in flight for `key`, or becomes its leader. `recheck` runs under the
    /// lock and may find the answer already stored by a fetch that just finished; then the
    /// caller neither leads nor waits.
    pub fn join<T>(
        &self,
        key: &CacheKey,
        recheck: impl FnOnce() -> Option<T>,
    ) -> Result<Joined, T> {
        self.join_traced(key, recheck, || None)
    }

    /// [`Flights::join`], where a leader starts the fill's span with `span` (under the lock,
    /// so that every waiter finds it).
    pub fn join_traced<T>(
        &self,
        key: &CacheKey,
        recheck: impl FnOnce() -> Option<T>,
        span: impl FnOnce() -> Option<Context>,
    ) -> Result<Joined, T> {
        let mut map = lock(&self.map);
        if let Some(flight) = map.current.get(key) {
            return Ok(Joined::Wait(flight.slot.clone(), flight.span.clone()));
        }
        if let Some(found) = recheck() {
            return Err(found);
        }
        let key = Arc::new(key.clone());
        let (tx, rx) = watch::channel(None);
        let fate = FateCell::default();
        let span = span();
        map.current.insert(
            key.clone(),
            Flight {
                slot: rx.clone(),
                fate: fate.clone(),
                span: span.as_ref().map(crate::otel::span_context),
            },
        );
        let lead = Lead {
            key,
            tx,
            fate,
            map: self.map.clone(),
            span,
        };
        Ok(Joined::Lead(lead, rx))
    }

    /// Starts a fetch only if none is in flight for `key` (background refresh).
    pub fn lead_if_idle(&self, key: &CacheKey) -> Option<Lead> {
        match self.join(key, || None::<()>) {
            Ok(Joined::Lead(lead, _)) => Some(lead),
            _ => None,
        }
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.map).current.len()
    }

    /// Applies an invalidation to the fills in flight: each one it reaches is detached (a
    /// request from now on leads a new fetch) and will not be stored; a tag purge detaches
    /// every fill it may reach and leaves the verdict to the answer's tags. A fill is stored
    /// under the same lock ([`Lead::store_unless_invalidated`]): either before this, and
    /// then the caller's removal of stored entries, which follows, takes it out, or not at
    /// all. How many fills it reached.
    pub fn invalidate(&self, what: &PurgeWhat) -> usize {
        let mut map = lock(&self.map);
        let Inner { current, detached } = &mut *map;
        detached.retain(|(_, fate)| fate.strong_count() > 0);
        let mut reached = 0;
        let mut mark = |key: &CacheKey, cell: &Mutex<Fate>| match what.reaches(key) {
            Reach::No => false,
            Reach::Yes => {
                fate(cell).doomed = true;
                reached += 1;
                true
            }
            Reach::ByTags => {
                fate(cell).purged_tags.extend(what.tags().iter().cloned());
                reached += 1;
                true
            }
        };
        for (key, cell) in detached.iter() {
            if let Some(cell) = cell.upgrade() {
                mark(key, &cell);
            }
        }
        current.retain(|key, flight| {
            if mark(key, &flight.fate) {
                detached.push((key.clone(), Arc::downgrade(&flight.fate)));
                false
            } else {
                true
            }
        });
        reached
    }
}

impl Lead {
    pub fn key(&self) -> &Arc<CacheKey> {
        &self.key
    }

    /// The fill's span, for the task that runs the fill (traces on only).
    pub fn take_span(&mut self) -> Option<Context> {
        self.span.take()
    }

    /// Runs `store` unless an invalidation reached this fill while it was in flight
    /// (`has_tag` tells whether the answer carries a tag); whether it ran. Under the
    /// flights' lock: an invalidation either sees the stored entry or refuses the fill.
    pub fn store_unless_invalidated(
        &self,
        has_tag: impl Fn(&str) -> bool,
        store: impl FnOnce(),
    ) -> bool {
        let _map = lock(&self.map);
        let refused = {
            let fate = fate(&self.fate);
            fate.doomed || fate.purged_tags.iter().any(|t| has_tag(t))
        };
        if !refused {
            store();
        }
        !refused
    }

    /// Whether an invalidation reached this fill (its answer may still carry none of
    /// the purged tags).
    pub fn was_invalidated(&self) -> bool {
        let _map = lock(&self.map);
        let fate = fate(&self.fate);
        fate.doomed || !fate.purged_tags.is_empty()
    }

    /// Leaves the map, if this flight is still the one requests join.
    fn leave(&self, map: &mut Inner) {
        if map
            .current
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(&f.fate, &self.fate))
        {
            map.current.remove(&self.key);
        }
    }

    /// Publishes the outcome: the key leaves the map first, then every waiter wakes.
    /// The caller stores a cacheable answer before calling this, so a request arriving in
    /// between finds either the stored entry or this flight.
    pub fn finish(self, outcome: Outcome) {
        self.leave(&mut lock(&self.map));
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if self.tx.borrow().is_none() {
            self.leave(&mut lock(&self.map));
        }
    }
}

/// Waits for a flight's outcome. `None` if the leader vanished without publishing.
pub async fn wait(mut slot: Slot) -> Option<Outcome> {
    let published = slot
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|v| v.clone());
    published.or_else(|| slot.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::test_key;
    use std::time::Duration;

    #[tokio::test]
    async fn one_leader_many_waiters_all_woken_with_the_same_outcome() {
        let flights = Arc::new(Flights::default());
        let Ok(Joined::Lead(lead, first)) = flights.join(&test_key("r", "k"), || None::<()>) else {
            panic!("the first caller leads");
        };
        let mut waiters = Vec::new();
        for _ in 0..100 {
            let Ok(Joined::Wait(slot, _)) = flights.join(&test_key("r", "k"), || None::<()>) else {
                panic!("later callers wait");
            };
            waiters.push(tokio::spawn(wait(slot)));
        }
        assert_eq!(flights.in_flight(), 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        lead.finish(Outcome::Failed(StoaError::NotReady));
        for w in waiters {
            assert!(matches!(
                w.await.unwrap(),
                Some(Outcome::Failed(StoaError::NotReady))
            ));
        }
        assert!(matches!(wait(first).await, Some(Outcome::Failed(_))));
        assert_eq!(flights.in_flight(), 0);
        // The next caller starts a new fetch.
        assert!(flights.lead_if_idle(&test_key("r", "k")).is_some());
    }

    #[test]
    fn recheck_under_the_lock_prevents_a_second_fetch() {
        let flights = Flights::default();
        assert!(matches!(
            flights.join(&test_key("r", "k"), || Some(7)),
            Err(7)
        ));
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_dropped_leader_does_not_hang_waiters() {
        let flights = Flights::default();
        let Ok(Joined::Lead(lead, _)) = flights.join(&test_key("r", "k"), || None::<()>) else {
            panic!()
        };
        let Ok(Joined::Wait(slot, _)) = flights.join(&test_key("r", "k"), || None::<()>) else {
            panic!()
        };
        drop(lead);
        assert!(wait(slot).await.is_none());
        assert_eq!(flights.in_flight(), 0, "the key is not stuck");
    }
}

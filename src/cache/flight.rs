//! Single flight: at most one upstream fetch per key at any moment. Waiters are woken by
//! the fetch itself through a watch channel (no polling), all with the same result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::key::CacheKey;
use super::origin::Streaming;
use super::store::Entry;
use crate::error::StoaError;

/// What a fetch produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// An answer every waiter may have (it may or may not have been stored).
    Shared(Arc<Entry>),
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
type Map = Arc<Mutex<HashMap<Arc<CacheKey>, Slot>>>;

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
    map: Map,
}

fn lock(map: &Map) -> std::sync::MutexGuard<'_, HashMap<Arc<CacheKey>, Slot>> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

/// Either the caller leads a new fetch, or joins the one in flight.
pub enum Joined {
    Lead(Lead, Slot),
    Wait(Slot),
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
        let mut map = lock(&self.map);
        if let Some(slot) = map.get(key) {
            return Ok(Joined::Wait(slot.clone()));
        }
        if let Some(found) = recheck() {
            return Err(found);
        }
        let key = Arc::new(key.clone());
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx.clone());
        let lead = Lead {
            key,
            tx,
            map: self.map.clone(),
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
        lock(&self.map).len()
    }
}

impl Lead {
    pub fn key(&self) -> &Arc<CacheKey> {
        &self.key
    }

    /// Publishes the outcome: the key leaves the map first, then every waiter wakes.
    /// The caller stores a cacheable answer before calling this, so a request arriving in
    /// between finds either the stored entry or this flight.
    pub fn finish(self, outcome: Outcome) {
        lock(&self.map).remove(&self.key);
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if self.tx.borrow().is_none() {
            lock(&self.map).remove(&self.key);
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
            let Ok(Joined::Wait(slot)) = flights.join(&test_key("r", "k"), || None::<()>) else {
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
        let Ok(Joined::Wait(slot)) = flights.join(&test_key("r", "k"), || None::<()>) else {
            panic!()
        };
        drop(lead);
        assert!(wait(slot).await.is_none());
        assert_eq!(flights.in_flight(), 0, "the key is not stuck");
    }
}

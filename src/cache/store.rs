//! The bounded in-memory store: `quick_cache` weighted by bytes, holding ready-to-send
//! responses. Evictions are counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};

use crate::fetch::FetchRequest;

/// Per-entry memory beyond key, header bytes and body: the entry, its header map, the
/// cache index and allocator rounding. Measured at about 1.7 KiB per entry of JSON
/// answers (20,000 entries: 51 MB of RSS for 17 MB of key, header and body bytes).
const ENTRY_OVERHEAD: u64 = 1536;

/// A stored response and its lifetimes.
#[derive(Debug)]
pub struct Entry {
    /// The response head to send, without `Age` and `X-Cache`.
    pub header: ResponseHeader,
    pub body: Bytes,
    pub stored_at: Instant,
    /// Fresh (served as HIT) until then.
    pub fresh_until: Instant,
    /// Served as STALE while one refresh runs, until then.
    pub revalidate_until: Instant,
    /// Served as STALE when the upstream fails, until then.
    pub error_until: Instant,
    /// A request after this point starts a background refresh (refresh-ahead).
    pub refresh_at: Option<Instant>,
    /// How to fetch this entry again (admin refresh); `None` for answers never stored.
    pub recipe: Option<Arc<FetchRequest>>,
    /// Set by the request that starts this entry's background refresh.
    refreshing: AtomicBool,
    weight: u64,
}

/// Freshness windows measured from the moment an entry is stored.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub refresh_ahead: Option<f64>,
}

impl Entry {
    pub fn new(
        header: ResponseHeader,
        body: Bytes,
        key_len: usize,
        now: Instant,
        life: Lifetimes,
        recipe: Option<Arc<FetchRequest>>,
    ) -> Self {
        let header_bytes: usize = header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        let fresh_until = now + life.ttl;
        let recipe_bytes = recipe.as_ref().map_or(0, |r| {
            r.path_and_query.len()
                + r.body.len()
                + r.headers
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len())
                    .sum::<usize>()
        });
        Entry {
            weight: ENTRY_OVERHEAD + (key_len + header_bytes + body.len() + recipe_bytes) as u64,
            recipe,
            header,
            body,
            stored_at: now,
            fresh_until,
            revalidate_until: fresh_until + life.stale_while_revalidate,
            error_until: fresh_until + life.stale_if_error.max(life.stale_while_revalidate),
            refresh_at: life.refresh_ahead.map(|f| now + life.ttl.mul_f64(f)),
            refreshing: AtomicBool::new(false),
        }
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    /// Claims the right to start this entry's background refresh: true for one caller.
    pub fn claim_refresh(&self) -> bool {
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Gives the claim back after a failed refresh, so a later request may retry.
    pub fn release_refresh(&self) {
        self.refreshing.store(false, Ordering::Release);
    }

    /// Whole seconds since the entry was stored, for the `Age` header.
    pub fn age_secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.stored_at).as_secs()
    }

    pub fn weight(&self) -> u64 {
        self.weight
    }
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<Arc<str>, Arc<Entry>> for ByBytes {
    fn weight(&self, _key: &Arc<str>, val: &Arc<Entry>) -> u64 {
        val.weight
    }
}

/// Counts evictions (entries pushed out to stay within `max_bytes`).
#[derive(Clone)]
struct CountEvictions(Arc<AtomicU64>);

/// The key an insert is storing: quick_cache reports the value it replaces through the
/// eviction hook too, and a replacement is not an eviction.
#[derive(Default)]
struct Inserting(Option<Arc<str>>);

impl Lifecycle<Arc<str>, Arc<Entry>> for CountEvictions {
    type RequestState = Inserting;

    fn on_evict(&self, state: &mut Inserting, key: Arc<str>, _val: Arc<Entry>) {
        if state.0.as_deref() != Some(&*key) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The response store shared by every cached route.
pub struct Store {
    cache: Cache<Arc<str>, Arc<Entry>, ByBytes, DefaultHashBuilder, CountEvictions>,
    evictions: Arc<AtomicU64>,
    max_bytes: u64,
}

impl Store {
    pub fn new(max_bytes: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        // Estimated item count only sizes the index; JSON answers are around 1 KiB.
        let estimated_items = (max_bytes / 1024).clamp(64, 1 << 20) as usize;
        Store {
            cache: Cache::with(
                estimated_items,
                max_bytes,
                ByBytes,
                DefaultHashBuilder::default(),
                CountEvictions(evictions.clone()),
            ),
            evictions,
            max_bytes,
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: Arc<str>, entry: Arc<Entry>) {
        let mut inserting = Inserting(Some(key.clone()));
        self.cache.insert_with_lifecycle(key, entry, &mut inserting);
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&self, key: &str) -> bool {
        self.cache.remove(key).is_some()
    }

    /// A snapshot of the entries (keys and values are reference-counted, not copied).
    pub fn entries(&self) -> impl Iterator<Item = (Arc<str>, Arc<Entry>)> + '_ {
        self.cache.iter()
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Bytes held, by the store's own weighing.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body_len: usize) -> Arc<Entry> {
        let header = ResponseHeader::build(200, None).unwrap();
        let life = Lifetimes {
            ttl: Duration::from_secs(10),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            refresh_ahead: None,
        };
        Arc::new(Entry::new(
            header,
            Bytes::from(vec![b'x'; body_len]),
            8,
            Instant::now(),
            life,
            None,
        ))
    }

    #[test]
    fn filling_past_the_bound_evicts_and_counts() {
        let store = Store::new(64 * 1024);
        for i in 0..200 {
            store.insert(Arc::from(format!("key-{i}")), entry(1024));
        }
        assert!(store.bytes() <= 64 * 1024, "{} bytes held", store.bytes());
        assert!(store.evictions() > 0);
        assert!(store.len() < 200);
    }

    #[test]
    fn replacing_a_key_is_not_an_eviction() {
        let store = Store::new(1024 * 1024);
        for _ in 0..10 {
            store.insert(Arc::from("same"), entry(1024));
        }
        assert_eq!(store.len(), 1);
        assert_eq!(store.evictions(), 0);
    }

    #[test]
    fn only_one_caller_claims_a_refresh() {
        let e = entry(10);
        assert!(e.claim_refresh());
        assert!(!e.claim_refresh());
        e.release_refresh();
        assert!(e.claim_refresh());
    }
}

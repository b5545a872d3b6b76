//! The bounded in-memory store: `quick_cache` weighted by bytes, holding ready-to-send
//! responses. Evictions are counted; entries too heavy to hold are refused apart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use crate::config::capacity::{
    estimated_items, largest_entry_weight, ENTRY_OVERHEAD, HOT_ALLOCATION, SHARDS,
};
use crate::fetch::FetchRequest;

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

/// Counts evictions (entries pushed out to stay within `max_bytes`). Entries too heavy for
/// the store never reach it ([`Store::insert`] refuses them), so they are not counted here.
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
    largest_entry: u64,
}

impl Store {
    pub fn new(max_bytes: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let lifecycle = CountEvictions(evictions.clone());
        let options = OptionsBuilder::new()
            .estimated_items_capacity(estimated_items(max_bytes))
            .weight_capacity(max_bytes)
            .shards(SHARDS)
            .hot_allocation(HOT_ALLOCATION)
            .build();
        let cache = match options {
            Ok(options) => {
                Cache::with_options(options, ByBytes, DefaultHashBuilder::default(), lifecycle)
            }
            // Only if a required option were missing; both are set above.
            Err(_) => Cache::with(
                estimated_items(max_bytes),
                max_bytes,
                ByBytes,
                DefaultHashBuilder::default(),
                lifecycle,
            ),
        };
        Store {
            cache,
            evictions,
            max_bytes,
            largest_entry: largest_entry_weight(max_bytes),
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.cache.get(key)
    }

    /// Stores `entry` under `key`; false if it is heavier than the store can hold, and then
    /// the older entry under `key` (outdated) goes too, counted as neither.
    pub fn insert(&self, key: Arc<str>, entry: Arc<Entry>) -> bool {
        if entry.weight > self.largest_entry {
            self.cache.remove(&*key);
            return false;
        }
        let mut inserting = Inserting(Some(key.clone()));
        self.cache.insert_with_lifecycle(key, entry, &mut inserting);
        true
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
    use crate::config::capacity::{largest_body, HEAD_ALLOWANCE};

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
    fn largest_entry_matches_what_quick_cache_admits() {
        for max_bytes in [32 * 1024, 1 << 20, 8 << 20, 256 << 20, 1 << 30] {
            let store = Store::new(max_bytes);
            let largest = largest_entry_weight(max_bytes);
            let with_weight = |w: u64| {
                let mut e = entry(0);
                Arc::get_mut(&mut e).unwrap().weight = w;
                e
            };
            // Past the store's own check: quick_cache itself keeps this one ...
            store.cache.insert(Arc::from("fits"), with_weight(largest));
            assert!(store.get("fits").is_some(), "max_bytes {max_bytes}");
            // ... and refuses one byte more.
            store
                .cache
                .insert(Arc::from("heavy"), with_weight(largest + 1));
            assert!(store.get("heavy").is_none(), "max_bytes {max_bytes}");
            assert!(largest_body(max_bytes) < largest);
        }
        assert_eq!(largest_entry_weight(256 << 20), (32 << 20) * 97 / 100);
    }

    #[test]
    fn a_too_heavy_entry_is_refused_and_not_counted_as_an_eviction() {
        let store = Store::new(1 << 20);
        assert!(store.insert(Arc::from("k"), entry(1024)));
        let heavy = largest_body(1 << 20) as usize + HEAD_ALLOWANCE as usize;
        assert!(!store.insert(Arc::from("k"), entry(heavy)));
        assert!(store.get("k").is_none(), "the outdated entry went");
        assert_eq!(store.evictions(), 0);
        assert!(store.insert(Arc::from("k"), entry(largest_body(1 << 20) as usize)));
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

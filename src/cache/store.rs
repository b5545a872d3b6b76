//! The bounded in-memory store: `quick_cache` weighted by bytes, holding ready-to-send
//! responses, with an index of its keys by route and path so that purges touch only the
//! entries they name. Evictions are counted; entries too heavy to hold are refused apart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use super::control::Validators;
use super::encoding::{Compressed, Variant, Variants};
use super::key::CacheKey;
use super::origin::FetchRequest;
use crate::config::capacity::{
    estimated_items, largest_entry_weight, ENTRY_OVERHEAD, HOT_ALLOCATION, SHARDS,
};

/// A stored response and its lifetimes.
#[derive(Debug)]
pub struct Entry {
    /// The response head to send, without `Age` and `X-Cache`.
    pub header: ResponseHeader,
    pub body: Bytes,
    pub stored_at: Instant,
    /// The upstream's `Age` when fetched, in seconds: added to the time in stoa.
    pub upstream_age: u64,
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
    /// Why this answer is not one to store (`None`: it is).
    pub not_stored: Option<super::NotStored>,
    /// `ETag` / `Last-Modified`, for conditional requests and revalidation.
    pub validators: Option<Box<Validators>>,
    /// A request with `Authorization` may be answered with it (RFC 9111 §3.5: `public`,
    /// `s-maxage` or `must-revalidate`).
    pub shareable_with_authorization: bool,
    /// Set by the request that starts this entry's background refresh.
    refreshing: AtomicBool,
    /// Set by a soft purge: stale from then on, whatever its lifetimes say.
    marked_stale: AtomicBool,
    /// Compressed forms of the body, weighed with it.
    variants: Variants,
    /// The identity head as bytes to send, built by the first answer that writes it.
    wire: OnceLock<Bytes>,
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
            // The head counts twice: as headers, and as the bytes to send (`wire`).
            weight: ENTRY_OVERHEAD
                + (key_len + 2 * header_bytes + body.len() + recipe_bytes) as u64,
            recipe,
            validators: None,
            shareable_with_authorization: false,
            header,
            body,
            stored_at: now,
            upstream_age: 0,
            fresh_until,
            revalidate_until: fresh_until + life.stale_while_revalidate,
            error_until: fresh_until + life.stale_if_error.max(life.stale_while_revalidate),
            refresh_at: life.refresh_ahead.map(|f| now + life.ttl.mul_f64(f)),
            refreshing: AtomicBool::new(false),
            marked_stale: AtomicBool::new(false),
            not_stored: None,
            variants: Variants::default(),
            wire: OnceLock::new(),
        }
    }

    /// With compressed forms of the body, weighed with the entry (before it is stored:
    /// the store weighs an entry when it is inserted).
    pub fn with_variants(mut self, variants: Variants) -> Self {
        self.weight += variants.weight();
        self.variants = variants;
        self
    }

    /// The head and body to answer a client with this `Accept-Encoding`: a compressed
    /// variant if it accepts one, else the identity answer.
    pub fn pick(&self, accept: Option<&http::HeaderValue>) -> (&ResponseHeader, &Bytes) {
        let (header, body, _) = self.pick_with_wire(accept);
        (header, body)
    }

    /// Like [`Entry::pick`], with where the picked head's bytes to send are kept once
    /// built (whoever writes answers builds them, on first use).
    pub fn pick_with_wire(
        &self,
        accept: Option<&http::HeaderValue>,
    ) -> (&ResponseHeader, &Bytes, &OnceLock<Bytes>) {
        if self.variants.is_empty() {
            return (&self.header, &self.body, &self.wire);
        }
        match self.variants.pick(accept) {
            Some(Variant {
                header, body, wire, ..
            }) => (header, body, wire),
            None => (&self.header, &self.body, &self.wire),
        }
    }

    /// The compressed bodies of this entry, to keep for the entry that replaces it when
    /// the upstream answers a revalidation with 304 (same body, new heads).
    pub fn compressed(&self) -> Compressed {
        self.variants.bodies()
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until && !self.is_marked_stale()
    }

    /// Whether it carries `tag`.
    pub fn has_tag(&self, _tag: &str) -> bool {
        false
    }

    /// Its tags.
    pub fn tag_names(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }

    /// Whether a soft purge marked it stale.
    pub fn is_marked_stale(&self) -> bool {
        self.marked_stale.load(Ordering::Relaxed)
    }

    /// Marks it stale (soft purge): the next request is answered from it as STALE while one
    /// revalidation runs. A refresh in flight was started before the purge and will not be
    /// stored, so its claim is given back for the next request to start a new one. Whether
    /// it was not marked already.
    pub fn mark_stale(&self) -> bool {
        let first = !self.marked_stale.swap(true, Ordering::AcqRel);
        if first {
            self.release_refresh();
        }
        first
    }

    /// Claims the right to start this entry's background refresh: true for one caller.
    pub fn claim_refresh(&self) -> bool {
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Gives the claim back after a failed refresh, so a later request may retry.
    pub fn release_refresh(&self) {
        self.refreshing.store(false, Ordering::Release);
    }

    /// With the `Age` the upstream gave the answer (RFC 9111 §4.2.3).
    pub fn with_upstream_age(mut self, upstream_age: u64) -> Self {
        self.upstream_age = upstream_age;
        self
    }

    pub fn with_not_stored(mut self, not_stored: Option<super::NotStored>) -> Self {
        self.not_stored = not_stored;
        self
    }

    /// With what conditional requests and requests with `Authorization` need.
    pub fn with_validators(
        mut self,
        validators: Option<Validators>,
        shareable_with_authorization: bool,
    ) -> Self {
        self.validators = validators.map(Box::new);
        self.shareable_with_authorization = shareable_with_authorization;
        self
    }

    /// The `Age` header's seconds: the upstream's `Age` plus whole seconds since the
    /// entry was stored.
    pub fn age_secs(&self, now: Instant) -> u64 {
        self.upstream_age
            .saturating_add(now.saturating_duration_since(self.stored_at).as_secs())
    }

    pub fn weight(&self) -> u64 {
        self.weight
    }
}

#[derive(Clone)]
struct ByBytes;

/// Keys as stored: shared by the store, its index and the flight that filled them.
type Key = Arc<CacheKey>;

impl Weighter<Key, Arc<Entry>> for ByBytes {
    fn weight(&self, _key: &Key, val: &Arc<Entry>) -> u64 {
        val.weight
    }
}

/// Counts evictions (entries pushed out to stay within `max_bytes`). Entries too heavy for
/// the store never reach it ([`Store::insert`] refuses them), so they are not counted here.
#[derive(Clone)]
struct CountEvictions(Arc<AtomicU64>);

/// What an insert did: the key it is storing (quick_cache reports the value it replaces
/// through the eviction hook too, and a replacement is not an eviction) and the keys it
/// pushed out, to leave the index once the store's shard is unlocked.
#[derive(Default)]
struct Inserting {
    key: Option<Key>,
    evicted: Vec<Key>,
}

impl Lifecycle<Key, Arc<Entry>> for CountEvictions {
    type RequestState = Inserting;

    fn on_evict(&self, state: &mut Inserting, key: Key, _val: Arc<Entry>) {
        if state.key.as_ref() != Some(&key) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        state.evicted.push(key);
    }
}

/// The stored keys by route name, then by path (ordered, for prefixes).
#[derive(Default)]
struct Index(HashMap<Box<str>, BTreeMap<Box<str>, HashSet<Key>>>);

impl Index {
    fn add(&mut self, key: Key) {
        self.0
            .entry(key.route().into())
            .or_default()
            .entry(key.path().into())
            .or_default()
            .insert(key);
    }

    fn remove(&mut self, key: &CacheKey) {
        let Some(paths) = self.0.get_mut(key.route()) else {
            return;
        };
        if let Some(keys) = paths.get_mut(key.path()) {
            keys.remove(key);
            if keys.is_empty() {
                paths.remove(key.path());
            }
        }
        if paths.is_empty() {
            self.0.remove(key.route());
        }
    }

    /// Takes out the keys of `route` made for the paths from `from` on, in order, while
    /// `go_on` holds: only those paths are looked at.
    fn take(&mut self, route: &str, from: &str, go_on: impl Fn(&str) -> bool) -> Vec<Key> {
        let Some(paths) = self.0.get_mut(route) else {
            return Vec::new();
        };
        let doomed: Vec<Box<str>> = paths
            .range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            .map(|(path, _)| path)
            .take_while(|path| go_on(path))
            .cloned()
            .collect();
        let keys = doomed
            .iter()
            .filter_map(|path| paths.remove(path))
            .flatten()
            .collect();
        if paths.is_empty() {
            self.0.remove(route);
        }
        keys
    }
}

/// The response store shared by every cached route.
///
/// Every change to what it holds (insert, remove, purge, and the evictions an insert makes)
/// happens under the index's lock, so the index names exactly the stored keys. Lookups
/// never take that lock.
pub struct Store {
    cache: Cache<Key, Arc<Entry>, ByBytes, DefaultHashBuilder, CountEvictions>,
    index: Mutex<Index>,
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
            index: Mutex::default(),
            evictions,
            max_bytes,
            largest_entry: largest_entry_weight(max_bytes),
        }
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.cache.get(key)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `entry` under `key`; false if it is heavier than the store can hold, and then
    /// the older entry under `key` (outdated) goes too, counted as neither.
    pub fn insert(&self, key: Key, entry: Arc<Entry>) -> bool {
        let mut index = self.index();
        if entry.weight > self.largest_entry {
            self.cache.remove(&*key);
            index.remove(&key);
            return false;
        }
        let mut inserting = Inserting {
            key: Some(key.clone()),
            evicted: Vec::new(),
        };
        self.cache
            .insert_with_lifecycle(key.clone(), entry, &mut inserting);
        for gone in &inserting.evicted {
            index.remove(gone);
        }
        if self.cache.contains_key(&*key) {
            index.add(key);
        }
        true
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&self, key: &CacheKey) -> bool {
        let mut index = self.index();
        index.remove(key);
        self.cache.remove(key).is_some()
    }

    /// Removes every entry of `route`; how many went.
    pub fn remove_route(&self, route: &str) -> usize {
        self.remove_paths(route, "", |_| true)
    }

    /// Removes the entries of `route` made for exactly `path`; how many went.
    pub fn remove_path(&self, route: &str, path: &str) -> usize {
        self.remove_paths(route, path, |p| p == path)
    }

    /// Removes the entries whose path starts with `prefix`, of `route` or of every route;
    /// how many went.
    pub fn remove_prefix(&self, route: Option<&str>, prefix: &str) -> usize {
        let mut index = self.index();
        let routes: Vec<Box<str>> = match route {
            Some(route) => vec![route.into()],
            None => index.0.keys().cloned().collect(),
        };
        let starts = |p: &str| p.starts_with(prefix);
        routes
            .iter()
            .map(|route| self.remove_keys(index.take(route, prefix, starts)))
            .sum()
    }

    fn remove_paths(&self, route: &str, from: &str, go_on: impl Fn(&str) -> bool) -> usize {
        let mut index = self.index();
        self.remove_keys(index.take(route, from, go_on))
    }

    /// Removes keys just taken out of the index (whose lock the caller holds).
    fn remove_keys(&self, keys: Vec<Key>) -> usize {
        keys.iter()
            .filter(|k| self.cache.remove(&***k).is_some())
            .count()
    }

    /// The stored keys carrying any of `tags`.
    pub fn keys_of_tags(&self, _tags: &[&str]) -> Vec<Key> {
        Vec::new()
    }

    /// The stored keys of `route`.
    pub fn keys_of(&self, route: &str) -> Vec<Key> {
        self.index()
            .0
            .get(route)
            .map(|paths| paths.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// How many stored keys of `route` made for exactly `path` satisfy `which`.
    pub fn count_path(&self, route: &str, path: &str, which: impl Fn(&CacheKey) -> bool) -> usize {
        self.index()
            .0
            .get(route)
            .and_then(|paths| paths.get(path))
            .map_or(0, |keys| keys.iter().filter(|k| which(k)).count())
    }

    /// A snapshot of the entries (keys and values are reference-counted, not copied).
    pub fn entries(&self) -> impl Iterator<Item = (Key, Arc<Entry>)> + '_ {
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
    use crate::cache::key::test_key;

    fn k(path: &str) -> Key {
        Arc::new(test_key("r", path))
    }
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
            store.insert(k(&format!("key-{i}")), entry(1024));
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
            store.cache.insert(k("fits"), with_weight(largest));
            assert!(store.get(&k("fits")).is_some(), "max_bytes {max_bytes}");
            // ... and refuses one byte more.
            store.cache.insert(k("heavy"), with_weight(largest + 1));
            assert!(store.get(&k("heavy")).is_none(), "max_bytes {max_bytes}");
            assert!(largest_body(max_bytes) < largest);
        }
        assert_eq!(largest_entry_weight(256 << 20), (32 << 20) * 97 / 100);
    }

    #[test]
    fn a_too_heavy_entry_is_refused_and_not_counted_as_an_eviction() {
        let store = Store::new(1 << 20);
        assert!(store.insert(k("k"), entry(1024)));
        let heavy = largest_body(1 << 20) as usize + HEAD_ALLOWANCE as usize;
        assert!(!store.insert(k("k"), entry(heavy)));
        assert!(store.get(&k("k")).is_none(), "the outdated entry went");
        assert_eq!(store.evictions(), 0);
        assert!(store.insert(k("k"), entry(largest_body(1 << 20) as usize)));
    }

    #[test]
    fn replacing_a_key_is_not_an_eviction() {
        let store = Store::new(1024 * 1024);
        for _ in 0..10 {
            store.insert(k("same"), entry(1024));
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

    fn in_index(store: &Store) -> usize {
        store
            .index()
            .0
            .values()
            .flat_map(|p| p.values())
            .map(HashSet::len)
            .sum()
    }

    #[test]
    fn purges_touch_only_what_they_name() {
        let store = Store::new(1 << 20);
        let keys = [
            ("a", "/orders/1"),
            ("a", "/orders/12"),
            ("a", "/orders/2"),
            ("a", "/other"),
            ("b", "/orders/1"),
            ("b", "/menu"),
        ];
        let fill = || {
            for (route, path) in keys {
                assert!(store.insert(Arc::new(test_key(route, path)), entry(10)));
            }
        };
        let held = |route, path| store.get(&test_key(route, path)).is_some();

        fill();
        assert_eq!(store.remove_path("a", "/orders/1"), 1);
        assert!(!held("a", "/orders/1"));
        assert!(held("a", "/orders/12") && held("b", "/orders/1"));
        assert_eq!(store.remove_path("a", "/orders/1"), 0);

        fill();
        assert_eq!(store.remove_prefix(Some("a"), "/orders/1"), 2);
        assert!(held("a", "/orders/2") && held("b", "/orders/1"));
        assert_eq!(store.remove_prefix(None, "/orders"), 2);
        assert!(held("a", "/other") && held("b", "/menu"));
        assert_eq!(store.len(), 2);

        fill();
        assert_eq!(store.remove_route("a"), 4);
        assert!(held("b", "/orders/1") && held("b", "/menu"));
        assert_eq!(store.remove_route("a"), 0);
        assert!(store.remove(&test_key("b", "/menu")));
        assert_eq!(store.len(), 1);
        assert_eq!(in_index(&store), 1);
        assert_eq!(store.keys_of("b").len(), 1);
    }

    #[test]
    fn evicted_and_refused_entries_leave_the_index() {
        let store = Store::new(64 * 1024);
        for i in 0..500 {
            store.insert(k(&format!("/p/{i}")), entry(1024));
        }
        assert!(store.evictions() > 0);
        assert_eq!(in_index(&store), store.len());
        let heavy = largest_body(64 * 1024) as usize + HEAD_ALLOWANCE as usize;
        let last = k("/p/499");
        assert!(store.get(&last).is_some());
        assert!(!store.insert(last, entry(heavy)));
        assert_eq!(in_index(&store), store.len());
        let held = store.len();
        assert_eq!(store.remove_route("r"), held);
        assert_eq!(store.len(), 0);
        assert_eq!(in_index(&store), 0);
        assert!(store.index().0.is_empty(), "no empty maps are kept");
    }
}

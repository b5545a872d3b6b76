//! The bounded in-memory store: `quick_cache` weighted by bytes, holding ready-to-send
//! responses, with an index of its keys by route and path, and by tag, so that purges
//! touch only the entries they name. Evictions are counted; entries too heavy to hold are
//! refused apart.

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
use super::tags::Tags;
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
    /// The entry's tags (surrogate keys), weighed with it and indexed by the store.
    tags: Tags,
    /// The identity head as bytes to send, built by the first answer that writes it.
    wire: OnceLock<Bytes>,
    /// The identity head as the HTTP/2 writer sends it, built by the first such answer.
    h2_head: OnceLock<Box<ResponseHeader>>,
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
            // The head counts three times: as headers, as the bytes to send (`wire`) and
            // as the HTTP/2 head (`h2_head`).
            weight: ENTRY_OVERHEAD
                + (key_len + 3 * header_bytes + body.len() + recipe_bytes) as u64,
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
            tags: Tags::default(),
            wire: OnceLock::new(),
            h2_head: OnceLock::new(),
        }
    }

    /// With its tags (route and upstream ones), made compact and weighed with the entry
    /// (before it is stored: the store weighs and indexes an entry when it is inserted).
    pub fn with_tags(mut self, mut tags: Tags) -> Self {
        tags.freeze();
        self.weight = self.weight - self.tags.weight() + tags.weight();
        self.tags = tags;
        self
    }

    /// The tags a purge by tag finds this entry under.
    pub fn tags(&self) -> &Tags {
        &self.tags
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

    /// Like [`Entry::pick`], with where the picked head is kept as the HTTP/2 writer sends
    /// it once built (whoever writes HTTP/2 answers builds it, on first use).
    pub fn pick_with_h2_head(
        &self,
        accept: Option<&http::HeaderValue>,
    ) -> (&ResponseHeader, &Bytes, &OnceLock<Box<ResponseHeader>>) {
        if self.variants.is_empty() {
            return (&self.header, &self.body, &self.h2_head);
        }
        match self.variants.pick(accept) {
            Some(Variant {
                header,
                body,
                h2_head,
                ..
            }) => (header, body, h2_head),
            None => (&self.header, &self.body, &self.h2_head),
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
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.contains(tag)
    }

    /// Its tags.
    pub fn tag_names(&self) -> impl Iterator<Item = &str> {
        self.tags.iter()
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

/// The tags of one key, as the index added them: the entry's own list, shared.
type KeyTags = Arc<[Box<str>]>;

/// The stored keys by route name, then by path (ordered, for prefixes), and by tag.
#[derive(Default)]
struct Index {
    routes: HashMap<Box<str>, BTreeMap<Box<str>, HashSet<Key>>>,
    /// The keys carrying each tag.
    tags: HashMap<Box<str>, HashSet<Key>>,
    /// The tags of each tagged key, to take it out of `tags` when it goes.
    tagged: HashMap<Key, KeyTags>,
}

impl Index {
    /// Adds `key` with its tags; a key added again keeps only its new tags.
    fn add(&mut self, key: Key, tags: Option<KeyTags>) {
        self.untag(&key);
        if let Some(tags) = tags {
            for tag in tags.iter() {
                match self.tags.get_mut(&**tag) {
                    Some(keys) => {
                        keys.insert(key.clone());
                    }
                    None => {
                        self.tags.insert(tag.clone(), HashSet::from([key.clone()]));
                    }
                }
            }
            self.tagged.insert(key.clone(), tags);
        }
        self.routes
            .entry(key.route().into())
            .or_default()
            .entry(key.path().into())
            .or_default()
            .insert(key);
    }

    fn remove(&mut self, key: &CacheKey) {
        self.untag(key);
        self.remove_path_of(key);
    }

    /// Takes `key` out of the route and path tree.
    fn remove_path_of(&mut self, key: &CacheKey) {
        let Some(paths) = self.routes.get_mut(key.route()) else {
            return;
        };
        // One walk down the tree when the path had this key only, as most have.
        if let Some((path, mut keys)) = paths.remove_entry(key.path()) {
            keys.remove(key);
            if !keys.is_empty() {
                paths.insert(path, keys);
            }
        }
        if paths.is_empty() {
            self.routes.remove(key.route());
        }
    }

    /// Takes `key` out of the sets of the tags it was added with.
    fn untag(&mut self, key: &CacheKey) {
        let Some(tags) = self.tagged.remove(key) else {
            return;
        };
        for tag in tags.iter() {
            if let Some(keys) = self.tags.get_mut(&**tag) {
                keys.remove(key);
                if keys.is_empty() {
                    self.tags.remove(&**tag);
                }
            }
        }
    }

    /// Takes out the keys of `route` made for the paths from `from` on, in order, while
    /// `go_on` holds: only those paths are looked at.
    fn take(&mut self, route: &str, from: &str, go_on: impl Fn(&str) -> bool) -> Vec<Key> {
        let Some(paths) = self.routes.get_mut(route) else {
            return Vec::new();
        };
        let doomed: Vec<Box<str>> = paths
            .range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            .map(|(path, _)| path)
            .take_while(|path| go_on(path))
            .cloned()
            .collect();
        let keys: Vec<Key> = doomed
            .iter()
            .filter_map(|path| paths.remove(path))
            .flatten()
            .collect();
        if paths.is_empty() {
            self.routes.remove(route);
        }
        for key in &keys {
            self.untag(key);
        }
        keys
    }

    /// Takes out every key carrying one of `tags`, each once.
    fn take_tags(&mut self, tags: &[&str]) -> Vec<Key> {
        let mut taken = Vec::new();
        for tag in tags {
            // Each key goes from every other tag's set too, so no later tag names it again.
            let Some(keys) = self.tags.remove(*tag) else {
                continue;
            };
            for key in keys {
                self.untag(&key);
                taken.push(key);
            }
        }
        // Out of the path tree in its own order: each walk down it follows the last one
        // through nodes still in the processor's cache (a purge of many keys takes a third
        // of the time it takes in the tag's order).
        taken.sort_unstable_by(|a, b| (a.route(), a.path()).cmp(&(b.route(), b.path())));
        for key in &taken {
            self.remove_path_of(key);
        }
        taken
    }

    /// The keys carrying one of `tags`, each once.
    fn keys_of_tags(&self, tags: &[&str]) -> Vec<Key> {
        let mut seen: HashSet<&Key> = HashSet::new();
        tags.iter()
            .filter_map(|tag| self.tags.get(*tag))
            .flatten()
            .filter(|key| seen.insert(key))
            .cloned()
            .collect()
    }
}

/// The response store shared by every cached route.
///
/// Every change to what it holds (insert, remove, purge, and the evictions an insert makes)
/// happens under the index's lock, so the index names exactly the stored keys, each under
/// exactly the tags of its stored entry. Lookups never take that lock.
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
        let tags = entry.tags.shared();
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
            index.add(key, tags);
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
            None => index.routes.keys().cloned().collect(),
        };
        let starts = |p: &str| p.starts_with(prefix);
        let keys: Vec<Key> = routes
            .iter()
            .flat_map(|route| index.take(route, prefix, starts))
            .collect();
        self.remove_keys(index, keys)
    }

    fn remove_paths(&self, route: &str, from: &str, go_on: impl Fn(&str) -> bool) -> usize {
        let mut index = self.index();
        let keys = index.take(route, from, go_on);
        self.remove_keys(index, keys)
    }

    /// Removes every entry carrying one of `tags`; how many went.
    pub fn remove_tags(&self, tags: &[&str]) -> usize {
        let mut index = self.index();
        let keys = index.take_tags(tags);
        self.remove_keys(index, keys)
    }

    /// The stored keys carrying one of `tags`, each once.
    pub fn keys_of_tags(&self, tags: &[&str]) -> Vec<Key> {
        self.index().keys_of_tags(tags)
    }

    /// Removes keys just taken out of `index`, then releases its lock before the entries
    /// are freed (many of them take a while); how many were stored.
    fn remove_keys(&self, index: MutexGuard<'_, Index>, keys: Vec<Key>) -> usize {
        let gone: Vec<_> = keys
            .iter()
            .filter_map(|k| self.cache.remove(&**k))
            .collect();
        drop(index);
        gone.len()
    }

    /// The stored keys of `route`.
    pub fn keys_of(&self, route: &str) -> Vec<Key> {
        self.index()
            .routes
            .get(route)
            .map(|paths| paths.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// How many stored keys of `route` made for exactly `path` satisfy `which`.
    pub fn count_path(&self, route: &str, path: &str, which: impl Fn(&CacheKey) -> bool) -> usize {
        self.index()
            .routes
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
            .routes
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
        assert!(store.index().routes.is_empty(), "no empty maps are kept");
    }

    fn tagged(body_len: usize, tags: &[&str]) -> Arc<Entry> {
        let e = Arc::try_unwrap(entry(body_len)).unwrap();
        Arc::new(e.with_tags(tags.iter().copied().collect()))
    }

    /// The tag index names exactly the stored keys, each under exactly the tags of its
    /// stored entry, with no empty sets kept.
    fn assert_tag_index_in_step(store: &Store) {
        let index = store.index();
        let mut pairs = 0;
        for (tag, keys) in &index.tags {
            assert!(!keys.is_empty(), "an empty set is kept for {tag:?}");
            for key in keys {
                let held = store.cache.peek(&**key);
                let held = held.unwrap_or_else(|| panic!("{tag:?} names {key:?}, not held"));
                assert!(held.tags().contains(tag), "{key:?} is not tagged {tag:?}");
                assert!(index.tagged[key].iter().any(|t| t == tag));
                pairs += 1;
            }
        }
        let mut held_pairs = 0;
        let mut held_tagged = 0;
        for (key, entry) in store.entries() {
            held_tagged += usize::from(!entry.tags().is_empty());
            for tag in entry.tags().iter() {
                assert!(
                    index.tags.get(tag).is_some_and(|keys| keys.contains(&key)),
                    "{key:?} is held with {tag:?} but not indexed under it"
                );
                held_pairs += 1;
            }
        }
        assert_eq!(pairs, held_pairs);
        assert_eq!(index.tagged.len(), held_tagged);
    }

    #[test]
    fn tags_weigh_with_their_entry() {
        let plain = entry(10);
        let e = tagged(10, &["restaurant:42", "menus"]);
        assert_eq!(e.weight(), plain.weight() + e.tags().weight());
        assert!(e.tags().weight() > 0);
        // Tagging again replaces the tags and their weight.
        let again = Arc::try_unwrap(e)
            .unwrap()
            .with_tags(["x"].into_iter().collect());
        assert_eq!(again.weight(), plain.weight() + again.tags().weight());
        assert_eq!(again.tags().iter().collect::<Vec<_>>(), ["x"]);
    }

    #[test]
    fn purges_by_tag_touch_only_the_entries_tagged() {
        let store = Store::new(1 << 20);
        let fill = || {
            assert!(store.insert(k("/r/1"), tagged(10, &["restaurant:1", "menus"])));
            assert!(store.insert(k("/r/2"), tagged(10, &["restaurant:2", "menus"])));
            assert!(store.insert(k("/r/3"), tagged(10, &["restaurant:3"])));
            assert!(store.insert(k("/plain"), entry(10)));
        };
        let held = |path| store.get(&test_key("r", path)).is_some();
        fill();
        assert_tag_index_in_step(&store);
        let mut menus: Vec<String> = store
            .keys_of_tags(&["menus", "restaurant:1"])
            .iter()
            .map(|k| k.path().to_string())
            .collect();
        menus.sort();
        assert_eq!(menus, ["/r/1", "/r/2"], "each key once");
        assert!(store.keys_of_tags(&["nothing"]).is_empty());

        assert_eq!(store.remove_tags(&["restaurant:1"]), 1);
        assert!(!held("/r/1") && held("/r/2") && held("/r/3") && held("/plain"));
        assert_eq!(
            store.keys_of_tags(&["menus"]).len(),
            1,
            "/r/1 left every tag"
        );
        assert_tag_index_in_step(&store);
        assert_eq!(store.remove_tags(&["restaurant:1"]), 0);

        // Two tags naming one entry remove it once.
        fill();
        assert_eq!(store.remove_tags(&["menus", "restaurant:2", "nothing"]), 2);
        assert!(held("/r/3") && held("/plain"));
        assert_tag_index_in_step(&store);
        assert_eq!(in_index(&store), store.len());

        // Purges by route, path and prefix take keys out of the tag index too.
        fill();
        assert_eq!(store.remove_path("r", "/r/1"), 1);
        assert_eq!(store.remove_prefix(None, "/r/"), 2);
        assert_tag_index_in_step(&store);
        assert!(store.index().tags.is_empty());
        fill();
        assert!(store.remove(&test_key("r", "/r/2")));
        assert_tag_index_in_step(&store);
        assert_eq!(store.remove_route("r"), 3);
        let index = store.index();
        assert!(index.tags.is_empty() && index.tagged.is_empty() && index.routes.is_empty());
    }

    #[test]
    fn a_replaced_or_refused_entry_leaves_its_old_tags() {
        let store = Store::new(1 << 20);
        assert!(store.insert(k("/k"), tagged(10, &["a", "b"])));
        assert!(store.insert(k("/k"), tagged(10, &["b", "c"])));
        assert_tag_index_in_step(&store);
        assert!(store.keys_of_tags(&["a"]).is_empty());
        assert_eq!(store.keys_of_tags(&["c"]).len(), 1);
        assert_eq!(store.remove_tags(&["a"]), 0);
        assert_eq!(store.len(), 1);
        // A new entry without tags takes the key out of the tag index.
        assert!(store.insert(k("/k"), entry(10)));
        assert_tag_index_in_step(&store);
        assert!(store.index().tagged.is_empty());
        assert!(store.insert(k("/k"), tagged(10, &["b"])));
        // Refused: the outdated entry goes, with its tags, and the new tags never come.
        let heavy = largest_body(1 << 20) as usize + HEAD_ALLOWANCE as usize;
        assert!(!store.insert(k("/k"), tagged(heavy, &["z"])));
        assert_tag_index_in_step(&store);
        assert!(store.keys_of_tags(&["b", "z"]).is_empty());
        assert!(store.index().tags.is_empty());
    }

    #[test]
    fn the_tag_index_stays_in_step_through_eviction_storms() {
        let store = Store::new(64 * 1024);
        let heavy = largest_body(64 * 1024) as usize + HEAD_ALLOWANCE as usize;
        for i in 0..3000usize {
            let shared = if i % 2 == 0 { "even" } else { "odd" };
            let group = format!("group:{}", i % 7);
            let own = format!("own:{i}");
            let e = if i % 50 == 49 {
                // Now and then too heavy: refused, and the key's older entry goes.
                tagged(heavy, &[shared, "refused"])
            } else {
                tagged(256 + i % 1024, &[shared, &group, &own])
            };
            // Keys come back, with other tags, as often as new ones come.
            store.insert(k(&format!("/p/{}", i % 400)), e);
            if i % 500 == 0 {
                assert_tag_index_in_step(&store);
            }
        }
        assert!(store.evictions() > 0);
        assert_tag_index_in_step(&store);
        assert_eq!(in_index(&store), store.len());
        assert!(store.keys_of_tags(&["refused"]).is_empty());

        let even = store.keys_of_tags(&["even"]).len();
        assert!(even > 0);
        let held = store.len();
        assert_eq!(store.remove_tags(&["even"]), even);
        assert_eq!(store.len(), held - even);
        assert!(store.entries().all(|(_, e)| !e.tags().contains("even")));
        assert_tag_index_in_step(&store);
        assert_eq!(store.remove_tags(&["odd"]), held - even);
        assert!(store.is_empty());
        let index = store.index();
        assert!(index.tags.is_empty() && index.tagged.is_empty() && index.routes.is_empty());
    }

    #[test]
    fn a_tag_on_100k_entries_is_purged_at_once() {
        let store = Store::new(512 << 20);
        let n = 100_000;
        for i in 0..n {
            let e = tagged(0, &["shared", if i % 2 == 0 { "even" } else { "odd" }]);
            assert!(store.insert(k(&format!("/p/{i}")), e));
        }
        assert_eq!(store.len(), n, "nothing evicted");
        assert_eq!(store.keys_of_tags(&["even"]).len(), n / 2);
        assert_eq!(store.remove_tags(&["shared"]), n);
        assert!(store.is_empty());
        let index = store.index();
        assert!(index.tags.is_empty() && index.tagged.is_empty() && index.routes.is_empty());
    }
}
